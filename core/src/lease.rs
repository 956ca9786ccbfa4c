//! Subnet leases, peers and the pod network's config: what the flannel
//! side of the agent needs and what the registry leases from.

use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Mac;

/// An IPv4 network in CIDR form, `10.244.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    /// The network address (host bits zero).
    pub addr: Ipv4Addr,
    /// Prefix length, 0 to 32.
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// The network `addr/prefix`, with host bits cleared.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        if prefix > 32 {
            return None;
        }
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
        Some(Ipv4Cidr { addr: Ipv4Addr::from(u32::from(addr) & mask), prefix })
    }

    /// How many subnets of length `len` it holds.
    pub fn subnet_count(&self, len: u8) -> u64 {
        if len < self.prefix || len > 32 { 0 } else { 1u64 << (len - self.prefix) }
    }

    /// The `index`-th subnet of length `len`.
    pub fn subnet(&self, len: u8, index: u64) -> Option<Ipv4Cidr> {
        if index >= self.subnet_count(len) {
            return None;
        }
        let base = u32::from(self.addr) as u64 + (index << (32 - len as u64));
        Ipv4Cidr::new(Ipv4Addr::from(base as u32), len)
    }

    /// Whether `other` lies inside this network.
    pub fn contains(&self, other: &Ipv4Cidr) -> bool {
        other.prefix >= self.prefix && Ipv4Cidr::new(other.addr, self.prefix).is_some_and(|o| o.addr == self.addr)
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a text is not an IPv4 network in CIDR form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// No `/`.
    #[error("{0:?} is not a CIDR (a.b.c.d/len)")]
    Form(String),
    /// The part before `/` is not an IPv4 address.
    #[error("{0:?}: the address is not an IPv4 address")]
    Addr(String),
    /// The part after `/` is not a number from 0 to 32.
    #[error("{0:?}: the prefix length is not a number from 0 to 32")]
    Prefix(String),
    /// The address has bits set past the prefix.
    #[error("{text:?} has host bits set (the network is {network})")]
    HostBits {
        /// The text.
        text: String,
        /// The network it would be with them cleared.
        network: Ipv4Cidr,
    },
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (a, p) = s.split_once('/').ok_or_else(|| CidrError::Form(s.into()))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| CidrError::Addr(s.into()))?;
        let prefix: u8 = p.parse().map_err(|_| CidrError::Prefix(s.into()))?;
        let net = Ipv4Cidr::new(addr, prefix).ok_or_else(|| CidrError::Prefix(s.into()))?;
        if net.addr != addr {
            return Err(CidrError::HostBits { text: s.into(), network: net });
        }
        Ok(net)
    }
}

serde_as_str!(Ipv4Cidr);

/// A node's subnet lease, as the registration answer carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The whole pod network (`FLANNEL_NETWORK`).
    pub network: Ipv4Cidr,
    /// This node's pod subnet (`FLANNEL_SUBNET` is its first address).
    pub subnet: Ipv4Cidr,
    /// MTU for pods: the uplink's minus the 50 bytes of VXLAN encapsulation.
    pub mtu: u32,
    /// VXLAN network identifier (`flannel.<VNI>`).
    pub vni: u32,
    /// How pod traffic between nodes is carried.
    pub backend: Backend,
}

/// How pod traffic between nodes is carried: flannel's `Backend.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// VXLAN: `flannel.<VNI>`, one FDB and neighbour entry per peer.
    Vxlan,
}

impl Backend {
    /// The name flannel gives it (`vxlan`), as the JSON spells it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The pod network and how it is cut, as flannel's network config says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The whole pod network (`Network`).
    pub network: Ipv4Cidr,
    /// Length of each node's subnet (`SubnetLen`).
    pub subnet_len: u8,
    /// VXLAN network identifier (`Backend.VNI`).
    pub vni: u32,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig { network: "10.244.0.0/16".parse().expect("a valid CIDR"), subnet_len: 24, vni: 1 }
    }
}

/// Another node, as the peers watch lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Node name.
    pub name: String,
    /// Its pod subnet.
    pub subnet: Ipv4Cidr,
    /// Where its VXLAN packets go.
    pub public_ip: IpAddr,
    /// Its VTEP's MAC.
    pub vtep_mac: Mac,
}

/// `GET /api/v1/peers?revision=N&epoch=E`: answered when the registry's
/// revision passes `N` (or at the long-poll timeout).
///
/// A watcher that names the epoch and revision of its last answer gets
/// the changes since then (`delta`): `peers` holds the peers that joined or
/// changed, by subnet, and `left` the subnets no peer holds any more. It
/// gets the whole list instead (no `delta`: replace what you hold) on its
/// first call, when the server's epoch is not the one it names (another
/// server, or one restarted), and when `N` is older than the history the
/// server keeps, as etcd answers a watch from a compacted revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peers {
    /// The registry's revision: bumped by every join, change and leave.
    pub revision: u64,
    /// Which run of which server counts these revisions: a revision means
    /// nothing under another epoch.
    #[serde(default)]
    pub epoch: u64,
    /// The changes since the revision asked for, not the whole list.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delta: bool,
    /// Every node holding a lease; with `delta`, those that joined or
    /// changed.
    pub peers: Vec<Peer>,
    /// With `delta`: the subnets whose peers left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left: Vec<Ipv4Cidr>,
    /// The connectivity check running now, if any (`kiln check`): what each
    /// node's agent is asked to do for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<crate::CheckRound>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_arithmetic() {
        let net: Ipv4Cidr = "10.244.0.0/16".parse().unwrap();
        assert_eq!(net.subnet_count(24), 256);
        assert_eq!(net.subnet(24, 1).unwrap().to_string(), "10.244.1.0/24");
        assert_eq!(net.subnet(24, 255).unwrap().to_string(), "10.244.255.0/24");
        assert_eq!(net.subnet(24, 256), None);
        assert!(net.contains(&"10.244.7.0/24".parse().unwrap()));
        assert!(!net.contains(&"10.245.7.0/24".parse().unwrap()));
        for bad in ["10.244.0.1/16", "10.244.0.0", "10.244.0.0/33", "x/8"] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn backend_is_spelled_as_flannel_does() {
        assert_eq!(serde_json::to_string(&Backend::Vxlan).unwrap(), "\"vxlan\"");
        assert_eq!(serde_json::from_str::<Backend>("\"vxlan\"").unwrap(), Backend::Vxlan);
        assert!(serde_json::from_str::<Backend>("\"udp\"").is_err(), "only vxlan");
    }
}
