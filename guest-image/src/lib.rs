//! The image tool's library: everything a Linux guest of reddog is built from.
//!
//! - [`artifacts`]: Debian 12's stock cloud kernel (fetched with apt, checked
//!   against apt's sha256, cached under `${REDDOG_CACHE:-$HOME/.cache/reddog}`),
//!   its modules with their dependencies, the apt helpers, the static busybox.
//! - [`bzimage`]: `vmlinux` out of a bzImage (LZ4 legacy payload).
//! - [`cpio`]: a newc writer for initramfs images.
//! - [`elf`]: just enough ELF64 reading (static binaries, PVH note, `.modinfo`).
//! - [`initramfs`](mod@initramfs): the guest initramfs (`reddog-guest` as
//!   `/init` plus the virtio disk, network and vsock modules).
//! - [`os_image`]: the ext4 OS base image, qcow2 overlays, role and resource
//!   disks.
//!
//! The `reddog image kernel|initramfs|os-base` commands are thin wrappers
//! over this crate; `testkit` re-exports it for the tests.

pub mod artifacts;
pub mod bzimage;
pub mod cpio;
pub mod elf;
pub mod initramfs;
pub mod os_image;

pub use artifacts::{
    debian_kernel, debian_kernel_in, kernel_in, ArtifactError, KernelArtifacts, KernelSource,
};
pub use initramfs::{initramfs, InitramfsError, GUEST_MODULES};
pub use os_image::OsImageError;
