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

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use kiln_core::{Node, Peer};
use serde::{Deserialize, Serialize};

pub mod embedded;
pub mod etcd;

/// A node as the registry keeps it: the public record and its token's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// What `/api/v1/nodes` shows.
    pub node: Node,
    /// Hex sha256 of the node's current token.
    pub token_sha256: String,
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
    /// A record in the store's file is not a kiln node record.
    #[error("{path}: {what} is not a kiln node record")]
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
    /// The store's writer is gone (the server is shutting down).
    #[error("the store is closed")]
    Closed,
}

/// What a store holds when it is opened.
#[derive(Debug, Default)]
pub struct Loaded {
    /// kiln's node records.
    pub records: Vec<NodeRecord>,
    /// Leases held by others: nodes of a stock flanneld sharing the store.
    pub foreign: Vec<Peer>,
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
    /// Records a heartbeat: renews the node's lease (and its `last_seen`).
    fn renew(&self, record: NodeRecord) -> StoreFuture<'_, Renewal>;
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
}
