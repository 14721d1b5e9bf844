//! A tiny bare-metal x86_64 guest for testing the VMM, built by `build.rs` from
//! the C and assembly sources in `guest/` (see `README.md` for the machine ABI
//! it expects and the serial output it produces).
//!
//! The same guest comes in three wrappings:
//! - [`elf_path`]: ELF64 with a Xen PVH note (32-bit PVH entry), `e_entry` = 64-bit entry;
//! - [`elf_nopvh_path`]: the same ELF64 without the note (64-bit entry, `boot_params` in rsi);
//! - [`bzimage_path`]: a Linux bzImage (64-bit boot protocol, entry at 1 MiB + 0x200).
//!
//! Its command line is built with `testkit::test_guest::Cmdline`.
//!
//! # Crate rules
//!
//! - **Owns** the guest's C and assembly sources and their build; the library
//!   only hands out the paths of the built images.
//! - **May depend on** `vmm-api`, at build time only, for the guest-visible
//!   platform it must agree with (the virtio-mmio layout).
//! - **Must not depend on** anything at run time: tests of every crate link
//!   it, so it stays a leaf (no `vmm`, no `agent`, no `tokio`).

use std::path::Path;

/// Path of the guest as an ELF64 with a PVH note (PVH entry = 32-bit) and `e_entry` = its 64-bit entry.
pub fn elf_path() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/test-guest-pvh.elf"))
}

/// Path of the same guest wrapped as a Linux bzImage (64-bit boot protocol).
pub fn bzimage_path() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/test-guest.bzImage"))
}

/// The same guest as an ELF64 with NO PVH note (entered through its 64-bit `e_entry` with
/// `boot_params` in rsi).
pub fn elf_nopvh_path() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/test-guest-nopvh.elf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOAD_ADDR: u64 = 0x10_0000;
    const ENTRY64: u64 = LOAD_ADDR + 0x200;
    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

    fn u16_at(b: &[u8], off: usize) -> Option<u16> {
        Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
    }

    fn u32_at(b: &[u8], off: usize) -> Option<u32> {
        Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
    }

    fn u64_at(b: &[u8], off: usize) -> Option<u64> {
        Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
    }

    struct Phdr {
        kind: u32,
        offset: usize,
        paddr: u64,
        filesz: usize,
        memsz: u64,
    }

    struct Elf {
        entry: u64,
        phdrs: Vec<Phdr>,
    }

    /// Parses what the VMM's loader looks at; None if anything is out of bounds.
    fn parse_elf(b: &[u8]) -> Option<Elf> {
        if b.get(0..4)? != b"\x7fELF"
            || *b.get(4)? != 2
            || *b.get(5)? != 1
            || u16_at(b, 0x12)? != 62
        {
            return None; // not ELF64, little endian, x86_64
        }
        let phoff = usize::try_from(u64_at(b, 0x20)?).ok()?;
        let phentsize = usize::from(u16_at(b, 0x36)?);
        let phnum = usize::from(u16_at(b, 0x38)?);
        if phentsize != 56 {
            return None;
        }
        let mut phdrs = Vec::new();
        for i in 0..phnum {
            let ph = phoff + i * phentsize;
            phdrs.push(Phdr {
                kind: u32_at(b, ph)?,
                offset: usize::try_from(u64_at(b, ph + 0x08)?).ok()?,
                paddr: u64_at(b, ph + 0x18)?,
                filesz: usize::try_from(u64_at(b, ph + 0x20)?).ok()?,
                memsz: u64_at(b, ph + 0x28)?,
            });
        }
        Some(Elf {
            entry: u64_at(b, 0x18)?,
            phdrs,
        })
    }

    /// The PVH entry address from the Xen notes in the PT_NOTE segments.
    fn pvh_entry(b: &[u8], elf: &Elf) -> Option<u32> {
        let mut found = None;
        for ph in elf.phdrs.iter().filter(|p| p.kind == PT_NOTE) {
            let notes = b.get(ph.offset..ph.offset + ph.filesz)?;
            let mut off = 0;
            while off + 12 <= notes.len() {
                let namesz = usize::try_from(u32_at(notes, off)?).ok()?;
                let descsz = usize::try_from(u32_at(notes, off + 4)?).ok()?;
                let kind = u32_at(notes, off + 8)?;
                let name = notes.get(off + 12..off + 12 + namesz)?;
                let desc_off = off + 12 + namesz.next_multiple_of(4);
                if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY && descsz >= 4 {
                    found = Some(u32_at(notes, desc_off)?);
                }
                off = desc_off + descsz.next_multiple_of(4);
            }
        }
        found
    }

    fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    #[test]
    fn pvh_elf_has_the_note_and_a_64_bit_entry() {
        let bytes = read(elf_path());
        let elf = parse_elf(&bytes).expect("a valid ELF64 x86_64 file");
        assert_eq!(elf.entry, ENTRY64);
        assert_eq!(elf.phdrs.iter().filter(|p| p.kind == PT_NOTE).count(), 1);
        assert_eq!(pvh_entry(&bytes, &elf), Some(LOAD_ADDR as u32));
        assert!(
            bytes.len() < 64 * 1024,
            "the guest should stay small: {} bytes",
            bytes.len()
        );
    }

    #[test]
    fn plain_elf_has_no_pvh_note() {
        let bytes = read(elf_nopvh_path());
        let elf = parse_elf(&bytes).expect("a valid ELF64 x86_64 file");
        assert_eq!(elf.entry, ENTRY64);
        assert_eq!(pvh_entry(&bytes, &elf), None);
        assert!(elf.phdrs.iter().all(|p| p.kind != PT_NOTE));
    }

    #[test]
    fn bzimage_header_and_payload() {
        let bz = read(bzimage_path());
        assert_eq!(bz.get(0x202..0x206), Some(&b"HdrS"[..]));
        assert_eq!(u16_at(&bz, 0x1fe), Some(0xaa55));
        assert_eq!(u16_at(&bz, 0x206), Some(0x020f));
        assert_eq!(bz.get(0x211).map(|f| f & 1), Some(1), "LOADED_HIGH");
        assert_eq!(u32_at(&bz, 0x214), Some(LOAD_ADDR as u32));
        assert_eq!(u16_at(&bz, 0x236).map(|f| f & 1), Some(1), "XLF_KERNEL_64");
        let setup_sects = usize::from(*bz.get(0x1f1).expect("setup_sects"));
        let payload = bz.get((setup_sects + 1) * 512..).expect("a payload");

        // The payload is the plain ELF's loadable bytes, entry at +0x200.
        let bytes = read(elf_nopvh_path());
        let elf = parse_elf(&bytes).expect("a valid ELF64 x86_64 file");
        let load: Vec<&Phdr> = elf.phdrs.iter().filter(|p| p.kind == PT_LOAD).collect();
        assert_eq!(load.len(), 1);
        assert_eq!(load[0].paddr, LOAD_ADDR);
        assert_eq!(
            Some(payload),
            bytes.get(load[0].offset..load[0].offset + load[0].filesz)
        );
        let init_size = u32_at(&bz, 0x260).expect("init_size");
        assert!(init_size as usize >= payload.len());
    }

    #[test]
    fn stack_and_agent_memory_are_reserved_but_not_in_the_file() {
        // 16 KiB of stack and 128 KiB for the vsock agent (guest/guest.h
        // AGENT_MEM_SIZE) follow the loaded bytes: in memsz and the bzImage's
        // init_size, not in the files.
        const RESERVED: u64 = (16 + 128) * 1024;
        let bytes = read(elf_path());
        let elf = parse_elf(&bytes).expect("a valid ELF64 x86_64 file");
        let load: Vec<&Phdr> = elf.phdrs.iter().filter(|p| p.kind == PT_LOAD).collect();
        assert_eq!(load.len(), 1);
        assert!(load[0].memsz >= load[0].filesz as u64 + RESERVED);
        let bz = read(bzimage_path());
        let init_size = u32_at(&bz, 0x260).expect("init_size");
        assert_eq!(u64::from(init_size), load[0].memsz);
        assert!(bz.len() < 64 * 1024, "{} bytes", bz.len());
    }
}
