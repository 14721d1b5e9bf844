//! Initial vCPU state for each entry protocol: segment descriptors, control
//! registers, identity page tables, FPU, MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

/// Errors setting up a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("KVM refused the vCPU's {what}: {source}")]
    Kvm {
        /// Which registers.
        what: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// Writing a boot structure into guest memory failed.
    #[error(
        "cannot write the {what} into guest memory: {source}; is guest memory at least 32 MiB?"
    )]
    Memory {
        /// Which structure.
        what: &'static str,
        /// The memory error.
        source: vm_memory::GuestMemoryError,
    },
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 32-bit protected mode, paging off, `ebx` = start info (PVH).
    Pvh,
    /// 64-bit long mode, identity-mapped low 1 GiB, `rsi` = zero page.
    Long64,
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT descriptor from flags (bits 52..55 and 40..47 packed as 0xF0FF), base, limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity the effective limit is in pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

fn gdt_for(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        // 32-bit code: D=1, G=1, present, execute/read.
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
        // 64-bit code: L=1, G=1.
        EntryMode::Long64 => gdt_entry(0xa09b, 0, 0xfffff),
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data: read/write, D=1, G=1
        gdt_entry(0x008b, 0, 0x67),    // TSS, busy
    ]
}

/// Writes the GDT (and for long mode the page tables) and loads the special
/// registers for `mode`.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let gdt = gdt_for(mode);
    let mut gdt_bytes = [0u8; 32];
    for (i, e) in gdt.iter().enumerate() {
        gdt_bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
    }
    mem.write_slice(&gdt_bytes, GuestAddress(layout::GDT_ADDR))
        .map_err(|source| RegsError::Memory {
            what: "GDT",
            source,
        })?;

    let mut sregs = vcpu.get_sregs().map_err(|source| RegsError::Kvm {
        what: "special registers (read)",
        source,
    })?;
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (gdt_bytes.len() - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Long64 => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = layout::PML4_ADDR;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs).map_err(|source| RegsError::Kvm {
        what: "special registers",
        source,
    })
}

/// Identity-maps the low 1 GiB with 2 MiB pages.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let wr = |v: u64, addr: u64| {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|source| RegsError::Memory {
                what: "page tables",
                source,
            })
    };
    wr(layout::PDPTE_ADDR | 0x03, layout::PML4_ADDR)?;
    wr(layout::PDE_ADDR | 0x03, layout::PDPTE_ADDR)?;
    let mut pd = vec![0u8; 4096];
    for i in 0..512u64 {
        let entry = (i << 21) | 0x83; // present, writable, 2 MiB page
        let off = (i * 8) as usize;
        pd[off..off + 8].copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(layout::PDE_ADDR))
        .map_err(|source| RegsError::Memory {
            what: "page tables",
            source,
        })
}

/// General registers at entry.
pub fn setup_regs(vcpu: &VcpuFd, mode: EntryMode, entry: u64) -> Result<(), RegsError> {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => regs.rbx = layout::START_INFO_ADDR,
        EntryMode::Long64 => {
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
            regs.rsi = layout::ZERO_PAGE_ADDR;
        }
    }
    vcpu.set_regs(&regs).map_err(|source| RegsError::Kvm {
        what: "general registers",
        source,
    })
}

/// x87 and SSE control words as after reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|source| RegsError::Kvm {
        what: "FPU",
        source,
    })
}

/// MSRs a booting kernel expects: SYSCALL/SYSENTER cleared, fast strings on,
/// MTRRs enabled with write-back default (or all of memory would be uncached).
pub const BOOT_MSRS: [(u32, u64); 10] = [
    (0x174, 0),               // IA32_SYSENTER_CS
    (0x175, 0),               // IA32_SYSENTER_ESP
    (0x176, 0),               // IA32_SYSENTER_EIP
    (0xc000_0081, 0),         // STAR
    (0xc000_0082, 0),         // LSTAR
    (0xc000_0083, 0),         // CSTAR
    (0xc000_0084, 0),         // SYSCALL_MASK
    (0xc000_0102, 0),         // KERNEL_GS_BASE
    (0x1a0, 1),               // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 0x6), // MTRRdefType: enabled, write-back
];

/// Sets the boot MSRs that this host's KVM supports (`supported` is KVM's MSR
/// index list); returns the indices KVM refused or does not know, so the caller
/// can log them. Never fails the boot for an MSR the host cannot virtualise.
pub fn setup_msrs(vcpu: &VcpuFd, supported: &[u32]) -> Result<Vec<u32>, RegsError> {
    let mut skipped = Vec::new();
    let mut entries: Vec<kvm_msr_entry> = Vec::with_capacity(BOOT_MSRS.len());
    for (index, data) in BOOT_MSRS {
        if supported.contains(&index) {
            entries.push(kvm_msr_entry {
                index,
                data,
                ..Default::default()
            });
        } else {
            skipped.push(index);
        }
    }
    // KVM sets MSRs in order and stops at the first it refuses: drop that one and
    // set the rest.
    while !entries.is_empty() {
        let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Kvm {
            what: "MSR list",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let set = vcpu.set_msrs(&msrs).map_err(|source| RegsError::Kvm {
            what: "MSRs",
            source,
        })?;
        if set >= entries.len() {
            break;
        }
        skipped.push(entries[set].index);
        entries.drain(..=set);
    }
    Ok(skipped)
}

/// Local APIC: LINT0 as ExtINT (the PIC's output), LINT1 as NMI, as firmware
/// leaves them.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu.get_lapic().map_err(|source| RegsError::Kvm {
        what: "local APIC (read)",
        source,
    })?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: Vec<u8> = lapic.regs[reg..reg + 4].iter().map(|b| *b as u8).collect();
        let v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(|source| RegsError::Kvm {
        what: "local APIC",
        source,
    })
}

/// Reads a vCPU's registers for a failure report; best effort.
pub fn dump(vcpu: &VcpuFd) -> vmm_api::VcpuRegs {
    let mut out = vmm_api::VcpuRegs::default();
    if let Ok(r) = vcpu.get_regs() {
        out.rip = r.rip;
        out.rsp = r.rsp;
        out.rflags = r.rflags;
        out.rax = r.rax;
        out.rbx = r.rbx;
        out.rcx = r.rcx;
        out.rdx = r.rdx;
        out.rsi = r.rsi;
        out.rdi = r.rdi;
        out.rbp = r.rbp;
    }
    if let Ok(s) = vcpu.get_sregs() {
        out.cr0 = s.cr0;
        out.cr3 = s.cr3;
        out.cr4 = s.cr4;
        out.efer = s.efer;
        out.cs = s.cs.selector;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_back() {
        let code64 = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(code64, 0x00af_9b00_0000_ffff);
        let seg = segment_from_gdt(code64, 1);
        assert_eq!((seg.l, seg.db, seg.g, seg.present, seg.s), (1, 0, 1, 1, 1));
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.selector, 8);
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.s, tss.type_, tss.g), (0x67, 0, 0xb, 0));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }
}
