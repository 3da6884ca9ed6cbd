//! `dp_config`: the datapath's settings, one slot, written by the agent at
//! start.

use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{Array, Map, MapData};
use dataplane_common::{DatapathConfig, MAP_CONFIG, MODE_NATIVE, MODE_VXLAN};
use serde::Serialize;

use super::{Row, open};

pub struct ConfigMap(Array<MapData, DatapathConfig>);

impl ConfigMap {
    pub fn new(map: Map) -> Result<Self> {
        Ok(Self(Array::try_from(map)?))
    }

    pub fn open(pin_dir: &Path) -> Result<Self> {
        Self::new(open(pin_dir, MAP_CONFIG)?)
    }

    pub fn get(&self) -> Result<DatapathConfig> {
        Ok(self.0.get(&0, 0)?)
    }

    /// Writes the settings when they differ from what the map holds.
    pub fn sync(&mut self, cfg: DatapathConfig) -> Result<bool> {
        if self.get()? == cfg {
            return Ok(false);
        }
        self.0.set(0, cfg, 0).context("writing dp_config")?;
        Ok(true)
    }
}

#[derive(Debug, Serialize)]
pub struct ConfigRow {
    pub mode: String,
    pub vni: u32,
    pub vxlan_ifindex: u32,
    pub uplink_ifindex: u32,
    pub node_ip: String,
}

impl Row for ConfigRow {
    const HEADERS: &'static [&'static str] =
        &["MODE", "VNI", "VXLAN-IFINDEX", "UPLINK-IFINDEX", "NODE-IP"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.mode.clone(),
            self.vni.to_string(),
            self.vxlan_ifindex.to_string(),
            self.uplink_ifindex.to_string(),
            self.node_ip.clone(),
        ]
    }
}

pub fn rows(pin_dir: &Path) -> Result<Vec<ConfigRow>> {
    let c = ConfigMap::open(pin_dir)?.get()?;
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
        node_ip: Ipv4Addr::from(c.node_ipv4).to_string(),
    }])
}
