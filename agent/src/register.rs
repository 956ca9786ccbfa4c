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
//! calls of the same [`Client`].

use std::time::Duration;

use kiln_core::{HeartbeatResponse, Lease, Peers, RegisterRequest, RegisterResponse};
use log::{info, warn};
use tokio::sync::watch;

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

/// Talking to the control plane failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No answer (connection refused, timeout, ...).
    #[error("{url}")]
    Transport {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("{url}: {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
        /// The server's explanation.
        body: String,
    },
}

/// A client of one control plane.
pub struct Client {
    http: reqwest::Client,
    server: String,
    bootstrap_token: String,
}

impl Client {
    /// A client of the control plane at `server` (base URL) with
    /// `bootstrap_token`. For an `https://` server, `ca_pem` holds the only
    /// certificates trusted: the control plane's own CA, not the web's.
    pub fn new(server: &str, bootstrap_token: &str, ca_pem: Option<&[u8]>) -> Result<Self, reqwest::Error> {
        let roots = match ca_pem {
            Some(pem) => reqwest::Certificate::from_pem_bundle(pem)?,
            None => Vec::new(),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .user_agent(concat!("kiln-agent/", env!("CARGO_PKG_VERSION")))
            .tls_certs_only(roots)
            .build()?;
        Ok(Client { http, server: server.trim_end_matches('/').to_string(), bootstrap_token: bootstrap_token.to_string() })
    }

    /// One registration attempt.
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, Error> {
        let url = format!("{}/api/v1/register", self.server);
        let resp = self.http.post(&url).bearer_auth(&self.bootstrap_token).json(req).send().await;
        json(url, resp).await
    }

    /// One heartbeat with the node token.
    pub async fn heartbeat(&self, token: &str) -> Result<HeartbeatResponse, Error> {
        let url = format!("{}/api/v1/heartbeat", self.server);
        let resp = self.http.post(&url).bearer_auth(token).send().await;
        json(url, resp).await
    }

    /// Leaves the cluster: the server removes the node and releases its lease.
    pub async fn leave(&self, token: &str) -> Result<(), Error> {
        let url = format!("{}/api/v1/leave", self.server);
        let resp = self.http.post(&url).bearer_auth(token).timeout(Duration::from_secs(3)).send().await;
        json::<serde_json::Value>(url, resp).await.map(drop)
    }

    /// The peers watch: answers once the registry's revision passes
    /// `revision`, or after `wait` with the peers as they are.
    pub async fn peers(&self, revision: u64, wait: Duration, token: &str) -> Result<Peers, Error> {
        let url = format!("{}/api/v1/peers?revision={revision}&timeout={}", self.server, wait.as_secs());
        let resp = self.http.get(&url).bearer_auth(token).timeout(wait + Duration::from_secs(10)).send().await;
        json(url, resp).await
    }

    /// Registers, retrying with backoff until the server accepts; then
    /// heartbeats forever, registering again when the server forgets the
    /// node. Every registration is sent on `publish`.
    pub async fn run(&self, gather: impl Fn() -> RegisterRequest, publish: &watch::Sender<Option<Registered>>) -> ! {
        loop {
            let registered = self.register_with_backoff(&gather).await;
            let token = registered.token;
            publish.send_replace(Some(Registered { name: registered.name.clone(), token: token.clone(), lease: registered.lease.clone() }));
            let mut interval = Duration::from_secs(registered.heartbeat_interval_secs.max(1));
            loop {
                tokio::time::sleep(interval).await;
                match self.heartbeat(&token).await {
                    Ok(hb) => interval = Duration::from_secs(hb.heartbeat_interval_secs.max(1)),
                    Err(Error::Status { status, .. }) if status == reqwest::StatusCode::UNAUTHORIZED => {
                        warn!("control plane no longer knows this node; registering again");
                        break;
                    }
                    Err(e) => warn!("heartbeat: {}", chain(&e)),
                }
            }
        }
    }

    async fn register_with_backoff(&self, gather: &impl Fn() -> RegisterRequest) -> RegisterResponse {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1u32;
        loop {
            let req = gather();
            match self.register(&req).await {
                Ok(resp) => {
                    info!(
                        "registered with {} as node {} (machine-id {}, macs {}, image {}, lease {})",
                        self.server,
                        resp.name,
                        req.machine_id,
                        req.macs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                        if req.image_digest.is_empty() { "unknown" } else { &req.image_digest },
                        resp.lease.as_ref().map_or_else(|| "none".to_string(), |l| format!("{} vni {}", l.subnet, l.vni)),
                    );
                    return resp;
                }
                Err(e) => {
                    warn!("registering (attempt {attempt}, next in {delay:?}): {}", chain(&e));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                    attempt += 1;
                }
            }
        }
    }
}

async fn json<T: serde::de::DeserializeOwned>(url: String, resp: Result<reqwest::Response, reqwest::Error>) -> Result<T, Error> {
    let resp = resp.map_err(|source| Error::Transport { url: url.clone(), source })?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return Err(Error::Status { url, status, body: body.trim().to_string() });
    }
    resp.json::<T>().await.map_err(|source| Error::Transport { url, source })
}

/// An error and its causes on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}
