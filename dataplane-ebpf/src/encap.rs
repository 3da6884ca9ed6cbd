//! VXLAN: the external-mode device encapsulates with the tunnel key a
//! program sets on the packet.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, bpf_tunnel_key},
    helpers::{bpf_redirect, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use dataplane_common::{DatapathConfig, FAMILY_IPV4, IpcacheEntry, Reason};

#[inline(always)]
pub fn set_key(ctx: &TcContext, node: &IpcacheEntry, vni: u32) -> Result<(), Reason> {
    if node.tunnel_family != FAMILY_IPV4 {
        return Err(Reason::UnknownDestination);
    }
    let [a, b, c, d, ..] = node.tunnel_endpoint;
    // SAFETY: all-zero is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    // The helper takes the address in host byte order.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes([a, b, c, d]);
    key.tunnel_ttl = 64;
    // SAFETY: valid context and key of the size we pass.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Reason::HelperFailed)
    }
}

/// Sets the key and sends the packet out of the VXLAN device.
#[inline(always)]
pub fn redirect(ctx: &TcContext, node: &IpcacheEntry, cfg: &DatapathConfig) -> Result<i32, Reason> {
    set_key(ctx, node, cfg.vni)?;
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(cfg.vxlan_ifindex, 0) };
    if action == i64::from(TC_ACT_REDIRECT) {
        Ok(TC_ACT_REDIRECT)
    } else {
        Err(Reason::HelperFailed)
    }
}
