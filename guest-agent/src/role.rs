//! Starting the role process and checking whether it is ready.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_proto::{ExitStatus, LogLevel, LogSource, MAX_LOG_LINE_LEN};

use crate::link::{Outbox, Report};
use crate::manifest::{Manifest, Readiness};
use crate::probe::say;

/// `PATH` for the role.
pub const ROLE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Starts the role: its own process group, the manifest's user and group (no
/// supplementary groups), a clean environment, stdin from `/dev/null`,
/// stdout/stderr forwarded line by line as `Log` frames (and, rate-limited, to
/// the console). Returns its pid.
pub fn spawn(m: &Manifest, outbox: &Arc<Outbox>) -> std::io::Result<u32> {
    let mut cmd = Command::new(&m.program);
    cmd.args(&m.args)
        .env_clear()
        .env("PATH", ROLE_PATH)
        .env("HOME", &m.home)
        .env("USER", &m.user)
        .env("LOGNAME", &m.user)
        .envs(&m.env)
        .current_dir(&m.working_dir)
        .uid(m.uid)
        .gid(m.gid)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let pid = child.id();
    if let Some(out) = child.stdout.take() {
        pump(out, LogSource::RoleStdout, "role-stdout", outbox.clone());
    }
    if let Some(err) = child.stderr.take() {
        pump(err, LogSource::RoleStderr, "role-stderr", outbox.clone());
    }
    // The child is reaped by the supervisor's waitpid loop, not through `child`.
    drop(child);
    Ok(pid)
}

/// Forwards `src` line by line (lines split at `MAX_LOG_LINE_LEN` bytes). The
/// console gets at most 20 lines a second per stream, the host all of them
/// (subject to the outbox's limits).
fn pump<R: Read + Send + 'static>(
    src: R,
    source: LogSource,
    name: &'static str,
    outbox: Arc<Outbox>,
) {
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut r = BufReader::with_capacity(MAX_LOG_LINE_LEN, src);
            let mut window = Instant::now();
            let mut echoed = 0u32;
            let mut line = Vec::with_capacity(MAX_LOG_LINE_LEN);
            loop {
                line.clear();
                match (&mut r)
                    .take(MAX_LOG_LINE_LEN as u64)
                    .read_until(b'\n', &mut line)
                {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    line.pop();
                }
                if window.elapsed() >= Duration::from_secs(1) {
                    window = Instant::now();
                    echoed = 0;
                }
                if echoed < 20 {
                    echoed += 1;
                    say(&format!(
                        "{name}: {}",
                        String::from_utf8_lossy(&line).escape_debug()
                    ));
                }
                let level = if source == LogSource::RoleStderr {
                    LogLevel::Warn
                } else {
                    LogLevel::Info
                };
                outbox.push(Report::Log(level, source, line.clone()));
            }
        });
    if let Err(e) = spawned {
        say(&format!("cannot forward the role's {name}: {e}"));
    }
}

/// A raw `waitpid` status as the protocol's exit status.
pub fn exit_status(raw: i32) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    let s = std::process::ExitStatus::from_raw(raw);
    match (s.code(), s.signal()) {
        (Some(c), _) => ExitStatus::Code(c),
        (None, Some(sig)) => ExitStatus::Signal(sig),
        (None, None) => ExitStatus::Code(-1),
    }
}

/// Whether an exit counts as a failure (for `on-failure`).
pub fn is_failure(s: ExitStatus) -> bool {
    !matches!(s, ExitStatus::Code(0))
}

/// One readiness (or liveness) attempt. `timeout` bounds the whole attempt
/// (connect, request and status line together), not each step, so a server
/// that accepts and then answers slowly, or byte by byte, still fails in time.
pub fn check_ready(r: &Readiness, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let ms = timeout.as_millis();
    // What is left of the budget; never zero (zero means "no timeout" to the socket calls).
    let left = || {
        let d = deadline.saturating_duration_since(Instant::now());
        if d.is_zero() {
            Err(format!("no answer within {ms} ms"))
        } else {
            Ok(d)
        }
    };
    let port = match r {
        Readiness::Tcp { port } | Readiness::Http { port, .. } => *port,
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s =
        TcpStream::connect_timeout(&addr, left()?).map_err(|e| format!("connect {addr}: {e}"))?;
    let Readiness::Http { path, .. } = r else {
        return Ok(());
    };
    let timed_out = |what: &str, e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            format!("GET {path}: no answer within {ms} ms")
        } else {
            format!("GET {path}: {what}: {e}")
        }
    };
    s.set_write_timeout(Some(left()?))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: reddog-guest\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .map_err(|e| timed_out("send", e))?;
    // The status line: up to the first newline, within the first 1024 bytes.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        s.set_read_timeout(Some(left().map_err(|e| format!("GET {path}: {e}"))?))
            .map_err(|e| e.to_string())?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timed_out("read", e)),
        }
    }
    let line_end = head.iter().position(|b| *b == b'\n').unwrap_or(head.len());
    let status = String::from_utf8_lossy(&head[..line_end.min(1024)]);
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|_| status.starts_with("HTTP/"))
        .ok_or_else(|| format!("not an HTTP status line: {:?}", status.trim_end()))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("GET {path} answered {code}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(answer: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                // Read the whole request, or closing would reset the connection.
                let mut req = Vec::new();
                let mut buf = [0u8; 512];
                while !req.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer.as_bytes());
            }
        });
        port
    }

    #[test]
    fn http_readiness() {
        let port = serve_once("HTTP/1.0 200 OK\r\n\r\nhi");
        let r = Readiness::Http {
            port,
            path: "/".into(),
        };
        check_ready(&r, Duration::from_secs(2)).expect("ready");
        let port = serve_once("HTTP/1.0 503 Busy\r\n\r\n");
        let r = Readiness::Http {
            port,
            path: "/".into(),
        };
        assert!(check_ready(&r, Duration::from_secs(2))
            .expect_err("503")
            .contains("503"));
        let port = serve_once("SSH-2.0\r\n");
        let r = Readiness::Http {
            port,
            path: "/".into(),
        };
        assert!(check_ready(&r, Duration::from_secs(2)).is_err());
    }

    #[test]
    fn tcp_readiness() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        check_ready(&Readiness::Tcp { port }, Duration::from_secs(1)).expect("listening");
        drop(l);
        assert!(check_ready(&Readiness::Tcp { port }, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn the_timeout_bounds_the_whole_attempt() {
        // Accepts, then never answers.
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let r = Readiness::Http {
            port,
            path: "/".into(),
        };
        let t = Instant::now();
        let e = check_ready(&r, Duration::from_millis(150)).expect_err("silent");
        assert!(e.contains("no answer within 150 ms"), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(600),
            "{:?}",
            t.elapsed()
        );
        // Answers one byte every 50 ms: each read is quick, the whole is not.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = l.local_addr().expect("addr").port();
            std::thread::spawn(move || {
                if let Ok((mut s, _)) = l.accept() {
                    for b in b"HTTP/1.0 200 OK\r\n".iter().cycle().take(100) {
                        if s.write_all(&[*b]).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            });
            port
        };
        let r = Readiness::Http {
            port,
            path: "/".into(),
        };
        let t = Instant::now();
        let e = check_ready(&r, Duration::from_millis(200)).expect_err("trickle");
        assert!(e.contains("no answer within 200 ms"), "{e}");
        assert!(
            t.elapsed() < Duration::from_millis(700),
            "{:?}",
            t.elapsed()
        );
        drop(l);
    }

    #[test]
    fn statuses() {
        assert_eq!(exit_status(0), ExitStatus::Code(0));
        assert_eq!(exit_status(3 << 8), ExitStatus::Code(3));
        assert_eq!(exit_status(9), ExitStatus::Signal(9));
        assert!(!is_failure(ExitStatus::Code(0)));
        assert!(is_failure(ExitStatus::Signal(15)));
    }
}
