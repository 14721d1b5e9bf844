//! The virtio-blk device model and its I/O thread.

use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use vhd::DiskImage;
use vmm_api::RateLimit;

use super::request::{
    process_chain, Target, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR, SERIAL_LEN,
};
use crate::devices::rate_limiter::RateLimiter;
use crate::devices::virtio::{
    chain_descriptors, read_config_bytes, uses_indirect, ActivateError, ActiveQueues, Interrupt,
    VirtioDevice, INT_USED_RING, MAX_CHAIN_DESCRIPTORS, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

/// Most requests served per wake-up before other events get a turn.
const MAX_CHAINS_PER_PASS: usize = 256;
/// Queue size of the one request queue.
const QUEUE_SIZE: u16 = 256;
/// Most data segments per request we advertise (queue size less header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The serial is longer than virtio-blk's 20 bytes.
    #[error("disk serial {0:?} is longer than 20 bytes; pick a shorter one")]
    SerialTooLong(String),
    /// The disk's size is not a whole number of sectors.
    #[error("disk size {0} is not a multiple of 512 bytes; resize the image")]
    Size(u64),
}

/// A virtio-blk device.
pub struct BlockDevice {
    disk: Arc<dyn DiskImage>,
    read_only: bool,
    serial: [u8; SERIAL_LEN],
    config: [u8; 60],
    features: u64,
    /// The I/O thread's name: `virtio-blk<index>`.
    thread_name: String,
    /// Bytes and requests the guest may ask for (None: unlimited).
    rate_limit: Option<RateLimit>,
    worker: Option<(JoinHandle<()>, EventFd)>,
}

impl BlockDevice {
    /// A device over `disk`; `read_only` also refuses guest writes when the
    /// image itself is writable.
    pub fn new(
        disk: Arc<dyn DiskImage>,
        read_only: bool,
        serial: &str,
    ) -> Result<Self, BlockError> {
        if serial.len() > SERIAL_LEN {
            return Err(BlockError::SerialTooLong(serial.into()));
        }
        let size = disk.size();
        if !size.is_multiple_of(SECTOR) {
            return Err(BlockError::Size(size));
        }
        let read_only = read_only || disk.read_only();
        let mut id = [0u8; SERIAL_LEN];
        id[..serial.len()].copy_from_slice(serial.as_bytes());
        let mut features =
            VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH;
        if read_only {
            features |= VIRTIO_BLK_F_RO;
        } else {
            features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let mut config = [0u8; 60];
        config[0..8].copy_from_slice(&(size / SECTOR).to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        config[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        config[44..48].copy_from_slice(&8u32.to_le_bytes()); // 4 KiB alignment
        config[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        Ok(Self {
            disk,
            read_only,
            serial: id,
            config,
            features,
            thread_name: "virtio-blk".into(),
            rate_limit: None,
            worker: None,
        })
    }

    /// Names the I/O thread after the disk's index in the VM's config
    /// (`virtio-blk0`, `virtio-blk1`, ...), so a thread list tells the disks apart.
    pub fn with_index(mut self, index: usize) -> Self {
        self.thread_name = format!("virtio-blk{index}");
        self
    }

    /// Holds the guest to `limit`: a request is taken off the queue only when
    /// the buckets hold its data bytes and one operation; until they refill the
    /// I/O thread sleeps on the limiter's timer and the rest stay queued.
    pub fn with_rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.rate_limit = limit;
        self
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, _features: u64, active: ActiveQueues) -> Result<(), ActivateError> {
        let ActiveQueues {
            mem,
            mut queues,
            queue_events,
            interrupt,
        } = active;
        let (Some(queue), Some(event)) = (queues.pop(), queue_events.first().cloned()) else {
            return Err(ActivateError::BadQueue(0));
        };
        let limiter =
            RateLimiter::new(self.rate_limit.as_ref()).map_err(ActivateError::RateLimiter)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let stop_worker = stop.try_clone().map_err(ActivateError::Worker)?;
        let worker = Worker {
            disk: self.disk.clone(),
            read_only: self.read_only,
            serial: self.serial,
            mem,
            queue,
            interrupt,
            limiter,
            errors_logged: 0,
        };
        let handle = std::thread::Builder::new()
            .name(self.thread_name.clone())
            .spawn(move || worker.run(&event, &stop_worker))
            .map_err(ActivateError::Worker)?;
        self.worker = Some((handle, stop));
        Ok(())
    }

    fn reset(&mut self) -> bool {
        match self.worker.take() {
            Some((handle, stop)) => stop.write(1).is_ok() && handle.join().is_ok(),
            None => true,
        }
    }
}

/// The I/O thread's state: storage calls block, so they run here, never on a vCPU.
struct Worker {
    disk: Arc<dyn DiskImage>,
    read_only: bool,
    serial: [u8; SERIAL_LEN],
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    limiter: RateLimiter,
    errors_logged: u32,
}

/// Data bytes a request moves, charged to the rate limiter: every descriptor
/// but the header (first) and the status (last). Bounded by the queue size.
fn request_bytes<M>(chain: &virtio_queue::DescriptorChain<M>) -> u64
where
    M: std::ops::Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    match chain_descriptors(chain, MAX_CHAIN_DESCRIPTORS).as_deref() {
        Some([_, data @ .., _]) => data.iter().map(|d| u64::from(d.len())).sum(),
        _ => 0,
    }
}

impl Worker {
    fn run(mut self, queue_event: &EventFd, stop: &EventFd) {
        const QUEUE: u64 = 0;
        const STOP: u64 = 1;
        const TIMER: u64 = 2;
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("virtio-blk: cannot create epoll: {e}");
                return;
            }
        };
        for (fd, data) in [(queue_event, QUEUE), (stop, STOP)] {
            if let Err(e) = epoll.ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(fd),
                EpollEvent::new(EventSet::IN, data),
            ) {
                tracing::error!("virtio-blk: epoll_ctl failed: {e}");
                return;
            }
        }
        if let Some(fd) = self.limiter.timer_fd() {
            if let Err(e) = epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TIMER),
            ) {
                tracing::error!("virtio-blk: epoll_ctl failed: {e}");
                return;
            }
        }
        // The guest may have queued requests before it notified.
        self.process_queue(queue_event);
        let mut events = vec![EpollEvent::default(); 3];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-blk: epoll_wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    STOP => return,
                    TIMER => {
                        self.limiter.timer_fired();
                        self.process_queue(queue_event);
                    }
                    _ => {
                        let _ = queue_event.read();
                        // While rate limited the timer brings the thread back.
                        if !self.limiter.is_blocked() {
                            self.process_queue(queue_event);
                        }
                    }
                }
            }
        }
    }

    /// Serves the queue. Bounded: at most [`MAX_CHAINS_PER_PASS`] requests per
    /// call (then `queue_event` is re-signalled so the thread comes back after
    /// other events), and a queue whose available index is bogus (more entries
    /// claimed than the queue holds) is not served at all, so a hostile guest
    /// cannot make this thread spin. A request the rate limiter refuses is put
    /// back on the queue and the pass ends (the limiter's timer resumes it).
    fn process_queue(&mut self, queue_event: &EventFd) {
        let target = Target {
            disk: self.disk.as_ref(),
            read_only: self.read_only,
            serial: &self.serial,
        };
        let mut used_any = false;
        let mut budget = MAX_CHAINS_PER_PASS;
        let mut limited = false;
        loop {
            let mut popped = 0usize;
            while budget > 0 {
                let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) else {
                    break;
                };
                if self.limiter.consume(request_bytes(&chain), 1).is_err() {
                    // Leave it queued; fewer guest kicks while we wait.
                    self.queue.go_to_previous_position();
                    let _ = self.queue.disable_notification(&self.mem);
                    limited = true;
                    break;
                }
                budget -= 1;
                popped += 1;
                let head = chain.head_index();
                let (len, err) = if uses_indirect(&self.queue, &self.mem, head) {
                    // VIRTIO_RING_F_INDIRECT_DESC is not offered: no status
                    // written (the chain is not read), used length 0.
                    (
                        0,
                        Some(super::RequestError::Malformed("indirect descriptor")),
                    )
                } else {
                    process_chain(chain, &target)
                };
                if let Some(e) = err {
                    // Guest-triggerable: log a few, then stay quiet.
                    if self.errors_logged < 10 {
                        self.errors_logged += 1;
                        tracing::debug!("virtio-blk request failed: {e}");
                    }
                }
                if self.queue.add_used(&self.mem, head, len).is_err() {
                    tracing::warn!(
                        "virtio-blk: the used ring is not writable; the guest broke its queue"
                    );
                    return;
                }
                used_any = true;
            }
            if limited {
                break;
            }
            if budget == 0 {
                // Come back for the rest after other events.
                let _ = queue_event.write(1);
                break;
            }
            // Re-check after enabling notifications so no request is missed.
            match self.queue.enable_notification(&self.mem) {
                Ok(true) if popped > 0 => continue,
                Ok(true) => {
                    // More is claimed but nothing can be popped: the available
                    // index is bogus. Stop; a driver reset recovers the device.
                    if self.errors_logged < 10 {
                        self.errors_logged += 1;
                        tracing::debug!("virtio-blk: the guest's available index is invalid");
                    }
                    break;
                }
                _ => break,
            }
        }
        if used_any && self.queue.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.trigger(INT_USED_RING);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    /// Regression (found by the `virtio_blk_request` fuzz target): an available
    /// index that claims more entries than the queue holds made the I/O thread
    /// spin forever.
    #[test]
    fn a_bogus_available_index_does_not_hang_the_io_thread() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let mock = MockSplitQueue::new(&mem, 16);
        let queue: Queue = mock.create_queue().expect("queue");
        mock.avail().idx().store(16 + 5);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.raw");
        std::fs::write(&path, vec![0u8; 4096]).expect("disk");
        let disk =
            vhd::open(&path, vhd::Format::Raw, vhd::OpenOptions::read_write()).expect("open");
        let irq = Arc::new(Interrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        ));
        let mut worker = Worker {
            disk,
            read_only: false,
            serial: [0; SERIAL_LEN],
            mem: mem.clone(),
            queue,
            interrupt: irq,
            limiter: RateLimiter::new(None).expect("unlimited"),
            errors_logged: 0,
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            worker.process_queue(&evt);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("process_queue returned instead of spinning");
    }

    /// A worker over a 32-entry mock queue holding `n` one-sector reads, each
    /// a (header, 512-byte buffer, status) chain.
    fn worker_with_reads(
        mem: &GuestMemoryMmap,
        n: u16,
        limit: Option<RateLimit>,
    ) -> (Worker, tempfile::TempDir, GuestAddress) {
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use vm_memory::Bytes;
        let mock = MockSplitQueue::new(mem, 32);
        let hdr = GuestAddress(0x8_0000);
        mem.write_slice(&[0u8; 16], hdr)
            .expect("header: T_IN, sector 0");
        let mut descs = Vec::new();
        for i in 0..n {
            let base = 3 * i;
            let data = 0x9_0000 + u64::from(i) * 0x1000;
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                hdr.0,
                16,
                1,
                base + 1,
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                data,
                512,
                1 | 2,
                base + 2,
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                data + 0x800,
                1,
                2,
                0,
            )));
        }
        mock.add_desc_chains(&descs, 0).expect("chains");
        let queue: Queue = mock.create_queue().expect("queue");
        let used_idx = mock.used_addr().unchecked_add(2);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.raw");
        std::fs::write(&path, vec![0u8; 4096]).expect("disk");
        let disk =
            vhd::open(&path, vhd::Format::Raw, vhd::OpenOptions::read_write()).expect("open");
        let worker = Worker {
            disk,
            read_only: false,
            serial: [0; SERIAL_LEN],
            mem: mem.clone(),
            queue,
            interrupt: Arc::new(Interrupt::new(
                EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            )),
            limiter: RateLimiter::new(limit.as_ref()).expect("limiter"),
            errors_logged: 0,
        };
        (worker, dir, used_idx)
    }

    /// Requests the limiter refuses stay queued (none dropped) and are served
    /// when its timer fires. Without the limiter all six go in the first pass.
    #[test]
    fn a_rate_limited_disk_serves_the_burst_then_resumes_on_its_timer() {
        use vmm_api::TokenBucket;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let limit = RateLimit {
            // 4 KiB/s with a 1 KiB burst: two 512-byte reads, then one per 125 ms.
            bytes: Some(TokenBucket {
                per_second: 4096,
                burst: Some(1024),
            }),
            // Not the binding bucket here; both are charged.
            ops: Some(TokenBucket {
                per_second: 1000,
                burst: Some(3),
            }),
        };
        let (mut worker, _dir, used_at) = worker_with_reads(&mem, 6, Some(limit));
        let used_idx = |mem: &GuestMemoryMmap| {
            vm_memory::Bytes::read_obj::<u16>(mem, used_at).expect("used idx")
        };
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        worker.process_queue(&evt);
        assert_eq!(used_idx(&mem), 2, "the bytes burst: two reads");
        assert!(worker.limiter.is_blocked());
        // A guest kick while blocked serves nothing (the run loop skips it, and
        // process_queue itself refuses too).
        worker.process_queue(&evt);
        assert_eq!(used_idx(&mem), 2);
        let epoll = Epoll::new().expect("epoll");
        let fd = worker.limiter.timer_fd().expect("timer");
        epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
            .expect("add");
        let start = std::time::Instant::now();
        let mut evs = [EpollEvent::default()];
        while used_idx(&mem) < 6 {
            assert!(start.elapsed() < Duration::from_secs(10), "stalled");
            let n = epoll.wait(5000, &mut evs).expect("wait");
            assert_eq!(n, 1, "the limiter's timer fired");
            worker.limiter.timer_fired();
            worker.process_queue(&evt);
        }
        // Four more 512-byte reads at 4 KiB/s: 0.5 s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(8),
            "{took:?}"
        );
    }

    /// virtio-queue would follow an indirect table even though the device never
    /// offered VIRTIO_RING_F_INDIRECT_DESC; the device refuses the chain
    /// without reading it (the status byte stays untouched, used length 0).
    #[test]
    fn an_indirect_chain_is_refused() {
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use vm_memory::Bytes;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let (mut worker, _dir, used_at) = worker_with_reads(&mem, 0, None);
        // A valid read request, in an indirect table at 0xa0000.
        let mock = MockSplitQueue::new(&mem, 32);
        let hdr = 0x8_0000u64;
        mem.write_slice(&[0u8; 16], GuestAddress(hdr))
            .expect("header");
        let status = GuestAddress(0x9_0800);
        mem.write_obj(0xaau8, status).expect("status");
        let table = [
            SplitDescriptor::new(hdr, 16, 1, 1),
            SplitDescriptor::new(0x9_0000, 512, 1 | 2, 2),
            SplitDescriptor::new(status.0, 1, 2, 0),
        ];
        for (i, d) in table.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(0xa_0000 + 16 * i as u64))
                .expect("table");
        }
        mock.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                0xa_0000, 48, 4, 0,
            ))],
            0,
        )
        .expect("chain");
        // MockSplitQueue::new reset the rings at the same addresses; the worker's
        // queue still points there.
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        worker.process_queue(&evt);
        let used: u16 = mem.read_obj(used_at).expect("used idx");
        assert_eq!(used, 1, "the chain is given back");
        let len: u32 = mem
            .read_obj(used_at.unchecked_add(2 + 4))
            .expect("used len");
        assert_eq!(len, 0);
        assert_eq!(
            mem.read_obj::<u8>(status).expect("status"),
            0xaa,
            "the request did not run"
        );
    }

    #[test]
    fn the_io_thread_is_named_after_the_disk_index() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let mock = MockSplitQueue::new(&mem, 16);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.raw");
        std::fs::write(&path, vec![0u8; 4096]).expect("disk");
        let disk =
            vhd::open(&path, vhd::Format::Raw, vhd::OpenOptions::read_write()).expect("open");
        let mut dev = BlockDevice::new(disk, false, "d2")
            .expect("device")
            .with_index(2);
        let active = ActiveQueues {
            mem: mem.clone(),
            queues: vec![mock.create_queue().expect("queue")],
            queue_events: vec![Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))],
            interrupt: Arc::new(Interrupt::new(
                EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            )),
        };
        dev.activate(VIRTIO_F_VERSION_1, active).expect("activate");
        let name = dev
            .worker
            .as_ref()
            .and_then(|(h, _)| h.thread().name().map(str::to_owned));
        assert_eq!(name.as_deref(), Some("virtio-blk2"));
        assert!(dev.reset(), "the I/O thread stops");
    }
}
