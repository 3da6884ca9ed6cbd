//! `cargo xtask bench`, with release binaries: Services and NetworkPolicy
//! (their own modules), then the agent's control-plane numbers for both
//! sources. A single change's latency is measured on an empty cluster and
//! again after loading 10,000 pods, 5,000 Services and 1,000
//! NetworkPolicies, in the same run: the ratio says whether it stays flat.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lab::{Lab, LabSpec};

use crate::testing::prepare_lab_with;
use crate::toolchain::{cache_dir, cargo_with_linker, output};

/// A line of a section: printed as it is measured, and kept for the
/// report.
macro_rules! say {
    ($out:expr, $($t:tt)*) => {{
        let line = format!($($t)*);
        println!("{line}");
        $out.push_str(&line);
        $out.push('\n');
    }};
}

mod compare;
mod kubeproxy;
mod policy;
mod programs;
mod services;
mod xdp;

/// Single changes timed per phase.
const CHANGES: u32 = 200;

const PARTS: [&str; 6] = [
    "compare",
    "programs",
    "services",
    "xdp",
    "policy",
    "control-plane",
];

pub(crate) fn bench(only: Option<&str>, quick: bool, smoke: bool) -> Result<()> {
    if only.is_some_and(|o| !PARTS.contains(&o)) {
        bail!("cargo xtask bench [--quick] [--only {}]", PARTS.join("|"));
    }
    if smoke {
        prepare_lab_with(false)?;
        return self::smoke();
    }
    let started = Instant::now();
    prepare_lab_with(true)?;
    let dir = crate::workspace_root().join("target").join("bench");
    std::fs::create_dir_all(&dir)?;
    let mut report = Report::new(
        match (quick, only) {
            (_, Some(o)) => format!("cargo xtask bench --only {o}"),
            (true, None) => "cargo xtask bench --quick".into(),
            (false, None) => "cargo xtask bench".into(),
        },
        "release",
    );
    // --quick: the side by side alone, shorter.
    let run = |part: &str| match only {
        Some(o) => o == part,
        None => !quick || part == "compare",
    };
    if run("compare") {
        let plan = if quick {
            compare::Plan::QUICK
        } else {
            compare::Plan::FULL
        };
        let (text, plots) = compare::bench(plan, &dir)?;
        report.text.push_str(&text);
        report.plots.extend(plots);
    }
    if run("programs") {
        let figures = programs::measure()?;
        let text = programs::report(&figures);
        print!("\n{text}");
        report.text.push_str(&text);
        let plot = dir.join("programs.svg");
        programs::plot(&figures, &plot)?;
        report.plots.push(plot);
    }
    // Sections whose figures are lines of text, kept as printed.
    type Part = (&'static str, &'static str, fn() -> Result<String>);
    let parts: [Part; 4] = [
        ("services", "Services in detail", services::bench),
        ("xdp", "XDP NodePort", xdp::bench),
        ("policy", "NetworkPolicy", policy::bench),
        ("control-plane", "The agent's control plane", control_plane),
    ];
    for (part, title, f) in parts {
        if run(part) {
            println!();
            let text = f()?;
            let _ = write!(report.text, "\n## {title}\n\n```text\n{text}```\n");
        }
    }
    let path = report.write(&dir, started.elapsed())?;
    eprintln!("xtask: report written to {}", path.display());
    Ok(())
}

/// `target/bench/report.md`: the machine, then the sections that ran,
/// then the plots.
struct Report {
    text: String,
    plots: Vec<std::path::PathBuf>,
    /// The command that made it, and its build profile.
    command: String,
    build: &'static str,
}

impl Report {
    fn new(command: String, build: &'static str) -> Self {
        Report {
            text: String::new(),
            plots: Vec::new(),
            command,
            build,
        }
    }

    fn write(&self, dir: &std::path::Path, took: Duration) -> Result<std::path::PathBuf> {
        let mut r = format!(
            "# dataplane benchmarks\n\nMachine: {}. `{}`, {} build, {:.1} minutes (the build included).\n",
            compare::machine(),
            self.command,
            self.build,
            took.as_secs_f64() / 60.0
        );
        r.push_str(&self.text);
        if !self.plots.is_empty() {
            r.push_str("\n## Plots\n\n");
            for p in &self.plots {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let _ = writeln!(r, "![{name}]({name})\n");
            }
        }
        let path = dir.join("report.md");
        std::fs::write(&path, r)?;
        Ok(path)
    }
}

/// The agent's control-plane numbers, for both sources.
fn control_plane() -> Result<String> {
    let mut out = String::new();
    let mut rows = Vec::new();
    for source in ["dir", "kube"] {
        rows.push(bench_source(source)?);
    }
    say!(
        out,
        "== agent control plane, release build; a single Pod change, timed from publish to its entry in dp_endpoints"
    );
    say!(
        out,
        "   (goals: p99 under 100 ms and flat (p50 at scale within 2x of empty), full sync under 5 s, RSS under 150 MiB)"
    );
    say!(
        out,
        "{:<6} {:>19} {:>23} {:>9} {:>12} {:>9}   verdict",
        "source",
        "empty p50/p99 ms",
        "at scale p50/p99 ms",
        "p50 x",
        "full sync s",
        "RSS MiB"
    );
    for r in &rows {
        let ratio = r.scale.p50 / r.empty.p50;
        let ok = r.scale.p99 < 100.0 && ratio < 2.0 && r.sync < 5.0 && r.rss < 150.0;
        say!(
            out,
            "{:<6} {:>9.1} / {:>7.1} {:>11.1} / {:>9.1} {:>9.2} {:>12.2} {:>9.1}   {}",
            r.source,
            r.empty.p50,
            r.empty.p99,
            r.scale.p50,
            r.scale.p99,
            ratio,
            r.sync,
            r.rss,
            verdict(ok)
        );
    }
    say!(
        out,
        "(scale: 10,000 pods on 40 nodes, 5,000 Services, 1,000 NetworkPolicies, published at once; full sync is timed"
    );
    say!(
        out,
        " until every pod entry is in the map and /metrics counts every object)"
    );
    Ok(out)
}

/// The bench harness itself: every configuration of the comparison up,
/// one short measurement of each, the report and plots written (into
/// `target/bench/smoke/`: a real run's stay).
pub(crate) fn smoke() -> Result<()> {
    let started = Instant::now();
    let dir = crate::workspace_root()
        .join("target")
        .join("bench")
        .join("smoke");
    std::fs::create_dir_all(&dir)?;
    let (text, plots) = compare::bench(compare::Plan::SMOKE, &dir)?;
    let mut report = Report::new("cargo xtask bench --smoke".into(), "debug");
    report.text = text;
    report.plots = plots;
    let path = report.write(&dir, started.elapsed())?;
    eprintln!(
        "xtask: bench harness smoke run in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}

struct Latency {
    p50: f64,
    p99: f64,
}

fn percentiles(mut lat: Vec<f64>) -> Latency {
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Latency {
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

/// The middle value; of an even count, the mean of the middle two (of
/// two repetitions: their mean, not the larger).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

/// Runs the ignored TEST_RUN benchmark `name` of the golden test file
/// `test` in release and parses its `<tag> key=value ...` line.
fn golden_bench(test: &str, name: &str, tag: &str) -> Result<BTreeMap<String, f64>> {
    let bin = cache_dir()?.join("bin");
    let out = output(cargo_with_linker(&bin)?.args([
        "test",
        "--release",
        "-p",
        "dataplane",
        "--test",
        test,
        "--",
        "--ignored",
        "--nocapture",
        "--exact",
        name,
    ]))?;
    let line = out
        .lines()
        .find(|l| l.starts_with(tag))
        .with_context(|| format!("no {tag} line in:\n{out}"))?;
    line.split_whitespace()
        .skip(tag.split_whitespace().count())
        .map(|kv| {
            let (k, v) = kv.split_once('=').context("key=value")?;
            Ok((k.to_owned(), v.parse()?))
        })
        .collect()
}

/// Accepts connections on `l` until `stop`, handing each to `serve`.
/// accept() blocks (a connection is taken the moment it is queued; a
/// polling loop's sleep would be part of every figure that opens
/// connections) and wakes every 50 ms to look at `stop`.
fn accept_until(
    l: &std::net::TcpListener,
    stop: &std::sync::atomic::AtomicBool,
    mut serve: impl FnMut(std::net::TcpStream),
) -> Result<()> {
    use std::io::ErrorKind;
    // Linux honours SO_RCVTIMEO in accept().
    socket2::SockRef::from(l).set_read_timeout(Some(Duration::from_millis(50)))?;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                // Accepted sockets inherit the listener's timeout.
                s.set_read_timeout(None)?;
                serve(s);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            // A connection reset while queued, and the like: the next one.
            Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
            Err(e) => return Err(e).context("accept"),
        }
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "meets" } else { "MISSES" }
}

struct BenchRow {
    source: &'static str,
    empty: Latency,
    scale: Latency,
    sync: f64,
    rss: f64,
}

fn bench_source(source: &'static str) -> Result<BenchRow> {
    use aya::maps::{HashMap, Map, MapData};
    use dataplane_common::{EndpointInfo, EndpointKey, MAP_ENDPOINTS, MapSpec};

    let lab = Lab::up(&LabSpec {
        source: source.into(),
        ..LabSpec::new(1, 0)?
    })?;
    let node = lab.state.nodes[0].clone();
    let spec = MapSpec::by_name(MAP_ENDPOINTS).context("contract")?;
    let map_path = node.pin_dir.join(spec.pin_name());
    let open = || -> Result<HashMap<MapData, EndpointKey, EndpointInfo>> {
        Ok(HashMap::try_from(Map::from_map_data(MapData::from_pin(
            &map_path,
        )?)?)?)
    };
    let map = open()?;
    // One object: a manifest file of its own, or an API object.
    let publish = |file: &str, objects: Vec<serde_json::Value>| -> Result<()> {
        match &lab.api {
            Some(api) => objects.into_iter().try_for_each(|o| api.apply(o)),
            None => {
                let docs: Vec<String> = objects.iter().map(ToString::to_string).collect();
                lab.write_manifest(file, &docs.join("\n---\n"))
            }
        }
    };
    let pod = |name: &str, node: &str, ip: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "bench"},
            "spec": {"nodeName": node, "containers": []}, "status": {"podIPs": [{"ip": ip}]}})
    };
    let latency = |from: u32| -> Result<Latency> {
        let mut lat = Vec::new();
        for i in from..from + CHANGES {
            let ip: IpAddr = format!("10.250.{}.{}", i / 250, i % 250 + 1).parse()?;
            let key = EndpointKey::from(ip);
            let started = Instant::now();
            publish(
                &format!("lat-{i}.yaml"),
                vec![pod(&format!("lat-{i}"), "elsewhere", &ip.to_string())],
            )?;
            while map.get(&key, 0).is_err() {
                if started.elapsed() > Duration::from_secs(5) {
                    bail!("{source}: change {i} not applied after 5 s");
                }
                std::hint::spin_loop();
            }
            lat.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(percentiles(lat))
    };

    let empty = latency(0)?;

    let mut nodes = Vec::new();
    let mut pods = Vec::new();
    for n in 1..=40u32 {
        let cidr = format!("10.244.{n}.0/24");
        nodes.push(serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("bench-{n}")},
            "spec": {"podCIDR": cidr}, "status": {"addresses": [{"type": "InternalIP", "address": format!("172.21.0.{n}")}]}}));
        for p in 1..=250u32 {
            pods.push(pod(
                &format!("p-{n}-{p}"),
                &format!("bench-{n}"),
                &format!("10.244.{n}.{p}"),
            ));
        }
    }
    let services: Vec<serde_json::Value> = (0..5000u32)
        .map(|i| serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("s{i}"), "namespace": "bench"},
            "spec": {"clusterIPs": [format!("10.96.{}.{}", i / 250, i % 250 + 1)], "selector": {"app": format!("a{i}")}}}))
        .collect();
    let policies: Vec<serde_json::Value> = (0..1000u32)
        .map(|i| serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": format!("np{i}"), "namespace": "bench"},
            "spec": {"podSelector": {"matchLabels": {"app": format!("a{i}")}}, "ingress": [{"from": [{"podSelector": {}}]}]}}))
        .collect();
    let started = Instant::now();
    publish("sync-nodes.yaml", nodes)?;
    for (i, chunk) in pods.chunks(1000).enumerate() {
        publish(&format!("sync-pods-{i}.yaml"), chunk.to_vec())?;
    }
    publish("sync-services.yaml", services)?;
    publish("sync-policies.yaml", policies)?;
    let target = 10_000 + CHANGES as usize;
    let metrics_addr = std::net::SocketAddr::from(([127, 0, 0, 1], 9963));
    loop {
        if open()?.keys().count() >= target {
            let (_, body) = lab::http_get(&node.netns, metrics_addr, "/metrics")?;
            if body.contains("dataplane_objects{kind=\"Service\"} 5000")
                && body.contains("dataplane_objects{kind=\"NetworkPolicy\"} 1000")
            {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("{source}: full sync not done after 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sync = started.elapsed().as_secs_f64();

    let scale = latency(CHANGES)?;

    let pid = node.agent_pid.context("agent pid")?;
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok(BenchRow {
        source,
        empty,
        scale,
        sync,
        rss: rss_kib as f64 / 1024.0,
    })
}
