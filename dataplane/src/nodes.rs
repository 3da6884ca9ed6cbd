//! The other nodes of the cluster: where their pods live and how to reach
//! them. Until Kubernetes sync lands, the list comes from a JSON file the
//! agent watches:
//!
//! ```json
//! {"nodes": [{"name": "node-1", "internalIP": "172.20.0.12", "podCIDR": "10.244.1.0/24"}]}
//! ```
//!
//! The agent's own entry, if listed, is ignored. Applying a new list changes
//! only what differs: entries for nodes that did not change are never
//! touched, so their flows are not disturbed.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, Result};
use ipnetwork::Ipv4Network;
use serde::Deserialize;
use tracing::warn;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    pub ip: Ipv4Addr,
    pub pod_cidr: Ipv4Network,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NodeEntry {
    name: String,
    #[serde(rename = "internalIP")]
    internal_ip: String,
    #[serde(rename = "podCIDR")]
    pod_cidr: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    nodes: Vec<NodeEntry>,
}

/// Parses a node list. A file that does not parse is an error (the caller
/// keeps its last good state); a bad entry is logged with its name and field
/// and left out, the rest still applies.
pub fn parse(text: &str, own: &str) -> Result<BTreeMap<String, RemoteNode>> {
    let file: NodeFile =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))
            .context("node list")?;
    let mut out: BTreeMap<String, RemoteNode> = BTreeMap::new();
    for e in file.nodes {
        if e.name.is_empty() {
            warn!("node list: entry with an empty name skipped");
            continue;
        }
        if e.name == own {
            continue;
        }
        let ip = match e.internal_ip.parse::<Ipv4Addr>() {
            Ok(ip) => ip,
            Err(err) => {
                warn!(node = %e.name, field = "internalIP", value = %e.internal_ip, "node skipped: {err}");
                continue;
            }
        };
        let pod_cidr = match dataplane_common::api::parse_cidr(&e.pod_cidr) {
            Ok(ipnetwork::IpNetwork::V4(net)) => net,
            Ok(_) => {
                warn!(node = %e.name, field = "podCIDR", value = %e.pod_cidr, "node skipped: IPv6 pod CIDRs are not supported yet");
                continue;
            }
            Err(err) => {
                warn!(node = %e.name, field = "podCIDR", "node skipped: {err}");
                continue;
            }
        };
        if let Some((other, _)) = out.iter().find(|(_, n)| n.pod_cidr.overlaps(pod_cidr)) {
            warn!(node = %e.name, field = "podCIDR", value = %pod_cidr, "node skipped: overlaps node {other}");
            continue;
        }
        if out.contains_key(&e.name) {
            warn!(node = %e.name, field = "name", "node skipped: listed twice");
            continue;
        }
        out.insert(e.name, RemoteNode { ip, pod_cidr });
    }
    Ok(out)
}

/// Nodes by name.
pub type NodeList = Vec<(String, RemoteNode)>;

/// What to change to go from `old` to `new`: nodes to (re)install, nodes to
/// remove. Unchanged nodes appear in neither.
pub fn diff(
    old: &BTreeMap<String, RemoteNode>,
    new: &BTreeMap<String, RemoteNode>,
) -> (NodeList, NodeList) {
    let upsert = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(v))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let remove = old
        .iter()
        .filter(|(k, v)| new.get(*k) != Some(v))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    (upsert, remove)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_entries_are_skipped_and_the_rest_kept() {
        let text = r#"{"nodes": [
            {"name": "me", "internalIP": "172.20.0.11", "podCIDR": "10.244.0.0/24"},
            {"name": "a", "internalIP": "172.20.0.12", "podCIDR": "10.244.1.0/24"},
            {"name": "b", "internalIP": "not-an-ip", "podCIDR": "10.244.2.0/24"},
            {"name": "c", "internalIP": "172.20.0.14", "podCIDR": "10.244.3.7/24"},
            {"name": "d", "internalIP": "172.20.0.15", "podCIDR": "10.244.1.128/25"},
            {"name": "e", "internalIP": "172.20.0.16", "podCIDR": "10.244.4.0/24"}
        ]}"#;
        let nodes = parse(text, "me").unwrap();
        assert_eq!(nodes.keys().collect::<Vec<_>>(), ["a", "e"]);
        assert!(parse("{\"nodes\": [", "me").is_err());
        let err = parse(
            r#"{"nodes": [{"name": "x", "internalIP": 5, "podCIDR": "10.0.0.0/24"}]}"#,
            "me",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("internalIP"), "{err:#}");
    }

    #[test]
    fn diff_touches_only_what_changed() {
        let n = |ip: &str, cidr: &str| RemoteNode {
            ip: ip.parse().unwrap(),
            pod_cidr: cidr.parse().unwrap(),
        };
        let old = BTreeMap::from([
            ("a".into(), n("1.1.1.1", "10.0.1.0/24")),
            ("b".into(), n("1.1.1.2", "10.0.2.0/24")),
        ]);
        let new = BTreeMap::from([
            ("a".into(), n("1.1.1.1", "10.0.1.0/24")),
            ("c".into(), n("1.1.1.3", "10.0.3.0/24")),
        ]);
        let (up, rm) = diff(&old, &new);
        assert_eq!(
            up.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(
            rm.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
    }
}
