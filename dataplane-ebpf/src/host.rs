//! Programs on the node's uplink: XDP first (counts, for now), then tc
//! ingress.

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use dataplane_common::{Direction, Hook, IPCACHE_KIND_LOCAL_PODS, Reason};

use crate::{
    deliver, icmp, ipcache, metrics, parse,
    route::{self, Route},
    verdict::{self, Verdict},
};

/// Everything that arrives on the uplink, before the stack allocates an
/// skb: counted by verdict. Passes all of it on to tc for now; NodePort and
/// the prefilter will act here.
#[xdp]
pub fn host_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u32;
    metrics::count_verdict(
        Hook::Xdp,
        Direction::FromNetwork,
        Reason::Forwarded as u32,
        len,
    );
    XDP_PASS
}

/// Pods of this node get their packets straight from the uplink (native
/// routing); addresses in this node's pod CIDR that no pod has are dropped;
/// everything else (node traffic, VXLAN) goes to the host stack.
#[classifier]
pub fn host_in(mut ctx: TcContext) -> i32 {
    let len = ctx.len();
    let mut v = from_network(&mut ctx);
    if let Some(err) = v.wants_answer() {
        v = icmp::answer_network(&mut ctx, err);
    }
    verdict::tc_exit(&ctx, Direction::FromNetwork, len, v)
}

#[inline(never)]
fn from_network(ctx: &mut TcContext) -> Verdict {
    Verdict::from_result(try_from_network(ctx))
}

#[inline(always)]
fn try_from_network(ctx: &mut TcContext) -> Result<Verdict, Reason> {
    if parse::ethertype(ctx) != Some(parse::ETH_P_IP) {
        return Ok(Verdict::pass());
    }
    let dst = parse::ipv4_daddr(ctx)?;
    match route::v4(dst)? {
        Route::Local(ep) => {
            if parse::ipv4_dec_ttl(ctx).is_err() {
                return Ok(icmp::Error::time_exceeded().verdict());
            }
            Ok(deliver::to_local(ctx, ep))
        }
        _ => match ipcache::lookup_v4(dst) {
            Some(e) if e.kind == IPCACHE_KIND_LOCAL_PODS => Err(Reason::UnknownDestination),
            _ => Ok(Verdict::pass()),
        },
    }
}
