//! [`HostNetwork`]: the real [`NetworkBackend`]. TAPs are made persistent
//! with the tun ioctl (`tokio-tun`: `TUNSETIFF`, `TUNSETPERSIST`,
//! `TUNSETOWNER`) and configured over netlink (`rtnetlink`: address, MTU,
//! up; removed with `RTM_DELLINK`); the agent's table (`inet reddog`) is
//! replaced in one `nft -j -f -` transaction (the `nftables` crate). Nothing
//! is shelled out to `ip`. All of it acts on the network namespace of the
//! thread that calls it (the agent's: the host's).

use std::net::IpAddr;

use async_trait::async_trait;
use futures_util::stream::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::{Handle, LinkUnspec};
use serde_json::{json, Value};

use super::net::{NetError, NetRules, NetworkBackend, TapSpec};

/// The agent's nftables table: `inet reddog`.
pub const TABLE: &str = "reddog";
/// The set of instance TAP names.
pub const TAP_SET: &str = "instance_taps";
/// The chain endpoint traffic into instances is accepted in (jumped to from
/// `forward`; empty until endpoints exist).
pub const ENDPOINT_CHAIN: &str = "endpoints";
/// The chain that lets each TAP send only from its instance's address.
pub const SOURCE_CHAIN: &str = "instance_sources";

/// TAPs, netlink and nftables on this host.
#[derive(Debug, Clone, Default)]
pub struct HostNetwork {
    /// The `nft` binary (`nft` on `PATH` when unset).
    pub nft: Option<String>,
}

const ENODEV: i32 = 19;

fn tap_err(name: &str, what: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Tap {
        name: name.into(),
        why: format!("{what}: {e}; the agent needs CAP_NET_ADMIN and /dev/net/tun"),
    }
}

fn connect(name: &str) -> Result<Handle, NetError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| tap_err(name, "cannot open netlink", e))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The interface index of `name`, `None` when there is no such interface.
async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(m)) if m.code.map(|c| c.get()) == Some(-ENODEV) => {
            Ok(None)
        }
        Err(e) => Err(tap_err(name, "cannot look it up", e)),
    }
}

fn addr_of(m: &AddressMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })
}

#[async_trait]
impl NetworkBackend for HostNetwork {
    async fn ensure_tap(&self, tap: &TapSpec) -> Result<(), NetError> {
        let name = tap.name.as_str();
        if name.is_empty() || name.len() > 15 {
            return Err(tap_err(name, "bad name", "1 to 15 bytes"));
        }
        let handle = connect(name)?;
        let index = match link_index(&handle, name).await? {
            Some(i) => i,
            None => {
                let mut b = tokio_tun::Tun::builder().name(name).tap().persist();
                if let Some(uid) = tap.owner_uid {
                    let uid =
                        i32::try_from(uid).map_err(|_| tap_err(name, "bad owner uid", uid))?;
                    b = b.owner(uid);
                }
                // The fd is closed at once: the TAP persists for the VMM.
                drop(
                    b.build()
                        .map_err(|e| tap_err(name, "cannot create it", e))?,
                );
                link_index(&handle, name)
                    .await?
                    .ok_or_else(|| tap_err(name, "created but not found", "gone again"))?
            }
        };
        let gw = IpAddr::V4(tap.gateway);
        let mut addrs = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut have = false;
        let mut stale = Vec::new();
        while let Some(m) = addrs
            .try_next()
            .await
            .map_err(|e| tap_err(name, "cannot list its addresses", e))?
        {
            if addr_of(&m) == Some(gw) && m.header.prefix_len == tap.prefix_len {
                have = true;
            } else if matches!(addr_of(&m), Some(IpAddr::V4(_))) {
                stale.push(m);
            }
        }
        for m in stale {
            handle
                .address()
                .del(m)
                .execute()
                .await
                .map_err(|e| tap_err(name, "cannot remove a stale address", e))?;
        }
        if !have {
            handle
                .address()
                .add(index, gw, tap.prefix_len)
                .replace()
                .execute()
                .await
                .map_err(|e| tap_err(name, "cannot set its address", e))?;
        }
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .mtu(u32::from(tap.mtu))
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| tap_err(name, "cannot set its MTU and bring it up", e))?;
        Ok(())
    }

    async fn remove_tap(&self, name: &str) -> Result<(), NetError> {
        let handle = connect(name)?;
        match link_index(&handle, name).await? {
            None => Ok(()),
            Some(i) => match handle.link().del(i).execute().await {
                Ok(()) => Ok(()),
                Err(rtnetlink::Error::NetlinkError(m))
                    if m.code.map(|c| c.get()) == Some(-ENODEV) =>
                {
                    Ok(())
                }
                Err(e) => Err(tap_err(name, "cannot remove it", e)),
            },
        }
    }

    async fn apply_rules(&self, rules: &NetRules) -> Result<(), NetError> {
        let doc = ruleset(rules);
        let nft: nftables::schema::Nftables = serde_json::from_value(doc)
            .map_err(|e| NetError::Rules(format!("bad ruleset: {e}")))?;
        let program = self.nft.as_deref();
        nftables::helper::apply_ruleset_with_args_async(&nft, program, std::iter::empty::<&str>())
            .await
            .map_err(|e| NetError::Rules(e.to_string()))
    }
}

fn table() -> Value {
    json!({"family": "inet", "name": TABLE})
}

fn rule(chain: &str, expr: Vec<Value>, comment: Option<&str>) -> Value {
    let mut r = json!({"family": "inet", "table": TABLE, "chain": chain, "expr": expr});
    if let Some(c) = comment {
        r["comment"] = json!(c);
    }
    json!({"add": {"rule": r}})
}

fn meta_is(key: &str, right: Value) -> Value {
    json!({"match": {"op": "==", "left": {"meta": {"key": key}}, "right": right}})
}

fn from_taps() -> Value {
    meta_is("iifname", json!(format!("@{TAP_SET}")))
}

fn to_taps() -> Value {
    meta_is("oifname", json!(format!("@{TAP_SET}")))
}

fn replies() -> Value {
    json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}})
}

fn verdict(v: &str) -> Value {
    json!({ v: null })
}

fn jump(chain: &str) -> Value {
    json!({"jump": {"target": chain}})
}

/// The whole table for `rules`, as one nftables JSON transaction: the table
/// is created (if missing), deleted and made anew, so what is left is
/// exactly this. See `docs/networking.md` ("The rules the agent owns").
pub fn ruleset(rules: &NetRules) -> Value {
    let chain = |name: &str, hook: Option<&str>| {
        let mut c = json!({"family": "inet", "table": TABLE, "name": name});
        if let Some(h) = hook {
            c["type"] = json!("filter");
            c["hook"] = json!(h);
            c["prio"] = json!(0);
            c["policy"] = json!("accept");
        }
        json!({"add": {"chain": c}})
    };
    let mut set = json!({"family": "inet", "table": TABLE, "name": TAP_SET, "type": "ifname"});
    if !rules.instances.is_empty() {
        set["elem"] = json!(rules
            .instances
            .iter()
            .map(|i| i.tap.clone())
            .collect::<Vec<_>>());
    }
    let mut cmds = vec![
        json!({"add": {"table": table()}}),
        json!({"delete": {"table": table()}}),
        json!({"add": {"table": table()}}),
        json!({"add": {"set": set}}),
        chain(SOURCE_CHAIN, None),
        chain(ENDPOINT_CHAIN, None),
        chain("input", Some("input")),
        chain("forward", Some("forward")),
    ];
    let subnet = rules.subnet.to_string();
    for i in &rules.instances {
        cmds.push(rule(
            SOURCE_CHAIN,
            vec![
                meta_is("iifname", json!(i.tap)),
                json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": i.address.to_string()}}),
                verdict("return"),
            ],
            Some(&format!("instance {}", i.id)),
        ));
    }
    cmds.push(rule(
        SOURCE_CHAIN,
        vec![verdict("drop")],
        Some("any other source (or IPv6) from an instance TAP"),
    ));
    // To the node itself: only replies to the node's own connections (the
    // agent's probes); not the agent's API, not any other address.
    cmds.push(rule("input", vec![from_taps(), jump(SOURCE_CHAIN)], None));
    cmds.push(rule(
        "input",
        vec![from_taps(), replies(), verdict("accept")],
        None,
    ));
    cmds.push(rule(
        "input",
        vec![from_taps(), verdict("drop")],
        Some(&format!(
            "instances ({subnet}) reach no address of the node"
        )),
    ));
    // Through the node: replies either way, and endpoint traffic to
    // instances; nothing between instances, nothing else out.
    cmds.push(rule("forward", vec![from_taps(), jump(SOURCE_CHAIN)], None));
    cmds.push(rule(
        "forward",
        vec![from_taps(), replies(), verdict("accept")],
        None,
    ));
    cmds.push(rule(
        "forward",
        vec![to_taps(), replies(), verdict("accept")],
        None,
    ));
    cmds.push(rule("forward", vec![to_taps(), jump(ENDPOINT_CHAIN)], None));
    cmds.push(rule(
        "forward",
        vec![from_taps(), verdict("drop")],
        Some("instances reach no other instance and nothing else"),
    ));
    cmds.push(rule(
        "forward",
        vec![to_taps(), verdict("drop")],
        Some("only endpoint traffic reaches an instance"),
    ));
    json!({ "nftables": cmds })
}
