//! Kernel programs, one module per attach point, features as modules.
//!
//! Attach points: `lxc` (a pod's host-side veth), `host` (the node's
//! uplink), `overlay` (the VXLAN device). Later: `xdp`, `sock`.
#![no_std]
#![no_main]

mod config;
mod deliver;
mod drop;
mod encap;
mod endpoints;
mod host;
mod ipcache;
mod lxc;
mod metrics;
mod overlay;
mod parse;
mod route;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that can reach this, so it is never run.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
