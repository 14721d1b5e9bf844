//! Microsoft VHD (in progress).
use crate::error::{err, ErrorKind, Result};
use crate::{BaseRef, DiskImage, Format, OpenOptions};
use std::path::Path;

/// A VHD image.
#[derive(Debug)]
pub struct VhdDisk;

impl VhdDisk {
    /// Opens a VHD.
    pub fn open(_path: &Path, _opts: OpenOptions) -> Result<Self> {
        Err(err(ErrorKind::Unsupported, "open vhd", "not yet"))
    }
}
impl DiskImage for VhdDisk {
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn discard(&self, _o: u64, _l: u64) -> Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _o: u64, _l: u64) -> Result<()> {
        Ok(())
    }
    fn size(&self) -> u64 {
        0
    }
    fn read_only(&self) -> bool {
        true
    }
    fn format(&self) -> Format {
        Format::Vhd
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
/// Creates.
pub fn create_fixed(_p: &Path, _s: u64) -> Result<()> {
    Err(err(ErrorKind::Unsupported, "x", "not yet"))
}
/// Creates.
pub fn create_dynamic(_p: &Path, _s: u64, _b: Option<u32>) -> Result<()> {
    Err(err(ErrorKind::Unsupported, "x", "not yet"))
}
/// Creates.
pub fn create_differencing(_p: &Path, _b: &BaseRef, _s: u64) -> Result<()> {
    Err(err(ErrorKind::Unsupported, "x", "not yet"))
}
