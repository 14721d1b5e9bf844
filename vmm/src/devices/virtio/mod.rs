//! Virtio devices over the MMIO transport (virtio 1.x).
//!
//! - [`VirtioDevice`]: what a device model offers (features, config space,
//!   activation with its queues).
//! - [`mmio::MmioTransport`]: the register file the guest drives.
//! - [`Interrupt`]: the interrupt status register and the irqfd behind it.
//!
//! Queue logic lives in each device's own module, apart from the event plumbing,
//! so it is unit-tested with virtio-queue's mock memory, without KVM.

pub mod block;
pub mod io_thread;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: a virtio 1.x (non-legacy) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device types.
pub const TYPE_NET: u32 = 1;
/// Block device type.
pub const TYPE_BLOCK: u32 = 2;
/// vsock device type.
pub const TYPE_VSOCK: u32 = 19;

/// Interrupt status bit: the device used buffers.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up the queues wrongly.
    #[error("the guest driver configured queue {0} wrongly (size or addresses)")]
    BadQueue(usize),
    /// The device's worker could not start.
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
    /// The device's rate limiter could not be set up.
    #[error("cannot set up the device's rate limiter: {0}")]
    RateLimiter(crate::devices::rate_limiter::RateLimiterError),
}

/// A device's interrupt: the transport's interrupt status plus the irqfd that
/// raises the device's GSI.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bit` in the interrupt status and raises the interrupt.
    pub fn trigger(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledges `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The irqfd (registered with KVM by the device manager).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActiveQueues {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues as the driver configured them.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled when the driver notifies it (by KVM
    /// ioeventfd, or by the transport when the notify write exits).
    pub queue_events: Vec<Arc<EventFd>>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device type.
    fn device_type(&self) -> u32;
    /// Largest size of each queue (their count is the device's queue count).
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queues and the accepted features.
    fn activate(&mut self, features: u64, queues: ActiveQueues) -> Result<(), ActivateError>;
    /// Stops the device (driver reset). Returns whether it could.
    fn reset(&mut self) -> bool;
}

/// Most descriptors the VMM follows in one chain. Our queues hold 256
/// entries, so a direct chain is never longer; only an indirect table (up to
/// 65 535 entries in virtio-queue) could be, and those are refused anyway.
pub const MAX_CHAIN_DESCRIPTORS: usize = 256;

/// `VIRTQ_DESC_F_NEXT` and `VIRTQ_DESC_F_INDIRECT`.
const DESC_F_NEXT: u16 = 1;
const DESC_F_INDIRECT: u16 = 4;

/// The chain's descriptors (both directions, in order), or None when it has
/// more than `max`: at most `max + 1` are read from guest memory.
pub fn chain_descriptors<M>(chain: &DescriptorChain<M>, max: usize) -> Option<Vec<Descriptor>>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let descs: Vec<Descriptor> = chain.clone().take(max.saturating_add(1)).collect();
    (descs.len() <= max).then_some(descs)
}

/// Whether the chain starting at `head` refers to an indirect descriptor
/// table. virtio-queue follows `VIRTQ_DESC_F_INDIRECT` whether or not
/// `VIRTIO_RING_F_INDIRECT_DESC` was negotiated, and none of our devices
/// offers it, so a device refuses such a chain. Walks the direct table only
/// (where an indirect descriptor must be), at most the queue size.
pub fn uses_indirect(queue: &Queue, mem: &GuestMemoryMmap, head: u16) -> bool {
    let table = GuestAddress(queue.desc_table());
    let size = queue.size();
    let mut index = head;
    for _ in 0..size {
        if index >= size {
            return false;
        }
        let Some(addr) = table.checked_add(u64::from(index) * 16) else {
            return false;
        };
        // flags at +12, next at +14 (virtq_desc).
        let Ok(flags) = mem.read_obj::<u16>(addr.unchecked_add(12)) else {
            return false;
        };
        let flags = u16::from_le(flags);
        if flags & DESC_F_INDIRECT != 0 {
            return true;
        }
        if flags & DESC_F_NEXT == 0 {
            return false;
        }
        let Ok(next) = mem.read_obj::<u16>(addr.unchecked_add(14)) else {
            return false;
        };
        index = u16::from_le(next);
    }
    false
}

/// Copies `config[offset..]` into `data`, zero-filling past the end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn indirect_chains_are_found_and_long_chains_cut() {
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let mock = MockSplitQueue::new(&mem, 16);
        // Chain 0: two direct descriptors. Chain 1 (head 2): one descriptor that
        // points at an indirect table of 300 entries.
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x8_0000, 16, DESC_F_NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x8_1000, 1, 2, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x9_0000, 300 * 16, DESC_F_INDIRECT, 0)),
        ];
        mock.add_desc_chains(&descs, 0).expect("chains");
        for i in 0..300u16 {
            let next = if i + 1 < 300 { DESC_F_NEXT } else { 0 };
            let d = SplitDescriptor::new(0x8_2000, 1, next, i + 1);
            mem.write_obj(d, GuestAddress(0x9_0000 + u64::from(i) * 16))
                .expect("indirect entry");
        }
        let mut q: Queue = mock.create_queue().expect("queue");
        let direct = q.pop_descriptor_chain(&mem).expect("chain 0");
        assert!(!uses_indirect(&q, &mem, direct.head_index()));
        assert_eq!(
            chain_descriptors(&direct, MAX_CHAIN_DESCRIPTORS).map(|d| d.len()),
            Some(2)
        );
        let indirect = q.pop_descriptor_chain(&mem).expect("chain 1");
        assert!(uses_indirect(&q, &mem, indirect.head_index()));
        // virtio-queue follows it (300 descriptors from a 16-entry queue)...
        assert_eq!(indirect.clone().count(), 300);
        // ...and the cap stops reading after MAX + 1.
        assert!(chain_descriptors(&indirect, MAX_CHAIN_DESCRIPTORS).is_none());
    }

    #[test]
    fn interrupt_status_and_ack() {
        let i = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        i.trigger(INT_USED_RING);
        i.trigger(INT_CONFIG);
        assert_eq!(i.status(), 3);
        i.ack(INT_USED_RING);
        assert_eq!(i.status(), INT_CONFIG);
        assert_eq!(i.irqfd().read().expect("raised"), 2);
    }
}
