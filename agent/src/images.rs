//! The image cache: base images stored content-addressed (by sha256) and
//! read-only under `<state>/images/`, shared by every instance that names them.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vmm_api::DiskFormat;

use crate::util::{hex, now_unix_ms, write_json_atomic};

/// Largest image the cache takes (64 GiB).
pub const MAX_IMAGE_BYTES: u64 = 64 << 30;

/// A cached image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Its sha256, hex.
    pub sha256: String,
    /// Its format (given at import; never guessed).
    pub format: DiskFormat,
    /// Bytes.
    pub size: u64,
    /// Where it came from (path or URL), for humans.
    pub source: String,
    /// When it was imported, ms since the Unix epoch.
    pub imported_unix_ms: u64,
    /// Instances using it (filled in by the agent).
    #[serde(default)]
    pub references: usize,
}

impl ImageInfo {
    /// `sha256:<hex>`, the reference goal states use.
    pub fn reference(&self) -> String {
        format!("sha256:{}", self.sha256)
    }
}

/// Image cache errors.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// I/O on the source or the cache.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The content's hash is not the expected one.
    #[error("image {source_name} has sha256 {actual}, expected {expected}; the download or file is corrupt or the reference is wrong")]
    HashMismatch {
        /// Source.
        source_name: String,
        /// Expected hex.
        expected: String,
        /// Actual hex.
        actual: String,
    },
    /// A malformed sha256.
    #[error("{0:?} is not a sha256 (64 hex digits, optionally prefixed sha256:)")]
    BadReference(String),
    /// Too big.
    #[error("image {0} is larger than {MAX_IMAGE_BYTES} bytes")]
    TooLarge(String),
    /// Still in use.
    #[error("image sha256:{0} is used by {1} instance(s); remove them first")]
    InUse(String, usize),
    /// Not in the cache.
    #[error("image sha256:{0} is not in the cache")]
    NotFound(String),
    /// The path is not allowed (outside the import roots, relative, a
    /// symlink).
    #[error(transparent)]
    Path(#[from] crate::paths::PathError),
    /// Not a regular file (a device, a FIFO, a directory).
    #[error("{0} is not a regular file; import an image file")]
    NotRegular(String),
    /// The content is not what its declared format says.
    #[error("image {source_name} is not a valid {format:?} image: {why}; check the file or the declared format (-f)")]
    BadFormat {
        /// Source.
        source_name: String,
        /// The declared format.
        format: DiskFormat,
        /// What is wrong.
        why: String,
    },
    /// The image does not fit the cache's file system.
    #[error("image {source_name} needs {need} bytes but the image cache {dir} has {free} bytes free; free space (reddog cache gc) or grow the file system")]
    NoSpace {
        /// Source.
        source_name: String,
        /// Bytes needed.
        need: u64,
        /// Bytes free (for unprivileged users, as statvfs says).
        free: u64,
        /// The cache directory.
        dir: PathBuf,
    },
    /// A download failed.
    #[error("download {url}: {why}")]
    Download {
        /// The URL.
        url: String,
        /// What went wrong.
        why: String,
    },
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct ImageCache {
    dir: PathBuf,
}

impl ImageCache {
    /// Opens (creating) the cache in `dir`, removing leftovers of interrupted
    /// imports.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let dir = dir.into();
        crate::util::create_private_dir(&dir, 0o700).map_err(|source| ImageError::Io {
            what: "create image cache",
            path: dir.clone(),
            source,
        })?;
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".import-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Self { dir })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image file for a hash.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    fn meta_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.json"))
    }

    /// The image with this hash, if cached.
    pub fn get(&self, sha256: &str) -> Option<ImageInfo> {
        let sha = crate::spec::parse_image_ref(sha256)?;
        let text = std::fs::read_to_string(self.meta_path(&sha)).ok()?;
        let info: ImageInfo = serde_json::from_str(&text).ok()?;
        (info.sha256 == sha && self.path_of(&sha).is_file()).then_some(info)
    }

    /// Every cached image.
    pub fn list(&self) -> Vec<ImageInfo> {
        let mut out = BTreeMap::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(sha) = name.strip_suffix(".json") {
                    if let Some(i) = self.get(sha) {
                        out.insert(i.sha256.clone(), i);
                    }
                }
            }
        }
        out.into_values().collect()
    }

    /// The guest-visible size of cached image `sha256` (what an overlay on it
    /// can grow to): a raw image's length, a qcow2 or VHD image's virtual size
    /// from its header (the file size when the header cannot be read). None
    /// when the image is not cached.
    pub fn virtual_size(&self, sha256: &str) -> Option<u64> {
        let info = self.get(sha256)?;
        if info.format == DiskFormat::Raw {
            return Some(info.size);
        }
        let format = crate::backend::vhd_disks::to_vhd(info.format);
        Some(
            vhd::open(self.path_of(sha256), format, vhd::OpenOptions::read_only())
                .map_or(info.size, |d| d.size()),
        )
    }

    /// Bytes used by cached images.
    pub fn total_bytes(&self) -> u64 {
        self.list().iter().map(|i| i.size).sum()
    }

    /// Copies a file into the cache, hashing it on the way; verifies the hash
    /// when `expected` is given. For trusted callers (the path is not
    /// confined: see [`ImageCache::import_confined`]). Blocking: call from a
    /// blocking context.
    pub fn import_file(
        &self,
        path: &Path,
        format: DiskFormat,
        expected: Option<&str>,
    ) -> Result<ImageInfo, ImageError> {
        let f = std::fs::File::open(path).map_err(|source| ImageError::Io {
            what: "open image",
            path: path.to_owned(),
            source,
        })?;
        self.import_open_file(f, format, expected, &path.display().to_string())
    }

    /// [`ImageCache::import_file`] of a caller's path: it must be absolute
    /// and lie under `roots` once resolved, and is opened without following
    /// symlinks ([`crate::paths`]).
    pub fn import_confined(
        &self,
        roots: &crate::paths::Roots,
        path: &Path,
        format: DiskFormat,
        expected: Option<&str>,
    ) -> Result<ImageInfo, ImageError> {
        let (c, fd) = roots.open(path, rustix::fs::OFlags::RDONLY)?;
        let f = std::fs::File::from(fd);
        self.import_open_file(f, format, expected, &c.path().display().to_string())
    }

    /// Imports an open file: a regular file, no larger than
    /// [`MAX_IMAGE_BYTES`] and fitting the cache's free space.
    fn import_open_file(
        &self,
        f: std::fs::File,
        format: DiskFormat,
        expected: Option<&str>,
        source_name: &str,
    ) -> Result<ImageInfo, ImageError> {
        let m = f.metadata().map_err(|source| ImageError::Io {
            what: "stat image",
            path: source_name.into(),
            source,
        })?;
        if !m.is_file() {
            return Err(ImageError::NotRegular(source_name.into()));
        }
        if m.len() > MAX_IMAGE_BYTES {
            return Err(ImageError::TooLarge(source_name.into()));
        }
        self.ensure_fits(m.len(), source_name)?;
        self.import_reader(f, format, expected, source_name)
    }

    /// Bytes free for new files in the cache's file system (`statvfs`:
    /// blocks available to unprivileged users times the fragment size).
    pub fn free_bytes(&self) -> Result<u64, ImageError> {
        let st = rustix::fs::statvfs(&self.dir).map_err(|e| ImageError::Io {
            what: "statvfs",
            path: self.dir.clone(),
            source: e.into(),
        })?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Refuses an image of `need` bytes that does not fit the cache's free
    /// space (checked before any byte is copied).
    pub fn ensure_fits(&self, need: u64, source_name: &str) -> Result<(), ImageError> {
        let free = self.free_bytes()?;
        if need > free {
            return Err(ImageError::NoSpace {
                source_name: source_name.into(),
                need,
                free,
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Imports from any reader (a file, a download).
    pub fn import_reader(
        &self,
        mut r: impl Read,
        format: DiskFormat,
        expected: Option<&str>,
        source_name: &str,
    ) -> Result<ImageInfo, ImageError> {
        let expected = expected
            .map(|e| {
                crate::spec::parse_image_ref(e).ok_or_else(|| ImageError::BadReference(e.into()))
            })
            .transpose()?;
        let mut w = self.writer(source_name)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf).map_err(|source| ImageError::Io {
                what: "read image",
                path: source_name.into(),
                source,
            })?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        w.finish(format, expected.as_deref(), source_name)
    }

    /// Starts an import written piece by piece (see [`ImportWriter`]).
    pub fn writer(&self, source_name: &str) -> Result<ImportWriter, ImageError> {
        let tmp = self.dir.join(format!(
            ".import-{}-{}",
            std::process::id(),
            now_unix_ms() ^ u64::from(rand_u32())
        ));
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| ImageError::Io {
                what: "create",
                path: tmp.clone(),
                source,
            })?;
        Ok(ImportWriter {
            cache: self.clone(),
            tmp,
            file: Some(file),
            hasher: Sha256::new(),
            size: 0,
            source_name: source_name.into(),
        })
    }

    /// Deletes an image that no instance uses (`references` as counted by the
    /// caller).
    pub fn remove(&self, sha256: &str, references: usize) -> Result<(), ImageError> {
        let sha = crate::spec::parse_image_ref(sha256)
            .ok_or_else(|| ImageError::BadReference(sha256.into()))?;
        if references > 0 {
            return Err(ImageError::InUse(sha, references));
        }
        if self.get(&sha).is_none() {
            return Err(ImageError::NotFound(sha));
        }
        for p in [self.meta_path(&sha), self.path_of(&sha)] {
            std::fs::remove_file(&p).map_err(|source| ImageError::Io {
                what: "remove",
                path: p.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_unix_ms());
    h.finish() as u32
}

/// An import in progress: bytes are hashed and written to a temporary file,
/// which becomes the cached image in [`ImportWriter::finish`]; dropped
/// unfinished, the file is removed.
#[derive(Debug)]
pub struct ImportWriter {
    cache: ImageCache,
    tmp: PathBuf,
    file: Option<std::fs::File>,
    hasher: Sha256,
    size: u64,
    source_name: String,
}

impl ImportWriter {
    /// Appends bytes.
    pub fn write(&mut self, data: &[u8]) -> Result<(), ImageError> {
        self.size += data.len() as u64;
        if self.size > MAX_IMAGE_BYTES {
            return Err(ImageError::TooLarge(self.source_name.clone()));
        }
        self.hasher.update(data);
        let f = self.file.as_mut().ok_or_else(|| ImageError::Io {
            what: "write",
            path: self.tmp.clone(),
            source: std::io::Error::other("import already finished"),
        })?;
        f.write_all(data).map_err(|source| ImageError::Io {
            what: "write",
            path: self.tmp.clone(),
            source,
        })
    }

    /// Verifies the hash and moves the image into place, read-only.
    pub fn finish(
        mut self,
        format: DiskFormat,
        expected: Option<&str>,
        source_name: &str,
    ) -> Result<ImageInfo, ImageError> {
        let actual = hex(&std::mem::take(&mut self.hasher).finalize());
        if let Some(exp) = expected {
            if exp != actual {
                return Err(ImageError::HashMismatch {
                    source_name: source_name.into(),
                    expected: exp.into(),
                    actual,
                });
            }
        }
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| ImageError::Io { what, path, source }
        };
        if let Some(f) = self.file.take() {
            f.sync_all().map_err(io("sync", &self.tmp))?;
        }
        check_format(&self.tmp, format, self.size).map_err(|why| ImageError::BadFormat {
            source_name: source_name.into(),
            format,
            why,
        })?;
        let cache = self.cache.clone();
        if let Some(existing) = cache.get(&actual) {
            return Ok(existing); // dropping self removes the temporary copy
        }
        use std::os::unix::fs::PermissionsExt;
        // Read-only to everyone: a jailed VMM opens its base as its own uid
        // (through a read-only bind mount: the cache directory stays 0700).
        std::fs::set_permissions(&self.tmp, std::fs::Permissions::from_mode(0o444))
            .map_err(io("chmod", &self.tmp))?;
        let dest = cache.path_of(&actual);
        std::fs::rename(&self.tmp, &dest).map_err(io("rename into the cache", &dest))?;
        let info = ImageInfo {
            sha256: actual.clone(),
            format,
            size: self.size,
            source: source_name.into(),
            imported_unix_ms: now_unix_ms(),
            references: 0,
        };
        let meta = cache.meta_path(&actual);
        write_json_atomic(&meta, &info).map_err(io("write", &meta))?;
        Ok(info)
    }
}

/// Checks that the file at `path` (`size` bytes) is what `format` says
/// before it is cached: qcow2 and VHD are opened with the `vhd` crate (magic,
/// header, tables; a base naming a backing file is refused, it would be
/// opened by nobody); raw is any non-empty content.
fn check_format(path: &Path, format: DiskFormat, size: u64) -> Result<(), String> {
    if size == 0 {
        return Err("it is empty".into());
    }
    let f = match format {
        DiskFormat::Raw => return Ok(()),
        DiskFormat::Qcow2 => vhd::Format::Qcow2,
        DiskFormat::Vhd => vhd::Format::Vhd,
    };
    vhd::open(path, f, vhd::OpenOptions::read_only())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl Drop for ImportWriter {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha_of(data: &[u8]) -> String {
        hex(&Sha256::digest(data))
    }

    #[test]
    fn import_verify_dedupe_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ImageCache::open(dir.path().join("images")).expect("open");
        let src = dir.path().join("base.raw");
        std::fs::write(&src, b"an OS image").expect("write");
        let want = sha_of(b"an OS image");
        let info = cache
            .import_file(&src, DiskFormat::Raw, Some(&format!("sha256:{want}")))
            .expect("import");
        assert_eq!(info.sha256, want);
        assert_eq!(info.size, 11);
        let p = cache.path_of(&want);
        assert!(std::fs::metadata(&p)
            .expect("meta")
            .permissions()
            .readonly());
        // Again: the same entry, no new files.
        let again = cache
            .import_file(&src, DiskFormat::Raw, None)
            .expect("again");
        assert_eq!(again.sha256, want);
        assert_eq!(cache.list().len(), 1);
        // A wrong hash is refused and leaves nothing behind.
        let e = cache
            .import_file(&src, DiskFormat::Raw, Some(&"00".repeat(32)))
            .expect_err("mismatch");
        assert!(matches!(e, ImageError::HashMismatch { .. }), "{e}");
        let files = std::fs::read_dir(cache.dir()).expect("ls").count();
        assert_eq!(files, 2, "image + metadata only");
        assert!(matches!(cache.remove(&want, 1), Err(ImageError::InUse(..))));
        cache.remove(&want, 0).expect("remove");
        assert!(cache.get(&want).is_none());
        assert!(cache.list().is_empty());
    }
}
