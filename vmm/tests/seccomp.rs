//! The seccomp filters of a running `reddog-vmm`, seen from `/proc`: with a
//! disk, vsock and the control socket (a client connected), every thread is in
//! seccomp filter mode (`Seccomp: 2`) with `no_new_privs`; with `--no-seccomp`
//! none is, and the VMM says so. KVM test: fails without /dev/kvm.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_kvm, Cmdline, Exit};
use vmm_api::control::{Client, Op, ShutdownMode, ShutdownReply};
use vmm_api::ExitReason;

const TIMEOUT: Duration = Duration::from_secs(20);

/// A VMM with one of each thread kind: vCPUs, a disk's and vsock's I/O
/// threads, the control socket's threads.
struct Vm {
    child: Child,
    sock: PathBuf,
    report: PathBuf,
    _dir: tempfile::TempDir,
}

impl Vm {
    fn start(extra: &[&str]) -> Self {
        require_kvm();
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("d.raw");
        std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
        let sock = dir.path().join("api.sock");
        let report = dir.path().join("report.json");
        let cmdline = Cmdline::new().exit(Exit::Hang).vsock_for_disks(1);
        let child = Command::new(env!("CARGO_BIN_EXE_reddog-vmm"))
            .args(["--kernel", test_guest::elf_path().to_str().expect("utf-8")])
            .args(["--cmdline", &cmdline.to_string(), "--serial", "null"])
            .args(["--vcpus", "2"])
            .arg("--disk")
            .arg(format!("path={},format=raw", disk.display()))
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", dir.path().join("v.sock").display()))
            .arg("--api-sock")
            .arg(&sock)
            .arg("--exit-report")
            .arg(&report)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn reddog-vmm");
        let vm = Self {
            child,
            sock,
            report,
            _dir: dir,
        };
        let deadline = Instant::now() + TIMEOUT;
        while UnixStream::connect(&vm.sock).is_err() {
            assert!(Instant::now() < deadline, "no control socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        vm
    }

    fn client(&self) -> Client {
        let c = Client::connect(&self.sock).expect("connect");
        c.set_timeout(Some(TIMEOUT)).expect("timeout");
        c
    }

    /// Stops the VM through the socket; returns its stderr.
    fn stop(mut self) -> String {
        let reply: ShutdownReply = self
            .client()
            .call(Op::Shutdown {
                mode: ShutdownMode::Force,
            })
            .expect("shutdown");
        assert_eq!(reply.mode, ShutdownMode::Force);
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "reddog-vmm did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let report: vmm_api::ExitReport = serde_json::from_str(
            std::fs::read_to_string(&self.report)
                .expect("report")
                .trim(),
        )
        .unwrap_or_else(|e| panic!("exit report: {e}; stderr: {stderr}"));
        assert_eq!(report.reason, ExitReason::Requested, "{stderr}");
        assert_eq!(
            status.code(),
            Some(report.exit_code),
            "{status:?}: {stderr}"
        );
        stderr
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One thread of a process, from `/proc/<pid>/task/<tid>/`.
#[derive(Debug)]
struct Thread {
    name: String,
    seccomp: String,
    filters: String,
    no_new_privs: String,
}

fn threads(pid: u32) -> Vec<Thread> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let dir = t.expect("task").path();
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue; // ended meanwhile
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        out.push(Thread {
            name: field("Name:"),
            seccomp: field("Seccomp:"),
            filters: field("Seccomp_filters:"),
            no_new_privs: field("NoNewPrivs:"),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Waits until the guest runs and a client's thread exists; returns the threads.
fn running_threads(vm: &Vm, client: &mut Client) -> Vec<Thread> {
    let deadline = Instant::now() + TIMEOUT;
    while client.info().expect("info").boot_time_us.is_none() {
        assert!(Instant::now() < deadline, "the guest did not boot");
        std::thread::sleep(Duration::from_millis(10));
    }
    let ts = threads(vm.child.id());
    let names: Vec<&str> = ts.iter().map(|t| t.name.as_str()).collect();
    for kind in [
        "reddog-vmm",
        "vcpu0",
        "vcpu1",
        "virtio-blk0",
        "virtio-vsock",
        "api",
        "api-events",
        "api-client",
    ] {
        assert!(names.contains(&kind), "no {kind} thread: {names:?}");
    }
    ts
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered_with_no_new_privs() {
    let vm = Vm::start(&[]);
    let mut client = vm.client();
    let mut ts = running_threads(&vm, &mut client);
    // The connection probe of `Vm::start` left an `api-client` thread that
    // may still be starting (one filter, its own not yet on) or ending.
    let deadline = Instant::now() + TIMEOUT;
    while ts
        .iter()
        .any(|t| t.name == "api-client" && t.filters != "2")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
        ts = running_threads(&vm, &mut client);
    }
    for t in &ts {
        assert_eq!(t.seccomp, "2", "{t:?} (all: {ts:#?})");
        assert_eq!(t.no_new_privs, "1", "{t:?}");
        // A client's thread starts under `api`'s filter and adds its own.
        let want = if t.name == "api-client" { "2" } else { "1" };
        assert_eq!(t.filters, want, "{t:?}");
    }
    // Pausing (kicks: a signal to each vCPU thread) and resuming still work.
    client.call::<serde_json::Value>(Op::Pause).expect("pause");
    client
        .call::<serde_json::Value>(Op::Resume)
        .expect("resume");
    drop(client);
    let stderr = vm.stop();
    assert!(!stderr.contains("seccomp"), "{stderr}");
}

#[test]
fn no_seccomp_leaves_every_thread_unfiltered_and_says_so() {
    let vm = Vm::start(&["--no-seccomp"]);
    let mut client = vm.client();
    let ts = running_threads(&vm, &mut client);
    for t in &ts {
        assert_eq!(t.seccomp, "0", "{t:?}");
    }
    drop(client);
    let stderr = vm.stop();
    assert!(
        stderr.contains("WARN") && stderr.contains("--no-seccomp"),
        "{stderr}"
    );
}
