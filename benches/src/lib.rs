//! Shared pieces of reddog's benchmarks: spawning a VMM and timing it from the
//! outside, and summarising samples.
//!
//! # Crate rules
//!
//! - **Owns** the benchmark binaries and what they share (timing, summaries,
//!   [`agent_kit`]; the agent harness itself is testkit's); nothing here is
//!   linked by another crate.
//! - **May depend on** anything in the workspace it measures (the `agent`
//!   library in-process, `vmm-api`, `vhd`, `guest-proto`), `testkit` (the KVM
//!   check, the test guest's command line) and `tokio` for the agent benchmarks.
//! - **Must not** be a dependency of any other crate, nor reach into the VMM's
//!   internals: the VMM is measured as the `reddog-vmm` process.

// `wait4` (for the child's peak RSS) is a raw syscall.
#![allow(unsafe_code)]

pub mod agent_kit;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One boot, timed from the parent: spawn to the marker on the guest console,
/// spawn to process exit, and the child's peak resident set.
#[derive(Debug, Clone, Copy)]
pub struct BootSample {
    /// Spawn to the marker line on stdout.
    pub marker: Duration,
    /// Spawn to process exit (after the kernel tore the VM down).
    pub exit: Duration,
    /// Peak RSS in KiB (`ru_maxrss` from `wait4`).
    pub max_rss_kib: u64,
    /// The exit status.
    pub status: i32,
}

/// Why a timed boot failed.
#[derive(Debug)]
pub struct BootFailure(pub String);

impl std::fmt::Display for BootFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BootFailure {}

/// Spawns `cmd` (stdout piped), times `marker` on its stdout and its exit.
/// Gives up after `limit`.
pub fn time_boot(
    cmd: &mut Command,
    marker: &[u8],
    limit: Duration,
) -> Result<BootSample, BootFailure> {
    let started = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| BootFailure(format!("cannot spawn {cmd:?}: {e}")))?;
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| BootFailure("no stdout pipe".into()))?;
    let mut seen = Vec::with_capacity(4096);
    let mut buf = [0u8; 4096];
    let mut marker_at = None;
    while marker_at.is_none() {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(marker.len()).any(|w| w == marker) {
                    marker_at = Some(started.elapsed());
                }
            }
            Err(e) => return Err(BootFailure(format!("reading the console: {e}"))),
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            return Err(BootFailure("timed out waiting for the marker".into()));
        }
    }
    // Drain the rest so the child never blocks on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    });
    let (status, max_rss_kib) = wait4(child.id())?;
    let exit = started.elapsed();
    let _ = drain.join();
    let marker = marker_at.ok_or_else(|| {
        BootFailure(format!(
            "exited ({status}) without printing the marker; console: {}",
            String::from_utf8_lossy(&seen)
        ))
    })?;
    Ok(BootSample {
        marker,
        exit,
        max_rss_kib,
        status,
    })
}

/// Waits for `pid` and returns its exit status and peak RSS in KiB.
fn wait4(pid: u32) -> Result<(i32, u64), BootFailure> {
    let mut status = 0i32;
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own un-reaped child; `status` and `usage` are valid,
    // exclusively borrowed out-pointers for the duration of the call.
    let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    if r < 0 {
        return Err(BootFailure(format!(
            "wait4: {}",
            std::io::Error::last_os_error()
        )));
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    Ok((code, usage.ru_maxrss.max(0) as u64))
}

/// min / median / p90 / max of a sample set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Smallest.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// Largest.
    pub max: f64,
}

/// Summarises `values` (any order). `None` for an empty set.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = |p: f64| v[(((p * v.len() as f64).ceil() as usize).max(1) - 1).min(v.len() - 1)];
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    Some(Summary {
        min: v[0],
        median,
        p90: rank(0.9),
        max: v[v.len() - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_statistics() {
        let s = summarize(&[5.0, 1.0, 3.0, 2.0, 4.0]).expect("non-empty");
        assert_eq!((s.min, s.median, s.max), (1.0, 3.0, 5.0));
        assert_eq!(s.p90, 5.0);
        let s = summarize(&(1..=10).map(f64::from).collect::<Vec<_>>()).expect("non-empty");
        assert_eq!((s.median, s.p90), (5.5, 9.0));
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn times_a_real_process() {
        let s = time_boot(
            Command::new("sh").args(["-c", "echo hello-marker; sleep 0.05"]),
            b"hello-marker",
            Duration::from_secs(10),
        )
        .expect("boot");
        assert_eq!(s.status, 0);
        assert!(s.exit >= s.marker);
        assert!(s.exit >= Duration::from_millis(50));
        assert!(s.max_rss_kib > 0);
        let err = time_boot(
            Command::new("true").arg("x"),
            b"never",
            Duration::from_secs(10),
        );
        assert!(err.is_err());
    }
}
