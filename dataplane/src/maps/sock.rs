//! `dp_sock_rev`: the socket LB's reverse translations, written by the
//! socket programs only (an LRU map: old sockets' entries age out). Read
//! here for `dataplane map dump dp_sock_rev`.

use std::{net::Ipv4Addr, path::Path};

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use dataplane_common::{MAP_SOCK_REV, SockRevKey, SockRevValue};
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
