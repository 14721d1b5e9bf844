//! The nftables load balancer in network namespaces this test creates (never
//! the host's interfaces or ruleset): a "node" namespace (forwarding, with a
//! decoy listening on the public port itself), an "inst" namespace behind a
//! veth pair holding the two members (10.99.0.2 and 10.99.0.3, port 9000;
//! the node is 10.99.0.1 there), and a "client" namespace reaching the node
//! over another veth pair (10.98.0.2 -> 10.98.0.1). The node's own clients go
//! through the `output` hook, the client namespace's through `prerouting`.
//! A connection open to a member when it leaves still reaches it (drain).
//! Needs root and `ip`/`nft` (.ci/install-deps).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use agent::endpoint::{LbEndpoint, LoadBalancer, NftCommand};

const PUBLIC_PORT: u16 = 8080;
const MEMBER_PORT: u16 = 9000;
const A: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);

/// A network namespace made by `ip netns add`, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("reddog-lbt-{}-{tag}", std::process::id());
        // A leftover from a killed run with the same pid.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run("ip", &["netns", "add", &name]);
        Self { name }
    }

    /// `ip -n NS ARGS...`
    fn ip(&self, args: &str) {
        let mut all = vec!["-n", &self.name];
        all.extend(args.split_whitespace());
        run("ip", &all);
    }

    /// Runs `f` on a thread inside the namespace (sockets it makes stay there).
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open the namespace");
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("setns into the test's namespace");
            f()
        })
        .join()
        .expect("the namespace thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run(prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}; install it (.ci/install-deps)"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Serves every connection on `l`: writes `id` (one byte), waits for the
/// client to end its side, writes `+` and closes.
fn serve(l: TcpListener, id: &'static str) {
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.write_all(id.as_bytes());
                let _ = std::io::copy(&mut s, &mut std::io::sink());
                let _ = s.write_all(b"+");
            });
        }
    });
}

/// Connects to `to` and reads who answered, leaving the connection open.
fn open(to: SocketAddr) -> std::io::Result<(String, TcpStream)> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut id = [0u8; 1];
    s.read_exact(&mut id)?;
    Ok((String::from_utf8_lossy(&id).into_owned(), s))
}

/// Ends an open connection: the server's `+` shows it still reached it.
fn finish(mut s: TcpStream) -> String {
    s.shutdown(std::net::Shutdown::Write).expect("end our side");
    let mut rest = String::new();
    s.read_to_string(&mut rest).expect("read the end");
    rest
}

/// What `n` connections to `to` met: who answered, or "refused".
fn connect_many(n: usize, to: SocketAddr) -> Vec<String> {
    (0..n)
        .map(|_| {
            let start = Instant::now();
            match open(to) {
                Ok((id, s)) => {
                    assert_eq!(finish(s), "+");
                    id
                }
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    let took = start.elapsed();
                    assert!(took < Duration::from_secs(1), "refused only after {took:?}");
                    "refused".into()
                }
                Err(e) => panic!("connecting to {to}: {e} (a hang means no reset was sent)"),
            }
        })
        .collect()
}

fn count(got: &[String], who: &str) -> usize {
    got.iter().filter(|g| *g == who).count()
}

fn endpoint(members: &[Ipv4Addr]) -> LbEndpoint {
    LbEndpoint {
        label: "web/http".into(),
        public_port: PUBLIC_PORT,
        instance_port: MEMBER_PORT,
        members: members.to_vec(),
    }
}

#[tokio::test]
async fn the_balancer_refuses_without_members_spreads_over_members_and_follows_changes() {
    let node = Netns::new("node");
    let client = Netns::new("client");
    let inst = Netns::new("inst");
    node.ip("link set lo up");
    run(
        "ip",
        &[
            "netns",
            "exec",
            &node.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    );
    // The instances' side: one namespace holding both members' addresses,
    // routed through the node as a TAP's guest would be.
    node.ip(&format!(
        "link add vi type veth peer name ve netns {}",
        inst.name
    ));
    node.ip("addr add 10.99.0.1/24 dev vi");
    node.ip("link set vi up");
    inst.ip("link set lo up");
    inst.ip("addr add 10.99.0.2/24 dev ve");
    inst.ip("addr add 10.99.0.3/24 dev ve");
    inst.ip("link set ve up");
    inst.ip("route add default via 10.99.0.1");
    // The other host's side.
    node.ip(&format!(
        "link add vn type veth peer name vc netns {}",
        client.name
    ));
    node.ip("addr add 10.98.0.1/24 dev vn");
    node.ip("link set vn up");
    client.ip("link set lo up");
    client.ip("addr add 10.98.0.2/24 dev vc");
    client.ip("link set vc up");

    inst.enter(|| {
        serve(
            TcpListener::bind((A, MEMBER_PORT)).expect("bind in the namespace"),
            "a",
        );
        serve(
            TcpListener::bind((B, MEMBER_PORT)).expect("bind in the namespace"),
            "b",
        );
    });
    node.enter(|| {
        // Something listening on the public port itself: whatever reaches it
        // was not balanced (or not refused).
        serve(
            TcpListener::bind(("0.0.0.0", PUBLIC_PORT)).expect("bind in the namespace"),
            "d",
        );
    });
    let local: SocketAddr = (Ipv4Addr::new(10, 99, 0, 1), PUBLIC_PORT).into();
    let remote: SocketAddr = (Ipv4Addr::new(10, 98, 0, 1), PUBLIC_PORT).into();

    let lb = LoadBalancer::new(
        "reddog_lb",
        NftCommand {
            program: "ip".into(),
            args: ["netns", "exec", &node.name, "nft"]
                .iter()
                .map(Into::into)
                .collect(),
        },
    );

    // Without the table, the decoy answers (the check below can fail).
    assert_eq!(node.enter(move || connect_many(1, local)), ["d"]);

    // No member: refused at once, locally and from the other namespace.
    lb.apply(&[endpoint(&[])]).await.expect("apply the table");
    assert_eq!(
        count(&node.enter(move || connect_many(5, local)), "refused"),
        5
    );
    assert_eq!(
        count(&client.enter(move || connect_many(5, remote)), "refused"),
        5
    );

    // Two members: connections reach both, and nothing else.
    lb.apply(&[endpoint(&[A, B])])
        .await
        .expect("apply the table");
    for got in [
        node.enter(move || connect_many(40, local)),
        client.enter(move || connect_many(40, remote)),
    ] {
        let (a, b) = (count(&got, "a"), count(&got, "b"));
        assert_eq!(a + b, 40, "{got:?}");
        assert!(a > 0 && b > 0, "both members get connections: {got:?}");
    }

    // A connection open to A while A leaves...
    let held = node.enter(move || loop {
        let (id, s) = open(local).expect("connect");
        if id == "a" {
            break s;
        }
        finish(s);
    });

    // One member left: new connections go only to the other.
    lb.apply(&[endpoint(&[B])]).await.expect("apply the table");
    assert_eq!(count(&node.enter(move || connect_many(20, local)), "b"), 20);
    assert_eq!(
        count(&client.enter(move || connect_many(20, remote)), "b"),
        20
    );

    // ...still reaches A (drain: open connections finish).
    assert_eq!(finish(held), "+");

    // Removed: the table is gone and the decoy answers again.
    lb.remove().await.expect("remove the table");
    lb.remove()
        .await
        .expect("removing an absent table succeeds");
    assert_eq!(node.enter(move || connect_many(1, local)), ["d"]);
}
