//! `reddog-vmm`: one lightweight KVM virtual machine monitor per process.
//!
//! Read [`builder::build_and_boot`] first: it is the boot recipe, top to bottom.
//! Everything the guest can touch (port I/O, MMIO, memory it wrote) is hostile input.

pub mod acpi;
pub mod arch;
pub mod builder;
pub mod control;
pub mod devices;
pub mod loader;
pub mod vstate;

pub use builder::{build_and_boot, VmmError};
