//! NetworkPolicy, from the cluster model to the datapath: the security
//! identity of every pod address into `dp_endpoints`, and each local
//! endpoint's compiled policy into `dp_policy` and `dp_policy_cidr`, by
//! difference.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::Result;
use dataplane_common::EndpointKey;
use tracing::{info, warn};

use super::{Agent, lock};
use crate::{
    cluster::{Changes, Cluster, Key, Kind, PodInfo},
    maps::{
        SyncStats,
        events::PolicyNamesMap,
        policy::{CidrPrefix, PolicyCidrMap, PolicyMap, PolicyPrefix, desired, sync_endpoint},
        sync_all,
    },
    policy::{Compiled, Identities, LabelSet, PodView, Policy, compile},
};

pub(crate) struct PolicyState {
    rules: PolicyMap,
    cidrs: PolicyCidrMap,
    /// Names of the ids, for verdict events.
    names: PolicyNamesMap,
    /// Policy ids by (namespace, name), stable while the agent runs.
    ids: BTreeMap<(String, String), u32>,
    /// The entries each endpoint (by ifindex) has in the maps.
    applied: BTreeMap<u32, (Vec<PolicyPrefix>, Vec<CidrPrefix>)>,
    /// Policies already reported for naming SCTP.
    sctp_reported: BTreeSet<(String, String)>,
    /// The identities last computed, to name peers.
    identities: Identities,
    /// Every pod as policy sees it, kept up to date change by change: a
    /// policy edit costs its namespace's local pods, not the cluster.
    facts: HashMap<Key, PodFacts>,
    /// How many pods carry each label set: identities are derived from the
    /// distinct sets, so only a set appearing or going changes them.
    sets: BTreeMap<LabelSet, usize>,
}

impl PolicyState {
    pub fn new(rules: PolicyMap, cidrs: PolicyCidrMap, names: PolicyNamesMap) -> Self {
        Self {
            rules,
            cidrs,
            names,
            ids: BTreeMap::new(),
            applied: BTreeMap::new(),
            sctp_reported: BTreeSet::new(),
            identities: Identities::default(),
            facts: HashMap::new(),
            sets: BTreeMap::new(),
        }
    }

    fn id(&mut self, ns: &str, name: &str) -> u32 {
        let key = (ns.to_owned(), name.to_owned());
        if let Some(id) = self.ids.get(&key) {
            return *id;
        }
        let id = self.ids.len() as u32 + 1;
        self.ids.insert(key, id);
        // Named before any entry carries the id, so verdicts can say whose.
        if let Err(e) = self.names.put(id, &format!("{ns}/{name}")) {
            warn!("{e:#}");
        }
        id
    }

    /// Replaces (or with None removes) a pod's facts; whether the distinct
    /// label sets changed.
    fn set_facts(&mut self, key: &Key, facts: Option<PodFacts>) -> bool {
        let mut sets_changed = false;
        if let Some(old) = self.facts.remove(key)
            && let Some(n) = self.sets.get_mut(&old.set)
        {
            *n -= 1;
            if *n == 0 {
                self.sets.remove(&old.set);
                sets_changed = true;
            }
        }
        if let Some(f) = facts {
            let n = self.sets.entry(f.set.clone()).or_insert(0);
            sets_changed |= *n == 0;
            *n += 1;
            self.facts.insert(key.clone(), f);
        }
        sets_changed
    }
}

/// A pod as policy sees it: its label set and what the compiler needs.
struct PodFacts {
    set: LabelSet,
    /// The identity of `set`, as last computed.
    identity: u32,
    ips: Vec<std::net::Ipv4Addr>,
    ports: Vec<(String, u8, u16)>,
}

fn facts(cluster: &Cluster, key: &Key, pod: &PodInfo) -> Option<PodFacts> {
    if pod.host_network {
        return None;
    }
    Some(PodFacts {
        identity: 0,
        set: LabelSet {
            namespace: key.namespace.clone(),
            namespace_labels: cluster.namespace_labels(&key.namespace),
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
    })
}

/// What changed since the last apply.
pub(super) enum Scope<'a> {
    /// Everything: recompute all, and compare the whole maps with the
    /// result (which also removes entries of endpoints that went while the
    /// agent was down).
    Full,
    /// What the cluster model reports.
    Changes(&'a Changes),
    /// Local endpoints came or went.
    Endpoints,
}

/// Brings identities and the local endpoints' compiled policies up to date
/// with `scope`: pods and namespaces change facts (and identities only
/// when a distinct label set appears or goes) and recompile every local
/// endpoint; a policy edit recompiles only its namespace's endpoints.
pub(super) fn apply(agent: &Agent, cluster: &Cluster, scope: Scope<'_>) -> Result<()> {
    let started = std::time::Instant::now();
    let mut st = lock(&agent.policy)?;
    let full = matches!(scope, Scope::Full);
    let endpoints_changed = matches!(scope, Scope::Endpoints);
    // Which local endpoints to recompile: None, all of them.
    let mut only_in: Option<BTreeSet<String>> = None;
    let mut facts_changed = false;
    let mut sets_changed = false;
    let mut changed: Vec<&Key> = Vec::new();
    match scope {
        Scope::Full => {
            st.facts.clear();
            st.sets.clear();
            for (key, pod) in cluster.pods() {
                st.set_facts(key, facts(cluster, key, pod));
            }
            facts_changed = true;
            sets_changed = true;
        }
        Scope::Changes(ch) => {
            let mut keys: BTreeSet<&Key> = ch.pods.iter().collect();
            // A namespace relabelled: its pods' label sets change.
            for ns in &ch.namespaces {
                keys.extend(cluster.pods_in(ns).map(|(k, _)| k));
            }
            for key in keys {
                let f = cluster.pod(key).and_then(|p| facts(cluster, key, p));
                sets_changed |= st.set_facts(key, f);
                facts_changed = true;
                changed.push(key);
            }
            if !facts_changed {
                only_in = Some(ch.policy_namespaces.clone());
            }
        }
        Scope::Endpoints => {}
    }
    if sets_changed {
        st.identities = Identities::new(st.sets.keys().cloned());
        let PolicyState {
            facts, identities, ..
        } = &mut *st;
        for f in facts.values_mut() {
            f.identity = identities.of(&f.set).unwrap_or(0);
        }
    } else {
        // Only the pods that changed lack theirs.
        for key in &changed {
            let id = st
                .facts
                .get(*key)
                .and_then(|f| st.identities.of(&f.set))
                .unwrap_or(0);
            if let Some(f) = st.facts.get_mut(*key) {
                f.identity = id;
            }
        }
    }
    let st = &mut *st;
    let local_ips: Vec<(Key, Vec<std::net::IpAddr>)> = lock(&agent.registry)?
        .values()
        .map(|e| {
            (
                Key {
                    kind: Kind::Pod,
                    namespace: e.spec.pod_namespace.clone(),
                    name: e.spec.pod_name.clone(),
                },
                e.spec.ips.clone(),
            )
        })
        .collect();
    let locals: Vec<(u32, String, String)> = lock(&agent.registry)?
        .values()
        .filter(|e| {
            only_in
                .as_ref()
                .is_none_or(|ns| ns.contains(&e.spec.pod_namespace))
        })
        .map(|e| {
            (
                e.ifindex,
                e.spec.pod_namespace.clone(),
                e.spec.pod_name.clone(),
            )
        })
        .collect();
    // The policies of the namespaces at hand, by name: ids come out alike
    // run after run.
    let namespaces: BTreeSet<&str> = locals.iter().map(|(_, ns, _)| ns.as_str()).collect();
    let mut by_ns: BTreeMap<&str, Vec<(u32, &Policy)>> = BTreeMap::new();
    for ns in namespaces {
        let mut named: Vec<(&Key, &Policy)> = cluster.policies_in(ns).collect();
        named.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let mut list = Vec::with_capacity(named.len());
        for (k, p) in named {
            list.push((st.id(&k.namespace, &k.name), p));
        }
        by_ns.insert(ns, list);
    }
    for ns in by_ns
        .keys()
        .copied()
        .chain(only_in.iter().flatten().map(String::as_str))
    {
        for (k, p) in cluster.policies_in(ns) {
            let key = (k.namespace.clone(), k.name.clone());
            if p.names_sctp() && st.sctp_reported.insert(key) {
                warn!(policy = %format!("{}/{}", k.namespace, k.name), "NetworkPolicy names SCTP: its rules are compiled (they isolate and never allow TCP or UDP), but this kernel carries no SCTP traffic");
            }
        }
    }
    let views: Vec<PodView> = st
        .facts
        .values()
        .map(|p| PodView {
            identity: p.identity,
            set: &p.set,
            ips: p.ips.clone(),
            ports: &p.ports,
        })
        .collect();
    let id_stats = if facts_changed || endpoints_changed {
        let mut by_ip = BTreeMap::new();
        for v in &views {
            for ip in &v.ips {
                by_ip.insert(EndpointKey::from(std::net::IpAddr::V4(*ip)), v.identity);
            }
        }
        // A new local pod's address is known from its CNI ADD before the
        // kubelet reports it in the Pod's status: it carries its identity
        // from its first packet.
        for (key, ips) in &local_ips {
            if let Some(f) = st.facts.get(key) {
                for ip in ips {
                    by_ip.entry(EndpointKey::from(*ip)).or_insert(f.identity);
                }
            }
        }
        lock(&agent.endpoints)?.set_identities(by_ip)?
    } else {
        SyncStats::default()
    };

    let mut stats = SyncStats::default();
    let mut wanted_rules = BTreeMap::new();
    let mut wanted_cidrs = BTreeMap::new();
    let mut applied = BTreeMap::new();
    for (ifindex, ns, name) in &locals {
        let me = Key {
            kind: Kind::Pod,
            namespace: ns.clone(),
            name: name.clone(),
        };
        let compiled = match st.facts.get(&me) {
            Some(f) => compile(
                &PodView {
                    identity: f.identity,
                    set: &f.set,
                    ips: f.ips.clone(),
                    ports: &f.ports,
                },
                by_ns
                    .get(ns.as_str())
                    .into_iter()
                    .flatten()
                    .map(|(id, p)| (*id, ns.as_str(), *p)),
                &views,
            ),
            // Not in the cluster state yet, so its labels are unknown:
            // where its namespace has policies, it is held isolated both
            // ways until they can be judged (fail closed); elsewhere no
            // policy could select it.
            None if by_ns.get(ns.as_str()).is_some_and(|l| !l.is_empty()) => Compiled {
                ingress_isolated: true,
                egress_isolated: true,
                ..Default::default()
            },
            None => Compiled::default(),
        };
        let (rules, cidrs) = desired(*ifindex, &compiled);
        if full {
            wanted_rules.extend(rules.clone());
            wanted_cidrs.extend(cidrs.clone());
        } else {
            let old = st.applied.get(ifindex).cloned().unwrap_or_default();
            stats += sync_endpoint(
                &mut st.rules,
                &mut st.cidrs,
                *ifindex,
                &compiled,
                (&old.0, &old.1),
            )?;
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
        st.applied = applied;
    } else {
        if only_in.is_none() {
            // Endpoints that went: their entries go too.
            let gone: Vec<u32> = st
                .applied
                .keys()
                .filter(|i| !applied.contains_key(i))
                .copied()
                .collect();
            for ifindex in gone {
                let old = st.applied.remove(&ifindex).unwrap_or_default();
                stats += sync_endpoint(
                    &mut st.rules,
                    &mut st.cidrs,
                    ifindex,
                    &Compiled::default(),
                    (&old.0, &old.1),
                )?;
            }
        }
        st.applied.extend(applied);
    }
    if !stats.is_empty() || !id_stats.is_empty() {
        let under_policy = st.applied.values().filter(|(r, _)| !r.is_empty()).count();
        info!(
            identities = st.identities.len(),
            endpoints_compiled = locals.len(),
            endpoints_under_policy = under_policy,
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
/// Every identity, with the local endpoints that have it.
pub(super) fn identities(agent: &Agent) -> Result<Vec<dataplane_common::api::IdentityInfo>> {
    let by_ifindex: BTreeMap<u32, String> = lock(&agent.registry)?
        .values()
        .map(|e| {
            (
                e.ifindex,
                format!("{}/{}", e.spec.pod_namespace, e.spec.pod_name),
            )
        })
        .collect();
    let mut endpoints: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for v in lock(&agent.endpoints)?.desired().values() {
        if let Some(name) = by_ifindex.get(&v.ifindex)
            && v.flags & dataplane_common::EP_F_LOCAL != 0
        {
            let list = endpoints.entry(v.identity).or_default();
            if !list.contains(name) {
                list.push(name.clone());
            }
        }
    }
    let st = lock(&agent.policy)?;
    Ok(st
        .identities
        .iter()
        .map(|(id, set)| dataplane_common::api::IdentityInfo {
            id,
            namespace: set.namespace.clone(),
            labels: set.labels.clone().into_iter().collect(),
            namespace_labels: set.namespace_labels.clone().into_iter().collect(),
            endpoints: endpoints.remove(&id).unwrap_or_default(),
        })
        .collect())
}

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
