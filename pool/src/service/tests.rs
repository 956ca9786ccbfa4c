//! The pool task on libvirt's in-process `test:///default` driver, with an
//! in-memory control plane. Each test holds the lock on that shared host
//! for its whole run, across awaits on purpose.
#![allow(clippy::await_holding_lock)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use super::*;
use crate::domain::Accel;
use crate::fleet::Networks;

/// An in-memory control plane: replicas, and every running domain counts
/// as registered once it is listed here.
#[derive(Default)]
struct Memory {
    replicas: Mutex<BTreeMap<String, u32>>,
    registered: Mutex<Vec<Registered>>,
    rollouts: Mutex<BTreeMap<String, RolloutRecord>>,
    deregistered: Mutex<Vec<NodeId>>,
    /// What each metrics target answers; others fail.
    metrics: Mutex<BTreeMap<String, String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the in-memory store is closed")]
struct Closed;

impl ControlPlane for Arc<Memory> {
    type Error = Closed;
    async fn registered(&self) -> Result<Vec<Registered>, Closed> {
        Ok(self.registered.lock().unwrap().clone())
    }
    async fn deregister(&self, node: &NodeId) -> Result<bool, Closed> {
        let mut r = self.registered.lock().unwrap();
        let before = r.len();
        r.retain(|n| &n.node != node);
        self.deregistered.lock().unwrap().push(node.clone());
        Ok(r.len() != before)
    }
    async fn replicas(&self) -> Result<BTreeMap<String, u32>, Closed> {
        Ok(self.replicas.lock().unwrap().clone())
    }
    async fn set_replicas(&self, pool: &str, replicas: u32) -> Result<(), Closed> {
        self.replicas.lock().unwrap().insert(pool.to_string(), replicas);
        Ok(())
    }
    async fn rollouts(&self) -> Result<BTreeMap<String, RolloutRecord>, Closed> {
        Ok(self.rollouts.lock().unwrap().clone())
    }
    async fn set_rollout(&self, pool: &str, record: &RolloutRecord) -> Result<(), Closed> {
        self.rollouts.lock().unwrap().insert(pool.to_string(), record.clone());
        Ok(())
    }
    async fn scrape(&self, target: &str) -> Result<String, Closed> {
        self.metrics.lock().unwrap().get(target).cloned().ok_or(Closed)
    }
}

/// One network image, `tiny`, with no qcow2.
struct Tiny;

impl NodeMedia for Tiny {
    fn image(&self, name: &str, _digest: Option<&kiln_core::Digest>) -> Option<crate::fleet::ServedImage> {
        (name == "tiny").then(|| crate::fleet::ServedImage { name: name.into(), digest: kiln_core::Digest::of(b"tiny"), qcow2: None })
    }
    fn served(&self) -> Vec<String> {
        vec!["tiny".into()]
    }
    fn seed(&self, _pool: &Pool, _node: &NodeId, _image: &kiln_core::Digest) -> Result<Vec<u8>, crate::reconcile::Cause> {
        Ok(Vec::new())
    }
    fn generations(&self, name: &str) -> Vec<kiln_core::Digest> {
        self.image(name, None).map(|i| i.digest).into_iter().collect()
    }
}

fn pool_dir(dir: &Path, name: &str, image: &str, boot: &str) {
    let text = format!(
        "image = \"{image}\"\nvcpus = 1\nmemory-mib = 128\nboot = \"{boot}\"\nmin = 0\nmax = 3\nreplicas = 1\nhosts = [\"test:///default\"]\n"
    );
    std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
}

fn config() -> Config {
    Config { settings: Settings { accel: Accel::Tcg }, interval: Duration::from_millis(50), autoscale_dry_run: false, leadership: None }
}

/// The pools in `dir` on the test host, loaded as a server loads them.
async fn load(dir: &Path) -> Fleet<Tiny> {
    let d = dir.to_path_buf();
    // The volumes test's directory: whichever test makes kiln's storage pool on the shared host makes it there.
    tokio::task::spawn_blocking(move || Fleet::load(&d, "/kiln-unit", &Networks::default(), Tiny)).await.unwrap().unwrap()
}

/// Waits until the published status satisfies `done`.
async fn until(handle: &PoolsHandle, what: &str, done: impl Fn(&Status) -> bool) -> Status {
    let mut rx = handle.watch();
    let waited = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| done(s))).await;
    match waited {
        Ok(Ok(s)) => s.clone(),
        _ => panic!("{what}: last status {:?}", handle.status()),
    }
}

fn defined(s: &Status, pool: &str) -> u32 {
    s.pools.iter().find(|p| p.name == pool).map_or(0, |p| p.hosts.iter().map(|h| h.defined).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_scales_a_pool_through_its_handle_and_stores_the_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let _host = crate::TEST_DEFAULT_HOST.lock().unwrap_or_else(|e| e.into_inner());
    pool_dir(dir.path(), "svc", "tiny", "network");
    let fleet = load(dir.path()).await;
    let control = Arc::new(Memory::default());
    let handle = start(fleet, control.clone(), config()).await.unwrap();
    assert_eq!(control.replicas.lock().unwrap().get("svc"), Some(&1), "the file's replicas are stored at start");

    let s = until(&handle, "one node defined", |s| defined(s, "svc") == 1).await;
    assert_eq!(s.pools[0].desired, 1);
    let (mac, node) = s.members.iter().next().map(|(m, n)| (*m, n.clone())).unwrap();
    assert_eq!(handle.member(mac).map(|(n, p)| (n, p.name.clone())), Some((node.clone(), "svc".to_string())));
    assert_eq!(handle.hosts_by_node().get(&node.domain_name()).map(String::as_str), Some("test:///default"));

    // The node registers; the pool grows to 3 and shrinks to 0 on command.
    control.registered.lock().unwrap().push(Registered { node: node.clone(), metrics: None, ready: true });
    handle.scale("svc", 3).await.unwrap();
    assert_eq!(control.replicas.lock().unwrap().get("svc"), Some(&3), "stored before the answer");
    assert_eq!(handle.status()[0].desired, 3, "published before the answer");
    let s = until(&handle, "three nodes defined", |s| defined(s, "svc") == 3).await;
    assert_eq!(s.pools[0].registered, 1, "{:?}", s.pools);
    handle.scale("svc", 0).await.unwrap();
    until(&handle, "no node left", |s| defined(s, "svc") == 0).await;
    assert!(control.registered.lock().unwrap().is_empty(), "a removed node's lease is released");
    assert!(control.deregistered.lock().unwrap().contains(&node));

    assert!(matches!(handle.scale("nope", 1).await, Err(ScaleError::NoPool(_))));
    let e = handle.scale("svc", 4).await.unwrap_err();
    assert_eq!(e.to_string(), "pool `svc` takes 0 to 3 replicas, not 4");
    handle.stop().await;
    assert!(matches!(handle.scale("svc", 1).await, Err(ScaleError::Stopped)), "a stopped task answers nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_image_is_not_served_is_refused_naming_the_file() {
    let _host = crate::TEST_DEFAULT_HOST.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    pool_dir(dir.path(), "big", "worker", "disk");
    let d = dir.path().to_path_buf();
    let e = tokio::task::spawn_blocking(move || Fleet::load(&d, "/nonexistent", &Networks::default(), Tiny).err().unwrap()).await.unwrap();
    let text = e.to_string();
    assert!(text.contains("big.toml") && text.contains("no image `worker` is served (images: tiny)"), "{text}");

    pool_dir(dir.path(), "big", "tiny", "disk");
    let d = dir.path().to_path_buf();
    let e = tokio::task::spawn_blocking(move || Fleet::load(&d, "/nonexistent", &Networks::default(), Tiny).err().unwrap()).await.unwrap();
    assert!(e.to_string().contains("has no tiny.qcow2"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autoscaler_counts_only_ready_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let _host = crate::TEST_DEFAULT_HOST.lock().unwrap_or_else(|e| e.into_inner());
    pool_dir(dir.path(), "auto", "tiny", "network");
    let policy = "\n[autoscale]\nmetric = \"load1\"\nscale-up-above = 2.0\nscale-down-below = 0.5\ncooldown-secs = 0\n";
    let file = dir.path().join("auto.toml");
    std::fs::write(&file, std::fs::read_to_string(&file).unwrap().replace("replicas = 1", "replicas = 2") + policy).unwrap();
    let fleet = load(dir.path()).await;
    let control = Arc::new(Memory::default());
    let handle = start(fleet, control.clone(), config()).await.unwrap();
    let s = until(&handle, "two nodes defined", |s| defined(s, "auto") == 2).await;
    // Its two nodes register: a Ready one at load 1.0 (within 0.5..2.0),
    // and a NotReady one whose scrape still answers 9.0: counted, it would
    // scale the pool up.
    for (i, (node, load, ready)) in s.members.values().zip([("1.0", true), ("9.0", false)]).map(|(n, (l, r))| (n, l, r)).enumerate() {
        let target = format!("10.0.0.{i}:9100");
        control.metrics.lock().unwrap().insert(target.clone(), format!("node_load1 {load}\n"));
        control.registered.lock().unwrap().push(Registered { node: node.clone(), metrics: Some(target), ready });
    }
    let counted = |s: &Status| s.pools[0].autoscale.as_deref().is_some_and(|w| w.contains("over 1 node"));
    let s = until(&handle, "a decision over the Ready node", counted).await;
    let words = s.pools[0].autoscale.clone().unwrap();
    assert_eq!(words, "hold at 2: mean load1 1.00 over 1 node within 0.5..2", "only the Ready node is counted");
    // Once both are Ready, the mean is 5.0 and the pool grows.
    control.registered.lock().unwrap()[1].ready = true;
    until(&handle, "a scale up", |s| s.pools[0].desired == 3).await;
    assert_eq!(control.replicas.lock().unwrap().get("auto"), Some(&3));
    handle.stop().await;
}

/// The network image `tiny`, whose generations (newest first) a test changes.
#[derive(Clone, Default)]
struct Rebuilt(Arc<Mutex<Vec<kiln_core::Digest>>>);

impl NodeMedia for Rebuilt {
    fn image(&self, name: &str, digest: Option<&kiln_core::Digest>) -> Option<crate::fleet::ServedImage> {
        let gens = self.0.lock().unwrap();
        let digest = match digest {
            Some(d) => *gens.iter().find(|g| *g == d)?,
            None => *gens.first()?,
        };
        (name == "tiny").then(|| crate::fleet::ServedImage { name: name.into(), digest, qcow2: None })
    }
    fn served(&self) -> Vec<String> {
        vec!["tiny".into()]
    }
    fn seed(&self, _pool: &Pool, _node: &NodeId, _image: &kiln_core::Digest) -> Result<Vec<u8>, crate::reconcile::Cause> {
        Ok(Vec::new())
    }
    fn generations(&self, name: &str) -> Vec<kiln_core::Digest> {
        if name == "tiny" { self.0.lock().unwrap().clone() } else { Vec::new() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_generation_rolls_the_pool_and_pause_and_undo_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let _host = crate::TEST_DEFAULT_HOST.lock().unwrap_or_else(|e| e.into_inner());
    pool_dir(dir.path(), "roll", "tiny", "network");
    let file = dir.path().join("roll.toml");
    std::fs::write(&file, std::fs::read_to_string(&file).unwrap().replace("replicas = 1", "replicas = 3")).unwrap();
    let (one, two, three) = (kiln_core::Digest::of("one"), kiln_core::Digest::of("two"), kiln_core::Digest::of("three"));
    let media = Rebuilt::default();
    media.0.lock().unwrap().push(one);
    let d = dir.path().to_path_buf();
    let m = media.clone();
    let fleet = tokio::task::spawn_blocking(move || Fleet::load(&d, "/kiln-unit", &Networks::default(), m)).await.unwrap().unwrap();
    let control = Arc::new(Memory::default());
    let handle = start(fleet, control.clone(), config()).await.unwrap();

    // Every node defined registers, Ready, a moment later.
    let registrar = {
        let (handle, control) = (handle.clone(), control.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(30)).await;
                let members: Vec<NodeId> = handle.watch().borrow().members.values().cloned().collect();
                *control.registered.lock().unwrap() =
                    members.into_iter().map(|node| Registered { node, metrics: None, ready: true }).collect();
            }
        })
    };
    let pool = |s: &Status| s.pools[0].clone();
    let on = |target: kiln_core::Digest| {
        move |s: &Status| {
            let p = &s.pools[0];
            p.target == Some(target) && p.up_to_date == 3 && p.out_of_date == 0 && p.ready == 3 && defined(s, "roll") == 3
        }
    };
    until(&handle, "three Ready nodes of the first generation", on(one)).await;

    // A new generation: the pool rolls to it, never above 4 nodes nor below 3 Ready.
    let mut rx = handle.watch();
    media.0.lock().unwrap().insert(0, two);
    let watcher = tokio::spawn(async move {
        let mut worst = (0, u32::MAX);
        while rx.changed().await.is_ok() {
            let s = rx.borrow_and_update().clone();
            worst = (worst.0.max(defined(&s, "roll")), worst.1.min(s.pools[0].ready));
            if on(two)(&s) {
                return worst;
            }
        }
        worst
    });
    let (most, fewest_ready) = tokio::time::timeout(Duration::from_secs(30), watcher).await.expect("the rollout ends").unwrap();
    assert!(most <= 4, "max-surge 1: at most 4 nodes, saw {most}");
    assert!(fewest_ready >= 3, "max-unavailable 0: never below 3 Ready, saw {fewest_ready}");
    assert_eq!(pool(&handle.watch().borrow()).rollout.min_ready_seen, Some(3));

    // Undo goes back to the previous generation, and is stored.
    let s = handle.rollout("roll", RolloutAction::Undo).await.unwrap();
    assert_eq!(s.target, Some(one));
    assert_eq!(s.rollout.undone_to, Some(one));
    assert_eq!(control.rollouts.lock().unwrap()["roll"].pin, Some(Pin { image: one, while_current: two }));
    until(&handle, "back on the first generation", on(one)).await;
    let e = handle.rollout("roll", RolloutAction::Undo).await.unwrap_err();
    assert!(e.to_string().contains("keeps no generation older than"), "{e}");

    // Paused, a new generation waits; resumed, the pool rolls to it (the pin no longer holds).
    handle.rollout("roll", RolloutAction::Pause).await.unwrap();
    media.0.lock().unwrap().insert(0, three);
    let s = until(&handle, "three out of date, paused", |s| s.pools[0].out_of_date == 3 && s.pools[0].target == Some(three)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pool(&handle.watch().borrow()).out_of_date, 3, "nothing replaced while paused: {:?}", s.pools[0]);
    assert!(control.rollouts.lock().unwrap()["roll"].paused);
    handle.rollout("roll", RolloutAction::Resume).await.unwrap();
    until(&handle, "on the third generation", on(three)).await;

    assert!(matches!(handle.rollout("nope", RolloutAction::Pause).await, Err(RolloutError::NoPool(_))));
    registrar.abort();
    handle.scale("roll", 0).await.unwrap();
    until(&handle, "no node left", |s| defined(s, "roll") == 0).await;
    handle.stop().await;
}

/// Two servers on one store: only the one that leads changes the host;
/// the other observes (its status counts the same domains) and takes
/// over when it is elected, making nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_changes_the_hosts_and_the_next_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let _host = crate::TEST_DEFAULT_HOST.lock().unwrap_or_else(|e| e.into_inner());
    pool_dir(dir.path(), "two", "tiny", "network");
    let control = Arc::new(Memory::default());
    control.replicas.lock().unwrap().insert("two".into(), 0);
    let here = |name: &str| Lead::Here { server: name.into(), until: Instant::now() + Duration::from_secs(3600) };
    let (lead_a, a_sees) = watch::channel(here("a"));
    let (lead_b, b_sees) = watch::channel(Lead::Elsewhere("a".into()));
    let a = start(load(dir.path()).await, control.clone(), Config { leadership: Some(a_sees), ..config() }).await.unwrap();
    // The other passes only when asked: by a command, a lead, or a boot request.
    let slow = Config { leadership: Some(b_sees), interval: Duration::from_secs(3600), ..config() };
    let b = start(load(dir.path()).await, control.clone(), slow).await.unwrap();

    // Scaled through the server that does not lead: stored, and the leader makes the nodes.
    b.scale("two", 3).await.unwrap();
    let made = until(&a, "the leader makes 3", |s| defined(s, "two") == 3).await;
    // A node the other has not seen yet boots as its pool's there too: the
    // boot request waits for a look at the hosts.
    for (mac, node) in &made.members {
        b.observe_for(*mac).await;
        assert_eq!(b.member(*mac).map(|(n, _)| n), Some(node.clone()), "{node} is known to the other server once it boots");
    }
    let stranger = Mac([0x52, 0x54, 0x00, 0xde, 0xad, 0x01]);
    b.observe_for(stranger).await;
    assert!(b.member(stranger).is_none());
    let seen = b.watch().borrow().clone();
    assert_eq!(defined(&seen, "two"), 3);
    assert_eq!(seen.pools[0].leader, Some(kiln_core::pool::Leader { server: Some("a".into()), here: false }));
    assert_eq!(a.status()[0].leader, Some(kiln_core::pool::Leader { server: Some("a".into()), here: true }));
    let members = seen.members.clone();

    // The leader is gone; until the other is elected, nothing changes.
    a.stop().await;
    drop(lead_a);
    lead_b.send_replace(Lead::Nobody);
    b.scale("two", 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(defined(&b.watch().borrow(), "two"), 3, "a server that does not lead removes nothing");
    // A lead whose lease may have run out acts no more than none.
    lead_b.send_replace(Lead::Here { server: "b".into(), until: Instant::now() - Duration::from_secs(1) });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(defined(&b.watch().borrow(), "two"), 3, "a lapsed lead removes nothing");

    // Elected: it acts at once on what the hosts hold, the newest nodes go first.
    lead_b.send_replace(here("b"));
    let s = until(&b, "the new leader scales to 1", |s| defined(s, "two") == 1).await;
    let first = NodeId::new("two", 0);
    assert_eq!(s.members.values().collect::<Vec<_>>(), [&first], "the newest go first: the first node stays");
    assert_eq!(members.get(&first.mac()), Some(&first), "the one the first leader made");
    b.scale("two", 0).await.unwrap();
    until(&b, "no node left", |s| defined(s, "two") == 0).await;
    b.stop().await;
}
