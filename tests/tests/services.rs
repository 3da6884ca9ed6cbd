//! Services with real traffic: every Service type from pods on either node,
//! from nodes and from the external host, over TCP and UDP, in both
//! tunnel modes. Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use lab::{
    Lab, LabSpec,
    services::{Attempt, Ep, Who, attempt, identity_server, service, who, who_udp},
};
use serde_json::{Value, json};

const CLUSTER_IP: [u8; 4] = [10, 96, 0, 10];
const EXTERNAL_IP: [u8; 4] = [192, 0, 2, 10];
const LB_IP: [u8; 4] = [192, 0, 2, 20];
const HTTP: u16 = 8080;
const DNS: u16 = 5353;
const METRICS: u16 = 9090;
const NODE_PORT: u16 = 30080;
const NODE_PORT_UDP: u16 = 30053;

fn lab(mode: &str, nodes: usize, pods: usize) -> Lab {
    let mut spec = LabSpec::new(nodes, pods).expect("spec");
    spec.mode = mode.into();
    Lab::up(&spec).expect("lab up")
}

fn sa(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Sets its flag when dropped: servers stop also when a check panics (the
/// scope would otherwise wait for them forever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs `f` with identity servers in `pods` (named after their pod) on the
/// backend ports.
fn with_backends<T>(lab: &Lab, pods: &[&str], f: impl FnOnce() -> T) -> T {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        for p in pods {
            let (ns, name, stop) = (lab.pod(p).netns.clone(), p.to_string(), &stop);
            s.spawn(move || {
                identity_server(&ns, &name, &[HTTP, DNS, METRICS], stop).expect("identity server")
            });
        }
        // The servers bind before they are asked.
        std::thread::sleep(Duration::from_millis(100));
        f()
    })
}

/// `web`: a LoadBalancer Service with a ClusterIP, NodePorts, an external
/// IP and a load-balancer IP; three ports, the TCP one by a named target
/// port.
fn web(extra: Value) -> Value {
    let mut spec = json!({
        "type": "LoadBalancer",
        "clusterIP": "10.96.0.10",
        "externalIPs": ["192.0.2.10"],
        "selector": {"app": "web"},
        "ports": [
            {"name": "http", "port": 80, "targetPort": "http", "nodePort": NODE_PORT},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": DNS, "nodePort": NODE_PORT_UDP},
            {"name": "metrics", "port": 9090, "targetPort": METRICS, "nodePort": 30090},
        ],
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    service(
        "web",
        spec,
        json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.20"}]}}),
    )
}

fn web_ports() -> Value {
    json!([
        {"name": "http", "port": HTTP, "protocol": "TCP"},
        {"name": "dns", "port": DNS, "protocol": "UDP"},
        {"name": "metrics", "port": METRICS, "protocol": "TCP"},
    ])
}

/// Routes on the external host: the external IP via node 0, the
/// load-balancer IP via node 1 (as an upstream router would).
fn route_external(lab: &Lab) {
    let ext = lab.state.external.as_ref().expect("external host");
    for (ip, node) in [(EXTERNAL_IP, 0), (LB_IP, 1)] {
        let via = lab.state.nodes[node].ip.to_string();
        let dst = format!("{}/32", Ipv4Addr::from(ip));
        lab::ip(&["-n", &ext.netns, "route", "replace", &dst, "via", &via]).expect("route");
    }
}

/// Every Service type from every kind of client, TCP and UDP; the answers
/// come from the backends (and both of them answer someone).
fn every_type_from_everywhere(mode: &str) {
    let lab = lab(mode, 2, 2);
    let backends = ["pod-0-1", "pod-1-1"];
    lab.set_services(
        vec![web(json!({}))],
        vec![lab.slice("web", "web-1", &backends.map(Ep::ready), web_ports())],
    )
    .expect("publish");
    for i in 0..2 {
        lab.wait_frontend(i, "10.96.0.10:80/tcp", "internal", 2)
            .expect("frontend");
        lab.wait_frontend(i, "*:30080/tcp", "external", 2)
            .expect("frontend");
    }
    route_external(&lab);
    let n0 = lab.state.nodes[0].ip.octets();
    let n1 = lab.state.nodes[1].ip.octets();
    let ext = lab.state.external.as_ref().expect("ext").netns.clone();
    let mut clients: Vec<(String, String)> = vec![
        ("pod-0-0 (node 0)".into(), lab.pod("pod-0-0").netns.clone()),
        ("pod-1-0 (node 1)".into(), lab.pod("pod-1-0").netns.clone()),
    ];
    for (i, n) in lab.state.nodes.iter().enumerate() {
        clients.push((format!("node {i}"), n.netns.clone()));
    }
    clients.push(("external host".into(), ext));
    with_backends(&lab, &backends, || {
        let mut failures = Vec::new();
        let mut answered: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (client, ns) in &clients {
            let external = client == "external host";
            let mut targets: Vec<(&str, SocketAddr, bool)> = vec![
                ("NodePort on node 0", sa(n0, NODE_PORT), false),
                ("NodePort on node 1", sa(n1, NODE_PORT), false),
                ("UDP NodePort on node 1", sa(n1, NODE_PORT_UDP), true),
                ("external IP", sa(EXTERNAL_IP, 80), false),
                ("load-balancer IP", sa(LB_IP, 80), false),
                ("UDP load-balancer IP", sa(LB_IP, 53), true),
            ];
            if !external {
                // ClusterIPs are for the cluster's own pods and nodes.
                targets.push(("ClusterIP", sa(CLUSTER_IP, 80), false));
                targets.push(("ClusterIP, second port", sa(CLUSTER_IP, 9090), false));
                targets.push(("UDP ClusterIP", sa(CLUSTER_IP, 53), true));
            }
            // A node reaches other nodes' NodePorts, not its own (the stack
            // delivers those locally; see the README).
            if client == "node 0" {
                targets.retain(|t| t.0 != "NodePort on node 0");
            }
            if client == "node 1" {
                targets.retain(|t| !t.0.contains("NodePort on node 1"));
            }
            for (what, to, udp) in targets {
                for _ in 0..4 {
                    let r = if udp {
                        who_udp(ns, to, 0)
                    } else {
                        who(ns, to, 0)
                    };
                    match r {
                        Ok(Who { name, .. }) if backends.contains(&name.as_str()) => {
                            answered
                                .entry(format!("{client} -> {what}"))
                                .or_default()
                                .insert(name);
                        }
                        other => {
                            failures.push(format!("{client} -> {what} ({to}): {other:?}"));
                            break;
                        }
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{mode}:\n{}", failures.join("\n"));
        let all: BTreeSet<String> = answered.values().flatten().cloned().collect();
        assert_eq!(all.len(), 2, "both backends answer someone: {answered:#?}");
    });
    no_rules(&lab);
    for i in 0..2 {
        let rows = lab.dump(i, "dp_metrics").expect("dump");
        let drops: Vec<&Value> = rows.iter().filter(|r| r["drop"] == true).collect();
        assert!(drops.is_empty(), "node {i} dropped: {drops:?}");
    }
}

/// The datapath needs no packet-filter rules: every node's ruleset and
/// iptables tables are empty.
fn no_rules(lab: &Lab) {
    for n in &lab.state.nodes {
        let nft = Command::new("ip")
            .args(["netns", "exec", &n.netns, "nft", "list", "ruleset"])
            .output()
            .expect("nft");
        assert!(
            nft.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&nft.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&nft.stdout).trim(),
            "",
            "nft rules on {}",
            n.name
        );
        let ipt = Command::new("ip")
            .args(["netns", "exec", &n.netns, "iptables-save"])
            .output()
            .expect("iptables-save");
        let rules: Vec<String> = String::from_utf8_lossy(&ipt.stdout)
            .lines()
            .filter(|l| l.starts_with('-'))
            .map(str::to_owned)
            .collect();
        assert!(rules.is_empty(), "iptables rules on {}: {rules:?}", n.name);
    }
}

#[test]
fn every_service_type_from_everywhere_vxlan() {
    every_type_from_everywhere("vxlan");
}

#[test]
fn every_service_type_from_everywhere_native() {
    every_type_from_everywhere("native");
}

#[test]
fn a_service_without_endpoints_is_refused_at_once() {
    let lab = lab("vxlan", 2, 1);
    lab.set_services(
        vec![web(json!({}))],
        vec![lab.slice("web", "web-1", &[], web_ports())],
    )
    .expect("publish");
    lab.wait_frontend(0, "10.96.0.10:80/tcp", "internal", 0)
        .expect("frontend");
    lab.wait_frontend(1, "*:30080/tcp", "external", 0)
        .expect("frontend");
    let n1 = lab.state.nodes[1].ip.octets();
    let ext = lab.state.external.as_ref().expect("ext").netns.clone();
    for (client, ns, to) in [
        ("pod", lab.pod("pod-0-0").netns.clone(), sa(CLUSTER_IP, 80)),
        ("node", lab.state.nodes[0].netns.clone(), sa(CLUSTER_IP, 80)),
        ("external host", ext, sa(n1, NODE_PORT)),
    ] {
        match attempt(&ns, to).expect("attempt") {
            Attempt::Refused(t) => assert!(
                t < Duration::from_millis(100),
                "{client}: refused after {t:?}"
            ),
            other => panic!("{client} -> {to}: {other:?}"),
        }
    }
    let count = |i: usize, dir: &str| {
        lab.dump(i, "dp_metrics")
            .expect("dump")
            .iter()
            .find(|r| r["direction"] == dir && r["reason"] == "service_no_backend")
            .and_then(|r| r["packets"].as_u64())
            .unwrap_or(0)
    };
    assert!(
        count(0, "from-endpoint") >= 1,
        "the pod's refusal is counted"
    );
    assert!(count(0, "from-host") >= 1, "the node's refusal is counted");
    assert!(
        count(1, "from-network") >= 1,
        "the external refusal is counted"
    );
}

/// A ClusterIP Service `name` (port 80 to the identity servers' HTTP port,
/// 53/UDP to their DNS port) with `extra` spec fields.
fn cluster_ip(name: &str, ip: &str, extra: Value) -> Value {
    let mut spec = json!({
        "clusterIP": ip,
        "ports": [
            {"name": "http", "port": 80, "targetPort": HTTP},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": DNS},
        ],
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    service(name, spec, json!({}))
}

fn ports() -> Value {
    json!([
        {"name": "http", "port": HTTP, "protocol": "TCP"},
        {"name": "dns", "port": DNS, "protocol": "UDP"},
    ])
}

fn counted(lab: &Lab, i: usize, direction: &str, reason: &str) -> u64 {
    lab.dump(i, "dp_metrics")
        .expect("dump")
        .iter()
        .find(|r| r["hook"] == "tc" && r["direction"] == direction && r["reason"] == reason)
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or(0)
}

#[test]
fn new_connections_spread_evenly_over_the_backends() {
    let lab = lab("vxlan", 2, 3);
    let backends = ["pod-0-1", "pod-0-2", "pod-1-1"];
    lab.set_services(
        vec![cluster_ip("web", "10.96.0.10", json!({}))],
        vec![lab.slice("web", "web-1", &backends.map(Ep::ready), ports())],
    )
    .expect("publish");
    lab.wait_frontend(0, "10.96.0.10:80/tcp", "internal", 3)
        .expect("frontend");
    with_backends(&lab, &backends, || {
        let answers = lab::services::who_many(&lab.pod("pod-0-0").netns, sa(CLUSTER_IP, 80), 1000)
            .expect("1000 connections");
        let mut per: BTreeMap<String, usize> = BTreeMap::new();
        for w in answers {
            *per.entry(w.name).or_default() += 1;
        }
        assert_eq!(per.len(), 3, "{per:?}");
        for (b, n) in &per {
            let dev = (*n as f64 - 1000.0 / 3.0).abs() / (1000.0 / 3.0);
            assert!(dev <= 0.2, "{b} got {n} of 1000 connections: {per:?}");
        }
    });
}

#[test]
fn session_affinity_holds_a_client_until_its_timeout() {
    let lab = lab("vxlan", 2, 3);
    let backends = ["pod-0-1", "pod-0-2", "pod-1-1"];
    lab.set_services(
        vec![cluster_ip(
            "web",
            "10.96.0.10",
            json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 1}}}),
        )],
        vec![lab.slice("web", "web-1", &backends.map(Ep::ready), ports())],
    )
    .expect("publish");
    lab.wait_frontend(0, "10.96.0.10:80/tcp", "internal", 3)
        .expect("frontend");
    let rows = lab.frontends(0).expect("rows");
    let row = rows
        .iter()
        .find(|r| r["frontend"] == "10.96.0.10:80/tcp")
        .expect("row");
    assert_eq!(row["affinity_timeout"], 1);
    with_backends(&lab, &backends, || {
        let ns = lab.pod("pod-0-0").netns.clone();
        let answers = lab::services::who_many(&ns, sa(CLUSTER_IP, 80), 100).expect("connections");
        let names: BTreeSet<String> = answers.into_iter().map(|w| w.name).collect();
        assert_eq!(
            names.len(),
            1,
            "100 connections of one client, one backend: {names:?}"
        );
        // Idle past the timeout before each: the choice is made afresh.
        let mut spread = BTreeSet::new();
        for _ in 0..12 {
            std::thread::sleep(Duration::from_millis(1100));
            spread.insert(who(&ns, sa(CLUSTER_IP, 80), 0).expect("who").name);
        }
        assert!(
            spread.len() > 1,
            "after the timeout flows spread again: {spread:?}"
        );
    });
}

#[test]
fn traffic_policy_local_keeps_the_client_address_or_drops() {
    let lab = lab("vxlan", 2, 2);
    // The only endpoint runs on node 1.
    let backends = ["pod-1-1"];
    let np = |name: &str, ip: &str, node_port: u16, policy: &str| {
        service(
            name,
            json!({"type": "NodePort", "clusterIP": ip, "externalTrafficPolicy": policy,
                   "internalTrafficPolicy": policy,
                   "ports": [{"name": "http", "port": 80, "targetPort": HTTP, "nodePort": node_port}]}),
            json!({}),
        )
    };
    lab.set_services(
        vec![
            np("local", "10.96.0.10", 30080, "Local"),
            np("cluster", "10.96.0.11", 30081, "Cluster"),
        ],
        vec![
            lab.slice("local", "local-1", &backends.map(Ep::ready), ports()),
            lab.slice("cluster", "cluster-1", &backends.map(Ep::ready), ports()),
        ],
    )
    .expect("publish");
    lab.wait_frontend(0, "*:30080/tcp", "external", 0)
        .expect("no local endpoint on node 0");
    lab.wait_frontend(1, "*:30080/tcp", "external", 1)
        .expect("node 1");
    lab.wait_frontend(0, "*:30081/tcp", "external", 1)
        .expect("node 0, Cluster");
    let ext = lab.state.external.as_ref().expect("ext");
    let (n0, n1) = (lab.state.nodes[0].ip, lab.state.nodes[1].ip);
    with_backends(&lab, &backends, || {
        // Local: the backend sees the client itself.
        let w = who(&ext.netns, SocketAddr::from((n1, 30080)), 0).expect("local policy");
        assert_eq!(w.peer.ip(), std::net::IpAddr::V4(ext.ip), "{w:?}");
        // Cluster, through the other node: the backend sees that node.
        let w = who(&ext.netns, SocketAddr::from((n0, 30081)), 0).expect("cluster policy");
        assert_eq!(w.peer.ip(), std::net::IpAddr::V4(n0), "{w:?}");
        // Local, on a node without a local endpoint: dropped, not refused.
        let before = counted(&lab, 0, "from-network", "no_local_backend");
        match attempt(&ext.netns, SocketAddr::from((n0, 30080))).expect("attempt") {
            Attempt::Failed(e, _) => assert!(e.contains("timed out"), "{e}"),
            other => panic!("expected a drop: {other:?}"),
        }
        assert!(counted(&lab, 0, "from-network", "no_local_backend") > before);
        // internalTrafficPolicy Local: a pod on node 0 has no local endpoint.
        let before = counted(&lab, 0, "from-endpoint", "no_local_backend");
        match attempt(&lab.pod("pod-0-0").netns, sa(CLUSTER_IP, 80)).expect("attempt") {
            Attempt::Failed(e, _) => assert!(e.contains("timed out"), "{e}"),
            other => panic!("expected a drop: {other:?}"),
        }
        assert!(counted(&lab, 0, "from-endpoint", "no_local_backend") > before);
        // ... while a pod on node 1 gets its node's endpoint.
        let w = who(&lab.pod("pod-1-0").netns, sa(CLUSTER_IP, 80), 0).expect("node 1 pod");
        assert_eq!(w.name, "pod-1-1");
        assert_eq!(
            w.peer.ip(),
            std::net::IpAddr::V4(lab.pod("pod-1-0").ip),
            "pods keep their address"
        );
    });
}

#[test]
fn masquerade_shows_the_node_address_outside() {
    let lab = lab("vxlan", 2, 1);
    let ext = lab.state.external.clone().expect("ext");
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        s.spawn(|| identity_server(&ext.netns, "ext", &[HTTP], &stop).expect("server"));
        std::thread::sleep(Duration::from_millis(100));
        for (pod, node) in [("pod-0-0", 0), ("pod-1-0", 1)] {
            let to = SocketAddr::from((ext.ip, HTTP));
            let ns = lab.pod(pod).netns.clone();
            let w = who(&ns, to, 0).expect("tcp to the outside");
            assert_eq!(
                w.peer.ip(),
                std::net::IpAddr::V4(lab.state.nodes[node].ip),
                "{pod}: {w:?}"
            );
            let u = who_udp(&ns, to, 0).expect("udp to the outside");
            assert_eq!(
                u.peer.ip(),
                std::net::IpAddr::V4(lab.state.nodes[node].ip),
                "{pod}: {u:?}"
            );
            let p = lab::ping(&ns, &ext.ip.to_string(), 2, &[]).expect("ping");
            assert_eq!(p.received, 2, "{pod}: ICMP echo to the outside");
        }
    });
    let rows = lab.cli(0, &["ct", "list", "-o", "json"]).expect("ct list");
    let rows: Vec<Value> = serde_json::from_str(&rows).expect("json");
    assert!(
        rows.iter().any(|r| r["flags"]
            .as_array()
            .is_some_and(|f| f.contains(&json!("masquerade")))),
        "{rows:#?}"
    );
}

#[test]
fn established_streams_survive_backend_changes_and_udp_follows_removals() {
    let lab = lab("vxlan", 2, 4);
    let all = [
        "pod-0-1", "pod-0-2", "pod-0-3", "pod-1-1", "pod-1-2", "pod-1-3",
    ];
    let publish = |eps: &[&str]| {
        let eps: Vec<Ep> = eps.iter().map(|p| Ep::ready(p)).collect();
        lab.set_services(
            vec![
                cluster_ip("web", "10.96.0.10", json!({})),
                cluster_ip("other", "10.96.0.11", json!({})),
            ],
            vec![
                lab.slice("web", "web-1", &eps, ports()),
                lab.slice("other", "other-1", &[Ep::ready("pod-1-3")], ports()),
            ],
        )
        .expect("publish");
    };
    publish(&all[..3]);
    lab.wait_frontend(0, "10.96.0.10:80/tcp", "internal", 3)
        .expect("frontend");
    lab.wait_frontend(0, "10.96.0.11:80/tcp", "internal", 1)
        .expect("frontend");
    with_backends(&lab, &all, || {
        let ns = lab.pod("pod-0-0").netns.clone();
        lab::in_netns_thread(&ns, || {
            let mut web = lab::services::Stream::open(sa(CLUSTER_IP, 80)).expect("stream");
            let mut other = lab::services::Stream::open(sa([10, 96, 0, 11], 80)).expect("stream");
            let mine = web.first.name.clone();
            assert_eq!(web.ask("one").expect("ask"), mine);
            // Backends come, and every other one goes, around the stream.
            let mut next: Vec<&str> = all
                .iter()
                .copied()
                .filter(|b| *b == mine || !all[..3].contains(b))
                .collect();
            publish(&next);
            lab.wait_backends(0, "10.96.0.10:80/tcp", "internal", &next)
                .expect("frontend");
            assert_eq!(
                web.ask("two").expect("ask"),
                mine,
                "the stream keeps its backend"
            );
            assert_eq!(
                other.ask("x").expect("ask"),
                "pod-1-3",
                "another Service's stream is untouched"
            );
            next.retain(|b| *b == mine || *b == "pod-1-1");
            publish(&next);
            lab.wait_backends(0, "10.96.0.10:80/tcp", "internal", &next)
                .expect("frontend");
            for i in 0..20 {
                assert_eq!(web.ask(&format!("m{i}")).expect("ask"), mine);
            }
        })
        .expect("in netns");
        // UDP: a datagram flow to a backend that leaves moves on at once.
        // The same count as before: only the exact set says it is applied.
        publish(&["pod-0-1", "pod-0-2"]);
        lab.wait_backends(0, "10.96.0.10:53/udp", "internal", &["pod-0-1", "pod-0-2"])
            .expect("frontend");
        let first = who_udp(&ns, sa(CLUSTER_IP, 53), 45000).expect("udp");
        assert_eq!(
            who_udp(&ns, sa(CLUSTER_IP, 53), 45000).expect("udp").name,
            first.name,
            "conntrack"
        );
        let rest: Vec<&str> = ["pod-0-1", "pod-0-2"]
            .into_iter()
            .filter(|b| *b != first.name)
            .collect();
        publish(&rest);
        lab.wait_backends(0, "10.96.0.10:53/udp", "internal", &rest)
            .expect("frontend");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = who_udp(&ns, sa(CLUSTER_IP, 53), 45000).expect("udp").name;
            if now == rest[0] {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the UDP flow stays on {now} after it left"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

#[test]
fn a_full_conntrack_table_evicts_counts_and_keeps_working() {
    let mut spec = LabSpec::new(1, 2).expect("spec");
    spec.agent_args = ["--ct-max", "256", "--ct-gc-interval", "1s"]
        .map(String::from)
        .to_vec();
    let lab = Lab::up(&spec).expect("lab");
    lab.set_services(
        vec![cluster_ip("web", "10.96.0.10", json!({}))],
        vec![lab.slice("web", "web-1", &[Ep::ready("pod-0-1")], ports())],
    )
    .expect("publish");
    lab.wait_frontend(0, "10.96.0.10:53/udp", "internal", 1)
        .expect("frontend");
    let listed = lab.cli(0, &["map", "list"]).expect("map list");
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("dp_ct ") && l.split_whitespace().nth(4) == Some("256")),
        "{listed}"
    );
    with_backends(&lab, &["pod-0-1"], || {
        let ns = lab.pod("pod-0-0").netns.clone();
        // 400 flows take 800 entries in a table of 256.
        for port in 50000..50400 {
            who_udp(&ns, sa(CLUSTER_IP, 53), port).expect("udp flow");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let evicted = lab
                .metric(0, "dataplane_ct_evicted_total")
                .expect("metrics")
                .unwrap_or(0.0);
            if evicted >= 400.0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "evictions counted: {evicted}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let live = lab
            .metric(0, "dataplane_ct_entries")
            .expect("metrics")
            .unwrap_or(0.0);
        assert!(live <= 256.0, "{live}");
        // New connections still work.
        assert_eq!(
            who(&ns, sa(CLUSTER_IP, 80), 0).expect("tcp").name,
            "pod-0-1"
        );
        assert_eq!(
            who_udp(&ns, sa(CLUSTER_IP, 53), 0).expect("udp").name,
            "pod-0-1"
        );
    });
}

#[test]
fn maglev_picks_the_same_backend_on_every_node_and_moves_only_the_removed_ones_flows() {
    let lab = lab("vxlan", 2, 6);
    let all: Vec<String> = (0..2)
        .flat_map(|n| (1..6).map(move |j| format!("pod-{n}-{j}")))
        .collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let publish = |eps: &[&str]| {
        let eps: Vec<Ep> = eps.iter().map(|p| Ep::ready(p)).collect();
        lab.set_services(
            vec![service(
                "mag",
                json!({"type": "NodePort", "clusterIP": "10.96.0.10", "ports": [
                    {"name": "http", "port": 80, "targetPort": HTTP, "nodePort": NODE_PORT},
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": DNS, "nodePort": NODE_PORT_UDP}]}),
                json!({}),
            )],
            vec![lab.slice("mag", "mag-1", &eps, ports())],
        )
        .expect("publish");
        for i in 0..2 {
            lab.wait_frontend(i, "*:30053/udp", "external", eps.len())
                .expect("frontend");
            lab.wait_frontend(i, "*:30080/tcp", "external", eps.len())
                .expect("frontend");
        }
    };
    publish(&all);
    // Every node has the same table (by backend address).
    let t0 = lab.maglev_table(0, "*:30053/udp").expect("table");
    let t1 = lab.maglev_table(1, "*:30053/udp").expect("table");
    assert_eq!(t0.len(), 16_381, "the default size");
    assert!(t0 == t1, "the nodes' tables differ");
    let ext = lab.state.external.clone().expect("ext");
    let (n0, n1) = (lab.state.nodes[0].ip, lab.state.nodes[1].ip);
    let udp_ports: Vec<u16> = (40000..40100).collect();
    with_backends(&lab, &all, || {
        // The same flow (client address and port) picks the same backend
        // whichever node it arrives at.
        let mut before = BTreeMap::new();
        for p in &udp_ports {
            let a = who_udp(&ext.netns, SocketAddr::from((n0, NODE_PORT_UDP)), *p)
                .expect("via node 0")
                .name;
            let b = who_udp(&ext.netns, SocketAddr::from((n1, NODE_PORT_UDP)), *p)
                .expect("via node 1")
                .name;
            assert_eq!(a, b, "source port {p}: node 0 picked {a}, node 1 {b}");
            before.insert(*p, a);
        }
        let used: BTreeSet<&String> = before.values().collect();
        assert!(
            used.len() >= 8,
            "100 flows over 10 backends reach most: {used:?}"
        );
        // Live TCP streams through node 0.
        let removed = before.values().next().expect("a flow").clone();
        lab::in_netns_thread(&ext.netns, || {
            let mut streams: Vec<lab::services::Stream> = (0..30)
                .map(|_| {
                    lab::services::Stream::open(SocketAddr::from((n0, NODE_PORT))).expect("stream")
                })
                .collect();
            let streams_before: Vec<String> =
                streams.iter().map(|s| s.first.name.clone()).collect();
            // One backend of ten goes.
            let rest: Vec<&str> = all.iter().copied().filter(|b| *b != removed).collect();
            publish(&rest);
            for (s, was) in streams.iter_mut().zip(&streams_before) {
                if *was != removed {
                    assert_eq!(&s.ask("still").expect("a live stream answers"), was);
                }
            }
        })
        .expect("netns");
        // The table: only the removed backend's slots changed owner.
        let after = lab.maglev_table(0, "*:30053/udp").expect("table");
        let removed_addr = format!("{}:{DNS}", lab.pod(&removed).ip);
        let mut moved = 0;
        for (slot, (a, b)) in t0.iter().zip(&after).enumerate() {
            if *a == removed_addr {
                assert_ne!(*b, removed_addr);
                moved += 1;
            } else {
                assert_eq!(a, b, "slot {slot} moved from {a} to {b}");
            }
        }
        assert!(moved > 1000, "the removed backend had {moved} slots");
        assert!(
            after == lab.maglev_table(1, "*:30053/udp").expect("table"),
            "the nodes' tables differ after"
        );
        // New flows (conntrack flushed): the same tuples land where they
        // did, unless their backend is gone.
        for i in 0..2 {
            lab.cli(i, &["ct", "flush"]).expect("flush");
        }
        for p in &udp_ports {
            let now = who_udp(&ext.netns, SocketAddr::from((n1, NODE_PORT_UDP)), *p)
                .expect("after")
                .name;
            if before[p] == removed {
                assert_ne!(now, removed, "port {p}");
            } else {
                assert_eq!(now, before[p], "port {p} moved though its backend stayed");
            }
        }
    });
}

#[test]
fn bad_service_input_is_reported_by_field_and_the_last_good_state_kept() {
    let lab = lab("vxlan", 1, 2);
    let good = cluster_ip("web", "10.96.0.10", json!({}));
    let slice = lab.slice("web", "web-1", &[Ep::ready("pod-0-1")], ports());
    lab.set_services(vec![good.clone()], vec![slice.clone()])
        .expect("publish");
    lab.wait_frontend(0, "10.96.0.10:80/tcp", "internal", 1)
        .expect("frontend");
    let mut bad_ip = good.clone();
    bad_ip["spec"]["clusterIP"] = json!("10.96.0.999");
    let mut bad_port = good.clone();
    bad_port["spec"]["ports"][0]["port"] = json!(70000);
    let named = service(
        "named",
        json!({"clusterIP": "10.96.0.11", "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}),
        json!({}),
    );
    let named_slice = lab.slice(
        "named",
        "named-1",
        &[Ep::ready("pod-0-1")],
        json!([{"name": "other", "port": 1, "protocol": "TCP"}]),
    );
    let ghost = lab.slice("ghost", "ghost-1", &[Ep::ready("pod-0-1")], ports());
    let mut no_label = lab.slice("web", "web-2", &[Ep::ready("pod-0-0")], ports());
    no_label["metadata"]["labels"] = json!({});
    for (what, services, slices, expect) in [
        (
            "clusterIP",
            vec![bad_ip],
            vec![slice.clone()],
            "Service default/web: spec.clusterIPs",
        ),
        (
            "port",
            vec![bad_port],
            vec![slice.clone()],
            "Service default/web: spec.ports[0].port: port 70000 is out of range",
        ),
        (
            "named targetPort",
            vec![good.clone(), named.clone()],
            vec![slice.clone(), named_slice.clone()],
            "Service default/named: spec.ports[0].targetPort \"web\": no endpoint defines it",
        ),
        (
            "slice of a missing Service",
            vec![good.clone(), named.clone()],
            vec![slice.clone(), named_slice.clone(), ghost.clone()],
            "EndpointSlice default/ghost-1: metadata.labels[kubernetes.io/service-name] \"ghost\": no such Service",
        ),
        (
            "slice without a Service label",
            vec![good.clone(), named.clone()],
            vec![slice.clone(), no_label.clone()],
            "EndpointSlice default/web-2: metadata.labels[kubernetes.io/service-name]: missing",
        ),
    ] {
        lab.set_services(services, slices).expect("publish");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !lab.agent_log(0).contains(expect) {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: no log line with {expect:?}:\n{}",
                lab.agent_log(0)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The last good state of web is kept: one backend, still answering.
        lab.wait_frontend(0, "10.96.0.10:80/tcp", "internal", 1)
            .expect(what);
        with_backends(&lab, &["pod-0-1"], || {
            assert_eq!(
                who(&lab.pod("pod-0-0").netns, sa(CLUSTER_IP, 80), 0)
                    .expect(what)
                    .name,
                "pod-0-1"
            );
        });
    }
    // The named port without endpoints: a frontend that refuses.
    lab.wait_frontend(0, "10.96.0.11:80/tcp", "internal", 0)
        .expect("named");
}
