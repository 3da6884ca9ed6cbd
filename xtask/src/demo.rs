//! `cargo xtask demo`: a simulated cluster with traffic, and what the
//! datapath saw of it.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result};
use lab::{
    Lab, LabSpec,
    services::{Attempt, Ep, Stream, identity_server, service, who, who_many},
};
use serde_json::json;

use crate::testing::prepare_lab;
use lab::cli::print_lab;

pub(crate) fn demo(keep: bool) -> Result<()> {
    prepare_lab()?;
    walk(keep)?;
    println!("\n==================== under the hood ====================");
    for mode in ["vxlan", "native"] {
        demo_mode(mode)?;
    }
    Ok(())
}

/// The lab as a person uses it, on the manifests in `deploy/examples`:
/// the same `lab` commands, run in-process, printing what they print.
fn walk(keep: bool) -> Result<()> {
    let examples = crate::workspace_root().join("deploy/examples");
    let name = format!("demo-{}", std::process::id());
    // Shown as typed (the lab made last needs no --lab), run on this one.
    let lab_cmd = |args: &[&str]| -> i32 {
        let shown: Vec<String> = args
            .iter()
            .map(|a| {
                a.strip_prefix(&format!("{}/", crate::workspace_root().display()))
                    .unwrap_or(a)
                    .to_owned()
            })
            .collect();
        println!("\n$ lab {}", shown.join(" "));
        lab::cli::main(
            ["lab", "--lab", &name]
                .into_iter()
                .chain(args.iter().copied()),
        )
    };
    let path = |p: &str| examples.join(p).display().to_string();
    println!("==================== the lab: manifests in, a cluster out ====================");
    println!(
        "== a 2-node cluster from deploy/examples/shop: namespaces shop and ops, five pods (each serving HTTP on 80), the api Service"
    );
    let up = lab::cli::main(["lab", "up", "--manifests", &path("shop"), "--name", &name]);
    if up != 0 {
        anyhow::bail!("lab up failed");
    }
    struct Down<'a>(&'a str, bool);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            if self.1 {
                println!(
                    "\nlab {} left running: `cargo xtask lab down {}` removes it",
                    self.0, self.0
                );
            } else {
                lab::cli::main(["lab", "down", self.0]);
            }
        }
    }
    let _down = Down(&name, keep);
    let lab = Lab::attach(
        Lab::list()?
            .into_iter()
            .find(|l| l.name == name)
            .context("the demo's lab")?,
    );

    println!(
        "\n== who reaches whom: every ordered pair of pods on 80/tcp ('.' allowed, 'X' denied)"
    );
    lab_cmd(&["matrix"]);

    println!(
        "\n== the api Service: a ClusterIP the lab allocated and NodePort 30080, from every node, a pod and the external host"
    );
    for (from, to, port) in [
        ("node/node-0", "svc/shop/api", "80/tcp"),
        ("node/node-1", "svc/shop/api", "80/tcp"),
        ("shop/frontend", "svc/shop/api", "80/tcp"),
        ("external", "node/node-0", "30080/tcp"),
        ("external", "node/node-1", "30080/tcp"),
    ] {
        lab_cmd(&["probe", from, to, port]);
    }
    let frontend_node = lab.find_pod("shop/frontend").context("frontend")?.node;
    println!(
        "\n$ dataplane map dump dp_sock_rev    # on {}: socket LB sent the probes' connect() straight to a backend; getpeername still says the Service",
        lab.state.nodes[frontend_node].name
    );
    print!(
        "{}",
        lab.cli(frontend_node, &["map", "dump", "dp_sock_rev"])?
    );

    println!(
        "\n== NetworkPolicy: only the api reaches the db; only the frontend and the ops namespace reach the api"
    );
    lab_cmd(&["apply", "-f", &path("shop-policies.yaml")]);
    lab_cmd(&["matrix"]);
    lab_cmd(&["probe", "external", "node/node-0", "30080/tcp"]);

    println!("\n== why was the frontend refused by the db? the verdict, as the db's node saw it");
    let db = lab.find_pod("shop/db").context("db")?.clone();
    let db_ip = db.ip.to_string();
    println!(
        "\n$ dataplane monitor --type policy --ip {db_ip} --count 1    # on {}, while the frontend tries again",
        lab.state.nodes[db.node].name
    );
    let mon = lab.monitor(
        db.node,
        &[
            "--type",
            "policy",
            "--ip",
            &db_ip,
            "--count",
            "1",
            "--duration",
            "10",
        ],
    )?;
    let probe = lab.probe("shop/frontend", "shop/db", 80, "TCP")?;
    print!("{}", mon.output(Duration::from_secs(15))?);
    println!("  (the probe: {})", probe.verdict);
    println!(
        "\n== the same question before sending anything: the packet run through each node's live programs as a dry run"
    );
    lab_cmd(&["explain", "shop/frontend", "shop/db", "80/tcp"]);
    lab_cmd(&["explain", "shop/frontend", "svc/shop/api", "80/tcp"]);
    println!("\n$ dataplane policy get shop/db    # the db's compiled policy, entry by entry");
    print!("{}", lab.cli(db.node, &["policy", "get", "shop/db"])?);

    println!(
        "\n== a relabelled pod: the frontend becomes app=api (it loses the api, and gains the db)"
    );
    lab_cmd(&["apply", "-f", &path("shop-relabel.yaml")]);
    lab_cmd(&["matrix"]);

    println!("\n== the policies deleted: everyone reaches everyone again");
    lab_cmd(&["delete", "-f", &path("shop-policies.yaml")]);
    lab_cmd(&["matrix"]);

    println!("\n$ dataplane service list    # node-0's frontends, as the datapath has them");
    print!("{}", lab.cli(0, &["service", "list"])?);
    Ok(())
}

/// One lab in `mode`: traffic of every kind, what the underlay carried, and
/// what the datapath saw of it.
pub(crate) fn demo_mode(mode: &str) -> Result<()> {
    let spec = LabSpec {
        mode: mode.into(),
        ..LabSpec::new(2, 2)?
    };
    println!("\n==================== {mode} mode ====================");
    println!(
        "== a 2-node lab: network namespaces, one agent per node, pods created by dataplane-cni"
    );
    let mut lab = Lab::up(&spec)?;
    // The Service section's backends: a Deployment's pods.
    for (node, name) in [(0, "web-0"), (1, "web-1"), (1, "web-2")] {
        lab.add_pod(node, name)?;
    }
    print_lab(&lab.state);

    let show = |title: &str, node: usize, args: &[&str]| -> Result<()> {
        println!("\n$ dataplane {}    # {title}", args.join(" "));
        print!("{}", lab.cli(node, args)?);
        Ok(())
    };
    let ping = |from: &str, to: &str, label: &str, extra: &[&str]| -> Result<()> {
        let r = lab::ping(&lab.pod(from).netns, to, 10, extra)?;
        println!("  {label}: {} sent, {} received", r.transmitted, r.received);
        Ok(())
    };
    let (a, b, c) = (
        lab.pod("pod-0-0").clone(),
        lab.pod("pod-0-1").clone(),
        lab.pod("pod-1-0").clone(),
    );

    println!("\n== traffic (10 pings each)");
    ping(
        "pod-0-0",
        &b.ip.to_string(),
        &format!("pod-0-0 {} -> pod-0-1 {} (same node)", a.ip, b.ip),
        &[],
    )?;
    let cap = lab.capture_underlay(0, "ip")?;
    ping(
        "pod-0-0",
        &c.ip.to_string(),
        &format!("pod-0-0 {} -> pod-1-0 {} (across nodes)", a.ip, c.ip),
        &[],
    )?;
    let n1 = lab.state.nodes[1].ip;
    ping(
        "pod-0-0",
        &n1.to_string(),
        &format!(
            "pod-0-0 {} -> node 1 {n1} (another node's own address)",
            a.ip
        ),
        &[],
    )?;
    let frames = cap.finish()?;
    let r = lab::ping(&lab.state.nodes[1].netns, &a.ip.to_string(), 10, &[])?;
    println!(
        "  node 1 -> pod-0-0: {} sent, {} received",
        r.transmitted, r.received
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| -> Result<()> {
        s.spawn(|| lab::echo_server(&c.netns, 9000, &stop));
        let to = std::net::SocketAddr::from((c.ip, 9000));
        let sent = 10 * 1024 * 1024;
        let got = lab::tcp_bulk(&a.netns, to, sent);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        println!(
            "  10 MB TCP (DF set) pod-0-0 -> pod-1-0: {} bytes arrived",
            got?
        );
        Ok(())
    })?;
    lab.add_pod_address(&a.name, "10.244.0.250/32")?;
    ping(
        "pod-0-0",
        &lab.state.nodes[0].ip.to_string(),
        "pod-0-0 with a forged source 10.244.0.250 -> node 0",
        &["-I", "10.244.0.250"],
    )?;
    ping(
        "pod-0-0",
        "10.244.200.5",
        "pod-0-0 -> 10.244.200.5 (in the cluster range, on no node)",
        &[],
    )?;

    println!("\n== traceroute from pod-0-0 to pod-1-0: every node on the way answers TTL expiry");
    for ttl in 1..=3 {
        let out = lab::in_netns(&a.netns, "ping")
            .args(["-n", "-c", "1", "-W", "2", "-t", &ttl.to_string()])
            .arg(c.ip.to_string())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with("From ") || l.contains("bytes from"))
            .unwrap_or("(no answer)");
        println!("  TTL {ttl}: {line}");
    }

    println!(
        "\n== what node 0's underlay port carried for the cross-node pings (outer, then inner headers)"
    );
    let mut shown = std::collections::BTreeSet::new();
    for d in frames.iter().filter_map(|f| lab::decode(f, 8472)) {
        let line = match (d.vni, d.inner) {
            (Some(vni), Some((s, t, _))) => format!(
                "  {} -> {} UDP dport 8472 VXLAN VNI {vni}, inside: {s} -> {t}",
                d.src, d.dst
            ),
            _ => format!(
                "  {} -> {} protocol {} (no encapsulation)",
                d.src, d.dst, d.proto
            ),
        };
        if shown.insert(line.clone()) {
            println!("{line}");
        }
    }

    if mode == "vxlan" {
        println!("\n== a VXLAN packet forged by the external host, claiming to carry node 1's pod");
        let ext = lab
            .state
            .external
            .clone()
            .map(|e| e.netns)
            .unwrap_or_default();
        let mut forged = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        forged.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00]);
        let inner: [u8; 28] = [
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 10, 244, 1, 77, 10, 244, 0, 2, 8, 0, 0xf7,
            0xff, 0, 0, 0, 0,
        ];
        forged.extend_from_slice(&inner);
        let to = std::net::SocketAddr::from((lab.state.nodes[0].ip, 8472));
        for _ in 0..3 {
            lab::send_udp(&ext, to, &forged)?;
        }
        println!(
            "  3 sent from the external host to node 0, UDP 8472 (dropped as unknown_tunnel_peer below)"
        );
    }

    services(&lab)?;

    show("the agent on node 0", 0, &["status"])?;
    show(
        "where every address lives: the cluster range, pod CIDRs, node addresses",
        0,
        &["map", "dump", "dp_ipcache"],
    )?;
    show(
        "per-endpoint counters",
        0,
        &["map", "dump", "dp_ep_metrics"],
    )?;
    show(
        "verdicts by hook and reason: forged source, unknown destination, TTL expiry, forged tunnel packets, all named",
        0,
        &["map", "dump", "dp_metrics"],
    )?;
    drop(lab);
    Ok(())
}

/// Counts who answered `n` connections from `netns` to `to`.
fn spread(netns: &str, to: SocketAddr, n: usize) -> Result<String> {
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for w in who_many(netns, to, n)? {
        *per.entry(w.name).or_default() += 1;
    }
    Ok(per
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", "))
}

/// A Deployment-like set of three pods behind a Service, reached from pods
/// on both nodes, from a node and from the external host; one backend is
/// removed while a stream runs.
fn services(lab: &Lab) -> Result<()> {
    println!(
        "\n== Services: three web pods behind web (ClusterIP 10.96.0.10:80, NodePort 30080), served by eBPF"
    );
    let web = service(
        "web",
        json!({"type": "NodePort", "clusterIP": "10.96.0.10", "selector": {"app": "web"},
               "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080}]}),
        json!({}),
    );
    let empty = service(
        "empty",
        json!({"clusterIP": "10.96.0.11", "ports": [{"name": "http", "port": 80}]}),
        json!({}),
    );
    let ports = json!([{"name": "http", "port": 8080, "protocol": "TCP"}]);
    let slice = |eps: &[&str]| {
        let eps: Vec<Ep> = eps.iter().map(|p| Ep::ready(p)).collect();
        lab.slice("web", "web-abc12", &eps, ports.clone())
    };
    let no_eps = lab.slice("empty", "empty-1", &[], ports.clone());
    lab.set_services(
        vec![web.clone(), empty.clone()],
        vec![slice(&["web-0", "web-1", "web-2"]), no_eps.clone()],
    )?;
    for i in 0..2 {
        lab.wait_frontend(i, "10.96.0.10:80/tcp", "internal", 3)?;
    }
    let stop = AtomicBool::new(false);
    let ext = lab.state.external.clone().context("external host")?;
    let cip = SocketAddr::from(([10, 96, 0, 10], 80));
    let (n0, n1) = (lab.state.nodes[0].ip, lab.state.nodes[1].ip);
    std::thread::scope(|s| -> Result<()> {
        for p in ["web-0", "web-1", "web-2"] {
            let (ns, stop) = (lab.pod(p).netns.clone(), &stop);
            s.spawn(move || identity_server(&ns, p, &[8080], stop));
        }
        s.spawn(|| identity_server(&ext.netns, "external-host", &[8080], &stop));
        std::thread::sleep(Duration::from_millis(100));
        let r = (|| -> Result<()> {
            let a = lab.pod("pod-0-0").netns.clone();
            let c = lab.pod("pod-1-0").netns.clone();
            println!(
                "  30 connections to the ClusterIP, each answered by the backend that got it:"
            );
            println!("    from pod-0-0 (node 0): {}", spread(&a, cip, 30)?);
            println!("    from pod-1-0 (node 1): {}", spread(&c, cip, 30)?);
            println!(
                "    from node 0 itself:    {}",
                spread(&lab.state.nodes[0].netns, cip, 30)?
            );
            let w0 = who(&ext.netns, SocketAddr::from((n0, 30080)), 41000)?;
            let w1 = who(&ext.netns, SocketAddr::from((n1, 30080)), 41000)?;
            println!(
                "  the external host, one flow (source port 41000) to NodePort 30080 on each node: {} via node 0, {} via node 1 (Maglev: same backend)",
                w0.name, w1.name
            );
            let out = who(&a, SocketAddr::from((ext.ip, 8080)), 0)?;
            println!(
                "  pod-0-0 -> the external host: it sees {} (masqueraded to node 0)",
                out.peer.ip()
            );
            match lab::services::attempt(&a, SocketAddr::from(([10, 96, 0, 11], 80)))? {
                Attempt::Refused(t) => println!(
                    "  pod-0-0 -> empty (no endpoints): refused in {} us (ICMP port unreachable)",
                    t.as_micros()
                ),
                other => println!("  pod-0-0 -> empty: {other:?}"),
            }
            let row = |i: usize| -> Result<String> { lab.cli(i, &["service", "list"]) };
            println!("\n$ dataplane service list    # node 0's frontends");
            print!("{}", row(0)?);
            // A stream to a backend that stays, while another goes.
            lab::in_netns_thread(&a, || -> Result<()> {
                let mut stream = Stream::open(cip)?;
                let mine = stream.first.name.clone();
                let gone = ["web-0", "web-1", "web-2"]
                    .into_iter()
                    .find(|b| *b != mine)
                    .context("a backend")?;
                let rest: Vec<&str> = ["web-0", "web-1", "web-2"]
                    .into_iter()
                    .filter(|b| *b != gone)
                    .collect();
                lab.set_services(
                    vec![web.clone(), empty.clone()],
                    vec![slice(&rest), no_eps.clone()],
                )?;
                for i in 0..2 {
                    lab.wait_frontend(i, "10.96.0.10:80/tcp", "internal", 2)?;
                }
                println!(
                    "\n== {gone} removed from the EndpointSlice while pod-0-0 streams to {mine}"
                );
                let answers: Vec<String> = (0..5)
                    .map(|i| stream.ask(&format!("line {i}")))
                    .collect::<Result<_>>()?;
                println!(
                    "  the stream's next 5 lines answered by: {}",
                    answers.join(" ")
                );
                Ok(())
            })??;
            println!(
                "  30 new connections from pod-1-0: {}",
                spread(&c, cip, 30)?
            );
            println!(
                "\n$ dataplane ct list    # node 0: both directions of each translated flow (first lines)"
            );
            for l in lab.cli(0, &["ct", "list"])?.lines().take(9) {
                println!("{l}");
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        r
    })
}
