//! The contract between the host agent and one `reddog-vmm` process.
//!
//! - [`VmConfig`]: what a VM is made of, read from a JSON file or built from flags.
//! - [`ExitReason`] and [`ExitReport`]: how a VM ended, as a process exit status and
//!   as one JSON line the VMM writes when it stops.
//! - [`control`]: the control socket protocol (requests, responses, events, a
//!   blocking client) the agent uses to drive a running VMM.
//! - [`platform`]: the fixed guest-visible addresses (ports, magic values) that guests
//!   and the VMM agree on.
#![forbid(unsafe_code)]

pub mod config;
pub mod control;
pub mod exit;
pub mod platform;

pub use config::{
    BackingConfig, BootProtocol, ConfigError, DiskConfig, DiskFormat, SerialOutput, VmConfig,
    VsockConfig,
};
pub use control::{
    ApiError, Client, ClientError, ErrorKind, Event, Info, Metrics, Op, Request, Response,
    ShutdownMode, VmState,
};
pub use exit::{
    ExitReason, ExitReport, RecentExit, RecentExitKind, VcpuEvents, VcpuRegs, RECENT_EXITS,
};
