//! The HTTP API and the iPXE entry point.
//!
//! | route | auth | answer |
//! |---|---|---|
//! | `POST /api/v1/register` | a join token (`ID.SECRET`: its use spent in the write that records the node; 401 when bad, expired or used up, 403 for another pool or machine), or none (202, pending; or the node's own key registering again) | [`RegisterResponse`] |
//! | `POST /api/v1/heartbeat` | node | [`HeartbeatResponse`] |
//! | `POST /api/v1/nodes/<name>/heartbeat` | that node (another node: 403) | [`HeartbeatResponse`] |
//! | `POST /api/v1/leave`, `/api/v1/nodes/<name>/leave` | that node (another node: 403) | the node, gone; its lease released |
//! | `POST /api/v1/nodes/<name>/renew` | that node's certificate | [`kiln_core::NodeCertificate`] for the same key ([`kiln_core::RenewRequest`]) |
//! | `GET /api/v1/peers?revision=N&epoch=E&timeout=S` | node | long poll: [`kiln_core::Peers`] once the revision passes N: the changes since N under epoch E, else the whole list |
//! | `GET /api/v1/peers?watch=true&revision=N&epoch=E&timeout=S` | node | the same as a stream: one [`kiln_core::Peers`] a line, each the changes since the line before, for S seconds; with `Connection: upgrade` and `Upgrade: kiln-peers`, the lines follow a 101 answer on the bare connection, where the node also heartbeats ([`kiln_core::PEERS_PROTOCOL`]) |
//! | `GET /api/v1/nodes?after=NAME&limit=N` | operator | `[Node]` by name: every node, or `N` after `NAME`; streamed a page at a time |
//! | `GET /api/v1/sd` | operator, or the SD token (`STATE/sd-token`) | Prometheus HTTP service discovery: one target group per node (streamed) |
//! | `GET /api/v1/profiles`, `/api/v1/groups` | operator | the loaded profiles and groups |
//! | `DELETE /api/v1/nodes/<name>` | operator | the node, gone: its machine id free to join again with another key |
//! | `GET /api/v1/pools`, `POST /api/v1/pools/<name>/scale` | operator | the pools; a pool's replicas set |
//! | `POST /api/v1/pools/<name>/rollout` | operator | `{"action": "pause"\|"resume"\|"undo"}`: a pool's rollout paused, resumed, or sent back to the previous generation |
//! | `POST /api/v1/tokens`, `GET /api/v1/tokens`, `DELETE /api/v1/tokens/<id>` | operator | a join token made (its secret shown once), listed (never the secret), deleted |
//! | `GET /boot.ipxe` | — | iPXE bootstrap: chains to `/ipxe` with the machine's attributes |
//! | `GET /ipxe?mac=..&uuid=..&arch=..` | — | the machine's profile as an iPXE script |
//! | `GET /cloud-init/<mac>/<file>` | — | the machine's NoCloud seed (`meta-data`, `user-data`, `network-config`, `vendor-data`) |
//! | `GET /cloud-init/<mac>/<hex>/<file>` | — | the same, for the image generation `hex` (boot scripts name this one) |
//!
//! "operator": a client certificate of the control plane's CA with the
//! operator role ([`crate::operators`]), not revoked: 401 without a client
//! certificate, 403 with a node's or a revoked one. No token opens an
//! operator route (the SD token opens `/api/v1/sd` only). Every operator
//! action that changes something is logged with the operator's name.
//!
//! "node": its client certificate (`O=kiln:nodes`, `CN=kiln:node:NAME`,
//! holding the key it registered with), or, for a node that registered
//! without a CSR (`--plain-http`), its node token.
//!
//! Errors are JSON `{"error": "..."}`: 400 for a body that does not parse
//! (with serde's reason) or a field out of its bounds (naming the field;
//! [`RegisterRequest::validate`]), or a `Host` header that is not a host and
//! port; 401 for a missing or wrong token.

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_core::{HeartbeatResponse, RegisterRequest, RegisterResponse, ScaleRequest, SdTargetGroup};
use kiln_pxe::LiveImages;
use kiln_pxe::ipxe::{BootParams, boot_script, bootstrap_script};
use kiln_pxe::profile::{Catalog, Machine, Profile};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::registry::{Error as RegistryError, HEARTBEAT_INTERVAL_SECS, KeyCheck, Registry, TokenCheck};
use crate::tls::{ClientCert, Role};
use crate::token;

mod checks;

/// Largest registration body accepted.
const MAX_BODY: u64 = 64 * 1024;

/// What the API handlers share.
pub struct Api {
    /// The pools (`--pools`).
    pub pools: Option<kiln_pool::PoolsHandle>,
    /// The registry.
    pub registry: Arc<Registry>,
    /// The images served, replaced when a build adds a generation.
    pub images: Arc<LiveImages>,
    /// Profiles and groups.
    pub catalog: Arc<Catalog>,
    /// Mints the join token an expected machine's script or seed carries.
    pub minter: crate::pools::Minter,
    /// Machines registering with no token join at once (`--auto-approve`).
    pub auto_approve: bool,
    /// Base URL nodes should use; `None` means the request's `Host`.
    pub advertise: Option<String>,
    /// How agents reach the API.
    pub api_endpoint: ApiEndpoint,
    /// The read-only token of `/api/v1/sd` (`STATE/sd-token`).
    pub sd_token: String,
    /// Revoked operator certificates.
    pub revocations: Arc<crate::operators::Revocations>,
    /// Join tokens (`kiln token create`).
    pub tokens: Arc<crate::join_tokens::JoinTokens>,
    /// The CA that signs nodes' certificates.
    pub ca: Arc<crate::tls::Ca>,
    /// How long a node's certificate is valid (`--node-cert-ttl`).
    pub node_cert_ttl: std::time::Duration,
    /// Connectivity checks (`kiln check`).
    pub checks: Arc<crate::checks::Checks>,
}

impl Api {
    /// The operator a verified client certificate names, or why not.
    fn operator(&self, peer: Option<&ClientCert>) -> Result<String, Denied> {
        match peer {
            None => Err(Denied(
                StatusCode::UNAUTHORIZED,
                "needs an operator's client certificate (the kiln CLI presents STATE/admin.pem)".into(),
            )),
            Some(c) if c.subject.role != Role::Operator => {
                tracing::warn!(node = ?c.subject.name, "a node's certificate on an operator route");
                Err(Denied(StatusCode::FORBIDDEN, "a node's certificate is not an operator's".into()))
            }
            Some(c) if self.revocations.is_revoked(&c.serial) => {
                tracing::warn!(operator = ?c.subject.name, serial = %c.serial, "a revoked operator certificate");
                Err(Denied(StatusCode::FORBIDDEN, "this operator certificate is revoked".into()))
            }
            Some(c) => Ok(c.subject.name.clone()),
        }
    }

    /// `answer()` for an operator; the 401/403 answer for anyone else.
    fn for_operator(&self, peer: Option<&ClientCert>, answer: impl FnOnce() -> Response) -> Response {
        match self.operator(peer) {
            Ok(_) => answer(),
            Err(denied) => denied.into_response(),
        }
    }
}

/// A request refused: 401 or 403 for its credential (500 when the CA
/// fails), and why.
struct Denied(StatusCode, String);

/// A 503: the registry's store could not record `what`.
fn store_failed(e: &crate::store::Error, what: &str) -> Denied {
    tracing::error!("registry store: {}", kiln_core::error_chain(e));
    Denied(StatusCode::SERVICE_UNAVAILABLE, format!("the registry could not record the {what}; retry"))
}

impl Denied {
    fn into_response(self) -> Response {
        error(self.0, &self.1)
    }
}

/// The TLS client certificate the connection presented, verified.
fn peer() -> impl Filter<Extract = (Option<Arc<ClientCert>>,), Error = std::convert::Infallible> + Clone {
    warp::ext::optional::<Arc<ClientCert>>()
}

/// How agents reach the API: over TLS on its own port, or on the boot
/// assets' plain-HTTP listener (`--plain-http`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiEndpoint {
    /// The same base URL as the boot assets.
    Plain,
    /// `https://` on this port of the host nodes reach the boot assets at,
    /// or this exact URL when given (`--advertise-api`).
    Tls {
        /// The API's port.
        port: u16,
        /// The API's URL as nodes reach it, when it cannot be derived.
        advertise: Option<String>,
    },
}

/// Every route, on one listener (the unit tests).
pub fn routes(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    let r = RouteSets::new(&api);
    r.nodes.or(r.operator).unify().or(r.boot).unify().boxed()
}

/// The routes by who calls them.
pub struct RouteSets {
    /// What nodes call: register, heartbeat, leave, peers (over TLS; also
    /// on plain HTTP with `--plain-http`).
    pub nodes: BoxedFilter<(Response,)>,
    /// What operators call (and Prometheus, for `/api/v1/sd`): only over
    /// TLS, where client certificates are.
    pub operator: BoxedFilter<(Response,)>,
    /// What booting machines fetch (`/boot.ipxe`, `/ipxe`,
    /// `/cloud-init/...`): plain HTTP, as PXE ROMs and iPXE speak no TLS.
    pub boot: BoxedFilter<(Response,)>,
}

impl RouteSets {
    /// The routes of `api`.
    pub fn new(api: &Arc<Api>) -> RouteSets {
        RouteSets {
            nodes: node_routes(api),
            operator: listing_routes(api)
                .or(pool_routes(api))
                .unify()
                .or(token_routes(api))
                .unify()
                .or(checks::operator_routes(api))
                .unify()
                .boxed(),
            boot: boot_routes(api),
        }
    }
}

/// A filter handing every handler the shared [`Api`].
fn with(api: &Arc<Api>) -> impl Filter<Extract = (Arc<Api>,), Error = std::convert::Infallible> + Clone + use<> {
    let api = api.clone();
    warp::any().map(move || api.clone())
}

/// The `Authorization` header, if any.
fn auth() -> impl Filter<Extract = (Option<String>,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
}

/// What nodes call: register, heartbeat, leave, watch peers.
// Boxed in groups: one long chain of `or`s is a type too deep for the
// compiler's recursion limit in release builds.
fn node_routes(api: &Arc<Api>) -> BoxedFilter<(Response,)> {
    let register =
        warp::path!("api" / "v1" / "register")
            .and(warp::post())
            .and(with(api))
            .and(auth())
            .and(warp::body::content_length_limit(MAX_BODY))
            .and(warp::body::bytes())
            .then(|api: Arc<Api>, auth: Option<String>, body: warp::hyper::body::Bytes| async move {
                register(&api, auth.as_deref(), &body).await
            });
    let heartbeat_route = warp::path!("api" / "v1" / "heartbeat")
        .and(warp::post())
        .and(with(api))
        .and(caller())
        .then(|api: Arc<Api>, caller: Caller| async move { heartbeat(&api, &caller, None).await });
    let named_heartbeat = warp::path!("api" / "v1" / "nodes" / String / "heartbeat")
        .and(warp::post())
        .and(with(api))
        .and(caller())
        .then(|name: String, api: Arc<Api>, caller: Caller| async move { heartbeat(&api, &caller, Some(&name)).await });
    let leave_route = warp::path!("api" / "v1" / "leave")
        .and(warp::post())
        .and(with(api))
        .and(caller())
        .then(|api: Arc<Api>, caller: Caller| async move { leave(&api, &caller, None).await });
    let named_leave = warp::path!("api" / "v1" / "nodes" / String / "leave")
        .and(warp::post())
        .and(with(api))
        .and(caller())
        .then(|name: String, api: Arc<Api>, caller: Caller| async move { leave(&api, &caller, Some(&name)).await });
    let renew = warp::path!("api" / "v1" / "nodes" / String / "renew")
        .and(warp::post())
        .and(with(api))
        .and(caller())
        .and(warp::body::content_length_limit(MAX_BODY))
        .and(warp::body::bytes())
        .then(
            |name: String, api: Arc<Api>, caller: Caller, body: warp::hyper::body::Bytes| async move { renew(&api, &caller, &name, &body) },
        );
    let peers = warp::path!("api" / "v1" / "peers")
        .and(warp::get())
        .and(with(api))
        .and(caller())
        .and(warp::query::<PeersQuery>())
        .and(warp::ext::optional::<crate::listen::Upgrade>())
        .and(warp::header::optional::<String>("upgrade"))
        .then(|api: Arc<Api>, caller: Caller, q: PeersQuery, offer: Option<crate::listen::Upgrade>, asked: Option<String>| async move {
            let offer = offer.filter(|_| asked.is_some_and(|p| p.eq_ignore_ascii_case(kiln_core::PEERS_PROTOCOL)));
            peers(&api, caller, q, offer).await
        });
    let own = heartbeat_route.or(named_heartbeat).unify().or(leave_route).unify().or(named_leave).unify().or(renew).unify().boxed();
    register.or(own).unify().or(peers).unify().or(checks::node_routes(api)).unify().boxed()
}

/// A streamed peers watch sends a line at least this often, changes or
/// not: a node that hears nothing for twice as long knows the stream is
/// dead.
pub const WATCH_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);

/// The peers watch, for the cluster's nodes only: a long poll, or with
/// `watch=true` a stream of lines for `timeout` seconds (300 by default,
/// at most an hour), each line the changes since the one before; in an
/// HTTP body, or on the connection itself when it asked for
/// [`kiln_core::PEERS_PROTOCOL`] (`offer`).
async fn peers(api: &Arc<Api>, caller: Caller, q: PeersQuery, offer: Option<crate::listen::Upgrade>) -> Response {
    if let Err(denied) = authorize(api, &caller, None) {
        return denied.into_response();
    }
    let (seen, epoch) = (q.revision.unwrap_or(0), q.epoch);
    let (mut resp, content_type) = if q.watch.unwrap_or(false) {
        let lasting = std::time::Duration::from_secs(q.timeout.unwrap_or(300).min(3600));
        let lines = Lines::new(api.registry.clone(), seen, epoch, lasting);
        if let Some(offer) = offer {
            let api = api.clone();
            offer.accept(Box::new(move |io, stopped| Box::pin(peers_session(api, caller, lines, io, stopped))));
            let mut resp = Response::new(bytes::Bytes::new().into());
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut().insert("connection", warp::http::HeaderValue::from_static("upgrade"));
            resp.headers_mut().insert("upgrade", warp::http::HeaderValue::from_static(kiln_core::PEERS_PROTOCOL));
            return resp;
        }
        (peers_stream(lines), "application/x-ndjson")
    } else {
        let timeout = std::time::Duration::from_secs(q.timeout.unwrap_or(30).min(300));
        (Response::new(api.registry.watch_peers_json(seen, epoch, timeout).await.1.into()), "application/json")
    };
    resp.headers_mut().insert("content-type", warp::http::HeaderValue::from_static(content_type));
    resp
}

/// The lines of one streamed peers watch: the first at once (the changes
/// since `seen` under `epoch`, else the whole list), then one for each
/// change of revision (those that came while the node read the last line
/// come together) or after [`WATCH_KEEPALIVE`] of none, until `lasting`
/// has passed.
struct Lines {
    registry: Arc<Registry>,
    deadline: tokio::time::Instant,
    seen: u64,
    epoch: Option<u64>,
    /// When the next line is due, changes or not.
    due: tokio::time::Instant,
    first: bool,
    over: bool,
}

impl Lines {
    fn new(registry: Arc<Registry>, seen: u64, epoch: Option<u64>, lasting: std::time::Duration) -> Lines {
        let now = tokio::time::Instant::now();
        Lines { registry, deadline: now + lasting, seen, epoch, due: now, first: true, over: false }
    }

    /// The next line, or `None` once the watch has lasted its time.
    /// Cancel-safe: a line not taken is made again, and when the next one
    /// is due does not move (a heartbeat between two lines of a switched
    /// watch does not put off its keepalive).
    async fn next(&mut self) -> Option<bytes::Bytes> {
        if self.over {
            return None;
        }
        let wait = self.due.saturating_duration_since(tokio::time::Instant::now());
        let (revision, line) = self.registry.watch_peers_json(self.seen, self.epoch, wait).await;
        let now = tokio::time::Instant::now();
        self.over = now >= self.deadline;
        // At its end, the stream says nothing more unless something changed.
        if self.over && !self.first && self.epoch == Some(self.registry.epoch()) && revision == self.seen {
            return None;
        }
        self.first = false;
        (self.seen, self.epoch) = (revision, Some(self.registry.epoch()));
        self.due = self.deadline.min(now + WATCH_KEEPALIVE);
        Some(line)
    }
}

/// A streamed peers watch as an HTTP body. One line waits at most: a node
/// that does not read holds one line, and the listener closes it after
/// its idle time.
fn peers_stream(mut lines: Lines) -> Response {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    tokio::spawn(async move {
        loop {
            let line = tokio::select! {
                line = lines.next() => line,
                () = tx.closed() => return,
            };
            let Some(line) = line else { return };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let lines = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|line| line.map(Ok::<_, std::convert::Infallible>)));
    warp::reply::stream(lines).into_response()
}

/// A peers watch on a connection that switched to [`kiln_core::PEERS_PROTOCOL`]: the
/// lines written as they come; a write the node does not read for the
/// listener's idle time ends it. The node may only heartbeat
/// ([`kiln_core::WATCH_HEARTBEAT`], answered at most once a second: a
/// faster node waits); anything else, a line longer than that, or its
/// close, ends the watch. At its end, or when the server stops, the TLS
/// session is closed (`close_notify`), so the node knows the stream ended
/// and was not cut.
async fn peers_session(api: Arc<Api>, caller: Caller, mut lines: Lines, io: hyper::upgrade::Upgraded, mut stopped: crate::listen::Stopped) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut io = hyper_util::rt::TokioIo::new(io);
    let mut asked = [0u8; 16];
    let mut held = 0;
    let mut last_beat: Option<tokio::time::Instant> = None;
    loop {
        let mut out = Vec::new();
        tokio::select! {
            () = &mut stopped => break,
            line = lines.next() => match line {
                Some(line) => out.push(line),
                None => break,
            },
            read = io.read(&mut asked[held..]) => {
                match read {
                    Ok(n) if n > 0 => held += n,
                    _ => return,
                }
                while let Some(end) = asked[..held].iter().position(|b| *b == b'\n') {
                    if asked[..=end] != *kiln_core::WATCH_HEARTBEAT {
                        return tracing::debug!("peers watch: the node sent something other than a heartbeat");
                    }
                    asked.copy_within(end + 1..held, 0);
                    held -= end + 1;
                    if let Some(at) = last_beat {
                        tokio::time::sleep_until(at + std::time::Duration::from_secs(1)).await;
                    }
                    last_beat = Some(tokio::time::Instant::now());
                    out.push(watch_heartbeat(&api, &caller).await);
                }
                if held == asked.len() {
                    return tracing::debug!("peers watch: a line from the node longer than a heartbeat");
                }
            }
        }
        for line in out {
            if io.write_all(&line).await.is_err() || io.flush().await.is_err() {
                return;
            }
        }
    }
    let _ = io.shutdown().await;
}

/// A heartbeat asked on a peers watch, answered as a line of it.
async fn watch_heartbeat(api: &Api, caller: &Caller) -> bytes::Bytes {
    let heartbeat = match beat(api, caller, None).await {
        Ok(answer) => kiln_core::WatchHeartbeatAnswer { status: 200, answer: Some(answer), error: None },
        Err(Denied(status, error)) => kiln_core::WatchHeartbeatAnswer { status: status.as_u16(), answer: None, error: Some(error) },
    };
    let mut line = serde_json::to_vec(&kiln_core::WatchHeartbeat { heartbeat }).expect("a heartbeat's answer serialises");
    line.push(b'\n');
    line.into()
}

/// What the cluster has: nodes, service discovery, profiles and groups.
/// For operators (service discovery: also for the SD token).
fn listing_routes(api: &Arc<Api>) -> BoxedFilter<(Response,)> {
    let nodes = warp::path!("api" / "v1" / "nodes").and(warp::get()).and(with(api)).and(peer()).and(warp::query::<PageQuery>()).map(
        |api: Arc<Api>, peer: Option<Arc<ClientCert>>, page: PageQuery| {
            api.clone().for_operator(peer.as_deref(), || {
                let hosts = api.pools.as_ref().map(|p| p.hosts_by_node()).unwrap_or_default();
                let targets: BTreeMap<String, kiln_core::Digest> = api
                    .pools
                    .as_ref()
                    .map(|p| p.status().into_iter().filter_map(|s| Some((s.name, s.target?))).collect())
                    .unwrap_or_default();
                let registry = api.registry.clone();
                json_array(JsonPages::new(api, page, move |mut n: kiln_core::Node| {
                    n.host = hosts.get(&n.name).cloned();
                    n.out_of_date =
                        n.pool.as_ref().and_then(|p| targets.get(p)).map(|t| n.image_digest.parse::<kiln_core::Digest>().ok() != Some(*t));
                    n.state = Some(registry.state_of(&n));
                    Some(n)
                }))
            })
        },
    );
    let sd = warp::path!("api" / "v1" / "sd").and(warp::get()).and(with(api)).and(peer()).and(auth()).map(
        |api: Arc<Api>, peer: Option<Arc<ClientCert>>, auth: Option<String>| {
            // Compared by hash: no early exit on the first differing byte.
            let sd_token = token::bearer(auth.as_deref()).is_some_and(|t| token::hash(t) == token::hash(&api.sd_token));
            if !sd_token && let Err(denied) = api.operator(peer.as_deref()) {
                return denied.into_response();
            }
            json_array(JsonPages::new(api, PageQuery::default(), |n: kiln_core::Node| sd_group(&n)))
        },
    );
    let profiles = warp::path!("api" / "v1" / "profiles").and(warp::get()).and(with(api)).and(peer()).map(
        |api: Arc<Api>, peer: Option<Arc<ClientCert>>| {
            api.for_operator(peer.as_deref(), || warp::reply::json(&api.catalog.profiles().collect::<Vec<_>>()).into_response())
        },
    );
    let groups = warp::path!("api" / "v1" / "groups").and(warp::get()).and(with(api)).and(peer()).map(
        |api: Arc<Api>, peer: Option<Arc<ClientCert>>| {
            api.for_operator(peer.as_deref(), || warp::reply::json(&api.catalog.groups().collect::<Vec<_>>()).into_response())
        },
    );
    let delete = warp::path!("api" / "v1" / "nodes" / String).and(warp::delete()).and(with(api)).and(peer()).then(
        |name: String, api: Arc<Api>, peer: Option<Arc<ClientCert>>| async move {
            let operator = match api.operator(peer.as_deref()) {
                Ok(operator) => operator,
                Err(denied) => return denied.into_response(),
            };
            match api.registry.remove(&name).await {
                Ok(Some(node)) => {
                    tracing::info!(operator = ?operator, node = ?node.name, machine_id = ?node.machine_id, "audit: node deleted");
                    warp::reply::json(&node).into_response()
                }
                Ok(None) => error(StatusCode::NOT_FOUND, &format!("no node {name:?}")),
                Err(e) => store_failed(&e, "deletion").into_response(),
            }
        },
    );
    let approve = warp::path!("api" / "v1" / "nodes" / String / "approve").and(warp::post()).and(with(api)).and(peer()).then(
        |name: String, api: Arc<Api>, peer: Option<Arc<ClientCert>>| async move {
            let operator = match api.operator(peer.as_deref()) {
                Ok(operator) => operator,
                Err(denied) => return denied.into_response(),
            };
            match api.registry.approve(&name).await {
                Ok(Some((node, true))) => {
                    tracing::info!(operator = ?operator, node = ?node.name, machine_id = ?node.machine_id, "audit: node approved");
                    warp::reply::json(&node).into_response()
                }
                Ok(Some((node, false))) => warp::reply::json(&node).into_response(),
                Ok(None) => error(StatusCode::NOT_FOUND, &format!("no node {name:?}")),
                Err(e) => store_failed(&e, "approval").into_response(),
            }
        },
    );
    nodes.or(sd).unify().or(profiles).unify().or(groups).unify().or(delete).unify().or(approve).unify().boxed()
}

/// Pools: their state, and scaling them. For operators.
fn pool_routes(api: &Arc<Api>) -> BoxedFilter<(Response,)> {
    let status = warp::path!("api" / "v1" / "pools").and(warp::get()).and(with(api)).and(peer()).map(
        |api: Arc<Api>, peer: Option<Arc<ClientCert>>| {
            api.for_operator(peer.as_deref(), || {
                let status = api.pools.as_ref().map(|p| p.status()).unwrap_or_default();
                warp::reply::json(&status).into_response()
            })
        },
    );
    let scale = warp::path!("api" / "v1" / "pools" / String / "scale")
        .and(warp::post())
        .and(with(api))
        .and(peer())
        .and(warp::body::content_length_limit(MAX_BODY))
        .and(warp::body::bytes())
        .then(|name: String, api: Arc<Api>, peer: Option<Arc<ClientCert>>, body: warp::hyper::body::Bytes| async move {
            match api.operator(peer.as_deref()) {
                Ok(operator) => scale_pool(&api, &name, &operator, &body).await,
                Err(denied) => denied.into_response(),
            }
        });
    let rollout = warp::path!("api" / "v1" / "pools" / String / "rollout")
        .and(warp::post())
        .and(with(api))
        .and(peer())
        .and(warp::body::content_length_limit(MAX_BODY))
        .and(warp::body::bytes())
        .then(|name: String, api: Arc<Api>, peer: Option<Arc<ClientCert>>, body: warp::hyper::body::Bytes| async move {
            match api.operator(peer.as_deref()) {
                Ok(operator) => pool_rollout(&api, &name, &operator, &body).await,
                Err(denied) => denied.into_response(),
            }
        });
    status.or(scale).unify().or(rollout).unify().boxed()
}

/// Join tokens: made, listed and deleted by operators.
fn token_routes(api: &Arc<Api>) -> BoxedFilter<(Response,)> {
    let create = warp::path!("api" / "v1" / "tokens")
        .and(warp::post())
        .and(with(api))
        .and(peer())
        .and(warp::body::content_length_limit(MAX_BODY))
        .and(warp::body::bytes())
        .then(|api: Arc<Api>, peer: Option<Arc<ClientCert>>, body: warp::hyper::body::Bytes| async move {
            match api.operator(peer.as_deref()) {
                Ok(operator) => create_token(&api, &operator, &body).await,
                Err(denied) => denied.into_response(),
            }
        });
    let list = warp::path!("api" / "v1" / "tokens").and(warp::get()).and(with(api)).and(peer()).then(
        |api: Arc<Api>, peer: Option<Arc<ClientCert>>| async move {
            if let Err(denied) = api.operator(peer.as_deref()) {
                return denied.into_response();
            }
            match api.tokens.list().await {
                Ok(list) => warp::reply::json(&list).into_response(),
                Err(e) => token_store_error(&e),
            }
        },
    );
    let delete = warp::path!("api" / "v1" / "tokens" / String).and(warp::delete()).and(with(api)).and(peer()).then(
        |id: String, api: Arc<Api>, peer: Option<Arc<ClientCert>>| async move {
            let operator = match api.operator(peer.as_deref()) {
                Ok(operator) => operator,
                Err(denied) => return denied.into_response(),
            };
            match api.tokens.delete(&id).await {
                Ok(true) => {
                    tracing::info!(operator = ?operator, token = ?id, "audit: join token deleted");
                    warp::reply::json(&serde_json::json!({ "deleted": id })).into_response()
                }
                Ok(false) => error(StatusCode::NOT_FOUND, &format!("no join token {id:?}")),
                Err(e) => token_store_error(&e),
            }
        },
    );
    create.or(list).unify().or(delete).unify().boxed()
}

/// `POST /api/v1/tokens`, for `operator`.
async fn create_token(api: &Api, operator: &str, body: &[u8]) -> Response {
    let req: kiln_core::CreateTokenRequest = match serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(body)) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("token request: field `{}`: {}", e.path(), e.inner())),
    };
    match api.tokens.create(&req, None).await {
        Ok((token, info)) => {
            tracing::info!(
                operator = ?operator,
                token = %info.id,
                uses = ?info.uses_left,
                pool = ?info.pool,
                expires = ?info.expires.map(|t| t.to_string()),
                "audit: join token created"
            );
            warp::reply::json(&kiln_core::CreateTokenResponse { token, info }).into_response()
        }
        Err(crate::join_tokens::Error::Request(e)) => error(StatusCode::BAD_REQUEST, &format!("token request: {e}")),
        Err(e) => token_store_error(&e),
    }
}

/// The answer when the token store failed.
fn token_store_error(e: &crate::join_tokens::Error) -> Response {
    tracing::error!("join tokens: {}", kiln_core::error_chain(e));
    error(StatusCode::SERVICE_UNAVAILABLE, "the join token store failed; retry")
}

/// What booting machines fetch: the iPXE chain and NoCloud seeds.
fn boot_routes(api: &Arc<Api>) -> BoxedFilter<(Response,)> {
    let host = || warp::header::optional::<String>("host");
    let boot =
        warp::path!("boot.ipxe").and(warp::get()).and(with(api)).and(host()).map(|api: Arc<Api>, host: Option<String>| {
            match base_url(&api, host.as_deref()) {
                Ok(base) => ipxe_reply(bootstrap_script(&base)),
                Err(why) => error(StatusCode::BAD_REQUEST, why),
            }
        });
    let ipxe = warp::path!("ipxe").and(warp::get()).and(with(api)).and(host()).and(warp::query::<BTreeMap<String, String>>()).then(
        |api: Arc<Api>, host: Option<String>, query: BTreeMap<String, String>| async move {
            machine_script(&api, host.as_deref(), &query).await
        },
    );
    let seed = warp::path!("cloud-init" / String / String).and(warp::get()).and(with(api)).and(host()).then(
        |mac: String, file: String, api: Arc<Api>, host: Option<String>| async move {
            seed_file(&api, host.as_deref(), &mac, None, &file).await
        },
    );
    // The seed of one generation, as boot scripts name it.
    let pinned_seed = warp::path!("cloud-init" / String / String / String).and(warp::get()).and(with(api)).and(host()).then(
        |mac: String, hex: String, file: String, api: Arc<Api>, host: Option<String>| async move {
            seed_file(&api, host.as_deref(), &mac, Some(&hex), &file).await
        },
    );
    boot.or(ipxe).unify().or(seed).unify().or(pinned_seed).unify().boxed()
}

/// A node's service-discovery group: its metrics target, labelled with its
/// name, pool and image digest.
fn sd_group(node: &kiln_core::Node) -> Option<SdTargetGroup> {
    let target = node.metrics_target()?;
    let labels = [("node", node.name.as_str()), ("pool", node.pool.as_deref().unwrap_or_default()), ("image", node.image_digest.as_str())];
    Some(SdTargetGroup { targets: vec![target], labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() })
}

/// Nodes a listing reads from the registry at a time.
const PAGE: usize = 100;

/// `?after=NAME&limit=N` of a listing: the nodes after `NAME` by name, at
/// most `N`; every node without them.
#[derive(Debug, Default, serde::Deserialize)]
struct PageQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// A JSON array of one item per node, made a [`PAGE`] of nodes at a time
/// as the answer is written: a listing holds a page, never every node.
struct JsonPages<F> {
    api: Arc<Api>,
    /// The last node read.
    after: Option<String>,
    /// Nodes still to read.
    left: usize,
    /// Whether `[` was written.
    started: bool,
    /// Whether an item (and so a comma before the next) was written.
    wrote: bool,
    done: bool,
    item: F,
}

impl<F> JsonPages<F> {
    fn new(api: Arc<Api>, page: PageQuery, item: F) -> Self {
        JsonPages { api, after: page.after, left: page.limit.unwrap_or(usize::MAX), started: false, wrote: false, done: false, item }
    }
}

impl<T: serde::Serialize, F: FnMut(kiln_core::Node) -> Option<T>> Iterator for JsonPages<F> {
    type Item = Result<bytes::Bytes, std::convert::Infallible>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut out = if self.started { Vec::new() } else { b"[".to_vec() };
        self.started = true;
        let want = PAGE.min(self.left);
        let page = self.api.registry.nodes_after(self.after.as_deref(), want);
        self.left -= page.len();
        self.done = page.len() < want || self.left == 0;
        if let Some(last) = page.last() {
            self.after = Some(last.name.clone());
        }
        for item in page.into_iter().filter_map(&mut self.item) {
            if self.wrote {
                out.push(b',');
            }
            serde_json::to_writer(&mut out, &item).expect("nodes serialise");
            self.wrote = true;
        }
        if self.done {
            out.push(b']');
        }
        Some(Ok(out.into()))
    }
}

/// A streamed JSON answer.
fn json_array<T, F>(pages: JsonPages<F>) -> Response
where
    T: serde::Serialize,
    F: FnMut(kiln_core::Node) -> Option<T> + Send + Sync + 'static,
{
    let mut resp = warp::reply::stream(futures_util::stream::iter(pages)).into_response();
    resp.headers_mut().insert("content-type", warp::http::HeaderValue::from_static("application/json"));
    resp
}

/// What vouched for a registration, as the audit log says it.
enum Joining {
    /// A join token, its use spent in the write that records the node.
    Token(crate::store::Spend),
    /// The key of the node that holds the machine id: it registers again.
    OwnKey,
    /// Nothing: the machine waits as pending, or joins with `--auto-approve`.
    Nothing,
}

async fn register(api: &Api, auth: Option<&str>, body: &[u8]) -> Response {
    let presented = token::bearer(auth);
    if presented.is_some_and(|t| kiln_core::JoinSecret::parse(t).is_err()) {
        tracing::warn!("registration refused: a bearer token that is not a join token");
        return error(
            StatusCode::UNAUTHORIZED,
            "not a join token: expected ID.SECRET (kiln token create), or no token to wait for approval",
        );
    }
    let req: RegisterRequest = match serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(body)) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("registration body: field `{}`: {}", e.path(), e.inner())),
    };
    if let Err(e) = req.validate() {
        return error(StatusCode::BAD_REQUEST, &format!("registration body: {e}"));
    }
    let csr = match req.csr.as_deref().map(crate::tls::Csr::parse).transpose() {
        Ok(csr) => csr,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("registration body: csr: {}", kiln_core::error_chain(&e))),
    };
    let key = csr.as_ref().map(crate::tls::Csr::key_sha256);
    // A node registering again proves itself with its key (the CSR is
    // signed with it): the token it booted with is not spent again.
    let joining = match presented {
        _ if api.registry.is_holder(&req.machine_key(), key) => Joining::OwnKey,
        Some(presented) => {
            let pool = api.registry.pool_for(&req.hostname);
            match api.tokens.prepare(presented, pool.as_deref(), &req.macs).await {
                Ok(spend) => Joining::Token(spend),
                Err(refused) => return refused_token(&req, &refused),
            }
        }
        None => Joining::Nothing,
    };
    // A token's use is spent only with the write that records the node.
    record_registration(api, &req, csr.as_ref(), &joining).await
}

/// The answer to a registration whose join token did not admit it.
fn refused_token(req: &RegisterRequest, refused: &crate::join_tokens::Refused) -> Response {
    tracing::warn!(machine_id = ?req.machine_id, "registration refused: {}", kiln_core::error_chain(refused));
    let status = StatusCode::from_u16(refused.status()).unwrap_or(StatusCode::UNAUTHORIZED);
    error(status, &refused.to_string())
}

/// Records a registration that presented a good credential (or none, to
/// wait as pending); with a CSR, the node's key is the machine id's from
/// then on.
async fn record_registration(api: &Api, req: &RegisterRequest, csr: Option<&crate::tls::Csr>, joining: &Joining) -> Response {
    let admission = match joining {
        Joining::Token(spend) => crate::registry::Admission::Spending(spend.clone()),
        Joining::OwnKey | Joining::Nothing => crate::registry::Admission::Unvouched { auto_approve: api.auto_approve },
    };
    match api.registry.register_with(req, csr.map(crate::tls::Csr::key_sha256), admission).await {
        Ok((node, _, _)) if node.pending => {
            // Strings from the network are logged escaped (`?`).
            tracing::info!(
                node = ?node.name,
                machine_id = ?node.machine_id,
                macs = %node.macs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                addresses = %node.addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                "audit: machine pending approval (kiln nodes approve)"
            );
            let answer = RegisterResponse {
                name: node.name,
                token: String::new(),
                heartbeat_interval_secs: crate::registry::PENDING_POLL_SECS,
                lease: None,
                certificate: None,
                pending: true,
            };
            warp::reply::with_status(warp::reply::json(&answer), StatusCode::ACCEPTED).into_response()
        }
        Ok((node, token, lease)) => {
            let certificate = match csr.map(|csr| node_certificate(api, &node.name, csr)).transpose() {
                Ok(made) => made.map(|(certificate, _)| certificate),
                Err(denied) => return denied.into_response(),
            };
            let with = match joining {
                Joining::Token(spend) => format!("join token {}", spend.id),
                Joining::OwnKey => "its own key".to_string(),
                Joining::Nothing => "no token (--auto-approve)".to_string(),
            };
            tracing::info!(
                node = ?node.name,
                with = %with,
                machine_id = ?node.machine_id,
                macs = %node.macs.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                subnet = %node.subnet.map(|s| s.to_string()).unwrap_or_default(),
                image = ?node.image_digest,
                "audit: node registered"
            );
            let answer = RegisterResponse {
                name: node.name,
                token,
                heartbeat_interval_secs: HEARTBEAT_INTERVAL_SECS,
                lease,
                certificate,
                pending: false,
            };
            warp::reply::json(&answer).into_response()
        }
        Err(e @ RegistryError::Exhausted { .. }) => {
            tracing::error!(machine_id = ?req.machine_id, "registration refused: {e}");
            error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
        Err(RegistryError::Refused(refused)) => refused_token(req, &refused),
        Err(e @ RegistryError::TooManyPending(_)) => {
            tracing::warn!(machine_id = ?req.machine_id, "registration refused: {e}");
            error(StatusCode::TOO_MANY_REQUESTS, &e.to_string())
        }
        Err(e @ RegistryError::NoPublicIp(_)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e @ RegistryError::Busy(_)) => error(StatusCode::CONFLICT, &e.to_string()),
        Err(e @ (RegistryError::Held { .. } | RegistryError::PublicIpTaken { .. })) => {
            tracing::warn!(machine_id = ?req.machine_id, "registration refused: {e}");
            error(StatusCode::CONFLICT, &e.to_string())
        }
        Err(RegistryError::Store(e)) => {
            tracing::error!("registry store: {e}: {:?}", std::error::Error::source(&e));
            error(StatusCode::SERVICE_UNAVAILABLE, "the registry could not record the node; retry")
        }
    }
}

/// `?revision=N&epoch=E&timeout=S&watch=true` of the peers watch.
#[derive(Debug, serde::Deserialize)]
struct PeersQuery {
    revision: Option<u64>,
    epoch: Option<u64>,
    watch: Option<bool>,
    timeout: Option<u64>,
}

/// Who calls a node route: the connection's client certificate and the
/// request's `Authorization` header.
struct Caller {
    cert: Option<Arc<ClientCert>>,
    auth: Option<String>,
}

/// The [`Caller`] of a request.
fn caller() -> impl Filter<Extract = (Caller,), Error = Rejection> + Clone {
    peer().and(auth()).map(|cert, auth| Caller { cert, auth })
}

/// The node calling, or the 401/403 answer: by its client certificate
/// (the node it names, holding the key it registered with), else by its
/// node token (only for a node that registered without a key). `claimed`:
/// the node the route names, which must be the caller.
fn authorize(api: &Api, caller: &Caller, claimed: Option<&str>) -> Result<String, Denied> {
    if let Some(cert) = &caller.cert {
        let name = &cert.subject.name;
        if cert.subject.role != Role::Node {
            return Err(Denied(StatusCode::FORBIDDEN, "an operator's certificate is not a node's".into()));
        }
        if claimed.is_some_and(|c| c != name) {
            tracing::warn!(node = ?name, claimed = ?claimed, "a node's certificate used for another node");
            return Err(Denied(StatusCode::FORBIDDEN, format!("this certificate is {name}'s, not {}'s", claimed.unwrap_or_default())));
        }
        return match api.registry.check_key(name, &cert.key_sha256) {
            KeyCheck::Ok => Ok(name.clone()),
            KeyCheck::Unknown => Err(Denied(StatusCode::UNAUTHORIZED, format!("no node {name}; register again"))),
            KeyCheck::OtherKey => {
                Err(Denied(StatusCode::UNAUTHORIZED, format!("node {name} registered since with another key; register again")))
            }
        };
    }
    let presented = token::bearer(caller.auth.as_deref())
        .ok_or_else(|| Denied(StatusCode::UNAUTHORIZED, "needs the node's client certificate (or its node token)".into()))?;
    match api.registry.check_token(presented, claimed) {
        TokenCheck::Ok(name) => Ok(name),
        TokenCheck::Unknown => Err(Denied(StatusCode::UNAUTHORIZED, "unknown node token; register again".into())),
        TokenCheck::OtherNode(owner) => {
            tracing::warn!(owner = ?owner, claimed = ?claimed, "node token used for another node");
            Err(Denied(StatusCode::FORBIDDEN, format!("this token is not {}'s", claimed.unwrap_or_default())))
        }
        TokenCheck::NeedsCertificate(name) => {
            Err(Denied(StatusCode::UNAUTHORIZED, format!("node {name} proves itself with its client certificate, not a token")))
        }
    }
}

async fn leave(api: &Api, caller: &Caller, claimed: Option<&str>) -> Response {
    let name = match authorize(api, caller, claimed) {
        Ok(name) => name,
        Err(denied) => return denied.into_response(),
    };
    match api.registry.remove(&name).await {
        Ok(Some(node)) => {
            tracing::info!(node = ?node.name, subnet = %node.subnet.map(|s| s.to_string()).unwrap_or_default(), "audit: node left");
            warp::reply::json(&node).into_response()
        }
        Ok(None) => error(StatusCode::UNAUTHORIZED, "unknown node; register again"),
        Err(e) => store_failed(&e, "leave").into_response(),
    }
}

async fn heartbeat(api: &Api, caller: &Caller, claimed: Option<&str>) -> Response {
    match beat(api, caller, claimed).await {
        Ok(answer) => warp::reply::json(&answer).into_response(),
        Err(denied) => denied.into_response(),
    }
}

/// A heartbeat of the calling node (`claimed`: the node the route names).
async fn beat(api: &Api, caller: &Caller, claimed: Option<&str>) -> Result<HeartbeatResponse, Denied> {
    let name = authorize(api, caller, claimed)?;
    match api.registry.heartbeat(&name).await {
        Ok(Some(node)) => Ok(HeartbeatResponse { name: node.name, heartbeat_interval_secs: HEARTBEAT_INTERVAL_SECS }),
        Ok(None) => Err(Denied(StatusCode::UNAUTHORIZED, "unknown node; register again".into())),
        Err(e) => Err(store_failed(&e, "heartbeat")),
    }
}

/// A node's certificate for the key of `csr`, named `name`; the 500
/// answer when the CA fails.
fn node_certificate(api: &Api, name: &str, csr: &crate::tls::Csr) -> Result<(kiln_core::NodeCertificate, crate::tls::ClientCert), Denied> {
    let subject = crate::tls::Subject { role: Role::Node, name: name.to_string() };
    match api.ca.sign_csr(csr, &subject, api.node_cert_ttl) {
        Ok((pem, cert)) => Ok((kiln_core::NodeCertificate { pem, valid_secs: api.node_cert_ttl.as_secs() }, cert)),
        Err(e) => {
            tracing::error!("signing a node's certificate: {}", kiln_core::error_chain(&e));
            Err(Denied(StatusCode::INTERNAL_SERVER_ERROR, "the CA could not sign the certificate".into()))
        }
    }
}

/// `POST /api/v1/nodes/NAME/renew`: a new certificate for the node's own
/// key, over mutual TLS with its current one.
fn renew(api: &Api, caller: &Caller, name: &str, body: &[u8]) -> Response {
    if caller.cert.is_none() {
        return error(StatusCode::UNAUTHORIZED, "renewing needs the node's current client certificate");
    }
    if let Err(denied) = authorize(api, caller, Some(name)) {
        return denied.into_response();
    }
    let req: kiln_core::RenewRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("renew body: {e} (expected {{\"csr\": PEM}})")),
    };
    if !kiln_core::node::is_pem(&req.csr, kiln_core::node::limits::CSR) {
        return error(StatusCode::BAD_REQUEST, &kiln_core::node::RegisterError::Csr.to_string());
    }
    let csr = match crate::tls::Csr::parse(&req.csr) {
        Ok(csr) => csr,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("csr: {}", kiln_core::error_chain(&e))),
    };
    if api.registry.check_key(name, csr.key_sha256()) != KeyCheck::Ok {
        return error(StatusCode::FORBIDDEN, "the csr's key is not the one this node registered with");
    }
    let (certificate, cert) = match node_certificate(api, name, &csr) {
        Ok(made) => made,
        Err(denied) => return denied.into_response(),
    };
    tracing::info!(node = ?name, serial = %cert.serial, "node certificate renewed");
    warp::reply::json(&certificate).into_response()
}

/// The server's base URL as the machine reaches it: `--advertise`, else the
/// request's `Host` when it is a host and an optional port
/// ([`kiln_core::node::is_host_port`]); else why not, for a 400. Nothing
/// else from the `Host` header ever reaches a script.
fn base_url(api: &Api, host: Option<&str>) -> Result<String, &'static str> {
    match (&api.advertise, host) {
        (Some(url), _) => Ok(url.trim_end_matches('/').to_string()),
        (None, Some(host)) if kiln_core::node::is_host_port(host, false) => Ok(format!("http://{host}")),
        (None, Some(_)) => {
            Err("the Host header is not a host name or address with an optional port, and the server has no --advertise URL")
        }
        (None, None) => Err("no Host header, and the server has no --advertise URL"),
    }
}

/// The API's URL as the machine's agent reaches it.
fn api_url(endpoint: &ApiEndpoint, base: &str) -> String {
    match endpoint {
        ApiEndpoint::Plain => base.to_string(),
        ApiEndpoint::Tls { advertise: Some(url), .. } => url.trim_end_matches('/').to_string(),
        ApiEndpoint::Tls { port, advertise: None } => {
            let authority = base.split_once("://").map_or(base, |(_, rest)| rest);
            let authority = authority.split('/').next().unwrap_or(authority);
            // `[v6]:port`, `host:port` or `host`.
            let host = match authority.rsplit_once(':') {
                Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && (!h.contains(':') || h.ends_with(']')) => h,
                _ => authority,
            };
            format!("https://{host}:{port}")
        }
    }
}

/// Sets a pool's desired replicas, for `operator`.
async fn scale_pool(api: &Api, name: &str, operator: &str, body: &[u8]) -> Response {
    let req: ScaleRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e} (expected {{\"replicas\": N}})")),
    };
    let Some(pools) = &api.pools else { return error(StatusCode::NOT_FOUND, "this server runs no pools (kiln serve --pools DIR)") };
    match pools.scale(name, req.replicas).await {
        Ok(()) => {
            tracing::info!(operator = ?operator, pool = ?name, replicas = req.replicas, "audit: pool scaled");
            let status = pools.status().into_iter().find(|s| s.name == name);
            warp::reply::json(&status).into_response()
        }
        Err(e @ kiln_pool::ScaleError::NoPool(_)) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e @ kiln_pool::ScaleError::OutOfRange { .. }) => error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
        Err(e) => {
            tracing::error!("scaling {name:?}: {:?}", kiln_core::error_chain(&e));
            error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
    }
}

async fn pool_rollout(api: &Api, name: &str, operator: &str, body: &[u8]) -> Response {
    let req: kiln_core::pool::RolloutRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e} (expected {{\"action\": \"pause\"|\"resume\"|\"undo\"}})")),
    };
    let Some(pools) = &api.pools else { return error(StatusCode::NOT_FOUND, "this server runs no pools (kiln serve --pools DIR)") };
    match pools.rollout(name, req.action).await {
        Ok(status) => {
            tracing::info!(operator = ?operator, pool = ?name, action = ?req.action, "audit: pool rollout");
            warp::reply::json(&status).into_response()
        }
        Err(e @ kiln_pool::RolloutError::NoPool(_)) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e @ (kiln_pool::RolloutError::NothingToUndo { .. } | kiln_pool::RolloutError::NoImage { .. })) => {
            error(StatusCode::CONFLICT, &e.to_string())
        }
        Err(e) => {
            tracing::error!("rollout of {name:?}: {:?}", kiln_core::error_chain(&e));
            error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
    }
}

fn ipxe_reply(script: String) -> Response {
    warp::reply::with_header(script, "content-type", "text/plain; charset=utf-8").into_response()
}

/// What a booting machine boots: its group (or `pool:NAME`), profile and
/// image, and whether kiln expects it.
struct Booting<'a> {
    group: String,
    profile: std::borrow::Cow<'a, Profile>,
    /// The generation it boots: every URL of its script names it.
    image: Arc<kiln_pxe::store::Generation>,
    /// A pool's node, or a MAC a group selects by MAC: its script and seed
    /// carry a join token minted for its MAC. Any other machine gets none
    /// and registers as pending.
    expected: bool,
}

/// The profile and image for `machine`: a pool's node boots its pool's
/// image under its own name, in the generation the pool runs (its
/// rollout's target); any other machine by its group, in the current
/// generation; `generation` (a digest's hex) asks for that one. 404 when no
/// group matches or the generation is not kept, 500 when its profile names
/// an image that is gone.
fn machine_profile<'a>(api: &'a Api, machine: &mut Machine, generation: Option<&str>) -> Result<Booting<'a>, (StatusCode, String)> {
    let member = api.pools.as_ref().zip(machine.mac).and_then(|(pools, mac)| pools.member(mac));
    let mut target = None;
    let group = match member {
        Some((node, pool)) => {
            target = api.pools.as_ref().and_then(|p| p.target(&pool.name));
            machine.hostname = Some(node.domain_name());
            let mut profile =
                crate::pools::node_profile(&api.catalog, pool).map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            // Images without cloud-init name themselves from the command line.
            profile.kernel_args.push(format!("{}={}", kiln_core::CMDLINE_HOSTNAME, node.domain_name()));
            let profile = std::borrow::Cow::Owned(profile);
            (format!("pool:{}", pool.name), profile, true)
        }
        None => {
            let (group, profile) = api.catalog.select(machine).map_err(|e| (StatusCode::NOT_FOUND, e.to_string()))?;
            (group.id.clone(), std::borrow::Cow::Borrowed(profile), group.selector.contains_key("mac"))
        }
    };
    let (group, profile, expected) = (group.0, group.1, group.2);
    let images = api.images.current();
    let served = images.image(&profile.image).ok_or_else(|| {
        (StatusCode::INTERNAL_SERVER_ERROR, format!("profile `{}` names image `{}`, which is gone", profile.id, profile.image))
    })?;
    let image = match (generation, target) {
        (Some(hex), _) => served
            .generation(hex)
            .ok_or_else(|| (StatusCode::NOT_FOUND, format!("image `{}` keeps no generation {hex:?}", profile.image)))?,
        (None, Some(digest)) => served.generation(&digest.hex()).unwrap_or(&served.current),
        (None, None) => &served.current,
    }
    .clone();
    Ok(Booting { group, profile, image, expected })
}

/// The join token for a booting machine: minted for its MAC when kiln
/// expects it, none otherwise; 503 when the token store failed.
async fn boot_token(api: &Api, booting: &Booting<'_>, mac: Option<kiln_core::Mac>) -> Result<Option<String>, Response> {
    let Some(mac) = mac.filter(|_| booting.expected) else { return Ok(None) };
    api.minter.mint(mac).await.map(Some).map_err(|e| {
        tracing::error!(mac = %mac, "minting a join token: {}", kiln_core::error_chain(&e));
        error(StatusCode::SERVICE_UNAVAILABLE, "could not mint this machine's join token; retry")
    })
}

async fn machine_script(api: &Api, host: Option<&str>, query: &BTreeMap<String, String>) -> Response {
    let base = match base_url(api, host) {
        Ok(base) => base,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let mut machine = match Machine::from_query(query) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, &kiln_core::error_chain(&e)),
    };
    if let (Some(pools), Some(mac)) = (&api.pools, machine.mac) {
        pools.observe_for(mac).await;
    }
    let booting = match machine_profile(api, &mut machine, None) {
        Ok(found) => found,
        Err((status, message)) => return error(status, &message),
    };
    let token = match boot_token(api, &booting, machine.mac).await {
        Ok(token) => token,
        Err(answer) => return answer,
    };
    let (group, profile, image) = (&booting.group, &booting.profile, &booting.image.manifest);
    tracing::info!(mac = ?machine.mac.map(|m| m.to_string()), group = %group, profile = %profile.id, image = %image.name, expected = booting.expected, "boot script");
    let api_url = api_url(&api.api_endpoint, &base);
    ipxe_reply(boot_script(
        image,
        &profile.kernel_args,
        machine.mac,
        &BootParams { base_url: &base, token: token.as_deref(), api_url: &api_url },
    ))
}

async fn seed_file(api: &Api, host: Option<&str>, mac: &str, generation: Option<&str>, file: &str) -> Response {
    let base = match base_url(api, host) {
        Ok(base) => base,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let mut machine = match Machine::from_query(&BTreeMap::from([("mac".to_string(), mac.to_string())])) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, &kiln_core::error_chain(&e)),
    };
    if let (Some(pools), Some(mac)) = (&api.pools, machine.mac) {
        pools.observe_for(mac).await;
    }
    let booting = match machine_profile(api, &mut machine, generation) {
        Ok(found) => found,
        Err((status, message)) => return error(status, &message),
    };
    // The same token as the machine's script: minting is by MAC and window.
    let token = match boot_token(api, &booting, machine.mac).await {
        Ok(token) => token,
        Err(answer) => return answer,
    };
    let api_url = api_url(&api.api_endpoint, &base);
    let params = BootParams { base_url: &base, token: token.as_deref(), api_url: &api_url };
    let seed = match api.catalog.seed(&booting.profile, &booting.image.manifest, &machine, &params) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
        }
    };
    match seed.file(file) {
        Some(text) => warp::reply::with_header(text, "content-type", "text/plain; charset=utf-8").into_response(),
        None => error(StatusCode::NOT_FOUND, &format!("no NoCloud file {file:?}: meta-data, user-data, network-config or vendor-data")),
    }
}

/// A JSON error answer: `{"error": "..."}` saying in words what was wrong.
pub fn error(status: StatusCode, message: &str) -> Response {
    warp::reply::with_status(warp::reply::json(&serde_json::json!({ "error": message })), status).into_response()
}

/// Turns warp's rejections into JSON errors with the right status; none
/// names warp's internal rejection types.
pub async fn recover(rejection: Rejection) -> Result<Response, std::convert::Infallible> {
    let (status, message) = if rejection.is_not_found() {
        (StatusCode::NOT_FOUND, "no such route".to_string())
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        (StatusCode::PAYLOAD_TOO_LARGE, format!("body larger than {MAX_BODY} bytes"))
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (StatusCode::METHOD_NOT_ALLOWED, "method not allowed".to_string())
    } else if let Some(e) = rejection.find::<warp::reject::InvalidHeader>() {
        (StatusCode::BAD_REQUEST, e.to_string())
    } else if let Some(e) = rejection.find::<warp::reject::MissingHeader>() {
        (StatusCode::BAD_REQUEST, e.to_string())
    } else if rejection.find::<warp::reject::InvalidQuery>().is_some() {
        (StatusCode::BAD_REQUEST, "the query string does not parse".to_string())
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        (StatusCode::LENGTH_REQUIRED, "a body needs a Content-Length".to_string())
    } else if rejection.find::<warp::reject::UnsupportedMediaType>().is_some() {
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported content type".to_string())
    } else {
        tracing::debug!("unmatched rejection: {rejection:?}");
        (StatusCode::BAD_REQUEST, "bad request".to_string())
    };
    Ok(error(status, &message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::DbStore;
    use kiln_core::Node;
    use kiln_pxe::ImageStore;

    async fn api(dir: &std::path::Path) -> Arc<Api> {
        let images = dir.join("images");
        let image = images.join("tiny");
        std::fs::create_dir_all(&image).unwrap();
        let mut artifacts = Vec::new();
        for f in ["initrd.img", "vmlinuz"] {
            std::fs::write(image.join(f), f).unwrap();
            let sha = kiln_core::Digest::of(f).hex();
            artifacts.push(kiln_core::Artifact { name: f.into(), size: f.len() as u64, sha256: sha });
        }
        let manifest = kiln_core::Manifest {
            name: "tiny".into(),
            digest: kiln_core::Manifest::compute_digest(&artifacts),
            artifacts,
            boot: kiln_core::BootSpec { kernel: "vmlinuz".into(), initrd: "initrd.img".into(), cmdline: vec![], rootfs: None },
            inputs: kiln_core::InputDigests {
                spec: "s".into(),
                agent: "a".into(),
                kernel_package: kiln_core::PackageRef { name: "k".into(), version: "1".into(), sha256: "x".into(), origin: None },
                packages: vec![],
                key: "k".into(),
            },
        };
        std::fs::write(image.join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
        let store = DbStore::open(&crate::StateDir::new(dir).registry_db(), None).unwrap();
        let images = ImageStore::load(&images).unwrap();
        let registry = Registry::open(Arc::new(store), Default::default()).await.unwrap();
        let tokens = Arc::new(crate::join_tokens::JoinTokens::new(registry.store_handle()).unwrap());
        Arc::new(Api {
            catalog: Arc::new(Catalog::builtin(&images)),
            images: Arc::new(LiveImages::fixed(images)),
            minter: crate::pools::Minter { tokens: tokens.clone(), ttl: crate::join_tokens::MINTED_TTL },
            auto_approve: false,
            pools: None,
            advertise: None,
            api_endpoint: ApiEndpoint::Tls { port: 8443, advertise: None },
            sd_token: "sd".into(),
            revocations: Arc::new(crate::operators::Revocations::new(dir)),
            tokens,
            checks: crate::checks::Checks::new(registry.clone()),
            registry,
            ca: Arc::new(crate::tls::Ca::load_or_create(dir).unwrap()),
            node_cert_ttl: std::time::Duration::from_secs(60),
        })
    }

    /// `Bearer ID.SECRET` of a fresh join token good for any number of nodes.
    async fn bearer(api: &Api) -> String {
        format!("Bearer {}", api.tokens.create(&Default::default(), None).await.unwrap().0)
    }

    /// A verified client certificate as the listener hands it to routes.
    fn cert(role: Role, name: &str, serial: &str) -> Arc<ClientCert> {
        Arc::new(ClientCert { subject: crate::tls::Subject { role, name: name.into() }, serial: serial.into(), key_sha256: "k".into() })
    }

    /// A request from the operator `admin`.
    fn as_operator() -> warp::test::RequestBuilder {
        warp::test::request().extension(cert(Role::Operator, "admin", "01"))
    }

    fn body() -> serde_json::Value {
        serde_json::json!({
            "machine_id": "0123456789abcdef0123456789abcdef", "hostname": "tiny-abcdef",
            "macs": ["52-54-00-AB-CD-EF"], "addresses": ["10.0.2.15"], "cpus": 2, "memory_bytes": 1000,
            "kernel": "6.1", "agent_version": "0.1.0", "image_digest": "sha256:d"
        })
    }

    #[tokio::test]
    async fn register_auth_and_bad_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let api = api(dir.path()).await;
        let routes = routes(api.clone()).recover(recover);
        let post = |auth: Option<&str>, body: Vec<u8>| {
            let mut r = warp::test::request().method("POST").path("/api/v1/register").body(body);
            if let Some(a) = auth {
                r = r.header("authorization", a);
            }
            r
        };
        let good = serde_json::to_vec(&body()).unwrap();
        let bearer = bearer(&api).await;
        let boot = Some(bearer.as_str());
        // (case, Authorization header, body, status, text the answer must contain)
        type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
        let cases: Vec<Case> = vec![
            ("not a join token", Some("Bearer nope"), good.clone(), 401, "not a join token"),
            ("a join token never made", Some("Bearer abcdef.0123456789abcdef"), good.clone(), 401, "abcdef"),
            ("malformed json", boot, b"{\"machine_id\":".to_vec(), 400, "EOF"),
            ("wrong type", boot, br#"{"machine_id": 3}"#.to_vec(), 400, "machine_id"),
            (
                "bad machine id",
                boot,
                serde_json::to_vec(&{
                    let mut b = body();
                    b["machine_id"] = "x".into();
                    b
                })
                .unwrap(),
                400,
                "machine_id",
            ),
        ];
        for (case, auth, body, status, text) in cases {
            let resp = post(auth, body).reply(&routes).await;
            let got = String::from_utf8_lossy(resp.body()).into_owned();
            assert_eq!(resp.status().as_u16(), status, "case {case}: {got}");
            assert!(got.contains(text), "case {case}: {got:?} should mention {text:?}");
        }
        assert!(api.registry.nodes().is_empty(), "refused registrations are not listed");

        let resp = post(boot, good).reply(&routes).await;
        assert_eq!(resp.status(), 200, "{:?}", resp.body());
        let answer: RegisterResponse = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(answer.name, "tiny-abcdef");

        let resp = warp::test::request()
            .method("POST")
            .path("/api/v1/heartbeat")
            .header("authorization", format!("Bearer {}", answer.token))
            .reply(&routes)
            .await;
        assert_eq!(resp.status(), 200);
        let resp = warp::test::request().method("POST").path("/api/v1/heartbeat").header("authorization", &bearer).reply(&routes).await;
        assert_eq!(resp.status(), 401, "a join token is not a node token");

        let resp = warp::test::request().path("/api/v1/peers?revision=0&timeout=1").reply(&routes).await;
        assert_eq!(resp.status(), 401, "peers are for nodes only");
        let resp = warp::test::request()
            .path("/api/v1/peers?revision=0&timeout=1")
            .header("authorization", format!("Bearer {}", answer.token))
            .reply(&routes)
            .await;
        let peers: kiln_core::Peers = serde_json::from_slice(resp.body()).unwrap();
        assert!(peers.peers.is_empty(), "no VTEP MAC, no lease, no peer");

        let resp = warp::test::request().path("/api/v1/sd").header("authorization", "Bearer sd").reply(&routes).await;
        let sd: Vec<SdTargetGroup> = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(sd.len(), 1);
        assert_eq!(sd[0].targets, ["10.0.2.15:9100"], "first address on node_exporter's port");
        assert_eq!(sd[0].labels["node"], "tiny-abcdef");
        assert_eq!(sd[0].labels["image"], "sha256:d");
        assert!(sd[0].labels.contains_key("pool"));

        let resp = as_operator().path("/api/v1/nodes").reply(&routes).await;
        let nodes: Vec<Node> = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].macs[0].to_string(), "52:54:00:ab:cd:ef");
        let raw: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        for field in ["name", "machine_id", "hostname", "macs", "addresses", "image_digest", "registered_at", "last_seen"] {
            assert!(raw[0].get(field).is_some(), "node JSON has {field}: {raw}");
        }
    }

    #[tokio::test]
    async fn no_token_is_pending_until_an_operator_approves() {
        let dir = tempfile::tempdir().unwrap();
        let api = api(dir.path()).await;
        let routes = routes(api.clone()).recover(recover);
        let register = || warp::test::request().method("POST").path("/api/v1/register").json(&body());
        let resp = register().reply(&routes).await;
        assert_eq!(resp.status(), 202, "{:?}", resp.body());
        let answer: RegisterResponse = serde_json::from_slice(resp.body()).unwrap();
        assert!(answer.pending && answer.token.is_empty() && answer.lease.is_none() && answer.certificate.is_none(), "{answer:?}");
        let approve = warp::test::request().method("POST").path(&format!("/api/v1/nodes/{}/approve", answer.name));
        assert_eq!(approve.reply(&routes).await.status(), 401, "approving needs an operator");
        let node_cert = warp::test::request().method("POST").path(&format!("/api/v1/nodes/{}/approve", answer.name));
        let resp = node_cert.extension(cert(Role::Node, &answer.name, "02")).reply(&routes).await;
        assert_eq!(resp.status(), 403, "a node does not approve itself");
        assert!(api.registry.nodes()[0].pending);
        let resp = as_operator().method("POST").path(&format!("/api/v1/nodes/{}/approve", answer.name)).reply(&routes).await;
        assert_eq!(resp.status(), 200, "{:?}", resp.body());
        let resp = as_operator().method("POST").path("/api/v1/nodes/nobody/approve").reply(&routes).await;
        assert_eq!(resp.status(), 404);
        let resp = register().reply(&routes).await;
        assert_eq!(resp.status(), 200, "approved: {:?}", resp.body());
        let answer: RegisterResponse = serde_json::from_slice(resp.body()).unwrap();
        assert!(!answer.pending && !answer.token.is_empty(), "{answer:?}");
    }

    /// On the embedded store a token's use is counted in the write that
    /// records the node: of 16 registrations at once with a one-use token
    /// exactly one joins; an unlimited token counts every use.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_use_is_spent_with_the_node_it_admits() {
        let dir = tempfile::tempdir().unwrap();
        let api = api(dir.path()).await;
        let routes = routes(api.clone()).recover(recover);
        for (uses, want) in [(Some(1), 1), (None, 16)] {
            let req = kiln_core::CreateTokenRequest { uses, ..Default::default() };
            let (token, made) = api.tokens.create(&req, None).await.unwrap();
            let answers = futures_util::future::join_all((0..16).map(|i| {
                let mut b = body();
                b["machine_id"] = format!("{:032x}", i + 100 * uses.unwrap_or(7)).into();
                b["hostname"] = format!("n{i}").into();
                warp::test::request()
                    .method("POST")
                    .path("/api/v1/register")
                    .header("authorization", format!("Bearer {token}"))
                    .json(&b)
                    .reply(&routes)
            }))
            .await;
            let won = answers.iter().filter(|r| r.status() == 200).count();
            assert_eq!(won, want, "uses {uses:?}: {:?}", answers.iter().map(|r| r.status()).collect::<Vec<_>>());
            for r in answers.iter().filter(|r| r.status() != 200) {
                assert_eq!(r.status(), 401);
                assert!(String::from_utf8_lossy(r.body()).contains("used"), "{:?}", r.body());
            }
            let after = api.tokens.list().await.unwrap().into_iter().find(|t| t.id == made.id).unwrap();
            assert_eq!((after.used, after.uses_left), (want as u32, uses.map(|_| 0)), "every use counted once");
        }
        assert_eq!(api.registry.nodes().len(), 17, "a node for each use, none for a refusal");
    }

    #[tokio::test]
    async fn register_refuses_each_bad_field_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let api = api(dir.path()).await;
        let routes = routes(api.clone()).recover(recover);
        let bearer = bearer(&api).await;
        let macs: Vec<String> = (0..3000).map(|i| format!("52:54:00:00:{:02x}:{:02x}", i / 256, i % 256)).collect();
        // (case, field, value, the field the 400 names)
        let cases: Vec<(&str, &str, serde_json::Value, &str)> = vec![
            ("ESC[2J and CR-LF in the digest", "image_digest", "sha256:\u{1b}[2J\r\nforged".into(), "image_digest"),
            ("60 KiB kernel", "kernel", "6".repeat(60 * 1024).into(), "kernel"),
            ("3000 MACs", "macs", macs.into(), "macs"),
            ("MTU 0", "uplink_mtu", 0.into(), "uplink_mtu"),
            ("control character in the version", "agent_version", "0.1\u{7}".into(), "agent_version"),
            ("metrics not host:port", "metrics", "http://x/metrics".into(), "metrics"),
        ];
        let post = |b: &serde_json::Value| {
            warp::test::request()
                .method("POST")
                .path("/api/v1/register")
                .header("authorization", &bearer)
                .body(serde_json::to_vec(b).unwrap())
        };
        for (case, field, value, named) in cases {
            let mut b = body();
            b[field] = value;
            let resp = post(&b).reply(&routes).await;
            let text = String::from_utf8_lossy(resp.body()).into_owned();
            assert_eq!(resp.status(), 400, "case {case}: {text}");
            assert!(text.contains(named), "case {case}: {text:?} names {named}");
            assert!(text.len() < 300, "case {case}: the answer does not echo the value: {} bytes", text.len());
        }
        assert!(api.registry.nodes().is_empty(), "nothing stored");

        let mut upper = body();
        upper["machine_id"] = "0123456789ABCDEF0123456789ABCDEF".into();
        for b in [body(), upper] {
            let resp = post(&b).reply(&routes).await;
            assert_eq!(resp.status(), 200, "{:?}", resp.body());
        }
        let nodes = api.registry.nodes();
        assert_eq!(nodes.len(), 1, "an upper-case machine id is the same machine");
        assert_eq!(nodes[0].machine_id, "0123456789abcdef0123456789abcdef");
    }

    #[tokio::test]
    async fn nodes_listing_streams_every_node_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let api = api(dir.path()).await;
        let count = PAGE * 2 + 5;
        for i in 0..count {
            let mut req: RegisterRequest = serde_json::from_value(body()).unwrap();
            req.machine_id = format!("{i:032x}");
            req.hostname = format!("n{i:04}");
            api.registry.register(&req).await.unwrap();
        }
        let routes = routes(api.clone()).recover(recover);
        let names = |body: &[u8]| -> Vec<String> {
            let nodes: Vec<Node> = serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)));
            nodes.into_iter().map(|n| n.name).collect()
        };
        let all = as_operator().path("/api/v1/nodes").reply(&routes).await;
        assert_eq!(all.headers()["content-type"], "application/json");
        let all = names(all.body());
        assert_eq!(all.len(), count, "every node, across the listing's pages");
        assert!(all.windows(2).all(|w| w[0] < w[1]), "by name");
        // (query, names)
        for (query, want) in [
            ("?limit=3", all[..3].to_vec()),
            ("?limit=2&after=n0002", vec!["n0003".to_string(), "n0004".to_string()]),
            (&format!("?after={}", all[count - 2]) as &str, vec![all[count - 1].clone()]),
            ("?after=zzz", vec![]),
            ("?limit=0", vec![]),
            (&format!("?limit={}", PAGE) as &str, all[..PAGE].to_vec()),
        ] {
            let resp = as_operator().path(&format!("/api/v1/nodes{query}")).reply(&routes).await;
            assert_eq!(names(resp.body()), want, "{query}");
        }
        let mut followed = Vec::new();
        let mut after = String::new();
        loop {
            let resp = as_operator().path(&format!("/api/v1/nodes?limit=7&after={after}")).reply(&routes).await;
            let page = names(resp.body());
            let Some(last) = page.last().cloned() else { break };
            followed.extend(page);
            after = last;
        }
        assert_eq!(followed, all, "following pages lists every node once");
        let resp = as_operator().path("/api/v1/nodes?limit=x").reply(&routes).await;
        assert_eq!(resp.status(), 400);
        let sd: Vec<SdTargetGroup> = serde_json::from_slice(as_operator().path("/api/v1/sd").reply(&routes).await.body()).unwrap();
        assert_eq!(sd.len(), count, "service discovery streams too");
    }

    #[tokio::test]
    async fn operator_routes_need_an_operators_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let routes = routes(api(dir.path()).await).recover(recover);
        let ca = crate::tls::Ca::load_or_create(dir.path()).unwrap();
        let revoked = crate::operators::issue(dir.path(), &ca, "eve", &dir.path().join("e.pem"), &dir.path().join("e-key.pem")).unwrap();
        crate::operators::revoke(dir.path(), "eve").unwrap();
        let routes_and_methods = [
            ("GET", "/api/v1/nodes"),
            ("GET", "/api/v1/sd"),
            ("GET", "/api/v1/profiles"),
            ("GET", "/api/v1/groups"),
            ("GET", "/api/v1/pools"),
            ("POST", "/api/v1/pools/tiny/scale"),
            ("POST", "/api/v1/pools/tiny/rollout"),
        ];
        // (who, certificate, bearer token, status)
        let callers = [
            ("nobody", None, None, 401),
            ("a made-up token", None, Some("boot"), 401),
            ("a node", Some(cert(Role::Node, "kiln-a", "02")), None, 403),
            ("a revoked operator", Some(cert(Role::Operator, "eve", &revoked.serial)), None, 403),
        ];
        for (method, path) in routes_and_methods {
            let body = if path.ends_with("/rollout") { r#"{"action": "pause"}"# } else { r#"{"replicas": 1}"# };
            for (who, cert, token, want) in &callers {
                let mut req = warp::test::request().method(method).path(path).body(body);
                if let Some(c) = cert {
                    req = req.extension(c.clone());
                }
                if let Some(t) = token {
                    req = req.header("authorization", format!("Bearer {t}"));
                }
                let resp = req.reply(&routes).await;
                assert_eq!(resp.status(), *want, "{method} {path} by {who}: {:?}", resp.body());
            }
            let resp = as_operator().method(method).path(path).body(body).reply(&routes).await;
            let want = if path.ends_with("/scale") || path.ends_with("/rollout") { 404 } else { 200 };
            assert_eq!(resp.status(), want, "{method} {path} by an operator (no pools here: 404 to scale): {:?}", resp.body());
            let resp = warp::test::request()
                .method(method)
                .path(path)
                .header("authorization", "Bearer sd")
                .body(r#"{"replicas": 1}"#)
                .reply(&routes)
                .await;
            let want = if path == "/api/v1/sd" { 200 } else { 401 };
            assert_eq!(resp.status(), want, "{method} {path} with the SD token");
        }
    }

    /// A new key and a CSR for it (PEM).
    fn csr() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap().pem().unwrap()
    }

    /// The certificate of a registration's answer, as the listener hands
    /// it to the routes.
    fn presented(answer: &RegisterResponse) -> Arc<ClientCert> {
        use rustls::pki_types::pem::PemObject;
        let pem = &answer.certificate.as_ref().expect("a certificate").pem;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        Arc::new(ClientCert::from_der(&der).expect("a node's certificate"))
    }

    #[tokio::test]
    async fn a_node_is_its_key_and_speaks_only_for_itself() {
        let dir = tempfile::tempdir().unwrap();
        let api = api(dir.path()).await;
        let routes = routes(api.clone()).recover(recover);
        let bearer = bearer(&api).await;
        let register = |csr: Option<String>| {
            let mut req: RegisterRequest = serde_json::from_value(body()).unwrap();
            req.csr = csr;
            warp::test::request().method("POST").path("/api/v1/register").header("authorization", &bearer).json(&req)
        };
        let (csr_a, csr_b) = (csr(), csr());
        let resp = register(Some(csr_a.clone())).reply(&routes).await;
        assert_eq!(resp.status(), 200, "{:?}", resp.body());
        let first: RegisterResponse = serde_json::from_slice(resp.body()).unwrap();
        let own = presented(&first);
        assert_eq!(own.subject.name, first.name);
        let call = |path: &str, cert: Option<Arc<ClientCert>>, token: Option<&str>| {
            let mut r = warp::test::request().method("POST").path(path).body(format!(r#"{{"csr": {:?}}}"#, csr_a));
            if let Some(c) = cert {
                r = r.extension(c);
            }
            if let Some(t) = token {
                r = r.header("authorization", format!("Bearer {t}"));
            }
            r
        };
        let hb = format!("/api/v1/nodes/{}/heartbeat", first.name);
        assert_eq!(call(&hb, Some(own.clone()), None).reply(&routes).await.status(), 200, "its certificate heartbeats");
        assert_eq!(call(&hb, None, Some(&first.token)).reply(&routes).await.status(), 401, "a node with a key: no token alone");
        assert_eq!(
            call("/api/v1/nodes/other/heartbeat", Some(own.clone()), None).reply(&routes).await.status(),
            403,
            "another node's name"
        );
        let op = cert(Role::Operator, "admin", "01");
        assert_eq!(call(&hb, Some(op), None).reply(&routes).await.status(), 403, "an operator is not a node");
        let renew = format!("/api/v1/nodes/{}/renew", first.name);
        let resp = call(&renew, Some(own.clone()), None).reply(&routes).await;
        assert_eq!(resp.status(), 200, "renewed: {:?}", resp.body());
        let renewed: kiln_core::NodeCertificate = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(renewed.valid_secs, 60);
        let resp = call(&renew, None, Some(&first.token)).reply(&routes).await;
        assert_eq!(resp.status(), 401, "renewing needs the certificate");

        // Another key for the same machine id: 409, nothing changed.
        let before = api.registry.nodes();
        for other in [Some(csr_b.clone()), None] {
            let resp = register(other.clone()).reply(&routes).await;
            assert_eq!(
                resp.status(),
                409,
                "a copy of the machine id with {}: {:?}",
                if other.is_some() { "another key" } else { "no key" },
                resp.body()
            );
            assert!(String::from_utf8_lossy(resp.body()).contains(&first.name), "the answer names the holder");
            assert_eq!(api.registry.nodes(), before, "nothing changed");
        }
        assert_eq!(call(&hb, Some(own.clone()), None).reply(&routes).await.status(), 200, "the real node keeps working");
        let resp = register(Some(csr_a.clone())).reply(&routes).await;
        assert_eq!(resp.status(), 200, "the same key registers again (a restarted agent)");
        let again: RegisterResponse = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(again.name, first.name);
        assert_eq!(presented(&again).key_sha256, own.key_sha256);

        let resp = register(Some("-----BEGIN CERTIFICATE REQUEST-----\nnonsense\n".into())).reply(&routes).await;
        assert_eq!(resp.status(), 400, "a CSR that does not parse: {:?}", resp.body());

        // The operator frees the machine id: another key may join it.
        let resp = as_operator().method("DELETE").path(&format!("/api/v1/nodes/{}", first.name)).reply(&routes).await;
        assert_eq!(resp.status(), 200, "{:?}", resp.body());
        assert_eq!(call(&hb, Some(own), None).reply(&routes).await.status(), 401, "a deleted node's certificate is worth nothing");
        let resp = register(Some(csr_b)).reply(&routes).await;
        assert_eq!(resp.status(), 200, "after kiln nodes delete: {:?}", resp.body());
        let second = presented(&serde_json::from_slice(resp.body()).unwrap());

        // A node not seen for a while (a diskless node rebooted with a new
        // key) no longer holds its machine id.
        api.registry.set_held_within(std::time::Duration::from_millis(200));
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let resp = register(Some(csr())).reply(&routes).await;
        assert_eq!(resp.status(), 200, "a silent node's machine id: {:?}", resp.body());
        let hb = format!("/api/v1/nodes/{}/heartbeat", second.subject.name);
        assert_eq!(call(&hb, Some(second), None).reply(&routes).await.status(), 401, "the old key is worth nothing now");
    }

    #[tokio::test]
    async fn host_header_is_a_host_and_port_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let routes = routes(api(dir.path()).await).recover(recover);
        // (Host, status)
        for (host, status) in [
            ("10.0.2.2:8080", 200),
            ("kiln.lan", 200),
            ("[fd00::1]:8080", 200),
            ("10.0.0.1 kiln.server=http://attacker:1 x", 400),
            ("kiln.lan/evil", 400),
            ("user@kiln.lan", 400),
            ("10.0.0.1:80\tkiln.x=1", 400),
        ] {
            for path in ["/boot.ipxe", "/ipxe?mac=52-54-00-ab-cd-ef", "/cloud-init/52-54-00-ab-cd-ef/user-data"] {
                let resp = warp::test::request().path(path).header("host", host).reply(&routes).await;
                let text = String::from_utf8_lossy(resp.body());
                assert_eq!(resp.status(), status, "Host {host:?} on {path}: {text}");
                assert!(!text.contains("attacker"), "Host {host:?} on {path}: the header never reaches the answer: {text}");
                if status == 400 {
                    assert!(text.contains("Host header"), "Host {host:?} on {path}: says why: {text}");
                }
            }
        }
        let resp = warp::test::request().path("/boot.ipxe").reply(&routes).await;
        assert_eq!(resp.status(), 400, "no Host, no --advertise");
    }

    #[test]
    fn api_url_follows_the_boot_host() {
        let tls = ApiEndpoint::Tls { port: 8443, advertise: None };
        assert_eq!(api_url(&tls, "http://10.0.2.2:8080"), "https://10.0.2.2:8443");
        assert_eq!(api_url(&tls, "http://kiln.lan"), "https://kiln.lan:8443");
        assert_eq!(api_url(&tls, "http://[fd00::1]:8080/"), "https://[fd00::1]:8443");
        let fixed = ApiEndpoint::Tls { port: 8443, advertise: Some("https://api.lan:9443/".into()) };
        assert_eq!(api_url(&fixed, "http://10.0.2.2:8080"), "https://api.lan:9443");
        assert_eq!(api_url(&ApiEndpoint::Plain, "http://10.0.2.2:8080"), "http://10.0.2.2:8080");
    }

    #[tokio::test]
    async fn boot_chain_and_seeds() {
        let dir = tempfile::tempdir().unwrap();
        let base = api(dir.path()).await;
        let routes = routes(base.clone()).recover(recover);
        let get = |path: &str| warp::test::request().path(path).header("host", "10.0.2.2:8080");
        let resp = get("/boot.ipxe").reply(&routes).await;
        assert_eq!(resp.status(), 200);
        let text = String::from_utf8_lossy(resp.body());
        assert!(text.contains("chain --autofree http://10.0.2.2:8080/ipxe?mac=${mac:hexhyp}"), "{text}");

        let resp = get("/ipxe?mac=52-54-00-ab-cd-ef&uuid=&arch=x86_64").reply(&routes).await;
        assert_eq!(resp.status(), 200);
        let text = String::from_utf8_lossy(resp.body());
        let hex = base.images.current().default_image().digest.hex();
        assert!(text.contains(&format!("kernel http://10.0.2.2:8080/images/tiny/{hex}/vmlinuz")), "{text}");
        assert!(!text.contains("kiln.token"), "a machine no group selects by MAC gets no token: {text}");
        assert!(text.contains(" kiln.server=https://10.0.2.2:8443 "), "the agent gets the TLS API on the boot host: {text}");
        assert!(text.contains(&format!("ds=nocloud-net;s=http://10.0.2.2:8080/cloud-init/52-54-00-ab-cd-ef/{hex}/")), "{text}");

        let resp = get("/ipxe?mac=nonsense").reply(&routes).await;
        assert_eq!(resp.status(), 400, "a bad MAC is the client's fault");

        for (file, want) in [("meta-data", "local-hostname"), ("user-data", "#cloud-config"), ("vendor-data", "")] {
            let resp = get(&format!("/cloud-init/52:54:00:AB:CD:EF/{file}")).reply(&routes).await;
            assert_eq!(resp.status(), 200, "{file}");
            assert!(String::from_utf8_lossy(resp.body()).contains(want), "{file}");
        }
        let resp = get("/cloud-init/52-54-00-ab-cd-ef/passwords").reply(&routes).await;
        assert_eq!(resp.status(), 404);
        // The seed a boot script names is its generation's.
        let resp = get(&format!("/cloud-init/52-54-00-ab-cd-ef/{hex}/user-data")).reply(&routes).await;
        assert_eq!(resp.status(), 200);
        assert!(String::from_utf8_lossy(resp.body()).contains(&format!("kiln.image_digest=sha256:{hex}")), "{:?}", resp.body());
        let resp = get(&format!("/cloud-init/52-54-00-ab-cd-ef/{}/user-data", "ab".repeat(32))).reply(&routes).await;
        assert_eq!(resp.status(), 404, "a generation not kept");

        let resp = get("/api/v1/profiles").extension(cert(Role::Operator, "admin", "01")).reply(&routes).await;
        let profiles: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(profiles[0]["id"], "default");
        assert_eq!(profiles[0]["image"], "tiny");

        let resp = warp::test::request().path("/nope").reply(&routes).await;
        assert_eq!(resp.status(), 404);
    }

    #[tokio::test]
    async fn unknown_machine_without_default_group_is_404_with_reason() {
        let dir = tempfile::tempdir().unwrap();
        let base = api(dir.path()).await;
        let cat = dir.path().join("cat");
        std::fs::create_dir_all(cat.join("profiles")).unwrap();
        std::fs::create_dir_all(cat.join("groups")).unwrap();
        std::fs::write(cat.join("profiles/p.toml"), "image = \"tiny\"\nuser-data = \"{{ labels.missing }}\"\n").unwrap();
        std::fs::write(cat.join("groups/one.toml"), "profile = \"p\"\n[selector]\nmac = \"52:54:00:00:00:01\"\n").unwrap();
        let api = Arc::new(Api {
            registry: base.registry.clone(),
            images: base.images.clone(),
            catalog: Arc::new(Catalog::load(&cat, &base.images.current()).unwrap()),
            minter: base.minter.clone(),
            auto_approve: false,
            pools: None,
            advertise: Some("http://kiln.example:8080".into()),
            api_endpoint: ApiEndpoint::Plain,
            sd_token: "sd".into(),
            revocations: base.revocations.clone(),
            tokens: base.tokens.clone(),
            ca: base.ca.clone(),
            node_cert_ttl: base.node_cert_ttl,
            checks: base.checks.clone(),
        });
        let routes = routes(api).recover(recover);
        let resp = warp::test::request()
            .path("/ipxe?mac=52-54-00-00-00-01")
            .header("host", "10.0.0.1 kiln.server=http://attacker:1 x")
            .reply(&routes)
            .await;
        assert_eq!(resp.status(), 200, "--advertise wins: a bad Host is never read");
        assert!(!String::from_utf8_lossy(resp.body()).contains("attacker"), "{:?}", resp.body());
        let resp = warp::test::request().path("/ipxe?mac=52-54-00-00-00-02").reply(&routes).await;
        assert_eq!(resp.status(), 404);
        let text = String::from_utf8_lossy(resp.body());
        assert!(text.contains("no group matches") && text.contains("52:54:00:00:00:02"), "{text}");
        let resp = warp::test::request().path("/ipxe?mac=52-54-00-00-00-01").reply(&routes).await;
        assert!(
            String::from_utf8_lossy(resp.body()).contains("kiln.server=http://kiln.example:8080 "),
            "--advertise wins over Host; --plain-http serves the API there"
        );
        let resp = warp::test::request().path("/cloud-init/52-54-00-00-00-01/user-data").reply(&routes).await;
        assert_eq!(resp.status(), 500, "a template error is the server's");
        assert!(String::from_utf8_lossy(resp.body()).contains("profile `p`"), "names the profile");
    }
}
