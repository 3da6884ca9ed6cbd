//! The other nodes of the cluster: where their pods live and how to reach
//! them.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    pub ip: Ipv4Addr,
    pub pod_cidr: Ipv4Network,
}
