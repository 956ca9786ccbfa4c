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
//!
//! A heartbeat is written when the node's last write is
//! [`super::RENEW_EVERY`] old (a quarter of the lease TTL if shorter); until
//! then it is only in the registry's memory, and [`Store::settle`] writes
//! what is behind when the server stops.
//!
//! Join tokens are in table `join_tokens` (ID → JSON [`TokenRecord`]). A use is
//! counted in the writer thread: its transaction reads the token, checks it
//! is still the one the caller read (the same secret hash) and that the
//! change applies (a use left), and writes it back. The writer is the only
//! one, so two uses of a one-use token cannot both be counted, and
//! concurrent uses of one token never have to retry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{Error, Loaded, NodeRecord, Renewal, Spend, Spent, Store, StoreFuture, TokenRecord};

const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
/// Desired replicas by pool.
const POOLS: TableDefinition<&str, u32> = TableDefinition::new("pool_replicas");
/// Rollout settings by pool (a `RolloutRecord` as JSON).
const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("pool_rollouts");
/// Join tokens by ID.
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("join_tokens");

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 512;

enum Op {
    Put(Box<NodeRecord>),
    /// A node put with one use of the token that admits it.
    PutSpending(Box<NodeRecord>, Spend),
    /// A heartbeat's record, put only over the same registration (the same
    /// token hash): a heartbeat that races a removal or a registration
    /// again does not bring back, or overwrite, what those wrote.
    Renew(Box<NodeRecord>),
    /// A node removed: its name and token hash (a registration again
    /// meanwhile, with a new token, is kept).
    Remove(String, String),
    Replicas(String, u32),
    Rollout(String, Vec<u8>),
    CreateToken(Box<TokenRecord>),
    RemoveToken(Box<TokenRecord>),
}

/// What a write did, for the writes that answer more than `Ok`.
enum Outcome {
    Done,
    /// Whether a token was written (created) or was there (removed).
    Token(bool),
    Spent(Spent),
}

struct Pending {
    op: Op,
    done: oneshot::Sender<Result<Outcome, Error>>,
}

/// The embedded store. See the module docs.
pub struct DbStore {
    path: PathBuf,
    db: std::sync::Arc<Database>,
    writer: Option<mpsc::Sender<Pending>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// By node: when its record was last written, and whether a heartbeat
    /// since is not.
    written: Mutex<HashMap<String, Written>>,
    /// A heartbeat is written when the last write is this old.
    renew_every: Mutex<Duration>,
}

struct Written {
    at: Instant,
    behind: bool,
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
            txn.open_table(ROLLOUTS).map_err(|e| db_error(path, e))?;
            txn.open_table(TOKENS).map_err(|e| db_error(path, e))?;
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
        Ok(DbStore {
            path: path.into(),
            db,
            writer: Some(writer),
            thread: Some(thread),
            written: Mutex::default(),
            renew_every: Mutex::new(super::RENEW_EVERY),
        })
    }

    fn submit(&self, op: Op) -> StoreFuture<'_, Outcome> {
        let (done, result) = oneshot::channel();
        let sent = self.writer.as_ref().ok_or(()).and_then(|w| w.send(Pending { op, done }).map_err(|_| ()));
        Box::pin(async move {
            sent.map_err(|_| Error::Closed)?;
            result.await.map_err(|_| Error::Closed)?
        })
    }

    /// Notes that `name`'s whole record was just written.
    fn wrote(&self, name: &str) {
        self.written.lock().expect("written lock").insert(name.to_string(), Written { at: Instant::now(), behind: false });
    }

    /// A write whose answer is only `Ok`.
    fn write(&self, op: Op) -> StoreFuture<'_, ()> {
        let write = self.submit(op);
        Box::pin(async move { write.await.map(|_| ()) })
    }

    /// A token write, answering whether it wrote (or found) the token.
    fn write_token(&self, op: Op) -> StoreFuture<'_, bool> {
        let write = self.submit(op);
        Box::pin(async move { write.await.map(|o| matches!(o, Outcome::Token(true))) })
    }

    /// Reads `f` of a read transaction, with the database's errors named.
    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T, Error>) -> Result<T, Error> {
        let txn = self.db.begin_read().map_err(|e| db_error(&self.path, e))?;
        f(&txn)
    }

    fn parse_token(&self, id: &str, value: &[u8]) -> Result<TokenRecord, Error> {
        let record = serde_json::from_slice(value).map_err(|source| Error::Corrupt {
            path: self.path.clone(),
            what: format!("join token {id:?}"),
            source,
        })?;
        Ok(record)
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
        match commit(db, &batch) {
            Ok(outcomes) => {
                for (p, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = p.done.send(Ok(outcome));
                }
            }
            Err(e) => {
                let source = std::sync::Arc::new(e);
                for p in batch {
                    let _ = p.done.send(Err(Error::Db { path: path.into(), source: source.clone() }));
                }
            }
        }
    }
}

/// The tables a batch writes.
struct Tables<'t> {
    nodes: redb::Table<'t, &'static str, &'static [u8]>,
    pools: redb::Table<'t, &'static str, u32>,
    rollouts: redb::Table<'t, &'static str, &'static [u8]>,
    tokens: redb::Table<'t, &'static str, &'static [u8]>,
}

fn commit(db: &Database, batch: &[Pending]) -> Result<Vec<Outcome>, redb::Error> {
    let txn = db.begin_write()?;
    let mut outcomes = Vec::with_capacity(batch.len());
    {
        let mut t = Tables {
            nodes: txn.open_table(NODES)?,
            pools: txn.open_table(POOLS)?,
            rollouts: txn.open_table(ROLLOUTS)?,
            tokens: txn.open_table(TOKENS)?,
        };
        for p in batch {
            outcomes.push(apply(&mut t, &p.op)?);
        }
    }
    txn.commit()?;
    Ok(outcomes)
}

fn apply(t: &mut Tables<'_>, op: &Op) -> Result<Outcome, redb::Error> {
    match op {
        Op::Put(record) => {
            let value = serde_json::to_vec(record).expect("records serialise");
            t.nodes.insert(record.node.name.as_str(), value.as_slice())?;
        }
        Op::PutSpending(record, spend) => return put_spending(t, record, spend).map(Outcome::Spent),
        Op::Renew(record) => {
            if same_registration(t, &record.node.name, &record.token_sha256)? {
                let value = serde_json::to_vec(record).expect("records serialise");
                t.nodes.insert(record.node.name.as_str(), value.as_slice())?;
            }
        }
        Op::Remove(name, token_sha256) => {
            if same_registration(t, name, token_sha256)? {
                t.nodes.remove(name.as_str())?;
            }
        }
        Op::Replicas(pool, n) => {
            t.pools.insert(pool.as_str(), *n)?;
        }
        Op::Rollout(pool, json) => {
            t.rollouts.insert(pool.as_str(), json.as_slice())?;
        }
        Op::CreateToken(record) => return create_token(t, record).map(Outcome::Token),
        Op::RemoveToken(record) => return Ok(Outcome::Token(t.tokens.remove(record.info.id.as_str())?.is_some())),
    }
    Ok(Outcome::Done)
}

/// Whether node `name`'s stored record has the token hash `token_sha256`.
/// A record that does not parse is not the same (`load` names it).
fn same_registration(t: &Tables<'_>, name: &str, token_sha256: &str) -> Result<bool, redb::Error> {
    let Some(value) = t.nodes.get(name)? else { return Ok(false) };
    Ok(serde_json::from_slice::<NodeRecord>(value.value()).is_ok_and(|r| r.token_sha256 == token_sha256))
}

fn create_token(t: &mut Tables<'_>, record: &TokenRecord) -> Result<bool, redb::Error> {
    let id = record.info.id.as_str();
    if t.tokens.get(id)?.is_some() {
        return Ok(false);
    }
    let value = serde_json::to_vec(record).expect("records serialise");
    t.tokens.insert(id, value.as_slice())?;
    Ok(true)
}

/// Writes `record` if `spend`'s token, as stored now, admits it, and
/// counts the use: both or neither, in the batch's transaction.
fn put_spending(t: &mut Tables<'_>, record: &NodeRecord, spend: &Spend) -> Result<Spent, redb::Error> {
    let unknown = || Ok(Err(crate::join_tokens::Refused::Unknown(spend.id.clone())));
    let Some(value) = t.tokens.get(spend.id.as_str())? else { return unknown() };
    // An unreadable record is reported by the next read of the token.
    let Ok(stored) = serde_json::from_slice::<TokenRecord>(value.value()) else { return unknown() };
    drop(value);
    if !crate::join_tokens::same_digest(&stored.secret_sha256, &spend.secret_sha256) {
        return unknown();
    }
    if let Err(refused) = (spend.check)(&stored) {
        return Ok(Err(refused));
    }
    let Some(next) = stored.spent(1) else {
        return Ok(Err(crate::join_tokens::Refused::UsedUp(spend.id.clone())));
    };
    t.tokens.insert(spend.id.as_str(), serde_json::to_vec(&next).expect("records serialise").as_slice())?;
    t.nodes.insert(record.node.name.as_str(), serde_json::to_vec(record).expect("records serialise").as_slice())?;
    Ok(Ok(next))
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
            Ok(Loaded { records, foreign: Vec::new(), alive: Vec::new() })
        })();
        Box::pin(async move { result })
    }

    fn put(&self, record: NodeRecord, _fresh_subnet: bool) -> StoreFuture<'_, ()> {
        // One process owns the file: the registry's lock already keeps
        // subnets unique.
        let name = record.node.name.clone();
        let write = self.write(Op::Put(Box::new(record)));
        Box::pin(async move {
            write.await?;
            self.wrote(&name);
            Ok(())
        })
    }

    fn renew(&self, record: NodeRecord) -> StoreFuture<'_, Renewal> {
        let every = *self.renew_every.lock().expect("renew_every lock");
        let due = {
            let mut written = self.written.lock().expect("written lock");
            match written.get_mut(&record.node.name) {
                Some(w) if w.at.elapsed() < every => {
                    w.behind = true;
                    false
                }
                _ => {
                    written.insert(record.node.name.clone(), Written { at: Instant::now(), behind: false });
                    true
                }
            }
        };
        if !due {
            return Box::pin(async { Ok(Renewal::Live) });
        }
        let name = record.node.name.clone();
        let write = self.write(Op::Renew(Box::new(record)));
        Box::pin(async move {
            let result = write.await;
            if result.is_err() {
                // Due again at the next heartbeat.
                self.written.lock().expect("written lock").remove(&name);
            }
            result.map(|()| Renewal::Live)
        })
    }

    fn set_lease_ttl(&self, ttl: Duration) {
        *self.renew_every.lock().expect("renew_every lock") = super::RENEW_EVERY.min(ttl / 4);
    }

    fn settle(&self, records: Vec<NodeRecord>) -> StoreFuture<'_, ()> {
        let behind: Vec<NodeRecord> = {
            let written = self.written.lock().expect("written lock");
            records.into_iter().filter(|r| written.get(&r.node.name).is_some_and(|w| w.behind)).collect()
        };
        let writes: Vec<_> = behind.into_iter().map(|r| self.write(Op::Renew(Box::new(r)))).collect();
        Box::pin(async move {
            for w in writes {
                w.await?;
            }
            Ok(())
        })
    }

    fn remove(&self, record: NodeRecord) -> StoreFuture<'_, ()> {
        self.written.lock().expect("written lock").remove(&record.node.name);
        self.write(Op::Remove(record.node.name, record.token_sha256))
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
        self.write(Op::Replicas(pool.to_string(), replicas))
    }

    fn rollouts(&self) -> StoreFuture<'_, std::collections::BTreeMap<String, kiln_core::pool::RolloutRecord>> {
        let result = self.read(|txn| {
            let mut out = std::collections::BTreeMap::new();
            let table = txn.open_table(ROLLOUTS).map_err(|e| db_error(&self.path, e))?;
            for entry in table.iter().map_err(|e| db_error(&self.path, e))? {
                let (k, v) = entry.map_err(|e| db_error(&self.path, e))?;
                let record = serde_json::from_slice(v.value()).map_err(|source| Error::Corrupt {
                    path: self.path.clone(),
                    what: format!("pool {:?}'s rollout", k.value()),
                    source,
                })?;
                out.insert(k.value().to_string(), record);
            }
            Ok(out)
        });
        Box::pin(async move { result })
    }

    fn set_rollout(&self, pool: &str, record: &kiln_core::pool::RolloutRecord) -> StoreFuture<'_, ()> {
        self.write(Op::Rollout(pool.to_string(), serde_json::to_vec(record).expect("a rollout record serialises")))
    }

    fn tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        let result = self.read(|txn| {
            let table = txn.open_table(TOKENS).map_err(|e| db_error(&self.path, e))?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(|e| db_error(&self.path, e))? {
                let (k, v) = entry.map_err(|e| db_error(&self.path, e))?;
                out.push(self.parse_token(k.value(), v.value())?);
            }
            Ok(out)
        });
        Box::pin(async move { result })
    }

    fn token(&self, id: &str) -> StoreFuture<'_, Option<TokenRecord>> {
        let result = self.read(|txn| {
            let table = txn.open_table(TOKENS).map_err(|e| db_error(&self.path, e))?;
            let value = table.get(id).map_err(|e| db_error(&self.path, e))?;
            value.map(|v| self.parse_token(id, v.value())).transpose()
        });
        Box::pin(async move { result })
    }

    fn create_token(&self, record: TokenRecord) -> StoreFuture<'_, bool> {
        self.write_token(Op::CreateToken(Box::new(record)))
    }

    fn put_spending(&self, record: NodeRecord, _fresh_subnet: bool, spend: Spend) -> StoreFuture<'_, Spent> {
        let name = record.node.name.clone();
        let write = self.submit(Op::PutSpending(Box::new(record), spend));
        Box::pin(async move {
            match write.await? {
                Outcome::Spent(spent) => {
                    if spent.is_ok() {
                        self.wrote(&name);
                    }
                    Ok(spent)
                }
                _ => unreachable!("a put with a spend answers Outcome::Spent"),
            }
        })
    }

    fn remove_token(&self, record: &TokenRecord) -> StoreFuture<'_, bool> {
        self.write_token(Op::RemoveToken(Box::new(record.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pool_replicas_and_rollouts_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::StateDir::new(dir.path()).registry_db();
        {
            let store = DbStore::open(&path, None).unwrap();
            assert!(store.replicas().await.unwrap().is_empty());
            store.set_replicas("tiny", 3).await.unwrap();
            store.set_replicas("worker", 2).await.unwrap();
            store.set_replicas("tiny", 1).await.unwrap();
            assert!(store.rollouts().await.unwrap().is_empty());
            store.set_rollout("tiny", &pinned()).await.unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "the database is private");
        let store = DbStore::open(&path, None).unwrap();
        let got = store.replicas().await.unwrap();
        assert_eq!(got, std::collections::BTreeMap::from([("tiny".to_string(), 1), ("worker".to_string(), 2)]));
        assert_eq!(store.rollouts().await.unwrap(), std::collections::BTreeMap::from([("tiny".to_string(), pinned())]));
    }

    /// A paused rollout pinned to an older generation.
    fn pinned() -> kiln_core::pool::RolloutRecord {
        let pin = kiln_core::pool::Pin { image: kiln_core::Digest::of("old"), while_current: kiln_core::Digest::of("new") };
        kiln_core::pool::RolloutRecord { paused: true, pin: Some(pin) }
    }
}
