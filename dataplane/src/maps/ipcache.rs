use std::path::Path;

use anyhow::Result;
use aya::maps::{MapData, lpm_trie::LpmTrie};
use dataplane_common::{IPCACHE_STATIC_PREFIX, IpcacheEntry, IpcacheKey, MAP_IPCACHE};
use serde::Serialize;

use super::{Row, open};

#[derive(Debug, Serialize)]
pub struct IpcacheRow {
    pub prefix: String,
    pub kind: String,
    pub tunnel_endpoint: Option<String>,
    pub identity: u32,
}

impl Row for IpcacheRow {
    const HEADERS: &'static [&'static str] = &["PREFIX", "KIND", "TUNNEL-ENDPOINT", "IDENTITY"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.prefix.clone(),
            self.kind.clone(),
            self.tunnel_endpoint.clone().unwrap_or_else(|| "-".into()),
            self.identity.to_string(),
        ]
    }
}

pub fn rows(pin_dir: &Path) -> Result<Vec<IpcacheRow>> {
    let map: LpmTrie<MapData, IpcacheKey, IpcacheEntry> =
        LpmTrie::try_from(open(pin_dir, MAP_IPCACHE)?)?;
    let mut rows = Vec::new();
    for item in map.iter() {
        let (key, entry) = item?;
        let addr = key
            .data()
            .ip()
            .map_or_else(|| "?".into(), |ip| ip.to_string());
        rows.push((
            (key.data().family, key.data().addr, key.prefix_len()),
            IpcacheRow {
                prefix: format!(
                    "{addr}/{}",
                    key.prefix_len().saturating_sub(IPCACHE_STATIC_PREFIX)
                ),
                kind: entry.kind_name().into(),
                tunnel_endpoint: entry.tunnel_endpoint().map(|ip| ip.to_string()),
                identity: entry.identity,
            },
        ));
    }
    rows.sort_by_key(|(order, _)| *order);
    Ok(rows.into_iter().map(|(_, r)| r).collect())
}
