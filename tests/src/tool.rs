//! The lab as a tool: Kubernetes manifests in (applied and deleted as
//! `kubectl` would), pods wired through the CNI plugin with a server on
//! each declared container port, and probes between anything in the lab.
//! `lab::cli` is its command line; the tests drive the same functions.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use dataplane_common::api::{Request, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    Lab, LabState, in_netns_cgroup,
    manifests::{self, Doc, ObjKey, Store},
};

/// How long one probe waits for its answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Probes of a matrix running at once.
const MATRIX_PARALLEL: usize = 32;

/// Checks manifests with the agent's own reader (`dataplane validate`):
/// what the agents would refuse, the lab refuses too.
pub fn validate(dataplane_bin: &Path, path: &Path) -> Result<()> {
    let out = Command::new(dataplane_bin)
        .args(["validate", "-o", "json"])
        .arg(path)
        .output()
        .with_context(|| format!("running {} validate", dataplane_bin.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let problems: Vec<Value> = serde_json::from_slice(&out.stdout).map_err(|_| {
        anyhow::anyhow!(
            "dataplane validate failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let lines: Vec<String> = problems
        .iter()
        .map(|p| {
            format!(
                "{}: document {}: {}",
                p["file"].as_str().unwrap_or("?"),
                p["document"],
                p["message"].as_str().unwrap_or("?")
            )
        })
        .collect();
    bail!("{}", lines.join("\n"))
}

/// Reads and checks the manifests at `path` (a file or a directory).
pub fn read_manifests(dataplane_bin: &Path, path: &Path) -> Result<Vec<Doc>> {
    let docs = manifests::load(path)?;
    validate(dataplane_bin, path)?;
    Ok(docs)
}

/// Pods for a quick lab without manifests: `default/pod-<node>-<j>`,
/// serving TCP and UDP 80.
pub fn quick_pods(nodes: &[String], per_node: usize) -> Vec<Doc> {
    let mut out = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..per_node {
            let name = format!("pod-{i}-{j}");
            out.push(Doc {
                file: PathBuf::from("(generated)"),
                index: out.len() + 1,
                value: json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
                    "spec": {"nodeName": node, "containers": [{"name": "main", "ports": [
                        {"name": "http", "containerPort": 80, "protocol": "TCP"},
                        {"name": "udp", "containerPort": 80, "protocol": "UDP"},
                    ]}]},
                }),
            });
        }
    }
    out
}

/// A node a set of manifests asks for: its name and pod CIDR (`None`: the
/// lab's default for that node).
pub type NodeWanted = (String, Option<String>);

/// The nodes a set of manifests asks for, from their Node objects; `None`
/// when there are none.
pub fn nodes_of(docs: &[Doc]) -> Result<Option<Vec<NodeWanted>>> {
    let mut out: Vec<NodeWanted> = Vec::new();
    for d in docs.iter().filter(|d| d.value["kind"] == "Node") {
        let name = d.value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let cidr = d.value["spec"]["podCIDR"]
            .as_str()
            .or_else(|| d.value["spec"]["podCIDRs"][0].as_str())
            .map(str::to_owned);
        if let Some(c) = &cidr {
            let (addr, len) = c
                .split_once('/')
                .and_then(|(a, l)| Some((a.parse::<Ipv4Addr>().ok()?, l.parse::<u8>().ok()?)))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: Node {name}: spec.podCIDR: {c:?} is not an IPv4 CIDR",
                        d.place()
                    )
                })?;
            // The agents' cluster range (--cluster-cidr's default).
            if !(16..=30).contains(&len) || addr.octets()[..2] != [10, 244] {
                bail!(
                    "{}: Node {name}: spec.podCIDR: {c} must lie in the lab's cluster range 10.244.0.0/16 (a /16 to /30)",
                    d.place()
                );
            }
        }
        out.push((name, cidr));
    }
    Ok((!out.is_empty()).then_some(out))
}

/// What an apply or delete did, for the command line.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub created: Vec<String>,
    pub configured: Vec<String>,
    pub unchanged: Vec<String>,
    pub deleted: Vec<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (list, what) in [
            (&self.created, "created"),
            (&self.configured, "configured"),
            (&self.unchanged, "unchanged"),
            (&self.deleted, "deleted"),
        ] {
            for k in list {
                writeln!(f, "{k} {what}")?;
            }
        }
        Ok(())
    }
}

fn show(k: &ObjKey) -> String {
    if k.namespace.is_empty() {
        format!("{}/{}", k.kind.to_lowercase(), k.name)
    } else {
        format!("{}/{} -n {}", k.kind.to_lowercase(), k.name, k.namespace)
    }
}

/// Where a command or probe runs: a network namespace, and the cgroup of
/// the node it belongs to.
#[derive(Clone, Debug)]
pub struct Place {
    pub netns: String,
    pub cgroup: Option<PathBuf>,
}

/// The outcome of one probe, as `lab probe -o json` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub from: String,
    pub to: String,
    /// `IP:port` dialled.
    pub address: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// `allowed` or `denied`.
    pub verdict: String,
    /// The answering pod's `namespace/name`.
    pub answered_by: Option<String>,
    pub elapsed_ms: u64,
    pub error: Option<String>,
    /// Who the application saw it talk to (see [`Reached::peer`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

impl ProbeResult {
    pub fn allowed(&self) -> bool {
        self.verdict == "allowed"
    }
}

/// What the probe helper reports from inside the lab.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reached {
    pub connected: bool,
    pub answered_by: Option<String>,
    pub error: Option<String>,
    pub elapsed_ms: u64,
    /// Who the application saw it talk to: `getpeername` on the TCP
    /// socket, the source of the UDP reply (`recvfrom`).
    #[serde(default)]
    pub peer: Option<String>,
}

/// `TCP` or `UDP` from any spelling.
pub fn protocol(p: &str) -> Result<String> {
    match p.to_ascii_uppercase().as_str() {
        "TCP" => Ok("TCP".into()),
        "UDP" => Ok("UDP".into()),
        _ => bail!("protocol {p:?}: expected TCP or UDP"),
    }
}

/// `80/tcp` into (80, "TCP").
pub fn port_protocol(s: &str) -> Result<(u16, String)> {
    let (port, proto) = s
        .split_once('/')
        .with_context(|| format!("{s:?}: expected PORT/PROTOCOL, e.g. 80/tcp"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("{s:?}: port {port:?} is not a number from 1 to 65535"))?;
    Ok((port, protocol(proto)?))
}

/// One matrix: every pod to every pod on one port.
#[derive(Clone, Debug, Serialize)]
pub struct Matrix {
    pub port: u16,
    pub protocol: String,
    /// `namespace/name`, in row and column order.
    pub pods: Vec<String>,
    /// `allowed[from][to]`.
    pub allowed: BTreeMap<String, BTreeMap<String, bool>>,
    pub elapsed_ms: u64,
    /// Every probe made.
    pub probes: Vec<ProbeResult>,
}

impl Matrix {
    /// The truth table as Kubernetes' network-policy e2e tests print it:
    /// tab-separated, `.` allowed, `X` denied, rows from, columns to.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut header = vec!["-".to_owned()];
        header.extend(self.pods.iter().cloned());
        out.push_str(&header.join("\t"));
        out.push('\n');
        for from in &self.pods {
            let mut row = vec![from.clone()];
            for to in &self.pods {
                row.push(if self.allowed[from][to] { "." } else { "X" }.to_owned());
            }
            out.push_str(&row.join("\t"));
            out.push('\n');
        }
        out
    }
}

impl Lab {
    /// The objects applied to the lab so far.
    pub fn store(&self) -> Result<Store> {
        Store::from_values(self.state.objects.iter().cloned())
    }

    fn node_names(&self) -> Vec<String> {
        self.state.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// `kubectl apply`: every document replaces the object of its kind,
    /// namespace and name; pods are wired or unwired, and the agents have
    /// applied it all when this returns. Nothing changes when a document
    /// is refused.
    pub fn apply_docs(&mut self, docs: &[Doc]) -> Result<Summary> {
        let before = self.store()?;
        let mut after = before.clone();
        after.apply(docs, &self.node_names())?;
        self.schedule(&mut after);
        let mut summary = Summary::default();
        for d in docs {
            let key = manifests::key_of(&d.value).map_err(|e| anyhow::anyhow!("{e}"))?;
            let list = match before.objects.get(&key) {
                None => &mut summary.created,
                Some(old) if Some(old) == after.objects.get(&key) => &mut summary.unchanged,
                Some(_) => &mut summary.configured,
            };
            if !list.contains(&show(&key)) {
                list.push(show(&key));
            }
        }
        self.converge(&before, after)?;
        Ok(summary)
    }

    /// `kubectl delete -f`: the objects the documents name go (a Namespace
    /// with everything in it). Every object must exist.
    pub fn delete_docs(&mut self, docs: &[Doc]) -> Result<Summary> {
        let before = self.store()?;
        let mut after = before.clone();
        let removed = after.delete(docs)?;
        let summary = Summary {
            deleted: removed.iter().map(show).collect(),
            ..Summary::default()
        };
        self.converge(&before, after)?;
        Ok(summary)
    }

    /// Gives each unscheduled pod the node with the fewest pods (the
    /// first of those), as a scheduler binds it.
    fn schedule(&self, store: &mut Store) {
        let names = self.node_names();
        let mut load: Vec<usize> = names
            .iter()
            .map(|n| {
                store
                    .of_kind("Pod")
                    .filter(|(_, v)| v["spec"]["nodeName"] == n.as_str())
                    .count()
            })
            .collect();
        for (_, v) in store.objects.iter_mut().filter(|(k, _)| k.kind == "Pod") {
            if v["spec"]["nodeName"].is_string() {
                continue;
            }
            let Some((i, _)) = load.iter().enumerate().min_by_key(|(_, l)| **l) else {
                return;
            };
            v["spec"]["nodeName"] = json!(names[i]);
            load[i] += 1;
        }
    }

    /// Moves the running lab from `before` to `after`: pods gone are
    /// unwired, new ones wired and served, changed ones served anew if
    /// their ports changed; then every object is published and each
    /// agent is waited for.
    fn converge(&mut self, before: &Store, after: Store) -> Result<()> {
        let pods = |s: &Store| -> BTreeMap<ObjKey, Value> {
            s.of_kind("Pod")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let (old, new) = (pods(before), pods(&after));
        self.state.objects = after.values();
        self.save()?;
        for key in old.keys().filter(|k| !new.contains_key(*k)) {
            let name = format!("{}/{}", key.namespace, key.name);
            if self.find_pod(&name).is_some() {
                self.delete_pod(&name)?;
            }
        }
        for (key, obj) in &new {
            let name = format!("{}/{}", key.namespace, key.name);
            let ports = manifests::served_ports(obj);
            let labels = manifests::labels(obj);
            match self.state.pods.iter().position(|p| p.full_name() == name) {
                None => {
                    let node = obj["spec"]["nodeName"].as_str().unwrap_or_default();
                    let i = self
                        .state
                        .nodes
                        .iter()
                        .position(|n| n.name == node)
                        .with_context(|| format!("pod {name}: no node {node}"))?;
                    let named = named_ports(obj);
                    let named: Vec<(&str, &str, u16)> = named
                        .iter()
                        .map(|(n, p, num)| (n.as_str(), p.as_str(), *num))
                        .collect();
                    let label_refs: Vec<(&str, &str)> = labels
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let idx =
                        self.add_pod_unlisted(i, &key.namespace, &key.name, &label_refs, &named)?;
                    self.start_server(idx, &ports)?;
                }
                Some(idx) => {
                    self.state.pods[idx].labels = labels;
                    let changed = old
                        .get(key)
                        .is_none_or(|o| manifests::served_ports(o) != ports);
                    if changed {
                        if let Some(pid) = self.state.pods[idx].server_pid.take() {
                            crate::stop_server(pid, &self.state.pods[idx]);
                        }
                        self.start_server(idx, &ports)?;
                    }
                }
            }
        }
        self.save()?;
        self.publish_all(&after)?;
        self.sync_agents()
    }

    /// Starts the server of pod `idx` on `ports` (none: no server) and
    /// waits until it listens.
    /// Starts pod `idx`'s server on `ports` (number, `TCP`/`UDP`): it
    /// answers with the pod's `namespace/name`, and goes with the lab.
    pub fn start_server(&mut self, idx: usize, ports: &[(u16, String)]) -> Result<()> {
        if ports.is_empty() {
            return Ok(());
        }
        let pod = &self.state.pods[idx];
        let place = self.place_of_pod(pod);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(
            self.state
                .run_dir
                .join(format!("{}.{}.log", pod.namespace, pod.name)),
        )?;
        let mut cmd = Command::new(&self.state.lab_bin);
        cmd.arg("pod-serve")
            .args(["--netns", &place.netns, "--name", &pod.full_name()]);
        if let Some(cg) = &place.cgroup {
            cmd.arg("--cgroup").arg(cg);
        }
        for (port, proto) in ports {
            cmd.args(["--port", &format!("{port}/{proto}")]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // Outlives `lab up`, and a Ctrl-C meant for it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {} pod-serve", self.state.lab_bin.display()))?;
        self.state.pods[idx].server_pid = Some(child.id());
        self.save()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
        if line.trim() != "listening" {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the server of pod {} did not start: {}",
                self.state.pods[idx].full_name(),
                std::fs::read_to_string(self.state.run_dir.join(format!(
                    "{}.{}.log",
                    self.state.pods[idx].namespace, self.state.pods[idx].name
                )))
                .unwrap_or_default()
                .trim()
            );
        }
        Ok(())
    }

    /// Writes every object the agents read: nodes, namespaces, pods (with
    /// their addresses), Services, EndpointSlices (given, and generated
    /// for selectors), NetworkPolicies.
    fn publish_all(&self, store: &Store) -> Result<()> {
        let all: Vec<usize> = (0..self.state.nodes.len()).collect();
        self.write_nodes_file(all.len(), &all)?;
        let of =
            |kind: &str| -> Vec<Value> { store.of_kind(kind).map(|(_, v)| v.clone()).collect() };
        self.publish("namespaces.yaml", "Namespace", of("Namespace"))?;
        self.write_pods_file()?;
        self.publish("services.yaml", "Service", of("Service"))?;
        let addresses: BTreeMap<(String, String), (Ipv4Addr, String)> = self
            .state
            .pods
            .iter()
            .map(|p| {
                (
                    (p.namespace.clone(), p.name.clone()),
                    (p.ip, self.state.nodes[p.node].name.clone()),
                )
            })
            .collect();
        let mut slices = of("EndpointSlice");
        slices.extend(store.endpoint_slices(&addresses));
        self.publish("endpointslices.yaml", "EndpointSlice", slices)?;
        self.publish("networkpolicies.yaml", "NetworkPolicy", of("NetworkPolicy"))
    }

    /// Waits until every agent has applied what was published.
    pub fn sync_agents(&self) -> Result<()> {
        for (i, n) in self.state.nodes.iter().enumerate() {
            match dataplane_common::api::call(
                &n.api_socket,
                &Request::Sync,
                Duration::from_secs(40),
            ) {
                Ok(Response::Ok) => {}
                Ok(Response::Error { message } | Response::NotReady { message }) => {
                    bail!("agent on {}: {message}", n.name)
                }
                Ok(other) => bail!("agent on {}: unexpected answer {other:?}", n.name),
                Err(e) => bail!("agent on {}: {e:#}\n{}", n.name, self.agent_log(i)),
            }
        }
        Ok(())
    }

    fn place_of_pod(&self, p: &crate::PodState) -> Place {
        Place {
            netns: p.netns.clone(),
            cgroup: self.state.nodes[p.node].cgroup.clone(),
        }
    }

    fn node_by_name(&self, name: &str) -> Result<usize> {
        self.state
            .nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| {
                format!(
                    "no node {name} in lab {} (nodes: {})",
                    self.state.name,
                    self.node_names().join(", ")
                )
            })
    }

    /// Where `from` runs: a pod (`namespace/name`), `node/<name>` or
    /// `external`.
    pub fn place(&self, from: &str) -> Result<Place> {
        if from == "external" {
            let ext = self
                .state
                .external
                .as_ref()
                .context("the lab has no external host")?;
            return Ok(Place {
                netns: ext.netns.clone(),
                cgroup: None,
            });
        }
        if let Some(node) = from.strip_prefix("node/") {
            let n = &self.state.nodes[self.node_by_name(node)?];
            return Ok(Place {
                netns: n.netns.clone(),
                cgroup: n.cgroup.clone(),
            });
        }
        let pod = self.pod_named(from)?;
        Ok(self.place_of_pod(pod))
    }

    /// A pod by `namespace/name` (a bare name means `default`).
    fn pod_named(&self, name: &str) -> Result<&crate::PodState> {
        let full = if name.contains('/') {
            name.to_owned()
        } else {
            format!("default/{name}")
        };
        self.find_pod(&full).with_context(|| {
            format!(
                "no pod {full} in lab {} (pods: {})",
                self.state.name,
                self.state
                    .pods
                    .iter()
                    .map(crate::PodState::full_name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// The address `to` stands for: a pod (`namespace/name`), a Service's
    /// ClusterIP (`svc/<namespace>/<name>`), a node (`node/<name>`),
    /// `external`, or an IP.
    pub fn address(&self, to: &str) -> Result<Ipv4Addr> {
        if let Ok(ip) = to.parse() {
            return Ok(ip);
        }
        if to == "external" {
            return Ok(self
                .state
                .external
                .as_ref()
                .context("the lab has no external host")?
                .ip);
        }
        if let Some(node) = to.strip_prefix("node/") {
            return Ok(self.state.nodes[self.node_by_name(node)?].ip);
        }
        if let Some(svc) = to.strip_prefix("svc/") {
            let (ns, name) = svc
                .split_once('/')
                .with_context(|| format!("{to:?}: expected svc/<namespace>/<name>"))?;
            let store = self.store()?;
            let s = store
                .get("Service", ns, name)
                .with_context(|| format!("no Service {ns}/{name} in lab {}", self.state.name))?;
            let ip = s["spec"]["clusterIP"].as_str().unwrap_or("None");
            return ip
                .parse()
                .map_err(|_| anyhow::anyhow!("Service {ns}/{name} has no ClusterIP ({ip})"));
        }
        Ok(self.pod_named(to)?.ip)
    }

    /// One connection attempt from `from` to `to` on `port`/`proto` (see
    /// [`Lab::place`] and [`Lab::address`]), with a 1 s timeout.
    pub fn probe(&self, from: &str, to: &str, port: u16, proto: &str) -> Result<ProbeResult> {
        let place = self.place(from)?;
        let ip = self.address(to)?;
        self.probe_at(
            from,
            to,
            &place,
            SocketAddr::from((ip, port)),
            &protocol(proto)?,
        )
    }

    /// One attempt from `place` (a namespace, and the cgroup the probe's
    /// process runs in) to `addr`; `from` and `to` only label the result.
    pub fn probe_at(
        &self,
        from: &str,
        to: &str,
        place: &Place,
        addr: SocketAddr,
        proto: &str,
    ) -> Result<ProbeResult> {
        let mut cmd = Command::new(&self.state.lab_bin);
        cmd.arg("pod-probe").args([
            "--netns",
            &place.netns,
            "--to",
            &addr.to_string(),
            "--protocol",
            proto,
        ]);
        if let Some(cg) = &place.cgroup {
            cmd.arg("--cgroup").arg(cg);
        }
        let out = crate::run(&mut cmd)?;
        let r: Reached = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("probe output {:?}", String::from_utf8_lossy(&out.stdout)))?;
        Ok(ProbeResult {
            from: from.to_owned(),
            to: to.to_owned(),
            address: addr.to_string(),
            protocol: proto.to_owned(),
            verdict: if r.connected { "allowed" } else { "denied" }.into(),
            answered_by: r.answered_by,
            elapsed_ms: r.elapsed_ms,
            error: r.error,
            peer: r.peer,
        })
    }

    /// Every ordered pair of pods (each with itself too) on `port`/`proto`,
    /// probed in parallel.
    pub fn matrix(&self, port: u16, proto: &str) -> Result<Matrix> {
        let proto = protocol(proto)?;
        let started = Instant::now();
        let mut pods: Vec<&crate::PodState> = self.state.pods.iter().collect();
        pods.sort_by_key(|p| p.full_name());
        let mut jobs = Vec::new();
        for from in &pods {
            for to in &pods {
                jobs.push((
                    from.full_name(),
                    to.full_name(),
                    self.place_of_pod(from),
                    SocketAddr::from((to.ip, port)),
                ));
            }
        }
        let mut probes = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(MATRIX_PARALLEL) {
            let results: Vec<Result<ProbeResult>> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|(f, t, place, addr)| {
                        let proto = &proto;
                        s.spawn(move || self.probe_at(f, t, place, *addr, proto))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("probe thread panicked")))
                    })
                    .collect()
            });
            for r in results {
                probes.push(r?);
            }
        }
        let mut allowed: BTreeMap<String, BTreeMap<String, bool>> = BTreeMap::new();
        for p in &probes {
            allowed
                .entry(p.from.clone())
                .or_default()
                .insert(p.to.clone(), p.allowed());
        }
        Ok(Matrix {
            port,
            protocol: proto,
            pods: pods.iter().map(|p| p.full_name()).collect(),
            allowed,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            probes,
        })
    }

    /// `dataplane explain` of one packet from `from` to `to` on
    /// `port`/`proto`, run on the node where it enters (a pod's node, or
    /// for `external` the node addressed) and, while the datapath
    /// encapsulates it to another node of the lab, on that node too, as the
    /// packet it became. Each hop's JSON, in order.
    pub fn explain(&self, from: &str, to: &str, port: u16, proto: &str) -> Result<Vec<Value>> {
        let proto = protocol(proto)?.to_lowercase();
        let dst = self.address(to)?;
        let (mut node, src) = if from == "external" {
            let ext = self
                .state
                .external
                .as_ref()
                .context("the lab has no external host")?;
            let node = self
                .state
                .nodes
                .iter()
                .position(|n| n.ip == dst)
                .context("from external, explain a packet to a node's address (node/<name>)")?;
            (node, ext.ip)
        } else if from.starts_with("node/") {
            bail!(
                "explaining a node's own packets is not supported yet (their path is the host stack's)"
            );
        } else {
            let p = self.pod_named(from)?;
            (p.node, p.ip)
        };
        let (mut src, mut dst, mut dport) = (src.to_string(), dst.to_string(), port);
        let mut sport: Option<u16> = None;
        let mut hops = Vec::new();
        for _ in 0..self.state.nodes.len() {
            let n = &self.state.nodes[node];
            let mut cmd = Command::new(&self.state.dataplane_bin);
            cmd.args([
                "--netns",
                &n.netns,
                "explain",
                &src,
                &dst,
                &format!("{proto}/{dport}"),
            ])
            .args(["-o", "json", "--pin-dir"])
            .arg(&n.pin_dir)
            .arg("--socket")
            .arg(&n.api_socket);
            if let Some(s) = sport {
                cmd.args(["--sport", &s.to_string()]);
            }
            let out = crate::run(&mut cmd)?;
            let mut hop: Value = serde_json::from_slice(&out.stdout)?;
            hop["node"] = json!(n.name);
            let next = hop["next_node"]
                .as_str()
                .and_then(|a| a.parse::<Ipv4Addr>().ok());
            let leaves = hop["leaves_as"].as_str().map(str::to_owned);
            hops.push(hop);
            // Follow it while it stays in the lab, as the packet it became.
            let (Some(next), Some(leaves)) = (next, leaves) else {
                break;
            };
            let Some(i) = self.state.nodes.iter().position(|n| n.ip == next) else {
                break;
            };
            let (s, d) = leaves.split_once(" -> ").context("leaves_as")?;
            let (s, d): (SocketAddr, SocketAddr) = (s.parse()?, d.parse()?);
            (src, dst, dport, sport) = (
                s.ip().to_string(),
                d.ip().to_string(),
                d.port(),
                Some(s.port()),
            );
            node = i;
        }
        Ok(hops)
    }

    /// Runs `argv` (no shell) where `target` lives (see [`Lab::place`]),
    /// with the caller's standard streams; its exit status.
    pub fn exec(&self, target: &str, argv: &[String]) -> Result<std::process::ExitStatus> {
        let place = self.place(target)?;
        let (program, args) = argv.split_first().context("no command given")?;
        in_netns_cgroup(&place.netns, place.cgroup.as_deref(), program)
            .args(args)
            .status()
            .with_context(|| format!("running {program}"))
    }

    /// What runs where, as `lab status -o json` prints it.
    pub fn status_json(&self) -> Value {
        status_json(&self.state)
    }
}

/// Named container ports of a pod object: (name, protocol, number).
fn named_ports(pod: &Value) -> Vec<(String, String, u16)> {
    pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .filter_map(|p| {
            Some((
                p["name"].as_str()?.to_owned(),
                p["protocol"].as_str().unwrap_or("TCP").to_owned(),
                u16::try_from(p["containerPort"].as_u64()?).ok()?,
            ))
        })
        .collect()
}

/// See [`Lab::status_json`].
pub fn status_json(state: &LabState) -> Value {
    let alive = |pid: Option<u32>| pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
    json!({
        "name": state.name,
        "id": state.id,
        "mode": state.mode,
        "nodes": state.nodes.iter().map(|n| json!({
            "name": n.name,
            "netns": n.netns,
            "address": n.ip.to_string(),
            "pod_cidr": n.pod_cidr,
            "agent_pid": n.agent_pid,
            "agent_running": alive(n.agent_pid),
            "pin_dir": n.pin_dir.display().to_string(),
            "api_socket": n.api_socket.display().to_string(),
            "log": n.log.display().to_string(),
            "cgroup": n.cgroup.as_ref().map(|c| c.display().to_string()),
        })).collect::<Vec<_>>(),
        "pods": state.pods.iter().map(|p| json!({
            "name": p.full_name(),
            "node": state.nodes[p.node].name,
            "ip": p.ip.to_string(),
            "netns": p.netns,
            "labels": p.labels,
            "server_pid": p.server_pid,
        })).collect::<Vec<_>>(),
        "external": state.external.as_ref().map(|e| json!({"netns": e.netns, "address": e.ip.to_string()})),
        "manifests": state.manifests.display().to_string(),
    })
}

/// Moves this process into `netns` (an `ip netns` name) and, when given,
/// the cgroup `cgroup`: the pod helpers do it first thing, single-threaded.
fn enter(netns: &str, cgroup: Option<&Path>) -> Result<()> {
    if let Some(cg) = cgroup {
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cg.display()))?;
    }
    crate::enter_netns(&crate::netns_file(netns)?).with_context(|| format!("setns {netns}"))
}

/// `dataplane-lab pod-serve`: answers every TCP connection and UDP
/// datagram on `ports` with `name` (a pod's `namespace/name`); prints
/// `listening` once bound.
pub fn serve(
    netns: &str,
    cgroup: Option<&Path>,
    name: &str,
    ports: &[(u16, String)],
) -> Result<()> {
    enter(netns, cgroup)?;
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for (port, proto) in ports {
        if proto == "UDP" {
            udp.push(
                crate::bind_retrying(|| UdpSocket::bind(("0.0.0.0", *port)))
                    .with_context(|| format!("UDP {port}"))?,
            );
        } else {
            tcp.push(
                crate::bind_retrying(|| TcpListener::bind(("0.0.0.0", *port)))
                    .with_context(|| format!("TCP {port}"))?,
            );
        }
    }
    println!("listening");
    std::io::stdout().flush()?;
    let answer = format!("{name}\n");
    std::thread::scope(|s| {
        for l in &tcp {
            let answer = &answer;
            s.spawn(move || {
                for conn in l.incoming().flatten() {
                    s.spawn(move || {
                        let mut conn = conn;
                        let _ = conn.write_all(answer.as_bytes());
                        let _ = conn.shutdown(std::net::Shutdown::Write);
                        // Drain what the client sends, so closing does not
                        // reset the connection under its reply.
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut sink = [0u8; 512];
                        while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
                    });
                }
            });
        }
        for u in &udp {
            let answer = answer.trim_end();
            s.spawn(move || {
                let mut buf = [0u8; 2048];
                while let Ok((_, from)) = u.recv_from(&mut buf) {
                    let _ = u.send_to(answer.as_bytes(), from);
                }
            });
        }
    });
    Ok(())
}

/// `dataplane-lab pod-probe`: one attempt to reach `to` over `proto`
/// within `timeout`, reported as JSON on stdout.
pub fn reach(
    netns: &str,
    cgroup: Option<&Path>,
    to: SocketAddr,
    proto: &str,
    timeout: Duration,
) -> Result<Reached> {
    enter(netns, cgroup)?;
    let started = Instant::now();
    let left = || {
        timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1))
    };
    let mut peer = None;
    let outcome: std::io::Result<Option<String>> = if proto == "TCP" {
        TcpStream::connect_timeout(&to, timeout).map(|mut s| {
            peer = s.peer_addr().ok().map(|a| a.to_string());
            // Connected: allowed, whoever answers (if anyone).
            let _ = s.set_read_timeout(Some(left()));
            let mut line = String::new();
            let _ = BufReader::new(&mut s).read_line(&mut line);
            Some(line.trim().to_owned()).filter(|l| !l.is_empty())
        })
    } else {
        (|| {
            // Unconnected, as a DNS client is: each datagram is addressed
            // (sendto) and the reply's source is what the application sees.
            let s = UdpSocket::bind(("0.0.0.0", 0))?;
            // A refusal (ICMP port unreachable) still ends the attempt at
            // once, as on a connected socket.
            let on: libc::c_int = 1;
            // SAFETY: a valid socket and option value.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::IPPROTO_IP,
                    libc::IP_RECVERR,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Several datagrams in the window: one attempt, not undone by
            // a single lost packet.
            let mut buf = [0u8; 512];
            loop {
                s.send_to(b"probe", to)?;
                s.set_read_timeout(Some(left().min(Duration::from_millis(250))))?;
                match s.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        peer = Some(from.to_string());
                        return Ok(Some(String::from_utf8_lossy(&buf[..n]).trim().to_owned()));
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if started.elapsed() >= timeout {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "no reply",
                            ));
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        })()
    };
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(match outcome {
        Ok(answer) => Reached {
            connected: true,
            answered_by: answer.filter(|a| a.contains('/')),
            error: None,
            elapsed_ms,
            peer,
        },
        Err(e) => Reached {
            connected: false,
            answered_by: None,
            error: Some(match e.kind() {
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                    format!("timed out after {} ms", timeout.as_millis())
                }
                _ => e.to_string(),
            }),
            elapsed_ms,
            peer: None,
        },
    })
}
