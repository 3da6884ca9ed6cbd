//! The forwarding decision for an IPv4 destination, in one place for every
//! program: a local endpoint, a tunnel to another node, or the host stack.

use dataplane_common::{
    DatapathConfig, EP_F_LOCAL, EndpointInfo, EndpointKey, IPCACHE_KIND_HOST,
    IPCACHE_KIND_NO_MASQUERADE, IPCACHE_KIND_REMOTE_HOST, IPCACHE_KIND_REMOTE_PODS,
    IPCACHE_KIND_SERVICES, IpcacheEntry, MODE_VXLAN, Reason,
};

use crate::{config, endpoints, ipcache};

pub enum Route {
    Local(&'static EndpointInfo),
    /// Through the VXLAN device to the node in the entry: to its pods, and in
    /// VXLAN mode to the node's own address too, so that a pod's address
    /// never crosses the underlay outside the tunnel.
    Tunnel(&'static IpcacheEntry, &'static DatapathConfig),
    /// This node's own addresses.
    Host,
    /// The host stack routes: other nodes in native routing (the agent's
    /// routes), and addresses outside the cluster.
    Stack,
}

#[inline(always)]
pub fn v4(dst: [u8; 4]) -> Result<Route, Reason> {
    if let Some(ep) = endpoints::lookup(&EndpointKey::v4(dst))
        && ep.flags & EP_F_LOCAL != 0
    {
        return Ok(Route::Local(ep));
    }
    match ipcache::lookup_v4(dst) {
        None => Ok(Route::Stack),
        Some(e) if e.kind == IPCACHE_KIND_HOST => Ok(Route::Host),
        Some(e) if e.kind == IPCACHE_KIND_NO_MASQUERADE => Ok(Route::Stack),
        // What was not translated to a backend has no business here.
        Some(e) if e.kind == IPCACHE_KIND_SERVICES => Err(Reason::NoService),
        Some(e) if e.kind == IPCACHE_KIND_REMOTE_PODS || e.kind == IPCACHE_KIND_REMOTE_HOST => {
            let cfg = config::get()?;
            if cfg.mode == MODE_VXLAN {
                Ok(Route::Tunnel(e, cfg))
            } else {
                Ok(Route::Stack)
            }
        }
        // In the cluster range but no endpoint and no node: never let it
        // reach the underlay.
        Some(_) => Err(Reason::UnknownDestination),
    }
}
