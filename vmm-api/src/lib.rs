//! The contract between the host agent and one `reddog-vmm` process.
//!
//! - [`VmConfig`]: what a VM is made of, read from a JSON file or built from flags.
//! - [`ExitReason`] and [`ExitReport`]: how a VM ended, as a process exit status and
//!   as one JSON line the VMM writes when it stops.
//! - [`control`]: the control socket protocol (requests, responses, events, a
//!   blocking client) the agent uses to drive a running VMM.
//! - [`platform`]: the fixed guest-visible addresses (ports, magic values, the
//!   virtio-mmio window layout in [`platform::mmio`]) that guests and the VMM agree on.
//!
//! # Crate rules
//!
//! - **Owns** the contract only: plain data types, their validation and JSON
//!   form, the control protocol with a small blocking client, and the
//!   guest-visible platform constants.
//! - **May depend on** `serde`, `serde_json`, `thiserror` and std.
//! - **Must not depend on** an async runtime (`tokio`: the agent wraps the
//!   client itself), nor on the VMM or its internals (`vmm`, `kvm-ioctls`,
//!   `kvm-bindings`, `vm-memory`): both sides build on this crate, never the
//!   other way. `testkit/tests/dependency_rules.rs` checks this.
#![forbid(unsafe_code)]

pub mod config;
pub mod control;
pub mod exit;
pub mod limits;
pub mod platform;

pub use config::{
    BackingConfig, BootProtocol, ConfigError, DiskConfig, DiskFormat, NetConfig, SerialOutput,
    TapConfig, VmConfig, VsockConfig,
};
pub use control::{
    ApiError, Client, ClientError, ErrorKind, Event, Info, Metrics, NetMetrics, Op, Request,
    Response, ShutdownMode, VmState,
};
pub use exit::{
    ExitReason, ExitReport, RecentExit, RecentExitKind, VcpuEvents, VcpuRegs, RECENT_EXITS,
};
pub use limits::{RateLimit, TokenBucket};
