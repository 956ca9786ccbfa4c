//! `kiln check` on the server: one connectivity check at a time, driven in
//! two phases through the peers watch ([`kiln_core::check`]).
//!
//! A check takes every Ready node holding a lease. It announces
//! [`CheckPhase::Prepare`]; each node's agent makes its test pod and says
//! its address ([`Checks::ready`]). Once all have (or after
//! [`PREPARE_TIMEOUT`]), it announces [`CheckPhase::Probe`] with every
//! pod's address; each agent sends, listens, and reports what arrived
//! ([`Checks::report`]). Once all have (or after [`PROBE_TIMEOUT`]), the
//! round leaves the peers answer (the agents remove their pods) and the
//! verdicts are kept for `GET /api/v1/checks/ID`. What a node says is
//! bounded and checked against the round: only a node of the round
//! answers, once per phase, about the round's nodes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_core::{CheckPhase, CheckReport, CheckResult, CheckRound, CheckTarget, NodeError, NodeState, PodReady, Verdict};

use crate::registry::Registry;

/// How long nodes have to make their test pods.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long nodes have to probe and report.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest error a node may report, in bytes (longer is cut).
const MAX_ERROR: usize = 512;

/// Why a check could not start, or a node's answer was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Another check is running.
    #[error("check {0} is running; wait for it (kiln check runs one at a time)")]
    Busy(String),
    /// No node could take part.
    #[error("no Ready node holds a lease: nothing to check")]
    NoNodes,
    /// Not the running check, or not in the phase this answer belongs to.
    #[error("check {0} is not waiting for that")]
    NotWaiting(String),
    /// The node is not one of the check's.
    #[error("node {node} is not in check {id}")]
    NotInCheck {
        /// The check.
        id: String,
        /// The node.
        node: String,
    },
    /// The node said something the round cannot hold.
    #[error("{0}")]
    Invalid(String),
}

/// The running check.
struct Run {
    round: CheckRound,
    ready: BTreeMap<String, PodReady>,
    reports: BTreeMap<String, CheckReport>,
}

/// The checks of one server.
pub struct Checks {
    registry: Arc<Registry>,
    running: Mutex<Option<Run>>,
    /// The last checks' results, newest last (a few).
    done: Mutex<Vec<CheckResult>>,
    /// Woken when a node answers.
    answered: tokio::sync::Notify,
}

/// Results kept for `GET /api/v1/checks/ID`.
const KEEP: usize = 8;

impl Checks {
    /// No check yet, for the nodes of `registry`.
    pub fn new(registry: Arc<Registry>) -> Arc<Checks> {
        Arc::new(Checks { registry, running: Mutex::new(None), done: Mutex::new(Vec::new()), answered: tokio::sync::Notify::new() })
    }

    /// Starts a check of every Ready node holding a lease, driven in a task.
    /// Returns it as it starts.
    pub fn start(self: &Arc<Self>) -> Result<CheckResult, Error> {
        let mut running = self.running.lock().expect("checks lock");
        if let Some(run) = &*running {
            return Err(Error::Busy(run.round.id.clone()));
        }
        let nodes: Vec<CheckTarget> = self
            .registry
            .nodes()
            .into_iter()
            .filter(|n| n.subnet.is_some() && self.registry.state_of(n) == NodeState::Ready)
            .filter_map(|n| Some(CheckTarget { node: n.name, node_ip: n.public_ip?, pod_ip: None }))
            .collect();
        if nodes.is_empty() {
            return Err(Error::NoNodes);
        }
        let id = format!("c{:08x}", rand::random::<u32>());
        let round = CheckRound { id: id.clone(), phase: CheckPhase::Prepare, nodes };
        self.registry.set_check(Some(round.clone()));
        let started = running_result(&round);
        *running = Some(Run { round, ready: BTreeMap::new(), reports: BTreeMap::new() });
        drop(running);
        tokio::spawn(self.clone().drive(id));
        Ok(started)
    }

    /// Node `node`'s test pod for check `id`, or why it has none.
    pub fn ready(&self, id: &str, node: &str, mut ready: PodReady) -> Result<(), Error> {
        if let Some(e) = &mut ready.error {
            cut(e);
        }
        self.answer(id, node, CheckPhase::Prepare, |run| {
            if run.ready.contains_key(node) {
                return Err(Error::Invalid(format!("node {node} said its pod for check {id} already")));
            }
            if ready.pod_ip.is_none() && ready.error.is_none() {
                return Err(Error::Invalid("a pod address or an error".into()));
            }
            run.ready.insert(node.to_string(), ready);
            Ok(())
        })
    }

    /// What node `node`'s receivers got in check `id`.
    pub fn report(&self, id: &str, node: &str, report: CheckReport) -> Result<(), Error> {
        self.answer(id, node, CheckPhase::Probe, |run| {
            if run.reports.contains_key(node) {
                return Err(Error::Invalid(format!("node {node} reported for check {id} already")));
            }
            // At most one datagram per sender and kind, from the round's nodes.
            let max = 2 * run.round.nodes.len();
            if report.received.len() > max {
                return Err(Error::Invalid(format!("{} datagrams reported; at most {max} in this check", report.received.len())));
            }
            if let Some(r) = report.received.iter().find(|r| !run.round.nodes.iter().any(|t| t.node == r.from)) {
                return Err(Error::Invalid(format!("a datagram from {:?}, not a node of check {id}", r.from)));
            }
            run.reports.insert(node.to_string(), report);
            Ok(())
        })
    }

    /// Check `id`: running (no paths yet) or done; `None` when unknown.
    pub fn get(&self, id: &str) -> Option<CheckResult> {
        if let Some(run) = &*self.running.lock().expect("checks lock")
            && run.round.id == id
        {
            return Some(running_result(&run.round));
        }
        self.done.lock().expect("checks lock").iter().find(|r| r.id == id).cloned()
    }

    fn answer(&self, id: &str, node: &str, phase: CheckPhase, f: impl FnOnce(&mut Run) -> Result<(), Error>) -> Result<(), Error> {
        let mut running = self.running.lock().expect("checks lock");
        let run =
            running.as_mut().filter(|r| r.round.id == id && r.round.phase == phase).ok_or_else(|| Error::NotWaiting(id.to_string()))?;
        if !run.round.nodes.iter().any(|t| t.node == node) {
            return Err(Error::NotInCheck { id: id.to_string(), node: node.to_string() });
        }
        f(run)?;
        drop(running);
        self.answered.notify_waiters();
        Ok(())
    }

    /// Waits until `done` holds of the running check or `timeout` passes.
    async fn wait(&self, timeout: Duration, done: impl Fn(&Run) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let answered = self.answered.notified();
            if self.running.lock().expect("checks lock").as_ref().is_none_or(&done) {
                return;
            }
            if tokio::time::timeout_at(deadline, answered).await.is_err() {
                return;
            }
        }
    }

    /// The two phases of check `id`, then its verdicts.
    async fn drive(self: Arc<Self>, id: String) {
        self.wait(PREPARE_TIMEOUT, |run| run.ready.len() == run.round.nodes.len()).await;
        let probe = {
            let mut running = self.running.lock().expect("checks lock");
            let Some(run) = running.as_mut() else { return };
            for t in &mut run.round.nodes {
                t.pod_ip = run.ready.get(&t.node).and_then(|r| r.pod_ip);
            }
            run.round.phase = CheckPhase::Probe;
            run.round.clone()
        };
        tracing::info!(check = %id, pods = probe.nodes.iter().filter(|t| t.pod_ip.is_some()).count(), nodes = probe.nodes.len(), "check: probing");
        self.registry.set_check(Some(probe));
        self.wait(PROBE_TIMEOUT, |run| run.round.nodes.iter().filter(|t| t.pod_ip.is_some()).all(|t| run.reports.contains_key(&t.node)))
            .await;
        let Some(run) = self.running.lock().expect("checks lock").take() else { return };
        self.registry.set_check(None);
        let result = finish(run);
        let failed = result.paths.iter().filter(|p| p.verdict != Verdict::Ok).count();
        tracing::info!(check = %id, ok = result.ok, paths = result.paths.len(), failed, errors = result.errors.len(), "check: done");
        let mut done = self.done.lock().expect("checks lock");
        done.push(result);
        let over = done.len().saturating_sub(KEEP);
        done.drain(..over);
    }
}

/// A running check as `GET` shows it.
fn running_result(round: &CheckRound) -> CheckResult {
    CheckResult { id: round.id.clone(), done: false, ok: false, nodes: round.nodes.clone(), paths: Vec::new(), errors: Vec::new() }
}

/// The verdicts of a finished round, and each node that failed its part.
fn finish(run: Run) -> CheckResult {
    let reports: Vec<(String, CheckReport)> = run.reports.into_iter().collect();
    let paths = kiln_core::check::verdicts(&run.round.nodes, &reports);
    let mut errors = Vec::new();
    for t in &run.round.nodes {
        let error = match run.ready.get(&t.node) {
            None => Some("made no test pod in time".to_string()),
            Some(PodReady { error: Some(e), .. }) => Some(format!("made no test pod: {e}")),
            Some(_) if !reports.iter().any(|(n, _)| *n == t.node) => Some("sent no report in time".to_string()),
            Some(_) => None,
        };
        errors.extend(error.map(|error| NodeError { node: t.node.clone(), error }));
    }
    let ok = errors.is_empty() && paths.iter().all(|p| p.verdict == Verdict::Ok);
    CheckResult { id: run.round.id, done: true, ok, nodes: run.round.nodes, paths, errors }
}

/// Cuts `text` to [`MAX_ERROR`] bytes, on a character boundary.
fn cut(text: &mut String) {
    if text.len() > MAX_ERROR {
        let mut at = MAX_ERROR;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{CheckReport, PathKind, Received};

    /// A registry with `n` Ready nodes holding leases, on a fresh embedded store.
    async fn registry(dir: &std::path::Path, n: u8) -> Arc<Registry> {
        let store = crate::store::embedded::DbStore::open(&crate::StateDir::new(dir).registry_db(), None).unwrap();
        let net = crate::registry::NetworkConfig { network: "10.244.0.0/16".parse().unwrap(), subnet_len: 24, vni: 1 };
        let reg = Registry::open(Arc::new(store), net).await.unwrap();
        for i in 1..=n {
            let ip: std::net::IpAddr = std::net::Ipv4Addr::new(192, 0, 2, i).into();
            let req = kiln_core::RegisterRequest {
                machine_id: format!("{i:032x}"),
                hostname: format!("n{i}"),
                macs: Vec::new(),
                addresses: vec![ip],
                cpus: 1,
                memory_bytes: 1,
                kernel: "6.1".into(),
                agent_version: "t".into(),
                image_digest: String::new(),
                metrics: None,
                public_ip: Some(ip),
                vtep_mac: Some(format!("0e:00:00:00:00:{i:02x}").parse().unwrap()),
                uplink_mtu: None,
                csr: None,
            };
            reg.register(&req).await.unwrap();
        }
        reg
    }

    #[tokio::test]
    async fn a_round_takes_only_its_nodes_answers_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let checks = Checks::new(registry(dir.path(), 2).await);
        let started = checks.start().unwrap();
        assert_eq!(started.nodes.len(), 2);
        let id = started.id.clone();
        assert_eq!(checks.start().unwrap_err(), Error::Busy(id.clone()), "one at a time");
        let round = checks.registry.peers().check.expect("announced in the peers watch");
        assert_eq!((round.id.as_str(), round.phase), (id.as_str(), CheckPhase::Prepare));

        let pod = |ip: [u8; 4]| PodReady { pod_ip: Some(ip.into()), error: None };
        assert_eq!(checks.ready(&id, "x", pod([10, 244, 9, 2])), Err(Error::NotInCheck { id: id.clone(), node: "x".into() }));
        assert_eq!(checks.ready("c0", "n1", pod([10, 244, 1, 2])), Err(Error::NotWaiting("c0".into())));
        let report = CheckReport { received: Vec::new() };
        assert_eq!(checks.report(&id, "n1", report.clone()), Err(Error::NotWaiting(id.clone())), "no report before the probe phase");
        checks.ready(&id, "n1", pod([10, 244, 1, 2])).unwrap();
        assert!(matches!(checks.ready(&id, "n1", pod([10, 244, 1, 3])), Err(Error::Invalid(_))), "once");
        assert!(matches!(checks.ready(&id, "n2", PodReady { pod_ip: None, error: None }), Err(Error::Invalid(_))));
        checks.ready(&id, "n2", PodReady { pod_ip: None, error: Some("x".repeat(2000)) }).unwrap();

        // Both answered: the probe phase is announced with n1's pod.
        let probe = eventually(|| checks.registry.peers().check.filter(|r| r.phase == CheckPhase::Probe)).await;
        assert_eq!(probe.nodes.iter().map(|t| t.pod_ip).collect::<Vec<_>>(), vec![Some([10, 244, 1, 2].into()), None]);
        let from = |node: &str| Received { from: node.into(), to: PathKind::Node, source: [192, 0, 2, 2].into() };
        let flood = CheckReport { received: (0..5).map(|_| from("n2")).collect() };
        assert!(matches!(checks.report(&id, "n1", flood), Err(Error::Invalid(_))), "at most two datagrams per node of the round");
        let stranger = CheckReport { received: vec![from("zz")] };
        assert!(matches!(checks.report(&id, "n1", stranger), Err(Error::Invalid(_))), "only from the round's nodes");
        checks.report(&id, "n1", CheckReport { received: vec![from("n2")] }).unwrap();

        let done = eventually(|| checks.get(&id).filter(|r| r.done)).await;
        assert!(!done.ok);
        assert_eq!(done.errors.len(), 1, "{:?}", done.errors);
        assert!(done.errors[0].error.starts_with("made no test pod: xxx") && done.errors[0].error.len() < 600, "cut: {:?}", done.errors);
        assert!(checks.registry.peers().check.is_none(), "the round left the peers watch");
        assert!(checks.start().is_ok(), "the next check may start");
    }

    /// Polls `f` every 10 ms for up to 5 s.
    async fn eventually<T>(f: impl Fn() -> Option<T>) -> T {
        for _ in 0..500 {
            if let Some(v) = f() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not within 5 s");
    }
}
