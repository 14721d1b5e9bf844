//! Small helpers shared by the format modules.

use crate::error::{err, DiskError, ErrorKind, IoContext, Result};
use crate::Format;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

pub(crate) fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

pub(crate) fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

pub(crate) fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Reads exactly `buf.len()` bytes at `off`; a short file is a `Truncated` error naming `what`.
pub(crate) fn read_exact(
    f: &File,
    buf: &mut [u8],
    off: u64,
    op: &'static str,
    what: &str,
) -> Result<()> {
    f.read_exact_at(buf, off).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            err(
                ErrorKind::Truncated,
                op,
                format!(
                    "the file ends inside the {what} ({} bytes at {off:#x}); it was probably cut \
                     short while copying: copy it again from its source",
                    buf.len()
                ),
            )
            .at(off)
        } else {
            DiskError::io(op, e).at(off)
        }
    })
}

pub(crate) fn write_all(f: &File, buf: &[u8], off: u64, op: &'static str) -> Result<()> {
    f.write_all_at(buf, off)
        .map_err(|e| DiskError::io(op, e).at(off))
}

pub(crate) fn file_len(f: &File, op: &'static str) -> Result<u64> {
    Ok(f.metadata().ctx(op)?.len())
}

/// Checks that `[offset, offset+len)` lies within a disk of `size` bytes.
pub(crate) fn check_bounds(offset: u64, len: u64, size: u64, op: &'static str) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(err(
            ErrorKind::OutOfBounds,
            op,
            format!(
                "request of {len} bytes at {offset:#x} reaches past the disk end ({size} bytes)"
            ),
        )
        .at(offset)),
    }
}

pub(crate) fn check_writable(read_only: bool, op: &'static str) -> Result<()> {
    if read_only {
        Err(err(
            ErrorKind::ReadOnly,
            op,
            "the image was opened read-only; reopen it read-write to change it",
        ))
    } else {
        Ok(())
    }
}

pub(crate) fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// A buffer of zeros used to write zero ranges in chunks.
pub(crate) const ZERO_CHUNK: usize = 1 << 20;

pub(crate) fn probe(path: &Path) -> Result<Format> {
    let op = "probe image format";
    let f = File::open(path).ctx_path(op, path)?;
    let len = file_len(&f, op).map_err(|e| e.with_path(path))?;
    let mut head = [0u8; 8];
    if len >= 8 {
        read_exact(&f, &mut head, 0, op, "header").map_err(|e| e.with_path(path))?;
        if &head[0..4] == b"QFI\xfb" {
            return Ok(Format::Qcow2);
        }
        if &head == b"conectix" {
            return Ok(Format::Vhd);
        }
    }
    if len >= 512 {
        let mut foot = [0u8; 8];
        read_exact(&f, &mut foot, len - 512, op, "footer").map_err(|e| e.with_path(path))?;
        if &foot == b"conectix" {
            return Ok(Format::Vhd);
        }
    }
    Ok(Format::Raw)
}

/// The exclusive advisory lock of an image opened writable (`flock(LOCK_EX | LOCK_NB)` on a
/// descriptor of its own, kept open as long as the image): a second writable open of the
/// same file, from this process or another, is refused. Released when dropped.
pub(crate) struct WriteLock(#[allow(dead_code)] Flock<File>);

impl std::fmt::Debug for WriteLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteLock")
    }
}

/// Takes the exclusive lock of `path` before it is opened writable; fails at once with
/// [`ErrorKind::Locked`] if another writable open holds it.
pub(crate) fn lock_writable(path: &Path, op: &'static str) -> Result<WriteLock> {
    let f = File::open(path).ctx_path(op, path)?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(WriteLock(l)),
        Err((_, Errno::EWOULDBLOCK)) => Err(err(
            ErrorKind::Locked,
            op,
            format!(
                "disk {} is in use by another process (locked): another VMM or tool has it open \
                 writable; stop it first, or open the disk read-only",
                path.display()
            ),
        )
        .with_path(path)),
        Err((_, e)) => Err(DiskError::io(op, std::io::Error::from(e)).with_path(path)),
    }
}
