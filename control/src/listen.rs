//! The one accept loop of `kiln serve`'s HTTP listeners (the boot assets'
//! plain HTTP and the API over TLS) and the limits that keep a hostile
//! network from holding them.
//!
//! Every connection is in one of two states, kept in a table shared by
//! both listeners ([`Connections`]):
//!
//! - **waiting** on its peer: for a TLS handshake, a request head, or
//!   nothing (a keep-alive connection between requests);
//! - **busy**: a request's head has arrived and its answer is not written
//!   yet (a long poll on `/api/v1/peers` is busy for up to 300 s).
//!
//! Time limits ([`Limits`], nginx's semantics): a new connection has
//! `header_timeout` from its accept to finish its TLS handshake and its
//! first request head; a keep-alive connection may wait `idle_timeout` for
//! the next request's first byte, then has `header_timeout` for the rest
//! of its head; a request body has `header_timeout` to arrive once the
//! server waits for it; an answer the peer does not read for
//! `idle_timeout` closes the connection. A busy connection's reads have no
//! limit, so a long poll is never cut.
//!
//! The cap: at most `max_connections` open connections. A new connection
//! above the cap takes the place of the waiting connection that has waited
//! longest, which is closed (a slowloris socket, typically: normal clients
//! send their request at once), among those that have not yet had a
//! request answered first: a client's kept-alive connection between two
//! requests outlives a storm of sockets that never finish one, and is
//! closed for a newcomer only when no such socket is left. When none is waiting, the new one is
//! closed at once. Busy connections are never closed for a newcomer, but
//! at most three quarters of the cap may be busy: a request above that is
//! answered `429 Too Many Requests` with `Retry-After`, so waiting slots,
//! and with them room for new clients, always remain.
//!
//! A request that asks to switch protocols (an `Upgrade` header) finds
//! an [`Upgrade`] in its extensions. A route that takes it answers 101 and
//! leaves there what runs on the connection afterwards: hyper lets the
//! connection go (and its buffers with it), and the connection stays in
//! the table, busy, until that ends. The peers watch runs so
//! (`crate::api`).
//!
//! Sizes: a request head (start line and headers) over [`MAX_HEAD`] is
//! answered 431 (by hyper), a request target over [`MAX_URI`] 414.
//!
//! The descriptors: [`raise_nofile_limit`] raises the soft
//! `RLIMIT_NOFILE` to the hard limit at start, and [`Limits::fit`] keeps the
//! cap below it with a reserve for files, stores and TFTP. A connection
//! closed for a newcomer gives its descriptor back only when its task next
//! runs, so the accept loop also holds one of [`Limits::max_sockets`]
//! permits per open socket, closing ones included, and stops accepting
//! (the kernel's backlog waits) while none is free.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::Service;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Sleep;
use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, Request, StatusCode};
use warp::reply::Response;

/// Longest request target (path and query) accepted: 414 above.
pub const MAX_URI: usize = 8 * 1024;
/// Largest request head (start line and headers) accepted: 431 above.
pub const MAX_HEAD: usize = 16 * 1024;
/// Descriptors left beside the connection cap: image files, the store,
/// TFTP transfers, etcd.
const FD_RESERVE: u64 = 256;
/// How often the table logs that it closed waiting connections at the cap.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// `Connection::state` of a busy connection.
const BUSY: u64 = u64::MAX;

/// The listeners' limits (`kiln serve --max-connections --header-timeout
/// --idle-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections on both listeners together.
    pub max_connections: usize,
    /// From accept to the end of the first request head (TLS handshake
    /// included); from a request's first byte to the end of its head; for
    /// a request body to arrive.
    pub header_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request, and
    /// a peer may leave an answer unread.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_connections: 4096, header_timeout: Duration::from_secs(10), idle_timeout: Duration::from_secs(60) }
    }
}

impl Limits {
    /// These limits with the connection cap lowered, if needed, so that
    /// [`Limits::max_sockets`] (the cap and the sockets being closed) and
    /// a reserve of 256 (files, the store, TFTP) fit in `nofile` descriptors.
    pub fn fit(self, nofile: u64) -> Limits {
        let room = (nofile.saturating_sub(FD_RESERVE) * 4 / 5).max(8);
        Limits { max_connections: self.max_connections.min(usize::try_from(room).unwrap_or(usize::MAX)), ..self }
    }

    /// How many sockets may be open at once, those closed for a newcomer
    /// and not yet dropped included: the cap and a quarter.
    pub fn max_sockets(&self) -> usize {
        self.max_connections + (self.max_connections / 4).max(1)
    }

    /// How many connections may be busy at once: three quarters of the cap.
    fn max_busy(&self) -> usize {
        (self.max_connections - self.max_connections / 4).max(1)
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit; returns
/// the soft limit in effect (the old one when it cannot be raised).
pub fn raise_nofile_limit() -> nix::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => Ok(hard),
        Err(e) => {
            tracing::warn!(soft, hard, "could not raise the descriptor limit: {e}");
            Ok(soft)
        }
    }
}

/// One open connection, as its task, its I/O and the table see it.
struct Connection {
    id: u64,
    /// [`BUSY`], or when it began to wait (nanoseconds since the table's start).
    state: AtomicU64,
    /// Told when a newcomer takes its place.
    evicted: Notify,
}

/// The table's entry: the connection and its nested requests in flight.
struct Entry {
    conn: Arc<Connection>,
    depth: u32,
    waiting_since: u64,
    /// A request of it has been answered.
    served: bool,
}

impl Entry {
    /// Its key in [`Table::waiting`].
    fn waiting_key(&self) -> (bool, u64, u64) {
        (self.served, self.waiting_since, self.conn.id)
    }
}

#[derive(Default)]
struct Table {
    entries: HashMap<u64, Entry>,
    /// Waiting connections, those never served first, then longest
    /// waiting first: (served, since, id).
    waiting: BTreeSet<(bool, u64, u64)>,
    busy: usize,
    next_id: u64,
    evicted: u64,
    closed_at_once: u64,
    logged: Option<Instant>,
}

/// Every open connection of both listeners: the cap and who makes room.
pub struct Connections {
    limits: Limits,
    start: Instant,
    table: Mutex<Table>,
    /// One permit per open socket ([`Limits::max_sockets`]).
    sockets: Arc<Semaphore>,
}

impl Connections {
    /// An empty table for `limits`.
    pub fn new(limits: Limits) -> Arc<Connections> {
        let sockets = Arc::new(Semaphore::new(limits.max_sockets()));
        Arc::new(Connections { limits, start: Instant::now(), table: Mutex::new(Table::default()), sockets })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(BUSY - 1)
    }

    /// A slot for a new connection: a free one, or the longest-waiting
    /// connection's (which is told to close); `None` when every open
    /// connection is busy.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let now = self.now();
        let mut t = self.lock();
        if t.entries.len() >= self.limits.max_connections {
            let Some((_, _, victim)) = t.waiting.pop_first() else {
                t.closed_at_once += 1;
                self.log_pressure(&mut t);
                return None;
            };
            if let Some(e) = t.entries.remove(&victim) {
                e.conn.evicted.notify_one();
            }
            t.evicted += 1;
            self.log_pressure(&mut t);
        }
        t.next_id += 1;
        let conn = Arc::new(Connection { id: t.next_id, state: AtomicU64::new(now), evicted: Notify::new() });
        t.waiting.insert((false, now, conn.id));
        t.entries.insert(conn.id, Entry { conn: conn.clone(), depth: 0, waiting_since: now, served: false });
        Some(Slot { table: self.clone(), conn })
    }

    /// Says, at most every [`LOG_EVERY`], that the cap is reached.
    fn log_pressure(&self, t: &mut Table) {
        if t.logged.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            return;
        }
        t.logged = Some(Instant::now());
        tracing::warn!(
            cap = self.limits.max_connections,
            busy = t.busy,
            closed_waiting = t.evicted,
            closed_at_once = t.closed_at_once,
            "http: at the connection cap: closing the longest-waiting connections to admit new ones"
        );
    }

    /// Marks `conn` busy with a request; `None` when the busy share of the
    /// cap is full (or the connection is being closed).
    fn begin(self: &Arc<Self>, conn: &Arc<Connection>) -> Option<Busy> {
        let mut t = self.lock();
        let full = t.busy >= self.limits.max_busy();
        let entry = t.entries.get_mut(&conn.id)?;
        if entry.depth == 0 {
            if full {
                return None;
            }
            let key = entry.waiting_key();
            entry.depth = 1;
            conn.state.store(BUSY, Ordering::Release);
            t.waiting.remove(&key);
            t.busy += 1;
        } else {
            entry.depth += 1;
        }
        Some(Busy { table: self.clone(), conn: conn.clone() })
    }

    /// A request on `conn` is answered: waiting again when it was the last.
    fn finish(&self, conn: &Connection) {
        let now = self.now();
        let mut t = self.lock();
        let Some(entry) = t.entries.get_mut(&conn.id) else { return };
        entry.depth -= 1;
        if entry.depth == 0 {
            entry.waiting_since = now;
            entry.served = true;
            let key = entry.waiting_key();
            conn.state.store(now, Ordering::Release);
            t.waiting.insert(key);
            t.busy -= 1;
        }
    }

    /// `conn` is closed (unless a newcomer already took its slot).
    fn close(&self, conn: &Connection) {
        let mut t = self.lock();
        let Some(entry) = t.entries.remove(&conn.id) else { return };
        if entry.depth > 0 {
            t.busy -= 1;
        } else {
            t.waiting.remove(&entry.waiting_key());
        }
    }
}

/// A connection's place in the table, given back when dropped.
struct Slot {
    table: Arc<Connections>,
    conn: Arc<Connection>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.close(&self.conn);
    }
}

/// A request in flight; dropped with its answer's body (or, for a
/// connection that switched protocols, when what runs on it ends).
struct Busy {
    table: Arc<Connections>,
    conn: Arc<Connection>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.table.finish(&self.conn);
    }
}

/// A future's deadline, armed at `at`: `TimedOut` once it passes.
fn poll_deadline(sleep: &mut Option<Pin<Box<Sleep>>>, at: Instant, cx: &mut Context<'_>, what: &'static str) -> Poll<io::Error> {
    let at = tokio::time::Instant::from_std(at);
    let s = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
    if s.deadline() != at {
        s.as_mut().reset(at);
    }
    s.as_mut().poll(cx).map(|()| io::Error::new(io::ErrorKind::TimedOut, what))
}

/// A connection's byte stream with its time limits: the request head's
/// and the keep-alive wait's on reads, the unread answer's on writes.
struct Watched<S> {
    io: S,
    conn: Arc<Connection>,
    limits: Limits,
    start: Instant,
    /// The `state` this stream last saw (a new wait begins when it changes).
    epoch: u64,
    /// When the current request head began (accept, for the first).
    head_since: Option<Instant>,
    read_sleep: Option<Pin<Box<Sleep>>>,
    write_since: Option<Instant>,
    write_sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> Watched<S> {
    fn new(io: S, slot: &Slot, accepted: Instant) -> Watched<S> {
        Watched {
            io,
            conn: slot.conn.clone(),
            limits: slot.table.limits,
            start: slot.table.start,
            epoch: slot.conn.state.load(Ordering::Acquire),
            head_since: Some(accepted),
            read_sleep: None,
            write_since: None,
            write_sleep: None,
        }
    }

    /// A write's outcome, timed: pending for `idle_timeout` is an error.
    fn timed_write<T>(&mut self, polled: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.write_since = None;
            return polled;
        }
        let since = *self.write_since.get_or_insert_with(Instant::now);
        poll_deadline(&mut self.write_sleep, since + self.limits.idle_timeout, cx, "the peer read nothing of the answer").map(Err)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let state = this.conn.state.load(Ordering::Acquire);
        if state == BUSY {
            return polled;
        }
        if state != this.epoch {
            this.epoch = state;
            this.head_since = None;
        }
        match polled {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && this.head_since.is_none() {
                    this.head_since = Some(Instant::now());
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let (at, what) = match this.head_since {
                    Some(since) => (since + this.limits.header_timeout, "the request head did not arrive in time"),
                    None => (this.start + Duration::from_nanos(state) + this.limits.idle_timeout, "idle keep-alive connection"),
                };
                poll_deadline(&mut this.read_sleep, at, cx, what).map(Err)
            }
            err => err,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, data);
        this.timed_write(polled, cx)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.timed_write(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.timed_write(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.timed_write(polled, cx)
    }
}

/// Reading a request body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The connection failed.
    #[error("reading the request body")]
    Read(#[source] hyper::Error),
    /// The body did not arrive in time.
    #[error("the request body did not arrive within {0:?}")]
    TimedOut(Duration),
}

/// A request body with a deadline, armed when the server first waits for it.
pub struct TimedBody {
    body: Incoming,
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(BodyError::Read)));
        }
        let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(this.limit)));
        sleep.as_mut().poll(cx).map(|()| Some(Err(BodyError::TimedOut(this.limit))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An answer's body, holding its request's busy slot until written.
pub struct Answer {
    body: Pin<Box<dyn Body<Data = Bytes, Error = warp::Error> + Send>>,
    _busy: Option<Busy>,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = warp::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, warp::Error>>> {
        self.get_mut().body.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

fn answer(resp: Response, busy: Option<Busy>) -> warp::http::Response<Answer> {
    resp.map(|body| Answer { body: Box::pin(body), _busy: busy })
}

type Routes = BoxedFilter<(Response,)>;

/// The routes as one connection's hyper service: sizes checked, the
/// request counted busy, its body timed.
#[derive(Clone)]
struct Guarded {
    routes: Routes,
    table: Arc<Connections>,
    conn: Arc<Connection>,
    /// The connection's verified client certificate, put in each request's
    /// extensions for the routes.
    peer: Option<Arc<crate::tls::ClientCert>>,
    /// Set when a route answered 101: what the connection runs next.
    switched: Arc<Mutex<Option<Switched>>>,
}

/// What runs on a connection after it switched protocols, given its
/// byte stream (the TLS session, still under the listener's write limit)
/// and a future that resolves when the server stops (the session then
/// ends promptly).
pub type Session = Box<dyn FnOnce(hyper::upgrade::Upgraded, Stopped) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Resolves when the server stops.
pub type Stopped = Pin<Box<dyn Future<Output = ()> + Send>>;

/// In the extensions of a request that asks to switch protocols: a route
/// that answers `101 Switching Protocols` leaves its [`Session`] here.
#[derive(Clone, Default)]
pub struct Upgrade(Arc<Mutex<Option<Session>>>);

impl Upgrade {
    /// Runs `session` on the connection once the 101 answer is written.
    pub fn accept(&self, session: Session) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(session);
    }

    fn take(&self) -> Option<Session> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A connection that answered 101: hyper's upgrade, the session to run
/// on it, and the busy slot it holds meanwhile.
struct Switched {
    on: hyper::upgrade::OnUpgrade,
    session: Session,
    _busy: Busy,
}

impl Service<Request<Incoming>> for Guarded {
    type Response = warp::http::Response<Answer>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        if let Some(peer) = &self.peer {
            req.extensions_mut().insert(peer.clone());
        }
        if req.uri().path_and_query().map_or(0, |p| p.as_str().len()) > MAX_URI {
            let resp = crate::api::error(StatusCode::URI_TOO_LONG, &format!("request target longer than {MAX_URI} bytes"));
            return Box::pin(std::future::ready(Ok(answer(resp, None))));
        }
        let Some(busy) = self.table.begin(&self.conn) else {
            let mut resp = crate::api::error(StatusCode::TOO_MANY_REQUESTS, "too many requests in flight; retry");
            resp.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
            return Box::pin(std::future::ready(Ok(answer(resp, None))));
        };
        let offer = req.headers().contains_key(hyper::header::UPGRADE).then(|| {
            let offer = Upgrade::default();
            req.extensions_mut().insert(offer.clone());
            (hyper::upgrade::on(&mut req), offer)
        });
        let limit = self.table.limits.header_timeout;
        let routes = hyper_util::service::TowerToHyperService::new(warp::service(self.routes.clone()));
        let fut = routes.call(req.map(|body| TimedBody { body, limit, sleep: None }));
        let switched = self.switched.clone();
        Box::pin(async move {
            let resp = fut.await?;
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                && let Some((on, offer)) = offer
                && let Some(session) = offer.take()
            {
                *switched.lock().unwrap_or_else(|e| e.into_inner()) = Some(Switched { on, session, _busy: busy });
                return Ok(answer(resp, None));
            }
            Ok(answer(resp, Some(busy)))
        })
    }
}

/// hyper's HTTP/1.1 server for one connection, with the head's size limit
/// and, as a backstop behind [`Watched`]'s, hyper's own head timer.
fn http1(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_timeout + limits.idle_timeout).max_header_size(MAX_HEAD);
    b
}

/// What every connection of one listener shares.
struct Listener {
    tls: Option<tokio_rustls::TlsAcceptor>,
    routes: Routes,
    http: hyper::server::conn::http1::Builder,
    what: &'static str,
}

/// Serves `routes` on `listener` (over TLS with `tls`) until `stop`
/// resolves, within the table's limits; then lets requests in flight
/// finish (at most `grace`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    routes: BoxedFilter<(Response,)>,
    table: Arc<Connections>,
    stop: impl Future<Output = ()>,
    grace: Duration,
) {
    let what = if tls.is_some() { "api" } else { "http" };
    let shared = Arc::new(Listener { tls, routes, http: http1(&table.limits), what });
    // Set when the server stops; `closed()` once every connection ended.
    let (stopping, stop_rx) = tokio::sync::watch::channel(false);
    let mut last_error: Option<Instant> = None;
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            permit = table.sockets.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut stop => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, typically: say so at most every 10 s.
                    if last_error.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                        tracing::warn!("{what}: accept: {e}");
                        last_error = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let accepted = Instant::now();
        let Some(slot) = table.admit() else { continue };
        // Without it, a response written in two TLS records waits for the
        // client's delayed ACK: 40 ms per request.
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            let _socket = permit;
            let conn = slot.conn.clone();
            tokio::select! {
                () = conn.evicted.notified() => tracing::debug!(%peer, "{}: closed for a newcomer at the cap", shared.what),
                () = connection(tcp, peer, &slot, accepted, &shared, stop) => {}
            }
        });
    }
    drop(listener);
    drop(stop_rx);
    stopping.send_replace(true);
    let _ = tokio::time::timeout(grace, stopping.closed()).await;
}

/// Resolves once the server stops (or has gone).
async fn until_stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// HTTP/1.1 on one connection until it closes, switches protocols, or
/// the server stops (then its request in flight is finished first).
async fn http<I>(
    http: &hyper::server::conn::http1::Builder,
    io: I,
    service: Guarded,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> hyper::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = http.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        done = conn.as_mut() => done,
        () = until_stopped(stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// One connection: its TLS handshake if any, then HTTP/1.1 until it closes.
async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: &Slot,
    accepted: Instant,
    shared: &Listener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let switched = Arc::new(Mutex::new(None));
    let mut service = Guarded {
        routes: shared.routes.clone(),
        table: slot.table.clone(),
        conn: slot.conn.clone(),
        peer: None,
        switched: switched.clone(),
    };
    let what = shared.what;
    let result = match &shared.tls {
        None => {
            let io = hyper_util::rt::TokioIo::new(Watched::new(tcp, slot, accepted));
            http(&shared.http, io, service, &mut stop).await
        }
        Some(acceptor) => {
            let tls = match tokio::time::timeout(slot.table.limits.header_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, "{what}: TLS handshake: {e}"),
                Err(_) => return tracing::debug!(%peer, "{what}: TLS handshake timed out"),
            };
            // rustls verified the chain against the CA; the leaf says who.
            let leaf = tls.get_ref().1.peer_certificates().and_then(|chain| chain.first());
            service.peer = leaf.and_then(|der| crate::tls::ClientCert::from_der(der)).map(Arc::new);
            let io = hyper_util::rt::TokioIo::new(Watched::new(tls, slot, accepted));
            http(&shared.http, io, service, &mut stop).await
        }
    };
    if let Err(e) = result {
        return tracing::debug!(%peer, "{what}: connection: {e}");
    }
    let Some(Switched { on, session, _busy }) = switched.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
    let stopped = Box::pin(async move { until_stopped(&mut stop).await });
    match on.await {
        Ok(io) => session(io, stopped).await,
        Err(e) => tracing::debug!(%peer, "{what}: switching protocols: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(cap: usize) -> Arc<Connections> {
        Connections::new(Limits { max_connections: cap, ..Limits::default() })
    }

    #[test]
    fn the_longest_waiting_connection_makes_room() {
        let t = table(4);
        let slots: Vec<Slot> = (0..4).map(|_| t.admit().expect("room under the cap")).collect();
        let busy = t.begin(&slots[0].conn).expect("a request on the first");
        let fifth = t.admit().expect("a waiting connection makes room");
        assert!(!t.lock().entries.contains_key(&slots[1].conn.id), "the oldest waiting one (not the busy one) is closed");
        assert!(t.lock().entries.contains_key(&slots[0].conn.id), "a busy connection stays");
        assert_eq!(t.lock().entries.len(), 4, "the cap holds");
        drop(busy);
        drop(slots);
        assert_eq!(t.lock().entries.len(), 1, "only the newcomer is left");
        drop(fifth);
        let t = t.lock();
        assert!(t.entries.is_empty() && t.waiting.is_empty() && t.busy == 0, "every slot given back");
    }

    #[test]
    fn a_connection_once_served_is_closed_after_those_never_served() {
        let t = table(3);
        let client = t.admit().expect("room");
        drop(t.begin(&client.conn).expect("a request, answered"));
        // Sockets that never finish a request, newer than the client's wait.
        let storm: Vec<Slot> = (0..2).map(|_| t.admit().expect("room")).collect();
        let newcomer = t.admit().expect("room is made");
        assert!(t.lock().entries.contains_key(&client.conn.id), "the served client stays");
        assert!(!t.lock().entries.contains_key(&storm[0].conn.id), "the oldest never-served socket goes");
        let (a, b) = (t.admit().expect("room is made"), t.admit().expect("room is made"));
        assert!(!t.lock().entries.contains_key(&storm[1].conn.id) && !t.lock().entries.contains_key(&newcomer.conn.id));
        assert!(t.lock().entries.contains_key(&client.conn.id), "still the client stays, while never-served ones wait");
        // The others busy: the served one is the only one waiting.
        let _busy = (t.begin(&a.conn).expect("busy share"), t.begin(&b.conn).expect("busy share"));
        let _last = t.admit().expect("the served one makes room");
        assert!(!t.lock().entries.contains_key(&client.conn.id), "with no never-served one waiting, the served one makes room");
    }

    #[test]
    fn busy_share_is_three_quarters_and_full_is_refused() {
        let t = table(4);
        let slots: Vec<Slot> = (0..4).map(|_| t.admit().expect("room")).collect();
        let busy: Vec<Busy> = slots[..3].iter().map(|s| t.begin(&s.conn).expect("within the busy share")).collect();
        assert!(t.begin(&slots[3].conn).is_none(), "a fourth busy connection is over three quarters of 4");
        let newcomer = t.admit().expect("the one waiting connection makes room");
        assert!(t.begin(&newcomer.conn).is_none(), "still over the busy share");
        drop(busy);
        assert_eq!(t.lock().busy, 0);
    }

    #[test]
    fn the_cap_fits_the_descriptor_limit() {
        let l = Limits::default();
        assert_eq!(l.fit(1024).max_connections, 614, "1024 descriptors: the reserve, and a quarter more for closing sockets");
        assert!(l.fit(1024).max_sockets() + 256 <= 1024);
        assert_eq!(l.fit(1 << 20).max_connections, 4096, "plenty of descriptors: the cap as asked");
        assert_eq!(l.fit(300).max_connections, 35, "a reserve of 256");
        assert_eq!(l.fit(10).max_connections, 8, "never below 8");
    }
}
