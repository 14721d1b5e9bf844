//! The virtio-net device model and its I/O thread.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::frame::{check_frame, read_tx_chain, write_rx_chain, Limits, MAX_BUFFER, VNET_HDR_LEN};
use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO};
use crate::devices::rate_limiter::{RateLimiter, RateLimiterError};
use crate::devices::virtio::io_thread::{IoThread, Running};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, ActiveQueues, Interrupt, VirtioDevice, INT_USED_RING,
    TYPE_NET, VIRTIO_F_VERSION_1,
};
use crate::seccomp::{Ready, Seccomp, ThreadKind};

/// Feature bits (virtio 1.x, 5.1.3).
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// The driver accepts frames with a partial checksum.
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
/// The MTU is in config space.
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
/// The MAC is in config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The driver accepts TCPv4 segmentation frames.
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
/// The driver accepts TCPv6 segmentation frames.
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
/// The driver accepts UDP fragmentation frames.
pub const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << 10;
/// The device accepts TCPv4 segmentation frames.
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
/// The device accepts TCPv6 segmentation frames.
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
/// The link status is in config space.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Queue size of each queue.
const QUEUE_SIZE: u16 = 256;
/// Most frames moved per queue and wake-up before other events get a turn.
const MAX_FRAMES_PER_PASS: usize = 256;
/// Guest-triggerable errors logged per device before it stays quiet.
const MAX_LOGGED: u32 = 10;

/// A device's counters, shared with the control socket's `metrics`.
#[derive(Debug, Default)]
pub struct NetCounters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
    rate_limited: AtomicU64,
}

impl NetCounters {
    /// What the control socket reports.
    pub fn snapshot(&self) -> vmm_api::NetMetrics {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vmm_api::NetMetrics {
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            rx_dropped: l(&self.rx_dropped),
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            tx_dropped: l(&self.tx_dropped),
            rate_limited: l(&self.rate_limited),
        }
    }

    fn add(c: &AtomicU64, n: u64) {
        // Only the device's I/O thread writes: no locked instruction needed.
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
}

/// Errors creating a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MAC is not six hex pairs.
    #[error("mac {0:?} must be six hex pairs separated by ':'")]
    Mac(String),
    /// The TAP could not be opened or set up.
    #[error(transparent)]
    Tap(#[from] super::tap::TapError),
    /// The rate limit is invalid or its timer cannot be made.
    #[error(transparent)]
    RateLimit(#[from] RateLimiterError),
}

/// A virtio-net device over a TAP.
pub struct NetDevice {
    tap: Arc<Tap>,
    mtu: u16,
    rate_limit: Option<vmm_api::RateLimit>,
    config: [u8; 12],
    counters: Arc<NetCounters>,
    thread_name: String,
    /// Started with the VM ([`NetDevice::start_io_thread`]).
    io: Option<IoThread>,
    /// Each direction's limiter, made with the device (before the filters:
    /// a timerfd each when limited); the worker hands them back at reset.
    limiters: Option<(RateLimiter, RateLimiter)>,
    worker: Option<Running<(RateLimiter, RateLimiter)>>,
}

impl NetDevice {
    /// A device for `cfg`: opens its TAP (by name, or takes the inherited fd).
    pub fn new(cfg: &vmm_api::NetConfig) -> Result<Self, NetError> {
        let mac = cfg
            .mac_bytes()
            .ok_or_else(|| NetError::Mac(cfg.mac.clone()))?;
        let tap = match &cfg.tap {
            vmm_api::TapConfig::Name(name) => Tap::open_named(name)?,
            vmm_api::TapConfig::Fd(fd) => Tap::from_fd(*fd)?,
        };
        Self::with_tap(tap, mac, cfg.mtu()).with_rate_limit(cfg.rate_limit)
    }

    /// Limits each direction to `limit` (bytes and frames per second).
    pub fn with_rate_limit(mut self, limit: Option<vmm_api::RateLimit>) -> Result<Self, NetError> {
        self.limiters = Some((
            RateLimiter::new(limit.as_ref())?,
            RateLimiter::new(limit.as_ref())?,
        ));
        self.rate_limit = limit;
        Ok(self)
    }

    /// A device over an open `tap`.
    pub fn with_tap(tap: Tap, mac: [u8; 6], mtu: u16) -> Self {
        let mut config = [0u8; 12];
        config[0..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // one queue pair
        config[10..12].copy_from_slice(&mtu.to_le_bytes());
        Self {
            tap: Arc::new(tap),
            mtu,
            rate_limit: None,
            config,
            counters: Arc::default(),
            thread_name: "virtio-net".into(),
            io: None,
            limiters: RateLimiter::new(None).ok().zip(RateLimiter::new(None).ok()),
            worker: None,
        }
    }

    /// Starts the device's I/O thread, filtered before the guest can drive
    /// it when `seccomp` is on. Without it, activation starts an unfiltered
    /// one.
    pub fn start_io_thread(&mut self, seccomp: &Seccomp) -> std::io::Result<Ready> {
        let (t, ready) = IoThread::start(self.thread_name.clone(), ThreadKind::Net, seccomp)?;
        self.io = Some(t);
        Ok(ready)
    }

    /// Names the I/O thread after the interface's index in the VM's config
    /// (`virtio-net0`, ...).
    pub fn with_index(mut self, index: usize) -> Self {
        self.thread_name = format!("virtio-net{index}");
        self
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }
}

/// What the TAP may hand us, from what the guest accepts. TSO and UFO need
/// the checksum offload too (the TAP refuses them without it).
fn tap_offloads(features: u64) -> u32 {
    if features & VIRTIO_NET_F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = TUN_F_CSUM;
    if features & VIRTIO_NET_F_GUEST_TSO4 != 0 {
        f |= TUN_F_TSO4;
    }
    if features & VIRTIO_NET_F_GUEST_TSO6 != 0 {
        f |= TUN_F_TSO6;
    }
    if features & VIRTIO_NET_F_GUEST_UFO != 0 {
        f |= TUN_F_UFO;
    }
    f
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_MTU
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
            | VIRTIO_NET_F_GUEST_UFO
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, features: u64, active: ActiveQueues) -> Result<(), ActivateError> {
        let ActiveQueues {
            mem,
            queues,
            queue_events,
            interrupt,
        } = active;
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::BadQueue(0));
        };
        let (Some(rx_event), Some(tx_event)) =
            (queue_events.first().cloned(), queue_events.get(1).cloned())
        else {
            return Err(ActivateError::BadQueue(1));
        };
        let has = |f: u64| features & f != 0;
        let tx_limits = Limits {
            mtu: self.mtu,
            csum: has(VIRTIO_NET_F_CSUM),
            tso4: has(VIRTIO_NET_F_CSUM) && has(VIRTIO_NET_F_HOST_TSO4),
            tso6: has(VIRTIO_NET_F_CSUM) && has(VIRTIO_NET_F_HOST_TSO6),
            ufo: false,
        };
        let offl = tap_offloads(features);
        let rx_limits = Limits {
            mtu: self.mtu,
            csum: offl & TUN_F_CSUM != 0,
            tso4: offl & TUN_F_TSO4 != 0,
            tso6: offl & TUN_F_TSO6 != 0,
            ufo: offl & TUN_F_UFO != 0,
        };
        let (rx_limiter, tx_limiter) = self.limiters.take().ok_or_else(|| {
            ActivateError::Worker(std::io::Error::other(
                "the rate limiters were lost when an earlier worker failed; restart the VM",
            ))
        })?;
        if self.io.is_none() {
            // Built without a filtered thread (unit tests): an unfiltered one.
            self.start_io_thread(&Seccomp::off())
                .map_err(ActivateError::Worker)?;
        }
        let Some(io) = &self.io else {
            return Err(ActivateError::Worker(std::io::Error::other(
                "no I/O thread",
            )));
        };
        let worker = Worker {
            rx_limiter,
            tx_limiter,
            mem,
            rx,
            tx,
            tap: self.tap.clone(),
            interrupt,
            counters: self.counters.clone(),
            rx_limits,
            tx_limits,
            rx_buf: vec![0u8; MAX_BUFFER].into_boxed_slice(),
            rx_len: 0,
            tx_buf: vec![0u8; MAX_BUFFER].into_boxed_slice(),
            errors_logged: 0,
        };
        let offloads = tap_offloads(features);
        let running = io
            .run(move |stop| {
                // On the I/O thread (its filter allows TUNSETOFFLOAD; the
                // vCPU's does not). Without offloads the TAP hands over plain
                // frames, which every guest takes.
                if let Err(e) = worker.tap.set_offload(offloads) {
                    tracing::warn!("virtio-net: the TAP refused offloads {offloads:#x}: {e}");
                }
                worker.run(&rx_event, &tx_event, stop)
            })
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
            Some(limiters) => {
                self.limiters = Some(limiters);
                true
            }
            None => false,
        }
    }
}

/// The I/O thread's state. Its two buffers are allocated once, at the
/// largest frame the device ever moves; nothing is sized by the guest.
pub(super) struct Worker {
    pub(super) mem: GuestMemoryMmap,
    pub(super) rx: Queue,
    pub(super) tx: Queue,
    pub(super) tap: Arc<Tap>,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) counters: Arc<NetCounters>,
    pub(super) rx_limits: Limits,
    pub(super) tx_limits: Limits,
    /// A frame read from the TAP that waits for a receive buffer.
    pub(super) rx_buf: Box<[u8]>,
    /// Its length; 0 when none waits.
    pub(super) rx_len: usize,
    pub(super) tx_buf: Box<[u8]>,
    pub(super) errors_logged: u32,
    /// Frames toward the guest, and from it (each direction has its own).
    pub(super) rx_limiter: RateLimiter,
    pub(super) tx_limiter: RateLimiter,
}

impl Worker {
    /// Serves the queues until `stop`; hands back the rate limiters.
    fn run(
        mut self,
        rx_event: &EventFd,
        tx_event: &EventFd,
        stop: &EventFd,
    ) -> (RateLimiter, RateLimiter) {
        self.serve(rx_event, tx_event, stop);
        (self.rx_limiter, self.tx_limiter)
    }

    fn serve(&mut self, rx_event: &EventFd, tx_event: &EventFd, stop: &EventFd) {
        const RXQ: u64 = 0;
        const TXQ: u64 = 1;
        const TAP: u64 = 2;
        const STOP: u64 = 3;
        const RX_TIMER: u64 = 4;
        const TX_TIMER: u64 = 5;
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("virtio-net: cannot create epoll: {e}");
                return;
            }
        };
        let fds = [
            (rx_event.as_raw_fd(), RXQ, EventSet::IN),
            (tx_event.as_raw_fd(), TXQ, EventSet::IN),
            // Edge triggered: the TAP is read until it would block (or until
            // the guest has no buffers; its next rx notify resumes).
            (
                self.tap.as_raw_fd(),
                TAP,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (stop.as_raw_fd(), STOP, EventSet::IN),
        ];
        for (fd, data, set) in fds {
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, data)) {
                tracing::error!("virtio-net: epoll_ctl failed: {e}");
                return;
            }
        }
        let timers = [
            (self.rx_limiter.timer_fd(), RX_TIMER),
            (self.tx_limiter.timer_fd(), TX_TIMER),
        ];
        for (fd, data) in timers {
            let Some(fd) = fd else { continue };
            let ev = EpollEvent::new(EventSet::IN, data);
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, ev) {
                tracing::error!("virtio-net: epoll_ctl failed: {e}");
                return;
            }
        }
        // The guest may have queued frames and buffers before it notified.
        self.process_tx(tx_event);
        self.process_rx(rx_event);
        let mut events = vec![EpollEvent::default(); 6];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-net: epoll_wait failed: {e}");
                    return;
                }
            };
            let (mut rx, mut tx) = (false, false);
            for ev in &events[..n] {
                match ev.data() {
                    STOP => return,
                    RXQ => {
                        let _ = rx_event.read();
                        rx = true;
                    }
                    TXQ => {
                        let _ = tx_event.read();
                        tx = true;
                    }
                    RX_TIMER => {
                        self.rx_limiter.timer_fired();
                        rx = true;
                    }
                    TX_TIMER => {
                        self.tx_limiter.timer_fired();
                        tx = true;
                    }
                    _ => rx = true,
                }
            }
            // Transmit first: an echo's reply frees the guest's buffers.
            if tx {
                self.process_tx(tx_event);
            }
            if rx {
                self.process_rx(rx_event);
            }
        }
    }

    fn log(&mut self, what: &str, e: &dyn std::fmt::Display) {
        if self.errors_logged < MAX_LOGGED {
            self.errors_logged += 1;
            tracing::debug!("virtio-net: {what}: {e}");
        }
    }

    /// Sends the guest's frames to the TAP. Bounded: at most
    /// [`MAX_FRAMES_PER_PASS`] per call (then `tx_event` is re-signalled).
    pub(super) fn process_tx(&mut self, tx_event: &EventFd) {
        let mut used_any = false;
        let mut budget = MAX_FRAMES_PER_PASS;
        while budget > 0 && !self.tx_limiter.is_blocked() {
            let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            let frame = read_tx_chain(&self.mem, chain, &mut self.tx_buf, &self.tx_limits);
            if let Ok(len) = frame {
                if self
                    .tx_limiter
                    .consume((len - VNET_HDR_LEN) as u64, 1)
                    .is_err()
                {
                    // Put it back; the limiter's timer brings us back to it.
                    self.tx.go_to_previous_position();
                    NetCounters::add(&self.counters.rate_limited, 1);
                    break;
                }
            }
            match frame {
                Ok(len) => match self.tap.write(&self.tx_buf[..len]) {
                    Ok(_) => {
                        NetCounters::add(&self.counters.tx_frames, 1);
                        NetCounters::add(&self.counters.tx_bytes, (len - VNET_HDR_LEN) as u64);
                    }
                    Err(e) => {
                        NetCounters::add(&self.counters.tx_dropped, 1);
                        self.log("the TAP refused a frame", &e);
                    }
                },
                Err(e) => {
                    NetCounters::add(&self.counters.tx_dropped, 1);
                    self.log("dropped a guest frame", &e);
                }
            }
            if self.tx.add_used(&self.mem, head, 0).is_err() {
                self.log(
                    "the tx used ring is not writable",
                    &"the guest broke its queue",
                );
                return;
            }
            used_any = true;
        }
        if budget == 0 && !self.tx_limiter.is_blocked() {
            let _ = tx_event.write(1);
        }
        if used_any && self.tx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.trigger(INT_USED_RING);
        }
    }

    /// Moves frames from the TAP into the guest's receive buffers, until the
    /// TAP is empty or the guest has no buffer left (the frame read then
    /// waits in `rx_buf`). Bounded like [`Self::process_tx`].
    pub(super) fn process_rx(&mut self, rx_event: &EventFd) {
        let mut used_any = false;
        let mut budget = MAX_FRAMES_PER_PASS;
        loop {
            if self.rx_limiter.is_blocked() {
                break;
            }
            if budget == 0 {
                let _ = rx_event.write(1);
                break;
            }
            if self.rx_len == 0 {
                match self.tap.read(&mut self.rx_buf) {
                    Ok(n) => {
                        if let Err(e) = check_frame(&self.rx_buf[..n], &self.rx_limits) {
                            NetCounters::add(&self.counters.rx_dropped, 1);
                            self.log("dropped a frame from the TAP", &e);
                            budget -= 1;
                            continue;
                        }
                        self.rx_len = n;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.log("cannot read the TAP", &e);
                        break;
                    }
                }
            }
            let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let bytes = (self.rx_len - VNET_HDR_LEN) as u64;
            if self.rx_limiter.consume(bytes, 1).is_err() {
                // The frame waits in `rx_buf`, the buffer in the queue.
                self.rx.go_to_previous_position();
                NetCounters::add(&self.counters.rate_limited, 1);
                break;
            }
            budget -= 1;
            let head = chain.head_index();
            // num_buffers: one buffer per frame (no VIRTIO_NET_F_MRG_RXBUF).
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let frame = &self.rx_buf[..self.rx_len];
            let written = match write_rx_chain(&self.mem, chain, frame) {
                Ok(n) => {
                    NetCounters::add(&self.counters.rx_frames, 1);
                    NetCounters::add(&self.counters.rx_bytes, (self.rx_len - VNET_HDR_LEN) as u64);
                    n
                }
                Err(e) => {
                    NetCounters::add(&self.counters.rx_dropped, 1);
                    self.log("dropped a frame for the guest", &e);
                    0
                }
            };
            self.rx_len = 0;
            if self.rx.add_used(&self.mem, head, written).is_err() {
                self.log(
                    "the rx used ring is not writable",
                    &"the guest broke its queue",
                );
                return;
            }
            used_any = true;
        }
        if used_any && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.trigger(INT_USED_RING);
        }
    }
}

/// Drives the transmit path without a thread (the fuzz target and tests):
/// serves the available tx chains once (at most one pass) under
/// `rate_limit`, then returns the counters. `tap` is usually
/// [`Tap::datagram_pair`]'s.
#[doc(hidden)]
pub fn drive_tx(
    mem: GuestMemoryMmap,
    tx: Queue,
    tap: Tap,
    mtu: u16,
    features: u64,
    rate_limit: Option<vmm_api::RateLimit>,
) -> std::io::Result<vmm_api::NetMetrics> {
    let has = |f: u64| features & f != 0;
    let limits = Limits {
        mtu,
        csum: has(VIRTIO_NET_F_CSUM),
        tso4: has(VIRTIO_NET_F_CSUM) && has(VIRTIO_NET_F_HOST_TSO4),
        tso6: has(VIRTIO_NET_F_CSUM) && has(VIRTIO_NET_F_HOST_TSO6),
        ufo: false,
    };
    let limiter =
        || RateLimiter::new(rate_limit.as_ref()).map_err(|e| std::io::Error::other(e.to_string()));
    let rx = Queue::new(QUEUE_SIZE).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    let mut w = Worker {
        mem,
        rx,
        tx,
        tap: Arc::new(tap),
        interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK)?)),
        counters: Arc::default(),
        rx_limits: limits,
        tx_limits: limits,
        rx_buf: vec![0u8; MAX_BUFFER].into_boxed_slice(),
        rx_len: 0,
        tx_buf: vec![0u8; MAX_BUFFER].into_boxed_slice(),
        errors_logged: 0,
        rx_limiter: limiter()?,
        tx_limiter: limiter()?,
    };
    w.process_tx(&evt);
    Ok(w.counters.snapshot())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem")
    }

    /// One single-descriptor chain per `(addr, len, flags)`.
    fn queue(mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> Queue {
        let q = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(Descriptor::new(a, l, f, 0)))
            .collect();
        for (i, d) in raw.iter().enumerate() {
            q.add_desc_chains(std::slice::from_ref(d), i as u16)
                .expect("chain");
        }
        q.create_queue().expect("queue")
    }

    #[test]
    fn guest_frames_reach_the_tap_and_oversize_ones_are_counted() {
        let m = mem();
        let mtu = 1500u16;
        let ok_len = VNET_HDR_LEN + 14 + usize::from(mtu);
        let frame: Vec<u8> = (0..ok_len).map(|i| (i % 251) as u8).collect();
        let mut frame = frame;
        frame[..VNET_HDR_LEN].fill(0);
        m.write_slice(&frame, GuestAddress(0x10000)).expect("w");
        m.write_slice(&[0u8; 4096], GuestAddress(0x20000))
            .expect("w");
        let q = queue(
            &m,
            &[
                (0x10000, ok_len as u32, 0),
                (0x20000, ok_len as u32 + 1, 0), // one byte over the MTU
                (0x10000, 60, 0),
            ],
        );
        let (tap, peer) = Tap::datagram_pair().expect("pair");
        let got = drive_tx(m, q, tap, mtu, VIRTIO_F_VERSION_1, None).expect("drive");
        assert_eq!((got.tx_frames, got.tx_dropped), (2, 1), "{got:?}");
        assert_eq!(
            got.tx_bytes,
            (ok_len - VNET_HDR_LEN + 60 - VNET_HDR_LEN) as u64
        );
        let mut buf = vec![0u8; MAX_BUFFER];
        let n = peer.recv(&mut buf).expect("first frame");
        assert_eq!(&buf[..n], &frame[..]);
        assert_eq!(peer.recv(&mut buf).expect("second frame"), 60);
        assert!(
            peer.recv(&mut buf).is_err(),
            "the oversize frame never left"
        );
    }

    #[test]
    fn tap_frames_fill_guest_buffers_and_wait_when_there_are_none() {
        let m = mem();
        let (tap, peer) = Tap::datagram_pair().expect("pair");
        let limits = Limits {
            mtu: 1500,
            csum: false,
            tso4: false,
            tso6: false,
            ufo: false,
        };
        let rx = queue(&m, &[(0x10000, 2048, 2)]);
        let mut w = Worker {
            mem: m.clone(),
            rx,
            tx: Queue::new(16).expect("q"),
            tap: Arc::new(tap),
            interrupt: Arc::new(Interrupt::new(
                EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            )),
            counters: Arc::default(),
            rx_limits: limits,
            tx_limits: limits,
            rx_buf: vec![0u8; MAX_BUFFER].into_boxed_slice(),
            rx_len: 0,
            tx_buf: vec![0u8; MAX_BUFFER].into_boxed_slice(),
            errors_logged: 0,
            rx_limiter: RateLimiter::new(None).expect("unlimited"),
            tx_limiter: RateLimiter::new(None).expect("unlimited"),
        };
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut f1 = vec![0u8; VNET_HDR_LEN + 100];
        f1[VNET_HDR_LEN] = 0xaa;
        let big = vec![0u8; VNET_HDR_LEN + 14 + 1501];
        let f2 = vec![0u8; VNET_HDR_LEN + 64];
        peer.send(&big).expect("send"); // over the MTU: dropped
        peer.send(&f1).expect("send");
        peer.send(&f2).expect("send");
        w.process_rx(&evt);
        let c = w.counters.snapshot();
        assert_eq!((c.rx_frames, c.rx_dropped), (1, 1), "{c:?}");
        assert_eq!(c.rx_bytes, 100);
        let mut got = vec![0u8; f1.len()];
        m.read_slice(&mut got, GuestAddress(0x10000)).expect("r");
        assert_eq!(got[10..12], [1, 0], "num_buffers is 1");
        assert_eq!(got[VNET_HDR_LEN], 0xaa);
        // The second frame waits for a buffer.
        assert_eq!(w.rx_len, f2.len());
        assert_eq!(w.interrupt.status() & INT_USED_RING, INT_USED_RING);
    }

    #[test]
    fn the_tx_rate_limit_holds_frames_back_without_dropping_them() {
        let m = mem();
        m.write_slice(&[0u8; 100], GuestAddress(0x10000))
            .expect("w");
        let q = queue(&m, &[(0x10000, 100, 0); 5]);
        let (tap, peer) = Tap::datagram_pair().expect("pair");
        // Two frames of burst, then one a second.
        let limit = vmm_api::RateLimit {
            bytes: None,
            ops: Some(vmm_api::TokenBucket {
                per_second: 1,
                burst: Some(2),
            }),
        };
        let got = drive_tx(m, q, tap, 1500, VIRTIO_F_VERSION_1, Some(limit)).expect("drive");
        assert_eq!(
            (got.tx_frames, got.tx_dropped, got.rate_limited),
            (2, 0, 1),
            "{got:?}"
        );
        let mut buf = [0u8; 256];
        assert!(peer.recv(&mut buf).is_ok() && peer.recv(&mut buf).is_ok());
        assert!(peer.recv(&mut buf).is_err(), "the third frame waits");
    }
}
