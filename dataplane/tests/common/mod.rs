//! The golden-packet fixture shared by the test files: the datapath
//! loaded into a private pin directory inside a network namespace of the
//! test's own, packet builders, and `BPF_PROG_TEST_RUN` helpers.

#![allow(dead_code)]

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{Program, TestRun as _, TestRunOptions};
use dataplane::{
    bpf::{AttachMode, Datapath},
    maps::{
        Table as _,
        config::ConfigMap,
        endpoints::EndpointMap,
        ipcache::{IpcacheMap, Prefix, entry},
        metrics,
    },
};
use dataplane_common::{
    DatapathConfig, EP_F_LOCAL, EndpointInfo, EndpointKey, IPCACHE_KIND_CLUSTER, IPCACHE_KIND_HOST,
    IPCACHE_KIND_LOCAL_PODS, IPCACHE_KIND_REMOTE_HOST, IPCACHE_KIND_REMOTE_PODS,
    IPCACHE_KIND_SERVICES,
};
use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Type, IpHeaders, IpNumber, Ipv4Header, Ipv4Options,
    PacketBuilder,
};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_PASS: u32 = 2;
pub const XDP_DROP: u32 = 1;
pub const XDP_TX: u32 = 3;

pub const POD_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x01];
pub const HOST_MAC: [u8; 6] = [0xee, 0, 0, 0, 0, 0x01];
pub const PEER_MAC: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x02];
pub const PEER_HOST_MAC: [u8; 6] = [0xee, 0, 0, 0, 0, 0x02];
pub const POD: [u8; 4] = [10, 244, 0, 10];
pub const PEER: [u8; 4] = [10, 244, 0, 11];
pub const REMOTE_POD: [u8; 4] = [10, 244, 1, 10];
pub const NODE: [u8; 4] = [172, 20, 0, 11];
pub const REMOTE_NODE: [u8; 4] = [172, 20, 0, 12];
pub const GATEWAY: [u8; 4] = [169, 254, 1, 1];
pub const TUNNEL_MTU: u32 = 1450;
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

pub static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes a test's pins and state, also when it panics part-way.
pub struct Cleanup {
    pin_dir: PathBuf,
    state_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// The datapath loaded into a private pin directory, inside a network
/// namespace of this test's own with stand-in devices: the pod's and a
/// peer's host-side veths, the uplink, and the "VXLAN device" (a veth with
/// the tunnel's MTU).
pub struct Fixture {
    pub dp: Datapath,
    pub pin_dir: PathBuf,
    _cleanup: Cleanup,
    pub pod_if: u32,
    pub peer_if: u32,
    pub tunnel_if: u32,
    pub uplink_if: u32,
}

pub fn fixture(mode: u8) -> Fixture {
    // SAFETY: unshare affects this test's thread only: the namespace goes
    // when the thread ends.
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "unshare(CLONE_NEWNET): {} (the golden tests need root)",
        std::io::Error::last_os_error()
    );
    sh(&["ip", "link", "set", "lo", "up"]);
    for (a, b, mtu) in [
        ("gpod", "gpodp", "1500"),
        ("gpeer", "gpeerp", "1500"),
        ("gtun", "gtunp", "1450"),
        ("gup", "gupp", "1500"),
    ] {
        sh(&[
            "ip", "link", "add", a, "mtu", mtu, "type", "veth", "peer", "name", b,
        ]);
        sh(&["ip", "link", "set", a, "up"]);
        sh(&["ip", "link", "set", b, "up"]);
    }
    let idx = |n: &str| dataplane::sys::ifindex(n).expect("ifindex");
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let tag = format!("{}-{n}", std::process::id());
    // No shared parent: parallel tests never race on creating or removing it.
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/dataplane-golden-{tag}"));
    let state_dir = std::env::temp_dir().join(format!("dataplane-golden-{tag}"));
    let cleanup = Cleanup {
        pin_dir: pin_dir.clone(),
        state_dir: state_dir.clone(),
    };
    dataplane::sys::ensure_pin_dir(&pin_dir).expect("pin dir");
    // The agent's default kernel log level (info): the programs verified
    // here are the ones it runs.
    let (mut dp, logger) =
        Datapath::load(&pin_dir, &state_dir, AttachMode::Tcx, 3, &[]).expect("load the datapath");
    drop(logger);
    let f = Fixture {
        pod_if: idx("gpod"),
        peer_if: idx("gpeer"),
        tunnel_if: idx("gtun"),
        uplink_if: idx("gup"),
        dp: {
            let mut config =
                ConfigMap::new(dp.take_map(dataplane_common::MAP_CONFIG).expect("config"))
                    .expect("config");
            config
                .sync(DatapathConfig {
                    mode,
                    _pad: 0,
                    vxlan_port: 8472u16.to_be_bytes(),
                    vni: 1,
                    vxlan_ifindex: idx("gtun"),
                    uplink_ifindex: idx("gup"),
                    node_ipv4: NODE,
                    flags: dataplane_common::DP_F_MASQUERADE | dataplane_common::DP_F_XDP_LB,
                })
                .expect("config");
            dp
        },
        pin_dir,
        _cleanup: cleanup,
    };
    let mut eps = EndpointMap::open(&f.pin_dir).expect("endpoints");
    let local = |ifindex, mac, host_mac| EndpointInfo {
        ifindex,
        identity: 0,
        mac,
        host_mac,
        flags: EP_F_LOCAL,
        _pad: 0,
    };
    eps.put(&EndpointKey::v4(POD), &local(f.pod_if, POD_MAC, HOST_MAC))
        .expect("pod");
    eps.put(
        &EndpointKey::v4(PEER),
        &local(f.peer_if, PEER_MAC, PEER_HOST_MAC),
    )
    .expect("peer");
    let mut ipc = IpcacheMap::open(&f.pin_dir).expect("ipcache");
    let remote = Ipv4Addr::from(REMOTE_NODE);
    for (net, e) in [
        ("10.244.0.0/16", entry(IPCACHE_KIND_CLUSTER, None)),
        ("10.244.0.0/24", entry(IPCACHE_KIND_LOCAL_PODS, None)),
        (
            "10.244.1.0/24",
            entry(IPCACHE_KIND_REMOTE_PODS, Some(remote)),
        ),
        ("172.20.0.11/32", entry(IPCACHE_KIND_HOST, None)),
        (
            "172.20.0.12/32",
            entry(IPCACHE_KIND_REMOTE_HOST, Some(remote)),
        ),
        (SERVICE_CIDR, entry(IPCACHE_KIND_SERVICES, None)),
    ] {
        ipc.put(&Prefix(net.parse().expect("cidr")), &e)
            .expect("ipcache");
    }
    f
}

/// A `struct __sk_buff` for `ctx_in`: only `ifindex` (offset 40) set, which
/// makes the test run's skb come from that device.
pub fn skb_ctx(ifindex: u32) -> [u8; 192] {
    let mut c = [0u8; 192];
    c[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    c
}

impl Fixture {
    pub fn program(&self, name: &str) -> &Program {
        self.dp.program_ref(name).expect("program")
    }

    /// Runs `prog` (tc or XDP) `repeat` times on `packet` arriving on
    /// `ifindex`: (verdict, packet out, the kernel's time per run in ns).
    fn run(&self, prog: &str, ifindex: u32, packet: &[u8], repeat: u32) -> (u32, Vec<u8>, f64) {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let mut xdp_md = [0u8; 24];
        xdp_md[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
        xdp_md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let skb = skb_ctx(ifindex);
        let mut out = vec![0u8; packet.len() + 256];
        let program = self.program(prog);
        let options = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: Some(match program {
                Program::Xdp(_) => &xdp_md[..],
                _ => &skb[..],
            }),
            repeat,
            ..Default::default()
        };
        let r = match program {
            Program::Xdp(p) => p.test_run(options),
            Program::SchedClassifier(p) => p.test_run(options),
            _ => panic!("{prog}: neither a tc nor an XDP program"),
        }
        .unwrap_or_else(|e| panic!("test run of {prog}: {e}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out, r.duration.as_nanos() as f64)
    }

    /// Runs a tc program on `packet` arriving on `ifindex`: (verdict, packet out).
    pub fn tc(&self, prog: &str, ifindex: u32, packet: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, out, _) = self.run(prog, ifindex, packet, 1);
        (verdict, out)
    }

    /// Runs an XDP program on `packet` arriving on `ifindex`: (action,
    /// frame out).
    pub fn xdp(&self, prog: &str, ifindex: u32, packet: &[u8]) -> (u32, Vec<u8>) {
        let (action, out, _) = self.run(prog, ifindex, packet, 1);
        (action, out)
    }

    /// Runs a tc or XDP program `repeat` times on `packet` arriving on
    /// `ifindex`, asserting its verdict; the kernel's time per run, in
    /// nanoseconds (for the TEST_RUN benchmarks).
    pub fn timed(&self, prog: &str, ifindex: u32, packet: &[u8], repeat: u32, verdict: u32) -> f64 {
        let (got, _, ns) = self.run(prog, ifindex, packet, repeat);
        assert_eq!(got, verdict, "{prog}: verdict");
        ns
    }

    /// (hook, direction, reason) -> packets, from dp_metrics.
    pub fn counted(&self) -> Vec<(String, String, String, u64)> {
        metrics::rows(&self.pin_dir)
            .expect("dp_metrics")
            .into_iter()
            .map(|r| (r.hook, r.direction, r.reason, r.packets))
            .collect()
    }
}

pub fn one(hook: &str, direction: &str, reason: &str) -> Vec<(String, String, String, u64)> {
    vec![(hook.into(), direction.into(), reason.into(), 1)]
}

pub fn ipv4_header(
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    proto: IpNumber,
    payload: usize,
    df: bool,
) -> Ipv4Header {
    let mut h = Ipv4Header::new(payload as u16, ttl, proto, src, dst).expect("ipv4");
    h.dont_fragment = df;
    h.header_checksum = h.calc_header_checksum();
    h
}

/// An ICMP echo request with `payload` bytes, TTL `ttl`.
pub fn ping(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    payload: usize,
    df: bool,
) -> Vec<u8> {
    let data = vec![0x5a; payload];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ip(IpHeaders::Ipv4(
            ipv4_header(src, dst, ttl, IpNumber::ICMP, 8 + payload, df),
            Default::default(),
        ))
        .icmpv4_echo_request(7, 1)
        .write(&mut out, &data)
        .expect("build");
    out
}

/// What a router sends back: an ICMP error from the node, quoting the
/// original IP header and 8 bytes.
pub fn icmp_error(
    to_mac: [u8; 6],
    from_mac: [u8; 6],
    to: [u8; 4],
    kind: Icmpv4Type,
    original: &[u8],
) -> Vec<u8> {
    icmp_error_from(NODE, to_mac, from_mac, to, kind, original)
}

/// An ICMP error from `from`, quoting the original IP header and 8 bytes.
pub fn icmp_error_from(
    from: [u8; 4],
    to_mac: [u8; 6],
    from_mac: [u8; 6],
    to: [u8; 4],
    kind: Icmpv4Type,
    original: &[u8],
) -> Vec<u8> {
    let ihl = usize::from(original[14] & 0x0f) * 4;
    // Eight bytes of payload; a TCP header whole.
    let payload = if original[14 + 9] == 6 { 20 } else { 8 };
    let quote = &original[14..(14 + ihl + payload).min(original.len())];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(from_mac, to_mac)
        .ip(IpHeaders::Ipv4(
            ipv4_header(from, to, 64, IpNumber::ICMP, 8 + quote.len(), false),
            Default::default(),
        ))
        .icmpv4(kind)
        .write(&mut out, quote)
        .expect("build");
    out
}

pub fn arp(
    oper: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
    eth_dst: [u8; 6],
) -> Vec<u8> {
    let mut p = Vec::new();
    Ethernet2Header {
        source: sha,
        destination: eth_dst,
        ether_type: EtherType::ARP,
    }
    .write(&mut p)
    .expect("eth");
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    p.extend_from_slice(&oper.to_be_bytes());
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa);
    p.extend_from_slice(&tha);
    p.extend_from_slice(&tpa);
    p
}

/// A TCP segment; `syn` for a connection's first packet, else an ACK with
/// `payload`.
#[allow(clippy::too_many_arguments)]
pub fn tcp(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    ttl: u8,
    syn: bool,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut ip = Ipv4Header::new(0, ttl, IpNumber::TCP, src.0, dst.0).expect("ipv4");
    ip.dont_fragment = true;
    ip.options = Ipv4Options::try_from(options).expect("options");
    let b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp(src.1, dst.1, 1000, 64_000);
    let b = if syn { b.syn() } else { b.ack(2000) };
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build");
    out
}

pub fn udp(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut ip = Ipv4Header::new(0, ttl, IpNumber::UDP, src.0, dst.0).expect("ipv4");
    ip.dont_fragment = true;
    let mut out = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .udp(src.1, dst.1)
        .write(&mut out, payload)
        .expect("build");
    out
}

/// `p` (IPv4 without options) cut to `l4_len` bytes of transport header,
/// the IP header saying so too: a truncated segment.
pub fn truncate_l4(mut p: Vec<u8>, l4_len: usize) -> Vec<u8> {
    p.truncate(14 + 20 + l4_len);
    p[16..18].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    let mut h = Ipv4Header::from_slice(&p[14..34]).expect("ip").0;
    h.header_checksum = h.calc_header_checksum();
    let mut fixed = p[..14].to_vec();
    h.write(&mut fixed).expect("ip");
    fixed.extend_from_slice(&p[34..]);
    fixed
}
