//! Header parsing shared by all programs.

use aya_ebpf::programs::TcContext;
use dataplane_common::Reason;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_TTL: usize = ETH_HLEN + 8;
const IPV4_CSUM: usize = ETH_HLEN + 10;
const IPV4_SADDR: usize = ETH_HLEN + 12;
const IPV4_DADDR: usize = ETH_HLEN + 16;

/// The EtherType in host byte order, or `None` for a frame shorter than an
/// Ethernet header.
#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> Option<u16> {
    ctx.load::<u16>(12).ok().map(u16::from_be)
}

/// IPv4 source address bytes as on the wire (network byte order).
#[inline(always)]
pub fn ipv4_saddr(ctx: &TcContext) -> Result<[u8; 4], Reason> {
    ctx.load::<[u8; 4]>(IPV4_SADDR)
        .map_err(|_| Reason::Malformed)
}

#[inline(always)]
pub fn ipv4_daddr(ctx: &TcContext) -> Result<[u8; 4], Reason> {
    ctx.load::<[u8; 4]>(IPV4_DADDR)
        .map_err(|_| Reason::Malformed)
}

/// One routing hop: TTL minus one, header checksum patched.
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
