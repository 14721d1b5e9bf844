//! Test helpers: a small deterministic PRNG and random message generators.
#![allow(dead_code)]

use guest_proto::{
    Capabilities, ExitStatus, GuestMsg, Heartbeat, Hello, HelloAck, HostMsg, Log, LogLevel,
    LogSource, Ping, Pong, RoleExited, RoleStarted, RoleState, SetHeartbeatInterval, Shutdown,
    MAX_AGENT_VERSION_LEN, MAX_FRAME_LEN, MAX_HEARTBEAT_INTERVAL_MS, MAX_LOG_LINE_LEN,
    MIN_HEARTBEAT_INTERVAL_MS,
};

/// SplitMix64: tiny, fast, good enough to drive property tests.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn u32(&mut self) -> u32 {
        (self.u64() >> 32) as u32
    }

    pub fn u8(&mut self) -> u8 {
        (self.u64() >> 56) as u8
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }

    pub fn bool(&mut self) -> bool {
        self.u64() & 1 == 1
    }

    /// Mostly small or extreme values, sometimes anything: edge cases matter.
    pub fn interesting_u64(&mut self) -> u64 {
        match self.below(4) {
            0 => 0,
            1 => u64::MAX,
            2 => self.u64() % 1000,
            _ => self.u64(),
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.u8();
        }
    }
}

/// Random valid UTF-8 of at most `max` bytes (mixing 1- to 4-byte chars).
pub fn random_utf8(rng: &mut Rng, max: usize, out: &mut Vec<u8>) {
    out.clear();
    let target = rng.below(max + 1);
    const CHARS: [char; 8] = ['a', 'Z', '0', '.', ' ', 'é', '€', '🦀'];
    loop {
        let c = CHARS[rng.below(CHARS.len())];
        if out.len() + c.len_utf8() > target {
            break;
        }
        let mut tmp = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
    }
}

fn random_interval(rng: &mut Rng) -> u32 {
    match rng.below(3) {
        0 => MIN_HEARTBEAT_INTERVAL_MS,
        1 => MAX_HEARTBEAT_INTERVAL_MS,
        _ => {
            MIN_HEARTBEAT_INTERVAL_MS
                + rng.u32() % (MAX_HEARTBEAT_INTERVAL_MS - MIN_HEARTBEAT_INTERVAL_MS + 1)
        }
    }
}

/// Number of guest message kinds `random_guest` chooses among.
pub const GUEST_KINDS: usize = 7;
/// Number of host message kinds `random_host` chooses among.
pub const HOST_KINDS: usize = 5;

/// A random valid guest message of variant `which % GUEST_KINDS`; variable
/// fields live in `scratch`.
pub fn random_guest<'a>(rng: &mut Rng, which: usize, scratch: &'a mut Vec<u8>) -> GuestMsg<'a> {
    match which % GUEST_KINDS {
        0 => {
            random_utf8(rng, MAX_AGENT_VERSION_LEN, scratch);
            let min_version = 1 + rng.u8() % 8;
            let max_version = min_version.saturating_add(rng.u8() % 8);
            let mut boot_id = [0u8; 16];
            rng.fill(&mut boot_id);
            GuestMsg::Hello(Hello {
                min_version,
                max_version,
                boot_id,
                capabilities: Capabilities(rng.interesting_u64()),
                agent_version: std::str::from_utf8(scratch).expect("generator makes UTF-8"),
            })
        }
        1 => GuestMsg::Heartbeat(Heartbeat {
            seq: rng.interesting_u64(),
            uptime_ms: rng.interesting_u64(),
            load_avg_x100: [rng.u32(), rng.u32() % 1000, rng.u32()],
            free_mem_kib: rng.interesting_u64(),
            role_state: RoleState::from_u8(rng.u8() % 6).expect("0..6 are states"),
            role_restarts: rng.u32(),
        }),
        2 => GuestMsg::RoleStarted(RoleStarted { pid: rng.u32() }),
        3 => GuestMsg::RoleExited(RoleExited {
            pid: rng.u32(),
            status: if rng.bool() {
                ExitStatus::Code(rng.u32() as i32)
            } else {
                ExitStatus::Signal(rng.u32() as i32)
            },
        }),
        4 => GuestMsg::Ready,
        5 => {
            scratch.clear();
            let len = match rng.below(4) {
                0 => 0,
                1 => MAX_LOG_LINE_LEN,
                _ => rng.below(MAX_LOG_LINE_LEN + 1),
            };
            scratch.resize(len, 0);
            rng.fill(scratch);
            GuestMsg::Log(Log {
                level: LogLevel::from_u8(rng.u8() % 5).expect("0..5 are levels"),
                source: LogSource::from_u8(rng.u8() % 4).expect("0..4 are sources"),
                line: scratch,
            })
        }
        _ => GuestMsg::Pong(Pong {
            nonce: rng.interesting_u64(),
        }),
    }
}

/// A random valid host message of variant `which % HOST_KINDS`.
pub fn random_host(rng: &mut Rng, which: usize) -> HostMsg {
    match which % HOST_KINDS {
        0 => HostMsg::HelloAck(HelloAck {
            version: rng.u8(),
            heartbeat_interval_ms: random_interval(rng),
        }),
        1 => HostMsg::Ping(Ping {
            nonce: rng.interesting_u64(),
        }),
        2 => HostMsg::Shutdown(Shutdown {
            deadline_ms: rng.u32(),
        }),
        3 => HostMsg::RestartRole,
        _ => HostMsg::SetHeartbeatInterval(SetHeartbeatInterval {
            interval_ms: random_interval(rng),
        }),
    }
}

/// Encodes at the current version into a fresh `Vec`.
pub fn enc_guest(msg: &GuestMsg<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let n = msg
        .encode(guest_proto::PROTOCOL_VERSION, &mut buf)
        .expect("valid message encodes");
    buf.truncate(n);
    buf
}

/// Encodes at the current version into a fresh `Vec`.
pub fn enc_host(msg: &HostMsg) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME_LEN];
    let n = msg
        .encode(guest_proto::PROTOCOL_VERSION, &mut buf)
        .expect("valid message encodes");
    buf.truncate(n);
    buf
}
