//! Seeing inside, with real traffic: `dataplane explain` agrees with what
//! real packets experience and leaves nothing behind; the inspection
//! commands show what the test just did. Needs root.

use std::{net::Ipv4Addr, path::Path};

use lab::{Lab, LabSpec, manifests};
use serde_json::Value;

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// The shop example with its policies, in `mode`.
fn shop(mode: &str) -> Lab {
    let spec = LabSpec {
        mode: mode.into(),
        ..LabSpec::new(2, 0).expect("spec")
    };
    let mut lab = Lab::up(&spec).expect("lab");
    let mut docs = manifests::load(&examples().join("shop")).expect("shop");
    docs.extend(manifests::load(&examples().join("shop-policies.yaml")).expect("policies"));
    lab.apply_docs(&docs).expect("apply");
    lab
}

/// Every conntrack entry of every node.
fn conntrack(lab: &Lab) -> Vec<Value> {
    (0..lab.state.nodes.len())
        .flat_map(|i| {
            let rows: Vec<Value> =
                serde_json::from_str(&lab.cli(i, &["ct", "list", "-o", "json"]).expect("ct list"))
                    .expect("json");
            rows
        })
        .collect()
}

/// Every node's verdict counters.
fn counters(lab: &Lab) -> Vec<Vec<Value>> {
    (0..lab.state.nodes.len())
        .map(|i| lab.dump(i, "dp_metrics").expect("dp_metrics"))
        .collect()
}

fn last_step(hops: &[Value], step: &str) -> String {
    hops.iter()
        .rev()
        .flat_map(|h| h["steps"].as_array().into_iter().flatten())
        .find(|s| s["step"] == step)
        .and_then(|s| s["detail"].as_str())
        .unwrap_or_else(|| panic!("no {step} step in {hops:#?}"))
        .to_owned()
}

fn explain_agrees_with_real_packets(mode: &str) {
    let lab = shop(mode);
    let (ct_before, counted_before) = (conntrack(&lab), counters(&lab));
    let pod_ip = |p: &str| lab.find_pod(p).expect("pod").ip;

    // Allowed: by the api's policy, on the api pod's node.
    let allowed = lab
        .explain("shop/frontend", "shop/api-0", 80, "TCP")
        .expect("explain");
    let last = allowed.last().expect("a hop");
    assert_eq!(last["verdict"], "forwarded", "{allowed:#?}");
    assert!(
        last_step(&allowed, "ingress policy").ends_with("allowed by shop/api-from-frontend"),
        "{allowed:#?}"
    );
    let api0_node = &lab.state.nodes[lab.find_pod("shop/api-0").expect("pod").node].name;
    assert_eq!(last["node"], api0_node.as_str());

    // Denied: the db admits only the api.
    let denied = lab
        .explain("ops/monitor", "shop/db", 80, "TCP")
        .expect("explain");
    let last = denied.last().expect("a hop");
    assert_eq!(
        (&last["verdict"], &last["reason"]),
        (&Value::from("dropped"), &Value::from("policy_denied"))
    );
    assert!(
        last_step(&denied, "ingress policy")
            .ends_with("denied: no policy allows it (default deny)")
    );

    // Through the Service: translated to one of its backends, then admitted.
    let svc = lab
        .explain("shop/frontend", "svc/shop/api", 80, "TCP")
        .expect("explain");
    let first = &svc[0];
    let backend = first["leaves_as"]
        .as_str()
        .and_then(|l| l.split(" -> ").nth(1))
        .and_then(|d| d.split(':').next())
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        .expect("rewritten destination");
    assert!(
        [pod_ip("shop/api-0"), pod_ip("shop/api-1")].contains(&backend),
        "{svc:#?}"
    );
    assert!(last_step(&svc, "service").starts_with("10.96.1.1:80/tcp (internal) -> backend"));
    assert_eq!(svc.last().expect("hop")["verdict"], "forwarded");

    // In the cluster's range, on no node.
    let nowhere = lab
        .explain("shop/frontend", "10.244.200.5", 53, "UDP")
        .expect("explain");
    assert_eq!(nowhere.len(), 1);
    assert_eq!(nowhere[0]["reason"], "unknown_destination");

    // Nothing was left or counted by the dry runs.
    assert_eq!(conntrack(&lab), ct_before, "explain left conntrack entries");
    assert_eq!(counters(&lab), counted_before, "explain was counted");

    // Real packets experience the same.
    let r = lab
        .probe("shop/frontend", "shop/api-0", 80, "TCP")
        .expect("probe");
    assert!(
        r.allowed() && r.answered_by.as_deref() == Some("shop/api-0"),
        "{r:?}"
    );
    let r = lab
        .probe("ops/monitor", "shop/db", 80, "TCP")
        .expect("probe");
    assert!(!r.allowed(), "{r:?}");
    let r = lab
        .probe("shop/frontend", "svc/shop/api", 80, "TCP")
        .expect("probe");
    assert!(r.allowed(), "{r:?}");
    assert!(
        ["shop/api-0", "shop/api-1"].contains(&r.answered_by.as_deref().unwrap_or_default()),
        "{r:?}"
    );
    let frontend_node = lab.find_pod("shop/frontend").expect("pod").node;
    let unknown = |lab: &Lab| {
        lab.dump(frontend_node, "dp_metrics")
            .expect("metrics")
            .iter()
            .filter(|r| r["reason"] == "unknown_destination")
            .map(|r| r["packets"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let before = unknown(&lab);
    let r = lab
        .probe("shop/frontend", "10.244.200.5", 53, "UDP")
        .expect("probe");
    assert!(!r.allowed(), "{r:?}");
    assert!(
        unknown(&lab) > before,
        "the real datagram was dropped as unknown_destination"
    );
}

#[test]
fn explain_agrees_with_real_packets_in_vxlan_mode() {
    explain_agrees_with_real_packets("vxlan");
}

#[test]
fn explain_agrees_with_real_packets_in_native_mode() {
    explain_agrees_with_real_packets("native");
}
