//! Socket LB with real traffic: clients run as pods' processes do, in their
//! pod's network namespace and their node's cgroup (where that node's
//! socket programs act), through `dataplane-lab pod-probe`. Needs root.

use std::net::Ipv4Addr;

use lab::{
    Lab, LabSpec,
    services::{Ep, service},
};
use serde_json::{Value, json};

const CLUSTER_IP: &str = "10.96.0.10";
const HTTP: u16 = 8080;
const DNS: u16 = 5353;

/// Servers in `pods`, answering with their `namespace/name` on HTTP/TCP
/// and DNS/UDP (the lab stops them).
fn serve(lab: &mut Lab, pods: &[&str]) {
    for p in pods {
        let idx = lab
            .state
            .pods
            .iter()
            .position(|x| x.name == *p)
            .expect("pod");
        lab.start_server(idx, &[(HTTP, "TCP".into()), (DNS, "UDP".into())])
            .expect("pod server");
    }
}

/// One probe from pod `from`, as its processes run (its netns, its node's
/// cgroup): the answer and the peer the application saw.
fn probe(lab: &Lab, from: &str, to: &str, proto: &str) -> Value {
    probe_in(lab, from, to, proto, true)
}

/// As [`probe`]; without `cgroup`, from outside every node's cgroup (no
/// socket program sees it: the per-packet path alone).
fn probe_in(lab: &Lab, from: &str, to: &str, proto: &str, cgroup: bool) -> Value {
    let mut place = lab.place(from).expect("place");
    if !cgroup {
        place.cgroup = None;
    }
    let r = lab
        .probe_at(from, to, &place, to.parse().expect("address"), proto)
        .expect("probe");
    serde_json::to_value(r).expect("json")
}

/// Destinations of the client's first packets on its pod's veth (seen
/// before any program on it runs): (daddr, dport) of each frame.
fn on_the_wire(lab: &Lab, from: &str, filter: &str, f: impl FnOnce()) -> Vec<(Ipv4Addr, u16)> {
    let pod = lab.pod(from);
    let node = &lab.state.nodes[pod.node];
    let cap = lab
        .capture_on(&node.netns, &pod.host_ifname, filter)
        .expect("capture");
    f();
    cap.finish()
        .expect("frames")
        .iter()
        .filter_map(|frame| {
            let p = etherparse::SlicedPacket::from_ethernet(frame).ok()?;
            let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
                return None;
            };
            let port = match p.transport? {
                etherparse::TransportSlice::Tcp(t) => t.destination_port(),
                etherparse::TransportSlice::Udp(u) => u.destination_port(),
                _ => return None,
            };
            Some((ip.header().destination_addr(), port))
        })
        .collect()
}

fn web(extra: Value) -> Value {
    let mut spec = json!({
        "clusterIP": CLUSTER_IP,
        "ports": [
            {"name": "http", "port": 80, "targetPort": HTTP},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": DNS},
        ],
    });
    for (k, v) in extra.as_object().expect("object") {
        spec[k] = v.clone();
    }
    service("web", spec, json!({}))
}

fn ports() -> Value {
    json!([
        {"name": "http", "port": HTTP, "protocol": "TCP"},
        {"name": "dns", "port": DNS, "protocol": "UDP"},
    ])
}

fn ip_of(lab: &Lab, pod: &str) -> Ipv4Addr {
    lab.pod(pod).ip
}

#[test]
fn sockets_go_straight_to_a_backend_and_see_the_service() {
    sockets_go_straight("vxlan");
}

#[test]
fn sockets_go_straight_to_a_backend_with_native_routing() {
    sockets_go_straight("native");
}

fn sockets_go_straight(mode: &str) {
    let mut spec = LabSpec::new(2, 2).expect("spec");
    spec.mode = mode.into();
    let mut lab = Lab::up(&spec).expect("lab");
    // Node 1 keeps the per-packet path: each node's programs act only on
    // its own pods.
    lab.signal_agent(1, libc::SIGTERM).expect("stop");
    lab.add_agent_arg(1, "--socket-lb=off");
    lab.start_agent_again(1).expect("start");
    lab.set_services(
        vec![web(json!({}))],
        vec![lab.slice("web", "web-1", &[Ep::ready("pod-1-1")], ports())],
    )
    .expect("publish");
    for i in 0..2 {
        lab.wait_frontend(i, &format!("{CLUSTER_IP}:80/tcp"), "internal", 1)
            .expect("frontend");
    }
    for (node, on) in [(0, true), (1, false)] {
        let st: Value =
            serde_json::from_str(&lab.cli(node, &["status", "-o", "json"]).expect("status"))
                .expect("json");
        assert_eq!(st["datapath"]["socket_lb"], on, "node {node}: {st}");
    }
    serve(&mut lab, &["pod-1-1"]);
    let backend = ip_of(&lab, "pod-1-1");
    let svc_http = format!("{CLUSTER_IP}:80");
    let svc_dns = format!("{CLUSTER_IP}:53");

    // TCP from node 0 (socket LB on): the very first SYN goes to the
    // backend; the application still sees the Service.
    let mut r = Value::Null;
    let wire = on_the_wire(&lab, "pod-0-0", "tcp[tcpflags] & tcp-syn != 0", || {
        r = probe(&lab, "pod-0-0", &svc_http, "TCP");
    });
    assert_eq!(r["answered_by"], "default/pod-1-1", "{r}");
    assert_eq!(
        r["peer"],
        svc_http.as_str(),
        "getpeername shows the Service: {r}"
    );
    assert!(!wire.is_empty(), "no SYN captured");
    assert!(
        wire.iter().all(|w| *w == (backend, HTTP)),
        "every SYN to the backend, none to the Service: {wire:?}"
    );
    // No per-packet translation: no Service flow in conntrack.
    let ct: Value = serde_json::from_str(
        &lab.cli(0, &["ct", "list", "--dst", CLUSTER_IP, "-o", "json"])
            .expect("ct"),
    )
    .expect("json");
    assert_eq!(ct, json!([]), "no conntrack entry to the Service");
    let rev = lab.dump(0, "dp_sock_rev").expect("dump");
    assert!(
        rev.iter()
            .any(|e| e["backend"] == format!("{backend}:{HTTP}") && e["service"] == svc_http),
        "{rev:?}"
    );

    // UDP, unconnected (sendmsg/recvmsg): the datagram goes to the backend,
    // the reply comes from the Service address.
    let mut r = Value::Null;
    let wire = on_the_wire(&lab, "pod-0-0", "udp", || {
        r = probe(&lab, "pod-0-0", &svc_dns, "UDP");
    });
    assert_eq!(r["answered_by"], "default/pod-1-1", "{r}");
    assert_eq!(
        r["peer"],
        svc_dns.as_str(),
        "recvfrom shows the Service: {r}"
    );
    assert!(
        !wire.is_empty() && wire.iter().all(|w| *w == (backend, DNS)),
        "{wire:?}"
    );

    // Node 1 (socket LB off): its pods' packets carry the Service address,
    // translated per packet; node 0's programs never touched them.
    let mut r = Value::Null;
    let wire = on_the_wire(&lab, "pod-1-0", "tcp[tcpflags] & tcp-syn != 0", || {
        r = probe(&lab, "pod-1-0", &svc_http, "TCP");
    });
    assert_eq!(r["answered_by"], "default/pod-1-1", "{r}");
    assert_eq!(r["peer"], svc_http.as_str(), "{r}");
    let cip: Ipv4Addr = CLUSTER_IP.parse().expect("ip");
    assert!(
        !wire.is_empty() && wire.iter().all(|w| *w == (cip, 80)),
        "{wire:?}"
    );
}

#[test]
fn socket_and_packet_paths_choose_alike() {
    let spec = LabSpec::new(2, 2).expect("spec");
    let mut lab = Lab::up(&spec).expect("lab");
    let backends = ["pod-0-1", "pod-1-1"];
    serve(&mut lab, &backends);
    let svc_http = format!("{CLUSTER_IP}:80");

    // Session affinity, keyed on the pod's address on both paths: the
    // socket hooks know it by the pod's network namespace (the CNI plugin
    // sent its cookie), the per-packet path by the packet's source.
    let clients = lab.dump(0, "dp_sock_clients").expect("dump");
    let client_ip = ip_of(&lab, "pod-0-0").to_string();
    assert!(
        clients.iter().any(|c| c["address"] == client_ip.as_str()),
        "{clients:?}"
    );
    assert!(
        clients
            .iter()
            .any(|c| c["address"] == lab.state.nodes[0].ip.to_string().as_str()),
        "the node itself: {clients:?}"
    );
    lab.set_services(
        vec![web(json!({"sessionAffinity": "ClientIP"}))],
        vec![lab.slice("web", "web-1", &backends.map(Ep::ready), ports())],
    )
    .expect("publish");
    lab.wait_frontend(0, &format!("{CLUSTER_IP}:80/tcp"), "internal", 2)
        .expect("frontend");
    let mut answers = std::collections::BTreeSet::new();
    let wire = on_the_wire(&lab, "pod-0-0", "tcp[tcpflags] & tcp-syn != 0", || {
        for _ in 0..6 {
            let r = probe(&lab, "pod-0-0", &svc_http, "TCP");
            answers.insert(r["answered_by"].as_str().unwrap_or("none").to_owned());
        }
    });
    assert_eq!(answers.len(), 1, "affinity held: {answers:?}");
    let chosen = answers.iter().next().expect("an answer").clone();
    let chosen_ip = ip_of(&lab, chosen.trim_start_matches("default/"));
    assert!(
        !wire.is_empty() && wire.iter().all(|w| *w == (chosen_ip, HTTP)),
        "translated in the socket hook, to the affine backend: {wire:?}"
    );
    // From outside the node's cgroup (the per-packet path alone): the
    // same backend, from the same affinity entry.
    for _ in 0..3 {
        let r = probe_in(&lab, "pod-0-0", &svc_http, "TCP", false);
        assert_eq!(r["answered_by"].as_str(), Some(chosen.as_str()), "{r}");
    }

    // internalTrafficPolicy Local: node 0's clients get node 0's backend
    // only, through the socket hooks.
    lab.set_services(
        vec![web(json!({"internalTrafficPolicy": "Local"}))],
        vec![lab.slice("web", "web-1", &backends.map(Ep::ready), ports())],
    )
    .expect("publish");
    lab.wait_frontend(0, &format!("{CLUSTER_IP}:80/tcp"), "internal", 1)
        .expect("frontend");
    let local = ip_of(&lab, "pod-0-1");
    let wire = on_the_wire(&lab, "pod-0-0", "tcp[tcpflags] & tcp-syn != 0", || {
        for _ in 0..6 {
            let r = probe(&lab, "pod-0-0", &svc_http, "TCP");
            assert_eq!(r["answered_by"], "default/pod-0-1", "{r}");
        }
    });
    assert!(
        !wire.is_empty() && wire.iter().all(|w| *w == (local, HTTP)),
        "socket LB to the local backend: {wire:?}"
    );
}
