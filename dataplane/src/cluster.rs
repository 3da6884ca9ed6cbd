//! The one desired-state model every source feeds (manifest directory,
//! Kubernetes API), and its translation into what the datapath needs.
//!
//! Objects are converted from the Kubernetes types into compact forms that
//! keep only what the datapath uses (memory at 10,000 pods matters), and
//! validated on the way: an invalid object is reported with its
//! namespace/name and field and never enters the store, so the last good
//! version of it stays in effect.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use ipnetwork::{IpNetwork, Ipv4Network};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
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
    /// The node's own BGP settings, from its annotations
    /// ([`BGP_ASN_ANNOTATION`], [`BGP_PEERS_ANNOTATION`]): they override
    /// the agent's --bgp-asn and --bgp-peer on that node.
    pub bgp_asn: Option<u32>,
    pub bgp_peers: Option<Vec<crate::bgp::Peer>>,
}

/// A Node annotation: this node's AS number.
pub const BGP_ASN_ANNOTATION: &str = "dataplane.io/bgp-asn";
/// A Node annotation: this node's BGP peers, `ADDRESS:ASN[,ADDRESS:ASN…]`.
pub const BGP_PEERS_ANNOTATION: &str = "dataplane.io/bgp-peers";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub labels: BTreeMap<String, String>,
    /// Named container ports: (name, protocol, number), for the named
    /// ports of NetworkPolicy rules.
    pub ports: Vec<(String, u8, u16)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub type_: String,
    /// Empty for a headless Service.
    pub cluster_ips: Vec<IpAddr>,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePortInfo>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub lb_ips: Vec<IpAddr>,
    /// `sessionAffinity: ClientIP`: its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
}

/// The target of a Service port: a number, or a container port's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub name: String,
    /// `IPPROTO_*`; SCTP (132) is kept for policy but never served.
    pub proto: u8,
    pub port: u16,
    pub target: TargetPort,
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready` (unset means ready).
    pub ready: bool,
    /// `conditions.serving` (unset means as `ready`).
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// The Service port's name this endpoint port serves.
    pub name: String,
    pub proto: u8,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    /// `kubernetes.io/service-name`.
    pub service: String,
    pub endpoints: Vec<SliceEndpoint>,
    pub ports: Vec<SlicePort>,
}

pub use dataplane_common::IPPROTO_SCTP;

pub(crate) fn protocol(key: &Key, field: &str, p: Option<&str>) -> Result<u8, Invalid> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(dataplane_common::IPPROTO_TCP),
        "UDP" => Ok(dataplane_common::IPPROTO_UDP),
        "SCTP" => Ok(IPPROTO_SCTP),
        other => Err(invalid(
            key,
            field,
            format!("protocol {other:?} is not TCP, UDP or SCTP"),
        )),
    }
}

pub(crate) fn port_number(key: &Key, field: &str, p: i32) -> Result<u16, Invalid> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(key, field, format!("port {p} is out of range 1-65535")))
}

#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Node(NodeInfo),
    Namespace(BTreeMap<String, String>),
    Pod(PodInfo),
    Service(ServiceInfo),
    EndpointSlice(SliceInfo),
    NetworkPolicy(Box<crate::policy::Policy>),
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

pub(crate) fn invalid(
    key: &Key,
    field: impl Into<String>,
    problem: impl std::fmt::Display,
) -> Invalid {
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
///
/// `value` is any deserializer: a parsed JSON value, or the text of one
/// (parsing straight into the typed object skips building the value).
pub fn convert<'de, D>(kind: Kind, value: D) -> Result<(Key, Object), Invalid>
where
    D: serde::Deserializer<'de>,
    D::Error: std::fmt::Display,
{
    fn typed<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> Invalid {
        Invalid {
            key: None,
            field: e.path().to_string(),
            problem: e.inner().to_string(),
        }
    }
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
            let annotations = n.metadata.annotations.unwrap_or_default();
            let field = |a: &str| format!("metadata.annotations[{a}]");
            let bgp_asn = annotations
                .get(BGP_ASN_ANNOTATION)
                .map(|v| {
                    crate::bgp::parse_asn(v.trim())
                        .map_err(|e| invalid(&key, field(BGP_ASN_ANNOTATION), format!("{e:#}")))
                })
                .transpose()?;
            let bgp_peers = annotations
                .get(BGP_PEERS_ANNOTATION)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            p.parse::<crate::bgp::Peer>().map_err(|e| {
                                invalid(&key, field(BGP_PEERS_ANNOTATION), format!("{e:#}"))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?;
            Ok((
                key,
                Object::Node(NodeInfo {
                    internal_ip,
                    pod_cidrs,
                    bgp_asn,
                    bgp_peers,
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
            let mut ports = Vec::new();
            for (i, c) in spec.containers.iter().enumerate() {
                for (j, cp) in c.ports.iter().flatten().enumerate() {
                    let Some(name) = cp.name.clone().filter(|n| !n.is_empty()) else {
                        continue;
                    };
                    let f = format!("spec.containers[{i}].ports[{j}]");
                    let proto = protocol(&key, &format!("{f}.protocol"), cp.protocol.as_deref())?;
                    let port = port_number(&key, &format!("{f}.containerPort"), cp.container_port)?;
                    ports.push((name, proto, port));
                }
            }
            Ok((
                key,
                Object::Pod(PodInfo {
                    node: spec.node_name.unwrap_or_default(),
                    ips,
                    host_network: spec.host_network.unwrap_or(false),
                    labels: p.metadata.labels.unwrap_or_default(),
                    ports,
                }),
            ))
        }
        Kind::Service => {
            let s: Service = serde_path_to_error::deserialize(value).map_err(typed)?;
            let key = key_of(kind, &s.metadata)?;
            let spec = s.spec.unwrap_or_default();
            let mut raw_cluster_ips = spec.cluster_ips.clone().unwrap_or_default();
            if raw_cluster_ips.is_empty()
                && let Some(ip) = &spec.cluster_ip
            {
                raw_cluster_ips.push(ip.clone());
            }
            let cluster_ips = ips(
                &key,
                "spec.clusterIPs",
                raw_cluster_ips
                    .into_iter()
                    .filter(|i| i != "None" && !i.is_empty()),
            )?;
            let mut ports = Vec::new();
            for (i, p) in spec.ports.unwrap_or_default().into_iter().enumerate() {
                let field = format!("spec.ports[{i}]");
                let target = match p.target_port {
                    None => {
                        TargetPort::Number(port_number(&key, &format!("{field}.port"), p.port)?)
                    }
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => {
                        TargetPort::Number(port_number(&key, &format!("{field}.targetPort"), n)?)
                    }
                    Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(n)) => {
                        TargetPort::Name(n)
                    }
                };
                ports.push(ServicePortInfo {
                    name: p.name.unwrap_or_default(),
                    proto: protocol(&key, &format!("{field}.protocol"), p.protocol.as_deref())?,
                    port: port_number(&key, &format!("{field}.port"), p.port)?,
                    target,
                    node_port: p
                        .node_port
                        .map(|n| port_number(&key, &format!("{field}.nodePort"), n))
                        .transpose()?,
                });
            }
            let external_ips = ips(
                &key,
                "spec.externalIPs",
                spec.external_ips.unwrap_or_default(),
            )?;
            let lb_ips = ips(
                &key,
                "status.loadBalancer.ingress",
                s.status
                    .and_then(|st| st.load_balancer)
                    .and_then(|lb| lb.ingress)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|i| i.ip),
            )?;
            let affinity_timeout = match spec.session_affinity.as_deref() {
                Some("ClientIP") => Some(
                    spec.session_affinity_config
                        .and_then(|c| c.client_ip)
                        .and_then(|c| c.timeout_seconds)
                        .map(|t| {
                            u32::try_from(t)
                                .ok()
                                .filter(|t| (1..=86_400).contains(t))
                                .ok_or_else(|| {
                                    invalid(
                                        &key,
                                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                                        format!("{t} is out of range 1-86400"),
                                    )
                                })
                        })
                        .transpose()?
                        .unwrap_or(10_800),
                ),
                None | Some("None") => None,
                Some(other) => {
                    return Err(invalid(
                        &key,
                        "spec.sessionAffinity",
                        format!("{other:?} is not None or ClientIP"),
                    ));
                }
            };
            Ok((
                key,
                Object::Service(ServiceInfo {
                    type_: spec.type_.unwrap_or_else(|| "ClusterIP".into()),
                    cluster_ips,
                    selector: spec.selector.unwrap_or_default(),
                    ports,
                    external_ips,
                    lb_ips,
                    affinity_timeout,
                    external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
                    internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
                }),
            ))
        }
        Kind::EndpointSlice => {
            let s: EndpointSlice = serde_path_to_error::deserialize(value).map_err(typed)?;
            let key = key_of(kind, &s.metadata)?;
            let service = s
                .metadata
                .labels
                .clone()
                .unwrap_or_default()
                .remove("kubernetes.io/service-name")
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    invalid(
                        &key,
                        "metadata.labels[kubernetes.io/service-name]",
                        "missing: the slice names no Service",
                    )
                })?;
            let mut endpoints = Vec::new();
            // Hostnames are for DNS, not for the datapath.
            let fqdn = s.address_type == "FQDN";
            for (i, e) in s.endpoints.into_iter().enumerate().filter(|_| !fqdn) {
                let c = e.conditions.unwrap_or_default();
                let ready = c.ready.unwrap_or(true);
                endpoints.push(SliceEndpoint {
                    addresses: ips(&key, &format!("endpoints[{i}].addresses"), e.addresses)?,
                    ready,
                    serving: c.serving.unwrap_or(ready),
                    terminating: c.terminating.unwrap_or(false),
                    node: e.node_name,
                });
            }
            let mut ports = Vec::new();
            for (i, p) in s.ports.unwrap_or_default().into_iter().enumerate() {
                let field = format!("ports[{i}]");
                let Some(n) = p.port else { continue };
                ports.push(SlicePort {
                    name: p.name.unwrap_or_default(),
                    proto: protocol(&key, &format!("{field}.protocol"), p.protocol.as_deref())?,
                    port: port_number(&key, &format!("{field}.port"), n)?,
                });
            }
            Ok((
                key,
                Object::EndpointSlice(SliceInfo {
                    service,
                    endpoints,
                    ports,
                }),
            ))
        }
        Kind::NetworkPolicy => {
            let p: NetworkPolicy = serde_path_to_error::deserialize(value).map_err(typed)?;
            let key = key_of(kind, &p.metadata)?;
            let policy = crate::policy::Policy::parse(&key, &p.spec.unwrap_or_default())?;
            Ok((key, Object::NetworkPolicy(Box::new(policy))))
        }
    }
}

/// A change a source reports. Sources send only what changed; the model
/// keeps indexes so that one change costs what it touches, not the size of
/// the cluster.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// Everything of one kind (after a list or relist): objects of that kind
    /// not in it are gone.
    Replace(Kind, Vec<(Key, Object)>),
    Upsert(Key, Object),
    Delete(Key),
    /// Every kind has been read once: the state is complete. Nothing is
    /// applied to the datapath before this (an empty state would remove
    /// every node).
    Synced,
    /// A barrier of the local API's `sync`: everything the source reported
    /// before it is in the datapath once the reconciler has passed it.
    Barrier(u64),
}

/// What an applied update may have changed, for the reconciler.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Nodes (and this node's pod CIDR) need a second look.
    pub nodes: bool,
    /// Addresses whose remote-pod owner may have changed.
    pub pod_ips: BTreeSet<IpAddr>,
    /// Services whose frontends or backends may have changed (by
    /// namespace/name): the Service, one of its EndpointSlices, or a pod it
    /// selects changed.
    pub services: BTreeSet<(String, String)>,
    /// Namespaces whose labels may have changed (their Namespace object).
    pub namespaces: BTreeSet<String>,
    /// Pods added, changed or removed.
    pub pods: BTreeSet<Key>,
    /// Namespaces whose NetworkPolicies changed.
    pub policy_namespaces: BTreeSet<String>,
    pub synced: bool,
    /// The latest sync barrier among the updates (not a change itself).
    pub barrier: Option<u64>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// The cluster as the sources describe it, indexed by what depends on what.
#[derive(Default)]
pub struct Cluster {
    own: String,
    objects: HashMap<Key, Object>,
    counts: BTreeMap<Kind, usize>,
    synced: bool,
    /// Keys of each kind per namespace.
    by_namespace: HashMap<(Kind, String), BTreeSet<Key>>,
    /// Pods per node name.
    pods_by_node: HashMap<String, BTreeSet<Key>>,
    /// Pods claiming each address.
    pods_by_ip: BTreeMap<IpAddr, BTreeSet<Key>>,
    /// Pods per (namespace, label key, label value).
    pods_by_label: HashMap<(String, String, String), BTreeSet<Key>>,
    /// EndpointSlices per Service (namespace, name).
    slices_by_service: HashMap<(String, String), BTreeSet<Key>>,
    /// Services per (namespace, selector key, selector value): a pod looks
    /// only at the Services that select on one of its labels.
    services_by_selector: HashMap<(String, String, String), BTreeSet<Key>>,
}

/// Adds `key` to (or with `add` false, removes it from) the set under `k`.
fn index_op<K: std::hash::Hash + Eq>(
    add: bool,
    m: &mut HashMap<K, BTreeSet<Key>>,
    k: K,
    key: &Key,
) {
    if add {
        m.entry(k).or_default().insert(key.clone());
    } else if let std::collections::hash_map::Entry::Occupied(mut e) = m.entry(k) {
        e.get_mut().remove(key);
        if e.get().is_empty() {
            e.remove();
        }
    }
}

impl Cluster {
    /// The model as node `own` sees it.
    pub fn new(own: &str) -> Self {
        Cluster {
            own: own.to_owned(),
            ..Default::default()
        }
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    pub fn get(&self, key: &Key) -> Option<&Object> {
        self.objects.get(key)
    }

    /// Applies one update, noting in `ch` what it may have changed.
    pub fn apply(&mut self, update: Update, ch: &mut Changes) {
        match update {
            Update::Replace(kind, objects) => {
                let new: BTreeMap<Key, Object> = objects.into_iter().collect();
                let gone: Vec<Key> = self
                    .objects
                    .keys()
                    .filter(|k| k.kind == kind && !new.contains_key(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    self.remove(&k, ch);
                }
                for (k, o) in new {
                    self.upsert(k, o, ch);
                }
            }
            Update::Upsert(k, o) => self.upsert(k, o, ch),
            Update::Delete(k) => self.remove(&k, ch),
            Update::Synced => {
                if !self.synced {
                    self.synced = true;
                    ch.synced = true;
                    ch.nodes = true;
                }
            }
            Update::Barrier(n) => ch.barrier = ch.barrier.max(Some(n)),
        }
    }

    fn upsert(&mut self, key: Key, obj: Object, ch: &mut Changes) {
        if self.objects.get(&key) == Some(&obj) {
            return;
        }
        self.remove(&key, ch);
        self.index(&key, &obj, true, ch);
        *self.counts.entry(key.kind).or_default() += 1;
        self.objects.insert(key, obj);
    }

    fn remove(&mut self, key: &Key, ch: &mut Changes) {
        let Some(obj) = self.objects.remove(key) else {
            return;
        };
        self.index(key, &obj, false, ch);
        if let Some(n) = self.counts.get_mut(&key.kind) {
            *n -= 1;
        }
    }

    /// Adds (`add`) or removes an object's index entries, and notes what
    /// depends on it.
    fn index(&mut self, key: &Key, obj: &Object, add: bool, ch: &mut Changes) {
        if !key.namespace.is_empty() {
            index_op(
                add,
                &mut self.by_namespace,
                (key.kind, key.namespace.clone()),
                key,
            );
        }
        match obj {
            Object::Node(_) => ch.nodes = true,
            Object::Namespace(_) => {
                ch.namespaces.insert(key.name.clone());
            }
            Object::Pod(p) => {
                index_op(add, &mut self.pods_by_node, p.node.clone(), key);
                for ip in &p.ips {
                    let set = self.pods_by_ip.entry(*ip).or_default();
                    if add {
                        set.insert(key.clone());
                    } else {
                        set.remove(key);
                        if set.is_empty() {
                            self.pods_by_ip.remove(ip);
                        }
                    }
                    ch.pod_ips.insert(*ip);
                }
                for (k, v) in &p.labels {
                    index_op(
                        add,
                        &mut self.pods_by_label,
                        (key.namespace.clone(), k.clone(), v.clone()),
                        key,
                    );
                }
                ch.pods.insert(key.clone());
                for svc in self.services_selecting(&key.namespace, &p.labels) {
                    ch.services.insert(svc);
                }
            }
            Object::Service(svc) => {
                for (k, v) in &svc.selector {
                    index_op(
                        add,
                        &mut self.services_by_selector,
                        (key.namespace.clone(), k.clone(), v.clone()),
                        key,
                    );
                }
                ch.services
                    .insert((key.namespace.clone(), key.name.clone()));
            }
            Object::EndpointSlice(s) => {
                let svc = (key.namespace.clone(), s.service.clone());
                index_op(add, &mut self.slices_by_service, svc.clone(), key);
                ch.services.insert(svc);
            }
            Object::NetworkPolicy(_) => {
                ch.policy_namespaces.insert(key.namespace.clone());
            }
        }
    }

    /// Services of `namespace` whose selector matches `labels`: only the
    /// Services selecting on one of these labels are looked at.
    pub fn services_selecting(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Vec<(String, String)> {
        let mut out = BTreeSet::new();
        for (k, v) in labels {
            let Some(keys) =
                self.services_by_selector
                    .get(&(namespace.to_owned(), k.clone(), v.clone()))
            else {
                continue;
            };
            for key in keys {
                if let Some(Object::Service(s)) = self.objects.get(key)
                    && s.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
                {
                    out.insert((key.namespace.clone(), key.name.clone()));
                }
            }
        }
        out.into_iter().collect()
    }

    /// Pods of `namespace` with every label of `selector`, from the label
    /// index: cost follows the smallest matching label set, not the pods.
    pub fn pods_matching(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<Key> {
        if selector.is_empty() {
            return self
                .by_namespace
                .get(&(Kind::Pod, namespace.to_owned()))
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
        }
        let mut sets: Vec<&BTreeSet<Key>> = Vec::new();
        for (k, v) in selector {
            match self
                .pods_by_label
                .get(&(namespace.to_owned(), k.clone(), v.clone()))
            {
                Some(s) => sets.push(s),
                None => return Vec::new(),
            }
        }
        sets.sort_by_key(|s| s.len());
        let (first, rest) = sets
            .split_first()
            .map_or((None, &[][..]), |(f, r)| (Some(*f), r));
        first
            .into_iter()
            .flatten()
            .filter(|k| rest.iter().all(|s| s.contains(*k)))
            .cloned()
            .collect()
    }

    /// EndpointSlices of a Service, from the index.
    pub fn slices_of(&self, namespace: &str, service: &str) -> Vec<Key> {
        self.slices_by_service
            .get(&(namespace.to_owned(), service.to_owned()))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Pods scheduled to `node`, from the index.
    pub fn pods_on(&self, node: &str) -> Vec<Key> {
        self.pods_by_node
            .get(node)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The pod on another node that owns `ip` (the first by namespace/name
    /// when several claim it), and one line per pod that lost the claim.
    pub fn remote_pod(&self, ip: IpAddr) -> (Option<String>, Vec<String>) {
        let mut winner: Option<String> = None;
        let mut problems = Vec::new();
        for key in self.pods_by_ip.get(&ip).into_iter().flatten() {
            let Some(Object::Pod(p)) = self.objects.get(key) else {
                continue;
            };
            if p.node == self.own || p.host_network || p.node.is_empty() {
                continue;
            }
            let name = format!("{}/{}", key.namespace, key.name);
            match &winner {
                None => winner = Some(name),
                Some(w) => problems.push(format!(
                    "Pod {name}: status.podIPs: address {ip} already belongs to pod {w}; skipped"
                )),
            }
        }
        (winner, problems)
    }

    /// This node's pod CIDR, the other nodes (conflicts resolved by name
    /// order) and one line per node left out. Nodes are few; this is
    /// recomputed only when a Node changes.
    /// This node's BGP settings from its Node object's annotations (AS
    /// number, peers), where it has them.
    pub fn own_bgp(&self) -> crate::bgp::Overrides {
        self.objects
            .iter()
            .find_map(|(k, o)| match o {
                Object::Node(n) if k.name == self.own => Some((n.bgp_asn, n.bgp_peers.clone())),
                _ => None,
            })
            .unwrap_or_default()
    }

    pub fn nodes(
        &self,
    ) -> (
        Option<Ipv4Network>,
        BTreeMap<String, RemoteNode>,
        BTreeSet<String>,
    ) {
        let mut own = None;
        let mut nodes: BTreeMap<String, RemoteNode> = BTreeMap::new();
        let mut problems = BTreeSet::new();
        let mut all: Vec<(&Key, &NodeInfo)> = self
            .objects
            .iter()
            .filter_map(|(k, o)| match o {
                Object::Node(n) => Some((k, n)),
                _ => None,
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        for (key, n) in all {
            let v4 = n.pod_cidrs.iter().find_map(|c| match c {
                IpNetwork::V4(v4) => Some(*v4),
                IpNetwork::V6(_) => None,
            });
            if key.name == self.own {
                own = v4;
                continue;
            }
            let (Some(ip), Some(pod_cidr)) = (n.internal_ip, v4) else {
                problems.insert(format!(
                    "Node {}: no InternalIP or no IPv4 pod CIDR yet; not routed",
                    key.name
                ));
                continue;
            };
            if let Some((other, _)) = nodes.iter().find(|(_, m)| m.pod_cidr.overlaps(pod_cidr)) {
                problems.insert(format!(
                    "Node {}: spec.podCIDRs: {pod_cidr} overlaps node {other}; node skipped",
                    key.name
                ));
                continue;
            }
            nodes.insert(key.name.clone(), RemoteNode { ip, pod_cidr });
        }
        (own, nodes, problems)
    }

    /// Every address some pod claims (for a full resync).
    /// Every pod, with its key.
    pub fn pods(&self) -> impl Iterator<Item = (&Key, &PodInfo)> + '_ {
        self.objects.iter().filter_map(|(k, o)| match o {
            Object::Pod(p) => Some((k, p)),
            _ => None,
        })
    }

    /// A pod by key.
    pub fn pod(&self, key: &Key) -> Option<&PodInfo> {
        match self.objects.get(key) {
            Some(Object::Pod(p)) => Some(p),
            _ => None,
        }
    }

    /// The keys of `kind` in `namespace`.
    fn keys_in(&self, kind: Kind, namespace: &str) -> impl Iterator<Item = &Key> + '_ {
        self.by_namespace
            .get(&(kind, namespace.to_owned()))
            .into_iter()
            .flatten()
    }

    /// The pods of `namespace`, by the index.
    pub fn pods_in(&self, namespace: &str) -> impl Iterator<Item = (&Key, &PodInfo)> + '_ {
        self.keys_in(Kind::Pod, namespace)
            .filter_map(|k| self.pod(k).map(|p| (k, p)))
    }

    /// The NetworkPolicies of `namespace`, by the index.
    pub fn policies_in(
        &self,
        namespace: &str,
    ) -> impl Iterator<Item = (&Key, &crate::policy::Policy)> + '_ {
        self.keys_in(Kind::NetworkPolicy, namespace)
            .filter_map(|k| match self.objects.get(k) {
                Some(Object::NetworkPolicy(p)) => Some((k, p.as_ref())),
                _ => None,
            })
    }

    /// Every NetworkPolicy, with its key.
    pub fn policies(&self) -> impl Iterator<Item = (&Key, &crate::policy::Policy)> + '_ {
        self.objects.iter().filter_map(|(k, o)| match o {
            Object::NetworkPolicy(p) => Some((k, p.as_ref())),
            _ => None,
        })
    }

    /// A namespace's labels, with `kubernetes.io/metadata.name` (which the
    /// API server sets; manifests may lack it). A namespace with no object
    /// has only that label.
    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        let key = Key {
            kind: Kind::Namespace,
            namespace: String::new(),
            name: namespace.to_owned(),
        };
        let mut labels = match self.objects.get(&key) {
            Some(Object::Namespace(l)) => l.clone(),
            _ => BTreeMap::new(),
        };
        labels.insert(
            crate::policy::NAMESPACE_NAME_LABEL.to_owned(),
            namespace.to_owned(),
        );
        labels
    }

    pub fn pod_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.pods_by_ip.keys().copied()
    }

    /// Every Service, and every Service name an EndpointSlice points at
    /// (for a full resync).
    pub fn service_names(&self) -> BTreeSet<(String, String)> {
        self.objects
            .keys()
            .filter(|k| k.kind == Kind::Service)
            .map(|k| (k.namespace.clone(), k.name.clone()))
            .chain(self.slices_by_service.keys().cloned())
            .collect()
    }

    /// A Service (if it exists) and the EndpointSlices that name it.
    pub fn service(
        &self,
        namespace: &str,
        name: &str,
    ) -> (Key, Option<&ServiceInfo>, Vec<(Key, &SliceInfo)>) {
        let key = Key {
            kind: Kind::Service,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let svc = match self.objects.get(&key) {
            Some(Object::Service(s)) => Some(s),
            _ => None,
        };
        let slices = self
            .slices_of(namespace, name)
            .into_iter()
            .filter_map(|k| match self.objects.get(&k) {
                Some(Object::EndpointSlice(s)) => Some((k, s)),
                _ => None,
            })
            .collect();
        (key, svc, slices)
    }
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

    fn pod(name: &str, node: &str, ip: &str, app: &str) -> (Key, Object) {
        convert(
            Kind::Pod,
            json!({"metadata": {"name": name, "namespace": "ns", "labels": {"app": app}},
                                  "spec": {"nodeName": node, "containers": []},
                                  "status": {"podIPs": [{"ip": ip}]}}),
        )
        .unwrap()
    }

    fn apply(c: &mut Cluster, u: Update) -> Changes {
        let mut ch = Changes::default();
        c.apply(u, &mut ch);
        ch
    }

    #[test]
    fn a_node_s_bgp_annotations_override_the_flags_and_bad_ones_are_named() {
        let with = |asn: &str, peers: &str| {
            convert(
                Kind::Node,
                json!({"metadata": {"name": "me", "annotations": {
                    BGP_ASN_ANNOTATION: asn, BGP_PEERS_ANNOTATION: peers}},
                    "spec": {"podCIDR": "10.244.0.0/24"}}),
            )
        };
        let mut c = Cluster::new("me");
        let (k, o) = with("65010", "172.21.0.1:65000, 172.21.0.2:65000").unwrap();
        apply(&mut c, Update::Upsert(k, o));
        let (asn, peers) = c.own_bgp();
        assert_eq!(asn, Some(65010));
        assert_eq!(
            peers
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["172.21.0.1:65000", "172.21.0.2:65000"]
        );
        let e = with("lots", "").unwrap_err().to_string();
        assert!(
            e.contains("metadata.annotations[dataplane.io/bgp-asn]") && e.contains("not a number"),
            "{e}"
        );
        let e = with("65010", "172.21.0.1").unwrap_err().to_string();
        assert!(
            e.contains("metadata.annotations[dataplane.io/bgp-peers]") && e.contains("ADDRESS:ASN"),
            "{e}"
        );
        // Without annotations, the flags stand.
        assert_eq!(Cluster::new("other").own_bgp(), (None, None));
    }

    #[test]
    fn nodes_and_remote_pods_with_conflicts() {
        let mut c = Cluster::new("me");
        for (k, o) in [
            node("me", "172.20.0.11", "10.244.0.0/24"),
            node("a", "172.20.0.12", "10.244.1.0/24"),
            node("b", "172.20.0.13", "10.244.1.0/25"),
            pod("p1", "a", "10.244.1.5", "x"),
            pod("p2", "a", "10.244.1.5", "x"),
            pod("local", "me", "10.244.0.9", "x"),
        ] {
            apply(&mut c, Update::Upsert(k, o));
        }
        let (own, nodes, problems) = c.nodes();
        assert_eq!(own, Some("10.244.0.0/24".parse().unwrap()));
        assert_eq!(nodes.keys().collect::<Vec<_>>(), ["a"], "b overlaps a");
        assert!(
            problems.contains("Node b: spec.podCIDRs: 10.244.1.0/25 overlaps node a; node skipped"),
            "{problems:?}"
        );
        let (winner, problems) = c.remote_pod("10.244.1.5".parse().unwrap());
        assert_eq!(winner.as_deref(), Some("ns/p1"));
        assert_eq!(
            problems,
            ["Pod ns/p2: status.podIPs: address 10.244.1.5 already belongs to pod ns/p1; skipped"]
        );
        // This node's own pods are not remote.
        assert_eq!(c.remote_pod("10.244.0.9".parse().unwrap()).0, None);
    }

    #[test]
    fn one_change_reports_only_what_depends_on_it() {
        let mut c = Cluster::new("me");
        let svc = convert(
            Kind::Service,
            json!({"metadata": {"name": "web", "namespace": "ns"},
                   "spec": {"clusterIPs": ["10.96.0.10"], "selector": {"app": "web"}}}),
        )
        .unwrap();
        apply(&mut c, Update::Upsert(svc.0, svc.1));
        let (k, o) = pod("w1", "a", "10.244.1.7", "web");
        let ch = apply(&mut c, Update::Upsert(k.clone(), o.clone()));
        assert_eq!(ch.pod_ips, BTreeSet::from(["10.244.1.7".parse().unwrap()]));
        assert_eq!(ch.services, BTreeSet::from([("ns".into(), "web".into())]));
        assert!(!ch.nodes);
        // The same object again changes nothing.
        assert!(apply(&mut c, Update::Upsert(k.clone(), o)).is_empty());
        // A pod no Service selects touches no Service.
        let (k2, o2) = pod("db", "a", "10.244.1.8", "db");
        assert!(apply(&mut c, Update::Upsert(k2, o2)).services.is_empty());
        // Indexes answer selectors and placement.
        let sel = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        assert_eq!(c.pods_matching("ns", &sel), vec![k.clone()]);
        assert_eq!(c.pods_matching("other", &sel), Vec::<Key>::new());
        assert_eq!(c.pods_on("a").len(), 2);
        // Deleting moves the address back out.
        let ch = apply(&mut c, Update::Delete(k));
        assert!(
            ch.pod_ips
                .contains(&"10.244.1.7".parse::<IpAddr>().unwrap())
        );
        assert_eq!(c.remote_pod("10.244.1.7".parse().unwrap()).0, None);
        assert_eq!(c.count(Kind::Pod), 1);
    }

    #[test]
    fn replace_removes_what_a_relist_lacks() {
        let mut c = Cluster::new("me");
        let (k1, o1) = pod("p1", "a", "10.244.1.5", "x");
        let (k2, o2) = pod("p2", "a", "10.244.1.6", "x");
        apply(&mut c, Update::Upsert(k1, o1));
        apply(&mut c, Update::Upsert(k2.clone(), o2.clone()));
        let ch = apply(&mut c, Update::Replace(Kind::Pod, vec![(k2, o2)]));
        assert_eq!(ch.pod_ips, BTreeSet::from(["10.244.1.5".parse().unwrap()]));
        assert_eq!(c.count(Kind::Pod), 1);
        assert!(!c.synced());
        assert!(apply(&mut c, Update::Synced).synced);
        assert!(c.synced());
    }
}
