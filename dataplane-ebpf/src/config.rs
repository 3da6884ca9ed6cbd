//! The agent's settings for the datapath (one slot).

use aya_ebpf::{btf_maps::Array, macros::btf_map};
use dataplane_common::{DatapathConfig, Reason};

#[btf_map(name = "dp_config")]
static CONFIG: Array<DatapathConfig, 1> = Array::new();

#[inline(always)]
pub fn get() -> Result<&'static DatapathConfig, Reason> {
    match CONFIG.get(0) {
        Some(c) if c.mode != 0 => Ok(c),
        _ => Err(Reason::NotConfigured),
    }
}
