//! Drives the guest-proto decoders (one-shot, stateless streaming, buffered
//! streaming) with arbitrary bytes, in both directions, and checks:
//! - nothing panics and every decoder makes progress;
//! - the one-shot and streaming decoders agree at every frame boundary;
//! - whatever decodes re-encodes: byte for byte for versions this crate
//!   knows, to an equal message otherwise;
//! - the buffered decoder, fed in arbitrary pieces, yields the same frames
//!   as the stateless one over the whole input.
#![no_main]

use guest_proto::{
    decode_frame, decode_stream, encode_frame, encode_raw_frame, Decoded, Frame, GuestMsg, HostMsg,
    ProtoError, Recovery, StreamDecoder, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use libfuzzer_sys::fuzz_target;

/// A decoded frame in a form that outlives the decoder's buffer.
#[derive(Debug, PartialEq)]
enum Seen {
    /// Version and the message re-encoded at `PROTOCOL_VERSION`.
    Known(u8, Vec<u8>),
    /// Version, kind and payload of an unknown kind.
    Unknown(u8, u8, Vec<u8>),
}

/// Tiny LCG to cut the input into pieces, seeded from the input itself.
struct Cutter(u64);

impl Cutter {
    fn next(&mut self, max: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        1 + (self.0 >> 33) as usize % max.max(1)
    }
}

macro_rules! direction {
    ($name:ident, $ty:ty) => {
        /// Re-encodes one decoded frame and checks it against `raw`, the bytes
        /// it was decoded from. Returns its fingerprint.
        fn $name(frame: &Frame<'_, $ty>, raw: Option<&[u8]>) -> Seen {
            let mut out = [0u8; MAX_FRAME_LEN];
            match frame {
                Frame::Known { version, msg } => {
                    let n = encode_frame(msg, PROTOCOL_VERSION, &mut out)
                        .expect("a decoded message re-encodes");
                    assert_eq!(n, msg.encoded_len());
                    let (again, m) =
                        decode_frame::<$ty>(&out[..n]).expect("a re-encoded message decodes");
                    assert_eq!(m, n);
                    assert_eq!(
                        again,
                        Frame::Known {
                            version: PROTOCOL_VERSION,
                            msg: *msg
                        }
                    );
                    if let (Some(raw), true) = (raw, *version <= PROTOCOL_VERSION) {
                        let n = encode_frame(msg, *version, &mut out)
                            .expect("a decoded message re-encodes at its version");
                        assert_eq!(&out[..n], raw, "known-version frames are canonical");
                    }
                    Seen::Known(*version, out[..n].to_vec())
                }
                Frame::Unknown {
                    version,
                    kind,
                    payload,
                } => {
                    let n = encode_raw_frame(*version, *kind, payload, &mut out)
                        .expect("an unknown frame re-encodes");
                    let (again, m) =
                        decode_frame::<$ty>(&out[..n]).expect("a re-encoded frame decodes");
                    assert_eq!(m, n);
                    assert_eq!(again, *frame);
                    if let (Some(raw), true) = (raw, *version <= PROTOCOL_VERSION) {
                        assert_eq!(&out[..n], raw);
                    }
                    Seen::Unknown(*version, *kind, payload.to_vec())
                }
            }
        }
    };
}

direction!(seen_guest, GuestMsg<'_>);
direction!(seen_host, HostMsg);

macro_rules! check {
    ($data:expr, $ty:ty, $seen:ident) => {{
        let data: &[u8] = $data;

        // Stateless walk over the whole input, checked against one-shot
        // decoding at every position it visits.
        let mut expected = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let rest = &data[at..];
            let one_shot = decode_frame::<$ty>(rest);
            match decode_stream::<$ty>(rest) {
                Decoded::NeedMore { needed } => {
                    assert!(needed >= 1);
                    assert_eq!(one_shot, Err(ProtoError::Truncated { needed }));
                    break;
                }
                Decoded::Frame { frame, consumed } => {
                    assert!(consumed <= rest.len() && consumed <= MAX_FRAME_LEN);
                    assert_eq!(one_shot, Ok((frame, consumed)));
                    expected.push($seen(&frame, Some(&rest[..consumed])));
                    at += consumed;
                }
                Decoded::Error { error, recovery } => {
                    assert_eq!(one_shot, Err(error));
                    assert!(recovery.skip() >= 1 && recovery.skip() <= rest.len());
                    assert_eq!(
                        error.is_framing_error(),
                        matches!(recovery, Recovery::Resync(_))
                    );
                    at += recovery.skip();
                }
            }
        }

        // Buffered decoder, fed in pieces cut by a PRNG seeded from the input.
        let seed = data
            .iter()
            .take(8)
            .fold(data.len() as u64, |h, &b| h.rotate_left(8) ^ u64::from(b));
        let max_piece = if seed % 4 == 0 {
            1
        } else {
            1 + (seed % 600) as usize
        };
        let mut cutter = Cutter(seed);
        let mut dec = StreamDecoder::new();
        let mut got = Vec::new();
        let mut rest = data;
        let mut steps = 0usize;
        while !rest.is_empty() || !dec.is_empty() {
            let n = dec.push(&rest[..cutter.next(max_piece).min(rest.len())]);
            rest = &rest[n..];
            loop {
                let before = dec.buffered();
                match dec.next_frame::<$ty>() {
                    Decoded::NeedMore { .. } => {
                        assert!(before < MAX_FRAME_LEN, "a full buffer must decode");
                        break;
                    }
                    Decoded::Frame { frame, .. } => got.push($seen(&frame, None)),
                    Decoded::Error { recovery, .. } => assert!(recovery.skip() >= 1),
                }
                assert!(dec.buffered() < before, "no progress");
            }
            if rest.is_empty() {
                break;
            }
            steps += 1;
            assert!(steps <= data.len() + 1);
        }
        assert_eq!(got, expected);
    }};
}

fuzz_target!(|data: &[u8]| {
    check!(data, GuestMsg<'_>, seen_guest);
    check!(data, HostMsg, seen_host);

    // A frame that decodes one way is the wrong direction the other way.
    if let Ok((Frame::Known { .. }, _)) = decode_frame::<GuestMsg<'_>>(data) {
        assert!(matches!(
            decode_frame::<HostMsg>(data),
            Err(ProtoError::WrongDirection { .. })
        ));
    }
    if let Ok((Frame::Known { .. }, _)) = decode_frame::<HostMsg>(data) {
        assert!(matches!(
            decode_frame::<GuestMsg<'_>>(data),
            Err(ProtoError::WrongDirection { .. })
        ));
    }
});
