//! The one desired-state model every source feeds (manifest directory,
//! Kubernetes API), and its translation into what the datapath needs.
//!
//! Objects are converted from the Kubernetes types into compact forms that
//! keep only what the datapath uses (memory at 10,000 pods matters), and
//! validated on the way: an invalid object is reported with its
//! namespace/name and field and never enters the store, so the last good
//! version of it stays in effect.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use ipnetwork::{IpNetwork, Ipv4Network};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::{NetworkPolicy, NetworkPolicySpec},
};

use crate::nodes::RemoteNode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Node,
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    NetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Node,
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::NetworkPolicy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }

    /// The kind of a manifest, from its `apiVersion` and `kind`.
    pub fn of(api_version: &str, kind: &str) -> Option<Kind> {
        Some(match (api_version, kind) {
            ("v1", "Node") => Kind::Node,
            ("v1", "Namespace") => Kind::Namespace,
            ("v1", "Pod") => Kind::Pod,
            ("v1", "Service") => Kind::Service,
            ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
            ("networking.k8s.io/v1", "NetworkPolicy") => Kind::NetworkPolicy,
            _ => return None,
        })
    }
}

/// (kind, namespace, name): namespace is empty for cluster-scoped kinds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.name(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.name(), self.namespace, self.name)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub internal_ip: Option<Ipv4Addr>,
    pub pod_cidrs: Vec<IpNetwork>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub type_: String,
    pub cluster_ips: Vec<IpAddr>,
    pub selector: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub service: String,
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Node(NodeInfo),
    Namespace(BTreeMap<String, String>),
    Pod(PodInfo),
    Service(ServiceInfo),
    EndpointSlice(SliceInfo),
    NetworkPolicy(Box<NetworkPolicySpec>),
}

/// Why an object was refused: where, and what is wrong.
#[derive(Debug)]
pub struct Invalid {
    pub key: Option<Key>,
    pub field: String,
    pub problem: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            Some(k) => write!(f, "{k}: {}: {}", self.field, self.problem),
            None => write!(f, "{}: {}", self.field, self.problem),
        }
    }
}

fn invalid(key: &Key, field: impl Into<String>, problem: impl std::fmt::Display) -> Invalid {
    Invalid {
        key: Some(key.clone()),
        field: field.into(),
        problem: problem.to_string(),
    }
}

fn key_of(
    kind: Kind,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<Key, Invalid> {
    let name = meta.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(Invalid {
            key: None,
            field: "metadata.name".into(),
            problem: format!("a {} without a name", kind.name()),
        });
    }
    let namespace = match kind {
        Kind::Node | Kind::Namespace => String::new(),
        _ => meta.namespace.clone().unwrap_or_else(|| "default".into()),
    };
    Ok(Key {
        kind,
        namespace,
        name,
    })
}

fn ips(
    key: &Key,
    field: &str,
    values: impl IntoIterator<Item = String>,
) -> Result<Vec<IpAddr>, Invalid> {
    values
        .into_iter()
        .map(|v| {
            v.parse::<IpAddr>()
                .map_err(|e| invalid(key, field, format!("{v:?}: {e}")))
        })
        .collect()
}

/// Converts one manifest (any of the kinds we know) into the model.
pub fn convert(kind: Kind, value: serde_json::Value) -> Result<(Key, Object), Invalid> {
    let typed = |e: serde_path_to_error::Error<serde_json::Error>| Invalid {
        key: None,
        field: e.path().to_string(),
        problem: e.inner().to_string(),
    };
    match kind {
        Kind::Node => {
            let n: Node = serde_path_to_error::deserialize(value).map_err(typed)?;
            let key = key_of(kind, &n.metadata)?;
            let spec = n.spec.unwrap_or_default();
            let mut cidrs: Vec<String> = spec.pod_cidrs.unwrap_or_default();
            if cidrs.is_empty()
                && let Some(c) = spec.pod_cidr
            {
                cidrs.push(c);
            }
            let pod_cidrs = cidrs
                .iter()
                .map(|c| {
                    dataplane_common::api::parse_cidr(c)
                        .map_err(|e| invalid(&key, "spec.podCIDRs", e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let internal = n
                .status
                .and_then(|s| s.addresses)
                .unwrap_or_default()
                .into_iter()
                .find(|a| a.type_ == "InternalIP" && a.address.parse::<Ipv4Addr>().is_ok());
            let internal_ip = internal
                .map(|a| {
                    a.address
                        .parse()
                        .map_err(|e| invalid(&key, "status.addresses", e))
                })
                .transpose()?;
            Ok((
                key,
                Object::Node(NodeInfo {
                    internal_ip,
                    pod_cidrs,
                }),
            ))
        }
        Kind::Namespace => {
            let n: Namespace = serde_path_to_error::deserialize(value).map_err(typed)?;
            let key = key_of(kind, &n.metadata)?;
            Ok((
                key,
                Object::Namespace(n.metadata.labels.unwrap_or_default()),
            ))
        }
        Kind::Pod => {
            let p: Pod = serde_path_to_error::deserialize(value).map_err(typed)?;
            let key = key_of(kind, &p.metadata)?;
            let spec = p.spec.unwrap_or_default();
            let ips = ips(
                &key,
                "status.podIPs",
                p.status
                    .and_then(|s| s.pod_ips)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|i| i.ip),
            )?;
            Ok((
                key,
                Object::Pod(PodInfo {
                    node: spec.node_name.unwrap_or_default(),
                    ips,
                    host_network: spec.host_network.unwrap_or(false),
                    labels: p.metadata.labels.unwrap_or_default(),
                }),
            ))
        }
        Kind::Service => {
            let s: Service = serde_path_to_error::deserialize(value).map_err(typed)?;
            let key = key_of(kind, &s.metadata)?;
            let spec = s.spec.unwrap_or_default();
            let cluster_ips = ips(
                &key,
                "spec.clusterIPs",
                spec.cluster_ips
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|i| i != "None"),
            )?;
            Ok((
                key,
                Object::Service(ServiceInfo {
                    type_: spec.type_.unwrap_or_else(|| "ClusterIP".into()),
                    cluster_ips,
                    selector: spec.selector.unwrap_or_default(),
                }),
            ))
        }
        Kind::EndpointSlice => {
            let s: EndpointSlice = serde_path_to_error::deserialize(value).map_err(typed)?;
            let key = key_of(kind, &s.metadata)?;
            let service = s
                .metadata
                .labels
                .unwrap_or_default()
                .remove("kubernetes.io/service-name")
                .unwrap_or_default();
            let addresses = ips(
                &key,
                "endpoints[].addresses",
                s.endpoints.into_iter().flat_map(|e| e.addresses),
            )?;
            Ok((key, Object::EndpointSlice(SliceInfo { service, addresses })))
        }
        Kind::NetworkPolicy => {
            let p: NetworkPolicy = serde_path_to_error::deserialize(value).map_err(typed)?;
            let key = key_of(kind, &p.metadata)?;
            Ok((
                key,
                Object::NetworkPolicy(Box::new(p.spec.unwrap_or_default())),
            ))
        }
    }
}

/// Everything the sources currently say.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Store {
    pub objects: BTreeMap<Key, Object>,
}

impl Store {
    pub fn count(&self, kind: Kind) -> usize {
        self.objects.keys().filter(|k| k.kind == kind).count()
    }
}

/// What the datapath should hold, derived from a [`Store`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Conflicts and gaps found on the way, one line each naming the
    /// objects; the caller logs each once rather than on every change.
    pub problems: std::collections::BTreeSet<String>,
    /// This node's pod CIDR, from its Node object.
    pub own_pod_cidr: Option<Ipv4Network>,
    pub nodes: BTreeMap<String, RemoteNode>,
    /// Pods on other nodes, by address: "namespace/name".
    pub remote_pods: BTreeMap<IpAddr, String>,
}

/// Translates the store for node `own`. Conflicts between objects (two nodes
/// claiming one CIDR, two pods one address) are logged naming both, and the
/// later one (by name order) is left out.
pub fn desired(store: &Store, own: &str) -> Desired {
    let mut d = Desired::default();
    for (key, obj) in &store.objects {
        let Object::Node(n) = obj else { continue };
        let v4 = n.pod_cidrs.iter().find_map(|c| match c {
            IpNetwork::V4(v4) => Some(*v4),
            IpNetwork::V6(_) => None,
        });
        if key.name == own {
            d.own_pod_cidr = v4;
            continue;
        }
        let (Some(ip), Some(pod_cidr)) = (n.internal_ip, v4) else {
            d.problems.insert(format!(
                "Node {}: no InternalIP or no IPv4 pod CIDR yet; not routed",
                key.name
            ));
            continue;
        };
        if let Some((other, _)) = d.nodes.iter().find(|(_, m)| m.pod_cidr.overlaps(pod_cidr)) {
            d.problems.insert(format!(
                "Node {}: spec.podCIDRs: {pod_cidr} overlaps node {other}; node skipped",
                key.name
            ));
            continue;
        }
        d.nodes
            .insert(key.name.clone(), RemoteNode { ip, pod_cidr });
    }
    for (key, obj) in &store.objects {
        let Object::Pod(p) = obj else { continue };
        if p.node == own || p.host_network || p.node.is_empty() {
            continue;
        }
        let name = format!("{}/{}", key.namespace, key.name);
        for ip in &p.ips {
            match d.remote_pods.get(ip) {
                Some(other) => {
                    d.problems.insert(format!("Pod {name}: status.podIPs: address {ip} already belongs to pod {other}; skipped"));
                }
                None => {
                    d.remote_pods.insert(*ip, name.clone());
                }
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, ip: &str, cidr: &str) -> (Key, Object) {
        convert(
            Kind::Node,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                   "spec": {"podCIDR": cidr}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}),
        )
        .unwrap()
    }

    #[test]
    fn conversion_names_the_field_at_fault() {
        let e = convert(
            Kind::Node,
            json!({"metadata": {"name": "n"}, "spec": {"podCIDR": "10.0.0.1/24"}}),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Node n: spec.podCIDRs: \"10.0.0.1/24\" has host bits set (the network is 10.0.0.0/24)"
        );
        let e = convert(Kind::Pod, json!({"metadata": {"name": "p", "namespace": "x"}, "status": {"podIPs": [{"ip": "10.0.0.300"}]}})).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Pod x/p: status.podIPs: \"10.0.0.300\""),
            "{e}"
        );
        let e = convert(
            Kind::Pod,
            json!({"metadata": {"name": "p"}, "spec": {"hostNetwork": "yes"}}),
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.hostNetwork", "{e}");
        let e = convert(Kind::Service, json!({"metadata": {}})).unwrap_err();
        assert_eq!(e.field, "metadata.name");
    }

    #[test]
    fn desired_state_from_objects() {
        let mut store = Store::default();
        for (k, o) in [
            node("me", "172.20.0.11", "10.244.0.0/24"),
            node("a", "172.20.0.12", "10.244.1.0/24"),
            node("b", "172.20.0.13", "10.244.1.0/25"),
        ] {
            store.objects.insert(k, o);
        }
        let pod = |name: &str, node: &str, ip: &str| {
            convert(Kind::Pod, json!({"metadata": {"name": name, "namespace": "ns"}, "spec": {"nodeName": node, "containers": []},
                                      "status": {"podIPs": [{"ip": ip}]}}))
            .unwrap()
        };
        for (k, o) in [
            pod("p1", "a", "10.244.1.5"),
            pod("p2", "a", "10.244.1.5"),
            pod("local", "me", "10.244.0.9"),
        ] {
            store.objects.insert(k, o);
        }
        let d = desired(&store, "me");
        assert_eq!(d.own_pod_cidr, Some("10.244.0.0/24".parse().unwrap()));
        assert_eq!(d.nodes.keys().collect::<Vec<_>>(), ["a"], "b overlaps a");
        assert_eq!(d.remote_pods.len(), 1);
        assert_eq!(d.remote_pods.values().next().unwrap(), "ns/p1");
        assert!(
            d.problems
                .contains("Node b: spec.podCIDRs: 10.244.1.0/25 overlaps node a; node skipped"),
            "{:?}",
            d.problems
        );
        assert!(d.problems.contains(
            "Pod ns/p2: status.podIPs: address 10.244.1.5 already belongs to pod ns/p1; skipped"
        ));
    }
}
