//! `dp_ipcache`: what an address belongs to, by longest prefix. The agent
//! composes its desired contents (cluster range, this node, other nodes) and
//! writes them through [`Table`].

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use anyhow::Result;
use aya::maps::{
    Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use dataplane_common::{
    FAMILY_IPV4, IPCACHE_KIND_CLUSTER, IPCACHE_KIND_HOST, IPCACHE_KIND_LOCAL_PODS,
    IPCACHE_KIND_NO_MASQUERADE, IPCACHE_KIND_REMOTE_HOST, IPCACHE_KIND_REMOTE_PODS,
    IPCACHE_KIND_SERVICES, IPCACHE_STATIC_PREFIX, IpcacheEntry, IpcacheKey, MAP_IPCACHE,
};
use ipnetwork::{IpNetwork, Ipv4Network};
use serde::Serialize;

use super::{Row, SyncStats, Table, open, sync_all, sync_keys};
use crate::nodes::RemoteNode;

/// A prefix as the map stores it: LPM prefix length and key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prefix(pub IpNetwork);

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Prefix {
    fn key(&self) -> Key<IpcacheKey> {
        let (len, key) = IpcacheKey::prefix(self.0.network(), self.0.prefix());
        Key::new(len, key)
    }

    fn from_key(k: &Key<IpcacheKey>) -> Option<Prefix> {
        let ip = k.data().ip()?;
        let len = u8::try_from(k.prefix_len().checked_sub(IPCACHE_STATIC_PREFIX)?).ok()?;
        IpNetwork::new(ip, len).ok().map(Prefix)
    }
}

/// An entry of `kind`, with the node that owns the prefix when there is one.
pub fn entry(kind: u8, tunnel: Option<std::net::Ipv4Addr>) -> IpcacheEntry {
    let mut e = IpcacheEntry {
        kind,
        ..Default::default()
    };
    if let Some(ip) = tunnel {
        e.tunnel_family = FAMILY_IPV4;
        e.tunnel_endpoint[..4].copy_from_slice(&ip.octets());
    }
    e
}

pub struct IpcacheMap(LpmTrie<MapData, IpcacheKey, IpcacheEntry>);

impl IpcacheMap {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(LpmTrie::try_from(map)?))
    }

    pub fn open(pin_dir: &Path) -> Result<Self> {
        Self::new(open(pin_dir, MAP_IPCACHE)?)
    }

    pub fn entries(&self) -> Result<BTreeMap<Prefix, IpcacheEntry>> {
        let mut out = BTreeMap::new();
        for item in self.0.iter() {
            let (k, v) = item?;
            if let Some(p) = Prefix::from_key(&k) {
                out.insert(p, v);
            }
        }
        Ok(out)
    }
}

impl Table for IpcacheMap {
    type K = Prefix;
    type V = IpcacheEntry;
    const NAME: &'static str = MAP_IPCACHE;

    fn read(&self, keys: &[Prefix]) -> Result<BTreeMap<Prefix, IpcacheEntry>> {
        // An LPM lookup returns the longest covering prefix, not an exact
        // match: read the entries and pick.
        let mut all = self.entries()?;
        all.retain(|k, _| keys.contains(k));
        Ok(all)
    }

    fn read_all(&self) -> Result<BTreeMap<Prefix, IpcacheEntry>> {
        self.entries()
    }

    fn put(&mut self, k: &Prefix, v: &IpcacheEntry) -> Result<()> {
        Ok(self.0.insert(&k.key(), v, 0)?)
    }

    fn delete(&mut self, k: &Prefix) -> Result<()> {
        match self.0.remove(&k.key()) {
            Ok(()) => Ok(()),
            Err(e) if super::absent(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The desired contents: the cluster range, this node (address and pod
/// CIDR), and every other node (address and pod CIDR, with the node as
/// tunnel endpoint).
pub struct Ipcache {
    map: IpcacheMap,
    cluster: IpNetwork,
    node_ip: Ipv4Addr,
    /// The Service range and the ranges never masqueraded: fixed at start.
    fixed: BTreeMap<Prefix, IpcacheEntry>,
    own_cidr: Option<IpNetwork>,
    /// `None` until the cluster state is known: until then the other
    /// nodes' entries an earlier agent left stay as they are.
    nodes: Option<BTreeMap<String, RemoteNode>>,
}

impl Ipcache {
    pub fn new(map: IpcacheMap, cluster: IpNetwork, node_ip: Ipv4Addr) -> Self {
        Self {
            map,
            cluster,
            node_ip,
            fixed: BTreeMap::new(),
            own_cidr: None,
            nodes: None,
        }
    }

    fn host(ip: Ipv4Addr) -> Prefix {
        Prefix(IpNetwork::V4(Ipv4Network::from(ip)))
    }

    /// The Service range (`services`, where only Services exist) and the
    /// destinations pods reach with their own address (`no_masquerade`).
    pub fn set_fixed(
        &mut self,
        services: IpNetwork,
        no_masquerade: &[IpNetwork],
    ) -> Result<SyncStats> {
        let old: Vec<Prefix> = self.fixed.keys().copied().collect();
        self.fixed.clear();
        for n in no_masquerade {
            self.fixed
                .insert(Prefix(*n), entry(IPCACHE_KIND_NO_MASQUERADE, None));
        }
        self.fixed
            .insert(Prefix(services), entry(IPCACHE_KIND_SERVICES, None));
        let desired = self.desired();
        let keys: Vec<Prefix> = old.into_iter().chain(self.fixed.keys().copied()).collect();
        sync_keys(&mut self.map, &desired, keys)
    }

    fn desired(&self) -> BTreeMap<Prefix, IpcacheEntry> {
        let mut d = self.fixed.clone();
        d.insert(Prefix(self.cluster), entry(IPCACHE_KIND_CLUSTER, None));
        if let Some(c) = self.own_cidr {
            d.insert(Prefix(c), entry(IPCACHE_KIND_LOCAL_PODS, None));
        }
        for n in self.nodes.iter().flat_map(|n| n.values()) {
            d.insert(
                Prefix(IpNetwork::V4(n.pod_cidr)),
                entry(IPCACHE_KIND_REMOTE_PODS, Some(n.ip)),
            );
            if n.ip != self.node_ip {
                d.insert(
                    Self::host(n.ip),
                    entry(IPCACHE_KIND_REMOTE_HOST, Some(n.ip)),
                );
            }
        }
        d.insert(Self::host(self.node_ip), entry(IPCACHE_KIND_HOST, None));
        d
    }

    fn sync(&mut self, also: Option<IpNetwork>) -> Result<SyncStats> {
        let desired = self.desired();
        if self.nodes.is_some() {
            return sync_all(&mut self.map, &desired);
        }
        let mut keys = vec![Prefix(self.cluster), Self::host(self.node_ip)];
        keys.extend(self.fixed.keys().copied());
        keys.extend(self.own_cidr.map(Prefix));
        keys.extend(also.map(Prefix));
        sync_keys(&mut self.map, &desired, keys)
    }

    pub fn set_own_cidr(&mut self, cidr: Option<IpNetwork>) -> Result<SyncStats> {
        let old = std::mem::replace(&mut self.own_cidr, cidr);
        self.sync(old)
    }

    /// The other nodes, as the cluster state now says: the whole map is
    /// compared with the desired contents.
    pub fn set_nodes(&mut self, nodes: BTreeMap<String, RemoteNode>) -> Result<SyncStats> {
        self.nodes = Some(nodes);
        self.sync(None)
    }
}

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

pub fn count(pin_dir: &Path) -> Result<usize> {
    Ok(IpcacheMap::open(pin_dir)?
        .0
        .keys()
        .try_fold(0, |n, k| k.map(|_| n + 1))?)
}

pub fn rows(pin_dir: &Path) -> Result<Vec<IpcacheRow>> {
    let mut rows: Vec<(IpAddr, u8, IpcacheRow)> = IpcacheMap::open(pin_dir)?
        .entries()?
        .into_iter()
        .map(|(p, e)| {
            (
                p.0.network(),
                p.0.prefix(),
                IpcacheRow {
                    prefix: p.to_string(),
                    kind: e.kind_name().into(),
                    tunnel_endpoint: e.tunnel_endpoint().map(|ip| ip.to_string()),
                    identity: e.identity,
                },
            )
        })
        .collect();
    rows.sort_by_key(|(ip, len, _)| (*ip, *len));
    Ok(rows.into_iter().map(|(_, _, r)| r).collect())
}
