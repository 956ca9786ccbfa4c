//! Where the registry keeps its records.
//!
//! [`Store`] is the backend boundary. Two implement it:
//!
//! - [`embedded::DbStore`], the default: a redb file database in the state
//!   directory. Concurrent writes are group-committed (one fsync for every
//!   write waiting at that moment), so registration latency stays flat when
//!   hundreds of nodes boot at once.
//! - [`etcd::EtcdStore`]: for control planes on several hosts. Leases use
//!   flannel's own schema, so a stock flanneld sharing the etcd and kiln's
//!   nodes see each other.
//!
//! Every write that returns `Ok` is durable. The registry keeps the records
//! in memory and writes through; a store that others write to as well
//! (etcd) reports their changes through [`Store::watch`].
//!
//! Heartbeats are the exception: 10,000 nodes heartbeating every 10 s
//! would be 1,000 writes a second, every one of them in the way of the
//! registrations. On the embedded store a heartbeat writes the node's
//! `last_seen` when its last write is [`RENEW_EVERY`] old (or a quarter of
//! the lease TTL, if that is shorter); on etcd, when its subnet lease is
//! renewed, as often (a node with no lease: never). So after a crash the
//! store's `last_seen` may be behind; the registry counts a node's silence
//! from its own start at the earliest, so no live node is taken for a
//! silent one. On the embedded store a server that stops cleanly writes
//! what is behind first ([`Store::settle`]).
//!
//! Join tokens ([`TokenRecord`]) are not kept in memory: the
//! `join_tokens` module reads them through on every use, so a token
//! another server made on the same etcd is seen at once. A use is counted
//! in the write that records the node it admits ([`Store::put_spending`]),
//! atomically on each backend.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use kiln_core::{JoinTokenInfo, Node, Peer};
use serde::{Deserialize, Serialize};

pub mod embedded;
pub mod etcd;

/// A heartbeat writes the node's `last_seen` (and on etcd renews its lease)
/// when the last write is this old, or a quarter of the TTL if that is
/// shorter.
pub const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// A node as the registry keeps it: the public record and its token's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// What `/api/v1/nodes` shows.
    pub node: Node,
    /// Hex sha256 of the node's current token.
    pub token_sha256: String,
    /// Hex sha256 of the node's public key (SubjectPublicKeyInfo), when it
    /// registered with a CSR: the key its certificates must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
}

/// A join token as the store keeps it: what `kiln token list` shows and
/// the sha256 of its secret. Never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token, less its secret.
    pub info: JoinTokenInfo,
    /// Hex sha256 of the secret part (the 16 characters after the dot).
    pub secret_sha256: String,
    /// Minted by the boot path for `info.mac`, not made by an operator.
    #[serde(default)]
    pub minted: bool,
}

/// One use of a join token, spent in the same transaction as the
/// registration it admits ([`Store::put_spending`]).
#[derive(Clone)]
pub struct Spend {
    /// The token's ID.
    pub id: String,
    /// The hex sha256 of the secret presented: the stored token must have it.
    pub secret_sha256: String,
    /// Whether the token, as stored at that moment, admits the registration
    /// (expiry, uses left, pool, MAC).
    pub check: SpendCheck,
}

/// [`Spend::check`].
pub type SpendCheck = std::sync::Arc<dyn Fn(&TokenRecord) -> Result<(), crate::join_tokens::Refused> + Send + Sync>;

/// What [`Store::put_spending`] did: the token after its use, or why it
/// refused (and nothing was written).
pub type Spent = Result<TokenRecord, crate::join_tokens::Refused>;

impl TokenRecord {
    /// The record after `n` more uses, or `None` if it has fewer left.
    pub fn spent(&self, n: u32) -> Option<TokenRecord> {
        let mut next = self.clone();
        if let Some(left) = &mut next.info.uses_left {
            *left = left.checked_sub(n)?;
        }
        next.info.used = next.info.used.saturating_add(n);
        Some(next)
    }
}

/// A store failed. Each variant names the file or key and carries the
/// backend's own error as its source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file of the store.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A record in the store's file is not a kiln node (or join token) record.
    #[error("{path}: {what} is not a kiln record")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Which record (`node "a"`, or `the registry file`).
        what: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The database refused an operation. Shared: one failed commit
    /// answers every write of its batch.
    #[error("{path}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// What redb said.
        #[source]
        source: Arc<redb::Error>,
    },
    /// etcd could not be reached or refused an operation.
    #[error("etcd {endpoints}")]
    Etcd {
        /// The endpoints.
        endpoints: String,
        /// What etcd-client said.
        #[source]
        source: etcd_client::Error,
    },
    /// A value under a key of etcd is not what kiln writes there.
    #[error("etcd {endpoints}: {key} is not {what}")]
    EtcdValue {
        /// The endpoints.
        endpoints: String,
        /// The key.
        key: String,
        /// What kiln expected (`a kiln node record`, `a number of replicas`).
        what: &'static str,
        /// Why it does not parse.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// etcd's network config is not flannel's JSON.
    #[error("etcd {key}: not flannel's network config JSON")]
    NetworkConfigJson {
        /// The key.
        key: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// etcd holds a network config kiln cannot use.
    #[error("etcd {key}: {reason}")]
    NetworkConfig {
        /// The key.
        key: String,
        /// What kiln cannot use, in words.
        reason: String,
    },
    /// The subnet was leased by someone else between choosing and writing
    /// it (another control plane or a flanneld on the same etcd).
    #[error("subnet {0} was leased by another writer")]
    Taken(kiln_core::Ipv4Cidr),
    /// A key changed under each try of a conditional write: other writers
    /// on the same etcd.
    #[error("etcd {key}: changed by another writer on each of {tries} tries")]
    Contended {
        /// The key.
        key: String,
        /// The tries made.
        tries: usize,
    },
    /// The store's writer is gone (the server is shutting down).
    #[error("the store is closed")]
    Closed,
    /// The write of a batch of registrations failed (etcd).
    #[error("writing a batch of registrations")]
    Batch {
        /// Why.
        #[source]
        source: std::sync::Arc<Error>,
    },
}

/// What a store holds when it is opened.
#[derive(Debug, Default)]
pub struct Loaded {
    /// kiln's node records.
    pub records: Vec<NodeRecord>,
    /// Leases held by others: nodes of a stock flanneld sharing the store.
    pub foreign: Vec<Peer>,
    /// Nodes some server sharing the store heard from within the grace
    /// period (etcd's `/kiln/alive/`); empty for a store of one server.
    pub alive: Vec<String>,
}

/// Something another writer changed in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A node record was written (by another control plane).
    NodePut(Box<NodeRecord>),
    /// A node record was removed.
    NodeDeleted(String),
    /// A subnet lease was written; the registry tells kiln's own from
    /// foreign ones by the node records.
    LeasePut(Peer),
    /// A subnet lease was removed or expired.
    LeaseDeleted(kiln_core::Ipv4Cidr),
    /// Another server heard from the node within the grace period
    /// (`live`), or no other server has any more.
    Alive {
        /// The node.
        name: String,
        /// Heard from.
        live: bool,
    },
}

/// What renewing a node's lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed (or not due yet).
    Live,
    /// The lease had already expired: the node must register again.
    Expired,
}

/// A store operation in flight.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// A registry backend.
pub trait Store: Send + Sync {
    /// Every record, as last written.
    fn load(&self) -> StoreFuture<'_, Loaded>;
    /// Creates or replaces the record of `record.node.name`, with its lease.
    /// `fresh_subnet`: the subnet was just chosen and must not be leased
    /// by anyone yet ([`Error::Taken`] if it is).
    fn put(&self, record: NodeRecord, fresh_subnet: bool) -> StoreFuture<'_, ()>;
    /// Records a heartbeat: renews the node's lease and writes its
    /// `last_seen` when the last write is [`RENEW_EVERY`] old (on etcd,
    /// behind the heartbeat's answer).
    fn renew(&self, record: NodeRecord) -> StoreFuture<'_, Renewal>;
    /// Sets how long the registry keeps a silent node
    /// ([`crate::registry::Lifecycle::lease_ttl`]): a heartbeat's write is
    /// due after a quarter of it, if that is shorter than [`RENEW_EVERY`].
    fn set_lease_ttl(&self, _ttl: std::time::Duration) {}
    /// Writes what heartbeats left behind: the `last_seen` of `records`
    /// heard from since their last write. Called when the server stops.
    fn settle(&self, _records: Vec<NodeRecord>) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// Removes the record of `record.node.name` and releases its lease (no
    /// error if there is none).
    fn remove(&self, record: NodeRecord) -> StoreFuture<'_, ()>;
    /// Changes made by other writers, from the moment of [`Store::load`]
    /// on; `None` for a store nobody else writes to. Taken once.
    fn watch(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Change>> {
        None
    }
    /// What the store is, for logs: `redb /var/lib/kiln/registry.redb`.
    fn describe(&self) -> String;
    /// Every pool's desired replicas, as last set (`kiln scale`).
    fn replicas(&self) -> StoreFuture<'_, std::collections::BTreeMap<String, u32>>;
    /// Sets `pool`'s desired replicas.
    fn set_replicas(&self, pool: &str, replicas: u32) -> StoreFuture<'_, ()>;
    /// Every pool's rollout settings (`kiln rollout pause|resume|undo`).
    fn rollouts(&self) -> StoreFuture<'_, std::collections::BTreeMap<String, kiln_core::pool::RolloutRecord>>;
    /// Sets `pool`'s rollout settings.
    fn set_rollout(&self, pool: &str, record: &kiln_core::pool::RolloutRecord) -> StoreFuture<'_, ()>;
    /// Every join token, as last written.
    fn tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>>;
    /// The join token `id`, read now (on etcd: a get of its key).
    fn token(&self, id: &str) -> StoreFuture<'_, Option<TokenRecord>>;
    /// The join token `id` as a registration first checks it, before
    /// [`Store::put_spending`] checks it again as stored: on etcd, as this
    /// server last wrote it when it did (no read), else read now.
    fn token_to_check(&self, id: &str) -> StoreFuture<'_, Option<TokenRecord>> {
        self.token(id)
    }
    /// Writes a new token; `false` (and nothing written) if its ID is
    /// taken.
    fn create_token(&self, record: TokenRecord) -> StoreFuture<'_, bool>;
    /// [`Store::put`] and one use of a join token in one transaction: the
    /// node is written only if `spend` still admits the token as stored,
    /// and then the use is counted with it; a registration costs one
    /// durable write, not two. (etcd: the registrations of one token at
    /// once are written in one txn.)
    fn put_spending(&self, record: NodeRecord, fresh_subnet: bool, spend: Spend) -> StoreFuture<'_, Spent>;
    /// Removes the token; whether it was there.
    fn remove_token(&self, record: &TokenRecord) -> StoreFuture<'_, bool>;
}
