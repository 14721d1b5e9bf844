//! The control socket protocol: how the host agent drives and observes one
//! running `reddog-vmm` (`--api-sock PATH`, a unix stream socket per VM).
//!
//! Framing: one JSON object per line (`\n`), at most [`MAX_LINE_LEN`] bytes
//! before the newline. The client sends [`Request`]s; the VMM answers each with
//! one [`Response`] carrying the same `id`, and, once the connection sent
//! [`Op::Subscribe`], also pushes [`Event`]s. `docs/vmm-api.md` is the reference,
//! with example lines.
//!
//! The framing helpers ([`encode_line`], [`decode_line`], [`read_line`],
//! [`decode_request`], [`decode_server_line`]) are shared by the VMM, the
//! blocking [`Client`] below and any other client (the async host agent).

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{ExitReason, VmConfig};

/// The protocol version, in [`Pong`] and [`Info`]. It changes when a request,
/// response or event changes incompatibly; new optional fields in responses and
/// events do not change it (clients ignore fields they do not know).
pub const PROTOCOL_VERSION: u32 = 2;

/// Longest line, in bytes, not counting the newline, in either direction.
pub const MAX_LINE_LEN: usize = 64 * 1024;

/// Most clients the VMM serves at once; one more is told `busy` and closed.
pub const MAX_CLIENTS: usize = 8;

/// How a VM should shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownMode {
    /// Press the ACPI power button: the guest decides (it may ignore it).
    Acpi,
    /// Stop the VM now; the process exits with [`ExitReason::Requested`].
    Force,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Liveness check; answers [`Pong`].
    Ping,
    /// The VM's configuration and state; answers [`Info`].
    Info,
    /// Start a VM built with `boot_on_request` (its vCPUs held before their
    /// first instruction); answers [`StateReply`]. Once only.
    Boot,
    /// Stop every vCPU; answers [`StateReply`] once all are parked.
    Pause,
    /// Let the vCPUs run again; answers [`StateReply`].
    Resume,
    /// Shut the VM down; answers [`ShutdownReply`].
    Shutdown {
        /// ACPI power button or immediate stop.
        mode: ShutdownMode,
    },
    /// Counters; answers [`Metrics`].
    Metrics,
    /// This connection also receives [`Event`]s from now on; answers [`Subscribed`].
    Subscribe,
}

/// The name of an op on the wire (`"op"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OpName {
    Ping,
    Info,
    Boot,
    Pause,
    Resume,
    Shutdown,
    Metrics,
    Subscribe,
}

/// A request: `{"id": 1, "op": "ping"}`, `{"id": 2, "op": "shutdown", "mode": "force"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawRequest", into = "RawRequest")]
pub struct Request {
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    /// What to do.
    pub op: Op,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    id: u64,
    op: OpName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mode: Option<ShutdownMode>,
}

impl TryFrom<RawRequest> for Request {
    type Error = String;

    fn try_from(r: RawRequest) -> Result<Self, String> {
        let op = match (r.op, r.mode) {
            (OpName::Shutdown, Some(mode)) => Op::Shutdown { mode },
            (OpName::Shutdown, None) => {
                return Err("op \"shutdown\" needs \"mode\": \"acpi\" or \"force\"".into())
            }
            (_, Some(_)) => return Err("only op \"shutdown\" takes \"mode\"".into()),
            (OpName::Ping, None) => Op::Ping,
            (OpName::Info, None) => Op::Info,
            (OpName::Boot, None) => Op::Boot,
            (OpName::Pause, None) => Op::Pause,
            (OpName::Resume, None) => Op::Resume,
            (OpName::Metrics, None) => Op::Metrics,
            (OpName::Subscribe, None) => Op::Subscribe,
        };
        Ok(Self { id: r.id, op })
    }
}

impl From<Request> for RawRequest {
    fn from(r: Request) -> Self {
        let (op, mode) = match r.op {
            Op::Ping => (OpName::Ping, None),
            Op::Info => (OpName::Info, None),
            Op::Boot => (OpName::Boot, None),
            Op::Pause => (OpName::Pause, None),
            Op::Resume => (OpName::Resume, None),
            Op::Shutdown { mode } => (OpName::Shutdown, Some(mode)),
            Op::Metrics => (OpName::Metrics, None),
            Op::Subscribe => (OpName::Subscribe, None),
        };
        Self { id: r.id, op, mode }
    }
}

/// The kind of a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line was too long, not JSON, or not a valid request.
    BadRequest,
    /// The request does not fit the VM's state (resume while running, pause
    /// while paused, pause or resume before `boot`, `boot` twice).
    InvalidState,
    /// The VMM cannot do this.
    Unsupported,
    /// The VMM failed doing it.
    Internal,
    /// Too many clients are connected; the connection is closed.
    Busy,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// For people.
    pub message: String,
}

impl ApiError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

/// The answer to one request: `{"id": 1, "ok": true, "result": {...}}` or
/// `{"id": 1, "ok": false, "error": {"kind": "...", "message": "..."}}`.
///
/// `result` depends on the op (see [`Op`]); read it with [`Response::into_result`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawResponse", into = "RawResponse")]
pub struct Response {
    /// The request's id; `None` (`null`) when the request line could not be read
    /// far enough to find it, or for the `busy` answer.
    pub id: Option<u64>,
    /// The result object or the error.
    pub outcome: Result<serde_json::Value, ApiError>,
}

#[derive(Serialize, Deserialize)]
struct RawResponse {
    id: Option<u64>,
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ApiError>,
}

impl TryFrom<RawResponse> for Response {
    type Error = String;

    fn try_from(r: RawResponse) -> Result<Self, String> {
        let outcome = match (r.ok, r.result, r.error) {
            (true, Some(v), None) => Ok(v),
            (false, None, Some(e)) => Err(e),
            _ => {
                return Err(
                    "a response has \"ok\": true with \"result\", or false with \"error\"".into(),
                )
            }
        };
        Ok(Self { id: r.id, outcome })
    }
}

impl From<Response> for RawResponse {
    fn from(r: Response) -> Self {
        match r.outcome {
            Ok(v) => Self {
                id: r.id,
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Self {
                id: r.id,
                ok: false,
                result: None,
                error: Some(e),
            },
        }
    }
}

impl Response {
    /// A success carrying `result` (serialized to a JSON object).
    pub fn ok(id: u64, result: &impl Serialize) -> Self {
        let outcome = serde_json::to_value(result)
            .map_err(|e| ApiError::new(ErrorKind::Internal, format!("cannot encode result: {e}")));
        Self {
            id: Some(id),
            outcome,
        }
    }

    /// A failure.
    pub fn error(id: Option<u64>, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            id,
            outcome: Err(ApiError::new(kind, message)),
        }
    }

    /// The result as `T`, or the error. A result that is not a `T` becomes an
    /// [`ErrorKind::Internal`] error.
    pub fn into_result<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        let v = self.outcome?;
        serde_json::from_value(v).map_err(|e| {
            ApiError::new(
                ErrorKind::Internal,
                format!("the result does not have the expected shape: {e}"),
            )
        })
    }
}

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Built with `boot_on_request` and not booted yet: the vCPUs are held
    /// before their first instruction.
    Created,
    /// The vCPUs run (or wait in the guest's `hlt`).
    Running,
    /// Every vCPU is parked in the VMM.
    Paused,
}

/// Result of [`Op::Ping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// [`PROTOCOL_VERSION`] of the VMM.
    pub version: u32,
}

/// Result of [`Op::Info`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// [`PROTOCOL_VERSION`] of the VMM.
    pub version: u32,
    /// The VMM's process id.
    pub pid: u32,
    /// Running or paused.
    pub state: VmState,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Microseconds since the VMM's `main` started.
    pub uptime_us: u64,
    /// Microseconds from `main` to the guest's boot-timer write, once it came.
    pub boot_time_us: Option<u64>,
    /// Microseconds from `main` to the first `KVM_RUN`.
    pub first_run_us: Option<u64>,
    /// The configuration the VM was built from.
    pub config: VmConfig,
}

/// Result of [`Op::Pause`] and [`Op::Resume`]: the state now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReply {
    /// The VM's state after the request.
    pub state: VmState,
}

/// Result of [`Op::Shutdown`]. For `force` the process exits right after this
/// answer (subscribers get [`Event::Stopping`] first); for `acpi` the power button
/// was pressed and the guest decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownReply {
    /// The mode that was started.
    pub mode: ShutdownMode,
}

/// Result of [`Op::Subscribe`]: the state at the moment of subscribing, so a
/// client that subscribes late knows what it missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribed {
    /// Running or paused.
    pub state: VmState,
    /// The boot time, if the guest already wrote the boot timer.
    pub boot_time_us: Option<u64>,
}

/// KVM exits to the VMM, by kind, summed over the vCPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    /// Port reads (`in`).
    pub io_in: u64,
    /// Port writes (`out`).
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// `hlt` exits (rare with the in-kernel irqchip).
    pub hlt: u64,
    /// `KVM_RUN` interrupted by a signal (pause kicks).
    pub interrupted: u64,
    /// Every other exit (system events, failures).
    pub other: u64,
}

impl ExitCounts {
    /// Every exit.
    pub fn total(&self) -> u64 {
        self.io_in
            + self.io_out
            + self.mmio_read
            + self.mmio_write
            + self.hlt
            + self.interrupted
            + self.other
    }
}

/// One virtio-net device's counters (in [`Metrics::net`]). "rx" is toward
/// the guest (TAP to guest), "tx" from it (guest to TAP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes (Ethernet frames, without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames from the TAP that were dropped: over the MTU, malformed, or
    /// larger than the guest's receive buffer.
    pub rx_dropped: u64,
    /// Frames the guest sent that reached the TAP.
    pub tx_frames: u64,
    /// Their bytes (without the virtio-net header).
    pub tx_bytes: u64,
    /// Frames from the guest that were dropped: over the MTU plus the header,
    /// malformed descriptor chains or headers, or refused by the TAP.
    pub tx_dropped: u64,
    /// Times the device waited for its rate limiter.
    #[serde(default)]
    pub rate_limited: u64,
}

/// Result of [`Op::Metrics`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// Microseconds since the VMM's `main` started.
    pub uptime_us: u64,
    /// Guest boot time (boot timer), once written.
    pub boot_time_us: Option<u64>,
    /// Exits by kind.
    pub exits: ExitCounts,
    /// Port-I/O exits (`io_in + io_out`).
    pub pio_exits: u64,
    /// MMIO exits (`mmio_read + mmio_write`).
    pub mmio_exits: u64,
    /// Bytes the guest's serial console wrote to its output.
    pub serial_bytes_out: u64,
    /// Completed pauses.
    pub pauses: u64,
    /// ACPI power-button presses.
    pub power_button_presses: u64,
    /// Each virtio-net device, in the config's order.
    #[serde(default)]
    pub net: Vec<NetMetrics>,
}

/// What the VMM pushes to subscribed connections: `{"event": "paused"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The guest wrote the boot timer, `us` microseconds after the VMM's `main`.
    BootTimer {
        /// Microseconds.
        us: u64,
    },
    /// Every vCPU is parked.
    Paused,
    /// The vCPUs run again.
    Resumed,
    /// The VM stopped; the process exits right after this event.
    Stopping {
        /// Why.
        reason: ExitReason,
        /// The process's exit status.
        exit_code: i32,
        /// Detail, as in the exit report.
        #[serde(default)]
        detail: String,
    },
}

/// A line from the VMM: a response or an event.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// An answer to a request.
    Response(Response),
    /// A pushed event.
    Event(Event),
}

/// Errors of the framing helpers.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The encoded line is longer than [`MAX_LINE_LEN`].
    #[error("line of {0} bytes is longer than the limit of {MAX_LINE_LEN}")]
    TooLong(usize),
    /// Not JSON, or not the expected message.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

/// One message as a line: compact JSON and `\n`.
pub fn encode_line<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut v = serde_json::to_vec(msg)?;
    if v.len() > MAX_LINE_LEN {
        return Err(FrameError::TooLong(v.len()));
    }
    v.push(b'\n');
    Ok(v)
}

/// One message from a line (with or without its `\n`).
pub fn decode_line<T: DeserializeOwned>(line: &[u8]) -> Result<T, FrameError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if line.len() > MAX_LINE_LEN {
        return Err(FrameError::TooLong(line.len()));
    }
    Ok(serde_json::from_slice(line)?)
}

/// What [`read_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineRead {
    /// A line is in the buffer (without its `\n`).
    Line,
    /// The peer closed the connection (a partial last line is dropped).
    Eof,
    /// The line is longer than [`MAX_LINE_LEN`]; the stream is left mid-line,
    /// so the connection should be closed.
    TooLong,
}

/// Reads one line into `buf` (cleared first), reading at most
/// [`MAX_LINE_LEN`] + 1 bytes.
pub fn read_line<R: BufRead>(reader: &mut R, buf: &mut Vec<u8>) -> io::Result<LineRead> {
    buf.clear();
    let limit = MAX_LINE_LEN as u64 + 1;
    let n = reader.by_ref().take(limit).read_until(b'\n', buf)?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(LineRead::Line);
    }
    if n as u64 >= limit {
        return Ok(LineRead::TooLong);
    }
    Ok(LineRead::Eof)
}

/// Why a request line was refused, with the id when the line had one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// The request's id, if it could be read.
    pub id: Option<u64>,
    /// True when the line is not JSON at all (the VMM then closes the connection).
    pub not_json: bool,
    /// What is wrong.
    pub message: String,
}

/// Parses a request line, telling apart "not JSON" from "JSON but not a valid
/// request" and recovering the id where possible. Never panics.
pub fn decode_request(line: &[u8]) -> Result<Request, RequestError> {
    let value: serde_json::Value = match decode_line(line) {
        Ok(v) => v,
        Err(e) => {
            return Err(RequestError {
                id: None,
                not_json: true,
                message: format!("not a JSON line: {e}"),
            })
        }
    };
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    serde_json::from_value(value).map_err(|e| RequestError {
        id,
        not_json: false,
        message: format!("not a valid request: {e}; see docs/vmm-api.md"),
    })
}

/// Parses a line from the VMM: an object with `"event"` is an [`Event`],
/// anything else a [`Response`].
pub fn decode_server_line(line: &[u8]) -> Result<ServerMessage, FrameError> {
    let value: serde_json::Value = decode_line(line)?;
    if value.get("event").is_some() {
        Ok(ServerMessage::Event(serde_json::from_value(value)?))
    } else {
        Ok(ServerMessage::Response(serde_json::from_value(value)?))
    }
}

/// Errors of the blocking [`Client`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed (or a read timed out).
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    /// The VMM closed the connection.
    #[error("the VMM closed the control connection")]
    Closed,
    /// The VMM sent something that is not the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The VMM answered with an error.
    #[error("request failed: {0}")]
    Api(#[from] ApiError),
}

/// A small blocking client: one request at a time; events that arrive while
/// waiting for a response are queued for [`Client::next_event`].
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    events: VecDeque<Event>,
    buf: Vec<u8>,
}

impl Client {
    /// Connects to the VMM's control socket.
    pub fn connect(path: impl AsRef<Path>) -> io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            events: VecDeque::new(),
            buf: Vec::new(),
        })
    }

    /// Limits how long a read (a response or an event) may wait; `None` waits forever.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.writer.set_read_timeout(timeout)?;
        self.writer.set_write_timeout(timeout)
    }

    /// Sends `op` and waits for its response (which may be an error response).
    pub fn request(&mut self, op: Op) -> Result<Response, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let line =
            encode_line(&Request { id, op }).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if let Err(e) = self.writer.write_all(&line) {
            // The VMM may have refused the connection (`busy`) and closed it:
            // its answer is still there to read.
            if let Ok(ServerMessage::Response(r)) = self.read_message() {
                if let (None, Err(api)) = (r.id, r.outcome) {
                    return Err(ClientError::Api(api));
                }
            }
            return Err(ClientError::Io(e));
        }
        loop {
            match self.read_message()? {
                ServerMessage::Event(e) => self.events.push_back(e),
                ServerMessage::Response(r) if r.id == Some(id) => return Ok(r),
                ServerMessage::Response(r) => match r.outcome {
                    // An answer to no request: the VMM refused the connection.
                    Err(e) if r.id.is_none() => return Err(ClientError::Api(e)),
                    _ => {
                        return Err(ClientError::Protocol(format!(
                            "response for id {:?} while waiting for {id}",
                            r.id
                        )))
                    }
                },
            }
        }
    }

    /// Sends `op` and returns its typed result, or the VMM's error.
    pub fn call<T: DeserializeOwned>(&mut self, op: Op) -> Result<T, ClientError> {
        Ok(self.request(op)?.into_result()?)
    }

    /// `ping`: the VMM's protocol version.
    pub fn ping(&mut self) -> Result<Pong, ClientError> {
        self.call(Op::Ping)
    }

    /// `info`.
    pub fn info(&mut self) -> Result<Info, ClientError> {
        self.call(Op::Info)
    }

    /// `metrics`.
    pub fn metrics(&mut self) -> Result<Metrics, ClientError> {
        self.call(Op::Metrics)
    }

    /// `subscribe`: events come through [`Client::next_event`] from now on.
    pub fn subscribe(&mut self) -> Result<Subscribed, ClientError> {
        self.call(Op::Subscribe)
    }

    /// The next event (queued or read from the socket). Responses cannot
    /// arrive here: the client has no request outstanding.
    pub fn next_event(&mut self) -> Result<Event, ClientError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        match self.read_message()? {
            ServerMessage::Event(e) => Ok(e),
            ServerMessage::Response(r) => Err(ClientError::Protocol(format!(
                "unexpected response {r:?} while waiting for an event"
            ))),
        }
    }

    /// Writes raw bytes to the socket (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Reads the next line from the VMM.
    pub fn read_message(&mut self) -> Result<ServerMessage, ClientError> {
        match read_line(&mut self.reader, &mut self.buf)? {
            LineRead::Line => decode_server_line(&self.buf)
                .map_err(|e| ClientError::Protocol(format!("bad line from the VMM: {e}"))),
            LineRead::Eof => Err(ClientError::Closed),
            LineRead::TooLong => Err(ClientError::Protocol(
                "the VMM sent a line longer than the limit".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) -> String {
        let line = encode_line(v).expect("encode");
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let back: T = decode_line(&line).expect("decode");
        assert_eq!(&back, v);
        String::from_utf8(line).expect("utf8").trim_end().to_owned()
    }

    #[test]
    fn requests_round_trip_in_the_documented_shape() {
        let cases = [
            (Op::Ping, r#"{"id":1,"op":"ping"}"#),
            (Op::Info, r#"{"id":1,"op":"info"}"#),
            (Op::Pause, r#"{"id":1,"op":"pause"}"#),
            (Op::Resume, r#"{"id":1,"op":"resume"}"#),
            (
                Op::Shutdown {
                    mode: ShutdownMode::Acpi,
                },
                r#"{"id":1,"op":"shutdown","mode":"acpi"}"#,
            ),
            (
                Op::Shutdown {
                    mode: ShutdownMode::Force,
                },
                r#"{"id":1,"op":"shutdown","mode":"force"}"#,
            ),
            (Op::Metrics, r#"{"id":1,"op":"metrics"}"#),
            (Op::Subscribe, r#"{"id":1,"op":"subscribe"}"#),
        ];
        for (op, want) in cases {
            let line = round_trip(&Request { id: 1, op });
            assert_eq!(line, want);
            assert_eq!(decode_request(want.as_bytes()), Ok(Request { id: 1, op }));
        }
        let max = Request {
            id: u64::MAX,
            op: Op::Ping,
        };
        round_trip(&max);
    }

    #[test]
    fn bad_requests_are_told_apart_and_keep_their_id() {
        for (line, id, not_json, want) in [
            (&b"garbage"[..], None, true, "not a JSON line"),
            (b"{\"id\":1,\"op\":\"ping\"", None, true, "not a JSON line"),
            (b"", None, true, "not a JSON line"),
            (b"\xff\xfe", None, true, "not a JSON line"),
            (
                br#"{"id":7,"op":"reboot"}"#,
                Some(7),
                false,
                "unknown variant",
            ),
            (
                br#"{"id":7,"op":"ping","x":1}"#,
                Some(7),
                false,
                "unknown field",
            ),
            (
                br#"{"id":7,"op":"ping","mode":"acpi"}"#,
                Some(7),
                false,
                "only op",
            ),
            (
                br#"{"id":7,"op":"shutdown"}"#,
                Some(7),
                false,
                "needs \"mode\"",
            ),
            (
                br#"{"id":7,"op":"shutdown","mode":"now"}"#,
                Some(7),
                false,
                "unknown variant",
            ),
            (br#"{"op":"ping"}"#, None, false, "missing field `id`"),
            (br#"{"id":-1,"op":"ping"}"#, None, false, "invalid value"),
            (br#"{"id":"1","op":"ping"}"#, None, false, "invalid type"),
            (br#"[1,2]"#, None, false, "not a valid request"),
            (br#"null"#, None, false, "not a valid request"),
        ] {
            let e = decode_request(line).expect_err(&String::from_utf8_lossy(line));
            assert_eq!(e.id, id, "{e:?}");
            assert_eq!(e.not_json, not_json, "{e:?}");
            assert!(e.message.contains(want), "{e:?}");
        }
    }

    #[test]
    fn responses_round_trip() {
        let ok = Response::ok(
            3,
            &Pong {
                version: PROTOCOL_VERSION,
            },
        );
        assert_eq!(
            round_trip(&ok),
            format!(r#"{{"id":3,"ok":true,"result":{{"version":{PROTOCOL_VERSION}}}}}"#)
        );
        assert_eq!(
            ok.clone().into_result::<Pong>(),
            Ok(Pong {
                version: PROTOCOL_VERSION
            })
        );
        // The wrong result type is an error, not a panic.
        assert_eq!(
            ok.into_result::<Info>().expect_err("shape").kind,
            ErrorKind::Internal
        );
        let err = Response::error(None, ErrorKind::BadRequest, "no");
        assert_eq!(
            round_trip(&err),
            r#"{"id":null,"ok":false,"error":{"kind":"bad_request","message":"no"}}"#
        );
        for kind in [
            ErrorKind::InvalidState,
            ErrorKind::Unsupported,
            ErrorKind::Internal,
            ErrorKind::Busy,
        ] {
            round_trip(&Response::error(Some(1), kind, "x"));
        }
        // Inconsistent envelopes are refused.
        for bad in [
            r#"{"id":1,"ok":true}"#,
            r#"{"id":1,"ok":false,"result":{}}"#,
            r#"{"id":1,"ok":true,"result":{},"error":{"kind":"busy","message":""}}"#,
        ] {
            assert!(decode_line::<Response>(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn results_round_trip() {
        let mut cfg = VmConfig::new("/k");
        cfg.api_sock = Some("/run/vm.sock".into());
        round_trip(&Info {
            version: PROTOCOL_VERSION,
            pid: 42,
            state: VmState::Paused,
            vcpus: 2,
            memory_mib: 256,
            uptime_us: 1000,
            boot_time_us: Some(900),
            first_run_us: None,
            config: cfg,
        });
        round_trip(&StateReply {
            state: VmState::Running,
        });
        round_trip(&ShutdownReply {
            mode: ShutdownMode::Acpi,
        });
        round_trip(&Subscribed {
            state: VmState::Running,
            boot_time_us: None,
        });
        let exits = ExitCounts {
            io_in: 1,
            io_out: 2,
            mmio_read: 3,
            mmio_write: 4,
            hlt: 5,
            interrupted: 6,
            other: 7,
        };
        assert_eq!(exits.total(), 28);
        round_trip(&Metrics {
            uptime_us: 1,
            boot_time_us: Some(2),
            exits,
            pio_exits: 3,
            mmio_exits: 7,
            serial_bytes_out: 100,
            pauses: 1,
            power_button_presses: 0,
            net: vec![NetMetrics {
                rx_frames: 1,
                rx_bytes: 60,
                tx_dropped: 2,
                ..NetMetrics::default()
            }],
        });
    }

    #[test]
    fn events_round_trip_and_are_told_from_responses() {
        for (event, want) in [
            (
                Event::BootTimer { us: 5 },
                r#"{"event":"boot_timer","us":5}"#,
            ),
            (Event::Paused, r#"{"event":"paused"}"#),
            (Event::Resumed, r#"{"event":"resumed"}"#),
            (
                Event::Stopping {
                    reason: ExitReason::Requested,
                    exit_code: 17,
                    detail: "d".into(),
                },
                r#"{"event":"stopping","reason":"requested","exit_code":17,"detail":"d"}"#,
            ),
        ] {
            assert_eq!(round_trip(&event), want);
            assert_eq!(
                decode_server_line(want.as_bytes()).expect("decode"),
                ServerMessage::Event(event)
            );
        }
        let resp = Response::ok(
            1,
            &StateReply {
                state: VmState::Paused,
            },
        );
        let line = encode_line(&resp).expect("encode");
        assert_eq!(
            decode_server_line(&line).expect("decode"),
            ServerMessage::Response(resp)
        );
        assert!(decode_server_line(br#"{"event":"exploded"}"#).is_err());
        assert!(decode_server_line(b"{}").is_err());
    }

    #[test]
    fn lines_are_bounded() {
        let long = vec![b'a'; MAX_LINE_LEN + 10];
        assert!(matches!(
            decode_line::<serde_json::Value>(&long),
            Err(FrameError::TooLong(_))
        ));
        let mut input = long.clone();
        input.push(b'\n');
        input.extend_from_slice(b"{}\n");
        let mut r = io::Cursor::new(input);
        let mut buf = Vec::new();
        assert_eq!(
            read_line(&mut r, &mut buf).expect("read"),
            LineRead::TooLong
        );
        assert_eq!(buf.len(), MAX_LINE_LEN + 1);

        // Exactly the limit is fine; the limit plus one is not.
        let mut exact = vec![b' '; MAX_LINE_LEN];
        exact.push(b'\n');
        exact.extend_from_slice(b"partial");
        let mut r = io::Cursor::new(exact);
        assert_eq!(read_line(&mut r, &mut buf).expect("read"), LineRead::Line);
        assert_eq!(buf.len(), MAX_LINE_LEN);
        assert_eq!(read_line(&mut r, &mut buf).expect("read"), LineRead::Eof);
        let mut over = vec![b' '; MAX_LINE_LEN + 1];
        over.push(b'\n');
        let mut r = io::Cursor::new(over);
        assert_eq!(
            read_line(&mut r, &mut buf).expect("read"),
            LineRead::TooLong
        );

        let big = "x".repeat(MAX_LINE_LEN);
        assert!(matches!(encode_line(&big), Err(FrameError::TooLong(_))));
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let pieces: &[&str] = &[
            "{",
            "}",
            "[",
            "]",
            "\"id\"",
            "\"op\"",
            "\"mode\"",
            "\"event\"",
            ":",
            ",",
            "1",
            "-1",
            "1e999",
            "18446744073709551616",
            "null",
            "true",
            "\"ping\"",
            "\"shutdown\"",
            "\"acpi\"",
            "\"force\"",
            "\"paused\"",
            "\"\\u0000\"",
            "\"\\ud800\"",
            " ",
            "\"ok\"",
            "\"result\"",
            "\"error\"",
            "\"kind\"",
            "{}",
            "\u{feff}",
            "\"",
        ];
        for i in 0..600 {
            let line: Vec<u8> = if i % 3 == 0 {
                (0..rng.below(200)).map(|_| rng.next() as u8).collect()
            } else {
                (0..rng.below(30))
                    .flat_map(|_| pieces[rng.below(pieces.len())].bytes())
                    .collect()
            };
            let _ = decode_request(&line);
            let _ = decode_server_line(&line);
            let _ = decode_line::<Request>(&line);
            let _ = decode_line::<Response>(&line);
            let _ = decode_line::<Event>(&line);
            let mut r = io::Cursor::new(line);
            let mut buf = Vec::new();
            while read_line(&mut r, &mut buf).expect("read") == LineRead::Line {}
        }
        // Deep nesting is refused by serde_json's recursion limit, not a stack overflow.
        let deep = "[".repeat(10_000);
        assert!(decode_request(deep.as_bytes()).is_err());
        let deep = format!("{{\"id\":1,\"op\":{}", "[".repeat(10_000));
        assert!(decode_request(deep.as_bytes()).is_err());
    }
}
