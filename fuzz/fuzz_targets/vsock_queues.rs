//! Drives the virtio-vsock queue layer with guest-controlled rings: arbitrary
//! bytes become the rx, tx and event queues (descriptors with any address,
//! length, flags, `next` link, indirect tables included, and available indexes,
//! bogus ones included) over mock guest memory holding fuzzer-shaped packet
//! headers and payloads. A real `VsockDevice` (its muxer listening in a temp
//! dir, a host socket behind guest port 1024) is activated on those queues:
//! its worker serves every available tx chain and fills rx chains before it
//! looks at its stop event, then `reset` joins it. That runs the device's own
//! queue handling (`uses_indirect`, the descriptor cap, `read_tx`, `RxChain`,
//! `add_used`, the budget, notification) rather than the parsers alone (the
//! `vsock_packet` target).
//!
//! Oracles: nothing panics (a panic in the worker fails `reset`), the worker
//! stops when asked (no spin on a bogus index), and the used indexes it wrote
//! never run ahead of what the guest made available.
#![no_main]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::vsock::packet::{PacketHeader, HDR_LEN, HOST_CID};
use vmm::devices::virtio::vsock::{port_path, VsockDevice};
use vmm::devices::virtio::{ActiveQueues, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use vmm_sys_util::eventfd::EventFd;

const GUEST_CID: u32 = 3;
const MEM_SIZE: usize = 4 << 20;
/// rx, tx and event queues, 4 KiB apart.
const QUEUES: [u64; 3] = [0x1000, 0x2000, 0x3000];
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

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("reddog-fuzz-vsockq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    })
}

/// One queue's descriptors and available ring, from the input.
fn build_queue(inp: &mut Input<'_>, q: &MockSplitQueue<'_, GuestMemoryMmap>, write: bool) {
    let n = u16::from(inp.byte() % QSIZE as u8) + 1;
    let mut raw = Vec::new();
    for i in 0..n {
        let shape = inp.byte();
        let len = match shape % 8 {
            0 => u32::MAX,
            1 => HDR_LEN as u32,
            2 => u32::from(inp.u16()) * 16,
            3 => 4096,
            _ => u32::from(inp.u16() % 0x800),
        };
        let addr = match (shape >> 3) % 8 {
            0 => 0xffff_ffff_f000,
            1 => MEM_SIZE as u64 - 16,
            2 => INDIRECT,
            3 => QUEUES[usize::from(shape) % 3],
            _ => DATA + u64::from(i) * 0x1000,
        };
        let dir = if write { 2 } else { 0 };
        let flags = if shape & 0x80 != 0 {
            u16::from(inp.byte() & 7)
        } else if shape & 0x40 != 0 && i + 1 < n {
            dir | 1
        } else {
            dir
        };
        let next = if shape & 0x80 != 0 { u16::from(inp.byte() % 32) } else { i + 1 };
        raw.push(RawDescriptor::from(Descriptor::new(addr, len, flags, next)));
    }
    let _ = q.add_desc_chains(&raw, 0);
    // Sometimes a bogus available index.
    if inp.byte() % 8 == 0 {
        q.avail().idx().store(inp.u16());
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mem");
    let mut inp = Input(data);
    // Packets at the data area: a plausible header most of the time.
    for slot in 0..8u64 {
        let mut raw = [0u8; HDR_LEN];
        let src = inp.take(HDR_LEN);
        raw[..src.len()].copy_from_slice(src);
        let mut h = PacketHeader::from_bytes(&raw);
        let ctrl = inp.byte();
        if ctrl & 1 != 0 {
            h.src_cid = u64::from(GUEST_CID);
            h.dst_cid = HOST_CID;
            h.type_ = 1;
            h.op %= 8;
            h.dst_port = if ctrl & 2 != 0 { 1024 } else { h.dst_port % 4 };
            h.len %= 0x400;
        }
        let at = GuestAddress(DATA + slot * 0x1000);
        let _ = mem.write_slice(&h.to_bytes(), at);
        let payload = inp.take(usize::from(inp_len(ctrl))).to_vec();
        let _ = mem.write_slice(&payload, GuestAddress(at.0 + HDR_LEN as u64));
    }
    let ind = inp.take(16 * 8).to_vec();
    let _ = mem.write_slice(&ind, GuestAddress(INDIRECT));

    let mocks: Vec<_> = QUEUES
        .iter()
        .map(|a| MockSplitQueue::create(&mem, GuestAddress(*a), QSIZE))
        .collect();
    for (i, q) in mocks.iter().enumerate() {
        build_queue(&mut inp, q, i != 1);
    }
    let avail: Vec<u16> = mocks.iter().map(|q| q.avail().idx().load()).collect();
    let mut queues = Vec::new();
    for q in &mocks {
        let Ok(queue) = q.create_queue::<Queue>() else {
            return;
        };
        queues.push(queue);
    }

    let dir = scratch();
    let uds = dir.join("vm.sock");
    let host_path = port_path(&uds, 1024);
    let _ = std::fs::remove_file(&host_path);
    let _host = UnixListener::bind(&host_path).expect("host listener");
    let cfg = vmm_api_config(uds);
    let mut dev = VsockDevice::new(&cfg).expect("vsock device");
    let active = ActiveQueues {
        mem: mem.clone(),
        queues,
        queue_events: (0..3).map(|_| Arc::new(EventFd::new(0).expect("eventfd"))).collect(),
        interrupt: Arc::new(Interrupt::new(EventFd::new(0).expect("irqfd"))),
    };
    dev.activate(VIRTIO_F_VERSION_1, active).expect("activate");
    assert!(dev.reset(), "the vsock worker died");
    for (q, a) in mocks.iter().zip(avail) {
        let used = q.used().idx().load();
        if a <= QSIZE {
            assert!(used <= a, "used index {used} ran past the available index {a}");
        }
    }
});

fn inp_len(ctrl: u8) -> u16 {
    u16::from(ctrl >> 2) * 16
}

fn vmm_api_config(uds: PathBuf) -> vmm_api::VsockConfig {
    vmm_api::VsockConfig { guest_cid: GUEST_CID, uds_path: uds }
}
