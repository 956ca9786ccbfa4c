//! A small TFTP read client (RFC 1350 with RFC 2347/2348/2349/7440 options)
//! on tokio, for the TFTP attack test and the TFTP bench: it binds the
//! loopback address it is given, so many clients can look like many
//! machines (127.0.0.0/8 is all loopback).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kiln_pxe::tftp::{Mode, Options, Packet, Request, parse_packet};
use tokio::net::UdpSocket;

/// What one fetch asks for.
#[derive(Debug, Clone, Copy)]
pub struct Fetch<'a> {
    /// The server's listening address.
    pub server: SocketAddr,
    /// The local address to send from (any 127.x.y.z).
    pub from: IpAddr,
    /// The file name.
    pub file: &'a str,
    /// `blksize` to ask for (None: 512-byte blocks, no option).
    pub blksize: Option<u16>,
    /// `windowsize` to ask for.
    pub windowsize: Option<u16>,
}

/// A TFTP error packet the server answered with, as an `io::Error` of kind
/// `Other` whose text starts with `tftp error CODE:`.
fn server_error(code: u16, message: &str) -> io::Error {
    io::Error::other(format!("tftp error {code}: {message:?}"))
}

/// Whether `e` is the server's "busy" refusal (a cap was hit).
pub fn is_busy(e: &io::Error) -> bool {
    e.to_string().starts_with("tftp error 0: \"server busy")
}

impl Fetch<'_> {
    /// Fetches the file, handing each block's bytes and offset to `sink`;
    /// returns the file's length. Times out after 5 tries of 1 s with nothing.
    pub async fn run(&self, mut sink: impl FnMut(u64, &[u8]) -> io::Result<()>) -> io::Result<u64> {
        let socket = UdpSocket::bind((self.from, 0)).await?;
        let options = Options { blksize: self.blksize, windowsize: self.windowsize, tsize: Some(0), timeout: None };
        let request = Packet::Rrq(Request { filename: self.file.to_string(), mode: Mode::Octet, options }).to_bytes();
        socket.send_to(&request, self.server).await?;
        let (mut blksize, mut windowsize) = (512usize, 1usize);
        let mut buf = vec![0u8; 70000];
        let (mut expected, mut in_window, mut offset, mut tries): (u16, usize, u64, u32) = (1, 0, 0, 0);
        let mut last_sent = request;
        let mut peer: Option<SocketAddr> = None;
        loop {
            let (n, from) = match tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => {
                    tries += 1;
                    if tries >= 5 {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer at offset {offset}")));
                    }
                    socket.send_to(&last_sent, peer.unwrap_or(self.server)).await?;
                    continue;
                }
            };
            if *peer.get_or_insert(from) != from {
                continue;
            }
            tries = 0;
            let ack = match parse_packet(&buf[..n]).map_err(io::Error::other)? {
                Packet::OAck(granted) => {
                    for (name, value) in &granted {
                        let value: usize = value.parse().map_err(io::Error::other)?;
                        match name.as_str() {
                            "blksize" => blksize = value,
                            "windowsize" => windowsize = value,
                            _ => {}
                        }
                    }
                    Some(0)
                }
                Packet::Data { block, data } if block == expected => {
                    sink(offset, data)?;
                    offset += data.len() as u64;
                    expected = expected.wrapping_add(1);
                    in_window += 1;
                    let last = data.len() < blksize;
                    if last {
                        socket.send_to(&Packet::Ack(block).to_bytes(), from).await?;
                        return Ok(offset);
                    }
                    (in_window == windowsize).then_some(block)
                }
                // Out of order: acknowledge what arrived in order (RFC 7440).
                Packet::Data { .. } => Some(expected.wrapping_sub(1)),
                Packet::Error { code, message } => return Err(server_error(code, &message)),
                other => return Err(io::Error::other(format!("unexpected {other:?}"))),
            };
            if let Some(block) = ack {
                in_window = 0;
                last_sent = Packet::Ack(block).to_bytes();
                socket.send_to(&last_sent, from).await?;
            }
        }
    }

    /// Fetches the file into memory.
    pub async fn bytes(&self) -> io::Result<Vec<u8>> {
        let mut data = Vec::new();
        self.run(|_, block| {
            data.extend_from_slice(block);
            Ok(())
        })
        .await?;
        Ok(data)
    }

    /// Fetches the file and checks it equals `want` block by block (nothing kept).
    pub async fn check(&self, want: &[u8]) -> io::Result<u64> {
        let len = self
            .run(|offset, block| {
                let at = usize::try_from(offset).map_err(io::Error::other)?;
                match want.get(at..at + block.len()) {
                    Some(w) if w == block => Ok(()),
                    _ => Err(io::Error::other(format!("content differs at offset {offset}"))),
                }
            })
            .await?;
        if len != want.len() as u64 {
            return Err(io::Error::other(format!("{len} bytes, want {}", want.len())));
        }
        Ok(len)
    }
}

/// `VmRSS` of process `pid` in bytes, from `/proc/PID/status`.
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Open descriptors of process `pid` (entries of `/proc/PID/fd`).
pub fn open_fds(pid: i32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// The `i`-th of many loopback client addresses: 127.77.X.Y, `per_address`
/// clients on each.
pub fn client_ip(i: usize, per_address: usize) -> IpAddr {
    let a = i / per_address.max(1);
    IpAddr::from([127, 77, (a / 250) as u8, (a % 250 + 1) as u8])
}
