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
    let cmdline = testkit::test_guest::Cmdline::new().exit_acpi().to_string();
    let mut vm = InnerVm::new(test_guest::elf_path(), &cmdline);
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

/// The stock kernel's command line on reddog-vmm: COM1 for the console, ACPI
/// for reboot and S5, `panic=-1` so a panic resets the VM (exit status 10)
/// instead of hanging until the limit; then what `reddog-guest` should check.
const BASE_CMDLINE: &str = "console=ttyS0 reboot=acpi panic=-1 quiet reddog.disks=3 reddog.wait=30";

/// A raw disk image of `size` bytes that starts with `label`.
fn disk(label: &str, size: usize) -> Vec<u8> {
    let mut d = vec![0u8; size];
    d[..label.len()].copy_from_slice(label.as_bytes());
    d
}

/// A guest with reddog-guest as /init and three virtio disks: the OS disk,
/// the resource disk (writable) and the role disk (read-only).
fn linux_guest(k: &KernelArtifacts, image: &Path, cmdline: &str) -> InnerVm {
    let (initrd, modules) = testkit::guest::initramfs(k).expect("guest initramfs");
    eprintln!(
        "guest initramfs: {} KiB, modules {modules:?}",
        initrd.len() / 1024
    );
    let mut vm = InnerVm::new(image, cmdline);
    vm.vcpus = 2;
    vm.memory_mib = 512;
    vm.initrd = Some(initrd);
    vm.files = vec![
        ("os.img".into(), disk("REDDOG-OS-DISK", 2 << 20)),
        ("resource.img".into(), disk("REDDOG-RESOURCE-DISK", 1 << 20)),
        ("role.img".into(), disk("REDDOG-ROLE-DISK", 1 << 20)),
    ];
    vm.extra_args = vec![
        "--disk path=/guest/os.img,format=raw,serial=reddog-os".into(),
        "--disk path=/guest/resource.img,format=raw,serial=reddog-resource".into(),
        "--disk path=/guest/role.img,format=raw,ro,serial=reddog-role".into(),
    ];
    vm
}

fn assert_three_disks(run: &InnerRun) {
    let lines = run.lines("reddog-guest");
    for (dev, serial, sectors, label) in [
        ("vda", "reddog-os", 4096, "REDDOG-OS-DISK"),
        ("vdb", "reddog-resource", 2048, "REDDOG-RESOURCE-DISK"),
        ("vdc", "reddog-role", 2048, "REDDOG-ROLE-DISK"),
    ] {
        let want = format!("disk {dev} serial={serial} sectors={sectors} first={label}");
        assert!(
            lines.iter().any(|l| l.starts_with(&want)),
            "missing {want:?}\n{}",
            run.describe()
        );
    }
    for m in ["virtio_mmio", "virtio_blk", "vmw_vsock_virtio_transport"] {
        let want = format!("module {m} ok");
        assert!(
            lines.contains(&want.as_str()),
            "missing {want:?}\n{}",
            run.describe()
        );
    }
}

fn print_phases(what: &str, run: &InnerRun) {
    let r = run.report.as_ref().expect("exit report");
    eprintln!(
        "{what}: boot phases: VMM start 0 ms, first KVM_RUN {} ms, guest init (boot timer) {} ms, VM stopped {} ms",
        r.first_run_us.map_or("?".into(), |u| (u / 1000).to_string()),
        r.boot_time_us.map_or("?".into(), |u| (u / 1000).to_string()),
        r.total_us / 1000
    );
}

#[test]
fn debian_pvh_guest_sees_its_disks_and_talks_vsock() {
    let k = kernel();
    let cmdline = format!(
        "{BASE_CMDLINE} reddog.write_test=reddog-role,reddog-resource reddog.vsock_connect=1024 reddog.vsock_listen=5000"
    );
    let mut vm = linux_guest(
        &k,
        k.pvh_vmlinux().expect("the cloud kernel has a vmlinux"),
        &cmdline,
    );
    vm.extra_args.push("--vsock cid=3,uds=/tmp/vm.sock".into());
    let probe = testkit::artifacts::static_bin("testkit", "vsock-probe").expect("vsock-probe");
    vm.bins = vec![("vsock-probe".into(), probe)];
    vm.before = Some(
        "/bin/vsock-probe listen /tmp/vm.sock_1024 'welcome from host' > /out/probe-listen 2>&1 &\n"
            .into(),
    );
    vm.during = Some("/bin/vsock-probe connect /tmp/vm.sock 5000 'ping from host'\n".into());
    let run = run("Debian kernel, PVH vmlinux, reddog-guest", &k, &vm);
    print_phases("PVH", &run);
    assert_powered_off(&run);
    assert_three_disks(&run);
    let lines = run.lines("reddog-guest");
    // The read-only role disk refuses the write; the resource disk takes it.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("write-test reddog-role refused")),
        "{}",
        run.describe()
    );
    assert!(
        lines.contains(&"write-test reddog-resource ok"),
        "{}",
        run.describe()
    );
    // Guest -> host: the guest's line reached the host socket, and the answer came back.
    assert!(
        lines.contains(&"vsock-connect port=1024 reply=\"welcome from host\""),
        "{}",
        run.describe()
    );
    let listen = run.outer.section("probe-listen").unwrap_or("");
    assert!(
        listen.contains("got=hello from reddog-guest"),
        "{listen}\n{}",
        run.describe()
    );
    // Host -> guest: CONNECT 5000 reached the guest's listener.
    assert!(
        lines.contains(&"vsock-listen port=5000 got=\"ping from host\""),
        "{}",
        run.describe()
    );
    let during = run.outer.section("during").unwrap_or("");
    assert!(
        during.contains("reply=pong from reddog-guest"),
        "{during}\n{}",
        run.describe()
    );
    assert!(lines.contains(&"poweroff"), "{}", run.describe());
    assert!(lines.contains(&"boot-timer written"), "{}", run.describe());
    let report = run.report.as_ref().expect("exit report");
    assert!(report.boot_time_us.is_some(), "{}", run.describe());
}

/// A kernel other than the cloud one: Debian's generic kernel
/// (`linux-image-amd64`, followed to its package). Its bzImage is XZ, so it
/// has no PVH `vmlinux` here and boots through the 64-bit boot protocol, with
/// the guest initramfs made from its own modules (found through their
/// dependencies, as for the cloud kernel). The outer machine keeps the cloud
/// kernel.
#[test]
fn a_generic_debian_kernel_boots_through_its_bzimage_and_sees_its_disks() {
    let outer = kernel();
    let cache = testkit::artifacts::cache_root().expect("cache root");
    let started = Instant::now();
    let k = testkit::artifacts::kernel_in(
        &testkit::artifacts::KernelSource::Package("linux-image-amd64".into()),
        &cache,
    )
    .unwrap_or_else(|e| panic!("Debian's generic kernel could not be had: {e}"));
    eprintln!(
        "generic kernel: {} {} ready in {:.1} s (PVH vmlinux: {})",
        k.package,
        k.version,
        started.elapsed().as_secs_f64(),
        k.vmlinux.is_some()
    );
    assert!(
        !k.package.contains("cloud"),
        "not a generic kernel: {}",
        k.package
    );
    let vm = linux_guest(&k, &k.vmlinuz, BASE_CMDLINE);
    let run = run("Debian generic kernel, bzImage, reddog-guest", &outer, &vm);
    print_phases("generic bzImage", &run);
    assert_powered_off(&run);
    assert_three_disks(&run);
}

#[test]
fn debian_bzimage_guest_sees_its_disks() {
    let k = kernel();
    let vm = linux_guest(&k, &k.vmlinuz, BASE_CMDLINE);
    let run = run("Debian kernel, bzImage, reddog-guest", &k, &vm);
    print_phases("bzImage", &run);
    assert_powered_off(&run);
    assert_three_disks(&run);
}
