//! Map names, layouts, keys and values.
//!
//! Kernel programs declare each map with the literal name below (the
//! `#[btf_map]` attribute takes no constant); the agent refuses to start when
//! the loaded object lacks one of [`MAPS`], so a rename cannot drift silently.
//!
//! Every map carries a layout version that is part of its pin name
//! (`dp_endpoints_v1`): changing a key or value type means bumping it, and an
//! agent of the new version then creates a fresh map beside the old one
//! instead of misreading it. As a second line of defence the agent compares a
//! pinned map's type and sizes with [`MapSpec`] before adopting it.

use crate::reason::{Direction, Hook, Reason};

/// Root of the bpffs pins; each node's maps and links live in `<root>/<node>/`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/dataplane";

/// Endpoints (pods) by IP address: [`EndpointKey`] -> [`EndpointInfo`].
pub const MAP_ENDPOINTS: &str = "dp_endpoints";
/// Per-endpoint traffic counters, per CPU: [`EpMetricsKey`] -> [`Counter`].
pub const MAP_EP_METRICS: &str = "dp_ep_metrics";
/// Verdict counters by (hook, direction, reason), per CPU: index from [`metrics_index`] -> [`Counter`].
pub const MAP_METRICS: &str = "dp_metrics";
/// What an address belongs to, by longest prefix: [`IpcacheKey`] -> [`IpcacheEntry`].
pub const MAP_IPCACHE: &str = "dp_ipcache";
/// Datapath settings, one slot: index 0 -> [`DatapathConfig`].
pub const MAP_CONFIG: &str = "dp_config";

/// Source prefixes dropped on the uplink before the stack: LPM key
/// ([`IpcacheKey`]) -> [`PrefilterEntry`].
pub const MAP_PREFILTER: &str = "dp_prefilter";
pub const PREFILTER_MAX: u32 = 16_384;

pub const ENDPOINTS_MAX: u32 = 65_536;
pub const EP_METRICS_MAX: u32 = 16_384;
pub const METRICS_MAX: u32 = 3 << 11;
pub const IPCACHE_MAX: u32 = 16_384;

/// The kernel map types the datapath uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash,
    LruHash,
    PerCpuHash,
    Array,
    PerCpuArray,
    LpmTrie,
    HashOfMaps,
    ArrayOfMaps,
    RingBuf,
}

impl MapKind {
    pub const fn name(self) -> &'static str {
        match self {
            MapKind::Hash => "hash",
            MapKind::LruHash => "lru_hash",
            MapKind::PerCpuHash => "percpu_hash",
            MapKind::Array => "array",
            MapKind::PerCpuArray => "percpu_array",
            MapKind::LpmTrie => "lpm_trie",
            MapKind::HashOfMaps => "hash_of_maps",
            MapKind::ArrayOfMaps => "array_of_maps",
            MapKind::RingBuf => "ringbuf",
        }
    }
}

/// One map of the contract: what the CLI lists, what the agent checks a
/// pinned map against before adopting it.
#[derive(Clone, Copy, Debug)]
pub struct MapSpec {
    pub name: &'static str,
    /// Bumped whenever the key or value layout changes; part of the pin name.
    pub version: u32,
    pub kind: MapKind,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// `BPF_F_*` creation flags (part of the layout: a map made with other
    /// flags is replaced).
    pub flags: u32,
    pub description: &'static str,
}

impl MapSpec {
    /// The map's file name under a node's pin directory.
    #[cfg(any(feature = "user", feature = "api"))]
    pub fn pin_name(&self) -> String {
        format!("{}_v{}", self.name, self.version)
    }

    pub fn by_name(name: &str) -> Option<&'static MapSpec> {
        MAPS.iter().find(|m| m.name == name)
    }
}

const fn size<T>() -> u32 {
    core::mem::size_of::<T>() as u32
}

pub const MAPS: &[MapSpec] = &[
    MapSpec {
        name: MAP_ENDPOINTS,
        version: 1,
        kind: MapKind::Hash,
        key_size: size::<EndpointKey>(),
        value_size: size::<EndpointInfo>(),
        max_entries: ENDPOINTS_MAX,
        flags: 0,
        description: "endpoints (pods) by IP",
    },
    MapSpec {
        name: MAP_EP_METRICS,
        version: 1,
        kind: MapKind::PerCpuHash,
        key_size: size::<EpMetricsKey>(),
        value_size: size::<Counter>(),
        max_entries: EP_METRICS_MAX,
        flags: 0,
        description: "per-endpoint packet/byte counters (IP traffic)",
    },
    MapSpec {
        name: MAP_METRICS,
        version: 3,
        kind: MapKind::PerCpuArray,
        key_size: 4,
        value_size: size::<Counter>(),
        max_entries: METRICS_MAX,
        flags: 0,
        description: "verdict counters by hook, direction and reason",
    },
    MapSpec {
        name: MAP_IPCACHE,
        version: 1,
        kind: MapKind::LpmTrie,
        // The kernel's LPM key: a u32 prefix length, then the data.
        key_size: 4 + size::<IpcacheKey>(),
        value_size: size::<IpcacheEntry>(),
        max_entries: IPCACHE_MAX,
        // LPM tries exist only without preallocation.
        flags: crate::lb::BPF_F_NO_PREALLOC,
        description: "prefixes: cluster range, pod CIDRs per node, node addresses",
    },
    MapSpec {
        name: MAP_PREFILTER,
        version: 1,
        kind: MapKind::LpmTrie,
        key_size: 4 + size::<PrefilterKey>(),
        value_size: size::<PrefilterEntry>(),
        max_entries: PREFILTER_MAX,
        flags: crate::lb::BPF_F_NO_PREALLOC,
        description: "source prefixes dropped on the uplink before the stack (--deny-cidr)",
    },
    MapSpec {
        name: MAP_CONFIG,
        version: 3,
        kind: MapKind::Array,
        key_size: 4,
        value_size: size::<DatapathConfig>(),
        max_entries: 1,
        flags: 0,
        description: "datapath settings (mode, VNI, devices, node address, masquerade)",
    },
    MapSpec {
        name: crate::lb::MAP_SERVICES,
        version: 2,
        kind: MapKind::Hash,
        key_size: size::<crate::lb::ServiceKey>(),
        value_size: size::<crate::lb::ServiceValue>(),
        max_entries: crate::lb::SERVICES_MAX,
        flags: crate::lb::BPF_F_NO_PREALLOC,
        description: "Service frontends and their backend slots",
    },
    MapSpec {
        name: crate::lb::MAP_BACKENDS,
        version: 2,
        kind: MapKind::Hash,
        key_size: 4,
        value_size: size::<crate::lb::Backend>(),
        max_entries: crate::lb::BACKENDS_MAX,
        flags: crate::lb::BPF_F_NO_PREALLOC,
        description: "Service backends by id",
    },
    MapSpec {
        name: crate::lb::MAP_MAGLEV,
        version: 1,
        kind: MapKind::HashOfMaps,
        key_size: 4,
        value_size: 4,
        max_entries: crate::lb::MAGLEV_MAX,
        flags: 0,
        description: "Maglev tables of externally reachable frontends",
    },
    MapSpec {
        name: crate::lb::MAP_AFFINITY,
        version: 1,
        kind: MapKind::LruHash,
        key_size: size::<crate::lb::AffinityKey>(),
        value_size: size::<crate::lb::AffinityValue>(),
        max_entries: crate::lb::AFFINITY_MAX,
        flags: 0,
        description: "session affinity: client and frontend -> backend",
    },
    MapSpec {
        name: crate::lb::MAP_SOCK_REV,
        version: 1,
        kind: MapKind::LruHash,
        key_size: size::<crate::lb::SockRevKey>(),
        value_size: size::<crate::lb::SockRevValue>(),
        max_entries: crate::lb::SOCK_REV_MAX,
        flags: 0,
        description: "socket LB: socket and backend -> the Service address it asked for",
    },
    MapSpec {
        name: crate::lb::MAP_SOCK_CLIENTS,
        version: 1,
        kind: MapKind::Hash,
        key_size: 8,
        value_size: size::<crate::lb::SockClient>(),
        max_entries: crate::lb::SOCK_CLIENTS_MAX,
        flags: 0,
        description: "socket LB: network namespace cookie -> the pod (or node) address it sends from",
    },
    MapSpec {
        name: crate::lb::MAP_CT,
        version: 1,
        kind: MapKind::LruHash,
        key_size: size::<crate::lb::CtKey>(),
        value_size: size::<crate::lb::CtEntry>(),
        max_entries: crate::lb::CT_MAX,
        flags: 0,
        description: "connection tracking and NAT, both directions of each flow",
    },
    MapSpec {
        name: crate::lb::MAP_CT_SCRATCH,
        version: 1,
        kind: MapKind::PerCpuArray,
        key_size: 4,
        value_size: size::<crate::lb::CtScratch>(),
        max_entries: 1,
        flags: 0,
        description: "per-CPU scratch space where programs build new flows' entries",
    },
    MapSpec {
        name: crate::lb::MAP_CT_STATS,
        version: 1,
        kind: MapKind::PerCpuArray,
        key_size: 4,
        value_size: 8,
        max_entries: crate::lb::CT_STATS_MAX,
        flags: 0,
        description: "conntrack counters (entries created, NAT ports exhausted)",
    },
    MapSpec {
        name: crate::lb::MAP_FRAGS,
        version: 1,
        kind: MapKind::LruHash,
        key_size: size::<crate::lb::FragKey>(),
        value_size: size::<crate::lb::FragValue>(),
        max_entries: crate::lb::FRAGS_MAX,
        flags: 0,
        description: "IPv4 fragments: the ports of their datagram",
    },
    MapSpec {
        name: crate::policy::MAP_POLICY,
        version: 1,
        kind: MapKind::LpmTrie,
        key_size: 4 + size::<crate::policy::PolicyKey>(),
        value_size: size::<crate::policy::PolicyValue>(),
        max_entries: crate::policy::POLICY_MAX,
        flags: crate::lb::BPF_F_NO_PREALLOC,
        description: "NetworkPolicy: allows per endpoint, direction, peer, protocol and port",
    },
    MapSpec {
        name: crate::policy::MAP_POLICY_CIDR,
        version: 1,
        kind: MapKind::LpmTrie,
        key_size: 4 + size::<crate::policy::PolicyCidrKey>(),
        value_size: size::<crate::policy::PolicyCidrValue>(),
        max_entries: crate::policy::POLICY_CIDR_MAX,
        flags: crate::lb::BPF_F_NO_PREALLOC,
        description: "NetworkPolicy: ipBlock prefixes per endpoint and direction, to address classes",
    },
    MapSpec {
        name: crate::events::MAP_EVENTS,
        version: 2,
        kind: MapKind::RingBuf,
        key_size: 0,
        value_size: 0,
        max_entries: crate::events::EVENTS_BYTES,
        flags: 0,
        description: "events for dataplane monitor: drops and policy verdicts",
    },
    MapSpec {
        name: crate::events::MAP_EVENT_STATE,
        version: 1,
        kind: MapKind::PerCpuArray,
        key_size: 4,
        value_size: size::<crate::events::EventState>(),
        max_entries: 1,
        flags: 0,
        description: "per-CPU event budget, events over it and events lost",
    },
    MapSpec {
        name: crate::events::MAP_EVENT_MONITORS,
        version: 1,
        kind: MapKind::ArrayOfMaps,
        key_size: 4,
        value_size: 4,
        max_entries: crate::events::MONITORS_MAX,
        flags: 0,
        description: "the ring of each running monitor",
    },
    MapSpec {
        name: crate::events::MAP_EVENT_READERS,
        version: 1,
        kind: MapKind::Array,
        key_size: 4,
        value_size: size::<crate::events::EventReader>(),
        max_entries: crate::events::MONITORS_MAX,
        flags: 0,
        description: "the pid of the monitor in each ring slot",
    },
    MapSpec {
        name: crate::events::MAP_EVENT_SCRATCH,
        version: 1,
        kind: MapKind::PerCpuArray,
        key_size: 4,
        value_size: size::<crate::events::Event>(),
        max_entries: 2,
        flags: 0,
        description: "per-CPU work space: an event on its way to the rings, and a packet's trace until its verdict",
    },
    MapSpec {
        name: crate::explain::MAP_EXPLAIN,
        version: 1,
        kind: MapKind::Array,
        key_size: 4,
        value_size: size::<crate::explain::ExplainTrace>(),
        max_entries: 1,
        flags: 0,
        description: "what the last dry run of `dataplane explain` decided, step by step",
    },
    MapSpec {
        name: crate::events::MAP_EVENT_CONFIG,
        version: 1,
        kind: MapKind::Array,
        key_size: 4,
        value_size: size::<crate::events::EventConfig>(),
        max_entries: 1,
        flags: 0,
        description: "which events are emitted, and the per-CPU rate",
    },
    MapSpec {
        name: crate::events::MAP_POLICY_NAMES,
        version: 1,
        kind: MapKind::Hash,
        key_size: 4,
        value_size: size::<crate::events::PolicyName>(),
        max_entries: crate::events::POLICY_NAMES_MAX,
        flags: crate::lb::BPF_F_NO_PREALLOC,
        description: "NetworkPolicy names by the ids verdicts carry",
    },
];

pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// An IP address as a map key. IPv4 sits in `addr[0..4]` with the rest zero;
/// IPv6 fills all 16 bytes. Network byte order in both cases, so the kernel
/// can copy it straight from the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub addr: [u8; 16],
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 20);

impl EndpointKey {
    /// `addr` as the four bytes of the IPv4 header field (network byte order).
    #[inline(always)]
    pub const fn v4(addr: [u8; 4]) -> Self {
        Self {
            addr: [
                addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
            family: FAMILY_IPV4,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    pub const fn v6(addr: [u8; 16]) -> Self {
        Self {
            addr,
            family: FAMILY_IPV6,
            _pad: [0; 3],
        }
    }
}

/// The address part of an [`MAP_IPCACHE`] key. The LPM prefix length counts
/// from `family`: [`IPCACHE_STATIC_PREFIX`] bits cover `family` and `_pad`,
/// so a v4 /24 is stored with prefix length 32 + 24 and never matches v6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheKey {
    pub family: u8,
    pub _pad: [u8; 3],
    /// Network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<IpcacheKey>() == 20);

pub const IPCACHE_STATIC_PREFIX: u32 = 32;

/// The address part of a [`MAP_PREFILTER`] key: an [`IpcacheKey`] (same
/// prefix-length rule) padded to 24 bytes, so that the value after it is
/// 8-aligned for the programs' atomic add.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefilterKey {
    pub addr: IpcacheKey,
    /// Past every prefix length: never matched.
    pub _tail: u32,
}
const _: () = assert!(core::mem::size_of::<PrefilterKey>() == 24);

impl PrefilterKey {
    #[inline(always)]
    pub const fn v4(addr: [u8; 4]) -> Self {
        Self {
            addr: IpcacheKey::v4(addr),
            _tail: 0,
        }
    }
}

/// A denied prefix: how many packets it has dropped (all CPUs, added
/// atomically by the programs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefilterEntry {
    pub packets: u64,
}

impl IpcacheKey {
    #[inline(always)]
    pub const fn v4(addr: [u8; 4]) -> Self {
        Self {
            family: FAMILY_IPV4,
            _pad: [0; 3],
            addr: [
                addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        }
    }
}

/// Inside the cluster's pod range but in no node's CIDR: drop.
pub const IPCACHE_KIND_CLUSTER: u8 = 1;
/// This node's pod CIDR: only its endpoints exist; the rest is dropped.
pub const IPCACHE_KIND_LOCAL_PODS: u8 = 2;
/// Another node's pod CIDR: forward to `tunnel_endpoint`.
pub const IPCACHE_KIND_REMOTE_PODS: u8 = 3;
/// This node's own address: hand to the host stack.
pub const IPCACHE_KIND_HOST: u8 = 4;
/// Another node's address: in VXLAN mode pods reach it through the tunnel
/// to `tunnel_endpoint` (the node itself), so pod addresses never cross the
/// underlay bare.
pub const IPCACHE_KIND_REMOTE_HOST: u8 = 5;
/// The Service range: only addresses and ports of Services exist there;
/// the rest is dropped (`no_service`), never routed out.
pub const IPCACHE_KIND_SERVICES: u8 = 6;
/// Outside the cluster, and never masqueraded (`--non-masquerade-cidr`).
pub const IPCACHE_KIND_NO_MASQUERADE: u8 = 7;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheEntry {
    /// An `IPCACHE_KIND_*`.
    pub kind: u8,
    /// Family of `tunnel_endpoint` ([`FAMILY_IPV4`] / [`FAMILY_IPV6`]), 0 when none.
    pub tunnel_family: u8,
    pub _pad: [u8; 2],
    /// Security identity of the prefix (policy); 0 until assigned.
    pub identity: u32,
    /// Underlay address of the node owning the prefix, network byte order.
    pub tunnel_endpoint: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<IpcacheEntry>() == 24);

pub const MODE_VXLAN: u8 = 1;
pub const MODE_NATIVE: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// [`MODE_VXLAN`] or [`MODE_NATIVE`]; 0 = not configured yet.
    pub mode: u8,
    pub _pad: u8,
    /// The VXLAN UDP port (network byte order): XDP builds the outer
    /// header itself.
    pub vxlan_port: [u8; 2],
    /// VXLAN network identifier (host byte order).
    pub vni: u32,
    /// The VXLAN device (external/collect_md), in VXLAN mode.
    pub vxlan_ifindex: u32,
    /// The node's uplink.
    pub uplink_ifindex: u32,
    /// The node's own IPv4 address (network byte order): the source of the
    /// ICMP errors the datapath generates, and of masqueraded traffic.
    pub node_ipv4: [u8; 4],
    /// `DP_F_*`.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 24);

/// Pods' traffic to addresses outside the cluster leaves with the node's
/// address (egress masquerade).
pub const DP_F_MASQUERADE: u32 = 1 << 0;
/// Sockets' connect and sendmsg to a Service go to a backend at once
/// (socket LB); the per-packet path handles the rest.
pub const DP_F_SOCKET_LB: u32 = 1 << 1;
/// NodePort, LoadBalancer and external-IP traffic from outside is
/// translated and sent on in XDP on the uplink where it can be (remote
/// backends, replies to outside clients); the rest goes on to tc.
pub const DP_F_XDP_LB: u32 = 1 << 2;

/// The endpoint runs on this node (its `ifindex` is valid here).
pub const EP_F_LOCAL: u32 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Host-side veth ifindex; doubles as the endpoint id on this node. 0 for remote endpoints.
    pub ifindex: u32,
    /// Security identity (policy); 0 until one is assigned.
    pub identity: u32,
    /// MAC of the pod's `eth0`.
    pub mac: [u8; 6],
    /// MAC of the host-side veth (the pod's gateway MAC).
    pub host_mac: [u8; 6],
    /// `EP_F_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 28);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EpMetricsKey {
    /// Host-side veth ifindex of the endpoint.
    pub ifindex: u32,
    /// A [`Direction`] code.
    pub direction: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<EpMetricsKey>() == 8);

impl EpMetricsKey {
    #[inline(always)]
    pub const fn new(ifindex: u32, direction: Direction) -> Self {
        Self {
            ifindex,
            direction: direction as u8,
            _pad: [0; 3],
        }
    }
}

/// Packets and bytes (bytes as `skb->len`: from the L2 header on).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Index into [`MAP_METRICS`] for a (hook, direction, reason) triple.
#[inline(always)]
pub const fn metrics_index(hook: Hook, direction: Direction, reason: Reason) -> u32 {
    ((hook as u32) << 11) | ((direction as u32) << 8) | reason as u32
}

/// Inverse of [`metrics_index`]; `None` for slots no triple maps to.
pub const fn metrics_slot(index: u32) -> Option<(Hook, Direction, Reason)> {
    if index >= METRICS_MAX {
        return None;
    }
    match (
        Hook::from_code((index >> 11) as u8),
        Direction::from_code(((index >> 8) & 7) as u8),
        Reason::from_code((index & 0xff) as u8),
    ) {
        (Some(h), Some(d), Some(r)) => Some((h, d, r)),
        _ => None,
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use std::net::IpAddr;

    // SAFETY: all are repr(C), contain only integers and byte arrays, and have
    // no implicit padding (sizes asserted above).
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for crate::explain::ExplainTrace {}
    unsafe impl aya::Pod for crate::events::EventReader {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for EpMetricsKey {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for IpcacheKey {}
    unsafe impl aya::Pod for IpcacheEntry {}
    unsafe impl aya::Pod for PrefilterEntry {}
    unsafe impl aya::Pod for PrefilterKey {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for crate::lb::ServiceKey {}
    unsafe impl aya::Pod for crate::lb::ServiceValue {}
    unsafe impl aya::Pod for crate::lb::Backend {}
    unsafe impl aya::Pod for crate::lb::AffinityKey {}
    unsafe impl aya::Pod for crate::lb::AffinityValue {}
    unsafe impl aya::Pod for crate::lb::SockRevKey {}
    unsafe impl aya::Pod for crate::lb::SockRevValue {}
    unsafe impl aya::Pod for crate::lb::SockClient {}
    unsafe impl aya::Pod for crate::lb::CtKey {}
    unsafe impl aya::Pod for crate::lb::CtEntry {}
    unsafe impl aya::Pod for crate::lb::CtScratch {}
    unsafe impl aya::Pod for crate::lb::FragKey {}
    unsafe impl aya::Pod for crate::lb::FragValue {}
    unsafe impl aya::Pod for crate::events::Event {}
    unsafe impl aya::Pod for crate::events::EventConfig {}
    unsafe impl aya::Pod for crate::events::EventState {}
    unsafe impl aya::Pod for crate::events::PolicyName {}

    impl IpcacheKey {
        /// The key and LPM prefix length for `net` (address bits plus
        /// [`IPCACHE_STATIC_PREFIX`]).
        pub fn prefix(ip: IpAddr, len: u8) -> (u32, IpcacheKey) {
            let key = match ip {
                IpAddr::V4(v4) => IpcacheKey::v4(v4.octets()),
                IpAddr::V6(v6) => IpcacheKey {
                    family: FAMILY_IPV6,
                    _pad: [0; 3],
                    addr: v6.octets(),
                },
            };
            (IPCACHE_STATIC_PREFIX + u32::from(len), key)
        }

        pub fn ip(&self) -> Option<IpAddr> {
            EndpointKey {
                addr: self.addr,
                family: self.family,
                _pad: [0; 3],
            }
            .ip()
        }
    }

    impl IpcacheEntry {
        pub fn tunnel_endpoint(&self) -> Option<IpAddr> {
            EndpointKey {
                addr: self.tunnel_endpoint,
                family: self.tunnel_family,
                _pad: [0; 3],
            }
            .ip()
        }

        pub fn kind_name(&self) -> &'static str {
            match self.kind {
                IPCACHE_KIND_CLUSTER => "cluster-unassigned",
                IPCACHE_KIND_LOCAL_PODS => "local-pods",
                IPCACHE_KIND_REMOTE_PODS => "remote-pods",
                IPCACHE_KIND_HOST => "host",
                IPCACHE_KIND_REMOTE_HOST => "remote-host",
                IPCACHE_KIND_SERVICES => "services",
                IPCACHE_KIND_NO_MASQUERADE => "no-masquerade",
                _ => "unknown",
            }
        }
    }

    impl From<IpAddr> for EndpointKey {
        fn from(ip: IpAddr) -> Self {
            match ip {
                IpAddr::V4(v4) => EndpointKey::v4(v4.octets()),
                IpAddr::V6(v6) => EndpointKey::v6(v6.octets()),
            }
        }
    }

    impl EndpointKey {
        /// The address, or `None` when the family byte is not one we write.
        pub fn ip(&self) -> Option<IpAddr> {
            match self.family {
                FAMILY_IPV4 => {
                    let [a, b, c, d, ..] = self.addr;
                    Some(IpAddr::from([a, b, c, d]))
                }
                FAMILY_IPV6 => Some(IpAddr::from(self.addr)),
                _ => None,
            }
        }
    }

    impl std::fmt::Display for EndpointKey {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self.ip() {
                Some(ip) => write!(f, "{ip}"),
                None => write!(f, "<family {}>", self.family),
            }
        }
    }

    impl std::ops::AddAssign for Counter {
        fn add_assign(&mut self, rhs: Self) {
            self.packets += rhs.packets;
            self.bytes += rhs.bytes;
        }
    }
}

#[cfg(any(feature = "user", feature = "api"))]
mod mac {
    pub fn format_mac(mac: &[u8; 6]) -> String {
        let [a, b, c, d, e, g] = mac;
        format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }

    pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next()?;
            if p.len() != 2 {
                return None;
            }
            *byte = u8::from_str_radix(p, 16).ok()?;
        }
        parts.next().is_none().then_some(out)
    }
}

#[cfg(any(feature = "user", feature = "api"))]
pub use mac::{format_mac, parse_mac};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_index_round_trips_and_fits() {
        for h in Hook::ALL {
            for d in Direction::ALL {
                for r in Reason::ALL {
                    let i = metrics_index(*h, *d, *r);
                    assert!(i < METRICS_MAX);
                    assert_eq!(metrics_slot(i), Some((*h, *d, *r)));
                }
            }
        }
        assert_eq!(metrics_slot(METRICS_MAX), None);
    }

    #[test]
    fn map_specs_are_unique_and_sized() {
        let mut names = std::collections::HashSet::new();
        for m in MAPS {
            assert!(names.insert(m.name), "{} twice", m.name);
            // A ring buffer has neither keys nor values: its size is in bytes.
            if m.kind == MapKind::RingBuf {
                assert!(m.key_size == 0 && m.value_size == 0);
                assert!(m.max_entries.is_power_of_two() && m.max_entries >= 4096);
            } else {
                assert!(m.key_size > 0 && m.value_size > 0 && m.max_entries > 0);
            }
        }
        assert_eq!(MapSpec::by_name(MAP_CONFIG).map(|m| m.value_size), Some(24));
    }

    #[cfg(feature = "user")]
    #[test]
    fn endpoint_key_from_ip_is_network_order() {
        let k = EndpointKey::from("10.244.1.7".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(&k.addr[..4], &[10, 244, 1, 7]);
        assert!(k.addr[4..].iter().all(|b| *b == 0));
        assert_eq!(k.family, FAMILY_IPV4);
        assert_eq!(k.to_string(), "10.244.1.7");
        let k6 = EndpointKey::from("fd00::1".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(k6.to_string(), "fd00::1");
    }

    #[cfg(any(feature = "user", feature = "api"))]
    #[test]
    fn mac_parse_and_format() {
        let m = parse_mac("0a:1b:2c:3d:4e:5f").unwrap();
        assert_eq!(format_mac(&m), "0a:1b:2c:3d:4e:5f");
        assert_eq!(parse_mac("0a:1b:2c:3d:4e"), None);
        assert_eq!(parse_mac("0a:1b:2c:3d:4e:5f:00"), None);
        assert_eq!(parse_mac("0a:1b:2c:3d:4e:zz"), None);
    }
}
