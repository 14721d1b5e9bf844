//! The agent <-> host network seam: make and remove an instance's TAP, and
//! replace the agent's own nftables table with the rules for the instances
//! that have a network. [`super::host_net::HostNetwork`] does it with the tun
//! ioctl, netlink (`rtnetlink`) and `nft -j`; `super::fake::FakeNet`
//! (feature `fake`) is for tests. What the rules say is in
//! `docs/networking.md` ("The rules the agent owns").

use std::net::Ipv4Addr;

use async_trait::async_trait;

use crate::network::Subnet;

/// One instance's TAP as the backend makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapSpec {
    /// Interface name (at most 15 bytes).
    pub name: String,
    /// The host's address on it (the guest's gateway).
    pub gateway: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// MTU.
    pub mtu: u16,
    /// The uid allowed to attach to it (the VMM's), when not root's.
    pub owner_uid: Option<u32>,
}

/// An instance as the rules know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuledInstance {
    /// Its id (in rule comments).
    pub id: String,
    /// Its TAP.
    pub tap: String,
    /// The only source address its frames may carry.
    pub address: Ipv4Addr,
}

/// Everything the agent's table is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRules {
    /// The instance subnet.
    pub subnet: Subnet,
    /// The instances holding an address, by slot.
    pub instances: Vec<RuledInstance>,
}

/// Errors from the host network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Making or changing a TAP failed.
    #[error("TAP {name}: {why}")]
    Tap {
        /// The interface.
        name: String,
        /// What failed and what to check.
        why: String,
    },
    /// The nftables transaction failed.
    #[error("cannot apply the agent's nftables table: {0}; check that nftables is installed (apt-get install nftables) and the agent has CAP_NET_ADMIN")]
    Rules(String),
}

/// Makes TAPs and applies the agent's firewall rules.
#[async_trait]
pub trait NetworkBackend: Send + Sync {
    /// Makes `tap` (persistent, owned by its uid), or keeps it when it
    /// exists: sets the gateway address (alone), the MTU and brings it up.
    /// Idempotent (an adopted instance's TAP, which its VMM holds open, is
    /// kept as it is and checked).
    async fn ensure_tap(&self, tap: &TapSpec) -> Result<(), NetError>;
    /// Removes the TAP named `name`; absent is fine.
    async fn remove_tap(&self, name: &str) -> Result<(), NetError>;
    /// Replaces the agent's table with the rules for `rules` in one
    /// transaction.
    async fn apply_rules(&self, rules: &NetRules) -> Result<(), NetError>;
}
