//! The whole file read at open: footer at the end (or the cut-short diagnosis), dynamic
//! header, BAT, and every block inside the data area, clear of metadata and of each other.

use super::footer::FOOTER_COOKIE;
use super::header::{block_bitmap_bytes, parse_dyn_header};
use super::{bad, DynHeader, Footer, VhdType, SECTOR, UNUSED};
use crate::error::{ErrorKind, IoContext, Result};
use crate::util::{be32, file_len, read_exact};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

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

pub(super) struct Parsed {
    pub(super) footer: Footer,
    pub(super) header: Option<DynHeader>,
    pub(super) bat: Vec<u32>,
    /// Offset of the footer at the end of the file (= where the next block goes).
    pub(super) footer_pos: u64,
}

pub(super) fn parse(f: &File) -> Result<Parsed> {
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
