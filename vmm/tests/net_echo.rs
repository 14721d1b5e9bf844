//! virtio-net end to end on this host's KVM: the tiny test guest echoes every
//! frame it receives (`net=`, MACs swapped) through reddog-vmm's virtio-net
//! device, attached to a TAP by an inherited fd.
//!
//! Everything stays inside a network namespace the test creates (a thread
//! that `unshare(CLONE_NEWNET)`s, creates the TAP and an `AF_PACKET` socket
//! bound to it, then ends; the descriptors keep the namespace alive and it
//! goes with them). No frame reaches the host's interfaces.

#![allow(unsafe_code, clippy::unwrap_used)]

mod common;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_kvm, Cmdline};
use vmm_api::{Client, NetMetrics};

const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xaa];
/// IEEE 802 local experimental ethertype: nothing else in the namespace uses it.
const ETHERTYPE: u16 = 0x88b5;
/// The fd number the VMM finds its TAP on.
const TAP_FD: RawFd = 10;
const MTU: u16 = 1500;
const WAIT: Duration = Duration::from_secs(20);

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
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
struct Netns {
    tap: OwnedFd,
    packet: OwnedFd,
    ifindex: i32,
}

fn netns_with_tap() -> Netns {
    std::thread::spawn(|| -> io::Result<Netns> {
        // SAFETY: unshare(2) changes only this thread's network namespace.
        check(unsafe { libc::unshare(libc::CLONE_NEWNET) }, "unshare(CLONE_NEWNET)")?;
        let name = b"rdgecho0";
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
        check(unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETIFF as _, &mut req) }, "TUNSETIFF")?;
        // No IPv6 chatter (router solicitations) on the TAP; best effort.
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/rdgecho0/disable_ipv6", "1");
        // Up.
        // SAFETY: socket(2).
        let s = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) }, "socket")?;
        // SAFETY: owned here.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write a struct ifreq.
        unsafe {
            check(libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req), "SIOCGIFFLAGS")?;
            req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            check(libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut req), "SIOCSIFFLAGS")?;
        }
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"rdgecho0".as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let proto = ETHERTYPE.to_be();
        // SAFETY: socket(2).
        let p = check(
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) },
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
        check(
            unsafe {
                libc::bind(
                    packet.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            },
            "bind AF_PACKET",
        )?;
        let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        // SAFETY: SO_RCVTIMEO reads a timeval.
        check(
            unsafe {
                libc::setsockopt(
                    packet.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            },
            "SO_RCVTIMEO",
        )?;
        Ok(Netns { tap, packet, ifindex })
    })
    .join()
    .expect("netns thread")
    .expect("a network namespace with a TAP (needs root)")
}

impl Netns {
    fn send(&self, frame: &[u8]) {
        // SAFETY: send(2) from a slice.
        let n = unsafe { libc::send(self.packet.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "send: {}", io::Error::last_os_error());
    }

    /// The next frame that came in from the guest (not one we sent), if any
    /// within the socket's timeout.
    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
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
            assert_eq!(from.sll_ifindex, self.ifindex);
            if from.sll_pkttype != libc::PACKET_OUTGOING as u8 {
                return Some(n as usize);
            }
        }
    }
}

fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    while f.len() < len {
        f.push((f.len() as u32 ^ seq) as u8);
    }
    f
}

fn echo_of(f: &[u8]) -> Vec<u8> {
    let mut e = f.to_vec();
    e[..6].copy_from_slice(&f[6..12]);
    e[6..12].copy_from_slice(&f[..6]);
    e
}

struct Vm {
    child: Child,
    dir: tempfile::TempDir,
}

impl Vm {
    fn start(net: &Netns, cmdline: Cmdline) -> Self {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let serial = dir.path().join("serial.log");
        let tap = net.tap.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_reddog-vmm"));
        cmd.arg("--kernel")
            .arg(test_guest::elf_path())
            .arg("--cmdline")
            .arg(Cmdline::new().exit_acpi().no_smp().extend(&cmdline).to_string())
            .arg("--net")
            .arg(format!("fd={TAP_FD},mac=02:00:00:00:00:01,mtu={MTU}"))
            .arg("--serial")
            .arg(&serial)
            .arg("--api-sock")
            .arg(dir.path().join("api.sock"))
            .args(["--timeout-ms", "60000"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: dup2 is async-signal-safe; it gives the child the TAP at
        // TAP_FD without the close-on-exec flag.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(tap, TAP_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn reddog-vmm");
        Self { child, dir }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serial.log")).unwrap_or_default()
    }

    fn wait_for_line(&mut self, needle: &str) -> String {
        let t = Instant::now();
        loop {
            let s = self.serial();
            if let Some(l) = s.lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("reddog-vmm exited ({st}) before {needle:?}; serial:\n{s}");
            }
            assert!(t.elapsed() < WAIT, "no {needle:?} on the console; serial:\n{s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn metrics(&self) -> NetMetrics {
        let mut c = Client::connect(self.dir.path().join("api.sock")).expect("connect");
        let m = c.metrics().expect("metrics");
        assert_eq!(m.net.len(), 1, "{m:?}");
        m.net[0]
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_guest_echoes_frames_and_oversize_ones_are_dropped_and_counted() {
    let net = netns_with_tap();
    let mut vm = Vm::start(&net, Cmdline::new().net_echo_for(0, false, 0).net_oversize());
    let ready = vm.wait_for_line("net: echo");
    assert!(ready.contains("mac=02:00:00:00:00:01 mtu=1500"), "{ready}");

    // Frames from the smallest Ethernet frame to the MTU, one at a time.
    let sizes = [60usize, 64, 128, 511, 1000, 1514];
    let mut buf = vec![0u8; 65536];
    let mut sent = 0u64;
    let mut bytes = 0u64;
    for seq in 0..60u32 {
        let f = frame(seq, sizes[seq as usize % sizes.len()]);
        net.send(&f);
        sent += 1;
        bytes += f.len() as u64;
        let t = Instant::now();
        let got = loop {
            let n = net.recv(&mut buf).unwrap_or(0);
            if n > 0 {
                break buf[..n].to_vec();
            }
            assert!(t.elapsed() < WAIT, "no echo of frame {seq}; serial:\n{}", vm.serial());
        };
        assert_eq!(got, echo_of(&f), "echo of frame {seq}");
    }
    // A burst: every frame comes back, none twice.
    let burst: Vec<Vec<u8>> = (1000..1200u32).map(|s| frame(s, 200 + (s as usize % 1300))).collect();
    for f in &burst {
        net.send(f);
        sent += 1;
        bytes += f.len() as u64;
    }
    let mut seen = std::collections::HashSet::new();
    let t = Instant::now();
    while seen.len() < burst.len() && t.elapsed() < WAIT {
        if let Some(n) = net.recv(&mut buf) {
            let seq = u32::from_be_bytes(buf[14..18].try_into().unwrap());
            let i = (seq - 1000) as usize;
            assert_eq!(buf[..n], echo_of(&burst[i])[..], "echo of frame {seq}");
            assert!(seen.insert(seq), "frame {seq} came back twice");
        }
    }
    assert_eq!(seen.len(), burst.len(), "echoes of the burst");

    let m = vm.metrics();
    // The guest's one oversize frame was dropped and counted; ours all passed.
    assert_eq!(m.tx_dropped, 1, "{m:?}");
    assert!(m.rx_frames >= sent && m.tx_frames >= sent, "{m:?}");
    assert!(m.rx_bytes >= bytes && m.tx_bytes >= bytes, "{m:?}");
    assert_eq!(m.rx_dropped, 0, "{m:?}");
}

#[test]
fn a_descriptor_that_is_not_a_tap_is_refused() {
    require_kvm();
    let f = std::fs::File::open("/dev/null").unwrap();
    let fd = f.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reddog-vmm"));
    cmd.arg("--kernel")
        .arg(test_guest::elf_path())
        .arg("--net")
        .arg(format!("fd={TAP_FD},mac=02:00:00:00:00:01"))
        .args(["--timeout-ms", "5000"]);
    // SAFETY: as in Vm::start.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, TAP_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("is not a TAP opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR"), "{err}");
}
