//! A jailed `reddog-vmm` on this host's KVM (root, cgroup v1): what `/proc`
//! says about it (uid, gid, namespaces, root, capabilities, no_new_privs,
//! rlimits, environment, cgroup limits), that its guest boots and exits
//! normally, that uid 0 is refused, and that the cleanup removes the jail
//! directory and the cgroup.
//!
//! KVM tests: they fail, never skip, without /dev/kvm.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use jailer::{CgroupConfig, Layout};
use testkit::kvm::require_kvm;
use testkit::test_guest::{Cmdline, Exit};
use vmm_api::{DiskConfig, DiskFormat, SerialOutput, VmConfig, VsockConfig};

const MEMORY_MIB: u32 = 32;
const OVERHEAD_MIB: u64 = 96;
const PIDS_MAX: u64 = 40;

/// One VM's files and its jail settings, in a fresh temporary directory.
struct Setup {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    id: String,
    uid: u32,
    config: PathBuf,
    vmm: PathBuf,
    serial: PathBuf,
    cgroup_parent: String,
}

impl Setup {
    fn new(tag: &str, cmdline: &Cmdline) -> Self {
        require_kvm();
        let vmm = testkit::artifacts::static_vmm().expect("build a static reddog-vmm");
        let tmp = tempfile::Builder::new()
            .prefix("rdg-jail")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let files = tmp.path().join("files");
        std::fs::create_dir(&files).expect("mkdir");
        let base = tmp.path().join("j");
        let id = format!("{tag}-{}", std::process::id());
        let layout = Layout::new(&base, &id, None);
        // A writable and a read-only disk.
        let rw = files.join("rw.raw");
        std::fs::write(&rw, vec![0u8; 1 << 20]).expect("disk");
        let ro = files.join("ro.raw");
        std::fs::write(&ro, vec![0u8; 1 << 20]).expect("disk");
        let serial = files.join("serial.log");
        let mut vm = VmConfig::new(test_guest::elf_path());
        vm.cmdline = cmdline.to_string();
        vm.memory_mib = MEMORY_MIB;
        vm.vcpus = 2;
        vm.serial = SerialOutput::File(serial.clone());
        for (path, read_only) in [(&rw, false), (&ro, true)] {
            vm.disks.push(DiskConfig {
                path: path.clone(),
                format: DiskFormat::Raw,
                backing: None,
                read_only,
                serial: String::new(),
                rate_limit: None,
            });
        }
        vm.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: layout.run_dir.join("v.sock"),
        });
        vm.api_sock = Some(layout.run_dir.join("api.sock"));
        let config = files.join("vm.json");
        std::fs::write(&config, serde_json::to_vec(&vm).expect("json")).expect("config");
        // A uid of its own per test process.
        let uid = 3_000_000 + std::process::id() % 100_000 * 4 + tag.len() as u32 % 4;
        Self {
            base,
            id,
            uid,
            config,
            vmm,
            serial,
            cgroup_parent: format!("reddog-test-{}", std::process::id()),
            _tmp: tmp,
        }
    }

    fn layout(&self) -> Layout {
        Layout::new(&self.base, &self.id, None)
    }

    fn cgroup(&self) -> CgroupConfig {
        CgroupConfig {
            parent: self.cgroup_parent.clone().into(),
            vmm_overhead_mib: OVERHEAD_MIB,
            pids_max: PIDS_MAX,
            ..CgroupConfig::default()
        }
    }

    fn jailer(&self, uid: u32) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_reddog-jailer"));
        c.arg("--id")
            .arg(&self.id)
            .arg("--uid")
            .arg(uid.to_string())
            .arg("--gid")
            .arg(uid.to_string())
            .arg("--base")
            .arg(&self.base)
            .arg("--vmm")
            .arg(&self.vmm)
            .arg("--config")
            .arg(&self.config)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .arg("--vmm-overhead-mib")
            .arg(OVERHEAD_MIB.to_string())
            .arg("--pids-max")
            .arg(PIDS_MAX.to_string())
            .args(["--nofile", "300", "--fsize-mib", "70", "--nproc", "50"]);
        c
    }

    /// Starts the jailed VMM; its host pid.
    fn start(&self) -> i32 {
        // Standard error (the VMM's log too, which outlives the jailer) to a
        // file; standard output carries only the pid line.
        let log = self.config.with_file_name("vmm.log");
        let out = self
            .jailer(self.uid)
            .stderr(std::fs::File::create(&log).expect("log"))
            .output()
            .expect("run reddog-jailer");
        assert!(
            out.status.success(),
            "jailer failed: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let (pid, start) = self.layout().read_pid_file().expect("pid file");
        assert_eq!(
            printed,
            format!("{pid} {start}"),
            "the jailer prints the pid"
        );
        assert!(start > 0);
        pid
    }

    fn remove(&self) {
        jailer::remove(&self.base, &self.id, &self.cgroup()).expect("remove the jail");
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some((pid, _)) = self.layout().read_pid_file() {
            kill9(pid);
            wait_gone(pid);
        }
        let _ = jailer::remove(&self.base, &self.id, &self.cgroup());
        for c in ["cpu", "memory", "pids"] {
            let _ = std::fs::remove_dir(
                Path::new("/sys/fs/cgroup")
                    .join(c)
                    .join(&self.cgroup_parent),
            );
        }
    }
}

fn kill9(pid: i32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Gone or a zombie.
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|st| st == "Z" || st == "X"),
    }
}

fn wait_gone(pid: i32) {
    let t = Instant::now();
    while !gone(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "pid {pid} still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_field(pid: i32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn limit(pid: i32, name: &str) -> (String, String) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let l = s
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in limits"));
    let f: Vec<&str> = l[name.len()..].split_whitespace().collect();
    (f[0].to_string(), f[1].to_string())
}

/// The process's cgroup path in the v1 hierarchy of `controller`.
fn cgroup_of(pid: i32, controller: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    s.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
            ctl.split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        })
        .unwrap_or_else(|| panic!("no {controller} cgroup for {pid}"))
}

fn read_trim(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

#[test]
fn a_jailed_vmm_runs_as_its_own_uid_in_new_namespaces_with_no_privileges_and_limits() {
    let s = Setup::new("proc", &Cmdline::new().quiet().exit(Exit::Hang).no_smp());
    let pid = s.start();

    let ids = format!("{0}\t{0}\t{0}\t{0}", s.uid);
    assert_eq!(status_field(pid, "Uid"), ids);
    assert_eq!(status_field(pid, "Gid"), ids);
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, cap), "0000000000000000", "{cap}");
    }
    // pid 1 of its own pid namespace.
    assert_eq!(status_field(pid, "NSpid"), format!("{pid}\t1"));
    for ns in ["mnt", "pid", "ipc", "uts"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns");
        let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("ns");
        assert_ne!(mine, its, "{ns} namespace shared with the host");
    }
    // Not asked for a network namespace: it shares the host's.
    assert_eq!(
        std::fs::read_link("/proc/self/ns/net").expect("ns"),
        std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns")
    );

    // Its root holds only the jail's files.
    let root: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .expect("its root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> = [
        "dev",
        "disk0",
        "disk1",
        "kernel",
        "reddog-vmm",
        "run",
        "serial.log",
        "vm.json",
    ]
    .map(String::from)
    .into();
    assert_eq!(root, want);
    let dev: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/dev"))
        .expect("dev")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dev, vec!["kvm".to_string()]);
    let jailed: VmConfig = serde_json::from_slice(
        &std::fs::read(format!("/proc/{pid}/root/vm.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(jailed.kernel, Path::new("/kernel"));
    assert_eq!(jailed.api_sock.as_deref(), Some(Path::new("/run/api.sock")));
    assert!(jailed.disks[1].read_only);
    // The read-only disk is mounted read-only (the root too).
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).expect("mounts");
    let opts = |mp: &str| {
        mounts
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(mp))
            .unwrap_or_else(|| panic!("{mp} not mounted: {mounts}"))
            .split_whitespace()
            .nth(3)
            .unwrap_or_default()
            .to_string()
    };
    assert!(opts("/disk1").starts_with("ro,"), "{}", opts("/disk1"));
    assert!(opts("/disk0").starts_with("rw,"), "{}", opts("/disk0"));
    assert!(opts("/").starts_with("ro,"), "{}", opts("/"));
    // The control socket is reachable on the host, in the run directory.
    let sock = s.layout().run_dir.join("api.sock");
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = vmm_api::control::Client::connect(&sock).expect("connect");
    c.metrics().expect("metrics over the jailed control socket");

    assert_eq!(limit(pid, "Max open files"), ("300".into(), "300".into()));
    let fsize = (70u64 << 20).to_string();
    assert_eq!(limit(pid, "Max file size"), (fsize.clone(), fsize));
    assert_eq!(limit(pid, "Max processes"), ("50".into(), "50".into()));
    assert!(
        std::fs::read(format!("/proc/{pid}/environ"))
            .expect("environ")
            .is_empty(),
        "the environment is cleared"
    );

    let want_cg = format!("/{}/{}", s.cgroup_parent, s.id);
    let root = Path::new("/sys/fs/cgroup");
    for c in ["memory", "pids", "cpu"] {
        assert_eq!(cgroup_of(pid, c), want_cg, "{c}");
    }
    let cg = |c: &str, f: &str| read_trim(&root.join(c).join(&want_cg[1..]).join(f));
    assert_eq!(
        cg("memory", "memory.limit_in_bytes"),
        ((u64::from(MEMORY_MIB) + OVERHEAD_MIB) << 20).to_string()
    );
    assert_eq!(cg("pids", "pids.max"), PIDS_MAX.to_string());
    assert_eq!(cg("cpu", "cpu.cfs_period_us"), "100000");
    assert_eq!(cg("cpu", "cpu.cfs_quota_us"), "200000", "two vCPUs");

    // kill -9 of the VMM ends it; the cleanup removes the jail and cgroup.
    kill9(pid);
    wait_gone(pid);
    s.remove();
    assert!(!s.layout().dir.exists(), "the jail directory is removed");
    for c in ["memory", "pids", "cpu"] {
        assert!(
            !root.join(c).join(&want_cg[1..]).exists(),
            "the {c} cgroup is removed"
        );
    }
}

#[test]
fn the_guest_boots_and_exits_normally_in_the_jail() {
    let s = Setup::new("boot", &Cmdline::new().exit_acpi().no_smp());
    let pid = s.start();
    wait_gone(pid);
    let report = std::fs::read_to_string(s.layout().exit_report()).expect("exit report");
    let report: vmm_api::ExitReport = serde_json::from_str(report.trim()).expect("report json");
    assert_eq!(report.reason, vmm_api::ExitReason::PowerOff, "{report:?}");
    let serial = std::fs::read_to_string(&s.serial).expect("serial log");
    assert!(serial.contains("reddog-test-guest: hello"), "{serial}");
    assert!(serial.contains("exit: acpi"), "{serial}");
    s.remove();
    assert!(!s.layout().dir.exists());
}

#[test]
fn uid_or_gid_0_is_refused() {
    let s = Setup::new("root", &Cmdline::new().exit_acpi().no_smp());
    for (uid, gid) in [(0, s.uid), (s.uid, 0)] {
        let out = s
            .jailer(uid)
            .args(["--gid", &gid.to_string()])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("never runs as root"), "{err}");
        assert!(s.layout().read_pid_file().is_none(), "no VMM started");
    }
}
