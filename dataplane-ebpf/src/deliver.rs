//! Handing a packet straight to a pod on this node, past the host stack.

use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::bpf_redirect_peer, programs::TcContext};
use dataplane_common::{Direction, EndpointInfo, Reason};

use crate::{metrics, parse};

const PACKET_HOST: u32 = 0;

/// Routes one hop (TTL), addresses the frame to the pod, counts it for the
/// pod and redirects into the pod's own interface (`bpf_redirect_peer`).
#[inline(always)]
pub fn to_local(ctx: &mut TcContext, ep: &EndpointInfo) -> Result<i32, Reason> {
    parse::ipv4_dec_ttl(ctx)?;
    ctx.store(0, &ep.mac, 0).map_err(|_| Reason::HelperFailed)?;
    ctx.store(6, &ep.host_mac, 0)
        .map_err(|_| Reason::HelperFailed)?;
    // A frame from the overlay or the uplink was not addressed to the pod's
    // MAC when it was classified; the pod's stack must see it as its own.
    ctx.change_type(PACKET_HOST)
        .map_err(|_| Reason::HelperFailed)?;
    metrics::count_endpoint(ctx, ep.ifindex, Direction::ToEndpoint, ctx.len());
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect_peer(ep.ifindex, 0) };
    if action == i64::from(TC_ACT_REDIRECT) {
        Ok(TC_ACT_REDIRECT)
    } else {
        Err(Reason::HelperFailed)
    }
}
