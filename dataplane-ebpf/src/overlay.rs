//! Programs on the node's VXLAN device (external mode).

use aya_ebpf::{macros::classifier, programs::TcContext};
use dataplane_common::{
    Direction, EXPLAIN_ROUTE_HOST, IDENTITY_FIRST_POD, IDENTITY_MAX, IPCACHE_KIND_REMOTE_HOST,
    IPCACHE_KIND_REMOTE_PODS, Reason,
};

use crate::{
    config,
    deliver::PACKET_HOST,
    encap, events, explain, fwd, icmp, ipcache, l4, parse,
    route::{self, Route},
    svc::{self, Nat},
    verdict::{self, Verdict},
};

/// Decapsulated packets. The tunnel trusts only nodes: the outer source
/// must be a node of the cluster, and the inner source that node or one of
/// its pods. Then only pods of this node and this node itself may be the
/// destination.
#[classifier]
pub fn overlay_in(mut ctx: TcContext) -> i32 {
    let len = ctx.len();
    let mut v = from_overlay(&mut ctx);
    if let Some(err) = v.wants_answer() {
        v = icmp::answer_network(&mut ctx, err);
    }
    verdict::tc_exit(&ctx, Direction::FromNetwork, len, v)
}

#[inline(never)]
fn from_overlay(ctx: &mut TcContext) -> Verdict {
    Verdict::from_result(try_from_overlay(ctx))
}

#[inline(always)]
fn try_from_overlay(ctx: &mut TcContext) -> Result<Verdict, Reason> {
    let cfg = config::get()?;
    // A dry run says which node sent it and with which VNI.
    let (peer, vni) = if explain::is_dry(ctx) {
        explain::tunnel_key(ctx)
    } else {
        encap::get_key(ctx)?
    };
    // The configured VNI, or a pod's security identity (a pod of the
    // sending node, see below).
    let pod_vni = (IDENTITY_FIRST_POD..=IDENTITY_MAX).contains(&vni);
    if vni != cfg.vni && !pod_vni {
        return Err(Reason::TunnelVniMismatch);
    }
    match ipcache::lookup_v4(peer) {
        Some(e) if e.kind == IPCACHE_KIND_REMOTE_HOST => {}
        _ => return Err(Reason::TunnelPeerUnknown),
    }
    if parse::ethertype(ctx) != Some(parse::ETH_P_IP) {
        return Err(Reason::UnsupportedL3);
    }
    let ip = parse::ipv4(ctx)?;
    match ipcache::lookup_v4(ip.saddr) {
        Some(e)
            if (e.kind == IPCACHE_KIND_REMOTE_PODS
                || (e.kind == IPCACHE_KIND_REMOTE_HOST && vni == cfg.vni))
                && e.tunnel_endpoint[..4] == peer => {}
        _ => return Err(Reason::TunnelSourceMismatch),
    }
    // A node that says who sent the packet is believed (it is a node);
    // otherwise the address tells.
    let peer_id = if vni == cfg.vni { 0 } else { vni };
    // Replies of flows this node translated come back here.
    let mut flow = l4::flow(ctx, &ip)?;
    let mut n = Nat::none();
    let code = svc::replies(&flow, ctx.len(), &mut n);
    svc::explain_nat(&flow, code, &n);
    match route::v4(n.daddr(&flow))? {
        Route::Local(ep) => {
            flow.src_identity = peer_id;
            Ok(fwd::local(ctx, &ip, &mut flow, &n, ep))
        }
        // A pod of another node talking to this node. Its frame still
        // carries the MACs of the sending pod's veth: without PACKET_HOST the
        // stack would take it for someone else's and drop it silently.
        Route::Host => {
            events::route_taken(&flow, EXPLAIN_ROUTE_HOST, 0, &n);
            svc::apply(ctx, &mut flow, &n)?;
            ctx.change_type(PACKET_HOST)
                .map_err(|_| Reason::HelperFailed)?;
            Ok(Verdict::pass())
        }
        // A NodePort reply, back to the client: outside, or (VXLAN mode)
        // another node.
        Route::Stack if n.translates() => Ok(fwd::uplink(ctx, &ip, &mut flow, &n)),
        Route::Tunnel(node, _) if n.translates() => Ok(fwd::tunnel(ctx, &ip, &mut flow, &n, node)),
        _ => Err(Reason::UnknownDestination),
    }
}

/// Packets the host stack routes into the VXLAN device (node to remote pod),
/// and packets `lxc_from_ctr` redirected here: the tunnel key names the
/// node that owns the destination.
#[classifier]
pub fn overlay_out(ctx: TcContext) -> i32 {
    let v = Verdict::from_result(to_overlay(&ctx));
    verdict::tc_exit(&ctx, Direction::ToNetwork, ctx.len(), v)
}

#[inline(always)]
fn to_overlay(ctx: &TcContext) -> Result<Verdict, Reason> {
    if parse::ethertype(ctx) != Some(parse::ETH_P_IP) {
        return Err(Reason::UnsupportedL3);
    }
    let cfg = config::get()?;
    match ipcache::lookup_v4(parse::ipv4_daddr(ctx)?) {
        Some(node)
            if node.kind == IPCACHE_KIND_REMOTE_PODS || node.kind == IPCACHE_KIND_REMOTE_HOST =>
        {
            encap::set_key(ctx, node, cfg.vni)?;
            Ok(Verdict::pass())
        }
        _ => Err(Reason::UnknownDestination),
    }
}
