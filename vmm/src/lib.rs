//! `reddog-vmm`: one lightweight KVM virtual machine monitor per process.
//!
//! Read [`builder::build_and_boot`] first: it is the boot recipe, top to bottom.
//! Everything the guest can touch (port I/O, MMIO, memory it wrote) is hostile input.
//!
//! # Crate rules
//!
//! - **Owns** everything inside one VMM process: KVM and guest memory, kernel
//!   loading, ACPI, the legacy and virtio devices, the vCPU threads and the
//!   control socket server.
//! - **May depend on** `vmm-api` (the contract it implements: config, exit
//!   reports, the control protocol, the guest-visible platform such as
//!   `platform::mmio`), `vhd` (disk images), the rust-vmm crates and small
//!   synchronous crates (`libc`, `nix`, `seccompiler`, `thiserror`, `tracing`).
//! - **Must not depend on** an async runtime (`tokio`): the VMM is plain
//!   threads that block; nor on the host agent or anything above `vmm-api`.
//!   `testkit/tests/dependency_rules.rs` checks this.

pub mod acpi;
pub mod arch;
pub mod builder;
pub mod control;
pub mod devices;
pub mod loader;
pub mod logging;
pub mod seccomp;
pub mod vstate;

pub use builder::{build_and_boot, BuildError};
