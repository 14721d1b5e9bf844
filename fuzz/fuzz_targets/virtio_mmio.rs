//! Drives the virtio-mmio register file (`MmioTransport`) with guest-controlled
//! sequences of reads and writes: any offset (registers, config space, past the
//! window), any access size, any value, so feature negotiation, queue set-up
//! (sizes, ring addresses through the non-logging setters), activation,
//! notification, interrupt acknowledgement and reset run in any order. The
//! device behind it is a stub that records its activation.
//!
//! Oracles: nothing panics; a device is never activated twice without a reset
//! in between; after a status write of 0 the status reads 0 and the device is
//! not active; a read of `QueueNumMax` never exceeds the device's queue size.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::mmio::MmioTransport;
use vmm::devices::virtio::{ActivateError, ActiveQueues, Interrupt, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

const MAX_QUEUE: u16 = 16;

#[derive(Default)]
struct State {
    active: bool,
    activations: u32,
}

struct Stub(Arc<Mutex<State>>);

impl VirtioDevice for Stub {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[MAX_QUEUE, 8]
    }
    fn features(&self) -> u64 {
        (1 << 32) | (1 << 9) | 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        vmm::devices::virtio::read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, _features: u64, q: ActiveQueues) -> Result<(), ActivateError> {
        let mut s = self.0.lock().expect("lock");
        assert!(!s.active, "activated twice without a reset");
        assert_eq!(q.queues.len(), 2);
        s.active = true;
        s.activations += 1;
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.0.lock().expect("lock").active = false;
        true
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([self.byte()?, self.byte()?, self.byte()?, self.byte()?]))
    }
}

/// Register offsets the transport knows, so most accesses hit one.
const REGS: [u64; 24] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0fc, 0x100,
];

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
    let irq = Arc::new(Interrupt::new(EventFd::new(0).expect("eventfd")));
    let state = Arc::new(Mutex::new(State::default()));
    let mut t = MmioTransport::new(Box::new(Stub(state.clone())), mem, irq).expect("transport");
    let mut inp = Input(data);
    for _ in 0..4096 {
        let Some(op) = inp.byte() else { break };
        let offset = if op & 0x80 != 0 {
            u64::from(inp.u32().unwrap_or(0)) % 0x1100
        } else {
            REGS[usize::from(op) % REGS.len()]
        };
        let size = match (op >> 5) & 3 {
            0 | 1 => 4,
            2 => 1,
            _ => 2 + usize::from(inp.byte().unwrap_or(0) % 7),
        };
        if op & 0x10 != 0 {
            let mut buf = vec![0u8; size];
            t.read(offset, &mut buf);
            if offset == 0x034 && size == 4 {
                let v = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                assert!(v <= u32::from(MAX_QUEUE), "QueueNumMax {v}");
            }
        } else {
            // Values: small numbers (selectors, status bits, sizes) or anything.
            let v = if op & 0x08 != 0 {
                inp.u32().unwrap_or(0)
            } else {
                u32::from(inp.byte().unwrap_or(0))
            };
            let mut buf = v.to_le_bytes().to_vec();
            buf.resize(size, 0);
            t.write(offset, &buf);
            if offset == 0x070 && size == 4 && v == 0 {
                assert_eq!(t.status(), 0, "status after reset");
                assert!(!state.lock().expect("lock").active, "active after reset");
            }
        }
    }
});
