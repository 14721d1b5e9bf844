//! The agent's own REST client ([`agent::api::client::ApiClient`]) for
//! synchronous drivers: one current-thread runtime per client.

use std::path::Path;

use agent::api::client::{ApiClient, ClientError};

use super::HarnessError;

/// A blocking client bound to one agent socket.
pub struct BlockingApi {
    rt: tokio::runtime::Runtime,
    client: ApiClient,
}

impl BlockingApi {
    /// A client for the agent listening on `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Result<Self, HarnessError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(HarnessError::io("starting a runtime for the API client"))?;
        Ok(Self {
            rt,
            client: ApiClient::new(socket),
        })
    }

    /// `GET path` as JSON; `None` when the agent answers 404 (not found).
    pub fn get_json(&self, path: &str) -> Result<Option<serde_json::Value>, ClientError> {
        match self.rt.block_on(self.client.get_json(path)) {
            Ok(v) => Ok(Some(v)),
            Err(ClientError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET path` as text.
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        self.rt
            .block_on(self.client.call(hyper::Method::GET, path, None))
    }
}
