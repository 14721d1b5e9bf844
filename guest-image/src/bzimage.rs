//! Gets the uncompressed `vmlinux` ELF out of a Linux bzImage.
//!
//! The setup header says where the compressed kernel is (`payload_offset` at
//! 0x248 and `payload_length` at 0x24c, relative to the protected-mode code that
//! starts after the `(setup_sects + 1) * 512` setup bytes). Debian compresses it
//! with LZ4 in the legacy frame format the kernel's build uses
//! (`lz4 -l`): magic 0x184C2102, then blocks of `<u32 compressed size><data>`,
//! each decompressing to at most 8 MiB, and the kernel build appends the
//! uncompressed size as a final `u32`.

use thiserror::Error;

use crate::elf::{Elf, ElfError};

const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC_AT: usize = 0x202;
const VERSION_AT: usize = 0x206;
const PAYLOAD_OFFSET_AT: usize = 0x248;
const PAYLOAD_LENGTH_AT: usize = 0x24c;
/// Protocol 2.08 added `payload_offset`/`payload_length`.
const MIN_VERSION: u16 = 0x0208;
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Largest block the legacy format allows once decompressed.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// A sanity limit for a decompressed kernel.
const MAX_VMLINUX: usize = 1 << 30;

#[derive(Debug, Error)]
pub enum BzImageError {
    #[error("not a bzImage (no \"HdrS\" setup header at 0x202): pass a Linux bzImage")]
    NotBzImage,
    #[error(
        "boot protocol {0:#06x} is older than 2.08 and has no payload fields: use a newer kernel"
    )]
    OldProtocol(u16),
    #[error("the payload (offset {offset:#x}, length {length:#x}) lies outside the {size}-byte file: the image is truncated or corrupt; fetch it again")]
    PayloadOutOfBounds {
        offset: usize,
        length: usize,
        size: usize,
    },
    #[error("the payload is not LZ4 legacy-framed (starts with {0:02x?}): this kernel uses another compression; add a decompressor for it to testkit::bzimage")]
    NotLz4Legacy(Vec<u8>),
    #[error("LZ4 payload corrupt at byte {at}: {what}; fetch the kernel again")]
    Lz4Corrupt { at: usize, what: String },
    #[error("the decompressed kernel is {actual} bytes but the image records {recorded}: the payload is corrupt; fetch the kernel again")]
    SizeMismatch { actual: usize, recorded: usize },
    #[error("the decompressed kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): use a kernel built with CONFIG_PVH=y")]
    NoPvhNote,
    #[error("the decompressed payload is not a usable ELF: {0}")]
    Elf(#[from] ElfError),
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// The compressed payload inside a bzImage.
pub fn payload(bz: &[u8]) -> Result<&[u8], BzImageError> {
    if bz.get(HEADER_MAGIC_AT..HEADER_MAGIC_AT + 4) != Some(b"HdrS".as_slice()) {
        return Err(BzImageError::NotBzImage);
    }
    let version = u16_at(bz, VERSION_AT).ok_or(BzImageError::NotBzImage)?;
    if version < MIN_VERSION {
        return Err(BzImageError::OldProtocol(version));
    }
    let setup_sects = match bz.get(SETUP_SECTS).copied().unwrap_or(0) {
        0 => 4,
        n => usize::from(n),
    };
    let po = u32_at(bz, PAYLOAD_OFFSET_AT).ok_or(BzImageError::NotBzImage)? as usize;
    let pl = u32_at(bz, PAYLOAD_LENGTH_AT).ok_or(BzImageError::NotBzImage)? as usize;
    let offset = (setup_sects + 1) * 512 + po;
    offset
        .checked_add(pl)
        .and_then(|end| bz.get(offset..end))
        .ok_or(BzImageError::PayloadOutOfBounds {
            offset,
            length: pl,
            size: bz.len(),
        })
}

/// Decompresses an LZ4 legacy-framed stream (with the kernel build's optional
/// trailing uncompressed-size word).
pub fn lz4_legacy_decompress(input: &[u8]) -> Result<Vec<u8>, BzImageError> {
    if u32_at(input, 0) != Some(LZ4_LEGACY_MAGIC) {
        return Err(BzImageError::NotLz4Legacy(
            input.iter().take(8).copied().collect(),
        ));
    }
    let corrupt = |at: usize, what: String| BzImageError::Lz4Corrupt { at, what };
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut at = 4usize;
    while at < input.len() {
        let word = u32_at(input, at).ok_or_else(|| {
            corrupt(
                at,
                format!("{} trailing bytes after the last block", input.len() - at),
            )
        })?;
        at += 4;
        if at == input.len() {
            // The build appends the uncompressed size after the last block.
            let recorded = word as usize;
            if recorded != out.len() {
                return Err(BzImageError::SizeMismatch {
                    actual: out.len(),
                    recorded,
                });
            }
            break;
        }
        if word == LZ4_LEGACY_MAGIC {
            continue; // concatenated streams
        }
        let len = word as usize;
        let data = at
            .checked_add(len)
            .and_then(|end| input.get(at..end))
            .ok_or_else(|| corrupt(at, format!("block of {len} bytes runs past the end")))?;
        let n = lz4_flex::block::decompress_into(data, &mut block)
            .map_err(|e| corrupt(at, e.to_string()))?;
        if out.len() + n > MAX_VMLINUX {
            return Err(corrupt(at, "decompresses to more than 1 GiB".into()));
        }
        out.extend_from_slice(&block[..n]);
        at += len;
    }
    Ok(out)
}

/// Extracts the `vmlinux` ELF from a bzImage and checks it carries the PVH note.
pub fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let vmlinux = lz4_legacy_decompress(payload(bz)?)?;
    let elf = Elf::parse(&vmlinux)?;
    if !elf.has_pvh_note()? {
        return Err(BzImageError::NoPvhNote);
    }
    Ok(vmlinux)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One LZ4 block holding `lit` as literals only.
    fn literal_block(lit: &[u8]) -> Vec<u8> {
        assert!(lit.len() < 15);
        let mut b = vec![(lit.len() as u8) << 4];
        b.extend_from_slice(lit);
        b
    }

    fn legacy(blocks: &[&[u8]], trailer: Option<u32>) -> Vec<u8> {
        let mut v = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for b in blocks {
            let blk = literal_block(b);
            v.extend_from_slice(&(blk.len() as u32).to_le_bytes());
            v.extend_from_slice(&blk);
        }
        if let Some(t) = trailer {
            v.extend_from_slice(&t.to_le_bytes());
        }
        v
    }

    #[test]
    fn decompresses_blocks_and_checks_the_trailer() {
        let s = legacy(&[b"hello ", b"world"], Some(11));
        assert_eq!(lz4_legacy_decompress(&s).expect("ok"), b"hello world");
        let s = legacy(&[b"hello ", b"world"], None);
        assert_eq!(lz4_legacy_decompress(&s).expect("ok"), b"hello world");
        let s = legacy(&[b"hello"], Some(99));
        assert!(matches!(
            lz4_legacy_decompress(&s),
            Err(BzImageError::SizeMismatch {
                actual: 5,
                recorded: 99
            })
        ));
    }

    #[test]
    fn rejects_other_formats_and_truncation() {
        assert!(matches!(
            lz4_legacy_decompress(b"\x1f\x8b\x08\x00"),
            Err(BzImageError::NotLz4Legacy(_))
        ));
        let mut s = legacy(&[b"hello world!"], None);
        s.truncate(s.len() - 3);
        assert!(matches!(
            lz4_legacy_decompress(&s),
            Err(BzImageError::Lz4Corrupt { .. })
        ));
    }

    #[test]
    fn finds_the_payload_from_the_setup_header() {
        let mut bz = vec![0u8; 3 * 512 + 64];
        bz[SETUP_SECTS] = 2;
        bz[HEADER_MAGIC_AT..HEADER_MAGIC_AT + 4].copy_from_slice(b"HdrS");
        bz[VERSION_AT..VERSION_AT + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        bz[PAYLOAD_OFFSET_AT..PAYLOAD_OFFSET_AT + 4].copy_from_slice(&16u32.to_le_bytes());
        bz[PAYLOAD_LENGTH_AT..PAYLOAD_LENGTH_AT + 4].copy_from_slice(&8u32.to_le_bytes());
        bz[3 * 512 + 16..3 * 512 + 24].copy_from_slice(b"PAYLOAD!");
        assert_eq!(payload(&bz).expect("payload"), b"PAYLOAD!");
        bz[PAYLOAD_LENGTH_AT..PAYLOAD_LENGTH_AT + 4].copy_from_slice(&800u32.to_le_bytes());
        assert!(matches!(
            payload(&bz),
            Err(BzImageError::PayloadOutOfBounds { .. })
        ));
        assert!(matches!(
            payload(&bz[..0x100]),
            Err(BzImageError::NotBzImage)
        ));
    }
}
