//! Microsoft VHD (Virtual Hard Disk Image Format Specification): fixed, dynamic and
//! differencing images, implemented natively.
//!
//! Crash-safe write order when a block is allocated (see `docs/disks.md`): the footer is
//! first rewritten past the new block and synced (so the last 512 bytes are always a valid
//! footer, even after a power loss), then the block's bitmap is written and synced, and
//! only then is the BAT entry pointed at the block. A crash before the BAT write leaves an unreferenced block, which
//! every reader ignores. In differencing images a sector's bitmap bit is set only after its
//! data is written.

use crate::error::{err, DiskError, ErrorKind, IoContext, Result};
use crate::raw::check_create_size;
use crate::util::{
    be16, be32, be64, check_bounds, check_writable, file_len, put16, put32, put64, read_exact,
    write_all,
};
use crate::{BaseRef, DiskImage, Format, OpenOptions};
use std::any::Any;
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

const FOOTER_COOKIE: &[u8; 8] = b"conectix";
const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
const SECTOR: u64 = 512;
const UNUSED: u32 = 0xffff_ffff;
/// Seconds from the Unix epoch to 2000-01-01T00:00:00Z, the VHD epoch.
const VHD_EPOCH: u64 = 946_684_800;
/// Our creator application tag. qemu trusts `current_size` only for a few tags or for the
/// maximal geometry, so [`geometry_for`] picks a geometry qemu reads at the intended size.
pub const CREATOR_APP: &[u8; 4] = b"rdog";
const MAX_GEOMETRY: (u16, u8, u8) = (65535, 16, 255);
/// Default block size of dynamic and differencing images.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Largest VHD the format can address (2040 GiB per the specification).
pub const MAX_VHD_SIZE: u64 = 2040 << 30;
const PLAT_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
const PLAT_W2KU: u32 = u32::from_be_bytes(*b"W2ku");

/// The type field of the footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhdType {
    /// Data followed by the footer.
    Fixed,
    /// Sparse, block allocated on first write.
    Dynamic,
    /// Sparse over a parent; unset bitmap bits read from the parent.
    Differencing,
}

/// The parsed footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Disk type.
    pub disk_type: VhdType,
    /// Offset of the dynamic header (`u64::MAX` for fixed).
    pub data_offset: u64,
    /// Seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Creator application tag.
    pub creator_app: [u8; 4],
    /// Virtual size in bytes.
    pub current_size: u64,
    /// Cylinders, heads, sectors per track.
    pub geometry: (u16, u8, u8),
    /// Unique ID.
    pub unique_id: [u8; 16],
    raw: [u8; 512],
}

/// A parent locator entry (informational only; never followed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLocator {
    /// Platform code as text (`W2ru`, `W2ku`, ...).
    pub platform: String,
    /// The decoded path.
    pub path: String,
}

/// The parsed dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    /// BAT offset.
    pub table_offset: u64,
    /// BAT entries.
    pub max_table_entries: u32,
    /// Block size in bytes.
    pub block_size: u32,
    /// Parent's unique ID (differencing).
    pub parent_unique_id: [u8; 16],
    /// Parent's timestamp (differencing).
    pub parent_timestamp: u32,
    /// Parent name as recorded.
    pub parent_name: String,
    /// Parent locators.
    pub locators: Vec<ParentLocator>,
}

fn checksum(buf: &[u8], skip: std::ops::Range<usize>) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !skip.contains(i))
        .fold(0u32, |a, (_, &b)| a.wrapping_add(u32::from(b)));
    !sum
}

fn bad(kind: ErrorKind, msg: impl Into<String>) -> DiskError {
    err(kind, "open vhd image", msg)
}

/// CHS geometry per the VHD specification's algorithm.
pub fn chs_for(size: u64) -> (u16, u8, u8) {
    let mut total = size / SECTOR;
    if total > 65535 * 16 * 255 {
        total = 65535 * 16 * 255;
    }
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// The geometry we write: the specification's CHS when it covers the size exactly (so every
/// reader agrees), otherwise the maximal geometry, for which qemu uses `current_size`.
pub fn geometry_for(size: u64) -> (u16, u8, u8) {
    let g = chs_for(size);
    if u64::from(g.0) * u64::from(g.1) * u64::from(g.2) * SECTOR == size {
        g
    } else {
        MAX_GEOMETRY
    }
}

impl Footer {
    fn parse(b: &[u8; 512]) -> Result<Self> {
        if &b[0..8] != FOOTER_COOKIE {
            return Err(bad(
                ErrorKind::WrongFormat,
                "no VHD footer cookie; the file is not a VHD",
            ));
        }
        let stored = be32(b, 64);
        if checksum(b, 64..68) != stored {
            return Err(bad(
                ErrorKind::Corrupt,
                "the VHD footer checksum does not match; the image is damaged, restore it from its source",
            ));
        }
        let disk_type = match be32(b, 60) {
            2 => VhdType::Fixed,
            3 => VhdType::Dynamic,
            4 => VhdType::Differencing,
            t => {
                return Err(bad(
                    ErrorKind::Unsupported,
                    format!("VHD disk type {t} is not supported"),
                ))
            }
        };
        let current_size = be64(b, 48);
        if current_size % SECTOR != 0 || current_size > MAX_VHD_SIZE {
            return Err(bad(
                ErrorKind::Corrupt,
                format!("VHD size {current_size} is not a multiple of 512 up to 2040 GiB"),
            ));
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&b[28..32]);
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&b[68..84]);
        Ok(Footer {
            disk_type,
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app,
            current_size,
            geometry: (be16(b, 56), b[58], b[59]),
            unique_id,
            raw: *b,
        })
    }

    fn build(
        disk_type: VhdType,
        size: u64,
        data_offset: u64,
        unique_id: [u8; 16],
        timestamp: u32,
    ) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(FOOTER_COOKIE);
        put32(&mut b, 8, 2);
        put32(&mut b, 12, 0x0001_0000);
        put64(&mut b, 16, data_offset);
        put32(&mut b, 24, timestamp);
        b[28..32].copy_from_slice(CREATOR_APP);
        put32(&mut b, 32, 0x0001_0000);
        b[36..40].copy_from_slice(b"Wi2k");
        put64(&mut b, 40, size);
        put64(&mut b, 48, size);
        let (c, h, s) = geometry_for(size);
        put16(&mut b, 56, c);
        b[58] = h;
        b[59] = s;
        put32(
            &mut b,
            60,
            match disk_type {
                VhdType::Fixed => 2,
                VhdType::Dynamic => 3,
                VhdType::Differencing => 4,
            },
        );
        b[68..84].copy_from_slice(&unique_id);
        let c = checksum(&b, 64..68);
        put32(&mut b, 64, c);
        b
    }
}

fn decode_utf16(bytes: &[u8], big_endian: bool) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| {
            if big_endian {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_le_bytes([c[0], c[1]])
            }
        })
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

fn encode_utf16(s: &str, big_endian: bool) -> Vec<u8> {
    s.encode_utf16()
        .flat_map(|u| {
            if big_endian {
                u.to_be_bytes()
            } else {
                u.to_le_bytes()
            }
        })
        .collect()
}

fn block_bitmap_bytes(block_size: u32) -> u64 {
    (u64::from(block_size) / SECTOR)
        .div_ceil(8)
        .div_ceil(SECTOR)
        * SECTOR
}

fn parse_dyn_header(f: &File, footer: &Footer, flen: u64) -> Result<DynHeader> {
    let op = "open vhd image";
    let off = footer.data_offset;
    if off % SECTOR != 0 || off.checked_add(1024).is_none_or(|e| e > flen) {
        return Err(bad(
            ErrorKind::Truncated,
            format!("the dynamic header at {off:#x} lies outside the {flen}-byte file; the file was probably cut short"),
        ));
    }
    let mut h = [0u8; 1024];
    read_exact(f, &mut h, off, op, "dynamic header")?;
    if &h[0..8] != HEADER_COOKIE {
        return Err(bad(
            ErrorKind::Corrupt,
            "the dynamic header cookie is missing; the image is damaged",
        ));
    }
    if checksum(&h, 36..40) != be32(&h, 36) {
        return Err(bad(
            ErrorKind::Corrupt,
            "the dynamic header checksum does not match; the image is damaged",
        ));
    }
    let table_offset = be64(&h, 16);
    let max_table_entries = be32(&h, 28);
    let block_size = be32(&h, 32);
    if !block_size.is_power_of_two() || !(4096..=(256 << 20)).contains(&block_size) {
        return Err(bad(
            ErrorKind::Unsupported,
            format!("block size {block_size} is not supported"),
        ));
    }
    let needed = footer.current_size.div_ceil(u64::from(block_size));
    if u64::from(max_table_entries) < needed {
        return Err(bad(
            ErrorKind::Corrupt,
            format!("the BAT has {max_table_entries} entries but the size needs {needed}"),
        ));
    }
    let bat_bytes = u64::from(max_table_entries) * 4;
    if table_offset % SECTOR != 0 || table_offset.checked_add(bat_bytes).is_none_or(|e| e > flen) {
        return Err(bad(
            ErrorKind::Truncated,
            format!("the BAT ({bat_bytes} bytes at {table_offset:#x}) lies past the end of the {flen}-byte file; the file was probably cut short"),
        ));
    }
    let mut parent_unique_id = [0u8; 16];
    parent_unique_id.copy_from_slice(&h[40..56]);
    let parent_name = decode_utf16(&h[64..576], true);
    let mut locators = Vec::new();
    if footer.disk_type == VhdType::Differencing {
        for i in 0..8 {
            let e = &h[576 + i * 24..576 + (i + 1) * 24];
            let code = be32(e, 0);
            if code == 0 {
                continue;
            }
            let space = u64::from(be32(e, 4));
            let len = u64::from(be32(e, 8));
            let loff = be64(e, 16);
            // The data-space field counts sectors per the specification, bytes in some
            // writers: accept either, as long as it covers the data.
            let space_ok = space * SECTOR >= len || space >= len;
            if !space_ok || len > 64 * 1024 || loff.checked_add(len).is_none_or(|x| x > flen) {
                tracing::warn!(
                    locator = i,
                    "ignoring a parent locator that lies outside the file"
                );
                continue;
            }
            let mut data = vec![0u8; len as usize];
            read_exact(f, &mut data, loff, op, "parent locator")?;
            let path = match code {
                PLAT_W2RU | PLAT_W2KU => decode_utf16(&data, false),
                _ => String::from_utf8_lossy(&data).into_owned(),
            };
            locators.push(ParentLocator {
                platform: String::from_utf8_lossy(&code.to_be_bytes()).into_owned(),
                path,
            });
        }
    }
    Ok(DynHeader {
        table_offset,
        max_table_entries,
        block_size,
        parent_unique_id,
        parent_timestamp: be32(&h, 56),
        parent_name,
        locators,
    })
}

/// Everything `info` shows about a VHD, read without opening a parent.
#[derive(Debug, Clone)]
pub struct VhdInfo {
    /// Footer.
    pub footer: Footer,
    /// Dynamic header (dynamic and differencing).
    pub header: Option<DynHeader>,
    /// Allocated blocks.
    pub allocated_blocks: u64,
    /// Length of the file.
    pub file_len: u64,
}

struct Parsed {
    footer: Footer,
    header: Option<DynHeader>,
    bat: Vec<u32>,
    /// Offset of the footer at the end of the file (= where the next block goes).
    footer_pos: u64,
}

fn parse(f: &File) -> Result<Parsed> {
    let op = "open vhd image";
    let flen = file_len(f, op)?;
    let mut fb = [0u8; 512];
    if flen < SECTOR {
        let mut head = [0u8; 8];
        let n = f.read_at(&mut head, 0).ctx(op)?;
        if n == 8 && &head == FOOTER_COOKIE {
            return Err(bad(
                ErrorKind::Truncated,
                "the file ends inside the VHD footer; it was cut short, copy it again",
            ));
        }
        return Err(bad(
            ErrorKind::WrongFormat,
            format!("the {flen}-byte file is too short to be a VHD"),
        ));
    }
    let footer_pos = (flen / SECTOR - 1) * SECTOR;
    read_exact(f, &mut fb, footer_pos, op, "footer")?;
    // Some writers leave a 511-byte footer; accept only the standard one.
    let footer = match Footer::parse(&fb) {
        Ok(ft) => ft,
        Err(e) if e.kind() == ErrorKind::WrongFormat => {
            // Is there a valid copy at the start? Then the end of the file is missing.
            read_exact(f, &mut fb, 0, op, "footer copy")?;
            if Footer::parse(&fb).is_ok() {
                return Err(bad(
                    ErrorKind::Truncated,
                    "the footer at the end of the file is missing but its copy at the start is intact: \
                     the file was cut short (or a block write was interrupted); copy it again from its source",
                ));
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if footer.disk_type == VhdType::Fixed {
        if footer_pos < footer.current_size {
            return Err(bad(
                ErrorKind::Truncated,
                format!(
                    "the fixed VHD holds {footer_pos} bytes of data but its footer says {}; the file was cut short",
                    footer.current_size
                ),
            ));
        }
        let footer_pos = footer.current_size;
        return Ok(Parsed {
            footer,
            header: None,
            bat: Vec::new(),
            footer_pos,
        });
    }
    let header = parse_dyn_header(f, &footer, flen)?;
    // Only the entries the size needs are read (and used); the rest must not matter.
    let entries = footer.current_size.div_ceil(u64::from(header.block_size)) as usize;
    let mut raw = vec![0u8; entries * 4];
    read_exact(f, &mut raw, header.table_offset, op, "BAT")?;
    let bat: Vec<u32> = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
    // Every block must lie inside the file's data area, clear of the metadata and of
    // every other block.
    let block_total = block_bitmap_bytes(header.block_size) + u64::from(header.block_size);
    let mut regions: Vec<(u64, u64, String)> = vec![
        (0, SECTOR, "footer copy".into()),
        (
            footer.data_offset,
            footer.data_offset + 1024,
            "dynamic header".into(),
        ),
        (
            header.table_offset,
            header.table_offset + entries as u64 * 4,
            "BAT".into(),
        ),
    ];
    for (i, &e) in bat.iter().enumerate() {
        if e == UNUSED {
            continue;
        }
        let start = u64::from(e) * SECTOR;
        if start + block_total > footer_pos {
            return Err(bad(
                ErrorKind::Truncated,
                format!("block {i} at {start:#x} runs past the end of the data; the file was cut short, copy it again"),
            ));
        }
        regions.push((start, start + block_total, format!("block {i}")));
    }
    regions.sort_unstable_by_key(|r| r.0);
    if let Some(w) = regions.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(bad(
            ErrorKind::Corrupt,
            format!(
                "the {} overlaps the {}; the image is damaged",
                w[1].2, w[0].2
            ),
        ));
    }
    Ok(Parsed {
        footer,
        header: Some(header),
        bat,
        footer_pos,
    })
}

/// Reads the footer and header of a VHD for display, without a parent.
pub fn info(path: &Path) -> Result<VhdInfo> {
    let f = File::open(path).ctx_path("open vhd image", path)?;
    let p = parse(&f).map_err(|e| e.with_path(path))?;
    Ok(VhdInfo {
        allocated_blocks: p.bat.iter().filter(|&&e| e != UNUSED).count() as u64,
        footer: p.footer,
        header: p.header,
        file_len: file_len(&f, "open vhd image")?,
    })
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

fn vhd_time(t: SystemTime) -> u32 {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}

impl VhdDisk {
    /// Opens a VHD. A differencing image needs its parent (opened read-only) in
    /// `opts.backing`; the parent's unique ID and timestamp must match what the image records.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Self> {
        let op = "open vhd image";
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

    fn block_size(&self) -> u64 {
        self.header.as_ref().map_or(0, |h| u64::from(h.block_size))
    }

    fn bitmap_bytes(&self) -> u64 {
        self.header
            .as_ref()
            .map_or(0, |h| block_bitmap_bytes(h.block_size))
    }

    fn bat_entry(&self, block: u64) -> u32 {
        self.bat
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(block as usize)
            .copied()
            .unwrap_or(UNUSED)
    }

    fn read_bitmap(&self, block_start: u64) -> Result<Vec<u8>> {
        let mut bm = vec![0u8; self.bitmap_bytes() as usize];
        self.file
            .read_exact_at(&mut bm, block_start)
            .map_err(|e| DiskError::io("read vhd block bitmap", e).at(block_start))?;
        Ok(bm)
    }

    fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.parent {
            None => {
                buf.fill(0);
                Ok(())
            }
            Some(p) => {
                let psize = p.size();
                let end = offset + buf.len() as u64;
                if offset >= psize {
                    buf.fill(0);
                    return Ok(());
                }
                let inside = (psize.min(end) - offset) as usize;
                let (a, b) = buf.split_at_mut(inside);
                p.read_at(a, offset)?;
                b.fill(0);
                Ok(())
            }
        }
    }

    /// Reads within one block.
    fn read_in_block(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let bs = self.block_size();
        let block = offset / bs;
        let entry = self.bat_entry(block);
        if entry == UNUSED {
            return if self.footer.disk_type == VhdType::Differencing {
                self.read_parent(buf, offset)
            } else {
                buf.fill(0);
                Ok(())
            };
        }
        let start = u64::from(entry) * SECTOR;
        let data = start + self.bitmap_bytes();
        let bm = self.read_bitmap(start)?;
        let in_block = offset % bs;
        let mut pos = 0usize;
        while pos < buf.len() {
            let o = in_block + pos as u64;
            let sec = o / SECTOR;
            let present = bm
                .get((sec / 8) as usize)
                .is_some_and(|b| b & (0x80 >> (sec % 8)) != 0);
            // Extend the run while sectors have the same state.
            let mut end = ((sec + 1) * SECTOR - in_block) as usize;
            while end < buf.len() {
                let s2 = (in_block + end as u64) / SECTOR;
                let p2 = bm
                    .get((s2 / 8) as usize)
                    .is_some_and(|b| b & (0x80 >> (s2 % 8)) != 0);
                if p2 != present {
                    break;
                }
                end += SECTOR as usize;
            }
            let end = end.min(buf.len());
            let part = &mut buf[pos..end];
            if present {
                self.file
                    .read_exact_at(part, data + o)
                    .map_err(|e| DiskError::io("read", e).at(data + o))?;
            } else if self.footer.disk_type == VhdType::Differencing {
                self.read_parent(part, block * bs + o)?;
            } else {
                part.fill(0);
            }
            pos = end;
        }
        Ok(())
    }

    /// Allocates `block` (under the write lock) and returns its start offset.
    fn allocate_block(&self, ws: &mut WriteState, block: u64) -> Result<u64> {
        let op = "allocate vhd block";
        let bs = self.block_size();
        let bmb = self.bitmap_bytes();
        let start = ws.footer_pos;
        let sector = start / SECTOR;
        let entry = u32::try_from(sector)
            .ok()
            .filter(|&s| s != UNUSED)
            .ok_or_else(|| {
                err(
                    ErrorKind::TooLarge,
                    op,
                    "the VHD file would grow past what its BAT can address",
                )
            })?;
        let new_footer_pos = start + bmb + bs;
        // 1. Footer past the new block: the file's last sector stays a valid footer. It must be
        //    durable before the bitmap overwrites the old footer: after a power loss the
        //    bitmap alone could otherwise be the file's last sector (no footer at all).
        self.pwrite(&self.footer.raw, new_footer_pos)
            .map_err(|e| DiskError::io(op, e).at(new_footer_pos))?;
        self.fdatasync().ctx(op)?;
        // 2. Bitmap: all set for dynamic disks (the block's zeros are its data), all clear for
        //    differencing disks (sectors come from the parent until written). The data area
        //    stays a sparse hole that reads as zeros.
        let fill = if self.footer.disk_type == VhdType::Differencing {
            0
        } else {
            0xff
        };
        let mut bm = vec![0u8; bmb as usize];
        let sectors = bs / SECTOR;
        for s in 0..sectors {
            if fill == 0xff {
                bm[(s / 8) as usize] |= 0x80 >> (s % 8);
            }
        }
        self.pwrite(&bm, start)
            .map_err(|e| DiskError::io(op, e).at(start))?;
        // (The bitmap, at least one sector, overwrites the old footer at `start`.)
        self.fdatasync().ctx(op)?;
        // 3. Commit: the BAT entry.
        let hdr = self
            .header
            .as_ref()
            .ok_or_else(|| err(ErrorKind::Corrupt, op, "no dynamic header"))?;
        let mut e = [0u8; 4];
        put32(&mut e, 0, entry);
        let at = hdr.table_offset + block * 4;
        self.pwrite(&e, at)
            .map_err(|e| DiskError::io(op, e).at(at))?;
        if let Some(slot) = self
            .bat
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(block as usize)
        {
            *slot = entry;
        }
        ws.footer_pos = new_footer_pos;
        Ok(start)
    }

    /// Writes within one block, sector-aligned (`offset` and `buf.len()` multiples of 512).
    fn write_sectors_in_block(&self, ws: &mut WriteState, buf: &[u8], offset: u64) -> Result<()> {
        let bs = self.block_size();
        let block = offset / bs;
        let entry = self.bat_entry(block);
        let start = if entry == UNUSED {
            self.allocate_block(ws, block)?
        } else {
            u64::from(entry) * SECTOR
        };
        let data = start + self.bitmap_bytes();
        let in_block = offset % bs;
        self.pwrite(buf, data + in_block)
            .map_err(|e| DiskError::io("write", e).at(offset))?;
        if self.footer.disk_type == VhdType::Differencing {
            let mut bm = self.read_bitmap(start)?;
            let first = in_block / SECTOR;
            let n = buf.len() as u64 / SECTOR;
            let mut changed = false;
            for s in first..first + n {
                if let Some(b) = bm.get_mut((s / 8) as usize) {
                    let bit = 0x80 >> (s % 8);
                    if *b & bit == 0 {
                        *b |= bit;
                        changed = true;
                    }
                }
            }
            if changed {
                // Data before the bit: a crash in between leaves the parent's data visible.
                let lo = (first / 8) as usize;
                let hi = (((first + n - 1) / 8) as usize + 1).min(bm.len());
                let at = start + lo as u64;
                self.pwrite(&bm[lo..hi], at)
                    .map_err(|e| DiskError::io("write vhd block bitmap", e).at(at))?;
            }
        }
        Ok(())
    }

    fn write_locked(&self, ws: &mut WriteState, buf: &[u8], offset: u64) -> Result<()> {
        if self.footer.disk_type == VhdType::Fixed {
            return self
                .pwrite(buf, offset)
                .map_err(|e| DiskError::io("write", e).at(offset));
        }
        let bs = self.block_size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let o = offset + pos as u64;
            let sec_start = o / SECTOR * SECTOR;
            let head = (o - sec_start) as usize;
            if head != 0 || buf.len() - pos < SECTOR as usize {
                // Partial sector: read-modify-write the whole sector.
                let mut sec = [0u8; SECTOR as usize];
                self.read_in_block(&mut sec, sec_start)?;
                let n = (SECTOR as usize - head).min(buf.len() - pos);
                sec[head..head + n].copy_from_slice(&buf[pos..pos + n]);
                self.write_sectors_in_block(ws, &sec, sec_start)?;
                pos += n;
                continue;
            }
            let block_end = (o / bs + 1) * bs;
            let full = ((buf.len() - pos) as u64 / SECTOR * SECTOR).min(block_end - o) as usize;
            self.write_sectors_in_block(ws, &buf[pos..pos + full], o)?;
            pos += full;
        }
        Ok(())
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

impl DiskImage for VhdDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let op = "read";
        let size = self.footer.current_size;
        check_bounds(offset, buf.len() as u64, size, op).map_err(|e| self.fail(e, offset))?;
        if self.footer.disk_type == VhdType::Fixed {
            return self
                .file
                .read_exact_at(buf, offset)
                .map_err(|e| self.fail(DiskError::io(op, e), offset));
        }
        let bs = self.block_size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let o = offset + pos as u64;
            let n = ((bs - o % bs) as usize).min(buf.len() - pos);
            self.read_in_block(&mut buf[pos..pos + n], o)
                .map_err(|e| self.fail(e, o))?;
            pos += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let op = "write";
        check_writable(self.read_only, op).map_err(|e| self.fail(e, offset))?;
        check_bounds(offset, buf.len() as u64, self.footer.current_size, op)
            .map_err(|e| self.fail(e, offset))?;
        let mut ws = self.wstate.lock().unwrap_or_else(|e| e.into_inner());
        self.write_locked(&mut ws, buf, offset)
            .map_err(|e| self.fail(e, offset))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.fdatasync().ctx_path("flush", &self.path)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // VHD cannot give space back; the promise is "reads as zeros".
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let op = "write zeroes";
        check_writable(self.read_only, op).map_err(|e| self.fail(e, offset))?;
        check_bounds(offset, len, self.footer.current_size, op)
            .map_err(|e| self.fail(e, offset))?;
        let mut ws = self.wstate.lock().unwrap_or_else(|e| e.into_inner());
        let bs = if self.footer.disk_type == VhdType::Fixed {
            1 << 20
        } else {
            self.block_size()
        };
        let parent_size = self.parent.as_ref().map_or(0, |p| p.size());
        // At most 1 MiB of zeros at a time, whatever the block size (up to 256 MiB).
        let zeros = vec![0u8; bs.min(1 << 20) as usize];
        let mut o = offset;
        let end = offset + len;
        while o < end {
            let n = (bs - o % bs).min(end - o);
            let unallocated =
                self.footer.disk_type != VhdType::Fixed && self.bat_entry(o / bs) == UNUSED;
            // An unallocated block already reads as zeros unless a parent shows through.
            let skip =
                unallocated && (self.footer.disk_type == VhdType::Dynamic || o >= parent_size);
            if !skip {
                let mut p = o;
                while p < o + n {
                    let m = (o + n - p).min(zeros.len() as u64);
                    self.write_locked(&mut ws, &zeros[..m as usize], p)
                        .map_err(|e| self.fail(e, p))?;
                    p += m;
                }
            }
            o += n;
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.footer.current_size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn format(&self) -> Format {
        Format::Vhd
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn new_unique_id() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .ctx("create vhd image")?;
    // RFC 4122 version 4 layout.
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(id)
}

fn check_vhd_size(size: u64, op: &'static str) -> Result<()> {
    check_create_size(size, op)?;
    if size > MAX_VHD_SIZE {
        return Err(err(
            ErrorKind::InvalidArgument,
            op,
            format!("a VHD holds at most {MAX_VHD_SIZE} bytes"),
        ));
    }
    Ok(())
}

fn create_file(path: &Path, op: &'static str) -> Result<File> {
    FsOpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .ctx_path(op, path)
}

/// Creates a fixed VHD (sparse data, then the footer).
pub fn create_fixed(path: &Path, size: u64) -> Result<()> {
    let op = "create vhd image";
    check_vhd_size(size, op).map_err(|e| e.with_path(path))?;
    let f = create_file(path, op)?;
    let footer = Footer::build(
        VhdType::Fixed,
        size,
        u64::MAX,
        new_unique_id()?,
        vhd_time(SystemTime::now()),
    );
    let r = (|| {
        f.set_len(size).ctx(op)?;
        write_all(&f, &footer, size, op)?;
        f.sync_all().ctx(op)
    })();
    finish_create(path, r)
}

fn finish_create(path: &Path, r: Result<()>) -> Result<()> {
    if let Err(e) = r {
        let _ = std::fs::remove_file(path);
        return Err(e.with_path(path));
    }
    Ok(())
}

struct DynLayout {
    block_size: u32,
    parent: Option<([u8; 16], u32, String)>,
}

fn write_dynamic(f: &File, ty: VhdType, size: u64, l: &DynLayout) -> Result<()> {
    let op = "create vhd image";
    let bs = u64::from(l.block_size);
    let entries = size.div_ceil(bs);
    let bat_off = 1536u64;
    let bat_bytes = (entries * 4).div_ceil(SECTOR) * SECTOR;
    let mut pos = bat_off + bat_bytes;
    let mut h = [0u8; 1024];
    h[0..8].copy_from_slice(HEADER_COOKIE);
    put64(&mut h, 8, u64::MAX);
    put64(&mut h, 16, bat_off);
    put32(&mut h, 24, 0x0001_0000);
    put32(&mut h, 28, entries as u32);
    put32(&mut h, 32, l.block_size);
    let mut locator_data: Vec<(u64, Vec<u8>)> = Vec::new();
    if let Some((id, ts, name)) = &l.parent {
        h[40..56].copy_from_slice(id);
        put32(&mut h, 56, *ts);
        let uname = encode_utf16(name, true);
        let n = uname.len().min(512);
        h[64..64 + n].copy_from_slice(&uname[..n]);
        // One locator: relative names as W2ru (".\\name"), absolute ones as W2ku.
        let absolute = name.starts_with('/') || name.contains(":\\");
        let (code, text) = if absolute {
            (PLAT_W2KU, name.clone())
        } else {
            (PLAT_W2RU, format!(".\\{}", name.replace('/', "\\")))
        };
        let data = encode_utf16(&text, false);
        let space_sectors = (data.len() as u64).div_ceil(SECTOR).max(1);
        let e = &mut h[576..600];
        put32(e, 0, code);
        put32(e, 4, space_sectors as u32);
        put32(e, 8, data.len() as u32);
        put64(e, 16, pos);
        locator_data.push((pos, data));
        pos += space_sectors * SECTOR;
    }
    let c = checksum(&h, 36..40);
    put32(&mut h, 36, c);
    let footer = Footer::build(ty, size, 512, new_unique_id()?, vhd_time(SystemTime::now()));
    write_all(f, &footer, 0, op)?;
    write_all(f, &h, 512, op)?;
    write_all(f, &vec![0xffu8; bat_bytes as usize], bat_off, op)?;
    for (off, data) in &locator_data {
        write_all(f, data, *off, op)?;
    }
    write_all(f, &footer, pos, op)?;
    f.sync_all().ctx(op)
}

/// Creates a dynamic VHD.
pub fn create_dynamic(path: &Path, size: u64, block_size: Option<u32>) -> Result<()> {
    let op = "create vhd image";
    check_vhd_size(size, op).map_err(|e| e.with_path(path))?;
    let bs = block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    if !bs.is_power_of_two() || !(4096..=(256 << 20)).contains(&bs) {
        return Err(err(
            ErrorKind::InvalidArgument,
            op,
            "block size must be a power of two from 4 KiB to 256 MiB",
        )
        .with_path(path));
    }
    let f = create_file(path, op)?;
    let r = write_dynamic(
        &f,
        VhdType::Dynamic,
        size,
        &DynLayout {
            block_size: bs,
            parent: None,
        },
    );
    finish_create(path, r)
}

/// Creates a differencing VHD over `base` (a VHD opened read-only), recording the base's
/// unique ID and footer timestamp.
pub fn create_differencing(path: &Path, base: &BaseRef, size: u64) -> Result<()> {
    let op = "create differencing vhd image";
    check_vhd_size(size, op).map_err(|e| e.with_path(path))?;
    let Some(parent) = base.image.as_any().downcast_ref::<VhdDisk>() else {
        return Err(err(
            ErrorKind::Unsupported,
            op,
            format!(
                "a differencing VHD needs a VHD parent, not {}; convert the base to vhd first",
                base.image.format()
            ),
        )
        .with_path(path));
    };
    if !parent.read_only {
        return Err(
            err(ErrorKind::InvalidArgument, op, "open the parent read-only").with_path(path),
        );
    }
    if base.name.is_empty() || base.name.encode_utf16().count() > 255 {
        return Err(err(
            ErrorKind::InvalidArgument,
            op,
            "the parent name must be 1 to 255 characters",
        )
        .with_path(path));
    }
    let f = create_file(path, op)?;
    let layout = DynLayout {
        block_size: DEFAULT_BLOCK_SIZE,
        parent: Some((
            parent.footer.unique_id,
            parent.footer.timestamp,
            base.name.clone(),
        )),
    };
    let r = write_dynamic(&f, VhdType::Differencing, size, &layout);
    finish_create(path, r)
}

#[cfg(test)]
#[path = "msvhd_power_loss.rs"]
mod power_loss_tests;
