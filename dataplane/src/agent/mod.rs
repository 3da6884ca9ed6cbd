//! The node agent: loads and pins the datapath, serves the local API (the
//! CNI plugin registers endpoints through it), and keeps the maps and routes
//! in line with the cluster state its source publishes.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::TcAttachType;
use dataplane_common::{
    Direction, EP_F_LOCAL, EndpointInfo, EndpointKey, EpMetricsKey, MAP_ENDPOINTS,
    PROG_LXC_FROM_CTR, PROG_LXC_TO_CTR,
    api::{AgentStatus, EndpointSpec, EndpointStatus, Request, Response},
    parse_mac,
};
use tokio::{
    io::unix::AsyncFd,
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};
use tracing::{debug, info, warn};

mod endpoints;
mod network;
mod reconcile;

use endpoints::*;
use network::*;
use reconcile::*;

use crate::{
    bpf::{AttachMode, Attached, Datapath},
    cluster::{self, Kind, Store},
    nodes::{self, RemoteNode},
    source_dir, source_kube, sys, telemetry,
};
use dataplane_common::{
    DatapathConfig, IPCACHE_KIND_CLUSTER, IPCACHE_KIND_HOST, IPCACHE_KIND_LOCAL_PODS,
    IPCACHE_KIND_REMOTE_PODS, IpcacheEntry, IpcacheKey, MAP_IPCACHE, MODE_NATIVE, MODE_VXLAN,
    PROG_HOST_IN, PROG_OVERLAY_IN, PROG_OVERLAY_OUT, netlink::Nl,
};

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// This node's name (the Kubernetes Node name).
    #[arg(long)]
    pub node: String,
    /// bpffs directory under which each node pins into `<root>/<node>/`.
    #[arg(long, default_value = dataplane_common::PIN_ROOT)]
    pub pin_root: PathBuf,
    /// Unix socket of the local API (CNI plugin, CLI).
    #[arg(long, default_value = dataplane_common::api::DEFAULT_SOCKET)]
    pub api_socket: PathBuf,
    /// How TC programs are attached.
    #[arg(long, value_enum, default_value = "auto")]
    pub attach_mode: AttachMode,
    /// Pins this node's pod CIDR; without it the CIDR comes from this node's
    /// Node object.
    #[arg(long)]
    pub pod_cidr: Option<String>,
    /// The whole cluster's pod range: addresses in it that belong to no pod
    /// and no node are dropped (`unknown_destination`), never routed out.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: String,
    /// How pods on different nodes reach each other.
    #[arg(long, value_enum, default_value = "vxlan")]
    pub mode: Mode,
    /// The node's uplink (underlay interface).
    #[arg(long, default_value = "eth0")]
    pub uplink: String,
    /// This node's underlay address; the uplink's first IPv4 address if unset.
    #[arg(long)]
    pub node_ip: Option<std::net::Ipv4Addr>,
    /// VXLAN network identifier (Flannel's default).
    #[arg(long, default_value_t = 1)]
    pub vni: u32,
    /// VXLAN UDP port (Flannel's default; IANA's is 4789).
    #[arg(long, default_value_t = 8472)]
    pub vxlan_port: u16,
    /// Name of the VXLAN device the agent creates (external mode).
    #[arg(long, default_value = "dp_vxlan")]
    pub vxlan_device: String,
    /// Where cluster state comes from: `kube` (the API server: in-cluster
    /// config, or --kubeconfig), or `dir:PATH`, a directory of Kubernetes
    /// manifests (Node, Namespace, Pod, Service, EndpointSlice,
    /// NetworkPolicy) watched for changes.
    #[arg(long, default_value = "dir:/etc/dataplane/cluster", value_parser = parse_source)]
    pub source: Source,
    /// Kubeconfig for `--source kube` outside a cluster.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// MTU for pod interfaces; default: the uplink's MTU, minus VXLAN's 50
    /// bytes in VXLAN mode.
    #[arg(long)]
    pub pod_mtu: Option<u32>,
    /// Where the agent keeps state it needs after a restart (the endpoints).
    #[arg(long, default_value = "/var/run/dataplane")]
    pub state_dir: PathBuf,
    /// On SIGTERM/SIGINT remove the datapath (programs, pins, device,
    /// routes). By default it keeps forwarding until the next agent adopts it.
    #[arg(long)]
    pub cleanup: bool,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = crate::telemetry::DEFAULT_ADDR)]
    pub metrics_addr: String,
    /// Most verbose kernel log level that reaches the agent's log.
    #[arg(long, value_enum, default_value = "info")]
    pub bpf_log_level: BpfLogLevel,
}

#[derive(Clone, Debug)]
pub enum Source {
    Dir(PathBuf),
    Kube,
}

fn parse_source(s: &str) -> Result<Source, String> {
    match s.split_once(':') {
        Some(("dir", path)) if !path.is_empty() => Ok(Source::Dir(path.into())),
        None if s == "kube" => Ok(Source::Kube),
        _ => Err(format!("{s:?}: expected kube or dir:PATH")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Encapsulate in VXLAN between nodes (Flannel's default).
    Vxlan,
    /// Plain routing via each node's underlay address (nodes on one L2).
    Native,
}

/// Bytes VXLAN adds: outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8.
const VXLAN_OVERHEAD: u32 = 50;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum BpfLogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl BpfLogLevel {
    /// aya-log's numbering (Error = 1 .. Trace = 5).
    fn code(self) -> u8 {
        self as u8
    }
}

struct LiveEndpoint {
    spec: EndpointSpec,
    ifindex: u32,
    links: Vec<Attached>,
    keys: Vec<EndpointKey>,
}

/// The node's network facts, fixed at start.
struct Net {
    mode: Mode,
    uplink: String,
    uplink_ifindex: u32,
    vxlan_ifindex: u32,
    node_ip: std::net::Ipv4Addr,
}

struct State {
    node: String,
    pod_mtu: u32,
    net: Net,
    /// Remote nodes as last applied.
    nodes: std::collections::BTreeMap<String, RemoteNode>,
    /// Remote pods' addresses as last applied to the endpoint map.
    remote_pods: std::collections::BTreeMap<std::net::IpAddr, String>,
    /// This node's pod CIDR as applied; fixed when `--pod-cidr` is given.
    own_cidr: Option<ipnetwork::IpNetwork>,
    own_cidr_fixed: bool,
    /// Links of the node-level programs; dropping them detaches.
    node_links: Vec<Attached>,
    /// Where registered endpoints are kept across restarts.
    registry: PathBuf,
    telemetry: telemetry::Shared,
    datapath: Datapath,
    endpoints: HashMap<String, LiveEndpoint>,
}

pub async fn run(args: AgentArgs) -> Result<()> {
    let pin_dir = dataplane_common::pin_dir(&args.pin_root, &args.node);
    sys::ensure_pin_dir(&pin_dir)?;
    let (mut datapath, logger) =
        Datapath::load(&pin_dir, args.attach_mode, args.bpf_log_level.code())?;
    info!(node = %args.node, pin_dir = %pin_dir.display(), attach_mode = datapath.mode().name(), "datapath loaded");

    // SAFETY: the logger owns its ring buffer fd and keeps it open, unchanged,
    // for as long as it lives; AsyncFd owns the logger.
    let mut logger =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("watching the kernel log ring buffer: {e}"))?;
    tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!("kernel log reader stopped: {e}");
                    return;
                }
            }
        }
    });

    let pod_cidr = match &args.pod_cidr {
        Some(c) => Some(
            dataplane_common::api::parse_cidr(c).map_err(|e| anyhow::anyhow!("--pod-cidr: {e}"))?,
        ),
        None => None,
    };
    let cluster_cidr = dataplane_common::api::parse_cidr(&args.cluster_cidr)
        .map_err(|e| anyhow::anyhow!("--cluster-cidr: {e}"))?;
    let nl = Nl::new()?;
    let (net, uplink_mtu) = setup_node(&args, &nl).await?;
    let pod_mtu = args.pod_mtu.unwrap_or(match net.mode {
        Mode::Vxlan => uplink_mtu - VXLAN_OVERHEAD,
        Mode::Native => uplink_mtu,
    });
    let node_links = attach_node_programs(&mut datapath, &net, &args)?;
    init_maps(&mut datapath, &net, &args, cluster_cidr, pod_cidr)?;
    info!(mode = ?net.mode, uplink = %net.uplink, node_ip = %net.node_ip, pod_mtu, "node datapath ready");

    let telemetry = telemetry::Shared::default();
    telemetry::serve(&args.metrics_addr, telemetry.clone(), pin_dir.clone()).await?;
    let state = Arc::new(Mutex::new(State {
        node: args.node.clone(),
        pod_mtu,
        net,
        nodes: Default::default(),
        remote_pods: Default::default(),
        own_cidr: pod_cidr,
        own_cidr_fixed: pod_cidr.is_some(),
        node_links,
        registry: args.state_dir.join("endpoints.json"),
        telemetry: telemetry.clone(),
        datapath,
        endpoints: HashMap::new(),
    }));
    {
        let mut st = state
            .lock()
            .map_err(|_| anyhow::anyhow!("agent state poisoned"))?;
        restore(&mut st)?;
        adopt_installed_nodes(&mut st)?;
    }

    let nl_cleanup = nl.clone();
    // None until the source has read everything once: an empty store before
    // that must not be applied (it would remove every node).
    let (tx, rx) = tokio::sync::watch::channel(None);
    match args.source.clone() {
        Source::Dir(dir) => {
            let t = telemetry.clone();
            tokio::spawn(async move { source_dir::run(dir, tx, t).await });
        }
        Source::Kube => {
            let client = source_kube::client(args.kubeconfig.as_ref()).await?;
            let t = telemetry.clone();
            tokio::spawn(async move { source_kube::run(client, tx, t).await });
        }
    }
    {
        let (state, own, t) = (state.clone(), args.node.clone(), telemetry.clone());
        tokio::spawn(async move { reconcile_loop(rx, own, state, nl, t).await });
    }

    if let Some(dir) = args.api_socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&args.api_socket) {
        Ok(()) => debug!("removed stale socket {}", args.api_socket.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale {}", args.api_socket.display()));
        }
    }
    let listener = UnixListener::bind(&args.api_socket)
        .with_context(|| format!("binding {}", args.api_socket.display()))?;
    info!(socket = %args.api_socket.display(), "ready");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, state).await {
                            warn!("API connection: {e:#}");
                        }
                    });
                }
                Err(e) => warn!("API accept: {e}"),
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    let _ = std::fs::remove_file(&args.api_socket);
    if args.cleanup {
        info!("shutting down and removing the datapath (--cleanup)");
        cleanup(&state, &nl_cleanup).await?;
    } else {
        info!(
            "shutting down; the datapath keeps running (pinned under {})",
            pin_dir.display()
        );
    }
    Ok(())
}

async fn serve(stream: UnixStream, state: Arc<Mutex<State>>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            let mut state = state
                .lock()
                .map_err(|_| anyhow::anyhow!("agent state poisoned"))?;
            handle(&mut state, request)
        }
        Err(e) => Response::Error {
            message: format!("malformed request: {e}"),
        },
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    Ok(())
}

fn handle(state: &mut State, request: Request) -> Response {
    let started = std::time::Instant::now();
    let changes = matches!(
        request,
        Request::EndpointAdd(_) | Request::EndpointDel { .. }
    );
    let response = handle_request(state, request);
    let t = &state.telemetry;
    if changes {
        telemetry::reconciled(t, "endpoint", started.elapsed());
        telemetry::set_objects(t, "endpoint", state.endpoints.len());
    }
    if let Response::Error { message } = &response {
        telemetry::error(t, "api_request");
        warn!("API request refused: {message}");
    }
    response
}

fn handle_request(state: &mut State, request: Request) -> Response {
    let result = match request {
        Request::Status => Ok(Response::Status(AgentStatus {
            node: state.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            attach_mode: state.datapath.mode().name().to_owned(),
            pin_dir: state.datapath.pin_dir().display().to_string(),
            endpoints: state.endpoints.len(),
            pod_cidr: state.own_cidr.map(|c| c.to_string()),
            pod_mtu: state.pod_mtu,
            mode: format!("{:?}", state.net.mode).to_lowercase(),
            node_ip: state.net.node_ip.to_string(),
            nodes: state.nodes.len(),
        })),
        Request::EndpointAdd(spec) => endpoint_add(state, spec, true)
            .and_then(|()| save_registry(state))
            .map(|()| Response::Ok),
        Request::EndpointDel { container_id } => endpoint_del(state, &container_id)
            .and_then(|()| save_registry(state))
            .map(|()| Response::Ok),
        Request::EndpointList => {
            let mut endpoints: Vec<_> = state
                .endpoints
                .values()
                .map(|e| EndpointStatus {
                    spec: e.spec.clone(),
                    ifindex: e.ifindex,
                })
                .collect();
            endpoints.sort_by(|a, b| a.spec.container_id.cmp(&b.spec.container_id));
            Ok(Response::Endpoints { endpoints })
        }
    };
    result.unwrap_or_else(|e| Response::Error {
        message: format!("{e:#}"),
    })
}
