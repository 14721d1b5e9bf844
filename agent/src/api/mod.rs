//! The agent's REST API: the server ([`server`], axum), a client of it over
//! the unix socket ([`client`]), and the small HTTP/1.1 helpers both and the
//! upstream pusher use ([`http`]). The contract is `docs/openapi.yaml`.

pub mod client;
pub mod http;
pub mod server;

pub use client::{ApiClient, ClientError};
pub use server::{
    router, serve_tcp_with, serve_unix, serve_unix_with, ApiError, ApiErrorBody, ImportRequest,
    ServeConfig, TcpSecurity, UnixAccess, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    MAX_BODY, ROUTES,
};
