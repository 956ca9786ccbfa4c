//! `bench/slowloris`: the latency of normal requests to `kiln serve`
//! (under `ulimit -n 1024`, default limits) while N slowloris sockets are
//! held on the boot port and N on the API port, beside the same requests
//! with no attack (N = 0) in the same run.
//!
//! Each normal request opens a new connection, as a newcomer does: `GET
//! /boot.ipxe` on plain HTTP, `GET /api/v1/nodes` over TLS (handshake
//! included). The attacker trickles a request head (boot port) or a TLS
//! ClientHello (half the API sockets; the other half send nothing) one
//! byte a second and reopens every socket the server closes.
//!
//! `COUNTS` (default `0,500,1000,2000`), `REQUESTS` per port and count
//! (default 300). Prints a Markdown section for BENCHMARKS.md.

use std::time::Duration;

use kiln_tests::slowloris::{Opening, Slowloris, addr_of, fresh_tls_client, percentile, plain_get, server_under_ulimit, tls_get};

/// p50 and p99 of `samples`, in milliseconds.
fn p50_p99(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(percentile(&samples, 50.0)), ms(percentile(&samples, 99.0)))
}

fn main() {
    kiln_control::listen::raise_nofile_limit().expect("the bench's own descriptor limit");
    let counts: Vec<usize> = std::env::var("COUNTS")
        .unwrap_or_else(|_| "0,500,1000,2000".into())
        .split(',')
        .map(|n| n.trim().parse().expect("COUNTS: numbers"))
        .collect();
    let requests: usize = std::env::var("REQUESTS").ok().and_then(|n| n.parse().ok()).unwrap_or(300);
    let tmp = tempfile::tempdir().expect("a temp dir");
    let server = server_under_ulimit(tmp.path(), &[]);
    let (boot, api) = (addr_of(&server.url), addr_of(&server.api));
    let tls = fresh_tls_client(&server, Duration::from_secs(10));
    let nodes = format!("{}/api/v1/nodes", server.api);
    let mut rows = Vec::new();
    for &n in &counts {
        let attacks = (n > 0).then(|| {
            [
                Slowloris::start(boot, n, Opening::Head),
                Slowloris::start(api, n / 2, Opening::ClientHello),
                Slowloris::start(api, n - n / 2, Opening::Nothing),
            ]
        });
        if let Some(a) = &attacks {
            let wanted = |s: &Slowloris, k: usize| s.open() * 100 >= k * 99;
            let held = kiln_tests::wait_for(Duration::from_secs(60), || {
                (wanted(&a[0], n) && wanted(&a[1], n / 2) && wanted(&a[2], n - n / 2)).then_some(())
            });
            assert!(held.is_some(), "could not hold {n} sockets per port");
            std::thread::sleep(Duration::from_secs(3));
        }
        let (mut plain, mut secure, mut failed) = (Vec::new(), Vec::new(), 0usize);
        for _ in 0..requests {
            match plain_get(boot, "/boot.ipxe", Duration::from_secs(10)) {
                Ok((200, took)) => plain.push(took),
                _ => failed += 1,
            }
            match tls_get(&tls, &nodes) {
                Ok((200, took)) => secure.push(took),
                _ => failed += 1,
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (held, reopened) =
            attacks.as_ref().map_or((0, 0), |a| (a.iter().map(Slowloris::open).sum(), a.iter().map(Slowloris::reopened).sum()));
        rows.push((n, p50_p99(plain), p50_p99(secure), failed, held, reopened));
        drop(attacks);
        std::thread::sleep(Duration::from_secs(2));
    }
    let anchor = rows.first().map(|r| (r.1.1, r.2.1)).unwrap_or((f64::NAN, f64::NAN));
    println!("## Slowloris (issue 15): `bench/slowloris`\n");
    println!(
        "`kiln serve` under `prlimit --nofile=1024:1024` (so its connection cap is 512), default limits; {requests} normal \
         requests per port and row, each on a new connection: `GET /boot.ipxe` (plain HTTP) and `GET /api/v1/nodes` (TLS, \
         handshake included). N sockets on each port trickle a request head or ClientHello one byte a second; the attacker \
         reopens every socket the server closes. N = 0 is the anchor, in the same run.\n"
    );
    println!(
        "| slowloris sockets per port | boot p50 | boot p99 | API p50 | API p99 | p99 / no attack (boot, API) | failed | attacker sockets open | closed by kiln, reopened |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (n, (bp50, bp99), (ap50, ap99), failed, held, reopened) in rows {
        println!(
            "| {n} | {bp50:.2} ms | {bp99:.2} ms | {ap50:.2} ms | {ap99:.2} ms | {:.2}, {:.2} | {failed} | {held} | {reopened} |",
            bp99 / anchor.0,
            ap99 / anchor.1
        );
    }
}
