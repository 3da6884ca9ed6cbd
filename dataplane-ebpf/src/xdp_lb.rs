//! NodePort, LoadBalancer and external IPs served in XDP on the uplink,
//! before the stack allocates an skb: the same conntrack entries, Maglev
//! choice and SNAT port as tc's `host_in` (see [`svc::from_network_xdp`]),
//! and the packet sent back out of the uplink with `XDP_TX` when that is
//! where it goes: to a backend on another node (in the tunnel, whose outer
//! headers are built here, or routed natively). Only clients outside the
//! cluster are served here: everything else (senders in the cluster, such
//! as a backend's replies; backends and pods on this node, the node
//! itself, what needs an ICMP answer, fragments, IP options, a neighbour
//! not yet resolved) is passed on untouched, and tc does what it always
//! did. Checksums are patched incrementally: a frame off a wire carries
//! complete ones (XDP cannot see an skb's offload state).

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::{bpf_fib_lookup, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use dataplane_common::{
    CT_F_DST, CT_F_SRC, DP_F_XDP_LB, DatapathConfig, FAMILY_IPV4, IPCACHE_KIND_NO_MASQUERADE,
    IPPROTO_TCP, IPPROTO_UDP, IpcacheEntry, Reason,
};

use crate::{
    config,
    fwd::Pkt,
    ipcache,
    l4::{FRAG_NONE, Flow},
    parse::{ETH_HLEN, ETH_P_IP, IP_OFFSET_MASK, Ipv4Hdr},
    prefilter,
    route::{self, Route},
    verdict::Verdict,
};

/// The entry point goes on to the Service decision.
pub const CONTINUE: u32 = Verdict::CONTINUE as u32;
const IP_MF: u16 = 0x2000;
const L4_OFF: usize = ETH_HLEN + 20;
/// Outer Ethernet, IPv4, UDP and VXLAN headers.
const VXLAN_OVERHEAD: usize = 14 + 20 + 8 + 8;
const AF_INET: u8 = 2;

/// Reads the frame into `p`: `CONTINUE` for a TCP or UDP packet XDP may
/// serve, `XDP_DROP` for a prefiltered source, `XDP_PASS` for the rest.
/// `len` is the frame's length (the entry point measures it: the verifier
/// allows no arithmetic on data_end, which LLVM would make of it here).
#[inline(never)]
pub fn parse(ctx: &XdpContext, p: &mut Pkt, len: u32) -> u32 {
    let (data, end) = bounds(ctx);
    if data + L4_OFF > end {
        return XDP_PASS;
    }
    // SAFETY: the Ethernet and fixed IPv4 headers lie before data_end.
    let (ethertype, ip) = unsafe {
        (
            u16::from_be_bytes(*((data + 12) as *const [u8; 2])),
            *((data + ETH_HLEN) as *const Ipv4Hdr),
        )
    };
    if ethertype != ETH_P_IP {
        return XDP_PASS;
    }
    if prefilter::denied(ip.saddr) {
        return XDP_DROP;
    }
    let Ok(cfg) = config::get() else {
        return XDP_PASS;
    };
    // Options, fragments and TTLs that need an answer are tc's.
    if cfg.flags & DP_F_XDP_LB == 0
        || ip.version_ihl != 0x45
        || ip.frag_off() & (IP_MF | IP_OFFSET_MASK) != 0
        || ip.ttl <= 1
        || from_the_cluster(ip.saddr)
    {
        return XDP_PASS;
    }
    let (sport, dport, tcp_flags) = match ip.protocol {
        IPPROTO_TCP if data + L4_OFF + 20 <= end => {
            // SAFETY: bounds checked in the guard.
            let h = unsafe { *((data + L4_OFF) as *const [u8; 14]) };
            (
                u16::from_ne_bytes([h[0], h[1]]),
                u16::from_ne_bytes([h[2], h[3]]),
                h[13],
            )
        }
        IPPROTO_UDP if data + L4_OFF + 8 <= end => {
            // SAFETY: bounds checked in the guard.
            let h = unsafe { *((data + L4_OFF) as *const [u16; 2]) };
            // The tunnel itself is the stack's.
            if h[1] == u16::from_ne_bytes(cfg.vxlan_port) && ip.daddr == cfg.node_ipv4 {
                return XDP_PASS;
            }
            (h[0], h[1], 0)
        }
        _ => return XDP_PASS,
    };
    // A frame shorter than its IP header says, or a transport header
    // outside the IP packet, is tc's to judge.
    let l4_min = if ip.protocol == IPPROTO_TCP { 40 } else { 28 };
    if ETH_HLEN + ip.tot_len() > len as usize || ip.tot_len() < l4_min {
        return XDP_PASS;
    }
    p.ip = ip;
    p.node = u32::from_ne_bytes(cfg.node_ipv4);
    p.flow = Flow {
        saddr: u32::from_ne_bytes(ip.saddr),
        daddr: u32::from_ne_bytes(ip.daddr),
        sport,
        dport,
        proto: ip.protocol,
        tcp_flags,
        frag: FRAG_NONE,
        has_ports: true,
        l4_off: L4_OFF as u16,
        dry: false,
        trace: false,
        src_identity: 0,
    };
    CONTINUE
}

/// Whether `saddr` is a pod or node of the cluster. Their packets (a
/// backend's replies from another node, a node reaching a NodePort) are
/// tc's: XDP serves clients outside the cluster, whose frames come off a
/// wire with complete checksums, where a cluster sender's may still be
/// left to its offload (on veths, CHECKSUM_PARTIAL travels with the frame,
/// and XDP cannot see it).
#[inline(never)]
fn from_the_cluster(saddr: [u8; 4]) -> bool {
    ipcache::lookup_v4(saddr).is_some_and(|e| e.kind != IPCACHE_KIND_NO_MASQUERADE)
}

/// Sends a translated packet on, if its route leads back out of the
/// uplink; otherwise `XDP_PASS` with the packet untouched. `len`: the
/// frame's length.
#[inline(never)]
pub fn forward(ctx: &XdpContext, p: &Pkt, len: u32) -> Verdict {
    let (daddr, dport) = p.nat.destination(&p.flow);
    let (saddr, sport) = if p.nat.flags & CT_F_SRC != 0 {
        (p.nat.src, p.nat.sport)
    } else {
        (p.flow.saddr, p.flow.sport)
    };
    let Ok(cfg) = config::get() else {
        return Verdict::new(XDP_PASS as i32, Reason::Forwarded);
    };
    let mut fib = fib_params(ctx, p.flow.proto, p.ip.tot_len());
    // Some(remote node): into VXLAN toward it; Some(0): routed as it is.
    let encap = match route::v4(daddr.to_ne_bytes()) {
        Ok(Route::Tunnel(node, _)) => match tunnel_endpoint(node) {
            Some(remote) => {
                fib_addrs(&mut fib, p.node, remote);
                // SAFETY: writing a plain integer union member.
                unsafe { fib.__bindgen_anon_1.tot_len += (VXLAN_OVERHEAD - ETH_HLEN) as u16 };
                Some(remote)
            }
            None => None,
        },
        Ok(Route::Stack) => {
            fib_addrs(&mut fib, saddr, daddr);
            fib.sport = sport;
            fib.dport = dport;
            Some(0)
        }
        _ => None,
    };
    let Some(remote) = encap else {
        return Verdict::new(XDP_PASS as i32, Reason::Forwarded);
    };
    // SAFETY: the context pointer the kernel passed, and our own params.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    // Not resolved yet (no neighbour), too big for the path, or out of
    // another device: tc's redirect resolves, answers or routes it.
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || fib.ifindex as usize != ctx.ingress_ifindex() {
        return Verdict::new(XDP_PASS as i32, Reason::Forwarded);
    }
    if rewrite(ctx, p).is_err() {
        return Verdict::new(XDP_PASS as i32, Reason::Forwarded);
    }
    if remote != 0 && encapsulate(ctx, p, cfg, remote, len as usize).is_err() {
        return Verdict::new(XDP_DROP as i32, Reason::HelperFailed);
    }
    match set_macs(ctx, &fib.smac, &fib.dmac) {
        Ok(()) => Verdict::new(XDP_TX as i32, Reason::Forwarded),
        Err(()) => Verdict::new(XDP_DROP as i32, Reason::HelperFailed),
    }
}

#[inline(always)]
fn tunnel_endpoint(node: &IpcacheEntry) -> Option<u32> {
    if node.tunnel_family != FAMILY_IPV4 {
        return None;
    }
    let [a, b, c, d, ..] = node.tunnel_endpoint;
    Some(u32::from_ne_bytes([a, b, c, d]))
}

#[inline(always)]
fn fib_params(ctx: &XdpContext, proto: u8, tot_len: usize) -> FibParams {
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = proto;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_1.tot_len = tot_len as u16;
    fib
}

#[inline(always)]
fn fib_addrs(fib: &mut FibParams, saddr: u32, daddr: u32) {
    fib.__bindgen_anon_3.ipv4_src = saddr;
    fib.__bindgen_anon_4.ipv4_dst = daddr;
}

/// The packet's rewrite (addresses, ports, TTL) with the IPv4 and
/// transport checksums patched: TCP's checksum at 16 of its 20-byte
/// header, UDP's at 6 of 8. The packet is untouched when it errs.
#[inline(always)]
fn rewrite(ctx: &XdpContext, p: &Pkt) -> Result<(), ()> {
    if p.flow.proto == IPPROTO_TCP {
        rewrite_at::<16, 20>(ctx, p)
    } else {
        rewrite_at::<6, 8>(ctx, p)
    }
}

#[inline(always)]
fn rewrite_at<const CSUM: usize, const HLEN: usize>(ctx: &XdpContext, p: &Pkt) -> Result<(), ()> {
    let (data, end) = bounds(ctx);
    if data + L4_OFF + HLEN > end {
        return Err(());
    }
    let ip = (data + ETH_HLEN) as *mut Ipv4Hdr;
    let ports = (data + L4_OFF) as *mut [u16; 2];
    let csum = (data + L4_OFF + CSUM) as *mut u16;
    // SAFETY: the IPv4 header and HLEN bytes of transport header lie
    // before data_end (checked above).
    unsafe {
        let mut ipc = u16::from_ne_bytes((*ip).check);
        let mut l4c = *csum;
        // UDP without a checksum stays without one.
        let l4_on = HLEN == 20 || l4c != 0;
        let n = &p.nat;
        if n.flags & CT_F_SRC != 0 {
            let old = u32::from_ne_bytes((*ip).saddr);
            ipc = csum_replace4(ipc, old, n.src);
            l4c = csum_replace4(l4c, old, n.src);
            l4c = csum_replace2(l4c, (*ports)[0], n.sport);
            (*ip).saddr = n.src.to_ne_bytes();
            (*ports)[0] = n.sport;
        }
        if n.flags & CT_F_DST != 0 {
            let old = u32::from_ne_bytes((*ip).daddr);
            ipc = csum_replace4(ipc, old, n.dst);
            l4c = csum_replace4(l4c, old, n.dst);
            l4c = csum_replace2(l4c, (*ports)[1], n.dport);
            (*ip).daddr = n.dst.to_ne_bytes();
            (*ports)[1] = n.dport;
        }
        // One routing hop, as tc's path makes it (parse left TTLs of 0
        // and 1 to tc, which answers them).
        let ttl = (*ip).ttl;
        let proto = (*ip).protocol;
        ipc = csum_replace2(
            ipc,
            u16::from_ne_bytes([ttl, proto]),
            u16::from_ne_bytes([ttl - 1, proto]),
        );
        (*ip).ttl = ttl - 1;
        (*ip).check = ipc.to_ne_bytes();
        if l4_on {
            // A computed UDP checksum of zero is sent as all ones.
            *csum = if HLEN == 8 && l4c == 0 { 0xffff } else { l4c };
        }
    }
    Ok(())
}

/// Puts VXLAN's outer headers in front of the frame: this node to
/// `remote`, the configured VNI (the sender is outside the cluster, as
/// tc's path decides too), the
/// UDP source port from the inner flow as the kernel's VXLAN device
/// chooses it (spread over the ephemeral range). The MACs come after.
#[inline(always)]
fn encapsulate(
    ctx: &XdpContext,
    p: &Pkt,
    cfg: &DatapathConfig,
    remote: u32,
    inner: usize,
) -> Result<(), ()> {
    // SAFETY: the context pointer the kernel passed.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(VXLAN_OVERHEAD as i32)) } != 0 {
        return Err(());
    }
    let (data, end) = bounds(ctx);
    if data + VXLAN_OVERHEAD > end {
        return Err(());
    }
    let f = &p.flow;
    let h = (f.saddr ^ f.daddr ^ (u32::from(f.sport) << 16 | u32::from(f.dport)))
        .wrapping_mul(0x9e37_79b1);
    let sport = (32768 + (h >> 16) % 28232) as u16;
    let ip_len = (inner + VXLAN_OVERHEAD - ETH_HLEN) as u16;
    let [t0, t1] = ip_len.to_be_bytes();
    let [s0, s1, s2, s3] = p.node.to_ne_bytes();
    let [r0, r1, r2, r3] = remote.to_ne_bytes();
    let mut hdr: [u16; 10] = [
        u16::from_ne_bytes([0x45, 0]),
        u16::from_ne_bytes([t0, t1]),
        0,
        0,
        u16::from_ne_bytes([64, IPPROTO_UDP]),
        0,
        u16::from_ne_bytes([s0, s1]),
        u16::from_ne_bytes([s2, s3]),
        u16::from_ne_bytes([r0, r1]),
        u16::from_ne_bytes([r2, r3]),
    ];
    let mut sum: u32 = 0;
    for w in hdr {
        sum += u32::from(w);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    hdr[5] = !(sum as u16);
    let udp_len = ip_len - 20;
    let [_, w1, w2, w3] = cfg.vni.to_be_bytes();
    // SAFETY: VXLAN_OVERHEAD bytes checked against data_end above.
    unsafe {
        *((data + 12) as *mut [u8; 2]) = ETH_P_IP.to_be_bytes();
        *((data + ETH_HLEN) as *mut [u16; 10]) = hdr;
        let udp = (data + ETH_HLEN + 20) as *mut [u16; 4];
        *udp = [
            sport.to_be(),
            u16::from_ne_bytes(cfg.vxlan_port),
            udp_len.to_be(),
            0,
        ];
        // Flags (VNI present), reserved, VNI, reserved.
        *((data + ETH_HLEN + 28) as *mut [u8; 8]) = [0x08, 0, 0, 0, w1, w2, w3, 0];
    }
    Ok(())
}

#[inline(always)]
fn set_macs(ctx: &XdpContext, src: &[u8; 6], dst: &[u8; 6]) -> Result<(), ()> {
    let (data, end) = bounds(ctx);
    if data + ETH_HLEN > end {
        return Err(());
    }
    // SAFETY: the Ethernet header lies before data_end.
    unsafe {
        *(data as *mut [u8; 6]) = *dst;
        *((data + 6) as *mut [u8; 6]) = *src;
    }
    Ok(())
}

/// The frame's start and end. Read volatile: otherwise LLVM hands a
/// subprogram the context's u32 fields as arguments and widens them there,
/// arithmetic the verifier refuses on packet pointers.
#[inline(always)]
fn bounds(ctx: &XdpContext) -> (usize, usize) {
    // SAFETY: the context pointer the kernel passed.
    unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    }
}

/// RFC 1624's incremental update, eqn. 3, for a 32-bit field: words with
/// the wire's bytes in, the checksum field as read from the packet.
#[inline(always)]
fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    let mut s = u32::from(!check);
    s += (!old >> 16) + (!old & 0xffff);
    s += (new >> 16) + (new & 0xffff);
    fold(s)
}

#[inline(always)]
fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}
