//! `dp_policy` and `dp_policy_cidr`: each local endpoint's compiled
//! NetworkPolicy (see [`crate::policy`]), as longest-prefix entries. The
//! agent writes an endpoint's entries by difference; the CLI decodes them.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::Result;
use aya::maps::{
    Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use dataplane_common::{
    MAP_POLICY, MAP_POLICY_CIDR, PEER_ANY, PEER_CLASS, POLICY_ALLOW, POLICY_CIDR_PREFIX_DIR,
    POLICY_DIR_EGRESS, POLICY_DIR_INGRESS, POLICY_ISOLATED, POLICY_PREFIX_DIR, POLICY_PREFIX_PEER,
    POLICY_PREFIX_PROTO, POLICY_TRACKED, PolicyCidrKey, PolicyCidrValue, PolicyKey, PolicyValue,
    policy_dir_name,
};
use ipnetwork::Ipv4Network;
use serde::Serialize;

use super::{Row, SyncStats, Table, open, sync_keys};
use crate::policy::{Compiled, Dir, PeerId};

/// One entry of `dp_policy`: a direction's marker (`peer` None), or an
/// allow for a peer, a protocol (None: all) and a port prefix (None: all).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyPrefix {
    pub endpoint: u32,
    pub dir: u8,
    pub peer: Option<u32>,
    pub proto: Option<u8>,
    /// (first port, prefix length over 16 bits).
    pub port: Option<(u16, u8)>,
}

impl PolicyPrefix {
    fn key(&self) -> Key<PolicyKey> {
        let port = self.port.map_or(0, |(p, _)| p);
        let k = PolicyKey::new(
            self.endpoint,
            self.dir,
            self.peer.unwrap_or(0),
            self.proto.unwrap_or(0),
            port.to_be_bytes(),
        );
        let len = match (self.peer, self.proto, self.port) {
            (None, ..) => POLICY_PREFIX_DIR,
            (Some(_), None, _) => POLICY_PREFIX_PEER,
            (Some(_), Some(_), None) => POLICY_PREFIX_PROTO,
            (Some(_), Some(_), Some((_, l))) => POLICY_PREFIX_PROTO + u32::from(l),
        };
        Key::new(len, k)
    }

    fn from_key(k: &Key<PolicyKey>) -> Self {
        let d = k.data();
        let len = k.prefix_len();
        let endpoint = u32::from_be_bytes(d.endpoint);
        let peer = (len >= POLICY_PREFIX_PEER).then(|| u32::from_be_bytes(d.peer));
        let proto = (len >= POLICY_PREFIX_PROTO).then_some(d.proto);
        let port = (len > POLICY_PREFIX_PROTO).then(|| {
            (
                u16::from_be_bytes(d.port),
                (len - POLICY_PREFIX_PROTO) as u8,
            )
        });
        PolicyPrefix {
            endpoint,
            dir: d.dir,
            peer,
            proto,
            port,
        }
    }
}

impl std::fmt::Display for PolicyPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "endpoint {} {} {}",
            self.endpoint,
            policy_dir_name(self.dir),
            peer_name(self.peer)
        )?;
        if let Some(p) = self.proto {
            write!(f, " {}", dataplane_common::proto_name(p))?;
        }
        if let Some(p) = self.port {
            write!(f, " {}", ports_text(p))?;
        }
        Ok(())
    }
}

fn peer_name(peer: Option<u32>) -> String {
    match peer {
        None => "(marker)".into(),
        Some(PEER_ANY) => "any".into(),
        Some(p) if p & PEER_CLASS != 0 => format!("class {}", p & !PEER_CLASS),
        Some(p) => format!("identity {p}"),
    }
}

/// A port prefix as the range it covers.
pub fn ports_text((first, len): (u16, u8)) -> String {
    let size = 1u32 << (16 - u32::from(len));
    let last = u32::from(first) + size - 1;
    if size == 1 {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// One entry of `dp_policy_cidr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CidrPrefix {
    pub endpoint: u32,
    pub dir: u8,
    pub net: Ipv4Network,
}

impl CidrPrefix {
    fn key(&self) -> Key<PolicyCidrKey> {
        Key::new(
            POLICY_CIDR_PREFIX_DIR + u32::from(self.net.prefix()),
            PolicyCidrKey {
                endpoint: self.endpoint.to_be_bytes(),
                dir: self.dir,
                addr: self.net.network().octets(),
                _pad: [0; 3],
            },
        )
    }

    fn from_key(k: &Key<PolicyCidrKey>) -> Option<Self> {
        let d = k.data();
        let len = u8::try_from(k.prefix_len().checked_sub(POLICY_CIDR_PREFIX_DIR)?).ok()?;
        Some(CidrPrefix {
            endpoint: u32::from_be_bytes(d.endpoint),
            dir: d.dir,
            net: Ipv4Network::new(Ipv4Addr::from(d.addr), len).ok()?,
        })
    }
}

impl std::fmt::Display for CidrPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "endpoint {} {} {}",
            self.endpoint,
            policy_dir_name(self.dir),
            self.net
        )
    }
}

pub struct PolicyMap(LpmTrie<MapData, PolicyKey, PolicyValue>);

impl PolicyMap {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(LpmTrie::try_from(map)?))
    }

    pub fn open(pin_dir: &Path) -> Result<Self> {
        Self::new(open(pin_dir, MAP_POLICY)?)
    }
}

impl Table for PolicyMap {
    type K = PolicyPrefix;
    type V = PolicyValue;
    const NAME: &'static str = MAP_POLICY;

    fn read(&self, keys: &[PolicyPrefix]) -> Result<BTreeMap<PolicyPrefix, PolicyValue>> {
        // A trie lookup returns the longest covering entry, not the exact
        // one: read them all and pick.
        let mut all = self.read_all()?;
        all.retain(|k, _| keys.contains(k));
        Ok(all)
    }

    fn read_all(&self) -> Result<BTreeMap<PolicyPrefix, PolicyValue>> {
        let mut out = BTreeMap::new();
        for item in self.0.iter() {
            let (k, v) = item?;
            out.insert(PolicyPrefix::from_key(&k), v);
        }
        Ok(out)
    }

    fn put(&mut self, k: &PolicyPrefix, v: &PolicyValue) -> Result<()> {
        Ok(self.0.insert(&k.key(), v, 0)?)
    }

    fn delete(&mut self, k: &PolicyPrefix) -> Result<()> {
        match self.0.remove(&k.key()) {
            Ok(()) => Ok(()),
            Err(e) if super::absent(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

pub struct PolicyCidrMap(LpmTrie<MapData, PolicyCidrKey, PolicyCidrValue>);

impl PolicyCidrMap {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(LpmTrie::try_from(map)?))
    }

    pub fn open(pin_dir: &Path) -> Result<Self> {
        Self::new(open(pin_dir, MAP_POLICY_CIDR)?)
    }
}

impl Table for PolicyCidrMap {
    type K = CidrPrefix;
    type V = PolicyCidrValue;
    const NAME: &'static str = MAP_POLICY_CIDR;

    fn read(&self, keys: &[CidrPrefix]) -> Result<BTreeMap<CidrPrefix, PolicyCidrValue>> {
        let mut all = self.read_all()?;
        all.retain(|k, _| keys.contains(k));
        Ok(all)
    }

    fn read_all(&self) -> Result<BTreeMap<CidrPrefix, PolicyCidrValue>> {
        let mut out = BTreeMap::new();
        for item in self.0.iter() {
            let (k, v) = item?;
            if let Some(p) = CidrPrefix::from_key(&k) {
                out.insert(p, v);
            }
        }
        Ok(out)
    }

    fn put(&mut self, k: &CidrPrefix, v: &PolicyCidrValue) -> Result<()> {
        Ok(self.0.insert(&k.key(), v, 0)?)
    }

    fn delete(&mut self, k: &CidrPrefix) -> Result<()> {
        match self.0.remove(&k.key()) {
            Ok(()) => Ok(()),
            Err(e) if super::absent(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn dir_code(d: Dir) -> u8 {
    match d {
        Dir::Ingress => POLICY_DIR_INGRESS,
        Dir::Egress => POLICY_DIR_EGRESS,
    }
}

fn peer_code(p: PeerId) -> u32 {
    match p {
        PeerId::Any => PEER_ANY,
        PeerId::Identity(id) => id,
        PeerId::Class(c) => PEER_CLASS | c,
    }
}

/// The entries of endpoint `endpoint` (its ifindex) for its compiled
/// policy: nothing when no policy selects it.
pub fn desired(
    endpoint: u32,
    c: &Compiled,
) -> (
    BTreeMap<PolicyPrefix, PolicyValue>,
    BTreeMap<CidrPrefix, PolicyCidrValue>,
) {
    let mut rules = BTreeMap::new();
    let mut cidrs = BTreeMap::new();
    if !c.tracked() {
        return (rules, cidrs);
    }
    for (dir, isolated) in [
        (POLICY_DIR_INGRESS, c.ingress_isolated),
        (POLICY_DIR_EGRESS, c.egress_isolated),
    ] {
        rules.insert(
            PolicyPrefix {
                endpoint,
                dir,
                peer: None,
                proto: None,
                port: None,
            },
            PolicyValue {
                policy: 0,
                kind: if isolated {
                    POLICY_ISOLATED
                } else {
                    POLICY_TRACKED
                },
                _pad: [0; 3],
            },
        );
    }
    for (a, id) in &c.allows {
        rules.insert(
            PolicyPrefix {
                endpoint,
                dir: dir_code(a.dir),
                peer: Some(peer_code(a.peer)),
                proto: a.proto,
                port: a.proto.and(a.ports),
            },
            PolicyValue {
                policy: *id,
                kind: POLICY_ALLOW,
                _pad: [0; 3],
            },
        );
    }
    for ((dir, net), class) in &c.classes {
        cidrs.insert(
            CidrPrefix {
                endpoint,
                dir: dir_code(*dir),
                net: *net,
            },
            PolicyCidrValue { class: *class },
        );
    }
    (rules, cidrs)
}

/// Brings one endpoint's entries to `c` (`old`: the keys it had), by
/// difference.
pub fn sync_endpoint(
    rules_map: &mut PolicyMap,
    cidr_map: &mut PolicyCidrMap,
    endpoint: u32,
    c: &Compiled,
    old: (&[PolicyPrefix], &[CidrPrefix]),
) -> Result<SyncStats> {
    let (rules, cidrs) = desired(endpoint, c);
    // Classes first: a rule naming a class finds it.
    let mut stats = sync_keys(
        cidr_map,
        &cidrs,
        old.1
            .iter()
            .copied()
            .chain(cidrs.keys().copied())
            .collect::<Vec<_>>(),
    )?;
    stats += sync_keys(
        rules_map,
        &rules,
        old.0
            .iter()
            .copied()
            .chain(rules.keys().copied())
            .collect::<Vec<_>>(),
    )?;
    Ok(stats)
}

#[derive(Serialize)]
pub struct PolicyRow {
    pub endpoint: u32,
    pub direction: String,
    pub peer: String,
    pub protocol: String,
    pub ports: String,
    pub verdict: String,
    pub policy: u32,
}

impl Row for PolicyRow {
    const HEADERS: &'static [&'static str] = &[
        "ENDPOINT",
        "DIRECTION",
        "PEER",
        "PROTO",
        "PORTS",
        "VERDICT",
        "POLICY",
    ];

    fn cells(&self) -> Vec<String> {
        vec![
            self.endpoint.to_string(),
            self.direction.clone(),
            self.peer.clone(),
            self.protocol.clone(),
            self.ports.clone(),
            self.verdict.clone(),
            self.policy.to_string(),
        ]
    }
}

pub fn rows(pin_dir: &Path) -> Result<Vec<PolicyRow>> {
    Ok(PolicyMap::open(pin_dir)?
        .read_all()?
        .into_iter()
        .map(|(k, v)| PolicyRow {
            endpoint: k.endpoint,
            direction: policy_dir_name(k.dir).into(),
            peer: peer_name(k.peer),
            protocol: k.proto.map_or("any".into(), dataplane_common::proto_name),
            ports: k.port.map_or("any".into(), ports_text),
            verdict: match v.kind {
                POLICY_ALLOW => "allow",
                POLICY_ISOLATED => "isolated: deny the rest",
                POLICY_TRACKED => "not isolated: allow, track replies",
                _ => "?",
            }
            .into(),
            policy: v.policy,
        })
        .collect())
}

#[derive(Serialize)]
pub struct CidrRow {
    pub endpoint: u32,
    pub direction: String,
    pub prefix: String,
    pub class: u32,
}

impl Row for CidrRow {
    const HEADERS: &'static [&'static str] = &["ENDPOINT", "DIRECTION", "PREFIX", "CLASS"];

    fn cells(&self) -> Vec<String> {
        vec![
            self.endpoint.to_string(),
            self.direction.clone(),
            self.prefix.clone(),
            self.class.to_string(),
        ]
    }
}

pub fn cidr_rows(pin_dir: &Path) -> Result<Vec<CidrRow>> {
    Ok(PolicyCidrMap::open(pin_dir)?
        .read_all()?
        .into_iter()
        .map(|(k, v)| CidrRow {
            endpoint: k.endpoint,
            direction: policy_dir_name(k.dir).into(),
            prefix: k.net.to_string(),
            class: v.class,
        })
        .collect())
}

pub fn count(pin_dir: &Path, name: &str) -> Result<usize> {
    Ok(match name {
        MAP_POLICY => PolicyMap::open(pin_dir)?.read_all()?.len(),
        _ => PolicyCidrMap::open(pin_dir)?.read_all()?.len(),
    })
}
