//! The underlay's side of each node's uplink gets an `XDP_PASS` program:
//! a veth delivers the frames its peer's XDP program sends back out
//! (`XDP_TX`, as the agent's NodePort path does) only to a peer that runs
//! XDP itself. A physical NIC has no such need; the lab's wire does.
//!
//! The program is two instructions, loaded with the raw `bpf(2)` call and
//! attached with one netlink request (the legacy IFLA_XDP attachment lives
//! with the device: deleting the namespace removes it, nothing to unpin).
//! The benchmarks swap in `XDP_DROP` to end a flood's path right there.

use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::{Context as _, Result, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_XDP: u32 = 6;
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_FLAGS: u16 = 3;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const NLA_F_NESTED: u16 = 1 << 15;

/// Loads `r0 = action; exit`.
fn load(action: i32) -> Result<OwnedFd> {
    // BPF_MOV64_IMM(r0, action), BPF_EXIT_INSN.
    let mut insns = [0u8; 16];
    insns[0] = 0xb7;
    insns[4..8].copy_from_slice(&action.to_le_bytes());
    insns[8] = 0x95;
    let license = c"GPL";
    // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns,
    // license (the rest zero).
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // SAFETY: attr, insns and license outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.as_mut_ptr(),
            attr.len() as u32,
        )
    };
    if fd < 0 {
        bail!(
            "loading an XDP_PASS program: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a new descriptor this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// Attaches an `XDP_PASS` program (driver mode) to `dev` in `netns`.
pub fn attach(netns: &str, dev: &str) -> Result<()> {
    attach_returning(netns, dev, XDP_PASS)
}

/// Replaces `dev`'s program with one that drops every frame.
pub fn attach_drop(netns: &str, dev: &str) -> Result<()> {
    attach_returning(netns, dev, XDP_DROP)
}

fn attach_returning(netns: &str, dev: &str, action: i32) -> Result<()> {
    let dev = dev.to_owned();
    crate::in_netns_thread(netns, move || -> Result<()> {
        let prog = load(action)?;
        let name = std::ffi::CString::new(dev.clone())?;
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            bail!("no interface {dev}");
        }
        let mut nested = Vec::new();
        use std::os::fd::AsRawFd as _;
        attr(&mut nested, IFLA_XDP_FD, &prog.as_raw_fd().to_ne_bytes());
        attr(
            &mut nested,
            IFLA_XDP_FLAGS,
            &XDP_FLAGS_DRV_MODE.to_ne_bytes(),
        );
        let mut body = Vec::new();
        // struct ifinfomsg: family, pad, type, index, flags, change.
        body.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        body.extend_from_slice(&(index as i32).to_ne_bytes());
        body.extend_from_slice(&[0u8; 8]);
        attr(&mut body, IFLA_XDP | NLA_F_NESTED, &nested);
        let mut msg = Vec::new();
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&libc::RTM_SETLINK.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&body);
        // SAFETY: a netlink socket this thread owns, closed by OwnedFd;
        // the buffers outlive the calls.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            );
            if fd < 0 {
                bail!("netlink socket: {}", std::io::Error::last_os_error());
            }
            let sock = OwnedFd::from_raw_fd(fd);
            if libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) < 0 {
                bail!("netlink send: {}", std::io::Error::last_os_error());
            }
            let mut reply = [0u8; 1024];
            let n = libc::recv(sock.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0);
            if n < 20 {
                bail!("netlink reply: {}", std::io::Error::last_os_error());
            }
            // NLMSG_ERROR with error 0 is the acknowledgement.
            let kind = u16::from_ne_bytes([reply[4], reply[5]]);
            let error = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
            if kind != libc::NLMSG_ERROR as u16 || error != 0 {
                bail!(
                    "attaching XDP to {dev}: {}",
                    std::io::Error::from_raw_os_error(-error)
                );
            }
        }
        Ok(())
    })?
    .with_context(|| format!("in {netns}"))
}
