//! The supervisor, the guest agent's main loop: supervises the role, keeps
//! the host informed, obeys the host. Runs the same as PID 1 in the VM and
//! as an ordinary process on the host (tests), where only the transport and
//! the paths differ.
//!
//! One thread (the caller's) owns all role state and runs a loop that wakes
//! on every host message and at least every `tick`: it reaps children, starts
//! and stops the role on schedule, runs readiness checks and, once the role is
//! ready, liveness checks (each on a short-lived thread, so a hanging check
//! never stalls the loop), and emits heartbeats into the outbox. Nothing in the loop ever writes to the host directly: see
//! [`crate::link`].

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_proto::{
    ExitStatus, Heartbeat, HostMsg, LogLevel, LogSource, RoleState, MAX_LOG_LINE_LEN,
};

use crate::backoff::Backoff;
use crate::instance;
use crate::link::{Link, LinkConfig, LinkEvent, Outbox, OutboxLimits, Report};
use crate::manifest::{self, Manifest, RestartPolicy};
use crate::probe::say;
use crate::{role, sys};

/// Deadline used when a signal (SIGTERM, SIGINT, SIGPWR) asks PID 1 to stop.
pub const SIGNAL_SHUTDOWN_DEADLINE_MS: u32 = 10_000;
/// Longest wait for the outbox to drain at shutdown.
pub const FINAL_FLUSH: Duration = Duration::from_millis(500);
/// Limit for one readiness attempt.
pub const READINESS_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long past its own timeout a check's thread may take to answer before
/// the loop counts the check as failed and stops waiting for it.
pub const PROBE_GRACE: Duration = Duration::from_millis(500);

/// Everything the agent needs.
#[derive(Clone)]
pub struct AgentConfig {
    /// The link to the host.
    pub link: LinkConfig,
    /// The role manifest (`/role/role.json` in the VM).
    pub manifest: PathBuf,
    /// The host agent's instance file (`/role/reddog-instance.json` in the
    /// VM): the instance's id, role name and environment. Absent: the
    /// manifest's environment only.
    pub instance: PathBuf,
    /// The passwd file to resolve the role's user in.
    pub passwd: PathBuf,
    /// Running as PID 1: reap every child (not only the role), catch SIGTERM,
    /// SIGINT and SIGPWR, and kill every leftover process at shutdown.
    pub pid1: bool,
    /// Longest sleep of the supervision loop.
    pub tick: Duration,
    /// Outbox limits.
    pub outbox: OutboxLimits,
    /// Lines from boot (e.g. a resource disk that would not mount) to send as
    /// `Log` once the host can hear them.
    pub boot_notes: Vec<(LogLevel, String)>,
}

/// What the agent looks like from outside (for tests and the console).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Role state as last reported.
    pub role_state: Option<RoleState>,
    /// Role restarts since start.
    pub role_restarts: u32,
    /// The running role's pid.
    pub role_pid: Option<u32>,
    /// Heartbeats produced.
    pub heartbeats: u64,
    /// Whether the link is up.
    pub connected: bool,
    /// Handshakes completed.
    pub connections: u32,
    /// Heartbeat interval in use.
    pub heartbeat_interval_ms: u32,
    /// Liveness checks finished (passed or failed) since start.
    pub liveness_checks: u64,
    /// Times the role was found hung by the liveness check and stopped.
    pub liveness_kills: u32,
}

/// How a shutdown went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// The deadline the host gave.
    pub deadline_ms: u32,
    /// How the role ended, if one was running.
    pub role_exit: Option<ExitStatus>,
    /// Whether SIGKILL was needed.
    pub killed: bool,
    /// From the request to the role being gone and the outbox flushed.
    pub elapsed: Duration,
}

/// What to do once a role being stopped has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Start it again at once (`RestartRole`).
    Restart,
    /// Nothing (shutdown).
    Stay,
    /// It was hung (liveness): a failed run, restarted per the restart policy.
    Hung,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    Readiness,
    Liveness,
}

/// A check running on its own thread.
#[derive(Debug)]
struct Probe {
    id: u64,
    pid: u32,
    kind: ProbeKind,
    timeout: Duration,
    /// The loop stops waiting for the thread's answer then (a failed check).
    give_up_at: Instant,
}

#[derive(Debug)]
struct Stopping {
    kill_at: Instant,
    killed: bool,
    then: Then,
}

struct Role {
    manifest: Option<Manifest>,
    state: RoleState,
    pid: Option<u32>,
    started_at: Instant,
    restarts: u32,
    failures: u32,
    backoff: Backoff,
    next_start: Option<Instant>,
    stopping: Option<Stopping>,
    ready_sent: bool,
    probe: Option<Probe>,
    next_probe: Instant,
    /// Consecutive failed liveness checks of this run.
    live_failures: u32,
    last_exit: Option<ExitStatus>,
    started_once: bool,
}

struct ShutdownPlan {
    requested: Instant,
    deadline_ms: u32,
    hard: Instant,
    role_exit: Option<ExitStatus>,
    killed: bool,
}

struct Agent {
    cfg: AgentConfig,
    outbox: Arc<Outbox>,
    status: Arc<Mutex<Status>>,
    role: Role,
    probe_tx: Sender<(u64, Result<(), String>)>,
    probe_rx: Receiver<(u64, Result<(), String>)>,
    probe_seq: u64,
    liveness_checks: u64,
    liveness_kills: u32,
    connected: bool,
    interval: Duration,
    next_beat: Option<Instant>,
    seq: u64,
    shutdown: Option<ShutdownPlan>,
    last_probe_error: Option<String>,
}

/// Runs the agent until the host (or, as PID 1, a signal) asks it to shut
/// down; returns once the role is stopped and the outbox is flushed (or the
/// deadline passed). `status` is kept up to date for observers.
pub fn run(cfg: AgentConfig, status: Arc<Mutex<Status>>) -> ShutdownReport {
    let outbox = Arc::new(Outbox::new(cfg.outbox));
    let (tx, rx) = mpsc::channel();
    if cfg.pid1 {
        if let Err(e) = sys::catch_signals(&[libc::SIGTERM, libc::SIGINT, libc::SIGPWR]) {
            say(&format!("cannot catch signals: {e}"));
        }
    }
    let link = Link::start(cfg.link.clone(), outbox.clone(), tx);
    let (probe_tx, probe_rx) = mpsc::channel();
    let seed = u64::from_le_bytes(
        cfg.link.boot_id[8..16]
            .try_into()
            .unwrap_or([1, 2, 3, 4, 5, 6, 7, 8]),
    );
    let mut a = Agent {
        role: Role {
            manifest: None,
            state: RoleState::NotStarted,
            pid: None,
            started_at: Instant::now(),
            restarts: 0,
            failures: 0,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30), seed),
            next_start: None,
            stopping: None,
            ready_sent: false,
            probe: None,
            next_probe: Instant::now(),
            live_failures: 0,
            last_exit: None,
            started_once: false,
        },
        cfg,
        outbox,
        status,
        probe_tx,
        probe_rx,
        probe_seq: 0,
        liveness_checks: 0,
        liveness_kills: 0,
        connected: false,
        interval: Duration::from_millis(u64::from(guest_proto::DEFAULT_HEARTBEAT_INTERVAL_MS)),
        next_beat: None,
        seq: 0,
        shutdown: None,
        last_probe_error: None,
    };
    for (level, note) in std::mem::take(&mut a.cfg.boot_notes) {
        a.log(level, &note);
    }
    a.load_role(seed);
    let report = a.run_loop(&rx);
    link.stop();
    report
}

impl Agent {
    /// A console line, mirrored to the host as an agent `Log`.
    fn log(&self, level: LogLevel, text: &str) {
        say(text);
        for chunk in text.as_bytes().chunks(MAX_LOG_LINE_LEN) {
            self.outbox
                .push(Report::Log(level, LogSource::Agent, chunk.to_vec()));
        }
    }

    fn load_role(&mut self, seed: u64) {
        if !self.cfg.manifest.exists() {
            self.log(
                LogLevel::Info,
                &format!(
                    "no role manifest at {}: no role; the guest itself is ready",
                    self.cfg.manifest.display()
                ),
            );
            self.outbox.push(Report::Ready);
            self.publish();
            return;
        }
        let loaded = manifest::load(&self.cfg.manifest, &self.cfg.passwd)
            .map_err(|e| format!("role manifest rejected: {e}"))
            .and_then(|mut m| match instance::load_instance(&self.cfg.instance) {
                Ok(Some(inst)) => {
                    say(&format!(
                        "instance file ok: instance {}, role {}, {} environment variables",
                        inst.instance_id,
                        inst.role.escape_debug(),
                        inst.env.len()
                    ));
                    m.apply_instance(&inst);
                    Ok(m)
                }
                Ok(None) => Ok(m),
                Err(e) => Err(format!("instance file rejected: {e}")),
            });
        match loaded {
            Ok(m) => {
                say(&format!(
                    "role manifest ok: {} as {} (uid {} gid {}), restart {:?}{}",
                    m.program.display(),
                    m.user,
                    m.uid,
                    m.gid,
                    m.restart.policy,
                    match &m.liveness {
                        Some(l) => format!(
                            ", liveness every {} ms (timeout {} ms, {} failures)",
                            l.interval.as_millis(),
                            l.timeout.as_millis(),
                            l.failures
                        ),
                        None => String::new(),
                    }
                ));
                self.role.backoff =
                    Backoff::new(m.restart.initial_backoff, m.restart.max_backoff, seed);
                self.role.manifest = Some(m);
                self.role.next_start = Some(Instant::now());
            }
            Err(text) => {
                self.role.state = RoleState::Failed;
                self.log(LogLevel::Error, &text);
            }
        }
        self.publish();
    }

    fn publish(&self) {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.role_state = Some(self.role.state);
        s.role_restarts = self.role.restarts;
        s.role_pid = self.role.pid;
        s.heartbeats = self.seq;
        s.connected = self.connected;
        s.heartbeat_interval_ms = self.interval.as_millis() as u32;
        s.liveness_checks = self.liveness_checks;
        s.liveness_kills = self.liveness_kills;
    }

    fn run_loop(&mut self, rx: &Receiver<LinkEvent>) -> ShutdownReport {
        loop {
            match rx.recv_timeout(self.cfg.tick) {
                Ok(ev) => self.on_link(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // The link thread is gone; keep supervising.
                    std::thread::sleep(self.cfg.tick);
                }
            }
            while let Ok(ev) = rx.try_recv() {
                self.on_link(ev);
            }
            if self.cfg.pid1 {
                for sig in sys::take_signals() {
                    if self.shutdown.is_none() {
                        self.log(
                            LogLevel::Warn,
                            &format!(
                                "signal {sig}: shutting down ({SIGNAL_SHUTDOWN_DEADLINE_MS} ms)"
                            ),
                        );
                        self.begin_shutdown(SIGNAL_SHUTDOWN_DEADLINE_MS);
                    }
                }
            }
            self.reap();
            while let Ok((id, result)) = self.probe_rx.try_recv() {
                self.on_probe(id, result);
            }
            let now = Instant::now();
            self.tick_role(now);
            self.tick_heartbeat(now);
            self.publish();
            if let Some(report) = self.shutdown_done() {
                return report;
            }
        }
    }

    fn on_link(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Connected { interval_ms, .. } => {
                self.connected = true;
                self.interval = Duration::from_millis(u64::from(interval_ms));
                self.next_beat = Some(Instant::now());
                let mut s = self
                    .status
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                s.connections += 1;
            }
            LinkEvent::Disconnected { .. } => {
                self.connected = false;
                self.next_beat = None;
            }
            LinkEvent::Host(msg) => self.on_host(msg),
        }
    }

    fn on_host(&mut self, msg: HostMsg) {
        match msg {
            HostMsg::Ping(p) => self.outbox.push(Report::Pong(p.nonce)),
            HostMsg::SetHeartbeatInterval(s) => {
                let ms = s.interval_ms.clamp(
                    guest_proto::MIN_HEARTBEAT_INTERVAL_MS,
                    guest_proto::MAX_HEARTBEAT_INTERVAL_MS,
                );
                say(&format!("heartbeat interval {ms} ms"));
                self.interval = Duration::from_millis(u64::from(ms));
                self.next_beat = Some(Instant::now() + self.interval);
            }
            HostMsg::Shutdown(s) => {
                if self.shutdown.is_none() {
                    self.log(
                        LogLevel::Info,
                        &format!("shutdown requested, deadline {} ms", s.deadline_ms),
                    );
                    self.begin_shutdown(s.deadline_ms);
                }
            }
            HostMsg::RestartRole => self.restart_role(),
            HostMsg::HelloAck(_) => {}
        }
    }

    fn restart_role(&mut self) {
        if self.shutdown.is_some() {
            return;
        }
        let Some(m) = &self.role.manifest else {
            self.log(
                LogLevel::Warn,
                "RestartRole: there is no valid role to restart",
            );
            return;
        };
        let stop_timeout = m.stop_timeout;
        self.role.failures = 0;
        self.role.backoff.reset();
        match self.role.pid {
            Some(pid) if self.role.stopping.is_none() => {
                self.log(LogLevel::Info, &format!("RestartRole: stopping pid {pid}"));
                self.stop_role(pid, stop_timeout, Then::Restart);
            }
            Some(_) => {
                if let Some(s) = &mut self.role.stopping {
                    s.then = Then::Restart;
                }
            }
            None => {
                self.role.next_start = Some(Instant::now());
            }
        }
    }

    /// SIGTERM to the role's process group now, SIGKILL at `stop_timeout`
    /// (in [`Self::tick_role`]), then `then` when it has exited.
    fn stop_role(&mut self, pid: u32, stop_timeout: Duration, then: Then) {
        self.signal_role(pid, libc::SIGTERM);
        self.role.stopping = Some(Stopping {
            kill_at: Instant::now() + stop_timeout,
            killed: false,
            then,
        });
    }

    fn signal_role(&self, pid: u32, sig: i32) {
        let Ok(pid) = i32::try_from(pid) else { return };
        // The role leads its own process group: signal all of it.
        if sys::kill(-pid, sig).is_err() {
            let _ = sys::kill(pid, sig);
        }
    }

    fn begin_shutdown(&mut self, deadline_ms: u32) {
        let now = Instant::now();
        let deadline = Duration::from_millis(u64::from(deadline_ms));
        // Keep a quarter of the deadline (at most a second) to sync and unmount.
        let margin = (deadline / 4).min(Duration::from_secs(1));
        let kill_at = now + deadline - margin;
        self.shutdown = Some(ShutdownPlan {
            requested: now,
            deadline_ms,
            hard: now + deadline,
            role_exit: None,
            killed: false,
        });
        self.role.next_start = None;
        if let Some(pid) = self.role.pid {
            let sig = if deadline.is_zero() {
                libc::SIGKILL
            } else {
                libc::SIGTERM
            };
            self.signal_role(pid, sig);
            self.role.stopping = Some(Stopping {
                kill_at,
                killed: sig == libc::SIGKILL,
                then: Then::Stay,
            });
            if let Some(p) = &mut self.shutdown {
                p.killed = sig == libc::SIGKILL;
            }
        } else {
            self.role.stopping = None;
        }
    }

    fn shutdown_done(&mut self) -> Option<ShutdownReport> {
        let plan = self.shutdown.as_ref()?;
        if self.role.pid.is_some() {
            return None;
        }
        let flush_until = (Instant::now() + FINAL_FLUSH).min(plan.hard.max(Instant::now()));
        while !self.outbox.is_empty() && self.connected && Instant::now() < flush_until {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.cfg.pid1 {
            // Whatever the role left behind (daemons outside its group).
            let _ = sys::kill(-1, libc::SIGKILL);
            while sys::try_wait(-1).is_some() {}
        }
        let plan = self.shutdown.as_ref()?;
        Some(ShutdownReport {
            deadline_ms: plan.deadline_ms,
            role_exit: plan.role_exit,
            killed: plan.killed,
            elapsed: plan.requested.elapsed(),
        })
    }

    fn reap(&mut self) {
        loop {
            let target = if self.cfg.pid1 {
                -1
            } else {
                match self.role.pid.and_then(|p| i32::try_from(p).ok()) {
                    Some(p) => p,
                    None => return,
                }
            };
            let Some((pid, raw)) = sys::try_wait(target) else {
                return;
            };
            if Some(pid as u32) == self.role.pid {
                self.on_exit(pid as u32, role::exit_status(raw));
            }
        }
    }

    fn on_exit(&mut self, pid: u32, status: ExitStatus) {
        let now = Instant::now();
        let ran = now.duration_since(self.role.started_at);
        self.role.pid = None;
        self.role.last_exit = Some(status);
        self.outbox.push(Report::RoleExited(pid, status));
        say(&format!(
            "role pid {pid} exited: {} after {} ms",
            describe(status),
            ran.as_millis()
        ));
        let stopping = self.role.stopping.take();
        if let Some(plan) = &mut self.shutdown {
            plan.role_exit = Some(status);
            self.role.state = RoleState::Exited;
            return;
        }
        let Some(m) = &self.role.manifest else { return };
        let policy = m.restart.policy;
        match stopping.map(|s| s.then) {
            Some(Then::Restart) => {
                self.role.state = RoleState::Exited;
                self.role.next_start = Some(now);
                return;
            }
            Some(Then::Hung) => {
                // Whatever its exit status, a hung run is a failed run.
                self.role.state = RoleState::Exited;
                if policy == RestartPolicy::Never {
                    say("hung role not restarted (restart policy never)");
                    return;
                }
                self.schedule_restart(ran, now);
                return;
            }
            Some(Then::Stay) | None => {}
        }
        let restart = match policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => role::is_failure(status),
            RestartPolicy::Never => false,
        };
        self.role.state = RoleState::Exited;
        if !restart {
            say("role not restarted (restart policy)");
            return;
        }
        self.schedule_restart(ran, now);
    }

    fn schedule_restart(&mut self, ran: Duration, now: Instant) {
        let Some(m) = &self.role.manifest else { return };
        if ran >= m.restart.reset_after {
            self.role.failures = 0;
            self.role.backoff.reset();
        }
        self.role.failures += 1;
        if let Some(max) = m.restart.max_restarts {
            if self.role.failures > max {
                self.role.state = RoleState::Failed;
                let text = format!(
                    "role failed {} times in a row; giving up (max_restarts {max})",
                    self.role.failures
                );
                self.log(LogLevel::Error, &text);
                return;
            }
        }
        let delay = self.role.backoff.next_delay();
        say(&format!("role restart in {} ms", delay.as_millis()));
        self.role.next_start = Some(now + delay);
    }

    fn tick_role(&mut self, now: Instant) {
        if let Some(s) = &mut self.role.stopping {
            if !s.killed && now >= s.kill_at {
                s.killed = true;
                if let Some(p) = &mut self.shutdown {
                    p.killed = true;
                }
                if let Some(pid) = self.role.pid {
                    say(&format!(
                        "role pid {pid} still running at the deadline: SIGKILL"
                    ));
                    self.signal_role(pid, libc::SIGKILL);
                }
            }
        }
        if self.shutdown.is_some() {
            return;
        }
        if let Some(at) = self.role.next_start {
            if now >= at && self.role.pid.is_none() {
                self.role.next_start = None;
                self.start_role(now);
            }
        }
        self.maybe_probe(now);
    }

    fn start_role(&mut self, now: Instant) {
        let Some(m) = self.role.manifest.clone() else {
            return;
        };
        // Every start after the first is a restart, whatever caused it.
        if self.role.last_exit.is_some() || self.role.started_once {
            self.role.restarts = self.role.restarts.saturating_add(1);
        }
        self.role.started_once = true;
        self.role.state = RoleState::Starting;
        self.role.ready_sent = false;
        self.role.live_failures = 0;
        // A check of the previous run still in flight is ignored when it answers.
        self.role.probe = None;
        match role::spawn(&m, &self.outbox) {
            Ok(pid) => {
                self.role.pid = Some(pid);
                self.role.started_at = now;
                self.outbox.push(Report::RoleStarted(pid));
                say(&format!("role started: pid {pid}"));
                if m.readiness.is_none() {
                    self.mark_ready(pid, now);
                } else {
                    self.role.state = RoleState::Running;
                    self.role.next_probe = now;
                }
            }
            Err(e) => {
                self.role.state = RoleState::Exited;
                self.log(
                    LogLevel::Error,
                    &format!("role could not start ({}): {e}", m.program.display()),
                );
                if m.restart.policy == RestartPolicy::Never {
                    self.role.state = RoleState::Failed;
                } else {
                    self.schedule_restart(Duration::ZERO, now);
                }
            }
        }
    }

    /// Starts the next readiness check (until the role is ready) or liveness
    /// check (after, if the manifest has one) when it is due, on its own
    /// thread; at most one at a time. A check whose thread has not answered
    /// by its timeout plus [`PROBE_GRACE`] counts as failed.
    fn maybe_probe(&mut self, now: Instant) {
        if let Some(p) = &self.role.probe {
            if now < p.give_up_at {
                return;
            }
            let id = p.id;
            let ms = p.timeout.as_millis();
            self.on_probe(
                id,
                Err(format!(
                    "no answer within {ms} ms (the check did not return)"
                )),
            );
        }
        let (Some(pid), Some(m)) = (self.role.pid, &self.role.manifest) else {
            return;
        };
        let Some(check) = m.readiness.clone() else {
            return;
        };
        if self.role.stopping.is_some() || self.role.probe.is_some() || now < self.role.next_probe {
            return;
        }
        let (kind, timeout, interval) = match (self.role.ready_sent, m.liveness) {
            (false, _) => (
                ProbeKind::Readiness,
                READINESS_ATTEMPT_TIMEOUT,
                m.readiness_interval,
            ),
            (true, Some(l)) => (ProbeKind::Liveness, l.timeout, l.interval),
            (true, None) => return,
        };
        self.probe_seq += 1;
        let id = self.probe_seq;
        self.role.next_probe = now + interval;
        let tx = self.probe_tx.clone();
        let name = match kind {
            ProbeKind::Readiness => "readiness",
            ProbeKind::Liveness => "liveness",
        };
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _ = tx.send((id, role::check_ready(&check, timeout)));
            });
        match spawned {
            Ok(_) => {
                self.role.probe = Some(Probe {
                    id,
                    pid,
                    kind,
                    timeout,
                    give_up_at: now + timeout + PROBE_GRACE,
                });
            }
            Err(e) => say(&format!("cannot start the {name} check: {e}")),
        }
    }

    fn on_probe(&mut self, id: u64, result: Result<(), String>) {
        if self.role.probe.as_ref().map(|p| p.id) != Some(id) {
            return; // a check of an earlier run, or one already given up on
        }
        let Some(probe) = self.role.probe.take() else {
            return;
        };
        if self.role.pid != Some(probe.pid) || self.role.stopping.is_some() {
            return;
        }
        match probe.kind {
            ProbeKind::Readiness => {
                if self.role.ready_sent {
                    return;
                }
                match result {
                    Ok(()) => self.mark_ready(probe.pid, Instant::now()),
                    Err(e) => {
                        if self.last_probe_error.as_deref() != Some(e.as_str()) {
                            say(&format!("role not ready yet: {e}"));
                            self.last_probe_error = Some(e);
                        }
                    }
                }
            }
            ProbeKind::Liveness => self.on_liveness(probe.pid, result),
        }
    }

    fn on_liveness(&mut self, pid: u32, result: Result<(), String>) {
        let Some(m) = &self.role.manifest else { return };
        let Some(l) = m.liveness else { return };
        let stop_timeout = m.stop_timeout;
        self.liveness_checks += 1;
        let e = match result {
            Ok(()) => {
                if self.role.live_failures > 0 {
                    say(&format!(
                        "role pid {pid} answers its liveness check again after {} failure(s)",
                        self.role.live_failures
                    ));
                }
                self.role.live_failures = 0;
                return;
            }
            Err(e) => e,
        };
        self.role.live_failures += 1;
        if self.role.live_failures < l.failures {
            if self.role.live_failures == 1 {
                say(&format!(
                    "role pid {pid} liveness check failed (1 of {}): {e}",
                    l.failures
                ));
            }
            return;
        }
        self.liveness_kills = self.liveness_kills.saturating_add(1);
        // Alive but not serving: not ready any more, until it exits.
        self.role.state = RoleState::Running;
        self.log(
            LogLevel::Error,
            &format!(
                "role pid {pid} is hung: {} liveness checks in a row failed (last: {e}); \
                 stopping it (SIGTERM, SIGKILL after {} ms), then restart policy {:?}",
                self.role.live_failures,
                stop_timeout.as_millis(),
                m.restart.policy
            ),
        );
        self.role.live_failures = 0;
        self.stop_role(pid, stop_timeout, Then::Hung);
    }

    fn mark_ready(&mut self, pid: u32, now: Instant) {
        self.role.ready_sent = true;
        self.role.state = RoleState::Ready;
        self.role.live_failures = 0;
        if let Some(l) = self.role.manifest.as_ref().and_then(|m| m.liveness) {
            self.role.next_probe = now + l.interval;
        }
        self.last_probe_error = None;
        self.outbox.push(Report::Ready);
        say(&format!("role ready: pid {pid}"));
    }

    fn tick_heartbeat(&mut self, now: Instant) {
        if !self.connected {
            return;
        }
        let Some(due) = self.next_beat else { return };
        if now < due {
            return;
        }
        let (load, free) = vitals();
        self.outbox.push(Report::Heartbeat(Heartbeat {
            seq: self.seq,
            uptime_ms: uptime_ms(),
            load_avg_x100: load,
            free_mem_kib: free,
            role_state: self.role.state,
            role_restarts: self.role.restarts,
        }));
        self.seq += 1;
        // Keep the cadence; after a long stall, start again from now.
        let next = due + self.interval;
        self.next_beat = Some(if next <= now {
            now + self.interval
        } else {
            next
        });
    }
}

fn describe(s: ExitStatus) -> String {
    match s {
        ExitStatus::Code(c) => format!("code {c}"),
        ExitStatus::Signal(sig) => format!("signal {sig}"),
    }
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            let secs = s.split_whitespace().next()?;
            let (int, frac) = secs.split_once('.').unwrap_or((secs, "0"));
            let frac: String = frac.chars().chain("000".chars()).take(3).collect();
            Some(int.parse::<u64>().ok()? * 1000 + frac.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Load averages x100 and available memory in KiB from /proc.
fn vitals() -> ([u32; 3], u64) {
    let mut load = [0u32; 3];
    if let Ok(s) = std::fs::read_to_string("/proc/loadavg") {
        for (slot, v) in load.iter_mut().zip(s.split_whitespace()) {
            *slot = v
                .parse::<f64>()
                .map(|f| (f * 100.0).round().clamp(0.0, f64::from(u32::MAX)) as u32)
                .unwrap_or(0);
        }
    }
    let free = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let line = s
                .lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .or_else(|| s.lines().find(|l| l.starts_with("MemFree:")))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0);
    (load, free)
}
