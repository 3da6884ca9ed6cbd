//! cgroup socket hooks on the node's cgroup: every IPv4 connect() of the
//! node's processes passes here. For now it counts and lets it through;
//! socket-level Service load-balancing will translate here.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use dataplane_common::{Direction, Hook, Reason};

use crate::metrics;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(_ctx: SockAddrContext) -> i32 {
    metrics::count_verdict(
        Hook::Sock,
        Direction::FromEndpoint,
        Reason::Forwarded as u32,
        0,
    );
    1
}
