//! Deterministic mutation testing (a small in-tree stand-in for the fuzz targets): damaged
//! qcow2 and VHD files must produce errors, never panics, and opening them must stay fast.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::sync::Arc;
use vhd::{BaseRef, CreateOptions, DiskImage, Format, OpenOptions};

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
    assert!(
        img.read_at(&mut buf[..512], size).is_err(),
        "a read past the end must fail"
    );
    let _ = img.flush();
}

fn mutate(rng: &mut Rng, data: &mut Vec<u8>, hot: &[usize]) {
    match rng.below(4) {
        0 => {
            let n = data.len() as u64;
            data.truncate(rng.below(n) as usize);
        }
        1 => {
            // Extreme values into a metadata field.
            let at = hot[rng.below(hot.len() as u64) as usize] + rng.below(64) as usize;
            let v: [u8; 4] = match rng.below(4) {
                0 => [0xff; 4],
                1 => [0; 4],
                2 => [0x7f, 0xff, 0xff, 0xff],
                _ => (rng.next() as u32).to_be_bytes(),
            };
            if at + 4 <= data.len() {
                data[at..at + 4].copy_from_slice(&v);
            }
        }
        _ => {
            for _ in 0..1 + rng.below(8) {
                let region = hot[rng.below(hot.len() as u64) as usize];
                let at = region + rng.below(2048) as usize;
                if at < data.len() {
                    data[at] ^= 1 << rng.below(8);
                }
            }
        }
    }
}

fn run_mutations(
    name: &str,
    original: &[u8],
    fmt: Format,
    hot: &[usize],
    backing: Option<Arc<dyn DiskImage>>,
    seed: u64,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    let mut rng = Rng::new(seed);
    let mut opened = 0;
    for _ in 0..150 {
        let mut data = original.to_vec();
        mutate(&mut rng, &mut data, hot);
        std::fs::write(&path, &data).expect("write mutant");
        let t = std::time::Instant::now();
        let opts = |ro: bool| OpenOptions {
            read_only: ro,
            backing: backing.clone(),
        };
        if let Ok(img) = vhd::open(&path, fmt, opts(true)) {
            opened += 1;
            exercise(img.as_ref(), false);
        }
        let _ = vhd::check::check(&path, fmt);
        let _ = vhd::cli::info(&path, Some(fmt));
        if let Ok(img) = vhd::open(&path, fmt, opts(false)) {
            exercise(img.as_ref(), true);
        }
        assert!(
            t.elapsed().as_secs() < 5,
            "a mutant of {name} took {:?}",
            t.elapsed()
        );
    }
    // Some mutants must still open, or the mutations only test the first check.
    assert!(opened > 0, "no mutant of {name} opened");
}

#[test]
fn damaged_qcow2_never_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, opts) in ["cluster_size=4096", "cluster_size=65536,compat=0.10"]
        .iter()
        .enumerate()
    {
        let img = dir.path().join(format!("q{i}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            img.to_str().expect("utf-8"),
            "8M",
        ]);
        qemu_io(&[
            "-f",
            "qcow2",
            "-c",
            "write -P 7 0 300k",
            "-c",
            "write -P 9 5M 64k",
            img.to_str().expect("utf-8"),
        ]);
        let data = read_file(&img);
        let cs = if i == 0 { 4096 } else { 65536 };
        let hot: Vec<usize> = (0..6).map(|k| k * cs).filter(|&o| o < data.len()).collect();
        run_mutations("m.qcow2", &data, Format::Qcow2, &hot, None, 100 + i as u64);
    }
}

#[test]
fn damaged_vhd_never_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dynamic = dir.path().join("d.vhd");
    let mut o = CreateOptions::new(3 << 20);
    o.vhd_block_size = Some(65536);
    vhd::create(&dynamic, Format::Vhd, &o).expect("create");
    {
        let img = vhd::open(&dynamic, Format::Vhd, OpenOptions::read_write()).expect("open");
        img.write_at(&[5u8; 200_000], 10_000).expect("write");
        img.flush().expect("flush");
    }
    let data = read_file(&dynamic);
    let end = data.len() - 512;
    run_mutations(
        "m.vhd",
        &data,
        Format::Vhd,
        &[0, 512, 1024, 1536, 2048, end],
        None,
        7,
    );

    let base = vhd::open(&dynamic, Format::Vhd, OpenOptions::read_only()).expect("base");
    let child = dir.path().join("c.vhd");
    let b = BaseRef {
        image: Arc::clone(&base),
        name: "d.vhd".into(),
    };
    vhd::create_diff(&child, Format::Vhd, &b, None, None).expect("diff");
    {
        let img = vhd::open(
            &child,
            Format::Vhd,
            OpenOptions::read_write().with_backing(Arc::clone(&base)),
        )
        .expect("open");
        img.write_at(&[6u8; 3000], 70_000).expect("write");
        img.flush().expect("flush");
    }
    let data = read_file(&child);
    let end = data.len() - 512;
    run_mutations(
        "c.vhd",
        &data,
        Format::Vhd,
        &[0, 512, 1024, 1536, 2048, end],
        Some(base),
        8,
    );

    let fixed = dir.path().join("f.vhd");
    let mut o = CreateOptions::new(1 << 20);
    o.vhd_fixed = true;
    vhd::create(&fixed, Format::Vhd, &o).expect("create fixed");
    let data = read_file(&fixed);
    let end = data.len() - 512;
    run_mutations("f.vhd", &data, Format::Vhd, &[end], None, 9);
}
