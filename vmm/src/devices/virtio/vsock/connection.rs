//! One vsock stream connection: its state machine and credit accounting.
//!
//! The connection is generic over its host stream (a unix stream in the VMM,
//! an in-memory stream in tests) and knows nothing of epoll: the muxer asks it
//! which events it wants ([`Connection::interest`]) and tells it what happened.
//!
//! Credit, both ways (virtio spec, "Buffer Space Management"):
//!
//! - guest -> host: we advertise `buf_alloc` = [`CONN_BUF_SIZE`] and `fwd_cnt` =
//!   bytes written to the host stream. Bytes received but not yet written
//!   (`rx_cnt - fwd_cnt`) stay in `host_buf`; a guest that sends more than the
//!   credit we gave it is reset, so `host_buf` never exceeds [`CONN_BUF_SIZE`].
//! - host -> guest: we never send more than the guest's
//!   `buf_alloc - (tx_cnt - fwd_cnt)`; host bytes wait in the host socket (not
//!   in our memory) until the guest has credit and rx buffers.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::packet::{
    op, PacketHeader, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::{CONN_BUF_SIZE, MAX_PAYLOAD};

/// How long the guest has to answer a host-initiated REQUEST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closing connection may linger (the guest's final RST, or the
/// host draining what the guest sent) before we reset it.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Freed space we report to the guest without being asked.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

/// The host side of a connection.
pub trait HostStream: Read + Write {
    /// Shuts the write direction (the host reader sees end of file).
    fn shutdown_write(&self) -> io::Result<()>;
}

impl HostStream for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// Connection states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or queued), waiting for the guest's RESPONSE.
    LocalInit,
    /// Data flows (each direction until its shutdown).
    Established,
    /// Finished: the muxer removes the connection (sending RST if asked).
    Done,
}

/// Which host stream events the connection wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interest {
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
}

/// Why a connection was reset (logged by the muxer, rate limited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// The guest sent more than its credit.
    CreditExceeded,
    /// The guest sent a packet the state does not allow.
    Protocol(u16),
    /// The host stream failed.
    HostIo,
    /// A timeout passed.
    Timeout,
}

/// One connection, keyed by (local port, guest port).
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    state: State,
    /// Send RST to the guest when the connection is removed.
    rst_on_remove: bool,
    reset_reason: Option<ResetReason>,
    deadline: Option<Instant>,

    // Control packets waiting for an rx buffer.
    need_request: bool,
    need_response: bool,
    need_credit_update: bool,
    credit_request_sent: bool,
    /// SHUTDOWN flags to send; `shutdown_sent` those already sent.
    shutdown_pending: u32,
    shutdown_sent: u32,

    // Guest -> host.
    /// Bytes waiting for the host stream; the first `ctrl_bytes` are ours
    /// (the `OK <port>` line), the rest the guest's.
    host_buf: VecDeque<u8>,
    ctrl_bytes: usize,
    rx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    host_write_shut: bool,

    // Host -> guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The host stream may have data (or end of file) to read.
    host_readable: bool,
    host_eof: bool,
    /// The host closed both directions (epoll HUP/ERR).
    host_hup: bool,
}

impl<S: HostStream> Connection<S> {
    fn new(stream: S, guest_cid: u64, local_port: u32, peer_port: u32, state: State) -> Self {
        Self {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state,
            rst_on_remove: false,
            reset_reason: None,
            deadline: None,
            need_request: false,
            need_response: false,
            need_credit_update: false,
            credit_request_sent: false,
            shutdown_pending: 0,
            shutdown_sent: 0,
            host_buf: VecDeque::new(),
            ctrl_bytes: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            peer_shutdown: 0,
            host_write_shut: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_readable: false,
            host_eof: false,
            host_hup: false,
        }
    }

    /// A host-initiated connection: sends REQUEST to guest port `peer_port`
    /// from `local_port`; the guest has [`CONNECT_TIMEOUT`] to answer.
    pub fn new_local(
        stream: S,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        now: Instant,
    ) -> Self {
        let mut c = Self::new(stream, guest_cid, local_port, peer_port, State::LocalInit);
        c.need_request = true;
        c.deadline = Some(now + CONNECT_TIMEOUT);
        c
    }

    /// A guest-initiated connection, already connected on the host: answers
    /// the guest's REQUEST `req` with RESPONSE.
    pub fn new_peer(stream: S, req: &PacketHeader) -> Self {
        let mut c = Self::new(
            stream,
            req.src_cid,
            req.dst_port,
            req.src_port,
            State::Established,
        );
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = req.fwd_cnt;
        c.need_response = true;
        c
    }

    /// The host stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// The state.
    #[cfg(test)]
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the muxer should remove the connection.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether removing the connection must send RST to the guest.
    pub fn rst_on_remove(&self) -> bool {
        self.rst_on_remove
    }

    /// Why the connection was reset, if it was.
    pub fn reset_reason(&self) -> Option<ResetReason> {
        self.reset_reason
    }

    /// The next timeout.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Bytes buffered toward the host.
    #[cfg(test)]
    pub fn host_buffered(&self) -> usize {
        self.host_buf.len()
    }

    /// Ends the connection with RST to the guest.
    pub fn reset(&mut self, why: ResetReason) {
        if self.state != State::Done {
            self.reset_reason = Some(why);
        }
        self.finish(true);
    }

    fn finish(&mut self, rst: bool) {
        self.state = State::Done;
        self.rst_on_remove = rst;
        self.deadline = None;
        self.host_buf = VecDeque::new();
    }

    /// A header from us to the guest; carries our current credit.
    fn header(&mut self, op: u16, flags: u32, len: u32) -> PacketHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.need_credit_update = false;
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Bytes we may still send the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn may_send_data(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.shutdown_sent & SHUTDOWN_SEND == 0
    }

    fn wants_credit_request(&self) -> bool {
        self.may_send_data() && self.peer_credit() == 0 && !self.credit_request_sent
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_rx(&self) -> bool {
        if self.state == State::Done {
            return false;
        }
        self.need_request
            || self.need_response
            || self.need_credit_update
            || self.shutdown_pending & !self.shutdown_sent != 0
            || (self.may_send_data() && self.peer_credit() > 0)
            || self.wants_credit_request()
    }

    /// The host events the connection waits for.
    pub fn interest(&self) -> Interest {
        if self.state == State::Done {
            return Interest::default();
        }
        Interest {
            read: self.state == State::Established
                && !self.host_readable
                && !self.host_eof
                && self.peer_shutdown & SHUTDOWN_RCV == 0,
            write: !self.host_buf.is_empty(),
        }
    }

    /// The next packet for the guest, its payload (at most `buf.len()` bytes,
    /// read from the host stream) in `buf`. `None` when there is nothing to send.
    pub fn next_rx(&mut self, buf: &mut [u8], now: Instant) -> Option<(PacketHeader, usize)> {
        if self.state == State::Done {
            return None;
        }
        if self.need_request {
            self.need_request = false;
            return Some((self.header(op::REQUEST, 0, 0), 0));
        }
        if self.need_response {
            self.need_response = false;
            return Some((self.header(op::RESPONSE, 0, 0), 0));
        }
        if self.may_send_data() {
            let n = buf.len().min(MAX_PAYLOAD).min(self.peer_credit() as usize);
            if n > 0 {
                match self.stream.read(&mut buf[..n]) {
                    Ok(0) => self.on_host_eof(),
                    Ok(k) => {
                        // k <= n <= MAX_PAYLOAD.
                        self.tx_cnt = self.tx_cnt.wrapping_add(k as u32);
                        return Some((self.header(op::RW, 0, k as u32), k));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.host_readable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.reset(ResetReason::HostIo);
                        return None;
                    }
                }
            }
        }
        let flags = self.shutdown_pending & !self.shutdown_sent;
        if flags != 0 {
            self.shutdown_sent |= flags;
            if self.shutdown_sent == SHUTDOWN_BOTH {
                // The guest answers with RST (or its own full SHUTDOWN).
                self.deadline = Some(now + CLOSE_TIMEOUT);
            }
            return Some((self.header(op::SHUTDOWN, self.shutdown_sent, 0), 0));
        }
        if self.need_credit_update {
            return Some((self.header(op::CREDIT_UPDATE, 0, 0), 0));
        }
        if self.wants_credit_request() {
            self.credit_request_sent = true;
            return Some((self.header(op::CREDIT_REQUEST, 0, 0), 0));
        }
        None
    }

    /// The host stream reached end of file: tell the guest we send no more
    /// (and receive no more, when the host closed both ways).
    fn on_host_eof(&mut self) {
        self.host_eof = true;
        self.host_readable = false;
        self.shutdown_pending |= SHUTDOWN_SEND;
        if self.host_hup {
            self.shutdown_pending |= SHUTDOWN_RCV;
        }
    }

    /// A packet from the guest for this connection (CIDs, type and port pair
    /// already checked by the muxer).
    pub fn deliver(&mut self, hdr: &PacketHeader, payload: &[u8], now: Instant) {
        if self.state == State::Done {
            return;
        }
        if hdr.op == op::RST {
            // The guest refused or ended the connection: nothing to answer.
            self.finish(false);
            return;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if self.peer_credit() > 0 {
            self.credit_request_sent = false;
        }
        match (self.state, hdr.op) {
            (State::LocalInit, op::RESPONSE) => {
                self.state = State::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.local_port);
                self.ctrl_bytes = line.len();
                self.host_buf.extend(line.as_bytes());
                self.flush_host(now);
            }
            (State::Established, op::RW) => self.guest_data(payload, now),
            (State::Established, op::CREDIT_UPDATE) => {}
            (State::Established, op::CREDIT_REQUEST) => self.need_credit_update = true,
            (State::Established, op::SHUTDOWN) => {
                self.peer_shutdown |= hdr.flags & SHUTDOWN_BOTH;
                self.flush_host(now);
            }
            (_, other) => self.reset(ResetReason::Protocol(other)),
        }
    }

    fn guest_data(&mut self, payload: &[u8], now: Instant) {
        if payload.is_empty() {
            return;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            self.reset(ResetReason::Protocol(op::RW));
            return;
        }
        let in_flight = self.rx_cnt.wrapping_sub(self.fwd_cnt) as usize;
        if in_flight + payload.len() > CONN_BUF_SIZE as usize {
            self.reset(ResetReason::CreditExceeded);
            return;
        }
        // payload.len() <= MAX_PAYLOAD.
        self.rx_cnt = self.rx_cnt.wrapping_add(payload.len() as u32);
        let mut rest = payload;
        if self.host_buf.is_empty() {
            match self.stream.write(payload) {
                Ok(n) => {
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                    rest = &payload[n..];
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => {
                    self.reset(ResetReason::HostIo);
                    return;
                }
            }
        }
        self.host_buf.extend(rest);
        self.after_host_progress(now);
    }

    /// Writes what `host_buf` holds, as far as the host stream takes it.
    fn flush_host(&mut self, now: Instant) {
        while !self.host_buf.is_empty() {
            let (front, _) = self.host_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => {
                    self.reset(ResetReason::HostIo);
                    return;
                }
                Ok(n) => {
                    self.host_buf.drain(..n);
                    let ours = n.min(self.ctrl_bytes);
                    self.ctrl_bytes -= ours;
                    // n - ours <= CONN_BUF_SIZE.
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ours) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.reset(ResetReason::HostIo);
                    return;
                }
            }
        }
        self.after_host_progress(now);
    }

    /// After bytes went to the host: credit update, half and full close.
    fn after_host_progress(&mut self, now: Instant) {
        if self.state != State::Established {
            return;
        }
        let unsent = self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        let seen_in_flight = self.rx_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        let guest_free = CONN_BUF_SIZE.saturating_sub(seen_in_flight);
        if unsent > 0 && (unsent >= CREDIT_UPDATE_THRESHOLD || guest_free < CREDIT_UPDATE_THRESHOLD)
        {
            self.need_credit_update = true;
        }
        if !self.host_buf.is_empty() {
            if self.peer_shutdown == SHUTDOWN_BOTH && self.deadline.is_none() {
                self.deadline = Some(now + CLOSE_TIMEOUT);
            }
            return;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
            self.host_write_shut = true;
            // The host may be gone already; the close goes on either way.
            let _ = self.stream.shutdown_write();
        }
        if self.peer_shutdown == SHUTDOWN_BOTH {
            // The guest closed: everything it sent is with the host. RST is
            // the final word (the guest waits for it).
            self.finish(true);
        }
    }

    /// The host stream is readable (or at end of file).
    pub fn on_host_readable(&mut self) {
        self.host_readable = true;
    }

    /// The host stream is writable.
    pub fn on_host_writable(&mut self, now: Instant) {
        self.flush_host(now);
    }

    /// The host stream hung up or failed: what it still holds is delivered,
    /// then the guest is told the host is gone; bytes for the host cannot
    /// reach it any more.
    pub fn on_host_hangup(&mut self, now: Instant) {
        self.host_hup = true;
        self.host_readable = true;
        if self.state == State::LocalInit {
            // The host client gave up before the guest answered.
            self.reset(ResetReason::HostIo);
            return;
        }
        if self.host_eof {
            self.shutdown_pending |= SHUTDOWN_RCV;
        }
        if !self.host_buf.is_empty() {
            self.flush_host(now);
        }
    }

    /// Runs the timeout if it passed.
    pub fn on_timeout(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| d <= now) {
            self.reset(ResetReason::Timeout);
        }
    }

    /// The RST that ends this connection.
    pub fn rst_header(&self) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// An in-memory host stream: `input` is what the host sends; `output`
    /// collects what it receives, up to `room` bytes (then writes would block).
    #[derive(Debug, Default)]
    struct Pipe {
        input: VecDeque<u8>,
        input_eof: bool,
        output: Vec<u8>,
        room: usize,
        write_shut: bool,
        broken: bool,
    }

    #[derive(Debug, Clone, Default)]
    struct MockStream(Rc<RefCell<Pipe>>);

    impl Read for MockStream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let mut p = self.0.borrow_mut();
            if p.input.is_empty() {
                return if p.input_eof {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            let n = buf.len().min(p.input.len());
            for (b, v) in buf.iter_mut().zip(p.input.drain(..n)) {
                *b = v;
            }
            Ok(n)
        }
    }

    impl Write for MockStream {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut p = self.0.borrow_mut();
            if p.broken {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(p.room);
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            p.room -= n;
            p.output.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl HostStream for MockStream {
        fn shutdown_write(&self) -> io::Result<()> {
            self.0.borrow_mut().write_shut = true;
            Ok(())
        }
    }

    const CID: u64 = 3;

    fn guest(op: u16, len: u32, buf_alloc: u32, fwd_cnt: u32) -> PacketHeader {
        PacketHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 1024,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// A guest-initiated, established connection (RESPONSE already taken).
    fn established(room: usize, buf_alloc: u32) -> (Connection<MockStream>, MockStream) {
        let s = MockStream::default();
        s.0.borrow_mut().room = room;
        let mut c = Connection::new_peer(s.clone(), &guest(op::REQUEST, 0, buf_alloc, 0));
        let mut buf = [0u8; 16];
        let (h, _) = c.next_rx(&mut buf, Instant::now()).expect("response");
        assert_eq!(h.op, op::RESPONSE);
        assert_eq!((h.src_port, h.dst_port, h.dst_cid), (1024, 5000, CID));
        assert_eq!(h.buf_alloc, CONN_BUF_SIZE);
        (c, s)
    }

    fn drain(c: &mut Connection<MockStream>) -> Vec<(PacketHeader, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_PAYLOAD];
        while let Some((h, n)) = c.next_rx(&mut buf, Instant::now()) {
            out.push((h, buf[..n].to_vec()));
            assert!(out.len() < 1000, "runaway packets");
        }
        out
    }

    #[test]
    fn host_data_respects_guest_credit() {
        let (mut c, s) = established(0, 10);
        s.0.borrow_mut()
            .input
            .extend(b"hello world, more than ten bytes");
        c.on_host_readable();
        let pkts = drain(&mut c);
        // 10 bytes of data, then a credit request (no credit left).
        assert_eq!(pkts.len(), 2);
        assert_eq!((pkts[0].0.op, &pkts[0].1[..]), (op::RW, &b"hello worl"[..]));
        assert_eq!(pkts[1].0.op, op::CREDIT_REQUEST);
        assert!(!c.has_rx());
        assert!(!c.interest().read, "no reads while the guest has no credit");
        // The guest consumed 4 bytes: 4 more may go.
        c.deliver(&guest(op::CREDIT_UPDATE, 0, 10, 4), &[], Instant::now());
        let pkts = drain(&mut c);
        assert_eq!(pkts[0].1, b"d, m");
        assert_eq!(c.peer_credit(), 0);
        // A guest that claims to have consumed more than it got gets no credit.
        c.deliver(&guest(op::CREDIT_UPDATE, 0, 10, 1000), &[], Instant::now());
        assert_eq!(c.peer_credit(), 0);
        // The rx buffer bounds the payload too.
        c.deliver(&guest(op::CREDIT_UPDATE, 0, 1000, 14), &[], Instant::now());
        let mut small = [0u8; 3];
        let (h, n) = c.next_rx(&mut small, Instant::now()).expect("data");
        assert_eq!((h.op, h.len, n, &small), (op::RW, 3, 3, b"ore"));
    }

    #[test]
    fn host_reads_wait_until_would_block() {
        let (mut c, s) = established(0, 1 << 20);
        assert!(c.interest().read);
        c.on_host_readable();
        assert!(!c.interest().read);
        assert!(c.has_rx());
        // Spurious readiness: the read would block, the connection re-arms.
        assert!(drain(&mut c).is_empty());
        assert!(c.interest().read);
        s.0.borrow_mut().input.extend(b"x");
        c.on_host_readable();
        assert_eq!(drain(&mut c).len(), 1);
    }

    #[test]
    fn guest_data_goes_to_the_host_with_credit_updates() {
        let (mut c, s) = established(usize::MAX, 1 << 20);
        let chunk = vec![0x5au8; MAX_PAYLOAD];
        for _ in 0..8 {
            c.deliver(
                &guest(op::RW, chunk.len() as u32, 1 << 20, 0),
                &chunk,
                Instant::now(),
            );
        }
        assert_eq!(s.0.borrow().output.len(), 8 * MAX_PAYLOAD);
        // 512 KiB consumed: the guest hears of it.
        let pkts = drain(&mut c);
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].0.op, op::CREDIT_UPDATE);
        assert_eq!(pkts[0].0.fwd_cnt, 8 * MAX_PAYLOAD as u32);
        // A small write does not trigger one.
        c.deliver(&guest(op::RW, 3, 1 << 20, 0), b"abc", Instant::now());
        assert!(drain(&mut c).is_empty());
        // A credit request does.
        c.deliver(
            &guest(op::CREDIT_REQUEST, 0, 1 << 20, 0),
            &[],
            Instant::now(),
        );
        let pkts = drain(&mut c);
        assert_eq!(
            (pkts[0].0.op, pkts[0].0.fwd_cnt),
            (op::CREDIT_UPDATE, 8 * MAX_PAYLOAD as u32 + 3)
        );
    }

    #[test]
    fn a_guest_beyond_its_credit_is_reset_and_memory_stays_bounded() {
        // The host reads nothing: everything the guest sends is buffered.
        let (mut c, s) = established(0, 1 << 20);
        let chunk = vec![1u8; MAX_PAYLOAD];
        let mut sent = 0;
        while !c.is_done() {
            c.deliver(
                &guest(op::RW, chunk.len() as u32, 1 << 20, 0),
                &chunk,
                Instant::now(),
            );
            assert!(c.host_buffered() <= CONN_BUF_SIZE as usize);
            sent += 1;
            assert!(sent < 100);
        }
        // Exactly the credit we advertised fits; the next packet is a violation.
        assert_eq!(sent, CONN_BUF_SIZE as usize / MAX_PAYLOAD + 1);
        assert!(c.rst_on_remove());
        assert_eq!(c.reset_reason(), Some(ResetReason::CreditExceeded));
        assert_eq!(c.host_buffered(), 0);
        assert!(s.0.borrow().output.is_empty());
        assert!(!c.has_rx());
    }

    #[test]
    fn buffered_guest_data_flushes_when_the_host_is_writable() {
        let (mut c, s) = established(5, 1 << 20);
        c.deliver(
            &guest(op::RW, 12, 1 << 20, 0),
            b"hello world!",
            Instant::now(),
        );
        assert_eq!(s.0.borrow().output, b"hello");
        assert!(c.interest().write);
        s.0.borrow_mut().room = 100;
        c.on_host_writable(Instant::now());
        assert_eq!(s.0.borrow().output, b"hello world!");
        assert!(!c.interest().write);
    }

    #[test]
    fn host_initiated_handshake() {
        let s = MockStream::default();
        s.0.borrow_mut().room = 100;
        let t0 = Instant::now();
        let mut c = Connection::new_local(s.clone(), CID, 1 << 30, 52, t0);
        assert!(!c.interest().read, "no relay before the guest accepts");
        let pkts = drain(&mut c);
        assert_eq!(pkts.len(), 1);
        let req = pkts[0].0;
        assert_eq!(
            (req.op, req.src_cid, req.dst_cid, req.src_port, req.dst_port),
            (op::REQUEST, HOST_CID, CID, 1 << 30, 52)
        );
        let mut resp = guest(op::RESPONSE, 0, 4096, 0);
        resp.src_port = 52;
        resp.dst_port = 1 << 30;
        c.deliver(&resp, &[], t0);
        assert_eq!(c.state(), State::Established);
        assert_eq!(s.0.borrow().output, b"OK 1073741824\n");
        assert!(c.deadline().is_none());
        // Our OK line is not guest data: fwd_cnt stays 0.
        c.deliver(&guest(op::CREDIT_REQUEST, 0, 4096, 0), &[], t0);
        assert_eq!(drain(&mut c)[0].0.fwd_cnt, 0);
    }

    #[test]
    fn host_initiated_refused_or_timed_out() {
        let t0 = Instant::now();
        let mut c = Connection::new_local(MockStream::default(), CID, 1 << 30, 52, t0);
        drain(&mut c);
        c.deliver(&guest(op::RST, 0, 0, 0), &[], t0);
        assert!(c.is_done() && !c.rst_on_remove());

        let mut c = Connection::new_local(MockStream::default(), CID, 1 << 30, 52, t0);
        c.on_timeout(t0 + CONNECT_TIMEOUT / 2);
        assert!(!c.is_done());
        c.on_timeout(t0 + CONNECT_TIMEOUT);
        assert!(c.is_done() && c.rst_on_remove());
        assert_eq!(c.reset_reason(), Some(ResetReason::Timeout));

        // Data before the RESPONSE breaks the protocol.
        let mut c = Connection::new_local(MockStream::default(), CID, 1 << 30, 52, t0);
        c.deliver(&guest(op::RW, 1, 0, 0), b"x", t0);
        assert_eq!(c.reset_reason(), Some(ResetReason::Protocol(op::RW)));
    }

    #[test]
    fn protocol_violations_reset() {
        for bad in [op::REQUEST, op::RESPONSE, 0, 8, 0xffff] {
            let (mut c, _) = established(10, 10);
            c.deliver(&guest(bad, 0, 10, 0), &[], Instant::now());
            assert_eq!(c.reset_reason(), Some(ResetReason::Protocol(bad)));
            assert!(c.rst_on_remove());
        }
        // Data after the guest shut its send side.
        let (mut c, _) = established(10, 10);
        let mut sh = guest(op::SHUTDOWN, 0, 10, 0);
        sh.flags = SHUTDOWN_SEND;
        c.deliver(&sh, &[], Instant::now());
        c.deliver(&guest(op::RW, 1, 10, 0), b"x", Instant::now());
        assert!(c.is_done());
        // Host write failure.
        let (mut c, s) = established(10, 10);
        s.0.borrow_mut().broken = true;
        c.deliver(&guest(op::RW, 1, 10, 0), b"x", Instant::now());
        assert_eq!(c.reset_reason(), Some(ResetReason::HostIo));
    }

    #[test]
    fn guest_shutdown_half_then_full() {
        let (mut c, s) = established(3, 100);
        c.deliver(&guest(op::RW, 6, 100, 0), b"abcdef", Instant::now());
        let mut sh = guest(op::SHUTDOWN, 0, 100, 0);
        sh.flags = SHUTDOWN_SEND;
        c.deliver(&sh, &[], Instant::now());
        // The host's write side closes only after the buffer drained.
        assert!(!s.0.borrow().write_shut);
        s.0.borrow_mut().room = 10;
        c.on_host_writable(Instant::now());
        assert!(s.0.borrow().write_shut);
        assert_eq!(s.0.borrow().output, b"abcdef");
        // The host may still answer.
        s.0.borrow_mut().input.extend(b"reply");
        c.on_host_readable();
        assert_eq!(drain(&mut c)[0].1, b"reply");
        // Then the guest closes fully: RST ends it.
        sh.flags = SHUTDOWN_BOTH;
        c.deliver(&sh, &[], Instant::now());
        assert!(c.is_done() && c.rst_on_remove());
        assert_eq!(c.reset_reason(), None);
    }

    #[test]
    fn guest_full_shutdown_with_a_stuck_host_times_out() {
        let (mut c, _) = established(0, 100);
        let t0 = Instant::now();
        c.deliver(&guest(op::RW, 2, 100, 0), b"ab", t0);
        let mut sh = guest(op::SHUTDOWN, 0, 100, 0);
        sh.flags = SHUTDOWN_BOTH;
        c.deliver(&sh, &[], t0);
        assert!(!c.is_done());
        c.on_timeout(t0 + CLOSE_TIMEOUT);
        assert!(c.is_done() && c.rst_on_remove());
    }

    #[test]
    fn host_eof_and_hangup_become_shutdowns() {
        // Half close: the host sent its data and shut its write side.
        let (mut c, s) = established(100, 100);
        s.0.borrow_mut().input.extend(b"bye");
        s.0.borrow_mut().input_eof = true;
        c.on_host_readable();
        let pkts = drain(&mut c);
        assert_eq!(pkts.len(), 2);
        assert_eq!(pkts[0].1, b"bye");
        assert_eq!(
            (pkts[1].0.op, pkts[1].0.flags),
            (op::SHUTDOWN, SHUTDOWN_SEND)
        );
        assert!(!c.interest().read);
        // The guest can still send.
        c.deliver(&guest(op::RW, 2, 100, 3), b"ok", Instant::now());
        assert_eq!(s.0.borrow().output, b"ok");

        // Full close: data first, then SHUTDOWN with both flags, then the
        // guest has CLOSE_TIMEOUT to send RST.
        let (mut c, s) = established(100, 100);
        s.0.borrow_mut().input.extend(b"last");
        s.0.borrow_mut().input_eof = true;
        let t0 = Instant::now();
        c.on_host_hangup(t0);
        let pkts = drain(&mut c);
        assert_eq!(pkts[0].1, b"last");
        assert_eq!(
            (pkts[1].0.op, pkts[1].0.flags),
            (op::SHUTDOWN, SHUTDOWN_BOTH)
        );
        assert!(c.deadline().is_some());
        c.deliver(&guest(op::RST, 0, 0, 0), &[], t0);
        assert!(c.is_done() && !c.rst_on_remove());
    }

    #[test]
    fn guest_not_receiving_stops_host_reads() {
        let (mut c, s) = established(100, 100);
        let mut sh = guest(op::SHUTDOWN, 0, 100, 0);
        sh.flags = SHUTDOWN_RCV;
        c.deliver(&sh, &[], Instant::now());
        s.0.borrow_mut().input.extend(b"unwanted");
        assert!(!c.interest().read);
        c.on_host_readable();
        assert!(drain(&mut c).is_empty());
        assert_eq!(s.0.borrow().input.len(), 8);
    }
}
