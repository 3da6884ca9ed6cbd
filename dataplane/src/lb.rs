//! From a Service and its EndpointSlices to the frontends this node
//! programs, and the Maglev tables of the externally reachable ones. Pure
//! functions: the agent applies their results by difference.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use dataplane_common::{
    IPPROTO_TCP, IPPROTO_UDP, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_F_AFFINITY, SVC_F_LOCAL,
    SVC_F_MAGLEV, SVC_F_NODEPORT,
};

use crate::cluster::{Key, ServiceInfo, SliceInfo, TargetPort};

/// A backend as the datapath sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    pub addr: BackendAddr,
    /// On this node.
    pub local: bool,
    /// Used only because nothing else serves.
    pub terminating: bool,
}

/// One frontend: an address (unspecified for NodePorts: every node
/// address), port and protocol, seen from one scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
    pub flags: u16,
    pub affinity_timeout: u32,
    /// Frontends of one Service port and scope share an id (affinity, and
    /// one Maglev table for all the external ones).
    pub group: (String, u8),
    pub backends: Vec<BackendInfo>,
}

/// What a Service asks of this node, and what is wrong with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Computed {
    pub frontends: Vec<Frontend>,
    pub problems: Vec<String>,
}

/// Endpoints usable for a list: the ready ones; if there are none, the
/// serving ones that are terminating (so that a rollout's last connections
/// still land somewhere), as kube-proxy does.
fn usable(candidates: &[BackendInfo]) -> Vec<BackendInfo> {
    let ready: Vec<BackendInfo> = candidates
        .iter()
        .filter(|b| !b.terminating)
        .cloned()
        .collect();
    if ready.is_empty() {
        candidates
            .iter()
            .filter(|b| b.terminating)
            .cloned()
            .collect()
    } else {
        ready
    }
}

/// The frontends and backends of `svc` (key `key`) for node `own`, from its
/// EndpointSlices `slices`.
pub fn compute(key: &Key, svc: &ServiceInfo, slices: &[&SliceInfo], own: &str) -> Computed {
    let mut out = Computed::default();
    let name = format!("{}/{}", key.namespace, key.name);
    if svc.type_ == "ExternalName" {
        return out;
    }
    for (i, p) in svc.ports.iter().enumerate() {
        if p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP {
            out.problems.push(format!(
                "Service {name}: spec.ports[{i}]: protocol SCTP is not served by this datapath (this kernel has no SCTP); port skipped"
            ));
            continue;
        }
        // Endpoints serve a Service port under its name (the endpoint
        // controller resolves named target ports per pod).
        let mut candidates: BTreeMap<BackendAddr, BackendInfo> = BTreeMap::new();
        let mut named = false;
        for s in slices {
            let Some(sp) = s
                .ports
                .iter()
                .find(|sp| sp.name == p.name && sp.proto == p.proto)
            else {
                continue;
            };
            named = true;
            for e in &s.endpoints {
                // Neither ready nor serving: not a backend at all.
                if !(e.ready || e.serving && e.terminating) {
                    continue;
                }
                for ip in &e.addresses {
                    let IpAddr::V4(v4) = ip else { continue };
                    let addr = BackendAddr {
                        ip: *v4,
                        port: sp.port,
                        proto: p.proto,
                    };
                    candidates.entry(addr).or_insert(BackendInfo {
                        addr,
                        local: e.node.as_deref() == Some(own),
                        terminating: !e.ready,
                    });
                }
            }
        }
        if !named
            && let TargetPort::Name(t) = &p.target
            && slices.iter().any(|s| !s.endpoints.is_empty())
        {
            out.problems.push(format!(
                "Service {name}: spec.ports[{i}].targetPort {t:?}: no endpoint defines it (no EndpointSlice port named {:?}); no backends",
                p.name
            ));
        }
        let all: Vec<BackendInfo> = candidates.into_values().collect();
        let local: Vec<BackendInfo> = all.iter().filter(|b| b.local).cloned().collect();
        let cluster = usable(&all);
        let local = usable(&local);
        let affinity = svc.affinity_timeout.unwrap_or(0);
        let aff_flag = if svc.affinity_timeout.is_some() {
            SVC_F_AFFINITY
        } else {
            0
        };
        let group = |scope: u8| (format!("{name}/{}/{}", p.port, p.proto), scope);
        let internal = if svc.internal_local {
            (local.clone(), aff_flag | SVC_F_LOCAL)
        } else {
            (cluster.clone(), aff_flag)
        };
        let external = if svc.external_local {
            (local.clone(), aff_flag | SVC_F_LOCAL | SVC_F_MAGLEV)
        } else {
            (cluster.clone(), aff_flag | SVC_F_MAGLEV)
        };
        let mut add =
            |addr: Ipv4Addr, port: u16, scope: u8, flags: u16, backends: &Vec<BackendInfo>| {
                out.frontends.push(Frontend {
                    addr,
                    port,
                    proto: p.proto,
                    scope,
                    flags,
                    affinity_timeout: affinity,
                    group: group(scope),
                    backends: backends.clone(),
                });
            };
        for ip in &svc.cluster_ips {
            if let IpAddr::V4(v4) = ip {
                add(*v4, p.port, SCOPE_INTERNAL, internal.1, &internal.0);
            }
        }
        // Reached from outside the node: external traffic policy and Maglev.
        // From this node's pods and processes the same addresses behave like
        // the ClusterIP (every endpoint, a random one per flow).
        let node_port = match svc.type_.as_str() {
            "NodePort" | "LoadBalancer" => p.node_port,
            _ => None,
        };
        if let Some(np) = node_port {
            add(
                Ipv4Addr::UNSPECIFIED,
                np,
                SCOPE_INTERNAL,
                aff_flag | SVC_F_NODEPORT,
                &cluster,
            );
            add(
                Ipv4Addr::UNSPECIFIED,
                np,
                SCOPE_EXTERNAL,
                external.1 | SVC_F_NODEPORT,
                &external.0,
            );
        }
        let lbs: &[IpAddr] = if svc.type_ == "LoadBalancer" {
            &svc.lb_ips
        } else {
            &[]
        };
        for ip in svc.external_ips.iter().chain(lbs) {
            if let IpAddr::V4(v4) = ip {
                add(*v4, p.port, SCOPE_INTERNAL, aff_flag, &cluster);
                add(*v4, p.port, SCOPE_EXTERNAL, external.1, &external.0);
            }
        }
    }
    out
}

/// 64-bit FNV-1a with a seed: stable across nodes and releases, so every
/// node builds the same tables.
fn fnv(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A Maglev table of size `m` (a prime) over `backends` (their ids and
/// names, e.g. `10.244.1.5:8080/6`).
///
/// Each backend has Maglev's preference list over the slots: it starts at
/// `offset` and steps by `skip`, both from hashes of its name. The paper
/// fills the table by letting backends take turns claiming their next
/// preferred free slot; here each slot goes to the backend that lists it
/// earliest (ties by hash). Both put every backend near `m / n` slots, but
/// turns reshuffle ~0.4% of the other backends' slots whenever one backend
/// comes or goes, and this resolution moves none: only the slots of the
/// backend added or removed change owner. The cost is a slightly wider
/// spread of shares (within ±4% at 10 backends and m = 16381, against ±0.1%).
pub fn maglev(backends: &[(u32, String)], m: u32) -> Vec<u32> {
    let m64 = u64::from(m);
    let mut best: Vec<(u64, u64, u32)> = vec![(u64::MAX, u64::MAX, 0); m as usize];
    if backends.is_empty() || m < 2 {
        return Vec::new();
    }
    for (id, name) in backends {
        let offset = fnv(name.as_bytes(), 1) % m64;
        let skip = fnv(name.as_bytes(), 2) % (m64 - 1) + 1;
        let tie = fnv(name.as_bytes(), 4);
        let mut slot = offset;
        for rank in 0..m64 {
            let b = &mut best[slot as usize];
            if (rank, tie) < (b.0, b.1) {
                *b = (rank, tie, *id);
            }
            slot += skip;
            if slot >= m64 {
                slot -= m64;
            }
        }
    }
    best.into_iter().map(|(_, _, id)| id).collect()
}

/// Whether `n` is prime (table sizes must be, for the preference lists to
/// cover every slot).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Kind, SliceEndpoint, SlicePort};

    fn names(n: usize) -> Vec<(u32, String)> {
        (0..n)
            .map(|i| (i as u32 + 1, format!("10.244.{}.{}:8080/6", i / 3, 10 + i)))
            .collect()
    }

    #[test]
    fn maglev_balances_and_moves_only_the_removed_backends_slots() {
        let m = 16_381;
        let all = names(10);
        let t = maglev(&all, m);
        assert_eq!(t.len(), m as usize);
        let mut shares = BTreeMap::new();
        for id in &t {
            *shares.entry(*id).or_insert(0u32) += 1;
        }
        assert_eq!(shares.len(), 10);
        let even = m as f64 / 10.0;
        for (id, n) in &shares {
            let dev = (f64::from(*n) - even).abs() / even;
            assert!(dev < 0.05, "backend {id} has {n} slots");
        }
        // Remove backend 5: only its slots change owner.
        let fewer: Vec<_> = all.iter().filter(|(id, _)| *id != 5).cloned().collect();
        let t2 = maglev(&fewer, m);
        for (a, b) in t.iter().zip(&t2) {
            if *a != 5 {
                assert_eq!(a, b, "a slot of another backend moved");
            } else {
                assert_ne!(*b, 5);
            }
        }
        // And adding it back restores the table exactly (no history).
        assert_eq!(maglev(&all, m), t);
        assert_eq!(
            maglev(&all.iter().rev().cloned().collect::<Vec<_>>(), m),
            t,
            "order does not matter"
        );
    }

    #[test]
    fn primes() {
        assert!(is_prime(16_381) && is_prime(65_521) && is_prime(251));
        assert!(!is_prime(16_383) && !is_prime(1) && !is_prime(65_535));
    }

    fn service(json: serde_json::Value) -> (Key, ServiceInfo) {
        match crate::cluster::convert(Kind::Service, json).expect("service") {
            (k, crate::cluster::Object::Service(s)) => (k, s),
            _ => unreachable!(),
        }
    }

    fn endpoint(ip: &str, node: &str, ready: bool, terminating: bool) -> SliceEndpoint {
        SliceEndpoint {
            addresses: vec![ip.parse().expect("ip")],
            ready,
            serving: true,
            terminating,
            node: Some(node.into()),
        }
    }

    #[test]
    fn frontends_per_type_and_policy() {
        let (k, svc) = service(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalIPs": ["192.0.2.7"],
                     "externalTrafficPolicy": "Local",
                     "ports": [{"name": "http", "port": 80, "targetPort": "web", "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}
        }));
        let slice = SliceInfo {
            service: "web".into(),
            endpoints: vec![
                endpoint("10.244.0.5", "me", true, false),
                endpoint("10.244.1.5", "other", true, false),
                endpoint("10.244.1.6", "other", false, true),
            ],
            ports: vec![SlicePort {
                name: "http".into(),
                proto: IPPROTO_TCP,
                port: 8080,
            }],
        };
        let c = compute(&k, &svc, &[&slice], "me");
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        let find = |addr: &str, port: u16, scope: u8| {
            c.frontends
                .iter()
                .find(|f| {
                    f.addr == addr.parse::<Ipv4Addr>().unwrap()
                        && f.port == port
                        && f.scope == scope
                })
                .unwrap_or_else(|| {
                    panic!("no frontend {addr}:{port} scope {scope}: {:?}", c.frontends)
                })
        };
        let ips = |f: &Frontend| {
            f.backends
                .iter()
                .map(|b| b.addr.ip.to_string())
                .collect::<Vec<_>>()
        };
        // ClusterIP: every ready endpoint, not the terminating one.
        let cip = find("10.96.0.10", 80, SCOPE_INTERNAL);
        assert_eq!(ips(cip), ["10.244.0.5", "10.244.1.5"]);
        assert_eq!(
            cip.backends[0].addr.port, 8080,
            "the named target port, resolved"
        );
        // NodePort from outside, Local: this node's endpoint only, Maglev.
        let np = find("0.0.0.0", 30080, SCOPE_EXTERNAL);
        assert_eq!(ips(np), ["10.244.0.5"]);
        assert_eq!(
            np.flags & (SVC_F_MAGLEV | SVC_F_LOCAL | SVC_F_NODEPORT),
            SVC_F_MAGLEV | SVC_F_LOCAL | SVC_F_NODEPORT
        );
        // From this node's pods, the NodePort, LB and external IPs reach all.
        assert_eq!(ips(find("0.0.0.0", 30080, SCOPE_INTERNAL)).len(), 2);
        assert_eq!(
            ips(find("198.51.100.1", 80, SCOPE_EXTERNAL)),
            ["10.244.0.5"]
        );
        assert_eq!(ips(find("192.0.2.7", 80, SCOPE_INTERNAL)).len(), 2);
        // One id per port and scope: the external frontends share a table.
        assert_eq!(find("198.51.100.1", 80, SCOPE_EXTERNAL).group, np.group);
        // A node without a local endpoint: the Local list is empty.
        let c2 = compute(&k, &svc, &[&slice], "third");
        let np2 = c2
            .frontends
            .iter()
            .find(|f| f.scope == SCOPE_EXTERNAL && f.port == 30080)
            .expect("np");
        assert!(np2.backends.is_empty());
    }

    #[test]
    fn terminating_endpoints_only_when_nothing_else_serves() {
        let (k, svc) = service(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "protocol": "UDP"}]}
        }));
        let slice = |eps: Vec<SliceEndpoint>| SliceInfo {
            service: "web".into(),
            endpoints: eps,
            ports: vec![SlicePort {
                name: String::new(),
                proto: IPPROTO_UDP,
                port: 5353,
            }],
        };
        let s = slice(vec![
            endpoint("10.244.0.5", "a", false, true),
            endpoint("10.244.0.6", "a", false, true),
        ]);
        let c = compute(&k, &svc, &[&s], "a");
        assert_eq!(c.frontends[0].backends.len(), 2);
        assert!(c.frontends[0].backends.iter().all(|b| b.terminating));
        let s = slice(vec![
            endpoint("10.244.0.5", "a", false, true),
            endpoint("10.244.0.7", "a", true, false),
        ]);
        let c = compute(&k, &svc, &[&s], "a");
        assert_eq!(c.frontends[0].backends.len(), 1);
        assert_eq!(c.frontends[0].backends[0].addr.ip.to_string(), "10.244.0.7");
    }

    #[test]
    fn a_named_port_no_endpoint_defines_is_reported() {
        let (k, svc) = service(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}
        }));
        let s = SliceInfo {
            service: "web".into(),
            endpoints: vec![endpoint("10.244.0.5", "a", true, false)],
            ports: vec![SlicePort {
                name: "metrics".into(),
                proto: IPPROTO_TCP,
                port: 9090,
            }],
        };
        let c = compute(&k, &svc, &[&s], "a");
        assert!(c.frontends[0].backends.is_empty());
        assert_eq!(
            c.problems,
            [
                "Service ns/web: spec.ports[0].targetPort \"web\": no endpoint defines it (no EndpointSlice port named \"http\"); no backends"
            ]
        );
    }
}
