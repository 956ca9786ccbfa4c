//! The worker image: a [`WorkerSpec`] to `DIR/<name>/` with `<name>.qcow2`
//! (boots from the disk alone, BIOS or UEFI), `vmlinuz`, `initrd.img` and
//! `root.squashfs` (network boot, diskless: [`crate::diskless`]), and `manifest.json` whose
//! `inputs.packages` lists every installed package (the image's SBOM).
//!
//! Phases, each reported as an [`Event::Phase`]:
//! 1. **resolve**: hash the spec, the files it adds and the agent; with the
//!    base's key and the tools' versions they make the image's cache key.
//!    An image whose manifest has that key and whose artifacts match their
//!    sha256 is a cache hit (no-op build).
//! 2. **base**: the cached base tree ([`crate::base`]), made if missing.
//! 3. **layers**: a hard-linked copy of the base, with kiln's layers ([`crate::layer`]).
//! 4. **disk**: GRUB images, GPT disk, ESP ([`crate::disk`]); meanwhile
//!    the squashfs is made in another thread.
//! 5. **filesystem**: the ext4 root, made in place in the disk; the kernel
//!    and initrd.
//! 6. **convert**: qcow2, begun as soon as the disk is whole, beside the
//!    squashfs if it is still being made.
//! 7. **write**: artifacts and manifest staged beside the output and swapped in.
//!
//! Work files live in `CACHE/work/.work-*` (the same file system as the
//! base, for hard links) and artifacts are staged in `DIR/.<name>.tmp-*`,
//! each held by a lock while its build runs; a build removes the ones whose
//! build is gone, so a killed build leaves nothing behind for long.

use std::path::{Path, PathBuf};

use kiln_core::manifest::MANIFEST_FILE;
use kiln_core::{Artifact, BootSpec, InputDigests, Manifest, PackageRef};

use crate::base::{self, Base, BaseInfo, BaseSource, Mmdebstrap};
use crate::disk::{self, DiskIds, Mke2fs};
use crate::diskless;
use crate::layer::{self, LayerInputs, Tree};
use crate::repos::Repository;
use crate::spec::WorkerSpec;
use crate::{Archive, Builder, Error, Event, Outcome, sha256_hex};

/// Bumped when a worker image made from the same inputs changes.
const WORKER_FORMAT: &str = "kiln-worker/1";
const MIB: u64 = 1 << 20;

/// Builds the worker image `spec` (read from `spec_path`, whose bytes are
/// `spec_bytes`) into `out/<name>/`.
pub fn build(
    builder: &Builder,
    spec_path: &Path,
    spec_bytes: &[u8],
    spec: &WorkerSpec,
    out: &Path,
    progress: &dyn Fn(Event),
) -> Result<Outcome, Error> {
    let job = Job { builder, spec_path, spec, out, progress, source: &Mmdebstrap };
    let resolved = job.resolve(spec_bytes)?;
    let dir = out.join(&spec.name);
    if let Some(outcome) = Outcome::cached(&dir, &resolved.key, progress) {
        return Ok(outcome);
    }
    let base = job.base(&resolved)?;
    // Between phases, a stopped build goes no further (its programs see
    // to themselves: `interrupt`).
    let stop = crate::interrupt::check;
    stop()?;
    let work = Locked::new(&builder.cache.join("work"), ".work-")?;
    let ids = DiskIds::from_key(&resolved.key);
    let tree = job.layers(&resolved, &base, &ids, work.path())?;
    stop()?;
    let mut staging = Locked::new(out, &format!(".{}.tmp-", spec.name))?;
    let paths = Paths { work: work.path(), staging: staging.path(), raw: work.path().join("disk.raw"), tree };
    let mut artifacts = job.artifacts(&resolved, &base, &ids, &paths)?;
    stop()?;
    artifacts.sort_by(|a, b| a.name.cmp(&b.name));
    progress(Event::Phase { phase: "write".into(), detail: dir.display().to_string() });
    let manifest = job.manifest(resolved, &base.info, artifacts);
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    let mpath = paths.staging.join(MANIFEST_FILE);
    std::fs::write(&mpath, json).map_err(|source| Error::Io { path: mpath, source })?;
    crate::swap_in(out, &spec.name, &manifest.digest, staging.take()?, builder.keep_generations)?;
    drop(work);
    Ok(Outcome::built(manifest, dir, progress))
}

/// One worker build: what it is given, shared by its phases.
struct Job<'a> {
    builder: &'a Builder,
    spec_path: &'a Path,
    spec: &'a WorkerSpec,
    out: &'a Path,
    progress: &'a dyn Fn(Event),
    /// Where the base tree comes from.
    source: &'a dyn BaseSource,
}

/// What the **resolve** phase learns: the inputs' digests, the tools
/// resolved, and the image's cache key.
struct Resolved {
    agent: Vec<u8>,
    spec_digest: String,
    agent_digest: String,
    base_key: kiln_core::Digest,
    /// `[[base.repositories]]`, their keys read.
    repos: Vec<Repository>,
    archive: Archive,
    mke2fs: Mke2fs,
    busybox: PackageRef,
    /// The image's cache key (`sha256:`).
    key: String,
}

/// Where one build's files are.
struct Paths<'a> {
    /// The work directory (`CACHE/work/.work-*`).
    work: &'a Path,
    /// The staged image directory (`DIR/.<name>.tmp-*`).
    staging: &'a Path,
    /// The raw disk, in the work directory.
    raw: PathBuf,
    /// The layered root tree, in the work directory.
    tree: PathBuf,
}

impl Job<'_> {
    /// **resolve**: hashes the spec and the agent, resolves mke2fs and
    /// busybox, and makes the image's cache key.
    fn resolve(&self, spec_bytes: &[u8]) -> Result<Resolved, Error> {
        let epoch = self.builder.source_date_epoch;
        let agent = self.builder.agent_bytes()?;
        let spec_digest = kiln_core::Digest::of(spec_bytes).to_string();
        let agent_digest = kiln_core::Digest::of(&agent).to_string();
        let repos = self
            .spec
            .base
            .repositories
            .iter()
            .enumerate()
            .map(|(i, r)| Repository::load(r, self.spec_path, &format!("base.repositories[{i}].signed-by")))
            .collect::<Result<Vec<_>, _>>()?;
        let base_key = base::key(&self.spec.base, &repos, self.source, epoch);
        let archive = Archive::new(&self.builder.cache).with_lists(self.builder.apt_lists.clone());
        let mke2fs = Mke2fs::find(&archive)?;
        let busybox = archive.resolve(diskless::BUSYBOX_PACKAGE)?.package;
        let head =
            format!("{}\n{WORKER_FORMAT}\n{spec_digest}\n{agent_digest}\n{base_key}\n{}\n{epoch}\n", crate::BUILDER_FORMAT, mke2fs.version);
        let key = self.cache_key(head, &busybox)?;
        Ok(Resolved { agent, spec_digest, agent_digest, base_key, repos, archive, mke2fs, busybox, key })
    }

    /// The cache key: `key_text` (the digests above) with the files and
    /// units the spec adds, the CA, the initrd's busybox and kiln's own
    /// texts baked into the image.
    fn cache_key(&self, mut key_text: String, busybox: &PackageRef) -> Result<String, Error> {
        let spec_dir = self.spec_dir();
        for (i, f) in self.spec.files.iter().enumerate() {
            let bytes = layer::source_bytes(spec_dir, &f.source, &f.content, self.spec_path, &format!("files[{i}].source"))?;
            key_text.push_str(&format!("file {} {}\n", f.path, sha256_hex(&bytes)));
        }
        for (i, u) in self.spec.units.iter().enumerate() {
            let bytes = layer::source_bytes(spec_dir, &u.source, &u.content, self.spec_path, &format!("units[{i}].source"))?;
            key_text.push_str(&format!("unit {} {}\n", u.name, sha256_hex(&bytes)));
        }
        if let Some(ca) = &self.builder.ca {
            key_text.push_str(&format!("ca {}\n", sha256_hex(ca)));
        }
        key_text.push_str(&format!("initrd {} {}\n", busybox.name, busybox.sha256));
        for text in [layer::AGENT_UNIT, layer::CLOUD_CFG, layer::NETWORK_FALLBACK, diskless::SCRIPT] {
            key_text.push_str(&sha256_hex(text.as_bytes()));
            key_text.push('\n');
        }
        Ok(kiln_core::Digest::of(&key_text).to_string())
    }

    fn spec_dir(&self) -> &Path {
        self.spec_path.parent().unwrap_or(Path::new("."))
    }

    /// **base**: the cached base tree, or a new one, after checking there
    /// is room for the build.
    fn base(&self, resolved: &Resolved) -> Result<Base, Error> {
        let (spec, cache) = (self.spec, &self.builder.cache);
        let cached_base = base::cached(cache, &resolved.base_key);
        check_space(cache, self.out, cached_base.as_ref().map(|b| b.info.bytes), spec)?;
        (self.progress)(Event::Phase {
            phase: "base".into(),
            detail: match &cached_base {
                Some(_) => format!("cached {}", &resolved.base_key.hex()[..12]),
                None => format!("{} {} {} ({} packages)", self.source.name(), spec.base.suite, spec.base.arch, spec.base.packages.len()),
            },
        });
        match cached_base {
            Some(b) => Ok(b),
            None => base::ensure(cache, &spec.base, &resolved.repos, self.source, self.builder.source_date_epoch),
        }
    }

    /// **layers**: a hard-linked copy of the base in `work`, with kiln's
    /// layers; returns its path.
    fn layers(&self, resolved: &Resolved, base: &Base, ids: &DiskIds, work: &Path) -> Result<PathBuf, Error> {
        let spec = self.spec;
        (self.progress)(Event::Phase {
            phase: "layers".into(),
            detail: format!("agent, {} files, {} users, {} units", spec.files.len(), spec.users.len(), spec.units.len()),
        });
        let tree_path = work.join("tree");
        layer::link_copy(&base.tree, &tree_path)?;
        let tree = Tree::new(&tree_path);
        let inputs = LayerInputs {
            spec_dir: self.spec_dir(),
            agent: &resolved.agent,
            root_uuid: &ids.root,
            kernel_release: &base.info.kernel_release,
            ca: self.builder.ca.as_deref(),
        };
        layer::apply(&tree, spec, &inputs, self.spec_path)?;
        Ok(tree_path)
    }

    /// **disk**, **filesystem** and **convert**, on both cores: one thread
    /// makes the squashfs (CPU-bound) from the layered tree; the other the
    /// raw disk (GRUB, GPT, ESP, the ext4 root made in place), the kernel
    /// and initrd, then the qcow2, started as soon as the disk is whole,
    /// beside the squashfs if it is still being made. Once the squashfs is
    /// done, the tree is removed while the qcow2 is written.
    fn artifacts(&self, resolved: &Resolved, base: &Base, ids: &DiskIds, paths: &Paths<'_>) -> Result<Vec<Artifact>, Error> {
        let epoch = self.builder.source_date_epoch;
        let root_mib = self.spec.disk.root_size_mib.unwrap_or_else(|| default_root_mib(base.info.bytes));
        let layout = disk::Layout::new(root_mib);
        let (tree, raw, staging) = (&paths.tree, &paths.raw, paths.staging);
        let squashfs = staging.join("root.squashfs");
        std::thread::scope(|s| {
            let sq = s.spawn(|| disk::squashfs(tree, &squashfs, epoch).and_then(|()| artifact(staging, "root.squashfs")));
            let disk = (|| {
                (self.progress)(Event::Phase { phase: "disk".into(), detail: "GRUB (BIOS + UEFI), GPT, ESP".into() });
                let grub = disk::grub_images(tree, paths.work, &ids.root)?;
                disk::create(raw, &layout, ids, &grub)?;
                disk::esp(raw, &layout, &grub.efi, epoch, paths.work)?;
                (self.progress)(Event::Phase { phase: "filesystem".into(), detail: format!("ext4 {root_mib} MiB in place; squashfs") });
                resolved.mke2fs.make(tree, raw, layout.root_offset(), root_mib, &ids.root, "root", epoch)?;
                crate::interrupt::check()?;
                self.boot_files(resolved, &base.info.kernel_release, paths)
            })();
            let qcow2 = disk.map(|boot| (boot, self.convert(s, paths)));
            let squashfs = sq.join().expect("the squashfs thread does not panic");
            // The layered tree is done with: its ~20k entries go while the qcow2 is written.
            let _ = std::fs::remove_dir_all(tree);
            let (boot, qcow2) = qcow2?;
            let qcow2 = qcow2.join().expect("the qcow2 thread does not panic");
            let mut artifacts = vec![squashfs?, qcow2?];
            artifacts.extend(boot);
            Ok(artifacts)
        })
    }

    /// The kernel, and Debian's initramfs with kiln's diskless boot script
    /// after it, staged as `vmlinuz` and `initrd.img`.
    fn boot_files(&self, resolved: &Resolved, kver: &str, paths: &Paths<'_>) -> Result<[Artifact; 2], Error> {
        let (tree, staging, busybox) = (&paths.tree, paths.staging, &resolved.busybox);
        let vmlinuz = tree.join(format!("boot/vmlinuz-{kver}"));
        std::fs::copy(&vmlinuz, staging.join("vmlinuz")).map_err(|source| Error::Io { path: vmlinuz.clone(), source })?;
        let vmlinuz = artifact(staging, "vmlinuz")?;
        let debian_initrd = tree.join(format!("boot/initrd.img-{kver}"));
        let debian_initrd = std::fs::read(&debian_initrd).map_err(|source| Error::Io { path: debian_initrd.clone(), source })?;
        let busybox_bin = resolved.archive.unpacked(busybox, |_| Ok(()))?.join("bin/busybox");
        let busybox_bytes =
            std::fs::read(&busybox_bin).map_err(|_| Error::MissingFile { package: busybox.name.clone(), what: "bin/busybox".into() })?;
        let initrd = diskless::initrd(&debian_initrd, tree, kver, &busybox_bytes, self.builder.source_date_epoch)?;
        let initrd_path = staging.join("initrd.img");
        std::fs::write(&initrd_path, initrd).map_err(|source| Error::Io { path: initrd_path, source })?;
        Ok([vmlinuz, artifact(staging, "initrd.img")?])
    }

    /// **convert**: the raw disk to `<name>.qcow2`, on a thread of `scope`.
    fn convert<'s>(
        &self,
        scope: &'s std::thread::Scope<'s, '_>,
        paths: &'s Paths<'_>,
    ) -> std::thread::ScopedJoinHandle<'s, Result<Artifact, Error>> {
        let qcow2_name = format!("{}.qcow2", self.spec.name);
        (self.progress)(Event::Phase { phase: "convert".into(), detail: qcow2_name.clone() });
        scope.spawn(move || disk::convert(&paths.raw, &paths.staging.join(&qcow2_name)).and_then(|()| artifact(paths.staging, &qcow2_name)))
    }

    /// The manifest of `artifacts` (sorted by name), with the SBOM: every
    /// package in the root, and the initrd's busybox.
    fn manifest(&self, resolved: Resolved, info: &BaseInfo, artifacts: Vec<Artifact>) -> Manifest {
        let spec = self.spec;
        let kver = &info.kernel_release;
        let kernel_package = info.packages.iter().find(|p| p.name == format!("linux-image-{kver}")).cloned().unwrap_or_else(|| {
            PackageRef { name: spec.kernel.package.clone(), version: kver.clone(), sha256: String::new(), origin: None }
        });
        let Resolved { spec_digest, agent_digest, busybox, key, .. } = resolved;
        let mut packages = info.packages.clone();
        if !packages.iter().any(|p| p.name == busybox.name) {
            packages.push(busybox);
            packages.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Manifest {
            name: spec.name.clone(),
            digest: Manifest::compute_digest(&artifacts),
            artifacts,
            boot: BootSpec {
                kernel: "vmlinuz".into(),
                initrd: "initrd.img".into(),
                cmdline: spec.kernel.cmdline.iter().cloned().chain(diskless::CMDLINE.map(String::from)).collect(),
                rootfs: Some("root.squashfs".into()),
            },
            inputs: InputDigests { spec: spec_digest, agent: agent_digest, kernel_package, packages, key },
        }
    }
}

/// The staged file `name`'s artifact entry: its size and sha256.
fn artifact(staging: &Path, name: &str) -> Result<Artifact, Error> {
    let path = staging.join(name);
    let size = std::fs::metadata(&path).map_err(|source| Error::Io { path: path.clone(), source })?.len();
    Ok(Artifact { sha256: crate::apt::file_sha256(&path)?, name: name.to_string(), size })
}

fn apt_create_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.into(), source })
}

/// The root file system's size when the spec gives none: the tree with a
/// third more and 512 MiB spare, in whole 256 MiB.
fn default_root_mib(tree_bytes: u64) -> u64 {
    let want = tree_bytes / MIB * 4 / 3 + 512;
    want.div_ceil(256) * 256
}

/// Fails before anything is written when the cache or the output's file
/// system has less room than the build needs, naming the figure.
fn check_space(cache: &Path, out: &Path, base_bytes: Option<u64>, spec: &WorkerSpec) -> Result<(), Error> {
    apt_create_dir(cache)?;
    apt_create_dir(out)?;
    // Before the base is made its size is a guess: bookworm with these packages is ~550 MB.
    let tree = base_bytes.unwrap_or(700 * MIB);
    let root = spec.disk.root_size_mib.map_or(tree * 5 / 4, |m| (m * MIB).min(tree * 5 / 4));
    // cache: the base (when missing, with its .debs), the ext4 image and the raw disk.
    let need_cache = if base_bytes.is_some() { 0 } else { tree + 300 * MIB } + 2 * root + 100 * MIB;
    // out: qcow2, squashfs (about half the tree), kernel and initrd; and the old image until the swap.
    let need_out = root + tree / 2 + 100 * MIB;
    let (free_cache, dev_cache) = disk::free_space(cache)?;
    let (free_out, dev_out) = disk::free_space(out)?;
    let checks: Vec<(&Path, u64, u64)> = if dev_cache == dev_out {
        vec![(cache, need_cache + need_out, free_cache)]
    } else {
        vec![(cache, need_cache, free_cache), (out, need_out, free_out)]
    };
    for (path, needed, available) in checks {
        if available < needed {
            return Err(Error::NoSpace { path: path.into(), needed_mib: needed.div_ceil(MIB), available_mib: available / MIB });
        }
    }
    Ok(())
}

/// A temporary directory of one build, holding a lock (`.lock` inside)
/// while the build lives; made after removing those, with the same prefix,
/// whose build is gone (killed).
struct Locked {
    dir: Option<tempfile::TempDir>,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Locked {
    fn new(parent: &Path, prefix: &str) -> Result<Self, Error> {
        apt_create_dir(parent)?;
        remove_abandoned(parent, prefix);
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(parent).map_err(|source| Error::Io { path: parent.into(), source })?;
        let lock_path = dir.path().join(".lock");
        let file = std::fs::File::create(&lock_path).map_err(|source| Error::Io { path: lock_path.clone(), source })?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| Error::Io { path: lock_path, source: e.into() })?;
        Ok(Locked { dir: Some(dir), _lock: lock })
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().expect("present until taken").path()
    }

    /// The directory without its lock file, to be renamed into place (the
    /// lock stays held until `self` is dropped).
    fn take(&mut self) -> Result<tempfile::TempDir, Error> {
        let lock_path = self.path().join(".lock");
        std::fs::remove_file(&lock_path).map_err(|source| Error::Io { path: lock_path, source })?;
        Ok(self.dir.take().expect("taken once"))
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        if let Some(d) = self.dir.take() {
            let _ = d.close();
        }
    }
}

/// Removes `prefix*` directories under `parent` whose lock nobody holds
/// (their build was killed), and those killed before they had a lock, after
/// ten minutes.
fn remove_abandoned(parent: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.filter_map(Result::ok) {
        if !e.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let path: PathBuf = e.path();
        let abandoned = match std::fs::File::open(path.join(".lock")) {
            Ok(f) => nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok(),
            Err(_) => e.metadata().and_then(|m| m.modified()).map(|t| t.elapsed().unwrap_or_default().as_secs() > 600).unwrap_or(false),
        };
        if abandoned {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_root_size_leaves_room() {
        assert_eq!(default_root_mib(550 * MIB), 1280);
        assert_eq!(default_root_mib(0), 512);
        assert!(default_root_mib(2000 * MIB) * MIB > 2000 * MIB * 4 / 3);
    }

    #[test]
    fn abandoned_work_is_removed_and_live_work_kept() {
        let cache = tempfile::tempdir().unwrap();
        let parent = cache.path().join("work");
        let live = Locked::new(&parent, ".work-").unwrap();
        let dead = parent.join(".work-dead");
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::write(dead.join(".lock"), "").unwrap();
        let _other = Locked::new(&parent, ".work-").unwrap();
        assert!(!dead.exists(), "a work dir with no lock holder is removed");
        assert!(live.path().exists(), "a live build's work dir stays");
    }
}
