//! The agent's local API: newline-delimited JSON over a Unix socket, one
//! request and one response per connection.
//!
//! The CNI plugin registers endpoints through it (so programs and maps are in
//! place before ADD returns) and the CLI asks the agent for its status. Kept
//! std-only on the client side so the CNI binary stays small.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/dataplane/agent.sock";
/// Where `dataplane-cni install` puts the plugin and its conflist, and
/// where the plugin's IPAM keeps its allocations (one directory per
/// network): what `dataplane uninstall` removes.
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
pub const CNI_PLUGIN: &str = "dataplane-cni";
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const CNI_CONF_NAME: &str = "05-dataplane.conflist";
pub const IPAM_DATA_DIR: &str = "/var/lib/dataplane/ipam";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    /// The runtime's container id (CNI_CONTAINERID); the endpoint's identity in the API.
    pub container_id: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
    /// Host-side veth name in the node's network namespace.
    pub host_ifname: String,
    /// Addresses assigned to the pod.
    pub ips: Vec<IpAddr>,
    /// MAC of the pod's interface, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The pod's network namespace cookie: the socket programs know the
    /// pod's address by it (affinity in socket LB). None from plugins that
    /// did not send it: the per-packet path serves those pods' affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    #[serde(flatten)]
    pub spec: EndpointSpec,
    pub ifindex: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: String,
    pub version: String,
    /// `tcx` or `clsact`.
    pub attach_mode: String,
    pub pin_dir: String,
    pub endpoints: usize,
    /// This node's pod CIDR, when known (the CNI plugin allocates from it).
    #[serde(default)]
    pub pod_cidr: Option<String>,
    /// MTU for pod interfaces (underlay MTU minus encapsulation overhead).
    pub pod_mtu: u32,
    /// `vxlan` or `native`.
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub node_ip: String,
    /// Remote nodes installed.
    #[serde(default)]
    pub nodes: usize,
    /// Restored, cluster state applied, and this node's pod CIDR known:
    /// only then are endpoints added.
    #[serde(default)]
    pub ready: bool,
    /// How the XDP program is attached to the uplink: `native`, `generic`
    /// or `off`.
    #[serde(default)]
    pub xdp: String,
    /// The cgroup the socket programs are attached to, if any.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Service frontends and backends in the maps.
    #[serde(default)]
    pub frontends: usize,
    #[serde(default)]
    pub backends: usize,
    /// Frontends without a backend: their new connections are refused.
    #[serde(default)]
    pub frontends_empty: usize,
    /// Egress masquerade to the node's address.
    #[serde(default)]
    pub masquerade: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    EndpointAdd(EndpointSpec),
    EndpointDel {
        container_id: String,
    },
    EndpointList,
    /// Removes every conntrack entry (established Service and masqueraded
    /// flows lose their translation).
    CtFlush,
    /// Removes the entries of NAT flows only (masquerade, NodePort SNAT):
    /// those flows lose their translation, their ports are free again.
    NatFlush,
    /// A local pod's compiled NetworkPolicy, with the policies its entries
    /// came from.
    PolicyGet {
        namespace: String,
        name: String,
    },
    /// Answers once everything the cluster source holds now is in the
    /// datapath: a directory source rereads its files first; the API
    /// source's watches deliver on their own, so there it covers what they
    /// have delivered. For tools that change the cluster and then look.
    Sync,
    /// The addresses of a pod (`namespace/name`) or a Service
    /// (`svc/namespace/name`: its cluster IPs), as the agent knows them.
    Resolve {
        name: String,
    },
    /// Every security identity with the labels it stands for.
    Identities,
    /// Changes the prefilter's denied source prefixes now (until the
    /// agent restarts with its configured `--deny-cidr` set); answers
    /// with the whole set.
    Prefilter {
        add: Vec<String>,
        delete: Vec<String>,
    },
    /// The BGP speaker's sessions and routes.
    Bgp,
}

/// A BGP session, for `dataplane bgp peers`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpSession {
    /// The daemon's protocol name for the peer.
    pub name: String,
    pub neighbor: String,
    pub neighbor_as: Option<u32>,
    /// The BGP finite-state machine's state (`Established`, `Active`, ...).
    pub state: String,
    /// Since when, as the daemon tells it.
    pub since: String,
    /// The last error (`Received: Bad peer AS`, `Socket: Connection
    /// refused`, ...), if any.
    pub last_error: Option<String>,
    pub routes_imported: u64,
    pub routes_exported: u64,
    /// Route updates received and sent.
    pub updates_received: u64,
    pub updates_sent: u64,
}

/// A route in the BGP daemon's table, for `dataplane bgp routes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpRoute {
    pub prefix: String,
    /// The protocol it came from: a peer's, or what this node advertises.
    pub protocol: String,
    /// `advertised` (this node's own) or `learned` (from a peer).
    pub kind: String,
    pub via: Option<String>,
    /// The AS path's summary (`[AS65000i]`), for learned routes.
    pub as_path: Option<String>,
    /// The best route for its prefix (installed in the kernel if learned).
    pub best: bool,
}

/// The agent's BGP speaker, for `dataplane bgp peers|routes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpStatus {
    pub asn: u32,
    pub router_id: String,
    pub sessions: Vec<BgpSession>,
    pub routes: Vec<BgpRoute>,
}

/// A security identity, for `dataplane identity list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityInfo {
    pub id: u32,
    pub namespace: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub namespace_labels: std::collections::BTreeMap<String, String>,
    /// Local endpoints (pod `namespace/name`) that have it.
    pub endpoints: Vec<String>,
}

/// One entry of a pod's compiled policy, as `dataplane policy get` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEntry {
    /// `ingress` or `egress`.
    pub direction: String,
    /// `any`, an identity with what it stands for, or an address class.
    pub peer: String,
    pub protocol: String,
    pub ports: String,
    /// `namespace/name` of the policy that gave the entry; the marker rows
    /// say whether the direction is isolated.
    pub from: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    pub ifindex: u32,
    pub identity: u32,
    pub entries: Vec<PolicyEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok,
    Status(Box<AgentStatus>),
    Endpoints {
        endpoints: Vec<EndpointStatus>,
    },
    Flushed {
        removed: usize,
    },
    /// The prefilter's denied prefixes after a change.
    Prefilter {
        cidrs: Vec<String>,
    },
    Policy(Box<PolicyView>),
    Bgp(Box<BgpStatus>),
    Addresses {
        ips: Vec<IpAddr>,
    },
    Identities {
        identities: Vec<IdentityInfo>,
    },
    Error {
        message: String,
    },
    /// The agent cannot take the request yet; the same request later can
    /// succeed (the CNI plugin answers "try again later").
    NotReady {
        message: String,
    },
}

/// Errors a caller may want to tell apart: the CNI plugin maps `Unavailable`
/// to "try again later".
#[derive(Debug)]
pub enum CallError {
    /// Nothing is listening (agent not running or not ready yet).
    Unavailable(std::io::Error),
    /// The agent answered, but the exchange failed or made no sense.
    Protocol(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unavailable(e) => write!(f, "agent is not reachable: {e}"),
            CallError::Protocol(m) => write!(f, "agent API error: {m}"),
        }
    }
}

impl std::error::Error for CallError {}

/// Sends one request and waits for its response.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, CallError> {
    let mut stream = UnixStream::connect(socket).map_err(CallError::Unavailable)?;
    let proto = |e: std::io::Error| CallError::Protocol(format!("{}: {e}", socket.display()));
    stream.set_read_timeout(Some(timeout)).map_err(proto)?;
    stream.set_write_timeout(Some(timeout)).map_err(proto)?;
    let mut line =
        serde_json::to_string(request).map_err(|e| CallError::Protocol(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(proto)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(proto)?;
    if reply.is_empty() {
        return Err(CallError::Protocol(
            "agent closed the connection without answering".into(),
        ));
    }
    serde_json::from_str(&reply)
        .map_err(|e| CallError::Protocol(format!("bad response {reply:?}: {e}")))
}

/// A CIDR as written in flags and configs: `address/prefix-length`, with the
/// prefix length required and no host bits set.
pub fn parse_cidr(cidr: &str) -> Result<ipnetwork::IpNetwork, String> {
    if !cidr.contains('/') {
        return Err(format!(
            "{cidr:?} has no prefix length (expected e.g. 10.244.0.0/24)"
        ));
    }
    let net: ipnetwork::IpNetwork = cidr.parse().map_err(|e| format!("{cidr:?}: {e}"))?;
    if net.ip() != net.network() {
        return Err(format!(
            "{cidr:?} has host bits set (the network is {}/{})",
            net.network(),
            net.prefix()
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        assert!(parse_cidr("10.244.1.0/24").is_ok());
        assert!(parse_cidr("fd00::/64").is_ok());
        assert!(
            parse_cidr("10.244.1.1/24")
                .unwrap_err()
                .contains("host bits")
        );
        assert!(parse_cidr("10.244.1.0/33").is_err());
        assert!(
            parse_cidr("10.244.1.0")
                .unwrap_err()
                .contains("prefix length")
        );
        assert!(parse_cidr("nope/24").is_err());
    }

    #[test]
    fn wire_format_is_stable() {
        let req = Request::EndpointDel {
            container_id: "abc".into(),
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"op":"endpoint_del","container_id":"abc"}"#
        );
        let resp: Response = serde_json::from_str(r#"{"result":"error","message":"x"}"#).unwrap();
        assert_eq!(
            resp,
            Response::Error {
                message: "x".into()
            }
        );
    }
}
