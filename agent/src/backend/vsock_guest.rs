//! [`VsockGuestChannel`]: the real guest channel. It listens on the VM's
//! hybrid-vsock socket `<uds>_<port>` (where the VMM forwards the guest's
//! connection to host port `port`) and decodes `guest-proto` frames. Everything
//! the guest sends is untrusted: frames are bounded by the decoder, the
//! connection is rate limited and closed on misbehaviour as
//! `docs/guest-protocol.md` says, and each VM has its own task, so one guest can
//! never delay another.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use guest_proto::{
    Capabilities, Decoded, Frame, GuestMsg, HelloAck, HostMsg, ProtoError, StreamDecoder,
    MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::guest::*;
use crate::util::escape_guest_text;

/// The limits applied to every guest connection (docs/guest-protocol.md).
#[derive(Debug, Clone)]
pub struct GuestLimits {
    /// Close when no `Hello` came this long after connecting.
    pub hello_timeout: Duration,
    /// Close when a frame stays incomplete this long.
    pub partial_frame_timeout: Duration,
    /// Frames per second.
    pub frames_per_sec: f64,
    /// Frame burst.
    pub frame_burst: f64,
    /// Close when throttled this long without a break.
    pub max_throttled: Duration,
    /// Frame errors tolerated per minute.
    pub frame_errors_per_min: u32,
    /// Log lines per second, per instance (across its reconnects).
    pub logs_per_sec: f64,
    /// Log line burst, per instance.
    pub log_burst: f64,
    /// Log lines per second for all the node's guests together: many guests
    /// logging at their own limit cannot flood the agent's log either.
    pub node_logs_per_sec: f64,
    /// Node-wide log line burst.
    pub node_log_burst: f64,
    /// A write to the guest that takes longer closes the connection.
    pub write_timeout: Duration,
    /// After a connection that misbehaved or lasted less than
    /// `healthy_connection`, the next one is accepted only after this long,
    /// doubling up to `reconnect_backoff_max` (a guest reconnecting in a loop
    /// costs the agent a connection, an event and a log line per round).
    pub reconnect_backoff_min: Duration,
    /// The longest wait before the next connection is accepted.
    pub reconnect_backoff_max: Duration,
    /// A connection that lasted this long (and did not misbehave) resets the
    /// backoff.
    pub healthy_connection: Duration,
}

impl Default for GuestLimits {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            partial_frame_timeout: Duration::from_secs(5),
            frames_per_sec: 200.0,
            frame_burst: 1000.0,
            max_throttled: Duration::from_secs(10),
            frame_errors_per_min: 10,
            logs_per_sec: 100.0,
            log_burst: 500.0,
            node_logs_per_sec: 1000.0,
            node_log_burst: 2000.0,
            write_timeout: Duration::from_secs(5),
            reconnect_backoff_min: Duration::from_millis(100),
            reconnect_backoff_max: Duration::from_secs(30),
            healthy_connection: Duration::from_secs(10),
        }
    }
}

/// The real guest channel over the VMM's hybrid vsock.
#[derive(Debug, Clone)]
pub struct VsockGuestChannel {
    limits: GuestLimits,
    /// The node-wide log budget, shared by every guest's task.
    node_logs: Arc<Mutex<Bucket>>,
}

impl Default for VsockGuestChannel {
    fn default() -> Self {
        Self::new(GuestLimits::default())
    }
}

impl VsockGuestChannel {
    /// A channel with these limits.
    pub fn new(limits: GuestLimits) -> Self {
        let node_logs = Arc::new(Mutex::new(Bucket::new(
            limits.node_logs_per_sec,
            limits.node_log_burst,
        )));
        Self { limits, node_logs }
    }
}

/// Whether one more guest log line may be logged: the instance's budget and
/// the node's both have a token (the instance's is spent first, so a guest
/// over its own limit takes nothing from the others).
fn admit_log(instance: &mut Bucket, node: &Mutex<Bucket>) -> bool {
    instance.take() && node.lock().map(|mut b| b.take()).unwrap_or(false)
}

fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[async_trait]
impl GuestChannel for VsockGuestChannel {
    async fn open(&self, instance_id: &str, ep: &GuestEndpoint) -> Result<GuestLink, GuestError> {
        let path = ep.listen_path();
        remove_stale_socket(&path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| GuestError::Listen {
                path: dir.to_owned(),
                source,
            })?;
        }
        let listener = UnixListener::bind(&path).map_err(|source| GuestError::Listen {
            path: path.clone(),
            source,
        })?;
        // A jailed VMM (its own uid) connects: the socket is open to all,
        // its directory (root and the VM's group, sticky) is not.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).map_err(
                |source| GuestError::Listen {
                    path: path.clone(),
                    source,
                },
            )?;
        }
        let (ev_tx, ev_rx) = mpsc::channel(64);
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let span = tracing::info_span!("guest", instance = %instance_id);
        let limits = self.limits.clone();
        let interval = ep.heartbeat_interval_ms;
        let node_logs = self.node_logs.clone();
        let task = tokio::spawn(tracing::Instrument::instrument(
            serve(listener, ev_tx, cmd_rx, limits, interval, node_logs),
            span,
        ));
        Ok(GuestLink::new(ev_rx, cmd_tx, Some(task), Some(path)))
    }
}

async fn serve(
    listener: UnixListener,
    events: mpsc::Sender<GuestEvent>,
    mut commands: mpsc::Receiver<HostCommand>,
    limits: GuestLimits,
    mut interval_ms: u32,
    node_logs: Arc<Mutex<Bucket>>,
) {
    let mut last_boot_id = None;
    // The instance's log budget outlives its connections (a reconnect does
    // not refill it).
    let mut logs = Bucket::new(limits.logs_per_sec, limits.log_burst);
    let mut vm_paused = false;
    // Reconnect quarantine: no accept before `resume_at`.
    let mut backoff = Duration::ZERO;
    let mut resume_at = Instant::now();
    loop {
        let accepting = Instant::now() >= resume_at;
        let stream = tokio::select! {
            () = tokio::time::sleep_until(resume_at), if !accepting => continue,
            r = listener.accept(), if accepting => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            // Nobody is connected: commands have no one to go to.
            c = commands.recv() => match c {
                Some(HostCommand::SetHeartbeatInterval(ms)) => {
                    // For the next guest's HelloAck.
                    interval_ms = ms;
                    continue;
                }
                Some(HostCommand::VmPaused(p)) => {
                    vm_paused = p;
                    continue;
                }
                Some(c) => { tracing::debug!(?c, "no guest connected; command dropped"); continue; }
                None => return,
            },
        };
        let mut conn = Conn::new(
            &limits,
            interval_ms,
            &mut last_boot_id,
            &mut logs,
            &node_logs,
        );
        conn.vm_paused = vm_paused;
        let started = Instant::now();
        let end = conn.run(stream, &events, &mut commands).await;
        if matches!(end, End::Misbehaving(_)) || started.elapsed() < limits.healthy_connection {
            backoff =
                (backoff * 2).clamp(limits.reconnect_backoff_min, limits.reconnect_backoff_max);
            resume_at = Instant::now() + backoff;
        } else {
            backoff = Duration::ZERO;
        }
        // A change during the connection holds for the next one.
        interval_ms = conn.interval_ms;
        vm_paused = conn.vm_paused;
        match &end {
            End::Closed(reason) => tracing::info!("guest connection ended: {reason}"),
            End::Misbehaving(reason) => tracing::warn!("guest connection closed: {reason}"),
            End::AgentGone => return,
        }
        let (reason, misbehaving) = match end {
            End::Closed(r) => (r, false),
            End::Misbehaving(r) => (r, true),
            End::AgentGone => return,
        };
        if events
            .send(GuestEvent::Disconnected {
                reason,
                misbehaving,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

enum End {
    Closed(String),
    Misbehaving(String),
    AgentGone,
}

/// A token bucket over tokio's clock.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
    }

    fn take(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until one token is available.
    fn wait_time(&mut self) -> Duration {
        self.refill();
        Duration::from_secs_f64(((1.0 - self.tokens) / self.rate).max(0.0))
    }
}

struct Conn<'a> {
    limits: &'a GuestLimits,
    interval_ms: u32,
    /// The VM is paused: no hello or partial-frame deadline.
    vm_paused: bool,
    last_boot_id: &'a mut Option<[u8; 16]>,
    negotiated: Option<(u8, Capabilities)>,
    frames: Bucket,
    logs: &'a mut Bucket,
    node_logs: &'a Mutex<Bucket>,
    throttled_since: Option<Instant>,
    errors: Vec<Instant>,
    logs_dropped: u64,
    logs_dropped_reported: Instant,
    unknown_kinds_seen: [bool; 128],
    last_seq: Option<u64>,
}

/// A guest message turned into owned data, or a reason to close.
enum Step {
    Event(GuestEvent),
    Nothing,
    Close(End),
}

impl<'a> Conn<'a> {
    fn new(
        limits: &'a GuestLimits,
        interval_ms: u32,
        last_boot_id: &'a mut Option<[u8; 16]>,
        logs: &'a mut Bucket,
        node_logs: &'a Mutex<Bucket>,
    ) -> Self {
        Self {
            limits,
            interval_ms,
            vm_paused: false,
            last_boot_id,
            negotiated: None,
            frames: Bucket::new(limits.frames_per_sec, limits.frame_burst),
            logs,
            node_logs,
            throttled_since: None,
            errors: Vec::new(),
            logs_dropped: 0,
            logs_dropped_reported: Instant::now(),
            unknown_kinds_seen: [false; 128],
            last_seq: None,
        }
    }

    /// Counts a frame error; `Some` when the budget is spent.
    fn frame_error(&mut self, what: &str) -> Option<End> {
        let now = Instant::now();
        self.errors
            .retain(|t| now.duration_since(*t) < Duration::from_secs(60));
        self.errors.push(now);
        tracing::debug!("guest frame error: {what}");
        (self.errors.len() > self.limits.frame_errors_per_min as usize).then(|| {
            End::Misbehaving(format!(
                "more than {} frame errors in a minute (last: {what})",
                self.limits.frame_errors_per_min
            ))
        })
    }

    async fn run(
        &mut self,
        stream: UnixStream,
        events: &mpsc::Sender<GuestEvent>,
        commands: &mut mpsc::Receiver<HostCommand>,
    ) -> End {
        let (mut rd, mut wr) = stream.into_split();
        let mut dec = StreamDecoder::new();
        let mut connected = Instant::now();
        let mut partial_since: Option<Instant> = None;
        loop {
            // Drain every complete frame, paying for each with a token.
            let mut completed = false;
            loop {
                let step = match dec.next_frame::<GuestMsg>() {
                    Decoded::NeedMore { .. } => break,
                    Decoded::Frame { frame, .. } => {
                        completed = true;
                        self.on_frame(frame)
                    }
                    Decoded::Error { error, recovery } => {
                        if recovery.lost_sync() {
                            return End::Misbehaving(format!("framing error: {error}"));
                        }
                        let what = error.to_string();
                        match self.frame_error(&what) {
                            Some(end) => return end,
                            None => continue,
                        }
                    }
                };
                let step = match step {
                    Ok(s) => s,
                    Err(p) => match self.frame_error(&p.to_string()) {
                        Some(end) => return end,
                        None => Step::Nothing,
                    },
                };
                match step {
                    Step::Nothing => {}
                    Step::Close(end) => return end,
                    Step::Event(ev) => {
                        if let GuestEvent::Hello { version, .. } = &ev {
                            let ack = HostMsg::HelloAck(HelloAck {
                                version: *version,
                                heartbeat_interval_ms: self.interval_ms,
                            });
                            if let Err(end) = self.write(&mut wr, &ack, *version).await {
                                return end;
                            }
                        }
                        if events.send(ev).await.is_err() {
                            return End::AgentGone;
                        }
                    }
                }
                // Rate limit: stop reading until the budget refills (the
                // guest's vsock window fills up and it slows down).
                if !self.frames.take() {
                    let since = *self.throttled_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.limits.max_throttled {
                        return End::Misbehaving(format!(
                            "over {} frames per second for {:?}",
                            self.limits.frames_per_sec, self.limits.max_throttled
                        ));
                    }
                    tokio::time::sleep(self.frames.wait_time()).await;
                    // The token this frame needed.
                    let _ = self.frames.take();
                }
            }
            if self.logs_dropped > 0
                && self.logs_dropped_reported.elapsed() >= Duration::from_secs(1)
            {
                tracing::warn!("{} guest log lines dropped", self.logs_dropped);
                self.logs_dropped = 0;
                self.logs_dropped_reported = Instant::now();
            }
            // The partial-frame clock times one frame: it starts again when
            // a frame completed (a throttled flood whose reads end mid-frame
            // is the flood rule's business, not this one's).
            if dec.is_empty() {
                partial_since = None;
            } else if completed {
                partial_since = Some(Instant::now());
            } else {
                partial_since.get_or_insert_with(Instant::now);
            }
            let hello_deadline = self
                .negotiated
                .is_none()
                .then(|| connected + self.limits.hello_timeout);
            let partial_deadline = partial_since.map(|t| t + self.limits.partial_frame_timeout);
            let deadline = match (hello_deadline, partial_deadline) {
                _ if self.vm_paused => None,
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // While throttled, a break in the flood is the guest having
            // nothing waiting for us: look before waiting. Data already
            // there means it is still ahead of the limit, even when the
            // bucket let a frame through on time (a sleep that overran
            // refills it a little), so the throttled clock runs on.
            if self.throttled_since.is_some() {
                match rd.try_read(dec.spare_mut()) {
                    Ok(0) => return End::Closed("the guest closed the connection".into()),
                    Ok(n) => {
                        dec.commit(n);
                        // Host commands are not delayed by a flood.
                        match commands.try_recv() {
                            Ok(c) => {
                                if let Err(end) = self
                                    .on_command(c, &mut wr, &mut connected, &mut partial_since)
                                    .await
                                {
                                    return end;
                                }
                            }
                            Err(mpsc::error::TryRecvError::Empty) => {}
                            Err(mpsc::error::TryRecvError::Disconnected) => return End::AgentGone,
                        }
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.throttled_since = None;
                    }
                    Err(e) => return End::Closed(format!("read error: {e}")),
                }
            }
            tokio::select! {
                r = rd.read(dec.spare_mut()) => match r {
                    Ok(0) => return End::Closed("the guest closed the connection".into()),
                    Ok(n) => dec.commit(n),
                    Err(e) => return End::Closed(format!("read error: {e}")),
                },
                c = commands.recv() => match c {
                    None => return End::AgentGone,
                    Some(c) => {
                        if let Err(end) = self
                            .on_command(c, &mut wr, &mut connected, &mut partial_since)
                            .await
                        {
                            return end;
                        }
                    }
                },
                _ = crate::util::sleep_until_opt(deadline) => {
                    return End::Misbehaving(if self.negotiated.is_none() {
                        format!("no Hello within {:?} of connecting", self.limits.hello_timeout)
                    } else {
                        format!("a frame stayed incomplete for {:?}", self.limits.partial_frame_timeout)
                    });
                }
            }
        }
    }

    /// A command from the agent: pause state (the clocks start afresh on
    /// resume), or a message to the guest.
    async fn on_command(
        &mut self,
        c: HostCommand,
        wr: &mut tokio::net::unix::OwnedWriteHalf,
        connected: &mut Instant,
        partial_since: &mut Option<Instant>,
    ) -> Result<(), End> {
        match c {
            HostCommand::VmPaused(p) => {
                self.vm_paused = p;
                if !p {
                    *connected = Instant::now();
                    *partial_since = partial_since.map(|_| Instant::now());
                }
                Ok(())
            }
            c => self.command(wr, c).await,
        }
    }

    async fn write(
        &mut self,
        wr: &mut tokio::net::unix::OwnedWriteHalf,
        msg: &HostMsg,
        version: u8,
    ) -> Result<(), End> {
        let mut out = [0u8; MAX_FRAME_LEN];
        let n = msg
            .encode(version.max(1), &mut out)
            .map_err(|e| End::Closed(format!("cannot encode {msg:?}: {e}")))?;
        match tokio::time::timeout(self.limits.write_timeout, wr.write_all(&out[..n])).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::Closed(format!("write error: {e}"))),
            Err(_) => Err(End::Misbehaving(format!(
                "the guest did not read for {:?}",
                self.limits.write_timeout
            ))),
        }
    }

    async fn command(
        &mut self,
        wr: &mut tokio::net::unix::OwnedWriteHalf,
        c: HostCommand,
    ) -> Result<(), End> {
        if let HostCommand::SetHeartbeatInterval(ms) = c {
            // Also what the next HelloAck says (`serve` carries it over to the
            // next connection), should the guest reconnect before it gets this.
            self.interval_ms = ms;
        }
        let Some((version, caps)) = self.negotiated else {
            tracing::debug!(?c, "guest has not said hello; command dropped");
            return Ok(());
        };
        let (msg, need) = match c {
            HostCommand::Shutdown { deadline_ms } => (
                HostMsg::Shutdown(guest_proto::Shutdown { deadline_ms }),
                Capabilities::SHUTDOWN,
            ),
            HostCommand::RestartRole => (HostMsg::RestartRole, Capabilities::ROLE),
            HostCommand::SetHeartbeatInterval(ms) => (
                HostMsg::SetHeartbeatInterval(guest_proto::SetHeartbeatInterval {
                    interval_ms: ms,
                }),
                Capabilities::HEARTBEAT_INTERVAL,
            ),
            HostCommand::Ping(nonce) => (
                HostMsg::Ping(guest_proto::Ping { nonce }),
                Capabilities::NONE,
            ),
            // Handled in `run`; nothing goes to the guest.
            HostCommand::VmPaused(_) => return Ok(()),
        };
        if !caps.contains(need) {
            tracing::debug!(?c, "guest lacks the capability; command dropped");
            return Ok(());
        }
        self.write(wr, &msg, version).await
    }

    fn on_frame(&mut self, frame: Frame<'_, GuestMsg<'_>>) -> Result<Step, ProtoError> {
        let (version, msg) = match frame {
            Frame::Unknown { kind, .. } => {
                if self.negotiated.is_none() {
                    return Ok(Step::Close(End::Misbehaving(
                        "the first frame was not Hello".into(),
                    )));
                }
                let k = usize::from(kind & 0x7f);
                if !self.unknown_kinds_seen[k] {
                    self.unknown_kinds_seen[k] = true;
                    tracing::debug!(kind, "skipping a frame of an unknown kind");
                }
                return Ok(Step::Nothing);
            }
            Frame::Known { version, msg } => (version, msg),
        };
        let Some((negotiated, caps)) = self.negotiated else {
            let GuestMsg::Hello(h) = msg else {
                return Ok(Step::Close(End::Misbehaving(
                    "the first frame was not Hello".into(),
                )));
            };
            let Some(v) = h.negotiate() else {
                return Ok(Step::Close(End::Misbehaving(format!(
                    "no common protocol version (guest {}..={}, host up to {PROTOCOL_VERSION})",
                    h.min_version, h.max_version
                ))));
            };
            if self.last_boot_id.is_some_and(|b| b != h.boot_id) {
                tracing::info!("guest boot id changed: the VM rebooted");
            }
            *self.last_boot_id = Some(h.boot_id);
            self.negotiated = Some((v, h.capabilities));
            return Ok(Step::Event(GuestEvent::Hello {
                boot_id: h.boot_id,
                version: v,
                capabilities: h.capabilities.bits(),
                agent_version: escape_guest_text(h.agent_version.as_bytes(), 64),
            }));
        };
        if version != negotiated {
            // Counts as a frame error, but the frame is still used.
            if let Some(end) = self.frame_error(&format!(
                "frame version {version} after negotiating {negotiated}"
            )) {
                return Ok(Step::Close(end));
            }
        }
        let ev = match msg {
            GuestMsg::Hello(_) => {
                return Ok(Step::Close(End::Misbehaving(
                    "a second Hello on one connection".into(),
                )))
            }
            GuestMsg::Heartbeat(hb) => {
                if self.last_seq.is_some_and(|s| hb.seq <= s) {
                    tracing::debug!(seq = hb.seq, "heartbeat sequence did not increase");
                }
                self.last_seq = Some(hb.seq);
                GuestEvent::Heartbeat {
                    seq: hb.seq,
                    uptime_ms: hb.uptime_ms,
                    free_mem_kib: hb.free_mem_kib,
                    role: hb.role_state.into(),
                    role_restarts: hb.role_restarts,
                }
            }
            GuestMsg::RoleStarted(_) | GuestMsg::RoleExited(_)
                if !caps.contains(Capabilities::ROLE) =>
            {
                return self.cap_error("role message without the ROLE capability");
            }
            GuestMsg::RoleStarted(r) => GuestEvent::RoleStarted { pid: r.pid },
            GuestMsg::RoleExited(r) => GuestEvent::RoleExited {
                pid: r.pid,
                how: match r.status {
                    guest_proto::ExitStatus::Code(c) => format!("exit code {c}"),
                    guest_proto::ExitStatus::Signal(s) => format!("signal {s}"),
                },
            },
            GuestMsg::Ready => GuestEvent::Ready,
            GuestMsg::Log(l) => {
                if !caps.contains(Capabilities::LOG) {
                    return self.cap_error("Log without the LOG capability");
                }
                if admit_log(self.logs, self.node_logs) {
                    let line = escape_guest_text(l.line, guest_proto::MAX_LOG_LINE_LEN);
                    tracing::info!(source = ?l.source, level = ?l.level, "guest: {line}");
                } else {
                    self.logs_dropped += 1;
                }
                return Ok(Step::Nothing);
            }
            GuestMsg::Pong(p) => GuestEvent::Pong { nonce: p.nonce },
        };
        Ok(Step::Event(ev))
    }

    fn cap_error(&mut self, what: &str) -> Result<Step, ProtoError> {
        Ok(match self.frame_error(what) {
            Some(end) => Step::Close(end),
            None => Step::Nothing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two guests each within their own limit share the node's budget: the
    /// node-wide total holds, and a guest over its own limit takes nothing
    /// from the other's share.
    #[tokio::test(start_paused = true)]
    async fn guest_log_lines_share_a_node_wide_budget() {
        let node = Mutex::new(Bucket::new(10.0, 10.0));
        let (mut a, mut b) = (Bucket::new(100.0, 100.0), Bucket::new(100.0, 100.0));
        let admitted = (0..50)
            .filter(|_| admit_log(&mut a, &node))
            .chain((0..50).filter(|_| admit_log(&mut b, &node)))
            .count();
        assert_eq!(admitted, 10, "the node-wide burst");
        // A guest over its own (small) limit: its extra lines are refused
        // before they reach the node's bucket.
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut greedy = Bucket::new(1.0, 2.0);
        let greedy_in = (0..100).filter(|_| admit_log(&mut greedy, &node)).count();
        assert_eq!(greedy_in, 2);
        let others = (0..100).filter(|_| admit_log(&mut b, &node)).count();
        assert_eq!(others, 8, "the rest of the refilled node budget");
    }
}
