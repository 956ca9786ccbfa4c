//! The node registry: registration (idempotent by machine id), token checks,
//! heartbeats, listing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kiln_core::{Node, RegisterRequest};
use time::OffsetDateTime;

use crate::store::{self, NodeRecord, Store};
use crate::token;

/// Seconds between heartbeats that the registry asks agents for.
pub const HEARTBEAT_INTERVAL_SECS: u64 = 10;

/// The registry: the records in memory, written through to the store.
pub struct Registry {
    store: Arc<dyn Store>,
    nodes: Mutex<BTreeMap<String, NodeRecord>>,
}

impl Registry {
    /// A registry over `store`, loaded from it.
    pub fn open(store: Arc<dyn Store>) -> Result<Self, store::Error> {
        let nodes = store.load()?.into_iter().map(|r| (r.node.name.clone(), r)).collect();
        Ok(Registry { store, nodes: Mutex::new(nodes) })
    }

    /// Registers a node, or registers it again: the same machine id keeps
    /// its name and first registration time, its facts are updated, and it
    /// gets a fresh token (the old one stops working). Returns the node and
    /// the token, which is not kept anywhere but in the answer.
    pub fn register(&self, req: &RegisterRequest) -> Result<(Node, String), store::Error> {
        let now = OffsetDateTime::now_utc();
        let mut nodes = self.nodes.lock().expect("registry lock");
        let existing = nodes.values().find(|r| r.node.machine_id == req.machine_id).map(|r| (r.node.name.clone(), r.node.registered_at));
        let (name, registered_at) = match existing {
            Some(found) => found,
            None => (unique_name(&nodes, &req.hostname, &req.machine_id), now),
        };
        let token = token::generate();
        let record = NodeRecord {
            node: Node {
                name: name.clone(),
                machine_id: req.machine_id.clone(),
                hostname: req.hostname.clone(),
                macs: req.macs.clone(),
                addresses: req.addresses.clone(),
                cpus: req.cpus,
                memory_bytes: req.memory_bytes,
                kernel: req.kernel.clone(),
                agent_version: req.agent_version.clone(),
                image_digest: req.image_digest.clone(),
                metrics: req.metrics.clone(),
                pool: String::new(),
                registered_at,
                last_seen: now,
            },
            token_sha256: token::hash(&token),
        };
        self.store.put(&record)?;
        let node = record.node.clone();
        nodes.insert(name, record);
        Ok((node, token))
    }

    /// The node whose token this is, with `last_seen` moved to now.
    pub fn heartbeat(&self, node_token: &str) -> Result<Option<Node>, store::Error> {
        let hash = token::hash(node_token);
        let mut nodes = self.nodes.lock().expect("registry lock");
        let Some(record) = nodes.values_mut().find(|r| r.token_sha256 == hash) else { return Ok(None) };
        let mut updated = record.clone();
        updated.node.last_seen = OffsetDateTime::now_utc();
        self.store.put(&updated)?;
        *record = updated;
        Ok(Some(record.node.clone()))
    }

    /// Every node, by name.
    pub fn nodes(&self) -> Vec<Node> {
        self.nodes.lock().expect("registry lock").values().map(|r| r.node.clone()).collect()
    }
}

/// The hostname if no other machine has it, else `hostname-<machine id prefix>`.
fn unique_name(nodes: &BTreeMap<String, NodeRecord>, hostname: &str, machine_id: &str) -> String {
    if !nodes.contains_key(hostname) {
        return hostname.to_string();
    }
    let mut len = 6;
    loop {
        let name = format!("{hostname}-{}", &machine_id[..len.min(machine_id.len())]);
        if !nodes.contains_key(&name) || len >= machine_id.len() {
            return name;
        }
        len += 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileStore;

    fn request(machine: char, hostname: &str) -> RegisterRequest {
        RegisterRequest {
            machine_id: machine.to_string().repeat(32),
            hostname: hostname.into(),
            macs: vec!["52:54:00:00:00:01".parse().unwrap()],
            addresses: vec![],
            cpus: 1,
            memory_bytes: 1,
            kernel: "k".into(),
            agent_version: "v".into(),
            image_digest: "sha256:d".into(),
            metrics: None,
        }
    }

    #[test]
    fn register_is_idempotent_by_machine_id_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nodes.json");
        let reg = Registry::open(Arc::new(FileStore::open(&path).unwrap())).unwrap();
        let (a, token_a) = reg.register(&request('a', "worker")).unwrap();
        let (b, _) = reg.register(&request('b', "worker")).unwrap();
        assert_eq!(a.name, "worker");
        assert_eq!(b.name, "worker-bbbbbb", "a second machine with the same hostname gets a distinct name");
        let (a2, token_a2) = reg.register(&request('a', "worker")).unwrap();
        assert_eq!(a2.name, "worker");
        assert_eq!(a2.registered_at, a.registered_at);
        assert!(reg.heartbeat(&token_a).unwrap().is_none(), "the old token stops working");
        assert_eq!(reg.heartbeat(&token_a2).unwrap().unwrap().name, "worker");
        assert!(reg.heartbeat("nope").unwrap().is_none());

        let reopened = Registry::open(Arc::new(FileStore::open(&path).unwrap())).unwrap();
        let names: Vec<String> = reopened.nodes().into_iter().map(|n| n.name).collect();
        assert_eq!(names, ["worker", "worker-bbbbbb"]);
        assert_eq!(reopened.heartbeat(&token_a2).unwrap().unwrap().name, "worker", "tokens survive a restart");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token_a2), "tokens are stored hashed");
    }
}
