//! The HTTP side: `GET /metrics` (or `HEAD`) answers one scrape of an
//! [`Exporter`] in the format the request's `Accept` asks for; every other
//! path is 404, another method 405.
//!
//! A small HTTP/1.1 server on std's blocking sockets, one thread per
//! connection (at most [`MAX_CONNECTIONS`]), keep-alive as HTTP/1.1 and
//! `Connection: keep-alive` ask: all a scraper needs, and far less code to
//! keep resident on every node than a general HTTP stack. Requests with a
//! body are read past it; chunked bodies and oversized heads close the
//! connection after an error answer.

use std::io::{IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

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

/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// An idle keep-alive connection is closed after this long.
const IDLE: Duration = Duration::from_secs(120);
/// A client that does not take the answer within this long is dropped.
const WRITE: Duration = Duration::from_secs(30);
/// Stack of a connection thread: the answer is built on the heap.
const STACK: usize = 256 * 1024;

/// Binds `addr`; the returned listener's `local_addr` is the real port when `addr` asked for port 0.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).map_err(|source| BindError { addr, source })
}

/// Serves `/metrics` on `listener`, for good: a failed `accept` (EMFILE, ...)
/// is logged and retried.
pub fn serve(listener: TcpListener, exporter: Arc<Exporter>) -> ! {
    let open = Arc::new(AtomicUsize::new(0));
    // The size of the last answer: the next one is written into a buffer that big, grown at most once.
    let last_len = Arc::new(AtomicUsize::new(16 * 1024));
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                log::debug!("metrics: accept: {e}");
                // EMFILE and the like: give the open connections time to end.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let (exporter, last_len, count) = (Arc::clone(&exporter), Arc::clone(&last_len), Arc::clone(&open));
        let started = std::thread::Builder::new().name("metrics-conn".into()).stack_size(STACK).spawn(move || {
            if let Err(e) = connection(stream, &exporter, &last_len) {
                log::debug!("metrics: connection: {e}");
            }
            count.fetch_sub(1, Ordering::AcqRel);
        });
        if started.is_err() {
            open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One parsed request head.
struct Request<'h> {
    method: &'h str,
    path: &'h str,
    accept: Option<&'h str>,
    keep_alive: bool,
    content_length: usize,
    chunked: bool,
}

fn parse_head(head: &str) -> Option<Request<'_>> {
    let mut lines = head.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let mut req = Request { method, path, accept: None, keep_alive: version != "HTTP/1.0", content_length: 0, chunked: false };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("accept") {
            req.accept = Some(value);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    req.keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    req.keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            req.content_length = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            req.chunked = true;
        }
    }
    Some(req)
}

fn connection(mut stream: TcpStream, exporter: &Exporter, last_len: &AtomicUsize) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IDLE))?;
    stream.set_write_timeout(Some(WRITE))?;
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut answer: Vec<u8> = Vec::with_capacity(256);
    // The body, kept between the requests of a connection.
    let mut body = String::new();
    loop {
        // Read until a whole head is in `buf`.
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            if buf.len() > MAX_HEAD {
                return respond(
                    &mut stream,
                    &mut answer,
                    "431 Request Header Fields Too Large",
                    "text/plain; charset=utf-8",
                    b"",
                    false,
                    false,
                );
            }
            let mut chunk = [0u8; 2048];
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&buf[..head_end]).ok().and_then(parse_head);
        let Some(req) = head else {
            return respond(&mut stream, &mut answer, "400 Bad Request", "text/plain; charset=utf-8", b"", false, false);
        };
        if req.chunked {
            return respond(&mut stream, &mut answer, "411 Length Required", "text/plain; charset=utf-8", b"", false, false);
        }
        let (keep_alive, head_only) = (req.keep_alive, req.method == "HEAD");
        let body_len = req.content_length;
        let status = if req.path != "/metrics" {
            respond(&mut stream, &mut answer, "404 Not Found", "text/plain; charset=utf-8", b"", keep_alive, head_only)
        } else if req.method != "GET" && req.method != "HEAD" {
            respond(&mut stream, &mut answer, "405 Method Not Allowed", "text/plain; charset=utf-8", b"", keep_alive, head_only)
        } else {
            let format = Format::negotiate(req.accept);
            match exporter.scrape_blocking() {
                Ok(mut set) => {
                    body.clear();
                    body.reserve(last_len.load(Ordering::Relaxed) + 1024);
                    encode::encode_into(&mut set, format, &mut body);
                    last_len.store(body.len(), Ordering::Relaxed);
                    exporter.recycle(set);
                    respond(&mut stream, &mut answer, "200 OK", format.content_type(), body.as_bytes(), keep_alive, head_only)
                }
                Err(busy) => respond(
                    &mut stream,
                    &mut answer,
                    "503 Service Unavailable",
                    "text/plain; charset=utf-8",
                    format!("{busy}\n").as_bytes(),
                    keep_alive,
                    head_only,
                ),
            }
        };
        status?;
        if !keep_alive {
            return Ok(());
        }
        // Drop this request (and its body) from the buffer; a pipelined next one stays.
        let mut consumed = head_end + 4;
        let in_buf = (buf.len() - consumed).min(body_len);
        consumed += in_buf;
        let mut body_left = body_len - in_buf;
        buf.drain(..consumed);
        while body_left > 0 {
            let mut chunk = [0u8; 2048];
            let n = stream.read(&mut chunk[..body_left.min(2048)])?;
            if n == 0 {
                return Ok(());
            }
            body_left -= n;
        }
    }
}

/// Writes one answer (head and body in one write). `answer` is reused between requests.
fn respond(
    stream: &mut TcpStream,
    answer: &mut Vec<u8>,
    status: &str,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    head_only: bool,
) -> std::io::Result<()> {
    answer.clear();
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(
        answer,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    )?;
    if head_only {
        return stream.write_all(answer);
    }
    // Head and body in one writev, without copying the body.
    let (mut head, mut body) = (&answer[..], body);
    while !head.is_empty() || !body.is_empty() {
        let n = stream.write_vectored(&[IoSlice::new(head), IoSlice::new(body)])?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        body = &body[n - from_head..];
    }
    Ok(())
}

/// Binds `addr` and serves `/metrics` on a thread of its own, beside
/// whatever the caller runs. Returns the bound address.
pub fn spawn(addr: SocketAddr, exporter: Arc<Exporter>) -> Result<SocketAddr, BindError> {
    let listener = bind(addr)?;
    let local = listener.local_addr().map_err(|source| BindError { addr, source })?;
    std::thread::Builder::new()
        .name("metrics".into())
        .stack_size(STACK)
        .spawn(move || serve(listener, exporter))
        .map_err(|source| BindError { addr, source })?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        for (head, want) in [
            ("GET /metrics HTTP/1.1\r\nHost: x", Some(("GET", "/metrics", None, true, 0))),
            ("GET /metrics?a=b HTTP/1.0\r\nAccept: text/plain", Some(("GET", "/metrics", Some("text/plain"), false, 0))),
            ("GET /metrics HTTP/1.0\r\nConnection: Keep-Alive", Some(("GET", "/metrics", None, true, 0))),
            ("HEAD / HTTP/1.1\r\nconnection: close\r\ncontent-length: 3", Some(("HEAD", "/", None, false, 3))),
            ("GET /metrics HTTP/2\r\n", None),
            ("GET /metrics\r\n", None),
            ("GET /metrics HTTP/1.1\r\nContent-Length: x", None),
        ] {
            let got = parse_head(head).map(|r| (r.method, r.path, r.accept, r.keep_alive, r.content_length));
            assert_eq!(got, want, "head {head:?}");
        }
    }
}
