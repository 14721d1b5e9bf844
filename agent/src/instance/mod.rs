//! One role instance: a tokio task that reconciles the instance towards what
//! the goal wants of it ([`Desired`], a `watch` channel its owner writes),
//! and the owner's handle on it ([`InstanceHandle`]).
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | the handle, the shared status ([`InstanceStatus`]), commands ([`Command`]), errors |
//! | `env.rs` | [`InstanceEnv`]: everything a task may use (paths, policy, backends, images, events) |
//! | `lifecycle.rs` | states, the transition table, the history; `Paused` with the state it resumes to |
//! | `policy.rs` | [`HealthPolicy`] and the restart / crash-loop decision, a pure function |
//! | `record.rs` | what is stored per instance to survive an agent restart |
//! | `task.rs` | the task: prepare disks, start or re-adopt the VMM, restart, stop, remove |
//! | `supervise.rs` | one VMM's life: guest and VMM events, health deadlines, pause/resume |
//!
//! The task never reaches into its owner: it gets an [`InstanceEnv`] and a
//! [`Desired`] receiver, shares its status through a mutex, and when it has
//! removed the instance it marks itself ended and tells the owner through
//! [`InstanceEnv::ended`].

mod env;
pub mod lifecycle;
pub mod policy;
pub mod record;
mod supervise;
mod task;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

pub use env::InstanceEnv;
pub use lifecycle::{IllegalTransition, InstanceState, Lifecycle, Transition};
pub use policy::{FailureHistory, HealthPolicy, Verdict};
pub(crate) use record::StartMode;
pub use record::{InstanceRecord, PendingRemake};

use crate::backend::guest::RoleStatus;
use crate::backend::vmm::{VmmError, VmmExit, VmmView};
use crate::spec::InstanceSpec;
use crate::util::lock;

/// An operator's request to a running instance (through [`crate::Agent`]).
#[derive(Debug)]
pub(crate) enum Command {
    /// Park the vCPUs.
    Pause(oneshot::Sender<Result<(), InstanceOpError>>),
    /// Let them run again.
    Resume(oneshot::Sender<Result<(), InstanceOpError>>),
    /// The VMM's own view of itself (control socket `info` and `metrics`).
    Inspect(oneshot::Sender<Result<VmmView, InstanceOpError>>),
}

/// Why an operation on one instance (pause, resume, inspect) failed.
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
    /// Times the guest side misbehaved since the agent started: a connection
    /// closed for breaking the protocol or its limits, or a `Hello` with a
    /// new boot id while the same VMM runs (under reddog-vmm a guest reboot
    /// is a new VMM, so that is another connection claiming to be the guest).
    pub guest_misbehaviours: u32,
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
    /// The instance's network (address, gateway, TAP, MAC, MTU), when the
    /// node has an instance subnet and the instance holds an address.
    pub net: Option<crate::network::InstanceNet>,
    /// Transitions, oldest first (empty in lists).
    pub history: Vec<Transition>,
}

/// The state an instance task shares with the API.
#[derive(Debug)]
pub(crate) struct Shared {
    pub lifecycle: Lifecycle,
    pub status: InstanceStatus,
    /// The task has finished removing the instance: the owner drops its
    /// handle (and spawns a new task if the goal wants the id again).
    pub ended: bool,
}

impl Shared {
    fn snapshot(&self, history: bool) -> InstanceStatus {
        let mut s = self.status.clone();
        s.state = self.lifecycle.state();
        s.since_unix_ms = self.lifecycle.since_unix_ms();
        if history {
            s.history = self.lifecycle.history().cloned().collect();
        }
        s
    }
}

/// The owner's side of one instance task.
pub(crate) struct InstanceHandle {
    shared: Arc<Mutex<Shared>>,
    desired: watch::Sender<Desired>,
    commands: mpsc::Sender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl InstanceHandle {
    /// Starts the task for `spec` (with a recorded `history` when resumed).
    pub(crate) fn spawn(
        env: Arc<InstanceEnv>,
        spec: InstanceSpec,
        history: Vec<Transition>,
        desired: Desired,
        mode: StartMode,
    ) -> Self {
        let shared = Arc::new(Mutex::new(new_shared(&spec, history)));
        let (tx, rx) = watch::channel(desired);
        let (cmd_tx, cmd_rx) = mpsc::channel(4);
        let span = tracing::info_span!("instance", id = %spec.id);
        let runner = task::Runner::new(env, spec, shared.clone(), rx, cmd_rx);
        let task = tokio::spawn(tracing::Instrument::instrument(runner.run(mode), span));
        Self {
            shared,
            desired: tx,
            commands: cmd_tx,
            task,
        }
    }

    /// The status (with the history when asked); `None` once the task has
    /// removed the instance.
    pub(crate) fn status(&self, history: bool) -> Option<InstanceStatus> {
        let sh = lock(&self.shared);
        (!sh.ended).then(|| sh.snapshot(history))
    }

    /// The current state.
    pub(crate) fn state(&self) -> InstanceState {
        lock(&self.shared).lifecycle.state()
    }

    /// Whether the task has removed the instance and ended.
    pub(crate) fn is_ended(&self) -> bool {
        lock(&self.shared).ended
    }

    /// What the goal wants now.
    pub(crate) fn desired(&self) -> Desired {
        self.desired.borrow().clone()
    }

    /// Tells the task what the goal wants; `Err(())` when the task has ended
    /// (the owner starts a new one). Checked and sent under the status lock
    /// the task takes to end, so a change is never lost to an ending task.
    pub(crate) fn set_desired(&self, want: Desired) -> Result<(), Ended> {
        let sh = lock(&self.shared);
        if sh.ended {
            return Err(Ended);
        }
        self.desired.send_replace(want);
        Ok(())
    }

    /// Wakes the task with the same desired state (a new goal incarnation
    /// retries a failed instance).
    pub(crate) fn poke(&self) -> Result<(), Ended> {
        let sh = lock(&self.shared);
        if sh.ended {
            return Err(Ended);
        }
        self.desired.send_modify(|_| {});
        Ok(())
    }

    /// Queues an operator command (it fails when the queue is full).
    pub(crate) fn command(&self, cmd: Command) -> Result<(), Command> {
        self.commands.try_send(cmd).map_err(|e| e.into_inner())
    }

    /// Stops the task (the VMM keeps running; its record stays).
    pub(crate) fn abort(&self) {
        self.task.abort();
    }
}

/// The instance's task has ended (see [`InstanceHandle::set_desired`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ended;

pub(crate) fn new_shared(spec: &InstanceSpec, history: Vec<Transition>) -> Shared {
    let lifecycle = if history.is_empty() {
        Lifecycle::new()
    } else {
        Lifecycle::from_history(history)
    };
    Shared {
        status: InstanceStatus {
            id: spec.id.clone(),
            spec: spec.clone(),
            state: lifecycle.state(),
            since_unix_ms: lifecycle.since_unix_ms(),
            restarts: 0,
            recent_failures: 0,
            guest_misbehaviours: 0,
            last_heartbeat_unix_ms: None,
            heartbeat_seq: None,
            role: None,
            guest: None,
            vmm_pid: None,
            boot_time_us: None,
            last_exit: None,
            last_error: None,
            net: None,
            history: Vec::new(),
        },
        lifecycle,
        ended: false,
    }
}
