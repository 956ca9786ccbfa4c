//! The node registry: registration (idempotent by machine id), subnet
//! leases, token checks, heartbeats, leaving, and the revision that the
//! peers watch waits on.
//!
//! Leases follow flannel: the pod network (default `10.244.0.0/16`) is cut
//! into subnets of one length (default /24); a node gets the lowest free one
//! from the second on (flannel's `SubnetMin`), keeps it while it is
//! registered, gets the same one back when it registers again, and releases
//! it when it leaves. A registration is written to the store whole (node,
//! token hash and lease together) before it is answered, so a crash never
//! leaves half a lease.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

pub use kiln_core::NetworkConfig;
use kiln_core::{Backend, Ipv4Cidr, Lease, Node, NodeState, Peer, Peers, RegisterRequest};
use time::OffsetDateTime;

use crate::store::{self, Change, NodeRecord, Renewal, Store};
use crate::token;

mod peer_log;

/// Seconds between heartbeats that the registry asks agents for.
pub const HEARTBEAT_INTERVAL_SECS: u64 = 10;

/// A node not seen for this long (three heartbeats) no longer holds its
/// machine id against another key: a diskless node that rebooted with a
/// new key joins again by itself, while a copy of a live node is refused.
pub const HELD_WHILE_SEEN_WITHIN: std::time::Duration = std::time::Duration::from_secs(3 * HEARTBEAT_INTERVAL_SECS);

/// Machines kept pending at most: a registration with no token beyond it
/// is refused (429) until an operator approves or deletes some, or they
/// go quiet for [`PENDING_TTL`].
pub const MAX_PENDING: usize = 256;

/// A pending machine not heard from for this long is forgotten (a pending
/// agent registers again every [`PENDING_POLL_SECS`]).
pub const PENDING_TTL: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Seconds between the registrations of a pending agent, waiting for approval.
pub const PENDING_POLL_SECS: u64 = 5;

/// How long a node may go unheard before it is NotReady, and before it is
/// removed: Kubernetes' node lifecycle and flannel's lease TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    /// No heartbeat for longer than this: NotReady (`--node-grace`;
    /// Kubernetes' node-monitor grace period, 40 s).
    pub grace: std::time::Duration,
    /// No heartbeat for this long: the node is removed and its subnet
    /// released (`--lease-ttl`; flannel's subnet lease TTL, 24 h).
    pub lease_ttl: std::time::Duration,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle { grace: std::time::Duration::from_secs(40), lease_ttl: std::time::Duration::from_secs(24 * 3600) }
    }
}

/// What vouches for a registration.
#[derive(Clone)]
pub enum Admission {
    /// Its caller vouches for it as a join token would (the API never
    /// does: it spends the token with the write, [`Admission::Spending`];
    /// this is [`Registry::register`]'s, for in-process callers and tests):
    /// the machine joins, and may take a machine id over from a node with
    /// another key that has gone quiet.
    Token,
    /// As [`Admission::Token`], the use spent in the write that records the
    /// node ([`Store::put_spending`]): a token that no longer admits it
    /// there is [`Error::Refused`], and nothing is written.
    Spending(store::Spend),
    /// Nothing: the node this machine id names must hold this key (a node
    /// registering again, pending or not). A machine id nobody holds is
    /// recorded as pending, or joins at once with `auto_approve`.
    Unvouched {
        /// `--auto-approve`.
        auto_approve: bool,
    },
}

/// Registering failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store could not record it.
    #[error("registry store")]
    Store(#[from] store::Error),
    /// Every subnet of the pod network is leased.
    #[error("address space exhausted: all {count} /{len} subnets of {network} are leased")]
    Exhausted {
        /// The pod network.
        network: Ipv4Cidr,
        /// Subnet length.
        len: u8,
        /// How many subnets it has.
        count: u64,
    },
    /// A node asked for a lease without an IPv4 address to carry VXLAN.
    #[error("node {0} has no IPv4 address for VXLAN (send public_ip)")]
    NoPublicIp(String),
    /// [`MAX_PENDING`] machines wait for approval already.
    #[error("{0} machines are pending approval already; approve or delete some (kiln nodes), or join with a token")]
    TooManyPending(usize),
    /// The join token did not admit the registration when it was written.
    #[error(transparent)]
    Refused(crate::join_tokens::Refused),
    /// Another live node's lease carries VXLAN to the same public IP: the
    /// two could not reach each other (machines behind one NAT, such as
    /// QEMU user networking's 10.0.2.15).
    #[error(
        "public IP {public_ip} is node {name}'s, which is alive: two nodes on one address cannot carry the overlay (QEMU user networking gives every guest 10.0.2.15; put the nodes on a network where each has its own address)"
    )]
    PublicIpTaken {
        /// The address.
        public_ip: IpAddr,
        /// The node that holds it.
        name: String,
    },
    /// The same machine is registering on another connection right now.
    #[error("machine {0} is already registering; retry")]
    Busy(String),
    /// The machine id is held by a live node with another key: a copy of
    /// the machine, or a reinstalled one (`kiln nodes delete NAME` frees it
    /// at once; it is free by itself once the node has not been seen for
    /// [`HELD_WHILE_SEEN_WITHIN`]).
    #[error(
        "machine id {machine_id} is node {name}'s, which proves itself with another key and is alive; nothing changed (a reinstalled machine: kiln nodes delete {name})"
    )]
    Held {
        /// The machine id.
        machine_id: String,
        /// The node that holds it.
        name: String,
    },
}

/// What a heartbeat or leave found for a token.
#[derive(Debug)]
pub enum TokenCheck {
    /// The token is this node's (its name).
    Ok(String),
    /// The token belongs to no node: 401.
    Unknown,
    /// The token belongs to another node: 403.
    OtherNode(String),
    /// The token is this node's, but the node proves itself with its
    /// client certificate: a token alone is not enough (401).
    NeedsCertificate(String),
}

/// What a node's client certificate found in the registry.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyCheck {
    /// The node exists and its key is the certificate's.
    Ok,
    /// No such node: it left or was deleted (401).
    Unknown,
    /// The node registered since with another key (401).
    OtherKey,
}

/// What the registry holds in memory, indexed so that a registration, a
/// heartbeat or a lease change costs the same whatever the cluster's size.
struct State {
    nodes: BTreeMap<String, NodeRecord>,
    /// Token hash → node name.
    tokens: HashMap<String, String>,
    /// Machine id, lower-case → node name.
    by_machine: HashMap<String, String>,
    /// Subnet → the node that holds it.
    by_subnet: HashMap<Ipv4Cidr, String>,
    /// Nodes waiting for approval.
    pending: usize,
    /// Every subnet index below this one is held by a node or a foreign
    /// lease: where the search for a free subnet starts.
    free_from: u64,
    /// The pod network and subnet length, to index subnets.
    network: NetworkConfig,
    /// What changed for the peers watch.
    log: peer_log::PeerLog,
    /// Registrations being written: name → (machine id, subnet, public
    /// IP of a lease). Their names, subnets and public IPs are taken for
    /// everyone else meanwhile.
    in_flight: BTreeMap<String, (String, Option<Ipv4Cidr>, Option<IpAddr>)>,
    /// Leases in the store that are not kiln's nodes (a flanneld's).
    foreign: BTreeMap<Ipv4Cidr, Peer>,
    /// The connectivity check the nodes are asked to take part in.
    check: Option<kiln_core::CheckRound>,
    /// Public IP of a lease → the nodes whose lease carries it (one, but
    /// for a NotReady holder's replacement).
    by_public_ip: HashMap<IpAddr, Vec<String>>,
    /// Nodes another server sharing the store heard from within the grace
    /// period ([`Change::Alive`]): Ready here too.
    alive: std::collections::HashSet<String>,
    /// When this registry was opened. A node's silence counts from then at
    /// the earliest ([`State::silent_since`]).
    opened: OffsetDateTime,
}

impl State {
    fn new(network: NetworkConfig, revision: u64) -> Self {
        State {
            nodes: BTreeMap::new(),
            tokens: HashMap::new(),
            by_machine: HashMap::new(),
            by_subnet: HashMap::new(),
            pending: 0,
            free_from: 1,
            network,
            log: peer_log::PeerLog::new(revision, peer_log::HISTORY),
            in_flight: BTreeMap::new(),
            foreign: BTreeMap::new(),
            check: None,
            by_public_ip: HashMap::new(),
            alive: Default::default(),
            opened: OffsetDateTime::now_utc(),
        }
    }

    /// Since when `node` counts as silent: its `last_seen`, but not before
    /// this registry opened. The store has a heartbeat a minute apart at
    /// most ([`store::RENEW_EVERY`]), and a server that was down heard
    /// nothing: as Kubernetes' node controller, a restarted server gives
    /// every node its grace period again rather than take a live node for
    /// a silent one (and let another machine take its machine id or its
    /// public IP).
    fn silent_since(&self, node: &Node) -> OffsetDateTime {
        node.last_seen.max(self.opened)
    }

    /// Adds or replaces the record of `record.node.name`; its lease
    /// replaces a foreign one on the same subnet.
    fn insert(&mut self, record: NodeRecord) {
        let old = self.nodes.get(&record.node.name).and_then(|r| r.node.subnet);
        let touched: Vec<Ipv4Cidr> = old.into_iter().chain(record.node.subnet).collect();
        self.logged(&touched, |st| {
            st.unindex(&record.node.name);
            if let Some(subnet) = record.node.subnet {
                st.foreign.remove(&subnet);
                st.by_subnet.insert(subnet, record.node.name.clone());
                if let Some(ip) = record.node.public_ip {
                    st.by_public_ip.entry(ip).or_default().push(record.node.name.clone());
                }
            }
            st.by_machine.insert(record.node.machine_id.to_ascii_lowercase(), record.node.name.clone());
            st.pending += usize::from(record.node.pending);
            st.tokens.insert(record.token_sha256.clone(), record.node.name.clone());
            st.nodes.insert(record.node.name.clone(), record);
        });
    }

    fn remove(&mut self, name: &str) -> Option<NodeRecord> {
        let subnet = self.nodes.get(name)?.node.subnet;
        let mut removed = None;
        self.logged(&Vec::from_iter(subnet), |st| removed = st.unindex(name));
        removed
    }

    fn insert_foreign(&mut self, peer: Peer) {
        self.logged(&[peer.subnet], |st| {
            st.foreign.insert(peer.subnet, peer);
        });
    }

    fn remove_foreign(&mut self, subnet: Ipv4Cidr) -> Option<Peer> {
        let mut removed = None;
        self.logged(&[subnet], |st| removed = st.foreign.remove(&subnet));
        removed
    }

    /// Takes the record of `name` out of the maps and indexes (no log).
    fn unindex(&mut self, name: &str) -> Option<NodeRecord> {
        let record = self.nodes.remove(name)?;
        self.tokens.remove(&record.token_sha256);
        let machine = record.node.machine_id.to_ascii_lowercase();
        if self.by_machine.get(&machine).is_some_and(|n| n == name) {
            self.by_machine.remove(&machine);
        }
        self.pending -= usize::from(record.node.pending);
        if let Some(subnet) = record.node.subnet
            && self.by_subnet.get(&subnet).is_some_and(|n| n == name)
        {
            self.by_subnet.remove(&subnet);
        }
        if let Some(ip) = record.node.public_ip
            && let Some(names) = self.by_public_ip.get_mut(&ip)
        {
            names.retain(|n| n != name);
            if names.is_empty() {
                self.by_public_ip.remove(&ip);
            }
        }
        Some(record)
    }

    /// Runs `change` and logs what it did to the peers at `subnets` (a
    /// subnet freed lowers where the search for a free one starts).
    fn logged(&mut self, subnets: &[Ipv4Cidr], change: impl FnOnce(&mut Self)) {
        let before: Vec<Option<Peer>> = subnets.iter().map(|s| self.peer_at(*s)).collect();
        change(self);
        for (subnet, before) in subnets.iter().zip(before) {
            let after = self.peer_at(*subnet);
            if after != before {
                self.log.push(match after {
                    Some(peer) => peer_log::Event::Put(peer),
                    None => peer_log::Event::Left(*subnet),
                });
            }
            if !self.subnet_held(*subnet)
                && let Some(i) = self.index_of(*subnet)
            {
                self.free_from = self.free_from.min(i);
            }
        }
    }

    /// The peer the watch lists at `subnet`: a node's complete lease, or
    /// a foreign one with a VTEP MAC.
    fn peer_at(&self, subnet: Ipv4Cidr) -> Option<Peer> {
        if let Some(n) = self.by_subnet.get(&subnet).and_then(|name| self.nodes.get(name)).map(|r| &r.node) {
            return Some(Peer { name: n.name.clone(), subnet, public_ip: n.public_ip?, vtep_mac: n.vtep_mac? });
        }
        self.foreign.get(&subnet).filter(|p| p.vtep_mac.0 != [0; 6]).cloned()
    }

    /// Whether a node or a foreign lease holds `subnet`.
    fn subnet_held(&self, subnet: Ipv4Cidr) -> bool {
        self.by_subnet.contains_key(&subnet) || self.foreign.contains_key(&subnet)
    }

    /// `subnet`'s index in the pod network, if it is one of its subnets.
    fn index_of(&self, subnet: Ipv4Cidr) -> Option<u64> {
        let net = self.network.network;
        (subnet.prefix == self.network.subnet_len && net.contains(&subnet))
            .then(|| u64::from(u32::from(subnet.addr) - u32::from(net.addr)) >> (32 - u32::from(subnet.prefix)))
    }

    /// The node of `machine_id` (any case).
    fn by_machine(&self, machine_id: &str) -> Option<&NodeRecord> {
        self.by_machine.get(&machine_id.to_ascii_lowercase()).and_then(|name| self.nodes.get(name))
    }

    fn by_token(&self, node_token: &str) -> Option<&NodeRecord> {
        self.tokens.get(&token::hash(node_token)).and_then(|name| self.nodes.get(name))
    }
}

/// Takes a registration's name and subnet off `in_flight` when it ends,
/// also when the request is dropped half way.
struct InFlightGuard<'a> {
    registry: &'a Registry,
    name: String,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.registry.state.lock().expect("registry lock").in_flight.remove(&self.name);
    }
}

/// The registry: the records in memory, written through to the store.
pub struct Registry {
    store: Arc<dyn Store>,
    network: NetworkConfig,
    state: Mutex<State>,
    revision: tokio::sync::watch::Sender<u64>,
    /// Names this run's revisions ([`Peers::epoch`]): random at each start.
    epoch: u64,
    /// The peers watch's answers as JSON at one revision, by the revision
    /// they answer from (`u64::MAX`: the whole list): a join answers every
    /// watching agent at once, and those at the same revision all get the
    /// same bytes, made once.
    peers_json: Mutex<(u64, HashMap<u64, bytes::Bytes>)>,
    /// Which pool a registering node belongs to, by its hostname (set by
    /// the pools, whose nodes are named `kiln-<pool>-<n>`).
    pool_of: std::sync::OnceLock<PoolOf>,
    /// [`HELD_WHILE_SEEN_WITHIN`] in milliseconds (shorter in tests).
    held_within: std::sync::atomic::AtomicU64,
    /// When a node is NotReady, and when it is removed.
    lifecycle: Mutex<Lifecycle>,
}

/// `node`'s state at `now`, heard from here or (in `st.alive`) by another server.
fn state_in(st: &State, node: &Node, now: OffsetDateTime, grace: std::time::Duration) -> NodeState {
    match node.state_at(now, grace) {
        NodeState::NotReady if st.alive.contains(&node.name) || now - st.silent_since(node) <= grace => NodeState::Ready,
        state => state,
    }
}

/// A node's pool from its hostname.
pub type PoolOf = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

impl Registry {
    /// A registry over `store`, loaded from it, leasing from `network`.
    /// A store that others write to (etcd) is watched from here on; call
    /// from inside a tokio runtime.
    pub async fn open(store: Arc<dyn Store>, network: NetworkConfig) -> Result<Arc<Self>, store::Error> {
        let loaded = store.load().await?;
        let mut state = State::new(network, 1);
        for record in loaded.records {
            state.insert(record);
        }
        for peer in loaded.foreign {
            state.insert_foreign(peer);
        }
        state.alive = loaded.alive.into_iter().collect();
        state.log.seal(1);
        let (revision, _) = tokio::sync::watch::channel(1);
        let changes = store.watch();
        let registry = Arc::new(Registry {
            store,
            network,
            state: Mutex::new(state),
            revision,
            epoch: rand::random::<u64>() >> 11,
            peers_json: Mutex::new((0, HashMap::new())),
            pool_of: std::sync::OnceLock::new(),
            held_within: std::sync::atomic::AtomicU64::new(HELD_WHILE_SEEN_WITHIN.as_secs() * 1000),
            lifecycle: Mutex::new(Lifecycle::default()),
        });
        if let Some(mut changes) = changes {
            let weak = Arc::downgrade(&registry);
            tokio::spawn(async move {
                while let Some(change) = changes.recv().await {
                    let Some(registry) = weak.upgrade() else { return };
                    registry.apply(change).await;
                }
            });
        }
        Ok(registry)
    }

    /// The store, for what else the control plane keeps (pool replicas).
    pub fn store_handle(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The pool a node with `hostname` belongs to, if any: what a join
    /// token scoped to a pool is checked against.
    pub fn pool_for(&self, hostname: &str) -> Option<String> {
        self.pool_of.get().and_then(|f| f(hostname))
    }

    /// How long a node holds its machine id against another key after it
    /// was last seen ([`HELD_WHILE_SEEN_WITHIN`]; tests shorten it).
    pub fn set_held_within(&self, within: std::time::Duration) {
        self.held_within.store(u64::try_from(within.as_millis()).unwrap_or(u64::MAX), std::sync::atomic::Ordering::Relaxed);
    }

    /// Announces `round` of a connectivity check to the nodes (in the peers
    /// watch; `None`: no check), waking every watcher.
    pub fn set_check(&self, round: Option<kiln_core::CheckRound>) {
        let mut st = self.state.lock().expect("registry lock");
        st.check = round;
        self.publish(&mut st, true);
    }

    /// Sets when a node is NotReady and when it is removed.
    pub fn set_lifecycle(&self, lifecycle: Lifecycle) {
        *self.lifecycle.lock().expect("lifecycle lock") = lifecycle;
        self.store.set_lease_ttl(lifecycle.lease_ttl);
    }

    /// Writes the `last_seen` that heartbeats left in memory only
    /// ([`Store::settle`]): for a server that stops.
    pub async fn settle(&self) -> Result<(), store::Error> {
        let records: Vec<NodeRecord> = self.state.lock().expect("registry lock").nodes.values().cloned().collect();
        self.store.settle(records).await
    }

    /// When a node is NotReady and when it is removed.
    pub fn lifecycle(&self) -> Lifecycle {
        *self.lifecycle.lock().expect("lifecycle lock")
    }

    /// `node`'s state now: [`Node::state_at`] with [`Lifecycle::grace`],
    /// but Ready when another server on the store heard from it within
    /// the grace period; its silence counts from this registry's start at
    /// the earliest.
    pub fn state_of(&self, node: &Node) -> NodeState {
        let grace = self.lifecycle().grace;
        state_in(&self.state.lock().expect("registry lock"), node, OffsetDateTime::now_utc(), grace)
    }

    /// Sets how a registering node's pool is found from its hostname (once).
    pub fn set_pool_of(&self, pool_of: PoolOf) {
        let _ = self.pool_of.set(pool_of);
    }

    /// Removes the node `name` and releases its lease: the node leaving, a
    /// pool scaling it away, an operator deleting it. Returns the node, or
    /// `None` when there was none.
    pub async fn remove(&self, name: &str) -> Result<Option<Node>, store::Error> {
        let Some(record) = self.state.lock().expect("registry lock").nodes.get(name).cloned() else { return Ok(None) };
        self.store.remove(record.clone()).await?;
        let mut st = self.state.lock().expect("registry lock");
        // Unless it registered again meanwhile.
        if st.nodes.get(&record.node.name).is_some_and(|r| r.token_sha256 == record.token_sha256) {
            st.remove(&record.node.name);
        }
        self.publish(&mut st, false);
        Ok(Some(record.node))
    }

    /// The pod network the registry leases from.
    pub fn network(&self) -> NetworkConfig {
        self.network
    }

    /// What backs it, for logs.
    pub fn store(&self) -> String {
        self.store.describe()
    }

    /// Gives the changes `st` logged the next revision, waking every
    /// watcher; with `always`, moves the revision even with none (the
    /// check round changed).
    fn publish(&self, st: &mut State, always: bool) {
        if !always && !st.log.has_unsealed() {
            return;
        }
        let next = *self.revision.borrow() + 1;
        st.log.seal(next);
        self.revision.send_replace(next);
    }

    /// A change another writer made to the store.
    async fn apply(&self, change: Change) {
        let mut expired = None;
        {
            let mut st = self.state.lock().expect("registry lock");
            match change {
                Change::NodePut(record) => {
                    if st.nodes.get(&record.node.name) == Some(&*record) {
                        return;
                    }
                    st.insert(*record);
                }
                Change::NodeDeleted(name) => {
                    if st.remove(&name).is_none() {
                        return;
                    }
                }
                Change::LeasePut(peer) => {
                    let ours = st.by_subnet.contains_key(&peer.subnet) || st.in_flight.values().any(|(_, s, _)| *s == Some(peer.subnet));
                    if ours || st.foreign.get(&peer.subnet) == Some(&peer) {
                        return;
                    }
                    tracing::info!(subnet = %peer.subnet, public_ip = %peer.public_ip, "foreign lease (flanneld) joined");
                    st.insert_foreign(peer);
                }
                Change::Alive { name, live } => {
                    // Readiness only: the peers do not change.
                    match live {
                        true => st.alive.insert(name),
                        false => st.alive.remove(&name),
                    };
                    return;
                }
                Change::LeaseDeleted(subnet) => {
                    if st.remove_foreign(subnet).is_none() {
                        let Some(name) = st.by_subnet.get(&subnet).cloned() else { return };
                        expired = st.remove(&name);
                    }
                }
            }
            self.publish(&mut st, false);
        }
        if let Some(record) = expired {
            tracing::warn!(node = ?record.node.name, subnet = ?record.node.subnet, "lease expired; node removed");
            if let Err(e) = self.store.remove(record).await {
                tracing::error!("registry store: removing an expired node: {e}");
            }
        }
    }

    /// Registers a node, or registers it again: the same machine id keeps
    /// its name, first registration time and subnet; its facts are updated,
    /// and it gets a fresh token (the old one stops working). A node that
    /// sends a VTEP MAC gets a lease. Returns the node, the token (kept
    /// nowhere but in the answer) and the lease. Nothing is visible to
    /// others until the store has it.
    pub async fn register(&self, req: &RegisterRequest) -> Result<(Node, String, Option<Lease>), Error> {
        self.register_with(req, None, Admission::Token).await
    }

    /// [`Registry::register`] for a node that proves itself with the key
    /// whose SubjectPublicKeyInfo's sha256 is `key` (hex), admitted as
    /// `admission` says. A machine id held by a node with a key is its
    /// key's: any other key, or none, is refused ([`Error::Held`]) and
    /// nothing changes. A pending node ([`Node::pending`]) gets no lease.
    pub async fn register_with(
        &self,
        req: &RegisterRequest,
        key: Option<&str>,
        admission: Admission,
    ) -> Result<(Node, String, Option<Lease>), Error> {
        // Lower-case: an upper-case spelling is the same machine. Records
        // stored before ids were normalised are matched in any case.
        let machine_id = req.machine_key();
        let public_ip = req.public_ip.or_else(|| req.addresses.iter().find(|a| a.is_ipv4()).copied());
        let mut refused = std::collections::BTreeSet::new();
        loop {
            let now = OffsetDateTime::now_utc();
            let token = token::generate();
            let (record, fresh, _guard) = {
                let mut st = self.state.lock().expect("registry lock");
                if st.in_flight.values().any(|(m, _, _)| *m == machine_id) {
                    return Err(Error::Busy(machine_id));
                }
                let held = st.by_machine(&machine_id);
                let existing_key = held.and_then(|r| r.key_sha256.clone());
                let existing = held.map(|r| r.node.clone());
                let pending = self.admit(&st, held, key, &admission, now)?;
                let name = match &existing {
                    Some(n) => n.name.clone(),
                    None => unique_name(&st, &req.hostname, &machine_id),
                };
                let kept = existing.as_ref().and_then(|n| n.subnet).filter(|s| self.network.network.contains(s));
                let subnet = match req.vtep_mac.filter(|_| !pending) {
                    None => None,
                    Some(_) => {
                        if !matches!(public_ip, Some(IpAddr::V4(_))) {
                            return Err(Error::NoPublicIp(name));
                        }
                        match kept {
                            Some(kept) => Some(kept),
                            None => Some(self.free_subnet(&mut st, &refused)?),
                        }
                    }
                };
                if subnet.is_some()
                    && let Some(ip) = public_ip
                    && let Some(holder) = self.public_ip_holder(&st, &name, ip, now)
                {
                    return Err(Error::PublicIpTaken { public_ip: ip, name: holder });
                }
                st.in_flight.insert(name.clone(), (machine_id.clone(), subnet, subnet.and(public_ip)));
                let record = NodeRecord {
                    node: Node {
                        name: name.clone(),
                        machine_id: machine_id.clone(),
                        hostname: req.hostname.clone(),
                        macs: req.macs.clone(),
                        addresses: req.addresses.clone(),
                        cpus: req.cpus,
                        memory_bytes: req.memory_bytes,
                        kernel: req.kernel.clone(),
                        agent_version: req.agent_version.clone(),
                        image_digest: req.image_digest.clone(),
                        metrics: req.metrics.clone(),
                        pool: existing.as_ref().and_then(|n| n.pool.clone()).or_else(|| self.pool_of.get().and_then(|f| f(&req.hostname))),
                        host: None,
                        out_of_date: None,
                        subnet,
                        public_ip: subnet.and(public_ip),
                        vtep_mac: subnet.and(req.vtep_mac),
                        registered_at: existing.as_ref().map_or(now, |n| n.registered_at),
                        last_seen: now,
                        pending,
                        state: None,
                    },
                    token_sha256: token::hash(&token),
                    key_sha256: key.map(str::to_string).or(existing_key),
                };
                let fresh = subnet.is_some() && subnet != kept;
                (record, fresh, InFlightGuard { registry: self, name })
            };
            let written = match &admission {
                Admission::Spending(spend) => match self.store.put_spending(record.clone(), fresh, spend.clone()).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(refused)) => return Err(Error::Refused(refused)),
                    Err(e) => Err(e),
                },
                _ => self.store.put(record.clone(), fresh).await,
            };
            match written {
                Ok(()) => {}
                Err(store::Error::Taken(subnet)) => {
                    // Someone else on the same etcd took it first: choose again.
                    tracing::info!(subnet = %subnet, "subnet taken by another writer; choosing another");
                    refused.insert(subnet);
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            let node = record.node.clone();
            let mut st = self.state.lock().expect("registry lock");
            st.insert(record);
            self.publish(&mut st, false);
            drop(st);
            let lease = node.subnet.map(|subnet| Lease {
                network: self.network.network,
                subnet,
                mtu: req.uplink_mtu.unwrap_or(1500).saturating_sub(50),
                vni: self.network.vni,
                backend: Backend::Vxlan,
            });
            return Ok((node, token, lease));
        }
    }

    /// Whether a registration of the machine `held` names (if any) with
    /// `key` may go on, and if so whether its node is pending.
    fn admit(
        &self,
        st: &State,
        held: Option<&NodeRecord>,
        key: Option<&str>,
        admission: &Admission,
        now: OffsetDateTime,
    ) -> Result<bool, Error> {
        let by_token = matches!(admission, Admission::Token | Admission::Spending(_));
        let Some(held) = held else {
            return match admission {
                Admission::Token | Admission::Spending(_) | Admission::Unvouched { auto_approve: true } => Ok(false),
                Admission::Unvouched { auto_approve: false } => {
                    if st.pending >= MAX_PENDING {
                        Err(Error::TooManyPending(st.pending))
                    } else {
                        Ok(true)
                    }
                }
            };
        };
        let node = &held.node;
        let same_key = held.key_sha256.as_deref() == key;
        let silent = now - st.silent_since(node);
        let within = self.held_within.load(std::sync::atomic::Ordering::Relaxed);
        let quiet = silent >= time::Duration::milliseconds(i64::try_from(within).unwrap_or(i64::MAX));
        let refuse = || Error::Held { machine_id: node.machine_id.clone(), name: node.name.clone() };
        match admission {
            // Its own node again (with its key; over plain HTTP, keyless).
            _ if same_key => Ok(node.pending && !by_token),
            // A token takes over a keyless record, or a keyed one gone quiet.
            _ if by_token && (held.key_sha256.is_none() || quiet) => {
                tracing::warn!(node = ?node.name, machine_id = ?node.machine_id, silent_secs = silent.whole_seconds(), "machine id re-keyed by a join token");
                Ok(false)
            }
            // Nothing but a pending record gone quiet is taken over without a token.
            Admission::Unvouched { .. } if node.pending && quiet => Ok(true),
            _ => Err(refuse()),
        }
    }

    /// The node other than `name` whose lease carries VXLAN to `ip` and that
    /// is alive (Ready at `now`), or that is registering with it right now.
    /// Two leases on one address would send both subnets' traffic to one
    /// machine: as on QEMU user networking, where every guest is 10.0.2.15.
    fn public_ip_holder(&self, st: &State, name: &str, ip: IpAddr, now: OffsetDateTime) -> Option<String> {
        let grace = self.lifecycle().grace;
        let holders = st.by_public_ip.get(&ip).into_iter().flatten().filter(|n| n.as_str() != name);
        let live = holders.filter_map(|n| st.nodes.get(n)).find(|r| state_in(st, &r.node, now, grace) == NodeState::Ready);
        live.map(|r| r.node.name.clone())
            .or_else(|| st.in_flight.iter().find(|(n, (_, _, held))| n.as_str() != name && *held == Some(ip)).map(|(n, _)| n.clone()))
    }

    /// Whether the node with `machine_id` is approved and holds `key`: its
    /// registration again needs no token.
    pub fn is_holder(&self, machine_id: &str, key: Option<&str>) -> bool {
        let Some(key) = key else { return false };
        let st = self.state.lock().expect("registry lock");
        st.by_machine(machine_id).is_some_and(|r| !r.node.pending && r.key_sha256.as_deref() == Some(key))
    }

    /// Approves the pending node `name`: its next registration gets its
    /// lease and certificate. `None` for no such node; the node and whether
    /// it was pending.
    pub async fn approve(&self, name: &str) -> Result<Option<(Node, bool)>, store::Error> {
        let Some(mut record) = self.state.lock().expect("registry lock").nodes.get(name).cloned() else { return Ok(None) };
        if !record.node.pending {
            return Ok(Some((record.node, false)));
        }
        record.node.pending = false;
        self.store.put(record.clone(), false).await?;
        let mut st = self.state.lock().expect("registry lock");
        // Unless it registered again meanwhile.
        if st.nodes.get(name).is_some_and(|r| r.token_sha256 == record.token_sha256) {
            st.insert(record.clone());
            self.publish(&mut st, false);
        }
        Ok(Some((record.node, true)))
    }

    /// Forgets pending machines not heard from for `ttl`. Returns their names.
    pub async fn sweep_pending(&self, ttl: std::time::Duration) -> Result<Vec<String>, store::Error> {
        Ok(self.remove_silent(true, ttl).await?.into_iter().map(|n| n.name).collect())
    }

    /// Removes the approved nodes not heard from for [`Lifecycle::lease_ttl`]
    /// and releases their subnets, on any store (on etcd their leases
    /// expire by themselves as well). Returns their names.
    pub async fn expire(&self) -> Result<Vec<String>, store::Error> {
        let mut removed = Vec::new();
        for node in self.remove_silent(false, self.lifecycle().lease_ttl).await? {
            tracing::warn!(node = ?node.name, subnet = %node.subnet.map(|s| s.to_string()).unwrap_or_default(), "not heard from for the lease TTL; node removed, subnet released");
            removed.push(node.name);
        }
        Ok(removed)
    }

    /// Removes the nodes, pending or approved as `pending` says, not heard
    /// from for `silent`; a node heard from meanwhile is kept.
    async fn remove_silent(&self, pending: bool, silent: std::time::Duration) -> Result<Vec<Node>, store::Error> {
        let cutoff = OffsetDateTime::now_utc() - silent;
        let quiet = |st: &State, r: &NodeRecord| r.node.pending == pending && st.silent_since(&r.node) < cutoff;
        let stale: Vec<String> = {
            let st = self.state.lock().expect("registry lock");
            st.nodes.values().filter(|r| quiet(&st, r)).map(|r| r.node.name.clone()).collect()
        };
        let mut removed = Vec::new();
        for name in stale {
            let still = {
                let st = self.state.lock().expect("registry lock");
                st.nodes.get(&name).is_some_and(|r| quiet(&st, r))
            };
            if !still {
                continue;
            }
            removed.extend(self.remove(&name).await?);
        }
        Ok(removed)
    }

    /// The lowest subnet, from the second on, that no node, registration in
    /// flight or foreign lease holds. The search starts at the lowest index
    /// that may be free ([`State::free_from`]): a wave of joins costs each
    /// one a step, not a scan of every lease.
    fn free_subnet(&self, st: &mut State, refused: &std::collections::BTreeSet<Ipv4Cidr>) -> Result<Ipv4Cidr, Error> {
        let net = self.network.network;
        let len = self.network.subnet_len;
        let count = net.subnet_count(len);
        while st.free_from < count && net.subnet(len, st.free_from).is_some_and(|s| st.subnet_held(s)) {
            st.free_from += 1;
        }
        let busy = |s: &Ipv4Cidr| st.subnet_held(*s) || refused.contains(s) || st.in_flight.values().any(|(_, f, _)| f.as_ref() == Some(s));
        (st.free_from.max(1)..count).filter_map(|i| net.subnet(len, i)).find(|s| !busy(s)).ok_or(Error::Exhausted {
            network: net,
            len,
            count: count.saturating_sub(1),
        })
    }

    /// Checks a node token, optionally against the node it claims to be.
    pub fn check_token(&self, node_token: &str, claimed: Option<&str>) -> TokenCheck {
        let st = self.state.lock().expect("registry lock");
        match st.by_token(node_token) {
            None => TokenCheck::Unknown,
            Some(r) if claimed.is_some_and(|c| c != r.node.name) => TokenCheck::OtherNode(r.node.name.clone()),
            Some(r) if r.key_sha256.is_some() => TokenCheck::NeedsCertificate(r.node.name.clone()),
            Some(r) => TokenCheck::Ok(r.node.name.clone()),
        }
    }

    /// Whether node `name` holds the key whose sha256 is `key` (from its
    /// client certificate).
    pub fn check_key(&self, name: &str, key: &str) -> KeyCheck {
        match self.state.lock().expect("registry lock").nodes.get(name) {
            None => KeyCheck::Unknown,
            Some(r) if r.key_sha256.as_deref() == Some(key) => KeyCheck::Ok,
            Some(_) => KeyCheck::OtherKey,
        }
    }

    /// Node `name` (which its certificate or token proved: [`Registry::check_key`],
    /// [`Registry::check_token`]) with `last_seen` moved to now and its lease
    /// renewed. `None` for an unknown node, and for a node whose lease
    /// expired (it is forgotten: it must register again).
    pub async fn heartbeat(&self, name: &str) -> Result<Option<Node>, store::Error> {
        let updated = {
            let mut st = self.state.lock().expect("registry lock");
            let Some(record) = st.nodes.get_mut(name) else { return Ok(None) };
            record.node.last_seen = OffsetDateTime::now_utc();
            record.clone()
        };
        match self.store.renew(updated.clone()).await? {
            Renewal::Live => Ok(Some(updated.node)),
            Renewal::Expired => {
                let removed = {
                    let mut st = self.state.lock().expect("registry lock");
                    let removed = st.remove(&updated.node.name);
                    self.publish(&mut st, false);
                    removed
                };
                if let Some(record) = removed {
                    self.store.remove(record).await?;
                }
                Ok(None)
            }
        }
    }

    /// [`Registry::watch_peers`], as one line of JSON (a newline at its
    /// end), and the revision it answers at: serialised once per revision
    /// and revision asked from, whoever asks.
    pub async fn watch_peers_json(&self, seen: u64, epoch: Option<u64>, timeout: std::time::Duration) -> (u64, bytes::Bytes) {
        let from = self.wait_for_change(seen, epoch, timeout).await;
        let current = *self.revision.borrow();
        {
            let cache = self.peers_json.lock().expect("peers cache lock");
            if cache.0 == current
                && let Some(json) = cache.1.get(&from.unwrap_or(u64::MAX))
            {
                return (current, json.clone());
            }
        }
        let peers = self.answer(from);
        let mut line = serde_json::to_vec(&peers).expect("peers serialise");
        line.push(b'\n');
        let json = bytes::Bytes::from(line);
        let mut cache = self.peers_json.lock().expect("peers cache lock");
        if cache.0 < peers.revision {
            *cache = (peers.revision, HashMap::new());
        }
        // Watchers are at a few revisions at most; a bound all the same.
        if cache.0 == peers.revision && cache.1.len() < 64 {
            cache.1.insert(from.unwrap_or(u64::MAX), json.clone());
        }
        (peers.revision, json)
    }

    /// This run's epoch ([`Peers::epoch`]).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How many nodes are registered, pending ones included.
    pub fn len(&self) -> usize {
        self.state.lock().expect("registry lock").nodes.len()
    }

    /// Whether no node is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every node, by name.
    pub fn nodes(&self) -> Vec<Node> {
        self.state.lock().expect("registry lock").nodes.values().map(|r| r.node.clone()).collect()
    }

    /// Up to `limit` nodes by name, from just after `after` (from the first
    /// without it): a page, so a listing holds a page of nodes at a time.
    pub fn nodes_after(&self, after: Option<&str>, limit: usize) -> Vec<Node> {
        use std::ops::Bound::{Excluded, Unbounded};
        let st = self.state.lock().expect("registry lock");
        let from = after.map_or(Unbounded, |a| Excluded(a.to_string()));
        st.nodes.range((from, Unbounded)).take(limit).map(|(_, r)| r.node.clone()).collect()
    }

    /// Every leased node (and foreign lease) and the current revision.
    pub fn peers(&self) -> Peers {
        self.answer(None)
    }

    /// Waits until the revision passes `seen` or `timeout` elapses, then
    /// answers with the peers: a long poll, so agents learn of joins and
    /// leaves at once without polling. With this run's `epoch` the answer
    /// is the changes since `seen`, else the whole list ([`Peers`]).
    ///
    /// A `seen` from another epoch, or above the current revision, is
    /// answered at once with the whole list. Without an epoch (an agent
    /// from before deltas), the whole list once the revision passes `seen`.
    pub async fn watch_peers(&self, seen: u64, epoch: Option<u64>, timeout: std::time::Duration) -> Peers {
        let from = self.wait_for_change(seen, epoch, timeout).await;
        self.answer(from)
    }

    /// Waits as [`Registry::watch_peers`] does; the revision to answer
    /// from, or `None` for the whole list.
    async fn wait_for_change(&self, seen: u64, epoch: Option<u64>, timeout: std::time::Duration) -> Option<u64> {
        let mut rx = self.revision.subscribe();
        let current = *rx.borrow();
        let from = (epoch == Some(self.epoch) && seen <= current).then_some(seen);
        if seen <= current && (from.is_some() || epoch.is_none()) {
            let _ = tokio::time::timeout(timeout, rx.wait_for(|r| *r > seen)).await;
        }
        from
    }

    /// The peers at the current revision: the changes since `from` when
    /// the log still has them all and they are fewer than the peers, else
    /// every peer.
    fn answer(&self, from: Option<u64>) -> Peers {
        let st = self.state.lock().expect("registry lock");
        let revision = *self.revision.borrow();
        let peers_now = st.by_subnet.len() + st.foreign.len();
        if let Some(delta) = from.and_then(|from| st.log.since(from, peers_now)) {
            return Peers { revision, epoch: self.epoch, delta: true, peers: delta.put, left: delta.left, check: st.check.clone() };
        }
        let mut peers: Vec<Peer> = st
            .nodes
            .values()
            .filter_map(|r| {
                let n = &r.node;
                Some(Peer { name: n.name.clone(), subnet: n.subnet?, public_ip: n.public_ip?, vtep_mac: n.vtep_mac? })
            })
            .collect();
        peers.extend(st.foreign.values().filter(|p| p.vtep_mac.0 != [0; 6]).cloned());
        Peers { revision, epoch: self.epoch, delta: false, peers, left: Vec::new(), check: st.check.clone() }
    }
}

/// The hostname if no other machine has it, else `hostname-<machine id prefix>`.
fn unique_name(st: &State, hostname: &str, machine_id: &str) -> String {
    let taken = |name: &str| st.nodes.contains_key(name) || st.in_flight.contains_key(name);
    if !taken(hostname) {
        return hostname.to_string();
    }
    let mut len = 6;
    loop {
        let name = format!("{hostname}-{}", &machine_id[..len.min(machine_id.len())]);
        if !taken(&name) || len >= machine_id.len() {
            return name;
        }
        len += 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::DbStore;

    /// The node a token belongs to, as the API finds it for a token.
    fn owner(reg: &Registry, token: &str) -> Option<String> {
        match reg.check_token(token, None) {
            TokenCheck::Ok(name) => Some(name),
            _ => None,
        }
    }

    /// A heartbeat with a node token, as the API makes it.
    async fn heartbeat(reg: &Registry, token: &str) -> Option<Node> {
        let name = owner(reg, token)?;
        reg.heartbeat(&name).await.unwrap()
    }

    fn request(machine: char, hostname: &str) -> RegisterRequest {
        RegisterRequest {
            machine_id: machine.to_string().repeat(32),
            hostname: hostname.into(),
            macs: vec!["52:54:00:00:00:01".parse().unwrap()],
            // One address per machine: two live nodes never share one.
            addresses: vec![std::net::Ipv4Addr::new(192, 0, 2, machine as u8).into()],
            cpus: 1,
            memory_bytes: 1,
            kernel: "k".into(),
            agent_version: "v".into(),
            image_digest: "sha256:d".into(),
            metrics: None,
            public_ip: None,
            vtep_mac: Some("0e:00:00:00:00:01".parse().unwrap()),
            uplink_mtu: Some(1500),
            csr: None,
        }
    }

    async fn open(path: &std::path::Path, network: &str) -> Arc<Registry> {
        let net = NetworkConfig { network: network.parse().unwrap(), subnet_len: 24, vni: 1 };
        Registry::open(Arc::new(DbStore::open(path, None).unwrap()), net).await.unwrap()
    }

    #[tokio::test]
    async fn register_is_idempotent_by_machine_id_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::StateDir::new(dir.path()).registry_db();
        let reg = open(&path, "10.244.0.0/16").await;
        let (a, token_a, lease_a) = reg.register(&request('a', "worker")).await.unwrap();
        let (b, _, lease_b) = reg.register(&request('b', "worker")).await.unwrap();
        assert_eq!(a.name, "worker");
        assert_eq!(b.name, "worker-bbbbbb", "a second machine with the same hostname gets a distinct name");
        let lease_a = lease_a.unwrap();
        assert_eq!(lease_a.subnet.to_string(), "10.244.1.0/24", "leases start at the second subnet, as flannel's");
        assert_eq!(lease_b.unwrap().subnet.to_string(), "10.244.2.0/24");
        assert_eq!((lease_a.mtu, lease_a.vni, lease_a.backend.as_str()), (1450, 1, "vxlan"));
        let (a2, token_a2, lease_a2) = reg.register(&request('a', "worker")).await.unwrap();
        assert_eq!(a2.name, "worker");
        assert_eq!(a2.registered_at, a.registered_at);
        assert_eq!(lease_a2.unwrap().subnet, lease_a.subnet, "the same node gets the same subnet back");
        assert!(heartbeat(&reg, &token_a).await.is_none(), "the old token stops working");
        assert_eq!(heartbeat(&reg, &token_a2).await.unwrap().name, "worker");
        assert!(heartbeat(&reg, "nope").await.is_none());
        assert!(matches!(reg.check_token(&token_a2, Some("worker-bbbbbb")), TokenCheck::OtherNode(n) if n == "worker"));

        drop(reg);
        let reopened = open(&path, "10.244.0.0/16").await;
        let names: Vec<String> = reopened.nodes().into_iter().map(|n| n.name).collect();
        assert_eq!(names, ["worker", "worker-bbbbbb"]);
        assert_eq!(heartbeat(&reopened, &token_a2).await.unwrap().name, "worker", "tokens survive a restart");
        let (_, _, lease) = reopened.register(&request('a', "worker")).await.unwrap();
        assert_eq!(lease.unwrap().subnet, lease_a.subnet, "and so do leases");
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(token_a2.len()).any(|w| w == token_a2.as_bytes()), "tokens are stored hashed");
    }

    #[tokio::test]
    async fn heartbeats_are_written_a_quarter_ttl_apart_and_settled_at_a_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::StateDir::new(dir.path()).registry_db();
        let reg = open(&path, "10.244.0.0/16").await;
        // Written 2 s apart: room for a slow machine between the steps.
        reg.set_lifecycle(Lifecycle { grace: std::time::Duration::from_secs(4), lease_ttl: std::time::Duration::from_secs(8) });
        let (_, token, _) = reg.register(&request('a', "worker")).await.unwrap();
        let store = reg.store_handle();
        let stored = || async { store.load().await.unwrap().records[0].node.last_seen };
        let registered = stored().await;

        let heard = heartbeat(&reg, &token).await.unwrap().last_seen;
        assert!(heard > registered);
        assert_eq!(stored().await, registered, "a heartbeat right after the registration's write is not written");

        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        let heard = heartbeat(&reg, &token).await.unwrap().last_seen;
        assert_eq!(stored().await, heard, "a quarter of the TTL (2 s) later, it is");

        let heard = heartbeat(&reg, &token).await.unwrap().last_seen;
        assert!(stored().await < heard, "the next one is not");
        reg.settle().await.unwrap();
        assert_eq!(stored().await, heard, "a stop writes what is behind");
        drop(store);
        drop(reg);
        let reopened = open(&path, "10.244.0.0/16").await;
        assert_eq!(reopened.nodes()[0].last_seen, heard, "and a restart finds it");
    }

    #[tokio::test]
    async fn a_restarted_server_gives_every_node_its_grace_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::StateDir::new(dir.path()).registry_db();
        let reg = open(&path, "10.244.0.0/16").await;
        reg.register(&request('a', "worker")).await.unwrap();
        // As a crash leaves it: the last heartbeat written two minutes ago.
        let store = reg.store_handle();
        let mut record = store.load().await.unwrap().records.remove(0);
        record.node.last_seen -= time::Duration::minutes(2);
        store.put(record.clone(), false).await.unwrap();
        drop((store, reg));

        let reopened = open(&path, "10.244.0.0/16").await;
        let grace = std::time::Duration::from_millis(300);
        reopened.set_lifecycle(Lifecycle { grace, lease_ttl: std::time::Duration::from_millis(600) });
        let node = &reopened.nodes()[0];
        assert_eq!(node.last_seen, record.node.last_seen, "what the store says is shown as it is");
        assert_eq!(reopened.state_of(node), NodeState::Ready, "silent for two minutes, but the server was not there to hear");
        assert!(reopened.expire().await.unwrap().is_empty(), "nor is it removed for the TTL at once");
        tokio::time::sleep(grace + std::time::Duration::from_millis(50)).await;
        assert_eq!(reopened.state_of(node), NodeState::NotReady, "silent for the grace since the start: NotReady");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(reopened.expire().await.unwrap(), ["worker"], "and for the TTL: removed");
    }

    #[tokio::test]
    async fn a_late_heartbeat_or_removal_does_not_undo_a_removal_or_a_registration_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::StateDir::new(dir.path()).registry_db();
        let reg = open(&path, "10.244.0.0/16").await;
        // Every heartbeat is due for a write.
        reg.set_lifecycle(Lifecycle { grace: std::time::Duration::from_secs(1), lease_ttl: std::time::Duration::from_millis(4) });
        reg.register(&request('a', "worker")).await.unwrap();
        let store = reg.store_handle();
        let old = store.load().await.unwrap().records.remove(0);
        reg.remove("worker").await.unwrap().expect("removed");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert_eq!(store.renew(old.clone()).await.unwrap(), Renewal::Live);
        assert!(store.load().await.unwrap().records.is_empty(), "a heartbeat that raced the removal does not bring the node back");

        reg.register(&request('a', "worker")).await.unwrap();
        let new = store.load().await.unwrap().records.remove(0);
        assert_ne!(new.token_sha256, old.token_sha256);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        store.renew(old.clone()).await.unwrap();
        store.remove(old).await.unwrap();
        let kept = store.load().await.unwrap().records;
        assert_eq!(kept.len(), 1, "a late removal of the first registration keeps the second");
        assert_eq!(kept[0].token_sha256, new.token_sha256, "and a late heartbeat of the first does not overwrite it");
    }

    #[tokio::test]
    async fn a_machine_with_no_token_waits_until_approved_and_only_its_key_registers_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::StateDir::new(dir.path()).registry_db();
        let reg = open(&path, "10.244.0.0/16").await;
        let wait = || Admission::Unvouched { auto_approve: false };
        let (n, _, lease) = reg.register_with(&request('a', "stranger"), Some("key-a"), wait()).await.unwrap();
        assert!(n.pending && lease.is_none() && n.subnet.is_none(), "pending, no lease: {n:?}");
        assert!(!reg.is_holder(&n.machine_id, Some("key-a")), "a pending node is no holder");
        assert!(reg.peers().peers.is_empty() && n.metrics_target().is_none(), "neither a peer nor scraped");
        let (again, _, lease) = reg.register_with(&request('a', "stranger"), Some("key-a"), wait()).await.unwrap();
        assert!(again.pending && lease.is_none(), "still pending on its next try");
        let e = reg.register_with(&request('a', "stranger"), Some("key-b"), wait()).await.unwrap_err();
        assert!(matches!(e, Error::Held { .. }), "another key, while it is seen: {e:?}");

        assert_eq!(reg.approve(&n.name).await.unwrap().map(|(n, was)| (n.pending, was)), Some((false, true)));
        assert_eq!(reg.approve(&n.name).await.unwrap().map(|(_, was)| was), Some(false), "approving twice changes nothing");
        assert!(reg.approve("nobody").await.unwrap().is_none());
        let (joined, _, lease) = reg.register_with(&request('a', "stranger"), Some("key-a"), wait()).await.unwrap();
        assert!(!joined.pending && lease.is_some(), "approved, its next try gets its lease: {joined:?}");
        assert!(reg.is_holder(&joined.machine_id, Some("key-a")) && !reg.is_holder(&joined.machine_id, Some("key-b")));
        reg.set_held_within(std::time::Duration::ZERO);
        let e = reg.register_with(&request('a', "stranger"), Some("key-b"), wait()).await.unwrap_err();
        assert!(matches!(e, Error::Held { .. }), "without a token, never another key over an approved node, quiet or not: {e:?}");
        let (taken, _, _) = reg.register_with(&request('a', "stranger"), Some("key-b"), Admission::Token).await.unwrap();
        assert!(!taken.pending && taken.subnet == joined.subnet, "a token re-keys a quiet node: {taken:?}");

        // Kept pending across a restart; forgotten when quiet.
        let (b, _, _) = reg.register_with(&request('b', "other"), Some("key-c"), wait()).await.unwrap();
        drop(reg);
        let reg = open(&path, "10.244.0.0/16").await;
        assert!(reg.nodes().iter().any(|n| n.name == b.name && n.pending), "pending survives a restart");
        assert!(reg.sweep_pending(std::time::Duration::from_secs(600)).await.unwrap().is_empty(), "not quiet yet");
        assert_eq!(reg.sweep_pending(std::time::Duration::ZERO).await.unwrap(), std::slice::from_ref(&b.name), "only the pending node");
        assert_eq!(reg.nodes().len(), 1);

        // At most MAX_PENDING wait; --auto-approve joins at once.
        for i in 0..MAX_PENDING {
            let mut r = request('c', "many");
            r.machine_id = format!("{i:032x}");
            reg.register_with(&r, None, wait()).await.unwrap();
        }
        let mut r = request('c', "many");
        r.machine_id = "f".repeat(32);
        assert!(matches!(reg.register_with(&r, None, wait()).await, Err(Error::TooManyPending(n)) if n == MAX_PENDING));
        let (auto, _, lease) = reg.register_with(&r, None, Admission::Unvouched { auto_approve: true }).await.unwrap();
        assert!(!auto.pending && lease.is_some(), "{auto:?}");
    }

    #[tokio::test]
    async fn an_upper_case_machine_id_is_the_same_machine() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(&crate::StateDir::new(dir.path()).registry_db(), "10.244.0.0/16").await;
        let (lower, _, lease) = reg.register(&request('a', "worker")).await.unwrap();
        let (upper, _, lease_again) = reg.register(&request('A', "other-name")).await.unwrap();
        assert_eq!(upper.name, lower.name, "the same node, not a second identity");
        assert_eq!(lease_again.map(|l| l.subnet), lease.map(|l| l.subnet), "and the same lease");
        assert_eq!(reg.nodes().len(), 1);
        assert_eq!(reg.nodes()[0].machine_id, "a".repeat(32), "stored lower-case");
        let (b, _, _) = reg.register(&request('B', "second")).await.unwrap();
        assert_eq!(reg.nodes().iter().find(|n| n.name == b.name).unwrap().machine_id, "b".repeat(32));
    }

    #[tokio::test]
    async fn nodes_are_listed_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(&crate::StateDir::new(dir.path()).registry_db(), "10.244.0.0/16").await;
        for m in ['a', 'b', 'c', 'd', 'e'] {
            reg.register(&request(m, &format!("n{m}"))).await.unwrap();
        }
        let names = |nodes: Vec<Node>| nodes.into_iter().map(|n| n.name).collect::<Vec<_>>();
        // (after, limit, names)
        for (after, limit, want) in [
            (None, 2, vec!["na", "nb"]),
            (Some("nb"), 2, vec!["nc", "nd"]),
            (Some("nd"), 2, vec!["ne"]),
            (Some("ne"), 2, vec![]),
            (Some("nbb"), 10, vec!["nc", "nd", "ne"]),
            (None, 0, vec![]),
        ] {
            assert_eq!(names(reg.nodes_after(after, limit)), want, "after {after:?}, limit {limit}");
        }
    }

    #[tokio::test]
    async fn leave_releases_and_exhaustion_is_clean() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::StateDir::new(dir.path()).registry_db();
        // A /22 holds four /24s; the first is never leased: three nodes fit.
        let reg = open(&path, "10.9.0.0/22").await;
        let mut tokens = Vec::new();
        for m in ['a', 'b', 'c'] {
            let (_, t, lease) = reg.register(&request(m, &format!("n{m}"))).await.unwrap();
            assert!(lease.is_some());
            tokens.push(t);
        }
        let before = reg.nodes().len();
        let err = reg.register(&request('d', "nd")).await.unwrap_err();
        assert!(err.to_string().contains("address space exhausted") && err.to_string().contains("10.9.0.0/22"), "{err}");
        assert_eq!(reg.nodes().len(), before, "no half-made node or lease");
        drop(reg);
        let reg = open(&path, "10.9.0.0/22").await;
        assert_eq!(reg.nodes().len(), before, "nothing written either");

        let rev = reg.peers().revision;
        let left = reg.remove(&owner(&reg, &tokens[1]).unwrap()).await.unwrap().unwrap();
        assert_eq!(left.name, "nb");
        assert!(reg.peers().revision > rev, "leaving bumps the revision");
        let (_, _, lease) = reg.register(&request('d', "nd")).await.unwrap();
        assert_eq!(lease.unwrap().subnet.to_string(), "10.9.2.0/24", "the released subnet is leased again");
        drop(reg);
        assert_eq!(open(&path, "10.9.0.0/22").await.nodes().len(), 3, "the leave is durable");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_hundred_concurrent_registrations_get_distinct_subnets() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::StateDir::new(dir.path()).registry_db();
        let reg = open(&path, "10.244.0.0/16").await;
        let handles: Vec<_> = (0..200u32)
            .map(|i| {
                let reg = reg.clone();
                tokio::spawn(async move {
                    let mut r = request('a', &format!("node-{i}"));
                    r.machine_id = format!("{i:032x}");
                    r.addresses = vec![std::net::Ipv4Addr::new(198, 18, 0, i as u8).into()];
                    reg.register(&r).await.unwrap().2.unwrap().subnet
                })
            })
            .collect();
        let mut subnets = std::collections::BTreeSet::new();
        for h in handles {
            subnets.insert(h.await.unwrap());
        }
        assert_eq!(subnets.len(), 200, "200 distinct subnets");
        drop(reg);
        let reopened = open(&path, "10.244.0.0/16").await;
        let stored: std::collections::BTreeSet<Ipv4Cidr> = reopened.nodes().into_iter().filter_map(|n| n.subnet).collect();
        assert_eq!(stored, subnets, "none lost in the store");
    }

    #[tokio::test]
    async fn watch_returns_at_once_on_a_join() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(&crate::StateDir::new(dir.path()).registry_db(), "10.244.0.0/16").await;
        let now = reg.peers();
        let waiter = {
            let reg = reg.clone();
            tokio::spawn(async move { reg.watch_peers(now.revision, Some(now.epoch), std::time::Duration::from_secs(30)).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        reg.register(&request('a', "worker")).await.unwrap();
        let peers = waiter.await.unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "the watch answers on the join, not at its timeout");
        assert_eq!(peers.peers.len(), 1);
        assert_eq!(peers.peers[0].subnet.to_string(), "10.244.1.0/24");
        assert!(peers.revision > now.revision);
    }

    /// Each watcher gets the changes since its revision, whatever the
    /// cluster's size; the whole list from another epoch, or on a first call.
    #[tokio::test]
    async fn the_watch_sends_changes_not_the_whole_list() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(&crate::StateDir::new(dir.path()).registry_db(), "10.244.0.0/16").await;
        let ids: Vec<char> = ('a'..='z').chain('1'..='4').collect();
        for (i, id) in ids.iter().enumerate() {
            reg.register(&request(*id, &format!("w{i}"))).await.unwrap();
        }
        let zero = std::time::Duration::ZERO;
        let whole = reg.watch_peers(0, None, zero).await;
        assert!(!whole.delta && whole.peers.len() == 30, "a first call: the whole list");
        let (epoch, seen) = (whole.epoch, whole.revision);
        // One join: one peer.
        let (joined, _, _) = reg.register(&request('9', "late")).await.unwrap();
        let delta = reg.watch_peers(seen, Some(epoch), zero).await;
        assert!(delta.delta && delta.left.is_empty(), "{delta:?}");
        assert_eq!(delta.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), [joined.name.as_str()]);
        let (_, bytes) = reg.watch_peers_json(seen, Some(epoch), zero).await;
        assert!(bytes.len() < 300, "a join is one small message: {} bytes", bytes.len());
        // One leave: one subnet.
        let subnet = joined.subnet.unwrap();
        reg.remove(&joined.name).await.unwrap();
        let left = reg.watch_peers(delta.revision, Some(epoch), zero).await;
        assert!(left.delta && left.peers.is_empty() && left.left == [subnet], "{left:?}");
        // Joined and left since: left.
        let both = reg.watch_peers(seen, Some(epoch), zero).await;
        assert!(both.delta && both.peers.is_empty() && both.left == [subnet], "{both:?}");
        // Re-registering with nothing changed is no change: the revision stays.
        reg.register(&request('a', "w0")).await.unwrap();
        assert_eq!(reg.peers().revision, left.revision, "a re-registration with the same lease moves nothing");
        // Another epoch (a restarted server) or a revision from the future: the whole list.
        for (rev, ep) in [(left.revision, epoch ^ 1), (left.revision + 5, epoch)] {
            let answer = reg.watch_peers(rev, Some(ep), std::time::Duration::from_secs(30)).await;
            assert!(!answer.delta && answer.peers.len() == 30, "at once, the whole list: {rev} {ep}");
        }
    }

    /// The lowest free subnet is found from where the last search stopped,
    /// and a released one is found again.
    #[tokio::test]
    async fn the_lowest_free_subnet_is_leased_after_releases() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(&crate::StateDir::new(dir.path()).registry_db(), "10.244.0.0/16").await;
        let mut names = Vec::new();
        for (i, id) in ('a'..='j').enumerate() {
            let (node, _, lease) = reg.register(&request(id, &format!("w{i}"))).await.unwrap();
            assert_eq!(lease.unwrap().subnet.to_string(), format!("10.244.{}.0/24", i + 1));
            names.push(node.name);
        }
        reg.remove(&names[6]).await.unwrap();
        reg.remove(&names[2]).await.unwrap();
        let reg = &reg;
        let subnet = |id| async move { reg.register(&request(id, "new")).await.unwrap().2.unwrap().subnet.to_string() };
        assert_eq!(subnet('k').await, "10.244.3.0/24", "the lowest released");
        assert_eq!(subnet('l').await, "10.244.7.0/24", "then the next");
        assert_eq!(subnet('m').await, "10.244.11.0/24", "then past the last");
    }
}
