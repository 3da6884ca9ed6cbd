//! `dp_metrics`: verdicts by hook, direction and reason. Only the programs
//! write it.

use std::path::Path;

use anyhow::Result;
use aya::maps::{MapData, PerCpuArray};
use dataplane_common::{Counter, MAP_METRICS, metrics_slot};
use serde::Serialize;

use super::{Row, open};

#[derive(Debug, Serialize)]
pub struct MetricsRow {
    pub hook: String,
    pub direction: String,
    pub reason: String,
    pub drop: bool,
    pub packets: u64,
    pub bytes: u64,
}

impl Row for MetricsRow {
    const HEADERS: &'static [&'static str] = &["HOOK", "DIRECTION", "REASON", "PACKETS", "BYTES"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.hook.clone(),
            self.direction.clone(),
            self.reason.clone(),
            self.packets.to_string(),
            self.bytes.to_string(),
        ]
    }
}

/// Non-zero slots only: the table is sparse by design.
pub fn rows(pin_dir: &Path) -> Result<Vec<MetricsRow>> {
    let map: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(open(pin_dir, MAP_METRICS)?)?;
    let mut rows = Vec::new();
    for index in 0..map.len() {
        let Some((hook, direction, reason)) = metrics_slot(index) else {
            continue;
        };
        let mut total = Counter::default();
        for c in map.get(&index, 0)?.iter() {
            total += *c;
        }
        if total.packets > 0 {
            rows.push(MetricsRow {
                hook: hook.name().into(),
                direction: direction.name().into(),
                reason: reason.name().into(),
                drop: reason.is_drop(),
                packets: total.packets,
                bytes: total.bytes,
            });
        }
    }
    Ok(rows)
}
