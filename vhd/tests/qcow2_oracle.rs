//! qcow2 oracle tests: seeded random operations mirrored into an expected raw file, with
//! qemu-img as the second reader and checker. Needs qemu-img and qemu-io.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vhd::{BaseRef, DiskImage, Format, OpenOptions};

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq)]
enum BaseKind {
    Raw,
    Qcow2,
    Compressed,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Maker {
    Qemu,
    Ours,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    cluster: u64,
    compat: &'static str,
    base: BaseKind,
    absolute_name: bool,
    base_size: u64,
    overlay_size: u64,
    maker: Maker,
    seed: u64,
    ops: usize,
}

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

/// Writes random data into a raw base and turns it into the requested kind.
fn make_base(dir: &Path, kind: BaseKind, size: u64, seed: u64) -> (PathBuf, Format, PathBuf) {
    let raw = dir.join("base-content.raw");
    let mut data = vec![0u8; size as usize];
    let mut rng = Rng::new(seed ^ 0xba5e);
    // Leave some holes so unallocated base areas are covered too.
    for chunk in data.chunks_mut(64 * 1024) {
        if rng.below(3) != 0 {
            rng.fill(chunk);
        }
    }
    std::fs::write(&raw, &data).expect("write base");
    match kind {
        BaseKind::Raw => {
            let b = dir.join("base.raw");
            std::fs::copy(&raw, &b).expect("copy base");
            (b, Format::Raw, raw)
        }
        BaseKind::Qcow2 | BaseKind::Compressed => {
            let b = dir.join("base.qcow2");
            let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
            if kind == BaseKind::Compressed {
                args.push("-c");
            }
            args.push(p(&raw));
            args.push(p(&b));
            qemu_img(&args);
            (b, Format::Qcow2, raw)
        }
    }
}

fn open_base(path: &Path, fmt: Format) -> Arc<dyn DiskImage> {
    vhd::open(path, fmt, OpenOptions::read_only()).expect("open base read-only")
}

fn open_overlay(path: &Path, base: &Arc<dyn DiskImage>) -> Arc<dyn DiskImage> {
    vhd::open(
        path,
        Format::Qcow2,
        OpenOptions::read_write().with_backing(Arc::clone(base)),
    )
    .expect("open overlay")
}

fn run_case(c: Case) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base_path, base_fmt, content) = make_base(dir.path(), c.base, c.base_size, c.seed);
    let overlay = dir.path().join("overlay.qcow2");
    let name = if c.absolute_name {
        p(&base_path).to_string()
    } else {
        base_path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string()
    };
    let base = open_base(&base_path, base_fmt);
    let base_hash = hash_file(&base_path);
    match c.maker {
        Maker::Qemu => {
            let opts = format!("cluster_size={},compat={}", c.cluster, c.compat);
            let size = c.overlay_size.to_string();
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &opts,
                "-b",
                &name,
                "-F",
                base_fmt.qemu_name(),
                p(&overlay),
                &size,
            ]);
        }
        Maker::Ours => {
            let b = BaseRef {
                image: Arc::clone(&base),
                name: name.clone(),
            };
            vhd::create_diff(
                &overlay,
                Format::Qcow2,
                &b,
                Some(c.overlay_size),
                Some(c.cluster as u32),
            )
            .expect("create overlay");
        }
    }
    let expected = dir.path().join("expected.raw");
    std::fs::copy(&content, &expected).expect("copy expected");

    let mut o = Oracle::new(open_overlay(&overlay, &base), &expected, 1);
    o.hot = vec![c.base_size, c.cluster, 3 * c.cluster];
    let l2_cov = c.cluster * c.cluster / 8;
    let mut b = l2_cov;
    while b < c.overlay_size && o.hot.len() < 12 {
        o.hot.push(b);
        b += l2_cov;
    }
    let mut rng = Rng::new(c.seed);
    let max_len = (3 * c.cluster).min(256 * 1024);
    for phase in 0..3 {
        o.random_ops(&mut rng, c.ops, max_len);
        o.close();
        assert_check_clean(&overlay, "qcow2");
        assert_compare(&overlay, "qcow2", &expected);
        o.reopen(open_overlay(&overlay, &base));
        if phase == 0 && c.overlay_size <= 64 * MIB {
            o.verify_all();
        }
    }
    o.close();

    // qemu-io writes, we read.
    let mut rng = Rng::new(c.seed ^ 0x10);
    for _ in 0..6 {
        let len = 512 * (1 + rng.below(64));
        let off = rng.below((c.overlay_size - len) / 512) * 512;
        let pat = 1 + rng.below(250);
        let cmd = format!("write -P {pat} {off} {len}");
        qemu_io(&["-f", "qcow2", "-c", &cmd, p(&overlay)]);
        let buf = vec![pat as u8; len as usize];
        std::os::unix::fs::FileExt::write_all_at(&o.expected, &buf, off).expect("mirror");
    }
    o.reopen(open_overlay(&overlay, &base));
    if c.overlay_size <= 64 * MIB {
        o.verify_all();
    } else {
        o.verify_range(0, 8 * MIB);
    }
    o.close();
    drop(base);
    assert_eq!(hash_file(&base_path), base_hash, "the base changed");
}

fn case(cluster: u64, compat: &'static str, base: BaseKind, maker: Maker, seed: u64) -> Case {
    Case {
        cluster,
        compat,
        base,
        absolute_name: false,
        base_size: 6 * MIB,
        overlay_size: 6 * MIB,
        maker,
        seed,
        ops: 40,
    }
}

#[test]
fn qemu_overlay_v3_64k_over_qcow2() {
    run_case(case(65536, "1.1", BaseKind::Qcow2, Maker::Qemu, 1));
}

#[test]
fn qemu_overlay_v2_64k_over_raw() {
    run_case(case(65536, "0.10", BaseKind::Raw, Maker::Qemu, 2));
}

#[test]
fn qemu_overlay_v3_4k_over_compressed_crossing_l2() {
    // 4 KiB clusters: one L2 table covers 2 MiB, so a 6 MiB disk crosses several.
    run_case(case(4096, "1.1", BaseKind::Compressed, Maker::Qemu, 3));
}

#[test]
fn qemu_overlay_v2_4k_absolute_name_larger_than_base() {
    let mut c = case(4096, "0.10", BaseKind::Qcow2, Maker::Qemu, 4);
    c.absolute_name = true;
    c.overlay_size = 10 * MIB;
    run_case(c);
}

#[test]
fn qemu_overlay_v3_2m_over_raw() {
    let mut c = case(2 * MIB, "1.1", BaseKind::Raw, Maker::Qemu, 5);
    c.ops = 20;
    run_case(c);
}

#[test]
fn our_overlay_64k_over_qcow2_relative() {
    run_case(case(65536, "1.1", BaseKind::Qcow2, Maker::Ours, 6));
}

#[test]
fn our_overlay_4k_over_raw_absolute_larger() {
    let mut c = case(4096, "1.1", BaseKind::Raw, Maker::Ours, 7);
    c.absolute_name = true;
    c.overlay_size = 9 * MIB;
    run_case(c);
}

#[test]
fn our_overlay_2m_over_compressed() {
    let mut c = case(2 * MIB, "1.1", BaseKind::Compressed, Maker::Ours, 8);
    c.ops = 20;
    run_case(c);
}

#[test]
fn our_overlay_64k_crossing_l2_boundary() {
    // 64 KiB clusters: one L2 table covers 512 MiB; writes straddle 512 MiB.
    let mut c = case(65536, "1.1", BaseKind::Raw, Maker::Ours, 9);
    c.overlay_size = 1024 * MIB + 64 * 1024;
    c.ops = 25;
    run_case(c);
}

/// 32 threads write concurrently into the same few clusters (distinct 512-byte pieces)
/// of overlays over one shared base; then many more overlays are made and written. The
/// base's bytes never change.
#[test]
fn concurrent_writes_and_shared_base() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base_path, base_fmt, content) = make_base(dir.path(), BaseKind::Qcow2, 4 * MIB, 77);
    let base_hash = hash_file(&base_path);
    let base = open_base(&base_path, base_fmt);
    for (i, cluster) in [4096u64, 65536].into_iter().enumerate() {
        let ov = dir.path().join(format!("c{i}.qcow2"));
        let b = BaseRef {
            image: Arc::clone(&base),
            name: "base.qcow2".into(),
        };
        vhd::create_diff(&ov, Format::Qcow2, &b, None, Some(cluster as u32)).expect("create");
        let img = open_overlay(&ov, &base);
        let expected = dir.path().join(format!("e{i}.raw"));
        std::fs::copy(&content, &expected).expect("copy");
        // Pieces of 3 clusters straddling a cluster boundary, one per thread.
        let start = 5 * cluster - 16 * 512;
        std::thread::scope(|s| {
            for t in 0..32u64 {
                let img = Arc::clone(&img);
                s.spawn(move || {
                    let buf = vec![t as u8 + 1; 512];
                    for round in 0..4u64 {
                        let off = start + (t + 32 * round) * 512;
                        img.write_at(&buf, off).expect("concurrent write");
                    }
                });
            }
        });
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&expected)
            .expect("expected");
        for t in 0..32u64 {
            for round in 0..4u64 {
                let off = start + (t + 32 * round) * 512;
                std::os::unix::fs::FileExt::write_all_at(&f, &[t as u8 + 1; 512], off)
                    .expect("mirror");
            }
        }
        img.flush().expect("flush");
        drop(img);
        assert_check_clean(&ov, "qcow2");
        assert_compare(&ov, "qcow2", &expected);
    }
    for i in 0..20 {
        let ov = dir.path().join(format!("many{i}.qcow2"));
        let b = BaseRef {
            image: Arc::clone(&base),
            name: "base.qcow2".into(),
        };
        vhd::create_diff(&ov, Format::Qcow2, &b, None, None).expect("create");
        let img = open_overlay(&ov, &base);
        img.write_at(&[i as u8; 70_000], (i as u64) * 100_000)
            .expect("write");
        img.discard(0, 65536).expect("discard");
        img.flush().expect("flush");
    }
    drop(base);
    assert_eq!(hash_file(&base_path), base_hash, "the shared base changed");
}
