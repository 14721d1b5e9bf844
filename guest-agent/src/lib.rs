//! The guest agent (filled by the Linux-guest and guest-agent issues).
#![forbid(unsafe_code)]
