//! Valid qcow2 images using features imago 0.2.6 cannot read (extended L2 entries, zstd
//! compression, the dirty bit left by a lazy-refcounts writer) are refused as unsupported,
//! with a message naming the feature and the qemu-img command that makes a usable image;
//! that command is run and its result must open. qemu reads each image first, to show it is
//! valid.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{qemu_img, qemu_io, read_file, run};
use std::path::Path;
use vhd::{ErrorKind, Format, OpenOptions};

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

/// Both opens are refused as `Unsupported` with a message containing every `needles`.
fn assert_refused(img: &Path, needles: &[&str]) {
    for opts in [OpenOptions::read_only(), OpenOptions::read_write()] {
        let ro = opts.read_only;
        let e = vhd::open(img, Format::Qcow2, opts).expect_err("the image must be refused");
        let msg = e.to_string();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "read_only={ro}: {msg}");
        for n in needles {
            assert!(msg.contains(n), "read_only={ro}: {msg:?} lacks {n:?}");
        }
    }
}

/// What qemu reads from the image, as raw bytes.
fn qemu_contents(img: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("qemu-read.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", p(img), p(&raw)]);
    read_file(&raw)
}

fn our_contents(img: &Path) -> Vec<u8> {
    let d = vhd::open(img, Format::Qcow2, OpenOptions::read_only()).expect("open converted");
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).expect("read");
    buf
}

/// Writes a pattern with qemu-io and returns what qemu reads.
fn fill(img: &Path, dir: &Path) -> Vec<u8> {
    qemu_io(&["-f", "qcow2", "-c", "write -P 0xab 4096 70000", p(img)]);
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -c -P 0x5c 1048576 65536",
        p(img),
    ]);
    qemu_contents(img, dir)
}

/// The hint's command turns the image into one we read like qemu does.
fn convert_as_told_and_compare(img: &Path, dir: &Path, expected: &[u8]) {
    let out = dir.join("usable.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "extended_l2=off,compression_type=zlib",
        p(img),
        p(&out),
    ]);
    assert!(
        our_contents(&out) == expected,
        "converted image reads wrong"
    );
}

fn refused_feature(opt: &str, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opt, p(&img), "2M"]);
    let expected = fill(&img, dir.path());
    assert_refused(
        &img,
        &[
            needle,
            "not supported",
            "qemu-img convert -O qcow2 -o extended_l2=off,compression_type=zlib",
        ],
    );
    convert_as_told_and_compare(&img, dir.path(), &expected);
}

#[test]
fn extended_l2_refused_as_unsupported() {
    refused_feature("extended_l2=on", "extended L2 entries");
}

#[test]
fn zstd_refused_as_unsupported() {
    refused_feature("compression_type=zstd", "zstd compression");
}

#[test]
fn dirty_image_refused_with_repair_hint_then_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dirty.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        p(&img),
        "2M",
    ]);
    let expected = fill(&img, dir.path());
    // What a writer with lazy refcounts killed mid-run leaves: incompatible bit 0 (dirty),
    // the last byte of the big-endian field at offset 72.
    let mut bytes = read_file(&img);
    bytes[79] |= 1;
    std::fs::write(&img, &bytes).unwrap();
    let info = run("qemu-img", &["info", "--output=json", p(&img)]);
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("\"dirty-flag\""),
        "qemu-img info does not see the dirty bit"
    );
    // qemu reads the dirty image as it was.
    assert!(
        qemu_contents(&img, dir.path()) == expected,
        "qemu reads the dirty image differently"
    );
    assert_refused(&img, &["marked dirty", "qemu-img check -r all"]);
    // The repair the message names makes it usable.
    qemu_img(&["check", "-q", "-r", "all", p(&img)]);
    assert!(our_contents(&img) == expected, "repaired image reads wrong");
    vhd::open(&img, Format::Qcow2, OpenOptions::read_write()).expect("writable after repair");
}
