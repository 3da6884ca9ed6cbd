//! The network configuration (stdin) and the runtime's environment.

use std::{net::IpAddr, path::PathBuf};

use ipnetwork::IpNetwork;
use serde::Deserialize;

use crate::error::{CniError, Result, code};

pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
pub const DEFAULT_DATA_DIR: &str = dataplane_common::api::IPAM_DATA_DIR;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    #[expect(dead_code, reason = "required by the spec; the runtime chose us by it")]
    pub plugin_type: String,
    /// The agent's API socket on this node.
    #[serde(default = "default_socket")]
    pub agent_socket: PathBuf,
    /// Pod interface MTU; the agent's value when absent.
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub ipam: IpamConf,
    #[serde(default)]
    pub dns: Option<serde_json::Value>,
    #[serde(default)]
    pub prev_result: Option<serde_json::Value>,
    /// GC: the attachments the runtime still has.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamConf {
    /// Overrides the node pod CIDR the agent reports.
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub range_start: Option<IpAddr>,
    #[serde(default)]
    pub range_end: Option<IpAddr>,
    /// Allocation state; one directory per network name below it.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

fn default_socket() -> PathBuf {
    dataplane_common::api::DEFAULT_SOCKET.into()
}

impl NetConf {
    /// Parses and validates stdin. JSON that does not parse is a decode error
    /// (6); JSON of the wrong shape, an invalid network config (7); a version
    /// we do not speak, an incompatible version (1).
    pub fn parse(bytes: &[u8]) -> Result<NetConf> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(code::DECODE, "network configuration is not valid JSON").details(e)
        })?;
        if let Some(v) = value.get("cniVersion").and_then(|v| v.as_str())
            && !SUPPORTED_VERSIONS.contains(&v)
        {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {v:?} is not supported"),
            )
            .details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))));
        }
        // The path names the field: "mtu: invalid type: string ...".
        let conf: NetConf = serde_path_to_error::deserialize(value).map_err(|e| {
            CniError::new(code::INVALID_CONFIG, "invalid network configuration").details(e)
        })?;
        if conf.name.is_empty() {
            return Err(
                CniError::new(code::INVALID_CONFIG, "invalid network configuration")
                    .details("field name is empty"),
            );
        }
        if let Some(mtu) = conf.mtu
            && !(576..=65535).contains(&mtu)
        {
            return Err(
                CniError::new(code::INVALID_CONFIG, "invalid network configuration")
                    .details(format!("field mtu: {mtu} is outside 576..=65535")),
            );
        }
        if let Some(subnet) = &conf.ipam.subnet {
            parse_subnet(subnet)?;
        }
        Ok(conf)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.ipam
            .data_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_DATA_DIR.into())
            .join(&self.name)
    }
}

pub fn parse_subnet(subnet: &str) -> Result<IpNetwork> {
    let net = dataplane_common::api::parse_cidr(subnet).map_err(|e| {
        CniError::new(code::INVALID_CONFIG, "invalid network configuration")
            .details(format!("field ipam.subnet: {e}"))
    })?;
    if net.is_ipv6() {
        return Err(
            CniError::new(code::INVALID_CONFIG, "invalid network configuration").details(format!(
                "field ipam.subnet: {subnet}: IPv6 pod CIDRs are not supported yet"
            )),
        );
    }
    Ok(net)
}

/// The runtime's `CNI_*` variables.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: Vec<(String, String)>,
}

impl Env {
    pub fn from_process() -> Env {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        let args = var("CNI_ARGS")
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Env {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args,
        }
    }

    pub fn arg(&self, key: &str) -> &str {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v)
    }

    /// Fails with code 4 naming the first missing variable.
    pub fn require(&self, names: &[&str]) -> Result<()> {
        for name in names {
            let value = match *name {
                "CNI_CONTAINERID" => &self.container_id,
                "CNI_NETNS" => &self.netns,
                "CNI_IFNAME" => &self.ifname,
                _ => continue,
            };
            if value.is_empty() {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{name} is not set"),
                ));
            }
        }
        if !self.ifname.is_empty() && (self.ifname.len() > 15 || self.ifname.contains('/')) {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_IFNAME {:?} is not a valid interface name", self.ifname),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_for_bad_input() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, code::DECODE);
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n","type":"dataplane-cni"}"#)
            .unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = NetConf::parse(br#"{"cniVersion":"1.1.0","type":"dataplane-cni"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.details.contains("name"), "{e}");
        let e = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"dataplane-cni","mtu":"big"}"#,
        )
        .unwrap_err();
        assert!(
            e.code == code::INVALID_CONFIG && e.details.contains("mtu"),
            "{e}"
        );
        let e = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t","ipam":{"subnet":"10.1.1.1/24"}}"#,
        )
        .unwrap_err();
        assert!(
            e.details.contains("ipam.subnet") && e.details.contains("host bits"),
            "{e}"
        );
        let e = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t","ipam":{"subnett":"10.1.1.0/24"}}"#,
        )
        .unwrap_err();
        assert!(e.details.contains("subnett"), "{e}");
        let ok = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"t","ipam":{"subnet":"10.1.1.0/24"}}"#,
        )
        .unwrap();
        assert_eq!(ok.data_dir(), PathBuf::from(DEFAULT_DATA_DIR).join("n"));
    }
}
