//! reddog-vmm on real KVM (AMD SVM) inside a QEMU-TCG machine: the tiny test
//! guest with 2 vCPUs, then Debian 12's stock cloud kernel as a PVH vmlinux and
//! as a bzImage, up to a busybox init that powers off through ACPI S5.
//!
//! Slow (tens of seconds each under TCG) and needing QEMU, apt access to
//! Debian's archive and busybox-static: they fail, never skip, when any is
//! missing. Run: `cargo test -p testkit --test nested_linux -- --nocapture`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Instant;

use testkit::nested::{self, InnerRun, InnerVm};
use testkit::KernelArtifacts;
use vmm_api::ExitReason;

fn kernel() -> KernelArtifacts {
    let started = Instant::now();
    let k = testkit::debian_kernel().unwrap_or_else(|e| {
        panic!("the nested tests need Debian's cloud kernel and could not get it: {e}")
    });
    eprintln!(
        "kernel: {} {} (deb sha256 {}) ready in {:.1} s",
        k.package,
        k.version,
        k.deb_sha256,
        started.elapsed().as_secs_f64()
    );
    k
}

fn run(what: &str, k: &KernelArtifacts, vm: &InnerVm) -> InnerRun {
    let started = Instant::now();
    let run = nested::run_vmm(k, vm).unwrap_or_else(|e| panic!("{what}: {e}"));
    let inner_ms = run.report.as_ref().map(|r| r.total_us / 1000);
    eprintln!(
        "{what}: {:.1} s in all (outer machine {:.1} s, reddog-vmm inside {} ms)",
        started.elapsed().as_secs_f64(),
        run.outer.elapsed.as_secs_f64(),
        inner_ms.map_or("?".into(), |ms| ms.to_string()),
    );
    run
}

fn assert_powered_off(run: &InnerRun) {
    assert_eq!(run.status, Some(0), "{}", run.describe());
    let report = run.report.as_ref().expect("an exit report");
    assert_eq!(report.reason, ExitReason::PowerOff, "{}", run.describe());
}

#[test]
fn test_guest_on_real_kvm_with_two_vcpus() {
    let k = kernel();
    let mut vm = InnerVm::new(test_guest::elf_path(), "exit=acpi");
    vm.vcpus = 2;
    vm.memory_mib = 64;
    vm.timeout_ms = 60_000;
    let run = run("test guest, 2 vCPUs", &k, &vm);
    assert_powered_off(&run);
    assert_eq!(
        run.line("reddog-test-guest"),
        Some("hello"),
        "{}",
        run.describe()
    );
    assert_eq!(run.line("boot-protocol"), Some("pvh"), "{}", run.describe());
    assert_eq!(
        run.line("cpus"),
        Some("madt=2 online=2"),
        "{}",
        run.describe()
    );
    assert_eq!(run.line("exit"), Some("acpi"), "{}", run.describe());
}

/// The inner /init: prove userspace runs (fork, exec, signals), then power off.
const INNER_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "reddog-inner: init ok"
echo "reddog-inner: uname $(/bin/busybox uname -r)"
echo "reddog-inner: cmdline $(/bin/busybox cat /proc/cmdline)"
echo "reddog-inner: cpus $(/bin/busybox grep -c ^processor /proc/cpuinfo)"
/bin/busybox poweroff -f
"#;

/// What the stock kernel needs from reddog-vmm's platform: COM1 for the
/// console, ACPI for reboot and S5, and `panic=-1` so a panic resets the VM
/// (exit status 10) instead of hanging until the limit.
const INNER_CMDLINE: &str = "console=ttyS0 reboot=acpi panic=-1 quiet";

fn boot_debian(what: &str, k: &KernelArtifacts, image: &Path) {
    let mut vm = InnerVm::new(image, INNER_CMDLINE);
    vm.vcpus = 2;
    vm.memory_mib = 512;
    vm.initrd = Some(nested::busybox_initramfs(INNER_INIT).expect("inner initramfs"));
    let run = run(what, k, &vm);
    assert_eq!(
        run.line("reddog-inner"),
        Some("init ok"),
        "{}",
        run.describe()
    );
    let uname = format!("uname {}", k.release);
    let cmdline = format!("cmdline {INNER_CMDLINE}");
    let lines = run.lines("reddog-inner");
    assert!(lines.contains(&uname.as_str()), "{}", run.describe());
    assert!(lines.contains(&cmdline.as_str()), "{}", run.describe());
    assert!(lines.contains(&"cpus 2"), "{}", run.describe());
    assert_powered_off(&run);
}

#[test]
fn debian_kernel_as_pvh_vmlinux() {
    let k = kernel();
    boot_debian("Debian kernel, PVH vmlinux", &k, &k.vmlinux);
}

#[test]
fn debian_kernel_as_bzimage() {
    let k = kernel();
    boot_debian("Debian kernel, bzImage", &k, &k.vmlinuz);
}
