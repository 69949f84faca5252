//! The crate graph keeps the roles apart (ARCHITECTURE.md, "Invariants"):
//! the gateway, the role-to-role plane and the load harness know the other
//! roles only through the contracts in `natter-roles`, so none of them links
//! the message pipeline, the stores or their database drivers.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

/// Each workspace package's normal (not dev, not build) dependencies, by name.
fn normal_dependencies() -> HashMap<String, Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let names: HashMap<&str, &str> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            (
                p["id"].as_str().expect("id"),
                p["name"].as_str().expect("name"),
            )
        })
        .collect();
    metadata["resolve"]["nodes"]
        .as_array()
        .expect("resolve nodes")
        .iter()
        .map(|node| {
            let name = names[node["id"].as_str().expect("id")].to_string();
            let deps = node["deps"]
                .as_array()
                .expect("deps")
                .iter()
                .filter(|dep| {
                    dep["dep_kinds"]
                        .as_array()
                        .expect("dep kinds")
                        .iter()
                        .any(|kind| kind["kind"].is_null())
                })
                .map(|dep| names[dep["pkg"].as_str().expect("pkg")].to_string())
                .collect();
            (name, deps)
        })
        .collect()
}

/// Everything `root` links, directly or not.
fn closure(graph: &HashMap<String, Vec<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_string()];
    while let Some(name) = todo.pop() {
        for dep in graph.get(&name).into_iter().flatten() {
            if seen.insert(dep.clone()) {
                todo.push(dep.clone());
            }
        }
    }
    seen
}

#[test]
fn gateway_plane_and_harness_depend_on_the_contracts_not_on_other_roles() {
    let graph = normal_dependencies();
    let forbidden = [
        "natter-logic",
        "natter-record",
        "natter-group",
        "sqlx",
        "redis",
    ];
    for crate_name in ["natter-comet", "natter-rpc", "natter-pressure"] {
        let links = closure(&graph, crate_name);
        assert!(
            links.contains("natter-roles"),
            "{crate_name} reaches logic through natter-roles"
        );
        let bad: Vec<&str> = forbidden
            .iter()
            .copied()
            .filter(|f| links.contains(*f))
            .collect();
        assert!(bad.is_empty(), "{crate_name} links {bad:?}");
    }
    // The contracts themselves do no IO: no runtime, no HTTP, no database.
    let roles = closure(&graph, "natter-roles");
    for io in ["tokio", "hyper", "sqlx", "redis", "tonic"] {
        assert!(!roles.contains(io), "natter-roles links {io}");
    }
}
