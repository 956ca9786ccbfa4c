//! The control plane under faults, against the real `kiln serve` binary over
//! TLS: 200 nodes registering at once while the server is killed with
//! SIGKILL and restarted (embedded store, then etcd), an etcd restart, the
//! pod network running out, and flannel's schema in etcd (a lease written
//! as a stock flanneld writes it is a peer, and its subnet is never leased).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use kiln_client::{Client, StatusCode};
use kiln_core::{Ipv4Cidr, Peers, RegisterRequest, RegisterResponse};
use kiln_tests::etcd::Etcd;
use kiln_tests::{KilnServer, block_on, chain, fake_image, free_port, node_request as request, tail, wait_for};
use nix::sys::signal::Signal;

const NODES: usize = 200;

/// A fake image, enough for `kiln serve` to start.
fn images(dir: &Path) -> std::path::PathBuf {
    let images = dir.join("images");
    fake_image(&images, "tiny");
    images
}

/// `kiln serve` on fixed free ports (so agents retrying after a restart
/// find it again), with `extra` flags.
struct Lab {
    images: std::path::PathBuf,
    state: std::path::PathBuf,
    args: Vec<String>,
}

impl Lab {
    fn new(dir: &Path, extra: &[&str]) -> Lab {
        let mut args = vec!["--api-listen".to_string(), format!("127.0.0.1:{}", free_port())];
        args.extend(extra.iter().map(|s| s.to_string()));
        Lab { images: images(dir), state: dir.join("state"), args }
    }

    fn start(&self) -> KilnServer {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        KilnServer::start_with(&self.images, &self.state, &args)
    }
}

/// One agent: registers with `client` (a join token), retrying (as
/// the real agent does) until answered.
fn register_until_answered(client: &Client, req: &RegisterRequest) -> RegisterResponse {
    let mut delay = Duration::from_millis(50);
    for _ in 0..400 {
        match block_on(client.register(req)) {
            Ok(answer) => return answer,
            Err(e) if e.status().is_none_or(|s| s.is_server_error() || s == StatusCode::CONFLICT) => {}
            Err(e) => panic!("registration of {} refused: {}", req.hostname, chain(&e)),
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(500));
    }
    panic!("registration of {} never answered", req.hostname);
}

/// 200 registrations: the first half at once, the server SIGKILLed once
/// `kill_after` of them were answered (the rest are in flight or queued),
/// the second half sent while it is down, then the server restarted.
/// Holding the second half back until the kill makes sure the kill lands
/// mid-registration however fast this machine answers. Returns the answers,
/// by machine.
fn register_through_a_kill(lab: &Lab, server: &mut KilnServer, kill_after: usize) -> BTreeMap<String, Ipv4Cidr> {
    assert!(kill_after < NODES / 2);
    let client = server.joining_client();
    let answered = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..NODES)
        .map(|i| {
            let (client, answered, killed) = (client.clone(), answered.clone(), killed.clone());
            std::thread::spawn(move || {
                while i >= NODES / 2 && !killed.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let req = request(i);
                let resp = register_until_answered(&client, &req);
                answered.fetch_add(1, Ordering::SeqCst);
                (req.machine_id, resp.lease.expect("a lease for a node with a VTEP MAC").subnet)
            })
        })
        .collect();
    // A tight loop: the embedded store answers 100 registrations in well
    // under a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while answered.load(Ordering::SeqCst) < kill_after {
        assert!(
            std::time::Instant::now() < deadline,
            "not even {kill_after} registrations answered; server log:\n{}",
            tail(&server.log(), 30)
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    server.process.signal_and_wait(Signal::SIGKILL, Duration::from_secs(5)).expect("kiln serve dies on SIGKILL");
    killed.store(true, Ordering::SeqCst);
    let at_kill = answered.load(Ordering::SeqCst);
    eprintln!("killed the server with {at_kill} of {NODES} registrations answered");
    assert!(at_kill >= kill_after && at_kill <= NODES / 2, "{at_kill} answered before the kill");
    *server = lab.start();
    handles.into_iter().map(|h| h.join().expect("an agent thread")).collect()
}

fn assert_none_lost(server: &KilnServer, answers: &BTreeMap<String, Ipv4Cidr>) {
    let distinct: BTreeSet<&Ipv4Cidr> = answers.values().collect();
    assert_eq!(distinct.len(), NODES, "{NODES} distinct subnets");
    let nodes = server.nodes();
    assert_eq!(nodes.len(), NODES, "every node is registered once");
    for n in &nodes {
        assert_eq!(n.subnet.as_ref(), answers.get(&n.machine_id), "node {} keeps the subnet it was answered", n.name);
    }
}

fn reregister_all(server: &KilnServer, answers: &BTreeMap<String, Ipv4Cidr>) {
    let client = server.joining_client();
    for i in (0..NODES).step_by(7) {
        let req = request(i);
        let resp = register_until_answered(&client, &req);
        assert_eq!(Some(&resp.lease.unwrap().subnet), answers.get(&req.machine_id), "{} registers again to the same subnet", req.hostname);
    }
}

#[test]
fn embedded_store_survives_sigkill_mid_registration() {
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::new(tmp.path(), &[]);
    let mut server = lab.start();
    let answers = register_through_a_kill(&lab, &mut server, 20);
    assert_none_lost(&server, &answers);
    reregister_all(&server, &answers);
    assert!(kiln_control::StateDir::new(&lab.state).registry_db().exists());
}

#[test]
fn etcd_store_survives_sigkill_and_etcd_restart_with_flannel_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start();
    // A stock flanneld's lease, as flanneld writes it, before kiln starts.
    let flannel =
        r#"{"PublicIP":"203.0.113.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:09"}}"#;
    etcd.ctl(&["put", "/coreos.com/network/subnets/10.244.1.0-24", flannel]).expect("etcdctl put");
    let lab = Lab::new(tmp.path(), &["--etcd", &etcd.url]);
    let mut server = lab.start();

    // flannel's network config, written by kiln.
    let config: serde_json::Value =
        serde_json::from_str(&etcd.ctl(&["get", "--print-value-only", "/coreos.com/network/config"]).unwrap()).unwrap();
    assert_eq!(config["Network"], "10.244.0.0/16");
    assert_eq!(config["SubnetLen"], 24);
    assert_eq!(config["Backend"]["Type"], "vxlan");

    let answers = register_through_a_kill(&lab, &mut server, 60);
    assert_none_lost(&server, &answers);
    let flannel_subnet: Ipv4Cidr = "10.244.1.0/24".parse().unwrap();
    assert!(!answers.values().any(|s| *s == flannel_subnet), "the flanneld's subnet is never leased to a kiln node");

    // flannel's schema: one key per lease, flannel's JSON, on an etcd lease.
    let keys = etcd.keys("/coreos.com/network/subnets/");
    assert_eq!(keys.len(), NODES + 1, "every kiln node's lease plus the flanneld's");
    let some = answers.values().next().unwrap();
    let key = format!("/coreos.com/network/subnets/{}-{}", some.addr, some.prefix);
    let got: serde_json::Value = serde_json::from_str(&etcd.ctl(&["get", "-w", "json", &key]).unwrap()).unwrap();
    let kv = &got["kvs"][0];
    let lease_id = kv["lease"].as_i64().expect("the subnet key is on an etcd lease");
    assert_ne!(lease_id, 0, "the subnet key is on an etcd lease");
    let ttl = etcd.ctl(&["lease", "timetolive", &format!("{lease_id:x}")]).unwrap();
    assert!(ttl.contains("granted with TTL(86400s)"), "flannel's 24 h TTL: {ttl}");
    let value: serde_json::Value = serde_json::from_str(&etcd.ctl(&["get", "--print-value-only", &key]).unwrap()).unwrap();
    assert_eq!(value["BackendType"], "vxlan");
    assert_eq!(value["BackendData"]["VNI"], 1);
    assert!(value["PublicIP"].as_str().unwrap().starts_with("198.18."), "{value}");
    assert!(value["BackendData"]["VtepMAC"].as_str().unwrap().starts_with("0e:00:00:00:"), "{value}");

    // The flanneld is one of kiln's peers (peers answer node tokens only).
    // (since, wait) of the peers watch; (None, 0 s) answers at once with
    // the whole list.
    let get_peers = |since: Option<(u64, u64)>, wait: Duration| -> Option<Peers> {
        let me = register_until_answered(&server.joining_client(), &request(0)).token;
        block_on(server.api_client_as(None).with_token(&me).peers(since, wait)).ok()
    };
    let err = block_on(server.api_client_as(None).peers(None, Duration::ZERO)).unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED), "no peers without a node token");
    let err = block_on(server.api_client().peers(None, Duration::ZERO)).unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::FORBIDDEN), "an operator is not a node");
    let peers = get_peers(None, Duration::ZERO).expect("peers");
    assert!(!peers.delta, "the whole list");
    assert_eq!(peers.peers.len(), NODES + 1);
    assert!(peers.peers.iter().any(|p| p.subnet == flannel_subnet && p.vtep_mac.to_string() == "aa:bb:cc:00:00:09"));

    // etcd restarts (SIGKILL): kiln rides it out, nothing is lost, and
    // nodes register again to the same subnets.
    etcd.restart();
    reregister_all(&server, &answers);
    assert_none_lost(&server, &answers);

    // A flanneld that joins later is seen through the watch at once, as a
    // change, and one that leaves is gone.
    let now = get_peers(None, Duration::ZERO).expect("peers");
    let since = Some((now.epoch, now.revision));
    let late = r#"{"PublicIP":"203.0.113.10","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:0a"}}"#;
    etcd.ctl(&["put", "/coreos.com/network/subnets/10.244.250.0-24", late]).unwrap();
    let late: Ipv4Cidr = "10.244.250.0/24".parse().unwrap();
    let seen = wait_for(Duration::from_secs(5), || {
        let p = get_peers(since, Duration::from_secs(2))?;
        p.peers.iter().any(|p| p.subnet == late).then_some(p)
    })
    .unwrap_or_else(|| panic!("a flanneld's new lease shows among the peers; log:\n{}", tail(&server.log(), 20)));
    assert!(seen.delta && seen.peers.len() <= 2, "as a change, not the whole list: {seen:?}");
    etcd.ctl(&["del", "/coreos.com/network/subnets/10.244.250.0-24"]).unwrap();
    let since = Some((seen.epoch, seen.revision));
    let left = wait_for(Duration::from_secs(5), || get_peers(since, Duration::from_secs(2)).filter(|p| p.left.contains(&late)));
    assert!(left.is_some_and(|p| p.delta), "a deleted lease is a change: its subnet left");
    let gone = get_peers(None, Duration::ZERO).expect("peers");
    assert!(!gone.peers.iter().any(|p| p.subnet == late), "a flanneld's lease that is deleted leaves the peers");
}

#[test]
fn exhausted_pod_network_is_a_clear_error_and_records_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // A /23 of /24s: the first is never leased, so one node fits.
    let lab = Lab::new(tmp.path(), &["--pod-network", "10.9.0.0/23"]);
    let server = lab.start();
    let client = server.joining_client();
    let first = register_until_answered(&client, &request(1));
    assert_eq!(first.lease.unwrap().subnet.to_string(), "10.9.1.0/24");
    let err = block_on(client.register(&request(2))).unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    let text = err.to_string();
    assert!(text.contains("address space exhausted") && text.contains("10.9.0.0/23"), "the agent is told why: {text}");
    let logged = wait_for(Duration::from_secs(5), || server.log().contains("address space exhausted").then_some(()));
    assert!(logged.is_some(), "the server logs it:\n{}", tail(&server.log(), 10));
    assert_eq!(server.nodes().len(), 1, "no half-made node or lease");

    // Not a join token: 401. A node token used for another node: 403.
    let err = block_on(client.with_token("wrong").register(&request(3))).unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED));
    let err = block_on(client.with_token(&first.token).heartbeat_node("someone-else")).unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::FORBIDDEN));
}

/// The state `server` lists node `name` in, or `None` once it is gone.
fn state_of(server: &KilnServer, name: &str) -> Option<kiln_core::NodeState> {
    server.nodes().into_iter().find(|n| n.name == name).map(|n| n.state.expect("the server says each node's state"))
}

/// A node's heartbeats every 500 ms through `node`, on a thread, until `stop`.
fn heartbeats(node: Client, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            block_on(node.heartbeat()).expect("a live node's heartbeat");
            std::thread::sleep(Duration::from_millis(500));
        }
    })
}

/// Kubernetes' node lifecycle and flannel's lease TTL, with a 2 s grace and
/// a 6 s TTL: a node that stops heartbeating turns NotReady, frees its
/// public IP for another, and is removed with its subnet released; one that
/// keeps heartbeating stays Ready. Two live nodes on one public IP are
/// refused (409, naming the holder). Run on the embedded store and on etcd.
fn node_lifecycle(extra: &[&str]) -> (KilnServer, Lab, String, tempfile::TempDir) {
    use kiln_core::NodeState::{NotReady, Ready};
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::new(tmp.path(), &[&["--node-grace", "2s", "--lease-ttl", "6"][..], extra].concat());
    let server = lab.start();
    let client = server.joining_client();
    let silent = register_until_answered(&client, &request(1));
    let beating = register_until_answered(&client, &request(2));
    let silent_subnet = silent.lease.as_ref().unwrap().subnet;
    assert_eq!((state_of(&server, &silent.name), state_of(&server, &beating.name)), (Some(Ready), Some(Ready)));

    // A third machine behind the same address as a live node: refused, and nothing recorded.
    let mut twin = request(3);
    twin.public_ip = request(1).public_ip;
    twin.addresses[1] = request(1).public_ip.unwrap();
    let e = block_on(client.register(&twin)).expect_err("a live node holds that public IP");
    assert_eq!(e.status(), Some(StatusCode::CONFLICT), "{}", chain(&e));
    let words = chain(&e);
    assert!(words.contains(&silent.name) && words.contains("198.18.0.2"), "names the node and the address: {words}");
    assert_eq!(server.nodes().len(), 2, "nothing recorded for the refused twin");
    let (ok, table, err) = server.cli(&["nodes"]);
    assert!(ok, "kiln nodes: {err}");
    let row = table.lines().find(|l| l.starts_with(&silent.name)).unwrap_or_default();
    assert!(
        row.contains(" Ready ") && row.contains(&silent_subnet.to_string()) && row.contains(" 198.18.0.2 "),
        "state, subnet, public IP:\n{table}"
    );

    // One node heartbeats every 500 ms; the other stops.
    let stop = Arc::new(AtomicBool::new(false));
    let heart = heartbeats(server.api_client_as(None).with_token(&beating.token), stop.clone());
    let not_ready = wait_for(Duration::from_secs(10), || (state_of(&server, &silent.name) == Some(NotReady)).then_some(()));
    assert!(not_ready.is_some(), "no heartbeat for the grace period: NotReady");
    assert_eq!(state_of(&server, &beating.name), Some(Ready), "a heartbeating node stays Ready");
    let (_, table, _) = server.cli(&["nodes"]);
    assert!(table.lines().any(|l| l.starts_with(&silent.name) && l.contains(" NotReady ")), "{table}");
    // Its public IP is free for another machine; its subnet is still its own.
    let twin = register_until_answered(&client, &twin);
    assert_ne!(twin.lease.as_ref().unwrap().subnet, silent_subnet, "a NotReady node keeps its subnet until the TTL");

    // Past the lease TTL it is removed, with no restart, and its subnet is free again.
    let gone = wait_for(Duration::from_secs(15), || state_of(&server, &silent.name).is_none().then_some(()));
    assert!(gone.is_some(), "not heard from for the lease TTL: removed; log:\n{}", tail(&server.log(), 20));
    // By kiln's sweep, or on etcd by its lease running out: whichever is first.
    let log = server.log();
    assert!(
        log.contains("not heard from for the lease TTL") || log.contains("lease expired; node removed"),
        "the removal is logged:\n{log}"
    );
    let peers = block_on(server.api_client_as(None).with_token(&beating.token).peers(None, Duration::ZERO)).unwrap();
    assert!(!peers.peers.iter().any(|p| p.subnet == silent_subnet), "its lease left the peers");
    assert_eq!(state_of(&server, &beating.name), Some(Ready), "the heartbeating node is kept");
    let next = register_until_answered(&client, &request(4));
    assert_eq!(next.lease.unwrap().subnet, silent_subnet, "the released subnet is leased again");
    stop.store(true, Ordering::Relaxed);
    heart.join().unwrap();
    (server, lab, beating.token, tmp)
}

#[test]
fn node_lifecycle_on_the_embedded_store() {
    let (mut server, lab, token, _tmp) = node_lifecycle(&[]);
    // Heartbeats are written 1.5 s apart (a quarter of the 6 s TTL): of two
    // heartbeats in a row the second is in memory only.
    let two_heartbeats = |server: &KilnServer| {
        let node = server.api_client_as(None).with_token(&token);
        block_on(node.heartbeat()).unwrap();
        let name = block_on(node.heartbeat()).unwrap().name;
        let heard = server.nodes().into_iter().find(|n| n.name == name).expect("the heartbeating node").last_seen;
        (name, heard)
    };
    let last_seen = |server: &KilnServer, name: &str| server.nodes().into_iter().find(|n| n.name == name).map(|n| n.last_seen);

    // A crash loses it; the restarted server still takes the node for
    // live: it counts the silence from its own start.
    let (name, heard) = two_heartbeats(&server);
    assert!(server.process.signal_and_wait(Signal::SIGKILL, Duration::from_secs(10)).is_some());
    let mut server = lab.start();
    assert_eq!(state_of(&server, &name), Some(kiln_core::NodeState::Ready), "Ready within the grace period after the restart");
    let kept = last_seen(&server, &name).expect("the node survives the crash");
    assert!(kept < heard, "the second heartbeat was in memory only: {kept} against {heard}");

    // A stop with SIGTERM writes it first, so a restart finds the node
    // last seen at that heartbeat.
    let (name, heard) = two_heartbeats(&server);
    let status = server.process.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "kiln serve stops on SIGTERM: {status:?}\n{}", tail(&server.log(), 20));
    let again = lab.start();
    assert_eq!(last_seen(&again, &name), Some(heard), "the last heartbeat was written at the stop");
}

#[test]
fn node_lifecycle_on_etcd() {
    let etcd = Etcd::start();
    node_lifecycle(&["--etcd", &etcd.url]);
}

/// Two servers on one etcd, as on two machines (the second's state
/// directory a copy of the first's: the same CA): a node that heartbeats
/// to one only is Ready on the other past the grace period (`/kiln/alive/`,
/// on the first server's liveness lease), and NotReady on both soon after
/// it stops.
#[test]
fn a_node_heartbeating_to_one_server_is_ready_on_every_server() {
    use kiln_core::NodeState::{NotReady, Ready};
    let etcd = Etcd::start();
    let tmp = tempfile::tempdir().unwrap();
    let on_etcd = |name: &'static str| ["--etcd", etcd.url.as_str(), "--node-grace", "4s", "--name", name];
    let a_lab = Lab::new(tmp.path(), &on_etcd("a"));
    let a = a_lab.start();
    let b_state = tmp.path().join("state-b");
    let copied = std::process::Command::new("cp").arg("-a").arg(&a_lab.state).arg(&b_state).status().unwrap();
    assert!(copied.success());
    let b_api = format!("127.0.0.1:{}", free_port());
    let b = KilnServer::start_with(&a_lab.images, &b_state, &[&["--api-listen", b_api.as_str()][..], &on_etcd("b")].concat());

    let node = register_until_answered(&a.joining_client(), &request(1));
    let stop = Arc::new(AtomicBool::new(false));
    let heart = heartbeats(a.api_client_as(None).with_token(&node.token), stop.clone());
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(state_of(&a, &node.name), Some(Ready));
    assert_eq!(state_of(&b, &node.name), Some(Ready), "heard from by a within the grace period: Ready on b too");
    assert_eq!(etcd.keys(kiln_control::store::etcd::ALIVE_PREFIX), [format!("/kiln/alive/{}", node.name)]);

    stop.store(true, Ordering::Relaxed);
    heart.join().unwrap();
    let stopped = std::time::Instant::now();
    let not_ready = wait_for(Duration::from_secs(15), || (state_of(&b, &node.name) == Some(NotReady)).then(|| stopped.elapsed()));
    let took = not_ready.unwrap_or_else(|| panic!("silent: never NotReady on b; b:\n{}", tail(&b.log(), 20)));
    eprintln!("a node silent on a: NotReady on b after {:.1} s (grace 4 s)", took.as_secs_f64());
    assert!(took >= Duration::from_secs(3), "not before the grace period: {took:?}");
    assert_eq!(state_of(&a, &node.name), Some(NotReady));
    assert!(etcd.keys(kiln_control::store::etcd::ALIVE_PREFIX).is_empty(), "its key is gone");
}
