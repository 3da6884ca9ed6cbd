//! Services side by side: kube-proxy in iptables and in nftables mode, on
//! the Flannel-style topology, against ours, with 1 to 10,000 Services of
//! one port and one endpoint each. kube-proxy's rules are rendered as it
//! renders them (iptables: KUBE-SERVICES → KUBE-SVC-… → KUBE-SEP-… with
//! the masquerade mark; nftables: the `service-ips` verdict map → a chain
//! per Service → a chain per endpoint) and loaded the way it loads them
//! (`iptables-restore --noflush`, `nft -f`), timed; the measured Service
//! is the one the rules reach last. The figure: connect() to the ClusterIP
//! against connect() to the pod address, alternating, in the same rounds.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lab::{Lab, LabSpec};

use super::compare::Plan;
use super::services::{PORT, cluster_ip, connect_times_n, in_cgroup, program, sink_server};

/// One dataplane's figures at one Service count.
#[derive(Clone, Debug)]
pub(crate) struct Point {
    pub services: usize,
    /// Median connect() to the pod and to the ClusterIP, µs.
    pub pod_us: f64,
    pub cip_us: f64,
    /// Loading the whole Service set, s.
    pub program_s: f64,
    /// New connections per second (connect, 1 byte each way, close) to
    /// the pod and to the ClusterIP.
    pub pod_cps: f64,
    pub cip_cps: f64,
}

pub(crate) struct Series {
    pub name: String,
    pub points: Vec<Point>,
}

/// The one endpoint of Service `i` of `n`: the last leads to `backend`,
/// the rest to addresses no one has.
fn endpoint(i: usize, n: usize, backend: Ipv4Addr) -> Ipv4Addr {
    if i + 1 == n {
        backend
    } else {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 246, 0, 0)) + i as u32)
    }
}

/// kube-proxy's iptables rules for `n` Services; Service `n - 1` (the
/// last in KUBE-SERVICES) leads to `backend`, the rest to addresses no one
/// has.
fn iptables_rules(n: usize, backend: Ipv4Addr, pods: &str) -> String {
    let mut r = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..n {
        let _ = writeln!(r, ":KUBE-SVC-{i:016X} - [0:0]\n:KUBE-SEP-{i:016X} - [0:0]");
    }
    for i in 0..n {
        let _ = writeln!(
            r,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"default/s{i}:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-{i:016X}",
            cluster_ip(i)
        );
    }
    for i in 0..n {
        let ep = endpoint(i, n, backend);
        let _ = writeln!(
            r,
            "-A KUBE-SVC-{i:016X} ! -s {pods} -d {}/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ\n\
             -A KUBE-SVC-{i:016X} -m comment --comment \"default/s{i}:http -> {ep}:{PORT}\" -j KUBE-SEP-{i:016X}\n\
             -A KUBE-SEP-{i:016X} -s {ep}/32 -j KUBE-MARK-MASQ\n\
             -A KUBE-SEP-{i:016X} -p tcp -m tcp -j DNAT --to-destination {ep}:{PORT}",
            cluster_ip(i)
        );
    }
    r.push_str("COMMIT\n");
    r
}

/// The chains kube-proxy keeps once (marking and masquerading), and the
/// jumps into KUBE-SERVICES.
const IPTABLES_BASE: &str = "*nat\n\
:KUBE-SERVICES - [0:0]\n\
:KUBE-MARK-MASQ - [0:0]\n\
:KUBE-POSTROUTING - [0:0]\n\
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
-A KUBE-POSTROUTING -j MASQUERADE --random-fully\n\
COMMIT\n";

/// kube-proxy's nftables table for `n` Services (as its nftables mode
/// writes it, with one endpoint each).
fn nft_rules(n: usize, backend: Ipv4Addr, pods: &str) -> String {
    let mut r = String::from(
        "table ip kube-proxy\ndelete table ip kube-proxy\ntable ip kube-proxy {\n\
         \tchain mark-for-masquerade {\n\t\tmark set mark or 0x4000\n\t}\n\
         \tchain masquerading {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmark and 0x4000 == 0 return\n\t\tmark set mark xor 0x4000\n\t\tmasquerade fully-random\n\t}\n\
         \tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n\
         \tchain nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}\n\
         \tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t}\n\
         \tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t}\n",
    );
    for i in 0..n {
        let ep = endpoint(i, n, backend);
        let _ = writeln!(
            r,
            "\tchain service-{i:08x} {{\n\t\tip daddr {cip} tcp dport 80 ip saddr != {pods} jump mark-for-masquerade\n\t\tnumgen random mod 1 vmap {{ 0 : goto endpoint-{i:08x} }}\n\t}}\n\
             \tchain endpoint-{i:08x} {{\n\t\tip saddr {ep} jump mark-for-masquerade\n\t\tmeta l4proto tcp dnat to {ep}:{PORT}\n\t}}",
            cip = cluster_ip(i)
        );
    }
    r.push_str("}\n");
    // The map's elements, in batches as kube-proxy sends them.
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let elems: Vec<String> = chunk
            .iter()
            .map(|i| format!("{} . tcp . 80 : goto service-{i:08x}", cluster_ip(*i)))
            .collect();
        let _ = writeln!(
            r,
            "add element ip kube-proxy service-ips {{ {} }}",
            elems.join(", ")
        );
    }
    r
}

/// Runs `program args` in `netns` with `input` on its stdin; the time it
/// took.
fn load(netns: &str, program: &str, args: &[&str], input: &str) -> Result<Duration> {
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(started.elapsed())
}

/// One kube-proxy mode on a fresh Flannel-style topology: for each count,
/// the rules loaded (timed) and the connect times measured.
fn kube_proxy(mode: &str, plan: Plan) -> Result<Series> {
    let tag = if mode == "iptables" { "i" } else { "n" };
    let mut topo = super::compare::Topology::default();
    let (same, _) = super::compare::flannel_with(&mut topo, tag)?;
    let node = super::compare::flannel_node(tag, 0);
    let pods = "10.245.0.0/16";
    if mode == "iptables" {
        load(&node, "iptables-restore", &["--noflush"], IPTABLES_BASE)?;
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<Series> {
        let server = s.spawn(|| sink_server(&same.server, &stop));
        let r = (|| -> Result<Series> {
            let mut points = Vec::new();
            for &n in plan.services {
                let took = if mode == "iptables" {
                    load(
                        &node,
                        "iptables-restore",
                        &["--noflush"],
                        &iptables_rules(n, same.addr, pods),
                    )?
                } else {
                    load(&node, "nft", &["-f", "-"], &nft_rules(n, same.addr, pods))?
                };
                points.push(point(
                    &same.client,
                    SocketAddr::from((same.addr, PORT)),
                    n,
                    took,
                    plan,
                )?);
            }
            Ok(Series {
                name: format!(
                    "Flannel-style + kube-proxy ({mode}; {})",
                    tool_version(mode)
                ),
                points,
            })
        })();
        stop.store(true, Ordering::Relaxed);
        server
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))??;
        r
    })
}

fn tool_version(mode: &str) -> String {
    let (bin, arg) = if mode == "iptables" {
        ("iptables", "-V")
    } else {
        ("nft", "-v")
    };
    crate::toolchain::output(Command::new(bin).arg(arg))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|_| bin.to_owned())
}

/// One count's figures from `client`'s namespace: connect() and
/// connections per second, to the backend pod and to the ClusterIP that
/// leads to it (the last of `n`).
fn point(client: &str, pod: SocketAddr, n: usize, took: Duration, plan: Plan) -> Result<Point> {
    let cip = SocketAddr::from((cluster_ip(n - 1), 80));
    let (pod_us, cip_us) = connect_times_n(client, pod, cip, plan.connects)?;
    let (pod_cps, cip_cps) = connection_rates(client, pod, cip, plan.seconds)?;
    Ok(Point {
        services: n,
        pod_us,
        cip_us,
        program_s: took.as_secs_f64(),
        pod_cps,
        cip_cps,
    })
}

/// New connections per second to `pod` and to `cip` (connect, 1 byte each
/// way, close with a RST), for about `seconds` each, in alternating
/// rounds.
fn connection_rates(
    netns: &str,
    pod: SocketAddr,
    cip: SocketAddr,
    seconds: u32,
) -> Result<(f64, f64)> {
    use std::io::{Read as _, Write as _};
    super::compare::crr_client_sysctls(netns)?;
    lab::in_netns_thread(netns, || -> Result<(f64, f64)> {
        let once = |to: SocketAddr| -> Result<()> {
            let mut c =
                std::net::TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
            c.set_nodelay(true)?;
            let mut b = [7u8; 1];
            c.write_all(&b)?;
            c.read_exact(&mut b)?;
            // Closed with a RST: no TIME_WAIT on either side. The two
            // targets share the client's ports, and a port in TIME_WAIT
            // makes connect() search (about 10 ms here) or, reused toward
            // a server still in TIME_WAIT, waits for a retransmitted SYN:
            // costs of the client's kernel, not of the dataplanes compared.
            socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO))?;
            Ok(())
        };
        let mut spent = [Duration::ZERO; 2];
        let mut done = [0u64; 2];
        let budget = Duration::from_secs(u64::from(seconds));
        while spent[1] < budget {
            for (k, to) in [pod, cip].into_iter().enumerate() {
                let t = Instant::now();
                for _ in 0..100 {
                    once(to)?;
                }
                spent[k] += t.elapsed();
                done[k] += 100;
            }
        }
        let rate = |k: usize| done[k] as f64 / spent[k].as_secs_f64();
        Ok((rate(0), rate(1)))
    })?
}

/// Ours, the same Services through the agent (a 1-node lab, the client and
/// backend pods on it, as kube-proxy's): the time from writing the
/// manifests to every frontend in the maps, then the figures per packet
/// (the client outside the node's cgroup, where the socket programs are
/// attached: as with socket LB off) and with socket LB (the client in that
/// cgroup, as a pod's processes are).
fn ours(plan: Plan) -> Result<Vec<Series>> {
    let lab = Lab::up(&LabSpec::new(1, 2)?)?;
    let backend = lab.pod("pod-0-1").clone();
    let client = lab.pod("pod-0-0").netns.clone();
    let cgroup = lab.state.nodes[0].cgroup.clone().context("node cgroup")?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<Vec<Series>> {
        let server = s.spawn(|| sink_server(&backend.netns, &stop));
        let r = (|| -> Result<Vec<Series>> {
            let (mut per_packet, mut socket) = (Vec::new(), Vec::new());
            for &n in plan.services {
                let took = program(&lab, n)?;
                let pod = SocketAddr::from((backend.ip, PORT));
                per_packet.push(point(&client, pod, n, took, plan)?);
                socket.push(in_cgroup(&cgroup, || point(&client, pod, n, took, plan))?);
            }
            Ok(vec![
                Series {
                    name: "dataplane, socket LB off (per packet, VXLAN)".into(),
                    points: per_packet,
                },
                Series {
                    name: "dataplane, socket LB on (VXLAN)".into(),
                    points: socket,
                },
            ])
        })();
        stop.store(true, Ordering::Relaxed);
        server
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))??;
        r
    })
}

/// Every dataplane at every count.
pub(crate) fn measure(plan: Plan) -> Result<Vec<Series>> {
    let mut all = vec![kube_proxy("iptables", plan)?, kube_proxy("nftables", plan)?];
    all.extend(ours(plan)?);
    Ok(all)
}

/// The report's section.
pub(crate) fn report(series: &[Series]) -> String {
    let mut r = String::from(
        "## Services: connect() to a ClusterIP against the pod address\n\n\
         One port and one endpoint per Service; the measured Service is the one the rules reach last. Added µs = ClusterIP − pod address (medians, alternating); connections/s: connect, 1 byte each way, close (with a RST: no TIME_WAIT), in alternating rounds of 100; load s = writing the whole set until it is in effect. Socket LB off: the client outside the node's cgroup, where the socket programs attach; on: inside it, as a pod's processes are.\n\n\
         | dataplane | Services | connect() pod µs | ClusterIP µs | added µs | connections/s pod | ClusterIP | load s |\n|---|---|---|---|---|---|---|---|\n",
    );
    for s in series {
        for p in &s.points {
            let _ = writeln!(
                r,
                "| {} | {} | {:.1} | {:.1} | {:+.1} | {:.0} | {:.0} | {:.2} |",
                s.name,
                p.services,
                p.pod_us,
                p.cip_us,
                p.cip_us - p.pod_us,
                p.pod_cps,
                p.cip_cps,
                p.program_s
            );
        }
    }
    r.push('\n');
    for s in series {
        let (Some(a), Some(b)) = (s.points.first(), s.points.last()) else {
            continue;
        };
        // Both: a rule set every new connection walks (iptables) slows the
        // pod address too, which the ratio alone would hide; the ratio
        // cancels the machine's drift between counts.
        let _ = writeln!(
            r,
            "- {}: from {} to {} Services, connect() to the ClusterIP {:.1} → {:.1} µs ({:.2}×), to the pod address {:.1} → {:.1} µs; ClusterIP/pod {:.2}× (goal for ours: flat, ≤ 1.1×)",
            s.name,
            a.services,
            b.services,
            a.cip_us,
            b.cip_us,
            b.cip_us / a.cip_us,
            a.pod_us,
            b.pod_us,
            (b.cip_us / b.pod_us) / (a.cip_us / a.pod_us),
        );
    }
    r
}

/// Added connect() time against the number of Services, one line per
/// dataplane (log scale of Services).
pub(crate) fn plot(series: &[Series], path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let max_n = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.services))
        .max()
        .unwrap_or(1)
        .max(10) as f64;
    let top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.cip_us - p.pod_us))
        .fold(1.0f64, f64::max)
        * 1.3;
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "connect() to a ClusterIP, added over the pod address",
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1f64..max_n).log_scale(), 0f64..top)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("Services installed")
        .y_desc("µs added")
        .draw()
        .map_err(|e| err(&e))?;
    let palette = [RED, MAGENTA, BLUE, GREEN];
    for (k, s) in series.iter().enumerate() {
        let color = palette[k % palette.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|p| (p.services as f64, p.cip_us - p.pod_us))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
