//! Connection tracking: one LRU map holds both directions of every
//! translated flow (NetworkPolicy will share it). An entry says how to
//! rewrite the packets it matches; lifetimes follow TCP's state (SYN,
//! established, closing) or UDP's; the agent removes expired entries, and
//! when the map is full the LRU evicts (counted from the creation counter).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::{LruHashMap, PerCpuArray},
    helpers::bpf_ktime_get_ns,
    macros::btf_map,
};
use dataplane_common::{
    CT_CLOSE_TIMEOUT, CT_DIR_ORIG, CT_DIR_REPLY, CT_F_CLOSING, CT_F_DST, CT_F_ESTABLISHED,
    CT_F_POLICY, CT_F_SERVICE, CT_F_SRC, CT_MAX, CT_STAT_CREATED, CT_STAT_NAT_EXHAUSTED,
    CT_STAT_RECLAIMED, CT_STATS_MAX, CT_SYN_TIMEOUT, CT_TCP_TIMEOUT, CT_UDP_TIMEOUT, CtEntry,
    CtKey, CtScratch, FAMILY_IPV4, IPPROTO_TCP, NAT_PORT_MAX, NAT_PORT_MIN, Reason,
};

use crate::l4::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// One LRU list for all CPUs: with per-CPU lists (BPF_F_NO_COMMON_LRU) a
/// new flow's two inserts measured 2.2 us instead of 1.3 us in TEST_RUN.
#[btf_map(name = "dp_ct")]
static CT: LruHashMap<CtKey, CtEntry, { CT_MAX as usize }> = LruHashMap::new();

#[btf_map(name = "dp_ct_stats")]
static STATS: PerCpuArray<u64, { CT_STATS_MAX as usize }> = PerCpuArray::new();

#[btf_map(name = "dp_ct_scratch")]
static SCRATCH: PerCpuArray<CtScratch, 1> = PerCpuArray::new();

/// This CPU's room to build a new flow's entries in: a program runs on one
/// CPU from start to end, so nothing else writes it meanwhile.
#[inline(always)]
pub fn scratch() -> Result<&'static mut CtScratch, Reason> {
    // SAFETY: this CPU's slot of a preallocated array (see above).
    SCRATCH
        .get_ptr_mut(0)
        .map(|p| unsafe { &mut *p })
        .ok_or(Reason::HelperFailed)
}

const NS: u64 = 1_000_000_000;
/// How far a policy entry's expiry may lag before a packet renews it.
const RENEW_SLACK: u64 = NS;

/// An IPv4 address word (wire bytes) as the 16-byte field of the maps.
#[inline(always)]
pub fn v6(a: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&a.to_ne_bytes());
    out
}

/// The IPv4 address word in a 16-byte field.
#[inline(always)]
pub fn v4(a: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([a[0], a[1], a[2], a[3]])
}

#[inline(always)]
pub fn key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, dir: u8) -> CtKey {
    CtKey {
        saddr: v6(saddr),
        daddr: v6(daddr),
        sport: sport.to_ne_bytes(),
        dport: dport.to_ne_bytes(),
        proto,
        family: FAMILY_IPV4,
        dir,
        _pad: 0,
    }
}

#[inline(always)]
pub fn flow_key(f: &Flow, dir: u8) -> CtKey {
    key(f.saddr, f.daddr, f.sport, f.dport, f.proto, dir)
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn stat(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot.
        unsafe { *c += 1 };
    }
}

/// The live entry for `key`, if any (an expired one counts as none).
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtEntry> {
    let e = CT.get_ptr_mut(key)?;
    // SAFETY: a valid map value pointer.
    if unsafe { (*e).expires } < now() {
        return None;
    }
    Some(e)
}

/// The lifetime a packet with these TCP flags gives its direction.
#[inline(always)]
fn lifetime(proto: u8, tcp_flags: u8, flags: u16) -> (u64, u16) {
    if proto != IPPROTO_TCP {
        return (CT_UDP_TIMEOUT * NS, flags);
    }
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 || flags & CT_F_CLOSING != 0 {
        return (CT_CLOSE_TIMEOUT * NS, flags | CT_F_CLOSING);
    }
    if flags & CT_F_ESTABLISHED != 0 || (tcp_flags & TCP_ACK != 0 && tcp_flags & TCP_SYN == 0) {
        return (CT_TCP_TIMEOUT * NS, flags | CT_F_ESTABLISHED);
    }
    (CT_SYN_TIMEOUT * NS, flags)
}

/// A packet of the flow passed in direction `dir`: counters and lifetime.
/// A RST also closes the other direction at once.
#[inline(always)]
pub fn touch(e: *mut CtEntry, flow: &Flow, dir: u8, len: u32) {
    if flow.dry {
        return;
    }
    // SAFETY: a valid map value pointer. The bpf target has no atomic
    // add in `core`: a flow's packets arrive mostly on one CPU (RSS), so the
    // per-flow counters are exact in practice and approximate at worst.
    unsafe {
        (*e).packets += 1;
        (*e).bytes += u64::from(len);
        let (life, flags) = lifetime(flow.proto, flow.tcp_flags, (*e).flags);
        (*e).flags = flags;
        (*e).expires = now() + life;
        if flow.tcp_flags & TCP_RST != 0 {
            let pair = pair_key(flow, &*e, dir);
            if let Some(p) = CT.get_ptr_mut(&pair) {
                (*p).flags |= CT_F_CLOSING;
                (*p).expires = now() + CT_CLOSE_TIMEOUT * NS;
            }
        }
    }
}

/// The other direction's key: the packet as the entry (found for
/// direction `dir`) rewrites it, turned around.
#[inline(always)]
pub fn pair_key(flow: &Flow, e: &CtEntry, dir: u8) -> CtKey {
    let (mut s, mut sp, mut d, mut dp) = (flow.saddr, flow.sport, flow.daddr, flow.dport);
    if e.flags & CT_F_SRC != 0 {
        s = v4(&e.src);
        sp = u16::from_ne_bytes(e.sport);
    }
    if e.flags & CT_F_DST != 0 {
        d = v4(&e.dst);
        dp = u16::from_ne_bytes(e.dport);
    }
    let other = if dir == CT_DIR_ORIG {
        CT_DIR_REPLY
    } else {
        CT_DIR_ORIG
    };
    // Turned around, the ports swap too: for ICMP echo this moves the
    // identifier from sport (request) to dport (reply), as the flow has it.
    key(d, s, dp, sp, flow.proto, other)
}

/// Fills `e`, a new entry for `flow` in direction `dir`, with the rewrite
/// it needs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn fill(
    e: &mut CtEntry,
    flow: &Flow,
    dir: u8,
    flags: u16,
    src: (u32, u16),
    dst: (u32, u16),
    id: u32,
    backend_id: u32,
) {
    let t = now();
    let (life, flags) = if dir == CT_DIR_ORIG {
        lifetime(flow.proto, flow.tcp_flags, flags)
    } else {
        // The reply has not been seen yet: it lives as long as the
        // original direction does.
        lifetime(flow.proto, flow.tcp_flags & !(TCP_FIN | TCP_RST), flags)
    };
    e.expires = t + life;
    e.created = t;
    e.packets = 0;
    e.bytes = 0;
    e.src = v6(src.0);
    e.dst = v6(dst.0);
    e.sport = src.1.to_ne_bytes();
    e.dport = dst.1.to_ne_bytes();
    e.flags = flags;
    e._pad = 0;
    e.id = id;
    e.backend_id = backend_id;
}

/// Whether `flow` is the reply of a tracked flow (translated, or allowed
/// by policy): an entry for it in the reply direction. Its lifetime is
/// renewed.
#[inline(always)]
pub fn is_reply(flow: &Flow) -> bool {
    let Some(e) = lookup(&flow_key(flow, CT_DIR_REPLY)) else {
        return false;
    };
    // SAFETY: a valid map value pointer.
    let (life, flags) = lifetime(flow.proto, flow.tcp_flags, unsafe { (*e).flags });
    renew(e, life, flags, false);
    true
}

/// Renews a policy entry's lifetime (`extend_only`: never shortens it),
/// writing only what moved, the expiry only by more than a second: both
/// ends of a flow renew one entry from their CPUs, and a write per packet
/// would bounce its cache line between them.
#[inline(always)]
fn renew(e: *mut CtEntry, life: u64, flags: u16, extend_only: bool) {
    let until = now() + life;
    // SAFETY: a valid map value pointer.
    unsafe {
        if (*e).flags != flags {
            (*e).flags = flags;
        }
        let cur = (*e).expires;
        if until > cur + RENEW_SLACK || (!extend_only && until + RENEW_SLACK < cur) {
            (*e).expires = until;
        }
    }
}

/// The key under which the replies of `flow` are tracked: the flow turned
/// around, in the reply direction (as in `pair_key`, ICMP echo
/// identifiers move too).
#[inline(always)]
fn turned_reply_key(flow: &Flow) -> CtKey {
    key(
        flow.daddr,
        flow.saddr,
        flow.dport,
        flow.sport,
        flow.proto,
        CT_DIR_REPLY,
    )
}

/// Lets the replies of `flow` (a packet policy allowed) pass: an entry
/// for the flow turned around, in the reply direction, created or renewed.
/// An entry already there (a translated flow's own) serves as well. A
/// packet that is a reply itself only renews its flow's entry: tracking
/// it would add one for the wrong direction, a second per connection.
/// Whether it created an entry (the flow's first allowed packet).
#[inline(never)]
pub fn track_replies(flow: &Flow) -> bool {
    if flow.dry || is_reply(flow) {
        return false;
    }
    let k = turned_reply_key(flow);
    if let Some(e) = CT.get_ptr_mut(&k) {
        // SAFETY: a valid map value pointer.
        unsafe {
            if (*e).expires >= now() {
                let (life, flags) = lifetime(
                    flow.proto,
                    flow.tcp_flags & !(TCP_FIN | TCP_RST),
                    (*e).flags,
                );
                renew(e, life, flags, true);
                return false;
            }
        }
    }
    let Ok(sc) = scratch() else {
        return false;
    };
    fill(
        &mut sc.reply,
        flow,
        CT_DIR_REPLY,
        CT_F_POLICY,
        (0, 0),
        (0, 0),
        0,
        0,
    );
    insert(&k, &sc.reply).is_ok()
}

/// A new TCP connection that is not to a Service (a SYN without ACK):
/// a translated flow still tracked on the same addresses and ports is an
/// earlier connection through a Service (the client's kernel picked the
/// port for another destination, not knowing where the Service sent that
/// one; were it still open, the two would share one tuple on the wire
/// and could not both work). Left in place, its reply entry would
/// translate this connection's answers, the backend's TIME_WAIT answer to
/// the SYN among them, back into the Service's address: the client would
/// never see them and retry for as long as the backend's TIME_WAIT lasts.
/// Both its entries are removed.
#[inline(never)]
pub fn retire_reused(flow: &Flow) {
    if flow.dry || flow.proto != IPPROTO_TCP || flow.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return;
    }
    let k = turned_reply_key(flow);
    let Some(e) = CT.get_ptr_mut(&k) else {
        return;
    };
    // SAFETY: a valid map value pointer.
    let e = unsafe { &*e };
    if e.flags & CT_F_SERVICE == 0 {
        return;
    }
    // The reply direction's packet: this one turned around.
    let mut reply = *flow;
    (reply.saddr, reply.daddr) = (flow.daddr, flow.saddr);
    (reply.sport, reply.dport) = (flow.dport, flow.sport);
    let pair = pair_key(&reply, e, CT_DIR_REPLY);
    for k in [&pair, &k] {
        if CT.remove(k).is_ok() {
            stat(CT_STAT_RECLAIMED);
        }
    }
}

/// Stores both directions of a new flow, as built in the scratch slot.
#[inline(always)]
pub fn create(s: &CtScratch) -> Result<(), Reason> {
    insert(&s.reply_key, &s.reply)?;
    insert(&s.orig_key, &s.orig)
}

/// Stores a new entry; a dead one under the same key is overwritten (and
/// counted as reclaimed, so the agent's eviction count stays exact).
#[inline(always)]
fn insert(k: &CtKey, e: &CtEntry) -> Result<(), Reason> {
    if CT.insert(k, e, u64::from(BPF_NOEXIST)).is_err() {
        CT.insert(k, e, 0).map_err(|_| Reason::HelperFailed)?;
        stat(CT_STAT_RECLAIMED);
    }
    stat(CT_STAT_CREATED);
    Ok(())
}

/// Picks a NAT port on `node` toward `remote`:`rport` and stores the reply
/// direction (`s.reply`) under it, claiming the reply's key with
/// BPF_NOEXIST so that two CPUs can never hand out the same port toward the
/// same remote endpoint. Returns the port (network byte order); the key is
/// left in `s.reply_key`.
#[inline(never)]
pub fn claim_port(
    remote: u32,
    rport: u16,
    proto: u8,
    node: u32,
    s: &mut CtScratch,
) -> Result<u16, Reason> {
    let range = u32::from(NAT_PORT_MAX - NAT_PORT_MIN) + 1;
    // Spread the starting points; the time keeps retries of one flow from
    // walking the same sequence.
    let start = dataplane_common::flow_hash(
        remote.to_ne_bytes(),
        node.to_ne_bytes(),
        rport.to_ne_bytes(),
        [0; 2],
        proto,
    ) ^ (now() as u32);
    let mut i = 0u32;
    while i < 32 {
        let port = (NAT_PORT_MIN as u32 + start.wrapping_add(i.wrapping_mul(7919)) % range) as u16;
        // As on the wire.
        let p = u16::from_ne_bytes(port.to_be_bytes());
        // The reply comes back to the node at that port (for ICMP echo,
        // the identifier, in the reply's dport).
        s.reply_key = key(remote, node, rport, p, proto, CT_DIR_REPLY);
        if let Some(e) = CT.get_ptr(&s.reply_key) {
            // SAFETY: a valid map value pointer.
            if unsafe { (*e).expires } < now() {
                // A dead flow's port: free it, then claim it like any other
                // (if another CPU claims it first, NOEXIST says so).
                if CT.remove(&s.reply_key).is_ok() {
                    stat(CT_STAT_RECLAIMED);
                }
            }
        }
        if CT
            .insert(&s.reply_key, &s.reply, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            stat(CT_STAT_CREATED);
            return Ok(p);
        }
        i += 1;
    }
    stat(CT_STAT_NAT_EXHAUSTED);
    Err(Reason::NatPortsExhausted)
}

/// Stores the original direction of a flow whose reply [`claim_port`]
/// stored.
#[inline(always)]
pub fn create_orig(s: &CtScratch) -> Result<(), Reason> {
    insert(&s.orig_key, &s.orig)
}
