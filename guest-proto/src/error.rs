//! The crate's one error type.

use crate::{MAGIC, MAX_PAYLOAD_LEN, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Everything that can go wrong encoding or decoding a frame.
///
/// Decoding errors split in two groups, see [`ProtoError::is_framing_error`]:
/// a *framing* error means the header itself is bad and the frame boundary is
/// lost; any other decoding error concerns one well-delimited frame that can be
/// skipped as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// The input ends inside a frame (one-shot decoding only; the streaming
    /// decoders report [`Decoded::NeedMore`](crate::Decoded::NeedMore)).
    #[error("input ends inside a frame: at least {needed} more bytes needed")]
    Truncated {
        /// How many more bytes are needed at least.
        needed: usize,
    },
    /// The frame does not start with [`MAGIC`] (framing error). `found` holds
    /// the bytes seen, little-endian, with a missing second byte read as 0.
    #[error("bad frame magic {found:#06x}, expected {magic:#06x}", magic = MAGIC)]
    BadMagic {
        /// The first two bytes, as a little-endian `u16`.
        found: u16,
    },
    /// The header's version byte is 0, which no sender may use (framing error).
    #[error("frame header carries version 0")]
    ZeroVersion,
    /// The header's payload length exceeds [`MAX_PAYLOAD_LEN`] (framing error).
    #[error("frame payload length {len} exceeds the maximum {max}", max = MAX_PAYLOAD_LEN)]
    FrameTooLong {
        /// The payload length the header announced.
        len: usize,
    },
    /// The frame uses a protocol version older than [`MIN_PROTOCOL_VERSION`].
    #[error("protocol version {version} is older than the oldest supported ({min})", min = MIN_PROTOCOL_VERSION)]
    UnsupportedVersion {
        /// The frame's version.
        version: u8,
    },
    /// The header's reserved field is not zero in a frame of a version this
    /// crate knows.
    #[error("reserved header field is {value:#06x}, must be zero up to version {v}", v = PROTOCOL_VERSION)]
    ReservedNotZero {
        /// The reserved field's value.
        value: u16,
    },
    /// The frame's kind belongs to the other direction (e.g. the host received
    /// a host-to-guest kind).
    #[error("message kind {kind:#04x} travels in the other direction")]
    WrongDirection {
        /// The frame's kind.
        kind: u8,
    },
    /// The payload ends before all fields of its kind were read.
    #[error("payload of message kind {kind:#04x} is too short")]
    PayloadTooShort {
        /// The frame's kind.
        kind: u8,
    },
    /// The payload of a frame of a known version has bytes after its last field.
    #[error("payload of message kind {kind:#04x} has {extra} unexpected trailing bytes")]
    TrailingBytes {
        /// The frame's kind.
        kind: u8,
        /// How many bytes follow the last field.
        extra: usize,
    },
    /// A field holds a value outside its allowed set or range.
    #[error("field `{field}` has an invalid value")]
    InvalidField {
        /// The field, as `message.field`.
        field: &'static str,
    },
    /// A length-prefixed field is longer than its limit.
    #[error("field `{field}` is {len} bytes long, the maximum is {max}")]
    FieldTooLong {
        /// The field, as `message.field`.
        field: &'static str,
        /// Its length.
        len: usize,
        /// Its limit.
        max: usize,
    },
    /// A text field is not valid UTF-8.
    #[error("field `{field}` is not valid UTF-8")]
    InvalidUtf8 {
        /// The field, as `message.field`.
        field: &'static str,
    },
    /// The output buffer is too small for the frame being encoded.
    #[error("output buffer holds {available} bytes, the frame needs {needed}")]
    BufferTooSmall {
        /// The frame's length.
        needed: usize,
        /// The buffer's length.
        available: usize,
    },
    /// Asked to encode a frame with a version this crate can't produce
    /// (outside `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION` for messages, or 0
    /// for raw frames).
    #[error("cannot encode a frame of protocol version {version}")]
    EncodeVersion {
        /// The version asked for.
        version: u8,
    },
}

impl ProtoError {
    /// Whether this is a framing error: the header is bad, so where the frame
    /// ends is unknown. On a reliable transport (vsock) the peer is broken or
    /// hostile and the host resets the connection; on a lossy one (serial) the
    /// reader resynchronises on the next [`MAGIC`].
    pub const fn is_framing_error(&self) -> bool {
        matches!(
            self,
            Self::BadMagic { .. } | Self::ZeroVersion | Self::FrameTooLong { .. }
        )
    }
}
