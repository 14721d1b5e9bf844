//! The tiny test guest's demo (`cargo run --release -p benches --bin demo`;
//! `scripts/demo`, the main job, is `testkit/examples/demo.rs`): boots the tiny
//! guest under reddog-vmm on this host's KVM and prints its console, its boot
//! time and how it stopped.

use std::process::Command;

use anyhow::{bail, Context, Result};
use testkit::test_guest::Cmdline;

fn main() -> Result<()> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let vmm = exe
        .parent()
        .context("no parent directory")?
        .join("reddog-vmm");
    if !vmm.exists() {
        bail!(
            "{} not found: run scripts/demo, which builds it",
            vmm.display()
        );
    }
    let guest = test_guest::elf_path();
    println!(
        "reddog demo: booting {} with {}",
        guest.display(),
        vmm.display()
    );
    println!("--- guest console");
    let out = Command::new(&vmm)
        .arg("--kernel")
        .arg(guest)
        .arg("--cmdline")
        .arg(Cmdline::new().exit_acpi().to_string())
        .args([
            "--vcpus",
            "2",
            "--memory-mib",
            "128",
            "--timeout-ms",
            "10000",
        ])
        .output()
        .context("spawning reddog-vmm")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("--- reddog-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: vmm_api::ExitReport = stderr
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("reddog-vmm printed no exit report: {stderr}"))?;
    println!(
        "stopped: {} (exit status {})",
        report.detail, report.exit_code
    );
    match report.boot_time_us {
        Some(us) => println!(
            "guest boot time (VMM start to boot-timer write): {:.3} ms",
            us as f64 / 1000.0
        ),
        None => println!("the guest never wrote the boot timer"),
    }
    if let Some(us) = report.first_run_us {
        println!("VMM start to first KVM_RUN: {:.3} ms", us as f64 / 1000.0);
    }
    println!(
        "VMM start to stop: {:.3} ms",
        report.total_us as f64 / 1000.0
    );
    if report.exit_code != 0 {
        bail!("the VM did not power off cleanly");
    }
    Ok(())
}
