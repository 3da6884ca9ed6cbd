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
    BPF_F_NO_PREALLOC, EVENT_DROP, EVENT_POLICY, EVENTS_ALLOWED, EVENTS_BYTES, EVENTS_DEFAULT_RATE,
    Event, EventConfig, EventState, FAMILY_IPV4, IPPROTO_TCP, IPPROTO_UDP, MONITORS_MAX,
    POLICY_NAMES_MAX, PolicyName, Reason, VERDICT_DENIED,
};

use crate::{ct::now, l4::Flow};

#[btf_map(name = "dp_events")]
static EVENTS: RingBuf<Event, { EVENTS_BYTES as usize }> = RingBuf::new();

#[btf_map(name = "dp_event_monitors")]
static MONITORS: ArrayOfMaps<RingBuf<Event, { EVENTS_BYTES as usize }>, { MONITORS_MAX as usize }> =
    ArrayOfMaps::new();

/// Written by the monitors only; declared here so that it is part of the
/// object like every map of the contract.
#[btf_map(name = "dp_event_readers")]
static READERS: Array<u32, { MONITORS_MAX as usize }> = Array::new();

#[btf_map(name = "dp_event_scratch")]
static SCRATCH: PerCpuArray<Event, 1> = PerCpuArray::new();

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

/// This CPU's work space for one more event, if its budget has room.
#[inline(always)]
fn reserve() -> Option<*mut Event> {
    let st = STATE.get_ptr_mut(0)?;
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
            return None;
        }
        (*st).count += 1;
    }
    SCRATCH.get_ptr_mut(0)
}

/// Sends the event built in this CPU's work space to every monitor's ring
/// and to the backlog ring. A monitor's full ring loses it (counted); the
/// backlog ring fills while no one reads it, which counts as a loss only
/// when no monitor is there to see the event.
#[inline(never)]
fn send() {
    let (Some(st), Some(e)) = (STATE.get_ptr_mut(0), SCRATCH.get(0)) else {
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
    send();
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
    send();
}

const ETH_LEN: usize = 14;
