//! Endpoints (pods on this node): programs on their veth, entries in the
//! maps, and the registry that lets a restarted agent adopt them.

use super::*;

pub(super) const LXC_HOOKS: [(&str, TcAttachType); 2] = [
    (PROG_LXC_FROM_CTR, TcAttachType::Ingress),
    (PROG_LXC_TO_CTR, TcAttachType::Egress),
];

/// Registers an endpoint. `fresh` is false when re-adopting one after a
/// restart: its counters then carry on.
pub(super) fn endpoint_add(state: &mut State, spec: EndpointSpec, fresh: bool) -> Result<()> {
    let id = spec.container_id.clone();
    if id.is_empty() {
        bail!("endpoint: container_id is empty");
    }
    if spec.ips.is_empty() {
        bail!("endpoint {id}: ips is empty");
    }
    let mac = parse_mac(&spec.mac)
        .with_context(|| format!("endpoint {id}: mac {:?} is not aa:bb:cc:dd:ee:ff", spec.mac))?;
    if let Some(existing) = state.endpoints.get(&id) {
        if existing.spec == spec {
            return Ok(()); // a retried ADD
        }
        endpoint_del(state, &id)?;
    }
    for other in state.endpoints.values() {
        if let Some(ip) = other.spec.ips.iter().find(|ip| spec.ips.contains(ip)) {
            bail!(
                "endpoint {id}: ip {ip} already belongs to endpoint {}",
                other.spec.container_id
            );
        }
    }
    let ifindex =
        sys::ifindex(&spec.host_ifname).with_context(|| format!("endpoint {id}: host_ifname"))?;
    let host_mac =
        sys::hwaddr(&spec.host_ifname).with_context(|| format!("endpoint {id}: host_ifname"))?;

    let mut live = LiveEndpoint {
        spec,
        ifindex,
        links: Vec::new(),
        keys: Vec::new(),
    };
    if let Err(e) = install(state, &mut live, mac, host_mac, fresh) {
        uninstall(state, &mut live);
        return Err(e.context(format!("endpoint {id}")));
    }
    info!(endpoint = %id, ifname = %live.spec.host_ifname, ifindex, ips = ?live.spec.ips, "endpoint added");
    state.endpoints.insert(id, live);
    Ok(())
}

/// Programs first, then map entries: once an address is in the map, the
/// programs that act on it are already there. Records what it did in `live`
/// so a failure part-way can be undone.
pub(super) fn install(
    state: &mut State,
    live: &mut LiveEndpoint,
    mac: [u8; 6],
    host_mac: [u8; 6],
    fresh: bool,
) -> Result<()> {
    // Counters from an earlier endpoint that had the same ifindex must not
    // leak into this one.
    if fresh {
        remove_counters(state, live.ifindex);
    }
    for (prog, hook) in LXC_HOOKS {
        let link = state.datapath.attach(prog, &live.spec.host_ifname, hook)?;
        live.links.push(link);
    }
    let info = EndpointInfo {
        ifindex: live.ifindex,
        identity: 0,
        mac,
        host_mac,
        flags: EP_F_LOCAL,
        _pad: 0,
    };
    let mut map = state.datapath.endpoints()?;
    for ip in &live.spec.ips {
        let key = EndpointKey::from(*ip);
        map.insert(key, info, 0)
            .with_context(|| format!("{MAP_ENDPOINTS}: inserting {ip}"))?;
        live.keys.push(key);
    }
    Ok(())
}

pub(super) fn uninstall(state: &mut State, live: &mut LiveEndpoint) {
    if let Ok(mut map) = state.datapath.endpoints() {
        for key in &live.keys {
            if let Err(e) = map.remove(key) {
                warn!("{MAP_ENDPOINTS}: removing {key}: {e}");
            }
        }
    }
    for link in live.links.drain(..) {
        // Fails harmlessly when the veth is already gone (its links went with it).
        if let Err(e) = state.datapath.detach(link) {
            debug!("detaching from {}: {e:#}", live.spec.host_ifname);
        }
    }
    remove_counters(state, live.ifindex);
}

pub(super) fn remove_counters(state: &mut State, ifindex: u32) {
    let Ok(mut map) = state.datapath.ep_metrics() else {
        return;
    };
    for direction in [Direction::FromEndpoint, Direction::ToEndpoint] {
        // Absent keys are the common case.
        let _ = map.remove(&EpMetricsKey::new(ifindex, direction));
    }
}

pub(super) fn endpoint_del(state: &mut State, container_id: &str) -> Result<()> {
    // Unknown endpoints are not an error: DEL must be idempotent.
    if let Some(mut live) = state.endpoints.remove(container_id) {
        uninstall(state, &mut live);
        info!(endpoint = %container_id, "endpoint removed");
    }
    Ok(())
}

pub(super) fn save_registry(state: &State) -> Result<()> {
    let mut specs: Vec<&EndpointSpec> = state.endpoints.values().map(|e| &e.spec).collect();
    specs.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    if let Some(dir) = state.registry.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = state.registry.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&specs)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &state.registry)
        .with_context(|| format!("writing {}", state.registry.display()))
}

/// After a restart: adopt the endpoints an earlier agent registered (their
/// pinned links get our programs, their map entries stay), forget those whose
/// veth went away meanwhile, and remove pins and entries nobody claims.
pub(super) fn restore(state: &mut State) -> Result<()> {
    let specs: Vec<EndpointSpec> = match std::fs::read(&state.registry) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(
                "{}: {e}; starting with no endpoints",
                state.registry.display()
            );
            Vec::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", state.registry.display())),
    };
    for spec in specs {
        let id = spec.container_id.clone();
        if sys::ifindex(&spec.host_ifname).is_ok() {
            match endpoint_add(state, spec, false) {
                Ok(()) => info!(endpoint = %id, "endpoint adopted"),
                Err(e) => warn!(endpoint = %id, "could not adopt: {e:#}"),
            }
        } else {
            info!(endpoint = %id, ifname = %spec.host_ifname, "endpoint gone while the agent was away");
        }
    }
    // Pins of links nobody claims (endpoints gone, programs renamed).
    let claimed: Vec<PathBuf> = state
        .endpoints
        .values()
        .flat_map(|e| e.links.iter())
        .chain(state.node_links.iter())
        .filter_map(|l| match l {
            Attached::Pinned(p) => Some(p.clone()),
            Attached::Owned(..) => None,
        })
        .collect();
    if let Ok(dir) = std::fs::read_dir(state.datapath.pin_dir().join("links")) {
        for pin in dir.flatten().map(|e| e.path()) {
            if !claimed.contains(&pin) {
                info!(pin = %pin.display(), "removing an unclaimed link");
                state.datapath.detach(Attached::Pinned(pin))?;
            }
        }
    }
    telemetry::set_objects(&state.telemetry, "endpoint", state.endpoints.len());
    // Local endpoint entries nobody claims.
    let live: Vec<EndpointKey> = state
        .endpoints
        .values()
        .flat_map(|e| e.keys.iter().copied())
        .collect();
    let stale: Vec<(EndpointKey, EndpointInfo)> = state
        .datapath
        .endpoints()?
        .iter()
        .filter_map(|e| e.ok())
        .filter(|(k, v)| v.flags & EP_F_LOCAL != 0 && !live.contains(k))
        .collect();
    let mut map = state.datapath.endpoints()?;
    for (key, _) in &stale {
        map.remove(key)
            .with_context(|| format!("{MAP_ENDPOINTS}: removing {key}"))?;
        info!(ip = %key, "removed the entry of an endpoint that is gone");
    }
    for (_, info) in stale {
        remove_counters(state, info.ifindex);
    }
    save_registry(state)
}
