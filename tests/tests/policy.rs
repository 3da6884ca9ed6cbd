//! NetworkPolicy with real traffic, the way Kubernetes' own e2e tests
//! probe it: namespaces x, y and z, pods a, b and c in each (spread over
//! two nodes), every pod serving TCP and UDP on 80 and 81 under named
//! container ports; each scenario probes every ordered pair of distinct
//! pods on each port and protocol (72 pairs, 288 probes) and compares with
//! what a small evaluator written here (not the agent's compiler) says.
//! Needs root.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use lab::{
    Lab, LabSpec,
    services::{Ep, identity_server, service},
};
use serde_json::{Value, json};

/// (namespace, pod, node): both nodes hold pods of every namespace, so
/// each scenario crosses nodes and stays on one.
const PODS: [(&str, &str, usize); 9] = [
    ("x", "a", 0),
    ("x", "b", 1),
    ("x", "c", 0),
    ("y", "a", 1),
    ("y", "b", 0),
    ("y", "c", 1),
    ("z", "a", 0),
    ("z", "b", 1),
    ("z", "c", 0),
];
const PORTS: [(&str, &str, u16); 4] = [
    ("serve-80-tcp", "TCP", 80),
    ("serve-80-udp", "UDP", 80),
    ("serve-81-tcp", "TCP", 81),
    ("serve-81-udp", "UDP", 81),
];
const PROBED: [(u16, &str); 4] = [(80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")];

fn name(ns: &str, pod: &str) -> String {
    format!("{ns}-{pod}")
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A probe: from pod, to pod, port, protocol.
type Probe = (String, String, u16, &'static str);

/// Whether `from` reaches `to` (an address) on `port`/`proto`: a TCP
/// connection that is answered, or a UDP datagram that is, by `expect`
/// (the identity server names itself, so a Service probe proves which
/// backend answered). A denied probe times out; an allowed one may need a
/// retry while neighbours resolve.
fn reach(netns: &str, to: SocketAddr, proto: &str, expect: &str) -> bool {
    let answered = |text: &str| text.split(' ').next() == Some(expect);
    lab::in_netns_thread(netns, || {
        for _ in 0..2 {
            let ok = if proto == "TCP" {
                TcpStream::connect_timeout(&to, Duration::from_millis(700))
                    .and_then(|mut s| {
                        s.set_read_timeout(Some(Duration::from_millis(700)))?;
                        let mut line = String::new();
                        BufReader::new(&mut s).read_line(&mut line)?;
                        Ok(answered(&line))
                    })
                    .unwrap_or(false)
            } else {
                UdpSocket::bind(("0.0.0.0", 0))
                    .and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_millis(700)))?;
                        s.send_to(b"who", to)?;
                        let mut buf = [0u8; 256];
                        let (n, _) = s.recv_from(&mut buf)?;
                        Ok(answered(&String::from_utf8_lossy(&buf[..n])))
                    })
                    .unwrap_or(false)
            };
            if ok {
                return true;
            }
        }
        false
    })
    .unwrap_or(false)
}

/// How probes address their destination pod.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    PodIp,
    /// The pod's own ClusterIP Service (same ports).
    Service,
}

/// Every probe at once (each on a thread of its own): the observed matrix.
fn observe(lab: &Lab, w: &World, via: Via) -> BTreeMap<Probe, bool> {
    let mut probes = Vec::new();
    for from in &w.pods {
        for to in &w.pods {
            if from == to {
                continue;
            }
            for (port, proto) in PROBED {
                probes.push((from.clone(), to.clone(), port, proto));
            }
        }
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .map(|p| {
                let from = lab.pod(&p.0).netns.clone();
                let ip = match via {
                    Via::PodIp => lab.pod(&p.1).ip,
                    Via::Service => w.services[&p.1],
                };
                let to = SocketAddr::from((ip, p.2));
                s.spawn(move || reach(&from, to, p.3, &p.1))
            })
            .collect();
        probes
            .iter()
            .cloned()
            .zip(handles.into_iter().map(|h| h.join().unwrap_or(false)))
            .collect()
    })
}

/// The pods' facts as the evaluator sees them.
#[derive(Clone)]
struct World {
    pods: Vec<String>,
    ns_labels: BTreeMap<String, BTreeMap<String, String>>,
    pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    pod_ips: BTreeMap<String, Ipv4Addr>,
    /// Each pod's ClusterIP.
    services: BTreeMap<String, Ipv4Addr>,
}

impl World {
    fn new() -> Self {
        let mut ns_labels = BTreeMap::new();
        let mut pod_labels = BTreeMap::new();
        for (ns, pod, _) in PODS {
            ns_labels.insert(
                ns.to_string(),
                [
                    ("ns".to_string(), ns.to_string()),
                    ("kubernetes.io/metadata.name".to_string(), ns.to_string()),
                ]
                .into(),
            );
            pod_labels.insert(name(ns, pod), [("pod".to_string(), pod.to_string())].into());
        }
        World {
            pods: PODS.iter().map(|(ns, pod, _)| name(ns, pod)).collect(),
            ns_labels,
            pod_labels,
            pod_ips: BTreeMap::new(),
            services: BTreeMap::new(),
        }
    }

    fn ns_of(p: &str) -> &str {
        p.split_once('-').expect("ns-pod").0
    }
}
/// A label selector: matchLabels and matchExpressions.
fn selects(sel: &Value, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = sel["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str());
    let by_exprs = sel["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let values: Vec<&str> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let have = labels.get(key).map(String::as_str);
            match e["operator"].as_str().unwrap_or_default() {
                "In" => have.is_some_and(|v| values.contains(&v)),
                "NotIn" => have.is_none_or(|v| !values.contains(&v)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                other => panic!("operator {other}"),
            }
        });
    by_labels && by_exprs
}

/// Whether `ip` is in `cidr` (a.b.c.d/n).
fn in_cidr(ip: Ipv4Addr, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').expect("cidr");
    let (net, len): (Ipv4Addr, u32) = (net.parse().expect("net"), len.parse().expect("len"));
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Whether a rule's peer list admits `peer` (a pod) for a policy in `ns`.
fn peers_admit(w: &World, peers: &Value, ns: &str, peer: &str) -> bool {
    let Some(list) = peers.as_array() else {
        return true;
    };
    if list.is_empty() {
        return true;
    }
    list.iter().any(|p| {
        if let Some(b) = p.get("ipBlock") {
            let ip = w.pod_ips[peer];
            return in_cidr(ip, b["cidr"].as_str().expect("cidr"))
                && !b["except"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| in_cidr(ip, e.as_str().expect("except")));
        }
        let ns_ok = match p.get("namespaceSelector") {
            Some(sel) => selects(sel, &w.ns_labels[World::ns_of(peer)]),
            None => World::ns_of(peer) == ns,
        };
        let pod_ok = p
            .get("podSelector")
            .is_none_or(|sel| selects(sel, &w.pod_labels[peer]));
        ns_ok && pod_ok
    })
}

/// Whether a rule's port list admits `port`/`proto` at `dest`.
fn ports_admit(ports: &Value, port: u16, proto: &str) -> bool {
    let Some(list) = ports.as_array() else {
        return true;
    };
    if list.is_empty() {
        return true;
    }
    list.iter().any(|p| {
        let pproto = p["protocol"].as_str().unwrap_or("TCP");
        let pport = match &p["port"] {
            Value::Null => None,
            Value::Number(n) => n.as_u64().map(|n| n as u16),
            // Named: every pod here maps serve-<port>-<proto> the same way.
            Value::String(s) => PORTS
                .iter()
                .find(|(n, pr, _)| n == s && *pr == pproto)
                .map(|(_, _, n)| *n),
            _ => None,
        };
        let end = p["endPort"].as_u64().map(|e| e as u16);
        pproto == proto
            && match (&p["port"], pport) {
                (Value::Null, _) => true,
                (_, Some(n)) => n == port || end.is_some_and(|e| (n..=e).contains(&port)),
                _ => false,
            }
    })
}

/// What Kubernetes says of one probe under `policies`: each direction is
/// judged by the policies selecting the pod on that side.
fn expected(w: &World, policies: &[Value], p: &Probe) -> bool {
    let (from, to, port, proto) = (&p.0, &p.1, p.2, p.3);
    let types = |pol: &Value| -> (bool, bool) {
        match pol["spec"]["policyTypes"].as_array() {
            Some(t) => (
                t.iter().any(|x| x == "Ingress"),
                t.iter().any(|x| x == "Egress"),
            ),
            None => (
                true,
                pol["spec"]["egress"]
                    .as_array()
                    .is_some_and(|e| !e.is_empty()),
            ),
        }
    };
    let selecting = |pod: &str| -> Vec<&Value> {
        policies
            .iter()
            .filter(|pol| {
                pol["metadata"]["namespace"] == World::ns_of(pod)
                    && selects(&pol["spec"]["podSelector"], &w.pod_labels[pod])
            })
            .collect()
    };
    let egress_ok = {
        let pols: Vec<&Value> = selecting(from).into_iter().filter(|p| types(p).1).collect();
        pols.is_empty()
            || pols.iter().any(|pol| {
                pol["spec"]["egress"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| {
                        peers_admit(w, &r["to"], World::ns_of(from), to)
                            && ports_admit(&r["ports"], port, proto)
                    })
            })
    };
    let ingress_ok = {
        let pols: Vec<&Value> = selecting(to).into_iter().filter(|p| types(p).0).collect();
        pols.is_empty()
            || pols.iter().any(|pol| {
                pol["spec"]["ingress"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| {
                        peers_admit(w, &r["from"], World::ns_of(to), from)
                            && ports_admit(&r["ports"], port, proto)
                    })
            })
    };
    egress_ok && ingress_ok
}

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": spec,
    })
}

/// Publishes `policies` and waits until the observed matrix (probes
/// addressed `via`) matches the evaluator's (policies take a moment to
/// apply); returns how long that took, or panics with the differences.
fn scenario_via(lab: &Lab, w: &World, what: &str, policies: Vec<Value>, via: Via) -> Duration {
    lab.set_policies(policies.clone())
        .expect("publish policies");
    let started = Instant::now();
    loop {
        let seen = observe(lab, w, via);
        let wrong: Vec<String> = seen
            .iter()
            .filter(|(p, ok)| expected(w, &policies, p) != **ok)
            .map(|(p, ok)| {
                format!(
                    "{} -> {} {}/{}: {} (expected {})",
                    p.0,
                    p.1,
                    p.2,
                    p.3,
                    if *ok { "reached" } else { "blocked" },
                    if *ok { "blocked" } else { "reached" }
                )
            })
            .collect();
        if wrong.is_empty() {
            let allowed = seen.values().filter(|ok| **ok).count();
            eprintln!(
                "{what}: {allowed} of {} probes reached, as expected, after {:?}",
                seen.len(),
                started.elapsed()
            );
            return started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(8) {
            panic!(
                "{what}: {} of {} probes wrong:\n{}\n---- agent logs ----\n{}\n{}",
                wrong.len(),
                seen.len(),
                wrong.join("\n"),
                lab.agent_log(0),
                lab.agent_log(1)
            );
        }
    }
}

fn scenario(lab: &Lab, w: &World, what: &str, policies: Vec<Value>) -> Duration {
    scenario_via(lab, w, what, policies, Via::PodIp)
}

/// A ClusterIP Service per pod (`svc-<pod>` at `10.96.7.<n>`), with the
/// pod's four ports, and waits until both nodes serve them.
fn publish_services(lab: &Lab, w: &mut World) {
    let ports = json!([
        {"name": "t80", "port": 80, "protocol": "TCP"},
        {"name": "t81", "port": 81, "protocol": "TCP"},
        {"name": "u80", "port": 80, "protocol": "UDP"},
        {"name": "u81", "port": 81, "protocol": "UDP"},
    ]);
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    for (i, pod) in w.pods.iter().enumerate() {
        let ip = Ipv4Addr::new(10, 96, 7, i as u8 + 1);
        let svc = format!("svc-{pod}");
        services.push(service(
            &svc,
            json!({"clusterIP": ip.to_string(), "ports": ports}),
            json!({}),
        ));
        slices.push(lab.slice(&svc, &format!("{svc}-1"), &[Ep::ready(pod)], ports.clone()));
        w.services.insert(pod.clone(), ip);
    }
    lab.set_services(services, slices).expect("services");
    for node in 0..2 {
        for ip in w.services.values() {
            lab.wait_frontend(node, &format!("{ip}:81/udp"), "internal", 1)
                .expect("frontend");
        }
    }
}

fn suite(mode: &str) {
    let mut spec = LabSpec::new(2, 0).expect("spec");
    spec.mode = mode.into();
    let mut lab = Lab::up(&spec).expect("lab up");
    let namespaces = |y_labels: &'static [(&'static str, &'static str)]| {
        [
            ("x", &[("ns", "x")][..]),
            ("y", y_labels),
            ("z", &[("ns", "z")][..]),
        ]
    };
    lab.set_namespaces(&namespaces(&[("ns", "y")]))
        .expect("namespaces");
    for (ns, pod, node) in PODS {
        lab.add_pod_in(node, ns, &name(ns, pod), &[("pod", pod)], &PORTS)
            .expect("pod");
    }
    let mut w = World::new();
    for (ns, pod, _) in PODS {
        w.pod_ips.insert(name(ns, pod), lab.pod(&name(ns, pod)).ip);
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let serve = |lab: &Lab, pod: &str| {
            let (netns, n, stop) = (lab.pod(pod).netns.clone(), pod.to_owned(), &stop);
            s.spawn(move || identity_server(&netns, &n, &[80, 81], stop).expect("server"));
        };
        for pod in &w.pods {
            serve(&lab, pod);
        }
        std::thread::sleep(Duration::from_millis(200));
        let deny_x = policy("x", "deny-all", json!({"podSelector": {}}));
        let allow_y_to_xa = policy(
            "x",
            "allow-y-to-a",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                "ports": [{"port": "serve-80-tcp"}]}]}),
        );
        let y_egress_to_a = policy(
            "y",
            "egress-to-a",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
                "to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}],
                "ports": [{"port": 80, "protocol": "TCP"}, {"port": 80, "protocol": "UDP"}]}]}),
        );
        let deny_everywhere = |types: Value| -> Vec<Value> {
            ["x", "y", "z"]
                .iter()
                .map(|ns| policy(ns, "deny", json!({"podSelector": {}, "policyTypes": types})))
                .collect()
        };
        let mut n = 0;
        let mut count = |d| {
            n += 1;
            d
        };
        count(scenario(&lab, &w, "no policy", vec![]));
        count(scenario(
            &lab,
            &w,
            "default deny ingress in x",
            vec![deny_x.clone()],
        ));
        // The node's own probes still reach a pod under default deny.
        let xa = lab.pod("x-a");
        assert!(
            reach(
                &lab.state.nodes[xa.node].netns,
                SocketAddr::from((xa.ip, 80)),
                "TCP",
                "x-a"
            ),
            "the node must reach its pod under default deny"
        );
        count(scenario(
            &lab,
            &w,
            "default deny egress in x",
            vec![policy(
                "x",
                "deny-egress",
                json!({"podSelector": {}, "policyTypes": ["Egress"]}),
            )],
        ));
        count(scenario(
            &lab,
            &w,
            "default deny both ways in every namespace",
            deny_everywhere(json!(["Ingress", "Egress"])),
        ));
        count(scenario(
            &lab,
            &w,
            "deny-all plus allow-all ingress in x: the union allows",
            vec![
                deny_x.clone(),
                policy(
                    "x",
                    "allow-all",
                    json!({"podSelector": {}, "ingress": [{}]}),
                ),
            ],
        ));
        let mut egress_open_y = deny_everywhere(json!(["Egress"]));
        egress_open_y.push(policy(
            "y",
            "allow-all-egress",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
        ));
        count(scenario(
            &lab,
            &w,
            "egress denied everywhere but allowed for all of y",
            egress_open_y,
        ));
        count(scenario(
            &lab,
            &w,
            "x/a open to namespace y on its named port",
            vec![deny_x.clone(), allow_y_to_xa.clone()],
        ));
        // What the operator sees: each entry with the policy it came from,
        // peers named by their labels.
        let xa = lab.pod("x-a");
        let got = lab
            .cli(xa.node, &["policy", "get", "x/x-a", "-o", "json"])
            .expect("policy get");
        let view: Value = serde_json::from_str(&got).expect("json");
        let entries = view["entries"].as_array().expect("entries");
        let allows: Vec<&Value> = entries
            .iter()
            .filter(|e| e["from"] == "x/allow-y-to-a")
            .collect();
        assert_eq!(allows.len(), 3, "one allow per pod of y: {got}");
        for e in &allows {
            assert_eq!(
                (&e["direction"], &e["protocol"], &e["ports"]),
                (&json!("ingress"), &json!("tcp"), &json!("80")),
                "{got}"
            );
            assert!(
                e["peer"].as_str().expect("peer").contains("(y: pod="),
                "{got}"
            );
        }
        assert!(
            entries
                .iter()
                .any(|e| e["direction"] == "ingress" && e["from"] == "isolated: the rest is denied"),
            "{got}"
        );
        let text = lab
            .cli(xa.node, &["policy", "get", "x/x-a"])
            .expect("policy get");
        assert!(text.contains("x/allow-y-to-a"), "{text}");
        // Verdicts as events, naming the policy that decided: y/a's new
        // connection to x/a's named port is allowed by x/allow-y-to-a, z/b's
        // to port 81 denied by default.
        let (ya, zb) = (lab.pod("y-a").clone(), lab.pod("z-b").clone());
        let mon = lab
            .monitor(
                xa.node,
                &[
                    "--type",
                    "policy",
                    "--ip",
                    &xa.ip.to_string(),
                    "--count",
                    "2",
                    "--duration",
                    "15",
                    "-o",
                    "json",
                ],
            )
            .expect("monitor");
        assert!(reach(
            &ya.netns,
            SocketAddr::from((xa.ip, 80)),
            "TCP",
            "x-a"
        ));
        assert!(!reach(
            &zb.netns,
            SocketAddr::from((xa.ip, 81)),
            "TCP",
            "x-a"
        ));
        let events = mon.events(Duration::from_secs(20)).expect("events");
        let verdict = |src: Ipv4Addr, port: u16| {
            events
                .iter()
                .find(|e| e["src"] == src.to_string() && e["dport"] == port)
                .unwrap_or_else(|| panic!("no verdict from {src} to port {port}: {events:#?}"))
        };
        let allowed = verdict(ya.ip, 80);
        for (field, want) in [
            ("type", json!("policy-verdict")),
            ("verdict", json!("allowed")),
            ("direction", json!("ingress")),
            ("policy", json!("x/allow-y-to-a")),
            ("dst", json!(xa.ip.to_string())),
            ("protocol", json!("tcp")),
        ] {
            assert_eq!(allowed[field], want, "{field}: {allowed:#}");
        }
        let denied = verdict(zb.ip, 81);
        for (field, want) in [
            ("verdict", json!("denied")),
            ("reason", json!("policy_denied")),
            ("policy", json!("default deny")),
            ("direction", json!("ingress")),
        ] {
            assert_eq!(denied[field], want, "{field}: {denied:#}");
        }
        assert_ne!(
            denied["src_identity"], allowed["src_identity"],
            "{events:#?}"
        );
        assert_eq!(
            events.last().map(|e| e["type"].clone()),
            Some(json!("summary")),
            "{events:#?}"
        );
        // A drop that is not policy's, with its reason: an address of the
        // node's pod range that no pod has.
        let nobody = Ipv4Addr::from(u32::from(xa.ip) | 0xfa);
        let mon = lab
            .monitor(
                xa.node,
                &[
                    "--type",
                    "drop",
                    "--ip",
                    &nobody.to_string(),
                    "--count",
                    "1",
                    "--duration",
                    "15",
                    "-o",
                    "json",
                ],
            )
            .expect("monitor");
        let _ = lab::send_udp(&xa.netns, SocketAddr::from((nobody, 9)), b"anyone?");
        let events = mon.events(Duration::from_secs(20)).expect("events");
        let drop = &events[0];
        for (field, want) in [
            ("type", json!("drop")),
            ("reason", json!("unknown_destination")),
            ("direction", json!("from-endpoint")),
            ("src", json!(xa.ip.to_string())),
            ("dst", json!(nobody.to_string())),
            ("dport", json!(9)),
            ("protocol", json!("udp")),
        ] {
            assert_eq!(drop[field], want, "{field}: {events:#?}");
        }
        // An edit in place: the same policy now admits z instead of y.
        let mut edited = allow_y_to_xa.clone();
        edited["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["ns"] =
            json!("z");
        count(scenario(
            &lab,
            &w,
            "allow-y-to-a edited to admit z",
            vec![deny_x.clone(), edited],
        ));
        let all = vec![deny_x.clone(), allow_y_to_xa.clone(), y_egress_to_a.clone()];
        count(scenario(
            &lab,
            &w,
            "and y's egress only to pods a on 80",
            all.clone(),
        ));
        // The node reaches a pod whose egress is isolated: its replies pass.
        let yb = lab.pod("y-b");
        assert!(
            reach(
                &lab.state.nodes[yb.node].netns,
                SocketAddr::from((yb.ip, 81)),
                "TCP",
                "y-b"
            ),
            "the node must reach a pod under egress isolation"
        );
        // Traffic to a Service is judged after translation, by the backend
        // pod's ingress and the client's egress towards the backend.
        publish_services(&lab, &mut w);
        count(scenario_via(
            &lab,
            &w,
            "the same policies, every probe through the destination's ClusterIP",
            all.clone(),
            Via::Service,
        ));
        // A pod relabelled: x/b becomes an "a" for every rule at once.
        lab.set_pod_labels("x-b", &[("pod", "a")]).expect("relabel");
        w.pod_labels
            .insert("x-b".into(), [("pod".to_string(), "a".to_string())].into());
        count(scenario(&lab, &w, "x/b relabelled pod=a", all.clone()));
        lab.set_pod_labels("x-b", &[("pod", "b")]).expect("relabel");
        w.pod_labels
            .insert("x-b".into(), [("pod".to_string(), "b".to_string())].into());
        count(scenario(
            &lab,
            &w,
            "AND: x/a admits pods c of namespace y",
            vec![policy(
                "x",
                "and",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
            )],
        ));
        count(scenario(
            &lab,
            &w,
            "OR: x/a admits namespace y, or pods c of x",
            vec![policy(
                "x",
                "or",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                    {"namespaceSelector": {"matchLabels": {"ns": "y"}}}, {"podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
            )],
        ));
        count(scenario(
            &lab,
            &w,
            "from pods of its own namespace: y/a admits y/b",
            vec![policy(
                "y",
                "same-ns",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                    {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            )],
        ));
        count(scenario(
            &lab,
            &w,
            "namespaceSelector on kubernetes.io/metadata.name: z admits all but x",
            vec![policy(
                "z",
                "not-x",
                json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}]}}]}]}),
            )],
        ));
        count(scenario(
            &lab,
            &w,
            "matchExpressions: pods a admit pods that are not a, from any namespace, on 81",
            vec![policy(
                "x",
                "exprs",
                json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a"]}]},
                       "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchExpressions": [
                           {"key": "pod", "operator": "NotIn", "values": ["a"]}]}}],
                           "ports": [{"port": 81}]}]}),
            )],
        ));
        count(scenario(
            &lab,
            &w,
            "Exists and DoesNotExist: x's labelled pods but c admit y and z; a selector of nothing isolates nothing",
            vec![
                policy(
                    "x",
                    "exists",
                    json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Exists"},
                                                                {"key": "pod", "operator": "NotIn", "values": ["c"]}]},
                           "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["y", "z"]}]},
                                                  "podSelector": {"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}}]}]}),
                ),
                policy(
                    "y",
                    "nothing",
                    json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "DoesNotExist"}]}}),
                ),
            ],
        ));
        let yb = w.pod_ips["y-b"];
        count(scenario(
            &lab,
            &w,
            "ipBlock with except, matching pod addresses",
            vec![policy(
                "x",
                "block",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"ipBlock": {
                    "cidr": "10.244.0.0/16", "except": [format!("{yb}/32")]}}]}]}),
            )],
        ));
        count(scenario(
            &lab,
            &w,
            "endPort: y admits x on TCP 80 to 81",
            vec![policy(
                "y",
                "range",
                json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}],
                       "ports": [{"port": 80, "endPort": 81, "protocol": "TCP"}]}]}),
            )],
        ));
        count(scenario(
            &lab,
            &w,
            "UDP only",
            vec![policy(
                "x",
                "udp",
                json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"ports": [{"protocol": "UDP", "port": 80}]}]}),
            )],
        ));
        count(scenario(
            &lab,
            &w,
            "one rule, two ports: z/b admits TCP 80 and UDP 81 from anyone",
            vec![policy(
                "z",
                "ports",
                json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"ports": [
                    {"port": 80, "protocol": "TCP"}, {"port": 81, "protocol": "UDP"}]}]}),
            )],
        ));
        count(scenario(
            &lab,
            &w,
            "an SCTP-only rule isolates and allows no TCP or UDP",
            vec![policy(
                "x",
                "sctp",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"protocol": "SCTP", "port": 80}]}]}),
            )],
        ));
        count(scenario(
            &lab,
            &w,
            "egress by named port: x may send only to serve-81-udp",
            vec![policy(
                "x",
                "egress-named",
                json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [
                    {"port": "serve-81-udp", "protocol": "UDP"}]}]}),
            )],
        ));
        let xa_ip = w.pod_ips["x-a"];
        count(scenario(
            &lab,
            &w,
            "y's egress only to x/a's address",
            vec![policy(
                "y",
                "egress-cidr",
                json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": format!("{xa_ip}/32")}}]}]}),
            )],
        ));
        let node1 = lab.state.nodes[1].pod_cidr.clone();
        count(scenario(
            &lab,
            &w,
            "y's egress to the pod network except node 1's pods",
            vec![policy(
                "y",
                "egress-except",
                json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {
                    "cidr": "10.244.0.0/16", "except": [node1]}}]}]}),
            )],
        ));
        count(scenario(
            &lab,
            &w,
            "policyTypes omitted with egress rules: z/a isolated both ways",
            vec![policy(
                "z",
                "both",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"podSelector": {}}]}],
                       "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}]}]}),
            )],
        ));
        // A namespace relabelled: y becomes what the rule admits.
        let from_blue = vec![policy(
            "x",
            "from-blue",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]}),
        )];
        count(scenario(
            &lab,
            &w,
            "x admits namespaces labelled team=blue (none)",
            from_blue.clone(),
        ));
        lab.set_namespaces(&namespaces(&[("ns", "y"), ("team", "blue")]))
            .expect("relabel namespace");
        w.ns_labels
            .get_mut("y")
            .expect("y")
            .insert("team".into(), "blue".into());
        count(scenario(
            &lab,
            &w,
            "namespace y relabelled team=blue",
            from_blue,
        ));
        // A new pod is judged as soon as it exists: x/d, labelled like the
        // pods a, falls under the policies naming them.
        lab.add_pod_in(0, "x", "x-d", &[("pod", "a")], &PORTS)
            .expect("new pod");
        serve(&lab, "x-d");
        w.pods.push("x-d".into());
        w.pod_labels
            .insert("x-d".into(), [("pod".to_string(), "a".to_string())].into());
        w.pod_ips.insert("x-d".into(), lab.pod("x-d").ip);
        count(scenario(
            &lab,
            &w,
            "new pod x/d labelled pod=a",
            all.clone(),
        ));
        // A pod the agent knows only from its CNI ADD (its Pod object not
        // seen yet, as when the watch lags behind the kubelet), in a
        // namespace with policies: held isolated both ways until its labels
        // can be judged, from the moment the ADD returns.
        lab.add_pod_unlisted(1, "x", "x-e", &[("pod", "a")], &PORTS)
            .expect("unlisted pod");
        serve(&lab, "x-e");
        let (xe, zb) = (lab.pod("x-e").clone(), lab.pod("z-b").clone());
        assert!(
            !reach(&zb.netns, SocketAddr::from((xe.ip, 81)), "TCP", "x-e"),
            "a pod of unknown labels under x's policies must not be open"
        );
        assert!(
            !reach(&xe.netns, SocketAddr::from((zb.ip, 80)), "TCP", "z-b"),
            "nor may it send before its policy is known"
        );
        lab.publish_pods().expect("publish");
        w.pods.push("x-e".into());
        w.pod_labels
            .insert("x-e".into(), [("pod".to_string(), "a".to_string())].into());
        w.pod_ips.insert("x-e".into(), xe.ip);
        count(scenario(
            &lab,
            &w,
            "x/e's Pod object published",
            all.clone(),
        ));
        // A pod whose Pod object the agent has (labels, no address yet, as
        // before the kubelet reports it) carries its identity from the
        // CNI ADD on: x/f, labelled like x/a, gets x/a's identity.
        lab.write_manifest(
            "pending.yaml",
            &json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "x-f", "namespace": "x", "labels": {"pod": "a"}},
                    "spec": {"nodeName": lab.state.nodes[0].name, "containers": []}})
            .to_string(),
        )
        .expect("pending pod");
        let identity_of = |lab: &Lab, ip: Ipv4Addr| {
            lab.dump(0, "dp_endpoints")
                .expect("dump")
                .into_iter()
                .find(|e| e["ip"] == ip.to_string())
                .and_then(|e| e["identity"].as_u64())
        };
        let xa_id = identity_of(&lab, w.pod_ips["x-a"]).expect("x-a's identity");
        // Until the agent has taken in the pending object.
        let deadline = Instant::now() + Duration::from_secs(5);
        while lab
            .metric(0, "dataplane_objects{kind=\"Pod\"}")
            .expect("metric")
            != Some((w.pods.len() + 1) as f64)
        {
            assert!(Instant::now() < deadline, "the pending Pod is not taken in");
            std::thread::sleep(Duration::from_millis(20));
        }
        lab.add_pod_unlisted(0, "x", "x-f", &[("pod", "a")], &PORTS)
            .expect("pod");
        assert_eq!(
            identity_of(&lab, lab.pod("x-f").ip),
            Some(xa_id),
            "x/f's identity when its ADD returns"
        );
        lab.write_manifest("pending.yaml", "").expect("clear");
        lab.publish_pods().expect("publish");
        // Deleting every policy opens everything again, quickly.
        let took = count(scenario(&lab, &w, "policies deleted", vec![]));
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert!(n >= 25, "{n} scenarios");
    });
    for n in &lab.state.nodes {
        let nft = Command::new("ip")
            .args(["netns", "exec", &n.netns, "nft", "list", "ruleset"])
            .output()
            .expect("nft");
        assert_eq!(
            String::from_utf8_lossy(&nft.stdout).trim(),
            "",
            "nft rules on {}",
            n.name
        );
    }
}

#[test]
fn policies_give_the_matrix_kubernetes_promises_vxlan() {
    suite("vxlan");
}

#[test]
fn policies_give_the_matrix_kubernetes_promises_native() {
    suite("native");
}
