//! Events for `dataplane monitor` (see `dataplane_common::events`): drops
//! with their reason, policy verdicts with the policy. Each CPU has a
//! budget per second; what goes over it, or finds the ring full, is
//! counted instead.

use aya_ebpf::programs::TcContext;
use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps, HashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use dataplane_common::{
    BPF_F_NO_PREALLOC, EVENT_DROP, EVENT_POLICY, EVENT_TRACE, EVENTS_ALLOWED, EVENTS_BYTES,
    EVENTS_DEFAULT_RATE, EVENTS_TRACE, Event, EventConfig, EventReader, EventState, FAMILY_IPV4,
    IPPROTO_TCP, IPPROTO_UDP, MONITORS_MAX, POLICY_NAMES_MAX, PolicyName, Reason, VERDICT_DENIED,
};

use crate::{ct::now, l4::Flow, svc::Nat};

#[btf_map(name = "dp_events")]
static EVENTS: RingBuf<Event, { EVENTS_BYTES as usize }> = RingBuf::new();

#[btf_map(name = "dp_event_monitors")]
static MONITORS: ArrayOfMaps<RingBuf<Event, { EVENTS_BYTES as usize }>, { MONITORS_MAX as usize }> =
    ArrayOfMaps::new();

/// Written by the monitors only; declared here so that it is part of the
/// object like every map of the contract.
#[btf_map(name = "dp_event_readers")]
static READERS: Array<EventReader, { MONITORS_MAX as usize }> = Array::new();

#[btf_map(name = "dp_event_scratch")]
static SCRATCH: PerCpuArray<Event, 2> = PerCpuArray::new();

/// [`SCRATCH`]'s slot where an event is built.
const BUILD: u32 = 0;
/// [`SCRATCH`]'s slot where a packet's trace waits for its verdict.
const TRACE: u32 = 1;

#[btf_map(name = "dp_event_state")]
static STATE: PerCpuArray<EventState, 1> = PerCpuArray::new();

#[btf_map(name = "dp_event_config")]
static CONFIG: Array<EventConfig, 1> = Array::new();

/// Written by the agent only; declared here so that it is part of the
/// object like every map of the contract.
#[btf_map(name = "dp_policy_names")]
pub static POLICY_NAMES: HashMap<
    u32,
    PolicyName,
    { POLICY_NAMES_MAX as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

const NS: u64 = 1_000_000_000;

/// Whether allowed verdicts are wanted (a monitor asked).
#[inline(always)]
pub fn allowed_wanted() -> bool {
    CONFIG.get(0).is_some_and(|c| c.mask & EVENTS_ALLOWED != 0)
}

/// Whether trace events are wanted (a monitor asked).
#[inline(always)]
pub fn trace_wanted() -> bool {
    CONFIG.get(0).is_some_and(|c| c.mask & EVENTS_TRACE != 0)
}

/// [`trace_wanted`] as a call of its own: its map key stays off the frame
/// of the caller, the base of the deepest chain.
#[inline(never)]
pub fn trace_wanted_leaf() -> bool {
    trace_wanted()
}

/// Where a packet of `flow` goes (an `EXPLAIN_ROUTE_*` and its target),
/// rewritten as `n` says: noted for a dry run; while a monitor asks for
/// traces, kept until the verdict ([`end_trace`]); nothing otherwise.
#[inline(always)]
pub fn route_taken(flow: &Flow, kind: u8, target: u32, n: &Nat) {
    if flow.dry {
        crate::explain::route(kind, target);
    } else if flow.trace {
        note_trace(flow, u32::from(kind), target, n);
    }
}

/// The packet's trace, kept in this CPU's trace slot. A leaf with a small
/// frame: it is called from the deepest steps.
#[inline(never)]
fn note_trace(flow: &Flow, kind: u32, target: u32, n: &Nat) {
    let Some(e) = SCRATCH.get_ptr_mut(TRACE) else {
        return;
    };
    let (daddr, dport) = n.destination(flow);
    // SAFETY: this CPU's slot of a per-CPU array, an `Event`.
    unsafe {
        (*e).ts = now();
        (*e).kind = EVENT_TRACE;
        (*e).direction = 0;
        (*e).reason = Reason::Forwarded as u8;
        (*e).verdict = 0;
        (*e).policy_dir = 0;
        (*e).proto = flow.proto;
        (*e).family = FAMILY_IPV4;
        (*e).route = kind as u8;
        (*e).ifindex = 0;
        (*e).saddr = flow.saddr.to_ne_bytes();
        (*e).daddr = flow.daddr.to_ne_bytes();
        (*e).sport = flow.sport.to_ne_bytes();
        (*e).dport = flow.dport.to_ne_bytes();
        (*e).src_identity = flow.src_identity;
        (*e).dst_identity = 0;
        (*e).policy = 0;
        (*e).len = 0;
        (*e).target = target;
        (*e).nat_flags = n.flags;
        (*e).nat_daddr = daddr.to_ne_bytes();
        (*e).nat_dport = dport.to_ne_bytes();
        (*e)._pad = 0;
    }
}

/// At a program's exit, while traces are wanted: the packet's trace goes
/// out if it was forwarded (within the budget), and is cleared either way
/// (a step after the route, such as ingress policy, may still drop it).
#[inline(never)]
pub fn end_trace(forwarded: bool, direction: u8, ifindex: u32, len: u32) {
    let Some(e) = SCRATCH.get_ptr_mut(TRACE) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array.
    let pending = unsafe { (*e).kind == EVENT_TRACE };
    if !pending {
        return;
    }
    // SAFETY: as above.
    unsafe {
        (*e).kind = 0;
        (*e).direction = direction;
        (*e).ifindex = ifindex;
        (*e).len = len;
    }
    if forwarded && budget() {
        // SAFETY: as above.
        unsafe { (*e).kind = EVENT_TRACE };
        send(TRACE);
        // SAFETY: as above.
        unsafe { (*e).kind = 0 };
    }
}

/// This CPU's work space for one more event, if its budget has room.
#[inline(always)]
fn reserve() -> Option<*mut Event> {
    if !budget() {
        return None;
    }
    SCRATCH.get_ptr_mut(BUILD)
}

/// Whether this CPU's budget has room for one more event this second
/// (counted as taken if so, as over budget if not).
#[inline(always)]
fn budget() -> bool {
    let Some(st) = STATE.get_ptr_mut(0) else {
        return false;
    };
    let rate = match CONFIG.get(0) {
        Some(c) if c.rate != 0 => u64::from(c.rate),
        _ => u64::from(EVENTS_DEFAULT_RATE),
    };
    let t = now();
    // SAFETY: this CPU's slot of a per-CPU array.
    unsafe {
        if t.wrapping_sub((*st).window) >= NS {
            (*st).window = t;
            (*st).count = 0;
        }
        if (*st).count >= rate {
            (*st).limited += 1;
            return false;
        }
        (*st).count += 1;
    }
    true
}

/// Sends the event built in this CPU's work space to every monitor's ring
/// and to the backlog ring. A monitor's full ring loses it (counted); the
/// backlog ring fills while no one reads it, which counts as a loss only
/// when no monitor is there to see the event.
#[inline(never)]
fn send(slot: u32) {
    let (Some(st), Some(e)) = (STATE.get_ptr_mut(0), SCRATCH.get(slot)) else {
        return;
    };
    let mut watched = false;
    for i in 0..MONITORS_MAX {
        if let Some(ring) = MONITORS.get(i) {
            watched = true;
            if ring.output(e, 0).is_err() {
                // SAFETY: this CPU's slot of a per-CPU array.
                unsafe { (*st).lost += 1 };
            }
        }
    }
    if EVENTS.output(e, 0).is_err() && !watched {
        // SAFETY: as above.
        unsafe { (*st).lost += 1 };
    }
}

/// A policy verdict on `flow` at `endpoint` (its ifindex): `meta` packs
/// the policy direction (bits 8..16) and the verdict (bits 0..8); `ids`
/// the identities of the flow's source (high 32 bits) and destination.
/// Kept out of line and built in the per-CPU work space (no copy on the
/// stack): it sits beside the conntrack call at the bottom of the deepest
/// path, and five arguments is what a BPF call carries.
#[inline(never)]
pub fn policy(flow: &Flow, endpoint: u32, meta: u32, ids: u64, policy: u32) {
    let Some(e) = reserve() else {
        return;
    };
    let verdict = meta as u8;
    // SAFETY: this CPU's work space, an `Event`.
    unsafe {
        (*e).ts = now();
        (*e).kind = EVENT_POLICY;
        (*e).direction = 0;
        (*e).reason = if verdict == VERDICT_DENIED {
            Reason::PolicyDenied as u8
        } else {
            Reason::Forwarded as u8
        };
        (*e).verdict = verdict;
        (*e).policy_dir = (meta >> 8) as u8;
        (*e).proto = flow.proto;
        (*e).family = FAMILY_IPV4;
        (*e).route = 0;
        (*e).target = 0;
        (*e).nat_flags = 0;
        (*e).nat_dport = [0; 2];
        (*e).nat_daddr = [0; 4];
        (*e)._pad = 0;
        (*e).ifindex = endpoint;
        (*e).saddr = flow.saddr.to_ne_bytes();
        (*e).daddr = flow.daddr.to_ne_bytes();
        (*e).sport = flow.sport.to_ne_bytes();
        (*e).dport = flow.dport.to_ne_bytes();
        (*e).src_identity = (ids >> 32) as u32;
        (*e).dst_identity = ids as u32;
        (*e).policy = policy;
        (*e).len = 0;
    }
    send(BUILD);
}

/// A packet dropped at a tc hook for `reason` (a code; not a policy
/// denial: those are verdicts), read again from the packet at the exit,
/// off the deep path.
#[inline(never)]
pub fn tc_drop(ctx: &TcContext, direction: u8, reason: u8, len: u32) {
    let Some(e) = reserve() else {
        return;
    };
    // SAFETY: as above.
    unsafe {
        (*e).ts = now();
        (*e).kind = EVENT_DROP;
        (*e).direction = direction;
        (*e).reason = reason;
        (*e).verdict = 0;
        (*e).policy_dir = 0;
        (*e).route = 0;
        (*e).target = 0;
        (*e).nat_flags = 0;
        (*e).nat_dport = [0; 2];
        (*e).nat_daddr = [0; 4];
        (*e)._pad = 0;
        (*e).ifindex = (*ctx.skb.skb).ifindex;
        (*e).src_identity = 0;
        (*e).dst_identity = 0;
        (*e).policy = 0;
        (*e).len = len;
        (*e).family = 0;
        (*e).proto = 0;
        (*e).saddr = [0; 4];
        (*e).daddr = [0; 4];
        (*e).sport = [0; 2];
        (*e).dport = [0; 2];
        // Ethernet, then IPv4 (options skipped by its length), then the
        // ports where the protocol has them.
        if ctx.load::<[u8; 2]>(12) == Ok([0x08, 0x00])
            && let Ok(vihl) = ctx.load::<u8>(ETH_LEN)
            && vihl >> 4 == 4
        {
            (*e).family = FAMILY_IPV4;
            (*e).proto = ctx.load::<u8>(ETH_LEN + 9).unwrap_or(0);
            (*e).saddr = ctx.load::<[u8; 4]>(ETH_LEN + 12).unwrap_or([0; 4]);
            (*e).daddr = ctx.load::<[u8; 4]>(ETH_LEN + 16).unwrap_or([0; 4]);
            let l4 = ETH_LEN + usize::from(vihl & 0x0f) * 4;
            if matches!((*e).proto, IPPROTO_TCP | IPPROTO_UDP)
                && let Ok(ports) = ctx.load::<[u8; 4]>(l4)
            {
                (*e).sport = [ports[0], ports[1]];
                (*e).dport = [ports[2], ports[3]];
            }
        }
    }
    send(BUILD);
}

const ETH_LEN: usize = 14;
