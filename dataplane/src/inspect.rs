//! The debug CLI's views that combine the node's pinned maps with the
//! agent's answers: each works from the pins alone when the agent is not
//! running, and says what is missing without it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use dataplane_common::{
    EP_F_LOCAL, IPCACHE_KIND_REMOTE_HOST, IPCACHE_KIND_REMOTE_PODS, MAP_CT, MODE_NATIVE,
    MODE_VXLAN, api,
};
use serde::Serialize;

use crate::maps::{self, Format, Row};

fn ask(socket: &Path, request: &api::Request) -> Result<api::Response> {
    let r = api::call(socket, request, Duration::from_secs(10))?;
    if let api::Response::Error { message } | api::Response::NotReady { message } = r {
        bail!("{message}");
    }
    Ok(r)
}

/// A program attached through a pinned link, as `status` lists it.
#[derive(Debug, Serialize)]
pub struct ProgramRow {
    pub program: String,
    /// The device (or cgroup) it is attached to.
    pub attached_to: String,
    /// `tcx`, `xdp`, `cgroup`.
    pub link: String,
    pub program_id: u32,
}

impl Row for ProgramRow {
    const HEADERS: &'static [&'static str] = &["PROGRAM", "ATTACHED TO", "LINK", "PROGRAM-ID"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.program.clone(),
            self.attached_to.clone(),
            self.link.clone(),
            self.program_id.to_string(),
        ]
    }
}

/// The programs of the node's pinned links (`<pin dir>/links/`): tcx,
/// XDP and cgroup attachments. clsact filters have no link to pin.
pub fn programs(pin_dir: &Path) -> Result<Vec<ProgramRow>> {
    let dir = pin_dir.join("links");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut rows = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((program, target)) = name.split_once('@') else {
            continue;
        };
        let link = aya::programs::links::PinnedLink::from_pin(e.path())
            .with_context(|| format!("opening {}", e.path().display()))?;
        let info = aya::programs::links::FdLink::from(link).info()?;
        let kind = match info.link_type() {
            Ok(aya::programs::links::LinkType::Tcx) => "tcx",
            Ok(aya::programs::links::LinkType::Xdp) => "xdp",
            Ok(aya::programs::links::LinkType::Cgroup) => "cgroup",
            _ => "other",
        };
        rows.push(ProgramRow {
            program: program.to_owned(),
            attached_to: dataplane_common::pin::unescape(target).unwrap_or_else(|| target.into()),
            link: kind.into(),
            program_id: info.program_id(),
        });
    }
    rows.sort_by(|a, b| (&a.program, &a.attached_to).cmp(&(&b.program, &b.attached_to)));
    Ok(rows)
}

#[derive(Debug, Serialize)]
pub struct MapFill {
    pub name: &'static str,
    /// Tables that fill up (hashes, tries), not fixed arrays of slots.
    #[serde(skip)]
    pub fills: bool,
    pub entries: usize,
    pub max: u32,
}

#[derive(Debug, Serialize)]
pub struct DatapathFacts {
    pub mode: &'static str,
    pub node_ip: String,
    pub vni: u32,
    pub masquerade: bool,
    pub socket_lb: bool,
    /// NodePort traffic from outside served in XDP (when XDP is attached).
    pub xdp_lb: bool,
}

/// `dataplane status`: the agent's answer (flattened, when it answers) and
/// what the pins say.
#[derive(Debug, Serialize)]
pub struct Status {
    #[serde(flatten)]
    pub agent: Option<api::AgentStatus>,
    pub agent_running: bool,
    pub agent_error: Option<String>,
    pub pins: Option<String>,
    pub datapath: Option<DatapathFacts>,
    pub programs: Vec<ProgramRow>,
    pub maps: Vec<MapFill>,
    /// Conntrack entries in use, and the table's size.
    pub conntrack: Option<(usize, u32)>,
}

/// Gathers the status: from the agent at `socket`, and from `pin_dir` (or
/// where the agent says it pins).
pub fn status(socket: &Path, pin_dir: Option<PathBuf>) -> Result<Status> {
    let (agent, agent_error) = match ask(socket, &api::Request::Status) {
        Ok(api::Response::Status(st)) => (Some(*st), None),
        Ok(other) => (None, Some(format!("unexpected answer {other:?}"))),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let pin_dir = pin_dir.or_else(|| agent.as_ref().map(|a| PathBuf::from(&a.pin_dir)));
    let mut st = Status {
        agent_running: agent.is_some(),
        agent,
        agent_error,
        pins: None,
        datapath: None,
        programs: Vec::new(),
        maps: Vec::new(),
        conntrack: None,
    };
    let Some(dir) = pin_dir else {
        return Ok(st);
    };
    let Ok(cfg) = maps::config::ConfigMap::open(&dir).and_then(|c| c.get()) else {
        return Ok(st);
    };
    st.pins = Some(dir.display().to_string());
    st.datapath = Some(DatapathFacts {
        mode: match cfg.mode {
            MODE_VXLAN => "vxlan",
            MODE_NATIVE => "native",
            _ => "not configured",
        },
        node_ip: std::net::Ipv4Addr::from(cfg.node_ipv4).to_string(),
        vni: cfg.vni,
        masquerade: cfg.flags & dataplane_common::DP_F_MASQUERADE != 0,
        socket_lb: cfg.flags & dataplane_common::DP_F_SOCKET_LB != 0,
        xdp_lb: cfg.flags & dataplane_common::DP_F_XDP_LB != 0,
    });
    st.programs = programs(&dir)?;
    for spec in dataplane_common::MAPS {
        let Ok(entries) = maps::count(&dir, spec.name) else {
            continue;
        };
        let max = aya::maps::MapInfo::from_pin(dir.join(spec.pin_name()))
            .map_or(spec.max_entries, |i| i.max_entries());
        if spec.name == MAP_CT {
            st.conntrack = Some((entries, max));
        }
        st.maps.push(MapFill {
            fills: !matches!(
                spec.kind,
                dataplane_common::MapKind::Array
                    | dataplane_common::MapKind::PerCpuArray
                    | dataplane_common::MapKind::RingBuf
            ),
            name: spec.name,
            entries,
            max,
        });
    }
    Ok(st)
}

/// Prints the status; fails (non-zero exit) when neither an agent nor a
/// datapath is found, and says which is missing.
pub fn print_status(st: &Status, output: Format) -> Result<()> {
    if st.agent.is_none() && st.datapath.is_none() {
        bail!(
            "no datapath and no agent on this node: {} (is `dataplane agent` running? pass --pin-dir or --node for pins)",
            st.agent_error.as_deref().unwrap_or("no answer")
        );
    }
    if output == Format::Json {
        println!("{}", serde_json::to_string_pretty(st)?);
    } else {
        print_table(st)?;
    }
    if st.agent.is_none() {
        bail!("the agent is not running");
    }
    Ok(())
}

fn print_table(st: &Status) -> Result<()> {
    match &st.agent {
        Some(a) => {
            print!(
                "{}",
                maps::table(
                    &[
                        "NODE",
                        "VERSION",
                        "MODE",
                        "NODE-IP",
                        "POD-CIDR",
                        "PEERS",
                        "READY",
                        "ATTACH",
                        "XDP",
                        "ENDPOINTS",
                        "FRONTENDS",
                    ],
                    vec![vec![
                        a.node.clone(),
                        a.version.clone(),
                        a.mode.clone(),
                        a.node_ip.clone(),
                        a.pod_cidr.clone().unwrap_or_else(|| "-".into()),
                        a.nodes.to_string(),
                        a.ready.to_string(),
                        a.attach_mode.clone(),
                        a.xdp.clone(),
                        a.endpoints.to_string(),
                        if a.frontends_empty > 0 {
                            format!("{} ({} empty)", a.frontends, a.frontends_empty)
                        } else {
                            a.frontends.to_string()
                        },
                    ]],
                )
            );
        }
        None => println!(
            "agent: not running ({}); the pinned datapath keeps forwarding",
            st.agent_error.as_deref().unwrap_or("no answer")
        ),
    }
    if let (Some(d), Some(p)) = (&st.datapath, &st.pins) {
        println!(
            "\ndatapath: {} mode, node {}, VNI {}, masquerade {}, socket LB {}, XDP LB {}; pins in {p}",
            d.mode,
            d.node_ip,
            d.vni,
            if d.masquerade { "on" } else { "off" },
            if d.socket_lb { "on" } else { "off" },
            if d.xdp_lb { "on" } else { "off" }
        );
        if st.programs.is_empty() {
            println!("programs: no pinned links (clsact filters: see `tc filter show`)");
        } else {
            print!("{}", maps::render(&st.programs, Format::Table)?);
        }
        if let Some((n, max)) = st.conntrack {
            println!("conntrack: {n} entries of {max}");
        }
        let fullest = st
            .maps
            .iter()
            .filter(|m| m.fills && m.max > 0)
            .max_by(|a, b| {
                (a.entries as f64 / f64::from(a.max))
                    .total_cmp(&(b.entries as f64 / f64::from(b.max)))
            });
        if let Some(m) = fullest {
            println!(
                "fullest map: {} {}/{} ({:.1}%; all maps: `dataplane map list`)",
                m.name,
                m.entries,
                m.max,
                100.0 * m.entries as f64 / f64::from(m.max)
            );
        }
    }
    Ok(())
}

/// An endpoint of this node, from the map, named by the agent when it
/// answers.
#[derive(Debug, Serialize)]
pub struct EndpointView {
    pub pod: Option<String>,
    pub ip: String,
    pub ifindex: u32,
    pub ifname: Option<String>,
    pub identity: u32,
    pub mac: String,
    pub container_id: Option<String>,
    /// Packets and bytes from and to it (`dp_ep_metrics`).
    pub counters: BTreeMap<String, (u64, u64)>,
}

impl Row for EndpointView {
    const HEADERS: &'static [&'static str] = &[
        "POD",
        "IP",
        "IFINDEX",
        "IFNAME",
        "IDENTITY",
        "MAC",
        "CONTAINER",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.pod.clone().unwrap_or_else(|| "-".into()),
            self.ip.clone(),
            self.ifindex.to_string(),
            self.ifname.clone().unwrap_or_else(|| "-".into()),
            self.identity.to_string(),
            self.mac.clone(),
            self.container_id.clone().unwrap_or_else(|| "-".into()),
        ]
    }
}

/// This node's endpoints: `dp_endpoints`' local entries, with the agent's
/// names when it answers (`None` in the second place: it did).
pub fn endpoints(pin_dir: &Path, socket: &Path) -> Result<(Vec<EndpointView>, Option<String>)> {
    let (registry, missing) = match ask(socket, &api::Request::EndpointList) {
        Ok(api::Response::Endpoints { endpoints }) => (endpoints, None),
        Ok(_) => (Vec::new(), Some("unexpected answer".to_owned())),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    let counters = maps::ep_metrics::rows(pin_dir).unwrap_or_default();
    let mut out = Vec::new();
    for (k, v) in maps::endpoints::EndpointMap::open(pin_dir)?.entries()? {
        if v.flags & EP_F_LOCAL == 0 {
            continue;
        }
        let Some(ip) = k.ip() else { continue };
        let reg = registry.iter().find(|e| e.ifindex == v.ifindex);
        out.push(EndpointView {
            pod: reg.map(|e| format!("{}/{}", e.spec.pod_namespace, e.spec.pod_name)),
            ip: ip.to_string(),
            ifindex: v.ifindex,
            ifname: reg.map(|e| e.spec.host_ifname.clone()),
            identity: v.identity,
            mac: dataplane_common::format_mac(&v.mac),
            container_id: reg.map(|e| e.spec.container_id.clone()),
            counters: counters
                .iter()
                .filter(|c| c.ifindex == v.ifindex)
                .map(|c| (c.direction.clone(), (c.packets, c.bytes)))
                .collect(),
        });
    }
    Ok((out, missing))
}

/// A remote node, from the ipcache.
#[derive(Debug, Serialize)]
pub struct NodeView {
    pub address: String,
    pub pod_cidrs: Vec<String>,
}

impl Row for NodeView {
    const HEADERS: &'static [&'static str] = &["NODE-ADDRESS", "POD-CIDRS"];
    fn cells(&self) -> Vec<String> {
        vec![self.address.clone(), self.pod_cidrs.join(",")]
    }
}

/// The other nodes this one reaches, with their pod CIDRs.
pub fn nodes(pin_dir: &Path) -> Result<Vec<NodeView>> {
    let mut by: BTreeMap<std::net::Ipv4Addr, Vec<String>> = BTreeMap::new();
    for (p, e) in maps::ipcache::IpcacheMap::open(pin_dir)?.entries()? {
        let [a, b, c, d, ..] = e.tunnel_endpoint;
        let node = std::net::Ipv4Addr::new(a, b, c, d);
        match e.kind {
            IPCACHE_KIND_REMOTE_HOST => {
                by.entry(node).or_default();
            }
            IPCACHE_KIND_REMOTE_PODS => by.entry(node).or_default().push(p.0.to_string()),
            _ => {}
        }
    }
    Ok(by
        .into_iter()
        .map(|(n, cidrs)| NodeView {
            address: n.to_string(),
            pod_cidrs: cidrs,
        })
        .collect())
}

#[derive(Debug, Serialize)]
pub struct IdentityView {
    pub id: u32,
    pub namespace: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    /// Addresses (from `dp_endpoints`) that carry it, on this node and
    /// others.
    pub addresses: usize,
    /// Local pods that have it (from the agent).
    pub endpoints: Vec<String>,
}

impl Row for IdentityView {
    const HEADERS: &'static [&'static str] =
        &["ID", "NAMESPACE", "LABELS", "ADDRESSES", "LOCAL PODS"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.namespace.clone().unwrap_or_else(|| "?".into()),
            self.labels.as_ref().map_or_else(
                || "? (the agent knows)".into(),
                |l| {
                    l.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                },
            ),
            self.addresses.to_string(),
            if self.endpoints.is_empty() {
                "-".into()
            } else {
                self.endpoints.join(",")
            },
        ]
    }
}

/// Security identities: the agent's (with labels), or without it those
/// the endpoints in the map carry.
pub fn identities(pin_dir: &Path, socket: &Path) -> Result<(Vec<IdentityView>, Option<String>)> {
    let mut addresses: BTreeMap<u32, usize> = BTreeMap::new();
    for v in maps::endpoints::EndpointMap::open(pin_dir)?
        .entries()?
        .values()
    {
        if v.identity != 0 {
            *addresses.entry(v.identity).or_default() += 1;
        }
    }
    match ask(socket, &api::Request::Identities) {
        Ok(api::Response::Identities { identities }) => Ok((
            identities
                .into_iter()
                .map(|i| IdentityView {
                    addresses: addresses.get(&i.id).copied().unwrap_or(0),
                    id: i.id,
                    namespace: Some(i.namespace),
                    labels: Some(i.labels),
                    endpoints: i.endpoints,
                })
                .collect(),
            None,
        )),
        other => {
            let why = match other {
                Err(e) => format!("{e:#}"),
                Ok(r) => format!("unexpected answer {r:?}"),
            };
            Ok((
                addresses
                    .into_iter()
                    .map(|(id, n)| IdentityView {
                        id,
                        namespace: None,
                        labels: None,
                        addresses: n,
                        endpoints: Vec::new(),
                    })
                    .collect(),
                Some(why),
            ))
        }
    }
}
