//! The process-backed [`VmmLauncher`]: one `reddog-vmm` child per instance,
//! configured with a `VmConfig` JSON file, watched with `wait` (own children)
//! or by polling the pid and its start time (VMMs re-adopted after an agent
//! restart, which are not our children).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use rustix::process::{Pid, Signal};
use vmm_api::{BootProtocol, ExitReport, SerialOutput, VmConfig};

use super::control::ControlConn;
use super::vmm::{
    JailRecord, LaunchSpec, StopMode, VmmError, VmmEvents, VmmExit, VmmHandle, VmmLauncher,
    VmmRecord, VmmView,
};
use vmm_api::control::Op;

/// The default guest kernel command line: the serial console, ACPI reboot, a
/// panic resets the VM, and `reddog.agent_port=` tells `reddog-guest` the host
/// vsock port it connects to (`docs/guest-agent.md`).
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=acpi panic=-1 quiet reddog.agent_port={vsock_port}";

/// How to run `reddog-vmm`.
#[derive(Debug, Clone)]
pub struct ProcessLauncherConfig {
    /// The `reddog-vmm` binary.
    pub vmm_binary: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The initramfs (with `reddog-guest` as `/init`).
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `{vsock_port}` and `{instance_id}` are replaced.
    pub cmdline: String,
    /// How to enter the kernel.
    pub boot_protocol: BootProtocol,
    /// Give the VMM a control socket (`<dir>/api.sock`): the agent pauses
    /// and resumes through it, follows its events, and graceful stops press
    /// the guest's ACPI power button through it before any signal.
    pub control_socket: bool,
    /// With a control socket: build the VM held (`boot_on_request`); the
    /// agent subscribes to its events and stores its record, then
    /// [`VmmHandle::boot`] starts the guest, so no event (the boot timer) is
    /// missed and no guest runs that the agent has not recorded.
    pub boot_on_request: bool,
    /// Run every VMM through `reddog-jailer` (`None`: as the agent's own
    /// child, unconfined; tests with stand-in VMMs only).
    pub jail: Option<JailSettings>,
}

/// How the launcher jails its VMMs (`docs/isolation.md`, "The jail").
#[derive(Debug, Clone)]
pub struct JailSettings {
    /// The `reddog-jailer` binary.
    pub jailer: PathBuf,
    /// The jails' base directory (`<base>/<instance>`).
    pub base: PathBuf,
    /// The first uid (and gid) handed to a VMM.
    pub first_uid: u32,
    /// How many uids the range holds (one per live instance).
    pub uid_count: u32,
    /// The cgroup root, parent, VMM memory overhead and pids limit.
    pub cgroup: jailer::CgroupConfig,
    /// The VMMs' rlimits.
    pub rlimits: jailer::Rlimits,
    /// The uid each instance has (shared by clones of these settings).
    uids: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u32>>>,
}

/// The default first uid of the VMMs' range.
pub const DEFAULT_FIRST_UID: u32 = 10_000_000;
/// The default size of the VMMs' uid range.
pub const DEFAULT_UID_COUNT: u32 = 1_000_000;

impl JailSettings {
    /// Defaults but for the jailer binary and the base directory.
    pub fn new(jailer: impl Into<PathBuf>, base: impl Into<PathBuf>) -> Self {
        Self {
            jailer: jailer.into(),
            base: base.into(),
            first_uid: DEFAULT_FIRST_UID,
            uid_count: DEFAULT_UID_COUNT,
            cgroup: jailer::CgroupConfig::default(),
            rlimits: jailer::Rlimits::default(),
            uids: Default::default(),
        }
    }

    fn uids(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, u32>> {
        self.uids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Instance `id`'s uid: the one it has, or the lowest free one.
    fn allocate(&self, id: &str) -> Option<u32> {
        let mut uids = self.uids();
        if let Some(u) = uids.get(id) {
            return Some(*u);
        }
        let used: std::collections::BTreeSet<u32> = uids.values().copied().collect();
        let end = self.first_uid.saturating_add(self.uid_count);
        let free = (self.first_uid.max(1)..end).find(|u| !used.contains(u))?;
        uids.insert(id.to_owned(), free);
        Some(free)
    }

    /// The uid a re-adopted VMM of instance `id` runs as.
    fn keep(&self, id: &str, uid: u32) {
        self.uids().insert(id.to_owned(), uid);
    }
}

impl ProcessLauncherConfig {
    /// Defaults: no initrd, a serial console command line, automatic entry.
    pub fn new(vmm_binary: impl Into<PathBuf>, kernel: impl Into<PathBuf>) -> Self {
        Self {
            vmm_binary: vmm_binary.into(),
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
            boot_protocol: BootProtocol::Auto,
            control_socket: true,
            boot_on_request: true,
            jail: None,
        }
    }
}

/// Spawns `reddog-vmm` processes.
#[derive(Debug, Clone)]
pub struct ProcessLauncher {
    cfg: ProcessLauncherConfig,
}

impl ProcessLauncher {
    /// A launcher with this configuration.
    pub fn new(cfg: ProcessLauncherConfig) -> Self {
        Self { cfg }
    }

    /// The `VmConfig` for an instance.
    pub fn vm_config(&self, spec: &LaunchSpec) -> VmConfig {
        let mut c = VmConfig::new(self.cfg.kernel.clone());
        c.boot_protocol = self.cfg.boot_protocol;
        c.cmdline = self
            .cfg
            .cmdline
            .replace("{vsock_port}", &spec.guest_port.to_string())
            .replace("{instance_id}", &spec.instance_id);
        c.initrd = self.cfg.initrd.clone();
        c.vcpus = spec.vcpus;
        c.memory_mib = spec.memory_mib;
        c.serial = SerialOutput::File(spec.serial_path.clone());
        c.disks = spec.disks.clone();
        c.vsock = Some(spec.vsock.clone());
        c.net = spec.net.iter().cloned().collect();
        c
    }
}

/// What `/proc` says about a pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessState {
    /// Running (or stopped, sleeping, ...), started at this time
    /// (`/proc/<pid>/stat` field 22, clock ticks after boot).
    Alive {
        /// Its start time: tells it apart from a later process with its pid.
        start_time: u64,
    },
    /// No such process (`ENOENT`, `ESRCH`), or a zombie: it has exited.
    Gone,
    /// `/proc` could not be read for another reason (`EMFILE`, `ENFILE`,
    /// `ENOMEM`, an unparsable line, ...): it may well still run. Never a
    /// reason to think it exited; check again later.
    Unknown(String),
}

impl ProcessState {
    /// Whether this is the process that started at `start_time`: `Some(true)`
    /// alive with that start time, `Some(false)` gone or another process
    /// with its pid, `None` unknown.
    pub fn is(&self, start_time: u64) -> Option<bool> {
        match self {
            Self::Alive { start_time: t } => Some(*t == start_time),
            Self::Gone => Some(false),
            Self::Unknown(_) => None,
        }
    }
}

/// Reads a process's state and start time from `/proc/<pid>/stat`. Only
/// `ENOENT`/`ESRCH` (and a zombie) mean it is gone; any other error (a full
/// fd table first of all) is [`ProcessState::Unknown`].
pub fn process_start_time(pid: i32) -> ProcessState {
    process_state_from(std::fs::read_to_string(format!("/proc/{pid}/stat")))
}

/// [`process_start_time`] given the result of reading `/proc/<pid>/stat`.
fn process_state_from(read: std::io::Result<String>) -> ProcessState {
    let stat = match read {
        Ok(s) => s,
        Err(e) if is_gone(&e) => return ProcessState::Gone,
        Err(e) => return ProcessState::Unknown(format!("cannot read /proc: {e}")),
    };
    let unknown = || ProcessState::Unknown(format!("unexpected /proc stat line {stat:?}"));
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let Some(rest) = stat.rfind(')').and_then(|i| stat.get(i + 1..)) else {
        return unknown();
    };
    let mut fields = rest.split_whitespace();
    let Some(state) = fields.next() else {
        return unknown();
    };
    if state == "Z" || state == "X" {
        return ProcessState::Gone;
    }
    match fields.nth(18).and_then(|t| t.parse().ok()) {
        Some(start_time) => ProcessState::Alive { start_time },
        None => unknown(),
    }
}

/// `ENOENT` or `ESRCH`: the process (or its `/proc` entry) is gone.
fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(c) if c == rustix::io::Errno::NOENT.raw_os_error()
            || c == rustix::io::Errno::SRCH.raw_os_error()
    )
}

/// How often a check whose answer was [`ProcessState::Unknown`] is repeated.
const UNKNOWN_RETRY: Duration = Duration::from_millis(100);
/// How long [`ProcessHandle::stop`] and [`ProcessLauncher::launch`] retry
/// an unknown answer before giving up on their step (never on the VMM).
const UNKNOWN_PATIENCE: Duration = Duration::from_secs(3);

/// [`process_start_time`] until it answers, for at most `patience`; the
/// last answer (maybe still unknown).
async fn probe_patiently(pid: i32, patience: Duration) -> ProcessState {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let st = process_start_time(pid);
        if !matches!(st, ProcessState::Unknown(_)) || tokio::time::Instant::now() >= deadline {
            return st;
        }
        tokio::time::sleep(UNKNOWN_RETRY).await;
    }
}

/// How long a new VMM has to make its control socket.
const CONTROL_CONNECT_NEW: Duration = Duration::from_secs(10);
/// How long an adopted VMM's control socket is tried (it exists already).
const CONTROL_CONNECT_ADOPTED: Duration = Duration::from_secs(1);
/// How long the VMM may take to answer `shutdown acpi`.
const ACPI_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a pause or resume may take: longer than the VMM's own 5 s limit
/// for parking every vCPU, so its answer (success or failure) comes first.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(8);

/// How long `info` or `metrics` may take.
const INSPECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How often an adopted VMM (not our child: no `wait`) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(250);

fn read_report(path: &Path) -> Option<ExitReport> {
    let text = std::fs::read_to_string(path).ok()?;
    // The report is one JSON line; take the last non-empty one.
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    serde_json::from_str(line).ok()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VmmError + '_ {
    move |source| VmmError::Io {
        path: path.to_owned(),
        source,
    }
}

#[async_trait]
impl VmmLauncher for ProcessLauncher {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn VmmHandle>, VmmError> {
        if let Some(j) = &self.cfg.jail {
            return self.launch_jailed(spec, j).await;
        }
        let mut cfg = self.vm_config(spec);
        let control_socket = self.cfg.control_socket.then(|| spec.dir.join("api.sock"));
        cfg.api_sock = control_socket.clone();
        cfg.boot_on_request = control_socket.is_some() && self.cfg.boot_on_request;
        cfg.validate().map_err(|e| VmmError::Spawn {
            instance: spec.instance_id.clone(),
            why: format!("invalid VM config: {e}"),
        })?;
        let config_path = spec.dir.join("vm.json");
        crate::util::write_json_atomic(&config_path, &cfg).map_err(io_err(&config_path))?;
        let exit_report = spec.dir.join("exit-report.json");
        let _ = std::fs::remove_file(&exit_report);
        // The VMM binds the vsock socket itself; a stale one from an earlier run
        // would make it fail.
        let _ = std::fs::remove_file(&spec.vsock.uds_path);
        let log_path = spec.dir.join("vmm.log");
        use std::os::unix::fs::OpenOptionsExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        let log2 = log.try_clone().map_err(io_err(&log_path))?;
        let mut cmd = tokio::process::Command::new(&self.cfg.vmm_binary);
        cmd.arg("--config")
            .arg(&config_path)
            .arg("--exit-report")
            .arg(&exit_report);
        if let Some(sock) = &control_socket {
            let _ = std::fs::remove_file(sock);
        }
        // Own process group: a Ctrl-C to the agent must not reach the VMs, and
        // the VMs outlive the agent (no kill_on_drop).
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| VmmError::Spawn {
            instance: spec.instance_id.clone(),
            why: format!("{}: {e}; check --vmm-binary", self.cfg.vmm_binary.display()),
        })?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| VmmError::Spawn {
                instance: spec.instance_id.clone(),
                why: "the VMM exited before its pid could be read".into(),
            })?;
        let start_time = match probe_patiently(pid, UNKNOWN_PATIENCE).await {
            ProcessState::Alive { start_time } => start_time,
            // Exited already: `wait` reports how.
            ProcessState::Gone => 0,
            ProcessState::Unknown(why) => {
                // Without its start time a restarted agent could not tell it
                // from another process with its pid: not a VMM to keep.
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(VmmError::Spawn {
                    instance: spec.instance_id.clone(),
                    why: format!(
                        "cannot read the new VMM's start time ({why}), so it was stopped; \
                         check the agent's open-file limit (RLIMIT_NOFILE)"
                    ),
                });
            }
        };
        tracing::info!(instance = %spec.instance_id, pid, "spawned reddog-vmm");
        let control = control_socket
            .clone()
            .map(|s| ControlConn::spawn(s, CONTROL_CONNECT_NEW));
        Ok(Box::new(ProcessHandle {
            pid,
            start_time,
            exit_report,
            control_socket,
            control,
            held: cfg.boot_on_request,
            adopted: false,
            child: Some(child),
            jail: None,
            exited: None,
        }))
    }

    async fn recover(&self, spec: &LaunchSpec) -> Option<VmmRecord> {
        if let Some(j) = &self.cfg.jail {
            return self.recover_jailed(spec, j).await;
        }
        // An unknown answer is asked again until it is known: "none found"
        // here starts a VMM over the disks the unrecorded one may be using.
        let mut wait = UNKNOWN_RETRY;
        let mut warned = false;
        loop {
            let bin = self.cfg.vmm_binary.clone();
            let config = spec.dir.join("vm.json");
            let found = tokio::task::spawn_blocking(move || find_vmm_process(&bin, &config))
                .await
                .unwrap_or_else(|e| Lookup::Unknown(format!("the /proc scan failed: {e}")));
            match found {
                Lookup::Found { pid, start_time } => {
                    return Some(VmmRecord {
                        pid,
                        start_time,
                        control_socket: self.cfg.control_socket.then(|| spec.dir.join("api.sock")),
                        exit_report: spec.dir.join("exit-report.json"),
                        jail: None,
                    })
                }
                Lookup::NotFound => return None,
                Lookup::Unknown(why) => {
                    if !warned {
                        tracing::warn!(
                            instance = %spec.instance_id,
                            "cannot tell whether an unrecorded VMM runs ({why}); \
                             no VMM is started until that is known; retrying"
                        );
                        warned = true;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn adopt(
        &self,
        spec: &LaunchSpec,
        record: &VmmRecord,
    ) -> Result<Box<dyn VmmHandle>, VmmError> {
        let pid = record.pid;
        if let (Some(j), Some(r)) = (&self.cfg.jail, &record.jail) {
            j.keep(&spec.instance_id, r.uid);
        }
        let gone = |why: &str| VmmError::Gone {
            pid,
            why: why.into(),
        };
        if Pid::from_raw(pid).is_none() {
            return Err(gone("not a valid pid"));
        }
        // The pid alone could be reused by another process: the start time
        // tells them apart.
        match probe_patiently(pid, CONTROL_CONNECT_ADOPTED).await {
            ProcessState::Alive { start_time } if start_time == record.start_time => {}
            ProcessState::Alive { .. } => {
                return Err(gone("the pid now belongs to another process"))
            }
            ProcessState::Gone => return Err(gone("no such process")),
            // Not known to be gone: still ours. `wait` keeps checking and
            // `stop` signals only once the pid is confirmed to be this VMM.
            ProcessState::Unknown(why) => tracing::warn!(
                pid,
                "cannot check that the recorded VMM still runs ({why}); \
                 adopting it as running and checking again"
            ),
        }
        let control = record
            .control_socket
            .clone()
            .map(|s| ControlConn::spawn(s, CONTROL_CONNECT_ADOPTED));
        Ok(Box::new(ProcessHandle {
            pid,
            start_time: record.start_time,
            exit_report: record.exit_report.clone(),
            control_socket: record.control_socket.clone(),
            // Maybe held: an agent that died between spawning it and booting
            // it. `boot` finds out (a booted VM answers `invalid_state`).
            held: control.is_some(),
            adopted: true,
            control,
            child: None,
            jail: record.jail.clone(),
            exited: None,
        }))
    }

    fn remove(&self, spec: &LaunchSpec) {
        let Some(j) = &self.cfg.jail else {
            return;
        };
        // The VMM has exited; its cgroup empties as it is reaped (the
        // removal waits up to a second for that).
        if let Err(e) = jailer::remove(&j.base, &spec.instance_id, &j.cgroup) {
            tracing::warn!(instance = %spec.instance_id, "cannot remove the jail: {e}");
        }
        j.uids().remove(&spec.instance_id);
    }
}

/// How long `reddog-jailer` may take to start a VMM and print its pid.
const JAIL_START: Duration = Duration::from_secs(20);

/// The last lines of a log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(600);
    let tail = String::from_utf8_lossy(&text[start..]);
    let lines: Vec<&str> = tail.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

impl ProcessLauncher {
    /// The run directory of a jailed VMM: the directory of its vsock socket
    /// (the agent gives every instance its own, `<state>/run/<id>`).
    fn run_dir(spec: &LaunchSpec) -> Result<PathBuf, VmmError> {
        spec.vsock
            .uds_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty() && *p != spec.dir)
            .map(Path::to_owned)
            .ok_or_else(|| VmmError::Spawn {
                instance: spec.instance_id.clone(),
                why: format!(
                    "a jailed VMM's vsock socket {} needs a directory of its own \
                     (not the instance directory)",
                    spec.vsock.uds_path.display()
                ),
            })
    }

    async fn launch_jailed(
        &self,
        spec: &LaunchSpec,
        j: &JailSettings,
    ) -> Result<Box<dyn VmmHandle>, VmmError> {
        use tokio::io::AsyncBufReadExt;
        let spawn_err = |why: String| VmmError::Spawn {
            instance: spec.instance_id.clone(),
            why,
        };
        let run_dir = Self::run_dir(spec)?;
        std::fs::create_dir_all(&run_dir).map_err(io_err(&run_dir))?;
        let mut cfg = self.vm_config(spec);
        let control_socket = self.cfg.control_socket.then(|| run_dir.join("api.sock"));
        cfg.api_sock = control_socket.clone();
        cfg.boot_on_request = control_socket.is_some() && self.cfg.boot_on_request;
        cfg.validate()
            .map_err(|e| spawn_err(format!("invalid VM config: {e}")))?;
        let config_path = spec.dir.join("vm.json");
        crate::util::write_json_atomic(&config_path, &cfg).map_err(io_err(&config_path))?;
        let _ = std::fs::remove_file(&spec.vsock.uds_path);
        if let Some(sock) = &control_socket {
            let _ = std::fs::remove_file(sock);
        }
        let layout = jailer::Layout::new(&j.base, &spec.instance_id, Some(&run_dir));
        let log_path = spec.dir.join("vmm.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(&log_path))?;
        let uid = j.allocate(&spec.instance_id).ok_or_else(|| {
            spawn_err(format!(
                "no free uid in the jail range {}..{}; widen it",
                j.first_uid,
                j.first_uid.saturating_add(j.uid_count)
            ))
        })?;
        let mut cmd = tokio::process::Command::new(&j.jailer);
        cmd.arg("--id")
            .arg(&spec.instance_id)
            .arg("--uid")
            .arg(uid.to_string())
            .arg("--gid")
            .arg(uid.to_string())
            .arg("--base")
            .arg(&j.base)
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--vmm")
            .arg(&self.cfg.vmm_binary)
            .arg("--config")
            .arg(&config_path)
            .arg("--cgroup-root")
            .arg(&j.cgroup.root)
            .arg("--cgroup-parent")
            .arg(&j.cgroup.parent)
            .arg("--vmm-overhead-mib")
            .arg(j.cgroup.vmm_overhead_mib.to_string())
            .arg("--pids-max")
            .arg(j.cgroup.pids_max.to_string())
            .arg("--nofile")
            .arg(j.rlimits.nofile.to_string())
            .arg("--nproc")
            .arg(j.rlimits.nproc.to_string())
            .arg("--wait");
        if let Some(f) = j.rlimits.fsize {
            cmd.arg("--fsize-mib").arg((f >> 20).max(1).to_string());
        }
        // The jailer stays as the VMM's parent and exits as it does: `wait`
        // on it tells how the VMM ended. Its own process group, outliving
        // the agent, as an unjailed VMM.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .map_err(|e| spawn_err(format!("{}: {e}; check --jailer", j.jailer.display())))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let mut out = tokio::io::BufReader::new(out);
            let _ = tokio::time::timeout(JAIL_START, out.read_line(&mut line)).await;
        }
        let mut it = line.split_whitespace();
        let parsed = it
            .next()
            .and_then(|p| p.parse::<i32>().ok())
            .zip(it.next().and_then(|t| t.parse::<u64>().ok()));
        let Some((pid, start_time)) = parsed else {
            let _ = child.start_kill();
            let status = child.wait().await;
            return Err(spawn_err(format!(
                "reddog-jailer did not start the VMM ({}): {}",
                status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                log_tail(&log_path)
            )));
        };
        tracing::info!(instance = %spec.instance_id, pid, uid, "spawned a jailed reddog-vmm");
        let control = control_socket
            .clone()
            .map(|s| ControlConn::spawn(s, CONTROL_CONNECT_NEW));
        Ok(Box::new(ProcessHandle {
            pid,
            start_time,
            exit_report: layout.exit_report(),
            control_socket,
            control,
            held: cfg.boot_on_request,
            adopted: false,
            child: Some(child),
            jail: Some(JailRecord {
                dir: layout.dir,
                uid,
            }),
            exited: None,
        }))
    }

    /// A jailed VMM whose record was never stored: the one its jail's pid
    /// file names, if it still runs.
    async fn recover_jailed(&self, spec: &LaunchSpec, j: &JailSettings) -> Option<VmmRecord> {
        let run_dir = Self::run_dir(spec).ok()?;
        let layout = jailer::Layout::new(&j.base, &spec.instance_id, Some(&run_dir));
        let (pid, start_time) = layout.read_pid_file()?;
        loop {
            match probe_patiently(pid, UNKNOWN_PATIENCE).await {
                ProcessState::Alive { start_time: t } if t == start_time => break,
                ProcessState::Alive { .. } | ProcessState::Gone => return None,
                ProcessState::Unknown(why) => tracing::warn!(
                    instance = %spec.instance_id,
                    "cannot tell whether the jailed VMM pid {pid} runs ({why}); retrying"
                ),
            }
        }
        let uid = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(format!("/proc/{pid}")).ok()?.uid()
        };
        Some(VmmRecord {
            pid,
            start_time,
            control_socket: self.cfg.control_socket.then(|| run_dir.join("api.sock")),
            exit_report: layout.exit_report(),
            jail: Some(JailRecord {
                dir: layout.dir,
                uid,
            }),
        })
    }
}

/// What a search of `/proc` for an unrecorded VMM found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lookup {
    /// This process.
    Found {
        /// Its pid.
        pid: i32,
        /// Its start time.
        start_time: u64,
    },
    /// No such process runs.
    NotFound,
    /// `/proc` could not be read through (e.g. `EMFILE`): one may run.
    Unknown(String),
}

/// The live process whose command line runs `binary` with `--config
/// <config>` (how [`ProcessLauncher::launch`] starts every VMM), owned by
/// this process's user and, when `binary` resolves, running that executable.
/// [`Lookup::NotFound`] only when every process could be checked.
fn find_vmm_process(binary: &Path, config: &Path) -> Lookup {
    use std::os::unix::fs::MetadataExt;
    let want_bin = binary.as_os_str().as_encoded_bytes();
    let want_cfg = config.as_os_str().as_encoded_bytes();
    let want_exe = std::fs::canonicalize(binary).ok();
    let unknown = |what: &str, e: std::io::Error| Lookup::Unknown(format!("{what}: {e}"));
    let me = match std::fs::metadata("/proc/self") {
        Ok(m) => m.uid(),
        Err(e) => return unknown("cannot stat /proc/self", e),
    };
    let entries = match std::fs::read_dir("/proc") {
        Ok(d) => d,
        Err(e) => return unknown("cannot list /proc", e),
    };
    // Gone, or someone else's process we may not look into: not ours (our
    // own processes are always readable to us).
    let skip = |e: &std::io::Error| {
        is_gone(e)
            || matches!(
                e.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::NotFound
            )
    };
    let mut unsure = None;
    for e in entries {
        let e = match e {
            Ok(e) => e,
            Err(e) => return unknown("cannot list /proc", e),
        };
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // Bounded: a VMM's command line is short; anything longer is not ours.
        let f = match std::fs::File::open(e.path().join("cmdline")) {
            Ok(f) => f,
            Err(e) if skip(&e) => continue,
            Err(e) => {
                unsure = Some(format!("cannot read /proc/{pid}/cmdline: {e}"));
                continue;
            }
        };
        let mut buf = Vec::new();
        if let Err(e) = std::io::Read::read_to_end(&mut std::io::Read::take(f, 64 * 1024), &mut buf)
        {
            if !skip(&e) {
                unsure = Some(format!("cannot read /proc/{pid}/cmdline: {e}"));
            }
            continue;
        }
        let args: Vec<&[u8]> = buf.split(|b| *b == 0).collect();
        let ours = args.first() == Some(&want_bin)
            && args
                .windows(2)
                .any(|w| w[0] == b"--config" && w[1] == want_cfg);
        if !ours {
            continue;
        }
        let start_time = match process_start_time(pid) {
            ProcessState::Alive { start_time } => start_time,
            ProcessState::Gone => continue,
            ProcessState::Unknown(why) => {
                unsure = Some(why);
                continue;
            }
        };
        // Not someone else's process dressed up as our VMM.
        match std::fs::metadata(e.path()) {
            Ok(m) if m.uid() == me => {}
            Ok(_) => continue,
            Err(e) if skip(&e) => continue,
            Err(e) => {
                unsure = Some(format!("cannot stat /proc/{pid}: {e}"));
                continue;
            }
        }
        if let Some(exe) = &want_exe {
            match std::fs::read_link(e.path().join("exe")) {
                Ok(p) if &p == exe => {}
                Ok(_) => continue,
                Err(e) if skip(&e) => continue,
                Err(e) => {
                    unsure = Some(format!("cannot read /proc/{pid}/exe: {e}"));
                    continue;
                }
            }
        }
        return Lookup::Found { pid, start_time };
    }
    match unsure {
        Some(why) => Lookup::Unknown(why),
        None => Lookup::NotFound,
    }
}

/// A `reddog-vmm` process: our child, or adopted by pid + start time.
#[derive(Debug)]
pub struct ProcessHandle {
    pid: i32,
    start_time: u64,
    exit_report: PathBuf,
    control_socket: Option<PathBuf>,
    /// The subscribed connection to the control socket.
    control: Option<ControlConn>,
    /// The guest may still wait for `boot`.
    held: bool,
    /// Taken over from an earlier agent: whether it is held is not known, so
    /// a failed `boot` is only logged (a held guest never says hello and the
    /// boot timeout restarts it; a running one must not be killed for it).
    adopted: bool,
    /// `None` for an adopted VMM (watched by polling its start time). For a
    /// jailed VMM: the jailer, its parent, which exits as it does.
    child: Option<tokio::process::Child>,
    /// A jailed VMM's jail: `pid` is then not our child's.
    jail: Option<JailRecord>,
    exited: Option<VmmExit>,
}

#[async_trait]
impl VmmHandle for ProcessHandle {
    fn record(&self) -> VmmRecord {
        VmmRecord {
            pid: self.pid,
            start_time: self.start_time,
            control_socket: self.control_socket.clone(),
            exit_report: self.exit_report.clone(),
            jail: self.jail.clone(),
        }
    }

    async fn stop(&mut self, mode: StopMode) -> Result<(), VmmError> {
        if self.exited.is_some() {
            return Ok(());
        }
        if self.child.is_none() || self.jail.is_some() {
            // Not our child (adopted, or the jailer's): never signal whoever
            // has its pid now.
            match probe_patiently(self.pid, UNKNOWN_PATIENCE).await {
                ProcessState::Alive { start_time } if start_time == self.start_time => {}
                ProcessState::Alive { .. } | ProcessState::Gone => return Ok(()),
                ProcessState::Unknown(why) => {
                    return Err(VmmError::Signal {
                        pid: self.pid,
                        why: format!(
                            "cannot check that the pid is still this VMM ({why}), so it was \
                             not signalled; check the agent's open-file limit (RLIMIT_NOFILE)"
                        ),
                    })
                }
            }
        }
        if mode == StopMode::Graceful {
            // The ACPI power button through the VMM's control socket, when it
            // has one; the caller escalates to Force after its deadline.
            // The subscribed connection carries it (no second connection).
            if let Some(c) = &self.control {
                let asked = c
                    .request(
                        Op::Shutdown {
                            mode: vmm_api::control::ShutdownMode::Acpi,
                        },
                        ACPI_TIMEOUT,
                    )
                    .await;
                match asked {
                    Ok(_) => return Ok(()),
                    Err(e) => tracing::warn!(
                        pid = self.pid,
                        "ACPI shutdown through the control socket failed ({e}); sending SIGTERM"
                    ),
                }
            }
        }
        let sig = match mode {
            StopMode::Graceful => Signal::TERM,
            StopMode::Force => Signal::KILL,
        };
        let pid = Pid::from_raw(self.pid).ok_or(VmmError::Signal {
            pid: self.pid,
            why: "invalid pid".into(),
        })?;
        match rustix::process::kill_process(pid, sig) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(VmmError::Signal {
                pid: self.pid,
                why: e.to_string(),
            }),
        }
    }

    async fn wait(&mut self) -> VmmExit {
        if let Some(e) = &self.exited {
            return e.clone();
        }
        let (status, signal) = if let Some(child) = &mut self.child {
            let st = match child.wait().await {
                Ok(st) => (st.code(), st.signal()),
                Err(e) => {
                    tracing::warn!(pid = self.pid, "waiting for the VMM failed: {e}");
                    (None, None)
                }
            };
            if self.jail.is_some() {
                // The jailer exits after the VMM, unless it was killed itself.
                while process_start_time(self.pid).is(self.start_time) != Some(false) {
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
            }
            st
        } else {
            // Only a definite answer ends the wait: an unknown one (EMFILE)
            // is asked again.
            let mut warned = false;
            loop {
                match process_start_time(self.pid) {
                    ProcessState::Alive { start_time } if start_time == self.start_time => {}
                    ProcessState::Alive { .. } | ProcessState::Gone => break,
                    ProcessState::Unknown(why) => {
                        if !warned {
                            tracing::warn!(
                                pid = self.pid,
                                "cannot check that the adopted VMM still runs ({why}); \
                                 taking it as running and checking again"
                            );
                            warned = true;
                        }
                    }
                }
                tokio::time::sleep(ADOPTED_POLL).await;
            }
            (None, None)
        };
        let report = read_report(&self.exit_report);
        let detail = match (&report, status, signal) {
            (Some(r), _, _) => format!("{:?}: {}", r.reason, r.detail),
            (None, _, Some(s)) => format!("killed by signal {s}"),
            (None, Some(c), _) => {
                format!("exited with status {c} without an exit report; see vmm.log")
            }
            (None, None, None) => {
                "exited (an adopted process: status unknown, no exit report)".into()
            }
        };
        let e = VmmExit {
            report,
            status,
            signal,
            detail,
        };
        self.exited = Some(e.clone());
        e
    }

    async fn pause(&mut self) -> Result<(), VmmError> {
        self.set_running(false).await
    }

    async fn resume(&mut self) -> Result<(), VmmError> {
        self.set_running(true).await
    }

    async fn inspect(&mut self) -> Result<VmmView, VmmError> {
        let pid = self.pid;
        let err = |source| VmmError::Control { pid, source };
        let c = self.control.as_ref().ok_or_else(|| {
            err(super::control::ControlError::Unreachable {
                path: self.control_socket.clone().unwrap_or_default(),
                why: "the agent runs its VMMs without a control socket".into(),
            })
        })?;
        let info = c.request(Op::Info, INSPECT_TIMEOUT).await.map_err(err)?;
        let metrics = c.request(Op::Metrics, INSPECT_TIMEOUT).await.map_err(err)?;
        let parse =
            |e: serde_json::Error| err(super::control::ControlError::Protocol(e.to_string()));
        Ok(VmmView {
            info: serde_json::from_value(info).map_err(parse)?,
            metrics: serde_json::from_value(metrics).map_err(parse)?,
        })
    }

    fn take_events(&mut self) -> Option<VmmEvents> {
        self.control.as_mut().and_then(ControlConn::take_events)
    }

    async fn boot(&mut self) -> Result<(), VmmError> {
        if !self.held {
            return Ok(());
        }
        let pid = self.pid;
        let Some(c) = &self.control else {
            return Ok(());
        };
        // Subscribed first (the connection's first request), then booted;
        // a VMM that dies meanwhile (a bad kernel, a busy socket path) ends
        // the wait at once, with its own reason.
        let request = c.request(Op::Boot, CONTROL_CONNECT_NEW);
        let answer = match self.child.as_mut() {
            Some(child) => tokio::select! {
                r = request => Some(r),
                _ = child.wait() => None,
            },
            None => Some(request.await),
        };
        let Some(answer) = answer else {
            let exit = self.wait().await;
            return Err(VmmError::Gone {
                pid,
                why: format!(
                    "it exited before its guest booted: {}; see vmm.log",
                    exit.summary()
                ),
            });
        };
        match answer {
            Ok(_) => {}
            Err(super::control::ControlError::Refused(e))
                if e.kind == vmm_api::control::ErrorKind::InvalidState => {}
            Err(source) if self.adopted => {
                tracing::warn!(pid, "cannot make sure the adopted VMM is booted: {source}");
            }
            Err(source) => return Err(VmmError::Control { pid, source }),
        }
        self.held = false;
        Ok(())
    }
}

impl ProcessHandle {
    async fn set_running(&mut self, run: bool) -> Result<(), VmmError> {
        let pid = self.pid;
        let err = |source| VmmError::Control { pid, source };
        let Some(c) = &self.control else {
            return Err(err(super::control::ControlError::Unreachable {
                path: self.control_socket.clone().unwrap_or_default(),
                why: "the agent runs its VMMs without a control socket".into(),
            }));
        };
        c.set_running(run, CONTROL_TIMEOUT).await.map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable() {
        let me = i32::try_from(std::process::id()).expect("pid");
        let ProcessState::Alive { start_time: t } = process_start_time(me) else {
            panic!("own start time: {:?}", process_start_time(me));
        };
        assert!(t > 0);
        assert_eq!(process_start_time(me).is(t), Some(true));
        assert_eq!(process_start_time(i32::MAX), ProcessState::Gone);
    }

    /// Only ENOENT, ESRCH and a zombie mean gone; anything else is unknown.
    #[test]
    fn read_errors_other_than_gone_are_unknown() {
        use rustix::io::Errno;
        let err = |e: Errno| Err(std::io::Error::from_raw_os_error(e.raw_os_error()));
        assert_eq!(process_state_from(err(Errno::NOENT)), ProcessState::Gone);
        assert_eq!(process_state_from(err(Errno::SRCH)), ProcessState::Gone);
        for e in [
            Errno::MFILE,
            Errno::NFILE,
            Errno::NOMEM,
            Errno::INTR,
            Errno::ACCESS,
        ] {
            let st = process_state_from(err(e));
            assert!(matches!(st, ProcessState::Unknown(_)), "{e:?}: {st:?}");
            assert_eq!(st.is(1), None);
        }
        let line = |state: &str| Ok(format!("42 (a) b) {state} {}", "7 ".repeat(19)));
        assert_eq!(
            process_state_from(line("S")),
            ProcessState::Alive { start_time: 7 }
        );
        assert_eq!(process_state_from(line("Z")), ProcessState::Gone);
        assert!(matches!(
            process_state_from(Ok("garbage".into())),
            ProcessState::Unknown(_)
        ));
    }

    fn spec(dir: &Path) -> LaunchSpec {
        LaunchSpec {
            instance_id: "a".into(),
            dir: dir.to_owned(),
            vcpus: 1,
            memory_mib: 64,
            disks: vec![],
            vsock: vmm_api::VsockConfig {
                guest_cid: 3,
                uds_path: dir.join("v.sock"),
            },
            guest_port: 1024,
            serial_path: dir.join("serial.log"),
            net: None,
        }
    }

    /// A shell script stands in for reddog-vmm: it serves no control socket.
    fn shell_vmm_config(bin: &Path, kernel: &str) -> ProcessLauncherConfig {
        let mut c = ProcessLauncherConfig::new(bin, kernel);
        c.boot_on_request = false;
        c
    }

    /// Stands in for reddog-vmm: a shell that writes an exit report and exits 10.
    fn fake_vmm(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("fake-vmm");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    #[tokio::test]
    async fn spawns_with_config_and_reads_exit_report() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = fake_vmm(
            dir.path(),
            r#"while [ $# -gt 0 ]; do case "$1" in --exit-report) R="$2"; shift;; --config) C="$2"; shift;; esac; shift; done
test -f "$C" || exit 3
echo '{"reason":"reset","exit_code":10,"detail":"i8042 reset","boot_time_us":null,"first_run_us":null,"total_us":5,"vcpu":null,"regs":null}' > "$R"
exit 10"#,
        );
        let l = ProcessLauncher::new(shell_vmm_config(&bin, "/boot/vmlinux"));
        let s = spec(dir.path());
        let mut h = l.launch(&s).await.expect("launch");
        let e = h.wait().await;
        assert_eq!(e.status, Some(10));
        assert_eq!(
            e.report.as_ref().map(|r| r.reason),
            Some(vmm_api::ExitReason::Reset)
        );
        let cfg = VmConfig::from_file(&dir.path().join("vm.json")).expect("config");
        assert_eq!(cfg.memory_mib, 64);
        assert!(
            cfg.cmdline.contains("reddog.agent_port=1024"),
            "{}",
            cfg.cmdline
        );
        // wait() again returns the same.
        assert_eq!(h.wait().await, e);
    }

    #[tokio::test]
    async fn stop_and_adopt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = fake_vmm(dir.path(), "exec sleep 30");
        let l = ProcessLauncher::new(shell_vmm_config(&bin, "/k"));
        let s = spec(dir.path());
        let mut h = l.launch(&s).await.expect("launch");
        let rec = h.record();
        assert!(rec.start_time > 0);
        // A second handle by pid + start time, as a restarted agent would get.
        let mut adopted = l.adopt(&s, &rec).await.expect("adopt");
        // A record with the wrong start time is refused (a reused pid).
        let mut wrong = rec.clone();
        wrong.start_time += 1;
        assert!(matches!(
            l.adopt(&s, &wrong).await,
            Err(VmmError::Gone { .. })
        ));
        h.stop(StopMode::Force).await.expect("kill");
        let e = h.wait().await;
        assert_eq!(e.signal, Some(9));
        let e2 = tokio::time::timeout(Duration::from_secs(10), adopted.wait())
            .await
            .expect("adopted wait returns");
        assert_eq!(e2.status, None);
        assert!(matches!(
            l.adopt(&s, &rec).await,
            Err(VmmError::Gone { .. })
        ));
    }

    /// A VMM the agent spawned but never recorded is found by its command
    /// line (`<binary> ... --config <dir>/vm.json`), and only that one.
    #[test]
    fn an_unrecorded_vmm_is_found_by_its_command_line() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("reddog-vmm");
        let cfg = dir.path().join("vm.json");
        // A shell standing in, its argv[0] and arguments as the launcher's.
        let mut child = std::process::Command::new("/bin/sh")
            .arg0(&bin)
            .args(["-c", "sleep 30; true", "--config"])
            .arg(&cfg)
            .spawn()
            .expect("spawn");
        let pid = i32::try_from(child.id()).expect("pid");
        let mut found = Lookup::NotFound;
        for _ in 0..100 {
            found = find_vmm_process(&bin, &cfg);
            if matches!(found, Lookup::Found { .. }) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            matches!(found, Lookup::Found { pid: p, .. } if p == pid),
            "{found:?}"
        );
        assert_eq!(
            find_vmm_process(&bin, &dir.path().join("other.json")),
            Lookup::NotFound
        );
        assert_eq!(
            find_vmm_process(Path::new("/other/reddog-vmm"), &cfg),
            Lookup::NotFound
        );
        // When the binary exists, the process must run it (this one runs the
        // shell, not the file now at `bin`).
        std::fs::write(&bin, "not the shell").expect("write");
        assert_eq!(
            find_vmm_process(&bin, &cfg),
            Lookup::NotFound,
            "another executable"
        );
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert_eq!(
            find_vmm_process(&bin, &cfg),
            Lookup::NotFound,
            "a dead VMM is not found"
        );
    }

    #[tokio::test]
    async fn missing_binary_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = ProcessLauncher::new(ProcessLauncherConfig::new("/nonexistent/reddog-vmm", "/k"));
        let e = l
            .launch(&spec(dir.path()))
            .await
            .expect_err("no binary")
            .to_string();
        assert!(e.contains("--vmm-binary"), "{e}");
    }
}
