//! Disk images for reddog: raw, qcow2 (through `imago`) and Microsoft VHD (native).
//!
//! Everything goes through the positional [`DiskImage`] trait. The format of an image is
//! always given by the caller ([`open`] with a [`Format`]); [`probe`] exists for tools and
//! is advisory only. A backing (parent) image is never looked up from a name stored inside
//! an image: the caller opens the base read-only and hands it in through
//! [`OpenOptions::backing`]. See `docs/disks.md`.
//!
//! **The crate's rules.** It owns the on-disk formats (parsing, validation, I/O, creation,
//! `check`, `convert`), the exclusive lock on every writable image, the ext4 resource and
//! role disks (through the e2fsprogs tools) and the `reddog-image` command line ([`cli`]).
//! It is synchronous and self-contained: it may depend on `imago` (the `sync` build only),
//! `nix` (fallocate, flock), `thiserror`, `tracing`, and, for the command line alone, `clap`,
//! `anyhow` and `tracing-subscriber`. It must not depend on KVM, vm-memory or any other
//! rust-vmm crate, on tokio or any async runtime, on serde/serde_json, or on another reddog
//! crate: reddog-vmm and the agent use it, never the reverse. Everything read from an image
//! is hostile input: no panics, no unbounded allocations, no `unsafe` (forbidden below).
#![forbid(unsafe_code)]

use std::any::Any;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

pub mod check;
#[cfg(feature = "cli")]
pub mod cli;
pub mod convert;
mod error;
pub mod ext4;
pub mod msvhd;
pub mod qcow2;
pub mod raw;
pub(crate) mod util;

use error::err;
pub use error::{DiskError, ErrorKind, Result};

/// The largest virtual disk this layer creates or accepts (64 TiB).
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// A disk image with positional I/O. Implementations are safe to share between threads.
///
/// Requests must lie inside `[0, size())`; a request past the end fails with
/// [`ErrorKind::OutOfBounds`]. Reads and writes are complete (no short transfers).
pub trait DiskImage: Send + Sync + fmt::Debug + Any {
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every completed write durable (metadata included).
    fn flush(&self) -> Result<()>;
    /// Deallocates the range where the format can; afterwards it reads as zeros (not as
    /// the backing image's data). [`ErrorKind::Unsupported`] where the format cannot.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes the range read as zeros, efficiently where the format can.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// The virtual disk size in bytes.
    fn size(&self) -> u64;
    /// Whether the image was opened read-only.
    fn read_only(&self) -> bool;
    /// The image's format.
    fn format(&self) -> Format;
    /// For downcasting (e.g. to hand a base to an overlay of the same family).
    fn as_any(&self) -> &dyn Any;
}

/// The on-disk formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Plain bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// Microsoft Virtual Hard Disk (fixed, dynamic, differencing).
    Vhd,
}

impl Format {
    /// The format name as qemu-img spells it.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vhd => "vpc",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vhd => "vhd",
        })
    }
}

impl std::str::FromStr for Format {
    type Err = DiskError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "vhd" | "vpc" => Ok(Format::Vhd),
            _ => Err(err(
                ErrorKind::InvalidArgument,
                "parse format",
                format!("unknown format {s:?}; use raw, qcow2 or vhd"),
            )),
        }
    }
}

/// How to open an image.
#[derive(Clone, Default)]
pub struct OpenOptions {
    /// Open without write access.
    pub read_only: bool,
    /// The backing (parent) image, opened read-only by the caller. Required exactly when
    /// the image is an overlay; never looked up from the name inside the image.
    pub backing: Option<Arc<dyn DiskImage>>,
}

impl fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenOptions")
            .field("read_only", &self.read_only)
            .field("backing", &self.backing.as_ref().map(|b| b.format()))
            .finish()
    }
}

impl OpenOptions {
    /// Read-only, no backing.
    pub fn read_only() -> Self {
        OpenOptions {
            read_only: true,
            backing: None,
        }
    }
    /// Read-write, no backing.
    pub fn read_write() -> Self {
        OpenOptions::default()
    }
    /// Sets the backing image.
    #[must_use]
    pub fn with_backing(mut self, backing: Arc<dyn DiskImage>) -> Self {
        self.backing = Some(backing);
        self
    }
}

/// Opens `path` as `format`.
pub fn open(
    path: impl AsRef<Path>,
    format: Format,
    opts: OpenOptions,
) -> Result<Arc<dyn DiskImage>> {
    let path = path.as_ref();
    Ok(match format {
        Format::Raw => {
            if opts.backing.is_some() {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    "open raw image",
                    "a raw image has no backing image; do not pass one",
                )
                .with_path(path));
            }
            Arc::new(raw::RawDisk::open(path, opts.read_only)?)
        }
        Format::Qcow2 => Arc::new(qcow2::Qcow2Disk::open(path, opts)?),
        Format::Vhd => Arc::new(msvhd::VhdDisk::open(path, opts)?),
    })
}

/// Options for creating a standalone image.
#[derive(Debug, Clone, Copy)]
pub struct CreateOptions {
    /// Virtual size in bytes (qcow2/raw: multiple of 512; VHD: rounded as documented).
    pub size: u64,
    /// qcow2 cluster size (default 64 KiB).
    pub cluster_size: Option<u32>,
    /// VHD: fixed instead of dynamic.
    pub vhd_fixed: bool,
    /// VHD dynamic/differencing block size (default 2 MiB).
    pub vhd_block_size: Option<u32>,
}

impl CreateOptions {
    /// Defaults for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            cluster_size: None,
            vhd_fixed: false,
            vhd_block_size: None,
        }
    }
}

/// Creates a standalone (no backing) image; fails if `path` exists.
pub fn create(path: impl AsRef<Path>, format: Format, opts: &CreateOptions) -> Result<()> {
    let path = path.as_ref();
    match format {
        Format::Raw => raw::create(path, opts.size),
        Format::Qcow2 => qcow2::create(path, opts.size, opts.cluster_size, None),
        Format::Vhd => {
            if opts.vhd_fixed {
                msvhd::create_fixed(path, opts.size)
            } else {
                msvhd::create_dynamic(path, opts.size, opts.vhd_block_size)
            }
        }
    }
}

/// The base of a differencing image: the opened (read-only) image, and the name to record
/// in the overlay (relative to the overlay's directory, or absolute). The name is only
/// informational for other tools; this crate never follows it.
#[derive(Clone)]
pub struct BaseRef {
    /// The opened base image.
    pub image: Arc<dyn DiskImage>,
    /// The name recorded in the overlay.
    pub name: String,
}

impl fmt::Debug for BaseRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BaseRef").field("name", &self.name).finish()
    }
}

/// Creates a differencing image over `base`. Costs the same whatever the base's size.
/// `size` defaults to the base's size and may be larger.
pub fn create_diff(
    path: impl AsRef<Path>,
    format: Format,
    base: &BaseRef,
    size: Option<u64>,
    cluster_size: Option<u32>,
) -> Result<()> {
    let path = path.as_ref();
    let size = size.unwrap_or_else(|| base.image.size());
    if size < base.image.size() {
        return Err(err(
            ErrorKind::InvalidArgument,
            "create differencing image",
            format!(
                "the overlay ({size} bytes) must not be smaller than its base ({} bytes)",
                base.image.size()
            ),
        )
        .with_path(path));
    }
    match format {
        Format::Raw => Err(err(
            ErrorKind::Unsupported,
            "create differencing image",
            "raw images cannot have a base; use qcow2 or vhd",
        )
        .with_path(path)),
        Format::Qcow2 => qcow2::create(path, size, cluster_size, Some(base)),
        Format::Vhd => msvhd::create_differencing(path, base, size),
    }
}

/// Guesses the format from magic numbers. Advisory only: never use it to decide how to
/// open an image a guest could have written.
pub fn probe(path: impl AsRef<Path>) -> Result<Format> {
    util::probe(path.as_ref())
}
