//! Programs on a pod's host-side veth: tc ingress sees what the pod sends
//! (`lxc_from_ctr`), tc egress what the host stack delivers to it
//! (`lxc_to_ctr`; packets redirected between pods skip that hook and are
//! counted by the sender's program instead).

use aya_ebpf::{macros::classifier, programs::TcContext};
use dataplane_common::{Direction, EXPLAIN_ROUTE_HOST, EXPLAIN_ROUTE_STACK, EndpointKey, Reason};

use crate::{
    arp, endpoints, events, fwd, icmp, l4, metrics, parse, policy,
    route::{self, Route},
    svc::{self, Nat},
    verdict::{self, Verdict},
};

#[classifier]
pub fn lxc_from_ctr(mut ctx: TcContext) -> i32 {
    let len = ctx.len();
    let mut v = from_ctr(&mut ctx);
    if let Some(err) = v.wants_answer() {
        let ifindex = ifindex(&ctx);
        v = icmp::answer_pod(&mut ctx, ifindex, err, 0);
    }
    verdict::tc_exit(&ctx, Direction::FromEndpoint, len, v)
}

#[classifier]
pub fn lxc_to_ctr(mut ctx: TcContext) -> i32 {
    let len = ctx.len();
    let v = to_ctr(&mut ctx);
    verdict::tc_exit(&ctx, Direction::ToEndpoint, len, v)
}

/// What the host stack delivers to a pod. Replies from a Service backend
/// in the node's own network (a host-network endpoint) are translated back
/// here.
#[inline(never)]
fn to_ctr(ctx: &mut TcContext) -> Verdict {
    let counted = match parse::ethertype(ctx) {
        Some(parse::ETH_P_IP) => true,
        Some(parse::ETH_P_IPV6) => !ipv6_link_local(ctx),
        _ => false,
    };
    if counted {
        metrics::count_endpoint(ctx, ifindex(ctx), Direction::ToEndpoint, ctx.len());
    }
    if parse::ethertype(ctx) != Some(parse::ETH_P_IP) {
        return Verdict::pass();
    }
    Verdict::from_result(host_replies(ctx))
}

#[inline(always)]
fn host_replies(ctx: &mut TcContext) -> Result<Verdict, Reason> {
    let ip = parse::ipv4(ctx)?;
    let mut flow = l4::flow(ctx, &ip)?;
    let mut n = Nat::none();
    if svc::replies(&flow, ctx.len(), &mut n) == svc::NAT {
        svc::apply(ctx, &mut flow, &n)?;
    }
    // What the stack delivers: from this node (always allowed), or routed
    // through it.
    policy::ingress(ifindex(ctx), 0, &flow, policy::identity_of(flow.saddr))?;
    Ok(Verdict::pass())
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// What a pod sends, by L3 protocol. Endpoint counters cover IP traffic
/// only: ARP and link-local IPv6 (neighbour discovery, router
/// solicitations) would make them disagree with what applications sent.
/// Inlined: a frame of its own would count against the 512 bytes the
/// deepest call chain (through a new Service flow) may use.
#[inline(always)]
fn from_ctr(ctx: &mut TcContext) -> Verdict {
    let ifindex = ifindex(ctx);
    match parse::ethertype(ctx) {
        Some(parse::ETH_P_IP) => from_ctr_v4_verdict(ctx, ifindex),
        Some(parse::ETH_P_ARP) => arp::from_pod(ctx, ifindex),
        Some(parse::ETH_P_IPV6) => from_ctr_v6_verdict(ctx, ifindex),
        Some(_) => Verdict::drop(Reason::UnsupportedL3),
        None => Verdict::drop(Reason::Malformed),
    }
}

#[inline(never)]
fn from_ctr_v4_verdict(ctx: &mut TcContext, ifindex: u32) -> Verdict {
    Verdict::from_result(from_ctr_v4(ctx, ifindex))
}

/// IPv4 must carry an address the agent assigned to this very endpoint.
/// Then Services and known flows are translated ([`svc::from_endpoint`]),
/// and the packet goes where [`route::v4`] says for its (new) destination.
/// Where the datapath forwards itself it is a router hop: TTL, and the
/// tunnel's MTU, answered with ICMP errors.
#[inline(always)]
fn from_ctr_v4(ctx: &mut TcContext, ifindex: u32) -> Result<Verdict, Reason> {
    let ip = parse::ipv4(ctx)?;
    let identity = match endpoints::lookup(&EndpointKey::v4(ip.saddr)) {
        Some(ep) if ep.ifindex == ifindex => ep.identity,
        _ => return Err(Reason::SourceSpoofed),
    };
    let mut flow = l4::flow(ctx, &ip)?;
    flow.src_identity = identity;
    let len = ctx.len();
    let mut n = Nat::none();
    let code = svc::from_endpoint(&flow, len, &mut n);
    svc::explain_nat(&flow, code, &n);
    match code & 0xff {
        svc::REJECT => {
            if !flow.dry {
                metrics::count_endpoint(ctx, ifindex, Direction::FromEndpoint, len);
            }
            return Ok(icmp::Error::port_unreachable().verdict());
        }
        svc::DROP => return Err(svc::dropped_reason(code)),
        _ => {}
    }
    let (daddr, dport) = n.destination(&flow);
    policy::egress(ifindex, &flow, daddr, dport)?;
    let route = route::v4(daddr.to_ne_bytes())?;
    if !flow.dry {
        metrics::count_endpoint(ctx, ifindex, Direction::FromEndpoint, len);
    }
    match route {
        Route::Host => {
            events::route_taken(&flow, EXPLAIN_ROUTE_HOST, 0, &n);
            svc::apply(ctx, &mut flow, &n)?;
            Ok(Verdict::pass())
        }
        // The stack routes (and answers TTL and MTU itself), unless the
        // packet was rewritten: a reply from a Service may now come from
        // this node's own address, which the stack would refuse.
        Route::Stack if !n.translates() => {
            events::route_taken(&flow, EXPLAIN_ROUTE_STACK, 0, &n);
            Ok(Verdict::pass())
        }
        Route::Stack => Ok(fwd::uplink(ctx, &ip, &mut flow, &n)),
        Route::Local(ep) => Ok(fwd::local(ctx, &ip, &mut flow, &n, ep)),
        Route::Tunnel(node, _) => Ok(fwd::tunnel(ctx, &ip, &mut flow, &n, node)),
    }
}

/// Link-local IPv6 (neighbour discovery, router solicitation, MLD) stays
/// between the pod and its veth: passed, not a drop because a node has
/// IPv6 on. Anything else must come from an address this endpoint owns,
/// and is then refused as not routed yet.
#[inline(never)]
fn from_ctr_v6_verdict(ctx: &mut TcContext, ifindex: u32) -> Verdict {
    Verdict::from_result(from_ctr_v6(ctx, ifindex))
}

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
