//! What the VXLAN device should hold for a set of peers, and the smallest
//! change that gets it there from what it holds now.
//!
//! For every other node holding a lease, flannel's vxlan backend installs
//! three things on `flannel.<VNI>`:
//!
//! - the route `SUBNET via SUBNET_ADDR dev flannel.N onlink` (the peer's
//!   VTEP address is its subnet's network address, as a /32 on its device);
//! - the permanent neighbour `SUBNET_ADDR lladdr VTEP_MAC`, so the kernel
//!   never ARPs across the overlay;
//! - the FDB entry `VTEP_MAC dst PUBLIC_IP self permanent`, which tells the
//!   VXLAN driver where to send frames for that MAC.
//!
//! [`desired`] computes that set from the peers list; [`plan`] diffs it with
//! what [`super::netlink`] read back from the kernel. Applying a plan twice
//! changes nothing the second time: nothing is flushed and re-added.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use kiln_core::{Ipv4Cidr, Mac, Peer, Peers};

/// An onlink route to a peer's subnet through its VTEP address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    /// The peer's pod subnet.
    pub dst: Ipv4Cidr,
    /// The peer's VTEP address (its subnet's network address).
    pub gateway: Ipv4Addr,
}

/// The overlay entries on one VXLAN device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries {
    /// Routes to other nodes' subnets.
    pub routes: BTreeSet<Route>,
    /// Permanent neighbours: VTEP address → VTEP MAC.
    pub neighbours: BTreeMap<Ipv4Addr, Mac>,
    /// FDB entries: VTEP MAC and the public address frames for it go to.
    pub fdb: BTreeSet<(Mac, Ipv4Addr)>,
}

/// This node, as far as peers are concerned: left out of its own entries.
#[derive(Debug, Clone)]
pub struct Own {
    /// The node's name.
    pub name: String,
    /// Its subnet.
    pub subnet: Ipv4Cidr,
    /// The pod network every peer subnet must lie in.
    pub network: Ipv4Cidr,
}

/// Why a peer was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The peer's name.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// The entries that route to every peer but this node. Peers that cannot be
/// reached over an IPv4 VXLAN overlay, or whose subnet is outside the pod
/// network, are returned as skipped (and left out).
pub fn desired(own: &Own, peers: &[Peer]) -> (Entries, Vec<Skipped>) {
    let mut out = Entries::default();
    let mut skipped = Vec::new();
    for p in peers {
        if p.name == own.name || p.subnet == own.subnet {
            continue;
        }
        let IpAddr::V4(public) = p.public_ip else {
            skipped.push(Skipped { name: p.name.clone(), reason: format!("public IP {} is not IPv4", p.public_ip) });
            continue;
        };
        if !own.network.contains(&p.subnet) {
            skipped
                .push(Skipped { name: p.name.clone(), reason: format!("subnet {} is outside the pod network {}", p.subnet, own.network) });
            continue;
        }
        let gateway = p.subnet.addr;
        out.routes.insert(Route { dst: p.subnet, gateway });
        out.neighbours.insert(gateway, p.vtep_mac);
        out.fdb.insert((p.vtep_mac, public));
    }
    (out, skipped)
}

/// The peers the agent holds, by subnet: the last whole list the watch
/// sent, with every change since applied.
#[derive(Debug, Default)]
pub struct Held {
    peers: BTreeMap<Ipv4Cidr, Peer>,
}

/// What one answer of the peers watch changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// A whole list: `after` is every peer, and the kernel's entries are
    /// what it replaces.
    pub whole: bool,
    /// For a delta: the peers held before at the subnets it touched.
    pub before: Vec<Peer>,
    /// The peers held now at those subnets (every peer for a whole list).
    pub after: Vec<Peer>,
}

impl Held {
    /// Applies an answer of the peers watch ([`Peers`]): a whole list
    /// replaces what is held, a delta puts and removes its subnets.
    pub fn apply(&mut self, answer: Peers) -> Change {
        if !answer.delta {
            self.peers = answer.peers.into_iter().map(|p| (p.subnet, p)).collect();
            return Change { whole: true, before: Vec::new(), after: self.peers.values().cloned().collect() };
        }
        let mut change = Change::default();
        for subnet in &answer.left {
            change.before.extend(self.peers.remove(subnet));
        }
        for peer in answer.peers {
            change.before.extend(self.peers.insert(peer.subnet, peer.clone()));
            change.after.push(peer);
        }
        change
    }
}

/// The changes that turn one set of entries into another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Neighbours to add or replace (the MAC changed).
    pub set_neighbours: Vec<(Ipv4Addr, Mac)>,
    /// FDB entries to add.
    pub add_fdb: Vec<(Mac, Ipv4Addr)>,
    /// Routes to add.
    pub add_routes: Vec<Route>,
    /// Routes to remove.
    pub del_routes: Vec<Route>,
    /// Neighbours to remove.
    pub del_neighbours: Vec<(Ipv4Addr, Mac)>,
    /// FDB entries to remove.
    pub del_fdb: Vec<(Mac, Ipv4Addr)>,
}

impl Plan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

/// The diff from `installed` to `want`. Additions come in the order
/// flannel makes them (neighbour, FDB, then the route that makes traffic
/// use them), removals in the reverse order.
pub fn plan(installed: &Entries, want: &Entries) -> Plan {
    Plan {
        set_neighbours: want
            .neighbours
            .iter()
            .filter(|(ip, mac)| installed.neighbours.get(ip) != Some(mac))
            .map(|(i, m)| (*i, *m))
            .collect(),
        add_fdb: want.fdb.difference(&installed.fdb).copied().collect(),
        add_routes: want.routes.difference(&installed.routes).copied().collect(),
        del_routes: installed.routes.difference(&want.routes).copied().collect(),
        del_neighbours: installed.neighbours.iter().filter(|(ip, _)| !want.neighbours.contains_key(ip)).map(|(i, m)| (*i, *m)).collect(),
        del_fdb: installed.fdb.difference(&want.fdb).copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, subnet: &str, ip: &str, mac: &str) -> Peer {
        Peer { name: name.into(), subnet: subnet.parse().unwrap(), public_ip: ip.parse().unwrap(), vtep_mac: mac.parse().unwrap() }
    }

    fn own() -> Own {
        Own { name: "a".into(), subnet: "10.244.1.0/24".parse().unwrap(), network: "10.244.0.0/16".parse().unwrap() }
    }

    fn peers() -> Vec<Peer> {
        vec![
            peer("a", "10.244.1.0/24", "192.0.2.1", "02:00:00:00:00:01"),
            peer("b", "10.244.2.0/24", "192.0.2.2", "02:00:00:00:00:02"),
            peer("c", "10.244.3.0/24", "192.0.2.3", "02:00:00:00:00:03"),
        ]
    }

    #[test]
    fn desired_leaves_out_self_and_unusable_peers() {
        let mut list = peers();
        list.push(peer("v6", "10.244.4.0/24", "2001:db8::4", "02:00:00:00:00:04"));
        list.push(peer("far", "10.99.5.0/24", "192.0.2.5", "02:00:00:00:00:05"));
        let (e, skipped) = desired(&own(), &list);
        let routes: Vec<String> = e.routes.iter().map(|r| format!("{} via {}", r.dst, r.gateway)).collect();
        assert_eq!(routes, ["10.244.2.0/24 via 10.244.2.0", "10.244.3.0/24 via 10.244.3.0"]);
        assert_eq!(e.neighbours.len(), 2);
        assert_eq!(e.neighbours[&"10.244.3.0".parse().unwrap()].to_string(), "02:00:00:00:00:03");
        assert!(e.fdb.contains(&("02:00:00:00:00:02".parse().unwrap(), "192.0.2.2".parse().unwrap())));
        let names: Vec<&str> = skipped.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["v6", "far"]);
    }

    /// A delta's plan, made from the peers it replaced, is the plan the
    /// whole list would give against entries in step with the old list.
    #[test]
    fn a_delta_plans_what_the_whole_list_would() {
        let whole = |peers: Vec<Peer>| Peers { revision: 1, epoch: 7, delta: false, peers, left: vec![], check: None };
        let mut held = Held::default();
        let first = held.apply(whole(peers()));
        assert!(first.whole && first.after.len() == 3, "{first:?}");
        // c moves to another host, b leaves, d joins: one answer.
        let moved = peer("c", "10.244.3.0/24", "192.0.2.33", "02:00:00:00:00:33");
        let joined = peer("d", "10.244.4.0/24", "192.0.2.4", "02:00:00:00:00:04");
        let b = peers()[1].subnet;
        let delta = Peers { revision: 2, epoch: 7, delta: true, peers: vec![moved.clone(), joined.clone()], left: vec![b], check: None };
        let change = held.apply(delta);
        assert!(!change.whole);
        assert_eq!(change.before, vec![peers()[1].clone(), peers()[2].clone()], "b and the old c");
        assert_eq!(change.after, vec![moved.clone(), joined.clone()]);
        let from_delta = plan(&desired(&own(), &change.before).0, &desired(&own(), &change.after).0);
        let now = vec![peers()[0].clone(), moved, joined];
        let from_whole = plan(&desired(&own(), &peers()).0, &desired(&own(), &now).0);
        assert_eq!(from_delta, from_whole);
        assert_eq!(held.apply(whole(now.clone())).after, now, "what is held is the new list");
        // A subnet that left and was never held changes nothing.
        let stray = Peers { revision: 3, epoch: 7, delta: true, peers: vec![], left: vec!["10.244.9.0/24".parse().unwrap()], check: None };
        assert_eq!(held.apply(stray), Change::default());
    }

    #[test]
    fn plan_cases() {
        let (all, _) = desired(&own(), &peers());
        let (only_b, _) = desired(&own(), &peers()[..2]);
        let mut moved = peers();
        moved[2].public_ip = "192.0.2.33".parse().unwrap();
        moved[2].vtep_mac = "02:00:00:00:00:33".parse().unwrap();
        let (c_moved, _) = desired(&own(), &moved);

        struct Case {
            name: &'static str,
            installed: Entries,
            want: Entries,
            check: fn(&Plan),
        }
        let cases = [
            Case {
                name: "nothing installed: add all",
                installed: Entries::default(),
                want: all.clone(),
                check: |p| {
                    assert_eq!((p.set_neighbours.len(), p.add_fdb.len(), p.add_routes.len()), (2, 2, 2));
                    assert!(p.del_routes.is_empty() && p.del_neighbours.is_empty() && p.del_fdb.is_empty());
                },
            },
            Case { name: "in sync: nothing", installed: all.clone(), want: all.clone(), check: |p| assert!(p.is_empty()) },
            Case {
                name: "a peer left: remove only its entries",
                installed: all.clone(),
                want: only_b.clone(),
                check: |p| {
                    assert!(p.set_neighbours.is_empty() && p.add_fdb.is_empty() && p.add_routes.is_empty());
                    assert_eq!(p.del_routes.iter().map(|r| r.dst.to_string()).collect::<Vec<_>>(), ["10.244.3.0/24"]);
                    assert_eq!(p.del_neighbours.len(), 1);
                    assert_eq!(p.del_fdb, vec![("02:00:00:00:00:03".parse().unwrap(), "192.0.2.3".parse().unwrap())]);
                },
            },
            Case {
                name: "a peer joined: add only its entries",
                installed: only_b.clone(),
                want: all.clone(),
                check: |p| {
                    assert_eq!(p.add_routes.iter().map(|r| r.dst.to_string()).collect::<Vec<_>>(), ["10.244.3.0/24"]);
                    assert_eq!(p.set_neighbours.len(), 1);
                    assert_eq!(p.add_fdb.len(), 1);
                    assert!(p.del_routes.is_empty() && p.del_neighbours.is_empty() && p.del_fdb.is_empty());
                },
            },
            Case {
                name: "a peer came back with a new VTEP: replace neighbour, swap FDB, keep route",
                installed: all.clone(),
                want: c_moved,
                check: |p| {
                    assert!(p.add_routes.is_empty() && p.del_routes.is_empty(), "the route is unchanged");
                    assert_eq!(p.set_neighbours, vec![("10.244.3.0".parse().unwrap(), "02:00:00:00:00:33".parse().unwrap())]);
                    assert!(p.del_neighbours.is_empty(), "replaced, not removed");
                    assert_eq!(p.add_fdb, vec![("02:00:00:00:00:33".parse().unwrap(), "192.0.2.33".parse().unwrap())]);
                    assert_eq!(p.del_fdb, vec![("02:00:00:00:00:03".parse().unwrap(), "192.0.2.3".parse().unwrap())]);
                },
            },
            Case {
                name: "everyone left: remove all",
                installed: all.clone(),
                want: Entries::default(),
                check: |p| {
                    assert_eq!((p.del_routes.len(), p.del_neighbours.len(), p.del_fdb.len()), (2, 2, 2));
                },
            },
        ];
        for case in cases {
            let p = plan(&case.installed, &case.want);
            eprintln!("case: {}", case.name);
            (case.check)(&p);
        }
    }
}
