//! BGP on a routed underlay: nodes in subnets of their own behind a router
//! (BIRD 2), no shared L2. Each node's agent runs a BGP speaker that
//! advertises its pod CIDR; the router learns them and passes them on, and
//! pods reach each other natively (no encapsulation on the wire); with the
//! router's sessions down the same topology carries no pod traffic. Needs
//! root, bird2.

use std::time::{Duration, Instant};

use lab::{Lab, LabSpec, ping};
use serde_json::Value;

fn spec() -> LabSpec {
    let mut spec = LabSpec::new(2, 1).expect("spec");
    spec.mode = "native".into();
    spec.underlay = "routed".into();
    spec.bgp = true;
    spec
}

fn json(lab: &Lab, node: usize, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&lab.cli(node, &a).expect("cli")).expect("json")
}

/// Waits until `f` holds (or fails after 30 s, saying what it saw last).
fn eventually(what: &str, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

#[test]
fn native_routing_across_l3_over_bgp() {
    let mut lab = Lab::up(&spec()).expect("lab");
    let router = lab.state.router.clone().expect("router");
    eventually("the router learns both pod CIDRs over BGP", || {
        let routes = router.routes().map_err(|e| e.to_string())?;
        for cidr in ["10.244.0.0/24", "10.244.1.0/24"] {
            if !routes.contains(cidr) {
                return Err(format!("{cidr} missing:\n{routes}"));
            }
        }
        Ok(())
    });
    for node in 0..2 {
        let peers = json(&lab, node, &["bgp", "peers"]);
        let p = &peers[0];
        assert_eq!(p["state"], "Established", "node {node}: {peers}");
        assert_eq!(p["neighbor_as"], 65000);
        eventually("each node learns the other's CIDR", || {
            let routes = json(&lab, node, &["bgp", "routes"]);
            let rows = routes.as_array().cloned().unwrap_or_default();
            let other = format!("10.244.{}.0/24", 1 - node);
            let own = format!("10.244.{node}.0/24");
            let learned = rows
                .iter()
                .any(|r| r["prefix"] == other && r["kind"] == "learned" && r["best"] == true);
            let advertised = rows
                .iter()
                .any(|r| r["prefix"] == own && r["kind"] == "advertised");
            if learned && advertised {
                Ok(())
            } else {
                Err(format!("{routes}"))
            }
        });
    }
    // In the kernel, from BGP (BIRD's protocol), via the router.
    let out = lab::run(
        lab.on_node(0, "ip")
            .args(["route", "show", "10.244.1.0/24"]),
    )
    .expect("ip route");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("via 172.21.0.1") && text.contains("proto bird"),
        "{text}"
    );

    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    // The router's sessions down: the routes are withdrawn everywhere, and
    // the pods no longer reach each other (the test depends on BGP).
    router.bgp_sessions(false).expect("disable");
    eventually("node 0 forgets node 1's CIDR", || {
        let out = lab::run(
            lab.on_node(0, "ip")
                .args(["route", "show", "10.244.1.0/24"]),
        )
        .map_err(|e| e.to_string())?;
        if out.stdout.is_empty() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    });
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 2, &["-W", "1"])
            .expect("ping")
            .received,
        0,
        "pods reached each other across L3 without BGP's routes"
    );
    router.bgp_sessions(true).expect("enable");
    eventually("the routes are back", || {
        let out = lab::run(
            lab.on_node(0, "ip")
                .args(["route", "show", "10.244.1.0/24"]),
        )
        .map_err(|e| e.to_string())?;
        if out.stdout.is_empty() {
            Err("no route".into())
        } else {
            Ok(())
        }
    });
    // Plain IP on the router's port toward node 1: no tunnel.
    let cap = lab
        .capture_on(
            &lab.state.underlay_netns.clone(),
            "n1",
            "icmp or udp port 8472",
        )
        .expect("capture");
    assert_eq!(
        ping(&a.netns, &b.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
    assert_eq!(
        ping(&b.netns, &a.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
    let frames = cap.finish().expect("capture");
    assert!(!frames.is_empty());
    for f in &frames {
        let (src, dst, proto, _) = lab::ipv4_of(f).expect("IPv4");
        assert_eq!(proto, 1, "{src} -> {dst}: not ICMP (encapsulated?)");
        assert!(
            [a.ip, b.ip].contains(&src) && [a.ip, b.ip].contains(&dst),
            "{src} -> {dst}"
        );
    }
    // TCP and UDP too.
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| lab::echo_server(&b.netns, 7000, &stop));
        let to = std::net::SocketAddr::from((b.ip, 7000));
        let tcp = lab::tcp_echo(&a.netns, to, "over bgp\n");
        let udp = lab::udp_echo(&a.netns, to, "over bgp");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(tcp.expect("TCP").trim(), "over bgp");
        assert_eq!(udp.expect("UDP"), "over bgp");
    });

    // The agent killed outright: its BGP daemon lives on, nothing is
    // withdrawn, and no ping is lost.
    let pinger = {
        let netns = a.netns.clone();
        let to = b.ip.to_string();
        std::thread::spawn(move || ping(&netns, &to, 60, &["-i", "0.05"]))
    };
    std::thread::sleep(Duration::from_millis(500));
    lab.signal_agent(0, libc::SIGKILL).expect("kill -9");
    std::thread::sleep(Duration::from_millis(1000));
    lab.start_agent_again(0).expect("start");
    let p = pinger.join().expect("pinger").expect("ping");
    assert_eq!(p.received, 60, "pings lost across kill -9: {p:?}");
    assert_eq!(json(&lab, 0, &["bgp", "peers"])[0]["state"], "Established");

    // Node 1's Node object names the wrong AS for its router (its
    // annotation overrides the agent's --bgp-peer, live): refused with a
    // named error, node 0's session stays up, and the metric says so.
    lab.apply_docs(&[lab::manifests::Doc {
        file: "node-1.yaml".into(),
        index: 1,
        value: serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-1",
                         "annotations": {"dataplane.io/bgp-peers": "172.21.1.1:65099"}}}),
    }])
    .expect("annotate node-1");
    eventually("node 1's session refused for its AS", || {
        let peers = json(&lab, 1, &["bgp", "peers"]);
        let p = &peers[0];
        let err = p["last_error"].as_str().unwrap_or("");
        if p["state"] != "Established" && err.contains("Bad peer AS") {
            Ok(())
        } else {
            Err(format!("{peers}"))
        }
    });
    assert_eq!(json(&lab, 0, &["bgp", "peers"])[0]["state"], "Established");
    assert_eq!(
        lab.metric(0, "dataplane_bgp_session_state{peer=\"172.21.0.1\"}")
            .expect("metric"),
        Some(6.0)
    );
    assert!(
        lab.agent_log(1).contains("BGP session not established"),
        "the refusal is in node 1's log"
    );
    let state = lab
        .metric(1, "dataplane_bgp_session_state{peer=\"172.21.1.1\"}")
        .expect("metric");
    assert!(state.is_some_and(|s| s < 6.0), "{state:?}");

    // The annotation removed: back to the agent's flags, established.
    lab.apply_docs(&[lab::manifests::Doc {
        file: "node-1.yaml".into(),
        index: 1,
        value: serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-1"}}),
    }])
    .expect("node-1 without annotations");
    eventually("node 1's session back", || {
        let peers = json(&lab, 1, &["bgp", "peers"]);
        if peers[0]["state"] == "Established" {
            Ok(())
        } else {
            Err(format!("{peers}"))
        }
    });

    // A second peer on node 0 that does not exist: tried, failing, in
    // the log and the metrics, while the router's session stays up.
    lab.apply_docs(&[lab::manifests::Doc {
        file: "node-0.yaml".into(),
        index: 1,
        value: serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-0",
                         "annotations": {"dataplane.io/bgp-peers": "172.21.0.1:65000,172.21.0.99:65000"}}}),
    }])
    .expect("annotate node-0");
    eventually("the unreachable peer is tried and reported", || {
        let peers = json(&lab, 0, &["bgp", "peers"]);
        let by = |n: &str| {
            peers
                .as_array()
                .and_then(|a| a.iter().find(|p| p["neighbor"] == n))
                .cloned()
        };
        match (by("172.21.0.1"), by("172.21.0.99")) {
            (Some(up), Some(down))
                if up["state"] == "Established" && down["state"] != "Established" =>
            {
                Ok(())
            }
            _ => Err(format!("{peers}")),
        }
    });
    let down = lab
        .metric(0, "dataplane_bgp_session_state{peer=\"172.21.0.99\"}")
        .expect("metric");
    assert!(down.is_some_and(|s| s < 6.0), "{down:?}");
    eventually("pods reach each other again", || {
        let p = ping(&a.netns, &b.ip.to_string(), 1, &["-W", "1"]).map_err(|e| e.to_string())?;
        if p.received == 1 {
            Ok(())
        } else {
            Err(format!("{p:?}"))
        }
    });
}

#[test]
fn service_addresses_are_advertised_and_withdrawn() {
    use lab::services::{Ep, identity_server, service, who};
    let mut spec = spec();
    spec.agent_args.push("--bgp-advertise-services=true".into());
    let mut lab = Lab::up(&spec).expect("lab");
    let router = lab.state.router.clone().expect("router");
    let lb = |name: &str, ip: &str, etp: &str| {
        service(
            name,
            serde_json::json!({"type": "LoadBalancer", "externalTrafficPolicy": etp,
                "ports": [{"port": 80, "targetPort": 8080}]}),
            serde_json::json!({"loadBalancer": {"ingress": [{"ip": ip}]}}),
        )
    };
    let slice = |lab: &Lab, name: &str| {
        lab.slice(
            name,
            &format!("{name}-1"),
            &[Ep::ready("pod-1-0")],
            serde_json::json!([{"port": 8080, "protocol": "TCP"}]),
        )
    };
    lab.set_services(
        vec![
            lb("web", "192.0.2.50", "Cluster"),
            lb("local", "192.0.2.51", "Local"),
        ],
        vec![slice(&lab, "web"), slice(&lab, "local")],
    )
    .expect("publish");
    let (n0, n1) = (lab.state.nodes[0].ip, lab.state.nodes[1].ip);
    eventually("the router learns the Service addresses", || {
        let web = router
            .next_hops("192.0.2.50/32")
            .map_err(|e| e.to_string())?;
        let local = router
            .next_hops("192.0.2.51/32")
            .map_err(|e| e.to_string())?;
        // Cluster: every node serves it; Local: only the endpoint's node.
        if web == [n0, n1] && local == [n1] {
            Ok(())
        } else {
            Err(format!("192.0.2.50 via {web:?}, 192.0.2.51 via {local:?}"))
        }
    });
    let ext = lab.state.external.clone().expect("external host");
    let backend = lab.pod("pod-1-0").netns.clone();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| identity_server(&backend, "pod-1-0", &[8080], &stop));
        std::thread::sleep(Duration::from_millis(200));
        // No route was added by hand: the external host reaches them over
        // what the router learned.
        let r = (|| -> anyhow::Result<()> {
            for ip in [[192, 0, 2, 50], [192, 0, 2, 51]] {
                let w = who(&ext.netns, std::net::SocketAddr::from((ip, 80)), 0)?;
                anyhow::ensure!(w.name == "pod-1-0", "{w:?}");
            }
            Ok(())
        })();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        r.expect("the Services from the external host");
    });

    // The Service goes: its address is withdrawn.
    lab.set_services(
        vec![lb("web", "192.0.2.50", "Cluster")],
        vec![slice(&lab, "web")],
    )
    .expect("publish");
    eventually("192.0.2.51 withdrawn", || {
        match router
            .next_hops("192.0.2.51/32")
            .map_err(|e| e.to_string())?
        {
            h if h.is_empty() => Ok(()),
            h => Err(format!("still via {h:?}")),
        }
    });

    // Node 1 uninstalled: its BGP daemon stops and the router forgets its
    // pod CIDR (and its path to the Service).
    lab.signal_agent(1, libc::SIGKILL).expect("kill");
    let node = lab.state.nodes[1].clone();
    let out = lab::run(
        std::process::Command::new(&lab.state.dataplane_bin).args([
            "--netns",
            &node.netns,
            "uninstall",
            "--node",
            &node.name,
            "--pin-root",
            &lab.state.pin_root.display().to_string(),
            "--state-dir",
            &lab.state
                .run_dir
                .join(format!("{}-state", node.name))
                .display()
                .to_string(),
            "--api-socket",
            &node.api_socket.display().to_string(),
            "--cni-bin-dir",
            &lab.state.run_dir.join("no-cni-bin").display().to_string(),
            "--cni-conf-dir",
            &lab.state.run_dir.join("no-cni-conf").display().to_string(),
            "--ipam-dir",
            &node.ipam_dir.display().to_string(),
        ]),
    )
    .expect("uninstall");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("stopped the BGP daemon"), "{text}");
    let started = Instant::now();
    eventually("node 1's routes withdrawn", || {
        let pods = router
            .next_hops("10.244.1.0/24")
            .map_err(|e| e.to_string())?;
        let web = router
            .next_hops("192.0.2.50/32")
            .map_err(|e| e.to_string())?;
        if pods.is_empty() && web == [n0] {
            Ok(())
        } else {
            Err(format!(
                "10.244.1.0/24 via {pods:?}, 192.0.2.50 via {web:?}"
            ))
        }
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "withdrawn after {:?}",
        started.elapsed()
    );
}

#[test]
fn frr_as_the_router() {
    let mut spec = spec();
    spec.router = "frr".into();
    let lab = Lab::up(&spec).expect("lab");
    let router = lab.state.router.clone().expect("router");
    let (n0, n1) = (lab.state.nodes[0].ip, lab.state.nodes[1].ip);
    eventually("FRR learns both pod CIDRs", || {
        let a = router
            .next_hops("10.244.0.0/24")
            .map_err(|e| e.to_string())?;
        let b = router
            .next_hops("10.244.1.0/24")
            .map_err(|e| e.to_string())?;
        if a == [n0] && b == [n1] {
            Ok(())
        } else {
            Err(format!("10.244.0.0/24 via {a:?}, 10.244.1.0/24 via {b:?}"))
        }
    });
    for node in 0..2 {
        eventually("the node's session with FRR", || {
            let peers = json(&lab, node, &["bgp", "peers"]);
            if peers[0]["state"] == "Established" {
                Ok(())
            } else {
                Err(format!("{peers}"))
            }
        });
    }
    let (a, b) = (lab.pod("pod-0-0").clone(), lab.pod("pod-1-0").clone());
    eventually("pods reach each other through FRR", || {
        let p = ping(&a.netns, &b.ip.to_string(), 1, &["-W", "1"]).map_err(|e| e.to_string())?;
        if p.received == 1 {
            Ok(())
        } else {
            Err(format!("{p:?}"))
        }
    });
    assert_eq!(
        ping(&b.netns, &a.ip.to_string(), 3, &[])
            .expect("ping")
            .received,
        3
    );
}

#[test]
fn a_changed_pod_cidr_is_advertised_and_the_old_one_withdrawn() {
    let mut spec = spec();
    spec.pods_per_node = 0;
    // The agents take their CIDR from their Node objects.
    spec.pod_cidr_flag = false;
    let mut lab = Lab::up(&spec).expect("lab");
    let router = lab.state.router.clone().expect("router");
    let n1 = lab.state.nodes[1].ip;
    eventually("node 1's CIDR at the router", || {
        match router
            .next_hops("10.244.1.0/24")
            .map_err(|e| e.to_string())?
        {
            h if h == [n1] => Ok(()),
            h => Err(format!("via {h:?}")),
        }
    });
    lab.state.nodes[1].pod_cidr = "10.244.9.0/24".into();
    lab.write_node_list(&[0, 1]).expect("publish");
    let started = Instant::now();
    eventually("the new CIDR advertised, the old withdrawn", || {
        let new = router
            .next_hops("10.244.9.0/24")
            .map_err(|e| e.to_string())?;
        let old = router
            .next_hops("10.244.1.0/24")
            .map_err(|e| e.to_string())?;
        if new == [n1] && old.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "10.244.9.0/24 via {new:?}, 10.244.1.0/24 via {old:?}"
            ))
        }
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    eventually("node 0 learns it", || {
        let routes = json(&lab, 0, &["bgp", "routes"]);
        let has = routes.as_array().is_some_and(|a| {
            a.iter()
                .any(|r| r["prefix"] == "10.244.9.0/24" && r["kind"] == "learned")
        });
        if has {
            Ok(())
        } else {
            Err(format!("{routes}"))
        }
    });
}
