//! The rtnetlink operations the agent and the CNI plugin share. A handle
//! works in the network namespace its socket was opened in.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd as _,
};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage},
        neighbour::NeighbourState,
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
    },
};

/// The routing protocol number the agent tags its routes with, so that it
/// can find exactly its own routes again after a restart (`ip route show
/// proto 205`).
pub const ROUTE_PROTOCOL: u8 = 205;

/// What failed, and the kernel's answer.
#[derive(Debug)]
pub struct NlError {
    pub what: String,
    pub cause: String,
}

impl std::fmt::Display for NlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.cause)
    }
}

impl std::error::Error for NlError {}

pub type Result<T> = std::result::Result<T, NlError>;

fn err(what: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> NlError {
    move |e| NlError {
        what: what.to_string(),
        cause: e.to_string(),
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// Clones share one socket.
#[derive(Clone)]
pub struct Nl {
    pub handle: Handle,
}

pub fn link_mac(msg: &LinkMessage) -> Option<[u8; 6]> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => b.as_slice().try_into().ok(),
        _ => None,
    })
}

pub fn link_name(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// What identifies a route for comparison: destination, prefix length,
/// device, gateway and preferred source.
pub fn route_key(
    r: &RouteMessage,
) -> (
    Option<Ipv4Addr>,
    u8,
    Option<u32>,
    Option<Ipv4Addr>,
    Option<Ipv4Addr>,
) {
    let mut dst = None;
    let mut oif = None;
    let mut gw = None;
    let mut src = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(*ip),
            RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => src = Some(*ip),
            _ => {}
        }
    }
    (dst, r.header.destination_prefix_length, oif, gw, src)
}

/// How an XDP program is attached to the link, as the kernel reports it:
/// `native`, `generic`, `offload`, `multiple`, or `off`.
pub fn link_xdp_mode(msg: &LinkMessage) -> &'static str {
    use rtnetlink::packet_route::link::{LinkXdp, XdpAttached};
    let attached = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(x) => x.iter().find_map(|n| match n {
            LinkXdp::Attached(at) => Some(*at),
            _ => None,
        }),
        _ => None,
    });
    match attached {
        Some(XdpAttached::Driver) => "native",
        Some(XdpAttached::SocketBuffer) => "generic",
        Some(XdpAttached::Hardware) => "offload",
        Some(XdpAttached::Multiple) => "multiple",
        _ => "off",
    }
}

pub fn link_mtu(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

impl Nl {
    /// Opens a socket in the calling thread's network namespace; must run
    /// inside a tokio runtime (the connection task is spawned on it).
    pub fn new() -> Result<Nl> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| NlError {
            what: "opening a netlink socket".into(),
            cause: e.to_string(),
        })?;
        tokio::spawn(conn);
        Ok(Nl { handle })
    }

    pub async fn link(&self, name: &str) -> Result<Option<LinkMessage>> {
        match self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await
        {
            Ok(l) => Ok(l),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(err(format!("looking up {name}"))(e)),
        }
    }

    pub async fn links(&self) -> Result<Vec<LinkMessage>> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(err("listing links"))
    }

    /// A veth pair: `host` here, `peer` created directly inside `peer_netns`.
    pub async fn add_veth(
        &self,
        host: &str,
        peer: &str,
        peer_netns: &File,
        mtu: u32,
    ) -> Result<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_owned())
            .mtu(mtu)
            .setns_by_fd(peer_netns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(host, peer)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(err(format!("creating veth {host}/{peer}")))
    }

    /// A veth pair with both ends in this namespace.
    pub async fn add_veth_local(&self, name: &str, peer: &str) -> Result<()> {
        let msg = LinkVeth::new(name, peer).build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(err(format!("creating veth {name}/{peer}")))
    }

    /// A VXLAN device in external (collect_md) mode: the tunnel key of each
    /// packet, set by a program, picks the remote end.
    pub async fn add_vxlan_external(&self, name: &str, port: u16, mtu: u32) -> Result<()> {
        let msg = LinkVxlan::new(name, 0)
            .collect_metadata(true)
            .port(port)
            .learning(false)
            .mtu(mtu)
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(err(format!("creating vxlan device {name}")))
    }

    /// Up, and with ARP off: the programs set MAC addresses themselves.
    pub async fn set_up_noarp(&self, index: u32) -> Result<()> {
        self.bring_up(index, true).await
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.bring_up(index, false).await
    }

    async fn bring_up(&self, index: u32, noarp: bool) -> Result<()> {
        let mut msg = LinkUnspec::new_with_index(index).up().build();
        if noarp {
            msg.header.flags |= LinkFlags::Noarp;
            msg.header.change_mask |= LinkFlags::Noarp;
        }
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(err(format!("setting link {index} up")))
    }

    pub async fn del_link(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(err(format!("deleting link {index}")))
    }

    pub async fn add_addr(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<()> {
        self.handle
            .address()
            .add(index, ip, prefix)
            .execute()
            .await
            .map_err(err(format!("adding {ip}/{prefix}")))
    }

    pub async fn addrs(&self, index: u32) -> Result<Vec<IpAddr>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(err("listing addresses"))?;
        Ok(msgs
            .iter()
            .flat_map(|m| m.attributes.iter())
            .filter_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
            .collect())
    }

    /// `dst/32 dev <index> scope link`.
    pub async fn add_link_route(&self, index: u32, dst: Ipv4Addr) -> Result<()> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        self.handle
            .route()
            .add(route)
            .execute()
            .await
            .map_err(err(format!("adding route {dst}/32")))
    }

    /// `default via <gw> dev <index>`.
    pub async fn add_default_route(&self, index: u32, gw: Ipv4Addr) -> Result<()> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .build();
        self.handle
            .route()
            .add(route)
            .execute()
            .await
            .map_err(err(format!("adding default route via {gw}")))
    }

    /// A route to a remote node's pod CIDR: through `dev` (VXLAN mode), or via
    /// the node's address (native routing). `src` is the address the node
    /// uses toward pods elsewhere: its own, not whichever the kernel picks.
    pub fn pod_cidr_route(
        dst: Ipv4Addr,
        prefix: u8,
        index: u32,
        via: Option<Ipv4Addr>,
        src: Ipv4Addr,
    ) -> RouteMessage {
        let b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .output_interface(index)
            .pref_source(src)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
        match via {
            Some(gw) => b.gateway(gw),
            None => b.scope(RouteScope::Link),
        }
        .build()
    }

    /// Every IPv4 route the kernel dumps.
    async fn ipv4_routes(&self) -> Result<Vec<RouteMessage>> {
        self.handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(err("listing routes"))
    }

    /// The interface of the IPv4 default route in the main table (one with
    /// a single next hop), if there is one.
    pub async fn default_route_ifindex(&self) -> Result<Option<u32>> {
        let all = self.ipv4_routes().await?;
        // RT_TABLE_MAIN
        const MAIN: u8 = 254;
        Ok(all
            .iter()
            .filter(|r| r.header.destination_prefix_length == 0 && r.header.table == MAIN)
            .find_map(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            }))
    }

    /// The IPv4 routes of the main table tagged [`ROUTE_PROTOCOL`].
    pub async fn own_routes(&self) -> Result<Vec<RouteMessage>> {
        let all = self.ipv4_routes().await?;
        Ok(all
            .into_iter()
            .filter(|r| r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL))
            .collect())
    }

    pub async fn replace_route(&self, route: RouteMessage) -> Result<()> {
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(err("replacing route"))
    }

    /// Deleting a route that is not there is not an error.
    pub async fn del_route(&self, route: RouteMessage) -> Result<()> {
        match self.handle.route().del(route).execute().await {
            Err(e) if is_errno(&e, libc::ESRCH) => Ok(()),
            r => r.map_err(err("deleting route")),
        }
    }

    pub async fn add_permanent_neigh(&self, index: u32, ip: IpAddr, mac: &[u8; 6]) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(err(format!("adding neighbour {ip}")))
    }
}
