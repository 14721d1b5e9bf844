//! Microsoft VHD (Virtual Hard Disk Image Format Specification): fixed, dynamic and
//! differencing images, implemented natively.
//!
//! Crash-safe write order when a block is allocated (see `docs/disks.md`): the footer is
//! first rewritten past the new block and synced (so the last 512 bytes are always a valid
//! footer, even after a power loss), then the block's bitmap is written and synced, and
//! only then is the BAT entry pointed at the block. A crash before the BAT write leaves an
//! unreferenced block, which every reader ignores. In differencing images a sector's bitmap
//! bit is set only after its data is written.
//!
//! This file holds the image type ([`VhdDisk`]), its opening and the parent check. The rest:
//!
//! | module | holds |
//! |---|---|
//! | `footer` | the footer ([`Footer`], [`VhdType`]), its checksum, CHS geometry, VHD time |
//! | `header` | the dynamic header ([`DynHeader`]) and parent locators ([`ParentLocator`]) |
//! | `layout` | the whole file validated at open (footer, header, BAT, blocks), [`info`] |
//! | `io` | reads, writes, block allocation; the [`DiskImage`] implementation |
//! | `create` | [`create_fixed`], [`create_dynamic`], [`create_differencing`] |
//! | `power_loss` | (tests) power-loss simulation over the recorded writes and syncs |

mod create;
mod footer;
mod header;
mod io;
mod layout;
#[cfg(test)]
mod power_loss;

pub use create::{create_differencing, create_dynamic, create_fixed};
pub use footer::{chs_for, geometry_for, Footer, VhdType, CREATOR_APP};
pub use header::{DynHeader, ParentLocator};
pub use layout::{info, VhdInfo};

use crate::error::{err, DiskError, ErrorKind, IoContext, Result};
use crate::util::{lock_writable, WriteLock};
use crate::{DiskImage, OpenOptions};
use footer::vhd_time;
use layout::{parse, Parsed};
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

const SECTOR: u64 = 512;
const UNUSED: u32 = 0xffff_ffff;
/// Default block size of dynamic and differencing images.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Largest VHD the format can address (2040 GiB per the specification).
pub const MAX_VHD_SIZE: u64 = 2040 << 30;

fn bad(kind: ErrorKind, msg: impl Into<String>) -> DiskError {
    err(kind, "open vhd image", msg)
}

struct WriteState {
    footer_pos: u64,
}

/// A VHD image.
pub struct VhdDisk {
    file: File,
    path: PathBuf,
    read_only: bool,
    footer: Footer,
    header: Option<DynHeader>,
    bat: RwLock<Vec<u32>>,
    /// Serialises writes (block allocation and bitmap updates).
    wstate: Mutex<WriteState>,
    parent: Option<Arc<dyn DiskImage>>,
    /// Unit tests only: every file write and sync, in order, once started.
    #[cfg(test)]
    journal: Mutex<Option<Vec<IoEvent>>>,
    /// Held while open writable (declared last: released after the file is closed).
    _lock: Option<WriteLock>,
}

/// A write to the image file or a sync of it (recorded by unit tests, which replay them to
/// simulate a power loss).
#[cfg(test)]
#[derive(Debug, Clone)]
pub(crate) enum IoEvent {
    /// `pwrite(data, offset)`.
    Write(u64, Vec<u8>),
    /// `fdatasync`.
    Sync,
}

impl std::fmt::Debug for VhdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdDisk")
            .field("path", &self.path)
            .field("type", &self.footer.disk_type)
            .field("size", &self.footer.current_size)
            .finish()
    }
}

impl VhdDisk {
    /// Opens a VHD. A differencing image needs its parent (opened read-only) in
    /// `opts.backing`; the parent's unique ID and timestamp must match what the image records.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Self> {
        let op = "open vhd image";
        let lock = (!opts.read_only)
            .then(|| lock_writable(path, op))
            .transpose()?;
        let file = FsOpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .ctx_path(op, path)?;
        let p = parse(&file).map_err(|e| e.with_path(path))?;
        let parent = match (p.footer.disk_type, opts.backing) {
            (VhdType::Differencing, None) => {
                let name = p
                    .header
                    .as_ref()
                    .map(|h| h.parent_name.clone())
                    .unwrap_or_default();
                return Err(bad(
                    ErrorKind::BackingRequired,
                    format!(
                        "the image is a differencing disk over {name:?}; open that parent read-only and \
                         hand it in (it is never opened implicitly)"
                    ),
                )
                .with_path(path));
            }
            (VhdType::Differencing, Some(b)) => {
                check_parent(&p, &b).map_err(|e| e.with_path(path))?;
                Some(b)
            }
            (_, Some(_)) => {
                return Err(bad(
                    ErrorKind::BackingMismatch,
                    "only differencing VHDs have a parent; open this one without a backing image",
                )
                .with_path(path))
            }
            (_, None) => None,
        };
        Ok(VhdDisk {
            file,
            path: path.to_path_buf(),
            read_only: opts.read_only,
            wstate: Mutex::new(WriteState {
                footer_pos: p.footer_pos,
            }),
            bat: RwLock::new(p.bat),
            footer: p.footer,
            header: p.header,
            parent,
            #[cfg(test)]
            journal: Mutex::new(None),
            _lock: lock,
        })
    }

    /// Starts recording every write and sync made to the file (unit tests).
    #[cfg(test)]
    pub(crate) fn start_journal(&self) {
        *self.journal.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }

    /// Takes the events recorded so far (unit tests).
    #[cfg(test)]
    pub(crate) fn take_journal(&self) -> Vec<IoEvent> {
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    #[cfg(test)]
    fn record(&self, ev: impl FnOnce() -> IoEvent) {
        if let Some(j) = self
            .journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            j.push(ev());
        }
    }

    /// Every write to the image file goes through here.
    fn pwrite(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        #[cfg(test)]
        self.record(|| IoEvent::Write(off, buf.to_vec()));
        self.file.write_all_at(buf, off)
    }

    /// Every sync of the image file goes through here.
    fn fdatasync(&self) -> std::io::Result<()> {
        #[cfg(test)]
        self.record(|| IoEvent::Sync);
        self.file.sync_data()
    }

    /// The footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The file's modification time in VHD seconds.
    fn file_mtime(&self) -> Option<u32> {
        self.file
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .map(vhd_time)
    }

    fn fail(&self, e: DiskError, offset: u64) -> DiskError {
        e.with_path(&self.path).at(offset)
    }
}

fn check_parent(p: &Parsed, b: &Arc<dyn DiskImage>) -> Result<()> {
    let op = "attach vhd parent";
    if !b.read_only() {
        return Err(err(
            ErrorKind::InvalidArgument,
            op,
            "the parent must be opened read-only (overlays share it)",
        ));
    }
    let Some(parent) = b.as_any().downcast_ref::<VhdDisk>() else {
        return Err(err(
            ErrorKind::BackingMismatch,
            op,
            format!(
                "the parent of a differencing VHD must be a VHD, not {}",
                b.format()
            ),
        ));
    };
    let Some(h) = &p.header else {
        return Err(err(
            ErrorKind::Corrupt,
            op,
            "differencing image without a dynamic header",
        ));
    };
    if h.parent_unique_id != parent.footer.unique_id {
        return Err(err(
            ErrorKind::BackingMismatch,
            op,
            format!(
                "the parent handed in ({}) has unique ID {} but this image was made over {}; hand in the right parent",
                parent.path.display(),
                hex(&parent.footer.unique_id),
                hex(&h.parent_unique_id)
            ),
        ));
    }
    // We record the parent's footer timestamp; other writers record its file mtime.
    if h.parent_timestamp != parent.footer.timestamp
        && Some(h.parent_timestamp) != parent.file_mtime()
    {
        return Err(err(
            ErrorKind::BackingMismatch,
            op,
            format!(
                "the parent's timestamp ({}) differs from the recorded one ({}): the parent changed since \
                 this image was made, so its contents can no longer be trusted",
                parent.footer.timestamp, h.parent_timestamp
            ),
        ));
    }
    Ok(())
}

/// Lower-case hex of an ID.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
