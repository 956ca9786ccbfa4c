//! [`JoinTokens`] over the embedded store; the same behaviours run over a
//! real etcd in `store::etcd`'s tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::{CreateTokenRequest, JoinSecret, Mac};

use super::*;
use crate::store::embedded::DbStore;
use crate::store::{Loaded, NodeRecord, Renewal, Spend, Spent, StoreFuture};

fn mac(last: u8) -> Mac {
    Mac([0x52, 0x54, 0x00, 0xab, 0xcd, last])
}

fn request(uses: Option<u32>, pool: Option<&str>) -> CreateTokenRequest {
    CreateTokenRequest { ttl_secs: Some(3600), uses, pool: pool.map(str::to_string), description: Some("test".into()) }
}

async fn info(tokens: &JoinTokens, id: &str) -> Option<JoinTokenInfo> {
    tokens.list().await.unwrap().into_iter().find(|i| i.id == id)
}

/// Spends a use of `token` as a registration does: [`JoinTokens::prepare`],
/// then the write of a node (one of its own) with the use. Returns the
/// token after the use.
async fn consume(tokens: &JoinTokens, token: &str, pool: Option<&str>, macs: &[Mac]) -> Result<JoinTokenInfo, Refused> {
    static NODES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let spend = tokens.prepare(token, pool, macs).await?;
    let n = NODES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let node: kiln_core::Node = serde_json::from_value(serde_json::json!({
        "name": format!("use-{n}"), "machine_id": format!("{n:032x}"), "hostname": format!("use-{n}"), "macs": [],
        "addresses": [], "cpus": 1, "memory_bytes": 1, "kernel": "k", "agent_version": "v", "image_digest": "",
        "registered_at": "2026-01-01T00:00:00Z", "last_seen": "2026-01-01T00:00:00Z",
    }))
    .unwrap();
    let record = NodeRecord { node, token_sha256: "00".into(), key_sha256: None };
    match tokens.store.put_spending(record, false, spend).await {
        Ok(spent) => spent.map(|t| t.info),
        Err(e) => Err(Refused::Store(e)),
    }
}

fn id_of(token: &str) -> String {
    JoinSecret::parse(token).unwrap().id().to_string()
}

/// Every refusal but expiry, with the message a user reads; none records a use.
pub(crate) async fn refusals(tokens: &JoinTokens) {
    let (token, made) = tokens.create(&request(Some(1), None), None).await.unwrap();
    let id = made.id.clone();
    let secret_part = token.split_once('.').unwrap().1.to_string();
    let wrong_secret = format!("{id}.{}", if secret_part == "0123456789abcdef" { "fedcba9876543210" } else { "0123456789abcdef" });
    let (pooled, pooled_info) = tokens.create(&request(None, Some("tiny")), None).await.unwrap();
    let (bound, bound_info) = tokens.create(&request(None, None), Some(mac(1))).await.unwrap();
    /// (case, token, pool, macs, the refusal, its status, words its message must hold)
    type Case<'a> = (&'a str, String, Option<&'a str>, Vec<Mac>, &'a str, u16, Vec<String>);
    let cases: Vec<Case> = vec![
        ("not ID.SECRET", "nope".into(), None, vec![], "Malformed", 401, vec!["ID.SECRET".into()]),
        ("a bootstrap token", "ab".repeat(32), None, vec![], "Malformed", 401, vec!["ID.SECRET".into()]),
        ("no such ID", "zz00zz.0123456789abcdef".into(), None, vec![], "Unknown", 401, vec!["unknown join token zz00zz".into()]),
        ("the wrong secret", wrong_secret, None, vec![], "Unknown", 401, vec![format!("unknown join token {id}")]),
        ("another pool", pooled.clone(), Some("worker"), vec![], "WrongPool", 403, vec!["\"worker\"".into(), "tiny".into()]),
        ("no pool", pooled.clone(), None, vec![], "WrongPool", 403, vec!["no pool".into(), pooled_info.id.clone()]),
        ("another MAC", bound.clone(), None, vec![mac(2)], "WrongMachine", 403, vec![bound_info.id.clone()]),
        ("no MAC", bound.clone(), None, vec![], "WrongMachine", 403, vec!["another machine".into()]),
    ];
    for (case, presented, pool, macs, want, status, words) in cases {
        let refused = consume(tokens, &presented, pool, &macs).await.expect_err(case);
        assert!(format!("{refused:?}").starts_with(want), "case {case}: {refused:?}");
        assert_eq!(refused.status(), status, "case {case}");
        let text = refused.to_string();
        for w in words {
            assert!(text.contains(&w), "case {case}: {text:?} says {w:?}");
        }
        assert!(!text.contains(&secret_part) && !text.contains("0123456789abcdef"), "case {case}: no secret in {text:?}");
    }
    for (token, id) in [(&token, &id), (&pooled, &pooled_info.id), (&bound, &bound_info.id)] {
        let i = info(tokens, id).await.unwrap();
        assert_eq!(i.used, 0, "{id}: a refusal spends nothing");
        assert!(!token.is_empty());
    }
    assert_eq!(info(tokens, &id).await.unwrap().uses_left, Some(1));
    // The right pool and the right MAC join; a one-use token then is used up.
    assert_eq!(consume(tokens, &pooled, Some("tiny"), &[]).await.unwrap().used, 1);
    consume(tokens, &bound, None, &[mac(2), mac(1)]).await.expect("the bound MAC among others");
    let spent = consume(tokens, &token, None, &[]).await.unwrap();
    assert_eq!((spent.uses_left, spent.used), (Some(0), 1));
    let refused = consume(tokens, &token, None, &[]).await.unwrap_err();
    assert!(matches!(&refused, Refused::UsedUp(i) if *i == id), "{refused:?}");
    assert_eq!(refused.to_string(), format!("join token {id} is used up"));
    assert_eq!(info(tokens, &id).await.unwrap().used, 1, "the refused use is not counted");
}

/// Expired tokens are refused, listed until swept, and swept, minted ones too.
pub(crate) async fn expiry_and_sweep(tokens: &JoinTokens) {
    let short = CreateTokenRequest { ttl_secs: Some(1), ..request(None, None) };
    let (expiring, made) = tokens.create(&short, None).await.unwrap();
    let (lasting, lasting_info) = tokens.create(&CreateTokenRequest { ttl_secs: Some(0), ..request(None, None) }, None).await.unwrap();
    assert_eq!(lasting_info.expires, None, "ttl 0: never expires");
    // A minted token lives at most its lifetime (2 s at least) from its window's start.
    let minted = tokens.mint_for_mac(mac(9), Duration::from_secs(2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let refused = consume(tokens, &expiring, None, &[]).await.unwrap_err();
    let at = made.expires.unwrap();
    assert!(matches!(&refused, Refused::Expired { id, at: when } if *id == made.id && *when == at), "{refused:?}");
    assert_eq!(refused.status(), 401);
    let text = refused.to_string();
    assert!(text.contains(&made.id) && text.contains(&rfc3339(&at)), "{text}");
    assert!(matches!(consume(tokens, &minted, None, &[mac(9)]).await, Err(Refused::Expired { .. })), "a minted token expires too");
    let listed = info(tokens, &made.id).await.expect("an expired token is listed until swept");
    assert!(listed.expired_at(OffsetDateTime::now_utc()), "and marked by its expiry");
    assert_eq!(tokens.sweep().await.unwrap(), 2, "the expired token and the minted one");
    let left: Vec<String> = tokens.list().await.unwrap().into_iter().map(|i| i.id).collect();
    assert!(!left.contains(&made.id) && !left.contains(&id_of(&minted)), "swept: {left:?}");
    assert!(left.contains(&lasting_info.id), "a token that never expires stays");
    assert_eq!(tokens.sweep().await.unwrap(), 0, "nothing more to sweep");
    consume(tokens, &lasting, None, &[]).await.unwrap();
}

/// Registrations with one token at once, across `a` and `b` (two servers
/// on one etcd, or the same one): exactly as many win as the token has
/// uses; every other one is told it is used up (none to try again); every
/// use is counted.
pub(crate) async fn at_once(a: Arc<JoinTokens>, b: Arc<JoinTokens>) {
    // (uses, registrations)
    for (uses, registrations) in [(Some(1), 16), (Some(5), 16), (None, 500), (Some(100), 300)] {
        let (token, made) = a.create(&request(uses, None), None).await.unwrap();
        let tasks: Vec<_> = (0..registrations)
            .map(|i| {
                let (tokens, token) = (if i % 2 == 0 { a.clone() } else { b.clone() }, token.clone());
                tokio::spawn(async move { consume(&tokens, &token, None, &[]).await })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => won += 1,
                Err(Refused::UsedUp(id)) if uses.is_some() => assert_eq!(id, made.id),
                Err(e) => panic!("uses {uses:?}: {e:?}"),
            }
        }
        let want = uses.unwrap_or(registrations);
        assert_eq!(won, want, "uses {uses:?}: exactly {want} of {registrations} concurrent registrations win");
        let after = info(&b, &made.id).await.unwrap();
        assert_eq!((after.uses_left, after.used), (uses.map(|_| 0), want), "every use counted");
    }
}

/// Minting for a MAC gives the same token until it is used (the script and
/// the seed of one boot carry the same), then the next; other MACs' and
/// operators' tokens are others.
pub(crate) async fn minting_is_stable_until_used(tokens: &JoinTokens) {
    // One window throughout, wherever the clock is when the test runs.
    let now = OffsetDateTime::now_utc();
    let (operator, _) = tokens.create(&request(None, None), Some(mac(3))).await.unwrap();
    let first = tokens.mint_for_mac_at(mac(3), MINTED_TTL, now).await.unwrap();
    let other = tokens.mint_for_mac_at(mac(4), MINTED_TTL, now).await.unwrap();
    assert_ne!(first, other, "each MAC its own");
    for _ in 0..20 {
        assert_eq!(tokens.mint_for_mac_at(mac(3), MINTED_TTL, now).await.unwrap(), first, "the same token while unused");
    }
    let listed = tokens.list().await.unwrap();
    let bound: Vec<_> = listed.iter().filter(|i| i.mac == Some(mac(3))).collect();
    assert_eq!(bound.len(), 2, "the operator's token and one minted token for the MAC: {bound:?}");
    let minted = info(tokens, &id_of(&first)).await.unwrap();
    assert_eq!((minted.uses_left, minted.pool.as_deref()), (Some(1), None));
    let left = minted.expires.unwrap() - OffsetDateTime::now_utc();
    assert!(left > time::Duration::minutes(14) && left <= time::Duration::minutes(30), "valid 15 to 30 minutes from now: {left}");
    assert!(matches!(consume(tokens, &first, None, &[mac(4)]).await, Err(Refused::WrongMachine { .. })));
    consume(tokens, &first, None, &[mac(3)]).await.expect("the minted token joins its machine");
    assert!(matches!(consume(tokens, &first, None, &[mac(3)]).await, Err(Refused::UsedUp(_))), "once");
    let next = tokens.mint_for_mac_at(mac(3), MINTED_TTL, now).await.unwrap();
    assert_ne!(next, first, "used, the next render gets the next token");
    assert_eq!(tokens.mint_for_mac_at(mac(3), MINTED_TTL, now).await.unwrap(), next, "and keeps it");
    consume(tokens, &next, None, &[mac(3)]).await.expect("the next one joins");
    consume(tokens, &other, None, &[mac(4)]).await.expect("another MAC's token stays");
    consume(tokens, &operator, None, &[mac(3)]).await.expect("the operator's token for the MAC stays");
    // Every token of a window used: the MAC gets none until the next.
    for _ in 2..MINTED_PER_WINDOW {
        let t = tokens.mint_for_mac_at(mac(3), MINTED_TTL, now).await.unwrap();
        consume(tokens, &t, None, &[mac(3)]).await.unwrap();
    }
    assert!(matches!(tokens.mint_for_mac_at(mac(3), MINTED_TTL, now).await, Err(Error::MintedOut(m)) if m == mac(3)));
}

/// A server restarted draws a new key: the tokens it minted before still join.
pub(crate) async fn minted_before_a_restart(before: &JoinTokens, after: &JoinTokens) {
    let old = before.mint_for_mac(mac(5), MINTED_TTL).await.unwrap();
    let new = after.mint_for_mac(mac(5), MINTED_TTL).await.unwrap();
    assert_ne!(old, new, "another key, another token");
    consume(after, &old, None, &[mac(5)]).await.expect("the token minted before the restart joins");
    consume(after, &new, None, &[mac(5)]).await.expect("and the new one");
}

/// IDs are unique; delete removes a token at once.
pub(crate) async fn ids_and_delete(tokens: &JoinTokens) {
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let (token, made) = tokens.create(&CreateTokenRequest::default(), None).await.unwrap();
        assert_eq!(JoinSecret::parse(&token).unwrap().id(), made.id);
        assert!(ids.insert(made.id), "a fresh ID each time");
    }
    let (token, made) = tokens.create(&request(None, None), None).await.unwrap();
    assert!(tokens.delete(&made.id).await.unwrap());
    assert!(!tokens.delete(&made.id).await.unwrap(), "deleted already");
    assert!(!tokens.delete("../../nodes/a").await.unwrap(), "not an ID");
    assert!(matches!(consume(tokens, &token, None, &[]).await, Err(Refused::Unknown(_))), "a deleted token is refused");
    assert_eq!(info(tokens, &made.id).await, None);
}

/// Every behaviour above, on one store.
pub(crate) async fn every_behaviour(tokens: Arc<JoinTokens>, other_server: Arc<JoinTokens>) {
    refusals(&tokens).await;
    expiry_and_sweep(&tokens).await;
    at_once(tokens.clone(), other_server).await;
    minting_is_stable_until_used(&tokens).await;
    ids_and_delete(&tokens).await;
}

/// Makes a token and uses it once, before a restart.
pub(crate) async fn before_a_restart(tokens: &JoinTokens) -> (String, JoinTokenInfo) {
    let (token, _) = tokens.create(&request(Some(3), Some("tiny")), None).await.unwrap();
    let used = consume(tokens, &token, Some("tiny"), &[]).await.unwrap();
    (token, used)
}

/// The token made before the restart is there as it was, and joins.
pub(crate) async fn after_a_restart(tokens: &JoinTokens, (token, before): (String, JoinTokenInfo)) {
    assert_eq!(info(tokens, &before.id).await.as_ref(), Some(&before), "kept as it was");
    let after = consume(tokens, &token, Some("tiny"), &[]).await.unwrap();
    assert_eq!((after.uses_left, after.used), (Some(1), 2));
}

fn db(dir: &std::path::Path) -> Arc<dyn Store> {
    Arc::new(DbStore::open(&crate::StateDir::new(dir).registry_db(), None).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = db(dir.path());
    let tokens = Arc::new(JoinTokens::new(store.clone()).unwrap());
    every_behaviour(tokens.clone(), tokens.clone()).await;
    minted_before_a_restart(&tokens, &JoinTokens::new(store.clone()).unwrap()).await;
    let made = before_a_restart(&tokens).await;
    drop((tokens, store));
    after_a_restart(&JoinTokens::new(db(dir.path())).unwrap(), made).await;
}

#[tokio::test]
async fn the_secret_is_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let path = crate::StateDir::new(dir.path()).registry_db();
    let (token, made) = {
        let tokens = JoinTokens::new(Arc::new(DbStore::open(&path, None).unwrap())).unwrap();
        tokens.create(&request(None, None), None).await.unwrap()
    };
    let secret = token.split_once('.').unwrap().1;
    let bytes = std::fs::read(&path).unwrap();
    let holds = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(holds(made.id.as_bytes()), "the ID is stored");
    assert!(!holds(secret.as_bytes()), "the secret is not");
    assert!(holds(crate::token::hash(secret).as_bytes()), "its hash is");
}

/// A store whose every operation fails.
struct Failing;

impl Store for Failing {
    fn load(&self) -> StoreFuture<'_, Loaded> {
        Box::pin(async { Err(store::Error::Closed) })
    }
    fn put(&self, _: NodeRecord, _: bool) -> StoreFuture<'_, ()> {
        Box::pin(async { Err(store::Error::Closed) })
    }
    fn renew(&self, _: NodeRecord) -> StoreFuture<'_, Renewal> {
        Box::pin(async { Err(store::Error::Closed) })
    }
    fn remove(&self, _: NodeRecord) -> StoreFuture<'_, ()> {
        Box::pin(async { Err(store::Error::Closed) })
    }
    fn describe(&self) -> String {
        "failing".into()
    }
    fn replicas(&self) -> StoreFuture<'_, BTreeMap<String, u32>> {
        Box::pin(async { Err(store::Error::Closed) })
    }
    fn set_replicas(&self, _: &str, _: u32) -> StoreFuture<'_, ()> {
        Box::pin(async { Err(store::Error::Closed) })
    }
    fn rollouts(&self) -> StoreFuture<'_, BTreeMap<String, kiln_core::pool::RolloutRecord>> {
        Box::pin(async { Err(store::Error::Closed) })
    }
    fn set_rollout(&self, _: &str, _: &kiln_core::pool::RolloutRecord) -> StoreFuture<'_, ()> {
        Box::pin(async { Err(store::Error::Closed) })
    }
    fn tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        Box::pin(async { Err(store::Error::Closed) })
    }
    fn token(&self, _: &str) -> StoreFuture<'_, Option<TokenRecord>> {
        Box::pin(async { Err(store::Error::Closed) })
    }
    fn create_token(&self, _: TokenRecord) -> StoreFuture<'_, bool> {
        Box::pin(async { Err(store::Error::Closed) })
    }
    fn put_spending(&self, _: NodeRecord, _: bool, _: Spend) -> StoreFuture<'_, Spent> {
        Box::pin(async { Err(store::Error::Closed) })
    }
    fn remove_token(&self, _: &TokenRecord) -> StoreFuture<'_, bool> {
        Box::pin(async { Err(store::Error::Closed) })
    }
}

#[tokio::test]
async fn a_failing_store_decides_nothing() {
    let tokens = JoinTokens::new(Arc::new(Failing)).unwrap();
    let refused = consume(&tokens, "abcdef.0123456789abcdef", None, &[]).await.unwrap_err();
    assert!(matches!(refused, Refused::Store(store::Error::Closed)), "{refused:?}");
    assert_eq!(refused.status(), 503, "not the token's fault");
    assert_eq!(kiln_core::error_chain(&refused), "the join token store: the store is closed");
    assert!(matches!(tokens.create(&request(None, None), None).await, Err(Error::Store(_))));
    assert!(matches!(tokens.create(&request(Some(0), None), None).await, Err(Error::Request(_))), "validated first");
}

#[test]
fn random_text_is_of_the_alphabet() {
    let text = random_text(4096).unwrap();
    assert_eq!(text.len(), 4096);
    assert!(text.bytes().all(|b| ALPHABET.contains(&b)));
    let distinct: std::collections::BTreeSet<char> = text.chars().collect();
    assert_eq!(distinct.len(), 36, "every character appears in 4096 draws");
}

#[test]
fn digests_compare() {
    let a = crate::token::hash("a");
    assert!(same_digest(&a, &a.clone()));
    assert!(!same_digest(&a, &crate::token::hash("b")));
    assert!(!same_digest(&a, &a[..63]), "a prefix is not equal");
    assert!(!same_digest("", &a));
}

/// A registration of machine `i` with a lease, as an agent sends it.
fn registration(i: usize, mac: Mac) -> kiln_core::RegisterRequest {
    kiln_core::RegisterRequest {
        machine_id: format!("{i:032x}"),
        hostname: format!("n{i}"),
        macs: vec![mac],
        // One address each: two live nodes never share one.
        addresses: vec![format!("198.18.{}.{}", i / 250 % 256, i % 250 + 1).parse().unwrap()],
        cpus: 1,
        memory_bytes: 1,
        kernel: "6.1".into(),
        agent_version: "test".into(),
        image_digest: String::new(),
        metrics: None,
        public_ip: None,
        vtep_mac: Some("0e:00:00:00:00:01".parse().unwrap()),
        uplink_mtu: None,
        csr: None,
    }
}

/// Registers machine `i` through `server` (its registry and tokens) with
/// `token`, its use spent in the write that records the node.
async fn register_spending(
    server: &(Arc<crate::registry::Registry>, Arc<JoinTokens>),
    token: &str,
    i: usize,
    mac: Mac,
) -> Result<kiln_core::Node, crate::registry::Error> {
    let req = registration(i, mac);
    let spend = server.1.prepare(token, None, &req.macs).await.map_err(crate::registry::Error::Refused)?;
    let (node, _, _) = server.0.register_with(&req, None, crate::registry::Admission::Spending(spend)).await?;
    Ok(node)
}

/// Registrations with one token at once through `a` and `b` (two servers
/// on one store), each use spent in the write of its node: exactly as many
/// join as the token has uses, each with a subnet of its own; the others
/// are told it is used up, and nothing of them is written.
pub(crate) async fn registrations_spend_their_uses(
    a: (Arc<crate::registry::Registry>, Arc<JoinTokens>),
    b: (Arc<crate::registry::Registry>, Arc<JoinTokens>),
) {
    let (a, b) = (Arc::new(a), Arc::new(b));
    let mut base = 1000;
    for (uses, registrations) in [(Some(1), 16), (Some(20), 40), (None, 70)] {
        let (token, made) = a.1.create(&request(uses, None), None).await.unwrap();
        let tasks: Vec<_> = (0..registrations)
            .map(|i| {
                let (server, token) = (if i % 2 == 0 { a.clone() } else { b.clone() }, token.clone());
                tokio::spawn(async move { register_spending(&server, &token, base + i, mac(1)).await })
            })
            .collect();
        let mut joined = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(node) => joined.push(node),
                Err(crate::registry::Error::Refused(Refused::UsedUp(id))) if uses.is_some() => assert_eq!(id, made.id),
                Err(e) => panic!("uses {uses:?}: {e:?}"),
            }
        }
        let want = uses.map_or(registrations, |u| u as usize);
        assert_eq!(joined.len(), want, "uses {uses:?}: exactly {want} of {registrations} join");
        let after = info(&b.1, &made.id).await.unwrap();
        assert_eq!((after.uses_left, after.used), (uses.map(|_| 0), want as u32), "every use counted once");
        let subnets: std::collections::BTreeSet<_> = joined.iter().map(|n| n.subnet.expect("a lease")).collect();
        assert_eq!(subnets.len(), want, "a subnet each, across both servers");
        // Deleted by one server after both used it: neither admits it again.
        assert!(b.1.delete(&made.id).await.unwrap());
        for server in [&a, &b] {
            let e = register_spending(server, &token, base + 99, mac(1)).await.unwrap_err();
            assert!(matches!(e, crate::registry::Error::Refused(Refused::Unknown(_))), "a deleted token: {e:?}");
        }
        base += 100;
    }
    let (bound, _) = a.1.create(&request(None, None), Some(mac(2))).await.unwrap();
    let e = register_spending(&a, &bound, 1, mac(3)).await.unwrap_err();
    assert!(matches!(e, crate::registry::Error::Refused(Refused::WrongMachine { .. })), "{e:?}");
    let listed: Vec<String> = a.0.nodes().into_iter().map(|n| n.machine_id).collect();
    assert!(!listed.contains(&format!("{:032x}", 1)), "nothing written for a refusal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_spend_their_uses_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = db(dir.path());
    let registry = crate::registry::Registry::open(store.clone(), Default::default()).await.unwrap();
    let server = (registry, Arc::new(JoinTokens::new(store).unwrap()));
    registrations_spend_their_uses(server.clone(), server).await;
}
