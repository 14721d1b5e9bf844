//! Kernel and initrd loading: ELF (with or without the PVH note) through
//! `linux-loader`, bzImage through `linux-loader` plus its setup header, and the
//! choice of entry protocol.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};
use vmm_api::BootProtocol;

use crate::arch::{boot::InitrdPlacement, boot::MAX_SETUP_HEADER_LEN, layout, regs::EntryMode};

/// Errors loading a kernel or initrd.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The file could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Io {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("kernel {0} is neither an ELF (vmlinux) nor a bzImage; pass an uncompressed vmlinux or a bzImage")]
    UnknownFormat(PathBuf),
    /// linux-loader refused the image.
    #[error("kernel {path} is not a loadable {format}: {source}")]
    Load {
        /// The file.
        path: PathBuf,
        /// "ELF" or "bzImage".
        format: &'static str,
        /// The loader's reason.
        source: linux_loader::loader::Error,
    },
    /// PVH was asked for but the kernel has no PVH note.
    #[error("kernel {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); use boot_protocol \"linux64\" or \"auto\"")]
    NoPvhNote(PathBuf),
    /// PVH was asked for a bzImage.
    #[error("kernel {0} is a bzImage, which boots only through the Linux 64-bit protocol; use boot_protocol \"linux64\" or \"auto\", or pass the vmlinux for PVH")]
    PvhOnBzImage(PathBuf),
    /// The initrd does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel; give the VM more memory")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("cannot copy initrd {path} into guest memory: {source}")]
    InitrdCopy {
        /// The file.
        path: PathBuf,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
}

/// A loaded kernel: where to enter it and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Entry point (guest physical).
    pub entry: u64,
    /// Protocol to enter with.
    pub mode: EntryMode,
    /// First byte after the kernel image.
    pub end: u64,
    /// For a bzImage: its setup header bytes (from offset 0x1f1).
    pub setup_header: Option<Vec<u8>>,
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> LoaderError + 'a {
    move |source| LoaderError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    protocol: BootProtocol,
) -> Result<LoadedKernel, LoaderError> {
    let mut file = File::open(path).map_err(io_err("kernel", path))?;
    let mut head = [0u8; 1024];
    let n = read_up_to(&mut file, &mut head).map_err(io_err("kernel", path))?;
    let head = &head[..n];
    if head.starts_with(b"\x7fELF") {
        let res = Elf::load(
            mem,
            None,
            &mut file,
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .map_err(|source| LoaderError::Load {
            path: path.to_owned(),
            format: "ELF",
            source,
        })?;
        let pvh = match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
            _ => None,
        };
        let (entry, mode) = match (protocol, pvh) {
            (BootProtocol::Auto | BootProtocol::Pvh, Some(e)) => (e, EntryMode::Pvh),
            (BootProtocol::Pvh, None) => return Err(LoaderError::NoPvhNote(path.to_owned())),
            (BootProtocol::Auto | BootProtocol::Linux64, _) => {
                (res.kernel_load.0, EntryMode::Long64)
            }
        };
        Ok(LoadedKernel {
            entry,
            mode,
            end: res.kernel_end,
            setup_header: None,
        })
    } else if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        if protocol == BootProtocol::Pvh {
            return Err(LoaderError::PvhOnBzImage(path.to_owned()));
        }
        let res = BzImage::load(
            mem,
            None,
            &mut file,
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .map_err(|source| LoaderError::Load {
            path: path.to_owned(),
            format: "bzImage",
            source,
        })?;
        // The setup header runs from 0x1f1 to 0x202 + the byte at 0x201.
        let hdr_end = (0x202 + usize::from(head[0x201])).min(0x1f1 + MAX_SETUP_HEADER_LEN);
        let hdr_end = hdr_end.min(head.len());
        Ok(LoadedKernel {
            entry: res.kernel_load.0 + 0x200,
            mode: EntryMode::Long64,
            end: res.kernel_end,
            setup_header: Some(head[0x1f1..hdr_end].to_vec()),
        })
    } else {
        Err(LoaderError::UnknownFormat(path.to_owned()))
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    f.seek(SeekFrom::Start(0))?;
    Ok(n)
}

/// Copies the initrd to the top of low RAM (page aligned), above `kernel_end`.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    path: &Path,
    kernel_end: u64,
) -> Result<InitrdPlacement, LoaderError> {
    let mut file = File::open(path).map_err(io_err("initrd", path))?;
    let size = file.metadata().map_err(io_err("initrd", path))?.len();
    let top = layout::low_ram_end(mem_bytes).min(0x1_0000_0000 - 1);
    let too_large = || LoaderError::InitrdTooLarge {
        path: path.to_owned(),
        size,
    };
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.max(layout::HIMEM_START) {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    let mut slice =
        mem.get_slice(GuestAddress(addr), len)
            .map_err(|source| LoaderError::InitrdCopy {
                path: path.to_owned(),
                source,
            })?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| LoaderError::InitrdCopy {
            path: path.to_owned(),
            source: vm_memory::GuestMemoryError::IOError(std::io::Error::other(e.to_string())),
        })?;
    Ok(InitrdPlacement { addr, size })
}

/// Writes the NUL-terminated command line at [`layout::CMDLINE_ADDR`].
pub fn load_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_ADDR))
}
