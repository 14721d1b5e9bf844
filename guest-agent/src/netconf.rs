//! `eth0` from the instance file's `net`: the link up with its MTU, the
//! address, and a default route via the gateway, as three hand-built
//! `NETLINK_ROUTE` requests (`RTM_NEWLINK`, `RTM_NEWADDR`, `RTM_NEWROUTE`),
//! each acknowledged by the kernel before the next is sent. The messages
//! are built by pure functions (tested byte for byte); [`configure`] sends
//! them. Only the guest's own kernel answers, but every reply is still
//! bounded: one fixed buffer, a receive timeout, a bounded number of reads.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use guest_proto::instance_file::InstanceNet;

use crate::sys::{self, RouteSocket, SysError};

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 0x1;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;
/// Reads per request before giving up on its acknowledgement.
const MAX_READS: usize = 16;

/// Why `eth0` could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum NetconfError {
    /// The interface did not appear (no virtio-net device, or `virtio_net`
    /// is not loaded).
    #[error("no interface {0} appeared; check that the VM has a virtio-net device and the initramfs loads virtio_net")]
    NoInterface(String),
    /// A system call failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// The kernel refused a request.
    #[error("{what}: the kernel said {}", std::io::Error::from_raw_os_error(*errno))]
    Refused {
        /// Which request.
        what: &'static str,
        /// The errno it answered.
        errno: i32,
    },
    /// No acknowledgement came.
    #[error("{0}: no acknowledgement from the kernel")]
    NoAck(&'static str),
}

fn header(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32) {
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
}

fn attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn finish(mut buf: Vec<u8>) -> Vec<u8> {
    let len = (buf.len() as u32).to_ne_bytes();
    buf[..4].copy_from_slice(&len);
    buf
}

/// `RTM_NEWLINK`: interface `index` up, with `mtu`.
pub fn link_up(seq: u32, index: u32, mtu: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    header(&mut b, RTM_NEWLINK, 0, seq);
    b.extend_from_slice(&[AF_UNSPEC, 0]);
    b.extend_from_slice(&0u16.to_ne_bytes()); // type
    b.extend_from_slice(&index.to_ne_bytes());
    b.extend_from_slice(&IFF_UP.to_ne_bytes()); // flags
    b.extend_from_slice(&IFF_UP.to_ne_bytes()); // change mask
    attr(&mut b, IFLA_MTU, &u32::from(mtu).to_ne_bytes());
    finish(b)
}

/// `RTM_NEWADDR`: `address/prefix_len` on interface `index` (replacing it
/// if it is there already).
pub fn add_address(seq: u32, index: u32, address: Ipv4Addr, prefix_len: u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    header(&mut b, RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, seq);
    b.extend_from_slice(&[AF_INET, prefix_len, 0, RT_SCOPE_UNIVERSE]);
    b.extend_from_slice(&index.to_ne_bytes());
    attr(&mut b, IFA_LOCAL, &address.octets());
    attr(&mut b, IFA_ADDRESS, &address.octets());
    finish(b)
}

/// `RTM_NEWROUTE`: the default route via `gateway` out of interface `index`.
pub fn default_route(seq: u32, index: u32, gateway: Ipv4Addr) -> Vec<u8> {
    let mut b = Vec::with_capacity(44);
    header(&mut b, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, seq);
    b.extend_from_slice(&[
        AF_INET,
        0, // dst_len: the default route
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
    ]);
    b.extend_from_slice(&0u32.to_ne_bytes()); // flags
    attr(&mut b, RTA_GATEWAY, &gateway.octets());
    attr(&mut b, RTA_OIF, &index.to_ne_bytes());
    finish(b)
}

/// What one datagram from the kernel says about request `seq`: `Some(0)`
/// acknowledged, `Some(errno)` refused, `None` not about it (or malformed).
pub fn ack_for(seq: u32, datagram: &[u8]) -> Option<i32> {
    let mut rest = datagram;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        if len < 16 || len > rest.len() {
            return None;
        }
        let ty = u16::from_ne_bytes(rest[4..6].try_into().ok()?);
        let s = u32::from_ne_bytes(rest[8..12].try_into().ok()?);
        if ty == NLMSG_ERROR && s == seq && len >= 20 {
            let code = i32::from_ne_bytes(rest[16..20].try_into().ok()?);
            return Some(code.checked_neg().unwrap_or(i32::MAX));
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    None
}

fn request(
    sock: &RouteSocket,
    what: &'static str,
    seq: u32,
    msg: &[u8],
) -> Result<(), NetconfError> {
    sock.send(msg)?;
    let mut buf = [0u8; 4096];
    for _ in 0..MAX_READS {
        let n = sock.recv(&mut buf).map_err(|_| NetconfError::NoAck(what))?;
        match ack_for(seq, &buf[..n.min(buf.len())]) {
            Some(0) => return Ok(()),
            Some(errno) => return Err(NetconfError::Refused { what, errno }),
            None => {}
        }
    }
    Err(NetconfError::NoAck(what))
}

/// Configures interface `ifname` as `net` says, waiting up to `wait` for it
/// to appear.
pub fn configure(ifname: &str, net: &InstanceNet, wait: Duration) -> Result<(), NetconfError> {
    let deadline = Instant::now() + wait;
    let index = loop {
        if let Some(i) = sys::if_index(ifname)? {
            break i;
        }
        if Instant::now() >= deadline {
            return Err(NetconfError::NoInterface(ifname.into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let sock = RouteSocket::open(Duration::from_secs(2))?;
    request(
        &sock,
        "bringing the link up",
        1,
        &link_up(1, index, net.mtu),
    )?;
    request(
        &sock,
        "adding the address",
        2,
        &add_address(2, index, net.address, net.prefix_len),
    )?;
    request(
        &sock,
        "adding the default route",
        3,
        &default_route(3, index, net.gateway),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ne32(v: u32) -> [u8; 4] {
        v.to_ne_bytes()
    }

    fn ne16(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }

    fn hdr(len: u32, ty: u16, flags: u16, seq: u32) -> Vec<u8> {
        [
            &ne32(len)[..],
            &ne16(ty),
            &ne16(flags),
            &ne32(seq),
            &ne32(0),
        ]
        .concat()
    }

    #[test]
    fn link_up_bytes() {
        let want = [
            hdr(40, 16, 0x5, 7),
            vec![0, 0],
            ne16(0).to_vec(),
            ne32(3).to_vec(),
            ne32(1).to_vec(),
            ne32(1).to_vec(),
            [&ne16(8)[..], &ne16(4), &ne32(1400)].concat(),
        ]
        .concat();
        assert_eq!(link_up(7, 3, 1400), want);
    }

    #[test]
    fn address_bytes() {
        let want = [
            hdr(40, 20, 0x505, 2),
            vec![2, 30, 0, 0],
            ne32(3).to_vec(),
            [&ne16(8)[..], &ne16(2), &[10, 200, 0, 2]].concat(),
            [&ne16(8)[..], &ne16(1), &[10, 200, 0, 2]].concat(),
        ]
        .concat();
        assert_eq!(add_address(2, 3, Ipv4Addr::new(10, 200, 0, 2), 30), want);
    }

    #[test]
    fn default_route_bytes() {
        let want = [
            hdr(44, 24, 0x505, 3),
            vec![2, 0, 0, 0, 254, 3, 0, 1],
            ne32(0).to_vec(),
            [&ne16(8)[..], &ne16(5), &[10, 200, 0, 1]].concat(),
            [&ne16(8)[..], &ne16(4), &ne32(3)].concat(),
        ]
        .concat();
        assert_eq!(default_route(3, 3, Ipv4Addr::new(10, 200, 0, 1)), want);
    }

    #[test]
    fn acknowledgements_are_matched_by_sequence_and_bounded() {
        let err = |seq: u32, code: i32| {
            [
                hdr(36, 2, 0, seq),
                code.to_ne_bytes().to_vec(),
                hdr(16, 16, 5, seq),
            ]
            .concat()
        };
        assert_eq!(ack_for(4, &err(4, 0)), Some(0));
        assert_eq!(ack_for(4, &err(4, -17)), Some(17));
        assert_eq!(ack_for(5, &err(4, 0)), None, "another request's");
        // Two messages in one datagram: the second is ours.
        let two = [err(9, -1), err(4, 0)].concat();
        assert_eq!(ack_for(4, &two), Some(0));
        // Malformed lengths are not read past.
        let mut bad = err(4, 0);
        bad[0..4].copy_from_slice(&ne32(4096));
        assert_eq!(ack_for(4, &bad), None);
        bad[0..4].copy_from_slice(&ne32(3));
        assert_eq!(ack_for(4, &bad), None);
        assert_eq!(ack_for(4, &[]), None);
        assert_eq!(ack_for(4, &err(4, i32::MIN)), Some(i32::MAX));
    }
}
