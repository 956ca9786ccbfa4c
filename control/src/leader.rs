//! Which of the servers on one etcd runs the pools' reconciler and
//! autoscaler: an election on an etcd lease, etcd's own (its `v3election`
//! API, which Kubernetes' and etcd's own clients build theirs on too).
//!
//! Every server sharing an etcd serves boot files and the API and takes
//! registrations; only the leader changes the hosts. Each server:
//!
//! 1. grants itself a lease of [`DEFAULT_TTL`] (`--leader-ttl`) and keeps
//!    it alive every third of it;
//! 2. campaigns under [`ELECTION`] with its name (`kiln serve --name`) on
//!    that lease: etcd answers once this server's key is the oldest there,
//!    that is, once every server elected before it is gone;
//! 3. leads while its lease lives. It counts its lead as lasting two
//!    thirds of the TTL from the last renewal *sent* ([`Lead::Here`]), so
//!    it stops acting at least a third of the TTL before etcd can expire
//!    its key and let another server lead: the action in hand has that
//!    long to finish.
//!
//! A leader killed (SIGKILL, power) renews nothing: its key goes with its
//! lease within the TTL, and the next server's campaign returns; the pool
//! task then passes at once. A server that stops cleanly revokes its lease,
//! so the next one leads at once. A server that loses etcd (or its key)
//! stops leading, and campaigns again on a new lease. A server that does
//! not lead reads who does every renewal, for `kiln pools`.

use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use kiln_pool::Lead;
use tokio::sync::{oneshot, watch};

/// The election's name in etcd: each candidate's key is under it.
pub const ELECTION: &str = "/kiln/leader";
/// The election lease's TTL: how long a killed leader blocks the next.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// How long an etcd call of the election may take before it counts as failed.
const CALL: Duration = Duration::from_secs(3);

/// The election, running in a task; [`Election::resign`] ends it.
pub struct Election {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    lead: watch::Receiver<Lead>,
}

impl Election {
    /// Starts campaigning as `server` on the etcd at `endpoints`, with a
    /// lease of `ttl` (at least 3 s: etcd's TTLs are whole seconds, and
    /// renewals come every third).
    pub fn start(endpoints: Vec<String>, server: String, ttl: Duration) -> Election {
        let ttl = ttl.max(Duration::from_secs(3));
        let (publish, lead) = watch::channel(Lead::Nobody);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(endpoints, server, ttl, publish, stopped));
        Election { stop: Some(stop), task, lead }
    }

    /// Who leads, as this server knows it, and every change of it.
    pub fn lead(&self) -> watch::Receiver<Lead> {
        self.lead.clone()
    }

    /// Stops campaigning; if this server leads, gives the lead up at once
    /// (its lease revoked), so another server leads without waiting for
    /// the TTL.
    pub async fn resign(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `call`, given [`CALL`] to answer; an error or the timeout, in words.
async fn within<T, E: std::fmt::Display>(what: &str, call: impl std::future::Future<Output = Result<T, E>>) -> Result<T, End> {
    match tokio::time::timeout(CALL, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(End::Lost(format!("{what}: {e}"))),
        Err(e) => Err(End::Lost(format!("{what}: {e}"))),
    }
}

/// Why a term (one lease) ended.
enum End {
    /// Asked to stop.
    Stop,
    /// The lease, its key or etcd was lost.
    Lost(String),
}

async fn run(endpoints: Vec<String>, server: String, ttl: Duration, publish: watch::Sender<Lead>, mut stopped: oneshot::Receiver<()>) {
    let options = ConnectOptions::new().with_connect_timeout(CALL).with_keep_alive(ttl / 3, CALL);
    let mut client = loop {
        let connect = Client::connect(&endpoints, Some(options.clone()));
        tokio::select! {
            _ = &mut stopped => return,
            c = connect => match c {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(endpoints = %endpoints.join(","), "leader election: connecting to etcd: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    };
    loop {
        let (end, lease) = term(&mut client, &server, ttl, &publish, &mut stopped).await;
        let was_here = matches!(*publish.borrow(), Lead::Here { .. });
        publish.send_replace(Lead::Nobody);
        if let Some(lease) = lease {
            // Gives the lead (or the place in line) up at once.
            let _ = tokio::time::timeout(CALL, client.lease_revoke(lease)).await;
        }
        match end {
            End::Stop => {
                if was_here {
                    tracing::info!(server = %server, "leader election: resigned");
                }
                return;
            }
            End::Lost(why) => {
                tracing::warn!(server = %server, "leader election: {why}; campaigning again");
                tokio::select! {
                    _ = &mut stopped => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// One lease: campaigns on it, then leads or watches who does, until it
/// is lost or the election stops. Returns why, and the lease (to revoke).
async fn term(
    client: &mut Client,
    server: &str,
    ttl: Duration,
    publish: &watch::Sender<Lead>,
    stopped: &mut oneshot::Receiver<()>,
) -> (End, Option<i64>) {
    let secs = ttl.as_secs() as i64;
    let lost = |what: &str, e: &dyn std::fmt::Display| End::Lost(format!("{what}: {e}"));
    let sent = Instant::now();
    let lease = match within("granting a lease", client.lease_grant(secs, None)).await {
        Ok(r) => r.id(),
        Err(end) => return (end, None),
    };
    let mut until = sent + ttl * 2 / 3;
    let (mut keeper, mut acks) = match within("keeping the lease alive", client.lease_keep_alive(lease)).await {
        Ok(k) => k,
        Err(end) => return (end, Some(lease)),
    };
    let mut campaigner = client.clone();
    let name = server.to_string();
    let mut campaign = Box::pin(async move { campaigner.campaign(ELECTION, name, lease).await });
    let mut key: Option<Vec<u8>> = None;
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut *stopped => return (End::Stop, Some(lease)),
            won = &mut campaign, if key.is_none() => match won {
                Ok(mut r) => {
                    let Some(leader) = r.take_leader() else { return (End::Lost("etcd elected no key".into()), Some(lease)) };
                    key = Some(leader.key().to_vec());
                    tracing::info!(server = %server, lease = format!("{lease:x}"), "leader election: leading the pools");
                    publish.send_replace(Lead::Here { server: server.to_string(), until });
                }
                Err(e) => return (lost("campaigning", &e), Some(lease)),
            },
            _ = tick.tick() => {
                let sent = Instant::now();
                let renewed = async {
                    keeper.keep_alive().await?;
                    acks.message().await
                };
                match within("renewing the lease", renewed).await {
                    Ok(Some(ack)) if ack.ttl() > 0 => until = sent + ttl * 2 / 3,
                    Ok(_) => return (End::Lost("the lease expired".into()), Some(lease)),
                    Err(end) => return (end, Some(lease)),
                }
                match &key {
                    // Still this server's: an operator may have deleted it.
                    Some(key) => match within("reading this server's key", client.get(key.clone(), None)).await {
                        Ok(r) if r.count() > 0 => {
                            publish.send_replace(Lead::Here { server: server.to_string(), until });
                        }
                        Ok(_) => return (End::Lost("this server's key in the election is gone".into()), Some(lease)),
                        Err(end) => return (end, Some(lease)),
                    },
                    None => {
                        let now = match tokio::time::timeout(CALL, client.leader(ELECTION)).await {
                            Ok(Ok(r)) => r.kv().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                            // etcd answers an error when no key is there.
                            _ => None,
                        };
                        publish.send_if_modified(|lead| {
                            let new = now.map_or(Lead::Nobody, Lead::Elsewhere);
                            let changed = *lead != new;
                            *lead = new;
                            changed
                        });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::etcd::tests::LoopbackEtcd;

    /// Waits (20 s at most) until `lead` satisfies `done`.
    async fn until(lead: &mut watch::Receiver<Lead>, what: &str, done: impl Fn(&Lead) -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(20), lead.wait_for(|l| done(l))).await.map(|r| r.map(|_| ()));
        assert!(matches!(waited, Ok(Ok(()))), "{what}: the lead is {:?}", *lead.borrow());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_server_leads_and_another_takes_over_when_it_dies_or_resigns() {
        let etcd = LoopbackEtcd::start();
        let ttl = Duration::from_secs(3);
        let elect = |name: &str| Election::start(vec![etcd.url.clone()], name.into(), ttl);
        let a = elect("a");
        let mut a_lead = a.lead();
        until(&mut a_lead, "the first server leads", Lead::acts).await;
        let b = elect("b");
        let mut b_lead = b.lead();
        until(&mut b_lead, "the second sees who leads", |l| *l == Lead::Elsewhere("a".into())).await;
        assert!(a_lead.borrow().acts(), "one leader at a time");

        // The leader dies: nothing renews its lease, and nothing revokes it.
        let died = Instant::now();
        drop(a);
        until(&mut b_lead, "the second takes over", Lead::acts).await;
        let took = died.elapsed();
        assert!(took <= ttl + ttl / 3 + Duration::from_secs(1), "takeover within the TTL and a renewal: {took:?}");

        // A leader that stops cleanly hands over at once.
        let c = elect("c");
        let mut c_lead = c.lead();
        until(&mut c_lead, "the third sees who leads", |l| *l == Lead::Elsewhere("b".into())).await;
        let resigned = Instant::now();
        b.resign().await;
        assert_eq!(*b_lead.borrow(), Lead::Nobody, "a server that resigned does not lead");
        until(&mut c_lead, "the third takes over", Lead::acts).await;
        assert!(resigned.elapsed() < ttl, "a resignation does not wait for the TTL: {:?}", resigned.elapsed());

        // Its key deleted behind its back (an operator, etcdctl): it stops
        // leading, and campaigns again.
        let mut client = Client::connect([etcd.url.as_str()], None).await.unwrap();
        client.delete(ELECTION, Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
        until(&mut c_lead, "the server whose key went stops leading", |l| !l.acts()).await;
        until(&mut c_lead, "and leads again on a new lease", Lead::acts).await;
        c.resign().await;
    }
}
