//! Registration with the control plane, then heartbeats.
//!
//! `POST {server}/api/v1/register` with the join token, retried with
//! exponential backoff (200 ms doubling to 10 s) until the server answers.
//! A machine that booted with no token is answered "pending": it registers
//! again every few seconds (as the answer asks) with the same key until an
//! operator approves it (`kiln nodes approve`), and then goes on as any node;
//! then a heartbeat at the interval the server asks for: on the node's
//! peers watch while one is open (its connection switched to `kiln-peers`,
//! kiln-client's `Client::heartbeat`), else `POST {server}/api/v1/heartbeat`. Over TLS the registration carries a certificate signing request for
//! the node's own key ([`crate::node_key`]), and every later call presents
//! the certificate the server answered with (mutual TLS), renewed at two
//! thirds of its lifetime (`POST /api/v1/nodes/NAME/renew`). A heartbeat
//! answered 401 means the server no longer knows the node (its state was
//! reset, or an operator deleted it): the agent registers again.
//!
//! Every registration (and renewal) is published on a `watch` channel as
//! [`Registered`] (name, the node's client, lease), which the flannel loop
//! follows; the peers watch (`GET /api/v1/peers`) and leaving
//! (`POST /api/v1/leave`) are calls of that client. The HTTP calls
//! themselves are kiln-client's; this module owns the loop.

use std::time::{Duration, Instant};

use kiln_client::{Client, StatusCode};
use kiln_core::{Lease, NodeCertificate, RegisterRequest, RegisterResponse};
use log::{info, warn};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::node_key::NodeKey;

/// An error and its causes on one line (kiln-client's, for every log line of the agent).
pub use kiln_client::chain;

/// The node as the control plane last registered it.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The node's name.
    pub name: String,
    /// The client of the node's own calls: its certificate (over TLS), or
    /// its node token.
    pub client: Client,
    /// Its subnet lease; `None` when the server gave none.
    pub lease: Option<Lease>,
}

impl PartialEq for Registered {
    /// The same node with the same lease (whatever its credentials).
    fn eq(&self, other: &Registered) -> bool {
        (&self.name, &self.lease) == (&other.name, &other.lease)
    }
}

impl Eq for Registered {}

/// How the agent reaches the control plane: the join token's client, how
/// to make the node's own, and the node's key (over TLS).
pub struct Joining<'a> {
    /// The client holding the join token.
    pub client: &'a Client,
    /// How clients are made (the server, its CA), for the node's own.
    pub builder: &'a kiln_client::Builder,
    /// The node's key, sent as a CSR with every registration.
    pub key: Option<&'a NodeKey>,
}

impl Joining<'_> {
    /// The node's client: its certificate (with its key) when it has one,
    /// else the node token.
    fn node_client(&self, token: &str, certificate: Option<&NodeCertificate>) -> Option<Client> {
        let builder = self.builder.clone().token(token);
        let identity = match (self.key, certificate) {
            (Some(key), Some(cert)) => match key.keep_certificate(&cert.pem) {
                Ok(identity) => Some(identity),
                Err(e) => {
                    warn!("keeping the node's certificate: {}", chain(&e));
                    return None;
                }
            },
            _ => None,
        };
        match builder.identity_pem(identity.as_deref()).build() {
            Ok(client) => Some(client),
            Err(e) => {
                warn!("the node's client: {}", chain(&e));
                None
            }
        }
    }
}

/// Registers, retrying with backoff until the server accepts; then
/// heartbeats forever as the node, renewing its certificate, registering
/// again when the server forgets the node. Every registration is sent on
/// `publish`. `gather` makes each attempt's request (the node's facts as
/// they are now); it must not block.
pub async fn run<F, Fut>(joining: &Joining<'_>, mut gather: F, publish: &watch::Sender<Option<Registered>>) -> !
where
    F: FnMut() -> Fut,
    Fut: Future<Output = RegisterRequest>,
{
    loop {
        let registered = register_with_backoff(joining, &mut gather).await;
        let Some(mut node) = joining.node_client(&registered.token, registered.certificate.as_ref()) else {
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        };
        let mut renew_at = registered.certificate.as_ref().map(renewal_time);
        publish.send_replace(Some(Registered { name: registered.name.clone(), client: node.clone(), lease: registered.lease.clone() }));
        let mut next_beat = Instant::now() + Duration::from_secs(registered.heartbeat_interval_secs.max(1));
        loop {
            let wake = renew_at.map_or(next_beat, |at| at.min(next_beat));
            tokio::time::sleep_until(wake.into()).await;
            if let (Some(at), Some(key)) = (renew_at, joining.key)
                && Instant::now() >= at
            {
                match node.renew(&registered.name, key.csr()).await {
                    Ok(cert) => {
                        info!("renewed this node's certificate ({} s)", cert.valid_secs);
                        if let Some(renewed) = joining.node_client(&registered.token, Some(&cert)) {
                            node = renewed;
                            renew_at = Some(renewal_time(&cert));
                            publish.send_replace(Some(Registered {
                                name: registered.name.clone(),
                                client: node.clone(),
                                lease: registered.lease.clone(),
                            }));
                        }
                    }
                    Err(e) if e.status() == Some(StatusCode::UNAUTHORIZED) => {
                        warn!("control plane no longer knows this node; registering again");
                        break;
                    }
                    Err(e) => {
                        warn!("renewing the node's certificate: {}", chain(&e));
                        renew_at = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            if Instant::now() < next_beat {
                continue;
            }
            match node.heartbeat().await {
                Ok(hb) => next_beat = Instant::now() + Duration::from_secs(hb.heartbeat_interval_secs.max(1)),
                Err(e) if e.status() == Some(StatusCode::UNAUTHORIZED) => {
                    warn!("control plane no longer knows this node; registering again");
                    break;
                }
                Err(e) => {
                    warn!("heartbeat: {}", chain(&e));
                    next_beat = Instant::now() + Duration::from_secs(registered.heartbeat_interval_secs.max(1));
                }
            }
        }
    }
}

/// When to renew a certificate valid for `cert.valid_secs` from now: at
/// two thirds of that.
fn renewal_time(cert: &NodeCertificate) -> Instant {
    Instant::now() + Duration::from_secs(cert.valid_secs) * 2 / 3
}

async fn register_with_backoff<F, Fut>(joining: &Joining<'_>, gather: &mut F) -> RegisterResponse
where
    F: FnMut() -> Fut,
    Fut: Future<Output = RegisterRequest>,
{
    let client = joining.client;
    let mut backoff = Backoff::new(Duration::from_secs(10));
    let mut attempt = 1u32;
    let mut waiting = false;
    loop {
        let mut req = gather().await;
        req.csr = joining.key.map(|k| k.csr().to_string());
        match client.register(&req).await {
            Ok(resp) if resp.pending => {
                if !waiting {
                    info!("pending as node {}: waiting for an operator (kiln nodes approve {})", resp.name, resp.name);
                    waiting = true;
                }
                tokio::time::sleep(Duration::from_secs(resp.heartbeat_interval_secs.clamp(1, 60))).await;
            }
            Ok(resp) => {
                info!(
                    "registered with {} as node {} (machine-id {}, macs {}, image {}, lease {}, {})",
                    client.base_url(),
                    resp.name,
                    req.machine_id,
                    req.macs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                    if req.image_digest.is_empty() { "unknown" } else { &req.image_digest },
                    resp.lease.as_ref().map_or_else(|| "none".to_string(), |l| format!("{} vni {}", l.subnet, l.vni)),
                    if resp.certificate.is_some() { "client certificate" } else { "node token" },
                );
                return resp;
            }
            Err(e) => {
                warn!("registering (attempt {attempt}, next in {:?}): {}", backoff.peek(), chain(&e));
                backoff.wait().await;
                attempt += 1;
            }
        }
    }
}
