//! The node agent: loads and pins the datapath, serves the local API (the
//! CNI plugin registers endpoints through it), and keeps the maps and routes
//! in line with the cluster state its source reports.
//!
//! State is split by what touches it, each part behind its own lock held
//! only for a few syscalls: the programs (attach/detach, taken by endpoint
//! adds), each map's desired contents, the endpoint registry, the status.
//! The API and the reconciler run on a multi-threaded runtime and never
//! wait on each other's slow work: an attach does not hold any map's lock,
//! and the reconciler never takes the programs' lock.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{MapData, PerCpuArray};
use dataplane_common::netlink::Nl;
use ipnetwork::IpNetwork;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{info, warn};

mod api;
pub mod bgp;
pub mod config;
mod endpoints;
mod network;
pub(crate) use network::HOST_DEVICE;
mod policy;
mod reconcile;
mod services;

use crate::{
    bpf::{AttachMode, Attached, Datapath, XdpSetting},
    cluster::Update,
    maps::{
        config::ConfigMap,
        ct::{AffinityMap, CtMap},
        endpoints::EndpointMap,
        endpoints::Endpoints,
        ep_metrics::EpMetricsMap,
        ipcache::Ipcache,
        ipcache::IpcacheMap,
        policy::{PolicyCidrMap, PolicyMap},
        prefilter::PrefilterMap,
        services::{BackendsMap, MaglevMap, Services, ServicesMap},
        sock::SockClientsMap,
    },
    source_dir, source_kube, sys, telemetry,
};

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// This node's name (the Kubernetes Node name).
    #[arg(long)]
    pub node: String,
    /// Settings from a file (YAML, `key: value`) or a directory of files
    /// named by key (a mounted ConfigMap). A key is a flag's long name
    /// (`mode`, `vni`, …); a flag on the command line overrides it, and an
    /// unknown key or a bad value stops the agent, naming both.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The agent's own log filter: a level (`error` … `trace`) or
    /// tracing directives (`info,dataplane::agent=debug`). RUST_LOG, when
    /// set, wins.
    #[arg(long, default_value = "info", value_parser = parse_log_level)]
    pub log_level: String,
    /// bpffs directory under which each node pins into `<root>/<node>/`
    /// (the node name escaped: bpffs refuses dots).
    #[arg(long, default_value = dataplane_common::PIN_ROOT)]
    pub pin_root: PathBuf,
    /// Unix socket of the local API (CNI plugin, CLI).
    #[arg(long, default_value = dataplane_common::api::DEFAULT_SOCKET)]
    pub api_socket: PathBuf,
    /// How TC programs are attached.
    #[arg(long, value_enum, default_value = "auto")]
    pub attach_mode: AttachMode,
    /// How the XDP program goes on the uplink.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp: XdpSetting,
    /// The cgroup v2 directory whose processes the socket programs see:
    /// `auto` is the root of the cgroup v2 mount (found in the mount
    /// table), `off` attaches none.
    #[arg(long, default_value = "auto")]
    pub cgroup_root: String,
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
    /// The node's uplink (underlay interface), or `auto`: the one holding
    /// --node-ip, else the default route's, else the only interface with
    /// an IPv4 address besides loopback and the agent's own.
    #[arg(long, default_value = "eth0")]
    pub uplink: String,
    /// This node's underlay address; the uplink's first IPv4 address if unset.
    #[arg(long)]
    pub node_ip: Option<Ipv4Addr>,
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
    /// In a cluster (`KUBERNETES_SERVICE_HOST` set, no --kubeconfig): the
    /// service account's `token`, `ca.crt` and `namespace`. The token is
    /// reread as the kubelet rotates it.
    #[arg(long, default_value = "/var/run/secrets/kubernetes.io/serviceaccount")]
    pub service_account_dir: PathBuf,
    /// The API server as HOST:PORT, instead of `KUBERNETES_SERVICE_HOST`
    /// and `_PORT`: those name the `kubernetes` Service's ClusterIP, which
    /// only works once Services do, so a kube-proxy-free cluster gives the
    /// API server's own address here.
    #[arg(long)]
    pub k8s_api_server: Option<String>,
    /// MTU for pod interfaces; default: the uplink's MTU, minus VXLAN's 50
    /// bytes in VXLAN mode.
    #[arg(long)]
    pub pod_mtu: Option<u32>,
    /// Where the agent keeps state it needs after a restart (the endpoints,
    /// clsact filters).
    #[arg(long, default_value = "/var/run/dataplane")]
    pub state_dir: PathBuf,
    /// On SIGTERM/SIGINT remove the datapath (programs, pins, device,
    /// routes). By default it keeps forwarding until the next agent adopts it.
    #[arg(long)]
    pub cleanup: bool,
    /// Where the node's sysctls are (`net/...` below it): the DaemonSet
    /// mounts the host's `/proc/sys/net` here, a container's own
    /// `/proc/sys` being read-only.
    #[arg(long, default_value = "/proc/sys")]
    pub sysctl_root: PathBuf,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = crate::telemetry::DEFAULT_ADDR)]
    pub metrics_addr: String,
    /// Most verbose kernel log level that reaches the agent's log.
    #[arg(long, value_enum, default_value = "info")]
    pub bpf_log_level: BpfLogLevel,
    /// Pods' traffic to addresses outside the cluster (pod range, nodes,
    /// Services and --non-masquerade-cidr) leaves with the node's address.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub masquerade: bool,
    /// Socket LB: a pod's (or the node's) TCP connect and UDP send to a
    /// Service go straight to a backend, translated in the socket hooks,
    /// not per packet. Frontends with a Maglev table, and traffic the
    /// hooks do not see, use the per-packet path either way.
    #[arg(long, value_enum, default_value = "on")]
    pub socket_lb: OnOff,
    /// NodePort, LoadBalancer and external-IP traffic from outside served
    /// in XDP on the uplink (with --xdp not off): translated and sent back
    /// out of the uplink before the stack allocates an skb, when the
    /// backend is on another node and for replies to outside clients;
    /// backends on this node are left to tc.
    #[arg(long, value_enum, default_value = "on")]
    pub xdp_lb: OnOff,
    /// Destinations outside the cluster that pods reach with their own
    /// address (repeat for several).
    #[arg(long = "non-masquerade-cidr")]
    pub non_masquerade_cidrs: Vec<String>,
    /// The Service range: ClusterIPs live there, and an address or port in
    /// it that no Service has is dropped (`no_service`).
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cidr: String,
    /// Maglev table size for externally reachable frontends (a prime up to
    /// 65521).
    #[arg(long, default_value_t = dataplane_common::MAGLEV_DEFAULT_SIZE)]
    pub maglev_table_size: u32,
    /// Conntrack table size (entries; a flow takes two). When full, the
    /// least recently used entries are evicted and counted. Changing it
    /// replaces the table (tracked flows are forgotten).
    #[arg(long, default_value_t = dataplane_common::CT_MAX)]
    pub ct_max: u32,
    /// Source prefixes (or addresses) whose packets the uplink drops
    /// before the stack sees them (XDP; tc when XDP is off), counted as
    /// `prefilter_denied` (repeat, or comma-separate in a config).
    /// `dataplane prefilter add|delete` changes the set until the next
    /// start.
    #[arg(long = "deny-cidr")]
    pub deny_cidrs: Vec<String>,
    /// How often expired conntrack entries are removed.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub ct_gc_interval: std::time::Duration,
    /// BGP: a BIRD 2 daemon, configured and started by the agent in the
    /// node's network namespace, advertises the node's pod CIDR to
    /// `--bgp-peer`s and installs what they advertise into the kernel's
    /// routing table (native routing across L3: the agent then installs no
    /// routes to other nodes' pods itself). It outlives the agent.
    #[arg(long, value_enum, default_value = "off")]
    pub bgp: OnOff,
    /// This node's AS number.
    #[arg(long, default_value = "64512", value_parser = crate::bgp::parse_asn)]
    pub bgp_asn: u32,
    /// A BGP neighbour, `ADDRESS:ASN` (repeat, or comma-separate in a
    /// config): eBGP when its AS differs from --bgp-asn, iBGP otherwise.
    #[arg(long = "bgp-peer", value_delimiter = ',')]
    pub bgp_peers: Vec<crate::bgp::Peer>,
    /// Also advertise LoadBalancer ingress IPs and external IPs (with
    /// externalTrafficPolicy Local, only while this node has an endpoint).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub bgp_advertise_services: bool,
    /// Seconds peers keep this node's routes while its daemon restarts.
    #[arg(long, default_value_t = 120)]
    pub bgp_graceful_restart_time: u32,
    /// The BIRD 2 daemon (`birdc` is expected next to it, or on PATH).
    #[arg(long, default_value = "bird")]
    pub bgp_daemon: PathBuf,
}

#[derive(Clone, Debug)]
pub enum Source {
    Dir(PathBuf),
    Kube,
}

fn parse_log_level(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("{s:?}: {e}"))
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
    /// Plain routing: via each node's underlay address (nodes on one L2),
    /// or as BGP peers teach it (--bgp on).
    Native,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Vxlan => "vxlan",
            Mode::Native => "native",
        }
    }
}

/// Bytes VXLAN adds: outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8.
const VXLAN_OVERHEAD: u32 = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
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

/// The node's network facts, fixed at start.
pub(crate) struct Net {
    mode: Mode,
    uplink: String,
    uplink_ifindex: u32,
    vxlan_device: String,
    vxlan_ifindex: u32,
    node_ip: Ipv4Addr,
    vni: u32,
    masquerade: bool,
    socket_lb: bool,
    xdp_lb: bool,
    vxlan_port: u16,
    /// The host device (`dp_host`).
    hostdev_ifindex: u32,
    service_cidr: ipnetwork::Ipv4Network,
}

/// What the status answer and readiness are made of.
#[derive(Default)]
pub(crate) struct Status {
    /// This node's pod CIDR as applied; fixed when `--pod-cidr` is given.
    own_cidr: Option<IpNetwork>,
    nodes: usize,
    restored: bool,
    synced: bool,
    frontends: usize,
    frontends_empty: usize,
    backends: usize,
}

impl Status {
    fn ready(&self) -> bool {
        self.restored && self.synced && self.own_cidr.is_some()
    }
}

pub(crate) struct Agent {
    node: String,
    /// The BGP speaker, with --bgp on.
    bgp: Option<bgp::Bgp>,
    state_dir: PathBuf,
    bgp_advertise_services: bool,
    pod_mtu: u32,
    net: Net,
    own_cidr_fixed: bool,
    cgroup: Option<PathBuf>,
    xdp: XdpSetting,
    telemetry: telemetry::Shared,
    pin_dir: PathBuf,
    /// Where registered endpoints are kept across restarts.
    registry_file: PathBuf,
    nl: Nl,
    /// Programs: attach and detach only.
    datapath: Mutex<Datapath>,
    endpoints: Mutex<Endpoints>,
    ep_metrics: Mutex<EpMetricsMap>,
    ipcache: Mutex<Ipcache>,
    services: Mutex<Services>,
    ct: Mutex<CtMap>,
    affinity: Mutex<AffinityMap>,
    ct_stats: Mutex<PerCpuArray<MapData, u64>>,
    /// Entries removed by flushes since the collector's last pass.
    ct_flushed: Mutex<usize>,
    /// (frontend id, backend id) pairs whose flows the collector purges.
    ct_purge: mpsc::UnboundedSender<BTreeSet<(u32, u32)>>,
    /// Local endpoints by container id.
    registry: Mutex<std::collections::BTreeMap<String, endpoints::LiveEndpoint>>,
    /// What the routes are made of (see `network::sync_routes`).
    routes: Mutex<network::RouteWants>,
    /// Links of the node-level programs.
    node_links: Mutex<Vec<Attached>>,
    status: Mutex<Status>,
    /// Endpoint adds and deletes run one at a time (not the reconciler).
    api_lock: tokio::sync::Mutex<()>,
    /// Compiled NetworkPolicy per local endpoint.
    policy: Mutex<policy::PolicyState>,
    /// Local endpoints changed: their policy needs compiling.
    policy_dirty: tokio::sync::Notify,
    /// Endpoint changes asked to be compiled so far, and how many of them
    /// the reconciler has compiled: an endpoint ADD returns once its
    /// policy is in the maps.
    policy_wanted: std::sync::atomic::AtomicU64,
    policy_applied: tokio::sync::watch::Sender<u64>,
    /// Sync barriers asked for (the local API's `sync`), to the source: it
    /// rereads what it watches and passes the barrier on behind what it
    /// found.
    barrier_seq: std::sync::atomic::AtomicU64,
    barrier_requests: mpsc::UnboundedSender<u64>,
    /// The latest barrier the reconciler has passed.
    barrier_passed: tokio::sync::watch::Sender<u64>,
    /// Pods' and Services' addresses by name, for the local API's
    /// `resolve` (kept by the reconciler).
    directory: Mutex<Directory>,
    /// The prefilter's map and the prefixes it must hold.
    prefilter: Mutex<(PrefilterMap, BTreeSet<IpNetwork>)>,
    /// Network namespaces the socket programs know (local pods and this
    /// node), and this node's own namespace cookie.
    sock_clients: Mutex<SockClientsMap>,
    own_netns_cookie: Option<u64>,
}

/// Addresses by (namespace, name).
#[derive(Default)]
pub(crate) struct Directory {
    pods: std::collections::BTreeMap<(String, String), Vec<std::net::IpAddr>>,
    services: std::collections::BTreeMap<(String, String), Vec<std::net::IpAddr>>,
}

/// A poisoned lock means a panic elsewhere; the agent reports it instead of
/// panicking again.
fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| anyhow::anyhow!("agent state poisoned"))
}

impl Agent {
    /// Readiness follows the status: the local API and `/readyz` agree.
    fn update_ready(&self) -> Result<bool> {
        let ready = lock(&self.status)?.ready();
        telemetry::set_ready(&self.telemetry, ready);
        Ok(ready)
    }
}

fn resolve_cgroup(arg: &str) -> Result<Option<PathBuf>> {
    let path = match arg {
        "off" => return Ok(None),
        "auto" => sys::cgroup2_mount()?,
        p => PathBuf::from(p),
    };
    if !sys::is_cgroup2(&path)? {
        bail!(
            "--cgroup-root {}: not a cgroup v2 directory",
            path.display()
        );
    }
    Ok(Some(path))
}

pub async fn run(args: AgentArgs) -> Result<()> {
    dataplane_common::pin::validate_node_name(&args.node)
        .map_err(|e| anyhow::anyhow!("--node: {e}"))?;
    let pin_dir = dataplane_common::pin_dir(&args.pin_root, &args.node);
    sys::ensure_pin_dir(&pin_dir)?;
    sys::set_sysctl_root(&args.sysctl_root);
    if !crate::lb::is_prime(args.maglev_table_size)
        || args.maglev_table_size > dataplane_common::MAGLEV_MAX_SIZE
    {
        bail!(
            "--maglev-table-size {}: must be a prime up to {}",
            args.maglev_table_size,
            dataplane_common::MAGLEV_MAX_SIZE
        );
    }
    if args.ct_max < 64 {
        bail!("--ct-max {}: at least 64 entries", args.ct_max);
    }
    let (mut datapath, logger) = Datapath::load(
        &pin_dir,
        &args.state_dir,
        args.attach_mode,
        args.bpf_log_level.code(),
        &[(dataplane_common::MAP_CT, args.ct_max)],
    )?;
    info!(node = %args.node, pin_dir = %pin_dir.display(), attach_mode = datapath.mode().name(), "datapath loaded");
    for s in datapath.stats()? {
        info!(
            program = s.name,
            kind = s.kind.name(),
            verified_insns = s.verified_insns.unwrap_or(0),
            "program loaded"
        );
    }

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
    let cgroup = resolve_cgroup(&args.cgroup_root)?;
    let nl = Nl::new()?;
    let (net, uplink_mtu) = network::setup_node(&args, &nl).await?;
    let pod_mtu = args.pod_mtu.unwrap_or(match net.mode {
        Mode::Vxlan => uplink_mtu - VXLAN_OVERHEAD,
        Mode::Native => uplink_mtu,
    });

    // Settings and the static prefixes go in before any of our programs
    // runs: a map recreated for a new layout is filled first.
    let mut config = ConfigMap::new(datapath.take_map(dataplane_common::MAP_CONFIG)?)?;
    config.sync(network::datapath_config(&net))?;
    let mut ipcache = Ipcache::new(
        IpcacheMap::new(datapath.take_map(dataplane_common::MAP_IPCACHE)?)?,
        cluster_cidr,
        net.node_ip,
    );
    let no_masquerade = args
        .non_masquerade_cidrs
        .iter()
        .map(|c| {
            dataplane_common::api::parse_cidr(c)
                .map_err(|e| anyhow::anyhow!("--non-masquerade-cidr {c}: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    ipcache.set_fixed(IpNetwork::V4(net.service_cidr), &no_masquerade)?;
    ipcache.set_own_cidr(pod_cidr)?;
    // Denied before anything else is attached: a restart does not open a
    // window for them.
    let deny = args
        .deny_cidrs
        .iter()
        .map(|c| crate::maps::prefilter::parse_cidr(c).with_context(|| format!("--deny-cidr {c}")))
        .collect::<Result<BTreeSet<_>>>()?;
    let mut prefilter = PrefilterMap::new(datapath.take_map(dataplane_common::MAP_PREFILTER)?)?;
    let sock_clients = SockClientsMap::new(datapath.take_map(dataplane_common::MAP_SOCK_CLIENTS)?)?;
    prefilter.set(&deny)?;
    let endpoint_map = EndpointMap::new(datapath.take_map(dataplane_common::MAP_ENDPOINTS)?)?;
    let ep_metrics = EpMetricsMap::new(datapath.take_map(dataplane_common::MAP_EP_METRICS)?)?;
    let services = Services::new(
        ServicesMap::new(datapath.take_map(dataplane_common::MAP_SERVICES)?)?,
        BackendsMap::new(datapath.take_map(dataplane_common::MAP_BACKENDS)?)?,
        MaglevMap::new(datapath.take_map(dataplane_common::MAP_MAGLEV)?)?,
        args.maglev_table_size,
    )?;
    let ct = CtMap::new(datapath.take_map(dataplane_common::MAP_CT)?)?;
    let affinity = AffinityMap::new(datapath.take_map(dataplane_common::MAP_AFFINITY)?)?;
    let ct_stats = PerCpuArray::try_from(datapath.take_map(dataplane_common::MAP_CT_STATS)?)?;
    let (ct_purge, purges) = mpsc::unbounded_channel();
    let policy_state = policy::PolicyState::new(
        PolicyMap::new(datapath.take_map(dataplane_common::MAP_POLICY)?)?,
        PolicyCidrMap::new(datapath.take_map(dataplane_common::MAP_POLICY_CIDR)?)?,
        crate::maps::events::PolicyNamesMap::new(
            datapath.take_map(dataplane_common::MAP_POLICY_NAMES)?,
        )?,
    );

    let bgp = match args.bgp {
        OnOff::Off => None,
        OnOff::On => {
            if args.bgp_peers.is_empty() {
                bail!("--bgp on: no --bgp-peer to speak to");
            }
            Some(bgp::Bgp::new(
                crate::bgp::Speaker {
                    asn: args.bgp_asn,
                    router_id: net.node_ip,
                    peers: args.bgp_peers.clone(),
                    graceful_restart: args.bgp_graceful_restart_time,
                },
                &args.state_dir,
                args.bgp_daemon.clone(),
            )?)
        }
    };
    let telemetry = telemetry::Telemetry::new(
        pin_dir.clone(),
        bgp.as_ref().map(|b| (b.client(), b.control_socket())),
    );
    let (barrier_requests, barriers) = mpsc::unbounded_channel();
    let agent = Arc::new(Agent {
        node: args.node.clone(),
        bgp,
        state_dir: args.state_dir.clone(),
        bgp_advertise_services: args.bgp_advertise_services,
        pod_mtu,
        net,
        own_cidr_fixed: pod_cidr.is_some(),
        cgroup,
        xdp: args.xdp,
        telemetry: telemetry.clone(),
        pin_dir: pin_dir.clone(),
        registry_file: args.state_dir.join("endpoints.json"),
        nl: nl.clone(),
        datapath: Mutex::new(datapath),
        endpoints: Mutex::new(Endpoints::new(endpoint_map)),
        ep_metrics: Mutex::new(ep_metrics),
        ipcache: Mutex::new(ipcache),
        services: Mutex::new(services),
        ct: Mutex::new(ct),
        affinity: Mutex::new(affinity),
        ct_stats: Mutex::new(ct_stats),
        ct_flushed: Mutex::new(0),
        ct_purge,
        registry: Mutex::new(Default::default()),
        routes: Mutex::new(Default::default()),
        node_links: Mutex::new(Vec::new()),
        status: Mutex::new(Status {
            own_cidr: pod_cidr,
            ..Default::default()
        }),
        api_lock: tokio::sync::Mutex::new(()),
        policy: Mutex::new(policy_state),
        policy_dirty: tokio::sync::Notify::new(),
        policy_wanted: std::sync::atomic::AtomicU64::new(0),
        policy_applied: tokio::sync::watch::Sender::new(0),
        barrier_seq: std::sync::atomic::AtomicU64::new(0),
        barrier_requests,
        barrier_passed: tokio::sync::watch::Sender::new(0),
        directory: Mutex::default(),
        prefilter: Mutex::new((prefilter, deny)),
        sock_clients: Mutex::new(sock_clients),
        own_netns_cookie: dataplane_common::netns::cookie().ok(),
    });

    endpoints::restore(&agent).await?;
    network::attach_node_programs(&agent)?;
    endpoints::sweep_unclaimed(&agent)?;
    let xdp = network::xdp_mode(&agent).await?;
    lock(&agent.status)?.restored = true;
    info!(mode = agent.net.mode.name(), uplink = %agent.net.uplink, node_ip = %agent.net.node_ip, pod_mtu, xdp, "node datapath ready");
    if !args.cleanup {
        network::sync_bgp(&agent, true);
    }

    telemetry::serve(&args.metrics_addr, telemetry.clone()).await?;

    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    match args.source.clone() {
        Source::Dir(dir) => {
            let t = telemetry.clone();
            tokio::spawn(async move { source_dir::run(dir, tx, barriers, t).await });
        }
        Source::Kube => {
            let client = source_kube::client(
                args.kubeconfig.as_ref(),
                args.k8s_api_server.as_deref(),
                &args.service_account_dir,
            )
            .await?;
            let t = telemetry.clone();
            // The watches deliver on their own: a barrier follows whatever
            // they have delivered so far.
            let forward = tx.clone();
            tokio::spawn(async move {
                let mut barriers = barriers;
                while let Some(b) = barriers.recv().await {
                    if forward.send(Update::Barrier(b)).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move { source_kube::run(client, tx, t).await });
        }
    }
    {
        let agent = agent.clone();
        tokio::spawn(async move { reconcile::run(rx, agent).await });
    }
    {
        let agent = agent.clone();
        let every = args.ct_gc_interval;
        tokio::spawn(async move { services::collector(agent, every, purges).await });
    }
    if let Some(b) = &agent.bgp {
        tokio::spawn(bgp::watch_sessions(b.reader()));
    }

    let listener = api::bind(&args.api_socket)?;
    info!(socket = %args.api_socket.display(), "local API listening");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let agent = agent.clone();
                    tokio::spawn(async move {
                        if let Err(e) = api::serve(stream, agent).await {
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
        network::cleanup(&agent).await?;
    } else {
        info!(
            "shutting down; the datapath keeps running (pinned under {})",
            pin_dir.display()
        );
    }
    Ok(())
}
