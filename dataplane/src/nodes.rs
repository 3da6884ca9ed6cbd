//! The other nodes of the cluster: where their pods live and how to reach
//! them. Applying a new set changes only what differs: entries for nodes
//! that did not change are never touched, so their flows are not disturbed.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnetwork::Ipv4Network;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    pub ip: Ipv4Addr,
    pub pod_cidr: Ipv4Network,
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
