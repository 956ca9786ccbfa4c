//! The TFTP flood against the real `kiln serve --tftp` on loopback: 1500
//! read requests for the largest file of Debian's `/usr/lib/ipxe` from
//! sockets that never acknowledge, first from one host (127.0.0.1), then
//! spread over 300 loopback addresses. The server must stay under 200 MB
//! RSS with a bounded number of descriptors, answer every request (data or
//! a "server busy" error, never silence), keep serving `ipxe.efi` (the
//! symlink to `/boot/ipxe.efi`) with the right bytes, and free everything
//! within seconds after.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_pxe::tftp::{Mode, Options, Packet, Request, parse_packet};
use kiln_tests::tftp_client::{Fetch, client_ip, is_busy, open_fds, rss_bytes};
use kiln_tests::{KilnServer, block_on, fake_image, tail, wait_for};
use tokio::net::UdpSocket;

const IPXE: &str = "/usr/lib/ipxe";
const FLOOD: usize = 1500;
const RSS_BOUND: u64 = 200 * 1024 * 1024;

/// The largest regular file (after symlinks) directly in `dir`.
fn largest_file(dir: &Path) -> String {
    let mut files: Vec<(u64, String)> = std::fs::read_dir(dir)
        .expect("the ipxe package is installed")
        .filter_map(|e| {
            let e = e.ok()?;
            let meta = std::fs::metadata(e.path()).ok().filter(|m| m.is_file())?;
            Some((meta.len(), e.file_name().into_string().ok()?))
        })
        .collect();
    files.sort();
    files.pop().expect("a file in /usr/lib/ipxe").1
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Sends one read request per client address from `FLOOD` sockets that
/// never acknowledge; returns the sockets (held open) and how many were
/// answered with data and with "server busy".
async fn flood(server: SocketAddr, file: &str, ip: impl Fn(usize) -> IpAddr) -> (Vec<UdpSocket>, usize, usize) {
    let request = Packet::Rrq(Request { filename: file.into(), mode: Mode::Octet, options: Options::default() }).to_bytes();
    let mut sockets = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let s = UdpSocket::bind((ip(i), 0)).await.expect("binding a flood socket");
        s.send_to(&request, server).await.expect("sending a request");
        sockets.push(s);
        if i % 50 == 49 {
            // Paced so the listening socket's receive buffer is not what drops requests.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let (mut data, mut busy) = (0, 0);
    let mut buf = [0u8; 1024];
    for s in &sockets {
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), s.recv_from(&mut buf))
            .await
            .expect("every request is answered, never silence")
            .unwrap();
        match parse_packet(&buf[..n]).expect("server packets parse") {
            Packet::Data { block: 1, .. } => data += 1,
            Packet::Error { code: 0, message } if message.starts_with("server busy") => busy += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    (sockets, data, busy)
}

/// The server's RSS and open descriptors now.
fn usage(pid: i32) -> (u64, usize) {
    (rss_bytes(pid).expect("VmRSS"), open_fds(pid).expect("/proc/PID/fd"))
}

#[test]
fn tftp_flood_stays_bounded_and_ipxe_efi_is_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    fake_image(&images, "tiny");
    let port = free_udp_port();
    let tftp = format!("127.0.0.1:{port}");
    let server = KilnServer::start_with(&images, &dir.path().join("state"), &["--tftp", &tftp]);
    let pid = server.process.pid().as_raw();
    let addr: SocketAddr = tftp.parse().unwrap();
    let big = largest_file(Path::new(IPXE));
    let efi = std::fs::read(Path::new(IPXE).join("ipxe.efi")).expect("ipxe.efi (a symlink to /boot/ipxe.efi)");
    let normal =
        |from: [u8; 4]| Fetch { server: addr, from: IpAddr::from(from), file: "ipxe.efi", blksize: Some(1428), windowsize: Some(16) };
    // Before: the symlinked ipxe.efi is served, and what the server uses idle.
    let got = block_on(normal([127, 0, 0, 1]).bytes()).unwrap_or_else(|e| panic!("ipxe.efi: {e}; log:\n{}", tail(&server.log(), 20)));
    assert!(got == efi, "ipxe.efi through the symlink: {} bytes, want {}", got.len(), efi.len());
    std::thread::sleep(Duration::from_millis(200));
    let (rss0, fds0) = usage(pid);
    eprintln!("idle: RSS {} KiB, {fds0} fds; flooding with {big}", rss0 / 1024);

    // 1. From one host: the per-client cap (8) holds; another host is served.
    let (held, data, busy) = block_on(flood(addr, &big, |_| IpAddr::from([127, 0, 0, 1])));
    let (rss, fds) = usage(pid);
    eprintln!("one-host flood: {data} data, {busy} busy; RSS {} KiB, {fds} fds", rss / 1024);
    assert_eq!((data, busy), (8, FLOOD - 8), "one host gets 8 transfers, the rest an error packet");
    let got = block_on(normal([127, 0, 0, 2]).bytes()).expect("ipxe.efi for another host during the flood");
    assert!(got == efi, "ipxe.efi during the one-host flood: right bytes");
    assert!(rss < RSS_BOUND && fds <= fds0 + 8 + 4, "one-host flood: RSS {rss} (bound {RSS_BOUND}), fds {fds} (idle {fds0})");
    drop(held);

    // 2. From 300 addresses: the server cap (256) holds.
    let (held, data, busy) = block_on(flood(addr, &big, |i| client_ip(i, 5)));
    let (rss, fds) = usage(pid);
    eprintln!("spread flood: {data} data, {busy} busy; RSS {} KiB, {fds} fds", rss / 1024);
    assert_eq!(data + busy, FLOOD, "every request answered");
    assert!(data <= 256, "at most 256 transfers at once: {data}");
    assert!(rss < RSS_BOUND, "spread flood: RSS {} MiB, bound 200 MiB", rss >> 20);
    assert!(fds <= fds0 + 256 + 8, "spread flood: {fds} fds (idle {fds0}), at most one per transfer");
    // A PXE ROM retries a refused request; slots held by silent clients
    // free up within timeout × (retries + 1) = 6 s.
    let started = Instant::now();
    let got = block_on(async {
        loop {
            match normal([127, 0, 0, 3]).bytes().await {
                Err(e) if is_busy(&e) && started.elapsed() < Duration::from_secs(15) => {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                other => return other,
            }
        }
    })
    .expect("ipxe.efi during the spread flood, retrying on busy");
    assert!(got == efi, "ipxe.efi during the spread flood: right bytes");
    eprintln!("served during the spread flood after {:?}", started.elapsed());

    // After: every transfer given up, descriptors back to idle, within 10 s
    // (the flood sockets are still open, still silent).
    let freed = wait_for(Duration::from_secs(10), || (open_fds(pid)? <= fds0 + 2).then_some(()));
    let (rss, fds) = usage(pid);
    assert!(freed.is_some(), "descriptors back to idle ({fds0}) within 10 s: {fds}");
    assert!(rss < RSS_BOUND, "after: RSS {} MiB", rss >> 20);
    eprintln!("after: RSS {} KiB, {fds} fds", rss / 1024);
    drop(held);
}
