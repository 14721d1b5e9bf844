//! The fixed 8-byte frame header.

use crate::{ProtoError, HEADER_LEN, MAGIC, MAX_PAYLOAD_LEN};

/// Which side sends a message kind. The kind's top bit says it: `0x00..=0x7f`
/// travel guest to host, `0x80..=0xff` host to guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sender {
    /// The guest agent sends it, the host receives it.
    Guest,
    /// The host sends it, the guest agent receives it.
    Host,
}

impl Sender {
    /// The side that sends message kind `kind`.
    pub const fn of_kind(kind: u8) -> Self {
        if kind & 0x80 == 0 {
            Self::Guest
        } else {
            Self::Host
        }
    }
}

/// A frame header as it is on the wire:
///
/// | offset | size | field         |
/// |--------|------|---------------|
/// | 0      | 2    | magic `"RD"`  |
/// | 2      | 1    | version       |
/// | 3      | 1    | kind          |
/// | 4      | 2    | payload length (u16 LE) |
/// | 6      | 2    | reserved, 0   |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// Protocol version the sender used for this frame (never 0).
    pub version: u8,
    /// Message kind (see [`kind`](crate::kind)).
    pub kind: u8,
    /// Payload length in bytes, at most [`MAX_PAYLOAD_LEN`].
    pub payload_len: u16,
    /// Reserved: senders write 0; receivers reject other values in frames of
    /// versions they know and ignore it in newer ones.
    pub reserved: u16,
}

impl Header {
    /// Total length of the frame this header starts (header + payload).
    pub const fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }

    /// Parses the header at the start of `buf`, checking only what delimits
    /// the frame: the magic, a non-zero version and the payload length limit.
    ///
    /// Checks run in byte order on whatever part of the header `buf` holds, so
    /// a bad first byte is reported before the rest arrives. If the header is
    /// incomplete and what there is looks fine, returns
    /// [`ProtoError::Truncated`]. Every other error is a framing error.
    pub fn parse(buf: &[u8]) -> Result<Self, ProtoError> {
        let magic = MAGIC.to_le_bytes();
        for (i, &expected) in magic.iter().enumerate() {
            match buf.get(i) {
                Some(&b) if b != expected => {
                    let found = u16::from_le_bytes([
                        buf.first().copied().unwrap_or(0),
                        buf.get(1).copied().unwrap_or(0),
                    ]);
                    return Err(ProtoError::BadMagic { found });
                }
                Some(_) => {}
                None => return Err(truncated(buf.len())),
            }
        }
        let version = match buf.get(2) {
            Some(0) => return Err(ProtoError::ZeroVersion),
            Some(&v) => v,
            None => return Err(truncated(buf.len())),
        };
        let (Some(&kind), Some(&len0), Some(&len1)) = (buf.get(3), buf.get(4), buf.get(5)) else {
            return Err(truncated(buf.len()));
        };
        let payload_len = u16::from_le_bytes([len0, len1]);
        if usize::from(payload_len) > MAX_PAYLOAD_LEN {
            return Err(ProtoError::FrameTooLong {
                len: usize::from(payload_len),
            });
        }
        let (Some(&r0), Some(&r1)) = (buf.get(6), buf.get(7)) else {
            return Err(ProtoError::Truncated {
                needed: (HEADER_LEN + usize::from(payload_len)).saturating_sub(buf.len()),
            });
        };
        Ok(Self {
            version,
            kind,
            payload_len,
            reserved: u16::from_le_bytes([r0, r1]),
        })
    }

    /// The header's wire bytes.
    pub const fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let m = MAGIC.to_le_bytes();
        let l = self.payload_len.to_le_bytes();
        let r = self.reserved.to_le_bytes();
        [m[0], m[1], self.version, self.kind, l[0], l[1], r[0], r[1]]
    }
}

fn truncated(have: usize) -> ProtoError {
    ProtoError::Truncated {
        needed: HEADER_LEN.saturating_sub(have),
    }
}
