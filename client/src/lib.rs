//! kiln-client: the one typed client of kiln's HTTP API.
//!
//! The agent (registration, heartbeats, the peers watch, leaving), the
//! `kiln` CLI (`kiln nodes`, `kiln pools`, `kiln scale`) and the end-to-end
//! tests all talk to the control plane through [`Client`]: one method per
//! route of `kiln_control::api`, requests and answers typed with
//! [`kiln_core`]'s wire types, and one [`Error`] that says which route and
//! URL failed, keeps reqwest's cause chain as its `source`, and carries the
//! HTTP status and the server's own words for an answer that is not 2xx.
//!
//! A client is built from the API's base URL, an optional CA (PEM) and an
//! optional bearer token ([`Client::builder`]). For `https://` the CA's
//! certificates are the only ones trusted: the control plane's own CA, not
//! the web's. [`Client::with_token`] gives the same connection pool with
//! another token (an agent registers with a join token, then, over plain
//! HTTP, heartbeats with its node token).
//!
//! [`metrics::Scraper`] reads a node's `/metrics` (`http://HOST:PORT/metrics`,
//! with a timeout): the control plane's autoscaler uses it to read its pools'
//! nodes.
//!
//! What it does not own: the routes themselves and what they answer
//! (kiln-control's `api`), the wire types (kiln-core), retry policies (the
//! caller's: the agent backs off, the CLI fails at once). The pxe
//! catalog's `Profile` and `Group` live in kiln-pxe, which this crate does
//! not depend on: [`Client::profiles`] and [`Client::groups`] answer JSON.
//!
//! To add a route: one method here that names the route in its
//! [`Error`]s (`"METHOD /path"`) and reads the answer as JSON or text.
//!
//! Owns every HTTP request kiln makes; serves nothing and holds no state.

pub mod metrics;

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use kiln_core::{HeartbeatResponse, Node, Peers, PoolStatus, RegisterRequest, RegisterResponse, ScaleRequest, SdTargetGroup};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;

pub use reqwest::StatusCode;

/// Talking to the API failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The base URL does not parse.
    #[error("API URL {url:?}")]
    BaseUrl {
        /// The URL given.
        url: String,
        /// Why it does not parse.
        #[source]
        source: url::ParseError,
    },
    /// The base URL names no host.
    #[error("API URL {url:?} has no host")]
    NoHost {
        /// The URL given.
        url: String,
    },
    /// The CA certificates do not parse.
    #[error("CA certificates (PEM) for {url}")]
    Ca {
        /// The API's base URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The client certificate and key do not parse.
    #[error("client certificate and key (PEM) for {url}")]
    Identity {
        /// The API's base URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The HTTP client could not be made (TLS backend).
    #[error("HTTP client for {url}")]
    Build {
        /// The API's base URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// No answer: connection refused, TLS refused, timeout, ...
    #[error("{route}: {url}")]
    Transport {
        /// The route, `METHOD /path`.
        route: &'static str,
        /// The URL asked.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("{route}: {url}: {status}: {message}")]
    Status {
        /// The route, `METHOD /path`.
        route: &'static str,
        /// The URL asked.
        url: String,
        /// The HTTP status.
        status: StatusCode,
        /// The server's explanation (its `{"error": ...}`, or the body's text).
        message: String,
    },
    /// A 2xx answer whose body could not be read or is not what the route answers.
    #[error("{route}: {url}: reading the answer")]
    Answer {
        /// The route, `METHOD /path`.
        route: &'static str,
        /// The URL asked.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// A streamed answer went wrong: a line that does not parse or is too
    /// long, the stream cut in a line, or silent for too long.
    #[error("{route}: {url}: {reason}")]
    Stream {
        /// The route, `METHOD /path`.
        route: &'static str,
        /// The URL asked.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

impl Error {
    /// The HTTP status of an answer that was not 2xx.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An error and its causes on one line, `a: b: c`: how the agent and the
/// tests log an [`Error`] (or any error) without losing its chain.
pub use kiln_core::error_chain as chain;

/// How a [`Client`] is made: [`Client::builder`].
#[derive(Debug, Clone)]
pub struct Builder {
    base: String,
    ca_pem: Option<Vec<u8>>,
    identity_pem: Option<Vec<u8>>,
    token: Option<String>,
    timeout: Duration,
    connect_timeout: Duration,
    host: Option<String>,
    user_agent: String,
    no_proxy: bool,
    fresh_connections: bool,
}

impl Builder {
    /// The CA certificates (PEM) trusted for an `https://` API, and no
    /// others; `None` trusts none (plain HTTP only).
    pub fn ca_pem(mut self, pem: Option<&[u8]>) -> Self {
        self.ca_pem = pem.map(<[u8]>::to_vec);
        self
    }

    /// The client certificate presented over TLS, with its key: PEM, the
    /// certificate first (an operator's `STATE/admin.pem` and
    /// `admin-key.pem`, or a node's).
    pub fn identity_pem(mut self, cert_and_key: Option<&[u8]>) -> Self {
        self.identity_pem = cert_and_key.map(<[u8]>::to_vec);
        self
    }

    /// The bearer token sent with every request.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    /// The limit of a whole request (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The limit of connecting (default 3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The `Host` header sent, as the machine that boots sees the server
    /// (say, QEMU user networking's `10.0.2.2:PORT`); the boot routes build
    /// their URLs from it.
    pub fn host(mut self, host: &str) -> Self {
        self.host = Some(host.to_string());
        self
    }

    /// The `User-Agent` (default `kiln-client/VERSION`).
    pub fn user_agent(mut self, agent: &str) -> Self {
        self.user_agent = agent.to_string();
        self
    }

    /// Ignores `HTTP_PROXY` and friends: every request goes straight to the server.
    pub fn no_proxy(mut self) -> Self {
        self.no_proxy = true;
        self
    }

    /// Keeps no idle connection: every request opens its own, as requests
    /// from many separate agents do (load tests).
    pub fn fresh_connections(mut self) -> Self {
        self.fresh_connections = true;
        self
    }

    /// The client.
    pub fn build(self) -> Result<Client, Error> {
        let base = self.base.trim_end_matches('/').to_string();
        let parsed = url::Url::parse(&base).map_err(|source| Error::BaseUrl { url: base.clone(), source })?;
        let authority = authority(&parsed).ok_or_else(|| Error::NoHost { url: base.clone() })?;
        let roots = match &self.ca_pem {
            Some(pem) => reqwest::Certificate::from_pem_bundle(pem).map_err(|source| Error::Ca { url: base.clone(), source })?,
            None => Vec::new(),
        };
        let mut http = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.connect_timeout)
            .user_agent(self.user_agent)
            .tls_certs_only(roots);
        if let Some(pem) = &self.identity_pem {
            http = http.identity(reqwest::Identity::from_pem(pem).map_err(|source| Error::Identity { url: base.clone(), source })?);
        }
        if self.no_proxy {
            http = http.no_proxy();
        }
        if self.fresh_connections {
            http = http.pool_max_idle_per_host(0);
        }
        let http = http.build().map_err(|source| Error::Build { url: base.clone(), source })?;
        Ok(Client { http, base, authority, token: self.token, host: self.host, timeout: None, watch: Arc::default() })
    }
}

/// `host:port` of a URL, IPv6 hosts in brackets, the scheme's port by default.
fn authority(url: &url::Url) -> Option<String> {
    let port = url.port_or_known_default().unwrap_or(80);
    Some(match url.host()? {
        url::Host::Ipv6(ip) => format!("[{ip}]:{port}"),
        host => format!("{host}:{port}"),
    })
}

/// A client of one kiln API.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// The base URL, without a trailing `/`.
    base: String,
    /// Its `host:port`.
    authority: String,
    token: Option<String>,
    host: Option<String>,
    /// A limit for this handle's requests, instead of the builder's.
    timeout: Option<Duration>,
    /// The last peers watch this client (or a clone) opened on a switched
    /// connection, while it is open: [`Client::heartbeat`] goes there.
    watch: Arc<Mutex<Option<Weak<WatchLink>>>>,
}

impl Client {
    /// A builder for the API at `base` (`https://10.0.2.2:8443`).
    pub fn builder(base: &str) -> Builder {
        Builder {
            base: base.to_string(),
            ca_pem: None,
            identity_pem: None,
            token: None,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            host: None,
            user_agent: concat!("kiln-client/", env!("CARGO_PKG_VERSION")).to_string(),
            no_proxy: false,
            fresh_connections: false,
        }
    }

    /// The same client (and connection pool) sending `token` instead.
    pub fn with_token(&self, token: &str) -> Client {
        Client { token: Some(token.to_string()), watch: Arc::default(), ..self.clone() }
    }

    /// The same client with `timeout` for each of its requests.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client { timeout: Some(timeout), ..self.clone() }
    }

    /// The base URL, without a trailing `/`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The server's `host:port` (`https://kiln.lan/` → `kiln.lan:443`,
    /// `http://[::1]:9` → `[::1]:9`).
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// `POST /api/v1/register` with the client's join token, if any; a
    /// machine with none is answered 202 and [`RegisterResponse::pending`].
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, Error> {
        let (url, builder) = self.request(Method::POST, "/api/v1/register");
        json("POST /api/v1/register", url, builder.json(req)).await
    }

    /// The node's heartbeat: on its open peers watch when the server
    /// switched it to [`kiln_core::PEERS_PROTOCOL`] (no new request), else, or when
    /// the watch gives no answer, `POST /api/v1/heartbeat` as the client
    /// (its certificate or node token).
    pub async fn heartbeat(&self) -> Result<HeartbeatResponse, Error> {
        let link = self.watch.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(Weak::upgrade);
        if let Some(link) = link
            && let Ok(beat) = link.heartbeat().await
        {
            let url = format!("{}/api/v1/peers?watch=true", self.base);
            return match (beat.status, beat.answer) {
                (200, Some(answer)) => Ok(answer),
                (status, _) => Err(Error::Status {
                    route: WATCH_HEARTBEAT_ROUTE,
                    url,
                    status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    message: beat.error.unwrap_or_default(),
                }),
            };
        }
        let (url, builder) = self.request(Method::POST, "/api/v1/heartbeat");
        json("POST /api/v1/heartbeat", url, builder).await
    }

    /// `POST /api/v1/nodes/NAME/heartbeat`: the token must be that node's.
    pub async fn heartbeat_node(&self, name: &str) -> Result<HeartbeatResponse, Error> {
        let (url, builder) = self.request(Method::POST, &format!("/api/v1/nodes/{name}/heartbeat"));
        json("POST /api/v1/nodes/NAME/heartbeat", url, builder).await
    }

    /// `POST /api/v1/nodes/NAME/renew` (the node's certificate): a new
    /// certificate for the key of `csr`.
    pub async fn renew(&self, name: &str, csr: &str) -> Result<kiln_core::NodeCertificate, Error> {
        let (url, builder) = self.request(Method::POST, &format!("/api/v1/nodes/{name}/renew"));
        json("POST /api/v1/nodes/NAME/renew", url, builder.json(&kiln_core::RenewRequest { csr: csr.to_string() })).await
    }

    /// `DELETE /api/v1/nodes/NAME` (an operator): removes the node, freeing
    /// its machine id.
    pub async fn delete_node(&self, name: &str) -> Result<Node, Error> {
        let (url, builder) = self.request(Method::DELETE, &format!("/api/v1/nodes/{name}"));
        json("DELETE /api/v1/nodes/NAME", url, builder).await
    }

    /// `POST /api/v1/nodes/NAME/approve` (operator): the pending node may
    /// join; answers the node.
    pub async fn approve_node(&self, name: &str) -> Result<Node, Error> {
        let (url, builder) = self.request(Method::POST, &format!("/api/v1/nodes/{name}/approve"));
        json("POST /api/v1/nodes/NAME/approve", url, builder).await
    }

    /// `POST /api/v1/leave`: the server removes the token's node and
    /// releases its lease; answers the node as it was.
    pub async fn leave(&self) -> Result<Node, Error> {
        let (url, builder) = self.request(Method::POST, "/api/v1/leave");
        json("POST /api/v1/leave", url, builder).await
    }

    /// `POST /api/v1/nodes/NAME/leave`: the token must be that node's.
    pub async fn leave_node(&self, name: &str) -> Result<Node, Error> {
        let (url, builder) = self.request(Method::POST, &format!("/api/v1/nodes/{name}/leave"));
        json("POST /api/v1/nodes/NAME/leave", url, builder).await
    }

    /// `GET /api/v1/peers?revision=N&epoch=E&timeout=S`, the peers watch
    /// (a node's call): answers once the registry's revision passes
    /// `revision`, or after `wait`. With `since` (the epoch and revision of
    /// the last answer) the answer is the changes since then, unless the
    /// server sends the whole list ([`Peers::delta`]); without, the whole
    /// list. The request's limit is `wait` plus 10 s.
    pub async fn peers(&self, since: Option<(u64, u64)>, wait: Duration) -> Result<Peers, Error> {
        let path = match since {
            Some((epoch, revision)) => format!("/api/v1/peers?revision={revision}&epoch={epoch}&timeout={}", wait.as_secs()),
            None => format!("/api/v1/peers?revision=0&timeout={}", wait.as_secs()),
        };
        let (url, builder) = self.request(Method::GET, &path);
        json("GET /api/v1/peers", url, builder.timeout(wait + Duration::from_secs(10))).await
    }

    /// `GET /api/v1/peers?watch=true&revision=N&epoch=E&timeout=S`, the
    /// peers watch as a stream lasting `lasting`: [`PeersStream::next`]
    /// gives its answers, the first at once (the changes since `since`,
    /// else the whole list), then one for each change. It asks to switch
    /// the connection to `kiln-peers` (`Upgrade`), so the lines come on
    /// the bare connection and the server keeps no HTTP state for it; a
    /// server that does not switch streams them in its answer's body.
    pub async fn watch_peers(&self, since: Option<(u64, u64)>, lasting: Duration) -> Result<PeersStream, Error> {
        let (revision, epoch) = match since {
            Some((epoch, revision)) => (revision, format!("&epoch={epoch}")),
            None => (0, String::new()),
        };
        let path = format!("/api/v1/peers?watch=true&revision={revision}{epoch}&timeout={}", lasting.as_secs());
        let (url, builder) = self.request(Method::GET, &path);
        let builder = builder
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, kiln_core::PEERS_PROTOCOL)
            .timeout(lasting + PeersStream::SILENCE);
        let resp = builder.send().await.map_err(|source| Error::Transport { route: WATCH_ROUTE, url: url.clone(), source })?;
        let from = if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let io = resp.upgrade().await.map_err(|source| Error::Transport { route: WATCH_ROUTE, url: url.clone(), source })?;
            let (read, write) = tokio::io::split(io);
            let link = Arc::new(WatchLink { write: tokio::sync::Mutex::new(write), answer: Mutex::default() });
            let (tx, lines) = tokio::sync::mpsc::channel(4);
            let task = tokio::spawn(read_switched(read, tx, Arc::downgrade(&link)));
            *self.watch.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(&link));
            Lines::Switched { lines, _reader: Reader { task, link } }
        } else {
            Lines::Body(checked(WATCH_ROUTE, &url, resp).await?)
        };
        Ok(PeersStream { from, url, buf: Vec::new(), scanned: 0, last_line: 0 })
    }

    /// `GET /api/v1/nodes`: every registered node.
    pub async fn nodes(&self) -> Result<Vec<Node>, Error> {
        let (url, builder) = self.request(Method::GET, "/api/v1/nodes");
        json("GET /api/v1/nodes", url, builder).await
    }

    /// `GET /api/v1/sd`: Prometheus HTTP service discovery, a target group per node.
    pub async fn sd(&self) -> Result<Vec<SdTargetGroup>, Error> {
        let (url, builder) = self.request(Method::GET, "/api/v1/sd");
        json("GET /api/v1/sd", url, builder).await
    }

    /// `GET /api/v1/pools`: each pool's status (none without `--pools`).
    pub async fn pools(&self) -> Result<Vec<PoolStatus>, Error> {
        let (url, builder) = self.request(Method::GET, "/api/v1/pools");
        json("GET /api/v1/pools", url, builder).await
    }

    /// `POST /api/v1/pools/NAME/scale` (an operator): sets the pool's
    /// desired replicas; answers its status.
    pub async fn scale(&self, pool: &str, replicas: u32) -> Result<Option<PoolStatus>, Error> {
        let (url, builder) = self.request(Method::POST, &format!("/api/v1/pools/{pool}/scale"));
        json("POST /api/v1/pools/NAME/scale", url, builder.json(&ScaleRequest { replicas })).await
    }

    /// `POST /api/v1/pools/NAME/rollout` (an operator): pauses, resumes or
    /// undoes the pool's rollout; answers its status.
    pub async fn rollout(&self, pool: &str, action: kiln_core::pool::RolloutAction) -> Result<PoolStatus, Error> {
        let (url, builder) = self.request(Method::POST, &format!("/api/v1/pools/{pool}/rollout"));
        json("POST /api/v1/pools/NAME/rollout", url, builder.json(&kiln_core::pool::RolloutRequest { action })).await
    }

    /// `POST /api/v1/tokens` (an operator): a join token; its secret is in
    /// the answer only.
    pub async fn create_token(&self, req: &kiln_core::CreateTokenRequest) -> Result<kiln_core::CreateTokenResponse, Error> {
        let (url, builder) = self.request(Method::POST, "/api/v1/tokens");
        json("POST /api/v1/tokens", url, builder.json(req)).await
    }

    /// `POST /api/v1/checks` (an operator): starts a connectivity check of
    /// every Ready node holding a lease; answers it as it starts.
    pub async fn start_check(&self) -> Result<kiln_core::CheckResult, Error> {
        let (url, builder) = self.request(Method::POST, "/api/v1/checks");
        json("POST /api/v1/checks", url, builder).await
    }

    /// `GET /api/v1/checks/ID` (an operator): the check, running or done.
    pub async fn check(&self, id: &str) -> Result<kiln_core::CheckResult, Error> {
        let (url, builder) = self.request(Method::GET, &format!("/api/v1/checks/{id}"));
        json("GET /api/v1/checks/ID", url, builder).await
    }

    /// `POST /api/v1/checks/ID/ready` (a node of the check): its test pod.
    pub async fn check_ready(&self, id: &str, ready: &kiln_core::PodReady) -> Result<(), Error> {
        let (url, builder) = self.request(Method::POST, &format!("/api/v1/checks/{id}/ready"));
        send("POST /api/v1/checks/ID/ready", &url, builder.json(ready)).await.map(drop)
    }

    /// `POST /api/v1/checks/ID/report` (a node of the check): what its
    /// receivers got.
    pub async fn check_report(&self, id: &str, report: &kiln_core::CheckReport) -> Result<(), Error> {
        let (url, builder) = self.request(Method::POST, &format!("/api/v1/checks/{id}/report"));
        send("POST /api/v1/checks/ID/report", &url, builder.json(report)).await.map(drop)
    }

    /// `GET /api/v1/tokens` (an operator): every join token, without secrets.
    pub async fn tokens(&self) -> Result<Vec<kiln_core::JoinTokenInfo>, Error> {
        let (url, builder) = self.request(Method::GET, "/api/v1/tokens");
        json("GET /api/v1/tokens", url, builder).await
    }

    /// `DELETE /api/v1/tokens/ID` (an operator): revokes a join token.
    pub async fn delete_token(&self, id: &str) -> Result<serde_json::Value, Error> {
        let (url, builder) = self.request(Method::DELETE, &format!("/api/v1/tokens/{id}"));
        json("DELETE /api/v1/tokens/ID", url, builder).await
    }

    /// `GET /api/v1/profiles`: the loaded profiles (kiln-pxe's `Profile`, as JSON).
    pub async fn profiles(&self) -> Result<Vec<serde_json::Value>, Error> {
        let (url, builder) = self.request(Method::GET, "/api/v1/profiles");
        json("GET /api/v1/profiles", url, builder).await
    }

    /// `GET /api/v1/groups`: the loaded groups (kiln-pxe's `Group`, as JSON).
    pub async fn groups(&self) -> Result<Vec<serde_json::Value>, Error> {
        let (url, builder) = self.request(Method::GET, "/api/v1/groups");
        json("GET /api/v1/groups", url, builder).await
    }

    /// `GET /boot.ipxe`: the iPXE bootstrap script.
    pub async fn boot_ipxe(&self) -> Result<String, Error> {
        let (url, builder) = self.request(Method::GET, "/boot.ipxe");
        text("GET /boot.ipxe", url, builder).await
    }

    /// `GET /ipxe?QUERY` (`mac`, `uuid`, `arch`, ...): the machine's boot script.
    pub async fn ipxe(&self, query: &[(&str, &str)]) -> Result<String, Error> {
        let url = format!("{}/ipxe", self.base);
        let url = url::Url::parse_with_params(&url, query).map_err(|source| Error::BaseUrl { url, source })?.to_string();
        let builder = self.request_url(Method::GET, &url);
        text("GET /ipxe", url, builder).await
    }

    /// `GET /cloud-init/MAC/FILE`: one file of the machine's NoCloud seed
    /// (`meta-data`, `user-data`, `network-config`, `vendor-data`).
    pub async fn seed_file(&self, mac: &str, file: &str) -> Result<String, Error> {
        let (url, builder) = self.request(Method::GET, &format!("/cloud-init/{mac}/{file}"));
        text("GET /cloud-init/MAC/FILE", url, builder).await
    }

    /// A request to `path` (with its query), with the token, `Host` and
    /// timeout of this client; and its URL.
    fn request(&self, method: Method, path: &str) -> (String, RequestBuilder) {
        let url = format!("{}{path}", self.base);
        let builder = self.request_url(method, &url);
        (url, builder)
    }

    /// A request to `url` with the token, `Host` and timeout of this client.
    fn request_url(&self, method: Method, url: &str) -> RequestBuilder {
        let builder = self.http.request(method, url).headers(self.headers());
        match self.timeout {
            Some(t) => builder.timeout(t),
            None => builder,
        }
    }

    /// The headers every request carries: the bearer token and `Host`.
    fn headers(&self) -> reqwest::header::HeaderMap {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = &self.token
            && let Ok(value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        {
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        if let Some(host) = &self.host
            && let Ok(value) = reqwest::header::HeaderValue::from_str(host)
        {
            headers.insert(reqwest::header::HOST, value);
        }
        headers
    }
}

/// The route of [`Client::watch_peers`], in its errors.
const WATCH_ROUTE: &str = "GET /api/v1/peers?watch=true";

/// The route of a heartbeat sent on a switched peers watch, in its errors.
const WATCH_HEARTBEAT_ROUTE: &str = "heartbeat on GET /api/v1/peers?watch=true";

/// Where a peers watch's lines come from.
#[derive(Debug)]
enum Lines {
    /// The connection switched to [`kiln_core::PEERS_PROTOCOL`]: its peers lines, as
    /// the reader task splits them from the heartbeats' answers.
    Switched { lines: tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>>, _reader: Reader },
    /// An answer's body (a server that does not switch).
    Body(Response),
}

/// The task reading a switched watch, and its link: when the watch is
/// dropped the task stops and the link closes (a heartbeat waiting on it
/// fails at once, and goes as a request).
#[derive(Debug)]
struct Reader {
    task: tokio::task::JoinHandle<()>,
    link: Arc<WatchLink>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
        self.link.close();
    }
}

/// The sending side of a switched peers watch, and the heartbeat waiting
/// for its answer (one at a time).
#[derive(Debug)]
struct WatchLink {
    write: tokio::sync::Mutex<tokio::io::WriteHalf<reqwest::Upgraded>>,
    /// The heartbeat waiting, or `Closed`: the watch ended, or a heartbeat
    /// on it failed or was given up, so heartbeats go as requests until
    /// the next watch.
    answer: Mutex<Waiting>,
}

#[derive(Debug, Default)]
enum Waiting {
    #[default]
    Nobody,
    Beat(tokio::sync::oneshot::Sender<Vec<u8>>),
    Closed,
}

impl WatchLink {
    /// How long a heartbeat on the watch waits for its answer; then the
    /// client asks with a request instead.
    const WAIT: Duration = Duration::from_secs(10);

    async fn heartbeat(&self) -> Result<kiln_core::WatchHeartbeatAnswer, String> {
        use tokio::io::AsyncWriteExt;
        let mut write = self.write.lock().await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut waiting = self.answer.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(*waiting, Waiting::Closed) {
                return Err("the watch ended".into());
            }
            *waiting = Waiting::Beat(tx);
        }
        // Given up half-way (the caller dropped this future), a heartbeat
        // leaves a line cut or an answer to come: the link is closed.
        let mut cut = CloseUnlessDone { link: self, done: false };
        let asked = async {
            write.write_all(kiln_core::WATCH_HEARTBEAT).await.map_err(|e| format!("writing: {e}"))?;
            write.flush().await.map_err(|e| format!("writing: {e}"))?;
            let line = rx.await.map_err(|_| "the watch ended".to_string())?;
            serde_json::from_slice::<kiln_core::WatchHeartbeat>(&line).map(|l| l.heartbeat).map_err(|e| format!("its answer: {e}"))
        };
        let answer = tokio::time::timeout(Self::WAIT, asked).await.map_err(|_| format!("no answer in {} s", Self::WAIT.as_secs()));
        let answer = answer.and_then(|a| a);
        cut.done = answer.is_ok();
        answer
    }

    /// The answer to the heartbeat waiting, if one is. A late answer to a
    /// link already closed leaves it closed.
    fn answered(&self, line: Vec<u8>) {
        let mut waiting = self.answer.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*waiting, Waiting::Beat(_))
            && let Waiting::Beat(tx) = std::mem::take(&mut *waiting)
        {
            let _ = tx.send(line);
        }
    }

    /// No more heartbeats on this watch; the one waiting, if any, fails.
    fn close(&self) {
        *self.answer.lock().unwrap_or_else(|e| e.into_inner()) = Waiting::Closed;
    }
}

/// Closes its link when dropped, unless `done`.
struct CloseUnlessDone<'a> {
    link: &'a WatchLink,
    done: bool,
}

impl Drop for CloseUnlessDone<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.link.close();
        }
    }
}

/// Reads a switched watch until it ends: its peers lines to `lines` (then
/// how it ended, if not cleanly), the heartbeats' answers to `link`, which
/// is closed at the end. It goes on reading while the watch's reader is
/// behind (up to [`BEHIND`] lines), so a heartbeat's answer is not held
/// behind unread peers lines.
async fn read_switched(
    read: tokio::io::ReadHalf<reqwest::Upgraded>,
    lines: tokio::sync::mpsc::Sender<Result<Vec<u8>, String>>,
    link: Weak<WatchLink>,
) {
    let mut held = std::collections::VecDeque::new();
    let ended = split_switched(read, &lines, &link, &mut held).await;
    if let Some(link) = link.upgrade() {
        link.close();
    }
    for line in held.into_iter().map(Ok).chain(ended.map(Err)) {
        if lines.send(line).await.is_err() {
            return;
        }
    }
}

/// Peers lines a switched watch's reader task holds for a reader that is
/// behind; past it, it stops reading.
const BEHIND: usize = 64;

/// [`read_switched`]'s loop: `Some` reason when the watch did not end
/// cleanly. Lines not yet handed over are left in `held`.
async fn split_switched(
    mut read: tokio::io::ReadHalf<reqwest::Upgraded>,
    lines: &tokio::sync::mpsc::Sender<Result<Vec<u8>, String>>,
    link: &Weak<WatchLink>,
    held: &mut std::collections::VecDeque<Vec<u8>>,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut scanned = 0;
    loop {
        while let Some(at) = buf[scanned..].iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=scanned + at).collect();
            scanned = 0;
            if line.starts_with(kiln_core::WATCH_HEARTBEAT_PREFIX) {
                if let Some(link) = link.upgrade() {
                    link.answered(line);
                }
            } else {
                held.push_back(line);
            }
        }
        scanned = buf.len();
        if buf.len() > PeersStream::MAX_LINE {
            return Some(format!("a line longer than {} bytes", PeersStream::MAX_LINE));
        }
        buf.reserve(16 * 1024);
        tokio::select! {
            room = lines.reserve(), if !held.is_empty() => match room {
                Ok(room) => room.send(Ok(held.pop_front().expect("a line held"))),
                Err(_) => return None,
            },
            read = read.read_buf(&mut buf), if held.len() < BEHIND => match read {
                Ok(0) if buf.is_empty() => return None,
                Ok(0) => return Some("the stream ended inside a line".to_string()),
                Ok(_) => {}
                Err(e) => return Some(format!("reading: {e}")),
            },
        }
    }
}

/// A streamed peers watch ([`Client::watch_peers`]).
#[derive(Debug)]
pub struct PeersStream {
    from: Lines,
    url: String,
    /// Bytes received and not yet given as an answer.
    buf: Vec<u8>,
    /// How much of `buf` holds no newline.
    scanned: usize,
    /// The bytes of the last answer's line.
    last_line: usize,
}

impl PeersStream {
    /// The server sends a line at least every 30 s: twice that with none
    /// and the stream is dead.
    pub const SILENCE: Duration = Duration::from_secs(60);
    /// The longest line taken: a whole list of 100,000 peers fits.
    pub const MAX_LINE: usize = 64 << 20;

    /// The size of the last answer [`PeersStream::next`] gave, as it came
    /// (its JSON and newline).
    pub fn last_line_bytes(&self) -> usize {
        self.last_line
    }

    /// The server switched the connection to [`kiln_core::PEERS_PROTOCOL`] (else the
    /// lines come in its answer's body).
    pub fn switched(&self) -> bool {
        matches!(self.from, Lines::Switched { .. })
    }

    /// The next answer, or `None` once the server has ended the stream. A
    /// server that does not stream (an older kiln) gives one answer and
    /// ends: a watch that reopens with the last revision is then its long
    /// poll.
    pub async fn next(&mut self) -> Result<Option<Peers>, Error> {
        let fail = |reason: String| Error::Stream { route: WATCH_ROUTE, url: self.url.clone(), reason };
        let silent = || fail(format!("nothing for {} s", Self::SILENCE.as_secs()));
        let resp = match &mut self.from {
            Lines::Switched { lines, .. } => {
                return match tokio::time::timeout(Self::SILENCE, lines.recv()).await.map_err(|_| silent())? {
                    None => Ok(None),
                    Some(Err(reason)) => Err(fail(reason)),
                    Some(Ok(line)) => {
                        self.last_line = line.len();
                        serde_json::from_slice(&line).map(Some).map_err(|e| fail(format!("a line that is not a peers answer: {e}")))
                    }
                };
            }
            Lines::Body(resp) => resp,
        };
        loop {
            if let Some(at) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
                let end = self.scanned + at;
                let peers = serde_json::from_slice(&self.buf[..end]);
                self.buf.drain(..=end);
                self.scanned = 0;
                self.last_line = end + 1;
                return peers.map(Some).map_err(|e| fail(format!("a line that is not a peers answer: {e}")));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > Self::MAX_LINE {
                return Err(fail(format!("a line longer than {} bytes", Self::MAX_LINE)));
            }
            let chunk = tokio::time::timeout(Self::SILENCE, resp.chunk()).await.map_err(|_| silent())?.map_err(|source| Error::Answer {
                route: WATCH_ROUTE,
                url: self.url.clone(),
                source,
            })?;
            match chunk {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None if self.buf.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                // A server from before streams answers once, as a long
                // poll, without a newline: that answer, then the end.
                None => {
                    let last = std::mem::take(&mut self.buf);
                    self.scanned = 0;
                    self.last_line = last.len();
                    let peers = serde_json::from_slice(&last);
                    return peers.map(Some).map_err(|e| fail(format!("the stream ended inside a line: {e}")));
                }
            }
        }
    }
}

/// Sends `builder`; a 2xx answer, or the error naming `route` and `url`.
async fn send(route: &'static str, url: &str, builder: RequestBuilder) -> Result<Response, Error> {
    let resp = builder.send().await.map_err(|source| Error::Transport { route, url: url.to_string(), source })?;
    checked(route, url, resp).await
}

/// `resp` if 2xx, else the error naming `route` and `url`.
async fn checked(route: &'static str, url: &str, resp: Response) -> Result<Response, Error> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.text().await.unwrap_or_default();
    Err(Error::Status { route, url: url.to_string(), status, message: server_message(&body) })
}

/// The server's explanation: `{"error": "..."}`'s text, else the body's.
fn server_message(body: &str) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(e) => e.error,
        Err(_) => body.trim().to_string(),
    }
}

/// Sends `builder` and reads the JSON answer.
async fn json<T: DeserializeOwned>(route: &'static str, url: String, builder: RequestBuilder) -> Result<T, Error> {
    let resp = send(route, &url, builder).await?;
    resp.json::<T>().await.map_err(|source| Error::Answer { route, url, source })
}

/// Sends `builder` and reads the text answer.
async fn text(route: &'static str, url: String, builder: RequestBuilder) -> Result<String, Error> {
    let resp = send(route, &url, builder).await?;
    resp.text().await.map_err(|source| Error::Answer { route, url, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        for (url, want) in [
            ("http://10.0.0.1:8080", "10.0.0.1:8080"),
            ("https://kiln.example/", "kiln.example:443"),
            ("http://kiln.example/api", "kiln.example:80"),
            ("http://[::1]:9/", "[::1]:9"),
        ] {
            assert_eq!(Client::builder(url).build().unwrap().authority(), want, "case {url}");
        }
        for bad in ["not a url", "unix:/run/kiln.sock"] {
            assert!(Client::builder(bad).build().is_err(), "case {bad}");
        }
    }

    #[test]
    fn server_messages() {
        assert_eq!(server_message(r#"{"error": "wrong bootstrap token"}"#), "wrong bootstrap token");
        assert_eq!(server_message("  plain text\n"), "plain text");
    }
}
