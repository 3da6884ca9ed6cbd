//! One module per map: open it from its pin, decode it with the type from
//! `dataplane-common`, render rows for people (table) or programs (JSON).

pub mod config;
pub mod endpoints;
pub mod ep_metrics;
pub mod ipcache;
pub mod metrics;

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use aya::maps::{Map, MapData};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// A decoded map entry.
pub trait Row: Serialize {
    const HEADERS: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

pub fn open(pin_dir: &Path, name: &str) -> Result<Map> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

pub fn render<R: Row>(rows: &[R], format: Format) -> Result<String> {
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(rows)? + "\n",
        Format::Table => table(R::HEADERS, rows.iter().map(Row::cells).collect()),
    })
}

pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in &rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Decodes and renders the map called `name`.
pub fn dump(pin_dir: &Path, name: &str, format: Format) -> Result<String> {
    match name {
        dataplane_common::MAP_ENDPOINTS => render(&endpoints::rows(pin_dir)?, format),
        dataplane_common::MAP_EP_METRICS => render(&ep_metrics::rows(pin_dir)?, format),
        dataplane_common::MAP_METRICS => render(&metrics::rows(pin_dir)?, format),
        dataplane_common::MAP_IPCACHE => render(&ipcache::rows(pin_dir)?, format),
        dataplane_common::MAP_CONFIG => render(&config::rows(pin_dir)?, format),
        _ => bail!(
            "no map named {name:?}; maps: {}",
            dataplane_common::MAPS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Entries in use: keys of a hash map, non-zero slots of an array.
pub fn count(pin_dir: &Path, name: &str) -> Result<usize> {
    use aya::maps::{HashMap, PerCpuHashMap, lpm_trie::LpmTrie};
    use dataplane_common::{
        Counter, EndpointInfo, EndpointKey, EpMetricsKey, IpcacheEntry, IpcacheKey,
    };
    // Keys only for hash-like maps: counting needs no decoding (and, for
    // the endpoint counters, no join with the endpoint map).
    let keys = |n: Result<usize, aya::maps::MapError>| n.map_err(anyhow::Error::from);
    Ok(match name {
        dataplane_common::MAP_ENDPOINTS => {
            let m: HashMap<MapData, EndpointKey, EndpointInfo> =
                HashMap::try_from(open(pin_dir, name)?)?;
            keys(m.keys().try_fold(0, |n, k| k.map(|_| n + 1)))?
        }
        dataplane_common::MAP_EP_METRICS => {
            let m: PerCpuHashMap<MapData, EpMetricsKey, Counter> =
                PerCpuHashMap::try_from(open(pin_dir, name)?)?;
            keys(m.keys().try_fold(0, |n, k| k.map(|_| n + 1)))?
        }
        dataplane_common::MAP_IPCACHE => {
            let m: LpmTrie<MapData, IpcacheKey, IpcacheEntry> =
                LpmTrie::try_from(open(pin_dir, name)?)?;
            keys(m.keys().try_fold(0, |n, k| k.map(|_| n + 1)))?
        }
        // Sparse array: the slots in use are the non-zero ones.
        dataplane_common::MAP_METRICS => metrics::rows(pin_dir)?.len(),
        dataplane_common::MAP_CONFIG => config::rows(pin_dir)?.len(),
        _ => bail!("no map named {name:?}"),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns_columns() {
        let t = super::table(&["A", "LONGER"], vec![vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\n");
    }
}
