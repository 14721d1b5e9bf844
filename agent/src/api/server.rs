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
    /// A TCP listener without TLS or without client authentication.
    #[error("refusing to serve the API on TCP {addr} {why}: give a server certificate and key (--tls-cert, --tls-key) and client authentication, client certificates from a CA (--tls-client-ca) or a bearer token (--api-token-file), or serve the unix socket only")]
    Unauthenticated {
        /// Where.
        addr: String,
        /// What is missing.
        why: &'static str,
    },
    /// A TLS or token file is unusable.
    #[error("{what} {path}: {why}")]
    Credentials {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Who may use the unix socket. Root and the daemon's own uid always may
/// (root can read the state directory and the agent's memory anyway); a peer
/// is also let in when its uid is in `uids` or its gid (the effective gid
/// `SO_PEERCRED` reports; supplementary groups are not seen) is in `gids`.
/// Everyone else gets `403 Forbidden`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixAccess {
    /// More uids let in.
    pub uids: Vec<u32>,
    /// Gids whose peers are let in.
    pub gids: Vec<u32>,
    /// The socket file's group: with one the socket is mode 0660 and owned
    /// by it (so its members can connect at all), without one it is 0600.
    pub group: Option<u32>,
}

impl UnixAccess {
    /// Whether a peer with `uid` and `gid` may use the API.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == 0
            || uid == rustix::process::geteuid().as_raw()
            || self.uids.contains(&uid)
            || self.gids.contains(&gid)
    }
}

/// How the API's listeners treat connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// Most connections served at once, per listener; one beyond it is
    /// accepted and closed at once. Never more than a quarter of the
    /// process's open-file limit (see [`effective_max_connections`]).
    pub max_connections: usize,
    /// A connection whose request head (request line and headers) has not
    /// arrived this long after the server started waiting for it (a new or
    /// an idle keep-alive connection) is closed. On TCP the TLS handshake
    /// must finish within it too.
    pub header_read_timeout: std::time::Duration,
    /// Who may use the unix socket.
    pub unix_access: UnixAccess,
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
            unix_access: UnixAccess::default(),
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

/// What a connection may do once established.
enum Admission {
    /// Everything (a unix peer on the allow-list, a TLS client with a
    /// certificate from the CA).
    Full,
    /// Each request must carry the bearer token.
    TokenPerRequest,
    /// Nothing: every request is answered 403 with this message.
    Refused(String),
}

/// A listener the accept loop can take connections from.
trait Accept: Send + Sync + 'static {
    type Raw: Send + 'static;
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_raw(&self) -> impl std::future::Future<Output = std::io::Result<Self::Raw>> + Send;
    /// Per connection, in its own task, within the header read timeout:
    /// the TLS handshake, the peer check.
    fn establish(
        &self,
        raw: Self::Raw,
    ) -> impl std::future::Future<Output = Result<(Self::Io, Admission), String>> + Send;
}

/// Logs a refused unix peer, at most once a second (a local user must not
/// be able to flood the log), with how many were not logged meanwhile.
#[derive(Default)]
struct RefusalLog {
    last: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl RefusalLog {
    fn refused(&self, msg: &str) {
        let mut g = crate::util::lock(&self.last);
        let now = std::time::Instant::now();
        match &mut *g {
            Some((t, n)) if now.duration_since(*t) < std::time::Duration::from_secs(1) => *n += 1,
            other => {
                let suppressed = other.map_or(0, |(_, n)| n);
                tracing::warn!(suppressed, "API (unix): {msg}");
                *other = Some((now, 0));
            }
        }
    }
}

struct UnixServe {
    l: tokio::net::UnixListener,
    access: UnixAccess,
    log: RefusalLog,
}

impl Accept for UnixServe {
    type Raw = tokio::net::UnixStream;
    type Io = tokio::net::UnixStream;
    async fn accept_raw(&self) -> std::io::Result<Self::Raw> {
        Ok(self.l.accept().await?.0)
    }
    async fn establish(&self, s: Self::Raw) -> Result<(Self::Io, Admission), String> {
        let cred = s
            .peer_cred()
            .map_err(|e| format!("SO_PEERCRED of a peer: {e}"))?;
        let (uid, gid) = (cred.uid(), cred.gid());
        if self.access.allows(uid, gid) {
            return Ok((s, Admission::Full));
        }
        let pid = cred.pid().map_or_else(|| "?".into(), |p| p.to_string());
        let msg = format!(
            "peer uid {uid} gid {gid} (pid {pid}) is not allowed to use the agent's API; \
             allow it with reddog-agent --api-allow-uid {uid} or --api-allow-gid {gid}"
        );
        self.log.refused(&msg);
        Ok((s, Admission::Refused(msg)))
    }
}

struct TcpServe {
    l: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    /// Client certificates are checked by rustls during the handshake;
    /// `optional_certs`: a client without one must send the token instead.
    optional_certs: bool,
    token_only: bool,
}

impl Accept for TcpServe {
    type Raw = tokio::net::TcpStream;
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    async fn accept_raw(&self) -> std::io::Result<Self::Raw> {
        let (s, _) = self.l.accept().await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
    async fn establish(&self, s: Self::Raw) -> Result<(Self::Io, Admission), String> {
        let tls = self
            .tls
            .accept(s)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let has_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .is_some_and(|c| !c.is_empty());
        let adm = if self.token_only || (self.optional_certs && !has_cert) {
            Admission::TokenPerRequest
        } else {
            Admission::Full
        };
        Ok((tls, adm))
    }
}

/// Serves `app` on `l` until the task is dropped: at most
/// `cfg.max_connections` at once (more are closed at once), each
/// established (handshake, peer check) and its request heads read within
/// the header read timeout. An accept error (`EMFILE`, `ENFILE`, ...) is
/// logged once per run of errors and waited out; it never ends the loop.
async fn accept_loop<L: Accept>(
    kind: &'static str,
    l: L,
    app: Router,
    token: Option<Token>,
    cfg: ServeConfig,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let max = effective_max_connections(cfg.max_connections);
    if max < cfg.max_connections {
        tracing::warn!(
            "API ({kind}): at most {max} connections (a quarter of the open-file limit), \
             not {}",
            cfg.max_connections
        );
    }
    let l = std::sync::Arc::new(l);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max));
    let full = app.clone();
    let with_token =
        token.map(|t| app.layer(axum::middleware::from_fn_with_state(t, require_token)));
    let mut failing = false;
    let mut refused_logged = false;
    loop {
        let raw = match l.accept_raw().await {
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
            drop(raw);
            continue;
        };
        refused_logged = false;
        let (l, full, with_token) = (l.clone(), full.clone(), with_token.clone());
        let timeout = cfg.header_read_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let (io, adm) = match tokio::time::timeout(timeout, l.establish(raw)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    tracing::debug!("API ({kind}) connection: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!("API ({kind}) connection: not established within {timeout:?}");
                    return;
                }
            };
            let app = match adm {
                Admission::Full => full,
                Admission::TokenPerRequest => match with_token {
                    Some(a) => a,
                    None => refuse_all("a client certificate is required".into()),
                },
                Admission::Refused(msg) => refuse_all(msg),
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(io), service);
            if let Err(e) = conn.await {
                tracing::debug!("API ({kind}) connection: {e}");
            }
        });
    }
}

/// A router answering every request `403 Forbidden` with `msg`.
fn refuse_all(msg: String) -> Router {
    Router::new().fallback(move || {
        let msg = msg.clone();
        async move { error(StatusCode::FORBIDDEN, msg) }
    })
}

/// A bearer token (compared in constant time).
#[derive(Clone)]
struct Token(std::sync::Arc<Vec<u8>>);

impl Token {
    fn matches(&self, given: &[u8]) -> bool {
        let want = self.0.as_slice();
        if given.len() != want.len() {
            return false;
        }
        given
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

async fn require_token(
    State(t): State<Token>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|given| t.matches(given));
    if !ok {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "this listener needs `Authorization: Bearer <token>` (the token in the agent's --api-token-file) or a client certificate",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    next.run(req).await
}

/// How the TCP listener is secured: TLS always, and clients authenticated
/// by a certificate from `client_ca`, by the bearer token in `token_file`,
/// or by either when both are given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpSecurity {
    /// The server's certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// A file holding the bearer token (one line; owner-only, mode 0600 or
    /// stricter).
    pub token_file: Option<PathBuf>,
}

fn cred_err<'a>(what: &'static str, path: &'a Path) -> impl Fn(String) -> ApiError + 'a {
    move |why| ApiError::Credentials {
        what,
        path: path.to_owned(),
        why,
    }
}

/// Reads the bearer token file: owner-only, one non-empty line of at least
/// 16 visible ASCII characters.
fn read_token(path: &Path) -> Result<Token, ApiError> {
    use std::os::unix::fs::PermissionsExt;
    let e = cred_err("API token file", path);
    let m = std::fs::metadata(path).map_err(|x| e(x.to_string()))?;
    if m.permissions().mode() & 0o077 != 0 {
        return Err(e(format!(
            "mode {:o} lets others read it; chmod 600 it",
            m.permissions().mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|x| e(x.to_string()))?;
    let t = text.trim();
    if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(e(
            "the token must be one line of at least 16 visible ASCII characters".into(),
        ));
    }
    Ok(Token(std::sync::Arc::new(t.as_bytes().to_vec())))
}

impl TcpSecurity {
    /// Loads the certificates, key and token; refuses a configuration
    /// without TLS or without client authentication.
    fn load(&self, addr: &str) -> Result<TcpServeParts, ApiError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let unauth = |why| ApiError::Unauthenticated {
            addr: addr.into(),
            why,
        };
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Err(unauth("without TLS"));
        };
        if self.client_ca.is_none() && self.token_file.is_none() {
            return Err(unauth("without client authentication"));
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect())
            .map_err(|x| cred_err("TLS certificate", cert)(x.to_string()))?;
        if chain.is_empty() {
            return Err(cred_err("TLS certificate", cert)(
                "no PEM certificate in it".into(),
            ));
        }
        let key_der = PrivateKeyDer::from_pem_file(key)
            .map_err(|x| cred_err("TLS key", key)(x.to_string()))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|x| cred_err("TLS certificate", cert)(x.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let e = cred_err("TLS client CA", ca);
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).map_err(|x| e(x.to_string()))? {
                    roots
                        .add(c.map_err(|x| e(x.to_string()))?)
                        .map_err(|x| e(x.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(e("no PEM certificate in it".into()));
                }
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    std::sync::Arc::new(roots),
                    provider,
                );
                let v = if self.token_file.is_some() {
                    v.allow_unauthenticated()
                } else {
                    v
                };
                builder.with_client_cert_verifier(v.build().map_err(|x| e(x.to_string()))?)
            }
            None => builder.with_no_client_auth(),
        };
        let mut tls = builder
            .with_single_cert(chain, key_der)
            .map_err(|x| cred_err("TLS key", key)(x.to_string()))?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let token = self.token_file.as_deref().map(read_token).transpose()?;
        Ok(TcpServeParts {
            tls: tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls)),
            optional_certs: self.client_ca.is_some() && token.is_some(),
            token_only: self.client_ca.is_none(),
            token,
        })
    }
}

struct TcpServeParts {
    tls: tokio_rustls::TlsAcceptor,
    optional_certs: bool,
    token_only: bool,
    token: Option<Token>,
}

/// Serves the API on a unix socket with the default [`ServeConfig`].
pub fn serve_unix(agent: Agent, path: &Path) -> Result<tokio::task::JoinHandle<()>, ApiError> {
    serve_unix_with(agent, path, ServeConfig::default())
}

/// Serves the API on a unix socket, with `cfg`. A stale socket file is
/// replaced; the socket is bound under umask 0177 (so it is never wider
/// than 0600, not even for a moment), then given its group and mode 0660
/// when [`UnixAccess::group`] is set; every peer is checked with
/// `SO_PEERCRED` against [`UnixAccess`].
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
    // The umask is the process's: threads creating files meanwhile get
    // stricter modes for that moment, never wider ones.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    rustix::process::umask(old);
    let l = bound.map_err(err)?;
    if let Some(g) = cfg.unix_access.group {
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(g)))
            .map_err(|e| err(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    } else {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    let app = router(agent);
    let serve = UnixServe {
        l,
        access: cfg.unix_access.clone(),
        log: RefusalLog::default(),
    };
    Ok(tokio::spawn(accept_loop("unix", serve, app, None, cfg)))
}

/// Serves the API on TCP behind TLS, clients authenticated as `sec` says;
/// refused ([`ApiError::Unauthenticated`]) without TLS or without client
/// authentication. The header read timeout bounds the TLS handshake too.
pub async fn serve_tcp_with(
    agent: Agent,
    addr: &str,
    cfg: ServeConfig,
    sec: &TcpSecurity,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>), ApiError> {
    let parts = sec.load(addr)?;
    let err = |source| ApiError::Listen {
        addr: addr.into(),
        source,
    };
    let l = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    let app = router(agent);
    let serve = TcpServe {
        l,
        tls: parts.tls,
        optional_certs: parts.optional_certs,
        token_only: parts.token_only,
    };
    Ok((
        local,
        tokio::spawn(accept_loop("tcp", serve, app, parts.token, cfg)),
    ))
}
