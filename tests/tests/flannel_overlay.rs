//! The cluster's network model, proven on real kernels' VXLAN: every pod
//! reaches every pod without NAT, every node reaches every pod without
//! NAT, a joining node is reachable from all within a second, and a node
//! that leaves takes its routes, neighbours and FDB entries with it.
//!
//! Inside a lab namespace this test makes: a bridge, `kiln serve` on it
//! (with the embedded store, or etcd on the lab's loopback), three nodes as
//! namespaces on the bridge each running a real `kiln-agent`, and two pods
//! per node made by the real CNI `bridge`, `host-local` and `portmap`
//! plugins from the conflist the node's agent wrote. Sources are checked
//! with UDP datagrams received inside the pods: the address a receiver
//! sees is the sender's own. Everything is torn down by drop guards, also
//! when an assertion fails.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_tests::etcd::Etcd;
use kiln_tests::overlay::{Api, CNI_PATH, Lab, Node, Pod, ping, seen_source, udp_socket_in};
use kiln_tests::{KilnServer, skip_e2e, tail, wait_for};
use nix::sys::signal::Signal;

/// How long a node may take to come up (agent registered, device, files).
const UP: Duration = Duration::from_secs(30);
/// How the control plane serves its API to the agents.
const API: Api = Api::Tls;
/// The join-to-FDB budget the issue sets.
const CONVERGE: Duration = Duration::from_secs(1);

/// Which store the control plane keeps the registry in.
#[derive(Debug, Clone, Copy)]
enum Store {
    Embedded,
    Etcd,
}

fn preflight() -> bool {
    if skip_e2e() {
        return false;
    }
    for tool in ["bridge", "host-local", "portmap"] {
        assert!(Path::new(CNI_PATH).join(tool).exists(), "{CNI_PATH}/{tool}: containernetworking-plugins is installed by scripts/setup");
    }
    assert!(Command::new("ip").args(["netns", "list"]).status().unwrap().success(), "network namespaces work (root)");
    true
}

/// The node's lease, from the `subnet.env` its agent wrote: (subnet
/// network address, prefix) from `FLANNEL_SUBNET=a.b.c.1/len`.
fn subnet_of(node: &Node) -> Option<(Ipv4Addr, u8)> {
    let text = std::fs::read_to_string(node.run_dir().join("subnet.env")).ok()?;
    let value = text.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))?;
    let (ip, len) = value.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some((Ipv4Addr::from(u32::from(ip) & mask), len))
}

/// Waits for the node's agent to have written both files and brought
/// `flannel.1` up; returns its subnet.
fn wait_up(node: &Node, server: &KilnServer) -> (Ipv4Addr, u8) {
    wait_for(UP, || {
        let subnet = subnet_of(node)?;
        node.cni_conf_dir().join("10-flannel.conflist").exists().then_some(())?;
        let link = node.ns.command("ip").args(["-o", "link", "show", "flannel.1"]).output().ok()?;
        String::from_utf8_lossy(&link.stdout).contains(",UP").then_some(subnet)
    })
    .unwrap_or_else(|| {
        panic!("node {} did not come up within {UP:?}.\nagent:\n{}\nserver:\n{}", node.index, node.log(), tail(&server.log(), 20))
    })
}

/// Whether `node` holds the route, neighbour and FDB entry for a peer with
/// subnet network address `addr` at public IP `public`.
fn has_peer(node: &Node, addr: Ipv4Addr, len: u8, public: Ipv4Addr) -> bool {
    let (routes, neigh, fdb) = node.overlay_tables();
    routes.lines().any(|l| l.starts_with(&format!("{addr}/{len} via {addr} ")) && l.contains("onlink"))
        && neigh.lines().any(|l| l.starts_with(&format!("{addr} lladdr ")) && l.contains("PERMANENT"))
        && fdb.lines().any(|l| l.contains(&format!(" dst {public} ")) && l.contains("self permanent"))
}

/// Whether `node` holds none of the three for that peer.
fn lacks_peer(node: &Node, addr: Ipv4Addr, public: Ipv4Addr) -> bool {
    let (routes, neigh, fdb) = node.overlay_tables();
    !routes.contains(&format!("{addr}/"))
        && !neigh.lines().any(|l| l.starts_with(&format!("{addr} ")))
        && !fdb.contains(&format!(" dst {public} "))
}

/// Asserts that a datagram from `from` to `to` arrives with `from`'s own
/// address as its source.
fn assert_no_nat(what: &str, from_ns: &kiln_tests::Netns, from_ip: Option<Ipv4Addr>, to: &Pod, expect_src: &[Ipv4Addr], port: u16) {
    let bind = SocketAddr::new(IpAddr::V4(from_ip.unwrap_or(Ipv4Addr::UNSPECIFIED)), 0);
    let sender = udp_socket_in(from_ns, bind);
    let target = SocketAddr::new(IpAddr::V4(to.ip), port);
    let receiver = udp_socket_in(&to.ns, target);
    let src = seen_source(&sender, &receiver, target).unwrap_or_else(|| panic!("{what}: no datagram reached {target}"));
    let IpAddr::V4(src) = src.ip() else { panic!("{what}: IPv6 source {src}") };
    assert!(expect_src.contains(&src), "{what}: the receiver saw {src}, not the sender's own address {expect_src:?} (NAT?)");
}

/// `kiln ARGS` in the lab's namespace against `server`'s API, which must
/// succeed: its stdout.
fn kiln_in_lab(lab: &Lab, server: &KilnServer, args: &[&str]) -> String {
    let (ok, out, err) = kiln_in_lab_as_is(lab, server, args);
    assert!(ok, "kiln {args:?}: {err}");
    out
}

/// `kiln ARGS` in the lab's namespace against `server`'s API: (success,
/// stdout, stderr).
fn kiln_in_lab_as_is(lab: &Lab, server: &KilnServer, args: &[&str]) -> (bool, String, String) {
    let out = lab
        .ns
        .command(&kiln_tests::binaries().kiln)
        .args(args)
        .args(["--server", &server.api])
        .arg("--state")
        .arg(&server.state)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `kiln nodes --json` in the lab.
fn lab_nodes(lab: &Lab, server: &KilnServer) -> Vec<kiln_core::Node> {
    serde_json::from_str(&kiln_in_lab(lab, server, &["nodes", "--json"])).expect("kiln nodes --json")
}

#[test]
fn a_copied_machine_id_gets_409_and_the_node_keeps_its_lease() {
    if !preflight() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::new("flod");
    let server = lab.serve(tmp.path(), Api::Tls, &[]);
    let token = kiln_in_lab(&lab, &server, &["token", "create", "--uses", "2", "--description", "two nodes"]);
    let token = token.trim();
    let mut first = lab.node(1, tmp.path());
    first.start_agent(&server, token);
    wait_up(&first, &server);
    let held = lab_nodes(&lab, &server);
    assert_eq!(held.len(), 1, "{held:?}");
    let facts = |n: &kiln_core::Node| (n.name.clone(), n.machine_id.clone(), n.subnet, n.public_ip, n.vtep_mac);

    // Another machine with the same machine id and the same valid token,
    // but its own key: 409, and nothing of the first node changes.
    let mut copy = lab.node(2, tmp.path());
    copy.start_agent_as(&server, Some(token), 1);
    let refused = wait_for(Duration::from_secs(30), || copy.log().contains("409").then_some(()));
    assert!(refused.is_some(), "the copy is refused with 409:\n{}\nserver:\n{}", copy.log(), tail(&server.log(), 20));
    assert!(copy.log().contains(&held[0].name), "the answer names the node that holds the machine id:\n{}", copy.log());
    let after = lab_nodes(&lab, &server);
    assert_eq!(
        after.iter().map(facts).collect::<Vec<_>>(),
        held.iter().map(facts).collect::<Vec<_>>(),
        "name, subnet, public IP and VTEP MAC kept"
    );
    let seen = after[0].last_seen;
    let beat = wait_for(Duration::from_secs(30), || lab_nodes(&lab, &server).first().is_some_and(|n| n.last_seen > seen).then_some(()));
    assert!(beat.is_some(), "the first node keeps heartbeating:\n{}", first.log());
    assert!(!first.log().contains("registering again"), "and never had to register again:\n{}", first.log());
    assert!(first.log().contains("client certificate"), "it proves itself with its certificate:\n{}", first.log());
}

#[test]
fn a_machine_with_no_token_waits_then_gets_its_lease_and_peers_when_approved() {
    if !preflight() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::new("flop");
    let server = lab.serve(tmp.path(), Api::Tls, &[]);
    let token = kiln_in_lab(&lab, &server, &["token", "create", "--uses", "1"]);
    let mut known = lab.node(1, tmp.path());
    known.start_agent(&server, token.trim());
    let (known_net, known_len) = wait_up(&known, &server);

    // No token: pending, with no lease, and no peer of anyone.
    let mut stranger = lab.node(2, tmp.path());
    stranger.start_agent_without_token(&server);
    let pending = wait_for(Duration::from_secs(30), || lab_nodes(&lab, &server).into_iter().find(|n| n.pending));
    let pending = pending.unwrap_or_else(|| panic!("the stranger is pending:\n{}", stranger.log()));
    assert_eq!((pending.subnet, pending.public_ip, pending.vtep_mac), (None, None, None), "{pending:?}");
    std::thread::sleep(Duration::from_secs(6));
    assert!(subnet_of(&stranger).is_none(), "no lease while pending:\n{}", stranger.log());
    let stranger_ip = Ipv4Addr::new(10, 78, 0, 12);
    let (_, _, fdb) = known.overlay_tables();
    assert!(!fdb.contains(&format!(" dst {stranger_ip} ")), "no VXLAN peer for it:\n{fdb}");

    // Approved, it gets its lease without a restart, and each node peers the other.
    let out = kiln_in_lab(&lab, &server, &["nodes", "approve", &pending.name]);
    assert!(out.contains("approved"), "{out}");
    let (net, len) = wait_up(&stranger, &server);
    assert_ne!((net, len), (known_net, known_len), "a subnet of its own");
    let peered = wait_for(UP, || {
        (has_peer(&known, net, len, stranger_ip) && has_peer(&stranger, known_net, known_len, Ipv4Addr::new(10, 78, 0, 11))).then_some(())
    });
    assert!(peered.is_some(), "each node holds the other as a peer:\n{}\n{}", known.log(), stranger.log());
    let joined = lab_nodes(&lab, &server).into_iter().find(|n| n.name == pending.name).unwrap();
    assert!(!joined.pending && joined.public_ip == Some(IpAddr::V4(stranger_ip)), "{joined:?}");
}

fn overlay_network_model(store: Store) {
    if !preflight() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::new(match store {
        Store::Embedded => "flo",
        Store::Etcd => "floe",
    });
    // The one line that chooses the store.
    let etcd = matches!(store, Store::Etcd).then(|| Etcd::start_in(Some(&lab.ns)));
    let store_args: Vec<&str> = etcd.as_ref().map(|e| vec!["--etcd", e.url.as_str()]).unwrap_or_default();
    let server = lab.serve(tmp.path(), API, &store_args);
    // The operator makes the nodes' join token (from inside the lab: the server listens there).
    let token = lab.ns.run(|| server.join_token(None));
    let token = token.as_str();

    // Three nodes, each with its agent.
    let mut nodes: Vec<Node> = (1..=3).map(|i| lab.node(i, tmp.path())).collect();
    for node in &mut nodes {
        node.start_agent(&server, token);
    }
    let subnets: Vec<(Ipv4Addr, u8)> = nodes.iter().map(|n| wait_up(n, &server)).collect();
    let distinct: std::collections::BTreeSet<_> = subnets.iter().collect();
    assert_eq!(distinct.len(), 3, "three distinct subnets: {subnets:?}");
    for (n, node) in nodes.iter().enumerate() {
        let log = std::fs::read_to_string(node.agent_log()).unwrap_or_default();
        assert!(
            log.contains(&format!("registered with {} ", server.node_api)),
            "node {} registered through {}:\n{log}",
            n + 1,
            server.node_api
        );
        let env = std::fs::read_to_string(node.run_dir().join("subnet.env")).unwrap();
        assert!(
            env.contains("FLANNEL_NETWORK=10.244.0.0/16\n") && env.contains("FLANNEL_MTU=1450\n") && env.contains("FLANNEL_IPMASQ=false\n"),
            "node {}: {env}",
            n + 1
        );
        let link = node.sh(&["ip", "-d", "link", "show", "flannel.1"]);
        let want = format!("vxlan id 1 local {} dev eth0", node.address);
        assert!(
            link.contains(&want) && link.contains("dstport 8472") && link.contains("nolearning") && link.contains("mtu 1450"),
            "node {}: flannel.1 is {want}, dstport 8472, nolearning, mtu 1450:\n{link}",
            n + 1
        );
    }
    // With etcd, the leases are in flannel's own schema.
    let lease_key = |(addr, len): (Ipv4Addr, u8)| format!("/coreos.com/network/subnets/{addr}-{len}");
    if let Some(etcd) = &etcd {
        let keys = etcd.keys("/coreos.com/network/subnets/");
        for s in &subnets {
            assert!(keys.contains(&lease_key(*s)), "etcd holds {}: {keys:?}", lease_key(*s));
        }
    }
    // Each node holds every other node's entries, and none of its own.
    for (n, node) in nodes.iter().enumerate() {
        for (m, other) in nodes.iter().enumerate().filter(|(m, _)| *m != n) {
            let (addr, len) = subnets[m];
            let ok = wait_for(Duration::from_secs(10), || has_peer(node, addr, len, other.address).then_some(()));
            assert!(
                ok.is_some(),
                "node {} has node {}'s route, neighbour and FDB entry:\n{:?}\nagent:\n{}",
                n + 1,
                m + 1,
                node.overlay_tables(),
                node.log()
            );
        }
        assert!(lacks_peer(node, subnets[n].0, node.address), "node {} has no entries for itself: {:?}", n + 1, node.overlay_tables());
    }

    // Two pods per node, from the conflist each agent wrote.
    let mut pods: Vec<Pod> = Vec::new();
    for node in &nodes {
        for name in ["a", "b"] {
            let pod = node.add_pod(name);
            let (addr, len) = subnets[usize::from(node.index) - 1];
            let mask = u32::MAX << (32 - len);
            assert_eq!(
                u32::from(pod.ip) & mask,
                u32::from(addr),
                "pod {} on node {} has an address from its node's subnet",
                pod.ip,
                node.index
            );
            pods.push(pod);
        }
    }

    // Every pod pings every pod on the other nodes.
    for p in &pods {
        for q in pods.iter().filter(|q| q.node != p.node) {
            assert!(p.pings(q.ip), "pod {} (node {}) pings pod {} (node {})", p.ip, p.node, q.ip, q.node);
        }
    }
    // ... and the receiver sees the sender pod's own address.
    let mut port = 40000;
    for p in &pods {
        for q in pods.iter().filter(|q| q.node != p.node) {
            port += 1;
            assert_no_nat(&format!("pod {} → pod {}", p.ip, q.ip), &p.ns, Some(p.ip), q, &[p.ip], port);
        }
    }
    // Every node reaches every pod, and is seen with one of its own addresses.
    for node in &nodes {
        let (addr, _) = subnets[usize::from(node.index) - 1];
        let own = [addr, Ipv4Addr::from(u32::from(addr) + 1), node.address];
        for q in &pods {
            assert!(ping(&node.ns, q.ip), "node {} pings pod {} (node {})", node.index, q.ip, q.node);
            port += 1;
            assert_no_nat(&format!("node {} → pod {}", node.index, q.ip), &node.ns, None, q, &own, port);
        }
    }

    // A fourth node joins: every other node holds its entries within a second
    // of its registration.
    let mut fourth = lab.node(4, tmp.path());
    fourth.start_agent(&server, token);
    let mut registered_at: Option<Instant> = None;
    let mut converged_at: Option<Instant> = None;
    let deadline = Instant::now() + UP;
    while Instant::now() < deadline && converged_at.is_none() {
        if registered_at.is_none() && std::fs::read_to_string(fourth.agent_log()).unwrap_or_default().contains("registered with") {
            registered_at = Some(Instant::now());
        }
        if let Some((addr, len)) = subnet_of(&fourth)
            && nodes.iter().all(|n| has_peer(n, addr, len, fourth.address))
        {
            converged_at = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (Some(t0), Some(t1)) = (registered_at, converged_at) else {
        panic!("node 4 did not join: registered {registered_at:?}, converged {converged_at:?}\nagent:\n{}", fourth.log())
    };
    let took = t1.saturating_duration_since(t0);
    eprintln!("{store:?}: node 4 registered; every other node held its route, neighbour and FDB entry {} ms later", took.as_millis());
    assert!(took <= CONVERGE, "join to the last peer's FDB entry took {took:?} > {CONVERGE:?}");
    let fourth_subnet = wait_up(&fourth, &server);
    let pod4 = fourth.add_pod("a");
    for p in &pods {
        assert!(p.pings(pod4.ip), "pod {} (node {}) pings the new node's pod {}", p.ip, p.node, pod4.ip);
        assert!(pod4.pings(p.ip), "the new node's pod {} pings pod {} (node {})", pod4.ip, p.ip, p.node);
    }
    port += 1;
    assert_no_nat("pod on node 4 → pod on node 1", &pod4.ns, Some(pod4.ip), &pods[0], &[pod4.ip], port);
    for node in &nodes {
        assert!(ping(&node.ns, pod4.ip), "node {} pings the new node's pod {}", node.index, pod4.ip);
    }

    // Node 2 leaves (SIGTERM): it exits 0, removes its device and files, and
    // the others drop its entries.
    let leaver = &mut nodes[1];
    let status = leaver.agent.as_mut().expect("agent running").signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "the agent exits 0 on SIGTERM: {status:?}\n{}", leaver.log());
    assert!(leaver.log().contains("left the cluster"), "the agent left the cluster:\n{}", leaver.log());
    let (routes, _, _) = leaver.overlay_tables();
    assert!(routes.is_empty() && !leaver.sh(&["ip", "link"]).contains("flannel.1"), "the leaver removed flannel.1:\n{routes}");
    assert!(!leaver.run_dir().join("subnet.env").exists(), "the leaver removed subnet.env");
    assert!(!leaver.cni_conf_dir().join("10-flannel.conflist").exists(), "the leaver removed its conflist");
    let (gone_addr, _) = subnets[1];
    let gone_ip = nodes[1].address;
    for node in nodes.iter().filter(|n| n.index != 2).chain([&fourth]) {
        let ok = wait_for(Duration::from_secs(5), || lacks_peer(node, gone_addr, gone_ip).then_some(()));
        assert!(ok.is_some(), "node {} dropped node 2's route, neighbour and FDB entry: {:?}", node.index, node.overlay_tables());
        // The rest of the overlay is untouched.
        for (m, other) in nodes.iter().enumerate().filter(|(_, o)| o.index != 2 && o.index != node.index) {
            assert!(has_peer(node, subnets[m].0, subnets[m].1, other.address), "node {} keeps node {}'s entries", node.index, other.index);
        }
        if node.index != 4 {
            assert!(has_peer(node, fourth_subnet.0, fourth_subnet.1, fourth.address), "node {} keeps node 4's entries", node.index);
        }
    }
    assert!(pods[0].pings(pods[4].ip), "pods on nodes 1 and 3 still reach each other");
    if let Some(etcd) = &etcd {
        let keys = etcd.keys("/coreos.com/network/subnets/");
        assert!(!keys.contains(&lease_key(subnets[1])), "node 2's lease is gone from etcd: {keys:?}");
        assert_eq!(keys.len(), 3, "nodes 1, 3 and 4 keep theirs: {keys:?}");
    }
    eprintln!(
        "{store:?}: {} pods on 4 nodes, {} pod-to-pod pings, {} datagrams with their senders' own addresses, node 2 left cleanly",
        pods.len() + 1,
        pods.len() * 4 + pods.len() * 2,
        port - 40000
    );
    drop(pod4);
    drop(pods);
    drop(fourth);
    drop(nodes);
    drop(server);
    drop(etcd);
}

#[test]
fn pods_talk_across_nodes_without_nat_embedded_store() {
    overlay_network_model(Store::Embedded);
}

#[test]
fn pods_talk_across_nodes_without_nat_etcd_store() {
    overlay_network_model(Store::Etcd);
}

/// `kiln check ARGS` in the lab, as the operator runs it: (success, stdout, stderr).
fn kiln_check(lab: &Lab, server: &KilnServer, args: &[&str]) -> (bool, String, String) {
    kiln_in_lab_as_is(lab, server, &[&["check"][..], args].concat())
}

/// The paths of a check that are not `verdict`, as (from, to, kind).
fn paths_not(result: &kiln_core::CheckResult, verdict: kiln_core::Verdict) -> Vec<(String, String, kiln_core::PathKind)> {
    result.paths.iter().filter(|p| p.verdict != verdict).map(|p| (p.from.clone(), p.to.clone(), p.kind)).collect()
}

/// `kiln check` on three nodes of the lab, each a real agent making its
/// test pod with its own conflist and the real CNI plugins: every path
/// (pod → pod, pod → node) is ok and the receivers saw the senders' pod
/// addresses; the pods are gone afterwards (no address reservation is
/// left). Then the check must fail where the network is broken: VXLAN
/// dropped into node 3 fails every path to its pod, and a MASQUERADE on
/// node 1 shows as NAT, with the address seen.
#[test]
fn kiln_check_proves_the_network_model_and_finds_what_breaks_it() {
    use kiln_core::{PathKind, Verdict};
    if !preflight() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::new("flc");
    let server = lab.serve(tmp.path(), API, &[]);
    let token = lab.ns.run(|| server.join_token(None));
    let mut nodes: Vec<Node> = (1..=3).map(|i| lab.node(i, tmp.path())).collect();
    for node in &mut nodes {
        node.start_agent(&server, &token);
    }
    for node in &nodes {
        wait_up(node, &server);
    }
    let listed = lab_nodes(&lab, &server);
    // Node i's name and subnet, by its address.
    let of = |node: &Node| listed.iter().find(|n| n.public_ip == Some(IpAddr::V4(node.address))).expect("listed").clone();
    let names: Vec<String> = nodes.iter().map(|n| of(n).name).collect();

    let started = Instant::now();
    let (ok, out, err) = kiln_check(&lab, &server, &["--json"]);
    let result: kiln_core::CheckResult = serde_json::from_str(&out).unwrap_or_else(|e| panic!("kiln check --json: {e}: {out}{err}"));
    eprintln!("kiln check: 3 nodes, {} paths in {} ms", result.paths.len(), started.elapsed().as_millis());
    let logs = || nodes.iter().map(|n| tail(&n.log(), 10)).collect::<Vec<_>>().join("\n---\n");
    assert!(ok && result.ok && result.done, "kiln check passes: {out}\n{err}\nagents:\n{}", logs());
    assert_eq!(result.paths.len(), 12, "3 nodes × 2 others × (pod, node)");
    assert!(paths_not(&result, Verdict::Ok).is_empty(), "{:?}", result.paths);
    for t in &result.nodes {
        let pod = t.pod_ip.expect("every node made its pod");
        let subnet = listed.iter().find(|n| n.name == t.node).and_then(|n| n.subnet).expect("a lease");
        let mask = u32::MAX << (32 - subnet.prefix);
        assert_eq!(u32::from(pod) & mask, u32::from(subnet.addr), "{}'s test pod {pod} is in its subnet {subnet}", t.node);
        for p in result.paths.iter().filter(|p| p.from == t.node) {
            assert_eq!(p.seen, Some(IpAddr::V4(pod)), "the receiver saw the sender pod's own address: {p:?}");
        }
    }
    // The pods are removed: host-local keeps no address for them.
    let leftover = || {
        nodes
            .iter()
            .flat_map(|n| walk(&n.dir.join("cni-ipam")))
            .filter(|f| std::fs::read_to_string(f).is_ok_and(|t| t.contains("kiln-check")))
            .count()
    };
    assert!(wait_for(Duration::from_secs(10), || (leftover() == 0).then_some(())).is_some(), "the test pods' addresses are released");
    let (ok, table, _) = kiln_check(&lab, &server, &[]);
    assert!(ok && table.contains("all 12 paths ok, no NAT") && table.contains("ok / ok"), "{table}");

    // Break it: VXLAN into node 3 dropped; node 1 masquerades what its pods send off the pod network.
    nodes[2].sh(&["iptables", "-A", "INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP"]);
    nodes[0].sh(&["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.0/16", "!", "-d", "10.244.0.0/16", "-j", "MASQUERADE"]);
    let (ok, out, err) = kiln_check(&lab, &server, &["--json"]);
    let result: kiln_core::CheckResult = serde_json::from_str(&out).unwrap_or_else(|e| panic!("kiln check --json: {e}: {out}{err}"));
    assert!(!ok && !result.ok, "a broken network fails the check: {out}");
    let mut failed: Vec<_> =
        result.paths.iter().filter(|p| p.verdict == Verdict::Failed).map(|p| (p.from.clone(), p.to.clone(), p.kind)).collect();
    let mut want_failed = vec![(names[0].clone(), names[2].clone(), PathKind::Pod), (names[1].clone(), names[2].clone(), PathKind::Pod)];
    // The server lists paths by node name; the nodes' names need not sort as their numbers do.
    failed.sort();
    want_failed.sort();
    assert_eq!(failed, want_failed, "every path into node 3's pod fails, nothing else: {:?}", result.paths);
    let nat: Vec<_> = result.paths.iter().filter(|p| p.verdict == Verdict::Nat).collect();
    assert_eq!(nat.len(), 2, "node 1's pod → nodes 2 and 3 is masqueraded: {:?}", result.paths);
    for p in nat {
        assert_eq!((p.from.as_str(), p.kind, p.seen), (names[0].as_str(), PathKind::Node, Some(IpAddr::V4(nodes[0].address))), "{p:?}");
    }
    let (ok, table, _) = kiln_check(&lab, &server, &[]);
    assert!(!ok && table.contains("failed") && table.contains(&format!("NAT({})", nodes[0].address)), "the table shows it:\n{table}");
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() { out.extend(walk(&path)) } else { out.push(path) }
    }
    out
}
