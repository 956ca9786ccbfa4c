//! Reconcile planning: what to do so that the hosts match the pools.
//!
//! [`plan()`] is a pure function. It takes each pool's desired replicas and
//! hosts ([`Desired`]) and what is there now ([`Observed`]: kiln's domains
//! on each host, the overlay disks on each host, the nodes registered with
//! the control plane) and returns the [`Action`]s that make them match. The
//! reconciler carries them out in order and plans again; since a plan made
//! from the state its own actions leave is empty ([`Observed::apply`]
//! computes that state), a reconciler killed anywhere in the middle just
//! plans again after restart and finishes the job, leaking nothing.
//!
//! The rules, per pool:
//! - a node is kept on one host of the pool's list; a copy on another host,
//!   or a node on a host the pool no longer lists, is removed;
//! - scaling down removes stopped nodes first, then those not Ready, then
//!   from the host with the most nodes, its newest (highest-numbered) node
//!   first;
//! - scaling up adds to the host with the fewest nodes (the earlier in the
//!   pool's list on a tie), numbering new nodes above every number in use;
//! - nodes are not moved just to even out the spread: creating and removing
//!   nodes evens it out over time without restarting any;
//! - a kept node whose domain is defined but not running is started;
//! - an overlay no kept domain uses (a crash between making it and defining
//!   the domain) is deleted, and a registered node with no kept domain is
//!   deregistered (its lease released).
//!
//! - **rolling replacement**: a kept node whose image generation (from its
//!   domain's metadata) is not the pool's target is out of date. Unless the
//!   rollout is paused, out-of-date nodes are replaced as Cluster API's
//!   MachineDeployments are: new nodes of the target are made while the
//!   pool has fewer than `replicas + max_surge` nodes (and fewer than
//!   `replicas` new ones); an out-of-date node is removed only while at
//!   least `replicas - max_unavailable` nodes stay Ready (those not Ready
//!   go first: they count for nothing). With the defaults, 1 and 0, a new
//!   node is Ready before each old one goes.
//!
//! Pools not in the desired list are left entirely alone: a pool is retired
//! by scaling it to zero first.

use std::collections::{BTreeMap, BTreeSet};

use crate::NodeId;

/// What one pool should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The pool.
    pub pool: String,
    /// How many nodes.
    pub replicas: u32,
    /// The hosts (libvirt URIs) the nodes spread across, in preference order.
    pub hosts: Vec<String>,
    /// The image generation its nodes should run; `None`: any (no rollout).
    pub image: Option<kiln_core::Digest>,
    /// How out-of-date nodes are replaced.
    pub rollout: Rollout,
}

/// How a pool's out-of-date nodes are replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollout {
    /// Nodes the pool may have above its replicas while it rolls.
    pub max_surge: u32,
    /// Ready nodes the pool may have below its replicas while it rolls.
    pub max_unavailable: u32,
    /// Paused: out-of-date nodes are kept (scaling still works).
    pub paused: bool,
}

impl Default for Rollout {
    /// Cluster API's defaults: one node above, none below.
    fn default() -> Self {
        Rollout { max_surge: 1, max_unavailable: 0, paused: false }
    }
}

/// A kiln domain as found on a host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostDomain {
    /// The host's URI.
    pub host: String,
    /// The node, from the domain's metadata.
    pub node: NodeId,
    /// True if the domain runs; false if it is defined but shut off.
    pub running: bool,
    /// The image generation it was made from (its metadata), if recorded.
    pub image: Option<kiln_core::Digest>,
}

/// A node's overlay disk (and seed) as found on a host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Overlay {
    /// The host's URI.
    pub host: String,
    /// The node it was made for.
    pub node: NodeId,
}

/// What there is now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// kiln's domains, on every host the pools use.
    pub domains: Vec<HostDomain>,
    /// Overlay disks, on every host the pools use.
    pub overlays: Vec<Overlay>,
    /// Nodes registered with the control plane (holding a lease).
    pub registered: Vec<NodeId>,
    /// Those of them heard from within the grace period: Ready.
    pub ready: Vec<NodeId>,
}

/// One step of a plan, in the order [`plan()`] returns them: deregistering
/// and removing first (freeing memory), then starting, then creating.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Deregister the node and release its lease.
    Deregister {
        /// The node.
        node: NodeId,
    },
    /// Destroy and undefine the node's domain, delete its overlay and seed.
    Remove {
        /// The host.
        host: String,
        /// The node.
        node: NodeId,
    },
    /// Delete an overlay and seed that no domain uses.
    DeleteOverlay {
        /// The host.
        host: String,
        /// The node it was made for.
        node: NodeId,
    },
    /// Start the node's defined, stopped domain.
    Start {
        /// The host.
        host: String,
        /// The node.
        node: NodeId,
    },
    /// Make the node's overlay and seed (replacing any), define its domain and start it.
    Create {
        /// The host.
        host: String,
        /// The node.
        node: NodeId,
        /// The image generation to make it from (the pool's target).
        image: Option<kiln_core::Digest>,
    },
}

/// The actions that make `observed` match `desired`; empty when it does.
pub fn plan(desired: &[Desired], observed: &Observed) -> Vec<Action> {
    let mut actions = BTreeSet::new();
    for d in desired {
        plan_pool(d, observed, &mut actions);
    }
    // BTreeSet orders by variant, then host and node: the documented order.
    actions.into_iter().collect()
}

fn plan_pool(d: &Desired, observed: &Observed, actions: &mut BTreeSet<Action>) {
    let ours = |n: &NodeId| n.pool == d.pool;
    let rank = |host: &str| d.hosts.iter().position(|h| h == host);

    // One domain per node, on a host of the pool: running first, then the
    // host earlier in the list. Every other copy goes.
    let mut by_node: BTreeMap<&NodeId, Vec<&HostDomain>> = BTreeMap::new();
    for dom in observed.domains.iter().filter(|dom| ours(&dom.node)) {
        by_node.entry(&dom.node).or_default().push(dom);
    }
    let mut kept: Vec<&HostDomain> = Vec::new();
    for (_, mut copies) in by_node {
        copies.sort_by_key(|c| (rank(&c.host).is_none(), !c.running, rank(&c.host), c.host.clone()));
        copies.dedup_by(|a, b| a.host == b.host);
        let mut copies = copies.into_iter();
        if let Some(first) = copies.next() {
            if rank(&first.host).is_some() {
                kept.push(first);
            } else {
                actions.insert(Action::Remove { host: first.host.clone(), node: first.node.clone() });
            }
        }
        for other in copies {
            actions.insert(Action::Remove { host: other.host.clone(), node: other.node.clone() });
        }
    }

    let mut count: BTreeMap<&str, u32> = d.hosts.iter().map(|h| (h.as_str(), 0)).collect();
    for k in &kept {
        *count.entry(k.host.as_str()).or_default() += 1;
    }

    let replicas = d.replicas as usize;
    let outdated = |k: &HostDomain| d.image.is_some() && k.image != d.image;
    let ready = |k: &HostDomain| observed.ready.contains(&k.node);
    let mut remove = |kept: &mut Vec<&HostDomain>, i: usize, count: &mut BTreeMap<&str, u32>| {
        let victim = kept.swap_remove(i);
        *count.get_mut(victim.host.as_str()).expect("counted above") -= 1;
        actions.insert(Action::Remove { host: victim.host.clone(), node: victim.node.clone() });
    };
    // Which node goes first when there are too many: stopped, not Ready,
    // then the busiest host's newest.
    let victim = |kept: &[&HostDomain], count: &BTreeMap<&str, u32>, of: &dyn Fn(&HostDomain) -> bool| {
        kept.iter()
            .enumerate()
            .filter(|(_, k)| of(k))
            .max_by_key(|(_, k)| (!k.running, !ready(k), count[k.host.as_str()], k.node.index))
            .map(|(i, _)| i)
    };
    let to_make = if !d.rollout.paused && kept.iter().any(|k| outdated(k)) {
        // Rolling: out-of-date nodes go while enough stay Ready.
        let min_ready = replicas.saturating_sub(d.rollout.max_unavailable as usize);
        let mut ready_now = kept.iter().filter(|k| ready(k)).count();
        while let Some(i) = victim(&kept, &count, &|k| outdated(k)) {
            if ready(kept[i]) {
                if ready_now <= min_ready {
                    break;
                }
                ready_now -= 1;
            }
            remove(&mut kept, i, &mut count);
        }
        // Up-to-date nodes beyond the replicas (scaled down mid-rollout) go too.
        while kept.iter().filter(|k| !outdated(k)).count() > replicas {
            let i = victim(&kept, &count, &|k| !outdated(k)).expect("more up-to-date nodes than replicas");
            remove(&mut kept, i, &mut count);
        }
        let up_to_date = kept.iter().filter(|k| !outdated(k)).count();
        let room = (replicas + d.rollout.max_surge as usize).saturating_sub(kept.len());
        replicas.saturating_sub(up_to_date).min(room)
    } else {
        // Scale down: stopped first, then the busiest host's newest node.
        while kept.len() > replicas {
            let i = victim(&kept, &count, &|_| true).expect("more kept nodes than replicas, so at least one");
            remove(&mut kept, i, &mut count);
        }
        replicas - kept.len()
    };

    for k in kept.iter().filter(|k| !k.running) {
        actions.insert(Action::Start { host: k.host.clone(), node: k.node.clone() });
    }

    // Scale up: the emptiest host, numbers above every one in use.
    let in_use = observed
        .domains
        .iter()
        .map(|dom| &dom.node)
        .chain(observed.overlays.iter().map(|o| &o.node))
        .chain(observed.registered.iter())
        .filter(|n| ours(n))
        .map(|n| n.index);
    let mut next = in_use.max().map_or(0, |m| m.saturating_add(1));
    if !d.hosts.is_empty() {
        for _ in 0..to_make {
            let host = d.hosts.iter().min_by_key(|h| count[h.as_str()]).expect("hosts is not empty");
            *count.get_mut(host.as_str()).expect("every listed host is counted") += 1;
            let node = NodeId::new(d.pool.clone(), next);
            next = next.saturating_add(1);
            actions.insert(Action::Create { host: host.clone(), node, image: d.image });
        }
    }

    // Overlays no kept domain uses on that host; removed domains take theirs along.
    let live: BTreeSet<(&str, &NodeId)> = kept.iter().map(|k| (k.host.as_str(), &k.node)).collect();
    let removed: BTreeSet<(String, NodeId)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Remove { host, node } => Some((host.clone(), node.clone())),
            _ => None,
        })
        .collect();
    for o in observed.overlays.iter().filter(|o| ours(&o.node)) {
        let used = live.contains(&(o.host.as_str(), &o.node)) || removed.contains(&(o.host.clone(), o.node.clone()));
        if !used {
            actions.insert(Action::DeleteOverlay { host: o.host.clone(), node: o.node.clone() });
        }
    }

    // Registered nodes with no kept domain.
    let kept_nodes: BTreeSet<&NodeId> = kept.iter().map(|k| &k.node).collect();
    for n in observed.registered.iter().filter(|n| ours(n)) {
        if !kept_nodes.contains(n) {
            actions.insert(Action::Deregister { node: n.clone() });
        }
    }
}

impl Action {
    /// The node the action is for.
    pub fn node(&self) -> &NodeId {
        match self {
            Action::Deregister { node }
            | Action::Remove { node, .. }
            | Action::DeleteOverlay { node, .. }
            | Action::Start { node, .. }
            | Action::Create { node, .. } => node,
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Deregister { node } => write!(f, "deregister {node}"),
            Action::Remove { host, node } => write!(f, "remove {node} from {host}"),
            Action::DeleteOverlay { host, node } => write!(f, "delete the leftover overlay of {node} on {host}"),
            Action::Start { host, node } => write!(f, "start {node} on {host}"),
            Action::Create { host, node, image: None } => write!(f, "create {node} on {host}"),
            Action::Create { host, node, image: Some(image) } => write!(f, "create {node} on {host} from {image}"),
        }
    }
}

impl Observed {
    /// The state after `actions` have all been carried out (a created node
    /// runs but has not registered yet). The plan made from it is empty.
    pub fn apply(&self, actions: &[Action]) -> Observed {
        let mut next = self.clone();
        for a in actions {
            match a {
                Action::Deregister { node } => {
                    next.registered.retain(|n| n != node);
                    next.ready.retain(|n| n != node);
                }
                Action::Remove { host, node } => {
                    next.registered.retain(|n| n != node);
                    next.ready.retain(|n| n != node);
                    next.domains.retain(|d| !(&d.host == host && &d.node == node));
                    next.overlays.retain(|o| !(&o.host == host && &o.node == node));
                }
                Action::DeleteOverlay { host, node } => next.overlays.retain(|o| !(&o.host == host && &o.node == node)),
                Action::Start { host, node } => {
                    for d in next.domains.iter_mut().filter(|d| &d.host == host && &d.node == node) {
                        d.running = true;
                    }
                }
                Action::Create { host, node, image } => {
                    next.overlays.retain(|o| !(&o.host == host && &o.node == node));
                    next.overlays.push(Overlay { host: host.clone(), node: node.clone() });
                    next.domains.push(HostDomain { host: host.clone(), node: node.clone(), running: true, image: *image });
                }
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "qemu+ssh://a/system";
    const B: &str = "qemu+ssh://b/system";

    fn want(pool: &str, replicas: u32, hosts: &[&str]) -> Desired {
        Desired {
            pool: pool.into(),
            replicas,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            image: None,
            rollout: Rollout::default(),
        }
    }

    fn n(i: u32) -> NodeId {
        NodeId::new("w", i)
    }

    fn dom(host: &str, i: u32, running: bool) -> HostDomain {
        HostDomain { host: host.into(), node: n(i), running, image: None }
    }

    fn overlay(host: &str, i: u32) -> Overlay {
        Overlay { host: host.into(), node: n(i) }
    }

    fn create(host: &str, i: u32) -> Action {
        Action::Create { host: host.into(), node: n(i), image: None }
    }

    fn remove(host: &str, i: u32) -> Action {
        Action::Remove { host: host.into(), node: n(i) }
    }

    /// A cluster with the domains running, their overlays, and registered.
    fn settled(domains: &[(&str, u32)]) -> Observed {
        Observed {
            domains: domains.iter().map(|&(h, i)| dom(h, i, true)).collect(),
            overlays: domains.iter().map(|&(h, i)| overlay(h, i)).collect(),
            registered: domains.iter().map(|&(_, i)| n(i)).collect(),
            ready: domains.iter().map(|&(_, i)| n(i)).collect(),
        }
    }

    /// Every domain has registered and is Ready.
    fn all_ready(o: &mut Observed) {
        for d in &o.domains {
            if !o.registered.contains(&d.node) {
                o.registered.push(d.node.clone());
                o.ready.push(d.node.clone());
            }
        }
    }

    fn digest(s: &str) -> kiln_core::Digest {
        kiln_core::Digest::of(s)
    }

    /// Rolls `observed` to `desired`'s image pass by pass, each new node
    /// Ready before the next pass; checks after every pass that the pool
    /// kept at least `min_ready` Ready nodes and at most `max_total`
    /// nodes, and returns the passes' plans.
    fn roll(desired: &Desired, observed: &mut Observed, min_ready: usize, max_total: usize) -> Vec<Vec<Action>> {
        let mut passes = Vec::new();
        for _ in 0..20 {
            let actions = plan(std::slice::from_ref(desired), observed);
            if actions.is_empty() {
                return passes;
            }
            *observed = observed.apply(&actions);
            let ready = observed.domains.iter().filter(|d| observed.ready.contains(&d.node)).count();
            assert!(ready >= min_ready, "{ready} Ready after {actions:?}");
            assert!(observed.domains.len() <= max_total, "{} nodes after {actions:?}", observed.domains.len());
            assert_eq!(plan(std::slice::from_ref(desired), observed), [], "not idempotent after {actions:?}");
            all_ready(observed);
            passes.push(actions);
        }
        panic!("no end to the rollout: {passes:?}");
    }

    #[test]
    fn a_rollout_replaces_every_node_with_a_ready_one_first() {
        let (old, new) = (digest("one"), digest("two"));
        let mut observed = settled(&[(A, 0), (A, 1), (A, 2)]);
        for d in &mut observed.domains {
            d.image = Some(old);
        }
        let mut d = want("w", 3, &[A]);
        d.image = Some(new);

        // Paused: out-of-date nodes stay.
        d.rollout.paused = true;
        assert_eq!(plan(std::slice::from_ref(&d), &observed), []);
        d.rollout.paused = false;

        // First pass: a new node, nothing removed while it is not Ready.
        let first = plan(std::slice::from_ref(&d), &observed);
        assert_eq!(first, [Action::Create { host: A.into(), node: n(3), image: Some(new) }]);
        let passes = roll(&d, &mut observed, 3, 4);
        assert_eq!(passes.len(), 4, "one node surges at a time: {passes:?}");
        assert!(observed.domains.iter().all(|x| x.image == Some(new)), "{observed:?}");
        assert_eq!(observed.domains.len(), 3);
        assert_eq!(per_host(&observed, A), [3, 4, 5]);

        // Back (undo): the same way.
        d.image = Some(old);
        roll(&d, &mut observed, 3, 4);
        assert!(observed.domains.iter().all(|x| x.image == Some(old)));
    }

    #[test]
    fn max_unavailable_replaces_in_place_and_not_ready_nodes_go_first() {
        let (old, new) = (digest("one"), digest("two"));
        let mut observed = settled(&[(A, 0), (A, 1), (B, 2)]);
        for d in &mut observed.domains {
            d.image = Some(old);
        }
        let mut d = want("w", 3, &[A, B]);
        d.image = Some(new);
        d.rollout = Rollout { max_surge: 0, max_unavailable: 1, paused: false };
        let first = plan(std::slice::from_ref(&d), &observed);
        let kinds: Vec<&str> = first
            .iter()
            .filter_map(|a| match a {
                Action::Remove { .. } => Some("remove"),
                Action::Create { .. } => Some("create"),
                _ => None,
            })
            .collect();
        assert_eq!(kinds, ["remove", "create"], "one out, one in: {first:?}");
        roll(&d, &mut observed, 2, 3);
        assert!(observed.domains.iter().all(|x| x.image == Some(new)));

        // With no room to lose a Ready node, an old node that is not Ready still goes.
        let mut observed = settled(&[(A, 0), (A, 1), (A, 2)]);
        for d in &mut observed.domains {
            d.image = Some(old);
        }
        observed.ready.retain(|n| n.index != 0);
        let mut d = want("w", 3, &[A]);
        d.image = Some(new);
        d.rollout = Rollout { max_surge: 1, max_unavailable: 0, paused: false };
        let first = plan(std::slice::from_ref(&d), &observed);
        assert!(first.contains(&remove(A, 0)) && first.iter().filter(|a| matches!(a, Action::Remove { .. })).count() == 1, "{first:?}");
        assert_eq!(first.iter().filter(|a| matches!(a, Action::Create { .. })).count(), 2, "room for two: {first:?}");
    }

    /// Plans, checks the plan of its own result is empty (also once the new
    /// nodes have registered), and returns the plan and that result.
    fn step(case: &str, desired: &[Desired], observed: &Observed) -> (Vec<Action>, Observed) {
        let actions = plan(desired, observed);
        let mut after = observed.apply(&actions);
        assert_eq!(plan(desired, &after), [], "{case}: not idempotent after {actions:?}");
        all_ready(&mut after);
        assert_eq!(plan(desired, &after), [], "{case}: not idempotent once registered");
        (actions, after)
    }

    fn per_host(o: &Observed, host: &str) -> Vec<u32> {
        let mut v: Vec<u32> = o.domains.iter().filter(|d| d.host == host).map(|d| d.node.index).collect();
        v.sort();
        v
    }

    #[test]
    fn zero_to_three_to_one_across_two_hosts() {
        let hosts = [A, B];
        let (actions, three) = step("0 -> 3", &[want("w", 3, &hosts)], &Observed::default());
        assert_eq!(actions, [create(A, 0), create(A, 2), create(B, 1)], "0 -> 3");
        assert_eq!((per_host(&three, A), per_host(&three, B)), (vec![0, 2], vec![1]));

        let (actions, one) = step("3 -> 1", &[want("w", 1, &hosts)], &three);
        let dereg = |i| Action::Deregister { node: n(i) };
        assert_eq!(actions, [dereg(1), dereg(2), remove(A, 2), remove(B, 1)], "3 -> 1: the busier host's newest, then the newest");
        assert_eq!((per_host(&one, A), per_host(&one, B)), (vec![0], vec![]));
        assert_eq!(one.overlays, [overlay(A, 0)], "overlays go with their domains");
        assert_eq!(one.registered, [n(0)]);

        let (actions, zero) = step("1 -> 0", &[want("w", 0, &hosts)], &one);
        assert_eq!(actions, [Action::Deregister { node: n(0) }, remove(A, 0)]);
        assert_eq!(zero, Observed::default(), "nothing left");

        let (actions, _) = step("0 -> 2 again", &[want("w", 2, &hosts)], &zero);
        assert_eq!(actions, [create(A, 0), create(B, 1)], "numbers start over when nothing holds one");
    }

    #[test]
    fn new_numbers_are_above_every_one_in_use() {
        let o = settled(&[(A, 4)]);
        let (actions, _) = step("scale up", &[want("w", 3, &[A, B])], &o);
        assert_eq!(actions, [create(A, 6), create(B, 5)]);
    }

    #[test]
    fn uneven_existing_spread() {
        let hosts = [A, B];
        let o = settled(&[(A, 0), (A, 1), (A, 2), (A, 3)]);
        let (actions, up) = step("4 on A, 6 wanted", &[want("w", 6, &hosts)], &o);
        assert_eq!(actions, [create(B, 4), create(B, 5)], "new nodes go to the emptier host");
        assert_eq!((per_host(&up, A), per_host(&up, B)), (vec![0, 1, 2, 3], vec![4, 5]));

        let (actions, _) = step("4 on A, 4 wanted", &[want("w", 4, &hosts)], &o);
        assert_eq!(actions, [], "running nodes are not moved only to even the spread");

        let o = settled(&[(A, 0), (A, 1), (A, 2), (B, 3)]);
        let (_, down) = step("3 + 1, 2 wanted", &[want("w", 2, &hosts)], &o);
        assert_eq!((per_host(&down, A), per_host(&down, B)), (vec![0], vec![3]), "the busier host gives its newest first");

        let o = settled(&[(A, 0), (B, 1), (B, 2), (B, 3), (B, 4)]);
        let (actions, _) = step("1 + 4 + 0, 7 wanted", &[want("w", 7, &[A, B, "test:///c"])], &o);
        assert_eq!(
            actions,
            [create(A, 6), Action::Create { host: "test:///c".into(), node: n(5), image: None }],
            "emptiest first, then list order"
        );
    }

    #[test]
    fn leftovers_of_a_crashed_scale() {
        let hosts = [A, B];
        // Crashed mid-way through 0 -> 4: node 0 done, node 1 defined but not
        // started, node 2's overlay made but no domain, node 3 not begun.
        // And from an earlier crashed 1 -> 0 of node 7: domain gone, its
        // overlay on B and its registration left.
        let o = Observed {
            domains: vec![dom(A, 0, true), dom(B, 1, false)],
            overlays: vec![overlay(A, 0), overlay(B, 1), overlay(A, 2), overlay(B, 7)],
            registered: vec![n(0), n(7)],
            ready: vec![n(0), n(7)],
        };
        let (actions, after) = step("crashed 0 -> 4", &[want("w", 4, &hosts)], &o);
        assert_eq!(
            actions,
            [
                Action::Deregister { node: n(7) },
                Action::DeleteOverlay { host: A.into(), node: n(2) },
                Action::DeleteOverlay { host: B.into(), node: n(7) },
                Action::Start { host: B.into(), node: n(1) },
                create(A, 8),
                create(B, 9),
            ]
        );
        assert_eq!(after.domains.len(), 4);
        assert!(after.domains.iter().all(|d| d.running));
        let mut overlays: Vec<u32> = after.overlays.iter().map(|o| o.node.index).collect();
        overlays.sort();
        assert_eq!(overlays, [0, 1, 8, 9], "no leaked disk");

        // Scaling down removes a stopped node before any running one.
        let (actions, _) = step("stopped first", &[want("w", 1, &hosts)], &o);
        assert!(actions.contains(&remove(B, 1)), "{actions:?}");
        assert!(!actions.contains(&remove(A, 0)), "{actions:?}");
    }

    #[test]
    fn copies_and_strays_are_removed() {
        // Node 0 on both hosts (a crashed move), node 1 on a host the pool dropped.
        let o = Observed {
            domains: vec![dom(A, 0, false), dom(B, 0, true), dom("test:///old", 1, true)],
            overlays: vec![overlay(A, 0), overlay(B, 0), Overlay { host: "test:///old".into(), node: n(1) }],
            registered: vec![n(0), n(1)],
            ready: vec![],
        };
        let (actions, after) = step("copies", &[want("w", 2, &[A, B])], &o);
        assert_eq!(
            actions,
            [Action::Deregister { node: n(1) }, remove(A, 0), Action::Remove { host: "test:///old".into(), node: n(1) }, create(A, 2),],
            "the running copy stays"
        );
        assert_eq!((per_host(&after, A), per_host(&after, B)), (vec![2], vec![0]));
    }

    #[test]
    fn other_pools_are_left_alone() {
        let other = NodeId::new("other", 0);
        let o = Observed {
            domains: vec![HostDomain { host: A.into(), node: other.clone(), running: false, image: None }],
            overlays: vec![Overlay { host: A.into(), node: NodeId::new("other", 1) }],
            registered: vec![NodeId::new("other", 2)],
            ready: vec![],
        };
        let (actions, _) = step("other pool", &[want("w", 1, &[A])], &o);
        assert_eq!(actions, [create(A, 0)], "numbers are per pool, and nothing of `other` is touched");
        assert_eq!(plan(&[], &o), [], "no desired pools: nothing to do");
    }

    #[test]
    fn spread_stays_even_from_empty() {
        let hosts = [A, B, "test:///c"];
        let mut o = Observed::default();
        for replicas in [5, 2, 7, 7, 0, 4, 1, 6] {
            let case = format!("-> {replicas}");
            (_, o) = step(&case, &[want("w", replicas, &hosts)], &o);
            let counts: Vec<usize> = hosts.iter().map(|h| per_host(&o, h).len()).collect();
            assert_eq!(counts.iter().sum::<usize>(), replicas as usize, "{case}");
            let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(hi - lo <= 1, "{case}: {counts:?}");
        }
    }
}
