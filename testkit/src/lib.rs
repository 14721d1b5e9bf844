//! Test support for reddog, and the one place tests find large artifacts.
//!
//! - [`artifacts`]: statically linked builds of this workspace's binaries
//!   (`reddog-vmm`, `reddog-guest`, the test drivers); Debian 12's stock cloud
//!   kernel, the cache root and the static busybox come from the `guest-image`
//!   crate and are re-exported here, as are [`bzimage`], [`cpio`] and [`elf`].
//! - [`guest`], [`os_image`]: `guest-image`'s initramfs and OS base image built
//!   with the static `reddog-guest` of this workspace.
//! - [`nested`]: real KVM (AMD SVM) inside a QEMU-TCG machine, for booting
//!   unmodified Linux guests with reddog-vmm on hosts whose own KVM cannot.
//! - [`agent_scenario`]: the whole host agent with real Debian guests, in the
//!   nested machine or on this host's KVM (the nested agent test, the demo).

pub mod agent_scenario;
pub mod artifacts;
pub mod guest;
pub mod nested;
pub mod os_image;

pub use guest_image::{bzimage, cpio, elf};

pub use artifacts::{debian_kernel, ArtifactError, KernelArtifacts};
pub use nested::{InnerRun, InnerVm, NestedError, NestedReport, OuterMachine};
