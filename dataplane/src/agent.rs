//! The node agent: owns the loaded datapath, serves the local API, keeps the
//! endpoint maps in line with the registered endpoints.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap},
    programs::TcAttachType,
};
use dataplane_common::{
    Counter, Direction, EP_F_LOCAL, EndpointInfo, EndpointKey, EpMetricsKey, MAP_ENDPOINTS,
    MAP_EP_METRICS, PROG_LXC_FROM_CTR, PROG_LXC_TO_CTR,
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

use crate::{
    bpf::{AttachMode, Attached, Datapath},
    cluster::{self, Kind, Store},
    nodes::{self, RemoteNode},
    source_dir, source_kube, sys, telemetry,
};
use dataplane_common::{
    DatapathConfig, IPCACHE_KIND_CLUSTER, IPCACHE_KIND_HOST, IPCACHE_KIND_LOCAL_PODS,
    IPCACHE_KIND_REMOTE_PODS, IpcacheEntry, IpcacheKey, MAP_CONFIG, MAP_IPCACHE, MODE_NATIVE,
    MODE_VXLAN, PROG_HOST_IN, PROG_OVERLAY_IN, PROG_OVERLAY_OUT, netlink::Nl,
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
    /// This node's pod CIDR (until Node objects are synced it comes from here).
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
    pod_cidr: Option<String>,
    pod_mtu: u32,
    net: Net,
    /// Remote nodes as last applied.
    nodes: std::collections::BTreeMap<String, RemoteNode>,
    /// Remote pods' addresses as last applied to the endpoint map.
    remote_pods: std::collections::BTreeMap<std::net::IpAddr, String>,
    /// This node's pod CIDR as applied; fixed when `--pod-cidr` is given.
    own_cidr: Option<ipnetwork::Ipv4Network>,
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
    let (datapath, logger) = Datapath::load(&pin_dir, args.attach_mode, args.bpf_log_level.code())?;
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
    let (mut datapath, net, uplink_mtu) = setup_node(datapath, &args, &nl).await?;
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
        pod_cidr: args.pod_cidr.clone(),
        pod_mtu,
        net,
        nodes: Default::default(),
        remote_pods: Default::default(),
        own_cidr: match pod_cidr {
            Some(ipnetwork::IpNetwork::V4(v4)) => Some(v4),
            _ => None,
        },
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
    }

    let nl_cleanup = Nl::new()?;
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

/// `--cleanup`: programs, pins, the VXLAN device, routes and the endpoint
/// registry go; the pods lose connectivity until an agent runs again.
async fn cleanup(state: &Arc<Mutex<State>>, nl: &Nl) -> Result<()> {
    // Maps and pins under the lock; netlink after it is released.
    let (routes, vxlan) = {
        let mut st = state
            .lock()
            .map_err(|_| anyhow::anyhow!("agent state poisoned"))?;
        let ids: Vec<String> = st.endpoints.keys().cloned().collect();
        for id in ids {
            endpoint_del(&mut st, &id)?;
        }
        for link in std::mem::take(&mut st.node_links) {
            st.datapath.detach(link)?;
        }
        let _ = std::fs::remove_file(&st.registry);
        std::fs::remove_dir_all(st.datapath.pin_dir())
            .with_context(|| format!("removing {}", st.datapath.pin_dir().display()))?;
        let routes: Vec<_> = st.nodes.values().map(|n| route_for(&st.net, n)).collect();
        (
            routes,
            (st.net.mode == Mode::Vxlan).then_some(st.net.vxlan_ifindex),
        )
    };
    for route in routes {
        nl.del_route(route).await?;
    }
    if let Some(index) = vxlan {
        nl.del_link(index).await?;
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
            pod_cidr: state.pod_cidr.clone(),
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

const LXC_HOOKS: [(&str, TcAttachType); 2] = [
    (PROG_LXC_FROM_CTR, TcAttachType::Ingress),
    (PROG_LXC_TO_CTR, TcAttachType::Egress),
];

/// Registers an endpoint. `fresh` is false when re-adopting one after a
/// restart: its counters then carry on.
fn endpoint_add(state: &mut State, spec: EndpointSpec, fresh: bool) -> Result<()> {
    let id = spec.container_id.clone();
    if id.is_empty() {
        bail!("endpoint: container_id is empty");
    }
    if spec.ips.is_empty() {
        bail!("endpoint {id}: ips is empty");
    }
    let mac = parse_mac(&spec.mac)
        .with_context(|| format!("endpoint {id}: mac {:?} is not aa:bb:cc:dd:ee:ff", spec.mac))?;
    if let Some(existing) = state.endpoints.get(&id) {
        if existing.spec == spec {
            return Ok(()); // a retried ADD
        }
        endpoint_del(state, &id)?;
    }
    for other in state.endpoints.values() {
        if let Some(ip) = other.spec.ips.iter().find(|ip| spec.ips.contains(ip)) {
            bail!(
                "endpoint {id}: ip {ip} already belongs to endpoint {}",
                other.spec.container_id
            );
        }
    }
    let ifindex =
        sys::ifindex(&spec.host_ifname).with_context(|| format!("endpoint {id}: host_ifname"))?;
    let host_mac =
        sys::hwaddr(&spec.host_ifname).with_context(|| format!("endpoint {id}: host_ifname"))?;

    let mut live = LiveEndpoint {
        spec,
        ifindex,
        links: Vec::new(),
        keys: Vec::new(),
    };
    if let Err(e) = install(state, &mut live, mac, host_mac, fresh) {
        uninstall(state, &mut live);
        return Err(e.context(format!("endpoint {id}")));
    }
    info!(endpoint = %id, ifname = %live.spec.host_ifname, ifindex, ips = ?live.spec.ips, "endpoint added");
    state.endpoints.insert(id, live);
    Ok(())
}

/// Programs first, then map entries: once an address is in the map, the
/// programs that act on it are already there. Records what it did in `live`
/// so a failure part-way can be undone.
fn install(
    state: &mut State,
    live: &mut LiveEndpoint,
    mac: [u8; 6],
    host_mac: [u8; 6],
    fresh: bool,
) -> Result<()> {
    // Counters from an earlier endpoint that had the same ifindex must not
    // leak into this one.
    if fresh {
        remove_counters(state, live.ifindex);
    }
    for (prog, hook) in LXC_HOOKS {
        let link = state.datapath.attach(prog, &live.spec.host_ifname, hook)?;
        live.links.push(link);
    }
    let info = EndpointInfo {
        ifindex: live.ifindex,
        identity: 0,
        mac,
        host_mac,
        flags: EP_F_LOCAL,
        _pad: 0,
    };
    let mut map: BpfHashMap<&mut MapData, EndpointKey, EndpointInfo> =
        BpfHashMap::try_from(state.datapath.map_mut(MAP_ENDPOINTS)?)?;
    for ip in &live.spec.ips {
        let key = EndpointKey::from(*ip);
        map.insert(key, info, 0)
            .with_context(|| format!("{MAP_ENDPOINTS}: inserting {ip}"))?;
        live.keys.push(key);
    }
    Ok(())
}

fn uninstall(state: &mut State, live: &mut LiveEndpoint) {
    if let Ok(map) = state.datapath.map_mut(MAP_ENDPOINTS)
        && let Ok(mut map) = BpfHashMap::<&mut MapData, EndpointKey, EndpointInfo>::try_from(map)
    {
        for key in &live.keys {
            if let Err(e) = map.remove(key) {
                warn!("{MAP_ENDPOINTS}: removing {key}: {e}");
            }
        }
    }
    for link in live.links.drain(..) {
        // Fails harmlessly when the veth is already gone (its links went with it).
        if let Err(e) = state.datapath.detach(link) {
            debug!("detaching from {}: {e:#}", live.spec.host_ifname);
        }
    }
    remove_counters(state, live.ifindex);
}

fn remove_counters(state: &mut State, ifindex: u32) {
    let Ok(map) = state.datapath.map_mut(MAP_EP_METRICS) else {
        return;
    };
    let Ok(mut map) = PerCpuHashMap::<&mut MapData, EpMetricsKey, Counter>::try_from(map) else {
        return;
    };
    for direction in [Direction::FromEndpoint, Direction::ToEndpoint] {
        // Absent keys are the common case.
        let _ = map.remove(&EpMetricsKey::new(ifindex, direction));
    }
}

fn endpoint_del(state: &mut State, container_id: &str) -> Result<()> {
    // Unknown endpoints are not an error: DEL must be idempotent.
    if let Some(mut live) = state.endpoints.remove(container_id) {
        uninstall(state, &mut live);
        info!(endpoint = %container_id, "endpoint removed");
    }
    Ok(())
}

/// Uplink facts, forwarding, and in VXLAN mode the external-mode device.
async fn setup_node(datapath: Datapath, args: &AgentArgs, nl: &Nl) -> Result<(Datapath, Net, u32)> {
    sys::write_sysctl("net/ipv4/ip_forward", "1")?;
    let uplink = nl
        .link(&args.uplink)
        .await?
        .with_context(|| format!("--uplink {}: no such interface", args.uplink))?;
    let uplink_mtu = dataplane_common::netlink::link_mtu(&uplink).unwrap_or(1500);
    let node_ip = match args.node_ip {
        Some(ip) => ip,
        None => nl
            .addrs(uplink.header.index)
            .await?
            .into_iter()
            .find_map(|a| match a {
                std::net::IpAddr::V4(v4) => Some(v4),
                std::net::IpAddr::V6(_) => None,
            })
            .with_context(|| {
                format!(
                    "--uplink {} has no IPv4 address; pass --node-ip",
                    args.uplink
                )
            })?,
    };
    let mut vxlan_ifindex = 0;
    if args.mode == Mode::Vxlan {
        let dev = &args.vxlan_device;
        if nl.link(dev).await?.is_none() {
            nl.add_vxlan_external(dev, args.vxlan_port, uplink_mtu - VXLAN_OVERHEAD)
                .await?;
        }
        let link = nl
            .link(dev)
            .await?
            .with_context(|| format!("{dev} vanished after creation"))?;
        nl.set_up_noarp(link.header.index).await?;
        vxlan_ifindex = link.header.index;
        // Replies from remote pods to this node come back on the uplink,
        // not the device the request left by.
        sys::write_sysctl(&format!("net/ipv4/conf/{dev}/rp_filter"), "0")?;
    }
    let net = Net {
        mode: args.mode,
        uplink: args.uplink.clone(),
        uplink_ifindex: uplink.header.index,
        vxlan_ifindex,
        node_ip,
    };
    Ok((datapath, net, uplink_mtu))
}

fn attach_node_programs(
    datapath: &mut Datapath,
    net: &Net,
    args: &AgentArgs,
) -> Result<Vec<Attached>> {
    let mut links = vec![datapath.attach(PROG_HOST_IN, &net.uplink, TcAttachType::Ingress)?];
    if net.mode == Mode::Vxlan {
        let dev = &args.vxlan_device;
        links.push(datapath.attach(PROG_OVERLAY_IN, dev, TcAttachType::Ingress)?);
        links.push(datapath.attach(PROG_OVERLAY_OUT, dev, TcAttachType::Egress)?);
    }
    Ok(links)
}

fn save_registry(state: &State) -> Result<()> {
    let mut specs: Vec<&EndpointSpec> = state.endpoints.values().map(|e| &e.spec).collect();
    specs.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    if let Some(dir) = state.registry.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = state.registry.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&specs)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &state.registry)
        .with_context(|| format!("writing {}", state.registry.display()))
}

/// After a restart: adopt the endpoints an earlier agent registered (their
/// pinned links get our programs, their map entries stay), forget those whose
/// veth went away meanwhile, and remove pins and entries nobody claims.
fn restore(state: &mut State) -> Result<()> {
    let specs: Vec<EndpointSpec> = match std::fs::read(&state.registry) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(
                "{}: {e}; starting with no endpoints",
                state.registry.display()
            );
            Vec::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", state.registry.display())),
    };
    for spec in specs {
        let id = spec.container_id.clone();
        if sys::ifindex(&spec.host_ifname).is_ok() {
            match endpoint_add(state, spec, false) {
                Ok(()) => info!(endpoint = %id, "endpoint adopted"),
                Err(e) => warn!(endpoint = %id, "could not adopt: {e:#}"),
            }
        } else {
            info!(endpoint = %id, ifname = %spec.host_ifname, "endpoint gone while the agent was away");
        }
    }
    // Pins of links nobody claims (endpoints gone, programs renamed).
    let claimed: Vec<PathBuf> = state
        .endpoints
        .values()
        .flat_map(|e| e.links.iter())
        .chain(state.node_links.iter())
        .filter_map(|l| match l {
            Attached::Pinned(p) => Some(p.clone()),
            Attached::Owned(..) => None,
        })
        .collect();
    if let Ok(dir) = std::fs::read_dir(state.datapath.pin_dir().join("links")) {
        for pin in dir.flatten().map(|e| e.path()) {
            if !claimed.contains(&pin) {
                info!(pin = %pin.display(), "removing an unclaimed link");
                state.datapath.detach(Attached::Pinned(pin))?;
            }
        }
    }
    // Remote nodes an earlier agent installed: the first node list applied
    // updates them in place and removes those no longer listed.
    let installed: Vec<(String, RemoteNode)> = ipcache(&mut state.datapath)?
        .iter()
        .filter_map(|e| e.ok())
        .filter(|(_, v)| v.kind == IPCACHE_KIND_REMOTE_PODS)
        .filter_map(|(k, v)| {
            let (std::net::IpAddr::V4(net), Some(std::net::IpAddr::V4(ip))) =
                (k.data().ip()?, v.tunnel_endpoint())
            else {
                return None;
            };
            let len = u8::try_from(
                k.prefix_len()
                    .checked_sub(dataplane_common::IPCACHE_STATIC_PREFIX)?,
            )
            .ok()?;
            let pod_cidr = ipnetwork::Ipv4Network::new(net, len).ok()?;
            Some((
                format!("(installed before restart) {pod_cidr}"),
                RemoteNode { ip, pod_cidr },
            ))
        })
        .collect();
    state.nodes.extend(installed);
    telemetry::set_objects(&state.telemetry, "endpoint", state.endpoints.len());
    // Local endpoint entries nobody claims.
    let live: Vec<EndpointKey> = state
        .endpoints
        .values()
        .flat_map(|e| e.keys.iter().copied())
        .collect();
    let stale: Vec<(EndpointKey, EndpointInfo)> = {
        let map: BpfHashMap<&mut MapData, EndpointKey, EndpointInfo> =
            BpfHashMap::try_from(state.datapath.map_mut(MAP_ENDPOINTS)?)?;
        map.iter()
            .filter_map(|e| e.ok())
            .filter(|(k, v)| v.flags & EP_F_LOCAL != 0 && !live.contains(k))
            .collect()
    };
    for (key, info) in stale {
        let mut map: BpfHashMap<&mut MapData, EndpointKey, EndpointInfo> =
            BpfHashMap::try_from(state.datapath.map_mut(MAP_ENDPOINTS)?)?;
        map.remove(&key)
            .with_context(|| format!("{MAP_ENDPOINTS}: removing {key}"))?;
        remove_counters(state, info.ifindex);
        info!(ip = %key, "removed the entry of an endpoint that is gone");
    }
    save_registry(state)
}

fn ipcache(
    datapath: &mut Datapath,
) -> Result<aya::maps::lpm_trie::LpmTrie<&mut MapData, IpcacheKey, IpcacheEntry>> {
    Ok(aya::maps::lpm_trie::LpmTrie::try_from(
        datapath.map_mut(MAP_IPCACHE)?,
    )?)
}

fn ipcache_put(
    datapath: &mut Datapath,
    net: ipnetwork::IpNetwork,
    entry: IpcacheEntry,
) -> Result<()> {
    let (len, key) = IpcacheKey::prefix(net.network(), net.prefix());
    ipcache(datapath)?
        .insert(&aya::maps::lpm_trie::Key::new(len, key), entry, 0)
        .with_context(|| format!("{MAP_IPCACHE}: inserting {net}"))
}

fn ipcache_del(datapath: &mut Datapath, net: ipnetwork::IpNetwork) -> Result<()> {
    let (len, key) = IpcacheKey::prefix(net.network(), net.prefix());
    match ipcache(datapath)?.remove(&aya::maps::lpm_trie::Key::new(len, key)) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("{MAP_IPCACHE}: removing {net}")),
    }
}

fn entry(kind: u8, tunnel: Option<std::net::Ipv4Addr>) -> IpcacheEntry {
    let mut e = IpcacheEntry {
        kind,
        ..Default::default()
    };
    if let Some(ip) = tunnel {
        e.tunnel_family = dataplane_common::FAMILY_IPV4;
        e.tunnel_endpoint[..4].copy_from_slice(&ip.octets());
    }
    e
}

fn host_net(ip: std::net::Ipv4Addr) -> ipnetwork::IpNetwork {
    ipnetwork::IpNetwork::V4(ipnetwork::Ipv4Network::from(ip))
}

/// Settings, the cluster range, this node's CIDR and address.
fn init_maps(
    datapath: &mut Datapath,
    net: &Net,
    args: &AgentArgs,
    cluster_cidr: ipnetwork::IpNetwork,
    pod_cidr: Option<ipnetwork::IpNetwork>,
) -> Result<()> {
    let cfg = DatapathConfig {
        mode: match net.mode {
            Mode::Vxlan => MODE_VXLAN,
            Mode::Native => MODE_NATIVE,
        },
        _pad: [0; 3],
        vni: args.vni,
        vxlan_ifindex: net.vxlan_ifindex,
        uplink_ifindex: net.uplink_ifindex,
    };
    let mut config: aya::maps::Array<&mut MapData, DatapathConfig> =
        aya::maps::Array::try_from(datapath.map_mut(MAP_CONFIG)?)?;
    config.set(0, cfg, 0).context("writing dp_config")?;
    ipcache_put(datapath, cluster_cidr, entry(IPCACHE_KIND_CLUSTER, None))?;
    if let Some(cidr) = pod_cidr {
        ipcache_put(datapath, cidr, entry(IPCACHE_KIND_LOCAL_PODS, None))?;
    }
    ipcache_put(
        datapath,
        host_net(net.node_ip),
        entry(IPCACHE_KIND_HOST, None),
    )
}

fn route_for(net: &Net, node: &RemoteNode) -> rtnetlink::packet_route::route::RouteMessage {
    let cidr = node.pod_cidr;
    match net.mode {
        Mode::Vxlan => {
            Nl::pod_cidr_route(cidr.network(), cidr.prefix(), net.vxlan_ifindex, None, None)
        }
        Mode::Native => Nl::pod_cidr_route(
            cidr.network(),
            cidr.prefix(),
            net.uplink_ifindex,
            Some(node.ip),
            None,
        ),
    }
}

/// Moves the datapath from the applied node list to `new`, touching only
/// nodes that changed: new entries go in before stale ones come out.
async fn apply_nodes(
    state: &Arc<Mutex<State>>,
    nl: &Nl,
    new: std::collections::BTreeMap<String, RemoteNode>,
) -> Result<()> {
    let lock = || {
        state
            .lock()
            .map_err(|_| anyhow::anyhow!("agent state poisoned"))
    };
    let (remove, routes_up, own_ip) = {
        let mut st = lock()?;
        let (upsert, remove) = nodes::diff(&st.nodes, &new);
        let routes: Vec<_> = upsert.iter().map(|(_, n)| route_for(&st.net, n)).collect();
        for (name, n) in &upsert {
            ipcache_put(
                &mut st.datapath,
                ipnetwork::IpNetwork::V4(n.pod_cidr),
                entry(IPCACHE_KIND_REMOTE_PODS, Some(n.ip)),
            )?;
            ipcache_put(
                &mut st.datapath,
                host_net(n.ip),
                entry(IPCACHE_KIND_HOST, None),
            )?;
            info!(node = %name, ip = %n.ip, pod_cidr = %n.pod_cidr, "node installed");
        }
        (remove, routes, st.net.node_ip)
    };
    for route in routes_up {
        nl.replace_route(route).await?;
    }
    let still_used_cidr = |n: &RemoteNode| new.values().any(|m| m.pod_cidr == n.pod_cidr);
    let still_used_ip = |n: &RemoteNode| n.ip == own_ip || new.values().any(|m| m.ip == n.ip);
    for (_, n) in &remove {
        if !still_used_cidr(n) {
            let route = route_for(&lock()?.net, n);
            nl.del_route(route).await?;
        }
    }
    let mut st = lock()?;
    for (name, n) in &remove {
        if !still_used_cidr(n) {
            ipcache_del(&mut st.datapath, ipnetwork::IpNetwork::V4(n.pod_cidr))?;
        }
        if !still_used_ip(n) {
            ipcache_del(&mut st.datapath, host_net(n.ip))?;
        }
        if !new.contains_key(name) {
            info!(node = %name, ip = %n.ip, pod_cidr = %n.pod_cidr, "node removed");
        }
    }
    st.nodes = new;
    Ok(())
}

/// Applies every new store the source publishes; the first success makes
/// the agent ready.
async fn reconcile_loop(
    mut rx: tokio::sync::watch::Receiver<Option<Store>>,
    own: String,
    state: Arc<Mutex<State>>,
    nl: Nl,
    t: telemetry::Shared,
) {
    let mut reported = std::collections::BTreeSet::new();
    loop {
        let Some(store) = rx.borrow_and_update().clone() else {
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        let started = std::time::Instant::now();
        for kind in Kind::ALL {
            telemetry::set_objects(&t, kind.name(), store.count(kind));
        }
        let mut desired = cluster::desired(&store, &own);
        // Each problem is reported when it appears, not on every change.
        let problems = std::mem::take(&mut desired.problems);
        for p in problems.difference(&reported) {
            telemetry::error(&t, "object_conflict");
            warn!("{p}");
        }
        for p in reported.difference(&problems) {
            info!("resolved: {p}");
        }
        reported = problems;
        match apply_desired(&state, &nl, desired).await {
            Ok(()) => {
                telemetry::reconciled(&t, "cluster", started.elapsed());
                telemetry::set_ready(&t);
            }
            Err(e) => {
                telemetry::error(&t, "reconcile");
                warn!("applying cluster state: {e:#}");
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Moves the datapath to `d`: this node's CIDR, remote nodes, remote pods.
async fn apply_desired(state: &Arc<Mutex<State>>, nl: &Nl, d: cluster::Desired) -> Result<()> {
    {
        let mut st = state
            .lock()
            .map_err(|_| anyhow::anyhow!("agent state poisoned"))?;
        if !st.own_cidr_fixed && d.own_pod_cidr.is_some() && st.own_cidr != d.own_pod_cidr {
            let (old, new) = (st.own_cidr, d.own_pod_cidr);
            if let Some(new) = new {
                ipcache_put(
                    &mut st.datapath,
                    ipnetwork::IpNetwork::V4(new),
                    entry(IPCACHE_KIND_LOCAL_PODS, None),
                )?;
                st.pod_cidr = Some(new.to_string());
            }
            if let Some(old) = old {
                ipcache_del(&mut st.datapath, ipnetwork::IpNetwork::V4(old))?;
            }
            st.own_cidr = new;
            info!(pod_cidr = ?new, "this node's pod CIDR, from its Node object");
        }
        apply_remote_pods(&mut st, &d.remote_pods)?;
    }
    apply_nodes(state, nl, d.nodes).await
}

/// Remote pods in the endpoint map (identity slot for policy), by
/// difference; a local endpoint's entry is never overwritten.
fn apply_remote_pods(
    st: &mut State,
    want: &std::collections::BTreeMap<std::net::IpAddr, String>,
) -> Result<()> {
    let local: Vec<std::net::IpAddr> = st
        .endpoints
        .values()
        .flat_map(|e| e.spec.ips.iter().copied())
        .collect();
    let mut map: BpfHashMap<&mut MapData, EndpointKey, EndpointInfo> =
        BpfHashMap::try_from(st.datapath.map_mut(MAP_ENDPOINTS)?)?;
    for (ip, pod) in want {
        if st.remote_pods.get(ip) == Some(pod) {
            continue;
        }
        if local.contains(ip) {
            warn!(pod = %pod, "address {ip} belongs to a local endpoint; remote pod skipped");
            continue;
        }
        map.insert(EndpointKey::from(*ip), EndpointInfo::default(), 0)
            .with_context(|| format!("{MAP_ENDPOINTS}: inserting remote pod {pod} {ip}"))?;
    }
    for ip in st.remote_pods.keys() {
        if !want.contains_key(ip) && !local.contains(ip) {
            match map.remove(&EndpointKey::from(*ip)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).with_context(|| format!("{MAP_ENDPOINTS}: removing {ip}")),
            }
        }
    }
    st.remote_pods = want
        .iter()
        .filter(|(ip, _)| !local.contains(ip))
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    Ok(())
}
