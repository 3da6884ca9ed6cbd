//! From cluster state to the datapath. Sources report changes; the model
//! says what each change touched; only that is compared with the maps'
//! real contents and written. Once the state is first complete, and every
//! few minutes after, the whole of every map and the routes are compared
//! instead, which also heals anything changed behind the agent's back.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use dataplane_common::EndpointKey;
use ipnetwork::IpNetwork;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Agent, lock, network};
use crate::{
    cluster::{Changes, Cluster, Kind, Update},
    telemetry,
};

/// How often the whole datapath is compared with the desired state.
const RESYNC: Duration = Duration::from_secs(300);
/// Most updates folded into one reconcile (a relist of 10,000 pods is
/// applied in a few steps, each short).
const BATCH: usize = 4096;

/// Problems found in the cluster state, by topic; each is reported when it
/// appears and when it is resolved, not on every change.
#[derive(Default)]
pub(super) struct Problems(BTreeMap<String, BTreeSet<String>>);

impl Problems {
    pub(super) fn set(&mut self, t: &telemetry::Shared, topic: String, now: BTreeSet<String>) {
        let old = self.0.remove(&topic).unwrap_or_default();
        for p in now.difference(&old) {
            telemetry::error(t, "object_conflict");
            warn!("{p}");
        }
        for p in old.difference(&now) {
            info!("resolved: {p}");
        }
        if !now.is_empty() {
            self.0.insert(topic, now);
        }
    }
}

pub(super) async fn run(mut rx: mpsc::Receiver<Update>, agent: Arc<Agent>) {
    let mut cluster = Cluster::new(&agent.node);
    let mut problems = Problems::default();
    let mut resync = tokio::time::interval(RESYNC);
    resync.tick().await;
    // A sync barrier seen before the state is complete waits for it.
    let mut barrier: Option<u64> = None;
    loop {
        let mut ch = Changes::default();
        let mut endpoints_changed = false;
        let full = tokio::select! {
            u = rx.recv() => {
                let Some(u) = u else { return };
                cluster.apply(u, &mut ch);
                let mut n = 1;
                while n < BATCH {
                    let Ok(u) = rx.try_recv() else { break };
                    cluster.apply(u, &mut ch);
                    n += 1;
                }
                ch.synced
            }
            _ = resync.tick() => true,
            _ = agent.policy_dirty.notified() => {
                endpoints_changed = true;
                false
            }
        };
        barrier = barrier.max(ch.barrier.take());
        for kind in Kind::ALL {
            telemetry::set_objects(&agent.telemetry, kind.name(), cluster.count(kind));
        }
        if !cluster.synced() {
            continue;
        }
        if endpoints_changed {
            compile_endpoints(&agent, &cluster);
        } else if !ch.is_empty() || full {
            let started = Instant::now();
            match apply(&agent, &cluster, &ch, full, &mut problems).await {
                Ok(()) => {
                    telemetry::reconciled(&agent.telemetry, "cluster", started.elapsed());
                    if ch.synced {
                        if let Ok(mut st) = lock(&agent.status) {
                            st.synced = true;
                        }
                        info!("cluster state applied");
                    }
                    let _ = agent.update_ready();
                }
                Err(e) => {
                    telemetry::error(&agent.telemetry, "reconcile");
                    warn!("applying cluster state: {e:#}");
                }
            }
        }
        // Everything before the barrier has been applied (or failed and
        // been logged): whoever waits on it may go on.
        if let Some(b) = barrier.take() {
            agent.barrier_passed.send_if_modified(|passed| {
                let newer = *passed < b;
                if newer {
                    *passed = b;
                }
                newer
            });
        }
    }
}

/// Compiles the policy of local endpoints that came or went, and tells the
/// endpoint adds waiting for it.
fn compile_endpoints(agent: &Agent, cluster: &Cluster) {
    let started = Instant::now();
    let wanted = agent
        .policy_wanted
        .load(std::sync::atomic::Ordering::SeqCst);
    match tokio::task::block_in_place(|| {
        super::policy::apply(agent, cluster, super::policy::Scope::Endpoints)
    }) {
        Ok(()) => telemetry::reconciled(&agent.telemetry, "policy", started.elapsed()),
        Err(e) => {
            telemetry::error(&agent.telemetry, "reconcile");
            warn!("applying NetworkPolicy: {e:#}");
        }
    }
    // Answered either way: a failure is logged, not waited out.
    agent.policy_applied.send_if_modified(|g| {
        let newer = *g < wanted;
        if newer {
            *g = wanted;
        }
        newer
    });
}

/// Moves the datapath to what the model says for what `ch` touched (all of
/// it when `full`): this node's CIDR, remote nodes, remote pods.
async fn apply(
    agent: &Agent,
    cluster: &Cluster,
    ch: &Changes,
    full: bool,
    problems: &mut Problems,
) -> Result<()> {
    if ch.nodes || full {
        let (own, nodes, node_problems) = cluster.nodes();
        problems.set(&agent.telemetry, "nodes".into(), node_problems);
        let own = own.map(IpNetwork::V4);
        let applied = lock(&agent.status)?.own_cidr;
        if !agent.own_cidr_fixed && own.is_some() && own != applied {
            tokio::task::block_in_place(|| lock(&agent.ipcache)?.set_own_cidr(own))?;
            lock(&agent.status)?.own_cidr = own;
            if let Some(c) = own {
                info!(pod_cidr = %c, "this node's pod CIDR, from its Node object");
            }
        }
        let stats = tokio::task::block_in_place(|| lock(&agent.ipcache)?.set_nodes(nodes.clone()))?;
        lock(&agent.routes)?.nodes = Some(nodes.clone());
        let (added, removed) = network::sync_routes(agent).await?;
        if !stats.is_empty() || added + removed > 0 {
            info!(
                nodes = nodes.len(),
                ipcache_added = stats.added,
                ipcache_changed = stats.changed,
                ipcache_removed = stats.removed,
                routes_added = added,
                routes_removed = removed,
                "nodes applied"
            );
        }
        lock(&agent.status)?.nodes = nodes.len();
        lock(&agent.routes)?.bgp_own = cluster.own_bgp();
        network::sync_bgp(agent, full);
    }
    let ips: Vec<IpAddr> = if full {
        cluster.pod_ips().collect()
    } else {
        ch.pod_ips.iter().copied().collect()
    };
    let mut changes = Vec::with_capacity(ips.len());
    let mut pod_problems = Vec::with_capacity(ips.len());
    for ip in ips {
        let (winner, lost) = cluster.remote_pod(ip);
        pod_problems.push((ip, winner.clone(), lost));
        changes.push((EndpointKey::from(ip), winner));
    }
    tokio::task::block_in_place(|| -> Result<()> {
        let mut eps = lock(&agent.endpoints)?;
        eps.set_remote(changes)?;
        if full {
            let stats = eps.sync_all()?;
            if !stats.is_empty() {
                info!(
                    added = stats.added,
                    changed = stats.changed,
                    removed = stats.removed,
                    "dp_endpoints compared with the desired state and fixed"
                );
            }
        }
        for (ip, winner, mut lost) in pod_problems {
            if let Some(pod) = winner
                && eps.is_local(&EndpointKey::from(ip))
            {
                lost.push(format!(
                    "Pod {pod}: status.podIPs: address {ip} belongs to an endpoint on this node; skipped"
                ));
            }
            problems.set(
                &agent.telemetry,
                format!("ip {ip}"),
                lost.into_iter().collect(),
            );
        }
        Ok(())
    })?;
    {
        let mut d = lock(&agent.directory)?;
        if full {
            d.pods.clear();
            d.services.clear();
        }
        let pods: Vec<crate::cluster::Key> = if full {
            cluster.pods().map(|(k, _)| k.clone()).collect()
        } else {
            ch.pods.iter().cloned().collect()
        };
        for k in pods {
            let name = (k.namespace.clone(), k.name.clone());
            match cluster.pod(&k) {
                Some(p) => d.pods.insert(name, p.ips.clone()),
                None => d.pods.remove(&name),
            };
        }
        let services: Vec<(String, String)> = if full {
            cluster.service_names().into_iter().collect()
        } else {
            ch.services.iter().cloned().collect()
        };
        for (ns, n) in services {
            match cluster.service(&ns, &n).1 {
                Some(s) => d.services.insert((ns, n), s.cluster_ips.clone()),
                None => d.services.remove(&(ns, n)),
            };
        }
    }
    // Pods, namespaces and policies all feed identities and policies.
    if full || !ch.namespaces.is_empty() || !ch.pods.is_empty() || !ch.policy_namespaces.is_empty()
    {
        let scope = if full {
            super::policy::Scope::Full
        } else {
            super::policy::Scope::Changes(ch)
        };
        tokio::task::block_in_place(|| super::policy::apply(agent, cluster, scope))?;
    }
    if full || !ch.services.is_empty() {
        let external = tokio::task::block_in_place(|| {
            super::services::apply(agent, cluster, &ch.services, full, problems)
        })?;
        let changed = {
            let mut r = lock(&agent.routes)?;
            let changed = r.external != external;
            r.external = external;
            changed
        };
        network::sync_bgp(agent, full);
        if changed || full {
            let (added, removed) = network::sync_routes(agent).await?;
            if added + removed > 0 {
                info!(
                    routes_added = added,
                    routes_removed = removed,
                    "routes to Service addresses applied"
                );
            }
        }
    }
    Ok(())
}
