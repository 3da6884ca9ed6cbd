//! Golden packets for NetworkPolicy: a policy compiled by the agent's own
//! compiler and written by its own map code, then a table of packets, each
//! {what, program, device, input, expected verdict, the counter it lands
//! under}, run in order through `BPF_PROG_TEST_RUN` (a reply after its
//! request, as real traffic goes).

mod common;

use std::net::Ipv4Addr;

use common::*;
use dataplane::{
    cluster::{Key, Kind},
    maps::{
        Table as _,
        endpoints::EndpointMap,
        policy::{PolicyCidrMap, PolicyMap, sync_endpoint},
    },
    policy::{LabelSet, Labels, PodView, Policy, compile},
};
use dataplane_common::{
    EP_F_LOCAL, EndpointInfo, EndpointKey, IPPROTO_TCP, MODE_NATIVE, MODE_VXLAN,
};
use serde_json::json;

const OUTSIDE: [u8; 4] = [198, 51, 100, 7];
const EXT: [u8; 4] = [172, 20, 0, 100];
const WEB_ID: u32 = 1000;
const CLIENT_ID: u32 = 2000;
const OTHER_ID: u32 = 3000;

fn labels(app: &str) -> Labels {
    [("app".to_string(), app.to_string())].into()
}

fn set(app: &str) -> LabelSet {
    LabelSet {
        namespace: "default".into(),
        namespace_labels: Labels::new(),
        labels: labels(app),
    }
}

/// The web pod (POD) under a policy: ingress from the client (PEER) on
/// its named port, from the other pod (REMOTE_POD) on a port range, from
/// the underlay but the other node on UDP 53; egress only to
/// 198.51.100.0/24 on 443.
fn install(f: &Fixture) {
    install_spec(
        f,
        json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": "http"}]},
                {"from": [{"podSelector": {"matchLabels": {"app": "other"}}}], "ports": [{"port": 1000, "endPort": 2000}]},
                {"from": [{"ipBlock": {"cidr": "172.20.0.0/24", "except": ["172.20.0.12/32"]}}],
                 "ports": [{"port": 53, "protocol": "UDP"}]}
            ],
            "egress": [{"to": [{"ipBlock": {"cidr": "198.51.100.0/24"}}], "ports": [{"port": 443}]}]
        }),
    );
}

/// The web pod under the policy `spec` (the client and the other pod as
/// its peers).
fn install_spec(f: &Fixture, spec: serde_json::Value) {
    let mut eps = EndpointMap::open(&f.pin_dir).expect("endpoints");
    for (ip, ifindex, id, flags) in [
        (POD, f.pod_if, WEB_ID, EP_F_LOCAL),
        (PEER, f.peer_if, CLIENT_ID, EP_F_LOCAL),
        (REMOTE_POD, 0, OTHER_ID, 0),
    ] {
        let mut e = eps
            .read(&[EndpointKey::v4(ip)])
            .expect("read")
            .into_values()
            .next()
            .unwrap_or(EndpointInfo {
                flags,
                ..Default::default()
            });
        e.ifindex = ifindex;
        e.identity = id;
        eps.put(&EndpointKey::v4(ip), &e).expect("endpoint");
    }
    let spec = serde_json::from_value(spec).expect("spec");
    let key = Key {
        kind: Kind::NetworkPolicy,
        namespace: "default".into(),
        name: "web".into(),
    };
    let policy = Policy::parse(&key, &spec).expect("valid policy");
    let (web, client, other) = (set("web"), set("client"), set("other"));
    let web_ports = vec![("http".to_string(), IPPROTO_TCP, 80)];
    let pods = vec![
        PodView {
            identity: WEB_ID,
            set: &web,
            ips: vec![Ipv4Addr::from(POD)],
            ports: &web_ports,
        },
        PodView {
            identity: CLIENT_ID,
            set: &client,
            ips: vec![Ipv4Addr::from(PEER)],
            ports: &[],
        },
        PodView {
            identity: OTHER_ID,
            set: &other,
            ips: vec![Ipv4Addr::from(REMOTE_POD)],
            ports: &[],
        },
    ];
    let compiled = compile(&pods[0], [(7, "default", &policy)], &pods);
    let mut rules = PolicyMap::open(&f.pin_dir).expect("dp_policy");
    let mut cidrs = PolicyCidrMap::open(&f.pin_dir).expect("dp_policy_cidr");
    let stats =
        sync_endpoint(&mut rules, &mut cidrs, f.pod_if, &compiled, (&[], &[])).expect("write");
    assert!(stats.added > 0);
}

struct Case {
    what: &'static str,
    prog: &'static str,
    ifindex: u32,
    input: Vec<u8>,
    verdict: u32,
    /// (direction, reason) the packet is counted under at tc.
    counted: (&'static str, &'static str),
}

fn run(f: &Fixture, cases: Vec<Case>) {
    for c in cases {
        let before = f.counted();
        let (rc, out) = f.tc(c.prog, c.ifindex, &c.input);
        assert_eq!(rc, c.verdict, "{}: verdict", c.what);
        if rc == TC_ACT_SHOT {
            assert_eq!(
                out, c.input,
                "{}: a dropped packet is not rewritten",
                c.what
            );
        }
        let after = f.counted();
        let n = |rows: &Vec<(String, String, String, u64)>| {
            rows.iter()
                .find(|r| {
                    (r.0.as_str(), r.1.as_str(), r.2.as_str()) == ("tc", c.counted.0, c.counted.1)
                })
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

#[test]
fn pod_traffic_is_judged_by_identity_port_and_direction_and_replies_pass() {
    let f = fixture(MODE_VXLAN);
    install(&f);
    let (p, w) = (f.peer_if, f.pod_if);
    let to_pod = |src: ([u8; 4], u16), port: u16, syn: bool| {
        tcp(
            (PEER_MAC, PEER_HOST_MAC),
            src,
            (POD, port),
            64,
            syn,
            &[],
            b"",
        )
    };
    let from_pod = |dst: ([u8; 4], u16), sport: u16, syn: bool| {
        tcp((POD_MAC, HOST_MAC), (POD, sport), dst, 64, syn, &[], b"")
    };
    run(
        &f,
        vec![
            Case {
                what: "the client reaches the web pod's named port (http = 80)",
                prog: "lxc_from_ctr",
                ifindex: p,
                input: to_pod((PEER, 40000), 80, true),
                verdict: TC_ACT_REDIRECT,
                counted: ("from-endpoint", "forwarded"),
            },
            Case {
                what: "a truncated TCP header is dropped as malformed, never judged",
                prog: "lxc_from_ctr",
                ifindex: p,
                input: truncate_l4(to_pod((PEER, 40002), 80, true), 12),
                verdict: TC_ACT_SHOT,
                counted: ("from-endpoint", "l4_malformed"),
            },
            Case {
                what: "another port of the web pod is denied",
                prog: "lxc_from_ctr",
                ifindex: p,
                input: to_pod((PEER, 40001), 81, true),
                verdict: TC_ACT_SHOT,
                counted: ("from-endpoint", "policy_denied"),
            },
            Case {
                what: "the web pod's reply passes its egress isolation",
                prog: "lxc_from_ctr",
                ifindex: w,
                input: from_pod((PEER, 40000), 80, false),
                verdict: TC_ACT_REDIRECT,
                counted: ("from-endpoint", "forwarded"),
            },
            Case {
                what: "a new flow from the web pod to the client is denied",
                prog: "lxc_from_ctr",
                ifindex: w,
                input: from_pod((PEER, 9999), 41000, true),
                verdict: TC_ACT_SHOT,
                counted: ("from-endpoint", "policy_denied"),
            },
            Case {
                what: "egress to the allowed block on 443 goes out",
                prog: "lxc_from_ctr",
                ifindex: w,
                input: from_pod((OUTSIDE, 443), 41001, true),
                verdict: TC_ACT_OK,
                counted: ("from-endpoint", "forwarded"),
            },
            Case {
                what: "egress to the block on another port is denied",
                prog: "lxc_from_ctr",
                ifindex: w,
                input: from_pod((OUTSIDE, 80), 41002, true),
                verdict: TC_ACT_SHOT,
                counted: ("from-endpoint", "policy_denied"),
            },
            Case {
                what: "the node itself always reaches the pod (kubelet probes)",
                prog: "lxc_to_ctr",
                ifindex: w,
                input: tcp(
                    (HOST_MAC, POD_MAC),
                    (NODE, 50000),
                    (POD, 8080),
                    64,
                    true,
                    &[],
                    b"",
                ),
                verdict: TC_ACT_OK,
                counted: ("to-endpoint", "forwarded"),
            },
            Case {
                what: "the stack delivering from outside is judged too",
                prog: "lxc_to_ctr",
                ifindex: w,
                input: tcp(
                    (HOST_MAC, POD_MAC),
                    (OUTSIDE, 50000),
                    (POD, 8080),
                    64,
                    true,
                    &[],
                    b"",
                ),
                verdict: TC_ACT_SHOT,
                counted: ("to-endpoint", "policy_denied"),
            },
        ],
    );
}

/// Under ingress isolation only, the pod's egress is tracked (its own
/// connections' replies must pass): a reply going out that way renews the
/// connection's entry and adds none.
#[test]
fn one_conntrack_entry_per_allowed_connection() {
    use dataplane::maps::ct::CtMap;
    let f = fixture(MODE_VXLAN);
    install_spec(
        &f,
        json!({"podSelector": {"matchLabels": {"app": "web"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 80}]}]}),
    );
    let ct = CtMap::open(&f.pin_dir).expect("dp_ct");
    let request = tcp(
        (PEER_MAC, PEER_HOST_MAC),
        (PEER, 40000),
        (POD, 80),
        64,
        true,
        &[],
        b"",
    );
    let reply = tcp(
        (POD_MAC, HOST_MAC),
        (POD, 80),
        (PEER, 40000),
        64,
        false,
        &[],
        b"",
    );
    assert_eq!(f.tc("lxc_from_ctr", f.peer_if, &request).0, TC_ACT_REDIRECT);
    assert_eq!(ct.count().expect("count"), 1, "the request's entry");
    for _ in 0..3 {
        assert_eq!(f.tc("lxc_from_ctr", f.pod_if, &reply).0, TC_ACT_REDIRECT);
        assert_eq!(f.tc("lxc_from_ctr", f.peer_if, &request).0, TC_ACT_REDIRECT);
    }
    assert_eq!(
        ct.count().expect("count"),
        1,
        "replies renew the entry, add none: {:?}",
        ct.entries().expect("entries")
    );
    // The pod's own connection out (egress tracked) gets the one entry its
    // replies need, and they pass its ingress isolation.
    let out = tcp(
        (POD_MAC, HOST_MAC),
        (POD, 41000),
        (PEER, 9090),
        64,
        true,
        &[],
        b"",
    );
    let back = tcp(
        (PEER_MAC, PEER_HOST_MAC),
        (PEER, 9090),
        (POD, 41000),
        64,
        false,
        &[],
        b"",
    );
    assert_eq!(f.tc("lxc_from_ctr", f.pod_if, &out).0, TC_ACT_REDIRECT);
    assert_eq!(f.tc("lxc_from_ctr", f.peer_if, &back).0, TC_ACT_REDIRECT);
    assert_eq!(ct.count().expect("count"), 2);
}

#[test]
fn remote_and_outside_peers_by_address_port_range_and_ip_block() {
    let f = fixture(MODE_NATIVE);
    install(&f);
    let u = f.uplink_if;
    let macs = ([0x02, 0, 0, 0, 0, 0x0c], [0x02, 0, 0, 0, 0, 0x0b]);
    run(
        &f,
        vec![
            Case {
                what: "the other pod (another node) inside the port range",
                prog: "host_in",
                ifindex: u,
                input: tcp(macs, (REMOTE_POD, 50000), (POD, 1500), 63, true, &[], b""),
                verdict: TC_ACT_REDIRECT,
                counted: ("from-network", "forwarded"),
            },
            Case {
                what: "the range ends at endPort",
                prog: "host_in",
                ifindex: u,
                input: tcp(macs, (REMOTE_POD, 50001), (POD, 2001), 63, true, &[], b""),
                verdict: TC_ACT_SHOT,
                counted: ("from-network", "policy_denied"),
            },
            Case {
                what: "an address in the ipBlock, on UDP 53",
                prog: "host_in",
                ifindex: u,
                input: udp(macs, (EXT, 5353), (POD, 53), 63, b"q"),
                verdict: TC_ACT_REDIRECT,
                counted: ("from-network", "forwarded"),
            },
            Case {
                what: "the same address on TCP 53: the rule is UDP",
                prog: "host_in",
                ifindex: u,
                input: tcp(macs, (EXT, 5353), (POD, 53), 63, true, &[], b""),
                verdict: TC_ACT_SHOT,
                counted: ("from-network", "policy_denied"),
            },
            Case {
                what: "the except carves the other node out of the block",
                prog: "host_in",
                ifindex: u,
                input: udp(macs, (REMOTE_NODE, 5353), (POD, 53), 63, b"q"),
                verdict: TC_ACT_SHOT,
                counted: ("from-network", "policy_denied"),
            },
            Case {
                what: "an unnamed pod identity gets nothing",
                prog: "host_in",
                ifindex: u,
                input: tcp(
                    macs,
                    ([10, 244, 1, 99], 50002),
                    (POD, 1500),
                    63,
                    true,
                    &[],
                    b"",
                ),
                verdict: TC_ACT_SHOT,
                counted: ("from-network", "policy_denied"),
            },
        ],
    );
}

/// Per-packet cost of the policy lookup through `BPF_PROG_TEST_RUN`
/// (`cargo xtask bench policy` runs it in release): a peer's established
/// flow to the pod, allowed by identity (one lookup), allowed by ipBlock
/// (three lookups) and denied (three lookups and the reply check), with
/// 1, 100 and 10,000 rules on the pod, each timed alternately with the
/// same flow to a third pod on this node that no policy selects.
#[test]
#[ignore = "a benchmark: cargo xtask bench policy"]
fn bench_policy_lookup_per_packet() {
    use dataplane::policy::{Allow, Compiled, Dir, PeerId};
    use dataplane_common::{EndpointInfo, EndpointKey};

    const OPEN: [u8; 4] = [10, 244, 0, 12];
    let f = fixture(MODE_VXLAN);
    sh(&[
        "ip", "link", "add", "gopen", "type", "veth", "peer", "name", "gopenp",
    ]);
    sh(&["ip", "link", "set", "gopen", "up"]);
    sh(&["ip", "link", "set", "gopenp", "up"]);
    let open_if = dataplane::sys::ifindex("gopen").expect("ifindex");
    let mut eps = EndpointMap::open(&f.pin_dir).expect("endpoints");
    for (ip, id) in [(POD, WEB_ID), (PEER, CLIENT_ID)] {
        let k = EndpointKey::v4(ip);
        let mut e: EndpointInfo = eps.read(&[k]).expect("read")[&k];
        e.identity = id;
        eps.put(&k, &e).expect("endpoint");
    }
    eps.put(
        &EndpointKey::v4(OPEN),
        &EndpointInfo {
            ifindex: open_if,
            identity: OTHER_ID,
            mac: [0x0a, 0, 0, 0, 0, 0x03],
            host_mac: [0xee, 0, 0, 0, 0, 0x03],
            flags: EP_F_LOCAL,
            _pad: 0,
        },
    )
    .expect("open pod");
    let time = |packet: &[u8], repeat: u32, verdict: u32| {
        f.timed("lxc_from_ctr", f.peer_if, packet, repeat, verdict)
    };
    // From the peer; TTL 255 leaves room for the repeats.
    let from_peer = |to: [u8; 4], port: u16| {
        tcp(
            (PEER_MAC, PEER_HOST_MAC),
            (PEER, 40000),
            (to, port),
            255,
            false,
            &[],
            b"x",
        )
    };
    let (by_id, by_block, denied) = (
        from_peer(POD, 80),
        from_peer(POD, 8443),
        from_peer(POD, 9999),
    );
    let unpoliced = from_peer(OPEN, 80);
    // Alternated with the unpoliced flow, medians of the calls: the
    // machine's drift and its hiccups cancel out.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let pair = |packet: &[u8], verdict: u32| -> (f64, f64) {
        time(packet, 1, verdict);
        time(&unpoliced, 1, TC_ACT_REDIRECT);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..400 {
            a.push(time(packet, 250, verdict));
            b.push(time(&unpoliced, 250, TC_ACT_REDIRECT));
        }
        (median(a), median(b))
    };
    let mut rules = PolicyMap::open(&f.pin_dir).expect("dp_policy");
    let mut cidrs = PolicyCidrMap::open(&f.pin_dir).expect("dp_policy_cidr");
    let mut old = (Vec::new(), Vec::new());
    let mut line = String::from("BENCH policy-lookup");
    for n in [1u32, 100, 10_000] {
        // The pod's ingress: the client's identity on 80, the client's
        // address (an ipBlock) on 8443, and n - 1 other identities on 80.
        let mut c = Compiled {
            ingress_isolated: true,
            ..Default::default()
        };
        let allow = |peer, port| Allow {
            dir: Dir::Ingress,
            peer,
            proto: Some(IPPROTO_TCP),
            ports: Some((port, 16)),
        };
        c.allows.insert(allow(PeerId::Identity(CLIENT_ID), 80), 1);
        c.allows.insert(allow(PeerId::Class(1), 8443), 2);
        c.classes.insert(
            (
                Dir::Ingress,
                ipnetwork::Ipv4Network::new(Ipv4Addr::from(PEER), 32).expect("net"),
            ),
            1,
        );
        for i in 1..n {
            c.allows.insert(allow(PeerId::Identity(10_000 + i), 80), 3);
        }
        sync_endpoint(&mut rules, &mut cidrs, f.pod_if, &c, (&old.0, &old.1)).expect("write");
        let (r, cl) = dataplane::maps::policy::desired(f.pod_if, &c);
        old = (r.into_keys().collect(), cl.into_keys().collect());
        assert_eq!(
            rules.read_all().expect("read").len(),
            n as usize + 3,
            "n allows, the ipBlock allow and two markers"
        );
        let (id, base1) = pair(&by_id, TC_ACT_REDIRECT);
        let (block, base2) = pair(&by_block, TC_ACT_REDIRECT);
        let (deny, base3) = pair(&denied, TC_ACT_SHOT);
        line += &format!(
            " identity_{n}={id:.1} block_{n}={block:.1} denied_{n}={deny:.1} none_{n}={:.1}",
            (base1 + base2 + base3) / 3.0
        );
    }
    println!("{line}");
}

/// Verdicts as events: a denial always (by default deny), an allow for a
/// new flow while a monitor asks (naming the policy), nothing for the
/// flow's later packets or for replies.
#[test]
fn verdicts_go_out_as_events_naming_the_policy() {
    use dataplane::maps::events::{EventConfigMap, EventReader};
    use dataplane_common::{EVENT_POLICY, POLICY_DIR_INGRESS, VERDICT_ALLOWED, VERDICT_DENIED};
    use std::time::Duration;
    let f = fixture(MODE_VXLAN);
    install(&f);
    let mut reader = EventReader::open(&f.pin_dir).expect("dp_events");
    let to_pod = |sport: u16, port: u16, syn: bool| {
        tcp(
            (PEER_MAC, PEER_HOST_MAC),
            (PEER, sport),
            (POD, port),
            64,
            syn,
            &[],
            b"",
        )
    };
    // Allowed verdicts are off until a monitor asks.
    assert_eq!(
        f.tc("lxc_from_ctr", f.peer_if, &to_pod(40000, 80, true)).0,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        f.tc("lxc_from_ctr", f.peer_if, &to_pod(40001, 81, true)).0,
        TC_ACT_SHOT
    );
    let events = reader
        .next_batch(16, Duration::from_millis(10))
        .expect("read");
    assert_eq!(events.len(), 1, "only the denial: {events:?}");
    let d = events[0];
    assert_eq!(
        (d.kind, d.verdict, d.policy_dir, d.policy, d.ifindex),
        (
            EVENT_POLICY,
            VERDICT_DENIED,
            POLICY_DIR_INGRESS,
            0,
            f.pod_if
        )
    );
    assert_eq!(
        (
            d.saddr,
            d.daddr,
            u16::from_be_bytes(d.sport),
            u16::from_be_bytes(d.dport)
        ),
        (PEER, POD, 40001, 81)
    );
    assert_eq!((d.src_identity, d.dst_identity), (CLIENT_ID, WEB_ID));
    // What a monitor asking for policy verdicts sets.
    let mut config = EventConfigMap::open(&f.pin_dir).expect("config");
    let mut c = config.get().expect("config");
    c.mask |= dataplane_common::EVENTS_ALLOWED;
    config.set(c).expect("on");
    assert_eq!(
        f.tc("lxc_from_ctr", f.peer_if, &to_pod(40002, 80, true)).0,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        f.tc("lxc_from_ctr", f.peer_if, &to_pod(40002, 80, false)).0,
        TC_ACT_REDIRECT
    );
    let events = reader
        .next_batch(16, Duration::from_millis(10))
        .expect("read");
    assert_eq!(events.len(), 1, "one allow per new flow: {events:?}");
    let a = events[0];
    assert_eq!(
        (a.kind, a.verdict, a.policy, u16::from_be_bytes(a.sport)),
        (EVENT_POLICY, VERDICT_ALLOWED, 7, 40002)
    );
}

/// A flood of denials cannot flood the ring: each CPU emits at most its
/// budget a second; the rest is counted as over the budget.
#[test]
fn a_flood_of_denials_is_emitted_up_to_the_budget_and_counted() {
    use dataplane::maps::events::{EventConfigMap, EventReader, losses};
    use dataplane_common::EventConfig;
    use std::time::Duration;
    // One CPU, one budget (each CPU has its own).
    // SAFETY: a plain CPU set for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
    let f = fixture(MODE_VXLAN);
    install(&f);
    EventConfigMap::open(&f.pin_dir)
        .expect("config")
        .set(EventConfig { mask: 0, rate: 5 })
        .expect("rate");
    let mut reader = EventReader::open(&f.pin_dir).expect("dp_events");
    let before = losses(&f.pin_dir).expect("losses");
    for i in 0..20u16 {
        let denied = tcp(
            (PEER_MAC, PEER_HOST_MAC),
            (PEER, 41000 + i),
            (POD, 81),
            64,
            true,
            &[],
            b"",
        );
        assert_eq!(f.tc("lxc_from_ctr", f.peer_if, &denied).0, TC_ACT_SHOT);
    }
    let events = reader
        .next_batch(64, Duration::from_millis(10))
        .expect("read");
    let after = losses(&f.pin_dir).expect("losses");
    // The runs may straddle a second's boundary: at most two budgets.
    assert!((5..=10).contains(&events.len()), "{} events", events.len());
    assert_eq!(
        after.limited - before.limited,
        20 - events.len() as u64,
        "every event not emitted is counted"
    );
}
