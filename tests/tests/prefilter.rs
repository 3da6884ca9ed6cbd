//! The prefilter on real nodes: a denied source's packets are dropped on
//! the node's uplink (XDP, or tc with XDP off), counted, never reach a
//! backend, and a change applies at once, without a restart. Needs root.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use lab::{
    Lab, LabSpec, ping,
    services::{Attempt, Ep, attempt, identity_server, service, who},
};
use serde_json::json;

const NODE_PORT: u16 = 30080;
const HTTP: u16 = 8080;

fn xdp_or_tc(lab: &Lab, node: usize, hook: &str, reason: &str) -> u64 {
    lab.counted(node, hook, "from-network", reason)
        .expect("dp_metrics")
}

fn denied_packets(lab: &Lab, node: usize, cidr: &str) -> Option<u64> {
    let rows: serde_json::Value = serde_json::from_str(
        &lab.cli(node, &["prefilter", "list", "-o", "json"])
            .expect("list"),
    )
    .expect("json");
    rows.as_array()
        .expect("rows")
        .iter()
        .find(|r| r["cidr"] == cidr)
        .and_then(|r| r["packets"].as_u64())
}

#[test]
fn denied_sources_are_dropped_on_the_uplink_and_released_live() {
    denied_sources("vxlan");
}

#[test]
fn denied_sources_are_dropped_with_native_routing() {
    denied_sources("native");
}

fn denied_sources(mode: &str) {
    let mut spec = LabSpec::new(2, 1).expect("spec");
    spec.mode = mode.into();
    let mut lab = Lab::up(&spec).expect("lab");
    lab.set_services(
        vec![service(
            "web",
            json!({"type": "NodePort", "clusterIP": "10.96.0.10",
                   "ports": [{"name": "http", "port": 80, "targetPort": HTTP, "nodePort": NODE_PORT}]}),
            json!({}),
        )],
        vec![lab.slice(
            "web",
            "web-1",
            &[Ep::ready("pod-1-0")],
            json!([{"name": "http", "port": HTTP, "protocol": "TCP"}]),
        )],
    )
    .expect("publish");
    for i in 0..2 {
        lab.wait_frontend(i, &format!("*:{NODE_PORT}/tcp"), "external", 1)
            .expect("frontend");
    }
    let ext = lab.state.external.clone().expect("external host");
    let cidr = format!("{}/32", ext.ip);
    let node = |i: usize| SocketAddr::from((lab.state.nodes[i].ip, NODE_PORT));
    let (n0, n1) = (node(0), node(1));
    let backend = lab.pod("pod-1-0").netns.clone();
    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| identity_server(&backend, "pod-1-0", &[HTTP], &stop).expect("server"));
        std::thread::sleep(Duration::from_millis(100));
        let served = |to: SocketAddr| {
            who(&ext.netns, to, 0)
                .map(|w| w.name == "pod-1-0")
                .unwrap_or(false)
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert!(served(n0), "NodePort on node 0 before the prefilter");
            let status: serde_json::Value =
                serde_json::from_str(&lab.cli(0, &["status", "-o", "json"]).expect("status"))
                    .expect("json");
            assert_ne!(status["xdp"], "off", "{status}");

            // A typo changes nothing, and says what is wrong.
            let e = lab
                .cli(0, &["prefilter", "add", "172.20.0.100/24"])
                .expect_err("host bits accepted");
            assert!(format!("{e:#}").contains("host bits"), "{e:#}");
            assert_eq!(denied_packets(&lab, 0, &cidr), None);

            let out = lab
                .cli(0, &["prefilter", "add", &ext.ip.to_string()])
                .expect("add");
            assert!(out.contains(&cidr), "{out}");
            let xdp_before = xdp_or_tc(&lab, 0, "xdp", "prefilter_denied");
            // The backend is on node 1: nothing may cross the underlay to
            // it (in the tunnel, or routed to the pod).
            let filter = if mode == "vxlan" {
                "udp port 8472".to_owned()
            } else {
                format!("host {}", b.ip)
            };
            let cap = lab.capture_underlay(1, &filter).expect("capture");
            match attempt(&ext.netns, n0).expect("attempt") {
                Attempt::Failed(..) => {}
                other => panic!("denied source got through: {other:?}"),
            }
            assert!(
                cap.finish().expect("capture").is_empty(),
                "packets reached the backend's node"
            );
            let dropped = xdp_or_tc(&lab, 0, "xdp", "prefilter_denied") - xdp_before;
            assert!(
                dropped >= 2,
                "SYN and its retries counted in XDP: {dropped}"
            );
            assert!(denied_packets(&lab, 0, &cidr).expect("listed") >= dropped);
            assert_eq!(
                xdp_or_tc(&lab, 0, "tc", "prefilter_denied"),
                0,
                "XDP got them first"
            );
            // Per node: node 1 still serves the same client, and pods are
            // untouched.
            assert!(served(n1), "node 1 has no prefilter");
            assert_eq!(
                ping(&a.netns, &b.ip.to_string(), 2, &[])
                    .expect("ping")
                    .received,
                2
            );

            // Released live: no restart.
            let out = lab.cli(0, &["prefilter", "delete", &cidr]).expect("delete");
            assert!(out.contains("denied now: nothing"), "{out}");
            assert!(served(n0), "NodePort on node 0 after the prefix went");
        }));
        stop.store(true, Ordering::Relaxed);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    });

    // Configured at start, with XDP off: tc drops them.
    lab.signal_agent(0, libc::SIGTERM).expect("stop");
    lab.set_agent_flag(0, "--xdp", "off");
    lab.add_agent_arg(0, &format!("--deny-cidr={cidr}"));
    lab.start_agent_again(0).expect("start");
    let status: serde_json::Value =
        serde_json::from_str(&lab.cli(0, &["status", "-o", "json"]).expect("status"))
            .expect("json");
    assert_eq!(status["xdp"], "off", "{status}");
    let tc_before = xdp_or_tc(&lab, 0, "tc", "prefilter_denied");
    match attempt(&ext.netns, n0).expect("attempt") {
        Attempt::Failed(..) => {}
        other => panic!("denied source got through tc: {other:?}"),
    }
    assert!(xdp_or_tc(&lab, 0, "tc", "prefilter_denied") > tc_before);
    assert_eq!(denied_packets(&lab, 0, &cidr).map(|n| n > 0), Some(true));
}
