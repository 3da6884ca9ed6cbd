//! Foundation: agent, programs, pinned maps, CLI and lab, proven with real
//! packets. Needs root; run through `cargo xtask test`.

use std::{path::Path, process::Command, time::Duration};

use lab::{Lab, LabSpec, ping};
use serde_json::Value;

const N: u32 = 10;
/// An ICMP echo at tc on a veth: 14 Ethernet + 20 IPv4 + 8 ICMP + 56 payload.
const ECHO_BYTES: u64 = 98;

fn lab(nodes: usize, pods: usize) -> Lab {
    Lab::up(&LabSpec::new(nodes, pods).expect("lab spec")).expect("lab up")
}

/// (packets, bytes) for one endpoint and direction from `dp_ep_metrics`.
fn ep_counter(rows: &[Value], ifindex: u64, direction: &str) -> (u64, u64) {
    rows.iter()
        .find(|r| r["ifindex"] == ifindex && r["direction"] == direction)
        .map(|r| {
            (
                r["packets"].as_u64().unwrap_or(0),
                r["bytes"].as_u64().unwrap_or(0),
            )
        })
        .unwrap_or((0, 0))
}

fn ifindex_of(lab: &Lab, pod: &str) -> u64 {
    let p = lab.pod(pod);
    let rows = lab.dump(p.node, "dp_endpoints").expect("dump endpoints");
    rows.iter()
        .find(|r| r["ip"] == p.ip.to_string())
        .and_then(|r| r["ifindex"].as_u64())
        .unwrap_or_else(|| panic!("{} ({}) not in dp_endpoints: {rows:?}", pod, p.ip))
}

fn metric(rows: &[Value], direction: &str, reason: &str) -> u64 {
    rows.iter()
        .find(|r| r["hook"] == "tc" && r["direction"] == direction && r["reason"] == reason)
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or(0)
}

#[test]
fn pod_to_pod_on_one_node_counters_are_exact() {
    let lab = lab(1, 2);
    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-0-1").clone());
    let (ia, ib) = (ifindex_of(&lab, "pod-0-0"), ifindex_of(&lab, "pod-0-1"));

    let p = ping(&a.netns, &b.ip.to_string(), N, &[]).expect("ping");
    assert_eq!(
        p,
        lab::Ping {
            transmitted: u64::from(N),
            received: u64::from(N)
        }
    );

    let rows = lab.dump(0, "dp_ep_metrics").expect("dump ep metrics");
    let n = u64::from(N);
    let expect = (n, n * ECHO_BYTES);
    assert_eq!(
        ep_counter(&rows, ia, "from-endpoint"),
        expect,
        "requests sent by a: {rows:?}"
    );
    assert_eq!(
        ep_counter(&rows, ib, "to-endpoint"),
        expect,
        "requests delivered to b: {rows:?}"
    );
    assert_eq!(
        ep_counter(&rows, ib, "from-endpoint"),
        expect,
        "replies sent by b: {rows:?}"
    );
    assert_eq!(
        ep_counter(&rows, ia, "to-endpoint"),
        expect,
        "replies delivered to a: {rows:?}"
    );
    // The endpoint column joins the endpoints map.
    let row = rows.iter().find(|r| r["ifindex"] == ia).expect("row for a");
    assert_eq!(row["ips"], serde_json::json!([a.ip.to_string()]));

    // The kernel's aya-log output reaches the agent's log.
    let log = lab.agent_log(0);
    assert!(
        log.contains(&format!("endpoint ifindex {ia} first packet from-endpoint")),
        "kernel log line missing from agent log:\n{log}"
    );
}

#[test]
fn pod_to_its_node_and_back() {
    let lab = lab(1, 1);
    let pod = lab.pod("pod-0-0").clone();
    let node_ip = lab.state.nodes[0].ip.to_string();
    let p = ping(&pod.netns, &node_ip, N, &[]).expect("ping");
    assert_eq!(p.received, u64::from(N), "pod -> node");
    let p = ping(&lab.state.nodes[0].netns, &pod.ip.to_string(), N, &[]).expect("ping");
    assert_eq!(p.received, u64::from(N), "node -> pod");
    let rows = lab.dump(0, "dp_ep_metrics").expect("dump");
    let i = ifindex_of(&lab, "pod-0-0");
    // pod->node: N requests out, N replies in; node->pod: N requests in, N replies out.
    assert_eq!(ep_counter(&rows, i, "from-endpoint").0, 2 * u64::from(N));
    assert_eq!(ep_counter(&rows, i, "to-endpoint").0, 2 * u64::from(N));
}

#[test]
fn spoofed_source_is_dropped_with_named_reason() {
    let lab = lab(1, 1);
    let pod = lab.pod("pod-0-0").clone();
    let node_ip = lab.state.nodes[0].ip.to_string();
    // An address the agent never assigned to this pod.
    lab.add_pod_address(&pod.name, "10.244.0.250/32")
        .expect("add addr");
    let before = metric(
        &lab.dump(0, "dp_metrics").expect("dump"),
        "from-endpoint",
        "source_spoofed",
    );
    assert_eq!(before, 0);

    let p = ping(&pod.netns, &node_ip, N, &["-I", "10.244.0.250"]).expect("ping");
    assert_eq!(p.received, 0, "spoofed packets must not get through");

    let rows = lab.dump(0, "dp_metrics").expect("dump");
    assert_eq!(
        metric(&rows, "from-endpoint", "source_spoofed"),
        u64::from(N),
        "{rows:?}"
    );
    // Spoofed packets are not counted as the endpoint's traffic.
    let ep = lab.dump(0, "dp_ep_metrics").expect("dump");
    assert_eq!(
        ep_counter(&ep, ifindex_of(&lab, "pod-0-0"), "from-endpoint").0,
        0,
        "{ep:?}"
    );

    // Its own address still works.
    assert_eq!(
        ping(&pod.netns, &node_ip, 3, &[]).expect("ping").received,
        3
    );
}

#[test]
fn clsact_fallback_attaches_and_counts() {
    let mut spec = LabSpec::new(1, 2).expect("spec");
    spec.attach_mode = "clsact".into();
    let lab = Lab::up(&spec).expect("lab up");
    let status = lab.cli(0, &["status"]).expect("status");
    assert!(status.contains("clsact"), "{status}");
    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-0-1").clone());
    let filters = lab::run(Command::new("tc").args([
        "-n",
        &lab.state.nodes[0].netns,
        "filter",
        "show",
        "dev",
        &a.host_ifname,
        "ingress",
    ]))
    .expect("tc filter show");
    let filters = String::from_utf8_lossy(&filters.stdout);
    assert!(
        filters.contains("lxc_from_ctr") && filters.contains("direct-action"),
        "{filters}"
    );

    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), N, &[])
            .expect("ping")
            .received,
        u64::from(N)
    );
    let rows = lab.dump(0, "dp_ep_metrics").expect("dump");
    assert_eq!(
        ep_counter(&rows, ifindex_of(&lab, "pod-0-0"), "from-endpoint").0,
        u64::from(N)
    );
    assert_eq!(
        ep_counter(&rows, ifindex_of(&lab, "pod-0-1"), "to-endpoint").0,
        u64::from(N)
    );
}

#[test]
fn endpoint_removal_detaches_and_clears_its_entries() {
    let lab = lab(1, 2);
    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-0-1").clone());
    let ia = ifindex_of(&lab, "pod-0-0");
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );

    lab.unregister(&a).expect("del");
    lab.unregister(&a)
        .expect("a repeated delete is not an error");
    let eps = lab.dump(0, "dp_endpoints").expect("dump");
    assert!(eps.iter().all(|r| r["ip"] != a.ip.to_string()), "{eps:?}");
    let rows = lab.dump(0, "dp_ep_metrics").expect("dump");
    assert!(
        rows.iter().all(|r| r["ifindex"] != ia),
        "counters of a removed endpoint remain: {rows:?}"
    );
    // No program on a's veth any more (its traffic is not counted), while
    // b's programs still see the requests arrive; a's address is in no map
    // now, so b's replies are dropped as unknown_destination.
    let ib = ifindex_of(&lab, "pod-0-1");
    let b_before = ep_counter(
        &lab.dump(0, "dp_ep_metrics").expect("dump"),
        ib,
        "to-endpoint",
    )
    .0;
    let drops_before = metric(
        &lab.dump(0, "dp_metrics").expect("dump"),
        "from-endpoint",
        "unknown_destination",
    );
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        0
    );
    let drops = metric(
        &lab.dump(0, "dp_metrics").expect("dump"),
        "from-endpoint",
        "unknown_destination",
    );
    assert_eq!(drops - drops_before, 3);
    let rows = lab.dump(0, "dp_ep_metrics").expect("dump");
    assert_eq!(ep_counter(&rows, ia, "from-endpoint").0, 0, "{rows:?}");
    assert_eq!(
        ep_counter(&rows, ib, "to-endpoint").0,
        b_before + 3,
        "{rows:?}"
    );

    // Registering again starts from zero.
    lab.register(&a).expect("re-add");
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 4, &[])
            .expect("ping")
            .received,
        4
    );
    let rows = lab.dump(0, "dp_ep_metrics").expect("dump");
    assert_eq!(ep_counter(&rows, ia, "from-endpoint").0, 4, "{rows:?}");
}

#[test]
fn bad_endpoint_requests_name_the_field_and_change_nothing() {
    let lab = lab(1, 1);
    let pod = lab.pod("pod-0-0").clone();
    // The pod's security identity is written once the agent has compiled
    // its policy, just after the ADD: compare from then on.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let before = loop {
        let rows = lab.dump(0, "dp_endpoints").expect("dump");
        if rows.iter().all(|r| r["identity"].as_u64() != Some(0))
            || std::time::Instant::now() > deadline
        {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        before.iter().all(|r| r["identity"].as_u64() != Some(0)),
        "no identity assigned: {before:?}"
    );
    let mk = |f: &dyn Fn(&mut dataplane_common::api::EndpointSpec)| {
        let mut s = dataplane_common::api::EndpointSpec {
            container_id: "bad".into(),
            pod_namespace: "default".into(),
            pod_name: "bad".into(),
            host_ifname: pod.host_ifname.clone(),
            ips: vec!["10.244.0.77".parse().expect("ip")],
            mac: pod.mac.clone(),
            netns_cookie: None,
        };
        f(&mut s);
        lab.agent_call(0, &dataplane_common::api::Request::EndpointAdd(s))
            .expect_err("must be refused")
            .to_string()
    };
    let e = mk(&|s| s.host_ifname = "nosuchif0".into());
    assert!(e.contains("host_ifname") && e.contains("nosuchif0"), "{e}");
    let e = mk(&|s| s.mac = "zz:zz".into());
    assert!(e.contains("mac"), "{e}");
    let e = mk(&|s| s.ips.clear());
    assert!(e.contains("ips"), "{e}");
    let e = mk(&|s| s.ips = vec![pod.ip.into()]);
    assert!(
        e.contains("already belongs") && e.contains(&pod.container_id),
        "{e}"
    );
    assert_eq!(
        lab.dump(0, "dp_endpoints").expect("dump"),
        before,
        "a refused request changed the map"
    );
    // The existing pod still works.
    assert_eq!(
        ping(&pod.netns, &lab.state.nodes[0].ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
}

fn bpftool_json(args: &[&str]) -> Value {
    let out = lab::run(Command::new("bpftool").arg("-j").args(args)).expect("bpftool");
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

#[test]
fn bpftool_sees_this_labs_programs_and_btf_field_names() {
    let lab = lab(1, 1);
    let pin_dir = lab.state.nodes[0].pin_dir.clone();
    let spec = dataplane_common::MapSpec::by_name(dataplane_common::MAP_METRICS).expect("spec");
    let metrics = pin_dir.join(spec.pin_name());
    let map = bpftool_json(&["map", "show", "pinned", metrics.to_str().expect("path")]);
    let map_id = map["id"].as_u64().expect("map id");
    // Every program counts its verdicts in dp_metrics, but for the socket
    // programs that only read back translations (dp_sock_rev): the programs
    // of this node's agent are those using this node's maps, whatever other
    // labs run.
    let rev = pin_dir.join(
        dataplane_common::MapSpec::by_name(dataplane_common::MAP_SOCK_REV)
            .expect("contract")
            .pin_name(),
    );
    let rev_id = bpftool_json(&["map", "show", "pinned", rev.to_str().expect("path")])["id"]
        .as_u64()
        .expect("map id");
    let progs = bpftool_json(&["prog", "show"]);
    let ours: Vec<&str> = progs
        .as_array()
        .expect("programs")
        .iter()
        .filter(|p| {
            p["map_ids"].as_array().is_some_and(|ids| {
                ids.iter()
                    .any(|i| i.as_u64() == Some(map_id) || i.as_u64() == Some(rev_id))
            })
        })
        .filter_map(|p| p["name"].as_str())
        .collect();
    for prog in dataplane_common::PROGRAMS {
        assert!(
            ours.contains(&prog.name),
            "{} is not among this agent's programs: {ours:?}",
            prog.name
        );
    }
    let pin = pin_dir.join(
        dataplane_common::MapSpec::by_name(dataplane_common::MAP_ENDPOINTS)
            .expect("spec")
            .pin_name(),
    );
    let dump = lab::run(
        Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&pin),
    )
    .expect("bpftool map dump");
    let dump = String::from_utf8_lossy(&dump.stdout);
    for field in [
        "\"addr\"",
        "\"family\"",
        "\"ifindex\"",
        "\"host_mac\"",
        "\"identity\"",
    ] {
        assert!(dump.contains(field), "BTF field {field} missing:\n{dump}");
    }
    // Every map of the contract is pinned, under its layout version.
    for m in dataplane_common::MAPS {
        assert!(
            pin_dir.join(m.pin_name()).exists(),
            "{} not pinned",
            m.pin_name()
        );
    }
}

#[test]
fn cli_names_unknown_maps_and_lists_the_real_ones() {
    let lab = lab(1, 0);
    let err = lab
        .cli(0, &["map", "dump", "dp_nope"])
        .expect_err("unknown map");
    let msg = err.to_string();
    assert!(
        msg.contains("dp_nope") && msg.contains("dp_ep_metrics"),
        "{msg}"
    );
    let list = lab.cli(0, &["map", "list"]).expect("map list");
    for m in dataplane_common::MAPS {
        assert!(list.contains(m.name), "{list}");
    }
}

#[test]
fn node_names_with_dots_work_and_the_cli_finds_them() {
    let mut spec = LabSpec::new(2, 1).expect("spec");
    spec.node_suffix = ".example.com".into();
    let lab = Lab::up(&spec).expect("lab up");
    let n0 = lab.state.nodes[0].clone();
    assert!(n0.name.ends_with(".example.com"), "{}", n0.name);
    // bpffs refuses dots in names: the directory is escaped.
    let dir = n0
        .pin_dir
        .file_name()
        .expect("dir")
        .to_string_lossy()
        .into_owned();
    assert_eq!(dir, n0.name.replace('.', "%2e"));
    assert!(n0.pin_dir.is_dir());
    let (a, c) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    assert_eq!(
        ping(&a.netns, &c.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
    // The CLI finds a node's pins from its name.
    let out = lab::run(
        Command::new(&lab.state.dataplane_bin)
            .args([
                "map",
                "dump",
                "dp_endpoints",
                "-o",
                "json",
                "--node",
                &n0.name,
            ])
            .arg("--pin-root")
            .arg(&lab.state.pin_root),
    )
    .expect("dataplane map dump --node");
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert!(rows.iter().any(|r| r["ip"] == a.ip.to_string()), "{rows:?}");
    let status: Value =
        serde_json::from_str(&lab.cli(0, &["status", "-o", "json"]).expect("status"))
            .expect("json");
    assert_eq!(status["node"], n0.name.as_str());
}

#[test]
fn teardown_leaves_nothing_behind() {
    let lab = lab(2, 1);
    let state = lab.state.clone();
    assert!(state.namespaces.len() >= 6);
    drop(lab);
    let netns = String::from_utf8(
        lab::run(Command::new("ip").args(["netns", "list"]))
            .expect("ip")
            .stdout,
    )
    .expect("utf8");
    assert!(!netns.contains(&state.id), "netns left: {netns}");
    for node in &state.nodes {
        assert!(
            !node.pin_dir.exists(),
            "pins left in {}",
            node.pin_dir.display()
        );
        if let Some(pid) = node.agent_pid {
            assert!(
                !Path::new(&format!("/proc/{pid}/cmdline")).exists()
                    || !std::fs::read(format!("/proc/{pid}/cmdline"))
                        .unwrap_or_default()
                        .windows(node.name.len())
                        .any(|w| w == node.name.as_bytes()),
                "agent {pid} still running"
            );
        }
    }
    assert!(!state.run_dir.exists());
    for cg in &state.cgroups {
        assert!(!cg.exists(), "cgroup {} left", cg.display());
    }
    assert!(!state.cgroups.is_empty());
}
