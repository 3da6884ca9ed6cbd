//! `dataplane uninstall`: removes what the agent and `dataplane-cni
//! install` put on a node, with the agent stopped: the programs (pinned
//! links are detached, recorded clsact filters removed), every pin, the
//! devices and routes the agent made, its state, and the CNI plugin, its
//! conflist and its IPAM records. Pods wired by the dataplane lose their
//! network; the runtime's next CNI wires new ones.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use dataplane_common::netlink::Nl;

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// This node's name (as the agent was given it).
    #[arg(long)]
    pub node: String,
    #[arg(long, default_value = dataplane_common::PIN_ROOT)]
    pub pin_root: PathBuf,
    #[arg(long, default_value = dataplane_common::api::DEFAULT_SOCKET)]
    pub api_socket: PathBuf,
    #[arg(long, default_value = "/var/run/dataplane")]
    pub state_dir: PathBuf,
    #[arg(long, default_value = "dp_vxlan")]
    pub vxlan_device: String,
    #[arg(long, default_value = dataplane_common::api::CNI_BIN_DIR)]
    pub cni_bin_dir: PathBuf,
    #[arg(long, default_value = dataplane_common::api::CNI_CONF_DIR)]
    pub cni_conf_dir: PathBuf,
    #[arg(long, default_value = dataplane_common::api::CNI_CONF_NAME)]
    pub cni_conf_name: String,
    #[arg(long, default_value = dataplane_common::api::IPAM_DATA_DIR)]
    pub ipam_dir: PathBuf,
    /// Then wait for SIGTERM instead of exiting (a DaemonSet's container
    /// must keep running once its work is done).
    #[arg(long)]
    pub wait: bool,
}

/// What was removed, for the operator.
#[derive(Debug, Default)]
pub struct Removed {
    pub links: usize,
    pub clsact_filters: usize,
    pub routes: usize,
    pub devices: Vec<String>,
    pub files: Vec<PathBuf>,
    /// A BGP daemon was stopped.
    pub bgp_daemon: bool,
}

fn remove_path(path: &Path, removed: &mut Removed) -> Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
    };
    result.with_context(|| format!("removing {}", path.display()))?;
    removed.files.push(path.to_owned());
    Ok(())
}

/// Detaches and unpins every link pinned under `dir` (recursively): a link
/// held open elsewhere would otherwise outlive its pin.
fn detach_links(dir: &Path) -> Result<usize> {
    let mut n = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for e in entries {
        let path = e?.path();
        if path.is_dir() {
            n += detach_links(&path)?;
        } else if crate::bpf::detach_pinned(&path)? {
            n += 1;
        }
    }
    Ok(n)
}

pub async fn run(args: &UninstallArgs) -> Result<Removed> {
    dataplane_common::pin::validate_node_name(&args.node)
        .map_err(|e| anyhow::anyhow!("--node: {e}"))?;
    if std::os::unix::net::UnixStream::connect(&args.api_socket).is_ok() {
        bail!(
            "an agent answers on {}: stop it first (delete the DaemonSet), then uninstall",
            args.api_socket.display()
        );
    }
    let mut removed = Removed::default();
    let pin_dir = dataplane_common::pin_dir(&args.pin_root, &args.node);
    removed.links = detach_links(&pin_dir.join("links"))?;
    removed.clsact_filters = crate::bpf::remove_recorded_clsact(&args.state_dir)?;
    remove_path(&pin_dir, &mut removed)?;
    // The root goes too when no other node pins under it.
    if std::fs::read_dir(&args.pin_root).is_ok_and(|mut d| d.next().is_none()) {
        remove_path(&args.pin_root, &mut removed)?;
    }

    let nl = Nl::new()?;
    for route in nl.own_routes().await? {
        nl.del_route(route).await?;
        removed.routes += 1;
    }
    for dev in [args.vxlan_device.as_str(), crate::agent::HOST_DEVICE] {
        if let Some(link) = nl.link(dev).await? {
            nl.del_link(link.header.index).await?;
            removed.devices.push(dev.to_owned());
        }
    }

    // The BGP daemon withdraws this node's routes from its peers as it
    // stops.
    removed.bgp_daemon = crate::agent::bgp::stop_daemon(&args.state_dir)?;
    remove_path(&args.state_dir.join("endpoints.json"), &mut removed)?;
    remove_path(&args.state_dir.join("bgp"), &mut removed)?;
    // A container has it as a mount point, which stays.
    if std::fs::read_dir(&args.state_dir).is_ok_and(|mut d| d.next().is_none())
        && std::fs::remove_dir(&args.state_dir).is_ok()
    {
        removed.files.push(args.state_dir.clone());
    }
    remove_path(&args.cni_conf_dir.join(&args.cni_conf_name), &mut removed)?;
    remove_path(
        &args.cni_bin_dir.join(dataplane_common::api::CNI_PLUGIN),
        &mut removed,
    )?;
    remove_path(&args.ipam_dir, &mut removed)?;
    Ok(removed)
}
