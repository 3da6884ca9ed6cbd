//! Program on the node's uplink (tc ingress).

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use dataplane_common::{Direction, IPCACHE_KIND_LOCAL_PODS, Reason};

use crate::{
    deliver, drop, ipcache, parse,
    route::{self, Route},
};

/// Pods of this node get their packets straight from the uplink (native
/// routing); addresses in this node's pod CIDR that no pod has are dropped;
/// everything else (node traffic, VXLAN) goes to the host stack.
#[classifier]
pub fn host_in(mut ctx: TcContext) -> i32 {
    let len = ctx.len();
    let verdict = from_network(&mut ctx);
    drop::exit(&ctx, Direction::FromNetwork, len, verdict)
}

#[inline(always)]
fn from_network(ctx: &mut TcContext) -> Result<i32, Reason> {
    if parse::ethertype(ctx) != Some(parse::ETH_P_IP) {
        return Ok(TC_ACT_OK);
    }
    let dst = parse::ipv4_daddr(ctx)?;
    match route::v4(dst) {
        Ok(Route::Local(ep)) => deliver::to_local(ctx, ep),
        Err(reason) => Err(reason),
        Ok(_) => match ipcache::lookup_v4(dst) {
            Some(e) if e.kind == IPCACHE_KIND_LOCAL_PODS => Err(Reason::UnknownDestination),
            _ => Ok(TC_ACT_OK),
        },
    }
}
