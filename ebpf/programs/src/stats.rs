//! Per-CPU event counters, summed by the agent for its metrics.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use nodemesh_ebpf_abi::Stat;

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: the pointer comes from a successful lookup of this CPU's slot and stays valid
        // for the program's run; a per-CPU slot has no concurrent writer.
        unsafe { *slot += 1 };
    }
}
