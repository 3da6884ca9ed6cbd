//! What the lab does in place of an API server and its controllers:
//! manifests read from files, defaulted and allocated as the API server
//! would (`targetPort`, protocols, ClusterIPs, nodePorts), kept by
//! (kind, namespace, name), and the EndpointSlices the endpoint controller
//! would write for Services with a selector.
//!
//! Everything here is pure: the lab checks a change completely before it
//! touches a running cluster.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize as _;
use serde_json::{Value, json};

/// The kinds the lab (and the agent) understands.
pub const KINDS: [(&str, &str); 6] = [
    ("v1", "Node"),
    ("v1", "Namespace"),
    ("v1", "Pod"),
    ("v1", "Service"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
];

/// The Service range ClusterIPs are allocated from (the agent's default).
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 12);
/// Where dynamic ClusterIPs start: addresses below are left to manifests
/// that pick their own (as the API server keeps a static band).
const DYNAMIC_CLUSTER_IPS: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 1);
pub const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;
/// Where dynamic nodePorts start, for the same reason.
const DYNAMIC_NODE_PORTS: u16 = 31000;
/// The label the API server puts on every Namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// One document of a manifest file.
#[derive(Clone, Debug)]
pub struct Doc {
    pub file: PathBuf,
    /// 1-based, counting every document of the file (as `dataplane
    /// validate` does).
    pub index: usize,
    pub value: Value,
}

impl Doc {
    /// `FILE: document N` for messages.
    pub fn place(&self) -> String {
        format!("{}: document {}", self.file.display(), self.index)
    }
}

/// (kind, namespace, name); namespace empty for Node and Namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

fn cluster_scoped(kind: &str) -> bool {
    matches!(kind, "Node" | "Namespace")
}

/// The key of an object (defaulting its namespace), or what is missing.
pub fn key_of(v: &Value) -> Result<ObjKey, String> {
    let api = v["apiVersion"].as_str().unwrap_or_default();
    let kind = v["kind"].as_str().unwrap_or_default();
    if !KINDS.contains(&(api, kind)) {
        return Err(format!(
            "kind {kind:?} (apiVersion {api:?}) is not one the lab knows: {}",
            KINDS
                .iter()
                .map(|(a, k)| format!("{a} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let name = v["metadata"]["name"].as_str().unwrap_or_default();
    if name.is_empty() {
        return Err(format!("metadata.name: a {kind} needs a name"));
    }
    let namespace = if cluster_scoped(kind) {
        String::new()
    } else {
        v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned()
    };
    Ok(ObjKey {
        kind: kind.to_owned(),
        namespace,
        name: name.to_owned(),
    })
}

/// Manifest files at `path`: the file itself, or a directory's `*.yaml`,
/// `*.yml` and `*.json` files in name order.
pub fn files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    dataplane_common::manifest::files_in(path)
        .with_context(|| format!("reading {}", path.display()))
}

/// Every document of the manifests at `path` (see [`files`]). A file that
/// does not parse is an error naming it and the document.
pub fn load(path: &Path) -> Result<Vec<Doc>> {
    let mut docs = Vec::new();
    for file in files(path)? {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let place = || format!("{}: document {}", file.display(), i + 1);
            let yaml = serde_yaml_ng::Value::deserialize(doc).with_context(place)?;
            if yaml.is_null() {
                continue;
            }
            let value = serde_json::to_value(&yaml).with_context(place)?;
            if !value.is_object() {
                bail!("{}: not an object", place());
            }
            docs.push(Doc {
                file: file.clone(),
                index: i + 1,
                value,
            });
        }
    }
    Ok(docs)
}

/// The objects of the simulated cluster, as the API server holds them
/// (defaulted, allocated).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Store {
    pub objects: BTreeMap<ObjKey, Value>,
}

/// A problem with one document of a change.
fn at(doc: &Doc, key: Option<&ObjKey>, field: &str, problem: impl fmt::Display) -> anyhow::Error {
    match key {
        Some(k) => anyhow::anyhow!("{}: {k}: {field}: {problem}", doc.place()),
        None => anyhow::anyhow!("{}: {field}: {problem}", doc.place()),
    }
}

fn in_service_range(ip: Ipv4Addr) -> bool {
    let (net, prefix) = SERVICE_CIDR;
    let mask = u32::MAX << (32 - prefix);
    u32::from(ip) & mask == u32::from(net) & mask
}

impl Store {
    pub fn from_values(values: impl IntoIterator<Item = Value>) -> Result<Self> {
        let mut objects = BTreeMap::new();
        for v in values {
            let key = key_of(&v).map_err(|e| anyhow::anyhow!("stored object: {e}"))?;
            objects.insert(key, v);
        }
        Ok(Store { objects })
    }

    pub fn values(&self) -> Vec<Value> {
        self.objects.values().cloned().collect()
    }

    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = (&'a ObjKey, &'a Value)> {
        self.objects.iter().filter(move |(k, _)| k.kind == kind)
    }

    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<&Value> {
        self.objects.get(&ObjKey {
            kind: kind.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// ClusterIPs in use, and by whom (leaving out `except`).
    fn cluster_ips(&self, except: &ObjKey) -> BTreeMap<Ipv4Addr, ObjKey> {
        let mut out = BTreeMap::new();
        for (k, v) in self.of_kind("Service").filter(|(k, _)| *k != except) {
            if let Some(ip) = v["spec"]["clusterIP"].as_str().and_then(|s| s.parse().ok()) {
                out.insert(ip, k.clone());
            }
        }
        out
    }

    /// nodePorts in use by other Services, and by whom: numbers are
    /// allocated across protocols (one Service may use a number for both).
    fn node_ports(&self, except: &ObjKey) -> BTreeMap<u16, ObjKey> {
        let mut out = BTreeMap::new();
        for (k, v) in self.of_kind("Service").filter(|(k, _)| *k != except) {
            for p in v["spec"]["ports"].as_array().into_iter().flatten() {
                if let Some(n) = p["nodePort"].as_u64().and_then(|n| u16::try_from(n).ok()) {
                    out.insert(n, k.clone());
                }
            }
        }
        out
    }

    /// Applies `docs` as `kubectl apply` would: each replaces the object of
    /// its (kind, namespace, name), defaulted and allocated. `nodes` are the
    /// lab's node names (a Pod's `spec.nodeName` must be one). Nothing
    /// changes unless every document is accepted.
    pub fn apply(&mut self, docs: &[Doc], nodes: &[String]) -> Result<()> {
        let mut next = self.clone();
        for doc in docs {
            let key = key_of(&doc.value).map_err(|e| anyhow::anyhow!("{}: {e}", doc.place()))?;
            let mut v = doc.value.clone();
            if !cluster_scoped(&key.kind) {
                v["metadata"]["namespace"] = json!(key.namespace);
            }
            let old = next.objects.get(&key).cloned();
            match key.kind.as_str() {
                "Namespace" => {
                    v["metadata"]["labels"][NAMESPACE_NAME_LABEL] = json!(key.name);
                }
                "Node" if !nodes.contains(&key.name) => {
                    return Err(at(
                        doc,
                        Some(&key),
                        "metadata.name",
                        format!(
                            "the lab's nodes are fixed when it comes up ({}); a Node object can only describe one of them",
                            nodes.join(", ")
                        ),
                    ));
                }
                "Pod" => next.default_pod(doc, &key, &mut v, old.as_ref(), nodes)?,
                "Service" => next.default_service(doc, &key, &mut v, old.as_ref())?,
                _ => {}
            }
            next.objects.insert(key, v);
        }
        next.add_implied_namespaces();
        *self = next;
        Ok(())
    }

    fn default_pod(
        &self,
        doc: &Doc,
        key: &ObjKey,
        v: &mut Value,
        old: Option<&Value>,
        nodes: &[String],
    ) -> Result<()> {
        let node = v["spec"]["nodeName"].as_str().map(str::to_owned);
        if let Some(n) = &node
            && !nodes.contains(n)
        {
            return Err(at(
                doc,
                Some(key),
                "spec.nodeName",
                format!("no node {n:?} in the lab ({})", nodes.join(", ")),
            ));
        }
        if let Some(old) = old {
            let was = old["spec"]["nodeName"].as_str();
            match node.as_deref() {
                // The scheduler's choice stays.
                None => v["spec"]["nodeName"] = json!(was),
                Some(n) if Some(n) != was => {
                    return Err(at(
                        doc,
                        Some(key),
                        "spec.nodeName",
                        format!(
                            "a pod cannot move from {} to {n}: delete it first",
                            was.unwrap_or("-")
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        for c in v["spec"]["containers"].as_array_mut().into_iter().flatten() {
            for p in c["ports"].as_array_mut().into_iter().flatten() {
                if p.get("protocol").is_none_or(Value::is_null) {
                    p["protocol"] = json!("TCP");
                }
            }
        }
        Ok(())
    }

    fn default_service(
        &self,
        doc: &Doc,
        key: &ObjKey,
        v: &mut Value,
        old: Option<&Value>,
    ) -> Result<()> {
        let spec = &mut v["spec"];
        if spec.is_null() {
            *spec = json!({});
        }
        let type_ = spec["type"].as_str().unwrap_or("ClusterIP").to_owned();
        spec["type"] = json!(type_);
        let wants_node_ports = matches!(type_.as_str(), "NodePort" | "LoadBalancer");
        // The cluster IP: given, kept from before, or the lowest free.
        let taken = self.cluster_ips(key);
        match spec["clusterIP"].as_str() {
            Some("None") => {}
            Some(ip) => {
                let ip: Ipv4Addr = ip
                    .parse()
                    .map_err(|e| at(doc, Some(key), "spec.clusterIP", format!("{ip:?}: {e}")))?;
                if !in_service_range(ip) {
                    return Err(at(
                        doc,
                        Some(key),
                        "spec.clusterIP",
                        format!("{ip} is outside the Service range 10.96.0.0/12"),
                    ));
                }
                if let Some(owner) = taken.get(&ip) {
                    return Err(at(
                        doc,
                        Some(key),
                        "spec.clusterIP",
                        format!("{ip} is already allocated to {owner}"),
                    ));
                }
            }
            None => {
                let kept = old
                    .and_then(|o| o["spec"]["clusterIP"].as_str())
                    .map(str::to_owned);
                let ip = match kept {
                    Some(ip) => ip,
                    None => {
                        let mut ip = u32::from(DYNAMIC_CLUSTER_IPS);
                        while taken.contains_key(&Ipv4Addr::from(ip)) {
                            ip += 1;
                        }
                        let ip = Ipv4Addr::from(ip);
                        if !in_service_range(ip) {
                            return Err(at(
                                doc,
                                Some(key),
                                "spec.clusterIP",
                                "the Service range is full",
                            ));
                        }
                        ip.to_string()
                    }
                };
                spec["clusterIP"] = json!(ip);
            }
        }
        if let Some(ip) = spec["clusterIP"].as_str().map(str::to_owned) {
            spec["clusterIPs"] = json!([ip]);
        }
        let used = self.node_ports(key);
        // This Service's own: (number, protocol).
        let mut mine: BTreeSet<(u16, String)> = BTreeSet::new();
        let old_ports: Vec<Value> = old
            .and_then(|o| o["spec"]["ports"].as_array().cloned())
            .unwrap_or_default();
        let ports = spec["ports"].as_array_mut();
        for (i, p) in ports.into_iter().flatten().enumerate() {
            let field = |f: &str| format!("spec.ports[{i}].{f}");
            if p.get("protocol").is_none_or(Value::is_null) {
                p["protocol"] = json!("TCP");
            }
            if p.get("targetPort").is_none_or(Value::is_null) {
                p["targetPort"] = p["port"].clone();
            }
            let proto = p["protocol"].as_str().unwrap_or("TCP").to_owned();
            if !wants_node_ports {
                continue;
            }
            let port = match p["nodePort"].as_u64() {
                Some(n) => {
                    let n = u16::try_from(n)
                        .ok()
                        .filter(|n| NODE_PORTS.contains(n))
                        .ok_or_else(|| {
                            at(
                                doc,
                                Some(key),
                                &field("nodePort"),
                                format!("{n} is outside the range 30000-32767"),
                            )
                        })?;
                    if let Some(owner) = used.get(&n) {
                        return Err(at(
                            doc,
                            Some(key),
                            &field("nodePort"),
                            format!("{n} is already allocated to {owner}"),
                        ));
                    }
                    if mine.contains(&(n, proto.clone())) {
                        return Err(at(
                            doc,
                            Some(key),
                            &field("nodePort"),
                            format!("{n}/{proto} is used twice in this Service"),
                        ));
                    }
                    n
                }
                None => {
                    // Kept from the same port of the version before.
                    let kept = old_ports
                        .iter()
                        .find(|o| {
                            o["port"] == p["port"]
                                && o["protocol"].as_str().unwrap_or("TCP") == proto
                        })
                        .and_then(|o| o["nodePort"].as_u64())
                        .and_then(|n| u16::try_from(n).ok())
                        .filter(|n| !used.contains_key(n) && !mine.contains(&(*n, proto.clone())));
                    match kept {
                        Some(n) => n,
                        None => (DYNAMIC_NODE_PORTS..=*NODE_PORTS.end())
                            .chain(*NODE_PORTS.start()..DYNAMIC_NODE_PORTS)
                            .find(|n| !used.contains_key(n) && !mine.iter().any(|(m, _)| m == n))
                            .ok_or_else(|| {
                                at(doc, Some(key), &field("nodePort"), "no nodePort is free")
                            })?,
                    }
                }
            };
            p["nodePort"] = json!(port);
            mine.insert((port, proto));
        }
        Ok(())
    }

    /// Namespaces that objects live in but no manifest defined, as the
    /// cluster would have them (labelled with their name).
    fn add_implied_namespaces(&mut self) {
        let wanted: BTreeSet<String> = self
            .objects
            .keys()
            .filter(|k| !k.namespace.is_empty())
            .map(|k| k.namespace.clone())
            .chain(["default".to_owned()])
            .collect();
        for ns in wanted {
            let key = ObjKey {
                kind: "Namespace".into(),
                namespace: String::new(),
                name: ns.clone(),
            };
            self.objects.entry(key).or_insert_with(|| {
                json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns, "labels": {NAMESPACE_NAME_LABEL: ns}},
                })
            });
        }
    }

    /// Removes the objects `docs` name, as `kubectl delete -f` would; a
    /// Namespace takes its objects with it. Every object must exist.
    /// Returns the keys removed.
    pub fn delete(&mut self, docs: &[Doc]) -> Result<Vec<ObjKey>> {
        let mut next = self.clone();
        let mut removed = Vec::new();
        for doc in docs {
            let key = key_of(&doc.value).map_err(|e| anyhow::anyhow!("{}: {e}", doc.place()))?;
            if key.kind == "Node" {
                return Err(at(
                    doc,
                    Some(&key),
                    "kind",
                    "the lab's nodes stay until `lab down`",
                ));
            }
            if next.objects.remove(&key).is_none() {
                return Err(at(doc, Some(&key), "metadata.name", "not found"));
            }
            if key.kind == "Namespace" {
                let inside: Vec<ObjKey> = next
                    .objects
                    .keys()
                    .filter(|k| k.namespace == key.name)
                    .cloned()
                    .collect();
                for k in inside {
                    next.objects.remove(&k);
                    removed.push(k);
                }
            }
            removed.push(key);
        }
        next.add_implied_namespaces();
        *self = next;
        Ok(removed)
    }

    /// The EndpointSlices the endpoint controller would keep for every
    /// Service with a selector that has no slice of its own in the store:
    /// the selected pods that have an address (`pods`: (namespace, name) ->
    /// (address, node)), grouped by the ports their containers resolve
    /// the Service's target ports to.
    pub fn endpoint_slices(
        &self,
        pods: &BTreeMap<(String, String), (Ipv4Addr, String)>,
    ) -> Vec<Value> {
        let given: BTreeSet<(String, String)> = self
            .of_kind("EndpointSlice")
            .filter_map(|(k, v)| {
                let svc = v["metadata"]["labels"]["kubernetes.io/service-name"].as_str()?;
                Some((k.namespace.clone(), svc.to_owned()))
            })
            .collect();
        let mut out = Vec::new();
        for (key, svc) in self.of_kind("Service") {
            let Some(selector) = svc["spec"]["selector"]
                .as_object()
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            if given.contains(&(key.namespace.clone(), key.name.clone())) {
                continue;
            }
            let svc_ports: Vec<&Value> = svc["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .collect();
            // Endpoints grouped by their resolved port list.
            let mut groups: BTreeMap<Vec<(String, String, u16)>, Vec<Value>> = BTreeMap::new();
            for (pk, pod) in self
                .of_kind("Pod")
                .filter(|(k, _)| k.namespace == key.namespace)
            {
                let labels = &pod["metadata"]["labels"];
                if !selector.iter().all(|(k, v)| &labels[k] == v) {
                    continue;
                }
                let Some((ip, node)) = pods.get(&(pk.namespace.clone(), pk.name.clone())) else {
                    continue;
                };
                let resolved: Vec<(String, String, u16)> = svc_ports
                    .iter()
                    .filter_map(|p| {
                        let proto = p["protocol"].as_str().unwrap_or("TCP").to_owned();
                        let name = p["name"].as_str().unwrap_or_default().to_owned();
                        let port = match &p["targetPort"] {
                            Value::Number(n) => u16::try_from(n.as_u64()?).ok()?,
                            Value::String(s) => container_port(pod, s, &proto)?,
                            _ => return None,
                        };
                        Some((name, proto, port))
                    })
                    .collect();
                groups.entry(resolved).or_default().push(json!({
                    "addresses": [ip.to_string()],
                    "nodeName": node,
                    "targetRef": {"kind": "Pod", "namespace": pk.namespace, "name": pk.name},
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                }));
            }
            if groups.is_empty() {
                // No endpoints: one empty slice, as the controller keeps.
                let numeric: Vec<(String, String, u16)> = svc_ports
                    .iter()
                    .filter_map(|p| {
                        Some((
                            p["name"].as_str().unwrap_or_default().to_owned(),
                            p["protocol"].as_str().unwrap_or("TCP").to_owned(),
                            u16::try_from(p["targetPort"].as_u64()?).ok()?,
                        ))
                    })
                    .collect();
                groups.insert(numeric, Vec::new());
            }
            for (i, (ports, endpoints)) in groups.into_iter().enumerate() {
                let ports: Vec<Value> = ports
                    .into_iter()
                    .map(|(name, protocol, port)| json!({"name": name, "protocol": protocol, "port": port}))
                    .collect();
                out.push(json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {
                        "name": format!("{}-lab-{i}", key.name),
                        "namespace": key.namespace,
                        "labels": {
                            "kubernetes.io/service-name": key.name,
                            "endpointslice.kubernetes.io/managed-by": "dataplane-lab",
                        },
                    },
                    "addressType": "IPv4",
                    "endpoints": endpoints,
                    "ports": ports,
                }));
            }
        }
        out
    }
}

/// The number of a pod's container port `name` for `protocol`.
pub fn container_port(pod: &Value, name: &str, protocol: &str) -> Option<u16> {
    pod["spec"]["containers"]
        .as_array()?
        .iter()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .find(|p| p["name"] == name && p["protocol"].as_str().unwrap_or("TCP") == protocol)
        .and_then(|p| u16::try_from(p["containerPort"].as_u64()?).ok())
}

/// A pod's TCP and UDP container ports ((number, protocol)), which the lab
/// serves on.
pub fn served_ports(pod: &Value) -> Vec<(u16, String)> {
    let mut out: Vec<(u16, String)> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .filter_map(|p| {
            let proto = p["protocol"].as_str().unwrap_or("TCP").to_uppercase();
            let port = u16::try_from(p["containerPort"].as_u64()?).ok()?;
            matches!(proto.as_str(), "TCP" | "UDP").then_some((port, proto))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A pod's labels.
pub fn labels(v: &Value) -> BTreeMap<String, String> {
    v["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(i: usize, v: Value) -> Doc {
        Doc {
            file: "m.yaml".into(),
            index: i,
            value: v,
        }
    }

    fn nodes() -> Vec<String> {
        vec!["node-0".into(), "node-1".into()]
    }

    fn svc(name: &str, spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec})
    }

    fn pod(ns: &str, name: &str, labels: Value, ports: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": ns, "labels": labels},
               "spec": {"containers": [{"name": "c", "ports": ports}]}})
    }

    #[test]
    fn services_are_defaulted_and_allocated_as_the_api_server_would() {
        let mut s = Store::default();
        s.apply(
            &[
                doc(1, svc("a", json!({"selector": {"app": "a"}, "ports": [{"port": 80}]}))),
                doc(
                    2,
                    svc(
                        "b",
                        json!({"type": "NodePort", "ports": [{"port": 53, "protocol": "UDP", "targetPort": "dns"}]}),
                    ),
                ),
                doc(3, svc("c", json!({"clusterIP": "10.96.0.10", "ports": [{"port": 1}]}))),
            ],
            &nodes(),
        )
        .expect("apply");
        let a = s.get("Service", "default", "a").expect("a");
        assert_eq!(a["spec"]["clusterIP"], "10.96.1.1");
        assert_eq!(a["spec"]["clusterIPs"], json!(["10.96.1.1"]));
        assert_eq!(a["spec"]["type"], "ClusterIP");
        assert_eq!(a["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(a["spec"]["ports"][0]["targetPort"], 80);
        assert!(a["spec"]["ports"][0].get("nodePort").is_none());
        let b = s.get("Service", "default", "b").expect("b");
        assert_eq!(b["spec"]["clusterIP"], "10.96.1.2");
        assert_eq!(b["spec"]["ports"][0]["nodePort"], 31000);
        assert_eq!(b["spec"]["ports"][0]["targetPort"], "dns");
        // The implied namespace, labelled with its name.
        let ns = s.get("Namespace", "", "default").expect("default");
        assert_eq!(ns["metadata"]["labels"][NAMESPACE_NAME_LABEL], "default");

        // Applied again without allocations: they are kept.
        s.apply(
            &[doc(
                1,
                svc(
                    "b",
                    json!({"type": "NodePort", "ports": [{"port": 53, "protocol": "UDP"}]}),
                ),
            )],
            &nodes(),
        )
        .expect("reapply");
        let b = s.get("Service", "default", "b").expect("b");
        assert_eq!(b["spec"]["clusterIP"], "10.96.1.2");
        assert_eq!(b["spec"]["ports"][0]["nodePort"], 31000);
        assert_eq!(
            b["spec"]["ports"][0]["targetPort"], 53,
            "replaced, not merged"
        );

        // A LoadBalancer: nodePorts too, and the ingress the manifest
        // gives stays (the lab stands in for the cloud controller).
        let mut lb = svc(
            "lb",
            json!({"type": "LoadBalancer", "ports": [{"port": 443}]}),
        );
        lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}});
        s.apply(&[doc(1, lb)], &nodes()).expect("lb");
        let lb = s.get("Service", "default", "lb").expect("lb");
        assert_eq!(
            lb["status"]["loadBalancer"]["ingress"][0]["ip"],
            "192.0.2.10"
        );
        assert_eq!(
            lb["spec"]["ports"][0]["nodePort"], 31001,
            "numbers across protocols"
        );
        // One Service may use a number for TCP and UDP; another may not.
        let both = svc(
            "both",
            json!({"type": "NodePort", "ports": [
                {"name": "t", "port": 53, "nodePort": 30053},
                {"name": "u", "port": 53, "protocol": "UDP", "nodePort": 30053}]}),
        );
        s.apply(&[doc(1, both)], &nodes())
            .expect("same number, two protocols");
        let other = svc(
            "other",
            json!({"type": "NodePort", "ports": [{"port": 1, "protocol": "UDP", "nodePort": 31000}]}),
        );
        let e = s.apply(&[doc(1, other)], &nodes()).expect_err("taken");
        assert!(
            e.to_string()
                .ends_with("31000 is already allocated to Service default/b"),
            "{e}"
        );
    }

    #[test]
    fn conflicts_name_the_document_and_field_and_change_nothing() {
        let mut s = Store::default();
        s.apply(
            &[doc(
                1,
                svc(
                    "a",
                    json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
                ),
            )],
            &nodes(),
        )
        .expect("apply");
        let before = s.clone();
        let cases = [
            (
                svc(
                    "b",
                    json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
                ),
                "m.yaml: document 2: Service default/b: spec.clusterIP: 10.96.0.10 is already allocated to Service default/a",
            ),
            (
                svc("b", json!({"clusterIP": "10.1.0.1"})),
                "m.yaml: document 2: Service default/b: spec.clusterIP: 10.1.0.1 is outside the Service range 10.96.0.0/12",
            ),
            (
                svc(
                    "b",
                    json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}),
                ),
                "m.yaml: document 2: Service default/b: spec.ports[0].nodePort: 80 is outside the range 30000-32767",
            ),
            (
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"nodeName": "node-7"}}),
                "m.yaml: document 2: Pod default/p: spec.nodeName: no node \"node-7\" in the lab (node-0, node-1)",
            ),
            (
                json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}}),
                "m.yaml: document 2: kind \"Deployment\" (apiVersion \"apps/v1\") is not one the lab knows",
            ),
            (
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}}),
                "m.yaml: document 2: metadata.name: a Pod needs a name",
            ),
        ];
        for (bad, want) in cases {
            // A good document first: it must not be applied either.
            let good = svc("ok", json!({"ports": [{"port": 1}]}));
            let e = s
                .apply(&[doc(1, good), doc(2, bad)], &nodes())
                .expect_err("refused")
                .to_string();
            assert!(e.starts_with(want), "{e}\nwanted {want}");
            assert_eq!(s, before);
        }
    }

    #[test]
    fn a_pod_keeps_its_node_and_deleting_a_namespace_takes_its_objects() {
        let mut s = Store::default();
        let mut p = pod("x", "a", json!({}), json!([]));
        p["spec"]["nodeName"] = json!("node-1");
        s.apply(&[doc(1, p)], &nodes()).expect("apply");
        // Reapplied without a node: the scheduler's choice stays.
        s.apply(
            &[doc(1, pod("x", "a", json!({"v": "2"}), json!([])))],
            &nodes(),
        )
        .expect("reapply");
        let a = s.get("Pod", "x", "a").expect("pod");
        assert_eq!(a["spec"]["nodeName"], "node-1");
        let mut moved = pod("x", "a", json!({}), json!([]));
        moved["spec"]["nodeName"] = json!("node-0");
        let e = s.apply(&[doc(3, moved)], &nodes()).expect_err("move");
        assert!(
            e.to_string()
                .contains("spec.nodeName: a pod cannot move from node-1 to node-0"),
            "{e}"
        );
        assert!(s.get("Namespace", "", "x").is_some(), "implied");
        let removed = s
            .delete(&[doc(
                1,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}),
            )])
            .expect("delete");
        assert_eq!(removed.len(), 2);
        assert!(s.get("Pod", "x", "a").is_none());
        let e = s
            .delete(&[doc(
                4,
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gone"}}),
            )])
            .expect_err("missing");
        assert_eq!(
            e.to_string(),
            "m.yaml: document 4: Pod default/gone: metadata.name: not found"
        );
    }

    #[test]
    fn slices_follow_selectors_and_resolve_named_ports_per_pod() {
        let mut s = Store::default();
        s.apply(
            &[
                doc(
                    1,
                    svc(
                        "web",
                        json!({"selector": {"app": "web"}, "ports": [
                    {"name": "http", "port": 80, "targetPort": "http"},
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}),
                    ),
                ),
                doc(
                    2,
                    pod(
                        "default",
                        "w1",
                        json!({"app": "web"}),
                        json!([{"name": "http", "containerPort": 8080}]),
                    ),
                ),
                doc(
                    3,
                    pod(
                        "default",
                        "w2",
                        json!({"app": "web"}),
                        json!([{"name": "http", "containerPort": 9090}]),
                    ),
                ),
                doc(4, pod("default", "w3", json!({"app": "web"}), json!([]))),
                doc(5, pod("default", "other", json!({"app": "db"}), json!([]))),
                doc(6, pod("y", "w4", json!({"app": "web"}), json!([]))),
                doc(
                    7,
                    svc(
                        "empty",
                        json!({"selector": {"app": "none"}, "ports": [{"port": 80}]}),
                    ),
                ),
                doc(8, svc("manual", json!({"ports": [{"port": 80}]}))),
            ],
            &nodes(),
        )
        .expect("apply");
        let ip = |i: u8| (Ipv4Addr::new(10, 244, 0, i), "node-0".to_owned());
        let pods: BTreeMap<(String, String), (Ipv4Addr, String)> = [
            (("default".into(), "w1".into()), ip(1)),
            (("default".into(), "w2".into()), ip(2)),
            (("default".into(), "w3".into()), ip(3)),
            (("default".into(), "other".into()), ip(4)),
            (("y".into(), "w4".into()), ip(5)),
        ]
        .into();
        let slices = s.endpoint_slices(&pods);
        // (endpoint addresses, (port name, number)) per slice.
        type Slice = (Vec<String>, Vec<(String, u64)>);
        let of = |svc: &str| -> Vec<Slice> {
            slices
                .iter()
                .filter(|v| v["metadata"]["labels"]["kubernetes.io/service-name"] == svc)
                .map(|v| {
                    let eps = v["endpoints"]
                        .as_array()
                        .expect("endpoints")
                        .iter()
                        .map(|e| e["addresses"][0].as_str().expect("addr").to_owned())
                        .collect();
                    let ports = v["ports"]
                        .as_array()
                        .expect("ports")
                        .iter()
                        .map(|p| {
                            (
                                p["name"].as_str().expect("name").to_owned(),
                                p["port"].as_u64().expect("port"),
                            )
                        })
                        .collect();
                    (eps, ports)
                })
                .collect()
        };
        let mut web = of("web");
        web.sort();
        assert_eq!(
            web,
            vec![
                (
                    vec!["10.244.0.1".into()],
                    vec![("http".into(), 8080), ("dns".into(), 5353)]
                ),
                (
                    vec!["10.244.0.2".into()],
                    vec![("http".into(), 9090), ("dns".into(), 5353)]
                ),
                // No port named http: only the numeric one.
                (vec!["10.244.0.3".into()], vec![("dns".into(), 5353)]),
            ]
        );
        assert_eq!(of("empty"), vec![(vec![], vec![("".into(), 80)])]);
        assert!(of("manual").is_empty(), "no selector: no slice");
    }
}
