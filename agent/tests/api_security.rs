//! The agent's own surface: caller paths confined to the configured roots,
//! imports checked against their format and the cache's free space, the
//! state directory's modes, unix-socket peers checked by uid/gid, the TCP
//! listener behind TLS with client certificates or a bearer token.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use agent::api::client::{ApiClient, ClientError};
use common::*;
use hyper::Method;

async fn serve(h: &H) -> ApiClient {
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
    assert_eq!(mode(&img), 0o400, "cached image: owner read-only");
    assert_eq!(mode(&img.with_extension("json")), 0o600);
}
