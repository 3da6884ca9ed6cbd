//! Sending a packet on once its route and rewrite are known: the checks a
//! router makes (TTL, and the tunnel's MTU) look at the packet as it came,
//! so an ICMP error quotes what the sender sent; then the rewrite, then the
//! hop.

use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::bpf_redirect_neigh, programs::TcContext};
use dataplane_common::{
    EXPLAIN_ROUTE_LOCAL, EXPLAIN_ROUTE_TUNNEL, EXPLAIN_ROUTE_UPLINK, EndpointInfo,
    IPCACHE_KIND_REMOTE_PODS, IpcacheEntry, Reason,
};

use crate::{
    config, deliver, encap, events, icmp,
    l4::Flow,
    parse::{self, IP_DF, Ipv4Hdr},
    policy,
    svc::{self, Nat},
    verdict::Verdict,
};

/// A packet's state, kept in the entry point's frame while the steps run.
pub struct Pkt {
    pub ip: Ipv4Hdr,
    pub flow: Flow,
    pub nat: Nat,
    /// This node's address (wire bytes).
    pub node: u32,
}

impl Pkt {
    #[inline(always)]
    pub fn new() -> Self {
        Pkt {
            ip: Ipv4Hdr {
                version_ihl: 0,
                tos: 0,
                tot_len: [0; 2],
                id: [0; 2],
                frag_off: [0; 2],
                ttl: 0,
                protocol: 0,
                check: [0; 2],
                saddr: [0; 4],
                daddr: [0; 4],
            },
            flow: Flow {
                saddr: 0,
                daddr: 0,
                sport: 0,
                dport: 0,
                proto: 0,
                tcp_flags: 0,
                frag: 0,
                has_ports: false,
                l4_off: 0,
                dry: false,
                trace: false,
                src_identity: 0,
            },
            nat: Nat::none(),
            node: 0,
        }
    }
}

/// To a pod on this node: one hop, if the pod's ingress policy admits the
/// packet (from `flow.src_identity`, or as its source address says).
#[inline(never)]
pub fn local(
    ctx: &mut TcContext,
    ip: &Ipv4Hdr,
    flow: &mut Flow,
    n: &Nat,
    ep: &EndpointInfo,
) -> Verdict {
    Verdict::from_result(try_local(ctx, ip, flow, n, ep))
}

#[inline(always)]
fn try_local(
    ctx: &mut TcContext,
    ip: &Ipv4Hdr,
    flow: &mut Flow,
    n: &Nat,
    ep: &EndpointInfo,
) -> Result<Verdict, Reason> {
    events::route_taken(flow, EXPLAIN_ROUTE_LOCAL, ep.ifindex, n);
    if ip.ttl <= 1 {
        return Ok(icmp::Error::time_exceeded().verdict());
    }
    // The sender as it sent the packet (before a rewrite).
    let peer_id = if flow.src_identity != 0 {
        flow.src_identity
    } else {
        policy::identity_of(flow.saddr)
    };
    svc::apply(ctx, flow, n)?;
    // Judged as delivered: after translation, against the backend.
    policy::ingress(ep.ifindex, ep.identity, flow, peer_id)?;
    parse::ipv4_dec_ttl(ctx)?;
    Ok(deliver::to_local(ctx, ep))
}

/// Into the tunnel toward `node`: one hop, within the tunnel's MTU. A
/// pod's packet carries the pod's identity (`flow.src_identity`) in the
/// VNI.
#[inline(never)]
pub fn tunnel(
    ctx: &mut TcContext,
    ip: &Ipv4Hdr,
    flow: &mut Flow,
    n: &Nat,
    node: &IpcacheEntry,
) -> Verdict {
    Verdict::from_result(try_tunnel(ctx, ip, flow, n, node))
}

#[inline(always)]
fn try_tunnel(
    ctx: &mut TcContext,
    ip: &Ipv4Hdr,
    flow: &mut Flow,
    n: &Nat,
    node: &IpcacheEntry,
) -> Result<Verdict, Reason> {
    let identity = flow.src_identity;
    let [a, b, c, d, ..] = node.tunnel_endpoint;
    events::route_taken(
        flow,
        EXPLAIN_ROUTE_TUNNEL,
        u32::from_ne_bytes([a, b, c, d]),
        n,
    );
    let cfg = config::get()?;
    if let Err(mtu) = encap::fits(ctx, cfg) {
        if ip.frag_off() & IP_DF != 0 {
            return Ok(icmp::Error::frag_needed(mtu).verdict());
        }
        // Too big but fragmentable, and nothing to rewrite: the stack
        // fragments it and routes it into the tunnel device (other nodes'
        // pods only: it would send a node's own address out of the uplink).
        if node.kind == IPCACHE_KIND_REMOTE_PODS && !n.translates() {
            return Ok(Verdict::pass());
        }
        return Err(Reason::FragNeeded);
    }
    if ip.ttl <= 1 {
        return Ok(icmp::Error::time_exceeded().verdict());
    }
    svc::apply(ctx, flow, n)?;
    parse::ipv4_dec_ttl(ctx)?;
    encap::redirect(ctx, node, cfg, identity)
}

/// Out of the uplink, next hop from the kernel's FIB: for rewritten
/// packets the host stack must not see (their source may be this node's
/// own address).
#[inline(never)]
pub fn uplink(ctx: &mut TcContext, ip: &Ipv4Hdr, flow: &mut Flow, n: &Nat) -> Verdict {
    Verdict::from_result(try_uplink(ctx, ip, flow, n))
}

#[inline(always)]
fn try_uplink(
    ctx: &mut TcContext,
    ip: &Ipv4Hdr,
    flow: &mut Flow,
    n: &Nat,
) -> Result<Verdict, Reason> {
    let cfg = config::get()?;
    events::route_taken(flow, EXPLAIN_ROUTE_UPLINK, 0, n);
    if ip.ttl <= 1 {
        return Ok(icmp::Error::time_exceeded().verdict());
    }
    svc::apply(ctx, flow, n)?;
    parse::ipv4_dec_ttl(ctx)?;
    // SAFETY: plain helper call; no parameters: FIB lookup, then neighbour.
    let action = unsafe { bpf_redirect_neigh(cfg.uplink_ifindex, core::ptr::null_mut(), 0, 0) };
    if action == i64::from(TC_ACT_REDIRECT) {
        Ok(Verdict::redirect())
    } else {
        Err(Reason::HelperFailed)
    }
}
