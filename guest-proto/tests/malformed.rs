//! Bad, truncated, oversized, unknown and future input.

mod common;

use common::{enc_guest, enc_host, random_guest, random_host, Rng, GUEST_KINDS, HOST_KINDS};
use guest_proto::{
    decode_frame, decode_stream, encode_frame, encode_raw_frame, kind, Decoded, Frame, GuestMsg,
    Header, Heartbeat, HostMsg, Log, LogLevel, LogSource, ProtoError, Recovery, RoleState,
    StreamDecoder, HEADER_LEN, MAX_FRAME_LEN, MAX_LOG_LINE_LEN, MAX_PAYLOAD_LEN, PROTOCOL_VERSION,
};

fn raw(version: u8, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let n = encode_raw_frame(version, kind, payload, &mut buf).expect("raw frame encodes");
    buf.truncate(n);
    buf
}

fn guest_err(bytes: &[u8]) -> ProtoError {
    match decode_frame::<GuestMsg<'_>>(bytes) {
        Err(e) => e,
        Ok(ok) => panic!("expected an error, decoded {ok:?}"),
    }
}

fn host_err(bytes: &[u8]) -> ProtoError {
    match decode_frame::<HostMsg>(bytes) {
        Err(e) => e,
        Ok(ok) => panic!("expected an error, decoded {ok:?}"),
    }
}

fn sample_heartbeat() -> GuestMsg<'static> {
    GuestMsg::Heartbeat(Heartbeat {
        seq: 9,
        uptime_ms: 1234,
        load_avg_x100: [1, 2, 3],
        free_mem_kib: 4096,
        role_state: RoleState::Running,
        role_restarts: 0,
    })
}

#[test]
fn truncated_at_every_cut_point() {
    let mut rng = Rng::new(10);
    let mut scratch = Vec::new();
    for i in 0..(GUEST_KINDS * 30) {
        let msg = random_guest(&mut rng, i, &mut scratch);
        let bytes = enc_guest(&msg);
        for cut in 0..bytes.len() {
            let part = &bytes[..cut];
            let needed = match decode_frame::<GuestMsg<'_>>(part) {
                Err(ProtoError::Truncated { needed }) => needed,
                other => panic!("cut {cut} of {msg:?}: {other:?}"),
            };
            assert!(
                needed >= 1 && cut + needed <= bytes.len(),
                "cut {cut}: {needed}"
            );
            if cut >= 6 {
                // Once the length is known, `needed` is exact.
                assert_eq!(cut + needed, bytes.len());
            }
            assert_eq!(
                decode_stream::<GuestMsg<'_>>(part),
                Decoded::NeedMore { needed },
                "cut {cut}"
            );
        }
    }
    for i in 0..(HOST_KINDS * 30) {
        let msg = random_host(&mut rng, i);
        let bytes = enc_host(&msg);
        for cut in 0..bytes.len() {
            assert!(matches!(
                decode_frame::<HostMsg>(&bytes[..cut]),
                Err(ProtoError::Truncated { .. })
            ));
        }
    }
}

#[test]
fn short_payload_with_consistent_header_is_rejected() {
    // The header says the payload is shorter than the kind's fields: the
    // frame is complete but its payload is cut.
    let mut rng = Rng::new(11);
    let mut scratch = Vec::new();
    for i in 0..(GUEST_KINDS * 30) {
        let msg = random_guest(&mut rng, i, &mut scratch);
        let bytes = enc_guest(&msg);
        let payload = &bytes[HEADER_LEN..];
        for cut in 0..payload.len() {
            let frame = raw(PROTOCOL_VERSION, msg.kind(), &payload[..cut]);
            assert_eq!(
                guest_err(&frame),
                ProtoError::PayloadTooShort { kind: msg.kind() },
                "{msg:?} cut at {cut}"
            );
            match decode_stream::<GuestMsg<'_>>(&frame) {
                Decoded::Error {
                    recovery: Recovery::SkipFrame(n),
                    ..
                } => assert_eq!(n, frame.len()),
                other => panic!("{other:?}"),
            }
        }
    }
}

#[test]
fn trailing_bytes_rejected_in_known_versions_only() {
    let bytes = enc_guest(&sample_heartbeat());
    let mut payload = bytes[HEADER_LEN..].to_vec();
    payload.extend_from_slice(&[0xaa, 0xbb]);

    let current = raw(PROTOCOL_VERSION, kind::HEARTBEAT, &payload);
    assert_eq!(
        guest_err(&current),
        ProtoError::TrailingBytes {
            kind: kind::HEARTBEAT,
            extra: 2
        }
    );

    // A newer version may append fields: the known prefix decodes.
    let future = raw(PROTOCOL_VERSION + 1, kind::HEARTBEAT, &payload);
    let (frame, n) = decode_frame::<GuestMsg<'_>>(&future).expect("future frame decodes");
    assert_eq!(n, future.len());
    assert_eq!(
        frame,
        Frame::Known {
            version: PROTOCOL_VERSION + 1,
            msg: sample_heartbeat()
        }
    );
}

#[test]
fn future_version_frame() {
    // Version 200, reserved bits set, extra fields: decoded with the fields we
    // know, the rest ignored.
    let mut frame = enc_guest(&sample_heartbeat());
    frame[2] = 200;
    frame[6] = 0x5a;
    frame[7] = 0xa5;
    frame.extend_from_slice(&[1, 2, 3, 4]);
    let len = u16::try_from(frame.len() - HEADER_LEN).expect("small");
    frame[4..6].copy_from_slice(&len.to_le_bytes());

    let (decoded, n) = decode_frame::<GuestMsg<'_>>(&frame).expect("decodes");
    assert_eq!(n, frame.len());
    assert_eq!(decoded.version(), 200);
    assert_eq!(decoded.message(), Some(&sample_heartbeat()));

    // The same reserved bits in a frame of our own version are an error.
    let mut strict = enc_guest(&sample_heartbeat());
    strict[6] = 1;
    assert_eq!(guest_err(&strict), ProtoError::ReservedNotZero { value: 1 });

    // A future frame is still checked for the fields it must share with us.
    let mut bad = enc_guest(&sample_heartbeat());
    bad[2] = 9;
    bad[HEADER_LEN + 36] = 77; // role_state
    assert_eq!(
        guest_err(&bad),
        ProtoError::InvalidField {
            field: "heartbeat.role_state"
        }
    );
}

#[test]
fn unknown_kinds_are_skipped() {
    let unknown_guest = raw(PROTOCOL_VERSION, 0x7e, b"from the future");
    let unknown_host = raw(PROTOCOL_VERSION + 3, 0xfe, &[0; 100]);
    let reserved = raw(PROTOCOL_VERSION, 0x00, &[]);

    match decode_frame::<GuestMsg<'_>>(&unknown_guest) {
        Ok((
            Frame::Unknown {
                version,
                kind,
                payload,
            },
            n,
        )) => {
            assert_eq!(
                (version, kind, payload, n),
                (1, 0x7e, &b"from the future"[..], unknown_guest.len())
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        decode_frame::<HostMsg>(&unknown_host),
        Ok((Frame::Unknown { kind: 0xfe, .. }, 108))
    ));
    assert!(matches!(
        decode_frame::<GuestMsg<'_>>(&reserved),
        Ok((Frame::Unknown { kind: 0, .. }, HEADER_LEN))
    ));

    // In a stream, the frames around them still arrive.
    let hb = enc_guest(&sample_heartbeat());
    let mut wire = Vec::new();
    for part in [&hb, &unknown_guest, &reserved, &hb] {
        wire.extend_from_slice(part);
    }
    let mut dec = StreamDecoder::new();
    assert_eq!(dec.push(&wire), wire.len());
    let mut events = Vec::new();
    loop {
        match dec.next_frame::<GuestMsg<'_>>() {
            Decoded::NeedMore { .. } => break,
            Decoded::Frame {
                frame: Frame::Known { msg, .. },
                ..
            } => {
                assert_eq!(msg, sample_heartbeat());
                events.push("hb");
            }
            Decoded::Frame {
                frame: Frame::Unknown { .. },
                ..
            } => events.push("unknown"),
            Decoded::Error { error, .. } => panic!("{error}"),
        }
    }
    assert_eq!(events, ["hb", "unknown", "unknown", "hb"]);
}

#[test]
fn wrong_direction_is_an_error_that_skips_the_frame() {
    let ping = enc_host(&HostMsg::RestartRole);
    assert_eq!(
        guest_err(&ping),
        ProtoError::WrongDirection {
            kind: kind::RESTART_ROLE
        }
    );
    let hb = enc_guest(&sample_heartbeat());
    assert_eq!(
        host_err(&hb),
        ProtoError::WrongDirection {
            kind: kind::HEARTBEAT
        }
    );
    assert_eq!(
        decode_stream::<HostMsg>(&hb),
        Decoded::Error {
            error: ProtoError::WrongDirection {
                kind: kind::HEARTBEAT
            },
            recovery: Recovery::SkipFrame(hb.len()),
        }
    );
}

#[test]
fn oversized_length_fields() {
    for len in [MAX_PAYLOAD_LEN + 1, 0x8000, 0xffff] {
        let len16 = u16::try_from(len).expect("fits");
        let mut frame = vec![b'R', b'D', 1, kind::LOG];
        frame.extend_from_slice(&len16.to_le_bytes());
        frame.extend_from_slice(&[0, 0]);
        assert_eq!(guest_err(&frame), ProtoError::FrameTooLong { len });
        // Detected as soon as the length arrives, before the reserved bytes.
        assert_eq!(guest_err(&frame[..6]), ProtoError::FrameTooLong { len });
        match decode_stream::<GuestMsg<'_>>(&frame) {
            Decoded::Error {
                error: ProtoError::FrameTooLong { .. },
                recovery: Recovery::Resync(n),
            } => assert_eq!(n, frame.len()),
            other => panic!("{other:?}"),
        }
    }

    // Exactly MAX_FRAME_LEN is fine.
    let big = raw(PROTOCOL_VERSION, 0x70, &[0x55; MAX_PAYLOAD_LEN]);
    assert_eq!(big.len(), MAX_FRAME_LEN);
    assert!(matches!(
        decode_frame::<GuestMsg<'_>>(&big),
        Ok((Frame::Unknown { .. }, MAX_FRAME_LEN))
    ));

    // Encoders refuse what decoders would refuse.
    let mut out = [0u8; MAX_FRAME_LEN + 16];
    assert_eq!(
        encode_raw_frame(1, 0x70, &[0; MAX_PAYLOAD_LEN + 1], &mut out),
        Err(ProtoError::FrameTooLong {
            len: MAX_PAYLOAD_LEN + 1
        })
    );

    // A length-prefixed field longer than its limit.
    let mut payload = vec![LogLevel::Info.as_u8(), LogSource::Agent.as_u8()];
    payload.extend_from_slice(
        &u16::try_from(MAX_LOG_LINE_LEN + 1)
            .expect("fits")
            .to_le_bytes(),
    );
    payload.resize(payload.len() + MAX_LOG_LINE_LEN + 1, b'x');
    assert_eq!(
        guest_err(&raw(1, kind::LOG, &payload)),
        ProtoError::FieldTooLong {
            field: "log.line",
            len: MAX_LOG_LINE_LEN + 1,
            max: MAX_LOG_LINE_LEN
        }
    );
    let long = [b'x'; MAX_LOG_LINE_LEN + 1];
    let msg = GuestMsg::Log(Log {
        level: LogLevel::Info,
        source: LogSource::Agent,
        line: &long,
    });
    assert!(matches!(
        msg.encode(PROTOCOL_VERSION, &mut out),
        Err(ProtoError::FieldTooLong { .. })
    ));
    // Length prefix beyond the payload.
    let mut payload = vec![0, 0];
    payload.extend_from_slice(&500u16.to_le_bytes());
    payload.extend_from_slice(b"short");
    assert_eq!(
        guest_err(&raw(1, kind::LOG, &payload)),
        ProtoError::PayloadTooShort { kind: kind::LOG }
    );
}

#[test]
fn bad_headers() {
    // Bad magic, reported as soon as the first wrong byte is seen.
    assert!(matches!(guest_err(b"X"), ProtoError::BadMagic { .. }));
    assert!(matches!(guest_err(b"RX"), ProtoError::BadMagic { .. }));
    assert!(matches!(
        guest_err(b"DR\x01\x01\0\0\0\0"),
        ProtoError::BadMagic { found: 0x5244 }
    ));
    // Version 0.
    assert_eq!(guest_err(b"RD\0"), ProtoError::ZeroVersion);
    assert_eq!(guest_err(b"RD\0\x01\0\0\0\0"), ProtoError::ZeroVersion);
    for e in [
        guest_err(b"X"),
        guest_err(b"RD\0"),
        guest_err(b"RD\x01\x01\xff\xff"),
    ] {
        assert!(e.is_framing_error(), "{e}");
    }
    assert!(!ProtoError::PayloadTooShort { kind: 1 }.is_framing_error());
    // Header parses on its own too.
    assert_eq!(
        Header::parse(b"RD\x07\x82\x08\0\0\0"),
        Ok(Header {
            version: 7,
            kind: 0x82,
            payload_len: 8,
            reserved: 0
        })
    );
}

#[test]
fn invalid_field_values() {
    let invalid = |field| ProtoError::InvalidField { field };

    let mut hb = enc_guest(&sample_heartbeat());
    hb[HEADER_LEN + 36] = 6;
    assert_eq!(guest_err(&hb), invalid("heartbeat.role_state"));

    // Log level / source.
    assert_eq!(
        guest_err(&raw(1, kind::LOG, &[5, 0, 0, 0])),
        invalid("log.level")
    );
    assert_eq!(
        guest_err(&raw(1, kind::LOG, &[0, 4, 0, 0])),
        invalid("log.source")
    );

    // RoleExited status tag.
    assert_eq!(
        guest_err(&raw(1, kind::ROLE_EXITED, &[1, 0, 0, 0, 2, 0, 0, 0, 0])),
        invalid("role_exited.status")
    );

    // Hello: min_version 0, min > max, bad UTF-8.
    let hello = |min: u8, max: u8, ver: &[u8]| {
        let mut p = vec![min, max];
        p.extend_from_slice(&[0; 16]);
        p.extend_from_slice(&0u64.to_le_bytes());
        p.push(u8::try_from(ver.len()).expect("short"));
        p.extend_from_slice(ver);
        raw(1, kind::HELLO, &p)
    };
    assert!(decode_frame::<GuestMsg<'_>>(&hello(1, 1, b"ok")).is_ok());
    assert_eq!(guest_err(&hello(0, 1, b"ok")), invalid("hello.min_version"));
    assert_eq!(guest_err(&hello(3, 2, b"ok")), invalid("hello.min_version"));
    assert_eq!(
        guest_err(&hello(1, 1, b"\xff\xfe")),
        ProtoError::InvalidUtf8 {
            field: "hello.agent_version"
        }
    );
    assert_eq!(
        guest_err(&hello(1, 1, &[b'v'; 65])),
        ProtoError::FieldTooLong {
            field: "hello.agent_version",
            len: 65,
            max: 64
        }
    );

    // Heartbeat interval bounds, both in SetHeartbeatInterval and HelloAck.
    for (ms, ok) in [
        (0, false),
        (99, false),
        (100, true),
        (60_000, true),
        (60_001, false),
        (u32::MAX, false),
    ] {
        let set = raw(1, kind::SET_HEARTBEAT_INTERVAL, &u32::to_le_bytes(ms));
        let mut ack_payload = vec![1];
        ack_payload.extend_from_slice(&ms.to_le_bytes());
        let ack = raw(1, kind::HELLO_ACK, &ack_payload);
        if ok {
            assert!(decode_frame::<HostMsg>(&set).is_ok());
            assert!(decode_frame::<HostMsg>(&ack).is_ok());
        } else {
            assert_eq!(
                host_err(&set),
                invalid("set_heartbeat_interval.interval_ms")
            );
            assert_eq!(host_err(&ack), invalid("hello_ack.heartbeat_interval_ms"));
            let msg = HostMsg::SetHeartbeatInterval(guest_proto::SetHeartbeatInterval {
                interval_ms: ms,
            });
            assert!(msg.encode(1, &mut [0u8; 64]).is_err());
        }
    }
}

#[test]
fn encoder_errors() {
    let msg = sample_heartbeat();
    let len = msg.encoded_len();
    let mut out = vec![0u8; len];
    assert_eq!(
        msg.encode(PROTOCOL_VERSION, &mut out[..len - 1]),
        Err(ProtoError::BufferTooSmall {
            needed: len,
            available: len - 1
        })
    );
    assert_eq!(
        encode_frame(&msg, 0, &mut out),
        Err(ProtoError::EncodeVersion { version: 0 })
    );
    assert_eq!(
        encode_frame(&msg, PROTOCOL_VERSION + 1, &mut out),
        Err(ProtoError::EncodeVersion {
            version: PROTOCOL_VERSION + 1
        })
    );
    assert_eq!(
        encode_raw_frame(0, 1, &[], &mut out),
        Err(ProtoError::EncodeVersion { version: 0 })
    );
    assert!(matches!(
        encode_raw_frame(1, 1, &[0; 10], &mut out[..12]),
        Err(ProtoError::BufferTooSmall { .. })
    ));
}

#[test]
fn garbage_never_panics_and_known_frames_reencode() {
    let mut rng = Rng::new(12);
    let mut buf = vec![0u8; 2 * MAX_FRAME_LEN];
    let mut out = vec![0u8; MAX_FRAME_LEN];
    for round in 0..3_000 {
        let len = rng.below(buf.len());
        let data = &mut buf[..len];
        rng.fill(data);
        // Make valid-looking headers common so decoding gets past the magic.
        if round % 2 == 0 && len >= HEADER_LEN {
            data[0] = b'R';
            data[1] = b'D';
            data[2] = 1 + rng.u8() % 3;
            data[3] = if rng.bool() {
                1 + rng.u8() % 8
            } else {
                0x81 + rng.u8() % 6
            };
            let plen = u16::try_from(rng.below(64)).expect("small");
            data[4..6].copy_from_slice(&plen.to_le_bytes());
            data[6] = 0;
            data[7] = 0;
        }
        let data = &buf[..len];
        if let Ok((frame, n)) = decode_frame::<GuestMsg<'_>>(data) {
            assert!(n <= data.len());
            if let (Frame::Known { version, msg }, true) =
                (frame, frame.version() <= PROTOCOL_VERSION)
            {
                let m = msg.encode(version, &mut out).expect("re-encodes");
                assert_eq!(&out[..m], &data[..n]);
            }
        }
        if let Ok((Frame::Known { version, msg }, n)) = decode_frame::<HostMsg>(data) {
            if version <= PROTOCOL_VERSION {
                let m = msg.encode(version, &mut out).expect("re-encodes");
                assert_eq!(&out[..m], &data[..n]);
            }
        }
        // The stream decoder always makes progress and ends.
        let mut at = 0;
        loop {
            match decode_stream::<GuestMsg<'_>>(&data[at..]) {
                Decoded::NeedMore { needed } => {
                    assert!(needed >= 1);
                    break;
                }
                Decoded::Frame { consumed, .. } => at += consumed,
                Decoded::Error { recovery, .. } => {
                    assert!(recovery.skip() >= 1);
                    at += recovery.skip();
                }
            }
            assert!(at <= data.len());
        }
    }
}

#[test]
fn resync_after_garbage_finds_next_frame() {
    let hb = enc_guest(&sample_heartbeat());
    let mut wire = b"garbage R RD\0 more".to_vec();
    wire.extend_from_slice(&hb);
    let mut at = 0;
    let mut resyncs = 0;
    loop {
        match decode_stream::<GuestMsg<'_>>(&wire[at..]) {
            Decoded::Error { recovery, error } => {
                assert!(recovery.lost_sync(), "{error}");
                resyncs += 1;
                at += recovery.skip();
            }
            Decoded::Frame { frame, consumed } => {
                assert_eq!(frame.message(), Some(&sample_heartbeat()));
                assert_eq!(at + consumed, wire.len());
                break;
            }
            Decoded::NeedMore { .. } => panic!("frame not found"),
        }
    }
    // "garbage R " goes at once (a lone 'R' is no candidate), then
    // "RD\0 more" (version 0), then the frame.
    assert_eq!(resyncs, 2);
    assert_eq!(at, wire.len() - hb.len());
}

#[test]
fn errors_display() {
    let errors = [
        ProtoError::Truncated { needed: 3 },
        ProtoError::BadMagic { found: 0x1234 },
        ProtoError::ZeroVersion,
        ProtoError::FrameTooLong { len: 70000 },
        ProtoError::UnsupportedVersion { version: 0 },
        ProtoError::ReservedNotZero { value: 1 },
        ProtoError::WrongDirection { kind: 0x81 },
        ProtoError::PayloadTooShort { kind: 1 },
        ProtoError::TrailingBytes { kind: 1, extra: 2 },
        ProtoError::InvalidField { field: "x.y" },
        ProtoError::FieldTooLong {
            field: "x.y",
            len: 9,
            max: 8,
        },
        ProtoError::InvalidUtf8 { field: "x.y" },
        ProtoError::BufferTooSmall {
            needed: 9,
            available: 8,
        },
        ProtoError::EncodeVersion { version: 9 },
    ];
    for e in errors {
        let text = e.to_string();
        assert!(!text.is_empty());
        let _: &dyn std::error::Error = &e;
    }
    assert_eq!(
        ProtoError::BadMagic { found: 0x1234 }.to_string(),
        "bad frame magic 0x1234, expected 0x4452"
    );
}
