//! NetworkPolicy, in userspace and pure: validated policies, security
//! identities, and the compiler that turns the policies selecting one
//! endpoint into the entries of its policy map.
//!
//! An identity stands for one (namespace, namespace labels, pod labels)
//! set and is derived from it alone, so every node names a pod alike.
//! A rule's peers become identities (selectors are evaluated here, not per
//! packet) or address classes (ipBlocks); its ports become prefixes of the
//! (peer, protocol, port) key, so a lookup costs the same whatever the
//! number of rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnetwork::Ipv4Network;
use k8s_openapi::{
    api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use crate::cluster::{Invalid, Key, invalid, port_number, protocol};
use dataplane_common::IPPROTO_SCTP;

pub type Labels = BTreeMap<String, String>;

/// The label every namespace has (set by the API server; added here for
/// namespaces read from manifests that lack it).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

pub use dataplane_common::{
    IDENTITY_FIRST_POD, IDENTITY_HOST, IDENTITY_MAX, IDENTITY_REMOTE_NODE, IDENTITY_UNKNOWN,
    IDENTITY_WORLD,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

/// A label selector: every label and every expression must match. The
/// empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub labels: Labels,
    pub exprs: Vec<(String, Op)>,
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.exprs.iter().all(|(k, op)| match op {
                Op::In(vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                Op::NotIn(vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                Op::Exists => labels.contains_key(k),
                Op::DoesNotExist => !labels.contains_key(k),
            })
    }

    fn parse(key: &Key, field: &str, s: &LabelSelector) -> Result<Self, Invalid> {
        let mut exprs = Vec::new();
        for (i, e) in s.match_expressions.iter().flatten().enumerate() {
            let f = format!("{field}.matchExpressions[{i}]");
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let op = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(invalid(
                        key,
                        format!("{f}.values"),
                        format!("operator {} needs values", e.operator),
                    ));
                }
                "In" => Op::In(values),
                "NotIn" => Op::NotIn(values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(invalid(
                        key,
                        format!("{f}.values"),
                        format!("operator {} takes no values", e.operator),
                    ));
                }
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err(invalid(
                        key,
                        format!("{f}.operator"),
                        format!("unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"),
                    ));
                }
            };
            exprs.push((e.key.clone(), op));
        }
        Ok(Selector {
            labels: s.match_labels.clone().unwrap_or_default(),
            exprs,
        })
    }
}

/// Who a rule allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods selected by `pods` in the namespaces `namespaces` selects (None:
    /// the policy's own namespace).
    Pods {
        namespaces: Option<Selector>,
        pods: Selector,
    },
    /// Any address in `cidr` outside every `except` (pod addresses too).
    Block {
        cidr: Ipv4Network,
        except: Vec<Ipv4Network>,
    },
}

/// Which ports a rule allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    /// Every port of the protocol.
    All(u8),
    /// `port` to `end` (inclusive).
    Range(u8, u16, u16),
    /// A container port's name, resolved against the destination pod.
    Named(u8, String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Empty: every peer (any address).
    pub peers: Vec<Peer>,
    /// Empty: every protocol and port.
    pub ports: Vec<Ports>,
}

/// A validated NetworkPolicy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub pod_selector: Selector,
    /// None: the policy does not isolate that direction.
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

fn parse_ports(key: &Key, field: &str, ports: &[NetworkPolicyPort]) -> Result<Vec<Ports>, Invalid> {
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let proto = protocol(key, &format!("{f}.protocol"), p.protocol.as_deref())?;
        let spec = match (&p.port, p.end_port) {
            (None, None) => Ports::All(proto),
            (None, Some(_)) => {
                return Err(invalid(key, format!("{f}.endPort"), "endPort without port"));
            }
            (Some(IntOrString::Int(n)), end) => {
                let start = port_number(key, &format!("{f}.port"), *n)?;
                let end = match end {
                    Some(e) => port_number(key, &format!("{f}.endPort"), e)?,
                    None => start,
                };
                if end < start {
                    return Err(invalid(
                        key,
                        format!("{f}.endPort"),
                        format!("endPort {end} is below port {start}"),
                    ));
                }
                Ports::Range(proto, start, end)
            }
            (Some(IntOrString::String(name)), None) => {
                // A number written as a string is a number.
                match name.parse::<i32>() {
                    Ok(n) => {
                        let n = port_number(key, &format!("{f}.port"), n)?;
                        Ports::Range(proto, n, n)
                    }
                    Err(_) if name.is_empty() => {
                        return Err(invalid(key, format!("{f}.port"), "an empty port name"));
                    }
                    Err(_) => Ports::Named(proto, name.clone()),
                }
            }
            (Some(IntOrString::String(_)), Some(_)) => {
                return Err(invalid(
                    key,
                    format!("{f}.endPort"),
                    "endPort needs a numeric port",
                ));
            }
        };
        out.push(spec);
    }
    Ok(out)
}

fn parse_peers(key: &Key, field: &str, peers: &[NetworkPolicyPeer]) -> Result<Vec<Peer>, Invalid> {
    let mut out = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if let Some(b) = &p.ip_block {
            if p.pod_selector.is_some() || p.namespace_selector.is_some() {
                return Err(invalid(
                    key,
                    f,
                    "ipBlock cannot be combined with podSelector or namespaceSelector",
                ));
            }
            let cidr = parse_cidr(key, &format!("{f}.ipBlock.cidr"), &b.cidr)?;
            let mut except = Vec::new();
            for (j, e) in b.except.iter().flatten().enumerate() {
                let ef = format!("{f}.ipBlock.except[{j}]");
                let e = parse_cidr(key, &ef, e)?;
                if !(cidr.prefix() <= e.prefix() && cidr.contains(e.network())) {
                    return Err(invalid(key, ef, format!("{e} is not inside cidr {cidr}")));
                }
                except.push(e);
            }
            out.push(Peer::Block { cidr, except });
            continue;
        }
        let namespaces = p
            .namespace_selector
            .as_ref()
            .map(|s| Selector::parse(key, &format!("{f}.namespaceSelector"), s))
            .transpose()?;
        let pods = p
            .pod_selector
            .as_ref()
            .map(|s| Selector::parse(key, &format!("{f}.podSelector"), s))
            .transpose()?;
        if namespaces.is_none() && pods.is_none() {
            return Err(invalid(
                key,
                f,
                "a peer needs podSelector, namespaceSelector or ipBlock",
            ));
        }
        out.push(Peer::Pods {
            namespaces,
            pods: pods.unwrap_or_default(),
        });
    }
    Ok(out)
}

/// The rules of one direction (`field`: `spec.ingress` or `spec.egress`,
/// whose peers are under `peers_name`): each as (peers, ports).
fn parse_rules<'a>(
    key: &Key,
    field: &str,
    peers_name: &str,
    rules: impl Iterator<
        Item = (
            Option<&'a [NetworkPolicyPeer]>,
            Option<&'a [NetworkPolicyPort]>,
        ),
    >,
) -> Result<Vec<Rule>, Invalid> {
    rules
        .enumerate()
        .map(|(i, (peers, ports))| {
            let f = format!("{field}[{i}]");
            Ok(Rule {
                peers: parse_peers(key, &format!("{f}.{peers_name}"), peers.unwrap_or(&[]))?,
                ports: parse_ports(key, &format!("{f}.ports"), ports.unwrap_or(&[]))?,
            })
        })
        .collect()
}

/// An IPv4 CIDR in canonical form (`10.0.0.1/8` is refused: host bits set).
fn parse_cidr(key: &Key, field: &str, s: &str) -> Result<Ipv4Network, Invalid> {
    let n: Ipv4Network = s
        .parse()
        .map_err(|e| invalid(key, field, format!("{s:?} is not an IPv4 CIDR: {e}")))?;
    if n.network() != n.ip() {
        return Err(invalid(
            key,
            field,
            format!("{s:?} has host bits set (the network is {})", n.network()),
        ));
    }
    Ok(n)
}

impl Policy {
    /// Validates `spec` (of the policy `key`). policyTypes default as the
    /// API server defaults them: Ingress, and Egress if there are egress
    /// rules.
    pub fn parse(key: &Key, spec: &NetworkPolicySpec) -> Result<Self, Invalid> {
        let pod_selector = match &spec.pod_selector {
            Some(s) => Selector::parse(key, "spec.podSelector", s)?,
            None => Selector::default(),
        };
        let (mut ingress, mut egress) = (false, false);
        match &spec.policy_types {
            Some(types) if !types.is_empty() => {
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => ingress = true,
                        "Egress" => egress = true,
                        other => {
                            return Err(invalid(
                                key,
                                format!("spec.policyTypes[{i}]"),
                                format!("{other:?} is not Ingress or Egress"),
                            ));
                        }
                    }
                }
            }
            _ => {
                ingress = true;
                egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
            }
        }
        let irules = parse_rules(
            key,
            "spec.ingress",
            "from",
            spec.ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_deref(), r.ports.as_deref())),
        )?;
        let erules = parse_rules(
            key,
            "spec.egress",
            "to",
            spec.egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_deref(), r.ports.as_deref())),
        )?;
        Ok(Policy {
            pod_selector,
            ingress: ingress.then_some(irules),
            egress: egress.then_some(erules),
        })
    }

    /// Whether any rule names SCTP (which this kernel cannot carry).
    pub fn names_sctp(&self) -> bool {
        self.ingress
            .iter()
            .chain(self.egress.iter())
            .flatten()
            .flat_map(|r| &r.ports)
            .any(|p| match p {
                Ports::All(pr) | Ports::Range(pr, ..) | Ports::Named(pr, _) => *pr == IPPROTO_SCTP,
            })
    }
}

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSet {
    pub namespace: String,
    pub namespace_labels: Labels,
    pub labels: Labels,
}

impl LabelSet {
    /// The canonical text hashed into the identity.
    fn canonical(&self) -> String {
        let mut s = String::new();
        s.push_str(&self.namespace);
        for (k, v) in &self.namespace_labels {
            s.push_str("\0n:");
            s.push_str(k);
            s.push('=');
            s.push_str(v);
        }
        for (k, v) in &self.labels {
            s.push_str("\0p:");
            s.push_str(k);
            s.push('=');
            s.push_str(v);
        }
        s
    }
}

/// FNV-1a, 32 bits: fixed across builds and machines (std's hasher is
/// not), which is all an identity needs.
fn fnv1a(text: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The identities of every label set in the cluster. An identity is the
/// label set's hash folded into the pod range; on a collision the set
/// that sorts later takes the next free number, so nodes that know the
/// same sets agree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identities {
    by_set: BTreeMap<LabelSet, u32>,
    by_id: BTreeMap<u32, LabelSet>,
}

impl Identities {
    pub fn new(sets: impl IntoIterator<Item = LabelSet>) -> Self {
        let sets: BTreeSet<LabelSet> = sets.into_iter().collect();
        let span = IDENTITY_MAX - IDENTITY_FIRST_POD + 1;
        let mut ids = Identities::default();
        for set in sets {
            let mut id = IDENTITY_FIRST_POD + fnv1a(&set.canonical()) % span;
            while ids.by_id.contains_key(&id) {
                id = if id == IDENTITY_MAX {
                    IDENTITY_FIRST_POD
                } else {
                    id + 1
                };
            }
            ids.by_id.insert(id, set.clone());
            ids.by_set.insert(set, id);
        }
        ids
    }

    pub fn of(&self, set: &LabelSet) -> Option<u32> {
        self.by_set.get(set).copied()
    }

    pub fn set(&self, id: u32) -> Option<&LabelSet> {
        self.by_id.get(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &LabelSet)> {
        self.by_id.iter().map(|(id, s)| (*id, s))
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Where an allow came from, for `policy get` and verdict events: the
/// policy's id (the agent's numbering).
pub type PolicyId = u32;

/// Direction of a rule, as the endpoint sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dir {
    Ingress,
    Egress,
}

/// One allow entry of an endpoint: traffic with `peer` on `proto` and
/// ports in `port`'s prefix. `proto` None: every protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Allow {
    pub dir: Dir,
    pub peer: PeerId,
    /// None: every protocol (and port).
    pub proto: Option<u8>,
    /// (first port, prefix length over 16 bits); None: every port.
    pub ports: Option<(u16, u8)>,
}

/// Who an entry is for: an identity, any peer, or an address class (the
/// addresses an ipBlock partition gives one set of rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerId {
    Any,
    Identity(u32),
    Class(u32),
}

/// The compiled policy of one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    /// Each allow, with the lowest id of the policies giving it.
    pub allows: BTreeMap<Allow, PolicyId>,
    /// Address prefixes to classes, per direction (longest prefix wins).
    pub classes: BTreeMap<(Dir, Ipv4Network), u32>,
}

impl Compiled {
    pub fn tracked(&self) -> bool {
        self.ingress_isolated || self.egress_isolated
    }
}

/// A pod as the compiler needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView<'a> {
    pub identity: u32,
    pub set: &'a LabelSet,
    pub ips: Vec<Ipv4Addr>,
    /// Container ports: (name, protocol, number).
    pub ports: &'a [(String, u8, u16)],
}

/// What a port spec resolves to: (protocol, port prefix); None: every
/// protocol and port, a None prefix: every port of the protocol.
type Spec = Option<(u8, Option<(u16, u8)>)>;

/// A [`Spec`] as (protocol, first port, prefix length), a 0 length for
/// every port.
type Flat = Option<(u8, u16, u8)>;

/// An ipBlock allow awaiting the partition: direction, cidr, excepts,
/// ports, policy.
type Block = (Dir, Ipv4Network, Vec<Ipv4Network>, Flat, PolicyId);

/// The port range `start..=end` as prefix blocks over 16 bits.
pub fn port_prefixes(start: u16, end: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(start), u32::from(end));
    while lo <= hi {
        // The largest aligned block starting at lo within [lo, hi].
        let mut size = if lo == 0 {
            1 << 16
        } else {
            lo & lo.wrapping_neg()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let bits = size.trailing_zeros() as u8;
        out.push((lo as u16, 16 - bits));
        lo += size;
    }
    out
}

/// Whether a `Pods` peer of a policy in `policy_ns` selects `set`.
fn selects_peer(
    policy_ns: &str,
    namespaces: &Option<Selector>,
    pods: &Selector,
    set: &LabelSet,
) -> bool {
    let ns_ok = match namespaces {
        None => set.namespace == policy_ns,
        Some(sel) => sel.matches(&set.namespace_labels),
    };
    ns_ok && pods.matches(&set.labels)
}

/// Compiles what the policies (`(id, namespace, policy)`) say about one
/// endpoint: the pod `me` (its namespace, labels and container ports),
/// with every pod of the cluster in `pods`.
pub fn compile<'a>(
    me: &PodView<'a>,
    policies: impl IntoIterator<Item = (PolicyId, &'a str, &'a Policy)>,
    pods: &[PodView<'a>],
) -> Compiled {
    let mut out = Compiled::default();
    // Per direction, the ipBlock allows to partition: (cidr, excepts,
    // ports, policy).
    let mut blocks: Vec<Block> = Vec::new();
    for (id, ns, policy) in policies {
        if ns != me.set.namespace || !policy.pod_selector.matches(&me.set.labels) {
            continue;
        }
        for (dir, rules) in [
            (Dir::Ingress, &policy.ingress),
            (Dir::Egress, &policy.egress),
        ] {
            let Some(rules) = rules else { continue };
            match dir {
                Dir::Ingress => out.ingress_isolated = true,
                Dir::Egress => out.egress_isolated = true,
            }
            for rule in rules {
                compile_rule(me, id, ns, dir, rule, pods, &mut out, &mut blocks);
            }
        }
    }
    partition(&mut out, &blocks);
    out
}

/// The (protocol, port prefix) pairs `ports` allows toward `dest` (whose
/// container ports resolve names); None: every protocol and port.
fn resolve(ports: &[Ports], dest_ports: &[(String, u8, u16)]) -> Vec<Spec> {
    if ports.is_empty() {
        return vec![None];
    }
    let mut out = Vec::new();
    for p in ports {
        match p {
            Ports::All(proto) => out.push(Some((*proto, None))),
            Ports::Range(proto, s, e) => {
                for pre in port_prefixes(*s, *e) {
                    out.push(Some((*proto, Some(pre))));
                }
            }
            Ports::Named(proto, name) => {
                for (n, pr, num) in dest_ports {
                    if n == name && pr == proto {
                        out.push(Some((*proto, Some((*num, 16)))));
                    }
                }
            }
        }
    }
    out
}

fn add(out: &mut Compiled, allow: Allow, id: PolicyId) {
    out.allows
        .entry(allow)
        .and_modify(|v| *v = (*v).min(id))
        .or_insert(id);
}

#[allow(clippy::too_many_arguments)]
fn compile_rule<'a>(
    me: &PodView<'a>,
    id: PolicyId,
    ns: &str,
    dir: Dir,
    rule: &Rule,
    pods: &[PodView<'a>],
    out: &mut Compiled,
    blocks: &mut Vec<Block>,
) {
    // Named ports resolve against the destination: the endpoint itself for
    // ingress, each peer pod for egress (where numeric ports still hold for
    // any peer).
    let (named, numeric): (Vec<Ports>, Vec<Ports>) = rule
        .ports
        .iter()
        .cloned()
        .partition(|p| matches!(p, Ports::Named(..)));
    let per_peer_names = dir == Dir::Egress && !named.is_empty();
    let numeric_specs = if numeric.is_empty() {
        Vec::new()
    } else {
        resolve(&numeric, &[])
    };
    let push = |out: &mut Compiled, peer: PeerId, spec: Spec| {
        let (proto, ports) = match spec {
            None => (None, None),
            Some((p, pre)) => (Some(p), pre),
        };
        add(
            out,
            Allow {
                dir,
                peer,
                proto,
                ports,
            },
            id,
        );
    };
    if rule.peers.is_empty() {
        if per_peer_names {
            // Every pod, by its own mapping of the names.
            for spec in &numeric_specs {
                push(out, PeerId::Any, *spec);
            }
            for pod in pods {
                for spec in resolve(&named, pod.ports) {
                    push(out, PeerId::Identity(pod.identity), spec);
                }
            }
        } else {
            for spec in resolve(&rule.ports, me.ports) {
                push(out, PeerId::Any, spec);
            }
        }
        return;
    }
    for peer in &rule.peers {
        match peer {
            Peer::Pods {
                namespaces,
                pods: sel,
            } => {
                for pod in pods {
                    if !selects_peer(ns, namespaces, sel, pod.set) {
                        continue;
                    }
                    let dest = if dir == Dir::Egress {
                        pod.ports
                    } else {
                        me.ports
                    };
                    for spec in resolve(&rule.ports, dest) {
                        push(out, PeerId::Identity(pod.identity), spec);
                    }
                }
            }
            Peer::Block { cidr, except } => {
                if per_peer_names {
                    // Names mean something only for pods: each pod in the
                    // block, as a /32 of its own.
                    for spec in &numeric_specs {
                        blocks.push((dir, *cidr, except.clone(), flat(*spec), id));
                    }
                    for pod in pods {
                        for ip in &pod.ips {
                            if !cidr.contains(*ip) || except.iter().any(|e| e.contains(*ip)) {
                                continue;
                            }
                            let host = Ipv4Network::new(*ip, 32).expect("a /32");
                            for spec in resolve(&named, pod.ports) {
                                blocks.push((dir, host, Vec::new(), flat(spec), id));
                            }
                        }
                    }
                } else {
                    for spec in resolve(&rule.ports, me.ports) {
                        blocks.push((dir, *cidr, except.clone(), flat(spec), id));
                    }
                }
            }
        }
    }
}

/// (protocol, first port, prefix length); None: everything. Every
/// protocol-only spec is a 0-length port prefix.
fn flat(spec: Spec) -> Flat {
    spec.map(|(p, pre)| match pre {
        Some((port, len)) => (p, port, len),
        None => (p, 0, 0),
    })
}

/// Turns the ipBlock allows into disjoint address classes: every cidr and
/// except is a prefix; the longest one containing an address decides
/// which blocks hold it (a block holds the prefix if its cidr contains it
/// and none of its excepts do), and prefixes with the same set of allows
/// share a class.
fn partition(out: &mut Compiled, blocks: &[Block]) {
    for dir in [Dir::Ingress, Dir::Egress] {
        let mine: Vec<_> = blocks.iter().filter(|b| b.0 == dir).collect();
        if mine.is_empty() {
            continue;
        }
        let prefixes: BTreeSet<Ipv4Network> = mine
            .iter()
            .flat_map(|b| std::iter::once(b.1).chain(b.2.iter().copied()))
            .collect();
        // A class is identified by the allows it carries.
        let mut class_ids: BTreeMap<BTreeSet<(Flat, PolicyId)>, u32> = BTreeMap::new();
        let base = out.classes.len() as u32;
        for p in prefixes {
            let inside = |n: &Ipv4Network| n.prefix() <= p.prefix() && n.contains(p.network());
            let held: BTreeSet<(Flat, PolicyId)> = mine
                .iter()
                .filter(|b| inside(&b.1) && !b.2.iter().any(inside))
                .map(|b| (b.3, b.4))
                .collect();
            if held.is_empty() {
                // Still an entry: it shadows shorter prefixes that hold.
                out.classes.insert((dir, p), 0);
                continue;
            }
            let next = base + class_ids.len() as u32 + 1;
            let class = *class_ids.entry(held.clone()).or_insert(next);
            out.classes.insert((dir, p), class);
            for (spec, id) in held {
                let (proto, ports) = match spec {
                    None => (None, None),
                    Some((pr, _, 0)) => (Some(pr), None),
                    Some((pr, port, len)) => (Some(pr), Some((port, len))),
                };
                add(
                    out,
                    Allow {
                        dir,
                        peer: PeerId::Class(class),
                        proto,
                        ports,
                    },
                    id,
                );
            }
        }
    }
}

/// What the compiled entries decide for one packet: a reference
/// evaluation of the maps' lookups (exact identity, any peer, the
/// address's class), used by tests and by `policy get`.
pub fn decide(
    c: &Compiled,
    dir: Dir,
    identity: u32,
    addr: Ipv4Addr,
    proto: u8,
    port: u16,
) -> Option<PolicyId> {
    let isolated = match dir {
        Dir::Ingress => c.ingress_isolated,
        Dir::Egress => c.egress_isolated,
    };
    if !isolated {
        return Some(0);
    }
    let class = c
        .classes
        .iter()
        .filter(|((d, n), _)| *d == dir && n.contains(addr))
        .max_by_key(|((_, n), _)| n.prefix())
        .map(|(_, c)| *c)
        .filter(|c| *c != 0);
    let peers = [
        Some(PeerId::Identity(identity)),
        Some(PeerId::Any),
        class.map(PeerId::Class),
    ];
    let mut best: Option<PolicyId> = None;
    for peer in peers.into_iter().flatten() {
        for (a, id) in &c.allows {
            if a.dir != dir || a.peer != peer {
                continue;
            }
            let proto_ok = a.proto.is_none_or(|p| p == proto);
            let port_ok = match a.ports {
                None => true,
                Some((first, len)) => {
                    let mask = if len == 0 {
                        0
                    } else {
                        u16::MAX << (16 - u32::from(len))
                    };
                    port & mask == first & mask
                }
            };
            if proto_ok && port_ok {
                best = Some(best.map_or(*id, |b| b.min(*id)));
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Kind;
    use dataplane_common::{IPPROTO_TCP, IPPROTO_UDP};
    use serde_json::json;

    fn key() -> Key {
        Key {
            kind: Kind::NetworkPolicy,
            namespace: "x".into(),
            name: "p".into(),
        }
    }

    fn policy(spec: serde_json::Value) -> Result<Policy, Invalid> {
        let spec: NetworkPolicySpec = serde_json::from_value(spec).expect("spec");
        Policy::parse(&key(), &spec)
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn set(ns: &str, pod: &str) -> LabelSet {
        LabelSet {
            namespace: ns.into(),
            namespace_labels: labels(&[("ns", ns), (NAMESPACE_NAME_LABEL, ns)]),
            labels: labels(&[("pod", pod)]),
        }
    }

    #[test]
    fn selectors_follow_the_api_semantics() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        let sel = |v: serde_json::Value| {
            Selector::parse(&key(), "s", &serde_json::from_value(v).expect("sel")).expect("valid")
        };
        assert!(sel(json!({})).matches(&l));
        assert!(sel(json!({"matchLabels": {"app": "web"}})).matches(&l));
        assert!(!sel(json!({"matchLabels": {"app": "db"}})).matches(&l));
        let e = |op: &str, vals: &[&str]| {
            sel(json!({"matchExpressions": [{"key": "tier", "operator": op, "values": vals}]}))
        };
        assert!(e("In", &["front", "back"]).matches(&l));
        assert!(!e("NotIn", &["front"]).matches(&l));
        assert!(e("NotIn", &["back"]).matches(&l));
        assert!(e("Exists", &[]).matches(&l));
        assert!(!e("DoesNotExist", &[]).matches(&l));
        // NotIn matches a pod without the key.
        assert!(e("NotIn", &["front"]).matches(&labels(&[("app", "web")])));
        let err = Selector::parse(
            &key(),
            "spec.podSelector",
            &serde_json::from_value(json!({"matchExpressions": [{"key": "a", "operator": "Has"}]}))
                .expect("sel"),
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.podSelector.matchExpressions[0].operator");
    }

    #[test]
    fn policy_types_default_as_the_api_server_does() {
        let p = policy(json!({"podSelector": {}})).expect("valid");
        assert_eq!((p.ingress.is_some(), p.egress.is_some()), (true, false));
        let p = policy(json!({"podSelector": {}, "egress": [{}]})).expect("valid");
        assert_eq!((p.ingress.is_some(), p.egress.is_some()), (true, true));
        // An empty egress list is no egress section.
        let p = policy(json!({"podSelector": {}, "egress": []})).expect("valid");
        assert!(p.egress.is_none());
        let p = policy(json!({"podSelector": {}, "policyTypes": ["Egress"]})).expect("valid");
        assert_eq!((p.ingress.is_some(), p.egress.is_some()), (false, true));
    }

    #[test]
    fn bad_policies_name_the_field() {
        let cases = [
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
                "spec.ingress[0].from[0].ipBlock.cidr",
            ),
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]}),
                "spec.ingress[0].from[0].ipBlock.except[0]",
            ),
            (
                json!({"egress": [{"ports": [{"port": 70000}]}]}),
                "spec.egress[0].ports[0].port",
            ),
            (
                json!({"egress": [{"ports": [{"port": 80, "endPort": 79}]}]}),
                "spec.egress[0].ports[0].endPort",
            ),
            (
                json!({"ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
                "spec.ingress[0].ports[0].protocol",
            ),
            (json!({"policyTypes": ["Both"]}), "spec.policyTypes[0]"),
        ];
        for (spec, field) in cases {
            let e = policy(spec.clone()).expect_err(&spec.to_string());
            assert_eq!(e.field, field, "{spec}: {e}");
        }
    }

    #[test]
    fn port_ranges_become_aligned_prefixes() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(80, 83), vec![(80, 14)]);
        let p = port_prefixes(1000, 2000);
        // Together they cover exactly the range.
        let mut covered = 0u32;
        for (first, len) in &p {
            let size = 1u32 << (16 - u32::from(*len));
            assert_eq!(u32::from(*first) % size, 0, "aligned");
            covered += size;
        }
        assert_eq!(covered, 1001);
        assert!(p.len() <= 30);
    }

    #[test]
    fn identities_are_derived_from_labels_alone_and_collisions_resolve_alike() {
        let a = Identities::new([set("x", "a"), set("y", "b")]);
        let b = Identities::new([set("y", "b"), set("x", "a"), set("z", "c")]);
        assert_eq!(a.of(&set("x", "a")), b.of(&set("x", "a")));
        let id = a.of(&set("x", "a")).expect("id");
        assert!((IDENTITY_FIRST_POD..=IDENTITY_MAX).contains(&id));
        // Many sets: all distinct, all in range.
        let many = Identities::new((0..5000).map(|i| set("x", &format!("p{i}"))));
        assert_eq!(many.len(), 5000);
        assert!(
            many.iter()
                .all(|(id, _)| (IDENTITY_FIRST_POD..=IDENTITY_MAX).contains(&id))
        );
    }

    struct World {
        sets: Vec<LabelSet>,
        ids: Identities,
        ports: Vec<(String, u8, u16)>,
    }

    impl World {
        fn new() -> Self {
            let mut sets = Vec::new();
            for ns in ["x", "y", "z"] {
                for pod in ["a", "b", "c"] {
                    sets.push(set(ns, pod));
                }
            }
            let ids = Identities::new(sets.clone());
            World {
                sets,
                ids,
                ports: vec![
                    ("serve-80-tcp".into(), IPPROTO_TCP, 80),
                    ("serve-81-udp".into(), IPPROTO_UDP, 81),
                ],
            }
        }

        fn pods(&self) -> Vec<PodView<'_>> {
            self.sets
                .iter()
                .enumerate()
                .map(|(i, s)| PodView {
                    identity: self.ids.of(s).expect("id"),
                    set: s,
                    ips: vec![Ipv4Addr::new(10, 244, 0, 10 + i as u8)],
                    ports: &self.ports,
                })
                .collect()
        }

        fn compile(&self, me: (&str, &str), specs: &[serde_json::Value]) -> Compiled {
            let policies: Vec<Policy> = specs
                .iter()
                .map(|s| policy(s.clone()).expect("valid"))
                .collect();
            let pods = self.pods();
            let me = pods
                .iter()
                .find(|p| p.set.namespace == me.0 && p.set.labels["pod"] == me.1)
                .expect("me")
                .clone();
            compile(
                &me,
                policies
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (i as u32 + 1, "x", p)),
                &pods,
            )
        }

        fn id(&self, ns: &str, pod: &str) -> u32 {
            self.ids.of(&set(ns, pod)).expect("id")
        }
    }

    const ANYWHERE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    #[test]
    fn default_deny_isolates_and_allows_nothing() {
        let w = World::new();
        let c = w.compile(("x", "a"), &[json!({"podSelector": {}})]);
        assert!(c.ingress_isolated && !c.egress_isolated);
        assert_eq!(
            decide(&c, Dir::Ingress, w.id("x", "b"), ANYWHERE, IPPROTO_TCP, 80),
            None
        );
        assert_eq!(
            decide(&c, Dir::Egress, w.id("x", "b"), ANYWHERE, IPPROTO_TCP, 80),
            Some(0)
        );
        // A pod no policy selects is not isolated.
        let c = w.compile(
            ("x", "a"),
            &[json!({"podSelector": {"matchLabels": {"pod": "b"}}})],
        );
        assert!(!c.tracked());
    }

    #[test]
    fn and_versus_or_peers() {
        let w = World::new();
        let and = w.compile(
            ("x", "a"),
            &[json!({"podSelector": {}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}
            ]}]})],
        );
        let or = w.compile(
            ("x", "a"),
            &[json!({"podSelector": {}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                {"podSelector": {"matchLabels": {"pod": "b"}}}
            ]}]})],
        );
        let allowed = |c: &Compiled, ns: &str, pod: &str| {
            decide(c, Dir::Ingress, w.id(ns, pod), ANYWHERE, IPPROTO_TCP, 80).is_some()
        };
        assert!(allowed(&and, "y", "b"));
        assert!(!allowed(&and, "y", "a"));
        assert!(!allowed(&and, "x", "b"));
        assert!(allowed(&or, "y", "a"));
        // podSelector alone: the policy's own namespace.
        assert!(allowed(&or, "x", "b"));
        assert!(!allowed(&or, "z", "b"));
    }

    #[test]
    fn ip_blocks_with_except_match_any_address_pods_included() {
        let w = World::new();
        let c = w.compile(
            ("x", "a"),
            &[json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [
                {"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.0.12/30"]}}], "ports": [{"port": 80}]},
                {"to": [{"ipBlock": {"cidr": "10.244.0.13/32"}}], "ports": [{"port": 81, "protocol": "UDP"}]}
            ]})],
        );
        let d = |ip: [u8; 4], proto, port| {
            decide(
                &c,
                Dir::Egress,
                IDENTITY_WORLD,
                Ipv4Addr::from(ip),
                proto,
                port,
            )
        };
        assert_eq!(d([10, 244, 0, 10], IPPROTO_TCP, 80), Some(1));
        assert_eq!(d([10, 244, 0, 10], IPPROTO_TCP, 81), None);
        assert_eq!(d([10, 244, 0, 12], IPPROTO_TCP, 80), None, "excepted");
        assert_eq!(d([10, 244, 0, 13], IPPROTO_TCP, 80), None, "excepted");
        assert_eq!(
            d([10, 244, 0, 13], IPPROTO_UDP, 81),
            Some(1),
            "the /32 rule"
        );
        assert_eq!(d([10, 245, 0, 1], IPPROTO_TCP, 80), None);
    }

    #[test]
    fn named_ports_resolve_against_the_destination_pod() {
        let mut w = World::new();
        let c = w.compile(
            ("x", "a"),
            &[json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]})],
        );
        assert!(decide(&c, Dir::Ingress, w.id("y", "b"), ANYWHERE, IPPROTO_TCP, 80).is_some());
        assert!(decide(&c, Dir::Ingress, w.id("y", "b"), ANYWHERE, IPPROTO_TCP, 81).is_none());
        // A name the pod does not define allows nothing.
        let c = w.compile(
            ("x", "a"),
            &[json!({"podSelector": {}, "ingress": [{"ports": [{"port": "nope"}]}]})],
        );
        assert!(c.allows.is_empty());
        // Egress: each destination's own mapping.
        w.ports = vec![("web".into(), IPPROTO_TCP, 8080)];
        let c = w.compile(
            ("x", "a"),
            &[json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "web"}]}]})],
        );
        assert!(decide(&c, Dir::Egress, w.id("z", "c"), ANYWHERE, IPPROTO_TCP, 8080).is_some());
        assert!(decide(&c, Dir::Egress, IDENTITY_WORLD, ANYWHERE, IPPROTO_TCP, 8080).is_none());
    }

    #[test]
    fn end_port_ranges_and_protocols() {
        let w = World::new();
        let c = w.compile(
            ("x", "a"),
            &[json!({"podSelector": {}, "ingress": [{"ports": [
                {"port": 1000, "endPort": 2000},
                {"protocol": "UDP"},
                {"protocol": "SCTP", "port": 80}
            ]}]})],
        );
        let d =
            |proto, port| decide(&c, Dir::Ingress, w.id("y", "a"), ANYWHERE, proto, port).is_some();
        assert!(d(IPPROTO_TCP, 1000) && d(IPPROTO_TCP, 1500) && d(IPPROTO_TCP, 2000));
        assert!(!d(IPPROTO_TCP, 999) && !d(IPPROTO_TCP, 2001));
        assert!(d(IPPROTO_UDP, 53));
        // SCTP never allows TCP.
        assert!(!d(IPPROTO_TCP, 80));
        assert!(d(IPPROTO_SCTP, 80));
    }

    #[test]
    fn several_policies_add_up_and_the_lowest_id_is_reported() {
        let w = World::new();
        let c = w.compile(
            ("x", "a"),
            &[
                json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
                json!({"podSelector": {}, "ingress": [{}]}),
            ],
        );
        assert_eq!(
            decide(&c, Dir::Ingress, w.id("x", "b"), ANYWHERE, IPPROTO_TCP, 80),
            Some(1)
        );
        assert_eq!(
            decide(&c, Dir::Ingress, w.id("x", "c"), ANYWHERE, IPPROTO_TCP, 80),
            Some(2)
        );
        // The allow-all rule admits anyone.
        assert_eq!(
            decide(&c, Dir::Ingress, IDENTITY_WORLD, ANYWHERE, IPPROTO_UDP, 9),
            Some(3)
        );
    }
}
