//! Every message survives encode -> decode, byte for byte, through every
//! decoder.

mod common;

use common::{enc_guest, enc_host, random_guest, random_host, Rng, GUEST_KINDS, HOST_KINDS};
use guest_proto::{
    decode_frame, decode_stream, encode_frame, encoded_len, Decoded, Frame, GuestMsg, HostMsg,
    Message, StreamDecoder, PROTOCOL_VERSION,
};

const ITERATIONS: usize = 20_000;

/// Decodes `bytes` with all three decoders, checks each yields exactly `msg`
/// and that re-encoding gives `bytes` back.
fn check_all_decoders<'a, M>(bytes: &'a [u8], msg: &M)
where
    M: Message<'a> + core::fmt::Debug,
{
    let (frame, consumed) = decode_frame::<M>(bytes).expect("decodes");
    assert_eq!(consumed, bytes.len());
    assert_eq!(
        frame,
        Frame::Known {
            version: PROTOCOL_VERSION,
            msg: msg.clone()
        }
    );
    assert_eq!(encoded_len(msg), bytes.len());

    let mut again = vec![0u8; bytes.len()];
    let n = encode_frame(msg, PROTOCOL_VERSION, &mut again).expect("re-encodes");
    assert_eq!(&again[..n], bytes);

    match decode_stream::<M>(bytes) {
        Decoded::Frame {
            frame: f,
            consumed: c,
        } => {
            assert_eq!(c, bytes.len());
            assert_eq!(f, frame);
        }
        other => panic!("stream decode gave {other:?}"),
    }
}

#[test]
fn guest_messages_round_trip() {
    let mut rng = Rng::new(1);
    let mut seen = [0usize; GUEST_KINDS];
    let mut scratch = Vec::new();
    for i in 0..ITERATIONS {
        let which = rng.below(GUEST_KINDS);
        seen[which] += 1;
        let msg = random_guest(&mut rng, which, &mut scratch);
        let bytes = enc_guest(&msg);
        check_all_decoders::<GuestMsg<'_>>(&bytes, &msg);

        let mut dec = StreamDecoder::new();
        assert_eq!(dec.push(&bytes), bytes.len(), "iteration {i}");
        match dec.next_frame::<GuestMsg<'_>>() {
            Decoded::Frame {
                frame: Frame::Known { msg: got, .. },
                ..
            } => assert_eq!(got, msg),
            other => panic!("iteration {i}: {other:?}"),
        }
        assert!(dec.is_empty());
    }
    assert!(
        seen.iter().all(|&n| n > 100),
        "every kind generated: {seen:?}"
    );
}

#[test]
fn host_messages_round_trip() {
    let mut rng = Rng::new(2);
    let mut seen = [0usize; HOST_KINDS];
    for _ in 0..ITERATIONS {
        let which = rng.below(HOST_KINDS);
        seen[which] += 1;
        let msg = random_host(&mut rng, which);
        let bytes = enc_host(&msg);
        check_all_decoders::<HostMsg>(&bytes, &msg);
    }
    assert!(
        seen.iter().all(|&n| n > 100),
        "every kind generated: {seen:?}"
    );
}

#[test]
fn kinds_match_direction() {
    let mut rng = Rng::new(3);
    let mut scratch = Vec::new();
    for which in 0..GUEST_KINDS {
        let msg = random_guest(&mut rng, which, &mut scratch);
        assert_eq!(msg.kind() & 0x80, 0, "{msg:?}");
        assert_eq!(enc_guest(&msg)[3], msg.kind());
    }
    for which in 0..HOST_KINDS {
        let msg = random_host(&mut rng, which);
        assert_eq!(msg.kind() & 0x80, 0x80, "{msg:?}");
        assert_eq!(enc_host(&msg)[3], msg.kind());
    }
}

#[test]
fn frames_concatenate() {
    // Many frames back to back in one buffer decode in order with decode_frame.
    let mut rng = Rng::new(4);
    let mut scratch = Vec::new();
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    for i in 0..500 {
        let msg = random_guest(&mut rng, i, &mut scratch);
        let bytes = enc_guest(&msg);
        wire.extend_from_slice(&bytes);
        expected.push(bytes);
    }
    let mut at = 0;
    for bytes in &expected {
        let (frame, n) = decode_frame::<GuestMsg<'_>>(&wire[at..]).expect("decodes");
        assert_eq!(n, bytes.len());
        let msg = frame.message().expect("known");
        assert_eq!(&enc_guest(msg), bytes);
        at += n;
    }
    assert_eq!(at, wire.len());
}

#[cfg(feature = "alloc")]
#[test]
fn to_vec_matches_slice_encoding() {
    let mut rng = Rng::new(5);
    let mut scratch = Vec::new();
    for i in 0..200 {
        let msg = random_guest(&mut rng, i, &mut scratch);
        assert_eq!(
            guest_proto::encode_to_vec(&msg, PROTOCOL_VERSION).expect("encodes"),
            enc_guest(&msg)
        );
    }
}
