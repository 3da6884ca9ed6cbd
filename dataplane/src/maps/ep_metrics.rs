use std::{collections::BTreeMap, path::Path};

use anyhow::Result;
use aya::maps::{MapData, PerCpuHashMap};
use dataplane_common::{Counter, Direction, EpMetricsKey, MAP_EP_METRICS};
use serde::Serialize;

use super::{Row, endpoints, open};

#[derive(Debug, Serialize)]
pub struct EpMetricsRow {
    /// The endpoint id: its host-side ifindex.
    pub ifindex: u32,
    /// The endpoint's addresses, from the endpoints map (empty if it is gone).
    pub ips: Vec<String>,
    pub direction: String,
    pub packets: u64,
    pub bytes: u64,
}

impl Row for EpMetricsRow {
    const HEADERS: &'static [&'static str] =
        &["IFINDEX", "ENDPOINT", "DIRECTION", "PACKETS", "BYTES"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.ifindex.to_string(),
            if self.ips.is_empty() {
                "-".into()
            } else {
                self.ips.join(",")
            },
            self.direction.clone(),
            self.packets.to_string(),
            self.bytes.to_string(),
        ]
    }
}

pub fn rows(pin_dir: &Path) -> Result<Vec<EpMetricsRow>> {
    let map: PerCpuHashMap<MapData, EpMetricsKey, Counter> =
        PerCpuHashMap::try_from(open(pin_dir, MAP_EP_METRICS)?)?;
    let mut ips: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (key, info) in endpoints::entries(pin_dir)? {
        ips.entry(info.ifindex).or_default().push(key.to_string());
    }
    let mut rows = Vec::new();
    for entry in map.iter() {
        let (key, per_cpu) = entry?;
        let mut total = Counter::default();
        for c in per_cpu.iter() {
            total += *c;
        }
        rows.push(EpMetricsRow {
            ifindex: key.ifindex,
            ips: ips.get(&key.ifindex).cloned().unwrap_or_default(),
            direction: Direction::from_code(key.direction)
                .map_or_else(|| format!("<{}>", key.direction), |d| d.name().to_owned()),
            packets: total.packets,
            bytes: total.bytes,
        });
    }
    rows.sort_by(|a, b| (a.ifindex, &a.direction).cmp(&(b.ifindex, &b.direction)));
    Ok(rows)
}
