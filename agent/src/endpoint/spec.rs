//! What a goal's instance declares about its endpoints, and the rules a goal's
//! endpoints must keep: per endpoint ([`EndpointSpec::validate`]) and over all
//! instances of the goal ([`validate_goal_endpoints`]).

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most endpoints one instance may declare.
pub const MAX_ENDPOINTS_PER_INSTANCE: usize = 16;
/// Longest endpoint name.
pub const MAX_NAME_LEN: usize = 32;
/// Longest probe path.
pub const MAX_PROBE_PATH_LEN: usize = 256;
/// Shortest and longest probe interval, ms.
pub const PROBE_INTERVAL_MS: std::ops::RangeInclusive<u32> = 100..=60_000;
/// Shortest probe timeout, ms.
pub const MIN_PROBE_TIMEOUT_MS: u32 = 10;
/// Allowed `successes` and `failures`.
pub const PROBE_COUNT: std::ops::RangeInclusive<u8> = 1..=10;

/// One endpoint of an instance: traffic to the node's `public_port` is
/// balanced over the instances of the role that answer their probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// 1 to 32 of `a-z`, `0-9`, `-`, starting with a letter. Instances of one
    /// role with the same endpoint name share it.
    pub name: String,
    /// The transport; only `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// The port on the node's addresses, 1 to 65535.
    pub public_port: u16,
    /// The port inside the instance, 1 to 65535.
    pub instance_port: u16,
    /// How the host decides the instance may take traffic.
    #[serde(default)]
    pub probe: ProbeSpec,
}

/// An endpoint's transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
}

/// The HTTP GET probe the host sends to `instance address:instance_port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    /// The path to GET: starts with `/`, at most 256 printable ASCII bytes
    /// without spaces.
    #[serde(default = "default_path")]
    pub path: String,
    /// Time between probes, ms (100 to 60000).
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u32,
    /// How long a probe may take, ms (at least 10, less than the interval).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u32,
    /// Consecutive good probes before the instance joins (1 to 10).
    #[serde(default = "default_successes")]
    pub successes: u8,
    /// Consecutive failed probes before a member leaves (1 to 10).
    #[serde(default = "default_failures")]
    pub failures: u8,
}

fn default_path() -> String {
    "/".into()
}
fn default_interval_ms() -> u32 {
    1000
}
fn default_timeout_ms() -> u32 {
    500
}
fn default_successes() -> u8 {
    1
}
fn default_failures() -> u8 {
    3
}

impl Default for ProbeSpec {
    fn default() -> Self {
        Self {
            path: default_path(),
            interval_ms: default_interval_ms(),
            timeout_ms: default_timeout_ms(),
            successes: default_successes(),
            failures: default_failures(),
        }
    }
}

/// What is wrong with a goal's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// A bad endpoint name.
    #[error("endpoint name {0:?} is not allowed: use 1 to 32 of a-z, 0-9 and '-', starting with a letter")]
    Name(String),
    /// Port 0.
    #[error("endpoint {name:?}: {which} port 0 is not allowed; use 1 to 65535")]
    PortZero {
        /// The endpoint.
        name: String,
        /// `public` or `instance`.
        which: &'static str,
    },
    /// A bad probe path.
    #[error("endpoint {name:?}: probe path {path:?} is not allowed; use '/' followed by at most 255 printable ASCII bytes without spaces")]
    ProbePath {
        /// The endpoint.
        name: String,
        /// The path (escaped by `Debug`).
        path: String,
    },
    /// A bad probe interval.
    #[error("endpoint {name:?}: probe interval {got} ms is out of range; use 100 to 60000 ms")]
    ProbeInterval {
        /// The endpoint.
        name: String,
        /// Sent.
        got: u32,
    },
    /// A bad probe timeout.
    #[error("endpoint {name:?}: probe timeout {got} ms must be at least 10 ms and less than the interval ({interval} ms)")]
    ProbeTimeout {
        /// The endpoint.
        name: String,
        /// Sent.
        got: u32,
        /// The interval.
        interval: u32,
    },
    /// A bad `successes` or `failures`.
    #[error("endpoint {name:?}: probe {which} {got} is out of range; use 1 to 10")]
    ProbeCount {
        /// The endpoint.
        name: String,
        /// `successes` or `failures`.
        which: &'static str,
        /// Sent.
        got: u8,
    },
    /// Too many endpoints on one instance.
    #[error("instance {instance:?} declares {count} endpoints; at most {max} are allowed", max = MAX_ENDPOINTS_PER_INSTANCE)]
    TooMany {
        /// The instance.
        instance: String,
        /// Declared.
        count: usize,
    },
    /// A bad endpoint, with its instance.
    #[error("instance {instance:?}: {source}")]
    Invalid {
        /// The instance.
        instance: String,
        /// What is wrong.
        source: Box<EndpointError>,
    },
    /// One instance names an endpoint twice.
    #[error("instance {instance:?} declares endpoint {name:?} twice; endpoint names must be unique per instance")]
    DuplicateName {
        /// The instance.
        instance: String,
        /// The endpoint.
        name: String,
    },
    /// One instance uses a public port twice.
    #[error("instance {instance:?} uses public port {port} for two endpoints; give each endpoint its own public port")]
    DuplicatePort {
        /// The instance.
        instance: String,
        /// The port.
        port: u16,
    },
    /// Two roles want one public port.
    #[error("public port {port} is claimed by roles {first:?} and {second:?}; two roles may not share a public port")]
    RolesSharePort {
        /// The port.
        port: u16,
        /// The role that claimed it first.
        first: String,
        /// The other role.
        second: String,
    },
    /// Two instances of one role disagree about an endpoint.
    #[error("role {role:?}: instance {instance:?} declares endpoint {name:?} differently from instance {other:?}; instances of a role sharing an endpoint must give it the same ports and probe")]
    Mismatch {
        /// The role.
        role: String,
        /// The endpoint.
        name: String,
        /// The instance that differs.
        instance: String,
        /// The instance declaring it first.
        other: String,
    },
    /// Two endpoints of one role on one public port.
    #[error("role {role:?}: public port {port} is used by endpoints {first:?} and {second:?}; give each endpoint its own public port")]
    RolePortTwice {
        /// The role.
        role: String,
        /// The port.
        port: u16,
        /// The endpoint first using it.
        first: String,
        /// The other endpoint.
        second: String,
    },
}

impl EndpointSpec {
    /// Checks this endpoint alone.
    pub fn validate(&self) -> Result<(), EndpointError> {
        let name = || self.name.clone();
        if !valid_name(&self.name) {
            return Err(EndpointError::Name(self.name.clone()));
        }
        if self.public_port == 0 {
            return Err(EndpointError::PortZero {
                name: name(),
                which: "public",
            });
        }
        if self.instance_port == 0 {
            return Err(EndpointError::PortZero {
                name: name(),
                which: "instance",
            });
        }
        let p = &self.probe;
        if !valid_path(&p.path) {
            return Err(EndpointError::ProbePath {
                name: name(),
                path: p.path.chars().take(MAX_PROBE_PATH_LEN + 1).collect(),
            });
        }
        if !PROBE_INTERVAL_MS.contains(&p.interval_ms) {
            return Err(EndpointError::ProbeInterval {
                name: name(),
                got: p.interval_ms,
            });
        }
        if p.timeout_ms < MIN_PROBE_TIMEOUT_MS || p.timeout_ms >= p.interval_ms {
            return Err(EndpointError::ProbeTimeout {
                name: name(),
                got: p.timeout_ms,
                interval: p.interval_ms,
            });
        }
        for (which, got) in [("successes", p.successes), ("failures", p.failures)] {
            if !PROBE_COUNT.contains(&got) {
                return Err(EndpointError::ProbeCount {
                    name: name(),
                    which,
                    got,
                });
            }
        }
        Ok(())
    }
}

fn valid_name(s: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&s.len())
        && s.as_bytes()[0].is_ascii_lowercase()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn valid_path(s: &str) -> bool {
    s.starts_with('/') && s.len() <= MAX_PROBE_PATH_LEN && s.bytes().all(|b| b.is_ascii_graphic())
}

/// One instance's endpoints, as [`validate_goal_endpoints`] takes them.
#[derive(Debug, Clone, Copy)]
pub struct InstanceEndpoints<'a> {
    /// The instance's id.
    pub instance: &'a str,
    /// Its role.
    pub role: &'a str,
    /// What it declares.
    pub endpoints: &'a [EndpointSpec],
}

/// Checks every instance's endpoints and the rules between them: instances of
/// one role may share an endpoint (same name, same ports and probe), two roles
/// may not share a public port, one instance may not declare a name or a
/// public port twice. `GoalState::validate` calls this with all its instances.
pub fn validate_goal_endpoints<'a>(
    instances: impl IntoIterator<Item = InstanceEndpoints<'a>>,
) -> Result<(), EndpointError> {
    // (role, name) -> (instance first declaring it, its spec)
    let mut by_name: BTreeMap<(&str, &str), (&str, &EndpointSpec)> = BTreeMap::new();
    // public port -> (role, endpoint name)
    let mut by_port: BTreeMap<u16, (&str, &str)> = BTreeMap::new();
    for inst in instances {
        if inst.endpoints.len() > MAX_ENDPOINTS_PER_INSTANCE {
            return Err(EndpointError::TooMany {
                instance: inst.instance.into(),
                count: inst.endpoints.len(),
            });
        }
        for (i, ep) in inst.endpoints.iter().enumerate() {
            ep.validate().map_err(|e| EndpointError::Invalid {
                instance: inst.instance.into(),
                source: Box::new(e),
            })?;
            for earlier in &inst.endpoints[..i] {
                if earlier.name == ep.name {
                    return Err(EndpointError::DuplicateName {
                        instance: inst.instance.into(),
                        name: ep.name.clone(),
                    });
                }
                if earlier.public_port == ep.public_port {
                    return Err(EndpointError::DuplicatePort {
                        instance: inst.instance.into(),
                        port: ep.public_port,
                    });
                }
            }
            match by_name.entry((inst.role, ep.name.as_str())) {
                Entry::Occupied(o) => {
                    let (other, first) = *o.get();
                    if first != ep {
                        return Err(EndpointError::Mismatch {
                            role: inst.role.into(),
                            name: ep.name.clone(),
                            instance: inst.instance.into(),
                            other: other.into(),
                        });
                    }
                }
                Entry::Vacant(v) => {
                    v.insert((inst.instance, ep));
                }
            }
            match by_port.entry(ep.public_port) {
                Entry::Occupied(o) => {
                    let (role, name) = *o.get();
                    if role != inst.role {
                        return Err(EndpointError::RolesSharePort {
                            port: ep.public_port,
                            first: role.into(),
                            second: inst.role.into(),
                        });
                    }
                    if name != ep.name {
                        return Err(EndpointError::RolePortTwice {
                            role: role.into(),
                            port: ep.public_port,
                            first: name.into(),
                            second: ep.name.clone(),
                        });
                    }
                }
                Entry::Vacant(v) => {
                    v.insert((inst.role, ep.name.as_str()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: &str, public: u16, inner: u16) -> EndpointSpec {
        EndpointSpec {
            name: name.into(),
            protocol: Protocol::Tcp,
            public_port: public,
            instance_port: inner,
            probe: ProbeSpec::default(),
        }
    }

    fn inst<'a>(id: &'a str, role: &'a str, eps: &'a [EndpointSpec]) -> InstanceEndpoints<'a> {
        InstanceEndpoints {
            instance: id,
            role,
            endpoints: eps,
        }
    }

    #[test]
    fn defaults_fill_in_and_unknown_fields_are_refused() {
        let e: EndpointSpec =
            serde_json::from_str(r#"{"name":"http","public_port":80,"instance_port":8080}"#)
                .expect("a minimal endpoint parses");
        assert_eq!(e, ep("http", 80, 8080));
        assert_eq!(e.probe.successes, 1);
        assert_eq!(e.probe.failures, 3);
        e.validate().expect("a valid endpoint");
        let with_probe: EndpointSpec = serde_json::from_str(
            r#"{"name":"http","protocol":"tcp","public_port":80,"instance_port":80,"probe":{"path":"/health","interval_ms":500,"timeout_ms":200}}"#,
        )
        .expect("an endpoint with a probe parses");
        assert_eq!(with_probe.probe.path, "/health");
        assert_eq!(with_probe.probe.failures, 3);
        for bad in [
            r#"{"name":"http","public_port":80,"instance_port":80,"weight":1}"#,
            r#"{"name":"http","public_port":80,"instance_port":80,"probe":{"verb":"HEAD"}}"#,
            r#"{"name":"http","protocol":"udp","public_port":80,"instance_port":80}"#,
            r#"{"name":"http","public_port":65536,"instance_port":80}"#,
            r#"{"name":"http","public_port":-1,"instance_port":80}"#,
        ] {
            assert!(serde_json::from_str::<EndpointSpec>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ports_must_not_be_zero() {
        assert!(matches!(
            ep("http", 0, 80).validate(),
            Err(EndpointError::PortZero {
                which: "public",
                ..
            })
        ));
        assert!(matches!(
            ep("http", 80, 0).validate(),
            Err(EndpointError::PortZero {
                which: "instance",
                ..
            })
        ));
        ep("http", 65535, 1).validate().expect("a valid endpoint");
    }

    #[test]
    fn names_are_bounded_and_plain() {
        for good in ["a", "http", "web-2", &"a".repeat(32)] {
            ep(good, 80, 80).validate().expect("a valid endpoint");
        }
        for bad in ["", "2web", "-a", "Web", "a b", "a_b", "é", &"a".repeat(33)] {
            assert!(
                matches!(ep(bad, 80, 80).validate(), Err(EndpointError::Name(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn probe_paths_are_bounded_and_printable() {
        let with = |path: &str| {
            let mut e = ep("http", 80, 80);
            e.probe.path = path.into();
            e.validate()
        };
        with("/").expect("a valid probe");
        with("/health?full=1").expect("a valid probe");
        with(&format!("/{}", "a".repeat(255))).expect("a valid probe");
        for bad in [
            String::new(),
            "health".into(),
            "/a b".into(),
            "/a\r\nHost: x".into(),
            "/\u{7f}".into(),
            "/é".into(),
            format!("/{}", "a".repeat(256)),
        ] {
            assert!(
                matches!(with(&bad), Err(EndpointError::ProbePath { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn probe_timing_and_counts_are_bounded() {
        let with = |f: &dyn Fn(&mut ProbeSpec)| {
            let mut e = ep("http", 80, 80);
            f(&mut e.probe);
            e.validate()
        };
        assert!(matches!(
            with(&|p| p.interval_ms = 99),
            Err(EndpointError::ProbeInterval { .. })
        ));
        assert!(matches!(
            with(&|p| p.interval_ms = 60_001),
            Err(EndpointError::ProbeInterval { .. })
        ));
        assert!(matches!(
            with(&|p| p.timeout_ms = 1000),
            Err(EndpointError::ProbeTimeout { .. })
        ));
        assert!(matches!(
            with(&|p| p.timeout_ms = 9),
            Err(EndpointError::ProbeTimeout { .. })
        ));
        with(&|p| p.timeout_ms = 999).expect("a valid probe");
        for (s, f) in [(0, 1), (11, 1), (1, 0), (1, 11)] {
            assert!(
                matches!(
                    with(&|p| {
                        p.successes = s;
                        p.failures = f;
                    }),
                    Err(EndpointError::ProbeCount { .. })
                ),
                "{s} {f}"
            );
        }
        with(&|p| {
            p.successes = 10;
            p.failures = 10;
        })
        .expect("the largest counts are valid");
    }

    #[test]
    fn instances_of_one_role_share_an_endpoint() {
        let a = [ep("http", 80, 8080), ep("admin", 81, 9000)];
        let b = [ep("http", 80, 8080)];
        validate_goal_endpoints([inst("w1", "web", &a), inst("w2", "web", &b)])
            .expect("valid endpoints");
    }

    #[test]
    fn a_shared_endpoint_must_be_declared_alike() {
        let a = [ep("http", 80, 8080)];
        let other_port = [ep("http", 80, 8081)];
        let mut other_probe = [ep("http", 80, 8080)];
        other_probe[0].probe.path = "/other".into();
        let moved = [ep("http", 81, 8080)];
        for b in [&other_port[..], &other_probe[..], &moved[..]] {
            assert!(matches!(
                validate_goal_endpoints([inst("w1", "web", &a), inst("w2", "web", b)]),
                Err(EndpointError::Mismatch { .. })
            ));
        }
    }

    #[test]
    fn two_roles_may_not_share_a_public_port() {
        let a = [ep("http", 80, 8080)];
        let b = [ep("api", 80, 8080)];
        let err = validate_goal_endpoints([inst("w1", "web", &a), inst("a1", "api", &b)])
            .expect_err("two roles on port 80");
        assert!(matches!(
            err,
            EndpointError::RolesSharePort { port: 80, .. }
        ));
        assert!(err.to_string().contains("may not share"), "{err}");
        // The same name in two roles on their own ports is fine.
        let c = [ep("http", 81, 8080)];
        validate_goal_endpoints([inst("w1", "web", &a), inst("a1", "api", &c)])
            .expect("valid endpoints");
    }

    #[test]
    fn one_role_may_not_put_two_endpoints_on_one_port() {
        let a = [ep("http", 80, 8080)];
        let b = [ep("web", 80, 8080)];
        assert!(matches!(
            validate_goal_endpoints([inst("w1", "web", &a), inst("w2", "web", &b)]),
            Err(EndpointError::RolePortTwice { port: 80, .. })
        ));
    }

    #[test]
    fn one_instance_may_not_repeat_a_name_or_a_port() {
        let names = [ep("http", 80, 8080), ep("http", 81, 8080)];
        assert!(matches!(
            validate_goal_endpoints([inst("w1", "web", &names)]),
            Err(EndpointError::DuplicateName { .. })
        ));
        let ports = [ep("http", 80, 8080), ep("admin", 80, 9000)];
        assert!(matches!(
            validate_goal_endpoints([inst("w1", "web", &ports)]),
            Err(EndpointError::DuplicatePort { port: 80, .. })
        ));
        // Two endpoints on one instance port are fine (two public doors to one server).
        let same_inner = [ep("http", 80, 8080), ep("alt", 8080, 8080)];
        validate_goal_endpoints([inst("w1", "web", &same_inner)]).expect("valid endpoints");
    }

    #[test]
    fn bad_endpoints_and_too_many_are_refused_with_the_instance() {
        let bad = [ep("http", 0, 80)];
        let err = validate_goal_endpoints([inst("w1", "web", &bad)]).expect_err("port 0");
        assert!(
            err.to_string()
                .starts_with("instance \"w1\": endpoint \"http\""),
            "{err}"
        );
        let many: Vec<_> = (0..17u16)
            .map(|i| ep(&format!("e{i}"), 1000 + i, 80))
            .collect();
        assert!(matches!(
            validate_goal_endpoints([inst("w1", "web", &many)]),
            Err(EndpointError::TooMany { count: 17, .. })
        ));
    }
}
