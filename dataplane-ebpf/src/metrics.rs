//! Counters: the verdict table (by hook, direction and reason) and per
//! endpoint.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    btf_maps::{PerCpuArray, PerCpuHashMap},
    macros::btf_map,
};
use aya_log_ebpf::info;
use dataplane_common::{Counter, Direction, EP_METRICS_MAX, EpMetricsKey, Hook, METRICS_MAX};

#[btf_map(name = "dp_metrics")]
static METRICS: PerCpuArray<Counter, { METRICS_MAX as usize }> = PerCpuArray::new();

#[btf_map(name = "dp_ep_metrics")]
static EP_METRICS: PerCpuHashMap<EpMetricsKey, Counter, { EP_METRICS_MAX as usize }> =
    PerCpuHashMap::new();

/// Counts one packet under (hook, direction, reason code); see
/// [`dataplane_common::metrics_index`].
#[inline(always)]
pub fn count_verdict(hook: Hook, direction: Direction, reason: u32, len: u32) {
    let index = ((hook as u32) << 11) | ((direction as u32) << 8) | (reason & 0xff);
    if let Some(c) = METRICS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of a preallocated array; programs do not
        // migrate CPUs while running, so nothing else writes it concurrently.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
    }
}

/// Counts one packet for the endpoint behind `ifindex`. A subprogram: its
/// log record's stack stays off the packet path's frames.
#[inline(never)]
pub fn count_endpoint<C: EbpfContext>(ctx: &C, ifindex: u32, direction: Direction, len: u32) {
    let key = EpMetricsKey::new(ifindex, direction);
    match EP_METRICS.get_ptr_mut(&key) {
        // SAFETY: as above, this CPU's value of a per-CPU hash entry.
        Some(c) => unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        },
        None => {
            let first = Counter {
                packets: 1,
                bytes: u64::from(len),
            };
            // NOEXIST: if another CPU created the entry meanwhile, its packet
            // is already counted there and ours is the one lost, once.
            if EP_METRICS
                .insert(&key, &first, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                info!(
                    ctx,
                    "endpoint ifindex {} first packet {}",
                    ifindex,
                    direction.name()
                );
            }
        }
    }
}
