//! Endpoints (pods on this node): programs on their veth, entries in the
//! maps, and the registry that lets a restarted agent adopt them.

use std::{collections::BTreeSet, path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result, bail};
use dataplane_common::{
    AttachPoint, EP_F_LOCAL, EndpointInfo, EndpointKey, PROGRAMS, api::EndpointSpec, parse_mac,
};
use tracing::{debug, info, warn};

use super::{Agent, lock};
use crate::bpf::{Attached, Target};

pub(crate) struct LiveEndpoint {
    pub spec: EndpointSpec,
    pub ifindex: u32,
    pub links: Vec<Attached>,
}

/// The agent cannot take the request yet (the CNI plugin says "try again").
#[derive(Debug)]
pub struct NotReady(pub String);

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotReady {}

fn entries(
    spec: &EndpointSpec,
    ifindex: u32,
    mac: [u8; 6],
    host_mac: [u8; 6],
) -> Vec<(EndpointKey, EndpointInfo)> {
    let info = EndpointInfo {
        ifindex,
        identity: 0,
        mac,
        host_mac,
        flags: EP_F_LOCAL,
        _pad: 0,
    };
    spec.ips
        .iter()
        .map(|ip| (EndpointKey::from(*ip), info))
        .collect()
}

/// The veth's index and MAC, from netlink in the agent's namespace.
async fn veth(agent: &Agent, id: &str, ifname: &str) -> Result<(u32, [u8; 6])> {
    let link = agent
        .nl
        .link(ifname)
        .await?
        .with_context(|| format!("endpoint {id}: host_ifname {ifname:?}: no such interface"))?;
    let mac = dataplane_common::netlink::link_mac(&link)
        .with_context(|| format!("endpoint {id}: host_ifname {ifname:?} has no MAC address"))?;
    Ok((link.header.index, mac))
}

/// Registers an endpoint (the API's ADD). The caller holds the API lock.
pub(super) async fn add(agent: &Arc<Agent>, spec: EndpointSpec) -> Result<()> {
    let id = spec.container_id.clone();
    if id.is_empty() {
        bail!("endpoint: container_id is empty");
    }
    if !agent.update_ready()? {
        let st = lock(&agent.status)?;
        let why = if !st.restored {
            "restoring its endpoints"
        } else if !st.synced {
            "reading the cluster state"
        } else {
            "waiting for this node's pod CIDR (spec.podCIDR of its Node object)"
        };
        return Err(NotReady(format!("the agent is not ready yet: {why}")).into());
    }
    if spec.ips.is_empty() {
        bail!("endpoint {id}: ips is empty");
    }
    let mac = parse_mac(&spec.mac)
        .with_context(|| format!("endpoint {id}: mac {:?} is not aa:bb:cc:dd:ee:ff", spec.mac))?;
    let existing = lock(&agent.registry)?.get(&id).map(|e| e.spec.clone());
    if existing.as_ref() == Some(&spec) {
        return Ok(()); // a retried ADD
    }
    let keys: Vec<EndpointKey> = spec.ips.iter().map(|ip| EndpointKey::from(*ip)).collect();
    if let Some((key, other)) = lock(&agent.endpoints)?.local_conflict(&id, &keys) {
        bail!("endpoint {id}: ip {key} already belongs to endpoint {other}");
    }
    let (ifindex, host_mac) = veth(agent, &id, &spec.host_ifname).await?;
    let agent2 = agent.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        if existing.is_some() {
            remove(&agent2, &spec.container_id)?;
        }
        install(&agent2, spec, ifindex, mac, host_mac, true)
    })
    .await
    .context("endpoint worker")??;
    save_registry(agent)?;
    wait_policy(agent, &id).await;
    Ok(())
}

/// Programs first, then map entries: once an address is in the map, the
/// programs that act on it are already there. A failure part-way is undone.
/// `fresh` is false when re-adopting after a restart: entries then go in
/// first (a map recreated for a new layout must be filled before our
/// programs replace the old ones), and counters carry on.
fn install(
    agent: &Agent,
    spec: EndpointSpec,
    ifindex: u32,
    mac: [u8; 6],
    host_mac: [u8; 6],
    fresh: bool,
) -> Result<()> {
    let id = spec.container_id.clone();
    let mut live = LiveEndpoint {
        spec,
        ifindex,
        links: Vec::new(),
    };
    let result = (|| -> Result<()> {
        let e = entries(&live.spec, ifindex, mac, host_mac);
        if fresh {
            lock(&agent.ep_metrics)?.remove_endpoint(ifindex)?;
        } else {
            lock(&agent.endpoints)?.set_local(&id, e.clone())?;
        }
        for prog in PROGRAMS
            .iter()
            .filter(|p| p.attach == AttachPoint::EndpointVeth)
        {
            let link = lock(&agent.datapath)?.attach(
                prog,
                Target::Iface(&live.spec.host_ifname),
                agent.xdp,
            )?;
            live.links.push(link);
        }
        if fresh {
            lock(&agent.endpoints)?.set_local(&id, e)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        uninstall(agent, &id, &mut live);
        return Err(e.context(format!("endpoint {id}")));
    }
    if fresh {
        info!(endpoint = %id, ifname = %live.spec.host_ifname, ifindex, ips = ?live.spec.ips, "endpoint added");
    }
    lock(&agent.registry)?.insert(id, live);
    telemetry_count(agent);
    // Its policy is compiled by the reconciler, which has the cluster.
    agent
        .policy_wanted
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    agent.policy_dirty.notify_one();
    Ok(())
}

/// How long an ADD waits for its pod's policy before answering anyway.
const POLICY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until the reconciler has compiled every endpoint change asked
/// for so far: the runtime starts the pod only once its policy holds.
async fn wait_policy(agent: &Agent, id: &str) {
    let want = agent
        .policy_wanted
        .load(std::sync::atomic::Ordering::SeqCst);
    let mut rx = agent.policy_applied.subscribe();
    if tokio::time::timeout(POLICY_WAIT, rx.wait_for(|g| *g >= want))
        .await
        .is_err()
    {
        warn!(endpoint = %id, "its NetworkPolicy is not compiled after {POLICY_WAIT:?}; answering the runtime anyway");
    }
}

fn telemetry_count(agent: &Agent) {
    if let Ok(r) = lock(&agent.registry) {
        crate::telemetry::set_objects(&agent.telemetry, "endpoint", r.len());
    }
}

fn uninstall(agent: &Agent, id: &str, live: &mut LiveEndpoint) {
    if let Err(e) = lock(&agent.endpoints).and_then(|mut m| m.set_local(id, Vec::new())) {
        warn!(endpoint = %id, "removing its entries: {e:#}");
    }
    for link in live.links.drain(..) {
        // Fails harmlessly when the veth is already gone (its links went with it).
        if let Err(e) = lock(&agent.datapath).and_then(|mut d| d.detach(link)) {
            debug!("detaching from {}: {e:#}", live.spec.host_ifname);
        }
    }
    if let Err(e) = lock(&agent.ep_metrics).and_then(|mut m| m.remove_endpoint(live.ifindex)) {
        warn!(endpoint = %id, "removing its counters: {e:#}");
    }
}

/// Unregisters an endpoint; unknown ones are not an error (DEL must be
/// idempotent).
pub(super) fn remove(agent: &Agent, container_id: &str) -> Result<()> {
    let live = lock(&agent.registry)?.remove(container_id);
    if let Some(mut live) = live {
        uninstall(agent, container_id, &mut live);
        info!(endpoint = %container_id, "endpoint removed");
        agent.policy_dirty.notify_one();
    }
    telemetry_count(agent);
    Ok(())
}

/// The socket programs' view of who sends from which network namespace:
/// this node, and every local endpoint whose plugin gave its namespace's
/// cookie (their first IPv4 address).
pub(super) fn sync_sock_clients(agent: &Agent) -> Result<()> {
    let mut want = std::collections::BTreeMap::new();
    if let Some(c) = agent.own_netns_cookie {
        want.insert(c, agent.net.node_ip);
    }
    for live in lock(&agent.registry)?.values() {
        let ip = live.spec.ips.iter().find_map(|ip| match ip {
            std::net::IpAddr::V4(v4) => Some(*v4),
            std::net::IpAddr::V6(_) => None,
        });
        if let (Some(cookie), Some(ip)) = (live.spec.netns_cookie, ip) {
            want.insert(cookie, ip);
        }
    }
    lock(&agent.sock_clients)?.set(&want)?;
    Ok(())
}

/// Every change of the registry ends here: it is written for the next
/// agent, and the socket programs learn the namespaces it holds.
pub(super) fn save_registry(agent: &Agent) -> Result<()> {
    sync_sock_clients(agent)?;
    let specs: Vec<EndpointSpec> = lock(&agent.registry)?
        .values()
        .map(|e| e.spec.clone())
        .collect();
    let path = &agent.registry_file;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&specs)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// After a restart: adopt the endpoints an earlier agent registered (their
/// entries are rewritten, then their pinned links get our programs), forget
/// those whose veth went away meanwhile, and bring the map's local entries
/// and the counters to exactly the adopted endpoints.
pub(super) async fn restore(agent: &Arc<Agent>) -> Result<()> {
    let specs: Vec<EndpointSpec> = match std::fs::read(&agent.registry_file) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(
                "{}: {e}; starting with no endpoints",
                agent.registry_file.display()
            );
            Vec::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(e).with_context(|| format!("reading {}", agent.registry_file.display()));
        }
    };
    let mut found = Vec::new();
    for spec in specs {
        let id = spec.container_id.clone();
        let Some(mac) = parse_mac(&spec.mac) else {
            warn!(endpoint = %id, "registry entry has a bad mac; forgotten");
            continue;
        };
        match veth(agent, &id, &spec.host_ifname).await {
            Ok((ifindex, host_mac)) => found.push((spec, ifindex, mac, host_mac)),
            Err(_) => {
                info!(endpoint = %id, ifname = %spec.host_ifname, "endpoint gone while the agent was away");
            }
        }
    }
    let agent2 = agent.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        for (spec, ifindex, mac, host_mac) in found {
            let id = spec.container_id.clone();
            match install(&agent2, spec, ifindex, mac, host_mac, false) {
                Ok(()) => info!(endpoint = %id, "endpoint adopted"),
                Err(e) => warn!(endpoint = %id, "could not adopt: {e:#}"),
            }
        }
        let stats = lock(&agent2.endpoints)?.sync_local()?;
        if stats.removed > 0 {
            info!(
                entries = stats.removed,
                "removed the entries of endpoints that are gone"
            );
        }
        let live: BTreeSet<u32> = lock(&agent2.registry)?
            .values()
            .map(|e| e.ifindex)
            .collect();
        let swept = lock(&agent2.ep_metrics)?.sweep(&live)?;
        if swept > 0 {
            info!(
                endpoints = swept,
                "removed the counters of endpoints that are gone"
            );
        }
        Ok(())
    })
    .await
    .context("restore worker")??;
    telemetry_count(agent);
    save_registry(agent)
}

/// Pins of links nobody claims (endpoints gone, programs renamed, a device
/// or cgroup no longer used) are detached and removed.
pub(super) fn sweep_unclaimed(agent: &Agent) -> Result<()> {
    let mut claimed: Vec<PathBuf> = lock(&agent.registry)?
        .values()
        .flat_map(|e| e.links.iter())
        .filter_map(|l| l.pin().map(PathBuf::from))
        .collect();
    claimed.extend(
        lock(&agent.node_links)?
            .iter()
            .filter_map(|l| l.pin().map(PathBuf::from)),
    );
    if let Ok(dir) = std::fs::read_dir(agent.pin_dir.join("links")) {
        for pin in dir.flatten().map(|e| e.path()) {
            if !claimed.contains(&pin) {
                info!(pin = %pin.display(), "removing an unclaimed link");
                lock(&agent.datapath)?.detach(Attached::Pinned(pin))?;
            }
        }
    }
    Ok(())
}
