//! The source filter's per-CPU counters: the totals by verdict and, per
//! guarded port, what was allowed and dropped; summed over the CPUs here.

use std::{collections::BTreeMap, fmt, sync::Mutex};

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use proxy_common::{PortFilterStats, SourceFilterStats, map};

use super::SourceFilterError;
use crate::kernel::KernelError;

/// The filter's counter maps. A shared handle (the metrics read it) holds
/// the maps, not the program's link: the filter still detaches when dropped.
pub struct SourceFilterCounters {
    /// [`map::SOURCE_STATS`].
    pub(super) totals: PerCpuArray<MapData, SourceFilterStats>,
    /// [`map::GUARDED_PORTS`]: the reload adds and removes its ports, so it
    /// is behind a lock (held for one map call at a time).
    pub(super) ports: Mutex<PerCpuHashMap<MapData, u16, PortFilterStats>>,
}

impl fmt::Debug for SourceFilterCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, {}", map::SOURCE_STATS, map::GUARDED_PORTS)
    }
}

impl SourceFilterCounters {
    /// The counters now, summed over all CPUs.
    pub fn read(&self) -> Result<SourceFilterStats, SourceFilterError> {
        let per_cpu =
            self.totals.get(&0, 0).map_err(|source| KernelError::Map { name: map::SOURCE_STATS, source })?;
        Ok(per_cpu.iter().fold(SourceFilterStats::default(), |sum, cpu| sum.add(*cpu)))
    }

    /// Each guarded port's counters now, summed over all CPUs. A port
    /// unguarded by a reload is gone, with its counts (the totals keep them).
    pub fn read_ports(&self) -> Result<BTreeMap<u16, PortFilterStats>, SourceFilterError> {
        let ports = self.ports.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = BTreeMap::new();
        for entry in ports.iter() {
            let (port, per_cpu) =
                entry.map_err(|source| KernelError::Map { name: map::GUARDED_PORTS, source })?;
            out.insert(port, per_cpu.iter().fold(PortFilterStats::default(), |sum, cpu| sum.add(*cpu)));
        }
        Ok(out)
    }
}
