//! control-load: simulated agents against a running `kiln serve`, for
//! `bench/control` (issue 6's figures).
//!
//! ```text
//! control-load --api https://127.0.0.1:8443 --ca STATE/ca.pem --token TOKEN --agents 1000 --concurrency 32
//! ```
//!
//! 1. Registration: every agent registers once (with a VTEP MAC, so each
//!    gets a lease), `--concurrency` at a time: throughput and latency.
//! 2. Heartbeats: the registered agents heartbeat for `--seconds`,
//!    `--concurrency` at a time: throughput and latency.
//! 3. Convergence: every agent long-polls `/api/v1/peers`; one more node
//!    joins; the time from sending its registration to the last agent
//!    holding a peers list with it.
//!
//! Prints one JSON object.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_client::{Client, chain};
use kiln_core::RegisterRequest;

struct Args {
    api: String,
    ca: Option<String>,
    token: String,
    agents: usize,
    concurrency: usize,
    seconds: u64,
    offset: usize,
    rate: f64,
}

fn args() -> Args {
    let mut a =
        Args { api: String::new(), ca: None, token: String::new(), agents: 1000, concurrency: 32, seconds: 10, offset: 0, rate: 200.0 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--api" => a.api = value(),
            "--ca" => a.ca = Some(value()),
            "--token" => a.token = value(),
            "--agents" => a.agents = value().parse().expect("--agents N"),
            "--concurrency" => a.concurrency = value().parse().expect("--concurrency N"),
            "--seconds" => a.seconds = value().parse().expect("--seconds N"),
            "--offset" => a.offset = value().parse().expect("--offset N"),
            "--rate" => a.rate = value().parse().expect("--rate PER_SECOND"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(!a.api.is_empty() && !a.token.is_empty(), "--api and --token are needed");
    a
}

fn request(i: usize) -> RegisterRequest {
    RegisterRequest {
        machine_id: format!("{i:032x}"),
        hostname: format!("sim-{i}"),
        macs: vec![format!("52:54:01:{:02x}:{:02x}:{:02x}", i >> 16 & 0xff, i >> 8 & 0xff, i & 0xff).parse().unwrap()],
        addresses: vec![format!("10.{}.{}.{}", 100 + (i >> 16 & 0x3f), i >> 8 & 0xff, i & 0xff).parse().unwrap()],
        cpus: 2,
        memory_bytes: 2 << 30,
        kernel: "6.1.0".into(),
        agent_version: "sim".into(),
        image_digest: "sha256:sim".into(),
        metrics: None,
        public_ip: None,
        vtep_mac: Some(format!("0e:01:00:{:02x}:{:02x}:{:02x}", i >> 16 & 0xff, i >> 8 & 0xff, i & 0xff).parse().unwrap()),
        uplink_mtu: Some(1500),
        csr: None,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(mut ms: Vec<f64>, elapsed: Duration) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    serde_json::json!({
        "count": ms.len(),
        "per_second": ms.len() as f64 / elapsed.as_secs_f64(),
        "p50_ms": percentile(&ms, 50.0),
        "p90_ms": percentile(&ms, 90.0),
        "p99_ms": percentile(&ms, 99.0),
        "max_ms": ms.last().copied().unwrap_or(0.0),
    })
}

#[tokio::main]
async fn main() {
    let a = args();
    let ca = a.ca.as_ref().map(|ca| std::fs::read(ca).unwrap_or_else(|e| panic!("{ca}: {e}")));
    let client = |pooled: bool| {
        let b = Client::builder(&a.api).ca_pem(ca.as_deref()).token(&a.token).timeout(Duration::from_secs(120)).no_proxy();
        // Not pooled: no idle connections kept, every registration opens its own.
        let b = if pooled { b } else { b.fresh_connections() };
        b.build().unwrap_or_else(|e| panic!("{}", chain(&e)))
    };
    let fresh = client(false);
    let pooled = client(true);

    let register = {
        let fresh = fresh.clone();
        move |i: usize, start: Instant| {
            let client = fresh.clone();
            async move {
                let answer = client.register(&request(i)).await.unwrap_or_else(|e| panic!("register: {}", chain(&e)));
                (start.elapsed().as_secs_f64() * 1000.0, answer.token)
            }
        }
    };

    // 1. Registration throughput, closed loop.
    let semaphore = Arc::new(tokio::sync::Semaphore::new(a.concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in a.offset..a.offset + a.agents {
        let (semaphore, job) = (semaphore.clone(), register.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire().await.expect("semaphore open");
            job(i, Instant::now()).await
        }));
    }
    let mut closed_ms = Vec::new();
    let mut tokens = Vec::new();
    for t in tasks {
        let (ms, token) = t.await.expect("a register task");
        closed_ms.push(ms);
        tokens.push(token);
    }
    let throughput = summary(closed_ms, started.elapsed());

    // 2. Registration latency, open loop at --rate.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, i) in (a.offset + a.agents..a.offset + 2 * a.agents).enumerate() {
        let at = started + Duration::from_secs_f64(n as f64 / a.rate);
        let job = register.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            job(i, at).await
        }));
    }
    let mut open_ms = Vec::new();
    for t in tasks {
        let (ms, token) = t.await.expect("a register task");
        open_ms.push(ms);
        tokens.push(token);
    }
    let latency = summary(open_ms, started.elapsed());

    let tokens = Arc::new(tokens);
    let heartbeats = heartbeats(&pooled, tokens.clone(), &a).await;
    let convergence_ms = convergence(&fresh, &pooled, tokens, &a).await;

    println!(
        "{}",
        serde_json::json!({
            "agents": a.agents,
            "concurrency": a.concurrency,
            "rate": a.rate,
            "registration": throughput,
            "registration_at_rate": latency,
            "heartbeat": heartbeats,
            "convergence_ms": convergence_ms,
        })
    );
}

/// Phase 3, heartbeats: `--concurrency` workers for `--seconds`, each
/// sending the next of `tokens` in turn.
async fn heartbeats(pooled: &Client, tokens: Arc<Vec<String>>, a: &Args) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..a.concurrency {
        let (client, tokens, concurrency) = (pooled.clone(), tokens.clone(), a.concurrency);
        tasks.push(tokio::spawn(async move {
            let mut ms = Vec::new();
            let mut n = w;
            while Instant::now() < deadline {
                let t = Instant::now();
                let beat = client.with_token(&tokens[n % tokens.len()]).heartbeat().await;
                beat.unwrap_or_else(|e| panic!("heartbeat: {}", chain(&e)));
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
                n += concurrency;
            }
            ms
        }));
    }
    let mut hb_ms = Vec::new();
    for t in tasks {
        hb_ms.extend(t.await.expect("a heartbeat task"));
    }
    summary(hb_ms, started.elapsed())
}

/// Phase 4, convergence: every agent of `tokens` watches the peers; one
/// more node joins; milliseconds from its registration to the last watch
/// answered with it.
async fn convergence(fresh: &Client, pooled: &Client, tokens: Arc<Vec<String>>, a: &Args) -> f64 {
    let peers = pooled.with_token(&tokens[0]).peers(0, Duration::ZERO).await.unwrap_or_else(|e| panic!("peers: {}", chain(&e)));
    let revision = peers.revision;
    let joiner = a.offset + 2 * a.agents;
    let joiner_name = format!("sim-{joiner}");
    let mut watchers = Vec::new();
    for i in 0..a.agents {
        let (client, tokens) = (pooled.clone(), tokens.clone());
        watchers.push(tokio::spawn(async move {
            let watch = client.with_token(&tokens[i]).peers(revision, Duration::from_secs(60)).await;
            let arrived = Instant::now();
            (arrived, watch.unwrap_or_else(|e| panic!("watch: {}", chain(&e))))
        }));
    }
    // Let every long poll connect and reach the server.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let joined = Instant::now();
    fresh.register(&request(joiner)).await.unwrap_or_else(|e| panic!("join: {}", chain(&e)));
    let mut last = joined;
    let mut early = 0;
    for w in watchers {
        let (arrived, p) = w.await.expect("a watcher");
        if p.peers.iter().any(|p| p.name == joiner_name) {
            last = last.max(arrived);
        } else {
            early += 1;
        }
    }
    assert_eq!(early, 0, "{early} watches answered without the joiner (before it joined)");
    last.duration_since(joined).as_secs_f64() * 1000.0
}
