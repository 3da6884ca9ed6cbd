//! `dp_endpoints`: endpoints by IP. Local pods (registered through the
//! agent's API) and other nodes' pods (from the cluster state) share the
//! map; this module owns its desired contents and every write to it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::Result;
use aya::maps::{HashMap, Map, MapData};
use dataplane_common::{EP_F_LOCAL, EndpointInfo, EndpointKey, MAP_ENDPOINTS, format_mac};
use serde::Serialize;

use super::{Row, SyncStats, Table, open, sync_all, sync_keys};

pub struct EndpointMap(HashMap<MapData, EndpointKey, EndpointInfo>);

impl EndpointMap {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(HashMap::try_from(map)?))
    }

    pub fn open(pin_dir: &Path) -> Result<Self> {
        Self::new(open(pin_dir, MAP_ENDPOINTS)?)
    }

    pub fn entries(&self) -> Result<BTreeMap<EndpointKey, EndpointInfo>> {
        Ok(self.0.iter().collect::<Result<_, _>>()?)
    }
}

impl Table for EndpointMap {
    type K = EndpointKey;
    type V = EndpointInfo;
    const NAME: &'static str = MAP_ENDPOINTS;

    fn read(&self, keys: &[EndpointKey]) -> Result<BTreeMap<EndpointKey, EndpointInfo>> {
        let mut out = BTreeMap::new();
        for k in keys {
            match self.0.get(k, 0) {
                Ok(v) => {
                    out.insert(*k, v);
                }
                Err(e) if super::absent(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    fn read_all(&self) -> Result<BTreeMap<EndpointKey, EndpointInfo>> {
        self.entries()
    }

    fn put(&mut self, k: &EndpointKey, v: &EndpointInfo) -> Result<()> {
        Ok(self.0.insert(k, v, 0)?)
    }

    fn delete(&mut self, k: &EndpointKey) -> Result<()> {
        match self.0.remove(k) {
            Ok(()) => Ok(()),
            Err(e) if super::absent(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The desired contents: local endpoints by container id, remote pods by
/// address. A local endpoint's entry always wins over a remote pod's claim.
pub struct Endpoints {
    map: EndpointMap,
    local: BTreeMap<String, Vec<(EndpointKey, EndpointInfo)>>,
    remote: BTreeMap<EndpointKey, String>,
    /// Security identities of pod addresses (NetworkPolicy).
    identities: BTreeMap<EndpointKey, u32>,
    desired: BTreeMap<EndpointKey, EndpointInfo>,
}

impl Endpoints {
    pub fn new(map: EndpointMap) -> Self {
        Self {
            map,
            local: BTreeMap::new(),
            remote: BTreeMap::new(),
            identities: BTreeMap::new(),
            desired: BTreeMap::new(),
        }
    }

    fn owner_local(&self, key: &EndpointKey) -> Option<&str> {
        self.local
            .iter()
            .find(|(_, e)| e.iter().any(|(k, _)| k == key))
            .map(|(id, _)| id.as_str())
    }

    fn recompute(&mut self, key: EndpointKey) {
        let local = self
            .local
            .values()
            .flat_map(|e| e.iter())
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v);
        match local.or_else(|| self.remote.contains_key(&key).then(EndpointInfo::default)) {
            Some(mut v) => {
                v.identity = self.identities.get(&key).copied().unwrap_or(0);
                self.desired.insert(key, v)
            }
            None => self.desired.remove(&key),
        };
    }

    /// Which local endpoint, if any, has one of `keys` already.
    pub fn local_conflict(&self, id: &str, keys: &[EndpointKey]) -> Option<(EndpointKey, String)> {
        keys.iter().find_map(|k| {
            self.owner_local(k)
                .filter(|owner| *owner != id)
                .map(|o| (*k, o.to_owned()))
        })
    }

    /// Sets (or with no entries, removes) a local endpoint's entries.
    pub fn set_local(
        &mut self,
        id: &str,
        entries: Vec<(EndpointKey, EndpointInfo)>,
    ) -> Result<SyncStats> {
        let mut touched: BTreeSet<EndpointKey> = entries.iter().map(|(k, _)| *k).collect();
        let old = if entries.is_empty() {
            self.local.remove(id)
        } else {
            self.local.insert(id.to_owned(), entries)
        };
        touched.extend(old.unwrap_or_default().into_iter().map(|(k, _)| k));
        for k in &touched {
            self.recompute(*k);
        }
        sync_keys(&mut self.map, &self.desired, touched)
    }

    /// Sets the owner of each remote pod address a change touched (`None`:
    /// no remote pod has it); returns what the map needed.
    pub fn set_remote(
        &mut self,
        changes: impl IntoIterator<Item = (EndpointKey, Option<String>)>,
    ) -> Result<SyncStats> {
        let mut touched = Vec::new();
        for (k, pod) in changes {
            match pod {
                Some(p) => self.remote.insert(k, p),
                None => self.remote.remove(&k),
            };
            self.recompute(k);
            touched.push(k);
        }
        sync_keys(&mut self.map, &self.desired, touched)
    }

    /// Sets the security identity of every pod address (the whole map of
    /// them); returns what the map needed.
    pub fn set_identities(&mut self, ids: BTreeMap<EndpointKey, u32>) -> Result<SyncStats> {
        let mut touched: BTreeSet<EndpointKey> = BTreeSet::new();
        for (k, v) in &ids {
            if self.identities.get(k) != Some(v) {
                touched.insert(*k);
            }
        }
        for k in self.identities.keys() {
            if !ids.contains_key(k) {
                touched.insert(*k);
            }
        }
        self.identities = ids;
        for k in &touched {
            self.recompute(*k);
        }
        sync_keys(&mut self.map, &self.desired, touched)
    }

    /// The identity of a pod address, 0 when unknown.
    pub fn identity(&self, key: &EndpointKey) -> u32 {
        self.identities.get(key).copied().unwrap_or(0)
    }

    /// Whether a local endpoint has this address.
    pub fn is_local(&self, key: &EndpointKey) -> bool {
        self.owner_local(key).is_some()
    }

    /// Compares the whole map with the desired contents and fixes it.
    pub fn sync_all(&mut self) -> Result<SyncStats> {
        sync_all(&mut self.map, &self.desired)
    }

    /// Only local entries: at start, before the cluster state is known,
    /// entries of endpoints that went away while the agent was down go,
    /// while remote pods' entries stay until the cluster state says.
    pub fn sync_local(&mut self) -> Result<SyncStats> {
        let mut keys: BTreeSet<EndpointKey> = self
            .local
            .values()
            .flat_map(|e| e.iter().map(|(k, _)| *k))
            .collect();
        for (k, v) in self.map.entries()? {
            if v.flags & EP_F_LOCAL != 0 {
                keys.insert(k);
            }
        }
        sync_keys(&mut self.map, &self.desired, keys)
    }

    pub fn desired(&self) -> &BTreeMap<EndpointKey, EndpointInfo> {
        &self.desired
    }
}

#[derive(Debug, Serialize)]
pub struct EndpointRow {
    pub ip: String,
    pub ifindex: u32,
    pub identity: u32,
    pub mac: String,
    pub host_mac: String,
    pub local: bool,
}

impl Row for EndpointRow {
    const HEADERS: &'static [&'static str] =
        &["IP", "IFINDEX", "IDENTITY", "MAC", "HOST-MAC", "LOCAL"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.ip.clone(),
            self.ifindex.to_string(),
            self.identity.to_string(),
            self.mac.clone(),
            self.host_mac.clone(),
            self.local.to_string(),
        ]
    }
}

/// Keys only: counting needs no decoding.
pub fn count(pin_dir: &Path) -> Result<usize> {
    Ok(EndpointMap::open(pin_dir)?
        .0
        .keys()
        .try_fold(0, |n, k| k.map(|_| n + 1))?)
}

pub fn rows(pin_dir: &Path) -> Result<Vec<EndpointRow>> {
    Ok(EndpointMap::open(pin_dir)?
        .entries()?
        .into_iter()
        .map(|(k, v)| EndpointRow {
            ip: k.to_string(),
            ifindex: v.ifindex,
            identity: v.identity,
            mac: format_mac(&v.mac),
            host_mac: format_mac(&v.host_mac),
            local: v.flags & EP_F_LOCAL != 0,
        })
        .collect())
}
