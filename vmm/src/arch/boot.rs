//! Boot structures written into guest memory: the PVH `hvm_start_info` (with
//! its memory map and module list) and the Linux `boot_params` zero page.
//!
//! They are built as byte arrays at the offsets the protocols define, so no
//! `unsafe` plain-old-data casts are needed.

use super::layout::{self, MAX_MEMMAP_ENTRIES};

/// `hvm_start_info.magic`.
pub const PVH_START_MAGIC: u32 = 0x336e_c578;

/// Where the initrd was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
}

fn put_u16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The PVH blobs: start info (at [`layout::START_INFO_ADDR`]), the module list
/// (at [`layout::MODLIST_ADDR`]) and the memory map (at [`layout::MEMMAP_ADDR`]).
pub struct PvhBlobs {
    /// `struct hvm_start_info`, 56 bytes.
    pub start_info: [u8; 56],
    /// One `hvm_modlist_entry` (32 bytes) when there is an initrd.
    pub modlist: Option<[u8; 32]>,
    /// `hvm_memmap_table_entry` array, 24 bytes each.
    pub memmap: Vec<u8>,
}

/// Builds the PVH start info for `mem_bytes` of RAM.
pub fn pvh_start_info(
    mem_bytes: u64,
    cmdline_addr: u64,
    rsdp_addr: u64,
    initrd: Option<InitrdPlacement>,
) -> PvhBlobs {
    let map = layout::memory_map(mem_bytes);
    debug_assert!(map.len() <= MAX_MEMMAP_ENTRIES);
    let mut memmap = vec![0u8; map.len() * 24];
    for (i, (base, size, kind)) in map.iter().enumerate() {
        put_u64(&mut memmap, i * 24, *base);
        put_u64(&mut memmap, i * 24 + 8, *size);
        put_u32(&mut memmap, i * 24 + 16, *kind);
    }
    let mut si = [0u8; 56];
    put_u32(&mut si, 0, PVH_START_MAGIC);
    put_u32(&mut si, 4, 1); // version 1: has the memory map fields
    let modlist = initrd.map(|rd| {
        let mut m = [0u8; 32];
        put_u64(&mut m, 0, rd.addr);
        put_u64(&mut m, 8, rd.size);
        m
    });
    if modlist.is_some() {
        put_u32(&mut si, 12, 1);
        put_u64(&mut si, 16, layout::MODLIST_ADDR);
    }
    put_u64(&mut si, 24, cmdline_addr);
    put_u64(&mut si, 32, rsdp_addr);
    put_u64(&mut si, 40, layout::MEMMAP_ADDR);
    put_u32(&mut si, 48, map.len() as u32);
    PvhBlobs {
        start_info: si,
        modlist,
        memmap,
    }
}

/// Offsets into `struct boot_params` (Documentation/arch/x86/zero-page.rst).
mod zp {
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const SETUP_HEADER: usize = 0x1f1;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const HEADER: usize = 0x202;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const HEAP_END_PTR: usize = 0x224;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const E820_TABLE: usize = 0x2d0;
    pub const E820_MAX: usize = 128;
}

/// Largest setup header a bzImage can carry (it ends before the zero page's
/// fields that follow at 0x290).
pub const MAX_SETUP_HEADER_LEN: usize = 0x290 - zp::SETUP_HEADER;

/// Builds the Linux zero page. `setup_header` is the kernel's own header bytes
/// (from offset 0x1f1 of a bzImage); `None` for an ELF vmlinux, which gets a
/// minimal header.
pub fn linux_boot_params(
    mem_bytes: u64,
    setup_header: Option<&[u8]>,
    cmdline_addr: u64,
    cmdline_len: usize,
    rsdp_addr: u64,
    initrd: Option<InitrdPlacement>,
) -> [u8; 4096] {
    let mut zp = [0u8; 4096];
    match setup_header {
        Some(hdr) => {
            let n = hdr.len().min(MAX_SETUP_HEADER_LEN);
            zp[zp::SETUP_HEADER..zp::SETUP_HEADER + n].copy_from_slice(&hdr[..n]);
        }
        None => {
            put_u16(&mut zp, zp::BOOT_FLAG, 0xaa55);
            put_u32(&mut zp, zp::HEADER, 0x5372_6448); // "HdrS"
            put_u32(&mut zp, zp::KERNEL_ALIGNMENT, 0x0100_0000);
        }
    }
    zp[zp::TYPE_OF_LOADER] = 0xff;
    // CAN_USE_HEAP, with the heap ending right before the command line.
    zp[zp::LOADFLAGS] |= 0x80;
    put_u16(&mut zp, zp::HEAP_END_PTR, 0xfe00);
    put_u32(&mut zp, zp::CMD_LINE_PTR, cmdline_addr as u32);
    put_u32(&mut zp, zp::EXT_CMD_LINE_PTR, (cmdline_addr >> 32) as u32);
    put_u32(&mut zp, zp::CMDLINE_SIZE, cmdline_len as u32);
    put_u64(&mut zp, zp::ACPI_RSDP_ADDR, rsdp_addr);
    if let Some(rd) = initrd {
        put_u32(&mut zp, zp::RAMDISK_IMAGE, rd.addr as u32);
        put_u32(&mut zp, zp::EXT_RAMDISK_IMAGE, (rd.addr >> 32) as u32);
        put_u32(&mut zp, zp::RAMDISK_SIZE, rd.size as u32);
        put_u32(&mut zp, zp::EXT_RAMDISK_SIZE, (rd.size >> 32) as u32);
    }
    let map = layout::memory_map(mem_bytes);
    debug_assert!(map.len() <= zp::E820_MAX);
    zp[zp::E820_ENTRIES] = map.len() as u8;
    for (i, (base, size, kind)) in map.iter().enumerate() {
        let off = zp::E820_TABLE + i * 20;
        put_u64(&mut zp, off, *base);
        put_u64(&mut zp, off + 8, *size);
        put_u32(&mut zp, off + 16, *kind);
    }
    zp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
    }

    #[test]
    fn start_info_fields() {
        let rd = InitrdPlacement {
            addr: 0x7f0_0000,
            size: 0x1234,
        };
        let b = pvh_start_info(128 << 20, 0x20000, 0xe0000, Some(rd));
        assert_eq!(u32_at(&b.start_info, 0), PVH_START_MAGIC);
        assert_eq!(u32_at(&b.start_info, 12), 1);
        assert_eq!(u64_at(&b.start_info, 16), layout::MODLIST_ADDR);
        assert_eq!(u64_at(&b.start_info, 24), 0x20000);
        assert_eq!(u64_at(&b.start_info, 32), 0xe0000);
        assert_eq!(u64_at(&b.start_info, 40), layout::MEMMAP_ADDR);
        assert_eq!(u32_at(&b.start_info, 48), 3);
        let m = b.modlist.expect("initrd module");
        assert_eq!(u64_at(&m, 0), rd.addr);
        assert_eq!(u64_at(&m, 8), rd.size);
        assert_eq!(b.memmap.len(), 3 * 24);
        assert_eq!(u64_at(&b.memmap, 48), layout::HIMEM_START);
    }

    #[test]
    fn zero_page_for_vmlinux_and_bzimage() {
        let zp = linux_boot_params(256 << 20, None, 0x20000, 10, 0xe0000, None);
        assert_eq!(u32_at(&zp, 0x202), 0x5372_6448);
        assert_eq!(u32_at(&zp, 0x228), 0x20000);
        assert_eq!(zp[0x1e8], 3);
        assert_eq!(u64_at(&zp, 0x70), 0xe0000);

        let mut hdr = vec![0u8; 0x202 + 0x70 - 0x1f1];
        hdr[0x202 - 0x1f1..0x206 - 0x1f1].copy_from_slice(b"HdrS");
        hdr[0x211 - 0x1f1] = 0x01;
        let rd = InitrdPlacement {
            addr: 0x100_0000,
            size: 4096,
        };
        let zp = linux_boot_params(256 << 20, Some(&hdr), 0x20000, 10, 0xe0000, Some(rd));
        assert_eq!(&zp[0x202..0x206], b"HdrS");
        assert_eq!(zp[0x211], 0x81);
        assert_eq!(u32_at(&zp, 0x218), 0x100_0000);
        assert_eq!(u32_at(&zp, 0x21c), 4096);
    }
}
