//! NetworkPolicy maps: what each local endpoint allows, by peer identity
//! (or address class), protocol and port.
//!
//! [`MAP_POLICY`] is a longest-prefix trie over (endpoint, direction, peer,
//! protocol, port), every field big-endian so that prefixes follow the
//! fields: an entry for a peer with any protocol stops after the peer, one
//! for a protocol after the protocol, a port range is a few port prefixes.
//! Each endpoint under policy has a marker at (endpoint, direction) alone:
//! the match of last resort, saying whether that direction is isolated. A
//! lookup is at most three: the peer's identity, any peer, and the class of
//! the peer's address from [`MAP_POLICY_CIDR`] (ipBlocks).

pub const MAP_POLICY: &str = "dp_policy";
pub const MAP_POLICY_CIDR: &str = "dp_policy_cidr";
pub const POLICY_MAX: u32 = 262_144;
pub const POLICY_CIDR_MAX: u32 = 65_536;

/// Reserved identities (Cilium's numbers). Pods have identities from
/// [`IDENTITY_FIRST_POD`] to [`IDENTITY_MAX`] (they fit a VXLAN VNI).
pub const IDENTITY_UNKNOWN: u32 = 0;
pub const IDENTITY_HOST: u32 = 1;
pub const IDENTITY_WORLD: u32 = 2;
pub const IDENTITY_REMOTE_NODE: u32 = 6;
pub const IDENTITY_FIRST_POD: u32 = 256;
pub const IDENTITY_MAX: u32 = (1 << 24) - 1;

/// The peer field: an identity, any peer (0), or an address class (this
/// bit set).
pub const PEER_ANY: u32 = 0;
pub const PEER_CLASS: u32 = 1 << 31;

pub const POLICY_DIR_INGRESS: u8 = 1;
pub const POLICY_DIR_EGRESS: u8 = 2;

/// Prefix lengths (bits) of the key's fields, cumulative.
pub const POLICY_PREFIX_DIR: u32 = 40;
pub const POLICY_PREFIX_PEER: u32 = 72;
pub const POLICY_PREFIX_PROTO: u32 = 80;
pub const POLICY_PREFIX_FULL: u32 = 96;
pub const POLICY_CIDR_PREFIX_DIR: u32 = 40;

/// [`PolicyValue::kind`]: traffic matching the entry is allowed.
pub const POLICY_ALLOW: u8 = 1;
/// The marker of an isolated direction: nothing more specific matched, so
/// the packet is denied.
pub const POLICY_ISOLATED: u8 = 2;
/// The marker of a direction that is not isolated while the other one is:
/// allowed, and the flow is tracked so its replies pass the other way.
pub const POLICY_TRACKED: u8 = 3;

/// The data of a [`MAP_POLICY`] key (the kernel's LPM key prepends the
/// prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// The endpoint's host-side ifindex, big-endian.
    pub endpoint: [u8; 4],
    /// `POLICY_DIR_*`.
    pub dir: u8,
    /// Identity, [`PEER_ANY`] or [`PEER_CLASS`] | class, big-endian.
    pub peer: [u8; 4],
    pub proto: u8,
    /// Destination port (the endpoint's for ingress, the peer's for
    /// egress), big-endian as on the wire.
    pub port: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

impl PolicyKey {
    #[inline(always)]
    pub fn new(endpoint: u32, dir: u8, peer: u32, proto: u8, port_be: [u8; 2]) -> Self {
        PolicyKey {
            endpoint: endpoint.to_be_bytes(),
            dir,
            peer: peer.to_be_bytes(),
            proto,
            port: port_be,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    /// The agent's id of the policy that gave the entry (0 for markers).
    pub policy: u32,
    /// `POLICY_ALLOW`, `POLICY_ISOLATED` or `POLICY_TRACKED`.
    pub kind: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);

/// The data of a [`MAP_POLICY_CIDR`] key: an endpoint's ipBlock prefixes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyCidrKey {
    pub endpoint: [u8; 4],
    pub dir: u8,
    /// IPv4, network byte order.
    pub addr: [u8; 4],
    /// Past every prefix; keeps the value aligned in the trie's node.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<PolicyCidrKey>() == 12);

/// The class of the addresses under a prefix (0: none, it shadows
/// shorter prefixes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyCidrValue {
    pub class: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyCidrValue>() == 4);

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: plain old data, repr(C), no implicit padding.
    unsafe impl aya::Pod for PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyCidrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyCidrValue {}
}

/// The name of a direction code.
pub const fn policy_dir_name(dir: u8) -> &'static str {
    match dir {
        POLICY_DIR_INGRESS => "ingress",
        POLICY_DIR_EGRESS => "egress",
        _ => "?",
    }
}
