//! virtio-vsock with the hybrid (unix socket) host side.
//!
//! The guest speaks the virtio-vsock stream protocol; the host side is plain
//! unix sockets (see `docs/vsock.md`):
//!
//! - host -> guest: a host process connects to `uds_path`, writes
//!   `CONNECT <port>\n`, reads `OK <host_port>\n` once the guest accepted, then
//!   the stream carries the connection's bytes;
//! - guest -> host: the guest connects to CID 2 port `P`; the device connects to
//!   the unix socket `<uds_path>_P` and relays.
//!
//! Layers, from the guest inwards:
//!
//! - `packet.rs`: the 44-byte header, reading a tx descriptor chain (header
//!   copied out once, then validated) and writing an rx chain;
//! - `connection.rs`: one connection's state machine and credit accounting,
//!   generic over the host stream;
//! - `muxer.rs`: the listening socket, the connections by port pair, the order
//!   in which packets go to the guest, all behind one (nested) epoll;
//! - `device.rs`: the virtio device model and its worker thread.
//!
//! Everything the guest sends is hostile: lengths are bounded, a connection's
//! buffer toward the host is bounded by the credit we advertise, a guest that
//! breaks the protocol gets its connection reset, and the number of
//! connections is capped.

mod connection;
mod device;
mod muxer;
pub mod packet;

use std::path::PathBuf;

pub use device::VsockDevice;
pub use muxer::{port_path, Muxer};

/// Largest payload of one packet, either way (Linux sends at most 64 KiB).
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Bytes we buffer per connection toward the host socket; this is the
/// `buf_alloc` we advertise, so a guest within its credit never exceeds it.
pub const CONN_BUF_SIZE: u32 = 256 << 10;
/// Most connections at once (host- and guest-initiated together).
pub const MAX_CONNECTIONS: usize = 256;
/// Most host connections waiting for their `CONNECT <port>` line.
pub const MAX_PENDING_HOST: usize = 64;
/// Most control packets (resets) queued for the guest while it posts no rx
/// buffers; more are dropped.
pub const MAX_PENDING_CONTROL: usize = 1024;

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved.
    #[error(
        "vsock guest_cid {0} is reserved (0-2 are the hypervisor, local and host, \
         0xffffffff is 'any'); give the guest a CID of 3 or more"
    )]
    Cid(u32),
    /// Something other than a socket sits at the socket path.
    #[error("{0} exists and is not a unix socket; remove it or choose another vsock uds_path")]
    NotASocket(PathBuf),
    /// A stale socket file could not be removed.
    #[error("cannot remove the stale vsock socket {path}: {source}; remove it by hand")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The listening socket could not be created.
    #[error(
        "cannot listen on the vsock socket {path}: {source}; check that the directory \
         exists and is writable and that the path is shorter than 108 bytes"
    )]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The event loop could not be set up (out of file descriptors?).
    #[error("cannot set up the vsock event loop: {0}; check the process's file descriptor limit")]
    Epoll(std::io::Error),
}

/// Guest-triggerable log lines: a few, then silence.
#[derive(Debug)]
pub(crate) struct LogLimit {
    left: u32,
}

impl LogLimit {
    /// Allows `n` lines.
    pub(crate) const fn new(n: u32) -> Self {
        Self { left: n }
    }

    /// Whether the next line may be logged (the last allowed one says so).
    pub(crate) fn allow(&mut self) -> bool {
        match self.left {
            0 => false,
            1 => {
                self.left = 0;
                tracing::debug!("vsock: further guest-triggered messages are suppressed");
                true
            }
            _ => {
                self.left -= 1;
                true
            }
        }
    }
}
