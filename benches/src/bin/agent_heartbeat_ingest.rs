//! Heartbeat ingest cost of the host agent: N simulated guests (default 200)
//! connected to the agent's real guest channel (`VsockGuestChannel`, unix
//! sockets `<uds>_<port>`, as `reddog-vmm` would forward them; no VMs), each
//! sending `Hello` and then heartbeats every interval for a fixed time.
//!
//! The simulated guests run in a child process (this binary re-executed with
//! `--sim-guests`, one tokio thread), so `getrusage(RUSAGE_SELF)` of this
//! process counts only the agent side: the agent's tasks and the bench's own
//! sleeping main task. Two agent sides, one after the other:
//!
//! - `channel`: `VsockGuestChannel` alone, one link per guest, a task per
//!   link draining its events and counting heartbeats (the guest channel's
//!   own cost);
//! - `agent`: the whole `Agent` (fake VMM launcher and disks, real guest
//!   channel): N instances in one goal; their tasks take every heartbeat
//!   (status update, health deadline, ready transition).
//!
//! The CPU window starts 1 s after every guest said hello and ends 2 s before
//! the guests stop. Afterwards every guest's last sent sequence number must
//! have reached the agent (no heartbeat lost or still queued) and no
//! connection may have been closed: both are checked and reported.
//!
//! Usage: `agent-heartbeat-ingest [--guests 200] [--interval-ms 100] [--secs 15] [--mode both|channel|agent]`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::backend::fake::{FakeDisks, FakeLauncher};
use agent::backend::guest::{GuestEndpoint, GuestEvent};
use agent::backend::vsock_guest::{GuestLimits, VsockGuestChannel};
use agent::{
    Agent, AgentConfig, AgentEvent, Backends, Capacity, GoalState, GuestChannel, InstanceSpec,
    InstanceState, NodeConfig,
};
use anyhow::{bail, Context, Result};
use benches::agent_kit::{cores, cpu_time_self};
use guest_proto::{Capabilities, Decoded, GuestMsg, HostMsg, RoleState, StreamDecoder};
use testkit::agent_harness::direct::encode_guest;
use testkit::agent_harness::kvm::log_to_file;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone)]
struct Opts {
    guests: usize,
    interval_ms: u64,
    secs: u64,
}

// ---------------------------------------------------------------- guests

/// The child: connects to every socket in `paths`, says hello, waits for
/// `HelloAck`, prints `connected`, heartbeats for `secs`, prints
/// `done <last seq per guest>`, then keeps the connections open until stdin
/// closes.
async fn sim_guests(paths_file: &Path, interval: Duration, secs: u64) -> Result<()> {
    let paths: Vec<PathBuf> = std::fs::read_to_string(paths_file)?
        .lines()
        .map(PathBuf::from)
        .collect();
    let n = paths.len();
    let mut conns = Vec::with_capacity(n);
    for (i, p) in paths.iter().enumerate() {
        let t = Instant::now();
        let s = loop {
            match tokio::net::UnixStream::connect(p).await {
                Ok(s) => break s,
                Err(e) if t.elapsed() > Duration::from_secs(20) => {
                    bail!("connecting to {}: {e}", p.display())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (mut rd, mut wr) = s.into_split();
        let mut boot_id = [0u8; 16];
        boot_id[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let hello = encode_guest(&GuestMsg::Hello(guest_proto::Hello {
            min_version: 1,
            max_version: 1,
            boot_id,
            capabilities: Capabilities::NONE,
            agent_version: "sim-guest/1",
        }))?;
        wr.write_all(&hello).await?;
        let mut dec = StreamDecoder::new();
        loop {
            match dec.next_frame::<HostMsg>() {
                Decoded::Frame { frame, .. } => match frame.message() {
                    Some(HostMsg::HelloAck(a)) if a.version == 1 => break,
                    other => bail!("guest {i}: expected HelloAck, got {other:?}"),
                },
                Decoded::Error { error, .. } => bail!("guest {i}: bad frame: {error}"),
                Decoded::NeedMore { .. } => {}
            }
            let k = tokio::time::timeout(Duration::from_secs(10), rd.read(dec.spare_mut()))
                .await
                .context("no HelloAck within 10 s")??;
            if k == 0 {
                bail!("guest {i}: closed before HelloAck");
            }
            dec.commit(k);
        }
        conns.push((rd, wr));
    }
    println!("connected");
    std::io::stdout().flush()?;

    let closed = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    for (i, (mut rd, mut wr)) in conns.into_iter().enumerate() {
        // Spread the guests evenly over one interval.
        let phase = interval.mul_f64(i as f64 / n as f64);
        let closed2 = closed.clone();
        readers.push(tokio::spawn(async move {
            // The host sends nothing more unless asked; a read of 0 is a close.
            let mut buf = [0u8; 256];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        closed2.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Ok(_) => {}
                }
            }
        }));
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(start + phase, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seq = 0u64;
            let mut last = None;
            loop {
                let at = tick.tick().await;
                if at >= end {
                    break;
                }
                let hb = encode_guest(&GuestMsg::Heartbeat(guest_proto::Heartbeat {
                    seq,
                    uptime_ms: at.duration_since(start).as_millis() as u64,
                    load_avg_x100: [0; 3],
                    free_mem_kib: 48 * 1024,
                    role_state: RoleState::Ready,
                    role_restarts: 0,
                }))?;
                wr.write_all(&hb).await?;
                last = Some(seq);
                seq += 1;
            }
            Ok::<_, anyhow::Error>((last, wr))
        }));
    }
    let mut lasts = Vec::with_capacity(n);
    let mut writers = Vec::with_capacity(n);
    for t in tasks {
        let (last, wr) = t.await??;
        lasts.push(last.map_or(-1, |s| s as i64));
        writers.push(wr);
    }
    let closed = closed.load(Ordering::Relaxed);
    println!(
        "done closed={closed} {}",
        lasts
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    std::io::stdout().flush()?;
    // Hold the connections until the parent has checked (stdin closes).
    tokio::task::spawn_blocking(|| {
        let mut s = String::new();
        while std::io::stdin().read_line(&mut s).is_ok_and(|n| n > 0) {}
    })
    .await?;
    drop(writers);
    for r in readers {
        r.abort();
    }
    Ok(())
}

struct Guests {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
}

impl Guests {
    fn spawn(paths: &[PathBuf], dir: &Path, o: &Opts) -> Result<Self> {
        let file = dir.join("guest-paths");
        let mut text = String::new();
        for p in paths {
            text.push_str(p.to_str().context("non-UTF-8 path")?);
            text.push('\n');
        }
        std::fs::write(&file, text)?;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--sim-guests")
            .arg(&file)
            .arg("--interval-ms")
            .arg(o.interval_ms.to_string())
            .arg("--secs")
            .arg(o.secs.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning the simulated guests")?;
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().context("no stdout")?);
        Ok(Self { child, stdin, out })
    }

    /// The next line the guests print (blocking; call from a blocking thread).
    fn line(&mut self) -> Result<String> {
        let mut l = String::new();
        if self.out.read_line(&mut l)? == 0 {
            let st = self.child.wait()?;
            bail!("the simulated guests exited ({st}); see the error above");
        }
        Ok(l.trim().to_string())
    }

    fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let st = self.child.wait()?;
        if !st.success() {
            bail!("the simulated guests exited with {st}");
        }
        Ok(())
    }
}

impl Drop for Guests {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The guests' `done` line: connections the host closed, last seq per guest.
fn parse_done(line: &str, n: usize) -> Result<(u64, Vec<Option<u64>>)> {
    let mut it = line.split_whitespace();
    if it.next() != Some("done") {
        bail!("expected `done ...` from the guests, got {line:?}");
    }
    let closed: u64 = it
        .next()
        .and_then(|c| c.strip_prefix("closed="))
        .context("closed=")?
        .parse()?;
    let lasts: Vec<Option<u64>> = it
        .map(|s| s.parse::<i64>().map(|v| u64::try_from(v).ok()))
        .collect::<Result<_, _>>()?;
    if lasts.len() != n {
        bail!("{} sequence numbers for {n} guests", lasts.len());
    }
    Ok((closed, lasts))
}

// ---------------------------------------------------------------- agent side

/// What the agent side reports: heartbeats taken so far, and the last
/// sequence number per guest.
trait Side {
    fn total(&self) -> u64;
    fn last_seqs(&self) -> Vec<Option<u64>>;
    fn problems(&self) -> Vec<String>;
}

struct ChannelSide {
    count: Arc<AtomicU64>,
    last: Arc<Vec<AtomicU64>>,
    disconnects: Arc<AtomicU64>,
    _links: Vec<tokio::task::JoinHandle<()>>,
}

impl Side for ChannelSide {
    fn total(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
    fn last_seqs(&self) -> Vec<Option<u64>> {
        self.last
            .iter()
            .map(|a| a.load(Ordering::Relaxed).checked_sub(1))
            .collect()
    }
    fn problems(&self) -> Vec<String> {
        match self.disconnects.load(Ordering::Relaxed) {
            0 => vec![],
            d => vec![format!("{d} guest connections ended")],
        }
    }
}

async fn channel_side(dir: &Path, o: &Opts) -> Result<(ChannelSide, Vec<PathBuf>)> {
    let ch = VsockGuestChannel::new(GuestLimits::default());
    let count = Arc::new(AtomicU64::new(0));
    let disconnects = Arc::new(AtomicU64::new(0));
    let last: Arc<Vec<AtomicU64>> = Arc::new((0..o.guests).map(|_| AtomicU64::new(0)).collect());
    let mut paths = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..o.guests {
        let ep = GuestEndpoint {
            uds_path: dir.join(format!("g{i}.vsock")),
            port: agent::node::DEFAULT_GUEST_PORT,
            heartbeat_interval_ms: o.interval_ms.clamp(100, 60_000) as u32,
        };
        paths.push(ep.listen_path());
        let link = ch.open(&format!("g{i}"), &ep).await?;
        let (count, last, disconnects) = (count.clone(), last.clone(), disconnects.clone());
        tasks.push(tokio::spawn(async move {
            // Hold the whole link (its guard keeps the listener and its
            // command sender keeps the connection task); drain its events.
            let mut link = link;
            while let Some(ev) = link.events.recv().await {
                match ev {
                    GuestEvent::Heartbeat { seq, .. } => {
                        count.fetch_add(1, Ordering::Relaxed);
                        last[i].store(seq + 1, Ordering::Relaxed);
                    }
                    GuestEvent::Disconnected { .. } => {
                        disconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        }));
    }
    Ok((
        ChannelSide {
            count,
            last,
            disconnects,
            _links: tasks,
        },
        paths,
    ))
}

struct AgentSide {
    agent: Agent,
    ids: Vec<String>,
    misbehaved: Arc<AtomicU64>,
    bad_transitions: Arc<std::sync::Mutex<Vec<String>>>,
    _watch: tokio::task::JoinHandle<()>,
}

impl Side for AgentSide {
    fn total(&self) -> u64 {
        // Sequence numbers start at 0 and increase by one: seq + 1 taken.
        self.last_seqs().iter().flatten().map(|s| s + 1).sum()
    }
    fn last_seqs(&self) -> Vec<Option<u64>> {
        let by_id: std::collections::HashMap<String, Option<u64>> = self
            .agent
            .instances()
            .into_iter()
            .map(|s| (s.id, s.heartbeat_seq))
            .collect();
        self.ids
            .iter()
            .map(|id| by_id.get(id).copied().flatten())
            .collect()
    }
    fn problems(&self) -> Vec<String> {
        let mut p = self
            .bad_transitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let m = self.misbehaved.load(Ordering::Relaxed);
        if m > 0 {
            p.push(format!("{m} guests closed as misbehaving"));
        }
        p
    }
}

impl Drop for AgentSide {
    fn drop(&mut self) {
        self.agent.shutdown();
    }
}

async fn agent_side(dir: &Path, o: &Opts) -> Result<(AgentSide, Vec<PathBuf>)> {
    let mut node = NodeConfig::new(
        "node-ingest",
        Capacity {
            vcpus: o.guests as u32,
            memory_mib: o.guests as u64 * 32,
            disk_mib: o.guests as u64,
        },
    );
    node.max_instances = o.guests;
    let mut cfg = AgentConfig::new(dir.join("state"), node);
    cfg.event_capacity = 16_384;
    cfg.role_roots = vec![dir.to_owned()];
    let launcher = FakeLauncher::new();
    let agent = Agent::open(
        cfg,
        Backends {
            launcher: Arc::new(launcher),
            disks: Arc::new(FakeDisks::new()),
            guests: Arc::new(VsockGuestChannel::new(GuestLimits::default())),
            net: Arc::new(agent::backend::fake::FakeNet::new()),
        },
    )
    .await?;
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20])?;
    let image = agent
        .image_cache()
        .import_file(&base, vmm_api::DiskFormat::Raw, None)?
        .reference();
    let role = dir.join("role");
    std::fs::create_dir_all(&role)?;
    let ids: Vec<String> = (0..o.guests).map(|i| format!("g{i}")).collect();
    let misbehaved = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut events = agent.subscribe();
    let (m2, b2) = (misbehaved.clone(), bad.clone());
    let watch = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(AgentEvent::GuestMisbehaved { .. }) => {
                    m2.fetch_add(1, Ordering::Relaxed);
                }
                Ok(AgentEvent::Transition {
                    instance,
                    transition,
                }) if matches!(
                    transition.to,
                    InstanceState::Unhealthy | InstanceState::Restarting | InstanceState::Failed
                ) =>
                {
                    b2.lock().unwrap_or_else(|e| e.into_inner()).push(format!(
                        "{instance}: {} ({})",
                        transition.to, transition.reason
                    ));
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    b2.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("event watcher lagged by {n}"));
                }
                Err(_) => return,
            }
        }
    });
    let goal = GoalState {
        incarnation: 1,
        instances: ids
            .iter()
            .map(|id| InstanceSpec {
                id: id.clone(),
                role: "web".into(),
                base_image: image.clone(),
                role_package: role.clone(),
                vcpus: 1,
                memory_mib: 32,
                resource_disk_mib: 1,
                env: Default::default(),
                heartbeat_interval_ms: o.interval_ms.clamp(100, 60_000) as u32,
                disk_rate_limit: None,
            })
            .collect(),
    };
    agent.apply_goal(goal).await.context("applying the goal")?;
    let paths = ids
        .iter()
        .map(|id| {
            GuestEndpoint {
                uds_path: dir.join("state").join("run").join(format!("{id}.vsock")),
                port: agent::node::DEFAULT_GUEST_PORT,
                heartbeat_interval_ms: 0,
            }
            .listen_path()
        })
        .collect::<Vec<_>>();
    // Wait until every instance listens for its guest (`starting`, socket bound).
    let t = Instant::now();
    loop {
        let starting = agent
            .instances()
            .iter()
            .filter(|s| s.state == InstanceState::Starting)
            .count();
        let listening = paths.iter().filter(|p| p.exists()).count();
        if starting == o.guests && listening == o.guests {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "after 30 s only {starting} of {} instances starting, {listening} listening",
                o.guests
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((
        AgentSide {
            agent,
            ids,
            misbehaved,
            bad_transitions: bad,
            _watch: watch,
        },
        paths,
    ))
}

struct Result1 {
    hb_per_sec: f64,
    cpu_per_hb_us: f64,
    cpu_pct: f64,
    sent: u64,
    lost: u64,
    problems: Vec<String>,
}

async fn measure(side: &dyn Side, paths: &[PathBuf], dir: &Path, o: &Opts) -> Result<Result1> {
    let mut g = Guests::spawn(paths, dir, o)?;
    let (l, mut g) = tokio::task::spawn_blocking(move || (g.line(), g)).await?;
    let l = l?;
    if l != "connected" {
        bail!("expected `connected` from the guests, got {l:?}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (c0, n0, t0) = (cpu_time_self(), side.total(), Instant::now());
    tokio::time::sleep(Duration::from_secs(o.secs - 3)).await;
    let (c1, n1, t1) = (cpu_time_self(), side.total(), Instant::now());
    let (l, g) = tokio::task::spawn_blocking(move || (g.line(), g)).await?;
    let (closed, sent_last) = parse_done(&l?, o.guests)?;
    // Let the agent catch up with what was sent (bounded), then compare.
    let t = Instant::now();
    let mut got = side.last_seqs();
    while got != sent_last && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = side.last_seqs();
    }
    let sent: u64 = sent_last.iter().flatten().map(|s| s + 1).sum();
    let lost: u64 = sent_last
        .iter()
        .zip(&got)
        .map(|(s, g)| {
            let s = s.map_or(0, |v| v + 1);
            let g = g.map_or(0, |v| v + 1);
            s.saturating_sub(g)
        })
        .sum();
    let mut problems = side.problems();
    if closed > 0 {
        problems.push(format!("the host closed {closed} guest connections"));
    }
    g.finish()?;
    let dt = (t1 - t0).as_secs_f64();
    let hbs = (n1 - n0) as f64;
    if hbs == 0.0 {
        bail!("no heartbeats taken in the window");
    }
    let cpu = (c1 - c0).as_secs_f64();
    Ok(Result1 {
        hb_per_sec: hbs / dt,
        cpu_per_hb_us: cpu / hbs * 1e6,
        cpu_pct: cpu / dt * 100.0,
        sent,
        lost,
        problems,
    })
}

fn print(name: &str, r: &Result1, o: &Opts) {
    let expected = o.guests as f64 * 1000.0 / o.interval_ms as f64;
    println!(
        "{name:<8} {:>9.0} hb/s (offered {expected:.0})  CPU {:>6.2} us/heartbeat  {:>5.2}% of one core  \
         sent {}  not taken {}  {}",
        r.hb_per_sec,
        r.cpu_per_hb_us,
        r.cpu_pct,
        r.sent,
        r.lost,
        if r.problems.is_empty() {
            "none lost, no connection closed".to_string()
        } else {
            format!("PROBLEMS: {}", r.problems.join("; "))
        }
    );
}

fn main() -> Result<()> {
    let mut o = Opts {
        guests: 200,
        interval_ms: 100,
        secs: 15,
    };
    let mut mode = "both".to_string();
    let mut sim: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |what: &str| args.next().with_context(|| format!("{a} needs {what}"));
        match a.as_str() {
            "--guests" => o.guests = val("a number")?.parse().context("--guests")?,
            "--interval-ms" => o.interval_ms = val("a number")?.parse().context("--interval-ms")?,
            "--secs" => o.secs = val("a number")?.parse().context("--secs")?,
            "--mode" => mode = val("both|channel|agent")?,
            "--sim-guests" => sim = Some(val("a file")?.into()),
            other => bail!(
                "unknown argument {other:?}; usage: agent-heartbeat-ingest [--guests 200] [--interval-ms 100] [--secs 15] [--mode both|channel|agent]"
            ),
        }
    }
    if !(1..=1000).contains(&o.guests)
        || !(5..=60_000).contains(&o.interval_ms)
        || !(5..=600).contains(&o.secs)
    {
        bail!("--guests 1..=1000, --interval-ms 5..=60000, --secs 5..=600");
    }
    if let Some(file) = sim {
        // The simulated guests: one thread, in their own process.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return rt.block_on(sim_guests(
            &file,
            Duration::from_millis(o.interval_ms),
            o.secs,
        ));
    }
    let modes: &[&str] = match mode.as_str() {
        "both" => &["channel", "agent"],
        "channel" => &["channel"],
        "agent" => &["agent"],
        m => bail!("--mode {m:?}: both, channel or agent"),
    };
    // The agent side: tokio on 2 worker threads, as the daemon on this machine.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let dir = tempfile::Builder::new()
            .prefix("rdg-hb")
            .tempdir_in("/tmp")?;
        log_to_file(&dir.path().join("agent.log"))?;
        println!(
            "heartbeat ingest: {} simulated guests (separate process) x 1 heartbeat / {} ms for {} s; \
             agent side measured over {} s by getrusage(RUSAGE_SELF); {} cores; guest limits: 200 frames/s, burst 1000",
            o.guests,
            o.interval_ms,
            o.secs,
            o.secs - 3,
            cores()
        );
        let mut failed = false;
        for m in modes {
            let sub = dir.path().join(m);
            std::fs::create_dir_all(&sub)?;
            let r = if *m == "channel" {
                let (side, paths) = channel_side(&sub, &o).await?;
                measure(&side, &paths, &sub, &o).await?
            } else {
                let (side, paths) = agent_side(&sub, &o).await?;
                measure(&side, &paths, &sub, &o).await?
            };
            print(m, &r, &o);
            failed |= r.lost > 0 || !r.problems.is_empty();
        }
        if failed {
            bail!("heartbeats were lost or connections closed (see above)");
        }
        Ok(())
    })
}
