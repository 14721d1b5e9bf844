//! [`Agent`]: the node's host agent, the handle a fabric controller embeds
//! (the daemon is a thin layer over it). Apply a goal state, create, update
//! and delete instances, read instances and the node report, subscribe to
//! events, manage the image cache.
//!
//! The agent owns a registry of instance tasks ([`crate::instance`]); each
//! task gets an explicit environment ([`InstanceEnv`]) and tells the agent
//! when it has removed its instance (a reaper drops the ended handle).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use vmm_api::DiskFormat;

use crate::backend::vmm::VmmView;
use crate::backend::Backends;
use crate::events::AgentEvent;
use crate::images::{ImageCache, ImageError, ImageInfo};
use crate::instance::record::RecordError;
use crate::instance::{
    Command, Desired, HealthPolicy, InstanceEnv, InstanceHandle, InstanceOpError, InstanceRecord,
    InstanceState, InstanceStatus, StartMode, Transition,
};
use crate::network::InstanceNetwork;
use crate::report::{InstanceSummary, NodeReport, UpstreamStats};
use crate::spec::{usage, GoalError, GoalState, InstanceSpec, NodeConfig};
use crate::util::{lock, now_unix_ms, write_json_atomic, ReadJsonError};

/// Default host vsock port of the guest agent.
pub const DEFAULT_GUEST_PORT: u32 = 1024;

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where records, disks, images and sockets live.
    pub state_dir: PathBuf,
    /// This node.
    pub node: NodeConfig,
    /// Health and restart timings.
    pub health: HealthPolicy,
    /// The host vsock port the guest agent connects to.
    pub guest_port: u32,
    /// Events kept for slow subscribers (they see `Lagged` beyond that).
    pub event_capacity: usize,
    /// Directories a goal's `role_package` must lie under (after `..` and
    /// symlinks are resolved; see [`crate::paths`]). Default
    /// `<state_dir>/roles`; empty refuses every role package.
    pub role_roots: Vec<PathBuf>,
    /// Directories a file imported through [`Agent::import_image`] (the
    /// API's `POST /v1/images`) must lie under. Default
    /// `<state_dir>/imports`; empty refuses every file import.
    pub import_roots: Vec<PathBuf>,
    /// The uid that owns instance TAPs (the VMMs' uid when they do not run
    /// as root); `None`: root's.
    pub tap_owner_uid: Option<u32>,
}

impl AgentConfig {
    /// Defaults for everything but the state directory and node.
    pub fn new(state_dir: impl Into<PathBuf>, node: NodeConfig) -> Self {
        let state_dir = state_dir.into();
        Self {
            role_roots: vec![state_dir.join("roles")],
            import_roots: vec![state_dir.join("imports")],
            state_dir,
            node,
            health: HealthPolicy::default(),
            guest_port: DEFAULT_GUEST_PORT,
            event_capacity: 1024,
            tap_owner_uid: None,
        }
    }
}

/// Errors opening the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state directory is unusable.
    #[error("state directory {path}: {source}; check that it exists and is writable")]
    StateDir {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A stored file is corrupt.
    #[error("{path} is not valid: {why}; move it away to start without it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The image cache.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// An instance record could not be read.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The instance network could not be set up (the MTU, or the rules).
    #[error("the instance network: {0}")]
    Network(String),
    /// The state directory's path is too long for unix sockets.
    #[error("state directory {0} is too long: instance sockets would exceed 107 bytes; use a shorter path")]
    PathTooLong(PathBuf),
}

/// What applying a goal did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyOutcome {
    /// The incarnation now applied.
    pub incarnation: u64,
    /// Nothing changed (the same incarnation again).
    pub unchanged: bool,
    /// Created instances.
    pub created: Vec<String>,
    /// Instances whose spec changed (they restart with new disks).
    pub updated: Vec<String>,
    /// Instances being removed.
    pub removed: Vec<String>,
}

/// How long a pause or resume may wait for the instance's task.
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// How long `vmm_view` may wait for the VMM's answer through the task.
const INSPECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

type Registry = Arc<Mutex<BTreeMap<String, InstanceHandle>>>;

/// What the agent's clones share.
struct Ctx {
    cfg: AgentConfig,
    env: Arc<InstanceEnv>,
    instances: Registry,
    goal: Mutex<Option<GoalState>>,
    goal_lock: tokio::sync::Mutex<()>,
    upstream: Mutex<Option<UpstreamStats>>,
    reaper: tokio::task::JoinHandle<()>,
}

/// The host agent. Cheap to clone; every clone is the same agent.
#[derive(Clone)]
pub struct Agent {
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("state_dir", &self.ctx.cfg.state_dir)
            .finish()
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, AgentError> {
    crate::util::read_json(path).map_err(|e| match e {
        ReadJsonError::Io(source) => AgentError::StateDir {
            path: path.to_owned(),
            source,
        },
        ReadJsonError::Corrupt(e) => AgentError::Corrupt {
            path: path.to_owned(),
            why: e.to_string(),
        },
    })
}

impl Agent {
    /// Opens the state directory and resumes: the stored goal state is
    /// re-applied and every stored instance is picked up again, re-adopting
    /// VMMs that still run (same pid and process start time).
    pub async fn open(cfg: AgentConfig, backends: Backends) -> Result<Agent, AgentError> {
        let sd = cfg.state_dir.clone();
        // The state directory may be traversed (an API socket in it can be
        // given to a group) but not listed; what is in it is owner-only.
        crate::util::create_private_dir(&sd, 0o711).map_err(|source| AgentError::StateDir {
            path: sd.clone(),
            source,
        })?;
        for sub in ["instances", "run", "images"] {
            let p = sd.join(sub);
            crate::util::create_private_dir(&p, 0o700)
                .map_err(|source| AgentError::StateDir { path: p, source })?;
        }
        // `<state>/run/<48-char id>/v.sock_<port>` must fit in sun_path.
        let longest = sd.join("run").join(format!(
            "{}/v.sock_{}",
            "x".repeat(crate::spec::MAX_ID_LEN),
            cfg.guest_port
        ));
        if longest.as_os_str().len() > 107 {
            return Err(AgentError::PathTooLong(sd));
        }
        let images = ImageCache::open(sd.join("images"))?;
        let goal: Option<GoalState> = read_json(&sd.join("goal.json"))?;
        let mut records = Vec::new();
        if let Ok(rd) = std::fs::read_dir(sd.join("instances")) {
            for e in rd.flatten() {
                match InstanceRecord::read(&e.path()) {
                    Ok(Some(r)) if crate::spec::check_id(&r.spec.id).is_ok() => records.push(r),
                    Ok(_) => {
                        tracing::warn!("removing {}: no usable record", e.path().display());
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                    Err(err) => tracing::error!("{err}"),
                }
            }
        }
        let net = match cfg.node.instance_subnet {
            None => None,
            Some(subnet) => {
                let mtu = cfg.node.instance_mtu;
                if !(vmm_api::config::MIN_MTU..=vmm_api::config::MAX_MTU).contains(&mtu) {
                    return Err(AgentError::Network(format!(
                        "instance_mtu {mtu} is not {} to {}",
                        vmm_api::config::MIN_MTU,
                        vmm_api::config::MAX_MTU
                    )));
                }
                let net = Arc::new(InstanceNetwork::new(
                    subnet,
                    mtu,
                    cfg.tap_owner_uid,
                    backends.net.clone(),
                ));
                // Every recorded address first, so new instances go around
                // them; then the rules for all of them, in one transaction.
                for r in &mut records {
                    if let Some(n) = &r.net {
                        if let Err(e) = net.reserve(&r.spec.id, n) {
                            tracing::error!("{e}; the instance gets a new address");
                            r.net = None;
                        }
                    }
                }
                net.apply_rules()
                    .await
                    .map_err(|e| AgentError::Network(e.to_string()))?;
                tracing::info!(%subnet, instances = records.iter().filter(|r| r.net.is_some()).count(), "instance network rules applied");
                Some(net)
            }
        };
        let (events, _) = broadcast::channel(cfg.event_capacity.max(16));
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let env = Arc::new(InstanceEnv {
            state_dir: sd.clone(),
            guest_port: cfg.guest_port,
            health: cfg.health.clone(),
            backends,
            images,
            events,
            ended: ended_tx,
            role_roots: crate::paths::Roots::role(cfg.role_roots.clone()),
            net,
            default_disk_rate_limit: cfg.node.default_disk_rate_limit,
        });
        let instances: Registry = Arc::new(Mutex::new(BTreeMap::new()));
        let reaper = tokio::spawn(reap(instances.clone(), ended_rx));
        let ctx = Arc::new(Ctx {
            env,
            instances,
            goal: Mutex::new(goal.clone()),
            goal_lock: tokio::sync::Mutex::new(()),
            upstream: Mutex::new(None),
            reaper,
            cfg,
        });
        let agent = Agent { ctx };
        let wanted: BTreeMap<String, InstanceSpec> = goal
            .iter()
            .flat_map(|g| g.instances.iter())
            .map(|s| (s.id.clone(), s.clone()))
            .collect();
        {
            let mut map = lock(&agent.ctx.instances);
            for rec in records {
                let desired = match wanted.get(&rec.spec.id) {
                    Some(s) => Desired::Run(s.clone()),
                    None => Desired::Removed,
                };
                tracing::info!(instance = %rec.spec.id, state = %rec.state, "resuming from the state directory");
                let spec = rec.spec.clone();
                let history = rec.history.clone();
                agent.spawn_locked(
                    &mut map,
                    spec,
                    history,
                    desired,
                    StartMode::Resume(Box::new(rec)),
                );
            }
            for (id, spec) in &wanted {
                if !map.contains_key(id) {
                    agent.spawn_locked(
                        &mut map,
                        spec.clone(),
                        Vec::new(),
                        Desired::Run(spec.clone()),
                        StartMode::New,
                    );
                }
            }
        }
        Ok(agent)
    }

    fn spawn_locked(
        &self,
        map: &mut BTreeMap<String, InstanceHandle>,
        spec: InstanceSpec,
        history: Vec<Transition>,
        desired: Desired,
        mode: StartMode,
    ) {
        let id = spec.id.clone();
        let h = InstanceHandle::spawn(self.ctx.env.clone(), spec, history, desired, mode);
        map.insert(id, h);
    }

    /// This agent's configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.ctx.cfg
    }

    /// Subscribes to events.
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.ctx.env.events.subscribe()
    }

    /// The applied goal state.
    pub fn goal(&self) -> Option<GoalState> {
        lock(&self.ctx.goal).clone()
    }

    /// Applies a goal state: validates it, stores it, and reconciles the
    /// instances towards it (in the background: watch the events or poll the
    /// instances). The same incarnation again is a no-op; an older one fails.
    pub async fn apply_goal(&self, goal: GoalState) -> Result<ApplyOutcome, GoalError> {
        let _g = self.ctx.goal_lock.lock().await;
        self.apply_locked(goal).await
    }

    async fn apply_locked(&self, goal: GoalState) -> Result<ApplyOutcome, GoalError> {
        let current = self.goal();
        if let Some(cur) = &current {
            if goal.incarnation < cur.incarnation {
                return Err(GoalError::Stale {
                    got: goal.incarnation,
                    current: cur.incarnation,
                });
            }
            if goal.incarnation == cur.incarnation {
                return if goal == *cur {
                    Ok(ApplyOutcome {
                        incarnation: goal.incarnation,
                        unchanged: true,
                        ..Default::default()
                    })
                } else {
                    Err(GoalError::Conflict(goal.incarnation))
                };
            }
        }
        goal.validate(&self.ctx.cfg.node)?;
        for s in &goal.instances {
            if self.ctx.env.images.get(&s.image_sha256()).is_none() {
                return Err(GoalError::UnknownImage {
                    id: s.id.clone(),
                    image: s.base_image.clone(),
                });
            }
            check_role_package(&self.ctx.env.role_roots, &s.role_package).map_err(|why| {
                GoalError::Invalid {
                    id: s.id.clone(),
                    why,
                }
            })?;
        }
        self.check_disk_with_overlays(&goal)?;
        write_json_atomic(&self.ctx.cfg.state_dir.join("goal.json"), &goal)
            .map_err(GoalError::Persist)?;
        *lock(&self.ctx.goal) = Some(goal.clone());
        let mut out = ApplyOutcome {
            incarnation: goal.incarnation,
            ..Default::default()
        };
        {
            let mut map = lock(&self.ctx.instances);
            for spec in &goal.instances {
                let want = Desired::Run(spec.clone());
                let live = map.get(&spec.id).filter(|h| !h.is_ended());
                let sent = match live {
                    Some(h) => {
                        let before = h.desired();
                        if before != want {
                            let r = h.set_desired(want.clone());
                            if r.is_ok() {
                                if matches!(before, Desired::Removed) {
                                    out.created.push(spec.id.clone());
                                } else {
                                    out.updated.push(spec.id.clone());
                                }
                            }
                            r.is_ok()
                        } else if h.state() == InstanceState::Failed {
                            // A new incarnation retries failed instances.
                            let r = h.poke();
                            if r.is_ok() {
                                out.updated.push(spec.id.clone());
                            }
                            r.is_ok()
                        } else {
                            true
                        }
                    }
                    None => false,
                };
                if !sent {
                    // New, or its task ended removing it: a fresh task.
                    self.spawn_locked(&mut map, spec.clone(), Vec::new(), want, StartMode::New);
                    out.created.push(spec.id.clone());
                }
            }
            let keep: std::collections::BTreeSet<&str> =
                goal.instances.iter().map(|s| s.id.as_str()).collect();
            for (id, h) in map.iter() {
                if !keep.contains(id.as_str())
                    && h.desired() != Desired::Removed
                    && h.set_desired(Desired::Removed).is_ok()
                {
                    out.removed.push(id.clone());
                }
            }
        }
        tracing::info!(incarnation = goal.incarnation, created = ?out.created, updated = ?out.updated, removed = ?out.removed, "goal state applied");
        let _ = self.ctx.env.events.send(AgentEvent::GoalApplied {
            incarnation: out.incarnation,
            created: out.created.clone(),
            updated: out.updated.clone(),
            removed: out.removed.clone(),
        });
        Ok(out)
    }

    async fn edit_goal(
        &self,
        f: impl FnOnce(&mut Vec<InstanceSpec>) -> Result<(), GoalError>,
    ) -> Result<ApplyOutcome, GoalError> {
        let _g = self.ctx.goal_lock.lock().await;
        let mut goal = self.goal().unwrap_or(GoalState {
            incarnation: 0,
            instances: Vec::new(),
        });
        f(&mut goal.instances)?;
        goal.incarnation += 1;
        self.apply_locked(goal).await
    }

    /// Adds one instance (a new goal incarnation).
    pub async fn create_instance(&self, spec: InstanceSpec) -> Result<ApplyOutcome, GoalError> {
        self.edit_goal(|v| {
            if v.iter().any(|s| s.id == spec.id) {
                return Err(GoalError::Exists(spec.id.clone()));
            }
            v.push(spec);
            Ok(())
        })
        .await
    }

    /// Replaces one instance's spec (a new goal incarnation).
    pub async fn update_instance(&self, spec: InstanceSpec) -> Result<ApplyOutcome, GoalError> {
        self.edit_goal(|v| match v.iter_mut().find(|s| s.id == spec.id) {
            Some(s) => {
                *s = spec;
                Ok(())
            }
            None => Err(GoalError::NoSuchInstance(spec.id.clone())),
        })
        .await
    }

    /// Removes one instance (a new goal incarnation).
    pub async fn delete_instance(&self, id: &str) -> Result<ApplyOutcome, GoalError> {
        self.edit_goal(|v| {
            let n = v.len();
            v.retain(|s| s.id != id);
            if v.len() == n {
                return Err(GoalError::NoSuchInstance(id.into()));
            }
            Ok(())
        })
        .await
    }

    /// The running VMM of instance `id` as it reports itself over its control
    /// socket: `info` and `metrics` (`docs/vmm-api.md`), asked through the
    /// instance's task and its VMM handle. `None` when there is no such
    /// instance; an error when it has no running VMM with a control socket,
    /// or the VMM does not answer in time.
    pub async fn vmm_view(&self, id: &str) -> Option<Result<VmmView, String>> {
        let state = self.instance(id)?.state;
        if !state.vmm_may_run() || state == InstanceState::Stopping {
            return Some(Err(format!(
                "instance {id} is {state}: it has no running VMM to ask"
            )));
        }
        let (tx, rx) = oneshot::channel();
        Some(
            match self
                .send_command(id, Command::Inspect(tx), INSPECT_TIMEOUT, rx)
                .await
            {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
        )
    }

    /// Pauses instance `id`'s VMM (its vCPUs are parked; memory stays). The
    /// instance goes `paused` and its heartbeats are not expected until
    /// [`Agent::resume_instance`]. Pausing is not part of the goal state: a
    /// VMM the agent restarts, or a new spec, starts running.
    pub async fn pause_instance(&self, id: &str) -> Result<InstanceStatus, InstanceOpError> {
        self.instance_command(id, true).await
    }

    /// Resumes a paused instance: it goes back to the state it was paused in,
    /// with its heartbeat clock started afresh.
    pub async fn resume_instance(&self, id: &str) -> Result<InstanceStatus, InstanceOpError> {
        self.instance_command(id, false).await
    }

    async fn instance_command(
        &self,
        id: &str,
        pause: bool,
    ) -> Result<InstanceStatus, InstanceOpError> {
        let state = self
            .instance(id)
            .ok_or_else(|| InstanceOpError::NoSuchInstance(id.into()))?
            .state;
        let ok = if pause {
            state.can_go_to(InstanceState::Paused)
        } else {
            state == InstanceState::Paused
        };
        if !ok {
            return Err(InstanceOpError::WrongState {
                id: id.into(),
                state,
                what: if pause {
                    "only a starting, booted or ready instance can be paused"
                } else {
                    "only a paused instance can be resumed"
                },
            });
        }
        let (tx, rx) = oneshot::channel();
        let cmd = if pause {
            Command::Pause(tx)
        } else {
            Command::Resume(tx)
        };
        self.send_command(id, cmd, COMMAND_TIMEOUT, rx).await??;
        self.instance(id)
            .ok_or_else(|| InstanceOpError::NoSuchInstance(id.into()))
    }

    /// Queues `cmd` for instance `id`'s task and waits for its answer.
    async fn send_command<T>(
        &self,
        id: &str,
        cmd: Command,
        timeout: std::time::Duration,
        rx: oneshot::Receiver<T>,
    ) -> Result<T, InstanceOpError> {
        {
            let map = lock(&self.ctx.instances);
            let h = map
                .get(id)
                .filter(|h| !h.is_ended())
                .ok_or_else(|| InstanceOpError::NoSuchInstance(id.into()))?;
            h.command(cmd)
                .map_err(|_| InstanceOpError::Busy(id.into()))?;
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) | Err(_) => Err(InstanceOpError::Busy(id.into())),
        }
    }

    /// Every instance (without histories).
    pub fn instances(&self) -> Vec<InstanceStatus> {
        lock(&self.ctx.instances)
            .values()
            .filter_map(|h| h.status(false))
            .collect()
    }

    /// One instance with its transition history.
    pub fn instance(&self, id: &str) -> Option<InstanceStatus> {
        lock(&self.ctx.instances)
            .get(id)
            .and_then(|h| h.status(true))
    }

    /// The node's disk must hold every instance's resource disk and its OS
    /// overlay, which can grow to the base image's virtual size (a guest
    /// filling its OS disk must not run the node out of space).
    fn check_disk_with_overlays(&self, goal: &GoalState) -> Result<(), GoalError> {
        let mut os_mib: BTreeMap<String, u64> = BTreeMap::new();
        let mut want = 0u64;
        for s in &goal.instances {
            let sha = s.image_sha256();
            let mib = *os_mib.entry(sha).or_insert_with_key(|sha| {
                self.ctx
                    .env
                    .images
                    .virtual_size(sha)
                    .unwrap_or(0)
                    .div_ceil(1 << 20)
            });
            want = want.saturating_add(s.resource_disk_mib).saturating_add(mib);
        }
        let have = self.ctx.cfg.node.capacity.disk_mib;
        if want > have {
            return Err(GoalError::OverCapacity {
                what: "MiB of disk (resource disks plus OS overlays at their base image's virtual size)",
                want,
                have,
            });
        }
        Ok(())
    }

    /// The node report.
    pub fn node_report(&self) -> NodeReport {
        let node = &self.ctx.cfg.node;
        let goal = self.goal();
        let used = usage(goal.iter().flat_map(|g| g.instances.iter()));
        let instances = self
            .instances()
            .into_iter()
            .map(|s| InstanceSummary {
                role: s.spec.role.clone(),
                id: s.id,
                state: s.state,
                since_unix_ms: s.since_unix_ms,
                last_heartbeat_unix_ms: s.last_heartbeat_unix_ms,
                restarts: s.restarts,
                guest_misbehaviours: s.guest_misbehaviours,
                role_state: s.role,
                last_error: s.last_error,
            })
            .collect();
        NodeReport {
            node_id: node.node_id.clone(),
            fault_domain: node.fault_domain,
            update_domain: node.update_domain,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            generated_unix_ms: now_unix_ms(),
            goal_incarnation: goal.map(|g| g.incarnation),
            capacity: node.capacity,
            used,
            image_cache_bytes: self.ctx.env.images.total_bytes(),
            instances,
        }
    }

    /// Prometheus metrics text.
    pub fn metrics(&self) -> String {
        crate::report::prometheus(&self.node_report(), *lock(&self.ctx.upstream))
    }

    pub(crate) fn set_upstream_stats(&self, s: UpstreamStats) {
        *lock(&self.ctx.upstream) = Some(s);
    }

    /// The image cache.
    pub fn image_cache(&self) -> &ImageCache {
        &self.ctx.env.images
    }

    fn references(&self) -> BTreeMap<String, usize> {
        let mut refs = BTreeMap::new();
        for s in lock(&self.ctx.instances)
            .values()
            .filter_map(|h| h.status(false))
        {
            *refs.entry(s.spec.image_sha256()).or_insert(0) += 1;
        }
        for s in self.goal().iter().flat_map(|g| g.instances.iter()) {
            refs.entry(s.image_sha256()).or_insert(1);
        }
        refs
    }

    /// Cached images with their reference counts.
    pub fn images(&self) -> Vec<ImageInfo> {
        let refs = self.references();
        self.ctx
            .env
            .images
            .list()
            .into_iter()
            .map(|mut i| {
                i.references = refs.get(&i.sha256).copied().unwrap_or(0);
                i
            })
            .collect()
    }

    /// Imports a base image from a file (hashing it; verifying `expected`).
    pub async fn import_image(
        &self,
        path: PathBuf,
        format: DiskFormat,
        expected: Option<String>,
    ) -> Result<ImageInfo, ImageError> {
        let cache = self.ctx.env.images.clone();
        let roots = crate::paths::Roots::import(self.ctx.cfg.import_roots.clone());
        tokio::task::spawn_blocking(move || {
            cache.import_confined(&roots, &path, format, expected.as_deref())
        })
        .await
        .map_err(|e| ImageError::Io {
            what: "import",
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })?
    }

    /// Deletes every image no instance uses; returns their hashes.
    pub fn collect_images(&self) -> Vec<String> {
        let refs = self.references();
        let mut gone = Vec::new();
        for i in self.ctx.env.images.list() {
            if refs.get(&i.sha256).copied().unwrap_or(0) == 0
                && self.ctx.env.images.remove(&i.sha256, 0).is_ok()
            {
                gone.push(i.sha256);
            }
        }
        gone
    }

    /// Stops the agent's own tasks. VMMs keep running and their records stay,
    /// so the next [`Agent::open`] on the state directory re-adopts them.
    pub fn shutdown(&self) {
        for h in lock(&self.ctx.instances).values() {
            h.abort();
        }
        self.ctx.reaper.abort();
    }

    /// Waits until `f` holds for instance `id` or the timeout passes (for
    /// tests and tools; uses tokio's clock).
    pub async fn wait_for(
        &self,
        id: &str,
        timeout: std::time::Duration,
        f: impl Fn(Option<&InstanceStatus>) -> bool,
    ) -> Option<InstanceStatus> {
        let mut rx = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = self.instance(id);
            if f(s.as_ref()) {
                return s;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return None,
                Ok(Err(broadcast::error::RecvError::Closed)) => return None,
                Ok(_) => {}
            }
        }
    }
}

/// Checks a goal's role package: under a role root, a directory opened
/// without following symlinks, and without the agent's reserved file name.
pub(crate) fn check_role_package(
    roots: &crate::paths::Roots,
    path: &Path,
) -> Result<PathBuf, String> {
    use rustix::fs::{AtFlags, OFlags};
    let (c, fd) = roots
        .open(path, OFlags::RDONLY | OFlags::DIRECTORY)
        .map_err(|e| match e {
            crate::paths::PathError::Io { path, source, .. } => format!(
                "role_package {} is not a directory on this node: {source}",
                path.display()
            ),
            e => e.to_string(),
        })?;
    let reserved = crate::backend::disks::INSTANCE_FILE;
    if rustix::fs::statat(&fd, reserved, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
        return Err(format!(
            "role_package {} contains {reserved}, a name reserved for the agent's instance file; rename it",
            path.display(),
        ));
    }
    Ok(c.path())
}

/// Drops the handles of instance tasks that removed their instance (unless
/// the id has a new task by then).
async fn reap(instances: Registry, mut ended: mpsc::UnboundedReceiver<String>) {
    while let Some(id) = ended.recv().await {
        let mut map = lock(&instances);
        if map.get(&id).is_some_and(InstanceHandle::is_ended) {
            map.remove(&id);
        }
    }
}
