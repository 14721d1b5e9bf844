//! The reddog host agent library: what a fabric controller embeds, and what
//! the `reddog-agent` daemon serves over REST.
//!
//! - [`Agent`]: apply a goal state ([`GoalState`]), create/update/delete role
//!   instances, read instances and the [`NodeReport`], subscribe to
//!   [`AgentEvent`]s, manage the image cache.
//! - Seams, each with a real implementation and a fake in [`fake`]:
//!   [`VmmLauncher`] / [`VmmHandle`] ([`process::ProcessLauncher`]),
//!   [`DiskPreparer`] ([`disks::VhdDiskPreparer`]), [`GuestChannel`]
//!   ([`guest::VsockGuestChannel`]).
//! - [`api`]: the REST API (axum), [`client`]: a client for it,
//!   [`upstream`]: node reports pushed to the controller.
//!
//! See `docs/agent.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod api;
pub mod client;
pub mod control;
pub mod disks;
pub mod events;
pub mod fake;
pub mod guest;
pub mod http;
pub mod images;
pub mod instance;
pub mod lifecycle;
pub mod process;
pub mod report;
pub mod spec;
pub mod upstream;
pub mod util;
pub mod vmm;

pub use agent::{Agent, AgentConfig, AgentError, ApplyOutcome, Backends};
pub use disks::DiskPreparer;
pub use events::AgentEvent;
pub use guest::GuestChannel;
pub use instance::{HealthPolicy, InstanceOpError, InstanceStatus};
pub use lifecycle::{InstanceState, Transition};
pub use report::NodeReport;
pub use spec::{Capacity, GoalError, GoalState, InstanceSpec, NodeConfig};
pub use vmm::{VmmHandle, VmmLauncher};
