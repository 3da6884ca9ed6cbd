//! The `dataplane` command line: the node agent (`dataplane agent`) and the
//! debug CLI. In the library so that the deploy tests parse the DaemonSet's
//! command line with this very parser.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use crate::{agent, maps, sys};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use dataplane_common::api::{self, EndpointSpec, Request, Response};

#[derive(Debug, Parser)]
#[command(
    name = "dataplane",
    version,
    about = "eBPF Kubernetes dataplane: node agent and debug CLI"
)]
pub struct Cli {
    /// Run inside this network namespace (an `ip netns` name or a path).
    /// Only the network namespace changes; bpffs pins and sockets are shared.
    #[arg(long, global = true)]
    netns: Option<String>,
    /// Log lines as text or as JSON objects (one per line).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent.
    Agent(Box<agent::AgentArgs>),
    /// The node at a glance: the agent (health, mode, peers, endpoints,
    /// frontends) and the pinned datapath (programs and where they are
    /// attached, conntrack size, the fullest map). Works without the agent
    /// (exit 1, saying so).
    Status {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
    /// Other nodes this node reaches, with their pod CIDRs (from the
    /// pinned ipcache).
    #[command(subcommand)]
    Node(NodeCmd),
    /// Security identities and the labels they stand for.
    #[command(subcommand)]
    Identity(IdentityCmd),
    /// NAT flows (masquerade, NodePort SNAT) in conntrack.
    #[command(subcommand)]
    Nat(NatCmd),
    /// Source prefixes the uplink drops before the stack (XDP), with the
    /// packets each has dropped.
    #[command(subcommand)]
    Prefilter(PrefilterCmd),
    /// The node's BGP speaker (--bgp on): its sessions, and the routes it
    /// advertises and learned.
    #[command(subcommand)]
    Bgp(BgpCmd),
    /// Endpoints (pods) registered with the agent.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Inspect the pinned BPF maps.
    #[command(subcommand)]
    Map(MapCmd),
    /// Service frontends as the datapath has them.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Connection tracking and NAT.
    #[command(subcommand)]
    Ct(CtCmd),
    /// NetworkPolicy as the datapath enforces it.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Run a packet through this node's live programs (BPF_PROG_TEST_RUN
    /// against the real maps, as a dry run that changes nothing) and tell
    /// its path step by step: endpoint, conntrack, Service and backend,
    /// policy decisions and the policies that made them, route, verdict.
    Explain {
        /// Source: an IP, a pod `namespace/name` (through the agent).
        src: String,
        /// Destination: an IP, a pod `namespace/name`, or a Service
        /// `svc/namespace/name` (its ClusterIP).
        dst: String,
        /// `tcp/PORT`, `udp/PORT` or `icmp`.
        what: String,
        /// The source port (default: an ephemeral one).
        #[arg(long)]
        sport: Option<u16>,
        #[command(flatten)]
        pin: PinArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
    /// Remove the dataplane from this node, with the agent stopped:
    /// programs, pins, devices, routes, state, and the CNI plugin with its
    /// conflist and IPAM records.
    Uninstall(Box<crate::uninstall::UninstallArgs>),
    /// Mount bpffs at PATH unless one is there (the DaemonSet's init
    /// container, so that pins outlive the agent's container).
    MountBpffs {
        #[arg(default_value = "/sys/fs/bpf")]
        path: PathBuf,
    },
    /// Check Kubernetes manifests as the agent's directory source reads
    /// them: each problem with its file, document and field. Exits 1 when
    /// any is found.
    Validate {
        /// Files, or directories of them (`*.yaml`, `*.yml`, `*.json`).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
    /// Live drops (each with its named reason) and NetworkPolicy verdicts
    /// (naming the policy), read straight from the node's pinned ring
    /// buffer, with or without the agent. One monitor per node at a time.
    Monitor {
        #[command(flatten)]
        pin: PinArgs,
        /// One JSON object per line with `-o json`.
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
        /// Which events (comma-separated): drop, policy (verdicts, allowed
        /// ones included), trace (forwarded packets), all.
        #[arg(
            long = "type",
            value_enum,
            value_delimiter = ',',
            default_value = "drop,policy"
        )]
        kind: Vec<crate::monitor::Kind>,
        /// Only events with this IPv4 address as source or destination.
        #[arg(long)]
        ip: Option<std::net::Ipv4Addr>,
        /// Only events of this pod (`namespace/name`, its address through
        /// the agent).
        #[arg(long, conflicts_with = "ip")]
        pod: Option<String>,
        /// Only events with this port as source or destination port.
        #[arg(long)]
        port: Option<u16>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<f64>,
        /// Also show what the ring held from before the monitor started
        /// (drops and denials are kept while no one reads).
        #[arg(long)]
        backlog: bool,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// Every other node: its address and pod CIDRs.
    List {
        #[command(flatten)]
        pin: PinArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
}

#[derive(Debug, Subcommand)]
enum IdentityCmd {
    /// Every identity with its labels (from the agent; without it, the
    /// identities the endpoints carry, unlabelled).
    List {
        #[command(flatten)]
        pin: PinArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
}

#[derive(Debug, Subcommand)]
enum BgpCmd {
    /// Each peer's session: state, since when, the last error, routes and
    /// updates each way.
    Peers {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
    /// What this node advertises and what its peers taught it (the best
    /// learned route per prefix is in the kernel's table).
    Routes {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
}

#[derive(Debug, Subcommand)]
enum PrefilterCmd {
    /// The denied prefixes as the datapath has them (works without the
    /// agent).
    List {
        #[command(flatten)]
        pin: PinArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
    /// Deny more prefixes (or addresses) now, through the agent; until the
    /// agent restarts with its configured --deny-cidr set.
    Add {
        #[arg(required = true)]
        cidrs: Vec<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Stop denying prefixes now, through the agent.
    Delete {
        #[arg(required = true)]
        cidrs: Vec<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Debug, Subcommand)]
enum NatCmd {
    /// Both directions of every NAT flow: the original, the rewrite.
    List {
        #[command(flatten)]
        pin: PinArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
    /// Remove NAT flows, through the agent (they lose their translation;
    /// their ports are free again).
    Flush {
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// A local pod's compiled policy: each entry with the policy it came
    /// from, peers with the labels their identity stands for.
    Get {
        /// `namespace/name` (or `name`, in `default`).
        pod: String,
        #[command(flatten)]
        socket: SocketArg,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
}

#[derive(Debug, Subcommand)]
enum ServiceCmd {
    /// Every frontend (address or NodePort, port, protocol, scope) with its
    /// backends in slot order.
    List {
        #[command(flatten)]
        pin: PinArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
}

#[derive(Debug, Subcommand)]
enum CtCmd {
    /// Every tracked flow direction with its rewrite, state and counters.
    List {
        #[command(flatten)]
        pin: PinArgs,
        /// Only entries with this source address.
        #[arg(long)]
        src: Option<IpAddr>,
        /// Only entries with this destination address.
        #[arg(long)]
        dst: Option<IpAddr>,
        /// Only entries with this source or destination port.
        #[arg(long)]
        port: Option<u16>,
        /// Only this protocol (tcp, udp, icmp).
        #[arg(long)]
        proto: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
    /// The programs' conntrack counters.
    Stats {
        #[command(flatten)]
        pin: PinArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
    /// Remove every entry, through the agent (established translated flows
    /// lose their translation).
    Flush {
        #[command(flatten)]
        socket: SocketArg,
    },
}

/// Every inspection verb picks its node alike: its pins (for what the
/// maps hold) and its agent's socket (for what only the agent knows).
type SocketArg = PinArgs;

#[derive(Debug, Subcommand)]
enum EndpointCmd {
    /// This node's endpoints, from the pinned map (pod names from the
    /// agent when it answers).
    List {
        #[command(flatten)]
        pin: PinArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
    /// One endpoint by pod (`namespace/name`) or address, with its
    /// counters.
    Get {
        endpoint: String,
        #[command(flatten)]
        pin: PinArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
    /// Register an endpoint whose veth is already wired (what the CNI plugin does).
    Add {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(long)]
        container_id: String,
        /// Host-side veth, in the agent's network namespace.
        #[arg(long)]
        host_ifname: String,
        /// Pod address; repeat for dual stack.
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
        /// MAC of the pod's interface.
        #[arg(long)]
        mac: String,
        /// Pod as namespace/name.
        #[arg(long, default_value = "")]
        pod: String,
    },
    /// Unregister an endpoint (idempotent).
    Del {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(long)]
        container_id: String,
    },
}

#[derive(Debug, clap::Args)]
struct PinArgs {
    /// The node whose maps to read (a directory under --pin-root); may be
    /// left out when only one node pins there.
    #[arg(long)]
    node: Option<String>,
    #[arg(long, default_value = dataplane_common::PIN_ROOT)]
    pin_root: PathBuf,
    /// Read maps from exactly this directory (overrides --node/--pin-root).
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// The agent's API socket.
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
}

impl PinArgs {
    /// The node's pin directory; an error that says so when no datapath
    /// is pinned there.
    fn resolve(&self) -> Result<PathBuf> {
        let dir = self.find()?;
        let config = dataplane_common::MapSpec::by_name(dataplane_common::MAP_CONFIG)
            .context("contract")?
            .pin_name();
        if !dir.join(&config).exists() {
            bail!(
                "no datapath is pinned in {} (is the agent running on this node? --node or --pin-dir pick the node)",
                dir.display()
            );
        }
        Ok(dir)
    }

    fn find(&self) -> Result<PathBuf> {
        if let Some(dir) = &self.pin_dir {
            return Ok(dir.clone());
        }
        if let Some(node) = &self.node {
            return Ok(dataplane_common::pin_dir(&self.pin_root, node));
        }
        let dirs: Vec<String> = std::fs::read_dir(&self.pin_root)
            .with_context(|| format!("reading {} (is an agent running?)", self.pin_root.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        match dirs.as_slice() {
            [one] => Ok(self.pin_root.join(one)),
            [] => bail!("no node pins under {}", self.pin_root.display()),
            many => bail!(
                "several nodes pin under {}: pass --node (one of {})",
                self.pin_root.display(),
                many.iter()
                    .map(|d| dataplane_common::pin::unescape(d).unwrap_or_else(|| d.clone()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

#[derive(Debug, Subcommand)]
enum MapCmd {
    /// The maps of the datapath and how full they are.
    List {
        #[command(flatten)]
        pin: PinArgs,
    },
    /// Decode and print every entry of one map.
    Dump {
        /// Map name, e.g. dp_ep_metrics (see `map list`).
        name: String,
        #[command(flatten)]
        pin: PinArgs,
        #[arg(short, long, value_enum, default_value = "table")]
        output: maps::Format,
    },
}

impl Cli {
    /// The agent's arguments, when this is `dataplane agent`.
    pub fn agent_args(&self) -> Option<&agent::AgentArgs> {
        match &self.command {
            Command::Agent(a) => Some(a),
            _ => None,
        }
    }

    /// Parses a command line as `dataplane` does, `--config` included:
    /// the config's settings join the command line unless a flag there
    /// already sets them.
    pub fn parse_with_config<I, T>(argv: I) -> Result<Cli, CliError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory as _, FromArgMatches as _};
        let mut argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
        let matches = Cli::command().try_get_matches_from(&argv)?;
        let cli = Cli::from_arg_matches(&matches)?;
        let Some(path) = cli.agent_args().and_then(|a| a.config.clone()) else {
            return Ok(cli);
        };
        let given = matches
            .subcommand_matches("agent")
            .ok_or_else(|| CliError::Config(anyhow::anyhow!("no agent arguments")))?;
        let entries = agent::config::read(&path).map_err(CliError::Config)?;
        argv.extend(agent::config::flags(&path, &entries, given).map_err(CliError::Config)?);
        Ok(Cli::from_arg_matches(
            &Cli::command().try_get_matches_from(argv)?,
        )?)
    }
}

/// Why a command line was refused: clap's own error (usage, help,
/// version), or a bad `--config`.
#[derive(Debug)]
pub enum CliError {
    Clap(clap::Error),
    Config(anyhow::Error),
}

impl From<clap::Error> for CliError {
    fn from(e: clap::Error) -> Self {
        CliError::Clap(e)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Clap(e) => write!(f, "{e}"),
            CliError::Config(e) => write!(f, "{e:#}"),
        }
    }
}

pub fn main() {
    let cli = match Cli::parse_with_config(std::env::args_os()) {
        Ok(cli) => cli,
        Err(CliError::Clap(e)) => e.exit(),
        Err(CliError::Config(e)) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let level = cli.agent_args().map_or("info", |a| a.log_level.as_str());
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    // Before any thread exists: setns applies to the calling thread only.
    if let Some(ns) = &cli.netns {
        sys::enter_netns(ns)?;
    }
    match cli.command {
        // Two workers: the local API and the reconciler never wait for
        // each other's slow work.
        Command::Agent(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(agent::run(*args)),
        Command::Status { socket, output } => {
            // Pins as given; else where the agent says it pins.
            let pin_dir = socket.pin_dir.clone().or_else(|| {
                socket
                    .node
                    .as_ref()
                    .map(|n| dataplane_common::pin_dir(&socket.pin_root, n))
            });
            let st = crate::inspect::status(&socket.socket, pin_dir)?;
            crate::inspect::print_status(&st, output)
        }
        Command::Node(NodeCmd::List { pin, output }) => {
            print!(
                "{}",
                maps::render(&crate::inspect::nodes(&pin.resolve()?)?, output)?
            );
            Ok(())
        }
        Command::Identity(IdentityCmd::List { pin, output }) => {
            let (rows, missing) = crate::inspect::identities(&pin.resolve()?, &pin.socket)?;
            if let Some(why) = missing {
                eprintln!(
                    "labels need the agent ({why}); identities from the pinned endpoints only"
                );
            }
            print!("{}", maps::render(&rows, output)?);
            Ok(())
        }
        Command::Nat(NatCmd::List { pin, output }) => {
            print!(
                "{}",
                maps::render(
                    &maps::ct::rows_where(&pin.resolve()?, maps::ct::is_nat)?,
                    output
                )?
            );
            Ok(())
        }
        Command::Bgp(BgpCmd::Peers { socket, output }) => {
            let st = bgp_status(&socket)?;
            print!("{}", maps::render(&st.sessions, output)?);
            Ok(())
        }
        Command::Bgp(BgpCmd::Routes { socket, output }) => {
            let st = bgp_status(&socket)?;
            print!("{}", maps::render(&st.routes, output)?);
            Ok(())
        }
        Command::Prefilter(PrefilterCmd::List { pin, output }) => {
            let rows = maps::prefilter::PrefilterMap::open(&pin.resolve()?)?.rows()?;
            print!("{}", maps::render(&rows, output)?);
            Ok(())
        }
        Command::Prefilter(PrefilterCmd::Add { cidrs, socket }) => {
            prefilter_change(&socket, cidrs, Vec::new())
        }
        Command::Prefilter(PrefilterCmd::Delete { cidrs, socket }) => {
            prefilter_change(&socket, Vec::new(), cidrs)
        }
        Command::Nat(NatCmd::Flush { socket }) => {
            let Response::Flushed { removed } = call(&socket, &Request::NatFlush)? else {
                bail!("unexpected response");
            };
            println!("removed {removed} conntrack entries of NAT flows");
            Ok(())
        }
        Command::Endpoint(cmd) => endpoint(cmd),
        Command::Explain {
            src,
            dst,
            what,
            sport,
            pin,
            output,
        } => crate::explain::run(
            &crate::explain::Request {
                pin_dir: &pin.resolve()?,
                socket: &pin.socket,
                src: &src,
                dst: &dst,
                what: &what,
                sport,
            },
            output,
        ),
        Command::Uninstall(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let removed = rt.block_on(crate::uninstall::run(&args))?;
            println!(
                "removed: {} links, {} clsact filters, {} routes, devices [{}]",
                removed.links,
                removed.clsact_filters,
                removed.routes,
                removed.devices.join(", ")
            );
            if removed.bgp_daemon {
                println!("stopped the BGP daemon (its routes withdrawn from its peers)");
            }
            for f in &removed.files {
                println!("removed {}", f.display());
            }
            if args.wait {
                rt.block_on(async {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                    term.recv().await;
                    anyhow::Ok(())
                })?;
            }
            Ok(())
        }
        Command::MountBpffs { path } => {
            if sys::ensure_bpffs(&path)? {
                println!("mounted bpffs at {}", path.display());
            } else {
                println!("bpffs already at {}", path.display());
            }
            Ok(())
        }
        Command::Validate { paths, output } => {
            let problems = crate::source_dir::check(&paths)?;
            match output {
                maps::Format::Json => {
                    let rows: Vec<serde_json::Value> = problems
                        .iter()
                        .map(|(file, p)| {
                            serde_json::json!({
                                "file": file.display().to_string(),
                                "document": p.document,
                                "message": p.message,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                }
                maps::Format::Table => {
                    for (file, p) in &problems {
                        println!("{}: {p}", file.display());
                    }
                }
            }
            if !problems.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Map(MapCmd::List { pin }) => {
            let dir = pin.resolve()?;
            let mut rows = Vec::new();
            for spec in dataplane_common::MAPS {
                let entries = match maps::count(&dir, spec.name) {
                    Ok(n) => n.to_string(),
                    Err(e) => format!("unavailable: {e:#}"),
                };
                // As created (some sizes are agent settings).
                let max = aya::maps::MapInfo::from_pin(dir.join(spec.pin_name()))
                    .map_or(spec.max_entries, |i| i.max_entries());
                rows.push(vec![
                    spec.name.to_owned(),
                    format!("v{}", spec.version),
                    spec.kind.name().to_owned(),
                    entries,
                    max.to_string(),
                    spec.description.to_owned(),
                ]);
            }
            print!(
                "{}",
                maps::table(
                    &["NAME", "LAYOUT", "TYPE", "ENTRIES", "MAX", "DESCRIPTION"],
                    rows
                )
            );
            Ok(())
        }
        Command::Monitor {
            pin,
            output,
            kind,
            ip,
            pod,
            port,
            count,
            duration,
            backlog,
        } => {
            let ip = match pod {
                None => ip,
                Some(pod) => Some(
                    crate::explain::resolve(&pin.socket, &pod)
                        .with_context(|| format!("--pod {pod}"))?,
                ),
            };
            crate::monitor::run(
                &pin.resolve()?,
                &kind,
                &crate::monitor::Filter { ip, port },
                output,
                count,
                duration.map(std::time::Duration::from_secs_f64),
                backlog,
            )
        }
        Command::Map(MapCmd::Dump { name, pin, output }) => {
            print!("{}", maps::dump(&pin.resolve()?, &name, output)?);
            Ok(())
        }
        Command::Service(ServiceCmd::List { pin, output }) => {
            print!(
                "{}",
                maps::render(&maps::services::rows(&pin.resolve()?)?, output)?
            );
            Ok(())
        }
        Command::Ct(CtCmd::List {
            pin,
            src,
            dst,
            port,
            proto,
            output,
        }) => {
            let proto = proto.map(|p| p.to_ascii_lowercase());
            let addr = |a: &str| {
                a.rsplit_once(':')
                    .map_or(a.to_owned(), |(ip, _)| ip.to_owned())
            };
            let port_of = |a: &str| a.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
            let rows: Vec<_> = maps::ct::rows(&pin.resolve()?)?
                .into_iter()
                .filter(|r| src.is_none_or(|s| addr(&r.src) == s.to_string()))
                .filter(|r| dst.is_none_or(|d| addr(&r.dst) == d.to_string()))
                .filter(|r| {
                    port.is_none_or(|p| port_of(&r.src) == Some(p) || port_of(&r.dst) == Some(p))
                })
                .filter(|r| proto.as_ref().is_none_or(|p| r.proto == *p))
                .collect();
            print!("{}", maps::render(&rows, output)?);
            Ok(())
        }
        Command::Ct(CtCmd::Stats { pin, output }) => {
            print!(
                "{}",
                maps::render(&maps::ct::stat_rows(&pin.resolve()?)?, output)?
            );
            Ok(())
        }
        Command::Policy(PolicyCmd::Get {
            pod,
            socket,
            output,
        }) => {
            let (namespace, name) = pod.split_once('/').unwrap_or(("default", pod.as_str()));
            let request = Request::PolicyGet {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            };
            let Response::Policy(view) = call(&socket, &request)? else {
                bail!("unexpected response");
            };
            match output {
                maps::Format::Json => println!("{}", serde_json::to_string_pretty(&view)?),
                maps::Format::Table => {
                    println!(
                        "pod {namespace}/{name}: endpoint {} identity {}",
                        view.ifindex, view.identity
                    );
                    if view.entries.is_empty() {
                        println!("no policy selects it: all traffic allowed");
                    } else {
                        let rows = view
                            .entries
                            .iter()
                            .map(|e| {
                                vec![
                                    e.direction.clone(),
                                    e.peer.clone(),
                                    e.protocol.clone(),
                                    e.ports.clone(),
                                    e.from.clone(),
                                ]
                            })
                            .collect();
                        print!(
                            "{}",
                            maps::table(&["DIRECTION", "PEER", "PROTO", "PORTS", "FROM"], rows)
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Ct(CtCmd::Flush { socket }) => {
            let Response::Flushed { removed } = call(&socket, &Request::CtFlush)? else {
                bail!("unexpected response");
            };
            println!("removed {removed} conntrack entries");
            Ok(())
        }
    }
}

fn bgp_status(socket: &SocketArg) -> Result<api::BgpStatus> {
    let Response::Bgp(st) = call(socket, &Request::Bgp)? else {
        bail!("unexpected response");
    };
    Ok(*st)
}

fn prefilter_change(socket: &SocketArg, add: Vec<String>, delete: Vec<String>) -> Result<()> {
    // Checked here too, so a typo is named before the agent is asked.
    for c in add.iter().chain(&delete) {
        maps::prefilter::parse_cidr(c)?;
    }
    let Response::Prefilter { cidrs } = call(socket, &Request::Prefilter { add, delete })? else {
        bail!("unexpected response");
    };
    println!(
        "denied now: {}",
        if cidrs.is_empty() {
            "nothing".to_owned()
        } else {
            cidrs.join(", ")
        }
    );
    Ok(())
}

fn call(socket: &SocketArg, request: &Request) -> Result<Response> {
    let response = api::call(&socket.socket, request, Duration::from_secs(10))?;
    if let Response::Error { message } | Response::NotReady { message } = response {
        bail!("{message}");
    }
    Ok(response)
}

fn endpoint(cmd: EndpointCmd) -> Result<()> {
    match cmd {
        EndpointCmd::List { pin, output } => {
            let (rows, missing) = crate::inspect::endpoints(&pin.resolve()?, &pin.socket)?;
            if let Some(why) = missing {
                eprintln!("pod names need the agent ({why}); endpoints from the pinned map only");
            }
            print!("{}", maps::render(&rows, output)?);
        }
        EndpointCmd::Get {
            endpoint,
            pin,
            output,
        } => {
            let (rows, _) = crate::inspect::endpoints(&pin.resolve()?, &pin.socket)?;
            let full = if endpoint.contains('/') || endpoint.parse::<IpAddr>().is_ok() {
                endpoint.clone()
            } else {
                format!("default/{endpoint}")
            };
            let e = rows
                .into_iter()
                .find(|e| e.ip == endpoint || e.pod.as_deref() == Some(full.as_str()))
                .with_context(|| format!("no endpoint {endpoint} on this node"))?;
            match output {
                maps::Format::Json => println!("{}", serde_json::to_string_pretty(&e)?),
                maps::Format::Table => {
                    print!("{}", maps::render(std::slice::from_ref(&e), output)?);
                    for (dir, (packets, bytes)) in &e.counters {
                        println!("{dir}: {packets} packets, {bytes} bytes");
                    }
                }
            }
        }
        EndpointCmd::Add {
            socket,
            container_id,
            host_ifname,
            ips,
            mac,
            pod,
        } => {
            let (pod_namespace, pod_name) = pod
                .split_once('/')
                .map_or((String::new(), pod.clone()), |(a, b)| (a.into(), b.into()));
            call(
                &socket,
                &Request::EndpointAdd(EndpointSpec {
                    container_id,
                    pod_namespace,
                    pod_name,
                    host_ifname,
                    ips,
                    mac,
                    netns_cookie: None,
                }),
            )?;
        }
        EndpointCmd::Del {
            socket,
            container_id,
        } => {
            call(&socket, &Request::EndpointDel { container_id })?;
        }
    }
    Ok(())
}
