//! Side by side: the same measurements, in the same run, on
//! - the limit: two namespaces joined by one veth pair (same node), and two
//!   node namespaces on the underlay bridge (node to node), no programs;
//! - a Flannel-style cluster, built as flanneld builds it: a VXLAN device
//!   per node (VNI 1, port 8472, nolearning) with the FDB and neighbour
//!   entries and a route per remote subnet, a `cni0` bridge for the node's
//!   pods, flanneld's masquerade and forward rules;
//! - ours, in VXLAN and in native routing (the lab).
//!
//! Each topology offers a same-node pod pair and a cross-node pair; each
//! pair is measured for TCP throughput (iperf3, 1 and 2 streams),
//! request/response latency (1-byte transactions on one connection,
//! p50/p99) and new connections per second (connect, one transaction,
//! close). Figures are medians over repetitions with their min–max;
//! `target/bench/report.md` gets the table and the ratios to the
//! baselines of the same run.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lab::{Lab, LabSpec, in_netns_thread, ip};

use crate::toolchain::output;

/// How long and how often.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub reps: usize,
    pub seconds: u32,
    pub transactions: usize,
    /// Service counts for the Service comparison.
    pub services: &'static [usize],
    /// connect() timing there: (warm-up, connects per round, rounds).
    pub connects: (usize, usize, usize),
    /// `perf` profiles across nodes.
    pub profile: bool,
}

impl Plan {
    pub(crate) const FULL: Plan = Plan {
        reps: 3,
        seconds: 5,
        transactions: 20_000,
        services: &[1, 100, 1000, 10_000],
        connects: (200, 500, 6),
        profile: true,
    };
    /// Under 10 minutes from a fresh clone, the release build included.
    pub(crate) const QUICK: Plan = Plan {
        reps: 2,
        seconds: 1,
        transactions: 3_000,
        services: &[1, 1000],
        connects: (50, 200, 2),
        profile: true,
    };
    /// The harness only: every topology up, one short measurement each.
    pub(crate) const SMOKE: Plan = Plan {
        reps: 1,
        seconds: 1,
        transactions: 200,
        services: &[1, 10],
        connects: (10, 50, 1),
        profile: false,
    };
}

/// Two endpoints to measure between: the client's namespace, the
/// server's namespace and address.
#[derive(Clone, Debug)]
pub(super) struct Pair {
    pub client: String,
    pub server: String,
    pub addr: Ipv4Addr,
}

/// Namespaces this harness made, removed when dropped (also on panic).
#[derive(Default)]
pub(super) struct Topology {
    namespaces: Vec<String>,
}

impl Topology {
    fn netns(&mut self, name: &str) -> Result<String> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(name.to_owned())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn prefix() -> String {
    format!("dpb{}", std::process::id())
}

fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    output(Command::new("ip").args([
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ]))
    .map(drop)
}

/// `dev`'s MAC in `netns` (`ip -j link`).
pub(super) fn mac_of(ns: &str, dev: &str) -> Result<String> {
    let out = output(Command::new("ip").args(["-n", ns, "-j", "link", "show", dev]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v[0]["address"].as_str().context("no MAC")?.to_owned())
}

/// The limit: a veth pair (same node) and two nodes on a bridge.
fn limit(t: &mut Topology) -> Result<(Pair, Pair)> {
    let p = prefix();
    let (a, b) = (t.netns(&format!("{p}-va"))?, t.netns(&format!("{p}-vb"))?);
    ip(&[
        "-n", &a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b,
    ])?;
    for (ns, addr) in [(&a, "10.99.0.1/24"), (&b, "10.99.0.2/24")] {
        ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    }
    let (n0, n1) = underlay(t, "l")?;
    Ok((
        Pair {
            client: a,
            server: b,
            addr: Ipv4Addr::new(10, 99, 0, 2),
        },
        Pair {
            client: n0,
            server: n1,
            addr: Ipv4Addr::new(172, 30, 0, 12),
        },
    ))
}

/// Two node namespaces (172.30.0.11, .12) on a bridge in a third.
fn underlay(t: &mut Topology, tag: &str) -> Result<(String, String)> {
    let p = prefix();
    let ul = t.netns(&format!("{p}-{tag}ul"))?;
    ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &ul, "link", "set", "br0", "up"])?;
    let mut nodes = Vec::new();
    for i in 0..2 {
        let n = t.netns(&format!("{p}-{tag}n{i}"))?;
        let port = format!("n{i}");
        ip(&[
            "-n", &ul, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &n,
        ])?;
        ip(&["-n", &ul, "link", "set", &port, "master", "br0", "up"])?;
        ip(&[
            "-n",
            &n,
            "addr",
            "add",
            &format!("172.30.0.{}/24", 11 + i),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &n, "link", "set", "eth0", "up"])?;
        nodes.push(n);
    }
    let n1 = nodes.pop().context("node")?;
    let n0 = nodes.pop().context("node")?;
    Ok((n0, n1))
}

fn flannel(t: &mut Topology) -> Result<(Pair, Pair)> {
    flannel_with(t, "")
}

/// Node `i`'s namespace in the Flannel-style topology tagged `tag`.
pub(super) fn flannel_node(tag: &str, i: usize) -> String {
    format!("{}-f{tag}n{i}", prefix())
}

/// Flannel's VXLAN backend, as flanneld sets up a node: `flannel.1` with
/// the node's /32 of its subnet, `cni0` with the gateway, pods on the
/// bridge, and for each other node a route via its `flannel.1` address,
/// that address's neighbour entry and the FDB entry to its node. `tag`
/// tells several of them apart.
pub(super) fn flannel_with(t: &mut Topology, tag: &str) -> Result<(Pair, Pair)> {
    let p = prefix();
    let (n0, n1) = underlay(t, &format!("f{tag}"))?;
    let nodes = [n0, n1];
    const MTU: &str = "1450";
    let mut pods = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        sysctl(n, "net.ipv4.ip_forward", "1")?;
        // As kubeadm requires on a Flannel node: bridged pod-to-pod
        // packets pass netfilter (kube-proxy's DNAT replies need it).
        sysctl(n, "net.bridge.bridge-nf-call-iptables", "1")?;
        ip(&[
            "-n",
            n,
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &format!("172.30.0.{}", 11 + i),
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ])?;
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("10.245.{i}.0/32"),
            "dev",
            "flannel.1",
        ])?;
        ip(&["-n", n, "link", "set", "flannel.1", "up"])?;
        ip(&["-n", n, "link", "add", "cni0", "mtu", MTU, "type", "bridge"])?;
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("10.245.{i}.1/24"),
            "dev",
            "cni0",
        ])?;
        ip(&["-n", n, "link", "set", "cni0", "up"])?;
        for j in 0..2 {
            let pod = t.netns(&format!("{p}-f{tag}p{i}{j}"))?;
            let host = format!("veth{j}");
            ip(&[
                "-n", n, "link", "add", &host, "mtu", MTU, "type", "veth", "peer", "name", "eth0",
                "netns", &pod,
            ])?;
            ip(&["-n", n, "link", "set", &host, "master", "cni0", "up"])?;
            ip(&[
                "-n",
                &pod,
                "addr",
                "add",
                &format!("10.245.{i}.{}/24", 2 + j),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &pod, "link", "set", "eth0", "mtu", MTU, "up"])?;
            ip(&[
                "-n",
                &pod,
                "route",
                "add",
                "default",
                "via",
                &format!("10.245.{i}.1"),
            ])?;
            pods.push((pod, Ipv4Addr::new(10, 245, i as u8, 2 + j as u8)));
        }
        // flanneld's rules (iptables): pod-to-pod not masqueraded, the
        // rest leaving the cluster masqueraded, and forwarding allowed.
        for rule in [
            "-t nat -A POSTROUTING -s 10.245.0.0/16 -d 10.245.0.0/16 -j RETURN",
            "-t nat -A POSTROUTING -s 10.245.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully",
            "-A FORWARD -s 10.245.0.0/16 -j ACCEPT",
            "-A FORWARD -d 10.245.0.0/16 -j ACCEPT",
        ] {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", n, "iptables"])
                .args(rule.split(' '));
            output(&mut cmd)?;
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        let o = 1 - i;
        let mac = mac_of(&nodes[o], "flannel.1")?;
        let gw = format!("10.245.{o}.0");
        ip(&[
            "-n",
            n,
            "neigh",
            "add",
            &gw,
            "lladdr",
            &mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ])?;
        output(Command::new("bridge").args([
            "-n",
            n,
            "fdb",
            "append",
            &mac,
            "dev",
            "flannel.1",
            "dst",
            &format!("172.30.0.{}", 11 + o),
        ]))?;
        ip(&[
            "-n",
            n,
            "route",
            "add",
            &format!("10.245.{o}.0/24"),
            "via",
            &gw,
            "dev",
            "flannel.1",
            "onlink",
        ])?;
    }
    Ok((
        Pair {
            client: pods[0].0.clone(),
            server: pods[1].0.clone(),
            addr: pods[1].1,
        },
        Pair {
            client: pods[0].0.clone(),
            server: pods[2].0.clone(),
            addr: pods[2].1,
        },
    ))
}

/// Ours: a lab in `mode`, two pods per node, with the uplink's XDP program
/// attached as `xdp` says (`off`, or `generic`: on a veth, native XDP
/// takes GSO from its peer).
fn ours(mode: &str, xdp: &str) -> Result<(Lab, Pair, Pair)> {
    let mut spec = LabSpec::new(2, 2)?;
    spec.mode = mode.into();
    spec.xdp = xdp.into();
    let lab = Lab::up(&spec)?;
    let pod = |name: &str| lab.pod(name).clone();
    let (a, b, c) = (pod("pod-0-0"), pod("pod-0-1"), pod("pod-1-0"));
    let same = Pair {
        client: a.netns.clone(),
        server: b.netns,
        addr: b.ip,
    };
    let cross = Pair {
        client: a.netns,
        server: c.netns,
        addr: c.ip,
    };
    Ok((lab, same, cross))
}

/// One measurement of a pair.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sample {
    pub gbps_1: f64,
    /// CPU seconds (all CPUs, every context: the lab's senders, receivers
    /// and softirqs share them) per GB received, over the 1-stream run.
    pub cpu_s_per_gb: f64,
    /// Ours: each program's (ns, runs) per GB over the same run.
    pub programs: ProgramStats,
    pub gbps_2: f64,
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
    pub conn_per_s: f64,
}

/// The machine's busy CPU time so far, in seconds (`/proc/stat`: every
/// state but idle and iowait).
fn busy_cpu_s() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let busy: u64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(busy as f64 / hz)
}

/// The kernel's run-time statistics (ns, runs) of the programs of one
/// lab's datapath, by program name, summed over its nodes: the programs
/// that use a map pinned in one of `pin_dirs`. Counted while an
/// [`aya::sys::enable_stats`] descriptor is open.
pub(super) type ProgramStats = BTreeMap<String, (u64, u64)>;

pub(super) fn program_stats(pin_dirs: &[PathBuf]) -> Result<ProgramStats> {
    let mut maps = BTreeSet::new();
    for dir in pin_dirs {
        for e in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
            // Maps only: links and other pins are not maps.
            if let Ok(info) = aya::maps::MapInfo::from_pin(e?.path()) {
                maps.insert(info.id());
            }
        }
    }
    let mut stats = ProgramStats::new();
    // A program unloaded while this walks the list (another lab's) is
    // skipped, not an error.
    for p in aya::programs::loaded_programs().flatten() {
        let ours = p
            .map_ids()
            .ok()
            .flatten()
            .unwrap_or_default()
            .iter()
            .any(|id| maps.contains(id));
        if ours {
            let name = p.name_as_str().unwrap_or("?").to_owned();
            let e = stats.entry(name).or_default();
            e.0 += p.run_time().as_nanos() as u64;
            e.1 += p.run_count();
        }
    }
    Ok(stats)
}

/// What each program did between two [`program_stats`].
fn stats_delta(before: &ProgramStats, after: &ProgramStats) -> ProgramStats {
    after
        .iter()
        .map(|(name, (ns, runs))| {
            let (ns0, runs0) = before.get(name).copied().unwrap_or_default();
            (name.clone(), (ns - ns0, runs - runs0))
        })
        .filter(|(_, (_, runs))| *runs > 0)
        .collect()
}

/// iperf3 from the client to the server: Gbit/s, CPU seconds per GB, and
/// what the programs of the datapath pinned in `pins` did per GB.
fn iperf(
    pair: &Pair,
    streams: u32,
    seconds: u32,
    pins: &[PathBuf],
) -> Result<(f64, f64, ProgramStats)> {
    const PORT: &str = "5301";
    let mut server: Child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pair.server,
            "iperf3",
            "-s",
            "-1",
            "-p",
            PORT,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 server")?;
    let result = (|| -> Result<(f64, f64, ProgramStats)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let progs = program_stats(pins)?;
            let cpu = busy_cpu_s()?;
            let out = Command::new("ip")
                .args(["netns", "exec", &pair.client, "iperf3", "-c"])
                .arg(pair.addr.to_string())
                .args([
                    "-p",
                    PORT,
                    "-J",
                    "-t",
                    &seconds.to_string(),
                    "-P",
                    &streams.to_string(),
                ])
                .output()?;
            let cpu = busy_cpu_s()? - cpu;
            let progs = stats_delta(&progs, &program_stats(pins)?);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let received = &v["end"]["sum_received"];
            if let (Some(bps), Some(bytes)) = (
                received["bits_per_second"].as_f64(),
                received["bytes"].as_f64(),
            ) {
                let gb = bytes / 1e9;
                let per_gb = progs
                    .into_iter()
                    .map(|(name, (ns, runs))| {
                        (name, ((ns as f64 / gb) as u64, (runs as f64 / gb) as u64))
                    })
                    .collect();
                return Ok((bps / 1e9, cpu / gb, per_gb));
            }
            // The server not listening yet.
            if Instant::now() > deadline {
                bail!(
                    "iperf3 to {}: {}",
                    pair.addr,
                    v["error"].as_str().unwrap_or("no result")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

/// A 1-byte echo server on `port` in the server's namespace, serving
/// connections one after another until `stop`.
fn echo_server(pair: &Pair, port: u16, stop: &AtomicBool) -> Result<()> {
    in_netns_thread(&pair.server, || -> Result<()> {
        let l = TcpListener::bind(("0.0.0.0", port))?;
        super::accept_until(&l, stop, |mut s| {
            let _ = s.set_nodelay(true);
            let mut b = [0u8; 1];
            while let Ok(1) = s.read(&mut b) {
                if s.write_all(&b).is_err() {
                    break;
                }
            }
        })
    })?
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// A client opening thousands of connections a second to one address
/// would run out of ports to TIME_WAIT: it may reuse them (timestamps
/// tell old segments apart), from the widest range.
pub(super) fn crr_client_sysctls(netns: &str) -> Result<()> {
    sysctl(netns, "net.ipv4.tcp_tw_reuse", "1")?;
    sysctl(netns, "net.ipv4.ip_local_port_range", "1024 65000")
}

/// Request/response on one connection: (p50, p99) in µs; then new
/// connections per second for `seconds`.
fn rr_and_crr(pair: &Pair, plan: Plan) -> Result<(f64, f64, f64)> {
    const PORT: u16 = 5302;
    crr_client_sysctls(&pair.client)?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let server = s.spawn(|| echo_server(pair, PORT, &stop));
        let to = SocketAddr::from((pair.addr, PORT));
        let r = in_netns_thread(&pair.client, || -> Result<(f64, f64, f64)> {
            let connect = || -> Result<TcpStream> {
                let deadline = Instant::now() + Duration::from_secs(3);
                loop {
                    match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                        Ok(c) => return Ok(c),
                        Err(_) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Err(e) => return Err(e).context("connecting"),
                    }
                }
            };
            let mut c = connect()?;
            c.set_nodelay(true)?;
            let mut lat = Vec::with_capacity(plan.transactions);
            let mut b = [0u8; 1];
            for _ in 0..plan.transactions {
                let t = Instant::now();
                c.write_all(&[7])?;
                c.read_exact(&mut b)?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            drop(c);
            lat.sort_by(f64::total_cmp);
            let started = Instant::now();
            let until = started + Duration::from_secs(u64::from(plan.seconds));
            let mut n = 0u64;
            while Instant::now() < until {
                let mut c = connect()?;
                c.set_nodelay(true)?;
                c.write_all(&[7])?;
                c.read_exact(&mut b)?;
                n += 1;
            }
            Ok((
                percentile(&lat, 0.50),
                percentile(&lat, 0.99),
                n as f64 / started.elapsed().as_secs_f64(),
            ))
        });
        stop.store(true, Ordering::Relaxed);
        let served = server
            .join()
            .map_err(|_| anyhow::anyhow!("echo server panicked"));
        let r = r??;
        served??;
        Ok(r)
    })
}

fn sample(pair: &Pair, plan: Plan, pins: &[PathBuf]) -> Result<Sample> {
    let (rr_p50_us, rr_p99_us, conn_per_s) = rr_and_crr(pair, plan)?;
    let (gbps_1, cpu_s_per_gb, programs) = iperf(pair, 1, plan.seconds, pins)?;
    Ok(Sample {
        gbps_1,
        cpu_s_per_gb,
        programs,
        gbps_2: iperf(pair, 2, plan.seconds, pins)?.0,
        rr_p50_us,
        rr_p99_us,
        conn_per_s,
    })
}

/// A configuration's samples, same node and across nodes.
pub(crate) struct Row {
    pub name: &'static str,
    /// Ours: the lab's pin directories (its programs' statistics).
    pub pins: Vec<PathBuf>,
    pub same: Vec<Sample>,
    pub cross: Vec<Sample>,
}

/// Measures every configuration `plan.reps` times, rounds interleaved
/// (a drift of the machine spreads over all of them).
pub(crate) fn measure(plan: Plan) -> Result<(Vec<Row>, Profiles)> {
    crate::testing::apt_install_missing(&[("iperf3", "iperf3")])?;
    // Per-program run times while this descriptor is open (closed, also
    // on a panic, when it drops).
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("BPF_ENABLE_STATS (run-time statistics)")?;
    let mut topo = Topology::default();
    let (veth, n2n) = limit(&mut topo)?;
    let (fl_same, fl_cross) = flannel(&mut topo)?;
    let (vx_lab, vx_same, vx_cross) = ours("vxlan", "off")?;
    let (nat_lab, nat_same, nat_cross) = ours("native", "off")?;
    let (gen_lab, gen_same, gen_cross) = ours("vxlan", "generic")?;
    let pins =
        |lab: &Lab| -> Vec<PathBuf> { lab.state.nodes.iter().map(|n| n.pin_dir.clone()).collect() };
    let configs: Vec<(&'static str, Vec<PathBuf>, Pair, Pair)> = vec![
        (LIMIT, Vec::new(), veth, n2n),
        (FLANNEL, Vec::new(), fl_same, fl_cross),
        (VXLAN, pins(&vx_lab), vx_same, vx_cross),
        (NATIVE, pins(&nat_lab), nat_same, nat_cross),
        (GENERIC, pins(&gen_lab), gen_same, gen_cross),
    ];
    let mut rows: Vec<Row> = configs
        .iter()
        .map(|(name, pins, ..)| Row {
            name,
            pins: pins.clone(),
            same: Vec::new(),
            cross: Vec::new(),
        })
        .collect();
    let profiles = if plan.profile {
        let pick = |name: &str| {
            configs
                .iter()
                .find(|c| c.0 == name)
                .map(|c| (c.0, c.3.clone()))
        };
        let picked: Vec<_> = [FLANNEL, VXLAN, GENERIC]
            .iter()
            .filter_map(|n| pick(n))
            .collect();
        profiles(&picked, plan.seconds)?
    } else {
        Vec::new()
    };
    for _ in 0..plan.reps {
        for (row, (name, pins, same, cross)) in rows.iter_mut().zip(&configs) {
            row.same
                .push(sample(same, plan, pins).with_context(|| format!("{name}, same node"))?);
            row.cross
                .push(sample(cross, plan, pins).with_context(|| format!("{name}, across nodes"))?);
        }
    }
    Ok((rows, profiles))
}

/// The configurations' names.
const LIMIT: &str = "limit (veth; node to node)";
const FLANNEL: &str = "Flannel-style VXLAN";
const VXLAN: &str = "dataplane VXLAN";
const NATIVE: &str = "dataplane native";
const GENERIC: &str = "dataplane VXLAN, generic XDP on the uplink";

/// `perf record` of the whole machine (software clock, every CPU) during
/// a 1-stream iperf3 across `pair`: the symbols with at least 0.1 % of
/// the samples, largest first, as (percent of the busy samples, symbol),
/// the idle loop left out.
fn profile(pair: &Pair, seconds: u32) -> Result<Vec<(f64, String)>> {
    let data = std::env::temp_dir().join(format!("dataplane-bench-{}.perf", std::process::id()));
    let mut rec = Command::new("perf")
        .args(["record", "-a", "-q", "-F", "1999", "-o"])
        .arg(&data)
        .args(["--", "sleep", &seconds.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("perf record")?;
    let ran = iperf(pair, 1, seconds, &[]);
    let recorded = rec.wait();
    let report = (|| -> Result<String> {
        ran?;
        if !recorded?.success() {
            bail!("perf record failed");
        }
        output(
            Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "-q",
                    "--sort",
                    "sym",
                    "--percent-limit",
                    "0.1",
                    "-i",
                ])
                .arg(&data),
        )
    })();
    let _ = std::fs::remove_file(&data);
    let all: Vec<(f64, String)> = report?
        .lines()
        .filter_map(|l| {
            let (pct, sym) = l.trim().split_once('%')?;
            Some((pct.trim().parse().ok()?, sym.trim().to_owned()))
        })
        .collect();
    let idle =
        |s: &str| s.contains("safe_halt") || s.contains("cpu_idle") || s.contains("default_idle");
    let busy: f64 = 100.0
        - all
            .iter()
            .filter(|(_, s)| idle(s))
            .map(|(p, _)| p)
            .sum::<f64>();
    Ok(all
        .into_iter()
        .filter(|(_, s)| !idle(s))
        .map(|(p, s)| (p / busy.max(1.0) * 100.0, s))
        .collect())
}

/// The profiles of a run, by configuration (across nodes).
pub(crate) type Profiles = Vec<(&'static str, Vec<(f64, String)>)>;

/// Profiles our VXLAN and Flannel-style across nodes (with `perf`
/// installed on the way; without it, the report says so).
fn profiles(rows: &[(&'static str, Pair)], seconds: u32) -> Result<Profiles> {
    crate::testing::apt_install_missing(&[("perf", "linux-perf")])?;
    rows.iter()
        .map(|(name, pair)| Ok((*name, profile(pair, seconds)?)))
        .collect()
}

fn profile_report(profiles: &Profiles) -> String {
    let mut r = String::from(
        "\n### Where the CPU goes across nodes (`perf record -a`, 1-stream iperf3)\n\n\
         Every CPU's samples (software clock) during the transfer, the idle loop left out: shares of the busy time. `[k]` is the kernel, `[.]` user space; our programs show as `bpf_prog_<tag>_<name>`.\n\n",
    );
    for (name, top) in profiles {
        let _ = writeln!(r, "**{name}**:\n\n| share of busy | symbol |\n|---|---|");
        for (pct, sym) in top.iter().take(12) {
            let _ = writeln!(r, "| {pct:.1} % | `{sym}` |");
        }
        let ours: f64 = top
            .iter()
            .filter(|(_, s)| s.contains("bpf_prog_"))
            .map(|(p, _)| p)
            .fold(0.0, |a, b| a + b);
        let _ = writeln!(
            r,
            "\nLargest: `{}`; our programs' own code together: {ours:.1} % (helpers and maps they call count under the kernel's symbols).\n",
            top.first().map_or("–", |(_, s)| s.as_str())
        );
    }
    r
}

/// Median and (min, max) of one figure over samples.
fn spread(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> (f64, f64, f64) {
    let mut v: Vec<f64> = samples.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    (super::median(v.clone()), v[0], v[v.len() - 1])
}

fn cell(samples: &[Sample], f: impl Fn(&Sample) -> f64, digits: usize) -> String {
    let (m, lo, hi) = spread(samples, f);
    if m.is_nan() {
        return "–".into();
    }
    format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
}

pub(super) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = output(Command::new("uname").arg("-r")).unwrap_or_default();
    let iperf = output(Command::new("iperf3").arg("--version")).unwrap_or_default();
    format!(
        "{cpu}, {cores} cores; Linux {}; {}",
        kernel.trim(),
        iperf.lines().next().unwrap_or("iperf3").trim()
    )
}

/// The report: absolute figures with their spread, then the ratios to the
/// baselines of this run against the goals.
pub(crate) fn report(rows: &[Row], plan: Plan) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "\n## Side by side\n\nEach figure: median (min–max) of {} repetition(s), rounds interleaved; iperf3 runs {} s, request/response {} transactions of 1 byte on one connection, connections per second over {} s (connect, 1 byte each way, close). CPU s per GB: the whole machine's busy time (every CPU, every context) during the 1-stream run, per GB received. Ours runs without its uplink XDP program except in the row that says so: on a NIC, XDP runs before an skb exists, but on a veth it is either generic, which copies each GSO packet to make it linear, or native, which turns off the peer's GSO.\n",
        plan.reps, plan.seconds, plan.transactions, plan.seconds
    );
    for (title, cross) in [("Same node", false), ("Across nodes", true)] {
        let _ = writeln!(
            r,
            "### {title}\n\n| configuration | TCP Gbit/s, 1 stream | 2 streams | CPU s per GB (1 stream) | RR p50 µs | RR p99 µs | connections/s |\n|---|---|---|---|---|---|---|"
        );
        for row in rows {
            let s = if cross { &row.cross } else { &row.same };
            let _ = writeln!(
                r,
                "| {} | {} | {} | {} | {} | {} | {} |",
                row.name,
                cell(s, |x| x.gbps_1, 2),
                cell(s, |x| x.gbps_2, 2),
                cell(s, |x| x.cpu_s_per_gb, 3),
                cell(s, |x| x.rr_p50_us, 1),
                cell(s, |x| x.rr_p99_us, 1),
                cell(s, |x| x.conn_per_s, 0),
            );
        }
        r.push('\n');
    }
    let med = |name: &str, cross: bool, f: fn(&Sample) -> f64| {
        rows.iter()
            .find(|row| row.name == name)
            .map_or(f64::NAN, |row| {
                spread(if cross { &row.cross } else { &row.same }, f).0
            })
    };
    let (lim, fl, vx, nat) = (LIMIT, FLANNEL, VXLAN, NATIVE);
    let gb: fn(&Sample) -> f64 = |x| x.gbps_1;
    let conn: fn(&Sample) -> f64 = |x| x.conn_per_s;
    let p50: fn(&Sample) -> f64 = |x| x.rr_p50_us;
    let goals: Vec<(String, f64, f64)> = vec![
        (
            "across nodes, throughput: dataplane VXLAN vs Flannel-style (goal ≥ 1.2×)".into(),
            med(vx, true, gb) / med(fl, true, gb),
            1.2,
        ),
        (
            "across nodes, connections/s: dataplane VXLAN vs Flannel-style (goal ≥ 1.2×)".into(),
            med(vx, true, conn) / med(fl, true, conn),
            1.2,
        ),
        (
            "native routing vs node to node, throughput (goal ≥ 0.9×)".into(),
            med(nat, true, gb) / med(lim, true, gb),
            0.9,
        ),
        (
            "same node vs the plain veth pair, throughput (goal ≥ 0.95×)".into(),
            med(vx, false, gb) / med(lim, false, gb),
            0.95,
        ),
        (
            "Flannel-style across nodes vs node to node, throughput (reference: 0.61× measured before)".into(),
            med(fl, true, gb) / med(lim, true, gb),
            0.0,
        ),
    ];
    let _ = writeln!(r, "### Ratios to this run's baselines\n");
    for (what, ratio, goal) in goals {
        let verdict = if goal == 0.0 {
            "reported".to_owned()
        } else if ratio >= goal {
            "meets".to_owned()
        } else {
            format!("MISSES by {:.0} %", (goal - ratio) / goal * 100.0)
        };
        let _ = writeln!(r, "- {what}: **{ratio:.2}×** ({verdict})");
    }
    let rr = med(vx, true, p50) / med(fl, true, p50);
    let _ = writeln!(
        r,
        "- request/response p50 across nodes: dataplane VXLAN {:.1} µs vs Flannel-style {:.1} µs ({rr:.2}×; goal: below)",
        med(vx, true, p50),
        med(fl, true, p50)
    );
    r.push_str(&program_costs(rows));
    r
}

/// Where our programs' time goes in the 1-stream runs: the kernel's
/// run-time statistics per GB received, against all the CPU time the
/// transfer took.
fn program_costs(rows: &[Row]) -> String {
    let mut r = String::from(
        "\n### Our programs under load (1-stream iperf3; the kernel's run-time statistics)\n\n\
         Runs per GB received (a run may be a GSO super-packet of up to 64 KB), time per run, and that time per GB against all the CPU time per GB of the same run (the rest is the kernel stack, the VXLAN device, copies and iperf3 itself). Means over the repetitions.\n\n\
         | configuration | program | runs per GB | ns per run | CPU ms per GB | share of all CPU |\n|---|---|---|---|---|---|\n",
    );
    for row in rows.iter().filter(|r| !r.pins.is_empty()) {
        for (place, samples) in [("same node", &row.same), ("across nodes", &row.cross)] {
            let n = samples.len().max(1) as f64;
            let mut sum: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
            for s in samples {
                for (name, (ns, runs)) in &s.programs {
                    let e = sum.entry(name).or_default();
                    e.0 += *ns as f64 / n;
                    e.1 += *runs as f64 / n;
                }
            }
            let cpu = samples.iter().map(|s| s.cpu_s_per_gb).sum::<f64>() / n;
            for (name, (ns, runs)) in sum {
                let _ = writeln!(
                    r,
                    "| {} ({place}) | {name} | {runs:.0} | {:.0} | {:.1} | {:.1} % |",
                    row.name,
                    ns / runs.max(1.0),
                    ns / 1e6,
                    ns / 1e9 / cpu * 100.0
                );
            }
        }
    }
    r
}

/// Runs the comparison: its report sections (printed as well), and the
/// plots written into `dir`.
pub(crate) fn bench(plan: Plan, dir: &std::path::Path) -> Result<(String, Vec<PathBuf>)> {
    let (rows, profiles) = measure(plan)?;
    for row in &rows {
        if row.cross.len() != plan.reps {
            bail!("{}: {} samples of {}", row.name, row.cross.len(), plan.reps);
        }
    }
    let mut text = report(&rows, plan);
    if !profiles.is_empty() {
        text.push_str(&profile_report(&profiles));
    }
    let services = super::kubeproxy::measure(plan)?;
    text.push_str(&super::kubeproxy::report(&services));
    let service_plot = dir.join("services.svg");
    super::kubeproxy::plot(&services, &service_plot)?;
    let plots: Vec<PathBuf> = plots(&rows, dir)?
        .into_iter()
        .chain([service_plot])
        .collect();
    print!("\n{text}");
    Ok((text, plots))
}

/// A grouped bar chart: one group per configuration, one bar per series,
/// each with its value above it.
pub(super) fn bar_chart(
    path: &std::path::Path,
    title: &str,
    unit: &str,
    configs: &[&str],
    series: &[(&str, Vec<f64>)],
) -> Result<()> {
    use plotters::prelude::*;
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        * 1.2;
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..configs.len() as f64, 0f64..top.max(1e-9))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let names: Vec<String> = configs.iter().map(|c| c.to_string()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(configs.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 1e-6 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(unit)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let palette = [BLUE, RED, GREEN, MAGENTA];
    let width = 0.8 / series.len() as f64;
    for (k, (name, values)) in series.iter().enumerate() {
        let color = palette[k % palette.len()];
        chart
            .draw_series(
                values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(i, v)| {
                        let x0 = i as f64 + 0.1 + k as f64 * width;
                        Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *v)], color.filled())
                    }),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        chart
            .draw_series(
                values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(i, v)| {
                        let x0 = i as f64 + 0.1 + k as f64 * width;
                        Text::new(format!("{v:.2}"), (x0, *v + top * 0.02), ("sans-serif", 12))
                    }),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// The report's plots, next to it: throughput and request/response
/// latency per configuration.
fn plots(rows: &[Row], dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let configs: Vec<&str> = rows.iter().map(|r| r.name).collect();
    let med = |s: &[Sample], f: fn(&Sample) -> f64| spread(s, f).0;
    let col = |cross: bool, f: fn(&Sample) -> f64| -> Vec<f64> {
        rows.iter()
            .map(|r| med(if cross { &r.cross } else { &r.same }, f))
            .collect()
    };
    // (file, title, unit, the figure)
    type Chart = (&'static str, &'static str, &'static str, fn(&Sample) -> f64);
    let charts: [Chart; 3] = [
        (
            "throughput.svg",
            "TCP throughput, 1 stream (median)",
            "Gbit/s",
            |x| x.gbps_1,
        ),
        (
            "latency.svg",
            "Request/response, 1 byte each way (median p50)",
            "µs",
            |x| x.rr_p50_us,
        ),
        (
            "connections.svg",
            "New connections per second (median)",
            "connections/s",
            |x| x.conn_per_s,
        ),
    ];
    let mut paths = Vec::new();
    for (file, title, unit, f) in charts {
        let path = dir.join(file);
        bar_chart(
            &path,
            title,
            unit,
            &configs,
            &[("same node", col(false, f)), ("across nodes", col(true, f))],
        )?;
        paths.push(path);
    }
    Ok(paths)
}
