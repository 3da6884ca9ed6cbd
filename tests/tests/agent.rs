//! The agent's lifecycle: restarts without loss, graceful stop, cleanup.
//! Needs root.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lab::{Lab, LabSpec, ping};
use serde_json::Value;

const PORT: u16 = 9000;

fn status_json(lab: &Lab, node: usize) -> Value {
    serde_json::from_str(&lab.cli(node, &["status", "-o", "json"]).expect("status")).expect("json")
}

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
        // Retries while the server is still coming up.
        let mut s = lab::connect(to).expect("connect");
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
    let status = status_json(&lab, 0);
    assert_eq!(status["endpoints"], 2, "endpoints not adopted: {status}");
    assert_eq!(status["ready"], true, "{status}");
    let log = lab.agent_log(0);
    assert!(log.contains("endpoint adopted"), "{log}");
    // Counters carry on rather than start over: across a restart with no
    // traffic the count stays, and new packets add to it exactly.
    let kept = ep_packets(
        &lab.dump(0, "dp_ep_metrics").expect("dump"),
        &a.ip.to_string(),
        "from-endpoint",
    );
    assert!(kept >= sent_before + 300, "{kept}");
    lab.signal_agent(0, libc::SIGKILL).expect("kill -9");
    lab.start_agent_again(0).expect("restart");
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
    assert_eq!(
        ep_packets(
            &lab.dump(0, "dp_ep_metrics").expect("dump"),
            &a.ip.to_string(),
            "from-endpoint"
        ),
        kept + 3,
        "the counter was reset or miscounted across the restart"
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
    let uplink =
        lab::run(Command::new("ip").args(["-n", &node.netns, "-d", "link", "show", "eth0"]))
            .expect("ip");
    assert!(
        !String::from_utf8_lossy(&uplink.stdout).contains("prog/xdp"),
        "XDP program left on the uplink after --cleanup"
    );
    let cgroup = node.cgroup.clone().expect("node cgroup");
    let progs = lab::run(
        Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(&cgroup),
    )
    .expect("bpftool");
    let progs: Value = serde_json::from_slice(&progs.stdout).unwrap_or(Value::Null);
    assert!(
        progs.as_array().is_none_or(Vec::is_empty),
        "cgroup programs left after --cleanup: {progs}"
    );
    assert_eq!(
        own_routes(&lab, 0),
        Vec::<String>::new(),
        "routes left after --cleanup"
    );
    assert_eq!(
        ping(&a.netns, &c.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        0,
        "still forwarding after --cleanup"
    );
}

fn own_routes(lab: &Lab, node: usize) -> Vec<String> {
    let out = lab::run(Command::new("ip").args([
        "-n",
        &lab.state.nodes[node].netns,
        "route",
        "show",
        "proto",
        "205",
    ]))
    .expect("ip route");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn maps_hold_exactly_the_desired_state_after_changes_made_while_down() {
    let mut lab = Lab::up(&LabSpec::new(3, 2).expect("spec")).expect("lab");
    let (a, gone_local) = (lab.pod("pod-0-0").clone(), lab.pod("pod-0-1").clone());
    let (b, gone_remote) = (lab.pod("pod-1-1").clone(), lab.pod("pod-1-0").clone());
    let gone_ifindex = lab
        .dump(0, "dp_endpoints")
        .expect("dump")
        .iter()
        .find(|r| r["ip"] == gone_local.ip.to_string())
        .and_then(|r| r["ifindex"].as_u64())
        .expect("local entry");
    assert_eq!(
        ping(&gone_local.netns, &a.ip.to_string(), 2, &[])
            .expect("ping")
            .received,
        2
    );

    lab.signal_agent(0, libc::SIGKILL).expect("kill -9");
    // While node 0's agent is away: one of its own pods is deleted (CNI DEL
    // without the agent), a pod of node 1 goes, and node 2 leaves with its
    // pods.
    lab.remove_pod(&gone_local.name).expect("local pod");
    lab.remove_pod(&gone_remote.name).expect("remote pod");
    lab.remove_pod("pod-2-0").expect("pod of node 2");
    lab.remove_pod("pod-2-1").expect("pod of node 2");
    lab.write_node_list(&[0, 1]).expect("node list");
    lab.start_agent_again(0).expect("restart");
    lab.wait_ready(0).expect("ready");
    lab.wait_peers(0, 1).expect("node 2 removed");

    let endpoints: Vec<(String, bool)> = lab
        .dump(0, "dp_endpoints")
        .expect("dump")
        .iter()
        .map(|r| (r["ip"].as_str().expect("ip").to_owned(), r["local"] == true))
        .collect();
    assert_eq!(
        endpoints,
        vec![(a.ip.to_string(), true), (b.ip.to_string(), false)],
        "dp_endpoints must hold exactly this node's pod and the remaining remote pod"
    );
    let ipcache: Vec<(String, String)> = lab
        .dump(0, "dp_ipcache")
        .expect("dump")
        .iter()
        .map(|r| {
            (
                r["prefix"].as_str().expect("prefix").to_owned(),
                r["kind"].as_str().expect("kind").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        ipcache,
        [
            ("10.96.0.0/12", "services"),
            ("10.244.0.0/16", "cluster-unassigned"),
            ("10.244.0.0/24", "local-pods"),
            ("10.244.1.0/24", "remote-pods"),
            ("172.20.0.11/32", "host"),
            ("172.20.0.12/32", "remote-host"),
        ]
        .map(|(p, k)| (p.to_owned(), k.to_owned()))
    );
    assert_eq!(own_routes(&lab, 0), ["10.96.0.0/12", "10.244.1.0/24"]);
    let counters = lab.dump(0, "dp_ep_metrics").expect("dump");
    assert!(
        counters.iter().all(|r| r["ifindex"] != gone_ifindex),
        "counters of the deleted endpoint remain: {counters:?}"
    );
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
}

#[test]
fn a_pinned_map_of_another_layout_is_replaced_while_traffic_flows() {
    let mut lab = Lab::up(&LabSpec::new(1, 2).expect("spec")).expect("lab");
    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-0-1").clone());
    let pin_dir = lab.state.nodes[0].pin_dir.clone();
    let spec = dataplane_common::MapSpec::by_name(dataplane_common::MAP_EP_METRICS).expect("spec");
    let pin = pin_dir.join(spec.pin_name());
    lab.signal_agent(0, libc::SIGTERM).expect("stop");
    // Another agent's dp_ep_metrics at the same pin, with 8-byte values,
    // and a dp_metrics of an older layout version.
    std::fs::remove_file(&pin).expect("unpin");
    let create = |path: &std::path::Path, args: &[&str]| {
        lab::run(
            Command::new("bpftool")
                .args(["map", "create"])
                .arg(path)
                .args(args),
        )
        .expect("bpftool map create");
    };
    create(
        &pin,
        &[
            "type",
            "percpu_hash",
            "key",
            "8",
            "value",
            "8",
            "entries",
            "16384",
            "name",
            "dp_ep_metrics",
        ],
    );
    let stale = pin_dir.join("dp_metrics_v1");
    // And an unversioned pin, as agents before layout versions left them.
    let legacy = pin_dir.join("dp_endpoints");
    create(
        &stale,
        &[
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "16",
            "entries",
            "1024",
            "name",
            "dp_metrics",
        ],
    );
    create(
        &legacy,
        &[
            "type",
            "hash",
            "key",
            "20",
            "value",
            "28",
            "entries",
            "65536",
            "name",
            "dp_endpoints",
        ],
    );

    std::thread::scope(|s| {
        // Pod to pod on the node, through the programs the stopped agent
        // left running, then through the restarted agent's.
        let flood =
            s.spawn(|| ping(&b.netns, &a.ip.to_string(), 200, &["-i", "0.01"]).expect("ping"));
        std::thread::sleep(Duration::from_millis(500));
        lab.start_agent_again(0).expect("restart");
        let flood = flood.join().expect("thread");
        assert_eq!(
            flood.received, flood.transmitted,
            "traffic lost across the replacement: {flood:?}"
        );
    });
    let log = lab.agent_log(0);
    assert!(
        log.contains("the pinned map's layout differs from this agent's (value size 8, expected 16); replacing it"),
        "{log}"
    );
    assert!(
        log.contains("layout v1 pinned by an earlier agent is replaced by layout v3"),
        "{log}"
    );
    assert!(!stale.exists(), "the old layout's pin is still there");
    assert!(!legacy.exists(), "the unversioned pin is still there");
    assert!(
        log.contains("layout v0 pinned by an earlier agent is replaced by layout v1"),
        "{log}"
    );
    let out = lab::run(
        Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&pin),
    )
    .expect("bpftool");
    let info: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(info["bytes_value"], 16, "{info}");
    // The new map counts, exactly.
    let now = ep_packets(
        &lab.dump(0, "dp_ep_metrics").expect("dump"),
        &a.ip.to_string(),
        "from-endpoint",
    );
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 5, &[])
            .expect("ping")
            .received,
        5
    );
    assert_eq!(
        ep_packets(
            &lab.dump(0, "dp_ep_metrics").expect("dump"),
            &a.ip.to_string(),
            "from-endpoint"
        ),
        now + 5
    );
}

#[test]
fn fifty_adds_and_a_thousand_cluster_changes_do_not_wait_for_each_other() {
    const ADDS: usize = 50;
    const CHANGES: usize = 1000;
    let mut lab = Lab::up(&LabSpec::new(1, 0).expect("spec")).expect("lab");
    let rt = lab.runtime(0);
    let list = lab.conflist(0).expect("conflist");
    let node = lab.state.nodes[0].name.clone();
    let ats: Vec<lab::cni::Attachment> = (0..ADDS)
        .map(|i| {
            let netns = format!("{}-c{i}", lab.state.nodes[0].netns);
            lab.add_netns(&netns).expect("netns");
            lab::cni::Attachment {
                container_id: format!("{}-c{i}", lab.state.id),
                netns: std::path::PathBuf::from("/run/netns").join(&netns),
                ifname: "eth0".into(),
                args: vec![],
                runtime_config: Value::Null,
            }
        })
        .collect();
    let ip_of = |i: usize| -> std::net::IpAddr {
        format!("10.250.{}.{}", i / 250, i % 250 + 1)
            .parse()
            .expect("ip")
    };
    let published: Vec<Mutex<Option<Instant>>> = (0..CHANGES).map(|_| Mutex::new(None)).collect();
    let seen: Vec<Mutex<Option<Instant>>> = (0..CHANGES).map(|_| Mutex::new(None)).collect();
    let adds_done = AtomicBool::new(false);
    let started = Instant::now();
    let (add_time, results) = std::thread::scope(|s| {
        // The source: one Pod of another node per manifest, at a steady pace.
        let publisher = s.spawn(|| {
            for (i, at) in published.iter().enumerate() {
                let doc = format!(
                    "apiVersion: v1\nkind: Pod\nmetadata:\n  name: chg-{i}\n  namespace: load\nspec:\n  nodeName: elsewhere\n  containers: []\nstatus:\n  podIPs:\n  - ip: {}\n",
                    ip_of(i)
                );
                *at.lock().expect("lock") = Some(Instant::now());
                lab.write_manifest(&format!("chg-{i}.yaml"), &doc).expect("write");
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        // Sees each change land in the map.
        let watcher = s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let keys = lab.endpoint_keys(0).expect("map");
                let now = Instant::now();
                let mut left = 0;
                for (i, slot) in seen.iter().enumerate() {
                    let mut slot = slot.lock().expect("lock");
                    if slot.is_none() {
                        if keys.contains(&ip_of(i)) {
                            *slot = Some(now);
                        } else {
                            left += 1;
                        }
                    }
                }
                if left == 0 || now > deadline {
                    return left;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        // 50 CNI ADDs at once.
        let adds: Vec<_> = ats.iter().map(|at| s.spawn(|| rt.add(&list, at))).collect();
        let results: Vec<_> = adds
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        let add_time = started.elapsed();
        adds_done.store(true, Ordering::Relaxed);
        publisher.join().expect("publisher");
        assert_eq!(
            watcher.join().expect("watcher"),
            0,
            "not every change reached the map"
        );
        (add_time, results)
    });
    for (i, r) in results.into_iter().enumerate() {
        r.expect("run the plugin")
            .unwrap_or_else(|f| panic!("ADD {i} failed: {f}"));
    }
    let mut lat: Vec<f64> = (0..CHANGES)
        .map(|i| {
            let p = published[i].lock().expect("lock").expect("published");
            let s = seen[i].lock().expect("lock").expect("seen");
            s.saturating_duration_since(p).as_secs_f64() * 1000.0
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{ADDS} concurrent ADDs took {:.0} ms; {CHANGES} cluster changes meanwhile: latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        add_time.as_secs_f64() * 1000.0,
        pct(0.5),
        pct(0.99),
        lat[lat.len() - 1]
    );
    let keys = lab.endpoint_keys(0).expect("map");
    assert_eq!(
        keys.len(),
        ADDS + CHANGES,
        "{node}: every endpoint and every remote pod"
    );
}

#[test]
fn no_endpoint_before_the_pod_cidr_is_known_and_readyz_says_so() {
    let mut spec = LabSpec::new(1, 0).expect("spec");
    spec.pod_cidr_flag = false;
    spec.publish_pod_cidrs = false;
    spec.wait_ready = false;
    let mut lab = Lab::up(&spec).expect("lab");
    let node = lab.state.nodes[0].clone();
    let addr = SocketAddr::from(([127, 0, 0, 1], 9963));
    // The agent answers, but is not ready: no pod CIDR from its Node yet.
    let status = status_json(&lab, 0);
    assert_eq!(
        (status["ready"].clone(), status["pod_cidr"].clone()),
        (Value::Bool(false), Value::Null),
        "{status}"
    );
    let (code, body) = lab::http_get(&node.netns, addr, "/readyz").expect("readyz");
    assert_eq!((code, body.as_str()), (503, "not ready\n"));
    let err = lab
        .add_pod(0, "early")
        .expect_err("ADD before the pod CIDR");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("CNI error 11"),
        "try again later, not a config error: {msg}"
    );
    assert!(msg.contains("no pod CIDR"), "{msg}");
    // The Node gets its CIDR: ready, and the same ADD goes through.
    lab.publish_pod_cidrs(true).expect("node objects");
    lab.wait_ready(0).expect("ready");
    assert_eq!(
        lab::http_get(&node.netns, addr, "/readyz")
            .expect("readyz")
            .0,
        200
    );
    let log = lab.agent_log(0);
    assert!(
        log.contains("this node's pod CIDR, from its Node object pod_cidr=10.244.0.0/24"),
        "the CIDR is logged as a CIDR: {log}"
    );
    lab.add_pod(0, "late").expect("ADD once ready");
    assert!(lab.pod("late").ip.to_string().starts_with("10.244.0."));
}

#[test]
fn clsact_restarts_replace_filters_without_a_gap() {
    let mut spec = LabSpec::new(2, 1).expect("spec");
    spec.attach_mode = "clsact".into();
    let mut lab = Lab::up(&spec).expect("lab");
    let (a, c) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    let node = lab.state.nodes[0].clone();
    std::thread::scope(|s| {
        let flood =
            s.spawn(|| ping(&a.netns, &c.ip.to_string(), 300, &["-i", "0.01"]).expect("ping"));
        std::thread::sleep(Duration::from_millis(500));
        for _ in 0..2 {
            lab.signal_agent(0, libc::SIGKILL).expect("kill -9");
            lab.start_agent_again(0).expect("restart");
        }
        let flood = flood.join().expect("thread");
        println!(
            "clsact: {} of {} pings across two restarts",
            flood.received, flood.transmitted
        );
        assert_eq!(flood.received, flood.transmitted, "{flood:?}");
    });
    // One filter per hook: the old ones were removed, not stacked.
    for (dev, hook, prog) in [
        (&a.host_ifname, "ingress", "lxc_from_ctr"),
        (&a.host_ifname, "egress", "lxc_to_ctr"),
        (&"dp_vxlan".to_owned(), "ingress", "overlay_in"),
    ] {
        let out = lab::run(Command::new("tc").args([
            "-n",
            &node.netns,
            "filter",
            "show",
            "dev",
            dev,
            hook,
        ]))
        .expect("tc");
        let text = String::from_utf8_lossy(&out.stdout);
        let filters = text
            .lines()
            .filter(|l| l.contains(&format!("name {prog} ")))
            .count();
        assert_eq!(filters, 1, "{dev} {hook}:\n{text}");
    }
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
            "dataplane_drop_count_total{hook=\"tc\",direction=\"from-endpoint\",reason=\"source_spoofed\"}"
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
