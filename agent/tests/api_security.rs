//! The agent's own surface: caller paths confined to the configured roots,
//! imports checked against their format and the cache's free space, the
//! state directory's modes, unix-socket peers checked by uid/gid, the TCP
//! listener behind TLS with client certificates or a bearer token.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use agent::api::client::{ApiClient, ClientError};
use hyper::Method;
use testkit::agent_harness::fakes::*;

async fn serve(h: &FakeAgent) -> ApiClient {
    let sock = h.dir.path().join("api.sock");
    agent::api::serve_unix(h.agent.clone(), &sock).expect("serve");
    ApiClient::new(&sock)
}

fn api_err(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, message } => (status, message),
        e => panic!("not an API error: {e}"),
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn a_role_package_outside_the_roots_is_refused_at_put_goal() {
    let h = harness().await;
    let c = serve(&h).await;
    let root = h.dir.path().display().to_string();
    // `/allowed/../../../etc`: would copy /etc (and /etc/shadow) onto a
    // guest-visible disk.
    let mut spec = h.spec("web-1");
    spec.role_package = h.role.join("../../../../../../../etc");
    let goal = agent::GoalState {
        incarnation: 1,
        instances: vec![spec],
    };
    let body = serde_json::to_vec(&goal).expect("json");
    let (status, msg) = api_err(
        c.call(Method::PUT, "/v1/goal", Some(body))
            .await
            .expect_err("outside the roots"),
    );
    assert_eq!(status, 422, "{msg}");
    assert!(msg.contains("outside the allowed roots"), "{msg}");
    assert!(msg.contains(&root), "the message names the root: {msg}");
    assert!(h.agent.goal().is_none(), "nothing applied");

    // A symlink inside the root pointing out of it: the same.
    let link = h.dir.path().join("etc-link");
    std::os::unix::fs::symlink("/etc", &link).expect("ln");
    let mut spec = h.spec("web-1");
    spec.role_package = link;
    let body = serde_json::to_vec(&agent::GoalState {
        incarnation: 1,
        instances: vec![spec],
    })
    .expect("json");
    let (status, msg) = api_err(
        c.call(Method::PUT, "/v1/goal", Some(body))
            .await
            .expect_err("symlink out"),
    );
    assert_eq!(status, 422, "{msg}");
    assert!(msg.contains("outside the allowed roots"), "{msg}");

    // The package inside the root is accepted.
    let body = serde_json::to_vec(&h.goal(1, &["web-1"])).expect("json");
    c.call(Method::PUT, "/v1/goal", Some(body))
        .await
        .expect("inside the root");
}

async fn import(c: &ApiClient, req: serde_json::Value) -> Result<serde_json::Value, (u16, String)> {
    c.call(
        Method::POST,
        "/v1/images",
        Some(serde_json::to_vec(&req).expect("json")),
    )
    .await
    .map(|t| serde_json::from_str(&t).expect("json"))
    .map_err(api_err)
}

#[tokio::test]
async fn imports_relative_outside_or_symlinked_are_refused() {
    let h = harness().await;
    let c = serve(&h).await;
    let before = h.agent.images().len();
    for (path, want) in [
        // Relative to the daemon's cwd, today.
        ("../../etc/passwd".to_string(), "relative path"),
        ("/etc/passwd".to_string(), "outside the allowed roots"),
        (
            format!("{}/../../../../etc/passwd", h.dir.path().display()),
            "outside the allowed roots",
        ),
    ] {
        let (status, msg) = import(&c, serde_json::json!({"path": path, "format": "raw"}))
            .await
            .expect_err("refused");
        assert_eq!(status, 422, "{path}: {msg}");
        assert!(msg.contains(want), "{path}: {msg}");
    }
    // A symlink in the root to a file outside it.
    let link = h.dir.path().join("passwd-link");
    std::os::unix::fs::symlink("/etc/passwd", &link).expect("ln");
    let (_, msg) = import(&c, serde_json::json!({"path": link, "format": "raw"}))
        .await
        .expect_err("symlink out");
    assert!(msg.contains("outside the allowed roots"), "{msg}");
    // Not a regular file.
    let (_, msg) = import(&c, serde_json::json!({"path": h.role, "format": "raw"}))
        .await
        .expect_err("a directory");
    assert!(msg.contains("not a regular file"), "{msg}");
    assert_eq!(h.agent.images().len(), before, "nothing cached");
    // A file in the root is imported.
    let ok = h.dir.path().join("ok.raw");
    std::fs::write(&ok, vec![0u8; 4096]).expect("write");
    let got = import(&c, serde_json::json!({"path": ok, "format": "raw"}))
        .await
        .expect("inside the root");
    assert_eq!(got["size"], 4096);
}

#[tokio::test]
async fn an_image_that_is_not_its_declared_format_is_not_cached() {
    let h = harness().await;
    let c = serve(&h).await;
    let before = h.agent.images().len();
    let junk = h.dir.path().join("junk.img");
    std::fs::write(&junk, vec![0x5au8; 8192]).expect("write");
    for format in ["qcow2", "vhd"] {
        let (status, msg) = import(&c, serde_json::json!({"path": junk, "format": format}))
            .await
            .expect_err("bad format");
        assert_eq!(status, 422, "{msg}");
        assert!(msg.contains("is not a valid"), "{format}: {msg}");
    }
    let empty = h.dir.path().join("empty.raw");
    std::fs::write(&empty, b"").expect("write");
    let (_, msg) = import(&c, serde_json::json!({"path": empty, "format": "raw"}))
        .await
        .expect_err("empty");
    assert!(msg.contains("empty"), "{msg}");
    // A qcow2 naming a backing file (a host path the guest would read).
    let base = h.dir.path().join("b.raw");
    vhd::create(&base, vhd::Format::Raw, &vhd::CreateOptions::new(1 << 20)).expect("base");
    let over = h.dir.path().join("over.qcow2");
    let b = vhd::BaseRef {
        image: vhd::open(&base, vhd::Format::Raw, vhd::OpenOptions::read_only()).expect("open"),
        name: "/etc/shadow".into(),
    };
    vhd::create_diff(&over, vhd::Format::Qcow2, &b, None, None).expect("overlay");
    let (_, msg) = import(&c, serde_json::json!({"path": over, "format": "qcow2"}))
        .await
        .expect_err("backing file");
    assert!(msg.contains("is not a valid"), "{msg}");
    assert_eq!(h.agent.images().len(), before, "nothing cached");
    let leftovers: Vec<_> = std::fs::read_dir(h.agent.image_cache().dir())
        .expect("ls")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".import-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Real ones are taken.
    for (name, f, fmt) in [
        ("good.qcow2", vhd::Format::Qcow2, "qcow2"),
        ("good.vhd", vhd::Format::Vhd, "vhd"),
    ] {
        let p = h.dir.path().join(name);
        vhd::create(&p, f, &vhd::CreateOptions::new(4 << 20)).expect("create");
        import(&c, serde_json::json!({"path": p, "format": fmt}))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
}

#[tokio::test]
async fn an_import_larger_than_the_free_space_is_refused_up_front() {
    let h = harness().await;
    let c = serve(&h).await;
    let cache = h.agent.image_cache();
    let free = cache.free_bytes().expect("statvfs");
    // A sparse file one GiB larger than the free space (when that is within
    // the cache's size limit; the check itself is tested below either way).
    let need = free + (1 << 30);
    if need <= agent::images::MAX_IMAGE_BYTES {
        let big = h.dir.path().join("big.raw");
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(need).expect("sparse");
        let t = std::time::Instant::now();
        let (status, msg) = import(&c, serde_json::json!({"path": big, "format": "raw"}))
            .await
            .expect_err("does not fit");
        assert_eq!(status, 422, "{msg}");
        assert!(msg.contains("bytes free"), "{msg}");
        // Up front: not after copying tens of GiB.
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }
    let e = cache
        .ensure_fits(free + (1 << 30), "x")
        .expect_err("too big");
    assert!(
        matches!(e, agent::images::ImageError::NoSpace { .. }),
        "{e}"
    );
    cache.ensure_fits(1 << 20, "x").expect("a MiB fits");
}

#[tokio::test]
async fn the_state_directory_is_private() {
    let h = harness().await;
    let c = serve(&h).await;
    let body = serde_json::to_vec(&h.goal(1, &["web-1"])).expect("json");
    c.call(Method::PUT, "/v1/goal", Some(body))
        .await
        .expect("goal");
    h.wait_state("web-1", agent::InstanceState::Ready).await;
    let sd = &h.agent.config().state_dir;
    assert_eq!(mode(sd), 0o711, "state dir: traversable, not listable");
    for d in ["instances", "run", "images", "instances/web-1"] {
        assert_eq!(mode(&sd.join(d)), 0o700, "{d}");
    }
    assert_eq!(mode(&sd.join("goal.json")), 0o600);
    let rec = sd.join("instances/web-1/record.json");
    assert!(rec.exists(), "{}", rec.display());
    assert_eq!(mode(&rec), 0o600);
    let sha = h.image.trim_start_matches("sha256:");
    let img = h.agent.image_cache().path_of(sha);
    assert_eq!(
        mode(&img),
        0o444,
        "cached image: read-only, readable by jailed VMMs"
    );
    assert_eq!(mode(&img.with_extension("json")), 0o600);
}

// ---- TCP: TLS with client certificates or a bearer token ----

use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA, a server certificate for 127.0.0.1 signed by it, a client
/// certificate signed by it, and one from another CA; PEM files in `dir`.
struct Pki {
    ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    ca_der: rustls_pki_types::CertificateDer<'static>,
    client: (
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ),
    rogue: (
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ),
}

fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    (p.self_signed(&key).expect("ca"), key)
}

fn leaf(
    sans: &[&str],
    usage: rcgen::ExtendedKeyUsagePurpose,
    issuer: &(rcgen::Certificate, rcgen::KeyPair),
) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
    p.extended_key_usages = vec![usage];
    (p.signed_by(&key, &issuer.0, &issuer.1).expect("sign"), key)
}

fn pki(dir: &Path) -> Pki {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let the_ca = ca("reddog test CA");
    let other = ca("someone else's CA");
    let srv = leaf(&["127.0.0.1", "localhost"], ServerAuth, &the_ca);
    let cli = leaf(&[], ClientAuth, &the_ca);
    let rogue = leaf(&[], ClientAuth, &other);
    let w = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write pem");
        p
    };
    let der = |c: &(rcgen::Certificate, rcgen::KeyPair)| {
        (
            vec![c.0.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(c.1.serialize_der().into()),
        )
    };
    Pki {
        ca: w("ca.pem", the_ca.0.pem()),
        cert: w("server.pem", srv.0.pem()),
        key: w("server.key", srv.1.serialize_pem()),
        ca_der: the_ca.0.der().clone(),
        client: der(&cli),
        rogue: der(&rogue),
    }
}

fn connector(
    p: &Pki,
    client: Option<&(
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )>,
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(p.ca_der.clone()).expect("root");
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let cfg = match client {
        Some((chain, key)) => b
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .expect("client cert"),
        None => b.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// `GET path` over TLS; the status code, or the error that ended it.
async fn tls_get(
    addr: std::net::SocketAddr,
    c: &tokio_rustls::TlsConnector,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut s = c.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not HTTP: {text:?}"))?;
    Ok((code, text))
}

fn token_file(dir: &Path, token: &str, mode: u32) -> std::path::PathBuf {
    let p = dir.join(format!("token-{mode:o}"));
    std::fs::write(&p, format!("{token}\n")).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    p
}

fn quick() -> agent::api::ServeConfig {
    agent::api::ServeConfig {
        header_read_timeout: std::time::Duration::from_secs(1),
        ..Default::default()
    }
}

#[tokio::test]
async fn tcp_without_tls_or_client_authentication_is_refused() {
    let h = harness().await;
    let p = pki(h.dir.path());
    let token = token_file(h.dir.path(), "0123456789abcdef0123", 0o600);
    for (sec, want) in [
        (agent::api::TcpSecurity::default(), "without TLS"),
        (
            agent::api::TcpSecurity {
                token_file: Some(token.clone()),
                ..Default::default()
            },
            "without TLS",
        ),
        (
            agent::api::TcpSecurity {
                tls_cert: Some(p.cert.clone()),
                tls_key: Some(p.key.clone()),
                ..Default::default()
            },
            "without client authentication",
        ),
    ] {
        let e = agent::api::serve_tcp_with(h.agent.clone(), "127.0.0.1:0", quick(), &sec)
            .await
            .expect_err("refused");
        assert!(
            matches!(e, agent::api::ApiError::Unauthenticated { .. }),
            "{e}"
        );
        assert!(e.to_string().contains(want), "{e}");
        assert!(e.to_string().contains("--tls-cert"), "{e}");
    }
    // A token file others can read is refused too.
    let loose = token_file(h.dir.path(), "0123456789abcdef0123", 0o644);
    let sec = agent::api::TcpSecurity {
        tls_cert: Some(p.cert.clone()),
        tls_key: Some(p.key.clone()),
        token_file: Some(loose),
        ..Default::default()
    };
    let e = agent::api::serve_tcp_with(h.agent.clone(), "127.0.0.1:0", quick(), &sec)
        .await
        .expect_err("loose token file");
    assert!(e.to_string().contains("chmod 600"), "{e}");
}

#[tokio::test]
async fn tcp_with_client_certificates() {
    let h = harness().await;
    let p = pki(h.dir.path());
    let sec = agent::api::TcpSecurity {
        tls_cert: Some(p.cert.clone()),
        tls_key: Some(p.key.clone()),
        client_ca: Some(p.ca.clone()),
        token_file: None,
    };
    let (addr, _t) = agent::api::serve_tcp_with(h.agent.clone(), "127.0.0.1:0", quick(), &sec)
        .await
        .expect("serve");
    let (code, body) = tls_get(addr, &connector(&p, Some(&p.client)), "/v1/node", None)
        .await
        .expect("a client with a certificate from the CA");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("node-1"), "{body}");
    // No certificate, or one from another CA: the handshake (or the first
    // read after it, TLS 1.3 sends the alert late) fails.
    for (what, c) in [
        ("no certificate", connector(&p, None)),
        ("another CA's certificate", connector(&p, Some(&p.rogue))),
    ] {
        let r = tls_get(addr, &c, "/v1/node", None).await;
        assert!(r.is_err(), "{what}: {r:?}");
    }
    plain_http_fails(addr).await;
}

#[tokio::test]
async fn tcp_with_a_bearer_token() {
    let h = harness().await;
    let p = pki(h.dir.path());
    let token = "s3cret-token-0123456789";
    let sec = agent::api::TcpSecurity {
        tls_cert: Some(p.cert.clone()),
        tls_key: Some(p.key.clone()),
        client_ca: None,
        token_file: Some(token_file(h.dir.path(), token, 0o600)),
    };
    let (addr, _t) = agent::api::serve_tcp_with(h.agent.clone(), "127.0.0.1:0", quick(), &sec)
        .await
        .expect("serve");
    let c = connector(&p, None);
    let (code, body) = tls_get(addr, &c, "/v1/node", Some(token))
        .await
        .expect("with the token");
    assert_eq!(code, 200, "{body}");
    for bad in [None, Some("s3cret-token-0123456780"), Some("short")] {
        let (code, body) = tls_get(addr, &c, "/v1/node", bad).await.expect("answer");
        assert_eq!(code, 401, "{bad:?}: {body}");
        assert!(body.contains("Bearer"), "{body}");
    }
    plain_http_fails(addr).await;

    // Both: a certificate or the token.
    let sec = agent::api::TcpSecurity {
        client_ca: Some(p.ca.clone()),
        ..sec
    };
    let (addr, _t2) = agent::api::serve_tcp_with(h.agent.clone(), "127.0.0.1:0", quick(), &sec)
        .await
        .expect("serve");
    let with_cert = connector(&p, Some(&p.client));
    assert_eq!(
        tls_get(addr, &with_cert, "/healthz", None)
            .await
            .map(|r| r.0),
        Ok(200)
    );
    assert_eq!(
        tls_get(addr, &c, "/healthz", Some(token))
            .await
            .map(|r| r.0),
        Ok(200)
    );
    assert_eq!(
        tls_get(addr, &c, "/healthz", None).await.map(|r| r.0),
        Ok(401)
    );
}

/// Plain HTTP to the TLS port gets no HTTP answer, and the connection ends.
async fn plain_http_fails(addr: std::net::SocketAddr) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = s
        .write_all(b"GET /v1/node HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("closed by the server");
    assert!(
        !out.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
}

#[tokio::test]
async fn tls_handshakes_and_heads_are_bounded_by_the_header_timeout_and_the_cap() {
    let h = harness().await;
    let p = pki(h.dir.path());
    let token = "s3cret-token-0123456789";
    let sec = agent::api::TcpSecurity {
        tls_cert: Some(p.cert.clone()),
        tls_key: Some(p.key.clone()),
        client_ca: None,
        token_file: Some(token_file(h.dir.path(), token, 0o600)),
    };
    let cfg = agent::api::ServeConfig {
        max_connections: 4,
        ..quick()
    };
    let (addr, _t) = agent::api::serve_tcp_with(h.agent.clone(), "127.0.0.1:0", cfg, &sec)
        .await
        .expect("serve");
    // Silent TCP connections (no handshake) and TLS ones with half a head.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    let c = connector(&p, None);
    let mut half = Vec::new();
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let mut s = c.connect(name, tcp).await.expect("handshake");
        s.write_all(b"GET /v1/node HTTP/1.1\r\nHost: x")
            .await
            .expect("write");
        half.push(s);
    }
    // The cap (4) is full: one more is closed at once.
    let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut b = [0u8; 16];
    let n = tokio::time::timeout(std::time::Duration::from_millis(500), extra.read(&mut b))
        .await
        .expect("closed at once beyond the cap");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // All four are closed by the server after the 1 s header timeout.
    let t = std::time::Instant::now();
    for mut s in silent {
        let r = tokio::time::timeout(std::time::Duration::from_secs(4), s.read(&mut b))
            .await
            .expect("a silent connection is closed");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
    for mut s in half {
        let mut out = Vec::new();
        let r = tokio::time::timeout(std::time::Duration::from_secs(4), s.read_to_end(&mut out))
            .await
            .expect("a half-sent head is closed");
        assert!(
            r.is_err() || !out.starts_with(b"HTTP/1.1 2"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
    assert!(
        t.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        t.elapsed()
    );
    // And a good client gets in again.
    assert_eq!(
        tls_get(addr, &c, "/healthz", Some(token))
            .await
            .map(|r| r.0),
        Ok(200)
    );
}
