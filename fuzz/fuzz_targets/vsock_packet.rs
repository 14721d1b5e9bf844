//! Drives the virtio-vsock tx path with guest-controlled descriptor chains:
//! arbitrary bytes become a sequence of tx chains (descriptor addresses,
//! lengths, flags and `next` links, indirect tables included) over mock guest
//! memory holding arbitrary headers and payloads; each chain goes through
//! `packet::read_tx` into a real `Muxer` (listening in a temp dir, with a host
//! socket behind guest port 1024 so connections open), and whatever the muxer
//! answers is written into fuzzer-shaped rx chains. Nothing may panic, and
//! what the muxer queues for the guest stays bounded.
#![no_main]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::vsock::packet::{read_tx, PacketHeader, RxChain, HDR_LEN, HOST_CID};
use vmm::devices::virtio::vsock::{port_path, Muxer, MAX_PAYLOAD};

const GUEST_CID: u32 = 3;
const MEM_SIZE: usize = 4 << 20;
const QUEUE: u64 = 0x1000;
const DATA: u64 = 0x10_0000;
const INDIRECT: u64 = 0x30_0000;
const QSIZE: u16 = 16;

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
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// The listening socket's path, in a scratch directory of this process.
fn uds() -> &'static PathBuf {
    static UDS: OnceLock<PathBuf> = OnceLock::new();
    UDS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("reddog-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir.join("vm.sock")
    })
}

/// A descriptor address: mostly inside the data area, sometimes hostile.
fn addr(inp: &mut Input<'_>, off: u64) -> u64 {
    match inp.byte() % 8 {
        0 => 0xffff_ffff_f000,
        1 => MEM_SIZE as u64 - 16, // straddles the end of memory
        2 => INDIRECT,
        3 => QUEUE, // the queue's own rings
        _ => DATA + off,
    }
}

/// Builds the descriptors of one queue from the input (up to the queue size,
/// with arbitrary flags and links).
fn descriptors(inp: &mut Input<'_>, q: &MockSplitQueue<'_, GuestMemoryMmap>) {
    let n = u16::from(inp.byte() % QSIZE as u8) + 1;
    let mut raw = Vec::new();
    let mut off = 0u64;
    for i in 0..n {
        let shape = inp.byte();
        let len = match shape % 8 {
            0 => u32::MAX,
            1 => HDR_LEN as u32,
            2 => inp.u16() as u32 * 16,
            _ => u32::from(inp.u16() % 0x200),
        };
        // NEXT | WRITE | INDIRECT, sometimes the chain the mock would build.
        let flags = if shape & 0x80 != 0 {
            u16::from(inp.byte() & 7)
        } else if i + 1 < n {
            1
        } else {
            0
        };
        let next = if shape & 0x40 != 0 {
            u16::from(inp.byte() % 32)
        } else {
            i + 1
        };
        let a = addr(inp, off);
        off += u64::from(len.min(0x1_0000));
        raw.push(RawDescriptor::from(Descriptor::new(a, len, flags, next)));
    }
    let _ = q.add_desc_chains(&raw, 0);
}

fn fill_memory(inp: &mut Input<'_>, mem: &GuestMemoryMmap) {
    // A header (optionally made plausible so deeper states are reached) and
    // a payload at the data area; an indirect table's worth of bytes.
    let ctrl = inp.byte();
    let mut raw = [0u8; HDR_LEN];
    let src = inp.take(HDR_LEN);
    raw[..src.len()].copy_from_slice(src);
    let mut h = PacketHeader::from_bytes(&raw);
    if ctrl & 1 != 0 {
        h.src_cid = u64::from(GUEST_CID);
        h.dst_cid = HOST_CID;
        h.type_ = 1;
    }
    if ctrl & 2 != 0 {
        h.op = h.op % 8;
    }
    if ctrl & 4 != 0 {
        h.dst_port = if ctrl & 8 != 0 { 1024 } else { h.dst_port % 4 };
        h.src_port %= 4;
    }
    if ctrl & 16 != 0 {
        h.len %= 0x400;
    }
    let _ = mem.write_slice(&h.to_bytes(), GuestAddress(DATA));
    let payload_len = usize::from(inp.u16() % 0x800);
    let payload = inp.take(payload_len).to_vec();
    let _ = mem.write_slice(&payload, GuestAddress(DATA + HDR_LEN as u64));
    let ind = inp.take(16 * 8).to_vec();
    let _ = mem.write_slice(&ind, GuestAddress(INDIRECT));
}

fuzz_target!(|data: &[u8]| {
    // Fresh memory and muxer per input: runs are reproducible.
    let mem = &GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mem");
    let uds = uds();
    let mut muxer = Muxer::new(GUEST_CID, uds).expect("muxer");
    let host_path = port_path(uds, 1024);
    let _ = std::fs::remove_file(&host_path);
    let host = UnixListener::bind(&host_path).expect("host listener");
    host.set_nonblocking(true).expect("nonblocking");
    let mut inp = Input(data);
    let mut payload = Vec::new();
    let mut rx_buf = vec![0u8; MAX_PAYLOAD];
    for _ in 0..32 {
        if inp.0.is_empty() {
            break;
        }
        fill_memory(&mut inp, mem);
        // tx: every chain the guest made available.
        let q = MockSplitQueue::create(mem, GuestAddress(QUEUE), QSIZE);
        descriptors(&mut inp, &q);
        let Ok(mut queue) = q.create_queue::<Queue>() else {
            continue;
        };
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            match read_tx(chain, &mut payload) {
                Ok(h) => {
                    assert!(payload.len() <= MAX_PAYLOAD);
                    muxer.send_pkt(&h, &payload);
                }
                Err(e) => muxer.reject(&e),
            }
        }
        muxer.handle_events();
        // rx: one fuzzer-shaped chain, then drain the rest into a plain buffer.
        let q = MockSplitQueue::create(mem, GuestAddress(QUEUE), QSIZE);
        descriptors(&mut inp, &q);
        if let Ok(mut queue) = q.create_queue::<Queue>() {
            if let Some(chain) = queue.pop_descriptor_chain(mem) {
                if let Ok(rx) = RxChain::new(chain) {
                    let cap = rx.payload_capacity();
                    if let Some((h, n)) = muxer.recv_pkt(&mut rx_buf[..cap]) {
                        assert!(n <= cap && h.len as usize == n);
                        if rx.write(mem, &h, &rx_buf[..n]).is_err() {
                            muxer.rx_failed(&h);
                        }
                    }
                }
            }
        }
        let cap = usize::from(inp.u16()) % (MAX_PAYLOAD + 1);
        let mut drained = 0;
        while let Some((h, n)) = muxer.recv_pkt(&mut rx_buf[..cap]) {
            assert!(n <= cap && h.len as usize == n);
            drained += 1;
            assert!(drained <= 4096, "the muxer's rx queue is unbounded");
        }
        // Accept (and drop) what the guest connected to, like a host service.
        while let Ok((s, _)) = host.accept() {
            drop(s);
        }
    }
});
