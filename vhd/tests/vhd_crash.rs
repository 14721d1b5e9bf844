//! Crash consistency of VHD writes: a writer child process doing seeded random writes (with
//! flushes) to a dynamic VHD, or to a differencing VHD over a dynamic base, is killed
//! (SIGKILL) at random points. Afterwards the image must open with our reader,
//! `reddog-image check` must report no corruption (exit 0, or 3 for the space of an
//! interrupted block allocation), libvhdi (`pyvhdi`) must open and read it, every write
//! completed before the last flush must read back, and every sector touched after it must
//! show one of the states it went through (never anything else).
//!
//! (The power-loss variant, where writes not yet synced are dropped in any combination, is a
//! unit test next to the code: `src/msvhd/power_loss.rs`, since it needs to see every file
//! write the disk layer makes.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use vhd::{BaseRef, CreateOptions, DiskImage, Format, OpenOptions};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const SECTOR: usize = 512;

fn p(x: &Path) -> &str {
    x.to_str().expect("utf-8 path")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Dynamic,
    Differencing,
}

#[derive(Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Discard(u64, u64),
}

impl Op {
    fn range(&self) -> (u64, u64) {
        match self {
            Op::Write(o, d) => (*o, d.len() as u64),
            Op::Zero(o, l) | Op::Discard(o, l) => (*o, *l),
        }
    }
    fn apply(&self, img: &mut [u8]) {
        let (o, l) = self.range();
        let dst = &mut img[o as usize..(o + l) as usize];
        match self {
            Op::Write(_, d) => dst.copy_from_slice(d),
            _ => dst.fill(0),
        }
    }
}

/// The `seq`-th operation of a run, derived from the seed. Dynamic disks get byte-granular
/// requests (read-modify-write of partial sectors); differencing disks get 4 KiB-aligned ones
/// so libvhdi can serve as an oracle (it misreads 4 KiB pages that are part child, part
/// parent).
fn op(kind: Kind, seed: u64, seq: u64) -> Op {
    let mut r = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(seq));
    let align = match kind {
        Kind::Differencing => 4096,
        Kind::Dynamic if r.below(2) == 0 => 1,
        Kind::Dynamic => 512,
    };
    let len = ((1 + r.below(48 * 1024)) / align * align).max(align);
    let off = r.below(SIZE - len) / align * align;
    match r.below(14) {
        0 | 1 => Op::Zero(off, len),
        2 => Op::Discard(off, len),
        _ => {
            let mut d = vec![0u8; len as usize];
            r.fill(&mut d);
            Op::Write(off, d)
        }
    }
}

fn flush_after(seq: u64) -> bool {
    seq % 40 == 39
}

struct Setup {
    kind: Kind,
    /// The base (differencing only) and its content.
    base: Option<PathBuf>,
    base_content: Vec<u8>,
    img: PathBuf,
}

fn setup(dir: &Path, kind: Kind, round: u64) -> Setup {
    let img = dir.join("disk.vhd");
    match kind {
        Kind::Dynamic => {
            let mut o = CreateOptions::new(SIZE);
            // Small blocks: many allocations while the kill can land.
            o.vhd_block_size = Some(if round % 2 == 0 { 64 * 1024 } else { 2 << 20 });
            vhd::create(&img, Format::Vhd, &o).expect("create dynamic");
            Setup {
                kind,
                base: None,
                base_content: vec![0u8; SIZE as usize],
                img,
            }
        }
        Kind::Differencing => {
            let base = dir.join("base.vhd");
            vhd::create(&base, Format::Vhd, &CreateOptions::new(SIZE)).expect("create base");
            let mut content = vec![0u8; SIZE as usize];
            let mut rng = Rng::new(round);
            // Some 1 MiB areas stay unallocated in the base too.
            for c in content.chunks_mut(MIB as usize) {
                if rng.below(4) != 0 {
                    rng.fill(c);
                }
            }
            let b = vhd::open(&base, Format::Vhd, OpenOptions::read_write()).expect("open base");
            for (i, c) in content.chunks(MIB as usize).enumerate() {
                if c.iter().any(|&x| x != 0) {
                    b.write_at(c, i as u64 * MIB).expect("fill base");
                }
            }
            b.flush().expect("flush base");
            drop(b);
            let bref = BaseRef {
                image: open_base(&base),
                name: "base.vhd".into(),
            };
            vhd::create_diff(&img, Format::Vhd, &bref, None, None).expect("create diff");
            Setup {
                kind,
                base: Some(base),
                base_content: content,
                img,
            }
        }
    }
}

fn open_base(base: &Path) -> Arc<dyn DiskImage> {
    vhd::open(base, Format::Vhd, OpenOptions::read_only()).expect("open base")
}

fn open_img(base: Option<&Path>, img: &Path, read_only: bool) -> Arc<dyn DiskImage> {
    let mut o = if read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    if let Some(b) = base {
        o = o.with_backing(open_base(b));
    }
    vhd::open(img, Format::Vhd, o).expect("open image after the crash")
}

/// The writer process: the parent test re-runs its own test binary with
/// `VHD_CRASH_CHILD` set, and that run lands here and never returns to the harness.
fn vhd_crash_writer_child(spec: &str) {
    let parts: Vec<&str> = spec.split(',').collect();
    let kind = if parts[0] == "diff" {
        Kind::Differencing
    } else {
        Kind::Dynamic
    };
    let base = (!parts[1].is_empty()).then(|| PathBuf::from(parts[1]));
    let img_path = PathBuf::from(parts[2]);
    let seed: u64 = parts[3].parse().expect("seed");
    let mut out = std::io::stdout();
    let img = open_img(base.as_deref(), &img_path, false);
    writeln!(out, "OPENED").expect("stdout");
    out.flush().expect("stdout");
    for seq in 0..1_000_000u64 {
        writeln!(out, "S {seq}").expect("stdout");
        out.flush().expect("stdout");
        match op(kind, seed, seq) {
            Op::Write(o, d) => img.write_at(&d, o).expect("write"),
            Op::Zero(o, l) => img.write_zeroes(o, l).expect("write zeroes"),
            Op::Discard(o, l) => img.discard(o, l).expect("discard"),
        }
        if flush_after(seq) {
            img.flush().expect("flush");
            writeln!(out, "F {seq}").expect("stdout");
            out.flush().expect("stdout");
        }
    }
}

/// Reads the whole image through libvhdi into a byte vector.
fn pyvhdi_read(img: &Path, base: Option<&Path>) -> Vec<u8> {
    let script = "import sys, pyvhdi\n\
        c = pyvhdi.file(); c.open(sys.argv[1])\n\
        if len(sys.argv) > 2:\n\
        \x20   p = pyvhdi.file(); p.open(sys.argv[2]); c.set_parent(p)\n\
        n = c.get_media_size(); pos = 0\n\
        while pos < n:\n\
        \x20   k = min(1 << 20, n - pos)\n\
        \x20   sys.stdout.buffer.write(c.read_buffer_at_offset(k, pos)); pos += k\n";
    let mut args = vec!["-c", script, p(img)];
    if let Some(b) = base {
        args.push(p(b));
    }
    let o = run("/usr/bin/python3", &args);
    assert!(
        o.status.success(),
        "libvhdi (pyvhdi) cannot read {} after the crash: {}",
        img.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// `reddog-image check`; returns (exit code, output).
fn our_check(img: &Path, base: Option<&Path>) -> (i32, String) {
    let mut args = vec!["check", "-f", "vhd"];
    if let Some(b) = base {
        args.extend(["-b", p(b), "-F", "vhd"]);
    }
    args.push(p(img));
    let o = Command::new(env!("CARGO_BIN_EXE_reddog-image"))
        .args(&args)
        .output()
        .expect("run reddog-image");
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Checks every sector of `got` (the image as read after the crash): the state after the
/// last flush, or for sectors touched by later operations, the state before or after one of
/// them.
fn verify(s: &Setup, seed: u64, flushed: Option<u64>, started: Option<u64>, got: &[u8], who: &str) {
    let mut model = s.base_content.clone();
    let first_unflushed = flushed.map_or(0, |f| f + 1);
    for seq in 0..first_unflushed {
        op(s.kind, seed, seq).apply(&mut model);
    }
    // Alternative states of sectors touched after the last flush.
    let mut alt: std::collections::BTreeMap<usize, Vec<Vec<u8>>> = Default::default();
    if let Some(last) = started {
        for seq in first_unflushed..=last {
            let o = op(s.kind, seed, seq);
            let (off, len) = o.range();
            let secs = off as usize / SECTOR..(off + len).div_ceil(SECTOR as u64) as usize;
            for sec in secs.clone() {
                alt.entry(sec)
                    .or_insert_with(|| vec![model[sec * SECTOR..(sec + 1) * SECTOR].to_vec()]);
            }
            o.apply(&mut model);
            for sec in secs {
                alt.get_mut(&sec)
                    .expect("entry")
                    .push(model[sec * SECTOR..(sec + 1) * SECTOR].to_vec());
            }
        }
    }
    // `model` now holds the last state; for sectors in `alt`, any listed state will do.
    assert_eq!(got.len(), model.len(), "{who}: image size changed");
    for (sec, (g, m)) in got.chunks(SECTOR).zip(model.chunks(SECTOR)).enumerate() {
        match alt.get(&sec) {
            None => assert!(
                g == m,
                "{who}: sector {sec} (last written before the last flush, or never) reads wrong"
            ),
            Some(states) => assert!(
                states.iter().any(|st| st[..] == g[..]),
                "{who}: sector {sec}, touched after the last flush, shows none of its states"
            ),
        }
    }
}

#[test]
fn vhd_crash_random_kills() {
    if let Ok(spec) = std::env::var("VHD_CRASH_CHILD") {
        vhd_crash_writer_child(&spec);
        std::process::exit(0);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let mut rng = Rng::new(0x5eed_7c4d);
    let mut leaks_seen = 0;
    for round in 0..10u64 {
        let kind = if round % 2 == 0 {
            Kind::Dynamic
        } else {
            Kind::Differencing
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let s = setup(dir.path(), kind, round);
        let seed = 500 + round;
        let kind_s = if kind == Kind::Differencing {
            "diff"
        } else {
            "dyn"
        };
        let base_s = s.base.as_deref().map(p).unwrap_or("");
        let spec = format!("{kind_s},{base_s},{},{seed}", p(&s.img));
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "vhd_crash_random_kills",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("VHD_CRASH_CHILD", &spec)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        let mut reader = BufReader::new(child.stdout.take().expect("child stdout"));
        let mut line = String::new();
        for _ in 0..20 {
            line.clear();
            reader.read_line(&mut line).expect("read child");
            if line.contains("OPENED") {
                break;
            }
        }
        assert!(line.contains("OPENED"), "child did not start: {line:?}");
        std::thread::sleep(Duration::from_millis(5 + rng.below(250)));
        child.kill().expect("kill writer"); // SIGKILL
        child.wait().expect("reap writer");
        let (mut flushed, mut started) = (None, None);
        for l in reader.lines() {
            let l = l.expect("line");
            let mut it = l.split_whitespace();
            match (it.next(), it.next().and_then(|n| n.parse::<u64>().ok())) {
                (Some("F"), Some(n)) => flushed = Some(n),
                (Some("S"), Some(n)) => started = Some(n),
                _ => {}
            }
        }
        let who = format!("round {round} ({kind:?}, flushed {flushed:?}, started {started:?})");
        let base = s.base.as_deref();

        let (code, text) = our_check(&s.img, base);
        eprintln!("{who}: reddog-image check exit {code}");
        assert!(code == 0 || code == 3, "{who}: check exit {code}:\n{text}");
        if code == 3 {
            leaks_seen += 1;
        }
        let img = open_img(base, &s.img, true);
        let mut ours = vec![0u8; SIZE as usize];
        img.read_at(&mut ours, 0).expect("read after crash");
        drop(img);
        verify(
            &s,
            seed,
            flushed,
            started,
            &ours,
            &format!("{who}, our reader"),
        );
        let theirs = pyvhdi_read(&s.img, base);
        assert!(
            theirs == ours,
            "{who}: libvhdi reads the image differently from us"
        );
        let info = run("vhdiinfo", &[p(&s.img)]);
        assert!(info.status.success(), "{who}: vhdiinfo rejects the image");

        // The image stays usable: write, flush, check again.
        let img = open_img(base, &s.img, false);
        img.write_at(&[0x5a; 5000], 3 * MIB + 100)
            .expect("write after crash");
        img.flush().expect("flush after crash");
        drop(img);
        let (code, text) = our_check(&s.img, base);
        assert!(
            code == 0 || code == 3,
            "{who}: check after reuse exit {code}:\n{text}"
        );
    }
    eprintln!("rounds with leaked space: {leaks_seen}");
}
