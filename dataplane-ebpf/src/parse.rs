//! Header parsing shared by all programs.

use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Offset of the IPv4 source address from the start of the frame.
const IPV4_SADDR: usize = ETH_HLEN + 12;

/// The EtherType in host byte order, or `None` for a frame shorter than an
/// Ethernet header.
#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> Option<u16> {
    ctx.load::<u16>(12).ok().map(u16::from_be)
}

/// IPv4 source address bytes as on the wire (network byte order).
#[inline(always)]
pub fn ipv4_saddr(ctx: &TcContext) -> Option<[u8; 4]> {
    ctx.load::<[u8; 4]>(IPV4_SADDR).ok()
}
