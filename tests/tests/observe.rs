//! Seeing inside, with real traffic: `dataplane explain` agrees with what
//! real packets experience and leaves nothing behind; the inspection
//! commands show what the test just did. Needs root.

use std::{net::Ipv4Addr, path::Path};

use lab::{Lab, LabSpec, manifests};
use serde_json::Value;

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// The shop example, with its policies when `policies`, in `mode`.
fn shop(mode: &str, policies: bool) -> Lab {
    shop_with(mode, policies, &[])
}

/// As [`shop`], with extra agent arguments.
fn shop_with(mode: &str, policies: bool, agent_args: &[&str]) -> Lab {
    let spec = LabSpec {
        mode: mode.into(),
        agent_args: agent_args.iter().map(|a| (*a).to_owned()).collect(),
        ..LabSpec::new(2, 0).expect("spec")
    };
    let mut lab = Lab::up(&spec).expect("lab");
    let mut docs = manifests::load(&examples().join("shop")).expect("shop");
    if policies {
        docs.extend(manifests::load(&examples().join("shop-policies.yaml")).expect("policies"));
    }
    lab.apply_docs(&docs).expect("apply");
    lab
}

/// Every conntrack entry of every node.
fn conntrack(lab: &Lab) -> Vec<Value> {
    (0..lab.state.nodes.len())
        .flat_map(|i| {
            let rows: Vec<Value> =
                serde_json::from_str(&lab.cli(i, &["ct", "list", "-o", "json"]).expect("ct list"))
                    .expect("json");
            rows
        })
        .collect()
}

/// Every node's verdict counters.
fn counters(lab: &Lab) -> Vec<Vec<Value>> {
    (0..lab.state.nodes.len())
        .map(|i| lab.dump(i, "dp_metrics").expect("dp_metrics"))
        .collect()
}

fn last_step(hops: &[Value], step: &str) -> String {
    hops.iter()
        .rev()
        .flat_map(|h| h["steps"].as_array().into_iter().flatten())
        .find(|s| s["step"] == step)
        .and_then(|s| s["detail"].as_str())
        .unwrap_or_else(|| panic!("no {step} step in {hops:#?}"))
        .to_owned()
}

fn explain_agrees_with_real_packets(mode: &str) {
    let lab = shop(mode, true);
    let (ct_before, counted_before) = (conntrack(&lab), counters(&lab));
    let pod_ip = |p: &str| lab.find_pod(p).expect("pod").ip;

    // Allowed: by the api's policy, on the api pod's node.
    let allowed = lab
        .explain("shop/frontend", "shop/api-0", 80, "TCP")
        .expect("explain");
    let last = allowed.last().expect("a hop");
    assert_eq!(last["verdict"], "forwarded", "{allowed:#?}");
    assert!(
        last_step(&allowed, "ingress policy").ends_with("allowed by shop/api-from-frontend"),
        "{allowed:#?}"
    );
    let api0_node = &lab.state.nodes[lab.find_pod("shop/api-0").expect("pod").node].name;
    assert_eq!(last["node"], api0_node.as_str());

    // Denied: the db admits only the api.
    let denied = lab
        .explain("ops/monitor", "shop/db", 80, "TCP")
        .expect("explain");
    let last = denied.last().expect("a hop");
    assert_eq!(
        (&last["verdict"], &last["reason"]),
        (&Value::from("dropped"), &Value::from("policy_denied"))
    );
    assert!(
        last_step(&denied, "ingress policy")
            .ends_with("denied: no policy allows it (default deny)")
    );

    // Through the Service: translated to one of its backends, then admitted.
    let svc = lab
        .explain("shop/frontend", "svc/shop/api", 80, "TCP")
        .expect("explain");
    let first = &svc[0];
    let backend = first["leaves_as"]
        .as_str()
        .and_then(|l| l.split(" -> ").nth(1))
        .and_then(|d| d.split(':').next())
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        .expect("rewritten destination");
    assert!(
        [pod_ip("shop/api-0"), pod_ip("shop/api-1")].contains(&backend),
        "{svc:#?}"
    );
    assert!(last_step(&svc, "service").starts_with("10.96.1.1:80/tcp (internal) -> backend"));
    assert_eq!(svc.last().expect("hop")["verdict"], "forwarded");

    // In the cluster's range, on no node.
    let nowhere = lab
        .explain("shop/frontend", "10.244.200.5", 53, "UDP")
        .expect("explain");
    assert_eq!(nowhere.len(), 1);
    assert_eq!(nowhere[0]["reason"], "unknown_destination");

    // Nothing was left or counted by the dry runs.
    assert_eq!(conntrack(&lab), ct_before, "explain left conntrack entries");
    assert_eq!(counters(&lab), counted_before, "explain was counted");

    // Real packets experience the same.
    let r = lab
        .probe("shop/frontend", "shop/api-0", 80, "TCP")
        .expect("probe");
    assert!(
        r.allowed() && r.answered_by.as_deref() == Some("shop/api-0"),
        "{r:?}"
    );
    let r = lab
        .probe("ops/monitor", "shop/db", 80, "TCP")
        .expect("probe");
    assert!(!r.allowed(), "{r:?}");
    let r = lab
        .probe("shop/frontend", "svc/shop/api", 80, "TCP")
        .expect("probe");
    assert!(r.allowed(), "{r:?}");
    assert!(
        ["shop/api-0", "shop/api-1"].contains(&r.answered_by.as_deref().unwrap_or_default()),
        "{r:?}"
    );
    let frontend_node = lab.find_pod("shop/frontend").expect("pod").node;
    let unknown = |lab: &Lab| {
        lab.dump(frontend_node, "dp_metrics")
            .expect("metrics")
            .iter()
            .filter(|r| r["reason"] == "unknown_destination")
            .map(|r| r["packets"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let before = unknown(&lab);
    let r = lab
        .probe("shop/frontend", "10.244.200.5", 53, "UDP")
        .expect("probe");
    assert!(!r.allowed(), "{r:?}");
    assert!(
        unknown(&lab) > before,
        "the real datagram was dropped as unknown_destination"
    );
}

#[test]
fn explain_agrees_with_real_packets_in_vxlan_mode() {
    explain_agrees_with_real_packets("vxlan");
}

#[test]
fn explain_agrees_with_real_packets_in_native_mode() {
    explain_agrees_with_real_packets("native");
}

/// Runs the CLI against node `i` (pins and socket), returning (exit code,
/// stdout, stderr).
fn cli_raw(lab: &Lab, i: usize, args: &[&str]) -> (i32, String, String) {
    let n = &lab.state.nodes[i];
    // In the node's network namespace, as an operator on the node would.
    let out = std::process::Command::new(&lab.state.dataplane_bin)
        .args(["--netns", &n.netns])
        .args(args)
        .arg("--pin-dir")
        .arg(&n.pin_dir)
        .arg("--socket")
        .arg(&n.api_socket)
        .output()
        .expect("dataplane");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inspection_shows_the_flows_just_opened_and_every_json_parses() {
    // Per-packet translation, so that the probe's Service flow is in
    // conntrack (with socket LB it never needs an entry).
    let mut lab = shop_with("vxlan", false, &["--socket-lb=off"]);
    let frontend = lab.find_pod("shop/frontend").expect("pod").clone();
    let node = frontend.node;

    // ct list shows the flow a probe just opened (filtered to it), and
    // ct flush removes it.
    let r = lab
        .probe("shop/frontend", "svc/shop/api", 80, "TCP")
        .expect("probe");
    assert!(r.allowed(), "{r:?}");
    let flows = |lab: &Lab| -> Vec<Value> {
        serde_json::from_str(
            &lab.cli(
                node,
                &[
                    "ct",
                    "list",
                    "-o",
                    "json",
                    "--src",
                    &frontend.ip.to_string(),
                    "--dst",
                    "10.96.1.1",
                    "--port",
                    "80",
                    "--proto",
                    "TCP",
                ],
            )
            .expect("ct list"),
        )
        .expect("json")
    };
    let rows = flows(&lab);
    assert_eq!(rows.len(), 1, "the probe's original direction: {rows:#?}");
    let dnat = rows[0]["dnat"].as_str().expect("dnat");
    let backends = [
        lab.find_pod("shop/api-0").expect("pod").ip,
        lab.find_pod("shop/api-1").expect("pod").ip,
    ];
    assert!(
        backends.iter().any(|b| dnat.starts_with(&b.to_string())),
        "{rows:#?}"
    );
    let out = lab.cli(node, &["ct", "flush"]).expect("flush");
    assert!(out.starts_with("removed "), "{out}");
    assert!(flows(&lab).is_empty(), "flushed");

    // nat list shows a NodePort flow SNATed toward another node's backend
    // (both directions); nat flush removes exactly those.
    for i in 0..2 {
        let to = format!("node/{}", lab.state.nodes[i].name);
        for _ in 0..4 {
            assert!(
                lab.probe("external", &to, 30080, "TCP")
                    .expect("probe")
                    .allowed()
            );
        }
    }
    let nat: Vec<Value> = (0..2)
        .flat_map(|i| {
            let v: Vec<Value> = serde_json::from_str(
                &lab.cli(i, &["nat", "list", "-o", "json"])
                    .expect("nat list"),
            )
            .expect("json");
            v
        })
        .collect();
    assert!(
        nat.iter().any(|r| r["flags"]
            .as_array()
            .is_some_and(|f| f.contains(&Value::from("nodeport-snat")))),
        "8 NodePort flows over 2 backends on 2 nodes: some crossed nodes: {nat:#?}"
    );
    assert!(nat.iter().all(|r| r["src"].as_str().is_some()));
    for i in 0..2 {
        lab.cli(i, &["nat", "flush"]).expect("nat flush");
        let left: Vec<Value> = serde_json::from_str(
            &lab.cli(i, &["nat", "list", "-o", "json"])
                .expect("nat list"),
        )
        .expect("json");
        assert!(left.is_empty(), "{left:#?}");
    }

    // Every view in JSON parses, and says what the lab holds.
    let json = |args: &[&str]| -> Value {
        let (code, out, err) = cli_raw(&lab, node, &[args, &["-o", "json"]].concat());
        assert_eq!(code, 0, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    };
    let st = json(&["status"]);
    assert_eq!(
        (st["agent_running"].as_bool(), st["ready"].as_bool()),
        (Some(true), Some(true))
    );
    let programs = st["programs"].as_array().expect("programs");
    for p in [
        "lxc_from_ctr",
        "host_in",
        "overlay_in",
        "host_xdp",
        "sock_connect4",
    ] {
        assert!(
            programs.iter().any(|r| r["program"] == p),
            "{p}: {programs:#?}"
        );
    }
    assert!(st["conntrack"][1].as_u64().is_some_and(|m| m > 0));
    let eps = json(&["endpoint", "list"]);
    assert!(
        eps.as_array()
            .expect("list")
            .iter()
            .any(|e| e["pod"] == "shop/frontend" && e["ip"] == frontend.ip.to_string())
    );
    let ep = json(&["endpoint", "get", "shop/frontend"]);
    assert_eq!(ep["ip"], frontend.ip.to_string());
    assert!(
        ep["counters"]["from-endpoint"][0]
            .as_u64()
            .is_some_and(|p| p > 0),
        "{ep}"
    );
    let nodes = json(&["node", "list"]);
    let other = &lab.state.nodes[1 - node];
    assert_eq!(nodes[0]["address"], other.ip.to_string());
    assert_eq!(nodes[0]["pod_cidrs"], serde_json::json!([other.pod_cidr]));
    let ids = json(&["identity", "list"]);
    assert!(
        ids.as_array()
            .expect("list")
            .iter()
            .any(|i| i["namespace"] == "shop"
                && i["labels"]["app"] == "frontend"
                && i["endpoints"] == serde_json::json!(["shop/frontend"])),
        "{ids:#}"
    );
    for args in [
        &["service", "list"][..],
        &["ct", "list"],
        &["ct", "stats"],
        &["nat", "list"],
        &["policy", "get", "shop/frontend"],
        &["explain", "shop/frontend", "svc/shop/api", "tcp/80"],
    ] {
        json(args);
    }
    for m in dataplane_common::MAPS {
        if m.kind == dataplane_common::MapKind::RingBuf {
            // A stream: dumping would consume it; it says where to read it.
            let (code, _, err) = cli_raw(&lab, node, &["map", "dump", m.name]);
            assert!(
                code != 0 && err.contains("dataplane monitor"),
                "{}: {err}",
                m.name
            );
            continue;
        }
        let v = json(&["map", "dump", m.name]);
        assert!(v.is_array(), "{}: {v}", m.name);
    }
    let (code, out, err) = cli_raw(&lab, node, &["monitor", "-o", "json", "--duration", "0.3"]);
    assert_eq!(code, 0, "{err}");
    for l in out.lines() {
        let _: Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("monitor line not JSON ({e}): {l}"));
    }
    // Not a node's view: no node flags.
    let out = std::process::Command::new(&lab.state.dataplane_bin)
        .args(["validate", "-o", "json"])
        .arg(examples().join("shop"))
        .output()
        .expect("validate");
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim()
        ),
        (Some(0), "[]")
    );

    // Without the agent: the pinned views still answer, status says so
    // (exit 1), names are missing and said to be.
    lab.stop_agent(node);
    let (code, out, err) = cli_raw(&lab, node, &["status"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("agent: not running") && out.contains("conntrack:"),
        "{out}"
    );
    let (code, out, err) = cli_raw(&lab, node, &["endpoint", "list", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("pod names need the agent"), "{err}");
    let eps: Vec<Value> = serde_json::from_str(&out).expect("json");
    assert!(
        eps.iter()
            .any(|e| e["ip"] == frontend.ip.to_string() && e["pod"].is_null())
    );
    let (code, _, err) = cli_raw(&lab, node, &["identity", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("labels need the agent"), "{err}");
    let (code, _, err) = cli_raw(
        &lab,
        node,
        &["explain", "10.244.200.9", "10.244.200.8", "udp/53"],
    );
    assert_eq!(code, 0, "addresses need no agent: {err}");

    // Without a datapath: said plainly, non-zero.
    let empty = std::env::temp_dir().join(format!("dp-observe-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("dir");
    for args in [
        &["service", "list"][..],
        &["ct", "list"],
        &["map", "list"],
        &["node", "list"],
        &["monitor", "--count", "1"],
    ] {
        let out = std::process::Command::new(&lab.state.dataplane_bin)
            .args(args)
            .arg("--pin-dir")
            .arg(&empty)
            .output()
            .expect("dataplane");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains("no datapath is pinned in"), "{args:?}: {err}");
    }
    let out = std::process::Command::new(&lab.state.dataplane_bin)
        .args(["status", "--socket", "/nonexistent/agent.sock"])
        .output()
        .expect("dataplane");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no datapath and no agent on this node"));
    let _ = std::fs::remove_dir_all(&empty);
}

/// The node's denial events as `monitor -o json` printed them (the summary
/// line left out).
fn denials(events: &[Value], dst: Ipv4Addr) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["verdict"] == "denied" && e["dst"] == dst.to_string())
        .collect()
}

#[test]
fn several_monitors_see_every_event_and_a_flood_is_counted_not_fatal() {
    let lab = shop("vxlan", true);
    let db = lab.find_pod("shop/db").expect("db").clone();
    let node = db.node;
    // Two monitors at once, and a third filtered by pod name: each gets the
    // denial (its own ring).
    let args = [
        "--type",
        "policy",
        "-o",
        "json",
        "--count",
        "1",
        "--duration",
        "10",
    ];
    let m1 = lab
        .monitor(node, &[&args[..], &["--ip", &db.ip.to_string()]].concat())
        .expect("monitor 1");
    let m2 = lab
        .monitor(node, &[&args[..], &["--ip", &db.ip.to_string()]].concat())
        .expect("monitor 2");
    let socket = lab.state.nodes[node].api_socket.display().to_string();
    let m3 = lab
        .monitor(
            node,
            &[&args[..], &["--pod", "shop/db", "--socket", &socket]].concat(),
        )
        .expect("monitor 3");
    let slots = lab.dump(node, "dp_event_readers").expect("readers");
    assert_eq!(slots.len(), 3, "{slots:#?}");
    let r = lab
        .probe("ops/monitor", "shop/db", 80, "TCP")
        .expect("probe");
    assert!(!r.allowed());
    for (i, m) in [m1, m2, m3].into_iter().enumerate() {
        let ev = m
            .events(std::time::Duration::from_secs(15))
            .expect("events");
        let d = denials(&ev, db.ip);
        assert_eq!(d.len(), 1, "monitor {i}: {ev:#?}");
        assert_eq!(
            d[0]["src"],
            lab.find_pod("ops/monitor").expect("pod").ip.to_string()
        );
        assert_eq!(d[0]["dport"], 80);
        assert_eq!(d[0]["policy"], "default deny");
    }
    // Their slots are given back.
    assert!(
        lab.dump(node, "dp_event_readers")
            .expect("readers")
            .is_empty()
    );

    // A flood of denied datagrams: each CPU emits at most its budget, the
    // rest is counted over budget; the agent keeps answering meanwhile.
    let mon = lab
        .monitor(node, &["--type", "policy", "-o", "json", "--duration", "3"])
        .expect("monitor");
    let from = lab.find_pod("ops/monitor").expect("pod").netns.clone();
    let to = std::net::SocketAddr::from((db.ip, 80));
    let sent = std::sync::atomic::AtomicU64::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut slowest = std::time::Duration::ZERO;
    std::thread::scope(|s| {
        s.spawn(|| {
            lab::in_netns_thread(&from, || {
                let sock = std::net::UdpSocket::bind(("0.0.0.0", 0)).expect("bind");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for _ in 0..1000 {
                        let _ = sock.send_to(b"flood", to);
                    }
                    sent.fetch_add(1000, std::sync::atomic::Ordering::Relaxed);
                }
            })
            .expect("flood");
        });
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_millis(2500) {
            let t = std::time::Instant::now();
            lab.agent_call(node, &dataplane_common::api::Request::Status)
                .expect("the agent answers during the flood");
            slowest = slowest.max(t.elapsed());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let ev = mon
        .events(std::time::Duration::from_secs(10))
        .expect("events");
    let summary = ev.last().expect("summary");
    assert_eq!(summary["type"], "summary");
    let shown = summary["shown"].as_u64().expect("shown");
    let over = summary["over_budget"].as_u64().expect("over budget");
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("flood: {sent} datagrams sent; monitor {summary}; slowest status {slowest:?}");
    assert!(sent > 20_000, "the flood sent {sent}");
    assert!(
        over > 0,
        "{sent} denials in 3 s: some over a CPU's 2,000/s budget: {summary}"
    );
    // Per CPU per second: 2 CPUs at most, over about 3 s (window edges).
    assert!(shown <= 2 * 2_000 * 4, "{summary}");
    assert!(
        slowest < std::time::Duration::from_secs(1),
        "the agent took {slowest:?}"
    );
    let m = lab
        .metric(node, "dataplane_events_over_budget_total")
        .expect("metrics")
        .expect("series");
    assert!(m >= over as f64, "metric {m} vs {over}");
}
