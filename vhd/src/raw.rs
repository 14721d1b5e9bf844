//! Raw images: the file's bytes are the disk's bytes.

use crate::error::{err, DiskError, ErrorKind, IoContext, Result};
use crate::util::{check_bounds, check_writable, file_len, lock_writable, WriteLock, ZERO_CHUNK};
use crate::{DiskImage, Format, MAX_DISK_SIZE};
use nix::fcntl::{fallocate, FallocateFlags};
use std::any::Any;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A raw image file.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    /// Held while open writable (declared last: released after the file is closed).
    _lock: Option<WriteLock>,
}

/// Creates a sparse raw image of `size` bytes; fails if `path` exists.
pub fn create(path: &Path, size: u64) -> Result<()> {
    let op = "create raw image";
    check_create_size(size, op).map_err(|e| e.with_path(path))?;
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .ctx_path(op, path)?;
    f.set_len(size).ctx_path(op, path)?;
    f.sync_all().ctx_path(op, path)?;
    Ok(())
}

pub(crate) fn check_create_size(size: u64, op: &'static str) -> Result<()> {
    if size == 0 || size % 512 != 0 || size > MAX_DISK_SIZE {
        return Err(err(
            ErrorKind::InvalidArgument,
            op,
            format!(
                "size {size} must be a non-zero multiple of 512 bytes and at most {MAX_DISK_SIZE}"
            ),
        ));
    }
    Ok(())
}

impl RawDisk {
    /// Opens an existing raw image; its size is the file's length.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let op = "open raw image";
        let lock = (!read_only).then(|| lock_writable(path, op)).transpose()?;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .ctx_path(op, path)?;
        let size = file_len(&file, op).map_err(|e| e.with_path(path))?;
        Ok(RawDisk {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
            _lock: lock,
        })
    }

    /// The file this image lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A read-only imago view of this file, for use as a qcow2 backing image.
    pub(crate) fn imago_layer(
        &self,
    ) -> Result<std::sync::Arc<imago::FormatAccess<imago::file::File>>> {
        let op = "use raw image as backing";
        let f = File::open(&self.path).ctx_path(op, &self.path)?;
        let storage = imago::file::File::try_from(f).ctx_path(op, &self.path)?;
        let raw = imago::raw::Raw::open_image(storage, false).ctx_path(op, &self.path)?;
        Ok(std::sync::Arc::new(imago::FormatAccess::new(raw)))
    }

    fn fail(&self, e: DiskError, offset: u64) -> DiskError {
        e.with_path(&self.path).at(offset)
    }

    fn zero_by_writing(&self, offset: u64, len: u64) -> Result<()> {
        let chunk = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.file
                .write_all_at(&chunk[..n], offset + done)
                .map_err(|e| self.fail(DiskError::io("write zeroes", e), offset + done))?;
            done += n as u64;
        }
        Ok(())
    }
}

fn fallocate_range(file: &File, flags: FallocateFlags, offset: u64, len: u64) -> bool {
    let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return false;
    };
    fallocate(file, flags, o, l).is_ok()
}

impl DiskImage for RawDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let op = "read";
        check_bounds(offset, buf.len() as u64, self.size, op).map_err(|e| self.fail(e, offset))?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.fail(DiskError::io(op, e), offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let op = "write";
        check_writable(self.read_only, op).map_err(|e| self.fail(e, offset))?;
        check_bounds(offset, buf.len() as u64, self.size, op).map_err(|e| self.fail(e, offset))?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.fail(DiskError::io(op, e), offset))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().ctx_path("flush", &self.path)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let op = "discard";
        check_writable(self.read_only, op).map_err(|e| self.fail(e, offset))?;
        check_bounds(offset, len, self.size, op).map_err(|e| self.fail(e, offset))?;
        if len == 0 {
            return Ok(());
        }
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if fallocate_range(&self.file, flags, offset, len) {
            return Ok(());
        }
        // The file system cannot punch holes: keep the "reads as zeros" promise.
        self.zero_by_writing(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let op = "write zeroes";
        check_writable(self.read_only, op).map_err(|e| self.fail(e, offset))?;
        check_bounds(offset, len, self.size, op).map_err(|e| self.fail(e, offset))?;
        if len == 0 {
            return Ok(());
        }
        if fallocate_range(
            &self.file,
            FallocateFlags::FALLOC_FL_ZERO_RANGE,
            offset,
            len,
        ) {
            return Ok(());
        }
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if fallocate_range(&self.file, flags, offset, len) {
            return Ok(());
        }
        self.zero_by_writing(offset, len)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn format(&self) -> Format {
        Format::Raw
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
