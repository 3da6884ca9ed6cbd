//! BGP: each node's speaker is a BIRD 2 daemon the agent configures and
//! supervises, as Calico drives BIRD. The agent writes the whole
//! configuration (the node's pod CIDR and, optionally, Service addresses to
//! advertise; the peers; learned routes exported to the kernel) and has the
//! daemon reload it; the daemon outlives the agent, so a restart of the
//! agent (even `kill -9`) neither drops a session nor withdraws a route.
//! This module is the pure part: the configuration text and the reading of
//! `birdc` answers, shared by the agent and the CLI.

use std::{collections::BTreeSet, fmt::Write as _, net::Ipv4Addr, str::FromStr};

use anyhow::{Context as _, Result, bail};
use ipnetwork::Ipv4Network;

pub use dataplane_common::api::{BgpRoute as Route, BgpSession as Session};

/// A BGP neighbour: `ADDRESS:ASN` (e.g. `172.21.0.1:65000`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub addr: Ipv4Addr,
    pub asn: u32,
}

impl FromStr for Peer {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, asn) = s
            .rsplit_once(':')
            .with_context(|| format!("BGP peer {s:?}: expected ADDRESS:ASN"))?;
        let addr = addr
            .parse()
            .with_context(|| format!("BGP peer {s:?}: {addr:?} is not an IPv4 address"))?;
        Ok(Peer {
            addr,
            asn: parse_asn(asn).with_context(|| format!("BGP peer {s:?}"))?,
        })
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.addr, self.asn)
    }
}

/// An AS number: 1 to 4,294,967,294 (0 and 65535's 32-bit twin are
/// reserved).
pub fn parse_asn(s: &str) -> Result<u32> {
    let n: u32 = s
        .parse()
        .with_context(|| format!("AS number {s:?} is not a number"))?;
    if n == 0 || n == u32::MAX {
        bail!("AS number {n} is reserved");
    }
    Ok(n)
}

/// The node's speaker as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Speaker {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    pub peers: Vec<Peer>,
    /// Seconds a peer keeps this node's routes while the daemon restarts.
    pub graceful_restart: u32,
}

/// A node's own AS number and peers (its Node object's annotations), each
/// overriding the agent's flag where given.
pub type Overrides = (Option<u32>, Option<Vec<Peer>>);

/// What the node advertises.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Advertised {
    pub pod_cidr: Option<Ipv4Network>,
    /// LoadBalancer ingress and external IPs (`/32`s).
    pub service_ips: BTreeSet<Ipv4Addr>,
}

/// The protocol names the configuration gives: one per peer.
pub fn peer_protocol(p: &Peer) -> String {
    format!("peer_{}", p.addr.to_string().replace('.', "_"))
}

const PODS: &str = "dp_pods";
const SERVICES: &str = "dp_services";

/// BIRD 2's configuration for `speaker` advertising `adv`, logging to
/// `log`.
pub fn render(speaker: &Speaker, adv: &Advertised, log: &str) -> String {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# Written by the dataplane agent; it rewrites this file on every change.\n\
         log \"{log}\" all;\n\
         router id {};\n\
         \n\
         protocol device {{ scan time 10; }}\n\
         # Connected networks: they resolve the next hops of iBGP routes.\n\
         protocol direct {{ ipv4; }}\n\
         # What the peers taught goes into the kernel's main table, for the\n\
         # datapath's native routing; nothing is learned from the kernel.\n\
         protocol kernel {{\n\
         \x20   ipv4 {{ import none; export where source = RTS_BGP; }};\n\
         \x20   merge paths on;\n\
         \x20   graceful restart on;\n\
         }}\n",
        speaker.router_id
    );
    // Blackholes in BIRD's table only (the kernel protocol takes BGP's
    // routes alone): the datapath delivers to the node's pods itself.
    let _ = writeln!(c, "protocol static {PODS} {{\n    ipv4;");
    if let Some(cidr) = adv.pod_cidr {
        let _ = writeln!(c, "    route {cidr} blackhole;");
    }
    let _ = writeln!(c, "}}\nprotocol static {SERVICES} {{\n    ipv4;");
    for ip in &adv.service_ips {
        let _ = writeln!(c, "    route {ip}/32 blackhole;");
    }
    let _ = writeln!(
        c,
        "}}\n\
         filter dp_export {{\n\
         \x20   if proto = \"{PODS}\" || proto = \"{SERVICES}\" then accept;\n\
         \x20   reject;\n\
         }}\n\
         # A peer's copy of what this node advertises is refused: the node\n\
         # reaches its own pods and Service addresses itself.\n\
         filter dp_import {{\n\
         \x20   if net ~ [ {} ] then reject;\n\
         \x20   accept;\n\
         }}",
        own_nets(adv)
    );
    for p in &speaker.peers {
        let _ = writeln!(
            c,
            "\nprotocol bgp {} {{\n\
             \x20   local as {};\n\
             \x20   neighbor {} as {};\n\
             \x20   connect retry time 2;\n\
             \x20   error wait time 1, 16;\n\
             \x20   graceful restart on;\n\
             \x20   graceful restart time {};\n\
             \x20   ipv4 {{\n\
             \x20       import filter dp_import;\n\
             \x20       export filter dp_export;\n\
             \x20       next hop self;\n\
             \x20   }};\n\
             }}",
            peer_protocol(p),
            speaker.asn,
            p.addr,
            p.asn,
            speaker.graceful_restart
        );
    }
    c
}

/// The prefix set of what this node advertises (a never-matching
/// placeholder when it has nothing yet: BIRD refuses an empty set).
fn own_nets(adv: &Advertised) -> String {
    let mut nets: Vec<String> = adv.pod_cidr.iter().map(|c| format!("{c}+")).collect();
    nets.extend(adv.service_ips.iter().map(|ip| format!("{ip}/32")));
    if nets.is_empty() {
        nets.push("0.0.0.0/32".into());
    }
    nets.join(", ")
}

/// RFC 4271's state numbering (BGP4-MIB's bgpPeerState), for the metric:
/// 1 Idle ... 6 Established.
pub fn state_code(s: &Session) -> u8 {
    match s.state.as_str() {
        "Idle" | "Down" => 1,
        "Connect" => 2,
        "Active" => 3,
        "OpenSent" => 4,
        "OpenConfirm" => 5,
        "Established" => 6,
        _ => 0,
    }
}

impl crate::maps::Row for Session {
    const HEADERS: &'static [&'static str] = &[
        "PEER",
        "AS",
        "STATE",
        "SINCE",
        "ROUTES IN",
        "ROUTES OUT",
        "UPDATES IN",
        "UPDATES OUT",
        "LAST ERROR",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.neighbor.clone(),
            self.neighbor_as
                .map_or_else(|| "-".into(), |a| a.to_string()),
            self.state.clone(),
            self.since.clone(),
            self.routes_imported.to_string(),
            self.routes_exported.to_string(),
            self.updates_received.to_string(),
            self.updates_sent.to_string(),
            self.last_error.clone().unwrap_or_else(|| "-".into()),
        ]
    }
}

impl crate::maps::Row for Route {
    const HEADERS: &'static [&'static str] = &["PREFIX", "KIND", "FROM", "VIA", "AS PATH", "BEST"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.prefix.clone(),
            self.kind.clone(),
            self.protocol.clone(),
            self.via.clone().unwrap_or_else(|| "-".into()),
            self.as_path.clone().unwrap_or_else(|| "-".into()),
            if self.best { "*" } else { "" }.into(),
        ]
    }
}

/// Reads the BGP sessions out of `birdc show protocols all`.
pub fn parse_protocols(text: &str) -> Vec<Session> {
    let mut out = Vec::new();
    let mut cur: Option<Session> = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            if let Some(s) = cur.take() {
                out.push(s);
            }
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() >= 4 && cols[1] == "BGP" {
                cur = Some(Session {
                    name: cols[0].to_owned(),
                    since: cols.get(4).map(|s| s.to_string()).unwrap_or_default(),
                    state: cols.get(5).map_or("Down", |s| s).to_owned(),
                    ..Default::default()
                });
            }
            continue;
        }
        let Some(s) = cur.as_mut() else { continue };
        let line = line.trim();
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "BGP state" => s.state = value.to_owned(),
            "Neighbor address" => s.neighbor = value.to_owned(),
            "Neighbor AS" => s.neighbor_as = value.parse().ok(),
            "Last error" => s.last_error = Some(value.to_owned()),
            "Routes" => {
                // "1 imported, 2 exported, 1 preferred"
                for part in value.split(',') {
                    let mut w = part.split_whitespace();
                    let (Some(n), Some(what)) = (w.next(), w.next()) else {
                        continue;
                    };
                    let n = n.parse().unwrap_or(0);
                    match what {
                        "imported" => s.routes_imported = n,
                        "exported" => s.routes_exported = n,
                        _ => {}
                    }
                }
            }
            // Columns: received rejected filtered ignored accepted.
            "Import updates" => {
                s.updates_received = first_number(value);
            }
            "Export updates" => {
                s.updates_sent = value
                    .split_whitespace()
                    .last()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
            }
            _ => {}
        }
    }
    if let Some(s) = cur.take() {
        out.push(s);
    }
    out
}

fn first_number(v: &str) -> u64 {
    v.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Reads BIRD's routes from `birdc show route`, keeping what this node
/// advertises and what it learned over BGP.
pub fn parse_routes(text: &str) -> Vec<Route> {
    let mut out: Vec<Route> = Vec::new();
    let mut prefix = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("via ") {
            if let Some(r) = out.last_mut()
                && r.via.is_none()
            {
                r.via = rest.split_whitespace().next().map(str::to_owned);
            }
            continue;
        }
        let Some(open) = trimmed.find('[') else {
            continue;
        };
        let head = &trimmed[..open];
        let mut cols = head.split_whitespace();
        // A route line names its prefix; further routes for the same
        // prefix start with the route type alone.
        let first = cols.next().unwrap_or("");
        if first.contains('/') {
            prefix = first.to_owned();
        }
        let Some(close) = trimmed[open..].find(']') else {
            continue;
        };
        let inside = &trimmed[open + 1..open + close];
        let protocol = inside.split_whitespace().next().unwrap_or("").to_owned();
        let kind = if protocol == PODS || protocol == SERVICES {
            "advertised"
        } else if protocol.starts_with("peer_") {
            "learned"
        } else {
            continue;
        };
        let tail = &trimmed[open + close + 1..];
        out.push(Route {
            prefix: prefix.clone(),
            protocol,
            kind: kind.to_owned(),
            via: None,
            as_path: tail
                .find("[AS")
                .map(|i| tail[i..].split(']').next().unwrap_or("").to_owned() + "]"),
            best: tail.trim_start().starts_with('*'),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_name_the_bad_part() {
        assert_eq!(
            "172.21.0.1:65000".parse::<Peer>().expect("peer"),
            Peer {
                addr: Ipv4Addr::new(172, 21, 0, 1),
                asn: 65000
            }
        );
        for (bad, says) in [
            ("172.21.0.1", "ADDRESS:ASN"),
            ("router:65000", "not an IPv4 address"),
            ("172.21.0.1:lots", "not a number"),
            ("172.21.0.1:0", "reserved"),
        ] {
            let e = format!("{:#}", bad.parse::<Peer>().expect_err(bad));
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_configuration_advertises_exactly_the_node_s_own() {
        let speaker = Speaker {
            asn: 64512,
            router_id: Ipv4Addr::new(172, 21, 0, 11),
            peers: vec!["172.21.0.1:65000".parse().expect("peer")],
            graceful_restart: 120,
        };
        let adv = Advertised {
            pod_cidr: Some("10.244.0.0/24".parse().expect("cidr")),
            service_ips: [Ipv4Addr::new(192, 0, 2, 50)].into(),
        };
        let c = render(&speaker, &adv, "/run/x/bird.log");
        for want in [
            "router id 172.21.0.11;",
            "route 10.244.0.0/24 blackhole;",
            "route 192.0.2.50/32 blackhole;",
            "protocol bgp peer_172_21_0_1 {",
            "local as 64512;",
            "neighbor 172.21.0.1 as 65000;",
            "export where source = RTS_BGP;",
            "if net ~ [ 10.244.0.0/24+, 192.0.2.50/32 ] then reject;",
            "graceful restart time 120;",
        ] {
            assert!(c.contains(want), "missing {want:?} in:\n{c}");
        }
        let empty = render(&speaker, &Advertised::default(), "/l");
        assert!(!empty.contains("blackhole"), "{empty}");
        assert!(empty.contains("[ 0.0.0.0/32 ]"), "{empty}");
    }

    const PROTOCOLS: &str = "BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     08:40:00.100  
dp_pods    Static     master4    up     08:40:00.100  
peer_172_21_0_1 BGP        ---        up     08:40:02.312  Established   
  BGP state:          Established
    Neighbor address: 172.21.0.1
    Neighbor AS:      65000
    Local AS:         64512
    Neighbor ID:      172.21.0.1
  Channel ipv4
    State:          UP
    Routes:         2 imported, 1 exported, 2 preferred
    Route change stats:     received   rejected   filtered    ignored   accepted
      Import updates:              3          0          1          0          2
      Import withdraws:            0          0        ---          0          0
      Export updates:              4          0          3        ---          1
      Export withdraws:            0        ---        ---        ---          0

peer_172_21_9_1 BGP        ---        start  08:40:05.000  Active        Received: Bad peer AS
  BGP state:          Active
    Neighbor address: 172.21.9.1
    Neighbor AS:      65001
    Local AS:         64512
    Connect delay:    1.234/5
    Last error:       Received: Bad peer AS
";

    #[test]
    fn sessions_are_read_from_birdc() {
        let s = parse_protocols(PROTOCOLS);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].name, "peer_172_21_0_1");
        assert_eq!(s[0].state, "Established");
        assert_eq!(state_code(&s[0]), 6);
        assert_eq!(s[0].neighbor, "172.21.0.1");
        assert_eq!(s[0].neighbor_as, Some(65000));
        assert_eq!((s[0].routes_imported, s[0].routes_exported), (2, 1));
        assert_eq!((s[0].updates_received, s[0].updates_sent), (3, 1));
        assert_eq!(s[0].last_error, None);
        assert_eq!(s[1].state, "Active");
        assert_eq!(state_code(&s[1]), 3);
        assert_eq!(s[1].last_error.as_deref(), Some("Received: Bad peer AS"));
    }

    #[test]
    fn routes_are_read_from_birdc() {
        let text = "BIRD 2.0.12 ready.
Table master4:
10.244.1.0/24        unicast [peer_172_21_0_1 08:40:03.000] * (100) [AS65000i]
\tvia 172.21.0.1 on eth0
                     unicast [peer_172_21_5_1 08:40:04.000] (100) [AS65005i]
\tvia 172.21.5.1 on eth1
10.244.0.0/24        blackhole [dp_pods 08:40:00.100] * (200)
172.21.0.0/24        unicast [direct1 08:40:00.100] * (240)
\tdev eth0
";
        let r = parse_routes(text);
        assert_eq!(r.len(), 3, "{r:?}");
        assert_eq!(r[0].prefix, "10.244.1.0/24");
        assert_eq!(r[0].kind, "learned");
        assert_eq!(r[0].via.as_deref(), Some("172.21.0.1"));
        assert_eq!(r[0].as_path.as_deref(), Some("[AS65000i]"));
        assert!(r[0].best);
        assert_eq!(r[1].prefix, "10.244.1.0/24");
        assert!(!r[1].best);
        assert_eq!(r[1].via.as_deref(), Some("172.21.5.1"));
        assert_eq!(r[2].kind, "advertised");
        assert_eq!(r[2].protocol, "dp_pods");
    }
}
