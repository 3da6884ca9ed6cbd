use std::{collections::BTreeMap, path::Path};

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use dataplane_common::{EP_F_LOCAL, EndpointInfo, EndpointKey, MAP_ENDPOINTS, format_mac};
use serde::Serialize;

use super::{Row, open};

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

pub fn entries(pin_dir: &Path) -> Result<BTreeMap<EndpointKey, EndpointInfo>> {
    let map: HashMap<MapData, EndpointKey, EndpointInfo> =
        HashMap::try_from(open(pin_dir, MAP_ENDPOINTS)?)?;
    Ok(map.iter().collect::<Result<_, _>>()?)
}

pub fn rows(pin_dir: &Path) -> Result<Vec<EndpointRow>> {
    Ok(entries(pin_dir)?
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
