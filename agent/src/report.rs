//! The node report (pushed upstream and served by `GET /v1/node`) and the
//! Prometheus metrics text.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::backend::guest::RoleStatus;
use crate::instance::InstanceState;
use crate::spec::Capacity;

/// One instance in a node report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSummary {
    /// Id.
    pub id: String,
    /// Role name.
    pub role: String,
    /// State.
    pub state: InstanceState,
    /// Since when (ms since the Unix epoch).
    pub since_unix_ms: u64,
    /// The guest's last sign of life (ms since the Unix epoch).
    pub last_heartbeat_unix_ms: Option<u64>,
    /// Restarts.
    pub restarts: u32,
    /// Times the guest side misbehaved (see
    /// [`crate::InstanceStatus::guest_misbehaviours`]).
    #[serde(default)]
    pub guest_misbehaviours: u32,
    /// The role's state, as the guest reports it.
    pub role_state: Option<RoleStatus>,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// Everything the controller needs to know about this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The node.
    pub node_id: String,
    /// Fault domain.
    pub fault_domain: u32,
    /// Update domain.
    pub update_domain: u32,
    /// The agent's version.
    pub agent_version: String,
    /// When the report was made (ms since the Unix epoch).
    pub generated_unix_ms: u64,
    /// The applied goal incarnation.
    pub goal_incarnation: Option<u64>,
    /// What the node offers.
    pub capacity: Capacity,
    /// What the instances in the goal state take.
    pub used: Capacity,
    /// Bytes in the image cache.
    pub image_cache_bytes: u64,
    /// Instances per state.
    pub instances: Vec<InstanceSummary>,
}

/// Counters of the upstream pusher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UpstreamStats {
    /// Reports delivered.
    pub pushed: u64,
    /// Failed attempts.
    pub failures: u64,
    /// Reports dropped because the backlog was full.
    pub dropped: u64,
    /// Reports waiting.
    pub backlog: usize,
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the report and counters as Prometheus text exposition.
pub fn prometheus(r: &NodeReport, up: Option<UpstreamStats>) -> String {
    let mut o = String::new();
    let node = escape_label(&r.node_id);
    let gauge = |o: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(
            o,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{node=\"{node}\"}} {v}"
        );
    };
    gauge(
        &mut o,
        "reddog_capacity_vcpus",
        "vCPUs the node offers.",
        u64::from(r.capacity.vcpus),
    );
    gauge(
        &mut o,
        "reddog_used_vcpus",
        "vCPUs of the goal's instances.",
        u64::from(r.used.vcpus),
    );
    gauge(
        &mut o,
        "reddog_capacity_memory_mib",
        "Memory the node offers, MiB.",
        r.capacity.memory_mib,
    );
    gauge(
        &mut o,
        "reddog_used_memory_mib",
        "Memory of the goal's instances, MiB.",
        r.used.memory_mib,
    );
    gauge(
        &mut o,
        "reddog_capacity_disk_mib",
        "Disk the node offers, MiB.",
        r.capacity.disk_mib,
    );
    gauge(
        &mut o,
        "reddog_used_disk_mib",
        "Resource disks of the goal's instances, MiB.",
        r.used.disk_mib,
    );
    gauge(
        &mut o,
        "reddog_image_cache_bytes",
        "Bytes in the image cache.",
        r.image_cache_bytes,
    );
    gauge(
        &mut o,
        "reddog_goal_incarnation",
        "The applied goal incarnation.",
        r.goal_incarnation.unwrap_or(0),
    );
    let _ = writeln!(
        o,
        "# HELP reddog_instances Instances per state.\n# TYPE reddog_instances gauge"
    );
    for s in InstanceState::ALL {
        let n = r.instances.iter().filter(|i| i.state == s).count();
        let _ = writeln!(o, "reddog_instances{{state=\"{s}\"}} {n}");
    }
    let _ = writeln!(o, "# HELP reddog_instance_restarts_total Restarts per instance.\n# TYPE reddog_instance_restarts_total counter");
    for i in &r.instances {
        let _ = writeln!(
            o,
            "reddog_instance_restarts_total{{instance=\"{}\",role=\"{}\"}} {}",
            escape_label(&i.id),
            escape_label(&i.role),
            i.restarts
        );
    }
    let _ = writeln!(o, "# HELP reddog_instance_guest_misbehaviours_total Guest connections closed for misbehaviour, and hellos with a new boot id from a VM that did not restart.\n# TYPE reddog_instance_guest_misbehaviours_total counter");
    for i in &r.instances {
        let _ = writeln!(
            o,
            "reddog_instance_guest_misbehaviours_total{{instance=\"{}\",role=\"{}\"}} {}",
            escape_label(&i.id),
            escape_label(&i.role),
            i.guest_misbehaviours
        );
    }
    if let Some(u) = up {
        for (name, help, v) in [
            (
                "reddog_upstream_pushed_total",
                "Node reports delivered upstream.",
                u.pushed,
            ),
            (
                "reddog_upstream_failures_total",
                "Failed upstream pushes.",
                u.failures,
            ),
            (
                "reddog_upstream_dropped_total",
                "Reports dropped from a full backlog.",
                u.dropped,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP reddog_upstream_backlog Reports waiting to be pushed.\n# TYPE reddog_upstream_backlog gauge\nreddog_upstream_backlog {}",
            u.backlog
        );
    }
    o
}
