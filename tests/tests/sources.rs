//! Cluster state from the manifest directory: edits show up in the maps,
//! bad input is skipped with the object and field named. Needs root.

use std::time::{Duration, Instant};

use lab::{Lab, LabSpec, ping};
use serde_json::Value;

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn endpoint(lab: &Lab, node: usize, ip: &str) -> Option<Value> {
    lab.dump(node, "dp_endpoints")
        .expect("dump")
        .into_iter()
        .find(|r| r["ip"] == ip)
}

fn pod_doc(name: &str, node: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: web\nspec:\n  nodeName: {node}\n  containers: []\nstatus:\n  podIPs:\n  - ip: {ip}\n"
    )
}

#[test]
fn manifest_edits_reach_the_maps() {
    let lab = Lab::up(&LabSpec::new(2, 1).expect("spec")).expect("lab");
    let n1 = lab.state.nodes[1].name.clone();
    // Remote pods from their Pod objects: in node 0's endpoint map, not local.
    let remote = lab.pod("pod-1-0").ip.to_string();
    wait_for("the remote pod", || endpoint(&lab, 0, &remote).is_some());
    let e = endpoint(&lab, 0, &remote).expect("remote pod in dp_endpoints");
    assert_eq!(e["local"], false);
    assert_eq!(e["ifindex"], 0);

    lab.write_manifest("extra.yaml", &pod_doc("extra", &n1, "10.244.1.77"))
        .expect("write");
    wait_for("a new Pod", || endpoint(&lab, 0, "10.244.1.77").is_some());
    std::fs::remove_file(lab.state.manifests.join("extra.yaml")).expect("rm");
    wait_for("a removed Pod", || {
        endpoint(&lab, 0, "10.244.1.77").is_none()
    });

    // A node's pod CIDR changes: the route and the ipcache follow.
    let ipcache = |n: usize| -> Vec<String> {
        lab.dump(n, "dp_ipcache")
            .expect("dump")
            .iter()
            .map(|r| r["prefix"].as_str().expect("prefix").to_owned())
            .collect()
    };
    let nodes = std::fs::read_to_string(lab.state.manifests.join("nodes.yaml")).expect("read");
    lab.write_manifest(
        "nodes.yaml",
        &nodes.replace("10.244.1.0/24", "10.244.9.0/24"),
    )
    .expect("write");
    // The new prefix goes in before the old one comes out; the routes
    // follow in the same pass, just after the map.
    let routes = || {
        let out = lab::run(std::process::Command::new("ip").args([
            "-n",
            &lab.state.nodes[0].netns,
            "route",
        ]))
        .expect("ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_for("a changed pod CIDR", || {
        let p = ipcache(0);
        let r = routes();
        p.contains(&"10.244.9.0/24".to_owned())
            && !p.contains(&"10.244.1.0/24".to_owned())
            && r.contains("10.244.9.0/24")
            && !r.contains("10.244.1.0/24")
    });
}

#[test]
fn bad_manifests_are_skipped_naming_object_and_field() {
    let lab = Lab::up(&LabSpec::new(2, 1).expect("spec")).expect("lab");
    let n1 = lab.state.nodes[1].name.clone();
    let (a, c) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    let docs = [
        pod_doc("good", &n1, "10.244.1.80"),
        pod_doc("badip", &n1, "10.244.1.300"),
        pod_doc("dup", &n1, "10.244.1.80"),
        "apiVersion: example.com/v1\nkind: Gadget\nmetadata:\n  name: g\n".to_owned(),
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: weird\nspec:\n  podCIDR: 10.244.5.1/24\n".to_owned(),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n  namespace: web\nspec:\n  clusterIPs: [\"10.96.0.999\"]\n".to_owned(),
    ];
    lab.write_manifest("mixed.yaml", &docs.join("---\n"))
        .expect("write");
    // Two pods claim one address: the first by name (web/dup) keeps it.
    wait_for("the pod that keeps the address", || {
        endpoint(&lab, 0, "10.244.1.80").is_some()
    });
    let log = lab.agent_log(0);
    for expected in [
        "Pod web/badip: status.podIPs: \"10.244.1.300\"",
        "address 10.244.1.80 already belongs to pod web/dup; skipped",
        "unknown kind \"Gadget\"",
        "Node weird: spec.podCIDRs: \"10.244.5.1/24\" has host bits set",
        "Service web/s: spec.clusterIPs: \"10.96.0.999\"",
    ] {
        assert!(log.contains(expected), "log lacks {expected:?}:\n{log}");
    }
    // A persistent conflict is reported once, not again on every change.
    lab.write_manifest("later.yaml", &pod_doc("later", &n1, "10.244.1.81"))
        .expect("write");
    wait_for("an unrelated change", || {
        endpoint(&lab, 0, "10.244.1.81").is_some()
    });
    let log = lab.agent_log(0);
    assert_eq!(
        log.matches("already belongs to pod web/dup").count(),
        1,
        "{log}"
    );
    // Everything else keeps working.
    assert_eq!(
        ping(&a.netns, &c.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
    assert!(
        lab.dump(0, "dp_ipcache")
            .expect("dump")
            .iter()
            .all(|r| r["prefix"] != "10.244.5.0/24")
    );
}

#[test]
fn own_pod_cidr_comes_from_the_node_object() {
    let mut spec = LabSpec::new(2, 1).expect("spec");
    spec.pod_cidr_flag = false;
    let lab = Lab::up(&spec).expect("lab");
    let status = lab.cli(0, &["status"]).expect("status");
    assert!(status.contains("10.244.0.0/24"), "{status}");
    // The CNI plugin allocated from it, and pods reach each other.
    let (a, c) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    assert!(
        a.ip.to_string().starts_with("10.244.0.") && c.ip.to_string().starts_with("10.244.1."),
        "{} {}",
        a.ip,
        c.ip
    );
    assert_eq!(
        ping(&a.netns, &c.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
    let ipcache = lab.dump(0, "dp_ipcache").expect("dump");
    assert!(
        ipcache
            .iter()
            .any(|r| r["prefix"] == "10.244.0.0/24" && r["kind"] == "local-pods"),
        "{ipcache:?}"
    );
}
