//! The `reddog-image` binary end to end, plus `check` agreeing with `qemu-img check`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

/// Runs reddog-image; returns (exit code, stdout, stderr).
fn tool(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_reddog-image"))
        .args(args)
        .output()
        .expect("run reddog-image");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = tool(args);
    assert_eq!(code, 0, "reddog-image {args:?} failed: {out}{err}");
    out
}

#[test]
fn create_info_diff_check_convert() {
    let d = tempfile::tempdir().expect("tempdir");
    let base = d.path().join("base.qcow2");
    ok(&["create", "-f", "qcow2", "-s", "8M", p(&base)]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x33 1M 256k", p(&base)]);
    let info = ok(&["info", "-f", "qcow2", p(&base)]);
    assert!(info.contains("virtual size: 8388608"), "{info}");
    let ov = d.path().join("ov.qcow2");
    ok(&[
        "create-diff",
        "-f",
        "qcow2",
        "-b",
        p(&base),
        "-F",
        "qcow2",
        "-s",
        "16M",
        p(&ov),
    ]);
    let info = ok(&["info", p(&ov)]);
    assert!(
        info.contains("backing file: base.qcow2") && info.contains("(probed"),
        "{info}"
    );
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x44 9M 64k", p(&ov)]);
    assert_check_clean(&ov, "qcow2");
    let out = ok(&[
        "check",
        "-f",
        "qcow2",
        "-b",
        p(&base),
        "-F",
        "qcow2",
        "--read-all",
        p(&ov),
    ]);
    assert!(out.contains("No errors"), "{out}");
    // Overlay -> flat raw, vhd (dynamic and fixed) and back: all read the same per qemu-img.
    let raw = d.path().join("flat.raw");
    ok(&[
        "convert",
        "-f",
        "qcow2",
        "-b",
        p(&base),
        "-F",
        "qcow2",
        "-O",
        "raw",
        p(&ov),
        p(&raw),
    ]);
    assert_compare(&ov, "qcow2", &raw);
    let v = d.path().join("flat.vhd");
    ok(&["convert", "-f", "raw", "-O", "vhd", p(&raw), p(&v)]);
    assert_compare(&v, "vpc", &raw);
    let vf = d.path().join("fixed.vhd");
    ok(&[
        "convert",
        "-f",
        "vhd",
        "-O",
        "vhd",
        "--fixed",
        p(&v),
        p(&vf),
    ]);
    assert_compare(&vf, "vpc", &raw);
    let q = d.path().join("back.qcow2");
    ok(&[
        "convert",
        "-f",
        "vhd",
        "-O",
        "qcow2",
        "--cluster-size",
        "4K",
        p(&vf),
        p(&q),
    ]);
    assert_check_clean(&q, "qcow2");
    assert_compare(&q, "qcow2", &raw);
    // A VHD differencing image through the CLI.
    let child = d.path().join("child.vhd");
    ok(&[
        "create-diff",
        "-f",
        "vhd",
        "-b",
        p(&v),
        "-F",
        "vhd",
        p(&child),
    ]);
    let out = ok(&[
        "check",
        "-f",
        "vhd",
        "-b",
        p(&v),
        "-F",
        "vhd",
        "--read-all",
        p(&child),
    ]);
    assert!(out.contains("No errors"), "{out}");
}

#[test]
fn clear_errors() {
    let d = tempfile::tempdir().expect("tempdir");
    let img = d.path().join("a.qcow2");
    ok(&[
        "create",
        "-f",
        "qcow2",
        "-s",
        "64M",
        "--cluster-size",
        "4K",
        p(&img),
    ]);
    // Truncated: cut inside the L2 tables / refcount structures.
    let data = read_file(&img);
    let cut = d.path().join("cut.qcow2");
    std::fs::write(&cut, &data[..8192]).expect("cut");
    let (code, _, err) = tool(&["check", "-f", "qcow2", p(&cut)]);
    assert_ne!(code, 0);
    assert!(
        err.contains("truncated") && err.contains("cut short"),
        "{err}"
    );
    // Wrong format.
    let (code, _, err) = tool(&["info", "-f", "vhd", p(&img)]);
    assert_ne!(code, 0);
    assert!(
        err.contains("wrong format") && err.contains("not a VHD"),
        "{err}"
    );
    // A parent that does not match.
    let b1 = d.path().join("b1.vhd");
    let b2 = d.path().join("b2.vhd");
    ok(&["create", "-f", "vhd", "-s", "4M", p(&b1)]);
    ok(&["create", "-f", "vhd", "-s", "4M", p(&b2)]);
    let child = d.path().join("c.vhd");
    ok(&[
        "create-diff",
        "-f",
        "vhd",
        "-b",
        p(&b1),
        "-F",
        "vhd",
        p(&child),
    ]);
    let (code, _, err) = tool(&["check", "-f", "vhd", "-b", p(&b2), "-F", "vhd", p(&child)]);
    assert_ne!(code, 0);
    assert!(
        err.contains("backing image mismatch") && err.contains("unique ID"),
        "{err}"
    );
    // An overlay opened without its base says how to pass it.
    let (code, _, err) = tool(&["check", "-f", "vhd", "--read-all", p(&child)]);
    assert_ne!(code, 0);
    assert!(err.contains("--base"), "{err}");
}

/// Sets the refcount (16-bit) of cluster `c` in a qcow2 file whose first refblock is at
/// the reftable's first entry (true for the small images made here).
fn poke_refcount(path: &Path, c: u64, v: u16) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut h = [0u8; 104];
    f.read_exact_at(&mut h, 0).expect("header");
    let rt = u64::from_be_bytes(h[48..56].try_into().expect("8 bytes"));
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, rt).expect("reftable");
    let rb = u64::from_be_bytes(e);
    f.write_all_at(&v.to_be_bytes(), rb + c * 2).expect("poke");
}

#[test]
fn check_agrees_with_qemu_img() {
    let d = tempfile::tempdir().expect("tempdir");
    let raw = d.path().join("src.raw");
    let mut data = vec![0u8; 3 << 20];
    Rng::new(5).fill(&mut data[..1 << 20]);
    std::fs::write(&raw, &data).expect("raw");
    let mut cases = Vec::new();
    for (name, extra) in [
        ("plain", vec![]),
        ("compressed", vec!["-c"]),
        ("v2", vec!["-o", "compat=0.10"]),
    ] {
        let img = d.path().join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend(extra);
        args.push(p(&raw));
        args.push(p(&img));
        qemu_img(&args);
        cases.push(img);
    }
    // A leak: an extra cluster at the end with refcount 1.
    let leak = d.path().join("leak.qcow2");
    std::fs::copy(&cases[0], &leak).expect("copy");
    let len = std::fs::metadata(&leak).expect("meta").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&leak)
        .expect("open");
    f.set_len(len + 65536).expect("grow");
    poke_refcount(&leak, len.div_ceil(65536), 1);
    cases.push(leak);
    // Corruption: a referenced data cluster with refcount 0.
    let bad = d.path().join("bad.qcow2");
    std::fs::copy(&cases[0], &bad).expect("copy");
    poke_refcount(&bad, 5, 0);
    cases.push(bad);
    let mut seen = Vec::new();
    for img in &cases {
        let (q, text) = qemu_check(img, "qcow2");
        let (ours, out, err) = tool(&["check", "-f", "qcow2", p(img)]);
        assert_eq!(
            ours,
            q,
            "{}: ours {ours} vs qemu-img {q}\nqemu: {text}\nours: {out}{err}",
            img.display()
        );
        seen.push(q);
    }
    assert_eq!(
        seen,
        vec![0, 0, 0, 3, 2],
        "the cases must cover clean, leak and corrupt"
    );
}

#[test]
fn resource_and_role_disks() {
    let d = tempfile::tempdir().expect("tempdir");
    let res = d.path().join("resource.img");
    let t = std::time::Instant::now();
    ok(&[
        "create",
        "-f",
        "raw",
        "--ext4",
        "-s",
        "4G",
        "--label",
        "resource",
        p(&res),
    ]);
    let took = t.elapsed();
    assert!(
        took.as_secs() < 10,
        "formatting a 4 GiB resource disk took {took:?}"
    );
    let used = std::fs::metadata(&res)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .expect("meta");
    assert!(
        used < 256 << 20,
        "the resource disk is not sparse: {used} bytes used"
    );
    let o = run("e2fsck", &["-f", "-n", p(&res)]);
    assert!(
        o.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = run("dumpe2fs", &["-h", p(&res)]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("resource"),
        "label missing"
    );

    let src = d.path().join("role");
    std::fs::create_dir_all(src.join("etc/app")).expect("mkdir");
    std::fs::write(src.join("etc/app/config.toml"), b"answer = 42\n").expect("write");
    let mut big = vec![0u8; 3 << 20];
    Rng::new(1).fill(&mut big);
    std::fs::write(src.join("blob.bin"), &big).expect("write");
    let role = d.path().join("role.img");
    ok(&[
        "create",
        "-f",
        "raw",
        "--from-dir",
        p(&src),
        "--label",
        "role",
        p(&role),
    ]);
    let o = run("e2fsck", &["-f", "-n", p(&role)]);
    assert!(
        o.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = run("debugfs", &["-R", "cat /etc/app/config.toml", p(&role)]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "answer = 42\n");
    let dump = d.path().join("blob.out");
    let cmd = format!("dump /blob.bin {}", p(&dump));
    let o = run("debugfs", &["-R", &cmd, p(&role)]);
    assert!(o.status.success());
    assert!(
        read_file(&dump) == big,
        "blob differs after the role disk round trip"
    );
}
