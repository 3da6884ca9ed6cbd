//! The one exit of every program: a verdict is counted under its reason
//! (forwarded, or the named drop), drops are logged at debug, and the action
//! goes back to the kernel. (Drop events for `dataplane monitor` join here.)

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use aya_log_ebpf::debug;
use dataplane_common::{Direction, Reason};

use crate::metrics;

/// `len` is the packet's length as it arrived (programs may change it).
#[inline(always)]
pub fn exit(ctx: &TcContext, direction: Direction, len: u32, verdict: Result<i32, Reason>) -> i32 {
    match verdict {
        Ok(action) => {
            metrics::count_verdict(direction, Reason::Forwarded, len);
            action
        }
        Err(reason) => {
            metrics::count_verdict(direction, reason, len);
            debug!(ctx, "drop {} {}", direction.name(), reason.name());
            TC_ACT_SHOT
        }
    }
}
