//! `reddog-agent --fake` under a low open-file limit and a flood of
//! half-sent API connections: the limit is raised to the hard one, the API
//! caps its connections and closes unfinished heads, the unix socket keeps
//! answering while TCP is flooded, and the instance is untouched.

use testkit::agent_harness::daemon::{wait_for_socket, Daemon};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `reddog` against the unix socket; `None` when it does not finish
/// within `limit` (killed).
fn reddog(sock: &Path, args: &[&str], limit: Duration) -> Option<String> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_reddog"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run reddog");
    let t = Instant::now();
    loop {
        if let Some(st) = c.try_wait().expect("wait") {
            let mut out = String::new();
            let mut err = String::new();
            if let Some(mut o) = c.stdout.take() {
                o.read_to_string(&mut out).expect("stdout");
            }
            if let Some(mut e) = c.stderr.take() {
                e.read_to_string(&mut err).expect("stderr");
            }
            assert!(st.success(), "reddog {args:?}: {err}");
            return Some(out);
        }
        if t.elapsed() > limit {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn instance(sock: &Path) -> serde_json::Value {
    let out = reddog(sock, &["instance", "web-1"], Duration::from_secs(10)).expect("answer");
    serde_json::from_str(&out).expect("json")
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The "Max open files" soft and hard limits of a process.
fn nofile(pid: u32) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].to_string(), f[4].to_string())
}

#[test]
fn a_flood_of_half_sent_connections_leaves_instances_and_the_unix_api_alone() {
    let dir = tempfile::Builder::new()
        .prefix("rdg")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let state = dir.path().join("state");
    let sock = dir.path().join("agent.sock");
    let port = free_port();
    // util-linux's prlimit sets the limits and execs the agent (same pid).
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=100:256")
        .arg(env!("CARGO_BIN_EXE_reddog-agent"))
        .args(["--fake", "--api-header-timeout-secs", "2", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--api-socket")
        .arg(&sock)
        .stderr(Stdio::null());
    let child = cmd
        .spawn()
        .expect("spawn reddog-agent under prlimit (util-linux)");
    let pid = child.id();
    let _d = Daemon(child);
    wait_for_socket(&sock);
    // The soft limit was raised to the hard one.
    assert_eq!(nofile(pid), ("256".to_string(), "256".to_string()));

    let img = dir.path().join("base.raw");
    std::fs::write(&img, b"image").expect("write");
    let long = Duration::from_secs(10);
    let imported: serde_json::Value = serde_json::from_str(
        &reddog(
            &sock,
            &["cache", "import", "-f", "raw", img.to_str().expect("utf8")],
            long,
        )
        .expect("import"),
    )
    .expect("json");
    let sha = imported["sha256"].as_str().expect("sha").to_string();
    let goal = serde_json::json!({
        "incarnation": 1,
        "instances": [{
            "id": "web-1", "role": "web", "base_image": format!("sha256:{sha}"),
            "role_package": dir.path(), "vcpus": 1, "memory_mib": 256
        }]
    });
    let gfile = dir.path().join("goal.json");
    std::fs::write(&gfile, goal.to_string()).expect("write");
    reddog(&sock, &["goal", "put", gfile.to_str().expect("utf8")], long).expect("goal");
    let t = Instant::now();
    let before = loop {
        let i = instance(&sock);
        if i["state"] == "ready" {
            break i;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "not ready: {i}");
        std::thread::sleep(Duration::from_millis(50));
    };

    // More half-sent connections than the whole fd table.
    let mut conns = Vec::new();
    for _ in 0..300 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        // Closed at once by the server (beyond the cap): the write may fail.
        let _ = c.write_all(b"GET /v1/instances HTTP/1.1\r\nHost: x");
        conns.push(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    // The unix socket answers meanwhile (its own cap, fds to spare).
    let during = reddog(&sock, &["instance", "web-1"], Duration::from_secs(5))
        .expect("the unix API must answer while TCP is flooded");
    assert!(during.contains("\"ready\""), "{during}");

    // Every connection is closed by the server: beyond the cap at once, the
    // others after the 2 s header timeout.
    let t = Instant::now();
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(6)))
            .expect("timeout");
        let mut buf = [0u8; 256];
        match c.read(&mut buf) {
            Ok(0) => {}
            // A reset (the server closed with our bytes unread) is closed too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            // hyper may answer a timed-out head with an error status first.
            Ok(n) => assert!(
                buf[..n].starts_with(b"HTTP/1.1 4"),
                "{:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) => panic!(
                "a half-sent connection was not closed by the server within {:?}: {e}",
                t.elapsed()
            ),
        }
    }
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    drop(conns);

    // TCP answers again.
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The instance is untouched: same VMM, no restart, never failed.
    let after = instance(&sock);
    assert_eq!(after["state"], "ready", "{after}");
    assert_eq!(after["vmm_pid"], before["vmm_pid"], "{after}");
    assert_eq!(after["restarts"], 0, "{after}");
    assert_eq!(
        after["history"].as_array().map(Vec::len),
        before["history"].as_array().map(Vec::len),
        "{after}"
    );
}
