//! Services, conntrack and NAT: the maps that the per-packet path, the
//! socket hooks and XDP (Service acceleration) all share.
//!
//! A frontend (a Service address and port, seen from inside or outside the
//! node) has a master entry in [`MAP_SERVICES`] at slot 0 and its backends'
//! ids at slots 1..=count, so a random choice is two lookups. Frontends
//! reached from outside the cluster carry a Maglev table of their own in
//! [`MAP_MAGLEV`]; ClusterIPs do not pay for one. Every address has room for
//! IPv6 (16 bytes and a family); every backend has a security identity.
//!
//! [`MAP_CT`] holds both directions of every translated flow: the entry found
//! for a packet says how to rewrite it (and the reply entry undoes it).

/// Frontends and their backend slots: [`ServiceKey`] -> [`ServiceValue`].
pub const MAP_SERVICES: &str = "dp_services";
/// Backends by id: `u32` -> [`Backend`].
pub const MAP_BACKENDS: &str = "dp_backends";
/// Maglev tables of externally reachable frontends, by frontend id: `u32` ->
/// an array of backend ids (hash of maps).
pub const MAP_MAGLEV: &str = "dp_maglev";
/// Session affinity (ClientIP), LRU: [`AffinityKey`] -> [`AffinityValue`].
pub const MAP_AFFINITY: &str = "dp_affinity";
/// Socket LB's reverse translations, LRU: [`SockRevKey`] (a socket and
/// the backend it was sent to) -> [`SockRevValue`] (the Service address the
/// application asked for).
pub const MAP_SOCK_REV: &str = "dp_sock_rev";
/// Who a socket's network namespace is, for socket LB: netns cookie ->
/// [`SockClient`] (a local pod, or the node itself).
pub const MAP_SOCK_CLIENTS: &str = "dp_sock_clients";
/// Connection tracking and NAT, LRU: [`CtKey`] -> [`CtEntry`].
pub const MAP_CT: &str = "dp_ct";
/// Per-CPU room to build a new flow's entries in (the 512-byte BPF stack
/// is too small to hold them beside the packet path's own state): index 0
/// -> [`CtScratch`]. Only the programs use it.
pub const MAP_CT_SCRATCH: &str = "dp_ct_scratch";
/// Conntrack and NAT counters, per CPU: a `CT_STAT_*` index -> `u64`.
pub const MAP_CT_STATS: &str = "dp_ct_stats";
/// First fragments' ports, so later fragments follow their datagram, LRU:
/// [`FragKey`] -> [`FragValue`].
pub const MAP_FRAGS: &str = "dp_frags";

/// Frontends and backends take kernel memory as they are added, not all
/// up front: most clusters use a small part of the room.
pub const BPF_F_NO_PREALLOC: u32 = 1;

pub const SERVICES_MAX: u32 = 262_144;
pub const BACKENDS_MAX: u32 = 65_536;
pub const MAGLEV_MAX: u32 = 8_192;
pub const AFFINITY_MAX: u32 = 65_536;
pub const SOCK_REV_MAX: u32 = 131_072;
pub const SOCK_CLIENTS_MAX: u32 = 16_384;
pub const CT_MAX: u32 = 262_144;
pub const FRAGS_MAX: u32 = 8_192;
/// The largest Maglev table a frontend may have (a prime; the default is
/// [`MAGLEV_DEFAULT_SIZE`]). Inner tables are created at their own size.
pub const MAGLEV_MAX_SIZE: u32 = 65_521;
pub const MAGLEV_DEFAULT_SIZE: u32 = 16_381;

pub const IPPROTO_TCP: u8 = 6;
/// Compiled into NetworkPolicy rules; this kernel carries no SCTP traffic.
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;

/// Seen from outside the node (north-south: NodePort, LoadBalancer and
/// external IPs arriving on the uplink): external traffic policy, Maglev.
pub const SCOPE_EXTERNAL: u8 = 1;
/// Seen from this node's pods and processes: internal traffic policy, a
/// random backend per flow.
pub const SCOPE_INTERNAL: u8 = 2;

/// The frontend's backends are chosen with its Maglev table.
pub const SVC_F_MAGLEV: u16 = 1 << 0;
/// Session affinity by client address, for `affinity_timeout` seconds.
pub const SVC_F_AFFINITY: u16 = 1 << 1;
/// Only this node's endpoints are backends (a traffic policy of Local):
/// with none, traffic is dropped (`no_local_backend`) instead of rejected.
pub const SVC_F_LOCAL: u16 = 1 << 2;
/// A NodePort: the key's address is zero and stands for every node address.
pub const SVC_F_NODEPORT: u16 = 1 << 3;

/// A frontend (slot 0) or one of its backends (slot 1..=count).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend address, network byte order (IPv4 in the first 4 bytes);
    /// all zero for a NodePort (any node address).
    pub addr: [u8; 16],
    /// Frontend port, network byte order.
    pub port: [u8; 2],
    /// 0 for the frontend itself, 1..=count for its backends (host order).
    pub slot: u16,
    pub proto: u8,
    pub family: u8,
    /// [`SCOPE_EXTERNAL`] or [`SCOPE_INTERNAL`].
    pub scope: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 24);

impl ServiceKey {
    #[inline(always)]
    pub const fn v4(addr: [u8; 4], port: [u8; 2], proto: u8, scope: u8, slot: u16) -> Self {
        Self {
            addr: [
                addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
            port,
            slot,
            proto,
            family: crate::FAMILY_IPV4,
            scope,
            _pad: 0,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Slot 0: the frontend's id (affinity, Maglev table, conntrack).
    /// Slots 1..: a backend id in [`MAP_BACKENDS`].
    pub id: u32,
    /// Slot 0: backends in slots 1..=count; 0 means none usable.
    pub count: u16,
    /// Slot 0: `SVC_F_*`.
    pub flags: u16,
    /// Slot 0: session affinity timeout in seconds.
    pub affinity_timeout: u32,
    /// Slot 0, Maglev frontends: the size (a prime) of its table.
    pub maglev_size: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

/// The endpoint runs on this node.
pub const BE_F_LOCAL: u8 = 1 << 0;
/// The endpoint is terminating (used only when nothing else serves).
pub const BE_F_TERMINATING: u8 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Network byte order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: [u8; 2],
    pub proto: u8,
    pub family: u8,
    /// `BE_F_*`.
    pub flags: u8,
    pub _pad: [u8; 3],
    /// Security identity of the endpoint (policy); 0 until assigned.
    pub identity: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 28);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    /// The client, network byte order.
    pub client: [u8; 16],
    /// The frontend's id.
    pub id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 24);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns` of the last new flow that used it.
    pub last_used: u64,
    pub backend_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// The packet travels the way the flow started.
pub const CT_DIR_ORIG: u8 = 1;
/// The packet answers the flow.
pub const CT_DIR_REPLY: u8 = 2;

/// A flow as seen on the wire at the hook that tracks it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Network byte order.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network byte order; the ICMP echo identifier in `sport` (and `dport`
    /// zero) for ICMP echo.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub family: u8,
    /// [`CT_DIR_ORIG`] or [`CT_DIR_REPLY`].
    pub dir: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);

/// Rewrite the source to `src`/`sport` (SNAT; in replies, the frontend).
pub const CT_F_SRC: u16 = 1 << 0;
/// Rewrite the destination to `dst`/`dport` (DNAT; in replies, the client).
pub const CT_F_DST: u16 = 1 << 1;
/// A Service flow (`id` and `backend_id` are set).
pub const CT_F_SERVICE: u16 = 1 << 2;
/// Egress masquerade to the node's address.
pub const CT_F_MASQ: u16 = 1 << 3;
/// A pod reaching itself through a Service.
pub const CT_F_HAIRPIN: u16 = 1 << 4;
/// NodePort/LoadBalancer traffic SNATed to this node toward a backend
/// elsewhere.
pub const CT_F_NODEPORT_SNAT: u16 = 1 << 5;
/// TCP: a FIN or RST was seen; the flow is closing.
pub const CT_F_CLOSING: u16 = 1 << 6;
/// TCP: more than a SYN was seen in this direction.
pub const CT_F_ESTABLISHED: u16 = 1 << 7;
/// The reply direction of a flow a NetworkPolicy allowed: its packets pass
/// the other endpoint's isolation. No rewrite.
pub const CT_F_POLICY: u16 = 1 << 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns` after which the entry is dead.
    pub expires: u64,
    /// `bpf_ktime_get_ns` of the flow's first packet.
    pub created: u64,
    pub packets: u64,
    pub bytes: u64,
    /// The rewrite targets, network byte order.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// `CT_F_*`.
    pub flags: u16,
    pub _pad: u16,
    /// The frontend's id (Service flows).
    pub id: u32,
    /// The chosen backend's id (Service flows).
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 80);

/// Both directions of a flow being created.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtScratch {
    pub orig_key: CtKey,
    pub reply_key: CtKey,
    pub orig: CtEntry,
    pub reply: CtEntry,
}
const _: () = assert!(core::mem::size_of::<CtScratch>() == 240);

/// Conntrack entries created (pairs count twice).
pub const CT_STAT_CREATED: u32 = 0;
/// New NAT flows refused: no free port for that remote endpoint.
pub const CT_STAT_NAT_EXHAUSTED: u32 = 1;
/// Entries the programs removed or overwrote: dead ones whose key a new
/// flow reuses, and a translated flow's pair that a new connection on the
/// same ports retired (so that created - reclaimed - removed by the agent
/// - live = evicted).
pub const CT_STAT_RECLAIMED: u32 = 2;
pub const CT_STATS_MAX: u32 = 4;

/// Conntrack lifetimes, in seconds (Cilium's defaults).
pub const CT_SYN_TIMEOUT: u64 = 60;
pub const CT_TCP_TIMEOUT: u64 = 21_600;
pub const CT_CLOSE_TIMEOUT: u64 = 10;
pub const CT_UDP_TIMEOUT: u64 = 60;

/// Ports the node uses for SNAT (masquerade and NodePort toward other
/// nodes): above the kernel's ephemeral range, so no local socket takes one.
pub const NAT_PORT_MIN: u16 = 61_000;
pub const NAT_PORT_MAX: u16 = 65_535;

/// A pod reaching itself through a Service sees this source address.
pub const HAIRPIN_IPV4: [u8; 4] = [169, 254, 42, 1];

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The IPv4 identification (network byte order, in the first 2 bytes).
    pub id: [u8; 4],
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    /// Network byte order.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragValue>() == 4);

/// The flow hash both Maglev (in the kernel) and the tests compute: a
/// murmur3-style mix of the 5-tuple. Stable across nodes and releases: a
/// flow picks the same backend on every node.
#[inline(always)]
pub const fn flow_hash(
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
    proto: u8,
) -> u32 {
    const fn mix(h: u32, k: u32) -> u32 {
        let k = k
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        (h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64)
    }
    let mut h = 0x9747_b28c;
    h = mix(h, u32::from_le_bytes(saddr));
    h = mix(h, u32::from_le_bytes(daddr));
    h = mix(
        h,
        u32::from_le_bytes([sport[0], sport[1], dport[0], dport[1]]),
    );
    h = mix(h, proto as u32);
    h ^= 13;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use std::{fmt, net::IpAddr};

    /// The address in a 16-byte field of `family`.
    pub fn addr(bytes: &[u8; 16], family: u8) -> Option<IpAddr> {
        match family {
            crate::FAMILY_IPV4 => {
                let [a, b, c, d, ..] = *bytes;
                Some(IpAddr::from([a, b, c, d]))
            }
            crate::FAMILY_IPV6 => Some(IpAddr::from(*bytes)),
            _ => None,
        }
    }

    /// `ip:port` (`[ip]:port` for IPv6); `?` for an unknown family.
    fn endpoint(bytes: &[u8; 16], family: u8, port: [u8; 2]) -> String {
        let port = u16::from_be_bytes(port);
        match addr(bytes, family) {
            Some(IpAddr::V4(ip)) => format!("{ip}:{port}"),
            Some(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
            None => format!("?:{port}"),
        }
    }

    pub fn proto_name(proto: u8) -> String {
        match proto {
            IPPROTO_TCP => "tcp".into(),
            IPPROTO_UDP => "udp".into(),
            IPPROTO_ICMP => "icmp".into(),
            p => p.to_string(),
        }
    }

    pub fn scope_name(scope: u8) -> &'static str {
        match scope {
            SCOPE_EXTERNAL => "external",
            SCOPE_INTERNAL => "internal",
            _ => "?",
        }
    }

    impl ServiceKey {
        /// The frontend address; `None` for a NodePort (every node address).
        pub fn ip(&self) -> Option<IpAddr> {
            if self.addr == [0; 16] {
                return None;
            }
            addr(&self.addr, self.family)
        }

        pub fn port(&self) -> u16 {
            u16::from_be_bytes(self.port)
        }

        /// The frontend's master key (slot 0).
        pub fn master(&self) -> ServiceKey {
            ServiceKey { slot: 0, ..*self }
        }

        pub fn from_ip(ip: IpAddr, port: u16, proto: u8, scope: u8, slot: u16) -> ServiceKey {
            let (addr, family) = match ip {
                IpAddr::V4(v4) => {
                    let mut a = [0; 16];
                    a[..4].copy_from_slice(&v4.octets());
                    (a, crate::FAMILY_IPV4)
                }
                IpAddr::V6(v6) => (v6.octets(), crate::FAMILY_IPV6),
            };
            ServiceKey {
                addr,
                port: port.to_be_bytes(),
                slot,
                proto,
                family,
                scope,
                _pad: 0,
            }
        }
    }

    impl fmt::Display for ServiceKey {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let front = if self.ip().is_none() {
                format!("*:{}", self.port())
            } else {
                endpoint(&self.addr, self.family, self.port)
            };
            write!(
                f,
                "{front}/{} {} slot {}",
                proto_name(self.proto),
                scope_name(self.scope),
                self.slot
            )
        }
    }

    impl Backend {
        pub fn ip(&self) -> Option<IpAddr> {
            addr(&self.addr, self.family)
        }
    }

    impl fmt::Display for Backend {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "{}/{}",
                endpoint(&self.addr, self.family, self.port),
                proto_name(self.proto)
            )
        }
    }

    impl CtKey {
        pub fn src(&self) -> String {
            endpoint(&self.saddr, self.family, self.sport)
        }
        pub fn dst(&self) -> String {
            endpoint(&self.daddr, self.family, self.dport)
        }
    }

    impl fmt::Display for CtKey {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "{} {} -> {} {}",
                proto_name(self.proto),
                self.src(),
                self.dst(),
                if self.dir == CT_DIR_REPLY {
                    "reply"
                } else {
                    "orig"
                }
            )
        }
    }

    impl CtEntry {
        /// Where the entry rewrites the source and destination to, if it does.
        pub fn src_to(&self, family: u8) -> Option<String> {
            (self.flags & CT_F_SRC != 0).then(|| endpoint(&self.src, family, self.sport))
        }
        pub fn dst_to(&self, family: u8) -> Option<String> {
            (self.flags & CT_F_DST != 0).then(|| endpoint(&self.dst, family, self.dport))
        }

        /// The `CT_F_*` flags by name.
        pub fn flag_names(&self) -> Vec<&'static str> {
            [
                (CT_F_SERVICE, "service"),
                (CT_F_MASQ, "masquerade"),
                (CT_F_HAIRPIN, "hairpin"),
                (CT_F_NODEPORT_SNAT, "nodeport-snat"),
                (CT_F_POLICY, "policy-reply"),
                (CT_F_ESTABLISHED, "established"),
                (CT_F_CLOSING, "closing"),
            ]
            .into_iter()
            .filter(|(f, _)| self.flags & f != 0)
            .map(|(_, n)| n)
            .collect()
        }
    }
}
#[cfg(feature = "user")]
pub use user::{addr, proto_name, scope_name};

/// A socket (its cookie) and the backend the socket LB sent it to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockRevKey {
    pub cookie: u64,
    /// Network byte order.
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 16);

/// The Service address the application used, and the frontend's id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    /// Network byte order.
    pub addr: [u8; 4],
    /// Network byte order.
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    pub frontend_id: u32,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<SockRevValue>() == 16);

/// The address a network namespace's sockets send from: what affinity
/// keys on, as the per-packet path does with the packet's source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockClient {
    /// Network byte order.
    pub addr: [u8; 4],
    pub _pad: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<SockClient>() == 8);
