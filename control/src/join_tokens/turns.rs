//! Counting uses of one token that many registrations present at once.
//!
//! Each use is a write of the token's record, and on etcd two writes of one
//! key conflict (all but one answer [`TokenUpdate::Changed`] and read again):
//! 500 registrations with one token at once took 16 s that way, a third of
//! them refused as busy. So the uses waiting at one moment are counted
//! together: a caller queues its use on its token's stripe and takes the
//! stripe's turn; whoever holds the turn takes every use queued, checks
//! each against the token as read, and spends them all in one write
//! (`Spend(n)`), as the embedded store's writer commits every write waiting
//! in one transaction. The turn is held by a task of its own, so a caller
//! that goes away (a closed connection) leaves the others' answers, and the
//! counts, right.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{Refused, UPDATE_TRIES};
use crate::store::{Store, StoredToken, TokenChange, TokenRecord, TokenUpdate};

/// Stripes of token IDs that take turns.
const STRIPES: usize = 64;

/// A check of the token as read, for one use: `Err` refuses that use.
pub(super) type Check = Box<dyn Fn(Option<&StoredToken>) -> Result<(), Refused> + Send>;

/// What an update answers: the token after this use, or `None` when the
/// change does not apply (no use left, or none to give back).
type Answer = Result<Option<TokenRecord>, Refused>;

/// One use waiting for its turn.
struct Waiter {
    id: String,
    change: TokenChange,
    check: Check,
    done: oneshot::Sender<Answer>,
}

impl Waiter {
    fn answer(self, answer: Answer) {
        let _ = self.done.send(answer);
    }
}

#[derive(Default)]
struct Stripe {
    queue: Mutex<Vec<Waiter>>,
    turn: tokio::sync::Mutex<()>,
}

/// The stripes of a server's tokens.
pub(super) struct Turns {
    stripes: Arc<[Stripe]>,
}

impl Turns {
    pub(super) fn new() -> Turns {
        Turns { stripes: (0..STRIPES).map(|_| Stripe::default()).collect() }
    }

    /// Applies `change` (one use: `Spend(1)` or `Refund(1)`) to token `id`
    /// if `check` admits the token as read.
    pub(super) async fn update(&self, store: &Arc<dyn Store>, id: &str, change: TokenChange, check: Check) -> Answer {
        let n = stripe(id);
        let (done, answer) = oneshot::channel();
        self.stripes[n].queue.lock().expect("queue lock").push(Waiter { id: id.into(), change, check, done });
        // The task holds the store only while it settles a batch, and
        // answers after letting it go: when the last answer is in, the
        // store is its owners' alone (dropping it closes it).
        let (store, stripes) = (Arc::downgrade(store), self.stripes.clone());
        tokio::spawn(async move {
            let stripe = &stripes[n];
            let _turn = stripe.turn.lock().await;
            let batch = std::mem::take(&mut *stripe.queue.lock().expect("queue lock"));
            if batch.is_empty() {
                return;
            }
            let mut groups: BTreeMap<(String, bool), Vec<Waiter>> = BTreeMap::new();
            for w in batch {
                groups.entry((w.id.clone(), matches!(w.change, TokenChange::Spend(_)))).or_default().push(w);
            }
            let answers = match store.upgrade() {
                Some(store) => futures_util::future::join_all(groups.into_values().map(|g| settle(&*store, g))).await,
                None => groups.into_values().map(|g| busy(g, "the store is closed")).collect(),
            };
            for (w, answer) in answers.into_iter().flatten() {
                w.answer(answer);
            }
        });
        // Answered by the turn that took it, which ends before the next begins.
        answer.await.unwrap_or_else(|_| Err(Refused::Busy(id.into())))
    }
}

/// The stripe of token `id`.
fn stripe(id: &str) -> usize {
    id.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(usize::from(b))) % STRIPES
}

/// The answers to a group's waiters.
type Answers = Vec<(Waiter, Answer)>;

/// Applies the uses of `group` (one token, one kind of change) in one
/// write, reading again while another writer changes the token.
async fn settle(store: &dyn Store, mut group: Vec<Waiter>) -> Answers {
    let id = group[0].id.clone();
    let one = group[0].change;
    let mut answers = Vec::with_capacity(group.len());
    for _ in 0..UPDATE_TRIES {
        let seen = match store.token(&id).await {
            Ok(seen) => seen,
            Err(e) => return failed(answers, group, e),
        };
        // Refusals stand on this read; the admitted wait for the write.
        let (admitted, refused): (Vec<_>, Vec<_>) = group.into_iter().map(|w| ((w.check)(seen.as_ref()), w)).partition(|(r, _)| r.is_ok());
        answers.extend(refused.into_iter().map(|(r, w)| (w, r.map(|()| None))));
        group = admitted.into_iter().map(|(_, w)| w).collect();
        let Some(seen) = seen.filter(|_| !group.is_empty()) else { return none(answers, group) };
        let change = seen.record.applicable(scaled(one, u32::try_from(group.len()).unwrap_or(u32::MAX)));
        if change.count() == 0 {
            return none(answers, group);
        }
        match store.update_token(&seen, change).await {
            Ok(TokenUpdate::Done(now)) => {
                let count = change.count();
                for (i, w) in (1..).zip(group) {
                    // The token as this use left it: the uses after it taken back.
                    let after = (i <= count).then(|| now.record.changed(undone(one, count - i))).flatten();
                    answers.push((w, Ok(after)));
                }
                return answers;
            }
            Ok(TokenUpdate::NotApplicable) => return none(answers, group),
            Ok(TokenUpdate::Changed) => {}
            Err(e) => return failed(answers, group, e),
        }
    }
    answers.extend(busy(group, "changed under every try"));
    answers
}

/// `change` for `n` uses.
fn scaled(change: TokenChange, n: u32) -> TokenChange {
    match change {
        TokenChange::Spend(_) => TokenChange::Spend(n),
        TokenChange::Refund(_) => TokenChange::Refund(n),
    }
}

/// What takes back `n` uses of `change`.
fn undone(change: TokenChange, n: u32) -> TokenChange {
    match change {
        TokenChange::Spend(_) => TokenChange::Refund(n),
        TokenChange::Refund(_) => TokenChange::Spend(n),
    }
}

/// `group`'s change does not apply.
fn none(mut answers: Answers, group: Vec<Waiter>) -> Answers {
    answers.extend(group.into_iter().map(|w| (w, Ok(None))));
    answers
}

/// Nothing was decided for `group`: try again.
fn busy(group: Vec<Waiter>, why: &str) -> Answers {
    if let Some(w) = group.first() {
        tracing::warn!(id = %w.id, uses = group.len(), "join token uses not counted: {why}");
    }
    group
        .into_iter()
        .map(|w| {
            let busy = Refused::Busy(w.id.clone());
            (w, Err(busy))
        })
        .collect()
}

/// The store failed: the first waiter gets its error, the others are told
/// to try again (neither decided anything).
fn failed(mut answers: Answers, group: Vec<Waiter>, e: crate::store::Error) -> Answers {
    let mut group = group.into_iter();
    if let Some(first) = group.next() {
        answers.push((first, Err(Refused::Store(e))));
    }
    answers.extend(busy(group.collect(), "the store failed"));
    answers
}
