//! control-load: simulated agents against a running `kiln serve`, for
//! `bench/control` (issue 6's and issue 13's figures).
//!
//! ```text
//! control-load --api https://127.0.0.1:8443 --ca STATE/ca.pem --token TOKEN --agents 1000 --concurrency 32
//!              [--csr] [--join-token ID.SECRET]
//! ```
//!
//! 1. Registration: every agent registers once (with a VTEP MAC, so each
//!    gets a lease), `--concurrency` at a time: throughput and latency;
//!    then as many again at a steady `--rate` (open loop): latency.
//! 2. Heartbeats: the registered agents heartbeat for `--seconds`,
//!    `--concurrency` at a time: throughput and latency.
//! 3. Convergence: every agent long-polls `/api/v1/peers`; one more node
//!    joins; the time from sending its registration to the last agent
//!    holding a peers list with it.
//!
//! `--csr`: every agent has its own key (ECDSA P-256, as the agent's) and
//! sends a certificate signing request for it; each answer must carry a
//! client certificate, and every later call of the node presents it over
//! mutual TLS, on the node's own connection (a node with a key is refused
//! with its token alone). The keys and CSRs are made before the timed
//! phases; before the heartbeats each node opens its connection once
//! (`node_connect`: a TLS handshake with a client certificate).
//! `--join-token`: registrations carry this join token (`--token` does the
//! same: any token the server takes for registration).
//!
//! `--cluster`: issue 16's figures instead (see [`cluster`]): `--agents`
//! nodes that all hold the peers watch and heartbeat every 10 s, then a
//! wave of `--wave` joins and leaves at `--rate`; `--server-pid` to read
//! the server's CPU and memory.
//!
//! Prints one JSON object.

#[path = "control-load/cluster.rs"]
mod cluster;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_client::{Client, chain};
use kiln_core::{RegisterRequest, RegisterResponse};

struct Args {
    api: String,
    ca: Option<String>,
    token: String,
    join_token: Option<String>,
    csr: bool,
    agents: usize,
    concurrency: usize,
    seconds: u64,
    offset: usize,
    rate: f64,
    cluster: bool,
    wave: usize,
    server_pid: Option<u32>,
}

fn args() -> Args {
    let mut a = Args {
        api: String::new(),
        ca: None,
        token: String::new(),
        join_token: None,
        csr: false,
        agents: 1000,
        concurrency: 32,
        seconds: 10,
        offset: 0,
        rate: 200.0,
        cluster: false,
        wave: 100,
        server_pid: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--api" => a.api = value(),
            "--ca" => a.ca = Some(value()),
            "--token" => a.token = value(),
            "--join-token" => a.join_token = Some(value()),
            "--csr" => a.csr = true,
            "--agents" => a.agents = value().parse().expect("--agents N"),
            "--concurrency" => a.concurrency = value().parse().expect("--concurrency N"),
            "--seconds" => a.seconds = value().parse().expect("--seconds N"),
            "--offset" => a.offset = value().parse().expect("--offset N"),
            "--rate" => a.rate = value().parse().expect("--rate PER_SECOND"),
            "--cluster" => a.cluster = true,
            "--wave" => a.wave = value().parse().expect("--wave N"),
            "--server-pid" => a.server_pid = Some(value().parse().expect("--server-pid PID")),
            other => panic!("unknown flag {other}"),
        }
    }
    let registers = !a.token.is_empty() || a.join_token.is_some();
    assert!(!a.api.is_empty() && registers, "--api and --token (or --join-token) are needed");
    a
}

fn request(i: usize, csr: Option<String>) -> RegisterRequest {
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
        csr,
    }
}

/// A simulated agent's own key (PEM) and a CSR for it, made before the
/// timed phases.
struct NodeKey {
    key_pem: String,
    csr_pem: String,
}

/// `n` keys and CSRs, as the agent makes them (agent/src/node_key.rs);
/// agent `i` has the `i - --offset`th.
fn node_keys(n: usize) -> Vec<NodeKey> {
    (0..n)
        .map(|_| {
            let key = rcgen::KeyPair::generate().expect("an ECDSA P-256 key");
            let csr = rcgen::CertificateParams::new(Vec::<String>::new())
                .and_then(|params| params.serialize_request(&key))
                .and_then(|csr| csr.pem())
                .expect("a CSR");
            NodeKey { key_pem: key.serialize_pem(), csr_pem: csr }
        })
        .collect()
}

/// A registered simulated node: its token, and its certificate and key
/// (PEM, what it presents) when it sent a CSR.
struct Registered {
    token: String,
    identity: Option<Vec<u8>>,
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

/// The simulated agents' shared settings.
struct Load {
    api: String,
    ca: Option<Vec<u8>>,
    /// Keys of agents `offset..offset + 2 * agents + 1` when `--csr`.
    keys: Arc<Vec<NodeKey>>,
    offset: usize,
    /// Not pooled: every registration on a new TLS connection.
    fresh: Client,
}

impl Load {
    /// Registers agent `i`, timed from `start`; with a CSR, checks that the
    /// answer carries a certificate.
    fn register(&self, i: usize, start: Instant) -> impl Future<Output = (f64, Registered)> + Send + 'static {
        let client = self.fresh.clone();
        let key = (!self.keys.is_empty()).then(|| (self.keys.clone(), i - self.offset));
        async move {
            let csr = key.as_ref().map(|(keys, k)| keys[*k].csr_pem.clone());
            let answer = client.register(&request(i, csr)).await.unwrap_or_else(|e| panic!("register: {}", chain(&e)));
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            (ms, registered(answer, key.as_ref().map(|(keys, k)| &keys[*k])))
        }
    }

    /// The client each node calls as: its own, presenting its certificate
    /// (a pool of its own), else `pooled` with its token.
    fn node_client(&self, pooled: &Client, node: &Registered) -> Client {
        match &node.identity {
            Some(_) => self.identity_client(node, false),
            None => pooled.with_token(&node.token),
        }
    }

    /// A client of the node's own: its certificate when it has one, else
    /// its token; with `fresh`, a new connection for every call.
    fn identity_client(&self, node: &Registered, fresh: bool) -> Client {
        let b = Client::builder(&self.api)
            .ca_pem(self.ca.as_deref())
            .identity_pem(node.identity.as_deref())
            .token(&node.token)
            .timeout(Duration::from_secs(120))
            .no_proxy();
        let b = if fresh { b.fresh_connections() } else { b };
        b.build().unwrap_or_else(|e| panic!("{}", chain(&e)))
    }
}

/// What a node keeps of its registration; with `key`, the answer must
/// carry its certificate.
fn registered(answer: RegisterResponse, key: Option<&NodeKey>) -> Registered {
    let identity = key.map(|key| {
        let cert = answer.certificate.as_ref().unwrap_or_else(|| panic!("{}: a CSR answered without a certificate", answer.name));
        assert!(cert.pem.contains("BEGIN CERTIFICATE") && cert.valid_secs > 0, "{}: not a certificate", answer.name);
        format!("{}{}", cert.pem, key.key_pem).into_bytes()
    });
    Registered { token: answer.token, identity }
}

#[tokio::main]
async fn main() {
    let a = args();
    let ca = a.ca.as_ref().map(|ca| std::fs::read(ca).unwrap_or_else(|e| panic!("{ca}: {e}")));
    let register_token = a.join_token.as_deref().unwrap_or(&a.token);
    let client = |pooled: bool| {
        let b = Client::builder(&a.api).ca_pem(ca.as_deref()).token(register_token).timeout(Duration::from_secs(120)).no_proxy();
        // Not pooled: no idle connections kept, every registration opens its own.
        let b = if pooled { b } else { b.fresh_connections() };
        b.build().unwrap_or_else(|e| panic!("{}", chain(&e)))
    };
    let made = Instant::now();
    let count = if a.cluster { 2 * a.agents + a.wave } else { 2 * a.agents + 1 };
    let keys = if a.csr { node_keys(count) } else { Vec::new() };
    eprintln!("{} keys and CSRs made in {:.2} s (not timed)", keys.len(), made.elapsed().as_secs_f64());
    let load = Arc::new(Load { api: a.api.clone(), ca: ca.clone(), keys: Arc::new(keys), offset: a.offset, fresh: client(false) });
    let pooled = client(true);
    if a.cluster {
        return cluster::run(&a, load).await;
    }

    // 1. Registration throughput, closed loop.
    let semaphore = Arc::new(tokio::sync::Semaphore::new(a.concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in a.offset..a.offset + a.agents {
        let (semaphore, load) = (semaphore.clone(), load.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire().await.expect("semaphore open");
            load.register(i, Instant::now()).await
        }));
    }
    let (closed_ms, mut nodes) = collect(tasks).await;
    let throughput = summary(closed_ms, started.elapsed());

    // 2. Registration latency, open loop at --rate.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, i) in (a.offset + a.agents..a.offset + 2 * a.agents).enumerate() {
        let at = started + Duration::from_secs_f64(n as f64 / a.rate);
        let job = load.register(i, at);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            job.await
        }));
    }
    let (open_ms, more) = collect(tasks).await;
    nodes.extend(more);
    let latency = summary(open_ms, started.elapsed());

    let clients: Arc<Vec<Client>> = Arc::new(nodes.iter().map(|n| load.node_client(&pooled, n)).collect());
    let node_connect = match a.csr {
        true => Some(connect(clients.clone(), a.concurrency).await),
        false => None,
    };
    let heartbeats = heartbeats(clients.clone(), &a).await;
    let convergence_ms = convergence(&load, clients, &a).await;

    println!(
        "{}",
        serde_json::json!({
            "agents": a.agents,
            "concurrency": a.concurrency,
            "rate": a.rate,
            "csr": a.csr,
            "join_token": a.join_token.is_some(),
            "registration": throughput,
            "registration_at_rate": latency,
            "node_connect": node_connect,
            "heartbeat": heartbeats,
            "convergence_ms": convergence_ms,
        })
    );
}

/// The registrations' latencies and nodes, in order.
async fn collect(tasks: Vec<tokio::task::JoinHandle<(f64, Registered)>>) -> (Vec<f64>, Vec<Registered>) {
    let mut ms = Vec::new();
    let mut nodes = Vec::new();
    for t in tasks {
        let (m, node) = t.await.expect("a register task");
        ms.push(m);
        nodes.push(node);
    }
    (ms, nodes)
}

/// Each node's first call on its own client, `concurrency` at a time: a
/// new connection, a TLS handshake with its client certificate, and a
/// heartbeat (what a real agent pays once, and keeps the connection).
async fn connect(clients: Arc<Vec<Client>>, concurrency: usize) -> serde_json::Value {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..clients.len() {
        let (semaphore, clients) = (semaphore.clone(), clients.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire().await.expect("semaphore open");
            let t = Instant::now();
            clients[n].heartbeat().await.unwrap_or_else(|e| panic!("first heartbeat: {}", chain(&e)));
            t.elapsed().as_secs_f64() * 1000.0
        }));
    }
    let mut ms = Vec::new();
    for t in tasks {
        ms.push(t.await.expect("a connect task"));
    }
    summary(ms, started.elapsed())
}

/// Phase 3, heartbeats: `--concurrency` workers for `--seconds`, each
/// sending the next node's in turn, as that node (`clients`).
async fn heartbeats(clients: Arc<Vec<Client>>, a: &Args) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..a.concurrency {
        let (clients, concurrency) = (clients.clone(), a.concurrency);
        tasks.push(tokio::spawn(async move {
            let mut ms = Vec::new();
            let mut n = w;
            while Instant::now() < deadline {
                let t = Instant::now();
                let beat = clients[n % clients.len()].heartbeat().await;
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

/// Phase 4, convergence: the first `--agents` nodes (`clients`) watch the
/// peers; one more node joins; milliseconds from its registration to the
/// last watch answered with it.
async fn convergence(load: &Load, clients: Arc<Vec<Client>>, a: &Args) -> f64 {
    let peers = clients[0].peers(None, Duration::ZERO).await.unwrap_or_else(|e| panic!("peers: {}", chain(&e)));
    let (epoch, revision) = (peers.epoch, peers.revision);
    let joiner = a.offset + 2 * a.agents;
    let joiner_name = format!("sim-{joiner}");
    let mut watchers = Vec::new();
    for i in 0..a.agents {
        let clients = clients.clone();
        watchers.push(tokio::spawn(async move {
            let watch = clients[i].peers(Some((epoch, revision)), Duration::from_secs(60)).await;
            let arrived = Instant::now();
            (arrived, watch.unwrap_or_else(|e| panic!("watch: {}", chain(&e))))
        }));
    }
    // Let every long poll connect and reach the server.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let joined = Instant::now();
    load.register(joiner, joined).await;
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
