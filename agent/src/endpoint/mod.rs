//! Endpoints: what an instance declares ([`spec`]), whether it takes traffic
//! ([`membership`], fed by [`probe`]), and the kernel load balancer that
//! spreads a node port's connections over the members ([`nft`]).
//!
//! The pieces are pure or self-contained; the instance lifecycle drives them
//! (probe while running, drain before a planned stop, leave on a VMM exit)
//! and turns their [`membership::MemberChange`]s into
//! [`crate::AgentEvent::EndpointJoined`] / [`crate::AgentEvent::EndpointLeft`]
//! and a rebuild of the balancer's table. See `docs/networking.md`.

pub mod membership;
pub mod nft;
pub mod probe;
pub mod spec;

pub use membership::{DrainPlan, LeaveReason, MemberChange, MemberInput, Membership};
pub use nft::{LbEndpoint, LbError, LoadBalancer, NftCommand};
pub use probe::{probe, ProbeError};
pub use spec::{
    validate_goal_endpoints, EndpointError, EndpointSpec, InstanceEndpoints, ProbeSpec, Protocol,
};
