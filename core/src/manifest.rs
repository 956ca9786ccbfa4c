//! The image manifest: what `kiln build` writes as `DIR/<name>/manifest.json`
//! and what `kiln serve` reads to know what it serves.

use serde::{Deserialize, Serialize};

use crate::Digest;

/// File name of the manifest inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The directory under an output directory where every generation of every
/// image is kept: `DIR/.generations/<name>/<hex digest>/`. `DIR/<name>` is a
/// symbolic link to the current one, replaced atomically by each build; a
/// generation's directory never changes once it is there, so its files are
/// what its manifest says for as long as it is kept.
pub const GENERATIONS_DIR: &str = ".generations";

/// Generations of one image a build keeps by default: the one it makes
/// and the two before it.
pub const KEEP_GENERATIONS: usize = 3;

/// `DIR/.generations/<name>`: where image `name`'s generations are.
pub fn generations_of(out: &std::path::Path, name: &str) -> std::path::PathBuf {
    out.join(GENERATIONS_DIR).join(name)
}

/// One built image: its artifacts, its own digest, and the digests of the
/// inputs it was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Image name, from the spec; also the directory name.
    pub name: String,
    /// sha256 over the artifact list (see [`Manifest::compute_digest`]).
    pub digest: Digest,
    /// Every file of the image, sorted by name.
    pub artifacts: Vec<Artifact>,
    /// How to boot it over the network.
    pub boot: BootSpec,
    /// What the image was made from.
    pub inputs: InputDigests,
}

/// One file of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// File name inside the image directory (no slashes).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Hex sha256 of the file's bytes ([`Digest::hex`]: no `sha256:`
    /// prefix, as `sha256sum` prints it and the `ETag` carries it).
    pub sha256: String,
}

/// Which artifacts a network boot loads, and the kernel arguments it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSpec {
    /// Artifact name of the kernel.
    pub kernel: String,
    /// Artifact name of the initrd.
    pub initrd: String,
    /// Kernel arguments the image needs (console, ...), before kiln's own.
    pub cmdline: Vec<String>,
    /// Artifact name of the root filesystem a diskless node fetches over
    /// HTTP (the worker's `root.squashfs`): the boot script adds its URL and
    /// sha256 as `kiln.rootfs=` and `kiln.rootfs_sha256=`. `None` for an
    /// image whose initrd is its whole root (the tiny image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
}

/// Digests of the inputs of a build: equal inputs give an equal image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputDigests {
    /// `sha256:` of the spec file's bytes.
    pub spec: String,
    /// `sha256:` of the kiln-agent binary baked in.
    pub agent: String,
    /// The Debian kernel package, as apt resolved it.
    pub kernel_package: PackageRef,
    /// Other Debian packages taken into the image.
    pub packages: Vec<PackageRef>,
    /// `sha256:` over everything above and the builder's version: the cache key.
    pub key: String,
}

/// A Debian package as the archive's index names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageRef {
    /// Package name.
    pub name: String,
    /// Exact version.
    pub version: String,
    /// Hex sha256 of the `.deb`, as the archive's `Packages` index gives it.
    pub sha256: String,
    /// The extra repository (`[[base.repositories]]`, its first URI) the
    /// package came from; none for Debian's archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// What is inconsistent in a manifest (see [`Manifest::check`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The image name is not a plain directory name.
    #[error("image name {0:?} is not a plain directory name")]
    ImageName(String),
    /// An artifact's name is not a plain file name.
    #[error("artifact name {0:?} is not a plain file name")]
    ArtifactName(String),
    /// An artifact's `sha256` is not 64 hex digits.
    #[error("artifact {0:?} has a malformed sha256")]
    ArtifactSha256(String),
    /// A boot entry names no artifact.
    #[error("{role} names {name:?}, which is not among the artifacts")]
    BootEntry {
        /// `boot.kernel`, `boot.initrd` or `boot.rootfs`.
        role: &'static str,
        /// The name it gives.
        name: String,
    },
    /// The digest is not the artifacts'.
    #[error("digest {found} does not match the artifacts ({want})")]
    Digest {
        /// The manifest's digest.
        found: Digest,
        /// The artifacts' digest.
        want: Digest,
    },
}

impl Manifest {
    /// The image digest: sha256 over `name size sha256\n` of each artifact,
    /// sorted by name. It changes exactly when some artifact's bytes change.
    pub fn compute_digest(artifacts: &[Artifact]) -> Digest {
        let mut sorted: Vec<&Artifact> = artifacts.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut text = String::new();
        for a in sorted {
            text.push_str(&format!("{} {} {}\n", a.name, a.size, a.sha256));
        }
        Digest::of(text)
    }

    /// The artifact called `name`, if the image has one.
    pub fn artifact(&self, name: &str) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.name == name)
    }

    /// Checks the manifest is self-consistent: its digest matches its
    /// artifacts, artifact names are plain file names, and the boot entries
    /// name artifacts that exist. Returns what is wrong.
    pub fn check(&self) -> Result<(), ManifestError> {
        let plain = |name: &str| !(name.is_empty() || name.contains('/') || name.starts_with('.'));
        if !plain(&self.name) {
            return Err(ManifestError::ImageName(self.name.clone()));
        }
        for a in &self.artifacts {
            if !plain(&a.name) {
                return Err(ManifestError::ArtifactName(a.name.clone()));
            }
            if Digest::from_hex(&a.sha256).is_err() {
                return Err(ManifestError::ArtifactSha256(a.name.clone()));
            }
        }
        let rootfs = self.boot.rootfs.iter().map(|r| ("boot.rootfs", r));
        for (role, name) in [("boot.kernel", &self.boot.kernel), ("boot.initrd", &self.boot.initrd)].into_iter().chain(rootfs) {
            if self.artifact(name).is_none() {
                return Err(ManifestError::BootEntry { role, name: name.clone() });
            }
        }
        let want = Self::compute_digest(&self.artifacts);
        if want != self.digest {
            return Err(ManifestError::Digest { found: self.digest, want });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(name: &str, sha: char) -> Artifact {
        Artifact { name: name.into(), size: 3, sha256: sha.to_string().repeat(64) }
    }

    fn manifest() -> Manifest {
        let artifacts = vec![artifact("initrd.img", 'a'), artifact("vmlinuz", 'b')];
        Manifest {
            name: "tiny".into(),
            digest: Manifest::compute_digest(&artifacts),
            artifacts,
            boot: BootSpec { kernel: "vmlinuz".into(), initrd: "initrd.img".into(), cmdline: vec![], rootfs: None },
            inputs: InputDigests {
                spec: "sha256:0".into(),
                agent: "sha256:1".into(),
                kernel_package: PackageRef { name: "k".into(), version: "1".into(), sha256: "2".into(), origin: None },
                packages: vec![],
                key: "sha256:3".into(),
            },
        }
    }

    #[test]
    fn digest_ignores_order_and_follows_content() {
        let a = vec![artifact("x", 'a'), artifact("y", 'b')];
        let b = vec![artifact("y", 'b'), artifact("x", 'a')];
        assert_eq!(Manifest::compute_digest(&a), Manifest::compute_digest(&b));
        let c = vec![artifact("x", 'a'), artifact("y", 'c')];
        assert_ne!(Manifest::compute_digest(&a), Manifest::compute_digest(&c));
    }

    #[test]
    fn check_cases() {
        assert_eq!(manifest().check(), Ok(()));
        let mut m = manifest();
        m.digest = Digest::of("other artifacts");
        assert!(m.check().unwrap_err().to_string().contains("does not match"), "wrong digest");
        let mut m = manifest();
        m.boot.initrd = "nope".into();
        assert!(m.check().unwrap_err().to_string().contains("boot.initrd"), "missing initrd");
        let mut m = manifest();
        m.artifacts[0].name = "../etc/passwd".into();
        m.digest = Manifest::compute_digest(&m.artifacts);
        assert!(m.check().unwrap_err().to_string().contains("plain file name"), "escaping name");
    }
}
