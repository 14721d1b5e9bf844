//! The real network backend (`HostNetwork`: tun ioctl, netlink, `nft -j`)
//! in a network namespace this test makes: TAPs are created persistent with
//! their owner, address, MTU and up, kept when made again, removed; the
//! agent's table holds exactly the instances it was given, rebuilt whole on
//! every change. Everything runs on one thread that unshared its network
//! namespace (the `nft` and `ip` children inherit it); the host's
//! interfaces and ruleset are never touched: the test checks it is in a new
//! namespace before doing anything.
// One syscall: unshare(2) of the network namespace (see `in_netns`).
#![allow(unsafe_code)]

use std::net::Ipv4Addr;
use std::process::Command;

use agent::backend::host_net::HostNetwork;
use agent::backend::net::{NetRules, NetworkBackend, RuledInstance, TapSpec};
use serde_json::Value;

/// Runs `f` on a new thread inside a new network namespace.
fn in_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        let host = std::fs::read_link("/proc/self/ns/net").expect("host netns");
        // SAFETY: unsharing only the network namespace of this thread; no
        // file-descriptor table is unshared, so no fd is invalidated.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
            .expect("unshare(CLONE_NEWNET): the test needs root (CAP_SYS_ADMIN)");
        let mine = std::fs::read_link("/proc/thread-self/ns/net").expect("own netns");
        assert_ne!(
            host, mine,
            "not in a new network namespace: refusing to go on"
        );
        f();
    })
    .join()
    .expect("the namespaced test body");
}

fn run_json(args: &[&str]) -> Value {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect(args[0]);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn tap(name: &str, gw: [u8; 4], owner: Option<u32>) -> TapSpec {
    TapSpec {
        name: name.into(),
        gateway: Ipv4Addr::from(gw),
        prefix_len: 30,
        mtu: 1400,
        owner_uid: owner,
    }
}

fn rules(instances: &[(&str, &str, [u8; 4])]) -> NetRules {
    NetRules {
        subnet: "10.200.0.0/16".parse().expect("subnet"),
        instances: instances
            .iter()
            .map(|(id, tap, a)| RuledInstance {
                id: (*id).into(),
                tap: (*tap).into(),
                address: Ipv4Addr::from(*a),
            })
            .collect(),
    }
}

/// The table as `nft -j list table inet reddog` shows it: (set elements,
/// rules as (chain, comment, expression text)).
fn table() -> (Vec<String>, Vec<(String, String, String)>) {
    let v = run_json(&["nft", "-j", "list", "table", "inet", "reddog"]);
    let mut elems = Vec::new();
    let mut rules = Vec::new();
    for item in v["nftables"].as_array().expect("nftables") {
        if let Some(set) = item.get("set") {
            assert_eq!(set["name"], "instance_taps");
            for e in set["elem"].as_array().into_iter().flatten() {
                elems.push(e.as_str().expect("tap name").to_string());
            }
        }
        if let Some(r) = item.get("rule") {
            rules.push((
                r["chain"].as_str().expect("chain").to_string(),
                r["comment"].as_str().unwrap_or("").to_string(),
                r["expr"].to_string(),
            ));
        }
    }
    (elems, rules)
}

fn link(name: &str) -> Option<Value> {
    let out = Command::new("ip")
        .args(["-j", "addr", "show", "dev", name])
        .output()
        .expect("ip");
    out.status
        .success()
        .then(|| serde_json::from_slice::<Value>(&out.stdout).expect("JSON")[0].clone())
}

#[test]
fn taps_and_the_agents_table_in_a_network_namespace() {
    in_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let net = HostNetwork::default();
            let t0 = tap("rdg0", [10, 200, 0, 1], Some(4321));
            net.ensure_tap(&t0).await.expect("make rdg0");
            // Made again (an agent restart): kept as it is.
            net.ensure_tap(&t0).await.expect("keep rdg0");
            net.ensure_tap(&tap("rdg1", [10, 200, 0, 5], None))
                .await
                .expect("make rdg1");
            let l = link("rdg0").expect("rdg0 exists");
            assert_eq!(l["mtu"], 1400, "{l}");
            assert!(
                l["flags"].as_array().expect("flags").contains(&"UP".into()),
                "{l}"
            );
            let addrs: Vec<(String, u64)> = l["addr_info"]
                .as_array()
                .expect("addr_info")
                .iter()
                .filter(|a| a["family"] == "inet")
                .map(|a| {
                    (
                        a["local"].as_str().expect("local").into(),
                        a["prefixlen"].as_u64().expect("len"),
                    )
                })
                .collect();
            assert_eq!(addrs, [("10.200.0.1".to_string(), 30)], "{l}");
            // /sys shows the host's namespace: ask netlink through `ip -d`.
            let info =
                run_json(&["ip", "-d", "-j", "link", "show", "dev", "rdg0"])[0]["linkinfo"].clone();
            assert_eq!(info["info_kind"], "tun", "{info}");
            assert_eq!(info["info_data"]["type"], "tap", "{info}");
            assert_eq!(info["info_data"]["persist"], true, "{info}");
            assert_eq!(info["info_data"]["multi_queue"], false, "{info}");
            assert_eq!(info["info_data"]["user"], 4321, "{info}");
            // A changed gateway replaces the old address.
            net.ensure_tap(&tap("rdg0", [10, 200, 0, 9], Some(4321)))
                .await
                .expect("readdress");
            let l = link("rdg0").expect("rdg0");
            let inet: Vec<&Value> = l["addr_info"]
                .as_array()
                .expect("addr_info")
                .iter()
                .filter(|a| a["family"] == "inet")
                .collect();
            assert_eq!(inet.len(), 1, "{l}");
            assert_eq!(inet[0]["local"], "10.200.0.9");

            // The table for two instances.
            net.apply_rules(&rules(&[
                ("a", "rdg0", [10, 200, 0, 2]),
                ("b", "rdg1", [10, 200, 0, 6]),
            ]))
            .await
            .expect("apply");
            let (elems, rs) = table();
            assert_eq!(elems, ["rdg0", "rdg1"]);
            let find = |chain: &str, comment: &str| {
                rs.iter()
                    .filter(|(c, m, _)| c == chain && m.contains(comment))
                    .count()
            };
            assert_eq!(find("instance_sources", "instance a"), 1, "{rs:#?}");
            assert_eq!(find("instance_sources", "instance b"), 1, "{rs:#?}");
            assert_eq!(find("input", "reach no address of the node"), 1, "{rs:#?}");
            assert_eq!(find("forward", "reach no other instance"), 1, "{rs:#?}");
            assert_eq!(find("forward", "only endpoint traffic"), 1, "{rs:#?}");
            let src_a = rs
                .iter()
                .find(|(_, m, _)| m == "instance a")
                .map(|(_, _, e)| e.clone())
                .expect("a's source rule");
            assert!(
                src_a.contains("10.200.0.2") && src_a.contains("rdg0"),
                "{src_a}"
            );
            assert!(
                rs.iter().any(|(c, _, e)| c == "forward"
                    && e.contains("established")
                    && e.contains("related")),
                "{rs:#?}"
            );
            assert!(
                rs.iter()
                    .any(|(c, _, e)| c == "forward" && e.contains("\"endpoints\"")),
                "the endpoint chain is jumped to: {rs:#?}"
            );
            let n_rules = rs.len();

            // One instance gone: rebuilt whole, nothing of it left.
            net.apply_rules(&rules(&[("b", "rdg1", [10, 200, 0, 6])]))
                .await
                .expect("apply");
            let (elems, rs) = table();
            assert_eq!(elems, ["rdg1"]);
            assert_eq!(rs.len(), n_rules - 1);
            assert!(
                !rs.iter()
                    .any(|(_, m, e)| m == "instance a" || e.contains("rdg0")),
                "{rs:#?}"
            );
            // No instance: the table stays, empty of instances.
            net.apply_rules(&rules(&[])).await.expect("apply");
            assert!(table().0.is_empty());
            // Only the agent's table exists in this namespace.
            let all = run_json(&["nft", "-j", "list", "tables"]);
            let tables: Vec<String> = all["nftables"]
                .as_array()
                .expect("nftables")
                .iter()
                .filter_map(|i| i.get("table"))
                .map(|t| {
                    format!(
                        "{} {}",
                        t["family"].as_str().unwrap_or(""),
                        t["name"].as_str().unwrap_or("")
                    )
                })
                .collect();
            assert_eq!(tables, ["inet reddog"]);

            net.remove_tap("rdg0").await.expect("remove");
            assert!(link("rdg0").is_none(), "rdg0 removed");
            net.remove_tap("rdg0")
                .await
                .expect("removing an absent TAP is fine");
            assert!(link("rdg1").is_some());
        });
    });
}
