//! The REST API: JSON over a unix socket (and TCP when configured), served by
//! axum. Every route is listed in [`ROUTES`] and described in
//! `docs/openapi.yaml` (a test keeps the three in step).

use std::path::{Path, PathBuf};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use vmm_api::DiskFormat;

use crate::instance::InstanceOpError;
use crate::spec::{GoalError, GoalState};
use crate::Agent;

/// Every route: method and path (axum syntax).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/v1/goal"),
    ("PUT", "/v1/goal"),
    ("GET", "/v1/instances"),
    ("GET", "/v1/instances/{id}"),
    ("GET", "/v1/instances/{id}/vmm"),
    ("POST", "/v1/instances/{id}/pause"),
    ("POST", "/v1/instances/{id}/resume"),
    ("GET", "/v1/node"),
    ("GET", "/v1/images"),
    ("POST", "/v1/images"),
    ("POST", "/v1/images/gc"),
];

/// Largest request body (a goal state with many instances fits easily).
pub const MAX_BODY: usize = 1 << 20;

/// The error body of every failed request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiErrorBody {
    /// What went wrong and what to do.
    pub error: String,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiErrorBody { error: msg.into() })).into_response()
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON for this request: {e}; see docs/openapi.yaml"),
        ))
    })
}

/// Builds the router.
pub fn router(agent: Agent) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/goal", get(get_goal).put(put_goal))
        .route("/v1/instances", get(list_instances))
        .route("/v1/instances/{id}", get(get_instance))
        .route("/v1/instances/{id}/vmm", get(get_instance_vmm))
        .route("/v1/instances/{id}/pause", post(pause_instance))
        .route("/v1/instances/{id}/resume", post(resume_instance))
        .route("/v1/node", get(node))
        .route("/v1/images", get(list_images).post(import_image))
        .route("/v1/images/gc", post(gc_images))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(agent)
}

async fn metrics(State(a): State<Agent>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        a.metrics(),
    )
        .into_response()
}

async fn get_goal(State(a): State<Agent>) -> Response {
    match a.goal() {
        Some(g) => Json(g).into_response(),
        None => error(StatusCode::NOT_FOUND, "no goal state has been applied yet"),
    }
}

async fn put_goal(State(a): State<Agent>, body: Bytes) -> Response {
    let goal: GoalState = match parse(&body) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    match a.apply_goal(goal).await {
        Ok(out) => Json(out).into_response(),
        Err(e) => {
            let status = match e {
                GoalError::Stale { .. } | GoalError::Conflict(_) => StatusCode::CONFLICT,
                GoalError::Persist(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            error(status, e.to_string())
        }
    }
}

async fn list_instances(State(a): State<Agent>) -> Response {
    Json(a.instances()).into_response()
}

async fn get_instance(State(a): State<Agent>, UrlPath(id): UrlPath<String>) -> Response {
    match a.instance(&id) {
        Some(s) => Json(s).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!(
                "no instance {:?}",
                crate::util::escape_guest_text(id.as_bytes(), 64)
            ),
        ),
    }
}

/// `GET /v1/instances/{id}/vmm`: the VMM's `info` and `metrics` from its
/// control socket.
async fn get_instance_vmm(State(a): State<Agent>, UrlPath(id): UrlPath<String>) -> Response {
    match a.vmm_view(&id).await {
        Some(Ok(v)) => Json(v).into_response(),
        Some(Err(e)) => error(StatusCode::CONFLICT, e),
        None => error(
            StatusCode::NOT_FOUND,
            format!(
                "no instance {:?}",
                crate::util::escape_guest_text(id.as_bytes(), 64)
            ),
        ),
    }
}

/// `POST /v1/instances/{id}/pause`: parks the VMM's vCPUs.
async fn pause_instance(State(a): State<Agent>, UrlPath(id): UrlPath<String>) -> Response {
    op_response(a.pause_instance(&id).await)
}

/// `POST /v1/instances/{id}/resume`: lets them run again.
async fn resume_instance(State(a): State<Agent>, UrlPath(id): UrlPath<String>) -> Response {
    op_response(a.resume_instance(&id).await)
}

fn op_response(r: Result<crate::InstanceStatus, InstanceOpError>) -> Response {
    match r {
        Ok(s) => Json(s).into_response(),
        Err(e) => {
            let status = match &e {
                InstanceOpError::NoSuchInstance(_) => StatusCode::NOT_FOUND,
                InstanceOpError::WrongState { .. } => StatusCode::CONFLICT,
                InstanceOpError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
                InstanceOpError::Vmm { .. } => StatusCode::BAD_GATEWAY,
            };
            let msg = match &e {
                // The id comes from the URL: shown escaped.
                InstanceOpError::NoSuchInstance(id) => format!(
                    "no instance {:?}",
                    crate::util::escape_guest_text(id.as_bytes(), 64)
                ),
                _ => e.to_string(),
            };
            error(status, msg)
        }
    }
}

async fn node(State(a): State<Agent>) -> Response {
    Json(a.node_report()).into_response()
}

async fn list_images(State(a): State<Agent>) -> Response {
    Json(a.images()).into_response()
}

/// `POST /v1/images`: import from a path on the node or an `http://` URL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// A file on the node.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Or an `http://` URL (needs `sha256`).
    #[serde(default)]
    pub url: Option<String>,
    /// The image's format.
    pub format: DiskFormat,
    /// The expected sha256 (`sha256:<hex>` or hex).
    #[serde(default)]
    pub sha256: Option<String>,
}

async fn import_image(State(a): State<Agent>, body: Bytes) -> Response {
    let req: ImportRequest = match parse(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let res = match (&req.path, &req.url, &req.sha256) {
        (Some(p), None, _) => {
            a.import_image(p.clone(), req.format, req.sha256.clone())
                .await
        }
        (None, Some(u), Some(sha)) => {
            crate::upstream::import_image_url(
                &a,
                u,
                req.format,
                sha,
                std::time::Duration::from_secs(30),
            )
            .await
        }
        (None, Some(_), None) => {
            return error(StatusCode::BAD_REQUEST, "a URL import needs sha256")
        }
        (Some(_), Some(_), _) => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of path and url, not both",
            )
        }
        (None, None, _) => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of path (a file on the node) and url (http://, with sha256)",
            )
        }
    };
    match res {
        Ok(i) => (StatusCode::CREATED, Json(i)).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    }
}

async fn gc_images(State(a): State<Agent>) -> Response {
    Json(serde_json::json!({ "removed": a.collect_images() })).into_response()
}

/// API server errors.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Could not listen.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Where.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// How the API's listeners treat connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeConfig {
    /// Most connections served at once, per listener; one beyond it is
    /// accepted and closed at once. Never more than a quarter of the
    /// process's open-file limit (see [`effective_max_connections`]).
    pub max_connections: usize,
    /// A connection whose request head (request line and headers) has not
    /// arrived this long after the server started waiting for it (a new or
    /// an idle keep-alive connection) is closed.
    pub header_read_timeout: std::time::Duration,
}

/// The default cap on connections per listener.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// The default header read timeout.
pub const DEFAULT_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
        }
    }
}

/// `max`, lowered to a quarter of the soft `RLIMIT_NOFILE` (at least 1), so
/// the API's connections on both listeners together never take more than
/// half of the fds the agent's instances need too.
pub fn effective_max_connections(max: usize) -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .and_then(|c| usize::try_from(c).ok())
        .unwrap_or(usize::MAX);
    max.min(soft / 4).max(1)
}

/// How long the accept loop pauses after an accept error (a full fd table
/// keeps failing until a connection closes).
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// A listener the accept loop can take connections from.
trait Accept: Send + 'static {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_io(&self) -> impl std::future::Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_io(&self) -> std::io::Result<Self::Io> {
        let (s, _) = self.accept().await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_io(&self) -> std::io::Result<Self::Io> {
        Ok(self.accept().await?.0)
    }
}

/// Serves `app` on `l` until the task is dropped: at most
/// `cfg.max_connections` at once (more are closed at once), each with the
/// header read timeout. An accept error (`EMFILE`, `ENFILE`, ...) is logged
/// once per run of errors and waited out; it never ends the loop.
async fn accept_loop<L: Accept>(kind: &'static str, l: L, app: Router, cfg: ServeConfig) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let max = effective_max_connections(cfg.max_connections);
    if max < cfg.max_connections {
        tracing::warn!(
            "API ({kind}): at most {max} connections (a quarter of the open-file limit), \
             not {}",
            cfg.max_connections
        );
    }
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max));
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut failing = false;
    let mut refused_logged = false;
    loop {
        let io = match l.accept_io().await {
            Ok(io) => io,
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        "API ({kind}): cannot accept connections: {e}; refusing new ones \
                         until it clears (instances are not affected)"
                    );
                    failing = true;
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if failing {
            tracing::info!("API ({kind}): accepting connections again");
            failing = false;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !refused_logged {
                tracing::warn!(
                    "API ({kind}): {max} connections open, the most allowed; closing new ones \
                     at once until some end"
                );
                refused_logged = true;
            }
            drop(io);
            continue;
        };
        refused_logged = false;
        let service = service.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(cfg.header_read_timeout)
                .serve_connection(TokioIo::new(io), service);
            if let Err(e) = conn.await {
                tracing::debug!("API ({kind}) connection: {e}");
            }
        });
    }
}

/// Serves the API on a unix socket with the default [`ServeConfig`].
pub fn serve_unix(agent: Agent, path: &Path) -> Result<tokio::task::JoinHandle<()>, ApiError> {
    serve_unix_with(agent, path, ServeConfig::default())
}

/// Serves the API on TCP with the default [`ServeConfig`].
pub async fn serve_tcp(
    agent: Agent,
    addr: &str,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>), ApiError> {
    serve_tcp_with(agent, addr, ServeConfig::default()).await
}

/// Serves the API on a unix socket (a stale socket file is replaced; the
/// socket is made owner-only, the API being unauthenticated), with `cfg`.
pub fn serve_unix_with(
    agent: Agent,
    path: &Path,
    cfg: ServeConfig,
) -> Result<tokio::task::JoinHandle<()>, ApiError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    let err = |source| ApiError::Listen {
        addr: path.display().to_string(),
        source,
    };
    let l = tokio::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    let app = router(agent);
    Ok(tokio::spawn(accept_loop("unix", l, app, cfg)))
}

/// Serves the API on TCP (unauthenticated: bind to a trusted address).
pub async fn serve_tcp_with(
    agent: Agent,
    addr: &str,
    cfg: ServeConfig,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>), ApiError> {
    let err = |source| ApiError::Listen {
        addr: addr.into(),
        source,
    };
    let l = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    let app = router(agent);
    Ok((local, tokio::spawn(accept_loop("tcp", l, app, cfg))))
}
