//! `reddog cache import --url`: the CLI downloads with a progress bar and the
//! agent imports the file, checking its sha256.

use testkit::agent_harness::daemon::{wait_for_socket, Daemon};

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Serves `body` at any path to `n` clients on 127.0.0.1, then stops.
fn serve(body: Vec<u8>, n: usize) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/base.raw", l.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for conn in l.incoming().take(n) {
            let Ok(mut s) = conn else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut req = [0u8; 4096];
            let _ = s.read(&mut req);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    url
}

#[test]
fn import_by_url_shows_progress_and_checks_the_hash() {
    let dir = tempfile::Builder::new()
        .prefix("rdg")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let sock = dir.path().join("agent.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_reddog-agent"))
        .args([
            "--fake",
            "--node-id",
            "n1",
            "--vcpus",
            "2",
            "--memory-mib",
            "1024",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--api-socket")
        .arg(&sock)
        .arg("--import-root")
        .arg(dir.path())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn reddog-agent");
    let _d = Daemon(child);
    wait_for_socket(&sock);
    let body: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
    let sha = hex(&Sha256::digest(&body));
    let url = serve(body, 2);
    let reddog = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_reddog"))
            .arg("--socket")
            .arg(&sock)
            .args(args)
            // Downloads go where the agent imports from.
            .env("REDDOG_DOWNLOAD_DIR", dir.path())
            .output()
            .expect("run reddog")
    };

    let o = reddog(&[
        "cache", "import", "--url", &url, "-f", "raw", "--sha256", &sha,
    ]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}");
    assert!(out.contains(&sha), "{out}");
    assert!(
        err.contains("100%") && err.contains("3.0/3.0 MiB"),
        "progress bar: {err:?}"
    );

    // A wrong hash: refused, nothing cached under it.
    let wrong = "0".repeat(64);
    let o = reddog(&[
        "cache", "import", "--url", &url, "-f", "raw", "--sha256", &wrong,
    ]);
    assert!(!o.status.success());
    // No hash: refused before downloading.
    let o = reddog(&["cache", "import", "--url", &url, "-f", "raw"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--sha256"));
    let list = String::from_utf8_lossy(&reddog(&["cache", "list"]).stdout).into_owned();
    assert!(list.contains(&sha) && !list.contains(&wrong), "{list}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
