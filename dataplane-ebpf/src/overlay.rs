//! Programs on the node's VXLAN device (external mode).

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use dataplane_common::{Direction, IPCACHE_KIND_REMOTE_PODS, Reason};

use crate::{
    config, deliver, drop, encap, ipcache, parse,
    route::{self, Route},
};

/// Decapsulated packets: only pods of this node may be their destination.
#[classifier]
pub fn overlay_in(mut ctx: TcContext) -> i32 {
    let len = ctx.len();
    let verdict = from_overlay(&mut ctx);
    drop::exit(&ctx, Direction::FromNetwork, len, verdict)
}

#[inline(always)]
fn from_overlay(ctx: &mut TcContext) -> Result<i32, Reason> {
    if parse::ethertype(ctx) != Some(parse::ETH_P_IP) {
        return Err(Reason::UnsupportedL3);
    }
    match route::v4(parse::ipv4_daddr(ctx)?)? {
        Route::Local(ep) => deliver::to_local(ctx, ep),
        _ => Err(Reason::UnknownDestination),
    }
}

/// Packets the host stack routes into the VXLAN device (node to remote pod),
/// and packets `lxc_from_ctr` redirected here: the tunnel key names the
/// node that owns the destination.
#[classifier]
pub fn overlay_out(ctx: TcContext) -> i32 {
    let verdict = to_overlay(&ctx).map(|()| TC_ACT_OK);
    drop::exit(&ctx, Direction::ToNetwork, ctx.len(), verdict)
}

#[inline(always)]
fn to_overlay(ctx: &TcContext) -> Result<(), Reason> {
    if parse::ethertype(ctx) != Some(parse::ETH_P_IP) {
        return Err(Reason::UnsupportedL3);
    }
    let cfg = config::get()?;
    match ipcache::lookup_v4(parse::ipv4_daddr(ctx)?) {
        Some(node) if node.kind == IPCACHE_KIND_REMOTE_PODS => encap::set_key(ctx, node, cfg.vni),
        _ => Err(Reason::UnknownDestination),
    }
}
