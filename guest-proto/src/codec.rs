//! Frame-level encoding and decoding.

use crate::wire::{Reader, Writer};
use crate::{
    GuestMsg, Header, HostMsg, Message, ProtoError, HEADER_LEN, MAGIC, MAX_PAYLOAD_LEN,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

/// One complete, well-delimited frame, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a, M> {
    /// A message of a kind this crate knows.
    Known {
        /// The header's protocol version.
        version: u8,
        /// The message.
        msg: M,
    },
    /// A frame of a kind this crate doesn't know, travelling in the expected
    /// direction: a newer peer's message. Not an error: skip it.
    Unknown {
        /// The header's protocol version.
        version: u8,
        /// The unknown kind.
        kind: u8,
        /// Its payload, undecoded.
        payload: &'a [u8],
    },
}

impl<M> Frame<'_, M> {
    /// The header's protocol version.
    pub fn version(&self) -> u8 {
        match self {
            Self::Known { version, .. } | Self::Unknown { version, .. } => *version,
        }
    }

    /// The message, if its kind is known.
    pub fn message(&self) -> Option<&M> {
        match self {
            Self::Known { msg, .. } => Some(msg),
            Self::Unknown { .. } => None,
        }
    }
}

/// How to get past a decoding error in a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Recovery {
    /// The header was sound, only this frame is bad: drop its `n` bytes and
    /// go on; the stream is still in step.
    SkipFrame(usize),
    /// The header is bad and the frame boundary is lost: drop `n` bytes (up to
    /// the next place a frame could start) and try again. On a reliable
    /// transport this means the peer is broken: reset the connection instead.
    Resync(usize),
}

impl Recovery {
    /// How many bytes to drop, at least 1.
    pub const fn skip(&self) -> usize {
        match self {
            Self::SkipFrame(n) | Self::Resync(n) => *n,
        }
    }

    /// Whether the stream is out of step (a [`Recovery::Resync`]).
    pub const fn lost_sync(&self) -> bool {
        matches!(self, Self::Resync(_))
    }
}

/// What [`decode_stream`] (or [`StreamDecoder::next_frame`](crate::StreamDecoder::next_frame))
/// found at the start of the buffered bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a, M> {
    /// No complete frame yet, nor anything wrong with the bytes so far.
    NeedMore {
        /// At least this many more bytes are needed.
        needed: usize,
    },
    /// A frame, `consumed` bytes long.
    Frame {
        /// The frame.
        frame: Frame<'a, M>,
        /// Its length on the wire: drop that many bytes before decoding on.
        consumed: usize,
    },
    /// The bytes at the start are bad.
    Error {
        /// What is wrong.
        error: ProtoError,
        /// How many bytes to drop, and whether the stream is still in step.
        recovery: Recovery,
    },
}

/// Decodes the frame at the start of `buf`, expecting messages of direction
/// `M` ([`GuestMsg`] on the host, [`HostMsg`] in the guest).
///
/// Returns the frame and its length; bytes after it are left alone. An
/// incomplete frame is [`ProtoError::Truncated`]. Never panics, never
/// allocates; decoded strings borrow from `buf`.
pub fn decode_frame<'a, M: Message<'a>>(
    buf: &'a [u8],
) -> Result<(Frame<'a, M>, usize), ProtoError> {
    let header = Header::parse(buf)?;
    let len = header.frame_len();
    let frame = buf.get(..len).ok_or(ProtoError::Truncated {
        needed: len.saturating_sub(buf.len()),
    })?;
    let payload = frame.get(HEADER_LEN..).unwrap_or_default();
    Ok((decode_body(&header, payload)?, len))
}

/// Decodes the frame at the start of the bytes received so far from a stream.
///
/// Unlike [`decode_frame`], says how to go on after an error: see
/// [`Decoded`] and [`Recovery`]. The caller drops `consumed` (or
/// `recovery.skip()`) bytes from the front of its buffer and calls again; on
/// [`Decoded::NeedMore`] it reads more. A caller's buffer of
/// [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN) bytes always suffices: a full buffer
/// never yields `NeedMore`.
pub fn decode_stream<'a, M: Message<'a>>(buf: &'a [u8]) -> Decoded<'a, M> {
    let header = match Header::parse(buf) {
        Ok(h) => h,
        Err(ProtoError::Truncated { needed }) => return Decoded::NeedMore { needed },
        Err(error) => {
            return Decoded::Error {
                error,
                recovery: Recovery::Resync(resync_skip(buf)),
            }
        }
    };
    let len = header.frame_len();
    let Some(payload) = buf.get(HEADER_LEN..len) else {
        return Decoded::NeedMore {
            needed: len.saturating_sub(buf.len()),
        };
    };
    match decode_body(&header, payload) {
        Ok(frame) => Decoded::Frame {
            frame,
            consumed: len,
        },
        Err(error) => Decoded::Error {
            error,
            recovery: Recovery::SkipFrame(len),
        },
    }
}

/// Where the next frame could start after a framing error at offset 0: the
/// next `"RD"` (or a trailing `'R'`), else the end of `buf`. At least 1.
fn resync_skip(buf: &[u8]) -> usize {
    let [m0, m1] = MAGIC.to_le_bytes();
    buf.iter()
        .enumerate()
        .skip(1)
        .find(|&(i, &b)| b == m0 && buf.get(i + 1).is_none_or(|&next| next == m1))
        .map_or(buf.len(), |(i, _)| i)
        .max(1)
}

fn decode_body<'a, M: Message<'a>>(
    header: &Header,
    payload: &'a [u8],
) -> Result<Frame<'a, M>, ProtoError> {
    let (version, kind) = (header.version, header.kind);
    // Hello and HelloAck are how peers find out they can't talk: they stay
    // decodable at every version, whatever the oldest version spoken is.
    let handshake = matches!(kind, crate::kind::HELLO | crate::kind::HELLO_ACK);
    if version < MIN_PROTOCOL_VERSION && !handshake {
        return Err(ProtoError::UnsupportedVersion { version });
    }
    // Frames of versions we know are decoded strictly; newer ones may use the
    // reserved field and append fields we skip.
    let strict = version <= PROTOCOL_VERSION;
    if strict && header.reserved != 0 {
        return Err(ProtoError::ReservedNotZero {
            value: header.reserved,
        });
    }
    if crate::Sender::of_kind(kind) != M::SENDER {
        return Err(ProtoError::WrongDirection { kind });
    }
    let mut r = Reader::new(payload, kind);
    match M::read(kind, &mut r)? {
        None => Ok(Frame::Unknown {
            version,
            kind,
            payload,
        }),
        Some(msg) => {
            if strict && r.remaining() != 0 {
                return Err(ProtoError::TrailingBytes {
                    kind,
                    extra: r.remaining(),
                });
            }
            Ok(Frame::Known { version, msg })
        }
    }
}

/// Length of `msg`'s frame, header included (for a message that passes
/// validation; [`encode_frame`] checks).
pub fn encoded_len<'a, M: Message<'a>>(msg: &M) -> usize {
    HEADER_LEN + msg.payload_len()
}

/// Encodes `msg` as a frame of protocol `version` at the start of `out` and
/// returns the frame's length.
///
/// `version` is the negotiated one (see [`HelloAck`](crate::HelloAck)); it
/// must be one this crate speaks. Fails without panicking if a field breaks
/// its limit or `out` is too small ([`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN)
/// bytes always suffice); what `out` holds after an error is unspecified.
pub fn encode_frame<'a, M: Message<'a>>(
    msg: &M,
    version: u8,
    out: &mut [u8],
) -> Result<usize, ProtoError> {
    if !crate::is_supported_version(version) {
        return Err(ProtoError::EncodeVersion { version });
    }
    msg.validate()?;
    let payload_len = msg.payload_len();
    let payload_len_u16 = u16::try_from(payload_len)
        .ok()
        .filter(|&l| usize::from(l) <= MAX_PAYLOAD_LEN)
        .ok_or(ProtoError::FrameTooLong { len: payload_len })?;
    let header = Header {
        version,
        kind: msg.kind(),
        payload_len: payload_len_u16,
        reserved: 0,
    };
    let len = header.frame_len();
    if out.len() < len {
        return Err(ProtoError::BufferTooSmall {
            needed: len,
            available: out.len(),
        });
    }
    let mut w = Writer::new(out);
    w.bytes(&header.to_bytes())?;
    msg.write(&mut w)?;
    debug_assert_eq!(w.position(), len, "payload_len disagrees with write");
    Ok(w.position())
}

/// Encodes a frame with an arbitrary kind and payload: for tests, tools and
/// relaying [`Frame::Unknown`]. `version` may be anything but 0, `payload` at
/// most [`MAX_PAYLOAD_LEN`] bytes. Returns the frame's length.
pub fn encode_raw_frame(
    version: u8,
    kind: u8,
    payload: &[u8],
    out: &mut [u8],
) -> Result<usize, ProtoError> {
    if version == 0 {
        return Err(ProtoError::EncodeVersion { version });
    }
    let payload_len = u16::try_from(payload.len())
        .ok()
        .filter(|&l| usize::from(l) <= MAX_PAYLOAD_LEN)
        .ok_or(ProtoError::FrameTooLong { len: payload.len() })?;
    let header = Header {
        version,
        kind,
        payload_len,
        reserved: 0,
    };
    let mut w = Writer::new(out);
    w.bytes(&header.to_bytes())?;
    w.bytes(payload)?;
    Ok(w.position())
}

/// [`encode_frame`] into a new `Vec` (feature `alloc`).
#[cfg(feature = "alloc")]
pub fn encode_to_vec<'a, M: Message<'a>>(
    msg: &M,
    version: u8,
) -> Result<alloc::vec::Vec<u8>, ProtoError> {
    let mut out = alloc::vec![0; encoded_len(msg).min(crate::MAX_FRAME_LEN)];
    let n = encode_frame(msg, version, &mut out)?;
    out.truncate(n);
    Ok(out)
}

/// [`encode_raw_frame`] into a new `Vec` (feature `alloc`).
#[cfg(feature = "alloc")]
pub fn encode_raw_to_vec(
    version: u8,
    kind: u8,
    payload: &[u8],
) -> Result<alloc::vec::Vec<u8>, ProtoError> {
    let mut out = alloc::vec![0; (HEADER_LEN + payload.len()).min(crate::MAX_FRAME_LEN)];
    let n = encode_raw_frame(version, kind, payload, &mut out)?;
    out.truncate(n);
    Ok(out)
}

impl GuestMsg<'_> {
    /// This message's kind number (see [`kind`](crate::kind)).
    pub fn kind(&self) -> u8 {
        Message::kind(self)
    }

    /// [`encode_frame`] for this message.
    pub fn encode(&self, version: u8, out: &mut [u8]) -> Result<usize, ProtoError> {
        encode_frame(self, version, out)
    }

    /// [`encoded_len`] of this message.
    pub fn encoded_len(&self) -> usize {
        encoded_len(self)
    }
}

impl HostMsg {
    /// This message's kind number (see [`kind`](crate::kind)).
    pub fn kind(&self) -> u8 {
        Message::kind(self)
    }

    /// [`encode_frame`] for this message.
    pub fn encode(&self, version: u8, out: &mut [u8]) -> Result<usize, ProtoError> {
        encode_frame(self, version, out)
    }

    /// [`encoded_len`] of this message.
    pub fn encoded_len(&self) -> usize {
        encoded_len(self)
    }
}
