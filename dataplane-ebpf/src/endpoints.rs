//! The endpoint table, filled by the agent.

use aya_ebpf::{btf_maps::HashMap, macros::btf_map};
use dataplane_common::{ENDPOINTS_MAX, EndpointInfo, EndpointKey};

#[btf_map(name = "dp_endpoints")]
static ENDPOINTS: HashMap<EndpointKey, EndpointInfo, { ENDPOINTS_MAX as usize }> = HashMap::new();

#[inline(always)]
pub fn lookup(key: &EndpointKey) -> Option<&'static EndpointInfo> {
    // SAFETY: the agent writes entries whole with bpf_map_update_elem; a
    // reader sees either the old or the new value of a field, never garbage.
    unsafe { ENDPOINTS.get(key) }
}
