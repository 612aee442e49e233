//! Links, addresses and routes over rtnetlink.
//!
//! Each function takes the [`Handle`] of a connection; the connection's
//! socket decides the namespace the request acts in (see
//! [`crate::netns::run_in_async`]). Errors name the object.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::error::HostError;

/// Opens a netlink connection in the calling thread's namespace and drives
/// it on the current runtime.
pub(crate) fn connect() -> Result<Handle, HostError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| HostError::io("opening a netlink socket", e))?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Whether a netlink error carries `errno`.
pub(crate) fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.map(|c| c.get()) == Some(-errno))
}

/// What leftover cleaning and tests need to know about a link.
#[derive(Clone, Debug)]
pub(crate) struct LinkSummary {
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) alias: Option<String>,
    pub(crate) kind: Option<InfoKind>,
}

fn summarize(msg: &LinkMessage) -> LinkSummary {
    let mut s = LinkSummary {
        index: msg.header.index,
        name: String::new(),
        alias: None,
        kind: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => s.name = n.clone(),
            LinkAttribute::IfAlias(a) => s.alias = Some(a.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        s.kind = Some(k.clone());
                    }
                }
            }
            _ => {}
        }
    }
    s
}

/// Every link of the namespace.
pub(crate) async fn list(handle: &Handle) -> Result<Vec<LinkSummary>, HostError> {
    let mut links = handle.link().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = links
        .try_next()
        .await
        .map_err(|e| HostError::netlink("listing links", e))?
    {
        out.push(summarize(&msg));
    }
    Ok(out)
}

/// The link called `name`, if any.
pub(crate) async fn get(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, HostError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(msg) => Ok(msg),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(HostError::netlink(format!("looking up link {name}"), e)),
    }
}

/// The index of the link called `name`.
pub(crate) async fn index(handle: &Handle, name: &str) -> Result<u32, HostError> {
    match get(handle, name).await? {
        Some(msg) => Ok(msg.header.index),
        None => Err(HostError::NotFound {
            op: format!("link {name}"),
        }),
    }
}

/// Creates the veth pair `host_name` (here) <-> `peer_name` (born directly
/// in the namespace open at `peer_netns`), and labels the host end with
/// `alias`.
pub(crate) async fn add_veth(
    handle: &Handle,
    host_name: &str,
    peer_name: &str,
    peer_netns: RawFd,
    alias: &str,
) -> Result<u32, HostError> {
    let peer = LinkUnspec::new_with_name(peer_name)
        .setns_by_fd(peer_netns)
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_name.to_owned())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    handle
        .link()
        .add(msg)
        .execute()
        .await
        .map_err(|e| HostError::netlink(format!("creating veth {host_name} <-> {peer_name}"), e))?;
    let index = index(handle, host_name).await?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).alias(alias).build())
        .execute()
        .await
        .map_err(|e| HostError::netlink(format!("labelling {host_name}"), e))?;
    Ok(index)
}

/// Sets a link's hardware address.
pub(crate) async fn set_address(
    handle: &Handle,
    index: u32,
    name: &str,
    mac: [u8; 6],
) -> Result<(), HostError> {
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .address(mac.to_vec())
                .build(),
        )
        .execute()
        .await
        .map_err(|e| HostError::netlink(format!("setting the address of {name}"), e))
}

/// Sets a link up.
pub(crate) async fn up(handle: &Handle, index: u32, name: &str) -> Result<(), HostError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| HostError::netlink(format!("setting {name} up"), e))
}

/// Adds `addr/prefix` to a link.
pub(crate) async fn add_address(
    handle: &Handle,
    index: u32,
    name: &str,
    addr: Ipv4Addr,
    prefix: u8,
) -> Result<(), HostError> {
    handle
        .address()
        .add(index, IpAddr::V4(addr), prefix)
        .execute()
        .await
        .map_err(|e| HostError::netlink(format!("adding {addr}/{prefix} to {name}"), e))
}

/// Adds the default route via `gateway`.
pub(crate) async fn add_default_route(handle: &Handle, gateway: Ipv4Addr) -> Result<(), HostError> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(gateway)
        .build();
    handle
        .route()
        .add(route)
        .execute()
        .await
        .map_err(|e| HostError::netlink(format!("adding the default route via {gateway}"), e))
}

/// Deletes the link called `name`; absent is not an error. Returns whether
/// it existed.
pub(crate) async fn delete(handle: &Handle, name: &str) -> Result<bool, HostError> {
    let Some(msg) = get(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(msg.header.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(false),
        Err(e) => Err(HostError::netlink(format!("deleting link {name}"), e)),
    }
}

/// Every IPv4 address of the namespace.
pub(crate) async fn ipv4_addresses(handle: &Handle) -> Result<Vec<Ipv4Addr>, HostError> {
    let mut addrs = handle.address().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = addrs
        .try_next()
        .await
        .map_err(|e| HostError::netlink("listing addresses", e))?
    {
        for attr in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(a))
            | AddressAttribute::Local(IpAddr::V4(a)) = attr
            {
                out.push(*a);
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Every IPv4 address of the namespace with its prefix, by link index.
pub(crate) async fn ipv4_addresses_by_link(
    handle: &Handle,
) -> Result<Vec<(u32, Ipv4Addr, u8)>, HostError> {
    let mut addrs = handle.address().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = addrs
        .try_next()
        .await
        .map_err(|e| HostError::netlink("listing addresses", e))?
    {
        for attr in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(a)) = attr {
                out.push((msg.header.index, *a, msg.header.prefix_len));
            }
        }
    }
    Ok(out)
}

/// Byte and packet counters of a link, as the link itself counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LinkStats {
    pub(crate) rx_bytes: u64,
    pub(crate) tx_bytes: u64,
    pub(crate) rx_packets: u64,
    pub(crate) tx_packets: u64,
    pub(crate) rx_dropped: u64,
    pub(crate) tx_dropped: u64,
}

/// The counters of the link called `name`.
pub(crate) async fn stats(handle: &Handle, name: &str) -> Result<LinkStats, HostError> {
    let Some(msg) = get(handle, name).await? else {
        return Err(HostError::NotFound {
            op: format!("link {name}"),
        });
    };
    for attr in &msg.attributes {
        if let LinkAttribute::Stats64(s) = attr {
            return Ok(LinkStats {
                rx_bytes: s.rx_bytes,
                tx_bytes: s.tx_bytes,
                rx_packets: s.rx_packets,
                tx_packets: s.tx_packets,
                rx_dropped: s.rx_dropped,
                tx_dropped: s.tx_dropped,
            });
        }
    }
    Err(HostError::NotFound {
        op: format!("counters of link {name}"),
    })
}
