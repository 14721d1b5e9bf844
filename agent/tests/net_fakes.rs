//! The instance network on fake backends (`FakeNet` for TAPs and rules):
//! each instance's address is allocated, recorded, told to the guest (the
//! instance file) and the VMM (its virtio-net device), kept across an agent
//! restart, and freed with its TAP and rules when the instance goes; a goal
//! larger than the subnet is refused, and an instance waits for an address
//! a removed one still holds.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use agent::backend::fake::FakeNet;
use agent::network::InstanceNet;
use agent::{Agent, Backends, GoalError, InstanceState::*, InstanceStatus};
use guest_proto::instance_file::InstanceFile;
use testkit::agent_harness::fakes::*;

async fn net_agent(h: &FakeAgent, net: &FakeNet, subnet: &str) -> Agent {
    let mut cfg = config(h.dir.path());
    cfg.node.instance_subnet = Some(subnet.parse().expect("subnet"));
    cfg.node.instance_mtu = 1400;
    Agent::open(
        cfg,
        Backends {
            launcher: Arc::new(h.launcher.clone()),
            disks: Arc::new(h.disks.clone()),
            guests: Arc::new(h.guests.clone()),
            net: Arc::new(net.clone()),
        },
    )
    .await
    .expect("open the agent with a network")
}

/// An agent with an instance network over `h`'s state directory (the
/// harness's own agent, without one, is shut down first).
async fn with_net(subnet: &str) -> (FakeAgent, FakeNet, Agent) {
    let h = harness().await;
    h.agent.shutdown();
    let net = FakeNet::new();
    let a = net_agent(&h, &net, subnet).await;
    (h, net, a)
}

async fn ready(a: &Agent, id: &str) -> InstanceStatus {
    a.wait_for(id, Duration::from_secs(600), |s| {
        s.is_some_and(|s| s.state == Ready)
    })
    .await
    .unwrap_or_else(|| panic!("{id} never got ready: {:#?}", a.instance(id)))
}

async fn gone(a: &Agent, id: &str) {
    assert!(
        a.wait_for(id, Duration::from_secs(600), |s| s.is_none())
            .await
            .is_none(),
        "{id} was not removed"
    );
}

fn slot(s: &InstanceStatus) -> u32 {
    s.net.as_ref().expect("a network").slot
}

fn ruled(net: &FakeNet) -> Vec<(String, String, Ipv4Addr)> {
    net.rules()
        .expect("rules applied")
        .instances
        .into_iter()
        .map(|i| (i.id, i.tap, i.address))
        .collect()
}

fn recorded(h: &FakeAgent, id: &str) -> Option<InstanceNet> {
    let rec = std::fs::read(
        h.dir
            .path()
            .join("state/instances")
            .join(id)
            .join("record.json"),
    )
    .expect("record");
    let rec: serde_json::Value = serde_json::from_slice(&rec).expect("json");
    rec.get("net")
        .map(|n| serde_json::from_value(n.clone()).expect("net"))
}

#[tokio::test(start_paused = true)]
async fn each_instance_gets_an_address_its_guest_and_vmm_are_told_and_removal_frees() {
    let (h, net, a) = with_net("10.200.0.0/28").await;
    a.apply_goal(h.goal(1, &["a", "b"])).await.expect("apply");
    let sa = ready(&a, "a").await;
    let sb = ready(&a, "b").await;
    let na = sa.net.clone().expect("a's network");
    assert_eq!(na.slot, 0);
    assert_eq!(na.tap, "rdg0");
    assert_eq!(na.gateway, Ipv4Addr::new(10, 200, 0, 1));
    assert_eq!(na.address, Ipv4Addr::new(10, 200, 0, 2));
    assert_eq!(na.prefix_len, 30);
    assert_eq!(na.mtu, 1400);
    assert_eq!(na.mac, "02:52:0a:c8:00:02");
    assert_eq!(slot(&sb), 1);
    assert_eq!(
        sb.net.as_ref().map(|n| n.address),
        Some(Ipv4Addr::new(10, 200, 0, 6))
    );
    // Recorded, so it survives the agent.
    assert_eq!(recorded(&h, "a").as_ref(), Some(&na));
    // The guest learns it from the instance file on its role disk.
    let role = h.dir.path().join("state/instances/a/disks/role.raw");
    let file = InstanceFile::decode(&std::fs::read(&role).expect("role disk")).expect("decode");
    assert_eq!(file.net, Some(na.for_guest()));
    // The VMM gets the TAP by name, the MAC and the MTU.
    let nets = h.launcher.nets("a");
    assert_eq!(nets, vec![na.vmm_config()]);
    assert_eq!(nets[0].tap, vmm_api::TapConfig::Name("rdg0".into()));
    assert_eq!(nets[0].mtu, Some(1400));
    // The TAPs exist with the gateway address; the rules know both.
    let taps = net.taps();
    assert_eq!(taps.keys().collect::<Vec<_>>(), ["rdg0", "rdg1"]);
    assert_eq!(taps["rdg0"].gateway, na.gateway);
    assert_eq!(taps["rdg0"].mtu, 1400);
    assert_eq!(
        ruled(&net),
        [
            ("a".into(), "rdg0".into(), Ipv4Addr::new(10, 200, 0, 2)),
            ("b".into(), "rdg1".into(), Ipv4Addr::new(10, 200, 0, 6)),
        ]
    );

    // Removal frees the address, the TAP and the rules.
    a.apply_goal(h.goal(2, &["b"])).await.expect("apply");
    gone(&a, "a").await;
    assert_eq!(net.taps().keys().collect::<Vec<_>>(), ["rdg1"]);
    assert_eq!(
        ruled(&net),
        [("b".into(), "rdg1".into(), Ipv4Addr::new(10, 200, 0, 6))]
    );
    // ... and a new instance gets it.
    a.apply_goal(h.goal(3, &["b", "c"])).await.expect("apply");
    assert_eq!(slot(&ready(&a, "c").await), 0);
    assert_eq!(slot(&ready(&a, "b").await), 1);
    a.shutdown();
}

#[tokio::test(start_paused = true)]
async fn addresses_survive_an_agent_restart_and_the_rules_are_rebuilt_at_start() {
    let (h, net, a) = with_net("10.200.0.0/28").await;
    a.apply_goal(h.goal(1, &["a", "b"])).await.expect("apply");
    ready(&a, "a").await;
    ready(&a, "b").await;
    // Free slot 0, so a restarted agent that forgot slot 1 would hand it out.
    a.apply_goal(h.goal(2, &["b"])).await.expect("apply");
    gone(&a, "a").await;
    let pid = h.launcher.running("b").expect("b runs");
    a.shutdown();
    tokio::task::yield_now().await;

    let applied = net.applied();
    let a2 = net_agent(&h, &net, "10.200.0.0/28").await;
    // The table was rebuilt from the records before any task ran.
    assert_eq!(net.applied(), applied + 1);
    assert_eq!(
        ruled(&net),
        [("b".into(), "rdg1".into(), Ipv4Addr::new(10, 200, 0, 6))]
    );
    let sb = ready(&a2, "b").await;
    assert_eq!(sb.vmm_pid, Some(pid), "re-adopted");
    assert_eq!(slot(&sb), 1, "kept its address");
    assert!(net.taps().contains_key("rdg1"), "its TAP kept");
    // New instances go around it.
    a2.apply_goal(h.goal(3, &["b", "c", "d"]))
        .await
        .expect("apply");
    assert_eq!(slot(&ready(&a2, "c").await), 0);
    assert_eq!(slot(&ready(&a2, "d").await), 2);
    assert_eq!(h.launcher.launches("b"), 1);
    a2.shutdown();
}

#[tokio::test(start_paused = true)]
async fn a_goal_larger_than_the_subnet_is_refused_and_new_instances_wait_for_freed_addresses() {
    // A /29: two instances.
    let (h, net, a) = with_net("10.200.0.0/29").await;
    let e = a
        .apply_goal(h.goal(1, &["a", "b", "c"]))
        .await
        .expect_err("three do not fit");
    assert!(
        matches!(
            e,
            GoalError::TooManyForSubnet {
                count: 3,
                slots: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("the instance subnet 10.200.0.0/29 has addresses for 2"),
        "{e}"
    );
    a.apply_goal(h.goal(2, &["a", "b"])).await.expect("apply");
    ready(&a, "a").await;
    ready(&a, "b").await;
    // Two others replace them: they wait until the old ones free their
    // addresses, then take them.
    a.apply_goal(h.goal(3, &["c", "d"])).await.expect("apply");
    let sc = ready(&a, "c").await;
    let sd = ready(&a, "d").await;
    gone(&a, "a").await;
    gone(&a, "b").await;
    let mut slots = [slot(&sc), slot(&sd)];
    slots.sort_unstable();
    assert_eq!(slots, [0, 1]);
    assert_eq!(net.taps().len(), 2);
    let ids: Vec<String> = ruled(&net).into_iter().map(|(id, _, _)| id).collect();
    assert_eq!(ids.len(), 2);
    assert!(
        ids.contains(&"c".to_string()) && ids.contains(&"d".to_string()),
        "{ids:?}"
    );
    a.shutdown();
}

#[tokio::test(start_paused = true)]
async fn without_a_subnet_instances_get_no_network() {
    let h = harness().await;
    h.agent.apply_goal(h.goal(1, &["a"])).await.expect("apply");
    let s = h.wait_state("a", Ready).await;
    assert_eq!(s.net, None);
    assert!(h.launcher.nets("a").is_empty());
    assert_eq!(recorded(&h, "a"), None);
}
