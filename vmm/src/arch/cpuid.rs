//! CPUID for each vCPU: what KVM says this host can virtualise
//! (`KVM_GET_SUPPORTED_CPUID`), with the topology filled in per vCPU and the
//! leaves a guest must not trust on this host taken out.

use kvm_bindings::CpuId;

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: hyper-threading / multi-core topology is valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 7 EDX: IA32_ARCH_CAPABILITIES MSR. Some hosts (kvm-pvm) advertise it but
/// refuse to set the MSR; the guest reads KVM's emulated value either way, so we
/// keep the bit only when the MSR is in KVM's feature MSR list.
const LEAF7_EDX_ARCH_CAPABILITIES: u32 = 1 << 29;

/// Adapts `base` (the supported CPUID) for vCPU `index` of `count`.
/// `arch_capabilities_msr` says whether the host can expose MSR 0x10a.
pub fn for_vcpu(base: &CpuId, index: u8, count: u8, arch_capabilities_msr: bool) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                // APIC ID, logical processor count, CLFLUSH line size (8 x 8 bytes).
                e.ebx = (u32::from(index) << 24) | (u32::from(count) << 16) | (8 << 8);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x6 => {
                // Thermal and power management: nothing a guest can use here.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x7 if e.index == 0 && !arch_capabilities_msr => {
                e.edx &= !LEAF7_EDX_ARCH_CAPABILITIES;
            }
            0xb | 0x1f => {
                // x2APIC topology: one thread per core, `count` cores.
                e.edx = u32::from(index);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8; // level type: SMT
                    }
                    1 => {
                        e.eax = 8 - (count.max(1) - 1).leading_zeros().min(8);
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | 1; // level type: core
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn topology_per_vcpu() {
        let base = CpuId::from_entries(&[entry(1, 0), entry(7, 0), entry(0xb, 0), entry(0xb, 1)])
            .expect("cpuid");
        let c = for_vcpu(&base, 3, 4, false);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_ne!(s[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(s[1].edx & LEAF7_EDX_ARCH_CAPABILITIES, 0);
        assert_eq!(s[2].edx, 3);
        assert_eq!(s[3].ebx, 4);
        assert_eq!(s[3].eax, 2); // 4 cores need 2 bits of APIC ID
        let one = for_vcpu(&base, 0, 1, true);
        assert_eq!(one.as_slice()[0].edx & LEAF1_EDX_HTT, 0);
        assert_ne!(one.as_slice()[1].edx & LEAF7_EDX_ARCH_CAPABILITIES, 0);
    }
}
