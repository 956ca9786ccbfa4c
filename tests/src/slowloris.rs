//! Slowloris on loopback, for `tests/attack_http.rs` and the slowloris
//! bench: sockets that connect to a server and then trickle a request head
//! (or a TLS ClientHello) one byte a second and never finish it, reopened
//! whenever the server closes them, so the attacker always holds its
//! number; and normal requests timed beside them, each on a new connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::{KilnServer, binaries};

/// The start of a request head that never ends.
const PARTIAL_HEAD: &[u8] = b"GET /boot.ipxe HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
/// A TLS record header announcing a 512-byte ClientHello, and its first bytes.
const PARTIAL_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];

/// What the attacker's sockets say before trickling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// A partial HTTP request head (the boot port).
    Head,
    /// A partial TLS ClientHello (the API port).
    ClientHello,
    /// Nothing at all.
    Nothing,
}

/// `n` slowloris sockets to `addr`, held by a thread until dropped.
pub struct Slowloris {
    stop: Arc<AtomicBool>,
    open: Arc<AtomicUsize>,
    reopened: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn connect(addr: SocketAddr, opening: Opening) -> Option<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    let first = match opening {
        Opening::Head => PARTIAL_HEAD,
        Opening::ClientHello => PARTIAL_HELLO,
        Opening::Nothing => &[],
    };
    s.write_all(first).ok()?;
    s.set_nonblocking(true).ok()?;
    Some(s)
}

/// True when the server closed `s` (EOF or an error on a read).
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

impl Slowloris {
    /// Opens `n` sockets to `addr` and holds them: every second each sends
    /// one more byte (unless it opened with nothing), and those the server
    /// closed are opened again.
    pub fn start(addr: SocketAddr, n: usize, opening: Opening) -> Slowloris {
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let reopened = Arc::new(AtomicUsize::new(0));
        let (st, op, re) = (stop.clone(), open.clone(), reopened.clone());
        let thread = std::thread::spawn(move || {
            let mut socks: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
            let mut first = true;
            while !st.load(Ordering::Relaxed) {
                let round = Instant::now();
                for s in socks.iter_mut() {
                    if st.load(Ordering::Relaxed) {
                        break;
                    }
                    let dead = match s {
                        Some(sock) => closed(sock) || (opening != Opening::Nothing && sock.write(b"a").is_err()),
                        None => true,
                    };
                    if dead {
                        if s.is_some() || !first {
                            re.fetch_add(1, Ordering::Relaxed);
                        }
                        *s = connect(addr, opening);
                    }
                }
                first = false;
                op.store(socks.iter().filter(|s| s.is_some()).count(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_secs(1).saturating_sub(round.elapsed()));
            }
        });
        Slowloris { stop, open, reopened, thread: Some(thread) }
    }

    /// Sockets open on the attacker's side after the last round.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Sockets the server closed, and the attacker opened again.
    pub fn reopened(&self) -> usize {
        self.reopened.load(Ordering::Relaxed)
    }
}

impl Drop for Slowloris {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `kiln serve` of a fake image under `ulimit -n 1024` (`prlimit
/// --nofile=1024:1024`), the API over TLS, with `args`.
pub fn server_under_ulimit(dir: &Path, args: &[&str]) -> KilnServer {
    let images = dir.join("images");
    crate::fake_image(&images, "tiny");
    let state = dir.join("state");
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=1024:1024").arg(&binaries().kiln).arg("serve").arg("--images").arg(&images).arg("--state").arg(&state);
    cmd.args(["--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"]).args(args);
    KilnServer::spawn(cmd, &state)
}

/// `GET path` on a new plain connection to `addr`: the status and the time
/// to the whole answer.
pub fn plain_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, Duration)> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let status = std::str::from_utf8(answer.get(9..12).unwrap_or_default()).ok().and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, start.elapsed()))
}

/// A client of the server's TLS API that opens a new connection (TCP and
/// TLS handshake) for every request, as a newcomer does; the operator's.
pub fn fresh_tls_client(server: &KilnServer, timeout: Duration) -> reqwest::blocking::Client {
    let pem = std::fs::read(server.ca.as_ref().expect("the API is on TLS")).expect("the server wrote its CA");
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .pool_max_idle_per_host(0)
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).expect("a PEM CA"))
        .identity(reqwest::Identity::from_pem(&server.operator_pem()).expect("the operator's PEM"))
        .build()
        .expect("an HTTP client")
}

/// `GET url` with `client`: the status and the time to the whole answer.
pub fn tls_get(client: &reqwest::blocking::Client, url: &str) -> reqwest::Result<(u16, Duration)> {
    let start = Instant::now();
    let resp = client.get(url).send()?;
    let status = resp.status().as_u16();
    resp.bytes()?;
    Ok((status, start.elapsed()))
}

/// The `p`th percentile of `sorted` (nearest rank).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The socket address of `http://HOST:PORT` or `https://HOST:PORT`.
pub fn addr_of(url: &str) -> SocketAddr {
    url.split_once("://").map_or(url, |(_, rest)| rest).trim_end_matches('/').parse().expect("a URL of an address and port")
}
