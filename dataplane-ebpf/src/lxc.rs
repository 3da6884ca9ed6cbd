//! Programs on a pod's host-side veth: tc ingress sees what the pod sends
//! (`lxc_from_ctr`), tc egress what is delivered to it (`lxc_to_ctr`).

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use dataplane_common::{Direction, EndpointKey, Reason};

use crate::{drop::drop_packet, endpoints, metrics, parse};

#[classifier]
pub fn lxc_from_ctr(ctx: TcContext) -> i32 {
    match from_ctr(&ctx) {
        Ok(()) => forward(&ctx, Direction::FromEndpoint),
        Err(reason) => drop_packet(&ctx, Direction::FromEndpoint, reason),
    }
}

#[classifier]
pub fn lxc_to_ctr(ctx: TcContext) -> i32 {
    if let Some(parse::ETH_P_IP | parse::ETH_P_IPV6) = parse::ethertype(&ctx) {
        metrics::count_endpoint(&ctx, ifindex(&ctx), Direction::ToEndpoint, ctx.len());
    }
    forward(&ctx, Direction::ToEndpoint)
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[inline(always)]
fn forward(ctx: &TcContext, direction: Direction) -> i32 {
    metrics::count_verdict(direction, Reason::Forwarded, ctx.len());
    TC_ACT_OK
}

/// What a pod sends: IPv4 must carry an address the agent assigned to this
/// very endpoint. Endpoint counters cover IP traffic only: ARP and other
/// link-local frames would make them disagree with what applications sent.
#[inline(always)]
fn from_ctr(ctx: &TcContext) -> Result<(), Reason> {
    let ifindex = ifindex(ctx);
    match parse::ethertype(ctx) {
        Some(parse::ETH_P_IP) => {
            let saddr = parse::ipv4_saddr(ctx).ok_or(Reason::Malformed)?;
            match endpoints::lookup(&EndpointKey::v4(saddr)) {
                Some(ep) if ep.ifindex == ifindex => {}
                _ => return Err(Reason::SourceSpoofed),
            }
        }
        // Source validation for IPv6 comes with IPv6 support: link-local
        // neighbour discovery needs its own rule.
        Some(parse::ETH_P_IPV6) => {}
        Some(_) => return Ok(()),
        None => return Err(Reason::Malformed),
    }
    metrics::count_endpoint(ctx, ifindex, Direction::FromEndpoint, ctx.len());
    Ok(())
}
