//! Join tokens: what lets a machine register, and nothing else.
//!
//! # Format
//!
//! kubeadm's bootstrap tokens: `ID.SECRET`, 6 and 16 characters of
//! `[a-z0-9]` (`^([a-z0-9]{6})\.([a-z0-9]{16})$`, [`JoinSecret`]), drawn from
//! the OS's CSPRNG (about 83 bits of secret). The ID is public: `kiln token
//! list` and every log line name a token by it. The secret is handed out once
//! ([`JoinTokens::create`], [`JoinTokens::mint_for_mac`]) and never kept.
//!
//! # What is stored
//!
//! One [`TokenRecord`] per token in the registry's store: the
//! [`JoinTokenInfo`] (description, creation and expiry times, uses left,
//! uses made, the pool or MAC it is bound to) and the hex sha256 of the
//! secret. A presented secret is hashed and the two digests compared in
//! constant time. Tokens are not cached: every use reads the token from the
//! store (on etcd, a get of its key), so a token made or deleted by another
//! server on the same etcd counts at once.
//!
//! # How a use is counted
//!
//! [`JoinTokens::prepare`] reads the token and checks it (secret, expiry,
//! uses left, pool, MAC); a refusal is answered from that read. The use is
//! then spent in the write that records the node it admits,
//! [`Store::put_spending`], which checks the token again as stored and
//! writes both or neither:
//!
//! - redb (`store::embedded`): in the one writer thread's transaction.
//!   Writes are serial: two registrations cannot both spend the last use.
//! - etcd (`store::etcd`): the registrations of one token at one moment are
//!   written in one txn, with the token `n` uses less, only if its key's
//!   `mod_revision` is still the one read; if another server wrote it since,
//!   the token is read again and every registration checked again.
//!
//! Of 16 registrations at once with a one-use token exactly one joins, on
//! either backend and across servers sharing an etcd; the others are told
//! it is used up, and nothing of them is written. A use is never spent on
//! a registration that fails.
//!
//! # Minted tokens
//!
//! For a machine it expects, the boot path mints a one-use token bound to
//! the machine's MAC ([`JoinTokens::mint_for_mac`], 30 minutes by default).
//! A boot renders its iPXE script and its seed separately, and both must
//! carry the same token, so minting is a function of the MAC and the time:
//! the token for (MAC, window, n) is derived with HMAC-SHA256 under a key
//! each server draws at start and never shows, where windows are half the
//! lifetime long and `n` counts the tokens of that MAC and window already
//! used. Rendering again in the same window gives the same token, so
//! fetching scripts in a loop cannot grow the store (one record per MAC per
//! window); once it is used, the next render gives the next one (at most
//! [`MINTED_PER_WINDOW`] per window). A minted token is valid from its
//! window's start for the lifetime: at least half of it after any render.
//!
//! Expired tokens stay (and `list` shows them, marked by `expires`) until
//! [`JoinTokens::sweep`] removes them, minted ones included.

use std::sync::Arc;
use std::time::Duration;

use kiln_core::join_token::{ALPHABET, ID_LEN, SECRET_LEN, TTL_MAX_SECS, is_token_id};
use kiln_core::{CreateTokenRequest, JoinSecret, JoinTokenInfo, Mac, TokenRequestError};
use rand::TryRngCore;
use time::OffsetDateTime;

use crate::store::{self, Store, TokenRecord};

/// How long a minted token is valid, unless the server is told otherwise.
pub const MINTED_TTL: Duration = Duration::from_secs(30 * 60);
/// Tokens minted for one MAC in one window, used ones included: a machine
/// that reboots more often than this in a quarter of an hour waits for the
/// next window.
pub const MINTED_PER_WINDOW: u32 = 16;
/// Fresh IDs tried before giving up (36⁶ of them: a clash is rare).
const ID_TRIES: usize = 8;

/// Making, listing or removing tokens failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid (400): the message names the field.
    #[error(transparent)]
    Request(#[from] TokenRequestError),
    /// The store failed.
    #[error("the join token store")]
    Store(#[source] store::Error),
    /// The OS's random source failed.
    #[error("the OS's random source")]
    Random(#[source] rand::rand_core::OsError),
    /// Every fresh ID tried was taken.
    #[error("no free join token ID in {0} tries")]
    NoFreeId(usize),
    /// Every token of this MAC's window was used already.
    #[error(
        "{MINTED_PER_WINDOW} tokens were minted for {0} in this window and all are used; the next window starts within half the lifetime"
    )]
    MintedOut(Mac),
}

impl From<store::Error> for Error {
    fn from(e: store::Error) -> Self {
        Error::Store(e)
    }
}

/// Why a presented join token does not join. The message is for the user
/// who presented it: it names the token's ID, never its secret.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Not `ID.SECRET`.
    #[error("not a join token: expected ID.SECRET, 6 and 16 characters of [a-z0-9]")]
    Malformed,
    /// No such token, or the secret is not its secret.
    #[error("unknown join token {0}")]
    Unknown(String),
    /// Its time is over.
    #[error("join token {id} expired at {}", rfc3339(.at))]
    Expired {
        /// The token's ID.
        id: String,
        /// When it expired.
        at: OffsetDateTime,
    },
    /// No use left.
    #[error("join token {0} is used up")]
    UsedUp(String),
    /// It is for another pool's nodes.
    #[error("join token {id} is for pool {token_pool}, not {}", pool_text(.node_pool.as_deref()))]
    WrongPool {
        /// The token's ID.
        id: String,
        /// The pool it joins.
        token_pool: String,
        /// The pool of the registering node.
        node_pool: Option<String>,
    },
    /// It is bound to a machine whose MAC the registration does not report.
    #[error("join token {id} is for another machine (the registration does not report its MAC)")]
    WrongMachine {
        /// The token's ID.
        id: String,
    },
    /// The store failed: nothing was decided.
    #[error("the join token store")]
    Store(#[source] store::Error),
}

impl Refused {
    /// The HTTP status to answer with: 401 for a token that is no good,
    /// 403 for a good token presented for the wrong node, 503 when nothing
    /// was decided (the store failed, or the token was busy).
    pub fn status(&self) -> u16 {
        match self {
            Refused::Malformed | Refused::Unknown(_) | Refused::Expired { .. } | Refused::UsedUp(_) => 401,
            Refused::WrongPool { .. } | Refused::WrongMachine { .. } => 403,
            Refused::Store(_) => 503,
        }
    }
}

fn rfc3339(at: &OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| at.to_string())
}

fn pool_text(pool: Option<&str>) -> String {
    pool.map_or_else(|| "a node of no pool".to_string(), |p| format!("pool {p:?}"))
}

/// The join tokens of a control plane, kept in its store. See the module
/// docs. Make one per server and share it (`Arc`): the uses of a token
/// waiting on it at one moment are counted in one write.
pub struct JoinTokens {
    store: Arc<dyn Store>,
    /// What minted tokens are derived with (drawn at start, never shown).
    mint_key: ring::hmac::Key,
}

impl JoinTokens {
    /// The tokens kept in `store` (the registry's).
    pub fn new(store: Arc<dyn Store>) -> Result<JoinTokens, Error> {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.try_fill_bytes(&mut key).map_err(Error::Random)?;
        Ok(JoinTokens { store, mint_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key) })
    }

    /// Makes a token as `req` asks (validated here), bound to `mac` if
    /// given. Returns the token, `ID.SECRET`, to show once, and its info.
    pub async fn create(&self, req: &CreateTokenRequest, mac: Option<Mac>) -> Result<(String, JoinTokenInfo), Error> {
        req.validate()?;
        let created = OffsetDateTime::now_utc();
        let info = JoinTokenInfo {
            id: String::new(),
            description: req.description.clone().unwrap_or_default(),
            created,
            expires: req.ttl().map(|ttl| created + ttl),
            uses_left: req.uses,
            pool: req.pool.clone(),
            mac,
            used: 0,
        };
        let (secret, info) = self.insert(info).await?;
        Ok((secret.expose(), info))
    }

    /// The one-use token bound to `mac` for now: the same one until it is
    /// used or its window ends (see the module docs), valid for `ttl`
    /// (from 2 s to a year; [`MINTED_TTL`] is the default) from its
    /// window's start. Returns `ID.SECRET`.
    pub async fn mint_for_mac(&self, mac: Mac, ttl: Duration) -> Result<String, Error> {
        self.mint_for_mac_at(mac, ttl, OffsetDateTime::now_utc()).await
    }

    /// [`Self::mint_for_mac`] as at `now`, which picks the window: tests
    /// hold it still so that a window's end cannot fall inside them.
    pub(crate) async fn mint_for_mac_at(&self, mac: Mac, ttl: Duration, now: OffsetDateTime) -> Result<String, Error> {
        let ttl = ttl.clamp(Duration::from_secs(2), Duration::from_secs(TTL_MAX_SECS));
        let half = ttl.as_secs() / 2;
        let window = u64::try_from(now.unix_timestamp()).unwrap_or_default() / half;
        let start = OffsetDateTime::from_unix_timestamp(i64::try_from(window * half).unwrap_or_default()).unwrap_or(now);
        for n in 0..MINTED_PER_WINDOW {
            let secret = self.derive(mac, window, n);
            let hash = crate::token::hash(secret.secret());
            let usable = |t: &TokenRecord| same_digest(&t.secret_sha256, &hash) && t.info.uses_left != Some(0);
            if let Some(seen) = self.store.token(secret.id()).await? {
                if usable(&seen) {
                    return Ok(secret.expose());
                }
                continue;
            }
            let info = JoinTokenInfo {
                id: secret.id().to_string(),
                description: format!("minted for {mac} by the boot path"),
                created: now,
                expires: Some(start + ttl),
                uses_left: Some(1),
                pool: None,
                mac: Some(mac),
                used: 0,
            };
            let record = TokenRecord { info, secret_sha256: hash.clone(), minted: true };
            // Another render may have written it meanwhile: then it is that one.
            if self.store.create_token(record).await? || self.store.token(secret.id()).await?.is_some_and(|t| usable(&t)) {
                return Ok(secret.expose());
            }
        }
        Err(Error::MintedOut(mac))
    }

    /// The `n`th token of `mac`'s `window`: HMAC-SHA256 of the three under
    /// the server's key, read as the token alphabet (bytes past the
    /// alphabet's last whole multiple skipped, as [`random_text`] does).
    fn derive(&self, mac: Mac, window: u64, n: u32) -> JoinSecret {
        const LIMIT: u8 = (256 / ALPHABET.len() * ALPHABET.len()) as u8;
        let mut text = String::with_capacity(ID_LEN + SECRET_LEN);
        let mut block = 0u32;
        while text.len() < ID_LEN + SECRET_LEN {
            let mut ctx = ring::hmac::Context::with_key(&self.mint_key);
            for part in [&b"kiln minted join token"[..], &mac.0, &window.to_be_bytes(), &n.to_be_bytes(), &block.to_be_bytes()] {
                ctx.update(part);
            }
            let tag = ctx.sign();
            for b in tag.as_ref().iter().filter(|&&b| b < LIMIT).take(ID_LEN + SECRET_LEN - text.len()) {
                text.push(ALPHABET[usize::from(*b) % ALPHABET.len()] as char);
            }
            block += 1;
        }
        JoinSecret::from_parts(&text[..ID_LEN], &text[ID_LEN..]).expect("drawn from the token alphabet")
    }

    /// Writes `info` under a fresh ID with a fresh secret.
    async fn insert(&self, info: JoinTokenInfo) -> Result<(JoinSecret, JoinTokenInfo), Error> {
        for _ in 0..ID_TRIES {
            let secret = JoinSecret::from_parts(&random_text(ID_LEN)?, &random_text(SECRET_LEN)?).expect("drawn from the token alphabet");
            let info = JoinTokenInfo { id: secret.id().to_string(), ..info.clone() };
            let record = TokenRecord { info: info.clone(), secret_sha256: crate::token::hash(secret.secret()), minted: false };
            if self.store.create_token(record).await? {
                return Ok((secret, info));
            }
        }
        Err(Error::NoFreeId(ID_TRIES))
    }

    /// Every token, the oldest first; expired ones too, until swept.
    pub async fn list(&self) -> Result<Vec<JoinTokenInfo>, Error> {
        let mut infos: Vec<JoinTokenInfo> = self.store.tokens().await?.into_iter().map(|t| t.info).collect();
        infos.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(infos)
    }

    /// Removes token `id`; whether there was one.
    pub async fn delete(&self, id: &str) -> Result<bool, Error> {
        if !is_token_id(id) {
            return Ok(false);
        }
        match self.store.token(id).await? {
            Some(t) => Ok(self.store.remove_token(&t).await?),
            None => Ok(false),
        }
    }

    /// One use of the `presented` token (`ID.SECRET`) for a registration
    /// of a node in `pool` reporting `macs`, to be spent in the write that
    /// records the node ([`Store::put_spending`]). The token is checked
    /// now ([`Store::token_to_check`]), and a refusal answered from a fresh
    /// read; the write checks it again as stored.
    pub async fn prepare(&self, presented: &str, pool: Option<&str>, macs: &[Mac]) -> Result<store::Spend, Refused> {
        let token = JoinSecret::parse(presented).map_err(|_| Refused::Malformed)?;
        let id = token.id().to_string();
        let secret_sha256 = crate::token::hash(token.secret());
        let (pool, macs) = (pool.map(str::to_string), macs.to_vec());
        let check = move |record: &TokenRecord| admits(&record.info, OffsetDateTime::now_utc(), pool.as_deref(), &macs);
        let verdict = |seen: Option<TokenRecord>| {
            let seen = seen.filter(|s| same_digest(&s.secret_sha256, &secret_sha256)).ok_or_else(|| Refused::Unknown(id.clone()))?;
            check(&seen)
        };
        if verdict(self.store.token_to_check(&id).await.map_err(Refused::Store)?).is_err() {
            verdict(self.store.token(&id).await.map_err(Refused::Store)?)?;
        }
        Ok(store::Spend { id, secret_sha256, check: Arc::new(check) })
    }

    /// Removes every expired token, minted ones included. Returns how many.
    pub async fn sweep(&self) -> Result<usize, Error> {
        let now = OffsetDateTime::now_utc();
        let mut removed = 0;
        for t in self.store.tokens().await? {
            if t.info.expired_at(now) && self.store.remove_token(&t).await? {
                tracing::info!(id = %t.info.id, minted = t.minted, "join token expired; removed");
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Whether `info` lets a node of `pool` reporting `macs` join at `now`
/// (its secret already checked).
pub(crate) fn admits(info: &JoinTokenInfo, now: OffsetDateTime, pool: Option<&str>, macs: &[Mac]) -> Result<(), Refused> {
    let id = || info.id.clone();
    if let Some(at) = info.expires
        && at <= now
    {
        return Err(Refused::Expired { id: id(), at });
    }
    if info.uses_left == Some(0) {
        return Err(Refused::UsedUp(id()));
    }
    if let Some(token_pool) = &info.pool
        && pool != Some(token_pool.as_str())
    {
        return Err(Refused::WrongPool { id: id(), token_pool: token_pool.clone(), node_pool: pool.map(str::to_string) });
    }
    if let Some(mac) = info.mac
        && !macs.contains(&mac)
    {
        return Err(Refused::WrongMachine { id: id() });
    }
    Ok(())
}

/// Whether two hex digests are equal, in time that does not depend on where
/// they differ.
pub(crate) fn same_digest(a: &str, b: &str) -> bool {
    let diff = a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0 && a.len() == b.len()
}

/// `len` characters of the token alphabet from the OS's CSPRNG (bytes past
/// the largest multiple of 36 are drawn again, so each character is uniform).
fn random_text(len: usize) -> Result<String, Error> {
    const LIMIT: u8 = (256 / ALPHABET.len() * ALPHABET.len()) as u8;
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 32];
    while out.len() < len {
        rand::rngs::OsRng.try_fill_bytes(&mut buf).map_err(Error::Random)?;
        for b in buf.iter().filter(|&&b| b < LIMIT).take(len - out.len()) {
            out.push(ALPHABET[usize::from(*b) % ALPHABET.len()] as char);
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests;
