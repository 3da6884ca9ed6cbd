//! Rewriting addresses and ports with every checksum kept right: the IPv4
//! header's, and TCP's and UDP's (their pseudo-header covers the
//! addresses), also when offloaded (CHECKSUM_PARTIAL); a UDP checksum of
//! zero (none) stays zero. ICMP echo identifiers stand for ports.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use dataplane_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::{l4::Flow, parse::ETH_HLEN};

const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SADDR: usize = ETH_HLEN + 12;
const IP_DADDR: usize = ETH_HLEN + 16;

/// Where the transport checksum is, and the flags its updates need.
#[inline(always)]
fn l4_csum(flow: &Flow) -> Option<(usize, u64)> {
    let off = flow.l4_off as usize;
    match flow.proto {
        IPPROTO_TCP => Some((off + 16, 0)),
        IPPROTO_UDP => Some((off + 6, u64::from(BPF_F_MARK_MANGLED_0))),
        IPPROTO_ICMP => Some((off + 2, 0)),
        _ => None,
    }
}

/// Rewrites the source (`src` true) or destination address and port of the
/// packet `flow` describes, and updates `flow` to match.
#[inline(always)]
pub fn rewrite(
    ctx: &mut TcContext,
    flow: &mut Flow,
    src: bool,
    addr: u32,
    port: u16,
) -> Result<(), Reason> {
    let (old_addr, old_port) = if src {
        (flow.saddr, flow.sport)
    } else {
        (flow.daddr, flow.dport)
    };
    let l4 = if flow.has_l4_header() {
        l4_csum(flow)
    } else {
        None
    };
    if old_addr != addr {
        ctx.l3_csum_replace(IP_CSUM, u64::from(old_addr), u64::from(addr), 4)
            .map_err(|_| Reason::HelperFailed)?;
        // ICMP has no pseudo-header.
        if let Some((csum, flags)) = l4
            && flow.proto != IPPROTO_ICMP
        {
            ctx.l4_csum_replace(
                csum,
                u64::from(old_addr),
                u64::from(addr),
                flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
            )
            .map_err(|_| Reason::HelperFailed)?;
        }
        ctx.store(if src { IP_SADDR } else { IP_DADDR }, &addr, 0)
            .map_err(|_| Reason::HelperFailed)?;
    }
    if old_port != port
        && let Some((csum, flags)) = l4
    {
        // TCP and UDP: the port's own field. ICMP echo: the identifier, at
        // 4, whichever way the echo goes.
        let off = flow.l4_off as usize
            + match (flow.proto, src) {
                (IPPROTO_ICMP, _) => 4,
                (_, true) => 0,
                (_, false) => 2,
            };
        ctx.l4_csum_replace(csum, u64::from(old_port), u64::from(port), flags | 2)
            .map_err(|_| Reason::HelperFailed)?;
        ctx.store(off, &port, 0).map_err(|_| Reason::HelperFailed)?;
    }
    if src {
        flow.saddr = addr;
        flow.sport = port;
    } else {
        flow.daddr = addr;
        flow.dport = port;
    }
    Ok(())
}
