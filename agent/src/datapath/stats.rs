//! The programs' counters as the agent reports them.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use aya::maps::{MapData, PerCpuArray};
use nodemesh_ebpf_abi::Stat;

/// The programs' per-CPU counters, summed.
#[derive(Clone)]
pub struct DatapathStats {
    pub(super) counters: Arc<PerCpuArray<MapData, u64>>,
    pub(super) tuples_taken: Arc<AtomicU64>,
}

impl std::fmt::Debug for DatapathStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatapathStats")
    }
}

impl DatapathStats {
    pub fn read(&self) -> Vec<(Stat, u64)> {
        Stat::ALL
            .iter()
            .map(|&stat| {
                let total = self
                    .counters
                    .get(&(stat as u32), 0)
                    .map(|values| values.iter().sum())
                    .unwrap_or(0);
                (stat, total)
            })
            .collect()
    }

    /// TUPLE_DST entries the proxy has taken since this agent started.
    pub fn tuples_taken(&self) -> u64 {
        self.tuples_taken.load(Ordering::Relaxed)
    }
}
