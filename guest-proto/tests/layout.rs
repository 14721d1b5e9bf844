//! Exact bytes on the wire, as `docs/guest-protocol.md` lays them out, and
//! version negotiation.

mod common;

use common::{enc_guest, enc_host};
use guest_proto::{
    decode_frame, is_supported_version, negotiate_version, Capabilities, ExitStatus, Frame,
    GuestMsg, Heartbeat, Hello, HelloAck, HostMsg, Log, LogLevel, LogSource, Ping, Pong,
    RoleExited, RoleStarted, RoleState, SetHeartbeatInterval, Shutdown, MAGIC,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

/// Header bytes for a version-1 frame.
fn hdr(kind: u8, len: u16) -> Vec<u8> {
    let l = len.to_le_bytes();
    vec![b'R', b'D', 1, kind, l[0], l[1], 0, 0]
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn magic_is_rd() {
    assert_eq!(MAGIC, 0x4452);
    assert_eq!(&MAGIC.to_le_bytes(), b"RD");
}

#[test]
fn guest_message_bytes() {
    let hello = GuestMsg::Hello(Hello {
        min_version: 1,
        max_version: 3,
        boot_id: [0xb0; 16],
        capabilities: Capabilities::ROLE | Capabilities::SHUTDOWN,
        agent_version: "g1",
    });
    assert_eq!(
        enc_guest(&hello),
        cat(&[
            &hdr(0x01, 29),
            &[1, 3],
            &[0xb0; 16],
            &[0x09, 0, 0, 0, 0, 0, 0, 0],
            &[2, b'g', b'1'],
        ])
    );

    let hb = GuestMsg::Heartbeat(Heartbeat {
        seq: 0x0102_0304_0506_0708,
        uptime_ms: 1000,
        load_avg_x100: [150, 75, 5],
        free_mem_kib: 0x1_0000_0000,
        role_state: RoleState::Ready,
        role_restarts: 2,
    });
    assert_eq!(
        enc_guest(&hb),
        cat(&[
            &hdr(0x02, 41),
            &[8, 7, 6, 5, 4, 3, 2, 1],
            &[0xe8, 0x03, 0, 0, 0, 0, 0, 0],
            &[150, 0, 0, 0, 75, 0, 0, 0, 5, 0, 0, 0],
            &[0, 0, 0, 0, 1, 0, 0, 0],
            &[3],
            &[2, 0, 0, 0],
        ])
    );

    assert_eq!(
        enc_guest(&GuestMsg::RoleStarted(RoleStarted { pid: 0x1234 })),
        cat(&[&hdr(0x03, 4), &[0x34, 0x12, 0, 0]])
    );
    assert_eq!(
        enc_guest(&GuestMsg::RoleExited(RoleExited {
            pid: 7,
            status: ExitStatus::Code(-1),
        })),
        cat(&[&hdr(0x04, 9), &[7, 0, 0, 0], &[0], &[0xff; 4]])
    );
    assert_eq!(
        enc_guest(&GuestMsg::RoleExited(RoleExited {
            pid: 7,
            status: ExitStatus::Signal(9),
        })),
        cat(&[&hdr(0x04, 9), &[7, 0, 0, 0], &[1], &[9, 0, 0, 0]])
    );
    assert_eq!(enc_guest(&GuestMsg::Ready), hdr(0x05, 0));
    assert_eq!(
        enc_guest(&GuestMsg::Log(Log {
            level: LogLevel::Warn,
            source: LogSource::RoleStderr,
            line: b"oops",
        })),
        cat(&[&hdr(0x06, 8), &[1, 2, 4, 0], b"oops"])
    );
    assert_eq!(
        enc_guest(&GuestMsg::Pong(Pong { nonce: 5 })),
        cat(&[&hdr(0x07, 8), &[5, 0, 0, 0, 0, 0, 0, 0]])
    );
}

#[test]
fn host_message_bytes() {
    assert_eq!(
        enc_host(&HostMsg::HelloAck(HelloAck {
            version: 1,
            heartbeat_interval_ms: 1000,
        })),
        cat(&[&hdr(0x81, 5), &[1, 0xe8, 0x03, 0, 0]])
    );
    assert_eq!(
        enc_host(&HostMsg::Ping(Ping { nonce: 0xdead_beef })),
        cat(&[&hdr(0x82, 8), &[0xef, 0xbe, 0xad, 0xde, 0, 0, 0, 0]])
    );
    assert_eq!(
        enc_host(&HostMsg::Shutdown(Shutdown {
            deadline_ms: 30_000
        })),
        cat(&[&hdr(0x83, 4), &[0x30, 0x75, 0, 0]])
    );
    assert_eq!(enc_host(&HostMsg::RestartRole), hdr(0x84, 0));
    assert_eq!(
        enc_host(&HostMsg::SetHeartbeatInterval(SetHeartbeatInterval {
            interval_ms: 250,
        })),
        cat(&[&hdr(0x85, 4), &[250, 0, 0, 0]])
    );
}

#[test]
fn hand_written_frame_decodes() {
    // What a tiny C guest would put together by hand.
    let bytes = [b'R', b'D', 1, 0x05, 0, 0, 0, 0];
    assert_eq!(
        decode_frame::<GuestMsg<'_>>(&bytes),
        Ok((
            Frame::Known {
                version: 1,
                msg: GuestMsg::Ready
            },
            8
        ))
    );
}

#[test]
fn version_negotiation() {
    assert_eq!(PROTOCOL_VERSION, 1);
    assert_eq!(MIN_PROTOCOL_VERSION, 1);
    assert!(is_supported_version(1));
    assert!(!is_supported_version(0));
    assert!(!is_supported_version(2));

    // An older or equal peer: use its version.
    assert_eq!(negotiate_version(1, 1), Some(1));
    // A newer peer that still speaks ours: use ours.
    assert_eq!(negotiate_version(1, 9), Some(PROTOCOL_VERSION));
    // A peer that dropped our version: no deal.
    assert_eq!(negotiate_version(2, 9), None);
    // Nonsense ranges.
    assert_eq!(negotiate_version(0, 3), None);
    assert_eq!(negotiate_version(3, 2), None);

    let hello = Hello {
        min_version: 1,
        max_version: 4,
        boot_id: [0; 16],
        capabilities: Capabilities::NONE,
        agent_version: "",
    };
    assert_eq!(hello.negotiate(), Some(1));
    assert_eq!(HelloAck::REJECTED, 0);
}

#[test]
fn capabilities_and_enums() {
    let c = Capabilities::ROLE | Capabilities::LOG;
    assert!(c.contains(Capabilities::ROLE));
    assert!(!c.contains(Capabilities::SHUTDOWN));
    assert_eq!(c.bits(), 3);
    let mut d = Capabilities::NONE;
    d |= Capabilities::HEARTBEAT_INTERVAL;
    assert_eq!(d, Capabilities(4));

    for v in 0..=255u8 {
        if let Some(s) = RoleState::from_u8(v) {
            assert_eq!(s.as_u8(), v);
            assert_eq!(u8::from(s), v);
            assert_eq!(RoleState::try_from(v), Ok(s));
        } else {
            assert!(v > 5);
            assert!(RoleState::try_from(v).is_err());
        }
        assert_eq!(LogLevel::from_u8(v).is_some(), v <= 4);
        assert_eq!(LogSource::from_u8(v).is_some(), v <= 3);
    }
}
