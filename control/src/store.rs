//! Where the registry keeps its records.
//!
//! [`Store`] is the backend boundary: the embedded [`FileStore`] is the
//! default; an etcd store implements the same trait.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_core::Node;
use serde::{Deserialize, Serialize};

/// A node as the registry keeps it: the public record and its token's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// What `/api/v1/nodes` shows.
    pub node: Node,
    /// Hex sha256 of the node's current token.
    pub token_sha256: String,
}

/// A store failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the store's file.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The store's file does not hold a registry.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A registry backend. Writes are whole records, and a write that returns
/// `Ok` is durable.
pub trait Store: Send + Sync {
    /// Every record, as last written.
    fn load(&self) -> Result<Vec<NodeRecord>, Error>;
    /// Creates or replaces the record of `record.node.name`.
    fn put(&self, record: &NodeRecord) -> Result<(), Error>;
    /// Removes the record of `name` (no error if there is none).
    fn remove(&self, name: &str) -> Result<(), Error>;
}

/// The embedded store: every record in one JSON file, rewritten to a
/// temporary name, synced and renamed over the old one on each write, so a
/// crash leaves either the old or the new file, never half of one.
pub struct FileStore {
    path: PathBuf,
    records: Mutex<Vec<NodeRecord>>,
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    nodes: Vec<NodeRecord>,
}

impl FileStore {
    /// Opens (or starts) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let records = match std::fs::read(path) {
            Ok(bytes) => {
                let f: FileFormat =
                    serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt { path: path.into(), reason: e.to_string() })?;
                f.nodes
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(Error::Io { path: path.into(), source }),
        };
        Ok(FileStore { path: path.into(), records: Mutex::new(records) })
    }

    fn write(&self, records: &[NodeRecord]) -> Result<(), Error> {
        let io = |source| Error::Io { path: self.path.clone(), source };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new().prefix(".nodes.").tempfile_in(dir).map_err(io)?;
        let body = serde_json::to_vec_pretty(&FileFormat { version: 1, nodes: records.to_vec() }).expect("records serialise");
        tmp.write_all(&body).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&self.path).map_err(|e| io(e.error))?;
        Ok(())
    }
}

impl Store for FileStore {
    fn load(&self) -> Result<Vec<NodeRecord>, Error> {
        Ok(self.records.lock().expect("store lock").clone())
    }

    fn put(&self, record: &NodeRecord) -> Result<(), Error> {
        let mut records = self.records.lock().expect("store lock");
        let mut next = records.clone();
        match next.iter_mut().find(|r| r.node.name == record.node.name) {
            Some(r) => *r = record.clone(),
            None => next.push(record.clone()),
        }
        self.write(&next)?;
        *records = next;
        Ok(())
    }

    fn remove(&self, name: &str) -> Result<(), Error> {
        let mut records = self.records.lock().expect("store lock");
        let next: Vec<NodeRecord> = records.iter().filter(|r| r.node.name != name).cloned().collect();
        self.write(&next)?;
        *records = next;
        Ok(())
    }
}
