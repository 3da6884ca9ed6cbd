//! The pod's gateway answers ARP: a pod that flushed its neighbour table (or
//! never had the entry the CNI plugin installs) still reaches 169.254.1.1.
//! The reply carries the host-side veth's MAC, from the endpoint entry of
//! the sender, which must be the pod on this very veth.

use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::bpf_redirect, programs::TcContext};
use dataplane_common::{EndpointKey, Reason};

use crate::{endpoints, parse::ETH_HLEN, verdict::Verdict};

pub const GATEWAY: [u8; 4] = [169, 254, 1, 1];
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

/// An Ethernet/IPv4 ARP body, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Arp {
    htype: [u8; 2],
    ptype: [u8; 2],
    hlen: u8,
    plen: u8,
    oper: [u8; 2],
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

/// ARP from a pod: requests for the gateway are answered here; anything
/// else goes to the host, which never answers on a pod veth.
#[inline(never)]
pub fn from_pod(ctx: &mut TcContext, ifindex: u32) -> Verdict {
    Verdict::from_result(try_from_pod(ctx, ifindex))
}

#[inline(always)]
fn try_from_pod(ctx: &mut TcContext, ifindex: u32) -> Result<Verdict, Reason> {
    let a: Arp = ctx.load(ETH_HLEN).map_err(|_| Reason::Malformed)?;
    if u16::from_be_bytes(a.htype) != 1
        || u16::from_be_bytes(a.ptype) != 0x0800
        || a.hlen != 6
        || a.plen != 4
    {
        return Err(Reason::Malformed);
    }
    if u16::from_be_bytes(a.oper) != ARP_REQUEST || a.tpa != GATEWAY {
        return Ok(Verdict::pass());
    }
    let ep = match endpoints::lookup(&EndpointKey::v4(a.spa)) {
        Some(ep) if ep.ifindex == ifindex => ep,
        _ => return Err(Reason::SourceSpoofed),
    };
    let reply = Arp {
        oper: ARP_REPLY.to_be_bytes(),
        sha: ep.host_mac,
        spa: GATEWAY,
        tha: a.sha,
        tpa: a.spa,
        ..a
    };
    ctx.store(ETH_HLEN, &reply, 0)
        .map_err(|_| Reason::HelperFailed)?;
    let [m0, m1, m2, m3, m4, m5] = a.sha;
    let [h0, h1, h2, h3, h4, h5] = ep.host_mac;
    ctx.store(0, &[m0, m1, m2, m3, m4, m5, h0, h1, h2, h3, h4, h5], 0)
        .map_err(|_| Reason::HelperFailed)?;
    // SAFETY: plain helper call: out of the veth again, into the pod.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action == i64::from(TC_ACT_REDIRECT) {
        Ok(Verdict::redirect())
    } else {
        Err(Reason::HelperFailed)
    }
}
