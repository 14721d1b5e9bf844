//! The wire protocol between `reddog-guest` (the agent inside the VM, untrusted)
//! and the host agent.
//!
//! Every message travels in one *frame*: an 8-byte little-endian header
//! ([`Header`]) followed by at most [`MAX_PAYLOAD_LEN`] payload bytes, so no
//! frame is ever longer than [`MAX_FRAME_LEN`]. Payloads are fixed-size
//! little-endian fields plus length-prefixed, bounded byte strings; the full
//! byte layout, the versioning rules and what the host does on bad input are
//! written down in `docs/guest-protocol.md`.
//!
//! With default features the crate is `#![no_std]`, never allocates and never
//! panics on any input:
//!
//! * decoding borrows from the input ([`Hello::agent_version`] and
//!   [`Log::line`] point into the caller's buffer);
//! * [`decode_frame`] decodes one frame from the start of a buffer;
//! * [`decode_stream`] does the same for a byte stream and tells apart
//!   "need more bytes", "a frame" and "an error, skip this many bytes";
//! * [`StreamDecoder`] wraps [`decode_stream`] around a fixed
//!   [`MAX_FRAME_LEN`]-byte buffer for callers that read a socket or a
//!   serial port piecemeal;
//! * [`encode_frame`] (or [`GuestMsg::encode`] / [`HostMsg::encode`]) writes
//!   a frame into a caller-provided buffer.
//!
//! The `instance-file` feature (std, serde, serde_json) adds
//! [`instance_file`]: the file the host agent writes onto each role disk for
//! `reddog-guest` (instance id, role name, environment), its encoder and the
//! guest's strict decoder. Default features stay `no_std` and serde-free.
//!
//! Messages come in two directions: [`GuestMsg`] (guest to host) and
//! [`HostMsg`] (host to guest). The decoders are generic over the direction
//! the caller expects to *receive*.
//!
//! ```
//! use guest_proto::{
//!     Capabilities, Decoded, Frame, GuestMsg, Hello, StreamDecoder, MAX_FRAME_LEN,
//!     PROTOCOL_VERSION,
//! };
//!
//! // Guest side: say hello.
//! let hello = GuestMsg::Hello(Hello {
//!     min_version: 1,
//!     max_version: PROTOCOL_VERSION,
//!     boot_id: [7; 16],
//!     capabilities: Capabilities::ROLE | Capabilities::LOG,
//!     agent_version: "reddog-guest 0.1.0",
//! });
//! let mut out = [0u8; MAX_FRAME_LEN];
//! let n = hello.encode(PROTOCOL_VERSION, &mut out)?;
//!
//! // Host side: feed whatever the socket returned, then drain frames.
//! let mut dec = StreamDecoder::new();
//! assert_eq!(dec.push(&out[..n]), n);
//! match dec.next_frame::<GuestMsg>() {
//!     Decoded::Frame { frame: Frame::Known { msg: GuestMsg::Hello(h), .. }, .. } => {
//!         assert_eq!(h.agent_version, "reddog-guest 0.1.0");
//!         assert_eq!(h.negotiate(), Some(PROTOCOL_VERSION));
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! # Ok::<(), guest_proto::ProtoError>(())
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod codec;
mod error;
mod header;
#[cfg(feature = "instance-file")]
pub mod instance_file;
mod msg;
mod stream;
mod wire;

pub use codec::{
    decode_frame, decode_stream, encode_frame, encode_raw_frame, encoded_len, Decoded, Frame,
    Recovery,
};
#[cfg(feature = "alloc")]
pub use codec::{encode_raw_to_vec, encode_to_vec};
pub use error::ProtoError;
pub use header::{Header, Sender};
pub use msg::{
    kind, Capabilities, ExitStatus, GuestMsg, Heartbeat, Hello, HelloAck, HostMsg, Log, LogLevel,
    LogSource, Message, Ping, Pong, RoleExited, RoleStarted, RoleState, SetHeartbeatInterval,
    Shutdown,
};
pub use stream::StreamDecoder;

/// Upper bound on any frame's length, header included.
pub const MAX_FRAME_LEN: usize = 4096;

/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 8;

/// Upper bound on a frame's payload length (`MAX_FRAME_LEN - HEADER_LEN`).
pub const MAX_PAYLOAD_LEN: usize = MAX_FRAME_LEN - HEADER_LEN;

/// First two bytes of every frame: `"RD"` on the wire, i.e. `0x4452` read as
/// a little-endian `u16`.
pub const MAGIC: u16 = u16::from_le_bytes(*b"RD");

/// The newest protocol version this crate speaks (and the one whose payload
/// layouts it decodes strictly).
pub const PROTOCOL_VERSION: u8 = 1;

/// The oldest protocol version this crate still speaks. Frames whose header
/// version is lower are rejected with [`ProtoError::UnsupportedVersion`],
/// except [`Hello`] and [`HelloAck`], which stay decodable at every version so
/// that peers can always tell each other they have no version in common.
pub const MIN_PROTOCOL_VERSION: u8 = 1;

/// Maximum length in bytes of [`Hello::agent_version`].
pub const MAX_AGENT_VERSION_LEN: usize = 64;

/// Maximum length in bytes of one [`Log::line`]; longer output must be split
/// by the sender (e.g. with `line.chunks(MAX_LOG_LINE_LEN)`).
pub const MAX_LOG_LINE_LEN: usize = 512;

/// Smallest heartbeat interval the host may ask for, in milliseconds.
pub const MIN_HEARTBEAT_INTERVAL_MS: u32 = 100;

/// Largest heartbeat interval the host may ask for, in milliseconds.
pub const MAX_HEARTBEAT_INTERVAL_MS: u32 = 60_000;

/// Heartbeat interval a guest uses until told otherwise, in milliseconds.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u32 = 1_000;

/// Whether this crate can speak protocol `version`
/// (`MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION`).
pub const fn is_supported_version(version: u8) -> bool {
    version >= MIN_PROTOCOL_VERSION && version <= PROTOCOL_VERSION
}

/// The version to use with a peer that speaks `peer_min..=peer_max`: the
/// highest version both sides speak, or `None` if the ranges don't overlap
/// (or the peer's range is empty or starts at the invalid version 0).
pub const fn negotiate_version(peer_min: u8, peer_max: u8) -> Option<u8> {
    if peer_min == 0 || peer_min > peer_max {
        return None;
    }
    let high = if peer_max < PROTOCOL_VERSION {
        peer_max
    } else {
        PROTOCOL_VERSION
    };
    let low = if peer_min > MIN_PROTOCOL_VERSION {
        peer_min
    } else {
        MIN_PROTOCOL_VERSION
    };
    if high >= low {
        Some(high)
    } else {
        None
    }
}
