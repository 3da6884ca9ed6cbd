//! The one table of verdict reasons.
//!
//! Every packet a program handles ends in exactly one reason: `Forwarded` or
//! a named drop. Programs count it in [`crate::MAP_METRICS`] and the CLI,
//! metrics endpoint and monitor render the same names from this table.

macro_rules! reasons {
    ($( $(#[$doc:meta])* $variant:ident = $code:literal, $name:literal, $desc:literal; )+) => {
        /// Why a packet left a program the way it did. Codes are stable: they are
        /// stored in maps and events, so never renumber, only append.
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $( $(#[$doc])* $variant = $code, )+
        }

        impl Reason {
            /// All reasons, in code order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant),+];

            /// The reason with this code, if it is one.
            pub const fn from_code(code: u8) -> Option<Reason> {
                match code {
                    $( $code => Some(Reason::$variant), )+
                    _ => None,
                }
            }

            /// Short machine-friendly name (metrics label, CLI column).
            pub const fn name(self) -> &'static str {
                match self { $( Reason::$variant => $name, )+ }
            }

            /// One line for a person reading a drop.
            pub const fn description(self) -> &'static str {
                match self { $( Reason::$variant => $desc, )+ }
            }
        }
    };
}

reasons! {
    /// Passed on (to the stack, a device or a peer).
    Forwarded = 0, "forwarded", "packet passed on";
    /// Headers shorter than they claim, or not parseable.
    Malformed = 1, "malformed", "packet headers truncated or invalid";
    /// An L3 protocol the datapath does not handle.
    UnsupportedL3 = 2, "unsupported_l3", "L3 protocol not handled by the datapath";
    /// Destination is in no endpoint, node or service map.
    UnknownDestination = 3, "unknown_destination", "destination address is in no map";
    /// Source address is not one the sending endpoint owns.
    SourceSpoofed = 4, "source_spoofed", "source address not owned by the sending endpoint";
    /// Denied by network policy.
    PolicyDenied = 5, "policy_denied", "denied by network policy";
    /// A helper (redirect, encap, FIB) failed.
    HelperFailed = 6, "helper_failed", "kernel helper call failed";
    /// The packet does not fit the path MTU and may not be fragmented.
    FragNeeded = 7, "frag_needed", "packet larger than path MTU with DF set";
    /// Forwarding would take the TTL to zero.
    TtlExceeded = 8, "ttl_exceeded", "TTL expired while forwarding";
    /// The datapath has no configuration yet (agent still starting).
    NotConfigured = 9, "not_configured", "datapath configuration missing";
    /// A VXLAN packet whose outer source is not a node of the cluster.
    TunnelPeerUnknown = 10, "unknown_tunnel_peer", "VXLAN packet from an address that is not a cluster node";
    /// A decapsulated packet whose inner source is neither the sending node
    /// nor inside that node's pod CIDR.
    TunnelSourceMismatch = 11, "tunnel_source_mismatch", "decapsulated source does not belong to the sending node";
    /// A VXLAN packet with a network identifier this node does not use.
    TunnelVniMismatch = 12, "unknown_vni", "VXLAN packet with a VNI this node does not use";
    /// IPv6 from a pod, from an address it owns: not routed yet.
    Ipv6Unsupported = 13, "ipv6_unsupported", "IPv6 is not routed by the datapath yet";
    /// To the Service range, but no Service has that address and port.
    NoService = 14, "no_service", "no Service at this address and port";
    /// A Service with no usable endpoint: refused (ICMP port unreachable).
    ServiceNoBackend = 15, "service_no_backend", "Service has no usable endpoint; the client was refused";
    /// externalTrafficPolicy Local, and no endpoint on this node.
    NoLocalBackend = 16, "no_local_backend", "traffic policy Local and no endpoint on this node";
    /// A non-first IPv4 fragment whose first fragment was not seen.
    FragNotTracked = 17, "frag_not_tracked", "fragment of a datagram whose first fragment was not seen";
    /// No free NAT port toward that remote endpoint.
    NatPortsExhausted = 18, "nat_ports_exhausted", "no free NAT port toward the remote endpoint";
    /// TCP/UDP/ICMP header shorter than the protocol needs.
    L4Malformed = 19, "l4_malformed", "transport header truncated";
    /// From a source prefix the operator denies (`--deny-cidr`, `dataplane
    /// prefilter`): dropped on the uplink before the stack sees it.
    PrefilterDenied = 20, "prefilter_denied", "source address in a denied prefix (prefilter)";
}

impl Reason {
    pub const fn is_drop(self) -> bool {
        !matches!(self, Reason::Forwarded)
    }
}

/// The kind of hook that gave a verdict: the same packet may pass XDP and
/// then TC on one device, and is counted once per hook.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    /// tc (tcx or clsact) programs on pod veths, the uplink and the tunnel device.
    Tc = 0,
    /// XDP on the uplink, before the stack allocates an skb.
    Xdp = 1,
    /// cgroup socket hooks (connect, sendmsg, ...): no packet yet, bytes are 0.
    Sock = 2,
}

impl Hook {
    pub const ALL: &'static [Hook] = &[Hook::Tc, Hook::Xdp, Hook::Sock];

    pub const fn from_code(code: u8) -> Option<Hook> {
        match code {
            0 => Some(Hook::Tc),
            1 => Some(Hook::Xdp),
            2 => Some(Hook::Sock),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Hook::Tc => "tc",
            Hook::Xdp => "xdp",
            Hook::Sock => "sock",
        }
    }
}

/// Which way a packet was travelling relative to the hook that saw it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Leaving a pod (tc ingress on its host-side veth).
    FromEndpoint = 0,
    /// Entering a pod (tc egress on its host-side veth).
    ToEndpoint = 1,
    /// Arriving from the network on a node device.
    FromNetwork = 2,
    /// Leaving to the network on a node device.
    ToNetwork = 3,
    /// Sent by the node's own processes into the datapath (its host device).
    FromHost = 4,
}

impl Direction {
    pub const ALL: &'static [Direction] = &[
        Direction::FromEndpoint,
        Direction::ToEndpoint,
        Direction::FromNetwork,
        Direction::ToNetwork,
        Direction::FromHost,
    ];

    pub const fn from_code(code: u8) -> Option<Direction> {
        match code {
            0 => Some(Direction::FromEndpoint),
            1 => Some(Direction::ToEndpoint),
            2 => Some(Direction::FromNetwork),
            3 => Some(Direction::ToNetwork),
            4 => Some(Direction::FromHost),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Direction::FromEndpoint => "from-endpoint",
            Direction::ToEndpoint => "to-endpoint",
            Direction::FromNetwork => "from-network",
            Direction::ToNetwork => "to-network",
            Direction::FromHost => "from-host",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_names_are_unique() {
        let mut names = std::collections::HashSet::new();
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u8 as usize, i, "codes must be dense and in order");
            assert_eq!(Reason::from_code(*r as u8), Some(*r));
            assert!(names.insert(r.name()), "duplicate name {}", r.name());
        }
        assert_eq!(Reason::from_code(Reason::ALL.len() as u8), None);
        for d in Direction::ALL {
            assert_eq!(Direction::from_code(*d as u8), Some(*d));
        }
        for h in Hook::ALL {
            assert_eq!(Hook::from_code(*h as u8), Some(*h));
        }
    }
}
