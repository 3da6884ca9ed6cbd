//! Golden packets: each case sets up the maps, runs one program on one
//! packet through `BPF_PROG_TEST_RUN`, and checks the verdict, the packet
//! that comes out (byte for byte) and the counter it was booked under.
//! Katran's test fixtures and Cilium's bpf/tests are the model.
//!
//! Needs root (BPF, bpffs). Each test runs in a network namespace of its
//! own (unshared by its thread), where stand-in devices give the programs
//! real interface indexes and MTUs.

mod common;

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use common::*;
use dataplane::maps::{Table as _, endpoints::EndpointMap};
use dataplane_common::{EP_F_LOCAL, EndpointInfo, EndpointKey, MODE_NATIVE, MODE_VXLAN, PROGRAMS};
use etherparse::{Icmpv4Type, IpHeaders, IpNumber, PacketBuilder, icmpv4::DestUnreachableHeader};

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

/// The prefilter: a source in a denied prefix is dropped in XDP (and in tc
/// when XDP is off), counted under `prefilter_denied` and on its prefix;
/// other sources pass; removing the prefix lets the same packet through.
#[test]
fn the_prefilter_drops_denied_sources_in_xdp_and_in_tc() {
    use dataplane::maps::prefilter::{PrefilterMap, PrefilterRow, parse_cidr};
    let f = fixture(MODE_VXLAN);
    let p: &Xdp = f.program("host_xdp").try_into().expect("xdp");
    let mut pf = PrefilterMap::open(&f.pin_dir).expect("prefilter map");
    let set = |cidrs: &[&str]| cidrs.iter().map(|c| parse_cidr(c).expect("cidr")).collect();
    pf.set(&set(&["198.51.100.0/24", "203.0.113.9"]))
        .expect("set");
    let from = |src: [u8; 4]| {
        tcp(
            ([2; 6], [4; 6]),
            (src, 40_000),
            (NODE, 30_080),
            64,
            true,
            &[],
            &[],
        )
    };
    let xdp = |packet: &[u8]| {
        p.test_run(TestRunOptions {
            data_in: Some(packet),
            ..Default::default()
        })
        .expect("test run")
        .return_value
    };
    assert_eq!(xdp(&from([198, 51, 100, 7])), XDP_DROP);
    assert_eq!(xdp(&from([198, 51, 100, 250])), XDP_DROP);
    assert_eq!(xdp(&from([203, 0, 113, 9])), XDP_DROP);
    assert_eq!(xdp(&from([203, 0, 113, 10])), XDP_PASS, "only the /32");
    assert_eq!(xdp(&from([198, 51, 101, 7])), XDP_PASS, "outside the /24");
    // Cut short of the source address: XDP cannot judge it and passes it
    // on (tc counts it as malformed); counted as forwarded here.
    let cut = &from([198, 51, 100, 7])[..14 + 14];
    assert_eq!(xdp(cut), XDP_PASS, "a truncated frame is left to tc");
    let mut c = f.counted();
    c.sort();
    assert_eq!(
        c,
        vec![
            ("xdp".into(), "from-network".into(), "forwarded".into(), 3),
            (
                "xdp".into(),
                "from-network".into(),
                "prefilter_denied".into(),
                3
            ),
        ]
    );
    assert_eq!(
        pf.rows().expect("rows"),
        vec![
            PrefilterRow {
                cidr: "198.51.100.0/24".into(),
                packets: 2
            },
            PrefilterRow {
                cidr: "203.0.113.9/32".into(),
                packets: 1
            },
        ]
    );
    // With XDP off, tc on the uplink drops them.
    let (verdict, _) = f.tc("host_in", f.uplink_if, &from([198, 51, 100, 7]));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert!(
        f.counted().contains(&(
            "tc".into(),
            "from-network".into(),
            "prefilter_denied".into(),
            1
        )),
        "{:?}",
        f.counted()
    );
    // Removed, the same source passes; the prefix that stays keeps its count.
    pf.set(&set(&["203.0.113.9"])).expect("set");
    assert_eq!(xdp(&from([198, 51, 100, 7])), XDP_PASS);
    assert_eq!(
        pf.rows().expect("rows"),
        vec![PrefilterRow {
            cidr: "203.0.113.9/32".into(),
            packets: 1
        }]
    );
}

/// The prefilter's cost per packet in XDP (TEST_RUN clock): a source that
/// passes and one that is dropped, with 10,000 denied prefixes, against
/// the same program with none.
#[test]
#[ignore = "a benchmark: cargo xtask bench"]
fn bench_prefilter_per_packet() {
    use dataplane::maps::prefilter::PrefilterMap;
    let f = fixture(MODE_VXLAN);
    let p: &Xdp = f.program("host_xdp").try_into().expect("xdp");
    let from = |src: [u8; 4]| {
        tcp(
            ([2; 6], [4; 6]),
            (src, 40_000),
            (NODE, 30_080),
            64,
            true,
            &[],
            &[],
        )
    };
    let run = |packet: &[u8], want: u32| {
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(packet),
                repeat: 200_000,
                ..Default::default()
            })
            .expect("test run");
        assert_eq!(r.return_value, want);
        r.duration.as_nanos() as f64
    };
    let best =
        |packet: &[u8], want: u32| (0..5).map(|_| run(packet, want)).fold(f64::MAX, f64::min);
    let empty = best(&from([198, 51, 101, 7]), XDP_PASS);
    let prefixes: std::collections::BTreeSet<ipnetwork::IpNetwork> = (0..10_000u32)
        .map(|i| {
            let a = u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0)) + i * 4;
            ipnetwork::IpNetwork::new(std::net::Ipv4Addr::from(a).into(), 30).expect("prefix")
        })
        .chain(std::iter::once("198.51.100.0/24".parse().expect("prefix")))
        .collect();
    PrefilterMap::open(&f.pin_dir)
        .expect("map")
        .set(&prefixes)
        .expect("set");
    let passed = best(&from([198, 51, 101, 7]), XDP_PASS);
    let dropped = best(&from([198, 51, 100, 7]), XDP_DROP);
    println!("BENCH prefilter empty_ns={empty:.1} passed_ns={passed:.1} dropped_ns={dropped:.1}");
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
