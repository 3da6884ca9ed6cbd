//! The node's network: uplink and VXLAN device, node-level programs, and
//! routes to other nodes' pod CIDRs, synced against the routes the kernel
//! really has (ours carry [`ROUTE_PROTOCOL`]).

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, Result, bail};
use dataplane_common::{
    AttachPoint, DatapathConfig, MODE_NATIVE, MODE_VXLAN, PROGRAMS, ProgKind,
    netlink::{Nl, ROUTE_PROTOCOL, route_key},
};
use rtnetlink::packet_route::route::RouteMessage;
use tracing::{info, warn};

use super::{Agent, AgentArgs, Mode, Net, VXLAN_OVERHEAD, lock};

/// The node's host device and its peer.
pub(crate) const HOST_DEVICE: &str = "dp_host";
const HOST_DEVICE_PEER: &str = "dp_net";

use crate::{
    bpf::{Target, XdpSetting},
    nodes::RemoteNode,
    sys,
};

/// Uplink facts, forwarding, and in VXLAN mode the external-mode device.
/// Interfaces that are never the uplink: loopback and the agent's own
/// devices (pod veths, the host device, the VXLAN device).
fn ours_or_loopback(name: &str, vxlan_device: &str) -> bool {
    name == "lo" || name == vxlan_device || name.starts_with("lxc") || name.starts_with("dp_")
}

/// Picks the uplink for `--uplink auto` from (name, ifindex, IPv4
/// addresses) of the node's interfaces: the one holding `--node-ip`, else
/// the default route's, else the only other one with an IPv4 address.
fn pick_uplink(
    links: &[(String, u32, Vec<Ipv4Addr>)],
    node_ip: Option<Ipv4Addr>,
    default_route: Option<u32>,
    vxlan_device: &str,
) -> Result<String> {
    if let Some(ip) = node_ip {
        return links
            .iter()
            .find(|l| l.2.contains(&ip))
            .map(|l| l.0.clone())
            .with_context(|| format!("--uplink auto: no interface holds --node-ip {ip}"));
    }
    if let Some(l) = default_route.and_then(|i| links.iter().find(|l| l.1 == i)) {
        return Ok(l.0.clone());
    }
    let candidates: Vec<&String> = links
        .iter()
        .filter(|l| !ours_or_loopback(&l.0, vxlan_device) && !l.2.is_empty())
        .map(|l| &l.0)
        .collect();
    match candidates.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!("--uplink auto: no interface with an IPv4 address and no default route"),
        many => bail!(
            "--uplink auto: no default route, and several interfaces with IPv4 addresses ({}): name one with --uplink or pass --node-ip",
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

async fn resolve_uplink(args: &AgentArgs, nl: &Nl) -> Result<String> {
    if args.uplink != "auto" {
        return Ok(args.uplink.clone());
    }
    let mut links = Vec::new();
    for l in nl.links().await? {
        let Some(name) = dataplane_common::netlink::link_name(&l) else {
            continue;
        };
        let v4 = nl
            .addrs(l.header.index)
            .await?
            .into_iter()
            .filter_map(|a| match a {
                std::net::IpAddr::V4(v4) => Some(v4),
                std::net::IpAddr::V6(_) => None,
            })
            .collect();
        links.push((name.to_owned(), l.header.index, v4));
    }
    let default_route = nl.default_route_ifindex().await?;
    let name = pick_uplink(&links, args.node_ip, default_route, &args.vxlan_device)?;
    info!(uplink = %name, "uplink chosen (--uplink auto)");
    Ok(name)
}

/// Returns the node's network facts and the uplink's MTU.
pub(super) async fn setup_node(args: &AgentArgs, nl: &Nl) -> Result<(Net, u32)> {
    sys::write_sysctl("net/ipv4/ip_forward", "1")?;
    let uplink_name = resolve_uplink(args, nl).await?;
    let uplink = nl
        .link(&uplink_name)
        .await?
        .with_context(|| format!("--uplink {uplink_name}: no such interface"))?;
    let uplink_mtu = dataplane_common::netlink::link_mtu(&uplink).unwrap_or(1500);
    let node_ip = match args.node_ip {
        Some(ip) => ip,
        None => nl
            .addrs(uplink.header.index)
            .await?
            .into_iter()
            .find_map(|a| match a {
                std::net::IpAddr::V4(v4) => Some(v4),
                std::net::IpAddr::V6(_) => None,
            })
            .with_context(|| {
                format!("--uplink {uplink_name} has no IPv4 address; pass --node-ip")
            })?,
    };
    let mut vxlan_ifindex = 0;
    if args.mode == Mode::Vxlan {
        let dev = &args.vxlan_device;
        if nl.link(dev).await?.is_none() {
            nl.add_vxlan_external(dev, args.vxlan_port, uplink_mtu - VXLAN_OVERHEAD)
                .await?;
        }
        let link = nl
            .link(dev)
            .await?
            .with_context(|| format!("{dev} vanished after creation"))?;
        nl.set_up_noarp(link.header.index).await?;
        vxlan_ifindex = link.header.index;
        // Replies from remote pods to this node come back on the uplink,
        // not the device the request left by.
        sys::write_sysctl(&format!("net/ipv4/conf/{dev}/rp_filter"), "0")?;
        // The tunnel carries the datapath's IPv4 only: no router
        // solicitations or MLD reports of the node's own into it (they would
        // be dropped there as unsupported). Absent when IPv6 is off.
        let v6 = format!("net/ipv6/conf/{dev}/disable_ipv6");
        if sys::sysctl_path(&v6).exists() {
            sys::write_sysctl(&v6, "1")?;
        }
    }
    // The host device: the Service range is routed into it, so the node's
    // own traffic to Services meets the datapath. Its peer only carries it.
    let service_cidr = match dataplane_common::api::parse_cidr(&args.service_cidr)
        .map_err(|e| anyhow::anyhow!("--service-cidr: {e}"))?
    {
        ipnetwork::IpNetwork::V4(v4) => v4,
        ipnetwork::IpNetwork::V6(_) => {
            bail!("--service-cidr: IPv6 Services are not supported yet")
        }
    };
    if nl.link(HOST_DEVICE).await?.is_none() {
        nl.add_veth_local(HOST_DEVICE, HOST_DEVICE_PEER).await?;
    }
    let mut hostdev_ifindex = 0;
    for name in [HOST_DEVICE, HOST_DEVICE_PEER] {
        let link = nl
            .link(name)
            .await?
            .with_context(|| format!("{name} vanished after creation"))?;
        for (key, value) in [
            ("net/ipv4/conf/{}/rp_filter", "0"),
            ("net/ipv6/conf/{}/disable_ipv6", "1"),
        ] {
            let key = key.replace("{}", name);
            if sys::sysctl_path(&key).exists() {
                sys::write_sysctl(&key, value)?;
            }
        }
        nl.set_up_noarp(link.header.index).await?;
        if name == HOST_DEVICE {
            hostdev_ifindex = link.header.index;
        }
    }
    let net = Net {
        mode: args.mode,
        uplink: uplink_name.clone(),
        uplink_ifindex: uplink.header.index,
        vxlan_device: args.vxlan_device.clone(),
        vxlan_ifindex,
        node_ip,
        vni: args.vni,
        masquerade: args.masquerade,
        socket_lb: args.socket_lb == super::OnOff::On,
        xdp_lb: args.xdp_lb == super::OnOff::On,
        vxlan_port: args.vxlan_port,
        hostdev_ifindex,
        service_cidr,
    };
    Ok((net, uplink_mtu))
}

pub(super) fn datapath_config(net: &Net) -> DatapathConfig {
    DatapathConfig {
        mode: match net.mode {
            Mode::Vxlan => MODE_VXLAN,
            Mode::Native => MODE_NATIVE,
        },
        _pad: 0,
        vxlan_port: net.vxlan_port.to_be_bytes(),
        vni: net.vni,
        vxlan_ifindex: net.vxlan_ifindex,
        uplink_ifindex: net.uplink_ifindex,
        node_ipv4: net.node_ip.octets(),
        flags: if net.masquerade {
            dataplane_common::DP_F_MASQUERADE
        } else {
            0
        } | if net.socket_lb {
            dataplane_common::DP_F_SOCKET_LB
        } else {
            0
        } | if net.xdp_lb {
            dataplane_common::DP_F_XDP_LB
        } else {
            0
        },
    }
}

/// Every program of the table that attaches to the node (not to a pod):
/// uplink (XDP and tc), the VXLAN device in VXLAN mode, the cgroup.
pub(super) fn attach_node_programs(agent: &Agent) -> Result<()> {
    let mut links = Vec::new();
    for prog in PROGRAMS {
        let target = match prog.attach {
            AttachPoint::EndpointVeth => continue,
            AttachPoint::Uplink => Target::Iface(&agent.net.uplink),
            AttachPoint::TunnelDevice if agent.net.mode == Mode::Vxlan => {
                Target::Iface(&agent.net.vxlan_device)
            }
            AttachPoint::TunnelDevice => continue,
            AttachPoint::HostDevice => Target::Iface(HOST_DEVICE),
            AttachPoint::Cgroup => match &agent.cgroup {
                Some(c) => Target::Cgroup(c),
                None => continue,
            },
        };
        if prog.kind == ProgKind::Xdp && agent.xdp == XdpSetting::Off {
            continue;
        }
        links.push(lock(&agent.datapath)?.attach(prog, target, agent.xdp)?);
    }
    *lock(&agent.node_links)? = links;
    Ok(())
}

/// How XDP sits on the uplink, from the kernel (an adopted link does not
/// say whether it was made in native or generic mode).
pub(super) async fn xdp_mode(agent: &Agent) -> Result<&'static str> {
    let link = agent
        .nl
        .link(&agent.net.uplink)
        .await?
        .with_context(|| format!("--uplink {} vanished", agent.net.uplink))?;
    Ok(dataplane_common::netlink::link_xdp_mode(&link))
}

/// The routes' inputs, set by the reconciler as it learns them.
#[derive(Default)]
pub(super) struct RouteWants {
    /// Other nodes; `None` until the cluster state is first complete.
    pub nodes: Option<BTreeMap<String, RemoteNode>>,
    /// Service addresses (those outside the Service range get a route).
    pub external: std::collections::BTreeSet<std::net::Ipv4Addr>,
    /// External and LoadBalancer IPs served from this node (BGP may
    /// advertise them).
    pub served_externally: std::collections::BTreeSet<std::net::Ipv4Addr>,
    /// This node's BGP AS number and peers from its Node object's
    /// annotations, overriding the flags.
    pub bgp_own: crate::bgp::Overrides,
}

fn route_for(net: &Net, node: &RemoteNode) -> RouteMessage {
    let cidr = node.pod_cidr;
    match net.mode {
        Mode::Vxlan => Nl::pod_cidr_route(
            cidr.network(),
            cidr.prefix(),
            net.vxlan_ifindex,
            None,
            net.node_ip,
        ),
        Mode::Native => Nl::pod_cidr_route(
            cidr.network(),
            cidr.prefix(),
            net.uplink_ifindex,
            Some(node.ip),
            net.node_ip,
        ),
    }
}

/// Brings the kernel's routes tagged with [`ROUTE_PROTOCOL`] to exactly one
/// per remote node, the Service range and each Service address outside it
/// (external and LoadBalancer IPs: the node's own traffic to them meets
/// the datapath on the host device): missing or different ones are
/// replaced first, then the rest is removed. Nothing happens until the
/// nodes are known.
pub(super) async fn sync_routes(agent: &Agent) -> Result<(usize, usize)> {
    let (nodes, external) = {
        let r = lock(&agent.routes)?;
        let Some(nodes) = r.nodes.clone() else {
            return Ok((0, 0));
        };
        (nodes, r.external.clone())
    };
    // With BGP and native routing, the peers teach the routes to other
    // nodes' pods (their next hops need not share this node's L2).
    let mut want: Vec<RouteMessage> = if agent.bgp.is_some() && agent.net.mode == Mode::Native {
        Vec::new()
    } else {
        nodes.values().map(|n| route_for(&agent.net, n)).collect()
    };
    let svc = agent.net.service_cidr;
    let into_host = |ip: std::net::Ipv4Addr, len: u8| {
        Nl::pod_cidr_route(ip, len, agent.net.hostdev_ifindex, None, agent.net.node_ip)
    };
    want.push(into_host(svc.network(), svc.prefix()));
    for ip in external.iter().filter(|ip| !svc.contains(**ip)) {
        want.push(into_host(*ip, 32));
    }
    let have = agent.nl.own_routes().await?;
    let have_keys: Vec<_> = have.iter().map(route_key).collect();
    let want_keys: Vec<_> = want.iter().map(route_key).collect();
    let mut added = 0;
    for (route, key) in want.into_iter().zip(&want_keys) {
        if !have_keys.contains(key) {
            agent.nl.replace_route(route).await?;
            added += 1;
        }
    }
    let mut removed = 0;
    for (route, key) in have.into_iter().zip(&have_keys) {
        // Same destination as a wanted route: `replace` has rewritten it.
        if !want_keys.iter().any(|w| (w.0, w.1) == (key.0, key.1)) {
            agent.nl.del_route(route).await?;
            removed += 1;
        }
    }
    Ok((added, removed))
}

/// Tells the BGP daemon (if BGP is on) what this node advertises now: its
/// pod CIDR once known, and (with --bgp-advertise-services) the external
/// and LoadBalancer IPs it serves. A failure is logged and counted, and
/// retried with the next change or resync: the datapath goes on. `full`:
/// also make sure the daemon still answers.
pub(super) fn sync_bgp(agent: &Agent, full: bool) {
    let Some(bgp) = &agent.bgp else {
        return;
    };
    let adv = (|| -> Result<(crate::bgp::Advertised, crate::bgp::Overrides)> {
        let own = lock(&agent.status)?.own_cidr;
        let services = if agent.bgp_advertise_services {
            lock(&agent.routes)?.served_externally.clone()
        } else {
            Default::default()
        };
        Ok((
            crate::bgp::Advertised {
                pod_cidr: match own {
                    Some(ipnetwork::IpNetwork::V4(c)) => Some(c),
                    _ => None,
                },
                service_ips: services,
            },
            lock(&agent.routes)?.bgp_own.clone(),
        ))
    })();
    if let Err(e) = adv.and_then(|(adv, own)| bgp.apply(&adv, own, full)) {
        warn!("BGP: {e:#}");
        crate::telemetry::error(&agent.telemetry, "bgp");
    }
}

/// `--cleanup`: programs, pins, the VXLAN device, routes and the endpoint
/// registry go; the pods lose connectivity until an agent runs again.
pub(super) async fn cleanup(agent: &Agent) -> Result<()> {
    let ids: Vec<String> = lock(&agent.registry)?.keys().cloned().collect();
    for id in ids {
        super::endpoints::remove(agent, &id)?;
    }
    for link in std::mem::take(&mut *lock(&agent.node_links)?) {
        lock(&agent.datapath)?.detach(link)?;
    }
    let _ = std::fs::remove_file(&agent.registry_file);
    std::fs::remove_dir_all(&agent.pin_dir)
        .with_context(|| format!("removing {}", agent.pin_dir.display()))?;
    for route in agent.nl.own_routes().await? {
        agent.nl.del_route(route).await?;
    }
    if agent.net.mode == Mode::Vxlan {
        agent.nl.del_link(agent.net.vxlan_ifindex).await?;
    }
    agent.nl.del_link(agent.net.hostdev_ifindex).await?;
    if super::bgp::stop_daemon(&agent.state_dir)? {
        info!("BGP daemon stopped");
    }
    info!(protocol = ROUTE_PROTOCOL, "datapath removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    #[test]
    fn auto_uplink() {
        let links = vec![
            ("lo".to_owned(), 1, vec![ip("127.0.0.1")]),
            ("ens5".to_owned(), 2, vec![ip("10.0.0.5")]),
            ("docker0".to_owned(), 3, vec![ip("172.17.0.1")]),
            ("dp_host".to_owned(), 4, vec![ip("169.254.1.1")]),
            ("lxc1234".to_owned(), 5, vec![]),
        ];
        // The interface holding the node's address wins.
        assert_eq!(
            pick_uplink(&links, Some(ip("172.17.0.1")), Some(2), "dp_vxlan").expect("pick"),
            "docker0"
        );
        assert!(
            pick_uplink(&links, Some(ip("192.0.2.1")), Some(2), "dp_vxlan")
                .expect_err("no such address")
                .to_string()
                .contains("no interface holds --node-ip 192.0.2.1")
        );
        // Then the default route's.
        assert_eq!(
            pick_uplink(&links, None, Some(2), "dp_vxlan").expect("pick"),
            "ens5"
        );
        // Without one, the only candidate; several are named.
        let e = pick_uplink(&links, None, None, "dp_vxlan").expect_err("two candidates");
        assert!(e.to_string().contains("ens5, docker0"), "{e}");
        assert_eq!(
            pick_uplink(&links[..2], None, None, "dp_vxlan").expect("pick"),
            "ens5"
        );
    }
}
