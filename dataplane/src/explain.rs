//! `dataplane explain <src> <dst> <proto>/<port>`: builds the packet, runs it
//! through the node's live program with `BPF_PROG_TEST_RUN` against the
//! real maps, marked as a dry run (see `dataplane_common::explain`: the
//! programs decide as for any packet, change nothing, and note each
//! decision), and tells the path step by step: which endpoint sent it, the
//! conntrack entry or the Service and backend it got, each policy decision
//! and the policy that made it, where it went, and the verdict.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsFd as _,
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, MapData};
use dataplane_common::{
    CT_F_DST, CT_F_HAIRPIN, CT_F_MASQ, CT_F_NODEPORT_SNAT, CT_F_POLICY, CT_F_SERVICE, CT_F_SRC,
    EP_F_LOCAL, EXPLAIN_COOKIE, EXPLAIN_CT, EXPLAIN_EGRESS, EXPLAIN_INGRESS, EXPLAIN_MARK,
    EXPLAIN_POLICY_ALLOWED, EXPLAIN_POLICY_DENIED, EXPLAIN_POLICY_HOST, EXPLAIN_POLICY_NONE,
    EXPLAIN_POLICY_OPEN, EXPLAIN_POLICY_REPLY, EXPLAIN_PORT_CLAIM, EXPLAIN_REJECT, EXPLAIN_ROUTE,
    EXPLAIN_ROUTE_HOST, EXPLAIN_ROUTE_LOCAL, EXPLAIN_ROUTE_STACK, EXPLAIN_ROUTE_TUNNEL,
    EXPLAIN_ROUTE_UPLINK, EXPLAIN_SERVICE, EXPLAIN_VERDICT, EndpointKey, ExplainPolicy,
    ExplainTrace, IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_UNKNOWN, IDENTITY_WORLD,
    IPCACHE_KIND_REMOTE_HOST, IPCACHE_KIND_REMOTE_PODS, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
    IpcacheEntry, MAP_EXPLAIN, MODE_VXLAN, Reason, api,
};
use serde::Serialize;

use crate::maps::{self, Format};

/// What to explain: the packet and where the CLI finds things.
pub struct Request<'a> {
    pub pin_dir: &'a Path,
    /// The agent's socket, for names (pods, Services, identities).
    pub socket: &'a Path,
    pub src: &'a str,
    pub dst: &'a str,
    /// `tcp/80`, `udp/53`, `icmp`.
    pub what: &'a str,
    pub sport: Option<u16>,
}

/// The whole explanation, as `-o json` prints it.
#[derive(Debug, Serialize)]
pub struct Explained {
    pub packet: String,
    pub program: String,
    pub program_id: u32,
    pub ifindex: u32,
    /// Every step, in order: (what, detail).
    pub steps: Vec<Step>,
    /// `forwarded`, `dropped`, or `answered`.
    pub verdict: String,
    /// The reason it is counted under (`forwarded` or a drop reason).
    pub reason: String,
    /// The packet as it would leave (after any rewrite).
    pub leaves_as: Option<String>,
    /// The node it is encapsulated to, whose programs decide next.
    pub next_node: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Step {
    pub step: &'static str,
    pub detail: String,
}

/// `tcp/80` (or `80/tcp`), `udp/53`, `icmp`: (protocol, port).
fn parse_what(what: &str) -> Result<(u8, u16)> {
    let lower = what.to_ascii_lowercase();
    if lower == "icmp" {
        return Ok((IPPROTO_ICMP, 0));
    }
    let (a, b) = lower
        .split_once('/')
        .with_context(|| format!("{what:?}: expected tcp/PORT, udp/PORT or icmp"))?;
    let (proto, port) = if a.parse::<u16>().is_ok() {
        (b, a)
    } else {
        (a, b)
    };
    let proto = match proto {
        "tcp" => IPPROTO_TCP,
        "udp" => IPPROTO_UDP,
        _ => bail!("{what:?}: protocol {proto:?} is not tcp, udp or icmp"),
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("{what:?}: port {port:?} is not 1-65535"))?;
    Ok((proto, port))
}

/// An address: an IP as is; a pod (`namespace/name`, or a name in
/// `default`) or a Service (`svc/namespace/name`) through the agent.
pub fn resolve(socket: &Path, what: &str) -> Result<Ipv4Addr> {
    if let Ok(ip) = what.parse::<Ipv4Addr>() {
        return Ok(ip);
    }
    if what.parse::<IpAddr>().is_ok() {
        bail!("{what}: IPv6 is not routed by the datapath yet");
    }
    let answer = api::call(
        socket,
        &api::Request::Resolve {
            name: what.to_owned(),
        },
        std::time::Duration::from_secs(5),
    )
    .with_context(|| format!("{what}: names need the agent ({})", socket.display()))?;
    match answer {
        api::Response::Addresses { ips } => ips
            .into_iter()
            .find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .with_context(|| format!("{what} has no IPv4 address")),
        api::Response::Error { message } | api::Response::NotReady { message } => {
            bail!("{message}")
        }
        other => bail!("unexpected answer {other:?}"),
    }
}

/// The live program `name` of the node pinned at `pin_dir`: the newest
/// loaded program of that name using one of the node's maps.
fn live_program(pin_dir: &Path, name: &str) -> Result<aya::programs::ProgramInfo> {
    let mut node_maps = Vec::new();
    for spec in dataplane_common::MAPS {
        if let Ok(info) = aya::maps::MapInfo::from_pin(pin_dir.join(spec.pin_name())) {
            node_maps.push(info.id());
        }
    }
    let mut best: Option<aya::programs::ProgramInfo> = None;
    for p in aya::programs::loaded_programs() {
        let p = p.context("listing loaded programs")?;
        if p.name_as_str() != Some(name) {
            continue;
        }
        let uses = p
            .map_ids()
            .ok()
            .flatten()
            .is_some_and(|ids| ids.iter().any(|id| node_maps.contains(id)));
        if uses && best.as_ref().is_none_or(|b| b.id() < p.id()) {
            best = Some(p);
        }
    }
    best.with_context(|| {
        format!(
            "no live {name} program uses the maps in {} (is the agent's datapath loaded?)",
            pin_dir.display()
        )
    })
}

/// A `struct __sk_buff` for a dry run arriving on `ifindex`: the mark and
/// the first control-block word say so, words 1 and 2 carry a tunnel's
/// sender and VNI.
fn dry_ctx(ifindex: u32, tunnel: Option<(Ipv4Addr, u32)>) -> [u8; 192] {
    let mut c = [0u8; 192];
    c[8..12].copy_from_slice(&EXPLAIN_MARK.to_ne_bytes());
    c[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    c[48..52].copy_from_slice(&EXPLAIN_COOKIE.to_ne_bytes());
    if let Some((peer, vni)) = tunnel {
        c[52..56].copy_from_slice(&peer.octets());
        c[56..60].copy_from_slice(&vni.to_ne_bytes());
    }
    c
}

fn build_packet(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    sport: u16,
    dport: u16,
) -> Result<Vec<u8>> {
    let b =
        etherparse::PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src.octets(), dst.octets(), 64);
    let mut out = Vec::new();
    match proto {
        IPPROTO_TCP => b.tcp(sport, dport, 1, 64240).syn().write(&mut out, &[])?,
        IPPROTO_UDP => b.udp(sport, dport).write(&mut out, b"explain")?,
        _ => b
            .icmpv4_echo_request(sport, 1)
            .write(&mut out, b"explain")?,
    }
    Ok(out)
}

/// Names the CLI can give things, from the maps (and the agent when it
/// answers).
struct Names {
    policies: BTreeMap<u32, String>,
    identities: BTreeMap<u32, String>,
    /// Every frontend entry by id: (frontend text, scope). One id can
    /// stand for several entries (a port's ClusterIP and its NodePort).
    frontends: BTreeMap<u32, Vec<(String, &'static str)>>,
    backends: BTreeMap<u32, String>,
    pods: BTreeMap<u32, String>,
}

impl Names {
    fn read(pin_dir: &Path, socket: &Path) -> Self {
        let policies = maps::events::PolicyNamesMap::open(pin_dir)
            .and_then(|m| m.all())
            .unwrap_or_default();
        let mut frontends: BTreeMap<u32, Vec<(String, &'static str)>> = BTreeMap::new();
        for r in maps::services::rows(pin_dir).unwrap_or_default() {
            frontends
                .entry(r.id)
                .or_default()
                .push((r.frontend, r.scope));
        }
        let backends = maps::services::BackendsMap::open(pin_dir)
            .and_then(|m| m.entries())
            .map(|b| b.into_iter().map(|(id, b)| (id, b.to_string())).collect())
            .unwrap_or_default();
        let mut identities = BTreeMap::new();
        let mut pods = BTreeMap::new();
        let call = |r| api::call(socket, &r, std::time::Duration::from_secs(3));
        if let Ok(api::Response::Identities { identities: ids }) = call(api::Request::Identities) {
            for i in ids {
                let labels: Vec<String> =
                    i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                identities.insert(i.id, format!("{}: {}", i.namespace, labels.join(",")));
            }
        }
        if let Ok(api::Response::Endpoints { endpoints }) = call(api::Request::EndpointList) {
            for e in endpoints {
                pods.insert(
                    e.ifindex,
                    format!("{}/{}", e.spec.pod_namespace, e.spec.pod_name),
                );
            }
        }
        Names {
            policies,
            identities,
            frontends,
            backends,
            pods,
        }
    }

    fn identity(&self, id: u32) -> String {
        match id {
            IDENTITY_UNKNOWN => "unknown (in the cluster's range, no endpoint)".into(),
            IDENTITY_HOST => "this node".into(),
            IDENTITY_WORLD => "the world (outside the cluster)".into(),
            IDENTITY_REMOTE_NODE => "another node".into(),
            id => match self.identities.get(&id) {
                Some(l) => format!("identity {id} ({l})"),
                None => format!("identity {id}"),
            },
        }
    }

    /// Frontend `id` as the packet addressed it (`dst` is `ip:port/proto`,
    /// matched against the entries of that id; else the first).
    fn frontend(&self, id: u32, dst: &str, dport: &str) -> String {
        let Some(rows) = self.frontends.get(&id) else {
            return format!("frontend {id}");
        };
        rows.iter()
            .find(|(f, _)| f == dst)
            .or_else(|| rows.iter().find(|(f, _)| f == dport))
            .or(rows.first())
            .map(|(f, scope)| format!("{f} ({scope})"))
            .unwrap_or_else(|| format!("frontend {id}"))
    }

    fn endpoint(&self, ifindex: u32) -> String {
        match self.pods.get(&ifindex) {
            Some(p) => format!("{p} (endpoint {ifindex})"),
            None => format!("endpoint {ifindex}"),
        }
    }

    fn policy(&self, p: &ExplainPolicy) -> String {
        let by = || {
            self.policies
                .get(&p.policy)
                .cloned()
                .unwrap_or_else(|| format!("policy {}", p.policy))
        };
        match p.result {
            EXPLAIN_POLICY_NONE => "no NetworkPolicy selects it: allowed".into(),
            EXPLAIN_POLICY_OPEN => {
                "under policy, but this direction is not isolated: allowed".into()
            }
            EXPLAIN_POLICY_ALLOWED => format!("allowed by {}", by()),
            EXPLAIN_POLICY_DENIED => "denied: no policy allows it (default deny)".into(),
            EXPLAIN_POLICY_REPLY => "a reply of a tracked flow: allowed".into(),
            EXPLAIN_POLICY_HOST => "from the pod's own node: always allowed".into(),
            r => format!("result {r}"),
        }
    }
}

fn endpoint(ip: [u8; 4], port: [u8; 2]) -> String {
    format!("{}:{}", Ipv4Addr::from(ip), u16::from_be_bytes(port))
}

fn ct_flags(f: u16) -> String {
    let names: Vec<&str> = [
        (CT_F_SERVICE, "service"),
        (CT_F_MASQ, "masquerade"),
        (CT_F_NODEPORT_SNAT, "nodeport-snat"),
        (CT_F_HAIRPIN, "hairpin"),
        (CT_F_POLICY, "policy"),
    ]
    .into_iter()
    .filter(|(b, _)| f & b != 0)
    .map(|(_, n)| n)
    .collect();
    names.join(",")
}

/// Explains one packet; the explanation.
pub fn explain(req: &Request<'_>) -> Result<Explained> {
    let (proto, dport) = parse_what(req.what)?;
    let src = resolve(req.socket, req.src)?;
    let dst = resolve(req.socket, req.dst)?;
    // An ephemeral port, as a client's would be (a flow of its own).
    let sport = req
        .sport
        .unwrap_or_else(|| 32768 + (std::process::id() % 28000) as u16);
    let cfg = maps::config::ConfigMap::open(req.pin_dir)
        .and_then(|c| c.get())
        .with_context(|| format!("no datapath pinned in {}", req.pin_dir.display()))?;
    let endpoints = maps::endpoints::EndpointMap::open(req.pin_dir)?.entries()?;
    let sender = endpoints.get(&EndpointKey::from(IpAddr::V4(src))).copied();
    // Where the packet enters this node, and as what.
    let (program, ifindex, tunnel, macs, entry) = match sender {
        Some(ep) if ep.flags & EP_F_LOCAL != 0 => (
            "lxc_from_ctr",
            ep.ifindex,
            None,
            (ep.mac, ep.host_mac),
            format!(
                "sent by a pod of this node, on its veth (ifindex {})",
                ep.ifindex
            ),
        ),
        _ => {
            match ipcache_owner(req.pin_dir, src)? {
                Some(e)
                    if cfg.mode == MODE_VXLAN
                        && (e.kind == IPCACHE_KIND_REMOTE_PODS
                            || e.kind == IPCACHE_KIND_REMOTE_HOST) =>
                {
                    let [a, b, c, d, ..] = e.tunnel_endpoint;
                    let peer = Ipv4Addr::new(a, b, c, d);
                    // A pod's packets carry its identity in the VNI.
                    let vni = match sender {
                        Some(ep) if e.kind == IPCACHE_KIND_REMOTE_PODS && ep.identity != 0 => {
                            ep.identity
                        }
                        _ => cfg.vni,
                    };
                    (
                        "overlay_in",
                        cfg.vxlan_ifindex,
                        Some((peer, vni)),
                        ([0; 6], [0; 6]),
                        format!("arrives through the tunnel from node {peer} (VNI {vni})"),
                    )
                }
                _ => (
                    "host_in",
                    cfg.uplink_ifindex,
                    None,
                    ([0x02, 0, 0, 0, 0, 1], [0xff; 6]),
                    format!("arrives on the uplink (ifindex {})", cfg.uplink_ifindex),
                ),
            }
        }
    };
    let packet = build_packet(macs.0, macs.1, src, dst, proto, sport, dport)?;
    let prog = live_program(req.pin_dir, program)?;
    let fd = prog.fd()?;
    let mut explain_map: Array<MapData, ExplainTrace> =
        Array::try_from(maps::open(req.pin_dir, MAP_EXPLAIN)?)?;
    // One dry run at a time per node: the trace has one slot.
    let _lock = crate::sys::lock_exclusive(req.pin_dir)?;
    explain_map.set(0, ExplainTrace::default(), 0)?;
    let out = match crate::sys::prog_test_run(fd.as_fd(), &packet, &dry_ctx(ifindex, tunnel)) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => bail!(
            "the packet enters on ifindex {ifindex}, which is no device in this network namespace: run explain in the node's (--netns)"
        ),
        r => r.with_context(|| format!("running {program} (BPF_PROG_TEST_RUN)"))?,
    };
    let t = explain_map.get(&0, 0)?;
    drop(_lock);

    let names = Names::read(req.pin_dir, req.socket);
    let proto_name = dataplane_common::proto_name(proto);
    let addressed = format!("{dst}:{dport}/{proto_name}");
    let any_node = format!("*:{dport}/{proto_name}");
    let frontend = |id: u32| names.frontend(id, &addressed, &any_node);
    let what = if proto == IPPROTO_ICMP {
        format!("{src} -> {dst} icmp echo")
    } else {
        format!("{src}:{sport} -> {dst}:{dport} {proto_name}")
    };
    let mut steps = Vec::new();
    let mut step = |s: &'static str, d: String| steps.push(Step { step: s, detail: d });
    step(
        "enters",
        format!("{entry}: {program} (program id {})", prog.id()),
    );
    if let Some(ep) = sender {
        let whose = if ep.flags & EP_F_LOCAL != 0 {
            names.endpoint(ep.ifindex)
        } else {
            "a pod of another node".into()
        };
        step(
            "source",
            format!("{src} is {whose}, {}", names.identity(ep.identity)),
        );
    }
    if t.notes & EXPLAIN_CT != 0 {
        let dir = if t.ct_dir == dataplane_common::CT_DIR_ORIG {
            "original"
        } else {
            "reply"
        };
        let mut d = format!("a tracked flow ({dir} direction, {})", ct_flags(t.ct_flags));
        if t.ct_flags & CT_F_SERVICE != 0 {
            d.push_str(&format!(
                ": {} -> {}",
                frontend(t.frontend),
                names
                    .backends
                    .get(&t.backend)
                    .cloned()
                    .unwrap_or_else(|| format!("backend {}", t.backend)),
            ));
        }
        step("conntrack", d);
    } else if t.notes & EXPLAIN_VERDICT != 0 {
        step("conntrack", "no entry: a new flow".into());
    }
    if t.notes & EXPLAIN_SERVICE != 0 {
        step(
            "service",
            format!(
                "{} -> backend {} (chosen now; a dry run creates no conntrack entry)",
                frontend(t.frontend),
                names
                    .backends
                    .get(&t.backend)
                    .cloned()
                    .unwrap_or_else(|| format!("{}", t.backend)),
            ),
        );
    }
    if t.notes & EXPLAIN_REJECT != 0 {
        step(
            "service",
            format!(
                "{} has no backend: refused with ICMP port unreachable",
                frontend(t.frontend),
            ),
        );
    }
    if t.nat_flags & (CT_F_SRC | CT_F_DST) != 0 {
        let mut parts = Vec::new();
        if t.nat_flags & CT_F_DST != 0 {
            parts.push(format!(
                "destination -> {}",
                endpoint(t.nat_dst, t.nat_dport)
            ));
        }
        if t.nat_flags & CT_F_SRC != 0 {
            parts.push(format!("source -> {}", endpoint(t.nat_src, t.nat_sport)));
        }
        let claim = if t.notes & EXPLAIN_PORT_CLAIM != 0 {
            " (a real packet claims a free NAT port; shown with the client's)"
        } else {
            ""
        };
        step("nat", format!("{}{claim}", parts.join(", ")));
    }
    let decision = |p: &ExplainPolicy, toward: &str| {
        format!(
            "of {}, {toward} {}: {}",
            names.endpoint(p.endpoint),
            names.identity(p.peer),
            names.policy(p)
        )
    };
    if t.notes & EXPLAIN_EGRESS != 0 {
        step("egress policy", decision(&t.egress, "to"));
    }
    if t.notes & EXPLAIN_ROUTE != 0 {
        let d = match t.route {
            EXPLAIN_ROUTE_LOCAL => {
                format!("to {}, a pod of this node", names.endpoint(t.route_target))
            }
            EXPLAIN_ROUTE_TUNNEL => format!(
                "encapsulated (VXLAN) to node {}; its own ingress policy is judged there",
                Ipv4Addr::from(t.route_target.to_ne_bytes())
            ),
            EXPLAIN_ROUTE_UPLINK => "out of the uplink, next hop from the kernel's routes".into(),
            EXPLAIN_ROUTE_STACK => "handed to the host stack, which routes it".into(),
            EXPLAIN_ROUTE_HOST => "for this node itself".into(),
            k => format!("route {k}"),
        };
        step("route", d);
    }
    if t.notes & EXPLAIN_INGRESS != 0 {
        step("ingress policy", decision(&t.ingress, "from"));
    }
    let reason = Reason::from_code(t.reason as u8)
        .map_or_else(|| format!("reason {}", t.reason), |r| r.name().to_owned());
    let verdict = match (out.retval as i32, t.reason == Reason::Forwarded as u32) {
        (_, false) if t.notes & EXPLAIN_REJECT != 0 => "answered",
        (2, _) => "dropped",
        (_, true) => "forwarded",
        _ => "answered",
    };
    let action = match out.retval {
        0 => "TC_ACT_OK (to the stack)".to_owned(),
        2 => "TC_ACT_SHOT".to_owned(),
        7 => "TC_ACT_REDIRECT".to_owned(),
        n => format!("action {n}"),
    };
    let why = if reason == "forwarded" {
        String::new()
    } else {
        format!(": {reason}")
    };
    step("verdict", format!("{verdict}{why} ({action})"));
    let leaves_as = (verdict == "forwarded")
        .then(|| etherparse::SlicedPacket::from_ethernet(&out.data).ok())
        .flatten()
        .and_then(|p| match p.net {
            Some(etherparse::InternetSlice::Ipv4(ip)) => {
                let h = ip.header();
                let ports = match p.transport {
                    Some(etherparse::TransportSlice::Tcp(t)) => {
                        Some((t.source_port(), t.destination_port()))
                    }
                    Some(etherparse::TransportSlice::Udp(u)) => {
                        Some((u.source_port(), u.destination_port()))
                    }
                    _ => None,
                };
                Some(match ports {
                    Some((s, d)) => {
                        format!("{}:{s} -> {}:{d}", h.source_addr(), h.destination_addr())
                    }
                    None => format!("{} -> {}", h.source_addr(), h.destination_addr()),
                })
            }
            _ => None,
        });
    // The node the packet goes to next: the tunnel's far end, or (routed by
    // the stack or the FIB) the node that owns its destination.
    let next_node = if verdict != "forwarded" || t.notes & EXPLAIN_ROUTE == 0 {
        None
    } else if t.route == EXPLAIN_ROUTE_TUNNEL {
        Some(Ipv4Addr::from(t.route_target.to_ne_bytes()))
    } else if matches!(t.route, EXPLAIN_ROUTE_STACK | EXPLAIN_ROUTE_UPLINK) {
        let to = if t.nat_flags & CT_F_DST != 0 {
            Ipv4Addr::from(t.nat_dst)
        } else {
            dst
        };
        owner_node(req.pin_dir, to)?
    } else {
        None
    };
    if let Some(n) = next_node
        && t.route != EXPLAIN_ROUTE_TUNNEL
    {
        let at = steps.len().saturating_sub(1);
        steps.insert(
            at,
            Step {
                step: "next node",
                detail: format!(
                    "{n}, which owns the destination; its ingress policy is judged there"
                ),
            },
        );
    }
    Ok(Explained {
        packet: what,
        program: program.to_owned(),
        program_id: prog.id(),
        ifindex,
        steps,
        verdict: verdict.to_owned(),
        reason,
        leaves_as,
        next_node: next_node.map(|n| n.to_string()),
    })
}

/// What the ipcache says `addr` is: its longest matching prefix's entry.
fn ipcache_owner(pin_dir: &Path, addr: Ipv4Addr) -> Result<Option<IpcacheEntry>> {
    let cache = maps::ipcache::IpcacheMap::open(pin_dir)?.entries()?;
    Ok(cache
        .into_iter()
        .filter(|(p, _)| p.0.contains(IpAddr::V4(addr)))
        .max_by_key(|(p, _)| p.0.prefix())
        .map(|(_, e)| e))
}

/// The node `addr` belongs to (a remote pod's or a node's own address), by
/// the ipcache.
fn owner_node(pin_dir: &Path, addr: Ipv4Addr) -> Result<Option<Ipv4Addr>> {
    Ok(ipcache_owner(pin_dir, addr)?
        .filter(|e| e.kind == IPCACHE_KIND_REMOTE_PODS || e.kind == IPCACHE_KIND_REMOTE_HOST)
        .map(|e| {
            let [a, b, c, d, ..] = e.tunnel_endpoint;
            Ipv4Addr::new(a, b, c, d)
        }))
}

/// `dataplane explain`, printed.
pub fn run(req: &Request<'_>, output: Format) -> Result<()> {
    let e = explain(req)?;
    match output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&e)?),
        Format::Table => {
            println!("{}", e.packet);
            for s in &e.steps {
                println!("  {:<15} {}", s.step, s.detail);
            }
            if let Some(l) = &e.leaves_as {
                println!("  {:<15} {l}", "leaves as");
            }
        }
    }
    Ok(())
}
