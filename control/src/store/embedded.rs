//! The embedded store: node records in a redb database file
//! (`STATE/registry.redb`), one key per node, JSON values.
//!
//! redb commits are crash-safe (a killed server leaves the last committed
//! state) and durable when `commit` returns. Writes go through one writer
//! thread that commits every write waiting at that moment in a single
//! transaction (group commit): 200 nodes registering at once cost a few
//! fsyncs, not 200.
//!
//! A state directory from before the database (`nodes.json`) is imported
//! once, on first open.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{Error, Loaded, NodeRecord, Renewal, Store, StoreFuture};

const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
/// Desired replicas by pool.
const POOLS: TableDefinition<&str, u32> = TableDefinition::new("pool_replicas");

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 512;

enum Op {
    Put(Box<NodeRecord>),
    Remove(String),
    Replicas(String, u32),
}

struct Pending {
    op: Op,
    done: oneshot::Sender<Result<(), Error>>,
}

/// The embedded store. See the module docs.
pub struct DbStore {
    path: PathBuf,
    db: std::sync::Arc<Database>,
    writer: Option<mpsc::Sender<Pending>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for DbStore {
    /// Closes the database: the writer finishes what is queued, and the
    /// file is free to open again when this returns.
    fn drop(&mut self) {
        self.writer.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn db_error(path: &Path, e: impl Into<redb::Error>) -> Error {
    Error::Db { path: path.into(), source: std::sync::Arc::new(e.into()) }
}

impl DbStore {
    /// Opens (or creates) the database at `path`. If it is new and
    /// `legacy_json` exists (the registry file of earlier versions), its
    /// records are imported.
    pub fn open(path: &Path, legacy_json: Option<&Path>) -> Result<Self, Error> {
        // An empty file is one this made and a crash left before redb wrote to it.
        let existed = std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
        if !path.exists() {
            // redb makes its file with the umask's mode; kiln's state files are
            // 0600 from their first byte (an empty file is a new database to redb).
            crate::state_dir::create_private(path).map_err(|source| Error::Io { path: path.into(), source })?;
        }
        let db = Database::create(path).map_err(|e| db_error(path, e))?;
        let txn = db.begin_write().map_err(|e| db_error(path, e))?;
        {
            txn.open_table(POOLS).map_err(|e| db_error(path, e))?;
            let mut table = txn.open_table(NODES).map_err(|e| db_error(path, e))?;
            if !existed && let Some(json) = legacy_json {
                for record in read_legacy(json)? {
                    let value = serde_json::to_vec(&record).expect("records serialise");
                    table.insert(record.node.name.as_str(), value.as_slice()).map_err(|e| db_error(path, e))?;
                }
            }
        }
        txn.commit().map_err(|e| db_error(path, e))?;
        let db = std::sync::Arc::new(db);
        let (writer, queue) = mpsc::channel::<Pending>();
        let (thread_db, thread_path) = (db.clone(), path.to_path_buf());
        let thread = std::thread::Builder::new()
            .name("kiln-store".into())
            .spawn(move || write_loop(&thread_db, &thread_path, &queue))
            .map_err(|source| Error::Io { path: path.into(), source })?;
        Ok(DbStore { path: path.into(), db, writer: Some(writer), thread: Some(thread) })
    }

    fn submit(&self, op: Op) -> StoreFuture<'_, ()> {
        let (done, result) = oneshot::channel();
        let sent = self.writer.as_ref().ok_or(()).and_then(|w| w.send(Pending { op, done }).map_err(|_| ()));
        Box::pin(async move {
            sent.map_err(|_| Error::Closed)?;
            result.await.map_err(|_| Error::Closed)?
        })
    }
}

/// The writer thread: takes every write waiting, commits them together,
/// answers each. Ends when the store is dropped.
fn write_loop(db: &Database, path: &Path, queue: &mpsc::Receiver<Pending>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let result = commit(db, &batch).map_err(std::sync::Arc::new);
        for p in batch {
            let answer = result.clone().map_err(|source| Error::Db { path: path.into(), source });
            let _ = p.done.send(answer);
        }
    }
}

fn commit(db: &Database, batch: &[Pending]) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(NODES)?;
        let mut pools = txn.open_table(POOLS)?;
        for p in batch {
            match &p.op {
                Op::Put(record) => {
                    let value = serde_json::to_vec(record).expect("records serialise");
                    table.insert(record.node.name.as_str(), value.as_slice())?;
                }
                Op::Remove(name) => {
                    table.remove(name.as_str())?;
                }
                Op::Replicas(pool, n) => {
                    pools.insert(pool.as_str(), *n)?;
                }
            }
        }
    }
    Ok(txn.commit()?)
}

fn read_legacy(path: &Path) -> Result<Vec<NodeRecord>, Error> {
    #[derive(serde::Deserialize)]
    struct FileFormat {
        nodes: Vec<NodeRecord>,
    }
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<FileFormat>(&bytes).map(|f| f.nodes).map_err(|source| Error::Corrupt {
            path: path.into(),
            what: "the registry file".into(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(Error::Io { path: path.into(), source }),
    }
}

impl Store for DbStore {
    fn load(&self) -> StoreFuture<'_, Loaded> {
        let result = (|| {
            let txn = self.db.begin_read().map_err(|e| db_error(&self.path, e))?;
            let table = txn.open_table(NODES).map_err(|e| db_error(&self.path, e))?;
            let mut records = Vec::new();
            for entry in table.iter().map_err(|e| db_error(&self.path, e))? {
                let (key, value) = entry.map_err(|e| db_error(&self.path, e))?;
                let record: NodeRecord = serde_json::from_slice(value.value()).map_err(|source| Error::Corrupt {
                    path: self.path.clone(),
                    what: format!("node {:?}", key.value()),
                    source,
                })?;
                records.push(record);
            }
            Ok(Loaded { records, foreign: Vec::new() })
        })();
        Box::pin(async move { result })
    }

    fn put(&self, record: NodeRecord, _fresh_subnet: bool) -> StoreFuture<'_, ()> {
        // One process owns the file: the registry's lock already keeps
        // subnets unique.
        self.submit(Op::Put(Box::new(record)))
    }

    fn renew(&self, record: NodeRecord) -> StoreFuture<'_, Renewal> {
        let write = self.submit(Op::Put(Box::new(record)));
        Box::pin(async move { write.await.map(|()| Renewal::Live) })
    }

    fn remove(&self, record: NodeRecord) -> StoreFuture<'_, ()> {
        self.submit(Op::Remove(record.node.name))
    }

    fn describe(&self) -> String {
        format!("redb {}", self.path.display())
    }

    fn replicas(&self) -> StoreFuture<'_, std::collections::BTreeMap<String, u32>> {
        let result = (|| {
            let txn = self.db.begin_read().map_err(|e| db_error(&self.path, e))?;
            let table = txn.open_table(POOLS).map_err(|e| db_error(&self.path, e))?;
            let mut out = std::collections::BTreeMap::new();
            for entry in table.iter().map_err(|e| db_error(&self.path, e))? {
                let (k, v) = entry.map_err(|e| db_error(&self.path, e))?;
                out.insert(k.value().to_string(), v.value());
            }
            Ok(out)
        })();
        Box::pin(async move { result })
    }

    fn set_replicas(&self, pool: &str, replicas: u32) -> StoreFuture<'_, ()> {
        self.submit(Op::Replicas(pool.to_string(), replicas))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pool_replicas_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::StateDir::new(dir.path()).registry_db();
        {
            let store = DbStore::open(&path, None).unwrap();
            assert!(store.replicas().await.unwrap().is_empty());
            store.set_replicas("tiny", 3).await.unwrap();
            store.set_replicas("worker", 2).await.unwrap();
            store.set_replicas("tiny", 1).await.unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "the database is private");
        let store = DbStore::open(&path, None).unwrap();
        let got = store.replicas().await.unwrap();
        assert_eq!(got, std::collections::BTreeMap::from([("tiny".to_string(), 1), ("worker".to_string(), 2)]));
    }
}
