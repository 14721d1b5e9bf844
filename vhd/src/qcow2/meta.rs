//! Our own reading of qcow2 metadata: header validation (before imago sees the file),
//! `info`/`check`, and the crash-safe L2 table preallocation described in
//! `docs/disks.md`.

use crate::error::{err, ErrorKind, IoContext, Result};
use crate::util::{be32, be64, file_len, put64, read_exact, write_all};
use crate::MAX_DISK_SIZE;
use std::collections::HashSet;
use std::fs::File;

pub(crate) const MAGIC: &[u8; 4] = b"QFI\xfb";
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1_COPIED: u64 = 1 << 63;
/// Largest L1 table we accept, in entries (the limit QEMU and imago use).
const MAX_L1_ENTRIES: u64 = 4 * 1024 * 1024;
/// Largest refcount table we accept, in bytes.
const MAX_REFTABLE_BYTES: u64 = 8 << 20;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bits we know.
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;

/// The parsed and validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// Backing file name as recorded (never followed by this crate).
    pub backing_file: Option<String>,
    /// Backing format as recorded.
    pub backing_format: Option<String>,
    /// L1 entries.
    pub l1_size: u32,
    /// L1 table offset.
    pub l1_offset: u64,
    /// Refcount table offset.
    pub reftable_offset: u64,
    /// Refcount table length in clusters.
    pub reftable_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Compression type (v3 header byte 104; 0 = zlib, 1 = zstd).
    pub compression_type: u8,
    /// Length of the image file.
    pub file_len: u64,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// Guest bytes one L2 table covers.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() * (self.cluster_size() / 8)
    }
    /// L1 entries the virtual size needs.
    pub fn l1_needed(&self) -> u64 {
        self.size.div_ceil(self.l2_coverage())
    }
    fn refblock_entries(&self) -> u64 {
        self.cluster_size() * 8 / u64::from(self.refcount_bits())
    }
    fn reftable_entries(&self) -> u64 {
        u64::from(self.reftable_clusters) * self.cluster_size() / 8
    }
}

fn corrupt(msg: String) -> crate::DiskError {
    err(
        ErrorKind::Corrupt,
        "read qcow2 header",
        format!("{msg}; run `qemu-img check` on it, or restore it from its source"),
    )
}

/// Reads and validates the header. Every table the header names must lie inside the file.
pub fn read_header(f: &File) -> Result<Header> {
    let op = "read qcow2 header";
    let file_len = file_len(f, op)?;
    let mut magic = [0u8; 4];
    if file_len < 4 {
        return Err(err(
            ErrorKind::WrongFormat,
            op,
            format!("the file is only {file_len} bytes, too short to be qcow2; check the format"),
        ));
    }
    read_exact(f, &mut magic, 0, op, "qcow2 magic")?;
    if &magic != MAGIC {
        return Err(err(
            ErrorKind::WrongFormat,
            op,
            "no qcow2 magic at offset 0; the file is in another format (try `reddog image info`)",
        ));
    }
    let mut h = [0u8; 104];
    let hlen = if file_len >= 104 { 104 } else { 72 };
    read_exact(f, &mut h[..hlen], 0, op, "qcow2 header")?;
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Err(err(
            ErrorKind::Unsupported,
            op,
            format!("qcow2 version {version} is not supported (only 2 and 3)"),
        ));
    }
    let cluster_bits = be32(&h, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt(format!(
            "cluster_bits {cluster_bits} is outside 9..=21"
        )));
    }
    let cs = 1u64 << cluster_bits;
    if file_len < 72 {
        return Err(err(
            ErrorKind::Truncated,
            op,
            "the file ends inside the qcow2 header",
        ));
    }
    let (incompatible, compatible, refcount_order, header_length) = if version == 3 {
        if hlen < 104 {
            return Err(err(
                ErrorKind::Truncated,
                op,
                "the file ends inside the qcow2 v3 header",
            ));
        }
        (be64(&h, 72), be64(&h, 80), be32(&h, 96), be32(&h, 100))
    } else {
        (0, 0, 4, 72)
    };
    if version == 3 && (header_length < 104 || u64::from(header_length) > cs) {
        return Err(corrupt(format!("header length {header_length} is invalid")));
    }
    if refcount_order > 6 {
        return Err(corrupt(format!(
            "refcount order {refcount_order} is above 6"
        )));
    }
    let known = INCOMPAT_DIRTY
        | INCOMPAT_CORRUPT
        | INCOMPAT_DATA_FILE
        | INCOMPAT_COMPRESSION
        | INCOMPAT_EXTL2;
    if incompatible & !known != 0 {
        return Err(err(
            ErrorKind::Unsupported,
            op,
            format!(
                "unknown incompatible features {:#x}; convert the image with a newer qemu-img",
                incompatible & !known
            ),
        ));
    }
    let size = be64(&h, 24);
    if size > MAX_DISK_SIZE {
        return Err(err(
            ErrorKind::TooLarge,
            op,
            format!("virtual size {size} is above the supported {MAX_DISK_SIZE} bytes"),
        ));
    }
    if be32(&h, 32) != 0 {
        return Err(err(
            ErrorKind::Unsupported,
            op,
            "encrypted qcow2 images are not supported",
        ));
    }
    let l1_size = be32(&h, 36);
    let l1_offset = be64(&h, 40);
    let reftable_offset = be64(&h, 48);
    let reftable_clusters = be32(&h, 56);
    let nb_snapshots = be32(&h, 60);
    let hdr = Header {
        version,
        cluster_bits,
        size,
        backing_file: None,
        backing_format: None,
        l1_size,
        l1_offset,
        reftable_offset,
        reftable_clusters,
        nb_snapshots,
        incompatible,
        compatible,
        refcount_order,
        compression_type: 0,
        file_len,
    };
    if u64::from(l1_size) > MAX_L1_ENTRIES {
        return Err(err(
            ErrorKind::TooLarge,
            op,
            format!("L1 table of {l1_size} entries is too large"),
        ));
    }
    if u64::from(l1_size) < hdr.l1_needed() {
        return Err(corrupt(format!(
            "L1 table has {l1_size} entries but the virtual size needs {}",
            hdr.l1_needed()
        )));
    }
    check_table(l1_offset, u64::from(l1_size) * 8, cs, file_len, "L1 table")?;
    let rt_bytes = u64::from(reftable_clusters) * cs;
    if reftable_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
        return Err(corrupt(format!(
            "refcount table of {reftable_clusters} clusters is invalid"
        )));
    }
    check_table(reftable_offset, rt_bytes, cs, file_len, "refcount table")?;

    let mut hdr = hdr;
    if version == 3 && header_length > 104 {
        let mut ct = [0u8; 1];
        read_exact(f, &mut ct, 104, op, "compression type")?;
        hdr.compression_type = ct[0];
    }
    // Backing file name.
    let bf_off = be64(&h, 8);
    let bf_len = be32(&h, 16);
    if bf_off != 0 && bf_len != 0 {
        if bf_len > 1023 || bf_off.checked_add(u64::from(bf_len)).is_none_or(|e| e > cs) {
            return Err(corrupt(format!(
                "backing file name ({bf_len} bytes at {bf_off}) is invalid"
            )));
        }
        let mut name = vec![0u8; bf_len as usize];
        read_exact(f, &mut name, bf_off, op, "backing file name")?;
        hdr.backing_file = Some(String::from_utf8_lossy(&name).into_owned());
    }
    // Header extensions: between the header and the end of cluster 0.
    let ext_start = u64::from(if version == 3 { header_length } else { 72 });
    let ext_end = cs.min(file_len).min(if bf_off != 0 {
        bf_off.max(ext_start)
    } else {
        cs
    });
    if ext_end > ext_start {
        let mut ext = vec![0u8; (ext_end - ext_start) as usize];
        read_exact(f, &mut ext, ext_start, op, "header extensions")?;
        let mut pos = 0usize;
        while pos + 8 <= ext.len() {
            let ty = be32(&ext, pos);
            let len = be32(&ext, pos + 4) as usize;
            if ty == EXT_END {
                break;
            }
            let data = ext.get(pos + 8..pos + 8 + len).ok_or_else(|| {
                corrupt(format!(
                    "header extension {ty:#x} of {len} bytes runs past cluster 0"
                ))
            })?;
            match ty {
                EXT_BACKING_FORMAT => {
                    hdr.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_DATA_FILE => {}
                _ => {}
            }
            pos += 8 + len.div_ceil(8) * 8;
        }
    }
    Ok(hdr)
}

fn check_table(offset: u64, len: u64, cs: u64, file_len: u64, what: &str) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    if offset % cs != 0 || offset == 0 {
        return Err(corrupt(format!(
            "{what} offset {offset:#x} is not cluster aligned"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(err(
            ErrorKind::Truncated,
            "read qcow2 header",
            format!(
                "the {what} ({len} bytes at {offset:#x}) lies past the end of the {file_len}-byte \
                 file; the file was probably cut short while copying: copy it again"
            ),
        )),
    }
}

/// How to turn an image this crate cannot open into one it can.
const CONVERT_HINT: &str = "make a usable copy with `qemu-img convert -O qcow2 -o \
     extended_l2=off,compression_type=zlib IN OUT`";

/// Refuses, at any open, valid images using features imago 0.2.6 cannot read: extended L2
/// entries, a compression type other than zlib, and the dirty bit (imago refuses every
/// incompatible feature bit but the external data file at load, even read-only).
pub(crate) fn check_supported_features(h: &Header) -> Result<()> {
    let op = "open qcow2 image";
    if h.incompatible & INCOMPAT_EXTL2 != 0 {
        return Err(err(
            ErrorKind::Unsupported,
            op,
            format!("images with extended L2 entries (extended_l2=on) are not supported; {CONVERT_HINT}"),
        ));
    }
    if h.incompatible & INCOMPAT_COMPRESSION != 0 {
        return Err(err(
            ErrorKind::Unsupported,
            op,
            format!(
                "images with {} compression are not supported (only zlib); {CONVERT_HINT}",
                match h.compression_type {
                    1 => "zstd".to_string(),
                    t => format!("type {t}"),
                }
            ),
        ));
    }
    if h.incompatible & INCOMPAT_DIRTY != 0 {
        return Err(err(
            ErrorKind::Unsupported,
            op,
            "the image is marked dirty (a writer with lazy refcounts stopped without closing \
             it; its data is intact but its refcounts may be stale) and cannot be opened, not \
             even read-only; repair it with `qemu-img check -r all IMAGE`, then open it again",
        ));
    }
    Ok(())
}

/// Refuses images whose metadata we must not write to (dirty ones are refused at any open,
/// by [`check_supported_features`]).
pub(crate) fn check_writable_features(h: &Header) -> Result<()> {
    let op = "open qcow2 image for writing";
    if h.incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(err(
            ErrorKind::Corrupt,
            op,
            "the image is marked corrupt; run `qemu-img check -r all` on it first",
        ));
    }
    if h.nb_snapshots != 0 {
        return Err(err(
            ErrorKind::Unsupported,
            op,
            "the image has internal snapshots; delete them (`qemu-img snapshot -d`) or open it read-only",
        ));
    }
    Ok(())
}

fn read_table(f: &File, offset: u64, entries: u64, what: &str) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; (entries * 8) as usize];
    read_exact(f, &mut buf, offset, "read qcow2 table", what)?;
    Ok(buf.chunks_exact(8).map(|c| be64(c, 0)).collect())
}

pub(crate) fn get_refcount(block: &[u8], index: u64, bits: u32) -> u64 {
    let bits = u64::from(bits);
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let start = index as usize * bytes;
        block
            .get(start..start + bytes)
            .map(|s| s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
            .unwrap_or(0)
    } else {
        let bit = index * bits;
        let byte = block.get((bit / 8) as usize).copied().unwrap_or(0);
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

fn set_refcount(block: &mut [u8], index: u64, bits: u32, value: u64) {
    let bits = u64::from(bits);
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let start = index as usize * bytes;
        if let Some(s) = block.get_mut(start..start + bytes) {
            for (i, b) in s.iter_mut().enumerate() {
                *b = (value >> (8 * (bytes - 1 - i))) as u8;
            }
        }
    } else {
        let bit = index * bits;
        if let Some(b) = block.get_mut((bit / 8) as usize) {
            let mask = (((1u64 << bits) - 1) << (bit % 8)) as u8;
            *b = (*b & !mask) | (((value << (bit % 8)) as u8) & mask);
        }
    }
}

/// Before a writable open: every metadata cluster (header, L1 table, refcount table and
/// blocks, L2 tables) must have a refcount block and a nonzero refcount. An image that
/// breaks this is corrupt (`qemu-img check` reports it), and imago's allocator would hand
/// such clusters out again, or recurse without bound looking for a place for a refcount
/// block (found by fuzzing).
pub(crate) fn check_metadata_refcounts(f: &File, h: &Header) -> Result<()> {
    let op = "prepare qcow2 image for writing";
    let cs = h.cluster_size();
    let mut clusters: Vec<u64> = vec![0];
    let l1_entries = u64::from(h.l1_size);
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    clusters.extend((0..l1_clusters).map(|c| h.l1_offset / cs + c));
    clusters.extend((0..u64::from(h.reftable_clusters)).map(|c| h.reftable_offset / cs + c));
    let reftable = read_table(f, h.reftable_offset, h.reftable_entries(), "refcount table")?;
    clusters.extend(
        reftable
            .iter()
            .map(|&e| (e & !(cs - 1)) / cs)
            .filter(|&c| c != 0),
    );
    let l1 = read_table(f, h.l1_offset, l1_entries, "L1 table")?;
    clusters.extend(
        l1.iter()
            .map(|&e| (e & OFFSET_MASK) / cs)
            .filter(|&c| c != 0),
    );
    clusters.sort_unstable();
    clusters.dedup();
    let rb_entries = h.refblock_entries();
    let bits = h.refcount_bits();
    let mut block = vec![0u8; cs as usize];
    let mut loaded: Option<u64> = None;
    for c in clusters {
        let ri = c / rb_entries;
        let rb = reftable.get(ri as usize).map_or(0, |&e| e & !(cs - 1));
        let ok = rb != 0 && rb.checked_add(cs).is_some_and(|e| e <= h.file_len) && {
            if loaded != Some(ri) {
                read_exact(f, &mut block, rb, op, "refcount block")?;
                loaded = Some(ri);
            }
            get_refcount(&block, c % rb_entries, bits) != 0
        };
        if !ok {
            return Err(err(
                ErrorKind::Corrupt,
                op,
                format!(
                    "metadata cluster {c} (at {:#x}) has no refcount; the image is corrupt: run                      `qemu-img check -r all` on it, or open it read-only",
                    c * cs
                ),
            ));
        }
    }
    Ok(())
}

/// Makes sure every L2 table the virtual size needs exists, allocating the missing ones in
/// crash-safe order (refcounts durable before any pointer to them).
///
/// imago allocates an L2 table by writing its L1 pointer immediately while the refcount
/// covering it stays in a cache until the next flush; a crash in between leaves an image
/// that `qemu-img check` calls corrupt. With every L2 table present, imago never allocates
/// one, so that window is closed. The new tables are sparse (never written), so this costs
/// a few KiB of metadata whatever the size of a base image.
///
/// Returns how many L2 tables were added.
pub(crate) fn preallocate_l2_tables(f: &File, h: &Header) -> Result<u64> {
    let op = "prepare qcow2 image for writing";
    let cs = h.cluster_size();
    let needed = h.l1_needed();
    let l1 = read_table(f, h.l1_offset, needed, "L1 table")?;
    let mut missing = Vec::new();
    for (i, &e) in l1.iter().enumerate() {
        if e & OFFSET_MASK == 0 {
            missing.push(i as u64);
        } else if e & L1_COPIED == 0 {
            return Err(err(
                ErrorKind::Unsupported,
                op,
                format!(
                    "L1 entry {i} points to a shared L2 table (COPIED flag clear); run \
                     `qemu-img check -r all` or open the image read-only"
                ),
            ));
        }
    }
    if missing.is_empty() {
        return Ok(0);
    }

    let rt_entries = h.reftable_entries();
    let mut reftable = read_table(f, h.reftable_offset, rt_entries, "refcount table")?;
    let rb_entries = h.refblock_entries();
    let bits = h.refcount_bits();

    // First cluster past every allocation and past the end of the file.
    let mut end_cluster = h.file_len.div_ceil(cs);
    let mut seen = HashSet::new();
    let mut block = vec![0u8; cs as usize];
    for (ri, &e) in reftable.iter().enumerate() {
        let off = e & !(cs - 1);
        if off == 0 {
            continue;
        }
        if off % cs != 0 || off.checked_add(cs).is_none_or(|x| x > h.file_len) || !seen.insert(off)
        {
            return Err(corrupt(format!(
                "refcount block {ri} at {off:#x} is invalid"
            )));
        }
        read_exact(f, &mut block, off, op, "refcount block")?;
        if let Some(last) = (0..rb_entries)
            .rev()
            .find(|&i| get_refcount(&block, i, bits) != 0)
        {
            end_cluster = end_cluster.max(ri as u64 * rb_entries + last + 1);
        }
    }

    // Fixed point: L2 tables + new refblocks + (maybe) a new, larger reftable, all placed
    // from `end_cluster` on, all covered by refblocks.
    let n_l2 = missing.len() as u64;
    let mut new_rb: Vec<u64> = Vec::new(); // refblock indices that need a new block
    let mut new_rt_clusters = 0u64;
    let mut converged = false;
    for _ in 0..64 {
        let total = n_l2 + new_rb.len() as u64 + new_rt_clusters;
        let last = end_cluster + total - 1;
        let first_rb = end_cluster / rb_entries;
        let last_rb = last / rb_entries;
        let want: Vec<u64> = (first_rb..=last_rb)
            .filter(|&r| reftable.get(r as usize).is_none_or(|&e| e & !(cs - 1) == 0))
            .collect();
        let want_rt = if last_rb >= rt_entries {
            ((last_rb + 1) * 8).div_ceil(cs) + 1
        } else {
            0
        };
        if want == new_rb && want_rt == new_rt_clusters {
            converged = true;
            break;
        }
        new_rb = want;
        new_rt_clusters = want_rt;
    }
    if !converged {
        return Err(err(
            ErrorKind::Corrupt,
            op,
            "cannot lay out the refcount structures",
        ));
    }
    if new_rt_clusters * cs > MAX_REFTABLE_BYTES {
        return Err(err(
            ErrorKind::TooLarge,
            op,
            "the refcount table would grow too large",
        ));
    }
    let total = n_l2 + new_rb.len() as u64 + new_rt_clusters;
    let l2_first = end_cluster;
    let rb_first = l2_first + n_l2;
    let rt_first = rb_first + new_rb.len() as u64;
    let new_end = (end_cluster + total) * cs;

    // 1. Extend the file; the L2 tables are the (sparse) zeros.
    if h.file_len < new_end {
        f.set_len(new_end).ctx(op)?;
    }
    // 2. Refcounts of every new cluster, in existing and new refblocks.
    let new_rb_pos: std::collections::HashMap<u64, u64> = new_rb
        .iter()
        .enumerate()
        .map(|(i, &r)| (r, (rb_first + i as u64) * cs))
        .collect();
    let first_rb = end_cluster / rb_entries;
    let last_rb = (end_cluster + total - 1) / rb_entries;
    for r in first_rb..=last_rb {
        let (off, fresh) = match new_rb_pos.get(&r) {
            Some(&off) => (off, true),
            None => (
                reftable.get(r as usize).copied().unwrap_or(0) & !(cs - 1),
                false,
            ),
        };
        if fresh {
            block.iter_mut().for_each(|b| *b = 0);
        } else {
            read_exact(f, &mut block, off, op, "refcount block")?;
        }
        let lo = (r * rb_entries).max(end_cluster);
        let hi = ((r + 1) * rb_entries).min(end_cluster + total);
        for c in lo..hi {
            set_refcount(&mut block, c - r * rb_entries, bits, 1);
        }
        write_all(f, &block, off, op)?;
    }
    f.sync_data().ctx(op)?;
    // 3. Hook the new refblocks into the (possibly new) refcount table.
    if new_rt_clusters > 0 {
        let entries = new_rt_clusters * cs / 8;
        reftable.resize(entries as usize, 0);
        for (&r, &off) in &new_rb_pos {
            if let Some(e) = reftable.get_mut(r as usize) {
                *e = off;
            }
        }
        let mut buf = vec![0u8; (new_rt_clusters * cs) as usize];
        for (i, &e) in reftable.iter().enumerate() {
            put64(&mut buf, i * 8, e);
        }
        write_all(f, &buf, rt_first * cs, op)?;
        f.sync_data().ctx(op)?;
        let mut hdr = [0u8; 12];
        put64(&mut hdr, 0, rt_first * cs);
        hdr[8..12].copy_from_slice(&(new_rt_clusters as u32).to_be_bytes());
        write_all(f, &hdr, 48, op)?;
        f.sync_data().ctx(op)?;
        // Free the old table's clusters (a crash before this only leaks them).
        let old_first = h.reftable_offset / cs;
        for c in old_first..old_first + u64::from(h.reftable_clusters) {
            let r = c / rb_entries;
            let off = reftable.get(r as usize).copied().unwrap_or(0) & !(cs - 1);
            if off == 0 {
                continue;
            }
            read_exact(f, &mut block, off, op, "refcount block")?;
            let cur = get_refcount(&block, c % rb_entries, bits);
            set_refcount(&mut block, c % rb_entries, bits, cur.saturating_sub(1));
            write_all(f, &block, off, op)?;
        }
        f.sync_data().ctx(op)?;
    } else {
        for (&r, &off) in &new_rb_pos {
            let mut e = [0u8; 8];
            put64(&mut e, 0, off);
            write_all(f, &e, h.reftable_offset + r * 8, op)?;
        }
        f.sync_data().ctx(op)?;
    }
    // 4. Only now point the L1 table at the new L2 tables.
    for (k, &i) in missing.iter().enumerate() {
        let mut e = [0u8; 8];
        put64(&mut e, 0, L1_COPIED | ((l2_first + k as u64) * cs));
        write_all(f, &e, h.l1_offset + i * 8, op)?;
    }
    f.sync_data().ctx(op)?;
    tracing::debug!(added = n_l2, "preallocated qcow2 L2 tables");
    Ok(n_l2)
}
