//! The KVM VM: creation, memory slots, in-kernel interrupt controllers.

// Registering guest memory with KVM is an unsafe ioctl.
#![allow(unsafe_code)]

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0}; is KVM available (kvm_intel, kvm_amd or kvm-pvm loaded) and may this user open it?")]
    OpenKvm(kvm_ioctls::Error),
    /// A KVM ioctl on the VM failed.
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A VM with its host-side facts.
pub struct Vm {
    /// The KVM system fd (kept for vCPU mmap sizes and capability queries).
    pub kvm: Kvm,
    /// The VM fd.
    pub fd: VmFd,
    /// What CPUID this host can give a guest.
    pub supported_cpuid: CpuId,
    /// MSRs this host's KVM knows.
    pub msr_list: Vec<u32>,
}

impl Vm {
    /// Opens KVM and creates a VM (see [`Vm::create_irqchip`]).
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        // Intel needs these for real-mode emulation; harmless elsewhere. Both
        // live inside the MMIO hole, out of the guest's RAM.
        fd.set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(kvm_err("set the TSS address"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("set the identity map address"))?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report its supported CPUID"))?;
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("list its MSRs"))?
            .as_slice()
            .to_vec();
        Ok(Self {
            kvm,
            fd,
            supported_cpuid,
            msr_list,
        })
    }

    /// Creates the in-kernel irqchip (PIC, IOAPIC, local APICs). Done after the
    /// memory slots: on some hosts a slot change is much slower once the irqchip
    /// exists (it waits for an SRCU grace period).
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))
    }

    /// Creates the in-kernel PIT (after the irqchip). It starts a kernel worker
    /// thread, which takes about a millisecond: the builder overlaps it with
    /// loading the kernel.
    pub fn create_pit(&self) -> Result<(), VmError> {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(kvm_err("create the in-kernel PIT"))
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem` of exactly
            // `memory_size` bytes; `mem` outlives the VM (the VMM keeps both
            // until the process exits), so KVM never sees a dangling mapping.
            unsafe { self.fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("map guest memory"))?;
        }
        Ok(())
    }
}
