//! x86_64 specifics: the guest physical memory map, CPUID, registers and boot
//! structures (PVH `hvm_start_info`, Linux `boot_params`).

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod regs;
