//! The instance file: what the host agent tells `reddog-guest` about the
//! instance, as a file at the root of its role disk ([`INSTANCE_FILE`]).
//!
//! One definition for both sides: the host agent builds an [`InstanceFile`]
//! and writes [`InstanceFile::encode`]'s bytes; the guest reads them back
//! with [`InstanceFile::decode`], which is strict (the guest is where the
//! file is checked; the encoder only bounds its size). The layout is
//! `{"version":1,"instance_id":...,"role":...,"env":{...},"net":{...}}` plus a
//! newline (`net` only when the instance has a network interface),
//! at most [`MAX_INSTANCE_FILE_BYTES`]; the rules are in
//! `docs/guest-agent.md` ("The instance file").
//!
//! Behind the `instance-file` feature (std, serde, serde_json).

use std::collections::BTreeMap;
use std::format;
use std::net::Ipv4Addr;
use std::string::String;
use std::vec::Vec;

use serde::{Deserialize, Serialize};

/// The file's name at the root of every role disk (a role package may not
/// hold a file of this name).
pub const INSTANCE_FILE: &str = "reddog-instance.json";
/// Largest instance file, in bytes: the encoder refuses to write a larger
/// one and the decoder to read one.
pub const MAX_INSTANCE_FILE_BYTES: usize = 64 * 1024;
/// The format version this crate writes and reads.
pub const INSTANCE_FILE_VERSION: u32 = 1;
/// Longest instance id.
pub const MAX_INSTANCE_ID: usize = 64;
/// Longest role name.
pub const MAX_ROLE_NAME: usize = 64;
/// Most environment variables (the role manifest's bound too).
pub const MAX_ENV: usize = 256;
/// Longest environment variable name.
pub const MAX_ENV_NAME: usize = 256;
/// Longest environment variable value.
pub const MAX_ENV_VALUE: usize = 4096;

/// The instance file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceFile {
    /// Format version ([`INSTANCE_FILE_VERSION`]).
    pub version: u32,
    /// The instance's id (`[a-z0-9-]`, 1 to [`MAX_INSTANCE_ID`] bytes).
    pub instance_id: String,
    /// The role's name (printable ASCII and spaces, 1 to [`MAX_ROLE_NAME`] bytes).
    pub role: String,
    /// The instance's environment (wins over the role manifest's); checked
    /// as [`check_env`]. May be left out when reading.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The instance's network interface (`eth0`), when the node gives it
    /// one; checked as [`InstanceNet::check`]. Left out when there is none.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_net"
    )]
    pub net: Option<InstanceNet>,
}

/// `net`, when present, is an object (`null` is refused: the host agent
/// leaves the field out instead).
fn present_net<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<InstanceNet>, D::Error> {
    InstanceNet::deserialize(d).map(Some)
}

/// Smallest MTU the guest accepts (IPv4's minimum).
pub const MIN_NET_MTU: u16 = 68;
/// Largest MTU the guest accepts (virtio-net's and the TAP's limit).
pub const MAX_NET_MTU: u16 = 65535;

/// What `reddog-guest` configures on `eth0`: its address and prefix, the
/// default gateway (the host's end of the instance's TAP) and the MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceNet {
    /// The guest's IPv4 address (dotted quad).
    pub address: Ipv4Addr,
    /// Its prefix length, 8 to 30.
    pub prefix_len: u8,
    /// The default gateway: in the same prefix, not the address itself.
    pub gateway: Ipv4Addr,
    /// The interface's MTU, [`MIN_NET_MTU`] to [`MAX_NET_MTU`].
    pub mtu: u16,
}

impl InstanceNet {
    /// Checks the fields: a prefix of 8 to 30, an address and gateway that
    /// are distinct unicast hosts (not the prefix's network or broadcast
    /// address) of one prefix, an MTU within bounds.
    pub fn check(&self) -> Result<(), InstanceFileError> {
        if !(8..=30).contains(&self.prefix_len) {
            return Err(invalid(
                "net.prefix_len",
                format!("{} is not 8 to 30", self.prefix_len),
            ));
        }
        let mask = u32::MAX << (32 - u32::from(self.prefix_len));
        let host = |a: Ipv4Addr, field: &str| {
            let v = u32::from(a);
            let h = v & !mask;
            if a.is_multicast() || a.is_loopback() || a.is_unspecified() || a.is_broadcast() {
                Err(invalid(field, format!("{a} is not a unicast address")))
            } else if h == 0 || h == !mask {
                Err(invalid(
                    field,
                    format!(
                        "{a} is the network or broadcast address of its /{}",
                        self.prefix_len
                    ),
                ))
            } else {
                Ok(v & mask)
            }
        };
        let net = host(self.address, "net.address")?;
        if host(self.gateway, "net.gateway")? != net || self.gateway == self.address {
            return Err(invalid(
                "net.gateway",
                format!(
                    "{} is not another host of {}/{}",
                    self.gateway, self.address, self.prefix_len
                ),
            ));
        }
        if self.mtu < MIN_NET_MTU {
            return Err(invalid(
                "net.mtu",
                format!("{} is below {MIN_NET_MTU}", self.mtu),
            ));
        }
        Ok(())
    }
}

/// Why an instance file could not be written or was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstanceFileError {
    /// Larger than [`MAX_INSTANCE_FILE_BYTES`] (encoding or decoding).
    #[error("the instance file is {len} bytes, more than reddog-guest reads ({MAX_INSTANCE_FILE_BYTES}); shorten the instance's environment in the goal state (each control character takes 6 bytes in JSON)")]
    TooLarge {
        /// Its size.
        len: usize,
    },
    /// Not UTF-8.
    #[error("not UTF-8 text; the host agent writes JSON")]
    NotUtf8,
    /// Not valid JSON for an instance file (syntax, types, unknown or
    /// missing fields).
    #[error("{source} (expected {{\"version\":1,\"instance_id\":...,\"role\":...,\"env\":{{...}},\"net\":{{...}}}} as the host agent writes it)")]
    Json {
        /// serde's message (with line and column).
        source: serde_json::Error,
    },
    /// A field is out of its bounds.
    #[error("instance file field `{field}`: {why}; fix the instance's spec in the goal state")]
    Invalid {
        /// The field (`env.NAME` for a variable).
        field: String,
        /// What is wrong.
        why: String,
    },
    /// serde_json could not encode it (not expected for strings).
    #[error("cannot encode the instance file: {source}")]
    Encode {
        /// serde's message.
        source: serde_json::Error,
    },
}

/// A variable of an environment that breaks [`check_env`]'s rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvProblem {
    /// `env` for the whole map, else `env.NAME`.
    pub field: String,
    /// What is wrong.
    pub why: String,
}

/// Checks an environment (the instance file's, and the role manifest's in
/// `reddog-guest`): at most [`MAX_ENV`] variables, names
/// `[A-Za-z_][A-Za-z0-9_]*` of at most [`MAX_ENV_NAME`] bytes, values of at
/// most [`MAX_ENV_VALUE`] bytes without NUL (so each can be passed to `execve`).
pub fn check_env(env: &BTreeMap<String, String>) -> Result<(), EnvProblem> {
    if env.len() > MAX_ENV {
        return Err(EnvProblem {
            field: "env".into(),
            why: format!("{} variables, at most {MAX_ENV}", env.len()),
        });
    }
    for (k, v) in env {
        let good_name = !k.is_empty()
            && k.len() <= MAX_ENV_NAME
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !k.as_bytes()[0].is_ascii_digit();
        let why = if !good_name {
            format!("a variable name is [A-Za-z_][A-Za-z0-9_]*, at most {MAX_ENV_NAME} bytes")
        } else if v.len() > MAX_ENV_VALUE {
            format!("{} bytes, at most {MAX_ENV_VALUE}", v.len())
        } else if v.contains('\0') {
            "holds a NUL byte".into()
        } else {
            continue;
        };
        return Err(EnvProblem {
            field: format!("env.{k}"),
            why,
        });
    }
    Ok(())
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> InstanceFileError {
    InstanceFileError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

impl InstanceFile {
    /// The file for an instance, at [`INSTANCE_FILE_VERSION`].
    pub fn new(
        instance_id: impl Into<String>,
        role: impl Into<String>,
        env: BTreeMap<String, String>,
    ) -> Self {
        Self {
            version: INSTANCE_FILE_VERSION,
            instance_id: instance_id.into(),
            role: role.into(),
            env,
            net: None,
        }
    }

    /// The same file with a network interface.
    pub fn with_net(mut self, net: Option<InstanceNet>) -> Self {
        self.net = net;
        self
    }

    /// The bytes to write: compact JSON with the fields in declaration order,
    /// the environment sorted by name, then a newline; at most
    /// [`MAX_INSTANCE_FILE_BYTES`] ([`InstanceFileError::TooLarge`] otherwise).
    /// Does not check the fields ([`InstanceFile::check`] does).
    pub fn encode(&self) -> Result<Vec<u8>, InstanceFileError> {
        let mut b =
            serde_json::to_vec(self).map_err(|source| InstanceFileError::Encode { source })?;
        b.push(b'\n');
        if b.len() > MAX_INSTANCE_FILE_BYTES {
            return Err(InstanceFileError::TooLarge { len: b.len() });
        }
        Ok(b)
    }

    /// Reads a file's `bytes`, strictly: at most [`MAX_INSTANCE_FILE_BYTES`],
    /// UTF-8, JSON with the known fields only (`env` and `net` may be left out), then
    /// [`InstanceFile::check`].
    pub fn decode(bytes: &[u8]) -> Result<Self, InstanceFileError> {
        if bytes.len() > MAX_INSTANCE_FILE_BYTES {
            return Err(InstanceFileError::TooLarge { len: bytes.len() });
        }
        let text = core::str::from_utf8(bytes).map_err(|_| InstanceFileError::NotUtf8)?;
        // A JSON object, as the host agent writes it: serde would also take
        // the fields as an array (`[1,"id","role"]`), which no agent writes.
        if !text.trim_start().starts_with('{') {
            return Err(invalid(
                "(file)",
                "not a JSON object; the host agent writes {\"version\":1,...}",
            ));
        }
        let file: Self =
            serde_json::from_str(text).map_err(|source| InstanceFileError::Json { source })?;
        file.check()?;
        Ok(file)
    }

    /// Checks every field: the version is [`INSTANCE_FILE_VERSION`], the id
    /// and role name are within their bounds, the environment passes
    /// [`check_env`].
    pub fn check(&self) -> Result<(), InstanceFileError> {
        if self.version != INSTANCE_FILE_VERSION {
            return Err(invalid(
                "version",
                format!(
                    "{} is not a known instance file version ({INSTANCE_FILE_VERSION}); the host agent is newer than this guest agent",
                    self.version
                ),
            ));
        }
        let id_ok = !self.instance_id.is_empty()
            && self.instance_id.len() <= MAX_INSTANCE_ID
            && self
                .instance_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !id_ok {
            return Err(invalid(
                "instance_id",
                format!("1 to {MAX_INSTANCE_ID} bytes of a-z, 0-9 and '-'"),
            ));
        }
        let role_ok = !self.role.is_empty()
            && self.role.len() <= MAX_ROLE_NAME
            && self.role.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
        if !role_ok {
            return Err(invalid(
                "role",
                format!("1 to {MAX_ROLE_NAME} printable ASCII bytes"),
            ));
        }
        check_env(&self.env).map_err(|p| invalid(p.field, p.why))?;
        match &self.net {
            Some(n) => n.check(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn dec(text: &str) -> Result<InstanceFile, InstanceFileError> {
        InstanceFile::decode(text.as_bytes())
    }

    /// What the host agent's encoder (`agent/src/disks.rs`, serde_json of
    /// its own `InstanceFile` plus a newline) wrote for these inputs before
    /// the type moved here.
    #[test]
    fn encodes_byte_for_byte_as_the_host_agent_did() {
        let f = InstanceFile::new(
            "web-1",
            "web tier",
            env(&[
                ("MODE", "prod \"quoted\"\n"),
                ("PATH_X", "/a\\b\tc"),
                ("CTRL", "\u{1}\u{7f}é✓"),
                ("EMPTY", ""),
            ]),
        );
        assert_eq!(
            String::from_utf8(f.encode().expect("encode")).expect("utf-8"),
            "{\"version\":1,\"instance_id\":\"web-1\",\"role\":\"web tier\",\"env\":{\"CTRL\":\"\\u0001\u{7f}é✓\",\"EMPTY\":\"\",\"MODE\":\"prod \\\"quoted\\\"\\n\",\"PATH_X\":\"/a\\\\b\\tc\"}}\n"
        );
        let f = InstanceFile::new("a", "r", BTreeMap::new());
        assert_eq!(
            f.encode().expect("encode"),
            b"{\"version\":1,\"instance_id\":\"a\",\"role\":\"r\",\"env\":{}}\n"
        );
    }

    #[test]
    fn round_trip() {
        let f = InstanceFile::new(
            "web-1",
            "web tier",
            env(&[("MODE", "prod"), ("NEW", "a b\nc"), ("_U", "ünï")]),
        );
        let b = f.encode().expect("encode");
        assert_eq!(InstanceFile::decode(&b).expect("decode"), f);
        // `env` may be left out, and whitespace is fine.
        let f =
            dec("{ \"version\": 1, \"instance_id\": \"a\", \"role\": \"r\" }\n").expect("valid");
        assert_eq!(f, InstanceFile::new("a", "r", BTreeMap::new()));
        // The bounds themselves are accepted.
        let f = InstanceFile::new(
            "a".repeat(MAX_INSTANCE_ID),
            "r".repeat(MAX_ROLE_NAME),
            (1..MAX_ENV)
                .map(|i| (format!("V{i}"), String::new()))
                .chain([("N".repeat(MAX_ENV_NAME), "v".repeat(MAX_ENV_VALUE))])
                .collect(),
        );
        assert_eq!(f.env.len(), MAX_ENV);
        assert_eq!(
            InstanceFile::decode(&f.encode().expect("encode")).expect("decode"),
            f
        );
    }

    #[test]
    fn every_refusal_names_its_field() {
        let many: Vec<String> = (0..=MAX_ENV).map(|i| format!("\"V{i}\":\"x\"")).collect();
        let many = format!(
            r#"{{"version":1,"instance_id":"a","role":"r","env":{{{}}}}}"#,
            many.join(",")
        );
        let long = format!(
            r#"{{"version":1,"instance_id":"a","role":"r","env":{{"K":"{}"}}}}"#,
            "v".repeat(MAX_ENV_VALUE + 1)
        );
        let long_name = format!(
            r#"{{"version":1,"instance_id":"a","role":"r","env":{{"{}":"v"}}}}"#,
            "N".repeat(MAX_ENV_NAME + 1)
        );
        let long_id = format!(
            r#"{{"version":1,"instance_id":"{}","role":"r"}}"#,
            "a".repeat(MAX_INSTANCE_ID + 1)
        );
        let long_role = format!(
            r#"{{"version":1,"instance_id":"a","role":"{}"}}"#,
            "r".repeat(MAX_ROLE_NAME + 1)
        );
        let cases = [
            (
                r#"{"version":2,"instance_id":"a","role":"r"}"#,
                "field `version`",
            ),
            (
                r#"{"version":0,"instance_id":"a","role":"r"}"#,
                "field `version`",
            ),
            (
                r#"{"version":1,"instance_id":"a","role":"r","extra":1}"#,
                "unknown field `extra`",
            ),
            (r#"{"version":1,"role":"r"}"#, "missing field `instance_id`"),
            (r#"{"version":1,"instance_id":"a"}"#, "missing field `role`"),
            (
                r#"{"instance_id":"a","role":"r"}"#,
                "missing field `version`",
            ),
            (
                r#"{"version":1,"instance_id":"A/..","role":"r"}"#,
                "field `instance_id`",
            ),
            (
                r#"{"version":1,"instance_id":"","role":"r"}"#,
                "field `instance_id`",
            ),
            (long_id.as_str(), "field `instance_id`"),
            (
                r#"{"version":1,"instance_id":"a","role":""}"#,
                "field `role`",
            ),
            (
                r#"{"version":1,"instance_id":"a","role":"r\u0001"}"#,
                "field `role`",
            ),
            (
                r#"{"version":1,"instance_id":"a","role":"é"}"#,
                "field `role`",
            ),
            (long_role.as_str(), "field `role`"),
            (
                r#"{"version":1,"instance_id":"a","role":"r","env":{"1A":"x"}}"#,
                "env.1A",
            ),
            (
                r#"{"version":1,"instance_id":"a","role":"r","env":{"A-B":"x"}}"#,
                "env.A-B",
            ),
            (
                r#"{"version":1,"instance_id":"a","role":"r","env":{"":"x"}}"#,
                "env.",
            ),
            (long_name.as_str(), "a variable name is"),
            (
                r#"{"version":1,"instance_id":"a","role":"r","env":{"K":"a\u0000b"}}"#,
                "NUL",
            ),
            (
                r#"{"version":1,"instance_id":"a","role":"r","env":{"K":1}}"#,
                "invalid type",
            ),
            (
                r#"{"version":-1,"instance_id":"a","role":"r"}"#,
                "invalid value",
            ),
            (many.as_str(), "257 variables, at most 256"),
            (long.as_str(), "env.K"),
            ("[]", "not a JSON object"),
            ("", "not a JSON object"),
            (
                r#"{"version":1,"instance_id":"a","role":"r"} x"#,
                "trailing",
            ),
        ];
        for (text, want) in cases {
            let e = dec(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let e = InstanceFile::decode(b"{\"version\":1,\xff}").expect_err("not utf-8");
        assert!(matches!(e, InstanceFileError::NotUtf8), "{e}");
        assert!(e.to_string().contains("UTF-8"), "{e}");
    }

    #[test]
    fn size_is_bounded_both_ways() {
        // Decoding: refused by length alone, before parsing.
        let e = InstanceFile::decode(&[b' '; MAX_INSTANCE_FILE_BYTES + 1]).expect_err("large");
        assert!(
            matches!(e, InstanceFileError::TooLarge { len } if len == MAX_INSTANCE_FILE_BYTES + 1)
        );
        // Encoding: control characters take 6 bytes each.
        let huge = InstanceFile::new(
            "a",
            "r",
            (0..20)
                .map(|i| (format!("V{i}"), "\u{1}".repeat(MAX_ENV_VALUE)))
                .collect(),
        );
        let e = huge.encode().expect_err("huge");
        assert!(matches!(e, InstanceFileError::TooLarge { len } if len > MAX_INSTANCE_FILE_BYTES));
        assert!(
            e.to_string().contains("shorten the instance's environment"),
            "{e}"
        );
        // Exactly at the limit is fine, one more byte is not.
        let base = InstanceFile::new("a", "r", env(&[("K", "")]));
        let overhead = base.encode().expect("encode").len();
        let mut at = base.clone();
        at.env
            .insert("K".into(), "v".repeat(MAX_INSTANCE_FILE_BYTES - overhead));
        assert_eq!(
            at.encode().expect("at the limit").len(),
            MAX_INSTANCE_FILE_BYTES
        );
        at.env.insert(
            "K".into(),
            "v".repeat(MAX_INSTANCE_FILE_BYTES - overhead + 1),
        );
        assert!(matches!(
            at.encode(),
            Err(InstanceFileError::TooLarge { len }) if len == MAX_INSTANCE_FILE_BYTES + 1
        ));
    }

    #[test]
    fn check_env_alone() {
        assert_eq!(check_env(&env(&[("A_1", "x"), ("_b", "")])), Ok(()));
        let p = check_env(&env(&[("OK", "x"), ("9", "x")])).expect_err("digit first");
        assert_eq!(p.field, "env.9");
    }

    fn net() -> InstanceNet {
        InstanceNet {
            address: Ipv4Addr::new(10, 200, 0, 2),
            prefix_len: 30,
            gateway: Ipv4Addr::new(10, 200, 0, 1),
            mtu: 1500,
        }
    }

    #[test]
    fn the_network_round_trips_and_is_left_out_when_absent() {
        let f = InstanceFile::new("a", "r", BTreeMap::new()).with_net(Some(net()));
        let b = f.encode().expect("encode");
        assert_eq!(
            String::from_utf8(b.clone()).expect("utf-8"),
            "{\"version\":1,\"instance_id\":\"a\",\"role\":\"r\",\"env\":{},\"net\":{\"address\":\"10.200.0.2\",\"prefix_len\":30,\"gateway\":\"10.200.0.1\",\"mtu\":1500}}\n"
        );
        assert_eq!(InstanceFile::decode(&b).expect("decode"), f);
        // Without a network the bytes are the ones before `net` existed.
        let plain = InstanceFile::new("a", "r", BTreeMap::new());
        assert!(!String::from_utf8(plain.encode().expect("encode"))
            .expect("utf-8")
            .contains("net"));
    }

    #[test]
    fn every_network_refusal_names_its_field() {
        let with = |n: &str| format!(r#"{{"version":1,"instance_id":"a","role":"r","net":{n}}}"#);
        let cases = [
            (
                r#"{"address":"10.0.0.2","prefix_len":31,"gateway":"10.0.0.1","mtu":1500}"#,
                "net.prefix_len",
            ),
            (
                r#"{"address":"10.0.0.2","prefix_len":7,"gateway":"10.0.0.1","mtu":1500}"#,
                "net.prefix_len",
            ),
            (
                r#"{"address":"10.0.0.0","prefix_len":30,"gateway":"10.0.0.1","mtu":1500}"#,
                "net.address",
            ),
            (
                r#"{"address":"10.0.0.3","prefix_len":30,"gateway":"10.0.0.1","mtu":1500}"#,
                "net.address",
            ),
            (
                r#"{"address":"224.0.0.2","prefix_len":30,"gateway":"224.0.0.1","mtu":1500}"#,
                "net.address",
            ),
            (
                r#"{"address":"127.0.0.2","prefix_len":30,"gateway":"127.0.0.1","mtu":1500}"#,
                "net.address",
            ),
            (
                r#"{"address":"10.0.0.2","prefix_len":30,"gateway":"10.0.0.2","mtu":1500}"#,
                "net.gateway",
            ),
            (
                r#"{"address":"10.0.0.2","prefix_len":30,"gateway":"10.0.0.5","mtu":1500}"#,
                "net.gateway",
            ),
            (
                r#"{"address":"10.0.0.2","prefix_len":30,"gateway":"10.0.0.1","mtu":67}"#,
                "net.mtu",
            ),
            (
                r#"{"address":"10.0.0.2","prefix_len":30,"gateway":"10.0.0.1","mtu":65536}"#,
                "invalid value",
            ),
            (
                r#"{"address":"10.0.0.2","prefix_len":30,"gateway":"10.0.0.1"}"#,
                "missing field `mtu`",
            ),
            (
                r#"{"address":"10.0.0.2","prefix_len":30,"gateway":"10.0.0.1","mtu":1500,"dns":1}"#,
                "unknown field `dns`",
            ),
            (
                r#"{"address":"010.0.0.2","prefix_len":30,"gateway":"10.0.0.1","mtu":1500}"#,
                "invalid IPv4 address",
            ),
            (
                r#"{"address":"10.0.0.2/30","prefix_len":30,"gateway":"10.0.0.1","mtu":1500}"#,
                "invalid IPv4 address",
            ),
            (
                r#"{"address":[10,0,0,2],"prefix_len":30,"gateway":"10.0.0.1","mtu":1500}"#,
                "invalid type",
            ),
            ("null", "invalid type"),
        ];
        for (n, want) in cases {
            let text = with(n);
            let e = dec(&text).expect_err(&text).to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        // The bounds themselves.
        let edge =
            with(r#"{"address":"10.0.0.254","prefix_len":8,"gateway":"10.255.255.254","mtu":68}"#);
        assert!(dec(&edge).is_ok(), "{edge}");
    }

    #[test]
    fn the_fields_as_an_array_are_refused() {
        // Found by the fuzz target: serde reads a struct from a sequence too.
        let e = InstanceFile::decode(b"\n[1 ,\n\"e\"\n,\n\"^\"]\n \n ").expect_err("array");
        assert!(e.to_string().contains("not a JSON object"), "{e}");
        assert!(InstanceFile::decode(br#"{"version":1,"instance_id":"e","role":"r"}"#).is_ok());
    }
}
