//! The HTTP side: `GET /metrics` answers one scrape of an [`Exporter`] in
//! the format the request's `Accept` asks for; every other path is 404.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use warp::Filter;
use warp::http::{Response, StatusCode, header};

use super::{Exporter, Format, encode};

/// Binding the listener failed.
#[derive(Debug, thiserror::Error)]
#[error("listening on {addr}")]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr`; the returned listener's `local_addr` is the real port when `addr` asked for port 0.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| BindError { addr, source })
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, exporter: Arc<Exporter>) {
    // The size of the last answer: the next one is written into a buffer that big, grown at most once.
    let last_len = Arc::new(AtomicUsize::new(16 * 1024));
    let metrics = warp::path("metrics")
        .and(warp::path::end())
        .and(warp::get().or(warp::head()).unify())
        .and(warp::header::optional::<String>("accept"))
        .then(move |accept: Option<String>| {
            let exporter = Arc::clone(&exporter);
            let last_len = Arc::clone(&last_len);
            async move {
                let format = Format::negotiate(accept.as_deref());
                match exporter.scrape().await {
                    Ok(mut set) => {
                        let mut body = String::with_capacity(last_len.load(Ordering::Relaxed) + 1024);
                        encode::encode_into(&mut set, format, &mut body);
                        last_len.store(body.len(), Ordering::Relaxed);
                        Response::builder().header(header::CONTENT_TYPE, format.content_type()).body(body).unwrap_or_default()
                    }
                    Err(busy) => Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                        .body(format!("{busy}\n"))
                        .unwrap_or_default(),
                }
            }
        });
    warp::serve(metrics).incoming(listener).run().await;
}

/// The runtime the metrics server runs on: one thread for HTTP, blocking
/// threads (the collectors) kept a minute so that scrapes every 15 s reuse them.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .thread_keep_alive(std::time::Duration::from_secs(60))
        .thread_stack_size(512 * 1024)
        .build()
}

/// Binds `addr` and serves `/metrics` on a thread of its own with its own
/// runtime, beside whatever the caller runs. Returns the bound address.
pub fn spawn(addr: SocketAddr, exporter: Arc<Exporter>) -> Result<SocketAddr, BindError> {
    let rt = runtime().map_err(|source| BindError { addr, source })?;
    let listener = rt.block_on(bind(addr))?;
    let local = listener.local_addr().map_err(|source| BindError { addr, source })?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || rt.block_on(serve(listener, exporter)))
        .map_err(|source| BindError { addr, source })?;
    Ok(local)
}
