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
        _ => return error(StatusCode::BAD_REQUEST, "give exactly one of path and url"),
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

/// Serves the API on a unix socket (a stale socket file is replaced; the
/// socket is made owner-only, the API being unauthenticated).
pub fn serve_unix(agent: Agent, path: &Path) -> Result<tokio::task::JoinHandle<()>, ApiError> {
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
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(l, app).await {
            tracing::error!("API server (unix) failed: {e}");
        }
    }))
}

/// Serves the API on TCP (unauthenticated: bind to a trusted address).
pub async fn serve_tcp(
    agent: Agent,
    addr: &str,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>), ApiError> {
    let err = |source| ApiError::Listen {
        addr: addr.into(),
        source,
    };
    let l = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    let app = router(agent);
    Ok((
        local,
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                tracing::error!("API server (tcp) failed: {e}");
            }
        }),
    ))
}
