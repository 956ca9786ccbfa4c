//! The etcd store, with flannel's schema for the pod network.
//!
//! | key | value |
//! |---|---|
//! | `PREFIX/config` | flannel's network config: `{"Network": "10.244.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan", "VNI": 1}}` |
//! | `PREFIX/subnets/10.244.1.0-24` | flannel's lease: `{"PublicIP": "192.0.2.10", "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": "0e:..."}}`, on an etcd lease with flannel's TTL (24 h) |
//! | `/kiln/nodes/<name>` | kiln's node record (facts and token hash) |
//! | `/kiln/pools/<pool>` | the pool's desired replicas (`kiln scale`), a decimal number |
//! | `/kiln/rollouts/<pool>` | the pool's rollout settings (`kiln rollout pause\|resume\|undo`), a `RolloutRecord` as JSON |
//! | `/kiln/join-tokens/<id>` | a join token: its public part and its secret's sha256 (a `TokenRecord`) |
//! | `/kiln/alive/<name>` | the name of a server that heard from the node within the grace period, on that server's liveness lease (`alive`) |
//! | `/kiln/leader/<lease>` | a server's place in the election of the one that runs the pools (`crate::leader`) |
//!
//! `PREFIX` is flannel's default `/coreos.com/network`. A stock flanneld
//! pointed at the same etcd and prefix sees kiln's nodes as its peers, and
//! kiln lists flanneld's leases among its peers. A new subnet is written in a
//! transaction that fails if anyone holds the key already, so two control
//! planes (or kiln and flanneld) never lease the same subnet.
//!
//! Heartbeats renew the etcd lease when a renewal is due (every
//! [`RENEW_EVERY`] at most), not on each heartbeat, and do not wait for it:
//! one task renews the leases due together (`renew`). A node that stops
//! heartbeating loses its lease after the TTL, as with flannel; the watch
//! reports it and the registry forgets the node.
//!
//! Join tokens are not watched: a registration reads the token's key, so
//! one made by another server on the same etcd is seen at once. Its use is
//! counted in the txn that writes its node and lease, with the other
//! registrations of that token at that moment (`spend`), only if the
//! token's `mod_revision` is still the one read; if not, it is read again.
//! While registrations come in bursts, their etcd leases are granted ahead
//! (at most 8, each used within 10 s or given back); a server that stops
//! leaves those it holds to expire with their TTL, holding no key.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp, WatchOptions};
use kiln_core::{Backend, Ipv4Cidr, Mac, Peer};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use kiln_core::NetworkConfig;

use super::{Change, Error, Loaded, NodeRecord, Renewal, Spend, Spent, Store, StoreFuture, TokenRecord};

mod alive;
mod renew;
mod spend;

/// Notes that `keys` were written at `revision`, for the watch to skip
/// (the store's own writes; see `EtcdStore::written`).
fn note_written(written: &Mutex<HashMap<String, i64>>, revision: Option<i64>, keys: impl IntoIterator<Item = String>) {
    let Some(revision) = revision else { return };
    let mut written = written.lock().expect("written lock");
    for key in keys {
        let at = written.entry(key).or_default();
        *at = (*at).max(revision);
    }
}

/// How long one etcd call of a background task may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What request handlers leave for one background task, which takes it a
/// batch at a time (the liveness keys to put, the leases to renew).
struct Queue<T> {
    items: Mutex<Vec<T>>,
    wake: tokio::sync::Notify,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Queue { items: Mutex::default(), wake: Default::default() }
    }
}

impl<T> Queue<T> {
    fn push(&self, item: T) {
        self.items.lock().expect("queue lock").push(item);
        self.wake.notify_one();
    }

    /// The oldest `max` items at most, once there are any.
    async fn next(&self, max: usize) -> Vec<T> {
        loop {
            {
                let mut items = self.items.lock().expect("queue lock");
                if !items.is_empty() {
                    let n = items.len().min(max);
                    return items.drain(..n).collect();
                }
            }
            // A push since the look above left its wake-up: no item is missed.
            self.wake.notified().await;
        }
    }
}

pub use alive::ALIVE_PREFIX;

/// flannel's default etcd prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// Where kiln keeps its node records.
pub const NODES_PREFIX: &str = "/kiln/nodes/";
/// Where each pool's desired replicas are kept (a decimal number).
pub const POOLS_PREFIX: &str = "/kiln/pools/";
/// Where each pool's rollout settings are kept (JSON).
pub const ROLLOUTS_PREFIX: &str = "/kiln/rollouts/";
/// Where kiln keeps its join tokens, by ID.
pub const TOKENS_PREFIX: &str = "/kiln/join-tokens/";
/// Leases granted ahead for registrations in a burst.
const STOCK: usize = 8;
/// A lease granted ahead is used within this (or an eighth of the TTL, if
/// shorter), else given back: its TTL runs from its grant.
const STOCK_AGE: Duration = Duration::from_secs(10);

/// Leases granted ahead (see [`EtcdStore::take_lease`]).
#[derive(Default)]
struct LeaseStock {
    leases: Vec<(i64, Instant)>,
    /// The last registration that took a lease.
    last_take: Option<Instant>,
    refilling: bool,
}

/// flannel's lease TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
pub use super::RENEW_EVERY;

/// flannel's network config (`PREFIX/config`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct FlannelConfig {
    network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subnet_len: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subnet_min: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subnet_max: Option<String>,
    #[serde(default)]
    backend: FlannelBackend,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct FlannelBackend {
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "VNI", default, skip_serializing_if = "Option::is_none")]
    vni: Option<u32>,
}

/// flannel's lease value (`PREFIX/subnets/<ip>-<len>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct FlannelLease {
    #[serde(rename = "PublicIP")]
    public_ip: Ipv4Addr,
    #[serde(default)]
    backend_type: String,
    #[serde(default)]
    backend_data: Option<VxlanData>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct VxlanData {
    #[serde(rename = "VNI", default)]
    vni: u32,
    #[serde(rename = "VtepMAC")]
    vtep_mac: Mac,
}

/// Where and how to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// flannel's prefix (`/coreos.com/network`).
    pub prefix: String,
    /// TTL of subnet leases.
    pub ttl: Duration,
    /// A node not heard from for this long is NotReady (`--node-grace`):
    /// the TTL of this server's liveness lease.
    pub grace: Duration,
    /// This server's name (`--name`), written in the liveness keys it holds.
    pub name: String,
}

impl EtcdConfig {
    /// flannel's defaults at `endpoints`.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.into(),
            ttl: DEFAULT_TTL,
            grace: crate::registry::Lifecycle::default().grace,
            name: "kiln".into(),
        }
    }
}

/// The etcd store. See the module docs.
pub struct EtcdStore {
    config: EtcdConfig,
    client: Client,
    vni: u32,
    /// etcd lease of each node's subnet key, and when it was last renewed.
    leases: std::sync::Arc<Mutex<HashMap<String, (i64, Instant)>>>,
    /// Registrations written with their tokens' uses, a batch a txn.
    spends: spend::Turns,
    /// Each token as this server last wrote it (see `spend`).
    last_tokens: std::sync::Arc<Mutex<HashMap<String, (TokenRecord, i64)>>>,
    /// etcd leases granted ahead, with when, while registrations come in
    /// bursts: a registration takes one instead of waiting for a grant.
    stock: std::sync::Arc<Mutex<LeaseStock>>,
    /// The watch, started by `load`, taken by the registry.
    changes: Mutex<Option<mpsc::UnboundedReceiver<Change>>>,
    /// The revision of this store's last write of each key: the watch
    /// skips events at or below it (this process's own writes, or older).
    written: std::sync::Arc<Mutex<HashMap<String, i64>>>,
    /// The nodes' liveness keys this server holds, and its lease.
    alive: std::sync::Arc<alive::Alive>,
    /// Nodes' lease renewals that heartbeats queued.
    renewals: std::sync::Arc<renew::Renewals>,
    /// Puts and sweeps the liveness keys, renews this server's lease and
    /// the nodes' leases.
    background: tokio::task::JoinHandle<()>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.background.abort();
    }
}

impl EtcdStore {
    /// Connects, and reads flannel's network config, writing `wanted` there
    /// if there is none yet. Returns the store and the network config in
    /// force (etcd's, when one was there).
    pub async fn connect(config: EtcdConfig, wanted: NetworkConfig) -> Result<(Self, NetworkConfig), Error> {
        let endpoints = config.endpoints.join(",");
        let etcd = |source: etcd_client::Error| Error::Etcd { endpoints: endpoints.clone(), source };
        let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(3)).with_timeout(Duration::from_secs(10));
        let mut client = Client::connect(&config.endpoints, Some(options)).await.map_err(etcd)?;
        let key = format!("{}/config", config.prefix);
        let ours = FlannelConfig {
            network: wanted.network.to_string(),
            subnet_len: Some(wanted.subnet_len),
            subnet_min: None,
            subnet_max: None,
            backend: FlannelBackend { kind: Backend::Vxlan.to_string(), vni: Some(wanted.vni) },
        };
        let body = serde_json::to_string(&ours).expect("config serialises");
        // Create it unless it exists; either way read what is there.
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), body, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = client.txn(txn).await.map_err(etcd)?;
        let network = if resp.succeeded() {
            tracing::info!(key = %key, network = %wanted.network, "etcd: wrote flannel network config");
            wanted
        } else {
            let got = client.get(key.as_str(), None).await.map_err(etcd)?;
            let kv = got.kvs().first().ok_or_else(|| Error::NetworkConfig { key: key.clone(), reason: "vanished".into() })?;
            let found = parse_config(&key, kv.value())?;
            if found != wanted {
                tracing::warn!(
                    key = %key,
                    network = %found.network,
                    subnet_len = found.subnet_len,
                    vni = found.vni,
                    "etcd already holds a network config; using it instead of the flags"
                );
            }
            found
        };
        let alive = std::sync::Arc::new(alive::Alive::new(config.grace, config.name.clone()));
        let (leases, written) = (std::sync::Arc::default(), std::sync::Arc::default());
        let renewals = std::sync::Arc::new(renew::Renewals::new(std::sync::Arc::clone(&leases), std::sync::Arc::clone(&written)));
        let background = tokio::spawn({
            let (alive, renewals, client) = (alive.clone(), renewals.clone(), client.clone());
            async move {
                tokio::join!(alive.run(client.clone()), alive.put_pending(client.clone()), renewals.run(client));
            }
        });
        let store = EtcdStore {
            alive,
            renewals,
            background,
            config,
            client,
            vni: network.vni,
            leases,
            spends: spend::Turns::new(),
            last_tokens: Default::default(),
            stock: Default::default(),
            changes: Mutex::new(None),
            written,
        };
        Ok((store, network))
    }

    fn endpoints(&self) -> String {
        self.config.endpoints.join(",")
    }

    /// An etcd lease for a new registration's subnet, and when it was
    /// granted: one granted ahead if there is a fresh one, else one granted
    /// now. Two registrations within [`STOCK_AGE`] make a burst, and the
    /// stock is filled again ([`STOCK`]) in the background.
    async fn take_lease(&self) -> Result<(i64, Instant), Error> {
        let max_age = STOCK_AGE.min(self.config.ttl / 8);
        let (taken, refill, stale) = {
            let mut stock = self.stock.lock().expect("stock lock");
            let now = Instant::now();
            let (fresh, stale): (Vec<_>, Vec<_>) = stock.leases.drain(..).partition(|(_, at)| at.elapsed() < max_age);
            stock.leases = fresh;
            let taken = stock.leases.pop();
            let burst = stock.last_take.is_some_and(|t| now.duration_since(t) < max_age);
            stock.last_take = Some(now);
            let refill = burst && !stock.refilling && stock.leases.len() < STOCK / 2;
            stock.refilling |= refill;
            (taken, refill, stale)
        };
        for (id, _) in stale {
            let mut client = self.client.clone();
            tokio::spawn(async move {
                let _ = client.lease_revoke(id).await;
            });
        }
        if refill {
            let (client, stock, ttl) = (self.client.clone(), self.stock.clone(), self.ttl_secs());
            tokio::spawn(async move {
                let grants = (0..STOCK).map(|_| {
                    let mut client = client.clone();
                    async move { (Instant::now(), client.lease_grant(ttl, None).await) }
                });
                let granted = futures_util::future::join_all(grants).await;
                let mut stock = stock.lock().expect("stock lock");
                stock.leases.extend(granted.into_iter().filter_map(|(at, r)| Some((r.ok()?.id(), at))));
                stock.refilling = false;
            });
        }
        match taken {
            Some(lease) => Ok(lease),
            None => {
                let at = Instant::now();
                let id = self.client.clone().lease_grant(self.ttl_secs(), None).await.map_err(|e| self.err(e))?.id();
                Ok((id, at))
            }
        }
    }

    /// [`Store::put_spending`]: the node's puts made here (its subnet on a
    /// new etcd lease), written in its token's next batch.
    async fn write_spending(&self, record: NodeRecord, fresh_subnet: bool, spend: Spend) -> Result<Spent, Error> {
        let name = record.node.name.clone();
        let node_key = format!("{NODES_PREFIX}{name}");
        let mut ops = vec![TxnOp::put(node_key.as_str(), serde_json::to_string(&record).expect("records serialise"), None)];
        let mut keys = vec![node_key];
        let (mut fresh, mut lease) = (None, None);
        let before = self.leases.lock().expect("leases lock").get(&name).map(|(id, _)| *id);
        if let (Some(subnet), Some(value)) = (record.node.subnet, self.lease_value(&record)) {
            let (id, at) = self.take_lease().await?;
            lease = Some((id, at));
            let key = self.subnet_key(subnet);
            if fresh_subnet {
                fresh = Some((key.clone(), subnet));
            }
            ops.push(TxnOp::put(key.as_str(), value, Some(PutOptions::new().with_lease(id))));
            keys.push(key);
        }
        let (done, answer) = tokio::sync::oneshot::channel();
        let writer = spend::Writer {
            client: self.client.clone(),
            endpoints: self.endpoints(),
            written: self.written.clone(),
            leases: self.leases.clone(),
            last: self.last_tokens.clone(),
        };
        self.spends.write(&writer, spend::Waiter { spend, name, ops, fresh, keys, lease, done });
        let spent = answer.await.map_err(|_| Error::Closed)??;
        // The subnet moved to the new lease: the one it had before holds nothing.
        if let (Ok(_), Some(old), Some(_)) = (&spent, before, lease) {
            let _ = self.client.clone().lease_revoke(old).await;
        }
        Ok(spent)
    }

    fn err(&self, source: etcd_client::Error) -> Error {
        Error::Etcd { endpoints: self.endpoints(), source }
    }

    /// The value under `key` is not `what`.
    fn bad_value(&self, key: &[u8], what: &'static str) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> Error {
        let (endpoints, key) = (self.endpoints(), String::from_utf8_lossy(key).into_owned());
        move |source| Error::EtcdValue { endpoints, key, what, source }
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.config.prefix)
    }

    fn subnet_key(&self, subnet: Ipv4Cidr) -> String {
        format!("{}{}-{}", self.subnets_prefix(), subnet.addr, subnet.prefix)
    }

    fn lease_value(&self, record: &NodeRecord) -> Option<String> {
        let node = &record.node;
        let (Some(IpAddr::V4(public_ip)), Some(vtep_mac)) = (node.public_ip, node.vtep_mac) else { return None };
        let lease =
            FlannelLease { public_ip, backend_type: Backend::Vxlan.to_string(), backend_data: Some(VxlanData { vni: self.vni, vtep_mac }) };
        Some(serde_json::to_string(&lease).expect("lease serialises"))
    }

    /// Remembers that this process wrote `keys` at `revision`.
    fn wrote(&self, revision: Option<i64>, keys: impl IntoIterator<Item = String>) {
        note_written(&self.written, revision, keys);
    }

    fn ttl_secs(&self) -> i64 {
        self.config.ttl.as_secs().max(1) as i64
    }

    fn renew_every(&self) -> Duration {
        RENEW_EVERY.min(self.config.ttl / 4)
    }

    async fn write(&self, record: &NodeRecord, fresh_subnet: bool) -> Result<(), Error> {
        let mut client = self.client.clone();
        let name = record.node.name.clone();
        let node_key = format!("{NODES_PREFIX}{name}");
        let node_value = serde_json::to_string(record).expect("records serialise");
        let mut ops = vec![TxnOp::put(node_key.as_str(), node_value, None)];
        let mut keys = vec![node_key.clone()];
        let mut compares = Vec::new();
        let mut granted = None;
        if let (Some(subnet), Some(value)) = (record.node.subnet, self.lease_value(record)) {
            let known = self.leases.lock().expect("leases lock").get(&name).map(|(id, _)| *id);
            let lease = match known {
                Some(id) if !fresh_subnet => id,
                _ => {
                    let id = client.lease_grant(self.ttl_secs(), None).await.map_err(|e| self.err(e))?.id();
                    granted = Some(id);
                    id
                }
            };
            let key = self.subnet_key(subnet);
            if fresh_subnet {
                compares.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
            }
            ops.push(TxnOp::put(key.as_str(), value, Some(PutOptions::new().with_lease(lease))));
            keys.push(key);
        }
        let resp = client.txn(Txn::new().when(compares).and_then(ops)).await;
        let resp = match resp {
            // The kept etcd lease expired meanwhile: take a new one.
            Err(e) if granted.is_none() && lease_not_found(&e) => {
                self.leases.lock().expect("leases lock").remove(&name);
                return Box::pin(self.write(record, true)).await;
            }
            other => other.map_err(|e| self.err(e))?,
        };
        if !resp.succeeded() {
            if let Some(id) = granted {
                let _ = client.lease_revoke(id).await;
            }
            return Err(Error::Taken(record.node.subnet.expect("only a subnet write can fail its compare")));
        }
        self.wrote(resp.header().map(|h| h.revision()), keys);
        if let Some(id) = granted {
            self.leases.lock().expect("leases lock").insert(name, (id, Instant::now()));
        }
        Ok(())
    }

    async fn keep_alive(&self, record: &NodeRecord) -> Result<Renewal, Error> {
        let name = &record.node.name;
        self.alive.heard(name);
        // A renewal due is queued (`renew`): the heartbeat does not wait for etcd.
        let mut leases = self.leases.lock().expect("leases lock");
        match (leases.get_mut(name), record.node.subnet) {
            (Some((lease, at)), Some(subnet)) if at.elapsed() >= self.renew_every() => {
                let before = std::mem::replace(at, Instant::now());
                let (subnet_key, record) = (self.subnet_key(subnet), serde_json::to_string(record).expect("records serialise"));
                self.renewals.queue(renew::Due { name: name.clone(), lease: *lease, record, subnet_key, before });
                Ok(Renewal::Live)
            }
            // No lease: the last renewal found it gone; a node without a
            // subnet never had one.
            (None, Some(_)) => Ok(Renewal::Expired),
            _ => Ok(Renewal::Live),
        }
    }

    async fn delete(&self, record: &NodeRecord) -> Result<(), Error> {
        let mut client = self.client.clone();
        let name = &record.node.name;
        let mut keys = vec![format!("{NODES_PREFIX}{name}")];
        if let Some(subnet) = record.node.subnet {
            keys.push(self.subnet_key(subnet));
        }
        // Out of the table first: a renewal under way writes nothing back.
        let lease = self.leases.lock().expect("leases lock").remove(name);
        let ops: Vec<TxnOp> = keys.iter().map(|k| TxnOp::delete(k.as_str(), None)).collect();
        let resp = client.txn(Txn::new().and_then(ops)).await.map_err(|e| self.err(e))?;
        self.wrote(resp.header().map(|h| h.revision()), keys);
        self.alive.gone(&client, name).await;
        if let Some((id, _)) = lease {
            let _ = client.lease_revoke(id).await;
        }
        Ok(())
    }

    async fn read_all(&self) -> Result<Loaded, Error> {
        let mut client = self.client.clone();
        let nodes = client.get(NODES_PREFIX, Some(GetOptions::new().with_prefix())).await.map_err(|e| self.err(e))?;
        let mut records = Vec::new();
        for kv in nodes.kvs() {
            let record: NodeRecord =
                serde_json::from_slice(kv.value()).map_err(|e| self.bad_value(kv.key(), "a kiln node record")(e.into()))?;
            records.push(record);
        }
        // Subnets read at the same revision as the nodes, so the watch
        // below misses nothing between the two.
        let revision = nodes.header().map_or(0, |h| h.revision());
        let subnets = client
            .get(self.subnets_prefix(), Some(GetOptions::new().with_prefix().with_revision(revision)))
            .await
            .map_err(|e| self.err(e))?;
        let mut foreign = Vec::new();
        {
            let mut leases = self.leases.lock().expect("leases lock");
            for kv in subnets.kvs() {
                let Some(peer) = self.parse_lease(kv) else { continue };
                match records.iter().find(|r| r.node.subnet == Some(peer.subnet)) {
                    Some(r) => {
                        // Renewed at the first heartbeat.
                        leases.insert(r.node.name.clone(), (kv.lease(), Instant::now() - self.renew_every()));
                    }
                    None => foreign.push(peer),
                }
            }
        }
        let alive = client
            .get(ALIVE_PREFIX, Some(GetOptions::new().with_prefix().with_revision(revision).with_keys_only()))
            .await
            .map_err(|e| self.err(e))?;
        let alive =
            alive.kvs().iter().filter_map(|kv| Some(String::from_utf8_lossy(kv.key()).strip_prefix(ALIVE_PREFIX)?.to_string())).collect();
        self.start_watch(revision + 1);
        Ok(Loaded { records, foreign, alive })
    }

    fn parse_lease(&self, kv: &KeyValue) -> Option<Peer> {
        let key = String::from_utf8_lossy(kv.key());
        let subnet = parse_subnet_key(key.strip_prefix(&self.subnets_prefix())?)?;
        match serde_json::from_slice::<FlannelLease>(kv.value()) {
            Ok(FlannelLease { public_ip, backend_type, backend_data: Some(data) }) if backend_type == Backend::Vxlan.as_str() => {
                Some(Peer {
                    name: key.rsplit('/').next().unwrap_or_default().to_string(),
                    subnet,
                    public_ip: public_ip.into(),
                    vtep_mac: data.vtep_mac,
                })
            }
            Ok(other) => {
                tracing::warn!(key = %key, backend = %other.backend_type, "etcd: a lease kiln cannot route to (not vxlan); its subnet stays reserved");
                // Reserved all the same: a zero MAC marks it unroutable.
                Some(Peer { name: key.to_string(), subnet, public_ip: other.public_ip.into(), vtep_mac: Mac([0; 6]) })
            }
            Err(e) => {
                tracing::warn!(key = %key, "etcd: unreadable lease, subnet reserved: {e}");
                Some(Peer { name: key.to_string(), subnet, public_ip: Ipv4Addr::UNSPECIFIED.into(), vtep_mac: Mac([0; 6]) })
            }
        }
    }

    /// Watches kiln's node records and flannel's subnets from `revision`
    /// on, reconnecting from the last revision seen when the stream breaks.
    fn start_watch(&self, revision: i64) {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.changes.lock().expect("changes lock") = Some(rx);
        for prefix in [NODES_PREFIX.to_string(), self.subnets_prefix(), ALIVE_PREFIX.to_string()] {
            let alive = self.alive.clone();
            let client = self.client.clone();
            let tx = tx.clone();
            let subnets_prefix = self.subnets_prefix();
            let lessor = LeaseParser { subnets_prefix: subnets_prefix.clone() };
            let written = self.written.clone();
            tokio::spawn(async move {
                let mut next = revision;
                loop {
                    let mut client = client.clone();
                    let options = WatchOptions::new().with_prefix().with_start_revision(next);
                    let (_watcher, mut stream) = match client.watch(prefix.as_str(), Some(options)).await {
                        Ok(w) => w,
                        Err(e) => {
                            tracing::warn!(prefix = %prefix, "etcd watch: {e}; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    loop {
                        match stream.message().await {
                            Ok(Some(resp)) => {
                                if resp.canceled() {
                                    tracing::warn!(prefix = %prefix, reason = resp.cancel_reason(), "etcd watch cancelled; restarting");
                                    break;
                                }
                                for event in resp.events() {
                                    let Some(kv) = event.kv() else { continue };
                                    next = next.max(kv.mod_revision() + 1);
                                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                                    if written.lock().expect("written lock").get(&key).is_some_and(|&at| at >= kv.mod_revision()) {
                                        continue;
                                    }
                                    let change = if prefix == ALIVE_PREFIX {
                                        let name = key.strip_prefix(ALIVE_PREFIX).unwrap_or_default().to_string();
                                        // This server's own keys say nothing it does not know.
                                        let put = event.event_type() == EventType::Put;
                                        let live = alive.seen(&name, put.then(|| kv.lease()));
                                        Some(Change::Alive { name, live })
                                    } else if prefix == subnets_prefix {
                                        lessor.change(event.event_type(), kv)
                                    } else {
                                        node_change(event.event_type(), kv)
                                    };
                                    if let Some(change) = change
                                        && tx.send(change).is_err()
                                    {
                                        return;
                                    }
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(prefix = %prefix, "etcd watch: {e}; reconnecting");
                                break;
                            }
                        }
                    }
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
        }
    }
}

/// Join tokens.
impl EtcdStore {
    fn parse_token(&self, kv: &KeyValue) -> Result<TokenRecord, Error> {
        let record = serde_json::from_slice(kv.value()).map_err(|e| self.bad_value(kv.key(), "a kiln join token record")(e.into()))?;
        Ok(record)
    }

    async fn read_tokens(&self) -> Result<Vec<TokenRecord>, Error> {
        let mut client = self.client.clone();
        let resp = client.get(TOKENS_PREFIX, Some(GetOptions::new().with_prefix())).await.map_err(|e| self.err(e))?;
        resp.kvs().iter().map(|kv| self.parse_token(kv)).collect()
    }

    async fn read_token(&self, id: &str) -> Result<Option<TokenRecord>, Error> {
        let mut client = self.client.clone();
        let resp = client.get(token_key(id), None).await.map_err(|e| self.err(e))?;
        resp.kvs().first().map(|kv| self.parse_token(kv)).transpose()
    }

    async fn write_token(&self, record: &TokenRecord) -> Result<bool, Error> {
        let key = token_key(&record.info.id);
        let value = serde_json::to_string(record).expect("records serialise");
        let absent = Compare::create_revision(key.as_str(), CompareOp::Equal, 0);
        let put = TxnOp::put(key.as_str(), value, None);
        let resp = self.client.clone().txn(Txn::new().when([absent]).and_then([put])).await.map_err(|e| self.err(e))?;
        Ok(resp.succeeded())
    }

    async fn delete_token(&self, record: &TokenRecord) -> Result<bool, Error> {
        let resp = self.client.clone().delete(token_key(&record.info.id), None).await.map_err(|e| self.err(e))?;
        Ok(resp.deleted() > 0)
    }
}

fn token_key(id: &str) -> String {
    format!("{TOKENS_PREFIX}{id}")
}

/// Lease keys to changes, for the watch task (which cannot borrow the store).
struct LeaseParser {
    subnets_prefix: String,
}

impl LeaseParser {
    fn change(&self, kind: EventType, kv: &KeyValue) -> Option<Change> {
        let key = String::from_utf8_lossy(kv.key());
        let subnet = parse_subnet_key(key.strip_prefix(&self.subnets_prefix)?)?;
        match kind {
            EventType::Delete => Some(Change::LeaseDeleted(subnet)),
            EventType::Put => {
                let lease: FlannelLease = serde_json::from_slice(kv.value()).ok()?;
                let vtep_mac = lease.backend_data.map_or(Mac([0; 6]), |d| d.vtep_mac);
                let name = key.rsplit('/').next().unwrap_or_default().to_string();
                Some(Change::LeasePut(Peer { name, subnet, public_ip: lease.public_ip.into(), vtep_mac }))
            }
        }
    }
}

fn node_change(kind: EventType, kv: &KeyValue) -> Option<Change> {
    let key = String::from_utf8_lossy(kv.key());
    let name = key.strip_prefix(NODES_PREFIX)?.to_string();
    match kind {
        EventType::Delete => Some(Change::NodeDeleted(name)),
        EventType::Put => serde_json::from_slice(kv.value()).ok().map(|r| Change::NodePut(Box::new(r))),
    }
}

/// Whether etcd refused a write because its lease is gone (expired or
/// revoked): gRPC `NOT_FOUND`, which a put answers only for its lease.
fn lease_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(status) if status.code() == tonic::Code::NotFound)
}

/// `10.244.1.0-24` → `10.244.1.0/24`.
fn parse_subnet_key(s: &str) -> Option<Ipv4Cidr> {
    let (ip, len) = s.split_once('-')?;
    Ipv4Cidr::new(ip.parse().ok()?, len.parse().ok()?)
}

fn parse_config(key: &str, value: &[u8]) -> Result<NetworkConfig, Error> {
    let bad = |reason: String| Error::NetworkConfig { key: key.into(), reason };
    let c: FlannelConfig = serde_json::from_slice(value).map_err(|source| Error::NetworkConfigJson { key: key.into(), source })?;
    let network: Ipv4Cidr = c.network.parse().map_err(|e| bad(format!("`Network`: {e}")))?;
    if !c.backend.kind.is_empty() && c.backend.kind != Backend::Vxlan.as_str() {
        return Err(bad(format!("`Backend.Type` is {:?}; kiln's agents speak only \"vxlan\"", c.backend.kind)));
    }
    let subnet_len = c.subnet_len.unwrap_or(24);
    if subnet_len <= network.prefix || subnet_len > 30 {
        return Err(bad(format!("`SubnetLen` {subnet_len} does not cut `Network` {network} into subnets")));
    }
    if c.subnet_min.is_some() || c.subnet_max.is_some() {
        tracing::warn!(key = %key, "`SubnetMin`/`SubnetMax` are not honoured: kiln leases from the second subnet to the last");
    }
    Ok(NetworkConfig { network, subnet_len, vni: c.backend.vni.unwrap_or(1) })
}

impl Store for EtcdStore {
    fn load(&self) -> StoreFuture<'_, Loaded> {
        Box::pin(self.read_all())
    }

    fn put(&self, record: NodeRecord, fresh_subnet: bool) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.write(&record, fresh_subnet).await })
    }

    fn put_spending(&self, record: NodeRecord, fresh_subnet: bool, spend: Spend) -> StoreFuture<'_, Spent> {
        Box::pin(self.write_spending(record, fresh_subnet, spend))
    }

    fn renew(&self, record: NodeRecord) -> StoreFuture<'_, Renewal> {
        Box::pin(async move { self.keep_alive(&record).await })
    }

    fn remove(&self, record: NodeRecord) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.delete(&record).await })
    }

    fn watch(&self) -> Option<mpsc::UnboundedReceiver<Change>> {
        self.changes.lock().expect("changes lock").take()
    }

    fn describe(&self) -> String {
        format!("etcd {} (prefix {})", self.endpoints(), self.config.prefix)
    }

    fn replicas(&self) -> StoreFuture<'_, std::collections::BTreeMap<String, u32>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let resp = client.get(POOLS_PREFIX, Some(GetOptions::new().with_prefix())).await.map_err(|e| self.err(e))?;
            let mut out = std::collections::BTreeMap::new();
            for kv in resp.kvs() {
                let key = String::from_utf8_lossy(kv.key());
                let n = String::from_utf8_lossy(kv.value())
                    .trim()
                    .parse::<u32>()
                    .map_err(|e| self.bad_value(kv.key(), "a number of replicas")(e.into()))?;
                out.insert(key.trim_start_matches(POOLS_PREFIX).to_string(), n);
            }
            Ok(out)
        })
    }

    fn set_replicas(&self, pool: &str, replicas: u32) -> StoreFuture<'_, ()> {
        let key = format!("{POOLS_PREFIX}{pool}");
        Box::pin(async move {
            let mut client = self.client.clone();
            client.put(key, replicas.to_string(), None).await.map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    fn rollouts(&self) -> StoreFuture<'_, std::collections::BTreeMap<String, kiln_core::pool::RolloutRecord>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let resp = client.get(ROLLOUTS_PREFIX, Some(GetOptions::new().with_prefix())).await.map_err(|e| self.err(e))?;
            let mut out = std::collections::BTreeMap::new();
            for kv in resp.kvs() {
                let key = String::from_utf8_lossy(kv.key());
                let record = serde_json::from_slice(kv.value()).map_err(|e| self.bad_value(kv.key(), "a kiln rollout record")(e.into()))?;
                out.insert(key.trim_start_matches(ROLLOUTS_PREFIX).to_string(), record);
            }
            Ok(out)
        })
    }

    fn set_rollout(&self, pool: &str, record: &kiln_core::pool::RolloutRecord) -> StoreFuture<'_, ()> {
        let key = format!("{ROLLOUTS_PREFIX}{pool}");
        let value = serde_json::to_vec(record).expect("a rollout record serialises");
        Box::pin(async move {
            let mut client = self.client.clone();
            client.put(key, value, None).await.map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    fn tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        Box::pin(self.read_tokens())
    }

    fn token(&self, id: &str) -> StoreFuture<'_, Option<TokenRecord>> {
        let id = id.to_string();
        Box::pin(async move { self.read_token(&id).await })
    }

    fn token_to_check(&self, id: &str) -> StoreFuture<'_, Option<TokenRecord>> {
        let kept = self.last_tokens.lock().expect("last lock").get(id).map(|(record, _)| record.clone());
        match kept {
            Some(record) => Box::pin(async move { Ok(Some(record)) }),
            None => self.token(id),
        }
    }

    fn create_token(&self, record: TokenRecord) -> StoreFuture<'_, bool> {
        Box::pin(async move { self.write_token(&record).await })
    }

    fn remove_token(&self, record: &TokenRecord) -> StoreFuture<'_, bool> {
        let record = record.clone();
        Box::pin(async move { self.delete_token(&record).await })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn flannel_formats() {
        assert_eq!(parse_subnet_key("10.244.1.0-24"), "10.244.1.0/24".parse().ok());
        assert_eq!(parse_subnet_key("10.244.1.0/24"), None);
        let lease: FlannelLease = serde_json::from_str(
            r#"{"PublicIP":"192.0.2.10","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:11:22:33:44:55"}}"#,
        )
        .unwrap();
        assert_eq!(lease.public_ip, Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(lease.backend_data.unwrap().vtep_mac.to_string(), "0e:11:22:33:44:55");
        let c = parse_config("k", br#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!((c.network.to_string(), c.subnet_len, c.vni), ("10.5.0.0/16".into(), 24, 1));
        let err = parse_config("/coreos.com/network/config", br#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#).unwrap_err();
        assert!(err.to_string().contains("/coreos.com/network/config") && err.to_string().contains("host-gw"), "{err}");
        assert!(parse_config("k", br#"{"Network":"10.5.0.0/16","SubnetLen":8}"#).is_err());
        assert!(parse_config("k", b"nope").is_err());
    }

    #[test]
    fn only_a_not_found_status_is_a_lost_lease() {
        let gone = etcd_client::Error::GRpcStatus(tonic::Status::not_found("etcdserver: requested lease not found"));
        assert!(lease_not_found(&gone), "NOT_FOUND");
        let other = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("lease not found, says the text"));
        assert!(!lease_not_found(&other), "the status code decides, not the text");
        assert!(!lease_not_found(&etcd_client::Error::WatchError("lease not found".into())), "not a status");
    }

    /// Debian's etcd (`etcd-server`) on loopback with a temp data
    /// directory, killed when dropped.
    pub(crate) struct LoopbackEtcd {
        child: std::process::Child,
        pub(crate) url: String,
        _data: tempfile::TempDir,
    }

    impl LoopbackEtcd {
        pub(crate) fn start() -> LoopbackEtcd {
            let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let data = tempfile::Builder::new().prefix("kiln-etcd-").tempdir().unwrap();
            let (url, peer) = (format!("http://127.0.0.1:{}", port()), format!("http://127.0.0.1:{}", port()));
            let child = std::process::Command::new("/usr/bin/etcd")
                .args(["--name", "kiln-unit", "--data-dir"])
                .arg(data.path().join("member"))
                .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
                .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("kiln-unit={peer}"), "--initial-cluster-state", "new"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("/usr/bin/etcd (Debian etcd-server) runs");
            LoopbackEtcd { child, url, _data: data }
        }
    }

    impl Drop for LoopbackEtcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn leased_record() -> NodeRecord {
        let now = time::OffsetDateTime::now_utc();
        let node = kiln_core::Node {
            name: "a".into(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            hostname: "a".into(),
            macs: vec![],
            addresses: vec![],
            cpus: 1,
            memory_bytes: 1,
            kernel: "k".into(),
            agent_version: "v".into(),
            image_digest: String::new(),
            metrics: None,
            pool: None,
            host: None,
            out_of_date: None,
            subnet: "10.244.1.0/24".parse().ok(),
            public_ip: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))),
            vtep_mac: "0e:11:22:33:44:55".parse().ok(),
            registered_at: now,
            last_seen: now,
            pending: false,
            state: None,
        };
        NodeRecord { node, token_sha256: "00".into(), key_sha256: None }
    }

    /// A store on `etcd`, once it answers.
    pub(crate) async fn connect(etcd: &LoopbackEtcd) -> EtcdStore {
        for _ in 0..60 {
            match EtcdStore::connect(EtcdConfig::new(vec![etcd.url.clone()]), NetworkConfig::default()).await {
                Ok((store, _)) => return store,
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        panic!("etcd on loopback answers within 30 s");
    }

    #[tokio::test]
    async fn a_write_whose_etcd_lease_is_gone_takes_a_new_one() {
        let etcd = LoopbackEtcd::start();
        let store = connect(&etcd).await;
        let record = leased_record();
        store.write(&record, true).await.expect("the first write grants a lease");
        let first = store.leases.lock().unwrap()["a"].0;
        store.client.clone().lease_revoke(first).await.expect("the lease is revoked behind the store's back");
        store.write(&record, false).await.expect("a write with the lost lease takes a new one");
        let second = store.leases.lock().unwrap()["a"].0;
        assert_ne!(first, second, "a new etcd lease");
        let key = store.subnet_key("10.244.1.0/24".parse().unwrap());
        let got = store.client.clone().get(key.as_str(), None).await.unwrap();
        assert_eq!(got.kvs().first().map(|kv| kv.lease()), Some(second), "the subnet key is on the new lease");
    }

    /// A heartbeat with a renewal due is answered at once; the renewal,
    /// made behind it, keeps the lease alive and writes the node's record.
    /// A lease etcd lost: the heartbeat after the renewal that finds it
    /// gone answers Expired (the node registers again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renewals_run_behind_the_heartbeats() {
        let etcd = LoopbackEtcd::start();
        drop(connect(&etcd).await); // once etcd answers
        // TTL 8 s: a renewal is due every 2 s.
        let config = EtcdConfig { ttl: Duration::from_secs(8), ..EtcdConfig::new(vec![etcd.url.clone()]) };
        let (store, _) = EtcdStore::connect(config, NetworkConfig::default()).await.unwrap();
        let mut record = leased_record();
        store.write(&record, true).await.unwrap();
        let lease = store.leases.lock().unwrap()["a"].0;
        let ttl = |store: &EtcdStore| {
            let mut client = store.client.clone();
            async move { client.lease_time_to_live(lease, None).await.unwrap().ttl() }
        };
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let before = ttl(&store).await;
        record.node.cpus = 7; // what the node said since: the renewal writes it
        assert_eq!(store.keep_alive(&record).await.unwrap(), Renewal::Live, "a renewal was due");
        let key = format!("{NODES_PREFIX}a");
        let mut written = false;
        for _ in 0..50 {
            let got = store.client.clone().get(key.as_str(), None).await.unwrap();
            let record: Option<NodeRecord> = got.kvs().first().map(|kv| serde_json::from_slice(kv.value()).unwrap());
            if record.is_some_and(|r| r.node.cpus == 7) {
                written = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(written, "the renewal wrote the record within 5 s");
        assert!(ttl(&store).await > before, "the lease was renewed: TTL back up from {before} s");
        // The lease lost behind the store's back.
        store.client.clone().lease_revoke(lease).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(store.keep_alive(&record).await.unwrap(), Renewal::Live, "the renewal is queued; it finds the lease gone");
        let mut expired = false;
        for _ in 0..50 {
            if store.keep_alive(&record).await.unwrap() == Renewal::Expired {
                expired = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(expired, "a heartbeat after the failed renewal says Expired within 5 s");
    }

    /// 300 nodes heard at once (a server's start) are put in a few
    /// writes (at most 5), each on this server's lease; a node gone before its put
    /// keeps no key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn liveness_keys_are_put_together() {
        let etcd = LoopbackEtcd::start();
        let store = connect(&etcd).await;
        let mut client = store.client.clone();
        let revision = |r: etcd_client::GetResponse| r.header().map(|h| h.revision()).unwrap();
        let before = revision(client.get("/", None).await.unwrap());
        let names: Vec<String> = (0..300).map(|i| format!("n{i}")).collect();
        for name in &names {
            store.alive.heard(name);
        }
        store.alive.gone(&store.client, "n7").await;
        let prefix = || Some(GetOptions::new().with_prefix());
        let mut got = None;
        for _ in 0..100 {
            let r = client.get(ALIVE_PREFIX, prefix()).await.unwrap();
            if r.kvs().len() >= 299 {
                got = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = got.expect("the 299 keys are put within 5 s");
        let keys: std::collections::BTreeSet<String> = got.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect();
        assert!(!keys.contains(&format!("{ALIVE_PREFIX}n7")), "the node gone before its put has no key");
        assert_eq!(keys.len(), 299, "every other node has its key");
        let lease = store.alive.current().expect("the server's liveness lease");
        assert!(
            got.kvs().iter().all(|kv| kv.lease() == lease && kv.value() == store.config.name.as_bytes()),
            "on the server's lease, with its name"
        );
        // The lease's grant is no write. At most: the first node alone (the
        // task woke before the others were heard), 128, 128, the rest, and
        // n7's delete if its put was under way.
        let writes = revision(got) - before;
        assert!(writes <= 5, "300 keys in {writes} writes: batched, not one a node");
    }

    /// Join tokens on etcd: every behaviour of the embedded store's test,
    /// with two servers sharing the etcd (a token one makes, the other
    /// uses; their concurrent uses of a one-use token: one wins),
    /// and a third started later that finds the tokens kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn join_tokens_on_etcd() {
        use crate::join_tokens::{JoinTokens, tests};
        use std::sync::Arc;
        let etcd = LoopbackEtcd::start();
        let a = Arc::new(JoinTokens::new(Arc::new(connect(&etcd).await)).unwrap());
        let b = Arc::new(JoinTokens::new(Arc::new(connect(&etcd).await)).unwrap());
        tests::every_behaviour(a.clone(), b.clone()).await;
        // Two servers mint with keys of their own; each one's tokens join on either.
        tests::minted_before_a_restart(&a, &b).await;
        let made = tests::before_a_restart(&a).await;
        drop((a, b));
        tests::after_a_restart(&JoinTokens::new(Arc::new(connect(&etcd).await)).unwrap(), made).await;
    }

    /// Registrations written with their tokens' uses, batched, from two
    /// servers on one etcd: see `join_tokens::tests`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registrations_spend_their_uses_on_etcd() {
        use crate::join_tokens::{JoinTokens, tests};
        use std::sync::Arc;
        let etcd = LoopbackEtcd::start();
        let mut servers = Vec::new();
        for _ in 0..2 {
            let store: Arc<dyn Store> = Arc::new(connect(&etcd).await);
            let registry = crate::registry::Registry::open(store.clone(), NetworkConfig::default()).await.unwrap();
            servers.push((registry, Arc::new(JoinTokens::new(store).unwrap())));
        }
        let b = servers.pop().unwrap();
        tests::registrations_spend_their_uses(servers.pop().unwrap(), b).await;
    }
}
