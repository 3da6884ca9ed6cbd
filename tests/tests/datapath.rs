//! Pod connectivity an operator can rely on: the tunnel hides pod addresses
//! and trusts only nodes, the gateway answers ARP, ICMP errors make path MTU
//! discovery and traceroute work, IPv6 is handled, and the XDP and cgroup
//! programs run where the program table says. Real packets; needs root.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use lab::{Lab, LabSpec, ping};
use serde_json::Value;

const PORT: u16 = 9000;

fn lab(mode: &str, nodes: usize, pods: usize) -> Lab {
    let mut spec = LabSpec::new(nodes, pods).expect("spec");
    spec.mode = mode.into();
    Lab::up(&spec).expect("lab up")
}

/// Packets under (hook, direction, reason) on node `n`.
fn count(lab: &Lab, n: usize, hook: &str, direction: &str, reason: &str) -> u64 {
    lab.dump(n, "dp_metrics")
        .expect("dump")
        .iter()
        .find(|r| r["hook"] == hook && r["direction"] == direction && r["reason"] == reason)
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or(0)
}

fn ep_count(lab: &Lab, n: usize, ip: Ipv4Addr, direction: &str) -> u64 {
    lab.dump(n, "dp_ep_metrics")
        .expect("dump")
        .iter()
        .find(|r| r["ips"][0] == ip.to_string() && r["direction"] == direction)
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or(0)
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn in_cluster(ip: Ipv4Addr) -> bool {
    ip.octets()[..2] == [10, 244]
}

#[test]
fn vxlan_keeps_every_pod_address_inside_the_tunnel() {
    let lab = lab("vxlan", 2, 1);
    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    let (n0, n1) = (lab.state.nodes[0].clone(), lab.state.nodes[1].clone());
    let stop = AtomicBool::new(false);
    let cap = lab.capture_underlay(0, "ip").expect("capture");
    std::thread::scope(|s| {
        s.spawn(|| lab::echo_server(&n1.netns, PORT, &stop).expect("server on node 1"));
        s.spawn(|| lab::echo_server(&b.netns, PORT, &stop).expect("server in pod"));
        // A pod and another node, both ways, over ICMP, TCP and UDP; pod to
        // pod; node to pod.
        assert_eq!(
            ping(&a.netns, &n1.ip.to_string(), 5, &[])
                .expect("ping")
                .received,
            5
        );
        assert_eq!(
            ping(&n1.netns, &a.ip.to_string(), 5, &[])
                .expect("ping")
                .received,
            5
        );
        let to = SocketAddr::from((n1.ip, PORT));
        assert_eq!(lab::tcp_echo(&a.netns, to, "tcp").expect("tcp"), "tcp");
        assert_eq!(lab::udp_echo(&a.netns, to, "udp").expect("udp"), "udp");
        assert_eq!(
            ping(&a.netns, &b.ip.to_string(), 5, &[])
                .expect("ping")
                .received,
            5
        );
        assert_eq!(
            ping(&n0.netns, &b.ip.to_string(), 5, &[])
                .expect("ping")
                .received,
            5
        );
        stop.store(true, Ordering::Relaxed);
    });
    let frames = cap.finish().expect("pcap");
    let decoded: Vec<lab::Decoded> = frames.iter().filter_map(|f| lab::decode(f, 8472)).collect();
    let bare: Vec<_> = decoded
        .iter()
        .filter(|d| in_cluster(d.src) || in_cluster(d.dst))
        .collect();
    assert!(bare.is_empty(), "pod addresses outside VXLAN: {bare:#?}");
    // The traffic was there, inside the tunnel, both ways.
    let inner = |src: Ipv4Addr, dst: Ipv4Addr| {
        decoded
            .iter()
            .filter(|d| d.vni == Some(1) && d.inner.is_some_and(|(s, t, _)| (s, t) == (src, dst)))
            .count()
    };
    assert!(
        inner(a.ip, n1.ip) >= 5 + 3,
        "pod -> node 1 requests: {decoded:#?}"
    );
    assert!(inner(n1.ip, a.ip) >= 5 + 3, "node 1 -> pod: {decoded:#?}");
    assert_eq!(inner(a.ip, b.ip), 5);
    assert_eq!(inner(b.ip, a.ip), 5);
    assert_eq!(inner(n0.ip, b.ip), 5);
}

/// A VXLAN datagram (VNI `vni`) carrying an ICMP echo `src` -> `dst`.
fn vxlan(vni: u32, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let [_, v0, v1, v2] = vni.to_be_bytes();
    let mut out = vec![0x08, 0, 0, 0, v0, v1, v2, 0];
    PacketBuilder::ethernet2([0x02, 0xde, 0xad, 0, 0, 1], [0x02, 0xbe, 0xef, 0, 0, 1])
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut out, &[0x5a; 16])
        .expect("build");
    out
}

#[test]
fn the_tunnel_takes_packets_only_from_nodes_and_their_pods() {
    const N: u64 = 5;
    let lab = lab("vxlan", 2, 1);
    let a = lab.pod("pod-0-0").clone();
    let (n0, n1) = (lab.state.nodes[0].clone(), lab.state.nodes[1].clone());
    let ext = lab.state.external.clone().expect("external host");
    let to = SocketAddr::from((n0.ip, 8472));
    let send = |netns: &str, packet: Vec<u8>| {
        for _ in 0..N {
            lab::send_udp(netns, to, &packet).expect("send");
        }
    };
    let drops = |reason| count(&lab, 0, "tc", "from-network", reason);
    let delivered = || ep_count(&lab, 0, a.ip, "to-endpoint");
    let before = delivered();

    // From a host that is not a node, claiming to carry node 1's pod.
    send(
        &ext.netns,
        vxlan(1, "10.244.1.77".parse().expect("ip"), a.ip),
    );
    wait_for("unknown_tunnel_peer", || drops("unknown_tunnel_peer") == N);
    // From node 1, with a source from node 0's range.
    send(
        &n1.netns,
        vxlan(1, "10.244.0.99".parse().expect("ip"), a.ip),
    );
    wait_for("tunnel_source_mismatch", || {
        drops("tunnel_source_mismatch") == N
    });
    // From node 1, on another VNI.
    send(
        &n1.netns,
        vxlan(7, "10.244.1.77".parse().expect("ip"), a.ip),
    );
    wait_for("unknown_vni", || drops("unknown_vni") == N);
    assert_eq!(delivered(), before, "a forged packet reached the pod");

    // The same packet from node 1, with a source in its own range, is
    // delivered: the checks refuse only what they should.
    send(
        &n1.netns,
        vxlan(1, "10.244.1.77".parse().expect("ip"), a.ip),
    );
    wait_for("delivery from a real node", || delivered() == before + N);
}

#[test]
fn a_pod_reaches_its_gateway_after_flushing_its_neighbours() {
    let lab = lab("vxlan", 1, 1);
    let a = lab.pod("pod-0-0").clone();
    let node_ip = lab.state.nodes[0].ip.to_string();
    lab::ip(&["-n", &a.netns, "neigh", "del", "169.254.1.1", "dev", "eth0"]).expect("neigh del");
    let neigh =
        || output(Command::new("ip").args(["-n", &a.netns, "neigh", "show", "169.254.1.1"]));
    assert_eq!(neigh().trim(), "", "the gateway entry is gone");
    assert_eq!(ping(&a.netns, &node_ip, 3, &[]).expect("ping").received, 3);
    let host_mac = lab
        .dump(0, "dp_endpoints")
        .expect("dump")
        .into_iter()
        .find(|r| r["ip"] == a.ip.to_string())
        .and_then(|r| r["host_mac"].as_str().map(str::to_owned))
        .expect("pod entry");
    let entry = neigh();
    assert!(
        entry.contains(&format!("lladdr {host_mac}")),
        "the gateway was resolved to the veth's MAC {host_mac}: {entry}"
    );
}

fn traceroute(mode: &str) {
    let lab = lab(mode, 2, 1);
    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    let (n0, n1) = (lab.state.nodes[0].ip, lab.state.nodes[1].ip);
    for (ttl, hop) in [("1", n0), ("2", n1)] {
        let out = output(
            lab::in_netns(&a.netns, "ping")
                .args(["-n", "-c", "1", "-W", "2", "-t", ttl])
                .arg(b.ip.to_string()),
        );
        assert!(
            out.contains(&format!("From {hop} icmp_seq=1 Time to live exceeded")),
            "{mode}: TTL {ttl} should expire at {hop}:\n{out}"
        );
    }
    let r = ping(&a.netns, &b.ip.to_string(), 1, &["-t", "3"]).expect("ping");
    assert_eq!(r.received, 1, "{mode}: TTL 3 reaches the pod");
}

#[test]
fn ttl_exceeded_comes_from_each_node_on_the_way_vxlan() {
    traceroute("vxlan");
}

#[test]
fn ttl_exceeded_comes_from_each_node_on_the_way_native() {
    traceroute("native");
}

#[test]
fn path_mtu_discovery_through_the_tunnel() {
    let lab = lab("vxlan", 2, 1);
    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    let n0 = lab.state.nodes[0].clone();
    // A pod whose MTU is larger than the tunnel carries (1450).
    lab::ip(&[
        "-n",
        &n0.netns,
        "link",
        "set",
        &a.host_ifname,
        "mtu",
        "1500",
    ])
    .expect("mtu");
    lab::ip(&["-n", &a.netns, "link", "set", "eth0", "mtu", "1500"]).expect("mtu");
    let out = output(
        lab::in_netns(&a.netns, "ping")
            .args(["-n", "-c", "1", "-W", "2", "-M", "do", "-s", "1472"])
            .arg(b.ip.to_string()),
    );
    assert!(
        out.contains(&format!(
            "From {} icmp_seq=1 Frag needed and DF set (mtu = 1450)",
            n0.ip
        )),
        "{out}"
    );
    let route =
        output(Command::new("ip").args(["-n", &a.netns, "route", "get", &b.ip.to_string()]));
    assert!(
        route.contains("mtu 1450"),
        "the pod learnt the path MTU: {route}"
    );
    assert!(count(&lab, 0, "tc", "from-endpoint", "frag_needed") >= 1);
    // TCP with DF from that pod finds the path MTU and gets through.
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| lab::echo_server(&b.netns, PORT, &stop).expect("server"));
        let got = lab::tcp_bulk(&a.netns, SocketAddr::from((b.ip, PORT)), 4 << 20);
        stop.store(true, Ordering::Relaxed);
        assert_eq!(got.expect("transfer"), 4 << 20);
    });
}

#[test]
fn ipv6_on_the_nodes_is_not_a_drop_and_foreign_ipv6_is_named() {
    let mut spec = LabSpec::new(2, 1).expect("spec");
    spec.ipv6 = true;
    let lab = Lab::up(&spec).expect("lab");
    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    // Link-local addresses settle (DAD) on both ends of the pod's veth;
    // routers are solicited, MLD runs.
    let settled = |netns: &str, dev: &str| {
        let out = output(Command::new("ip").args([
            "-6", "-n", netns, "addr", "show", "dev", dev, "scope", "link",
        ]));
        out.contains("fe80") && !out.contains("tentative")
    };
    let n0 = lab.state.nodes[0].netns.clone();
    wait_for("link-local addresses", || {
        settled(&a.netns, "eth0") && settled(&n0, &a.host_ifname)
    });
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
    // Link-local IPv6 reaches the pod's veth and back.
    let r = ping(&a.netns, "ff02::1%eth0", 3, &["-6", "-L"]).expect("ping6");
    assert!(r.received >= 3, "link-local IPv6 to the veth: {r:?}");
    for n in 0..2 {
        let rows = lab.dump(n, "dp_metrics").expect("dump");
        assert!(
            rows.iter().all(|r| r["drop"] == false),
            "node {n} counted drops with IPv6 merely on: {rows:?}"
        );
    }
    // A global address the datapath never gave the pod: refused by name.
    lab::ip(&[
        "-n",
        &a.netns,
        "-6",
        "addr",
        "add",
        "fd00::5/128",
        "dev",
        "eth0",
        "nodad",
    ])
    .expect("addr");
    let before = count(&lab, 0, "tc", "from-endpoint", "source_spoofed");
    // -L: not the pod's own answer to its multicast.
    let r = ping(&a.netns, "ff02::1%eth0", 3, &["-6", "-L", "-I", "fd00::5"]).expect("ping6");
    assert_eq!(r.received, 0);
    assert_eq!(
        count(&lab, 0, "tc", "from-endpoint", "source_spoofed") - before,
        3
    );
}

fn rx_packets(netns: &str, dev: &str) -> u64 {
    let out = output(Command::new("ip").args(["-n", netns, "-s", "-j", "link", "show", dev]));
    let v: Value = serde_json::from_str(&out).expect("ip -j");
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .expect("rx packets")
}

#[test]
fn xdp_and_cgroup_programs_run_where_the_table_says() {
    // The agent's default: native XDP where the driver has it (veth does).
    let mut spec = LabSpec::new(2, 1).expect("spec");
    spec.xdp = "auto".into();
    let lab = Lab::up(&spec).expect("lab up");
    let n0 = lab.state.nodes[0].clone();
    let status: Value =
        serde_json::from_str(&lab.cli(0, &["status", "-o", "json"]).expect("status"))
            .expect("json");
    assert_eq!(status["xdp"], "native", "{status}");
    assert_eq!(
        status["cgroup"].as_str(),
        n0.cgroup.as_deref().and_then(|c| c.to_str()),
        "{status}"
    );

    // XDP sees exactly what the uplink receives.
    let xdp_before = count(&lab, 0, "xdp", "from-network", "forwarded");
    let rx_before = rx_packets(&n0.netns, "eth0");
    assert_eq!(
        ping(&lab.state.nodes[1].netns, &n0.ip.to_string(), 20, &[])
            .expect("ping")
            .received,
        20
    );
    let xdp = count(&lab, 0, "xdp", "from-network", "forwarded") - xdp_before;
    let rx = rx_packets(&n0.netns, "eth0") - rx_before;
    assert!(xdp >= 20, "{xdp}");
    assert_eq!(xdp, rx, "XDP counted {xdp}, the uplink received {rx}");

    // connect() by a process of the node (in its cgroup) passes the cgroup
    // program; the same from outside the node's cgroup does not.
    let connects = "for i in 1 2 3 4 5; do (: </dev/tcp/172.20.0.12/9) 2>/dev/null; done; true";
    let before = count(&lab, 0, "sock", "from-endpoint", "forwarded");
    lab::run(lab.on_node(0, "bash").args(["-c", connects])).expect("bash in the node");
    assert_eq!(
        count(&lab, 0, "sock", "from-endpoint", "forwarded") - before,
        5
    );
    lab::run(lab::in_netns(&n0.netns, "bash").args(["-c", connects])).expect("bash outside");
    assert_eq!(
        count(&lab, 0, "sock", "from-endpoint", "forwarded") - before,
        5
    );

    // A restarted agent swaps its programs into the same XDP and cgroup
    // links: one program on each, the new one, counting on.
    let xdp_prog = || {
        let out = output(Command::new("ip").args(["-n", &n0.netns, "-d", "link", "show", "eth0"]));
        out.split("prog/xdp id ")
            .skip(1)
            .map(|r| r.split_whitespace().next().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    let cgroup = n0.cgroup.clone().expect("node cgroup");
    let cgroup_progs = || {
        let out = lab::run(
            Command::new("bpftool")
                .args(["-j", "cgroup", "show"])
                .arg(&cgroup),
        )
        .expect("bpftool cgroup show");
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        v.as_array()
            .expect("programs")
            .iter()
            .map(|p| {
                (
                    p["id"].as_u64().unwrap_or(0),
                    p["name"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect::<Vec<_>>()
    };
    let (xdp_old, cg_old) = (xdp_prog(), cgroup_progs());
    assert_eq!(xdp_old.len(), 1, "{xdp_old:?}");
    let mut want: Vec<String> = dataplane_common::PROGRAMS
        .iter()
        .filter(|p| p.kind.is_cgroup())
        .map(|p| p.name.to_owned())
        .collect();
    want.sort();
    let names = |progs: &[(u64, String)]| {
        let mut n: Vec<String> = progs.iter().map(|p| p.1.clone()).collect();
        n.sort();
        n
    };
    assert_eq!(
        names(&cg_old),
        want,
        "one of each socket program: {cg_old:?}"
    );
    let mut lab = lab;
    lab.signal_agent(0, libc::SIGKILL).expect("kill -9");
    lab.start_agent_again(0).expect("restart");
    let (xdp_new, cg_new) = (xdp_prog(), cgroup_progs());
    assert_eq!(
        xdp_new.len(),
        1,
        "one XDP program after the restart: {xdp_new:?}"
    );
    assert_ne!(xdp_new, xdp_old, "the restarted agent's XDP program runs");
    assert_eq!(
        names(&cg_new),
        want,
        "one of each socket program after the restart: {cg_new:?}"
    );
    for (id, name) in &cg_new {
        assert!(
            !cg_old.iter().any(|(old, _)| old == id),
            "the restarted agent's {name} runs: {cg_old:?} -> {cg_new:?}"
        );
    }
    let status: Value =
        serde_json::from_str(&lab.cli(0, &["status", "-o", "json"]).expect("status"))
            .expect("json");
    assert_eq!(
        status["xdp"], "native",
        "as the kernel reports it: {status}"
    );
    let before = count(&lab, 0, "sock", "from-endpoint", "forwarded");
    lab::run(lab.on_node(0, "bash").args(["-c", connects])).expect("bash in the node");
    assert_eq!(
        count(&lab, 0, "sock", "from-endpoint", "forwarded") - before,
        5
    );
}
