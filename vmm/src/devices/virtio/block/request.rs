//! One virtio-blk request: header, data buffers, status byte.
//!
//! The chain comes from the guest: every length and address is checked, the
//! header is copied out of guest memory once and then validated, data moves
//! through a bounded bounce buffer, and every failure becomes a status the guest
//! sees (never a host panic).

use virtio_queue::{desc::split::Descriptor, DescriptorChain};
use vm_memory::{Bytes, GuestMemory};

use vhd::{DiskImage, ErrorKind};

use crate::devices::virtio::{chain_descriptors, MAX_CHAIN_DESCRIPTORS};

/// Request types.
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_T_DISCARD: u32 = 11;
const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// Statuses.
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Largest data transfer of one request; larger ones fail with an I/O error.
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// Length of the disk's serial (GET_ID).
pub const SERIAL_LEN: usize = 20;
/// Most discard / write-zeroes segments in one request.
pub const MAX_DISCARD_SEGMENTS: u32 = 1;
/// Longest discard / write-zeroes range, in sectors, as advertised in the
/// config space (`max_discard_sectors`, `max_write_zeroes_sectors`) and
/// enforced: one request cannot keep the I/O thread busy for long.
pub const MAX_DISCARD_SECTORS: u32 = (64 << 20) / 512;

/// Why a request failed (sent to the guest as a status; logged, rate limited).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain is malformed (missing header or status, wrong directions).
    #[error("malformed descriptor chain: {0}")]
    Malformed(&'static str),
    /// The request reaches past the end of the disk or overflows.
    #[error("request out of the disk's range (sector {sector}, {len} bytes)")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The request moves more data than [`MAX_REQUEST_BYTES`].
    #[error("request too large ({0} bytes)")]
    TooLarge(u64),
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The request type is not supported.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Guest memory could not be accessed.
    #[error("guest memory access failed at {0:#x}")]
    Memory(u64),
    /// The disk failed.
    #[error("disk error: {0}")]
    Disk(String),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

fn disk_err(e: vhd::DiskError) -> RequestError {
    if e.kind() == ErrorKind::Unsupported {
        RequestError::Unsupported(u32::MAX)
    } else {
        RequestError::Disk(e.to_string())
    }
}

/// The disk a request runs against.
pub struct Target<'a> {
    /// The image.
    pub disk: &'a dyn DiskImage,
    /// Whether the guest may write.
    pub read_only: bool,
    /// The GET_ID answer, NUL padded.
    pub serial: &'a [u8; SERIAL_LEN],
}

/// Processes one chain: returns the number of bytes written into guest memory
/// (for the used ring) and the error, if any, that the status byte reported.
/// A chain without a writable status byte gets no status and a used length of 0.
pub fn process_chain<M>(
    chain: DescriptorChain<M>,
    target: &Target<'_>,
) -> (u32, Option<RequestError>)
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    // At most MAX_CHAIN_DESCRIPTORS are read (an indirect table could hold 65 535).
    let Some(descs) = chain_descriptors(&chain, MAX_CHAIN_DESCRIPTORS) else {
        return (0, Some(RequestError::Malformed("too many descriptors")));
    };
    let mem = chain.memory();
    let Some((status_desc, rest)) = descs.split_last() else {
        return (0, Some(RequestError::Malformed("empty chain")));
    };
    if !status_desc.is_write_only() || status_desc.len() < 1 {
        return (0, Some(RequestError::Malformed("no writable status byte")));
    }
    let (result, written) = match execute(mem, rest, target) {
        Ok(n) => (None, n),
        Err(e) => (Some(e), 0),
    };
    let status = result
        .as_ref()
        .map_or(VIRTIO_BLK_S_OK, RequestError::status);
    if mem.write_obj(status, status_desc.addr()).is_err() {
        return (0, Some(RequestError::Memory(status_desc.addr().0)));
    }
    (written.saturating_add(1), result)
}

fn execute<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
    target: &Target<'_>,
) -> Result<u32, RequestError> {
    let (header, data) = descs
        .split_first()
        .ok_or(RequestError::Malformed("no header"))?;
    if header.is_write_only() || header.len() < 16 {
        return Err(RequestError::Malformed(
            "header must be a readable 16-byte buffer",
        ));
    }
    let mut hdr = [0u8; 16];
    mem.read_slice(&mut hdr, header.addr())
        .map_err(|_| RequestError::Memory(header.addr().0))?;
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);

    let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
    match kind {
        VIRTIO_BLK_T_IN => {
            if data.iter().any(|d| !d.is_write_only()) {
                return Err(RequestError::Malformed(
                    "read into a device-readable buffer",
                ));
            }
            let offset = range_check(sector, total, target.disk.size())?;
            let mut buf = vec![0u8; total as usize];
            target.disk.read_at(&mut buf, offset).map_err(disk_err)?;
            let mut done = 0usize;
            for d in data {
                let n = d.len() as usize;
                mem.write_slice(&buf[done..done + n], d.addr())
                    .map_err(|_| RequestError::Memory(d.addr().0))?;
                done += n;
            }
            Ok(total as u32)
        }
        VIRTIO_BLK_T_OUT => {
            if target.read_only {
                return Err(RequestError::ReadOnly);
            }
            if data.iter().any(|d| d.is_write_only()) {
                return Err(RequestError::Malformed(
                    "write from a device-writable buffer",
                ));
            }
            let offset = range_check(sector, total, target.disk.size())?;
            let buf = gather(mem, data, total)?;
            target.disk.write_at(&buf, offset).map_err(disk_err)?;
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            target.disk.flush().map_err(disk_err)?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let d = data
                .first()
                .filter(|d| d.is_write_only())
                .ok_or(RequestError::Malformed("GET_ID needs a writable buffer"))?;
            let n = (d.len() as usize).min(SERIAL_LEN);
            mem.write_slice(&target.serial[..n], d.addr())
                .map_err(|_| RequestError::Memory(d.addr().0))?;
            Ok(n as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if target.read_only {
                return Err(RequestError::ReadOnly);
            }
            if data.iter().any(|d| d.is_write_only()) || !total.is_multiple_of(16) || total == 0 {
                return Err(RequestError::Malformed(
                    "discard segments must be readable 16-byte records",
                ));
            }
            if total / 16 > u64::from(MAX_DISCARD_SEGMENTS) {
                return Err(RequestError::TooLarge(total));
            }
            let segs = gather(mem, data, total)?;
            for seg in segs.chunks_exact(16) {
                let s = u64::from_le_bytes(
                    seg[0..8]
                        .try_into()
                        .map_err(|_| RequestError::Malformed("segment"))?,
                );
                let n = u32::from_le_bytes(
                    seg[8..12]
                        .try_into()
                        .map_err(|_| RequestError::Malformed("segment"))?,
                );
                if n > MAX_DISCARD_SECTORS {
                    return Err(RequestError::TooLarge(u64::from(n) * SECTOR));
                }
                let len = u64::from(n) * SECTOR;
                let offset = s
                    .checked_mul(SECTOR)
                    .filter(|o| {
                        o.checked_add(len)
                            .is_some_and(|end| end <= target.disk.size())
                    })
                    .ok_or(RequestError::OutOfRange { sector: s, len })?;
                if kind == VIRTIO_BLK_T_DISCARD {
                    target.disk.discard(offset, len).map_err(disk_err)?;
                } else {
                    target.disk.write_zeroes(offset, len).map_err(disk_err)?;
                }
            }
            Ok(0)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Checks that `len` bytes from `sector` fit the disk and the request limit.
fn range_check(sector: u64, len: u64, disk_size: u64) -> Result<u64, RequestError> {
    if len > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge(len));
    }
    sector
        .checked_mul(SECTOR)
        .filter(|o| o.checked_add(len).is_some_and(|end| end <= disk_size))
        .ok_or(RequestError::OutOfRange { sector, len })
}

fn gather<M: GuestMemory + ?Sized>(
    mem: &M,
    data: &[Descriptor],
    total: u64,
) -> Result<Vec<u8>, RequestError> {
    if total > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge(total));
    }
    let mut buf = vec![0u8; total as usize];
    let mut done = 0usize;
    for d in data {
        let n = d.len() as usize;
        mem.read_slice(&mut buf[done..done + n], d.addr())
            .map_err(|_| RequestError::Memory(d.addr().0))?;
        done += n;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn status_at<M: GuestMemory>(mem: &M, addr: GuestAddress) -> u8 {
        mem.read_obj(addr).unwrap_or(0xff)
    }

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    /// An in-memory disk.
    #[derive(Debug)]
    struct MemDisk(Mutex<Vec<u8>>);

    impl DiskImage for MemDisk {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> vhd::Result<()> {
            let d = self.0.lock().expect("lock");
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> vhd::Result<()> {
            let mut d = self.0.lock().expect("lock");
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> vhd::Result<()> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> vhd::Result<()> {
            self.write_zeroes(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> vhd::Result<()> {
            let mut d = self.0.lock().expect("lock");
            d[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn size(&self) -> u64 {
            self.0.lock().expect("lock").len() as u64
        }
        fn read_only(&self) -> bool {
            false
        }
        fn format(&self) -> vhd::Format {
            vhd::Format::Raw
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    const SERIAL: [u8; SERIAL_LEN] = *b"reddog-os-disk\0\0\0\0\0\0";

    struct Setup {
        mem: GuestMemoryMmap,
        disk: MemDisk,
    }

    impl Setup {
        fn new() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("mem");
            let disk = MemDisk(Mutex::new(
                (0..64 * 1024).map(|i| (i % 251) as u8).collect(),
            ));
            Self { mem, disk }
        }

        fn header(&self, kind: u32, sector: u64) -> GuestAddress {
            let a = GuestAddress(0x10_0000);
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, a).expect("header");
            a
        }

        /// Runs a chain of (addr, len, flags) descriptors; returns (used len, error, status).
        fn run(
            &self,
            descs: &[(u64, u32, u16)],
            read_only: bool,
        ) -> (u32, Option<RequestError>, u8) {
            let q = MockSplitQueue::new(&self.mem, 16);
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, (addr, len, flags))| {
                    let next = if i + 1 < descs.len() {
                        (i + 1) as u16
                    } else {
                        0
                    };
                    let flags = if i + 1 < descs.len() {
                        flags | F_NEXT
                    } else {
                        *flags
                    };
                    RawDescriptor::from(SplitDescriptor::new(*addr, *len, flags, next))
                })
                .collect();
            q.build_desc_chain(&raw).expect("chain");
            let mut queue: Queue = q.create_queue().expect("queue");
            let chain = queue.pop_descriptor_chain(&self.mem).expect("a chain");
            let target = Target {
                disk: &self.disk,
                read_only,
                serial: &SERIAL,
            };
            let (used, err) = process_chain(chain, &target);
            let status = descs
                .last()
                .map_or(0xff, |d| status_at(&self.mem, GuestAddress(d.0)));
            (used, err, status)
        }
    }

    const DATA: u64 = 0x20_0000;
    const DATA2: u64 = 0x30_0000;
    const STATUS: u64 = 0x40_0000;

    #[test]
    fn read_spanning_two_buffers() {
        let s = Setup::new();
        let h = s.header(VIRTIO_BLK_T_IN, 2);
        let (used, err, status) = s.run(
            &[
                (h.0, 16, 0),
                (DATA, 512, F_WRITE),
                (DATA2, 1024, F_WRITE),
                (STATUS, 1, F_WRITE),
            ],
            false,
        );
        assert_eq!((used, err, status), (1537, None, VIRTIO_BLK_S_OK));
        let mut got = vec![0u8; 1024];
        s.mem
            .read_slice(&mut got, GuestAddress(DATA2))
            .expect("read");
        let want: Vec<u8> = (1536..2560).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn write_then_flush() {
        let s = Setup::new();
        s.mem
            .write_slice(&[7u8; 512], GuestAddress(DATA))
            .expect("fill");
        let h = s.header(VIRTIO_BLK_T_OUT, 1);
        let (used, err, status) =
            s.run(&[(h.0, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)], false);
        assert_eq!((used, err, status), (1, None, VIRTIO_BLK_S_OK));
        assert!(s.disk.0.lock().expect("lock")[512..1024]
            .iter()
            .all(|b| *b == 7));
        let h = s.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            s.run(&[(h.0, 16, 0), (STATUS, 1, F_WRITE)], false).2,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn read_only_disks_refuse_writes_with_ioerr() {
        let s = Setup::new();
        for kind in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            let h = s.header(kind, 0);
            let (_, err, status) =
                s.run(&[(h.0, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)], true);
            assert_eq!(err, Some(RequestError::ReadOnly));
            assert_eq!(status, VIRTIO_BLK_S_IOERR);
        }
        assert_eq!(s.disk.0.lock().expect("lock")[0], 0);
        assert_eq!(s.disk.0.lock().expect("lock")[1], 1);
    }

    #[test]
    fn get_id_returns_the_serial() {
        let s = Setup::new();
        let h = s.header(VIRTIO_BLK_T_GET_ID, 0);
        let (used, err, status) = s.run(
            &[(h.0, 16, 0), (DATA, 20, F_WRITE), (STATUS, 1, F_WRITE)],
            true,
        );
        assert_eq!((used, err, status), (21, None, VIRTIO_BLK_S_OK));
        let mut id = [0u8; 20];
        s.mem.read_slice(&mut id, GuestAddress(DATA)).expect("read");
        assert_eq!(id, SERIAL);
    }

    #[test]
    fn discard_and_write_zeroes() {
        let s = Setup::new();
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let mut seg = [0u8; 16];
            seg[0..8].copy_from_slice(&4u64.to_le_bytes());
            seg[8..12].copy_from_slice(&2u32.to_le_bytes());
            s.mem.write_slice(&seg, GuestAddress(DATA)).expect("seg");
            let h = s.header(kind, 0);
            let (_, err, status) =
                s.run(&[(h.0, 16, 0), (DATA, 16, 0), (STATUS, 1, F_WRITE)], false);
            assert_eq!((err, status), (None, VIRTIO_BLK_S_OK));
            let d = s.disk.0.lock().expect("lock");
            assert!(d[2048..3072].iter().all(|b| *b == 0));
            assert_ne!(d[3072], 0);
        }
    }

    /// The advertised maxima hold: a range over `max_discard_sectors` /
    /// `max_write_zeroes_sectors` is refused before the disk is touched.
    #[test]
    fn discard_and_write_zeroes_beyond_the_advertised_maximum_are_refused() {
        let s = Setup::new();
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let mut seg = [0u8; 16];
            seg[0..8].copy_from_slice(&0u64.to_le_bytes());
            seg[8..12].copy_from_slice(&(MAX_DISCARD_SECTORS + 1).to_le_bytes());
            s.mem.write_slice(&seg, GuestAddress(DATA)).expect("seg");
            let h = s.header(kind, 0);
            let (_, err, status) =
                s.run(&[(h.0, 16, 0), (DATA, 16, 0), (STATUS, 1, F_WRITE)], false);
            assert_eq!(
                err,
                Some(RequestError::TooLarge(
                    u64::from(MAX_DISCARD_SECTORS + 1) * SECTOR
                )),
                "kind {kind}"
            );
            assert_eq!(status, VIRTIO_BLK_S_IOERR);
        }
        assert_eq!(
            s.disk.0.lock().expect("lock")[1],
            1,
            "the disk is untouched"
        );
    }

    #[test]
    fn hostile_requests_get_error_statuses() {
        let s = Setup::new();
        let size_sectors = 64 * 1024 / 512;
        type Case = (u32, u64, Vec<(u64, u32, u16)>, u8);
        let cases: Vec<Case> = vec![
            // Past the end of the disk, and a sector number that overflows.
            (
                VIRTIO_BLK_T_IN,
                size_sectors,
                vec![(DATA, 512, F_WRITE)],
                VIRTIO_BLK_S_IOERR,
            ),
            (
                VIRTIO_BLK_T_IN,
                u64::MAX / 2,
                vec![(DATA, 512, F_WRITE)],
                VIRTIO_BLK_S_IOERR,
            ),
            // Wrong buffer directions.
            (VIRTIO_BLK_T_IN, 0, vec![(DATA, 512, 0)], VIRTIO_BLK_S_IOERR),
            (
                VIRTIO_BLK_T_OUT,
                0,
                vec![(DATA, 512, F_WRITE)],
                VIRTIO_BLK_S_IOERR,
            ),
            // Too much data (several buffers adding up past the limit).
            (
                VIRTIO_BLK_T_IN,
                0,
                vec![(DATA, 3 << 20, F_WRITE), (DATA2, 3 << 20, F_WRITE)],
                VIRTIO_BLK_S_IOERR,
            ),
            // Unknown type.
            (99, 0, vec![], VIRTIO_BLK_S_UNSUPP),
            // Discard with a bad segment length.
            (
                VIRTIO_BLK_T_DISCARD,
                0,
                vec![(DATA, 15, 0)],
                VIRTIO_BLK_S_IOERR,
            ),
        ];
        for (kind, sector, data, want) in cases {
            let h = s.header(kind, sector);
            let mut descs = vec![(h.0, 16, 0)];
            descs.extend(data);
            descs.push((STATUS, 1, F_WRITE));
            let (used, err, status) = s.run(&descs, false);
            assert!(err.is_some(), "kind {kind} sector {sector}");
            assert_eq!(status, want, "kind {kind}: {err:?}");
            assert_eq!(used, 1);
        }
        // Buffers outside guest memory, or absurdly long: an error either way;
        // when the chain still reaches its status byte, that says IOERR.
        let h = s.header(VIRTIO_BLK_T_IN, 0);
        for bad in [(0xffff_0000_0000, 512, F_WRITE), (DATA, u32::MAX, F_WRITE)] {
            s.mem
                .write_obj(0xaau8, GuestAddress(STATUS))
                .expect("reset status");
            let (used, err, status) = s.run(&[(h.0, 16, 0), bad, (STATUS, 1, F_WRITE)], false);
            assert!(err.is_some(), "{bad:?}");
            assert!(
                used == 0 || (used == 1 && status == VIRTIO_BLK_S_IOERR),
                "{bad:?}: {used} {status}"
            );
        }
        // The last buffer is not writable: no status byte to report into.
        let h = s.header(VIRTIO_BLK_T_OUT, 0);
        let (used, err, _) = s.run(&[(h.0, 16, 0), (DATA, 512, 0)], false);
        assert_eq!(used, 0);
        assert!(err.is_some());
        // A short header.
        let h = s.header(VIRTIO_BLK_T_IN, 0);
        let (used, err, status) = s.run(&[(h.0, 8, 0), (STATUS, 1, F_WRITE)], false);
        assert_eq!((used, status), (1, VIRTIO_BLK_S_IOERR));
        assert!(matches!(err, Some(RequestError::Malformed(_))));
    }
}
