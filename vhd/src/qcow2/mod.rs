//! qcow2 through `imago` (synchronous build), with our own header validation and the
//! crash-safe L2 preallocation of [`meta::preallocate_l2_tables`].

pub mod meta;

use crate::error::{err, DiskError, ErrorKind, IoContext, Result};
use crate::raw::{check_create_size, RawDisk};
use crate::util::{check_bounds, check_writable, lock_writable, WriteLock, ZERO_CHUNK};
use crate::{BaseRef, DiskImage, Format, OpenOptions};
use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder};
use std::any::Any;
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use meta::Header;

type Layer = Arc<FormatAccess<ImagoFile>>;
type Q2 = Qcow2<ImagoFile, Layer>;

/// A qcow2 image, possibly an overlay over a base handed in by the caller.
pub struct Qcow2Disk {
    access: RwLock<Layer>,
    path: PathBuf,
    size: u64,
    read_only: bool,
    header: Header,
    /// Keeps the base alive for as long as the overlay.
    _backing: Option<Arc<dyn DiskImage>>,
    /// Held while open writable (declared last: released after imago closes the file).
    _lock: Option<WriteLock>,
}

impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// The imago layer of a base image handed in as backing.
fn backing_layer(b: &Arc<dyn DiskImage>) -> Result<Layer> {
    let op = "attach backing image";
    if !b.read_only() {
        return Err(err(
            ErrorKind::InvalidArgument,
            op,
            "the base image must be opened read-only (it is shared by overlays)",
        ));
    }
    if let Some(q) = b.as_any().downcast_ref::<Qcow2Disk>() {
        return Ok(Arc::clone(
            &*q.access.read().unwrap_or_else(|e| e.into_inner()),
        ));
    }
    if let Some(r) = b.as_any().downcast_ref::<RawDisk>() {
        return r.imago_layer();
    }
    Err(err(
        ErrorKind::Unsupported,
        op,
        format!(
            "a qcow2 overlay can only sit on a raw or qcow2 base, not {}; convert the base first",
            b.format()
        ),
    ))
}

fn io_op<'a>(
    op: &'static str,
    path: &'a Path,
    offset: u64,
) -> impl FnOnce(io::Error) -> DiskError + 'a {
    move |e| DiskError::io(op, e).with_path(path).at(offset)
}

impl Qcow2Disk {
    /// Opens a qcow2 image. If the image records a backing file, `opts.backing` must carry
    /// the base (opened read-only); the recorded name is never followed.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Self> {
        let op = "open qcow2 image";
        let lock = (!opts.read_only)
            .then(|| lock_writable(path, op))
            .transpose()?;
        let file = FsOpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .ctx_path(op, path)?;
        let header = meta::read_header(&file).map_err(|e| e.with_path(path))?;
        meta::check_supported_features(&header).map_err(|e| e.with_path(path))?;
        if header.incompatible & meta::INCOMPAT_DATA_FILE != 0 {
            return Err(err(
                ErrorKind::Unsupported,
                op,
                "images with an external data file are not supported; convert the image",
            )
            .with_path(path));
        }
        match (&header.backing_file, &opts.backing) {
            (Some(name), None) => {
                return Err(err(
                    ErrorKind::BackingRequired,
                    op,
                    format!(
                        "the image is an overlay over {name:?}; open that base read-only and \
                         hand it in as the backing image (it is never opened implicitly)"
                    ),
                )
                .with_path(path))
            }
            (None, Some(_)) => {
                return Err(err(
                    ErrorKind::BackingMismatch,
                    op,
                    "the image has no backing file, but a base was handed in; open it without one",
                )
                .with_path(path))
            }
            _ => {}
        }
        let backing = match &opts.backing {
            Some(b) => {
                if let Some(fmt) = &header.backing_format {
                    let want = fmt.as_str();
                    let have = b.format().qemu_name();
                    let ok = want == have || (want == "file" && have == "raw");
                    if !ok {
                        return Err(err(
                            ErrorKind::BackingMismatch,
                            op,
                            format!(
                                "the image records a {want} backing file but the base handed in is \
                                 {have}; hand in the right base"
                            ),
                        )
                        .with_path(path));
                    }
                }
                Some(backing_layer(b).map_err(|e| e.with_path(path))?)
            }
            None => None,
        };
        if !opts.read_only {
            meta::check_writable_features(&header).map_err(|e| e.with_path(path))?;
            meta::check_metadata_refcounts(&file, &header).map_err(|e| e.with_path(path))?;
            meta::preallocate_l2_tables(&file, &header).map_err(|e| e.with_path(path))?;
        }
        let header = meta::read_header(&file).map_err(|e| e.with_path(path))?;
        let storage = ImagoFile::try_from(file).ctx_path(op, path)?;
        let q: Q2 = Qcow2::builder(storage)
            .backing(backing)
            .data_file(None)
            .write(!opts.read_only)
            .open(DenyImplicitOpenGate::default())
            .ctx_path(op, path)?;
        let access = FormatAccess::new(q);
        Ok(Qcow2Disk {
            size: access.size(),
            access: RwLock::new(Arc::new(access)),
            path: path.to_path_buf(),
            read_only: opts.read_only,
            header,
            _backing: opts.backing,
            _lock: lock,
        })
    }

    /// The header as read at open time.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn layer(&self) -> Layer {
        Arc::clone(&*self.access.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn zero_by_writing(
        &self,
        layer: &FormatAccess<ImagoFile>,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let chunk = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            layer.write(&chunk[..n], offset + done).map_err(io_op(
                "write zeroes",
                &self.path,
                offset + done,
            ))?;
            done += n as u64;
        }
        Ok(())
    }
}

impl DiskImage for Qcow2Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let op = "read";
        check_bounds(offset, buf.len() as u64, self.size, op)
            .map_err(|e| e.with_path(&self.path))?;
        self.layer()
            .read(buf, offset)
            .map_err(io_op(op, &self.path, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let op = "write";
        check_writable(self.read_only, op).map_err(|e| e.with_path(&self.path))?;
        check_bounds(offset, buf.len() as u64, self.size, op)
            .map_err(|e| e.with_path(&self.path))?;
        self.layer()
            .write(buf, offset)
            .map_err(io_op(op, &self.path, offset))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let l = self.layer();
        l.flush().map_err(io_op("flush", &self.path, 0))?;
        l.sync().map_err(io_op("flush", &self.path, 0))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let op = "discard";
        check_writable(self.read_only, op).map_err(|e| e.with_path(&self.path))?;
        check_bounds(offset, len, self.size, op).map_err(|e| e.with_path(&self.path))?;
        if len == 0 {
            return Ok(());
        }
        let mut guard = self.access.write().unwrap_or_else(|e| e.into_inner());
        match Arc::get_mut(&mut guard) {
            Some(fa) => match fa.discard_to_zero(offset, len) {
                Ok(()) => Ok(()),
                // qcow2 v2 has no zero clusters: zero the range by writing.
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    drop(guard);
                    let l = self.layer();
                    self.write_zeroes_on(&l, offset, len)
                }
                Err(e) => Err(io_op(op, &self.path, offset)(e)),
            },
            None => {
                let l = Arc::clone(&guard);
                drop(guard);
                self.write_zeroes_on(&l, offset, len)
            }
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let op = "write zeroes";
        check_writable(self.read_only, op).map_err(|e| e.with_path(&self.path))?;
        check_bounds(offset, len, self.size, op).map_err(|e| e.with_path(&self.path))?;
        if len == 0 {
            return Ok(());
        }
        let l = self.layer();
        self.write_zeroes_on(&l, offset, len)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Qcow2Disk {
    fn write_zeroes_on(&self, l: &FormatAccess<ImagoFile>, offset: u64, len: u64) -> Result<()> {
        match l.write_zeroes(offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                self.zero_by_writing(l, offset, len)
            }
            Err(e) => Err(io_op("write zeroes", &self.path, offset)(e)),
        }
    }
}

/// Creates a qcow2 v3 image (an overlay when `base` is given); fails if `path` exists.
/// All L2 tables are laid out at creation (sparse), see [`meta::preallocate_l2_tables`].
pub fn create(
    path: &Path,
    size: u64,
    cluster_size: Option<u32>,
    base: Option<&BaseRef>,
) -> Result<()> {
    let op = "create qcow2 image";
    check_create_size(size, op).map_err(|e| e.with_path(path))?;
    let cs = cluster_size.unwrap_or(65536);
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(err(
            ErrorKind::InvalidArgument,
            op,
            format!("cluster size {cs} must be a power of two from 512 to 2 MiB"),
        )
        .with_path(path));
    }
    if let Some(b) = base {
        // Validate now that an overlay could be opened over it.
        backing_layer(&b.image).map_err(|e| e.with_path(path))?;
        if b.name.is_empty() || b.name.len() > 1023 {
            return Err(err(
                ErrorKind::InvalidArgument,
                op,
                "the base name recorded in the overlay must be 1 to 1023 bytes",
            )
            .with_path(path));
        }
    }
    let f = FsOpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .ctx_path(op, path)?;
    let result = (|| -> Result<()> {
        let storage = ImagoFile::try_from(f.try_clone().ctx(op)?).ctx(op)?;
        let mut b = Qcow2::<ImagoFile, Layer>::create_builder(storage)
            .size(size)
            .cluster_size(cs as usize);
        if let Some(base) = base {
            b = b.backing(
                base.name.clone(),
                base.image.format().qemu_name().to_string(),
            );
        }
        b.create().ctx(op)?;
        let h = meta::read_header(&f)?;
        meta::preallocate_l2_tables(&f, &h)?;
        f.sync_all().ctx(op)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(path);
        return Err(e.with_path(path));
    }
    Ok(())
}

/// Reads the header of a qcow2 file (for `info`), validating it.
pub fn read_header_path(path: &Path) -> Result<Header> {
    let f = File::open(path).ctx_path("read qcow2 header", path)?;
    meta::read_header(&f).map_err(|e| e.with_path(path))
}
