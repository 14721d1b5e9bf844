//! The workspace's dependency rules, checked against `cargo metadata`: which
//! crate may link which (the rules each crate's `lib.rs` states). A crate's
//! dependencies are its normal (non-dev, non-build) ones with its *default*
//! features, followed transitively through the resolve graph; proc-macro
//! crates are listed but not followed (they run in the compiler, their own
//! dependencies are not linked).
//!
//! No KVM, no network (`cargo metadata --offline`): needs the crates already
//! fetched, as any build does.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::process::Command;

use serde_json::Value;

/// What one rule asks of one workspace crate's dependency closure.
enum Check {
    /// None of these crates, directly or transitively.
    Forbid(&'static [&'static str]),
    /// Nothing but these crates (and the proc-macros among them).
    Only(&'static [&'static str]),
}

struct Rule {
    krate: &'static str,
    check: Check,
    why: &'static str,
}

const RULES: &[Rule] = &[
    Rule {
        krate: "guest-proto",
        check: Check::Forbid(&["serde", "serde_json", "serde_core"]),
        why: "the guest protocol is no_std and serde-free by default (serde only behind an optional feature)",
    },
    Rule {
        krate: "guest-proto",
        check: Check::Only(&["thiserror", "thiserror-impl"]),
        why: "the guest protocol builds without std: only no_std crates (thiserror without its std feature)",
    },
    Rule {
        krate: "vmm",
        check: Check::Forbid(&["tokio", "agent", "testkit"]),
        why: "the VMM is plain blocking threads, below the agent",
    },
    Rule {
        krate: "vmm-api",
        check: Check::Forbid(&[
            "tokio",
            "vmm",
            "kvm-ioctls",
            "kvm-bindings",
            "vm-memory",
            "agent",
        ]),
        why: "the agent <-> VMM contract is plain data and a blocking client, without the VMM's internals",
    },
    Rule {
        krate: "vhd",
        check: Check::Forbid(&["tokio", "kvm-ioctls", "kvm-bindings", "vm-memory"]),
        why: "disk images are a synchronous library usable outside the VMM",
    },
    Rule {
        krate: "jailer",
        check: Check::Forbid(&["tokio", "vmm", "kvm-ioctls", "kvm-bindings", "vm-memory", "agent"]),
        why: "the jailer is a small privileged single-threaded program: the vmm-api contract only, no async runtime, no VMM internals",
    },
    Rule {
        krate: "testkit",
        check: Check::Forbid(&["agent", "vmm", "tokio"]),
        why: "test support stays light and below the crates whose tests use it (the agent harness is behind its `agent` feature)",
    },
    Rule {
        krate: "test-guest",
        check: Check::Only(&[]),
        why: "the test guest's library only hands out paths; every crate's tests link it",
    },
];

/// Crates that must be declared with `default-features = false` by a crate,
/// because their default features need std.
const NO_STD_DECLARATIONS: &[(&str, &str)] = &[("guest-proto", "thiserror")];

struct Package {
    name: String,
    proc_macro: bool,
    /// The normal dependencies it declares: (package name, optional,
    /// default features).
    declared: Vec<(String, bool, bool)>,
    features: BTreeMap<String, Vec<String>>,
}

struct Graph {
    packages: BTreeMap<String, Package>,
    /// Resolve graph: package id -> its normal dependencies' ids.
    edges: BTreeMap<String, Vec<String>>,
    /// Workspace crate name -> package id.
    members: BTreeMap<String, String>,
}

fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{rustc} -vV`: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("`{rustc} -vV` printed no host line"))
}

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &host_triple()])
        .args(["--manifest-path", manifest])
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{cargo} metadata`: {e}"));
    assert!(
        out.status.success(),
        "`cargo metadata --offline` failed (run `cargo fetch` once if crates are missing):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

fn strs(v: &Value) -> impl Iterator<Item = &str> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str)
}

fn graph(meta: &Value) -> Graph {
    let mut packages = BTreeMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        let id = p["id"].as_str().expect("id").to_owned();
        let proc_macro = p["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| strs(&t["kind"]).any(|k| k == "proc-macro"));
        let declared = p["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["kind"].is_null())
            .map(|d| {
                (
                    d["name"].as_str().expect("name").to_owned(),
                    d["optional"].as_bool().unwrap_or(false),
                    d["uses_default_features"].as_bool().unwrap_or(true),
                )
            })
            .collect();
        let features = p["features"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), strs(v).map(str::to_owned).collect()))
            .collect();
        packages.insert(
            id,
            Package {
                name: p["name"].as_str().expect("name").to_owned(),
                proc_macro,
                declared,
                features,
            },
        );
    }
    let mut edges = BTreeMap::new();
    for n in meta["resolve"]["nodes"].as_array().expect("resolve nodes") {
        let deps = n["deps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|k| k["kind"].is_null())
            })
            .map(|d| d["pkg"].as_str().expect("pkg").to_owned())
            .collect();
        edges.insert(n["id"].as_str().expect("id").to_owned(), deps);
    }
    let members = strs(&meta["workspace_members"])
        .map(|id| (packages[id].name.clone(), id.to_owned()))
        .collect();
    Graph {
        packages,
        edges,
        members,
    }
}

/// The optional dependencies `pkg`'s default features turn on.
fn default_optional_deps(pkg: &Package) -> BTreeSet<String> {
    let optional: BTreeSet<&str> = pkg
        .declared
        .iter()
        .filter(|d| d.1)
        .map(|d| d.0.as_str())
        .collect();
    let mut on = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut todo = vec!["default".to_owned()];
    while let Some(f) = todo.pop() {
        if !seen.insert(f.clone()) {
            continue;
        }
        if let Some(dep) = f.strip_prefix("dep:") {
            on.insert(dep.to_owned());
        } else if let Some((dep, _)) = f.split_once('/') {
            // `dep?/feature` does not turn the dependency on; `dep/feature` does.
            if !dep.ends_with('?') && optional.contains(dep) {
                on.insert(dep.to_owned());
            }
        } else if let Some(enables) = pkg.features.get(&f) {
            todo.extend(enables.iter().cloned());
        } else if optional.contains(f.as_str()) {
            on.insert(f);
        }
    }
    on
}

/// Every crate `krate` links with its default features, each with the chain
/// of crates that pulls it in.
fn closure(g: &Graph, krate: &str) -> BTreeMap<String, Vec<String>> {
    let root = g
        .members
        .get(krate)
        .unwrap_or_else(|| panic!("{krate} is not a workspace member: fix the rule table"));
    let pkg = &g.packages[root];
    let optional_on = default_optional_deps(pkg);
    let direct: BTreeSet<&str> = pkg
        .declared
        .iter()
        .filter(|d| !d.1 || optional_on.contains(&d.0))
        .map(|d| d.0.as_str())
        .collect();
    let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut queue = VecDeque::new();
    for id in &g.edges[root] {
        let name = &g.packages[id].name;
        if direct.contains(name.as_str()) {
            queue.push_back((id.clone(), vec![krate.to_owned(), name.clone()]));
        }
    }
    let mut visited = BTreeSet::new();
    while let Some((id, chain)) = queue.pop_front() {
        if !visited.insert(id.clone()) {
            continue;
        }
        let p = &g.packages[&id];
        found.entry(p.name.clone()).or_insert_with(|| chain.clone());
        if p.proc_macro {
            continue;
        }
        for next in g.edges.get(&id).into_iter().flatten() {
            let mut c = chain.clone();
            c.push(g.packages[next].name.clone());
            queue.push_back((next.clone(), c));
        }
    }
    found
}

fn violations(g: &Graph) -> Vec<String> {
    let mut bad = Vec::new();
    for rule in RULES {
        let deps = closure(g, rule.krate);
        match rule.check {
            Check::Forbid(names) => {
                for n in names {
                    if let Some(chain) = deps.get(*n) {
                        bad.push(format!(
                            "{} must not depend on {n} ({}), but does: {}",
                            rule.krate,
                            rule.why,
                            chain.join(" -> ")
                        ));
                    }
                }
            }
            Check::Only(allowed) => {
                for (n, chain) in &deps {
                    if !allowed.contains(&n.as_str()) {
                        bad.push(format!(
                            "{} may depend only on {allowed:?} ({}), but depends on {n}: {}",
                            rule.krate,
                            rule.why,
                            chain.join(" -> ")
                        ));
                    }
                }
            }
        }
    }
    for (krate, dep) in NO_STD_DECLARATIONS {
        let pkg = &g.packages[&g.members[*krate]];
        for d in pkg.declared.iter().filter(|d| d.0 == *dep && d.2) {
            bad.push(format!(
                "{krate} must declare {} with `default-features = false` (its default features need std)",
                d.0
            ));
        }
    }
    bad
}

#[test]
fn workspace_crates_keep_their_dependency_rules() {
    let g = graph(&metadata());
    let bad = violations(&g);
    assert!(
        bad.is_empty(),
        "dependency rules broken (the crate rules are in each crate's lib.rs):\n- {}",
        bad.join("\n- ")
    );
    // The check sees real edges: the VMM does link vmm-api and kvm-ioctls.
    let vmm = closure(&g, "vmm");
    assert!(
        vmm.contains_key("vmm-api") && vmm.contains_key("kvm-ioctls"),
        "{vmm:?}"
    );
}

/// The agent library as cargo builds it alone (`cargo tree -p agent -e normal`:
/// features as the agent itself asks for them, not as the whole workspace
/// unifies them, so `vhd`'s `cli` feature, which only `reddog-cli` turns on,
/// does not count) has no command line, builds no images and knows the VMM
/// only through `vmm-api`.
#[test]
fn the_agent_library_has_no_command_line() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "-p",
            "agent",
            "-e",
            "normal",
            "--offline",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: BTreeSet<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(crates.contains("tokio"), "not the agent's tree:\n{tree}");
    for forbidden in ["clap", "guest-image", "vmm", "testkit", "reddog-cli"] {
        assert!(
            !crates.contains(forbidden),
            "the agent library must not depend on {forbidden} (the command line lives in reddog-cli):\n{tree}"
        );
    }
}
