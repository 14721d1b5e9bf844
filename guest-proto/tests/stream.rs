//! The buffered streaming decoder fed in every possible way.

mod common;

use common::{enc_guest, enc_host, random_guest, random_host, Rng, GUEST_KINDS};
use guest_proto::{
    decode_stream, encode_raw_frame, Decoded, Frame, GuestMsg, HostMsg, ProtoError, Recovery,
    StreamDecoder, MAX_FRAME_LEN, MAX_PAYLOAD_LEN,
};

/// What the decoder reported, with frames re-encoded so they outlive it.
#[derive(Debug, PartialEq)]
enum Event {
    Known(Vec<u8>),
    Unknown(u8, Vec<u8>),
    Error(ProtoError, bool),
}

/// Drains every complete frame from `dec` into `events`.
fn drain_guest(dec: &mut StreamDecoder, events: &mut Vec<Event>) {
    loop {
        match dec.next_frame::<GuestMsg<'_>>() {
            Decoded::NeedMore { needed } => {
                assert!(needed >= 1);
                return;
            }
            Decoded::Frame {
                frame: Frame::Known { msg, .. },
                ..
            } => events.push(Event::Known(enc_guest(&msg))),
            Decoded::Frame {
                frame: Frame::Unknown { kind, payload, .. },
                ..
            } => events.push(Event::Unknown(kind, payload.to_vec())),
            Decoded::Error { error, recovery } => {
                events.push(Event::Error(error, recovery.lost_sync()));
            }
        }
    }
}

/// A wire of random guest messages and the frames it holds, in order.
fn random_wire(seed: u64, count: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut rng = Rng::new(seed);
    let mut scratch = Vec::new();
    let mut wire = Vec::new();
    let mut frames = Vec::new();
    for _ in 0..count {
        let which = rng.below(GUEST_KINDS);
        let msg = random_guest(&mut rng, which, &mut scratch);
        let bytes = enc_guest(&msg);
        wire.extend_from_slice(&bytes);
        frames.push(bytes);
    }
    (wire, frames)
}

#[test]
fn one_byte_at_a_time() {
    let (wire, frames) = random_wire(20, 300);
    let mut dec = StreamDecoder::new();
    let mut events = Vec::new();
    for &b in &wire {
        assert_eq!(dec.push(&[b]), 1);
        drain_guest(&mut dec, &mut events);
    }
    assert!(dec.is_empty());
    let expected: Vec<Event> = frames.into_iter().map(Event::Known).collect();
    assert_eq!(events, expected);
}

#[test]
fn random_chunks_and_every_split_point() {
    let (wire, frames) = random_wire(21, 60);
    let expected: Vec<Event> = frames.into_iter().map(Event::Known).collect();

    // Random chunk sizes, through spare_mut/commit like a read() loop would.
    let mut rng = Rng::new(22);
    for _ in 0..50 {
        let mut dec = StreamDecoder::new();
        let mut events = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let spare = dec.spare_mut();
            assert!(!spare.is_empty(), "decoder stalled");
            let n = (1 + rng.below(2 * MAX_FRAME_LEN))
                .min(spare.len())
                .min(wire.len() - at);
            spare[..n].copy_from_slice(&wire[at..at + n]);
            dec.commit(n);
            at += n;
            drain_guest(&mut dec, &mut events);
        }
        assert_eq!(events, expected);
    }

    // Every split point of a smaller wire into two pushes.
    let (wire, frames) = random_wire(23, 8);
    let expected: Vec<Event> = frames.into_iter().map(Event::Known).collect();
    for split in 0..=wire.len() {
        let mut dec = StreamDecoder::new();
        let mut events = Vec::new();
        let mut rest = &wire[..split];
        while !rest.is_empty() {
            let n = dec.push(rest);
            rest = &rest[n..];
            drain_guest(&mut dec, &mut events);
        }
        let mut rest = &wire[split..];
        while !rest.is_empty() {
            let n = dec.push(rest);
            rest = &rest[n..];
            drain_guest(&mut dec, &mut events);
        }
        assert_eq!(events, expected, "split at {split}");
    }
}

#[test]
fn garbage_between_frames_is_resynced_byte_by_byte() {
    let (clean, frames) = random_wire(24, 40);
    // Insert garbage (never containing 'R') between every frame.
    let mut wire = Vec::new();
    let mut at = 0;
    for f in &frames {
        wire.extend_from_slice(b"\x00junk\xff");
        wire.extend_from_slice(&clean[at..at + f.len()]);
        at += f.len();
    }
    let mut dec = StreamDecoder::new();
    let mut events = Vec::new();
    for &b in &wire {
        dec.push(&[b]);
        drain_guest(&mut dec, &mut events);
    }
    let known: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Known(_)))
        .collect();
    assert_eq!(known.len(), frames.len());
    for (e, f) in known.into_iter().zip(&frames) {
        assert_eq!(e, &Event::Known(f.clone()));
    }
    assert!(events
        .iter()
        .all(|e| matches!(e, Event::Known(_) | Event::Error(_, true))));
}

#[test]
fn full_buffer_always_decodes_something() {
    // A maximal frame fills the buffer exactly and still decodes.
    let mut big = vec![0u8; MAX_FRAME_LEN];
    let n = encode_raw_frame(1, 0x33, &[7; MAX_PAYLOAD_LEN], &mut big).expect("encodes");
    assert_eq!(n, MAX_FRAME_LEN);
    let mut dec = StreamDecoder::new();
    assert_eq!(dec.push(&big), MAX_FRAME_LEN);
    assert_eq!(dec.push(b"more"), 0, "buffer is full");
    assert!(dec.spare_mut().is_empty());
    match dec.next_frame::<GuestMsg<'_>>() {
        Decoded::Frame {
            frame:
                Frame::Unknown {
                    kind: 0x33,
                    payload,
                    ..
                },
            consumed,
        } => {
            assert_eq!(consumed, MAX_FRAME_LEN);
            assert_eq!(payload.len(), MAX_PAYLOAD_LEN);
        }
        other => panic!("{other:?}"),
    }
    assert!(dec.is_empty());

    // Random garbage filling the buffer: each next_frame makes progress.
    let mut rng = Rng::new(25);
    for _ in 0..200 {
        let mut data = vec![0u8; MAX_FRAME_LEN];
        rng.fill(&mut data);
        data[0] = b'R';
        data[1] = b'D';
        let mut dec = StreamDecoder::new();
        assert_eq!(dec.push(&data), MAX_FRAME_LEN);
        let mut rounds = 0;
        while !dec.is_empty() {
            let before = dec.buffered();
            let progressed = match dec.next_frame::<GuestMsg<'_>>() {
                Decoded::NeedMore { .. } => {
                    assert!(before < MAX_FRAME_LEN, "a full buffer must decode");
                    break;
                }
                Decoded::Frame { consumed, .. } => consumed,
                Decoded::Error { recovery, .. } => recovery.skip(),
            };
            assert_eq!(dec.buffered(), before - progressed);
            rounds += 1;
            assert!(rounds <= MAX_FRAME_LEN);
        }
    }
}

#[test]
fn host_messages_stream_to_guest() {
    let mut rng = Rng::new(26);
    let mut wire = Vec::new();
    let mut msgs = Vec::new();
    for i in 0..200 {
        let msg = random_host(&mut rng, i);
        wire.extend_from_slice(&enc_host(&msg));
        msgs.push(msg);
    }
    let mut dec = StreamDecoder::new();
    let mut got = Vec::new();
    for chunk in wire.chunks(7) {
        assert_eq!(dec.push(chunk), chunk.len());
        loop {
            match dec.next_frame::<HostMsg>() {
                Decoded::NeedMore { .. } => break,
                Decoded::Frame {
                    frame: Frame::Known { msg, .. },
                    ..
                } => got.push(msg),
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(got, msgs);
}

#[test]
fn stateless_and_buffered_decoders_agree_on_errors() {
    // A frame with an invalid field: both report it and skip exactly it.
    let mut bad = vec![0u8; 64];
    let n = encode_raw_frame(1, guest_proto::kind::LOG, &[9, 0, 0, 0], &mut bad).expect("ok");
    bad.truncate(n);
    let expected: Decoded<'_, GuestMsg<'_>> = Decoded::Error {
        error: ProtoError::InvalidField { field: "log.level" },
        recovery: Recovery::SkipFrame(n),
    };
    assert_eq!(decode_stream::<GuestMsg<'_>>(&bad), expected);
    let mut dec = StreamDecoder::new();
    dec.push(&bad);
    assert_eq!(dec.next_frame::<GuestMsg<'_>>(), expected);
    assert!(dec.is_empty());

    dec.push(b"RD\x01");
    dec.reset();
    assert!(dec.is_empty());
}
