//! The agent's async client of one VMM's control socket (`docs/vmm-api.md`):
//! a single connection per running VMM, subscribed to its events, that also
//! carries the agent's requests (pause, resume).
//!
//! Two tasks per connection: a reader that turns bounded lines into
//! [`ServerMessage`]s, and a writer that sends requests and matches answers to
//! them by id. [`ControlConn`] is the handle; dropping it ends both tasks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use vmm_api::control::{
    decode_server_line, encode_line, ApiError, Event, Op, Request, ServerMessage, Subscribed,
    VmState, MAX_LINE_LEN,
};

/// The first wait before a connection attempt is retried while the VMM has
/// not made its socket yet; it doubles up to [`CONNECT_RETRY_MAX`] (a VMM
/// binds its socket a few ms after it starts, later when many start at once).
const CONNECT_RETRY: Duration = Duration::from_millis(1);
/// The longest wait between connection attempts.
const CONNECT_RETRY_MAX: Duration = Duration::from_millis(10);

/// Events queued for the agent before the reader waits for it to take them.
const EVENT_QUEUE: usize = 64;

/// Why a control request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The VMM has no control socket (the agent runs with
    /// `--no-vmm-control-socket`) or it could not be reached.
    #[error("the VMM's control socket {path} is not reachable: {why}; is the VMM running with --api-sock?")]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The VMM answered with an error.
    #[error("the VMM refused: {0}")]
    Refused(ApiError),
    /// The connection closed (the VMM is exiting).
    #[error("the VMM's control connection closed; the VMM is probably exiting")]
    Closed,
    /// No answer in time.
    #[error("the VMM did not answer within {0:?}")]
    Timeout(Duration),
    /// The answer did not have the expected shape.
    #[error("the VMM sent an unexpected answer: {0}")]
    Protocol(String),
}

struct Pending {
    op: Op,
    reply: oneshot::Sender<Result<serde_json::Value, ControlError>>,
}

/// One subscribed control connection.
#[derive(Debug)]
pub struct ControlConn {
    reqs: mpsc::Sender<Pending>,
    events: Option<mpsc::Receiver<Event>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pending({:?})", self.op)
    }
}

impl Drop for ControlConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ControlConn {
    /// Connects to `path` (retrying for `connect_within` while the VMM makes
    /// its socket) and subscribes. Returns at once; the connection is made in
    /// the background.
    pub fn spawn(path: PathBuf, connect_within: Duration) -> Self {
        let (req_tx, req_rx) = mpsc::channel(8);
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        let task = tokio::spawn(run(path, connect_within, req_rx, ev_tx));
        Self {
            reqs: req_tx,
            events: Some(ev_rx),
            task,
        }
    }

    /// Sends `op` and waits at most `timeout` for its result.
    pub async fn request(
        &self,
        op: Op,
        timeout: Duration,
    ) -> Result<serde_json::Value, ControlError> {
        let (tx, rx) = oneshot::channel();
        let work = async {
            self.reqs
                .send(Pending { op, reply: tx })
                .await
                .map_err(|_| ControlError::Closed)?;
            rx.await.map_err(|_| ControlError::Closed)?
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| ControlError::Timeout(timeout))?
    }

    /// Pauses or resumes; returns the VM's state the VMM reports after it.
    pub async fn set_running(&self, run: bool, timeout: Duration) -> Result<VmState, ControlError> {
        let op = if run { Op::Resume } else { Op::Pause };
        let v = self.request(op, timeout).await?;
        let reply: vmm_api::control::StateReply =
            serde_json::from_value(v).map_err(|e| ControlError::Protocol(e.to_string()))?;
        Ok(reply.state)
    }

    /// Takes the event stream (the first call only); it ends when the
    /// connection closes. Right after subscribing, the VM's state so far is
    /// replayed as events (a `boot_timer` already written, `paused`), so a
    /// client that connects late (an agent re-adopting a VMM) misses nothing.
    pub fn take_events(&mut self) -> Option<mpsc::Receiver<Event>> {
        self.events.take()
    }
}

/// The state the VMM reported when the subscription started, as events.
fn replay(s: &Subscribed) -> Vec<Event> {
    let mut v = Vec::new();
    if let Some(us) = s.boot_time_us {
        v.push(Event::BootTimer { us });
    }
    if s.state == VmState::Paused {
        v.push(Event::Paused);
    }
    v
}

async fn run(
    path: PathBuf,
    connect_within: Duration,
    mut reqs: mpsc::Receiver<Pending>,
    events: mpsc::Sender<Event>,
) {
    let deadline = tokio::time::Instant::now() + connect_within;
    let mut retry = CONNECT_RETRY;
    let stream = loop {
        match UnixStream::connect(&path).await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                let err = ControlError::Unreachable {
                    path: path.clone(),
                    why: e.to_string(),
                };
                tracing::warn!("{err}");
                drop(events);
                refuse_all(&mut reqs, err).await;
                return;
            }
            Err(_) => {
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(CONNECT_RETRY_MAX);
            }
        }
    };
    let (rd, mut wr) = stream.into_split();
    let (msg_tx, mut msgs) = mpsc::channel(EVENT_QUEUE);
    // Aborted when this task ends or is aborted (the handle dropped), so the
    // connection never outlives the handle.
    let reader = AbortOnDrop(tokio::spawn(read_lines(rd, msg_tx)));
    let mut pending: HashMap<u64, oneshot::Sender<Result<serde_json::Value, ControlError>>> =
        HashMap::new();
    let subscribe_id = 0;
    let mut next_id = 1u64;
    let mut ok = write_request(
        &mut wr,
        Request {
            id: subscribe_id,
            op: Op::Subscribe,
        },
    )
    .await;
    while ok {
        tokio::select! {
            r = reqs.recv() => match r {
                None => break,
                Some(p) => {
                    let id = next_id;
                    next_id += 1;
                    if write_request(&mut wr, Request { id, op: p.op }).await {
                        pending.insert(id, p.reply);
                    } else {
                        let _ = p.reply.send(Err(ControlError::Closed));
                        ok = false;
                    }
                }
            },
            m = msgs.recv() => match m {
                None => ok = false,
                Some(ServerMessage::Event(e)) => {
                    // Nobody takes events any more (the instance stopped
                    // watching): drop them, the requests still work.
                    let _ = events.send(e).await;
                }
                Some(ServerMessage::Response(r)) if r.id == Some(subscribe_id) => {
                    match r.into_result::<Subscribed>() {
                        Ok(s) => {
                            for e in replay(&s) {
                                let _ = events.send(e).await;
                            }
                        }
                        Err(e) => {
                            tracing::warn!("the VMM refused the event subscription: {e}");
                        }
                    }
                }
                Some(ServerMessage::Response(r)) => {
                    match r.id.and_then(|id| pending.remove(&id)) {
                        Some(tx) => {
                            let _ = tx.send(r.outcome.map_err(ControlError::Refused));
                        }
                        None => tracing::debug!(id = ?r.id, "an answer to no request"),
                    }
                }
            },
        }
    }
    drop(reader);
    drop(events);
    for (_, tx) in pending.drain() {
        let _ = tx.send(Err(ControlError::Closed));
    }
    refuse_all(&mut reqs, ControlError::Closed).await;
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Answers every later request with `err` until the handle is dropped.
async fn refuse_all(reqs: &mut mpsc::Receiver<Pending>, err: ControlError) {
    while let Some(p) = reqs.recv().await {
        let _ = p.reply.send(Err(err.clone()));
    }
}

async fn write_request(wr: &mut tokio::net::unix::OwnedWriteHalf, req: Request) -> bool {
    match encode_line(&req) {
        Ok(line) => wr.write_all(&line).await.is_ok(),
        Err(e) => {
            tracing::error!("cannot encode a control request: {e}");
            false
        }
    }
}

/// Reads lines of at most [`MAX_LINE_LEN`] bytes; ends at EOF, on an error or
/// on an over-long line (the VMM is ours, but a line is still bounded).
async fn read_lines(rd: tokio::net::unix::OwnedReadHalf, out: mpsc::Sender<ServerMessage>) {
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let limit = MAX_LINE_LEN as u64 + 1;
        match (&mut rd).take(limit).read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) if buf.last() != Some(&b'\n') => {
                tracing::warn!("the VMM sent an over-long or truncated control line; closing");
                return;
            }
            Ok(_) => {}
        }
        match decode_server_line(&buf) {
            Ok(m) => {
                if out.send(m).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!("the VMM sent an invalid control line: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    /// A scripted VMM end: answers subscribe (paused, booted), pause/resume,
    /// pushes one event, then closes.
    #[tokio::test]
    async fn subscribes_replays_and_matches_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.sock");
        let conn_path = path.clone();
        // The client starts before the socket exists: it must retry.
        let mut c = ControlConn::spawn(conn_path, Duration::from_secs(5));
        let mut ev = c.take_events().expect("events");
        assert!(c.take_events().is_none(), "taken once");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let l = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let (rd, mut wr) = s.into_split();
            let mut lines = BufReader::new(rd).lines();
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                let req: Request = serde_json::from_str(&line).expect("request");
                seen.push(req.op);
                let answer = match req.op {
                    Op::Subscribe => serde_json::json!({"id": req.id, "ok": true,
                        "result": {"state": "paused", "boot_time_us": 1234}}),
                    Op::Resume if seen.len() == 2 => serde_json::json!({"id": req.id, "ok": true,
                        "result": {"state": "running"}}),
                    _ => serde_json::json!({"id": req.id, "ok": false,
                        "error": {"kind": "invalid_state", "message": "no"}}),
                };
                let mut out = serde_json::to_vec(&answer).expect("json");
                out.push(b'\n');
                wr.write_all(&out).await.expect("write");
                if req.op == Op::Resume && seen.len() == 2 {
                    wr.write_all(b"{\"event\":\"resumed\"}\n")
                        .await
                        .expect("write");
                }
                if seen.len() == 3 {
                    break;
                }
            }
            seen
        });
        assert_eq!(
            ev.recv().await,
            Some(Event::BootTimer { us: 1234 }),
            "boot timer replayed"
        );
        assert_eq!(ev.recv().await, Some(Event::Paused), "paused replayed");
        let t = Duration::from_secs(5);
        assert_eq!(c.set_running(true, t).await, Ok(VmState::Running));
        assert_eq!(ev.recv().await, Some(Event::Resumed));
        match c.set_running(true, t).await {
            Err(ControlError::Refused(e)) => {
                assert_eq!(e.kind, vmm_api::control::ErrorKind::InvalidState)
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let seen = server.await.expect("server");
        assert_eq!(seen, vec![Op::Subscribe, Op::Resume, Op::Resume]);
        // The server closed: events end and requests fail as closed.
        assert_eq!(ev.recv().await, None);
        assert_eq!(c.set_running(false, t).await, Err(ControlError::Closed));
    }

    #[tokio::test]
    async fn unreachable_socket_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("none.sock");
        let mut c = ControlConn::spawn(path, Duration::from_millis(100));
        let mut ev = c.take_events().expect("events");
        let e = c
            .set_running(false, Duration::from_secs(5))
            .await
            .expect_err("no socket");
        assert!(matches!(e, ControlError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains("--api-sock"), "{e}");
        assert_eq!(ev.recv().await, None);
    }
}
