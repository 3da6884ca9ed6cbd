//! The one table of programs: name, kind, and where the agent attaches it.
//!
//! The loader, the restart adoption, the detach on cleanup, the CLI and the
//! tests all walk [`PROGRAMS`]; a program the object lacks (or one the
//! object has and the table does not) stops the agent at start.

/// Kernel program names are capped at 15 characters.
pub const PROG_LXC_FROM_CTR: &str = "lxc_from_ctr";
pub const PROG_LXC_TO_CTR: &str = "lxc_to_ctr";
pub const PROG_OVERLAY_IN: &str = "overlay_in";
pub const PROG_OVERLAY_OUT: &str = "overlay_out";
pub const PROG_HOST_IN: &str = "host_in";
pub const PROG_HOST_XDP: &str = "host_xdp";
pub const PROG_HOST_OUT: &str = "host_out";
pub const PROG_FROM_HOST: &str = "from_host";
pub const PROG_SOCK_CONNECT4: &str = "sock_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "sock_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "sock_recvmsg4";
pub const PROG_SOCK_GETPEERNAME4: &str = "sock_peername4";

/// How a program hooks into the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgKind {
    TcIngress,
    TcEgress,
    Xdp,
    CgroupConnect4,
    CgroupSendmsg4,
    CgroupRecvmsg4,
    CgroupGetpeername4,
}

impl ProgKind {
    pub const fn name(self) -> &'static str {
        match self {
            ProgKind::TcIngress => "tc-ingress",
            ProgKind::TcEgress => "tc-egress",
            ProgKind::Xdp => "xdp",
            ProgKind::CgroupConnect4 => "cgroup-connect4",
            ProgKind::CgroupSendmsg4 => "cgroup-sendmsg4",
            ProgKind::CgroupRecvmsg4 => "cgroup-recvmsg4",
            ProgKind::CgroupGetpeername4 => "cgroup-getpeername4",
        }
    }

    pub const fn is_tc(self) -> bool {
        matches!(self, ProgKind::TcIngress | ProgKind::TcEgress)
    }

    pub const fn is_cgroup(self) -> bool {
        matches!(
            self,
            ProgKind::CgroupConnect4
                | ProgKind::CgroupSendmsg4
                | ProgKind::CgroupRecvmsg4
                | ProgKind::CgroupGetpeername4
        )
    }
}

/// What the agent attaches a program to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachPoint {
    /// Each pod's host-side veth, when the pod is registered.
    EndpointVeth,
    /// The node's uplink (`--uplink`).
    Uplink,
    /// The VXLAN device, in VXLAN mode only.
    TunnelDevice,
    /// The node's host device (`dp_host`): the node's own traffic to
    /// Services is routed into it.
    HostDevice,
    /// The node's cgroup v2 root (`--cgroup-root`).
    Cgroup,
}

impl AttachPoint {
    pub const fn name(self) -> &'static str {
        match self {
            AttachPoint::EndpointVeth => "pod veth",
            AttachPoint::Uplink => "uplink",
            AttachPoint::TunnelDevice => "vxlan device",
            AttachPoint::HostDevice => "host device",
            AttachPoint::Cgroup => "cgroup",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ProgSpec {
    pub name: &'static str,
    pub kind: ProgKind,
    pub attach: AttachPoint,
    pub description: &'static str,
}

pub const PROGRAMS: &[ProgSpec] = &[
    ProgSpec {
        name: PROG_LXC_FROM_CTR,
        kind: ProgKind::TcIngress,
        attach: AttachPoint::EndpointVeth,
        description: "what a pod sends: source check, gateway ARP, routing",
    },
    ProgSpec {
        name: PROG_LXC_TO_CTR,
        kind: ProgKind::TcEgress,
        attach: AttachPoint::EndpointVeth,
        description: "what the host stack delivers to a pod",
    },
    ProgSpec {
        name: PROG_OVERLAY_IN,
        kind: ProgKind::TcIngress,
        attach: AttachPoint::TunnelDevice,
        description: "decapsulated packets: tunnel peer check, delivery to pods",
    },
    ProgSpec {
        name: PROG_OVERLAY_OUT,
        kind: ProgKind::TcEgress,
        attach: AttachPoint::TunnelDevice,
        description: "stack traffic into the tunnel: picks the remote node",
    },
    ProgSpec {
        name: PROG_HOST_IN,
        kind: ProgKind::TcIngress,
        attach: AttachPoint::Uplink,
        description: "traffic arriving on the uplink: native delivery to pods",
    },
    ProgSpec {
        name: PROG_HOST_OUT,
        kind: ProgKind::TcEgress,
        attach: AttachPoint::Uplink,
        description: "leaving by the uplink: egress masquerade of pods' traffic",
    },
    ProgSpec {
        name: PROG_FROM_HOST,
        kind: ProgKind::TcEgress,
        attach: AttachPoint::HostDevice,
        description: "the node's own traffic to Services: translation and forwarding",
    },
    ProgSpec {
        name: PROG_HOST_XDP,
        kind: ProgKind::Xdp,
        attach: AttachPoint::Uplink,
        description: "XDP on the uplink: counts what arrives, by verdict",
    },
    ProgSpec {
        name: PROG_SOCK_CONNECT4,
        kind: ProgKind::CgroupConnect4,
        attach: AttachPoint::Cgroup,
        description: "IPv4 connect() in the node's cgroup: a Service address becomes a backend's (socket LB)",
    },
    ProgSpec {
        name: PROG_SOCK_SENDMSG4,
        kind: ProgKind::CgroupSendmsg4,
        attach: AttachPoint::Cgroup,
        description: "IPv4 sendmsg() on unconnected UDP sockets: a Service address becomes a backend's",
    },
    ProgSpec {
        name: PROG_SOCK_RECVMSG4,
        kind: ProgKind::CgroupRecvmsg4,
        attach: AttachPoint::Cgroup,
        description: "IPv4 recvmsg(): a reply from a backend shows the Service address asked for",
    },
    ProgSpec {
        name: PROG_SOCK_GETPEERNAME4,
        kind: ProgKind::CgroupGetpeername4,
        attach: AttachPoint::Cgroup,
        description: "IPv4 getpeername(): a connected socket shows the Service address asked for",
    },
];

impl ProgSpec {
    pub fn by_name(name: &str) -> Option<&'static ProgSpec> {
        PROGRAMS.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for p in PROGRAMS {
            assert!(p.name.len() <= 15, "{} is too long for the kernel", p.name);
            assert!(seen.insert(p.name), "{} twice", p.name);
            assert_eq!(
                p.kind.is_cgroup(),
                p.attach == AttachPoint::Cgroup,
                "{}",
                p.name
            );
        }
    }
}
