//! Kernel programs, one module per attach point, features as modules.
//!
//! Attach points: `lxc` (a pod's host-side veth), `host` (the node's
//! uplink: XDP and tc), `overlay` (the VXLAN device), `hostdev` (the
//! node's host device), `sock` (the node's cgroup). Each program is a thin entry point; the per-packet work sits in
//! `#[inline(never)]` functions that become BPF-to-BPF calls, so the
//! verifier checks each once and the programs stay small as features grow.
#![no_std]
#![no_main]
// atomic_xadd: `core` has no atomic add for the bpf target, the backend does.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod arp;
mod config;
mod ct;
mod deliver;
mod encap;
mod endpoints;
mod events;
mod explain;
mod fwd;
mod host;
mod hostdev;
mod icmp;
mod ipcache;
mod l4;
mod lb;
mod lxc;
mod metrics;
mod nat;
mod overlay;
mod parse;
mod policy;
mod prefilter;
mod route;
mod sock;
mod svc;
mod verdict;
mod xdp_lb;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that can reach this, so it is never run.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
