//! The seam between the agent's logic and the host: a byte stream to the host
//! agent. In the VM it is vsock (CID 2, a port from the command line); on the
//! host (tests, development) it is a unix socket, so the whole agent runs as an
//! ordinary process.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::sys;

/// One connection to the host agent.
pub trait Conn: Read + Write + Send {
    /// A second handle on the same connection (for a reader thread).
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>>;
    /// Read and write timeouts (`None` = block).
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()>;
    /// Shuts both directions down, waking any blocked reader.
    fn shutdown(&self);
}

/// How to reach the host agent.
pub trait Transport: Send + Sync {
    /// Opens a new connection, giving up after about `timeout`.
    fn connect(&self, timeout: Duration) -> io::Result<Box<dyn Conn>>;
    /// For messages: where this transport goes.
    fn describe(&self) -> String;
}

/// vsock to the host (CID 2).
#[derive(Debug, Clone)]
pub struct Vsock {
    /// The host agent's port.
    pub port: u32,
}

impl Transport for Vsock {
    fn connect(&self, timeout: Duration) -> io::Result<Box<dyn Conn>> {
        let s = sys::VsockStream::connect(sys::VMADDR_CID_HOST, self.port, timeout).map_err(
            |e| match e {
                sys::SysError::Call { source, .. } => source,
                other => io::Error::other(other.to_string()),
            },
        )?;
        Ok(Box::new(s))
    }

    fn describe(&self) -> String {
        format!("vsock cid={} port={}", sys::VMADDR_CID_HOST, self.port)
    }
}

impl Conn for sys::VsockStream {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        sys::VsockStream::set_timeouts(self, read, write)
    }
    fn shutdown(&self) {
        sys::VsockStream::shutdown(self);
    }
}

/// A unix socket standing in for vsock (host-side runs and tests).
#[derive(Debug, Clone)]
pub struct Unix {
    /// The socket the fake host agent listens on.
    pub path: PathBuf,
}

impl Transport for Unix {
    fn connect(&self, _timeout: Duration) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(UnixStream::connect(&self.path)?))
    }

    fn describe(&self) -> String {
        format!("unix {}", self.path.display())
    }
}

impl Conn for UnixStream {
    fn try_clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
}
