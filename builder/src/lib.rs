//! kiln-builder: from an image spec (`images/*.toml`) to the artifacts that
//! `kiln serve` serves and QEMU boots.
//!
//! A build has phases, each reported through [`Event`]s:
//! 1. **resolve**: parse the spec; resolve its Debian packages to exact
//!    versions through apt's index (no download); hash the agent. Together
//!    these make the cache key. An image directory whose manifest carries the
//!    same key, and whose artifacts still match their sha256, is a cache hit.
//! 2. **fetch**: download the `.deb`s into the cache (checked against the
//!    archive's sha256) and unpack them there once.
//! 3. **initramfs**: a reproducible cpio (fixed owners, mtimes and order) with
//!    busybox, kiln-agent and the libraries it links, the kernel modules the
//!    spec names with what `modules.dep` says they need, and an init script.
//! 4. **write**: artifacts and `manifest.json` go into a temporary directory
//!    beside the output, which becomes a generation of the image
//!    (`OUT/.generations/<name>/<hex digest>/`); the link `OUT/<name>` is
//!    then pointed at it with one atomic rename (`swap_in`): a build
//!    killed at any point leaves the previous image and the cache whole, and
//!    a server reading the previous generation keeps reading it.
//!
//! A worker spec (`[base]`, e.g. `images/worker.toml`) takes the other road,
//! [`worker`]: a cached Debian base tree ([`base`]), kiln's layers on a
//! hard-linked copy of it ([`layer`]), then file systems, a GPT disk that
//! boots under BIOS and UEFI, and a qcow2 ([`disk`]); no VM, no mount, no
//! loop device.
//!
//! To add a kind of image, add a variant to [`spec::Spec`] and a module that
//! turns it into artifacts; [`Builder::build`] dispatches on the spec.
//!
//! Owns building images and their cache; does not serve, boot or sign
//! anything (the CA it bakes in is handed to it).

pub mod additions;
pub mod apt;
pub mod base;
pub mod cpio;
pub mod disk;
pub mod diskless;
pub mod interrupt;
pub mod layer;
pub mod repos;
pub mod spec;
pub mod worker;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::Compression;
use kiln_core::manifest::MANIFEST_FILE;
use kiln_core::{Artifact, BootSpec, InputDigests, Manifest, PackageRef};
use serde::Serialize;

pub use apt::Archive;
pub use spec::ImageSpec;

/// Errors of the builder. Each names the file, key or package at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec is not valid TOML for an image spec.
    #[error("{file}: key `{key}`: {message}")]
    SpecParse {
        /// The spec file.
        file: PathBuf,
        /// Dotted path of the key at fault (empty when the TOML itself is broken).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The spec parsed but a value is not acceptable.
    #[error("{file}: key `{key}`: {message}")]
    SpecInvalid {
        /// The spec file.
        file: PathBuf,
        /// Dotted path of the key at fault.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// apt does not know the package.
    #[error("unknown package `{package}` (apt-cache: {detail})")]
    UnknownPackage {
        /// The package name.
        package: String,
        /// What apt said.
        detail: String,
    },
    /// Downloading a package failed.
    #[error("fetching package `{package}`: {detail}")]
    Fetch {
        /// The package name.
        package: String,
        /// What went wrong.
        detail: String,
    },
    /// A kernel module the spec names is not in the kernel package.
    #[error("kernel module `{module}` is not in {package}")]
    MissingModule {
        /// The module name.
        module: String,
        /// The kernel package.
        package: String,
    },
    /// A package lacks a file the image needs from it.
    #[error("package `{package}` has no {what}")]
    MissingFile {
        /// The package.
        package: String,
        /// The file looked for.
        what: String,
    },
    /// The kiln-agent binary to bake in.
    #[error("kiln-agent binary {path}: {reason}")]
    Agent {
        /// Where it was looked for.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file operation failed.
    #[error("{path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A program could not be started.
    #[error("starting {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An extra apt repository could not be used: unreachable, unsigned,
    /// or signed with another key than its `signed-by`.
    #[error("repository `{repository}`: {detail}")]
    Repository {
        /// `URI SUITE [COMPONENTS]`.
        repository: String,
        /// What apt said.
        detail: String,
    },
    /// The build was stopped by a signal (Ctrl-C, SIGTERM); every program
    /// it started is gone and its temporary directories are removed.
    #[error("interrupted by {signal}")]
    Interrupted {
        /// `SIGINT` or `SIGTERM`.
        signal: &'static str,
    },
    /// A file of kiln's cache is not what was recorded when it was made
    /// (its sha256 differs): the cache entry is removed and made again.
    #[error("{path}: the cached file's sha256 is {got}, not {want} as recorded")]
    DamagedCache {
        /// The cached file.
        path: PathBuf,
        /// Its sha256 now.
        got: String,
        /// Its sha256 when it was made.
        want: String,
    },
    /// Too little room to build, found before anything is written.
    #[error("not enough disk space on {path}: the build needs {needed_mib} MiB, {available_mib} MiB are free")]
    NoSpace {
        /// A directory on the file system at fault.
        path: PathBuf,
        /// What the build needs there, in MiB.
        needed_mib: u64,
        /// What is free, in MiB.
        available_mib: u64,
    },
    /// A program failed.
    #[error("{program} failed ({status}): {stderr}")]
    Command {
        /// The program.
        program: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// Progress of a build, for a progress bar or one JSON line each (`--json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A phase started.
    Phase {
        /// `resolve`, `fetch`, `initramfs`, `write`; for a worker image
        /// `resolve`, `base`, `layers`, `filesystem`, `disk`, `convert`, `write`.
        phase: String,
        /// What it is working on.
        detail: String,
    },
    /// The image was up to date: nothing was rebuilt.
    Cached {
        /// Image name.
        image: String,
        /// Image digest.
        digest: kiln_core::Digest,
    },
    /// The image was built.
    Built {
        /// Image name.
        image: String,
        /// Image digest.
        digest: kiln_core::Digest,
        /// Total bytes of its artifacts.
        bytes: u64,
    },
    /// A signal stopped the build ([`interrupt`]); nothing was changed.
    Interrupted {
        /// `SIGINT` or `SIGTERM`.
        signal: String,
    },
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The manifest written (or found, on a cache hit).
    pub manifest: Manifest,
    /// The image directory.
    pub dir: PathBuf,
    /// True when the existing image was up to date.
    pub cached: bool,
}

impl Outcome {
    /// The image in `dir` when it is up to date with `key` (`up_to_date`),
    /// reported as [`Event::Cached`].
    pub(crate) fn cached(dir: &Path, key: &str, progress: &dyn Fn(Event)) -> Option<Outcome> {
        let manifest = up_to_date(dir, key)?;
        progress(Event::Cached { image: manifest.name.clone(), digest: manifest.digest });
        Some(Outcome { manifest, dir: dir.to_path_buf(), cached: true })
    }

    /// The image just written to `dir`, reported as [`Event::Built`].
    pub(crate) fn built(manifest: Manifest, dir: PathBuf, progress: &dyn Fn(Event)) -> Outcome {
        let bytes = manifest.artifacts.iter().map(|a| a.size).sum();
        progress(Event::Built { image: manifest.name.clone(), digest: manifest.digest, bytes });
        Outcome { manifest, dir, cached: false }
    }
}

/// Builds images. Holds the cache location and the agent binary to bake in.
#[derive(Debug, Clone)]
pub struct Builder {
    /// Cache directory: `.deb`s and their unpacked trees.
    pub cache: PathBuf,
    /// The kiln-agent binary (release build) to bake into images.
    pub agent: PathBuf,
    /// Timestamp for every file in every archive (SOURCE_DATE_EPOCH).
    pub source_date_epoch: u32,
    /// apt's package lists (`/var/lib/apt/lists`): while they are unchanged,
    /// package resolutions are taken from the cache. `None`: always ask apt.
    pub apt_lists: Option<PathBuf>,
    /// The control plane's CA certificate (PEM), baked in at
    /// `/etc/kiln/ca.pem`: the only certificates the agent trusts.
    pub ca: Option<Vec<u8>>,
    /// Generations of an image kept under `OUT/.generations/<name>/`, the
    /// new one included ([`kiln_core::manifest::KEEP_GENERATIONS`] by
    /// default): what a server still serves to nodes that booted an older
    /// one, and what `kiln rollout undo` goes back to.
    pub keep_generations: usize,
}

/// Bumped when the builder's output changes for the same inputs.
pub(crate) const BUILDER_FORMAT: &str = "kiln-builder/1";

const INIT_SCRIPT: &str = include_str!("init.sh");
const UDHCPC_SCRIPT: &str = include_str!("udhcpc.sh");

/// Everything a build reads, resolved, before anything is written.
struct Inputs {
    spec: ImageSpec,
    spec_digest: String,
    agent: Vec<u8>,
    agent_digest: String,
    libs: Vec<(PathBuf, Vec<u8>)>,
    kernel: PackageRef,
    busybox: PackageRef,
    /// The packages of `[[initramfs.files]]`, in the spec's order.
    extra: Vec<PackageRef>,
    key: String,
}

impl Builder {
    /// Builds the image that `spec_path` describes into `out/<name>/`.
    pub fn build(&self, spec_path: &Path, out: &Path, progress: &dyn Fn(Event)) -> Result<Outcome, Error> {
        progress(Event::Phase { phase: "resolve".into(), detail: spec_path.display().to_string() });
        let spec_bytes = read(spec_path)?;
        if let spec::Spec::Worker(worker) = spec::Spec::from_str(&String::from_utf8_lossy(&spec_bytes), spec_path)? {
            return worker::build(self, spec_path, &spec_bytes, &worker, out, progress);
        }
        let inputs = self.resolve(spec_path)?;
        let dir = out.join(&inputs.spec.name);
        if let Some(outcome) = Outcome::cached(&dir, &inputs.key, progress) {
            return Ok(outcome);
        }

        let archive = Archive::new(&self.cache).with_lists(self.apt_lists.clone());
        progress(Event::Phase { phase: "fetch".into(), detail: format!("{} {}", inputs.kernel.name, inputs.kernel.version) });
        let kernel_tree = archive.unpacked(&inputs.kernel, |tree| {
            let version = kernel_version(tree, &inputs.kernel)?;
            apt::run(Command::new("depmod").arg("-b").arg(tree).arg(&version))
        })?;
        progress(Event::Phase { phase: "fetch".into(), detail: format!("{} {}", inputs.busybox.name, inputs.busybox.version) });
        let busybox_tree = archive.unpacked(&inputs.busybox, |_| Ok(()))?;
        let mut extra_trees = Vec::new();
        for pkg in &inputs.extra {
            progress(Event::Phase { phase: "fetch".into(), detail: format!("{} {}", pkg.name, pkg.version) });
            extra_trees.push(archive.unpacked(pkg, |_| Ok(()))?);
        }

        progress(Event::Phase { phase: "initramfs".into(), detail: format!("{} modules", inputs.spec.kernel.modules.len()) });
        let kver = kernel_version(&kernel_tree, &inputs.kernel)?;
        let initrd = self.initramfs(&inputs, &kernel_tree, &kver, &busybox_tree, &extra_trees)?;
        let vmlinuz = read(&kernel_tree.join(format!("boot/vmlinuz-{kver}")))?;

        progress(Event::Phase { phase: "write".into(), detail: dir.display().to_string() });
        let files: Vec<(&str, &[u8])> = vec![("initrd.img", &initrd), ("vmlinuz", &vmlinuz)];
        let artifacts: Vec<Artifact> = files
            .iter()
            .map(|(name, bytes)| Artifact { name: name.to_string(), size: bytes.len() as u64, sha256: sha256_hex(bytes) })
            .collect();
        let manifest = Manifest {
            name: inputs.spec.name.clone(),
            digest: Manifest::compute_digest(&artifacts),
            artifacts,
            boot: BootSpec {
                kernel: "vmlinuz".into(),
                initrd: "initrd.img".into(),
                cmdline: inputs.spec.kernel.cmdline.clone(),
                rootfs: None,
            },
            inputs: InputDigests {
                spec: inputs.spec_digest.clone(),
                agent: inputs.agent_digest.clone(),
                kernel_package: inputs.kernel.clone(),
                packages: std::iter::once(inputs.busybox.clone()).chain(inputs.extra.iter().cloned()).collect(),
                key: inputs.key.clone(),
            },
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        let mut all = files;
        all.push((MANIFEST_FILE, &json));
        install_dir(out, &inputs.spec.name, &manifest.digest, &all, self.keep_generations)?;
        Ok(Outcome::built(manifest, dir, progress))
    }

    /// The kiln-agent binary's bytes, checked to be an ELF executable.
    fn agent_bytes(&self) -> Result<Vec<u8>, Error> {
        let agent = std::fs::read(&self.agent).map_err(|e| Error::Agent { path: self.agent.clone(), reason: e.to_string() })?;
        if !agent.starts_with(b"\x7fELF") {
            return Err(Error::Agent { path: self.agent.clone(), reason: "not an ELF executable".into() });
        }
        Ok(agent)
    }

    fn resolve(&self, spec_path: &Path) -> Result<Inputs, Error> {
        let spec_bytes = read(spec_path)?;
        let spec = ImageSpec::from_str(&String::from_utf8_lossy(&spec_bytes), spec_path)?;
        let agent = self.agent_bytes()?;
        let libs = linked_libraries(&self.agent)?.into_iter().map(|p| read(&p).map(|b| (p, b))).collect::<Result<Vec<_>, _>>()?;
        let archive = Archive::new(&self.cache).with_lists(self.apt_lists.clone());
        let kernel = archive.resolve_kernel(&spec.kernel.package)?;
        let busybox = archive.resolve(&spec.initramfs.busybox_package)?.package;
        let extra = spec.initramfs.files.iter().map(|f| archive.resolve(&f.package).map(|s| s.package)).collect::<Result<Vec<_>, _>>()?;
        let spec_digest = kiln_core::Digest::of(&spec_bytes).to_string();
        let agent_digest = kiln_core::Digest::of(&agent).to_string();
        let mut key_text = format!("{BUILDER_FORMAT}\n{spec_digest}\n{agent_digest}\n{}\n{}\n", kernel.sha256, busybox.sha256);
        for (path, bytes) in &libs {
            key_text.push_str(&format!("{} {}\n", path.display(), sha256_hex(bytes)));
        }
        for pkg in &extra {
            key_text.push_str(&format!("{} {}\n", pkg.name, pkg.sha256));
        }
        if let Some(ca) = &self.ca {
            key_text.push_str(&format!("ca {}\n", sha256_hex(ca)));
        }
        key_text.push_str(&format!("{}\n{}\n", self.source_date_epoch, INIT_SCRIPT));
        key_text.push_str(UDHCPC_SCRIPT);
        let key = kiln_core::Digest::of(&key_text).to_string();
        Ok(Inputs { spec, spec_digest, agent, agent_digest, libs, kernel, busybox, extra, key })
    }

    fn initramfs(
        &self,
        inputs: &Inputs,
        kernel_tree: &Path,
        kver: &str,
        busybox_tree: &Path,
        extra_trees: &[PathBuf],
    ) -> Result<Vec<u8>, Error> {
        let mut entries = Tree::default();
        for dir in ["bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "etc", "root", "var"] {
            entries.put(dir, 0o755, cpio::Entry::Dir);
        }
        entries.put("dev/console", 0o600, cpio::Entry::CharDev(5, 1));
        entries.put("init", 0o755, cpio::Entry::File(INIT_SCRIPT.as_bytes().to_vec()));
        entries.put("etc/kiln/udhcpc.script", 0o755, cpio::Entry::File(UDHCPC_SCRIPT.as_bytes().to_vec()));
        entries.put("etc/kiln/image", 0o644, cpio::Entry::File(format!("{}\n", inputs.spec.name).into_bytes()));
        let busybox = read(&busybox_tree.join("bin/busybox"))
            .map_err(|_| Error::MissingFile { package: inputs.busybox.name.clone(), what: "bin/busybox".into() })?;
        entries.put("bin/busybox", 0o755, cpio::Entry::File(busybox));
        entries.put("bin/sh", 0o777, cpio::Entry::Symlink("busybox".into()));
        entries.put("usr/bin/kiln-agent", 0o755, cpio::Entry::File(inputs.agent.clone()));
        if let Some(ca) = &self.ca {
            entries.put(kiln_core::IMAGE_CA_PATH.trim_start_matches('/'), 0o644, cpio::Entry::File(ca.clone()));
        }
        for (path, bytes) in &inputs.libs {
            let rel = path.to_string_lossy().trim_start_matches('/').to_string();
            entries.put(&rel, 0o755, cpio::Entry::File(bytes.clone()));
        }

        for ((files, pkg), tree) in inputs.spec.initramfs.files.iter().zip(&inputs.extra).zip(extra_trees) {
            for rel in &files.paths {
                let path = tree.join(rel);
                let missing = || Error::MissingFile { package: pkg.name.clone(), what: rel.clone() };
                let meta = std::fs::symlink_metadata(&path).map_err(|_| missing())?;
                let entry = if meta.file_type().is_symlink() {
                    let target = std::fs::read_link(&path).map_err(|_| missing())?;
                    (0o777, cpio::Entry::Symlink(target.to_string_lossy().into_owned()))
                } else {
                    use std::os::unix::fs::PermissionsExt;
                    (meta.permissions().mode() & 0o755, cpio::Entry::File(read(&path)?))
                };
                entries.put(rel, entry.0, entry.1);
            }
        }

        let modules = module_load_order(kernel_tree, kver, &inputs.spec.kernel.modules, &inputs.kernel.name)?;
        for rel in &modules {
            let bytes = read(&kernel_tree.join("lib/modules").join(rel))?;
            entries.put(&format!("lib/modules/{rel}"), 0o644, cpio::Entry::File(bytes));
        }
        let list: String = modules.iter().map(|m| format!("{m}\n")).collect();
        entries.put("etc/kiln/modules", 0o644, cpio::Entry::File(list.into_bytes()));

        let gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), Compression::new(6));
        let mut writer = cpio::Writer::new(gz, self.source_date_epoch);
        for (path, (perm, entry)) in &entries.0 {
            writer.add(path, *perm, entry).map_err(|source| Error::Io { path: PathBuf::from(path), source })?;
        }
        let gz = writer.finish().map_err(|source| Error::Io { path: "initrd.img".into(), source })?;
        gz.finish().map_err(|source| Error::Io { path: "initrd.img".into(), source })
    }
}

/// The entries of an archive by path; sorted, so parents come before children.
#[derive(Default)]
struct Tree(BTreeMap<String, (u32, cpio::Entry)>);

impl Tree {
    /// Adds `path` and, as directories, every parent it lacks.
    fn put(&mut self, path: &str, perm: u32, entry: cpio::Entry) {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            end += i;
            self.0.entry(path[..end].to_string()).or_insert((0o755, cpio::Entry::Dir));
            end += 1;
        }
        self.0.insert(path.to_string(), (perm, entry));
    }
}

/// The manifest in `dir` if it was made from inputs with `key` and every
/// artifact is still there with its recorded sha256.
fn up_to_date(dir: &Path, key: &str) -> Option<Manifest> {
    let text = std::fs::read(dir.join(MANIFEST_FILE)).ok()?;
    let manifest: Manifest = serde_json::from_slice(&text).ok()?;
    if manifest.inputs.key != key || manifest.check().is_err() {
        return None;
    }
    for a in &manifest.artifacts {
        let path = dir.join(&a.name);
        if std::fs::metadata(&path).ok()?.len() != a.size || apt::file_sha256(&path).ok()? != a.sha256 {
            return None;
        }
    }
    Some(manifest)
}

/// Writes `files` into a fresh temporary directory under `out`, then swaps
/// it in as `out/<name>` with one `renameat2(RENAME_EXCHANGE)` (or a plain
/// rename when there was none), and removes the old one. Files are not
/// fsynced here: a torn artifact after a crash fails its sha256 check, and
/// the next build makes it again.
fn install_dir(out: &Path, name: &str, digest: &kiln_core::Digest, files: &[(&str, &[u8])], keep: usize) -> Result<(), Error> {
    apt::create_dir(out)?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(out)
        .map_err(|source| Error::Io { path: out.into(), source })?;
    for (file, bytes) in files {
        let path = tmp.path().join(file);
        let mut f = std::fs::File::create(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|source| Error::Io { path: path.clone(), source })?;
    }
    swap_in(out, name, digest, tmp, keep)
}

/// Makes the staged directory `tmp` (under `out`, every file and the
/// manifest of `digest` written) a generation of image `name`, and the
/// current one:
///
/// 1. `tmp` is renamed to `out/.generations/<name>/<hex digest>/` (over an
///    earlier generation of the same digest, which has the same bytes, with
///    `renameat2(RENAME_EXCHANGE)`);
/// 2. `out/<name>`, a symbolic link, is pointed at it by renaming a new link
///    over it: one atomic step, so a reader sees the old generation or the
///    new one, never a mix. An `out/<name>` that is still a directory (made
///    by a kiln before generations) is exchanged for the link and kept as a
///    generation of its own;
/// 3. generations beyond the newest `keep` (by the time each became
///    current) are removed, each renamed to a hidden name first so that no
///    reader ever sees half of one.
///
/// A server that booted a node from an older generation keeps serving it
/// from its own directory until it is removed. Files are not fsynced here: a
/// torn artifact after a crash fails its sha256 check, and the next build
/// makes it again.
pub(crate) fn swap_in(out: &Path, name: &str, digest: &kiln_core::Digest, tmp: tempfile::TempDir, keep: usize) -> Result<(), Error> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| Error::Io { path, source }
    };
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).map_err(io(tmp.path()))?;
    let hex = digest.hex();
    let generations = kiln_core::manifest::generations_of(out, name);
    std::fs::create_dir_all(&generations).map_err(io(&generations))?;
    let dest = generations.join(&hex);
    if dest.exists() {
        exchange(tmp.path(), &dest)?;
        // `tmp` now holds the earlier copy of the same bytes; dropping it removes it.
        drop(tmp);
    } else {
        let kept = tmp.keep();
        std::fs::rename(&kept, &dest).map_err(io(&dest))?;
    }
    // The time it became current orders generations for pruning.
    std::fs::File::open(&dest).and_then(|d| d.set_modified(std::time::SystemTime::now())).map_err(io(&dest))?;

    let link = out.join(name);
    let staged = out.join(format!(".{name}.link-{}", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    let target = Path::new(kiln_core::manifest::GENERATIONS_DIR).join(name).join(&hex);
    std::os::unix::fs::symlink(&target, &staged).map_err(io(&staged))?;
    match std::fs::symlink_metadata(&link) {
        Ok(m) if m.is_dir() => {
            exchange(&staged, &link)?;
            // `staged` is now the directory an older kiln wrote: keep it as a generation.
            match generation_digest(&staged).map(|h| generations.join(h)) {
                Some(old) if !old.exists() => std::fs::rename(&staged, &old).map_err(io(&old))?,
                _ => std::fs::remove_dir_all(&staged).map_err(io(&staged))?,
            }
        }
        _ => std::fs::rename(&staged, &link).map_err(io(&link))?,
    }
    prune_generations(&generations, &hex, keep)
}

/// The hex digest named by the manifest in `dir` (an image directory an
/// older kiln wrote), if it can be read.
fn generation_digest(dir: &Path) -> Option<String> {
    let bytes = std::fs::read(dir.join(MANIFEST_FILE)).ok()?;
    let manifest: Manifest = serde_json::from_slice(&bytes).ok()?;
    Some(manifest.digest.hex())
}

/// Exchanges two paths with `renameat2(RENAME_EXCHANGE)`.
fn exchange(a: &Path, b: &Path) -> Result<(), Error> {
    nix::fcntl::renameat2(nix::fcntl::AT_FDCWD, a, nix::fcntl::AT_FDCWD, b, nix::fcntl::RenameFlags::RENAME_EXCHANGE)
        .map_err(|e| Error::Io { path: b.to_path_buf(), source: e.into() })
}

/// Removes the generations in `dir` but `current` and the newest `keep - 1`
/// others. A directory is renamed to a hidden name before it is removed.
fn prune_generations(dir: &Path, current: &str, keep: usize) -> Result<(), Error> {
    let io = |source| Error::Io { path: dir.to_path_buf(), source };
    let mut others = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == current || name.starts_with('.') {
            continue;
        }
        let modified = entry.metadata().and_then(|m| m.modified()).map_err(io)?;
        others.push((modified, entry.path()));
    }
    others.sort_by_key(|o| std::cmp::Reverse(o.0));
    for (_, path) in others.into_iter().skip(keep.saturating_sub(1)) {
        let hidden = dir.join(format!(".{}.removing", path.file_name().unwrap_or_default().to_string_lossy()));
        std::fs::rename(&path, &hidden).map_err(|source| Error::Io { path: path.clone(), source })?;
        std::fs::remove_dir_all(&hidden).map_err(|source| Error::Io { path: hidden, source })?;
    }
    Ok(())
}

/// The kernel release inside an unpacked kernel package (`boot/vmlinuz-<ver>`).
fn kernel_version(tree: &Path, pkg: &PackageRef) -> Result<String, Error> {
    let boot = tree.join("boot");
    std::fs::read_dir(&boot)
        .map_err(|source| Error::Io { path: boot.clone(), source })?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("vmlinuz-")).map(str::to_string))
        .next()
        .ok_or_else(|| Error::MissingFile { package: pkg.name.clone(), what: "boot/vmlinuz-*".into() })
}

/// Module paths (relative to `lib/modules/`) to load, dependencies first,
/// for the modules named, as `modules.dep` orders them.
fn module_load_order(tree: &Path, kver: &str, wanted: &[String], package: &str) -> Result<Vec<String>, Error> {
    let dep_path = tree.join(format!("lib/modules/{kver}/modules.dep"));
    let text = std::fs::read_to_string(&dep_path).map_err(|source| Error::Io { path: dep_path, source })?;
    let deps = parse_modules_dep(&text);
    let mut order = Vec::new();
    for name in wanted {
        let norm = name.replace('-', "_");
        let path = deps
            .keys()
            .find(|p| module_name(p) == norm)
            .ok_or_else(|| Error::MissingModule { module: name.clone(), package: package.to_string() })?;
        visit(path, &deps, &mut order);
    }
    Ok(order.into_iter().map(|p| format!("{kver}/{p}")).collect())
}

fn visit(path: &str, deps: &BTreeMap<String, Vec<String>>, order: &mut Vec<String>) {
    if order.iter().any(|p| p == path) {
        return;
    }
    for d in deps.get(path).into_iter().flatten() {
        visit(d, deps, order);
    }
    order.push(path.to_string());
}

/// `modules.dep`: `kernel/a.ko: kernel/b.ko kernel/c.ko`.
fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m.trim().to_string(), d.split_whitespace().map(str::to_string).collect()))
        .collect()
}

/// `kernel/drivers/net/virtio_net.ko` → `virtio_net`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// The shared libraries a dynamically linked binary loads, as `ldd` resolves
/// them on this host (the agent was linked here, against these).
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>, Error> {
    let out = interrupt::output(Command::new("ldd").arg(binary))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("statically linked") || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    let mut libs: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    libs.sort();
    libs.dedup();
    if let Some(missing) = text.lines().find(|l| l.contains("not found")) {
        return Err(Error::Agent { path: binary.into(), reason: format!("a library it needs is missing: {}", missing.trim()) });
    }
    Ok(libs)
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    kiln_core::Digest::of(bytes).hex()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stages a one-file image `name` whose file holds `bytes` under `out`,
    /// as a build does, and returns its digest's hex.
    fn stage(out: &Path, name: &str, bytes: &[u8]) -> (tempfile::TempDir, String) {
        std::fs::create_dir_all(out).unwrap();
        let tmp = tempfile::Builder::new().prefix(&format!(".{name}.tmp-")).tempdir_in(out).unwrap();
        std::fs::write(tmp.path().join("vmlinuz"), bytes).unwrap();
        let artifacts = vec![Artifact { name: "vmlinuz".into(), size: bytes.len() as u64, sha256: kiln_core::Digest::of(bytes).hex() }];
        let manifest = Manifest {
            name: name.into(),
            digest: Manifest::compute_digest(&artifacts),
            artifacts,
            boot: BootSpec { kernel: "vmlinuz".into(), initrd: "vmlinuz".into(), cmdline: vec![], rootfs: None },
            inputs: InputDigests {
                spec: "sha256:s".into(),
                agent: "sha256:a".into(),
                kernel_package: PackageRef { name: "k".into(), version: "1".into(), sha256: "x".into(), origin: None },
                packages: vec![],
                key: "sha256:k".into(),
            },
        };
        std::fs::write(tmp.path().join(MANIFEST_FILE), serde_json::to_vec(&manifest).unwrap()).unwrap();
        (tmp, manifest.digest.hex())
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn each_build_is_a_generation_and_the_oldest_beyond_keep_go() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("images");
        let generations = kiln_core::manifest::generations_of(&out, "tiny");

        // An image directory an older kiln wrote becomes a generation too.
        let (legacy, legacy_hex) = stage(&out, "tiny", b"zero");
        std::fs::rename(legacy.keep(), out.join("tiny")).unwrap();

        let mut made = vec![legacy_hex];
        for bytes in [b"one".as_slice(), b"two", b"three"] {
            let (tmp, hex) = stage(&out, "tiny", bytes);
            swap_in(&out, "tiny", &kiln_core::Digest::from_hex(&hex).unwrap(), tmp, 3).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            made.push(hex.clone());
            let link = std::fs::read_link(out.join("tiny")).unwrap();
            assert_eq!(link, Path::new(".generations/tiny").join(&hex), "DIR/tiny names the new generation");
            assert_eq!(std::fs::read(out.join("tiny/vmlinuz")).unwrap(), bytes);
            assert_eq!(entries(&out), [".generations", "tiny"], "nothing staged is left beside the image");
        }
        let mut kept = made[1..].to_vec();
        kept.sort();
        assert_eq!(entries(&generations), kept, "the newest 3 are kept, the legacy one was the oldest");

        // The same bytes again: the link moves back, nothing is added.
        let (tmp, hex) = stage(&out, "tiny", b"one");
        assert_eq!(hex, made[1]);
        swap_in(&out, "tiny", &kiln_core::Digest::from_hex(&hex).unwrap(), tmp, 3).unwrap();
        assert_eq!(std::fs::read_link(out.join("tiny")).unwrap(), Path::new(".generations/tiny").join(&hex));
        assert_eq!(entries(&generations), kept);

        // keep = 1: only the current one stays.
        let (tmp, hex) = stage(&out, "tiny", b"four");
        swap_in(&out, "tiny", &kiln_core::Digest::from_hex(&hex).unwrap(), tmp, 1).unwrap();
        assert_eq!(entries(&generations), [hex]);
    }

    #[test]
    fn module_order_puts_dependencies_first() {
        let dep = "kernel/drivers/virtio/virtio.ko:\nkernel/drivers/virtio/virtio_ring.ko:\n\
                   kernel/net/core/failover.ko:\nkernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
                   kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n";
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("lib/modules/6.1.0")).unwrap();
        std::fs::write(dir.path().join("lib/modules/6.1.0/modules.dep"), dep).unwrap();
        let order = module_load_order(dir.path(), "6.1.0", &["virtio-net".into()], "k").unwrap();
        let pos = |m: &str| order.iter().position(|p| p.ends_with(m)).unwrap_or_else(|| panic!("{m} missing from {order:?}"));
        assert!(pos("/failover.ko") < pos("net_failover.ko"), "{order:?}");
        assert!(pos("net_failover.ko") < pos("virtio_net.ko"), "{order:?}");
        assert!(pos("virtio_ring.ko") < pos("virtio_net.ko"), "{order:?}");
        assert_eq!(order.len(), 5);
        let err = module_load_order(dir.path(), "6.1.0", &["nope".into()], "k").unwrap_err();
        assert!(err.to_string().contains("`nope`"), "{err}");
    }
}
