//! Crash consistency of qcow2 writes: a writer is killed (SIGKILL) at random points;
//! `qemu-img check` may then report leaks (exit 3) but never corruption (exit 2), and every
//! write completed before the last flush must read back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use vhd::{DiskImage, Format, OpenOptions};

const MIB: u64 = 1 << 20;
const BASE_SIZE: u64 = 4 * MIB;
/// Sparse: with 4 KiB clusters one L2 table covers 2 MiB, so 512 L2 tables get allocated
/// one by one as the writer hits new areas.
const DISK_SIZE: u64 = 1024 * MIB;

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

/// The `seq`-th write of a run: offset, length and data, all derived from the seed.
fn op(seed: u64, seq: u64) -> (u64, Vec<u8>) {
    let mut r = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(seq));
    let len = 512 * (1 + r.below(24));
    // Spread over the whole disk so many L2 tables (2 MiB each at 4 KiB clusters) are hit.
    let off = r.below((DISK_SIZE - len) / 512) * 512;
    let mut data = vec![0u8; len as usize];
    r.fill(&mut data);
    (off, data)
}

/// Small clusters mean many L2 tables, so the writer keeps allocating L2 tables for hundreds
/// of writes: without our fix, a kill usually lands in the window.
fn setup(dir: &Path, cluster: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join("base.raw");
    let mut data = vec![0u8; BASE_SIZE as usize];
    Rng::new(42).fill(&mut data);
    std::fs::write(&base, &data).expect("write base");
    let overlay = dir.join("overlay.qcow2");
    let opts = format!("cluster_size={cluster}");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts,
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&overlay),
        &DISK_SIZE.to_string(),
    ]);
    (base, overlay)
}

fn open_pair(base: &Path, overlay: &Path, read_only: bool) -> Arc<dyn DiskImage> {
    let b = vhd::open(base, Format::Raw, OpenOptions::read_only()).expect("open base");
    let o = OpenOptions {
        read_only,
        backing: Some(b),
    };
    vhd::open(overlay, Format::Qcow2, o).expect("open overlay")
}

/// The writer process: the parent test re-runs its own test binary with
/// `VHD_CRASH_CHILD` set, and that run lands here and never returns to the harness.
fn crash_writer_child(spec: &str) {
    let mut parts = spec.splitn(3, ',');
    let base = parts.next().expect("base").to_string();
    let overlay = parts.next().expect("overlay").to_string();
    let seed: u64 = parts.next().expect("seed").parse().expect("seed");
    let mut out = std::io::stdout();
    writeln!(out, "OPENING").expect("stdout");
    out.flush().expect("stdout");
    let img = open_pair(Path::new(&base), Path::new(&overlay), false);
    for seq in 0..200_000u64 {
        writeln!(out, "S {seq}").expect("stdout");
        out.flush().expect("stdout");
        let (off, data) = op(seed, seq);
        if seq % 7 == 3 {
            img.write_zeroes(off, data.len() as u64)
                .expect("write zeroes");
        } else {
            img.write_at(&data, off).expect("write");
        }
        if seq % 100 == 99 {
            img.flush().expect("flush");
            writeln!(out, "F {seq}").expect("stdout");
            out.flush().expect("stdout");
        }
    }
}

/// What each 512-byte sector must hold after the crash: `Some(data)` for sectors last
/// written by a flushed op (zeros for write-zeroes), sectors touched by unflushed ops are
/// uncertain and skipped; every other sector must still show the base.
fn expected_after(
    seed: u64,
    flushed: Option<u64>,
    started: Option<u64>,
) -> (BTreeMap<u64, Vec<u8>>, BTreeSet<u64>) {
    let mut model = BTreeMap::new();
    if let Some(f) = flushed {
        for seq in 0..=f {
            let (off, data) = op(seed, seq);
            for (i, sec) in data.chunks(512).enumerate() {
                let v = if seq % 7 == 3 {
                    vec![0u8; 512]
                } else {
                    sec.to_vec()
                };
                model.insert(off / 512 + i as u64, v);
            }
        }
    }
    let mut uncertain = BTreeSet::new();
    let first = flushed.map_or(0, |f| f + 1);
    if let Some(s) = started {
        for seq in first..=s {
            let (off, data) = op(seed, seq);
            for i in 0..data.len() as u64 / 512 {
                uncertain.insert(off / 512 + i);
            }
        }
    }
    (model, uncertain)
}

fn verify_after_crash(
    img: &Arc<dyn DiskImage>,
    base: &[u8],
    model: &BTreeMap<u64, Vec<u8>>,
    uncertain: &BTreeSet<u64>,
    rng: &mut Rng,
    what: &str,
) {
    let mut got = [0u8; 512];
    for (&sec, want) in model {
        if uncertain.contains(&sec) {
            continue;
        }
        img.read_at(&mut got, sec * 512).expect("read overlay");
        assert!(got[..] == want[..], "{what}: flushed sector {sec} lost");
    }
    // Sectors never written still show the base (zeros past its end).
    for _ in 0..2000 {
        let sec = rng.below(DISK_SIZE / 512);
        if model.contains_key(&sec) || uncertain.contains(&sec) {
            continue;
        }
        img.read_at(&mut got, sec * 512).expect("read overlay");
        let off = (sec * 512) as usize;
        let want = base.get(off..off + 512).unwrap_or(&[0u8; 512]);
        assert!(
            got[..] == want[..],
            "{what}: untouched sector {sec} changed"
        );
    }
}

#[test]
fn crash_random_kills() {
    if let Ok(spec) = std::env::var("VHD_CRASH_CHILD") {
        crash_writer_child(&spec);
        std::process::exit(0);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let mut rng = Rng::new(0xc7a5);
    let mut leaks_seen = 0;
    for round in 0..12u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster = match round % 4 {
            0 => 512,
            3 => 65536,
            _ => 4096,
        };
        let (base, overlay) = setup(dir.path(), cluster);
        let seed = 100 + round;
        let spec = format!("{},{},{}", p(&base), p(&overlay), seed);
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_random_kills",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("VHD_CRASH_CHILD", &spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        let stdout = child.stdout.take().expect("child stdout");
        // Wait until the writer is running, then kill it after a random delay.
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        for _ in 0..20 {
            line.clear();
            reader.read_line(&mut line).expect("read child");
            if line.contains("OPENING") {
                break;
            }
        }
        assert!(line.contains("OPENING"), "child did not start: {line:?}");
        std::thread::sleep(Duration::from_millis(rng.below(150)));
        child.kill().expect("kill writer");
        child.wait().expect("reap writer");
        let mut flushed = None;
        let mut started = None;
        for l in reader.lines() {
            let l = l.expect("line");
            let mut it = l.split_whitespace();
            match (it.next(), it.next().and_then(|n| n.parse::<u64>().ok())) {
                (Some("F"), Some(n)) => flushed = Some(n),
                (Some("S"), Some(n)) => started = Some(n),
                _ => {}
            }
        }
        let (code, text) = qemu_check(&overlay, "qcow2");
        eprintln!("round {round}: flushed {flushed:?}, started {started:?}, check exit {code}");
        assert!(
            code == 0 || code == 3,
            "round {round}: qemu-img check exit {code} after a kill (flushed {flushed:?}, started {started:?}):\n{text}"
        );
        if code == 3 {
            leaks_seen += 1;
        }
        let (model, uncertain) = expected_after(seed, flushed, started);
        let base_bytes = std::fs::read(&base).expect("read base");
        let img = open_pair(&base, &overlay, true);
        let what = format!("round {round} (flushed {flushed:?}, started {started:?})");
        verify_after_crash(&img, &base_bytes, &model, &uncertain, &mut rng, &what);
        // The image stays writable after the crash (leaks are harmless).
        drop(img);
        let img = open_pair(&base, &overlay, false);
        img.write_at(&[1u8; 4096], 0).expect("write after crash");
        img.flush().expect("flush after crash");
        drop(img);
        let (code, text) = qemu_check(&overlay, "qcow2");
        assert!(
            code == 0 || code == 3,
            "round {round}: check after reuse exit {code}:\n{text}"
        );
    }
    eprintln!("rounds with leaked clusters: {leaks_seen}");
}

/// Proves the hazard our layer closes: imago alone, "crashing" (no flush) right after a write
/// that allocates an L2 table, leaves an image `qemu-img check` calls corrupt; the same
/// write through `vhd` leaves a clean (or merely leaking) image.
#[test]
fn l2_allocation_window_closed() {
    for through_vhd in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let img_path = dir.path().join("plain.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p(&img_path),
            "8M",
        ]);
        if through_vhd {
            let img = vhd::open(&img_path, Format::Qcow2, OpenOptions::read_write()).expect("open");
            img.write_at(&[7u8; 4096], 3 * MIB).expect("write");
            // Simulated crash: the process state is gone without any flush.
            std::mem::forget(img);
            let (code, text) = qemu_check(&img_path, "qcow2");
            assert!(
                code == 0 || code == 3,
                "vhd write left a corrupt image (exit {code}):\n{text}"
            );
        } else {
            use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder};
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&img_path)
                .expect("open");
            let storage = imago::file::File::try_from(f).expect("storage");
            let q = imago::qcow2::Qcow2::<imago::file::File>::builder(storage)
                .write(true)
                .open(DenyImplicitOpenGate::default())
                .expect("imago open");
            let fa = FormatAccess::new(q);
            fa.write(&[7u8; 4096][..], 3 * MIB).expect("imago write");
            std::mem::forget(fa);
            let (code, text) = qemu_check(&img_path, "qcow2");
            assert_eq!(
                code, 2,
                "expected plain imago to leave a corrupt image here:\n{text}"
            );
        }
        let f = std::fs::File::open(&img_path).expect("reopen");
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, 0).expect("read");
    }
}
