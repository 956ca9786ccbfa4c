//! The pool reconciler and autoscaler as one task behind a handle, the
//! shape of omicron's sled-agent health monitor.
//!
//! [`start`] spawns the task and returns a [`PoolsHandle`]. The task owns
//! everything that changes: the [`Fleet`] (hosts, storage pools), the
//! desired replicas and the autoscalers' memory, so nothing is locked.
//! The handle sends it commands over an `mpsc` channel with a `oneshot`
//! reply ([`PoolsHandle::scale`], [`PoolsHandle::stop`]) and reads what it
//! publishes on a `watch` channel ([`Status`]). Each pass:
//!
//! 1. autoscale: every autoscaled pool's Ready nodes are scraped at
//!    once, and a change of replicas is stored through the control plane;
//! 2. reconcile: the fleet is lent to one of tokio's blocking threads, where
//!    libvirt's calls run ([`Fleet::reconcile`]), never on a tokio worker;
//!    commands that arrive meanwhile are answered at once;
//! 3. the hosts' state after the pass is published.
//!
//! The control plane is reached through [`ControlPlane`] (registered
//! nodes, leases, the stored replicas, a node's metrics), so this crate
//! knows nothing of the registry or its store.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_core::pool::{Pin, RolloutAction, RolloutRecord};
use kiln_core::{HostStatus, Mac, PoolStatus};
use tokio::sync::{mpsc, oneshot, watch};

use crate::NodeId;
use crate::autoscale::{CpuTimes, decide, load1_from_scrape};
use crate::fleet::{Fleet, NodeMedia};
use crate::reconcile::{Error as PassError, Registry, Report, Settings, Target};
use crate::spec::{Boot, Metric, Pool};
use kiln_core::error_chain as chain;

/// A registered node of one of kiln's pools, as the control plane knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The node.
    pub node: NodeId,
    /// Where its agent serves `/metrics` (`IP:PORT`), if it does.
    pub metrics: Option<String>,
    /// Heard from within the grace period: only Ready nodes are counted
    /// (and scraped) by the autoscaler.
    pub ready: bool,
}

/// What the pool task needs from the control plane.
pub trait ControlPlane: Send + Sync + 'static {
    /// The control plane's own error, kept as the cause of what failed.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Registered nodes whose names are pool nodes' (`kiln-<pool>-<n>`).
    fn registered(&self) -> impl Future<Output = Result<Vec<Registered>, Self::Error>> + Send;
    /// Removes `node` and releases its lease; `false` when it was not registered.
    fn deregister(&self, node: &NodeId) -> impl Future<Output = Result<bool, Self::Error>> + Send;
    /// The stored desired replicas, by pool.
    fn replicas(&self) -> impl Future<Output = Result<BTreeMap<String, u32>, Self::Error>> + Send;
    /// Stores `pool`'s desired replicas.
    fn set_replicas(&self, pool: &str, replicas: u32) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// The stored rollout settings (pause, undo), by pool.
    fn rollouts(&self) -> impl Future<Output = Result<BTreeMap<String, RolloutRecord>, Self::Error>> + Send;
    /// Stores `pool`'s rollout settings.
    fn set_rollout(&self, pool: &str, record: &RolloutRecord) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// The text of `http://TARGET/metrics`, within a bounded time.
    fn scrape(&self, target: &str) -> impl Future<Output = Result<String, Self::Error>> + Send;
}

/// How the task runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// How nodes are attached and run.
    pub settings: Settings,
    /// Time between passes when nothing asks for one sooner.
    pub interval: Duration,
    /// Autoscalers decide and log, but change nothing.
    pub autoscale_dry_run: bool,
    /// Who may act on the hosts, when servers share a store and elect one
    /// ([`Lead`]); `None`: this server alone.
    pub leadership: Option<watch::Receiver<Lead>>,
}

/// Which server may change the hosts, as this one knows it. A server
/// that does not lead still observes every pass (its `kiln pools`, the
/// boot scripts of network nodes), but neither creates, starts nor
/// removes anything, and its autoscaler does not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lead {
    /// This server, while its election lease lasts: until `until`, a time
    /// before the lease's expiry as the store counts it.
    Here {
        /// This server's name.
        server: String,
        /// When the lease may have expired, unless renewed first.
        until: Instant,
    },
    /// Another server, by its name.
    Elsewhere(String),
    /// No server holds the election now (one is being held, or the store
    /// is out of reach).
    Nobody,
}

impl Lead {
    /// Whether this server may act now.
    pub fn acts(&self) -> bool {
        matches!(self, Lead::Here { until, .. } if Instant::now() < *until)
    }

    /// As `kiln pools` shows it.
    pub fn status(&self) -> kiln_core::pool::Leader {
        match self {
            Lead::Here { server, .. } => kiln_core::pool::Leader { server: Some(server.clone()), here: true },
            Lead::Elsewhere(server) => kiln_core::pool::Leader { server: Some(server.clone()), here: false },
            Lead::Nobody => kiln_core::pool::Leader::default(),
        }
    }
}

/// Whether a server may act: always alone, else while it leads.
fn acts(leadership: &Option<watch::Receiver<Lead>>) -> bool {
    leadership.as_ref().is_none_or(|l| l.borrow().acts())
}

/// Starting the task failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The stored replicas could not be read or written.
    #[error("pool replicas in the store")]
    Store(#[source] crate::reconcile::Cause),
}

/// A scale request that cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    /// No such pool.
    #[error("no pool `{0}`")]
    NoPool(String),
    /// Outside `min..=max`.
    #[error("pool `{pool}` takes {min} to {max} replicas, not {asked}")]
    OutOfRange {
        /// The pool.
        pool: String,
        /// Its min.
        min: u32,
        /// Its max.
        max: u32,
        /// What was asked.
        asked: u32,
    },
    /// The store refused.
    #[error("storing the replicas")]
    Store(#[source] crate::reconcile::Cause),
    /// The pool task has stopped.
    #[error("the pool task has stopped")]
    Stopped,
}

/// A rollout request that cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// No such pool.
    #[error("no pool `{0}`")]
    NoPool(String),
    /// No generation older than the target is kept.
    #[error("pool `{pool}`: image `{image}` keeps no generation older than {target}")]
    NothingToUndo {
        /// The pool.
        pool: String,
        /// Its image.
        image: String,
        /// The generation it runs now.
        target: kiln_core::Digest,
    },
    /// The image is not served: there is nothing to roll to.
    #[error("pool `{pool}`: image `{image}` is not served")]
    NoImage {
        /// The pool.
        pool: String,
        /// Its image.
        image: String,
    },
    /// The store refused.
    #[error("storing the rollout")]
    Store(#[source] crate::reconcile::Cause),
    /// The pool task has stopped.
    #[error("the pool task has stopped")]
    Stopped,
}

/// What the task publishes after each pass and each change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Each pool's state.
    pub pools: Vec<PoolStatus>,
    /// MAC → node, for every kiln domain last seen: the seed and the boot
    /// script of a network node come from its pool.
    pub members: BTreeMap<Mac, NodeId>,
    /// Node name → the host its domain is on, as last seen.
    pub node_hosts: BTreeMap<String, String>,
}

enum Command {
    Scale {
        pool: String,
        replicas: u32,
        reply: oneshot::Sender<Result<(), ScaleError>>,
    },
    Rollout {
        pool: String,
        action: RolloutAction,
        reply: oneshot::Sender<Result<PoolStatus, RolloutError>>,
    },
    Stop {
        reply: oneshot::Sender<()>,
    },
    /// Answered after the next pass has looked at the hosts.
    Observe {
        reply: oneshot::Sender<()>,
    },
}

/// How long a boot request waits for the hosts to be looked at again.
const OBSERVE_WAIT: Duration = Duration::from_secs(10);
/// Passes asked for by boot requests come no closer together than this.
const OBSERVE_GAP: Duration = Duration::from_secs(1);

/// The running pool task, as the API and the server hold it.
#[derive(Clone)]
pub struct PoolsHandle {
    pools: Arc<[Pool]>,
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
}

impl PoolsHandle {
    /// The pools, as loaded.
    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// The pool `name`.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// Sets `pool`'s desired replicas (stored first) and wakes the reconciler.
    pub async fn scale(&self, pool: &str, replicas: u32) -> Result<(), ScaleError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Scale { pool: pool.to_string(), replicas, reply };
        self.commands.send(command).await.map_err(|_| ScaleError::Stopped)?;
        answer.await.map_err(|_| ScaleError::Stopped)?
    }

    /// Pauses, resumes or undoes `pool`'s rollout (stored first), wakes
    /// the reconciler, and answers the pool's state.
    pub async fn rollout(&self, pool: &str, action: RolloutAction) -> Result<PoolStatus, RolloutError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Rollout { pool: pool.to_string(), action, reply };
        self.commands.send(command).await.map_err(|_| RolloutError::Stopped)?;
        answer.await.map_err(|_| RolloutError::Stopped)?
    }

    /// Each pool's state, as last published.
    pub fn status(&self) -> Vec<PoolStatus> {
        self.status.borrow().pools.clone()
    }

    /// The image generation `pool`'s nodes should run, as last published.
    pub fn target(&self, pool: &str) -> Option<kiln_core::Digest> {
        self.status.borrow().pools.iter().find(|s| s.name == pool)?.target
    }

    /// The host each pool node's domain was last seen on, by node name.
    pub fn hosts_by_node(&self) -> BTreeMap<String, String> {
        self.status.borrow().node_hosts.clone()
    }

    /// The pool node with this MAC, if kiln made it.
    pub fn member(&self, mac: Mac) -> Option<(NodeId, &Pool)> {
        let node = self.status.borrow().members.get(&mac).cloned()?;
        let pool = self.pool(&node.pool)?;
        Some((node, pool))
    }

    /// Before a boot request of a machine with `mac` is answered: when no
    /// node known has that MAC but one of a pool's could (a node's MAC
    /// comes from its name), waits until the task has looked at the hosts
    /// again (at most 10 s). A node another server made, or
    /// one made in the pass under way, boots as its pool's, not as an
    /// unknown machine. Requests that come together share one pass.
    pub async fn observe_for(&self, mac: Mac) {
        let could_be = || self.pools.iter().any(|p| (0..p.max).any(|i| NodeId::new(p.name.as_str(), i).mac() == mac));
        if self.member(mac).is_some() || !could_be() {
            return;
        }
        let (reply, done) = oneshot::channel();
        let asked = async {
            if self.commands.send(Command::Observe { reply }).await.is_ok() {
                let _ = done.await;
            }
        };
        let _ = tokio::time::timeout(OBSERVE_WAIT, asked).await;
    }

    /// A receiver of every status the task publishes.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Stops the task after its current pass, and waits for it.
    pub async fn stop(&self) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Stop { reply }).await.is_ok() {
            let _ = done.await;
        }
    }
}

/// Reads (or, for a pool not stored yet, stores its file's) desired
/// replicas and spawns the task on the current tokio runtime.
pub async fn start<C: ControlPlane, M: NodeMedia>(fleet: Fleet<M>, control: C, config: Config) -> Result<PoolsHandle, StartError> {
    let store = |e: C::Error| StartError::Store(Box::new(e));
    let mut replicas = control.replicas().await.map_err(store)?;
    for pool in &fleet.pools {
        if !replicas.contains_key(&pool.name) {
            control.set_replicas(&pool.name, pool.replicas).await.map_err(store)?;
            replicas.insert(pool.name.clone(), pool.replicas);
        }
        tracing::info!(pool = %pool.name, image = %pool.image, hosts = ?pool.hosts, desired = replicas[&pool.name], "pool loaded");
    }
    let rollouts = control.rollouts().await.map_err(store)?;
    let pools: Arc<[Pool]> = fleet.pools.clone().into();
    let last: Vec<PoolStatus> = pools.iter().map(empty_status).collect();
    let (publish, status) = watch::channel(Status::default());
    let (commands, inbox) = mpsc::channel(16);
    let leadership = config.leadership.clone();
    let mut task = Task {
        acted: acts(&leadership),
        leadership,
        lead_open: true,
        observers: Vec::new(),
        passed: Instant::now(),
        pools: pools.clone(),
        control: Arc::new(control),
        fleet: Some(fleet),
        config,
        replicas,
        rollouts,
        generations: BTreeMap::new(),
        rolling: BTreeMap::new(),
        auto: BTreeMap::new(),
        last,
        publish,
        inbox,
    };
    task.publish();
    tokio::spawn(task.run());
    Ok(PoolsHandle { pools, commands, status })
}

/// An autoscaled pool's memory between passes.
#[derive(Debug, Default)]
struct AutoState {
    /// When its replicas last changed (by the autoscaler or `kiln scale`).
    last_change: Option<Instant>,
    /// Each node's CPU times at the previous scrape (for `cpu_busy`).
    cpu: BTreeMap<String, CpuTimes>,
    /// The last decision, in words.
    last: Option<String>,
}

struct Task<C, M> {
    /// Who may act ([`Config::leadership`]), and whether its sender is still there.
    leadership: Option<watch::Receiver<Lead>>,
    lead_open: bool,
    /// Whether this server could act at the last change of the leadership.
    acted: bool,
    /// Boot requests waiting for the next pass ([`PoolsHandle::observe_for`]).
    observers: Vec<oneshot::Sender<()>>,
    /// When the last pass ended.
    passed: Instant,
    pools: Arc<[Pool]>,
    control: Arc<C>,
    /// Home between passes; lent to a blocking thread during one.
    fleet: Option<Fleet<M>>,
    config: Config,
    replicas: BTreeMap<String, u32>,
    /// Each pool's stored rollout settings.
    rollouts: BTreeMap<String, RolloutRecord>,
    /// Each pool's image generations at the last pass, newest first.
    generations: BTreeMap<String, Vec<kiln_core::Digest>>,
    /// Pools being rolled, with the fewest Ready nodes seen meanwhile.
    rolling: BTreeMap<String, (bool, u32)>,
    auto: BTreeMap<String, AutoState>,
    /// Each pool's counts from the last pass.
    last: Vec<PoolStatus>,
    publish: watch::Sender<Status>,
    inbox: mpsc::Receiver<Command>,
}

impl<C: ControlPlane, M: NodeMedia> Task<C, M> {
    /// Passes until stopped; then the fleet's libvirt connections are
    /// closed on a blocking thread, and the stop is answered.
    async fn run(mut self) {
        let stop = self.serve().await;
        if let Some(fleet) = self.fleet.take() {
            let _ = tokio::task::spawn_blocking(move || drop(fleet)).await;
        }
        if let Some(reply) = stop {
            let _ = reply.send(());
        }
    }

    /// Passes, and waits between them for the interval or a command; the
    /// stop request that ended it (`None` when every handle is gone).
    async fn serve(&mut self) -> Option<oneshot::Sender<()>> {
        loop {
            self.autoscale().await;
            if let Some(reply) = self.pass().await {
                return Some(reply);
            }
            let mut deadline = tokio::time::Instant::now() + self.config.interval;
            if !self.observers.is_empty() {
                deadline = deadline.min((self.passed + OBSERVE_GAP).into());
            }
            loop {
                tokio::select! {
                    command = self.inbox.recv() => match command {
                        None => return None,
                        Some(Command::Stop { reply }) => return Some(reply),
                        Some(Command::Observe { reply }) => {
                            self.observers.push(reply);
                            deadline = deadline.min((self.passed + OBSERVE_GAP).into());
                        }
                        // A scale or a rollout change wakes the reconciler at once.
                        Some(Command::Scale { pool, replicas, reply }) => if self.answer(&pool, replicas, reply).await { break },
                        Some(Command::Rollout { pool, action, reply }) => {
                            let result = self.rollout(&pool, action).await;
                            let changed = result.is_ok();
                            let _ = reply.send(result);
                            if changed { break }
                        }
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                    // Leading from now: a pass at once (a failover's takeover).
                    () = lead_changed(&mut self.leadership, &mut self.lead_open) => {
                        let (was, now) = (self.acted, acts(&self.leadership));
                        self.acted = now;
                        self.publish();
                        if now && !was {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// The replicas and rollout settings as stored now: another server on
    /// the same store may have changed them (`kiln scale` answered there),
    /// or led before this one. On an error, the ones known are kept.
    async fn reread(&mut self) {
        match self.control.replicas().await {
            Ok(stored) => {
                for (pool, n) in stored {
                    if self.pools.iter().any(|p| p.name == pool) {
                        self.replicas.insert(pool, n);
                    }
                }
            }
            Err(e) => tracing::warn!("pools: reading the stored replicas: {}", chain(&e)),
        }
        match self.control.rollouts().await {
            Ok(stored) => self.rollouts = stored,
            Err(e) => tracing::warn!("pools: reading the stored rollouts: {}", chain(&e)),
        }
    }

    /// Answers a scale request; true when the replicas changed.
    async fn answer(&mut self, pool: &str, replicas: u32, reply: oneshot::Sender<Result<(), ScaleError>>) -> bool {
        let result = self.scale(pool, replicas).await;
        let changed = result.is_ok();
        let _ = reply.send(result);
        changed
    }

    async fn scale(&mut self, pool: &str, replicas: u32) -> Result<(), ScaleError> {
        let p = self.pools.iter().find(|p| p.name == pool).ok_or_else(|| ScaleError::NoPool(pool.to_string()))?;
        if replicas < p.min || replicas > p.max {
            return Err(ScaleError::OutOfRange { pool: pool.to_string(), min: p.min, max: p.max, asked: replicas });
        }
        self.control.set_replicas(pool, replicas).await.map_err(|e| ScaleError::Store(Box::new(e)))?;
        self.replicas.insert(pool.to_string(), replicas);
        self.auto.entry(pool.to_string()).or_default().last_change = Some(Instant::now());
        tracing::info!(pool, replicas, "scale");
        self.publish();
        Ok(())
    }

    /// The generation each pool's nodes should run: the image's current
    /// one, unless an undo pinned an older one that is still kept and the
    /// image has had no new generation since.
    fn targets(&self) -> BTreeMap<String, Target> {
        let mut out = BTreeMap::new();
        for pool in self.pools.iter() {
            let gens = self.generations.get(&pool.name).map(Vec::as_slice).unwrap_or_default();
            let Some(current) = gens.first() else { continue };
            let record = self.rollouts.get(&pool.name).cloned().unwrap_or_default();
            let image = match record.pin {
                Some(pin) if pin.while_current == *current && gens.contains(&pin.image) => pin.image,
                _ => *current,
            };
            out.insert(pool.name.clone(), Target { image, paused: record.paused });
        }
        out
    }

    async fn rollout(&mut self, pool: &str, action: RolloutAction) -> Result<PoolStatus, RolloutError> {
        let p = self.pools.iter().find(|p| p.name == pool).ok_or_else(|| RolloutError::NoPool(pool.to_string()))?;
        let mut record = self.rollouts.get(pool).cloned().unwrap_or_default();
        match action {
            RolloutAction::Pause => record.paused = true,
            RolloutAction::Resume => record.paused = false,
            RolloutAction::Undo => {
                let no_image = || RolloutError::NoImage { pool: pool.to_string(), image: p.image.clone() };
                let gens = self.generations.get(pool).filter(|g| !g.is_empty()).ok_or_else(no_image)?;
                let target = self.targets().get(pool).ok_or_else(no_image)?.image;
                let at = gens.iter().position(|g| *g == target).unwrap_or(0);
                let previous = gens.get(at + 1).ok_or_else(|| RolloutError::NothingToUndo {
                    pool: pool.to_string(),
                    image: p.image.clone(),
                    target,
                })?;
                record.pin = Some(Pin { image: *previous, while_current: gens[0] });
            }
        }
        self.control.set_rollout(pool, &record).await.map_err(|e| RolloutError::Store(Box::new(e)))?;
        tracing::info!(pool, ?action, paused = record.paused, undone_to = ?record.pin.map(|p| p.image), "rollout");
        self.rollouts.insert(pool.to_string(), record);
        self.publish();
        Ok(self.publish.borrow().pools.iter().find(|s| s.name == pool).cloned().expect("every pool has a status"))
    }

    /// One reconcile pass on a blocking thread, answering commands
    /// meanwhile; the stop request that came during it, if one did.
    async fn pass(&mut self) -> Option<oneshot::Sender<()>> {
        self.reread().await;
        let fleet = self.fleet.take().expect("the fleet is home between passes");
        self.generations = self.pools.iter().map(|p| (p.name.clone(), fleet.generations(&p.image))).collect();
        let targets = self.targets();
        let pass_targets = targets.clone();
        let replicas = self.replicas.clone();
        let settings = self.config.settings.clone();
        let leases = Leases {
            control: self.control.clone(),
            runtime: tokio::runtime::Handle::current(),
            pools: self.pools.clone(),
            leadership: self.leadership.clone(),
        };
        let mut job = tokio::task::spawn_blocking(move || {
            let report = fleet.reconcile(&replicas, &pass_targets, &leases, &settings);
            (fleet, report)
        });
        let mut stop = None;
        let mut later = Vec::new();
        let (fleet, report) = loop {
            tokio::select! {
                done = &mut job => break done.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
                Some(command) = self.inbox.recv(), if stop.is_none() => match command {
                    Command::Stop { reply } => stop = Some(reply),
                    Command::Scale { pool, replicas, reply } => { self.answer(&pool, replicas, reply).await; }
                    Command::Rollout { pool, action, reply } => { let _ = reply.send(self.rollout(&pool, action).await); }
                    // This pass may have listed the hosts already: the next one answers.
                    Command::Observe { reply } => later.push(reply),
                },
            }
        };
        self.fleet = Some(fleet);
        log_report(&report);
        self.record(&report, &targets);
        self.passed = Instant::now();
        for waiting in std::mem::replace(&mut self.observers, later) {
            let _ = waiting.send(());
        }
        stop
    }

    /// Counts what the hosts have after a pass, and publishes it.
    fn record(&mut self, report: &Report, targets: &BTreeMap<String, Target>) {
        let after = &report.after;
        let mut members = BTreeMap::new();
        let mut node_hosts = BTreeMap::new();
        let mut status: Vec<PoolStatus> = self.pools.iter().map(empty_status).collect();
        for d in &after.domains {
            members.insert(d.node.mac(), d.node.clone());
            node_hosts.insert(d.node.domain_name(), d.host.clone());
            let Some(s) = status.iter_mut().find(|s| s.name == d.node.pool) else { continue };
            let Some(h) = s.hosts.iter_mut().find(|h| h.host == d.host) else { continue };
            h.defined += 1;
            h.running += u32::from(d.running);
            match targets.get(&s.name) {
                Some(t) if d.image != Some(t.image) => s.out_of_date += 1,
                _ => s.up_to_date += 1,
            }
            s.ready += u32::from(after.ready.contains(&d.node));
            if after.registered.contains(&d.node) {
                h.registered += 1;
                s.registered += 1;
            } else if d.running {
                h.booting += 1;
            }
        }
        for (action, error) in &report.failed {
            let pool = action.as_ref().map(|a| a.node().pool.clone());
            for s in status.iter_mut().filter(|s| pool.as_ref().is_none_or(|p| *p == s.name)) {
                s.errors.push(error.clone());
            }
        }
        for s in &mut status {
            // The fewest Ready nodes while out-of-date ones are replaced, from
            // the pass that found the first one to the pass that found none.
            let rolling = s.out_of_date > 0 && !targets.get(&s.name).is_some_and(|t| t.paused);
            match (rolling, self.rolling.get_mut(&s.name)) {
                (true, Some(seen)) if seen.0 => seen.1 = seen.1.min(s.ready),
                (true, _) => {
                    self.rolling.insert(s.name.clone(), (true, s.ready));
                }
                (false, Some(seen)) => seen.0 = false,
                (false, None) => {}
            }
        }
        self.last = status;
        self.publish_with(members, node_hosts);
    }

    fn publish(&mut self) {
        let (members, node_hosts) = {
            let now = self.publish.borrow();
            (now.members.clone(), now.node_hosts.clone())
        };
        self.publish_with(members, node_hosts);
    }

    fn publish_with(&mut self, members: BTreeMap<Mac, NodeId>, node_hosts: BTreeMap<String, String>) {
        let mut pools = self.last.clone();
        let targets = self.targets();
        for s in &mut pools {
            s.desired = self.replicas.get(&s.name).copied().unwrap_or(s.desired);
            s.autoscale = self.auto.get(&s.name).and_then(|a| a.last.clone());
            let target = targets.get(&s.name);
            s.target = target.map(|t| t.image);
            let record = self.rollouts.get(&s.name).cloned().unwrap_or_default();
            s.rollout.paused = record.paused;
            s.rollout.undone_to = record.pin.map(|p| p.image).filter(|i| target.is_some_and(|t| t.image == *i));
            s.rollout.min_ready_seen = self.rolling.get(&s.name).map(|r| r.1);
            s.leader = self.leadership.as_ref().map(|l| l.borrow().status());
        }
        self.publish.send_replace(Status { pools, members, node_hosts });
    }

    /// Each autoscaled pool: scrape its registered nodes, decide, and (unless
    /// a dry run) store the new replicas. Every change is logged with its
    /// reason; so is a dry run's would-be change.
    async fn autoscale(&mut self) {
        if self.pools.iter().all(|p| p.autoscale.is_none()) || !acts(&self.leadership) {
            return;
        }
        let nodes = match self.control.registered().await {
            Ok(nodes) => nodes,
            Err(e) => {
                tracing::warn!("autoscale: reading the registered nodes: {}", chain(&e));
                return;
            }
        };
        for pool in self.pools.clone().iter() {
            let Some(policy) = &pool.autoscale else { continue };
            let targets: Vec<(String, String)> = nodes
                .iter()
                .filter(|n| n.node.pool == pool.name && n.ready)
                .filter_map(|n| Some((n.node.domain_name(), n.metrics.clone()?)))
                .collect();
            let scrapes = scrape_all(&self.control, targets).await;
            let state = self.auto.entry(pool.name.clone()).or_default();
            let samples = samples(policy.metric, state, scrapes);
            let current = self.replicas.get(&pool.name).copied().unwrap_or(pool.replicas);
            let d = decide(policy, pool.min, pool.max, current, &samples, state.last_change.map(|t| t.elapsed()));
            let words = if d.to == d.from {
                format!("hold at {}: {}", d.from, d.reason)
            } else if self.config.autoscale_dry_run {
                format!("would scale {} → {} (dry run): {}", d.from, d.to, d.reason)
            } else {
                format!("scale {} → {}: {}", d.from, d.to, d.reason)
            };
            // Changes (and would-be changes) at info; holds, whose figures move every pass, at debug.
            if d.to != d.from {
                tracing::info!(pool = %pool.name, "autoscale: {words}");
            } else {
                tracing::debug!(pool = %pool.name, "autoscale: {words}");
            }
            state.last = Some(words);
            if d.to != d.from && !self.config.autoscale_dry_run {
                match self.control.set_replicas(&pool.name, d.to).await {
                    Ok(()) => {
                        self.replicas.insert(pool.name.clone(), d.to);
                        self.auto.entry(pool.name.clone()).or_default().last_change = Some(Instant::now());
                    }
                    Err(e) => tracing::warn!(pool = %pool.name, "autoscale: storing {} replicas: {}", d.to, chain(&e)),
                }
            }
        }
        self.publish();
    }
}

/// Returns when the leadership changes; never when there is none to
/// follow (one server) or its sender is gone (the server is stopping: the
/// last lead known stays, and a lease of this server's runs out by itself).
async fn lead_changed(leadership: &mut Option<watch::Receiver<Lead>>, open: &mut bool) {
    match leadership {
        Some(l) if *open => {
            if l.changed().await.is_err() {
                *open = false;
                std::future::pending::<()>().await;
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

/// Scrapes every `(name, target)` at once; the nodes that answered,
/// with their text. A node that did not answer is logged (at debug: a
/// booting node does not answer yet) and left out of the mean.
async fn scrape_all<C: ControlPlane>(control: &Arc<C>, targets: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut scrapes = tokio::task::JoinSet::new();
    for (name, target) in targets {
        let control = control.clone();
        scrapes.spawn(async move {
            let result = control.scrape(&target).await;
            (name, target, result)
        });
    }
    let mut out = Vec::new();
    while let Some(done) = scrapes.join_next().await {
        match done {
            Ok((name, _, Ok(text))) => out.push((name, text)),
            Ok((name, target, Err(e))) => tracing::debug!(node = %name, target = %target, "autoscale: scrape failed: {}", chain(&e)),
            Err(e) => tracing::warn!("autoscale: a scrape task failed: {e}"),
        }
    }
    out
}

/// The policy's samples from this pass's scrapes (CPU times kept for the next).
fn samples(metric: Metric, state: &mut AutoState, scrapes: Vec<(String, String)>) -> Vec<f64> {
    let mut samples = Vec::new();
    for (name, text) in scrapes {
        match metric {
            Metric::Load1 => samples.extend(load1_from_scrape(&text)),
            Metric::CpuBusy => {
                if let Some(now) = CpuTimes::from_scrape(&text) {
                    if let Some(busy) = state.cpu.get(&name).and_then(|before| now.busy_since(before)) {
                        samples.push(busy);
                    }
                    state.cpu.insert(name, now);
                }
            }
        }
    }
    samples
}

fn log_report(report: &Report) {
    for ((action, took), phases) in report.done.iter().zip(&report.took).zip(&report.phases) {
        let phases: Vec<String> = phases.iter().map(|(name, d)| format!("{name}_ms={}", d.as_millis())).collect();
        tracing::info!(action = %action, ms = took.as_millis() as u64, "pools: {}", phases.join(" "));
    }
    for (action, error) in &report.failed {
        match action {
            Some(a) => tracing::warn!(action = %a, "pools: {error}"),
            None => tracing::warn!("pools: {error}"),
        }
    }
}

fn empty_status(p: &Pool) -> PoolStatus {
    PoolStatus {
        name: p.name.clone(),
        image: p.image.clone(),
        boot: match p.boot {
            Boot::Disk => "disk",
            Boot::Network => "network",
        }
        .into(),
        min: p.min,
        max: p.max,
        desired: p.replicas,
        registered: 0,
        hosts: p.hosts.iter().map(|h| HostStatus { host: h.clone(), ..Default::default() }).collect(),
        errors: Vec::new(),
        autoscale: None,
        rollout: kiln_core::pool::RolloutStatus {
            max_surge: p.rollout.max_surge,
            max_unavailable: p.rollout.max_unavailable,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The control plane's leases of this server's pools' nodes, as the
/// blocking reconcile pass sees them: each call runs on the runtime from
/// the pass's blocking thread.
struct Leases<C> {
    control: Arc<C>,
    runtime: tokio::runtime::Handle,
    pools: Arc<[Pool]>,
    leadership: Option<watch::Receiver<Lead>>,
}

impl<C: ControlPlane> Registry for Leases<C> {
    fn acts(&self) -> bool {
        acts(&self.leadership)
    }

    fn registered(&self) -> Result<Vec<(NodeId, bool)>, PassError> {
        let nodes = self.runtime.block_on(self.control.registered()).map_err(|e| PassError::Registry(Box::new(e)))?;
        Ok(nodes.into_iter().filter(|r| self.pools.iter().any(|p| p.name == r.node.pool)).map(|r| (r.node, r.ready)).collect())
    }

    fn deregister(&self, node: &NodeId) -> Result<(), PassError> {
        if self.runtime.block_on(self.control.deregister(node)).map_err(|e| PassError::Registry(Box::new(e)))? {
            tracing::info!(node = %node, "pools: deregistered, lease released");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
