//! The agent's lifecycle: restarts without loss, graceful stop, cleanup.
//! Needs root.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use lab::{Lab, LabSpec, ping};
use serde_json::Value;

const PORT: u16 = 9000;

fn ep_packets(rows: &[Value], ip: &str, direction: &str) -> u64 {
    rows.iter()
        .find(|r| r["ips"][0] == ip && r["direction"] == direction)
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or(0)
}

/// Sends for `secs` at a steady pace over one TCP connection; returns
/// (bytes sent, bytes the server counted).
fn paced_stream(netns: &str, to: SocketAddr, secs: u64) -> (u64, u64) {
    lab::in_netns_thread(netns, || {
        let mut s =
            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let chunk = vec![0x5au8; 16 * 1024];
        let mut sent = 0u64;
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            s.write_all(&chunk).expect("write: the stream broke");
            sent += chunk.len() as u64;
            std::thread::sleep(Duration::from_millis(5));
        }
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("read count");
        (sent, reply.trim().parse().expect("count"))
    })
    .expect("thread")
}

#[test]
fn kill_9_and_restart_loses_nothing() {
    let mut lab = Lab::up(&LabSpec::new(2, 2).expect("spec")).expect("lab");
    let (a, b, c) = (
        lab.pod("pod-0-0").clone(),
        lab.pod("pod-0-1").clone(),
        lab.pod("pod-1-0").clone(),
    );
    assert_eq!(
        ping(&a.netns, &c.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
    let before = lab.dump(0, "dp_ep_metrics").expect("dump");
    let sent_before = ep_packets(&before, &a.ip.to_string(), "from-endpoint");
    assert!(sent_before >= 3);

    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| lab::echo_server(&c.netns, PORT, &stop).expect("server"));
        std::thread::sleep(Duration::from_millis(100));
        let stream = s.spawn(|| paced_stream(&a.netns, SocketAddr::from((c.ip, PORT)), 4));
        let flood_remote =
            s.spawn(|| ping(&a.netns, &c.ip.to_string(), 300, &["-i", "0.01"]).expect("ping"));
        let flood_local =
            s.spawn(|| ping(&b.netns, &a.ip.to_string(), 300, &["-i", "0.01"]).expect("ping"));
        std::thread::sleep(Duration::from_millis(700));
        for node in [0, 1] {
            lab.signal_agent(node, libc::SIGKILL).expect("kill -9");
            std::thread::sleep(Duration::from_millis(300));
            lab.start_agent_again(node).expect("restart");
        }
        let (sent, got) = stream.join().expect("stream");
        let remote = flood_remote.join().expect("flood");
        let local = flood_local.join().expect("flood");
        stop.store(true, Ordering::Relaxed);
        assert_eq!(got, sent, "TCP stream across the restarts");
        assert_eq!(
            remote.received, remote.transmitted,
            "ping flood across nodes: {remote:?}"
        );
        assert_eq!(
            local.received, local.transmitted,
            "ping flood on one node: {local:?}"
        );
    });

    // The restarted agents adopted what was there.
    let status = lab.cli(0, &["status"]).expect("status");
    assert!(status.contains(" 2 "), "endpoints not adopted: {status}");
    let log = lab.agent_log(0);
    assert!(log.contains("endpoint adopted"), "{log}");
    // Counters carried on rather than starting over.
    let after = lab.dump(0, "dp_ep_metrics").expect("dump");
    assert!(
        ep_packets(&after, &a.ip.to_string(), "from-endpoint") >= sent_before + 300,
        "{after:?}"
    );
    // The adopted links run the new agent's programs: the kernel log line of
    // a newly seen endpoint comes from them.
    let mut lab = lab;
    lab.add_pod(0, "late").expect("a pod after the restart");
    let late = lab.pod("late").clone();
    assert_eq!(
        ping(&late.netns, &c.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
    assert_eq!(
        ping(&a.netns, &late.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
}

#[test]
fn sigterm_leaves_the_datapath_running_and_cleanup_removes_it() {
    let mut lab = Lab::up(&LabSpec::new(2, 1).expect("spec")).expect("lab");
    let (a, c) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    lab.signal_agent(0, libc::SIGTERM).expect("stop");
    assert_eq!(
        ping(&a.netns, &c.ip.to_string(), 5, &[])
            .expect("ping")
            .received,
        5,
        "forwarding stopped with the agent"
    );
    assert!(lab.state.nodes[0].pin_dir.join("links").exists());

    lab.start_agent_again(0).expect("start");
    lab.add_agent_arg(0, "--cleanup");
    lab.signal_agent(0, libc::SIGTERM).expect("stop");
    lab.start_agent_again(0).expect("start with --cleanup");
    lab.signal_agent(0, libc::SIGTERM)
        .expect("stop with --cleanup");
    let node = lab.state.nodes[0].clone();
    assert!(!node.pin_dir.exists(), "pins left after --cleanup");
    let links = lab::run(Command::new("ip").args(["-n", &node.netns, "link", "show"])).expect("ip");
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("dp_vxlan"),
        "VXLAN device left after --cleanup"
    );
    assert_eq!(
        ping(&a.netns, &c.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        0,
        "still forwarding after --cleanup"
    );
}

#[test]
fn changes_made_while_the_agent_was_down_apply_on_restart() {
    let mut lab = Lab::up(&LabSpec::new(3, 1).expect("spec")).expect("lab");
    let (a, b, c) = (
        lab.pod("pod-0-0").clone(),
        lab.pod("pod-1-0").clone(),
        lab.pod("pod-2-0").clone(),
    );
    lab.signal_agent(0, libc::SIGKILL).expect("kill");
    // Node 2 leaves the cluster while node 0's agent is away.
    lab.write_node_list(&[0, 1]).expect("node list");
    lab.start_agent_again(0).expect("restart");
    lab.wait_peers(0, 1).expect("node 2 removed on restart");
    let ipcache = lab.dump(0, "dp_ipcache").expect("dump");
    assert!(
        ipcache.iter().all(|r| r["prefix"] != "10.244.2.0/24"),
        "{ipcache:?}"
    );
    assert!(
        ipcache.iter().any(|r| r["prefix"] == "10.244.1.0/24"),
        "{ipcache:?}"
    );
    let routes =
        lab::run(Command::new("ip").args(["-n", &lab.state.nodes[0].netns, "route", "show"]))
            .expect("ip");
    assert!(!String::from_utf8_lossy(&routes.stdout).contains("10.244.2.0/24"));
    assert_eq!(
        ping(&a.netns, &c.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        0
    );
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
}

fn metric_value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn health_readiness_and_metrics() {
    let lab = Lab::up(&LabSpec::new(2, 2).expect("spec")).expect("lab");
    let node = lab.state.nodes[0].clone();
    let addr = SocketAddr::from(([127, 0, 0, 1], 9963));
    assert_eq!(
        lab::http_get(&node.netns, addr, "/healthz")
            .expect("healthz")
            .0,
        200
    );
    assert_eq!(
        lab::http_get(&node.netns, addr, "/readyz")
            .expect("readyz")
            .0,
        200
    );
    assert_eq!(
        lab::http_get(&node.netns, addr, "/nope").expect("404").0,
        404
    );

    let a = lab.pod("pod-0-0").clone();
    lab.add_pod_address(&a.name, "10.244.0.250/32")
        .expect("addr");
    assert_eq!(
        ping(&a.netns, &node.ip.to_string(), 5, &["-I", "10.244.0.250"])
            .expect("ping")
            .received,
        0
    );

    let (code, body) = lab::http_get(&node.netns, addr, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    let m = |s: &str| metric_value(&body, s).unwrap_or_else(|| panic!("{s} missing:\n{body}"));
    assert_eq!(m("dataplane_ready"), 1.0);
    assert_eq!(m("dataplane_objects{kind=\"endpoint\"}"), 2.0);
    assert_eq!(m("dataplane_objects{kind=\"Node\"}"), 2.0);
    assert_eq!(m("dataplane_objects{kind=\"Pod\"}"), 4.0);
    // 2 local endpoints (CNI) + 2 pods of node 1 (from their Pod objects).
    assert_eq!(m("dataplane_map_entries{map=\"dp_endpoints\"}"), 4.0);
    assert_eq!(m("dataplane_map_capacity{map=\"dp_endpoints\"}"), 65536.0);
    assert_eq!(
        m(
            "dataplane_packets_total{hook=\"tc\",direction=\"from-endpoint\",reason=\"source_spoofed\"}"
        ),
        5.0
    );
    assert!(m("dataplane_reconcile_duration_seconds_count{what=\"endpoint\"}") >= 2.0);
    assert!(m("dataplane_reconcile_duration_seconds_count{what=\"cluster\"}") >= 1.0);

    // A manifest that does not parse: counted, logged, last good state kept.
    lab.write_manifest("nodes.yaml", "kind: [unclosed")
        .expect("write");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = lab::http_get(&node.netns, addr, "/metrics").expect("metrics");
        if metric_value(&body, "dataplane_errors_total{kind=\"manifest_invalid\"}") == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "invalid node list not reported:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        lab.agent_log(0)
            .contains("keeping the file's last good objects"),
        "{}",
        lab.agent_log(0)
    );
    let c = lab.pod("pod-1-0").clone();
    assert_eq!(
        ping(&a.netns, &c.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
}
