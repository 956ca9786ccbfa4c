//! The reconciler: observe every host the pools use, [`plan()`], carry the
//! plan out, report what was done and what failed.
//!
//! One pass ([`reconcile`]) is what a control loop runs again and again.
//! Nothing is remembered between passes: what exists is read from the hosts
//! (kiln's domains, by their metadata), from the [`Provisioner`] (overlays
//! and seeds) and from the [`Registry`] (registered nodes), so a server
//! killed in the middle of a pass converges in the next pass after its
//! restart, leaking nothing.
//!
//! A pool any of whose hosts cannot be listed is not planned in that pass:
//! with part of its nodes unseen, a plan would make replacements for nodes
//! that still run. Its error is in the [`Report`].

use std::collections::BTreeMap;

use crate::NodeId;
use crate::domain::{Accel, BootMedia, DomainSpec};
use crate::hypervisor::Hypervisor;
use crate::plan::{Action, Desired, HostDomain, Observed, Overlay, Rollout, plan};
use crate::spec::{Boot, Pool};
use kiln_core::error_chain as chain;

/// A backend's own error, kept whole as the cause of an [`Error`].
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// One step of a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection to the host (it could not be opened at start).
    #[error("{host}: not connected")]
    NotConnected {
        /// The host.
        host: String,
    },
    /// A node of a pool the server did not load.
    #[error("pool {pool} is not loaded")]
    NoPool {
        /// The pool.
        pool: String,
    },
    /// A disk pool's image (with its qcow2) is no longer served.
    #[error("image `{image}` is no longer served with a qcow2")]
    ImageGone {
        /// The image.
        image: String,
    },
    /// libvirt refused or failed.
    #[error(transparent)]
    Hypervisor(#[from] crate::hypervisor::Error),
    /// Making, listing or deleting a node's overlay, seed or console log.
    #[error("{host}: storage")]
    Storage {
        /// The host.
        host: String,
        /// The cause.
        #[source]
        source: Cause,
    },
    /// The control plane's registry failed.
    #[error("registry")]
    Registry(#[source] Cause),
}

/// Makes and deletes what a node needs besides its domain: for a disk
/// node, its qcow2 overlay on the pool's golden image and its cidata seed.
pub trait Provisioner {
    /// The nodes that have an overlay (or seed) on `host`.
    fn overlays(&self, host: &str) -> Result<Vec<NodeId>, Error>;
    /// Makes `node`'s overlay and seed on `host` (replacing any) for a
    /// disk-booted `pool`, from generation `image` of its image (the
    /// current one when `None`), and says where they are.
    fn make(&self, host: &str, pool: &Pool, node: &NodeId, image: Option<&kiln_core::Digest>) -> Result<BootMedia, Error>;
    /// Deletes `node`'s overlay and seed on `host`; succeeds when there are none.
    fn delete(&self, host: &str, node: &NodeId) -> Result<(), Error>;
    /// The file `node`'s serial console is logged to on `host`.
    fn console_log(&self, host: &str, node: &NodeId) -> Result<std::path::PathBuf, Error>;
    /// After nodes of disk-booted `pool` were removed from `host`: deletes
    /// the golden volumes of its image no overlay uses, but generation `keep`'s.
    fn prune(&self, _host: &str, _pool: &Pool, _keep: &kiln_core::Digest) -> Result<(), Error> {
        Ok(())
    }
}

/// The control plane's view of the nodes.
pub trait Registry {
    /// Pool nodes registered now (holding a lease), each with whether it
    /// is Ready (heard from within the grace period).
    fn registered(&self) -> Result<Vec<(NodeId, bool)>, Error>;
    /// Removes `node` and releases its lease; succeeds when it is not registered.
    fn deregister(&self, node: &NodeId) -> Result<(), Error>;
    /// Whether this server may change the hosts now (it leads, or is
    /// alone): asked before the plan and before each of its actions.
    fn acts(&self) -> bool {
        true
    }
}

/// How nodes run, the same for every pool of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// TCG where KVM does not run, KVM where it does.
    pub accel: Accel,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// The actions carried out, in order.
    pub done: Vec<Action>,
    /// How long each of `done` took.
    pub took: Vec<std::time::Duration>,
    /// The parts of each of `done` that were timed apart: for a node
    /// created, `storage` (its overlay and seed), `define` and `start`.
    pub phases: Vec<Vec<(&'static str, std::time::Duration)>>,
    /// What failed: a host that could not be listed (`None` action), or an action.
    pub failed: Vec<(Option<Action>, String)>,
    /// What the hosts and the registry have after the pass: what was
    /// observed, with the actions done applied ([`Observed::apply`]); hosts
    /// that could not be listed are missing.
    pub after: Observed,
}

impl Report {
    /// True when nothing was done and nothing failed: the hosts match the pools.
    pub fn converged(&self) -> bool {
        self.done.is_empty() && self.failed.is_empty()
    }
}

/// The generation a pool's nodes should run, and whether its rollout is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The image generation.
    pub image: kiln_core::Digest,
    /// Paused: out-of-date nodes are kept.
    pub paused: bool,
}

/// One pass for `pools`, each wanting `replicas[pool]` nodes (its file's
/// `replicas` when absent) of generation `targets[pool]` (any, when
/// absent), on `hosts` (every URI the pools name, opened).
pub fn reconcile(
    pools: &[Pool],
    replicas: &BTreeMap<String, u32>,
    targets: &BTreeMap<String, Target>,
    hosts: &BTreeMap<String, Box<dyn Hypervisor + Send>>,
    provisioner: &dyn Provisioner,
    registry: &dyn Registry,
    settings: &Settings,
) -> Report {
    let mut report = Report::default();
    let mut observed = Observed::default();
    let mut unseen = Vec::new();
    for uri in pools.iter().flat_map(|p| p.hosts.iter()).collect::<std::collections::BTreeSet<_>>() {
        let Some(hv) = hosts.get(uri) else {
            report.failed.push((None, chain(&Error::NotConnected { host: uri.clone() })));
            unseen.push(uri.clone());
            continue;
        };
        match hv.list() {
            Ok(domains) => observed.domains.extend(domains.into_iter().map(|d| HostDomain {
                host: uri.clone(),
                node: d.node,
                running: d.running,
                image: d.image,
            })),
            Err(e) => {
                report.failed.push((None, chain(&e)));
                unseen.push(uri.clone());
                continue;
            }
        }
        match provisioner.overlays(uri) {
            Ok(nodes) => observed.overlays.extend(nodes.into_iter().map(|node| Overlay { host: uri.clone(), node })),
            Err(e) => {
                report.failed.push((None, chain(&e)));
                unseen.push(uri.clone());
            }
        }
    }
    match registry.registered() {
        Ok(nodes) => {
            observed.ready = nodes.iter().filter(|(_, ready)| *ready).map(|(n, _)| n.clone()).collect();
            observed.registered = nodes.into_iter().map(|(n, _)| n).collect();
        }
        Err(e) => {
            // Without the registry, leases cannot be released: plan nothing.
            report.failed.push((None, chain(&e)));
            report.after = observed;
            return report;
        }
    }

    if !registry.acts() {
        // Another server leads: observe only.
        report.after = observed;
        return report;
    }
    let by_name: BTreeMap<&str, &Pool> = pools.iter().map(|p| (p.name.as_str(), p)).collect();
    let desired: Vec<Desired> = pools
        .iter()
        .filter(|p| !p.hosts.iter().any(|h| unseen.contains(h)))
        .map(|p| {
            let target = targets.get(&p.name);
            Desired {
                pool: p.name.clone(),
                replicas: replicas.get(&p.name).copied().unwrap_or(p.replicas),
                hosts: p.hosts.clone(),
                image: target.map(|t| t.image),
                rollout: Rollout {
                    max_surge: p.rollout.max_surge,
                    max_unavailable: p.rollout.max_unavailable,
                    paused: target.is_some_and(|t| t.paused),
                },
            }
        })
        .collect();
    for action in plan(&desired, &observed) {
        if !registry.acts() {
            report.failed.push((None, "no longer the leader: the rest of the pass is left to the server that leads".into()));
            break;
        }
        let start = std::time::Instant::now();
        let result = carry_out(&action, &by_name, hosts, provisioner, registry, settings);
        match result {
            Ok(phases) => {
                report.done.push(action);
                report.took.push(start.elapsed());
                report.phases.push(phases);
            }
            Err(e) => report.failed.push((Some(action), chain(&e))),
        }
    }
    report.after = observed.apply(&report.done);
    // Golden volumes of generations no node uses any more (a rollout's end).
    let mut removed_from: std::collections::BTreeSet<(&str, &str)> = std::collections::BTreeSet::new();
    for action in &report.done {
        if let Action::Remove { host, node } = action {
            removed_from.insert((host.as_str(), node.pool.as_str()));
        }
    }
    for (host, pool) in removed_from {
        let (Some(p), Some(t)) = (by_name.get(pool), targets.get(pool)) else { continue };
        if p.boot == Boot::Disk
            && let Err(e) = provisioner.prune(host, p, &t.image)
        {
            report.failed.push((None, chain(&e)));
        }
    }
    report
}

fn carry_out(
    action: &Action,
    pools: &BTreeMap<&str, &Pool>,
    hosts: &BTreeMap<String, Box<dyn Hypervisor + Send>>,
    provisioner: &dyn Provisioner,
    registry: &dyn Registry,
    settings: &Settings,
) -> Result<Vec<(&'static str, std::time::Duration)>, Error> {
    let hv = |host: &str| hosts.get(host).ok_or_else(|| Error::NotConnected { host: host.to_string() });
    match action {
        Action::Deregister { node } => registry.deregister(node).map(|()| Vec::new()),
        Action::Remove { host, node } => {
            // The lease goes with the domain, whether or not the node is registered now.
            registry.deregister(node)?;
            hv(host)?.destroy_and_undefine(node)?;
            provisioner.delete(host, node).map(|()| Vec::new())
        }
        Action::DeleteOverlay { host, node } => provisioner.delete(host, node).map(|()| Vec::new()),
        Action::Start { host, node } => hv(host)?.start(node).map(|()| Vec::new()).map_err(Error::from),
        Action::Create { host, node, image } => {
            let pool = pools.get(node.pool.as_str()).ok_or_else(|| Error::NoPool { pool: node.pool.clone() })?;
            let t = std::time::Instant::now();
            let boot = match pool.boot {
                Boot::Disk => provisioner.make(host, pool, node, image.as_ref())?,
                Boot::Network => BootMedia::Network,
            };
            let storage = t.elapsed();
            let spec = DomainSpec {
                node: node.clone(),
                accel: settings.accel,
                vcpus: pool.vcpus,
                memory_mib: pool.memory_mib,
                boot,
                nic: pool.nic(),
                mac: node.mac(),
                console_log: provisioner.console_log(host, node)?,
                image: *image,
            };
            let hv = hv(host)?;
            let t = std::time::Instant::now();
            hv.define(&spec)?;
            let define = t.elapsed();
            let t = std::time::Instant::now();
            hv.start(node)?;
            Ok(vec![("storage", storage), ("define", define), ("start", t.elapsed())])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Libvirt;
    use std::cell::RefCell;
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    /// Overlays as files in a directory per host.
    struct Files(PathBuf);

    impl Files {
        fn dir(&self, host: &str) -> PathBuf {
            self.0.join(host.replace(['/', ':'], "_"))
        }
    }

    impl Provisioner for Files {
        fn overlays(&self, host: &str) -> Result<Vec<NodeId>, Error> {
            let Ok(entries) = std::fs::read_dir(self.dir(host)) else { return Ok(vec![]) };
            Ok(entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let stem = name.strip_suffix(".qcow2")?.strip_prefix("kiln-")?;
                    let (pool, n) = stem.rsplit_once('-')?;
                    Some(NodeId::new(pool, n.parse().ok()?))
                })
                .collect())
        }
        fn make(&self, host: &str, _pool: &Pool, node: &NodeId, _image: Option<&kiln_core::Digest>) -> Result<BootMedia, Error> {
            let storage = |e: std::io::Error| Error::Storage { host: host.to_string(), source: e.into() };
            std::fs::create_dir_all(self.dir(host)).map_err(storage)?;
            let overlay = self.dir(host).join(format!("{node}.qcow2"));
            std::fs::write(&overlay, b"overlay").map_err(storage)?;
            Ok(BootMedia::Disk { overlay, seed: self.dir(host).join(format!("{node}.iso")) })
        }
        fn delete(&self, host: &str, node: &NodeId) -> Result<(), Error> {
            match std::fs::remove_file(self.dir(host).join(format!("{node}.qcow2"))) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Storage { host: host.to_string(), source: e.into() }),
                _ => Ok(()),
            }
        }
        fn console_log(&self, host: &str, node: &NodeId) -> Result<PathBuf, Error> {
            Ok(self.dir(host).join(format!("{node}.log")))
        }
    }

    /// Registered nodes: every running domain registers at once.
    #[derive(Default)]
    struct Nodes(RefCell<BTreeSet<NodeId>>, RefCell<Vec<NodeId>>);

    impl Registry for Nodes {
        fn registered(&self) -> Result<Vec<(NodeId, bool)>, Error> {
            Ok(self.0.borrow().iter().map(|n| (n.clone(), true)).collect())
        }
        fn deregister(&self, node: &NodeId) -> Result<(), Error> {
            if self.0.borrow_mut().remove(node) {
                self.1.borrow_mut().push(node.clone());
            }
            Ok(())
        }
    }

    /// Pool `worker`, 0 to 5 nodes of 1 vCPU and 256 MiB, on `hosts`.
    fn pool(dir: &Path, boot: &str, replicas: u32, hosts: &[&str]) -> Pool {
        let hosts = hosts.iter().map(|h| format!("\"{h}\"")).collect::<Vec<_>>().join(", ");
        let text = format!(
            "image = \"worker\"\nvcpus = 1\nmemory-mib = 256\nboot = \"{boot}\"\nmin = 0\nmax = 5\nreplicas = {replicas}\nhosts = [{hosts}]\n"
        );
        Pool::from_str(&text, &dir.join("worker.toml"), 1 << 20).unwrap()
    }

    /// Two separate test hypervisors (each `test:///FILE` is its own
    /// in-process host, with no domains).
    fn hosts(dir: &Path) -> BTreeMap<String, Box<dyn Hypervisor + Send>> {
        let xml = "<node><cpu><mhz>2000</mhz><model>i686</model><active>2</active><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads></cpu><memory>8388608</memory></node>";
        let mut out: BTreeMap<String, Box<dyn Hypervisor + Send>> = BTreeMap::new();
        for name in ["a", "b"] {
            let file = dir.join(format!("host-{name}.xml"));
            std::fs::write(&file, xml).unwrap();
            let uri = format!("test://{}", file.display());
            out.insert(uri.clone(), Box::new(Libvirt::open(&uri).unwrap()));
        }
        out
    }

    fn settings() -> Settings {
        Settings { accel: Accel::Tcg }
    }

    fn count_on(hosts: &BTreeMap<String, Box<dyn Hypervisor + Send>>) -> Vec<usize> {
        hosts.values().map(|h| h.list().unwrap().len()).collect()
    }

    #[test]
    fn scales_up_and_down_across_two_hosts_and_leaks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = hosts(dir.path());
        let uris: Vec<&String> = hosts.keys().collect();
        let p = pool(dir.path(), "disk", 0, &[uris[0], uris[1]]);
        let files = Files(dir.path().join("overlays"));
        let nodes = Nodes::default();
        let pass = |n: u32| {
            let r = reconcile(
                std::slice::from_ref(&p),
                &BTreeMap::from([("worker".into(), n)]),
                &BTreeMap::new(),
                &hosts,
                &files,
                &nodes,
                &settings(),
            );
            assert!(r.failed.is_empty(), "{:?}", r.failed);
            r
        };

        assert!(pass(0).converged());
        let r = pass(3);
        assert_eq!(r.done.iter().filter(|a| matches!(a, Action::Create { .. })).count(), 3);
        assert_eq!(count_on(&hosts), [2, 1], "spread evenly, the first host first");
        assert_eq!(r.after.domains.len(), 3, "the state after the pass is what the hosts list");
        assert_eq!(files.overlays(uris[0]).unwrap().len() + files.overlays(uris[1]).unwrap().len(), 3);
        // The nodes register.
        for h in hosts.values() {
            for d in h.list().unwrap() {
                nodes.0.borrow_mut().insert(d.node);
            }
        }
        assert!(pass(3).converged(), "idempotent");

        let r = pass(1);
        assert_eq!(r.done.iter().filter(|a| matches!(a, Action::Remove { .. })).count(), 2, "{:?}", r.done);
        assert_eq!(count_on(&hosts).iter().sum::<usize>(), 1);
        assert_eq!(nodes.0.borrow().len(), 1, "removed nodes are deregistered");
        assert_eq!(nodes.1.borrow().len(), 2);
        assert!(pass(1).converged());

        pass(0);
        assert_eq!(count_on(&hosts), [0, 0]);
        assert!(files.overlays(uris[0]).unwrap().is_empty() && files.overlays(uris[1]).unwrap().is_empty(), "no overlay left");
        assert!(nodes.0.borrow().is_empty(), "no lease left");
    }

    #[test]
    fn a_pass_killed_midway_is_finished_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = hosts(dir.path());
        let uri = hosts.keys().next().unwrap().clone();
        let p = pool(dir.path(), "disk", 0, &[&uri]);
        let files = Files(dir.path().join("overlays"));
        let nodes = Nodes::default();
        // A crash after making node 0's overlay, before defining its domain;
        // and a node registered whose domain is gone.
        files.make(&uri, &p, &NodeId::new("worker", 0), None).unwrap();
        nodes.0.borrow_mut().insert(NodeId::new("worker", 7));

        let r = reconcile(
            std::slice::from_ref(&p),
            &BTreeMap::from([("worker".into(), 2)]),
            &BTreeMap::new(),
            &hosts,
            &files,
            &nodes,
            &settings(),
        );
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        let listed: BTreeSet<u32> = hosts[&uri].list().unwrap().into_iter().map(|d| d.node.index).collect();
        assert_eq!(listed.len(), 2);
        assert!(!listed.contains(&0) && !listed.contains(&7), "numbers in use are not reused: {listed:?}");
        assert!(!files.overlays(&uri).unwrap().contains(&NodeId::new("worker", 0)), "the leaked overlay is deleted");
        assert!(!nodes.0.borrow().contains(&NodeId::new("worker", 7)), "the orphaned lease is released");
        assert!(
            reconcile(
                std::slice::from_ref(&p),
                &BTreeMap::from([("worker".into(), 2)]),
                &BTreeMap::new(),
                &hosts,
                &files,
                &nodes,
                &settings()
            )
            .converged()
        );
    }

    #[test]
    fn a_pool_with_an_unreachable_host_is_not_planned() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = hosts(dir.path());
        let uri = hosts.keys().next().unwrap().clone();
        let p = pool(dir.path(), "network", 2, &[&uri, "qemu+ssh://nowhere.invalid/system"]);
        let r = reconcile(
            std::slice::from_ref(&p),
            &BTreeMap::new(),
            &BTreeMap::new(),
            &hosts,
            &Files(dir.path().join("o")),
            &Nodes::default(),
            &settings(),
        );
        assert!(r.done.is_empty(), "{:?}", r.done);
        assert!(r.failed.iter().any(|(a, e)| a.is_none() && e.contains("nowhere.invalid")), "{:?}", r.failed);
        assert!(hosts[&uri].list().unwrap().is_empty());
    }
}
