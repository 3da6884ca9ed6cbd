//! Services and NAT at each hook: find the translation a packet needs in
//! conntrack (either direction of a known flow), or make one for a new
//! Service flow. The hooks route by the translated destination, check TTL
//! and MTU against the untouched packet (so ICMP errors quote what the
//! sender sent), and only then [`apply`] the rewrite.
//!
//! Who translates what:
//! - a pod's or this node's new flow to a Service (internal scope): at its
//!   own node, backend chosen at random (or by affinity);
//! - traffic from outside to a NodePort, LoadBalancer or external IP
//!   (external scope): at the node it arrives on, backend by Maglev; to a
//!   backend on another node it is also SNATed to this node, so replies
//!   come back here (traffic policy Cluster);
//! - pods' traffic leaving the cluster: masqueraded on the uplink.
//!
//! Replies find the reverse rewrite in conntrack wherever they arrive.

use aya_ebpf::programs::TcContext;
use dataplane_common::{
    CT_DIR_ORIG, CT_DIR_REPLY, CT_F_DST, CT_F_HAIRPIN, CT_F_MASQ, CT_F_NODEPORT_SNAT, CT_F_SERVICE,
    CT_F_SRC, CtEntry, EndpointKey, HAIRPIN_IPV4, IPCACHE_KIND_HOST, IPCACHE_KIND_REMOTE_HOST,
    IPPROTO_TCP, IPPROTO_UDP, Reason, SCOPE_EXTERNAL, SCOPE_INTERNAL, ServiceKey, ServiceValue,
};

use crate::{ct, endpoints, explain, ipcache, l4::Flow, lb, nat};

/// A packet's rewrite.
#[derive(Clone, Copy)]
pub struct Nat {
    /// `CT_F_SRC` and/or `CT_F_DST`.
    pub flags: u16,
    /// Words with the wire's bytes, as in [`Flow`].
    pub src: u32,
    pub sport: u16,
    pub dst: u32,
    pub dport: u16,
}

impl Nat {
    #[inline(always)]
    pub const fn none() -> Self {
        Nat {
            flags: 0,
            src: 0,
            sport: 0,
            dst: 0,
            dport: 0,
        }
    }

    #[inline(always)]
    pub fn translates(&self) -> bool {
        self.flags & (CT_F_SRC | CT_F_DST) != 0
    }

    /// Where the packet goes once rewritten (wire bytes).
    #[inline(always)]
    pub fn daddr(&self, flow: &Flow) -> [u8; 4] {
        self.daddr_word(flow).to_ne_bytes()
    }

    /// Where the packet goes once rewritten: address and port (wire
    /// words).
    #[inline(always)]
    pub fn destination(&self, flow: &Flow) -> (u32, u16) {
        if self.flags & CT_F_DST != 0 {
            (self.dst, self.dport)
        } else {
            (flow.daddr, flow.dport)
        }
    }

    #[inline(always)]
    fn daddr_word(&self, flow: &Flow) -> u32 {
        if self.flags & CT_F_DST != 0 {
            self.dst
        } else {
            flow.daddr
        }
    }

    #[inline(always)]
    fn from_entry(e: &CtEntry) -> Self {
        Nat {
            flags: e.flags & (CT_F_SRC | CT_F_DST),
            src: ct::v4(&e.src),
            sport: u16::from_ne_bytes(e.sport),
            dst: ct::v4(&e.dst),
            dport: u16::from_ne_bytes(e.dport),
        }
    }
}

/// What a lookup concluded (the rewrite is in the [`Nat`] passed along).
pub const NONE: u32 = 0;
/// Rewrite as the [`Nat`] says.
pub const NAT: u32 = 1;
/// Refuse: answer with ICMP port unreachable (`service_no_backend`).
pub const REJECT: u32 = 2;
/// Drop under the reason in bits 8..16.
pub const DROP: u32 = 3;
/// XDP: leave the packet to tc, untouched (see [`from_network_xdp`]).
pub const TO_TC: u32 = 4;

#[inline(always)]
fn drop(reason: Reason) -> u32 {
    DROP | ((reason as u32) << 8)
}

#[inline(always)]
pub fn dropped_reason(code: u32) -> Reason {
    Reason::from_code((code >> 8) as u8).unwrap_or(Reason::Malformed)
}

/// [`known`], as a subprogram of its own.
#[inline(never)]
fn known_one(flow: &Flow, dir: u8, want: u16, len: u32, out: &mut Nat) -> bool {
    known(flow, dir, want, len, out)
}

/// The conntrack entry of a known flow in `dir`, if its flags are among
/// `want`: its rewrite into `out`, and the packet counted.
#[inline(always)]
fn known(flow: &Flow, dir: u8, want: u16, len: u32, out: &mut Nat) -> bool {
    let Some(e) = ct::lookup(&ct::flow_key(flow, dir)) else {
        return false;
    };
    // SAFETY: a valid map value pointer.
    let entry = unsafe { &*e };
    if entry.flags & want == 0 {
        return false;
    }
    *out = Nat::from_entry(entry);
    if flow.dry {
        explain::ct(entry.flags, dir, entry.id, entry.backend_id);
    }
    ct::touch(e, flow, dir, len);
    true
}

/// The Service frontend `flow` is addressed to, seen from `scope`: the
/// exact address, or for any node's address its NodePorts.
#[inline(always)]
pub fn frontend(flow: &Flow, scope: u8) -> Option<(ServiceKey, &'static ServiceValue)> {
    if flow.proto != IPPROTO_TCP && flow.proto != IPPROTO_UDP || !flow.has_ports {
        return None;
    }
    if let Some(fe) = lb::frontend(flow.daddr, flow.dport, flow.proto, scope) {
        return Some(fe);
    }
    match ipcache::lookup_v4(flow.daddr.to_ne_bytes()) {
        Some(e) if e.kind == IPCACHE_KIND_HOST || e.kind == IPCACHE_KIND_REMOTE_HOST => {
            lb::frontend(0, flow.dport, flow.proto, scope)
        }
        _ => None,
    }
}

/// The rewrite of a known flow in either direction: tried in `first`
/// direction, then the other, for entries with one of `want` flags.
#[inline(never)]
fn known_either(flow: &Flow, first: u8, want: u16, len: u32, out: &mut Nat) -> bool {
    let second = if first == CT_DIR_ORIG {
        CT_DIR_REPLY
    } else {
        CT_DIR_ORIG
    };
    known(flow, first, want, len, out) || known(flow, second, want, len, out)
}

/// What a pod (or, from its host device, this node) sends: the flows it
/// started, the replies of flows this node translated toward it, and new
/// flows to Services (internal scope).
#[inline(always)]
pub fn from_endpoint(flow: &Flow, len: u32, out: &mut Nat) -> u32 {
    if known_either(flow, CT_DIR_ORIG, CT_F_SERVICE, len, out) {
        return NAT;
    }
    let code = new_internal(flow, out);
    if code == NONE {
        ct::retire_reused(flow);
    }
    code
}

/// A new flow from a pod or this node: to a Service frontend, or not ours.
#[inline(never)]
fn new_internal(flow: &Flow, out: &mut Nat) -> u32 {
    let Some((key, fe)) = frontend(flow, SCOPE_INTERNAL) else {
        return NONE;
    };
    let (backend_id, b) = match lb::select(flow, &key, fe) {
        Ok(b) => b,
        Err(Reason::ServiceNoBackend) => {
            if flow.dry {
                explain::reject(fe.id);
            }
            return REJECT;
        }
        Err(r) => return drop(r),
    };
    let baddr = ct::v4(&b.addr);
    let bport = u16::from_ne_bytes(b.port);
    let Ok(sc) = ct::scratch() else {
        return drop(Reason::HelperFailed);
    };
    // A pod reaching itself: it must not see a packet from its own address,
    // so the source becomes the hairpin address (the client's port kept).
    let hairpin = baddr == flow.saddr;
    let mut flags = CT_F_SERVICE | CT_F_DST;
    let mut rflags = CT_F_SERVICE | CT_F_SRC;
    let mut src = (flow.saddr, flow.sport);
    if hairpin {
        flags |= CT_F_SRC | CT_F_HAIRPIN;
        rflags |= CT_F_DST | CT_F_HAIRPIN;
        src = (u32::from_ne_bytes(HAIRPIN_IPV4), flow.sport);
    }
    ct::fill(
        &mut sc.orig,
        flow,
        CT_DIR_ORIG,
        flags,
        src,
        (baddr, bport),
        fe.id,
        backend_id,
    );
    ct::fill(
        &mut sc.reply,
        flow,
        CT_DIR_REPLY,
        rflags,
        (flow.daddr, flow.dport),
        (flow.saddr, flow.sport),
        fe.id,
        backend_id,
    );
    sc.orig_key = ct::flow_key(flow, CT_DIR_ORIG);
    sc.reply_key = ct::key(baddr, src.0, bport, src.1, flow.proto, CT_DIR_REPLY);
    if flow.dry {
        explain::service(fe.id, backend_id, false);
    } else if let Err(r) = ct::create(sc) {
        return drop(r);
    }
    *out = Nat::from_entry(&sc.orig);
    NAT
}

/// What arrives on the uplink: replies (and masqueraded replies) of flows
/// this node translated, the rest of flows from outside it translated, and
/// new flows from outside to a NodePort, LoadBalancer or external IP
/// (external scope). A backend on another node gets the flow SNATed to
/// this node (`node`), so that its replies come back through here.
#[inline(always)]
pub fn from_network(flow: &Flow, node: u32, len: u32, out: &mut Nat) -> u32 {
    // Masqueraded flows only have a reply here; their originals go out.
    if known_either(flow, CT_DIR_REPLY, CT_F_SERVICE | CT_F_MASQ, len, out) {
        return NAT;
    }
    new_external(flow, node, out)
}

/// [`from_network`] in XDP, except that a known flow whose packet goes to
/// this node (a backend or pod here, the node itself) is left to tc
/// untouched, so that the entry counts the packet once, where tc
/// forwards it. A new flow is decided here either way: tc then finds it
/// known.
#[inline(always)]
pub fn from_network_xdp(flow: &Flow, node: u32, len: u32, out: &mut Nat) -> u32 {
    match known_beyond(flow, CT_DIR_REPLY, len, out) {
        NONE => {}
        code => return code,
    }
    match known_beyond(flow, CT_DIR_ORIG, len, out) {
        NONE => {}
        code => return code,
    }
    new_external(flow, node, out)
}

/// A known Service or masqueraded flow in `dir`: [`NAT`] (and counted) if
/// its packet leaves this node, [`TO_TC`] if it stays.
#[inline(never)]
fn known_beyond(flow: &Flow, dir: u8, len: u32, out: &mut Nat) -> u32 {
    let Some(e) = ct::lookup(&ct::flow_key(flow, dir)) else {
        return NONE;
    };
    // SAFETY: a valid map value pointer.
    let entry = unsafe { &*e };
    if entry.flags & (CT_F_SERVICE | CT_F_MASQ) == 0 {
        return NONE;
    }
    *out = Nat::from_entry(entry);
    if matches!(
        crate::route::v4(out.daddr(flow)),
        Ok(crate::route::Route::Local(_) | crate::route::Route::Host)
    ) {
        return TO_TC;
    }
    ct::touch(e, flow, dir, len);
    NAT
}

/// A new flow from outside: to a NodePort, LoadBalancer or external IP.
#[inline(never)]
fn new_external(flow: &Flow, node: u32, out: &mut Nat) -> u32 {
    let Some((key, fe)) = frontend(flow, SCOPE_EXTERNAL) else {
        return NONE;
    };
    let (backend_id, b) = match lb::select(flow, &key, fe) {
        Ok(b) => b,
        Err(Reason::ServiceNoBackend) => {
            if flow.dry {
                explain::reject(fe.id);
            }
            return REJECT;
        }
        Err(r) => return drop(r),
    };
    let baddr = ct::v4(&b.addr);
    let bport = u16::from_ne_bytes(b.port);
    let local = endpoints::lookup(&EndpointKey::v4(baddr.to_ne_bytes()))
        .is_some_and(|ep| ep.flags & dataplane_common::EP_F_LOCAL != 0);
    let Ok(sc) = ct::scratch() else {
        return drop(Reason::HelperFailed);
    };
    ct::fill(
        &mut sc.reply,
        flow,
        CT_DIR_REPLY,
        CT_F_SERVICE | CT_F_SRC | if local { 0 } else { CT_F_DST },
        (flow.daddr, flow.dport),
        (flow.saddr, flow.sport),
        fe.id,
        backend_id,
    );
    sc.orig_key = ct::flow_key(flow, CT_DIR_ORIG);
    if local {
        // The client's address is preserved: the backend answers it
        // directly, through this node's hook on its veth.
        ct::fill(
            &mut sc.orig,
            flow,
            CT_DIR_ORIG,
            CT_F_SERVICE | CT_F_DST,
            (flow.saddr, flow.sport),
            (baddr, bport),
            fe.id,
            backend_id,
        );
        sc.reply_key = ct::key(
            baddr,
            flow.saddr,
            bport,
            flow.sport,
            flow.proto,
            CT_DIR_REPLY,
        );
        if flow.dry {
            explain::service(fe.id, backend_id, false);
        } else if let Err(r) = ct::create(sc) {
            return drop(r);
        }
        *out = Nat::from_entry(&sc.orig);
        return NAT;
    }
    // A dry run claims no port: the client's stands in for it.
    let port = if flow.dry {
        explain::service(fe.id, backend_id, true);
        flow.sport
    } else {
        match ct::claim_port(baddr, bport, flow.proto, node, sc) {
            Ok(p) => p,
            Err(r) => return drop(r),
        }
    };
    ct::fill(
        &mut sc.orig,
        flow,
        CT_DIR_ORIG,
        CT_F_SERVICE | CT_F_SRC | CT_F_DST | CT_F_NODEPORT_SNAT,
        (node, port),
        (baddr, bport),
        fe.id,
        backend_id,
    );
    if !flow.dry
        && let Err(r) = ct::create_orig(sc)
    {
        return drop(r);
    }
    *out = Nat::from_entry(&sc.orig);
    NAT
}

/// Decapsulated packets: replies of flows this node translated.
#[inline(always)]
pub fn replies(flow: &Flow, len: u32, out: &mut Nat) -> u32 {
    if known_one(flow, CT_DIR_REPLY, CT_F_SERVICE, len, out) {
        NAT
    } else {
        NONE
    }
}

/// A pod's packet leaving through the uplink to outside the cluster: SNAT
/// to the node's address, with a port claimed toward that destination.
#[inline(always)]
pub fn masquerade(flow: &Flow, node: u32, len: u32, out: &mut Nat) -> u32 {
    if known_one(flow, CT_DIR_ORIG, CT_F_MASQ, len, out) {
        return NAT;
    }
    new_masquerade(flow, node, out)
}

#[inline(never)]
fn new_masquerade(flow: &Flow, node: u32, out: &mut Nat) -> u32 {
    if !flow.has_ports {
        return NONE;
    }
    let Ok(sc) = ct::scratch() else {
        return drop(Reason::HelperFailed);
    };
    ct::fill(
        &mut sc.reply,
        flow,
        CT_DIR_REPLY,
        CT_F_MASQ | CT_F_DST,
        (flow.daddr, flow.dport),
        (flow.saddr, flow.sport),
        0,
        0,
    );
    let port = if flow.dry {
        explain::port_claim();
        flow.sport
    } else {
        match ct::claim_port(flow.daddr, flow.dport, flow.proto, node, sc) {
            Ok(p) => p,
            Err(r) => return drop(r),
        }
    };
    ct::fill(
        &mut sc.orig,
        flow,
        CT_DIR_ORIG,
        CT_F_MASQ | CT_F_SRC,
        (node, port),
        (flow.daddr, flow.dport),
        0,
        0,
    );
    sc.orig_key = ct::flow_key(flow, CT_DIR_ORIG);
    if !flow.dry
        && let Err(r) = ct::create_orig(sc)
    {
        return drop(r);
    }
    *out = Nat::from_entry(&sc.orig);
    NAT
}

/// Notes the rewrite of a dry run (a [`NAT`] decision).
#[inline(always)]
pub fn explain_nat(flow: &Flow, code: u32, n: &Nat) {
    if flow.dry && code & 0xff == NAT {
        explain::nat(n.flags, n.src, n.sport, n.dst, n.dport);
    }
}

/// Rewrites the packet as `n` says.
#[inline(never)]
pub fn apply(ctx: &mut TcContext, flow: &mut Flow, n: &Nat) -> Result<(), Reason> {
    if n.flags & CT_F_SRC != 0 {
        nat::rewrite(ctx, flow, true, n.src, n.sport)?;
    }
    if n.flags & CT_F_DST != 0 {
        nat::rewrite(ctx, flow, false, n.dst, n.dport)?;
    }
    Ok(())
}
