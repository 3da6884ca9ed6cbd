//! `dp_services`, `dp_backends` and `dp_maglev`: the Service frontends this
//! node serves, their backends, and the Maglev tables of the externally
//! reachable ones. [`Services`] owns their desired contents, hands out the
//! frontend and backend ids, and writes every change by difference, in an
//! order in which the programs never find a frontend pointing at something
//! missing.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    hash::{Hash, Hasher},
    net::IpAddr,
    os::fd::AsFd as _,
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap as BpfHashMap, HashOfMaps, IterableMap as _, Map, MapData};
use dataplane_common::{
    BE_F_LOCAL, BE_F_TERMINATING, Backend, FAMILY_IPV4, MAP_BACKENDS, MAP_MAGLEV, MAP_SERVICES,
    SVC_F_AFFINITY, SVC_F_LOCAL, SVC_F_MAGLEV, SVC_F_NODEPORT, ServiceKey, ServiceValue,
    proto_name, scope_name,
};
use serde::Serialize;

use super::{Row, SyncStats, Table, open, sync_keys};
use crate::{
    lb::{self, BackendAddr, Computed, Frontend},
    sys,
};

/// BPF_F_INNER_MAP: the template of `dp_maglev` has it, so inner tables of
/// any size fit, and each must have it too.
const BPF_F_INNER_MAP: u32 = 1 << 12;

pub struct ServicesMap(BpfHashMap<MapData, ServiceKey, ServiceValue>);

impl ServicesMap {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(BpfHashMap::try_from(map)?))
    }

    pub fn open(pin_dir: &Path) -> Result<Self> {
        Self::new(open(pin_dir, MAP_SERVICES)?)
    }

    pub fn entries(&self) -> Result<BTreeMap<ServiceKey, ServiceValue>> {
        Ok(sys::map_entries(self.0.map().fd().as_fd())
            .context("reading dp_services")?
            .into_iter()
            .collect())
    }
}

impl Table for ServicesMap {
    type K = ServiceKey;
    type V = ServiceValue;
    const NAME: &'static str = MAP_SERVICES;

    fn read(&self, keys: &[ServiceKey]) -> Result<BTreeMap<ServiceKey, ServiceValue>> {
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

    fn read_all(&self) -> Result<BTreeMap<ServiceKey, ServiceValue>> {
        self.entries()
    }

    fn put(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<()> {
        Ok(self.0.insert(k, v, 0)?)
    }

    fn delete(&mut self, k: &ServiceKey) -> Result<()> {
        match self.0.remove(k) {
            Ok(()) => Ok(()),
            Err(e) if super::absent(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// A backend id, shown as a table key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendId(pub u32);

impl std::fmt::Display for BackendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "backend {}", self.0)
    }
}

pub struct BackendsMap(BpfHashMap<MapData, u32, Backend>);

impl BackendsMap {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(BpfHashMap::try_from(map)?))
    }

    pub fn open(pin_dir: &Path) -> Result<Self> {
        Self::new(open(pin_dir, MAP_BACKENDS)?)
    }

    pub fn entries(&self) -> Result<BTreeMap<u32, Backend>> {
        Ok(sys::map_entries(self.0.map().fd().as_fd())
            .context("reading dp_backends")?
            .into_iter()
            .collect())
    }
}

impl Table for BackendsMap {
    type K = BackendId;
    type V = Backend;
    const NAME: &'static str = MAP_BACKENDS;

    fn read(&self, keys: &[BackendId]) -> Result<BTreeMap<BackendId, Backend>> {
        let mut out = BTreeMap::new();
        for k in keys {
            match self.0.get(&k.0, 0) {
                Ok(v) => {
                    out.insert(*k, v);
                }
                Err(e) if super::absent(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    fn read_all(&self) -> Result<BTreeMap<BackendId, Backend>> {
        Ok(self
            .entries()?
            .into_iter()
            .map(|(k, v)| (BackendId(k), v))
            .collect())
    }

    fn put(&mut self, k: &BackendId, v: &Backend) -> Result<()> {
        Ok(self.0.insert(k.0, v, 0)?)
    }

    fn delete(&mut self, k: &BackendId) -> Result<()> {
        match self.0.remove(&k.0) {
            Ok(()) => Ok(()),
            Err(e) if super::absent(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The Maglev tables, one inner array of backend ids per frontend id. A
/// table is never written in place: a new one is filled and swapped in, so
/// a lookup sees the old table or the new one, whole.
pub struct MaglevMap(HashOfMaps<MapData, u32, Array<MapData, u32>>);

impl MaglevMap {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(HashOfMaps::try_from(map)?))
    }

    pub fn open(pin_dir: &Path) -> Result<Self> {
        Self::new(open(pin_dir, MAP_MAGLEV)?)
    }

    pub fn ids(&self) -> Result<Vec<u32>> {
        Ok(self.0.keys().collect::<Result<_, _>>()?)
    }

    /// The table of frontend `id`, if it has one.
    pub fn table(&self, id: u32) -> Result<Option<Vec<u32>>> {
        let inner = match self.0.get(&id, 0) {
            Ok(t) => t,
            Err(e) if super::absent(&e) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("dp_maglev: table {id}")),
        };
        let mut entries: Vec<(u32, u32)> =
            sys::map_entries(inner.map().fd().as_fd()).context("reading a Maglev table")?;
        entries.sort_unstable();
        Ok(Some(entries.into_iter().map(|(_, v)| v).collect()))
    }

    pub fn set(&mut self, id: u32, table: &[u32]) -> Result<()> {
        let inner: Array<MapData, u32> = Array::create(table.len() as u32, BPF_F_INNER_MAP)
            .with_context(|| format!("creating a Maglev table of {} slots", table.len()))?;
        let entries: Vec<(u32, u32)> = table
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u32, *b))
            .collect();
        sys::map_update(inner.map().fd().as_fd(), &entries).context("filling a Maglev table")?;
        self.0
            .insert(id, &inner, 0)
            .with_context(|| format!("dp_maglev: installing table {id}"))
    }

    pub fn remove(&mut self, id: u32) -> Result<()> {
        match self.0.remove(&id) {
            Ok(()) => Ok(()),
            Err(e) if super::absent(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("dp_maglev: removing table {id}")),
        }
    }
}

fn table_hash(t: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

/// A Service, as namespace/name.
pub type SvcName = (String, String);

/// What one Service has in the maps.
#[derive(Default)]
struct Applied {
    /// Frontends it asks for (it has those no Service before it claims).
    claims: BTreeSet<ServiceKey>,
    entries: BTreeMap<ServiceKey, ServiceValue>,
    /// Its frontend groups and their ids.
    groups: BTreeMap<(String, u8), u32>,
    backends: BTreeSet<BackendAddr>,
    /// (frontend id, backend id) of every frontend-backend pair.
    pairs: BTreeSet<(u32, u32)>,
}

struct BackendSlot {
    id: u32,
    /// Services using it.
    refs: usize,
    value: Backend,
}

/// What applying a Service did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub stats: SyncStats,
    /// (frontend id, backend id) pairs that ended: their UDP flows and
    /// affinities go (TCP flows end by themselves when the pod is gone).
    pub ended: Vec<(u32, u32)>,
    /// Services whose frontends this change gave or took: to be applied
    /// again.
    pub redo: Vec<SvcName>,
    /// Frontends this Service could not have (another Service has them).
    pub problems: Vec<String>,
}

/// Ids start at 1: 0 marks "none" in the maps.
struct Ids {
    used: HashSet<u32>,
    /// Ids an earlier agent gave, not handed out to anything else until
    /// the first full sync: their owners get them back.
    reserved: HashSet<u32>,
    next: u32,
    max: u32,
}

impl Ids {
    fn new(max: u32, reserved: HashSet<u32>) -> Self {
        Ids {
            used: HashSet::new(),
            reserved,
            next: 1,
            max,
        }
    }

    /// A fresh id. Freed ids come back only after the counter wraps, so the
    /// flows and affinities of a removed id are purged before it means
    /// something else.
    fn alloc(&mut self) -> Result<u32> {
        for _ in 0..self.max {
            let id = self.next;
            self.next = if self.next >= self.max {
                1
            } else {
                self.next + 1
            };
            if !self.used.contains(&id) && !self.reserved.contains(&id) {
                self.used.insert(id);
                return Ok(id);
            }
        }
        anyhow::bail!("all {} ids are in use", self.max)
    }

    /// Takes `id` if nobody has it.
    fn take(&mut self, id: u32) -> bool {
        self.used.insert(id)
    }

    fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

pub struct Services {
    services: ServicesMap,
    backends: BackendsMap,
    maglev: MaglevMap,
    maglev_size: u32,
    applied: HashMap<SvcName, Applied>,
    /// Services claiming each frontend (slot-0 key); the first by name has it.
    claims: BTreeMap<ServiceKey, BTreeSet<SvcName>>,
    fe_ids: Ids,
    be_ids: Ids,
    backend_slots: HashMap<BackendAddr, BackendSlot>,
    backend_by_id: HashMap<u32, BackendAddr>,
    /// Maglev tables written, by frontend id: a hash of their contents.
    tables: HashMap<u32, u64>,
    /// Ids an earlier agent gave (until the first full sync).
    recovered_fe: HashMap<ServiceKey, u32>,
    recovered_be: HashMap<BackendAddr, u32>,
}

fn backend_addr(b: &Backend) -> Option<BackendAddr> {
    match b.ip()? {
        IpAddr::V4(ip) => Some(BackendAddr {
            ip,
            port: u16::from_be_bytes(b.port),
            proto: b.proto,
        }),
        IpAddr::V6(_) => None,
    }
}

fn backend_value(b: &lb::BackendInfo) -> Backend {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&b.addr.ip.octets());
    let mut flags = 0;
    if b.local {
        flags |= BE_F_LOCAL;
    }
    if b.terminating {
        flags |= BE_F_TERMINATING;
    }
    Backend {
        addr,
        port: b.addr.port.to_be_bytes(),
        proto: b.addr.proto,
        family: FAMILY_IPV4,
        flags,
        _pad: [0; 3],
        identity: 0,
    }
}

/// A backend's name in Maglev: every node hashes the same names, so every
/// node builds the same table.
fn maglev_name(a: &BackendAddr) -> String {
    format!("{}:{}/{}", a.ip, a.port, a.proto)
}

fn frontend_key(f: &Frontend) -> ServiceKey {
    ServiceKey::from_ip(IpAddr::V4(f.addr), f.port, f.proto, f.scope, 0)
}

/// A frontend for people: `10.96.0.10:80/tcp` or `*:30080/tcp` (NodePort).
fn frontend_name(k: &ServiceKey) -> String {
    match k.ip() {
        Some(ip) => format!("{ip}:{}/{}", k.port(), proto_name(k.proto)),
        None => format!("*:{}/{}", k.port(), proto_name(k.proto)),
    }
}

impl Services {
    /// Reads what an earlier agent left, to keep its ids.
    pub fn new(
        services: ServicesMap,
        backends: BackendsMap,
        maglev: MaglevMap,
        maglev_size: u32,
    ) -> Result<Self> {
        let recovered_fe: HashMap<ServiceKey, u32> = services
            .entries()?
            .into_iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(k, v)| (k, v.id))
            .collect();
        let recovered_be: HashMap<BackendAddr, u32> = backends
            .entries()?
            .into_iter()
            .filter_map(|(id, b)| Some((backend_addr(&b)?, id)))
            .collect();
        Ok(Services {
            services,
            backends,
            maglev,
            maglev_size,
            applied: HashMap::new(),
            claims: BTreeMap::new(),
            fe_ids: Ids::new(
                dataplane_common::SERVICES_MAX,
                recovered_fe.values().copied().collect(),
            ),
            be_ids: Ids::new(
                dataplane_common::BACKENDS_MAX,
                recovered_be.values().copied().collect(),
            ),
            backend_slots: HashMap::new(),
            backend_by_id: HashMap::new(),
            tables: HashMap::new(),
            recovered_fe,
            recovered_be,
        })
    }

    /// Services with frontends applied (or claimed).
    pub fn applied_names(&self) -> Vec<SvcName> {
        self.applied.keys().cloned().collect()
    }

    /// Every frontend address in the maps (ClusterIPs, external and
    /// LoadBalancer IPs; not NodePorts).
    pub fn addresses(&self) -> BTreeSet<std::net::Ipv4Addr> {
        self.applied
            .values()
            .flat_map(|a| a.entries.keys())
            .filter(|k| k.slot == 0)
            .filter_map(|k| match k.ip() {
                Some(IpAddr::V4(ip)) => Some(ip),
                _ => None,
            })
            .collect()
    }

    /// The addresses outside traffic is served on from this node: external
    /// and LoadBalancer IPs whose external-scope frontend has a backend
    /// (with externalTrafficPolicy Local, a backend on this node). What
    /// BGP may advertise.
    pub fn served_externally(&self) -> BTreeSet<std::net::Ipv4Addr> {
        self.applied
            .values()
            .flat_map(|a| a.entries.iter())
            .filter(|(k, v)| {
                k.slot == 0 && k.scope == dataplane_common::SCOPE_EXTERNAL && v.count > 0
            })
            .filter_map(|(k, _)| match k.ip() {
                Some(IpAddr::V4(ip)) if !ip.is_unspecified() => Some(ip),
                _ => None,
            })
            .collect()
    }

    /// Frontends in the maps.
    pub fn frontends(&self) -> usize {
        self.applied
            .values()
            .map(|a| a.entries.keys().filter(|k| k.slot == 0).count())
            .sum()
    }

    /// Frontends with no backend slot.
    pub fn frontends_empty(&self) -> usize {
        self.applied
            .values()
            .map(|a| {
                a.entries
                    .iter()
                    .filter(|(k, v)| k.slot == 0 && v.count == 0)
                    .count()
            })
            .sum()
    }

    pub fn backends(&self) -> usize {
        self.backend_slots.len()
    }

    /// The id of a new frontend group: an earlier agent's for one of its
    /// frontends, or a new one.
    fn group_id(&mut self, keys: &[ServiceKey]) -> Result<u32> {
        for k in keys {
            if let Some(id) = self.recovered_fe.get(k).copied()
                && self.fe_ids.take(id)
            {
                return Ok(id);
            }
        }
        self.fe_ids.alloc()
    }

    fn backend_id(&mut self, b: &lb::BackendInfo) -> Result<u32> {
        if let Some(slot) = self.backend_slots.get(&b.addr) {
            return Ok(slot.id);
        }
        let id = match self.recovered_be.get(&b.addr).copied() {
            Some(id) if self.be_ids.take(id) => id,
            _ => self.be_ids.alloc()?,
        };
        self.backend_slots.insert(
            b.addr,
            BackendSlot {
                id,
                refs: 0,
                value: backend_value(b),
            },
        );
        self.backend_by_id.insert(id, b.addr);
        Ok(id)
    }

    /// The Maglev table of a frontend whose backend slots are `ids`.
    fn table_for(&self, ids: &[u32]) -> Vec<u32> {
        let named: Vec<(u32, String)> = ids
            .iter()
            .filter_map(|id| Some((*id, maglev_name(self.backend_by_id.get(id)?))))
            .collect();
        lb::maglev(&named, self.maglev_size)
    }

    /// Brings the maps to what `computed` says for Service `name` (`None`:
    /// the Service is gone), touching only its own entries.
    pub fn apply(&mut self, name: &SvcName, computed: Option<&Computed>) -> Result<Outcome> {
        let mut out = Outcome::default();
        let mut old = self.applied.remove(name).unwrap_or_default();
        let empty = Computed::default();
        let computed = computed.unwrap_or(&empty);
        let mut new = Applied {
            claims: computed.frontends.iter().map(frontend_key).collect(),
            ..Default::default()
        };

        // A frontend belongs to the first Service (by namespace/name) that
        // claims it. Claims given up pass to the next claimant.
        for k in old.claims.difference(&new.claims) {
            if let Some(set) = self.claims.get_mut(k) {
                let had = set.first() == Some(name);
                set.remove(name);
                if had && let Some(next) = set.first() {
                    out.redo.push(next.clone());
                }
                if set.is_empty() {
                    self.claims.remove(k);
                }
            }
        }
        for k in &new.claims {
            self.claims.entry(*k).or_default().insert(name.clone());
        }
        let mut won = Vec::new();
        for f in &computed.frontends {
            let k = frontend_key(f);
            let Some(set) = self.claims.get(&k) else {
                continue;
            };
            let Some(first) = set.first() else { continue };
            if first != name {
                out.problems.push(format!(
                    "Service {}/{}: frontend {} is Service {}/{}'s already; skipped",
                    name.0,
                    name.1,
                    frontend_name(&k),
                    first.0,
                    first.1
                ));
                continue;
            }
            won.push(f);
            // Taken from a Service after this one: its entries become ours
            // to overwrite (and its surplus slots ours to remove).
            for other in set.iter().skip(1) {
                if let Some(a) = self.applied.get_mut(other) {
                    let theirs: Vec<ServiceKey> = a
                        .entries
                        .keys()
                        .filter(|e| e.master() == k)
                        .copied()
                        .collect();
                    if !theirs.is_empty() {
                        for e in theirs {
                            if let Some(v) = a.entries.remove(&e) {
                                old.entries.insert(e, v);
                            }
                        }
                        out.redo.push(other.clone());
                    }
                }
            }
        }

        // Ids, entries and tables.
        let mut group_keys: BTreeMap<(String, u8), Vec<ServiceKey>> = BTreeMap::new();
        for f in &won {
            group_keys
                .entry(f.group.clone())
                .or_default()
                .push(frontend_key(f));
        }
        for (group, keys) in &group_keys {
            let id = match old.groups.get(group) {
                Some(id) => *id,
                None => self.group_id(keys)?,
            };
            new.groups.insert(group.clone(), id);
        }
        let mut tables: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for f in &won {
            let key = frontend_key(f);
            let id = new.groups[&f.group];
            let mut ids = Vec::with_capacity(f.backends.len());
            for b in &f.backends {
                let bid = self.backend_id(b)?;
                ids.push(bid);
                new.backends.insert(b.addr);
                new.pairs.insert((id, bid));
            }
            let maglev = f.flags & SVC_F_MAGLEV != 0 && !ids.is_empty();
            if maglev && !tables.contains_key(&id) {
                tables.insert(id, self.table_for(&ids));
            }
            new.entries.insert(
                key,
                ServiceValue {
                    id,
                    count: ids.len() as u16,
                    flags: f.flags,
                    affinity_timeout: f.affinity_timeout,
                    maglev_size: if maglev { self.maglev_size } else { 0 },
                },
            );
            for (i, bid) in ids.iter().enumerate() {
                new.entries.insert(
                    ServiceKey {
                        slot: i as u16 + 1,
                        ..key
                    },
                    ServiceValue {
                        id: *bid,
                        ..Default::default()
                    },
                );
            }
        }

        // Writes: backends, tables, backend slots, frontends; then removals
        // in the reverse order.
        let mut added = BTreeMap::new();
        for a in new.backends.difference(&old.backends) {
            if let Some(s) = self.backend_slots.get_mut(a) {
                s.refs += 1;
                added.insert(BackendId(s.id), s.value);
            }
        }
        let keys: Vec<BackendId> = added.keys().copied().collect();
        out.stats += sync_keys(&mut self.backends, &added, keys)?;
        for (id, t) in &tables {
            let h = table_hash(t);
            if self.tables.get(id) != Some(&h) {
                self.maglev.set(*id, t)?;
                self.tables.insert(*id, h);
            }
        }
        out.stats += self.write_entries(&old.entries, &new.entries)?;
        for (group, id) in &old.groups {
            let kept = new.groups.get(group) == Some(id);
            if (!kept || !tables.contains_key(id)) && self.tables.remove(id).is_some() {
                self.maglev.remove(*id)?;
            }
            if !kept {
                self.fe_ids.free(*id);
            }
        }
        for a in old.backends.difference(&new.backends) {
            let Some(s) = self.backend_slots.get_mut(a) else {
                continue;
            };
            s.refs -= 1;
            if s.refs == 0 {
                let id = s.id;
                self.backend_slots.remove(a);
                self.backend_by_id.remove(&id);
                self.backends.delete(&BackendId(id))?;
                self.be_ids.free(id);
                out.stats.removed += 1;
            }
        }
        out.ended = old.pairs.difference(&new.pairs).copied().collect();
        if !new.claims.is_empty() {
            self.applied.insert(name.clone(), new);
        }
        out.redo.retain(|n| n != name);
        out.redo.sort();
        out.redo.dedup();
        Ok(out)
    }

    /// Moves a Service's entries from `old` to `new`: backend slots first,
    /// then the frontends (so a frontend's count never covers a slot that
    /// is not there yet), then slots no longer wanted.
    fn write_entries(
        &mut self,
        old: &BTreeMap<ServiceKey, ServiceValue>,
        new: &BTreeMap<ServiceKey, ServiceValue>,
    ) -> Result<SyncStats> {
        let slots = |m: &BTreeMap<ServiceKey, ServiceValue>| -> Vec<ServiceKey> {
            m.keys().filter(|k| k.slot > 0).copied().collect()
        };
        let mut stats = sync_keys(&mut self.services, new, slots(new))?;
        let masters: BTreeSet<ServiceKey> = old
            .keys()
            .chain(new.keys())
            .filter(|k| k.slot == 0)
            .copied()
            .collect();
        stats += sync_keys(&mut self.services, new, masters)?;
        let stale: Vec<ServiceKey> = slots(old)
            .into_iter()
            .filter(|k| !new.contains_key(k))
            .collect();
        stats += sync_keys(&mut self.services, new, stale)?;
        Ok(stats)
    }

    /// After every Service has been applied: compares the three maps with
    /// everything the Services want, rewrites what differs and removes the
    /// rest (an earlier agent's leftovers, or changes made behind the
    /// agent's back). Ids an earlier agent gave that nothing claimed are
    /// free from now on.
    pub fn sync_all(&mut self) -> Result<SyncStats> {
        let mut stats = SyncStats::default();
        let desired_be: BTreeMap<BackendId, Backend> = self
            .backend_slots
            .values()
            .map(|s| (BackendId(s.id), s.value))
            .collect();
        stats += super::sync_all(&mut self.backends, &desired_be)?;

        let desired: BTreeMap<ServiceKey, ServiceValue> = self
            .applied
            .values()
            .flat_map(|a| a.entries.iter().map(|(k, v)| (*k, *v)))
            .collect();
        // Tables: every Maglev frontend's, as its slots say.
        let mut want: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (k, v) in desired
            .iter()
            .filter(|(k, v)| k.slot == 0 && v.maglev_size > 0)
        {
            want.entry(v.id).or_insert_with(|| {
                (1..=v.count)
                    .filter_map(|slot| desired.get(&ServiceKey { slot, ..*k }).map(|s| s.id))
                    .collect()
            });
        }
        for id in self.maglev.ids()? {
            if !want.contains_key(&id) {
                self.maglev.remove(id)?;
                self.tables.remove(&id);
                stats.removed += 1;
            }
        }
        for (id, ids) in &want {
            let t = self.table_for(ids);
            if self.maglev.table(*id)?.as_deref() != Some(&t[..]) {
                self.maglev.set(*id, &t)?;
                self.tables.insert(*id, table_hash(&t));
                stats.changed += 1;
            }
        }

        // Frontends: what is wrong or missing in the order of
        // `write_entries`, then the rest goes (masters before their slots:
        // a stale frontend goes as a whole).
        let actual = self.services.entries()?;
        let (slots, masters): (Vec<ServiceKey>, Vec<ServiceKey>) = desired
            .iter()
            .filter(|(k, v)| actual.get(k) != Some(v))
            .map(|(k, _)| *k)
            .partition(|k| k.slot > 0);
        stats += sync_keys(&mut self.services, &desired, slots)?;
        stats += sync_keys(&mut self.services, &desired, masters)?;
        let mut stale: Vec<ServiceKey> = actual
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        stale.sort_by_key(|k| k.slot);
        stats += sync_keys(&mut self.services, &desired, stale)?;

        self.recovered_fe.clear();
        self.recovered_be.clear();
        self.fe_ids.reserved.clear();
        self.be_ids.reserved.clear();
        Ok(stats)
    }
}

/// One frontend, for `dataplane service list`.
#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub scope: &'static str,
    pub id: u32,
    pub flags: Vec<&'static str>,
    pub affinity_timeout: Option<u32>,
    pub maglev_size: Option<u32>,
    /// `ip:port` of each backend slot, in slot order.
    pub backends: Vec<String>,
}

impl Row for ServiceRow {
    const HEADERS: &'static [&'static str] = &["FRONTEND", "SCOPE", "ID", "FLAGS", "BACKENDS"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.frontend.clone(),
            self.scope.into(),
            self.id.to_string(),
            if self.flags.is_empty() {
                "-".into()
            } else {
                self.flags.join(",")
            },
            if self.backends.is_empty() {
                "(none)".into()
            } else {
                self.backends.join(" ")
            },
        ]
    }
}

fn flag_names(flags: u16) -> Vec<&'static str> {
    [
        (SVC_F_NODEPORT, "nodeport"),
        (SVC_F_MAGLEV, "maglev"),
        (SVC_F_AFFINITY, "affinity"),
        (SVC_F_LOCAL, "local"),
    ]
    .into_iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|(_, n)| n)
    .collect()
}

/// Every frontend with its backends resolved.
pub fn rows(pin_dir: &Path) -> Result<Vec<ServiceRow>> {
    let entries = ServicesMap::open(pin_dir)?.entries()?;
    let backends = BackendsMap::open(pin_dir)?.entries()?;
    let mut rows = Vec::new();
    for (k, v) in entries.iter().filter(|(k, _)| k.slot == 0) {
        let slots = (1..=v.count).map(|slot| {
            let id = entries.get(&ServiceKey { slot, ..*k }).map(|s| s.id);
            match id.and_then(|id| backends.get(&id)) {
                Some(b) => {
                    let mut s = b.to_string();
                    s.truncate(s.rfind('/').unwrap_or(s.len()));
                    s
                }
                None => format!(
                    "<missing {}>",
                    id.map_or("slot".into(), |i| format!("backend {i}"))
                ),
            }
        });
        rows.push(ServiceRow {
            frontend: frontend_name(k),
            scope: scope_name(k.scope),
            id: v.id,
            flags: flag_names(v.flags),
            affinity_timeout: (v.flags & SVC_F_AFFINITY != 0).then_some(v.affinity_timeout),
            maglev_size: (v.maglev_size > 0).then_some(v.maglev_size),
            backends: slots.collect(),
        });
    }
    Ok(rows)
}

/// A `dp_backends` entry.
#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub backend: String,
    pub local: bool,
    pub terminating: bool,
    pub identity: u32,
}

impl Row for BackendRow {
    const HEADERS: &'static [&'static str] = &["ID", "BACKEND", "LOCAL", "TERMINATING", "IDENTITY"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.backend.clone(),
            self.local.to_string(),
            self.terminating.to_string(),
            self.identity.to_string(),
        ]
    }
}

pub fn backend_rows(pin_dir: &Path) -> Result<Vec<BackendRow>> {
    Ok(BackendsMap::open(pin_dir)?
        .entries()?
        .into_iter()
        .map(|(id, b)| BackendRow {
            id,
            backend: b.to_string(),
            local: b.flags & BE_F_LOCAL != 0,
            terminating: b.flags & BE_F_TERMINATING != 0,
            identity: b.identity,
        })
        .collect())
}

/// A Maglev table, summarised: slots per backend.
#[derive(Debug, Serialize)]
pub struct MaglevRow {
    pub id: u32,
    pub size: usize,
    /// Backend id -> slots it owns.
    pub shares: BTreeMap<u32, usize>,
}

impl Row for MaglevRow {
    const HEADERS: &'static [&'static str] = &["ID", "SIZE", "SLOTS PER BACKEND"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.size.to_string(),
            self.shares
                .iter()
                .map(|(b, n)| format!("{b}:{n}"))
                .collect::<Vec<_>>()
                .join(" "),
        ]
    }
}

pub fn maglev_rows(pin_dir: &Path) -> Result<Vec<MaglevRow>> {
    let m = MaglevMap::open(pin_dir)?;
    let mut ids = m.ids()?;
    ids.sort_unstable();
    let mut rows = Vec::new();
    for id in ids {
        let Some(t) = m.table(id)? else { continue };
        let mut shares = BTreeMap::new();
        for b in &t {
            *shares.entry(*b).or_insert(0) += 1;
        }
        rows.push(MaglevRow {
            id,
            size: t.len(),
            shares,
        });
    }
    Ok(rows)
}

pub fn count(pin_dir: &Path, name: &str) -> Result<usize> {
    Ok(match name {
        MAP_SERVICES => ServicesMap::open(pin_dir)?.entries()?.len(),
        MAP_BACKENDS => BackendsMap::open(pin_dir)?.entries()?.len(),
        MAP_MAGLEV => MaglevMap::open(pin_dir)?.ids()?.len(),
        _ => anyhow::bail!("no map named {name:?}"),
    })
}
