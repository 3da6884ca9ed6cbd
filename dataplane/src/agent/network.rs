//! The node's network: uplink and VXLAN device, node-level programs, the
//! ipcache, and routes to other nodes' pod CIDRs.

use super::*;

/// Uplink facts, forwarding, and in VXLAN mode the external-mode device.
/// Returns the node's network facts and the uplink's MTU.
pub(super) async fn setup_node(args: &AgentArgs, nl: &Nl) -> Result<(Net, u32)> {
    sys::write_sysctl("net/ipv4/ip_forward", "1")?;
    let uplink = nl
        .link(&args.uplink)
        .await?
        .with_context(|| format!("--uplink {}: no such interface", args.uplink))?;
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
                format!(
                    "--uplink {} has no IPv4 address; pass --node-ip",
                    args.uplink
                )
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
    }
    let net = Net {
        mode: args.mode,
        uplink: args.uplink.clone(),
        uplink_ifindex: uplink.header.index,
        vxlan_ifindex,
        node_ip,
    };
    Ok((net, uplink_mtu))
}

pub(super) fn attach_node_programs(
    datapath: &mut Datapath,
    net: &Net,
    args: &AgentArgs,
) -> Result<Vec<Attached>> {
    let mut links = vec![datapath.attach(PROG_HOST_IN, &net.uplink, TcAttachType::Ingress)?];
    if net.mode == Mode::Vxlan {
        let dev = &args.vxlan_device;
        links.push(datapath.attach(PROG_OVERLAY_IN, dev, TcAttachType::Ingress)?);
        links.push(datapath.attach(PROG_OVERLAY_OUT, dev, TcAttachType::Egress)?);
    }
    Ok(links)
}

pub(super) fn ipcache_put(
    datapath: &mut Datapath,
    net: impl Into<ipnetwork::IpNetwork>,
    entry: IpcacheEntry,
) -> Result<()> {
    let net = net.into();
    let (len, key) = IpcacheKey::prefix(net.network(), net.prefix());
    datapath
        .ipcache()?
        .insert(&aya::maps::lpm_trie::Key::new(len, key), entry, 0)
        .with_context(|| format!("{MAP_IPCACHE}: inserting {net}"))
}

pub(super) fn ipcache_del(
    datapath: &mut Datapath,
    net: impl Into<ipnetwork::IpNetwork>,
) -> Result<()> {
    let net = net.into();
    let (len, key) = IpcacheKey::prefix(net.network(), net.prefix());
    match datapath
        .ipcache()?
        .remove(&aya::maps::lpm_trie::Key::new(len, key))
    {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("{MAP_IPCACHE}: removing {net}")),
    }
}

pub(super) fn entry(kind: u8, tunnel: Option<std::net::Ipv4Addr>) -> IpcacheEntry {
    let mut e = IpcacheEntry {
        kind,
        ..Default::default()
    };
    if let Some(ip) = tunnel {
        e.tunnel_family = dataplane_common::FAMILY_IPV4;
        e.tunnel_endpoint[..4].copy_from_slice(&ip.octets());
    }
    e
}

pub(super) fn host_net(ip: std::net::Ipv4Addr) -> ipnetwork::Ipv4Network {
    ipnetwork::Ipv4Network::from(ip)
}

/// Settings, the cluster range, this node's CIDR and address.
pub(super) fn init_maps(
    datapath: &mut Datapath,
    net: &Net,
    args: &AgentArgs,
    cluster_cidr: ipnetwork::IpNetwork,
    pod_cidr: Option<ipnetwork::IpNetwork>,
) -> Result<()> {
    let cfg = DatapathConfig {
        mode: match net.mode {
            Mode::Vxlan => MODE_VXLAN,
            Mode::Native => MODE_NATIVE,
        },
        _pad: [0; 3],
        vni: args.vni,
        vxlan_ifindex: net.vxlan_ifindex,
        uplink_ifindex: net.uplink_ifindex,
    };
    datapath
        .config()?
        .set(0, cfg, 0)
        .context("writing dp_config")?;
    ipcache_put(datapath, cluster_cidr, entry(IPCACHE_KIND_CLUSTER, None))?;
    if let Some(cidr) = pod_cidr {
        ipcache_put(datapath, cidr, entry(IPCACHE_KIND_LOCAL_PODS, None))?;
    }
    ipcache_put(
        datapath,
        host_net(net.node_ip),
        entry(IPCACHE_KIND_HOST, None),
    )
}

pub(super) fn route_for(
    net: &Net,
    node: &RemoteNode,
) -> rtnetlink::packet_route::route::RouteMessage {
    let cidr = node.pod_cidr;
    match net.mode {
        Mode::Vxlan => Nl::pod_cidr_route(cidr.network(), cidr.prefix(), net.vxlan_ifindex, None),
        Mode::Native => Nl::pod_cidr_route(
            cidr.network(),
            cidr.prefix(),
            net.uplink_ifindex,
            Some(node.ip),
        ),
    }
}

/// Moves the datapath from the applied node list to `new`, touching only
/// nodes that changed: new entries go in before stale ones come out.
pub(super) async fn apply_nodes(
    state: &Arc<Mutex<State>>,
    nl: &Nl,
    new: std::collections::BTreeMap<String, RemoteNode>,
) -> Result<()> {
    let lock = || {
        state
            .lock()
            .map_err(|_| anyhow::anyhow!("agent state poisoned"))
    };
    // A removed node's CIDR or address may live on in a changed or new node.
    let cidr_gone = |n: &RemoteNode| !new.values().any(|m| m.pod_cidr == n.pod_cidr);
    let (remove, routes_up, routes_down) = {
        let mut st = lock()?;
        let (upsert, remove) = nodes::diff(&st.nodes, &new);
        for (name, n) in &upsert {
            ipcache_put(
                &mut st.datapath,
                n.pod_cidr,
                entry(IPCACHE_KIND_REMOTE_PODS, Some(n.ip)),
            )?;
            ipcache_put(
                &mut st.datapath,
                host_net(n.ip),
                entry(IPCACHE_KIND_HOST, None),
            )?;
            info!(node = %name, ip = %n.ip, pod_cidr = %n.pod_cidr, "node installed");
        }
        let up: Vec<_> = upsert.iter().map(|(_, n)| route_for(&st.net, n)).collect();
        let down: Vec<_> = remove
            .iter()
            .filter(|(_, n)| cidr_gone(n))
            .map(|(_, n)| route_for(&st.net, n))
            .collect();
        (remove, up, down)
    };
    for route in routes_up {
        nl.replace_route(route).await?;
    }
    for route in routes_down {
        nl.del_route(route).await?;
    }
    let mut st = lock()?;
    let own_ip = st.net.node_ip;
    for (name, n) in &remove {
        if cidr_gone(n) {
            ipcache_del(&mut st.datapath, n.pod_cidr)?;
        }
        if n.ip != own_ip && !new.values().any(|m| m.ip == n.ip) {
            ipcache_del(&mut st.datapath, host_net(n.ip))?;
        }
        if !new.contains_key(name) {
            info!(node = %name, ip = %n.ip, pod_cidr = %n.pod_cidr, "node removed");
        }
    }
    st.nodes = new;
    Ok(())
}

/// Remote nodes an earlier agent installed (the pinned ipcache outlives it):
/// recorded as applied, so the first node list applied updates them in place
/// and removes those no longer listed.
pub(super) fn adopt_installed_nodes(state: &mut State) -> Result<()> {
    let installed: Vec<(String, RemoteNode)> = state
        .datapath
        .ipcache()?
        .iter()
        .filter_map(|e| e.ok())
        .filter(|(_, v)| v.kind == IPCACHE_KIND_REMOTE_PODS)
        .filter_map(|(k, v)| {
            let (std::net::IpAddr::V4(net), Some(std::net::IpAddr::V4(ip))) =
                (k.data().ip()?, v.tunnel_endpoint())
            else {
                return None;
            };
            let len = u8::try_from(
                k.prefix_len()
                    .checked_sub(dataplane_common::IPCACHE_STATIC_PREFIX)?,
            )
            .ok()?;
            let pod_cidr = ipnetwork::Ipv4Network::new(net, len).ok()?;
            Some((
                format!("(installed before restart) {pod_cidr}"),
                RemoteNode { ip, pod_cidr },
            ))
        })
        .collect();
    state.nodes.extend(installed);
    Ok(())
}

/// `--cleanup`: programs, pins, the VXLAN device, routes and the endpoint
/// registry go; the pods lose connectivity until an agent runs again.
pub(super) async fn cleanup(state: &Arc<Mutex<State>>, nl: &Nl) -> Result<()> {
    // Maps and pins under the lock; netlink after it is released.
    let (routes, vxlan) = {
        let mut st = state
            .lock()
            .map_err(|_| anyhow::anyhow!("agent state poisoned"))?;
        let ids: Vec<String> = st.endpoints.keys().cloned().collect();
        for id in ids {
            endpoint_del(&mut st, &id)?;
        }
        for link in std::mem::take(&mut st.node_links) {
            st.datapath.detach(link)?;
        }
        let _ = std::fs::remove_file(&st.registry);
        std::fs::remove_dir_all(st.datapath.pin_dir())
            .with_context(|| format!("removing {}", st.datapath.pin_dir().display()))?;
        let routes: Vec<_> = st.nodes.values().map(|n| route_for(&st.net, n)).collect();
        (
            routes,
            (st.net.mode == Mode::Vxlan).then_some(st.net.vxlan_ifindex),
        )
    };
    for route in routes {
        nl.del_route(route).await?;
    }
    if let Some(index) = vxlan {
        nl.del_link(index).await?;
    }
    Ok(())
}
