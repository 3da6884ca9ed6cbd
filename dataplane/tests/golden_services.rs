//! Golden packets for Services, conntrack and NAT, in Katran's style: a
//! table of cases, each {what, program, device, input packet, expected
//! verdict, expected output packet, the counter it is booked under}, run in
//! order through `BPF_PROG_TEST_RUN` against maps the agent's own Service
//! code filled. Later cases rely on the flows earlier ones created (a reply
//! after its request), as real traffic would.

mod common;

use std::net::Ipv4Addr;

use common::*;
use dataplane::{
    cluster::{self, Kind, Object},
    lb,
    maps::{
        ct::{AffinityMap, CtMap},
        services::{BackendsMap, MaglevMap, Services, ServicesMap},
    },
};
use dataplane_common::{HAIRPIN_IPV4, MODE_VXLAN, NAT_PORT_MAX, NAT_PORT_MIN, flow_hash};
use etherparse::{
    Icmpv4Type, Ipv4Header, PacketBuilder, SlicedPacket, TransportSlice,
    icmpv4::DestUnreachableHeader,
};
use serde_json::json;

const EXT: [u8; 4] = [172, 20, 0, 100];
const EXT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const WEB: [u8; 4] = [10, 96, 0, 10];
const REMOTE_SVC: [u8; 4] = [10, 96, 0, 11];
const SELF_SVC: [u8; 4] = [10, 96, 0, 12];
const EMPTY_SVC: [u8; 4] = [10, 96, 0, 13];
const STICKY_SVC: [u8; 4] = [10, 96, 0, 15];
const LB_IP: [u8; 4] = [192, 0, 2, 50];
const OUTSIDE: [u8; 4] = [198, 51, 100, 7];
const OWN_NODE: &str = "n0";
/// A small prime: the tables are exact whatever their size.
const MAGLEV_SIZE: u32 = 251;

/// The same UDP datagram without a checksum (0: "none", allowed in IPv4).
fn no_checksum(mut p: Vec<u8>) -> Vec<u8> {
    p[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    p
}

/// Splits a UDP datagram (`p`, IP without options) into a first fragment
/// with the UDP header and `first` payload bytes, and the rest, both with
/// IP id `id`.
fn fragments(p: &[u8], first: usize, id: u16) -> (Vec<u8>, Vec<u8>) {
    let (eth, ip, l4) = (&p[..14], &p[14..34], &p[34..]);
    let mut h = Ipv4Header::from_slice(ip).expect("ip").0;
    h.identification = id;
    h.dont_fragment = false;
    let cut = 8 + first;
    assert_eq!(cut % 8, 0);
    let mut build = |more: bool, offset: usize, body: &[u8]| {
        h.more_fragments = more;
        h.fragment_offset = etherparse::IpFragOffset::try_new((offset / 8) as u16).expect("offset");
        h.set_payload_len(body.len()).expect("len");
        h.header_checksum = h.calc_header_checksum();
        let mut out = eth.to_vec();
        h.write(&mut out).expect("ip");
        out.extend_from_slice(body);
        out
    };
    (build(true, 0, &l4[..cut]), build(false, cut, &l4[cut..]))
}

/// A case's own check of the packet out.
type Checker = Box<dyn Fn(&[u8])>;

/// What a case expects to come out.
enum Out {
    /// Exactly these bytes.
    Exact(Vec<u8>),
    /// The input, untouched.
    Same,
    /// Checked by the case itself.
    Check(Checker),
}

struct Case {
    what: &'static str,
    prog: &'static str,
    ifindex: u32,
    input: Vec<u8>,
    verdict: u32,
    out: Out,
    /// (direction, reason) the packet is counted under at its hook (tc,
    /// or XDP for `host_xdp`).
    counted: (&'static str, &'static str),
}

fn run(f: &Fixture, cases: Vec<Case>) {
    for c in cases {
        let before = f.counted();
        let xdp = c.prog == "host_xdp";
        let (rc, out) = if xdp {
            f.xdp(c.prog, c.ifindex, &c.input)
        } else {
            f.tc(c.prog, c.ifindex, &c.input)
        };
        assert_eq!(rc, c.verdict, "{}: verdict", c.what);
        match c.out {
            Out::Exact(want) => assert_eq!(
                out,
                want,
                "{}: packet out\n got {}\nwant {}",
                c.what,
                show(&out),
                show(&want)
            ),
            Out::Same => assert_eq!(out, c.input, "{}: the packet must pass untouched", c.what),
            Out::Check(check) => check(&out),
        }
        let after = f.counted();
        let key = (
            if xdp { "xdp" } else { "tc" }.to_string(),
            c.counted.0.to_string(),
            c.counted.1.to_string(),
        );
        let n = |rows: &Vec<(String, String, String, u64)>| {
            rows.iter()
                .find(|r| (&r.0, &r.1, &r.2) == (&key.0, &key.1, &key.2))
                .map_or(0, |r| r.3)
        };
        assert_eq!(
            n(&after),
            n(&before) + 1,
            "{}: counted under {:?}: {after:?}",
            c.what,
            c.counted
        );
    }
}

/// A packet, decoded for failure messages.
fn show(p: &[u8]) -> String {
    match SlicedPacket::from_ethernet(p) {
        Ok(s) => {
            let ip = match &s.net {
                Some(etherparse::NetSlice::Ipv4(v4)) => {
                    let h = v4.header();
                    format!(
                        "{}->{} ttl {} csum {:#06x} ",
                        h.source_addr(),
                        h.destination_addr(),
                        h.ttl(),
                        h.header_checksum()
                    )
                }
                _ => String::new(),
            };
            let l4 = match &s.transport {
                Some(TransportSlice::Tcp(t)) => format!(
                    "tcp {}->{} csum {:#06x}",
                    t.source_port(),
                    t.destination_port(),
                    t.checksum()
                ),
                Some(TransportSlice::Udp(u)) => format!(
                    "udp {}->{} csum {:#06x}",
                    u.source_port(),
                    u.destination_port(),
                    u.checksum()
                ),
                _ => String::new(),
            };
            format!("{ip}{l4} ({} bytes)", p.len())
        }
        Err(e) => format!("undecodable ({e}): {p:02x?}"),
    }
}

/// Installs a Service and its endpoints (address, node) through the
/// agent's own code: the model's parsing, the frontend computation and the
/// map writer.
fn service(
    svcs: &mut Services,
    name: &str,
    spec: serde_json::Value,
    endpoints: &[([u8; 4], &str)],
    ports: serde_json::Value,
) {
    let (key, svc) = match cluster::convert(
        Kind::Service,
        json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec["spec"], "status": spec["status"]}),
    )
    .expect("a valid Service")
    {
        (k, Object::Service(s)) => (k, s),
        _ => unreachable!(),
    };
    let eps: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(ip, node)| json!({"addresses": [Ipv4Addr::from(*ip).to_string()], "nodeName": node, "conditions": {"ready": true}}))
        .collect();
    let slice = match cluster::convert(
        Kind::EndpointSlice,
        json!({"metadata": {"name": format!("{name}-1"), "namespace": "default",
                            "labels": {"kubernetes.io/service-name": name}},
               "addressType": "IPv4", "endpoints": eps, "ports": ports}),
    )
    .expect("a valid EndpointSlice")
    {
        (_, Object::EndpointSlice(s)) => s,
        _ => unreachable!(),
    };
    let computed = lb::compute(&key, &svc, &[&slice], OWN_NODE);
    assert!(computed.problems.is_empty(), "{:?}", computed.problems);
    let out = svcs
        .apply(&("default".into(), name.into()), Some(&computed))
        .expect("apply");
    assert!(out.problems.is_empty(), "{:?}", out.problems);
}

fn services(f: &Fixture) -> Services {
    let mut s = Services::new(
        ServicesMap::open(&f.pin_dir).expect("dp_services"),
        BackendsMap::open(&f.pin_dir).expect("dp_backends"),
        MaglevMap::open(&f.pin_dir).expect("dp_maglev"),
        MAGLEV_SIZE,
    )
    .expect("services");
    let tcp80 = json!([{"port": 8080, "protocol": "TCP"}]);
    service(
        &mut s,
        "web",
        json!({"spec": {"clusterIP": "10.96.0.10", "ports": [
        {"name": "http", "port": 80, "targetPort": 8080},
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}}),
        &[(PEER, OWN_NODE)],
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
    );
    service(
        &mut s,
        "remote",
        json!({"spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}}),
        &[(REMOTE_POD, "n1")],
        tcp80.clone(),
    );
    service(
        &mut s,
        "self",
        json!({"spec": {"clusterIP": "10.96.0.12", "ports": [{"port": 80}]}}),
        &[(POD, OWN_NODE)],
        tcp80.clone(),
    );
    service(
        &mut s,
        "empty",
        json!({"spec": {"clusterIP": "10.96.0.13", "ports": [{"port": 80}]}}),
        &[],
        tcp80.clone(),
    );
    service(
        &mut s,
        "np-local",
        json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.20",
        "ports": [{"port": 80, "nodePort": 30081}]}}),
        &[(PEER, OWN_NODE)],
        tcp80.clone(),
    );
    service(
        &mut s,
        "np-remote",
        json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.21",
        "ports": [{"port": 80, "nodePort": 30082}]}}),
        &[(REMOTE_POD, "n1")],
        tcp80.clone(),
    );
    service(
        &mut s,
        "np-etp",
        json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.22",
        "externalTrafficPolicy": "Local", "ports": [{"port": 80, "nodePort": 30083}]}}),
        &[(REMOTE_POD, "n1")],
        tcp80.clone(),
    );
    service(
        &mut s,
        "sticky",
        json!({"spec": {"clusterIP": "10.96.0.15", "ports": [{"port": 80}],
        "sessionAffinity": "ClientIP"}}),
        &[
            (PEER, OWN_NODE),
            (REMOTE_POD, "n1"),
            ([10, 244, 1, 11], "n1"),
        ],
        tcp80.clone(),
    );
    service(
        &mut s,
        "lb",
        json!({"spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.23",
        "ports": [{"port": 80, "nodePort": 30084}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.50"}]}}}),
        &[(PEER, OWN_NODE), (POD, OWN_NODE), (REMOTE_POD, "n1")],
        tcp80,
    );
    s
}

/// Where a packet out of a program is going, and from where.
fn addrs(p: &[u8]) -> (([u8; 4], u16), ([u8; 4], u16)) {
    let s = SlicedPacket::from_ethernet(p).expect("decodable");
    let Some(etherparse::NetSlice::Ipv4(v4)) = &s.net else {
        panic!("not IPv4: {}", show(p))
    };
    let h = v4.header();
    let (sp, dp) = match &s.transport {
        Some(TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port()),
        Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()),
        _ => (0, 0),
    };
    ((h.source(), sp), (h.destination(), dp))
}

/// A client port reused for a direct connection to the backend it last
/// reached through a Service (its kernel cannot know where the Service
/// sent it): the SYN retires the old flow's entries, so the backend's
/// answers reach the client untranslated. Before, they came back from the
/// ClusterIP, and the client retried its SYN until the backend's TIME_WAIT
/// ended (35 s in the bench's connection-rate run).
#[test]
fn a_direct_syn_retires_a_service_flow_on_the_same_ports() {
    direct_syn_retires_service_flow(MODE_VXLAN);
}

#[test]
fn a_direct_syn_retires_a_service_flow_on_the_same_ports_native() {
    direct_syn_retires_service_flow(dataplane_common::MODE_NATIVE);
}

fn direct_syn_retires_service_flow(mode: u8) {
    let f = fixture(mode);
    let _svcs = services(&f);
    let (pod, peer) = ((POD_MAC, HOST_MAC), (PEER_MAC, PEER_HOST_MAC));
    let ct_entries = || dataplane::maps::count(&f.pin_dir, "dp_ct").expect("dp_ct");
    let run = |ifindex, packet: &[u8]| {
        let (rc, out) = f.tc("lxc_from_ctr", ifindex, packet);
        assert_eq!(rc, TC_ACT_REDIRECT, "{}", show(packet));
        addrs(&out)
    };
    let answer = tcp(peer, (PEER, 8080), (POD, 41000), 64, false, &[], &[]);
    // Through the Service, and its answer translated back.
    let syn = tcp(pod, (POD, 41000), (WEB, 80), 64, true, &[], &[]);
    assert_eq!(run(f.pod_if, &syn), ((POD, 41000), (PEER, 8080)));
    assert_eq!(run(f.peer_if, &answer), ((WEB, 80), (POD, 41000)));
    assert_eq!(ct_entries(), 2);
    // A later packet of that flow that is not a SYN changes nothing.
    let ack = tcp(pod, (POD, 41000), (PEER, 8080), 64, false, &[], &[]);
    assert_eq!(run(f.pod_if, &ack), ((POD, 41000), (PEER, 8080)));
    assert_eq!(ct_entries(), 2);
    // The same port, straight to the backend: the old entries go.
    let syn = tcp(pod, (POD, 41000), (PEER, 8080), 64, true, &[], &[]);
    assert_eq!(run(f.pod_if, &syn), ((POD, 41000), (PEER, 8080)));
    assert_eq!(ct_entries(), 0);
    assert_eq!(run(f.peer_if, &answer), ((PEER, 8080), (POD, 41000)));
}

#[test]
fn service_translation_table() {
    let f = fixture(MODE_VXLAN);
    let _svcs = services(&f);
    let pod = (POD_MAC, HOST_MAC);
    let to_pod = (HOST_MAC, POD_MAC);
    let peer = (PEER_MAC, PEER_HOST_MAC);
    let to_peer = (PEER_HOST_MAC, PEER_MAC);
    let ext = (EXT_MAC, UPLINK_MAC);
    let hello = b"hello";
    let syn = |src, dst| tcp(pod, src, dst, 64, true, &[], &[]);
    let nop4 = [1u8, 1, 1, 1];
    let truncated = truncate_l4(syn((POD, 40010), (WEB, 80)), 12);
    let dns_query = udp(pod, (POD, 5002), (WEB, 53), 64, &[7u8; 64]);
    let (frag1, frag2) = fragments(&dns_query, 32, 0x4242);
    let (frag1_out, frag2_out) = fragments(
        &udp(to_peer, (POD, 5002), (PEER, 5353), 63, &[7u8; 64]),
        32,
        0x4242,
    );
    let (_, orphan) = fragments(&dns_query, 32, 0x4343);
    let nat_port = |p: &[u8]| addrs(p).0.1;
    let cases = vec![
        Case {
            what: "a pod's TCP SYN to a ClusterIP goes to its local backend, DNATed",
            prog: "lxc_from_ctr",
            ifindex: f.pod_if,
            input: syn((POD, 40000), (WEB, 80)),
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(tcp(to_peer, (POD, 40000), (PEER, 8080), 63, true, &[], &[])),
            counted: ("from-endpoint", "forwarded"),
        },
        Case {
            what: "the backend's reply comes from the ClusterIP (reverse NAT)",
            prog: "lxc_from_ctr",
            ifindex: f.peer_if,
            input: tcp(peer, (PEER, 8080), (POD, 40000), 64, true, &[], &[]),
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(tcp(to_pod, (WEB, 80), (POD, 40000), 63, true, &[], &[])),
            counted: ("from-endpoint", "forwarded"),
        },
        Case {
            what: "the flow's data follows conntrack",
            prog: "lxc_from_ctr",
            ifindex: f.pod_if,
            input: tcp(pod, (POD, 40000), (WEB, 80), 64, false, &[], hello),
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(tcp(
                to_peer,
                (POD, 40000),
                (PEER, 8080),
                63,
                false,
                &[],
                hello,
            )),
            counted: ("from-endpoint", "forwarded"),
        },
        Case {
            what: "UDP: a named port (dns) to its target port, checksum updated",
            prog: "lxc_from_ctr",
            ifindex: f.pod_if,
            input: udp(pod, (POD, 5000), (WEB, 53), 64, hello),
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(udp(to_peer, (POD, 5000), (PEER, 5353), 63, hello)),
            counted: ("from-endpoint", "forwarded"),
        },
        Case {
            what: "UDP without a checksum keeps none",
            prog: "lxc_from_ctr",
            ifindex: f.pod_if,
            input: no_checksum(udp(pod, (POD, 5001), (WEB, 53), 64, hello)),
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(no_checksum(udp(
                to_peer,
                (POD, 5001),
                (PEER, 5353),
                63,
                hello,
            ))),
            counted: ("from-endpoint", "forwarded"),
        },
        Case {
            what: "a backend on another node: DNATed into the tunnel",
            prog: "lxc_from_ctr",
            ifindex: f.pod_if,
            input: syn((POD, 40001), (REMOTE_SVC, 80)),
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(tcp(
                pod,
                (POD, 40001),
                (REMOTE_POD, 8080),
                63,
                true,
                &[],
                &[],
            )),
            counted: ("from-endpoint", "forwarded"),
        },
        Case {
            what: "hairpin: a pod reaching itself sees the hairpin address",
            prog: "lxc_from_ctr",
            ifindex: f.pod_if,
            input: syn((POD, 40002), (SELF_SVC, 80)),
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(tcp(
                to_pod,
                (HAIRPIN_IPV4, 40002),
                (POD, 8080),
                63,
                true,
                &[],
                &[],
            )),
            counted: ("from-endpoint", "forwarded"),
        },
        Case {
            what: "hairpin reply: back from the ClusterIP",
            prog: "lxc_from_ctr",
            ifindex: f.pod_if,
            input: tcp(pod, (POD, 8080), (HAIRPIN_IPV4, 40002), 64, true, &[], &[]),
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(tcp(
                to_pod,
                (SELF_SVC, 80),
                (POD, 40002),
                63,
                true,
                &[],
                &[],
            )),
            counted: ("from-endpoint", "forwarded"),
        },
        Case {
            what: "no endpoints: refused at once with ICMP port unreachable from the ClusterIP",
            prog: "lxc_from_ctr",
            ifindex: f.pod_if,
            input: syn((POD, 40003), (EMPTY_SVC, 80)),
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(icmp_error_from(
                EMPTY_SVC,
                POD_MAC,
                HOST_MAC,
                POD,
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
                &syn((POD, 40003), (EMPTY_SVC, 80)),
            )),
            counted: ("from-endpoint", "service_no_backend"),
        },
        Case {
            what: "a port no Service has in the Service range is dropped",
            prog: "lxc_from_ctr",
            ifindex: f.pod_if,
            input: syn((POD, 40004), (WEB, 81)),
            verdict: TC_ACT_SHOT,
            out: Out::Same,
            counted: ("from-endpoint", "no_service"),
        },
        Case {
            what: "a truncated TCP header is dropped",
            prog: "lxc_from_ctr",
            ifindex: f.pod_if,
            input: truncated,
            verdict: TC_ACT_SHOT,
            out: Out::Same,
            counted: ("from-endpoint", "l4_malformed"),
        },
        Case {
            what: "IP options: the TCP header is found after them",
            prog: "lxc_from_ctr",
            ifindex: f.pod_if,
            input: tcp(pod, (POD, 40005), (WEB, 80), 64, true, &nop4, &[]),
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(tcp(
                to_peer,
                (POD, 40005),
                (PEER, 8080),
                63,
                true,
                &nop4,
                &[],
            )),
            counted: ("from-endpoint", "forwarded"),
        },
        Case {
            what: "a first fragment: ports translated, the datagram's checksum updated",
            prog: "lxc_from_ctr",
            ifindex: f.pod_if,
            input: frag1,
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(frag1_out),
            counted: ("from-endpoint", "forwarded"),
        },
        Case {
            what: "a later fragment follows its first to the same backend",
            prog: "lxc_from_ctr",
            ifindex: f.pod_if,
            input: frag2,
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(frag2_out),
            counted: ("from-endpoint", "forwarded"),
        },
        Case {
            what: "a later fragment whose first was never seen",
            prog: "lxc_from_ctr",
            ifindex: f.pod_if,
            input: orphan,
            verdict: TC_ACT_SHOT,
            out: Out::Same,
            counted: ("from-endpoint", "frag_not_tracked"),
        },
        Case {
            what: "NodePort from outside to a local backend: the client's address is kept",
            prog: "host_in",
            ifindex: f.uplink_if,
            input: tcp(ext, (EXT, 41000), (NODE, 30081), 64, true, &[], &[]),
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(tcp(to_peer, (EXT, 41000), (PEER, 8080), 63, true, &[], &[])),
            counted: ("from-network", "forwarded"),
        },
        Case {
            what: "its reply leaves from the node's NodePort",
            prog: "lxc_from_ctr",
            ifindex: f.peer_if,
            input: tcp(peer, (PEER, 8080), (EXT, 41000), 64, true, &[], &[]),
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(tcp(peer, (NODE, 30081), (EXT, 41000), 63, true, &[], &[])),
            counted: ("from-endpoint", "forwarded"),
        },
        Case {
            what: "NodePort to a backend on another node: SNATed to this node, into the tunnel",
            prog: "host_in",
            ifindex: f.uplink_if,
            input: tcp(ext, (EXT, 41001), (NODE, 30082), 64, true, &[], &[]),
            verdict: TC_ACT_REDIRECT,
            out: Out::Check(Box::new(move |out| {
                let port = nat_port(out);
                assert!(
                    (NAT_PORT_MIN..=NAT_PORT_MAX).contains(&port),
                    "NAT port {port}"
                );
                assert_eq!(
                    out,
                    tcp(ext, (NODE, port), (REMOTE_POD, 8080), 63, true, &[], &[]),
                    "{}",
                    show(out)
                );
            })),
            counted: ("from-network", "forwarded"),
        },
        Case {
            what: "externalTrafficPolicy Local on a node without a local endpoint",
            prog: "host_in",
            ifindex: f.uplink_if,
            input: tcp(ext, (EXT, 41002), (NODE, 30083), 64, true, &[], &[]),
            verdict: TC_ACT_SHOT,
            out: Out::Same,
            counted: ("from-network", "no_local_backend"),
        },
    ];
    run(&f, cases);

    // Conntrack holds both directions of each translated flow.
    let ct = CtMap::open(&f.pin_dir)
        .expect("dp_ct")
        .entries()
        .expect("entries");
    let web_flow = ct
        .iter()
        .filter(|(k, _)| k.dport == 80u16.to_be_bytes() && k.sport == 40000u16.to_be_bytes())
        .count();
    assert_eq!(web_flow, 1, "the original direction of POD:40000 -> WEB:80");
    let reply = ct
        .iter()
        .find(|(k, _)| k.sport == 8080u16.to_be_bytes() && k.dport == 40000u16.to_be_bytes())
        .expect("the reply direction of POD:40000 -> WEB:80");
    assert_eq!(reply.1.packets, 1, "the one reply seen");
}

#[test]
fn masquerade_and_its_replies() {
    let f = fixture(MODE_VXLAN);
    let out_mac = (HOST_MAC, UPLINK_MAC);
    let input = tcp(out_mac, (POD, 40100), (OUTSIDE, 443), 63, true, &[], &[]);
    let (rc, out) = f.tc("host_out", f.uplink_if, &input);
    assert_eq!(rc, TC_ACT_OK);
    let port = addrs(&out).0.1;
    assert!(
        (NAT_PORT_MIN..=NAT_PORT_MAX).contains(&port),
        "NAT port {port}"
    );
    assert_eq!(
        out,
        tcp(out_mac, (NODE, port), (OUTSIDE, 443), 63, true, &[], &[]),
        "{}",
        show(&out)
    );
    // A second packet of the flow keeps its port; another flow gets another.
    let (_, again) = f.tc(
        "host_out",
        f.uplink_if,
        &tcp(out_mac, (POD, 40100), (OUTSIDE, 443), 63, false, &[], b"x"),
    );
    assert_eq!(addrs(&again).0, (NODE, port));
    let (_, other) = f.tc(
        "host_out",
        f.uplink_if,
        &tcp(out_mac, (POD, 40101), (OUTSIDE, 443), 63, true, &[], &[]),
    );
    assert_ne!(addrs(&other).0.1, port);
    // The reply, back to the pod.
    let reply = tcp(
        (EXT_MAC, UPLINK_MAC),
        (OUTSIDE, 443),
        (NODE, port),
        60,
        true,
        &[],
        &[],
    );
    let (rc, back) = f.tc("host_in", f.uplink_if, &reply);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(
        back,
        tcp(
            (HOST_MAC, POD_MAC),
            (OUTSIDE, 443),
            (POD, 40100),
            59,
            true,
            &[],
            &[]
        ),
        "{}",
        show(&back)
    );
    // Cluster destinations (pods, nodes, Services) are never masqueraded.
    for dst in [REMOTE_POD, REMOTE_NODE, WEB] {
        let input = tcp(out_mac, (POD, 40102), (dst, 80), 63, true, &[], &[]);
        assert_eq!(f.tc("host_out", f.uplink_if, &input), (TC_ACT_OK, input));
    }
}

#[test]
fn affinity_keeps_a_client_on_its_backend() {
    let f = fixture(MODE_VXLAN);
    let _svcs = services(&f);
    let mut seen = std::collections::BTreeSet::new();
    for sport in 42000..42020 {
        let input = tcp(
            (POD_MAC, HOST_MAC),
            (POD, sport),
            (STICKY_SVC, 80),
            64,
            true,
            &[],
            &[],
        );
        let (rc, out) = f.tc("lxc_from_ctr", f.pod_if, &input);
        assert_eq!(rc, TC_ACT_REDIRECT);
        seen.insert(addrs(&out).1);
    }
    assert_eq!(
        seen.len(),
        1,
        "20 new flows of one client on one backend: {seen:?}"
    );
    let aff = AffinityMap::open(&f.pin_dir)
        .expect("dp_affinity")
        .entries()
        .expect("entries");
    assert_eq!(aff.len(), 1, "{aff:?}");
    // Another client may land elsewhere, but sticks too.
    let mut other = std::collections::BTreeSet::new();
    for sport in 42000..42010 {
        let input = tcp(
            (PEER_MAC, PEER_HOST_MAC),
            (PEER, sport),
            (STICKY_SVC, 80),
            64,
            true,
            &[],
            &[],
        );
        let (_, out) = f.tc("lxc_from_ctr", f.peer_if, &input);
        other.insert(addrs(&out).1);
    }
    assert_eq!(other.len(), 1, "{other:?}");
}

#[test]
fn external_flows_follow_the_maglev_table() {
    let f = fixture(MODE_VXLAN);
    let _svcs = services(&f);
    let lb_key = dataplane_common::ServiceKey::v4(
        LB_IP,
        80u16.to_be_bytes(),
        6,
        dataplane_common::SCOPE_EXTERNAL,
        0,
    );
    let fe = ServicesMap::open(&f.pin_dir)
        .expect("dp_services")
        .entries()
        .expect("entries")[&lb_key];
    assert_eq!(fe.maglev_size, MAGLEV_SIZE);
    let table = MaglevMap::open(&f.pin_dir)
        .expect("dp_maglev")
        .table(fe.id)
        .expect("read")
        .expect("the frontend's table");
    let backends = BackendsMap::open(&f.pin_dir)
        .expect("dp_backends")
        .entries()
        .expect("entries");
    let mut hit = std::collections::BTreeSet::new();
    for sport in 43000..43060u16 {
        let input = tcp(
            (EXT_MAC, UPLINK_MAC),
            (EXT, sport),
            (LB_IP, 80),
            64,
            true,
            &[],
            &[],
        );
        let (rc, out) = f.tc("host_in", f.uplink_if, &input);
        assert_eq!(rc, TC_ACT_REDIRECT);
        let h = flow_hash(EXT, LB_IP, sport.to_be_bytes(), 80u16.to_be_bytes(), 6);
        let want = backends[&table[(h % MAGLEV_SIZE) as usize]];
        let got = addrs(&out).1;
        assert_eq!(
            got.0,
            [want.addr[0], want.addr[1], want.addr[2], want.addr[3]],
            "flow from port {sport}"
        );
        assert_eq!(got.1, 8080);
        hit.insert(got.0);
    }
    assert_eq!(hit.len(), 3, "60 flows reach all three backends: {hit:?}");
}

/// A frontend on PEER:9090 whose one backend is PEER:9090 itself: the
/// rewrite is a no-op, so TEST_RUN's repeats see the same packet on an
/// established Service flow.
fn self_service(f: &Fixture) {
    use dataplane::maps::Table as _;
    use dataplane::maps::services::BackendId;
    use dataplane_common::{Backend, FAMILY_IPV4, SCOPE_INTERNAL, ServiceKey, ServiceValue};

    let key = ServiceKey::v4(PEER, 9090u16.to_be_bytes(), 6, SCOPE_INTERNAL, 0);
    let mut svcs = ServicesMap::open(&f.pin_dir).expect("dp_services");
    svcs.put(
        &key,
        &ServiceValue {
            id: 1,
            count: 1,
            ..Default::default()
        },
    )
    .expect("frontend");
    svcs.put(
        &ServiceKey { slot: 1, ..key },
        &ServiceValue {
            id: 7,
            ..Default::default()
        },
    )
    .expect("slot");
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&PEER);
    BackendsMap::open(&f.pin_dir)
        .expect("dp_backends")
        .put(
            &BackendId(7),
            &Backend {
                addr,
                port: 9090u16.to_be_bytes(),
                proto: 6,
                family: FAMILY_IPV4,
                ..Default::default()
            },
        )
        .expect("backend");
}

/// Not a test: `cargo xtask bench` runs it for the per-packet cost of the
/// Service path, measured by the kernel (TEST_RUN's own clock). The
/// frontend of [`self_service`] is compared with the same packet to a
/// port no Service has, on the same forwarding path (local delivery).
#[test]
#[ignore = "a benchmark: cargo xtask bench"]
fn bench_service_path_per_packet() {
    let f = fixture(MODE_VXLAN);
    self_service(&f);
    let run = |packet: &[u8], repeat: u32| {
        f.timed("lxc_from_ctr", f.pod_if, packet, repeat, TC_ACT_REDIRECT)
    };
    let pkt = |sport: u16, dport: u16| {
        tcp(
            (POD_MAC, HOST_MAC),
            (POD, sport),
            (PEER, dport),
            255,
            false,
            &[],
            b"x",
        )
    };
    // Established flows: 250 runs per call (the TTL, decremented each run,
    // starts at 255).
    let (plain, service) = (pkt(30000, 8080), pkt(30000, 9090));
    run(&service, 1);
    let (mut a, mut b) = (0.0, 0.0);
    let calls = 400;
    for _ in 0..calls {
        a += run(&plain, 250);
        b += run(&service, 250);
    }
    let (est_plain, est_svc) = (a / calls as f64, b / calls as f64);
    // New flows: one run per call, a new source port each time.
    let (mut a, mut b) = (0.0, 0.0);
    let n = 20_000u16;
    for i in 0..n {
        a += run(&pkt(10_000 + i, 8080), 1);
        b += run(&pkt(10_000 + i, 9090), 1);
    }
    let (new_plain, new_svc) = (a / f64::from(n), b / f64::from(n));
    println!(
        "BENCH service-path established_ns={est_svc:.1} plain_ns={est_plain:.1} new_flow_ns={new_svc:.1} new_plain_ns={new_plain:.1}"
    );
}

/// Not a test: `cargo xtask bench` runs it for the per-packet cost of each
/// program on its common path, by TEST_RUN's clock: the median of 100
/// calls of 250 runs each, after a first run that creates the flow's
/// state. TTL 255 leaves room for the 250 hops a forwarding program
/// counts down. Not here: `overlay_in` (TEST_RUN cannot attach VXLAN
/// metadata, and without it the program drops), `from_host`, and the
/// rewrites TEST_RUN keeps between runs (masquerade, XDP NodePort); the
/// report's live run-time statistics cover those.
#[test]
#[ignore = "a benchmark: cargo xtask bench"]
fn bench_each_program_per_packet() {
    use dataplane_common::MODE_NATIVE;
    type Case = (
        &'static str,
        &'static str,
        fn(&Fixture) -> u32,
        Vec<u8>,
        u32,
    );
    let pkt = |macs, src: [u8; 4], dst: ([u8; 4], u16)| {
        tcp(macs, (src, 40_000), dst, 255, false, &[], b"x")
    };
    let uplink = ([0x02, 0, 0, 0, 0, 0x12], [0x02, 0, 0, 0, 0, 0x11]);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Each fixture lives in its own thread's network namespace.
    let run = |mode: u8, cases: Vec<Case>| {
        std::thread::spawn(move || {
            let f = fixture(mode);
            self_service(&f);
            let mut line = String::new();
            for (key, prog, dev, packet, verdict) in &cases {
                let dev = dev(&f);
                let time = |repeat| f.timed(prog, dev, packet, repeat, *verdict);
                time(1);
                let ns = median((0..100).map(|_| time(250)).collect());
                line.push_str(&format!(" {key}={ns:.1}"));
            }
            line
        })
        .join()
        .expect("bench thread")
    };
    let vxlan: Vec<Case> = vec![
        (
            "lxc_from_ctr:pod-to-pod-same-node",
            "lxc_from_ctr",
            |f| f.pod_if,
            pkt((POD_MAC, HOST_MAC), POD, (PEER, 8080)),
            TC_ACT_REDIRECT,
        ),
        (
            "lxc_from_ctr:pod-to-remote-pod-vxlan",
            "lxc_from_ctr",
            |f| f.pod_if,
            pkt((POD_MAC, HOST_MAC), POD, (REMOTE_POD, 8080)),
            TC_ACT_REDIRECT,
        ),
        (
            "lxc_from_ctr:pod-to-clusterip-established",
            "lxc_from_ctr",
            |f| f.pod_if,
            pkt((POD_MAC, HOST_MAC), POD, (PEER, 9090)),
            TC_ACT_REDIRECT,
        ),
        (
            "lxc_from_ctr:pod-to-outside",
            "lxc_from_ctr",
            |f| f.pod_if,
            pkt((POD_MAC, HOST_MAC), POD, (OUTSIDE, 443)),
            TC_ACT_OK,
        ),
        (
            "lxc_to_ctr:stack-to-pod",
            "lxc_to_ctr",
            |f| f.pod_if,
            pkt((HOST_MAC, POD_MAC), NODE, (POD, 8080)),
            TC_ACT_OK,
        ),
        (
            "overlay_out:node-to-remote-pod",
            "overlay_out",
            |f| f.tunnel_if,
            pkt((HOST_MAC, PEER_MAC), NODE, (REMOTE_POD, 8080)),
            TC_ACT_OK,
        ),
        (
            "host_out:node-to-node",
            "host_out",
            |f| f.uplink_if,
            pkt(uplink, NODE, (REMOTE_NODE, 8080)),
            TC_ACT_OK,
        ),
        (
            "host_in:vxlan-underlay-to-node",
            "host_in",
            |f| f.uplink_if,
            udp(uplink, (REMOTE_NODE, 40_000), (NODE, 8472), 64, &[0; 58]),
            TC_ACT_OK,
        ),
        (
            "host_xdp:frame-for-the-node",
            "host_xdp",
            |f| f.uplink_if,
            pkt(uplink, REMOTE_NODE, (NODE, 8080)),
            XDP_PASS,
        ),
    ];
    let native: Vec<Case> = vec![(
        "host_in:native-remote-pod-to-pod",
        "host_in",
        |f| f.uplink_if,
        pkt(uplink, REMOTE_POD, (POD, 8080)),
        TC_ACT_REDIRECT,
    )];
    println!(
        "BENCH programs{}{}",
        run(MODE_VXLAN, vxlan),
        run(MODE_NATIVE, native)
    );
}

/// `dataplane explain`'s own code, on this fixture's programs and maps: a
/// dry run decides as a real packet would and changes nothing.
#[test]
fn explain_is_a_dry_run_of_the_live_program_that_changes_nothing() {
    use dataplane::explain::{Explained, Request, explain};
    let f = fixture(MODE_VXLAN);
    let _svcs = services(&f);
    let ct_entries = || dataplane::maps::count(&f.pin_dir, "dp_ct").expect("dp_ct");
    let affinities = || dataplane::maps::count(&f.pin_dir, "dp_affinity").expect("dp_affinity");
    let ask = |src: &str, dst: &str, what: &str, sport: u16| -> Explained {
        explain(&Request {
            pin_dir: &f.pin_dir,
            // No agent: addresses only, identities by number.
            socket: std::path::Path::new("/nonexistent/agent.sock"),
            src,
            dst,
            what,
            sport: Some(sport),
        })
        .unwrap_or_else(|e| panic!("explain {src} {dst} {what}: {e:#}"))
    };
    let step = |e: &Explained, s: &str| -> String {
        e.steps
            .iter()
            .find(|x| x.step == s)
            .map(|x| x.detail.clone())
            .unwrap_or_else(|| panic!("no {s} step in {e:#?}"))
    };
    let counted = f.counted();

    // A new flow to a Service: frontend, backend, rewrite, both policies,
    // delivered to the backend on this node.
    let e = ask("10.244.0.10", "10.96.0.10", "tcp/80", 40000);
    assert_eq!((e.program.as_str(), e.ifindex), ("lxc_from_ctr", f.pod_if));
    assert_eq!(e.verdict, "forwarded", "{e:#?}");
    assert_eq!(step(&e, "conntrack"), "no entry: a new flow");
    assert!(
        step(&e, "service")
            .starts_with("10.96.0.10:80/tcp (internal) -> backend 10.244.0.11:8080/tcp"),
        "{e:#?}"
    );
    assert_eq!(step(&e, "nat"), "destination -> 10.244.0.11:8080");
    assert!(step(&e, "egress policy").ends_with("no NetworkPolicy selects it: allowed"));
    assert!(step(&e, "route").ends_with("a pod of this node"), "{e:#?}");
    assert_eq!(
        e.leaves_as.as_deref(),
        Some("10.244.0.10:40000 -> 10.244.0.11:8080")
    );
    assert_eq!(ct_entries(), 0, "a dry run creates no conntrack entry");
    assert_eq!(f.counted(), counted, "nor counts");

    // The same packet for real is tracked; explained again, the tracked
    // flow is what it meets.
    let syn = tcp(
        (POD_MAC, HOST_MAC),
        (POD, 40000),
        (WEB, 80),
        64,
        true,
        &[],
        &[],
    );
    assert_eq!(f.tc("lxc_from_ctr", f.pod_if, &syn).0, TC_ACT_REDIRECT);
    assert_eq!(ct_entries(), 2);
    let e = ask("10.244.0.10", "10.96.0.10", "tcp/80", 40000);
    assert_eq!(
        step(&e, "conntrack"),
        "a tracked flow (original direction, service): 10.96.0.10:80/tcp (internal) -> 10.244.0.11:8080/tcp"
    );
    assert_eq!(ct_entries(), 2);

    // Affinity is looked up, not written.
    let e = ask("10.244.0.10", "10.96.0.15", "tcp/80", 40001);
    assert_eq!(e.verdict, "forwarded", "{e:#?}");
    assert_eq!(affinities(), 0, "a dry run keeps no affinity");

    // A Service without endpoints: refused with ICMP.
    let e = ask("10.244.0.10", "10.96.0.13", "tcp/80", 40002);
    assert_eq!(e.verdict, "answered", "{e:#?}");
    assert!(step(&e, "service").ends_with("has no backend: refused with ICMP port unreachable"));

    // In the cluster's range, on no node.
    let e = ask("10.244.0.10", "10.244.200.5", "udp/53", 40003);
    assert_eq!(
        (e.verdict.as_str(), e.reason.as_str()),
        ("dropped", "unknown_destination")
    );

    // From outside to a NodePort whose backend is on another node: SNAT to
    // this node (no port claimed), into the tunnel.
    let e = ask("172.20.0.100", "172.20.0.11", "tcp/30082", 41000);
    assert_eq!((e.program.as_str(), e.ifindex), ("host_in", f.uplink_if));
    assert_eq!(
        step(&e, "nat"),
        "destination -> 10.244.1.10:8080, source -> 172.20.0.11:41000 (a real packet claims a free NAT port; shown with the client's)"
    );
    assert!(
        step(&e, "route").starts_with("encapsulated (VXLAN) to node 172.20.0.12"),
        "{e:#?}"
    );
    assert_eq!(e.next_node.as_deref(), Some("172.20.0.12"));

    // A remote pod's packet through the tunnel, to a local pod.
    let e = ask("10.244.1.10", "10.244.0.11", "udp/5353", 41001);
    assert_eq!((e.program.as_str(), e.ifindex), ("overlay_in", f.tunnel_if));
    assert_eq!(e.verdict, "forwarded", "{e:#?}");
    assert_eq!(ct_entries(), 2, "still only the real flow's");
    // Counted: the one real packet above, nothing of the dry runs.
    let mut want = counted;
    let k = (
        "tc".to_string(),
        "from-endpoint".to_string(),
        "forwarded".to_string(),
    );
    match want
        .iter_mut()
        .find(|r| (&r.0, &r.1, &r.2) == (&k.0, &k.1, &k.2))
    {
        Some(r) => r.3 += 1,
        None => want.push((k.0, k.1, k.2, 1)),
    }
    want.sort();
    let mut got = f.counted();
    got.sort();
    assert_eq!(got, want);
}

const REMOTE_NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];

/// The uplink as XDP's FIB lookups need it: this node's address on it, its
/// MAC, and the neighbours the kernel would have learned (the outside
/// client, and in `remote_neighbour` the other node).
fn uplink_for_xdp(remote_neighbour: bool) {
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    // A node forwards (the FIB lookup of a forwarded packet asks).
    sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    sh(&["ip", "link", "set", "gup", "address", &mac(UPLINK_MAC)]);
    sh(&["ip", "addr", "add", "172.20.0.11/24", "dev", "gup"]);
    let neighbour = |ip: &str, m: [u8; 6]| {
        sh(&[
            "ip",
            "neigh",
            "replace",
            ip,
            "lladdr",
            &mac(m),
            "dev",
            "gup",
            "nud",
            "permanent",
        ])
    };
    neighbour("172.20.0.100", EXT_MAC);
    if remote_neighbour {
        neighbour("172.20.0.12", REMOTE_NODE_MAC);
    }
}

/// The ports of a frame's inner TCP/UDP header, past VXLAN's 50 bytes.
fn inner(p: &[u8]) -> &[u8] {
    assert!(p.len() > 50, "no room for VXLAN: {}", show(p));
    &p[50..]
}

/// VXLAN's outer headers as the kernel's device writes them (UDP without a
/// checksum, no DF), around `frame`, with the UDP source port `sport`.
fn vxlan(sport: u16, frame: &[u8]) -> Vec<u8> {
    let mut payload = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    payload.extend_from_slice(frame);
    let mut out = Vec::new();
    let mut ip =
        Ipv4Header::new(0, 64, etherparse::IpNumber::UDP, NODE, REMOTE_NODE).expect("ipv4");
    ip.dont_fragment = false;
    PacketBuilder::ethernet2(UPLINK_MAC, REMOTE_NODE_MAC)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .udp(sport, 8472)
        .write(&mut out, &payload)
        .expect("build");
    out[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    out
}

/// The UDP source port of a VXLAN frame.
fn outer_sport(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[34], p[35]])
}

fn udp_nodeport(svcs: &mut Services) {
    service(
        svcs,
        "np-udp",
        json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.24",
        "ports": [{"port": 53, "protocol": "UDP", "nodePort": 30085}]}}),
        &[(REMOTE_POD, "n1")],
        json!([{"port": 5353, "protocol": "UDP"}]),
    );
}

#[test]
fn xdp_serves_nodeports_into_the_tunnel() {
    let f = fixture(MODE_VXLAN);
    let mut svcs = services(&f);
    udp_nodeport(&mut svcs);
    uplink_for_xdp(true);
    let ext = (EXT_MAC, UPLINK_MAC);
    let syn = tcp(ext, (EXT, 41001), (NODE, 30082), 64, true, &[], &[]);
    let hello = b"hello";
    let cases = vec![
        Case {
            what: "NodePort to a backend on another node: SNAT + DNAT, VXLAN built, sent back out",
            prog: "host_xdp",
            ifindex: f.uplink_if,
            input: syn.clone(),
            verdict: XDP_TX,
            out: Out::Check(Box::new(move |out| {
                let port = addrs(inner(out)).0.1;
                assert!(
                    (NAT_PORT_MIN..=NAT_PORT_MAX).contains(&port),
                    "NAT port {port}"
                );
                let want = tcp(ext, (NODE, port), (REMOTE_POD, 8080), 63, true, &[], &[]);
                assert_eq!(out, vxlan(outer_sport(out), &want), "{}", show(inner(out)));
                let sport = outer_sport(out);
                assert!((32768..61000).contains(&sport), "VXLAN source port {sport}");
            })),
            counted: ("to-network", "forwarded"),
        },
        Case {
            what: "UDP to a NodePort: its checksum patched",
            prog: "host_xdp",
            ifindex: f.uplink_if,
            input: udp(ext, (EXT, 5300), (NODE, 30085), 64, hello),
            verdict: XDP_TX,
            out: Out::Check(Box::new(move |out| {
                let port = addrs(inner(out)).0.1;
                let want = udp(ext, (NODE, port), (REMOTE_POD, 5353), 63, hello);
                assert_eq!(out, vxlan(outer_sport(out), &want), "{}", show(inner(out)));
            })),
            counted: ("to-network", "forwarded"),
        },
        Case {
            what: "UDP without a checksum keeps none",
            prog: "host_xdp",
            ifindex: f.uplink_if,
            input: no_checksum(udp(ext, (EXT, 5301), (NODE, 30085), 64, hello)),
            verdict: XDP_TX,
            out: Out::Check(Box::new(move |out| {
                let port = addrs(inner(out)).0.1;
                let want = no_checksum(udp(ext, (NODE, port), (REMOTE_POD, 5353), 63, hello));
                assert_eq!(out, vxlan(outer_sport(out), &want), "{}", show(inner(out)));
            })),
            counted: ("to-network", "forwarded"),
        },
        Case {
            what: "NodePort to a backend on this node: left to tc, untouched",
            prog: "host_xdp",
            ifindex: f.uplink_if,
            input: tcp(ext, (EXT, 41000), (NODE, 30081), 64, true, &[], &[]),
            verdict: XDP_PASS,
            out: Out::Same,
            counted: ("from-network", "forwarded"),
        },
        Case {
            what: "tc then finds the flow XDP created, and delivers it",
            prog: "host_in",
            ifindex: f.uplink_if,
            input: tcp(ext, (EXT, 41000), (NODE, 30081), 64, true, &[], &[]),
            verdict: TC_ACT_REDIRECT,
            out: Out::Exact(tcp(
                (PEER_HOST_MAC, PEER_MAC),
                (EXT, 41000),
                (PEER, 8080),
                63,
                true,
                &[],
                &[],
            )),
            counted: ("from-network", "forwarded"),
        },
        Case {
            what: "externalTrafficPolicy Local without a local endpoint: tc drops it",
            prog: "host_xdp",
            ifindex: f.uplink_if,
            input: tcp(ext, (EXT, 41002), (NODE, 30083), 64, true, &[], &[]),
            verdict: XDP_PASS,
            out: Out::Same,
            counted: ("from-network", "forwarded"),
        },
        Case {
            what: "a TTL that would expire: tc answers it",
            prog: "host_xdp",
            ifindex: f.uplink_if,
            input: tcp(ext, (EXT, 41003), (NODE, 30082), 1, true, &[], &[]),
            verdict: XDP_PASS,
            out: Out::Same,
            counted: ("from-network", "forwarded"),
        },
        Case {
            what: "a TCP header cut short: tc counts it malformed",
            prog: "host_xdp",
            ifindex: f.uplink_if,
            input: truncate_l4(
                tcp(ext, (EXT, 41004), (NODE, 30082), 64, true, &[], &[]),
                12,
            ),
            verdict: XDP_PASS,
            out: Out::Same,
            counted: ("from-network", "forwarded"),
        },
        Case {
            what: "IP options: tc's",
            prog: "host_xdp",
            ifindex: f.uplink_if,
            input: tcp(
                ext,
                (EXT, 41005),
                (NODE, 30082),
                64,
                true,
                &[1, 1, 1, 1],
                &[],
            ),
            verdict: XDP_PASS,
            out: Out::Same,
            counted: ("from-network", "forwarded"),
        },
        Case {
            what: "the tunnel itself (UDP to this node's VXLAN port): the stack's",
            prog: "host_xdp",
            ifindex: f.uplink_if,
            input: udp(
                (REMOTE_NODE_MAC, UPLINK_MAC),
                (REMOTE_NODE, 40000),
                (NODE, 8472),
                64,
                hello,
            ),
            verdict: XDP_PASS,
            out: Out::Same,
            counted: ("from-network", "forwarded"),
        },
        Case {
            what: "not a Service: passed",
            prog: "host_xdp",
            ifindex: f.uplink_if,
            input: tcp(ext, (EXT, 41006), (NODE, 22), 64, true, &[], &[]),
            verdict: XDP_PASS,
            out: Out::Same,
            counted: ("from-network", "forwarded"),
        },
    ];
    run(&f, cases);

    // One conntrack for both hooks: the flow XDP started goes on in tc
    // (XDP detached) with the same NAT port, and tc's packet is counted on
    // the entry XDP made.
    let (rc, first) = f.xdp("host_xdp", f.uplink_if, &syn);
    assert_eq!(rc, XDP_TX, "the SYN again: the known flow");
    let port = addrs(inner(&first)).0.1;
    let ack = tcp(ext, (EXT, 41001), (NODE, 30082), 64, false, &[], hello);
    let (rc, out) = f.tc("host_in", f.uplink_if, &ack);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(
        out,
        tcp(ext, (NODE, port), (REMOTE_POD, 8080), 63, false, &[], hello),
        "{}",
        show(&out)
    );
    let ct = CtMap::open(&f.pin_dir)
        .expect("dp_ct")
        .entries()
        .expect("entries");
    let orig = ct
        .iter()
        .find(|(k, _)| k.sport == 41001u16.to_be_bytes() && k.dport == 30082u16.to_be_bytes())
        .expect("the flow's original direction");
    // The packet that creates an entry is not counted on it (as in tc).
    assert_eq!(orig.1.packets, 2, "the second SYN in XDP, the ACK in tc");
    let local = ct
        .iter()
        .find(|(k, _)| k.sport == 41000u16.to_be_bytes() && k.dport == 30081u16.to_be_bytes())
        .expect("the local backend's flow");
    assert_eq!(
        local.1.packets, 1,
        "created by XDP, which passed the packet on: counted once, by tc"
    );
}

#[test]
fn xdp_serves_nodeports_in_native_routing_and_leaves_replies_to_tc() {
    let f = fixture(dataplane_common::MODE_NATIVE);
    let _svcs = services(&f);
    uplink_for_xdp(false);
    sh(&[
        "ip",
        "route",
        "add",
        "10.244.1.0/24",
        "via",
        "172.20.0.12",
        "dev",
        "gup",
    ]);
    let ext = (EXT_MAC, UPLINK_MAC);
    let syn = |sport| tcp(ext, (EXT, sport), (NODE, 30082), 64, true, &[], &[]);
    // The next hop not resolved yet: tc's redirect resolves it.
    run(
        &f,
        vec![Case {
            what: "the next hop's neighbour not resolved: left to tc",
            prog: "host_xdp",
            ifindex: f.uplink_if,
            input: syn(42000),
            verdict: XDP_PASS,
            out: Out::Same,
            counted: ("from-network", "forwarded"),
        }],
    );
    sh(&[
        "ip",
        "neigh",
        "replace",
        "172.20.0.12",
        "lladdr",
        "02:00:00:00:00:0c",
        "dev",
        "gup",
        "nud",
        "permanent",
    ]);
    let (rc, out) = f.xdp("host_xdp", f.uplink_if, &syn(42001));
    assert_eq!(rc, XDP_TX, "{}", show(&out));
    let port = addrs(&out).0.1;
    assert!(
        (NAT_PORT_MIN..=NAT_PORT_MAX).contains(&port),
        "NAT port {port}"
    );
    assert_eq!(
        out,
        tcp(
            (UPLINK_MAC, REMOTE_NODE_MAC),
            (NODE, port),
            (REMOTE_POD, 8080),
            63,
            true,
            &[],
            &[]
        ),
        "routed to the backend's node: {}",
        show(&out)
    );
    let reply = tcp(
        (REMOTE_NODE_MAC, UPLINK_MAC),
        (REMOTE_POD, 8080),
        (NODE, port),
        63,
        true,
        &[],
        b"welcome",
    );
    run(
        &f,
        vec![
            Case {
                what: "the backend's reply comes from a pod of the cluster: tc's, untouched",
                prog: "host_xdp",
                ifindex: f.uplink_if,
                input: reply.clone(),
                verdict: XDP_PASS,
                out: Out::Same,
                counted: ("from-network", "forwarded"),
            },
            Case {
                what: "tc sends it back from the NodePort to the client",
                prog: "host_in",
                ifindex: f.uplink_if,
                input: reply,
                verdict: TC_ACT_REDIRECT,
                out: Out::Exact(tcp(
                    (REMOTE_NODE_MAC, UPLINK_MAC),
                    (NODE, 30082),
                    (EXT, 42001),
                    62,
                    true,
                    &[],
                    b"welcome",
                )),
                counted: ("from-network", "forwarded"),
            },
        ],
    );
}
