//! Creating fixed, dynamic and differencing images.

use super::footer::{checksum, vhd_time};
use super::header::{encode_utf16, HEADER_COOKIE, PLAT_W2KU, PLAT_W2RU};
use super::{Footer, VhdDisk, VhdType, DEFAULT_BLOCK_SIZE, MAX_VHD_SIZE, SECTOR};
use crate::error::{err, ErrorKind, IoContext, Result};
use crate::raw::check_create_size;
use crate::util::{put32, put64, write_all};
use crate::BaseRef;
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io::Read;
use std::path::Path;
use std::time::SystemTime;
fn new_unique_id() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .ctx("create vhd image")?;
    // RFC 4122 version 4 layout.
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(id)
}

fn check_vhd_size(size: u64, op: &'static str) -> Result<()> {
    check_create_size(size, op)?;
    if size > MAX_VHD_SIZE {
        return Err(err(
            ErrorKind::InvalidArgument,
            op,
            format!("a VHD holds at most {MAX_VHD_SIZE} bytes"),
        ));
    }
    Ok(())
}

fn create_file(path: &Path, op: &'static str) -> Result<File> {
    FsOpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .ctx_path(op, path)
}

/// Creates a fixed VHD (sparse data, then the footer).
pub fn create_fixed(path: &Path, size: u64) -> Result<()> {
    let op = "create vhd image";
    check_vhd_size(size, op).map_err(|e| e.with_path(path))?;
    let f = create_file(path, op)?;
    let footer = Footer::build(
        VhdType::Fixed,
        size,
        u64::MAX,
        new_unique_id()?,
        vhd_time(SystemTime::now()),
    );
    let r = (|| {
        f.set_len(size).ctx(op)?;
        write_all(&f, &footer, size, op)?;
        f.sync_all().ctx(op)
    })();
    finish_create(path, r)
}

fn finish_create(path: &Path, r: Result<()>) -> Result<()> {
    if let Err(e) = r {
        let _ = std::fs::remove_file(path);
        return Err(e.with_path(path));
    }
    Ok(())
}

struct DynLayout {
    block_size: u32,
    parent: Option<([u8; 16], u32, String)>,
}

fn write_dynamic(f: &File, ty: VhdType, size: u64, l: &DynLayout) -> Result<()> {
    let op = "create vhd image";
    let bs = u64::from(l.block_size);
    let entries = size.div_ceil(bs);
    let bat_off = 1536u64;
    let bat_bytes = (entries * 4).div_ceil(SECTOR) * SECTOR;
    let mut pos = bat_off + bat_bytes;
    let mut h = [0u8; 1024];
    h[0..8].copy_from_slice(HEADER_COOKIE);
    put64(&mut h, 8, u64::MAX);
    put64(&mut h, 16, bat_off);
    put32(&mut h, 24, 0x0001_0000);
    put32(&mut h, 28, entries as u32);
    put32(&mut h, 32, l.block_size);
    let mut locator_data: Vec<(u64, Vec<u8>)> = Vec::new();
    if let Some((id, ts, name)) = &l.parent {
        h[40..56].copy_from_slice(id);
        put32(&mut h, 56, *ts);
        let uname = encode_utf16(name, true);
        let n = uname.len().min(512);
        h[64..64 + n].copy_from_slice(&uname[..n]);
        // One locator: relative names as W2ru (".\\name"), absolute ones as W2ku.
        let absolute = name.starts_with('/') || name.contains(":\\");
        let (code, text) = if absolute {
            (PLAT_W2KU, name.clone())
        } else {
            (PLAT_W2RU, format!(".\\{}", name.replace('/', "\\")))
        };
        let data = encode_utf16(&text, false);
        let space_sectors = (data.len() as u64).div_ceil(SECTOR).max(1);
        let e = &mut h[576..600];
        put32(e, 0, code);
        put32(e, 4, space_sectors as u32);
        put32(e, 8, data.len() as u32);
        put64(e, 16, pos);
        locator_data.push((pos, data));
        pos += space_sectors * SECTOR;
    }
    let c = checksum(&h, 36..40);
    put32(&mut h, 36, c);
    let footer = Footer::build(ty, size, 512, new_unique_id()?, vhd_time(SystemTime::now()));
    write_all(f, &footer, 0, op)?;
    write_all(f, &h, 512, op)?;
    write_all(f, &vec![0xffu8; bat_bytes as usize], bat_off, op)?;
    for (off, data) in &locator_data {
        write_all(f, data, *off, op)?;
    }
    write_all(f, &footer, pos, op)?;
    f.sync_all().ctx(op)
}

/// Creates a dynamic VHD.
pub fn create_dynamic(path: &Path, size: u64, block_size: Option<u32>) -> Result<()> {
    let op = "create vhd image";
    check_vhd_size(size, op).map_err(|e| e.with_path(path))?;
    let bs = block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    if !bs.is_power_of_two() || !(4096..=(256 << 20)).contains(&bs) {
        return Err(err(
            ErrorKind::InvalidArgument,
            op,
            "block size must be a power of two from 4 KiB to 256 MiB",
        )
        .with_path(path));
    }
    let f = create_file(path, op)?;
    let r = write_dynamic(
        &f,
        VhdType::Dynamic,
        size,
        &DynLayout {
            block_size: bs,
            parent: None,
        },
    );
    finish_create(path, r)
}

/// Creates a differencing VHD over `base` (a VHD opened read-only), recording the base's
/// unique ID and footer timestamp.
pub fn create_differencing(path: &Path, base: &BaseRef, size: u64) -> Result<()> {
    let op = "create differencing vhd image";
    check_vhd_size(size, op).map_err(|e| e.with_path(path))?;
    let Some(parent) = base.image.as_any().downcast_ref::<VhdDisk>() else {
        return Err(err(
            ErrorKind::Unsupported,
            op,
            format!(
                "a differencing VHD needs a VHD parent, not {}; convert the base to vhd first",
                base.image.format()
            ),
        )
        .with_path(path));
    };
    if !parent.read_only {
        return Err(
            err(ErrorKind::InvalidArgument, op, "open the parent read-only").with_path(path),
        );
    }
    if base.name.is_empty() || base.name.encode_utf16().count() > 255 {
        return Err(err(
            ErrorKind::InvalidArgument,
            op,
            "the parent name must be 1 to 255 characters",
        )
        .with_path(path));
    }
    let f = create_file(path, op)?;
    let layout = DynLayout {
        block_size: DEFAULT_BLOCK_SIZE,
        parent: Some((
            parent.footer.unique_id,
            parent.footer.timestamp,
            base.name.clone(),
        )),
    };
    let r = write_dynamic(&f, VhdType::Differencing, size, &layout);
    finish_create(path, r)
}
