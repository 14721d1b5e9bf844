//! `reddog-guest`: PID 1 in the VM and the untrusted guest agent.
//!
//! Two modes, chosen on the kernel command line (`cmdline`):
//! - **probe** (any of the `reddog.*` probe options): the platform checks the
//!   nested platform tests parse — mounts, modules, boot timer, disks, vsock —
//!   then power off;
//! - **agent** (the default): mount the OS disk as the root with the resource
//!   and role disks under it, switch into it and stay PID 1 there; supervise
//!   the role from the role disk's manifest; keep the host agent informed over
//!   vsock (`guest-proto` frames); shut down cleanly when the host says so.
//!
//! The agent's logic ([`agent`], [`link`], [`role`], [`manifest`]) knows
//! nothing of VMs: behind the [`transport`] seam it runs as an ordinary host
//! process over a unix socket with a directory for the role disk, which is how
//! `tests/` exercise it. See `docs/guest-agent.md`.
//!
//! - `sys`: the thin unsafe layer (mount, finit_module, vsock, signals, reboot).
//! - `pid1`: disks by serial, mounts, switch_root, unmount and power-off.
//! - `probe`: the platform checks, each printing one `reddog-guest: ...` line.

pub mod agent;
pub mod backoff;
pub mod cmdline;
pub mod link;
pub mod manifest;
pub mod pid1;
pub mod power_button;
pub mod probe;
pub mod role;
pub mod sys;
pub mod transport;
