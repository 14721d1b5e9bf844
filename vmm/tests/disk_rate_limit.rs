//! A guest doing disk I/O is held to its disk's rate limit (`--disk
//! ...,rate_bytes=N,rate_ops=N`): the test guest times its own reads
//! (kvmclock) and the VMM's wall time is checked too. The bounds follow from
//! the token bucket (the burst, then the rate), loose above so a slow host
//! never fails them; without the limiter the same reads take a few ms.

mod common;

use std::time::{Duration, Instant};

use common::{boot, Cmdline};
use vmm_api::platform::mmio;

/// Runs `reads` reads of `kib` KiB from a 4 MiB raw disk with `limits`
/// appended to its `--disk` spec; returns the guest's `ms=` and the wall time.
fn timed_reads(reads: u32, kib: u32, limits: &str) -> (u64, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![0x5a_u8; 4 << 20]).expect("disk");
    let disk = format!("path={},format=raw{limits}", img.display());
    let addr = mmio::window(0).expect("window 0").addr;
    let cmdline = Cmdline::new()
        .exit_acpi()
        .no_smp()
        .quiet()
        .blk_reads(addr, reads, kib);
    let start = Instant::now();
    let run = boot(test_guest::elf_path(), &cmdline, &["--disk", &disk]);
    let wall = start.elapsed();
    assert_eq!(run.status, 0, "{}", run.describe());
    let line = run
        .line("blk")
        .unwrap_or_else(|| panic!("{}", run.describe()));
    let want = format!("reads={reads} kib={kib} ms=");
    let ms = line
        .strip_prefix(want.as_str())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad blk line {line:?}: {}", run.describe()));
    (ms, wall)
}

#[test]
fn a_guest_reading_its_disk_is_held_to_the_byte_rate() {
    // 2 MiB at 1 MiB/s with a 64 KiB burst: at least (2 MiB - 64 KiB) / 1 MiB/s
    // = 1.94 s (a token bucket cannot be faster than that).
    let (free_ms, _) = timed_reads(32, 64, "");
    let (ms, wall) = timed_reads(32, 64, ",rate_bytes=1048576,rate_bytes_burst=65536");
    eprintln!("2 MiB in 64 KiB reads: unlimited {free_ms} ms, at 1 MiB/s {ms} ms (wall {wall:?})");
    assert!(
        free_ms < 1500,
        "unlimited reads took {free_ms} ms: too slow a host to tell the limit apart"
    );
    assert!(ms >= 1800, "the limit did not hold: {ms} ms");
    assert!(ms < 15_000, "far slower than the limit: {ms} ms");
    assert!(wall >= Duration::from_millis(1800), "{wall:?}");
}

#[test]
fn a_guest_is_held_to_the_request_rate() {
    // 40 one-KiB reads at 20 requests/s with a burst of 1: at least 39 / 20 = 1.95 s.
    let (ms, _) = timed_reads(40, 1, ",rate_ops=20,rate_ops_burst=1");
    eprintln!("40 reads at 20/s: {ms} ms");
    assert!(ms >= 1800, "the limit did not hold: {ms} ms");
    assert!(ms < 15_000, "far slower than the limit: {ms} ms");
}
