//! NodePort served in XDP on real nodes, in native and generic XDP: from
//! the external host, a backend on the other node is reached through XDP
//! (counted there, not by tc), replies come back (in XDP too with native
//! routing), a Service on the node itself is left to tc, and detaching XDP
//! mid-connection hands the same flow to tc with no loss. Needs root.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use lab::{
    Lab, LabSpec, echo_server, in_netns_thread,
    services::{Ep, service, who, who_udp},
};
use serde_json::json;

const REMOTE_PORT: u16 = 30090;
const LOCAL_PORT: u16 = 30091;
const HTTP: u16 = 8080;
const ECHO: u16 = 9000;

/// Packets `node` counted at `hook` in `direction` as forwarded.
fn forwarded(lab: &Lab, node: usize, hook: &str, direction: &str) -> u64 {
    lab.counted(node, hook, direction, "forwarded")
        .expect("dp_metrics")
}

fn status(lab: &Lab, node: usize) -> serde_json::Value {
    serde_json::from_str(&lab.cli(node, &["status", "-o", "json"]).expect("status")).expect("json")
}

/// `xdp`: how the agents attach XDP (`native` or `generic`).
fn nodeport_from_outside(mode: &str, xdp: &str) {
    let mut spec = LabSpec::new(2, 1).expect("spec");
    spec.mode = mode.into();
    spec.xdp = xdp.into();
    let lab = Lab::up(&spec).expect("lab");
    let port = |name: &str, port: u16, target: u16, proto: &str| json!({"name": name, "port": port, "targetPort": target, "nodePort": port, "protocol": proto});
    lab.set_services(
        vec![
            service(
                "remote",
                json!({"type": "NodePort", "clusterIP": "10.96.0.10", "ports": [
                    port("http", REMOTE_PORT, HTTP, "TCP"),
                    port("dns", REMOTE_PORT, HTTP, "UDP"),
                    port("echo", REMOTE_PORT + 2, ECHO, "TCP")]}),
                json!({}),
            ),
            service(
                "local",
                json!({"type": "NodePort", "clusterIP": "10.96.0.11",
                       "ports": [port("http", LOCAL_PORT, HTTP, "TCP")]}),
                json!({}),
            ),
        ],
        vec![
            lab.slice(
                "remote",
                "remote-1",
                &[Ep::ready("pod-1-0")],
                json!([{"name": "http", "port": HTTP, "protocol": "TCP"},
                       {"name": "dns", "port": HTTP, "protocol": "UDP"},
                       {"name": "echo", "port": ECHO, "protocol": "TCP"}]),
            ),
            lab.slice(
                "local",
                "local-1",
                &[Ep::ready("pod-0-0")],
                json!([{"name": "http", "port": HTTP, "protocol": "TCP"}]),
            ),
        ],
    )
    .expect("publish");
    lab.wait_frontend(0, &format!("*:{}/tcp", REMOTE_PORT + 2), "external", 1)
        .expect("frontend");
    lab.wait_frontend(0, &format!("*:{LOCAL_PORT}/tcp"), "external", 1)
        .expect("frontend");
    let st = status(&lab, 0);
    assert_eq!(st["xdp"], xdp, "{st}");
    assert_eq!(st["datapath"]["xdp_lb"], true, "{st}");

    let ext = lab.state.external.clone().expect("external host");
    let node0 = lab.state.nodes[0].ip;
    let to = |port: u16| SocketAddr::from((node0, port));
    let (backend, local) = (
        lab.pod("pod-1-0").netns.clone(),
        lab.pod("pod-0-0").netns.clone(),
    );
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| lab::services::identity_server(&backend, "pod-1-0", &[HTTP], &stop));
        s.spawn(|| lab::services::identity_server(&local, "pod-0-0", &[HTTP], &stop));
        s.spawn(|| echo_server(&backend, ECHO, &stop));
        std::thread::sleep(Duration::from_millis(200));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // To the other node's backend: served in XDP. Each connection's
            // client packets (SYN, ACK, request, FIN, ACK) are sent out by
            // XDP; the backend's replies come from inside the cluster, tc's.
            let xdp_before = forwarded(&lab, 0, "xdp", "to-network");
            const CONNECTIONS: u64 = 10;
            for _ in 0..CONNECTIONS {
                let w = who(&ext.netns, to(REMOTE_PORT), 0).expect("NodePort, remote backend");
                assert_eq!(w.name, "pod-1-0");
                // SNATed to node 0, so that the replies come back through it.
                assert_eq!(w.peer.ip(), node0, "{w:?}");
            }
            let w = who_udp(&ext.netns, to(REMOTE_PORT), 0).expect("UDP NodePort");
            assert_eq!(w.name, "pod-1-0");
            let sent = forwarded(&lab, 0, "xdp", "to-network") - xdp_before;
            assert!(
                sent >= CONNECTIONS * 4,
                "{sent} packets sent on by XDP for {CONNECTIONS} connections"
            );

            // To this node's own backend: XDP leaves it to tc.
            let xdp_before = forwarded(&lab, 0, "xdp", "to-network");
            let w = who(&ext.netns, to(LOCAL_PORT), 0).expect("NodePort, local backend");
            assert_eq!(w.name, "pod-0-0");
            assert_eq!(w.peer.ip(), ext.ip, "the client's address kept");
            assert_eq!(forwarded(&lab, 0, "xdp", "to-network"), xdp_before);

            // Detached mid-connection: tc carries on with the same flow.
            let link = lab.state.nodes[0].pin_dir.join("links/host_xdp@eth0");
            assert!(link.exists(), "{}", link.display());
            let total = in_netns_thread(&ext.netns, || -> anyhow::Result<String> {
                let mut c = lab::connect(to(REMOTE_PORT + 2))?;
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                c.write_all(&[b'x'; 3000])?;
                std::thread::sleep(Duration::from_millis(200));
                lab::run(std::process::Command::new("bpftool").args([
                    "link",
                    "detach",
                    "pinned",
                    link.to_str().expect("utf-8"),
                ]))?;
                c.write_all(&[b'y'; 3000])?;
                c.shutdown(std::net::Shutdown::Write)?;
                let mut answer = String::new();
                c.read_to_string(&mut answer)?;
                Ok(answer)
            })
            .expect("thread")
            .expect("the connection across the detach");
            assert_eq!(total.trim(), "6000", "every byte, before and after");
            assert_eq!(status(&lab, 0)["xdp"], "off");
            let xdp_after = forwarded(&lab, 0, "xdp", "to-network");
            let w = who(&ext.netns, to(REMOTE_PORT), 0).expect("NodePort through tc");
            assert_eq!(w.name, "pod-1-0");
            assert_eq!(forwarded(&lab, 0, "xdp", "to-network"), xdp_after);
        }));
        stop.store(true, Ordering::Relaxed);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    });
}

#[test]
fn nodeport_from_outside_in_generic_xdp_vxlan() {
    nodeport_from_outside("vxlan", "generic");
}

#[test]
fn nodeport_from_outside_in_native_xdp_native_routing() {
    nodeport_from_outside("native", "native");
}
