//! The rtnetlink operations the plugin needs, each batch run inside a chosen
//! network namespace. A netlink socket belongs to the namespace it was
//! created in, so every batch runs on its own thread that enters the
//! namespace first, with its own socket and a small runtime.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd as _,
    path::Path,
};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{InfoData, InfoVeth, LinkAttribute, LinkMessage},
        neighbour::NeighbourState,
        route::RouteScope,
    },
};

use crate::error::{CniError, Result, code};

pub struct Nl {
    pub handle: Handle,
}

fn nl_err(what: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> CniError {
    move |e| CniError::new(code::NETLINK, what.to_string()).details(e)
}

/// Runs `f` with a netlink handle inside `netns` (a path such as
/// `/var/run/netns/x` or `/proc/<pid>/ns/net`), or in the current one.
pub fn with_netns<T: Send>(
    netns: Option<&Path>,
    f: impl AsyncFnOnce(Nl) -> Result<T> + Send,
) -> Result<T> {
    let file = match netns {
        Some(p) => Some(File::open(p).map_err(|e| {
            CniError::new(
                code::INVALID_ENV,
                format!("network namespace {} cannot be opened", p.display()),
            )
            .details(e)
        })?),
        None => None,
    };
    std::thread::scope(|s| {
        s.spawn(move || {
            if let Some(file) = &file {
                // SAFETY: setns on an fd we own; affects this thread only.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(CniError::new(code::IO, "entering the network namespace")
                        .details(std::io::Error::last_os_error()));
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(|e| CniError::new(code::IO, "starting a runtime").details(e))?;
            rt.block_on(async move {
                let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| {
                    CniError::new(code::NETLINK, "opening a netlink socket").details(e)
                })?;
                tokio::spawn(conn);
                f(Nl { handle }).await
            })
        })
        .join()
        .unwrap_or_else(|_| Err(CniError::new(code::IO, "netlink worker panicked")))
    })
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

impl Nl {
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
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl_err(format!("looking up {name}"))(e)),
        }
    }

    pub async fn links(&self) -> Result<Vec<LinkMessage>> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("listing links"))
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
            .map_err(nl_err(format!("creating veth {host}/{peer}")))
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nl_err(format!("setting link {index} up")))
    }

    pub async fn del_link(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl_err(format!("deleting link {index}")))
    }

    pub async fn add_addr(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<()> {
        self.handle
            .address()
            .add(index, ip, prefix)
            .execute()
            .await
            .map_err(nl_err(format!("adding {ip}/{prefix}")))
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
            .map_err(nl_err("listing addresses"))?;
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
            .map_err(nl_err(format!("adding route {dst}/32")))
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
            .map_err(nl_err(format!("adding default route via {gw}")))
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
            .map_err(nl_err(format!("adding neighbour {ip}")))
    }
}
