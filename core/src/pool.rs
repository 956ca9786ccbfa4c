//! A pool's state as the server reports it (`GET /api/v1/pools`, `kiln pools`).

use serde::{Deserialize, Serialize};

/// One host's part of a pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    /// The libvirt URI.
    pub host: String,
    /// Domains defined there.
    pub defined: u32,
    /// Of those, running.
    pub running: u32,
    /// Of the running ones, not registered yet: booting (or failing to).
    #[serde(default)]
    pub booting: u32,
    /// Of those, registered with the control plane.
    pub registered: u32,
}

/// A pool's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// The pool.
    pub name: String,
    /// Its image.
    pub image: String,
    /// `disk` or `network`.
    pub boot: String,
    /// Fewest nodes.
    pub min: u32,
    /// Most nodes.
    pub max: u32,
    /// Nodes wanted.
    pub desired: u32,
    /// Nodes registered.
    pub registered: u32,
    /// Per host.
    pub hosts: Vec<HostStatus>,
    /// The last pass's failures for this pool.
    pub errors: Vec<String>,
    /// The autoscaler's last decision and its reason, if the pool has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<String>,
}
