//! Dry runs of `dataplane explain` (see `dataplane_common::explain`): a
//! packet marked so is decided like any other, but the hooks change no
//! state for it and note each decision here instead. Every note is a
//! subprogram of its own, called only for marked packets: the frames of
//! the packet paths stay as they are.

use aya_ebpf::{btf_maps::Array, macros::btf_map, programs::TcContext};
use dataplane_common::{
    EXPLAIN_COOKIE, EXPLAIN_CT, EXPLAIN_EGRESS, EXPLAIN_INGRESS, EXPLAIN_MARK, EXPLAIN_PORT_CLAIM,
    EXPLAIN_REJECT, EXPLAIN_ROUTE, EXPLAIN_SERVICE, EXPLAIN_VERDICT, ExplainPolicy, ExplainTrace,
    POLICY_DIR_INGRESS,
};

#[btf_map(name = "dp_explain")]
static EXPLAIN: Array<ExplainTrace, 1> = Array::new();

/// Whether the packet is a dry run: its mark and its first control-block
/// word, which only `BPF_PROG_TEST_RUN` sets together this way.
#[inline(always)]
pub fn is_dry(ctx: &TcContext) -> bool {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    unsafe { (*ctx.skb.skb).mark == EXPLAIN_MARK && (*ctx.skb.skb).cb[0] == EXPLAIN_COOKIE }
}

/// Words 1 and 2 of the control block of a dry run on the tunnel device:
/// the sending node's address (wire bytes) and the VNI, which a real
/// packet's tunnel metadata carries.
#[inline(always)]
pub fn tunnel_key(ctx: &TcContext) -> ([u8; 4], u32) {
    // SAFETY: as above.
    unsafe { ((*ctx.skb.skb).cb[1].to_ne_bytes(), (*ctx.skb.skb).cb[2]) }
}

#[inline(always)]
fn with(f: impl FnOnce(&mut ExplainTrace)) {
    if let Some(t) = EXPLAIN.get_ptr_mut(0) {
        // SAFETY: a valid map value pointer; dry runs do not overlap (the
        // CLI serialises them).
        f(unsafe { &mut *t });
    }
}

/// A conntrack entry matched: its flags, direction and Service ids.
#[inline(never)]
pub fn ct(flags: u16, dir: u8, frontend: u32, backend: u32) {
    with(|t| {
        t.notes |= EXPLAIN_CT;
        t.ct_flags = flags;
        t.ct_dir = dir;
        t.frontend = frontend;
        t.backend = backend;
    });
}

/// A new Service flow: the frontend and the backend chosen; `claim` when
/// a NAT port would be claimed for it.
#[inline(never)]
pub fn service(frontend: u32, backend: u32, claim: bool) {
    with(|t| {
        t.notes |= EXPLAIN_SERVICE | if claim { EXPLAIN_PORT_CLAIM } else { 0 };
        t.frontend = frontend;
        t.backend = backend;
    });
}

/// A masquerade: a NAT port would be claimed.
#[inline(never)]
pub fn port_claim() {
    with(|t| t.notes |= EXPLAIN_PORT_CLAIM);
}

/// A Service with no backend refused the flow.
#[inline(never)]
pub fn reject(frontend: u32) {
    with(|t| {
        t.notes |= EXPLAIN_REJECT;
        t.frontend = frontend;
    });
}

/// The rewrite the packet gets (words with the wire's bytes).
#[inline(never)]
pub fn nat(flags: u16, src: u32, sport: u16, dst: u32, dport: u16) {
    with(|t| {
        t.nat_flags = flags;
        t.nat_src = src.to_ne_bytes();
        t.nat_sport = sport.to_ne_bytes();
        t.nat_dst = dst.to_ne_bytes();
        t.nat_dport = dport.to_ne_bytes();
    });
}

/// A policy decision of `endpoint` in `dir`.
#[inline(never)]
pub fn policy(dir: u8, endpoint: u32, peer: u32, policy: u32, result: u8) {
    with(|t| {
        let p = ExplainPolicy {
            endpoint,
            peer,
            policy,
            result,
            _pad: [0; 3],
        };
        if dir == POLICY_DIR_INGRESS {
            t.notes |= EXPLAIN_INGRESS;
            t.ingress = p;
        } else {
            t.notes |= EXPLAIN_EGRESS;
            t.egress = p;
        }
    });
}

/// Where the packet goes: an `EXPLAIN_ROUTE_*` and its target.
#[inline(never)]
pub fn route(kind: u8, target: u32) {
    with(|t| {
        t.notes |= EXPLAIN_ROUTE;
        t.route = kind;
        t.route_target = target;
    });
}

/// The program's verdict, at its exit.
#[inline(never)]
pub fn verdict(action: i32, reason: u32) {
    with(|t| {
        t.notes |= EXPLAIN_VERDICT;
        t.action = action;
        t.reason = reason;
    });
}
