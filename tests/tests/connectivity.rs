//! Pod connectivity across nodes: VXLAN and native routing, real packets.
//! Needs root.

use std::{
    net::SocketAddr,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use lab::{Lab, LabSpec, ping};
use serde_json::Value;

const PORT: u16 = 9000;

fn lab(mode: &str, nodes: usize, pods: usize) -> Lab {
    let mut spec = LabSpec::new(nodes, pods).expect("spec");
    spec.mode = mode.into();
    Lab::up(&spec).expect("lab up")
}

fn metric(rows: &[Value], direction: &str, reason: &str) -> u64 {
    rows.iter()
        .find(|r| r["hook"] == "tc" && r["direction"] == direction && r["reason"] == reason)
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or(0)
}

/// Every ordered pair of pods over ICMP, TCP and UDP; every node to every
/// pod and back.
fn all_pairs(mode: &str, nodes: usize) {
    let lab = lab(mode, nodes, 2);
    let pods = lab.state.pods.clone();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for p in &pods {
            let (ns, stop) = (p.netns.clone(), &stop);
            s.spawn(move || lab::echo_server(&ns, PORT, stop).expect("echo server"));
        }
        let mut failures = Vec::new();
        for a in &pods {
            for b in &pods {
                if a.name == b.name {
                    continue;
                }
                let to = SocketAddr::from((b.ip, PORT));
                let icmp = ping(&a.netns, &b.ip.to_string(), 2, &[]).expect("ping");
                if icmp.received != 2 {
                    failures.push(format!("ICMP {} -> {}: {icmp:?}", a.name, b.name));
                }
                let line = format!("tcp {}->{}", a.name, b.name);
                match lab::tcp_echo(&a.netns, to, &line) {
                    Ok(r) if r == line => {}
                    other => failures.push(format!("TCP {} -> {}: {other:?}", a.name, b.name)),
                }
                let dgram = format!("udp {}->{}", a.name, b.name);
                match lab::udp_echo(&a.netns, to, &dgram) {
                    Ok(r) if r == dgram => {}
                    other => failures.push(format!("UDP {} -> {}: {other:?}", a.name, b.name)),
                }
            }
        }
        for (i, node) in lab.state.nodes.iter().enumerate() {
            for p in &pods {
                if ping(&node.netns, &p.ip.to_string(), 2, &[])
                    .expect("ping")
                    .received
                    != 2
                {
                    failures.push(format!("node {i} -> {}", p.name));
                }
                if ping(&p.netns, &node.ip.to_string(), 2, &[])
                    .expect("ping")
                    .received
                    != 2
                {
                    failures.push(format!("{} -> node {i}", p.name));
                }
                let line = format!("node{i}->{}", p.name);
                match lab::tcp_echo(&node.netns, SocketAddr::from((p.ip, PORT)), &line) {
                    Ok(r) if r == line => {}
                    other => failures.push(format!("TCP node {i} -> {}: {other:?}", p.name)),
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        assert!(
            failures.is_empty(),
            "{mode}, {nodes} nodes:\n{}",
            failures.join("\n")
        );
    });
    // No drops anywhere on the way.
    for i in 0..nodes {
        let rows = lab.dump(i, "dp_metrics").expect("dump");
        assert!(
            rows.iter().all(|r| r["drop"] == false),
            "node {i} dropped: {rows:?}"
        );
    }
}

#[test]
fn all_pairs_vxlan_two_nodes() {
    all_pairs("vxlan", 2);
}

#[test]
fn all_pairs_vxlan_three_nodes() {
    all_pairs("vxlan", 3);
}

#[test]
fn all_pairs_native_two_nodes() {
    all_pairs("native", 2);
}

#[test]
fn all_pairs_native_three_nodes() {
    all_pairs("native", 3);
}

#[test]
fn underlay_carries_vxlan_vni_1_on_udp_8472() {
    let lab = lab("vxlan", 2, 1);
    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    let cap = lab.capture_underlay(0, "udp").expect("capture");
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
    let frames = cap.finish().expect("pcap");
    let nodes = [lab.state.nodes[0].ip, lab.state.nodes[1].ip];
    let mut inner_pairs = Vec::new();
    for d in frames.iter().filter_map(|f| lab::decode(f, 8472)) {
        assert_eq!(d.proto, 17, "{d:?}");
        assert_eq!(
            d.dport,
            Some(8472),
            "UDP on the underlay to another port: {d:?}"
        );
        assert_eq!(d.vni, Some(1), "{d:?}");
        // Outer addresses are the nodes', inner ones the pods'.
        assert!(nodes.contains(&d.src) && nodes.contains(&d.dst), "{d:?}");
        inner_pairs.extend(d.inner);
    }
    assert_eq!(
        inner_pairs
            .iter()
            .filter(|p| **p == (a.ip, b.ip, 1))
            .count(),
        3,
        "{inner_pairs:?}"
    );
    assert_eq!(
        inner_pairs
            .iter()
            .filter(|p| **p == (b.ip, a.ip, 1))
            .count(),
        3,
        "{inner_pairs:?}"
    );
}

#[test]
fn native_routing_puts_bare_pod_addresses_on_the_underlay() {
    let lab = lab("native", 2, 1);
    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    let cap = lab.capture_underlay(0, "ip").expect("capture");
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
    let frames = cap.finish().expect("pcap");
    let ips: Vec<_> = frames.iter().filter_map(|f| lab::ipv4_of(f)).collect();
    assert_eq!(
        ips.iter()
            .filter(|p| (p.0, p.1, p.2) == (a.ip, b.ip, 1))
            .count(),
        3,
        "{ips:?}"
    );
    assert_eq!(
        ips.iter()
            .filter(|p| (p.0, p.1, p.2) == (b.ip, a.ip, 1))
            .count(),
        3,
        "{ips:?}"
    );
    assert!(
        ips.iter().all(|p| p.2 != 17),
        "UDP (encapsulation) on the underlay in native mode: {ips:?}"
    );
}

fn bulk(mode: &str) {
    const BYTES: usize = 10 * 1024 * 1024;
    let lab = lab(mode, 2, 1);
    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| lab::echo_server(&b.netns, PORT, &stop).expect("server"));
        let got = lab::tcp_bulk(&a.netns, SocketAddr::from((b.ip, PORT)), BYTES);
        stop.store(true, Ordering::Relaxed);
        assert_eq!(got.expect("transfer"), BYTES as u64, "{mode}");
    });
}

#[test]
fn ten_megabytes_with_df_across_nodes_vxlan() {
    bulk("vxlan");
}

#[test]
fn ten_megabytes_with_df_across_nodes_native() {
    bulk("native");
}

fn unknown(mode: &str) {
    const N: u32 = 7;
    let lab = lab(mode, 2, 1);
    let a = lab.pod("pod-0-0").clone();
    let cap = lab.capture_underlay(0, "ip").expect("capture");
    // In the cluster range, in no node's CIDR: dropped at the source.
    assert_eq!(
        ping(&a.netns, "10.244.200.5", N, &[])
            .expect("ping")
            .received,
        0
    );
    let rows = lab.dump(0, "dp_metrics").expect("dump");
    assert_eq!(
        metric(&rows, "from-endpoint", "unknown_destination"),
        u64::from(N),
        "{rows:?}"
    );
    // In this node's CIDR, no pod.
    assert_eq!(
        ping(&a.netns, "10.244.0.200", N, &[])
            .expect("ping")
            .received,
        0
    );
    let rows = lab.dump(0, "dp_metrics").expect("dump");
    assert_eq!(
        metric(&rows, "from-endpoint", "unknown_destination"),
        2 * u64::from(N),
        "{rows:?}"
    );
    let frames = cap.finish().expect("pcap");
    // Outer or inside the tunnel: neither address may show up.
    let dropped: [std::net::Ipv4Addr; 2] = [
        "10.244.200.5".parse().expect("ip"),
        "10.244.0.200".parse().expect("ip"),
    ];
    let leaked: Vec<_> = frames
        .iter()
        .filter_map(|f| lab::decode(f, 8472))
        .filter(|d| {
            dropped.contains(&d.dst) || d.inner.is_some_and(|(_, dst, _)| dropped.contains(&dst))
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "{mode}: dropped destinations reached the underlay: {leaked:?}"
    );

    // In the other node's CIDR, no pod there: that node drops it on arrival.
    let before = metric(
        &lab.dump(1, "dp_metrics").expect("dump"),
        "from-network",
        "unknown_destination",
    );
    assert_eq!(
        ping(&a.netns, "10.244.1.200", N, &[])
            .expect("ping")
            .received,
        0
    );
    let after = metric(
        &lab.dump(1, "dp_metrics").expect("dump"),
        "from-network",
        "unknown_destination",
    );
    assert_eq!(after - before, u64::from(N), "{mode}");
}

#[test]
fn unknown_destinations_are_dropped_and_counted_vxlan() {
    unknown("vxlan");
}

#[test]
fn unknown_destinations_are_dropped_and_counted_native() {
    unknown("native");
}

#[test]
fn no_iptables_or_nftables_rules_are_added() {
    for mode in ["vxlan", "native"] {
        let lab = lab(mode, 2, 1);
        assert_eq!(
            ping(
                &lab.pod("pod-0-0").netns,
                &lab.pod("pod-1-0").ip.to_string(),
                2,
                &[]
            )
            .expect("ping")
            .received,
            2
        );
        for node in &lab.state.nodes {
            let nft =
                lab::run(lab::in_netns(&node.netns, "nft").args(["list", "ruleset"])).expect("nft");
            assert_eq!(
                String::from_utf8_lossy(&nft.stdout).trim(),
                "",
                "{mode}: nft ruleset on {}",
                node.name
            );
            let ipt =
                lab::run(&mut lab::in_netns(&node.netns, "iptables-save")).expect("iptables-save");
            let rules: Vec<_> = String::from_utf8_lossy(&ipt.stdout)
                .lines()
                .filter(|l| l.starts_with("-A"))
                .map(str::to_owned)
                .collect();
            assert!(
                rules.is_empty(),
                "{mode}: iptables rules on {}: {rules:?}",
                node.name
            );
        }
    }
}

fn remove_node(mode: &str) {
    let lab = lab(mode, 3, 1);
    let a = lab.pod("pod-0-0").clone();
    let (b, c) = (lab.pod("pod-1-0").clone(), lab.pod("pod-2-0").clone());
    assert_eq!(
        ping(&a.netns, &c.ip.to_string(), 2, &[])
            .expect("ping")
            .received,
        2
    );
    std::thread::scope(|s| {
        // A steady stream to node 1 across the change: none of it may be lost.
        let steady = s.spawn(|| ping(&a.netns, &b.ip.to_string(), 60, &[]).expect("ping"));
        std::thread::sleep(std::time::Duration::from_millis(800));
        lab.set_nodes(&[0, 1]).expect("remove node 2");
        let before = metric(
            &lab.dump(0, "dp_metrics").expect("dump"),
            "from-endpoint",
            "unknown_destination",
        );
        assert_eq!(
            ping(&a.netns, &c.ip.to_string(), 5, &[])
                .expect("ping")
                .received,
            0,
            "{mode}: node 2 still reachable"
        );
        let after = metric(
            &lab.dump(0, "dp_metrics").expect("dump"),
            "from-endpoint",
            "unknown_destination",
        );
        assert_eq!(
            after - before,
            5,
            "{mode}: traffic to the removed node must be dropped and counted"
        );
        let steady = steady.join().expect("thread");
        assert_eq!(
            steady.received, steady.transmitted,
            "{mode}: flow to node 1 disturbed: {steady:?}"
        );
    });
    let ipcache = lab.dump(0, "dp_ipcache").expect("dump");
    assert!(
        ipcache.iter().all(|r| r["prefix"] != "10.244.2.0/24"),
        "{ipcache:?}"
    );
    let routes =
        lab::run(Command::new("ip").args(["-n", &lab.state.nodes[0].netns, "route", "show"]))
            .expect("ip route");
    assert!(
        !String::from_utf8_lossy(&routes.stdout).contains("10.244.2.0/24"),
        "route to the removed node left"
    );
    // And back.
    lab.set_nodes(&[0, 1, 2]).expect("re-add node 2");
    assert_eq!(
        ping(&a.netns, &c.ip.to_string(), 2, &[])
            .expect("ping")
            .received,
        2,
        "{mode}"
    );
}

#[test]
fn removing_a_node_stops_traffic_to_it_and_only_it_vxlan() {
    remove_node("vxlan");
}

#[test]
fn removing_a_node_stops_traffic_to_it_and_only_it_native() {
    remove_node("native");
}
