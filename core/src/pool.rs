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
    /// The image generation the pool's nodes should run (the image's
    /// current one, or the one `kiln rollout undo` went back to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<crate::Digest>,
    /// Nodes on the target generation.
    #[serde(default)]
    pub up_to_date: u32,
    /// Nodes on another generation, to be replaced.
    #[serde(default)]
    pub out_of_date: u32,
    /// Nodes registered and heard from within the grace period.
    #[serde(default)]
    pub ready: u32,
    /// The rollout: its settings, whether it is paused, and the fewest
    /// Ready nodes seen while it ran.
    #[serde(default)]
    pub rollout: RolloutStatus,
    /// The server that runs the reconciler and the autoscaler, when
    /// servers share an etcd and elect one; absent with one server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<Leader>,
}

/// Which of the servers on one etcd leads the pools, as the one asked sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leader {
    /// The leader's name (`kiln serve --name`); `None` while no server
    /// holds the election (it is being held, or etcd is out of reach).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The server that answered leads.
    pub here: bool,
}

/// The body of `POST /api/v1/pools/NAME/scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    /// The replicas wanted.
    pub replicas: u32,
}

/// A pool's rollout as `kiln pools` and `kiln rollout status` show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// Nodes above `desired` while rolling.
    pub max_surge: u32,
    /// Ready nodes below `desired` while rolling.
    pub max_unavailable: u32,
    /// Paused by `kiln rollout pause`.
    pub paused: bool,
    /// Pinned to an older generation by `kiln rollout undo`, until the
    /// image gets a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undone_to: Option<crate::Digest>,
    /// The fewest Ready nodes the pool had while out-of-date nodes were
    /// being replaced (since the server started); `None` when none were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ready_seen: Option<u32>,
}

/// A pool's rollout settings kept in the store: what `kiln rollout pause`,
/// `resume` and `undo` set. Everything else about a rollout is what the
/// hosts hold (each node's generation is in its domain's metadata), so a
/// server restarted in the middle of one finishes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRecord {
    /// Paused: out-of-date nodes are kept.
    #[serde(default)]
    pub paused: bool,
    /// `kiln rollout undo`: the generation to run instead of the image's
    /// current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<Pin>,
}

/// A pool held on an older generation of its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// The generation the pool runs.
    pub image: crate::Digest,
    /// The image's current generation when the pin was made: once the
    /// image has another (a new build), the pin no longer holds.
    pub while_current: crate::Digest,
}

/// `POST /api/v1/pools/<name>/rollout`: what to do to a pool's rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    /// `pause`, `resume` or `undo`.
    pub action: RolloutAction,
}

/// What `kiln rollout` does to a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutAction {
    /// Keep out-of-date nodes as they are.
    Pause,
    /// Go on replacing them.
    Resume,
    /// Go back to the generation before the target, which is still kept.
    Undo,
}
