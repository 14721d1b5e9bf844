//! A client for the agent's REST API over its unix socket (the `reddog` CLI).

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Method;

use super::http::{request_unix, HttpError};

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Transport.
    #[error("{0}; is reddog-agent running with this --api-socket?")]
    Http(#[from] HttpError),
    /// The agent refused the request.
    #[error("the agent answered {status}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Its error message.
        message: String,
    },
}

/// A client bound to one socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client for the agent listening on `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_owned(),
            timeout: Duration::from_secs(60),
        }
    }

    /// Sends a request and returns the body (JSON or text).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<String, ClientError> {
        let r = request_unix(&self.socket, method, path, body, self.timeout, 64 << 20).await?;
        let text = String::from_utf8_lossy(&r.body).into_owned();
        if r.status.is_success() {
            Ok(text)
        } else {
            let message = serde_json::from_str::<crate::api::ApiErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or(text);
            Err(ClientError::Api {
                status: r.status.as_u16(),
                message,
            })
        }
    }

    /// GET as JSON.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        let t = self.call(Method::GET, path, None).await?;
        serde_json::from_str(&t).map_err(|e| ClientError::Api {
            status: 200,
            message: format!("not JSON: {e}"),
        })
    }
}
