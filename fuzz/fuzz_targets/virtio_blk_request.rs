//! Drives virtio-blk request handling with guest-controlled requests:
//! arbitrary bytes become request headers (type, sector), discard segments,
//! data and a descriptor layout (addresses, lengths, flags, `next` links,
//! indirect tables) in mock guest memory, served against an in-memory disk.
//!
//! `block::process_chain` takes a `Target` that the block module does not
//! export, so the chains go through the public device model instead: a
//! `BlockDevice` is activated on the mock queue, its worker serves every
//! available chain before it looks at its stop event, and `reset` joins it.
//! That runs `process_chain` on each chain (plus the used-ring handling).
//!
//! Oracles: nothing panics (a panic in the worker aborts the process), and the
//! disk never sees an access outside `[0, size)` (the request layer must
//! range-check first; a raw image would otherwise grow under a guest write).
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::block::BlockDevice;
use vmm::devices::virtio::{ActiveQueues, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 8 << 20;
const QUEUE: u64 = 0x1000;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const INDIRECT: u64 = 0x40_0000;
const QSIZE: u16 = 16;
const DISK_SIZE: u64 = 256 << 10;

/// An in-memory disk that insists on in-range requests.
#[derive(Debug)]
struct MemDisk(Mutex<Vec<u8>>);

impl MemDisk {
    fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let end = offset.checked_add(len).expect("request range overflows");
        assert!(
            end <= DISK_SIZE,
            "out-of-range disk access reached the disk: {offset}+{len}"
        );
        offset as usize..end as usize
    }
}

impl vhd::DiskImage for MemDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vhd::Result<()> {
        let r = self.range(offset, buf.len() as u64);
        buf.copy_from_slice(&self.0.lock().expect("lock")[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> vhd::Result<()> {
        let r = self.range(offset, buf.len() as u64);
        self.0.lock().expect("lock")[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> vhd::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> vhd::Result<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> vhd::Result<()> {
        let r = self.range(offset, len);
        self.0.lock().expect("lock")[r].fill(0);
        Ok(())
    }
    fn size(&self) -> u64 {
        DISK_SIZE
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
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fuzz_target!(|data: &[u8]| {
    // Fresh memory and disk per input: runs are reproducible (the anonymous
    // mapping costs only the pages an input touches).
    let mem = &GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let mut inp = Input(data);
    let read_only = inp.byte() & 1 != 0;

    // The request header: a known type most of the time, any sector.
    let kind = match inp.byte() % 8 {
        0 => 0,  // IN
        1 => 1,  // OUT
        2 => 4,  // FLUSH
        3 => 8,  // GET_ID
        4 => 11, // DISCARD
        5 => 13, // WRITE_ZEROES
        _ => inp.u32(),
    };
    let sector = match inp.byte() % 4 {
        0 => inp.u64(),
        _ => u64::from(inp.u32()) % (DISK_SIZE / 512 + 8),
    };
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    let _ = mem.write_slice(&hdr, GuestAddress(HEADER));
    // Data (discard segments included) and an indirect table's worth of bytes.
    let n = usize::from(inp.byte()) * 4;
    let bytes = inp.take(n).to_vec();
    let _ = mem.write_slice(&bytes, GuestAddress(DATA));
    let ind = inp.take(8 * 16).to_vec();
    let _ = mem.write_slice(&ind, GuestAddress(INDIRECT));

    // The descriptors.
    let q = MockSplitQueue::create(mem, GuestAddress(QUEUE), QSIZE);
    let count = u16::from(inp.byte() % QSIZE as u8) + 1;
    let mut raw = Vec::new();
    let mut off = 0u64;
    for i in 0..count {
        let shape = inp.byte();
        let len = match shape % 8 {
            0 => u32::MAX,
            1 => 16,
            2 => 1,
            3 => 512 * u32::from(inp.byte() % 16 + 1),
            4 => inp.u32() % (8 << 20),
            _ => u32::from(inp.byte()) * 4,
        };
        let addr = match (shape >> 3) % 8 {
            0 => 0xffff_ffff_f000,
            1 => MEM_SIZE as u64 - 8,
            2 => INDIRECT,
            3 => QUEUE,
            _ if i == 0 => HEADER,
            _ => DATA + off,
        };
        off += u64::from(len.min(0x10_0000));
        let last = i + 1 == count;
        let write = u16::from(shape & 0x40 != 0) * 2;
        let flags = if shape & 0x80 != 0 {
            u16::from(inp.byte() & 7)
        } else {
            write | if last { 0 } else { 1 }
        };
        let next = if shape & 0x80 != 0 && inp.byte() & 1 != 0 {
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

    let disk: Arc<dyn vhd::DiskImage> = Arc::new(MemDisk(Mutex::new(vec![0; DISK_SIZE as usize])));
    let mut dev = BlockDevice::new(disk, read_only, "fuzz").expect("device");
    let event = Arc::new(EventFd::new(0).expect("eventfd"));
    let interrupt = Arc::new(Interrupt::new(EventFd::new(0).expect("irqfd")));
    let active = ActiveQueues {
        mem: mem.clone(),
        queues: vec![queue],
        queue_events: vec![event],
        interrupt,
    };
    dev.activate(VIRTIO_F_VERSION_1, active).expect("activate");
    assert!(dev.reset(), "the block worker died");
});
