//! `netconf::configure` against a real kernel, in a network namespace this
//! test makes (on its own thread, `unshare(CLONE_NEWNET)`): a TAP named `eth0`
//! stands in for the virtio-net interface; after `configure` it is up with
//! the MTU, the address and the default route via the gateway. The host's
//! interfaces are never touched: the test checks it is in a new namespace
//! first.
// One syscall: unshare(2) of the network namespace.
#![allow(unsafe_code)]

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use guest_agent::netconf;
use guest_proto::instance_file::InstanceNet;
use serde_json::Value;

fn ip_json(args: &[&str]) -> Value {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn configures_eth0_in_a_network_namespace() {
    std::thread::spawn(|| {
        let host = std::fs::read_link("/proc/self/ns/net").expect("host netns");
        // SAFETY: unshare(2) with CLONE_NEWNET only changes this thread's
        // network namespace; no memory or fd is affected.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "unshare(CLONE_NEWNET): the test needs root");
        let mine = std::fs::read_link("/proc/thread-self/ns/net").expect("own netns");
        assert_ne!(
            host, mine,
            "not in a new network namespace: refusing to go on"
        );
        // No such interface yet: a clear error after the wait.
        let net = InstanceNet {
            address: Ipv4Addr::new(10, 200, 0, 2),
            prefix_len: 30,
            gateway: Ipv4Addr::new(10, 200, 0, 1),
            mtu: 1400,
        };
        let e = netconf::configure("eth0", &net, Duration::from_millis(50)).expect_err("no eth0");
        assert!(e.to_string().contains("virtio_net"), "{e}");
        let st = Command::new("ip")
            .args(["tuntap", "add", "dev", "eth0", "mode", "tap"])
            .status()
            .expect("ip");
        assert!(st.success());
        netconf::configure("eth0", &net, Duration::from_secs(1)).expect("configure");
        // Again (a guest agent restarted in the same VM): the same result.
        netconf::configure("eth0", &net, Duration::from_secs(1)).expect("configure again");
        let l = &ip_json(&["-j", "addr", "show", "dev", "eth0"])[0];
        assert_eq!(l["mtu"], 1400, "{l}");
        assert!(
            l["flags"].as_array().expect("flags").contains(&"UP".into()),
            "{l}"
        );
        let inet: Vec<(String, u64)> = l["addr_info"]
            .as_array()
            .expect("addr_info")
            .iter()
            .filter(|a| a["family"] == "inet")
            .map(|a| {
                (
                    a["local"].as_str().expect("local").to_string(),
                    a["prefixlen"].as_u64().expect("prefixlen"),
                )
            })
            .collect();
        assert_eq!(inet, [("10.200.0.2".to_string(), 30)], "{l}");
        let routes = ip_json(&["-j", "-4", "route", "show", "default"]);
        let r = &routes[0];
        assert_eq!(r["gateway"], "10.200.0.1", "{routes}");
        assert_eq!(r["dev"], "eth0", "{routes}");
        // A gateway outside the prefix is refused by the kernel, and said so.
        let bad = InstanceNet {
            gateway: Ipv4Addr::new(10, 9, 9, 9),
            ..net
        };
        let e = netconf::configure("eth0", &bad, Duration::from_secs(1)).expect_err("unreachable");
        assert!(e.to_string().contains("default route"), "{e}");
    })
    .join()
    .expect("the namespaced test body");
}
