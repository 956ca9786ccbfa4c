//! The client against a small server on loopback that answers as kiln's API
//! does: typed answers, the token and `Host` it sends, and errors that name
//! the route and URL, carry the status and the server's words, and keep
//! their cause.

use std::error::Error as _;
use std::net::SocketAddr;
use std::time::Duration;

use kiln_client::{Client, Error, StatusCode, metrics::Scraper};
use warp::Filter;

/// A server answering a few routes as the API does; its address.
async fn serve() -> SocketAddr {
    let auth = || warp::header::optional::<String>("authorization");
    let heartbeat = warp::path!("api" / "v1" / "heartbeat").and(warp::post()).and(auth()).map(|auth: Option<String>| {
        if auth.as_deref() == Some("Bearer node-token") {
            warp::reply::with_status(
                warp::reply::json(&serde_json::json!({"name": "n1", "heartbeat_interval_secs": 7})),
                warp::http::StatusCode::OK,
            )
        } else {
            let body = serde_json::json!({"error": "unknown node token; register again"});
            warp::reply::with_status(warp::reply::json(&body), warp::http::StatusCode::UNAUTHORIZED)
        }
    });
    let peers = warp::path!("api" / "v1" / "peers").and(warp::query::<std::collections::BTreeMap<String, String>>()).map(
        |q: std::collections::BTreeMap<String, String>| {
            let revision: u64 = q["revision"].parse().unwrap();
            let epoch: u64 = q["epoch"].parse().unwrap();
            warp::reply::json(&serde_json::json!({"revision": revision + 1, "epoch": epoch, "delta": true, "peers": []}))
        },
    );
    let boot =
        warp::path!("boot.ipxe").and(warp::header::<String>("host")).map(|host: String| format!("#!ipxe\nchain http://{host}/ipxe\n"));
    let ipxe = warp::path!("ipxe").and(warp::query::raw()).map(|q: String| q);
    let metrics = warp::path!("metrics").map(|| "node_load1 0.5\n");
    let plain =
        warp::path!("api" / "v1" / "nodes").map(|| warp::reply::with_status("overloaded\n", warp::http::StatusCode::SERVICE_UNAVAILABLE));
    let routes = heartbeat.or(peers).or(boot).or(ipxe).or(metrics).or(plain);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(routes).incoming(listener).run());
    addr
}

/// A loopback port nobody listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn typed_answers_token_and_host() {
    let addr = serve().await;
    let client = Client::builder(&format!("http://{addr}/")).host("10.0.2.2:8080").build().unwrap();
    assert_eq!(client.base_url(), format!("http://{addr}"), "no trailing slash");

    let hb = client.with_token("node-token").heartbeat().await.unwrap();
    assert_eq!((hb.name.as_str(), hb.heartbeat_interval_secs), ("n1", 7));

    let peers = client.peers(Some((7, 41)), Duration::from_secs(1)).await.unwrap();
    assert_eq!((peers.epoch, peers.revision, peers.delta), (7, 42, true), "the epoch and revision are sent as the query");
    // This server does not stream (as a kiln from before streams): its one
    // answer, with no newline, is the watch's one line, then the end.
    let mut stream = client.watch_peers(Some((7, 41)), Duration::from_secs(1)).await.unwrap();
    assert_eq!(stream.next().await.unwrap().map(|p| p.revision), Some(42));
    assert!(stream.next().await.unwrap().is_none(), "then the stream ends");

    let script = client.boot_ipxe().await.unwrap();
    assert!(script.contains("chain http://10.0.2.2:8080/ipxe"), "the Host header is the one given: {script}");
    let query = client.ipxe(&[("mac", "52-54-00-ab-cd-ef"), ("arch", "x86_64")]).await.unwrap();
    assert_eq!(query, "mac=52-54-00-ab-cd-ef&arch=x86_64");

    let text = Scraper::new(Duration::from_secs(2)).unwrap().fetch(&addr.to_string()).await.unwrap();
    assert_eq!(text, "node_load1 0.5\n");
}

#[tokio::test]
async fn errors_name_the_route_and_keep_the_status_and_the_servers_words() {
    let addr = serve().await;
    let client = Client::builder(&format!("http://{addr}")).token("wrong").build().unwrap();

    let err = client.heartbeat().await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED));
    let text = err.to_string();
    assert!(text.contains("POST /api/v1/heartbeat") && text.contains(&format!("http://{addr}/api/v1/heartbeat")), "{text}");
    assert!(text.contains("401") && text.ends_with("unknown node token; register again"), "the error field, not its JSON: {text}");

    let err = client.nodes().await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert!(err.to_string().ends_with(": overloaded"), "a plain-text body as it is: {err}");

    let err = client.sd().await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND), "{err}");
}

#[tokio::test]
async fn no_answer_keeps_the_cause_chain() {
    let port = closed_port();
    let client = Client::builder(&format!("http://127.0.0.1:{port}")).build().unwrap();
    let err = client.nodes().await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert_eq!(err.status(), None);
    assert_eq!(err.to_string(), format!("GET /api/v1/nodes: http://127.0.0.1:{port}/api/v1/nodes"), "the cause is not repeated");
    assert!(err.source().is_some(), "reqwest's error is the source");
    let chain = kiln_client::chain(&err);
    assert!(chain.to_lowercase().contains("refused"), "the whole chain is there: {chain}");

    let err = Scraper::new(Duration::from_secs(1)).unwrap().fetch(&format!("127.0.0.1:{port}")).await.unwrap_err();
    assert!(err.to_string().starts_with("GET /metrics: http://127.0.0.1:"), "{err}");
}

#[test]
fn bad_ca_and_bad_urls_are_errors_at_construction() {
    let err = Client::builder("https://127.0.0.1:8443")
        .ca_pem(Some(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"))
        .build();
    assert!(matches!(err, Err(Error::Ca { .. })), "{err:?}");
    let err = Client::builder("127.0.0.1:8443").build().unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:8443"), "names the URL: {err}");
}
