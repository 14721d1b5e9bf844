//! The virtio-blk device model and its I/O thread.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use vhd::DiskImage;

use crate::seccomp::{Ready, Seccomp, ThreadKind};

use super::request::{process_chain, Target, MAX_DISCARD_SEGMENTS, SECTOR, SERIAL_LEN};
use crate::devices::virtio::io_thread::{IoThread, Running};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, ActiveQueues, Interrupt, VirtioDevice, INT_USED_RING,
    TYPE_BLOCK, VIRTIO_F_VERSION_1,
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
/// Longest discard / write-zeroes range, in sectors (bounded so one request
/// cannot keep the I/O thread busy for long).
const MAX_DISCARD_SECTORS: u32 = (64 << 20) / 512;

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
    /// The active worker.
    worker: Option<Running<()>>,
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
    /// when `seccomp` is on. Without it, activation starts an unfiltered one.
    pub fn start_io_thread(&mut self, seccomp: &Seccomp) -> std::io::Result<Ready> {
        let (io, ready) = IoThread::start(self.thread_name.clone(), ThreadKind::Block, seccomp)?;
        self.io = Some(io);
        Ok(ready)
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
        let worker = Worker {
            disk: self.disk.clone(),
            read_only: self.read_only,
            serial: self.serial,
            mem,
            queue,
            interrupt,
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
            (Some(running), Some(io)) => io.stop(running).is_some(),
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
    errors_logged: u32,
}

impl Worker {
    fn run(mut self, queue_event: &EventFd, stop: &EventFd) {
        const QUEUE: u64 = 0;
        const STOP: u64 = 1;
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
        // The guest may have queued requests before it notified.
        self.process_queue(queue_event);
        let mut events = vec![EpollEvent::default(); 2];
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
                    _ => {
                        let _ = queue_event.read();
                        self.process_queue(queue_event);
                    }
                }
            }
        }
    }

    /// Serves the queue. Bounded: at most [`MAX_CHAINS_PER_PASS`] requests per
    /// call (then `queue_event` is re-signalled so the thread comes back after
    /// other events), and a queue whose available index is bogus (more entries
    /// claimed than the queue holds) is not served at all, so a hostile guest
    /// cannot make this thread spin.
    fn process_queue(&mut self, queue_event: &EventFd) {
        let target = Target {
            disk: self.disk.as_ref(),
            read_only: self.read_only,
            serial: &self.serial,
        };
        let mut used_any = false;
        let mut budget = MAX_CHAINS_PER_PASS;
        loop {
            let mut popped = 0usize;
            while budget > 0 {
                let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) else {
                    break;
                };
                budget -= 1;
                popped += 1;
                let head = chain.head_index();
                let (len, err) = process_chain(chain, &target);
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
    use vm_memory::GuestAddress;

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
