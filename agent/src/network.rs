//! The instance network: the node's instance subnet ([`Subnet`]), carved
//! into one /30 per instance ([`InstanceNet`]: the host's gateway address on
//! the instance's TAP, the guest's address), the pure allocator of those
//! slots ([`Allocator`]), and [`InstanceNetwork`], which the instance tasks
//! share: it allocates and frees slots, makes and removes TAPs and keeps the
//! agent's nftables table in step, through the
//! [`crate::backend::NetworkBackend`] seam. The plan is in
//! `docs/networking.md` ("The instance network").

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::backend::net::{NetError, NetRules, NetworkBackend, RuledInstance, TapSpec};
use crate::util::lock;

/// Each instance's block: a /30 (network, gateway, guest, broadcast).
pub const SLOT_PREFIX: u8 = 30;
/// Addresses per instance block.
pub const SLOT_SIZE: u32 = 1 << (32 - SLOT_PREFIX);
/// Shortest subnet prefix accepted (a /8: 4 Mi instances).
pub const MIN_SUBNET_PREFIX: u8 = 8;
/// The instances' MTU when the node config names none.
pub const DEFAULT_INSTANCE_MTU: u16 = 1500;
/// What every instance TAP's name starts with (then the slot number).
pub const TAP_PREFIX: &str = "rdg";

/// An IPv4 subnet `a.b.c.d/len` with no host bits set, `len` from
/// [`MIN_SUBNET_PREFIX`] to [`SLOT_PREFIX`]. Serialized as that text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    base: Ipv4Addr,
    prefix_len: u8,
}

/// Why a subnet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("instance subnet {text:?}: {why}")]
pub struct SubnetError {
    /// As given (escaped, bounded).
    pub text: String,
    /// What is wrong and how to fix it.
    pub why: String,
}

impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(s: &str) -> Result<Self, SubnetError> {
        let bad = |why: String| SubnetError {
            text: crate::util::escape_guest_text(s.as_bytes(), 40),
            why,
        };
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| bad("write it as an IPv4 network, a.b.c.d/len".into()))?;
        let base: Ipv4Addr = addr.parse().map_err(|_| {
            bad(format!(
                "{addr:?} is not an IPv4 address (IPv6 is not supported)"
            ))
        })?;
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| (MIN_SUBNET_PREFIX..=SLOT_PREFIX).contains(l))
            .ok_or_else(|| {
                bad(format!(
                    "the prefix length must be {MIN_SUBNET_PREFIX} to {SLOT_PREFIX} (one /{SLOT_PREFIX} per instance)"
                ))
            })?;
        let mask = u32::MAX << (32 - u32::from(prefix_len));
        if u32::from(base) & !mask != 0 {
            return Err(bad(format!(
                "host bits are set; the network is {}/{prefix_len}",
                Ipv4Addr::from(u32::from(base) & mask)
            )));
        }
        if base.is_loopback()
            || base.is_multicast()
            || u32::from(base) >> 28 >= 0xe
            || base.is_unspecified()
        {
            return Err(bad(
                "not a unicast range; use a private range such as 10.200.0.0/16".into(),
            ));
        }
        Ok(Subnet { base, prefix_len })
    }
}

impl TryFrom<String> for Subnet {
    type Error = SubnetError;
    fn try_from(s: String) -> Result<Self, SubnetError> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix_len)
    }
}

impl Subnet {
    /// The network address.
    pub fn base(&self) -> Ipv4Addr {
        self.base
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// How many instances it holds (one /30 each).
    pub fn slots(&self) -> u32 {
        1 << (SLOT_PREFIX - self.prefix_len)
    }

    /// Slot `slot`'s addresses, MAC and TAP name; `None` past the end.
    pub fn slot(&self, slot: u32, mtu: u16) -> Option<InstanceNet> {
        if slot >= self.slots() {
            return None;
        }
        let block = u32::from(self.base) + slot * SLOT_SIZE;
        let address = Ipv4Addr::from(block + 2);
        Some(InstanceNet {
            slot,
            tap: tap_name(slot),
            gateway: Ipv4Addr::from(block + 1),
            address,
            prefix_len: SLOT_PREFIX,
            mac: mac_for(address),
            mtu,
        })
    }
}

/// Slot `slot`'s TAP name: `rdg<slot>`, at most 10 bytes (the kernel allows 15).
pub fn tap_name(slot: u32) -> String {
    format!("{TAP_PREFIX}{slot}")
}

/// The guest's MAC for `address`: locally administered unicast,
/// `02:52:` then the address's four bytes, so it is unique on the node and
/// the same every time the instance starts.
pub fn mac_for(address: Ipv4Addr) -> String {
    let [a, b, c, d] = address.octets();
    format!("02:52:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// One instance's network, as recorded in its record and shown in its
/// status: its slot, TAP, addresses, MAC and MTU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceNet {
    /// The instance's /30 in the subnet (0 is the first).
    pub slot: u32,
    /// The TAP on the host (`rdg<slot>`).
    pub tap: String,
    /// The host's address on the TAP: the guest's default gateway.
    pub gateway: Ipv4Addr,
    /// The guest's address on `eth0`.
    pub address: Ipv4Addr,
    /// The prefix both are in (30).
    pub prefix_len: u8,
    /// The guest's MAC (derived from its address).
    pub mac: String,
    /// The MTU of the TAP and of the guest's `eth0`.
    pub mtu: u16,
}

impl InstanceNet {
    /// What the guest is told in its instance file.
    pub fn for_guest(&self) -> guest_proto::instance_file::InstanceNet {
        guest_proto::instance_file::InstanceNet {
            address: self.address,
            prefix_len: self.prefix_len,
            gateway: self.gateway,
            mtu: self.mtu,
        }
    }

    /// The virtio-net device the VMM gets.
    pub fn vmm_config(&self) -> vmm_api::NetConfig {
        vmm_api::NetConfig {
            tap: vmm_api::TapConfig::Name(self.tap.clone()),
            mac: self.mac.clone(),
            mtu: Some(self.mtu),
            rate_limit: None,
        }
    }

    /// The TAP the network backend makes.
    pub fn tap_spec(&self, owner_uid: Option<u32>) -> TapSpec {
        TapSpec {
            name: self.tap.clone(),
            gateway: self.gateway,
            prefix_len: self.prefix_len,
            mtu: self.mtu,
            owner_uid,
        }
    }
}

/// Why no address could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Every slot is taken.
    #[error("no free address in the instance subnet {subnet}: all {slots} instance addresses are in use; wait for removed instances to go, or give the node a larger instance_subnet")]
    Exhausted {
        /// The subnet.
        subnet: Subnet,
        /// Its slots.
        slots: u32,
    },
    /// A recorded slot is another instance's already, or outside the subnet.
    #[error("instance {id}: its recorded address (slot {slot}) {why}")]
    Conflict {
        /// The instance.
        id: String,
        /// The slot.
        slot: u32,
        /// Why it cannot be reserved.
        why: String,
    },
}

/// Which instance holds which slot: the lowest free slot is handed out.
/// Pure (no I/O); one per agent, behind [`InstanceNetwork`].
#[derive(Debug, Clone)]
pub struct Allocator {
    subnet: Subnet,
    mtu: u16,
    by_slot: BTreeMap<u32, String>,
}

impl Allocator {
    /// An empty allocator over `subnet`, handing out `mtu`.
    pub fn new(subnet: Subnet, mtu: u16) -> Self {
        Self {
            subnet,
            mtu,
            by_slot: BTreeMap::new(),
        }
    }

    /// Instance `id`'s network: the slot it holds already, else the lowest
    /// free one.
    pub fn allocate(&mut self, id: &str) -> Result<InstanceNet, AllocError> {
        if let Some((&slot, _)) = self.by_slot.iter().find(|(_, v)| *v == id) {
            return self.net(slot);
        }
        let mut slot = 0u32;
        for &taken in self.by_slot.keys() {
            if taken != slot {
                break;
            }
            slot += 1;
        }
        if slot >= self.subnet.slots() {
            return Err(AllocError::Exhausted {
                subnet: self.subnet,
                slots: self.subnet.slots(),
            });
        }
        self.by_slot.insert(slot, id.to_string());
        self.net(slot)
    }

    fn net(&self, slot: u32) -> Result<InstanceNet, AllocError> {
        self.subnet
            .slot(slot, self.mtu)
            .ok_or_else(|| AllocError::Exhausted {
                subnet: self.subnet,
                slots: self.subnet.slots(),
            })
    }

    /// Takes a recorded network back for `id` (after an agent restart). The
    /// record's addresses must be the slot's in this subnet; the MTU is the
    /// record's (a TAP keeps its MTU until the instance is made anew).
    pub fn reserve(&mut self, id: &str, net: &InstanceNet) -> Result<(), AllocError> {
        let conflict = |why: String| AllocError::Conflict {
            id: id.into(),
            slot: net.slot,
            why,
        };
        match self.subnet.slot(net.slot, net.mtu) {
            Some(want) if want == *net => {}
            _ => {
                return Err(conflict(format!(
                    "({} on {}) is not in the instance subnet {}; the node's subnet changed",
                    net.address, net.tap, self.subnet
                )))
            }
        }
        match self.by_slot.get(&net.slot) {
            Some(other) if other != id => {
                Err(conflict(format!("is held by instance {other} already")))
            }
            _ => {
                self.by_slot.retain(|_, v| v != id);
                self.by_slot.insert(net.slot, id.to_string());
                Ok(())
            }
        }
    }

    /// Frees `id`'s slot; whether it held one.
    pub fn free(&mut self, id: &str) -> bool {
        let n = self.by_slot.len();
        self.by_slot.retain(|_, v| v != id);
        self.by_slot.len() != n
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.by_slot.len()
    }

    /// The subnet.
    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// Every held slot's network with its instance, by slot.
    pub fn held(&self) -> Vec<(String, InstanceNet)> {
        self.by_slot
            .iter()
            .filter_map(|(&slot, id)| Some((id.clone(), self.subnet.slot(slot, self.mtu)?)))
            .collect()
    }
}

/// The node's instance network, shared by the instance tasks: the
/// allocator, the TAPs and the agent's nftables table, kept in step through
/// the network backend. Rules are rebuilt whole (one transaction) from the
/// instances that hold an address whenever that set changes.
pub struct InstanceNetwork {
    alloc: Mutex<Allocator>,
    /// Recorded MTUs of reserved instances (they keep theirs).
    kept: Mutex<BTreeMap<String, InstanceNet>>,
    backend: Arc<dyn NetworkBackend>,
    owner_uid: Option<u32>,
    /// Serializes rule rebuilds so the last one applied is the newest.
    rules: tokio::sync::Mutex<()>,
    /// Pinged whenever a slot is freed (a task waiting for an address).
    freed: tokio::sync::Notify,
}

impl fmt::Debug for InstanceNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceNetwork")
            .field("subnet", &lock(&self.alloc).subnet())
            .finish_non_exhaustive()
    }
}

impl InstanceNetwork {
    /// A network over `subnet` with no instance yet.
    pub fn new(
        subnet: Subnet,
        mtu: u16,
        owner_uid: Option<u32>,
        backend: Arc<dyn NetworkBackend>,
    ) -> Self {
        Self {
            alloc: Mutex::new(Allocator::new(subnet, mtu)),
            kept: Mutex::new(BTreeMap::new()),
            backend,
            owner_uid,
            rules: tokio::sync::Mutex::new(()),
            freed: tokio::sync::Notify::new(),
        }
    }

    /// The subnet.
    pub fn subnet(&self) -> Subnet {
        lock(&self.alloc).subnet()
    }

    /// Takes a recorded network back (at the agent's start, before any task runs).
    pub fn reserve(&self, id: &str, net: &InstanceNet) -> Result<(), AllocError> {
        lock(&self.alloc).reserve(id, net)?;
        lock(&self.kept).insert(id.to_string(), net.clone());
        Ok(())
    }

    /// Instance `id`'s network (the one it holds, or a new one).
    pub fn allocate(&self, id: &str) -> Result<InstanceNet, AllocError> {
        if let Some(n) = lock(&self.kept).get(id) {
            return Ok(n.clone());
        }
        lock(&self.alloc).allocate(id)
    }

    /// A future that is ready once some slot is freed after this call
    /// (enable it before trying [`InstanceNetwork::allocate`], so a slot
    /// freed in between is not missed).
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// Makes (or keeps) instance `net`'s TAP and rebuilds the rules.
    pub async fn attach(&self, net: &InstanceNet) -> Result<(), NetError> {
        self.backend
            .ensure_tap(&net.tap_spec(self.owner_uid))
            .await?;
        self.apply_rules().await
    }

    /// Removes `id`'s TAP, frees its slot and rebuilds the rules without it.
    pub async fn release(&self, id: &str, net: &InstanceNet) -> Result<(), NetError> {
        let removed = self.backend.remove_tap(&net.tap).await;
        lock(&self.kept).remove(id);
        let freed = lock(&self.alloc).free(id);
        let rules = self.apply_rules().await;
        if freed {
            self.freed.notify_waiters();
        }
        removed.and(rules)
    }

    /// The rules for the instances holding an address now.
    pub fn rules(&self) -> NetRules {
        let held = lock(&self.alloc).held();
        let kept = lock(&self.kept);
        NetRules {
            subnet: self.subnet(),
            instances: held
                .into_iter()
                .map(|(id, n)| {
                    let n = kept.get(&id).cloned().unwrap_or(n);
                    RuledInstance {
                        id,
                        tap: n.tap,
                        address: n.address,
                    }
                })
                .collect(),
        }
    }

    /// Replaces the agent's table with the rules for the instances holding
    /// an address now (one transaction).
    pub async fn apply_rules(&self) -> Result<(), NetError> {
        let _g = self.rules.lock().await;
        let rules = self.rules();
        self.backend.apply_rules(&rules).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(s: &str) -> Subnet {
        s.parse().expect(s)
    }

    #[test]
    fn subnets_are_checked() {
        let s = subnet("10.200.0.0/16");
        assert_eq!(s.slots(), 16384);
        assert_eq!(s.to_string(), "10.200.0.0/16");
        assert_eq!(subnet("192.168.7.4/30").slots(), 1);
        for (bad, want) in [
            (
                "10.200.0.1/16",
                "host bits are set; the network is 10.200.0.0/16",
            ),
            ("10.200.0.0/31", "prefix length must be 8 to 30"),
            ("10.0.0.0/7", "prefix length must be 8 to 30"),
            ("10.0.0.0", "a.b.c.d/len"),
            ("fd00::/64", "not an IPv4 address"),
            ("10.0.0.0/x", "prefix length"),
            ("127.0.0.0/8", "not a unicast range"),
            ("224.0.0.0/8", "not a unicast range"),
            ("240.0.0.0/8", "not a unicast range"),
            ("0.0.0.0/8", "not a unicast range"),
        ] {
            let e = bad.parse::<Subnet>().expect_err(bad).to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        let j: Subnet = serde_json::from_str("\"10.1.0.0/24\"").expect("json");
        assert_eq!(serde_json::to_string(&j).expect("json"), "\"10.1.0.0/24\"");
        assert!(serde_json::from_str::<Subnet>("\"10.1.0.1/24\"").is_err());
    }

    #[test]
    fn a_slot_is_a_slash_30_with_the_gateway_first() {
        let n = subnet("10.200.0.0/16").slot(3, 1400).expect("slot");
        assert_eq!(n.tap, "rdg3");
        assert_eq!(n.gateway, Ipv4Addr::new(10, 200, 0, 13));
        assert_eq!(n.address, Ipv4Addr::new(10, 200, 0, 14));
        assert_eq!(n.prefix_len, 30);
        assert_eq!(n.mac, "02:52:0a:c8:00:0e");
        assert_eq!(n.mtu, 1400);
        n.for_guest().check().expect("the guest accepts it");
        let cfg = n.vmm_config();
        assert_eq!(cfg.mac_bytes(), Some([2, 0x52, 10, 200, 0, 14]));
        let last = subnet("10.0.0.0/8")
            .slot((1 << 22) - 1, 1500)
            .expect("last");
        assert_eq!(last.address, Ipv4Addr::new(10, 255, 255, 254));
        assert!(last.tap.len() <= 15, "{}", last.tap);
        assert!(subnet("10.0.0.0/8").slot(1 << 22, 1500).is_none());
    }

    #[test]
    fn allocates_the_lowest_free_slot_and_frees() {
        let mut a = Allocator::new(subnet("10.0.0.0/28"), 1500);
        let slots: Vec<u32> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| a.allocate(id).expect("free").slot)
            .collect();
        assert_eq!(slots, [0, 1, 2, 3]);
        // The same instance keeps its slot.
        assert_eq!(a.allocate("b").expect("held").slot, 1);
        let e = a.allocate("e").expect_err("full");
        assert_eq!(
            e,
            AllocError::Exhausted {
                subnet: subnet("10.0.0.0/28"),
                slots: 4
            }
        );
        assert!(
            e.to_string()
                .contains("all 4 instance addresses are in use"),
            "{e}"
        );
        assert!(a.free("b"));
        assert!(!a.free("b"));
        assert_eq!(a.allocate("e").expect("freed").slot, 1);
        assert_eq!(a.in_use(), 4);
    }

    #[test]
    fn reserving_recorded_slots() {
        let s = subnet("10.0.0.0/24");
        let mut a = Allocator::new(s, 1500);
        let n5 = s.slot(5, 9000).expect("slot");
        a.reserve("x", &n5).expect("reserve");
        a.reserve("x", &n5).expect("again is fine");
        let e = a.reserve("y", &n5).expect_err("taken");
        assert!(e.to_string().contains("held by instance x"), "{e}");
        let other = subnet("10.1.0.0/24").slot(6, 1500).expect("slot");
        let e = a.reserve("z", &other).expect_err("elsewhere");
        assert!(
            e.to_string()
                .contains("not in the instance subnet 10.0.0.0/24"),
            "{e}"
        );
        let mut tampered = s.slot(7, 1500).expect("slot");
        tampered.address = Ipv4Addr::new(10, 0, 0, 99);
        assert!(a.reserve("z", &tampered).is_err());
        // New instances go around the reserved slot.
        let got: Vec<u32> = (0..6)
            .map(|i| a.allocate(&format!("n{i}")).expect("free").slot)
            .collect();
        assert_eq!(got, [0, 1, 2, 3, 4, 6]);
        assert_eq!(
            a.held()
                .iter()
                .find(|(id, _)| id == "x")
                .map(|(_, n)| n.slot),
            Some(5)
        );
    }
}
