//! Opens arbitrary bytes as vhd (read-only, then read-write on a copy), reads, writes,
//! flushes and runs the metadata check. Even-length inputs get their footer and header
//! checksums fixed first, so mutations get past the checksum checks. Nothing may panic, and every allocation must be
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

fn checksum(b: &[u8], skip: std::ops::Range<usize>) -> [u8; 4] {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !skip.contains(i))
        .fold(0u32, |a, (_, &x)| a.wrapping_add(u32::from(x)));
    (!sum).to_be_bytes()
}

/// Makes the footer (at the end and its copy at 0) and the dynamic header checksums right,
/// so mutations reach the code behind the checksum checks (fields, BAT, blocks).
fn fix_checksums(d: &mut [u8]) {
    let n = d.len() / 512 * 512;
    if n < 512 {
        return;
    }
    for at in [0, n - 512] {
        let c = checksum(&d[at..at + 512], 64..68);
        d[at + 64..at + 68].copy_from_slice(&c);
    }
    let f = n - 512;
    let mut off = [0u8; 8];
    off.copy_from_slice(&d[f + 16..f + 24]);
    let h = u64::from_be_bytes(off);
    if let Some(h) = usize::try_from(h)
        .ok()
        .filter(|&h| h.checked_add(1024).is_some_and(|e| e <= d.len()))
    {
        let c = checksum(&d[h..h + 1024], 36..40);
        d[h + 36..h + 40].copy_from_slice(&c);
    }
}

fuzz_target!(|data: &[u8]| {
    let path = scratch("vhd");
    // Odd-length inputs are used as they are (checksum checks included); even-length ones
    // get their checksums fixed first.
    let mut data = data.to_vec();
    if data.len() % 2 == 0 {
        fix_checksums(&mut data);
    }
    if std::fs::write(&path, &data).is_err() {
        return;
    }
    if let Ok(img) = vhd::open(&path, Format::Vhd, OpenOptions::read_only()) {
        exercise(img.as_ref(), false);
    }
    let _ = vhd::check::check(&path, Format::Vhd);
    let _ = vhd::cli::info(&path, Some(Format::Vhd));
    if let Ok(img) = vhd::open(&path, Format::Vhd, OpenOptions::read_write()) {
        exercise(img.as_ref(), true);
    }
    let _ = std::fs::remove_file(&path);
});
