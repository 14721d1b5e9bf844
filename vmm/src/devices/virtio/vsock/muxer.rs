//! The vsock muxer: the listening unix socket, the connections by port pair,
//! and the queue of packets waiting for guest rx buffers.
//!
//! All host file descriptors (the listener, host streams waiting for their
//! `CONNECT` line, connections' streams) sit in the muxer's own epoll, whose
//! descriptor the device worker watches: when it is readable the worker calls
//! [`Muxer::handle_events`]. Interest is level-triggered and kept minimal (a
//! connection whose stream is known readable stops asking for reads until a
//! read would block), so a guest that posts no rx buffers cannot make the
//! worker spin.
//!
//! Host memory per connection is bounded by [`CONN_BUF_SIZE`], the number of
//! connections by [`MAX_CONNECTIONS`], and queued control packets by
//! [`MAX_PENDING_CONTROL`].

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, ResetReason};
use super::packet::{op, PacketError, PacketHeader, HOST_CID, TYPE_STREAM};
use super::{LogLimit, VsockError, MAX_CONNECTIONS, MAX_PENDING_CONTROL, MAX_PENDING_HOST};

/// Local ports of host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>` line.
const MAX_CONNECT_LINE: usize = 32;
/// How long a host client has to send its `CONNECT` line.
const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long accepting pauses after `accept` failed (out of descriptors).
const ACCEPT_PAUSE: Duration = Duration::from_secs(1);
/// Events handled per [`Muxer::handle_events`] call.
const EVENTS_PER_CALL: usize = 64;
/// Connections accepted per listener event.
const ACCEPTS_PER_EVENT: usize = 16;

const LISTENER_TOKEN: u64 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

impl ConnKey {
    /// The connection a guest packet belongs to.
    fn of(hdr: &PacketHeader) -> Self {
        Self {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Owner {
    Listener,
    Pending,
    Conn(ConnKey),
}

#[derive(Debug)]
struct Entry {
    conn: Connection<UnixStream>,
    token: u64,
    /// Still registered with epoll (not after the stream hung up).
    in_epoll: bool,
    events: EventSet,
    in_rxq: bool,
}

/// A host client that has not sent its `CONNECT <port>` line yet.
#[derive(Debug)]
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

#[derive(Debug)]
enum RxItem {
    /// A packet outside any connection (RST).
    Ctrl(PacketHeader),
    /// A connection with something to send.
    Conn(ConnKey),
}

/// The host side of a vsock device (see the module docs).
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    listener_paused_until: Option<Instant>,
    epoll: Epoll,
    conns: HashMap<ConnKey, Entry>,
    tokens: HashMap<u64, Owner>,
    pending: HashMap<u64, PendingHost>,
    next_token: u64,
    next_local_port: u32,
    rxq: VecDeque<RxItem>,
    ctrl_queued: usize,
    log: LogLimit,
}

/// `<uds_path>_<port>`: where a guest connection to host port `port` goes.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(uds_path.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to the unix socket at `path` without blocking (a full backlog
/// fails with `WouldBlock` instead of stalling the worker).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

/// Parses `CONNECT <port>` (surrounding whitespace allowed).
fn parse_connect(line: &[u8]) -> Option<u32> {
    std::str::from_utf8(line)
        .ok()?
        .trim()
        .strip_prefix("CONNECT ")?
        .trim()
        .parse()
        .ok()
}

fn interest_events(read: bool, write: bool) -> EventSet {
    let mut e = EventSet::empty();
    if read {
        e |= EventSet::IN;
    }
    if write {
        e |= EventSet::OUT;
    }
    e
}

impl Muxer {
    /// Listens on `uds_path` (replacing a stale socket there) for a guest
    /// with context ID `guest_cid`.
    pub fn new(guest_cid: u32, uds_path: &Path) -> Result<Self, VsockError> {
        if guest_cid < 3 || guest_cid == u32::MAX {
            return Err(VsockError::Cid(guest_cid));
        }
        match std::fs::symlink_metadata(uds_path) {
            Ok(m) if m.file_type().is_socket() => {
                std::fs::remove_file(uds_path).map_err(|source| VsockError::RemoveStale {
                    path: uds_path.into(),
                    source,
                })?;
            }
            Ok(_) => return Err(VsockError::NotASocket(uds_path.into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(VsockError::RemoveStale {
                    path: uds_path.into(),
                    source,
                })
            }
        }
        let bind_err = |source| VsockError::Bind {
            path: uds_path.into(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        let mut tokens = HashMap::new();
        tokens.insert(LISTENER_TOKEN, Owner::Listener);
        Ok(Self {
            guest_cid: u64::from(guest_cid),
            uds_path: uds_path.into(),
            listener,
            listener_paused_until: None,
            epoll,
            conns: HashMap::new(),
            tokens,
            pending: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_local_port: FIRST_LOCAL_PORT,
            rxq: VecDeque::new(),
            ctrl_queued: 0,
            log: LogLimit::new(20),
        })
    }

    /// The guest's context ID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The listening socket's path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection and queued packet (device reset); the listener
    /// stays.
    pub fn reset(&mut self) {
        for (_, e) in self.conns.drain() {
            if e.in_epoll {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    e.conn.stream().as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
        for (_, p) in self.pending.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.tokens.retain(|_, o| matches!(o, Owner::Listener));
        self.rxq.clear();
        self.ctrl_queued = 0;
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    // ----- host side --------------------------------------------------------

    /// Handles the host events that are ready (never blocks).
    pub fn handle_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENTS_PER_CALL];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                tracing::warn!("vsock: epoll_wait failed: {e}");
                return;
            }
        };
        let now = Instant::now();
        for ev in &events[..n] {
            // An owner removed earlier in this batch has no token any more.
            match self.tokens.get(&ev.data()).copied() {
                Some(Owner::Listener) => self.accept(now),
                Some(Owner::Pending) => self.pending_readable(ev.data(), now),
                Some(Owner::Conn(key)) => self.conn_event(key, ev.event_set(), now),
                None => {}
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPTS_PER_EVENT {
            match self.listener.accept() {
                Ok((stream, _)) => self.add_pending(stream, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, typically: the listener would stay
                    // readable, so stop watching it for a while.
                    tracing::warn!(
                        "vsock: accept on {} failed: {e}; pausing new host connections",
                        self.uds_path.display()
                    );
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        self.listener.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    self.listener_paused_until = Some(now + ACCEPT_PAUSE);
                    return;
                }
            }
        }
    }

    fn add_pending(&mut self, stream: UnixStream, now: Instant) {
        if self.pending.len() >= MAX_PENDING_HOST || self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!(
                "vsock: too many host connections on {}; closing a new one",
                self.uds_path.display()
            );
            return;
        }
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let token = self.token();
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )
            .is_err()
        {
            return;
        }
        self.tokens.insert(token, Owner::Pending);
        self.pending.insert(
            token,
            PendingHost {
                stream,
                line: Vec::new(),
                deadline: now + CONNECT_LINE_TIMEOUT,
            },
        );
    }

    fn drop_pending(&mut self, token: u64) -> Option<PendingHost> {
        let p = self.pending.remove(&token)?;
        self.tokens.remove(&token);
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            p.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        Some(p)
    }

    /// Reads the `CONNECT` line a byte at a time: what follows the newline is
    /// the connection's data and stays in the socket.
    fn pending_readable(&mut self, token: u64, now: Instant) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let complete = loop {
            if p.line.len() >= MAX_CONNECT_LINE {
                break false;
            }
            let mut b = [0u8; 1];
            match p.stream.read(&mut b) {
                Ok(0) => break false,
                Ok(_) if b[0] == b'\n' => break true,
                Ok(_) => p.line.push(b[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        let Some(p) = self.drop_pending(token) else {
            return;
        };
        match parse_connect(&p.line).filter(|_| complete) {
            Some(port) => self.host_connect(p.stream, port, now),
            None => tracing::warn!(
                "vsock: a host client on {} did not send `CONNECT <port>\\n`; closed it",
                self.uds_path.display()
            ),
        }
    }

    /// A host client asked for guest port `peer_port`: send the guest a REQUEST.
    fn host_connect(&mut self, stream: UnixStream, peer_port: u32, now: Instant) {
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing a host connection");
            return;
        }
        let Some(local_port) = self.alloc_local_port() else {
            return;
        };
        let conn = Connection::new_local(stream, self.guest_cid, local_port, peer_port, now);
        self.insert(
            ConnKey {
                local_port,
                peer_port,
            },
            conn,
        );
    }

    /// A local port no open connection uses.
    fn alloc_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == p) {
                return Some(p);
            }
        }
        None
    }

    /// Registers a new connection; returns false (and drops it) when epoll refuses.
    fn insert(&mut self, key: ConnKey, conn: Connection<UnixStream>) -> bool {
        let token = self.token();
        let i = conn.interest();
        let events = interest_events(i.read, i.write);
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            conn.stream().as_raw_fd(),
            EpollEvent::new(events, token),
        ) {
            tracing::warn!("vsock: cannot watch a connection: {e}");
            return false;
        }
        self.tokens.insert(token, Owner::Conn(key));
        self.conns.insert(
            key,
            Entry {
                conn,
                token,
                in_epoll: true,
                events,
                in_rxq: false,
            },
        );
        self.refresh(key);
        true
    }

    fn conn_event(&mut self, key: ConnKey, set: EventSet, now: Instant) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // Reported whatever the interest: stop watching, or it never ends.
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                e.conn.stream().as_raw_fd(),
                EpollEvent::default(),
            );
            e.in_epoll = false;
            e.conn.on_host_hangup(now);
        } else {
            if set.contains(EventSet::IN) {
                e.conn.on_host_readable();
            }
            if set.contains(EventSet::OUT) {
                e.conn.on_host_writable(now);
            }
        }
        self.refresh(key);
    }

    /// After anything happened to a connection: remove it when done, update
    /// its epoll interest, queue it for rx when it has a packet.
    fn refresh(&mut self, key: ConnKey) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        if e.conn.is_done() {
            self.remove(key);
            return;
        }
        if e.in_epoll {
            let i = e.conn.interest();
            let want = interest_events(i.read, i.write);
            if want != e.events {
                if self
                    .epoll
                    .ctl(
                        ControlOperation::Modify,
                        e.conn.stream().as_raw_fd(),
                        EpollEvent::new(want, e.token),
                    )
                    .is_err()
                {
                    e.conn.reset(ResetReason::HostIo);
                    self.remove(key);
                    return;
                }
                e.events = want;
            }
        }
        if !e.in_rxq && e.conn.has_rx() {
            e.in_rxq = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
    }

    fn remove(&mut self, key: ConnKey) {
        let Some(e) = self.conns.remove(&key) else {
            return;
        };
        self.tokens.remove(&e.token);
        if e.in_epoll {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                e.conn.stream().as_raw_fd(),
                EpollEvent::default(),
            );
        }
        if e.in_rxq {
            self.rxq
                .retain(|i| !matches!(i, RxItem::Conn(k) if *k == key));
        }
        if let Some(why) = e.conn.reset_reason() {
            if self.log.allow() {
                tracing::debug!(
                    local_port = key.local_port,
                    guest_port = key.peer_port,
                    "vsock: connection reset: {why:?}"
                );
            }
        }
        if e.conn.rst_on_remove() {
            self.push_ctrl(e.conn.rst_header());
        }
    }

    fn push_ctrl(&mut self, hdr: PacketHeader) {
        if self.ctrl_queued >= MAX_PENDING_CONTROL {
            if self.log.allow() {
                tracing::debug!("vsock: the guest takes no rx packets; dropping a reset");
            }
            return;
        }
        self.ctrl_queued += 1;
        self.rxq.push_back(RxItem::Ctrl(hdr));
    }

    /// Answers the guest's packet `hdr` with RST (unless it is one).
    fn reply_rst(&mut self, hdr: &PacketHeader) {
        if hdr.op == op::RST {
            return;
        }
        self.push_ctrl(PacketHeader {
            src_cid: hdr.dst_cid,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: hdr.type_,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    // ----- timers -----------------------------------------------------------

    /// The earliest timeout, for the worker's wait.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter_map(|e| e.conn.deadline())
            .chain(self.pending.values().map(|p| p.deadline))
            .chain(self.listener_paused_until)
            .min()
    }

    /// Runs the timeouts that passed by `now`.
    pub fn handle_timeouts(&mut self, now: Instant) {
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(e) = self.conns.get_mut(&key) {
                e.conn.on_timeout(now);
            }
            self.refresh(key);
        }
        let stale: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in stale {
            self.drop_pending(t);
        }
        if self.listener_paused_until.is_some_and(|d| d <= now) {
            self.listener_paused_until = None;
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                self.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            ) {
                tracing::warn!("vsock: cannot watch the listener again: {e}");
                self.listener_paused_until = Some(now + ACCEPT_PAUSE);
            }
        }
    }

    // ----- guest side -------------------------------------------------------

    /// A packet the guest sent (tx queue); `payload` is its data (RW only).
    pub fn send_pkt(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        let now = Instant::now();
        if hdr.src_cid != self.guest_cid {
            // Spoofed source: there is no one to answer.
            if self.log.allow() {
                tracing::debug!(
                    src_cid = hdr.src_cid,
                    "vsock: dropped a packet with a wrong source CID"
                );
            }
            return;
        }
        let key = ConnKey::of(hdr);
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            if self.log.allow() {
                tracing::debug!(
                    dst_cid = hdr.dst_cid,
                    type_ = hdr.type_,
                    "vsock: refused a packet for another CID or of another socket type"
                );
            }
            if !(hdr.dst_cid == HOST_CID && self.reset_conn(key)) {
                self.reply_rst(hdr);
            }
            return;
        }
        if let Some(e) = self.conns.get_mut(&key) {
            e.conn.deliver(hdr, payload, now);
            self.refresh(key);
            return;
        }
        match hdr.op {
            op::REQUEST => self.guest_connect(hdr),
            op::RST => {}
            _ => self.reply_rst(hdr),
        }
    }

    /// A tx chain the guest broke: reset the connection its header names.
    pub fn reject(&mut self, err: &PacketError) {
        if self.log.allow() {
            tracing::debug!("vsock: malformed packet from the guest: {err}");
        }
        let Some(hdr) = err.header() else {
            return;
        };
        if hdr.src_cid != self.guest_cid {
            return;
        }
        let key = ConnKey::of(hdr);
        if !self.reset_conn(key) {
            self.reply_rst(hdr);
        }
    }

    /// Resets connection `key` (RST to the guest); false when there is none.
    fn reset_conn(&mut self, key: ConnKey) -> bool {
        let Some(e) = self.conns.get_mut(&key) else {
            return false;
        };
        e.conn.reset(ResetReason::Protocol(0));
        self.refresh(key);
        true
    }

    /// The guest connects to host port `hdr.dst_port`: connect `<uds>_<port>`.
    fn guest_connect(&mut self, hdr: &PacketHeader) {
        if self.conns.len() >= MAX_CONNECTIONS {
            if self.log.allow() {
                tracing::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing the guest's");
            }
            self.reply_rst(hdr);
            return;
        }
        let path = port_path(&self.uds_path, hdr.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                if !self.insert(ConnKey::of(hdr), Connection::new_peer(stream, hdr)) {
                    self.reply_rst(hdr);
                }
            }
            Err(e) => {
                if self.log.allow() {
                    tracing::debug!(
                        "vsock: guest connection to port {} refused ({}: {e})",
                        hdr.dst_port,
                        path.display()
                    );
                }
                self.reply_rst(hdr);
            }
        }
    }

    /// Whether a packet waits for an rx buffer.
    pub fn has_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// The next packet for the guest, its payload (at most `buf.len()`
    /// bytes) in `buf`. Connections take turns. `None` after one pass over
    /// the queue found nothing that fits: then, if [`Muxer::has_rx`] still
    /// holds, what waits is data and `buf` is empty.
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<(PacketHeader, usize)> {
        let now = Instant::now();
        // One pass: a connection that cannot use `buf` goes back to the end.
        for _ in 0..self.rxq.len() {
            let Some(item) = self.rxq.pop_front() else {
                break;
            };
            match item {
                RxItem::Ctrl(h) => {
                    self.ctrl_queued = self.ctrl_queued.saturating_sub(1);
                    return Some((h, 0));
                }
                RxItem::Conn(key) => {
                    let Some(e) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    e.in_rxq = false;
                    let pkt = e.conn.next_rx(buf, now);
                    self.refresh(key);
                    if pkt.is_some() {
                        return pkt;
                    }
                }
            }
        }
        None
    }

    /// A packet taken with [`Muxer::recv_pkt`] could not be written to the
    /// guest: its connection cannot continue.
    pub fn rx_failed(&mut self, hdr: &PacketHeader) {
        if hdr.op != op::RST {
            self.reset_conn(ConnKey {
                local_port: hdr.src_port,
                peer_port: hdr.dst_port,
            });
        }
    }
}

impl AsRawFd for Muxer {
    /// The muxer's epoll: readable when a host event waits.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::packet::{SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};
    use crate::devices::virtio::vsock::{CONN_BUF_SIZE, MAX_PAYLOAD};
    use std::io::{BufRead, BufReader, Write};

    const CID: u32 = 42;

    struct Env {
        _dir: tempfile::TempDir,
        path: PathBuf,
        m: Muxer,
    }

    fn env() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm.sock");
        let m = Muxer::new(CID, &path).expect("muxer");
        Env { _dir: dir, path, m }
    }

    fn gpkt(op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
        PacketHeader {
            src_cid: u64::from(CID),
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    impl Env {
        /// Waits up to `ms` for host events, then handles them.
        fn pump(&mut self, ms: i32) {
            let mut ev = [EpollEvent::default(); 1];
            let _ = self.m.epoll.wait(ms, &mut ev);
            self.m.handle_events();
            self.m.handle_timeouts(Instant::now());
        }

        /// Everything queued for the guest.
        fn rx(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
            let mut out = Vec::new();
            let mut buf = vec![0u8; MAX_PAYLOAD];
            while let Some((h, n)) = self.m.recv_pkt(&mut buf) {
                assert_eq!(h.len as usize, n);
                out.push((h, buf[..n].to_vec()));
                assert!(out.len() < 10_000);
            }
            out
        }

        /// Pumps until a packet for the guest appears.
        fn rx_wait(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
            for _ in 0..100 {
                let got = self.rx();
                if !got.is_empty() {
                    return got;
                }
                self.pump(20);
            }
            panic!("no packet for the guest");
        }

        /// A host client connects and asks for guest port `port`.
        fn host_connect(&mut self, port: u32) -> (UnixStream, PacketHeader) {
            let mut s = UnixStream::connect(&self.path).expect("connect");
            s.write_all(format!("CONNECT {port}\n").as_bytes())
                .expect("write");
            let pkts = self.rx_wait();
            assert_eq!(pkts.len(), 1);
            let req = pkts[0].0;
            assert_eq!(
                (req.op, req.dst_port, req.src_cid, req.dst_cid),
                (op::REQUEST, port, HOST_CID, u64::from(CID))
            );
            assert!(req.src_port >= FIRST_LOCAL_PORT);
            (s, req)
        }

        fn guest_send(&mut self, h: &PacketHeader, payload: &[u8]) {
            let mut h = *h;
            h.len = payload.len() as u32;
            self.m.send_pkt(&h, payload);
        }
    }

    fn read_line(s: &UnixStream) -> String {
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).expect("line");
        line
    }

    #[test]
    fn host_initiated_connect_ok_and_relay() {
        let mut t = env();
        let (mut host, req) = t.host_connect(52);
        host.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        // Guest accepts.
        let resp = gpkt(op::RESPONSE, 52, req.src_port);
        t.guest_send(&resp, &[]);
        assert_eq!(read_line(&host), format!("OK {}\n", req.src_port));
        // Guest -> host.
        t.guest_send(&gpkt(op::RW, 52, req.src_port), b"from guest");
        let mut got = [0u8; 10];
        host.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"from guest");
        // Host -> guest.
        host.write_all(b"from host").expect("write");
        let pkts = t.rx_wait();
        assert_eq!(pkts[0].0.op, op::RW);
        assert_eq!(pkts[0].1, b"from host");
        assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (req.src_port, 52));
        assert_eq!(t.m.connection_count(), 1);
    }

    #[test]
    fn host_data_sent_before_ok_is_relayed_after_it() {
        let mut t = env();
        let mut s = UnixStream::connect(&t.path).expect("connect");
        s.write_all(b"CONNECT 7\nearly bytes").expect("write");
        let req = t.rx_wait()[0].0;
        t.guest_send(&gpkt(op::RESPONSE, 7, req.src_port), &[]);
        let pkts = t.rx_wait();
        assert_eq!(pkts[0].1, b"early bytes");
    }

    #[test]
    fn host_initiated_refused_by_the_guest_closes_the_stream() {
        let mut t = env();
        let (mut host, req) = t.host_connect(99);
        t.guest_send(&gpkt(op::RST, 99, req.src_port), &[]);
        assert_eq!(t.m.connection_count(), 0);
        let mut b = [0u8; 4];
        host.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(host.read(&mut b).expect("eof"), 0);
        assert!(t.rx().is_empty(), "no RST answers an RST");
    }

    #[test]
    fn bad_connect_lines_close_the_host_stream() {
        let mut t = env();
        for line in [
            &b"HELLO 5\n"[..],
            b"CONNECT x\n",
            b"CONNECT 99999999999\n",
            &[b'A'; 40],
        ] {
            let mut s = UnixStream::connect(&t.path).expect("connect");
            s.write_all(line).expect("write");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            t.pump(50);
            t.pump(0);
            // Closed: end of file, or a reset when our unread bytes were dropped.
            let mut b = [0u8; 4];
            let r = s.read(&mut b);
            assert!(
                matches!(r, Ok(0)) || r.is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset),
                "{line:?}"
            );
        }
        assert!(t.rx().is_empty());
        assert_eq!(t.m.connection_count(), 0);
    }

    #[test]
    fn guest_initiated_connect_and_relay() {
        let mut t = env();
        let listener = UnixListener::bind(port_path(&t.path, 1024)).expect("bind");
        t.guest_send(&gpkt(op::REQUEST, 5555, 1024), &[]);
        let (mut host, _) = listener.accept().expect("accepted");
        let pkts = t.rx();
        assert_eq!(pkts.len(), 1);
        let r = pkts[0].0;
        assert_eq!(
            (r.op, r.src_port, r.dst_port, r.dst_cid, r.buf_alloc),
            (op::RESPONSE, 1024, 5555, u64::from(CID), CONN_BUF_SIZE)
        );
        t.guest_send(&gpkt(op::RW, 5555, 1024), b"ping");
        let mut b = [0u8; 4];
        host.read_exact(&mut b).expect("read");
        assert_eq!(&b, b"ping");
        host.write_all(b"pong").expect("write");
        assert_eq!(t.rx_wait()[0].1, b"pong");
        // A second REQUEST on the same pair breaks the protocol.
        t.guest_send(&gpkt(op::REQUEST, 5555, 1024), &[]);
        let pkts = t.rx();
        assert_eq!(pkts[0].0.op, op::RST);
        assert_eq!(t.m.connection_count(), 0);
    }

    #[test]
    fn guest_connect_with_nothing_listening_gets_rst() {
        let mut t = env();
        t.guest_send(&gpkt(op::REQUEST, 5555, 1025), &[]);
        let pkts = t.rx();
        assert_eq!(pkts.len(), 1);
        let r = pkts[0].0;
        assert_eq!(
            (r.op, r.src_cid, r.dst_cid, r.src_port, r.dst_port),
            (op::RST, HOST_CID, u64::from(CID), 1025, 5555)
        );
        assert_eq!(t.m.connection_count(), 0);
        // Packets for connections that do not exist are reset too (but not RST).
        t.guest_send(&gpkt(op::RW, 1, 2), b"x");
        t.guest_send(&gpkt(op::RST, 1, 2), &[]);
        let pkts = t.rx();
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].0.op, op::RST);
    }

    #[test]
    fn wrong_cids_and_types() {
        let mut t = env();
        let listener = UnixListener::bind(port_path(&t.path, 1024)).expect("bind");
        // Spoofed source CID: dropped silently, no connection.
        let mut p = gpkt(op::REQUEST, 1, 1024);
        p.src_cid = 7;
        t.guest_send(&p, &[]);
        assert!(t.rx().is_empty());
        // Another destination CID, or a non-stream type: RST.
        let mut p = gpkt(op::REQUEST, 1, 1024);
        p.dst_cid = 5;
        t.guest_send(&p, &[]);
        let pkts = t.rx();
        assert_eq!((pkts[0].0.op, pkts[0].0.src_cid), (op::RST, 5));
        let mut p = gpkt(op::REQUEST, 1, 1024);
        p.type_ = 2;
        t.guest_send(&p, &[]);
        assert_eq!(t.rx()[0].0.op, op::RST);
        assert_eq!(t.m.connection_count(), 0);
        // A wrong type on an open connection resets it.
        t.guest_send(&gpkt(op::REQUEST, 1, 1024), &[]);
        let _host = listener.accept().expect("accepted");
        t.rx();
        let mut p = gpkt(op::RW, 1, 1024);
        p.type_ = 2;
        t.guest_send(&p, b"x");
        assert_eq!(t.rx()[0].0.op, op::RST);
        assert_eq!(t.m.connection_count(), 0);
    }

    #[test]
    fn malformed_chains_reset_their_connection() {
        let mut t = env();
        let _l = UnixListener::bind(port_path(&t.path, 1024)).expect("bind");
        t.guest_send(&gpkt(op::REQUEST, 1, 1024), &[]);
        t.rx();
        assert_eq!(t.m.connection_count(), 1);
        let mut h = gpkt(op::RW, 1, 1024);
        h.len = u32::MAX;
        t.m.reject(&PacketError::TooLong(h));
        assert_eq!(t.m.connection_count(), 0);
        assert_eq!(t.rx()[0].0.op, op::RST);
        // Without a header there is nothing to answer.
        t.m.reject(&PacketError::NoHeader);
        // For no connection: RST to the sender.
        t.m.reject(&PacketError::Truncated(gpkt(op::RW, 9, 9)));
        assert_eq!(t.rx()[0].0.op, op::RST);
    }

    #[test]
    fn credit_limits_host_to_guest() {
        let mut t = env();
        let listener = UnixListener::bind(port_path(&t.path, 1024)).expect("bind");
        let mut req = gpkt(op::REQUEST, 1, 1024);
        req.buf_alloc = 1000;
        t.guest_send(&req, &[]);
        let (mut host, _) = listener.accept().expect("accepted");
        t.rx();
        host.write_all(&[9u8; 5000]).expect("write");
        let mut total = 0;
        for _ in 0..20 {
            t.pump(20);
            total += t
                .rx()
                .iter()
                .filter(|(h, _)| h.op == op::RW)
                .map(|(h, _)| h.len as usize)
                .sum::<usize>();
        }
        assert_eq!(total, 1000, "never more than the guest's buf_alloc");
        // The guest frees 500 bytes.
        let mut upd = gpkt(op::CREDIT_UPDATE, 1, 1024);
        upd.buf_alloc = 1000;
        upd.fwd_cnt = 500;
        t.guest_send(&upd, &[]);
        let more: usize = t
            .rx()
            .iter()
            .filter(|(h, _)| h.op == op::RW)
            .map(|(h, _)| h.len as usize)
            .sum();
        assert_eq!(more, 500);
    }

    #[test]
    fn a_flooding_guest_is_reset_with_bounded_memory() {
        let mut t = env();
        let listener = UnixListener::bind(port_path(&t.path, 1024)).expect("bind");
        t.guest_send(&gpkt(op::REQUEST, 1, 1024), &[]);
        // The host accepts but never reads.
        let (_host, _) = listener.accept().expect("accepted");
        t.rx();
        let chunk = vec![0xabu8; MAX_PAYLOAD];
        let mut sent = 0usize;
        while t.m.connection_count() == 1 {
            t.guest_send(&gpkt(op::RW, 1, 1024), &chunk);
            let e = t.m.conns.values().next();
            assert!(e.is_none_or(|e| e.conn.host_buffered() <= CONN_BUF_SIZE as usize));
            sent += chunk.len();
            assert!(sent < 64 << 20, "never reset");
        }
        // Beyond the kernel's socket buffer and our credit.
        assert!(sent > CONN_BUF_SIZE as usize);
        let pkts = t.rx();
        assert!(pkts.iter().any(|(h, _)| h.op == op::RST));
    }

    #[test]
    fn shutdown_both_ways() {
        let mut t = env();
        let listener = UnixListener::bind(port_path(&t.path, 1024)).expect("bind");
        t.guest_send(&gpkt(op::REQUEST, 1, 1024), &[]);
        let (mut host, _) = listener.accept().expect("accepted");
        host.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        t.rx();
        // Guest half-closes: the host reads the data then end of file.
        t.guest_send(&gpkt(op::RW, 1, 1024), b"req");
        let mut sh = gpkt(op::SHUTDOWN, 1, 1024);
        sh.flags = SHUTDOWN_SEND;
        t.guest_send(&sh, &[]);
        let mut got = Vec::new();
        host.read_to_end(&mut got).expect("eof");
        assert_eq!(got, b"req");
        // The host answers and closes: data, then SHUTDOWN with both flags.
        host.write_all(b"resp").expect("write");
        drop(host);
        let mut pkts = Vec::new();
        for _ in 0..50 {
            pkts.extend(t.rx_wait());
            if pkts.iter().any(|(h, _)| h.op == op::SHUTDOWN) {
                break;
            }
        }
        let data: Vec<u8> = pkts
            .iter()
            .filter(|(h, _)| h.op == op::RW)
            .flat_map(|(_, d)| d.clone())
            .collect();
        assert_eq!(data, b"resp");
        let last = pkts.last().expect("packets").0;
        assert_eq!(last.op, op::SHUTDOWN);
        assert_eq!(last.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
        // The guest finishes with its own full shutdown: we send RST.
        sh.flags = SHUTDOWN_BOTH;
        t.guest_send(&sh, &[]);
        let pkts = t.rx();
        assert_eq!(pkts.last().map(|p| p.0.op), Some(op::RST));
        assert_eq!(t.m.connection_count(), 0);
    }

    #[test]
    fn host_hangup_without_guest_rst_times_out() {
        let mut t = env();
        let listener = UnixListener::bind(port_path(&t.path, 1024)).expect("bind");
        t.guest_send(&gpkt(op::REQUEST, 1, 1024), &[]);
        let (host, _) = listener.accept().expect("accepted");
        t.rx();
        drop(host);
        let pkts = t.rx_wait();
        assert_eq!(
            (pkts[0].0.op, pkts[0].0.flags),
            (op::SHUTDOWN, SHUTDOWN_BOTH)
        );
        assert!(t.m.next_deadline().is_some());
        // The guest never answers: after the close timeout, RST.
        t.m.handle_timeouts(Instant::now() + Duration::from_secs(3));
        assert_eq!(t.rx()[0].0.op, op::RST);
        assert_eq!(t.m.connection_count(), 0);
        let _ = SHUTDOWN_RCV;
    }

    #[test]
    fn guest_that_never_answers_a_host_connect() {
        let mut t = env();
        let (mut host, _) = t.host_connect(52);
        t.m.handle_timeouts(Instant::now() + Duration::from_secs(3));
        assert_eq!(t.m.connection_count(), 0);
        assert_eq!(t.rx()[0].0.op, op::RST);
        let mut b = [0u8; 1];
        host.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(host.read(&mut b).expect("eof"), 0);
    }

    #[test]
    fn connection_cap_and_port_allocation() {
        let mut t = env();
        let _l = UnixListener::bind(port_path(&t.path, 1024)).expect("bind");
        let mut ok = 0;
        for port in 0..(MAX_CONNECTIONS as u32 + 10) {
            t.guest_send(&gpkt(op::REQUEST, port, 1024), &[]);
            for (h, _) in t.rx() {
                if h.op == op::RESPONSE {
                    ok += 1;
                }
            }
        }
        assert_eq!(ok, MAX_CONNECTIONS);
        assert_eq!(t.m.connection_count(), MAX_CONNECTIONS);
        // Host connections are refused too (the stream is closed).
        let mut s = UnixStream::connect(&t.path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        t.pump(50);
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).expect("eof"), 0);
        // Reset drops everything.
        t.m.reset();
        assert_eq!(t.m.connection_count(), 0);
        assert!(!t.m.has_rx());
        // Local ports skip those in use and wrap.
        t.m.next_local_port = u32::MAX;
        assert_eq!(t.m.alloc_local_port(), Some(u32::MAX));
        assert_eq!(t.m.alloc_local_port(), Some(FIRST_LOCAL_PORT));
    }

    #[test]
    fn pending_control_packets_are_bounded() {
        let mut t = env();
        for i in 0..(MAX_PENDING_CONTROL as u32 * 2) {
            t.guest_send(&gpkt(op::RW, i, 1), b"x");
        }
        assert_eq!(t.rx().len(), MAX_PENDING_CONTROL);
    }

    #[test]
    fn stale_sockets_are_replaced_other_files_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        let first = Muxer::new(CID, &path).expect("first");
        // A second muxer replaces the socket (the first one's is stale).
        std::mem::forget(first);
        let m = Muxer::new(CID, &path).expect("stale socket replaced");
        drop(m);
        assert!(!path.exists(), "the socket is removed on drop");
        std::fs::write(&path, b"data").expect("file");
        assert!(matches!(
            Muxer::new(CID, &path),
            Err(VsockError::NotASocket(_))
        ));
        for cid in [0, 1, 2, u32::MAX] {
            assert!(matches!(
                Muxer::new(cid, &dir.path().join("x")),
                Err(VsockError::Cid(_))
            ));
        }
        let long = dir.path().join("x".repeat(200));
        assert!(matches!(
            Muxer::new(CID, &long),
            Err(VsockError::Bind { .. })
        ));
    }
}
