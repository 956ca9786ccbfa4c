//! kiln's fuzz targets' entry points (issue 15): each takes the bytes an
//! attacker controls and runs the parser that reads them, panicking only
//! when an invariant breaks. `fuzz_targets/*.rs` hand them to libFuzzer;
//! the workspace's tests include the same source files (`#[path]`) to replay
//! the committed corpus (`corpus/<target>/`) and crash inputs
//! (`crashes/<target>/`) in the normal `cargo test`.
//!
//! To add a target: an entry point here (or in the module of its crate),
//! `fuzz_targets/<name>.rs`, a `[[bin]]` in `Cargo.toml`, a seed corpus in
//! `corpus/<name>/`, its name in `run`, and the replay in the owning crate's
//! test.

pub mod proc;
pub mod pxe;
pub mod replay;
