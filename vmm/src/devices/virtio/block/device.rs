//! The virtio-blk device model and its I/O thread.

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use vhd::DiskImage;
use vmm_api::RateLimit;

use crate::seccomp::{Ready, Seccomp, ThreadKind};

use super::request::{
    process_chain, Target, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR, SERIAL_LEN,
};
use crate::devices::rate_limiter::RateLimiter;
use crate::devices::virtio::io_thread::{IoThread, Running};
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
    /// Started with the VM ([`BlockDevice::start_io_thread`]).
    io: Option<IoThread>,
    /// Bytes and requests the guest may ask for (None: unlimited).
    rate_limit: Option<RateLimit>,
    /// Its limiter, made with the I/O thread (before the filters: a timerfd
    /// when limited); the worker hands it back at reset.
    limiter: Option<RateLimiter>,
    /// The active worker.
    worker: Option<Running<RateLimiter>>,
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
            io: None,
            rate_limit: None,
            limiter: None,
            worker: None,
        })
    }

    /// Names the I/O thread after the disk's index in the VM's config
    /// (`virtio-blk0`, `virtio-blk1`, ...), so a thread list tells the disks apart.
    pub fn with_index(mut self, index: usize) -> Self {
        self.thread_name = format!("virtio-blk{index}");
        self
    }

    /// Starts the I/O thread now (with the VM, before the guest runs), filtered
    /// when `seccomp` is on, and makes the rate limiter (its timerfd) while
    /// no filter is in place. Without it, activation starts an unfiltered one.
    pub fn start_io_thread(&mut self, seccomp: &Seccomp) -> std::io::Result<Ready> {
        self.limiter = Some(
            RateLimiter::new(self.rate_limit.as_ref())
                .map_err(|e| std::io::Error::other(e.to_string()))?,
        );
        let (io, ready) = IoThread::start(self.thread_name.clone(), ThreadKind::Block, seccomp)?;
        self.io = Some(io);
        Ok(ready)
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
        let limiter = match self.limiter.take() {
            Some(l) => l,
            // Tests and fuzzing (no I/O thread started with a VM).
            None => {
                RateLimiter::new(self.rate_limit.as_ref()).map_err(ActivateError::RateLimiter)?
            }
        };
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
        if self.io.is_none() {
            // Tests and fuzzing: no filter to install.
            self.start_io_thread(&Seccomp::off())
                .map_err(ActivateError::Worker)?;
        }
        let Some(io) = &self.io else {
            return Err(ActivateError::Worker(std::io::Error::other(
                "no I/O thread",
            )));
        };
        let running = io
            .run(move |stop| worker.run(&event, stop))
            .map_err(ActivateError::Worker)?;
        self.worker = Some(running);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        match (self.worker.take(), &self.io) {
            (Some(running), Some(io)) => match io.stop(running) {
                Some(limiter) => {
                    self.limiter = Some(limiter);
                    true
                }
                None => false,
            },
            (Some(_), None) => false,
            (None, _) => true,
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
    /// Serves the queue until `stop`; hands back the rate limiter.
    fn run(mut self, queue_event: &EventFd, stop: &EventFd) -> RateLimiter {
        self.serve(queue_event, stop);
        self.limiter
    }

    fn serve(&mut self, queue_event: &EventFd, stop: &EventFd) {
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

    /// Serves one of each request kind (write, flush, read, discard,
    /// write-zeroes, get-id, and a write far out that grows the image) through
    /// the device on `disk`, with its I/O thread filtered; returns the statuses.
    fn serve_every_kind(disk: Arc<dyn DiskImage>, seccomp: &crate::seccomp::Seccomp) -> Vec<u8> {
        use virtio_queue::desc::{split::Descriptor as D, RawDescriptor};
        use vm_memory::Bytes;
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("mem");
        let mock = MockSplitQueue::new(&mem, 32);
        let size_sectors = disk.size() / SECTOR;
        // (type, sector, data length, data written by the device)
        let kinds: [(u32, u64, u32, bool); 7] = [
            (1, 0, 4096, false),                // OUT
            (1, size_sectors - 8, 4096, false), // OUT at the end: allocates
            (4, 0, 0, false),                   // FLUSH
            (0, 0, 4096, true),                 // IN
            (11, 0, 16, false),                 // DISCARD
            (13, 8, 16, false),                 // WRITE_ZEROES
            (8, 0, 20, true),                   // GET_ID
        ];
        let mut raw = Vec::new();
        let mut statuses = Vec::new();
        for (i, &(kind, sector, len, device_writes)) in kinds.iter().enumerate() {
            let base = 0x10_0000 + i as u64 * 0x1_0000;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&h, GuestAddress(base)).expect("header");
            if kind == 11 || kind == 13 {
                // One segment: sector, 8 sectors, flags 0.
                let mut seg = [0u8; 16];
                seg[0..8].copy_from_slice(&sector.to_le_bytes());
                seg[8..12].copy_from_slice(&8u32.to_le_bytes());
                mem.write_slice(&seg, GuestAddress(base + 0x100))
                    .expect("segment");
            } else if kind == 1 {
                mem.write_slice(&[0x5a; 4096], GuestAddress(base + 0x100))
                    .expect("data");
            }
            let first = raw.len() as u16;
            raw.push(RawDescriptor::from(D::new(base, 16, NEXT, first + 1)));
            if len > 0 {
                let flags = NEXT | if device_writes { WRITE } else { 0 };
                raw.push(RawDescriptor::from(D::new(
                    base + 0x100,
                    len,
                    flags,
                    first + 2,
                )));
            }
            let status = base + 0x8000;
            mem.write_obj(0xffu8, GuestAddress(status)).expect("status");
            raw.push(RawDescriptor::from(D::new(status, 1, WRITE, 0)));
            statuses.push(status);
        }
        mock.add_desc_chains(&raw, 0).expect("chains");
        let mut dev = BlockDevice::new(disk, false, "filtered").expect("device");
        let ready = dev.start_io_thread(seccomp).expect("start");
        ready.wait().expect("filter installed");
        let active = ActiveQueues {
            mem: mem.clone(),
            queues: vec![mock.create_queue().expect("queue")],
            queue_events: vec![Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))],
            interrupt: Arc::new(Interrupt::new(
                EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            )),
        };
        dev.activate(VIRTIO_F_VERSION_1, active).expect("activate");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while mock.used().idx().load() < kinds.len() as u16 {
            assert!(std::time::Instant::now() < deadline, "requests not served");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(dev.reset(), "the worker stops");
        statuses
            .iter()
            .map(|&a| mem.read_obj::<u8>(GuestAddress(a)).expect("status"))
            .collect()
    }

    /// The virtio-blk filter allows what serving each request kind takes on
    /// each image format (in a fresh copy of the test binary: a syscall
    /// outside the filter kills it).
    #[test]
    fn the_block_filter_allows_every_request_kind_on_every_format() {
        if crate::seccomp::tests::is_child() {
            let seccomp = crate::seccomp::Seccomp::on().expect("filters");
            let dir = tempfile::tempdir().expect("tempdir");
            let size = 4 << 20;
            let base = dir.path().join("base.raw");
            vhd::create(&base, vhd::Format::Raw, &vhd::CreateOptions::new(size)).expect("base");
            for format in [vhd::Format::Raw, vhd::Format::Qcow2, vhd::Format::Vhd] {
                let path = dir.path().join(format!("d.{format:?}"));
                vhd::create(&path, format, &vhd::CreateOptions::new(size)).expect("create");
                let disk = vhd::open(&path, format, vhd::OpenOptions::read_write()).expect("open");
                let statuses = serve_every_kind(disk, &seccomp);
                eprintln!("{format:?}: statuses {statuses:?}");
                assert!(statuses.iter().all(|&s| s == 0), "{format:?}: {statuses:?}");
            }
            // A qcow2 overlay reads through to its base.
            let overlay = dir.path().join("o.qcow2");
            let b =
                vhd::open(&base, vhd::Format::Raw, vhd::OpenOptions::read_only()).expect("base");
            vhd::create_diff(
                &overlay,
                vhd::Format::Qcow2,
                &vhd::BaseRef {
                    image: b.clone(),
                    name: "base.raw".into(),
                },
                None,
                None,
            )
            .expect("overlay");
            let disk = vhd::open(
                &overlay,
                vhd::Format::Qcow2,
                vhd::OpenOptions::read_write().with_backing(b),
            )
            .expect("open overlay");
            let statuses = serve_every_kind(disk, &seccomp);
            assert!(statuses.iter().all(|&s| s == 0), "overlay: {statuses:?}");
            eprintln!("every format served");
            return;
        }
        let out = crate::seccomp::tests::in_child(
            "devices::virtio::block::device::tests::the_block_filter_allows_every_request_kind_on_every_format",
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.contains("every format served"),
            "{:?} (signal {:?}: 31 is SIGSYS)\n{stderr}",
            out.status,
            crate::seccomp::tests::signal_of(&out)
        );
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
        let name = dev.io.as_ref().and_then(|t| t.name().map(str::to_owned));
        assert_eq!(name.as_deref(), Some("virtio-blk2"));
        assert!(dev.reset(), "the I/O thread stops");
    }
}
