//! The agent as an ordinary host process: a unix socket instead of vsock, a
//! directory instead of the role disk, a passwd file of our own. Supervision,
//! restarts with back-off, readiness, liveness, heartbeats, reconnects and
//! shutdown deadlines, each in a second or two.
//!
//! The roles are `/bin/sh` scripts and (for the HTTP readiness check)
//! `/bin/busybox httpd` from busybox-static, run as an unprivileged user
//! (`nobody`'s uid when the tests run as root, else our own).

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{FakeHost, Got};
use guest_agent::link::{LinkConfig, OutboxLimits, CAPABILITIES};
use guest_agent::supervisor::{self, AgentConfig, ShutdownReport, Status};
use guest_agent::transport;
use guest_proto::{ExitStatus, HostMsg, Ping, RoleState, SetHeartbeatInterval, Shutdown};

struct Setup {
    dir: tempfile::TempDir,
    host: Arc<FakeHost>,
    status: Arc<Mutex<Status>>,
    agent: Option<JoinHandle<ShutdownReport>>,
}

const BOOT_ID: [u8; 16] = *b"reddog-test-boot";

/// A tempdir readable by the role user, a fake host with `interval_ms`
/// heartbeats, and (if given) a role manifest.
fn setup(interval_ms: u32, manifest: Option<&str>, write_timeout: Duration) -> Setup {
    setup_with(interval_ms, manifest, write_timeout, false)
}

/// [`setup`] with more: `{DIR}` in the manifest becomes the tempdir's path;
/// `stall_first` makes the host never read its first connection.
fn setup_with(
    interval_ms: u32,
    manifest: Option<&str>,
    write_timeout: Duration,
    stall_first: bool,
) -> Setup {
    setup_all(interval_ms, manifest, None, write_timeout, stall_first)
}

/// [`setup_with`] plus, if given, the host agent's instance file on the role disk.
fn setup_all(
    interval_ms: u32,
    manifest: Option<&str>,
    instance: Option<&str>,
    write_timeout: Duration,
    stall_first: bool,
) -> Setup {
    setup_prepared(
        interval_ms,
        manifest,
        instance,
        write_timeout,
        stall_first,
        |_| {},
    )
}

/// [`setup_all`], with `prepare` run on the tempdir before the agent starts.
fn setup_prepared(
    interval_ms: u32,
    manifest: Option<&str>,
    instance: Option<&str>,
    write_timeout: Duration,
    stall_first: bool,
    prepare: impl FnOnce(&Path),
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let me = std::fs::metadata("/proc/self").unwrap();
    let (uid, gid) = if me.uid() == 0 {
        (65534, 65534)
    } else {
        (me.uid(), me.gid())
    };
    std::fs::write(
        dir.path().join("passwd"),
        format!("root:x:0:0:root:/root:/bin/sh\ntester:x:{uid}:{gid}:test:/:/bin/sh\n"),
    )
    .unwrap();
    let role = dir.path().join("role");
    std::fs::create_dir(&role).unwrap();
    if let Some(m) = manifest {
        let m = m.replace("{DIR}", dir.path().to_str().unwrap());
        std::fs::write(role.join("role.json"), m).unwrap();
    }
    if let Some(i) = instance {
        std::fs::write(role.join("reddog-instance.json"), i).unwrap();
    }
    prepare(dir.path());
    let sock = dir.path().join("host.sock");
    let host = FakeHost::start(&sock, interval_ms);
    if stall_first {
        host.stall_conn
            .store(1, std::sync::atomic::Ordering::SeqCst);
    }
    let status = Arc::new(Mutex::new(Status::default()));
    let cfg = AgentConfig {
        link: LinkConfig {
            transport: Arc::new(transport::Unix { path: sock }),
            boot_id: BOOT_ID,
            agent_version: "reddog-guest test".into(),
            reconnect_initial: Duration::from_millis(20),
            reconnect_max: Duration::from_millis(200),
            handshake_timeout: Duration::from_secs(2),
            write_timeout,
            seed: 42,
        },
        manifest: role.join("role.json"),
        instance: role.join("reddog-instance.json"),
        passwd: dir.path().join("passwd"),
        pid1: false,
        tick: Duration::from_millis(10),
        outbox: OutboxLimits::default(),
        boot_notes: Vec::new(),
    };
    let st = status.clone();
    let agent = Some(std::thread::spawn(move || supervisor::run(cfg, st)));
    Setup {
        dir,
        host,
        status,
        agent,
    }
}

impl Setup {
    fn finish(&mut self, limit: Duration) -> ShutdownReport {
        let end = Instant::now() + limit;
        let h = self.agent.take().unwrap();
        while !h.is_finished() {
            assert!(
                Instant::now() < end,
                "the agent did not stop within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        h.join().unwrap()
    }

    fn status(&self) -> Status {
        self.status.lock().unwrap().clone()
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn started(m: &[Got]) -> Vec<u32> {
    m.iter()
        .filter_map(|g| match g {
            Got::RoleStarted(p) => Some(*p),
            _ => None,
        })
        .collect()
}

fn exits(m: &[Got]) -> Vec<(u32, ExitStatus)> {
    m.iter()
        .filter_map(|g| match g {
            Got::RoleExited(p, s) => Some((*p, *s)),
            _ => None,
        })
        .collect()
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn hello_heartbeats_ping_interval_and_shutdown_without_a_role() {
    let mut s = setup(100, None, Duration::from_secs(2));
    s.host
        .wait("hello and 3 heartbeats", Duration::from_secs(5), |m| {
            m.iter().filter(|g| matches!(g, Got::Heartbeat(_))).count() >= 3
        });
    let m = s.host.messages();
    match &m[0] {
        Got::Hello {
            boot_id,
            caps,
            version,
        } => {
            assert_eq!(boot_id, &BOOT_ID);
            assert_eq!(*caps, CAPABILITIES);
            assert_eq!(version, "reddog-guest test");
        }
        other => panic!("first frame {other:?}"),
    }
    // No manifest: the guest itself is ready, the role is NotStarted.
    assert!(m.contains(&Got::Ready), "{m:#?}");
    let hbs = s.host.heartbeats();
    for (i, (_, _, hb)) in hbs.iter().enumerate() {
        assert_eq!(hb.seq, i as u64);
        assert_eq!(hb.role_state, RoleState::NotStarted);
        assert!(hb.uptime_ms > 0 && hb.free_mem_kib > 0);
    }
    // ~100 ms apart.
    let gaps: Vec<u128> = hbs
        .windows(2)
        .map(|w| w[1].1.duration_since(w[0].1).as_millis())
        .collect();
    assert!(gaps.iter().all(|g| (50..400).contains(g)), "{gaps:?}");

    s.host.send(HostMsg::Ping(Ping { nonce: 0xfeed }));
    s.host.wait("pong", Duration::from_secs(2), |m| {
        m.contains(&Got::Pong(0xfeed))
    });

    s.host
        .send(HostMsg::SetHeartbeatInterval(SetHeartbeatInterval {
            interval_ms: 600,
        }));
    std::thread::sleep(Duration::from_millis(200));
    let before = s.host.heartbeats().len();
    std::thread::sleep(Duration::from_millis(1300));
    let after = s.host.heartbeats().len();
    assert!(
        (1..=3).contains(&(after - before)),
        "at 600 ms, 1.3 s gives 2 heartbeats, got {}",
        after - before
    );
    assert_eq!(s.status().heartbeat_interval_ms, 600);

    let t = Instant::now();
    s.host
        .send(HostMsg::Shutdown(Shutdown { deadline_ms: 3000 }));
    let r = s.finish(Duration::from_secs(3));
    assert_eq!(r.role_exit, None);
    assert!(!r.killed);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn web_role_passes_http_readiness_and_stops_on_sigterm() {
    let port = free_port();
    let manifest = format!(
        r#"{{"version":1,"program":"/bin/busybox","args":["httpd","-f","-p","127.0.0.1:{port}","-h","{{DIR}}/www"],
            "working_dir":"/","user":"tester",
            "readiness":{{"http":{{"port":{port},"path":"/index.html"}}}},"readiness_interval_ms":50,
            "restart":{{"policy":"always"}}}}"#
    );
    let mut s = setup_with(100, Some(&manifest), Duration::from_secs(2), false);
    let www = s.path().join("www");
    std::fs::create_dir(&www).unwrap();
    // Until the file exists httpd answers 404 and the check keeps trying.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!s.host.messages().contains(&Got::Ready));
    std::fs::write(www.join("index.html"), "hello from the role\n").unwrap();
    s.host
        .wait("RoleStarted then Ready", Duration::from_secs(10), |m| {
            !started(m).is_empty() && m.contains(&Got::Ready)
        });
    let pid = started(&s.host.messages())[0];
    assert_eq!(s.status().role_state, Some(RoleState::Ready));
    s.host
        .wait("a Ready heartbeat", Duration::from_secs(3), |m| {
            m.iter()
                .any(|g| matches!(g, Got::Heartbeat(hb) if hb.role_state == RoleState::Ready))
        });
    let t = Instant::now();
    s.host
        .send(HostMsg::Shutdown(Shutdown { deadline_ms: 4000 }));
    let r = s.finish(Duration::from_secs(5));
    assert_eq!(r.role_exit, Some(ExitStatus::Signal(libc::SIGTERM)));
    assert!(!r.killed);
    assert!(t.elapsed() < Duration::from_secs(2));
    // Flushed before the agent returned; the fake host may still be decoding.
    s.host.wait("the RoleExited", Duration::from_secs(2), |m| {
        exits(m) == vec![(pid, ExitStatus::Signal(libc::SIGTERM))]
    });
}

#[test]
fn failing_role_restarts_with_backoff_then_gives_up() {
    let m = r#"{"version":1,"program":"/bin/sh","args":["-c","exit 3"],"working_dir":"/","user":"tester",
        "restart":{"policy":"on-failure","initial_backoff_ms":40,"max_backoff_ms":160,"max_restarts":3}}"#;
    let mut s = setup(100, Some(m), Duration::from_secs(2));
    s.host
        .wait("4 exits", Duration::from_secs(5), |m| exits(m).len() >= 4);
    s.host.wait("a Failed heartbeat", Duration::from_secs(3), |m| {
        m.iter()
            .any(|g| matches!(g, Got::Heartbeat(hb) if hb.role_state == RoleState::Failed && hb.role_restarts == 3))
    });
    let got = s.host.got();
    let ex: Vec<_> = exits(&s.host.messages());
    assert_eq!(ex.len(), 4, "one run plus 3 restarts");
    assert!(ex.iter().all(|(_, st)| *st == ExitStatus::Code(3)));
    assert!(s
        .host
        .messages()
        .iter()
        .any(|g| matches!(g, Got::Log(l) if l.contains("giving up"))));
    // Back-off between runs: 40, 80, 160 ms ceilings, jittered down to half.
    let starts: Vec<Instant> = got
        .iter()
        .filter(|(_, _, g)| matches!(g, Got::RoleStarted(_)))
        .map(|(_, t, _)| *t)
        .collect();
    let gaps: Vec<u128> = starts
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_millis())
        .collect();
    for (gap, ceiling) in gaps.iter().zip([40u128, 80, 160]) {
        assert!(*gap >= ceiling / 2, "gaps {gaps:?}");
        assert!(*gap < ceiling + 400, "gaps {gaps:?}");
    }
    assert_eq!(s.status().role_restarts, 3);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(exits(&s.host.messages()).len(), 4, "no more restarts");
    s.host
        .send(HostMsg::Shutdown(Shutdown { deadline_ms: 1000 }));
    s.finish(Duration::from_secs(2));
}

#[test]
fn clean_exit_is_not_restarted_under_on_failure_but_restart_role_is_obeyed() {
    let m = r#"{"version":1,"program":"/bin/sh","args":["-c","exit 0"],"working_dir":"/","user":"tester"}"#;
    let mut s = setup(100, Some(m), Duration::from_secs(2));
    s.host
        .wait("one exit", Duration::from_secs(5), |m| exits(m).len() == 1);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(exits(&s.host.messages()).len(), 1);
    assert_eq!(s.status().role_state, Some(RoleState::Exited));
    s.host.send(HostMsg::RestartRole);
    s.host.wait("a second run", Duration::from_secs(5), |m| {
        exits(m).len() == 2
    });
    assert_eq!(s.status().role_restarts, 1);
    s.host
        .send(HostMsg::Shutdown(Shutdown { deadline_ms: 1000 }));
    s.finish(Duration::from_secs(2));
}

#[test]
fn restart_role_stops_a_running_role_first() {
    let m = r#"{"version":1,"program":"/bin/sh","args":["-c","exec sleep 60"],"working_dir":"/","user":"tester",
        "stop_timeout_ms":2000}"#;
    let mut s = setup(100, Some(m), Duration::from_secs(2));
    s.host
        .wait("ready", Duration::from_secs(5), |m| m.contains(&Got::Ready));
    let first = started(&s.host.messages())[0];
    s.host.send(HostMsg::RestartRole);
    s.host.wait("a second start", Duration::from_secs(5), |m| {
        started(m).len() == 2
    });
    let m = s.host.messages();
    assert_eq!(exits(&m), vec![(first, ExitStatus::Signal(libc::SIGTERM))]);
    assert_ne!(started(&m)[1], first);
    s.host
        .send(HostMsg::Shutdown(Shutdown { deadline_ms: 1000 }));
    let r = s.finish(Duration::from_secs(2));
    assert_eq!(r.role_exit, Some(ExitStatus::Signal(libc::SIGTERM)));
}

#[test]
fn shutdown_kills_a_role_that_ignores_sigterm_at_the_deadline() {
    let m = r#"{"version":1,"program":"/bin/sh","args":["-c","trap '' TERM; while :; do sleep 0.05; done"],
        "working_dir":"/","user":"tester"}"#;
    let mut s = setup(100, Some(m), Duration::from_secs(2));
    s.host
        .wait("ready", Duration::from_secs(5), |m| m.contains(&Got::Ready));
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    s.host
        .send(HostMsg::Shutdown(Shutdown { deadline_ms: 800 }));
    let r = s.finish(Duration::from_secs(3));
    let took = t.elapsed();
    // SIGKILL at deadline minus a quarter (600 ms), well before the host's 800 ms.
    assert!(r.killed);
    assert_eq!(r.role_exit, Some(ExitStatus::Signal(libc::SIGKILL)));
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_millis(800),
        "{took:?}"
    );
    s.host
        .wait("RoleExited by SIGKILL", Duration::from_secs(2), |m| {
            matches!(exits(m)[..], [(_, ExitStatus::Signal(9))])
        });
}

#[test]
fn reconnects_after_the_host_agent_restarts_with_the_same_boot_id() {
    let m = r#"{"version":1,"program":"/bin/sh","args":["-c","exec sleep 60"],"working_dir":"/","user":"tester"}"#;
    let mut s = setup(100, Some(m), Duration::from_secs(2));
    s.host
        .wait("ready + heartbeat", Duration::from_secs(5), |m| {
            m.contains(&Got::Ready) && m.iter().any(|g| matches!(g, Got::Heartbeat(_)))
        });
    let pid = started(&s.host.messages())[0];
    let last_seq = s.host.heartbeats().last().unwrap().2.seq;
    s.host.kill();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!s.status().connected);
    let host2 = FakeHost::start(&s.host.path, 100);
    let t = Instant::now();
    host2.wait("hello + heartbeats again", Duration::from_secs(3), |m| {
        m.iter().filter(|g| matches!(g, Got::Heartbeat(_))).count() >= 2
    });
    // Back-off is capped at 200 ms (jittered): the gap stays small.
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let m2 = host2.messages();
    assert!(matches!(&m2[0], Got::Hello { boot_id, .. } if *boot_id == BOOT_ID));
    let hbs = host2.heartbeats();
    assert!(
        hbs[0].2.seq > last_seq,
        "seq keeps counting across connections"
    );
    assert_eq!(hbs[0].2.role_state, RoleState::Ready);
    assert!(
        exits(&m2).is_empty() && started(&m2).is_empty(),
        "the role kept running"
    );
    assert_eq!(s.status().role_pid, Some(pid));
    assert_eq!(s.status().connections, 2);
    s.host = host2;
    s.host
        .send(HostMsg::Shutdown(Shutdown { deadline_ms: 1000 }));
    s.finish(Duration::from_secs(2));
}

#[test]
fn a_host_that_stops_reading_never_blocks_supervision() {
    // The role floods stdout (~2 MB of log lines), then keeps running; the
    // host reads nothing on its first connection.
    let m = r#"{"version":1,"program":"/bin/sh","args":["-c",
        "i=0; while [ $i -lt 20000 ]; do echo \"line $i xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"; i=$((i+1)); done; exec sleep 60"],
        "working_dir":"/","user":"tester"}"#;
    let mut s = setup_with(100, Some(m), Duration::from_millis(1500), true);
    // While the link thread is stuck in a write, the supervisor keeps going:
    // heartbeats keep being produced (into the one-slot outbox) every 100 ms.
    let end = Instant::now() + Duration::from_secs(5);
    while s.status().role_pid.is_none() {
        assert!(Instant::now() < end);
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let a = s.status().heartbeats;
    std::thread::sleep(Duration::from_millis(600));
    let b = s.status().heartbeats;
    assert!(b >= a + 4, "supervision stalled: {a} -> {b} heartbeats");
    // The write times out, the agent reconnects, the second connection gets
    // heartbeats and a note about the dropped log lines.
    let host = s.host.clone();
    host.wait(
        "a note about dropped logs on connection 2",
        Duration::from_secs(10),
        |_| {
            host.got().iter().any(|(n, _, g)| {
                *n == 2 && matches!(g, Got::Log(l) if l.contains("log lines dropped"))
            })
        },
    );
    host.wait("heartbeats on connection 2", Duration::from_secs(3), |_| {
        host.got()
            .iter()
            .filter(|(n, _, g)| *n == 2 && matches!(g, Got::Heartbeat(_)))
            .count()
            >= 2
    });
    // What the stalled connection swallowed is gone (written into a socket
    // nobody read); the heartbeats on the new one carry the role's state.
    assert!(host
        .got()
        .iter()
        .any(|(n, _, g)| *n == 2
            && matches!(g, Got::Heartbeat(hb) if hb.role_state == RoleState::Ready)));
    host.send(HostMsg::Shutdown(Shutdown { deadline_ms: 1000 }));
    let r = s.finish(Duration::from_secs(3));
    assert_eq!(r.role_exit, Some(ExitStatus::Signal(libc::SIGTERM)));
}

#[test]
fn invalid_manifest_is_reported_and_nothing_runs() {
    let m = r#"{"version":1,"program":"relative/path","user":"tester"}"#;
    let s = setup(100, Some(m), Duration::from_secs(2));
    refused_and_nothing_runs(s, "role manifest rejected", "program");
}

/// Waits for the log line naming the refusal and `field`, and a `Failed`
/// heartbeat; checks no role started; shuts the agent down.
fn refused_and_nothing_runs(mut s: Setup, what: &str, field: &str) {
    s.host.wait(
        "the error and a Failed heartbeat",
        Duration::from_secs(5),
        |m| {
            m.iter()
                .any(|g| matches!(g, Got::Log(l) if l.contains(what) && l.contains(field)))
                && m.iter()
                    .any(|g| matches!(g, Got::Heartbeat(hb) if hb.role_state == RoleState::Failed))
        },
    );
    let m = s.host.messages();
    assert!(started(&m).is_empty() && !m.contains(&Got::Ready));
    s.host
        .send(HostMsg::Shutdown(Shutdown { deadline_ms: 500 }));
    s.finish(Duration::from_secs(2));
}

#[test]
fn root_roles_are_refused() {
    let m = r#"{"version":1,"program":"/bin/true","user":"root"}"#;
    let mut s = setup(100, Some(m), Duration::from_secs(2));
    s.host.wait("the refusal", Duration::from_secs(5), |m| {
        m.iter()
            .any(|g| matches!(g, Got::Log(l) if l.contains("never runs as root")))
    });
    s.host
        .send(HostMsg::Shutdown(Shutdown { deadline_ms: 500 }));
    s.finish(Duration::from_secs(2));
}

#[test]
fn the_role_sees_the_instance_environment_over_the_manifests() {
    let m = r#"{"version":1,"program":"/bin/sh","args":["-c","env | sort; exec sleep 60"],
        "env":{"MODE":"package","KEEP":"yes"},"working_dir":"/","user":"tester"}"#;
    let i = r#"{"version":1,"instance_id":"web-1","role":"web","env":{"MODE":"instance","EXTRA":"x y"}}"#;
    let mut s = setup_all(100, Some(m), Some(i), Duration::from_secs(2), false);
    let want = [
        "MODE=instance",
        "KEEP=yes",
        "EXTRA=x y",
        "REDDOG_INSTANCE_ID=web-1",
        "REDDOG_ROLE=web",
    ];
    s.host
        .wait("the role's environment", Duration::from_secs(5), |m| {
            want.iter()
                .all(|w| m.iter().any(|g| matches!(g, Got::Log(l) if l == w)))
        });
    let m = s.host.messages();
    assert!(
        !m.iter()
            .any(|g| matches!(g, Got::Log(l) if l == "MODE=package")),
        "the instance's value wins: {m:#?}"
    );
    s.host
        .send(HostMsg::Shutdown(Shutdown { deadline_ms: 1000 }));
    let r = s.finish(Duration::from_secs(2));
    assert_eq!(r.role_exit, Some(ExitStatus::Signal(libc::SIGTERM)));
}

#[test]
fn a_malformed_instance_file_is_reported_and_nothing_runs() {
    let m = r#"{"version":1,"program":"/bin/sh","args":["-c","exec sleep 60"],"working_dir":"/","user":"tester"}"#;
    let i = r#"{"version":1,"instance_id":"web-1","role":"web","env":{"BAD-NAME":"x"}}"#;
    let s = setup_all(100, Some(m), Some(i), Duration::from_secs(2), false);
    refused_and_nothing_runs(s, "instance file rejected", "env.BAD-NAME");
}

/// `www/index.html` to serve and a `state` directory the role user may write.
fn web_files(dir: &Path) {
    std::fs::create_dir(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/index.html"), "alive\n").unwrap();
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
}

fn readies(m: &[Got]) -> usize {
    m.iter().filter(|g| **g == Got::Ready).count()
}

fn wait_status(s: &Setup, what: &str, limit: Duration, pred: impl Fn(&Status) -> bool) {
    let end = Instant::now() + limit;
    loop {
        let st = s.status();
        if pred(&st) {
            return;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}: {st:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A web role that serves, passes its liveness checks, then hangs when the
/// test creates `state/hang` (`hang` is the shell that makes it hang; `$!` is
/// the server). The next run finds `state/hung-once` and serves for good, but
/// only after 500 ms: long enough for the liveness check (3 x 100 ms) to kill
/// it again if it ran before the role is ready again.
/// `reason` is part of the failed check's message, `exit` how the role ends.
fn a_hung_role_is_stopped_and_restarted(
    readiness: &str,
    hang: &str,
    reason: &str,
    exit: ExitStatus,
) {
    let port = free_port();
    let httpd = format!("/bin/busybox httpd -f -p 127.0.0.1:{port} -h {{DIR}}/www");
    let script = format!(
        "if [ -e {{DIR}}/state/hung-once ]; then sleep 0.5; exec {httpd}; fi; \
         {httpd} & \
         while [ ! -e {{DIR}}/state/hang ]; do sleep 0.02; done; \
         touch {{DIR}}/state/hung-once; {hang}"
    );
    let manifest = format!(
        r#"{{"version":1,"program":"/bin/sh","args":["-c","{script}"],"working_dir":"/","user":"tester",
            "readiness":{readiness},"readiness_interval_ms":20,
            "liveness":{{"interval_ms":100,"timeout_ms":80,"failures":3}},
            "restart":{{"policy":"on-failure","initial_backoff_ms":20}},"stop_timeout_ms":300}}"#
    )
    .replace("{port}", &port.to_string());
    let mut s = setup_prepared(
        100,
        Some(&manifest),
        None,
        Duration::from_secs(2),
        false,
        web_files,
    );
    s.host
        .wait("RoleStarted then Ready", Duration::from_secs(10), |m| {
            started(m).len() == 1 && readies(m) == 1
        });
    let first = started(&s.host.messages())[0];
    // Healthy: the checks pass and nothing happens.
    wait_status(
        &s,
        "3 passed liveness checks",
        Duration::from_secs(5),
        |st| st.liveness_checks >= 3,
    );
    s.host
        .wait("a Ready heartbeat", Duration::from_secs(3), |m| {
            m.iter().any(|g| {
                matches!(g, Got::Heartbeat(hb) if hb.role_state == RoleState::Ready && hb.role_restarts == 0)
            })
        });
    assert_eq!(s.status().liveness_kills, 0);
    assert!(exits(&s.host.messages()).is_empty());

    // Hang: alive, but the port no longer answers.
    std::fs::write(s.path().join("state/hang"), "").unwrap();
    s.host.wait(
        "the hang reported, the role stopped, restarted and ready again",
        Duration::from_secs(10),
        |m| started(m).len() == 2 && readies(m) == 2,
    );
    let m = s.host.messages();
    assert_eq!(exits(&m), vec![(first, exit)], "{m:#?}");
    let hung: Vec<&String> = m
        .iter()
        .filter_map(|g| match g {
            Got::Log(l) if l.contains("is hung") => Some(l),
            _ => None,
        })
        .collect();
    assert_eq!(hung.len(), 1, "{m:#?}");
    assert!(
        hung[0].contains(&format!(
            "role pid {first} is hung: 3 liveness checks in a row failed"
        )) && hung[0].contains(reason),
        "{}",
        hung[0]
    );
    // While it was being stopped (300 ms when it ignores SIGTERM: a few
    // heartbeats) the heartbeats said it is not ready any more.
    if exit == ExitStatus::Signal(libc::SIGKILL) {
        let states: Vec<(RoleState, u32)> = s
            .host
            .heartbeats()
            .iter()
            .map(|(_, _, hb)| (hb.role_state, hb.role_restarts))
            .collect();
        let ready0 = states
            .iter()
            .position(|st| *st == (RoleState::Ready, 0))
            .unwrap();
        assert!(
            states[ready0..].contains(&(RoleState::Running, 0)),
            "no 'Running' heartbeat of the hung run: {states:?}"
        );
    }
    // The second run: readiness first, then liveness again; it stays up.
    let st = s.status();
    assert_eq!(
        (st.role_restarts, st.liveness_kills, st.role_state),
        (1, 1, Some(RoleState::Ready))
    );
    let checks = st.liveness_checks;
    std::thread::sleep(Duration::from_millis(700));
    let st = s.status();
    assert!(
        st.liveness_checks >= checks + 3,
        "liveness resumed after the restart: {checks} -> {}",
        st.liveness_checks
    );
    assert_eq!((st.role_restarts, st.liveness_kills), (1, 1));
    assert_eq!(exits(&s.host.messages()).len(), 1);
    s.host
        .send(HostMsg::Shutdown(Shutdown { deadline_ms: 2000 }));
    let r = s.finish(Duration::from_secs(3));
    assert_eq!(r.role_exit, Some(ExitStatus::Signal(libc::SIGTERM)));
}

#[test]
fn a_role_that_stops_answering_http_is_killed_and_restarted() {
    // The server is stopped (SIGSTOP): connections are accepted, never
    // answered, so each check runs into its timeout. The shell ignores
    // SIGTERM, so the stop ends with SIGKILL at stop_timeout_ms.
    a_hung_role_is_stopped_and_restarted(
        r#"{"http":{"port":{port},"path":"/index.html"}}"#,
        "kill -STOP $!; trap '' TERM; while :; do sleep 0.05; done",
        "GET /index.html: no answer within 80 ms",
        ExitStatus::Signal(libc::SIGKILL),
    );
}

#[test]
fn a_role_that_closes_its_port_is_killed_and_restarted() {
    // The listener goes away (connection refused) while the role lives on.
    a_hung_role_is_stopped_and_restarted(
        r#"{"tcp":{"port":{port}}}"#,
        "kill $!; exec sleep 60",
        "Connection refused",
        ExitStatus::Signal(libc::SIGTERM),
    );
}

#[test]
fn a_healthy_role_is_never_restarted_by_liveness() {
    let port = free_port();
    let manifest = format!(
        r#"{{"version":1,"program":"/bin/busybox","args":["httpd","-f","-p","127.0.0.1:{port}","-h","{{DIR}}/www"],
            "working_dir":"/","user":"tester",
            "readiness":{{"http":{{"port":{port},"path":"/index.html"}}}},"readiness_interval_ms":20,
            "liveness":{{"interval_ms":60,"timeout_ms":60,"failures":2}},
            "restart":{{"policy":"always","initial_backoff_ms":20}}}}"#
    );
    let mut s = setup_prepared(
        100,
        Some(&manifest),
        None,
        Duration::from_secs(2),
        false,
        web_files,
    );
    s.host
        .wait("Ready", Duration::from_secs(10), |m| readies(m) == 1);
    wait_status(&s, "10 liveness checks", Duration::from_secs(5), |st| {
        st.liveness_checks >= 10
    });
    let m = s.host.messages();
    assert_eq!(started(&m).len(), 1);
    assert!(exits(&m).is_empty(), "{m:#?}");
    assert!(!m
        .iter()
        .any(|g| matches!(g, Got::Log(l) if l.contains("liveness"))));
    let st = s.status();
    assert_eq!(
        (st.role_restarts, st.liveness_kills, st.role_state),
        (0, 0, Some(RoleState::Ready))
    );
    let hbs = s.host.heartbeats();
    let first_ready = hbs
        .iter()
        .position(|(_, _, hb)| hb.role_state == RoleState::Ready)
        .unwrap();
    assert!(
        hbs[first_ready..]
            .iter()
            .all(|(_, _, hb)| hb.role_state == RoleState::Ready && hb.role_restarts == 0),
        "{hbs:?}"
    );
    s.host
        .send(HostMsg::Shutdown(Shutdown { deadline_ms: 2000 }));
    let r = s.finish(Duration::from_secs(3));
    assert_eq!(r.role_exit, Some(ExitStatus::Signal(libc::SIGTERM)));
}
