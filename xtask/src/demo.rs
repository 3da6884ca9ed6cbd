//! `cargo xtask demo`: a simulated cluster with traffic, and what the
//! datapath saw of it.

use anyhow::Result;
use lab::{Lab, LabSpec};

use crate::{labcmd::print_lab, testing::prepare_lab};

pub(crate) fn demo(keep: bool) -> Result<()> {
    prepare_lab()?;
    for mode in ["vxlan", "native"] {
        demo_mode(mode, keep)?;
    }
    Ok(())
}

/// One lab in `mode`: traffic of every kind, what the underlay carried, and
/// what the datapath saw of it.
pub(crate) fn demo_mode(mode: &str, keep: bool) -> Result<()> {
    let spec = LabSpec {
        mode: mode.into(),
        ..LabSpec::new(2, 2)?
    };
    println!("\n==================== {mode} mode ====================");
    println!(
        "== a 2-node lab: network namespaces, one agent per node, pods created by dataplane-cni"
    );
    let lab = Lab::up(&spec)?;
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

    if keep {
        let state = lab.persist()?;
        println!(
            "\nlab {} left running; remove it with: cargo xtask lab down {}",
            state.id, state.id
        );
    } else {
        drop(lab);
        println!("\nlab removed (use --keep to explore it)");
    }
    Ok(())
}
