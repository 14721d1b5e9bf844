//! A minimal HTTP/1.1 client (hyper) over TCP or a unix socket: the upstream
//! pusher, image downloads and the `reddog` CLI use it. Plain `http://` only.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// HTTP client errors.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// A URL the client cannot use.
    #[error("bad URL {0:?}: use http://HOST[:PORT]/PATH")]
    Url(String),
    /// Could not connect.
    #[error("cannot connect to {addr}: {source}; is the server running?")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("HTTP exchange with {addr} failed: {why}")]
    Exchange {
        /// Where.
        addr: String,
        /// What went wrong.
        why: String,
    },
    /// No answer in time.
    #[error("no answer from {0} in time")]
    Timeout(String),
    /// The response body is larger than allowed.
    #[error("the response from {0} is too large")]
    TooLarge(String),
}

/// A parsed `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `host:port` to connect to.
    pub addr: String,
    /// The `Host` header.
    pub host: String,
    /// Path and query.
    pub path: String,
}

impl HttpUrl {
    /// Parses `http://host[:port][/path]`.
    pub fn parse(s: &str) -> Result<Self, HttpError> {
        let uri: hyper::Uri = s.parse().map_err(|_| HttpError::Url(s.into()))?;
        if uri.scheme_str() != Some("http") {
            return Err(HttpError::Url(s.into()));
        }
        let auth = uri.authority().ok_or_else(|| HttpError::Url(s.into()))?;
        let port = auth.port_u16().unwrap_or(80);
        Ok(Self {
            addr: format!("{}:{port}", auth.host()),
            host: auth.as_str().to_string(),
            path: uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()),
        })
    }
}

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status.
    pub status: StatusCode,
    /// Body.
    pub body: Bytes,
}

/// An HTTP/1 connection over `io`: the request sender, and the task that
/// drives the connection (abort it when done).
async fn handshake<S>(
    io: S,
    addr: &str,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        tokio::task::JoinHandle<()>,
    ),
    HttpError,
>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| HttpError::Exchange {
            addr: addr.into(),
            why: e.to_string(),
        })?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, task))
}

async fn exchange<S>(
    io: S,
    addr: &str,
    req: Request<Full<Bytes>>,
    max_body: usize,
) -> Result<Response, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ex = |why: String| HttpError::Exchange {
        addr: addr.into(),
        why,
    };
    let (mut sender, conn_task) = handshake(io, addr).await?;
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ex(e.to_string()))?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ex(e.to_string()))?;
            if let Some(d) = frame.data_ref() {
                if buf.len() + d.len() > max_body {
                    return Err(HttpError::TooLarge(addr.into()));
                }
                buf.extend_from_slice(d);
            }
        }
        Ok(Response {
            status,
            body: buf.into(),
        })
    }
    .await;
    conn_task.abort();
    result
}

fn build(
    method: Method,
    host: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Request<Full<Bytes>>, HttpError> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host);
    if body.is_some() {
        b = b.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    b.body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| HttpError::Url(format!("{path}: {e}")))
}

/// One request over TCP.
pub async fn request_url(
    method: Method,
    url: &HttpUrl,
    body: Option<Vec<u8>>,
    timeout: Duration,
    max_body: usize,
) -> Result<Response, HttpError> {
    let fut = async {
        let s = tokio::net::TcpStream::connect(&url.addr)
            .await
            .map_err(|source| HttpError::Connect {
                addr: url.addr.clone(),
                source,
            })?;
        let req = build(method, &url.host, &url.path, body)?;
        exchange(s, &url.addr, req, max_body).await
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| HttpError::Timeout(url.addr.clone()))?
}

/// One request over a unix socket.
pub async fn request_unix(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
    max_body: usize,
) -> Result<Response, HttpError> {
    let addr = socket.display().to_string();
    let fut = async {
        let s = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|source| HttpError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let req = build(method, "localhost", path, body)?;
        exchange(s, &addr, req, max_body).await
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| HttpError::Timeout(addr.clone()))?
}

/// Streams a GET's body into `sink` (for large downloads); returns the status.
pub async fn download(
    url: &HttpUrl,
    timeout: Duration,
    sink: impl FnMut(&[u8]) -> Result<(), String> + Send,
) -> Result<StatusCode, HttpError> {
    download_with_length(url, timeout, |_| {}, sink).await
}

/// [`download`], telling `on_length` the body's announced length (the
/// `Content-Length` header, if any) before the first chunk.
pub async fn download_with_length(
    url: &HttpUrl,
    timeout: Duration,
    on_length: impl FnOnce(Option<u64>) + Send,
    mut sink: impl FnMut(&[u8]) -> Result<(), String> + Send,
) -> Result<StatusCode, HttpError> {
    let ex = |why: String| HttpError::Exchange {
        addr: url.addr.clone(),
        why,
    };
    let s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&url.addr))
        .await
        .map_err(|_| HttpError::Timeout(url.addr.clone()))?
        .map_err(|source| HttpError::Connect {
            addr: url.addr.clone(),
            source,
        })?;
    let (mut sender, conn_task) = handshake(s, &url.addr).await?;
    let result = async {
        let req = build(Method::GET, &url.host, &url.path, None)?;
        let resp = tokio::time::timeout(timeout, sender.send_request(req))
            .await
            .map_err(|_| HttpError::Timeout(url.addr.clone()))?
            .map_err(|e| ex(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            return Ok(status);
        }
        on_length(
            resp.headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        );
        let mut body = resp.into_body();
        loop {
            // The timeout is per read: a stalled server fails, a slow big
            // download does not.
            let next = tokio::time::timeout(timeout, body.frame())
                .await
                .map_err(|_| HttpError::Timeout(url.addr.clone()))?;
            let Some(frame) = next else { break };
            let frame = frame.map_err(|e| ex(e.to_string()))?;
            if let Some(d) = frame.data_ref() {
                sink(d).map_err(ex)?;
            }
        }
        Ok(status)
    }
    .await;
    conn_task.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = HttpUrl::parse("http://127.0.0.1:8080/v1/nodes?x=1").expect("url");
        assert_eq!(u.addr, "127.0.0.1:8080");
        assert_eq!(u.path, "/v1/nodes?x=1");
        let u = HttpUrl::parse("http://ctl").expect("url");
        assert_eq!((u.addr.as_str(), u.path.as_str()), ("ctl:80", "/"));
        for bad in ["https://x/", "ftp://x", "x", ""] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
