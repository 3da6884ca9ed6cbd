//! Handing a packet straight to a pod on this node, past the host stack.

use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::bpf_redirect_peer, programs::TcContext};
use dataplane_common::{Direction, EndpointInfo, Reason};

use crate::{metrics, verdict::Verdict};

pub const PACKET_HOST: u32 = 0;

/// Addresses the frame to the pod and redirects it into the pod's own
/// interface (`bpf_redirect_peer`). The caller has routed it (TTL). Counted
/// for the pod only once the redirect is set up, so a failed redirect is
/// counted once, as `helper_failed`.
#[inline(never)]
pub fn to_local(ctx: &mut TcContext, ep: &EndpointInfo) -> Verdict {
    Verdict::from_result(try_to_local(ctx, ep))
}

#[inline(always)]
fn try_to_local(ctx: &mut TcContext, ep: &EndpointInfo) -> Result<Verdict, Reason> {
    ctx.store(0, &ep.mac, 0).map_err(|_| Reason::HelperFailed)?;
    ctx.store(6, &ep.host_mac, 0)
        .map_err(|_| Reason::HelperFailed)?;
    // A frame from the overlay or the uplink was not addressed to the pod's
    // MAC when it was classified; the pod's stack must see it as its own.
    ctx.change_type(PACKET_HOST)
        .map_err(|_| Reason::HelperFailed)?;
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect_peer(ep.ifindex, 0) };
    if action != i64::from(TC_ACT_REDIRECT) {
        return Err(Reason::HelperFailed);
    }
    metrics::count_endpoint(ctx, ep.ifindex, Direction::ToEndpoint, ctx.len());
    Ok(Verdict::redirect())
}
