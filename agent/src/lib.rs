//! kiln-agent: the program baked into every kiln image.
//!
//! It reads where the control plane is and its join token, if the machine
//! has one, from the kernel command line (`kiln.server=`, `kiln.token=`);
//! with none it waits as pending until an operator approves it. It gathers the node's
//! identity from `/proc`, `/sys` and `/etc/machine-id`, registers, and then
//! heartbeats with the node token it got back, registering again if the
//! server forgets it. Every host path is a field of [`Roots`], so tests point
//! them at fixtures.
//!
//! Modules: [`identity`] reads the node's facts; [`node_key`] keeps the
//! node's own key and certificate; [`register`] keeps the node registered
//! (its HTTP calls are kiln-client's); [`backoff`] paces
//! every retry; [`flannel`] sets up the node's part of the pod network
//! (VXLAN device, peers, `subnet.env`, CNI conflist) from its lease;
//! [`metrics`] exports node_exporter-compatible metrics on `/metrics`
//! (`:9100` by default, or alone with `kiln-agent metrics`); [`check`] takes
//! part in `kiln check` with a test pod of the node's own conflist. A new duty is a
//! module with its own loop, started from `main.rs`.
//!
//! Owns what runs on a node; does not talk HTTP by hand (kiln-client) or
//! define the wire types (kiln-core).

pub mod backoff;
pub mod check;
pub mod flannel;
pub mod identity;
pub mod metrics;
pub mod node_key;
pub mod register;

use std::path::PathBuf;

/// Host paths the agent reads, all overridable.
#[derive(Debug, Clone)]
pub struct Roots {
    /// `/proc`
    pub proc: PathBuf,
    /// `/sys`
    pub sys: PathBuf,
    /// `/etc/machine-id`; written if missing and no DMI UUID identifies the machine.
    pub machine_id: PathBuf,
    /// The kernel command line, normally `/proc/cmdline`.
    pub cmdline: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots { proc: "/proc".into(), sys: "/sys".into(), machine_id: "/etc/machine-id".into(), cmdline: "/proc/cmdline".into() }
    }
}
