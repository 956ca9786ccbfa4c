//! `bench/tftp-concurrent`: CLIENTS (default 500) concurrent clients each
//! fetching `ipxe.efi` with blksize 1428 and windowsize 16, from kiln's TFTP
//! (`kiln serve --tftp`) and from tftpd-hpa (`in.tftpd -L`, in the
//! foreground here), alternating round by round (ROUNDS, default 3) in the
//! same run, on loopback. Clients send from 127.77.X.Y, 4 per address (as
//! machines would; kiln allows 8 per address). Every transfer's bytes are
//! checked. Prints the Markdown table for BENCHMARKS.md: throughput (MB/s,
//! transfers/s, median of the rounds), kiln's peak RSS, and the ratio.
//!
//! tftpd-hpa does not implement windowsize (RFC 7440): it leaves it out of
//! its OACK, so its clients acknowledge every block.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_tests::tftp_client::{Fetch, client_ip, rss_bytes};
use kiln_tests::{KilnServer, Process, block_on, fake_image, target_dir};

/// One round against one server: seconds for all clients, failures.
struct Round {
    secs: f64,
    failed: usize,
}

async fn round(server: SocketAddr, clients: usize, want: Arc<Vec<u8>>) -> Round {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let want = Arc::clone(&want);
        tasks.push(tokio::spawn(async move {
            let fetch = Fetch { server, from: client_ip(i, 4), file: "ipxe.efi", blksize: Some(1428), windowsize: Some(16) };
            fetch.check(&want).await
        }));
    }
    let mut failed = 0;
    for t in tasks {
        if let Err(e) = t.await.expect("client task") {
            failed += 1;
            eprintln!("tftp-bench: {server}: {e}");
        }
    }
    Round { secs: started.elapsed().as_secs_f64(), failed }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP port").local_addr().expect("its address").port()
}

fn main() {
    let env = |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (clients, rounds) = (env("CLIENTS", 500), env("ROUNDS", 3).max(1));
    let tmp = tempfile::tempdir().expect("a temp dir");
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root).expect("root");
    // Readable by tftpd-hpa's user (nobody).
    let _ = Command::new("chmod").arg("755").arg(tmp.path()).arg(&root).status();
    let want = std::fs::read("/usr/lib/ipxe/ipxe.efi").expect("ipxe.efi (Debian's ipxe)");
    std::fs::write(root.join("ipxe.efi"), &want).expect("copying ipxe.efi");
    let _ = Command::new("chmod").arg("644").arg(root.join("ipxe.efi")).status();
    let want = Arc::new(want);

    let images = tmp.path().join("images");
    fake_image(&images, "tiny");
    let state = tmp.path().join("state");
    let kiln_addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let mut cmd = Command::new(target_dir().join("release/kiln"));
    cmd.arg("serve").arg("--images").arg(&images).arg("--state").arg(&state).args(["--listen", "127.0.0.1:0"]);
    cmd.arg("--tftp").arg(kiln_addr.to_string()).arg("--tftp-root").arg(&root);
    cmd.arg("--tftp-max-transfers").arg(clients.to_string());
    let kiln = KilnServer::spawn(cmd, &state);
    let kiln_pid = kiln.process.pid().as_raw();

    let hpa_addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let mut cmd = Command::new("in.tftpd");
    cmd.args(["-L", "-u", "nobody", "-s"]).arg(&root).arg("--address").arg(hpa_addr.to_string());
    let _hpa = Process::spawn(cmd, "in.tftpd");
    std::thread::sleep(Duration::from_millis(300));

    let local = IpAddr::from([127, 0, 0, 1]);
    for server in [kiln_addr, hpa_addr] {
        let fetch = Fetch { server, from: local, file: "ipxe.efi", blksize: Some(1428), windowsize: Some(16) };
        block_on(fetch.check(&want)).unwrap_or_else(|e| panic!("warm-up fetch from {server}: {e}"));
    }

    let peak = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (Arc::clone(&peak), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(rss) = rss_bytes(kiln_pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let (mut k, mut h, mut failed) = (Vec::new(), Vec::new(), 0);
    for _ in 0..rounds {
        let r = block_on(round(kiln_addr, clients, Arc::clone(&want)));
        failed += r.failed;
        k.push(r.secs);
        let r = block_on(round(hpa_addr, clients, Arc::clone(&want)));
        failed += r.failed;
        h.push(r.secs);
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let (k, h) = (median(k), median(h));
    let total_mb = (clients * want.len()) as f64 / 1e6;
    let peak_mib = peak.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0);
    let hpa_version = Command::new("dpkg-query").args(["-W", "-f=${Version}", "tftpd-hpa"]).output().ok();
    let hpa_version = hpa_version.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let size_kib = want.len() / 1024;
    println!(
        "| {clients} clients × ipxe.efi ({size_kib} KiB), blksize 1428, windowsize 16 | kiln | tftpd-hpa {hpa_version} | kiln / tftpd-hpa | target |"
    );
    println!("|---|---|---|---|---|");
    println!("| throughput | {:.1} MB/s | {:.1} MB/s | {:.2} | ≥ 1.0 |", total_mb / k, total_mb / h, h / k);
    println!("| transfers/s | {:.0} | {:.0} | {:.2} | ≥ 1.0 |", clients as f64 / k, clients as f64 / h, h / k);
    println!("| time for all {clients} (median of {rounds}) | {:.2} s | {:.2} s | | |", k, h);
    println!("| kiln serve peak RSS | {peak_mib:.1} MiB | | | ≤ 64 MiB |");
    println!("| failed transfers | {failed} (both servers, all rounds) | | | 0 |");
    drop(kiln);
}
