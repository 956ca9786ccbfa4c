//! TFTP: a read-only server for the first thing a PXE ROM loads (iPXE's
//! `undionly.kpxe`, `ipxe.efi` or `snponly.efi`).
//!
//! RFC 1350 with option negotiation (RFC 2347): `blksize` (RFC 2348),
//! `tsize` and `timeout` (RFC 2349) and `windowsize` (RFC 7440). Transfer
//! modes `octet` and `netascii` are served; `mail` and every write request
//! are refused with an error packet.
//!
//! What is served is a fixed table built once at start (see `Table`): each
//! regular file directly in the root, symlinks followed wherever the
//! operator pointed them (Debian's `/usr/lib/ipxe/ipxe.efi` is a link to
//! `/boot/ipxe.efi`), opened then and read at an offset by each transfer.
//! A request names a table entry exactly (after leading `/`s) or gets
//! "file not found"; a `..` component is an "access violation". No request
//! reaches the file system, so no spelling of a path reaches anything else.
//!
//! Everything a client can make the server hold is bounded: transfers in
//! progress ([`TftpConfig::max_transfers`]) and per client address
//! ([`TftpConfig::max_per_client`]), a request above either answered with an
//! error packet from the listening socket; one window of memory per transfer
//! ([`MAX_WINDOW_BYTES`]); the client's `timeout` up to [`MAX_TIMEOUT_SECS`]
//! and [`TftpConfig::retries`] resends, after which the transfer ends and
//! frees its socket.
//!
//! [`parse_packet`] is a pure function (fuzzed in `tests/fuzz_parsers.rs`).
//! A packet that does not parse is dropped and counted in
//! [`TftpStats::malformed`]; nothing a client sends can stop the server.
//!
//! [`TftpServer::start`] binds the listening socket and spawns the server
//! task; each transfer then runs in a task of its own on a fresh socket (its
//! transfer ID), as RFC 1350 asks. To add an option, parse it in
//! [`parse_packet`] into [`Options`] and answer it in `negotiate`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Opcode of a read request.
const OP_RRQ: u16 = 1;
/// Opcode of a write request.
const OP_WRQ: u16 = 2;
/// Opcode of a data packet.
const OP_DATA: u16 = 3;
/// Opcode of an acknowledgement.
const OP_ACK: u16 = 4;
/// Opcode of an error packet.
const OP_ERROR: u16 = 5;
/// Opcode of an option acknowledgement (RFC 2347).
const OP_OACK: u16 = 6;

/// The block size without the `blksize` option (RFC 1350).
pub const DEFAULT_BLKSIZE: u16 = 512;
/// The smallest `blksize` RFC 2348 allows.
pub const MIN_BLKSIZE: u16 = 8;
/// The largest `blksize` RFC 2348 allows.
pub const MAX_BLKSIZE: u16 = 65464;

/// TFTP error codes (RFC 1350, RFC 2347).
pub mod error_code {
    /// Not defined, see the message.
    pub const UNDEFINED: u16 = 0;
    /// File not found.
    pub const FILE_NOT_FOUND: u16 = 1;
    /// Access violation.
    pub const ACCESS_VIOLATION: u16 = 2;
    /// Illegal TFTP operation.
    pub const ILLEGAL_OPERATION: u16 = 4;
    /// Option negotiation refused (RFC 2347).
    pub const OPTION_REFUSED: u16 = 8;
}

/// A TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Read request.
    Rrq(Request),
    /// Write request.
    Wrq(Request),
    /// A block of data.
    Data {
        /// The block number (the first is 1; it wraps from 65535 to 0).
        block: u16,
        /// The bytes; fewer than the block size in the last block.
        data: &'a [u8],
    },
    /// Acknowledgement of a block (0 acknowledges an OACK).
    Ack(u16),
    /// An error; ends the transfer.
    Error {
        /// One of [`error_code`].
        code: u16,
        /// Human-readable text.
        message: String,
    },
    /// The options the server accepted, as name and value.
    OAck(Vec<(String, String)>),
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The file name as the client sent it.
    pub filename: String,
    /// The transfer mode.
    pub mode: Mode,
    /// The options this server knows, with valid values; others are ignored.
    pub options: Options,
}

/// Transfer mode (case-insensitive on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Text: line ends as CR LF, a bare CR as CR NUL.
    Netascii,
    /// Bytes as they are.
    Octet,
    /// Obsolete; refused.
    Mail,
}

/// Options of a request (RFC 2347). An option with a value out of its range
/// is ignored, as if the client had not sent it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// `blksize`: bytes per block, 8..=65464 (a larger request is clamped).
    pub blksize: Option<u16>,
    /// `tsize`: 0 in a read request, asking for the file's size.
    pub tsize: Option<u64>,
    /// `timeout`: seconds before a retransmission, 1..=255.
    pub timeout: Option<u8>,
    /// `windowsize`: blocks sent before waiting for an acknowledgement, 1..=65535.
    pub windowsize: Option<u16>,
}

/// Why a packet did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than its opcode and fixed fields.
    #[error("packet of {len} bytes is too short")]
    TooShort {
        /// The packet's length.
        len: usize,
    },
    /// An opcode TFTP does not define.
    #[error("unknown opcode {opcode}")]
    Opcode {
        /// The opcode.
        opcode: u16,
    },
    /// A string field without its terminating NUL.
    #[error("{field} is not NUL-terminated")]
    Unterminated {
        /// The field.
        field: &'static str,
    },
    /// A string field that is not UTF-8.
    #[error("{field} is not UTF-8")]
    NotUtf8 {
        /// The field.
        field: &'static str,
    },
    /// An empty file name.
    #[error("empty file name")]
    EmptyFilename,
    /// A mode other than netascii, octet or mail.
    #[error("unknown transfer mode {mode:?}")]
    Mode {
        /// The mode as sent.
        mode: String,
    },
    /// An option name with no value after it.
    #[error("option {name:?} has no value")]
    OptionWithoutValue {
        /// The option's name.
        name: String,
    },
    /// Bytes after the last field of a fixed-size packet.
    #[error("{extra} bytes after the end of the packet")]
    Trailing {
        /// How many.
        extra: usize,
    },
}

/// Parses one TFTP packet. Pure: no I/O, no panics on any input.
pub fn parse_packet(bytes: &[u8]) -> Result<Packet<'_>, ParseError> {
    if bytes.len() < 4 {
        return Err(ParseError::TooShort { len: bytes.len() });
    }
    let opcode = u16::from_be_bytes([bytes[0], bytes[1]]);
    let body = &bytes[2..];
    match opcode {
        OP_RRQ => parse_request(body).map(Packet::Rrq),
        OP_WRQ => parse_request(body).map(Packet::Wrq),
        OP_DATA => Ok(Packet::Data { block: u16::from_be_bytes([body[0], body[1]]), data: &body[2..] }),
        OP_ACK => match body.len() {
            2 => Ok(Packet::Ack(u16::from_be_bytes([body[0], body[1]]))),
            n => Err(ParseError::Trailing { extra: n - 2 }),
        },
        OP_ERROR => {
            let code = u16::from_be_bytes([body[0], body[1]]);
            let mut rest = &body[2..];
            let message = take_str(&mut rest, "error message")?.to_string();
            Ok(Packet::Error { code, message })
        }
        OP_OACK => {
            let mut rest = body;
            let mut options = Vec::new();
            while !rest.is_empty() {
                let name = take_str(&mut rest, "option name")?.to_string();
                if rest.is_empty() {
                    return Err(ParseError::OptionWithoutValue { name });
                }
                let value = take_str(&mut rest, "option value")?.to_string();
                options.push((name, value));
            }
            Ok(Packet::OAck(options))
        }
        opcode => Err(ParseError::Opcode { opcode }),
    }
}

/// Splits one NUL-terminated UTF-8 string off the front of `rest`.
fn take_str<'a>(rest: &mut &'a [u8], field: &'static str) -> Result<&'a str, ParseError> {
    let nul = rest.iter().position(|&b| b == 0).ok_or(ParseError::Unterminated { field })?;
    let s = std::str::from_utf8(&rest[..nul]).map_err(|_| ParseError::NotUtf8 { field })?;
    *rest = &rest[nul + 1..];
    Ok(s)
}

fn parse_request(body: &[u8]) -> Result<Request, ParseError> {
    let mut rest = body;
    let filename = take_str(&mut rest, "file name")?.to_string();
    if filename.is_empty() {
        return Err(ParseError::EmptyFilename);
    }
    let mode = take_str(&mut rest, "mode")?;
    let mode = match mode.to_ascii_lowercase().as_str() {
        "netascii" => Mode::Netascii,
        "octet" => Mode::Octet,
        "mail" => Mode::Mail,
        _ => return Err(ParseError::Mode { mode: mode.to_string() }),
    };
    let mut options = Options::default();
    // Some ROMs pad requests with NULs: trailing zero bytes are not an option.
    while !rest.is_empty() && rest.iter().any(|&b| b != 0) {
        let name = take_str(&mut rest, "option name")?;
        if rest.is_empty() {
            return Err(ParseError::OptionWithoutValue { name: name.to_string() });
        }
        let value = take_str(&mut rest, "option value")?;
        match name.to_ascii_lowercase().as_str() {
            "blksize" => {
                options.blksize =
                    value.parse::<u32>().ok().filter(|&v| v >= u32::from(MIN_BLKSIZE)).map(|v| v.min(u32::from(MAX_BLKSIZE)) as u16)
            }
            "tsize" => options.tsize = value.parse().ok(),
            "timeout" => options.timeout = value.parse().ok().filter(|&v| v >= 1),
            "windowsize" => options.windowsize = value.parse().ok().filter(|&v| v >= 1),
            _ => {}
        }
    }
    Ok(Request { filename, mode, options })
}

impl Packet<'_> {
    /// Appends the packet's wire form to `buf`.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        fn str0(buf: &mut Vec<u8>, s: &str) {
            buf.extend_from_slice(s.as_bytes());
            buf.push(0);
        }
        match self {
            Packet::Rrq(r) | Packet::Wrq(r) => {
                let op = if matches!(self, Packet::Rrq(_)) { OP_RRQ } else { OP_WRQ };
                buf.extend_from_slice(&op.to_be_bytes());
                str0(buf, &r.filename);
                str0(
                    buf,
                    match r.mode {
                        Mode::Netascii => "netascii",
                        Mode::Octet => "octet",
                        Mode::Mail => "mail",
                    },
                );
                let o = &r.options;
                for (name, value) in [
                    ("blksize", o.blksize.map(u64::from)),
                    ("tsize", o.tsize),
                    ("timeout", o.timeout.map(u64::from)),
                    ("windowsize", o.windowsize.map(u64::from)),
                ] {
                    if let Some(v) = value {
                        str0(buf, name);
                        str0(buf, &v.to_string());
                    }
                }
            }
            Packet::Data { block, data } => {
                buf.extend_from_slice(&OP_DATA.to_be_bytes());
                buf.extend_from_slice(&block.to_be_bytes());
                buf.extend_from_slice(data);
            }
            Packet::Ack(block) => {
                buf.extend_from_slice(&OP_ACK.to_be_bytes());
                buf.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => {
                buf.extend_from_slice(&OP_ERROR.to_be_bytes());
                buf.extend_from_slice(&code.to_be_bytes());
                str0(buf, message);
            }
            Packet::OAck(options) => {
                buf.extend_from_slice(&OP_OACK.to_be_bytes());
                for (name, value) in options {
                    str0(buf, name);
                    str0(buf, value);
                }
            }
        }
    }

    /// The packet's wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        self.encode(&mut buf);
        buf
    }
}

/// Starting the server failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The root directory cannot be resolved, listed or is not a directory.
    #[error("TFTP root {path}")]
    Root {
        /// The root as given.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The listening socket cannot be bound.
    #[error("TFTP bind {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Concurrent transfers by default (`kiln serve --tftp-max-transfers`).
pub const DEFAULT_MAX_TRANSFERS: usize = 256;
/// Concurrent transfers per client address by default.
pub const DEFAULT_MAX_PER_CLIENT: usize = 8;
/// The longest `timeout` option granted; a longer one is left out of the
/// OACK (RFC 2349), so the server's own timeout holds.
pub const MAX_TIMEOUT_SECS: u8 = 5;
/// The most bytes of data one window holds: `windowsize` is lowered until
/// `windowsize × blksize` fits (at least one block).
pub const MAX_WINDOW_BYTES: usize = 128 * 1024;

/// How the server behaves; [`TftpConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct TftpConfig {
    /// The directory whose files are served.
    pub root: PathBuf,
    /// The address to listen on (port 69 for PXE ROMs).
    pub addr: SocketAddr,
    /// Wait for an acknowledgement this long before sending again, unless
    /// the client asks for another `timeout` (up to [`MAX_TIMEOUT_SECS`]).
    pub timeout: Duration,
    /// Give a transfer up after this many retransmissions in a row.
    pub retries: u32,
    /// The largest `blksize` granted.
    pub max_blksize: u16,
    /// The largest `windowsize` granted.
    pub max_windowsize: u16,
    /// Transfers in progress at once; a request above it gets an error packet.
    pub max_transfers: usize,
    /// Transfers in progress at once from one client address.
    pub max_per_client: usize,
}

impl TftpConfig {
    /// Defaults: 1 s timeout, 5 retries, blksize up to 65464, windowsize up
    /// to 64, [`DEFAULT_MAX_TRANSFERS`] and [`DEFAULT_MAX_PER_CLIENT`].
    pub fn new(root: PathBuf, addr: SocketAddr) -> Self {
        TftpConfig {
            root,
            addr,
            timeout: Duration::from_secs(1),
            retries: 5,
            max_blksize: MAX_BLKSIZE,
            max_windowsize: 64,
            max_transfers: DEFAULT_MAX_TRANSFERS,
            max_per_client: DEFAULT_MAX_PER_CLIENT,
        }
    }
}

/// What the server has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TftpStats {
    /// Read and write requests received (a retransmitted request for a
    /// transfer in progress is not counted again).
    pub requests: u64,
    /// Files sent to the end, last block acknowledged.
    pub served: u64,
    /// Requests answered with an error packet (not found, access violation,
    /// write request, mail mode, too many transfers).
    pub refused: u64,
    /// Transfers given up: no acknowledgement after the retries, or the
    /// client sent an error.
    pub failed: u64,
    /// Packets dropped because they did not parse.
    pub malformed: u64,
    /// Transfers in progress now.
    pub active: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    served: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    malformed: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One file the server serves: opened once at start, read at an offset by
/// each transfer (the open file is shared; a transfer holds no descriptor
/// but its socket).
#[derive(Debug)]
struct Entry {
    file: Arc<std::fs::File>,
    size: u64,
}

/// The fixed table of names the server answers, built once at start: every
/// entry directly in the root whose name is printable ASCII without `/` or
/// `\` and which, after following symlinks wherever the operator pointed
/// them (as tftpd-hpa does with Debian's `/usr/lib/ipxe/ipxe.efi` →
/// `/boot/ipxe.efi`), is a regular file. Subdirectories are not served.
/// A file replaced on disk afterwards is served as it was at start.
#[derive(Debug, Default)]
struct Table {
    entries: BTreeMap<String, Entry>,
}

impl Table {
    /// Lists `root` and opens each file of the table (one that cannot be
    /// opened is left out, with a warning).
    fn build(root: &Path) -> Result<Table, Error> {
        let root_error = |source| Error::Root { path: root.to_path_buf(), source };
        let meta = std::fs::metadata(root).map_err(root_error)?;
        if !meta.is_dir() {
            return Err(root_error(std::io::Error::other("not a directory")));
        }
        let mut entries = BTreeMap::new();
        for dirent in std::fs::read_dir(root).map_err(root_error)? {
            let path = dirent.map_err(root_error)?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).filter(|n| Self::valid_name(n)) else {
                continue;
            };
            // A dangling link or an unreadable target is left out, not fatal.
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            if !meta.is_file() {
                continue;
            }
            match std::fs::File::open(&path).and_then(|f| Ok((f.metadata()?.len(), f))) {
                Ok((size, file)) => {
                    entries.insert(name.to_string(), Entry { file: Arc::new(file), size });
                }
                Err(e) => tracing::warn!("tftp: not serving {}: {e}", path.display()),
            }
        }
        Ok(Table { entries })
    }

    fn valid_name(name: &str) -> bool {
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\')
    }

    /// The entry a requested name means: leading `/`s are dropped (PXE ROMs
    /// send `/ipxe.efi` too), then the name must be in the table exactly.
    /// A `..` component, however separated, is an access violation.
    fn lookup(&self, filename: &str) -> Result<&Entry, Refusal> {
        if filename.split(['/', '\\']).any(|c| c == "..") {
            return Err(ACCESS);
        }
        self.entries.get(filename.trim_start_matches('/')).ok_or(NOT_FOUND)
    }
}

/// Transfers in progress, by peer and by client address.
#[derive(Debug, Default)]
struct Active {
    peers: HashSet<SocketAddr>,
    per_ip: HashMap<IpAddr, usize>,
}

/// State the listener shares with its transfers.
#[derive(Debug)]
struct Shared {
    root: PathBuf,
    table: Table,
    config: TftpConfig,
    counters: Counters,
    active: Mutex<Active>,
}

/// Why a request was not admitted.
enum Admission {
    /// A retransmission of a request in progress: ignored.
    Duplicate,
    /// Over a cap: answered with this refusal.
    Busy(Refusal),
}

impl Shared {
    /// Admits a transfer for `peer` within the caps; the slot is released
    /// when the returned guard drops.
    fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Slot, Admission> {
        let mut active = self.active.lock().expect("active set");
        if active.peers.contains(&peer) {
            return Err(Admission::Duplicate);
        }
        if active.peers.len() >= self.config.max_transfers {
            return Err(Admission::Busy(BUSY));
        }
        let from_ip = active.per_ip.entry(peer.ip()).or_default();
        if *from_ip >= self.config.max_per_client {
            return Err(Admission::Busy(BUSY_CLIENT));
        }
        *from_ip += 1;
        active.peers.insert(peer);
        Ok(Slot { shared: Arc::clone(self), peer })
    }
}

/// One admitted transfer; dropping it frees its place under the caps.
struct Slot {
    shared: Arc<Shared>,
    peer: SocketAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut active = self.shared.active.lock().expect("active set");
        active.peers.remove(&self.peer);
        if let Some(n) = active.per_ip.get_mut(&self.peer.ip()) {
            *n -= 1;
            if *n == 0 {
                active.per_ip.remove(&self.peer.ip());
            }
        }
    }
}

/// A running TFTP server. Dropping it stops the server; [`TftpServer::shutdown`]
/// also waits for the server task to end.
#[derive(Debug)]
pub struct TftpServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl TftpServer {
    /// Serves `root` on `addr` with the defaults of [`TftpConfig::new`].
    pub async fn start(root: PathBuf, addr: SocketAddr) -> Result<TftpServer, Error> {
        Self::start_with(TftpConfig::new(root, addr)).await
    }

    /// Builds the table, binds, spawns the server task and logs
    /// `tftp: listening on ADDR (root DIR: NAMES)`.
    pub async fn start_with(config: TftpConfig) -> Result<TftpServer, Error> {
        let root = config.root.clone();
        let table = tokio::task::spawn_blocking(move || Table::build(&root))
            .await
            .map_err(|e| Error::Root { path: config.root.clone(), source: std::io::Error::other(e) })??;
        let socket = UdpSocket::bind(config.addr).await.map_err(|source| Error::Bind { addr: config.addr, source })?;
        let local_addr = socket.local_addr().map_err(|source| Error::Bind { addr: config.addr, source })?;
        let names: Vec<&str> = table.entries.keys().map(String::as_str).collect();
        tracing::info!("tftp: listening on {local_addr} (root {}: {})", config.root.display(), names.join(" "));
        let shared = Arc::new(Shared { root: config.root.clone(), table, config, counters: Counters::default(), active: Mutex::default() });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(listen(socket, Arc::clone(&shared), cancel.clone()));
        Ok(TftpServer { local_addr, shared, cancel, task: Some(task) })
    }

    /// The address the server listens on (with the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The root directory as given.
    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    /// Whether a request for `name` is served (it is in the table).
    pub fn serves(&self, name: &str) -> bool {
        self.shared.table.lookup(name).is_ok()
    }

    /// The names served, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.shared.table.entries.keys().map(String::as_str)
    }

    /// The counters so far.
    pub fn stats(&self) -> TftpStats {
        let c = &self.shared.counters;
        TftpStats {
            requests: c.requests.load(Ordering::Relaxed),
            served: c.served.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            active: self.shared.active.lock().expect("active set").peers.len() as u64,
        }
    }

    /// Stops listening and aborts transfers in progress, then waits for the
    /// server task to end.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TftpServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn listen(socket: UdpSocket, shared: Arc<Shared>, cancel: CancellationToken) {
    let mut buf = vec![0u8; 65536];
    loop {
        let (len, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("tftp: receive on {:?}: {e}", socket.local_addr());
                    continue;
                }
            },
        };
        let (request, write) = match parse_packet(&buf[..len]) {
            Ok(Packet::Rrq(r)) => (r, false),
            Ok(Packet::Wrq(r)) => (r, true),
            Ok(other) => {
                tracing::debug!("tftp: {peer}: ignoring {other:?} on the listening port");
                continue;
            }
            Err(e) => {
                Counters::bump(&shared.counters.malformed);
                tracing::debug!("tftp: {peer}: dropped malformed packet: {e}");
                continue;
            }
        };
        let slot = match shared.admit(peer) {
            Ok(slot) => slot,
            Err(Admission::Duplicate) => continue,
            Err(Admission::Busy(r)) => {
                // Answered from the listening socket: a refusal costs no descriptor.
                Counters::bump(&shared.counters.requests);
                Counters::bump(&shared.counters.refused);
                tracing::debug!("tftp: {peer}: {:?}: {}", request.filename, r.message);
                let _ = socket.send_to(&r.packet(), peer).await;
                continue;
            }
        };
        Counters::bump(&shared.counters.requests);
        let local_ip = socket.local_addr().map(|a| a.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let shared = Arc::clone(&shared);
        let cancel = cancel.child_token();
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = transfer(&shared, local_ip, peer, request, write) => {}
            }
            drop(slot);
        });
    }
}

/// Why a request is not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refusal {
    code: u16,
    message: &'static str,
}

impl Refusal {
    fn packet(&self) -> Vec<u8> {
        Packet::Error { code: self.code, message: self.message.to_string() }.to_bytes()
    }
}

const NOT_FOUND: Refusal = Refusal { code: error_code::FILE_NOT_FOUND, message: "file not found" };
const ACCESS: Refusal = Refusal { code: error_code::ACCESS_VIOLATION, message: "access violation" };
const BUSY: Refusal = Refusal { code: error_code::UNDEFINED, message: "server busy: too many transfers" };
const BUSY_CLIENT: Refusal = Refusal { code: error_code::UNDEFINED, message: "server busy: too many transfers from this address" };

/// Serves one request on a socket of its own.
async fn transfer(shared: &Shared, local_ip: IpAddr, peer: SocketAddr, request: Request, write: bool) {
    let counters = &shared.counters;
    let socket = match UdpSocket::bind(SocketAddr::new(local_ip, 0)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("tftp: {peer}: cannot bind a transfer socket on {local_ip}: {e}");
            Counters::bump(&counters.failed);
            return;
        }
    };
    if let Err(e) = socket.connect(peer).await {
        tracing::debug!("tftp: {peer}: connect: {e}");
        Counters::bump(&counters.failed);
        return;
    }
    let refuse = |r: Refusal| {
        Counters::bump(&counters.refused);
        let socket = &socket;
        async move {
            let _ = socket.send(&r.packet()).await;
        }
    };
    if write {
        tracing::info!("tftp: {peer}: write request for {:?} refused (read-only server)", request.filename);
        return refuse(Refusal { code: error_code::ACCESS_VIOLATION, message: "read-only server" }).await;
    }
    if request.mode == Mode::Mail {
        return refuse(Refusal { code: error_code::ILLEGAL_OPERATION, message: "mail mode is not supported" }).await;
    }
    let entry = match shared.table.lookup(&request.filename) {
        Ok(e) => e,
        Err(r) => {
            tracing::info!("tftp: {peer}: {:?}: {}", request.filename, r.message);
            return refuse(r).await;
        }
    };
    let negotiated = negotiate(&shared.config, &request, entry.size);
    let mut sender =
        Sender { socket: &socket, peer, timeout: negotiated.timeout, retries: shared.config.retries, counters, buf: vec![0u8; 1024] };
    // Blocks stream from the shared open file, one window per read.
    let reader = FileAt { file: Arc::clone(&entry.file), offset: 0 };
    let source = match request.mode {
        Mode::Netascii => BlockSource::Netascii { inner: reader, pending: VecDeque::new(), eof: false },
        _ => BlockSource::Octet(reader),
    };
    tracing::debug!("tftp: {peer}: sending {:?} ({} bytes, {negotiated:?})", request.filename, entry.size);
    match sender.run(&negotiated, source).await {
        Ok(()) => {
            Counters::bump(&counters.served);
            tracing::debug!("tftp: {peer}: sent {:?}", request.filename);
        }
        Err(e) => {
            Counters::bump(&counters.failed);
            tracing::info!("tftp: {peer}: transfer of {:?} failed: {}", request.filename, kiln_core::error_chain(&e));
        }
    }
}

/// What the server grants for one transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Negotiated {
    blksize: u16,
    windowsize: u16,
    timeout: Duration,
    /// The OACK to send first, if the client asked for any option.
    oack: Vec<(String, String)>,
}

fn negotiate(config: &TftpConfig, request: &Request, size: u64) -> Negotiated {
    let o = &request.options;
    let mut oack = Vec::new();
    let blksize = match o.blksize {
        Some(b) => {
            let b = b.clamp(MIN_BLKSIZE, config.max_blksize.max(MIN_BLKSIZE));
            oack.push(("blksize".to_string(), b.to_string()));
            b
        }
        None => DEFAULT_BLKSIZE,
    };
    // A client cannot hold a transfer (its socket and window) for minutes:
    // a timeout above the cap is not acknowledged, and ours holds.
    let timeout = match o.timeout.filter(|&t| t <= MAX_TIMEOUT_SECS) {
        Some(t) => {
            oack.push(("timeout".to_string(), t.to_string()));
            Duration::from_secs(u64::from(t))
        }
        None => config.timeout,
    };
    // A netascii file's size on the wire is not its size on disk.
    if o.tsize.is_some() && request.mode == Mode::Octet {
        oack.push(("tsize".to_string(), size.to_string()));
    }
    let window_cap = (MAX_WINDOW_BYTES / usize::from(blksize)).clamp(1, usize::from(u16::MAX)) as u16;
    let windowsize = match o.windowsize {
        Some(w) => {
            let w = w.min(config.max_windowsize.max(1)).min(window_cap);
            oack.push(("windowsize".to_string(), w.to_string()));
            w
        }
        None => 1,
    };
    Negotiated { blksize, windowsize, timeout, oack }
}

/// Sequential reads of a shared open file at a transfer's own offset.
struct FileAt {
    file: Arc<std::fs::File>,
    offset: u64,
}

impl Read for FileAt {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(out, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// Where blocks come from: the file as is, or converted to netascii.
enum BlockSource<R> {
    Octet(R),
    Netascii { inner: R, pending: VecDeque<u8>, eof: bool },
}

impl<R: Read> BlockSource<R> {
    /// Fills `out` as far as the file goes; returns how many bytes it wrote.
    fn fill(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        match self {
            BlockSource::Octet(r) => {
                let mut n = 0;
                while n < out.len() {
                    match r.read(&mut out[n..])? {
                        0 => break,
                        k => n += k,
                    }
                }
                Ok(n)
            }
            BlockSource::Netascii { inner, pending, eof } => {
                let mut chunk = [0u8; 8192];
                while pending.len() < out.len() && !*eof {
                    let k = inner.read(&mut chunk)?;
                    if k == 0 {
                        *eof = true;
                    }
                    for &b in &chunk[..k] {
                        match b {
                            b'\n' => pending.extend([b'\r', b'\n']),
                            b'\r' => pending.extend([b'\r', 0]),
                            b => pending.push_back(b),
                        }
                    }
                }
                let n = pending.len().min(out.len());
                for (slot, b) in out.iter_mut().zip(pending.drain(..n)) {
                    *slot = b;
                }
                Ok(n)
            }
        }
    }
}

/// The blocks of one window that are sent and not yet acknowledged, and the
/// buffers of acknowledged ones kept for the next blocks (a transfer holds at
/// most one window of memory).
struct Window {
    packets: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    /// The block number of the next packet to read.
    next: u16,
    eof: bool,
}

impl Window {
    /// Reads blocks until the window is full or the file ends, on a blocking
    /// thread (one hop per window, not per block).
    async fn refill<R: Read + Send + 'static>(
        &mut self,
        source: BlockSource<R>,
        blksize: usize,
        windowsize: usize,
    ) -> Result<BlockSource<R>, TransferError> {
        let need = windowsize.saturating_sub(self.packets.len());
        if self.eof || need == 0 {
            return Ok(source);
        }
        let mut spare = std::mem::take(&mut self.spare);
        let next = self.next;
        let read = tokio::task::spawn_blocking(move || {
            let mut source = source;
            let mut filled = Vec::with_capacity(need);
            let mut eof = false;
            let mut block = next;
            while filled.len() < need && !eof {
                let mut packet = spare.pop().unwrap_or_default();
                packet.clear();
                packet.extend_from_slice(&OP_DATA.to_be_bytes());
                packet.extend_from_slice(&block.to_be_bytes());
                packet.resize(4 + blksize, 0);
                let len = match source.fill(&mut packet[4..]) {
                    Ok(len) => len,
                    Err(e) => return Err(e),
                };
                packet.truncate(4 + len);
                eof = len < blksize;
                filled.push(packet);
                block = block.wrapping_add(1);
            }
            Ok((source, filled, spare, eof))
        })
        .await
        .map_err(|e| TransferError::Read(std::io::Error::other(e)))?;
        let (source, filled, spare, eof) = read.map_err(TransferError::Read)?;
        self.next = self.next.wrapping_add(filled.len() as u16);
        self.packets.extend(filled);
        self.spare = spare;
        self.eof = eof;
        Ok(source)
    }

    /// Drops the first `acked` packets, keeping their buffers.
    fn acknowledge(&mut self, acked: usize) {
        self.spare.extend(self.packets.drain(..acked));
    }
}

/// What an acknowledgement wait ended with.
enum AckWait {
    /// This many blocks of the window are acknowledged.
    Acked(usize),
    /// Nothing usable before the timeout.
    Timeout,
    /// The client acknowledged the block before the window: it lost the
    /// window's first block (RFC 7440), so the window goes out again now.
    Resend,
}

/// A transfer that stopped before its last block was acknowledged.
#[derive(Debug, thiserror::Error)]
enum TransferError {
    /// The file could not be read.
    #[error("reading the file")]
    Read(#[source] std::io::Error),
    /// The socket could not send.
    #[error("send")]
    Send(#[source] std::io::Error),
    /// The socket could not receive.
    #[error("receive")]
    Receive(#[source] std::io::Error),
    /// The client stopped acknowledging.
    #[error("no acknowledgement of block {block} after {tries} tries")]
    NoAck {
        /// The first block of the window.
        block: u16,
        /// Sends of the window.
        tries: u32,
    },
    /// The client sent an error packet (its message is escaped).
    #[error("client sent error {code}: {message:?}")]
    Client {
        /// The TFTP error code.
        code: u16,
        /// The client's message.
        message: String,
    },
}

/// The sending half of one transfer.
struct Sender<'a> {
    socket: &'a UdpSocket,
    peer: SocketAddr,
    timeout: Duration,
    retries: u32,
    counters: &'a Counters,
    /// Where acknowledgements are received (an ACK is 4 bytes; anything
    /// longer is not one).
    buf: Vec<u8>,
}

impl Sender<'_> {
    async fn run<R: Read + Send + 'static>(&mut self, n: &Negotiated, mut source: BlockSource<R>) -> Result<(), TransferError> {
        if !n.oack.is_empty() {
            let oack = Packet::OAck(n.oack.clone()).to_bytes();
            let window = VecDeque::from([oack]);
            self.send_until_acked(&window, 0, 1).await?;
        }
        let blksize = usize::from(n.blksize);
        let windowsize = usize::from(n.windowsize);
        let mut window = Window { packets: VecDeque::with_capacity(windowsize), spare: Vec::new(), next: 1, eof: false };
        let mut base: u16 = 1;
        loop {
            source = window.refill(source, blksize, windowsize).await?;
            if window.packets.is_empty() {
                return Ok(());
            }
            let acked = self.send_until_acked(&window.packets, base, windowsize).await?;
            window.acknowledge(acked);
            base = base.wrapping_add(acked as u16);
        }
    }

    /// Sends `window` (blocks `base`, `base + 1`, ...) until the client
    /// acknowledges some of it; returns how many blocks it acknowledged.
    async fn send_until_acked(&mut self, window: &VecDeque<Vec<u8>>, base: u16, windowsize: usize) -> Result<usize, TransferError> {
        let mut tries = 0;
        loop {
            for packet in window {
                self.socket.send(packet).await.map_err(TransferError::Send)?;
            }
            match self.wait_ack(base, window.len(), windowsize).await? {
                AckWait::Acked(k) => return Ok(k),
                AckWait::Timeout | AckWait::Resend => {
                    tries += 1;
                    if tries > self.retries {
                        return Err(TransferError::NoAck { block: base, tries });
                    }
                }
            }
        }
    }

    async fn wait_ack(&mut self, base: u16, len: usize, windowsize: usize) -> Result<AckWait, TransferError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let received = match tokio::time::timeout_at(deadline, self.socket.recv(&mut self.buf)).await {
                Err(_) => return Ok(AckWait::Timeout),
                Ok(Err(e)) => return Err(TransferError::Receive(e)),
                Ok(Ok(k)) => k,
            };
            match parse_packet(&self.buf[..received]) {
                Ok(Packet::Ack(block)) => {
                    let offset = usize::from(block.wrapping_sub(base));
                    if offset < len {
                        return Ok(AckWait::Acked(offset + 1));
                    }
                    // With one block per window a duplicate ACK is ignored
                    // (the Sorcerer's Apprentice bug); with more it means the
                    // client is missing the window's first block.
                    if windowsize > 1 && block == base.wrapping_sub(1) {
                        return Ok(AckWait::Resend);
                    }
                }
                Ok(Packet::Error { code, message }) => return Err(TransferError::Client { code, message: message.to_string() }),
                Ok(other) => tracing::debug!("tftp: {}: unexpected {other:?}", self.peer),
                Err(e) => {
                    Counters::bump(&self.counters.malformed);
                    tracing::debug!("tftp: {}: dropped malformed packet: {e}", self.peer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Output;
    use tokio::process::Command;

    // ---- the parser ----

    fn rrq(filename: &str, mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
        let mut b = OP_RRQ.to_be_bytes().to_vec();
        for s in [filename, mode].into_iter().chain(options.iter().flat_map(|(n, v)| [*n, *v])) {
            b.extend_from_slice(s.as_bytes());
            b.push(0);
        }
        b
    }

    fn request(filename: &str, mode: Mode, options: Options) -> Request {
        Request { filename: filename.into(), mode, options }
    }

    #[test]
    fn parses_valid_packets() {
        let all = Options { blksize: Some(1428), tsize: Some(0), timeout: Some(3), windowsize: Some(16) };
        let cases: Vec<(&str, Vec<u8>, Packet<'static>)> = vec![
            ("plain rrq", rrq("ipxe.efi", "octet", &[]), Packet::Rrq(request("ipxe.efi", Mode::Octet, Options::default()))),
            ("mode is case-insensitive", rrq("a", "NetASCII", &[]), Packet::Rrq(request("a", Mode::Netascii, Options::default()))),
            (
                "every option",
                rrq("a", "octet", &[("blksize", "1428"), ("tsize", "0"), ("timeout", "3"), ("windowsize", "16")]),
                Packet::Rrq(request("a", Mode::Octet, all)),
            ),
            (
                "option names are case-insensitive",
                rrq("a", "octet", &[("BLKSIZE", "1024"), ("WindowSize", "4")]),
                Packet::Rrq(request("a", Mode::Octet, Options { blksize: Some(1024), windowsize: Some(4), ..Options::default() })),
            ),
            (
                "blksize above 65464 is clamped",
                rrq("a", "octet", &[("blksize", "65535")]),
                Packet::Rrq(request("a", Mode::Octet, Options { blksize: Some(MAX_BLKSIZE), ..Options::default() })),
            ),
            (
                "out-of-range and unknown options are ignored",
                rrq("a", "octet", &[("blksize", "7"), ("timeout", "0"), ("windowsize", "0"), ("tsize", "x"), ("multicast", "")]),
                Packet::Rrq(request("a", Mode::Octet, Options::default())),
            ),
            (
                "trailing NUL padding",
                [rrq("a", "octet", &[]), vec![0, 0, 0]].concat(),
                Packet::Rrq(request("a", Mode::Octet, Options::default())),
            ),
            ("wrq", [&[0u8, 2][..], b"up\0octet\0"].concat(), Packet::Wrq(request("up", Mode::Octet, Options::default()))),
            ("data", vec![0, 3, 0xff, 0xff, 1, 2, 3], Packet::Data { block: 65535, data: &[1, 2, 3] }),
            ("empty data", vec![0, 3, 0, 7], Packet::Data { block: 7, data: &[] }),
            ("ack", vec![0, 4, 1, 0], Packet::Ack(256)),
            ("error", [&[0u8, 5, 0, 1][..], b"nope\0"].concat(), Packet::Error { code: 1, message: "nope".into() }),
            ("oack", [&[0u8, 6][..], b"blksize\x001428\0"].concat(), Packet::OAck(vec![("blksize".into(), "1428".into())])),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(parse_packet(&bytes), Ok(want.clone()), "case {name}");
            assert_eq!(parse_packet(&want.to_bytes()), Ok(want), "case {name}: encode then parse");
        }
    }

    #[test]
    fn refuses_malformed_packets() {
        let cases: Vec<(&str, Vec<u8>, ParseError)> = vec![
            ("empty", vec![], ParseError::TooShort { len: 0 }),
            ("three bytes", vec![0, 4, 0], ParseError::TooShort { len: 3 }),
            ("opcode 0", vec![0, 0, 0, 0], ParseError::Opcode { opcode: 0 }),
            ("opcode 7", vec![0, 7, 0, 0], ParseError::Opcode { opcode: 7 }),
            ("rrq without NUL", [&[0u8, 1][..], b"file"].concat(), ParseError::Unterminated { field: "file name" }),
            ("rrq without mode", [&[0u8, 1][..], b"file\0oct"].concat(), ParseError::Unterminated { field: "mode" }),
            ("rrq empty name", [&[0u8, 1][..], b"\0octet\0"].concat(), ParseError::EmptyFilename),
            ("rrq bad mode", rrq("a", "binary", &[]), ParseError::Mode { mode: "binary".into() }),
            ("rrq non-UTF-8 name", [&[0u8, 1][..], b"\xff\xfe\0octet\0"].concat(), ParseError::NotUtf8 { field: "file name" }),
            (
                "rrq option without value",
                [rrq("a", "octet", &[]), b"blksize\0".to_vec()].concat(),
                ParseError::OptionWithoutValue { name: "blksize".into() },
            ),
            ("ack too long", vec![0, 4, 0, 1, 0], ParseError::Trailing { extra: 1 }),
            ("error unterminated", vec![0, 5, 0, 1, b'x'], ParseError::Unterminated { field: "error message" }),
            ("oack odd", [&[0u8, 6][..], b"blksize\0"].concat(), ParseError::OptionWithoutValue { name: "blksize".into() }),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(parse_packet(&bytes), Err(want), "case {name}");
        }
    }

    #[test]
    fn negotiates_within_limits() {
        let mut config = TftpConfig::new(PathBuf::from("/nonexistent"), "127.0.0.1:0".parse().unwrap());
        config.max_blksize = 1468;
        config.max_windowsize = 8;
        let s = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
        let cases = [
            ("no options", Mode::Octet, Options::default(), 512, 1, 1, s(&[])),
            (
                "granted as asked",
                Mode::Octet,
                Options { blksize: Some(1428), tsize: Some(0), timeout: Some(2), windowsize: Some(4) },
                1428,
                4,
                2,
                s(&[("blksize", "1428"), ("timeout", "2"), ("tsize", "4096"), ("windowsize", "4")]),
            ),
            (
                "capped by the server",
                Mode::Octet,
                Options { blksize: Some(9000), windowsize: Some(64), ..Options::default() },
                1468,
                8,
                1,
                s(&[("blksize", "1468"), ("windowsize", "8")]),
            ),
            ("no tsize in netascii", Mode::Netascii, Options { tsize: Some(0), ..Options::default() }, 512, 1, 1, s(&[])),
            ("timeout 5 is granted", Mode::Octet, Options { timeout: Some(5), ..Options::default() }, 512, 1, 5, s(&[("timeout", "5")])),
            ("timeout 255 is not: ours holds", Mode::Octet, Options { timeout: Some(255), ..Options::default() }, 512, 1, 1, s(&[])),
            ("timeout 6 is not", Mode::Octet, Options { timeout: Some(6), ..Options::default() }, 512, 1, 1, s(&[])),
        ];
        for (name, mode, options, blksize, windowsize, timeout, oack) in cases {
            let n = negotiate(&config, &request("f", mode, options), 4096);
            assert_eq!(n, Negotiated { blksize, windowsize, timeout: Duration::from_secs(timeout), oack }, "case {name}");
        }
    }

    #[test]
    fn a_window_holds_at_most_max_window_bytes() {
        let config = TftpConfig::new(PathBuf::from("/nonexistent"), "127.0.0.1:0".parse().unwrap());
        let cases = [("1428 × 16 fits", 1428, 16, 16), ("65464 × 64 becomes 65464 × 2", 65464, 64, 2), ("8 × 64", 8, 64, 64)];
        for (name, blksize, asked, granted) in cases {
            let options = Options { blksize: Some(blksize), windowsize: Some(asked), ..Options::default() };
            let n = negotiate(&config, &request("f", Mode::Octet, options), 1);
            assert_eq!(n.windowsize, granted, "case {name}");
            assert!(usize::from(n.windowsize) * usize::from(n.blksize) <= MAX_WINDOW_BYTES, "case {name}: window bytes");
        }
    }

    #[test]
    fn the_table_holds_regular_files_of_the_root_after_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("qemu")).unwrap();
        std::fs::write(dir.path().join("ipxe.efi.real"), b"efi").unwrap();
        std::os::unix::fs::symlink(dir.path().join("ipxe.efi.real"), root.join("ipxe.efi")).unwrap();
        std::fs::write(root.join("undionly.kpxe"), b"bios").unwrap();
        std::fs::write(root.join("snponly.efi"), b"snp").unwrap();
        std::fs::write(root.join("qemu/pxe-virtio.rom"), b"rom").unwrap();
        std::os::unix::fs::symlink("qemu/pxe-virtio.rom", root.join("virtio-net.rom")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/kiln", root.join("dangling")).unwrap();
        std::fs::write(root.join("back\\slash"), b"x").unwrap();
        std::fs::write(root.join("with space"), b"x").unwrap();
        let table = Table::build(&root).unwrap();
        let names: Vec<&str> = table.entries.keys().map(String::as_str).collect();
        assert_eq!(names, ["ipxe.efi", "snponly.efi", "undionly.kpxe", "virtio-net.rom"], "table");
        assert_eq!(table.entries["ipxe.efi"].size, 3, "the link's target's size");
        let cases = [
            ("exact", "ipxe.efi", Ok(())),
            ("leading slash", "/snponly.efi", Ok(())),
            ("directory", "qemu", Err(NOT_FOUND)),
            ("in a directory", "qemu/pxe-virtio.rom", Err(NOT_FOUND)),
            ("dangling link", "dangling", Err(NOT_FOUND)),
            ("parent", "../ipxe.efi.real", Err(ACCESS)),
            ("parent, backslashes", "qemu\\..\\..\\ipxe.efi.real", Err(ACCESS)),
            ("absolute outside", "/boot/ipxe.efi", Err(NOT_FOUND)),
        ];
        for (name, filename, want) in cases {
            assert_eq!(table.lookup(filename).map(|_| ()), want, "case {name}");
        }
    }

    #[tokio::test]
    async fn caps_answer_with_an_error_and_free_slots_after_retries() {
        let f = Fixture::new().await;
        let mut config = TftpConfig::new(f.root(), "127.0.0.1:0".parse().unwrap());
        config.max_transfers = 2;
        config.max_per_client = 1;
        config.timeout = Duration::from_millis(100);
        config.retries = 2;
        let server = TftpServer::start_with(config).await.unwrap();
        let addr = server.local_addr();
        let mut buf = [0u8; 1024];
        // first_packet CLIENT_IP: a request that is never acknowledged, and
        // the server's first answer to it.
        async fn first_packet(ip: &str, addr: SocketAddr, buf: &mut [u8]) -> (UdpSocket, Packet<'static>) {
            let socket = UdpSocket::bind((ip, 0)).await.unwrap();
            socket.send_to(&read_req("small.bin", Options::default()).to_bytes(), addr).await.unwrap();
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(buf)).await.expect("an answer").unwrap();
            let packet = match parse_packet(&buf[..n]).unwrap() {
                Packet::Data { block, .. } => Packet::Ack(block),
                Packet::Error { code, message } => Packet::Error { code, message },
                other => panic!("unexpected {other:?}"),
            };
            (socket, packet)
        }
        let busy = |m: &str| Packet::Error { code: error_code::UNDEFINED, message: m.to_string() };
        let cases = [
            ("first from 127.0.0.1", "127.0.0.1", Packet::Ack(1)),
            ("second from 127.0.0.1: per-client cap", "127.0.0.1", busy(BUSY_CLIENT.message)),
            ("first from 127.0.0.2", "127.0.0.2", Packet::Ack(1)),
            ("from 127.0.0.3: server cap", "127.0.0.3", busy(BUSY.message)),
        ];
        let mut held = Vec::new();
        for (name, ip, want) in cases {
            let (socket, got) = first_packet(ip, addr, &mut buf).await;
            assert_eq!(got, want, "case {name}");
            held.push(socket);
        }
        assert_eq!(server.stats().active, 2, "two transfers held");
        // Never acknowledged: 3 sends 100 ms apart, then the slots are free.
        let started = std::time::Instant::now();
        while server.stats().active > 0 {
            assert!(started.elapsed() < Duration::from_secs(2), "slots freed after the retries: {:?}", server.stats());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = server.stats();
        assert_eq!((s.requests, s.refused, s.failed), (4, 2, 2), "stats {s:?}");
        let got = fetch(addr, read_req("small.bin", Options::default())).await.expect("served once the caps free up");
        assert!(got.data == pattern(3000), "content after the caps freed");
    }

    #[test]
    fn netascii_converts_line_ends() {
        let mut source = BlockSource::Netascii { inner: &b"a\nb\rc\r\n"[..], pending: VecDeque::new(), eof: false };
        let mut out = [0u8; 4];
        let mut all = Vec::new();
        loop {
            let n = source.fill(&mut out).unwrap();
            all.extend_from_slice(&out[..n]);
            if n < out.len() {
                break;
            }
        }
        assert_eq!(all, b"a\r\nb\r\0c\r\0\r\n");
    }

    // ---- the server, with real clients ----

    /// A root with files, a sibling secret and symlinks in and out.
    struct Fixture {
        dir: tempfile::TempDir,
        server: TftpServer,
    }

    impl Fixture {
        async fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("root");
            std::fs::create_dir_all(root.join("sub")).unwrap();
            std::fs::write(root.join("small.bin"), pattern(3000)).unwrap();
            std::fs::write(root.join("exact.bin"), pattern(1024)).unwrap();
            std::fs::write(root.join("exact1428.bin"), pattern(1428 * 3)).unwrap();
            std::fs::write(root.join("empty.bin"), b"").unwrap();
            std::fs::write(root.join("text.txt"), b"line one\nline two\r\nbare\rcr\n").unwrap();
            std::fs::write(root.join("sub/nested.bin"), pattern(700)).unwrap();
            std::fs::write(dir.path().join("secret"), b"outside the root").unwrap();
            std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).unwrap();
            std::os::unix::fs::symlink("../../secret", root.join("sub/escape-relative")).unwrap();
            std::os::unix::fs::symlink("sub/nested.bin", root.join("inside")).unwrap();
            let server = TftpServer::start(root, "127.0.0.1:0".parse().unwrap()).await.unwrap();
            Fixture { dir, server }
        }

        fn root(&self) -> PathBuf {
            self.dir.path().join("root")
        }

        fn port(&self) -> u16 {
            self.server.local_addr().port()
        }

        /// Waits until the server's counters satisfy `check` (the last ACK
        /// may arrive after the client returned).
        async fn stats_until(&self, what: &str, check: impl Fn(&TftpStats) -> bool) -> TftpStats {
            for _ in 0..200 {
                let s = self.server.stats();
                if check(&s) {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{what}: stats {:?}", self.server.stats());
        }
    }

    /// Bytes that differ from block to block, so a misplaced block shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 ^ (i >> 9) as u8).collect()
    }

    /// Runs a client process, killed if the test gives up on it.
    async fn run(program: &str, args: &[&str]) -> Output {
        let child = Command::new(program).args(args).kill_on_drop(true).output();
        tokio::time::timeout(Duration::from_secs(30), child)
            .await
            .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    #[tokio::test]
    async fn tftp_hpa_client_fetches_in_512_byte_blocks() {
        let f = Fixture::new().await;
        let out = f.dir.path().join("out");
        let port = f.port().to_string();
        let cases = [
            ("binary mode", "binary", "small.bin", pattern(3000)),
            ("exact multiple of 512 (final empty block)", "binary", "exact.bin", pattern(1024)),
            ("empty file", "binary", "empty.bin", vec![]),
            ("symlink to a file in a subdirectory", "binary", "inside", pattern(700)),
            ("symlink leaving the root (the operator's, as Debian's ipxe.efi)", "binary", "escape", b"outside the root".to_vec()),
            ("netascii round trip", "netascii", "text.txt", b"line one\nline two\r\nbare\rcr\n".to_vec()),
        ];
        for (i, (name, mode, file, want)) in cases.iter().enumerate() {
            let local = out.with_extension(i.to_string());
            let o = run("tftp", &["-m", mode, "127.0.0.1", &port, "-c", "get", file, local.to_str().unwrap()]).await;
            let got = std::fs::read(&local).unwrap_or_else(|e| panic!("case {name}: {e}; client said {o:?}"));
            assert!(got == *want, "case {name}: {} bytes, want {}; client said {o:?}", got.len(), want.len());
        }
        f.stats_until("every case served", |s| s.served == cases.len() as u64).await;
    }

    #[tokio::test]
    async fn curl_fetches_with_blksize_1428() {
        let f = Fixture::new().await;
        let cases = [
            ("3000 bytes", "small.bin", "1428", pattern(3000)),
            ("exact multiple of 1428", "exact1428.bin", "1428", pattern(1428 * 3)),
            ("exact multiple of 512", "exact.bin", "512", pattern(1024)),
        ];
        for (i, (name, file, blksize, want)) in cases.iter().enumerate() {
            let local = f.dir.path().join(format!("curl{i}"));
            let url = format!("tftp://127.0.0.1:{}/{file}", f.port());
            let o = run("curl", &["-sS", "-v", "--tftp-blksize", blksize, "-o", local.to_str().unwrap(), &url]).await;
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "case {name}: curl failed: {stderr}");
            assert!(stderr.contains(&format!("got option=(blksize) value=({blksize})")), "case {name}: blksize not acknowledged: {stderr}");
            assert!(stderr.contains(&format!("got option=(tsize) value=({})", want.len())), "case {name}: tsize not sent: {stderr}");
            assert!(std::fs::read(&local).unwrap() == *want, "case {name}: content differs");
        }
        f.stats_until("every case served", |s| s.served == cases.len() as u64).await;
    }

    /// What the test client received.
    #[derive(Debug)]
    struct Fetched {
        data: Vec<u8>,
        oack: Option<Vec<(String, String)>>,
        /// DATA packets accepted, the final (short or empty) one included.
        blocks: usize,
        /// ACKs sent for data, one per window.
        acks: usize,
        /// Whether block 65535 was followed by block 0.
        wrapped: bool,
    }

    /// A minimal RFC 7440 client: acknowledges every `windowsize` blocks.
    async fn fetch(addr: SocketAddr, request: Packet<'_>) -> Result<Fetched, (u16, String)> {
        let (mut blksize, mut windowsize) = (usize::from(DEFAULT_BLKSIZE), 1);
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.send_to(&request.to_bytes(), addr).await.unwrap();
        let mut buf = vec![0u8; 70000];
        let (mut got, mut server) = (Fetched { data: vec![], oack: None, blocks: 0, acks: 0, wrapped: false }, None);
        let (mut expected, mut in_window): (u16, usize) = (1, 0);
        loop {
            let (n, from) =
                tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf)).await.expect("server answers").unwrap();
            assert_ne!(from, addr, "replies come from a transfer port, not the listening one");
            assert_eq!(*server.get_or_insert(from), from, "one transfer ID per transfer");
            match parse_packet(&buf[..n]).expect("server packets parse") {
                Packet::OAck(options) => {
                    for (name, value) in &options {
                        match name.as_str() {
                            "blksize" => blksize = value.parse().unwrap(),
                            "windowsize" => windowsize = value.parse().unwrap(),
                            _ => {}
                        }
                    }
                    got.oack = Some(options);
                    socket.send_to(&Packet::Ack(0).to_bytes(), from).await.unwrap();
                }
                Packet::Data { block, data } if block == expected => {
                    assert!(data.len() <= blksize, "block {block} of {} bytes exceeds blksize {blksize}", data.len());
                    got.data.extend_from_slice(data);
                    got.blocks += 1;
                    got.wrapped |= block == 0 && got.blocks > 1;
                    expected = expected.wrapping_add(1);
                    in_window += 1;
                    let last = data.len() < blksize;
                    if in_window == windowsize || last {
                        socket.send_to(&Packet::Ack(block).to_bytes(), from).await.unwrap();
                        got.acks += 1;
                        in_window = 0;
                    }
                    if last {
                        return Ok(got);
                    }
                }
                Packet::Data { .. } => {}
                Packet::Error { code, message } => return Err((code, message)),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn read_req(filename: &str, options: Options) -> Packet<'static> {
        Packet::Rrq(request(filename, Mode::Octet, options))
    }

    #[tokio::test]
    async fn negotiates_tsize_and_windowsize() {
        let f = Fixture::new().await;
        let addr = f.server.local_addr();
        let opt = |blksize, tsize, windowsize| Options { blksize, tsize, windowsize, timeout: None };
        let cases = [
            ("tsize only", "small.bin", opt(None, Some(0), None), 3000, vec![("tsize", "3000")], 6, 6),
            ("windowsize 4", "small.bin", opt(None, None, Some(4)), 3000, vec![("windowsize", "4")], 6, 2),
            (
                "blksize 1428 windowsize 2, exact multiple",
                "exact1428.bin",
                opt(Some(1428), Some(0), Some(2)),
                1428 * 3,
                vec![("blksize", "1428"), ("tsize", "4284"), ("windowsize", "2")],
                4,
                2,
            ),
            (
                "windowsize capped at 64",
                "small.bin",
                opt(Some(8), None, Some(1000)),
                3000,
                vec![("blksize", "8"), ("windowsize", "64")],
                376,
                6,
            ),
        ];
        for (name, file, options, len, oack, blocks, acks) in cases {
            let got = fetch(addr, read_req(file, options)).await.unwrap_or_else(|e| panic!("case {name}: {e:?}"));
            let want: Vec<_> = oack.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
            assert_eq!(got.oack, Some(want), "case {name}: OACK");
            assert!(got.data == pattern(len), "case {name}: content");
            assert_eq!((got.blocks, got.acks), (blocks, acks), "case {name}: blocks and acks");
        }
    }

    #[tokio::test]
    async fn refuses_escapes_and_writes() {
        let f = Fixture::new().await;
        let addr = f.server.local_addr();
        std::fs::write(f.root().join("late.bin"), b"not in the table").unwrap();
        let cases = [
            ("parent directory", read_req("../secret", Options::default()), error_code::ACCESS_VIOLATION),
            ("parent inside a path", read_req("sub/../../secret", Options::default()), error_code::ACCESS_VIOLATION),
            ("absolute path is under the root", read_req("/etc/passwd", Options::default()), error_code::FILE_NOT_FOUND),
            ("parent with backslashes", read_req("..\\secret", Options::default()), error_code::ACCESS_VIOLATION),
            ("parent after the name", read_req("small.bin/..", Options::default()), error_code::ACCESS_VIOLATION),
            ("relative symlink in a subdirectory", read_req("sub/escape-relative", Options::default()), error_code::FILE_NOT_FOUND),
            ("subdirectories are not in the table", read_req("sub/nested.bin", Options::default()), error_code::FILE_NOT_FOUND),
            ("backslash separator", read_req("sub\\nested.bin", Options::default()), error_code::FILE_NOT_FOUND),
            ("dot component", read_req("./small.bin", Options::default()), error_code::FILE_NOT_FOUND),
            ("trailing slash", read_req("small.bin/", Options::default()), error_code::FILE_NOT_FOUND),
            ("another case", read_req("SMALL.BIN", Options::default()), error_code::FILE_NOT_FOUND),
            ("proc file", read_req("/proc/self/environ", Options::default()), error_code::FILE_NOT_FOUND),
            ("file created after start", read_req("late.bin", Options::default()), error_code::FILE_NOT_FOUND),
            ("missing file", read_req("nope.bin", Options::default()), error_code::FILE_NOT_FOUND),
            ("directory", read_req("sub", Options::default()), error_code::FILE_NOT_FOUND),
            ("root itself", read_req("/", Options::default()), error_code::FILE_NOT_FOUND),
            ("write request", Packet::Wrq(request("new.bin", Mode::Octet, Options::default())), error_code::ACCESS_VIOLATION),
            ("mail mode", Packet::Rrq(request("small.bin", Mode::Mail, Options::default())), error_code::ILLEGAL_OPERATION),
        ];
        for (name, req, code) in &cases {
            let got = fetch(addr, req.clone()).await;
            assert!(matches!(&got, Err((c, _)) if c == code), "case {name}: got {got:?}, want error {code}");
        }
        assert!(!f.root().join("new.bin").exists(), "a refused write creates nothing");
        for name in ["/small.bin", "//small.bin"] {
            let got = fetch(addr, read_req(name, Options::default())).await.expect("leading /s mean the root");
            assert!(got.data == pattern(3000), "{name}: content");
        }
        let s = f.stats_until("refusals counted", |s| s.refused == cases.len() as u64 && s.served == 2).await;
        assert_eq!(s.requests, cases.len() as u64 + 2, "requests counted: {s:?}");

        // The real client sees the same refusals.
        let out = f.dir.path().join("hpa-out");
        let port = f.port().to_string();
        let o = run("tftp", &["-m", "binary", "127.0.0.1", &port, "-c", "get", "../secret", out.to_str().unwrap()]).await;
        let said = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
        assert!(said.contains("Error code 2"), "tftp-hpa get ../secret: {said}");
        let o =
            run("tftp", &["-m", "binary", "127.0.0.1", &port, "-c", "put", f.root().join("small.bin").to_str().unwrap(), "up.bin"]).await;
        let said = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
        assert!(said.contains("Error code 2"), "tftp-hpa put: {said}");
        assert!(!f.root().join("up.bin").exists(), "tftp-hpa put created nothing");
    }

    #[tokio::test]
    async fn malformed_packets_are_counted_and_the_server_still_serves() {
        let f = Fixture::new().await;
        let addr = f.server.local_addr();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let garbage: [&[u8]; 4] = [b"", b"\x00", b"\x00\x09junk", b"\x00\x01no-terminator"];
        for g in garbage {
            socket.send_to(g, addr).await.unwrap();
        }
        f.stats_until("malformed counted", |s| s.malformed == garbage.len() as u64).await;
        let got = fetch(addr, read_req("small.bin", Options { blksize: Some(1024), ..Options::default() })).await.unwrap();
        assert!(got.data == pattern(3000), "served after garbage");
        // Garbage on the transfer port is dropped too, mid-transfer.
        let s = f.stats_until("served", |s| s.served == 1).await;
        assert_eq!((s.requests, s.failed), (1, 0), "stats {s:?}");
    }

    #[tokio::test]
    async fn garbage_on_a_transfer_port_is_dropped() {
        let f = Fixture::new().await;
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.send_to(&read_req("small.bin", Options::default()).to_bytes(), f.server.local_addr()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let (n, tid) = socket.recv_from(&mut buf).await.unwrap();
        assert_eq!(parse_packet(&buf[..n]), Ok(Packet::Data { block: 1, data: &pattern(3000)[..512] }), "first block");
        socket.send_to(b"\x00\x04\x00", tid).await.unwrap();
        f.stats_until("malformed on the transfer port", |s| s.malformed == 1).await;
        socket.send_to(&Packet::Ack(1).to_bytes(), tid).await.unwrap();
        let (n, _) = socket.recv_from(&mut buf).await.unwrap();
        assert_eq!(parse_packet(&buf[..n]), Ok(Packet::Data { block: 2, data: &pattern(3000)[512..1024] }), "transfer goes on");
    }

    #[tokio::test]
    async fn block_numbers_roll_over_past_65535() {
        let f = Fixture::new().await;
        // 65,538 blocks of 512 bytes: block 65535 is followed by block 0.
        let len = 32 * 1024 * 1024 + 1000;
        let want = pattern(len);
        std::fs::write(f.root().join("big.bin"), &want).unwrap();
        // The table is built at start: a server that sees big.bin.
        let server = TftpServer::start(f.root(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let started = std::time::Instant::now();
        let local = f.dir.path().join("big.out");
        let url = format!("tftp://127.0.0.1:{}/big.bin", server.local_addr().port());
        let o = run("curl", &["-sS", "--tftp-blksize", "512", "-o", local.to_str().unwrap(), &url]).await;
        assert!(o.status.success(), "curl: {}", String::from_utf8_lossy(&o.stderr));
        assert!(std::fs::read(&local).unwrap() == want, "curl: 32 MiB + 1000 bytes intact across the rollover");
        eprintln!("curl rollover transfer: {:?}", started.elapsed());
        // The own client checks the wrap itself (65535 → 0), with a window.
        let got = fetch(server.local_addr(), read_req("big.bin", Options { windowsize: Some(16), ..Options::default() })).await.unwrap();
        assert!(got.wrapped, "block 65535 is followed by block 0");
        assert_eq!(got.blocks, len / 512 + 1, "blocks");
        assert!(got.data == want, "own client: content intact");
    }

    #[tokio::test]
    async fn shutdown_stops_the_server() {
        let f = Fixture::new().await;
        let addr = f.server.local_addr();
        let Fixture { dir: _dir, server } = f;
        server.shutdown().await;
        // The port is free again once the server is gone.
        UdpSocket::bind(addr).await.expect("port released after shutdown");
    }

    #[tokio::test]
    async fn start_names_a_bad_root() {
        let err = TftpServer::start(PathBuf::from("/nonexistent/kiln-tftp"), "127.0.0.1:0".parse().unwrap()).await.unwrap_err();
        assert!(err.to_string().contains("/nonexistent/kiln-tftp"), "{err}");
    }
}
