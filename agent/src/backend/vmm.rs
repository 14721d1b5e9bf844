//! The agent <-> VMM seam: spawn a VMM for an instance, stop it, wait for it,
//! re-adopt it after an agent restart, and ask it about itself.
//! [`super::process::ProcessLauncher`] runs `reddog-vmm` processes;
//! `super::fake::FakeLauncher` (feature `fake`) is for tests.

use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use vmm_api::control::Event;
use vmm_api::{DiskConfig, ExitReport, VsockConfig};

/// What the agent asks a launcher to run. The launcher adds what is its own
/// business (kernel, initrd, command line, binary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// The instance.
    pub instance_id: String,
    /// The instance's directory (config, logs and exit report go here).
    pub dir: PathBuf,
    /// vCPUs.
    pub vcpus: u8,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// Disks in guest order: OS, resource, role.
    pub disks: Vec<DiskConfig>,
    /// The vsock device.
    pub vsock: VsockConfig,
    /// The host port the guest agent connects to.
    pub guest_port: u32,
    /// Where the serial console goes.
    pub serial_path: PathBuf,
    /// The instance's virtio-net device (its TAP, made by the agent), when
    /// the node gives instances a network.
    pub net: Option<vmm_api::NetConfig>,
}

/// What the agent stores to find a VMM again after its own restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmRecord {
    /// Process id.
    pub pid: i32,
    /// The process's start time (clock ticks after boot, `/proc/<pid>/stat`
    /// field 22), so a reused pid is not mistaken for our VMM.
    pub start_time: u64,
    /// The VMM's control socket, once the VMM has one.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Where the VMM writes its exit report.
    pub exit_report: PathBuf,
    /// A jailed VMM's jail (`None`: not jailed).
    #[serde(default)]
    pub jail: Option<JailRecord>,
}

/// What the agent keeps of a jailed VMM's jail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailRecord {
    /// The jail directory (`<jail base>/<instance>`).
    pub dir: PathBuf,
    /// The VMM's uid (and gid), from the launcher's range.
    pub uid: u32,
}

/// How to stop a VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Ask: the ACPI power button through the control socket when the VMM has
    /// one, SIGTERM otherwise.
    Graceful,
    /// Kill it (SIGKILL).
    Force,
}

/// How a VMM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmExit {
    /// The exit report the VMM wrote, if it wrote one.
    pub report: Option<ExitReport>,
    /// The exit status, when known (not for an adopted process).
    pub status: Option<i32>,
    /// The signal that killed it, when known.
    pub signal: Option<i32>,
    /// A one-line summary.
    pub detail: String,
}

impl VmmExit {
    /// A summary line for transition reasons.
    pub fn summary(&self) -> String {
        match &self.report {
            Some(r) => format!("{:?} (status {}): {}", r.reason, r.exit_code, r.detail),
            None => self.detail.clone(),
        }
    }
}

/// Errors from launching or controlling a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM could not be spawned.
    #[error("cannot start the VMM for {instance}: {why}")]
    Spawn {
        /// The instance.
        instance: String,
        /// What went wrong and what to check.
        why: String,
    },
    /// Files for the VMM could not be written.
    #[error("cannot write {path}: {source}; check the state directory")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Signalling the VMM failed.
    #[error("cannot signal VMM pid {pid}: {why}")]
    Signal {
        /// Its pid.
        pid: i32,
        /// Why.
        why: String,
    },
    /// A control-socket request failed (pause, resume).
    #[error("VMM pid {pid}: {source}")]
    Control {
        /// Its pid.
        pid: i32,
        /// What failed.
        source: super::control::ControlError,
    },
    /// The recorded VMM is not running any more (or its pid is now another
    /// process).
    #[error("VMM pid {pid} is gone: {why}")]
    Gone {
        /// The recorded pid.
        pid: i32,
        /// Why it does not count as ours.
        why: String,
    },
}

/// One running VMM.
#[async_trait]
pub trait VmmHandle: Send + Sync + std::fmt::Debug {
    /// What to store to re-adopt it.
    fn record(&self) -> VmmRecord;
    /// Asks it to stop; returns without waiting (see [`VmmHandle::wait`]).
    async fn stop(&mut self, mode: StopMode) -> Result<(), VmmError>;
    /// Waits for it to end. Cancel-safe: it may be used in `select!` and
    /// called again.
    async fn wait(&mut self) -> VmmExit;
    /// Parks every vCPU (`pause` on the control socket); returns once they
    /// are parked.
    async fn pause(&mut self) -> Result<(), VmmError>;
    /// Lets the vCPUs run again.
    async fn resume(&mut self) -> Result<(), VmmError>;
    /// Starts the guest of a VMM launched held (`boot_on_request`), once its
    /// record is stored; a no-op for a VMM whose guest runs already (an
    /// adopted one that was booted before).
    async fn boot(&mut self) -> Result<(), VmmError> {
        Ok(())
    }
    /// The VMM's own view of itself (`info` and `metrics` on its control
    /// socket).
    async fn inspect(&mut self) -> Result<VmmView, VmmError>;
    /// The events the VMM pushes (boot timer, paused, resumed, stopping),
    /// with its state at subscription replayed first. The first call takes
    /// the stream; `None` after that, or when the VMM has no control socket.
    fn take_events(&mut self) -> Option<VmmEvents>;
}

/// A VMM's own view of itself, from its control socket.
#[derive(Debug, Clone, Serialize)]
pub struct VmmView {
    /// `info`: config, state, pid, vCPUs, memory, uptime, boot times.
    pub info: vmm_api::control::Info,
    /// `metrics`: exit counters, console bytes, power-button presses.
    pub metrics: vmm_api::control::Metrics,
}

/// A VMM's pushed events; the stream ends when its control connection closes.
pub type VmmEvents = tokio::sync::mpsc::Receiver<Event>;

/// Starts and re-adopts VMMs.
#[async_trait]
pub trait VmmLauncher: Send + Sync {
    /// Spawns a VMM.
    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn VmmHandle>, VmmError>;
    /// Takes over a VMM started by an earlier agent, if the recorded process
    /// is still the same one; [`VmmError::Gone`] otherwise.
    async fn adopt(
        &self,
        spec: &LaunchSpec,
        record: &VmmRecord,
    ) -> Result<Box<dyn VmmHandle>, VmmError>;
    /// Finds a live VMM this launcher started for `spec` whose record was
    /// never stored (the agent died between spawning it and recording it), so
    /// it can be adopted instead of running a second VMM over the same disks.
    async fn recover(&self, _spec: &LaunchSpec) -> Option<VmmRecord> {
        None
    }
    /// The instance is gone (its VMM has exited): removes what the launcher
    /// keeps for it (a jail directory and cgroup, its uid).
    fn remove(&self, _spec: &LaunchSpec) {}
}
