//! `reddog-guest`: PID 1 in the VM and the untrusted guest agent.
//!
//! **Owns**: everything that runs inside the guest before and around the
//! role: mounting and switching into the OS disk, loading modules, the role
//! manifest and the role's supervision, the guest side of the host link.
//!
//! **May depend on**: `std`, `libc`, `guest-proto` (frames, and the instance
//! file with its `instance-file` feature), `serde`/`serde_json` (the role
//! manifest), `thiserror`. It ships as one static binary (`+crt-static`)
//! inside the initramfs and the OS image, so every dependency must build
//! statically and stay small.
//!
//! **Must not**: depend on an async runtime (no tokio: the supervisor is one
//! thread with short-lived helpers), on the host agent or VMM crates, or on
//! anything that needs a dynamic loader or a config file; its only network
//! besides vsock is `eth0`, configured once from the instance file.
//! Everything from the host or the role disk is input to check,
//! never to panic on.
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
//! The agent's logic ([`supervisor`], [`link`], [`role`], [`manifest`],
//! [`instance`]) knows nothing of VMs: behind the [`transport`] seam it runs
//! as an ordinary host process over a unix socket with a directory for the
//! role disk, which is how `tests/` exercise it. See `docs/guest-agent.md`;
//! `docs/architecture.md` maps every module ("reddog-guest, module by module").
//!
//! - `sys`: the thin unsafe layer (mount, finit_module, vsock, netlink, signals, reboot).
//! - `netconf`: `eth0` from the instance file (hand-built `NETLINK_ROUTE` requests).
//! - `pid1`: disks by serial, mounts, switch_root, unmount and power-off.
//! - `probe`: the platform checks, each printing one `reddog-guest: ...` line.

pub mod backoff;
pub mod cmdline;
pub mod instance;
pub mod link;
pub mod manifest;
pub mod netconf;
pub mod passwd;
pub mod pid1;
pub mod power_button;
pub mod probe;
pub mod role;
pub mod supervisor;
pub mod sys;
pub mod transport;
