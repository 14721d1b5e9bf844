//! A fake host agent for the agent's host-side tests: listens on a unix
//! socket, answers `Hello`, records everything the guest sends, and can send
//! host messages, stall (stop reading) or go away.

#![allow(clippy::unwrap_used, dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_proto::{
    Capabilities, Decoded, ExitStatus, Frame, GuestMsg, Heartbeat, HelloAck, HostMsg,
    StreamDecoder, MAX_FRAME_LEN,
};

/// What the guest sent, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    Hello {
        boot_id: [u8; 16],
        caps: Capabilities,
        version: String,
    },
    Heartbeat(Heartbeat),
    RoleStarted(u32),
    RoleExited(u32, ExitStatus),
    Ready,
    Log(String),
    Pong(u64),
}

pub struct FakeHost {
    pub path: PathBuf,
    interval_ms: u32,
    got: Mutex<Vec<(u32, Instant, Got)>>,
    current: Mutex<Option<UnixStream>>,
    conns: AtomicU32,
    /// Connections with this number (1-based) are never read after the handshake.
    pub stall_conn: AtomicU32,
    dead: AtomicBool,
}

impl FakeHost {
    pub fn start(path: &Path, interval_ms: u32) -> Arc<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        let h = Arc::new(Self {
            path: path.to_owned(),
            interval_ms,
            got: Mutex::new(Vec::new()),
            current: Mutex::new(None),
            conns: AtomicU32::new(0),
            stall_conn: AtomicU32::new(0),
            dead: AtomicBool::new(false),
        });
        let host = h.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                if host.dead.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(s) = s else { continue };
                let n = host.conns.fetch_add(1, Ordering::SeqCst) + 1;
                *host.current.lock().unwrap() = Some(s.try_clone().unwrap());
                let host = host.clone();
                std::thread::spawn(move || host.serve(n, s));
            }
        });
        h
    }

    fn record(&self, n: u32, g: Got) {
        self.got.lock().unwrap().push((n, Instant::now(), g));
    }

    fn serve(&self, n: u32, mut s: UnixStream) {
        let mut dec = StreamDecoder::new();
        let mut acked = false;
        loop {
            loop {
                let g = match dec.next_frame::<GuestMsg>() {
                    Decoded::NeedMore { .. } => break,
                    Decoded::Frame {
                        frame: Frame::Known { msg, .. },
                        ..
                    } => match msg {
                        GuestMsg::Hello(h) => Got::Hello {
                            boot_id: h.boot_id,
                            caps: h.capabilities,
                            version: h.agent_version.to_owned(),
                        },
                        GuestMsg::Heartbeat(hb) => Got::Heartbeat(hb),
                        GuestMsg::RoleStarted(r) => Got::RoleStarted(r.pid),
                        GuestMsg::RoleExited(r) => Got::RoleExited(r.pid, r.status),
                        GuestMsg::Ready => Got::Ready,
                        GuestMsg::Log(l) => Got::Log(String::from_utf8_lossy(l.line).into_owned()),
                        GuestMsg::Pong(p) => Got::Pong(p.nonce),
                    },
                    other => panic!("bad frame from the guest: {other:?}"),
                };
                let hello = matches!(g, Got::Hello { .. });
                self.record(n, g);
                if hello && !acked {
                    acked = true;
                    let ack = HostMsg::HelloAck(HelloAck {
                        version: 1,
                        heartbeat_interval_ms: self.interval_ms,
                    });
                    let mut out = [0u8; MAX_FRAME_LEN];
                    let len = ack.encode(1, &mut out).unwrap();
                    if s.write_all(&out[..len]).is_err() {
                        return;
                    }
                }
            }
            if acked && self.stall_conn.load(Ordering::SeqCst) == n {
                // Never read again; wait for the guest to give up on us.
                let mut b = [0u8; 1];
                let _ = s.set_read_timeout(None);
                std::thread::sleep(Duration::from_secs(30));
                let _ = s.read(&mut b);
                return;
            }
            match s.read(dec.spare_mut()) {
                Ok(0) | Err(_) => return,
                Ok(k) => dec.commit(k),
            }
        }
    }

    pub fn send(&self, msg: HostMsg) {
        let mut out = [0u8; MAX_FRAME_LEN];
        let len = msg.encode(1, &mut out).unwrap();
        let mut cur = self.current.lock().unwrap();
        let s = cur.as_mut().expect("a connection");
        s.write_all(&out[..len]).unwrap();
    }

    /// Stops listening and closes the connection (the host agent "restarts").
    pub fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
        if let Some(s) = self.current.lock().unwrap().take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn connections(&self) -> u32 {
        self.conns.load(Ordering::SeqCst)
    }

    pub fn got(&self) -> Vec<(u32, Instant, Got)> {
        self.got.lock().unwrap().clone()
    }

    pub fn messages(&self) -> Vec<Got> {
        self.got().into_iter().map(|(_, _, g)| g).collect()
    }

    pub fn heartbeats(&self) -> Vec<(u32, Instant, Heartbeat)> {
        self.got()
            .into_iter()
            .filter_map(|(n, t, g)| match g {
                Got::Heartbeat(hb) => Some((n, t, hb)),
                _ => None,
            })
            .collect()
    }

    /// Waits until `pred` holds for what was received; panics with everything after `limit`.
    pub fn wait(&self, what: &str, limit: Duration, pred: impl Fn(&[Got]) -> bool) {
        let end = Instant::now() + limit;
        loop {
            let m = self.messages();
            if pred(&m) {
                return;
            }
            if Instant::now() > end {
                panic!("timed out waiting for {what}; got {m:#?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
