//! Moving one frame between a descriptor chain and a fixed buffer: the
//! guest's side of virtio-net, pure queue logic (unit-tested with mock guest
//! memory, fuzzed by the `virtio_net_tx` target).
//!
//! Everything here is the guest's and hostile: chains are walked at most
//! [`MAX_CHAIN_DESCRIPTORS`] descriptors deep, a frame is copied only into a
//! buffer the device allocated once (never one sized by the guest), and a
//! frame longer than the negotiated limit is refused before it is copied.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory};

/// The virtio-net header of virtio 1.x (`struct virtio_net_hdr_v1`, with
/// `num_buffers`), in front of every frame in the queues and on the TAP.
pub const VNET_HDR_LEN: usize = 12;
/// An Ethernet header.
pub const ETH_HLEN: usize = 14;
/// The largest segmentation-offload frame: a 64 KiB IP packet, its Ethernet
/// header and a VLAN tag (Linux's `GSO_MAX_SIZE` plus headers).
pub const MAX_GSO_FRAME: usize = 65_535 + ETH_HLEN + 4;
/// The device's frame buffers: a header and the largest frame.
pub const MAX_BUFFER: usize = VNET_HDR_LEN + MAX_GSO_FRAME;
/// Most descriptors of one chain the device walks (a guest that posts 64 KiB
/// receive buffers page by page needs about 18).
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;

/// `flags` of the header: the checksum is left to the device (or the host).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was checked.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `gso_type` values.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// TCPv4 segmentation.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// UDP fragmentation.
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// TCPv6 segmentation.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// With TCP segmentation: the ECN bit.
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// What a frame may be, from what the driver and device agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The MTU in config space: a frame without segmentation offload carries
    /// at most this much after its Ethernet header.
    pub mtu: u16,
    /// The checksum may be left to the other side (`NEEDS_CSUM`).
    pub csum: bool,
    /// TCPv4 segmentation frames are allowed.
    pub tso4: bool,
    /// TCPv6 segmentation frames are allowed.
    pub tso6: bool,
    /// UDP fragmentation frames are allowed.
    pub ufo: bool,
}

impl Limits {
    /// A frame without segmentation offload: header, Ethernet header, MTU.
    pub fn max_plain(&self) -> usize {
        VNET_HDR_LEN + ETH_HLEN + usize::from(self.mtu)
    }

    /// The largest frame (header included) any header could make valid.
    pub fn max_any(&self) -> usize {
        if self.tso4 || self.tso6 || self.ufo {
            MAX_BUFFER
        } else {
            self.max_plain()
        }
    }
}

/// Why a frame was dropped (counted; logged a few times).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame is longer than the limit.
    #[error("frame of at least {len} bytes is over the limit of {max}")]
    TooLong {
        /// Bytes seen so far (header included).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not even a header and an Ethernet header.
    #[error("frame of {0} bytes is shorter than the headers")]
    TooShort(usize),
    /// A transmit chain has a device-writable descriptor, or a receive chain
    /// a read-only one.
    #[error("descriptor in the wrong direction")]
    Direction,
    /// The chain is longer than [`MAX_CHAIN_DESCRIPTORS`].
    #[error("descriptor chain longer than {MAX_CHAIN_DESCRIPTORS}")]
    ChainTooLong,
    /// Guest memory could not be read or written.
    #[error("guest memory access failed at {0:#x}")]
    Memory(u64),
    /// The receive chain cannot hold the frame.
    #[error("receive buffer of {room} bytes cannot hold a frame of {len}")]
    NoRoom {
        /// The chain's bytes.
        room: usize,
        /// The frame's.
        len: usize,
    },
    /// The header asks for an offload that was not negotiated, or is unknown.
    #[error("header asks for offload flags {flags:#x} gso_type {gso_type:#x}, not negotiated")]
    Offload {
        /// `flags`.
        flags: u8,
        /// `gso_type`.
        gso_type: u8,
    },
}

/// Copies the frame of a transmit chain (header first) into `buf` and
/// returns its length. Refuses chains longer than [`MAX_CHAIN_DESCRIPTORS`],
/// device-writable descriptors, and frames over `limits.max_any()` (or
/// `buf`), before copying past the limit.
pub fn read_tx_chain<M>(
    mem: &M,
    chain: DescriptorChain<&M>,
    buf: &mut [u8],
    limits: &Limits,
) -> Result<usize, FrameError>
where
    M: GuestMemory,
{
    let max = limits.max_any().min(buf.len());
    let mut len = 0usize;
    for (i, desc) in chain.enumerate() {
        if i >= MAX_CHAIN_DESCRIPTORS {
            return Err(FrameError::ChainTooLong);
        }
        if desc.is_write_only() {
            return Err(FrameError::Direction);
        }
        let n = desc.len() as usize;
        let end = len.saturating_add(n);
        if end > max {
            return Err(FrameError::TooLong { len: end, max });
        }
        mem.read_slice(&mut buf[len..end], desc.addr())
            .map_err(|_| FrameError::Memory(desc.addr().0))?;
        len = end;
    }
    check_frame(&buf[..len], limits)?;
    Ok(len)
}

/// Checks a frame (header first) against what was negotiated: long enough,
/// no longer than the MTU unless it is a segmentation frame of a negotiated
/// kind, and no checksum offload unless negotiated.
pub fn check_frame(frame: &[u8], limits: &Limits) -> Result<(), FrameError> {
    if frame.len() < VNET_HDR_LEN + ETH_HLEN {
        return Err(FrameError::TooShort(frame.len()));
    }
    let (flags, gso_type) = (frame[0], frame[1]);
    let bad = || FrameError::Offload { flags, gso_type };
    if flags & !(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) != 0 {
        return Err(bad());
    }
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !limits.csum {
        return Err(bad());
    }
    let gso_ok = match gso_type & !VIRTIO_NET_HDR_GSO_ECN {
        VIRTIO_NET_HDR_GSO_NONE => gso_type == VIRTIO_NET_HDR_GSO_NONE,
        VIRTIO_NET_HDR_GSO_TCPV4 => limits.tso4,
        VIRTIO_NET_HDR_GSO_TCPV6 => limits.tso6,
        VIRTIO_NET_HDR_GSO_UDP => limits.ufo && gso_type & VIRTIO_NET_HDR_GSO_ECN == 0,
        _ => false,
    };
    if !gso_ok {
        return Err(bad());
    }
    let max = if gso_type == VIRTIO_NET_HDR_GSO_NONE {
        limits.max_plain()
    } else {
        MAX_BUFFER
    };
    if frame.len() > max {
        return Err(FrameError::TooLong {
            len: frame.len(),
            max,
        });
    }
    Ok(())
}

/// Copies `frame` (header first) into the writable descriptors of a receive
/// chain and returns the bytes written. Refuses chains longer than
/// [`MAX_CHAIN_DESCRIPTORS`] or with a read-only descriptor, and chains too
/// small for the frame (checked before anything is written).
pub fn write_rx_chain<M>(
    mem: &M,
    chain: DescriptorChain<&M>,
    frame: &[u8],
) -> Result<u32, FrameError>
where
    M: GuestMemory,
{
    let mut descs = [(vm_memory::GuestAddress(0), 0u32); MAX_CHAIN_DESCRIPTORS];
    let mut count = 0usize;
    let mut room = 0usize;
    for desc in chain {
        if count >= MAX_CHAIN_DESCRIPTORS {
            return Err(FrameError::ChainTooLong);
        }
        if !desc.is_write_only() {
            return Err(FrameError::Direction);
        }
        descs[count] = (desc.addr(), desc.len());
        count += 1;
        room = room.saturating_add(desc.len() as usize);
        if room >= frame.len() {
            break;
        }
    }
    if room < frame.len() {
        return Err(FrameError::NoRoom {
            room,
            len: frame.len(),
        });
    }
    let mut done = 0usize;
    for &(addr, len) in &descs[..count] {
        let n = (len as usize).min(frame.len() - done);
        mem.write_slice(&frame[done..done + n], addr)
            .map_err(|_| FrameError::Memory(addr.0))?;
        done += n;
    }
    // `frame` is at most MAX_BUFFER long, far below u32::MAX.
    Ok(u32::try_from(done).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn limits() -> Limits {
        Limits {
            mtu: 1500,
            csum: false,
            tso4: false,
            tso6: false,
            ufo: false,
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem")
    }

    /// A queue holding one chain of `descs` (addr, len, flags).
    fn queue(mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> Queue {
        let q = MockSplitQueue::new(mem, 256);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| {
                let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
                RawDescriptor::from(Descriptor::new(a, l, f | next, (i + 1) as u16))
            })
            .collect();
        q.add_desc_chains(&raw, 0).expect("chain");
        q.create_queue().expect("queue")
    }

    #[test]
    fn a_frame_is_gathered_from_its_descriptors() {
        let m = mem();
        let mut frame = [0u8; VNET_HDR_LEN + 60];
        frame[VNET_HDR_LEN..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = i as u8);
        m.write_slice(&frame[..VNET_HDR_LEN], GuestAddress(0x10000))
            .expect("w");
        m.write_slice(&frame[VNET_HDR_LEN..], GuestAddress(0x20000))
            .expect("w");
        let mut q = queue(&m, &[(0x10000, 12, 0), (0x20000, 60, 0)]);
        let chain = q.pop_descriptor_chain(&m).expect("chain");
        let mut buf = vec![0u8; MAX_BUFFER];
        let n = read_tx_chain(&m, chain, &mut buf, &limits()).expect("frame");
        assert_eq!(&buf[..n], &frame[..]);
    }

    #[test]
    fn frames_over_the_mtu_are_refused() {
        let m = mem();
        let max = limits().max_plain();
        // Exactly the MTU passes, one byte more does not.
        for (len, ok) in [(max, true), (max + 1, false), (u32::MAX as usize, false)] {
            let mut q = queue(&m, &[(0x10000, len as u32, 0)]);
            let chain = q.pop_descriptor_chain(&m).expect("chain");
            let mut buf = vec![0u8; MAX_BUFFER];
            let r = read_tx_chain(&m, chain, &mut buf, &limits());
            assert_eq!(r.is_ok(), ok, "{len}: {r:?}");
        }
        // A segmentation header does not lift the limit unless negotiated.
        let mut big = vec![0u8; max + 100];
        big[1] = VIRTIO_NET_HDR_GSO_TCPV4;
        assert!(check_frame(&big, &limits()).is_err());
        let tso = Limits {
            tso4: true,
            ..limits()
        };
        check_frame(&big, &tso).expect("a TSO frame");
        big[1] = 0;
        assert!(check_frame(&big, &tso).is_err(), "no GSO: the MTU holds");
    }

    #[test]
    fn hostile_chains_are_refused() {
        let m = mem();
        let mut buf = vec![0u8; MAX_BUFFER];
        // Device-writable descriptor in a tx chain.
        let mut q = queue(&m, &[(0x10000, 60, F_WRITE)]);
        let c = q.pop_descriptor_chain(&m).expect("chain");
        assert_eq!(
            read_tx_chain(&m, c, &mut buf, &limits()),
            Err(FrameError::Direction)
        );
        // Memory outside the guest.
        let mut q = queue(&m, &[(0xffff_0000_0000, 60, 0)]);
        let c = q.pop_descriptor_chain(&m).expect("chain");
        assert!(matches!(
            read_tx_chain(&m, c, &mut buf, &limits()),
            Err(FrameError::Memory(_))
        ));
        // Too many descriptors.
        let descs: Vec<_> = (0..100).map(|i| (0x10000 + i * 8, 1u32, 0u16)).collect();
        let mut q = queue(&m, &descs);
        let c = q.pop_descriptor_chain(&m).expect("chain");
        assert_eq!(
            read_tx_chain(&m, c, &mut buf, &limits()),
            Err(FrameError::ChainTooLong)
        );
        // Short, and unknown offloads.
        assert_eq!(
            check_frame(&[0u8; 20], &limits()),
            Err(FrameError::TooShort(20))
        );
        let mut f = [0u8; 64];
        f[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        assert!(check_frame(&f, &limits()).is_err());
        f[0] = 0;
        f[1] = 7;
        assert!(check_frame(&f, &limits()).is_err());
    }

    #[test]
    fn a_received_frame_is_scattered_or_refused() {
        let m = mem();
        let frame: Vec<u8> = (0..100u8).collect();
        let mut q = queue(&m, &[(0x10000, 40, F_WRITE), (0x20000, 4096, F_WRITE)]);
        let c = q.pop_descriptor_chain(&m).expect("chain");
        assert_eq!(write_rx_chain(&m, c, &frame), Ok(100));
        let mut got = vec![0u8; 100];
        m.read_slice(&mut got[..40], GuestAddress(0x10000))
            .expect("r");
        m.read_slice(&mut got[40..], GuestAddress(0x20000))
            .expect("r");
        assert_eq!(got, frame);
        // Too small: nothing is written.
        m.write_slice(&[0xee; 8], GuestAddress(0x30000)).expect("w");
        let mut q = queue(&m, &[(0x30000, 8, F_WRITE)]);
        let c = q.pop_descriptor_chain(&m).expect("chain");
        assert_eq!(
            write_rx_chain(&m, c, &frame),
            Err(FrameError::NoRoom { room: 8, len: 100 })
        );
        let mut b = [0u8; 8];
        m.read_slice(&mut b, GuestAddress(0x30000)).expect("r");
        assert_eq!(b, [0xee; 8]);
        // Read-only descriptor in an rx chain.
        let mut q = queue(&m, &[(0x10000, 4096, 0)]);
        let c = q.pop_descriptor_chain(&m).expect("chain");
        assert_eq!(write_rx_chain(&m, c, &frame), Err(FrameError::Direction));
    }
}
