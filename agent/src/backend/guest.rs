//! The agent <-> guest seam: the guest agent's frames as typed events
//! ([`GuestEvent`]), the host's commands ([`HostCommand`]), one VM's link
//! ([`GuestLink`]) and the [`GuestChannel`] trait that opens links.
//! [`super::vsock_guest::VsockGuestChannel`] is the real channel over the
//! VMM's hybrid vsock; `super::fake::FakeGuests` (feature `fake`) is for tests.

use std::path::PathBuf;

use async_trait::async_trait;
use guest_proto::RoleState;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::util::hex;

/// Where one VM's guest agent connects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestEndpoint {
    /// The VM's hybrid-vsock socket (the VMM listens there).
    pub uds_path: PathBuf,
    /// The host port the guest agent connects to.
    pub port: u32,
    /// The heartbeat interval to hand the guest in `HelloAck`.
    pub heartbeat_interval_ms: u32,
}

impl GuestEndpoint {
    /// The socket the agent listens on: `<uds>_<port>`.
    pub fn listen_path(&self) -> PathBuf {
        let mut s = self.uds_path.clone().into_os_string();
        s.push(format!("_{}", self.port));
        PathBuf::from(s)
    }
}

/// A role process's state, as the guest reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleStatus {
    /// Not launched.
    NotStarted,
    /// Launched.
    Starting,
    /// Running, not ready.
    Running,
    /// Ready.
    Ready,
    /// Exited (may be restarted by the guest).
    Exited,
    /// Given up by the guest.
    Failed,
}

impl From<RoleState> for RoleStatus {
    fn from(s: RoleState) -> Self {
        match s {
            RoleState::NotStarted => Self::NotStarted,
            RoleState::Starting => Self::Starting,
            RoleState::Running => Self::Running,
            RoleState::Ready => Self::Ready,
            RoleState::Exited => Self::Exited,
            RoleState::Failed => Self::Failed,
        }
    }
}

/// What the guest said (already checked, owned, text escaped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEvent {
    /// `Hello`, answered with a `HelloAck`.
    Hello {
        /// Random per boot.
        boot_id: [u8; 16],
        /// The negotiated protocol version.
        version: u8,
        /// Capability bits.
        capabilities: u64,
        /// The agent's version string, escaped.
        agent_version: String,
    },
    /// A heartbeat.
    Heartbeat {
        /// Sequence number.
        seq: u64,
        /// Guest uptime, ms.
        uptime_ms: u64,
        /// Free memory, KiB.
        free_mem_kib: u64,
        /// The role's state.
        role: RoleStatus,
        /// Role restarts inside the guest.
        role_restarts: u32,
    },
    /// The role process started.
    RoleStarted {
        /// Its pid in the guest.
        pid: u32,
    },
    /// The role process ended.
    RoleExited {
        /// Its pid in the guest.
        pid: u32,
        /// "exit code N" or "signal N".
        how: String,
    },
    /// The role is ready.
    Ready,
    /// An answer to a ping.
    Pong {
        /// The nonce.
        nonce: u64,
    },
    /// The connection ended (the guest reconnects by itself).
    Disconnected {
        /// Why.
        reason: String,
        /// The host closed it because the guest broke the protocol's rules.
        misbehaving: bool,
    },
}

/// What the host may tell the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCommand {
    /// Shut down cleanly within this many ms (needs the `SHUTDOWN` capability).
    Shutdown {
        /// Deadline, ms.
        deadline_ms: u32,
    },
    /// Restart the role (needs `ROLE`).
    RestartRole,
    /// Change the heartbeat interval (needs `HEARTBEAT_INTERVAL`).
    SetHeartbeatInterval(u32),
    /// Ping.
    Ping(u64),
    /// Not sent to the guest: its VM's vCPUs are parked (`true`) or run
    /// again (`false`). While parked, the channel's hello and partial-frame
    /// clocks stop (a parked guest cannot finish anything); they start afresh
    /// on resume.
    VmPaused(bool),
}

/// One VM's guest link: events in, commands out. Dropping it stops listening.
#[derive(Debug)]
pub struct GuestLink {
    /// Events, in order. Bounded: a slow reader slows only this guest.
    pub events: mpsc::Receiver<GuestEvent>,
    /// Commands; dropped when no guest is connected or it lacks the capability.
    pub commands: mpsc::Sender<HostCommand>,
    _guard: LinkGuard,
}

impl GuestLink {
    /// Builds a link (for implementations of [`GuestChannel`]).
    pub fn new(
        events: mpsc::Receiver<GuestEvent>,
        commands: mpsc::Sender<HostCommand>,
        task: Option<tokio::task::JoinHandle<()>>,
        socket: Option<PathBuf>,
    ) -> Self {
        Self {
            events,
            commands,
            _guard: LinkGuard { task, socket },
        }
    }
}

#[derive(Debug)]
struct LinkGuard {
    task: Option<tokio::task::JoinHandle<()>>,
    socket: Option<PathBuf>,
}

impl Drop for LinkGuard {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
        if let Some(s) = &self.socket {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// Why a guest link could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The listening socket could not be made.
    #[error("cannot listen on {path}: {source}; check the state directory (unix socket paths must stay under 108 bytes)")]
    Listen {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Opens guest links.
#[async_trait]
pub trait GuestChannel: Send + Sync {
    /// Starts listening for one VM's guest agent. Called before the VMM starts
    /// (the guest may connect at once) and after a re-adoption (the guest
    /// reconnects).
    async fn open(&self, instance_id: &str, ep: &GuestEndpoint) -> Result<GuestLink, GuestError>;
}

/// Formats a boot id for display.
pub fn boot_id_hex(id: &[u8; 16]) -> String {
    hex(id)
}
