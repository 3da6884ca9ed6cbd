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

    println!("\n== what node 0's underlay port carried for the cross-node pings");
    for f in frames.iter().take(2) {
        if let Some((src, dst, proto, ihl)) = lab::ipv4_of(f) {
            if proto == 17 && f.len() >= 14 + ihl + 16 {
                let udp = &f[14 + ihl..];
                let vni = u32::from_be_bytes([0, udp[12], udp[13], udp[14]]);
                let inner = lab::ipv4_of(&udp[16..])
                    .map(|(s, d, _, _)| format!("{s} -> {d}"))
                    .unwrap_or_default();
                println!(
                    "  {src} -> {dst} UDP dport {} VXLAN VNI {vni}, inside: {inner}",
                    u16::from_be_bytes([udp[2], udp[3]])
                );
            } else {
                println!("  {src} -> {dst} protocol {proto} (no encapsulation)");
            }
        }
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
        "verdicts by reason: forged source and unknown destination, dropped and named",
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
