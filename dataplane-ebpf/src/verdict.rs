//! What a program decided, and the one exit every program leaves through:
//! the verdict is counted under its reason (forwarded, answered, or the named
//! drop), drops are logged at debug, and the action goes back to the kernel.
//! Drops also go out as events for `dataplane monitor`.
//!
//! A [`Verdict`] is one `u64` so that it can cross BPF-to-BPF calls in a
//! register: the per-packet paths are split into subprograms the verifier
//! checks once each, not one function inlined into every caller. A verdict
//! can also ask the entry point to answer the packet with an ICMP error:
//! that work runs from the entry point, not nested below the body, so the
//! two never add up on the 512-byte stack.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use dataplane_common::{Direction, Hook, Reason};

use crate::metrics;

#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct Verdict(u64);

impl Verdict {
    /// `action` is the kernel's return code (a `TC_ACT_*`), `reason` what
    /// the packet is counted under.
    #[inline(always)]
    pub const fn new(action: i32, reason: Reason) -> Self {
        Verdict(((action as u32 & 0xffff) | ((reason as u32) << 16)) as u64)
    }

    /// The packet is to be answered with `err` (an `icmp::Error` word).
    #[inline(always)]
    pub const fn answer(err: u32, reason: Reason) -> Self {
        Verdict(Self::drop(reason).0 | ((err as u64) << 32))
    }

    /// The ICMP error to answer with, if the verdict asks for one.
    #[inline(always)]
    pub const fn wants_answer(self) -> Option<u32> {
        let e = (self.0 >> 32) as u32;
        if e == 0 { None } else { Some(e) }
    }

    /// Not a kernel action: the entry point goes on with the packet (no
    /// TC_ACT_* and no XDP action is this large).
    pub const CONTINUE: i32 = 0x7fff;

    #[inline(always)]
    pub const fn cont() -> Self {
        Self::new(Self::CONTINUE, Reason::Forwarded)
    }

    #[inline(always)]
    pub const fn continues(self) -> bool {
        self.action() == Self::CONTINUE
    }

    /// To the host stack.
    #[inline(always)]
    pub const fn pass() -> Self {
        Self::new(TC_ACT_OK, Reason::Forwarded)
    }

    /// A redirect the program set up.
    #[inline(always)]
    pub const fn redirect() -> Self {
        Self::new(TC_ACT_REDIRECT, Reason::Forwarded)
    }

    #[inline(always)]
    pub const fn drop(reason: Reason) -> Self {
        Self::new(TC_ACT_SHOT, reason)
    }

    /// The packet is not forwarded, but answered (an ICMP error sent back in
    /// its place with `action`): counted under `reason`.
    #[inline(always)]
    pub const fn answered(reason: Reason, action: i32) -> Self {
        Self::new(action, reason)
    }

    #[inline(always)]
    pub const fn action(self) -> i32 {
        (self.0 & 0xffff) as i32
    }

    #[inline(always)]
    pub const fn reason_code(self) -> u32 {
        ((self.0 >> 16) & 0xff) as u32
    }

    #[inline(always)]
    pub fn from_result(r: Result<Verdict, Reason>) -> Verdict {
        match r {
            Ok(v) => v,
            Err(reason) => Verdict::drop(reason),
        }
    }
}

/// `len` is the packet's length as it arrived (programs may change it).
#[inline(always)]
pub fn tc_exit(ctx: &TcContext, direction: Direction, len: u32, verdict: Verdict) -> i32 {
    let code = verdict.reason_code();
    // A dry run is noted, not counted, logged or reported.
    if crate::explain::is_dry(ctx) {
        crate::explain::verdict(verdict.action(), code);
        return verdict.action();
    }
    if crate::events::trace_wanted() {
        // SAFETY: `skb` is the context pointer the kernel passed.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        crate::events::end_trace(
            code == Reason::Forwarded as u32,
            direction as u8,
            ifindex,
            len,
        );
    }
    metrics::count_verdict(Hook::Tc, direction, code, len);
    if code != Reason::Forwarded as u32 {
        report_drop(ctx, direction, code, len);
    }
    verdict.action()
}

/// The log line and the event of a drop: out of line, so the entry
/// points' frames (at the base of the deepest chains) stay small.
#[inline(never)]
fn report_drop(ctx: &TcContext, direction: Direction, code: u32, len: u32) {
    let name = match Reason::from_code(code as u8) {
        Some(r) => r.name(),
        None => "?",
    };
    debug!(ctx, "drop {} {}", direction.name(), name);
    // Policy denials went out as verdicts, with the policy.
    if code != Reason::PolicyDenied as u32 {
        crate::events::tc_drop(ctx, direction as u8, code as u8, len);
    }
}
