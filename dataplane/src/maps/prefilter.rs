//! `dp_prefilter`: source prefixes dropped on the uplink before the stack.
//! The agent owns the set (`--deny-cidr`, changed live through its API);
//! the programs own the per-prefix packet counts, which a change of the set
//! leaves alone for the prefixes that stay.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{Result, bail};
use aya::maps::{
    Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use dataplane_common::{
    IPCACHE_STATIC_PREFIX, IpcacheKey, MAP_PREFILTER, PrefilterEntry, PrefilterKey,
};
use ipnetwork::IpNetwork;
use serde::Serialize;

use super::{Row, open};

pub struct PrefilterMap(LpmTrie<MapData, PrefilterKey, PrefilterEntry>);

fn key(net: &IpNetwork) -> Key<PrefilterKey> {
    let (len, addr) = IpcacheKey::prefix(net.network(), net.prefix());
    Key::new(len, PrefilterKey { addr, _tail: 0 })
}

fn from_key(k: &Key<PrefilterKey>) -> Option<IpNetwork> {
    let ip = k.data().addr.ip()?;
    let len = u8::try_from(k.prefix_len().checked_sub(IPCACHE_STATIC_PREFIX)?).ok()?;
    IpNetwork::new(ip, len).ok()
}

/// A denied prefix as `dataplane prefilter list` shows it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PrefilterRow {
    pub cidr: String,
    pub packets: u64,
}

impl Row for PrefilterRow {
    const HEADERS: &'static [&'static str] = &["CIDR", "PACKETS DROPPED"];
    fn cells(&self) -> Vec<String> {
        vec![self.cidr.clone(), self.packets.to_string()]
    }
}

/// Parses a prefix to deny (an address alone is its /32): IPv4 only (the
/// programs filter IPv4), host bits zero, so that what is listed is what
/// was given.
pub fn parse_cidr(s: &str) -> Result<IpNetwork> {
    let full = if s.contains('/') {
        s.to_owned()
    } else {
        format!("{s}/32")
    };
    let net = dataplane_common::api::parse_cidr(&full).map_err(|e| anyhow::anyhow!(e))?;
    if !net.is_ipv4() {
        bail!("{s:?}: only IPv4 prefixes are filtered");
    }
    Ok(net)
}

impl PrefilterMap {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(LpmTrie::try_from(map)?))
    }

    pub fn open(pin_dir: &Path) -> Result<Self> {
        Self::new(open(pin_dir, MAP_PREFILTER)?)
    }

    pub fn entries(&self) -> Result<BTreeMap<IpNetwork, u64>> {
        let mut out = BTreeMap::new();
        for item in self.0.iter() {
            let (k, v) = item?;
            if let Some(net) = from_key(&k) {
                out.insert(net, v.packets);
            }
        }
        Ok(out)
    }

    pub fn rows(&self) -> Result<Vec<PrefilterRow>> {
        Ok(self
            .entries()?
            .into_iter()
            .map(|(cidr, packets)| PrefilterRow {
                cidr: cidr.to_string(),
                packets,
            })
            .collect())
    }

    /// Makes the map hold exactly `want`: new prefixes start at zero,
    /// kept ones keep their counts. Returns (added, removed).
    pub fn set(&mut self, want: &BTreeSet<IpNetwork>) -> Result<(usize, usize)> {
        let have = self.entries()?;
        let mut added = 0;
        for net in want.iter().filter(|n| !have.contains_key(n)) {
            self.0.insert(&key(net), PrefilterEntry::default(), 0)?;
            added += 1;
        }
        let mut removed = 0;
        for net in have.keys().filter(|n| !want.contains(n)) {
            match self.0.remove(&key(net)) {
                Ok(()) => removed += 1,
                Err(e) if super::absent(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok((added, removed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_ipv4_networks() {
        assert_eq!(
            parse_cidr("192.0.2.0/24").expect("ok").to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            parse_cidr("192.0.2.7").expect("ok").to_string(),
            "192.0.2.7/32"
        );
        assert!(
            parse_cidr("192.0.2.7/24")
                .expect_err("host bits")
                .to_string()
                .contains("the network is 192.0.2.0/24")
        );
        assert!(parse_cidr("2001:db8::/32").is_err());
        assert!(parse_cidr("nonsense").is_err());
    }
}
