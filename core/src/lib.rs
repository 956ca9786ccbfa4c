//! kiln-core: the types that the kiln agent, the server and the builder share.
//!
//! Everything here is plain data with serde derives and small pure functions
//! (MAC spelling, kernel command-line parsing, image digests). No I/O: a crate
//! that needs to read a file or open a socket does so itself and hands the
//! bytes here. To add a wire type, add it to the module whose endpoint uses it
//! and keep field names in snake case, as the JSON API spells them.

pub mod cmdline;
pub mod lease;
pub mod mac;
pub mod manifest;
pub mod node;
pub mod pool;
pub mod toml_file;

pub use cmdline::KernelCmdline;
pub use lease::{Ipv4Cidr, Lease, Peer, Peers};
pub use mac::Mac;
pub use manifest::{Artifact, BootSpec, InputDigests, Manifest, PackageRef};
pub use node::{HeartbeatResponse, Node, RegisterRequest, RegisterResponse, SdTargetGroup};
pub use pool::{HostStatus, PoolStatus, ScaleRequest};

/// Kernel command-line key carrying the control plane's base URL.
pub const CMDLINE_SERVER: &str = "kiln.server";
/// Kernel command-line key carrying the bootstrap token.
pub const CMDLINE_TOKEN: &str = "kiln.token";
/// Kernel command-line key carrying the digest of the image the node booted.
pub const CMDLINE_IMAGE_DIGEST: &str = "kiln.image_digest";
/// Kernel command-line key carrying the hostname the server gives a pool's
/// node (its libvirt domain name); images without cloud-init take it.
pub const CMDLINE_HOSTNAME: &str = "kiln.hostname";
/// Kernel command-line key carrying the URL of a diskless node's root
/// filesystem (squashfs), which kiln's initramfs script fetches.
pub const CMDLINE_ROOTFS: &str = "kiln.rootfs";
/// Kernel command-line key carrying that root filesystem's hex sha256,
/// checked before it is mounted.
pub const CMDLINE_ROOTFS_SHA256: &str = "kiln.rootfs_sha256";

/// Hex sha256 of `bytes`, prefixed `sha256:` as OCI and kiln spell digests.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}
