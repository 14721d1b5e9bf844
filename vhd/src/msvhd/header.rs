//! The dynamic disk header (dynamic and differencing images): BAT position, block size,
//! and for differencing images the parent's identity and locators (informational only).

use super::footer::checksum;
use super::{bad, Footer, VhdType, SECTOR};
use crate::error::{ErrorKind, Result};
use crate::util::{be32, be64, read_exact};
use std::fs::File;

pub(super) const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
pub(super) const PLAT_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
pub(super) const PLAT_W2KU: u32 = u32::from_be_bytes(*b"W2ku");

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

pub(super) fn encode_utf16(s: &str, big_endian: bool) -> Vec<u8> {
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

pub(super) fn block_bitmap_bytes(block_size: u32) -> u64 {
    (u64::from(block_size) / SECTOR)
        .div_ceil(8)
        .div_ceil(SECTOR)
        * SECTOR
}

pub(super) fn parse_dyn_header(f: &File, footer: &Footer, flen: u64) -> Result<DynHeader> {
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
