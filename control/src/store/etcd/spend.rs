//! Registrations written with a use of their join token, on etcd.
//!
//! A registration's node record, its subnet lease and one use of the token
//! that admits it are written in one txn that compares the token key's
//! `mod_revision` with the one read. Concurrent registrations with one token
//! would all compare the same revision and all but one would fail, so they
//! are written together: a registration queues on its token's stripe and
//! takes the stripe's turn; whoever holds the turn takes every registration
//! queued, reads the token once, checks each against it, and writes the
//! admitted ones in one txn with the token spent by their number. A
//! registration costs a share of one txn, whatever the number at once.
//!
//! The token as this server last wrote it (its record and `mod_revision`)
//! is kept, so the next batch of that token writes without reading it
//! first, and a registration's first check reads none either
//! (`Store::token_to_check`): the txn's compare proves it current, and a
//! failed compare forgets it. A refusal is only ever made from a fresh read
//! (the token may have been deleted since).
//!
//! When the txn fails, the token was changed by another writer (another
//! server on the same etcd), which is read again, or a fresh subnet was
//! taken (a flanneld, another server): those registrations are answered
//! [`Error::Taken`] and choose again. The turn runs in a task of its own, so
//! a caller that goes away leaves the others' answers right.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use tokio::sync::oneshot;

use super::{Error, Spend, Spent, TokenRecord, token_key};
use crate::join_tokens::Refused;

/// Stripes of token IDs that take turns.
const STRIPES: usize = 64;
/// Registrations written in one txn at most (etcd's `--max-txn-ops` is 128
/// by default; each takes two puts and at most one compare).
const MAX_PER_TXN: usize = 32;
/// Reads of the token while other writers keep changing it.
const TRIES: usize = 64;
/// Tokens whose last write is kept at most (the boot path mints one per
/// machine and window): past it, the memory is cleared.
const KEPT: usize = 1024;

/// One registration waiting for its turn.
pub(super) struct Waiter {
    pub spend: Spend,
    /// The node's name, for the lease table.
    pub name: String,
    /// Its puts (the node record; the subnet on `lease`).
    pub ops: Vec<TxnOp>,
    /// Its fresh subnet's key and the subnet, compared absent.
    pub fresh: Option<(String, kiln_core::Ipv4Cidr)>,
    /// The keys written, for the watch to skip.
    pub keys: Vec<String>,
    /// The etcd lease granted for its subnet, if any, and when it was granted.
    pub lease: Option<(i64, Instant)>,
    pub done: oneshot::Sender<Result<Spent, Error>>,
}

impl Waiter {
    fn answer(self, client: &Client, answer: Result<Spent, Error>) {
        // A lease granted for a registration not written is given back.
        if let (Some((id, _)), false) = (self.lease, matches!(answer, Ok(Ok(_)))) {
            let mut client = client.clone();
            tokio::spawn(async move {
                let _ = client.lease_revoke(id).await;
            });
        }
        let _ = self.done.send(answer);
    }
}

/// What a turn needs of the store, owned by the turn's task.
#[derive(Clone)]
pub(super) struct Writer {
    pub client: Client,
    pub endpoints: String,
    pub written: Arc<Mutex<HashMap<String, i64>>>,
    pub leases: Arc<Mutex<HashMap<String, (i64, Instant)>>>,
    /// Each token as this server last wrote it, and its `mod_revision`.
    pub last: Arc<Mutex<HashMap<String, (TokenRecord, i64)>>>,
}

impl Writer {
    fn err(&self, source: etcd_client::Error) -> Error {
        Error::Etcd { endpoints: self.endpoints.clone(), source }
    }

    fn parse(&self, key: &str, kv: &etcd_client::KeyValue) -> Result<(TokenRecord, i64), Error> {
        let record = serde_json::from_slice(kv.value()).map_err(|e| Error::EtcdValue {
            endpoints: self.endpoints.clone(),
            key: key.to_string(),
            what: "a kiln join token record",
            source: e.into(),
        })?;
        Ok((record, kv.mod_revision()))
    }
}

/// The stripes of a store's tokens.
#[derive(Default)]
pub(super) struct Turns {
    stripes: Arc<Vec<Stripe>>,
}

#[derive(Default)]
struct Stripe {
    queue: Mutex<Vec<Waiter>>,
    turn: tokio::sync::Mutex<()>,
}

impl Turns {
    pub fn new() -> Turns {
        Turns { stripes: Arc::new((0..STRIPES).map(|_| Stripe::default()).collect()) }
    }

    /// Queues `waiter` and starts a turn that writes it (with whatever else
    /// is queued on its stripe by then).
    pub fn write(&self, writer: &Writer, waiter: Waiter) {
        let n = waiter.spend.id.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(usize::from(b))) % STRIPES;
        self.stripes[n].queue.lock().expect("queue lock").push(waiter);
        let (stripes, writer) = (self.stripes.clone(), writer.clone());
        tokio::spawn(async move {
            let stripe = &stripes[n];
            let _turn = stripe.turn.lock().await;
            let batch = std::mem::take(&mut *stripe.queue.lock().expect("queue lock"));
            let mut groups: BTreeMap<String, Vec<Waiter>> = BTreeMap::new();
            for w in batch {
                groups.entry(w.spend.id.clone()).or_default().push(w);
            }
            for group in groups.into_values() {
                let mut group = group.into_iter().peekable();
                while group.peek().is_some() {
                    settle(&writer, group.by_ref().take(MAX_PER_TXN).collect()).await;
                }
            }
        });
    }
}

/// Writes the registrations of `group` (one token) that it admits, with
/// their uses, in one txn; answers each.
async fn settle(w: &Writer, mut group: Vec<Waiter>) {
    let id = group[0].spend.id.clone();
    let key = token_key(&id);
    let mut client = w.client.clone();
    for _ in 0..TRIES {
        // A failed txn forgets it (below): the next try reads.
        let kept = w.last.lock().expect("last lock").get(&id).cloned();
        let from_kept = kept.is_some();
        let seen = match kept {
            Some(kept) => Ok(Some(kept)),
            None => match client.get(key.as_str(), None).await {
                Ok(resp) => resp.kvs().first().map(|kv| w.parse(&key, kv)).transpose(),
                Err(e) => Err(w.err(e)),
            },
        };
        let seen = match seen {
            Ok(seen) => seen,
            Err(e) => return fail(w, group, e),
        };
        let verdicts: Vec<_> = group
            .iter()
            .map(|waiter| match &seen {
                Some((record, _)) if crate::join_tokens::same_digest(&record.secret_sha256, &waiter.spend.secret_sha256) => {
                    (waiter.spend.check)(record)
                }
                _ => Err(Refused::Unknown(id.clone())),
            })
            .collect();
        // Refusals stand on a fresh read only (the token may be gone since).
        if from_kept && verdicts.iter().any(Result::is_err) {
            w.last.lock().expect("last lock").remove(&id);
            continue;
        }
        let mut admitted = Vec::with_capacity(group.len());
        for (waiter, verdict) in group.into_iter().zip(verdicts) {
            match verdict {
                Ok(()) => admitted.push(waiter),
                Err(refused) => waiter.answer(&w.client, Ok(Err(refused))),
            }
        }
        let Some((record, revision)) = seen.filter(|_| !admitted.is_empty()) else { return };
        // A limited token admits as many as it has uses left, in queue order.
        let room = record.info.uses_left.map_or(admitted.len(), |left| admitted.len().min(left as usize));
        for late in admitted.split_off(room) {
            late.answer(&w.client, Ok(Err(Refused::UsedUp(id.clone()))));
        }
        let Some(next) = record.spent(room as u32) else { return };
        let mut compares = vec![Compare::mod_revision(key.as_str(), CompareOp::Equal, revision)];
        let mut ops = vec![TxnOp::put(key.as_str(), serde_json::to_string(&next).expect("records serialise"), None)];
        for waiter in &admitted {
            compares.extend(waiter.fresh.as_ref().map(|(k, _)| Compare::create_revision(k.as_str(), CompareOp::Equal, 0)));
            ops.extend(waiter.ops.iter().cloned());
        }
        let resp = match client.txn(Txn::new().when(compares).and_then(ops)).await {
            Ok(resp) => resp,
            Err(e) => return fail(w, admitted, w.err(e)),
        };
        if resp.succeeded() {
            let revision = resp.header().map(|h| h.revision());
            if let Some(at) = revision {
                let mut last = w.last.lock().expect("last lock");
                if last.len() >= KEPT {
                    last.clear();
                }
                // The token's put is in this txn: its mod_revision is the txn's.
                last.insert(id.clone(), (next.clone(), at));
            }
            for waiter in admitted {
                super::note_written(&w.written, revision, waiter.keys.iter().cloned());
                if let Some(lease) = waiter.lease {
                    // Renewed on the schedule of its grant (its TTL runs from then).
                    w.leases.lock().expect("leases lock").insert(waiter.name.clone(), lease);
                }
                waiter.answer(&w.client, Ok(Ok(next.clone())));
            }
            return;
        }
        // The token changed (read it again), or a fresh subnet is taken:
        // those registrations choose another.
        w.last.lock().expect("last lock").remove(&id);
        group = Vec::with_capacity(admitted.len());
        for waiter in admitted {
            let taken = match &waiter.fresh {
                Some((k, subnet)) => match client.get(k.as_str(), None).await {
                    Ok(resp) if !resp.kvs().is_empty() => Some(*subnet),
                    Ok(_) => None,
                    Err(e) => {
                        waiter.answer(&w.client, Err(w.err(e)));
                        continue;
                    }
                },
                None => None,
            };
            match taken {
                Some(subnet) => waiter.answer(&w.client, Err(Error::Taken(subnet))),
                None => group.push(waiter),
            }
        }
        if group.is_empty() {
            return;
        }
    }
    for waiter in group {
        waiter.answer(&w.client, Err(Error::Contended { key: key.clone(), tries: TRIES }));
    }
}

/// The store failed: every waiter is told.
fn fail(w: &Writer, group: Vec<Waiter>, e: Error) {
    let source = Arc::new(e);
    for waiter in group {
        let e = Error::Batch { source: source.clone() };
        waiter.answer(&w.client, Err(e));
    }
}
