//! Registration with the control plane, then heartbeats.
//!
//! `POST {server}/api/v1/register` with the bootstrap token, retried with
//! exponential backoff (200 ms doubling to 10 s) until the server answers;
//! then `POST {server}/api/v1/heartbeat` with the node token at the interval
//! the server asks for. A heartbeat answered 401 means the server no longer
//! knows the token (its state was reset): the agent registers again.
//!
//! Every registration is published on a `watch` channel as [`Registered`]
//! (name, node token, lease), which the flannel loop follows; the peers
//! watch (`GET /api/v1/peers`) and leaving (`POST /api/v1/leave`) are
//! calls of the same [`kiln_client::Client`] with the node token. The HTTP
//! calls themselves are kiln-client's; this module owns the loop.

use std::time::Duration;

use kiln_client::{Client, StatusCode};
use kiln_core::{Lease, RegisterRequest, RegisterResponse};
use log::{info, warn};
use tokio::sync::watch;

use crate::backoff::Backoff;

/// An error and its causes on one line (kiln-client's, for every log line of the agent).
pub use kiln_client::chain;

/// The node as the control plane last registered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The node's name.
    pub name: String,
    /// Its node token (heartbeats, peers, leaving).
    pub token: String,
    /// Its subnet lease; `None` when the server gave none.
    pub lease: Option<Lease>,
}

/// Registers with `client` (which holds the bootstrap token), retrying with
/// backoff until the server accepts; then heartbeats forever with the node
/// token, registering again when the server forgets the node. Every
/// registration is sent on `publish`. `gather` makes each attempt's request
/// (the node's facts as they are now); it must not block.
pub async fn run<F, Fut>(client: &Client, mut gather: F, publish: &watch::Sender<Option<Registered>>) -> !
where
    F: FnMut() -> Fut,
    Fut: Future<Output = RegisterRequest>,
{
    loop {
        let registered = register_with_backoff(client, &mut gather).await;
        let token = registered.token;
        publish.send_replace(Some(Registered { name: registered.name.clone(), token: token.clone(), lease: registered.lease.clone() }));
        let node = client.with_token(&token);
        let mut interval = Duration::from_secs(registered.heartbeat_interval_secs.max(1));
        loop {
            tokio::time::sleep(interval).await;
            match node.heartbeat().await {
                Ok(hb) => interval = Duration::from_secs(hb.heartbeat_interval_secs.max(1)),
                Err(e) if e.status() == Some(StatusCode::UNAUTHORIZED) => {
                    warn!("control plane no longer knows this node; registering again");
                    break;
                }
                Err(e) => warn!("heartbeat: {}", chain(&e)),
            }
        }
    }
}

async fn register_with_backoff<F, Fut>(client: &Client, gather: &mut F) -> RegisterResponse
where
    F: FnMut() -> Fut,
    Fut: Future<Output = RegisterRequest>,
{
    let mut backoff = Backoff::new(Duration::from_secs(10));
    let mut attempt = 1u32;
    loop {
        let req = gather().await;
        match client.register(&req).await {
            Ok(resp) => {
                info!(
                    "registered with {} as node {} (machine-id {}, macs {}, image {}, lease {})",
                    client.base_url(),
                    resp.name,
                    req.machine_id,
                    req.macs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                    if req.image_digest.is_empty() { "unknown" } else { &req.image_digest },
                    resp.lease.as_ref().map_or_else(|| "none".to_string(), |l| format!("{} vni {}", l.subnet, l.vni)),
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
