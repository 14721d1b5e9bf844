//! Drives virtio-net's transmit path with guest-controlled chains: arbitrary
//! bytes become a virtio-net header (flags, gso_type), frame bytes and a
//! descriptor layout (addresses, lengths, flags, `next` links, indirect
//! tables) in mock guest memory; the device's worker serves them into a
//! datagram socket standing in for the TAP.
//!
//! Oracles: nothing panics; every frame that reaches the "TAP" passes
//! `check_frame` (so is no longer than the MTU plus the headers unless it is
//! a segmentation frame of a negotiated kind); frames sent plus dropped
//! plus held back never exceed the chains offered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::net::{check_frame, drive_tx, Limits, Tap, MAX_BUFFER};
use vmm::devices::virtio::VIRTIO_F_VERSION_1;

const MEM_SIZE: usize = 1 << 20;
const QUEUE: u64 = 0x1000;
const FRAME: u64 = 0x1_0000;
const INDIRECT: u64 = 0x8_0000;
const QSIZE: u16 = 16;
const CSUM: u64 = 1 << 0;
const HOST_TSO4: u64 = 1 << 11;
const HOST_TSO6: u64 = 1 << 12;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = &GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let mut inp = Input(data);
    let mtu = 68 + inp.u16() % (9000 - 68 + 1);
    let fbits = inp.byte();
    let mut features = VIRTIO_F_VERSION_1;
    for (bit, f) in [(1, CSUM), (2, HOST_TSO4), (4, HOST_TSO6)] {
        if fbits & bit != 0 {
            features |= f;
        }
    }
    // The header, then frame bytes.
    let hdr = [inp.byte(), inp.byte(), inp.byte(), inp.byte(), 0, 0, 0, 0, 0, 0, 0, 0];
    let _ = mem.write_slice(&hdr, GuestAddress(FRAME));
    let n = usize::from(inp.byte()) * 16;
    let bytes = inp.take(n).to_vec();
    let _ = mem.write_slice(&bytes, GuestAddress(FRAME + 12));
    let ind = inp.take(8 * 16).to_vec();
    let _ = mem.write_slice(&ind, GuestAddress(INDIRECT));

    let q = MockSplitQueue::create(mem, GuestAddress(QUEUE), QSIZE);
    let count = u16::from(inp.byte() % QSIZE as u8) + 1;
    let mut raw = Vec::new();
    for i in 0..count {
        let shape = inp.byte();
        let len = match shape % 8 {
            0 => u32::MAX,
            1 => 12,
            2 => u32::from(mtu) + 26,
            3 => u32::from(mtu) + 27,
            4 => inp.u32() % (MAX_BUFFER as u32 + 64),
            _ => u32::from(inp.byte()) * 8,
        };
        let addr = match (shape >> 3) % 8 {
            0 => 0xffff_ffff_f000,
            1 => MEM_SIZE as u64 - 8,
            2 => INDIRECT,
            3 => QUEUE,
            _ => FRAME,
        };
        let flags = if shape & 0x80 != 0 {
            u16::from(inp.byte() & 7)
        } else if i + 1 == count || shape & 0x40 != 0 {
            0
        } else {
            1
        };
        let next = if shape & 0x80 != 0 {
            u16::from(inp.byte() % 32)
        } else {
            i + 1
        };
        raw.push(RawDescriptor::from(Descriptor::new(addr, len, flags, next)));
    }
    if q.add_desc_chains(&raw, 0).is_err() {
        return;
    }
    let Ok(queue) = q.create_queue::<Queue>() else {
        return;
    };
    let (tap, peer) = Tap::datagram_pair().expect("socket pair");
    let m = drive_tx(mem.clone(), queue, tap, mtu, features, None).expect("drive");
    let limits = Limits {
        mtu,
        csum: features & CSUM != 0,
        tso4: features & CSUM != 0 && features & HOST_TSO4 != 0,
        tso6: features & CSUM != 0 && features & HOST_TSO6 != 0,
        ufo: false,
    };
    let mut buf = vec![0u8; MAX_BUFFER + 1];
    let mut seen = 0u64;
    while let Ok(n) = peer.recv(&mut buf) {
        assert!(n <= MAX_BUFFER, "frame of {n} bytes left the device");
        if let Err(e) = check_frame(&buf[..n], &limits) {
            panic!("the device sent a frame it should have dropped: {e}");
        }
        seen += 1;
    }
    assert_eq!(seen, m.tx_frames, "{m:?}");
    assert!(m.tx_frames + m.tx_dropped <= u64::from(QSIZE), "{m:?}");
});
