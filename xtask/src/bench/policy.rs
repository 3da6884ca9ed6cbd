//! NetworkPolicy: the per-packet cost of the policy lookup with 1, 100 and
//! 10,000 rules (TEST_RUN), TCP request/response and connect latency
//! between pods under policy against pods under none (same node, same
//! run, alternating), and the time from a policy change to its entry in
//! the datapath with 1,000 policies and 10,000 pods in the cluster.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, Map, MapData, lpm_trie::Key, lpm_trie::LpmTrie};
use dataplane_common::{
    EndpointInfo, EndpointKey, IPPROTO_TCP, MAP_ENDPOINTS, MAP_POLICY, MapSpec, PEER_ANY,
    POLICY_ALLOW, POLICY_DIR_INGRESS, POLICY_PREFIX_FULL, PolicyKey, PolicyValue,
};
use lab::{Lab, LabSpec};
use serde_json::{Value, json};

use super::{Latency, golden_bench, median, percentiles, verdict};

const PORT: u16 = 8080;
/// Round trips (and connects) per phase per round; rounds alternate the
/// phases (no policy, policy).
const TRIPS: usize = 300;
const ROUNDS: usize = 20;
const CHANGES: u32 = 200;

pub(super) fn bench() -> Result<String> {
    let mut out = String::new();
    let per_packet = golden_bench(
        "golden_policy",
        "bench_policy_lookup_per_packet",
        "BENCH policy-lookup",
    )?;
    let mut lab = Lab::up(&LabSpec::new(1, 0)?)?;
    lab.set_namespaces(&[("bench", &[("team", "bench")])])?;
    // One client/server pair on one node, measured in rounds alternately
    // with and without policy on both ends (the client's egress, the
    // server's ingress): the same pods, paths and CPUs, only the policy
    // differs.
    for (name, app) in [("client", "client"), ("server", "server")] {
        lab.add_pod_in(0, "bench", name, &[("app", app)], &[])?;
    }
    let guards = vec![
        policy(
            "guard-in",
            json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                "ports": [{"port": PORT, "protocol": "TCP"}]}]}),
        ),
        policy(
            "guard-out",
            json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"], "egress": [{
                "to": [{"podSelector": {"matchLabels": {"app": "server"}}}],
                "ports": [{"port": PORT, "protocol": "TCP"}]}]}),
        ),
    ];
    let stop = AtomicBool::new(false);
    let netns = lab.pod("server").netns.clone();
    let latency = std::thread::scope(|s| -> Result<_> {
        let server = s.spawn(|| rr_server(&netns, &stop));
        let r = measure_latency(&lab, &guards);
        stop.store(true, Ordering::Relaxed);
        server
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))??;
        r
    })?;
    let (empty, scale, sync) = change_latency(&mut lab)?;

    say!(out, "== NetworkPolicy, release build");
    say!(
        out,
        "   per packet in lxc_from_ctr, TEST_RUN clock, an established flow from a local peer (goal: flat in the number of rules):"
    );
    say!(
        out,
        "{:>9} {:>15} {:>15} {:>12} {:>15}",
        "rules",
        "no policy ns",
        "by identity ns",
        "by ipBlock ns",
        "denied ns"
    );
    for n in [1, 100, 10_000] {
        let g = |k: &str| per_packet.get(&format!("{k}_{n}")).copied().unwrap_or(0.0);
        say!(
            out,
            "{:>9} {:>15.0} {:>15.0} {:>15.0} {:>15.0}",
            n,
            g("none"),
            g("identity"),
            g("block"),
            g("denied")
        );
    }
    // Each row against its own unpoliced flow (timed alternately with it),
    // then 10,000 rules against 1: the machine's drift between rows
    // cancels.
    let rel = |k: &str, n: u32| {
        per_packet
            .get(&format!("{k}_{n}"))
            .copied()
            .unwrap_or(f64::NAN)
            / per_packet
                .get(&format!("none_{n}"))
                .copied()
                .unwrap_or(f64::NAN)
    };
    let worst = ["identity", "block", "denied"]
        .iter()
        .map(|k| rel(k, 10_000) / rel(k, 1))
        .fold(f64::MIN, f64::max);
    say!(
        out,
        "   10,000 rules against 1, each against the unpoliced flow timed with it: at most {worst:.2}x ({})",
        verdict(worst < 1.1)
    );
    say!(
        out,
        "   TCP between two pods on one node, client and server on one CPU, {ROUNDS} rounds of {TRIPS} per phase alternating, the median of the rounds' ratios (goal: under 5 % overhead):"
    );
    for (what, (open, guarded)) in [("request/response", latency.0), ("connect()", latency.1)] {
        let over = (guarded / open - 1.0) * 100.0;
        say!(
            out,
            "   {what:<17} no policy {open:>6.1} us, under policy {guarded:>6.1} us: {over:+.1} % ({})",
            verdict(over < 5.0)
        );
    }
    say!(
        out,
        "   a policy change, from publishing it to its entry in dp_policy, {CHANGES} changes (goal: p99 under 100 ms at 1,000 policies):"
    );
    say!(
        out,
        "   2 pods, 3 policies: p50 {:.1} ms, p99 {:.1} ms; 10,002 pods, 1,003 policies: p50 {:.1} ms, p99 {:.1} ms ({}); those loaded in {sync:.2} s",
        empty.p50,
        empty.p99,
        scale.p50,
        scale.p99,
        verdict(scale.p99 < 100.0)
    );
    Ok(out)
}

fn policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"namespace": "bench", "name": name},
        "spec": spec,
    })
}

/// Echoes what each connection sends until it closes.
fn rr_server(netns: &str, stop: &AtomicBool) -> Result<()> {
    lab::in_netns_thread(netns, || -> Result<()> {
        let l = TcpListener::bind(("0.0.0.0", PORT))?;
        std::thread::scope(|s| {
            super::accept_until(&l, stop, |mut c| {
                s.spawn(move || {
                    pin(0);
                    let _ = c.set_nodelay(true);
                    let mut buf = [0u8; 64];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            })
        })
    })?
}

/// Pins the calling thread to `cpu` (when the machine has it).
fn pin(cpu: usize) {
    // SAFETY: a plain CPU set for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % num_cpus(), &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Median round trip and median connect() in microseconds, without the
/// guards and (by the median ratio of paired rounds) with them: ((open,
/// guarded) RR, (open, guarded) connect).
type Pairs = ((f64, f64), (f64, f64));

fn measure_latency(lab: &Lab, guards: &[Value]) -> Result<Pairs> {
    let client = lab.pod("client").netns.clone();
    let server = SocketAddr::from((lab.pod("server").ip, PORT));
    let server_if = endpoint_ifindex(lab, "server")?;
    let rules: LpmTrie<MapData, PolicyKey, PolicyValue> =
        LpmTrie::try_from(pinned(lab, MAP_POLICY)?)?;
    // Whether the server's ingress is isolated in the datapath.
    let guarded_now = || {
        let k = Key::new(
            POLICY_PREFIX_FULL,
            PolicyKey::new(server_if, POLICY_DIR_INGRESS, 0, IPPROTO_TCP, [0, 0]),
        );
        rules.get(&k, 0).is_ok()
    };
    let set = |on: bool| -> Result<()> {
        lab.set_policies(if on { guards.to_vec() } else { Vec::new() })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while guarded_now() != on {
            if Instant::now() > deadline {
                bail!(
                    "policies {} after 10 s",
                    if on { "not in place" } else { "still in place" }
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    };
    let rr = |n: usize| -> Result<Vec<f64>> {
        lab::in_netns_thread(&client, || -> Result<Vec<f64>> {
            pin(0);
            let mut s = lab::connect(server)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let msg = [7u8; 64];
            let mut back = [0u8; 64];
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                s.write_all(&msg)?;
                s.read_exact(&mut back)?;
                out.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok(out)
        })?
    };
    let connects = |n: usize| -> Result<Vec<f64>> {
        lab::in_netns_thread(&client, || -> Result<Vec<f64>> {
            pin(0);
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                // A RST at close: no TIME_WAIT piles up.
                s.set_linger(Some(Duration::ZERO))?;
                let t = Instant::now();
                s.connect(&server.into())
                    .with_context(|| format!("connecting to {server}"))?;
                out.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok(out)
        })?
    };
    // Per round, the median with policy over the median without: slow
    // drift of the machine cancels within a round.
    let (mut rr_ratio, mut conn_ratio) = (Vec::new(), Vec::new());
    let (mut rr_open, mut conn_open) = (Vec::new(), Vec::new());
    for round in 0..=ROUNDS {
        let mut phase = [(0.0, 0.0); 2];
        for (i, on) in [false, true].into_iter().enumerate() {
            set(on)?;
            phase[i] = (median(rr(TRIPS)?), median(connects(TRIPS)?));
        }
        // The first round warms up (neighbours, caches).
        if round > 0 {
            rr_ratio.push(phase[1].0 / phase[0].0);
            conn_ratio.push(phase[1].1 / phase[0].1);
            rr_open.push(phase[0].0);
            conn_open.push(phase[0].1);
        }
    }
    // Proof that the guards did guard: with them on, the client reaches
    // nothing but the server's port.
    set(true)?;
    let other = SocketAddr::from((lab.pod("server").ip, PORT + 1));
    let reached = lab::in_netns_thread(&client, || {
        TcpStream::connect_timeout(&other, Duration::from_millis(300)).is_ok()
    })?;
    if reached {
        bail!("the guards let the client reach {other}");
    }
    let (rr_open, conn_open) = (median(rr_open), median(conn_open));
    Ok((
        (rr_open, rr_open * median(rr_ratio)),
        (conn_open, conn_open * median(conn_ratio)),
    ))
}

fn pinned(lab: &Lab, name: &str) -> Result<Map> {
    let spec = MapSpec::by_name(name).context("contract")?;
    Ok(Map::from_map_data(MapData::from_pin(
        lab.state.nodes[0].pin_dir.join(spec.pin_name()),
    )?)?)
}

/// The ifindex of `pod`'s endpoint, from `dp_endpoints`.
fn endpoint_ifindex(lab: &Lab, pod: &str) -> Result<u32> {
    let eps: HashMap<MapData, EndpointKey, EndpointInfo> =
        HashMap::try_from(pinned(lab, MAP_ENDPOINTS)?)?;
    Ok(eps
        .get(&EndpointKey::from(std::net::IpAddr::V4(lab.pod(pod).ip)), 0)?
        .ifindex)
}

/// Times `CHANGES` edits of one policy (each allows a new port to the
/// server) from publishing to the allow in `dp_policy`: with the bench's
/// own policies, then with 1,000 more policies and 10,000 more pods;
/// returns both and how long the agent took to take those in.
fn change_latency(lab: &mut Lab) -> Result<(Latency, Latency, f64)> {
    let node = lab.state.nodes[0].clone();
    let ifindex = endpoint_ifindex(lab, "server")?;
    let rules: LpmTrie<MapData, PolicyKey, PolicyValue> =
        LpmTrie::try_from(pinned(lab, MAP_POLICY)?)?;
    let allowed = |port: u16| {
        let k = Key::new(
            POLICY_PREFIX_FULL,
            PolicyKey::new(
                ifindex,
                POLICY_DIR_INGRESS,
                PEER_ANY,
                IPPROTO_TCP,
                port.to_be_bytes(),
            ),
        );
        // The longest match: the allow once written, the pod's isolation
        // marker before.
        rules
            .get(&k, 0)
            .is_ok_and(|v| v.kind == POLICY_ALLOW && v.policy != 0)
    };
    // The first change of each phase is not timed: it may wait for work
    // the agent still has from what came before.
    let latency = |from: u32| -> Result<Latency> {
        let mut lat = Vec::new();
        for i in from..=from + CHANGES {
            let port = 20_000 + i as u16;
            let probe = policy(
                "probe",
                json!({"podSelector": {"matchLabels": {"app": "server"}},
                       "ingress": [{"ports": [{"port": port, "protocol": "TCP"}]}]}),
            );
            let text = probe.to_string();
            let started = Instant::now();
            lab.write_manifest("probe.yaml", &text)?;
            while !allowed(port) {
                if started.elapsed() > Duration::from_secs(5) {
                    bail!("change {i} not applied after 5 s:\n{}", lab.agent_log(0));
                }
                std::hint::spin_loop();
            }
            if i != from {
                lat.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        Ok(percentiles(lat))
    };
    let empty = latency(0)?;

    // 10,000 pods on 40 other nodes, in 10 namespaces, 1,000 policies
    // selecting some of them by label, each admitting a namespace's pods.
    let mut docs = Vec::new();
    for n in 1..=40u32 {
        docs.push(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("bench-{n}")},
            "spec": {"podCIDR": format!("10.245.{n}.0/24")},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("172.21.0.{n}")}]}}),
        );
        for p in 1..=250u32 {
            let i = (n - 1) * 250 + p;
            docs.push(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("p-{n}-{p}"), "namespace": format!("ns{}", i % 10),
                             "labels": {"app": format!("a{}", i % 1000), "tier": format!("t{}", i % 7)}},
                "spec": {"nodeName": format!("bench-{n}"), "containers": []},
                "status": {"podIPs": [{"ip": format!("10.245.{n}.{p}")}]}}));
        }
    }
    for i in 0..1000u32 {
        let mut p = policy(
            &format!("np{i}"),
            json!({"podSelector": {"matchLabels": {"app": format!("a{i}")}}, "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": format!("ns{}", i % 10)}},
                          "podSelector": {"matchLabels": {"tier": format!("t{}", i % 7)}}}],
                "ports": [{"port": 80}]}]}),
        );
        p["metadata"]["namespace"] = json!(format!("ns{}", i % 10));
        docs.push(p);
    }
    let text: Vec<String> = docs.iter().map(Value::to_string).collect();
    let text = text.join("\n---\n") + "\n";
    let started = Instant::now();
    lab.write_manifest("scale.yaml", &text)?;
    let metrics = SocketAddr::from(([127, 0, 0, 1], 9963));
    loop {
        let (_, body) = lab::http_get(&node.netns, metrics, "/metrics")?;
        if body.contains("dataplane_objects{kind=\"NetworkPolicy\"} 1003")
            && body.contains("dataplane_objects{kind=\"Pod\"} 10002")
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("scale objects not taken in after 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sync = started.elapsed().as_secs_f64();
    let scale = latency(CHANGES + 1)?;
    Ok((empty, scale, sync))
}
