//! `guest-listener`: a minimal host agent for nested tests. Listens on the
//! unix socket where reddog-vmm delivers guest connections to a host port
//! (`<uds>_<port>`), or with `vsock:<port>` on an `AF_VSOCK` port of the host
//! (where QEMU's vhost-vsock delivers them, for the nested comparison with
//! QEMU as the inner VMM), speaks `guest-proto`, prints one line per frame it
//! receives, and can ask the guest to shut down.
//!
//! `guest-listener <socket>|vsock:<port> [--interval-ms N] [--shutdown-after N] [--deadline-ms D]`
//!
//! - `--interval-ms`: the heartbeat interval in `HelloAck` (default 1000);
//! - `--shutdown-after N`: once the guest sent `Ready` and N heartbeats after
//!   it, send `Shutdown { deadline_ms: D }` (default 5000);
//! - exits when a connection ends after the shutdown was sent.

// The AF_VSOCK listener needs raw socket calls.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;

use guest_proto::{
    Decoded, ExitStatus, Frame, GuestMsg, HelloAck, HostMsg, Shutdown, StreamDecoder,
    MAX_FRAME_LEN, PROTOCOL_VERSION,
};

struct Opts {
    socket: String,
    interval_ms: u32,
    shutdown_after: Option<u32>,
    deadline_ms: u32,
}

fn parse() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let socket = args.next().ok_or(
        "usage: guest-listener <socket> [--interval-ms N] [--shutdown-after N] [--deadline-ms D]",
    )?;
    let mut o = Opts {
        socket,
        interval_ms: 1000,
        shutdown_after: None,
        deadline_ms: 5000,
    };
    while let Some(flag) = args.next() {
        let v: u32 = args
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or(format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--interval-ms" => o.interval_ms = v,
            "--shutdown-after" => o.shutdown_after = Some(v),
            "--deadline-ms" => o.deadline_ms = v,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(o)
}

fn out(line: &str) {
    let mut s = std::io::stdout().lock();
    let _ = writeln!(s, "{line}");
    let _ = s.flush();
}

fn send(s: &mut impl Write, msg: HostMsg, version: u8) -> Result<(), String> {
    let mut buf = [0u8; MAX_FRAME_LEN];
    let n = msg.encode(version, &mut buf).map_err(|e| e.to_string())?;
    s.write_all(&buf[..n]).map_err(|e| format!("write: {e}"))
}

/// Serves one connection; returns whether a shutdown was sent on it.
fn serve(mut s: impl Read + Write, o: &Opts, conn: u32) -> Result<bool, String> {
    let mut dec = StreamDecoder::new();
    let mut version = PROTOCOL_VERSION;
    let mut ready = false;
    let mut beats_since_ready = 0u32;
    let mut shutdown_sent = false;
    loop {
        loop {
            let mut reply = None;
            match dec.next_frame::<GuestMsg>() {
                Decoded::NeedMore { .. } => break,
                Decoded::Frame {
                    frame: Frame::Known { msg, .. },
                    ..
                } => match msg {
                    GuestMsg::Hello(h) => {
                        let v = h.negotiate().unwrap_or(0);
                        let id: String = h.boot_id.iter().map(|b| format!("{b:02x}")).collect();
                        out(&format!(
                            "conn={conn} hello version={v} boot_id={id} caps={:#x} agent={:?}",
                            h.capabilities.bits(),
                            h.agent_version
                        ));
                        version = v.max(1);
                        reply = Some(HostMsg::HelloAck(HelloAck {
                            version: v,
                            heartbeat_interval_ms: o.interval_ms,
                        }));
                    }
                    GuestMsg::Heartbeat(hb) => {
                        out(&format!(
                            "conn={conn} heartbeat seq={} uptime_ms={} state={:?} restarts={} free_kib={}",
                            hb.seq, hb.uptime_ms, hb.role_state, hb.role_restarts, hb.free_mem_kib
                        ));
                        if ready {
                            beats_since_ready += 1;
                        }
                    }
                    GuestMsg::RoleStarted(r) => {
                        out(&format!("conn={conn} role-started pid={}", r.pid))
                    }
                    GuestMsg::RoleExited(r) => {
                        let how = match r.status {
                            ExitStatus::Code(c) => format!("code={c}"),
                            ExitStatus::Signal(sig) => format!("signal={sig}"),
                        };
                        out(&format!("conn={conn} role-exited pid={} {how}", r.pid));
                    }
                    GuestMsg::Ready => {
                        ready = true;
                        out(&format!("conn={conn} ready"));
                    }
                    GuestMsg::Log(l) => out(&format!(
                        "conn={conn} log {:?} {:?} {}",
                        l.level,
                        l.source,
                        String::from_utf8_lossy(l.line).escape_debug()
                    )),
                    GuestMsg::Pong(p) => out(&format!("conn={conn} pong {}", p.nonce)),
                },
                Decoded::Frame { frame, .. } => out(&format!("conn={conn} unknown {frame:?}")),
                Decoded::Error { error, recovery } => {
                    out(&format!("conn={conn} bad-frame {error}"));
                    if recovery.lost_sync() {
                        return Ok(shutdown_sent);
                    }
                }
            }
            if let Some(msg) = reply {
                send(&mut s, msg, version)?;
            }
            if let Some(n) = o.shutdown_after {
                if ready && beats_since_ready >= n && !shutdown_sent {
                    send(
                        &mut s,
                        HostMsg::Shutdown(Shutdown {
                            deadline_ms: o.deadline_ms,
                        }),
                        version,
                    )?;
                    shutdown_sent = true;
                    out(&format!(
                        "conn={conn} sent shutdown deadline_ms={}",
                        o.deadline_ms
                    ));
                }
            }
        }
        match s.read(dec.spare_mut()) {
            Ok(0) => {
                out(&format!("conn={conn} closed"));
                return Ok(shutdown_sent);
            }
            Ok(n) => dec.commit(n),
            Err(e) => {
                out(&format!("conn={conn} read error {e}"));
                return Ok(shutdown_sent);
            }
        }
    }
}

/// A listening `AF_VSOCK` socket on `port` of any CID.
fn vsock_listen(port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: `addr` is a valid sockaddr_vm and the length is its size.
    let r = unsafe {
        libc::bind(
            raw,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: listen(2) on our own descriptor.
    if r < 0 || unsafe { libc::listen(raw, 4) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Serves connections accepted on `l` until one ends after its shutdown.
fn serve_vsock(l: &OwnedFd, o: &Opts) {
    let raw = std::os::fd::AsRawFd::as_raw_fd(l);
    let mut conn = 0;
    loop {
        // SAFETY: accept(2) on our listening descriptor, no address wanted.
        let fd = unsafe {
            libc::accept4(
                raw,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            out(&format!("accept error {e}"));
            return;
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let s = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        conn += 1;
        match serve(s, o, conn) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => out(&format!("conn={conn} error {e}")),
        }
    }
}

fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("guest-listener: {e}");
            std::process::exit(2);
        }
    };
    if let Some(port) = o.socket.strip_prefix("vsock:") {
        let Ok(port) = port.parse() else {
            eprintln!("guest-listener: bad vsock port {port}");
            std::process::exit(2);
        };
        match vsock_listen(port) {
            Ok(l) => {
                out(&format!("listening on vsock port {port}"));
                serve_vsock(&l, &o);
            }
            Err(e) => {
                eprintln!("guest-listener: vsock port {port}: {e} (is vhost_vsock loaded?)");
                std::process::exit(1);
            }
        }
        return;
    }
    let _ = std::fs::remove_file(&o.socket);
    let l = match UnixListener::bind(&o.socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("guest-listener: bind {}: {e}", o.socket);
            std::process::exit(1);
        }
    };
    out(&format!("listening on {}", o.socket));
    let mut conn = 0;
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        conn += 1;
        match serve(s, &o, conn) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => out(&format!("conn={conn} error {e}")),
        }
    }
}
