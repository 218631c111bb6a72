//! The VXLAN device and its static FDB and neighbour entries through rtnetlink (what
//! `ip link add ... type vxlan`, `bridge fdb` and `ip neigh` do), no multicast, no learning.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use futures::future::BoxFuture;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::{Handle, LinkVxlan};

use crate::error::{NetError, Result};
use crate::kernel::{FdbEntry, Mac, NeighEntry, Vxlan, VxlanDevice, VxlanSpec};

use super::netlink::{ENODEV, errno};

const ENOENT: i32 = 2;

/// [`Vxlan`] on a netlink socket of the namespace the process runs in.
#[derive(Clone, Debug)]
pub struct NetlinkVxlan {
    handle: Handle,
}

impl NetlinkVxlan {
    /// On the socket of `handle`.
    pub fn new(handle: Handle) -> NetlinkVxlan {
        NetlinkVxlan { handle }
    }

    async fn link(&self, name: &str) -> Result<Option<LinkMessage>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(l) => Ok(l),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(NetError::netlink(format!("find link {name}"), e)),
        }
    }

    async fn index(&self, name: &str, op: &str) -> Result<u32> {
        self.link(name)
            .await?
            .map(|l| l.header.index)
            .ok_or_else(|| NetError::netlink(op, format!("no link {name}")))
    }

    async fn entries(&self, index: u32) -> Result<(Vec<FdbEntry>, Vec<NeighEntry>)> {
        let mut fdb = Vec::new();
        let mut bridge = self.handle.neighbours().get();
        bridge.message_mut().header.family = AddressFamily::Bridge;
        // only this device's entries (the kernel filters a bridge-family dump on
        // ndm_ifindex): a dump of every bridge port's entries is long, and multi-part
        // fdb dumps have been seen to skip entries at message boundaries
        bridge.message_mut().header.ifindex = index;
        let mut dump = bridge.execute();
        while let Some(m) = dump
            .try_next()
            .await
            .map_err(|e| NetError::netlink("list fdb entries", e))?
        {
            if m.header.ifindex != index {
                continue;
            }
            if let (Some(mac), Some(dst)) = (lladdr(&m), destination(&m)) {
                fdb.push(FdbEntry { mac, dst });
            }
        }
        let mut neighbours = Vec::new();
        let mut dump = self.handle.neighbours().get().execute();
        while let Some(m) = dump
            .try_next()
            .await
            .map_err(|e| NetError::netlink("list neighbours", e))?
        {
            if m.header.ifindex != index
                || m.header.family != AddressFamily::Inet
                || m.header.state != NeighbourState::Permanent
            {
                continue;
            }
            if let (Some(mac), Some(ip)) = (lladdr(&m), destination(&m)) {
                neighbours.push(NeighEntry { ip, mac });
            }
        }
        fdb.sort();
        neighbours.sort();
        Ok((fdb, neighbours))
    }

    fn bridge_message(index: u32, entry: FdbEntry) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.header.flags = NeighbourFlags::Own;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(entry.mac.0.to_vec()));
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                entry.dst,
            )));
        m
    }

    fn neigh_message(index: u32, entry: NeighEntry) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                entry.ip,
            )));
        m
    }
}

fn lladdr(m: &NeighbourMessage) -> Option<Mac> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => <[u8; 6]>::try_from(b.as_slice()).ok().map(Mac),
        _ => None,
    })
}

fn destination(m: &NeighbourMessage) -> Option<Ipv4Addr> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // in bridge-family (fdb) messages the address is not decoded by family
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })
}

/// The VXLAN settings of a link message; `None` when it is not a VXLAN device.
fn spec_of(l: &LinkMessage) -> Option<VxlanSpec> {
    let mut vxlan = None;
    let mut mac = Mac([0; 6]);
    let mut mtu = 0;
    for a in &l.attributes {
        match a {
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Data(InfoData::Vxlan(v)) = i {
                        vxlan = Some(v.clone());
                    }
                }
            }
            LinkAttribute::Address(b) => {
                if let Ok(m) = <[u8; 6]>::try_from(b.as_slice()) {
                    mac = Mac(m);
                }
            }
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    let info = vxlan?;
    let mut spec = VxlanSpec {
        vni: 0,
        port: 0,
        local: None,
        mac,
        mtu,
    };
    for i in info {
        match i {
            InfoVxlan::Id(v) => spec.vni = v,
            InfoVxlan::Port(p) => spec.port = p,
            InfoVxlan::Local(ip) => spec.local = Some(ip),
            _ => {}
        }
    }
    Some(spec)
}

impl Vxlan for NetlinkVxlan {
    fn show(&self, name: &str) -> BoxFuture<'_, Result<Option<VxlanDevice>>> {
        let name = name.to_string();
        Box::pin(async move {
            let Some(l) = self.link(&name).await? else {
                return Ok(None);
            };
            let spec = spec_of(&l).ok_or_else(|| {
                NetError::netlink(
                    format!("inspect {name}"),
                    "a link of that name exists and is not a VXLAN device (not geomx's: rename or remove it)",
                )
            })?;
            let up = l.header.flags.contains(LinkFlags::Up);
            let (fdb, neighbours) = self.entries(l.header.index).await?;
            Ok(Some(VxlanDevice {
                spec,
                up,
                fdb,
                neighbours,
            }))
        })
    }

    fn create(&self, name: &str, spec: &VxlanSpec) -> BoxFuture<'_, Result<()>> {
        let name = name.to_string();
        let spec = spec.clone();
        Box::pin(async move {
            let what = format!("create VXLAN device {name} (vni {})", spec.vni);
            let mut b = LinkVxlan::new(&name, spec.vni)
                .port(spec.port)
                .learning(false)
                .mtu(spec.mtu)
                .address(spec.mac.0.to_vec())
                .up();
            if let Some(local) = spec.local {
                b = b.local(local);
            }
            self.handle
                .link()
                .add(b.build())
                .execute()
                .await
                .map_err(|e| NetError::netlink(&what, e))?;
            // the kind must be VXLAN: a device made by someone else is not taken over
            match self.link(&name).await? {
                Some(l) if spec_of(&l).is_some() => Ok(()),
                _ => Err(NetError::netlink(
                    what,
                    "the device is not there after creation",
                )),
            }
        })
    }

    fn delete(&self, name: &str) -> BoxFuture<'_, Result<()>> {
        let name = name.to_string();
        Box::pin(async move {
            let Some(l) = self.link(&name).await? else {
                return Ok(());
            };
            if spec_of(&l).is_none() {
                return Err(NetError::netlink(
                    format!("delete {name}"),
                    "it is not a VXLAN device: not geomx's, left alone",
                ));
            }
            match self.handle.link().del(l.header.index).execute().await {
                Ok(()) => Ok(()),
                Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
                Err(e) => Err(NetError::netlink(format!("delete {name}"), e)),
            }
        })
    }

    fn fdb_set(&self, name: &str, entry: FdbEntry) -> BoxFuture<'_, Result<()>> {
        let name = name.to_string();
        Box::pin(async move {
            let what = format!(
                "bridge fdb replace {} dev {name} dst {}",
                entry.mac, entry.dst
            );
            let index = self.index(&name, &what).await?;
            let mut req = self.handle.neighbours().add_bridge(index, &entry.mac.0);
            *req.message_mut() = Self::bridge_message(index, entry);
            req.replace()
                .execute()
                .await
                .map_err(|e| NetError::netlink(what, e))
        })
    }

    fn fdb_delete(&self, name: &str, entry: FdbEntry) -> BoxFuture<'_, Result<()>> {
        let name = name.to_string();
        Box::pin(async move {
            let what = format!("bridge fdb del {} dev {name} dst {}", entry.mac, entry.dst);
            let index = self.index(&name, &what).await?;
            match self
                .handle
                .neighbours()
                .del(Self::bridge_message(index, entry))
                .execute()
                .await
            {
                Ok(()) => Ok(()),
                Err(e) if errno(&e) == Some(ENOENT) => Ok(()),
                Err(e) => Err(NetError::netlink(what, e)),
            }
        })
    }

    fn neigh_set(&self, name: &str, entry: NeighEntry) -> BoxFuture<'_, Result<()>> {
        let name = name.to_string();
        Box::pin(async move {
            let what = format!(
                "ip neigh replace {} lladdr {} dev {name}",
                entry.ip, entry.mac
            );
            let index = self.index(&name, &what).await?;
            self.handle
                .neighbours()
                .add(index, std::net::IpAddr::V4(entry.ip))
                .link_layer_address(&entry.mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(|e| NetError::netlink(what, e))
        })
    }

    fn neigh_delete(&self, name: &str, entry: NeighEntry) -> BoxFuture<'_, Result<()>> {
        let name = name.to_string();
        Box::pin(async move {
            let what = format!("ip neigh del {} dev {name}", entry.ip);
            let index = self.index(&name, &what).await?;
            match self
                .handle
                .neighbours()
                .del(Self::neigh_message(index, entry))
                .execute()
                .await
            {
                Ok(()) => Ok(()),
                Err(e) if errno(&e) == Some(ENOENT) => Ok(()),
                Err(e) => Err(NetError::netlink(what, e)),
            }
        })
    }
}
