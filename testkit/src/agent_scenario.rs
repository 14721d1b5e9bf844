//! The whole host agent with real Debian guests: `reddog-agent` (static),
//! `reddog-vmm`, Debian's cloud kernel, the guest initramfs, the cached OS base
//! image and a web role package, driven by the `agent-driver` binary (this
//! crate's `src/bin/agent_driver.rs`): start the agent, import the base image
//! (`reddog cache import`), apply a goal state with N web-role instances
//! (`reddog goal put`), follow their states and heartbeats through the API
//! until every instance is `ready` with heartbeats arriving, then apply an
//! empty goal and check every VMM exits cleanly.
//!
//! [`run_nested`] runs the driver inside the QEMU-TCG outer machine (real KVM
//! inside; `docs/testing.md`), [`run_direct`] on this host's own KVM. The
//! driver prints its progress as it goes (live, through [`Progress`]) and
//! writes a [`DriverSummary`]; the agent's log, each VMM's log and each
//! guest's serial console are kept apart in their own files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::artifacts::{self, ArtifactError, KernelArtifacts};
use crate::guest::GuestImageError;
use crate::nested::{NestedError, NestedReport, OuterMachine};
use crate::os_image::{self, OsImageError};

/// The prefix of the driver's live lines on the outer console.
pub const LIVE_PREFIX: &str = "REDDOG-LIVE ";
/// The web role's port inside the guest.
pub const WEB_PORT: u16 = 8080;

/// What to deploy and how long to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentScenario {
    /// Web-role instances (`web-1`, `web-2`, ...).
    pub instances: u8,
    /// vCPUs per instance.
    pub vcpus: u8,
    /// Memory per instance, MiB.
    pub memory_mib: u32,
    /// Resource disk per instance, MiB.
    pub resource_disk_mib: u64,
    /// The guests' heartbeat interval.
    pub heartbeat_interval_ms: u32,
    /// Heartbeats to see from each instance once it is ready before stopping.
    pub heartbeats: u32,
    /// The agent's `--missed-heartbeats` (an emulated machine is jittery).
    pub missed_heartbeats: u32,
    /// The agent's `--boot-timeout-secs`.
    pub boot_timeout_secs: u64,
    /// The driver's own limit for the whole run.
    pub timeout_secs: u64,
}

impl AgentScenario {
    /// `instances` web instances, 1 vCPU and 256 MiB each, 64 MiB resource
    /// disks, heartbeats every second, three of them after `ready`.
    pub fn web(instances: u8) -> Self {
        Self {
            instances,
            vcpus: 1,
            memory_mib: 256,
            resource_disk_mib: 64,
            heartbeat_interval_ms: 1000,
            heartbeats: 3,
            missed_heartbeats: 5,
            boot_timeout_secs: 120,
            timeout_secs: 240,
        }
    }

    /// The driver's arguments for this scenario (without the paths).
    pub fn driver_args(&self) -> Vec<String> {
        [
            ("--instances", self.instances.to_string()),
            ("--vcpus", self.vcpus.to_string()),
            ("--memory-mib", self.memory_mib.to_string()),
            ("--resource-disk-mib", self.resource_disk_mib.to_string()),
            ("--heartbeat-ms", self.heartbeat_interval_ms.to_string()),
            ("--heartbeats", self.heartbeats.to_string()),
            ("--missed-heartbeats", self.missed_heartbeats.to_string()),
            ("--boot-timeout-secs", self.boot_timeout_secs.to_string()),
            ("--timeout-secs", self.timeout_secs.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect()
    }
}

/// One state an instance entered, per the agent's transition history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateAt {
    /// The state (`preparing_disks`, `starting`, `booted`, `ready`, ...).
    pub state: String,
    /// When, ms after the goal state was applied (stop states: after the
    /// empty goal).
    pub at_ms: u64,
    /// The agent's reason.
    pub reason: String,
}

/// One instance as the driver saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRun {
    /// Its id.
    pub id: String,
    /// States entered up to `ready` (from the agent's history).
    pub states: Vec<StateAt>,
    /// States entered after the empty goal (from the agent's log).
    pub stop_states: Vec<StateAt>,
    /// Heartbeats the agent received while the driver watched (by sequence
    /// number: last - first + 1).
    pub heartbeats: u64,
    /// The last heartbeat sequence number.
    pub last_seq: Option<u64>,
    /// The role state the last heartbeat reported.
    pub role_state: Option<String>,
    /// The guest agent's version, from its `Hello`.
    pub guest_agent: Option<String>,
    /// Restarts the agent counted.
    pub restarts: u64,
    /// How the VMM ended, as the agent logged it.
    pub vmm_exit: Option<String>,
    /// The VMM's exit status, as the agent logged it.
    pub vmm_status: Option<i64>,
}

impl InstanceRun {
    /// When the instance first entered `state` (ms after the goal).
    pub fn entered(&self, state: &str) -> Option<u64> {
        self.states
            .iter()
            .chain(&self.stop_states)
            .find(|s| s.state == state)
            .map(|s| s.at_ms)
    }
}

/// What the driver reports at the end (`--summary FILE`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverSummary {
    /// Everything as expected.
    pub ok: bool,
    /// What went wrong, if anything.
    pub error: Option<String>,
    /// Agent start to its API answering, ms.
    pub agent_up_ms: u64,
    /// `reddog cache import` of the base image, ms.
    pub import_ms: u64,
    /// The imported image (`sha256:<hex>`).
    pub image: String,
    /// Goal applied to every instance ready, ms.
    pub all_ready_ms: Option<u64>,
    /// Goal applied to every instance having sent its heartbeats after ready, ms.
    pub heartbeats_ms: Option<u64>,
    /// Empty goal applied to every instance removed, ms.
    pub stop_ms: Option<u64>,
    /// The whole driver run, ms.
    pub total_ms: u64,
    /// `reddog instances` while every instance was ready.
    pub instances_table: String,
    /// The instances.
    pub instances: Vec<InstanceRun>,
}

impl DriverSummary {
    /// A human summary: one line per phase and per instance.
    pub fn describe(&self) -> String {
        let s = |ms: Option<u64>| ms.map_or("-".to_owned(), |m| format!("{:.1} s", m as f64 / 1e3));
        let mut o = format!(
            "agent up {}, image import {}, goal -> all ready {}, -> at least {} heartbeats each {}, empty goal -> all stopped {}, driver total {}\n",
            s(Some(self.agent_up_ms)),
            s(Some(self.import_ms)),
            s(self.all_ready_ms),
            self.instances.iter().map(|i| i.heartbeats).min().unwrap_or(0),
            s(self.heartbeats_ms),
            s(self.stop_ms),
            s(Some(self.total_ms)),
        );
        for i in &self.instances {
            let path: Vec<String> = i
                .states
                .iter()
                .map(|st| format!("{} {}", st.state, s(Some(st.at_ms))))
                .collect();
            let stop: Vec<String> = i
                .stop_states
                .iter()
                .map(|st| format!("{} +{}", st.state, s(Some(st.at_ms))))
                .collect();
            o.push_str(&format!(
                "{}: {}; {} heartbeats (last seq {}), role {}, restarts {}; stop: {}; VMM: {}\n",
                i.id,
                path.join(", "),
                i.heartbeats,
                i.last_seq.map_or("-".into(), |q| q.to_string()),
                i.role_state.as_deref().unwrap_or("-"),
                i.restarts,
                stop.join(", "),
                i.vmm_exit.as_deref().unwrap_or("-"),
            ));
        }
        if let Some(e) = &self.error {
            o.push_str(&format!("error: {e}\n"));
        }
        o
    }
}

/// Errors getting the scenario to run (not the scenario's own verdict,
/// which is in the [`DriverSummary`]).
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// A kernel, binary or package.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// The base image or a role disk.
    #[error(transparent)]
    OsImage(#[from] OsImageError),
    /// The guest initramfs.
    #[error(transparent)]
    Guest(#[from] GuestImageError),
    /// The outer machine.
    #[error(transparent)]
    Nested(#[from] NestedError),
    /// A local file.
    #[error("{what}: {source}")]
    Io {
        /// What.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The driver left no summary.
    #[error("the driver left no summary ({why}); its output:\n{output}")]
    NoSummary {
        /// Why.
        why: String,
        /// What it printed.
        output: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ScenarioError {
    let what = what.into();
    move |source| ScenarioError::Io { what, source }
}

/// Everything the driver needs, on this host.
#[derive(Debug)]
pub struct AgentArtifacts {
    /// Debian's cloud kernel.
    pub kernel: KernelArtifacts,
    /// The guest initramfs (written to a file).
    pub initrd: PathBuf,
    /// The modules in it.
    pub modules: Vec<String>,
    /// The cached OS base image (raw ext4).
    pub base: PathBuf,
    /// The web role package directory.
    pub role: PathBuf,
    /// Static `reddog-agent`.
    pub agent: PathBuf,
    /// Static `reddog`.
    pub cli: PathBuf,
    /// Static `reddog-vmm`.
    pub vmm: PathBuf,
    /// Static `agent-driver`.
    pub driver: PathBuf,
    /// Holds `initrd` and `role`.
    pub dir: tempfile::TempDir,
}

/// Builds or fetches everything (static binaries, kernel, initramfs, base
/// image, web role), calling `step` before each step (the first run builds
/// for minutes; later runs take seconds).
pub fn prepare(step: &mut dyn FnMut(&str)) -> Result<AgentArtifacts, ScenarioError> {
    step("static reddog-vmm");
    let vmm = artifacts::static_vmm()?;
    step("static reddog-agent and reddog");
    let agent = artifacts::static_bin("reddog-cli", "reddog-agent")?;
    let cli = artifacts::static_bin("reddog-cli", "reddog")?;
    step("static agent-driver");
    let driver = artifacts::static_bin_with_features("testkit", "agent-driver", &["agent"])?;
    step("Debian's cloud kernel (apt, cached)");
    let kernel = artifacts::debian_kernel()?;
    step("guest initramfs (static reddog-guest + virtio/vsock modules)");
    let (initrd_bytes, modules) = crate::guest::initramfs(&kernel)?;
    step("OS base image (busybox-static + reddog-guest, cached)");
    let base = os_image::base_image()?;
    let dir = tempfile::tempdir().map_err(io("creating a temporary directory"))?;
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, initrd_bytes).map_err(io(initrd.display().to_string()))?;
    let role = dir.path().join("web-role");
    std::fs::create_dir(&role).map_err(io(role.display().to_string()))?;
    os_image::web_role(&role, WEB_PORT, "<h1>reddog web role</h1>\n")?;
    Ok(AgentArtifacts {
        kernel,
        initrd,
        modules,
        base,
        role,
        agent,
        cli,
        vmm,
        driver,
        dir,
    })
}

/// The outcome of one run.
#[derive(Debug)]
pub struct AgentRun {
    /// The driver's summary.
    pub summary: DriverSummary,
    /// The driver's output, the agent's log, each VMM's log and serial
    /// console, by file name (`driver.log`, `agent.log`, `web-1.vmm.log`,
    /// `web-1.serial`, ...).
    pub logs: BTreeMap<String, String>,
    /// Wall-clock time of the run (the outer machine's, when nested).
    pub elapsed: Duration,
    /// The outer machine, when nested.
    pub outer: Option<NestedReport>,
}

impl AgentRun {
    /// A log by file name ("" if missing).
    pub fn log(&self, name: &str) -> &str {
        self.logs.get(name).map_or("", String::as_str)
    }

    /// Everything, for assertion messages.
    pub fn describe(&self) -> String {
        let mut o = self.summary.describe();
        for (name, text) in &self.logs {
            o.push_str(&format!("--- {name}\n{text}\n"));
        }
        if let Some(outer) = &self.outer {
            o.push_str(&format!(
                "--- outer scenario log\n{}\n",
                outer.section("scenario.log").unwrap_or("")
            ));
        }
        o
    }

    /// Writes every log into `dir` (created if missing).
    pub fn save_logs(&self, dir: &Path) -> Result<(), ScenarioError> {
        std::fs::create_dir_all(dir).map_err(io(dir.display().to_string()))?;
        for (name, text) in &self.logs {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(io(p.display().to_string()))?;
        }
        Ok(())
    }
}

/// One VMM exit the agent logged ("VMM exited: ..." in its JSON log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedExit {
    /// How it ended, as the agent put it (e.g. `TripleFault (status 11): ...`).
    pub how: String,
    /// The VMM's exit status.
    pub status: Option<i64>,
}

impl LoggedExit {
    /// A triple fault (`KVM_EXIT_SHUTDOWN`, status 11).
    pub fn is_triple_fault(&self) -> bool {
        self.status == Some(i64::from(vmm_api::ExitReason::TripleFault.exit_code()))
            && self.how.contains("TripleFault")
    }
}

impl AgentRun {
    /// Every VMM exit the agent logged for `instance`, in order.
    pub fn vmm_exits(&self, instance: &str) -> Vec<LoggedExit> {
        self.log("agent.log")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["instance"].as_str() == Some(instance))
            .filter_map(|v| {
                let f = &v["fields"];
                let how = f["message"].as_str()?.strip_prefix("VMM exited: ")?;
                Some(LoggedExit {
                    how: how.to_owned(),
                    status: f["status"].as_i64(),
                })
            })
            .collect()
    }

    /// Says why instances were restarted. `Ok` with one line per restarted
    /// instance when every restart followed a triple fault and the run was
    /// inside the nested emulator (a known fault of the emulator, see
    /// `docs/testing.md`); `Err` with what happened otherwise: any other
    /// cause of a restart, or a triple fault on real hardware, is a failure.
    pub fn explain_restarts(&self, nested: bool) -> Result<Vec<String>, String> {
        let mut notes = Vec::new();
        for i in &self.summary.instances {
            if i.restarts == 0 {
                continue;
            }
            let exits = self.vmm_exits(&i.id);
            let before: Vec<&LoggedExit> = exits.iter().take(i.restarts as usize).collect();
            let faults = before.iter().filter(|e| e.is_triple_fault()).count() as u64;
            let times = match i.restarts {
                1 => "once".to_owned(),
                n => format!("{n} times"),
            };
            if nested && faults == i.restarts {
                notes.push(format!(
                    "{} restarted {times} after a triple fault (a known fault of the nested emulator, see docs/testing.md)",
                    i.id
                ));
            } else {
                let hows: Vec<&str> = before.iter().map(|e| e.how.as_str()).collect();
                return Err(format!(
                    "{} restarted {times}{}; the VMM exits before: {hows:?}",
                    i.id,
                    if nested { "" } else { " on real KVM" }
                ));
            }
        }
        Ok(notes)
    }
}

const NESTED_SCENARIO: &str = r#"set -u
mkdir -p /var/lib/reddog /out
echo "agent-driver $(cat /guest/driver-args)"
/bin/agent-driver --agent /bin/reddog-agent --cli /bin/reddog --vmm /bin/reddog-vmm \
  --kernel /guest/vmlinux --initrd /guest/initrd --base /guest/base.img --role /guest/role \
  --state /var/lib/reddog --logs /out --summary /out/summary.json \
  --prefix "REDDOG-LIVE " $(cat /guest/driver-args) > /dev/console 2>&1
echo "agent-driver exited $?"
exit 0
"#;

fn add_dir(mut m: OuterMachine, src: &Path, dest: &str) -> Result<OuterMachine, ScenarioError> {
    let rd = std::fs::read_dir(src).map_err(io(src.display().to_string()))?;
    for e in rd {
        let e = e.map_err(io(src.display().to_string()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let d = format!("{dest}/{name}");
        if path.is_dir() {
            m = add_dir(m, &path, &d)?;
        } else {
            m = m.host_file(&d, 0o644, &path);
        }
    }
    Ok(m)
}

fn summary_from(text: Option<&str>, output: &str) -> Result<DriverSummary, ScenarioError> {
    let text = text.ok_or_else(|| ScenarioError::NoSummary {
        why: "no summary.json".into(),
        output: output.to_owned(),
    })?;
    serde_json::from_str(text.trim()).map_err(|e| ScenarioError::NoSummary {
        why: format!("summary.json: {e}"),
        output: output.to_owned(),
    })
}

/// Runs the scenario inside the QEMU-TCG outer machine (real KVM inside).
/// `live` gets each progress line of the driver as it is printed.
pub fn run_nested(
    a: &AgentArtifacts,
    scenario: &AgentScenario,
    mut live: impl FnMut(&str) + Send + 'static,
) -> Result<AgentRun, ScenarioError> {
    let mut m = OuterMachine::new(&a.kernel)
        .host_file("bin/reddog-agent", 0o755, &a.agent)
        .host_file("bin/reddog", 0o755, &a.cli)
        .host_file("bin/agent-driver", 0o755, &a.driver)
        .host_program("bin/mkfs.ext4", Path::new("/sbin/mkfs.ext4"))
        .host_program("bin/debugfs", Path::new("/sbin/debugfs"))
        .host_file("guest/vmlinux", 0o644, a.kernel.pvh_vmlinux()?)
        .host_file("guest/initrd", 0o644, &a.initrd)
        .host_file("guest/base.img", 0o644, &a.base)
        .file(
            "guest/driver-args",
            0o644,
            scenario.driver_args().join(" ").into_bytes(),
        )
        .scenario(NESTED_SCENARIO)
        .timeout(Duration::from_secs(scenario.timeout_secs + 120));
    if Path::new("/etc/mke2fs.conf").is_file() {
        m = m.host_file("etc/mke2fs.conf", 0o644, Path::new("/etc/mke2fs.conf"));
    }
    m = add_dir(m, &a.role, "guest/role")?;
    // Only the driver's lines, and only until the outer init starts printing
    // the /out files (which repeat them).
    let mut done = false;
    m = m.live_lines(move |line| {
        if line.starts_with("REDDOG-BEGIN ") {
            done = true;
        }
        if !done {
            if let Some(at) = line.find(LIVE_PREFIX) {
                live(&line[at + LIVE_PREFIX.len()..]);
            }
        }
    });
    let outer = m.run()?;
    let mut logs = BTreeMap::new();
    for (name, text) in &outer.sections {
        if name != "summary.json" && name != "scenario.log" {
            logs.insert(name.clone(), text.clone());
        }
    }
    let summary = summary_from(
        outer.section("summary.json"),
        &format!(
            "{}\n{}",
            outer.section("driver.log").unwrap_or(""),
            outer.describe()
        ),
    )?;
    Ok(AgentRun {
        summary,
        logs,
        elapsed: outer.elapsed,
        outer: Some(outer),
    })
}

/// Runs the scenario on this host's own KVM (needs hardware KVM, root or
/// access to `/dev/kvm`, and `mkfs.ext4`). The driver's progress goes to
/// this process's stdout as it comes; logs are kept in `logs`.
pub fn run_direct(
    a: &AgentArtifacts,
    scenario: &AgentScenario,
    logs: &Path,
) -> Result<AgentRun, ScenarioError> {
    std::fs::create_dir_all(logs).map_err(io(logs.display().to_string()))?;
    // Short: the agent's sockets live under it (sun_path is 108 bytes).
    let state = tempfile::Builder::new()
        .prefix("reddog-demo-")
        .tempdir_in("/tmp")
        .map_err(io("creating the state directory in /tmp"))?;
    let summary_path = logs.join("summary.json");
    let _ = std::fs::remove_file(&summary_path);
    println!(
        "state directory {}: if this run is interrupted, the reddog-vmm processes started there keep \
         running (the agent leaves VMs alone when it stops); find them with `pgrep -af {}`",
        state.path().display(),
        state.path().display()
    );
    let started = Instant::now();
    let status = Command::new(&a.driver)
        .arg("--agent")
        .arg(&a.agent)
        .arg("--cli")
        .arg(&a.cli)
        .arg("--vmm")
        .arg(&a.vmm)
        .arg("--kernel")
        .arg(a.kernel.pvh_vmlinux()?)
        .arg("--initrd")
        .arg(&a.initrd)
        .arg("--base")
        .arg(&a.base)
        .arg("--role")
        .arg(&a.role)
        .arg("--state")
        .arg(state.path())
        .arg("--logs")
        .arg(logs)
        .arg("--summary")
        .arg(&summary_path)
        .args(scenario.driver_args())
        .stdin(Stdio::null())
        .status()
        .map_err(io(a.driver.display().to_string()))?;
    let elapsed = started.elapsed();
    let mut files = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(logs) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != "summary.json" {
                if let Ok(t) = std::fs::read_to_string(e.path()) {
                    files.insert(name, t);
                }
            }
        }
    }
    let text = std::fs::read_to_string(&summary_path).ok();
    let summary = summary_from(
        text.as_deref(),
        &format!(
            "driver {status}\n{}",
            files.get("driver.log").map_or("", String::as_str)
        ),
    )?;
    Ok(AgentRun {
        summary,
        logs: files,
        elapsed,
        outer: None,
    })
}

/// How this host can run real Linux guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware KVM (`kvm_intel` or `kvm_amd`): run directly.
    Hardware(String),
    /// No usable KVM for real Linux guests: run inside the emulated machine.
    /// The reason says which.
    NeedsNested(String),
}

/// Looks at `/dev/kvm`, the loaded KVM modules and the CPU flags.
pub fn detect_kvm() -> KvmKind {
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    if module("kvm_pvm") {
        return KvmKind::NeedsNested(
            "/dev/kvm is kvm-pvm (a software KVM on which unmodified Linux cannot boot)".into(),
        );
    }
    if !Path::new("/dev/kvm").exists() {
        return KvmKind::NeedsNested("there is no /dev/kvm".into());
    }
    let flags = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("flags"))
                .map(|l| l.to_owned())
        })
        .unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    match (module("kvm_intel"), module("kvm_amd")) {
        (true, _) if has("vmx") => KvmKind::Hardware("kvm_intel (VMX)".into()),
        (_, true) if has("svm") => KvmKind::Hardware("kvm_amd (SVM)".into()),
        _ => KvmKind::NeedsNested(
            "/dev/kvm exists but neither kvm_intel with VMX nor kvm_amd with SVM is loaded".into(),
        ),
    }
}
