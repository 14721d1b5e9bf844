//! One task per instance: prepares disks, runs the VMM, watches the guest,
//! restarts with backoff, trips the crash-loop guard, stops and cleans up.
//! The task reconciles towards the instance's desired state (a `watch`
//! channel the agent writes when a goal state changes it).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use vmm_api::control::Event as VmmEvent;

use crate::agent::Ctx;
use crate::disks::{DiskRequest, PreparedDisks};
use crate::events::AgentEvent;
use crate::guest::{boot_id_hex, GuestEndpoint, GuestEvent, GuestLink, HostCommand, RoleStatus};
use crate::lifecycle::{InstanceState, Lifecycle, Transition};
use crate::spec::InstanceSpec;
use crate::util::{now_unix_ms, write_json_atomic};
use crate::vmm::{LaunchSpec, StopMode, VmmError, VmmExit, VmmHandle, VmmRecord};

/// An operator's request to a running instance (through [`crate::Agent`]).
#[derive(Debug)]
pub(crate) enum Command {
    /// Park the vCPUs.
    Pause(oneshot::Sender<Result<(), InstanceOpError>>),
    /// Let them run again.
    Resume(oneshot::Sender<Result<(), InstanceOpError>>),
}

/// Why an operation on one instance (pause, resume) failed.
#[derive(Debug, thiserror::Error)]
pub enum InstanceOpError {
    /// No such instance.
    #[error("no instance {0}; see GET /v1/instances")]
    NoSuchInstance(String),
    /// The instance is not in a state that allows it.
    #[error("instance {id} is {state}; {what}")]
    WrongState {
        /// The instance.
        id: String,
        /// Its state.
        state: InstanceState,
        /// What would be needed.
        what: &'static str,
    },
    /// The VMM refused or failed.
    #[error("instance {id}: {source}")]
    Vmm {
        /// The instance.
        id: String,
        /// What the VMM said.
        source: VmmError,
    },
    /// The instance's task did not take the request in time (it is between
    /// VMMs or stopping).
    #[error("instance {0} is changing state and did not take the request; try again")]
    Busy(String),
}

/// What the goal wants of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Desired {
    /// Running with this spec.
    Run(InstanceSpec),
    /// Gone.
    Removed,
}

/// Health, restart and stop timings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthPolicy {
    /// Heartbeat intervals without a frame before the guest counts as
    /// unresponsive.
    pub missed_heartbeats: u32,
    /// Added to `missed_heartbeats` intervals.
    pub heartbeat_grace: Duration,
    /// Time from VMM start (or re-adoption) to the guest's hello.
    pub boot_timeout: Duration,
    /// First restart delay; doubles per recent failure.
    pub backoff_initial: Duration,
    /// Longest restart delay.
    pub backoff_max: Duration,
    /// Failures within `crash_loop_window` that mark an instance failed.
    pub crash_loop_failures: u32,
    /// The crash-loop window.
    pub crash_loop_window: Duration,
    /// How long a graceful stop may take before the VMM is killed.
    pub stop_grace: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            missed_heartbeats: 3,
            heartbeat_grace: Duration::from_secs(1),
            boot_timeout: Duration::from_secs(60),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            crash_loop_failures: 3,
            crash_loop_window: Duration::from_secs(300),
            stop_grace: Duration::from_secs(10),
        }
    }
}

impl HealthPolicy {
    /// How long without a frame means unresponsive, for this heartbeat interval.
    pub fn heartbeat_timeout(&self, interval_ms: u32) -> Duration {
        Duration::from_millis(u64::from(interval_ms)) * self.missed_heartbeats
            + self.heartbeat_grace
    }
}

/// What the guest told us about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestInfo {
    /// Boot id, hex.
    pub boot_id: String,
    /// Negotiated protocol version.
    pub protocol_version: u8,
    /// Capability bits.
    pub capabilities: u64,
    /// The guest agent's version (escaped).
    pub agent_version: String,
}

/// An instance as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceStatus {
    /// The id.
    pub id: String,
    /// The spec being run.
    pub spec: InstanceSpec,
    /// Its state.
    pub state: InstanceState,
    /// Since when (ms since the Unix epoch).
    pub since_unix_ms: u64,
    /// Restarts since the instance was created (kept across agent restarts).
    pub restarts: u32,
    /// Failures inside the crash-loop window.
    pub recent_failures: u32,
    /// The last sign of life from the guest (ms since the Unix epoch).
    pub last_heartbeat_unix_ms: Option<u64>,
    /// The last heartbeat's sequence number.
    pub heartbeat_seq: Option<u64>,
    /// The role's state, as the guest reports it.
    pub role: Option<RoleStatus>,
    /// The guest agent.
    pub guest: Option<GuestInfo>,
    /// The VMM's pid while one runs.
    pub vmm_pid: Option<i32>,
    /// When the current VMM's guest wrote the boot timer, in microseconds
    /// after the VMM started (from the VMM's pushed events).
    pub boot_time_us: Option<u64>,
    /// How the last VMM ended.
    pub last_exit: Option<VmmExit>,
    /// The last error (failed preparation, crash loop, launch error).
    pub last_error: Option<String>,
    /// Transitions, oldest first (empty in lists).
    pub history: Vec<Transition>,
}

/// The state an instance task shares with the API.
#[derive(Debug)]
pub(crate) struct Shared {
    pub lifecycle: Lifecycle,
    pub status: InstanceStatus,
}

impl Shared {
    pub(crate) fn snapshot(&self, history: bool) -> InstanceStatus {
        let mut s = self.status.clone();
        s.state = self.lifecycle.state();
        s.since_unix_ms = self.lifecycle.since_unix_ms();
        if history {
            s.history = self.lifecycle.history().cloned().collect();
        }
        s
    }
}

/// What is stored per instance in `<state>/instances/<id>/record.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Format version.
    pub version: u32,
    /// The spec.
    pub spec: InstanceSpec,
    /// The state when written.
    pub state: InstanceState,
    /// The disks, once made.
    pub disks: Option<PreparedDisks>,
    /// The VMM, while one runs.
    pub vmm: Option<VmmRecord>,
    /// An update's disks being remade: the disks before it, and which of
    /// them are stale. Set while `disks` is `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaking: Option<PendingRemake>,
    /// A VMM is being spawned and is not recorded yet: after an agent
    /// restart, look for it ([`crate::VmmLauncher::recover`]) before starting
    /// another over the same disks.
    #[serde(default)]
    pub launching: bool,
    /// The guest endpoint.
    pub guest: GuestEndpoint,
    /// Restarts so far.
    pub restarts: u32,
    /// Recent transitions.
    pub history: Vec<Transition>,
}

/// An update's remake in progress (see [`InstanceRecord::remaking`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRemake {
    /// The disks before the update.
    pub disks: PreparedDisks,
    /// The ones to make again.
    pub stale: crate::disks::DiskSet,
}

/// How a task starts.
pub(crate) enum StartMode {
    New,
    Resume(Box<InstanceRecord>),
}

enum Sup {
    Desired,
    Exited(Box<VmmExit>),
    Unresponsive(String),
}

enum RunEnd {
    Stopped,
    Failed,
}

pub(crate) struct Runner {
    ctx: Arc<Ctx>,
    id: String,
    shared: Arc<Mutex<Shared>>,
    desired: watch::Receiver<Desired>,
    spec: InstanceSpec,
    disks: Option<PreparedDisks>,
    vmm: Option<VmmRecord>,
    failures: VecDeque<Instant>,
    restarts: u32,
    guest_caps: u64,
    boot_id: Option<[u8; 16]>,
    commands: mpsc::Receiver<Command>,
    /// While the VMM is paused: the state before, and since when.
    paused: Option<(InstanceState, Instant)>,
    /// An update's disks to keep, with the stale ones to remake.
    keep: Option<(PreparedDisks, crate::disks::DiskSet)>,
    /// After a live interval change: the old interval, until the next
    /// heartbeat.
    interval_grace: Option<u32>,
    /// A VMM is being spawned, not recorded yet (persisted).
    launching: bool,
    /// A guest agent is connected (said hello, not disconnected since).
    guest_connected: bool,
}

impl Runner {
    pub(crate) fn new(
        ctx: Arc<Ctx>,
        spec: InstanceSpec,
        shared: Arc<Mutex<Shared>>,
        desired: watch::Receiver<Desired>,
        commands: mpsc::Receiver<Command>,
    ) -> Self {
        Self {
            commands,
            paused: None,
            keep: None,
            interval_grace: None,
            launching: false,
            guest_connected: false,
            id: spec.id.clone(),
            ctx,
            shared,
            desired,
            spec,
            disks: None,
            vmm: None,
            failures: VecDeque::new(),
            restarts: 0,
            guest_caps: 0,
            boot_id: None,
        }
    }

    fn dir(&self) -> PathBuf {
        self.ctx.instance_dir(&self.id)
    }

    fn disks_dir(&self) -> PathBuf {
        self.dir().join("disks")
    }

    fn endpoint(&self) -> GuestEndpoint {
        self.ctx
            .guest_endpoint(&self.id, self.spec.heartbeat_interval_ms)
    }

    fn state(&self) -> InstanceState {
        lock(&self.shared).lifecycle.state()
    }

    fn update(&self, f: impl FnOnce(&mut InstanceStatus)) {
        f(&mut lock(&self.shared).status);
    }

    /// Moves the state machine, records it, persists and announces it.
    fn go(&self, to: InstanceState, reason: impl Into<String>) {
        let reason = reason.into();
        let t = {
            let mut sh = lock(&self.shared);
            match sh.lifecycle.go(to, reason) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(instance = %self.id, "{e}");
                    return;
                }
            }
        };
        tracing::info!(instance = %self.id, from = %t.from, to = %t.to, reason = %t.reason, "transition");
        self.persist();
        let _ = self.ctx.events.send(AgentEvent::Transition {
            instance: self.id.clone(),
            transition: t,
        });
    }

    fn persist(&self) {
        let (state, history) = {
            let sh = lock(&self.shared);
            (
                sh.lifecycle.state(),
                sh.lifecycle.history().cloned().collect(),
            )
        };
        let rec = InstanceRecord {
            version: 1,
            spec: self.spec.clone(),
            state,
            disks: self.disks.clone(),
            vmm: self.vmm.clone(),
            remaking: self.keep.as_ref().map(|(disks, stale)| PendingRemake {
                disks: disks.clone(),
                stale: *stale,
            }),
            launching: self.launching,
            guest: self.endpoint(),
            restarts: self.restarts,
            history,
        };
        let path = self.dir().join("record.json");
        if let Err(e) = write_json_atomic(&path, &rec) {
            tracing::error!(instance = %self.id, "cannot write {}: {e}", path.display());
        }
    }

    fn current_desired(&mut self) -> Desired {
        self.desired.borrow_and_update().clone()
    }

    /// Whether the goal wants something other than running `self.spec`.
    fn desired_differs(&mut self) -> bool {
        match &*self.desired.borrow_and_update() {
            Desired::Removed => true,
            Desired::Run(s) => *s != self.spec,
        }
    }

    /// Waits for the goal to say anything about this instance.
    async fn wait_change(&mut self) {
        desired_changed(&mut self.desired).await;
    }

    pub(crate) async fn run(mut self, mode: StartMode) {
        if let Err(e) = std::fs::create_dir_all(self.dir()) {
            tracing::error!(instance = %self.id, "cannot create {}: {e}", self.dir().display());
        }
        let mut adopted = None;
        if let StartMode::Resume(rec) = mode {
            self.disks = rec.disks;
            if self.disks.is_none() {
                self.keep = rec.remaking.map(|r| (r.disks, r.stale));
            }
            self.restarts = rec.restarts;
            self.spec = rec.spec;
            self.update(|s| {
                s.restarts = rec.restarts;
                s.spec = self.spec.clone();
            });
            let mut recorded = rec.vmm;
            if recorded.is_none() && rec.launching && self.disks.is_some() {
                // The agent died between spawning a VMM and recording it.
                recorded = self.ctx.launcher.recover(&self.launch_spec()).await;
                if let Some(vr) = &recorded {
                    tracing::warn!(
                        instance = %self.id,
                        pid = vr.pid,
                        "found a VMM the previous agent spawned but never recorded"
                    );
                }
            }
            if let Some(vr) = recorded {
                let ls = self.launch_spec();
                match self.ctx.launcher.adopt(&ls, &vr).await {
                    Ok(h) => {
                        self.vmm = Some(vr.clone());
                        self.update(|s| s.vmm_pid = Some(vr.pid));
                        self.go(
                            InstanceState::Booted,
                            format!(
                                "re-adopted the running VMM (pid {}) after an agent restart",
                                vr.pid
                            ),
                        );
                        adopted = Some(h);
                    }
                    Err(e) => {
                        tracing::info!(instance = %self.id, "not re-adopting: {e}");
                        self.vmm = None;
                    }
                }
            }
        } else {
            self.persist();
        }
        loop {
            // The goal first: removal, or a new spec.
            match self.current_desired() {
                Desired::Removed => {
                    if let Some(h) = adopted.take() {
                        self.go(InstanceState::Stopping, "removed from the goal state");
                        self.stop_vmm(h, None).await;
                    }
                    if self.state() != InstanceState::Stopped {
                        self.go(InstanceState::Stopped, "removed from the goal state");
                    }
                    if self.remove_and_unregister() {
                        return;
                    }
                    self.go(InstanceState::Pending, "added to the goal state again");
                    continue;
                }
                Desired::Run(spec) if spec != self.spec => {
                    if let Some(h) = adopted.take() {
                        self.go(InstanceState::Stopping, "the goal changed the spec");
                        self.stop_vmm(h, None).await;
                        self.go(InstanceState::Stopped, "the goal changed the spec");
                        self.go(InstanceState::Pending, "starting with the new spec");
                    }
                    // Remake only the disks the change needs; an update that
                    // failed before leaves its stale disks to remake as well.
                    let which = crate::disks::disks_to_rebuild(&self.spec, &spec);
                    self.keep = match (self.disks.take(), self.keep.take()) {
                        (Some(d), _) => Some((d, which)),
                        (None, Some((d, stale))) => Some((d, stale.union(which))),
                        (None, None) => None,
                    };
                    match self.keep.take() {
                        Some((d, which)) if which.is_empty() => {
                            tracing::info!(instance = %self.id, "the update keeps all disks");
                            self.disks = Some(d);
                        }
                        Some((d, which)) if !which.is_all() => self.keep = Some((d, which)),
                        _ => self.remove_disks(),
                    }
                    self.spec = spec;
                    self.update(|s| s.spec = self.spec.clone());
                    self.persist();
                }
                Desired::Run(_) => {}
            }
            if adopted.is_none() && self.disks.is_none() && !self.prepare().await {
                self.wait_change().await;
                if matches!(self.current_desired_peek(), Desired::Run(_)) {
                    self.go(InstanceState::Pending, "the goal changed; trying again");
                }
                continue;
            }
            match self.run_vm(adopted.take()).await {
                RunEnd::Stopped => {
                    if matches!(self.current_desired_peek(), Desired::Run(_)) {
                        self.go(InstanceState::Pending, "starting with the new spec");
                    }
                }
                RunEnd::Failed => {
                    self.wait_change().await;
                    if matches!(self.current_desired_peek(), Desired::Run(_)) {
                        self.go(
                            InstanceState::Pending,
                            "the goal was applied again; retrying",
                        );
                        self.failures.clear();
                        self.update(|s| s.recent_failures = 0);
                    }
                }
            }
        }
    }

    fn current_desired_peek(&self) -> Desired {
        self.desired.borrow().clone()
    }

    fn remove_disks(&mut self) {
        if self.disks.take().is_some() || self.disks_dir().exists() {
            let _ = std::fs::remove_dir_all(self.disks_dir());
        }
    }

    /// Deletes everything of the instance and takes it out of the agent's map,
    /// unless the goal wants it again (then `false`).
    fn remove_and_unregister(&mut self) -> bool {
        let mut map = lock(&self.ctx.instances);
        if !matches!(&*self.desired.borrow(), Desired::Removed) {
            return false;
        }
        let ep = self.endpoint();
        let _ = std::fs::remove_file(&ep.uds_path);
        let _ = std::fs::remove_file(ep.listen_path());
        if let Err(e) = std::fs::remove_dir_all(self.dir()) {
            tracing::warn!(instance = %self.id, "cannot remove {}: {e}", self.dir().display());
        }
        map.remove(&self.id);
        drop(map);
        tracing::info!(instance = %self.id, "removed");
        let _ = self.ctx.events.send(AgentEvent::InstanceRemoved {
            instance: self.id.clone(),
        });
        true
    }

    /// Makes the disks: all three, or for an update (`keep`) only the stale
    /// ones. On failure removes what was made (an update's kept disks stay for
    /// the retry) and goes Failed.
    async fn prepare(&mut self) -> bool {
        let dir = self.disks_dir();
        if let Some((d, which)) = &self.keep {
            if let Err(e) = crate::disks::check_kept(d, *which) {
                tracing::warn!(instance = %self.id, "{e}; making all disks");
                self.keep = None;
            }
        }
        // While the update's disks are made, the record keeps the pending
        // remake (`InstanceRecord::remaking`): an agent restarted half-way
        // remakes the same disks and still keeps the others.
        match &self.keep {
            Some((_, which)) => self.go(
                InstanceState::PreparingDisks,
                format!(
                    "making {} again for the new spec, keeping {}",
                    which.phrase(),
                    which.complement().phrase()
                ),
            ),
            None => {
                self.go(
                    InstanceState::PreparingDisks,
                    "making the OS, resource and role disks",
                );
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        let result = match std::fs::create_dir_all(&dir) {
            Err(e) => Err(format!("cannot create {}: {e}", dir.display())),
            Ok(()) => {
                let sha = self.spec.image_sha256();
                match self.ctx.images.get(&sha) {
                    None => Err(format!(
                        "base image sha256:{sha} is not in the image cache; import it"
                    )),
                    Some(img) => {
                        let req = DiskRequest {
                            instance_id: self.id.clone(),
                            role: self.spec.role.clone(),
                            env: self.spec.env.clone(),
                            dir: dir.clone(),
                            base: self.ctx.images.path_of(&sha),
                            base_format: img.format,
                            role_package: self.spec.role_package.clone(),
                            resource_disk_bytes: self.spec.resource_disk_mib << 20,
                        };
                        match &self.keep {
                            Some((d, which)) => self.ctx.disks.remake(&req, d, *which).await,
                            None => self.ctx.disks.prepare(&req).await,
                        }
                        .map_err(|e| e.to_string())
                    }
                }
            }
        };
        match result {
            Ok(d) => {
                self.keep = None;
                self.disks = Some(d);
                self.persist();
                true
            }
            Err(e) => {
                // A failed remake stays pending (kept disks and the stale
                // set) for the next goal incarnation.
                match &self.keep {
                    Some((d, which)) => {
                        let kept = d.select(which.complement());
                        let kept: Vec<&std::path::Path> =
                            kept.iter().map(|c| c.path.as_path()).collect();
                        crate::disks::remove_all_but(&dir, &kept);
                    }
                    None => {
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
                self.update(|s| s.last_error = Some(e.clone()));
                self.go(
                    InstanceState::Failed,
                    format!("disk preparation failed: {e}"),
                );
                false
            }
        }
    }

    fn launch_spec(&self) -> LaunchSpec {
        let ep = self.endpoint();
        LaunchSpec {
            instance_id: self.id.clone(),
            dir: self.dir(),
            vcpus: self.spec.vcpus,
            memory_mib: self.spec.memory_mib,
            disks: self
                .disks
                .as_ref()
                .map(|d| d.in_order())
                .unwrap_or_default(),
            vsock: vmm_api::VsockConfig {
                guest_cid: vmm_api::config::MIN_GUEST_CID,
                uds_path: ep.uds_path,
            },
            guest_port: ep.port,
            serial_path: self.dir().join("serial.log"),
        }
    }

    async fn open_link(&self) -> Option<GuestLink> {
        match self.ctx.guests.open(&self.id, &self.endpoint()).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(instance = %self.id, "{e}");
                None
            }
        }
    }

    fn set_vmm(&mut self, rec: Option<VmmRecord>) {
        self.update(|s| s.vmm_pid = rec.as_ref().map(|r| r.pid));
        self.vmm = rec;
        self.persist();
    }

    async fn run_vm(&mut self, adopted: Option<Box<dyn VmmHandle>>) -> RunEnd {
        let mut adopted = adopted;
        let mut start_reason = String::from("starting the VMM");
        loop {
            let started = match adopted.take() {
                Some(h) => Ok((h, self.open_link().await)),
                None => {
                    self.go(InstanceState::Starting, start_reason.clone());
                    self.boot_id = None;
                    self.update(|s| s.boot_time_us = None);
                    match self.open_link().await {
                        None => {
                            Err("cannot listen for the guest agent; see the agent log".to_string())
                        }
                        Some(link) => {
                            // Recorded before the spawn: an agent killed
                            // between the spawn and the VMM's record looks
                            // for the VMM after its restart.
                            self.launching = true;
                            self.persist();
                            let launched = self.ctx.launcher.launch(&self.launch_spec()).await;
                            self.launching = false;
                            match launched {
                                Ok(h) => Ok((h, Some(link))),
                                Err(e) => Err(e.to_string()),
                            }
                        }
                    }
                }
            };
            // What the previous VMM's guest said does not hold for this one.
            self.paused = None;
            self.guest_caps = 0;
            self.guest_connected = false;
            self.interval_grace = None;
            let failure = match started {
                Err(e) => {
                    self.update(|s| s.last_error = Some(e.clone()));
                    self.go(
                        InstanceState::Restarting,
                        format!("the VMM did not start: {e}"),
                    );
                    e
                }
                Ok((mut handle, mut link)) => {
                    self.set_vmm(Some(handle.record()));
                    // Recorded: now the guest may run.
                    if let Err(e) = handle.boot().await {
                        let why = format!("the VMM did not boot the VM: {e}");
                        let _ = handle.stop(StopMode::Force).await;
                        match wait_bounded(&mut handle).await {
                            Some(exit) => self.vmm_exited(exit),
                            None => self.set_vmm(None),
                        }
                        drop(link);
                        self.update(|s| s.last_error = Some(why.clone()));
                        self.go(InstanceState::Restarting, why.clone());
                        why
                    } else {
                        match self.supervise(&mut handle, &mut link).await {
                            Sup::Desired => {
                                self.go(InstanceState::Stopping, "the goal state changed");
                                self.stop_vmm(handle, link).await;
                                self.go(InstanceState::Stopped, "stopped for the goal state");
                                return RunEnd::Stopped;
                            }
                            Sup::Exited(exit) => {
                                drop(link);
                                let why = format!("the VMM exited: {}", exit.summary());
                                self.vmm_exited(*exit);
                                self.go(InstanceState::Restarting, why.clone());
                                why
                            }
                            Sup::Unresponsive(why) => {
                                self.go(InstanceState::Unhealthy, why.clone());
                                let _ = handle.stop(StopMode::Force).await;
                                let exit = wait_bounded(&mut handle).await;
                                drop(link);
                                if let Some(exit) = exit {
                                    self.vmm_exited(exit);
                                } else {
                                    self.set_vmm(None);
                                }
                                self.go(InstanceState::Restarting, format!("restarting: {why}"));
                                why
                            }
                        }
                    }
                }
            };
            // The crash-loop guard.
            let now = Instant::now();
            let window = self.ctx.cfg.health.crash_loop_window;
            self.failures.push_back(now);
            while self
                .failures
                .front()
                .is_some_and(|t| now.duration_since(*t) >= window)
            {
                self.failures.pop_front();
            }
            let n = self.failures.len() as u32;
            self.update(|s| s.recent_failures = n);
            let policy = &self.ctx.cfg.health;
            if n >= policy.crash_loop_failures {
                let why = format!(
                    "crash loop: {n} failures within {}s (last: {failure}); not restarting until the goal changes",
                    window.as_secs()
                );
                self.update(|s| s.last_error = Some(why.clone()));
                self.go(InstanceState::Failed, why);
                return RunEnd::Failed;
            }
            let delay = policy
                .backoff_initial
                .saturating_mul(1 << (n.saturating_sub(1)).min(20))
                .min(policy.backoff_max);
            tracing::info!(instance = %self.id, ?delay, "restarting after backoff");
            let t = tokio::time::sleep(delay);
            tokio::pin!(t);
            loop {
                tokio::select! {
                    _ = &mut t => break,
                    _ = self.wait_change() => {
                        if self.desired_differs() {
                            self.go(InstanceState::Stopping, "the goal state changed");
                            self.go(InstanceState::Stopped, "stopped for the goal state");
                            return RunEnd::Stopped;
                        }
                    }
                }
            }
            self.restarts += 1;
            self.update(|s| s.restarts = self.restarts);
            start_reason = format!("restart {} after {:?} backoff", self.restarts, delay);
        }
    }

    fn vmm_exited(&mut self, exit: VmmExit) {
        tracing::info!(
            instance = %self.id,
            status = exit.status,
            signal = exit.signal,
            "VMM exited: {}",
            exit.summary()
        );
        let _ = self.ctx.events.send(AgentEvent::VmmExited {
            instance: self.id.clone(),
            exit: exit.clone(),
        });
        self.update(|s| s.last_exit = Some(exit));
        self.set_vmm(None);
    }

    async fn supervise(
        &mut self,
        handle: &mut Box<dyn VmmHandle>,
        link: &mut Option<GuestLink>,
    ) -> Sup {
        let policy = self.ctx.cfg.health.clone();
        let mut boot_deadline = Instant::now() + policy.boot_timeout;
        let mut last_life: Option<Instant> = None;
        let mut vmm_events = handle.take_events();
        loop {
            let interval = self
                .spec
                .heartbeat_interval_ms
                .max(self.interval_grace.unwrap_or(0));
            let hb_timeout = policy.heartbeat_timeout(interval);
            // No deadline while paused: a parked guest cannot send anything.
            let deadline = match self.paused {
                Some(_) => None,
                None => Some(last_life.map_or(boot_deadline, |t| t + hb_timeout)),
            };
            let was_paused = self.paused.is_some();
            tokio::select! {
                exit = handle.wait() => return Sup::Exited(Box::new(exit)),
                ev = next_event(link) => match ev {
                    Some(ev) => self.on_guest(ev, &mut last_life),
                    None => *link = None,
                },
                ev = recv_opt(&mut vmm_events) => match ev {
                    Some(ev) => self.on_vmm(ev, &mut last_life, &mut boot_deadline),
                    None => vmm_events = None,
                },
                Some(cmd) = self.commands.recv() => {
                    self.on_command(cmd, handle, &mut last_life, &mut boot_deadline).await;
                }
                _ = crate::util::sleep_until_opt(deadline) => {
                    return Sup::Unresponsive(match last_life {
                        None => format!("the guest agent did not say hello within {:?}", policy.boot_timeout),
                        Some(_) => format!("no heartbeat for {hb_timeout:?}"),
                    });
                }
                _ = desired_changed(&mut self.desired) => {
                    if self.desired_differs() {
                        if self.set_interval_live(link, &mut last_life) {
                            continue;
                        }
                        return Sup::Desired;
                    }
                }
            }
            // The guest channel's own clocks stop while the VM is parked.
            let paused = self.paused.is_some();
            if paused != was_paused {
                if let Some(l) = link {
                    let _ = l.commands.try_send(HostCommand::VmPaused(paused));
                }
            }
        }
    }

    /// A goal change of the heartbeat interval alone, for a guest that takes
    /// `SetHeartbeatInterval` (and is running, connected): applied live, the
    /// VMM keeps running. Returns whether it was.
    fn set_interval_live(
        &mut self,
        link: &Option<GuestLink>,
        last_life: &mut Option<Instant>,
    ) -> bool {
        let Desired::Run(new) = self.current_desired_peek() else {
            return false;
        };
        let mut same_but_interval = self.spec.clone();
        same_but_interval.heartbeat_interval_ms = new.heartbeat_interval_ms;
        let capable = self.guest_caps & guest_proto::Capabilities::HEARTBEAT_INTERVAL.bits() != 0;
        let connected = self.guest_connected;
        let (Some(l), true, true, true, None) = (
            link,
            same_but_interval == new,
            capable,
            connected,
            self.paused,
        ) else {
            return false;
        };
        let (old, ms) = (self.spec.heartbeat_interval_ms, new.heartbeat_interval_ms);
        if l.commands
            .try_send(HostCommand::SetHeartbeatInterval(ms))
            .is_err()
        {
            return false;
        }
        tracing::info!(instance = %self.id, old, new = ms, "heartbeat interval changed live");
        // Until the guest's next heartbeat, the longer of the two intervals
        // sets the deadline; the clock starts afresh.
        self.interval_grace = Some(old);
        if last_life.is_some() {
            *last_life = Some(Instant::now());
        }
        self.spec = new;
        self.update(|s| s.spec = self.spec.clone());
        self.persist();
        true
    }

    /// The state, or while paused the one it resumes to.
    fn effective_state(&self) -> InstanceState {
        match self.paused {
            Some((before, _)) => before,
            None => self.state(),
        }
    }

    /// A transition the guest's word asks for; while paused it changes the
    /// state the instance resumes to instead (a Hello or Ready queued before
    /// the pause is not lost).
    fn move_to(&mut self, to: InstanceState, reason: impl Into<String>) {
        match &mut self.paused {
            Some((before, _)) if before.can_go_to(to) => {
                tracing::info!(instance = %self.id, from = %before, %to, reason = %reason.into(), "while paused");
                *before = to;
            }
            Some(_) => {}
            None => self.go(to, reason),
        }
    }

    /// Enters `Paused` (once), remembering where to go back to.
    fn enter_paused(&mut self, reason: &str) {
        let state = self.state();
        if self.paused.is_some() || !state.can_go_to(InstanceState::Paused) {
            return;
        }
        self.paused = Some((state, Instant::now()));
        self.go(InstanceState::Paused, reason);
    }

    /// Leaves `Paused` for the state before it; the health clocks restart, so
    /// the time spent paused does not count against the guest.
    fn leave_paused(
        &mut self,
        reason: &str,
        last_life: &mut Option<Instant>,
        boot_deadline: &mut Instant,
    ) {
        let Some((before, since)) = self.paused.take() else {
            return;
        };
        let now = Instant::now();
        *boot_deadline += now.duration_since(since);
        if last_life.is_some() {
            *last_life = Some(now);
        }
        self.go(before, reason);
    }

    /// An event the VMM pushed on its control socket.
    fn on_vmm(
        &mut self,
        ev: VmmEvent,
        last_life: &mut Option<Instant>,
        boot_deadline: &mut Instant,
    ) {
        match ev {
            VmmEvent::BootTimer { us } => {
                tracing::info!(instance = %self.id, boot_time_us = us, "the guest wrote the boot timer");
                self.update(|s| s.boot_time_us = Some(us));
                let _ = self.ctx.events.send(AgentEvent::GuestBooted {
                    instance: self.id.clone(),
                    boot_time_us: us,
                });
                if self.effective_state() == InstanceState::Starting {
                    self.move_to(
                        InstanceState::Booted,
                        format!(
                            "the guest booted: boot timer {:.1} ms after the VMM started",
                            us as f64 / 1000.0
                        ),
                    );
                }
            }
            VmmEvent::Paused => {
                self.enter_paused("the VMM reports its vCPUs paused");
            }
            VmmEvent::Resumed => {
                self.leave_paused(
                    "the VMM reports its vCPUs running again",
                    last_life,
                    boot_deadline,
                );
            }
            VmmEvent::Stopping {
                reason,
                exit_code,
                detail,
            } => {
                tracing::info!(instance = %self.id, ?reason, exit_code, %detail, "the VMM is stopping");
            }
        }
    }

    /// Pause or resume, asked through the agent.
    async fn on_command(
        &mut self,
        cmd: Command,
        handle: &mut Box<dyn VmmHandle>,
        last_life: &mut Option<Instant>,
        boot_deadline: &mut Instant,
    ) {
        let (pause, reply) = match cmd {
            Command::Pause(r) => (true, r),
            Command::Resume(r) => (false, r),
        };
        if reply.is_closed() {
            // The caller gave up waiting (the request came between VMMs).
            return;
        }
        let state = self.state();
        let wrong = |what| InstanceOpError::WrongState {
            id: self.id.clone(),
            state,
            what,
        };
        let result = if pause {
            if self.paused.is_some() {
                Err(wrong("it is paused already"))
            } else if !state.can_go_to(InstanceState::Paused) {
                Err(wrong(
                    "only a starting, booted or ready instance can be paused",
                ))
            } else {
                match handle.pause().await {
                    Ok(()) => {
                        self.enter_paused("paused through the agent");
                        Ok(())
                    }
                    Err(source) => Err(InstanceOpError::Vmm {
                        id: self.id.clone(),
                        source,
                    }),
                }
            }
        } else if self.paused.is_none() {
            Err(wrong("only a paused instance can be resumed"))
        } else {
            match handle.resume().await {
                Ok(()) => {
                    self.leave_paused("resumed through the agent", last_life, boot_deadline);
                    Ok(())
                }
                Err(source) => Err(InstanceOpError::Vmm {
                    id: self.id.clone(),
                    source,
                }),
            }
        };
        let _ = reply.send(result);
    }

    fn on_guest(&mut self, ev: GuestEvent, last_life: &mut Option<Instant>) {
        let now = Instant::now();
        // While paused, what the guest says moves the state it resumes to.
        let state = self.effective_state();
        match ev {
            GuestEvent::Hello {
                boot_id,
                version,
                capabilities,
                agent_version,
            } => {
                *last_life = Some(now);
                self.guest_connected = true;
                let rebooted = self.boot_id.is_some_and(|b| b != boot_id);
                self.boot_id = Some(boot_id);
                self.guest_caps = capabilities;
                let info = GuestInfo {
                    boot_id: boot_id_hex(&boot_id),
                    protocol_version: version,
                    capabilities,
                    agent_version: agent_version.clone(),
                };
                let _ = self.ctx.events.send(AgentEvent::GuestHello {
                    instance: self.id.clone(),
                    boot_id: info.boot_id.clone(),
                    agent_version: agent_version.clone(),
                });
                self.update(|s| {
                    s.guest = Some(info);
                    s.last_heartbeat_unix_ms = Some(now_unix_ms());
                });
                match state {
                    InstanceState::Starting => self.move_to(
                        InstanceState::Booted,
                        format!("the guest agent said hello ({agent_version}, protocol {version})"),
                    ),
                    InstanceState::Ready if rebooted => {
                        self.move_to(InstanceState::Booted, "the guest rebooted (new boot id)")
                    }
                    _ => {}
                }
            }
            GuestEvent::Heartbeat {
                seq,
                role,
                role_restarts: _,
                ..
            } => {
                *last_life = Some(now);
                self.interval_grace = None;
                self.update(|s| {
                    s.last_heartbeat_unix_ms = Some(now_unix_ms());
                    s.heartbeat_seq = Some(seq);
                    s.role = Some(role);
                });
                match (state, role) {
                    (InstanceState::Booted, RoleStatus::Ready) => {
                        self.move_to(InstanceState::Ready, "a heartbeat says the role is ready")
                    }
                    (InstanceState::Ready, RoleStatus::Exited | RoleStatus::Failed) => self
                        .move_to(
                            InstanceState::Booted,
                            format!("a heartbeat says the role is {role:?}"),
                        ),
                    _ => {}
                }
            }
            GuestEvent::Ready => {
                *last_life = Some(now);
                if state == InstanceState::Booted {
                    self.move_to(InstanceState::Ready, "the guest reported ready");
                }
            }
            GuestEvent::RoleStarted { pid } => {
                *last_life = Some(now);
                tracing::info!(instance = %self.id, pid, "role started");
            }
            GuestEvent::RoleExited { pid, how } => {
                *last_life = Some(now);
                tracing::info!(instance = %self.id, pid, %how, "role exited");
                let _ = self.ctx.events.send(AgentEvent::RoleExited {
                    instance: self.id.clone(),
                    how: how.clone(),
                });
                if state == InstanceState::Ready {
                    self.move_to(InstanceState::Booted, format!("the role exited ({how})"));
                }
            }
            GuestEvent::Pong { .. } => *last_life = Some(now),
            GuestEvent::Disconnected {
                reason,
                misbehaving,
            } => {
                self.guest_connected = false;
                if misbehaving {
                    let _ = self.ctx.events.send(AgentEvent::GuestMisbehaved {
                        instance: self.id.clone(),
                        reason,
                    });
                }
            }
        }
    }

    /// Stops a VMM: the guest's own shutdown if it can, then SIGTERM (or the
    /// control socket), then SIGKILL.
    async fn stop_vmm(&mut self, mut handle: Box<dyn VmmHandle>, link: Option<GuestLink>) {
        let grace = self.ctx.cfg.health.stop_grace;
        let half = grace / 2;
        let mut exit = None;
        // A parked guest cannot shut down: let it run first. Also when the
        // agent does not know it is paused (a VMM re-adopted paused, stopped
        // before its events were read): a running VM refuses the resume,
        // which is fine.
        let was_paused = self.paused.take().is_some();
        if let Err(e) = handle.resume().await {
            if was_paused {
                tracing::warn!(instance = %self.id, "cannot resume before stopping: {e}");
            }
        }
        if let Some(l) = &link {
            if self.guest_caps & guest_proto::Capabilities::SHUTDOWN.bits() != 0 {
                let deadline_ms = u32::try_from(half.as_millis()).unwrap_or(u32::MAX);
                let _ = l.commands.try_send(HostCommand::Shutdown { deadline_ms });
                exit = tokio::time::timeout(half, handle.wait()).await.ok();
            }
        }
        if exit.is_none() {
            if let Err(e) = handle.stop(StopMode::Graceful).await {
                tracing::warn!(instance = %self.id, "{e}");
            }
            exit = tokio::time::timeout(half, handle.wait()).await.ok();
        }
        if exit.is_none() {
            tracing::warn!(instance = %self.id, "the VMM did not stop within {grace:?}; killing it");
            if let Err(e) = handle.stop(StopMode::Force).await {
                tracing::warn!(instance = %self.id, "{e}");
            }
            exit = wait_bounded(&mut handle).await;
        }
        drop(link);
        match exit {
            Some(e) => self.vmm_exited(e),
            None => {
                tracing::error!(instance = %self.id, "the VMM survived SIGKILL for 10 s");
                self.set_vmm(None);
            }
        }
    }
}

async fn wait_bounded(handle: &mut Box<dyn VmmHandle>) -> Option<VmmExit> {
    tokio::time::timeout(Duration::from_secs(10), handle.wait())
        .await
        .ok()
}

async fn desired_changed(desired: &mut watch::Receiver<Desired>) {
    if desired.changed().await.is_err() {
        // The agent is gone; nothing will ever change.
        std::future::pending::<()>().await;
    }
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_event(link: &mut Option<GuestLink>) -> Option<GuestEvent> {
    match link {
        Some(l) => l.events.recv().await,
        None => std::future::pending().await,
    }
}

/// Locks a std mutex, ignoring poisoning (the data are plain values).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn new_shared(spec: &InstanceSpec, history: Vec<Transition>) -> Shared {
    let lifecycle = if history.is_empty() {
        Lifecycle::new()
    } else {
        Lifecycle::resume(history)
    };
    Shared {
        status: InstanceStatus {
            id: spec.id.clone(),
            spec: spec.clone(),
            state: lifecycle.state(),
            since_unix_ms: lifecycle.since_unix_ms(),
            restarts: 0,
            recent_failures: 0,
            last_heartbeat_unix_ms: None,
            heartbeat_seq: None,
            role: None,
            guest: None,
            vmm_pid: None,
            boot_time_us: None,
            last_exit: None,
            last_error: None,
            history: Vec::new(),
        },
        lifecycle,
    }
}
