//! The netlink side of the flannel overlay against a real kernel, inside a
//! network namespace this test makes (root only; skipped otherwise): the
//! VXLAN device as flannel makes it, its address, and peer entries added,
//! read back, left alone when in sync, and removed when a peer leaves.

use std::process::Command;

use kiln_agent::flannel::netlink::{Rtnl, VXLAN_PORT, VtepSpec};
use kiln_agent::flannel::reconcile::{self, Own};
use kiln_core::{Mac, Peer};

/// A namespace deleted when dropped.
struct Netns(String);

impl Netns {
    fn new() -> Option<Netns> {
        let name = format!("kiln-flnl-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(std::process::Stdio::null()).status();
        let ok = Command::new("ip").args(["netns", "add", &name]).status().is_ok_and(|s| s.success());
        ok.then_some(Netns(name))
    }

    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip").args(["-n", &self.0]).args(args).output().expect("ip runs");
        assert!(out.status.success(), "ip -n {} {args:?}: {}", self.0, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fdb(&self) -> String {
        let out = Command::new("bridge").args(["-n", &self.0, "fdb", "show", "dev", "flannel.1"]).output().expect("bridge runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn peer(name: &str, subnet: &str, ip: &str, mac: &str) -> Peer {
    Peer { name: name.into(), subnet: subnet.parse().unwrap(), public_ip: ip.parse().unwrap(), vtep_mac: mac.parse().unwrap() }
}

#[test]
fn vxlan_device_and_peer_entries_in_a_namespace() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: skipping the netlink test");
        return;
    }
    let Some(ns) = Netns::new() else {
        eprintln!("ip netns add failed: skipping the netlink test");
        return;
    };
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&["link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1"]);
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "uplink0"]);
    ns.ip(&["link", "set", "uplink0", "up"]);
    ns.ip(&["link", "set", "uplink1", "up"]);

    // The netlink socket lives in the namespace of the thread that opens it.
    let path = format!("/run/netns/{}", ns.0);
    let result = std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("the namespace file");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(body(&ns));
        drop(ns);
    })
    .join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

async fn body(ns: &Netns) {
    let rtnl = Rtnl::connect().unwrap();
    let (uplink, mtu) = rtnl.index_and_mtu("uplink0").await.unwrap();
    assert_eq!(mtu, 1500);
    let mac: Mac = "02:6b:69:6c:6e:01".parse().unwrap();
    let spec = VtepSpec { name: "flannel.1".into(), vni: 1, mac, local: "192.0.2.1".parse().unwrap(), uplink, mtu: mtu - 50 };
    let index = rtnl.ensure_vtep(&spec).await.unwrap();
    rtnl.ensure_address(index, "flannel.1", "10.244.1.0".parse().unwrap()).await.unwrap();

    let link = ns.ip(&["-d", "link", "show", "flannel.1"]);
    for want in [
        "mtu 1450".to_string(),
        "state UNKNOWN".to_string(),
        format!("link/ether {mac}"),
        "vxlan id 1 local 192.0.2.1 dev uplink0".to_string(),
        format!("dstport {VXLAN_PORT}"),
        "nolearning".to_string(),
    ] {
        assert!(link.contains(&want), "flannel.1 has {want:?}:\n{link}");
    }
    let addr = ns.ip(&["-4", "addr", "show", "dev", "flannel.1"]);
    assert!(addr.contains("inet 10.244.1.0/32"), "flannel.1 has the subnet's network address as a /32:\n{addr}");

    // Again: the same device, the same single address.
    assert_eq!(rtnl.ensure_vtep(&spec).await.unwrap(), index, "an existing compatible device is kept");
    rtnl.ensure_address(index, "flannel.1", "10.244.1.0".parse().unwrap()).await.unwrap();
    assert_eq!(ns.ip(&["-4", "-o", "addr", "show", "dev", "flannel.1"]).lines().count(), 1);

    let own = Own { name: "a".into(), subnet: "10.244.1.0/24".parse().unwrap(), network: "10.244.0.0/16".parse().unwrap() };
    let all = vec![
        peer("a", "10.244.1.0/24", "192.0.2.1", "02:6b:69:6c:6e:01"),
        peer("b", "10.244.2.0/24", "192.0.2.2", "02:6b:69:6c:6e:02"),
        peer("c", "10.244.3.0/24", "192.0.2.3", "02:6b:69:6c:6e:03"),
    ];
    let network = own.network;
    let (want, _) = reconcile::desired(&own, &all);
    let plan = reconcile::plan(&rtnl.entries(index, &network).await.unwrap(), &want);
    rtnl.apply(index, "flannel.1", &plan).await.unwrap();
    assert_eq!(rtnl.entries(index, &network).await.unwrap(), want, "what was applied reads back");
    assert!(reconcile::plan(&rtnl.entries(index, &network).await.unwrap(), &want).is_empty(), "in sync: nothing to do");

    let routes = ns.ip(&["route", "show", "dev", "flannel.1"]);
    let neigh = ns.ip(&["neigh", "show", "dev", "flannel.1"]);
    let fdb = ns.fdb();
    for (p, subnet, public) in [("02:6b:69:6c:6e:02", "10.244.2", "192.0.2.2"), ("02:6b:69:6c:6e:03", "10.244.3", "192.0.2.3")] {
        let route = routes.lines().find(|l| l.starts_with(&format!("{subnet}.0/24 via {subnet}.0 "))).unwrap_or_default();
        assert!(route.ends_with("onlink "), "onlink route to {subnet}.0/24:\n{routes}");
        assert!(neigh.contains(&format!("{subnet}.0 lladdr {p} PERMANENT")), "neighbour {subnet}.0:\n{neigh}");
        assert!(fdb.contains(&format!("{p} dst {public} self permanent")), "FDB entry for {p}:\n{fdb}");
    }
    assert!(!routes.contains("10.244.1.0/24"), "no route to itself:\n{routes}");

    // c leaves: only its entries go.
    let (want_b, _) = reconcile::desired(&own, &all[..2]);
    let plan = reconcile::plan(&rtnl.entries(index, &network).await.unwrap(), &want_b);
    assert_eq!((plan.del_routes.len(), plan.del_neighbours.len(), plan.del_fdb.len()), (1, 1, 1), "{plan:?}");
    assert!(plan.add_routes.is_empty() && plan.set_neighbours.is_empty() && plan.add_fdb.is_empty(), "{plan:?}");
    rtnl.apply(index, "flannel.1", &plan).await.unwrap();
    assert_eq!(rtnl.entries(index, &network).await.unwrap(), want_b);
    let routes = ns.ip(&["route", "show", "dev", "flannel.1"]);
    let neigh = ns.ip(&["neigh", "show", "dev", "flannel.1"]);
    let fdb = ns.fdb();
    assert!(
        !routes.contains("10.244.3.0") && !neigh.contains("10.244.3.0") && !fdb.contains("6e:03"),
        "c is gone:\n{routes}\n{neigh}\n{fdb}"
    );
    assert!(
        routes.contains("10.244.2.0/24") && neigh.contains("10.244.2.0") && fdb.contains("6e:02"),
        "b stays:\n{routes}\n{neigh}\n{fdb}"
    );

    // Removing what is already gone is no error.
    rtnl.apply(index, "flannel.1", &plan).await.unwrap();

    // Another VNI on the same name is another device: recreated.
    let moved = VtepSpec { vni: 2, ..spec.clone() };
    let new_index = rtnl.ensure_vtep(&moved).await.unwrap();
    assert!(ns.ip(&["-d", "link", "show", "flannel.1"]).contains("vxlan id 2 "), "recreated with VNI 2");
    assert_ne!(new_index, index);

    assert!(rtnl.delete_link("flannel.1").await.unwrap());
    assert!(!rtnl.delete_link("flannel.1").await.unwrap(), "deleting twice is fine");
    assert!(rtnl.link("flannel.1").await.unwrap().is_none());
}
