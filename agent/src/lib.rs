//! The reddog host agent library: what a fabric controller embeds, and what
//! the `reddog-agent` daemon (crate `reddog-cli`) serves over REST.
//!
//! **Owns**: the goal state and its validation, one task per role instance
//! (lifecycle, health, restarts, pause/resume, re-adoption after a restart),
//! the image cache, node reports pushed upstream, the REST API. **May use**:
//! `vmm-api` (the VMM contract), `guest-proto` (the guest contract), `vhd`
//! (disks), tokio, axum/hyper. **Must not use**: clap or anything only a
//! command line needs (that is `reddog-cli`), the VMM's internals (`vmm`), or
//! test support (`testkit`); the dependency rules are checked by
//! `testkit/tests/dependency_rules.rs`.
//!
//! | module | holds |
//! |---|---|
//! | [`node`] | [`Agent`]: the handle a controller embeds; the goal, the registry of instance tasks, the node report |
//! | [`instance`] | one task per instance: lifecycle, policy, record, supervision |
//! | [`backend`] | the seams (VMM launcher and handle, disks, guest channel), their real implementations, the fakes (feature `fake`) |
//! | [`api`] | the REST server, its client, HTTP helpers |
//! | [`spec`] | the goal state's types and validation |
//! | [`endpoint`] | endpoints: their spec and rules, membership (probe, drain), the HTTP probe, the nftables load balancer |
//! | [`images`] | the content-addressed base-image cache |
//! | [`paths`] | caller-given paths confined to configured roots, opened without following symlinks |
//! | [`events`], [`report`], [`upstream`] | what the agent tells: events, the node report and metrics, the upstream pusher |
//! | [`util`] | atomic writes, clocks, escaping |
//!
//! See `docs/agent.md` and the agent's module map in `docs/architecture.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod backend;
pub mod endpoint;
pub mod events;
pub mod images;
pub mod instance;
pub mod network;
pub mod node;
pub mod paths;
pub mod report;
pub mod spec;
pub mod upstream;
pub mod util;

pub use backend::{Backends, DiskPreparer, GuestChannel, VmmHandle, VmmLauncher};
pub use events::AgentEvent;
pub use instance::{HealthPolicy, InstanceOpError, InstanceState, InstanceStatus, Transition};
pub use node::{Agent, AgentConfig, AgentError, ApplyOutcome};
pub use report::NodeReport;
pub use spec::{Capacity, GoalError, GoalState, InstanceSpec, NodeConfig};
