//! Programs on a pod's host-side veth: tc ingress sees what the pod sends
//! (`lxc_from_ctr`), tc egress what the host stack delivers to it
//! (`lxc_to_ctr`; packets redirected between pods skip that hook and are
//! counted by the sender's program instead).

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use dataplane_common::{Direction, EndpointKey, Reason};

use crate::{
    deliver, drop, encap, endpoints, metrics, parse,
    route::{self, Route},
};

#[classifier]
pub fn lxc_from_ctr(mut ctx: TcContext) -> i32 {
    let len = ctx.len();
    let verdict = from_ctr(&mut ctx);
    drop::exit(&ctx, Direction::FromEndpoint, len, verdict)
}

#[classifier]
pub fn lxc_to_ctr(ctx: TcContext) -> i32 {
    if let Some(parse::ETH_P_IP | parse::ETH_P_IPV6) = parse::ethertype(&ctx) {
        metrics::count_endpoint(&ctx, ifindex(&ctx), Direction::ToEndpoint, ctx.len());
    }
    drop::exit(&ctx, Direction::ToEndpoint, ctx.len(), Ok(TC_ACT_OK))
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// What a pod sends: IPv4 must carry an address the agent assigned to this
/// very endpoint, then goes where [`route::v4`] says. Endpoint counters
/// cover IP traffic only: ARP and other link-local frames would make them
/// disagree with what applications sent.
#[inline(always)]
fn from_ctr(ctx: &mut TcContext) -> Result<i32, Reason> {
    let ifindex = ifindex(ctx);
    match parse::ethertype(ctx) {
        Some(parse::ETH_P_IP) => {}
        // IPv6 routing comes with IPv6 support: until then the host decides.
        Some(parse::ETH_P_IPV6) => {
            metrics::count_endpoint(ctx, ifindex, Direction::FromEndpoint, ctx.len());
            return Ok(TC_ACT_OK);
        }
        Some(_) => return Ok(TC_ACT_OK),
        None => return Err(Reason::Malformed),
    }
    let saddr = parse::ipv4_saddr(ctx)?;
    match endpoints::lookup(&EndpointKey::v4(saddr)) {
        Some(ep) if ep.ifindex == ifindex => {}
        _ => return Err(Reason::SourceSpoofed),
    }
    let route = route::v4(parse::ipv4_daddr(ctx)?)?;
    metrics::count_endpoint(ctx, ifindex, Direction::FromEndpoint, ctx.len());
    match route {
        Route::Local(ep) => deliver::to_local(ctx, ep),
        Route::Tunnel(node, cfg) => {
            parse::ipv4_dec_ttl(ctx)?;
            encap::redirect(ctx, node, cfg)
        }
        Route::Stack => Ok(TC_ACT_OK),
    }
}
