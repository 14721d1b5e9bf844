//! Resource and role disks: ext4 file systems in sparse raw images, made with `mkfs.ext4`
//! (e2fsprogs).

use crate::error::{err, DiskError, ErrorKind, IoContext, Result};
use crate::raw;
use std::path::Path;
use std::process::Command;

/// Formats `image` ext4 with `label` and `extra` options (lazy inode table and
/// journal initialisation, no reserved blocks); removes the image when that fails,
/// so no half-made disk is left behind.
fn mkfs(image: &Path, label: &str, extra: &[&str]) -> Result<()> {
    let r = run_mkfs(image, label, extra);
    if r.is_err() {
        let _ = std::fs::remove_file(image);
    }
    r
}

fn run_mkfs(image: &Path, label: &str, extra: &[&str]) -> Result<()> {
    let op = "format ext4";
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label])
        .args(extra)
        .args([
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            "-m",
            "0",
        ])
        .arg(image)
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                err(
                    ErrorKind::NotFound,
                    op,
                    "mkfs.ext4 is not installed; install e2fsprogs",
                )
            } else {
                DiskError::io(op, e)
            }
        })
        .map_err(|e| e.with_path(image))?;
    if !out.status.success() {
        return Err(err(
            ErrorKind::Io,
            op,
            format!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )
        .with_path(image));
    }
    Ok(())
}

fn check_label(label: &str) -> Result<()> {
    if label.len() > 16 || label.contains(|c: char| c.is_control()) {
        return Err(err(
            ErrorKind::InvalidArgument,
            "format ext4",
            "an ext4 label is at most 16 bytes without control characters",
        ));
    }
    Ok(())
}

/// Creates a resource disk: a sparse raw image of `size` bytes, formatted ext4 (with lazy
/// inode table and journal initialisation, so it takes well under a second) when `format`
/// is set. Fails if `path` exists.
pub fn create_resource_disk(path: &Path, size: u64, format: bool, label: &str) -> Result<()> {
    check_label(label).map_err(|e| e.with_path(path))?;
    raw::create(path, size)?;
    if format {
        mkfs(path, label, &[])?;
    }
    Ok(())
}

/// Total bytes of regular files and a count of entries under `dir` (symlinks not followed).
fn tree_size(dir: &Path) -> Result<(u64, u64)> {
    let op = "measure role directory";
    let mut bytes = 0u64;
    let mut entries = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ctx_path(op, &d)? {
            let e = e.ctx_path(op, &d)?;
            let m = e.path().symlink_metadata().ctx_path(op, &e.path())?;
            entries += 1;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                bytes += m.len();
            }
        }
    }
    Ok((bytes, entries))
}

/// Creates a role disk: an ext4 image holding a copy of `dir` (`mkfs.ext4 -d`). With no
/// `size`, the image gets the contents' size plus room for metadata and journal.
pub fn create_role_disk(path: &Path, dir: &Path, size: Option<u64>, label: &str) -> Result<()> {
    let op = "create role disk";
    check_label(label).map_err(|e| e.with_path(path))?;
    if !dir.is_dir() {
        return Err(err(
            ErrorKind::NotFound,
            op,
            format!("{} is not a directory", dir.display()),
        )
        .with_path(path));
    }
    let size = match size {
        Some(s) => s,
        None => {
            let (bytes, entries) = tree_size(dir)?;
            // Data rounded up per 4 KiB block, an inode's worth per entry, 20% slack and
            // a floor that leaves room for the journal.
            let est = bytes + entries * 8192;
            let est = (est + est / 5).max(16 << 20) + (8 << 20);
            est.div_ceil(1 << 20) << 20
        }
    };
    raw::create(path, size)?;
    let dir_s = dir.to_str().ok_or_else(|| {
        err(
            ErrorKind::InvalidArgument,
            op,
            "the directory path is not UTF-8",
        )
        .with_path(path)
    })?;
    mkfs(path, label, &["-d", dir_s])
}
