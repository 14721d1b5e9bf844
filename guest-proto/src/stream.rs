//! A fixed-buffer streaming decoder.

use crate::{decode_stream, Decoded, Message, MAX_FRAME_LEN};

/// Reassembles frames from a byte stream that arrives in arbitrary pieces,
/// in a fixed [`MAX_FRAME_LEN`]-byte buffer (no allocation, ~4 KiB).
///
/// Feed it with [`push`](Self::push) (or read straight into
/// [`spare_mut`](Self::spare_mut) and [`commit`](Self::commit)), then call
/// [`next_frame`](Self::next_frame) until it returns
/// [`Decoded::NeedMore`]. `next_frame` drops the bytes of each frame it
/// returns and of each error it reports by itself; the caller only decides
/// whether an error is acceptable (see [`Recovery`](crate::Recovery)).
///
/// The buffer always has room for a whole frame, so the decoder never stalls:
/// once the buffer is full, `next_frame` returns a frame or an error.
#[derive(Clone)]
pub struct StreamDecoder {
    buf: [u8; MAX_FRAME_LEN],
    /// Start of the undecoded bytes.
    start: usize,
    /// End of the undecoded bytes; `start <= end <= MAX_FRAME_LEN`.
    end: usize,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("buffered", &self.buffered())
            .finish_non_exhaustive()
    }
}

impl StreamDecoder {
    /// An empty decoder.
    pub const fn new() -> Self {
        Self {
            buf: [0; MAX_FRAME_LEN],
            start: 0,
            end: 0,
        }
    }

    /// Bytes received but not decoded yet.
    pub fn buffered(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    /// Whether no byte is waiting.
    pub fn is_empty(&self) -> bool {
        self.buffered() == 0
    }

    /// Drops everything buffered (e.g. after reconnecting).
    pub fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Moves the undecoded bytes to the front of the buffer.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Appends as much of `data` as fits and returns how many bytes that was;
    /// 0 only when the buffer is full (call [`next_frame`](Self::next_frame)
    /// first) or `data` is empty.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let spare = self.spare_mut();
        let n = spare.len().min(data.len());
        if let (Some(dst), Some(src)) = (spare.get_mut(..n), data.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.commit(n);
        n
    }

    /// The free part of the buffer, to read into directly; follow with
    /// [`commit`](Self::commit). Empty only when the buffer is full.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        self.compact();
        self.buf.get_mut(self.end..).unwrap_or_default()
    }

    /// Marks `n` more bytes of [`spare_mut`](Self::spare_mut) as received
    /// (clamped to the free space).
    pub fn commit(&mut self, n: usize) {
        self.end = self.end.saturating_add(n).min(MAX_FRAME_LEN);
    }

    /// Decodes the next frame from the buffered bytes, expecting direction
    /// `M`, and drops the bytes it consumed or skipped. The frame borrows the
    /// decoder until it is dropped.
    pub fn next_frame<'s, M: Message<'s>>(&'s mut self) -> Decoded<'s, M> {
        let Self { buf, start, end } = self;
        let buf: &'s [u8; MAX_FRAME_LEN] = buf;
        let data = buf.get(*start..*end).unwrap_or_default();
        let decoded = decode_stream::<M>(data);
        let drop = match &decoded {
            Decoded::NeedMore { .. } => 0,
            Decoded::Frame { consumed, .. } => *consumed,
            Decoded::Error { recovery, .. } => recovery.skip(),
        };
        *start = start.saturating_add(drop).min(*end);
        if *start == *end {
            *start = 0;
            *end = 0;
        }
        decoded
    }
}
