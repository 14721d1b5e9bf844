//! Disk I/O benchmark of the `vhd` crate, side by side with `qemu-img bench` on the same
//! images: 4 KiB "random" reads and writes, 1 MiB sequential reads and writes, first writes
//! (copy-on-write from the base) and steady state (rewrites of allocated clusters), for a
//! raw image, a qcow2 overlay over a raw base (64 KiB clusters, qemu's default, and a
//! smaller cluster size) and a VHD differencing image over a dynamic VHD base.
//!
//! Usage: `cargo build --release -p benches && target/release/disk-io [--size-mib N]
//! [--reps N] [--dir DIR] [--no-qemu] [--small-cluster-kib 4|8|16|32]`
//!
//! Fairness: both sides issue the same requests (size, offsets, count) one at a time
//! (`qemu-img bench -d 1`), through the page cache (`-t writeback`, we use buffered I/O),
//! with a warm cache, without flushes while timing. `qemu-img bench` only knows a fixed
//! stride, so the 4 KiB pattern is a stride of 1031 clusters (64 KiB) modulo the disk:
//! every request lands in a different cluster in a scattered order, the same for both.
//! Each figure is the median of `--reps` runs; first-write runs get a fresh overlay each.
//! qemu reads a VHD differencing image as if it were a dynamic one (it ignores the
//! parent): its VHD figures are for that.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use vhd::{BaseRef, CreateOptions, DiskImage, Format, OpenOptions};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 * KIB;
/// The stride of the 4 KiB pattern, in clusters (odd, so it visits every cluster).
const STRIDE_CLUSTERS: u64 = 1031;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Raw,
    Qcow2,
    /// A qcow2 overlay with smaller clusters (`--small-cluster-kib`, 4 KiB by
    /// default: no copy-on-write for 4 KiB writes, but 16x the L2 tables).
    Qcow2Small,
    Vhd,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Qcow2 => "qcow2 overlay / raw base",
            Kind::Qcow2Small => "qcow2 small-cluster ovl",
            Kind::Vhd => "vhd diff / dynamic base",
        }
    }
    fn qemu_fmt(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Qcow2 | Kind::Qcow2Small => "qcow2",
            Kind::Vhd => "vpc",
        }
    }
}

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    /// Needs a fresh overlay for every run.
    first: bool,
    bs: u64,
    step: u64,
    count: u64,
}

struct Setup {
    dir: PathBuf,
    /// Virtual size: whole clusters plus 4 KiB, so that `qemu-img bench`'s wrap-around
    /// (`offset % (size - 4 KiB)`) keeps 4 KiB requests cluster-aligned.
    size: u64,
    raw_base: PathBuf,
    raw_img: PathBuf,
    vhd_base: PathBuf,
    raw_base_img: Arc<dyn DiskImage>,
    vhd_base_img: Arc<dyn DiskImage>,
    serial: std::cell::Cell<u32>,
    /// Cluster size of the `Qcow2Small` overlays.
    small_cluster: u64,
}

struct Rng(u64);
impl Rng {
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let v = self.0.to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn setup(dir: &Path, size_mib: u64, small_cluster: u64) -> Result<Setup> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let size = size_mib * MIB + 4 * KIB;
    let raw_base = dir.join("base.raw");
    let mut data = vec![0u8; size as usize];
    Rng(0x1234_5678_9abc_def1).fill(&mut data);
    std::fs::write(&raw_base, &data).context("write base.raw")?;
    let raw_img = dir.join("disk.raw");
    std::fs::write(&raw_img, &data).context("write disk.raw")?;
    let vhd_base = dir.join("base.vhd");
    vhd::create(&vhd_base, Format::Vhd, &CreateOptions::new(size))?;
    {
        let b = vhd::open(&vhd_base, Format::Vhd, OpenOptions::read_write())?;
        for (i, c) in data.chunks(MIB as usize).enumerate() {
            b.write_at(c, i as u64 * MIB)?;
        }
        b.flush()?;
    }
    Ok(Setup {
        dir: dir.to_path_buf(),
        size,
        raw_base_img: vhd::open(&raw_base, Format::Raw, OpenOptions::read_only())?,
        vhd_base_img: vhd::open(&vhd_base, Format::Vhd, OpenOptions::read_only())?,
        raw_base,
        raw_img,
        vhd_base,
        serial: std::cell::Cell::new(0),
        small_cluster,
    })
}

impl Setup {
    /// A fresh overlay (or the raw image) to run on.
    fn target(&self, kind: Kind) -> Result<PathBuf> {
        let n = self.serial.get() + 1;
        self.serial.set(n);
        let (path, base, fmt) = match kind {
            Kind::Raw => return Ok(self.raw_img.clone()),
            Kind::Qcow2 | Kind::Qcow2Small => (
                self.dir.join(format!("ov{n}.qcow2")),
                &self.raw_base_img,
                Format::Qcow2,
            ),
            Kind::Vhd => (
                self.dir.join(format!("ov{n}.vhd")),
                &self.vhd_base_img,
                Format::Vhd,
            ),
        };
        let name = match kind {
            Kind::Qcow2 | Kind::Qcow2Small => &self.raw_base,
            _ => &self.vhd_base,
        };
        let bref = BaseRef {
            image: Arc::clone(base),
            name: name
                .file_name()
                .and_then(|s| s.to_str())
                .context("base name")?
                .to_string(),
        };
        let cluster = if kind == Kind::Qcow2Small {
            self.small_cluster
        } else {
            CLUSTER
        };
        vhd::create_diff(&path, fmt, &bref, None, Some(cluster as u32))?;
        Ok(path)
    }

    fn open(&self, kind: Kind, path: &Path) -> Result<Arc<dyn DiskImage>> {
        Ok(match kind {
            Kind::Raw => vhd::open(path, Format::Raw, OpenOptions::read_write())?,
            Kind::Qcow2 | Kind::Qcow2Small => vhd::open(
                path,
                Format::Qcow2,
                OpenOptions::read_write().with_backing(Arc::clone(&self.raw_base_img)),
            )?,
            Kind::Vhd => vhd::open(
                path,
                Format::Vhd,
                OpenOptions::read_write().with_backing(Arc::clone(&self.vhd_base_img)),
            )?,
        })
    }

    fn remove(&self, kind: Kind, path: &Path) {
        if kind != Kind::Raw {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `qemu-img bench`'s offset sequence: `offset += step; offset %= size - bs`.
fn offsets(w: &Workload, size: u64) -> impl Iterator<Item = u64> + '_ {
    let m = size - w.bs;
    (0..w.count).map(move |n| (n as u128 * w.step as u128 % m as u128) as u64)
}

/// Our layer: seconds for the workload's requests (no flush while timing).
fn run_ours(img: &dyn DiskImage, w: &Workload, size: u64) -> Result<f64> {
    let mut buf = vec![0xa5u8; w.bs as usize];
    let t = Instant::now();
    for off in offsets(w, size) {
        if w.write {
            img.write_at(&buf, off)?;
        } else {
            img.read_at(&mut buf, off)?;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    img.flush()?;
    Ok(secs)
}

/// `qemu-img bench` with the same requests: seconds as it reports them.
fn run_qemu(kind: Kind, path: &Path, w: &Workload) -> Result<f64> {
    let mut c = Command::new("qemu-img");
    c.args([
        "bench",
        "-f",
        kind.qemu_fmt(),
        "-t",
        "writeback",
        "-i",
        "threads",
    ])
    .args([
        "-d",
        "1",
        "-c",
        &w.count.to_string(),
        "-s",
        &w.bs.to_string(),
    ])
    .args(["-S", &w.step.to_string()]);
    if w.write {
        c.args(["-w", "--pattern=165"]);
    }
    let out = c.arg(path).output().context("run qemu-img bench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "qemu-img bench failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let secs = text
        .split("Run completed in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .with_context(|| format!("unexpected qemu-img bench output: {text}"))?;
    Ok(secs.max(0.0005))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median throughput (requests/s) for ours and qemu's.
fn measure(
    s: &Setup,
    kind: Kind,
    w: &Workload,
    reps: usize,
    qemu: bool,
) -> Result<(f64, Option<f64>)> {
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    // Steady state and reads run on one image, prepared once per side.
    let prepare = |path: &Path| -> Result<()> {
        if w.write && !w.first {
            // Allocate every cluster the workload touches.
            let img = s.open(kind, path)?;
            run_ours(img.as_ref(), w, s.size)?;
        }
        Ok(())
    };
    let (mut our_path, mut their_path) = (None, None);
    for _ in 0..reps {
        // Ours.
        let path = match (&our_path, w.first) {
            (Some(p), false) => PathBuf::clone(p),
            _ => {
                let p = s.target(kind)?;
                prepare(&p)?;
                p
            }
        };
        let img = s.open(kind, &path)?;
        if !w.write {
            run_ours(img.as_ref(), w, s.size)?; // warm the cache
        }
        ours.push(w.count as f64 / run_ours(img.as_ref(), w, s.size)?);
        drop(img);
        if w.first {
            s.remove(kind, &path);
        } else {
            our_path = Some(path);
        }
        // qemu-img bench on its own image of the same kind.
        if qemu {
            let path = match (&their_path, w.first) {
                (Some(p), false) => PathBuf::clone(p),
                _ => {
                    let p = s.target(kind)?;
                    prepare(&p)?;
                    p
                }
            };
            if !w.write {
                run_qemu(kind, &path, w)?;
            }
            theirs.push(w.count as f64 / run_qemu(kind, &path, w)?);
            if w.first {
                s.remove(kind, &path);
            } else {
                their_path = Some(path);
            }
        }
    }
    for p in [our_path, their_path].into_iter().flatten() {
        s.remove(kind, &p);
    }
    Ok((median(ours), (!theirs.is_empty()).then(|| median(theirs))))
}

fn fmt_rate(w: &Workload, reqs_per_s: f64) -> String {
    if w.bs >= MIB {
        format!("{:.0} MB/s", reqs_per_s * w.bs as f64 / 1e6)
    } else {
        format!("{:.1}k IOPS", reqs_per_s / 1000.0)
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let mut size_mib = 256u64;
    let mut reps = 5usize;
    let mut qemu = true;
    let mut small_kib = 4u64;
    let mut dir = std::env::temp_dir().join(format!("reddog-disk-io-{}", std::process::id()));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size-mib" => size_mib = args.next().context("--size-mib N")?.parse()?,
            "--reps" => reps = args.next().context("--reps N")?.parse()?,
            "--dir" => dir = PathBuf::from(args.next().context("--dir DIR")?),
            "--no-qemu" => qemu = false,
            "--small-cluster-kib" => {
                small_kib = args.next().context("--small-cluster-kib N")?.parse()?
            }
            _ => bail!(
                "usage: disk-io [--size-mib N] [--reps N] [--dir DIR] [--no-qemu] [--small-cluster-kib 4|8|16|32]"
            ),
        }
    }
    if !(4..=32).contains(&small_kib) || !small_kib.is_power_of_two() {
        bail!("--small-cluster-kib must be 4, 8, 16 or 32");
    }
    if size_mib < 16 || reps == 0 {
        bail!("--size-mib must be at least 16 and --reps at least 1");
    }
    let clusters = size_mib * MIB / CLUSTER;
    let rand = |name, write, first, count| Workload {
        name,
        write,
        first,
        bs: 4 * KIB,
        step: STRIDE_CLUSTERS * CLUSTER,
        count,
    };
    let seq = |name, write, first| Workload {
        name,
        write,
        first,
        bs: MIB,
        step: MIB,
        count: size_mib - 1,
    };
    let workloads = [
        rand("4K rand read", false, false, 4 * clusters),
        rand("4K rand write, first", true, true, clusters),
        rand("4K rand write, steady", true, false, 4 * clusters),
        seq("1M seq read", false, false),
        seq("1M seq write, first", true, true),
        seq("1M seq write, steady", true, false),
    ];
    println!(
        "disk-io: {size_mib} MiB disks, 64 KiB qcow2 clusters (small-cluster overlay: {small_kib} KiB), 2 MiB VHD blocks, median of {reps} runs"
    );
    println!(
        "machine: {} x {}; kernel {}; {}",
        sh("nproc", &[]),
        sh(
            "sh",
            &["-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]
        ),
        sh("uname", &["-r"]),
        sh("qemu-img", &["--version"])
            .lines()
            .next()
            .unwrap_or("no qemu-img")
    );
    println!("load average at start: {}", sh("cat", &["/proc/loadavg"]));
    let s = setup(&dir, size_mib, small_kib * KIB)?;
    let kinds = [Kind::Raw, Kind::Qcow2, Kind::Qcow2Small, Kind::Vhd];
    let mut results = Vec::new();
    for w in &workloads {
        for &k in &kinds {
            let r = measure(&s, k, w, reps, qemu)
                .with_context(|| format!("{} on {}", w.name, k.name()))?;
            results.push((w, k, r));
        }
    }
    println!();
    println!(
        "{:<22} {:<26} {:>14} {:>14} {:>8} {:>9}",
        "workload", "image", "ours", "qemu-img", "ours/raw", "ours/qemu"
    );
    for &(w, k, (ours, theirs)) in &results {
        let raw = results
            .iter()
            .find(|r| r.0.name == w.name && r.1 == Kind::Raw)
            .map_or(f64::NAN, |r| r.2 .0);
        println!(
            "{:<22} {:<26} {:>14} {:>14} {:>8.2} {:>9}",
            w.name,
            k.name(),
            fmt_rate(w, ours),
            theirs.map_or("-".into(), |t| fmt_rate(w, t)),
            ours / raw,
            theirs.map_or("-".into(), |t| format!("{:.2}", ours / t)),
        );
    }
    println!("\nload average at end: {}", sh("cat", &["/proc/loadavg"]));
    drop(s);
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(())
}
