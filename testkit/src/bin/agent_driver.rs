//! `agent-driver`: drives a real `reddog-agent` through one deployment and
//! reports what happened (`testkit::agent_scenario`; the nested agent test
//! and `scripts/demo` run it, inside the emulated machine or directly).
//!
//! 1. starts `reddog-agent` (JSON log to `<logs>/agent.log`) and waits for its API;
//! 2. `reddog cache import -f raw <base>`;
//! 3. `reddog goal put` with N web-role instances;
//! 4. polls `GET /v1/instances/<id>` and prints every transition (with the
//!    agent's reason) and every heartbeat as it arrives, until every instance
//!    is `ready` and has sent `--heartbeats` more heartbeats;
//! 5. prints `reddog instances`, applies an empty goal, waits until every
//!    instance is gone, reads the agent's log for `stopped` and the VMM's exit;
//! 6. stops the agent (SIGTERM) and writes the summary JSON.
//!
//! Each VMM's log and serial console are copied to `<logs>/<id>.vmm.log` and
//! `<logs>/<id>.serial` as they grow (the agent deletes the instance
//! directory once the instance is removed; an open file keeps its contents).
//! Progress goes to stdout (each line prefixed with `--prefix`) and to
//! `<logs>/driver.log`. Exit status 0 when everything went as expected.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use testkit::agent_harness::blocking::BlockingApi;
use testkit::agent_scenario::{DriverSummary, InstanceRun, StateAt};

const USAGE: &str =
    "usage: agent-driver --agent BIN --cli BIN --vmm BIN --kernel FILE --initrd FILE \
--base IMG --role DIR --state DIR --logs DIR --summary FILE [--prefix TEXT] [--instances N] \
[--vcpus N] [--memory-mib N] [--resource-disk-mib N] [--heartbeat-ms N] [--heartbeats N] \
[--missed-heartbeats N] [--boot-timeout-secs N] [--timeout-secs N] [--jailer BIN (else the agent runs with --no-jail)]";

const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Default)]
struct Opts {
    /// `reddog-jailer` for the agent; without it the agent runs its VMMs
    /// unjailed (`--no-jail`).
    jailer: Option<PathBuf>,
    agent: PathBuf,
    cli: PathBuf,
    vmm: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    base: PathBuf,
    role: PathBuf,
    state: PathBuf,
    logs: PathBuf,
    summary: PathBuf,
    prefix: String,
    instances: u32,
    vcpus: u32,
    memory_mib: u64,
    resource_disk_mib: u64,
    heartbeat_ms: u64,
    heartbeats: u64,
    missed_heartbeats: u32,
    boot_timeout_secs: u64,
    timeout_secs: u64,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        instances: 1,
        vcpus: 1,
        memory_mib: 256,
        resource_disk_mib: 64,
        heartbeat_ms: 1000,
        heartbeats: 3,
        missed_heartbeats: 3,
        boot_timeout_secs: 60,
        timeout_secs: 240,
        ..Opts::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(k) = args.next() {
        let v = args.next().ok_or_else(|| format!("{k} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{k} {v}: {e}"));
        match k.as_str() {
            "--agent" => o.agent = v.into(),
            "--cli" => o.cli = v.into(),
            "--vmm" => o.vmm = v.into(),
            "--jailer" => o.jailer = Some(v.into()),
            "--kernel" => o.kernel = v.into(),
            "--initrd" => o.initrd = v.into(),
            "--base" => o.base = v.into(),
            "--role" => o.role = v.into(),
            "--state" => o.state = v.into(),
            "--logs" => o.logs = v.into(),
            "--summary" => o.summary = v.into(),
            "--prefix" => o.prefix = v,
            "--instances" => o.instances = num(&v)? as u32,
            "--vcpus" => o.vcpus = num(&v)? as u32,
            "--memory-mib" => o.memory_mib = num(&v)?,
            "--resource-disk-mib" => o.resource_disk_mib = num(&v)?,
            "--heartbeat-ms" => o.heartbeat_ms = num(&v)?,
            "--heartbeats" => o.heartbeats = num(&v)?,
            "--missed-heartbeats" => o.missed_heartbeats = num(&v)? as u32,
            "--boot-timeout-secs" => o.boot_timeout_secs = num(&v)?,
            "--timeout-secs" => o.timeout_secs = num(&v)?,
            _ => return Err(format!("unknown option {k}")),
        }
    }
    for (name, p) in [
        ("--agent", &o.agent),
        ("--cli", &o.cli),
        ("--vmm", &o.vmm),
        ("--kernel", &o.kernel),
        ("--initrd", &o.initrd),
        ("--base", &o.base),
        ("--role", &o.role),
        ("--state", &o.state),
        ("--logs", &o.logs),
        ("--summary", &o.summary),
    ] {
        if p.as_os_str().is_empty() {
            return Err(format!("{name} is required"));
        }
    }
    Ok(o)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Progress: stdout (prefixed) and `driver.log`.
struct Out {
    prefix: String,
    log: Option<File>,
    t0: Instant,
}

impl Out {
    fn say(&mut self, msg: &str) {
        let t = self.t0.elapsed().as_secs_f64();
        for (i, l) in msg.lines().enumerate() {
            let line = if i == 0 {
                format!("[{t:6.1}s] {l}")
            } else {
                format!("          {l}")
            };
            let mut so = std::io::stdout().lock();
            let _ = writeln!(so, "{}{line}", self.prefix);
            let _ = so.flush();
            if let Some(f) = self.log.as_mut() {
                let _ = writeln!(f, "{line}");
            }
        }
    }
}

/// Runs the `reddog` CLI; returns its stdout.
fn cli(o: &Opts, args: &[&str]) -> Result<String, String> {
    let out = Command::new(&o.cli)
        .arg("--socket")
        .arg(o.state.join("agent.sock"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", o.cli.display()))?;
    if !out.status.success() {
        return Err(format!(
            "reddog {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Copies a file that grows (and may be unlinked) into another.
struct Follow {
    src: PathBuf,
    dst: PathBuf,
    from: Option<File>,
    to: Option<File>,
}

impl Follow {
    fn new(src: PathBuf, dst: PathBuf) -> Self {
        Self {
            src,
            dst,
            from: None,
            to: None,
        }
    }

    fn poll(&mut self) {
        if self.from.is_none() {
            self.from = File::open(&self.src).ok();
            if self.from.is_some() {
                self.to = File::create(&self.dst).ok();
            }
        }
        if let (Some(f), Some(t)) = (self.from.as_mut(), self.to.as_mut()) {
            let mut buf = Vec::new();
            if f.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
                let _ = t.write_all(&buf);
            }
        }
    }
}

/// What the driver tracks per instance.
struct Watch {
    run: InstanceRun,
    printed: usize,
    first_seq: Option<u64>,
    ready_seq: Option<u64>,
    pid: Option<i64>,
    follows: Vec<Follow>,
    gone: bool,
}

impl Watch {
    fn new(o: &Opts, id: &str) -> Self {
        let dir = o.state.join("instances").join(id);
        Self {
            run: InstanceRun {
                id: id.to_owned(),
                ..InstanceRun::default()
            },
            printed: 0,
            first_seq: None,
            ready_seq: None,
            pid: None,
            follows: vec![
                Follow::new(dir.join("vmm.log"), o.logs.join(format!("{id}.vmm.log"))),
                Follow::new(dir.join("serial.log"), o.logs.join(format!("{id}.serial"))),
            ],
            gone: false,
        }
    }

    fn state(&self) -> &str {
        self.run
            .states
            .last()
            .map_or("pending", |s| s.state.as_str())
    }

    fn heartbeats_after_ready(&self) -> u64 {
        match (self.ready_seq, self.run.last_seq) {
            (Some(r), Some(l)) => l.saturating_sub(r),
            _ => 0,
        }
    }

    /// Reads `GET /v1/instances/<id>`, prints what is new.
    fn poll(
        &mut self,
        api: &BlockingApi,
        since_ms: u64,
        stopping: bool,
        out: &mut Out,
    ) -> Result<(), String> {
        for f in &mut self.follows {
            f.poll();
        }
        if self.gone {
            return Ok(());
        }
        let id = self.run.id.clone();
        let Some(v) = api
            .get_json(&format!("/v1/instances/{id}"))
            .map_err(|e| format!("GET /v1/instances/{id}: {e}"))?
        else {
            self.gone = true;
            out.say(&format!("{id}: removed by the agent"));
            return Ok(());
        };
        let history = v["history"].as_array().cloned().unwrap_or_default();
        // The history is bounded (64); in these short runs it never wraps.
        for t in history.iter().skip(self.printed) {
            let to = t["to"].as_str().unwrap_or("?").to_owned();
            let at = t["at_unix_ms"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(since_ms);
            let reason = t["reason"].as_str().unwrap_or("").to_owned();
            out.say(&format!(
                "{id}: {} -> {to} (+{:.1} s): {reason}",
                t["from"].as_str().unwrap_or("?"),
                at as f64 / 1e3
            ));
            let s = StateAt {
                state: to.clone(),
                at_ms: at,
                reason,
            };
            if stopping {
                self.run.stop_states.push(s);
            } else {
                self.run.states.push(s);
            }
        }
        self.printed = history.len();
        if let Some(pid) = v["vmm_pid"].as_i64() {
            if self.pid != Some(pid) {
                self.pid = Some(pid);
                out.say(&format!("{id}: reddog-vmm running, pid {pid}"));
            }
        }
        if let Some(g) = v["guest"]["agent_version"].as_str() {
            self.run.guest_agent = Some(g.to_owned());
        }
        self.run.restarts = v["restarts"].as_u64().unwrap_or(0);
        let role = v["role"].as_str().map(str::to_owned);
        if let Some(seq) = v["heartbeat_seq"].as_u64() {
            if self.run.last_seq != Some(seq) {
                let first = *self.first_seq.get_or_insert(seq);
                self.run.last_seq = Some(seq);
                self.run.heartbeats = seq - first + 1;
                self.run.role_state = role.clone();
                let state = v["state"].as_str().unwrap_or("?");
                if state == "ready" && self.ready_seq.is_none() {
                    self.ready_seq = Some(seq);
                }
                out.say(&format!(
                    "{id}: heartbeat seq={seq} role={} (instance {state})",
                    role.as_deref().unwrap_or("-")
                ));
            }
        }
        Ok(())
    }
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2025-01-02T03:04:05.678901Z` -> ms since the epoch.
fn rfc3339_ms(s: &str) -> Option<u64> {
    let n = |a: usize, b: usize| s.get(a..b)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        n(0, 4)?,
        n(5, 7)?,
        n(8, 10)?,
        n(11, 13)?,
        n(14, 16)?,
        n(17, 19)?,
    );
    let frac = s.get(19..).unwrap_or("");
    let ms = frac
        .strip_prefix('.')
        .map(|f| {
            let digits: String = f.chars().take_while(char::is_ascii_digit).collect();
            let three: String = digits.chars().chain("000".chars()).take(3).collect();
            three.parse::<i64>().unwrap_or(0)
        })
        .unwrap_or(0);
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se;
    u64::try_from(secs * 1000 + ms).ok()
}

/// Reads the agent's JSON log for the stop: transitions after `since_ms`
/// and the "VMM exited" lines.
fn read_agent_log(o: &Opts, watches: &mut [Watch], since_ms: u64, out: &mut Out) {
    let text = std::fs::read_to_string(o.logs.join("agent.log")).unwrap_or_default();
    for w in watches.iter_mut() {
        let seen: Vec<String> = w.run.stop_states.iter().map(|s| s.state.clone()).collect();
        let mut stop_states = Vec::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let f = &v["fields"];
            if f["instance"].as_str() != Some(w.run.id.as_str()) {
                continue;
            }
            let at = v["timestamp"].as_str().and_then(rfc3339_ms).unwrap_or(0);
            if at < since_ms {
                continue;
            }
            let msg = f["message"].as_str().unwrap_or("");
            if msg == "transition" {
                stop_states.push(StateAt {
                    state: f["to"].as_str().unwrap_or("?").to_owned(),
                    at_ms: at - since_ms,
                    reason: f["reason"].as_str().unwrap_or("").to_owned(),
                });
            } else if let Some(how) = msg.strip_prefix("VMM exited: ") {
                w.run.vmm_exit = Some(how.to_owned());
                w.run.vmm_status = f["status"].as_i64();
            }
        }
        for s in &stop_states {
            if !seen.contains(&s.state) {
                out.say(&format!(
                    "{}: -> {} (+{:.1} s, from the agent's log): {}",
                    w.run.id,
                    s.state,
                    s.at_ms as f64 / 1e3,
                    s.reason
                ));
            }
        }
        if !stop_states.is_empty() {
            w.run.stop_states = stop_states;
        }
        if let Some(e) = &w.run.vmm_exit {
            out.say(&format!(
                "{}: reddog-vmm exited, status {}: {e}",
                w.run.id,
                w.run.vmm_status.map_or("?".into(), |s| s.to_string())
            ));
        }
    }
}

fn goal(o: &Opts, incarnation: u64, image: &str, n: u32) -> Value {
    let instances: Vec<Value> = (1..=n)
        .map(|i| {
            json!({
                "id": format!("web-{i}"),
                "role": "web",
                "base_image": image,
                "role_package": o.role,
                "vcpus": o.vcpus,
                "memory_mib": o.memory_mib,
                "resource_disk_mib": o.resource_disk_mib,
                "heartbeat_interval_ms": o.heartbeat_ms,
                "env": { "GREETING": "hello-from-the-goal" },
            })
        })
        .collect();
    json!({ "incarnation": incarnation, "instances": instances })
}

fn put_goal(o: &Opts, g: &Value, out: &mut Out) -> Result<(), String> {
    let inc = g["incarnation"].as_u64().unwrap_or(0);
    let file = o.state.join(format!("goal-{inc}.json"));
    std::fs::write(
        &file,
        serde_json::to_vec_pretty(g).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", file.display()))?;
    let file_s = file.to_string_lossy().into_owned();
    let res = cli(o, &["goal", "put", &file_s])?;
    let v: Value = serde_json::from_str(&res).unwrap_or(Value::Null);
    out.say(&format!(
        "$ reddog goal put {file_s}: incarnation {inc} applied; created {}, removed {}",
        v["created"], v["removed"]
    ));
    Ok(())
}

fn run(
    o: &Opts,
    out: &mut Out,
    sum: &mut DriverSummary,
    agent: &mut Option<Child>,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(o.timeout_secs);
    std::fs::create_dir_all(&o.state).map_err(|e| format!("{}: {e}", o.state.display()))?;
    let sock = o.state.join("agent.sock");
    let api = BlockingApi::new(&sock).map_err(|e| e.to_string())?;
    let log = File::create(o.logs.join("agent.log")).map_err(|e| format!("agent.log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut cmd = Command::new(&o.agent);
    cmd.arg("--state-dir")
        .arg(&o.state)
        .args(["--node-id", "reddog-demo", "--log-format", "json"])
        .args(["--vcpus", &(o.vcpus * o.instances).to_string()])
        .args([
            "--memory-mib",
            &(o.memory_mib * u64::from(o.instances)).to_string(),
        ])
        .arg("--vmm-binary")
        .arg(&o.vmm)
        .arg("--kernel")
        .arg(&o.kernel)
        .arg("--initrd")
        .arg(&o.initrd)
        .args(["--missed-heartbeats", &o.missed_heartbeats.to_string()])
        // The role package and the base image are where the driver was told.
        .arg("--role-root")
        .arg(&o.role)
        .arg("--import-root")
        .arg(o.base.parent().unwrap_or(&o.base))
        .args(["--boot-timeout-secs", &o.boot_timeout_secs.to_string()]);
    match &o.jailer {
        Some(j) => cmd.arg("--jailer").arg(j),
        None => cmd.arg("--no-jail"),
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    out.say(&format!(
        "starting reddog-agent --state-dir {} --vmm-binary {} --kernel {} --initrd {}",
        o.state.display(),
        o.vmm.display(),
        o.kernel.display(),
        o.initrd.display()
    ));
    let child = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", o.agent.display()))?;
    let pid = child.id();
    *agent = Some(child);
    loop {
        if api.get_text("/healthz").is_ok_and(|t| t.trim() == "ok") {
            break;
        }
        if let Some(c) = agent.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                return Err(format!(
                    "reddog-agent exited at start ({st}); see agent.log"
                ));
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err("reddog-agent's API did not answer within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    sum.agent_up_ms = started.elapsed().as_millis() as u64;
    out.say(&format!(
        "reddog-agent up (pid {pid}), API on {} after {:.1} s",
        sock.display(),
        sum.agent_up_ms as f64 / 1e3
    ));

    let t = Instant::now();
    let base = o.base.to_string_lossy().into_owned();
    let res = cli(o, &["cache", "import", "-f", "raw", &base])?;
    let img: Value = serde_json::from_str(&res).map_err(|e| format!("cache import: {e}: {res}"))?;
    let sha = img["sha256"]
        .as_str()
        .ok_or_else(|| format!("cache import answered {res}"))?;
    sum.image = format!("sha256:{sha}");
    sum.import_ms = t.elapsed().as_millis() as u64;
    out.say(&format!(
        "$ reddog cache import -f raw {base}: {} ({} MiB) in {:.1} s",
        sum.image,
        img["size"].as_u64().unwrap_or(0) >> 20,
        sum.import_ms as f64 / 1e3
    ));

    let ids: Vec<String> = (1..=o.instances).map(|i| format!("web-{i}")).collect();
    let mut watches: Vec<Watch> = ids.iter().map(|id| Watch::new(o, id)).collect();
    let goal_ms = unix_ms();
    let goal_at = Instant::now();
    put_goal(o, &goal(o, 1, &sum.image, o.instances), out)?;
    let result = watch_until_ready(o, out, sum, &mut watches, goal_ms, goal_at, deadline);
    if result.is_ok() {
        match cli(o, &["instances"]) {
            Ok(t) => {
                out.say(&format!("$ reddog instances\n{}", t.trim_end()));
                sum.instances_table = t;
            }
            Err(e) => out.say(&format!("reddog instances: {e}")),
        }
    }

    // Stop everything, whatever happened before.
    let stop_ms = unix_ms();
    let stop_at = Instant::now();
    put_goal(o, &goal(o, 2, &sum.image, 0), out)?;
    let stop_deadline = Instant::now() + Duration::from_secs(60);
    while !watches.iter().all(|w| w.gone) {
        if Instant::now() > stop_deadline {
            return result.and(Err("instances still there 60 s after the empty goal".into()));
        }
        for w in &mut watches {
            w.poll(&api, stop_ms, true, out)?;
        }
        std::thread::sleep(POLL);
    }
    sum.stop_ms = Some(stop_at.elapsed().as_millis() as u64);
    for w in &mut watches {
        w.poll(&api, stop_ms, true, out)?;
    }
    read_agent_log(o, &mut watches, stop_ms, out);
    sum.instances = watches.iter().map(|w| w.run.clone()).collect();
    result?;
    for w in &watches {
        let id = &w.run.id;
        let states: Vec<&str> = w.run.stop_states.iter().map(|s| s.state.as_str()).collect();
        if !states.contains(&"stopped") {
            return Err(format!(
                "{id} never reached stopped (after the empty goal: {states:?})"
            ));
        }
        if w.run.vmm_status != Some(0) {
            return Err(format!(
                "{id}: the VMM did not exit cleanly: {}",
                w.run.vmm_exit.as_deref().unwrap_or("no exit logged")
            ));
        }
    }
    Ok(())
}

fn watch_until_ready(
    o: &Opts,
    out: &mut Out,
    sum: &mut DriverSummary,
    watches: &mut [Watch],
    goal_ms: u64,
    goal_at: Instant,
    deadline: Instant,
) -> Result<(), String> {
    let api = BlockingApi::new(o.state.join("agent.sock")).map_err(|e| e.to_string())?;
    loop {
        for w in watches.iter_mut() {
            w.poll(&api, goal_ms, false, out)?;
            if w.state() == "failed" {
                return Err(format!(
                    "{} failed: see agent.log and {}.serial",
                    w.run.id, w.run.id
                ));
            }
        }
        if sum.all_ready_ms.is_none() && watches.iter().all(|w| w.state() == "ready") {
            let ms = watches
                .iter()
                .filter_map(|w| w.run.entered("ready"))
                .max()
                .unwrap_or(0);
            sum.all_ready_ms = Some(ms);
            out.say(&format!(
                "all {} instance(s) ready {:.1} s after the goal; waiting for {} more heartbeats each",
                watches.len(),
                ms as f64 / 1e3,
                o.heartbeats
            ));
        }
        if sum.all_ready_ms.is_some()
            && watches
                .iter()
                .all(|w| w.state() == "ready" && w.heartbeats_after_ready() >= o.heartbeats)
        {
            sum.heartbeats_ms = Some(goal_at.elapsed().as_millis() as u64);
            return Ok(());
        }
        if Instant::now() > deadline {
            let states: Vec<String> = watches
                .iter()
                .map(|w| format!("{} {}", w.run.id, w.state()))
                .collect();
            return Err(format!(
                "timed out after {} s: {}",
                o.timeout_secs,
                states.join(", ")
            ));
        }
        std::thread::sleep(POLL);
    }
}

fn stop_agent(agent: &mut Child, out: &mut Out) {
    let pid = agent.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match agent.try_wait() {
            Ok(Some(st)) => {
                out.say(&format!("reddog-agent stopped ({st})"));
                return;
            }
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                out.say("reddog-agent did not stop on SIGTERM within 10 s; killing it");
                let _ = agent.kill();
                let _ = agent.wait();
                return;
            }
        }
    }
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("agent-driver: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let _ = std::fs::create_dir_all(&o.logs);
    let mut out = Out {
        prefix: o.prefix.clone(),
        log: File::create(o.logs.join("driver.log")).ok(),
        t0: Instant::now(),
    };
    let mut sum = DriverSummary::default();
    let mut agent = None;
    let res = run(&o, &mut out, &mut sum, &mut agent);
    if let Some(a) = agent.as_mut() {
        stop_agent(a, &mut out);
    }
    if let Err(e) = &res {
        out.say(&format!("FAILED: {e}"));
        sum.error = Some(e.clone());
    }
    sum.ok = res.is_ok();
    sum.total_ms = out.t0.elapsed().as_millis() as u64;
    // The summary goes to driver.log only: whoever ran the driver reads the
    // summary file and prints it their way.
    if let Some(f) = out.log.as_mut() {
        let _ = writeln!(f, "summary:\n{}", sum.describe().trim_end());
    }
    match serde_json::to_vec_pretty(&sum) {
        Ok(j) => {
            if let Err(e) = std::fs::write(&o.summary, j) {
                out.say(&format!("cannot write {}: {e}", o.summary.display()));
            }
        }
        Err(e) => out.say(&format!("summary: {e}")),
    }
    std::process::exit(if sum.ok { 0 } else { 1 });
}
