//! The instance task: reconciles one instance towards what the goal wants
//! (prepare or remake disks, start or re-adopt the VMM, restart it with
//! backoff until the crash-loop guard trips, stop it, remove the instance).
//! One VMM's supervision is in `supervise.rs`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::policy::{FailureHistory, Verdict};
use super::record::{InstanceRecord, PendingRemake, StartMode, RECORD_VERSION};
use super::{
    Command, Desired, IllegalTransition, InstanceEnv, InstanceState, InstanceStatus, Lifecycle,
    Shared, Transition,
};
use crate::backend::disks::{DiskRequest, DiskSet, PreparedDisks};
use crate::backend::guest::{GuestEndpoint, GuestEvent, GuestLink, HostCommand};
use crate::backend::vmm::{LaunchSpec, StopMode, VmmExit, VmmHandle, VmmRecord};
use crate::events::AgentEvent;
use crate::spec::InstanceSpec;
use crate::util::{lock, now_unix_ms};

pub(super) enum Sup {
    Desired,
    Exited(Box<VmmExit>),
    Unresponsive(String),
}

enum RunEnd {
    Stopped,
    Failed,
}

/// An instance task's state. The behaviour is split over `task.rs` (the
/// life: disks, VMMs, restarts, removal) and `supervise.rs` (one VMM).
pub(crate) struct Runner {
    pub(super) env: Arc<InstanceEnv>,
    pub(super) id: String,
    pub(super) shared: Arc<Mutex<Shared>>,
    pub(super) desired: watch::Receiver<Desired>,
    pub(super) spec: InstanceSpec,
    disks: Option<PreparedDisks>,
    vmm: Option<VmmRecord>,
    /// The crash-loop guard's failures, on [`Runner::clock_ms`].
    failures: FailureHistory,
    /// The task's clock starts here (see [`Runner::clock_ms`]).
    epoch: Instant,
    restarts: u32,
    pub(super) guest_caps: u64,
    pub(super) boot_id: Option<[u8; 16]>,
    pub(super) commands: mpsc::Receiver<Command>,
    /// While the VMM is paused: since when (the lifecycle knows the state it
    /// resumes to).
    pub(super) paused_since: Option<Instant>,
    /// An update's disks to keep, with the stale ones to remake.
    keep: Option<(PreparedDisks, DiskSet)>,
    /// After a live interval change: the old interval, until the next
    /// heartbeat.
    pub(super) interval_grace: Option<u32>,
    /// A VMM is being spawned, not recorded yet (persisted).
    launching: bool,
    /// A guest agent is connected (said hello, not disconnected since).
    pub(super) guest_connected: bool,
    /// The instance's network, while it holds an address (persisted).
    net: Option<crate::network::InstanceNet>,
}

impl Runner {
    pub(crate) fn new(
        env: Arc<InstanceEnv>,
        spec: InstanceSpec,
        shared: Arc<Mutex<Shared>>,
        desired: watch::Receiver<Desired>,
        commands: mpsc::Receiver<Command>,
    ) -> Self {
        Self {
            commands,
            paused_since: None,
            keep: None,
            interval_grace: None,
            launching: false,
            guest_connected: false,
            net: None,
            id: spec.id.clone(),
            env,
            shared,
            desired,
            spec,
            disks: None,
            vmm: None,
            failures: FailureHistory::default(),
            epoch: Instant::now(),
            restarts: 0,
            guest_caps: 0,
            boot_id: None,
        }
    }

    /// Milliseconds on the task's monotonic clock (tokio's, so tests can move
    /// it). It starts at the crash-loop window, so a failure up to one window
    /// before the task started (read from the record) has a time on it.
    fn clock_ms(&self) -> u64 {
        let window =
            u64::try_from(self.env.health.crash_loop_window.as_millis()).unwrap_or(u64::MAX / 2);
        let elapsed = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX / 2);
        window.saturating_add(elapsed)
    }

    fn dir(&self) -> PathBuf {
        self.env.instance_dir(&self.id)
    }

    fn disks_dir(&self) -> PathBuf {
        self.dir().join("disks")
    }

    pub(super) fn endpoint(&self) -> GuestEndpoint {
        self.env
            .guest_endpoint(&self.id, self.spec.heartbeat_interval_ms)
    }

    pub(super) fn state(&self) -> InstanceState {
        lock(&self.shared).lifecycle.state()
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut InstanceStatus)) {
        f(&mut lock(&self.shared).status);
    }

    /// Moves the state machine, records it, persists and announces it. An
    /// illegal transition is a bug: it fails debug builds (every test) and is
    /// logged and refused in release builds.
    pub(super) fn go(&self, to: InstanceState, reason: impl Into<String>) {
        self.apply(|l| l.go(to, reason).map(Some));
    }

    /// A transition the guest's or the VMM's word asks for: while paused it
    /// moves the state the instance resumes to instead.
    pub(super) fn go_or_defer(&self, to: InstanceState, reason: impl Into<String>) {
        self.apply(|l| l.go_or_defer(to, reason));
    }

    /// Leaves `Paused` for the state it was entered from.
    pub(super) fn go_resume(&self, reason: &str) {
        self.apply(|l| l.resume(reason).map(Some));
    }

    fn apply(
        &self,
        f: impl FnOnce(&mut Lifecycle) -> Result<Option<Transition>, IllegalTransition>,
    ) {
        let t = {
            let mut sh = lock(&self.shared);
            match f(&mut sh.lifecycle) {
                Ok(Some(t)) => {
                    if t.to == InstanceState::Ready {
                        sh.status.last_error = None;
                    }
                    t
                }
                Ok(None) => {
                    tracing::info!(instance = %self.id, resumes_to = ?sh.lifecycle.resume_to(), "while paused");
                    return;
                }
                Err(e) => {
                    drop(sh);
                    tracing::error!(instance = %self.id, "{e}");
                    debug_assert!(false, "instance {}: {e}", self.id);
                    return;
                }
            }
        };
        tracing::info!(instance = %self.id, from = %t.from, to = %t.to, reason = %t.reason, "transition");
        self.persist();
        let _ = self.env.events.send(AgentEvent::Transition {
            instance: self.id.clone(),
            transition: t,
        });
    }

    pub(super) fn persist(&self) {
        let (state, history, last_error) = {
            let sh = lock(&self.shared);
            (
                sh.lifecycle.state(),
                sh.lifecycle.history().cloned().collect(),
                sh.status.last_error.clone(),
            )
        };
        let now = self.clock_ms();
        let rec = InstanceRecord {
            version: RECORD_VERSION,
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
            failure_ages_ms: self
                .failures
                .times()
                .map(|t| now.saturating_sub(t))
                .collect(),
            last_error,
            net: self.net.clone(),
            written_unix_ms: now_unix_ms(),
        };
        if let Err(e) = rec.write(&self.dir()) {
            tracing::error!(instance = %self.id, "cannot write the record in {}: {e}", self.dir().display());
        }
    }

    pub(super) fn current_desired(&mut self) -> Desired {
        self.desired.borrow_and_update().clone()
    }

    /// Whether the goal wants something other than running `self.spec`.
    pub(super) fn desired_differs(&mut self) -> bool {
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
        if let Err(e) = crate::util::create_private_dir(&self.dir(), 0o700) {
            tracing::error!(instance = %self.id, "cannot create {}: {e}", self.dir().display());
        }
        let mut adopted = None;
        // Failed before the agent restarted: stays failed until the goal
        // changes (or a new incarnation retries it).
        let mut resumed_failed: Option<String> = None;
        if let StartMode::Resume(rec) = mode {
            self.disks = rec.disks;
            if self.disks.is_none() {
                self.keep = rec.remaking.map(|r| (r.disks, r.stale));
            }
            self.restarts = rec.restarts;
            self.spec = rec.spec;
            // Reserved for it by the agent before this task started.
            self.net = rec.net.filter(|_| self.env.net.is_some());
            // The crash-loop history goes on where the last agent left it.
            let now = self.clock_ms();
            let since_written = now_unix_ms().saturating_sub(rec.written_unix_ms);
            let window =
                u64::try_from(self.env.health.crash_loop_window.as_millis()).unwrap_or(u64::MAX);
            self.failures = FailureHistory::from_times(
                rec.failure_ages_ms
                    .iter()
                    .map(|age| age.saturating_add(since_written))
                    .filter(|age| *age < window)
                    .map(|age| now.saturating_sub(age))
                    .collect(),
            );
            let recent = self.failures.recent(&self.env.health, now);
            self.update(|s| {
                s.restarts = rec.restarts;
                s.spec = self.spec.clone();
                s.recent_failures = recent;
                s.last_error = rec.last_error.clone();
                s.net = self.net.clone();
            });
            if rec.state == InstanceState::Failed && rec.vmm.is_none() {
                resumed_failed = Some(rec.last_error.clone().unwrap_or_else(|| "failed".into()));
            }
            let mut recorded = rec.vmm;
            if recorded.is_none() && rec.launching && self.disks.is_some() {
                // The agent died between spawning a VMM and recording it.
                recorded = self
                    .env
                    .backends
                    .launcher
                    .recover(&self.launch_spec())
                    .await;
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
                match self.env.backends.launcher.adopt(&ls, &vr).await {
                    Ok(h) => {
                        if let (Some(net), Some(n)) = (&self.env.net, &self.net) {
                            // Its VMM holds the TAP open: kept and checked.
                            if let Err(e) = net.attach(n).await {
                                tracing::warn!(instance = %self.id, "the adopted instance's network: {e}");
                            }
                        }
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
                        let link = self.reconnect_guest().await;
                        self.stop_vmm(h, link).await;
                    }
                    if self.state() != InstanceState::Stopped {
                        self.go(InstanceState::Stopped, "removed from the goal state");
                    }
                    self.release_net().await;
                    if self.remove_and_end() {
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
                    let which = crate::backend::disks::disks_to_rebuild(&self.spec, &spec);
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
                    resumed_failed = None;
                }
                Desired::Run(_) => {
                    if let Some(why) = resumed_failed.take() {
                        self.go(
                            InstanceState::Failed,
                            format!("failed before the agent restarted ({why}); not restarting until the goal changes"),
                        );
                        self.wait_failed().await;
                        continue;
                    }
                }
            }
            if !self.ensure_net(adopted.is_some()).await {
                continue;
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
                RunEnd::Failed => self.wait_failed().await,
            }
        }
    }

    /// Failed: waits for the goal to say anything, then (when it still wants
    /// the instance) retries with a fresh crash-loop history.
    async fn wait_failed(&mut self) {
        self.wait_change().await;
        if matches!(self.current_desired_peek(), Desired::Run(_)) {
            self.go(
                InstanceState::Pending,
                "the goal was applied again; retrying",
            );
            self.failures.clear();
            self.update(|s| s.recent_failures = 0);
            self.persist();
        }
    }

    pub(super) fn current_desired_peek(&self) -> Desired {
        self.desired.borrow().clone()
    }

    /// Gives the instance an address when the node has an instance subnet
    /// and it holds none yet (recorded at once). When the subnet is full
    /// (instances being removed still hold theirs), waits for an address to
    /// be freed or the goal to change, and returns `false` (the caller goes
    /// round its loop again). An instance from before the network existed
    /// gets its role disk remade, so its guest learns the address.
    async fn ensure_net(&mut self, adopted: bool) -> bool {
        let Some(net) = self.env.net.clone() else {
            return true;
        };
        if self.net.is_some() {
            return true;
        }
        let freed = net.freed();
        tokio::pin!(freed);
        freed.as_mut().enable();
        match net.allocate(&self.id) {
            Ok(n) => {
                tracing::info!(instance = %self.id, address = %n.address, tap = %n.tap, "allocated the instance's address");
                self.update(|s| s.net = Some(n.clone()));
                self.net = Some(n);
                if !adopted {
                    if let Some(d) = self.disks.take() {
                        self.keep = Some((
                            d,
                            DiskSet {
                                role: true,
                                ..DiskSet::NONE
                            },
                        ));
                    }
                }
                self.persist();
                true
            }
            Err(e) => {
                let why = e.to_string();
                tracing::warn!(instance = %self.id, "{why}");
                self.update(|s| s.last_error = Some(why));
                self.persist();
                tokio::select! {
                    _ = freed => {}
                    _ = self.wait_change() => {}
                }
                false
            }
        }
    }

    /// Makes the instance's TAP and rules before a VMM starts.
    async fn attach_net(&self) -> Result<(), String> {
        let (Some(net), Some(n)) = (&self.env.net, &self.net) else {
            return Ok(());
        };
        net.attach(n)
            .await
            .map_err(|e| format!("cannot make the instance's network: {e}"))
    }

    /// Removes the TAP, frees the address and drops its rules.
    async fn release_net(&mut self) {
        if let (Some(net), Some(n)) = (self.env.net.clone(), self.net.take()) {
            if let Err(e) = net.release(&self.id, &n).await {
                tracing::error!(instance = %self.id, "releasing the instance's network: {e}");
            }
            self.update(|s| s.net = None);
            self.persist();
        }
    }

    fn remove_disks(&mut self) {
        if self.disks.take().is_some() || self.disks_dir().exists() {
            let _ = std::fs::remove_dir_all(self.disks_dir());
        }
    }

    /// Deletes everything of the instance and ends the task, unless the goal
    /// wants it again (then `false`). The end is marked under the status lock
    /// the owner takes to change the desired state, so no change is lost.
    fn remove_and_end(&mut self) -> bool {
        if !matches!(&*self.desired.borrow(), Desired::Removed) {
            return false;
        }
        let ep = self.endpoint();
        let _ = std::fs::remove_file(&ep.uds_path);
        let _ = std::fs::remove_file(ep.listen_path());
        // The jail and cgroup (its VMM has exited), then the sockets' directory.
        self.env.backends.launcher.remove(&self.launch_spec());
        let run = self.env.run_dir(&self.id);
        if let Err(e) = std::fs::remove_dir_all(&run) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(instance = %self.id, "cannot remove {}: {e}", run.display());
            }
        }
        if let Err(e) = std::fs::remove_dir_all(self.dir()) {
            tracing::warn!(instance = %self.id, "cannot remove {}: {e}", self.dir().display());
        }
        {
            let mut sh = lock(&self.shared);
            if !matches!(&*self.desired.borrow(), Desired::Removed) {
                // Wanted again while the files went: start afresh.
                drop(sh);
                let _ = crate::util::create_private_dir(&self.dir(), 0o700);
                return false;
            }
            sh.ended = true;
        }
        tracing::info!(instance = %self.id, "removed");
        let _ = self.env.events.send(AgentEvent::InstanceRemoved {
            instance: self.id.clone(),
        });
        let _ = self.env.ended.send(self.id.clone());
        true
    }

    /// Makes the disks: all three, or for an update (`keep`) only the stale
    /// ones. On failure removes what was made (an update's kept disks stay for
    /// the retry) and goes Failed.
    async fn prepare(&mut self) -> bool {
        let dir = self.disks_dir();
        if let Some((d, which)) = &self.keep {
            if let Err(e) = crate::backend::disks::check_kept(d, *which) {
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
        let result = match crate::util::create_private_dir(&dir, 0o700) {
            Err(e) => Err(format!("cannot create {}: {e}", dir.display())),
            Ok(()) => {
                let sha = self.spec.image_sha256();
                match self.env.images.get(&sha) {
                    None => Err(format!(
                        "base image sha256:{sha} is not in the image cache; import it"
                    )),
                    Some(img) => match crate::node::check_role_package(
                        &self.env.role_roots,
                        &self.spec.role_package,
                    ) {
                        Err(e) => Err(e),
                        Ok(role_package) => {
                            let req = DiskRequest {
                                instance_id: self.id.clone(),
                                role: self.spec.role.clone(),
                                env: self.spec.env.clone(),
                                dir: dir.clone(),
                                base: self.env.images.path_of(&sha),
                                base_format: img.format,
                                role_package,
                                resource_disk_bytes: self.spec.resource_disk_mib << 20,
                                net: self.net.as_ref().map(|n| n.for_guest()),
                            };
                            match &self.keep {
                                Some((d, which)) => {
                                    self.env.backends.disks.remake(&req, d, *which).await
                                }
                                None => self.env.backends.disks.prepare(&req).await,
                            }
                            .map_err(|e| e.to_string())
                        }
                    },
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
                        crate::backend::disks::remove_all_but(&dir, &kept);
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
                .unwrap_or_default()
                .into_iter()
                .map(|mut d| {
                    d.rate_limit = self.env.disk_rate_limit(&self.spec);
                    d
                })
                .collect(),
            vsock: vmm_api::VsockConfig {
                guest_cid: vmm_api::config::MIN_GUEST_CID,
                uds_path: ep.uds_path,
            },
            guest_port: ep.port,
            serial_path: self.dir().join("serial.log"),
            net: self.net.as_ref().map(|n| n.vmm_config()),
        }
    }

    async fn open_link(&self) -> Option<GuestLink> {
        match self
            .env
            .backends
            .guests
            .open(&self.id, &self.endpoint())
            .await
        {
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
                        Some(link) => match self.attach_net().await {
                            Err(e) => Err(e),
                            Ok(()) => {
                                // Recorded before the spawn: an agent killed
                                // between the spawn and the VMM's record looks
                                // for the VMM after its restart.
                                self.launching = true;
                                self.persist();
                                let launched =
                                    self.env.backends.launcher.launch(&self.launch_spec()).await;
                                self.launching = false;
                                match launched {
                                    Ok(h) => Ok((h, Some(link))),
                                    Err(e) => Err(e.to_string()),
                                }
                            }
                        },
                    }
                }
            };
            // What the previous VMM's guest said does not hold for this one.
            self.paused_since = None;
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
                        let exit = self.kill_until_gone(&mut handle).await;
                        self.vmm_exited(exit);
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
                                let exit = self.kill_until_gone(&mut handle).await;
                                drop(link);
                                self.vmm_exited(exit);
                                self.go(InstanceState::Restarting, format!("restarting: {why}"));
                                why
                            }
                        }
                    }
                }
            };
            // The crash-loop guard.
            let verdict = self.failures.record(&self.env.health, self.clock_ms());
            let delay = match verdict {
                Verdict::GiveUp { recent } => {
                    self.update(|s| s.recent_failures = recent);
                    let why = format!(
                        "crash loop: {recent} failures within {}s (last: {failure}); not restarting until the goal changes",
                        self.env.health.crash_loop_window.as_secs()
                    );
                    self.update(|s| s.last_error = Some(why.clone()));
                    self.go(InstanceState::Failed, why);
                    return RunEnd::Failed;
                }
                Verdict::Restart { delay, recent } => {
                    self.update(|s| s.recent_failures = recent);
                    self.persist();
                    delay
                }
            };
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
        let _ = self.env.events.send(AgentEvent::VmmExited {
            instance: self.id.clone(),
            exit: Box::new(exit.clone()),
        });
        self.update(|s| s.last_exit = Some(exit));
        self.set_vmm(None);
    }

    /// For a re-adopted VMM about to be stopped: listens for its guest agent,
    /// which reconnects within a heartbeat interval of the agent's restart,
    /// so the guest can be asked to shut down itself; `None` when it does not
    /// say hello in time (at most half the stop grace).
    async fn reconnect_guest(&mut self) -> Option<GuestLink> {
        let mut link = self.open_link().await?;
        let within = (Duration::from_millis(u64::from(self.spec.heartbeat_interval_ms))
            + Duration::from_secs(1))
        .min(self.env.health.stop_grace / 2);
        let hello = tokio::time::timeout(within, async {
            while let Some(ev) = link.events.recv().await {
                if let GuestEvent::Hello { capabilities, .. } = ev {
                    return Some(capabilities);
                }
            }
            None
        })
        .await;
        match hello {
            Ok(Some(caps)) => {
                self.guest_caps = caps;
                Some(link)
            }
            _ => None,
        }
    }

    /// Stops a VMM: the guest's own shutdown if it can, then SIGTERM (or the
    /// control socket), then SIGKILL.
    async fn stop_vmm(&mut self, mut handle: Box<dyn VmmHandle>, link: Option<GuestLink>) {
        let grace = self.env.health.stop_grace;
        let half = grace / 2;
        let started = Instant::now();
        let mut exit = None;
        // A parked guest cannot shut down: let it run first. Also when the
        // agent does not know it is paused (a VMM re-adopted paused, stopped
        // before its events were read): a running VM refuses the resume,
        // which is fine.
        let was_paused = self.paused_since.take().is_some();
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
        let exit = match exit {
            Some(e) => e,
            None => {
                tracing::warn!(
                    instance = %self.id,
                    "the VMM did not stop within {:?} of being asked; killing it",
                    started.elapsed()
                );
                self.kill_until_gone(&mut handle).await
            }
        };
        drop(link);
        self.vmm_exited(exit);
    }

    /// SIGKILL until the VMM is known to have ended. A VMM not known to be
    /// gone (unkillable, or `/proc` unreadable so it cannot even be signalled
    /// safely) is never forgotten: forgetting it would let a second VMM start
    /// over the same disks. So this keeps trying, and says so.
    async fn kill_until_gone(&mut self, handle: &mut Box<dyn VmmHandle>) -> VmmExit {
        let started = Instant::now();
        loop {
            if let Err(e) = handle.stop(StopMode::Force).await {
                tracing::warn!(instance = %self.id, "{e}");
            }
            if let Some(exit) = wait_bounded(handle).await {
                return exit;
            }
            tracing::error!(
                instance = %self.id,
                pid = ?self.vmm.as_ref().map(|v| v.pid),
                "the VMM is not known to have ended {:?} after SIGKILL; trying again (it stays recorded)",
                started.elapsed()
            );
        }
    }
}

async fn wait_bounded(handle: &mut Box<dyn VmmHandle>) -> Option<VmmExit> {
    tokio::time::timeout(Duration::from_secs(10), handle.wait())
        .await
        .ok()
}

pub(super) async fn desired_changed(desired: &mut watch::Receiver<Desired>) {
    if desired.changed().await.is_err() {
        // The agent is gone; nothing will ever change.
        std::future::pending::<()>().await;
    }
}

pub(super) async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

pub(super) async fn next_event(link: &mut Option<GuestLink>) -> Option<GuestEvent> {
    match link {
        Some(l) => l.events.recv().await,
        None => std::future::pending().await,
    }
}
