//! Boot-latency benchmark: boots the tiny test guest N times under reddog-vmm and,
//! in the same run, under QEMU microvm (and Firecracker when `FIRECRACKER` names
//! its binary), and prints min / median / p90 / max of spawn -> console marker,
//! spawn -> exit, and peak RSS, with reddog's ratio to each peer. reddog also
//! runs with `--no-seccomp` (its per-thread filters off): the ratio of the two
//! is what the filters cost.
//!
//! Usage: `cargo build --release -p vmm -p benches && target/release/boot-latency [--runs N] [--vmm PATH]`
//! (`scripts/bench-boot` builds reddog-vmm statically linked and runs it).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use benches::{summarize, time_boot, BootSample, Summary};
use testkit::test_guest::{Cmdline, Exit};

const MARKER: &[u8] = b"reddog-test-guest: hello";
const MEMORY_MIB: &str = "128";

struct Peer {
    name: &'static str,
    command: Box<dyn Fn() -> Command>,
    /// Exit statuses that mean "the guest stopped as asked".
    ok_status: &'static [i32],
}

fn reddog(vmm: PathBuf, guest: PathBuf, seccomp: bool) -> Peer {
    Peer {
        name: if seccomp {
            "reddog-vmm"
        } else {
            "reddog-nosecc"
        },
        command: Box::new(move || {
            let mut c = Command::new(&vmm);
            if !seccomp {
                c.arg("--no-seccomp");
            }
            c.arg("--kernel")
                .arg(&guest)
                .arg("--cmdline")
                .arg(Cmdline::new().quiet().exit_acpi().no_smp().to_string())
                .args(["--memory-mib", MEMORY_MIB]);
            c
        }),
        ok_status: &[0],
    }
}

fn qemu(guest: PathBuf) -> Peer {
    Peer {
        name: "qemu-microvm",
        command: Box::new(move || {
            let mut c = Command::new("qemu-system-x86_64");
            c.args([
                "-M",
                "microvm",
                "-enable-kvm",
                "-cpu",
                "host,-arch-capabilities",
                "-m",
                MEMORY_MIB,
                "-nodefaults",
                "-no-reboot",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=4",
                "-kernel",
            ])
            .arg(&guest)
            .arg("-append")
            .arg(
                Cmdline::new()
                    .quiet()
                    .exit(Exit::DebugExit)
                    .no_smp()
                    .to_string(),
            );
            c
        }),
        // isa-debug-exit: status (value << 1) | 1; the guest writes 0.
        ok_status: &[1],
    }
}

fn firecracker(bin: PathBuf, guest: PathBuf, dir: PathBuf) -> Result<Peer> {
    let config = dir.join("firecracker.json");
    let args = Cmdline::new()
        .quiet()
        .exit(Exit::I8042)
        .no_smp()
        .to_string();
    let json = format!(
        r#"{{"boot-source":{{"kernel_image_path":{:?},"boot_args":{:?}}},"drives":[],"machine-config":{{"vcpu_count":1,"mem_size_mib":{MEMORY_MIB}}}}}"#,
        guest.display().to_string(),
        args
    );
    std::fs::write(&config, json).context("writing the Firecracker config")?;
    Ok(Peer {
        name: "firecracker",
        command: Box::new(move || {
            let mut c = Command::new(&bin);
            c.arg("--no-api").arg("--config-file").arg(&config);
            c
        }),
        ok_status: &[0],
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(name: &str, what: &str, s: Summary, unit: &str) {
    println!(
        "{name:<14} {what:<16} min {:>8.2} {unit}  median {:>8.2} {unit}  p90 {:>8.2} {unit}  max {:>8.2} {unit}",
        s.min, s.median, s.p90, s.max
    );
}

fn main() -> Result<()> {
    let mut runs = 30usize;
    let mut vmm_arg: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => {
                runs = args
                    .next()
                    .context("--runs needs a number")?
                    .parse()
                    .context("--runs needs a number")?
            }
            "--vmm" => vmm_arg = Some(args.next().context("--vmm needs a path")?.into()),
            other => {
                bail!("unknown argument {other:?}; usage: boot-latency [--runs N] [--vmm PATH]")
            }
        }
    }
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let vmm = match vmm_arg {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating this binary")?
            .parent()
            .context("binary has no parent directory")?
            .join("reddog-vmm"),
    };
    if !vmm.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release -p vmm -p benches`",
            vmm.display()
        );
    }
    let guest = test_guest::elf_path().to_path_buf();
    let tmp = std::env::temp_dir().join(format!("reddog-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;

    let mut peers = vec![
        reddog(vmm.clone(), guest.clone(), true),
        reddog(vmm, guest.clone(), false),
        qemu(guest.clone()),
    ];
    if let Some(fc) = std::env::var_os("FIRECRACKER") {
        peers.push(firecracker(fc.into(), guest.clone(), tmp.clone())?);
    }
    println!(
        "boot latency: tiny test guest ({} bytes, PVH), {runs} runs per VMM, {MEMORY_MIB} MiB, 1 vCPU, interleaved",
        std::fs::metadata(&guest)?.len()
    );

    let mut samples: Vec<Vec<BootSample>> = vec![Vec::new(); peers.len()];
    for _ in 0..runs {
        // Interleave the VMMs so drift in the machine's load hits all alike.
        for (i, p) in peers.iter().enumerate() {
            let s = time_boot(&mut (p.command)(), MARKER, Duration::from_secs(30))
                .with_context(|| format!("{} boot failed", p.name))?;
            if !p.ok_status.contains(&s.status) {
                bail!(
                    "{} exited with status {} (expected {:?})",
                    p.name,
                    s.status,
                    p.ok_status
                );
            }
            samples[i].push(s);
        }
    }

    let mut medians = Vec::new();
    for (p, s) in peers.iter().zip(&samples) {
        let marker =
            summarize(&s.iter().map(|x| ms(x.marker)).collect::<Vec<_>>()).context("no samples")?;
        let exit =
            summarize(&s.iter().map(|x| ms(x.exit)).collect::<Vec<_>>()).context("no samples")?;
        let rss = summarize(
            &s.iter()
                .map(|x| x.max_rss_kib as f64 / 1024.0)
                .collect::<Vec<_>>(),
        )
        .context("no samples")?;
        row(p.name, "spawn->marker", marker, "ms");
        row(p.name, "spawn->exit", exit, "ms");
        row(p.name, "peak RSS", rss, "MiB");
        medians.push((p.name, marker.median, exit.median, rss.median));
    }
    let (_, m0, e0, r0) = medians[0];
    for (name, m, e, r) in &medians[1..] {
        println!(
            "ratio reddog-vmm / {name}: spawn->marker {:.3}  spawn->exit {:.3}  peak RSS {:.3}",
            m0 / m,
            e0 / e,
            r0 / r
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
