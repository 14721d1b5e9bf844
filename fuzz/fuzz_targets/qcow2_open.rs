//! Opens arbitrary bytes as qcow2 (read-only, then read-write on a copy), reads, writes,
//! flushes and runs the metadata check. Nothing may panic, and every allocation must be
//! bounded by the input's size (the disk layer checks claims against the file length).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use vhd::{DiskImage, Format, OpenOptions};

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("reddog-fuzz-{}-{name}", std::process::id()))
}

fn exercise(img: &dyn DiskImage, write: bool) {
    let size = img.size();
    let mut buf = vec![0u8; 64 * 1024];
    for off in [0, size / 2, size.saturating_sub(4096)] {
        let n = (buf.len() as u64).min(size.saturating_sub(off)) as usize;
        let _ = img.read_at(&mut buf[..n], off);
        if write {
            let _ = img.write_at(&buf[..n.min(5000)], off);
            let _ = img.write_zeroes(off, (n as u64).min(70_000));
        }
    }
    // Out of bounds must fail cleanly.
    let _ = img.read_at(&mut buf[..512], size);
    let _ = img.flush();
}

fuzz_target!(|data: &[u8]| {
    let path = scratch("qcow2");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(img) = vhd::open(&path, Format::Qcow2, OpenOptions::read_only()) {
        exercise(img.as_ref(), false);
    }
    let _ = vhd::check::check(&path, Format::Qcow2);
    let _ = vhd::cli::info(&path, Some(Format::Qcow2));
    if let Ok(img) = vhd::open(&path, Format::Qcow2, OpenOptions::read_write()) {
        exercise(img.as_ref(), true);
    }
    let _ = std::fs::remove_file(&path);
});
