//! Registration and the node registry's wire types (`/api/v1/register`,
//! `/api/v1/heartbeat`, `/api/v1/nodes`).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::Mac;

/// What an agent sends to `POST /api/v1/register`, with its join token (if
/// it has one) as `Authorization: Bearer`.
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
    /// A certificate signing request (PKCS#10, PEM) for the node's own key,
    /// kept on the node: the answer carries the node's client certificate,
    /// and the machine id is the key's from then on (another key
    /// registering it gets 409).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

/// A node's client certificate, as the server issues it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCertificate {
    /// The certificate, PEM (`CN=kiln:node:NAME`, `O=kiln:nodes`).
    pub pem: String,
    /// Seconds it is valid from now: renew before they are over.
    pub valid_secs: u64,
}

/// What a node sends to `POST /api/v1/nodes/NAME/renew`, over mutual TLS
/// with its current certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A certificate signing request for the same key (PEM).
    pub csr: String,
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
    /// Its client certificate, when it sent a CSR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<NodeCertificate>,
    /// The machine registered with no token and waits for an operator
    /// (`kiln nodes approve NAME`; status 202). It has no token, lease or
    /// certificate: it registers again every `heartbeat_interval_secs`
    /// until it is approved.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The node's name.
    pub name: String,
    /// Seconds until the next heartbeat is expected.
    pub heartbeat_interval_secs: u64,
}

/// The protocol (`Upgrade: kiln-peers`) of a peers watch whose lines
/// follow a `101 Switching Protocols` on the bare connection, not in an
/// HTTP body: the server then holds no HTTP state for the watch (hyper's
/// two 8 KiB buffers a connection). On it the node may send one line,
/// [`WATCH_HEARTBEAT`], to heartbeat: the answer, a [`WatchHeartbeat`]
/// line, comes among the peers lines. So a node holds one connection, and
/// heartbeats with no new request (no TLS handshake, no request head).
pub const PEERS_PROTOCOL: &str = "kiln-peers";

/// The line a node sends on a peers watch switched to `kiln-peers` to
/// heartbeat, as `POST /api/v1/heartbeat` would, with no new request.
pub const WATCH_HEARTBEAT: &[u8] = b"heartbeat\n";

/// How a [`WatchHeartbeat`] line begins, among the watch's peers lines.
pub const WATCH_HEARTBEAT_PREFIX: &[u8] = b"{\"heartbeat\":";

/// The server's answer to [`WATCH_HEARTBEAT`]: one line on the watch,
/// between its peers lines, `{"heartbeat":{"status":200,"answer":{..}}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchHeartbeat {
    /// What `POST /api/v1/heartbeat` would have answered.
    pub heartbeat: WatchHeartbeatAnswer,
}

/// What a [`WatchHeartbeat`] holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchHeartbeatAnswer {
    /// The HTTP status the route would have answered (200; 401 for a node
    /// the server no longer knows; 503 when the store fails).
    pub status: u16,
    /// With 200, the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<HeartbeatResponse>,
    /// Otherwise the server's explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
    /// For a pool's node, whether its image generation is not the one its
    /// pool runs now: it will be replaced by a rollout (filled in by the
    /// server when it lists nodes; not stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_of_date: Option<bool>,
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
    /// It registered with no token and waits for `kiln nodes approve`: it
    /// holds no lease, no credential, and is neither a peer nor scraped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
    /// Its health when it was listed ([`Node::state_at`]; filled in by the
    /// server when it lists nodes, not stored). Left out when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<NodeState>,
}

/// A node's health, as Kubernetes' node lifecycle names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeState {
    /// Heard from (a registration or heartbeat) within the grace period.
    Ready,
    /// Not heard from for longer than the grace period: its lease is kept
    /// until the lease TTL, but it is not counted as capacity.
    NotReady,
    /// Registered with no token: waits for `kiln nodes approve`.
    Pending,
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeState::Ready => "Ready",
            NodeState::NotReady => "NotReady",
            NodeState::Pending => "Pending",
        })
    }
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

/// Why a registration body is refused. Each message names the field at
/// fault; a value is quoted only shortened and escaped ([`preview`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    /// `machine_id` is not 32 hex digits.
    #[error("machine_id must be 32 hex digits, got {0:?}")]
    MachineId(String),
    /// `hostname` is empty or not a DNS label sequence.
    #[error("hostname {0:?} is not a valid host name")]
    Hostname(String),
    /// A text field is longer than its bound.
    #[error("{field} is longer than {max} bytes")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its bound.
        max: usize,
    },
    /// A text field holds a control character or a byte outside printable ASCII.
    #[error("{field} holds a character that is not printable ASCII")]
    NotPrintable {
        /// The field.
        field: &'static str,
    },
    /// A list has more entries than its bound.
    #[error("{field} has more than {max} entries")]
    TooMany {
        /// The field.
        field: &'static str,
        /// Its bound.
        max: usize,
    },
    /// `image_digest` is neither empty nor `sha256:` and a short digest.
    #[error("image_digest must be empty or `sha256:` and 1 to 64 letters and digits, got {0:?}")]
    ImageDigest(String),
    /// `metrics` is not `IP:PORT` with the IP one of the node's own
    /// addresses, routable (not loopback, unspecified, multicast or
    /// link-local).
    #[error(
        "metrics must be IP:PORT with the IP one of the node's addresses (not loopback, unspecified, multicast or link-local), got {0:?}"
    )]
    Metrics(String),
    /// `public_ip` is not one of the node's addresses, or is loopback,
    /// unspecified or multicast.
    #[error("public_ip {0} must be one of the node's addresses, and not loopback, unspecified or multicast")]
    PublicIp(std::net::IpAddr),
    /// `uplink_mtu` is outside [`limits::MTU`].
    #[error("uplink_mtu {0} is outside 576–9000")]
    UplinkMtu(u32),
    /// `csr` is longer than [`limits::CSR`] or not PEM text.
    #[error("csr must be a PEM certificate signing request of at most 4096 bytes")]
    Csr,
}

/// The bounds a registration is held to: what a real node sends fits with
/// room to spare, so a stored node, and a `GET /api/v1/nodes` row, is bounded.
pub mod limits {
    /// `hostname`, as DNS allows.
    pub const HOSTNAME: usize = 253;
    /// `kernel`: `uname -r`'s field is 65 bytes with its NUL.
    pub const KERNEL: usize = 64;
    /// `agent_version`.
    pub const AGENT_VERSION: usize = 64;
    /// The digest after `sha256:` in `image_digest` (64 hex for a real one).
    pub const DIGEST_HEX: usize = 64;
    /// `macs`: a Kubernetes node's pod veths are NICs too (110 pods by default).
    pub const MACS: usize = 256;
    /// `addresses`.
    pub const ADDRESSES: usize = 64;
    /// `metrics` and a `Host` header: a 253-byte name, `:` and a port.
    pub const HOST_PORT: usize = 261;
    /// `uplink_mtu`: IPv4's minimum to jumbo frames.
    pub const MTU: std::ops::RangeInclusive<u32> = 576..=9000;
    /// `csr`: a PEM CSR for an RSA-4096 key is about 1.7 KB.
    pub const CSR: usize = 4096;
}

/// The start of an untrusted value, for an error message: at most 40
/// characters (the message's `{:?}` escapes what is not printable).
pub fn preview(value: &str) -> String {
    const MAX: usize = 40;
    match value.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &value[..end]),
        None => value.to_string(),
    }
}

/// Whether `s` is one or more DNS labels (letters, digits, `-`, not
/// starting with `-`), at most 253 bytes.
fn is_dns_name(s: &str) -> bool {
    let label_ok =
        |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !l.starts_with('-');
    !s.is_empty() && s.len() <= limits::HOSTNAME && s.split('.').all(label_ok)
}

/// Whether `s` is `host[:port]` as an HTTP `Host` header or a scrape target
/// carries it: a DNS name, an IPv4 address or a bracketed IPv6 address, then
/// a port 1–65535 (required when `port_required`). Nothing else: no space,
/// no `/`, no user info, so such a value can go into a URL or a script as is.
pub fn is_host_port(s: &str, port_required: bool) -> bool {
    if s.len() > limits::HOST_PORT {
        return false;
    }
    let (host, bracketed, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let Some((v6, after)) = rest.split_once(']') else { return false };
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(p) => Some(p),
                    None => return false,
                },
            };
            (v6, true, port)
        }
        None => match s.split_once(':') {
            Some((h, p)) => (h, false, Some(p)),
            None => (s, false, None),
        },
    };
    let port_ok = match port {
        None => !port_required,
        Some(p) => p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|p| p != 0),
    };
    let host_ok = match bracketed {
        true => host.parse::<std::net::Ipv6Addr>().is_ok(),
        false => host.parse::<std::net::Ipv4Addr>().is_ok() || is_dns_name(host),
    };
    port_ok && host_ok
}

/// A text field: at most `max` bytes of printable ASCII (space included).
fn text(field: &'static str, value: &str, max: usize) -> Result<(), RegisterError> {
    if value.len() > max {
        return Err(RegisterError::TooLong { field, max });
    }
    if !value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err(RegisterError::NotPrintable { field });
    }
    Ok(())
}

/// Whether the control plane may scrape `ip` (and hand it to Prometheus):
/// not loopback, unspecified, multicast or link-local, so a registration
/// cannot point the server at its own host's services.
pub fn is_scrapeable(ip: std::net::IpAddr) -> bool {
    let link_local = match ip {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || link_local)
}

/// Whether `text` is at most `max` bytes of PEM: printable ASCII in lines.
pub fn is_pem(text: &str, max: usize) -> bool {
    text.len() <= max && text.starts_with("-----BEGIN ") && text.bytes().all(|b| b.is_ascii_graphic() || matches!(b, b' ' | b'\n' | b'\r'))
}

/// A list field: at most `max` entries.
fn count<T>(field: &'static str, list: &[T], max: usize) -> Result<(), RegisterError> {
    if list.len() > max {
        return Err(RegisterError::TooMany { field, max });
    }
    Ok(())
}

/// Port node_exporter (and kiln-agent) serve metrics on by default.
pub const METRICS_PORT: u16 = 9100;

impl Node {
    /// Its state at `now`, for a grace period of `grace`: Pending while it
    /// waits for approval, NotReady once it has not been heard from for
    /// longer than `grace`, else Ready.
    pub fn state_at(&self, now: OffsetDateTime, grace: std::time::Duration) -> NodeState {
        if self.pending {
            NodeState::Pending
        } else if now - self.last_seen > grace {
            NodeState::NotReady
        } else {
            NodeState::Ready
        }
    }

    /// Where Prometheus scrapes this node: what it said, else its first
    /// IPv4 address (else first address) on [`METRICS_PORT`]; never an
    /// address [`is_scrapeable`] refuses, and nothing while it is pending.
    pub fn metrics_target(&self) -> Option<String> {
        if self.pending {
            return None;
        }
        if let Some(m) = &self.metrics {
            return Some(m.clone());
        }
        let mut ips = self.addresses.iter().filter(|a| is_scrapeable(**a));
        let ip = ips.clone().find(|a| a.is_ipv4()).or(ips.next())?;
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
    /// Validates every field against [`limits`]: the machine id (any case:
    /// the registry keys on its lower-case form), the host name, each text
    /// field's length and printable text, the lists' counts, the image
    /// digest's form, `metrics` as `host:port` and the uplink's MTU.
    pub fn validate(&self) -> Result<(), RegisterError> {
        let id = &self.machine_id;
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RegisterError::MachineId(preview(id)));
        }
        if !is_dns_name(&self.hostname) {
            return Err(RegisterError::Hostname(preview(&self.hostname)));
        }
        text("kernel", &self.kernel, limits::KERNEL)?;
        text("agent_version", &self.agent_version, limits::AGENT_VERSION)?;
        count("macs", &self.macs, limits::MACS)?;
        count("addresses", &self.addresses, limits::ADDRESSES)?;
        let digest_ok = self.image_digest.is_empty()
            || self
                .image_digest
                .strip_prefix("sha256:")
                .is_some_and(|d| (1..=limits::DIGEST_HEX).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_alphanumeric()));
        if !digest_ok {
            return Err(RegisterError::ImageDigest(preview(&self.image_digest)));
        }
        if let Some(m) = &self.metrics {
            let target: Option<std::net::SocketAddr> = m.parse().ok();
            if !target.is_some_and(|t| t.port() != 0 && self.addresses.contains(&t.ip()) && is_scrapeable(t.ip())) {
                return Err(RegisterError::Metrics(preview(m)));
            }
        }
        if let Some(ip) = self.public_ip
            && (!self.addresses.contains(&ip) || ip.is_loopback() || ip.is_unspecified() || ip.is_multicast())
        {
            return Err(RegisterError::PublicIp(ip));
        }
        if let Some(csr) = &self.csr
            && !is_pem(csr, limits::CSR)
        {
            return Err(RegisterError::Csr);
        }
        match self.uplink_mtu {
            Some(mtu) if !limits::MTU.contains(&mtu) => Err(RegisterError::UplinkMtu(mtu)),
            _ => Ok(()),
        }
    }

    /// The machine id as the registry keys on it: lower-case, so an
    /// upper-case spelling is the same machine.
    pub fn machine_key(&self) -> String {
        self.machine_id.to_ascii_lowercase()
    }
}

#[cfg(test)]
pub(crate) mod tests {
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
            csr: None,
        }
    }

    #[test]
    fn validate_cases() {
        assert_eq!(request().validate(), Ok(()));
        let mac: Mac = "52:54:00:ab:cd:ef".parse().unwrap();
        let ip: std::net::IpAddr = "10.0.2.15".parse().unwrap();
        type Edit = fn(&mut RegisterRequest, Mac, std::net::IpAddr);
        // (case, edit, the field the refusal must name; "" when accepted)
        let cases: &[(&str, Edit, &str)] = &[
            ("upper-case machine id", |r, _, _| r.machine_id = r.machine_id.to_uppercase(), ""),
            ("short machine id", |r, _, _| r.machine_id = "xyz".into(), "machine_id"),
            ("empty hostname", |r, _, _| r.hostname = String::new(), "hostname"),
            ("hostname with a space", |r, _, _| r.hostname = "a b".into(), "hostname"),
            ("hostname starting with -", |r, _, _| r.hostname = "-x".into(), "hostname"),
            ("60 KiB hostname", |r, _, _| r.hostname = "a".repeat(60 * 1024), "hostname"),
            ("60 KiB kernel", |r, _, _| r.kernel = "6".repeat(60 * 1024), "kernel"),
            ("kernel with ESC", |r, _, _| r.kernel = "6.1\x1b[2J".into(), "kernel"),
            ("kernel at its bound", |r, _, _| r.kernel = "k".repeat(limits::KERNEL), ""),
            ("agent_version with CR-LF", |r, _, _| r.agent_version = "0.1\r\nforged: line".into(), "agent_version"),
            ("agent_version with NUL", |r, _, _| r.agent_version = "0.1\0".into(), "agent_version"),
            ("agent_version not ASCII", |r, _, _| r.agent_version = "0.1\u{202e}".into(), "agent_version"),
            ("empty image digest", |r, _, _| r.image_digest = String::new(), ""),
            ("test image digest", |r, _, _| r.image_digest = "sha256:test".into(), ""),
            ("real image digest", |r, _, _| r.image_digest = format!("sha256:{}", "ab".repeat(32)), ""),
            ("image digest with ESC[2J and CR-LF", |r, _, _| r.image_digest = "sha256:\x1b[2J\r\nx".into(), "image_digest"),
            ("image digest too long", |r, _, _| r.image_digest = format!("sha256:{}", "a".repeat(65)), "image_digest"),
            ("image digest without sha256:", |r, _, _| r.image_digest = "md5:00".into(), "image_digest"),
            ("image digest bare sha256:", |r, _, _| r.image_digest = "sha256:".into(), "image_digest"),
            ("256 MACs", |r, m, _| r.macs = vec![m; limits::MACS], ""),
            ("3000 MACs", |r, m, _| r.macs = vec![m; 3000], "macs"),
            ("65 addresses", |r, _, a| r.addresses = vec![a; limits::ADDRESSES + 1], "addresses"),
            ("metrics on its address", |r, _, _| r.metrics = Some("10.0.2.15:9101".into()), ""),
            (
                "metrics on its [v6]:port",
                |r, _, _| {
                    r.addresses.push("fd00::1".parse().unwrap());
                    r.metrics = Some("[fd00::1]:9100".into())
                },
                "",
            ),
            ("metrics on another host's address", |r, _, _| r.metrics = Some("10.9.9.9:9100".into()), "metrics"),
            ("metrics at a host name", |r, _, _| r.metrics = Some("kiln.example:9100".into()), "metrics"),
            (
                "metrics on loopback, claimed",
                |r, _, _| {
                    r.addresses.push("127.0.0.1".parse().unwrap());
                    r.metrics = Some("127.0.0.1:18999".into())
                },
                "metrics",
            ),
            (
                "metrics link-local, claimed",
                |r, _, _| {
                    r.addresses.push("169.254.1.1".parse().unwrap());
                    r.metrics = Some("169.254.1.1:9100".into())
                },
                "metrics",
            ),
            ("metrics port 0", |r, _, _| r.metrics = Some("10.0.2.15:0".into()), "metrics"),
            ("metrics with a query", |r, _, _| r.metrics = Some("127.0.0.1:18999/internal/admin?secret=1&x=".into()), "metrics"),
            ("public_ip its address", |r, _, a| r.public_ip = Some(a), ""),
            ("public_ip not its address", |r, _, _| r.public_ip = Some("192.0.2.99".parse().unwrap()), "public_ip"),
            (
                "public_ip loopback, claimed",
                |r, _, _| {
                    r.addresses.push("127.0.0.1".parse().unwrap());
                    r.public_ip = Some("127.0.0.1".parse().unwrap())
                },
                "public_ip",
            ),
            (
                "public_ip unspecified",
                |r, _, _| {
                    r.addresses.push("0.0.0.0".parse().unwrap());
                    r.public_ip = Some("0.0.0.0".parse().unwrap())
                },
                "public_ip",
            ),
            (
                "public_ip multicast",
                |r, _, _| {
                    r.addresses.push("239.1.1.1".parse().unwrap());
                    r.public_ip = Some("239.1.1.1".parse().unwrap())
                },
                "public_ip",
            ),
            ("metrics without port", |r, _, _| r.metrics = Some("10.0.2.15".into()), "metrics"),
            ("metrics with a path", |r, _, _| r.metrics = Some("10.0.2.15:9100/x".into()), "metrics"),
            ("uplink_mtu 0", |r, _, _| r.uplink_mtu = Some(0), "uplink_mtu"),
            ("uplink_mtu 575", |r, _, _| r.uplink_mtu = Some(575), "uplink_mtu"),
            ("uplink_mtu 576", |r, _, _| r.uplink_mtu = Some(576), ""),
            ("uplink_mtu 9000", |r, _, _| r.uplink_mtu = Some(9000), ""),
            ("uplink_mtu 9001", |r, _, _| r.uplink_mtu = Some(9001), "uplink_mtu"),
        ];
        for (case, edit, field) in cases {
            let mut r = request();
            edit(&mut r, mac, ip);
            assert_validation(case, r.validate(), field);
        }
    }

    /// A validation `result` of table case `case`: accepted when `field`
    /// is empty, else refused with a short, escaped message naming `field`.
    pub(crate) fn assert_validation<E: std::fmt::Display>(case: &str, result: Result<(), E>, field: &str) {
        match (result, field) {
            (Ok(()), "") => {}
            (Ok(()), field) => panic!("case {case}: should be refused naming {field}"),
            (Err(e), "") => panic!("case {case}: should be accepted, got {e}"),
            (Err(e), field) => {
                let text = e.to_string();
                assert!(text.starts_with(field) || text.contains(&format!("{field} ")), "case {case}: {text:?} names {field}");
                assert!(text.len() < 200, "case {case}: the message stays short: {} bytes", text.len());
                assert!(!text.contains(['\x1b', '\r', '\n']), "case {case}: the message is escaped: {text:?}");
            }
        }
    }

    #[test]
    fn machine_key_is_lower_case() {
        let mut r = request();
        r.machine_id = "0123456789ABCDEF0123456789abcdef".into();
        assert_eq!(r.machine_key(), "0123456789abcdef0123456789abcdef");
    }

    #[test]
    fn host_port_cases() {
        // (value, port required, accepted)
        for (value, port_required, ok) in [
            ("10.0.2.2", false, true),
            ("10.0.2.2:8080", false, true),
            ("kiln.lan", false, true),
            ("KILN.lan:80", false, true),
            ("[fd00::1]", false, true),
            ("[fd00::1]:8080", false, true),
            ("10.0.2.2", true, false),
            ("kiln.lan:9100", true, true),
            ("", false, false),
            ("10.0.0.1 kiln.server=http://attacker:1 x", false, false),
            ("10.0.0.1:80 x", false, false),
            ("10.0.0.1:", false, false),
            ("10.0.0.1:0", false, false),
            ("10.0.0.1:65536", false, false),
            ("10.0.0.1:+80", false, false),
            ("fd00::1", false, false),
            ("[fd00::1", false, false),
            ("[fd00::1]x", false, false),
            ("[not-v6]:80", false, false),
            ("user@kiln.lan", false, false),
            ("kiln.lan/x", false, false),
            ("kiln..lan", false, false),
            ("-kiln.lan", false, false),
            ("kiln\x1b.lan", false, false),
            ("kiln.lan\r\nX: y", false, false),
        ] {
            assert_eq!(is_host_port(value, port_required), ok, "{value:?} (port required: {port_required})");
        }
        assert!(!is_host_port(&"a".repeat(300), false), "too long");
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
