//! The control socket server: a blocking `UnixListener` on its own thread, a
//! thread per client (at most [`MAX_CLIENTS`]), and a small thread that turns
//! the guest's boot-timer write into an event. Nothing here runs on a vCPU
//! thread or holds a lock a vCPU needs: pausing goes through the [`Gate`], a
//! forced shutdown through the same channel the vCPUs report stops on.
//!
//! [`Gate`]: super::gate::Gate

use std::io::{BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_api::control::{
    decode_request, encode_line, read_line, ErrorKind, Event, Info, LineRead, Metrics, Op, Pong,
    Response, ShutdownMode, ShutdownReply, StateReply, Subscribed, VmState, MAX_CLIENTS,
    MAX_LINE_LEN, PROTOCOL_VERSION,
};
use vmm_api::{ExitReason, ExitReport, VmConfig};

use super::RunControl;
use crate::devices::Bus;
use crate::seccomp::{Ready, Seccomp, ThreadKind};
use crate::vstate::vcpu::StopEvent;

/// How long a write to one client may block (a client that stops reading is
/// dropped, never waited on).
const WRITE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a pause may take before it is undone and reported as failed.
const PAUSE_LIMIT: Duration = Duration::from_secs(5);

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The path is taken or cannot be bound.
    #[error("control socket {path}: {why}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A thread could not be started.
    #[error("cannot start the control socket thread: {0}")]
    Thread(std::io::Error),
}

/// What the server needs from the running VM.
pub struct ControlContext {
    /// The configuration (for `info`).
    pub cfg: VmConfig,
    /// When the VMM's `main` started.
    pub start: Instant,
    /// The device buses (boot timer, power button).
    pub bus: Arc<Bus>,
    /// The vCPUs' pause gate and counters.
    pub run: Arc<RunControl>,
    /// Where stops are reported (the main thread waits on it).
    pub stops: Sender<StopEvent>,
    /// First `KVM_RUN`, microseconds + 1 (0 = not yet).
    pub first_run_us: Arc<AtomicU64>,
    /// The threads' seccomp filters.
    pub seccomp: Seccomp,
}

type Writer = Arc<Mutex<UnixStream>>;

struct Subscriber {
    conn: u64,
    writer: Writer,
}

struct Shared {
    ctx: ControlContext,
    path: PathBuf,
    /// (device, inode) of the socket we bound, so we only ever remove our own.
    ident: Option<(u64, u64)>,
    subscribers: Mutex<Vec<Subscriber>>,
    clients: AtomicUsize,
    next_conn: AtomicU64,
    /// Serializes pause and resume.
    ops: Mutex<()>,
}

/// The running control socket.
pub struct ControlServer {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds `path`: a stale socket file (nobody listening) is replaced; a socket
/// with a live listener, or a file that is not a socket, is refused.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let err = |why: String| ServerError::Socket {
        path: path.to_owned(),
        why,
    };
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(err(
                    "in use: another process (a VMM still running?) listens on it".into(),
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
        }
        Ok(_) => {
            return Err(err(
                "exists and is not a socket; refusing to replace it".into()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let listener = UnixListener::bind(path).map_err(|e| err(format!("cannot bind: {e}")))?;
    // Only the VMM's user (the agent) may connect.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(format!("cannot restrict permissions: {e}")))?;
    Ok(listener)
}

fn write_line(writer: &Writer, line: &[u8]) -> bool {
    lock(writer).write_all(line).is_ok()
}

fn send(writer: &Writer, response: &Response) -> bool {
    match encode_line(response) {
        Ok(line) => write_line(writer, &line),
        Err(e) => {
            tracing::warn!("control: cannot encode a response: {e}");
            false
        }
    }
}

impl ControlServer {
    /// Binds `path` and starts serving. Called once the vCPU threads are
    /// started (held until the main thread's filter is in place, and on the
    /// gate until `boot` with `boot_on_request`). The [`Ready`]s say when the
    /// server's two threads have installed their filters.
    pub fn start(path: &Path, ctx: ControlContext) -> Result<(Self, Vec<Ready>), ServerError> {
        // Now, before any filter: a pause must not need `rt_sigaction`.
        super::gate::prepare_kick().map_err(|e| ServerError::Thread(std::io::Error::other(e)))?;
        let listener = bind(path)?;
        let ident = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let shared = Arc::new(Shared {
            ctx,
            path: path.to_owned(),
            ident,
            subscribers: Mutex::new(Vec::new()),
            clients: AtomicUsize::new(0),
            next_conn: AtomicU64::new(0),
            ops: Mutex::new(()),
        });

        // The boot timer is written on a vCPU thread: it only sends on a
        // channel; this thread does the socket writes.
        let (boot_tx, boot_rx) = mpsc::channel::<u64>();
        shared.ctx.bus.boot_timer().notify_on_boot(boot_tx);
        let s = shared.clone();
        let seccomp = &shared.ctx.seccomp;
        let (_, events) = seccomp
            .spawn("api-events".into(), ThreadKind::ApiEvents, move || {
                for us in boot_rx {
                    s.broadcast(&Event::BootTimer { us });
                }
            })
            .map_err(ServerError::Thread)?;

        let s = shared.clone();
        let (_, api) = seccomp
            .spawn("api".into(), ThreadKind::Api, move || {
                s.accept_loop(listener)
            })
            .map_err(ServerError::Thread)?;
        Ok((Self { shared }, vec![events, api]))
    }

    /// Tells subscribers why the VM stops (the process exits right after) and
    /// removes the socket file.
    pub fn announce_stop(&self, report: &ExitReport) {
        self.shared.broadcast(&Event::Stopping {
            reason: report.reason,
            exit_code: report.exit_code,
            detail: report.detail.clone(),
        });
        let s = &self.shared;
        let still_ours = std::fs::symlink_metadata(&s.path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
            == s.ident;
        if still_ours && s.ident.is_some() {
            let _ = std::fs::remove_file(&s.path);
        }
    }
}

impl Shared {
    fn accept_loop(self: Arc<Self>, listener: UnixListener) {
        for conn in listener.incoming() {
            let stream = match conn {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors or similar: do not spin.
                    tracing::warn!("control: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
            if self.clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                self.clients.fetch_sub(1, Ordering::AcqRel);
                let busy = Response::error(
                    None,
                    ErrorKind::Busy,
                    format!("at most {MAX_CLIENTS} clients at once"),
                );
                if let Ok(line) = encode_line(&busy) {
                    let _ = (&stream).write_all(&line);
                }
                continue;
            }
            let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
            let s = self.clone();
            // The client's thread installs its own filter before it reads a
            // byte (it fails closed: no filter, no service).
            let spawned =
                self.ctx
                    .seccomp
                    .spawn("api-client".into(), ThreadKind::ApiClient, move || {
                        s.serve(stream, conn)
                    });
            if spawned.is_err() {
                self.clients.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Serves one client until it closes, sends a line that is too long or not
    /// JSON, or stops reading.
    fn serve(self: Arc<Self>, stream: UnixStream, conn: u64) {
        if let Ok(w) = stream.try_clone() {
            self.serve_lines(BufReader::new(stream), Arc::new(Mutex::new(w)), conn);
        }
        lock(&self.subscribers).retain(|s| s.conn != conn);
        self.clients.fetch_sub(1, Ordering::AcqRel);
    }

    fn serve_lines(&self, mut reader: BufReader<UnixStream>, writer: Writer, conn: u64) {
        let mut buf = Vec::new();
        loop {
            match read_line(&mut reader, &mut buf) {
                Ok(LineRead::Line) => {}
                Ok(LineRead::TooLong) => {
                    let msg = format!("line longer than {MAX_LINE_LEN} bytes; closing");
                    send(&writer, &Response::error(None, ErrorKind::BadRequest, msg));
                    return;
                }
                Ok(LineRead::Eof) | Err(_) => return,
            }
            let req = match decode_request(&buf) {
                Ok(r) => r,
                Err(e) => {
                    let msg = if e.not_json {
                        format!("{}; closing", e.message)
                    } else {
                        e.message
                    };
                    let ok = send(&writer, &Response::error(e.id, ErrorKind::BadRequest, msg));
                    if e.not_json || !ok {
                        return;
                    }
                    continue;
                }
            };
            let sent = match req.op {
                Op::Subscribe => self.subscribe(req.id, conn, &writer),
                Op::Shutdown {
                    mode: ShutdownMode::Force,
                } => {
                    // Answer first: the process exits soon after the stop.
                    let ok = send(
                        &writer,
                        &Response::ok(
                            req.id,
                            &ShutdownReply {
                                mode: ShutdownMode::Force,
                            },
                        ),
                    );
                    let _ = self.ctx.stops.send(StopEvent {
                        reason: ExitReason::Requested,
                        detail: "shutdown (force) requested on the control socket".into(),
                        vcpu: u8::MAX,
                        regs: None,
                    });
                    ok
                }
                op => send(&writer, &self.handle(req.id, op)),
            };
            if !sent {
                return;
            }
        }
    }

    fn subscribe(&self, id: u64, conn: u64, writer: &Writer) -> bool {
        // Under the subscribers lock: the answer goes out before any event.
        let mut subs = lock(&self.subscribers);
        let reply = Subscribed {
            state: self.state(),
            boot_time_us: self.ctx.bus.boot_timer().boot_time_us(),
        };
        if !subs.iter().any(|s| s.conn == conn) {
            subs.push(Subscriber {
                conn,
                writer: writer.clone(),
            });
        }
        send(writer, &Response::ok(id, &reply))
    }

    fn state(&self) -> VmState {
        if !self.ctx.run.booted.load(Ordering::SeqCst) {
            VmState::Created
        } else if self.ctx.run.gate.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    fn uptime_us(&self) -> u64 {
        self.ctx.start.elapsed().as_micros() as u64
    }

    fn handle(&self, id: u64, op: Op) -> Response {
        let run = &self.ctx.run;
        match op {
            Op::Ping => Response::ok(
                id,
                &Pong {
                    version: PROTOCOL_VERSION,
                },
            ),
            Op::Info => {
                let first = self.ctx.first_run_us.load(Ordering::SeqCst);
                Response::ok(
                    id,
                    &Info {
                        version: PROTOCOL_VERSION,
                        pid: std::process::id(),
                        state: self.state(),
                        vcpus: self.ctx.cfg.vcpus,
                        memory_mib: self.ctx.cfg.memory_mib,
                        uptime_us: self.uptime_us(),
                        boot_time_us: self.ctx.bus.boot_timer().boot_time_us(),
                        first_run_us: (first > 0).then(|| first - 1),
                        config: self.ctx.cfg.clone(),
                    },
                )
            }
            Op::Boot => {
                let _ops = lock(&self.ops);
                if run.booted.swap(true, Ordering::SeqCst) {
                    return Response::error(
                        Some(id),
                        ErrorKind::InvalidState,
                        "the VM is booted already (it was built without boot_on_request, or booted before)",
                    );
                }
                run.gate.resume();
                Response::ok(
                    id,
                    &StateReply {
                        state: VmState::Running,
                    },
                )
            }
            Op::Pause | Op::Resume if !run.booted.load(Ordering::SeqCst) => Response::error(
                Some(id),
                ErrorKind::InvalidState,
                "the VM has not booted yet; send boot first",
            ),
            // No guest runs to see the button: say so, so the caller stops the
            // VMM another way (`shutdown force`, a signal).
            Op::Shutdown {
                mode: ShutdownMode::Acpi,
            } if !run.booted.load(Ordering::SeqCst) => Response::error(
                Some(id),
                ErrorKind::InvalidState,
                "the VM has not booted yet: no guest to press the power button for; use mode force",
            ),
            Op::Pause => {
                let _ops = lock(&self.ops);
                if run.gate.is_paused() {
                    return Response::error(
                        Some(id),
                        ErrorKind::InvalidState,
                        "the VM is already paused",
                    );
                }
                if let Err(e) = run.gate.pause(PAUSE_LIMIT) {
                    return Response::error(Some(id), ErrorKind::Internal, e);
                }
                run.counters.pauses.fetch_add(1, Ordering::Relaxed);
                self.broadcast(&Event::Paused);
                Response::ok(
                    id,
                    &StateReply {
                        state: VmState::Paused,
                    },
                )
            }
            Op::Resume => {
                let _ops = lock(&self.ops);
                if !run.gate.is_paused() {
                    return Response::error(
                        Some(id),
                        ErrorKind::InvalidState,
                        "the VM is not paused",
                    );
                }
                run.gate.resume();
                self.broadcast(&Event::Resumed);
                Response::ok(
                    id,
                    &StateReply {
                        state: VmState::Running,
                    },
                )
            }
            Op::Shutdown {
                mode: ShutdownMode::Acpi,
            } => match self.ctx.bus.ged().press_power_button() {
                Ok(()) => {
                    run.counters
                        .power_button_presses
                        .fetch_add(1, Ordering::Relaxed);
                    Response::ok(
                        id,
                        &ShutdownReply {
                            mode: ShutdownMode::Acpi,
                        },
                    )
                }
                Err(e) => Response::error(
                    Some(id),
                    ErrorKind::Internal,
                    format!("cannot press the power button: {e}"),
                ),
            },
            Op::Metrics => {
                let exits = run.counters.exits();
                Response::ok(
                    id,
                    &Metrics {
                        uptime_us: self.uptime_us(),
                        boot_time_us: self.ctx.bus.boot_timer().boot_time_us(),
                        exits,
                        pio_exits: exits.io_in + exits.io_out,
                        mmio_exits: exits.mmio_read + exits.mmio_write,
                        serial_bytes_out: run.counters.serial_bytes_out.load(Ordering::Relaxed),
                        pauses: run.counters.pauses.load(Ordering::Relaxed),
                        power_button_presses: run
                            .counters
                            .power_button_presses
                            .load(Ordering::Relaxed),
                        net: run.counters.net(),
                    },
                )
            }
            // Served in `serve_lines` (they need the connection).
            Op::Subscribe
            | Op::Shutdown {
                mode: ShutdownMode::Force,
            } => Response::error(Some(id), ErrorKind::Internal, "misrouted request"),
        }
    }

    /// Sends `event` to every subscriber; one that cannot take it is dropped.
    fn broadcast(&self, event: &Event) {
        let Ok(line) = encode_line(event) else {
            return;
        };
        lock(&self.subscribers).retain(|s| {
            let ok = write_line(&s.writer, &line);
            if !ok {
                let _ = lock(&s.writer).shutdown(std::net::Shutdown::Both);
            }
            ok
        });
    }
}
