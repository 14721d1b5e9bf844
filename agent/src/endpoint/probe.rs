//! The HTTP/1.1 GET probe the host sends to an instance's endpoint port.
//!
//! The instance is hostile: the whole exchange has one timeout, the response
//! head is read into a small buffer (a longer head fails the probe) and the
//! body is never read: the status decides.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The most of a response head a probe reads (hyper's smallest buffer).
pub const MAX_HEAD_BYTES: usize = 8192;

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The TCP connection failed.
    #[error("cannot connect to {addr}: {why}; is the instance's server listening on that port?")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        why: String,
    },
    /// No answer within the probe's timeout.
    #[error("no answer from {addr} within {timeout_ms} ms; make the probe path answer faster or raise timeout_ms")]
    Timeout {
        /// Where.
        addr: SocketAddr,
        /// The timeout.
        timeout_ms: u64,
    },
    /// Not an HTTP/1 answer, or a head over [`MAX_HEAD_BYTES`].
    #[error("bad HTTP answer from {addr}: {why}; the probe needs an HTTP/1.1 response")]
    Protocol {
        /// Where.
        addr: SocketAddr,
        /// What was wrong.
        why: String,
    },
    /// An answer outside 2xx and 3xx.
    #[error(
        "{addr} answered the probe with status {status}; the probe path must answer 2xx or 3xx"
    )]
    Status {
        /// Where.
        addr: SocketAddr,
        /// The status.
        status: u16,
    },
}

/// GETs `path` from `addr`; `Ok(status)` for a 2xx or 3xx answer within
/// `timeout`. `path` is a validated probe path ([`super::spec::ProbeSpec`]).
pub async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<u16, ProbeError> {
    match tokio::time::timeout(timeout, exchange(addr, path)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout {
            addr,
            timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
        }),
    }
}

async fn exchange(addr: SocketAddr, path: &str) -> Result<u16, ProbeError> {
    let proto = |why: String| ProbeError::Protocol { addr, why };
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| ProbeError::Connect {
            addr,
            why: e.to_string(),
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD_BYTES)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| proto(e.to_string()))?;
    // Dropped with this future (on timeout too): the connection goes with it.
    let conn = async move {
        let _ = conn.await;
    };
    let req = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "reddog-probe")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| proto(e.to_string()))?;
    let answer = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| proto(e.to_string()))?;
        let status = resp.status();
        // The body is dropped unread.
        if status.is_success() || status.is_redirection() {
            Ok(status.as_u16())
        } else {
            Err(ProbeError::Status {
                addr,
                status: status.as_u16(),
            })
        }
    };
    tokio::pin!(answer, conn);
    tokio::select! {
        r = &mut answer => r,
        // The connection ended (an answer may have come just before): the
        // sender now has the answer or the reason there is none.
        () = &mut conn => answer.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-connection server on 127.0.0.1 that reads the request head,
    /// then writes `answer` (or hangs when `None`). Returns its address and
    /// the request it read.
    async fn server(answer: Option<Vec<u8>>) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind on loopback");
        let addr = l.local_addr().expect("its address");
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.expect("read the request");
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            match answer {
                Some(a) => {
                    let _ = s.write_all(&a).await;
                    let _ = s.shutdown().await;
                }
                None => tokio::time::sleep(Duration::from_secs(30)).await,
            }
            req
        });
        (addr, task)
    }

    const T: Duration = Duration::from_millis(500);

    #[tokio::test]
    async fn a_200_passes_and_the_request_is_a_plain_get() {
        let (addr, task) = server(Some(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        ))
        .await;
        assert_eq!(probe(addr, "/health?x=1", T).await, Ok(200));
        let req = String::from_utf8(task.await.expect("the server")).expect("an ASCII request");
        assert!(req.starts_with("GET /health?x=1 HTTP/1.1\r\n"), "{req}");
        assert!(
            req.to_ascii_lowercase().contains(&format!("host: {addr}")),
            "{req}"
        );
    }

    #[tokio::test]
    async fn a_redirect_passes() {
        let (addr, _t) = server(Some(
            b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ))
        .await;
        assert_eq!(probe(addr, "/", T).await, Ok(302));
    }

    #[tokio::test]
    async fn a_500_fails() {
        let (addr, _t) = server(Some(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ))
        .await;
        assert_eq!(
            probe(addr, "/", T).await,
            Err(ProbeError::Status { addr, status: 500 })
        );
    }

    #[tokio::test]
    async fn a_hang_fails_at_the_timeout() {
        let (addr, _t) = server(None).await;
        let start = std::time::Instant::now();
        let r = probe(addr, "/", Duration::from_millis(200)).await;
        let took = start.elapsed();
        assert!(
            matches!(
                r,
                Err(ProbeError::Timeout {
                    timeout_ms: 200,
                    ..
                })
            ),
            "{r:?}"
        );
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn garbage_fails() {
        let (addr, _t) = server(Some(b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec())).await;
        assert!(matches!(
            probe(addr, "/", T).await,
            Err(ProbeError::Protocol { .. })
        ));
    }

    #[tokio::test]
    async fn a_close_without_answer_fails() {
        let (addr, _t) = server(Some(Vec::new())).await;
        assert!(matches!(
            probe(addr, "/", T).await,
            Err(ProbeError::Protocol { .. })
        ));
    }

    #[tokio::test]
    async fn a_closed_port_fails_to_connect() {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind on loopback");
        let addr = l.local_addr().expect("its address");
        drop(l);
        assert!(matches!(
            probe(addr, "/", T).await,
            Err(ProbeError::Connect { .. })
        ));
    }

    #[tokio::test]
    async fn a_huge_head_fails_without_being_read_whole() {
        let mut answer = b"HTTP/1.1 200 OK\r\nX-Junk: ".to_vec();
        answer.extend(std::iter::repeat_n(b'a', 1 << 20));
        answer.extend_from_slice(b"\r\n\r\n");
        let (addr, _t) = server(Some(answer)).await;
        assert!(matches!(
            probe(addr, "/", T).await,
            Err(ProbeError::Protocol { .. })
        ));
    }

    #[tokio::test]
    async fn a_huge_body_is_not_read() {
        // Claims a 1 GiB body and sends some of it, then hangs: the probe
        // passes on the status without waiting for the body.
        let mut answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n".to_vec();
        answer.extend(std::iter::repeat_n(b'a', 64 * 1024));
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind on loopback");
        let addr = l.local_addr().expect("its address");
        let _t = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(&answer).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        assert_eq!(probe(addr, "/", T).await, Ok(200));
    }
}
