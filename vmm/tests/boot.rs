//! Boots the tiny test guest on this host's KVM through every entry protocol and
//! every way a guest can stop.

mod common;

use common::{boot, require_kvm, vmm, Cmdline, Exit};
use vmm_api::platform::mmio;
use vmm_api::ExitReason;

const MIB: u64 = 1 << 20;

/// `exit=acpi smp=0`: report, then power off, without starting the APs.
fn acpi_no_smp() -> Cmdline {
    Cmdline::new().exit_acpi().no_smp()
}

fn assert_booted_and_powered_off(run: &common::Run, protocol: &str, cmdline: &Cmdline) {
    let cmdline = cmdline.to_string();
    assert_eq!(run.status, 0, "{}", run.describe());
    assert_eq!(
        run.line("reddog-test-guest"),
        Some("hello"),
        "{}",
        run.describe()
    );
    assert_eq!(
        run.line("boot-protocol"),
        Some(protocol),
        "{}",
        run.describe()
    );
    assert_eq!(
        run.line("cmdline"),
        Some(cmdline.as_str()),
        "{}",
        run.describe()
    );
    assert_eq!(run.line("exit"), Some("acpi"), "{}", run.describe());
    let report = run.report.as_ref().expect("exit report");
    assert_eq!(report.reason, ExitReason::PowerOff);
    let boot_us = report.boot_time_us.expect("the guest wrote the boot timer");
    let first_run = report.first_run_us.expect("first KVM_RUN recorded");
    assert!(
        first_run <= boot_us && boot_us <= report.total_us,
        "{report:?}"
    );
}

/// Parses `memmap: <i> <base> <size> <type>` lines.
fn memmap(run: &common::Run) -> Vec<(u64, u64, u32)> {
    run.lines("memmap")
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "bad memmap line {l:?}");
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex");
            (hex(f[1]), hex(f[2]), f[3].parse().expect("type"))
        })
        .collect()
}

#[test]
fn pvh_boot_reports_cmdline_memory_and_acpi() {
    let cmdline = acpi_no_smp().word("reddog.test=1");
    let run = boot(test_guest::elf_path(), &cmdline, &["--memory-mib", "64"]);
    assert_booted_and_powered_off(&run, "pvh", &cmdline);
    assert_eq!(
        memmap(&run),
        vec![(0, 0x9fc00, 1), (0xe0000, 0x20000, 2), (MIB, 63 * MIB, 1)],
        "{}",
        run.describe()
    );
    let acpi = run.line("acpi").expect("acpi line");
    assert!(
        acpi.contains("xsdt=ok") && acpi.contains("madt=ok"),
        "{acpi}"
    );
    assert_eq!(run.line("cpus"), Some("madt=1 online=skipped"));
}

#[test]
fn linux64_boot_of_an_elf_without_pvh_note() {
    let cmdline = acpi_no_smp();
    let run = boot(test_guest::elf_nopvh_path(), &cmdline, &[]);
    assert_booted_and_powered_off(&run, "linux64", &cmdline);
    assert_eq!(memmap(&run).last(), Some(&(MIB, 127 * MIB, 1)));
}

#[test]
fn linux64_boot_forced_on_a_pvh_elf() {
    let cmdline = acpi_no_smp();
    let run = boot(
        test_guest::elf_path(),
        &cmdline,
        &["--boot-protocol", "linux64"],
    );
    assert_booted_and_powered_off(&run, "linux64", &cmdline);
}

#[test]
fn bzimage_boot() {
    let cmdline = acpi_no_smp().word("via=bzimage");
    let run = boot(test_guest::bzimage_path(), &cmdline, &[]);
    assert_booted_and_powered_off(&run, "linux64", &cmdline);
    let acpi = run.line("acpi").expect("acpi line");
    assert!(acpi.contains("madt=ok"), "{acpi}");
}

#[test]
fn pvh_on_a_bzimage_is_refused() {
    require_kvm();
    let k = test_guest::bzimage_path().to_str().expect("utf-8 path");
    let run = vmm(&["--kernel", k, "--boot-protocol", "pvh"]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(run.stderr.contains("bzImage"), "{}", run.describe());
    let k = test_guest::elf_nopvh_path().to_str().expect("utf-8 path");
    let run = vmm(&["--kernel", k, "--boot-protocol", "pvh"]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.stderr.contains("no PVH entry note"),
        "{}",
        run.describe()
    );
}

#[test]
fn several_vcpus_come_up() {
    for n in [2u8, 4] {
        let run = boot(
            test_guest::elf_path(),
            &Cmdline::new().exit_acpi(),
            &["--vcpus", &n.to_string()],
        );
        assert_eq!(run.status, 0, "{}", run.describe());
        let want = format!("madt={n} online={n}");
        assert_eq!(run.line("cpus"), Some(want.as_str()), "{}", run.describe());
    }
}

#[test]
fn memory_above_the_mmio_hole_is_in_the_map() {
    let run = boot(
        test_guest::elf_path(),
        &acpi_no_smp(),
        &["--memory-mib", "4096"],
    );
    assert_eq!(run.status, 0, "{}", run.describe());
    let map = memmap(&run);
    assert_eq!(
        map.last(),
        Some(&(0x1_0000_0000, MIB * 1024, 1)),
        "{}",
        run.describe()
    );
    let total: u64 = map.iter().filter(|e| e.2 == 1).map(|e| e.1).sum();
    // All RAM but the EBDA..1 MiB hole.
    assert_eq!(total, 4096 * MIB - (MIB - 0x9fc00));
}

#[test]
fn smallest_memory_boots() {
    let run = boot(
        test_guest::elf_path(),
        &acpi_no_smp(),
        &["--memory-mib", "32"],
    );
    assert_eq!(run.status, 0, "{}", run.describe());
    let run = boot(
        test_guest::elf_path(),
        &Cmdline::new().exit_acpi(),
        &["--memory-mib", "31"],
    );
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(run.stderr.contains("memory_mib"), "{}", run.describe());
}

#[test]
fn each_stop_path_has_its_own_exit_status() {
    for (exit, reason, with_regs) in [
        (Exit::I8042, ExitReason::Reset, false),
        (Exit::AcpiReset, ExitReason::Reset, false),
        (Exit::TripleFault, ExitReason::TripleFault, true),
    ] {
        let cmdline = Cmdline::new().exit(exit).no_smp();
        let run = boot(test_guest::elf_path(), &cmdline, &[]);
        assert_eq!(
            run.status,
            reason.exit_code(),
            "{cmdline}: {}",
            run.describe()
        );
        let report = run.report.as_ref().expect("exit report");
        assert_eq!(report.reason, reason);
        assert_eq!(report.regs.is_some(), with_regs, "{cmdline}: {report:?}");
        if with_regs {
            assert!(run.stderr.contains("rip=0x"), "{}", run.describe());
        }
    }
}

/// A triple fault's report carries what KVM still gives after it: the vCPU's
/// events (`KVM_GET_VCPU_EVENTS`) and its last exits (the test guest's
/// console writes to COM1 come right before its empty-IDT `ud2`).
#[test]
fn a_triple_fault_report_has_the_vcpu_events_and_last_exits() {
    let cmdline = Cmdline::new().exit(Exit::TripleFault).no_smp();
    let run = boot(test_guest::elf_path(), &cmdline, &[]);
    assert_eq!(
        run.status,
        ExitReason::TripleFault.exit_code(),
        "{}",
        run.describe()
    );
    let report = run.report.as_ref().expect("exit report");
    let regs = report.regs.as_ref().expect("registers");
    assert!(regs.events.is_some(), "no vCPU events: {report:?}");
    let exits = &regs.last_exits;
    assert!(
        !exits.is_empty() && exits.len() <= vmm_api::RECENT_EXITS,
        "{report:?}"
    );
    assert!(regs.exits_total >= exits.len() as u64, "{report:?}");
    assert!(
        exits
            .iter()
            .any(|e| e.kind == vmm_api::RecentExitKind::IoOut && e.addr == 0x3f8 && e.len == 1),
        "no COM1 write among the last exits: {report:?}"
    );
    assert!(
        exits.windows(2).all(|w| w[0].seq + 1 == w[1].seq)
            && exits.last().map(|e| e.seq + 1) == Some(regs.exits_total),
        "{report:?}"
    );
}

#[test]
fn a_guest_that_never_stops_is_ended_by_the_limit() {
    require_kvm();
    let k = test_guest::elf_path().to_str().expect("utf-8 path");
    for mode in [Exit::Hang, Exit::Spin] {
        let cmdline = Cmdline::new().exit(mode).no_smp().to_string();
        let started = std::time::Instant::now();
        let run = vmm(&["--kernel", k, "--cmdline", &cmdline, "--timeout-ms", "300"]);
        let took = started.elapsed();
        assert_eq!(
            run.status,
            ExitReason::Timeout.exit_code(),
            "{}",
            run.describe()
        );
        assert!(
            took.as_millis() >= 300 && took.as_secs() < 10,
            "took {took:?}"
        );
        let report = run.report.as_ref().expect("exit report");
        assert!(
            report.boot_time_us.is_some(),
            "booted before hanging: {report:?}"
        );
    }
}

#[test]
fn missing_and_corrupt_kernels_are_clear_errors() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope");
    let run = vmm(&["--kernel", missing.to_str().expect("utf-8")]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.stderr.contains("cannot read kernel"),
        "{}",
        run.describe()
    );

    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, vec![0x5au8; 8192]).expect("write");
    let run = vmm(&["--kernel", garbage.to_str().expect("utf-8")]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(run.stderr.contains("neither an ELF"), "{}", run.describe());

    let elf = std::fs::read(test_guest::elf_path()).expect("read guest");
    for cut in [16, 64, elf.len() / 2] {
        let truncated = dir.path().join(format!("trunc{cut}"));
        std::fs::write(&truncated, &elf[..cut]).expect("write");
        let run = vmm(&["--kernel", truncated.to_str().expect("utf-8")]);
        assert_eq!(run.status, 1, "cut at {cut}: {}", run.describe());
        assert!(
            run.stderr.contains("reddog-vmm: error"),
            "{}",
            run.describe()
        );
        assert!(!run.stderr.contains("panicked"), "{}", run.describe());
    }

    let run = vmm(&["--kernel", "/dev/null", "--vcpus", "0"]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(run.stderr.contains("vcpus must be"), "{}", run.describe());
}

#[test]
fn config_file_drives_the_vm_and_serial_can_go_to_a_file() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let console = dir.path().join("console.log");
    let report = dir.path().join("report.json");
    let mut cfg = vmm_api::VmConfig::new(test_guest::elf_path());
    let cmdline = acpi_no_smp().word("from=config").to_string();
    cfg.cmdline = cmdline.clone();
    cfg.vcpus = 2;
    cfg.serial = vmm_api::SerialOutput::File(console.clone());
    cfg.timeout_ms = Some(20_000);
    let path = dir.path().join("vm.json");
    std::fs::write(&path, serde_json::to_string(&cfg).expect("json")).expect("write");
    let run = vmm(&[
        "--config",
        path.to_str().expect("utf-8"),
        "--exit-report",
        report.to_str().expect("utf-8"),
    ]);
    assert_eq!(run.status, 0, "{}", run.describe());
    assert!(
        run.stdout.is_empty(),
        "console went to the file: {}",
        run.describe()
    );
    let log = std::fs::read_to_string(&console).expect("console file");
    assert!(log.contains(&format!("cmdline: {cmdline}")), "{log}");
    let report: vmm_api::ExitReport =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
    assert_eq!(report.reason, ExitReason::PowerOff);
}

#[test]
fn disks_attach_and_bad_disks_are_clear_errors() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).expect("write");
    let k = test_guest::elf_path().to_str().expect("utf-8");
    let disk = format!("path={},format=raw,serial=reddog-os", raw.display());
    let ro = format!("path={},format=raw,ro,serial=reddog-role", raw.display());
    let cmdline = acpi_no_smp().to_string();
    let run = vmm(&[
        "--kernel",
        k,
        "--cmdline",
        &cmdline,
        "--disk",
        &disk,
        "--disk",
        &ro,
    ]);
    assert_eq!(run.status, 0, "{}", run.describe());

    // A raw file opened as qcow2 (formats are never guessed): a clear error.
    let wrong = format!("path={},format=qcow2", raw.display());
    let run = vmm(&["--kernel", k, "--disk", &wrong]);
    assert_eq!(run.status, 1, "{}", run.describe());
    assert!(
        run.stderr.contains("cannot open disk"),
        "{}",
        run.describe()
    );

    let missing = format!("path={}/nope,format=raw", dir.path().display());
    let run = vmm(&["--kernel", k, "--disk", &missing]);
    assert_eq!(run.status, 1, "{}", run.describe());

    let run = vmm(&["--kernel", k, "--disk", &format!("path={}", raw.display())]);
    assert_eq!(run.status, 2, "no format: usage error: {}", run.describe());
    assert!(run.stderr.contains("never guessed"), "{}", run.describe());
}

#[test]
fn virtio_mmio_devices_can_be_listed_on_the_command_line() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).expect("write");
    let k = test_guest::elf_path().to_str().expect("utf-8");
    let disk = format!("path={},format=raw", raw.display());
    // The second attachment is read-only: a disk is writable through one open only.
    let disk_ro = format!("{disk},ro");
    let cmdline = acpi_no_smp().to_string();
    let run = vmm(&[
        "--kernel",
        k,
        "--cmdline",
        &cmdline,
        "--disk",
        &disk,
        "--disk",
        &disk_ro,
        "--virtio-mmio-cmdline",
    ]);
    assert_eq!(run.status, 0, "{}", run.describe());
    // The two disks' windows and lines, as the platform layout places them.
    let listed: Vec<String> = (0..2)
        .map(|i| {
            let w = mmio::window(i).expect("in the layout");
            format!("virtio_mmio.device=4K@{:#x}:{}", w.addr, w.gsi)
        })
        .collect();
    let want = format!("{cmdline} {}", listed.join(" "));
    assert_eq!(
        run.line("cmdline"),
        Some(want.as_str()),
        "{}",
        run.describe()
    );
    // Without the flag the command line is left alone.
    let run = vmm(&["--kernel", k, "--cmdline", &cmdline, "--disk", &disk]);
    assert_eq!(
        run.line("cmdline"),
        Some(cmdline.as_str()),
        "{}",
        run.describe()
    );
}
