//! The `reddog.*` options on the kernel command line.

/// What the guest is asked to do.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Options {
    /// Host port to connect to over vsock and send a hello line.
    pub vsock_connect: Option<u32>,
    /// Guest port to listen on for one host-initiated connection.
    pub vsock_listen: Option<u32>,
    /// Disks (by serial) to try writing to; the result is reported.
    pub write_test: Vec<String>,
    /// How many virtio disks to wait for.
    pub disks: usize,
    /// Seconds to wait for devices and connections.
    pub wait_secs: u64,
    /// The host agent's vsock port (`reddog.agent_port`).
    pub agent_port: u32,
    /// `reddog.mode=probe|agent`; `None` = decided by the other options.
    pub mode: Option<Mode>,
}

/// What `reddog-guest` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Platform checks, then power off (the nested platform tests).
    Probe,
    /// The guest agent: OS root, role, heartbeats.
    Agent,
}

/// The host agent's vsock port when the command line names none.
pub const DEFAULT_AGENT_PORT: u32 = 1024;

impl Options {
    /// Probe mode when asked for, or when any probe option is given; the
    /// agent otherwise.
    pub fn mode(&self) -> Mode {
        self.mode.unwrap_or(
            if self.vsock_connect.is_some()
                || self.vsock_listen.is_some()
                || !self.write_test.is_empty()
                || self.disks > 0
            {
                Mode::Probe
            } else {
                Mode::Agent
            },
        )
    }
}

/// Parses `reddog.*` options; others (the kernel's own) are ignored, bad
/// values are ignored with a note in the returned list.
pub fn parse(cmdline: &str) -> (Options, Vec<String>) {
    let mut o = Options {
        wait_secs: 10,
        agent_port: DEFAULT_AGENT_PORT,
        ..Default::default()
    };
    let mut notes = Vec::new();
    for tok in cmdline.split_whitespace() {
        let Some((key, value)) = tok.strip_prefix("reddog.").and_then(|t| t.split_once('=')) else {
            continue;
        };
        let port = || value.parse::<u32>().ok();
        match key {
            "vsock_connect" => o.vsock_connect = port(),
            "vsock_listen" => o.vsock_listen = port(),
            "write_test" => o.write_test.extend(value.split(',').map(str::to_owned)),
            "wait" => o.wait_secs = value.parse().unwrap_or(o.wait_secs).min(600),
            "disks" => o.disks = value.parse().unwrap_or(0).min(16),
            "agent_port" => match port() {
                Some(p) => o.agent_port = p,
                None => notes.push(format!(
                    "bad reddog.agent_port={value}; using {}",
                    o.agent_port
                )),
            },
            "mode" => match value {
                "probe" => o.mode = Some(Mode::Probe),
                "agent" => o.mode = Some(Mode::Agent),
                _ => notes.push(format!("unknown reddog.mode={value}")),
            },
            _ => notes.push(format!("unknown option reddog.{key}")),
        }
    }
    (o, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reddog_options_only() {
        let (o, notes) = parse(
            "console=ttyS0 reddog.vsock_connect=1024 reddog.vsock_listen=5000 reddog.write_test=role,os reddog.wait=3 reddog.disks=3 reddog.bogus=1 reddog.vsock_listen=x",
        );
        assert_eq!(o.vsock_connect, Some(1024));
        assert_eq!(
            o.vsock_listen, None,
            "the later bad value wins and is dropped"
        );
        assert_eq!(o.write_test, vec!["role", "os"]);
        assert_eq!(o.wait_secs, 3);
        assert_eq!(o.disks, 3);
        assert_eq!(notes, vec!["unknown option reddog.bogus"]);
        assert_eq!(parse("").0.wait_secs, 10);
        assert_eq!(o.mode(), Mode::Probe);
    }

    #[test]
    fn agent_mode_and_port() {
        let (o, notes) = parse("quiet reddog.agent_port=2048");
        assert!(notes.is_empty());
        assert_eq!((o.mode(), o.agent_port), (Mode::Agent, 2048));
        let (o, notes) = parse("reddog.agent_port=x reddog.mode=agent reddog.disks=3");
        assert_eq!((o.mode(), o.agent_port), (Mode::Agent, DEFAULT_AGENT_PORT));
        assert_eq!(notes.len(), 1);
        assert_eq!(parse("reddog.mode=probe").0.mode(), Mode::Probe);
    }
}
