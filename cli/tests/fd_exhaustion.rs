//! `reddog-agent --fake` under a low open-file limit and a flood of
//! silent API connections on its TLS listener: the limit is raised to the
//! hard one, the API caps its connections and closes unfinished handshakes,
//! the unix socket keeps answering while TCP is flooded, and the instance is
//! untouched.

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

/// A CA-signed server certificate for 127.0.0.1 (PEM files in `dir`) and
/// the CA's certificate for the client.
fn server_cert(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("sign");
    let (c, k) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&c, cert.pem()).expect("write");
    std::fs::write(&k, key.serialize_pem()).expect("write");
    (c, k, ca.der().to_vec())
}

/// `GET /healthz` over TLS with the bearer token; the whole answer.
fn tls_healthz(port: u16, ca: &[u8], token: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca.to_vec()))
        .expect("root");
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).expect("tls");
    let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(
        format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("write");
    let mut answer = Vec::new();
    // The server may end without close_notify after Connection: close.
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
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
    let (cert, key, ca) = server_cert(dir.path());
    let token = "flood-test-token-0123456789";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
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
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--api-token-file")
        .arg(&token_file)
        .arg("--role-root")
        .arg(dir.path())
        .arg("--import-root")
        .arg(dir.path())
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

    // More silent connections (a TLS handshake never started) than the
    // whole fd table.
    let mut conns = Vec::new();
    for _ in 0..300 {
        conns.push(TcpStream::connect(("127.0.0.1", port)).expect("connect"));
    }
    std::thread::sleep(Duration::from_millis(500));
    // The unix socket answers meanwhile (its own cap, fds to spare).
    let during = reddog(&sock, &["instance", "web-1"], Duration::from_secs(5))
        .expect("the unix API must answer while TCP is flooded");
    assert!(during.contains("\"ready\""), "{during}");

    // Every connection is closed by the server: beyond the cap at once, the
    // others after the 2 s header timeout (which bounds the handshake).
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

    // TCP answers again (TLS, with the token).
    let answer = tls_healthz(port, &ca, token);
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
