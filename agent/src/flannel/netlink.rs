//! The kernel side of the overlay, through rtnetlink: the `flannel.<VNI>`
//! VXLAN device, its address, and the routes, neighbours and FDB entries
//! [`super::reconcile`] plans.
//!
//! Everything here acts on the network namespace the agent runs in. Each
//! call says what it did in its error (device, address, entry), with the
//! kernel's errno as the cause.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use kiln_core::{Ipv4Cidr, Mac};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage};
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};

use super::Error;
use super::reconcile::{Entries, Plan, Route};

/// flannel's VXLAN UDP port (the Linux kernel's historical default, not
/// IANA's 4789).
pub const VXLAN_PORT: u16 = 8472;

const ENODEV: i32 = 19;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;

/// The VXLAN device as flannel's vxlan backend makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VtepSpec {
    /// `flannel.<VNI>`.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// The device's MAC: what the node registered as `vtep_mac`.
    pub mac: Mac,
    /// Source address of encapsulated packets: the node's public IP.
    pub local: Ipv4Addr,
    /// Interface index of the uplink that carries them.
    pub uplink: u32,
    /// Device MTU: the uplink's minus 50.
    pub mtu: u32,
}

impl VtepSpec {
    /// `flannel.<vni>`.
    pub fn device_name(vni: u32) -> String {
        format!("flannel.{vni}")
    }
}

/// A netlink connection in the agent's network namespace.
#[derive(Clone)]
pub struct Rtnl {
    handle: rtnetlink::Handle,
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |source| Error::Netlink { what, source }
}

/// The kernel's errno in a netlink error, positive.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

impl Rtnl {
    /// Opens a connection; its I/O task runs on the current tokio runtime.
    pub fn connect() -> Result<Rtnl, Error> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| Error::Io { path: "rtnetlink socket".into(), source })?;
        tokio::spawn(conn);
        Ok(Rtnl { handle })
    }

    /// The link called `name`, if there is one.
    pub async fn link(&self, name: &str) -> Result<Option<LinkMessage>, Error> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(nl(format!("looking up link {name}"))(e)),
        }
    }

    /// The interface index and MTU of `name`.
    pub async fn index_and_mtu(&self, name: &str) -> Result<(u32, u32), Error> {
        let link = self.link(name).await?.ok_or_else(|| Error::Uplink(format!("no interface {name}")))?;
        let mtu = link.attributes.iter().find_map(|a| if let LinkAttribute::Mtu(m) = a { Some(*m) } else { None }).unwrap_or(1500);
        Ok((link.header.index, mtu))
    }

    /// Makes the device look like `spec` and brings it up: created when
    /// missing; recreated when it is no VXLAN device or its VNI, local
    /// address, port, uplink or learning differ (as flanneld does); MAC and
    /// MTU set in place. Returns its interface index.
    pub async fn ensure_vtep(&self, spec: &VtepSpec) -> Result<u32, Error> {
        if let Some(link) = self.link(&spec.name).await? {
            if compatible(&link, spec) {
                let index = link.header.index;
                let msg = LinkUnspec::new_with_index(index).address(spec.mac.0.to_vec()).mtu(spec.mtu).up().build();
                self.handle
                    .link()
                    .set(msg)
                    .execute()
                    .await
                    .map_err(nl(format!("setting {} (MAC {}, MTU {}) up", spec.name, spec.mac, spec.mtu)))?;
                return Ok(index);
            }
            log::warn!("flannel: {} exists with other settings; recreating it", spec.name);
            self.delete_link(&spec.name).await?;
        }
        let msg = LinkVxlan::new(&spec.name, spec.vni)
            .dev(spec.uplink)
            .port(VXLAN_PORT)
            .local(spec.local)
            .learning(false)
            .mtu(spec.mtu)
            .address(spec.mac.0.to_vec())
            .up()
            .build();
        self.handle.link().add(msg).execute().await.map_err(nl(format!(
            "creating {} (vxlan id {} local {} dstport {VXLAN_PORT} nolearning, uplink index {})",
            spec.name, spec.vni, spec.local, spec.uplink
        )))?;
        let link =
            self.link(&spec.name).await?.ok_or_else(|| Error::Uplink(format!("{} vanished right after it was created", spec.name)))?;
        Ok(link.header.index)
    }

    /// Deletes the link `name` (with every address, route and neighbour on
    /// it). Returns whether there was one.
    pub async fn delete_link(&self, name: &str) -> Result<bool, Error> {
        let Some(link) = self.link(name).await? else { return Ok(false) };
        match self.handle.link().del(link.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(false),
            Err(e) => Err(nl(format!("deleting {name}"))(e)),
        }
    }

    /// Leaves `addr/32` as the device's only IPv4 address (flannel puts the
    /// subnet's network address there).
    pub async fn ensure_address(&self, index: u32, device: &str, addr: Ipv4Addr) -> Result<(), Error> {
        let current: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl(format!("listing addresses of {device}")))?;
        let mut present = false;
        for msg in current.into_iter().filter(|m| m.header.index == index && m.header.family == AddressFamily::Inet) {
            let a = msg.attributes.iter().find_map(|a| if let AddressAttribute::Address(IpAddr::V4(a)) = a { Some(*a) } else { None });
            if a == Some(addr) && msg.header.prefix_len == 32 {
                present = true;
                continue;
            }
            let shown = a.map_or_else(|| "?".into(), |a| format!("{a}/{}", msg.header.prefix_len));
            self.handle.address().del(msg).execute().await.map_err(nl(format!("removing stale address {shown} from {device}")))?;
        }
        if !present {
            self.handle.address().add(index, IpAddr::V4(addr), 32).execute().await.map_err(nl(format!("adding {addr}/32 to {device}")))?;
        }
        Ok(())
    }

    /// The overlay entries now on the device `index`: main-table IPv4
    /// routes through it into `network`, its permanent IPv4 neighbours, and
    /// its FDB entries that have a destination.
    pub async fn entries(&self, index: u32, network: &Ipv4Cidr) -> Result<Entries, Error> {
        let mut out = Entries::default();
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing IPv4 routes"))?;
        for r in routes {
            if let Some(route) = overlay_route(&r, index).filter(|rt| network.contains(&rt.dst)) {
                out.routes.insert(route);
            }
        }
        let neighbours: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing IPv4 neighbours"))?;
        for n in neighbours.iter().filter(|n| n.header.ifindex == index && n.header.state == NeighbourState::Permanent) {
            if let (Some(ip), Some(mac)) = (destination(n), lladdr(n)) {
                out.neighbours.insert(ip, mac);
            }
        }
        let fdb: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing FDB entries"))?;
        for n in fdb.iter().filter(|n| n.header.ifindex == index) {
            if let (Some(ip), Some(mac)) = (destination(n), lladdr(n)) {
                out.fdb.insert((mac, ip));
            }
        }
        Ok(out)
    }

    /// Carries out `plan` on the device `index`. Removing what is already
    /// gone is not an error; every other failure is, after the rest of the
    /// plan was tried (the next reconcile retries what failed).
    pub async fn apply(&self, index: u32, device: &str, plan: &Plan) -> Result<(), Error> {
        let mut first: Option<Error> = None;
        let mut keep = |r: Result<(), Error>| {
            if let Err(e) = r {
                log::warn!("flannel: {}", crate::register::chain(&e));
                first.get_or_insert(e);
            }
        };
        for (ip, mac) in &plan.set_neighbours {
            let r = self
                .handle
                .neighbours()
                .add(index, IpAddr::V4(*ip))
                .link_layer_address(&mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("neighbour {ip} lladdr {mac} dev {device}")));
            keep(r);
        }
        for (mac, ip) in &plan.add_fdb {
            let r = self
                .handle
                .neighbours()
                .add_bridge(index, &mac.0)
                .destination(IpAddr::V4(*ip))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl(format!("fdb {mac} dev {device} dst {ip} self permanent")));
            keep(r);
        }
        for route in &plan.add_routes {
            let r = self
                .handle
                .route()
                .add(route_message(index, route))
                .replace()
                .execute()
                .await
                .map_err(nl(format!("route {} via {} dev {device} onlink", route.dst, route.gateway)));
            keep(r);
        }
        for route in &plan.del_routes {
            let r = self.handle.route().del(route_message(index, route)).execute().await;
            keep(gone_ok(r).map_err(nl(format!("removing route {} via {} dev {device}", route.dst, route.gateway))));
        }
        for (ip, mac) in &plan.del_neighbours {
            let r = self.handle.neighbours().del(neighbour_message(AddressFamily::Inet, index, *ip, *mac)).execute().await;
            keep(gone_ok(r).map_err(nl(format!("removing neighbour {ip} lladdr {mac} dev {device}"))));
        }
        for (mac, ip) in &plan.del_fdb {
            let mut msg = neighbour_message(AddressFamily::Bridge, index, *ip, *mac);
            msg.header.flags = NeighbourFlags::Own;
            let r = self.handle.neighbours().del(msg).execute().await;
            keep(gone_ok(r).map_err(nl(format!("removing fdb {mac} dst {ip} dev {device}"))));
        }
        first.map_or(Ok(()), Err)
    }
}

fn gone_ok(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(e) if matches!(errno(&e), Some(ENOENT | ESRCH | ENODEV)) => Ok(()),
        other => other,
    }
}

fn route_message(index: u32, route: &Route) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.dst.addr, route.dst.prefix)
        .gateway(route.gateway)
        .output_interface(index)
        .onlink()
        .build()
}

fn neighbour_message(family: AddressFamily, index: u32, ip: Ipv4Addr, mac: Mac) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    msg
}

/// A neighbour's IPv4 destination. In FDB (`AF_BRIDGE`) messages the
/// parser cannot tell the address family and leaves the 4 bytes raw.
fn destination(n: &NeighbourMessage) -> Option<Ipv4Addr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from),
        _ => None,
    })
}

fn lladdr(n: &NeighbourMessage) -> Option<Mac> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => <[u8; 6]>::try_from(b.as_slice()).ok().map(Mac),
        _ => None,
    })
}

/// A main-table IPv4 route through `index` with a gateway, as a [`Route`].
fn overlay_route(r: &RouteMessage, index: u32) -> Option<Route> {
    if r.header.address_family != AddressFamily::Inet {
        return None;
    }
    let mut table = u32::from(r.header.table);
    let (mut dst, mut gw, mut oif) = (None, None, None);
    for a in &r.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
            RouteAttribute::Oif(o) => oif = Some(*o),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || oif != Some(index) || !r.header.flags.contains(RouteFlags::Onlink) {
        return None;
    }
    let dst = Ipv4Cidr::new(dst?, r.header.destination_prefix_length)?;
    Some(Route { dst, gateway: gw? })
}

/// Whether an existing link can be kept for `spec` (MAC and MTU aside).
fn compatible(link: &LinkMessage, spec: &VtepSpec) -> bool {
    let infos: Vec<&LinkInfo> =
        link.attributes.iter().filter_map(|a| if let LinkAttribute::LinkInfo(i) = a { Some(i) } else { None }).flatten().collect();
    if !infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan))) {
        return false;
    }
    let Some(data) = infos.iter().find_map(|i| if let LinkInfo::Data(InfoData::Vxlan(d)) = i { Some(d) } else { None }) else {
        return false;
    };
    let (mut vni, mut local, mut port, mut uplink, mut learning) = (None, None, None, None, None);
    for d in data {
        match d {
            InfoVxlan::Id(v) => vni = Some(*v),
            InfoVxlan::Local(l) => local = Some(*l),
            InfoVxlan::Port(p) => port = Some(*p),
            InfoVxlan::Link(l) => uplink = Some(*l),
            InfoVxlan::Learning(l) => learning = Some(*l),
            _ => {}
        }
    }
    vni == Some(spec.vni) && local == Some(spec.local) && port == Some(VXLAN_PORT) && uplink == Some(spec.uplink) && learning != Some(true)
}
