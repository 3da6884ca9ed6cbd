//! VXLAN: the external-mode device encapsulates with the tunnel key a
//! program sets on the packet; on the way in, the key tells who sent it.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, bpf_tunnel_key},
    helpers::{bpf_check_mtu, bpf_redirect, bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use dataplane_common::{
    DatapathConfig, FAMILY_IPV4, IDENTITY_FIRST_POD, IDENTITY_MAX, IpcacheEntry, Reason,
};

use crate::verdict::Verdict;

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

/// The outer source address (network byte order) and VNI of a decapsulated
/// packet.
#[inline(always)]
pub fn get_key(ctx: &TcContext) -> Result<([u8; 4], u32), Reason> {
    // SAFETY: all-zero is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: valid context and key of the size we pass.
    let rc = unsafe {
        bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            0,
        )
    };
    if rc != 0 {
        return Err(Reason::TunnelPeerUnknown);
    }
    // SAFETY: an IPv4 key was asked for (flags 0), so this member is set.
    let remote = unsafe { key.__bindgen_anon_1.remote_ipv4 };
    Ok((remote.to_be_bytes(), key.tunnel_id))
}

/// Whether the packet fits the VXLAN device's MTU (segment by segment for
/// GSO packets); `Err(mtu)` when it does not.
#[inline(always)]
pub fn fits(ctx: &TcContext, cfg: &DatapathConfig) -> Result<(), u32> {
    let mut mtu: u32 = 0;
    // SAFETY: valid context; `mtu` is our out-parameter (0 in: use skb->len).
    let rc = unsafe {
        bpf_check_mtu(
            ctx.skb.skb.cast(),
            cfg.vxlan_ifindex,
            &mut mtu,
            0,
            u64::from(BPF_MTU_CHK_SEGS),
        )
    };
    if rc == 0 { Ok(()) } else { Err(mtu) }
}

/// Sets the key and sends the packet out of the VXLAN device. The VNI
/// carries the source's security identity when the source is a pod of
/// this node (`identity`, as Cilium does), else the configured VNI.
#[inline(always)]
pub fn redirect(
    ctx: &TcContext,
    node: &IpcacheEntry,
    cfg: &DatapathConfig,
    identity: u32,
) -> Result<Verdict, Reason> {
    let vni = if identity >= IDENTITY_FIRST_POD && identity <= IDENTITY_MAX {
        identity
    } else {
        cfg.vni
    };
    set_key(ctx, node, vni)?;
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(cfg.vxlan_ifindex, 0) };
    if action == i64::from(TC_ACT_REDIRECT) {
        Ok(Verdict::redirect())
    } else {
        Err(Reason::HelperFailed)
    }
}
