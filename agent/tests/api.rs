//! The REST API over a unix socket, the OpenAPI file kept in step with the
//! router, upstream pushes and image downloads against local HTTP servers on
//! 127.0.0.1 (every wait is bounded).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::api::client::{ApiClient, ClientError};
use agent::upstream::{import_image_url, spawn_pusher, UpstreamConfig};
use axum::routing::{get, post};
use hyper::Method;
use testkit::agent_harness::fakes::*;

fn openapi_routes() -> BTreeSet<(String, String)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml"))
            .expect("docs/openapi.yaml");
    let mut out = BTreeSet::new();
    let mut in_paths = false;
    let mut path = None;
    for line in text.lines() {
        if !line.starts_with(' ') {
            in_paths = line.trim_end() == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let t = line.trim();
        if indent == 2 && t.starts_with('/') && t.ends_with(':') {
            path = Some(t.trim_end_matches(':').to_string());
        } else if indent == 4 {
            let m = t.trim_end_matches(':');
            if ["get", "put", "post", "delete", "patch"].contains(&m) {
                if let Some(p) = &path {
                    out.insert((m.to_uppercase(), p.clone()));
                }
            }
        }
    }
    out
}

#[test]
fn every_route_is_in_the_openapi_file_and_back() {
    let code: BTreeSet<(String, String)> = agent::api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let doc = openapi_routes();
    assert!(!doc.is_empty());
    assert_eq!(
        code, doc,
        "agent::api::ROUTES and docs/openapi.yaml disagree"
    );
}

async fn serve(h: &FakeAgent) -> (ApiClient, std::path::PathBuf) {
    let sock = h.dir.path().join("api.sock");
    agent::api::serve_unix(h.agent.clone(), &sock).expect("serve");
    (ApiClient::new(&sock), sock)
}

#[tokio::test]
async fn every_listed_route_is_served() {
    let h = harness().await;
    let (c, _) = serve(&h).await;
    for (m, p) in agent::api::ROUTES {
        let path = p.replace("{id}", "nope");
        let method: Method = m.parse().expect("method");
        let body = (method != Method::GET).then(|| b"{}".to_vec());
        match c.call(method, &path, body).await {
            Ok(_) => {}
            // Our handlers answer errors with a JSON message; the router's own
            // 404/405 have none.
            Err(ClientError::Api { status, message }) => {
                assert!(
                    status != 405 && !message.is_empty(),
                    "{m} {path}: {status} {message}"
                );
            }
            Err(e) => panic!("{m} {path}: {e}"),
        }
    }
}

#[tokio::test]
async fn goal_instances_node_metrics_over_the_socket() {
    let h = harness().await;
    let (c, sock) = serve(&h).await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).expect("sock").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        c.call(Method::GET, "/healthz", None)
            .await
            .expect("healthz"),
        "ok\n"
    );
    let e = c
        .call(Method::GET, "/v1/goal", None)
        .await
        .expect_err("no goal");
    assert!(matches!(e, ClientError::Api { status: 404, .. }), "{e}");
    let goal = serde_json::to_vec(&h.goal(3, &["web-1"])).expect("json");
    let out = c.get_json_after_put(&goal).await;
    assert_eq!(out["created"][0], "web-1");
    h.wait_state("web-1", agent::InstanceState::Ready).await;
    let list = c.get_json("/v1/instances").await.expect("instances");
    assert_eq!(list[0]["state"], "ready");
    assert_eq!(list[0]["history"].as_array().map(Vec::len), Some(0));
    let one = c.get_json("/v1/instances/web-1").await.expect("instance");
    let hist = one["history"].as_array().expect("history");
    assert_eq!(hist.len(), 4);
    assert_eq!(hist[0]["from"], "pending");
    assert!(hist[0]["at_unix_ms"].as_u64().is_some_and(|t| t > 0));
    let node = c.get_json("/v1/node").await.expect("node");
    assert_eq!(node["node_id"], "node-1");
    assert_eq!(node["goal_incarnation"], 3);
    assert_eq!(node["instances"][0]["state"], "ready");
    let m = c
        .call(Method::GET, "/metrics", None)
        .await
        .expect("metrics");
    assert!(m.contains("reddog_instances{state=\"ready\"} 1"), "{m}");
    assert_eq!(
        c.get_json("/v1/goal").await.expect("goal")["incarnation"],
        3
    );
    // Errors: stale (409), invalid (422), not JSON (400), unknown (404).
    let e = c
        .call(
            Method::PUT,
            "/v1/goal",
            Some(serde_json::to_vec(&h.goal(2, &[])).expect("json")),
        )
        .await;
    assert!(
        matches!(&e, Err(ClientError::Api { status: 409, message }) if message.contains("older")),
        "{e:?}"
    );
    let mut bad = h.goal(4, &["x"]);
    bad.instances[0].vcpus = 0;
    let e = c
        .call(
            Method::PUT,
            "/v1/goal",
            Some(serde_json::to_vec(&bad).expect("json")),
        )
        .await;
    assert!(
        matches!(&e, Err(ClientError::Api { status: 422, message }) if message.contains("vcpus")),
        "{e:?}"
    );
    let e = c
        .call(
            Method::PUT,
            "/v1/goal",
            Some(b"{\"incarnation\": \"x\"".to_vec()),
        )
        .await;
    assert!(
        matches!(&e, Err(ClientError::Api { status: 400, message }) if message.contains("JSON")),
        "{e:?}"
    );
    let big = vec![b' '; agent::api::MAX_BODY + 10];
    assert!(c.call(Method::PUT, "/v1/goal", Some(big)).await.is_err());
    let e = c.call(Method::GET, "/v1/instances/zzz", None).await;
    assert!(
        matches!(&e, Err(ClientError::Api { status: 404, .. })),
        "{e:?}"
    );
    // Pause and resume: 200 with the instance, 409 in the wrong state, 404
    // for an unknown one.
    let p = c
        .call(Method::POST, "/v1/instances/web-1/pause", None)
        .await
        .expect("pause");
    let p: serde_json::Value = serde_json::from_str(&p).expect("json");
    assert_eq!(p["state"], "paused");
    let e = c
        .call(Method::POST, "/v1/instances/web-1/pause", None)
        .await;
    assert!(
        matches!(&e, Err(ClientError::Api { status: 409, message }) if message.contains("paused")),
        "{e:?}"
    );
    let r = c
        .call(Method::POST, "/v1/instances/web-1/resume", None)
        .await
        .expect("resume");
    let r: serde_json::Value = serde_json::from_str(&r).expect("json");
    assert_eq!(r["state"], "ready");
    let e = c
        .call(Method::POST, "/v1/instances/web-1/resume", None)
        .await;
    assert!(
        matches!(&e, Err(ClientError::Api { status: 409, .. })),
        "{e:?}"
    );
    let e = c.call(Method::POST, "/v1/instances/zzz/pause", None).await;
    assert!(
        matches!(&e, Err(ClientError::Api { status: 404, .. })),
        "{e:?}"
    );
    // Images over the API.
    let imgs = c.get_json("/v1/images").await.expect("images");
    assert_eq!(imgs[0]["references"], 1);
    let other = h.dir.path().join("x.raw");
    std::fs::write(&other, b"x").expect("write");
    let body = serde_json::json!({"path": other, "format": "raw"});
    c.call(
        Method::POST,
        "/v1/images",
        Some(serde_json::to_vec(&body).expect("json")),
    )
    .await
    .expect("import");
    let gc = c
        .call(Method::POST, "/v1/images/gc", None)
        .await
        .expect("gc");
    assert!(gc.contains("removed"), "{gc}");
    assert_eq!(
        c.get_json("/v1/images")
            .await
            .expect("images")
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

trait PutJson {
    async fn get_json_after_put(&self, goal: &[u8]) -> serde_json::Value;
}

impl PutJson for ApiClient {
    async fn get_json_after_put(&self, goal: &[u8]) -> serde_json::Value {
        let t = self
            .call(Method::PUT, "/v1/goal", Some(goal.to_vec()))
            .await
            .expect("put");
        serde_json::from_str(&t).expect("json")
    }
}

type Bodies = Arc<Mutex<Vec<serde_json::Value>>>;

async fn controller(listener: tokio::net::TcpListener) -> Bodies {
    let bodies: Bodies = Arc::default();
    let b2 = bodies.clone();
    let app = axum::Router::new().route(
        "/report",
        post(move |body: axum::body::Bytes| async move {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            b2.lock().expect("lock").push(v);
            "ok"
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    bodies
}

async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn node_reports_are_pushed_and_backlogged_while_upstream_is_down() {
    let h = harness().await;
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    // Reserve a port, leave it closed: the controller is down.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = probe.local_addr().expect("addr");
    drop(probe);
    let mut cfg = UpstreamConfig::new(format!("http://{addr}/report"));
    cfg.interval = Duration::from_millis(40);
    cfg.max_backlog = 3;
    cfg.timeout = Duration::from_millis(500);
    cfg.retries = 0;
    let task = spawn_pusher(h.agent.clone(), cfg).expect("pusher");
    let metric = |name: &str| -> u64 {
        h.agent
            .metrics()
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    until("a full backlog with drops", || {
        metric("reddog_upstream_backlog ") == 3 && metric("reddog_upstream_dropped_total") > 0
    })
    .await;
    assert_eq!(metric("reddog_upstream_pushed_total"), 0);
    // The controller comes up: the backlog drains, oldest first, then live reports.
    let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
    let bodies = controller(listener).await;
    until("the backlog drained", || {
        bodies.lock().expect("lock").len() >= 5
    })
    .await;
    until("backlog empty", || metric("reddog_upstream_backlog ") == 0).await;
    task.abort();
    let b = bodies.lock().expect("lock").clone();
    let times: Vec<u64> = b
        .iter()
        .map(|r| r["generated_unix_ms"].as_u64().expect("time"))
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "in order: {times:?}"
    );
    assert_eq!(b[0]["node_id"], "node-1");
    assert_eq!(b[0]["instances"][0]["id"], "a");
    assert!(b[0]["capacity"]["vcpus"].as_u64() == Some(8));
}

#[tokio::test]
async fn base_images_download_over_http_with_a_verified_hash() {
    let h = harness().await;
    let data: &'static [u8] = b"a downloaded base image";
    let app = axum::Router::new().route("/base.raw", get(move || async move { data }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    use sha2::Digest;
    let sha = agent::util::hex(&sha2::Sha256::digest(data));
    let url = format!("http://{addr}/base.raw");
    let t = Duration::from_secs(5);
    let e = import_image_url(
        &h.agent,
        &url,
        vmm_api::DiskFormat::Raw,
        &"11".repeat(32),
        t,
    )
    .await
    .expect_err("wrong hash");
    assert!(e.to_string().contains("expected"), "{e}");
    let e = import_image_url(
        &h.agent,
        &format!("http://{addr}/missing"),
        vmm_api::DiskFormat::Raw,
        &sha,
        t,
    )
    .await
    .expect_err("404");
    assert!(e.to_string().contains("404"), "{e}");
    let info = import_image_url(&h.agent, &url, vmm_api::DiskFormat::Raw, &sha, t)
        .await
        .expect("download");
    assert_eq!(info.sha256, sha);
    assert_eq!(
        std::fs::read(h.agent.image_cache().path_of(&sha)).expect("read"),
        data
    );
    let leftovers = std::fs::read_dir(h.agent.image_cache().dir())
        .expect("ls")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with(".import"))
        })
        .count();
    assert_eq!(leftovers, 0);
}
