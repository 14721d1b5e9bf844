//! `reddog-agent --fake` driven by the `reddog` CLI over the unix socket.

use testkit::agent_harness::daemon::{wait_for_socket, Daemon};

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn reddog(sock: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reddog"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()
        .expect("run reddog")
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn daemon_and_cli() {
    let dir = tempfile::Builder::new()
        .prefix("rdg")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let state = dir.path().join("state");
    let sock = dir.path().join("agent.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_reddog-agent"))
        .args([
            "--fake",
            "--log-format",
            "json",
            "--node-id",
            "n7",
            "--vcpus",
            "4",
            "--memory-mib",
            "2048",
        ])
        .arg("--state-dir")
        .arg(&state)
        .arg("--api-socket")
        .arg(&sock)
        // The role package and the imported file are in the test's directory.
        .arg("--role-root")
        .arg(dir.path())
        .arg("--import-root")
        .arg(dir.path())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn reddog-agent");
    let mut d = Daemon(child);
    wait_for_socket(&sock);
    let img = dir.path().join("base.raw");
    std::fs::write(&img, b"image").expect("write");
    let imported: serde_json::Value = serde_json::from_str(&ok(reddog(
        &sock,
        &["cache", "import", "-f", "raw", img.to_str().expect("utf8")],
    )))
    .expect("json");
    let sha = imported["sha256"].as_str().expect("sha").to_string();
    let goal = serde_json::json!({
        "incarnation": 1,
        "instances": [{
            "id": "web-1", "role": "web", "base_image": format!("sha256:{sha}"),
            "role_package": dir.path(), "vcpus": 2, "memory_mib": 512
        }]
    });
    let gfile = dir.path().join("goal.json");
    std::fs::write(&gfile, goal.to_string()).expect("write");
    let out = ok(reddog(
        &sock,
        &["goal", "put", gfile.to_str().expect("utf8")],
    ));
    assert!(out.contains("web-1"), "{out}");
    let t = Instant::now();
    loop {
        let list = ok(reddog(&sock, &["instances"]));
        if list.contains("ready") {
            assert!(list.starts_with("ID"), "{list}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "not ready: {list}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let node: serde_json::Value =
        serde_json::from_str(&ok(reddog(&sock, &["node"]))).expect("json");
    assert_eq!(node["node_id"], "n7");
    assert_eq!(node["used"]["vcpus"], 2);
    let one = ok(reddog(&sock, &["instance", "web-1"]));
    assert!(one.contains("preparing_disks"), "{one}");
    // Pause and resume from the command line.
    let p: serde_json::Value =
        serde_json::from_str(&ok(reddog(&sock, &["pause", "web-1"]))).expect("json");
    assert_eq!(p["state"], "paused");
    let o = reddog(&sock, &["pause", "web-1"]);
    assert!(!o.status.success(), "pausing twice must fail");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("409"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&ok(reddog(&sock, &["resume", "web-1"]))).expect("json");
    assert_eq!(r["state"], "ready");
    // A refused goal: a clear message, non-zero exit.
    std::fs::write(&gfile, r#"{"incarnation": 0}"#).expect("write");
    let o = reddog(&sock, &["goal", "put", gfile.to_str().expect("utf8")]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("older"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // SIGTERM: a clean exit.
    let pid = rustix::process::Pid::from_raw(i32::try_from(d.0.id()).expect("pid")).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("term");
    let t = Instant::now();
    loop {
        if let Some(st) = d.0.try_wait().expect("wait") {
            assert!(st.success(), "{st}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the agent did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut logs = String::new();
    if let Some(mut e) = d.0.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut logs).expect("logs");
    }
    let first = logs.lines().next().unwrap_or_default();
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "JSON logs: {first}"
    );
}
