//! The messages, their payload layouts and validation.

use core::fmt;

use crate::header::Sender;
use crate::wire::{Reader, Writer};
use crate::{
    negotiate_version, ProtoError, MAX_AGENT_VERSION_LEN, MAX_HEARTBEAT_INTERVAL_MS,
    MAX_LOG_LINE_LEN, MIN_HEARTBEAT_INTERVAL_MS,
};

/// Message kind numbers (the header's `kind` byte). Kinds with the top bit
/// clear go guest to host, kinds with it set go host to guest. `0x00` and
/// `0x80` are reserved and never assigned.
pub mod kind {
    /// Guest to host: [`Hello`](crate::Hello).
    pub const HELLO: u8 = 0x01;
    /// Guest to host: [`Heartbeat`](crate::Heartbeat).
    pub const HEARTBEAT: u8 = 0x02;
    /// Guest to host: [`RoleStarted`](crate::RoleStarted).
    pub const ROLE_STARTED: u8 = 0x03;
    /// Guest to host: [`RoleExited`](crate::RoleExited).
    pub const ROLE_EXITED: u8 = 0x04;
    /// Guest to host: [`GuestMsg::Ready`](crate::GuestMsg::Ready), empty payload.
    pub const READY: u8 = 0x05;
    /// Guest to host: [`Log`](crate::Log).
    pub const LOG: u8 = 0x06;
    /// Guest to host: [`Pong`](crate::Pong).
    pub const PONG: u8 = 0x07;
    /// Host to guest: [`HelloAck`](crate::HelloAck).
    pub const HELLO_ACK: u8 = 0x81;
    /// Host to guest: [`Ping`](crate::Ping).
    pub const PING: u8 = 0x82;
    /// Host to guest: [`Shutdown`](crate::Shutdown).
    pub const SHUTDOWN: u8 = 0x83;
    /// Host to guest: [`HostMsg::RestartRole`](crate::HostMsg::RestartRole), empty payload.
    pub const RESTART_ROLE: u8 = 0x84;
    /// Host to guest: [`SetHeartbeatInterval`](crate::SetHeartbeatInterval).
    pub const SET_HEARTBEAT_INTERVAL: u8 = 0x85;
}

pub(crate) mod sealed {
    use super::{ProtoError, Reader, Writer};

    /// The encoding half of [`Message`](super::Message), kept out of reach so
    /// only this crate's two message enums implement it.
    pub trait Sealed<'a>: Sized {
        /// Decodes a payload of `kind`; `Ok(None)` for a kind unknown in this
        /// direction. Leaves trailing bytes for the caller to judge.
        fn read(kind: u8, r: &mut Reader<'a>) -> Result<Option<Self>, ProtoError>;
        /// Checks every field against its limits.
        fn validate(&self) -> Result<(), ProtoError>;
        /// Payload length of a valid message.
        fn payload_len(&self) -> usize;
        /// Writes the payload of a valid message.
        fn write(&self, w: &mut Writer<'_>) -> Result<(), ProtoError>;
    }
}

/// A set of messages travelling in one direction: [`GuestMsg`] or
/// [`HostMsg`]. The decoders and [`encode_frame`](crate::encode_frame) are
/// generic over it. Sealed: only this crate implements it.
pub trait Message<'a>: sealed::Sealed<'a> + fmt::Debug + Clone + PartialEq {
    /// The side that sends these messages.
    const SENDER: Sender;
    /// This message's kind number.
    fn kind(&self) -> u8;
}

macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident : $field:literal {
            $( $(#[$vmeta:meta])* $var:ident = $val:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name {
            $( $(#[$vmeta])* $var = $val, )*
        }

        impl $name {
            /// The value from its wire byte, `None` if the byte names no value.
            pub const fn from_u8(v: u8) -> Option<Self> {
                match v {
                    $( $val => Some(Self::$var), )*
                    _ => None,
                }
            }

            /// The wire byte.
            pub const fn as_u8(self) -> u8 {
                self as u8
            }

            fn read(r: &mut Reader<'_>) -> Result<Self, ProtoError> {
                Self::from_u8(r.u8()?).ok_or(ProtoError::InvalidField { field: $field })
            }
        }

        impl TryFrom<u8> for $name {
            type Error = ProtoError;
            fn try_from(v: u8) -> Result<Self, ProtoError> {
                Self::from_u8(v).ok_or(ProtoError::InvalidField { field: $field })
            }
        }

        impl From<$name> for u8 {
            fn from(v: $name) -> u8 {
                v.as_u8()
            }
        }
    };
}

wire_enum! {
    /// State of the guest's role process, as reported in a [`Heartbeat`].
    pub enum RoleState: "heartbeat.role_state" {
        /// Not launched yet.
        NotStarted = 0,
        /// Launched, not yet running its main loop.
        Starting = 1,
        /// Running, not yet declared ready.
        Running = 2,
        /// Running and ready to serve.
        Ready = 3,
        /// Exited; the guest may restart it.
        Exited = 4,
        /// Failed for good (e.g. too many restarts); the guest won't restart it.
        Failed = 5,
    }
}

wire_enum! {
    /// Severity of a [`Log`] line.
    pub enum LogLevel: "log.level" {
        /// Error.
        Error = 0,
        /// Warning.
        Warn = 1,
        /// Information.
        Info = 2,
        /// Debugging detail.
        Debug = 3,
        /// Tracing detail.
        Trace = 4,
    }
}

wire_enum! {
    /// Where a [`Log`] line comes from.
    pub enum LogSource: "log.source" {
        /// The guest agent itself.
        Agent = 0,
        /// The role process's standard output.
        RoleStdout = 1,
        /// The role process's standard error.
        RoleStderr = 2,
        /// The guest kernel's log.
        Kernel = 3,
    }
}

/// Optional features a guest announces in its [`Hello`]. Unknown bits are
/// kept as they are and mean nothing to this version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// No optional feature.
    pub const NONE: Self = Self(0);
    /// The guest runs a role process: it sends `RoleStarted`/`RoleExited`
    /// and obeys `RestartRole`.
    pub const ROLE: Self = Self(1 << 0);
    /// The guest forwards logs with `Log`.
    pub const LOG: Self = Self(1 << 1);
    /// The guest obeys `SetHeartbeatInterval`.
    pub const HEARTBEAT_INTERVAL: Self = Self(1 << 2);
    /// The guest shuts down cleanly on `Shutdown` (otherwise the host just
    /// powers it off).
    pub const SHUTDOWN: Self = Self(1 << 3);

    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether every bit of `other` is set in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets together.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl core::ops::BitOr for Capabilities {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

impl core::ops::BitOrAssign for Capabilities {
    fn bitor_assign(&mut self, rhs: Self) {
        *self = self.union(rhs);
    }
}

/// Guest to host, first message on a connection: who the guest is and which
/// protocol versions it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hello<'a> {
    /// Oldest protocol version the guest speaks (at least 1).
    pub min_version: u8,
    /// Newest protocol version the guest speaks (at least `min_version`).
    pub max_version: u8,
    /// Random id the guest draws once per boot; a changed id means the VM
    /// rebooted.
    pub boot_id: [u8; 16],
    /// Optional features the guest supports.
    pub capabilities: Capabilities,
    /// Free-form agent version, UTF-8, at most [`MAX_AGENT_VERSION_LEN`] bytes.
    pub agent_version: &'a str,
}

impl Hello<'_> {
    /// The version the host should answer with in its [`HelloAck`]; see
    /// [`negotiate_version`].
    pub const fn negotiate(&self) -> Option<u8> {
        negotiate_version(self.min_version, self.max_version)
    }
}

/// Guest to host, every heartbeat interval: liveness and vital signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Heartbeat {
    /// Increments by one per heartbeat, starting at 0 after boot.
    pub seq: u64,
    /// Milliseconds since the guest booted.
    pub uptime_ms: u64,
    /// 1, 5 and 15 minute load averages times 100.
    pub load_avg_x100: [u32; 3],
    /// Free memory in KiB.
    pub free_mem_kib: u64,
    /// State of the role process.
    pub role_state: RoleState,
    /// How many times the guest restarted the role since boot.
    pub role_restarts: u32,
}

/// Guest to host: the role process was launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RoleStarted {
    /// Its pid inside the guest.
    pub pid: u32,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It exited with this code (wire tag 0).
    Code(i32),
    /// It was killed by this signal (wire tag 1).
    Signal(i32),
}

/// Guest to host: the role process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RoleExited {
    /// Its pid inside the guest.
    pub pid: u32,
    /// How it ended.
    pub status: ExitStatus,
}

/// Guest to host: one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Log<'a> {
    /// Severity.
    pub level: LogLevel,
    /// Origin.
    pub source: LogSource,
    /// The line, without its newline, at most [`MAX_LOG_LINE_LEN`] bytes.
    /// Raw bytes: a role may print anything, the host sanitises before
    /// displaying.
    pub line: &'a [u8],
}

/// Guest to host: answer to a [`Ping`], echoing its nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pong {
    /// The [`Ping::nonce`] being answered.
    pub nonce: u64,
}

/// A message the guest sends to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestMsg<'a> {
    /// [`kind::HELLO`].
    Hello(Hello<'a>),
    /// [`kind::HEARTBEAT`].
    Heartbeat(Heartbeat),
    /// [`kind::ROLE_STARTED`].
    RoleStarted(RoleStarted),
    /// [`kind::ROLE_EXITED`].
    RoleExited(RoleExited),
    /// [`kind::READY`]: the role (or a role-less test guest) is ready.
    Ready,
    /// [`kind::LOG`].
    Log(Log<'a>),
    /// [`kind::PONG`].
    Pong(Pong),
}

/// Host to guest, answer to [`Hello`]: the version both sides use from now on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HelloAck {
    /// The negotiated protocol version, or [`HelloAck::REJECTED`] if the
    /// guest's range and the host's don't overlap (the host then closes the
    /// connection).
    pub version: u8,
    /// Heartbeat interval to use from now on, in milliseconds, within
    /// `MIN_HEARTBEAT_INTERVAL_MS..=MAX_HEARTBEAT_INTERVAL_MS`.
    pub heartbeat_interval_ms: u32,
}

impl HelloAck {
    /// [`HelloAck::version`] value meaning "no common version".
    pub const REJECTED: u8 = 0;
}

/// Host to guest: liveness probe; the guest answers with a [`Pong`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ping {
    /// Opaque value echoed back in [`Pong::nonce`].
    pub nonce: u64,
}

/// Host to guest: shut down cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shutdown {
    /// Milliseconds the guest has before the host powers the VM off.
    pub deadline_ms: u32,
}

/// Host to guest: change the heartbeat interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SetHeartbeatInterval {
    /// New interval in milliseconds, within
    /// `MIN_HEARTBEAT_INTERVAL_MS..=MAX_HEARTBEAT_INTERVAL_MS`.
    pub interval_ms: u32,
}

/// A message the host sends to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostMsg {
    /// [`kind::HELLO_ACK`].
    HelloAck(HelloAck),
    /// [`kind::PING`].
    Ping(Ping),
    /// [`kind::SHUTDOWN`].
    Shutdown(Shutdown),
    /// [`kind::RESTART_ROLE`]: stop the role process and start it again.
    RestartRole,
    /// [`kind::SET_HEARTBEAT_INTERVAL`].
    SetHeartbeatInterval(SetHeartbeatInterval),
}

fn check_interval(ms: u32, field: &'static str) -> Result<(), ProtoError> {
    if (MIN_HEARTBEAT_INTERVAL_MS..=MAX_HEARTBEAT_INTERVAL_MS).contains(&ms) {
        Ok(())
    } else {
        Err(ProtoError::InvalidField { field })
    }
}

fn check_len(len: usize, max: usize, field: &'static str) -> Result<(), ProtoError> {
    if len <= max {
        Ok(())
    } else {
        Err(ProtoError::FieldTooLong { field, len, max })
    }
}

fn check_hello_versions(min: u8, max: u8) -> Result<(), ProtoError> {
    if min == 0 || min > max {
        Err(ProtoError::InvalidField {
            field: "hello.min_version",
        })
    } else {
        Ok(())
    }
}

// Payload sizes of the fixed parts.
const HELLO_FIXED: usize = 1 + 1 + 16 + 8 + 1;
const HEARTBEAT_LEN: usize = 8 + 8 + 3 * 4 + 8 + 1 + 4;
const ROLE_EXITED_LEN: usize = 4 + 1 + 4;
const LOG_FIXED: usize = 1 + 1 + 2;

impl<'a> sealed::Sealed<'a> for GuestMsg<'a> {
    fn read(kind: u8, r: &mut Reader<'a>) -> Result<Option<Self>, ProtoError> {
        let msg = match kind {
            kind::HELLO => {
                let min_version = r.u8()?;
                let max_version = r.u8()?;
                check_hello_versions(min_version, max_version)?;
                let boot_id = r.array()?;
                let capabilities = Capabilities(r.u64()?);
                let len = usize::from(r.u8()?);
                check_len(len, MAX_AGENT_VERSION_LEN, "hello.agent_version")?;
                let agent_version =
                    core::str::from_utf8(r.bytes(len)?).map_err(|_| ProtoError::InvalidUtf8 {
                        field: "hello.agent_version",
                    })?;
                Self::Hello(Hello {
                    min_version,
                    max_version,
                    boot_id,
                    capabilities,
                    agent_version,
                })
            }
            kind::HEARTBEAT => Self::Heartbeat(Heartbeat {
                seq: r.u64()?,
                uptime_ms: r.u64()?,
                load_avg_x100: [r.u32()?, r.u32()?, r.u32()?],
                free_mem_kib: r.u64()?,
                role_state: RoleState::read(r)?,
                role_restarts: r.u32()?,
            }),
            kind::ROLE_STARTED => Self::RoleStarted(RoleStarted { pid: r.u32()? }),
            kind::ROLE_EXITED => {
                let pid = r.u32()?;
                let tag = r.u8()?;
                let value = r.i32()?;
                let status = match tag {
                    0 => ExitStatus::Code(value),
                    1 => ExitStatus::Signal(value),
                    _ => {
                        return Err(ProtoError::InvalidField {
                            field: "role_exited.status",
                        })
                    }
                };
                Self::RoleExited(RoleExited { pid, status })
            }
            kind::READY => Self::Ready,
            kind::LOG => {
                let level = LogLevel::read(r)?;
                let source = LogSource::read(r)?;
                let len = usize::from(r.u16()?);
                check_len(len, MAX_LOG_LINE_LEN, "log.line")?;
                Self::Log(Log {
                    level,
                    source,
                    line: r.bytes(len)?,
                })
            }
            kind::PONG => Self::Pong(Pong { nonce: r.u64()? }),
            _ => return Ok(None),
        };
        Ok(Some(msg))
    }

    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            Self::Hello(h) => {
                check_hello_versions(h.min_version, h.max_version)?;
                check_len(
                    h.agent_version.len(),
                    MAX_AGENT_VERSION_LEN,
                    "hello.agent_version",
                )
            }
            Self::Log(l) => check_len(l.line.len(), MAX_LOG_LINE_LEN, "log.line"),
            Self::Heartbeat(_)
            | Self::RoleStarted(_)
            | Self::RoleExited(_)
            | Self::Ready
            | Self::Pong(_) => Ok(()),
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            Self::Hello(h) => HELLO_FIXED + h.agent_version.len(),
            Self::Heartbeat(_) => HEARTBEAT_LEN,
            Self::RoleStarted(_) => 4,
            Self::RoleExited(_) => ROLE_EXITED_LEN,
            Self::Ready => 0,
            Self::Log(l) => LOG_FIXED + l.line.len(),
            Self::Pong(_) => 8,
        }
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), ProtoError> {
        match self {
            Self::Hello(h) => {
                w.u8(h.min_version)?;
                w.u8(h.max_version)?;
                w.bytes(&h.boot_id)?;
                w.u64(h.capabilities.0)?;
                let len =
                    u8::try_from(h.agent_version.len()).map_err(|_| ProtoError::FieldTooLong {
                        field: "hello.agent_version",
                        len: h.agent_version.len(),
                        max: MAX_AGENT_VERSION_LEN,
                    })?;
                w.u8(len)?;
                w.bytes(h.agent_version.as_bytes())
            }
            Self::Heartbeat(hb) => {
                w.u64(hb.seq)?;
                w.u64(hb.uptime_ms)?;
                for v in hb.load_avg_x100 {
                    w.u32(v)?;
                }
                w.u64(hb.free_mem_kib)?;
                w.u8(hb.role_state.as_u8())?;
                w.u32(hb.role_restarts)
            }
            Self::RoleStarted(s) => w.u32(s.pid),
            Self::RoleExited(e) => {
                w.u32(e.pid)?;
                let (tag, value) = match e.status {
                    ExitStatus::Code(c) => (0, c),
                    ExitStatus::Signal(s) => (1, s),
                };
                w.u8(tag)?;
                w.i32(value)
            }
            Self::Ready => Ok(()),
            Self::Log(l) => {
                w.u8(l.level.as_u8())?;
                w.u8(l.source.as_u8())?;
                let len = u16::try_from(l.line.len()).map_err(|_| ProtoError::FieldTooLong {
                    field: "log.line",
                    len: l.line.len(),
                    max: MAX_LOG_LINE_LEN,
                })?;
                w.u16(len)?;
                w.bytes(l.line)
            }
            Self::Pong(p) => w.u64(p.nonce),
        }
    }
}

impl<'a> Message<'a> for GuestMsg<'a> {
    const SENDER: Sender = Sender::Guest;

    fn kind(&self) -> u8 {
        match self {
            Self::Hello(_) => kind::HELLO,
            Self::Heartbeat(_) => kind::HEARTBEAT,
            Self::RoleStarted(_) => kind::ROLE_STARTED,
            Self::RoleExited(_) => kind::ROLE_EXITED,
            Self::Ready => kind::READY,
            Self::Log(_) => kind::LOG,
            Self::Pong(_) => kind::PONG,
        }
    }
}

impl<'a> sealed::Sealed<'a> for HostMsg {
    fn read(kind: u8, r: &mut Reader<'a>) -> Result<Option<Self>, ProtoError> {
        let msg = match kind {
            kind::HELLO_ACK => {
                let version = r.u8()?;
                let heartbeat_interval_ms = r.u32()?;
                check_interval(heartbeat_interval_ms, "hello_ack.heartbeat_interval_ms")?;
                Self::HelloAck(HelloAck {
                    version,
                    heartbeat_interval_ms,
                })
            }
            kind::PING => Self::Ping(Ping { nonce: r.u64()? }),
            kind::SHUTDOWN => Self::Shutdown(Shutdown {
                deadline_ms: r.u32()?,
            }),
            kind::RESTART_ROLE => Self::RestartRole,
            kind::SET_HEARTBEAT_INTERVAL => {
                let interval_ms = r.u32()?;
                check_interval(interval_ms, "set_heartbeat_interval.interval_ms")?;
                Self::SetHeartbeatInterval(SetHeartbeatInterval { interval_ms })
            }
            _ => return Ok(None),
        };
        Ok(Some(msg))
    }

    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            Self::HelloAck(a) => {
                check_interval(a.heartbeat_interval_ms, "hello_ack.heartbeat_interval_ms")
            }
            Self::SetHeartbeatInterval(s) => {
                check_interval(s.interval_ms, "set_heartbeat_interval.interval_ms")
            }
            Self::Ping(_) | Self::Shutdown(_) | Self::RestartRole => Ok(()),
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            Self::HelloAck(_) => 5,
            Self::Ping(_) => 8,
            Self::Shutdown(_) | Self::SetHeartbeatInterval(_) => 4,
            Self::RestartRole => 0,
        }
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), ProtoError> {
        match self {
            Self::HelloAck(a) => {
                w.u8(a.version)?;
                w.u32(a.heartbeat_interval_ms)
            }
            Self::Ping(p) => w.u64(p.nonce),
            Self::Shutdown(s) => w.u32(s.deadline_ms),
            Self::RestartRole => Ok(()),
            Self::SetHeartbeatInterval(s) => w.u32(s.interval_ms),
        }
    }
}

impl Message<'_> for HostMsg {
    const SENDER: Sender = Sender::Host;

    fn kind(&self) -> u8 {
        match self {
            Self::HelloAck(_) => kind::HELLO_ACK,
            Self::Ping(_) => kind::PING,
            Self::Shutdown(_) => kind::SHUTDOWN,
            Self::RestartRole => kind::RESTART_ROLE,
            Self::SetHeartbeatInterval(_) => kind::SET_HEARTBEAT_INTERVAL,
        }
    }
}
