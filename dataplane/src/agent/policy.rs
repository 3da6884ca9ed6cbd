//! NetworkPolicy, from the cluster model to the datapath: the security
//! identity of every pod address into `dp_endpoints`, and each local
//! endpoint's compiled policy into `dp_policy` and `dp_policy_cidr`, by
//! difference.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use dataplane_common::EndpointKey;
use tracing::{info, warn};

use super::{Agent, lock};
use crate::{
    cluster::Cluster,
    maps::{
        SyncStats,
        policy::{CidrPrefix, PolicyCidrMap, PolicyMap, PolicyPrefix, desired, sync_endpoint},
        sync_all,
    },
    policy::{Compiled, Identities, LabelSet, PodView, Policy, compile},
};

pub(crate) struct PolicyState {
    rules: PolicyMap,
    cidrs: PolicyCidrMap,
    /// Policy ids by (namespace, name), stable while the agent runs.
    ids: BTreeMap<(String, String), u32>,
    /// The entries each endpoint (by ifindex) has in the maps.
    applied: BTreeMap<u32, (Vec<PolicyPrefix>, Vec<CidrPrefix>)>,
    /// Policies already reported for naming SCTP.
    sctp_reported: BTreeSet<(String, String)>,
    /// The identities last computed, to name peers.
    identities: Identities,
}

impl PolicyState {
    pub fn new(rules: PolicyMap, cidrs: PolicyCidrMap) -> Self {
        Self {
            rules,
            cidrs,
            ids: BTreeMap::new(),
            applied: BTreeMap::new(),
            sctp_reported: BTreeSet::new(),
            identities: Identities::default(),
        }
    }

    fn id(&mut self, ns: &str, name: &str) -> u32 {
        let next = self.ids.values().max().copied().unwrap_or(0) + 1;
        *self
            .ids
            .entry((ns.to_owned(), name.to_owned()))
            .or_insert(next)
    }
}

/// A pod as policy sees it: its label set and what the compiler needs.
struct PodFacts {
    namespace: String,
    name: String,
    set: LabelSet,
    ips: Vec<std::net::Ipv4Addr>,
    ports: Vec<(String, u8, u16)>,
}

/// Recomputes identities and every local endpoint's policy (`full`: the
/// whole maps are compared with the result, which also removes entries of
/// endpoints that went while the agent was down).
pub(super) fn apply(agent: &Agent, cluster: &Cluster, full: bool) -> Result<()> {
    let started = std::time::Instant::now();
    let mut ns_labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut pods: Vec<PodFacts> = Vec::new();
    for (key, pod) in cluster.pods() {
        if pod.host_network {
            continue;
        }
        let labels = ns_labels
            .entry(key.namespace.clone())
            .or_insert_with(|| cluster.namespace_labels(&key.namespace))
            .clone();
        pods.push(PodFacts {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            set: LabelSet {
                namespace: key.namespace.clone(),
                namespace_labels: labels,
                labels: pod.labels.clone(),
            },
            ips: pod
                .ips
                .iter()
                .filter_map(|ip| match ip {
                    std::net::IpAddr::V4(v4) => Some(*v4),
                    _ => None,
                })
                .collect(),
            ports: pod.ports.clone(),
        });
    }
    let identities = Identities::new(pods.iter().map(|p| p.set.clone()));
    let views: Vec<PodView> = pods
        .iter()
        .map(|p| PodView {
            identity: identities.of(&p.set).unwrap_or(0),
            set: &p.set,
            ips: p.ips.clone(),
            ports: &p.ports,
        })
        .collect();
    let mut by_ip = BTreeMap::new();
    for v in &views {
        for ip in &v.ips {
            by_ip.insert(EndpointKey::from(std::net::IpAddr::V4(*ip)), v.identity);
        }
    }
    let id_stats = lock(&agent.endpoints)?.set_identities(by_ip)?;

    let mut st = lock(&agent.policy)?;
    // By name: ids come out alike run after run.
    let mut named: Vec<(String, String, &Policy)> = cluster
        .policies()
        .map(|(k, p)| (k.namespace.clone(), k.name.clone(), p))
        .collect();
    named.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let policies: Vec<(u32, String, String, &Policy)> = named
        .into_iter()
        .map(|(ns, name, p)| (st.id(&ns, &name), ns, name, p))
        .collect();
    for (_, ns, name, p) in &policies {
        let k = (ns.clone(), name.clone());
        if p.names_sctp() && st.sctp_reported.insert(k) {
            warn!(policy = %format!("{ns}/{name}"), "NetworkPolicy names SCTP: its rules are compiled (they isolate and never allow TCP or UDP), but this kernel carries no SCTP traffic");
        }
    }
    let locals: Vec<(u32, String, String)> = lock(&agent.registry)?
        .values()
        .map(|e| {
            (
                e.ifindex,
                e.spec.pod_namespace.clone(),
                e.spec.pod_name.clone(),
            )
        })
        .collect();
    let mut stats = SyncStats::default();
    let mut isolated = 0;
    let mut wanted_rules = BTreeMap::new();
    let mut wanted_cidrs = BTreeMap::new();
    let mut applied = BTreeMap::new();
    for (ifindex, ns, name) in &locals {
        let compiled = match views
            .iter()
            .zip(&pods)
            .find(|(_, p)| &p.namespace == ns && &p.name == name)
        {
            Some((me, _)) => compile(
                me,
                policies
                    .iter()
                    .map(|(id, pns, _, p)| (*id, pns.as_str(), *p)),
                &views,
            ),
            // Not in the cluster state (yet): selected by nothing.
            None => Compiled::default(),
        };
        if compiled.tracked() {
            isolated += 1;
        }
        let (rules, cidrs) = desired(*ifindex, &compiled);
        if full {
            wanted_rules.extend(rules.clone());
            wanted_cidrs.extend(cidrs.clone());
        } else {
            let old = st.applied.get(ifindex).cloned().unwrap_or_default();
            let PolicyState {
                rules: rmap,
                cidrs: cmap,
                ..
            } = &mut *st;
            stats += sync_endpoint(rmap, cmap, *ifindex, &compiled, (&old.0, &old.1))?;
        }
        applied.insert(
            *ifindex,
            (
                rules.keys().copied().collect(),
                cidrs.keys().copied().collect(),
            ),
        );
    }
    if full {
        stats += sync_all(&mut st.cidrs, &wanted_cidrs)?;
        stats += sync_all(&mut st.rules, &wanted_rules)?;
    } else {
        // Endpoints that went: their entries go too.
        let gone: Vec<u32> = st
            .applied
            .keys()
            .filter(|i| !applied.contains_key(i))
            .copied()
            .collect();
        for ifindex in gone {
            let old = st.applied.get(&ifindex).cloned().unwrap_or_default();
            let PolicyState {
                rules: rmap,
                cidrs: cmap,
                ..
            } = &mut *st;
            stats += sync_endpoint(rmap, cmap, ifindex, &Compiled::default(), (&old.0, &old.1))?;
        }
    }
    st.applied = applied;
    st.identities = identities.clone();
    if !stats.is_empty() || !id_stats.is_empty() {
        info!(
            identities = identities.len(),
            policies = policies.len(),
            endpoints_under_policy = isolated,
            added = stats.added,
            changed = stats.changed,
            removed = stats.removed,
            endpoint_identities_changed = id_stats.added + id_stats.changed,
            took_ms = started.elapsed().as_millis() as u64,
            "NetworkPolicy applied"
        );
    }
    Ok(())
}

/// A local pod's compiled policy, as the maps hold it (`policy get`).
pub(super) fn view(
    agent: &Agent,
    namespace: &str,
    name: &str,
) -> Result<dataplane_common::api::PolicyView> {
    use crate::maps::Table as _;
    use dataplane_common::{PEER_ANY, PEER_CLASS, POLICY_ALLOW, POLICY_ISOLATED, policy_dir_name};
    let ifindex = lock(&agent.registry)?
        .values()
        .find(|e| e.spec.pod_namespace == namespace && e.spec.pod_name == name)
        .map(|e| e.ifindex)
        .ok_or_else(|| anyhow::anyhow!("no pod {namespace}/{name} on this node"))?;
    let identity = {
        let eps = lock(&agent.endpoints)?;
        eps.desired()
            .values()
            .find(|v| v.ifindex == ifindex)
            .map_or(0, |v| v.identity)
    };
    let st = lock(&agent.policy)?;
    let names: BTreeMap<u32, String> = st
        .ids
        .iter()
        .map(|((ns, n), id)| (*id, format!("{ns}/{n}")))
        .collect();
    let describe = |id: u32| -> String {
        match st.identities.set(id) {
            Some(set) => {
                let labels: Vec<String> =
                    set.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("identity {id} ({}: {})", set.namespace, labels.join(","))
            }
            None => format!("identity {id}"),
        }
    };
    let mut entries = Vec::new();
    for (k, v) in st.rules.read_all()? {
        if k.endpoint != ifindex {
            continue;
        }
        let peer = match k.peer {
            None => "-".to_owned(),
            Some(PEER_ANY) => "any".to_owned(),
            Some(p) if p & PEER_CLASS != 0 => format!("address class {}", p & !PEER_CLASS),
            Some(p) => describe(p),
        };
        let from = match (k.peer, v.kind) {
            (None, POLICY_ISOLATED) => "isolated: the rest is denied".to_owned(),
            (None, _) => "not isolated (tracked for replies)".to_owned(),
            (_, POLICY_ALLOW) => names
                .get(&v.policy)
                .cloned()
                .unwrap_or_else(|| format!("policy {}", v.policy)),
            _ => "?".to_owned(),
        };
        entries.push(dataplane_common::api::PolicyEntry {
            direction: policy_dir_name(k.dir).to_owned(),
            peer,
            protocol: k.proto.map_or("any".into(), dataplane_common::proto_name),
            ports: k.port.map_or("any".into(), crate::maps::policy::ports_text),
            from,
        });
    }
    Ok(dataplane_common::api::PolicyView {
        ifindex,
        identity,
        entries,
    })
}
