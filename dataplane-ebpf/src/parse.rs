//! Header parsing shared by all programs.

use aya_ebpf::programs::TcContext;
use dataplane_common::Reason;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMP: u8 = 1;
const IPV4_TTL: usize = ETH_HLEN + 8;
const IPV4_CSUM: usize = ETH_HLEN + 10;
const IPV4_DADDR: usize = ETH_HLEN + 16;
/// Don't Fragment, in the flags/fragment-offset field (host order).
pub const IP_DF: u16 = 0x4000;
pub const IP_OFFSET_MASK: u16 = 0x1fff;

/// The fixed part of an IPv4 header, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

impl Ipv4Hdr {
    /// Header length in bytes (IHL * 4).
    #[inline(always)]
    pub fn len(&self) -> usize {
        usize::from(self.version_ihl & 0x0f) * 4
    }

    #[inline(always)]
    pub fn frag_off(&self) -> u16 {
        u16::from_be_bytes(self.frag_off)
    }

    #[inline(always)]
    pub fn tot_len(&self) -> usize {
        usize::from(u16::from_be_bytes(self.tot_len))
    }
}

/// The EtherType in host byte order, or `None` for a frame shorter than an
/// Ethernet header.
#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> Option<u16> {
    ctx.load::<u16>(12).ok().map(u16::from_be)
}

#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Result<Ipv4Hdr, Reason> {
    let h = ctx
        .load::<Ipv4Hdr>(ETH_HLEN)
        .map_err(|_| Reason::Malformed)?;
    if h.version_ihl >> 4 != 4 || h.len() < 20 {
        return Err(Reason::Malformed);
    }
    Ok(h)
}

/// IPv4 destination address bytes as on the wire (network byte order).
#[inline(always)]
pub fn ipv4_daddr(ctx: &TcContext) -> Result<[u8; 4], Reason> {
    ctx.load::<[u8; 4]>(IPV4_DADDR)
        .map_err(|_| Reason::Malformed)
}

/// One routing hop: TTL minus one, header checksum patched. A packet whose
/// TTL would reach zero is refused with [`Reason::TtlExceeded`] and left
/// unchanged, so the caller can answer it.
#[inline(always)]
pub fn ipv4_dec_ttl(ctx: &mut TcContext) -> Result<(), Reason> {
    let [ttl, proto] = ctx
        .load::<[u8; 2]>(IPV4_TTL)
        .map_err(|_| Reason::Malformed)?;
    if ttl <= 1 {
        return Err(Reason::TtlExceeded);
    }
    let old = u16::from_ne_bytes([ttl, proto]);
    let new = u16::from_ne_bytes([ttl - 1, proto]);
    ctx.l3_csum_replace(IPV4_CSUM, u64::from(old), u64::from(new), 2)
        .map_err(|_| Reason::HelperFailed)?;
    ctx.store(IPV4_TTL, &(ttl - 1), 0)
        .map_err(|_| Reason::HelperFailed)
}

/// IPv6 fixed header fields the datapath reads.
#[inline(always)]
pub fn ipv6_addrs(ctx: &TcContext) -> Result<([u8; 16], [u8; 16]), Reason> {
    let src = ctx
        .load::<[u8; 16]>(ETH_HLEN + 8)
        .map_err(|_| Reason::Malformed)?;
    let dst = ctx
        .load::<[u8; 16]>(ETH_HLEN + 24)
        .map_err(|_| Reason::Malformed)?;
    Ok((src, dst))
}
