//! The node's host device (`dp_host`, one end of a veth pair): the agent
//! routes the Service range into it, so the node's own processes reach
//! Services through the same translation pods get. Its tc egress sees what
//! the stack sends there.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_REDIRECT},
    helpers::bpf_redirect,
    macros::classifier,
    programs::TcContext,
};
use dataplane_common::{Direction, EXPLAIN_ROUTE_LOCAL, Reason};

use crate::{
    events, fwd, icmp, l4, parse,
    route::{self, Route},
    svc::{self, Nat},
    verdict::{self, Verdict},
};

#[classifier]
pub fn from_host(mut ctx: TcContext) -> i32 {
    let len = ctx.len();
    let mut v = from_node(&mut ctx);
    if let Some(err) = v.wants_answer() {
        // SAFETY: `skb` is the context pointer the kernel passed.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        v = icmp::answer_pod(&mut ctx, ifindex, err, u64::from(BPF_F_INGRESS));
    }
    verdict::tc_exit(&ctx, Direction::FromHost, len, v)
}

#[inline(never)]
fn from_node(ctx: &mut TcContext) -> Verdict {
    Verdict::from_result(try_from_node(ctx))
}

#[inline(always)]
fn try_from_node(ctx: &mut TcContext) -> Result<Verdict, Reason> {
    if parse::ethertype(ctx) != Some(parse::ETH_P_IP) {
        // Only the Service range is routed here (IPv6 and ARP are off).
        return Err(Reason::UnsupportedL3);
    }
    let ip = parse::ipv4(ctx)?;
    let mut flow = l4::flow(ctx, &ip)?;
    let mut n = Nat::none();
    let code = svc::from_endpoint(&flow, ctx.len(), &mut n);
    svc::explain_nat(&flow, code, &n);
    match code & 0xff {
        svc::REJECT => return Ok(icmp::Error::port_unreachable().verdict()),
        svc::DROP => return Err(svc::dropped_reason(code)),
        svc::NONE => return Err(Reason::NoService),
        _ => {}
    }
    match route::v4(n.daddr(&flow))? {
        Route::Local(ep) => {
            events::route_taken(&flow, EXPLAIN_ROUTE_LOCAL, ep.ifindex, &n);
            if ip.ttl <= 1 {
                return Ok(icmp::Error::time_exceeded().verdict());
            }
            svc::apply(ctx, &mut flow, &n)?;
            parse::ipv4_dec_ttl(ctx)?;
            // From an egress hook: out of the pod's veth (not to its peer
            // directly), addressed to the pod.
            ctx.store(0, &ep.mac, 0).map_err(|_| Reason::HelperFailed)?;
            ctx.store(6, &ep.host_mac, 0)
                .map_err(|_| Reason::HelperFailed)?;
            // SAFETY: plain helper call.
            let action = unsafe { bpf_redirect(ep.ifindex, 0) };
            if action == i64::from(TC_ACT_REDIRECT) {
                Ok(Verdict::redirect())
            } else {
                Err(Reason::HelperFailed)
            }
        }
        Route::Tunnel(node, _) => Ok(fwd::tunnel(ctx, &ip, &mut flow, &n, node)),
        Route::Stack => Ok(fwd::uplink(ctx, &ip, &mut flow, &n)),
        // A backend in the node's own network namespace: not reachable from
        // the node through its Service yet.
        Route::Host => Err(Reason::UnknownDestination),
    }
}
