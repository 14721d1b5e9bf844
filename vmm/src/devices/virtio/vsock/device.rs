//! The virtio-vsock device model and its worker thread.
//!
//! The worker waits on one epoll for: the rx, tx and event queue eventfds, the
//! muxer's epoll (host sockets), the muxer's next timeout, and a stop eventfd
//! (driver reset). After any wake-up it drains the tx queue into the muxer and
//! fills the guest's rx buffers with what the muxer has for the guest. Packets
//! only leave the muxer when a buffer is there for them; when the rx queue is
//! empty they wait until the guest kicks it.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::{read_tx, PacketError, RxChain};
use super::{LogLimit, VsockError, MAX_PAYLOAD};
use crate::devices::virtio::io_thread::{IoThread, Running};
use crate::devices::virtio::{
    read_config_bytes, uses_indirect, ActivateError, ActiveQueues, Interrupt, VirtioDevice,
    INT_USED_RING, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};
use crate::seccomp::{Ready, Seccomp, ThreadKind};

/// Size of each of the three queues.
const QUEUE_SIZE: u16 = 256;
/// Chains handled per queue per pass, so that a guest keeping a queue full
/// (or forging its avail index through our own writes) cannot keep the worker
/// from its other events.
const BUDGET: usize = QUEUE_SIZE as usize;

/// What a pass over a queue did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Progress {
    /// Buffers were used (the guest may need an interrupt).
    pub(crate) used: bool,
    /// The budget ran out with work left: come back without waiting.
    pub(crate) more: bool,
}

/// A virtio-vsock device with the hybrid unix socket host side.
pub struct VsockDevice {
    guest_cid: u32,
    config: [u8; 8],
    /// The host side; moved into the worker while the device is active.
    muxer: Option<Muxer>,
    /// Started with the VM ([`VsockDevice::start_io_thread`]).
    io: Option<IoThread>,
    worker: Option<Running<Muxer>>,
}

impl std::fmt::Debug for VsockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockDevice")
            .field("guest_cid", &self.guest_cid)
            .field("active", &self.worker.is_some())
            .finish()
    }
}

impl VsockDevice {
    /// A device for guest CID `cfg.guest_cid`; listens on `cfg.uds_path` now
    /// (a stale socket there is replaced).
    pub fn new(cfg: &vmm_api::VsockConfig) -> Result<Self, VsockError> {
        let muxer = Muxer::new(cfg.guest_cid, &cfg.uds_path)?;
        Ok(Self {
            guest_cid: cfg.guest_cid,
            config: u64::from(cfg.guest_cid).to_le_bytes(),
            muxer: Some(muxer),
            io: None,
            worker: None,
        })
    }

    /// Starts the I/O thread now (with the VM, before the guest runs), filtered
    /// when `seccomp` is on. Without it, activation starts an unfiltered one.
    pub fn start_io_thread(&mut self, seccomp: &Seccomp) -> io::Result<Ready> {
        let (t, ready) = IoThread::start("virtio-vsock".into(), ThreadKind::Vsock, seccomp)?;
        self.io = Some(t);
        Ok(ready)
    }

    /// The guest's context ID.
    pub fn guest_cid(&self) -> u32 {
        self.guest_cid
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, _features: u64, active: ActiveQueues) -> Result<(), ActivateError> {
        let ActiveQueues {
            mem,
            queues,
            queue_events,
            interrupt,
        } = active;
        if queues.len() != 3 || queue_events.len() != 3 {
            return Err(ActivateError::BadQueue(
                queues.len().min(queue_events.len()),
            ));
        }
        if self.io.is_none() {
            // Tests: no filter to install.
            self.start_io_thread(&Seccomp::off())
                .map_err(ActivateError::Worker)?;
        }
        let Some(io) = &self.io else {
            return Err(ActivateError::Worker(io::Error::other("no I/O thread")));
        };
        let muxer = self.muxer.take().ok_or_else(|| {
            ActivateError::Worker(io::Error::other(
                "the vsock host socket was lost when an earlier worker failed; restart the VM",
            ))
        })?;
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::BadQueue(0));
        };
        let worker = Worker {
            queues: VsockQueues::new(mem, rx, tx),
            muxer,
            interrupt,
            events: queue_events,
        };
        let running = io
            .run(move |stop| worker.run(stop))
            .map_err(ActivateError::Worker)?;
        self.worker = Some(running);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        let Some(running) = self.worker.take() else {
            return true;
        };
        let Some(io) = &self.io else {
            return false;
        };
        match io.stop(running) {
            Some(mut muxer) => {
                // The guest forgot its connections: so do we.
                muxer.reset();
                self.muxer = Some(muxer);
                true
            }
            None => false,
        }
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        self.reset();
    }
}

/// The rx and tx queues with the guest memory behind them: moves packets
/// between the guest and a [`Muxer`].
pub(crate) struct VsockQueues {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    tx_payload: Vec<u8>,
    rx_payload: Vec<u8>,
    log: LogLimit,
}

impl VsockQueues {
    pub(crate) fn new(mem: GuestMemoryMmap, rx: Queue, tx: Queue) -> Self {
        Self {
            mem,
            rx,
            tx,
            tx_payload: Vec::with_capacity(MAX_PAYLOAD),
            rx_payload: vec![0; MAX_PAYLOAD],
            log: LogLimit::new(10),
        }
    }

    fn queue_broken(&mut self, which: &str) {
        if self.log.allow() {
            tracing::warn!(
                "virtio-vsock: the guest broke its {which} queue (avail index or used ring); \
                 it stays stuck until the driver resets the device"
            );
        }
    }

    /// Hands tx packets to the muxer (at most [`BUDGET`] per call).
    pub(crate) fn process_tx(&mut self, muxer: &mut Muxer) -> Progress {
        let mut p = Progress::default();
        let mut rechecked = false;
        let mut budget = BUDGET;
        loop {
            let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) else {
                if rechecked {
                    // Entries announced but none to pop: a corrupt avail index.
                    self.queue_broken("tx");
                    return p;
                }
                // Re-check after enabling notifications so no packet is missed.
                match self.tx.enable_notification(&self.mem) {
                    Ok(true) => {
                        rechecked = true;
                        continue;
                    }
                    _ => return p,
                }
            };
            rechecked = false;
            let head = chain.head_index();
            let packet = if uses_indirect(&self.tx, &self.mem, head) {
                Err(PacketError::Chain)
            } else {
                read_tx(chain, &mut self.tx_payload)
            };
            match packet {
                Ok(hdr) => muxer.send_pkt(&hdr, &self.tx_payload),
                Err(e) => muxer.reject(&e),
            }
            if self.tx.add_used(&self.mem, head, 0).is_err() {
                self.queue_broken("tx");
                return p;
            }
            p.used = true;
            budget -= 1;
            if budget == 0 {
                p.more = true;
                return p;
            }
        }
    }

    /// Fills rx buffers with the muxer's packets while both last (at most
    /// [`BUDGET`] per call).
    pub(crate) fn process_rx(&mut self, muxer: &mut Muxer) -> Progress {
        let mut p = Progress::default();
        let mut rechecked = false;
        let mut budget = BUDGET;
        while muxer.has_rx() {
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
                if rechecked {
                    self.queue_broken("rx");
                    break;
                }
                // Out of buffers: wait for the guest's kick (after a re-check).
                match self.rx.enable_notification(&self.mem) {
                    Ok(true) => {
                        rechecked = true;
                        continue;
                    }
                    _ => break,
                }
            };
            rechecked = false;
            let head = chain.head_index();
            let rx_chain = if uses_indirect(&self.rx, &self.mem, head) {
                Err(PacketError::Chain)
            } else {
                RxChain::new(chain)
            };
            let len = match rx_chain {
                Ok(rx) => {
                    let cap = rx.payload_capacity();
                    match muxer.recv_pkt(&mut self.rx_payload[..cap]) {
                        Some((hdr, n)) => match rx.write(&self.mem, &hdr, &self.rx_payload[..n]) {
                            Ok(len) => len,
                            Err(e) => {
                                if self.log.allow() {
                                    tracing::debug!("virtio-vsock: {e}");
                                }
                                muxer.rx_failed(&hdr);
                                0
                            }
                        },
                        None if muxer.has_rx() => {
                            // Only data waits and this buffer holds a header
                            // alone: give it back empty, try the next one.
                            if self.log.allow() {
                                tracing::debug!("virtio-vsock: rx buffer without room for data");
                            }
                            0
                        }
                        None => {
                            // Nothing after all: leave the buffer to the guest.
                            self.rx.go_to_previous_position();
                            break;
                        }
                    }
                }
                Err(e) => {
                    // Unusable buffer: give it back empty.
                    if self.log.allow() {
                        tracing::debug!("virtio-vsock: {e}");
                    }
                    0
                }
            };
            if self.rx.add_used(&self.mem, head, len).is_err() {
                self.queue_broken("rx");
                break;
            }
            p.used = true;
            budget -= 1;
            if budget == 0 {
                p.more = muxer.has_rx();
                break;
            }
        }
        p
    }

    /// Raises the interrupt if the guest wants it for the queues used.
    fn notify(&mut self, rx: Progress, tx: Progress, interrupt: &Interrupt) {
        let (rx_used, tx_used) = (rx.used, tx.used);
        let mut needed = false;
        if rx_used {
            needed |= self.rx.needs_notification(&self.mem).unwrap_or(true);
        }
        if tx_used {
            needed |= self.tx.needs_notification(&self.mem).unwrap_or(true);
        }
        if needed {
            interrupt.trigger(INT_USED_RING);
        }
    }
}

struct Worker {
    queues: VsockQueues,
    muxer: Muxer,
    interrupt: Arc<Interrupt>,
    events: Vec<Arc<EventFd>>,
}

impl Worker {
    /// Runs until `stop` is signalled; returns the muxer for the next activation.
    fn run(mut self, stop: &EventFd) -> Muxer {
        const MUXER: u64 = 3;
        const STOP: u64 = 4;
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("virtio-vsock: cannot create epoll: {e}");
                return self.muxer;
            }
        };
        let mut fds: Vec<(i32, u64)> = self
            .events
            .iter()
            .enumerate()
            .map(|(i, e)| (e.as_raw_fd(), i as u64))
            .collect();
        fds.push((self.muxer.as_raw_fd(), MUXER));
        fds.push((stop.as_raw_fd(), STOP));
        for (fd, data) in fds {
            if let Err(e) = epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, data),
            ) {
                tracing::error!("virtio-vsock: epoll_ctl failed: {e}");
                return self.muxer;
            }
        }
        let mut events = [EpollEvent::default(); 8];
        loop {
            // The guest may have queued packets before it notified.
            let tx = self.queues.process_tx(&mut self.muxer);
            let rx = self.queues.process_rx(&mut self.muxer);
            self.queues.notify(rx, tx, &self.interrupt);

            let timeout = if tx.more || rx.more {
                0
            } else {
                self.muxer.next_deadline().map_or(-1, |d| {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so the wake-up is not early.
                    i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX)
                })
            };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-vsock: epoll_wait failed: {e}");
                    return self.muxer;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    STOP => return self.muxer,
                    MUXER => self.muxer.handle_events(),
                    q => {
                        // RX kick: buffers arrived; TX: packets; EVT: the
                        // guest's event buffers, which we never need.
                        if let Some(e) = self.events.get(q as usize) {
                            let _ = e.read();
                        }
                    }
                }
            }
            self.muxer.handle_timeouts(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::packet::{op, PacketHeader, HDR_LEN, HOST_CID, TYPE_STREAM};
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::time::Duration;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const CID: u32 = 3;
    const RX: usize = 0;
    const TX: usize = 1;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const RXQ: u64 = 0x1_0000;
    const TXQ: u64 = 0x2_0000;
    const EVQ: u64 = 0x3_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("mem")
    }

    fn gpkt(op: u16, src_port: u32, dst_port: u32, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: u64::from(CID),
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    /// A guest driver's view of the three queues in mock memory.
    struct Guest<'a> {
        mem: &'a GuestMemoryMmap,
        rx: MockSplitQueue<'a, GuestMemoryMmap>,
        tx: MockSplitQueue<'a, GuestMemoryMmap>,
        evq: MockSplitQueue<'a, GuestMemoryMmap>,
        rx_next: u16,
        tx_next: u16,
        rx_seen: u16,
    }

    impl<'a> Guest<'a> {
        fn new(mem: &'a GuestMemoryMmap) -> Self {
            Self {
                mem,
                rx: MockSplitQueue::create(mem, GuestAddress(RXQ), 16),
                tx: MockSplitQueue::create(mem, GuestAddress(TXQ), 16),
                evq: MockSplitQueue::create(mem, GuestAddress(EVQ), 16),
                rx_next: 0,
                tx_next: 0,
                rx_seen: 0,
            }
        }

        fn queues(&self) -> (Queue, Queue) {
            (
                self.rx.create_queue().expect("rx"),
                self.tx.create_queue().expect("tx"),
            )
        }

        /// Adds a chain of (addr, len, flags) to `q` at descriptor `*next`.
        fn add(q: &MockSplitQueue<'a, GuestMemoryMmap>, next: &mut u16, descs: &[(u64, u32, u16)]) {
            let base = *next % 16;
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, (a, l, f))| {
                    let last = i + 1 == descs.len();
                    let flags = if last { *f } else { f | F_NEXT };
                    RawDescriptor::from(SplitDescriptor::new(*a, *l, flags, base + i as u16 + 1))
                })
                .collect();
            q.add_desc_chains(&raw, base).expect("add chain");
            *next += descs.len() as u16;
        }

        /// Posts a packet on tx (header and payload in two buffers).
        fn send(&mut self, h: &PacketHeader, payload: &[u8]) {
            let slot = u64::from(self.tx_next % 16);
            let addr = 0x10_0000 + slot * 0x1_0000;
            self.mem
                .write_slice(&h.to_bytes(), GuestAddress(addr))
                .expect("hdr");
            self.mem
                .write_slice(payload, GuestAddress(addr + 0x100))
                .expect("payload");
            let descs = if payload.is_empty() {
                vec![(addr, HDR_LEN as u32, 0)]
            } else {
                vec![
                    (addr, HDR_LEN as u32, 0),
                    (addr + 0x100, payload.len() as u32, 0),
                ]
            };
            Self::add(&self.tx, &mut self.tx_next, &descs);
        }

        /// Posts a raw tx chain.
        fn send_raw(&mut self, descs: &[(u64, u32, u16)]) {
            Self::add(&self.tx, &mut self.tx_next, descs);
        }

        /// Posts one rx buffer of 44 + `payload` bytes (header and payload
        /// in separate buffers, as older Linux does).
        fn post_rx(&mut self, payload: u32) {
            let slot = u64::from(self.rx_next % 16);
            let addr = 0x80_0000 + slot * 0x2_0000;
            Self::add(
                &self.rx,
                &mut self.rx_next,
                &[
                    (addr, HDR_LEN as u32, F_WRITE),
                    (addr + 0x100, payload, F_WRITE),
                ],
            );
        }

        fn tx_used(&self) -> u16 {
            self.tx.used().idx().load()
        }

        /// Packets the device put in rx buffers since the last call.
        fn received(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
            let mut out = Vec::new();
            let used = self.rx.used().idx().load();
            while self.rx_seen != used {
                let elem = self
                    .rx
                    .used()
                    .ring()
                    .ref_at(usize::from(self.rx_seen % 16))
                    .expect("elem")
                    .load();
                self.rx_seen = self.rx_seen.wrapping_add(1);
                let head = elem.id() as u64;
                let desc = self.rx.desc_table().load(head as u16).expect("desc");
                let desc = SplitDescriptor::from(desc);
                let mut raw = [0u8; HDR_LEN];
                self.mem.read_slice(&mut raw, desc.addr()).expect("hdr");
                let h = PacketHeader::from_bytes(&raw);
                assert_eq!(elem.len(), HDR_LEN as u32 + h.len);
                let mut data = vec![0u8; h.len as usize];
                self.mem
                    .read_slice(&mut data, desc.addr().unchecked_add(0x100))
                    .expect("payload");
                out.push((h, data));
            }
            out
        }
    }

    struct Setup {
        _dir: tempfile::TempDir,
        path: PathBuf,
        muxer: Muxer,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm.sock");
        let muxer = Muxer::new(CID, &path).expect("muxer");
        Setup {
            _dir: dir,
            path,
            muxer,
        }
    }

    fn port_listener(path: &std::path::Path, port: u32) -> UnixListener {
        UnixListener::bind(super::super::muxer::port_path(path, port)).expect("bind")
    }

    #[test]
    fn guest_connect_relay_through_the_queues() {
        let mut s = setup();
        let listener = port_listener(&s.path, 1024);
        let m = mem();
        let mut g = Guest::new(&m);
        let (rx, tx) = g.queues();
        let mut q = VsockQueues::new(m.clone(), rx, tx);

        g.send(&gpkt(op::REQUEST, 4000, 1024, 0), &[]);
        assert!(q.process_tx(&mut s.muxer).used);
        assert_eq!(g.tx_used(), 1);
        let (mut host, _) = listener.accept().expect("accepted");
        // No rx buffer yet: the RESPONSE waits.
        assert!(!q.process_rx(&mut s.muxer).used);
        assert!(s.muxer.has_rx());
        g.post_rx(4096);
        assert!(q.process_rx(&mut s.muxer).used);
        let got = g.received();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].0.op, got[0].0.src_port, got[0].0.dst_port),
            (op::RESPONSE, 1024, 4000)
        );

        g.send(&gpkt(op::RW, 4000, 1024, 5), b"hello");
        q.process_tx(&mut s.muxer);
        let mut b = [0u8; 5];
        host.read_exact(&mut b).expect("read");
        assert_eq!(&b, b"hello");

        host.write_all(&[7u8; 6000]).expect("write");
        g.post_rx(4096);
        g.post_rx(4096);
        for _ in 0..100 {
            s.muxer.handle_events();
            q.process_rx(&mut s.muxer);
            if !s.muxer.has_rx() && g.rx.used().idx().load() == 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let got = g.received();
        let lens: Vec<usize> = got.iter().map(|(_, d)| d.len()).collect();
        assert_eq!(lens, [4096, 6000 - 4096]);
        assert!(got
            .iter()
            .all(|(h, d)| h.op == op::RW && d.iter().all(|b| *b == 7)));
    }

    #[test]
    fn hostile_tx_chains_do_not_panic() {
        let mut s = setup();
        let m = mem();
        let mut g = Guest::new(&m);
        let (rx, tx) = g.queues();
        let mut q = VsockQueues::new(m.clone(), rx, tx);
        // Truncated header, header outside memory, writable-only chain.
        g.send_raw(&[(0x10_0000, 10, 0)]);
        g.send_raw(&[(0xffff_ffff_0000, 44, 0)]);
        g.send_raw(&[(0x10_0000, 44, F_WRITE)]);
        q.process_tx(&mut s.muxer);
        assert_eq!(g.tx_used(), 3);
        assert!(!s.muxer.has_rx(), "nothing to answer without a header");
        // A header whose len exceeds the chain, and one over the limit.
        let h = gpkt(op::RW, 1, 2, 1000);
        m.write_slice(&h.to_bytes(), GuestAddress(0x20_0000))
            .expect("w");
        g.send_raw(&[(0x20_0000, 44, 0), (0x20_1000, 10, 0)]);
        let h = gpkt(op::RW, 1, 3, u32::MAX);
        m.write_slice(&h.to_bytes(), GuestAddress(0x30_0000))
            .expect("w");
        g.send_raw(&[(0x30_0000, 44, 0)]);
        q.process_tx(&mut s.muxer);
        assert_eq!(g.tx_used(), 5);
        // Both answered with RST.
        g.post_rx(64);
        g.post_rx(64);
        q.process_rx(&mut s.muxer);
        let got = g.received();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|(h, _)| h.op == op::RST));
    }

    #[test]
    fn unusable_rx_buffers_are_returned_empty() {
        let mut s = setup();
        let m = mem();
        let mut g = Guest::new(&m);
        let (rx, tx) = g.queues();
        let mut q = VsockQueues::new(m.clone(), rx, tx);
        g.send(&gpkt(op::REQUEST, 1, 7, 0), &[]); // nothing listens: RST
        q.process_tx(&mut s.muxer);
        // Too small for a header.
        Guest::add(&g.rx, &mut g.rx_next, &[(0x80_0000, 20, F_WRITE)]);
        // Outside guest memory.
        Guest::add(&g.rx, &mut g.rx_next, &[(0xffff_ffff_0000, 100, F_WRITE)]);
        assert!(q.process_rx(&mut s.muxer).used);
        assert_eq!(g.rx.used().idx().load(), 2);
        assert!(s.muxer.has_rx(), "the RST still waits for a good buffer");
        g.rx_seen = 2;
        g.post_rx(0);
        q.process_rx(&mut s.muxer);
        assert_eq!(g.received()[0].0.op, op::RST);
    }

    #[test]
    fn header_only_rx_buffers_do_not_stall_data() {
        let mut s = setup();
        let listener = port_listener(&s.path, 1024);
        let m = mem();
        let mut g = Guest::new(&m);
        let (rx, tx) = g.queues();
        let mut q = VsockQueues::new(m.clone(), rx, tx);
        g.send(&gpkt(op::REQUEST, 4000, 1024, 0), &[]);
        q.process_tx(&mut s.muxer);
        let (mut host, _) = listener.accept().expect("accepted");
        g.post_rx(64);
        q.process_rx(&mut s.muxer); // RESPONSE
        g.received();
        host.write_all(b"data").expect("write");
        for _ in 0..100 {
            s.muxer.handle_events();
            if s.muxer.has_rx() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Two buffers with no room for payload: returned empty, no spin.
        g.post_rx(0);
        g.post_rx(0);
        let p = q.process_rx(&mut s.muxer);
        assert!(p.used && !p.more);
        assert_eq!(g.rx.used().idx().load(), 3);
        assert!(s.muxer.has_rx());
        // A real buffer gets the data.
        g.rx_seen = 3;
        g.post_rx(64);
        q.process_rx(&mut s.muxer);
        let got = g.received();
        assert_eq!((got[0].0.op, &got[0].1[..]), (op::RW, &b"data"[..]));
    }

    #[test]
    fn a_forged_avail_index_does_not_hang_the_worker() {
        let mut s = setup();
        let m = mem();
        let mut g = Guest::new(&m);
        let (rx, tx) = g.queues();
        let mut q = VsockQueues::new(m.clone(), rx, tx);
        g.send(&gpkt(op::REQUEST, 1, 7, 0), &[]); // answered with RST
        assert!(q.process_tx(&mut s.muxer).used);
        // The guest claims far more entries than the queue holds.
        g.tx.avail().idx().store(1000);
        g.rx.avail().idx().store(1000);
        let tx = q.process_tx(&mut s.muxer);
        assert!(!tx.used && !tx.more);
        let rx = q.process_rx(&mut s.muxer);
        assert!(!rx.used && !rx.more);
        assert!(s.muxer.has_rx());
    }

    #[test]
    fn a_full_queue_is_served_in_bounded_passes() {
        let mut s = setup();
        let m = mem();
        let g = Guest::new(&m);
        let (rx, _) = g.queues();
        // A queue bigger than the budget, every entry pointing at one chain.
        let big = MockSplitQueue::create(&m, GuestAddress(0x4_0000), 512);
        m.write_slice(&gpkt(op::RST, 1, 7, 0).to_bytes(), GuestAddress(0x10_0000))
            .expect("hdr");
        big.desc_table()
            .store(
                0,
                RawDescriptor::from(SplitDescriptor::new(0x10_0000, 44, 0, 0)),
            )
            .expect("desc");
        for i in 0..512usize {
            big.avail().ring().ref_at(i).expect("slot").store(0);
        }
        big.avail().idx().store(512);
        let tx: Queue = big.create_queue().expect("queue");
        let mut q = VsockQueues::new(m.clone(), rx, tx);
        let p = q.process_tx(&mut s.muxer);
        assert!(p.used && p.more);
        assert_eq!(big.used().idx().load(), BUDGET as u16);
        assert!(q.process_tx(&mut s.muxer).used);
        assert_eq!(big.used().idx().load(), 512);
        let p = q.process_tx(&mut s.muxer);
        assert!(!p.used && !p.more);
    }

    fn active(
        g: &Guest<'_>,
        m: &GuestMemoryMmap,
    ) -> (ActiveQueues, Vec<Arc<EventFd>>, Arc<Interrupt>) {
        let (rx, tx) = g.queues();
        let evq: Queue = g.evq.create_queue().expect("evq");
        let events: Vec<Arc<EventFd>> = (0..3)
            .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")))
            .collect();
        let interrupt = Arc::new(Interrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).expect("irqfd"),
        ));
        (
            ActiveQueues {
                mem: m.clone(),
                queues: vec![rx, tx, evq],
                queue_events: events.clone(),
                interrupt: interrupt.clone(),
            },
            events,
            interrupt,
        )
    }

    fn wait_for(mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("timed out");
    }

    #[test]
    fn device_model_config_and_worker_lifecycle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm.sock");
        std::fs::write(&path, b"").expect("file");
        let cfg = vmm_api::VsockConfig {
            guest_cid: CID,
            uds_path: path.clone(),
        };
        assert!(matches!(
            VsockDevice::new(&cfg),
            Err(VsockError::NotASocket(_))
        ));
        std::fs::remove_file(&path).expect("rm");
        let mut dev = VsockDevice::new(&cfg).expect("device");
        assert_eq!(dev.device_type(), 19);
        assert_eq!(dev.queue_max_sizes().len(), 3);
        assert_eq!(dev.features(), VIRTIO_F_VERSION_1);
        let mut c = [0xffu8; 8];
        dev.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 3);
        let mut c = [0xffu8; 4];
        dev.read_config(4, &mut c);
        assert_eq!(c, [0; 4]);

        let m = mem();
        for round in 0..2 {
            let mut g = Guest::new(&m);
            let (act, events, irq) = active(&g, &m);
            dev.activate(VIRTIO_F_VERSION_1, act).expect("activate");
            // Host connects; the guest's rx buffer receives the REQUEST.
            let mut host = UnixStream::connect(&path).expect("connect");
            host.write_all(b"CONNECT 52\n").expect("write");
            g.post_rx(4096);
            events[RX].write(1).expect("kick");
            wait_for(|| g.rx.used().idx().load() == 1);
            let req = g.received()[0].0;
            assert_eq!((req.op, req.dst_port), (op::REQUEST, 52), "round {round}");
            wait_for(|| irq.status() & INT_USED_RING != 0);
            // The guest accepts; the host reads OK.
            g.send(&gpkt(op::RESPONSE, 52, req.src_port, 0), &[]);
            events[TX].write(1).expect("kick");
            let mut line = [0u8; 14];
            host.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            host.read_exact(&mut line).expect("ok line");
            assert_eq!(&line, format!("OK {}\n", req.src_port).as_bytes());
            // Reset stops the worker and drops the connection.
            assert!(dev.reset());
            let mut b = [0u8; 1];
            assert_eq!(host.read(&mut b).expect("eof"), 0);
        }
        assert!(dev.reset(), "reset when stopped");
        drop(dev);
        assert!(!path.exists());
    }
}
