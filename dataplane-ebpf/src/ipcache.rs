//! Longest-prefix lookup of what an address belongs to, filled by the agent.

use aya_ebpf::{btf_maps::LpmTrie, macros::btf_map, maps::lpm_trie::Key};
use dataplane_common::{IPCACHE_MAX, IPCACHE_STATIC_PREFIX, IpcacheEntry, IpcacheKey};

#[btf_map(name = "dp_ipcache")]
static IPCACHE: LpmTrie<IpcacheKey, IpcacheEntry, { IPCACHE_MAX as usize }> = LpmTrie::new();

#[inline(always)]
pub fn lookup_v4(addr: [u8; 4]) -> Option<&'static IpcacheEntry> {
    IPCACHE.get(&Key::new(IPCACHE_STATIC_PREFIX + 32, IpcacheKey::v4(addr)))
}
