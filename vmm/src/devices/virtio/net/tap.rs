//! The host side of a virtio-net device: a TAP interface with a virtio-net
//! header in front of every frame (`IFF_VNET_HDR`), opened by name or handed
//! over as an open descriptor.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::frame::VNET_HDR_LEN;

// linux/if_tun.h
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `TUNSETOFFLOAD` bits: what the TAP may hand us (what the guest accepts).
pub const TUN_F_CSUM: u32 = 0x01;
/// TCPv4 segmentation offload.
pub const TUN_F_TSO4: u32 = 0x02;
/// TCPv6 segmentation offload.
pub const TUN_F_TSO6: u32 = 0x04;
/// UDP fragmentation offload.
pub const TUN_F_UFO: u32 = 0x10;

/// `struct ifreq` as TUNSETIFF and TUNGETIFF use it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Errors opening or setting up a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` could not be opened.
    #[error(
        "cannot open /dev/net/tun: {0}; is the tun module loaded and the VMM allowed to use it?"
    )]
    OpenTun(io::Error),
    /// The interface could not be attached.
    #[error("cannot attach TAP {name:?}: {source}; create it first (ip tuntap add {name} mode tap vnet_hdr) and give the VMM CAP_NET_ADMIN or its ownership")]
    Attach {
        /// The interface.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// The name does not fit `IFNAMSIZ`.
    #[error("TAP name {0:?} is longer than 15 bytes")]
    Name(String),
    /// The inherited descriptor is not a TAP with a virtio-net header.
    #[error("fd {fd} is not a TAP opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR ({why}); open it that way before handing it over")]
    NotTap {
        /// The descriptor.
        fd: RawFd,
        /// What is wrong.
        why: String,
    },
    /// A TAP ioctl or fcntl failed.
    #[error("TAP setup ({what}) failed: {source}")]
    Setup {
        /// Which call.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}

/// An open TAP, non-blocking, with a 12-byte virtio-net header (the virtio
/// 1.x layout) in front of each frame.
#[derive(Debug)]
pub struct Tap {
    file: File,
}

impl Tap {
    /// Attaches to the TAP interface `name` through `/dev/net/tun`.
    pub fn open_named(name: &str) -> Result<Self, TapError> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(TapError::Name(name.into()));
        }
        let path = c"/dev/net/tun";
        // SAFETY: a NUL-terminated path and flags; the result is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TapError::OpenTun(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is
        // laid out as (and at least as large as).
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(TapError::Attach {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Self { file };
        tap.setup()?;
        Ok(tap)
    }

    /// Takes over the inherited TAP descriptor `fd` (it is closed when the
    /// device goes). It must be a TAP opened with `IFF_VNET_HDR`.
    pub fn from_fd(fd: RawFd) -> Result<Self, TapError> {
        // SAFETY: fcntl on a descriptor number has no memory effects; it tells
        // whether the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::NotTap {
                fd,
                why: format!("not open: {}", io::Error::last_os_error()),
            });
        }
        // SAFETY: the config hands this descriptor to the VMM for the device's
        // sole use; it is open (checked above) and owned from here on.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `req`.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF as _, &mut req) };
        if r < 0 {
            return Err(TapError::NotTap {
                fd,
                why: format!("TUNGETIFF: {}", io::Error::last_os_error()),
            });
        }
        let want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if req.flags & want != want {
            return Err(TapError::NotTap {
                fd,
                why: format!("its flags are {:#x}", req.flags),
            });
        }
        // SAFETY: as above, F_SETFD/F_GETFL/F_SETFL on an fd we own.
        unsafe {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(TapError::Setup {
                    what: "O_NONBLOCK",
                    source: io::Error::last_os_error(),
                });
            }
        }
        let tap = Self { file };
        tap.setup()?;
        Ok(tap)
    }

    fn setup(&self) -> Result<(), TapError> {
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ as _, &size) };
        if r < 0 {
            return Err(TapError::Setup {
                what: "TUNSETVNETHDRSZ",
                source: io::Error::last_os_error(),
            });
        }
        // No offloads until the guest says what it accepts.
        self.set_offload(0)
    }

    /// Tells the TAP which offloads it may use in frames toward us
    /// (`TUN_F_*`). If the kernel refuses UFO (removed in Linux 4.14 for
    /// some paths), it is retried without.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        let call = |f: u32| {
            // SAFETY: TUNSETOFFLOAD takes the flags by value.
            let r = unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    TUNSETOFFLOAD as _,
                    libc::c_ulong::from(f),
                )
            };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        match call(flags) {
            Ok(()) => Ok(()),
            Err(_) if flags & TUN_F_UFO != 0 => call(flags & !TUN_F_UFO),
            Err(e) => Err(e),
        }
        .map_err(|source| TapError::Setup {
            what: "TUNSETOFFLOAD",
            source,
        })
    }

    /// Reads one frame (header included) into `buf`; `WouldBlock` when none
    /// waits. A frame longer than `buf` is cut (the TAP drops the rest).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read(2) into `buf`, at most its length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame (header included).
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: write(2) from `frame`, at most its length.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Tap {
    /// A connected pair of non-blocking unix datagram sockets, the first
    /// wrapped as a `Tap`: each write is one frame, as on a TAP. For tests
    /// and the fuzz target (no privileges, no TAP ioctls).
    #[doc(hidden)]
    pub fn datagram_pair() -> io::Result<(Self, std::os::unix::net::UnixDatagram)> {
        let (a, b) = std::os::unix::net::UnixDatagram::pair()?;
        a.set_nonblocking(true)?;
        b.set_nonblocking(true)?;
        Ok((
            Self {
                file: File::from(OwnedFd::from(a)),
            },
            b,
        ))
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
