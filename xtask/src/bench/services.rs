//! Services: connect latency through a ClusterIP with 1 to 10,000 Services
//! installed against the pod address directly, in the same run (per packet,
//! and with socket LB from inside the node's cgroup); the time
//! to program 10,000 Services; the kernel memory their maps take; and the
//! per-packet cost of the Service path measured by TEST_RUN.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use dataplane_common::api::{Request, Response};
use lab::{
    Lab, LabSpec,
    services::{Ep, service},
};
use serde_json::{Value, json};

use super::{golden_bench, median, verdict};
use crate::toolchain::output;

pub(super) const PORT: u16 = 8080;
/// Connections per target per round; rounds alternate the targets.
const CONNECTS: usize = 500;
const ROUNDS: usize = 6;

pub(super) fn bench() -> Result<String> {
    let mut out = String::new();
    let lab = Lab::up(&LabSpec::new(1, 2)?)?;
    let backend = lab.pod("pod-0-1").clone();
    let client = lab.pod("pod-0-0").netns.clone();
    let stop = AtomicBool::new(false);
    let result = std::thread::scope(|s| -> Result<_> {
        let server = s.spawn(|| sink_server(&backend.netns, &stop));
        let r = (|| -> Result<_> {
            let mut latency = Vec::new();
            let mut programmed = None;
            let mut memory = None;
            let mut socket_lb = None;
            for n in [10_000usize, 1000, 100, 1] {
                let took = program(&lab, n)?;
                if n == 10_000 {
                    programmed = Some(took);
                    memory = Some(service_memory(&lab)?);
                }
                let (pod, cip) = connect_times(
                    &client,
                    SocketAddr::from((backend.ip, PORT)),
                    SocketAddr::from(([10, 96, 0, 10], 80)),
                )?;
                latency.push((n, pod, cip));
                if n == 1 {
                    // As a pod's own processes connect: in the node's
                    // cgroup, where the socket programs act.
                    let cgroup = lab.state.nodes[0].cgroup.clone().context("node cgroup")?;
                    socket_lb = Some(in_cgroup(&cgroup, || {
                        connect_times(
                            &client,
                            SocketAddr::from((backend.ip, PORT)),
                            SocketAddr::from(([10, 96, 0, 10], 80)),
                        )
                    })?);
                }
            }
            Ok((latency, programmed, memory, socket_lb))
        })();
        stop.store(true, Ordering::Relaxed);
        server
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))??;
        r
    })?;
    let (latency, programmed, memory, socket_lb) = result;
    let per_packet = golden_bench(
        "golden_services",
        "bench_service_path_per_packet",
        "BENCH service-path",
    )?;
    let prefilter = golden_bench("golden", "bench_prefilter_per_packet", "BENCH prefilter")?;

    say!(
        out,
        "== Services, release build; TCP connect() from a pod, median of {} per target, targets alternating",
        CONNECTS * ROUNDS
    );
    say!(
        out,
        "   (goals: 10,000 Services within 1.1x of 1; a ClusterIP adds at most 3 us over the pod address)"
    );
    say!(
        out,
        "{:>9} {:>14} {:>14} {:>11} {:>12}",
        "Services",
        "pod IP us",
        "ClusterIP us",
        "added us",
        "vs 1 Svc*"
    );
    // The ClusterIP's cost relative to the pod address in the same rounds,
    // against the same ratio at 1 Service: the machine's drift between
    // rows cancels out.
    let ratio = |pod: f64, cip: f64| cip / pod;
    let base = latency
        .iter()
        .find(|(n, ..)| *n == 1)
        .map_or(1.0, |(_, p, c)| ratio(*p, *c));
    for (n, pod, cip) in latency.iter().rev() {
        say!(
            out,
            "{:>9} {:>14.1} {:>14.1} {:>11.1} {:>11.2}x",
            n,
            pod,
            cip,
            cip - pod,
            ratio(*pod, *cip) / base
        );
    }
    let at_10k = latency
        .iter()
        .find(|(n, ..)| *n == 10_000)
        .context("10k row")?;
    let flat = ratio(at_10k.1, at_10k.2) / base;
    let added = latency
        .iter()
        .map(|(_, p, c)| c - p)
        .fold(f64::MIN, f64::max);
    say!(
        out,
        "   * ClusterIP/pod-IP time against the same ratio at 1 Service"
    );
    let (sock_pod, sock_cip) = socket_lb.context("socket LB row")?;
    let per_packet_added = latency
        .iter()
        .find(|(n, ..)| *n == 1)
        .map_or(0.0, |(_, p, c)| c - p);
    say!(
        out,
        "   socket LB (the client in its node's cgroup, 1 Service): pod IP {sock_pod:.1} us, ClusterIP {sock_cip:.1} us: {:+.1} us ({:.2}x) against {per_packet_added:+.1} us per packet ({}: within 5% of the pod IP)",
        sock_cip - sock_pod,
        sock_cip / sock_pod,
        verdict(sock_cip / sock_pod <= 1.05)
    );
    say!(
        out,
        "   flat: {flat:.2}x ({}); added at most {added:.1} us ({})",
        verdict(flat <= 1.1),
        verdict(added <= 3.0)
    );
    let programmed = programmed.context("programming time")?;
    say!(
        out,
        "== 10,000 Services (one port, one backend each) programmed in {:.2} s, from writing the manifests to every frontend and backend slot in the maps ({}; kube-proxy's load times: `cargo xtask bench --only compare`)",
        programmed.as_secs_f64(),
        verdict(programmed < Duration::from_secs(1))
    );
    let memory = memory.context("memory")?;
    say!(
        out,
        "== kernel memory of the Service maps at 10,000 ClusterIP Services (bpftool memlock):"
    );
    let mut total = 0u64;
    for (name, (count, bytes)) in &memory {
        total += bytes;
        say!(
            out,
            "   {name:<18} {count:>3} map(s) {:>9.1} MiB",
            *bytes as f64 / 1048576.0
        );
    }
    say!(
        out,
        "   total {:.1} MiB; ClusterIPs have no Maglev table (each NodePort/LB/external-IP port has one: 16,381 slots, 64 KiB)",
        total as f64 / 1048576.0
    );
    say!(
        out,
        "== per packet in lxc_from_ctr, TEST_RUN clock (goal: the Service lookup under 100 ns):"
    );
    say!(
        out,
        "   established Service flow {:.0} ns vs a packet to no Service {:.0} ns: {:+.0} ns ({})",
        per_packet["established_ns"],
        per_packet["plain_ns"],
        per_packet["established_ns"] - per_packet["plain_ns"],
        verdict(per_packet["established_ns"] - per_packet["plain_ns"] < 100.0)
    );
    say!(
        out,
        "   a new flow's first packet {:.0} ns vs {:.0} ns: {:+.0} ns once per connection (frontend, backend choice, two conntrack entries)",
        per_packet["new_flow_ns"],
        per_packet["new_plain_ns"],
        per_packet["new_flow_ns"] - per_packet["new_plain_ns"]
    );
    say!(
        out,
        "== the XDP prefilter per packet, TEST_RUN clock, 10,000 denied prefixes (goal: under 100 ns):"
    );
    // A passing frame goes on through host_xdp (to a NodePort-range port:
    // the XDP Service lookup), so the prefilter's cost on it is what the
    // prefixes add; a denied one ends in the prefilter.
    let added = prefilter["passed_ns"] - prefilter["empty_ns"];
    say!(
        out,
        "   a denied source dropped in {:.0} ns; a source that passes {:.0} ns against {:.0} ns with no prefix, {added:+.0} ns ({})",
        prefilter["dropped_ns"],
        prefilter["passed_ns"],
        prefilter["empty_ns"],
        verdict(prefilter["dropped_ns"] < 100.0 && added < 100.0)
    );
    Ok(out)
}

/// The ClusterIP of Service `i` of [`manifests`] (10.96.0.10 up).
pub(super) fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i as u32)
}

/// Writes [`manifests`]' `n` Services into the lab; the time from writing
/// them to node 0's agent having every one in its maps (rendered before
/// the clock starts: the agent's time is measured, not this debug-built
/// tool's serializer).
pub(super) fn program(lab: &Lab, n: usize) -> Result<Duration> {
    let render = |objects: Vec<Value>| {
        let docs: Vec<String> = objects.iter().map(Value::to_string).collect();
        docs.join("\n---\n") + "\n"
    };
    let (services, slices) = manifests(lab, n);
    let (services, slices) = (render(services), render(slices));
    let started = Instant::now();
    lab.write_manifest("services.yaml", &services)?;
    lab.write_manifest("endpointslices.yaml", &slices)?;
    wait_programmed(lab, n)?;
    Ok(started.elapsed())
}

/// `n` ClusterIP Services, the first at 10.96.0.10, each with the one
/// backend.
fn manifests(lab: &Lab, n: usize) -> (Vec<Value>, Vec<Value>) {
    let ports = json!([{"name": "http", "port": PORT, "protocol": "TCP"}]);
    let mut services = Vec::with_capacity(n);
    let mut slices = Vec::with_capacity(n);
    for i in 0..n {
        let ip = cluster_ip(i);
        let name = format!("s{i}");
        services.push(service(
            &name,
            json!({"clusterIP": ip.to_string(), "ports": [{"name": "http", "port": 80, "targetPort": PORT}]}),
            json!({}),
        ));
        slices.push(lab.slice(
            &name,
            &format!("{name}-1"),
            &[Ep::ready("pod-0-1")],
            ports.clone(),
        ));
    }
    (services, slices)
}

/// Waits until node 0's agent reports `n` frontends, none of them without
/// its backend (a frontend is in the maps before its EndpointSlice is).
fn wait_programmed(lab: &Lab, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Response::Status(s) = lab.agent_call(0, &Request::Status)?
            && s.frontends == n
            && s.frontends_empty == 0
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{n} Services not programmed after 60 s:\n{}",
                lab.agent_log(0)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `f` with this process in `cgroup` (a cgroup v2 directory), then
/// back where it was, also when `f` fails (the lab cannot remove a cgroup
/// with a process in it).
pub(super) fn in_cgroup<T>(cgroup: &std::path::Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 line in /proc/self/cgroup")?
        .trim()
        .trim_start_matches('/')
        .to_owned();
    let root = cgroup.parent().context("cgroup root")?;
    let back = root.join(rel).join("cgroup.procs");
    let pid = std::process::id().to_string();
    std::fs::write(cgroup.join("cgroup.procs"), &pid)
        .with_context(|| format!("joining {}", cgroup.display()))?;
    let r = f();
    std::fs::write(&back, &pid).with_context(|| format!("back to {}", back.display()))?;
    r
}

/// Accepts connections until `stop`, one at a time; one that sends a
/// byte gets it back (a connection per request: connections per second).
/// Each is kept until the client ends it (connect() timing and the
/// connection rates end theirs with a RST), so the server holds no
/// TIME_WAIT.
pub(super) fn sink_server(netns: &str, stop: &AtomicBool) -> Result<()> {
    lab::in_netns_thread(netns, || -> Result<()> {
        let l = std::net::TcpListener::bind(("0.0.0.0", PORT))?;
        super::accept_until(&l, stop, |mut c| {
            use std::io::{Read as _, Write as _};
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let mut b = [0u8; 1];
            if let Ok(1) = c.read(&mut b) {
                let _ = c.write_all(&b);
                let _ = c.read(&mut b);
            }
        })
    })?
}

/// Median connect() time in microseconds to `pod` and to `cip`, the two
/// measured alternately. Each connection ends with a RST (linger 0), so no
/// TIME_WAIT piles up.
pub(super) fn connect_times(netns: &str, pod: SocketAddr, cip: SocketAddr) -> Result<(f64, f64)> {
    connect_times_n(netns, pod, cip, (200, CONNECTS, ROUNDS))
}

/// [`connect_times`] with (warm-up connects, connects per round, rounds).
pub(super) fn connect_times_n(
    netns: &str,
    pod: SocketAddr,
    cip: SocketAddr,
    (warmup, connects, rounds): (usize, usize, usize),
) -> Result<(f64, f64)> {
    lab::in_netns_thread(netns, || -> Result<(f64, f64)> {
        let once = |to: SocketAddr| -> Result<f64> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_linger(Some(Duration::ZERO))?;
            let t = Instant::now();
            s.connect(&to.into())
                .with_context(|| format!("connecting to {to}"))?;
            Ok(t.elapsed().as_secs_f64() * 1e6)
        };
        // Warm up both paths (neighbour entries, caches).
        for _ in 0..warmup {
            once(pod)?;
            once(cip)?;
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            for _ in 0..connects {
                a.push(once(pod)?);
            }
            for _ in 0..connects {
                b.push(once(cip)?);
            }
        }
        Ok((median(a), median(b)))
    })?
}

/// memlock bytes of the Service maps (and the Maglev tables inside
/// dp_maglev), by name.
fn service_memory(lab: &Lab) -> Result<BTreeMap<String, (usize, u64)>> {
    // This lab's maps only (other labs may be running): by their pins, and
    // the Maglev tables by the ids the outer map holds.
    let pin_dir = &lab.state.nodes[0].pin_dir;
    let show = |args: &[&str]| -> Result<Value> {
        let mut c = Command::new("bpftool");
        c.arg("-j").args(args);
        Ok(serde_json::from_str(&output(&mut c)?)?)
    };
    let mut by = BTreeMap::new();
    for name in [
        dataplane_common::MAP_SERVICES,
        dataplane_common::MAP_BACKENDS,
        dataplane_common::MAP_MAGLEV,
        dataplane_common::MAP_AFFINITY,
    ] {
        let spec = dataplane_common::MapSpec::by_name(name).context("contract")?;
        let pin = pin_dir.join(spec.pin_name());
        let pin = pin.to_str().context("pin path")?;
        let m = show(&["map", "show", "pinned", pin])?;
        by.insert(
            name.to_owned(),
            (1usize, m["bytes_memlock"].as_u64().unwrap_or(0)),
        );
        if name == dataplane_common::MAP_MAGLEV {
            let entries = show(&["map", "dump", "pinned", pin])?;
            let mut tables = (0usize, 0u64);
            for e in entries.as_array().into_iter().flatten() {
                if let Some(id) = e["inner_map_id"].as_u64() {
                    let t = show(&["map", "show", "id", &id.to_string()])?;
                    tables.0 += 1;
                    tables.1 += t["bytes_memlock"].as_u64().unwrap_or(0);
                }
            }
            by.insert("maglev tables".into(), tables);
        }
    }
    Ok(by)
}
