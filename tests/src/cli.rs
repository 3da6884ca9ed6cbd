//! The lab's command line (`cargo xtask lab …`, or the `dataplane-lab`
//! binary): a simulated cluster from Kubernetes manifests, changed as
//! `kubectl` would change it, probed pod by pod or as a reachability
//! matrix. Exit status: 0 done (a probe: allowed), 1 a probe denied, 2 a
//! usage or lab error.

use std::{
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    Lab, LabSpec, LabState, RUN_ROOT,
    manifests::Doc,
    tool::{self, PROBE_TIMEOUT},
};

#[derive(Debug, Parser)]
#[command(
    name = "lab",
    about = "A simulated cluster in network namespaces: Kubernetes manifests in, probes and reachability matrices out"
)]
pub struct Cli {
    /// The lab to act on (its name); the one `lab up` made last if not
    /// given.
    #[arg(long, global = true)]
    lab: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build a lab and leave it running: nodes, one agent each, the pods
    /// of the manifests wired through dataplane-cni and served on their
    /// container ports, everything else applied through the agents.
    Up {
        /// Nodes (`node-0` …), unless the manifests have Node objects.
        #[arg(long)]
        nodes: Option<usize>,
        #[arg(long, value_enum, default_value = "vxlan")]
        mode: Mode,
        /// A directory (or file) of manifests: Node, Namespace, Pod,
        /// Service, EndpointSlice, NetworkPolicy.
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// Name the lab (default: its id).
        #[arg(long)]
        name: Option<String>,
        /// Pods `default/pod-<node>-<j>` per node, serving TCP and UDP 80
        /// (default: 2 without --manifests, 0 with).
        #[arg(long)]
        pods_per_node: Option<usize>,
        /// auto, tcx or clsact.
        #[arg(long, default_value = "auto")]
        attach_mode: String,
        /// `l2`: one bridge joins the nodes; `routed`: each node (and the
        /// external host) in a subnet of its own behind a router, and the
        /// agents speak BGP to it (use with --mode native).
        #[arg(long, default_value = "l2", value_parser = ["l2", "routed"])]
        underlay: String,
        /// The routed underlay's router: `bird` (BIRD 2) or `frr`.
        #[arg(long, default_value = "bird", value_parser = ["bird", "frr"])]
        router: String,
    },
    /// Create or replace objects, as `kubectl apply -f`.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Remove objects, as `kubectl delete -f`.
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Run a command (no shell) in a pod (`namespace/name`), on a node
    /// (`node/<name>`) or on the external host (`external`).
    Exec {
        target: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// One connection attempt (1 s): allowed (exit 0) or denied (exit 1).
    Probe {
        /// A pod (`namespace/name`), `node/<name>` or `external`.
        from: String,
        /// A pod, a Service's ClusterIP (`svc/<namespace>/<name>`), a node
        /// (`node/<name>`, for NodePorts), `external` or an IP.
        to: String,
        /// `PORT/PROTOCOL`, e.g. `80/tcp`.
        port: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Why a packet goes where it goes: `dataplane explain` on the node
    /// where it enters, and on the next node when it is encapsulated there.
    Explain {
        /// A pod (`namespace/name`) or `external`.
        from: String,
        /// A pod, `svc/<namespace>/<name>`, `node/<name>` or an IP.
        to: String,
        /// `PORT/PROTOCOL`, e.g. `80/tcp`.
        port: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Every pod to every pod, as Kubernetes' network-policy tests print
    /// it: `.` allowed, `X` denied; rows are sources.
    Matrix {
        #[arg(long, default_value_t = 80)]
        port: u16,
        #[arg(long, default_value = "TCP")]
        protocol: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// What runs where.
    Status {
        /// Every lab on this machine (text).
        #[arg(long)]
        all: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Remove a lab: NAME, or the one `lab up` made last; with --all,
    /// every lab no running process owns (also those of killed test runs).
    Down {
        name: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// (internal) A pod's server: answers on each port with the pod's
    /// name.
    #[command(hide = true)]
    PodServe {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        name: String,
        #[arg(long = "port")]
        ports: Vec<String>,
    },
    /// (internal) One probe, from inside the lab; JSON on stdout.
    #[command(hide = true)]
    PodProbe {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        protocol: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Vxlan,
    Native,
}

/// The command line's entry: parses `args` (the first is the program) and
/// runs; returns the exit status.
pub fn main(args: impl IntoIterator<Item = impl Into<OsString> + Clone>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // Help and version are not errors.
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lab: error: {e:#}");
            2
        }
    }
}

/// Where the name of the lab `lab up` made last is kept.
fn last_file() -> PathBuf {
    Path::new(RUN_ROOT).join("last")
}

/// The lab called `name`, or else the one `lab up` made last.
fn find(name: Option<&str>) -> Result<LabState> {
    let labs = Lab::list()?;
    let name = match name {
        Some(n) => n.to_owned(),
        None => std::fs::read_to_string(last_file())
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|n| labs.iter().any(|l| l.name == *n))
            .context("no lab: make one with `lab up`, or name one with --lab")?,
    };
    labs.into_iter()
        .find(|l| l.name == name || l.id == name)
        .with_context(|| format!("no lab named {name}"))
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Cmd::Up {
            nodes,
            mode,
            manifests,
            name,
            pods_per_node,
            attach_mode,
            underlay,
            router,
        } => up(
            nodes,
            mode,
            manifests.as_deref(),
            name,
            pods_per_node,
            (attach_mode, underlay, router),
        ),
        Cmd::Apply { file } => {
            let mut lab = Lab::attach(find(cli.lab.as_deref())?);
            let docs = tool::read_manifests(&lab.state.dataplane_bin, &file)?;
            print!("{}", lab.apply_docs(&docs)?);
            Ok(0)
        }
        Cmd::Delete { file } => {
            let mut lab = Lab::attach(find(cli.lab.as_deref())?);
            let docs = crate::manifests::load(&file)?;
            print!("{}", lab.delete_docs(&docs)?);
            Ok(0)
        }
        Cmd::Exec { target, command } => {
            let lab = Lab::attach(find(cli.lab.as_deref())?);
            let status = lab.exec(&target, &command)?;
            Ok(status.code().unwrap_or_else(|| {
                128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
            }))
        }
        Cmd::Probe {
            from,
            to,
            port,
            output,
        } => {
            let lab = Lab::attach(find(cli.lab.as_deref())?);
            let (port, proto) = tool::port_protocol(&port)?;
            let r = lab.probe(&from, &to, port, &proto)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string(&r)?),
                Output::Table => println!(
                    "{} {} -> {} ({} {}): {}{}",
                    r.verdict,
                    r.from,
                    r.to,
                    r.address,
                    r.protocol,
                    match &r.answered_by {
                        Some(w) => format!("answered by {w}"),
                        None => "no answer".into(),
                    },
                    r.error
                        .as_ref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ),
            }
            Ok(if r.allowed() { 0 } else { 1 })
        }
        Cmd::Explain {
            from,
            to,
            port,
            output,
        } => {
            let lab = Lab::attach(find(cli.lab.as_deref())?);
            let (port, proto) = tool::port_protocol(&port)?;
            let hops = lab.explain(&from, &to, port, &proto)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&hops)?),
                Output::Table => {
                    for h in &hops {
                        println!(
                            "on {}: {}",
                            h["node"].as_str().unwrap_or("?"),
                            h["packet"].as_str().unwrap_or("?")
                        );
                        for s in h["steps"].as_array().into_iter().flatten() {
                            println!(
                                "  {:<15} {}",
                                s["step"].as_str().unwrap_or("?"),
                                s["detail"].as_str().unwrap_or("?")
                            );
                        }
                        if let Some(l) = h["leaves_as"].as_str() {
                            println!("  {:<15} {l}", "leaves as");
                        }
                    }
                }
            }
            Ok(0)
        }
        Cmd::Matrix {
            port,
            protocol,
            output,
        } => {
            let lab = Lab::attach(find(cli.lab.as_deref())?);
            let m = lab.matrix(port, &protocol)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&m)?),
                Output::Table => {
                    println!("{port}/{}:", m.protocol);
                    print!("{}", m.table());
                }
            }
            Ok(0)
        }
        Cmd::Status { all, output } => {
            let labs = if all {
                Lab::list()?
            } else {
                vec![find(cli.lab.as_deref())?]
            };
            match output {
                Output::Json if all => println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &labs.iter().map(tool::status_json).collect::<Vec<_>>()
                    )?
                ),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&tool::status_json(&labs[0]))?
                ),
                Output::Table => {
                    for l in &labs {
                        print_lab(l);
                    }
                }
            }
            Ok(0)
        }
        Cmd::Down { name, all } => {
            if all {
                let removed = crate::teardown_unowned()?;
                println!("removed {} lab(s) {}", removed.len(), removed.join(" "));
                return Ok(0);
            }
            let state = find(name.as_deref().or(cli.lab.as_deref()))?;
            crate::teardown(&state);
            if std::fs::read_to_string(last_file()).is_ok_and(|l| l.trim() == state.name) {
                let _ = std::fs::remove_file(last_file());
            }
            println!("removed lab {}", state.name);
            Ok(0)
        }
        Cmd::PodServe {
            netns,
            cgroup,
            name,
            ports,
        } => {
            let ports = ports
                .iter()
                .map(|p| tool::port_protocol(p))
                .collect::<Result<Vec<_>>>()?;
            tool::serve(&netns, cgroup.as_deref(), &name, &ports)?;
            Ok(0)
        }
        Cmd::PodProbe {
            netns,
            cgroup,
            to,
            protocol,
        } => {
            let r = tool::reach(
                &netns,
                cgroup.as_deref(),
                to,
                &tool::protocol(&protocol)?,
                PROBE_TIMEOUT,
            )?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(0)
        }
    }
}

fn up(
    nodes: Option<usize>,
    mode: Mode,
    manifests: Option<&Path>,
    name: Option<String>,
    pods_per_node: Option<usize>,
    (attach_mode, underlay, router): (String, String, String),
) -> Result<i32> {
    let mut spec = LabSpec::new(0, 0)?;
    spec.bgp = underlay == "routed";
    spec.underlay = underlay;
    spec.router = router;
    if let Some(n) = &name {
        if n.is_empty()
            || n.len() > 40
            || !n
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            bail!("--name {n:?}: lowercase letters, digits and '-', at most 40");
        }
        if Lab::list()?.iter().any(|l| l.name == *n) {
            bail!("--name {n}: a lab of that name exists (remove it with `lab down {n}`)");
        }
        spec.name = n.clone();
    }
    let mut docs: Vec<Doc> = match manifests {
        Some(dir) => tool::read_manifests(&spec.dataplane_bin, dir)?,
        None => Vec::new(),
    };
    match tool::nodes_of(&docs)? {
        Some(given) => {
            if let Some(n) = nodes
                && n != given.len()
            {
                bail!(
                    "--nodes {n}: the manifests define {} Node objects ({})",
                    given.len(),
                    given
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            spec.nodes = given.len();
            let taken: Vec<(u32, u32)> = given
                .iter()
                .filter_map(|(_, c)| c.as_deref().and_then(range_of))
                .collect();
            for (i, a) in taken.iter().enumerate() {
                if taken[..i].iter().any(|b| overlap(*a, *b)) {
                    bail!("the Node objects' pod CIDRs overlap");
                }
            }
            // Nodes without one get the lowest free 10.244.<k>.0/24.
            let mut k = 0u32;
            for (node, cidr) in given {
                let cidr = match cidr {
                    Some(c) => c,
                    None => loop {
                        let c = format!("10.244.{k}.0/24");
                        k += 1;
                        let r = range_of(&c).context("cidr")?;
                        if !taken.iter().any(|t| overlap(r, *t)) {
                            break c;
                        }
                        if k > 255 {
                            bail!("no free /24 in 10.244.0.0/16 for node {node}");
                        }
                    },
                };
                spec.node_names.push(node);
                spec.node_pod_cidrs.push(cidr);
            }
        }
        None => spec.nodes = nodes.unwrap_or(2),
    }
    if spec.nodes == 0 || spec.nodes > 50 {
        bail!("--nodes {}: from 1 to 50", spec.nodes);
    }
    let names: Vec<String> = (0..spec.nodes).map(|i| spec.node_name(i)).collect();
    docs.extend(tool::quick_pods(
        &names,
        pods_per_node.unwrap_or(if manifests.is_some() { 0 } else { 2 }),
    ));
    // The whole change is checked before anything is built.
    crate::manifests::Store::default().apply(&docs, &names)?;
    spec.mode = match mode {
        Mode::Vxlan => "vxlan",
        Mode::Native => "native",
    }
    .into();
    spec.attach_mode = attach_mode;
    let mut lab = Lab::up(&spec)?;
    lab.apply_docs(&docs)?;
    let state = lab.persist()?;
    std::fs::write(last_file(), &state.name)?;
    print_lab(&state);
    println!("\nremove it with: lab down {}", state.name);
    Ok(0)
}

/// The addresses of an IPv4 CIDR, as (first, last).
fn range_of(cidr: &str) -> Option<(u32, u32)> {
    let (a, l) = cidr.split_once('/')?;
    let a = u32::from(a.parse::<std::net::Ipv4Addr>().ok()?);
    let l: u32 = l.parse().ok().filter(|l| *l <= 32)?;
    let size = 1u64 << (32 - l);
    let first = a & !((size - 1) as u32);
    Some((first, first + (size - 1) as u32))
}

fn overlap(a: (u32, u32), b: (u32, u32)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// The lab in text: nodes, pods, the external host, and how to reach in.
pub fn print_lab(state: &LabState) {
    let alive = |pid: Option<u32>| pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
    let underlay = match &state.router {
        Some(r) => format!(
            "routed underlay: router ({}, AS {}) in netns {}",
            r.daemon,
            crate::routed::ROUTER_AS,
            state.underlay_netns
        ),
        None => format!(
            "underlay 172.20.0.0/{} in netns {}",
            crate::UNDERLAY_PREFIX,
            state.underlay_netns
        ),
    };
    println!(
        "lab {} (id {}, {} mode, {underlay})",
        state.name,
        state.id,
        if state.mode.is_empty() {
            "vxlan"
        } else {
            &state.mode
        },
    );
    for (i, n) in state.nodes.iter().enumerate() {
        println!(
            "  node {}  {}  pods {}  netns {}  agent pid {} ({})",
            n.name,
            n.ip,
            n.pod_cidr,
            n.netns,
            n.agent_pid.map_or("-".into(), |p| p.to_string()),
            if alive(n.agent_pid) {
                "running"
            } else {
                "not running"
            }
        );
        for p in state.pods.iter().filter(|p| p.node == i) {
            let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "    pod {}  {}  netns {}  {}",
                p.full_name(),
                p.ip,
                p.netns,
                labels.join(",")
            );
        }
    }
    if let Some(ext) = &state.external {
        println!("  external host  {}  netns {}", ext.ip, ext.netns);
    }
    // Hints for a lab that stays up (`lab up`), not one a program owns.
    if let Some(n) = state.nodes.first().filter(|_| state.owner_pid.is_none()) {
        println!("\ntry:");
        if let [a, b, ..] = state.pods.as_slice() {
            println!("  lab probe {} {} 80/tcp", a.full_name(), b.full_name());
        }
        println!("  lab matrix");
        println!(
            "  {} service list --pin-dir {}",
            state.dataplane_bin.display(),
            n.pin_dir.display()
        );
        println!(
            "  {} status --socket {}",
            state.dataplane_bin.display(),
            n.api_socket.display()
        );
        println!("  agent log: {}", n.log.display());
    }
}
