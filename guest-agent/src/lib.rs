//! `reddog-guest`: PID 1 in the VM's initramfs.
//!
//! Today it brings the guest up far enough to prove the platform: mounts the
//! kernel file systems, loads the virtio modules, marks the boot timer, lists
//! the virtio disks by serial and reads each one's first sector, talks to the
//! host over vsock, reports on the console, and powers off. Everything it does
//! is driven by `reddog.*` options on the kernel command line.
//!
//! - `sys`: the thin unsafe layer (mount, finit_module, vsock sockets, reboot).
//! - `cmdline`: the `reddog.*` options.
//! - `probe`: the checks, each printing one `reddog-guest: ...` line.

pub mod cmdline;
pub mod probe;
pub mod sys;
