//! kiln-control: the control plane.
//!
//! - [`registry`]: registered nodes and their tokens, behind the [`store::Store`]
//!   trait (the embedded default keeps one JSON file in the state directory,
//!   replaced atomically on every change).
//! - [`api`]: the HTTP API (`/api/v1/register`, `/api/v1/heartbeat`,
//!   `/api/v1/nodes`) and `/boot.ipxe`.
//! - [`server`]: the composed server `kiln serve` runs: boot assets from
//!   kiln-pxe plus the API, with its state directory and bootstrap token.
//! - [`qemu`]: QEMU guests that kiln starts itself (`kiln up`, tests), and the
//!   probe that decides between KVM and TCG.
//!
//! A new store (etcd) implements [`store::Store`]; a new endpoint is a filter
//! in [`api`] that the server composes.

pub mod api;
pub mod qemu;
pub mod registry;
pub mod server;
pub mod store;
pub mod token;

pub use registry::Registry;
pub use server::{Server, ServerConfig};
