//! The 5-tuple of an IPv4 packet, with IP options (the transport header
//! follows the IHL) and fragments: a first fragment's ports are remembered,
//! so the later fragments of its datagram find the same flow.

use aya_ebpf::{btf_maps::LruHashMap, macros::btf_map, programs::TcContext};
use dataplane_common::{
    FAMILY_IPV4, FRAGS_MAX, FragKey, FragValue, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Reason,
};

use crate::parse::{ETH_HLEN, IP_OFFSET_MASK, Ipv4Hdr};

#[btf_map(name = "dp_frags")]
static FRAGS: LruHashMap<FragKey, FragValue, { FRAGS_MAX as usize }> = LruHashMap::new();

const IP_MF: u16 = 0x2000;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO: u8 = 8;

/// Not a fragment.
pub const FRAG_NONE: u8 = 0;
/// The first fragment (it carries the transport header).
pub const FRAG_FIRST: u8 = 1;
/// A later fragment (no transport header; ports from the first).
pub const FRAG_LATER: u8 = 2;

/// Addresses and ports are held as words with the wire's bytes (network
/// byte order in memory): arrays of bytes would each take a register (and
/// a stack slot when spilled) in the compiled program.
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    /// ICMP echo: the identifier in `sport` for requests and in `dport`
    /// for replies, the other zero.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (0 otherwise).
    pub tcp_flags: u8,
    /// `FRAG_*`.
    pub frag: u8,
    /// The flow has ports: TCP, UDP, ICMP echo (and their fragments).
    pub has_ports: bool,
    /// Offset of the transport header from the start of the frame.
    pub l4_off: u16,
    /// A dry run of `dataplane explain`: decided, but changing nothing.
    pub dry: bool,
    /// A monitor asked for trace events: the route taken goes out as one.
    pub trace: bool,
    /// The sender's security identity, where the hook knows it (a local
    /// pod, a VNI); 0: look it up by address.
    pub src_identity: u32,
}

impl Flow {
    /// Rewrites apply to the transport header too (not to later fragments,
    /// which have none).
    #[inline(always)]
    pub fn has_l4_header(&self) -> bool {
        self.has_ports && self.frag != FRAG_LATER
    }
}

#[inline(always)]
fn frag_key(ip: &Ipv4Hdr) -> FragKey {
    let [s0, s1, s2, s3] = ip.saddr;
    let [d0, d1, d2, d3] = ip.daddr;
    FragKey {
        saddr: [s0, s1, s2, s3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        daddr: [d0, d1, d2, d3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        id: [ip.id[0], ip.id[1], 0, 0],
        proto: ip.protocol,
        family: FAMILY_IPV4,
        _pad: [0; 2],
    }
}

/// The flow of the IPv4 packet whose header is `ip`. Transport headers
/// shorter than the protocol needs are [`Reason::L4Malformed`]; a later
/// fragment whose first was not seen is [`Reason::FragNotTracked`] only if
/// its protocol has ports (the caller decides whether that matters).
#[inline(always)]
pub fn flow(ctx: &TcContext, ip: &Ipv4Hdr) -> Result<Flow, Reason> {
    let l4_off = (ETH_HLEN + ip.len()) as u16;
    let mut f = Flow {
        saddr: u32::from_ne_bytes(ip.saddr),
        daddr: u32::from_ne_bytes(ip.daddr),
        sport: 0,
        dport: 0,
        proto: ip.protocol,
        tcp_flags: 0,
        frag: FRAG_NONE,
        has_ports: false,
        l4_off,
        dry: crate::explain::is_dry(ctx),
        trace: crate::events::trace_wanted_leaf(),
        src_identity: 0,
    };
    let frag_off = ip.frag_off();
    if frag_off & IP_OFFSET_MASK != 0 {
        f.frag = FRAG_LATER;
        if ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP {
            let Some(ports) = FRAGS.get_ptr(frag_key(ip)) else {
                return Err(Reason::FragNotTracked);
            };
            // SAFETY: a valid map value pointer.
            let v = unsafe { *ports };
            f.sport = u16::from_ne_bytes(v.sport);
            f.dport = u16::from_ne_bytes(v.dport);
            f.has_ports = true;
        }
        return Ok(f);
    }
    if frag_off & IP_MF != 0 {
        f.frag = FRAG_FIRST;
    }
    let off = l4_off as usize;
    match ip.protocol {
        IPPROTO_TCP => {
            // Ports, then (at 13) the flags: a TCP header is at least 20 bytes.
            let h: [u8; 14] = ctx.load(off).map_err(|_| Reason::L4Malformed)?;
            if ctx.len() < u32::from(l4_off) + 20 {
                return Err(Reason::L4Malformed);
            }
            f.sport = u16::from_ne_bytes([h[0], h[1]]);
            f.dport = u16::from_ne_bytes([h[2], h[3]]);
            f.tcp_flags = h[13];
            f.has_ports = true;
        }
        IPPROTO_UDP => {
            let h: [u16; 4] = ctx.load(off).map_err(|_| Reason::L4Malformed)?;
            f.sport = h[0];
            f.dport = h[1];
            f.has_ports = true;
        }
        IPPROTO_ICMP => {
            let h: [u8; 8] = ctx.load(off).map_err(|_| Reason::L4Malformed)?;
            match h[0] {
                ICMP_ECHO => {
                    f.sport = u16::from_ne_bytes([h[4], h[5]]);
                    f.has_ports = true;
                }
                ICMP_ECHO_REPLY => {
                    f.dport = u16::from_ne_bytes([h[4], h[5]]);
                    f.has_ports = true;
                }
                _ => {}
            }
        }
        _ => {}
    }
    if f.frag == FRAG_FIRST && f.has_ports && !f.dry {
        let v = FragValue {
            sport: f.sport.to_ne_bytes(),
            dport: f.dport.to_ne_bytes(),
        };
        // Best effort: a lost record only makes the later fragments unknown.
        let _ = FRAGS.insert(frag_key(ip), v, 0);
    }
    Ok(f)
}
