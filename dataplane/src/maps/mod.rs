//! One module per map: open it (from its pin, or from the loaded object),
//! read and decode it with the type from `dataplane-common` (rows for people
//! and programs), and, for the maps the agent fills, write it with
//! [`sync_all`] / [`sync_keys`], which compare the desired entries with what
//! the map really holds.

pub mod config;
pub mod ct;
pub mod endpoints;
pub mod ep_metrics;
pub mod events;
pub mod ipcache;
pub mod metrics;
pub mod policy;
pub mod prefilter;
pub mod services;
pub mod sock;

use std::{collections::BTreeMap, fmt::Display, path::Path};

use anyhow::{Result, bail};
use aya::maps::Map;
use dataplane_common::MapSpec;
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

/// Opens the pinned map called `name` (for the CLI and metrics).
pub fn open(pin_dir: &Path, name: &str) -> Result<Map> {
    let Some(spec) = MapSpec::by_name(name) else {
        bail!("no map named {name:?}");
    };
    crate::bpf::open_pinned(pin_dir, spec)
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
        dataplane_common::MAP_SERVICES => render(&services::rows(pin_dir)?, format),
        dataplane_common::MAP_BACKENDS => render(&services::backend_rows(pin_dir)?, format),
        dataplane_common::MAP_MAGLEV => render(&services::maglev_rows(pin_dir)?, format),
        dataplane_common::MAP_CT => render(&ct::rows(pin_dir)?, format),
        dataplane_common::MAP_CT_STATS => render(&ct::stat_rows(pin_dir)?, format),
        dataplane_common::MAP_AFFINITY => render(&ct::affinity_rows(pin_dir)?, format),
        dataplane_common::MAP_FRAGS => render(&ct::frag_rows(pin_dir)?, format),
        dataplane_common::MAP_POLICY => render(&policy::rows(pin_dir)?, format),
        dataplane_common::MAP_POLICY_CIDR => render(&policy::cidr_rows(pin_dir)?, format),
        dataplane_common::MAP_PREFILTER => {
            render(&prefilter::PrefilterMap::open(pin_dir)?.rows()?, format)
        }
        dataplane_common::MAP_SOCK_REV => render(&sock::rows(pin_dir)?, format),
        dataplane_common::MAP_SOCK_CLIENTS => render(&sock::client_rows(pin_dir)?, format),
        dataplane_common::MAP_CT_SCRATCH => render(&ct::scratch_rows(pin_dir)?, format),
        dataplane_common::MAP_EXPLAIN => render(&[explain_row(pin_dir)?], format),
        dataplane_common::MAP_EVENT_MONITORS | dataplane_common::MAP_EVENT_READERS => {
            render(&events::monitor_rows(pin_dir)?, format)
        }
        dataplane_common::MAP_EVENT_SCRATCH => render(&events::scratch_rows(pin_dir)?, format),
        dataplane_common::MAP_POLICY_NAMES => render(&events::name_rows(pin_dir)?, format),
        dataplane_common::MAP_EVENT_STATE => render(&events::state_rows(pin_dir)?, format),
        dataplane_common::MAP_EVENT_CONFIG => render(&events::config_rows(pin_dir)?, format),
        dataplane_common::MAP_EVENTS => {
            bail!("dp_events is a stream: read it with `dataplane monitor`")
        }
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

/// `dp_explain`: what the last dry run noted, as numbers (`dataplane
/// explain` tells them).
#[derive(Debug, Serialize)]
pub struct ExplainRow {
    pub notes: u32,
    pub action: i32,
    pub reason: u32,
    pub frontend: u32,
    pub backend: u32,
    pub route: u8,
    pub egress_result: u8,
    pub egress_policy: u32,
    pub ingress_result: u8,
    pub ingress_policy: u32,
}

impl Row for ExplainRow {
    const HEADERS: &'static [&'static str] = &[
        "NOTES", "ACTION", "REASON", "FRONTEND", "BACKEND", "ROUTE", "EGRESS", "INGRESS",
    ];
    fn cells(&self) -> Vec<String> {
        let t = self;
        vec![
            format!("{:#x}", t.notes),
            t.action.to_string(),
            t.reason.to_string(),
            t.frontend.to_string(),
            t.backend.to_string(),
            t.route.to_string(),
            format!("{} (policy {})", t.egress_result, t.egress_policy),
            format!("{} (policy {})", t.ingress_result, t.ingress_policy),
        ]
    }
}

fn explain_row(pin_dir: &Path) -> Result<ExplainRow> {
    let m: aya::maps::Array<aya::maps::MapData, dataplane_common::ExplainTrace> =
        aya::maps::Array::try_from(open(pin_dir, dataplane_common::MAP_EXPLAIN)?)?;
    let t = m.get(&0, 0)?;
    Ok(ExplainRow {
        notes: t.notes,
        action: t.action,
        reason: t.reason,
        frontend: t.frontend,
        backend: t.backend,
        route: t.route,
        egress_result: t.egress.result,
        egress_policy: t.egress.policy,
        ingress_result: t.ingress.result,
        ingress_policy: t.ingress.policy,
    })
}

/// Entries in use: keys of a hash map or trie, non-zero slots of an array.
pub fn count(pin_dir: &Path, name: &str) -> Result<usize> {
    Ok(match name {
        dataplane_common::MAP_ENDPOINTS => endpoints::count(pin_dir)?,
        dataplane_common::MAP_EP_METRICS => ep_metrics::count(pin_dir)?,
        dataplane_common::MAP_IPCACHE => ipcache::count(pin_dir)?,
        // Sparse array: the slots in use are the non-zero ones.
        dataplane_common::MAP_METRICS => metrics::rows(pin_dir)?.len(),
        dataplane_common::MAP_CONFIG => config::rows(pin_dir)?.len(),
        dataplane_common::MAP_SERVICES
        | dataplane_common::MAP_BACKENDS
        | dataplane_common::MAP_MAGLEV => services::count(pin_dir, name)?,
        dataplane_common::MAP_CT
        | dataplane_common::MAP_CT_STATS
        | dataplane_common::MAP_AFFINITY
        | dataplane_common::MAP_FRAGS
        | dataplane_common::MAP_CT_SCRATCH => ct::count(pin_dir, name)?,
        dataplane_common::MAP_POLICY | dataplane_common::MAP_POLICY_CIDR => {
            policy::count(pin_dir, name)?
        }
        dataplane_common::MAP_POLICY_NAMES => events::name_rows(pin_dir)?.len(),
        dataplane_common::MAP_PREFILTER => prefilter::PrefilterMap::open(pin_dir)?.entries()?.len(),
        dataplane_common::MAP_SOCK_REV => sock::rows(pin_dir)?.len(),
        dataplane_common::MAP_SOCK_CLIENTS => sock::client_rows(pin_dir)?.len(),
        dataplane_common::MAP_EVENT_STATE
        | dataplane_common::MAP_EVENT_CONFIG
        | dataplane_common::MAP_EVENT_SCRATCH
        | dataplane_common::MAP_EXPLAIN => 1,
        dataplane_common::MAP_EVENT_MONITORS | dataplane_common::MAP_EVENT_READERS => {
            events::monitor_rows(pin_dir)?.len()
        }
        // Bytes waiting to be read are not entries.
        dataplane_common::MAP_EVENTS => 0,
        _ => bail!("no map named {name:?}"),
    })
}

/// Whether a map error only says the key is not there (aya reports it as
/// `KeyNotFound` for some map types and as a raw ENOENT for others).
pub fn absent(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// A map the agent fills, seen as a table of keys and values.
pub trait Table {
    type K: Ord + Copy + Display;
    type V: PartialEq + Copy;
    const NAME: &'static str;
    /// The entries the map really holds for `keys`.
    fn read(&self, keys: &[Self::K]) -> Result<BTreeMap<Self::K, Self::V>>;
    /// Every entry the map really holds.
    fn read_all(&self) -> Result<BTreeMap<Self::K, Self::V>>;
    fn put(&mut self, k: &Self::K, v: &Self::V) -> Result<()>;
    /// Removing a key that is not there is not an error.
    fn delete(&mut self, k: &Self::K) -> Result<()>;
}

/// What a sync changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
}

impl SyncStats {
    pub fn is_empty(&self) -> bool {
        *self == SyncStats::default()
    }
}

impl std::ops::AddAssign for SyncStats {
    fn add_assign(&mut self, o: Self) {
        self.added += o.added;
        self.changed += o.changed;
        self.removed += o.removed;
    }
}

/// Brings the keys in `keys` to what `desired` says: entries that are
/// missing or differ from the map's real contents are written first, then
/// keys `desired` lacks are removed, so no entry that should be there is
/// ever missing on the way.
pub fn sync_keys<T: Table>(
    table: &mut T,
    desired: &BTreeMap<T::K, T::V>,
    keys: impl IntoIterator<Item = T::K>,
) -> Result<SyncStats> {
    let keys: Vec<T::K> = keys.into_iter().collect();
    let actual = table.read(&keys)?;
    apply(table, desired, keys, &actual)
}

fn apply<T: Table>(
    table: &mut T,
    desired: &BTreeMap<T::K, T::V>,
    keys: Vec<T::K>,
    actual: &BTreeMap<T::K, T::V>,
) -> Result<SyncStats> {
    let mut stats = SyncStats::default();
    let mut stale = Vec::new();
    for k in keys {
        let actual = actual.get(&k).copied();
        match (desired.get(&k), actual) {
            (Some(want), Some(have)) if *want == have => {}
            (Some(want), have) => {
                table
                    .put(&k, want)
                    .map_err(|e| e.context(format!("{}: writing {k}", T::NAME)))?;
                if have.is_some() {
                    stats.changed += 1;
                } else {
                    stats.added += 1;
                }
            }
            (None, Some(_)) => stale.push(k),
            (None, None) => {}
        }
    }
    for k in stale {
        table
            .delete(&k)
            .map_err(|e| e.context(format!("{}: removing {k}", T::NAME)))?;
        stats.removed += 1;
    }
    Ok(stats)
}

/// [`sync_keys`] over every key: those desired and those the map holds.
pub fn sync_all<T: Table>(table: &mut T, desired: &BTreeMap<T::K, T::V>) -> Result<SyncStats> {
    let actual = table.read_all()?;
    let mut keys: Vec<T::K> = desired.keys().copied().collect();
    keys.extend(actual.keys().filter(|k| !desired.contains_key(k)));
    apply(table, desired, keys, &actual)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = super::table(&["A", "LONGER"], vec![vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\n");
    }

    /// An in-memory map that records the order of writes.
    #[derive(Default)]
    struct Fake {
        entries: BTreeMap<u32, u32>,
        log: Vec<String>,
    }

    impl Table for Fake {
        type K = u32;
        type V = u32;
        const NAME: &'static str = "fake";
        fn read(&self, keys: &[u32]) -> Result<BTreeMap<u32, u32>> {
            Ok(keys
                .iter()
                .filter_map(|k| Some((*k, *self.entries.get(k)?)))
                .collect())
        }
        fn read_all(&self) -> Result<BTreeMap<u32, u32>> {
            Ok(self.entries.clone())
        }
        fn put(&mut self, k: &u32, v: &u32) -> Result<()> {
            self.log.push(format!("put {k}"));
            self.entries.insert(*k, *v);
            Ok(())
        }
        fn delete(&mut self, k: &u32) -> Result<()> {
            self.log.push(format!("del {k}"));
            self.entries.remove(k);
            Ok(())
        }
    }

    #[test]
    fn sync_compares_with_real_contents_and_writes_before_removing() {
        // What an earlier agent left: 1 current, 2 stale, 3 with an old value.
        let mut t = Fake {
            entries: BTreeMap::from([(1, 10), (2, 20), (3, 30)]),
            ..Default::default()
        };
        let desired = BTreeMap::from([(1, 10), (3, 31), (4, 40)]);
        let s = sync_all(&mut t, &desired).unwrap();
        assert_eq!(
            s,
            SyncStats {
                added: 1,
                changed: 1,
                removed: 1
            }
        );
        assert_eq!(t.entries, desired);
        assert_eq!(t.log, ["put 3", "put 4", "del 2"]);
        // A second pass finds nothing to do.
        t.log.clear();
        assert!(sync_all(&mut t, &desired).unwrap().is_empty());
        assert!(t.log.is_empty());
        // A key-limited pass touches only those keys, even if others drifted.
        t.entries.insert(9, 90);
        t.entries.remove(&4);
        let s = sync_keys(&mut t, &desired, [4]).unwrap();
        assert_eq!(s.added, 1);
        assert_eq!(t.entries.get(&9), Some(&90));
    }
}
