//! kiln-pxe: what a machine needs to boot over the network.
//!
//! - [`ImageStore`] loads every built image under a directory (each a
//!   `<name>/manifest.json` with its artifacts, and the generations kept
//!   under `.generations/<name>/`) and refuses a directory that holds no
//!   valid image, naming what is wrong; [`LiveImages`] replaces that
//!   snapshot whole when a build adds a generation, while serving.
//! - [`artifacts::routes`] serves `GET`/`HEAD /images/<name>/<hex>/<file>`
//!   (one generation) and `/images/<name>/<file>` (the current one),
//!   streaming from disk with the sha256 of the bytes sent as the `ETag`.
//!   Only files a manifest lists are served, so no path can escape the
//!   image directory.
//! - [`ipxe`] renders the iPXE script that loads an image's kernel and initrd
//!   and passes the node what it needs to join (`kiln.server`, `kiln.token`,
//!   `kiln.image_digest`).
//! - [`tftp`] serves a directory read-only over TFTP (blksize, tsize,
//!   timeout, windowsize), for the iPXE binaries a PXE ROM loads first.
//! - [`dhcp`] answers PXE clients as a proxyDHCP server beside the
//!   network's own DHCP server: boot file by architecture, never an address.
//!
//! TFTP, proxyDHCP and profile matching join this crate as modules of their own.
//!
//! Owns what a booting machine fetches before it has an identity; does not
//! own the API, the registry or its trust (kiln-control).

pub mod artifacts;
pub mod dhcp;
pub mod ipxe;
pub mod profile;
pub mod store;
pub mod tftp;

pub use store::{Error, ImageStore, LiveImages};
