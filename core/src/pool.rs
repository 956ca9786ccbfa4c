//! A pool's status as the API answers it (`GET /api/v1/pools`,
//! `POST /api/v1/pools/NAME/scale`) and `kiln pools` prints it.
//!
//! Plain data: the control plane fills it from its pools' reconciler; the
//! pools themselves (specs, libvirt, the reconciler) are kiln-pool's.

use serde::{Deserialize, Serialize};

/// One host's part of a pool, for `kiln pools`.
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

/// A pool's state, for `kiln pools` and `GET /api/v1/pools`.
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

/// The body of `POST /api/v1/pools/NAME/scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    /// The replicas wanted.
    pub replicas: u32,
}
