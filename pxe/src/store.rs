//! The image store: the images `kiln build` wrote under one directory, each
//! with the generations it keeps.
//!
//! `kiln build --out DIR` keeps every generation of an image in a directory
//! named by its digest, `DIR/.generations/<name>/<hex>/`, and points the
//! symbolic link `DIR/<name>` at the current one
//! ([`kiln_core::manifest::GENERATIONS_DIR`]). A generation's directory never
//! changes once it is there, so what its manifest says about a file (size,
//! sha256) stays true of the bytes served from it: the `ETag` of an artifact
//! is the sha256 of what is sent. A directory `DIR/<name>` that is not a
//! link (a kiln from before generations, or one copied by hand) is the
//! image's only generation.
//!
//! [`ImageStore`] is one snapshot: loaded once, never changed. [`LiveImages`]
//! holds the current snapshot of a directory and replaces it, in one step,
//! when a build changes what is on disk ([`LiveImages::refresh`], which a
//! server runs every [`REFRESH_EVERY`]): a request works on the snapshot it
//! started with, so a boot script names one generation and every file it
//! names comes from that generation.

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

/// How often a server looks for new generations on disk.
pub const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// One generation of an image: its manifest and the directory its files are in.
#[derive(Debug)]
pub struct Generation {
    /// What the build wrote.
    pub manifest: Manifest,
    /// The directory holding the artifacts (a generation's own, under
    /// `DIR/.generations/`, or the image's plain directory).
    dir: PathBuf,
    /// The manifest's bytes as read, served as they are.
    manifest_bytes: bytes::Bytes,
    /// Hex sha256 of `manifest_bytes`.
    manifest_sha256: String,
    /// What the directory looked like when read (see [`Seen`]).
    seen: Seen,
}

impl Generation {
    /// The directory holding this generation's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// One image: the generation `DIR/<name>` points at, and the older ones kept.
#[derive(Debug, Clone)]
pub struct Image {
    /// The generation new boots get.
    pub current: std::sync::Arc<Generation>,
    /// Earlier generations still on disk, newest first.
    pub older: Vec<std::sync::Arc<Generation>>,
}

impl Image {
    /// The generation whose digest's hex is `hex`.
    pub fn generation(&self, hex: &str) -> Option<&std::sync::Arc<Generation>> {
        std::iter::once(&self.current).chain(&self.older).find(|g| g.manifest.digest.hex() == hex)
    }
}

/// Where the bytes of a served file come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file of a generation's directory.
    File(PathBuf),
    /// Bytes held in memory (a manifest, as it was read).
    Bytes(bytes::Bytes),
}

/// A file to serve and the hex sha256 of its bytes (its `ETag`).
#[derive(Debug, Clone)]
pub struct Served {
    /// Where its bytes are.
    pub source: Source,
    /// Hex sha256 of those bytes.
    pub sha256: String,
}

/// Every image under one directory, by name: one snapshot.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    images: BTreeMap<String, Image>,
}

/// A generation directory as a scan found it: enough to tell whether it
/// changed since it was read (a plain image directory can be rewritten in
/// place; a generation's own cannot).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    dir: PathBuf,
    manifest_inode: u64,
    manifest_mtime_ns: i128,
    /// When it became current (its directory's mtime, set by the build).
    dir_mtime_ns: i128,
}

impl Seen {
    fn of(dir: PathBuf) -> Option<Seen> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(dir.join(MANIFEST_FILE)).ok()?;
        let d = std::fs::metadata(&dir).ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(Seen {
            manifest_inode: m.ino(),
            manifest_mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            dir_mtime_ns: ns(d.mtime(), d.mtime_nsec()),
            dir,
        })
    }
}

/// What a scan of the directory found, by image name: the current
/// generation (`None` when `DIR/<name>` has no manifest) and the others.
type Scan = BTreeMap<String, (Option<Seen>, Vec<Seen>)>;

fn scan(dir: &Path) -> Result<Scan, Error> {
    let io = |source| Error::Io { path: dir.to_path_buf(), source };
    let mut found = Scan::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        // A link is followed to the generation it names.
        let Ok(real) = std::fs::canonicalize(entry.path()) else { continue };
        if !real.is_dir() {
            continue;
        }
        if let Some(seen) = Seen::of(real) {
            found.insert(name, (Some(seen), Vec::new()));
        }
    }
    let generations = dir.join(kiln_core::manifest::GENERATIONS_DIR);
    let names = match std::fs::read_dir(&generations) {
        Ok(names) => names,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(source) => return Err(Error::Io { path: generations, source }),
    };
    for entry in names.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((current, older)) = found.get_mut(&name) else { continue };
        let Ok(generations) = std::fs::read_dir(entry.path()) else { continue };
        for g in generations.filter_map(Result::ok) {
            if g.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let Ok(real) = std::fs::canonicalize(g.path()) else { continue };
            if current.as_ref().is_some_and(|c| c.dir == real) {
                continue;
            }
            older.extend(Seen::of(real));
        }
        older.sort_by(|a, b| b.dir_mtime_ns.cmp(&a.dir_mtime_ns).then_with(|| a.dir.cmp(&b.dir)));
    }
    Ok(found)
}

impl ImageStore {
    /// Loads every image of `dir`: `<dir>/<name>/manifest.json` (through the
    /// link to its current generation) and the generations kept under
    /// `<dir>/.generations/<name>/`. Other names starting with `.` are a
    /// build's temporary output and are skipped. A current generation with
    /// an invalid manifest, or an artifact missing or of the wrong size, is
    /// an error naming the file; an older one is skipped with a warning.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        Self::load_reusing(dir, scan(dir)?, None)
    }

    /// Loads what `found` lists, taking each generation `previous` already
    /// read, unchanged on disk, from there.
    fn load_reusing(dir: &Path, found: Scan, previous: Option<&ImageStore>) -> Result<Self, Error> {
        let reuse = |name: &str, seen: &Seen| {
            let image = previous?.images.get(name)?;
            std::iter::once(&image.current).chain(&image.older).find(|g| &g.seen == seen).cloned()
        };
        let mut images = BTreeMap::new();
        for (name, (current, older)) in found {
            let Some(current) = current else { continue };
            let current = match reuse(&name, &current) {
                Some(g) => g,
                None => std::sync::Arc::new(read_generation(&name, current)?),
            };
            let older = older
                .into_iter()
                .filter_map(|seen| {
                    let dir = seen.dir.clone();
                    match reuse(&name, &seen).map(Ok).unwrap_or_else(|| read_generation(&name, seen).map(std::sync::Arc::new)) {
                        Ok(g) if g.manifest.digest != current.manifest.digest => Some(g),
                        Ok(_) => None,
                        Err(e) => {
                            tracing::warn!(dir = %dir.display(), "skipping an older generation: {}", kiln_core::error_chain(&e));
                            None
                        }
                    }
                })
                .collect();
            images.insert(name, Image { current, older });
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

    /// The current generation's manifest of the image called `name`.
    pub fn get(&self, name: &str) -> Option<&Manifest> {
        self.images.get(name).map(|i| &i.current.manifest)
    }

    /// The image called `name`, with its generations.
    pub fn image(&self, name: &str) -> Option<&Image> {
        self.images.get(name)
    }

    /// The current generation of every image, by name.
    pub fn images(&self) -> impl Iterator<Item = &Manifest> {
        self.images.values().map(|i| &i.current.manifest)
    }

    /// The image a machine boots when nothing says otherwise: the first by name.
    pub fn default_image(&self) -> &Manifest {
        self.images().next().expect("a loaded store holds at least one image")
    }

    /// `file` of the current generation of image `name`.
    pub fn file(&self, name: &str, file: &str) -> Option<Served> {
        served(&self.images.get(name)?.current, file)
    }
}

/// `file` of `generation`, only if its manifest lists it (or it is the
/// manifest itself), so no request can name a path outside it.
pub(crate) fn served(generation: &Generation, file: &str) -> Option<Served> {
    if file == MANIFEST_FILE {
        return Some(Served { source: Source::Bytes(generation.manifest_bytes.clone()), sha256: generation.manifest_sha256.clone() });
    }
    let artifact = generation.manifest.artifact(file)?;
    Some(Served { source: Source::File(generation.dir.join(&artifact.name)), sha256: artifact.sha256.clone() })
}

/// Reads the generation of image `name` that `seen` found: its manifest
/// must name the image, and every artifact must be there at its size.
fn read_generation(name: &str, seen: Seen) -> Result<Generation, Error> {
    let path = seen.dir.join(MANIFEST_FILE);
    let (manifest, bytes) = read_manifest(&path)?;
    if manifest.name != name {
        return Err(Error::Misplaced { path, named: manifest.name, dir: name.to_string() });
    }
    for a in &manifest.artifacts {
        let file = seen.dir.join(&a.name);
        let size = std::fs::metadata(&file).map_err(|source| Error::MissingArtifact { path: file.clone(), source })?.len();
        if size != a.size {
            return Err(Error::ArtifactSize { path: file, size, want: a.size });
        }
    }
    let manifest_sha256 = kiln_core::Digest::of(&bytes).hex();
    Ok(Generation { manifest, dir: seen.dir.clone(), manifest_bytes: bytes.into(), manifest_sha256, seen })
}

fn read_manifest(path: &Path) -> Result<(Manifest, Vec<u8>), Error> {
    let bad = |e: Box<dyn std::error::Error + Send + Sync>| Error::BadManifest { path: path.to_path_buf(), source: e };
    let text = std::fs::read(path).map_err(|e| bad(e.into()))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| bad(e.into()))?;
    manifest.check().map_err(|e| bad(e.into()))?;
    Ok((manifest, text))
}

/// The images of one directory as a server serves them: a snapshot,
/// replaced whole when the directory changes.
#[derive(Debug)]
pub struct LiveImages {
    dir: PathBuf,
    snapshot: std::sync::RwLock<(Scan, std::sync::Arc<ImageStore>)>,
}

impl LiveImages {
    /// Loads `dir` ([`ImageStore::load`]'s errors).
    pub fn load(dir: &Path) -> Result<LiveImages, Error> {
        let found = scan(dir)?;
        let store = ImageStore::load_reusing(dir, found.clone(), None)?;
        Ok(LiveImages { dir: dir.to_path_buf(), snapshot: std::sync::RwLock::new((found, std::sync::Arc::new(store))) })
    }

    /// A store of fixed images (tests, tools).
    pub fn fixed(store: ImageStore) -> LiveImages {
        let dir = store.root.clone();
        LiveImages { dir, snapshot: std::sync::RwLock::new((Scan::new(), std::sync::Arc::new(store))) }
    }

    /// The current snapshot.
    pub fn current(&self) -> std::sync::Arc<ImageStore> {
        self.snapshot.read().expect("the image snapshot lock is never poisoned").1.clone()
    }

    /// Scans the directory and, when a generation appeared, went or
    /// changed, loads a new snapshot and puts it in place. Returns the
    /// images whose current generation changed, as (name, new manifest).
    /// When the new state cannot be loaded (a manifest that does not
    /// parse, an artifact missing) the error is returned and the snapshot
    /// in place stays served.
    pub fn refresh(&self) -> Result<Vec<Manifest>, Error> {
        let found = scan(&self.dir)?;
        let previous = {
            let snapshot = self.snapshot.read().expect("the image snapshot lock is never poisoned");
            if snapshot.0 == found {
                return Ok(Vec::new());
            }
            snapshot.1.clone()
        };
        let store = ImageStore::load_reusing(&self.dir, found.clone(), Some(&previous))?;
        let changed = store.images().filter(|m| previous.get(&m.name).is_none_or(|p| p.digest != m.digest)).cloned().collect();
        *self.snapshot.write().expect("the image snapshot lock is never poisoned") = (found, std::sync::Arc::new(store));
        Ok(changed)
    }

    /// Runs [`LiveImages::refresh`] every [`REFRESH_EVERY`] until the task
    /// is aborted, logging each new current generation and each failure
    /// (once per distinct error).
    pub async fn watch(self: std::sync::Arc<Self>) {
        let mut every = tokio::time::interval(REFRESH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error = None;
        loop {
            every.tick().await;
            let images = self.clone();
            let result = match tokio::task::spawn_blocking(move || images.refresh()).await {
                Ok(result) => result,
                Err(e) => {
                    tracing::error!("scanning the image directory: {e}");
                    continue;
                }
            };
            match result {
                Ok(changed) => {
                    last_error = None;
                    for m in changed {
                        tracing::info!(image = %m.name, digest = %m.digest, "serving a new generation");
                    }
                }
                Err(e) => {
                    let text = kiln_core::error_chain(&e);
                    if last_error.as_ref() != Some(&text) {
                        tracing::warn!("the image directory changed but cannot be loaded; still serving what was loaded: {text}");
                    }
                    last_error = Some(text);
                }
            }
        }
    }
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

    /// Writes a generation of image `name` whose kernel holds `kernel`, as
    /// `kiln build` does: in `.generations/<name>/<hex>/`, then the link
    /// `<name>` renamed over to point at it.
    pub fn write_generation(dir: &Path, name: &str, kernel: &[u8]) -> Manifest {
        let staging = dir.join(format!(".{name}.staging"));
        let mut manifest = write_image(&staging, name);
        std::fs::write(staging.join(name).join("vmlinuz"), kernel).unwrap();
        let artifact = manifest.artifacts.iter_mut().find(|a| a.name == "vmlinuz").unwrap();
        artifact.size = kernel.len() as u64;
        artifact.sha256 = kiln_core::Digest::of(kernel).hex();
        manifest.digest = Manifest::compute_digest(&manifest.artifacts);
        std::fs::write(staging.join(name).join(MANIFEST_FILE), serde_json::to_vec(&manifest).unwrap()).unwrap();
        let generations = kiln_core::manifest::generations_of(dir, name);
        std::fs::create_dir_all(&generations).unwrap();
        std::fs::rename(staging.join(name), generations.join(manifest.digest.hex())).unwrap();
        std::fs::remove_dir(&staging).unwrap();
        let link = dir.join(format!(".{name}.link"));
        std::os::unix::fs::symlink(Path::new(".generations").join(name).join(manifest.digest.hex()), &link).unwrap();
        std::fs::rename(&link, dir.join(name)).unwrap();
        manifest
    }

    #[test]
    fn a_new_generation_replaces_the_snapshot_and_the_old_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let one = write_generation(dir.path(), "tiny", b"kernel one");
        let live = LiveImages::load(dir.path()).unwrap();
        let before = live.current();
        assert_eq!(before.get("tiny").unwrap().digest, one.digest);
        assert!(live.refresh().unwrap().is_empty(), "nothing changed on disk");
        assert!(std::sync::Arc::ptr_eq(&before, &live.current()), "the snapshot is kept while nothing changes");

        let two = write_generation(dir.path(), "tiny", b"kernel two");
        let changed = live.refresh().unwrap();
        assert_eq!(changed.iter().map(|m| m.digest).collect::<Vec<_>>(), [two.digest]);
        let now = live.current();
        assert_eq!(now.get("tiny").unwrap().digest, two.digest);
        let older: Vec<_> = now.image("tiny").unwrap().older.iter().map(|g| g.manifest.digest).collect();
        assert_eq!(older, [one.digest], "the previous generation is still there");
        // A snapshot taken before still names the old generation's files.
        let Source::File(path) = before.file("tiny", "vmlinuz").unwrap().source else { panic!("a file") };
        assert_eq!(std::fs::read(path).unwrap(), b"kernel one");
        let kept = now.image("tiny").unwrap().generation(&one.digest.hex()).unwrap();
        assert_eq!(served(kept, "vmlinuz").unwrap().sha256, one.artifact("vmlinuz").unwrap().sha256);

        // A generation that does not load leaves the snapshot in place.
        let staged = dir.path().join(".generations/tiny/broken");
        std::fs::create_dir_all(&staged).unwrap();
        std::fs::write(staged.join(MANIFEST_FILE), b"{").unwrap();
        std::fs::remove_file(dir.path().join("tiny")).unwrap();
        std::os::unix::fs::symlink(".generations/tiny/broken", dir.path().join("tiny")).unwrap();
        let err = live.refresh().unwrap_err();
        assert!(err.to_string().contains("broken/manifest.json"), "names the manifest: {err}");
        assert_eq!(live.current().get("tiny").unwrap().digest, two.digest, "still serving what was loaded");
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
