//! kiln-client against the real `kiln serve` (TLS API, a fake image, no
//! guest): every route the client has answers what its method says, and a
//! refusal carries the status and the server's words.

use std::time::Duration;

use kiln_client::{Client, StatusCode};
use kiln_tests::{KilnServer, block_on, fake_image, node_request};

#[test]
fn every_route_through_the_client() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    fake_image(&images, "tiny");
    let server = KilnServer::start(&images, &tmp.path().join("state"));

    // The node's routes: register, heartbeat (plain and named), peers, leave.
    let boot = server.joining_client();
    let answer = block_on(boot.register(&node_request(7))).unwrap();
    assert_eq!(answer.name, "node-7");
    let lease = answer.lease.expect("a lease for a node with a VTEP MAC");
    let node = server.api_client_as(None).with_token(&answer.token);
    assert_eq!(block_on(node.heartbeat()).unwrap().name, "node-7");
    assert_eq!(block_on(node.heartbeat_node("node-7")).unwrap().name, "node-7");
    let err = block_on(node.heartbeat_node("someone-else")).unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::FORBIDDEN), "{err}");
    let peers = block_on(node.peers(None, Duration::ZERO)).unwrap();
    assert!(peers.peers.iter().any(|p| p.subnet == lease.subnet), "the node is among the peers: {peers:?}");

    // The streamed watch: the whole list at once, then each change as it
    // happens, on the one connection.
    block_on(async {
        let mut stream = node.watch_peers(None, Duration::from_secs(20)).await.unwrap();
        assert!(stream.switched(), "kiln serve switches the watch's connection to kiln-peers");
        let first = stream.next().await.unwrap().expect("a first line at once");
        assert!(!first.delta && first.peers.iter().any(|p| p.subnet == lease.subnet), "{first:?}");
        let other = boot.register(&node_request(8)).await.unwrap();
        let joined = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("the join, at once").unwrap().unwrap();
        assert!(joined.delta && joined.left.is_empty(), "a change, not the whole list: {joined:?}");
        assert_eq!(joined.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["node-8"]);
        let other = server.api_client_as(None).with_token(&other.token);
        let gone = other.leave_node("node-8").await.unwrap();
        let left = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("the leave, at once").unwrap().unwrap();
        assert!(left.delta && left.peers.is_empty() && left.left == [gone.subnet.unwrap()], "{left:?}");
        // From the last revision under this epoch: nothing new, at once.
        let mut again = node.watch_peers(Some((left.epoch, left.revision)), Duration::from_secs(1)).await.unwrap();
        let resumed = again.next().await.unwrap().expect("a first line");
        assert!(resumed.delta && resumed.peers.is_empty() && resumed.left.is_empty(), "{resumed:?}");
        assert!(again.next().await.unwrap().is_none(), "the stream ends after its time");
    });

    // The listings.
    let nodes = block_on(server.api_client().nodes()).unwrap();
    assert_eq!(nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["node-7"]);
    let sd = block_on(server.api_client().sd()).unwrap();
    assert_eq!(sd[0].targets, ["192.0.2.8:9100"]);
    assert_eq!(block_on(server.api_client().profiles()).unwrap()[0]["id"], "default");
    assert!(block_on(server.api_client().groups()).is_ok());
    assert!(block_on(server.api_client().pools()).unwrap().is_empty(), "no --pools, no pools");
    let err = block_on(server.api_client().scale("tiny", 1)).unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND), "{err}");
    assert!(err.to_string().contains("runs no pools"), "the server's words: {err}");

    // The boot routes, on the plain-HTTP listener, as a machine behind QEMU's user network sees them.
    let host = format!("10.0.2.2:{}", server.port());
    let booting = Client::builder(&server.url).host(&host).build().unwrap();
    let script = block_on(booting.boot_ipxe()).unwrap();
    assert!(script.contains(&format!("http://{host}/ipxe?mac=")), "{script}");
    let script = block_on(booting.ipxe(&[("mac", "52-54-00-12-34-56"), ("arch", "x86_64")])).unwrap();
    assert!(script.contains("kiln.server=https://10.0.2.2:") && !script.contains("kiln.token="), "not expected, no token: {script}");
    let meta = block_on(booting.seed_file("52-54-00-12-34-56", "meta-data")).unwrap();
    assert!(meta.contains("local-hostname"), "{meta}");
    let err = block_on(booting.seed_file("52-54-00-12-34-56", "passwords")).unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND), "{err}");

    // Leaving: named by another name is refused; then the node leaves.
    let err = block_on(node.leave_node("someone-else")).unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::FORBIDDEN), "{err}");
    assert_eq!(block_on(node.leave()).unwrap().name, "node-7");
    assert!(server.nodes().is_empty(), "the node is gone");
    let err = block_on(node.heartbeat()).unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED), "a node that left is unknown: {err}");
}
