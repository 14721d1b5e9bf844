//! Test support for reddog, and the one place tests find large artifacts.
//!
//! - [`artifacts`]: Debian 12's stock cloud kernel (fetched with apt, cached
//!   under `${REDDOG_CACHE:-$HOME/.cache/reddog}`), the static busybox, a
//!   statically linked `reddog-vmm`.
//! - [`cpio`]: a newc writer for initramfs images.
//! - [`bzimage`]: `vmlinux` out of a bzImage (LZ4 legacy payload).
//! - [`nested`]: real KVM (AMD SVM) inside a QEMU-TCG machine, for booting
//!   unmodified Linux guests with reddog-vmm on hosts whose own KVM cannot.
//! - [`agent_scenario`]: the whole host agent with real Debian guests, in the
//!   nested machine or on this host's KVM (the nested agent test, the demo).

pub mod agent_scenario;
pub mod artifacts;
pub mod bzimage;
pub mod cpio;
pub mod elf;
pub mod guest;
pub mod nested;
pub mod os_image;

pub use artifacts::{debian_kernel, ArtifactError, KernelArtifacts};
pub use nested::{InnerRun, InnerVm, NestedError, NestedReport, OuterMachine};
