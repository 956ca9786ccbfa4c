//! Pools in the server (`kiln serve --pools DIR`): the pool files, the
//! libvirt hosts they name, the desired replicas kept in the store, and the
//! reconcile loop that makes the hosts match ([`kiln_pool::reconcile()`]).
//!
//! Start-up refuses, naming the pool file and field, a pool whose image is
//! not served or whose host cannot be reached, or whose nodes are larger
//! than a host's memory; nothing is defined before every pool checks out.
//!
//! Each node is named `kiln-<pool>-<n>`; that is its hostname too (the
//! seed kiln gives it says so), which is how a registered node is tied to
//! its pool. Each host keeps kiln's files in its libvirt storage pool
//! `kiln` ([`kiln_pool::volumes`]), made through libvirt, so remote hosts
//! work like the local one: a disk node's qcow2 overlay, backed by the
//! pool image's golden qcow2 (uploaded once per host and image digest),
//! and its cidata seed; and every node's console log. A network node boots
//! the pool's image by PXE, its MAC telling the server which pool it is in.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use kiln_core::Mac;
use kiln_pool::domain::{BootMedia, DomainType, Nic};
use kiln_pool::{Action, Hypervisor, Libvirt, NodeId, Pool, Provisioner, Registry as PoolRegistry, Settings, Volumes};
use kiln_pxe::ImageStore;
use kiln_pxe::profile::{Catalog, Machine, ServerParams};

use crate::registry::Registry;

/// Loading the pools failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pool file is not valid.
    #[error(transparent)]
    Spec(#[from] kiln_pool::spec::Error),
    /// A pool names an image that is not served.
    #[error("{file}: `image`: no image `{image}` is served (images: {served})")]
    NoImage {
        /// The pool file.
        file: PathBuf,
        /// The image named.
        image: String,
        /// The images there are.
        served: String,
    },
    /// A disk pool's image has no qcow2.
    #[error("{file}: `boot = \"disk\"`: image `{image}` has no {image}.qcow2 (disk pools need a worker image)")]
    NoDisk {
        /// The pool file.
        file: PathBuf,
        /// The image.
        image: String,
    },
    /// A pool names a host that cannot be reached.
    #[error("{file}: `hosts`: cannot reach {uri}")]
    Host {
        /// The pool file.
        file: PathBuf,
        /// The URI.
        uri: String,
        /// libvirt's answer.
        #[source]
        source: kiln_pool::hypervisor::Error,
    },
    /// A host's storage pool for kiln's files cannot be found or made.
    #[error("{file}: `hosts`: {uri}: cannot set up kiln's storage pool (see --pool-storage)")]
    Storage {
        /// The pool file.
        file: PathBuf,
        /// The URI.
        uri: String,
        /// libvirt's answer.
        #[source]
        source: kiln_pool::hypervisor::Error,
    },
    /// Reading or writing the store.
    #[error("pool replicas in the store")]
    Store(#[from] crate::store::Error),
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
    Store(#[from] crate::store::Error),
}

/// How the server's pools run.
#[derive(Debug, Clone)]
pub struct PoolsConfig {
    /// Directory of pool files (`*.toml`).
    pub dir: PathBuf,
    /// Where nodes' NICs are plugged.
    pub nic: Nic,
    /// TCG or KVM.
    pub domain_type: DomainType,
    /// The API's URL as disk nodes reach it (their seed's `kiln.server`);
    /// the server fills it in when not given (`--advertise-api`): the host's
    /// loopback as QEMU user networking shows it, `10.0.2.2`.
    pub api_url: Option<String>,
    /// Seconds between reconcile passes when nothing asks for one sooner.
    pub interval: Duration,
    /// Autoscalers decide and log, but change nothing (`--autoscale-dry-run`).
    pub autoscale_dry_run: bool,
    /// Where kiln's storage pool is made on a host that has none
    /// (`--pool-storage`; a path on each host).
    pub storage_dir: String,
}

/// A pool's status: wire types, in kiln-core (the API client reads them too).
pub use kiln_core::pool::{HostStatus, PoolStatus};

/// An autoscaled pool's memory between passes.
#[derive(Debug, Default)]
struct AutoState {
    /// When its replicas last changed (by the autoscaler or `kiln scale`).
    last_change: Option<std::time::Instant>,
    /// Each node's CPU times at the previous scrape (for `cpu_busy`).
    cpu: BTreeMap<String, kiln_pool::autoscale::CpuTimes>,
    /// The last decision, in words.
    last: Option<String>,
}

/// The pools of a running server.
pub struct Pools {
    pools: Vec<Pool>,
    hosts: Mutex<BTreeMap<String, Box<dyn Hypervisor + Send>>>,
    /// Each host's storage pool, on a connection of its own.
    volumes: Mutex<BTreeMap<String, Volumes>>,
    replicas: RwLock<BTreeMap<String, u32>>,
    /// MAC → node, for every kiln domain last seen: the seed and the boot
    /// script of a network node come from its pool.
    members: RwLock<BTreeMap<Mac, NodeId>>,
    /// Node name → the host its domain is on, as last seen.
    node_hosts: RwLock<BTreeMap<String, String>>,
    status: RwLock<Vec<PoolStatus>>,
    registry: Arc<Registry>,
    images: Arc<ImageStore>,
    catalog: Arc<Catalog>,
    config: PoolsConfig,
    bootstrap_token: String,
    wake: (Mutex<bool>, Condvar),
    stop: Mutex<bool>,
    auto: Mutex<BTreeMap<String, AutoState>>,
}

impl Pools {
    /// Loads and checks the pools, connects to their hosts and reads the
    /// desired replicas from the store (a pool's file gives the first value).
    pub async fn load(
        config: PoolsConfig,
        registry: Arc<Registry>,
        images: Arc<ImageStore>,
        catalog: Arc<Catalog>,
        bootstrap_token: String,
    ) -> Result<Arc<Pools>, Error> {
        // First parse with no memory limit, to learn the hosts; then check
        // each pool against its hosts' memory.
        let unchecked = kiln_pool::load_dir(&config.dir, u64::MAX)?;
        let mut hosts: BTreeMap<String, Box<dyn Hypervisor + Send>> = BTreeMap::new();
        for pool in &unchecked {
            for uri in &pool.hosts {
                if hosts.contains_key(uri) {
                    continue;
                }
                let host = |source| Error::Host { file: pool.file.clone(), uri: uri.clone(), source };
                let hv = Libvirt::open(uri).map_err(host)?;
                hosts.insert(uri.clone(), Box::new(hv));
            }
        }
        let mut pools = Vec::new();
        for pool in unchecked {
            let mut smallest = u64::MAX;
            for uri in &pool.hosts {
                let mem = hosts[uri].memory().map_err(|source| Error::Host { file: pool.file.clone(), uri: uri.clone(), source })?;
                smallest = smallest.min(mem.total_mib);
            }
            let pool = Pool::from_file(&pool.file, smallest)?;
            let Some(image) = images.get(&pool.image) else {
                let served = images.images().map(|m| m.name.clone()).collect::<Vec<_>>().join(", ");
                return Err(Error::NoImage { file: pool.file.clone(), image: pool.image.clone(), served });
            };
            if pool.boot == kiln_pool::Boot::Disk && image.artifact(&format!("{}.qcow2", image.name)).is_none() {
                return Err(Error::NoDisk { file: pool.file.clone(), image: pool.image.clone() });
            }
            pools.push(pool);
        }
        // Only once every pool checks out: kiln's storage pool on each host
        // (made there if missing), so a refused start makes nothing.
        let mut volumes = BTreeMap::new();
        for pool in &pools {
            for uri in &pool.hosts {
                if !volumes.contains_key(uri) {
                    let v = Volumes::open(uri, &config.storage_dir).map_err(|source| Error::Storage {
                        file: pool.file.clone(),
                        uri: uri.clone(),
                        source,
                    })?;
                    volumes.insert(uri.clone(), v);
                }
            }
        }
        let store = registry.store_handle();
        let mut replicas = store.replicas().await?;
        for pool in &pools {
            if !replicas.contains_key(&pool.name) {
                store.set_replicas(&pool.name, pool.replicas).await?;
                replicas.insert(pool.name.clone(), pool.replicas);
            }
        }
        let names: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
        registry.set_pool_of(Box::new(move |hostname: &str| NodeId::parse(hostname).filter(|n| names.contains(&n.pool)).map(|n| n.pool)));
        for pool in &pools {
            tracing::info!(pool = %pool.name, image = %pool.image, hosts = ?pool.hosts, desired = replicas[&pool.name], "pool loaded");
        }
        Ok(Arc::new(Pools {
            pools,
            hosts: Mutex::new(hosts),
            volumes: Mutex::new(volumes),
            replicas: RwLock::new(replicas),
            members: RwLock::new(BTreeMap::new()),
            node_hosts: RwLock::new(BTreeMap::new()),
            status: RwLock::new(Vec::new()),
            registry,
            images,
            catalog,
            config,
            bootstrap_token,
            wake: (Mutex::new(false), Condvar::new()),
            stop: Mutex::new(false),
            auto: Mutex::new(BTreeMap::new()),
        }))
    }

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
        let p = self.pool(pool).ok_or_else(|| ScaleError::NoPool(pool.to_string()))?;
        if replicas < p.min || replicas > p.max {
            return Err(ScaleError::OutOfRange { pool: pool.to_string(), min: p.min, max: p.max, asked: replicas });
        }
        self.registry.store_handle().set_replicas(pool, replicas).await?;
        self.replicas.write().expect("replicas lock").insert(pool.to_string(), replicas);
        self.auto.lock().expect("autoscale lock").entry(pool.to_string()).or_default().last_change = Some(std::time::Instant::now());
        tracing::info!(pool, replicas, "scale");
        self.wake_up();
        Ok(())
    }

    /// Each pool's state as the last pass saw it.
    pub fn status(&self) -> Vec<PoolStatus> {
        let desired = self.replicas.read().expect("replicas lock").clone();
        let mut out = self.status.read().expect("status lock").clone();
        if out.is_empty() {
            out = self.pools.iter().map(|p| self.empty_status(p)).collect();
        }
        let auto = self.auto.lock().expect("autoscale lock");
        for s in &mut out {
            s.desired = desired.get(&s.name).copied().unwrap_or(s.desired);
            s.autoscale = auto.get(&s.name).and_then(|a| a.last.clone());
        }
        out
    }

    fn empty_status(&self, p: &Pool) -> PoolStatus {
        PoolStatus {
            name: p.name.clone(),
            image: p.image.clone(),
            boot: boot_name(p.boot).into(),
            min: p.min,
            max: p.max,
            desired: p.replicas,
            registered: 0,
            hosts: p.hosts.iter().map(|h| HostStatus { host: h.clone(), ..Default::default() }).collect(),
            errors: Vec::new(),
            autoscale: None,
        }
    }

    /// The host each pool node's domain was last seen on, by node name.
    pub fn hosts_by_node(&self) -> BTreeMap<String, String> {
        self.node_hosts.read().expect("node hosts lock").clone()
    }

    /// The pool node with this MAC, if kiln made it.
    pub fn member(&self, mac: Mac) -> Option<(NodeId, &Pool)> {
        let node = self.members.read().expect("members lock").get(&mac).cloned()?;
        let pool = self.pool(&node.pool)?;
        Some((node, pool))
    }

    fn wake_up(&self) {
        let (lock, cv) = &self.wake;
        *lock.lock().expect("wake lock") = true;
        cv.notify_all();
    }

    /// Runs reconcile passes on a thread of its own until [`Pools::stop`].
    pub fn spawn(self: &Arc<Self>) -> std::thread::JoinHandle<()> {
        let pools = self.clone();
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("kiln-pools".into())
            .spawn(move || {
                while !*pools.stop.lock().expect("stop lock") {
                    pools.pass(&runtime);
                    let (lock, cv) = &pools.wake;
                    let woken = lock.lock().expect("wake lock");
                    let (mut woken, _) = cv.wait_timeout_while(woken, pools.config.interval, |w| !*w).expect("wake lock");
                    *woken = false;
                }
            })
            .expect("starting the pools thread")
    }

    /// Stops the reconcile thread after its current pass.
    pub fn stop(&self) {
        *self.stop.lock().expect("stop lock") = true;
        self.wake_up();
    }

    /// Each autoscaled pool: scrape its registered nodes, decide, and (unless
    /// a dry run) store the new replicas. Every change is logged with its
    /// reason; so is a dry run's would-be change.
    fn autoscale(&self, runtime: &tokio::runtime::Handle) {
        let nodes = self.registry.nodes();
        for pool in &self.pools {
            let Some(policy) = &pool.autoscale else { continue };
            let targets: Vec<(String, String)> =
                nodes.iter().filter(|n| n.pool == pool.name).filter_map(|n| Some((n.name.clone(), n.metrics_target()?))).collect();
            let scrapes = runtime.block_on(scrape_all(&targets));
            let mut auto = self.auto.lock().expect("autoscale lock");
            let state = auto.entry(pool.name.clone()).or_default();
            let mut samples = Vec::new();
            for (name, text) in scrapes {
                match policy.metric {
                    kiln_pool::Metric::Load1 => samples.extend(kiln_pool::autoscale::load1_from_scrape(&text)),
                    kiln_pool::Metric::CpuBusy => {
                        if let Some(now) = kiln_pool::autoscale::CpuTimes::from_scrape(&text) {
                            if let Some(busy) = state.cpu.get(&name).and_then(|before| now.busy_since(before)) {
                                samples.push(busy);
                            }
                            state.cpu.insert(name, now);
                        }
                    }
                }
            }
            let current = self.replicas.read().expect("replicas lock").get(&pool.name).copied().unwrap_or(pool.replicas);
            let since = state.last_change.map(|t| t.elapsed());
            let d = kiln_pool::autoscale::decide(policy, pool.min, pool.max, current, &samples, since);
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
                match runtime.block_on(self.registry.store_handle().set_replicas(&pool.name, d.to)) {
                    Ok(()) => {
                        self.replicas.write().expect("replicas lock").insert(pool.name.clone(), d.to);
                        state.last_change = Some(std::time::Instant::now());
                    }
                    Err(e) => tracing::warn!(pool = %pool.name, "autoscale: storing {} replicas: {e}", d.to),
                }
            }
        }
    }

    /// One reconcile pass, logged.
    fn pass(&self, runtime: &tokio::runtime::Handle) {
        self.autoscale(runtime);
        let replicas = self.replicas.read().expect("replicas lock").clone();
        let hosts = self.hosts.lock().expect("hosts lock");
        let registry = Registered { registry: &self.registry, runtime, pools: &self.pools };
        let settings = Settings { domain_type: self.config.domain_type, nic: self.config.nic.clone() };
        let report = kiln_pool::reconcile(&self.pools, &replicas, &hosts, self, &registry, &settings);
        for ((action, took), phases) in report.done.iter().zip(&report.took).zip(&report.phases) {
            let phases: Vec<String> = phases.iter().map(|(name, d)| format!("{name}_ms={}", d.as_millis())).collect();
            tracing::info!(action = %describe(action), ms = took.as_millis() as u64, "pools: {}", phases.join(" "));
        }
        for (action, error) in &report.failed {
            match action {
                Some(a) => tracing::warn!(action = %describe(a), "pools: {error}"),
                None => tracing::warn!("pools: {error}"),
            }
        }
        // What the hosts have now, from the pass itself (no second listing).
        let after = &report.after;
        let mut members = BTreeMap::new();
        let mut node_hosts = BTreeMap::new();
        let mut status: Vec<PoolStatus> = self.pools.iter().map(|p| self.empty_status(p)).collect();
        for d in &after.domains {
            members.insert(d.node.mac(), d.node.clone());
            node_hosts.insert(d.node.domain_name(), d.host.clone());
            let Some(s) = status.iter_mut().find(|s| s.name == d.node.pool) else { continue };
            let Some(h) = s.hosts.iter_mut().find(|h| h.host == d.host) else { continue };
            h.defined += 1;
            h.running += u32::from(d.running);
            if after.registered.contains(&d.node) {
                h.registered += 1;
                s.registered += 1;
            } else if d.running {
                h.booting += 1;
            }
        }
        for (action, error) in &report.failed {
            let pool = action.as_ref().map(|a| action_node(a).pool.clone());
            for s in status.iter_mut().filter(|s| pool.as_ref().is_none_or(|p| *p == s.name)) {
                s.errors.push(error.clone());
            }
        }
        *self.members.write().expect("members lock") = members;
        *self.node_hosts.write().expect("node hosts lock") = node_hosts;
        *self.status.write().expect("status lock") = status;
    }

    /// Runs `f` on `host`'s storage pool.
    fn on_volumes<T>(&self, host: &str, f: impl FnOnce(&Volumes) -> Result<T, kiln_pool::hypervisor::Error>) -> Result<T, String> {
        let volumes = self.volumes.lock().expect("volumes lock");
        let v = volumes.get(host).ok_or_else(|| format!("{host}: not connected"))?;
        f(v).map_err(|e| kiln_pool::hypervisor::chain(&e))
    }

    /// The profile `pool`'s nodes boot with: the one its file names, or a
    /// plain one (`pool-<name>`) for its image.
    pub fn node_profile(&self, pool: &Pool) -> Result<kiln_pxe::profile::Profile, String> {
        match &pool.profile {
            Some(id) => self
                .catalog
                .profiles()
                .find(|p| &p.id == id)
                .cloned()
                .ok_or_else(|| format!("pool `{}` names profile `{id}`, which is gone", pool.name)),
            None => Ok(kiln_pxe::profile::Profile {
                id: format!("pool-{}", pool.name),
                image: pool.image.clone(),
                kernel_args: Vec::new(),
                user_data: None,
                network_config: None,
                vendor_data: None,
            }),
        }
    }

    /// `node`'s cidata seed, as an ISO image.
    fn seed(&self, pool: &Pool, image: &kiln_core::Manifest, node: &NodeId) -> Result<Vec<u8>, String> {
        let machine = Machine { mac: Some(node.mac()), hostname: Some(node.domain_name()), ..Default::default() };
        let profile = self.node_profile(pool)?;
        let api_url = self.config.api_url.as_deref().unwrap_or_default();
        let params = ServerParams { base_url: api_url, token: &self.bootstrap_token, api_url };
        let seed = self.catalog.seed(&profile, image, &machine, &params).map_err(|e| e.to_string())?;
        seed.iso().map_err(|e| e.to_string())
    }
}

impl Provisioner for Pools {
    fn overlays(&self, host: &str) -> Result<Vec<NodeId>, String> {
        self.on_volumes(host, Volumes::nodes)
    }

    fn make(&self, host: &str, pool: &Pool, node: &NodeId) -> Result<BootMedia, String> {
        let image = self.images.get(&pool.image).ok_or_else(|| format!("image `{}` is no longer served", pool.image))?;
        let local = self.images.root().join(&image.name).join(format!("{}.qcow2", image.name));
        let capacity = kiln_pool::volumes::qcow2_virtual_size(&local).map_err(|e| format!("{}: {e}", local.display()))?;
        // The seed (xorriso: about 100 ms, mostly its own wait) is made
        // while libvirt makes the overlay.
        let disks = std::thread::scope(|scope| {
            let seed = scope.spawn(|| self.seed(pool, image, node));
            self.on_volumes(host, |v| {
                let start = std::time::Instant::now();
                let golden = v.golden(&image.name, &image.digest, &local)?;
                if let Some(bytes) = golden.uploaded {
                    let ms = start.elapsed().as_millis() as u64;
                    tracing::info!(host, image = %image.name, path = %golden.path, bytes, ms, "pools: golden image uploaded");
                }
                v.make(node, &golden.path, capacity, || seed.join().expect("the seed thread").map_err(std::io::Error::other))
            })
        })?;
        tracing::info!(node = %node, overlay_bytes = disks.overlay_bytes, seed_bytes = disks.seed_bytes, "pools: overlay and seed made");
        Ok(BootMedia::Disk { overlay: disks.overlay.into(), seed: disks.seed.into() })
    }

    fn delete(&self, host: &str, node: &NodeId) -> Result<(), String> {
        self.on_volumes(host, |v| v.delete(node))
    }

    fn console_log(&self, host: &str, node: &NodeId) -> Result<PathBuf, String> {
        self.on_volumes(host, |v| Ok(v.console_log(node).into()))
    }
}

/// The registry as the reconciler sees it: registered pool nodes, by hostname.
struct Registered<'a> {
    registry: &'a Registry,
    runtime: &'a tokio::runtime::Handle,
    pools: &'a [Pool],
}

impl PoolRegistry for Registered<'_> {
    fn registered(&self) -> Result<Vec<NodeId>, String> {
        Ok(self
            .registry
            .nodes()
            .iter()
            .filter_map(|n| NodeId::parse(&n.name))
            .filter(|id| self.pools.iter().any(|p| p.name == id.pool))
            .collect())
    }

    fn deregister(&self, node: &NodeId) -> Result<(), String> {
        let name = node.domain_name();
        match self.runtime.block_on(self.registry.remove(&name)) {
            Ok(Some(_)) => {
                tracing::info!(node = %name, "pools: deregistered, lease released");
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(format!("deregistering {name}: {e}")),
        }
    }
}

/// Scrapes `/metrics` of every `(name, host:port)` at once, 2 s each; the
/// nodes that answered, with their text.
async fn scrape_all(targets: &[(String, String)]) -> Vec<(String, String)> {
    let Ok(client) = reqwest::Client::builder().timeout(Duration::from_secs(2)).build() else { return Vec::new() };
    let fetches = targets.iter().map(|(name, target)| {
        let client = client.clone();
        async move {
            let resp = client.get(format!("http://{target}/metrics")).send().await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            Some((name.clone(), resp.text().await.ok()?))
        }
    });
    futures_util::future::join_all(fetches).await.into_iter().flatten().collect()
}

fn boot_name(b: kiln_pool::Boot) -> &'static str {
    match b {
        kiln_pool::Boot::Disk => "disk",
        kiln_pool::Boot::Network => "network",
    }
}

fn action_node(a: &Action) -> &NodeId {
    match a {
        Action::Deregister { node }
        | Action::Remove { node, .. }
        | Action::DeleteOverlay { node, .. }
        | Action::Start { node, .. }
        | Action::Create { node, .. } => node,
    }
}

fn describe(a: &Action) -> String {
    match a {
        Action::Deregister { node } => format!("deregister {node}"),
        Action::Remove { host, node } => format!("remove {node} from {host}"),
        Action::DeleteOverlay { host, node } => format!("delete the leftover overlay of {node} on {host}"),
        Action::Start { host, node } => format!("start {node} on {host}"),
        Action::Create { host, node } => format!("create {node} on {host}"),
    }
}
