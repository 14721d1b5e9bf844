//! The control socket (`--api-sock`): how the host agent drives and observes
//! this VM. The protocol is `vmm_api::control` (reference: `docs/vmm-api.md`).
//!
//! - [`gate`]: pausing and resuming vCPUs (kick out of `KVM_RUN`, park).
//! - [`metrics`]: exit counters, cheap on the vCPUs' hot path.
//! - [`server`]: the unix socket, one thread per client, events to subscribers.
//!
//! [`RunControl`] is what the vCPU threads share with the control side; it
//! exists whether or not a socket is configured (a load and a store per exit).

pub mod gate;
pub mod metrics;
pub mod server;

pub use server::{ControlServer, ServerError};

/// What the vCPU run loops share with the control side.
pub struct RunControl {
    /// The pause gate.
    pub gate: gate::Gate,
    /// False while a VM built with `boot_on_request` waits for `boot`.
    pub booted: std::sync::atomic::AtomicBool,
    /// Exit counters and VM-wide counters.
    pub counters: metrics::Counters,
}

impl RunControl {
    /// Run control for `vcpus` vCPUs; `held`: they wait for `boot`.
    pub fn new(vcpus: u8, held: bool) -> Self {
        Self {
            gate: gate::Gate::new(vcpus, held),
            booted: std::sync::atomic::AtomicBool::new(!held),
            counters: metrics::Counters::new(vcpus),
        }
    }
}
