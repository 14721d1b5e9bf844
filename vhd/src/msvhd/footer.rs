//! The 512-byte footer (at the end of every VHD, and copied at offset 0 of dynamic and
//! differencing ones), its checksum, the disk geometry and the VHD clock.

use super::{bad, MAX_VHD_SIZE, SECTOR};
use crate::error::{ErrorKind, Result};
use crate::util::{be16, be32, be64, put16, put32, put64};
use std::time::{SystemTime, UNIX_EPOCH};

pub(super) const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Seconds from the Unix epoch to 2000-01-01T00:00:00Z, the VHD epoch.
const VHD_EPOCH: u64 = 946_684_800;
/// Our creator application tag. qemu trusts `current_size` only for a few tags or for the
/// maximal geometry, so [`geometry_for`] picks a geometry qemu reads at the intended size.
pub const CREATOR_APP: &[u8; 4] = b"rdog";
const MAX_GEOMETRY: (u16, u8, u8) = (65535, 16, 255);

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
    pub(super) raw: [u8; 512],
}

pub(super) fn checksum(buf: &[u8], skip: std::ops::Range<usize>) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !skip.contains(i))
        .fold(0u32, |a, (_, &b)| a.wrapping_add(u32::from(b)));
    !sum
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
    pub(super) fn parse(b: &[u8; 512]) -> Result<Self> {
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

    pub(super) fn build(
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

pub(super) fn vhd_time(t: SystemTime) -> u32 {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}
