//! The few system calls std does not wrap: mount, finit_module, AF_VSOCK
//! sockets, reboot. Each unsafe block states why it is sound.

// Raw system calls for PID 1.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

/// Errors from the system layer.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// A system call failed.
    #[error("{call} failed: {source}")]
    Call {
        /// Which call.
        call: &'static str,
        /// errno.
        source: io::Error,
    },
    /// A path or argument held a NUL byte.
    #[error("argument holds a NUL byte")]
    Nul,
}

fn check(call: &'static str, r: libc::c_long) -> Result<libc::c_long, SysError> {
    if r < 0 {
        Err(SysError::Call {
            call,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(r)
    }
}

fn cstr(s: &str) -> Result<CString, SysError> {
    CString::new(s).map_err(|_| SysError::Nul)
}

/// `mount(source, target, fstype, flags, data)`.
pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), SysError> {
    let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all four pointers are NUL-terminated strings that live across the call.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    check("mount", r.into()).map(|_| ())
}

/// Loads a kernel module from its file (`finit_module`).
pub fn load_module(path: &Path) -> Result<(), SysError> {
    let f = File::open(path).map_err(|source| SysError::Call {
        call: "open module",
        source,
    })?;
    let params = cstr("")?;
    // SAFETY: `f` is an open file descriptor and `params` a NUL-terminated string,
    // both alive for the call; finit_module reads them and keeps neither.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    match check("finit_module", r) {
        Err(SysError::Call { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Powers the machine off (after syncing). Returns only on failure.
pub fn power_off() -> SysError {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot with a valid command; on success it does not return.
    let r = unsafe { libc::reboot(libc::RB_POWER_OFF) };
    match check("reboot", r.into()) {
        Err(e) => e,
        Ok(_) => SysError::Call {
            call: "reboot",
            source: io::Error::other("returned"),
        },
    }
}

/// Writes one byte to an I/O port (`ioperm` for that port, then `out`).
/// Only PID 1 (with CAP_SYS_RAWIO) on x86 can do this.
#[cfg(target_arch = "x86_64")]
pub fn outb(port: u16, value: u8) -> Result<(), SysError> {
    // SAFETY: ioperm only changes this thread's I/O permission bitmap.
    let r = unsafe { libc::ioperm(libc::c_ulong::from(port), 1, 1) };
    check("ioperm", r.into())?;
    // SAFETY: the port was just granted to this thread; writing a byte to it has
    // no effect on this process's memory (the VMM handles the exit).
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
    Ok(())
}

/// The host's context ID.
pub const VMADDR_CID_HOST: u32 = 2;
/// Any CID (for bind).
pub const VMADDR_CID_ANY: u32 = u32::MAX;

fn sockaddr_vm(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is a plain C struct for which all-zero is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn vsock_socket() -> Result<OwnedFd, SysError> {
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check("socket(AF_VSOCK)", fd.into())?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_timeouts(fd: &OwnedFd, t: Duration) -> Result<(), SysError> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: `tv` is a valid timeval for the duration of the call and the
        // length passed is its size.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        check("setsockopt", r.into())?;
    }
    Ok(())
}

/// Connects to `cid:port` over vsock; reads and writes time out after `timeout`.
pub fn vsock_connect(cid: u32, port: u32, timeout: Duration) -> Result<File, SysError> {
    let fd = vsock_socket()?;
    set_timeouts(&fd, timeout)?;
    let addr = sockaddr_vm(cid, port);
    // SAFETY: `addr` is a valid sockaddr_vm and the length is its size.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    check("connect(vsock)", r.into())?;
    Ok(File::from(fd))
}

/// Listens on vsock `port` and accepts one connection, waiting at most `timeout`.
pub fn vsock_accept_one(port: u32, timeout: Duration) -> Result<File, SysError> {
    let fd = vsock_socket()?;
    let addr = sockaddr_vm(VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm and the length is its size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    check("bind(vsock)", r.into())?;
    // SAFETY: listen on a bound socket we own.
    check("listen", unsafe { libc::listen(fd.as_raw_fd(), 1) }.into())?;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, count 1.
    let n = check("poll", unsafe { libc::poll(&mut pfd, 1, ms) }.into())?;
    if n == 0 {
        return Err(SysError::Call {
            call: "accept(vsock)",
            source: io::Error::from(io::ErrorKind::TimedOut),
        });
    }
    // SAFETY: accept on our listening socket; we do not ask for the peer address.
    let c = unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    check("accept(vsock)", c.into())?;
    // SAFETY: `c` was just returned by accept4 and is owned by nobody else.
    let conn = unsafe { OwnedFd::from_raw_fd(c) };
    set_timeouts(&conn, timeout)?;
    Ok(File::from(conn))
}

/// `umount2(target, flags)`.
pub fn umount(target: &str, flags: libc::c_int) -> Result<(), SysError> {
    let t = cstr(target)?;
    // SAFETY: `t` is a NUL-terminated string alive across the call.
    let r = unsafe { libc::umount2(t.as_ptr(), flags) };
    check("umount", r.into()).map(|_| ())
}

/// `sync()`.
pub fn sync() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Sends `sig` to `pid` (a negative pid names a process group).
pub fn kill(pid: i32, sig: i32) -> Result<(), SysError> {
    // SAFETY: kill only takes integers.
    let r = unsafe { libc::kill(pid, sig) };
    check("kill", r.into()).map(|_| ())
}

/// One `waitpid(pid, WNOHANG)`: `Some((pid, raw status))` when a child ended,
/// `None` when none did (or there is no such child).
pub fn try_wait(pid: i32) -> Option<(i32, i32)> {
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid out pointer for the call.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    (r > 0).then_some((r, status))
}

/// Signals delivered since the last [`take_signals`], one bit per signal number.
static PENDING_SIGNALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn note_signal(sig: libc::c_int) {
    if (0..64).contains(&sig) {
        // An atomic store is async-signal-safe.
        PENDING_SIGNALS.fetch_or(1u64 << sig, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Installs a handler that records `signals` for [`take_signals`] (PID 1
/// gets no signal it has no handler for). Handlers reset to the default on
/// `exec`, so children are unaffected.
pub fn catch_signals(signals: &[libc::c_int]) -> Result<(), SysError> {
    for &sig in signals {
        // SAFETY: sigaction is a plain C struct for which all-zero is valid.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = note_signal as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: `sa.sa_mask` is a valid sigset_t owned by us.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: `sa` is fully initialised; the handler only touches an atomic.
        let r = unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
        check("sigaction", r.into())?;
    }
    Ok(())
}

/// Raises `sig` on the calling thread (the process's handler notes it).
pub fn raise_signal(sig: libc::c_int) -> Result<(), SysError> {
    // SAFETY: raise(3) with a valid signal number; the installed handler only
    // touches an atomic.
    let r = unsafe { libc::raise(sig) };
    check("raise", r.into()).map(|_| ())
}

/// The signals caught since the last call (and forgets them).
pub fn take_signals() -> Vec<libc::c_int> {
    let bits = PENDING_SIGNALS.swap(0, std::sync::atomic::Ordering::SeqCst);
    (0..64).filter(|s| bits & (1u64 << s) != 0).collect()
}

/// Brings the loopback interface up (the kernel then gives it 127.0.0.1).
pub fn loopback_up() -> Result<(), SysError> {
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check("socket(AF_INET)", fd.into())?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is a plain C struct for which all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags into `req`, which lives across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    check("ioctl(SIOCGIFFLAGS)", r.into())?;
    // SAFETY: the kernel just filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req`, which lives across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    check("ioctl(SIOCSIFFLAGS)", r.into()).map(|_| ())
}

/// A connected vsock stream socket.
#[derive(Debug)]
pub struct VsockStream(File);

impl VsockStream {
    /// Connects to `cid:port`; the connect itself gives up after `timeout`.
    pub fn connect(cid: u32, port: u32, timeout: Duration) -> Result<Self, SysError> {
        vsock_connect(cid, port, timeout).map(Self)
    }

    /// Another handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }

    /// `SO_RCVTIMEO` / `SO_SNDTIMEO` (`None` = block forever).
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        for (opt, t) in [(libc::SO_RCVTIMEO, read), (libc::SO_SNDTIMEO, write)] {
            let t = t.unwrap_or(Duration::ZERO);
            let tv = libc::timeval {
                tv_sec: t.as_secs() as libc::time_t,
                tv_usec: t.subsec_micros() as libc::suseconds_t,
            };
            // SAFETY: `tv` is a valid timeval for the duration of the call and the
            // length passed is its size.
            let r = unsafe {
                libc::setsockopt(
                    self.0.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// `shutdown(SHUT_RDWR)`: wakes a reader blocked on the socket.
    pub fn shutdown(&self) {
        // SAFETY: shutdown on a socket we own; errors (already closed) are harmless.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl io::Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl io::Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The index of network interface `name` (`if_nametoindex`); `None` when
/// there is none.
pub fn if_index(name: &str) -> Result<Option<u32>, SysError> {
    let n = cstr(name)?;
    // SAFETY: `n` is a NUL-terminated string that lives across the call.
    let i = unsafe { libc::if_nametoindex(n.as_ptr()) };
    Ok((i != 0).then_some(i))
}

/// A `NETLINK_ROUTE` socket bound by the kernel, with a receive timeout.
#[derive(Debug)]
pub struct RouteSocket(OwnedFd);

impl RouteSocket {
    /// Opens one; reads give up after `timeout`.
    pub fn open(timeout: Duration) -> Result<Self, SysError> {
        // SAFETY: plain socket(2) call with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        check("socket(AF_NETLINK)", fd.into())?;
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        // SAFETY: `tv` is a valid timeval that lives across the call; the size matches it.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        check("setsockopt(SO_RCVTIMEO)", r.into())?;
        Ok(Self(fd))
    }

    /// Sends one message to the kernel.
    pub fn send(&self, msg: &[u8]) -> Result<(), SysError> {
        // SAFETY: `msg` is a valid buffer of its length for the call.
        let r = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        check("send(netlink)", r as libc::c_long).map(|_| ())
    }

    /// Receives one datagram into `buf`; its length.
    pub fn recv(&self, buf: &mut [u8]) -> Result<usize, SysError> {
        // SAFETY: `buf` is a valid writable buffer of its length for the call.
        let r = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        check("recv(netlink)", r as libc::c_long).map(|n| n as usize)
    }
}
