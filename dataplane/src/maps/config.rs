use std::path::Path;

use anyhow::Result;
use aya::maps::{Array, MapData};
use dataplane_common::{DatapathConfig, MAP_CONFIG, MODE_NATIVE, MODE_VXLAN};
use serde::Serialize;

use super::{Row, open};

#[derive(Debug, Serialize)]
pub struct ConfigRow {
    pub mode: String,
    pub vni: u32,
    pub vxlan_ifindex: u32,
    pub uplink_ifindex: u32,
}

impl Row for ConfigRow {
    const HEADERS: &'static [&'static str] = &["MODE", "VNI", "VXLAN-IFINDEX", "UPLINK-IFINDEX"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.mode.clone(),
            self.vni.to_string(),
            self.vxlan_ifindex.to_string(),
            self.uplink_ifindex.to_string(),
        ]
    }
}

pub fn rows(pin_dir: &Path) -> Result<Vec<ConfigRow>> {
    let map: Array<MapData, DatapathConfig> = Array::try_from(open(pin_dir, MAP_CONFIG)?)?;
    let c = map.get(&0, 0)?;
    let mode = match c.mode {
        MODE_VXLAN => "vxlan",
        MODE_NATIVE => "native",
        0 => "unconfigured",
        _ => "unknown",
    };
    Ok(vec![ConfigRow {
        mode: mode.into(),
        vni: c.vni,
        vxlan_ifindex: c.vxlan_ifindex,
        uplink_ifindex: c.uplink_ifindex,
    }])
}
