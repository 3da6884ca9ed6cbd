//! Golden packets: each case sets up the maps, runs one program on one
//! packet through `BPF_PROG_TEST_RUN`, and checks the verdict, the packet
//! that comes out (byte for byte) and the counter it was booked under.
//! Katran's test fixtures and Cilium's bpf/tests are the model.
//!
//! Needs root (BPF, bpffs). Each test runs in a network namespace of its
//! own (unshared by its thread), where stand-in devices give the programs
//! real interface indexes and MTUs.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{Program, SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use dataplane::{
    bpf::{AttachMode, Datapath},
    maps::{
        Table as _,
        config::ConfigMap,
        endpoints::EndpointMap,
        ipcache::{IpcacheMap, Prefix, entry},
        metrics,
    },
};
use dataplane_common::{
    DatapathConfig, EP_F_LOCAL, EndpointInfo, EndpointKey, IPCACHE_KIND_CLUSTER, IPCACHE_KIND_HOST,
    IPCACHE_KIND_LOCAL_PODS, IPCACHE_KIND_REMOTE_HOST, IPCACHE_KIND_REMOTE_PODS, MODE_NATIVE,
    MODE_VXLAN, PROGRAMS,
};
use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Type, IpHeaders, IpNumber, Ipv4Header, PacketBuilder,
    icmpv4::DestUnreachableHeader,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_PASS: u32 = 2;

const POD_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x01];
const HOST_MAC: [u8; 6] = [0xee, 0, 0, 0, 0, 0x01];
const PEER_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x02];
const PEER_HOST_MAC: [u8; 6] = [0xee, 0, 0, 0, 0, 0x02];
const POD: [u8; 4] = [10, 244, 0, 10];
const PEER: [u8; 4] = [10, 244, 0, 11];
const REMOTE_POD: [u8; 4] = [10, 244, 1, 10];
const NODE: [u8; 4] = [172, 20, 0, 11];
const REMOTE_NODE: [u8; 4] = [172, 20, 0, 12];
const GATEWAY: [u8; 4] = [169, 254, 1, 1];
const TUNNEL_MTU: u32 = 1450;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes a test's pins and state, also when it panics part-way.
struct Cleanup {
    pin_dir: PathBuf,
    state_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// The datapath loaded into a private pin directory, inside a network
/// namespace of this test's own with stand-in devices: the pod's and a
/// peer's host-side veths, the uplink, and the "VXLAN device" (a veth with
/// the tunnel's MTU).
struct Fixture {
    dp: Datapath,
    pin_dir: PathBuf,
    _cleanup: Cleanup,
    pod_if: u32,
    peer_if: u32,
    tunnel_if: u32,
    uplink_if: u32,
}

fn fixture(mode: u8) -> Fixture {
    // SAFETY: unshare affects this test's thread only: the namespace goes
    // when the thread ends.
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "unshare(CLONE_NEWNET): {} (the golden tests need root)",
        std::io::Error::last_os_error()
    );
    sh(&["ip", "link", "set", "lo", "up"]);
    for (a, b, mtu) in [
        ("gpod", "gpodp", "1500"),
        ("gpeer", "gpeerp", "1500"),
        ("gtun", "gtunp", "1450"),
        ("gup", "gupp", "1500"),
    ] {
        sh(&[
            "ip", "link", "add", a, "mtu", mtu, "type", "veth", "peer", "name", b,
        ]);
        sh(&["ip", "link", "set", a, "up"]);
        sh(&["ip", "link", "set", b, "up"]);
    }
    let idx = |n: &str| dataplane::sys::ifindex(n).expect("ifindex");
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let tag = format!("{}-{n}", std::process::id());
    // No shared parent: parallel tests never race on creating or removing it.
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/dataplane-golden-{tag}"));
    let state_dir = std::env::temp_dir().join(format!("dataplane-golden-{tag}"));
    let cleanup = Cleanup {
        pin_dir: pin_dir.clone(),
        state_dir: state_dir.clone(),
    };
    dataplane::sys::ensure_pin_dir(&pin_dir).expect("pin dir");
    // The agent's default kernel log level (info): the programs verified
    // here are the ones it runs.
    let (mut dp, logger) =
        Datapath::load(&pin_dir, &state_dir, AttachMode::Tcx, 3).expect("load the datapath");
    drop(logger);
    let f = Fixture {
        pod_if: idx("gpod"),
        peer_if: idx("gpeer"),
        tunnel_if: idx("gtun"),
        uplink_if: idx("gup"),
        dp: {
            let mut config =
                ConfigMap::new(dp.take_map(dataplane_common::MAP_CONFIG).expect("config"))
                    .expect("config");
            config
                .sync(DatapathConfig {
                    mode,
                    _pad: [0; 3],
                    vni: 1,
                    vxlan_ifindex: idx("gtun"),
                    uplink_ifindex: idx("gup"),
                    node_ipv4: NODE,
                })
                .expect("config");
            dp
        },
        pin_dir,
        _cleanup: cleanup,
    };
    let mut eps = EndpointMap::open(&f.pin_dir).expect("endpoints");
    let local = |ifindex, mac, host_mac| EndpointInfo {
        ifindex,
        identity: 0,
        mac,
        host_mac,
        flags: EP_F_LOCAL,
        _pad: 0,
    };
    eps.put(&EndpointKey::v4(POD), &local(f.pod_if, POD_MAC, HOST_MAC))
        .expect("pod");
    eps.put(
        &EndpointKey::v4(PEER),
        &local(f.peer_if, PEER_MAC, PEER_HOST_MAC),
    )
    .expect("peer");
    let mut ipc = IpcacheMap::open(&f.pin_dir).expect("ipcache");
    let remote = Ipv4Addr::from(REMOTE_NODE);
    for (net, e) in [
        ("10.244.0.0/16", entry(IPCACHE_KIND_CLUSTER, None)),
        ("10.244.0.0/24", entry(IPCACHE_KIND_LOCAL_PODS, None)),
        (
            "10.244.1.0/24",
            entry(IPCACHE_KIND_REMOTE_PODS, Some(remote)),
        ),
        ("172.20.0.11/32", entry(IPCACHE_KIND_HOST, None)),
        (
            "172.20.0.12/32",
            entry(IPCACHE_KIND_REMOTE_HOST, Some(remote)),
        ),
    ] {
        ipc.put(&Prefix(net.parse().expect("cidr")), &e)
            .expect("ipcache");
    }
    f
}

/// A `struct __sk_buff` for `ctx_in`: only `ifindex` (offset 40) set, which
/// makes the test run's skb come from that device.
fn skb_ctx(ifindex: u32) -> [u8; 192] {
    let mut c = [0u8; 192];
    c[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    c
}

impl Fixture {
    fn program(&self, name: &str) -> &Program {
        self.dp.program_ref(name).expect("program")
    }

    /// Runs a tc program on `packet` arriving on `ifindex`: (verdict, packet out).
    fn tc(&self, prog: &str, ifindex: u32, packet: &[u8]) -> (u32, Vec<u8>) {
        let p: &SchedClassifier = self.program(prog).try_into().expect("tc program");
        let ctx = skb_ctx(ifindex);
        let mut out = vec![0u8; packet.len() + 256];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("test run of {prog}: {e}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// (hook, direction, reason) -> packets, from dp_metrics.
    fn counted(&self) -> Vec<(String, String, String, u64)> {
        metrics::rows(&self.pin_dir)
            .expect("dp_metrics")
            .into_iter()
            .map(|r| (r.hook, r.direction, r.reason, r.packets))
            .collect()
    }
}

fn one(hook: &str, direction: &str, reason: &str) -> Vec<(String, String, String, u64)> {
    vec![(hook.into(), direction.into(), reason.into(), 1)]
}

fn ipv4_header(
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    proto: IpNumber,
    payload: usize,
    df: bool,
) -> Ipv4Header {
    let mut h = Ipv4Header::new(payload as u16, ttl, proto, src, dst).expect("ipv4");
    h.dont_fragment = df;
    h.header_checksum = h.calc_header_checksum();
    h
}

/// An ICMP echo request with `payload` bytes, TTL `ttl`.
fn ping(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    payload: usize,
    df: bool,
) -> Vec<u8> {
    let data = vec![0x5a; payload];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ip(IpHeaders::Ipv4(
            ipv4_header(src, dst, ttl, IpNumber::ICMP, 8 + payload, df),
            Default::default(),
        ))
        .icmpv4_echo_request(7, 1)
        .write(&mut out, &data)
        .expect("build");
    out
}

/// What a router sends back: an ICMP error from the node, quoting the
/// original IP header and 8 bytes.
fn icmp_error(
    to_mac: [u8; 6],
    from_mac: [u8; 6],
    to: [u8; 4],
    kind: Icmpv4Type,
    original: &[u8],
) -> Vec<u8> {
    let ihl = usize::from(original[14] & 0x0f) * 4;
    let quote = &original[14..14 + ihl + 8];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(from_mac, to_mac)
        .ip(IpHeaders::Ipv4(
            ipv4_header(NODE, to, 64, IpNumber::ICMP, 8 + quote.len(), false),
            Default::default(),
        ))
        .icmpv4(kind)
        .write(&mut out, quote)
        .expect("build");
    out
}

fn arp(
    oper: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
    eth_dst: [u8; 6],
) -> Vec<u8> {
    let mut p = Vec::new();
    Ethernet2Header {
        source: sha,
        destination: eth_dst,
        ether_type: EtherType::ARP,
    }
    .write(&mut p)
    .expect("eth");
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    p.extend_from_slice(&oper.to_be_bytes());
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa);
    p.extend_from_slice(&tha);
    p.extend_from_slice(&tpa);
    p
}

#[test]
fn every_program_loads_and_reports_its_verified_size() {
    let f = fixture(MODE_VXLAN);
    let stats = f.dp.stats().expect("stats");
    assert_eq!(stats.len(), PROGRAMS.len());
    println!(
        "{:<16} {:<16} {:>14} {:>10}",
        "PROGRAM", "KIND", "VERIFIED INSNS", "JIT BYTES"
    );
    for s in &stats {
        let n = s
            .verified_insns
            .expect("the kernel reports verified instructions");
        assert!(n > 0, "{}", s.name);
        println!(
            "{:<16} {:<16} {:>14} {:>10}",
            s.name,
            s.kind.name(),
            n,
            s.translated_bytes.unwrap_or(0)
        );
    }
}

#[test]
fn pod_to_pod_on_the_node_is_routed_into_the_peer() {
    let f = fixture(MODE_VXLAN);
    let input = ping(POD_MAC, HOST_MAC, POD, PEER, 64, 56, true);
    let (rc, out) = f.tc("lxc_from_ctr", f.pod_if, &input);
    assert_eq!(rc, TC_ACT_REDIRECT);
    // One hop: TTL 63, checksum patched, MACs of the peer's veth pair.
    let expect = ping(PEER_HOST_MAC, PEER_MAC, POD, PEER, 63, 56, true);
    assert_eq!(out, expect);
    assert_eq!(f.counted(), one("tc", "from-endpoint", "forwarded"));
}

#[test]
fn a_source_the_pod_does_not_own_is_dropped() {
    let f = fixture(MODE_VXLAN);
    // The peer's address, sent from the pod's veth.
    let input = ping(POD_MAC, HOST_MAC, PEER, POD, 64, 56, true);
    let (rc, out) = f.tc("lxc_from_ctr", f.pod_if, &input);
    assert_eq!((rc, out), (TC_ACT_SHOT, input));
    assert_eq!(f.counted(), one("tc", "from-endpoint", "source_spoofed"));
}

#[test]
fn destinations_go_where_the_ipcache_says() {
    let f = fixture(MODE_VXLAN);
    // In the cluster range, no pod: dropped, never to the underlay.
    let input = ping(POD_MAC, HOST_MAC, POD, [10, 244, 200, 5], 64, 56, true);
    assert_eq!(f.tc("lxc_from_ctr", f.pod_if, &input).0, TC_ACT_SHOT);
    // Outside the cluster: the host stack, untouched.
    let input = ping(POD_MAC, HOST_MAC, POD, [192, 0, 2, 1], 64, 56, true);
    assert_eq!(f.tc("lxc_from_ctr", f.pod_if, &input), (TC_ACT_OK, input));
    // Another node's pod, and another node itself: into the tunnel, one hop.
    for dst in [REMOTE_POD, REMOTE_NODE] {
        let input = ping(POD_MAC, HOST_MAC, POD, dst, 64, 56, true);
        let (rc, out) = f.tc("lxc_from_ctr", f.pod_if, &input);
        assert_eq!(rc, TC_ACT_REDIRECT, "to {dst:?}");
        assert_eq!(out, ping(POD_MAC, HOST_MAC, POD, dst, 63, 56, true));
    }
    // This node's own address: the stack.
    let input = ping(POD_MAC, HOST_MAC, POD, NODE, 64, 56, true);
    assert_eq!(f.tc("lxc_from_ctr", f.pod_if, &input), (TC_ACT_OK, input));
    let c = f.counted();
    assert!(
        c.contains(&(
            "tc".into(),
            "from-endpoint".into(),
            "unknown_destination".into(),
            1
        )),
        "{c:?}"
    );
    assert!(
        c.contains(&("tc".into(), "from-endpoint".into(), "forwarded".into(), 4)),
        "{c:?}"
    );
}

#[test]
fn native_mode_leaves_other_nodes_to_the_stack() {
    let f = fixture(MODE_NATIVE);
    for dst in [REMOTE_POD, REMOTE_NODE] {
        let input = ping(POD_MAC, HOST_MAC, POD, dst, 64, 56, true);
        assert_eq!(f.tc("lxc_from_ctr", f.pod_if, &input), (TC_ACT_OK, input));
    }
}

#[test]
fn ttl_1_is_answered_with_time_exceeded_from_the_node() {
    let f = fixture(MODE_VXLAN);
    for dst in [PEER, REMOTE_POD] {
        let input = ping(POD_MAC, HOST_MAC, POD, dst, 1, 56, true);
        let (rc, out) = f.tc("lxc_from_ctr", f.pod_if, &input);
        assert_eq!(rc, TC_ACT_REDIRECT, "back out of the pod's veth");
        let expect = icmp_error(
            POD_MAC,
            HOST_MAC,
            POD,
            Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit),
            &input,
        );
        assert_eq!(out, expect, "to {dst:?}");
    }
    assert_eq!(
        f.counted(),
        vec![(
            "tc".into(),
            "from-endpoint".into(),
            "ttl_exceeded".into(),
            2
        )]
    );
}

#[test]
fn an_icmp_error_is_never_answered_with_one() {
    let f = fixture(MODE_VXLAN);
    let inner = ping(POD_MAC, HOST_MAC, PEER, POD, 64, 0, true);
    let mut input = Vec::new();
    PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
        .ip(IpHeaders::Ipv4(
            ipv4_header(POD, PEER, 1, IpNumber::ICMP, 8 + 28, false),
            Default::default(),
        ))
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut input, &inner[14..42])
        .expect("build");
    let (rc, out) = f.tc("lxc_from_ctr", f.pod_if, &input);
    assert_eq!((rc, out), (TC_ACT_SHOT, input));
    assert_eq!(f.counted(), one("tc", "from-endpoint", "ttl_exceeded"));
}

#[test]
fn df_packets_too_big_for_the_tunnel_get_frag_needed_with_its_mtu() {
    let f = fixture(MODE_VXLAN);
    // 1500 bytes of IP: 50 more than the tunnel carries.
    let input = ping(POD_MAC, HOST_MAC, POD, REMOTE_POD, 64, 1472, true);
    let (rc, out) = f.tc("lxc_from_ctr", f.pod_if, &input);
    assert_eq!(rc, TC_ACT_REDIRECT);
    let expect = icmp_error(
        POD_MAC,
        HOST_MAC,
        POD,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: TUNNEL_MTU as u16,
        }),
        &input,
    );
    assert_eq!(out, expect);
    // Exactly the tunnel's MTU fits.
    let input = ping(POD_MAC, HOST_MAC, POD, REMOTE_POD, 64, 1422, true);
    assert_eq!(f.tc("lxc_from_ctr", f.pod_if, &input).0, TC_ACT_REDIRECT);
    // Too big without DF: the stack fragments it.
    let input = ping(POD_MAC, HOST_MAC, POD, REMOTE_POD, 64, 1472, false);
    assert_eq!(f.tc("lxc_from_ctr", f.pod_if, &input), (TC_ACT_OK, input));
    let c = f.counted();
    assert!(
        c.contains(&("tc".into(), "from-endpoint".into(), "frag_needed".into(), 1)),
        "{c:?}"
    );
}

#[test]
fn the_gateway_answers_arp_with_the_veth_mac() {
    let f = fixture(MODE_VXLAN);
    let request = arp(1, POD_MAC, POD, [0; 6], GATEWAY, [0xff; 6]);
    let (rc, out) = f.tc("lxc_from_ctr", f.pod_if, &request);
    assert_eq!(rc, TC_ACT_REDIRECT);
    // Addressed to the pod, from the veth: "169.254.1.1 is at HOST_MAC".
    assert_eq!(out, arp(2, HOST_MAC, GATEWAY, POD_MAC, POD, POD_MAC));
    // Asked from an address that is not this veth's pod: refused.
    let spoofed = arp(1, POD_MAC, PEER, [0; 6], GATEWAY, [0xff; 6]);
    assert_eq!(
        f.tc("lxc_from_ctr", f.pod_if, &spoofed),
        (TC_ACT_SHOT, spoofed)
    );
    // Other ARP goes to the host.
    let other = arp(1, POD_MAC, POD, [0; 6], PEER, [0xff; 6]);
    assert_eq!(f.tc("lxc_from_ctr", f.pod_if, &other), (TC_ACT_OK, other));
}

#[test]
fn ipv6_link_local_passes_and_the_rest_is_named() {
    let f = fixture(MODE_VXLAN);
    let v6 = |src: [u8; 16], dst: [u8; 16]| {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
            .ipv6(src, dst, 255)
            .icmpv6_echo_request(1, 1)
            .write(&mut out, &[0; 8])
            .expect("build");
        out
    };
    let ll: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let all_nodes: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let global: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
    let input = v6(ll, all_nodes);
    assert_eq!(f.tc("lxc_from_ctr", f.pod_if, &input), (TC_ACT_OK, input));
    let input = v6(global, all_nodes);
    assert_eq!(f.tc("lxc_from_ctr", f.pod_if, &input).0, TC_ACT_SHOT);
    // An address the pod owns: not spoofed, but not routed yet.
    let mut eps = EndpointMap::open(&f.pin_dir).expect("endpoints");
    let mut info = EndpointInfo {
        ifindex: f.pod_if,
        flags: EP_F_LOCAL,
        ..Default::default()
    };
    info.mac = POD_MAC;
    eps.put(&EndpointKey::v6(global), &info)
        .expect("v6 endpoint");
    assert_eq!(f.tc("lxc_from_ctr", f.pod_if, &input).0, TC_ACT_SHOT);
    let c = f.counted();
    for reason in ["forwarded", "source_spoofed", "ipv6_unsupported"] {
        assert!(
            c.contains(&("tc".into(), "from-endpoint".into(), reason.into(), 1)),
            "{reason}: {c:?}"
        );
    }
    // Other L3 protocols from a pod are refused by name.
    let mut frame = ping(POD_MAC, HOST_MAC, POD, PEER, 64, 0, true);
    frame[12..14].copy_from_slice(&0x8847u16.to_be_bytes());
    assert_eq!(f.tc("lxc_from_ctr", f.pod_if, &frame).0, TC_ACT_SHOT);
    assert!(f.counted().contains(&(
        "tc".into(),
        "from-endpoint".into(),
        "unsupported_l3".into(),
        1
    )));
}

#[test]
fn the_uplink_delivers_to_pods_and_drops_unknown_ones() {
    let f = fixture(MODE_NATIVE);
    let from = [0x02, 0, 0, 0, 0, 0x12];
    let to = [0x02, 0, 0, 0, 0, 0x11];
    let input = ping(from, to, REMOTE_POD, POD, 63, 56, true);
    let (rc, out) = f.tc("host_in", f.uplink_if, &input);
    assert_eq!(rc, TC_ACT_REDIRECT);
    assert_eq!(out, ping(HOST_MAC, POD_MAC, REMOTE_POD, POD, 62, 56, true));
    let input = ping(from, to, REMOTE_POD, [10, 244, 0, 200], 63, 56, true);
    assert_eq!(f.tc("host_in", f.uplink_if, &input), (TC_ACT_SHOT, input));
    let input = ping(from, to, REMOTE_NODE, NODE, 64, 56, true);
    assert_eq!(f.tc("host_in", f.uplink_if, &input), (TC_ACT_OK, input));
    // TTL 1 from the network: answered toward the source (out of the uplink).
    let input = ping(from, to, REMOTE_POD, POD, 1, 56, true);
    assert_eq!(f.tc("host_in", f.uplink_if, &input).0, TC_ACT_REDIRECT);
    let c = f.counted();
    for (reason, n) in [
        ("forwarded", 2),
        ("unknown_destination", 1),
        ("ttl_exceeded", 1),
    ] {
        assert!(
            c.contains(&("tc".into(), "from-network".into(), reason.into(), n)),
            "{reason}: {c:?}"
        );
    }
}

#[test]
fn the_tunnel_trusts_only_packets_with_a_tunnel_key() {
    let f = fixture(MODE_VXLAN);
    // No VXLAN metadata at all (not from the tunnel device's decap).
    let input = ping(PEER_MAC, HOST_MAC, REMOTE_POD, POD, 64, 56, true);
    assert_eq!(
        f.tc("overlay_in", f.tunnel_if, &input),
        (TC_ACT_SHOT, input)
    );
    assert_eq!(
        f.counted(),
        one("tc", "from-network", "unknown_tunnel_peer")
    );
}

#[test]
fn the_stack_into_the_tunnel_needs_a_node() {
    let f = fixture(MODE_VXLAN);
    let input = ping(HOST_MAC, PEER_MAC, NODE, REMOTE_POD, 64, 56, true);
    assert_eq!(f.tc("overlay_out", f.tunnel_if, &input), (TC_ACT_OK, input));
    let input = ping(HOST_MAC, PEER_MAC, NODE, [10, 244, 9, 9], 64, 56, true);
    assert_eq!(
        f.tc("overlay_out", f.tunnel_if, &input),
        (TC_ACT_SHOT, input)
    );
    let c = f.counted();
    assert!(
        c.contains(&(
            "tc".into(),
            "to-network".into(),
            "unknown_destination".into(),
            1
        )),
        "{c:?}"
    );
}

#[test]
fn xdp_on_the_uplink_counts_and_passes() {
    let f = fixture(MODE_VXLAN);
    let p: &Xdp = f.program("host_xdp").try_into().expect("xdp");
    let input = ping([2; 6], [4; 6], REMOTE_NODE, NODE, 64, 56, true);
    let mut out = vec![0u8; input.len()];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(&input),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("test run");
    assert_eq!(r.return_value, XDP_PASS);
    assert_eq!(out, input);
    assert_eq!(f.counted(), one("xdp", "from-network", "forwarded"));
}
