//! The lab: a simulated cluster built from network namespaces on one kernel.
//!
//! ```text
//!   <id>-ext (external host, 172.20.0.100)
//!        |
//!   <id>-ul: bridge br0 ── the "datacenter L2" underlay, 172.20.0.0/24
//!        |                      |
//!   <id>-n0 eth0 .11        <id>-n1 eth0 .12      (nodes; each runs a `dataplane agent`)
//!     lxc* ── <id>-n0-p0      lxc* ── <id>-n1-p0  (pods, 10.244.<node>.<10+j>/32)
//! ```
//!
//! Nothing is linked to the machine's own interfaces and no namespace has a
//! route out, so traffic cannot leave the lab. Every name carries a per-run
//! id, so labs run in parallel. The state of each lab is written to
//! `/run/dataplane-lab/<id>/state.json` as it is built: dropping a [`Lab`]
//! (also while panicking) tears everything down, and a lab left by a killed
//! process can be removed with [`teardown_unowned`].

use std::{
    collections::BTreeMap,
    fs,
    io::Read as _,
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use dataplane_common::api::{self, EndpointSpec, Request, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Mutex;

pub mod apiserver;
pub mod cli;
pub mod cni;
pub mod manifests;
pub mod routed;
pub mod services;
pub mod tool;
pub mod xdp_pass;

/// Where lab state, agent logs and API sockets live.
pub const RUN_ROOT: &str = "/run/dataplane-lab";
/// bpffs directory under which each lab's agents pin
/// (`<root>/<lab id>/<node>/`), apart from a real agent's pins.
pub const PIN_ROOT: &str = "/sys/fs/bpf/dataplane-lab";
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const UNDERLAY_PREFIX: u8 = 24;

#[derive(Clone, Debug)]
pub struct LabSpec {
    pub nodes: usize,
    pub pods_per_node: usize,
    /// `auto`, `tcx` or `clsact`.
    pub attach_mode: String,
    /// Kernel log level passed to the agents (`info`, `debug`, ...).
    pub bpf_log_level: String,
    /// The `dataplane` binary; see [`dataplane_bin`].
    pub dataplane_bin: PathBuf,
    /// The `dataplane-cni` binary (next to `dataplane` unless
    /// `$DATAPLANE_CNI_BIN` says otherwise).
    pub cni_bin: PathBuf,
    /// Plugins chained after ours in each node's conflist (e.g. `portmap`).
    pub chain: Vec<String>,
    /// cniVersion of the conflists; `None`: what `dataplane-cni install`
    /// writes by default.
    pub cni_version: Option<String>,
    /// `vxlan` or `native`.
    pub mode: String,
    /// Where agents get cluster state: `dir` (manifests) or `kube` (a test
    /// API server on the underlay, through kube-rs).
    pub source: String,
    /// Pass `--pod-cidr` to the agents; without it they take their CIDR from
    /// their Node object.
    pub pod_cidr_flag: bool,
    /// Appended to every node's name (e.g. `.example.com`: node names are
    /// DNS subdomains).
    pub node_suffix: String,
    /// Leave IPv6 on in every namespace (off by default, so that router
    /// solicitations do not muddy exact packet counts).
    pub ipv6: bool,
    /// Give each node a cgroup of its own for its socket programs.
    pub cgroups: bool,
    /// Wait for each agent to be ready (and its pods created) before `up`
    /// returns; off to test the window before readiness.
    pub wait_ready: bool,
    /// Node objects carry `spec.podCIDR` (as a cluster's node IPAM sets it).
    pub publish_pod_cidrs: bool,
    /// Extra arguments for every agent (e.g. `--ct-max 256`).
    pub agent_args: Vec<String>,
    /// Node names; `node-<i>` (with `node_suffix`) where not given.
    pub node_names: Vec<String>,
    /// Pod CIDRs of the nodes; `10.244.<i>.0/24` where not given.
    pub node_pod_cidrs: Vec<String>,
    /// The lab's name (`lab up --name`); its id when empty.
    pub name: String,
    /// With `source = "kube"`: the API server as a cluster's is, HTTPS with
    /// its own CA, a service account token and these RBAC rules (None:
    /// plain HTTP, open). Agents find it as pods do (node 0 through
    /// `KUBERNETES_SERVICE_HOST`/`_PORT`, the others through
    /// `--k8s-api-server`), with the token and CA in a service account
    /// directory.
    pub kube_in_cluster: Option<Option<Vec<apiserver::Rule>>>,
    /// A command the agent runs under (e.g. `setpriv` dropping
    /// capabilities; `{netns}` stands for the node's namespace): the
    /// agent's command line follows it.
    pub agent_wrapper: Vec<String>,
    /// `l2` (one bridge joins every host) or `routed` (each node, and the
    /// external host, in a subnet of its own behind a router; see
    /// [`routed`]).
    pub underlay: String,
    /// With the routed underlay: the router's BGP daemon, `bird` or `frr`.
    pub router: String,
    /// With the routed underlay: each node's agent speaks BGP to the
    /// router (`--bgp on`, AS 64512 + i; the router is AS 65000).
    pub bgp: bool,
    /// The agents' `--xdp`. `generic` unless a test asks: on a veth, a
    /// native XDP program takes GSO from its peer (TCP between nodes runs
    /// at a fraction of its rate), and XDP_TX needs a program on the
    /// peer, which the lab then puts on the underlay's side.
    pub xdp: String,
}

impl LabSpec {
    pub fn new(nodes: usize, pods_per_node: usize) -> Result<Self> {
        let dataplane_bin = dataplane_bin()?;
        let cni_bin = match std::env::var_os("DATAPLANE_CNI_BIN") {
            Some(p) => PathBuf::from(p),
            None => dataplane_bin.with_file_name("dataplane-cni"),
        };
        if !cni_bin.is_file() {
            bail!(
                "dataplane-cni not found at {}: run `cargo xtask build`",
                cni_bin.display()
            );
        }
        Ok(Self {
            nodes,
            pods_per_node,
            attach_mode: "auto".into(),
            bpf_log_level: "info".into(),
            dataplane_bin,
            cni_bin,
            chain: Vec::new(),
            cni_version: None,
            mode: "vxlan".into(),
            source: "dir".into(),
            pod_cidr_flag: true,
            node_suffix: String::new(),
            ipv6: false,
            cgroups: true,
            wait_ready: true,
            publish_pod_cidrs: true,
            agent_args: Vec::new(),
            node_names: Vec::new(),
            node_pod_cidrs: Vec::new(),
            name: String::new(),
            kube_in_cluster: None,
            agent_wrapper: Vec::new(),
            underlay: "l2".into(),
            router: "bird".into(),
            bgp: false,
            xdp: "generic".into(),
        })
    }

    /// Node `i`'s name.
    pub fn node_name(&self, i: usize) -> String {
        self.node_names
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("node-{i}{}", self.node_suffix))
    }

    fn node_pod_cidr(&self, i: usize) -> String {
        self.node_pod_cidrs
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("10.244.{i}.0/24"))
    }
}

/// The `dataplane-lab` binary (pod servers and probes run it):
/// `$DATAPLANE_LAB_BIN`, this program if it is that binary, else next to
/// the `dataplane` binary.
pub fn lab_bin(dataplane_bin: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("DATAPLANE_LAB_BIN") {
        return PathBuf::from(p);
    }
    if let Ok(me) = std::env::current_exe()
        && me.file_name().is_some_and(|n| n == "dataplane-lab")
    {
        return me;
    }
    dataplane_bin.with_file_name("dataplane-lab")
}

/// The `dataplane` binary: `$DATAPLANE_BIN` (set by `cargo xtask`), else the
/// workspace's debug build.
pub fn dataplane_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("DATAPLANE_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/dataplane"),
    };
    if !path.is_file() {
        bail!(
            "dataplane binary not found at {}: run through `cargo xtask test`, or `cargo xtask build` first",
            path.display()
        );
    }
    Ok(path)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeState {
    /// Kubernetes node name; also its netns name and pin directory name.
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// This node's pod CIDR, e.g. `10.244.0.0/24`.
    pub pod_cidr: String,
    pub pin_dir: PathBuf,
    pub api_socket: PathBuf,
    pub log: PathBuf,
    pub agent_pid: Option<u32>,
    /// The conflist `dataplane-cni install` wrote for this node.
    pub conflist: PathBuf,
    /// The CNI plugin's IPAM state for this node.
    pub ipam_dir: PathBuf,
    /// The agent's command line (restarts reuse it).
    #[serde(default)]
    pub agent_args: Vec<String>,
    /// The node's cgroup (its socket programs act on processes in it).
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// The agent's environment beyond the lab's own, and the command it
    /// runs under (restarts reuse both).
    #[serde(default)]
    pub agent_env: Vec<(String, String)>,
    #[serde(default)]
    pub agent_wrapper: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodState {
    pub name: String,
    pub namespace: String,
    pub netns: String,
    /// Index into [`LabState::nodes`].
    pub node: usize,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub host_ifname: String,
    pub container_id: String,
    /// Interface name inside the pod.
    pub ifname: String,
    /// The CNI ADD result, as a runtime caches it for DEL and CHECK.
    pub result: Value,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Named container ports: (name, protocol, number).
    #[serde(default)]
    pub ports: Vec<(String, String, u16)>,
    /// The process serving the pod's container ports (`lab up
    /// --manifests`, `lab apply`).
    #[serde(default)]
    pub server_pid: Option<u32>,
}

impl PodState {
    /// `namespace/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostState {
    pub netns: String,
    pub ip: Ipv4Addr,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LabState {
    pub id: String,
    /// `lab up --name`, else the id.
    #[serde(default)]
    pub name: String,
    /// The agents pin under `<pin_root>/<node>/`.
    #[serde(default)]
    pub pin_root: PathBuf,
    /// `vxlan` or `native`.
    #[serde(default)]
    pub mode: String,
    /// IPv6 left on in the lab's namespaces.
    #[serde(default)]
    pub ipv6: bool,
    /// The `dataplane-lab` binary (pod servers, probes).
    #[serde(default)]
    pub lab_bin: PathBuf,
    /// The objects applied through `lab up --manifests` and `lab apply`,
    /// as the API server holds them (defaulted, allocated).
    #[serde(default)]
    pub objects: Vec<Value>,
    pub run_dir: PathBuf,
    pub dataplane_bin: PathBuf,
    /// Where the lab's CNI plugins are installed (first on CNI_PATH).
    pub cni_bin_dir: PathBuf,
    pub underlay_netns: String,
    pub external: Option<HostState>,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    /// Every netns created, in creation order (teardown removes them all).
    pub namespaces: Vec<String>,
    /// Every cgroup created (teardown removes them).
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// The manifest directory every agent watches (`--source dir:...`):
    /// `nodes.yaml` and `pods.yaml`, as the API server would have them.
    pub manifests: PathBuf,
    /// The process whose `Lab` value owns this lab and removes it on drop;
    /// `None` once persisted (`xtask lab up`).
    pub owner_pid: Option<u32>,
    /// `l2` or `routed` (then `underlay_netns` is the router's).
    #[serde(default)]
    pub underlay: String,
    /// The routed underlay's router: its daemon and the daemon's pids.
    #[serde(default)]
    pub router: Option<routed::RouterState>,
}

impl LabState {
    /// Persisted, or left behind by an owner that is gone (killed test run).
    pub fn unowned(&self) -> bool {
        self.owner_pid
            .is_none_or(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    }
}

/// The API server of a `kube`-sourced lab.
pub const API_ADDR: ([u8; 4], u16) = ([172, 20, 0, 1], 6443);

pub struct Lab {
    pub state: LabState,
    /// The test API server, for labs whose agents use `--source kube`.
    pub api: Option<apiserver::ApiServer>,
    agents: Vec<Child>,
    armed: bool,
    publish_pod_cidrs: std::sync::atomic::AtomicBool,
    /// What [`Lab::publish`] last sent to the API server, per kind.
    published: Mutex<std::collections::BTreeMap<String, Vec<(String, String)>>>,
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup/unified` in hybrid mode),
/// from the mount table.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let table = fs::read_to_string("/proc/self/mountinfo")?;
    table
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 filesystem is mounted")
}

/// Root is needed for namespaces, BPF and bpffs; say so plainly.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the lab needs root (network namespaces, BPF programs, bpffs): run as root, e.g. `sudo -E cargo xtask test`"
        );
    }
    Ok(())
}

fn random_id() -> Result<String> {
    let mut b = [0u8; 3];
    fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(format!("dpl{:02x}{:02x}{:02x}", b[0], b[1], b[2]))
}

/// Runs a command and fails with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// `ip <args>` (use `-n <netns>` inside the args for a namespace).
pub fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

/// Moves the calling thread (or a child between fork and exec) into the
/// network namespace open as `file`.
pub use dataplane_common::netns::enter as enter_netns;

/// The namespace file of an `ip netns` name.
pub fn netns_file(netns: &str) -> Result<fs::File> {
    fs::File::open(format!("/run/netns/{netns}")).with_context(|| format!("netns {netns}"))
}

/// A command that runs in `netns` (an `ip netns` name); nothing else about
/// it changes (mounts, cwd and environment stay the caller's). A missing
/// namespace makes the spawn fail.
pub fn in_netns(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    in_netns_cgroup(netns, None, program)
}

/// [`in_netns`], and in the cgroup `cgroup` when given (its socket
/// programs then see the command's sockets).
pub fn in_netns_cgroup(
    netns: &str,
    cgroup: Option<&Path>,
    program: impl AsRef<std::ffi::OsStr>,
) -> Command {
    let file = netns_file(netns).map_err(|e| {
        e.downcast_ref::<std::io::Error>()
            .map_or(std::io::ErrorKind::NotFound, std::io::Error::kind)
    });
    // Opened before the fork: the child only writes to it.
    let procs = cgroup.map(|c| {
        fs::OpenOptions::new()
            .write(true)
            .open(c.join("cgroup.procs"))
    });
    let mut cmd = Command::new(program);
    // SAFETY: the closure only makes syscalls (setns, write) or builds an
    // error from a kind; none of it allocates.
    unsafe {
        cmd.pre_exec(move || {
            match &procs {
                Some(Ok(f)) => {
                    // "0": the writing process itself.
                    let n =
                        libc::write(std::os::fd::AsRawFd::as_raw_fd(f), b"0".as_ptr().cast(), 1);
                    if n != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Some(Err(e)) => return Err(std::io::Error::from(e.kind())),
                None => {}
            }
            match &file {
                Ok(f) => enter_netns(f),
                Err(kind) => Err(std::io::Error::from(*kind)),
            }
        });
    }
    cmd
}

fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    run(in_netns(netns, "sh").args(["-c", &format!("echo {value} > {path}")])).map(drop)
}

/// ethtool's legacy "set one feature" command (`struct ethtool_value`).
const ETHTOOL_STXCSUM: u32 = 0x17;
const SIOCETHTOOL: libc::c_ulong = 0x8946;

/// Turns an offload of `dev` in `netns` on or off, as `ethtool -K` does.
fn set_offload(netns: &str, dev: &str, cmd: u32, on: bool) -> Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    let dev_name = dev.to_owned();
    in_netns_thread(netns, move || -> Result<()> {
        let mut value = EthtoolValue {
            cmd,
            data: u32::from(on),
        };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: &mut value,
            _pad: [0; 16],
        };
        anyhow::ensure!(
            dev_name.len() < libc::IFNAMSIZ,
            "interface name {dev_name:?}"
        );
        req.name[..dev_name.len()].copy_from_slice(dev_name.as_bytes());
        // SAFETY: a datagram socket for the ioctl, closed below; `req`
        // and `value` outlive the call.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let rc = libc::ioctl(fd, SIOCETHTOOL, &mut req);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            anyhow::ensure!(rc == 0, "ethtool command {cmd:#x} on {dev_name}: {err}");
        }
        Ok(())
    })?
    .with_context(|| format!("in {netns}"))
}

impl Lab {
    /// Builds the lab and starts one agent per node. On any failure what was
    /// built so far is torn down before the error is returned.
    pub fn up(spec: &LabSpec) -> Result<Lab> {
        require_root()?;
        let id = random_id()?;
        let run_dir = Path::new(RUN_ROOT).join(&id);
        fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let mut lab = Lab {
            state: LabState {
                id: id.clone(),
                name: if spec.name.is_empty() {
                    id.clone()
                } else {
                    spec.name.clone()
                },
                pin_root: Path::new(PIN_ROOT).join(&id),
                mode: spec.mode.clone(),
                ipv6: spec.ipv6,
                lab_bin: lab_bin(&spec.dataplane_bin),
                run_dir: run_dir.clone(),
                dataplane_bin: spec.dataplane_bin.clone(),
                cni_bin_dir: run_dir.join("cni-bin"),
                manifests: run_dir.join("manifests"),
                underlay_netns: format!("{id}-ul"),
                owner_pid: Some(std::process::id()),
                ..LabState::default()
            },
            agents: Vec::new(),
            armed: true,
            publish_pod_cidrs: spec.publish_pod_cidrs.into(),
            api: None,
            published: Mutex::default(),
        };
        lab.build(spec)
            .with_context(|| format!("building lab {id}"))?;
        Ok(lab)
    }

    /// The lab `state` describes, made by another process (`lab up`), to
    /// change or inspect; dropping it leaves the lab running.
    pub fn attach(state: LabState) -> Lab {
        Lab {
            state,
            api: None,
            agents: Vec::new(),
            armed: false,
            publish_pod_cidrs: true.into(),
            published: Mutex::default(),
        }
    }

    fn save(&self) -> Result<()> {
        let path = self.state.run_dir.join("state.json");
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(&self.state)?)?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// A new namespace owned by the lab (removed on teardown), lo up, IPv6
    /// off unless the lab has it on.
    pub fn add_netns(&mut self, name: &str) -> Result<()> {
        // Recorded before creation: a failure in between still gets cleaned.
        self.state.namespaces.push(name.to_owned());
        self.save()?;
        ip(&["netns", "add", name])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        if !self.state.ipv6 {
            // No router solicitations or MLD reports muddying exact packet
            // counts.
            sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1")?;
            sysctl(name, "net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        Ok(())
    }

    /// A cgroup of the lab's own under the cgroup v2 mount (removed on
    /// teardown).
    /// Where an in-cluster lab keeps the service account's token and CA.
    pub fn service_account_dir(&self) -> PathBuf {
        self.state.run_dir.join("serviceaccount")
    }

    fn add_cgroup(&mut self, name: &str) -> Result<PathBuf> {
        let path = cgroup2_mount()?.join(name);
        self.state.cgroups.push(path.clone());
        self.save()?;
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(path)
    }

    fn build(&mut self, spec: &LabSpec) -> Result<()> {
        let id = self.state.id.clone();
        let ul = self.state.underlay_netns.clone();
        let routed = match spec.underlay.as_str() {
            "l2" => false,
            "routed" => true,
            other => bail!("underlay {other:?}: l2 or routed"),
        };
        if routed && spec.source == "kube" {
            bail!("the routed underlay has no place for the test API server yet");
        }
        self.state.underlay = spec.underlay.clone();
        self.add_netns(&ul)?;
        if routed {
            sysctl(&ul, "net.ipv4.ip_forward", "1")?;
        } else {
            ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &ul, "link", "set", "br0", "up"])?;
        }
        if spec.source == "kube" {
            // The API server sits on the underlay, where every node reaches it.
            ip(&["-n", &ul, "addr", "add", "172.20.0.1/24", "dev", "br0"])?;
            let addr = std::net::SocketAddr::from(API_ADDR);
            let api = match &spec.kube_in_cluster {
                None => {
                    let api = apiserver::ApiServer::start(&ul, addr)?;
                    fs::write(self.state.run_dir.join("kubeconfig"), api.kubeconfig())?;
                    api
                }
                Some(rules) => {
                    let tls = apiserver::Tls::generate(addr.ip())?;
                    let token = random_id()?;
                    let sa = self.service_account_dir();
                    fs::create_dir_all(&sa)?;
                    fs::write(sa.join("ca.crt"), &tls.ca_pem)?;
                    fs::write(sa.join("token"), &token)?;
                    fs::write(sa.join("namespace"), "dataplane-system")?;
                    apiserver::ApiServer::start_with(
                        &ul,
                        addr,
                        apiserver::Security {
                            tls: Some(tls),
                            token: Some(token),
                            rules: rules.clone(),
                        },
                    )?
                }
            };
            self.api = Some(api);
        }

        for i in 0..spec.nodes {
            let netns = format!("{id}-n{i}");
            let name = spec.node_name(i);
            dataplane_common::pin::validate_node_name(&name)
                .map_err(|e| anyhow::anyhow!("node name {name:?}: {e}"))?;
            let node_ip = Self::node_ip(spec, i)?;
            self.state.nodes.push(NodeState {
                pin_dir: dataplane_common::pin_dir(&self.state.pin_root, &name),
                api_socket: self.state.run_dir.join(format!("{name}.sock")),
                log: self.state.run_dir.join(format!("{name}.log")),
                conflist: self
                    .state
                    .run_dir
                    .join(format!("{name}-net.d/05-dataplane.conflist")),
                ipam_dir: self.state.run_dir.join(format!("{name}-ipam")),
                agent_args: Vec::new(),
                cgroup: None,
                netns,
                name,
                ip: node_ip,
                pod_cidr: spec.node_pod_cidr(i),
                agent_pid: None,
                agent_env: Vec::new(),
                agent_wrapper: spec.agent_wrapper.clone(),
            });
        }
        self.save()?;
        let all: Vec<usize> = (0..spec.nodes).collect();
        self.write_nodes_file(spec.nodes, &all)?;
        for i in 0..spec.nodes {
            let netns = self.state.nodes[i].netns.clone();
            let native = spec.xdp != "generic" && spec.xdp != "off";
            self.add_underlay_host(&netns, &format!("n{i}"), Self::node_ip(spec, i)?, native)?;
            sysctl(&netns, "net.ipv4.ip_forward", "1")?;
            if spec.cgroups {
                self.state.nodes[i].cgroup = Some(self.add_cgroup(&netns)?);
            }
            self.save()?;
            self.start_agent(i, spec)?;
        }

        if routed {
            self.state.router = Some(routed::start_router(
                &ul,
                &spec.router,
                spec.nodes,
                &self.state.run_dir.join("router"),
            )?);
            self.save()?;
        }
        let ext = format!("{id}-ext");
        let ext_ip = if routed {
            Ipv4Addr::new(172, 21, routed::EXTERNAL_SUBNET, 100)
        } else {
            Ipv4Addr::new(172, 20, 0, 100)
        };
        self.add_underlay_host(&ext, "ext", ext_ip, false)?;
        self.state.external = Some(HostState {
            netns: ext,
            ip: ext_ip,
        });
        self.save()?;

        for i in 0..spec.nodes {
            self.wait_agent_ready(i)?;
            self.install_cni(i, spec)?;
            if !spec.wait_ready {
                continue;
            }
            self.wait_peers(i, spec.nodes.saturating_sub(1))?;
            self.wait_ready(i)?;
            for j in 0..spec.pods_per_node {
                self.add_pod(i, &format!("pod-{i}-{j}"))?;
            }
        }
        Ok(())
    }

    /// A namespace with `eth0` on the underlay: a port of its bridge, or
    /// (routed) a subnet of its own behind the router. `xdp_peer`: the
    /// host runs native XDP on eth0, whose XDP_TX frames the underlay's
    /// side then takes (see xdp_pass).
    fn add_underlay_host(
        &mut self,
        netns: &str,
        port: &str,
        addr: Ipv4Addr,
        xdp_peer: bool,
    ) -> Result<()> {
        let ul = self.state.underlay_netns.clone();
        let routed = self.state.underlay == "routed";
        self.add_netns(netns)?;
        ip(&[
            "-n", &ul, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ])?;
        if routed {
            let gw = routed::gateway(addr);
            ip(&["-n", &ul, "addr", "add", &format!("{gw}/24"), "dev", port])?;
            ip(&["-n", &ul, "link", "set", port, "up"])?;
        } else {
            ip(&["-n", &ul, "link", "set", port, "master", "br0", "up"])?;
        }
        // The external host is a machine outside the cluster: its frames
        // reach the nodes with complete checksums, as off a wire (a veth
        // would pass its offload state along, which XDP cannot see).
        if port == "ext" {
            set_offload(netns, "eth0", ETHTOOL_STXCSUM, false)?;
        }
        if xdp_peer {
            xdp_pass::attach(&ul, port)?;
        }
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{addr}/{UNDERLAY_PREFIX}"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        if routed {
            let gw = routed::gateway(addr).to_string();
            ip(&["-n", netns, "route", "add", "default", "via", &gw])?;
        }
        Ok(())
    }

    fn start_agent(&mut self, i: usize, spec: &LabSpec) -> Result<()> {
        let node = &self.state.nodes[i];
        let mut args: Vec<String> = ["--netns", &node.netns, "agent", "--node", &node.name]
            .iter()
            .map(|a| a.to_string())
            .collect();
        for (flag, value) in [
            ("--pin-root", self.state.pin_root.display().to_string()),
            ("--api-socket", node.api_socket.display().to_string()),
            (
                "--state-dir",
                self.state
                    .run_dir
                    .join(format!("{}-state", node.name))
                    .display()
                    .to_string(),
            ),
            ("--attach-mode", spec.attach_mode.clone()),
            ("--bpf-log-level", spec.bpf_log_level.clone()),
            ("--mode", spec.mode.clone()),
            (
                "--cgroup-root",
                node.cgroup
                    .as_ref()
                    .map_or_else(|| "off".to_owned(), |c| c.display().to_string()),
            ),
            (
                "--source",
                if spec.source == "kube" {
                    "kube".to_owned()
                } else {
                    format!("dir:{}", self.state.manifests.display())
                },
            ),
        ] {
            args.push(flag.into());
            args.push(value);
        }
        if spec.pod_cidr_flag {
            args.push("--pod-cidr".into());
            args.push(node.pod_cidr.clone());
        }
        args.push(format!("--xdp={}", spec.xdp));
        if spec.bgp {
            args.push("--bgp=on".into());
            args.push(format!("--bgp-asn={}", routed::node_as(i)));
            args.push(format!(
                "--bgp-peer={}:{}",
                routed::gateway(node.ip),
                routed::ROUTER_AS
            ));
        }
        args.extend(spec.agent_args.iter().cloned());
        let mut env = Vec::new();
        if spec.source == "kube" {
            if spec.kube_in_cluster.is_some() {
                let (ip, port) = (std::net::Ipv4Addr::from(API_ADDR.0), API_ADDR.1);
                if i == 0 {
                    env.push(("KUBERNETES_SERVICE_HOST".to_owned(), ip.to_string()));
                    env.push(("KUBERNETES_SERVICE_PORT".to_owned(), port.to_string()));
                } else {
                    args.push(format!("--k8s-api-server={ip}:{port}"));
                }
                args.push(format!(
                    "--service-account-dir={}",
                    self.service_account_dir().display()
                ));
            } else {
                args.push("--kubeconfig".into());
                args.push(self.state.run_dir.join("kubeconfig").display().to_string());
            }
        }
        self.state.nodes[i].agent_args = args;
        self.state.nodes[i].agent_env = env;
        self.spawn_agent(i)
    }

    /// Starts node `i`'s agent with its recorded arguments (log appended).
    fn spawn_agent(&mut self, i: usize) -> Result<()> {
        let node = &self.state.nodes[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let mut cmd = match node.agent_wrapper.split_first() {
            Some((wrapper, wargs)) => {
                let mut c = Command::new(wrapper);
                c.args(wargs.iter().map(|a| a.replace("{netns}", &node.netns)))
                    .arg(&self.state.dataplane_bin);
                c
            }
            None => Command::new(&self.state.dataplane_bin),
        };
        let child = cmd
            .args(&node.agent_args)
            .envs(node.agent_env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C meant for `xtask lab up` must
            // not take a persisted lab's agents with it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", self.state.dataplane_bin.display()))?;
        self.state.nodes[i].agent_pid = Some(child.id());
        if i < self.agents.len() {
            self.agents[i] = child;
        } else {
            self.agents.push(child);
        }
        self.save()
    }

    /// Stops node `i`'s agent with `signal` (SIGKILL: a crash; SIGTERM: a
    /// graceful stop), optionally with extra arguments for the next start.
    pub fn signal_agent(&mut self, i: usize, signal: i32) -> Result<()> {
        let child = self.agents.get_mut(i).context("no such agent")?;
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(i32::try_from(child.id())?, signal) };
        child.wait()?;
        self.state.nodes[i].agent_pid = None;
        self.save()
    }

    /// Starts node `i`'s agent again after [`Lab::signal_agent`] and waits
    /// until it answers.
    pub fn start_agent_again(&mut self, i: usize) -> Result<()> {
        self.spawn_agent(i)?;
        self.wait_agent_ready(i)
    }

    /// Adds an argument to node `i`'s agent command line (next start).
    pub fn add_agent_arg(&mut self, i: usize, arg: &str) {
        self.state.nodes[i].agent_args.push(arg.into());
    }

    /// Sets `--flag=value` on node `i`'s agent command line (next start),
    /// in place of the one there.
    pub fn set_agent_flag(&mut self, i: usize, flag: &str, value: &str) {
        let args = &mut self.state.nodes[i].agent_args;
        args.retain(|a| !a.starts_with(&format!("{flag}=")));
        args.push(format!("{flag}={value}"));
    }

    fn wait_agent_ready(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let node = &self.state.nodes[i];
            if let Ok(Response::Status(_)) =
                api::call(&node.api_socket, &Request::Status, Duration::from_secs(2))
            {
                return Ok(());
            }
            if let Some(status) = self
                .agents
                .get_mut(i)
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "agent on {} exited ({status}):\n{}",
                    node.name,
                    self.agent_log(i)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent on {} not ready after 20 s:\n{}",
                    node.name,
                    self.agent_log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until node `i`'s agent says it is ready (restored, cluster
    /// state applied, pod CIDR known): only then does it take endpoints.
    pub fn wait_ready(&self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.agent_call(i, &Request::Status) {
                Ok(Response::Status(s)) if s.ready => return Ok(()),
                _ if Instant::now() > deadline => bail!(
                    "agent on {} not ready after 20 s:\n{}",
                    self.state.nodes[i].name,
                    self.agent_log(i)
                ),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// A command in node `i`'s network namespace and cgroup, as a process of
    /// that node.
    pub fn on_node(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let n = &self.state.nodes[i];
        in_netns_cgroup(&n.netns, n.cgroup.as_deref(), program)
    }

    fn node_ip(spec: &LabSpec, i: usize) -> Result<Ipv4Addr> {
        if spec.underlay == "routed" {
            return routed::node_ip(i);
        }
        Ok(Ipv4Addr::new(
            172,
            20,
            0,
            11 + u8::try_from(i).context("too many nodes")?,
        ))
    }

    /// Node `i`'s object: the one applied to the lab (labels and all) if
    /// any, with the address and pod CIDR the lab gave the node.
    fn node_object(&self, i: usize) -> Result<Value> {
        let node = &self.state.nodes[i];
        let mut obj = self
            .applied(i)
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name}}));
        if self
            .publish_pod_cidrs
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            obj["spec"]["podCIDR"] = serde_json::json!(node.pod_cidr);
            obj["spec"]["podCIDRs"] = serde_json::json!([node.pod_cidr]);
        } else if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
            spec.remove("podCIDR");
            spec.remove("podCIDRs");
        }
        obj["status"]["addresses"] =
            serde_json::json!([{"type": "InternalIP", "address": node.ip.to_string()}]);
        Ok(obj)
    }

    /// The Node object applied for node `i`, if any.
    fn applied(&self, i: usize) -> Option<&Value> {
        let name = &self.state.nodes[i].name;
        self.state
            .objects
            .iter()
            .find(|o| o["kind"] == "Node" && o["metadata"]["name"] == name.as_str())
    }

    fn pod_object(&self, p: &PodState) -> Value {
        // A pod from a manifest: that object, scheduled and with its
        // address, as the kubelet reports it.
        if let Some(obj) = self.state.objects.iter().find(|o| {
            o["kind"] == "Pod"
                && o["metadata"]["name"] == p.name.as_str()
                && o["metadata"]["namespace"] == p.namespace.as_str()
        }) {
            let mut obj = obj.clone();
            obj["spec"]["nodeName"] = serde_json::json!(self.state.nodes[p.node].name);
            obj["status"]["podIP"] = serde_json::json!(p.ip.to_string());
            obj["status"]["podIPs"] = serde_json::json!([{"ip": p.ip.to_string()}]);
            obj["status"]["phase"] = serde_json::json!("Running");
            return obj;
        }
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
            "spec": {"nodeName": self.state.nodes[p.node].name, "containers": [{
                "name": "main",
                "ports": p.ports.iter().map(|(n, proto, port)| serde_json::json!(
                    {"name": n, "protocol": proto, "containerPort": port}
                )).collect::<Vec<_>>(),
            }]},
            "status": {"podIPs": [{"ip": p.ip.to_string()}]},
        })
    }

    /// Publishes `objects` as the lab's cluster state for one file/kind:
    /// a manifest file (JSON documents are YAML too), or API objects
    /// (those no longer present are deleted).
    pub(crate) fn publish(&self, file: &str, kind: &str, objects: Vec<Value>) -> Result<()> {
        match &self.api {
            None => {
                let docs: Vec<String> = objects.iter().map(Value::to_string).collect();
                self.write_manifest(file, &(docs.join("\n---\n") + "\n"))
            }
            Some(api) => {
                let names: Vec<(String, String)> = objects
                    .iter()
                    .map(|o| {
                        (
                            o["metadata"]["namespace"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned(),
                            o["metadata"]["name"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned(),
                        )
                    })
                    .collect();
                let old = self
                    .published
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .insert(kind.to_owned(), names.clone());
                for o in objects {
                    api.apply(o)?;
                }
                for (ns, name) in old.unwrap_or_default() {
                    if !names.contains(&(ns.clone(), name.clone())) {
                        api.delete(kind, &ns, &name)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// The Node objects of the nodes `listed` (of `total`): leaving one out
    /// is how a test removes a node.
    fn write_nodes_file(&self, total: usize, listed: &[usize]) -> Result<()> {
        let nodes = (0..total)
            .filter(|i| listed.contains(i))
            .map(|i| self.node_object(i))
            .collect::<Result<_>>()?;
        self.publish("nodes.yaml", "Node", nodes)
    }

    /// Writes one manifest file atomically (rename), as `kubectl`-style
    /// tooling would.
    pub fn write_manifest(&self, name: &str, text: &str) -> Result<()> {
        fs::create_dir_all(&self.state.manifests)?;
        let tmp = self.state.manifests.join(format!(".{name}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.state.manifests.join(name))?;
        Ok(())
    }

    /// Replaces a pod's labels (as `kubectl label --overwrite` would).
    pub fn set_pod_labels(&mut self, name: &str, labels: &[(&str, &str)]) -> Result<()> {
        let pod = self
            .state
            .pods
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))?;
        pod.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.save()?;
        self.write_pods_file()
    }

    /// Publishes the Namespace objects: (name, labels).
    pub fn set_namespaces(&self, namespaces: &[(&str, &[(&str, &str)])]) -> Result<()> {
        let objects = namespaces
            .iter()
            .map(|(name, labels)| {
                let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
                serde_json::json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": labels},
                })
            })
            .collect();
        self.publish("namespaces.yaml", "Namespace", objects)
    }

    /// Publishes the NetworkPolicy objects (whole objects, or specs with
    /// `metadata` given).
    pub fn set_policies(&self, policies: Vec<Value>) -> Result<()> {
        self.publish("networkpolicies.yaml", "NetworkPolicy", policies)
    }

    /// Every pod with its node and address, as the kubelet reports them in
    /// `status.podIPs`.
    fn write_pods_file(&self) -> Result<()> {
        let pods = self.state.pods.iter().map(|p| self.pod_object(p)).collect();
        self.publish("pods.yaml", "Pod", pods)
    }

    /// Publishes the Node objects with (or without) their pod CIDRs, as a
    /// cluster's node IPAM assigns them.
    pub fn publish_pod_cidrs(&self, on: bool) -> Result<()> {
        self.publish_pod_cidrs
            .store(on, std::sync::atomic::Ordering::Relaxed);
        let all: Vec<usize> = (0..self.state.nodes.len()).collect();
        self.write_nodes_file(self.state.nodes.len(), &all)
    }

    /// Lists only the nodes `listed` in the agents' manifests, without waiting
    /// for the agents (some may be down).
    pub fn write_node_list(&self, listed: &[usize]) -> Result<()> {
        self.write_nodes_file(self.state.nodes.len(), listed)
    }

    /// Lists only the nodes `listed` in the agents' manifests and waits until
    /// every agent has applied it.
    pub fn set_nodes(&self, listed: &[usize]) -> Result<()> {
        self.write_nodes_file(self.state.nodes.len(), listed)?;
        for i in 0..self.state.nodes.len() {
            let peers = listed.iter().filter(|j| **j != i).count();
            self.wait_peers(i, peers)?;
        }
        Ok(())
    }

    /// Waits until node `i`'s agent has `peers` remote nodes installed.
    pub fn wait_peers(&self, i: usize, peers: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.agent_call(i, &Request::Status) {
                Ok(Response::Status(s)) if s.nodes == peers => return Ok(()),
                _ if Instant::now() > deadline => {
                    bail!(
                        "agent on {} did not install {peers} peer node(s):\n{}",
                        self.state.nodes[i].name,
                        self.agent_log(i)
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// `dataplane-cni install` for node `i`: the plugin into the lab's CNI
    /// bin directory, a conflist pointing at this node's agent and IPAM dir.
    fn install_cni(&mut self, i: usize, spec: &LabSpec) -> Result<()> {
        let node = &self.state.nodes[i];
        let conf_dir = node.conflist.parent().context("conflist path")?;
        let mut cmd = Command::new(&spec.cni_bin);
        cmd.arg("install")
            .arg("--bin-dir")
            .arg(&self.state.cni_bin_dir)
            .arg("--conf-dir")
            .arg(conf_dir)
            .arg("--agent-socket")
            .arg(&node.api_socket)
            .arg("--ipam-dir")
            .arg(&node.ipam_dir);
        if let Some(v) = &spec.cni_version {
            cmd.args(["--cni-version", v]);
        }
        for plugin in &spec.chain {
            cmd.args(["--chain", plugin]);
        }
        run(&mut cmd).map(drop)
    }

    /// A runtime on node `i`: plugins from the lab's CNI directory first,
    /// then the system's (for chained reference plugins).
    pub fn runtime(&self, i: usize) -> cni::Runtime {
        cni::Runtime {
            cni_path: vec![
                self.state.cni_bin_dir.clone(),
                "/usr/lib/cni".into(),
                "/opt/cni/bin".into(),
            ],
            netns: Some(self.state.nodes[i].netns.clone()),
            env: Vec::new(),
        }
    }

    /// Node `i`'s conflist, as the runtime would load it.
    pub fn conflist(&self, i: usize) -> Result<Value> {
        let path = &self.state.nodes[i].conflist;
        Ok(serde_json::from_slice(
            &fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )?)
    }

    pub fn attachment(&self, pod: &PodState) -> cni::Attachment {
        cni::Attachment {
            container_id: pod.container_id.clone(),
            netns: Path::new("/run/netns").join(&pod.netns),
            ifname: pod.ifname.clone(),
            args: vec![
                ("K8S_POD_NAMESPACE".into(), pod.namespace.clone()),
                ("K8S_POD_NAME".into(), pod.name.clone()),
            ],
            runtime_config: Value::Null,
        }
    }

    /// Creates a pod namespace and runs the node's conflist ADD for it, as
    /// the kubelet's runtime would. Returns the pod's index.
    pub fn add_pod(&mut self, i: usize, name: &str) -> Result<usize> {
        self.add_pod_with(i, name, Value::Null)
    }

    /// [`Lab::add_pod`] with a `runtimeConfig` (e.g. portMappings).
    pub fn add_pod_with(&mut self, i: usize, name: &str, runtime_config: Value) -> Result<usize> {
        let idx = self.add_pod_full(i, "default", name, &[], &[], runtime_config)?;
        self.write_pods_file()?;
        Ok(idx)
    }

    /// [`Lab::add_pod`] in `namespace`, with `labels` and named container
    /// ports ((name, protocol, number)), as NetworkPolicy sees pods.
    pub fn add_pod_in(
        &mut self,
        i: usize,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        ports: &[(&str, &str, u16)],
    ) -> Result<usize> {
        let idx = self.add_pod_unlisted(i, namespace, name, labels, ports)?;
        self.write_pods_file()?;
        Ok(idx)
    }

    /// [`Lab::add_pod_in`] without publishing its Pod object: the agent
    /// learns of the pod from the CNI ADD alone, as when its watch lags
    /// behind the kubelet. [`Lab::publish_pods`] publishes it.
    pub fn add_pod_unlisted(
        &mut self,
        i: usize,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        ports: &[(&str, &str, u16)],
    ) -> Result<usize> {
        self.add_pod_full(i, namespace, name, labels, ports, Value::Null)
    }

    /// Publishes every pod's object (see [`Lab::add_pod_unlisted`]).
    pub fn publish_pods(&self) -> Result<()> {
        self.write_pods_file()
    }

    fn add_pod_full(
        &mut self,
        i: usize,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        ports: &[(&str, &str, u16)],
        runtime_config: Value,
    ) -> Result<usize> {
        if self.find_pod(&format!("{namespace}/{name}")).is_some() {
            bail!("pod {namespace}/{name} exists already");
        }
        // Namespace names have no dots: "<ns>.<name>" is unambiguous.
        let netns = format!("{}-{namespace}.{name}", self.state.nodes[i].netns);
        self.add_netns(&netns)?;
        let mut pod = PodState {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: ports
                .iter()
                .map(|(n, p, num)| (n.to_string(), p.to_string(), *num))
                .collect(),
            name: name.to_owned(),
            namespace: namespace.into(),
            netns,
            node: i,
            ip: Ipv4Addr::UNSPECIFIED,
            mac: String::new(),
            host_ifname: String::new(),
            container_id: format!("{}-{namespace}.{name}", self.state.id),
            ifname: "eth0".into(),
            result: Value::Null,
            server_pid: None,
        };
        let mut at = self.attachment(&pod);
        at.runtime_config = runtime_config;
        let result = self
            .runtime(i)
            .add(&self.conflist(i)?, &at)?
            .map_err(|f| anyhow::anyhow!("CNI ADD for {name}: {f}"))?;
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok());
        pod.ip = ip.with_context(|| format!("no IPv4 address in the ADD result {result}"))?;
        let ifaces = result["interfaces"].as_array().cloned().unwrap_or_default();
        let host = ifaces
            .iter()
            .find(|i| i["sandbox"].is_null())
            .context("no host interface in the result")?;
        let inner = ifaces
            .iter()
            .find(|i| i["sandbox"].is_string())
            .context("no pod interface in the result")?;
        pod.host_ifname = host["name"].as_str().unwrap_or_default().to_owned();
        pod.mac = inner["mac"].as_str().unwrap_or_default().to_owned();
        pod.result = result;
        self.state.pods.push(pod);
        self.save()?;
        Ok(self.state.pods.len() - 1)
    }

    /// CNI DEL for a pod (the pod's namespace stays until teardown).
    pub fn remove_pod(&mut self, name: &str) -> Result<()> {
        let idx = self.unwire_pod(name)?;
        self.state.pods.remove(idx);
        self.save()?;
        self.write_pods_file()
    }

    /// CNI DEL for a pod (by `namespace/name` or name), its server stopped;
    /// returns its index (the caller removes it from the state).
    fn unwire_pod(&mut self, name: &str) -> Result<usize> {
        let idx = self
            .state
            .pods
            .iter()
            .position(|p| p.full_name() == name || p.name == name)
            .with_context(|| format!("no pod {name}"))?;
        if let Some(pid) = self.state.pods[idx].server_pid.take() {
            stop_server(pid, &self.state.pods[idx]);
        }
        let pod = self.state.pods[idx].clone();
        self.runtime(pod.node)
            .del(
                &self.conflist(pod.node)?,
                &self.attachment(&pod),
                Some(&pod.result),
            )?
            .map_err(|f| anyhow::anyhow!("CNI DEL for {name}: {f}"))?;
        Ok(idx)
    }

    /// CNI DEL for a pod and its network namespace deleted, as when the
    /// runtime removes a pod's sandbox.
    pub fn delete_pod(&mut self, name: &str) -> Result<()> {
        let idx = self.unwire_pod(name)?;
        let pod = self.state.pods.remove(idx);
        let _ = Command::new("ip")
            .args(["netns", "del", &pod.netns])
            .stderr(Stdio::null())
            .status();
        self.state.namespaces.retain(|n| *n != pod.netns);
        self.save()
    }

    pub fn register(&self, pod: &PodState) -> Result<()> {
        let spec = EndpointSpec {
            container_id: pod.container_id.clone(),
            pod_namespace: pod.namespace.clone(),
            pod_name: pod.name.clone(),
            host_ifname: pod.host_ifname.clone(),
            ips: vec![pod.ip.into()],
            mac: pod.mac.clone(),
            netns_cookie: in_netns_thread(&pod.netns, dataplane_common::netns::cookie)
                .ok()
                .and_then(Result::ok),
        };
        self.agent_call(pod.node, &Request::EndpointAdd(spec))
            .map(drop)
    }

    pub fn unregister(&self, pod: &PodState) -> Result<()> {
        let req = Request::EndpointDel {
            container_id: pod.container_id.clone(),
        };
        self.agent_call(pod.node, &req).map(drop)
    }

    pub fn agent_call(&self, node: usize, request: &Request) -> Result<Response> {
        let socket = &self.state.nodes[node].api_socket;
        match api::call(socket, request, Duration::from_secs(10))? {
            Response::Error { message } => {
                bail!("agent {}: {message}", self.state.nodes[node].name)
            }
            r => Ok(r),
        }
    }

    /// A pod by `namespace/name`, or by name alone (the first of that
    /// name); panics when there is none (a test's mistake).
    pub fn pod(&self, name: &str) -> &PodState {
        self.find_pod(name)
            .unwrap_or_else(|| panic!("no pod {name} in lab {}", self.state.id))
    }

    /// A pod by `namespace/name`, or by name alone (the first of that name).
    pub fn find_pod(&self, name: &str) -> Option<&PodState> {
        match name.split_once('/') {
            Some((ns, n)) => self
                .state
                .pods
                .iter()
                .find(|p| p.namespace == ns && p.name == n),
            None => self.state.pods.iter().find(|p| p.name == name),
        }
    }

    /// Stops node `i`'s agent (SIGTERM, then SIGKILL after a grace period).
    pub fn stop_agent(&mut self, i: usize) {
        if let Some(child) = self.agents.get_mut(i) {
            stop_process(child.id(), None);
            let _ = child.wait();
        }
        self.state.nodes[i].agent_pid = None;
        let _ = self.save();
    }

    /// What a CNI operation may leave behind on node `i`: its links, its
    /// IPAM reservations, and the endpoints its agent knows (when running).
    pub fn host_snapshot(&self, i: usize) -> Result<HostSnapshot> {
        let node = &self.state.nodes[i];
        let out = run(Command::new("ip").args(["-n", &node.netns, "-o", "link", "show"]))?;
        let mut links: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or_default().to_owned())
            .collect();
        links.sort();
        let mut reservations = Vec::new();
        if let Ok(networks) = fs::read_dir(&node.ipam_dir) {
            for net in networks.flatten() {
                for f in fs::read_dir(net.path())?.flatten() {
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.parse::<std::net::IpAddr>().is_ok() || name.starts_with('.') {
                        reservations.push(name);
                    }
                }
            }
        }
        reservations.sort();
        let endpoints = match api::call(
            &node.api_socket,
            &Request::EndpointList,
            Duration::from_secs(5),
        ) {
            Ok(Response::Endpoints { endpoints }) => {
                endpoints.into_iter().map(|e| e.spec.container_id).collect()
            }
            _ => Vec::new(),
        };
        Ok(HostSnapshot {
            links,
            reservations,
            endpoints,
        })
    }

    pub fn agent_log(&self, node: usize) -> String {
        fs::read_to_string(&self.state.nodes[node].log).unwrap_or_default()
    }

    /// Gives a pod an extra address the datapath never assigned (to forge
    /// source addresses).
    pub fn add_pod_address(&self, pod: &str, cidr: &str) -> Result<()> {
        ip(&[
            "-n",
            &self.pod(pod).netns,
            "addr",
            "add",
            cidr,
            "dev",
            "eth0",
        ])
    }

    /// The addresses in node `node`'s endpoint map, read straight from the
    /// pinned map (fast enough to poll at millisecond intervals).
    pub fn endpoint_keys(
        &self,
        node: usize,
    ) -> Result<std::collections::BTreeSet<std::net::IpAddr>> {
        use aya::maps::{HashMap, Map, MapData};
        use dataplane_common::{EndpointInfo, EndpointKey, MAP_ENDPOINTS, MapSpec};
        let spec = MapSpec::by_name(MAP_ENDPOINTS).context("contract")?;
        let path = self.state.nodes[node].pin_dir.join(spec.pin_name());
        let map: HashMap<MapData, EndpointKey, EndpointInfo> =
            HashMap::try_from(Map::from_map_data(MapData::from_pin(&path)?)?)?;
        let mut out = std::collections::BTreeSet::new();
        for k in map.keys() {
            out.extend(k?.ip());
        }
        Ok(out)
    }

    /// Runs the `dataplane` CLI against node `node`'s pins; returns stdout.
    pub fn cli(&self, node: usize, args: &[&str]) -> Result<String> {
        let n = &self.state.nodes[node];
        let mut cmd = Command::new(&self.state.dataplane_bin);
        cmd.args(args);
        match args {
            ["ct" | "nat", "flush", ..]
            | ["prefilter", "add" | "delete", ..]
            | ["status" | "policy" | "bgp", ..] => {
                cmd.arg("--socket").arg(&n.api_socket);
            }
            ["endpoint" | "identity" | "explain", ..] => {
                cmd.arg("--socket").arg(&n.api_socket);
                cmd.arg("--pin-dir").arg(&n.pin_dir);
            }
            ["map" | "service" | "ct" | "nat" | "node" | "prefilter", ..] => {
                cmd.arg("--pin-dir").arg(&n.pin_dir);
            }
            _ => {}
        }
        Ok(String::from_utf8(run(&mut cmd)?.stdout)?)
    }

    /// Starts `dataplane monitor <args>` on node `node` and waits until it
    /// reads the ring; [`Monitor::output`] (or, with `-o json`,
    /// [`Monitor::events`]) collects what it printed.
    pub fn monitor(&self, node: usize, args: &[&str]) -> Result<Monitor> {
        use std::io::BufRead as _;
        let n = &self.state.nodes[node];
        let mut child = Command::new(&self.state.dataplane_bin)
            .arg("monitor")
            .args(args)
            .arg("--pin-dir")
            .arg(&n.pin_dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting dataplane monitor")?;
        let mut err = std::io::BufReader::new(child.stderr.take().context("stderr")?);
        let mut line = String::new();
        err.read_line(&mut line)?;
        if !line.starts_with("monitoring") {
            let _ = child.kill();
            let _ = child.wait();
            bail!("dataplane monitor did not start: {line}");
        }
        Monitor::new(child)
    }

    /// The value of a Prometheus series (`name` or `name{labels}`, as the
    /// text format prints it) from node `node`'s `/metrics`.
    pub fn metric(&self, node: usize, series: &str) -> Result<Option<f64>> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 9963));
        let (code, body) = http_get(&self.state.nodes[node].netns, addr, "/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(body.lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        }))
    }

    /// Packets node `node` counted under (hook, direction, reason) in
    /// dp_metrics.
    pub fn counted(&self, node: usize, hook: &str, direction: &str, reason: &str) -> Result<u64> {
        Ok(self
            .dump(node, "dp_metrics")?
            .iter()
            .filter(|r| r["hook"] == hook && r["direction"] == direction && r["reason"] == reason)
            .filter_map(|r| r["packets"].as_u64())
            .sum())
    }

    /// `dataplane map dump <map> -o json` on node `node`, parsed.
    pub fn dump(&self, node: usize, map: &str) -> Result<Vec<serde_json::Value>> {
        Ok(serde_json::from_str(
            &self.cli(node, &["map", "dump", map, "-o", "json"])?,
        )?)
    }

    /// Leaves the lab running after this value is gone (`xtask lab up`).
    pub fn persist(mut self) -> Result<LabState> {
        self.state.owner_pid = None;
        self.save()?;
        self.armed = false;
        Ok(std::mem::take(&mut self.state))
    }

    /// Labs recorded under [`RUN_ROOT`] (running or left behind).
    pub fn list() -> Result<Vec<LabState>> {
        let mut labs = Vec::new();
        let Ok(dir) = fs::read_dir(RUN_ROOT) else {
            return Ok(labs);
        };
        for entry in dir.flatten() {
            let path = entry.path().join("state.json");
            if let Ok(bytes) = fs::read(&path) {
                match serde_json::from_slice::<LabState>(&bytes) {
                    Ok(state) => labs.push(state),
                    Err(e) => eprintln!("skipping {}: {e}", path.display()),
                }
            }
        }
        labs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(labs)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if std::thread::panicking() {
            for (i, node) in self.state.nodes.iter().enumerate() {
                eprintln!(
                    "---- agent log of {} ----\n{}",
                    node.name,
                    self.agent_log(i)
                );
            }
        }
        for child in &mut self.agents {
            stop_process(child.id(), None);
            let _ = child.wait();
        }
        teardown(&self.state);
    }
}

/// Whether `pid` is a `dataplane agent` for `node` (pids get reused).
fn is_agent(pid: u32, node: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.contains(&b"agent".as_slice()) && args.contains(&node.as_bytes())
        })
        .unwrap_or(false)
}

/// Whether `pid` is the pod server of `pod` (pids get reused).
fn is_server(pid: u32, pod: &PodState) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.contains(&b"pod-serve".as_slice()) && args.contains(&pod.netns.as_bytes())
        })
        .unwrap_or(false)
}

/// Stops a pod's server if `pid` is still it.
fn stop_server(pid: u32, pod: &PodState) {
    if is_server(pid, pod) {
        stop_process(pid, None);
    }
}

/// SIGTERM, a grace period, then SIGKILL. With `node`, only if the pid is
/// still that node's agent.
fn stop_process(pid: u32, node: Option<&str>) {
    if node.is_some_and(|n| !is_agent(pid, n)) {
        return;
    }
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        // SAFETY: signal 0 only probes for existence.
        if unsafe { libc::kill(pid, 0) } != 0
            || fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Removes everything a lab created. Best effort: keeps going past errors so
/// one stuck piece does not leave the rest behind.
pub fn teardown(state: &LabState) {
    for node in &state.nodes {
        if let Some(pid) = node.agent_pid {
            stop_process(pid, Some(&node.name));
        }
        // A BGP daemon an agent started outlives it.
        let pid_file = state
            .run_dir
            .join(format!("{}-state", node.name))
            .join("bgp/bird.pid");
        if let Some(pid) = fs::read_to_string(pid_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            routed::stop_daemon(pid, &["bird"]);
        }
    }
    if let Some(router) = &state.router {
        for pid in &router.pids {
            routed::stop_daemon(*pid, &["bird", "zebra", "bgpd"]);
        }
    }
    for pod in &state.pods {
        if let Some(pid) = pod.server_pid {
            stop_server(pid, pod);
        }
    }
    // Pods first, the underlay last: deleting a netns deletes its veth ends.
    for ns in state.namespaces.iter().rev() {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
    for node in &state.nodes {
        let _ = fs::remove_dir_all(&node.pin_dir);
    }
    if !state.pin_root.as_os_str().is_empty() {
        let _ = fs::remove_dir(&state.pin_root);
        // The common root too, once no lab pins under it.
        if let Some(root) = state.pin_root.parent() {
            let _ = fs::remove_dir(root);
        }
    }
    for cg in state.cgroups.iter().rev() {
        // Empty once the namespaces' processes are gone; a cgroup keeps no
        // BPF link alive (the pins are removed above).
        let _ = fs::remove_dir(cg);
    }
    if !state.run_dir.as_os_str().is_empty() {
        let _ = fs::remove_dir_all(&state.run_dir);
    }
}

/// Tears down every lab recorded under [`RUN_ROOT`] that no live process
/// owns (persisted ones, and those of killed runs); returns their ids.
pub fn teardown_unowned() -> Result<Vec<String>> {
    let labs: Vec<LabState> = Lab::list()?.into_iter().filter(LabState::unowned).collect();
    for lab in &labs {
        teardown(lab);
    }
    Ok(labs.into_iter().map(|l| l.id).collect())
}

/// See [`Lab::host_snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSnapshot {
    pub links: Vec<String>,
    /// Reserved addresses (and any temporary files) in the IPAM directory.
    pub reservations: Vec<String>,
    /// Container ids the agent has endpoints for.
    pub endpoints: Vec<String>,
}

/// Runs `f` on a thread inside network namespace `netns` (by `ip netns`
/// name): sockets it opens belong to that namespace.
pub fn in_netns_thread<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = netns_file(netns)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // Only this thread moves.
            enter_netns(&file).with_context(|| format!("setns {netns}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {netns} panicked"))?
    })
}

/// Result of a ping run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ping {
    pub transmitted: u64,
    pub received: u64,
}

/// Pings `dst` from inside `netns`, `count` times. Never fails on loss:
/// callers assert on the numbers.
pub fn ping(netns: &str, dst: &str, count: u32, extra: &[&str]) -> Result<Ping> {
    let out = in_netns(netns, "ping")
        .args([
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            "-W",
            "1",
        ])
        .args(extra)
        .arg(dst)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| {
            format!(
                "no ping summary in: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let nums: Vec<u64> = line
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    match nums.as_slice() {
        [transmitted, received, ..] => Ok(Ping {
            transmitted: *transmitted,
            received: *received,
        }),
        _ => bail!("cannot parse ping summary {line:?}"),
    }
}

/// Runs a bind of a fixed port, retrying for up to two seconds while the
/// port is in use. A socket this process just closed can stay bound for a
/// moment: a child that another test thread is spawning holds a copy of
/// its descriptor until it execs.
pub fn bind_retrying<T>(bind: impl Fn() -> std::io::Result<T>) -> std::io::Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match bind() {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// TCP and UDP echo on `port` inside `netns`, until `stop` is set. Run it on
/// a thread of its own (it blocks).
pub fn echo_server(netns: &str, port: u16, stop: &std::sync::atomic::AtomicBool) -> Result<()> {
    use std::io::{Read as _, Write as _};
    use std::sync::atomic::Ordering;
    in_netns_thread(netns, || -> Result<()> {
        let tcp = bind_retrying(|| std::net::TcpListener::bind(("0.0.0.0", port)))?;
        tcp.set_nonblocking(true)?;
        let udp = bind_retrying(|| std::net::UdpSocket::bind(("0.0.0.0", port)))?;
        udp.set_nonblocking(true)?;
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            let mut idle = true;
            if let Ok((mut s, _)) = tcp.accept() {
                idle = false;
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                // Echo until the peer closes: also serves bulk transfers,
                // answered with the byte count instead of the bytes.
                let mut total: u64 = 0;
                let mut first = Vec::new();
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if total == 0 && n <= 1024 && first.is_empty() {
                                first.extend_from_slice(&buf[..n]);
                                if first.ends_with(b"\n") {
                                    let _ = s.write_all(&first);
                                    break;
                                }
                            }
                            total += n as u64;
                        }
                    }
                }
                if !first.ends_with(b"\n") {
                    let _ = s.write_all(format!("{total}\n").as_bytes());
                }
            }
            if let Ok((n, from)) = udp.recv_from(&mut buf) {
                idle = false;
                let _ = udp.send_to(&buf[..n], from);
            }
            if idle {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(())
    })?
}

/// Connects, retrying while the server is still coming up (refused).
pub fn connect(to: std::net::SocketAddr) -> Result<std::net::TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r.with_context(|| format!("connecting to {to}")),
        }
    }
}

/// One TCP round trip from `netns` to an [`echo_server`]: the line back.
pub fn tcp_echo(netns: &str, to: std::net::SocketAddr, line: &str) -> Result<String> {
    use std::io::{Read as _, Write as _};
    in_netns_thread(netns, || -> Result<String> {
        let mut s = connect(to)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(format!("{line}\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.trim_end().to_owned())
    })?
}

/// Sends one UDP datagram from `netns` (for forged packets: the payload is
/// whatever the test built).
pub fn send_udp(netns: &str, to: std::net::SocketAddr, payload: &[u8]) -> Result<()> {
    in_netns_thread(netns, || -> Result<()> {
        let s = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        s.send_to(payload, to)?;
        Ok(())
    })?
}

/// One UDP round trip from `netns` to an [`echo_server`].
pub fn udp_echo(netns: &str, to: std::net::SocketAddr, payload: &str) -> Result<String> {
    in_netns_thread(netns, || -> Result<String> {
        let s = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 2048];
        // UDP may lose the first datagram while a neighbour resolves.
        for _ in 0..4 {
            s.send_to(payload.as_bytes(), to)?;
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        bail!("no UDP answer from {to}")
    })?
}

/// Sends `bytes` over TCP with the DF bit forced on (path MTU discovery
/// "do"), returns what the [`echo_server`] says it received.
pub fn tcp_bulk(netns: &str, to: std::net::SocketAddr, bytes: usize) -> Result<u64> {
    use std::io::{Read as _, Write as _};
    use std::os::fd::AsRawFd as _;
    in_netns_thread(netns, || -> Result<u64> {
        let mut s = connect(to)?;
        let val: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: setsockopt with a valid int option on our socket.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!("IP_MTU_DISCOVER: {}", std::io::Error::last_os_error());
        }
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n])?;
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.trim().parse()?)
    })?
}

/// A packet capture on the lab's underlay.
pub struct Capture {
    child: Child,
    file: PathBuf,
    // Kept open so tcpdump's closing statistics do not hit a closed pipe.
    _stderr: std::io::BufReader<std::process::ChildStderr>,
}

impl Lab {
    /// Starts capturing node `node`'s traffic on the underlay (its bridge
    /// port: the bridge device itself sees only frames for the bridge) with a
    /// tcpdump `filter`; returns once tcpdump listens.
    pub fn capture_underlay(&self, node: usize, filter: &str) -> Result<Capture> {
        self.capture_on(
            &self.state.underlay_netns.clone(),
            &format!("n{node}"),
            filter,
        )
    }

    /// Starts capturing on `iface` in `netns` with a tcpdump `filter`;
    /// returns once tcpdump listens.
    pub fn capture_on(&self, netns: &str, iface: &str, filter: &str) -> Result<Capture> {
        use std::io::BufRead as _;
        let file = self
            .state
            .run_dir
            .join(format!("capture-{}.pcap", random_id()?));
        let mut child = in_netns(netns, "tcpdump")
            // -Z root: Debian's tcpdump otherwise drops to a user that cannot
            // write into the lab's run directory.
            // --immediate-mode: packets reach tcpdump as they arrive, not
            // per ring block, so a capture stopped early still has them.
            .args([
                "-i",
                iface,
                "-Z",
                "root",
                "--immediate-mode",
                "-nn",
                "-U",
                "-s",
                "256",
                "-w",
            ])
            .arg(&file)
            .args(filter.split_whitespace())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump")?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let mut line = String::new();
        let mut stderr = std::io::BufReader::new(stderr);
        stderr.read_line(&mut line)?;
        if !line.contains("listening") {
            let _ = child.kill();
            bail!("tcpdump did not start: {line}");
        }
        Ok(Capture {
            child,
            file,
            _stderr: stderr,
        })
    }
}

impl Capture {
    /// Stops the capture and returns the Ethernet frames it saw.
    pub fn finish(mut self) -> Result<Vec<Vec<u8>>> {
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(i32::try_from(self.child.id())?, libc::SIGINT) };
        let _ = self.child.wait();
        let data = fs::read(&self.file)?;
        let _ = fs::remove_file(&self.file);
        parse_pcap(&data)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.file);
    }
}

/// Frames of a pcap file.
pub fn parse_pcap(data: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut reader = pcap_file::pcap::PcapReader::new(data).context("not a pcap file")?;
    let mut frames = Vec::new();
    while let Some(packet) = reader.next_packet() {
        frames.push(packet.context("pcap record")?.data.into_owned());
    }
    Ok(frames)
}

/// The IPv4 header of an Ethernet frame, if it carries one (captures are
/// cut at the snap length, so parsing is lax about the payload).
fn ipv4_header(frame: &[u8]) -> Option<(etherparse::Ipv4Header, &[u8])> {
    let h = etherparse::LaxPacketHeaders::from_ethernet(frame).ok()?;
    let Some(etherparse::NetHeaders::Ipv4(ip, _)) = h.net else {
        return None;
    };
    let ihl = usize::from(ip.ihl()) * 4;
    Some((ip, frame.get(14 + ihl..)?))
}

/// IPv4 header fields of an Ethernet frame: (source, destination, protocol,
/// header length), or `None` for anything else.
pub fn ipv4_of(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u8, usize)> {
    let (ip, _) = ipv4_header(frame)?;
    Some((
        Ipv4Addr::from(ip.source),
        Ipv4Addr::from(ip.destination),
        ip.protocol.0,
        usize::from(ip.ihl()) * 4,
    ))
}

/// What a frame on the underlay carries, outer and (for VXLAN) inner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// UDP destination port, for UDP.
    pub dport: Option<u16>,
    /// VXLAN network identifier, when the UDP payload is VXLAN (I flag set).
    pub vni: Option<u32>,
    /// The encapsulated frame's IPv4 source, destination and protocol.
    pub inner: Option<(Ipv4Addr, Ipv4Addr, u8)>,
}

/// Decodes an IPv4 frame; UDP to `vxlan_port` is decoded as VXLAN, inner
/// headers included.
pub fn decode(frame: &[u8], vxlan_port: u16) -> Option<Decoded> {
    let (ip, rest) = ipv4_header(frame)?;
    let mut d = Decoded {
        src: Ipv4Addr::from(ip.source),
        dst: Ipv4Addr::from(ip.destination),
        proto: ip.protocol.0,
        dport: None,
        vni: None,
        inner: None,
    };
    if ip.protocol == etherparse::IpNumber::UDP
        && let Ok((udp, payload)) = etherparse::UdpHeader::from_slice(rest)
    {
        d.dport = Some(udp.destination_port);
        if udp.destination_port == vxlan_port && payload.len() >= 8 && payload[0] & 0x08 != 0 {
            d.vni = Some(u32::from_be_bytes([0, payload[4], payload[5], payload[6]]));
            d.inner = ipv4_of(&payload[8..]).map(|(s, t, p, _)| (s, t, p));
        }
    }
    Some(d)
}

/// `GET path` on `addr` from inside `netns`: (status code, body).
pub fn http_get(netns: &str, addr: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    in_netns_thread(netns, || -> Result<(u16, String)> {
        let mut s = connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let (head, body) = out.split_once("\r\n\r\n").context("no HTTP header end")?;
        let code = head
            .split_whitespace()
            .nth(1)
            .context("no status")?
            .parse()?;
        Ok((code, body.to_owned()))
    })?
}

/// A running `dataplane monitor` (killed on drop if still running). Its
/// output is read as it comes (a flood's would fill a pipe and stall it).
pub struct Monitor {
    child: std::process::Child,
    out: Option<std::thread::JoinHandle<String>>,
}

impl Monitor {
    fn new(mut child: std::process::Child) -> Result<Self> {
        use std::io::Read as _;
        let mut stdout = child.stdout.take().context("stdout")?;
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        Ok(Monitor {
            child,
            out: Some(out),
        })
    }

    /// Waits for it to end (its `--count` or `--duration`), at most
    /// `timeout`; its JSON lines, the summary last.
    pub fn events(self, timeout: Duration) -> Result<Vec<Value>> {
        self.output(timeout)?
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
            .collect()
    }

    /// Waits as [`Monitor::events`] does; what it printed.
    pub fn output(mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                // SAFETY: our own child, by pid.
                unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
                self.child.wait()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.out
            .take()
            .context("output taken")?
            .join()
            .map_err(|_| anyhow::anyhow!("monitor output reader panicked"))
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
