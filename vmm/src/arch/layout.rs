//! The guest physical memory map. Low memory holds the boot structures, the
//! kernel goes at 1 MiB, a hole below 4 GiB is kept for MMIO devices.

/// GDT used at entry (4 descriptors).
pub const GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info`.
pub const START_INFO_ADDR: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map entries (up to [`MAX_MEMMAP_ENTRIES`]).
pub const MEMMAP_ADDR: u64 = 0x6100;
/// Most memory map entries we ever write.
pub const MAX_MEMMAP_ENTRIES: usize = 8;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry: PML4, PDPT, PD.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_ADDR: u64 = 0xa000;
/// Page directory (512 x 2 MiB = the low 1 GiB).
pub const PDE_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Start of the extended BIOS data area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// The BIOS area where the ACPI tables live (reserved in the memory map).
pub const BIOS_AREA_START: u64 = 0xe_0000;
/// End of the first megabyte.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO hole below 4 GiB; RAM above it moves past 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// IOAPIC registers.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS for real-mode emulation on Intel (3 pages, inside the MMIO hole).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity map page for real-mode emulation on Intel.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

// The PVH blobs fit between their fixed addresses.
const _: () = assert!(START_INFO_ADDR + 56 <= MODLIST_ADDR);
const _: () = assert!(MODLIST_ADDR + 32 <= MEMMAP_ADDR);
const _: () = assert!(MEMMAP_ADDR + 24 * MAX_MEMMAP_ENTRIES as u64 <= ZERO_PAGE_ADDR);

/// The guest RAM ranges for `mem_bytes` of memory: below the MMIO hole, and the
/// rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// Memory map entry types (e820 and PVH share them).
pub const E820_RAM: u32 = 1;
/// Reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The memory map the guest sees: (base, size, type).
pub fn memory_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (
            BIOS_AREA_START,
            HIMEM_START - BIOS_AREA_START,
            E820_RESERVED,
        ),
    ];
    for (base, size) in ram_ranges(mem_bytes) {
        if base == 0 {
            map.push((HIMEM_START, size - HIMEM_START, E820_RAM));
        } else {
            map.push((base, size, E820_RAM));
        }
    }
    map
}

/// End of the RAM below the MMIO hole (where the initrd goes, top down).
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        let map = memory_map(128 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2], (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM));
        assert!(map.len() <= MAX_MEMMAP_ENTRIES);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let mem = 4u64 << 30;
        let ranges = ram_ranges(mem);
        assert_eq!(ranges[1], (MMIO_GAP_END, mem - MMIO_GAP_START));
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(total, mem);
        assert_eq!(low_ram_end(mem), MMIO_GAP_START);
    }
}
