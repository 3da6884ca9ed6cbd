//! `cargo xtask lab up|status|down`: a lab to explore by hand.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use lab::{Lab, LabSpec};

use crate::{LabCmd, testing::prepare_lab};

pub(crate) fn lab_cmd(cmd: LabCmd) -> Result<()> {
    match cmd {
        LabCmd::Up {
            nodes,
            pods_per_node,
            attach_mode,
            mode,
        } => {
            prepare_lab()?;
            if !["vxlan", "native"].contains(&mode.as_str()) {
                bail!("--mode {mode}: expected vxlan or native");
            }
            let spec = LabSpec {
                attach_mode,
                mode,
                ..LabSpec::new(nodes, pods_per_node)?
            };
            let state = Lab::up(&spec)?.persist()?;
            print_lab(&state);
            println!("\nremove it with: cargo xtask lab down {}", state.id);
            Ok(())
        }
        LabCmd::Status => {
            let labs = Lab::list()?;
            if labs.is_empty() {
                println!("no labs");
            }
            for state in &labs {
                print_lab(state);
                println!();
            }
            Ok(())
        }
        LabCmd::Down { ids } => {
            if ids.is_empty() {
                let removed = lab::teardown_unowned()?;
                println!("removed {} lab(s) {}", removed.len(), removed.join(" "));
                return Ok(());
            }
            let labs = Lab::list()?;
            for id in ids {
                let state = labs
                    .iter()
                    .find(|l| l.id == id)
                    .with_context(|| format!("no lab {id}"))?;
                lab::teardown(state);
                println!("removed {id}");
            }
            Ok(())
        }
    }
}

pub(crate) fn print_lab(state: &lab::LabState) {
    let alive = |pid: Option<u32>| pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
    println!(
        "lab {}  (underlay netns {}, 172.20.0.0/{})",
        state.id,
        state.underlay_netns,
        lab::UNDERLAY_PREFIX
    );
    for (i, n) in state.nodes.iter().enumerate() {
        println!(
            "  node {}  netns {}  eth0 {}  pods {}  agent pid {} ({})",
            n.name,
            n.netns,
            n.ip,
            n.pod_cidr,
            n.agent_pid.map_or("-".into(), |p| p.to_string()),
            if alive(n.agent_pid) {
                "running"
            } else {
                "not running"
            }
        );
        for p in state.pods.iter().filter(|p| p.node == i) {
            println!(
                "    pod {}/{}  netns {}  ip {}  veth {}",
                p.namespace, p.name, p.netns, p.ip, p.host_ifname
            );
        }
    }
    if let Some(ext) = &state.external {
        println!("  external host  netns {}  eth0 {}", ext.netns, ext.ip);
    }
    if let (Some(n), Some(p)) = (state.nodes.first(), state.pods.first()) {
        println!("\ntry:");
        println!("  ip netns exec {} ping -c 3 {}", p.netns, n.ip);
        println!(
            "  {} map dump dp_ep_metrics --node {}",
            state.dataplane_bin.display(),
            n.name
        );
        println!(
            "  {} status --socket {}",
            state.dataplane_bin.display(),
            n.api_socket.display()
        );
        println!("  agent log: {}", n.log.display());
    }
}
