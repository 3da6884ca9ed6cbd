//! Programs on the node's uplink: XDP first (the prefilter), then tc
//! ingress (Services from outside, replies, native delivery) and tc egress
//! (masquerade).

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use dataplane_common::{
    DP_F_MASQUERADE, Direction, EP_F_LOCAL, EXPLAIN_ROUTE_HOST, EXPLAIN_ROUTE_STACK, EndpointKey,
    Hook, Reason,
};

use crate::{
    config, endpoints, events,
    fwd::{self, Pkt},
    icmp, ipcache, l4, metrics, parse, prefilter,
    route::{self, Route},
    svc::{self, Nat},
    verdict::{self, Verdict},
    xdp_lb,
};

/// Everything that arrives on the uplink, before the stack allocates an
/// skb: what the prefilter denies is dropped here; NodePort, LoadBalancer
/// and external-IP flows from clients outside the cluster that leave the
/// node again (to a backend on another node) are translated and sent back
/// out (`XDP_TX`, counted as forwarded to-network); the rest is passed on
/// to tc untouched (counted as forwarded from-network).
#[xdp]
pub fn host_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let mut p = Pkt::new();
    let mut action = xdp_lb::parse(&ctx, &mut p, len);
    let mut v = Verdict::new(XDP_PASS as i32, Reason::Forwarded);
    if action == XDP_DROP {
        v = Verdict::new(XDP_DROP as i32, Reason::PrefilterDenied);
    } else if action == xdp_lb::CONTINUE {
        if svc::from_network_xdp(&p.flow, p.node, len, &mut p.nat) & 0xff == svc::NAT {
            v = xdp_lb::forward(&ctx, &p, len);
        }
    }
    action = v.action() as u32;
    let direction = if action == XDP_TX {
        Direction::ToNetwork
    } else {
        Direction::FromNetwork
    };
    metrics::count_verdict(Hook::Xdp, direction, v.reason_code(), len);
    action
}

/// Traffic from outside: Services reached on this node (NodePort,
/// LoadBalancer, external IPs), replies of flows this node translated or
/// masqueraded, and (native routing) packets for this node's pods. The
/// rest (node traffic, VXLAN) goes to the host stack.
///
/// Parsing, the Service/NAT decision and forwarding are called one after
/// the other from here, with the packet's state in this frame: nested, their
/// stack frames would not fit the 512 bytes BPF allows.
#[classifier]
pub fn host_in(mut ctx: TcContext) -> i32 {
    let len = ctx.len();
    let mut p = Pkt::new();
    let mut v = parse_in(&mut ctx, &mut p);
    if v.continues() {
        let code = svc::from_network(&p.flow, p.node, len, &mut p.nat);
        svc::explain_nat(&p.flow, code, &p.nat);
        v = forward_in(&mut ctx, &mut p, code);
    }
    if let Some(err) = v.wants_answer() {
        v = icmp::answer_network(&mut ctx, err);
    }
    verdict::tc_exit(&ctx, Direction::FromNetwork, len, v)
}

#[inline(never)]
fn parse_in(ctx: &mut TcContext, p: &mut Pkt) -> Verdict {
    match try_parse_in(ctx, p) {
        Ok(true) => Verdict::cont(),
        Ok(false) => Verdict::pass(),
        Err(r) => Verdict::drop(r),
    }
}

/// False: not IPv4, for the stack.
#[inline(always)]
fn try_parse_in(ctx: &mut TcContext, p: &mut Pkt) -> Result<bool, Reason> {
    if parse::ethertype(ctx) != Some(parse::ETH_P_IP) {
        return Ok(false);
    }
    p.ip = parse::ipv4(ctx)?;
    // Only when XDP is off does a denied packet get this far.
    if prefilter::denied(p.ip.saddr) {
        return Err(Reason::PrefilterDenied);
    }
    p.node = u32::from_ne_bytes(config::get()?.node_ipv4);
    p.flow = l4::flow(ctx, &p.ip)?;
    Ok(true)
}

#[inline(never)]
fn forward_in(ctx: &mut TcContext, p: &mut Pkt, code: u32) -> Verdict {
    Verdict::from_result(try_forward_in(ctx, p, code))
}

#[inline(always)]
fn try_forward_in(ctx: &mut TcContext, p: &mut Pkt, code: u32) -> Result<Verdict, Reason> {
    match code & 0xff {
        svc::REJECT => return Ok(icmp::Error::port_unreachable().verdict()),
        svc::DROP => return Err(svc::dropped_reason(code)),
        _ => {}
    }
    let Pkt {
        ip, flow, nat: n, ..
    } = p;
    match route::v4(n.daddr(flow))? {
        Route::Local(ep) => Ok(fwd::local(ctx, ip, flow, n, ep)),
        Route::Host => {
            events::route_taken(flow, EXPLAIN_ROUTE_HOST, 0, n);
            svc::apply(ctx, flow, n)?;
            Ok(Verdict::pass())
        }
        // Not for us to forward: the stack routes it (VXLAN traffic too).
        Route::Stack | Route::Tunnel(..) if !n.translates() => {
            events::route_taken(flow, EXPLAIN_ROUTE_STACK, 0, n);
            Ok(Verdict::pass())
        }
        Route::Tunnel(node, _) => Ok(fwd::tunnel(ctx, ip, flow, n, node)),
        Route::Stack => Ok(fwd::uplink(ctx, ip, flow, n)),
    }
}

/// Pods' traffic leaving the cluster goes out with the node's address
/// (when masquerade is on), with a port claimed for the flow; replies are
/// translated back on the way in. Addresses the ipcache knows (pods,
/// nodes, Services, `--non-masquerade-cidr`) are never masqueraded.
#[classifier]
pub fn host_out(mut ctx: TcContext) -> i32 {
    let len = ctx.len();
    let v = to_network(&mut ctx);
    verdict::tc_exit(&ctx, Direction::ToNetwork, len, v)
}

#[inline(never)]
fn to_network(ctx: &mut TcContext) -> Verdict {
    Verdict::from_result(try_to_network(ctx))
}

#[inline(always)]
fn try_to_network(ctx: &mut TcContext) -> Result<Verdict, Reason> {
    if parse::ethertype(ctx) != Some(parse::ETH_P_IP) {
        return Ok(Verdict::pass());
    }
    let cfg = config::get()?;
    if cfg.flags & DP_F_MASQUERADE == 0 {
        return Ok(Verdict::pass());
    }
    let ip = parse::ipv4(ctx)?;
    match endpoints::lookup(&EndpointKey::v4(ip.saddr)) {
        Some(ep) if ep.flags & EP_F_LOCAL != 0 => {}
        _ => return Ok(Verdict::pass()),
    }
    if ipcache::lookup_v4(ip.daddr).is_some() {
        return Ok(Verdict::pass());
    }
    let mut flow = l4::flow(ctx, &ip)?;
    let mut n = Nat::none();
    let code = svc::masquerade(&flow, u32::from_ne_bytes(cfg.node_ipv4), ctx.len(), &mut n);
    svc::explain_nat(&flow, code, &n);
    match code & 0xff {
        svc::DROP => Err(svc::dropped_reason(code)),
        svc::NAT => {
            svc::apply(ctx, &mut flow, &n)?;
            Ok(Verdict::pass())
        }
        _ => Ok(Verdict::pass()),
    }
}
