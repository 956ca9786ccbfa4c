//! The agent's part of `kiln check` ([`kiln_core::check`]): a test pod made
//! as a container runtime makes one, then datagrams to and from every
//! other node of the round.
//!
//! The pod is a network namespace of its own, held by a thread parked in
//! it (no `ip netns`, no bind mount: the namespace goes with the thread),
//! wired by the plugins of this node's own conflist (`bridge` with
//! `host-local`, then `portmap`), run from `--cni-bin-dir` with CNI's
//! environment, as a runtime runs them. Its UDP socket, and one on the
//! node, listen on [`CHECK_PORT`] from the moment the pod is made. In the
//! probe phase the pod sends `kiln-check ID NODE` to every other node's pod
//! and address, a few times; what arrives from the round's nodes is
//! reported once per sender and kind, with the source address it came
//! from. When the round is over (it leaves the peers answer), the plugins
//! are run again with `DEL` and the thread ends.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kiln_core::check::{CHECK_PORT, probe_payload, probe_sender};
use kiln_core::{CheckPhase, CheckReport, CheckRound, PathKind, PodReady, Received};
use log::{info, warn};
use tokio::sync::watch;

use crate::register::{Registered, chain};

/// When the probe phase sends, from its start: a datagram lost once is
/// sent again.
const SENDS: [Duration; 4] = [Duration::ZERO, Duration::from_millis(250), Duration::from_millis(500), Duration::from_millis(1000)];
/// How long the probe phase listens, from its start.
const LISTEN: Duration = Duration::from_millis(2500);

/// Where the test pod's network comes from.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's CNI conflist (`10-flannel.conflist`, written by the overlay).
    pub conflist: PathBuf,
    /// Where the CNI plugins are (`CNI_PATH`).
    pub cni_bin_dir: PathBuf,
}

/// A test pod.
struct TestPod {
    /// The check it is for.
    id: String,
    ip: Ipv4Addr,
    /// Bound in the pod at [`CHECK_PORT`].
    pod_socket: std::net::UdpSocket,
    /// Bound on the node at [`CHECK_PORT`].
    node_socket: std::net::UdpSocket,
    /// What DEL needs: the namespace's path, the plugins' configs (each
    /// with its name and version) and ADD's result.
    netns: String,
    plugins: Vec<serde_json::Value>,
    result: serde_json::Value,
    /// Ends the thread that holds the namespace.
    release: mpsc::Sender<()>,
}

/// Takes part in the rounds announced on `rounds` as the node on
/// `registered`, until `rounds` closes or `stop` is told (or dropped);
/// then removes its pod.
pub async fn run(
    config: Config,
    mut rounds: watch::Receiver<Option<CheckRound>>,
    registered: watch::Receiver<Option<Registered>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut pod: Option<TestPod> = None;
    // The last round this node made its pod for, and reported in.
    let (mut prepared, mut reported) = (String::new(), String::new());
    loop {
        tokio::select! {
            changed = rounds.changed() => if changed.is_err() { break },
            _ = &mut stop => break,
        }
        let round = rounds.borrow_and_update().clone();
        // A pod of a round that is over goes.
        if pod.as_ref().is_some_and(|p| round.as_ref().is_none_or(|r| r.id != p.id)) {
            remove(pod.take(), &config).await;
        }
        let (Some(round), Some(me)) = (round, registered.borrow().clone()) else { continue };
        if !round.nodes.iter().any(|t| t.node == me.name) {
            continue;
        }
        match round.phase {
            CheckPhase::Prepare if prepared != round.id => {
                prepared = round.id.clone();
                let made = tokio::task::spawn_blocking({
                    let (config, id) = (config.clone(), round.id.clone());
                    move || make(&config, &id)
                })
                .await
                .unwrap_or_else(|e| Err(format!("the pod's task failed: {e}")));
                let ready = match &made {
                    Ok(p) => {
                        info!("check {}: test pod at {}", round.id, p.ip);
                        PodReady { pod_ip: Some(p.ip), error: None }
                    }
                    Err(e) => {
                        warn!("check {}: no test pod: {e}", round.id);
                        PodReady { pod_ip: None, error: Some(e.clone()) }
                    }
                };
                pod = made.ok();
                if let Err(e) = me.client.check_ready(&round.id, &ready).await {
                    warn!("check {}: saying the test pod: {}", round.id, chain(&e));
                }
            }
            CheckPhase::Probe if reported != round.id => {
                let Some(p) = pod.as_ref().filter(|p| p.id == round.id) else { continue };
                reported = round.id.clone();
                let report = match probe(&me.name, &round, p).await {
                    Ok(r) => r,
                    Err(e) => {
                        warn!("check {}: probing: {e}", round.id);
                        CheckReport { received: Vec::new() }
                    }
                };
                info!("check {}: {} datagrams received", round.id, report.received.len());
                if let Err(e) = me.client.check_report(&round.id, &report).await {
                    warn!("check {}: reporting: {}", round.id, chain(&e));
                }
            }
            _ => {}
        }
    }
    remove(pod.take(), &config).await;
}

/// Makes check `id`'s test pod: its namespace, the conflist's plugins
/// (ADD), and its sockets.
fn make(config: &Config, id: &str) -> Result<TestPod, String> {
    let text = std::fs::read_to_string(&config.conflist).map_err(|e| format!("{}: {e}", config.conflist.display()))?;
    let plugins = plugin_configs(&text).map_err(|e| format!("{}: {e}", config.conflist.display()))?;
    let node_socket =
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, CHECK_PORT)).map_err(|e| format!("binding UDP {CHECK_PORT} on the node: {e}"))?;
    let (release, held) = mpsc::channel::<()>();
    let (made, namespace) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("check-{id}"))
        .spawn(move || {
            let entered =
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| format!("a network namespace: {e}")).and_then(|()| {
                    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, CHECK_PORT))
                        .map_err(|e| format!("binding UDP {CHECK_PORT} in the pod: {e}"))?;
                    Ok((nix::unistd::gettid(), socket))
                });
            let ok = entered.is_ok();
            let _ = made.send(entered);
            if ok {
                // Parked in the namespace until the pod is removed (or the agent ends).
                let _ = held.recv();
            }
        })
        .map_err(|e| format!("the pod's thread: {e}"))?;
    let (tid, pod_socket) = namespace.recv().map_err(|_| "the pod's thread ended".to_string())??;
    let netns = format!("/proc/{}/task/{tid}/ns/net", std::process::id());
    let container = container_id(id);
    let mut prev: Option<serde_json::Value> = None;
    for (i, conf) in plugins.iter().enumerate() {
        match cni(config, "ADD", &container, &netns, conf, prev.as_ref()) {
            Ok(out) => prev = Some(out),
            Err(e) => {
                // Undo what was added, newest first.
                for done in plugins[..i].iter().rev() {
                    let _ = cni(config, "DEL", &container, &netns, done, prev.as_ref());
                }
                let _ = release.send(());
                return Err(e);
            }
        }
    }
    let result = prev.unwrap_or_default();
    let ip = result["ips"][0]["address"].as_str().and_then(|a| a.split('/').next()?.parse().ok());
    let pod = TestPod { id: id.to_string(), ip: Ipv4Addr::UNSPECIFIED, pod_socket, node_socket, netns, plugins, result, release };
    match ip {
        Some(ip) => Ok(TestPod { ip, ..pod }),
        None => {
            let words = format!("no IPv4 address in the CNI result {}", pod.result);
            delete(config, &pod);
            Err(words)
        }
    }
}

/// The plugins of a conflist, each as a plugin config (the list's name and
/// version put in). Plugin types must be plain names.
fn plugin_configs(conflist: &str) -> Result<Vec<serde_json::Value>, String> {
    let list: serde_json::Value = serde_json::from_str(conflist).map_err(|e| e.to_string())?;
    let plugins = list["plugins"].as_array().ok_or("no plugins")?;
    let mut out = Vec::new();
    for plugin in plugins {
        let kind = plugin["type"].as_str().unwrap_or_default();
        if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(format!("plugin type {kind:?}"));
        }
        let mut conf = plugin.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        out.push(conf);
    }
    if out.is_empty() {
        return Err("no plugins".into());
    }
    Ok(out)
}

/// The CNI container id of check `id`'s pod.
fn container_id(id: &str) -> String {
    format!("kiln-check-{id}")
}

/// Runs one plugin with CNI's environment, `conf` (and `prev` as its
/// `prevResult`) on stdin; its result.
fn cni(
    config: &Config,
    command: &str,
    container: &str,
    netns: &str,
    conf: &serde_json::Value,
    prev: Option<&serde_json::Value>,
) -> Result<serde_json::Value, String> {
    let mut conf = conf.clone();
    let kind = conf["type"].as_str().unwrap_or_default().to_string();
    if let Some(p) = prev {
        conf["prevResult"] = p.clone();
    }
    let plugin = config.cni_bin_dir.join(&kind);
    let mut child = Command::new(&plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &config.cni_bin_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", plugin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(conf.to_string().as_bytes()).map_err(|e| format!("{}: {e}", plugin.display()))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("{}: {e}", plugin.display()))?;
    if !out.status.success() {
        let words = String::from_utf8_lossy(if out.stdout.is_empty() { &out.stderr } else { &out.stdout });
        return Err(format!("CNI {kind} {command}: {}", words.trim()));
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(prev.cloned().unwrap_or_default());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("CNI {kind} {command}: its result: {e}"))
}

/// Removes a test pod: DEL, newest plugin first, then its namespace.
async fn remove(pod: Option<TestPod>, config: &Config) {
    let Some(pod) = pod else { return };
    let config = config.clone();
    let done = tokio::task::spawn_blocking(move || {
        delete(&config, &pod);
        pod.id
    })
    .await;
    if let Ok(id) = done {
        info!("check {id}: test pod removed");
    }
}

/// DEL for each plugin, newest first; then the namespace's thread ends.
fn delete(config: &Config, pod: &TestPod) {
    let container = container_id(&pod.id);
    for conf in pod.plugins.iter().rev() {
        if let Err(e) = cni(config, "DEL", &container, &pod.netns, conf, Some(&pod.result)) {
            warn!("check {}: removing the test pod: {e}", pod.id);
        }
    }
    let _ = pod.release.send(());
}

/// The probe phase of `round` for node `me`: sends from the pod to every
/// other node's pod and address, and reports what arrived meanwhile.
async fn probe(me: &str, round: &CheckRound, pod: &TestPod) -> std::io::Result<CheckReport> {
    let socket = |s: &std::net::UdpSocket| -> std::io::Result<tokio::net::UdpSocket> {
        let s = s.try_clone()?;
        s.set_nonblocking(true)?;
        tokio::net::UdpSocket::from_std(s)
    };
    let (pod_socket, node_socket) = (socket(&pod.pod_socket)?, socket(&pod.node_socket)?);
    let others: Vec<_> = round.nodes.iter().filter(|t| t.node != me).collect();
    let mut targets: Vec<SocketAddr> = others.iter().map(|t| SocketAddr::new(t.node_ip, CHECK_PORT)).collect();
    targets.extend(others.iter().filter_map(|t| t.pod_ip).map(|ip| SocketAddr::new(IpAddr::V4(ip), CHECK_PORT)));
    let payload = probe_payload(&round.id, me);
    let start = tokio::time::Instant::now();
    let mut sends: std::collections::VecDeque<tokio::time::Instant> = SENDS.iter().map(|d| start + *d).collect();
    let mut received: BTreeMap<(String, PathKind), IpAddr> = BTreeMap::new();
    let (mut pod_buf, mut node_buf) = ([0u8; 128], [0u8; 128]);
    let wanted = 2 * others.len();
    loop {
        let next_send = sends.front().copied();
        if next_send.is_none() && received.len() >= wanted {
            break;
        }
        let wake = next_send.unwrap_or(start + LISTEN).min(start + LISTEN);
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {
                if next_send.is_some_and(|at| at <= tokio::time::Instant::now()) {
                    sends.pop_front();
                    for to in &targets {
                        // A lost datagram is what the check measures.
                        let _ = pod_socket.send_to(payload.as_bytes(), to).await;
                    }
                } else if tokio::time::Instant::now() >= start + LISTEN {
                    break;
                }
            }
            got = pod_socket.recv_from(&mut pod_buf) => note(got, &pod_buf, PathKind::Pod, me, round, &mut received),
            got = node_socket.recv_from(&mut node_buf) => note(got, &node_buf, PathKind::Node, me, round, &mut received),
        }
    }
    let received = received.into_iter().map(|((from, to), source)| Received { from, to, source }).collect();
    Ok(CheckReport { received })
}

/// Keeps a datagram that names another node of the round, the first of
/// each sender and kind.
fn note(
    got: std::io::Result<(usize, SocketAddr)>,
    buf: &[u8],
    kind: PathKind,
    me: &str,
    round: &CheckRound,
    received: &mut BTreeMap<(String, PathKind), IpAddr>,
) {
    let Ok((n, source)) = got else { return };
    let Some(from) = probe_sender(&buf[..n], &round.id) else { return };
    if from != me && round.nodes.iter().any(|t| t.node == from) {
        received.entry((from.to_string(), kind)).or_insert(source.ip());
    }
}

/// The conflist the overlay writes for this node.
pub fn conflist(cni_conf_dir: &Path) -> PathBuf {
    cni_conf_dir.join(crate::flannel::CONFLIST)
}
