//! Typed events a controller embedding the agent subscribes to
//! ([`crate::Agent::subscribe`]).

use serde::Serialize;

use crate::backend::vmm::VmmExit;
use crate::endpoint::LeaveReason;
use crate::instance::Transition;

/// Something that happened on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AgentEvent {
    /// A goal state was applied.
    GoalApplied {
        /// Its incarnation.
        incarnation: u64,
        /// Instances created.
        created: Vec<String>,
        /// Instances whose spec changed.
        updated: Vec<String>,
        /// Instances being removed.
        removed: Vec<String>,
    },
    /// An instance changed state.
    Transition {
        /// The instance.
        instance: String,
        /// The change.
        transition: Transition,
    },
    /// An instance's guest wrote the boot timer (pushed by its VMM).
    GuestBooted {
        /// The instance.
        instance: String,
        /// Microseconds from the VMM's start.
        boot_time_us: u64,
    },
    /// An instance's guest agent said hello.
    GuestHello {
        /// The instance.
        instance: String,
        /// Boot id, hex.
        boot_id: String,
        /// The guest agent's version (escaped).
        agent_version: String,
    },
    /// The agent closed a guest connection because the guest broke the rules.
    GuestMisbehaved {
        /// The instance.
        instance: String,
        /// What it did.
        reason: String,
    },
    /// The role process inside an instance exited.
    RoleExited {
        /// The instance.
        instance: String,
        /// "exit code N" or "signal N".
        how: String,
    },
    /// An instance's VMM ended.
    VmmExited {
        /// The instance.
        instance: String,
        /// How (boxed: an exit report with registers is large).
        exit: Box<VmmExit>,
    },
    /// An instance is gone (stopped, disks deleted).
    InstanceRemoved {
        /// The instance.
        instance: String,
    },
    /// An instance joined an endpoint: the load balancer sends it new
    /// connections.
    EndpointJoined {
        /// The instance.
        instance: String,
        /// The endpoint's name.
        endpoint: String,
    },
    /// An instance left an endpoint: no new connections (open ones finish).
    EndpointLeft {
        /// The instance.
        instance: String,
        /// The endpoint's name.
        endpoint: String,
        /// Why.
        reason: LeaveReason,
        /// The last probe's failure, for `probe_failed` (escaped).
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_events_have_their_wire_form() {
        let joined = AgentEvent::EndpointJoined {
            instance: "w1".into(),
            endpoint: "http".into(),
        };
        assert_eq!(
            serde_json::to_value(&joined).expect("serializes"),
            serde_json::json!({"event": "endpoint_joined", "instance": "w1", "endpoint": "http"})
        );
        let left = AgentEvent::EndpointLeft {
            instance: "w1".into(),
            endpoint: "http".into(),
            reason: LeaveReason::ProbeFailed,
            detail: Some("status 500".into()),
        };
        assert_eq!(
            serde_json::to_value(&left).expect("serializes"),
            serde_json::json!({"event": "endpoint_left", "instance": "w1", "endpoint": "http", "reason": "probe_failed", "detail": "status 500"})
        );
        let drained = AgentEvent::EndpointLeft {
            instance: "w1".into(),
            endpoint: "http".into(),
            reason: LeaveReason::Draining,
            detail: None,
        };
        assert!(serde_json::to_value(&drained)
            .expect("serializes")
            .get("detail")
            .is_none());
    }
}
