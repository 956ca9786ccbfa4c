//! Registration and the node registry's wire types (`/api/v1/register`,
//! `/api/v1/heartbeat`, `/api/v1/nodes`).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::Mac;

/// What an agent sends to `POST /api/v1/register`, with the bootstrap token
/// as `Authorization: Bearer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// `/etc/machine-id` (32 lowercase hex digits): the node's identity.
    pub machine_id: String,
    /// The node's hostname.
    pub hostname: String,
    /// MACs of its physical and virtual NICs (not loopback).
    pub macs: Vec<Mac>,
    /// Its IP addresses, without prefix length; loopback and link-local left out.
    pub addresses: Vec<std::net::IpAddr>,
    /// Online CPUs.
    pub cpus: u32,
    /// `MemTotal` in bytes.
    pub memory_bytes: u64,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// kiln-agent's version.
    pub agent_version: String,
    /// Digest of the image the node booted (empty when unknown).
    pub image_digest: String,
    /// `host:port` where the node serves `/metrics`, if not its first
    /// address on port 9100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// The address other nodes send VXLAN traffic to (default: the first
    /// IPv4 address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<std::net::IpAddr>,
    /// MAC of the node's VTEP (`flannel.<VNI>`); a node without one gets no lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<Mac>,
    /// MTU of the uplink that carries VXLAN (default 1500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_mtu: Option<u32>,
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// The node's name in the cluster.
    pub name: String,
    /// The node's own token, for heartbeats and leaving. Shown once.
    pub token: String,
    /// Seconds between heartbeats the server expects.
    pub heartbeat_interval_secs: u64,
    /// The node's subnet lease, when it asked for one (sent a VTEP MAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<crate::Lease>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The node's name.
    pub name: String,
    /// Seconds until the next heartbeat is expected.
    pub heartbeat_interval_secs: u64,
}

/// A registered node, as `GET /api/v1/nodes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Name in the cluster, unique.
    pub name: String,
    /// `/etc/machine-id`.
    pub machine_id: String,
    /// Hostname the node reported.
    pub hostname: String,
    /// MACs, lowercase with colons.
    pub macs: Vec<Mac>,
    /// IP addresses.
    pub addresses: Vec<std::net::IpAddr>,
    /// Online CPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Kernel release.
    pub kernel: String,
    /// kiln-agent version.
    pub agent_version: String,
    /// Digest of the image it booted.
    pub image_digest: String,
    /// `host:port` of its `/metrics`, when it said so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// Pool the node belongs to (`None` when booted by hand). Written
    /// `""` for none, as before it was optional, so readers of the JSON
    /// keep working; `""` reads back as `None`.
    #[serde(default, serialize_with = "none_as_empty", deserialize_with = "empty_as_none")]
    pub pool: Option<String>,
    /// The libvirt host its domain runs on, for a pool's node (filled in
    /// by the server when it lists nodes; not stored). Left out when none;
    /// `""` reads back as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "empty_as_none")]
    pub host: Option<String>,
    /// Its pod subnet, when it holds a lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<crate::Ipv4Cidr>,
    /// Its VXLAN address, when it holds a lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<std::net::IpAddr>,
    /// Its VTEP MAC, when it holds a lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<Mac>,
    /// First registration.
    #[serde(with = "time::serde::rfc3339")]
    pub registered_at: OffsetDateTime,
    /// Last registration or heartbeat.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
}

/// Writes `None` as `""`: the spelling of "none" that [`Node::pool`]'s
/// readers know.
fn none_as_empty<S: serde::Serializer>(value: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(value.as_deref().unwrap_or_default())
}

/// Reads `""` (or `null`) as `None`: records and answers written when
/// these fields were plain strings said "none" that way.
fn empty_as_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|s| !s.is_empty()))
}

/// Why a registration body is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    /// `machine_id` is not 32 hex digits.
    #[error("machine_id must be 32 hex digits, got {0:?}")]
    MachineId(String),
    /// `hostname` is empty or not a DNS label sequence.
    #[error("hostname {0:?} is not a valid host name")]
    Hostname(String),
}

/// Port node_exporter (and kiln-agent) serve metrics on by default.
pub const METRICS_PORT: u16 = 9100;

impl Node {
    /// Where Prometheus scrapes this node: what it said, else its first IPv4
    /// address (else first address) on [`METRICS_PORT`].
    pub fn metrics_target(&self) -> Option<String> {
        if let Some(m) = &self.metrics {
            return Some(m.clone());
        }
        let ip = self.addresses.iter().find(|a| a.is_ipv4()).or(self.addresses.first())?;
        Some(std::net::SocketAddr::new(*ip, METRICS_PORT).to_string())
    }
}

/// One target group of Prometheus's HTTP service discovery
/// (`http_sd_configs`): targets and the labels they share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SdTargetGroup {
    /// `host:port` of each target.
    pub targets: Vec<String>,
    /// Labels attached to every target of the group.
    pub labels: std::collections::BTreeMap<String, String>,
}

impl RegisterRequest {
    /// Validates the fields the registry keys on.
    pub fn validate(&self) -> Result<(), RegisterError> {
        let id = &self.machine_id;
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RegisterError::MachineId(id.clone()));
        }
        let h = &self.hostname;
        let label_ok =
            |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !l.starts_with('-');
        if h.is_empty() || h.len() > 253 || !h.split('.').all(label_ok) {
            return Err(RegisterError::Hostname(h.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RegisterRequest {
        RegisterRequest {
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            hostname: "tiny-abcdef".into(),
            macs: vec!["52:54:00:ab:cd:ef".parse().unwrap()],
            addresses: vec!["10.0.2.15".parse().unwrap()],
            cpus: 2,
            memory_bytes: 1 << 29,
            kernel: "6.1.0-28-cloud-amd64".into(),
            agent_version: "0.1.0".into(),
            image_digest: "sha256:00".into(),
            metrics: None,
            public_ip: None,
            vtep_mac: None,
            uplink_mtu: None,
        }
    }

    #[test]
    fn validate_cases() {
        assert_eq!(request().validate(), Ok(()));
        for (field, bad) in [("machine_id", "xyz"), ("hostname", ""), ("hostname", "a b"), ("hostname", "-x")] {
            let mut r = request();
            match field {
                "machine_id" => r.machine_id = bad.into(),
                _ => r.hostname = bad.into(),
            }
            assert!(r.validate().is_err(), "{field}={bad:?} should be refused");
        }
    }

    #[test]
    fn pool_and_host_none_are_written_and_read_as_before() {
        let old = serde_json::json!({
            "name": "a", "machine_id": "0123456789abcdef0123456789abcdef", "hostname": "a", "macs": [], "addresses": [],
            "cpus": 1, "memory_bytes": 1, "kernel": "k", "agent_version": "v", "image_digest": "", "pool": "", "host": "",
            "registered_at": "2026-01-01T00:00:00Z", "last_seen": "2026-01-01T00:00:00Z",
        });
        let node: Node = serde_json::from_value(old).unwrap();
        assert_eq!((&node.pool, &node.host), (&None, &None), "\"\" reads as none");
        let written = serde_json::to_value(&node).unwrap();
        assert_eq!(written["pool"], "", "no pool is written as before");
        assert!(written.get("host").is_none(), "no host is left out as before");
        let pooled = Node { pool: Some("tiny".into()), host: Some("qemu:///system".into()), ..node };
        let read: Node = serde_json::from_value(serde_json::to_value(&pooled).unwrap()).unwrap();
        assert_eq!(read, pooled, "a pool and a host round-trip");
    }

    #[test]
    fn unknown_fields_refused() {
        let mut v = serde_json::to_value(request()).unwrap();
        v["surprise"] = 1.into();
        assert!(serde_json::from_value::<RegisterRequest>(v).is_err());
    }
}
