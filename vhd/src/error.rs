//! The error type of the disk layer.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, coarsely; match on this rather than on messages.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The host file system or device failed (see the source error).
    Io,
    /// The file does not exist.
    NotFound,
    /// The file is not in the format it was opened as (bad magic, unknown version).
    WrongFormat,
    /// The file ends before a structure its own metadata says is there.
    Truncated,
    /// The metadata is inconsistent (bad checksum, overlapping or out-of-range tables).
    Corrupt,
    /// The format or image uses a feature this layer does not implement, or the
    /// operation is not available for this format.
    Unsupported,
    /// A write-type operation on an image opened read-only.
    ReadOnly,
    /// A request reaches past the end of the virtual disk.
    OutOfBounds,
    /// A caller-supplied argument is invalid (size, alignment, option combination).
    InvalidArgument,
    /// The image needs a backing/parent image and none was handed in.
    BackingRequired,
    /// The backing/parent image handed in does not match what the image records.
    BackingMismatch,
    /// The file claims a structure larger than this layer accepts.
    TooLarge,
    /// A writable open found the image locked: another process (or another open in this
    /// one) has it open writable.
    Locked,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::NotFound => "not found",
            ErrorKind::WrongFormat => "wrong format",
            ErrorKind::Truncated => "truncated image",
            ErrorKind::Corrupt => "corrupt image",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::OutOfBounds => "out of bounds",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::BackingRequired => "backing image required",
            ErrorKind::BackingMismatch => "backing image mismatch",
            ErrorKind::TooLarge => "too large",
            ErrorKind::Locked => "in use",
        };
        f.write_str(s)
    }
}

/// An error from the disk layer, with the operation, file and offset it concerns.
#[derive(Debug, thiserror::Error)]
pub struct DiskError {
    kind: ErrorKind,
    op: &'static str,
    path: Option<PathBuf>,
    offset: Option<u64>,
    message: String,
    #[source]
    source: Option<io::Error>,
}

impl fmt::Display for DiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed", self.op)?;
        if let Some(p) = &self.path {
            write!(f, " for {}", p.display())?;
        }
        if let Some(o) = self.offset {
            write!(f, " at offset {o:#x}")?;
        }
        write!(f, " ({}): {}", self.kind, self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

/// Result alias of this crate.
pub type Result<T, E = DiskError> = std::result::Result<T, E>;

impl DiskError {
    /// A new error of `kind` during `op`; `message` should say what to do about it.
    pub fn new(kind: ErrorKind, op: &'static str, message: impl Into<String>) -> Self {
        DiskError {
            kind,
            op,
            path: None,
            offset: None,
            message: message.into(),
            source: None,
        }
    }

    /// An I/O error during `op`; the kind is derived from the I/O error.
    pub fn io(op: &'static str, err: io::Error) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::UnexpectedEof => ErrorKind::Truncated,
            io::ErrorKind::Unsupported => ErrorKind::Unsupported,
            io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
            io::ErrorKind::InvalidData => ErrorKind::Corrupt,
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                ErrorKind::ReadOnly
            }
            _ => ErrorKind::Io,
        };
        let message = match kind {
            ErrorKind::NotFound => "the file does not exist; check the path",
            ErrorKind::ReadOnly => {
                "permission denied; open read-only or fix the file's permissions"
            }
            ErrorKind::Truncated => "the file ends early; it was probably cut short while copying",
            _ => "the host I/O failed",
        };
        DiskError {
            kind,
            op,
            path: None,
            offset: None,
            message: message.to_string(),
            source: Some(err),
        }
    }

    /// Attach the file this error concerns (keeps an existing one).
    #[must_use]
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        if self.path.is_none() {
            self.path = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// Attach the offset this error concerns (keeps an existing one).
    #[must_use]
    pub fn at(mut self, offset: u64) -> Self {
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }

    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The operation that failed.
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// The file concerned, if known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The offset concerned, if known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }
}

/// Shorthand constructors used throughout the crate.
pub(crate) fn err(kind: ErrorKind, op: &'static str, message: impl Into<String>) -> DiskError {
    DiskError::new(kind, op, message)
}

/// Adds `op` (and optionally a path) to `io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str) -> Result<T>;
    fn ctx_path(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str) -> Result<T> {
        self.map_err(|e| DiskError::io(op, e))
    }
    fn ctx_path(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|e| DiskError::io(op, e).with_path(path))
    }
}
