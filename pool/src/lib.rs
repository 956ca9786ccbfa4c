//! kiln-pool: VMs. Worker pools and how kiln makes libvirt match them, and
//! the QEMU guests kiln starts itself (`kiln up`, the tests): one crate, one
//! accelerator type ([`Accel`]).
//!
//! It owns: pool files ([`spec`]), domain XML ([`domain`]), the libvirt
//! boundary ([`hypervisor`], [`volumes`], [`network`]), the pure reconcile plan
//! ([`plan()`]) and one pass of it ([`reconcile()`]), the hosts of a server's
//! pools ([`fleet`]), the reconciler and autoscaler as one task behind a
//! handle ([`service`]), and QEMU guests ([`qemu`]). It does not own the
//! registry, the store or what a node boots: the control plane reaches in
//! through [`ControlPlane`] and [`NodeMedia`].
//!
//! A pool is a TOML file (`pools/<name>.toml`, [`spec`]) saying which image
//! its nodes boot, their size, disk or network boot, `min`/`max`/`replicas`,
//! the libvirt hosts they spread across, the network their NICs join (by
//! default the one kiln makes, [`network`]), and optionally an autoscale policy.
//! Each node is a libvirt domain named `kiln-<pool>-<n>` ([`NodeId`]) whose
//! XML ([`domain`]) carries kiln's metadata element; a domain without it is
//! not kiln's and nothing here ever lists, stops or removes it. The
//! [`Hypervisor`] trait is the boundary to libvirt ([`Libvirt`] through the
//! `virt` crate; tests use libvirt's in-process `test:///default` driver).
//! [`plan()`] is the reconciler's brain, a pure function: desired replicas
//! and what the hosts have → the actions that make them match, so it is
//! tested without any hypervisor and is idempotent by construction. The
//! same plan rolls a pool to its image's current generation (`[rollout]`:
//! max-surge, max-unavailable): each domain's metadata records the
//! generation it was made from, so a rollout, like scaling, is read back
//! from the hosts and survives a restart of the server.
//!
//! Dependencies, and why each is here:
//! - `kiln-core`: [`kiln_core::Mac`], the MAC type the rest of kiln matches nodes by.
//! - `serde`: pool files, read through `kiln_core::toml_file` (whose errors name the key at fault).
//! - `thiserror`: one error enum per module.
//! - `quick-xml`: writes domain XML with escaping, and reads the metadata element back.
//! - `virt` 0.4: libvirt's C API (0.5 pins a libc the workspace's nix cannot share).
//! - `tokio`: the pool task, its channels, and libvirt's blocking calls on blocking threads.
//! - `tracing`: what the task does (each action, its phases and failures) goes to the server's log.
//! - `nix`: signals to the QEMU processes of [`qemu::Guest`].
//! - `tempfile` (tests only): pool directories to load.

pub mod autoscale;
pub mod domain;
pub mod fleet;
pub mod hypervisor;
pub mod network;
pub mod plan;
pub mod qemu;
pub mod reconcile;
pub mod service;
pub mod spec;
pub mod volumes;

use std::fmt;

pub use domain::{Accel, BootMedia, DomainSpec, Nic, XMLNS};
pub use fleet::{Fleet, LoadError, Networks, NodeMedia, ServedImage};
pub use hypervisor::{HostMemory, Hypervisor, Libvirt, NodeDomain};
pub use plan::{Action, Desired, HostDomain, Observed, Overlay, plan};
pub use reconcile::{Provisioner, Registry, Report, Settings, reconcile};
pub use service::{ControlPlane, Lead, PoolsHandle, RolloutError, ScaleError, Status};
pub use spec::{Autoscale, Boot, Metric, Pool, PoolSpec, load_dir};
pub use volumes::Volumes;

use kiln_core::Mac;

/// One node of a pool: the pool's name and the node's number in it.
/// Numbers are handed out upwards and not reused while a node holds them,
/// so a higher number is a newer node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    /// The pool.
    pub pool: String,
    /// The node's number in the pool.
    pub index: u32,
}

impl NodeId {
    /// Node `index` of `pool`.
    pub fn new(pool: impl Into<String>, index: u32) -> Self {
        NodeId { pool: pool.into(), index }
    }

    /// The libvirt domain name, also the node's hostname: `kiln-<pool>-<n>`.
    pub fn domain_name(&self) -> String {
        format!("kiln-{}-{}", self.pool, self.index)
    }

    /// The node named `kiln-<pool>-<n>` (a domain, hostname or file stem).
    pub fn parse(name: &str) -> Option<NodeId> {
        let rest = name.strip_prefix("kiln-")?;
        let (pool, n) = rest.rsplit_once('-')?;
        if pool.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(NodeId::new(pool, n.parse().ok()?))
    }

    /// A stable MAC for the node: QEMU's `52:54:00` prefix and 24 bits of
    /// an FNV-1a hash of the domain name. Two nodes of a cluster of a few
    /// hundred share one with a chance well under 1 in 100.
    pub fn mac(&self) -> Mac {
        let mut h: u32 = 0x811c_9dc5;
        for b in self.domain_name().bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        let [_, a, b, c] = h.to_be_bytes();
        Mac([0x52, 0x54, 0x00, a, b, c])
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.domain_name())
    }
}

/// Tests that use libvirt's `test:///default` host take this lock: its
/// state (kiln's storage pool, at `/kiln-unit`) is shared by every
/// connection of the test binary.
#[cfg(test)]
pub(crate) static TEST_DEFAULT_HOST: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_and_macs() {
        let n = NodeId::new("tiny", 12);
        assert_eq!(n.to_string(), "kiln-tiny-12");
        assert_eq!(n.mac(), n.mac(), "stable");
        assert_eq!(&n.mac().0[..3], &[0x52, 0x54, 0x00]);
        assert_ne!(n.mac(), NodeId::new("tiny", 13).mac());
        assert_ne!(n.mac(), NodeId::new("tiny1", 2).mac());
    }

    #[test]
    fn node_names_parse_back() {
        assert_eq!(NodeId::parse("kiln-tiny-3"), Some(NodeId::new("tiny", 3)));
        assert_eq!(NodeId::parse("kiln-big-pool-12"), Some(NodeId::new("big-pool", 12)));
        for bad in ["tiny-3", "kiln-tiny", "kiln--3", "kiln-tiny-x", "node-123456", "golden-worker-0123"] {
            assert_eq!(NodeId::parse(bad), None, "{bad}");
        }
    }
}
