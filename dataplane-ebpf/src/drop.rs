//! The one exit for dropped packets: count under the named reason, log at
//! debug, return the verdict. (Drop events for `dataplane monitor` join here.)

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use aya_log_ebpf::debug;
use dataplane_common::{Direction, Reason};

use crate::metrics;

#[inline(always)]
pub fn drop_packet(ctx: &TcContext, direction: Direction, reason: Reason) -> i32 {
    metrics::count_verdict(direction, reason, ctx.len());
    debug!(ctx, "drop {} {}", direction.name(), reason.name());
    TC_ACT_SHOT
}
