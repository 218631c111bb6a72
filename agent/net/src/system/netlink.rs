//! Routes and addresses through rtnetlink.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use futures::future::BoxFuture;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::ROUTE_PROTOCOL;
use crate::error::{NetError, Result};
use crate::kernel::{KernelRoute, PeerRoute, RouteKind, Routes};

const MAIN_TABLE: u32 = 254;
pub(super) const ENODEV: i32 = 19;
const ENETUNREACH: i32 = 101;
const EHOSTUNREACH: i32 = 113;

/// [`Routes`] on a netlink socket of the namespace the process runs in.
#[derive(Clone, Debug)]
pub struct NetlinkRoutes {
    handle: Handle,
}

impl NetlinkRoutes {
    /// Opens a netlink socket and drives it on the current Tokio runtime. The socket
    /// belongs to the calling thread's network namespace for good.
    pub fn connect() -> Result<NetlinkRoutes> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| NetError::netlink("open a socket", e))?;
        tokio::spawn(conn);
        Ok(NetlinkRoutes { handle })
    }

    /// The netlink handle (shared with [`super::NetlinkVxlan`]).
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    async fn link_names(&self) -> Result<BTreeMap<u32, String>> {
        let mut names = BTreeMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(l) = links
            .try_next()
            .await
            .map_err(|e| NetError::netlink("list links", e))?
        {
            for a in &l.attributes {
                if let LinkAttribute::IfName(n) = a {
                    names.insert(l.header.index, n.clone());
                }
            }
        }
        Ok(names)
    }
}

/// The errno of a netlink error answer, if it is one.
pub(super) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn to_kernel_route(m: &RouteMessage, names: &BTreeMap<u32, String>) -> Option<KernelRoute> {
    if m.header.address_family != AddressFamily::Inet {
        return None;
    }
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut metric = 0;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let destination = Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?;
    Some(KernelRoute {
        destination,
        gateway,
        device: oif.and_then(|i| names.get(&i).cloned()),
        protocol: u8::from(m.header.protocol),
        metric,
        kind: match m.header.kind {
            RouteType::Unicast => RouteKind::Unicast,
            RouteType::Local => RouteKind::Local,
            _ => RouteKind::Other,
        },
    })
}

fn geomx_message(destination: Ipv4Net, gateway: Option<Ipv4Addr>) -> RouteMessage {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(destination.network(), destination.prefix_len())
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
        .table_id(MAIN_TABLE);
    if let Some(gw) = gateway {
        b = b.gateway(gw);
    }
    b.build()
}

impl Routes for NetlinkRoutes {
    fn main_table(&self) -> BoxFuture<'_, Result<Vec<KernelRoute>>> {
        Box::pin(async move {
            let names = self.link_names().await?;
            let mut out = Vec::new();
            let mut dump = self
                .handle
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute();
            while let Some(m) = dump
                .try_next()
                .await
                .map_err(|e| NetError::netlink("list routes", e))?
            {
                if table_of(&m) != MAIN_TABLE {
                    continue;
                }
                if let Some(r) = to_kernel_route(&m, &names) {
                    out.push(r);
                }
            }
            Ok(out)
        })
    }

    fn replace(&self, route: PeerRoute) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let what = format!("replace route {} {}", route.destination, route.via());
            let mut m = geomx_message(route.destination, route.gateway);
            if let Some(dev) = &route.device {
                let names = self.link_names().await?;
                let index = names
                    .iter()
                    .find(|(_, n)| *n == dev)
                    .map(|(i, _)| *i)
                    .ok_or_else(|| NetError::netlink(&what, format!("no link {dev}")))?;
                m.attributes.push(RouteAttribute::Oif(index));
                if route.onlink {
                    m.header.flags |= rtnetlink::packet_route::route::RouteFlags::Onlink;
                }
                if route.gateway.is_none() {
                    m.header.scope = rtnetlink::packet_route::route::RouteScope::Link;
                }
            }
            if let Some(src) = route.source {
                m.attributes
                    .push(RouteAttribute::PrefSource(RouteAddress::Inet(src)));
            }
            self.handle
                .route()
                .add(m)
                .replace()
                .execute()
                .await
                .map_err(|e| NetError::netlink(what, e))
        })
    }

    fn delete(&self, route: KernelRoute) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut m = geomx_message(route.destination, route.gateway);
            m.header.protocol = RouteProtocol::from(route.protocol);
            // like `ip route del`: any scope (a device route has scope link)
            m.header.scope = rtnetlink::packet_route::route::RouteScope::NoWhere;
            if route.metric != 0 {
                m.attributes.push(RouteAttribute::Priority(route.metric));
            }
            self.handle
                .route()
                .del(m)
                .execute()
                .await
                .map_err(|e| NetError::netlink(format!("delete route {route}"), e))
        })
    }

    fn lookup(&self, ip: Ipv4Addr) -> BoxFuture<'_, Result<Option<KernelRoute>>> {
        Box::pin(async move {
            let names = self.link_names().await?;
            let msg = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(ip, 32)
                .build();
            let mut answer = self.handle.route().get(msg).execute();
            match answer.try_next().await {
                Ok(Some(m)) => Ok(to_kernel_route(&m, &names)),
                Ok(None) => Ok(None),
                Err(e) if matches!(errno(&e), Some(ENETUNREACH | EHOSTUNREACH)) => Ok(None),
                Err(e) => Err(NetError::netlink(format!("look up the route to {ip}"), e)),
            }
        })
    }

    fn link_addresses(&self, name: String) -> BoxFuture<'_, Result<Option<Vec<Ipv4Net>>>> {
        Box::pin(async move {
            let mut links = self.handle.link().get().match_name(name.clone()).execute();
            let index = match links.try_next().await {
                Ok(Some(l)) => l.header.index,
                Ok(None) => return Ok(None),
                Err(e) if errno(&e) == Some(ENODEV) => return Ok(None),
                Err(e) => return Err(NetError::netlink(format!("find link {name}"), e)),
            };
            let mut out = Vec::new();
            let mut addrs = self
                .handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute();
            while let Some(a) = addrs
                .try_next()
                .await
                .map_err(|e| NetError::netlink(format!("list the addresses of {name}"), e))?
            {
                let ip = a
                    .attributes
                    .iter()
                    .find_map(|x| match x {
                        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                        _ => None,
                    })
                    .or_else(|| {
                        a.attributes.iter().find_map(|x| match x {
                            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                            _ => None,
                        })
                    });
                if let Some(ip) = ip
                    && let Ok(net) = Ipv4Net::new(ip, a.header.prefix_len)
                {
                    out.push(net);
                }
            }
            Ok(Some(out))
        })
    }
}
