//! Programs on a pod's host-side veth: tc ingress sees what the pod sends
//! (`lxc_from_ctr`), tc egress what the host stack delivers to it
//! (`lxc_to_ctr`; packets redirected between pods skip that hook and are
//! counted by the sender's program instead).

use aya_ebpf::{macros::classifier, programs::TcContext};
use dataplane_common::{Direction, EndpointKey, Reason};

use crate::{
    arp, deliver, encap, endpoints, icmp, metrics,
    parse::{self, IP_DF},
    route::{self, Route},
    verdict::{self, Verdict},
};

#[classifier]
pub fn lxc_from_ctr(mut ctx: TcContext) -> i32 {
    let len = ctx.len();
    let mut v = from_ctr(&mut ctx);
    if let Some(err) = v.wants_answer() {
        let ifindex = ifindex(&ctx);
        v = icmp::answer_pod(&mut ctx, ifindex, err);
    }
    verdict::tc_exit(&ctx, Direction::FromEndpoint, len, v)
}

#[classifier]
pub fn lxc_to_ctr(ctx: TcContext) -> i32 {
    let counted = match parse::ethertype(&ctx) {
        Some(parse::ETH_P_IP) => true,
        Some(parse::ETH_P_IPV6) => !ipv6_link_local(&ctx),
        _ => false,
    };
    if counted {
        metrics::count_endpoint(&ctx, ifindex(&ctx), Direction::ToEndpoint, ctx.len());
    }
    verdict::tc_exit(&ctx, Direction::ToEndpoint, ctx.len(), Verdict::pass())
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// What a pod sends, by L3 protocol. Endpoint counters cover IP traffic
/// only: ARP and link-local IPv6 (neighbour discovery, router
/// solicitations) would make them disagree with what applications sent.
#[inline(never)]
fn from_ctr(ctx: &mut TcContext) -> Verdict {
    let ifindex = ifindex(ctx);
    match parse::ethertype(ctx) {
        Some(parse::ETH_P_IP) => Verdict::from_result(from_ctr_v4(ctx, ifindex)),
        Some(parse::ETH_P_ARP) => arp::from_pod(ctx, ifindex),
        Some(parse::ETH_P_IPV6) => Verdict::from_result(from_ctr_v6(ctx, ifindex)),
        Some(_) => Verdict::drop(Reason::UnsupportedL3),
        None => Verdict::drop(Reason::Malformed),
    }
}

/// IPv4 must carry an address the agent assigned to this very endpoint,
/// then goes where [`route::v4`] says. Where the datapath forwards itself it
/// is a router hop: TTL, and the tunnel's MTU, answered with ICMP errors.
#[inline(always)]
fn from_ctr_v4(ctx: &mut TcContext, ifindex: u32) -> Result<Verdict, Reason> {
    let ip = parse::ipv4(ctx)?;
    match endpoints::lookup(&EndpointKey::v4(ip.saddr)) {
        Some(ep) if ep.ifindex == ifindex => {}
        _ => return Err(Reason::SourceSpoofed),
    }
    let route = route::v4(ip.daddr)?;
    metrics::count_endpoint(ctx, ifindex, Direction::FromEndpoint, ctx.len());
    match route {
        // The stack routes (and answers TTL and MTU itself).
        Route::Stack => Ok(Verdict::pass()),
        Route::Local(ep) => {
            if parse::ipv4_dec_ttl(ctx).is_err() {
                return Ok(icmp::Error::time_exceeded().verdict());
            }
            Ok(deliver::to_local(ctx, ep))
        }
        Route::Tunnel(node, cfg) => {
            if let Err(mtu) = encap::fits(ctx, cfg) {
                if ip.frag_off() & IP_DF != 0 {
                    return Ok(icmp::Error::frag_needed(mtu).verdict());
                }
                // Too big but fragmentable: the stack fragments and routes
                // it into the tunnel device (other nodes' pods only: it
                // would send a node's own address out of the uplink).
                if node.kind == dataplane_common::IPCACHE_KIND_REMOTE_PODS {
                    return Ok(Verdict::pass());
                }
                return Err(Reason::FragNeeded);
            }
            if parse::ipv4_dec_ttl(ctx).is_err() {
                return Ok(icmp::Error::time_exceeded().verdict());
            }
            encap::redirect(ctx, node, cfg)
        }
    }
}

/// Link-local IPv6 (neighbour discovery, router solicitation, MLD) stays
/// between the pod and its veth: passed, not a drop because a node has
/// IPv6 on. Anything else must come from an address this endpoint owns,
/// and is then refused as not routed yet.
#[inline(always)]
fn from_ctr_v6(ctx: &mut TcContext, ifindex: u32) -> Result<Verdict, Reason> {
    if ipv6_link_local(ctx) {
        return Ok(Verdict::pass());
    }
    let (src, _) = parse::ipv6_addrs(ctx)?;
    match endpoints::lookup(&EndpointKey::v6(src)) {
        Some(ep) if ep.ifindex == ifindex => Err(Reason::Ipv6Unsupported),
        _ => Err(Reason::SourceSpoofed),
    }
}

/// Source link-local or unspecified (DAD), destination link-local or
/// link-scope multicast.
#[inline(always)]
fn ipv6_link_local(ctx: &TcContext) -> bool {
    let Ok((src, dst)) = parse::ipv6_addrs(ctx) else {
        return false;
    };
    let src_ok = (src[0] == 0xfe && src[1] & 0xc0 == 0x80) || src == [0; 16];
    let dst_ok =
        (dst[0] == 0xfe && dst[1] & 0xc0 == 0x80) || (dst[0] == 0xff && dst[1] & 0x0f == 2);
    src_ok && dst_ok
}
