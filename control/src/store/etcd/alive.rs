//! Which nodes some server has heard from lately, shared by every server
//! on one etcd, so a node heartbeating to one server is Ready on all of
//! them (the leader's rollouts and autoscaler count Ready nodes).
//!
//! `/kiln/alive/<name>` is there while a server has heard from the node
//! within the grace period (`--node-grace`). Its value is the server's
//! name; it is attached to that server's own liveness lease (TTL: the
//! grace period), one lease a server, kept alive every quarter of it.
//!
//! - A heartbeat to a server that does not hold the node's key puts it
//!   there, on its lease: a write when a node comes alive or moves to
//!   another server, none while it keeps heartbeating to the same one.
//!   The puts waiting are written together, up to [`PUTS_PER_TXN`] in one
//!   transaction: after a server starts, every node's first heartbeat
//!   asks for one, and 10,000 nodes are then 79 writes, not 10,000.
//! - Every quarter of the grace period, each server deletes the keys it
//!   holds of nodes silent there for the grace period (only if still on
//!   its lease: another server may hold it now).
//! - A server that dies renews nothing: its lease ends within the grace
//!   period, and with it every key it held.
//!
//! So a node that goes silent is NotReady everywhere within the grace
//! period and a quarter of it. This is Kubernetes' node lease (the kubelet
//! renews `coordination.k8s.io` Leases) turned round: the renewals are one
//! etcd lease's, a server's, not a write per node.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};

/// Where the keys are.
pub const ALIVE_PREFIX: &str = "/kiln/alive/";

/// Keys put in one transaction at most (etcd's `--max-txn-ops` is 128 by default).
const PUTS_PER_TXN: usize = 128;

/// This server's side: its lease and the keys it holds.
pub(super) struct Alive {
    /// The grace period: the lease's TTL, and how long a node may be silent.
    grace: Duration,
    /// The name written in each key held.
    server: String,
    /// This server's liveness lease, once granted.
    lease: Mutex<Option<i64>>,
    /// Held while the lease is granted: one grant at a time.
    granting: tokio::sync::Mutex<()>,
    /// Nodes whose key this server holds → when it last heard from each.
    held: Mutex<HashMap<String, Instant>>,
    /// Held nodes whose key is not put yet, in the order heard.
    pending: super::Queue<String>,
}

fn key(name: &str) -> String {
    format!("{ALIVE_PREFIX}{name}")
}

impl Alive {
    pub(super) fn new(grace: Duration, server: String) -> Alive {
        Alive {
            grace: grace.max(Duration::from_secs(4)),
            server,
            lease: Mutex::default(),
            granting: Default::default(),
            held: Mutex::default(),
            pending: Default::default(),
        }
    }

    /// A heartbeat from `name` reached this server: its key is put on
    /// this server's lease unless this server holds it already. The put is
    /// [`Alive::put_pending`]'s, so the heartbeat's answer does not wait
    /// for etcd; when it fails, the next heartbeat asks again.
    pub(super) fn heard(&self, name: &str) {
        {
            let mut held = self.held.lock().expect("alive lock");
            if let Some(at) = held.get_mut(name) {
                *at = Instant::now();
                return;
            }
            held.insert(name.to_string(), Instant::now());
        }
        self.pending.push(name.to_string());
    }

    /// Puts the keys [`Alive::heard`] asked for, as they come: all those
    /// waiting, [`PUTS_PER_TXN`] at most in one transaction (one write to
    /// etcd's log, one watch event batch back), one transaction at a time.
    pub(super) async fn put_pending(&self, client: Client) {
        loop {
            let mut batch = self.pending.next(PUTS_PER_TXN).await;
            batch.retain(|name| self.held.lock().expect("alive lock").contains_key(name));
            // etcd refuses a txn that names a key twice (a node heard again
            // after its key went, its first put still waiting).
            batch.sort_unstable();
            batch.dedup();
            if batch.is_empty() {
                continue;
            }
            let put = async {
                let lease = self.lease(&client).await?;
                let with_lease = || Some(PutOptions::new().with_lease(lease));
                let puts: Vec<TxnOp> = batch.iter().map(|n| TxnOp::put(key(n), self.server.as_str(), with_lease())).collect();
                client.clone().txn(Txn::new().and_then(puts)).await
            };
            let failed = match tokio::time::timeout(super::CALL_TIMEOUT, put).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("etcd did not answer".to_string()),
            };
            if let Some(e) = failed {
                let mut held = self.held.lock().expect("alive lock");
                for name in &batch {
                    held.remove(name);
                }
                tracing::debug!(nodes = batch.len(), "etcd: putting nodes' liveness keys: {e}");
                continue;
            }
            // A node that left while its key was being put: the key goes.
            let left: Vec<&String> = {
                let held = self.held.lock().expect("alive lock");
                batch.iter().filter(|name| !held.contains_key(*name)).collect()
            };
            for name in left {
                let _ = self.delete_if_ours(&client, name).await;
            }
        }
    }

    /// The node's key was put on `lease` (`None`: deleted). True when
    /// another server holds it now; when it is gone or another's, this
    /// server holds it no more.
    pub(super) fn seen(&self, name: &str, lease: Option<i64>) -> bool {
        let ours = lease.is_some() && lease == self.current();
        let mut held = self.held.lock().expect("alive lock");
        if ours {
            // A put whose answer was lost (counted failed) still landed:
            // held from now, so the sweep deletes it if the node is silent.
            held.entry(name.to_string()).or_insert_with(Instant::now);
        } else {
            held.remove(name);
        }
        lease.is_some() && !ours
    }

    /// The node left (or was removed): its key goes now, not after the grace period.
    pub(super) async fn gone(&self, client: &Client, name: &str) {
        if self.held.lock().expect("alive lock").remove(name).is_some() {
            let _ = self.delete_if_ours(client, name).await;
        }
    }

    pub(super) fn current(&self) -> Option<i64> {
        *self.lease.lock().expect("alive lock")
    }

    /// This server's lease, granted (and kept alive by [`Alive::run`]) the first time.
    async fn lease(&self, client: &Client) -> Result<i64, etcd_client::Error> {
        if let Some(id) = self.current() {
            return Ok(id);
        }
        let _one = self.granting.lock().await;
        if let Some(id) = self.current() {
            return Ok(id);
        }
        let id = client.clone().lease_grant(self.grace.as_secs() as i64, None).await?.id();
        *self.lease.lock().expect("alive lock") = Some(id);
        Ok(id)
    }

    async fn delete_if_ours(&self, client: &Client, name: &str) -> Result<(), etcd_client::Error> {
        let Some(lease) = self.current() else { return Ok(()) };
        let k = key(name);
        let txn = Txn::new().when([Compare::lease(k.as_str(), CompareOp::Equal, lease)]).and_then([TxnOp::delete(k.as_str(), None)]);
        client.clone().txn(txn).await.map(drop)
    }

    /// Every quarter of the grace period: renews this server's lease (a
    /// new one, and every key put again at the next heartbeat, if it was
    /// lost), and deletes the keys of nodes silent here for the grace period.
    pub(super) async fn run(&self, client: Client) {
        loop {
            tokio::time::sleep(self.grace / 4).await;
            if let Some(id) = self.current()
                && !matches!(super::renew::keep_alive(&client, id).await, super::renew::Kept::Live)
            {
                tracing::warn!(
                    lease = format!("{id:x}"),
                    "etcd: this server's liveness lease was lost; nodes' keys go back at their next heartbeat"
                );
                *self.lease.lock().expect("alive lock") = None;
                self.held.lock().expect("alive lock").clear();
                continue;
            }
            let quiet: Vec<String> = {
                let mut held = self.held.lock().expect("alive lock");
                let quiet: Vec<String> = held.iter().filter(|(_, at)| at.elapsed() > self.grace).map(|(n, _)| n.clone()).collect();
                for name in &quiet {
                    held.remove(name);
                }
                quiet
            };
            for name in quiet {
                if let Err(e) = self.delete_if_ours(&client, &name).await {
                    tracing::warn!(node = %name, "etcd: deleting a silent node's liveness key: {e}");
                }
            }
        }
    }
}
