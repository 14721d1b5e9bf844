//! Reads and writes: the BAT lookup, sector bitmaps, the parent's data for unset bits, and
//! block allocation in its crash-safe order (see the module map in `mod.rs`).

use super::header::block_bitmap_bytes;
use super::{VhdDisk, VhdType, WriteState, SECTOR, UNUSED};
use crate::error::{err, DiskError, ErrorKind, IoContext, Result};
use crate::util::{check_bounds, check_writable, put32};
use crate::{DiskImage, Format};
use std::any::Any;
use std::os::unix::fs::FileExt;

impl VhdDisk {
    fn block_size(&self) -> u64 {
        self.header.as_ref().map_or(0, |h| u64::from(h.block_size))
    }

    fn bitmap_bytes(&self) -> u64 {
        self.header
            .as_ref()
            .map_or(0, |h| block_bitmap_bytes(h.block_size))
    }

    fn bat_entry(&self, block: u64) -> u32 {
        self.bat
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(block as usize)
            .copied()
            .unwrap_or(UNUSED)
    }

    fn read_bitmap(&self, block_start: u64) -> Result<Vec<u8>> {
        let mut bm = vec![0u8; self.bitmap_bytes() as usize];
        self.file
            .read_exact_at(&mut bm, block_start)
            .map_err(|e| DiskError::io("read vhd block bitmap", e).at(block_start))?;
        Ok(bm)
    }

    fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.parent {
            None => {
                buf.fill(0);
                Ok(())
            }
            Some(p) => {
                let psize = p.size();
                let end = offset + buf.len() as u64;
                if offset >= psize {
                    buf.fill(0);
                    return Ok(());
                }
                let inside = (psize.min(end) - offset) as usize;
                let (a, b) = buf.split_at_mut(inside);
                p.read_at(a, offset)?;
                b.fill(0);
                Ok(())
            }
        }
    }

    /// Reads within one block.
    fn read_in_block(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let bs = self.block_size();
        let block = offset / bs;
        let entry = self.bat_entry(block);
        if entry == UNUSED {
            return if self.footer.disk_type == VhdType::Differencing {
                self.read_parent(buf, offset)
            } else {
                buf.fill(0);
                Ok(())
            };
        }
        let start = u64::from(entry) * SECTOR;
        let data = start + self.bitmap_bytes();
        let bm = self.read_bitmap(start)?;
        let in_block = offset % bs;
        let mut pos = 0usize;
        while pos < buf.len() {
            let o = in_block + pos as u64;
            let sec = o / SECTOR;
            let present = bm
                .get((sec / 8) as usize)
                .is_some_and(|b| b & (0x80 >> (sec % 8)) != 0);
            // Extend the run while sectors have the same state.
            let mut end = ((sec + 1) * SECTOR - in_block) as usize;
            while end < buf.len() {
                let s2 = (in_block + end as u64) / SECTOR;
                let p2 = bm
                    .get((s2 / 8) as usize)
                    .is_some_and(|b| b & (0x80 >> (s2 % 8)) != 0);
                if p2 != present {
                    break;
                }
                end += SECTOR as usize;
            }
            let end = end.min(buf.len());
            let part = &mut buf[pos..end];
            if present {
                self.file
                    .read_exact_at(part, data + o)
                    .map_err(|e| DiskError::io("read", e).at(data + o))?;
            } else if self.footer.disk_type == VhdType::Differencing {
                self.read_parent(part, block * bs + o)?;
            } else {
                part.fill(0);
            }
            pos = end;
        }
        Ok(())
    }

    /// Allocates `block` (under the write lock) and returns its start offset.
    fn allocate_block(&self, ws: &mut WriteState, block: u64) -> Result<u64> {
        let op = "allocate vhd block";
        let bs = self.block_size();
        let bmb = self.bitmap_bytes();
        let start = ws.footer_pos;
        let sector = start / SECTOR;
        let entry = u32::try_from(sector)
            .ok()
            .filter(|&s| s != UNUSED)
            .ok_or_else(|| {
                err(
                    ErrorKind::TooLarge,
                    op,
                    "the VHD file would grow past what its BAT can address",
                )
            })?;
        let new_footer_pos = start + bmb + bs;
        // 1. Footer past the new block: the file's last sector stays a valid footer. It must be
        //    durable before the bitmap overwrites the old footer: after a power loss the
        //    bitmap alone could otherwise be the file's last sector (no footer at all).
        self.pwrite(&self.footer.raw, new_footer_pos)
            .map_err(|e| DiskError::io(op, e).at(new_footer_pos))?;
        self.fdatasync().ctx(op)?;
        // 2. Bitmap: all set for dynamic disks (the block's zeros are its data), all clear for
        //    differencing disks (sectors come from the parent until written). The data area
        //    stays a sparse hole that reads as zeros.
        let fill = if self.footer.disk_type == VhdType::Differencing {
            0
        } else {
            0xff
        };
        let mut bm = vec![0u8; bmb as usize];
        let sectors = bs / SECTOR;
        for s in 0..sectors {
            if fill == 0xff {
                bm[(s / 8) as usize] |= 0x80 >> (s % 8);
            }
        }
        self.pwrite(&bm, start)
            .map_err(|e| DiskError::io(op, e).at(start))?;
        // (The bitmap, at least one sector, overwrites the old footer at `start`.)
        self.fdatasync().ctx(op)?;
        // 3. Commit: the BAT entry.
        let hdr = self
            .header
            .as_ref()
            .ok_or_else(|| err(ErrorKind::Corrupt, op, "no dynamic header"))?;
        let mut e = [0u8; 4];
        put32(&mut e, 0, entry);
        let at = hdr.table_offset + block * 4;
        self.pwrite(&e, at)
            .map_err(|e| DiskError::io(op, e).at(at))?;
        if let Some(slot) = self
            .bat
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(block as usize)
        {
            *slot = entry;
        }
        ws.footer_pos = new_footer_pos;
        Ok(start)
    }

    /// Writes within one block, sector-aligned (`offset` and `buf.len()` multiples of 512).
    fn write_sectors_in_block(&self, ws: &mut WriteState, buf: &[u8], offset: u64) -> Result<()> {
        let bs = self.block_size();
        let block = offset / bs;
        let entry = self.bat_entry(block);
        let start = if entry == UNUSED {
            self.allocate_block(ws, block)?
        } else {
            u64::from(entry) * SECTOR
        };
        let data = start + self.bitmap_bytes();
        let in_block = offset % bs;
        self.pwrite(buf, data + in_block)
            .map_err(|e| DiskError::io("write", e).at(offset))?;
        if self.footer.disk_type == VhdType::Differencing {
            let mut bm = self.read_bitmap(start)?;
            let first = in_block / SECTOR;
            let n = buf.len() as u64 / SECTOR;
            let mut changed = false;
            for s in first..first + n {
                if let Some(b) = bm.get_mut((s / 8) as usize) {
                    let bit = 0x80 >> (s % 8);
                    if *b & bit == 0 {
                        *b |= bit;
                        changed = true;
                    }
                }
            }
            if changed {
                // Data before the bit: a crash in between leaves the parent's data visible.
                let lo = (first / 8) as usize;
                let hi = (((first + n - 1) / 8) as usize + 1).min(bm.len());
                let at = start + lo as u64;
                self.pwrite(&bm[lo..hi], at)
                    .map_err(|e| DiskError::io("write vhd block bitmap", e).at(at))?;
            }
        }
        Ok(())
    }

    fn write_locked(&self, ws: &mut WriteState, buf: &[u8], offset: u64) -> Result<()> {
        if self.footer.disk_type == VhdType::Fixed {
            return self
                .pwrite(buf, offset)
                .map_err(|e| DiskError::io("write", e).at(offset));
        }
        let bs = self.block_size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let o = offset + pos as u64;
            let sec_start = o / SECTOR * SECTOR;
            let head = (o - sec_start) as usize;
            if head != 0 || buf.len() - pos < SECTOR as usize {
                // Partial sector: read-modify-write the whole sector.
                let mut sec = [0u8; SECTOR as usize];
                self.read_in_block(&mut sec, sec_start)?;
                let n = (SECTOR as usize - head).min(buf.len() - pos);
                sec[head..head + n].copy_from_slice(&buf[pos..pos + n]);
                self.write_sectors_in_block(ws, &sec, sec_start)?;
                pos += n;
                continue;
            }
            let block_end = (o / bs + 1) * bs;
            let full = ((buf.len() - pos) as u64 / SECTOR * SECTOR).min(block_end - o) as usize;
            self.write_sectors_in_block(ws, &buf[pos..pos + full], o)?;
            pos += full;
        }
        Ok(())
    }
}

impl DiskImage for VhdDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let op = "read";
        let size = self.footer.current_size;
        check_bounds(offset, buf.len() as u64, size, op).map_err(|e| self.fail(e, offset))?;
        if self.footer.disk_type == VhdType::Fixed {
            return self
                .file
                .read_exact_at(buf, offset)
                .map_err(|e| self.fail(DiskError::io(op, e), offset));
        }
        let bs = self.block_size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let o = offset + pos as u64;
            let n = ((bs - o % bs) as usize).min(buf.len() - pos);
            self.read_in_block(&mut buf[pos..pos + n], o)
                .map_err(|e| self.fail(e, o))?;
            pos += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let op = "write";
        check_writable(self.read_only, op).map_err(|e| self.fail(e, offset))?;
        check_bounds(offset, buf.len() as u64, self.footer.current_size, op)
            .map_err(|e| self.fail(e, offset))?;
        let mut ws = self.wstate.lock().unwrap_or_else(|e| e.into_inner());
        self.write_locked(&mut ws, buf, offset)
            .map_err(|e| self.fail(e, offset))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.fdatasync().ctx_path("flush", &self.path)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // VHD cannot give space back; the promise is "reads as zeros".
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let op = "write zeroes";
        check_writable(self.read_only, op).map_err(|e| self.fail(e, offset))?;
        check_bounds(offset, len, self.footer.current_size, op)
            .map_err(|e| self.fail(e, offset))?;
        let mut ws = self.wstate.lock().unwrap_or_else(|e| e.into_inner());
        let bs = if self.footer.disk_type == VhdType::Fixed {
            1 << 20
        } else {
            self.block_size()
        };
        let parent_size = self.parent.as_ref().map_or(0, |p| p.size());
        // At most 1 MiB of zeros at a time, whatever the block size (up to 256 MiB).
        let zeros = vec![0u8; bs.min(1 << 20) as usize];
        let mut o = offset;
        let end = offset + len;
        while o < end {
            let n = (bs - o % bs).min(end - o);
            let unallocated =
                self.footer.disk_type != VhdType::Fixed && self.bat_entry(o / bs) == UNUSED;
            // An unallocated block already reads as zeros unless a parent shows through.
            let skip =
                unallocated && (self.footer.disk_type == VhdType::Dynamic || o >= parent_size);
            if !skip {
                let mut p = o;
                while p < o + n {
                    let m = (o + n - p).min(zeros.len() as u64);
                    self.write_locked(&mut ws, &zeros[..m as usize], p)
                        .map_err(|e| self.fail(e, p))?;
                    p += m;
                }
            }
            o += n;
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.footer.current_size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn format(&self) -> Format {
        Format::Vhd
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
