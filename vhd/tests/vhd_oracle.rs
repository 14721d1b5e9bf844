//! VHD oracle tests. Second readers: qemu-img/qemu-io for fixed and dynamic images;
//! libvhdi (`vhdiinfo`, python3 `pyvhdi`) for differencing images, which qemu misreads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::path::Path;
use std::sync::Arc;
use vhd::{BaseRef, CreateOptions, DiskImage, ErrorKind, Format, OpenOptions};

const MIB: u64 = 1 << 20;

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

fn open_rw(path: &Path) -> Arc<dyn DiskImage> {
    vhd::open(path, Format::Vhd, OpenOptions::read_write()).expect("open vhd")
}

fn qemu_size(path: &Path) -> u64 {
    let o = run("qemu-img", &["info", "-f", "vpc", "--output=json", p(path)]);
    assert!(
        o.status.success(),
        "qemu-img info failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let key = "\"virtual-size\": ";
    let i = text.find(key).expect("virtual-size in qemu-img info") + key.len();
    text[i..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .expect("digits")
        .parse()
        .expect("size")
}

/// Random ops on a standalone VHD of ours, checked by qemu-img after every phase.
fn standalone_case(fixed: bool, size: u64, block: Option<u32>, seed: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.vhd");
    let mut opts = CreateOptions::new(size);
    opts.vhd_fixed = fixed;
    opts.vhd_block_size = block;
    vhd::create(&img, Format::Vhd, &opts).expect("create vhd");
    assert_eq!(qemu_size(&img), size, "qemu reads our VHD at another size");
    let expected = dir.path().join("expected.raw");
    std::fs::write(&expected, b"").expect("expected");
    let mut o = Oracle::new(open_rw(&img), &expected, 1);
    let bs = u64::from(block.unwrap_or(2 << 20));
    o.hot = (1..4).map(|i| i * bs).filter(|&h| h < size).collect();
    let mut rng = Rng::new(seed);
    for _ in 0..3 {
        o.random_ops(&mut rng, 40, 300 * 1024);
        o.close();
        assert_compare(&img, "vpc", &expected);
        o.reopen(open_rw(&img));
        o.verify_all();
    }
    o.close();
    // qemu-io writes, we read.
    for i in 0..5u64 {
        let off = rng.below(size / 512 - 64) * 512;
        let cmd = format!("write -P {} {off} 32k", 0x20 + i);
        qemu_io(&["-f", "vpc", "-c", &cmd, p(&img)]);
        let buf = vec![(0x20 + i) as u8; 32 * 1024];
        std::os::unix::fs::FileExt::write_all_at(&o.expected, &buf, off).expect("mirror");
    }
    o.reopen(open_rw(&img));
    o.verify_all();
    o.close();
    let v = run("vhdiinfo", &[p(&img)]);
    assert!(
        v.status.success(),
        "vhdiinfo rejects our image: {}",
        String::from_utf8_lossy(&v.stderr)
    );
}

#[test]
fn dynamic_default_block_ops() {
    standalone_case(false, 6 * MIB, None, 1);
}

#[test]
fn dynamic_small_blocks_odd_size() {
    // 5 MiB + 3 sectors: not a CHS-exact size, and not a whole number of blocks.
    standalone_case(false, 5 * MIB + 1536, Some(64 * 1024), 2);
}

#[test]
fn fixed_ops() {
    standalone_case(true, 4 * MIB, None, 3);
}

#[test]
fn chs_exact_size_keeps_spec_geometry() {
    // 17 sectors * 4 heads * 100 cylinders: the spec's geometry covers it exactly.
    let size = 17 * 4 * 100 * 512;
    assert_eq!(vhd::msvhd::chs_for(size), (100, 4, 17));
    assert_eq!(vhd::msvhd::geometry_for(size), (100, 4, 17));
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("chs.vhd");
    vhd::create(&img, Format::Vhd, &CreateOptions::new(size)).expect("create");
    assert_eq!(qemu_size(&img), size);
    // A size the geometry cannot express gets the maximal geometry, which qemu honours.
    assert_eq!(vhd::msvhd::geometry_for(6 * MIB), (65535, 16, 255));
}

#[test]
fn qemu_made_dynamic_read_and_written_by_us() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("q.vhd");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        p(&img),
        "8M",
    ]);
    qemu_io(&[
        "-f",
        "vpc",
        "-c",
        "write -P 0x5a 1M 100k",
        "-c",
        "write -P 0x11 3000k 8k",
        p(&img),
    ]);
    let size = qemu_size(&img);
    let expected = dir.path().join("expected.raw");
    qemu_img(&["convert", "-f", "vpc", "-O", "raw", p(&img), p(&expected)]);
    let mut o = Oracle::new(open_rw(&img), &expected, 1);
    assert_eq!(o.size, size, "we read qemu's VHD at another size");
    o.verify_all();
    let mut rng = Rng::new(9);
    o.random_ops(&mut rng, 60, 200 * 1024);
    o.close();
    assert_compare(&img, "vpc", &expected);
}

/// Reads a differencing image through libvhdi (with its parent) into a raw file.
fn pyvhdi_dump(child: &Path, parent: &Path, out: &Path) {
    // libvhdi cannot read a sector that is absent from a child larger than its parent
    // (it asks the parent past its end). Past the parent's end, such a 4 KiB piece is
    // written as zeros, which is what "absent, beyond the parent" means.
    let script = "import sys, pyvhdi\n\
        c = pyvhdi.file(); c.open(sys.argv[1])\n\
        p = pyvhdi.file(); p.open(sys.argv[2])\n\
        c.set_parent(p); ps = p.get_media_size()\n\
        n = c.get_media_size(); o = open(sys.argv[3], 'wb'); pos = 0\n\
        while pos < n:\n\
        \x20   k = min(4096, n - pos)\n\
        \x20   try:\n\
        \x20       o.write(c.read_buffer_at_offset(k, pos))\n\
        \x20   except OSError:\n\
        \x20       if pos < ps: raise\n\
        \x20       o.write(bytes(k))\n\
        \x20   pos += k\n\
        o.close()\n";
    let o = run(
        "/usr/bin/python3",
        &["-c", script, p(child), p(parent), p(out)],
    );
    assert!(
        o.status.success(),
        "pyvhdi could not read {}: {}",
        child.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn assert_files_equal(a: &Path, b: &Path) {
    let x = read_file(a);
    let y = read_file(b);
    assert_eq!(x.len(), y.len(), "lengths differ");
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at {i:#x}", a.display(), b.display());
    }
}

fn make_vhd_base(dir: &Path, size: u64, seed: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join("base.vhd");
    vhd::create(&base, Format::Vhd, &CreateOptions::new(size)).expect("create base");
    let content = dir.join("base-content.raw");
    let mut data = vec![0u8; size as usize];
    let mut rng = Rng::new(seed);
    for c in data.chunks_mut(256 * 1024) {
        if rng.below(3) != 0 {
            rng.fill(c);
        }
    }
    let img = open_rw(&base);
    for (i, c) in data.chunks(256 * 1024).enumerate() {
        if c.iter().any(|&b| b != 0) {
            img.write_at(c, i as u64 * 256 * 1024).expect("fill base");
        }
    }
    img.flush().expect("flush base");
    std::fs::write(&content, &data).expect("content");
    (base, content)
}

#[test]
fn differencing_ops_checked_by_libvhdi() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base_size = 6 * MIB;
    let (base_path, content) = make_vhd_base(dir.path(), base_size, 11);
    let base_hash = hash_file(&base_path);
    let base: Arc<dyn DiskImage> =
        vhd::open(&base_path, Format::Vhd, OpenOptions::read_only()).expect("open base");
    // Larger than its base: the tail reads as zeros.
    let child = dir.path().join("child.vhd");
    let size = 8 * MIB;
    let b = BaseRef {
        image: Arc::clone(&base),
        name: "base.vhd".into(),
    };
    vhd::create_diff(&child, Format::Vhd, &b, Some(size), None).expect("create diff");
    let info = run("vhdiinfo", &[p(&child)]);
    let text = String::from_utf8_lossy(&info.stdout).into_owned();
    assert!(
        info.status.success() && text.contains("Differential"),
        "vhdiinfo: {text}"
    );
    assert!(
        text.contains("base.vhd"),
        "vhdiinfo does not show the parent name: {text}"
    );

    let expected = dir.path().join("expected.raw");
    std::fs::copy(&content, &expected).expect("expected");
    let open_child = || {
        vhd::open(
            &child,
            Format::Vhd,
            OpenOptions::read_write().with_backing(Arc::clone(&base)),
        )
        .expect("open child")
    };
    let mut o = Oracle::new(open_child(), &expected, 4096);
    o.hot = vec![2 * MIB, 4 * MIB, base_size];
    o.verify_all();
    let mut rng = Rng::new(12);
    let dump = dir.path().join("dump.raw");
    for _ in 0..3 {
        o.random_ops(&mut rng, 40, 300 * 1024);
        o.close();
        pyvhdi_dump(&child, &base_path, &dump);
        assert_files_equal(&dump, &expected);
        o.reopen(open_child());
        o.verify_all();
    }
    // Unaligned writes too, checked by our reader only: libvhdi misreads a 4 KiB page whose
    // sectors are partly in the child and partly in the parent (it returns zeros for the
    // parent's part), so it is only an oracle for 4 KiB-aligned writes.
    o.align = 1;
    o.random_ops(&mut rng, 40, 100 * 1024);
    o.verify_all();
    o.close();
    o.reopen(open_child());
    o.verify_all();
    o.close();
    drop(base);
    assert_eq!(hash_file(&base_path), base_hash, "the base changed");
}

#[test]
fn differencing_rejects_wrong_parent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base_path, _) = make_vhd_base(dir.path(), 2 * MIB, 1);
    let other = dir.path().join("other.vhd");
    vhd::create(&other, Format::Vhd, &CreateOptions::new(2 * MIB)).expect("other");
    let base = vhd::open(&base_path, Format::Vhd, OpenOptions::read_only()).expect("base");
    let child = dir.path().join("child.vhd");
    let b = BaseRef {
        image: base,
        name: "base.vhd".into(),
    };
    vhd::create_diff(&child, Format::Vhd, &b, None, None).expect("create diff");
    let wrong = vhd::open(&other, Format::Vhd, OpenOptions::read_only()).expect("other");
    let e = vhd::open(
        &child,
        Format::Vhd,
        OpenOptions::read_only().with_backing(wrong),
    )
    .expect_err("wrong parent must be refused");
    assert_eq!(e.kind(), ErrorKind::BackingMismatch, "{e}");
    assert!(e.to_string().contains("unique ID"), "{e}");
    let e = vhd::open(&child, Format::Vhd, OpenOptions::read_only()).expect_err("parent required");
    assert_eq!(e.kind(), ErrorKind::BackingRequired, "{e}");
    // A writable parent is refused: overlays share it.
    let rw = vhd::open(&base_path, Format::Vhd, OpenOptions::read_write()).expect("rw");
    let e = vhd::open(
        &child,
        Format::Vhd,
        OpenOptions::read_only().with_backing(rw),
    )
    .expect_err("writable parent must be refused");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
}

#[test]
fn truncated_and_wrong_format_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("d.vhd");
    vhd::create(&img, Format::Vhd, &CreateOptions::new(4 * MIB)).expect("create");
    {
        let d = open_rw(&img);
        d.write_at(&[1u8; 8192], MIB).expect("write");
        d.flush().expect("flush");
    }
    let len = std::fs::metadata(&img).expect("meta").len();
    let cut = dir.path().join("cut.vhd");
    let data = read_file(&img);
    std::fs::write(&cut, &data[..(len - 700) as usize]).expect("cut");
    let e = vhd::open(&cut, Format::Vhd, OpenOptions::read_only()).expect_err("truncated");
    assert_eq!(e.kind(), ErrorKind::Truncated, "{e}");
    let e = vhd::open(&img, Format::Qcow2, OpenOptions::read_only()).expect_err("wrong format");
    assert_eq!(e.kind(), ErrorKind::WrongFormat, "{e}");
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, vec![0u8; 4096]).expect("raw");
    let e = vhd::open(&raw, Format::Vhd, OpenOptions::read_only()).expect_err("not a vhd");
    assert_eq!(e.kind(), ErrorKind::WrongFormat, "{e}");
}
