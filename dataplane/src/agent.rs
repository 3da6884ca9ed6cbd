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
    programs::{TcAttachType, tc::SchedClassifierLinkId},
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
    bpf::{AttachMode, Datapath},
    sys,
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
    /// MTU for pod interfaces: 1450 leaves room for VXLAN's 50 bytes on a
    /// 1500-byte underlay.
    #[arg(long, default_value_t = 1450)]
    pub pod_mtu: u32,
    /// Most verbose kernel log level that reaches the agent's log.
    #[arg(long, value_enum, default_value = "info")]
    pub bpf_log_level: BpfLogLevel,
}

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
    links: Vec<(&'static str, SchedClassifierLinkId)>,
    keys: Vec<EndpointKey>,
}

struct State {
    node: String,
    pod_cidr: Option<String>,
    pod_mtu: u32,
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

    if let Some(cidr) = &args.pod_cidr {
        dataplane_common::api::parse_cidr(cidr).map_err(|e| anyhow::anyhow!("--pod-cidr: {e}"))?;
    }
    let state = Arc::new(Mutex::new(State {
        node: args.node.clone(),
        pod_cidr: args.pod_cidr.clone(),
        pod_mtu: args.pod_mtu,
        datapath,
        endpoints: HashMap::new(),
    }));

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
    info!("shutting down");
    let _ = std::fs::remove_file(&args.api_socket);
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
    let result = match request {
        Request::Status => Ok(Response::Status(AgentStatus {
            node: state.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            attach_mode: state.datapath.mode().name().to_owned(),
            pin_dir: state.datapath.pin_dir().display().to_string(),
            endpoints: state.endpoints.len(),
            pod_cidr: state.pod_cidr.clone(),
            pod_mtu: state.pod_mtu,
        })),
        Request::EndpointAdd(spec) => endpoint_add(state, spec).map(|()| Response::Ok),
        Request::EndpointDel { container_id } => {
            endpoint_del(state, &container_id).map(|()| Response::Ok)
        }
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

fn endpoint_add(state: &mut State, spec: EndpointSpec) -> Result<()> {
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
    if let Err(e) = install(state, &mut live, mac, host_mac) {
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
) -> Result<()> {
    // Counters from an earlier endpoint that had the same ifindex must not
    // leak into this one.
    remove_counters(state, live.ifindex);
    for (prog, hook) in LXC_HOOKS {
        let link = state.datapath.attach(prog, &live.spec.host_ifname, hook)?;
        live.links.push((prog, link));
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
    for (prog, link) in live.links.drain(..) {
        // Fails harmlessly when the veth is already gone (its links went with it).
        if let Err(e) = state.datapath.detach(prog, link) {
            debug!("detaching {prog} from {}: {e:#}", live.spec.host_ifname);
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
