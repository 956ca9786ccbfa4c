//! kiln-core: the types that the kiln agent, the server and the builder share.
//!
//! Everything here is plain data with serde derives and small pure functions
//! (MAC spelling, kernel command-line parsing, the join parameters, digests). No I/O: a crate
//! that needs to read a file or open a socket does so itself and hands the
//! bytes here. To add a wire type, add it to the module whose endpoint uses it
//! and keep field names in snake case, as the JSON API spells them.
//!
//! Owns the contracts between the other crates ([`JoinParams`], [`JoinSecret`], [`Digest`],
//! [`Lease`] and [`NetworkConfig`], [`Node`], [`PoolStatus`], [`Manifest`]);
//! does not own any behaviour that needs a file, a socket or a clock.

/// Serde for a type as its text: `Display` to write, `FromStr` to read
/// (whose error becomes the deserializer's message).
macro_rules! serde_as_str {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <String as serde::Deserialize>::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

pub mod check;
pub mod cmdline;
pub mod digest;
pub mod join;
pub mod join_token;
pub mod lease;
pub mod mac;
pub mod manifest;
pub mod node;
pub mod pool;
pub mod toml_file;

pub use check::{
    CheckPath, CheckPhase, CheckReport, CheckResult, CheckRound, CheckTarget, NodeError, PathKind, PodReady, Received, Verdict,
};
pub use cmdline::KernelCmdline;
pub use digest::{Digest, DigestError};
pub use join::{IMAGE_CA_PATH, JoinError, JoinParams, SEED_CMDLINE_PATH};
pub use join_token::{CreateTokenRequest, CreateTokenResponse, JoinSecret, JoinTokenInfo, MalformedToken, TokenRequestError};
pub use lease::{Backend, CidrError, Ipv4Cidr, Lease, NetworkConfig, Peer, Peers};
pub use mac::Mac;
pub use manifest::{Artifact, BootSpec, InputDigests, Manifest, ManifestError, PackageRef};
pub use node::{
    HeartbeatResponse, Node, NodeCertificate, NodeState, PEERS_PROTOCOL, RegisterRequest, RegisterResponse, RenewRequest, SdTargetGroup,
    WATCH_HEARTBEAT, WATCH_HEARTBEAT_PREFIX, WatchHeartbeat, WatchHeartbeatAnswer,
};
pub use pool::{HostStatus, PoolStatus, ScaleRequest};

/// Kernel command-line key carrying the control plane's base URL.
pub const CMDLINE_SERVER: &str = "kiln.server";
/// Kernel command-line key carrying the machine's join token.
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

/// [`Digest::of`] `bytes`, as text (`sha256:<hex>`).
pub fn sha256_digest(bytes: &[u8]) -> String {
    Digest::of(bytes).to_string()
}

/// `e` and its causes, joined by `: `, for a log line or an error body
/// (the cause of a kiln error is its `#[source]`, never repeated in its text).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
