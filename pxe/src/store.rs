//! The image store: the images `kiln build` wrote under one directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_core::Manifest;
use kiln_core::manifest::MANIFEST_FILE;

/// Loading images failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory could not be read.
    #[error("image directory {path}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A manifest cannot be read, does not parse or is not self-consistent.
    #[error("{path}")]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong: the read, JSON or check error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A manifest names another image than its directory's.
    #[error("{path}: names image {named:?} but sits in directory {dir:?}")]
    Misplaced {
        /// The manifest file.
        path: PathBuf,
        /// The image it names.
        named: String,
        /// Its directory's name.
        dir: String,
    },
    /// An artifact a manifest lists cannot be read.
    #[error("{path}")]
    MissingArtifact {
        /// The artifact file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An artifact has another size than its manifest says.
    #[error("{path}: {size} bytes, the manifest says {want}")]
    ArtifactSize {
        /// The artifact file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The manifest's size.
        want: u64,
    },
    /// No image at all.
    #[error("no image in {path}: expected <name>/{MANIFEST_FILE} as `kiln build --out {path}` writes it")]
    Empty {
        /// The directory.
        path: PathBuf,
    },
}

/// Every image under one directory, by name.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    images: BTreeMap<String, Manifest>,
}

impl ImageStore {
    /// Loads every `<dir>/<name>/manifest.json`. Directories whose names
    /// start with `.` are a build's temporary output and are skipped. Any
    /// other directory with an invalid manifest, or an artifact missing or of
    /// the wrong size, is an error naming the file.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let entries = std::fs::read_dir(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
        let mut images = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            let path = entry.path().join(MANIFEST_FILE);
            if !path.exists() {
                continue;
            }
            let manifest = read_manifest(&path)?;
            if manifest.name != name {
                return Err(Error::Misplaced { path, named: manifest.name, dir: name });
            }
            for a in &manifest.artifacts {
                let file = entry.path().join(&a.name);
                let size = std::fs::metadata(&file).map_err(|source| Error::MissingArtifact { path: file.clone(), source })?.len();
                if size != a.size {
                    return Err(Error::ArtifactSize { path: file, size, want: a.size });
                }
            }
            images.insert(name, manifest);
        }
        if images.is_empty() {
            return Err(Error::Empty { path: dir.to_path_buf() });
        }
        Ok(ImageStore { root: dir.to_path_buf(), images })
    }

    /// The directory the images are in (`DIR/<name>/<artifact>`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image called `name`.
    pub fn get(&self, name: &str) -> Option<&Manifest> {
        self.images.get(name)
    }

    /// Every image, by name.
    pub fn images(&self) -> impl Iterator<Item = &Manifest> {
        self.images.values()
    }

    /// The image a machine boots when nothing says otherwise: the first by name.
    pub fn default_image(&self) -> &Manifest {
        self.images.values().next().expect("a loaded store holds at least one image")
    }

    /// The path of `file` of image `name`, only if the manifest lists it (or
    /// it is the manifest itself), with its sha256 (`None` for the manifest).
    pub fn file(&self, name: &str, file: &str) -> Option<(PathBuf, Option<&str>)> {
        let manifest = self.images.get(name)?;
        if file == MANIFEST_FILE {
            return Some((self.root.join(name).join(MANIFEST_FILE), None));
        }
        let artifact = manifest.artifact(file)?;
        Some((self.root.join(name).join(&artifact.name), Some(artifact.sha256.as_str())))
    }
}

fn read_manifest(path: &Path) -> Result<Manifest, Error> {
    let bad = |e: Box<dyn std::error::Error + Send + Sync>| Error::BadManifest { path: path.to_path_buf(), source: e };
    let text = std::fs::read(path).map_err(|e| bad(e.into()))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| bad(e.into()))?;
    manifest.check().map_err(|e| bad(e.into()))?;
    Ok(manifest)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kiln_core::{Artifact, BootSpec, InputDigests, PackageRef};

    /// Writes an image `name` with a kernel and an initrd into `dir`.
    pub fn write_image(dir: &Path, name: &str) -> Manifest {
        let image = dir.join(name);
        std::fs::create_dir_all(&image).unwrap();
        let mut artifacts = Vec::new();
        for (file, bytes) in [("initrd.img", b"initrd-bytes".as_slice()), ("vmlinuz", b"kernel-bytes".as_slice())] {
            std::fs::write(image.join(file), bytes).unwrap();
            let sha = kiln_core::Digest::of(bytes).hex();
            artifacts.push(Artifact { name: file.into(), size: bytes.len() as u64, sha256: sha });
        }
        let manifest = Manifest {
            name: name.into(),
            digest: Manifest::compute_digest(&artifacts),
            artifacts,
            boot: BootSpec { kernel: "vmlinuz".into(), initrd: "initrd.img".into(), cmdline: vec!["console=ttyS0".into()], rootfs: None },
            inputs: InputDigests {
                spec: "sha256:s".into(),
                agent: "sha256:a".into(),
                kernel_package: PackageRef { name: "k".into(), version: "1".into(), sha256: "x".into(), origin: None },
                packages: vec![],
                key: "sha256:k".into(),
            },
        };
        std::fs::write(image.join(MANIFEST_FILE), serde_json::to_vec(&manifest).unwrap()).unwrap();
        manifest
    }

    #[test]
    fn loads_and_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let err = ImageStore::load(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Empty { .. }), "empty dir: {err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()), "names the dir: {err}");

        write_image(dir.path(), "tiny");
        std::fs::create_dir_all(dir.path().join(".tiny.tmp-x")).unwrap();
        let store = ImageStore::load(dir.path()).unwrap();
        assert_eq!(store.default_image().name, "tiny");
        assert!(store.file("tiny", "vmlinuz").is_some());
        assert!(store.file("tiny", "../tiny/vmlinuz").is_none(), "only listed files");
        assert!(store.file("tiny", "nope").is_none());

        std::fs::write(dir.path().join("tiny/vmlinuz"), b"short").unwrap();
        let err = ImageStore::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("vmlinuz"), "truncated artifact named: {err}");

        write_image(dir.path(), "tiny");
        std::fs::write(dir.path().join("tiny/manifest.json"), b"{").unwrap();
        let err = ImageStore::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("tiny/manifest.json"), "bad manifest named: {err}");
    }
}
