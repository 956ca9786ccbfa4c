//! kiln-control: the control plane. It owns the registry, its stores, the
//! API and its trust (CA, tokens), and the composition of the server that
//! `kiln serve` runs; nothing else. VMs are kiln-pool's (this crate only
//! hands the pool task what it needs of the registry); boot assets and
//! scripts are kiln-pxe's; HTTP clients are kiln-client's.
//!
//! - [`registry`]: registered nodes, their tokens and subnet leases, behind
//!   the [`store::Store`] trait: an embedded redb database in the state
//!   directory by default, or etcd with flannel's schema.
//! - [`api`]: the HTTP API (`/api/v1/register`, `/api/v1/heartbeat`,
//!   `/api/v1/peers`, `/api/v1/nodes`, `/api/v1/sd`) and `/boot.ipxe`.
//! - [`listen`]: the one accept loop of the HTTP and TLS listeners, with
//!   their connection cap, time limits and size limits.
//! - [`join_tokens`]: join tokens (kubeadm's `ID.SECRET`), kept hashed in
//!   the store: made, listed, deleted, minted per MAC for the boot path, and
//!   each use counted atomically.
//! - [`tls`]: the control plane's CA (`STATE/ca.pem`) and the API over TLS.
//! - [`operators`]: operators' client certificates (`STATE/admin.pem`) and
//!   their revocation.
//! - [`state_dir`]: the files of the state directory, each named once.
//! - [`server`]: the composed server `kiln serve` runs: boot assets from
//!   kiln-pxe on plain HTTP plus the API over TLS, with its state directory.
//! - [`pools`]: what the pool task (kiln-pool) needs of the control plane:
//!   registered nodes, leases, stored replicas, images and seeds.
//! - [`leader`]: which of the servers on one etcd runs the pools, elected
//!   on an etcd lease.
//!
//! A new store implements [`store::Store`]; a new endpoint is a filter
//! in [`api`] that the server composes.

pub mod api;
pub mod checks;
pub mod join_tokens;
pub mod leader;
pub mod listen;
pub mod operators;
pub mod pools;
pub mod registry;
pub mod server;
pub mod state_dir;
pub mod store;
pub mod tls;
pub mod token;

pub use registry::Registry;
pub use server::{Server, ServerConfig};
pub use state_dir::StateDir;
