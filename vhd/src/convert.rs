//! Copying an image's contents into a new image of another format.

use crate::error::{err, ErrorKind, Result};
use crate::util::is_zero;
use crate::{create, open, CreateOptions, DiskImage, Format, OpenOptions};
use std::path::Path;

/// Copies every byte `src` reads as into a new standalone image at `dst` (which must not
/// exist). Zero chunks are skipped, so the destination stays sparse. A VHD destination gets
/// the source size rounded up to 512 bytes.
pub fn convert(
    src: &dyn DiskImage,
    dst: &Path,
    format: Format,
    opts: &CreateOptions,
) -> Result<()> {
    let size = src.size();
    if size == 0 {
        return Err(err(
            ErrorKind::InvalidArgument,
            "convert image",
            "the source is empty",
        )
        .with_path(dst));
    }
    let mut o = *opts;
    o.size = size.div_ceil(512) * 512;
    create(dst, format, &o)?;
    let result = (|| {
        let out = open(dst, format, OpenOptions::read_write())?;
        let chunk = 1u64 << 20;
        let mut buf = vec![0u8; chunk as usize];
        let mut off = 0u64;
        while off < size {
            let n = chunk.min(size - off) as usize;
            src.read_at(&mut buf[..n], off)?;
            if !is_zero(&buf[..n]) {
                out.write_at(&buf[..n], off)?;
            }
            off += n as u64;
        }
        out.flush()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(dst);
        return Err(e);
    }
    Ok(())
}
