//! The whole agent on this host's KVM, at speed: real `reddog-vmm` processes,
//! real disks (qcow2 overlay, ext4 resource and role disks), the real vsock
//! guest channel, and the tiny bare-metal test guest speaking guest-proto over
//! virtio-vsock in place of a Linux guest (see `test-guest/README.md`).
//!
//! KVM tests: they fail, never skip, without /dev/kvm.

use testkit::agent_harness::daemon::{wait_for_socket, Daemon};

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::backend::process::{JailSettings, ProcessLauncher, ProcessLauncherConfig};
use agent::backend::vmm::{LaunchSpec, VmmError, VmmHandle, VmmLauncher, VmmRecord};
use agent::upstream::{spawn_pusher, UpstreamConfig};
use agent::{GoalState, InstanceSpec, InstanceState};
use async_trait::async_trait;
use testkit::agent_harness::kvm::{guest_cmdline, KvmAgent, KvmAgentOptions};
use testkit::kvm::require_kvm;
use testkit::test_guest::{Cmdline, Exit, HbMode};

/// Picks the guest's behaviour from the instance id's first word
/// (`ok-1`, `silent-1`, `crash-1`, `garbage-1`): one `ProcessLauncher` each,
/// differing only in the test guest's command line.
struct ModeLauncher {
    by_mode: HashMap<&'static str, ProcessLauncher>,
}

/// The jailer, built once (statically, like the VMM).
fn jailer_binary() -> PathBuf {
    testkit::artifacts::static_bin("jailer", "reddog-jailer").expect("build reddog-jailer")
}

/// A cgroup parent of this test's own, named after its temporary directory.
fn cgroup_parent(tmp: &Path) -> PathBuf {
    let name = tmp.file_name().map_or_else(
        || "x".to_string(),
        |n| {
            n.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        },
    );
    PathBuf::from("reddog-e2e").join(name)
}

/// Every VMM jailed: jails under `base`, cgroups under `cgroup_parent(tmp)`.
fn jail_settings(base: &Path, tmp: &Path) -> JailSettings {
    let mut j = JailSettings::new(jailer_binary(), base);
    j.cgroup.parent = cgroup_parent(tmp);
    j
}

/// Removes the VMMs' cgroups under a test's parent (once its VMMs are gone).
fn remove_cgroups(parent: &Path) {
    for c in ["cpu", "memory", "pids"] {
        let top = Path::new("/sys/fs/cgroup").join(c).join(parent);
        for _ in 0..50 {
            if let Ok(rd) = std::fs::read_dir(&top) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            if std::fs::remove_dir(&top).is_ok() || !top.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes the test's cgroups when dropped (after the VMM guards).
struct CgroupsOnDrop(PathBuf);

impl Drop for CgroupsOnDrop {
    fn drop(&mut self) {
        remove_cgroups(&self.0);
    }
}

impl ModeLauncher {
    /// One jailed launcher per mode over `base` (the harness's config).
    fn new(base: &ProcessLauncherConfig, jail: &JailSettings) -> Self {
        let mut by_mode = HashMap::new();
        for (mode, extra) in [
            ("ok", Cmdline::new().hb_mode(HbMode::Normal)),
            ("silent", Cmdline::new().hb_mode(HbMode::Silent)),
            (
                "crash",
                Cmdline::new().hb_mode(HbMode::Crash).crash_after(2),
            ),
            ("garbage", Cmdline::new().hb_mode(HbMode::Garbage)),
        ] {
            let mut cfg = base.clone();
            cfg.cmdline = guest_cmdline().extend(&extra).to_string();
            cfg.jail = Some(jail.clone());
            by_mode.insert(mode, ProcessLauncher::new(cfg));
        }
        Self { by_mode }
    }

    fn pick(&self, id: &str) -> &ProcessLauncher {
        let mode = id.split('-').next().unwrap_or("ok");
        self.by_mode.get(mode).unwrap_or(&self.by_mode["ok"])
    }
}

#[async_trait]
impl VmmLauncher for ModeLauncher {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn VmmHandle>, VmmError> {
        self.pick(&spec.instance_id).launch(spec).await
    }

    async fn adopt(
        &self,
        spec: &LaunchSpec,
        record: &VmmRecord,
    ) -> Result<Box<dyn VmmHandle>, VmmError> {
        self.pick(&spec.instance_id).adopt(spec, record).await
    }

    async fn recover(&self, spec: &LaunchSpec) -> Option<VmmRecord> {
        self.pick(&spec.instance_id).recover(spec).await
    }

    fn remove(&self, spec: &LaunchSpec) {
        self.pick(&spec.instance_id).remove(spec);
    }
}

/// A one-thread HTTP server on 127.0.0.1 that records POSTed node reports.
struct Upstream {
    url: String,
    reports: Arc<Mutex<Vec<serde_json::Value>>>,
}

fn upstream() -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/node", listener.local_addr().expect("addr"));
    let reports = Arc::new(Mutex::new(Vec::new()));
    let sink = reports.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(10_000) {
            let Ok(mut s) = conn else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            // Read headers, then the body by Content-Length.
            let body = loop {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    break buf.get(end + 4..end + 4 + len).map(<[u8]>::to_vec);
                }
            };
            if let Some(v) = body.and_then(|b| serde_json::from_slice(&b).ok()) {
                sink.lock().expect("lock").push(v);
            }
            let _ = s.write_all(
                b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    Upstream { url, reports }
}

/// The agent on this host's KVM (testkit's harness) with the fast health
/// policy of these tests and the launcher that picks the guest's behaviour
/// from the instance id.
/// Every VMM is jailed, its cgroup under the test's own parent (removed
/// after the agent harness has killed what is left: fields drop in order).
struct Harness {
    kvm: KvmAgent,
    cgroups: CgroupsOnDrop,
}

impl std::ops::Deref for Harness {
    type Target = KvmAgent;

    fn deref(&self) -> &KvmAgent {
        &self.kvm
    }
}

async fn harness(upstream_url: Option<&str>) -> Harness {
    require_kvm();
    let vmm = testkit::artifacts::static_vmm().expect("build reddog-vmm");
    let mut opts = KvmAgentOptions::new(vmm, 16, 8192);
    opts.dir_prefix = "rdg-e2e";
    opts.configure = Box::new(|cfg| {
        cfg.health.boot_timeout = Duration::from_secs(20);
        cfg.health.missed_heartbeats = 3;
        cfg.health.heartbeat_grace = Duration::from_millis(500);
        cfg.health.backoff_initial = Duration::from_millis(200);
        cfg.health.backoff_max = Duration::from_secs(1);
        cfg.health.stop_grace = Duration::from_secs(2);
    });
    let cgroups = Arc::new(Mutex::new(PathBuf::new()));
    let chosen = cgroups.clone();
    opts.launcher = Some(Box::new(move |base, dir| {
        let jail = jail_settings(&dir.join("state").join("jail"), dir);
        *chosen.lock().expect("lock") = jail.cgroup.parent.clone();
        Arc::new(ModeLauncher::new(base, &jail)) as Arc<dyn VmmLauncher>
    }));
    let kvm = KvmAgent::start(opts).await.expect("the agent on KVM");
    let cgroups = CgroupsOnDrop(cgroups.lock().expect("lock").clone());
    if let Some(url) = upstream_url {
        let mut u = UpstreamConfig::new(url);
        u.interval = Duration::from_millis(300);
        spawn_pusher(kvm.agent.clone(), u).expect("upstream pusher");
    }
    Harness { kvm, cgroups }
}

impl Harness {
    fn spec(&self, id: &str) -> InstanceSpec {
        self.kvm.spec(id, 64, 200)
    }

    async fn apply(&self, incarnation: u64, ids: &[&str]) {
        let goal = GoalState {
            incarnation,
            instances: ids.iter().map(|i| self.spec(i)).collect(),
        };
        self.agent.apply_goal(goal).await.expect("goal accepted");
    }

    async fn wait(
        &self,
        id: &str,
        what: &str,
        limit: Duration,
        f: impl Fn(&agent::InstanceStatus) -> bool,
    ) -> agent::InstanceStatus {
        match self.agent.wait_for(id, limit, |s| s.is_some_and(&f)).await {
            Some(s) => s,
            None => panic!(
                "{id}: never {what} within {limit:?}: {:#?}",
                self.agent.instance(id)
            ),
        }
    }
}

impl Harness {
    /// Polls until the instance's heartbeat sequence has moved on by three
    /// (heartbeats update the status without an event).
    async fn heartbeats_advance(&self, id: &str) {
        let seq = |h: &Harness| h.agent.instance(id).and_then(|s| s.heartbeat_seq);
        let first = seq(self);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = seq(self);
            if let (Some(a), Some(b)) = (first, now) {
                if b >= a + 3 {
                    return;
                }
            } else if first.is_none() && now.is_some_and(|b| b >= 3) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: heartbeats stopped at {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn kill9(pid: i32) {
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
}

/// Kills the listed VMMs when dropped (for the daemon test, whose agent runs
/// in another process).
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            kill9(*pid);
        }
    }
}

/// The VMM `pid` runs jailed: not root, no capabilities, `no_new_privs`,
/// its own mount namespace.
fn assert_jailed(pid: i32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix(':')))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    let uid = field("Uid");
    assert!(
        !uid.split_whitespace().any(|u| u == "0"),
        "VMM {pid} uid {uid}"
    );
    assert_eq!(field("NoNewPrivs"), "1", "VMM {pid}");
    assert_eq!(field("CapEff"), "0000000000000000", "VMM {pid}");
    assert_ne!(
        std::fs::read_link("/proc/self/ns/mnt").expect("ns"),
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("ns"),
        "VMM {pid} shares the host's mount namespace"
    );
}

fn pid_alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped by its parent) is not running.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_ready_reported_upstream_and_a_killed_vmm_is_restarted() {
    let up = upstream();
    let h = harness(Some(&up.url)).await;
    let started = Instant::now();
    h.apply(1, &["ok-1", "ok-2"]).await;
    for id in ["ok-1", "ok-2"] {
        let s = h
            .wait(id, "ready", Duration::from_secs(60), |s| {
                s.state == InstanceState::Ready
            })
            .await;
        assert_jailed(s.vmm_pid.expect("pid"));
        h.heartbeats_advance(id).await;
    }
    eprintln!(
        "goal to both ready with heartbeats: {:?}",
        started.elapsed()
    );

    // The controller hears about both, ready, from the node heartbeat.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = up.reports.lock().expect("lock").iter().any(|r| {
            let s = r.to_string();
            s.contains("\"ok-1\"") && s.contains("\"ok-2\"") && s.matches("\"ready\"").count() >= 2
        });
        if seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no upstream report with both instances ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // kill -9 one VMM: the agent restarts it; the other is untouched.
    let victim = h
        .agent
        .instance("ok-1")
        .and_then(|s| s.vmm_pid)
        .expect("pid");
    let other = h
        .agent
        .instance("ok-2")
        .and_then(|s| s.vmm_pid)
        .expect("pid");
    let r = std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status();
    assert!(r.is_ok_and(|s| s.success()));
    let s = h
        .wait(
            "ok-1",
            "restarted and ready",
            Duration::from_secs(60),
            |s| {
                s.state == InstanceState::Ready
                    && s.restarts >= 1
                    && s.vmm_pid.is_some_and(|p| p != victim)
            },
        )
        .await;
    assert_eq!(s.restarts, 1);
    let o = h.agent.instance("ok-2").expect("ok-2");
    assert_eq!(
        (o.vmm_pid, o.restarts, o.state),
        (Some(other), 0, InstanceState::Ready)
    );

    // Removing them stops both VMMs.
    h.apply(2, &[]).await;
    for id in ["ok-1", "ok-2"] {
        assert!(
            h.agent
                .wait_for(id, Duration::from_secs(30), |s| s.is_none())
                .await
                .is_none(),
            "{id} not removed"
        );
    }
    let pid = h.agent.instance("ok-1").and_then(|s| s.vmm_pid);
    assert!(pid.is_none());
    assert!(!pid_alive(other), "ok-2's VMM still running");
    // Their jails, cgroups and socket directories went with them.
    let state = h.agent.config().state_dir.clone();
    for id in ["ok-1", "ok-2"] {
        assert!(!state.join("jail").join(id).exists(), "{id}'s jail left");
        assert!(!state.join("run").join(id).exists(), "{id}'s run dir left");
        for c in ["cpu", "memory", "pids"] {
            let cg = Path::new("/sys/fs/cgroup")
                .join(c)
                .join(&h.cgroups.0)
                .join(id);
            assert!(!cg.exists(), "{} left", cg.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_guest_is_restarted_a_crash_loop_fails_and_a_hostile_guest_is_cut_off() {
    let h = harness(None).await;
    h.apply(1, &["ok-1", "silent-1", "crash-1", "garbage-1"])
        .await;

    // The well-behaved neighbour is ready throughout.
    h.wait("ok-1", "ready", Duration::from_secs(60), |s| {
        s.state == InstanceState::Ready
    })
    .await;

    // A guest that goes silent after Hello is restarted after the timeout.
    h.wait("silent-1", "restarted", Duration::from_secs(60), |s| {
        s.restarts >= 1
    })
    .await;

    // A guest that crashes after two heartbeats, every time: failed after 3.
    let s = h
        .wait("crash-1", "failed", Duration::from_secs(90), |s| {
            s.state == InstanceState::Failed
        })
        .await;
    assert!(
        s.last_error.as_deref().is_some_and(|e| !e.is_empty()),
        "{s:#?}"
    );
    assert!(s.vmm_pid.is_none());

    // A guest that sends garbage is disconnected and never gets ready.
    let g = h.agent.instance("garbage-1").expect("garbage-1");
    assert_ne!(g.state, InstanceState::Ready, "{g:#?}");

    // Through all of it, the good instance kept its VMM and stayed ready.
    let ok = h.agent.instance("ok-1").expect("ok-1");
    assert_eq!(
        (ok.state, ok.restarts),
        (InstanceState::Ready, 0),
        "{ok:#?}"
    );
    h.apply(2, &[]).await;
    for id in ["ok-1", "silent-1", "crash-1", "garbage-1"] {
        assert!(
            h.agent
                .wait_for(id, Duration::from_secs(30), |s| s.is_none())
                .await
                .is_none(),
            "{id} not removed"
        );
    }
}

fn start_daemon(state: &Path, sock: &Path, vmm: &Path, log: &Path) -> Daemon {
    start_daemon_sized(state, sock, vmm, log, 8)
}

/// An agent whose node has `vcpus` vCPUs (and 512 MiB of memory and 100 MiB
/// of disk per vCPU).
fn start_daemon_sized(state: &Path, sock: &Path, vmm: &Path, log: &Path, vcpus: u32) -> Daemon {
    let cmdline = guest_cmdline().to_string();
    let log = std::fs::File::create(log).expect("log file");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_reddog-agent"))
        .args(["--node-id", "n-e2e", "--vcpus"])
        .arg(vcpus.to_string())
        .arg("--memory-mib")
        .arg((vcpus * 512).to_string())
        .arg("--disk-mib")
        .arg((vcpus * 125).to_string())
        .arg("--state-dir")
        .arg(state)
        .arg("--api-socket")
        .arg(sock)
        .arg("--vmm-binary")
        .arg(vmm)
        .arg("--jailer")
        .arg(jailer_binary())
        .arg("--jail-cgroup-parent")
        .arg(cgroup_parent(state.parent().unwrap_or(state)))
        .arg("--kernel")
        .arg(test_guest::elf_path())
        .arg("--cmdline")
        .arg(cmdline)
        .args(["--boot-timeout-secs", "20"])
        // The base image and the role package are made beside the state
        // directory (import_base_and_role).
        .arg("--role-root")
        .arg(state.parent().unwrap_or(state))
        .arg("--import-root")
        .arg(state.parent().unwrap_or(state))
        .stderr(log)
        .spawn()
        .expect("spawn reddog-agent");
    let d = Daemon(child);
    wait_for_socket(sock);
    d
}

/// Through the daemon's CLI: imports a 4 MiB raw base image and makes an
/// empty role package in `dir`; returns the image's sha256 and the package.
fn import_base_and_role(sock: &Path, dir: &Path) -> (String, PathBuf) {
    let img = dir.join("base.raw");
    std::fs::write(&img, vec![0u8; 4 << 20]).expect("base");
    let imported: serde_json::Value = serde_json::from_str(&cli(
        sock,
        &["cache", "import", "-f", "raw", img.to_str().expect("utf8")],
    ))
    .expect("json");
    let sha = imported["sha256"].as_str().expect("sha").to_string();
    let role = dir.join("role");
    std::fs::create_dir(&role).expect("role");
    (sha, role)
}

fn cli(sock: &Path, args: &[&str]) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_reddog"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()
        .expect("run reddog");
    assert!(
        o.status.success(),
        "reddog {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn instance_json(sock: &Path, id: &str) -> serde_json::Value {
    let out = cli(sock, &["instance", id]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{id}: not JSON ({e}): {out}"))
}

fn wait_json(
    sock: &Path,
    id: &str,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let v = instance_json(sock, id);
        if f(&v) {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{id} never {what}: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kill_9_of_the_agent_leaves_vms_running_and_a_new_agent_adopts_them() {
    require_kvm();
    let vmm = testkit::artifacts::static_vmm().expect("build reddog-vmm");
    let dir = tempfile::Builder::new()
        .prefix("rdg-adopt")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let (state, sock) = (dir.path().join("state"), dir.path().join("agent.sock"));
    let _cgroups = CgroupsOnDrop(cgroup_parent(dir.path()));
    let d = start_daemon(&state, &sock, &vmm, &dir.path().join("agent1.log"));

    let (sha, role) = import_base_and_role(&sock, dir.path());
    std::fs::write(role.join("index.html"), "hi\n").expect("role file");
    let instances: Vec<serde_json::Value> = ["a-1", "a-2"]
        .iter()
        .map(|id| {
            serde_json::json!({
                "id": id, "role": "web", "base_image": format!("sha256:{sha}"),
                "role_package": role, "vcpus": 1, "memory_mib": 64, "resource_disk_mib": 16,
                "heartbeat_interval_ms": 200
            })
        })
        .collect();
    let goal = serde_json::json!({ "incarnation": 1, "instances": instances });
    let gfile = dir.path().join("goal.json");
    std::fs::write(&gfile, goal.to_string()).expect("goal");
    cli(&sock, &["goal", "put", gfile.to_str().expect("utf8")]);
    let mut pids = Vec::new();
    for id in ["a-1", "a-2"] {
        let v = wait_json(&sock, id, "ready", |v| v["state"] == "ready");
        pids.push(v["vmm_pid"].as_i64().expect("pid"));
        assert_jailed(*pids.last().expect("pid") as i32);
    }
    let _guard = KillOnDrop(pids.iter().map(|p| *p as i32).collect());

    // kill -9 the agent: its VMMs keep running.
    let agent_pid = d.0.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-9", &agent_pid])
        .status()
        .is_ok_and(|s| s.success()));
    drop(d);
    std::thread::sleep(Duration::from_millis(500));
    for p in &pids {
        assert!(pid_alive(*p as i32), "VMM {p} died with the agent");
    }

    // A new agent on the same state directory adopts the same VMMs: same pids,
    // no restart, and the guests' heartbeats resume.
    let _ = std::fs::remove_file(&sock);
    let _d2 = start_daemon(&state, &sock, &vmm, &dir.path().join("agent2.log"));
    for (id, pid) in ["a-1", "a-2"].iter().zip(&pids) {
        let v = wait_json(&sock, id, "ready again with heartbeats", |v| {
            v["state"] == "ready" && v["last_heartbeat_unix_ms"].is_u64()
        });
        assert_eq!(
            v["vmm_pid"].as_i64(),
            Some(*pid),
            "{id} was not adopted: {v}"
        );
        assert_eq!(v["restarts"].as_u64(), Some(0), "{id}: {v}");
        let seq0 = v["heartbeat_seq"].as_u64();
        let v2 = wait_json(&sock, id, "heartbeating", |v| {
            v["heartbeat_seq"].as_u64() > seq0
        });
        assert_eq!(v2["vmm_pid"].as_i64(), Some(*pid));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_presses_the_acpi_power_button_through_the_control_socket() {
    use agent::backend::vmm::StopMode;
    require_kvm();
    let vmm = testkit::artifacts::static_vmm().expect("build reddog-vmm");
    let dir = tempfile::Builder::new()
        .prefix("rdg-acpi")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let mut cfg = ProcessLauncherConfig::new(&vmm, test_guest::elf_path());
    cfg.cmdline = Cmdline::new().quiet().exit(Exit::Hang).no_smp().to_string();
    cfg.jail = Some(jail_settings(&dir.path().join("jail"), dir.path()));
    let _cgroups = CgroupsOnDrop(cgroup_parent(dir.path()));
    assert!(cfg.control_socket, "VMMs get a control socket by default");
    let spec = LaunchSpec {
        instance_id: "acpi-1".into(),
        dir: dir.path().to_owned(),
        vcpus: 1,
        memory_mib: 32,
        disks: vec![],
        vsock: vmm_api::VsockConfig {
            guest_cid: 3,
            uds_path: dir.path().join("run").join("vsock.sock"),
        },
        guest_port: 1024,
        serial_path: dir.path().join("serial.log"),
        net: None,
    };
    let mut h = ProcessLauncher::new(cfg)
        .launch(&spec)
        .await
        .expect("launch");
    let record = h.record();
    let _guard = KillOnDrop(vec![record.pid]);
    // Launched held (`boot_on_request`): the guest starts on `boot`.
    h.boot().await.expect("boot");
    let sock = record.control_socket.clone().expect("a control socket");
    wait_for_socket(&sock);
    h.stop(StopMode::Graceful)
        .await
        .expect("graceful stop asked");
    let presses = tokio::task::spawn_blocking(move || {
        let mut c = vmm_api::control::Client::connect(&sock).expect("connect");
        c.metrics().expect("metrics").power_button_presses
    })
    .await
    .expect("metrics task");
    assert_eq!(
        presses, 1,
        "the graceful stop pressed the power button once"
    );
    // The test guest ignores the button (it is not an ACPI OS): the caller's
    // escalation kills it.
    h.stop(StopMode::Force).await.expect("kill");
    let exit = tokio::time::timeout(Duration::from_secs(10), h.wait())
        .await
        .expect("exited");
    assert_eq!(exit.signal, Some(9), "{exit:?}");
}

/// Pause and resume on a real VMM: through the agent (API path), and by
/// someone else on the VMM's control socket (the agent follows the VMM's
/// pushed events). A paused guest sends nothing, yet is not restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_vmm_is_not_restarted_and_the_agent_follows_the_vmms_events() {
    use vmm_api::control::{Client, Op, StateReply, VmState};
    let h = harness(None).await;
    h.apply(1, &["ok-1"]).await;
    let s = h
        .wait("ok-1", "ready", Duration::from_secs(30), |s| {
            s.state == InstanceState::Ready
        })
        .await;
    let pid = s.vmm_pid.expect("pid");
    assert_jailed(pid);
    // The boot timer comes from the VMM's event stream.
    let s = h
        .wait("ok-1", "given a boot time", Duration::from_secs(5), |s| {
            s.boot_time_us.is_some()
        })
        .await;
    let boot = s.boot_time_us.unwrap_or_default();
    assert!(boot > 0 && boot < 20_000_000, "{boot}");
    // The launcher subscribes before it boots the VM (`boot_on_request`), so
    // the boot timer is seen live and is what moves starting -> booted.
    let s = h.agent.instance("ok-1").expect("inst");
    assert!(
        s.history.iter().any(|t| t.from == InstanceState::Starting
            && t.to == InstanceState::Booted
            && t.reason.contains("boot timer")),
        "{:#?}",
        s.history
    );
    h.heartbeats_advance("ok-1").await;

    let p = h.agent.pause_instance("ok-1").await.expect("pause");
    assert_eq!(p.state, InstanceState::Paused);
    let view = h
        .agent
        .vmm_view("ok-1")
        .await
        .expect("instance")
        .expect("vmm view");
    assert_eq!(view.info.state, VmState::Paused);
    let seq = h.agent.instance("ok-1").and_then(|s| s.heartbeat_seq);
    // Well past the heartbeat timeout (3 x 200 ms + 500 ms).
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let s = h.agent.instance("ok-1").expect("inst");
    assert_eq!(s.state, InstanceState::Paused, "{:#?}", s.history);
    assert_eq!(s.vmm_pid, Some(pid));
    assert_eq!(s.restarts, 0);
    assert_eq!(s.heartbeat_seq, seq, "a parked guest sent heartbeats");

    let r = h.agent.resume_instance("ok-1").await.expect("resume");
    assert_eq!(r.state, InstanceState::Ready);
    h.heartbeats_advance("ok-1").await;

    // Someone else pauses the VMM on its control socket.
    // Jailed: the control socket is in the instance's run directory.
    let sock = h.agent.config().state_dir.join("run/ok-1/api.sock");
    let ctl = move |op: Op| {
        let sock = sock.clone();
        move || {
            let mut c = Client::connect(&sock).expect("connect");
            c.call::<StateReply>(op).expect("state reply").state
        }
    };
    for (op, vm_state, state, what) in [
        (
            Op::Pause,
            VmState::Paused,
            InstanceState::Paused,
            "paused by the VMM's event",
        ),
        (
            Op::Resume,
            VmState::Running,
            InstanceState::Ready,
            "ready after the resume event",
        ),
    ] {
        let st = tokio::task::spawn_blocking(ctl(op)).await.expect("task");
        assert_eq!(st, vm_state);
        h.wait("ok-1", what, Duration::from_secs(5), |s| s.state == state)
            .await;
        // Past the heartbeat timeout, paused or running again: no restart.
        tokio::time::sleep(Duration::from_millis(2000)).await;
        assert_eq!(h.agent.instance("ok-1").expect("inst").restarts, 0);
    }
    h.heartbeats_advance("ok-1").await;
    let s = h.agent.instance("ok-1").expect("inst");
    assert_eq!((s.vmm_pid, s.restarts), (Some(pid), 0));
}

/// The VMMs of the agent whose state directory is `state`: instance id ->
/// pids. Jailed VMMs (`/reddog-vmm --config /vm.json`) are found by their
/// cgroup (`/<cgroup_parent>/<id>`), unjailed ones by `--config
/// <state>/instances/<id>/vm.json` on their command line.
fn vmms_by_instance(state: &Path) -> HashMap<String, Vec<i32>> {
    let prefix = state.join("instances");
    let cg_prefix = Path::new("/").join(cgroup_parent(state.parent().unwrap_or(state)));
    let mut out: HashMap<String, Vec<i32>> = HashMap::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !pid_alive(pid) || !args.first().is_some_and(|a| a.ends_with("reddog-vmm")) {
            continue;
        }
        let id = if args[0] == "/reddog-vmm" {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .ok()
                .and_then(|cg| {
                    cg.lines().find_map(|l| {
                        let mut f = l.splitn(3, ':');
                        let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
                        (ctl == "pids")
                            .then(|| Path::new(path).strip_prefix(&cg_prefix).ok()?.to_str())
                            .flatten()
                            .map(str::to_owned)
                    })
                })
        } else {
            let config = args
                .windows(2)
                .find(|w| w[0] == "--config")
                .map(|w| PathBuf::from(&w[1]));
            config
                .as_deref()
                .and_then(|c| c.strip_prefix(&prefix).ok())
                .and_then(|rest| rest.iter().next())
                .map(|id| id.to_string_lossy().into_owned())
        };
        if let Some(id) = id {
            out.entry(id).or_default().push(pid);
        }
    }
    out
}

/// The soak: the agent with many tiny-guest instances on this host's KVM, for
/// rounds of random goal changes, VMM kills, agent kills and restarts, hostile
/// guest connections and API floods. After each round: exactly one VMM per
/// instance, no orphan VMM, socket or directory, every instance ready (or
/// failed for a stated reason), the agent's fd count and RSS flat.
/// `REDDOG_SOAK_ROUNDS` (default 3) and `REDDOG_SOAK_INSTANCES` (default 20)
/// make the long form; `REDDOG_SOAK_SEED` repeats a run.
#[test]
fn soak_goal_changes_vmm_and_agent_kills_hostile_guests_and_api_floods() {
    require_kvm();
    let env_num = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rounds = env_num("REDDOG_SOAK_ROUNDS", 3);
    let n = env_num("REDDOG_SOAK_INSTANCES", 20) as usize;
    let mut seed = env_num("REDDOG_SOAK_SEED", 0x5eed_2026);
    eprintln!("soak: {rounds} rounds, {n} instances, REDDOG_SOAK_SEED={seed}");
    let mut rand = move |m: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % m.max(1)
    };
    let vmm = testkit::artifacts::static_vmm().expect("build reddog-vmm");
    let dir = tempfile::Builder::new()
        .prefix("rdg-soak")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let (state, sock) = (dir.path().join("state"), dir.path().join("agent.sock"));
    let _cgroups = CgroupsOnDrop(cgroup_parent(dir.path()));
    let mut log_n = 0;
    let cores = u32::try_from(n + 4).unwrap_or(u32::MAX);
    let mut daemon = Some(start_daemon_sized(
        &state,
        &sock,
        &vmm,
        &dir.path().join("agent0.log"),
        cores,
    ));
    let (sha, role) = import_base_and_role(&sock, dir.path());
    let spec = |id: &str, gen: u64| {
        serde_json::json!({
            "id": id, "role": "web", "base_image": format!("sha256:{sha}"),
            "role_package": role, "vcpus": 1, "memory_mib": 32, "resource_disk_mib": 8,
            "heartbeat_interval_ms": 200, "env": { "GEN": gen.to_string() }
        })
    };
    let mut next_id = 0;
    let mut ids: Vec<String> = (0..n)
        .map(|_| {
            next_id += 1;
            format!("s-{next_id}")
        })
        .collect();
    let mut gens: HashMap<String, u64> = ids.iter().map(|i| (i.clone(), 0)).collect();
    let mut incarnation = 0;
    let put_goal = |inc: u64, ids: &[String], gens: &HashMap<String, u64>| {
        let goal = serde_json::json!({
            "incarnation": inc,
            "instances": ids.iter().map(|i| spec(i, gens[i])).collect::<Vec<_>>(),
        });
        let f = dir.path().join(format!("goal-{inc}.json"));
        std::fs::write(&f, goal.to_string()).expect("goal");
        cli(&sock, &["goal", "put", f.to_str().expect("utf8")]);
    };
    let all_pids = Arc::new(Mutex::new(Vec::<i32>::new()));
    struct Reap(Arc<Mutex<Vec<i32>>>, PathBuf);
    impl Drop for Reap {
        fn drop(&mut self) {
            for pids in vmms_by_instance(&self.1).values() {
                for p in pids {
                    kill9(*p);
                }
            }
            for p in self.0.lock().map(|v| v.clone()).unwrap_or_default() {
                kill9(p);
            }
        }
    }
    let _reap = Reap(all_pids.clone(), state.clone());
    let mut baseline: Option<(usize, u64)> = None;
    for round in 0..=rounds {
        if round > 0 {
            // 1. A goal change: two removed, two added, one updated (role disk).
            for _ in 0..2 {
                if ids.len() > 2 {
                    let i = rand(ids.len() as u64) as usize;
                    ids.remove(i);
                }
                next_id += 1;
                let id = format!("s-{next_id}");
                gens.insert(id.clone(), 0);
                ids.push(id);
            }
            let u = ids[rand(ids.len() as u64) as usize].clone();
            *gens.get_mut(&u).expect("gen") += 1;
            incarnation += 1;
            put_goal(incarnation, &ids, &gens);
            // 2. kill -9 of a running VMM.
            let running = vmms_by_instance(&state);
            if let Some(pids) = running.values().nth(rand(running.len() as u64) as usize) {
                kill9(pids[0]);
            }
            // 3. Hostile guest connections: garbage on two guest sockets.
            for _ in 0..2 {
                let id = &ids[rand(ids.len() as u64) as usize];
                let path = state.join("run").join(id).join("v.sock_1024");
                if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&path) {
                    let _ = s.write_all(&[0xff; 512]);
                }
            }
            // 4. An API flood: 200 connections that send half a request line.
            let flood: Vec<_> = (0..200)
                .filter_map(|_| {
                    let mut s = std::os::unix::net::UnixStream::connect(&sock).ok()?;
                    s.write_all(b"GET /v1/ins").ok()?;
                    Some(s)
                })
                .collect();
            std::thread::sleep(Duration::from_millis(500));
            drop(flood);
            // 5. Every other round, kill -9 of the agent and a new one.
            if round % 2 == 1 {
                if let Some(d) = daemon.take() {
                    kill9(d.0.id() as i32);
                    drop(d);
                }
                let _ = std::fs::remove_file(&sock);
                log_n += 1;
                daemon = Some(start_daemon_sized(
                    &state,
                    &sock,
                    &vmm,
                    &dir.path().join(format!("agent{log_n}.log")),
                    cores,
                ));
                baseline = None;
            }
        } else {
            incarnation += 1;
            put_goal(incarnation, &ids, &gens);
        }
        // Settle: every instance of the goal ready (or failed with a reason).
        let t = Instant::now();
        let settled = loop {
            let node: serde_json::Value =
                serde_json::from_str(&cli(&sock, &["node"])).expect("node report");
            let list: Vec<serde_json::Value> =
                node["instances"].as_array().cloned().unwrap_or_default();
            let states: HashMap<String, String> = list
                .iter()
                .filter_map(|v| {
                    Some((
                        v["id"].as_str()?.to_owned(),
                        v["state"].as_str()?.to_owned(),
                    ))
                })
                .collect();
            let done = ids
                .iter()
                .all(|i| states.get(i).is_some_and(|s| s == "ready" || s == "failed"))
                && states.len() == ids.len();
            if done {
                break list;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "round {round}: not settled after 90 s: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        for v in &settled {
            if v["state"] == "failed" {
                assert!(
                    v["last_error"].as_str().is_some_and(|e| !e.is_empty()),
                    "round {round}: failed without a reason: {v}"
                );
            }
        }
        // Exactly one VMM per instance; none for anything else.
        let vmms = vmms_by_instance(&state);
        for id in &ids {
            let ready = settled
                .iter()
                .any(|v| v["id"] == id.as_str() && v["state"] == "ready");
            let n = vmms.get(id).map_or(0, Vec::len);
            assert_eq!(
                n,
                usize::from(ready),
                "round {round}: {id} has {n} VMMs: {vmms:?}"
            );
        }
        for (id, pids) in &vmms {
            assert!(
                ids.contains(id),
                "round {round}: orphan VMM(s) {pids:?} of {id}"
            );
        }
        all_pids
            .lock()
            .expect("pids")
            .extend(vmms.values().flatten().copied());
        // No orphan directory or guest socket.
        let dirs: std::collections::BTreeSet<String> = std::fs::read_dir(state.join("instances"))
            .expect("instances dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let want: std::collections::BTreeSet<String> = ids.iter().cloned().collect();
        assert_eq!(dirs, want, "round {round}: instance directories");
        for e in std::fs::read_dir(state.join("run"))
            .expect("run dir")
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let owner = name.split(".vsock").next().unwrap_or_default().to_owned();
            assert!(want.contains(&owner), "round {round}: orphan socket {name}");
        }
        // The agent's fds and RSS stay flat (against the first round of this
        // agent process).
        let pid = daemon.as_ref().expect("agent").0.id();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap_or(0);
        eprintln!(
            "soak round {round}: {} instances ({} ready), {} VMMs, agent pid {pid}: {fds} fds, {rss_kib} KiB RSS",
            ids.len(),
            settled.iter().filter(|v| v["state"] == "ready").count(),
            vmms.values().map(Vec::len).sum::<usize>()
        );
        match baseline {
            None => baseline = Some((fds, rss_kib)),
            Some((f0, r0)) => {
                assert!(
                    fds <= f0 + 16,
                    "round {round}: agent fds grew {f0} -> {fds}"
                );
                assert!(
                    rss_kib <= r0 * 2 + 8192,
                    "round {round}: agent RSS grew {r0} -> {rss_kib} KiB"
                );
            }
        }
    }
    eprintln!("soak: {rounds} rounds passed");
}
