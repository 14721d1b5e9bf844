//! The load balancer: the kernel's NAT, driven through nftables.
//!
//! The agent owns one table (`ip reddog_lb` by default), separate from the
//! instance network's isolation table, and rebuilds it whole from the current
//! membership in one atomic `nft -j -f -` transaction per change (add table,
//! flush table, add chains and rules): no reader ever sees half a change.
//!
//! For an endpoint with members, new TCP connections to a local address of
//! the node on its public port are DNATed to one member, picked by
//! `numgen random mod N`: in `prerouting` for traffic from other hosts and
//! namespaces, in `output` for the node's own clients. Only a connection's
//! first packet passes a NAT chain, so a member that leaves keeps its open
//! connections (conntrack remembers them) and gets no new ones. For an
//! endpoint without members, connections are refused at once with a TCP
//! reset (`input` and `output` filter chains; `reject` is not allowed in a
//! prerouting chain), rather than left to time out.

use std::borrow::Cow;
use std::collections::HashSet;
use std::ffi::OsString;
use std::net::Ipv4Addr;

use nftables::expr::{
    Expression, Fib, FibFlag, FibResult, Map, NamedExpression, NgMode, Numgen, Payload,
    PayloadField, SetItem,
};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, Operator, Reject, RejectType, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

/// The table's default name (family `ip`).
pub const DEFAULT_TABLE: &str = "reddog_lb";
/// Most members one endpoint balances over.
pub const MAX_MEMBERS: usize = 1024;

const PREROUTING: &str = "prerouting";
const OUTPUT: &str = "output";
const REFUSE_IN: &str = "refuse_input";
const REFUSE_OUT: &str = "refuse_output";
/// `dstnat`.
const PRIO_DSTNAT: i32 = -100;
/// `filter`.
const PRIO_FILTER: i32 = 0;

/// One endpoint as the load balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbEndpoint {
    /// Who owns it, for the rules' comments: `role/endpoint` (printable).
    pub label: String,
    /// The port on the node.
    pub public_port: u16,
    /// The members' port.
    pub instance_port: u16,
    /// The members' addresses (order does not matter; duplicates are merged).
    pub members: Vec<Ipv4Addr>,
}

/// Why the load balancer could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// `nft` failed or could not run.
    #[error("cannot apply the load balancer's nftables table: {0} (nft's own message is on the agent's stderr); is nftables installed (.ci/install-deps) and is the agent root?")]
    Nft(#[from] nftables::helper::NftablesError),
    /// More members than the balancer takes.
    #[error("endpoint {label} has {count} members; the load balancer takes at most {max}", max = MAX_MEMBERS)]
    TooManyMembers {
        /// The endpoint.
        label: String,
        /// Members.
        count: usize,
    },
}

fn table(name: &str) -> Table<'static> {
    Table {
        family: NfFamily::IP,
        name: Cow::Owned(name.to_string()),
        handle: None,
    }
}

fn base_chain(
    table: &str,
    name: &'static str,
    ty: NfChainType,
    hook: NfHook,
    prio: i32,
) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(Chain {
        family: NfFamily::IP,
        table: Cow::Owned(table.to_string()),
        name: Cow::Borrowed(name),
        _type: Some(ty),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    })))
}

fn matches(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

/// `fib daddr type local tcp dport PORT`.
fn to_local_port(port: u16) -> [Statement<'static>; 2] {
    [
        matches(
            Expression::Named(NamedExpression::Fib(Fib {
                result: FibResult::Type,
                flags: HashSet::from([FibFlag::Daddr]),
            })),
            Expression::String(Cow::Borrowed("local")),
        ),
        matches(
            Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                PayloadField {
                    protocol: Cow::Borrowed("tcp"),
                    field: Cow::Borrowed("dport"),
                },
            ))),
            Expression::Number(port.into()),
        ),
    ]
}

fn rule(
    table: &str,
    chain: &'static str,
    label: &str,
    expr: Vec<Statement<'static>>,
) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: Cow::Owned(table.to_string()),
        chain: Cow::Borrowed(chain),
        expr: Cow::Owned(expr),
        comment: Some(Cow::Owned(comment(label))),
        ..Rule::default()
    })))
}

/// A comment nft accepts: printable ASCII without quotes, at most 128 bytes.
fn comment(label: &str) -> String {
    label
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\')
        .take(128)
        .collect()
}

/// The transaction that makes table `name` hold exactly the rules for
/// `endpoints` (sorted by public port; members sorted and deduplicated, so
/// equal inputs render equal documents).
pub fn render(name: &str, endpoints: &[LbEndpoint]) -> Result<Nftables<'static>, LbError> {
    let mut objects = vec![
        NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table(name)))),
        NfObject::CmdObject(NfCmd::Flush(FlushObject::Table(table(name)))),
        base_chain(
            name,
            PREROUTING,
            NfChainType::NAT,
            NfHook::Prerouting,
            PRIO_DSTNAT,
        ),
        base_chain(name, OUTPUT, NfChainType::NAT, NfHook::Output, PRIO_DSTNAT),
        base_chain(
            name,
            REFUSE_IN,
            NfChainType::Filter,
            NfHook::Input,
            PRIO_FILTER,
        ),
        base_chain(
            name,
            REFUSE_OUT,
            NfChainType::Filter,
            NfHook::Output,
            PRIO_FILTER,
        ),
    ];
    let mut sorted: Vec<&LbEndpoint> = endpoints.iter().collect();
    sorted.sort_by_key(|e| e.public_port);
    for ep in sorted {
        let mut members = ep.members.clone();
        members.sort();
        members.dedup();
        if members.len() > MAX_MEMBERS {
            return Err(LbError::TooManyMembers {
                label: ep.label.clone(),
                count: members.len(),
            });
        }
        if members.is_empty() {
            let mut expr = to_local_port(ep.public_port).to_vec();
            expr.push(Statement::Reject(Some(Reject::new(
                Some(RejectType::TCPReset),
                None,
            ))));
            for chain in [REFUSE_IN, REFUSE_OUT] {
                objects.push(rule(name, chain, &ep.label, expr.clone()));
            }
            continue;
        }
        let map = members
            .iter()
            .zip(0u32..)
            .map(|(addr, i)| {
                SetItem::Mapping(
                    Expression::Number(i),
                    Expression::String(Cow::Owned(addr.to_string())),
                )
            })
            .collect();
        let dnat = Statement::DNAT(Some(NAT {
            addr: Some(Expression::Named(NamedExpression::Map(Box::new(Map {
                key: Expression::Named(NamedExpression::Numgen(Numgen {
                    mode: NgMode::Random,
                    // Bounded by MAX_MEMBERS above.
                    ng_mod: u32::try_from(members.len()).unwrap_or(u32::MAX),
                    offset: None,
                })),
                data: Expression::Named(NamedExpression::Set(map)),
            })))),
            family: None,
            port: Some(Expression::Number(ep.instance_port.into())),
            flags: None,
        }));
        let mut expr = to_local_port(ep.public_port).to_vec();
        expr.push(dnat);
        for chain in [PREROUTING, OUTPUT] {
            objects.push(rule(name, chain, &ep.label, expr.clone()));
        }
    }
    Ok(Nftables {
        objects: Cow::Owned(objects),
    })
}

/// The transaction that removes table `name` (and succeeds if it is absent).
pub fn render_removal(name: &str) -> Nftables<'static> {
    Nftables {
        objects: Cow::Owned(vec![
            NfObject::CmdObject(NfCmd::Add(NfListObject::Table(table(name)))),
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(table(name)))),
        ]),
    }
}

/// How to run `nft`: `nft` from `PATH` by default; a test runs it inside its
/// network namespace (`ip netns exec NS nft`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftCommand {
    /// The program.
    pub program: OsString,
    /// Its arguments before `-j -f -`.
    pub args: Vec<OsString>,
}

impl Default for NftCommand {
    fn default() -> Self {
        Self {
            program: "nft".into(),
            args: Vec::new(),
        }
    }
}

/// The agent's load balancer: its table and how to change it.
#[derive(Debug, Clone)]
pub struct LoadBalancer {
    table: String,
    nft: NftCommand,
}

impl LoadBalancer {
    /// A balancer owning table `ip <table>`, changed with `nft`.
    pub fn new(table: impl Into<String>, nft: NftCommand) -> Self {
        Self {
            table: table.into(),
            nft,
        }
    }

    /// Its table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Replaces the table's rules with those for `endpoints`, atomically.
    pub async fn apply(&self, endpoints: &[LbEndpoint]) -> Result<(), LbError> {
        let doc = render(&self.table, endpoints)?;
        self.run(&doc).await
    }

    /// Removes the table (at the agent's shutdown, if asked; without it the
    /// rules stay and keep serving the members while the agent is away).
    pub async fn remove(&self) -> Result<(), LbError> {
        self.run(&render_removal(&self.table)).await
    }

    async fn run(&self, doc: &Nftables<'_>) -> Result<(), LbError> {
        nftables::helper::apply_ruleset_with_args_async(
            doc,
            Some(&self.nft.program),
            &self.nft.args,
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn ep(port: u16, members: &[[u8; 4]]) -> LbEndpoint {
        LbEndpoint {
            label: format!("web/http{port}"),
            public_port: port,
            instance_port: 8080,
            members: members.iter().map(|m| Ipv4Addr::from(*m)).collect(),
        }
    }

    fn doc(endpoints: &[LbEndpoint]) -> Value {
        serde_json::to_value(render("reddog_lb", endpoints).expect("renders")).expect("serializes")
    }

    fn rules(v: &Value) -> Vec<&Value> {
        v["nftables"]
            .as_array()
            .expect("an array")
            .iter()
            .filter_map(|o| o.get("add").and_then(|a| a.get("rule")))
            .collect()
    }

    #[test]
    fn the_table_is_flushed_and_rebuilt_in_one_document() {
        let v = doc(&[]);
        let objs = v["nftables"].as_array().expect("an array");
        assert_eq!(
            objs[0],
            json!({"add": {"table": {"family": "ip", "name": "reddog_lb"}}})
        );
        assert_eq!(
            objs[1],
            json!({"flush": {"table": {"family": "ip", "name": "reddog_lb"}}})
        );
        let chains: Vec<_> = objs.iter().filter_map(|o| o["add"].get("chain")).collect();
        assert_eq!(chains.len(), 4);
        assert_eq!(
            chains[0],
            &json!({"family": "ip", "table": "reddog_lb", "name": "prerouting", "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"})
        );
        assert_eq!(chains[1]["hook"], "output");
        assert_eq!(chains[1]["type"], "nat");
        assert_eq!(chains[2]["hook"], "input");
        assert_eq!(chains[3]["hook"], "output");
        assert_eq!(chains[3]["type"], "filter");
        assert!(rules(&v).is_empty());
    }

    #[test]
    fn members_are_spread_with_numgen_in_prerouting_and_output() {
        let v = doc(&[ep(80, &[[10, 0, 0, 3], [10, 0, 0, 2], [10, 0, 0, 3]])]);
        let r = rules(&v);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0]["chain"], "prerouting");
        assert_eq!(r[1]["chain"], "output");
        assert_eq!(r[0]["expr"], r[1]["expr"]);
        assert_eq!(r[0]["comment"], "web/http80");
        assert_eq!(
            r[0]["expr"],
            json!([
                {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local"}},
                {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}},
                {"dnat": {
                    "addr": {"map": {
                        "key": {"numgen": {"mode": "random", "mod": 2}},
                        "data": {"set": [[0, "10.0.0.2"], [1, "10.0.0.3"]]}
                    }},
                    "port": 8080
                }}
            ])
        );
    }

    #[test]
    fn an_endpoint_without_members_refuses_with_a_reset() {
        let v = doc(&[ep(81, &[])]);
        let r = rules(&v);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0]["chain"], "refuse_input");
        assert_eq!(r[1]["chain"], "refuse_output");
        assert_eq!(r[0]["expr"][1]["match"]["right"], 81);
        assert_eq!(r[0]["expr"][2], json!({"reject": {"type": "tcp reset"}}));
        assert!(!v.to_string().contains("dnat"));
    }

    #[test]
    fn equal_membership_renders_equal_documents() {
        let a = doc(&[
            ep(90, &[[10, 0, 0, 2]]),
            ep(80, &[[10, 0, 0, 3], [10, 0, 0, 2]]),
        ]);
        let b = doc(&[
            ep(80, &[[10, 0, 0, 2], [10, 0, 0, 3]]),
            ep(90, &[[10, 0, 0, 2]]),
        ]);
        assert_eq!(a, b);
        let r = rules(&a);
        assert_eq!(r[0]["expr"][1]["match"]["right"], 80, "sorted by port");
        assert_eq!(r[2]["expr"][1]["match"]["right"], 90);
    }

    #[test]
    fn comments_are_sanitized_and_members_bounded() {
        let mut e = ep(80, &[[10, 0, 0, 2]]);
        e.label = "we\"b\\/h\nttp".into();
        assert_eq!(rules(&doc(&[e]))[0]["comment"], "web/http");
        let mut big = ep(80, &[]);
        big.members = (0..=MAX_MEMBERS as u32)
            .map(|i| Ipv4Addr::from(0x0a00_0000 + i))
            .collect();
        assert!(matches!(
            render("t", &[big]),
            Err(LbError::TooManyMembers { count: 1025, .. })
        ));
    }

    #[test]
    fn removal_tolerates_an_absent_table() {
        let v = serde_json::to_value(render_removal("reddog_lb")).expect("serializes");
        assert_eq!(
            v,
            json!({"nftables": [
                {"add": {"table": {"family": "ip", "name": "reddog_lb"}}},
                {"delete": {"table": {"family": "ip", "name": "reddog_lb"}}}
            ]})
        );
    }
}
