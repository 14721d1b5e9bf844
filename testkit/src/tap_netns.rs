//! A TAP device in a network namespace of its own, and an `AF_PACKET`
//! socket on it: the host side of the virtio-net tests and benchmark.
//!
//! [`TapNetns::new`] runs a short-lived thread that `unshare(CLONE_NEWNET)`s
//! (only that thread changes namespace), creates the TAP
//! (`IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`), brings it up with IPv6 off (no router
//! solicitations), and opens a packet socket bound to it for one ethertype.
//! The descriptors keep the namespace alive; it goes when they close. No
//! frame ever reaches the host's own interfaces or routes. Needs root
//! (`CAP_NET_ADMIN`, `CAP_SYS_ADMIN`).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn check(r: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(r)
    }
}

/// A TAP and a packet socket on it, in a namespace of their own.
pub struct TapNetns {
    /// None once handed over by name ([`TapNetns::new_persistent`]).
    tap: Option<OwnedFd>,
    /// The namespace (`/proc/thread-self/ns/net` of the creating thread).
    ns: OwnedFd,
    packet: OwnedFd,
    ifindex: i32,
}

impl TapNetns {
    /// A namespace with the TAP `rdgtap0`, and a packet socket on it that
    /// sends and receives frames of `ethertype`, receive timeout `timeout`.
    pub fn new(ethertype: u16, timeout: Duration) -> io::Result<Self> {
        std::thread::spawn(move || Self::create(ethertype, timeout, false))
            .join()
            .map_err(|_| io::Error::other("the namespace thread panicked"))?
    }

    /// As [`TapNetns::new`], but the TAP is made persistent and its
    /// descriptor closed, so a VMM started with [`TapNetns::spawn_in`] can
    /// attach to it by name (`rdgtap0`).
    pub fn new_persistent(ethertype: u16, timeout: Duration) -> io::Result<Self> {
        std::thread::spawn(move || Self::create(ethertype, timeout, true))
            .join()
            .map_err(|_| io::Error::other("the namespace thread panicked"))?
    }

    /// Spawns `cmd` inside the namespace (from a thread that joins it).
    pub fn spawn_in(&self, cmd: &mut Command) -> io::Result<std::process::Child> {
        let ns = self.ns.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns(2) moves only this short-lived thread.
                let r = unsafe { libc::setns(ns, libc::CLONE_NEWNET) };
                check(r, "setns")?;
                cmd.spawn()
            })
            .join()
            .map_err(|_| io::Error::other("the spawning thread panicked"))?
        })
    }

    fn create(ethertype: u16, timeout: Duration, persistent: bool) -> io::Result<Self> {
        // SAFETY: unshare(2) changes only this thread's network namespace.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        check(r, "unshare(CLONE_NEWNET)")?;
        let name = b"rdgtap0";
        // SAFETY: open(2) with a NUL-terminated path.
        let fd = check(
            unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) },
            "open /dev/net/tun",
        )?;
        // SAFETY: just opened, owned here.
        let tap = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name);
        // SAFETY: TUNSETIFF reads and writes a struct ifreq.
        let r = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETIFF as _, &mut req) };
        check(r, "TUNSETIFF")?;
        if persistent {
            // SAFETY: TUNSETPERSIST takes an int by value.
            let r = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) };
            check(r, "TUNSETPERSIST")?;
        }
        // SAFETY: open(2) with a NUL-terminated path.
        let ns = check(
            unsafe {
                libc::open(
                    c"/proc/thread-self/ns/net".as_ptr(),
                    libc::O_RDONLY | libc::O_CLOEXEC,
                )
            },
            "open /proc/thread-self/ns/net",
        )?;
        // SAFETY: just opened, owned here.
        let ns = unsafe { OwnedFd::from_raw_fd(ns) };
        // No IPv6 chatter (router solicitations) on the TAP; best effort.
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/rdgtap0/disable_ipv6", "1");
        // Up.
        // SAFETY: socket(2).
        let s = check(
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) },
            "socket",
        )?;
        // SAFETY: owned here.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write a struct ifreq.
        unsafe {
            check(
                libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req),
                "SIOCGIFFLAGS",
            )?;
            req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            check(
                libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut req),
                "SIOCSIFFLAGS",
            )?;
        }
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"rdgtap0".as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let proto = ethertype.to_be();
        // SAFETY: socket(2).
        let p = check(
            unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(proto),
                )
            },
            "AF_PACKET socket",
        )?;
        // SAFETY: owned here.
        let packet = unsafe { OwnedFd::from_raw_fd(p) };
        // SAFETY: zeroed sockaddr_ll is valid; bind reads it.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: bind(2) with a sockaddr_ll of the right size.
        let r = unsafe {
            libc::bind(
                packet.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        check(r, "bind AF_PACKET")?;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval.
        let r = unsafe {
            libc::setsockopt(
                packet.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        check(r, "SO_RCVTIMEO")?;
        Ok(Self {
            tap: (!persistent).then_some(tap),
            ns,
            packet,
            ifindex,
        })
    }

    /// The TAP's descriptor (for the VMM); -1 for a persistent one.
    pub fn tap_fd(&self) -> RawFd {
        self.tap.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }

    /// Gives the child of `cmd` the TAP as descriptor `target` (without
    /// close-on-exec).
    pub fn pass_tap(&self, cmd: &mut Command, target: RawFd) {
        let tap = self.tap_fd();
        // SAFETY: dup2 is async-signal-safe and touches only descriptors.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(tap, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Sends one frame (Ethernet header first) into the TAP, toward the VM.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: send(2) from a slice.
        let n = unsafe {
            libc::send(
                self.packet.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame that came from the VM (not one we sent), if any
    /// within the socket's timeout.
    pub fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        loop {
            // SAFETY: zeroed sockaddr_ll is valid; recvfrom writes it.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: recvfrom(2) into `buf` and `from`.
            let n = unsafe {
                libc::recvfrom(
                    self.packet.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                return None;
            }
            if from.sll_ifindex == self.ifindex && from.sll_pkttype != libc::PACKET_OUTGOING {
                return Some(n as usize);
            }
        }
    }
}
