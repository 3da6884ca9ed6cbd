//! NodePort from outside, XDP against tc, in the same lab: the external
//! host floods prebuilt UDP frames (a raw socket, batched) to node 0's
//! NodePort, whose backend is on node 1 (native routing); node 0 sends
//! them on toward node 1, and the underlay's port drops them right there
//! (an XDP_DROP program in place of the lab's pass-through), so the path
//! is the sender, the wire and node 0. One thread on one CPU sends, and a
//! veth hands frames on in the sender's context: that CPU carries the
//! path. The figure is the packets node 0 translated and sent on per
//! second, by its own counters (XDP's, or tc's once XDP is detached).
//! Rounds alternate the two (the agent's restart attaches XDP again).

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lab::{
    Lab, LabSpec, in_netns_thread,
    services::{Ep, service},
};
use serde_json::json;

use super::median;

const NODE_PORT: u16 = 30100;
const SINK: u16 = 9999;
const SECONDS: f64 = 2.0;
const ROUNDS: usize = 3;

struct Pps {
    xdp: f64,
    tc: f64,
    /// How node 0 had XDP attached.
    mode: String,
}

pub(super) fn bench() -> Result<String> {
    let mut out = String::new();
    let pps = nodeport_pps()?;
    say!(
        out,
        "== NodePort from the external host to a backend on another node (native routing), UDP in 64-byte frames, one sending CPU that also carries the path"
    );
    say!(
        out,
        "   node 0 translated and sent on: XDP ({}) {:.0} kpps vs tc {:.0} kpps: {:.2}x (medians of {ROUNDS} alternating rounds of {SECONDS} s; {}: XDP ahead)",
        pps.mode,
        pps.xdp / 1000.0,
        pps.tc / 1000.0,
        pps.xdp / pps.tc,
        super::verdict(pps.xdp > pps.tc)
    );
    say!(
        out,
        "   the CPU's time per packet, sender to node 0's output: {:.2} us vs {:.2} us",
        1e6 / pps.xdp,
        1e6 / pps.tc,
    );
    Ok(out)
}

fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t filled by the libc macros, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `dev`'s MAC in `netns`, as bytes.
fn mac_of(netns: &str, dev: &str) -> Result<[u8; 6]> {
    let text = super::compare::mac_of(netns, dev)?;
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// A 64-byte Ethernet frame: UDP from `src` to `dst` (no UDP checksum).
fn frame(macs: ([u8; 6], [u8; 6]), src: SocketAddr, dst: SocketAddr) -> Result<Vec<u8>> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        bail!("IPv4 only");
    };
    let payload = [0x5au8; 22];
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&macs.1);
    f.extend_from_slice(&macs.0);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let tot = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&s.ip().octets());
    ip[16..20].copy_from_slice(&d.ip().octets());
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&s.port().to_be_bytes());
    f.extend_from_slice(&d.port().to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&payload);
    Ok(f)
}

/// Sends `frame` out of the external host's eth0 for `SECONDS` from one
/// thread on CPU 1, in batches of 64 (sendmmsg on a raw socket).
fn flood(lab: &Lab, frame: &[u8]) -> Result<Duration> {
    let ext = lab.state.external.clone().context("external host")?;
    let frame = frame.to_vec();
    in_netns_thread(&ext.netns, move || -> Result<Duration> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        pin_to_cpu(1)?;
        // SAFETY: plain socket(2) and if_nametoindex(3); the fd is owned.
        let (sock, index) = unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                0, // send only
            );
            if fd < 0 {
                bail!("packet socket: {}", std::io::Error::last_os_error());
            }
            (
                OwnedFd::from_raw_fd(fd),
                libc::if_nametoindex(c"eth0".as_ptr()),
            )
        };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = index as i32;
        to.sll_halen = 6;
        let mut data = frame;
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        const BATCH: usize = 64;
        // SAFETY: all-zero msghdrs, pointed at the iovec and address above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for m in &mut msgs {
            m.msg_hdr.msg_name = (&raw mut to).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let started = Instant::now();
        let until = started + Duration::from_secs_f64(SECONDS);
        while Instant::now() < until {
            // SAFETY: msgs and what they point at live across the call.
            unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        }
        Ok(started.elapsed())
    })?
}

/// Packets node 0 sent on from the uplink: by XDP (to-network) or by tc.
fn sent_on(lab: &Lab, hook: &str) -> Result<u64> {
    let direction = if hook == "xdp" {
        "to-network"
    } else {
        "from-network"
    };
    lab.counted(0, hook, direction, "forwarded")
}

fn rate(lab: &Lab, hook: &str, frame: &[u8]) -> Result<f64> {
    let before = sent_on(lab, hook)?;
    let took = flood(lab, frame)?;
    std::thread::sleep(Duration::from_millis(100));
    let n = sent_on(lab, hook)? - before;
    if n == 0 {
        bail!("no packet went through {hook}");
    }
    Ok(n as f64 / took.as_secs_f64())
}

fn nodeport_pps() -> Result<Pps> {
    let mut spec = LabSpec::new(2, 1)?;
    spec.mode = "native".into();
    spec.xdp = "native".into();
    let mut lab = Lab::up(&spec)?;
    lab.set_services(
        vec![service(
            "flood",
            json!({"type": "NodePort", "clusterIP": "10.96.0.30", "ports": [
                {"port": 53, "protocol": "UDP", "targetPort": SINK, "nodePort": NODE_PORT}]}),
            json!({}),
        )],
        vec![lab.slice(
            "flood",
            "flood-1",
            &[Ep::ready("pod-1-0")],
            json!([{"port": SINK, "protocol": "UDP"}]),
        )],
    )?;
    lab.wait_frontend(0, &format!("*:{NODE_PORT}/udp"), "external", 1)?;
    let ext = lab.state.external.clone().context("external host")?;
    let node0 = lab.state.nodes[0].clone();
    let to = SocketAddr::from((node0.ip, NODE_PORT));
    let frame = frame(
        (mac_of(&ext.netns, "eth0")?, mac_of(&node0.netns, "eth0")?),
        SocketAddr::from((ext.ip, 40000)),
        to,
    )?;
    // One real datagram first: the neighbours (the client's, node 1's)
    // resolved, the flow's entries made.
    let stop = AtomicBool::new(false);
    let backend = lab.pod("pod-1-0").netns.clone();
    std::thread::scope(|s| -> Result<()> {
        let sink = s.spawn(|| lab::echo_server(&backend, SINK, &stop));
        std::thread::sleep(Duration::from_millis(200));
        let answer = lab::udp_echo(&ext.netns, to, "warm");
        stop.store(true, Ordering::Relaxed);
        sink.join()
            .map_err(|_| anyhow::anyhow!("sink panicked"))??;
        answer.map(drop)
    })?;
    // The flood ends at node 0's port on the underlay.
    lab::xdp_pass::attach_drop(&lab.state.underlay_netns, "n0")?;
    let status: serde_json::Value = serde_json::from_str(&lab.cli(0, &["status", "-o", "json"])?)?;
    let mode = status["xdp"].as_str().unwrap_or("?").to_owned();
    let link = node0.pin_dir.join("links/host_xdp@eth0");
    let (mut xdp, mut tc) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        if round > 0 {
            // Attached again by a restarted agent.
            lab.signal_agent(0, libc::SIGTERM)?;
            lab.start_agent_again(0)?;
            lab.wait_frontend(0, &format!("*:{NODE_PORT}/udp"), "external", 1)?;
        }
        xdp.push(rate(&lab, "xdp", &frame)?);
        crate::toolchain::output(std::process::Command::new("bpftool").args([
            "link",
            "detach",
            "pinned",
            link.to_str().context("utf-8")?,
        ]))?;
        std::fs::remove_file(&link)?;
        tc.push(rate(&lab, "tc", &frame)?);
    }
    Ok(Pps {
        xdp: median(xdp),
        tc: median(tc),
        mode,
    })
}
