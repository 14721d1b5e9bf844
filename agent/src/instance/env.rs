//! [`InstanceEnv`]: what an instance task is given, and all it may use.

use std::path::PathBuf;

use tokio::sync::{broadcast, mpsc};

use super::policy::HealthPolicy;
use crate::backend::guest::GuestEndpoint;
use crate::backend::Backends;
use crate::events::AgentEvent;
use crate::images::ImageCache;

/// An instance task's environment: paths, timings, the backends, the image
/// cache, where events go, and where the task tells its owner it has ended.
#[derive(Clone)]
pub struct InstanceEnv {
    /// The agent's state directory (instances live in `instances/<id>/`,
    /// guest sockets in `run/`).
    pub state_dir: PathBuf,
    /// The host vsock port the guest agent connects to.
    pub guest_port: u32,
    /// Health, restart and stop timings.
    pub health: HealthPolicy,
    /// VMMs, disks and guest channels.
    pub backends: Backends,
    /// Base images.
    pub images: ImageCache,
    /// Events for subscribers.
    pub events: broadcast::Sender<AgentEvent>,
    /// The ids of instances whose task removed them and ended.
    pub ended: mpsc::UnboundedSender<String>,
    /// Where role packages must lie (checked again before each role disk).
    pub role_roots: crate::paths::Roots,
    /// The instance network, when the node has an instance subnet.
    pub net: Option<std::sync::Arc<crate::network::InstanceNetwork>>,
    /// The disk rate limit of instances whose spec sets none
    /// ([`crate::NodeConfig::default_disk_rate_limit`]).
    pub default_disk_rate_limit: Option<vmm_api::RateLimit>,
}

impl std::fmt::Debug for InstanceEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceEnv")
            .field("state_dir", &self.state_dir)
            .field("guest_port", &self.guest_port)
            .finish_non_exhaustive()
    }
}

impl InstanceEnv {
    /// `<state>/instances/<id>`.
    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("instances").join(id)
    }

    /// The rate limit each disk of an instance with `spec` gets: its own, or
    /// the node's default.
    pub fn disk_rate_limit(&self, spec: &crate::InstanceSpec) -> Option<vmm_api::RateLimit> {
        spec.disk_rate_limit.or(self.default_disk_rate_limit)
    }

    /// `<state>/run/<id>`: instance `id`'s sockets (the VMM's vsock and
    /// control sockets, the agent's guest listener); a jailed VMM's `/run`.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("run").join(id)
    }

    /// Where instance `id`'s guest agent connects.
    pub fn guest_endpoint(&self, id: &str, interval_ms: u32) -> GuestEndpoint {
        GuestEndpoint {
            uds_path: self.run_dir(id).join("v.sock"),
            port: self.guest_port,
            heartbeat_interval_ms: interval_ms,
        }
    }
}
