//! Consistency checks of image metadata (`reddog image check`).

use crate::error::{err, ErrorKind, IoContext, Result};
use crate::msvhd;
use crate::qcow2::meta::{self, get_refcount};
use crate::util::{be64, read_exact};
use crate::Format;
use std::fs::File;
use std::path::Path;

/// The outcome of a check.
#[derive(Debug, Default, Clone)]
pub struct CheckReport {
    /// Metadata errors (data may be lost or misread).
    pub corruptions: Vec<String>,
    /// Space that is allocated but unused (harmless).
    pub leaks: Vec<String>,
    /// Things the check could not look at.
    pub notes: Vec<String>,
}

impl CheckReport {
    /// Exit status in `qemu-img check`'s convention: 0 clean, 2 corrupt, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if !self.corruptions.is_empty() {
            2
        } else if !self.leaks.is_empty() {
            3
        } else {
            0
        }
    }
}

const MAX_CHECK_CLUSTERS: u64 = 1 << 25;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Checks an image's metadata. Errors that stop the check (wrong format, truncated
/// header) are returned as `Err`.
pub fn check(path: &Path, format: Format) -> Result<CheckReport> {
    match format {
        Format::Raw => Ok(CheckReport {
            notes: vec!["raw images have no metadata to check".into()],
            ..Default::default()
        }),
        Format::Qcow2 => check_qcow2(path),
        Format::Vhd => check_vhd(path),
    }
}

fn check_qcow2(path: &Path) -> Result<CheckReport> {
    let op = "check qcow2 image";
    let f = File::open(path).ctx_path(op, path)?;
    let h = meta::read_header(&f).map_err(|e| e.with_path(path))?;
    let mut rep = CheckReport::default();
    let cs = h.cluster_size();
    let cb = h.cluster_bits;
    let file_clusters = h.file_len.div_ceil(cs);
    if file_clusters > MAX_CHECK_CLUSTERS {
        return Err(err(
            ErrorKind::TooLarge,
            op,
            "the image has too many clusters to check here; use `qemu-img check`",
        )
        .with_path(path));
    }
    if h.incompatible & meta::INCOMPAT_DIRTY != 0 {
        rep.notes
            .push("the image is marked dirty: refcounts may legitimately be stale".into());
    }
    if h.incompatible & meta::INCOMPAT_CORRUPT != 0 {
        rep.corruptions
            .push("the image is marked corrupt in its header".into());
    }
    let skip_leaks = h.nb_snapshots != 0;
    if skip_leaks {
        rep.notes.push(format!(
            "{} internal snapshots are not checked; leaks are not reported",
            h.nb_snapshots
        ));
    }
    let mut refs = vec![0u32; file_clusters as usize];
    let mut add = |rep: &mut CheckReport, off: u64, what: &str| {
        let c = off / cs;
        match refs.get_mut(c as usize) {
            Some(r) => *r = r.saturating_add(1),
            None => rep
                .corruptions
                .push(format!("{what} at {off:#x} lies past the end of the file")),
        }
    };
    add(&mut rep, 0, "header");
    let l1_bytes = u64::from(h.l1_size) * 8;
    for c in 0..l1_bytes.div_ceil(cs) {
        add(&mut rep, h.l1_offset + c * cs, "L1 table");
    }
    for c in 0..u64::from(h.reftable_clusters) {
        add(&mut rep, h.reftable_offset + c * cs, "refcount table");
    }
    let mut rt = vec![0u8; (u64::from(h.reftable_clusters) * cs) as usize];
    read_exact(&f, &mut rt, h.reftable_offset, op, "refcount table")?;
    let rb_entries = cs * 8 / u64::from(h.refcount_bits());
    let mut refblocks: Vec<(u64, u64)> = Vec::new();
    for i in 0..rt.len() / 8 {
        let off = be64(&rt, i * 8) & !(cs - 1);
        if off == 0 {
            continue;
        }
        if off.checked_add(cs).is_none_or(|e| e > h.file_len) {
            rep.corruptions.push(format!(
                "refcount block {i} at {off:#x} lies past the end of the file"
            ));
            continue;
        }
        add(&mut rep, off, "refcount block");
        refblocks.push((i as u64, off));
    }
    let mut l1 = vec![0u8; l1_bytes as usize];
    read_exact(&f, &mut l1, h.l1_offset, op, "L1 table")?;
    let mut l2 = vec![0u8; cs as usize];
    for i in 0..h.l1_size as usize {
        let l2_off = be64(&l1, i * 8) & OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        if l2_off % cs != 0 || l2_off.checked_add(cs).is_none_or(|e| e > h.file_len) {
            rep.corruptions.push(format!(
                "L1 entry {i}: L2 table at {l2_off:#x} is unaligned or past the end of the file"
            ));
            continue;
        }
        add(&mut rep, l2_off, "L2 table");
        read_exact(&f, &mut l2, l2_off, op, "L2 table")?;
        for j in 0..(cs / 8) as usize {
            let e = be64(&l2, j * 8);
            if e & (1 << 62) != 0 {
                // Compressed: offset in the low x bits, sector count above them.
                let x = 62 - (cb - 8);
                let off = e & ((1u64 << x) - 1);
                let sectors = ((e >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
                let end = (off & !511) + sectors * 512 - 1;
                add(&mut rep, off, "compressed cluster");
                // The sector count may overshoot the end of the file on the last one.
                for c in off / cs + 1..=end / cs {
                    if c * cs < h.file_len {
                        add(&mut rep, c * cs, "compressed cluster");
                    }
                }
            } else {
                let off = e & OFFSET_MASK;
                if off == 0 {
                    continue;
                }
                if off % cs != 0 {
                    rep.corruptions.push(format!(
                        "L2 entry at {:#x}: data cluster {off:#x} is unaligned",
                        l2_off + j as u64 * 8
                    ));
                    continue;
                }
                add(&mut rep, off, "data cluster");
            }
        }
    }
    // Compare with the stored refcounts.
    let mut block = vec![0u8; cs as usize];
    let mut stored = vec![0u64; file_clusters as usize];
    // (At most 2^25 clusters: 384 MiB for both tables.)
    for &(i, off) in &refblocks {
        read_exact(&f, &mut block, off, op, "refcount block")?;
        for k in 0..rb_entries {
            let c = i * rb_entries + k;
            let v = get_refcount(&block, k, h.refcount_bits());
            match stored.get_mut(c as usize) {
                Some(s) => *s = v,
                None if v != 0 && !skip_leaks => {
                    rep.leaks.push(format!(
                        "cluster {c} past the end of the file has refcount {v}"
                    ));
                }
                None => {}
            }
        }
    }
    for (c, (&r, &s)) in refs.iter().zip(stored.iter()).enumerate() {
        let r = u64::from(r);
        if s < r {
            rep.corruptions.push(format!(
                "cluster {c} is referenced {r} times but its refcount is {s}"
            ));
        } else if s > r && !skip_leaks {
            rep.leaks
                .push(format!("cluster {c} has refcount {s} but {r} references"));
        }
    }
    Ok(rep)
}

fn check_vhd(path: &Path) -> Result<CheckReport> {
    let op = "check vhd image";
    let info = msvhd::info(path)?;
    let mut rep = CheckReport::default();
    if info.header.is_some() {
        let f = File::open(path).ctx_path(op, path)?;
        let mut copy = [0u8; 512];
        read_exact(&f, &mut copy, 0, op, "footer copy").map_err(|e| e.with_path(path))?;
        let mut end = [0u8; 512];
        read_exact(&f, &mut end, (info.file_len / 512 - 1) * 512, op, "footer")
            .map_err(|e| e.with_path(path))?;
        if copy != end {
            rep.corruptions
                .push("the footer copy at the start differs from the footer at the end".into());
        }
        if let Some(h) = &info.header {
            let block_total = (u64::from(h.block_size) / 512).div_ceil(8).div_ceil(512) * 512
                + u64::from(h.block_size);
            let data_start = h.table_offset + u64::from(h.max_table_entries) * 4;
            let used = data_start.div_ceil(512) * 512 + info.allocated_blocks * block_total + 512;
            let locators: u64 = 64 * 1024;
            if info.file_len > used + locators {
                rep.leaks.push(format!(
                    "{} bytes of the file are not used by any block (an interrupted allocation?)",
                    info.file_len - used
                ));
            }
        }
    }
    Ok(rep)
}
