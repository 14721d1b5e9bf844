//! Two VMMs over the same writable disk: the second refuses to start (set-up error, exit
//! status 1, a message naming the lock) while the first keeps running. The lock is the
//! disk layer's (`vhd`, see `docs/disks.md`), the last line of defence whatever the agent
//! believes.

mod common;

use common::{require_kvm, vmm};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn a_second_vmm_over_the_same_writable_disk_refuses_to_start() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let k = test_guest::elf_path().to_str().expect("utf-8 path");
    for format in ["raw", "qcow2", "vhd"] {
        let img = dir.path().join(format!("disk.{format}"));
        let fmt: vhd::Format = format.parse().expect("format");
        vhd::create(&img, fmt, &vhd::CreateOptions::new(1 << 20)).expect("create disk");
        let disk = format!("path={},format={format}", img.display());
        let args = [
            "--kernel",
            k,
            "--cmdline",
            "exit=hang smp=0",
            "--timeout-ms",
            "30000",
            "--disk",
            &disk,
        ];
        let mut first = Command::new(env!("CARGO_BIN_EXE_reddog-vmm"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the first reddog-vmm");
        // Disks are opened before the guest runs: once it prints, the lock is held.
        let mut out = BufReader::new(first.stdout.take().expect("stdout"));
        let mut line = String::new();
        let n = out
            .read_line(&mut line)
            .expect("read the first VMM's console");
        assert!(
            n > 0,
            "{format}: the first VMM ended before its guest printed"
        );

        let second = vmm(&args);
        let still_running = first.try_wait().expect("try_wait").is_none();
        let _ = first.kill();
        let _ = first.wait();
        assert_eq!(second.status, 1, "{format}: {}", second.describe());
        assert!(
            second
                .stderr
                .contains("is in use by another process (locked)"),
            "{format}: {}",
            second.describe()
        );
        assert!(still_running, "{format}: the first VMM stopped");
    }
}
