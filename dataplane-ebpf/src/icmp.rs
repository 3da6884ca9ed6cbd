//! ICMP errors the datapath answers with, as a router would: time exceeded
//! when forwarding would take the TTL to zero (traceroute), and
//! fragmentation needed with the next-hop MTU when a DF packet does not fit
//! the tunnel (path MTU discovery).
//!
//! The packet is rewritten in place into the error (RFC 792: the original IP
//! header and the first 8 bytes of its payload follow the ICMP header; all
//! of a TCP header),
//! sourced from the node's address, and sent back the way it came. No error
//! answers an ICMP error, a non-first fragment or a non-unicast source
//! (RFC 1122 3.2.2).

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{
        bpf_csum_diff, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_tail, bpf_skb_load_bytes,
    },
    programs::TcContext,
};
use dataplane_common::Reason;

use crate::{
    config, encap,
    parse::{self, ETH_HLEN, IP_OFFSET_MASK, IPPROTO_ICMP},
    route::{self, Route},
    verdict::Verdict,
};

pub const DEST_UNREACH: u8 = 3;
pub const PORT_UNREACH: u8 = 3;
pub const FRAG_NEEDED: u8 = 4;
pub const TIME_EXCEEDED: u8 = 11;

/// The longest quote: a 60-byte IP header and a 20-byte TCP header.
const MAX_QUOTE: usize = 80;
/// What the error puts in front of the quote: IPv4 (20) and ICMP (8).
const HDRS: usize = 28;

/// An error to send: type, code, and the next-hop MTU (frag needed only).
#[derive(Clone, Copy)]
pub struct Error(pub u32);

impl Error {
    /// The verdict that asks the entry point to answer with this error.
    #[inline(always)]
    pub fn verdict(self) -> Verdict {
        Verdict::answer(self.0, self.reason())
    }

    #[inline(always)]
    pub const fn time_exceeded() -> Self {
        Error((TIME_EXCEEDED as u32) << 24)
    }

    /// A Service without endpoints refuses, as kube-proxy's REJECT does;
    /// the error comes from the Service's address.
    #[inline(always)]
    pub const fn port_unreachable() -> Self {
        Error(((DEST_UNREACH as u32) << 24) | ((PORT_UNREACH as u32) << 16))
    }

    #[inline(always)]
    pub const fn frag_needed(mtu: u32) -> Self {
        Error(((DEST_UNREACH as u32) << 24) | ((FRAG_NEEDED as u32) << 16) | (mtu & 0xffff))
    }

    #[inline(always)]
    fn kind(self) -> u8 {
        (self.0 >> 24) as u8
    }

    #[inline(always)]
    fn code(self) -> u8 {
        (self.0 >> 16) as u8
    }

    #[inline(always)]
    fn mtu(self) -> u16 {
        self.0 as u16
    }

    /// What the packet the error answers is counted under.
    #[inline(always)]
    fn reason(self) -> Reason {
        match (self.kind(), self.code()) {
            (TIME_EXCEEDED, _) => Reason::TtlExceeded,
            (DEST_UNREACH, PORT_UNREACH) => Reason::ServiceNoBackend,
            _ => Reason::FragNeeded,
        }
    }

    /// The error speaks for the packet's destination (the Service), not for
    /// a router on the way.
    #[inline(always)]
    fn from_destination(self) -> bool {
        self.kind() == DEST_UNREACH && self.code() == PORT_UNREACH
    }
}

/// Answers a packet a local pod (or the node, through its host device)
/// sent: the error goes back through the device it came by (`ifindex`):
/// out of a pod's veth, into the pod, or (`flags` BPF_F_INGRESS) into the
/// host device, to the node's stack.
#[inline(never)]
pub fn answer_pod(ctx: &mut TcContext, ifindex: u32, err: u32, flags: u64) -> Verdict {
    let err = Error(err);
    if let Err(reason) = rewrite(ctx, err) {
        return Verdict::drop(reason);
    }
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(ifindex, flags) };
    if action != i64::from(TC_ACT_REDIRECT) {
        return Verdict::drop(Reason::HelperFailed);
    }
    Verdict::answered(err.reason(), TC_ACT_REDIRECT)
}

/// Answers a packet that arrived from the network: the error is routed
/// back to its source, through the tunnel or out of the uplink (the kernel
/// resolves the next hop).
#[inline(never)]
pub fn answer_network(ctx: &mut TcContext, err: u32) -> Verdict {
    let err = Error(err);
    if let Err(reason) = rewrite(ctx, err) {
        return Verdict::drop(reason);
    }
    let Ok(cfg) = config::get() else {
        return Verdict::drop(Reason::NotConfigured);
    };
    let dst = match parse::ipv4_daddr(ctx) {
        Ok(d) => d,
        Err(r) => return Verdict::drop(r),
    };
    let sent = match route::v4(dst) {
        Ok(Route::Tunnel(node, cfg)) => encap::redirect(ctx, node, cfg, 0),
        Ok(_) => {
            // SAFETY: plain helper call; no parameters: FIB lookup of the
            // destination, then neighbour resolution.
            let action =
                unsafe { bpf_redirect_neigh(cfg.uplink_ifindex, core::ptr::null_mut(), 0, 0) };
            if action == i64::from(TC_ACT_REDIRECT) {
                Ok(Verdict::redirect())
            } else {
                Err(Reason::HelperFailed)
            }
        }
        Err(r) => Err(r),
    };
    match sent {
        Ok(v) => Verdict::answered(err.reason(), v.action()),
        Err(r) => Verdict::drop(r),
    }
}

/// The ones' complement sum of `bytes` as native-order 16-bit words, the
/// way the kernel's csum helpers add, so the two can be combined.
#[inline(always)]
fn sum16(bytes: &[u8; 20], n: usize, mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < n && i + 1 < bytes.len() {
        acc += u32::from(u16::from_ne_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    acc
}

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn rewrite(ctx: &mut TcContext, err: Error) -> Result<(), Reason> {
    let cfg = config::get()?;
    let ip = parse::ipv4(ctx)?;
    let ihl = ip.len();
    if ip.frag_off() & IP_OFFSET_MASK != 0 {
        return Err(err.reason());
    }
    let [s0, ..] = ip.saddr;
    if s0 == 0 || s0 == 127 || s0 >= 224 {
        return Err(err.reason());
    }
    if ip.protocol == IPPROTO_ICMP {
        let t: u8 = ctx.load(ETH_HLEN + ihl).map_err(|_| Reason::Malformed)?;
        if matches!(t, 3 | 4 | 5 | 11 | 12) {
            return Err(err.reason());
        }
    }
    // RFC 792 asks for 8 bytes of payload; a TCP header is quoted whole.
    // The kernel will not cut a packet whose checksum it still has to fill
    // in (a pod's own TCP, CHECKSUM_PARTIAL) short of that checksum field.
    let mut quote = ihl
        + if ip.protocol == dataplane_common::IPPROTO_TCP {
            20
        } else {
            8
        };
    let tot = ip.tot_len();
    if tot < quote {
        quote = tot;
    }
    // Explicit bounds for the verifier: the quote is read into `buf` with a
    // variable length.
    if !(20..=MAX_QUOTE).contains(&quote) {
        return Err(Reason::Malformed);
    }
    let mut buf = [0u8; MAX_QUOTE];
    // SAFETY: `buf` has room for `quote` (at most MAX_QUOTE) bytes.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            ETH_HLEN as u32,
            buf.as_mut_ptr().cast(),
            quote as u32,
        )
    };
    if rc != 0 {
        return Err(Reason::Malformed);
    }
    let macs: [u8; 12] = ctx.load(0).map_err(|_| Reason::Malformed)?;

    // Cut the packet after the quote, then open room for the new headers
    // between the Ethernet and the (old) IP header.
    // SAFETY: valid context; the length keeps the headers the skb has.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + quote) as u32, 0) } != 0 {
        return Err(Reason::HelperFailed);
    }
    ctx.adjust_room(HDRS as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| Reason::HelperFailed)?;

    // Back the way it came: the MACs swap.
    let [d0, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5] = macs;
    ctx.store(0, &[s0, s1, s2, s3, s4, s5, d0, d1, d2, d3, d4, d5], 0)
        .map_err(|_| Reason::HelperFailed)?;

    let total = ((HDRS + quote) as u16).to_be_bytes();
    let [n0, n1, n2, n3] = if err.from_destination() {
        ip.daddr
    } else {
        cfg.node_ipv4
    };
    let [o0, o1, o2, o3] = ip.saddr;
    let mut hdr: [u8; 20] = [
        0x45,
        0,
        total[0],
        total[1],
        0,
        0,
        0,
        0,
        64,
        IPPROTO_ICMP,
        0,
        0,
        n0,
        n1,
        n2,
        n3,
        o0,
        o1,
        o2,
        o3,
    ];
    let csum = fold(u64::from(sum16(&hdr, 20, 0))).to_ne_bytes();
    hdr[10] = csum[0];
    hdr[11] = csum[1];
    ctx.store(ETH_HLEN, &hdr, 0)
        .map_err(|_| Reason::HelperFailed)?;

    let mtu = err.mtu().to_be_bytes();
    let mut icmp: [u8; 20] = [0; 20];
    icmp[0] = err.kind();
    icmp[1] = err.code();
    icmp[6] = mtu[0];
    icmp[7] = mtu[1];
    let seed = sum16(&icmp, 8, 0);
    // Zero padding up to a multiple of 4 adds nothing to the sum.
    let words = (quote + 3) & !3;
    if words > MAX_QUOTE {
        return Err(Reason::Malformed);
    }
    // SAFETY: `buf` holds `words` (<= MAX_QUOTE, a multiple of 4) bytes.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf.as_mut_ptr().cast(),
            words as u32,
            seed,
        )
    };
    if sum < 0 {
        return Err(Reason::HelperFailed);
    }
    let csum = fold(sum as u64).to_ne_bytes();
    let head: [u8; 8] = [
        icmp[0], icmp[1], csum[0], csum[1], icmp[4], icmp[5], icmp[6], icmp[7],
    ];
    ctx.store(ETH_HLEN + 20, &head, 0)
        .map_err(|_| Reason::HelperFailed)
}
