//! vsock packets: the 44-byte header and moving packets through descriptor chains.
//!
//! A tx chain is the guest's: its header is copied out of guest memory once
//! into a local array and only then parsed and validated, so the guest cannot
//! change it under us; the payload length is bounded before anything is
//! allocated or read. An rx chain's buffers are checked against guest memory
//! before a packet is taken for it, so a packet is never lost half-written.

use virtio_queue::{desc::split::Descriptor, DescriptorChain};

use crate::devices::virtio::{chain_descriptors, MAX_CHAIN_DESCRIPTORS};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use super::MAX_PAYLOAD;

/// Size of the packet header.
pub const HDR_LEN: usize = 44;
/// The host's context ID.
pub const HOST_CID: u64 = 2;
/// Stream sockets, the only type we support (no `VIRTIO_VSOCK_F_SEQPACKET`).
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused, aborted, or the final close).
    pub const RST: u16 = 3;
    /// One or both directions shut down (see the `SHUTDOWN_*` flags).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Unsolicited credit information.
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A packet header (`struct virtio_vsock_hdr`, little endian in memory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation (see [`op`]).
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, in total.
    pub fwd_cnt: u32,
}

impl PacketHeader {
    /// Parses a header from its wire form.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The wire form.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a descriptor chain could not carry a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain's readable buffers hold less than a header, or point outside
    /// guest memory.
    #[error("tx chain without a readable 44-byte header")]
    NoHeader,
    /// The header announces a payload over [`MAX_PAYLOAD`].
    #[error("tx payload of {} bytes is over the 64 KiB limit", .0.len)]
    TooLong(PacketHeader),
    /// The header announces more payload than the chain holds, or the payload
    /// buffers point outside guest memory.
    #[error("tx payload of {} bytes is not in the chain's buffers", .0.len)]
    Truncated(PacketHeader),
    /// The rx chain's writable buffers are smaller than a header or point
    /// outside guest memory.
    #[error("rx chain cannot take a packet (too small or outside guest memory)")]
    BadRxBuffer,
    /// Writing an rx packet into guest memory failed.
    #[error("rx chain write to guest memory failed")]
    RxWrite,
    /// The chain refers to an indirect descriptor table (not negotiated) or
    /// has more than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    #[error("descriptor chain is indirect (not negotiated) or longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    Chain,
}

impl PacketError {
    /// The header, when it was read before the error was found.
    pub fn header(&self) -> Option<&PacketHeader> {
        match self {
            Self::TooLong(h) | Self::Truncated(h) => Some(h),
            _ => None,
        }
    }
}

/// Copies `out.len()` bytes starting `skip` bytes into the buffers `descs`.
fn gather<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
    mut skip: u64,
    out: &mut [u8],
) -> Result<(), ()> {
    let mut done = 0usize;
    for d in descs {
        if done == out.len() {
            break;
        }
        let len = u64::from(d.len());
        if skip >= len {
            skip -= len;
            continue;
        }
        let avail = usize::try_from(len - skip).map_err(|_| ())?;
        let n = avail.min(out.len() - done);
        let addr = d.addr().checked_add(skip).ok_or(())?;
        mem.read_slice(&mut out[done..done + n], addr)
            .map_err(|_| ())?;
        done += n;
        skip = 0;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// Reads the packet a tx chain carries: returns its header and leaves its
/// payload (`header.len` bytes, RW packets only) in `payload`.
///
/// Only the chain's device-readable buffers count. The header is copied once;
/// `header.len` is checked against [`MAX_PAYLOAD`] and the chain before the
/// payload is read. Other operations carry no payload: their `len` is not
/// read (Linux always sends 0).
pub fn read_tx<M>(
    chain: DescriptorChain<M>,
    payload: &mut Vec<u8>,
) -> Result<PacketHeader, PacketError>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    payload.clear();
    // At most MAX_CHAIN_DESCRIPTORS are read (an indirect table could hold 65 535).
    let descs: Vec<Descriptor> = chain_descriptors(&chain, MAX_CHAIN_DESCRIPTORS)
        .ok_or(PacketError::Chain)?
        .into_iter()
        .filter(|d| !d.is_write_only())
        .collect();
    let mem = chain.memory();
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    let mut raw = [0u8; HDR_LEN];
    if total < HDR_LEN as u64 || gather(mem, &descs, 0, &mut raw).is_err() {
        return Err(PacketError::NoHeader);
    }
    let hdr = PacketHeader::from_bytes(&raw);
    if hdr.op != op::RW || hdr.len == 0 {
        return Ok(hdr);
    }
    let len = hdr.len as usize;
    if len > MAX_PAYLOAD {
        return Err(PacketError::TooLong(hdr));
    }
    if total - (HDR_LEN as u64) < u64::from(hdr.len) {
        return Err(PacketError::Truncated(hdr));
    }
    payload.resize(len, 0);
    if gather(mem, &descs, HDR_LEN as u64, payload).is_err() {
        payload.clear();
        return Err(PacketError::Truncated(hdr));
    }
    Ok(hdr)
}

/// An rx chain whose writable buffers were checked against guest memory.
#[derive(Debug)]
pub struct RxChain {
    descs: Vec<Descriptor>,
    capacity: u64,
}

impl RxChain {
    /// Takes the chain's device-writable buffers; fails when they cannot hold
    /// a header or any of them lies outside guest memory.
    pub fn new<M>(chain: DescriptorChain<M>) -> Result<Self, PacketError>
    where
        M: std::ops::Deref + Clone,
        M::Target: GuestMemory,
    {
        let descs: Vec<Descriptor> = chain_descriptors(&chain, MAX_CHAIN_DESCRIPTORS)
            .ok_or(PacketError::Chain)?
            .into_iter()
            .filter(|d| d.is_write_only())
            .collect();
        let mem = chain.memory();
        let mut capacity = 0u64;
        for d in &descs {
            let ok = usize::try_from(d.len())
                .is_ok_and(|len| len == 0 || mem.check_range(d.addr(), len, Permissions::Write));
            if !ok {
                return Err(PacketError::BadRxBuffer);
            }
            capacity += u64::from(d.len());
        }
        if capacity < HDR_LEN as u64 {
            return Err(PacketError::BadRxBuffer);
        }
        Ok(Self { descs, capacity })
    }

    /// Most payload bytes a packet in this chain can carry.
    pub fn payload_capacity(&self) -> usize {
        usize::try_from(self.capacity - HDR_LEN as u64)
            .unwrap_or(usize::MAX)
            .min(MAX_PAYLOAD)
    }

    /// Writes `hdr` (whose `len` must be `payload.len()`) and `payload`;
    /// returns the bytes written, for the used ring.
    pub fn write<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        hdr: &PacketHeader,
        payload: &[u8],
    ) -> Result<u32, PacketError> {
        if payload.len() > self.payload_capacity() {
            return Err(PacketError::BadRxBuffer);
        }
        let raw = hdr.to_bytes();
        let mut parts: [&[u8]; 2] = [&raw, payload];
        let mut written = 0u32;
        for d in &self.descs {
            let mut off = 0u64;
            let room = u64::from(d.len());
            for part in parts.iter_mut() {
                if part.is_empty() || off == room {
                    continue;
                }
                let n = usize::try_from(room - off)
                    .unwrap_or(usize::MAX)
                    .min(part.len());
                let addr: GuestAddress = d.addr().checked_add(off).ok_or(PacketError::RxWrite)?;
                mem.write_slice(&part[..n], addr)
                    .map_err(|_| PacketError::RxWrite)?;
                *part = &part[n..];
                off += n as u64;
                // `n` is at most one descriptor's u32 length.
                written += n as u32;
            }
            if parts.iter().all(|p| p.is_empty()) {
                break;
            }
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemoryMmap;

    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("mem")
    }

    fn hdr(op: u16, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    /// Builds one chain from (addr, len, flags) and runs `f` on it.
    fn with_chain<'m, T>(
        mem: &'m GuestMemoryMmap,
        descs: &[(u64, u32, u16)],
        f: impl FnOnce(DescriptorChain<&'m GuestMemoryMmap>) -> T,
    ) -> T {
        let q = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|(a, l, fl)| RawDescriptor::from(SplitDescriptor::new(*a, *l, *fl, 0)))
            .collect();
        q.build_desc_chain(&raw).expect("chain");
        let mut queue: Queue = q.create_queue().expect("queue");
        let chain = queue.pop_descriptor_chain(mem).expect("a chain");
        f(chain)
    }

    #[test]
    fn header_layout_matches_the_spec() {
        let h = PacketHeader {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0x1111_2222,
            dst_port: 0x3333_4444,
            len: 5,
            type_: 1,
            op: 6,
            flags: 3,
            buf_alloc: 0xaabb_ccdd,
            fwd_cnt: 0x1234_5678,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(b[8], 2);
        assert_eq!(&b[16..20], &0x1111_2222u32.to_le_bytes());
        assert_eq!(b[24], 5);
        assert_eq!(&b[28..32], &[1, 0, 6, 0]);
        assert_eq!(b[32], 3);
        assert_eq!(&b[40..44], &0x1234_5678u32.to_le_bytes());
        assert_eq!(PacketHeader::from_bytes(&b), h);
    }

    #[test]
    fn tx_header_and_payload_in_any_split() {
        let m = mem();
        let h = hdr(op::RW, 10);
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(b"0123456789");
        m.write_slice(&bytes, GuestAddress(0x10_0000)).expect("w");
        let mut buf = Vec::new();
        // One buffer; header + payload in two; the header itself split.
        for layout in [
            vec![(0x10_0000u64, 54u32, 0u16)],
            vec![(0x10_0000, 44, 0), (0x10_0000 + 44, 10, 0)],
            vec![
                (0x10_0000, 20, 0),
                (0x10_0000 + 20, 30, 0),
                (0x10_0000 + 50, 4, 0),
            ],
        ] {
            let got = with_chain(&m, &layout, |c| read_tx(c, &mut buf)).expect("packet");
            assert_eq!(got, h);
            assert_eq!(buf, b"0123456789");
        }
        // Device-writable buffers in a tx chain are not read.
        let r = with_chain(&m, &[(0x10_0000, 54, F_WRITE)], |c| read_tx(c, &mut buf));
        assert_eq!(r, Err(PacketError::NoHeader));
    }

    #[test]
    fn tx_malformed_chains_are_errors() {
        let m = mem();
        let mut buf = Vec::new();
        // Too short for a header.
        m.write_slice(&hdr(op::REQUEST, 0).to_bytes(), GuestAddress(0x10_0000))
            .expect("w");
        let r = with_chain(&m, &[(0x10_0000, 43, 0)], |c| read_tx(c, &mut buf));
        assert_eq!(r, Err(PacketError::NoHeader));
        // Outside guest memory.
        let r = with_chain(&m, &[(0xffff_0000_0000, 44, 0)], |c| read_tx(c, &mut buf));
        assert_eq!(r, Err(PacketError::NoHeader));
        // Payload over the limit (the chain claims to be huge).
        let big = hdr(op::RW, MAX_PAYLOAD as u32 + 1);
        m.write_slice(&big.to_bytes(), GuestAddress(0x10_0000))
            .expect("w");
        let r = with_chain(&m, &[(0x10_0000, u32::MAX, 0)], |c| read_tx(c, &mut buf));
        assert_eq!(r, Err(PacketError::TooLong(big)));
        let r = with_chain(&m, &[(0x10_0000, 44, 0)], |c| read_tx(c, &mut buf));
        assert_eq!(r.map_err(|e| e.header().copied()), Err(Some(big)));
        // Payload longer than the chain.
        let h = hdr(op::RW, 100);
        m.write_slice(&h.to_bytes(), GuestAddress(0x10_0000))
            .expect("w");
        let r = with_chain(&m, &[(0x10_0000, 44, 0), (0x20_0000, 99, 0)], |c| {
            read_tx(c, &mut buf)
        });
        assert_eq!(r, Err(PacketError::Truncated(h)));
        // Payload buffer outside guest memory.
        let r = with_chain(&m, &[(0x10_0000, 44, 0), (0xfff_ffff_0000, 100, 0)], |c| {
            read_tx(c, &mut buf)
        });
        assert_eq!(r, Err(PacketError::Truncated(h)));
        assert!(buf.is_empty());
        // A non-RW op with a bogus len is returned as is; its payload is not read.
        let h = hdr(op::SHUTDOWN, u32::MAX);
        m.write_slice(&h.to_bytes(), GuestAddress(0x10_0000))
            .expect("w");
        let r = with_chain(&m, &[(0x10_0000, 44, 0)], |c| read_tx(c, &mut buf));
        assert_eq!(r, Ok(h));
        assert!(buf.is_empty());
    }

    #[test]
    fn rx_write_spans_buffers() {
        let m = mem();
        let h = hdr(op::RW, 6);
        let rx = with_chain(
            &m,
            &[
                (0x10_0000, 30, F_WRITE),
                (0x20_0000, 16, F_WRITE),
                (0x30_0000, 100, F_WRITE),
            ],
            RxChain::new,
        )
        .expect("rx chain");
        assert_eq!(rx.payload_capacity(), 146 - 44);
        assert_eq!(rx.write(&m, &h, b"abcdef").expect("write"), 50);
        let mut raw = [0u8; HDR_LEN];
        m.read_slice(&mut raw[..30], GuestAddress(0x10_0000))
            .expect("r");
        m.read_slice(&mut raw[30..], GuestAddress(0x20_0000))
            .expect("r");
        assert_eq!(PacketHeader::from_bytes(&raw), h);
        let mut p = [0u8; 8];
        m.read_slice(&mut p, GuestAddress(0x20_0000 + 14))
            .expect("r");
        assert_eq!(&p[..2], b"ab");
        m.read_slice(&mut p[..4], GuestAddress(0x30_0000))
            .expect("r");
        assert_eq!(&p[..4], b"cdef");
        // Payload larger than the chain: refused, nothing claimed written.
        assert_eq!(rx.write(&m, &h, &[0u8; 103]), Err(PacketError::BadRxBuffer));
    }

    #[test]
    fn rx_chains_that_cannot_take_a_packet() {
        let m = mem();
        for layout in [
            vec![(0x10_0000u64, 43u32, F_WRITE)],
            vec![(0x10_0000, 100, 0)],
            vec![(0x10_0000, 44, F_WRITE), (0xffff_0000_0000, 10, F_WRITE)],
            vec![(0xfff_f000, 0x2000_0000, F_WRITE)],
        ] {
            let r = with_chain(&m, &layout, RxChain::new);
            assert_eq!(r.err(), Some(PacketError::BadRxBuffer), "{layout:?}");
        }
        // Capacity is capped at the payload limit.
        let rx = with_chain(&m, &[(0x10_0000, 1 << 20, F_WRITE)], RxChain::new).expect("rx");
        assert_eq!(rx.payload_capacity(), MAX_PAYLOAD);
    }
}
