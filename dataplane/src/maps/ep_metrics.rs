//! `dp_ep_metrics`: per-endpoint counters. The programs count; the agent
//! only removes the counters of endpoints that are gone.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::Result;
use aya::maps::{Map, MapData, PerCpuHashMap};
use dataplane_common::{Counter, Direction, EpMetricsKey, MAP_EP_METRICS};
use serde::Serialize;

use super::{Row, endpoints::EndpointMap, open};

pub struct EpMetricsMap(PerCpuHashMap<MapData, EpMetricsKey, Counter>);

impl EpMetricsMap {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(PerCpuHashMap::try_from(map)?))
    }

    pub fn open(pin_dir: &Path) -> Result<Self> {
        Self::new(open(pin_dir, MAP_EP_METRICS)?)
    }

    /// Counters of the endpoint with this id (host-side ifindex) go: an
    /// endpoint that gets the same ifindex later starts from zero.
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<()> {
        for direction in [Direction::FromEndpoint, Direction::ToEndpoint] {
            match self.0.remove(&EpMetricsKey::new(ifindex, direction)) {
                Ok(()) => {}
                Err(e) if super::absent(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Removes the counters of every endpoint not in `live`; returns how
    /// many endpoints' counters went.
    pub fn sweep(&mut self, live: &BTreeSet<u32>) -> Result<usize> {
        let stale: BTreeSet<u32> = self
            .0
            .keys()
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .map(|k| k.ifindex)
            .filter(|i| !live.contains(i))
            .collect();
        for ifindex in &stale {
            self.remove_endpoint(*ifindex)?;
        }
        Ok(stale.len())
    }

    /// Totals over CPUs.
    pub fn totals(&self) -> Result<BTreeMap<EpMetricsKey, Counter>> {
        let mut out = BTreeMap::new();
        for entry in self.0.iter() {
            let (key, per_cpu) = entry?;
            let mut total = Counter::default();
            for c in per_cpu.iter() {
                total += *c;
            }
            out.insert(key, total);
        }
        Ok(out)
    }
}

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

pub fn count(pin_dir: &Path) -> Result<usize> {
    Ok(EpMetricsMap::open(pin_dir)?
        .0
        .keys()
        .try_fold(0, |n, k| k.map(|_| n + 1))?)
}

pub fn rows(pin_dir: &Path) -> Result<Vec<EpMetricsRow>> {
    let mut ips: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (key, info) in EndpointMap::open(pin_dir)?.entries()? {
        if info.ifindex != 0 {
            ips.entry(info.ifindex).or_default().push(key.to_string());
        }
    }
    let mut rows: Vec<EpMetricsRow> = EpMetricsMap::open(pin_dir)?
        .totals()?
        .into_iter()
        .map(|(key, total)| EpMetricsRow {
            ifindex: key.ifindex,
            ips: ips.get(&key.ifindex).cloned().unwrap_or_default(),
            direction: Direction::from_code(key.direction)
                .map_or_else(|| format!("<{}>", key.direction), |d| d.name().to_owned()),
            packets: total.packets,
            bytes: total.bytes,
        })
        .collect();
    rows.sort_by(|a, b| (a.ifindex, &a.direction).cmp(&(b.ifindex, &b.direction)));
    Ok(rows)
}
