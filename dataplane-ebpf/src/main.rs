//! Kernel programs, one module per attach point, features as modules.
//!
//! Attach points: `lxc` (a pod's host-side veth). Later: `host` (node
//! devices), `overlay` (the VXLAN device), `xdp`, `sock`.
#![no_std]
#![no_main]

mod drop;
mod endpoints;
mod lxc;
mod metrics;
mod parse;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that can reach this, so it is never run.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
