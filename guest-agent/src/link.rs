//! The link to the host agent: a bounded outbox the supervisor writes into
//! without ever blocking, and a link thread that connects (with back-off),
//! says `Hello`, writes the outbox with time-limited writes and hands the
//! host's messages to the supervisor.
//!
//! Outbox rules (a stuck host must never block supervision):
//! - heartbeats live in a single slot: a newer one replaces an unsent one;
//! - role events (`RoleStarted`, `RoleExited`, `Ready`) are queued; when the
//!   queue is full a log line or pong is evicted first; only if the queue holds
//!   nothing but role events is the oldest one dropped, and that is said on the
//!   console and counted (the heartbeat's role state and restart count still
//!   tell the host where the role is);
//! - log lines and pongs are dropped when the queue is full (or logs exceed
//!   their share); dropped logs are counted and reported with one `Log` line
//!   once there is room;
//! - a frame whose write fails is put back at the front (heartbeats excepted)
//!   and written again on the next connection: role events are delivered at
//!   least once per boot, in order.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_proto::{
    Capabilities, Decoded, ExitStatus, Frame, GuestMsg, Heartbeat, Hello, HostMsg, Log, LogLevel,
    LogSource, Pong, RoleExited, RoleStarted, StreamDecoder, MAX_FRAME_LEN, MAX_LOG_LINE_LEN,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use crate::backoff::Backoff;
use crate::probe::say;
use crate::transport::{Conn, Transport};

/// Something for the host, owned (the wire types borrow).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// `RoleStarted`.
    RoleStarted(u32),
    /// `RoleExited`.
    RoleExited(u32, ExitStatus),
    /// `Ready`.
    Ready,
    /// `Log` (the line is at most `MAX_LOG_LINE_LEN` bytes).
    Log(LogLevel, LogSource, Vec<u8>),
    /// `Pong`.
    Pong(u64),
    /// `Heartbeat`.
    Heartbeat(Heartbeat),
}

impl Report {
    fn is_role_event(&self) -> bool {
        matches!(
            self,
            Self::RoleStarted(_) | Self::RoleExited(..) | Self::Ready
        )
    }

    fn encode(&self, version: u8, out: &mut [u8]) -> Result<usize, guest_proto::ProtoError> {
        let msg = match self {
            Self::RoleStarted(pid) => GuestMsg::RoleStarted(RoleStarted { pid: *pid }),
            Self::RoleExited(pid, status) => GuestMsg::RoleExited(RoleExited {
                pid: *pid,
                status: *status,
            }),
            Self::Ready => GuestMsg::Ready,
            Self::Log(level, source, line) => GuestMsg::Log(Log {
                level: *level,
                source: *source,
                line: line
                    .get(..MAX_LOG_LINE_LEN.min(line.len()))
                    .unwrap_or_default(),
            }),
            Self::Pong(nonce) => GuestMsg::Pong(Pong { nonce: *nonce }),
            Self::Heartbeat(hb) => GuestMsg::Heartbeat(*hb),
        };
        msg.encode(version, out)
    }
}

/// Outbox limits.
#[derive(Debug, Clone, Copy)]
pub struct OutboxLimits {
    /// Queue length (role events, logs, pongs).
    pub capacity: usize,
    /// How many of those may be log lines.
    pub max_logs: usize,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self {
            capacity: 256,
            max_logs: 192,
        }
    }
}

/// Counters the outbox keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Log lines dropped because the queue was full.
    pub logs_dropped: u64,
    /// Pongs dropped.
    pub pongs_dropped: u64,
    /// Heartbeats replaced before they were sent.
    pub heartbeats_replaced: u64,
    /// Role events dropped (only when the queue held nothing else).
    pub role_events_dropped: u64,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Report>,
    logs: usize,
    heartbeat: Option<Heartbeat>,
    stats: OutboxStats,
    unreported_logs_dropped: u64,
    /// Popped by the link thread and not yet written (or put back).
    in_flight: usize,
}

/// The bounded queue between the supervisor and the link thread.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    cv: Condvar,
    limits: OutboxLimits,
}

impl Outbox {
    /// An empty outbox.
    pub fn new(limits: OutboxLimits) -> Self {
        Self {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `r` following the rules in the module documentation. Never blocks
    /// (beyond the mutex, held only for queue operations).
    pub fn push(&self, r: Report) {
        let mut s = self.lock();
        match r {
            Report::Heartbeat(hb) => {
                if s.heartbeat.replace(hb).is_some() {
                    s.stats.heartbeats_replaced += 1;
                }
            }
            Report::Log(..) => {
                if s.queue.len() >= self.limits.capacity || s.logs >= self.limits.max_logs {
                    s.stats.logs_dropped += 1;
                    s.unreported_logs_dropped += 1;
                } else {
                    s.logs += 1;
                    s.queue.push_back(r);
                }
            }
            Report::Pong(_) => {
                if s.queue.len() >= self.limits.capacity {
                    s.stats.pongs_dropped += 1;
                } else {
                    s.queue.push_back(r);
                }
            }
            _ => {
                if s.queue.len() >= self.limits.capacity {
                    if let Some(i) = s.queue.iter().position(|q| !q.is_role_event()) {
                        if let Some(evicted) = s.queue.remove(i) {
                            if matches!(evicted, Report::Log(..)) {
                                s.logs -= 1;
                                s.stats.logs_dropped += 1;
                                s.unreported_logs_dropped += 1;
                            } else {
                                s.stats.pongs_dropped += 1;
                            }
                        }
                    } else if let Some(old) = s.queue.pop_front() {
                        s.stats.role_events_dropped += 1;
                        say(&format!(
                            "outbox full: dropped the oldest role event {old:?} (the heartbeat still carries the role state)"
                        ));
                    }
                }
                s.queue.push_back(r);
            }
        }
        drop(s);
        self.cv.notify_all();
    }

    /// The report last popped was written (or dropped): it no longer counts
    /// as waiting.
    fn sent(&self) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
    }

    /// Puts a report whose write failed back at the front.
    fn unpop(&self, r: Report) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        match r {
            Report::Heartbeat(_) => {}
            r => {
                if matches!(r, Report::Log(..)) {
                    s.logs += 1;
                }
                s.queue.push_front(r);
            }
        }
    }

    /// The next report to send: the heartbeat first, then the queue in order,
    /// then a note about dropped logs. Waits up to `wait`.
    fn pop(&self, wait: Duration, stop: &AtomicBool) -> Option<Report> {
        let deadline = Instant::now() + wait;
        let mut s = self.lock();
        loop {
            if let Some(hb) = s.heartbeat.take() {
                s.in_flight += 1;
                return Some(Report::Heartbeat(hb));
            }
            if let Some(r) = s.queue.pop_front() {
                if matches!(r, Report::Log(..)) {
                    s.logs -= 1;
                }
                s.in_flight += 1;
                return Some(r);
            }
            if s.unreported_logs_dropped > 0 {
                let n = std::mem::take(&mut s.unreported_logs_dropped);
                s.in_flight += 1;
                return Some(Report::Log(
                    LogLevel::Warn,
                    LogSource::Agent,
                    format!("{n} log lines dropped (outbox full)").into_bytes(),
                ));
            }
            let now = Instant::now();
            if now >= deadline || stop.load(Ordering::SeqCst) {
                return None;
            }
            s = self
                .cv
                .wait_timeout(s, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Drops an unsent heartbeat (a new connection starts with fresh ones).
    fn clear_heartbeat(&self) {
        self.lock().heartbeat = None;
    }

    /// Whether nothing is waiting, and nothing taken by the link thread is
    /// still being written (a shutdown that stopped the link in the middle of
    /// a write would lose that report).
    pub fn is_empty(&self) -> bool {
        let s = self.lock();
        s.queue.is_empty() && s.heartbeat.is_none() && s.in_flight == 0
    }

    /// The counters.
    pub fn stats(&self) -> OutboxStats {
        self.lock().stats
    }

    /// Wakes the link thread (e.g. to notice a stop or a dead connection).
    pub fn wake(&self) {
        self.cv.notify_all();
    }
}

/// What the link tells the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// Handshake done.
    Connected {
        /// Negotiated version.
        version: u8,
        /// Heartbeat interval from `HelloAck`.
        interval_ms: u32,
    },
    /// The connection ended (the link reconnects by itself).
    Disconnected {
        /// Why.
        why: String,
    },
    /// A message from the host.
    Host(HostMsg),
}

/// Link settings.
#[derive(Clone)]
pub struct LinkConfig {
    /// How to reach the host.
    pub transport: Arc<dyn Transport>,
    /// Random per boot.
    pub boot_id: [u8; 16],
    /// `agent_version` in `Hello`.
    pub agent_version: String,
    /// Reconnect back-off start.
    pub reconnect_initial: Duration,
    /// Reconnect back-off cap.
    pub reconnect_max: Duration,
    /// Limit for connect + `Hello`/`HelloAck`.
    pub handshake_timeout: Duration,
    /// Limit for one frame's write; past it the connection counts as dead.
    pub write_timeout: Duration,
    /// Jitter seed.
    pub seed: u64,
}

/// The capabilities this agent announces.
pub const CAPABILITIES: Capabilities = Capabilities(
    Capabilities::ROLE.0
        | Capabilities::LOG.0
        | Capabilities::HEARTBEAT_INTERVAL.0
        | Capabilities::SHUTDOWN.0,
);

/// The running link thread.
pub struct Link {
    stop: Arc<AtomicBool>,
    outbox: Arc<Outbox>,
    thread: Option<JoinHandle<()>>,
    current: Arc<Mutex<Option<Box<dyn Conn>>>>,
}

impl Link {
    /// Starts the link thread; events go to `events`.
    pub fn start(cfg: LinkConfig, outbox: Arc<Outbox>, events: Sender<LinkEvent>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let current: Arc<Mutex<Option<Box<dyn Conn>>>> = Arc::new(Mutex::new(None));
        let thread = {
            let (stop, outbox, current) = (stop.clone(), outbox.clone(), current.clone());
            std::thread::Builder::new()
                .name("link".into())
                .spawn(move || run(cfg, &outbox, &events, &stop, &current))
                .ok()
        };
        if thread.is_none() {
            say("link: could not start the link thread");
        }
        Self {
            stop,
            outbox,
            thread,
            current,
        }
    }

    /// Stops the thread (closing any connection) and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(c) = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            c.shutdown();
        }
        self.outbox.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

fn run(
    cfg: LinkConfig,
    outbox: &Outbox,
    events: &Sender<LinkEvent>,
    stop: &AtomicBool,
    current: &Mutex<Option<Box<dyn Conn>>>,
) {
    let mut backoff = Backoff::new(cfg.reconnect_initial, cfg.reconnect_max, cfg.seed);
    let mut failures_reported = 0u32;
    while !stop.load(Ordering::SeqCst) {
        let (conn, dec, version, interval_ms) = match handshake(&cfg) {
            Ok(x) => x,
            Err(e) => {
                let delay = backoff.next_delay();
                // Say the first few failures and then every 32nd, not every retry.
                if failures_reported < 3 || failures_reported.trailing_zeros() >= 5 {
                    say(&format!(
                        "link: {}: {e}; retrying in {} ms",
                        cfg.transport.describe(),
                        delay.as_millis()
                    ));
                }
                failures_reported += 1;
                sleep_unless_stopped(delay, stop);
                continue;
            }
        };
        backoff.reset();
        failures_reported = 0;
        say(&format!(
            "link: connected ({}), protocol v{version}, heartbeat {interval_ms} ms",
            cfg.transport.describe()
        ));
        outbox.clear_heartbeat();
        let _ = events.send(LinkEvent::Connected {
            version,
            interval_ms,
        });
        let why = serve(&cfg, conn, dec, version, outbox, events, stop, current);
        say(&format!("link: disconnected: {why}"));
        let _ = events.send(LinkEvent::Disconnected { why });
        if !stop.load(Ordering::SeqCst) {
            sleep_unless_stopped(backoff.next_delay(), stop);
        }
    }
}

type Handshake = (Box<dyn Conn>, StreamDecoder, u8, u32);

fn handshake(cfg: &LinkConfig) -> Result<Handshake, String> {
    let started = Instant::now();
    let mut conn = cfg
        .transport
        .connect(cfg.handshake_timeout)
        .map_err(|e| format!("connect: {e}"))?;
    let left = cfg
        .handshake_timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(10));
    conn.set_timeouts(Some(left), Some(cfg.write_timeout))
        .map_err(|e| format!("socket options: {e}"))?;
    let mut agent_version = cfg.agent_version.as_str();
    while agent_version.len() > guest_proto::MAX_AGENT_VERSION_LEN {
        agent_version = agent_version
            .get(..agent_version.len() - 1)
            .unwrap_or_default();
    }
    let hello = GuestMsg::Hello(Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        boot_id: cfg.boot_id,
        capabilities: CAPABILITIES,
        agent_version,
    });
    let mut out = [0u8; MAX_FRAME_LEN];
    let n = hello
        .encode(PROTOCOL_VERSION, &mut out)
        .map_err(|e| format!("encoding Hello: {e}"))?;
    conn.write_all(out.get(..n).unwrap_or_default())
        .map_err(|e| format!("sending Hello: {e}"))?;
    let mut dec = StreamDecoder::new();
    loop {
        if started.elapsed() > cfg.handshake_timeout {
            return Err("no HelloAck in time".into());
        }
        let got = match dec.next_frame::<HostMsg>() {
            Decoded::NeedMore { .. } => None,
            Decoded::Frame {
                frame:
                    Frame::Known {
                        msg: HostMsg::HelloAck(ack),
                        ..
                    },
                ..
            } => Some(ack),
            Decoded::Frame { frame, .. } => {
                return Err(format!("expected HelloAck, got {frame:?}"));
            }
            Decoded::Error { error, .. } => {
                return Err(format!("bad frame from the host: {error}"))
            }
        };
        if let Some(ack) = got {
            if ack.version == 0 || !guest_proto::is_supported_version(ack.version) {
                return Err(format!(
                    "the host rejected the protocol (HelloAck version {})",
                    ack.version
                ));
            }
            conn.set_timeouts(None, Some(cfg.write_timeout))
                .map_err(|e| format!("socket options: {e}"))?;
            return Ok((conn, dec, ack.version, ack.heartbeat_interval_ms));
        }
        let spare = dec.spare_mut();
        match conn.read(spare) {
            Ok(0) => return Err("the host closed the connection before HelloAck".into()),
            Ok(n) => dec.commit(n),
            Err(e) => return Err(format!("waiting for HelloAck: {e}")),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn serve(
    cfg: &LinkConfig,
    mut conn: Box<dyn Conn>,
    dec: StreamDecoder,
    version: u8,
    outbox: &Outbox,
    events: &Sender<LinkEvent>,
    stop: &AtomicBool,
    current: &Mutex<Option<Box<dyn Conn>>>,
) -> String {
    let dead = Arc::new(AtomicBool::new(false));
    let why = Arc::new(Mutex::new(String::new()));
    let reader = match conn.try_clone_conn() {
        Ok(r) => r,
        Err(e) => return format!("cloning the socket: {e}"),
    };
    match conn.try_clone_conn() {
        Ok(c) => {
            *current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(c);
        }
        Err(e) => return format!("cloning the socket: {e}"),
    }
    let reader_thread = {
        let (dead, why, events) = (dead.clone(), why.clone(), events.clone());
        std::thread::Builder::new()
            .name("link-reader".into())
            .spawn(move || {
                let reason = read_loop(reader, dec, version, &events);
                *why.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = reason;
                dead.store(true, Ordering::SeqCst);
            })
    };
    let reader_thread = match reader_thread {
        Ok(t) => t,
        Err(e) => return format!("starting the reader: {e}"),
    };
    let mut out = [0u8; MAX_FRAME_LEN];
    let mut result = String::new();
    while !stop.load(Ordering::SeqCst) && !dead.load(Ordering::SeqCst) {
        let Some(r) = outbox.pop(Duration::from_millis(50), stop) else {
            continue;
        };
        let n = match r.encode(version, &mut out) {
            Ok(n) => n,
            Err(e) => {
                say(&format!("link: cannot encode {r:?}: {e}; dropped"));
                outbox.sent();
                continue;
            }
        };
        if let Err(e) = conn.write_all(out.get(..n).unwrap_or_default()) {
            outbox.unpop(r);
            result = if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                format!(
                    "a write took longer than {} ms (host not reading)",
                    cfg.write_timeout.as_millis()
                )
            } else {
                format!("write: {e}")
            };
            break;
        }
        outbox.sent();
    }
    conn.shutdown();
    *current
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    let _ = reader_thread.join();
    if result.is_empty() && stop.load(Ordering::SeqCst) {
        result = "closed by the agent (stopping)".into();
    }
    if result.is_empty() {
        result = why
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
    }
    if result.is_empty() {
        result = "stopped".into();
    }
    result
}

fn read_loop(
    mut conn: Box<dyn Conn>,
    mut dec: StreamDecoder,
    version: u8,
    events: &Sender<LinkEvent>,
) -> String {
    loop {
        loop {
            match dec.next_frame::<HostMsg>() {
                Decoded::NeedMore { .. } => break,
                Decoded::Frame {
                    frame: Frame::Known { msg, .. },
                    ..
                } => {
                    if matches!(msg, HostMsg::HelloAck(_)) {
                        // A second HelloAck: harmless, ignored.
                        continue;
                    }
                    if events.send(LinkEvent::Host(msg)).is_err() {
                        return "the supervisor is gone".into();
                    }
                }
                Decoded::Frame { .. } => {} // a newer host's kind: skip
                Decoded::Error { error, recovery } => {
                    if recovery.lost_sync() {
                        return format!("framing error from the host: {error}");
                    }
                    say(&format!(
                        "link: skipped a bad frame from the host (v{version}): {error}"
                    ));
                }
            }
        }
        let spare = dec.spare_mut();
        match conn.read(spare) {
            Ok(0) => return "the host closed the connection".into(),
            Ok(n) => dec.commit(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return format!("read: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(i: usize) -> Report {
        Report::Log(
            LogLevel::Info,
            LogSource::Agent,
            format!("line {i}").into_bytes(),
        )
    }

    #[test]
    fn role_events_survive_a_full_queue_of_logs() {
        let o = Outbox::new(OutboxLimits {
            capacity: 4,
            max_logs: 4,
        });
        for i in 0..10 {
            o.push(log(i));
        }
        o.push(Report::RoleStarted(7));
        o.push(Report::Ready);
        let stop = AtomicBool::new(false);
        let mut got = Vec::new();
        while let Some(r) = o.pop(Duration::ZERO, &stop) {
            got.push(r);
        }
        assert!(got.contains(&Report::RoleStarted(7)) && got.contains(&Report::Ready));
        let stats = o.stats();
        assert_eq!(stats.logs_dropped, 8);
        assert_eq!(stats.role_events_dropped, 0);
        assert!(
            matches!(got.last(), Some(Report::Log(LogLevel::Warn, _, l)) if l.starts_with(b"8 log lines dropped"))
        );
    }

    #[test]
    fn heartbeat_slot_keeps_the_newest_and_goes_first() {
        let o = Outbox::new(OutboxLimits::default());
        let hb = |seq| Heartbeat {
            seq,
            uptime_ms: 0,
            load_avg_x100: [0; 3],
            free_mem_kib: 0,
            role_state: guest_proto::RoleState::NotStarted,
            role_restarts: 0,
        };
        o.push(Report::Pong(1));
        o.push(Report::Heartbeat(hb(1)));
        o.push(Report::Heartbeat(hb(2)));
        let stop = AtomicBool::new(false);
        assert_eq!(o.pop(Duration::ZERO, &stop), Some(Report::Heartbeat(hb(2))));
        assert_eq!(o.pop(Duration::ZERO, &stop), Some(Report::Pong(1)));
        assert_eq!(o.pop(Duration::ZERO, &stop), None);
        assert_eq!(o.stats().heartbeats_replaced, 1);
    }

    #[test]
    fn only_role_events_left_drops_the_oldest_and_counts_it() {
        let o = Outbox::new(OutboxLimits {
            capacity: 2,
            max_logs: 2,
        });
        o.push(Report::RoleStarted(1));
        o.push(Report::RoleStarted(2));
        o.push(Report::RoleStarted(3));
        assert_eq!(o.stats().role_events_dropped, 1);
        let stop = AtomicBool::new(false);
        assert_eq!(o.pop(Duration::ZERO, &stop), Some(Report::RoleStarted(2)));
        o.unpop(Report::RoleStarted(2));
        assert_eq!(o.pop(Duration::ZERO, &stop), Some(Report::RoleStarted(2)));
    }

    /// A report the link thread took counts as waiting until it is written:
    /// a shutdown that waits for an empty outbox must not cut that write.
    #[test]
    fn a_report_being_written_still_counts_as_waiting() {
        let o = Outbox::new(OutboxLimits::default());
        let stop = AtomicBool::new(false);
        o.push(Report::RoleExited(7, guest_proto::ExitStatus::Signal(15)));
        assert!(!o.is_empty());
        let r = o.pop(Duration::ZERO, &stop);
        assert!(r.is_some());
        assert!(!o.is_empty(), "popped but not written yet");
        o.sent();
        assert!(o.is_empty());
        // A failed write puts it back: still waiting, counted once.
        o.push(Report::Ready);
        let r = o.pop(Duration::ZERO, &stop).expect("report");
        o.unpop(r);
        assert!(!o.is_empty());
        let _ = o.pop(Duration::ZERO, &stop);
        o.sent();
        assert!(o.is_empty());
    }
}
