//! cgroup socket hooks on the node's cgroup (socket LB): a TCP connect or
//! a UDP send to a Service goes to a backend before any packet exists, so
//! the packets carry the backend's address from the first one and need no
//! per-packet translation; getpeername and recvmsg show the application the
//! Service address it asked for. The backend is chosen from the same maps
//! and by the same rules as the per-packet path, session affinity keyed on
//! the pod's address (known by its network namespace). Frontends with a
//! Maglev table, sockets with no backend to go to, and everything the hooks
//! cannot see (other nodes, sockets older than the agent) are left to the
//! per-packet path, which keeps their semantics.

use aya_ebpf::{
    btf_maps::{HashMap, LruHashMap},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use dataplane_common::{
    DP_F_SOCKET_LB, Direction, Hook, IPPROTO_TCP, IPPROTO_UDP, Reason, SCOPE_INTERNAL,
    SOCK_CLIENTS_MAX, SOCK_REV_MAX, SVC_F_AFFINITY, SVC_F_MAGLEV, SockClient, SockRevKey,
    SockRevValue,
};

use crate::{config, ct, l4::Flow, lb, metrics, svc};

#[btf_map(name = "dp_sock_clients")]
static SOCK_CLIENTS: HashMap<u64, SockClient, { SOCK_CLIENTS_MAX as usize }> = HashMap::new();

#[btf_map(name = "dp_sock_rev")]
static SOCK_REV: LruHashMap<SockRevKey, SockRevValue, { SOCK_REV_MAX as usize }> =
    LruHashMap::new();

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx);
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_peername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    1
}

/// The socket's destination: a Service frontend becomes one of its
/// backends, remembered for [`reverse`]. Counted as forwarded either way.
#[inline(never)]
fn translate(ctx: &SockAddrContext) {
    metrics::count_verdict(
        Hook::Sock,
        Direction::FromEndpoint,
        Reason::Forwarded as u32,
        0,
    );
    if !config::get().is_ok_and(|c| c.flags & DP_F_SOCKET_LB != 0) {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed; these fields are readable in
    // every sock_addr hook. Words keep the wire's bytes, as in `Flow`.
    let (addr, port, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return;
    }
    let mut flow = Flow {
        saddr: 0,
        daddr: addr,
        sport: 0,
        dport: port,
        proto,
        tcp_flags: 0,
        frag: 0,
        has_ports: true,
        l4_off: 0,
        dry: false,
        trace: false,
        src_identity: 0,
    };
    let Some((key, fe)) = svc::frontend(&flow, SCOPE_INTERNAL) else {
        return;
    };
    // Maglev hashes the client's port, which a socket may not have yet: the
    // per-packet path serves those frontends. Affinity keys on the client's
    // address: the pod's (or node's) that the namespace belongs to, as the
    // agent registered it; an unknown namespace is left to the packet path.
    if fe.flags & SVC_F_MAGLEV != 0 {
        return;
    }
    if fe.flags & SVC_F_AFFINITY != 0 {
        match client(ctx) {
            Some(addr) => flow.saddr = addr,
            None => return,
        }
    }
    // No backend: the per-packet path refuses the flow as it always does.
    let Ok((_, b)) = lb::select(&flow, &key, fe) else {
        return;
    };
    let baddr = ct::v4(&b.addr);
    // SAFETY: a socket cookie for the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rev = SockRevKey {
        cookie,
        addr: baddr.to_ne_bytes(),
        port: b.port,
        _pad: [0; 2],
    };
    let was = SockRevValue {
        addr: addr.to_ne_bytes(),
        port: port.to_ne_bytes(),
        _pad: [0; 2],
        frontend_id: fe.id,
        _pad2: 0,
    };
    // Without its reverse entry the application would see the backend: do
    // not translate then.
    if SOCK_REV.insert(rev, was, 0).is_err() {
        return;
    }
    // SAFETY: user_ip4 and user_port are writable in connect4 and sendmsg4.
    unsafe {
        (*sa).user_ip4 = baddr;
        (*sa).user_port = u32::from(u16::from_ne_bytes(b.port));
    }
}

/// The address the socket's network namespace sends from, if the agent
/// registered it.
#[inline(always)]
fn client(ctx: &SockAddrContext) -> Option<u32> {
    // SAFETY: the netns cookie of the context's socket.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: values are written whole by the agent.
    unsafe { SOCK_CLIENTS.get(&cookie) }.map(|c| u32::from_ne_bytes(c.addr))
}

/// A backend's address shown to the application: the Service address its
/// socket was translated from, if it was.
#[inline(never)]
fn reverse(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel passed.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(sa.cast()) };
    let key = SockRevKey {
        cookie,
        addr: addr.to_ne_bytes(),
        port: port.to_ne_bytes(),
        _pad: [0; 2],
    };
    // SAFETY: entries are written whole (insert), never in place.
    if let Some(v) = unsafe { SOCK_REV.get(key) } {
        // SAFETY: user_ip4 and user_port are writable in recvmsg4 and
        // getpeername4.
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes(v.addr);
            (*sa).user_port = u32::from(u16::from_ne_bytes(v.port));
        }
    }
}
