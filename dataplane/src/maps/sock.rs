//! The socket LB's maps: `dp_sock_rev`, its reverse translations, written
//! by the socket programs only (an LRU map: old sockets' entries age out),
//! read here for `dataplane map dump`; `dp_sock_clients`, written by the
//! agent.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use dataplane_common::{MAP_SOCK_CLIENTS, MAP_SOCK_REV, SockClient, SockRevKey, SockRevValue};
use serde::Serialize;

use super::{Row, open};

/// A translated socket: where it really goes, and what the application
/// sees instead.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SockRevRow {
    pub cookie: u64,
    pub backend: String,
    pub service: String,
    pub frontend_id: u32,
}

impl Row for SockRevRow {
    const HEADERS: &'static [&'static str] = &["SOCKET", "BACKEND", "SHOWN AS", "FRONTEND"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.cookie.to_string(),
            self.backend.clone(),
            self.service.clone(),
            self.frontend_id.to_string(),
        ]
    }
}

fn endpoint(addr: [u8; 4], port: [u8; 2]) -> String {
    format!("{}:{}", Ipv4Addr::from(addr), u16::from_be_bytes(port))
}

pub fn rows(pin_dir: &Path) -> Result<Vec<SockRevRow>> {
    let map: HashMap<MapData, SockRevKey, SockRevValue> =
        HashMap::try_from(open(pin_dir, MAP_SOCK_REV)?)?;
    let mut rows = Vec::new();
    for item in map.iter() {
        let (k, v) = item?;
        rows.push(SockRevRow {
            cookie: k.cookie,
            backend: endpoint(k.addr, k.port),
            service: endpoint(v.addr, v.port),
            frontend_id: v.frontend_id,
        });
    }
    rows.sort_by_key(|r| r.cookie);
    Ok(rows)
}

/// `dp_sock_clients`: which address a network namespace's sockets send
/// from (a local pod's, or the node's own), written by the agent from its
/// endpoint registry.
pub struct SockClientsMap(HashMap<MapData, u64, SockClient>);

impl SockClientsMap {
    pub fn new(map: aya::maps::Map) -> Result<Self> {
        Ok(Self(HashMap::try_from(map)?))
    }

    pub fn entries(&self) -> Result<BTreeMap<u64, Ipv4Addr>> {
        let mut out = BTreeMap::new();
        for item in self.0.iter() {
            let (k, v) = item?;
            out.insert(k, Ipv4Addr::from(v.addr));
        }
        Ok(out)
    }

    /// Makes the map hold exactly `want`; returns (written, removed).
    pub fn set(&mut self, want: &BTreeMap<u64, Ipv4Addr>) -> Result<(usize, usize)> {
        let have = self.entries()?;
        let mut written = 0;
        for (cookie, ip) in want {
            if have.get(cookie) != Some(ip) {
                let v = SockClient {
                    addr: ip.octets(),
                    _pad: [0; 4],
                };
                self.0.insert(cookie, v, 0)?;
                written += 1;
            }
        }
        let mut removed = 0;
        for cookie in have.keys().filter(|c| !want.contains_key(c)) {
            match self.0.remove(cookie) {
                Ok(()) => removed += 1,
                Err(e) if super::absent(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok((written, removed))
    }
}

/// A network namespace the socket programs know, for `map dump`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SockClientRow {
    pub netns_cookie: u64,
    pub address: String,
}

impl Row for SockClientRow {
    const HEADERS: &'static [&'static str] = &["NETNS COOKIE", "SENDS FROM"];
    fn cells(&self) -> Vec<String> {
        vec![self.netns_cookie.to_string(), self.address.clone()]
    }
}

pub fn client_rows(pin_dir: &Path) -> Result<Vec<SockClientRow>> {
    Ok(SockClientsMap::new(open(pin_dir, MAP_SOCK_CLIENTS)?)?
        .entries()?
        .into_iter()
        .map(|(netns_cookie, ip)| SockClientRow {
            netns_cookie,
            address: ip.to_string(),
        })
        .collect())
}
