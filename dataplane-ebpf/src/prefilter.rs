//! The prefilter: packets from source prefixes the operator denies are
//! dropped on the uplink, in XDP before the stack allocates an skb (or in
//! tc when XDP is off), counted per prefix and under `prefilter_denied`.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{btf_maps::LpmTrie, macros::btf_map, maps::lpm_trie::Key};
use dataplane_common::{IPCACHE_STATIC_PREFIX, PREFILTER_MAX, PrefilterEntry, PrefilterKey};

#[btf_map(name = "dp_prefilter")]
static PREFILTER: LpmTrie<PrefilterKey, PrefilterEntry, { PREFILTER_MAX as usize }> =
    LpmTrie::new();

/// Whether `saddr` is in a denied prefix; a denied packet is counted on
/// its prefix. A leaf call: the callers' frames are deep.
#[inline(never)]
pub fn denied(saddr: [u8; 4]) -> bool {
    let key = Key::new(IPCACHE_STATIC_PREFIX + 32, PrefilterKey::v4(saddr));
    match PREFILTER.get(&key) {
        Some(e) => {
            // SAFETY: a map value, 8-aligned and writable; every CPU adds
            // atomically (BPF_ATOMIC add), so counts are exact under floods.
            unsafe {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                    &e.packets as *const u64 as *mut u64,
                    1,
                );
            }
            true
        }
        None => false,
    }
}
