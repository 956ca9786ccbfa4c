//! `control-load --cluster`: a cluster of `--agents` simulated nodes
//! against one `kiln serve`, as issue 16 measures it.
//!
//! 1. **Fill**: every node registers (each with its own key and a CSR when
//!    `--csr`), `--concurrency` at a time, each on a new TLS connection.
//! 2. **Watch**: every node holds the streamed peers watch on its own
//!    connection, from the revision of one whole list fetched for all of
//!    them (a real agent fetches it once, at its start).
//! 3. **Steady**: every node heartbeats every 10 s, spread over the 10 s,
//!    for `--seconds`; the server's CPU and memory are read from
//!    `/proc/PID` (`--server-pid`).
//! 4. **Wave**: `--wave` more nodes join at `--rate` a second, then leave
//!    at the same rate. For each, the time from its registration (or
//!    leave) being sent to the last of the watching nodes holding the
//!    change, and the bytes each watcher received per change.
//!
//! A simulated node heartbeats as the agent does: on its watch's
//! connection, switched to `kiln-peers` (kiln-client's `heartbeat`), so a
//! node holds one connection and a heartbeat is no new request. When the
//! watch is not open, kiln-client heartbeats with a request instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_client::{Client, chain};
use kiln_core::Peers;

use crate::{Args, Load, Registered, collect, summary};

/// Seconds between a node's heartbeats (the registry's).
const HEARTBEAT: Duration = Duration::from_secs(10);

/// What the watchers saw, gathered as their answers arrive.
#[derive(Default)]
struct Seen {
    /// Bytes of the answers that carried changes (their JSON bodies)
    /// since the counter was reset.
    bytes: u64,
    /// Those answers.
    answers: u64,
    /// A change (`+name` joined, `-subnet` left) → how many watchers hold
    /// it and when the last one got it.
    changes: HashMap<String, (usize, Instant)>,
    /// Calls that failed (each retried after a second).
    errors: u64,
}

/// CPU seconds (user + system) and resident memory of a process.
fn usage(pid: u32) -> Option<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| status.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse::<u64>().ok();
    // USER_HZ is 100 on Linux.
    Some((ticks / 100.0, kib("VmRSS:")?, kib("VmHWM:")?))
}

/// The server's CPU use (cores) and memory over a window.
struct Window {
    pid: Option<u32>,
    started: Instant,
    cpu: f64,
}

impl Window {
    fn start(pid: Option<u32>) -> Window {
        Window { pid, started: Instant::now(), cpu: pid.and_then(usage).map_or(0.0, |u| u.0) }
    }

    fn end(&self) -> serde_json::Value {
        let Some((cpu, rss, hwm)) = self.pid.and_then(usage) else { return serde_json::Value::Null };
        serde_json::json!({
            "cpu_cores": (cpu - self.cpu) / self.started.elapsed().as_secs_f64(),
            "rss_mib": rss as f64 / 1024.0,
            "peak_rss_mib": hwm as f64 / 1024.0,
        })
    }
}

/// Runs the four phases; prints one JSON object.
pub async fn run(a: &Args, load: Arc<Load>) {
    let n = a.agents;
    // 1. Fill.
    let semaphore = Arc::new(tokio::sync::Semaphore::new(a.concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in a.offset..a.offset + n {
        let (semaphore, load) = (semaphore.clone(), load.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire().await.expect("semaphore open");
            load.register(i, Instant::now()).await
        }));
    }
    let (fill_ms, nodes) = collect(tasks).await;
    let fill = summary(fill_ms.clone(), started.elapsed());
    let last_tenth = summary(fill_ms[n - n / 10..].to_vec(), started.elapsed());
    eprintln!("{n} registered in {:.1} s", started.elapsed().as_secs_f64());
    let after_fill = Window::start(a.server_pid).end();

    // 2. Watch, from one whole list.
    let watching = |node: &Registered, fresh: bool| load.identity_client(node, fresh);
    let whole = watching(&nodes[0], false).peers(None, Duration::ZERO).await.unwrap_or_else(|e| panic!("peers: {}", chain(&e)));
    assert!(!whole.delta && whole.peers.len() >= n, "the whole list holds every node: {}", whole.peers.len());
    let whole_bytes = serde_json::to_vec(&whole).expect("peers serialise").len();
    let since = (whole.epoch, whole.revision);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let beats = Arc::new(Mutex::new(Vec::<f64>::new()));
    let connected = Arc::new(tokio::sync::Semaphore::new(0));
    let first_calls = Arc::new(tokio::sync::Semaphore::new(a.concurrency));
    let started = Instant::now();
    let mut agents = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let agent = Agent {
            client: watching(node, false),
            since,
            first_beat: tokio::time::Instant::now() + HEARTBEAT.mul_f64(i as f64 / n as f64),
            seen: seen.clone(),
            beats: beats.clone(),
            connected: connected.clone(),
            first_calls: first_calls.clone(),
        };
        agents.push(tokio::spawn(agent.run()));
    }
    // Every node has made its first call (a TLS handshake) and watches.
    let _all = connected.acquire_many(u32::try_from(n).expect("agents fit u32")).await.expect("semaphore open");
    let watch_connect_s = started.elapsed().as_secs_f64();
    eprintln!("{n} watches held after {watch_connect_s:.1} s");

    // 3. Steady, after a first round of heartbeats.
    tokio::time::sleep(HEARTBEAT).await;
    beats.lock().expect("beats lock").clear();
    let steady = Window::start(a.server_pid);
    let steady_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    let heartbeat = summary(std::mem::take(&mut *beats.lock().expect("beats lock")), steady_started.elapsed());
    let steady = steady.end();
    eprintln!("steady for {} s, heartbeats {heartbeat}", a.seconds);

    // 4. Wave: joins, then leaves.
    {
        let mut s = seen.lock().expect("seen lock");
        s.bytes = 0;
        s.answers = 0;
    }
    let wave = Window::start(a.server_pid);
    let wave_started = Instant::now();
    let joiners: Vec<usize> = (a.offset + 2 * n..a.offset + 2 * n + a.wave).collect();
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut tasks = Vec::new();
    for (k, i) in joiners.iter().enumerate() {
        let at = wave_started + Duration::from_secs_f64(k as f64 / a.rate);
        sent.insert(format!("+sim-{i}"), at);
        let job = load.register(*i, at);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            job.await
        }));
    }
    let (join_ms, joined) = collect(tasks).await;
    let join_register = summary(join_ms, wave_started.elapsed());
    let notify_join = notified(&seen, &sent, n, Duration::from_secs(30)).await;
    let leave_started = Instant::now();
    let mut tasks = Vec::new();
    for (k, (i, node)) in joiners.iter().zip(&joined).enumerate() {
        let at = leave_started + Duration::from_secs_f64(k as f64 / a.rate);
        let client = watching(node, true);
        let name = format!("sim-{i}");
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let left = client.leave_node(&name).await.unwrap_or_else(|e| panic!("leave {name}: {}", chain(&e)));
            (at, left.subnet.expect("a joiner holds a lease"))
        }));
    }
    let mut sent = HashMap::new();
    for t in tasks {
        let (at, subnet) = t.await.expect("a leave task");
        sent.insert(format!("-{subnet}"), at);
    }
    let notify_leave = notified(&seen, &sent, n, Duration::from_secs(30)).await;
    let wave = wave.end();
    let (bytes, answers, errors) = {
        let s = seen.lock().expect("seen lock");
        (s.bytes, s.answers, s.errors)
    };
    for t in agents {
        t.abort();
    }
    let changes = 2 * a.wave;
    println!(
        "{}",
        serde_json::json!({
            "agents": n,
            "csr": a.csr,
            "fill": fill,
            "fill_last_tenth": last_tenth,
            "server_after_fill": after_fill,
            "whole_list_bytes": whole_bytes,
            "watch_connect_s": watch_connect_s,
            "heartbeat": heartbeat,
            "server_steady": steady,
            "wave": {
                "joins": a.wave,
                "rate": a.rate,
                "join_registration": join_register,
                "join_to_last_watcher": notify_join,
                "leave_to_last_watcher": notify_leave,
                "bytes_per_watcher_per_change": bytes as f64 / (n * changes) as f64,
                "answers_per_watcher": answers as f64 / n as f64,
                "server": wave,
            },
            "call_errors": errors,
        })
    );
}

/// One simulated node after its registration: it holds the streamed
/// peers watch on its own connection, and heartbeats every 10 s on it.
struct Agent {
    /// The node's client, for its watch and its heartbeats.
    client: Client,
    since: (u64, u64),
    first_beat: tokio::time::Instant,
    seen: Arc<Mutex<Seen>>,
    /// Heartbeat latencies (ms).
    beats: Arc<Mutex<Vec<f64>>>,
    /// One permit added when the watch's first line arrived.
    connected: Arc<tokio::sync::Semaphore>,
    /// Watches opened (TLS handshakes) `--concurrency` at a time.
    first_calls: Arc<tokio::sync::Semaphore>,
}

impl Agent {
    /// Until aborted: each line's bytes and changes go to `seen`.
    async fn run(self) {
        let mut since = self.since;
        let mut stream = None;
        let first = self.first_calls.acquire().await.expect("semaphore open");
        match self.open(&mut stream, since).await {
            Ok(p) => since = (p.epoch, p.revision),
            Err(e) => self.error(&e).await,
        }
        drop(first);
        self.connected.add_permits(1);
        let mut beat = self.first_beat;
        loop {
            let next = async {
                match stream.as_mut() {
                    Some(open) => open.next().await,
                    None => self.open(&mut stream, since).await.map(Some),
                }
            };
            let answer = tokio::select! {
                answer = next => answer,
                () = tokio::time::sleep_until(beat) => {
                    beat += HEARTBEAT;
                    let t = Instant::now();
                    match self.client.heartbeat().await {
                        Ok(_) => self.beats.lock().expect("beats lock").push(t.elapsed().as_secs_f64() * 1000.0),
                        Err(e) => self.error(&e).await,
                    }
                    continue;
                }
            };
            let arrived = Instant::now();
            let peers: Peers = match answer {
                Ok(Some(p)) => p,
                Ok(None) => {
                    stream = None;
                    continue;
                }
                Err(e) => {
                    stream = None;
                    self.error(&e).await;
                    continue;
                }
            };
            assert!(peers.delta, "a watcher in step gets changes, not the whole list");
            since = (peers.epoch, peers.revision);
            if peers.peers.is_empty() && peers.left.is_empty() {
                continue;
            }
            let bytes = stream.as_ref().map_or(0, |s| s.last_line_bytes()) as u64;
            let mut s = self.seen.lock().expect("seen lock");
            s.bytes += bytes;
            s.answers += 1;
            // Keys made without allocating for changes already counted.
            let mut key = String::new();
            for (sign, what) in peers
                .peers
                .iter()
                .map(|p| ('+', &p.name as &dyn std::fmt::Display))
                .chain(peers.left.iter().map(|l| ('-', l as &dyn std::fmt::Display)))
            {
                use std::fmt::Write;
                key.clear();
                let _ = write!(key, "{sign}{what}");
                match s.changes.get_mut(key.as_str()) {
                    Some(entry) => {
                        entry.0 += 1;
                        entry.1 = entry.1.max(arrived);
                    }
                    None => {
                        s.changes.insert(key.clone(), (1, arrived));
                    }
                }
            }
        }
    }

    /// Opens the watch from `since` into `stream`: its first line.
    async fn open(&self, stream: &mut Option<kiln_client::PeersStream>, since: (u64, u64)) -> Result<Peers, kiln_client::Error> {
        let open = stream.insert(self.client.watch_peers(Some(since), Duration::from_secs(3600)).await?);
        let first = open.next().await?;
        first.ok_or_else(|| kiln_client::Error::Stream { route: "watch", url: String::new(), reason: "ended before its first line".into() })
    }

    /// Counts a failed call (the first five are printed) and waits a second.
    async fn error(&self, e: &kiln_client::Error) {
        let errors = {
            let mut s = self.seen.lock().expect("seen lock");
            s.errors += 1;
            s.errors
        };
        if errors <= 5 {
            eprintln!("call: {}", chain(e));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// For each change `sent` (key → when it was sent), the time until the
/// last of `watchers` held it: their summary, once all hold all, or at
/// `limit` (then the count of those missing is in the summary).
async fn notified(seen: &Mutex<Seen>, sent: &HashMap<String, Instant>, watchers: usize, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let done = {
            let s = seen.lock().expect("seen lock");
            sent.keys().all(|k| s.changes.get(k).is_some_and(|(count, _)| *count >= watchers))
        };
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = seen.lock().expect("seen lock");
    let mut ms = Vec::new();
    let mut missing = 0;
    for (key, at) in sent {
        match s.changes.get(key) {
            Some((count, last)) if *count >= watchers => ms.push(last.duration_since(*at).as_secs_f64() * 1000.0),
            _ => missing += 1,
        }
    }
    let mut out = summary(ms, limit);
    out["missing"] = missing.into();
    out.as_object_mut().expect("an object").remove("per_second");
    out
}
