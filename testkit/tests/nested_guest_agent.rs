//! reddog-guest in agent mode on reddog-vmm, on real KVM inside a QEMU-TCG
//! machine (see `nested_linux.rs` and docs/testing.md): Debian's cloud kernel
//! boots the guest initramfs, reddog-guest (PID 1) mounts the OS disk (a qcow2
//! overlay over the cached base image) as its root, the role disk read-only
//! and the resource disk read-write, switches into the OS root, starts the
//! web role (busybox httpd as the unprivileged `reddog` user) and reports it
//! ready to a host listener over vsock, with heartbeats; the listener then
//! sends `Shutdown`, the guest stops the role, unmounts and powers off, and
//! reddog-vmm exits 0 through ACPI S5.
//!
//! One outer machine, ~30-60 s. Run:
//! `cargo test -p testkit --test nested_guest_agent -- --nocapture`.

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use testkit::nested::{self, InnerVm};
use testkit::os_image;
use vmm_api::ExitReason;

const AGENT_PORT: u32 = 1024;
const WEB_PORT: u16 = 8080;

/// Everything a web-role guest needs: kernel, initramfs, OS overlay over the
/// cached base, resource and role disks, vsock, the host-side listener.
fn web_role_vm(started: Instant) -> (testkit::KernelArtifacts, InnerVm, tempfile::TempDir) {
    let k = testkit::debian_kernel().unwrap_or_else(|e| panic!("Debian's cloud kernel: {e}"));
    let (initrd, modules) = testkit::guest::initramfs(&k).expect("guest initramfs");
    let base = os_image::base_image().expect("OS base image");
    let work = tempfile::tempdir().unwrap();
    let overlay = work.path().join("os.qcow2");
    os_image::os_overlay(&base, "base.img", &overlay).expect("qcow2 overlay");
    let role_dir = work.path().join("role");
    std::fs::create_dir(&role_dir).unwrap();
    os_image::web_role(&role_dir, WEB_PORT, "<h1>reddog web role</h1>\n").expect("web role");
    let role = work.path().join("role.img");
    os_image::role_disk(&role_dir, &role).expect("role disk");
    let resource = work.path().join("resource.img");
    os_image::resource_disk(&resource, 16 << 20).expect("resource disk");
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    eprintln!(
        "artifacts ready in {:.1} s: base {} ({} MiB), modules {modules:?}",
        started.elapsed().as_secs_f64(),
        base.display(),
        std::fs::metadata(&base).unwrap().len() >> 20
    );

    let cmdline = format!(
        "console=ttyS0 reboot=acpi panic=-1 quiet reddog.agent_port={AGENT_PORT} reddog.wait=30"
    );
    let mut vm = InnerVm::new(
        k.pvh_vmlinux().expect("the cloud kernel has a vmlinux"),
        &cmdline,
    );
    vm.vcpus = 2;
    vm.memory_mib = 256;
    vm.timeout_ms = 120_000;
    vm.initrd = Some(initrd);
    vm.files = vec![
        ("base.img".into(), read(&base)),
        ("os.qcow2".into(), read(&overlay)),
        ("resource.img".into(), read(&resource)),
        ("role.img".into(), read(&role)),
    ];
    vm.extra_args = vec![
        "--disk path=/guest/os.qcow2,format=qcow2,backing=/guest/base.img,backing_format=raw,serial=reddog-os".into(),
        "--disk path=/guest/resource.img,format=raw,serial=reddog-resource".into(),
        "--disk path=/guest/role.img,format=raw,ro,serial=reddog-role".into(),
        "--vsock cid=3,uds=/tmp/vm.sock".into(),
    ];
    let listener =
        testkit::artifacts::static_bin("testkit", "guest-listener").expect("guest-listener");
    vm.bins = vec![("guest-listener".into(), listener)];
    (k, vm, work)
}

#[test]
fn web_role_becomes_ready_heartbeats_flow_and_shutdown_powers_off() {
    let started = Instant::now();
    let (k, mut vm, _work) = web_role_vm(started);
    vm.before = Some(format!(
        "/bin/guest-listener /tmp/vm.sock_{AGENT_PORT} --interval-ms 500 --shutdown-after 3 --deadline-ms 5000 > /out/listener 2>&1 &\n"
    ));
    let run = nested::run_vmm(&k, &vm).unwrap_or_else(|e| panic!("nested run: {e}"));
    eprintln!(
        "outer machine {:.1} s (reddog-vmm inside {} ms), whole test {:.1} s",
        run.outer.elapsed.as_secs_f64(),
        run.report.as_ref().map_or(0, |r| r.total_us / 1000),
        started.elapsed().as_secs_f64()
    );
    let listener = run.outer.section("listener").unwrap_or("").to_owned();
    for l in run.lines("reddog-guest") {
        eprintln!("guest: {l}");
    }
    for l in listener.lines() {
        eprintln!("host listener: {l}");
    }
    let all = format!("--- listener\n{listener}\n{}", run.describe());
    let guest = run.lines("reddog-guest");
    let has = |l: &str| guest.iter().any(|g| g.starts_with(l));
    for want in [
        "mode agent",
        "os disk /dev/vda mounted",
        "role disk /dev/vdc mounted read-only at /role",
        "resource disk /dev/vdb mounted at /mnt/resource",
        "switched to the OS root",
        "role manifest ok: /bin/busybox as reddog (uid 1000 gid 1000)",
        "role started: pid",
        "role ready: pid",
        "shutdown requested, deadline 5000 ms",
        "unmounted /mnt/resource",
        "unmounted /role",
        "poweroff",
    ] {
        assert!(has(want), "guest console lacks {want:?}\n{all}");
    }
    // The web role's liveness check was read (and, the role staying healthy,
    // never stopped it).
    assert!(
        guest
            .iter()
            .any(|g| g.starts_with("role manifest ok") && g.contains("liveness every 2000 ms")),
        "{all}"
    );
    assert!(!guest.iter().any(|g| g.contains("is hung")), "{all}");
    // The host side saw the whole session.
    let lines: Vec<&str> = listener.lines().collect();
    let find = |p: &str| lines.iter().position(|l| l.contains(p));
    let hello = find("hello version=1").unwrap_or_else(|| panic!("no Hello\n{all}"));
    let started_at = find("role-started pid=").unwrap_or_else(|| panic!("no RoleStarted\n{all}"));
    let ready = find(" ready").unwrap_or_else(|| panic!("no Ready\n{all}"));
    let shutdown = find("sent shutdown").unwrap_or_else(|| panic!("no Shutdown sent\n{all}"));
    let exited = find("role-exited").unwrap_or_else(|| panic!("no RoleExited\n{all}"));
    assert!(
        hello < started_at && started_at < ready && ready < shutdown && shutdown < exited,
        "{all}"
    );
    assert!(
        lines[exited].ends_with("signal=15"),
        "httpd stops on SIGTERM\n{all}"
    );
    let beats = lines
        .iter()
        .filter(|l| l.contains("heartbeat seq="))
        .count();
    assert!(beats >= 3, "{beats} heartbeats\n{all}");
    assert!(lines.iter().any(|l| l.contains("state=Ready")), "{all}");
    assert_eq!(run.status, Some(0), "{all}");
    let report = run.report.as_ref().expect("exit report");
    assert_eq!(report.reason, ExitReason::PowerOff, "{all}");
}

/// The host's `shutdown acpi` on the VMM's control socket presses the guest's
/// power button (GED -> Linux's button driver -> KEY_POWER on evdev), and
/// reddog-guest runs the same orderly shutdown as for the host's Shutdown frame.
#[test]
fn the_acpi_power_button_shuts_the_guest_down_in_order() {
    let started = Instant::now();
    let (k, mut vm, _work) = web_role_vm(started);
    let ctl = testkit::artifacts::static_bin("testkit", "vmm-ctl").expect("vmm-ctl");
    vm.bins.push(("vmm-ctl".into(), ctl));
    vm.extra_args.push("--api-sock /tmp/vm.api".into());
    // No Shutdown frame from the listener: only the power button.
    vm.before = Some(format!(
        "/bin/guest-listener /tmp/vm.sock_{AGENT_PORT} --interval-ms 500 > /out/listener 2>&1 &\n"
    ));
    vm.during = Some(
        "i=0\n\
         while ! grep -q ' ready' /out/listener 2>/dev/null; do\n\
           i=$((i+1)); [ $i -gt 600 ] && { echo 'guest never ready'; exit 1; }; sleep 0.1\n\
         done\n\
         sleep 1\n\
         /bin/vmm-ctl /tmp/vm.api shutdown-acpi\n"
            .into(),
    );
    let run = nested::run_vmm(&k, &vm).unwrap_or_else(|e| panic!("nested run: {e}"));
    eprintln!(
        "outer machine {:.1} s (reddog-vmm inside {} ms), whole test {:.1} s",
        run.outer.elapsed.as_secs_f64(),
        run.report.as_ref().map_or(0, |r| r.total_us / 1000),
        started.elapsed().as_secs_f64()
    );
    let during = run.outer.section("during").unwrap_or("").to_owned();
    let all = format!("--- during\n{during}\n{}", run.describe());
    assert!(
        during.contains("ok {\"mode\":\"acpi\"}"),
        "the VMM took the request\n{all}"
    );
    let guest = run.lines("reddog-guest");
    let has = |l: &str| guest.iter().any(|g| g.starts_with(l));
    for want in [
        "module button ok",
        "module evdev ok",
        "power-button: watching",
        "role ready: pid",
        "power-button: pressed; shutting down",
        "unmounted /role",
        "poweroff",
    ] {
        assert!(has(want), "guest console lacks {want:?}\n{all}");
    }
    assert_eq!(run.status, Some(0), "{all}");
    let report = run.report.as_ref().expect("exit report");
    assert_eq!(report.reason, ExitReason::PowerOff, "{all}");
}
