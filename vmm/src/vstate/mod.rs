//! Thin owned wrappers over KVM: the VM with its memory, and the vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vm;
