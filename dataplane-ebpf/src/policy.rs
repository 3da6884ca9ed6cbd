//! NetworkPolicy verdicts for a local endpoint's traffic, from the maps
//! the agent compiles (see `dataplane_common::policy`): at most three
//! longest-prefix lookups whatever the number of rules. A flow allowed at
//! an endpoint under policy leaves a conntrack entry for its replies, so
//! they pass the other way even where that direction is isolated.

use aya_ebpf::{btf_maps::LpmTrie, macros::btf_map, maps::lpm_trie::Key};
use dataplane_common::{
    EXPLAIN_POLICY_ALLOWED, EXPLAIN_POLICY_DENIED, EXPLAIN_POLICY_HOST, EXPLAIN_POLICY_NONE,
    EXPLAIN_POLICY_OPEN, EXPLAIN_POLICY_REPLY, EndpointKey, IDENTITY_HOST, IDENTITY_REMOTE_NODE,
    IDENTITY_UNKNOWN, IDENTITY_WORLD, IPCACHE_KIND_HOST, IPCACHE_KIND_REMOTE_HOST,
    IPCACHE_KIND_SERVICES, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, PEER_ANY, PEER_CLASS,
    POLICY_ALLOW, POLICY_CIDR_MAX, POLICY_CIDR_PREFIX_DIR, POLICY_DIR_EGRESS, POLICY_DIR_INGRESS,
    POLICY_ISOLATED, POLICY_MAX, POLICY_PREFIX_FULL, PolicyCidrKey, PolicyCidrValue, PolicyKey,
    PolicyValue, Reason, VERDICT_ALLOWED, VERDICT_DENIED,
};

use crate::{ct, endpoints, events, explain, ipcache, l4::Flow};

#[btf_map(name = "dp_policy")]
static POLICY: LpmTrie<PolicyKey, PolicyValue, { POLICY_MAX as usize }> = LpmTrie::new();

#[btf_map(name = "dp_policy_cidr")]
static POLICY_CIDR: LpmTrie<PolicyCidrKey, PolicyCidrValue, { POLICY_CIDR_MAX as usize }> =
    LpmTrie::new();

/// The security identity of an address (wire bytes): a pod's own, this
/// node, another node, somewhere in the cluster not known yet, or the
/// world.
#[inline(always)]
pub fn identity_of(addr: u32) -> u32 {
    let a = addr.to_ne_bytes();
    if let Some(ep) = endpoints::lookup(&EndpointKey::v4(a)) {
        return ep.identity;
    }
    match ipcache::lookup_v4(a) {
        Some(e) if e.kind == IPCACHE_KIND_HOST => IDENTITY_HOST,
        Some(e) if e.kind == IPCACHE_KIND_REMOTE_HOST => IDENTITY_REMOTE_NODE,
        Some(e) if e.kind == IPCACHE_KIND_SERVICES => IDENTITY_WORLD,
        Some(e) if e.identity != 0 => e.identity,
        // Inside the cluster's ranges but no endpoint (yet).
        Some(_) => IDENTITY_UNKNOWN,
        None => IDENTITY_WORLD,
    }
}

#[inline(always)]
fn lookup(
    endpoint: u32,
    dir: u8,
    peer: u32,
    proto: u8,
    port: [u8; 2],
) -> Option<&'static PolicyValue> {
    POLICY.get(&Key::new(
        POLICY_PREFIX_FULL,
        PolicyKey::new(endpoint, dir, peer, proto, port),
    ))
}

/// What the policy of `endpoint` says of traffic in `dir` with the peer
/// `peer_id` at `peer_addr` (wire bytes), on protocol `proto_port >> 16`
/// to port `proto_port & 0xffff` (a wire word): `Ok(None)` when the
/// endpoint is under no policy (nothing to track), `Ok(Some(id))` when
/// allowed (by policy `id`, 0 when that direction is not isolated), `Err`
/// when denied. (BPF calls take five arguments.)
#[inline(never)]
pub fn decide(
    endpoint: u32,
    dir: u8,
    peer_id: u32,
    peer_addr: u32,
    proto_port: u32,
) -> Result<Option<u32>, Reason> {
    let proto = (proto_port >> 16) as u8;
    let port = proto_port as u16;
    // Only these protocols have ports a rule can name.
    let port = if proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP {
        port.to_ne_bytes()
    } else {
        [0; 2]
    };
    let Some(v) = lookup(endpoint, dir, peer_id, proto, port) else {
        return Ok(None);
    };
    if v.kind != POLICY_ISOLATED {
        // An allow, or the marker of a direction that is not isolated.
        return Ok(Some(if v.kind == POLICY_ALLOW { v.policy } else { 0 }));
    }
    if let Some(v) = lookup(endpoint, dir, PEER_ANY, proto, port)
        && v.kind == POLICY_ALLOW
    {
        return Ok(Some(v.policy));
    }
    let ck = Key::new(
        POLICY_CIDR_PREFIX_DIR + 32,
        PolicyCidrKey {
            endpoint: endpoint.to_be_bytes(),
            dir,
            addr: peer_addr.to_ne_bytes(),
            _pad: [0; 3],
        },
    );
    if let Some(c) = POLICY_CIDR.get(&ck)
        && c.class != 0
        && let Some(v) = lookup(endpoint, dir, PEER_CLASS | c.class, proto, port)
        && v.kind == POLICY_ALLOW
    {
        return Ok(Some(v.policy));
    }
    Err(Reason::PolicyDenied)
}

#[inline(always)]
fn proto_port(proto: u8, port: u16) -> u32 {
    (u32::from(proto) << 16) | u32::from(port)
}

/// Egress of the local endpoint `endpoint` (its identity is the packet's
/// source): `flow` as the pod sent it, to `daddr`:`dport` once translated
/// (a Service's backend is judged, not its frontend). A call of its own:
/// the caller's frame is deep already.
#[inline(never)]
pub fn egress(endpoint: u32, flow: &Flow, daddr: u32, dport: u16) -> Result<(), Reason> {
    let peer = identity_of(daddr);
    let decided = decide(
        endpoint,
        POLICY_DIR_EGRESS,
        peer,
        daddr,
        proto_port(flow.proto, dport),
    );
    if flow.dry {
        note(POLICY_DIR_EGRESS, endpoint, peer, &decided, flow);
    }
    match decided {
        Ok(None) => Ok(()),
        Ok(Some(id)) => {
            if ct::track_replies(flow) && id != 0 && events::allowed_wanted() {
                let ids = (u64::from(flow.src_identity) << 32) | u64::from(peer);
                events::policy(flow, endpoint, allowed(POLICY_DIR_EGRESS), ids, id);
            }
            Ok(())
        }
        Err(_) if ct::is_reply(flow) => Ok(()),
        Err(r) => {
            if !flow.dry {
                let ids = (u64::from(flow.src_identity) << 32) | u64::from(peer);
                events::policy(flow, endpoint, denied(POLICY_DIR_EGRESS), ids, 0);
            }
            Err(r)
        }
    }
}

/// Ingress to the local endpoint `endpoint` (of identity `own_id`, 0 when
/// the caller does not have it at hand): `flow` as it will be delivered
/// (translated), from a peer of identity `peer_id`. Inlined into the
/// delivery step: one frame less on the deepest chain.
#[inline(always)]
pub fn ingress(endpoint: u32, own_id: u32, flow: &Flow, peer_id: u32) -> Result<(), Reason> {
    let decided = decide(
        endpoint,
        POLICY_DIR_INGRESS,
        peer_id,
        flow.saddr,
        proto_port(flow.proto, flow.dport),
    );
    if flow.dry {
        note(POLICY_DIR_INGRESS, endpoint, peer_id, &decided, flow);
    }
    match decided {
        Ok(None) => Ok(()),
        Ok(Some(id)) => {
            if ct::track_replies(flow) && id != 0 && events::allowed_wanted() {
                let ids = (u64::from(peer_id) << 32) | u64::from(own_id);
                events::policy(flow, endpoint, allowed(POLICY_DIR_INGRESS), ids, id);
            }
            Ok(())
        }
        // The pod's own node may always reach it (kubelet probes); its
        // replies must pass the pod's egress isolation too.
        Err(_) if peer_id == IDENTITY_HOST => {
            ct::track_replies(flow);
            Ok(())
        }
        Err(_) if ct::is_reply(flow) => Ok(()),
        Err(r) => {
            if !flow.dry {
                let ids = (u64::from(peer_id) << 32) | u64::from(own_id);
                events::policy(flow, endpoint, denied(POLICY_DIR_INGRESS), ids, 0);
            }
            Err(r)
        }
    }
}

/// A dry run's note of a decision, in the terms of the match above.
#[inline(always)]
fn note(dir: u8, endpoint: u32, peer: u32, decided: &Result<Option<u32>, Reason>, flow: &Flow) {
    let (policy, result) = match decided {
        Ok(None) => (0, EXPLAIN_POLICY_NONE),
        Ok(Some(0)) => (0, EXPLAIN_POLICY_OPEN),
        Ok(Some(id)) => (*id, EXPLAIN_POLICY_ALLOWED),
        Err(_) if dir == POLICY_DIR_INGRESS && peer == IDENTITY_HOST => (0, EXPLAIN_POLICY_HOST),
        Err(_) if ct::is_reply(flow) => (0, EXPLAIN_POLICY_REPLY),
        Err(_) => (0, EXPLAIN_POLICY_DENIED),
    };
    explain::policy(dir, endpoint, peer, policy, result);
}

/// An event's `meta` word: the policy direction and the verdict.
#[inline(always)]
fn allowed(dir: u8) -> u32 {
    (u32::from(dir) << 8) | u32::from(VERDICT_ALLOWED)
}

#[inline(always)]
fn denied(dir: u8) -> u32 {
    (u32::from(dir) << 8) | u32::from(VERDICT_DENIED)
}
