//! The goal state a controller PUTs, the node's identity and capacity, and the
//! checks that keep an invalid or oversized goal out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest instance id (it names a directory and unix sockets, so it stays short).
pub const MAX_ID_LEN: usize = 48;
/// Longest role name.
pub const MAX_ROLE_LEN: usize = 64;
/// Most environment variables per instance.
pub const MAX_ENV_VARS: usize = 64;
/// Longest environment variable name.
pub const MAX_ENV_KEY_LEN: usize = 128;
/// Longest environment variable value.
pub const MAX_ENV_VALUE_LEN: usize = 4096;
/// Most bytes of environment (names + values) per instance.
pub const MAX_ENV_TOTAL: usize = 32 * 1024;
/// Largest resource disk, MiB (1 TiB).
pub const MAX_RESOURCE_DISK_MIB: u64 = 1 << 20;
/// Default resource disk size, MiB.
pub const DEFAULT_RESOURCE_DISK_MIB: u64 = 1024;
/// Default number of instances a node accepts.
pub const DEFAULT_MAX_INSTANCES: usize = 128;

/// The desired set of role instances on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoalState {
    /// Increases with every change the controller makes. The same incarnation
    /// again is a no-op; an older one is rejected.
    pub incarnation: u64,
    /// Every instance that should exist. Instances not listed are stopped and
    /// deleted.
    #[serde(default)]
    pub instances: Vec<InstanceSpec>,
}

/// One role instance: a VM running one role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// Unique on the node: 1 to 48 of `a-z`, `0-9`, `-`, starting with a letter
    /// or digit.
    pub id: String,
    /// The role's name (free text, 1 to 64 printable ASCII bytes).
    pub role: String,
    /// The base OS image: `sha256:<64 hex>` of an image in the agent's cache.
    pub base_image: String,
    /// The role package: a directory on the host, copied into the role disk.
    pub role_package: PathBuf,
    /// vCPUs, 1 to 64.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Resource (scratch) disk size, MiB.
    #[serde(default = "default_resource_disk_mib")]
    pub resource_disk_mib: u64,
    /// Environment for the role.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// How often the guest sends heartbeats, ms (100 to 60000).
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u32,
    /// Token buckets each of the instance's disks gets (every disk its own:
    /// bytes and requests per second). Left out: the node's
    /// [`NodeConfig::default_disk_rate_limit`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_rate_limit: Option<vmm_api::RateLimit>,
}

fn default_resource_disk_mib() -> u64 {
    DEFAULT_RESOURCE_DISK_MIB
}

fn default_heartbeat_interval_ms() -> u32 {
    guest_proto::DEFAULT_HEARTBEAT_INTERVAL_MS
}

/// What a node offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk for instances' resource disks, MiB.
    pub disk_mib: u64,
}

/// This node's identity and capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// The node's id as the controller knows it.
    pub node_id: String,
    /// Fault domain (rack, power).
    pub fault_domain: u32,
    /// Update domain (rolling upgrades).
    pub update_domain: u32,
    /// What instances may use in total.
    pub capacity: Capacity,
    /// Most instances at once.
    pub max_instances: usize,
    /// The instances' network: an IPv4 subnet (`10.200.0.0/16`) the agent
    /// carves into a /30 per instance (`docs/networking.md`). Without one,
    /// instances get no network interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_subnet: Option<crate::network::Subnet>,
    /// The MTU of every instance's TAP and `eth0` (68 to 9000).
    #[serde(default = "default_instance_mtu")]
    pub instance_mtu: u16,
    /// Disk rate limit of instances whose spec sets none (None: unlimited).
    pub default_disk_rate_limit: Option<vmm_api::RateLimit>,
}

fn default_instance_mtu() -> u16 {
    crate::network::DEFAULT_INSTANCE_MTU
}

impl NodeConfig {
    /// A node with the given id and capacity, domains 0 and the default
    /// instance limit.
    pub fn new(node_id: impl Into<String>, capacity: Capacity) -> Self {
        Self {
            node_id: node_id.into(),
            fault_domain: 0,
            update_domain: 0,
            capacity,
            max_instances: DEFAULT_MAX_INSTANCES,
            instance_subnet: None,
            instance_mtu: crate::network::DEFAULT_INSTANCE_MTU,
            default_disk_rate_limit: None,
        }
    }
}

/// Why a goal state (or one instance) was refused.
#[derive(Debug, thiserror::Error)]
pub enum GoalError {
    /// An incarnation above the API's int64 range.
    #[error("goal incarnation {0} is above the largest allowed, {max}; incarnations are int64 (docs/openapi.yaml)", max = i64::MAX)]
    IncarnationTooLarge(u64),
    /// An older incarnation than the one applied.
    #[error("goal incarnation {got} is older than the applied incarnation {current}; send a newer incarnation")]
    Stale {
        /// Sent.
        got: u64,
        /// Applied.
        current: u64,
    },
    /// The same incarnation with different content.
    #[error("goal incarnation {0} was already applied with different content; bump the incarnation for every change")]
    Conflict(u64),
    /// Too many instances.
    #[error("the goal lists {count} instances but this node accepts at most {max}")]
    TooMany {
        /// Listed.
        count: usize,
        /// Allowed.
        max: usize,
    },
    /// More instances than the instance subnet has addresses.
    #[error("the goal lists {count} instances but the instance subnet {subnet} has addresses for {slots}; give the node a larger instance_subnet")]
    TooManyForSubnet {
        /// Listed.
        count: usize,
        /// The subnet.
        subnet: crate::network::Subnet,
        /// Its instance addresses.
        slots: u32,
    },
    /// Two instances with one id.
    #[error("instance id {0:?} appears more than once; ids must be unique")]
    DuplicateId(String),
    /// A bad field in one instance.
    #[error("instance {id:?}: {why}")]
    Invalid {
        /// The instance (as sent, escaped).
        id: String,
        /// What is wrong and how to fix it.
        why: String,
    },
    /// The sum over all instances exceeds the node.
    #[error("the goal needs {want} {what} but the node has {have}; remove or shrink instances")]
    OverCapacity {
        /// vCPUs, memory MiB or disk MiB.
        what: &'static str,
        /// Requested in total.
        want: u64,
        /// Available.
        have: u64,
    },
    /// The base image is not in the cache.
    #[error("instance {id:?}: base image {image} is not in the image cache; import it first (reddog cache import)")]
    UnknownImage {
        /// The instance.
        id: String,
        /// The reference.
        image: String,
    },
    /// An instance that does not exist (update or delete).
    #[error("no instance {0:?} in the goal state")]
    NoSuchInstance(String),
    /// An instance that already exists (create).
    #[error("instance {0:?} already exists; use update")]
    Exists(String),
    /// The goal could not be saved.
    #[error(
        "cannot save the goal state in the state directory: {0}; check the disk and permissions"
    )]
    Persist(#[source] std::io::Error),
}

fn invalid(id: &str, why: impl Into<String>) -> GoalError {
    GoalError::Invalid {
        id: crate::util::escape_guest_text(id.as_bytes(), 80),
        why: why.into(),
    }
}

/// Checks an instance id: 1 to [`MAX_ID_LEN`] of `a-z0-9-`, not starting with `-`.
pub fn check_id(id: &str) -> Result<(), GoalError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            id,
            format!("id must be 1 to {MAX_ID_LEN} characters of a-z, 0-9 and '-', not starting with '-'"),
        ))
    }
}

/// Parses an image reference `sha256:<64 hex>` (or the bare hex) into the hex.
pub fn parse_image_ref(r: &str) -> Option<String> {
    let hex = r.strip_prefix("sha256:").unwrap_or(r);
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

impl InstanceSpec {
    /// Checks every field's bounds (not the node-wide sums).
    pub fn validate(&self) -> Result<(), GoalError> {
        let id = &self.id;
        check_id(id)?;
        if self.role.is_empty()
            || self.role.len() > MAX_ROLE_LEN
            || !self.role.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        {
            return Err(invalid(
                id,
                format!("role must be 1 to {MAX_ROLE_LEN} printable ASCII characters"),
            ));
        }
        if parse_image_ref(&self.base_image).is_none() {
            return Err(invalid(
                id,
                "base_image must be sha256:<64 hex digits> of a cached image",
            ));
        }
        if !self.role_package.is_absolute() {
            return Err(invalid(id, "role_package must be an absolute path"));
        }
        if self.vcpus == 0 || self.vcpus > vmm_api::config::MAX_VCPUS {
            return Err(invalid(
                id,
                format!(
                    "vcpus must be 1 to {}, got {}",
                    vmm_api::config::MAX_VCPUS,
                    self.vcpus
                ),
            ));
        }
        let (lo, hi) = (
            vmm_api::config::MIN_MEMORY_MIB,
            vmm_api::config::MAX_MEMORY_MIB,
        );
        if !(lo..=hi).contains(&self.memory_mib) {
            return Err(invalid(
                id,
                format!("memory_mib must be {lo} to {hi}, got {}", self.memory_mib),
            ));
        }
        if self.resource_disk_mib == 0 || self.resource_disk_mib > MAX_RESOURCE_DISK_MIB {
            return Err(invalid(
                id,
                format!(
                    "resource_disk_mib must be 1 to {MAX_RESOURCE_DISK_MIB}, got {}",
                    self.resource_disk_mib
                ),
            ));
        }
        let (lo, hi) = (
            guest_proto::MIN_HEARTBEAT_INTERVAL_MS,
            guest_proto::MAX_HEARTBEAT_INTERVAL_MS,
        );
        if !(lo..=hi).contains(&self.heartbeat_interval_ms) {
            return Err(invalid(
                id,
                format!(
                    "heartbeat_interval_ms must be {lo} to {hi}, got {}",
                    self.heartbeat_interval_ms
                ),
            ));
        }
        if self.env.len() > MAX_ENV_VARS {
            return Err(invalid(
                id,
                format!("at most {MAX_ENV_VARS} environment variables"),
            ));
        }
        let mut total = 0;
        for (k, v) in &self.env {
            let key_ok = !k.is_empty()
                && k.len() <= MAX_ENV_KEY_LEN
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !key_ok {
                return Err(invalid(
                    id,
                    format!(
                        "environment name {:?} must be 1 to {MAX_ENV_KEY_LEN} of A-Z, a-z, 0-9, _ and not start with a digit",
                        crate::util::escape_guest_text(k.as_bytes(), 80)
                    ),
                ));
            }
            if v.len() > MAX_ENV_VALUE_LEN || v.contains('\0') {
                return Err(invalid(
                    id,
                    format!("environment value of {k} must be at most {MAX_ENV_VALUE_LEN} bytes without NUL"),
                ));
            }
            total += k.len() + v.len();
        }
        if total > MAX_ENV_TOTAL {
            return Err(invalid(
                id,
                format!("environment is {total} bytes; at most {MAX_ENV_TOTAL}"),
            ));
        }
        if let Some(r) = &self.disk_rate_limit {
            r.validate()
                .map_err(|why| invalid(id, format!("disk_rate_limit: {why}")))?;
        }
        Ok(())
    }

    /// The image's sha256 hex (valid after [`InstanceSpec::validate`]).
    pub fn image_sha256(&self) -> String {
        parse_image_ref(&self.base_image).unwrap_or_default()
    }
}

/// What a set of instances uses.
pub fn usage<'a>(specs: impl IntoIterator<Item = &'a InstanceSpec>) -> Capacity {
    let mut c = Capacity::default();
    for s in specs {
        c.vcpus += u32::from(s.vcpus);
        c.memory_mib += u64::from(s.memory_mib);
        c.disk_mib += s.resource_disk_mib;
    }
    c
}

impl GoalState {
    /// Checks the goal against the node: every instance's bounds, unique ids,
    /// the instance count and the sums against capacity.
    pub fn validate(&self, node: &NodeConfig) -> Result<(), GoalError> {
        if i64::try_from(self.incarnation).is_err() {
            return Err(GoalError::IncarnationTooLarge(self.incarnation));
        }
        if self.instances.len() > node.max_instances {
            return Err(GoalError::TooMany {
                count: self.instances.len(),
                max: node.max_instances,
            });
        }
        if let Some(subnet) = node.instance_subnet {
            if self.instances.len() > subnet.slots() as usize {
                return Err(GoalError::TooManyForSubnet {
                    count: self.instances.len(),
                    subnet,
                    slots: subnet.slots(),
                });
            }
        }
        let mut seen = BTreeSet::new();
        for s in &self.instances {
            s.validate()?;
            if !seen.insert(s.id.as_str()) {
                return Err(GoalError::DuplicateId(s.id.clone()));
            }
        }
        let used = usage(&self.instances);
        let cap = node.capacity;
        for (what, want, have) in [
            ("vCPUs", u64::from(used.vcpus), u64::from(cap.vcpus)),
            ("MiB of memory", used.memory_mib, cap.memory_mib),
            ("MiB of disk", used.disk_mib, cap.disk_mib),
        ] {
            if want > have {
                return Err(GoalError::OverCapacity { what, want, have });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn spec(id: &str) -> InstanceSpec {
        InstanceSpec {
            id: id.into(),
            role: "web".into(),
            base_image: format!("sha256:{}", "ab".repeat(32)),
            role_package: "/srv/roles/web".into(),
            vcpus: 1,
            memory_mib: 256,
            resource_disk_mib: 64,
            env: BTreeMap::new(),
            heartbeat_interval_ms: 1000,
            disk_rate_limit: None,
        }
    }

    fn node() -> NodeConfig {
        NodeConfig::new(
            "n1",
            Capacity {
                vcpus: 4,
                memory_mib: 1024,
                disk_mib: 1024,
            },
        )
    }

    #[test]
    fn ids() {
        for ok in ["a", "web-1", "0", &"x".repeat(MAX_ID_LEN)] {
            check_id(ok).expect(ok);
        }
        for bad in [
            "",
            "-a",
            "A",
            "a_b",
            "a/b",
            "..",
            "a b",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    type Mutation = fn(&mut InstanceSpec);

    #[test]
    fn field_bounds() {
        let cases: Vec<(Mutation, &str)> = vec![
            (|s| s.vcpus = 0, "vcpus"),
            (|s| s.vcpus = 65, "vcpus"),
            (|s| s.memory_mib = 8, "memory_mib"),
            (|s| s.resource_disk_mib = 0, "resource_disk_mib"),
            (|s| s.heartbeat_interval_ms = 50, "heartbeat_interval_ms"),
            (|s| s.base_image = "latest".into(), "base_image"),
            (|s| s.role_package = "relative".into(), "absolute"),
            (|s| s.role = String::new(), "role"),
            (
                |s| {
                    s.env.insert("1BAD".into(), "x".into());
                },
                "environment name",
            ),
            (
                |s| {
                    s.env.insert("K".into(), "x".repeat(MAX_ENV_VALUE_LEN + 1));
                },
                "environment value",
            ),
        ];
        for (mutate, want) in cases {
            let mut s = spec("a");
            mutate(&mut s);
            let err = s.validate().expect_err(want).to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        spec("a").validate().expect("valid");
    }

    #[test]
    fn disk_rate_limits_are_checked_and_optional_in_json() {
        let mut s = spec("a");
        s.disk_rate_limit = Some(vmm_api::RateLimit {
            bytes: Some(vmm_api::TokenBucket {
                per_second: 0,
                burst: None,
            }),
            ops: None,
        });
        let e = s.validate().expect_err("a zero rate");
        assert!(e.to_string().contains("disk_rate_limit: bytes"), "{e}");
        // Left out of the JSON (and not written back when unset).
        let j = serde_json::to_string(&spec("a")).expect("json");
        assert!(!j.contains("disk_rate_limit"), "{j}");
        let mut v: serde_json::Value = serde_json::from_str(&j).expect("value");
        v["disk_rate_limit"] = serde_json::json!({"ops": {"per_second": 100}});
        let back: InstanceSpec = serde_json::from_value(v).expect("with a limit");
        assert_eq!(
            back.disk_rate_limit
                .and_then(|r| r.ops)
                .map(|o| o.per_second),
            Some(100)
        );
    }

    /// docs/openapi.yaml says int64: one above is refused, the largest taken.
    #[test]
    fn incarnation_stays_in_int64() {
        let mut g = GoalState {
            incarnation: 1 << 63,
            instances: vec![],
        };
        let e = g.validate(&node()).expect_err("above int64");
        assert!(matches!(e, GoalError::IncarnationTooLarge(_)), "{e}");
        g.incarnation = (1 << 63) - 1;
        g.validate(&node()).expect("the largest int64");
    }

    #[test]
    fn capacity_and_counts() {
        let mut g = GoalState {
            incarnation: 1,
            instances: vec![spec("a"), spec("b")],
        };
        g.validate(&node()).expect("fits");
        g.instances[1].memory_mib = 900;
        let e = g
            .validate(&node())
            .expect_err("too much memory")
            .to_string();
        assert!(
            e.contains("1156 MiB of memory") && e.contains("1024"),
            "{e}"
        );
        g.instances[1] = spec("a");
        assert!(matches!(
            g.validate(&node()),
            Err(GoalError::DuplicateId(_))
        ));
        let mut n = node();
        n.max_instances = 1;
        g.instances[1] = spec("b");
        assert!(matches!(g.validate(&n), Err(GoalError::TooMany { .. })));
    }

    #[test]
    fn json_rejects_unknown_fields() {
        let e = serde_json::from_str::<GoalState>(r#"{"incarnation":1,"bogus":2}"#)
            .expect_err("unknown");
        assert!(e.to_string().contains("unknown field"));
        let g: GoalState = serde_json::from_str(r#"{"incarnation":3}"#).expect("minimal");
        assert!(g.instances.is_empty());
    }
}
