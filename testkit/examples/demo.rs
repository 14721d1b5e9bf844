//! The reddog demo (`scripts/demo`): the host agent deploys a web role with
//! two instances, each a Debian 12 guest (Debian's cloud kernel, reddog-guest,
//! busybox httpd as the role), and shows their states and heartbeats as they
//! arrive, then removes them and shows that every VMM powered off cleanly.
//!
//! Where the host has hardware KVM (`kvm_intel` with VMX or `kvm_amd` with
//! SVM) the agent runs directly on it. Where it has not (kvm-pvm, on which
//! unmodified Linux cannot boot, or no `/dev/kvm`) the same demo runs inside
//! the nested emulated machine of `testkit::nested` (QEMU TCG, real KVM
//! inside), and says so.
//!
//! `cargo run -p testkit --example demo -- [--instances N] [--nested|--direct]`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use testkit::agent_scenario::{self, AgentScenario, KvmKind};

fn logs_dir() -> PathBuf {
    let ws = testkit::artifacts::workspace_root();
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|v| !v.is_empty())
        .map(|d| ws.join(d))
        .unwrap_or_else(|| ws.join("target"))
        .join("demo")
}

fn usage() -> ExitCode {
    eprintln!("usage: demo [--instances N] [--nested|--direct]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let t0 = Instant::now();
    let mut instances = 2u8;
    let mut force = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--instances" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) if (1..=8).contains(&n) => instances = n,
                _ => return usage(),
            },
            "--nested" => force = Some(KvmKind::NeedsNested("asked for with --nested".into())),
            "--direct" => force = Some(KvmKind::Hardware("asked for with --direct".into())),
            _ => return usage(),
        }
    }
    let kind = force.unwrap_or_else(agent_scenario::detect_kvm);
    println!("reddog demo: the host agent deploys a web role with {instances} instances");
    println!("  (each a Debian 12 VM: Debian's cloud kernel, reddog-guest as PID 1, busybox httpd as the role)");
    match &kind {
        KvmKind::Hardware(why) => {
            println!(
                "  This host has hardware KVM: {why}. The agent and its VMs run directly on it."
            );
            println!(
                "  NOTE: this direct path has NOT been tested: the machine the demo was written"
            );
            println!("  on has no hardware KVM. Needs root (or /dev/kvm access) and mkfs.ext4.");
        }
        KvmKind::NeedsNested(why) => {
            println!("  No hardware KVM here: {why}.");
            println!(
                "  So the demo runs INSIDE AN EMULATED MACHINE: QEMU TCG with an emulated AMD CPU,"
            );
            println!("  real KVM (kvm-amd) inside it, and the agent, reddog-vmm and the guests in there.");
            println!(
                "  Everything runs under emulation: much slower than hardware, and the timings say"
            );
            println!("  nothing about a real blade. On a blade with kvm_intel or kvm_amd it runs directly.");
        }
    }
    println!();
    println!(
        "== preparing (the first run builds static binaries for minutes and downloads the kernel)"
    );
    let a = match agent_scenario::prepare(&mut |step| {
        println!("[{:6.1}s] {step}", t0.elapsed().as_secs_f64());
    }) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demo: preparing failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "[{:6.1}s] ready: kernel {} ({}), base image {}",
        t0.elapsed().as_secs_f64(),
        a.kernel.release,
        a.kernel.version,
        a.base.display()
    );
    let scenario = AgentScenario::web(instances);
    let logs = logs_dir();
    let prepared = t0.elapsed();
    let run = match &kind {
        KvmKind::NeedsNested(_) => {
            println!();
            println!("== booting the emulated machine; inside it the agent deploys the role (lines below come from inside)");
            agent_scenario::run_nested(&a, &scenario, |line| println!("  | {line}"))
        }
        KvmKind::Hardware(_) => {
            println!();
            println!("== running the agent on this host");
            agent_scenario::run_direct(&a, &scenario, &logs)
        }
    };
    let run = match run {
        Ok(r) => r,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = run.save_logs(&logs) {
        eprintln!("demo: cannot save the logs: {e}");
    }
    let s = &run.summary;
    println!();
    println!("== summary");
    match &kind {
        KvmKind::NeedsNested(_) => println!(
            "ran inside the emulated machine (QEMU TCG + nested kvm-amd): {:.1} s from its power-on to its power-off",
            run.elapsed.as_secs_f64()
        ),
        KvmKind::Hardware(_) => println!(
            "ran directly on this host's KVM (an untested path): {:.1} s",
            run.elapsed.as_secs_f64()
        ),
    }
    print!("{}", s.describe());
    println!(
        "preparing {:.1} s, whole demo {:.1} s",
        prepared.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    println!(
        "logs (agent, driver, each VMM's log and serial console): {}",
        logs.display()
    );
    let restarts = run.explain_restarts(matches!(kind, KvmKind::NeedsNested(_)));
    if let Ok(notes) = &restarts {
        for n in notes {
            println!("NOTE: {n}");
        }
    }
    if let (true, Err(e)) = (s.ok, &restarts) {
        println!("FAILED: {e}");
        ExitCode::FAILURE
    } else if s.ok {
        println!(
            "OK: {} instance(s) became ready, heartbeats arrived, and every VMM powered off cleanly{}",
            s.instances.len(),
            if s.instances.iter().any(|i| i.restarts > 0) {
                " (after the restarts noted above)"
            } else {
                ""
            }
        );
        ExitCode::SUCCESS
    } else {
        println!(
            "FAILED: {}",
            s.error.as_deref().unwrap_or("see the logs above")
        );
        ExitCode::FAILURE
    }
}
