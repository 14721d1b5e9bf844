//! Inputs found by the fuzz targets (`fuzz/fuzz_targets/qcow2_open.rs`, `vhd_open.rs`),
//! replayed through the same steps: open read-only and read, check, info, open read-write
//! and write. Each must end in errors or success, never a panic (tests build with overflow
//! checks, like the fuzz targets). The files are in `tests/fuzz_inputs/`, named
//! `<format>-<what went wrong>`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use vhd::{DiskImage, Format, OpenOptions};

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
    assert!(img.read_at(&mut buf[..512], size).is_err());
    let _ = img.flush();
}

fn replay(input: &Path, format: Format) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("input");
    std::fs::copy(input, &path).expect("copy input");
    if let Ok(img) = vhd::open(&path, format, OpenOptions::read_only()) {
        exercise(img.as_ref(), false);
    }
    let _ = vhd::check::check(&path, format);
    let _ = vhd::cli::info(&path, Some(format));
    if let Ok(img) = vhd::open(&path, format, OpenOptions::read_write()) {
        exercise(img.as_ref(), true);
    }
}

#[test]
fn fuzz_inputs_do_not_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_inputs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("tests/fuzz_inputs") {
        let path = e.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let format = if name.starts_with("qcow2-") {
            Format::Qcow2
        } else if name.starts_with("vhd-") {
            Format::Vhd
        } else {
            continue;
        };
        let t = std::time::Instant::now();
        replay(&path, format);
        assert!(t.elapsed().as_secs() < 5, "{name} took {:?}", t.elapsed());
        n += 1;
    }
    assert!(n > 0, "no inputs found in {}", dir.display());
}
