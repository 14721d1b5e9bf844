//! What the host-agent benchmarks (`agent-*` binaries) share beyond
//! testkit's agent harness (`testkit::agent_harness`: the agent in-process on
//! this host's KVM, the direct-VMM reference): finding `reddog-vmm`, the
//! cores, the process's CPU time, milliseconds for printing.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// `--vmm PATH`, or `reddog-vmm` next to this binary, or the static build
/// `scripts/bench-boot` makes (`<target>/x86_64-unknown-linux-gnu/release`).
pub fn find_vmm(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        if !p.exists() {
            bail!("{} does not exist", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let dir = exe.parent().context("binary has no parent directory")?;
    let candidates = [
        dir.join("reddog-vmm"),
        dir.join("../x86_64-unknown-linux-gnu/release/reddog-vmm"),
    ];
    for c in &candidates {
        if c.exists() {
            return Ok(c.clone());
        }
    }
    bail!(
        "reddog-vmm not found next to {} (build it with `cargo build --release -p vmm`) or pass --vmm PATH",
        exe.display()
    )
}

/// The cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, exclusively borrowed out-pointer for the call.
    let r = unsafe { libc::getrusage(who, &mut u) };
    assert_eq!(r, 0, "getrusage: {}", std::io::Error::last_os_error());
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// User + system CPU time of this process (all its threads), from `getrusage`.
pub fn cpu_time_self() -> Duration {
    rusage(libc::RUSAGE_SELF)
}

/// User + system CPU time of this process's reaped children.
pub fn cpu_time_children() -> Duration {
    rusage(libc::RUSAGE_CHILDREN)
}

/// Milliseconds, for printing.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
