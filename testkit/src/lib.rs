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
//! - [`kvm`]: the one KVM check of the KVM tests and benchmarks (they fail,
//!   never skip, and say what is missing).
//! - [`test_guest`]: the tiny test guest's kernel command line, built from its
//!   options and the VMM's virtio-mmio layout.
//! - [`agent_harness`] (feature `agent`): the host agent's harness, on its
//!   fakes or on this host's KVM, the direct-VMM reference, the daemon as a
//!   child process; the agent's and the binaries' tests and the agent
//!   benchmarks all use it.
//!
//! # Crate rules
//!
//! - **Owns** what tests and benchmarks share: artifacts, the nested tier,
//!   the KVM check, the test guest's command line, and the workspace's
//!   dependency rules (`tests/dependency_rules.rs`).
//! - **May depend on** the contracts and libraries below the agent
//!   (`vmm-api`, `guest-proto`, `guest-image`) and small synchronous crates;
//!   with the `agent` feature only, the agent library (and tokio, hyper) for
//!   [`agent_harness`] and the `agent-driver` binary.
//! - **Must not depend on** `vmm`, nor by default on `agent` or an async
//!   runtime (`tokio`): the VMM's tests use this crate, so its default build
//!   stays light and below the VMM. The agent's integration tests enable the
//!   `agent` feature (a dev-dependency cycle cargo allows for integration
//!   tests: they link the same agent library testkit links).

#[cfg(feature = "agent")]
pub mod agent_harness;
pub mod agent_scenario;
pub mod artifacts;
pub mod guest;
pub mod kvm;
pub mod nested;
pub mod os_image;
pub mod test_guest;

pub use guest_image::{bzimage, cpio, elf};

pub use artifacts::{debian_kernel, ArtifactError, KernelArtifacts};
pub use kvm::{check_kvm, require_kvm, KvmError};
pub use nested::{InnerRun, InnerVm, NestedError, NestedReport, OuterMachine};
