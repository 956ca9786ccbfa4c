//! The history behind the delta peers watch: which subnets' peers joined,
//! changed or left at each revision.
//!
//! A watcher that last saw revision `N` gets the changes after `N`, one
//! per subnet (the last one wins), so a join costs it one small message
//! whatever the cluster's size. The log keeps the newest
//! [`HISTORY`] changes; a watcher further behind is answered with the
//! whole list, as etcd answers a watch from a compacted revision.

use std::collections::{BTreeMap, VecDeque};

use kiln_core::{Ipv4Cidr, Peer};

/// Changes kept: a watcher this far behind gets the whole list instead.
pub const HISTORY: usize = 16 * 1024;

/// What happened to the peer at one subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A peer holds the subnet now (joined, or changed its address or MAC).
    Put(Peer),
    /// No peer holds it any more.
    Left(Ipv4Cidr),
}

impl Event {
    fn subnet(&self) -> Ipv4Cidr {
        match self {
            Event::Put(p) => p.subnet,
            Event::Left(s) => *s,
        }
    }
}

/// The changes since some revision: the peers put and the subnets left.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Peers that joined or changed.
    pub put: Vec<Peer>,
    /// Subnets that left.
    pub left: Vec<Ipv4Cidr>,
}

/// The log: sealed changes by revision, and those not yet given one.
#[derive(Debug)]
pub struct PeerLog {
    events: VecDeque<(u64, Event)>,
    unsealed: Vec<Event>,
    /// A delta is complete from this revision on: every change after it is
    /// still in `events`.
    complete_from: u64,
    cap: usize,
}

impl PeerLog {
    /// An empty log at `revision`, keeping at most `cap` changes.
    pub fn new(revision: u64, cap: usize) -> Self {
        PeerLog { events: VecDeque::new(), unsealed: Vec::new(), complete_from: revision, cap: cap.max(1) }
    }

    /// Records a change, to be sealed with the next revision.
    pub fn push(&mut self, event: Event) {
        self.unsealed.push(event);
    }

    /// Whether changes wait for a revision.
    pub fn has_unsealed(&self) -> bool {
        !self.unsealed.is_empty()
    }

    /// Gives the waiting changes `revision` (above every earlier one) and
    /// drops the oldest beyond the cap.
    pub fn seal(&mut self, revision: u64) {
        for event in self.unsealed.drain(..) {
            self.events.push_back((revision, event));
        }
        while self.events.len() > self.cap {
            if let Some((rev, _)) = self.events.pop_front() {
                self.complete_from = self.complete_from.max(rev);
            }
        }
    }

    /// The changes after `revision`, one per subnet; `None` when some of
    /// them are no longer kept, or when there are more than `limit` (the
    /// whole list is then the smaller answer).
    pub fn since(&self, revision: u64, limit: usize) -> Option<Delta> {
        if revision < self.complete_from {
            return None;
        }
        let from = self.events.partition_point(|(rev, _)| *rev <= revision);
        if self.events.len() - from > limit {
            return None;
        }
        let mut last: BTreeMap<Ipv4Cidr, &Event> = BTreeMap::new();
        for (_, event) in self.events.range(from..) {
            last.insert(event.subnet(), event);
        }
        let mut delta = Delta::default();
        for event in last.into_values() {
            match event {
                Event::Put(p) => delta.put.push(p.clone()),
                Event::Left(s) => delta.left.push(*s),
            }
        }
        Some(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(i: u8, mac: u8) -> Peer {
        Peer {
            name: format!("n{i}"),
            subnet: format!("10.244.{i}.0/24").parse().unwrap(),
            public_ip: format!("192.0.2.{i}").parse().unwrap(),
            vtep_mac: kiln_core::Mac([2, 0, 0, 0, i, mac]),
        }
    }

    #[test]
    fn a_delta_is_the_last_change_of_each_subnet_after_the_revision() {
        let mut log = PeerLog::new(1, 100);
        log.push(Event::Put(peer(1, 0)));
        log.push(Event::Put(peer(2, 0)));
        log.seal(2);
        log.push(Event::Put(peer(1, 1)));
        log.push(Event::Left(peer(2, 0).subnet));
        log.seal(3);
        log.push(Event::Left(peer(3, 0).subnet));
        log.push(Event::Put(peer(3, 0)));
        log.seal(4);
        assert_eq!(log.since(4, 100), Some(Delta::default()), "nothing after the newest revision");
        assert_eq!(log.since(3, 100), Some(Delta { put: vec![peer(3, 0)], left: vec![] }), "left, then joined again: joined");
        let all = log.since(1, 100).unwrap();
        assert_eq!(all.put, vec![peer(1, 1), peer(3, 0)], "the changed MAC, not the first");
        assert_eq!(all.left, vec![peer(2, 0).subnet], "joined, then left: left");
        assert_eq!(log.since(1, 5), None, "six changes are more than five: the whole list is smaller");
    }

    #[test]
    fn a_revision_older_than_the_history_kept_gets_none() {
        let mut log = PeerLog::new(1, 3);
        for i in 0..5u8 {
            log.push(Event::Put(peer(i, 0)));
            log.seal(2 + u64::from(i));
        }
        // Revisions 2 and 3 were dropped: 3 and later are complete.
        assert_eq!(log.since(2, 100), None, "revision 3's change is gone");
        assert_eq!(log.since(3, 100).unwrap().put, vec![peer(2, 0), peer(3, 0), peer(4, 0)]);
        assert!(!log.has_unsealed());
        log.push(Event::Left(peer(4, 0).subnet));
        assert!(log.has_unsealed(), "unsealed until the next revision");
        assert_eq!(log.since(6, 100), Some(Delta::default()), "and not seen until then");
    }
}
