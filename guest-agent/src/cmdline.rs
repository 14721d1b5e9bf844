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
}

/// Parses `reddog.*` options; others (the kernel's own) are ignored, bad
/// values are ignored with a note in the returned list.
pub fn parse(cmdline: &str) -> (Options, Vec<String>) {
    let mut o = Options {
        wait_secs: 10,
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
    }
}
