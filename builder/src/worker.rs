//! The worker image: a [`WorkerSpec`] to `DIR/<name>/` with `<name>.qcow2`
//! (boots from the disk alone, BIOS or UEFI), `vmlinuz`, `initrd.img` and
//! `root.squashfs` (network boot, diskless: [`crate::diskless`]), and `manifest.json` whose
//! `inputs.packages` lists every installed package (the image's SBOM).
//!
//! An image is made in two steps: the **system**, the base with kiln's own
//! layers (the raw disk, the squashfs, the kernel, the initrd), cached in
//! `CACHE/systems/<name>/<key>/` and keyed on the base, the spec's
//! `[kernel]` and `[disk]`; then the **additions** ([`crate::additions`]):
//! the agent and the spec's files, units and users, written into a copy of
//! the system's disk and appended to its initrd. A new agent or a changed
//! file, the common rebuilds, make no file system: they reuse the system as
//! it is. A cold build takes the same two steps, so that it and a rebuild
//! give the same bytes.
//!
//! Phases, each reported as an [`Event::Phase`]:
//! 1. **resolve**: hash the spec, the files it adds and the agent; the
//!    base's key, the tools' versions and what the system is made from make
//!    the system's key, and with the additions the image's cache key. An image whose manifest has
//!    that key and whose artifacts match their sha256 is a cache hit
//!    (no-op build).
//! 2. **base**: the cached base tree ([`crate::base`]), made if missing.
//! 3. **system** (`cached KEY`) when the system is in the cache; else:
//!    - **layers**: a hard-linked copy of the base, with kiln's layers
//!      ([`crate::layer`]);
//!    - **disk**: GRUB images, GPT disk, ESP ([`crate::disk`]); meanwhile
//!      the squashfs is made in another thread;
//!    - **filesystem**: the ext4 root, made in place in the disk; the
//!      kernel and initrd.
//! 4. **additions**: a copy of the system's raw disk (its data only) with the
//!    agent and the spec's files, units and users written into the ext4 root
//!    (`debugfs`), and the initrd with their archive after it.
//! 5. **convert**: the qcow2; meanwhile the squashfs and the kernel are
//!    copied into the output, checked against the sha256 recorded when
//!    they were made (a damaged system is made again).
//! 6. **write**: the manifest staged beside the output, all swapped in.
//!
//! Work files live in `CACHE/work/.work-*` (the same file system as the
//! base, for hard links) and artifacts are staged in `DIR/.<name>.tmp-*`,
//! each held by a lock while its build runs; a build removes the ones whose
//! build is gone, so a killed build leaves nothing behind for long. A
//! system is made in the work directory and renamed into the cache whole;
//! the cache keeps each image name's [`SYSTEMS_KEPT`] latest.

use std::path::{Path, PathBuf};

use kiln_core::manifest::MANIFEST_FILE;
use kiln_core::{Artifact, BootSpec, InputDigests, Manifest, PackageRef};
use serde::{Deserialize, Serialize};

use crate::additions::{self, Additions};
use crate::base::{self, Base, BaseInfo, BaseSource, Mmdebstrap};
use crate::disk::{self, DiskIds, Mke2fs};
use crate::diskless;
use crate::layer::{self, LayerInputs, Tree};
use crate::repos::Repository;
use crate::spec::WorkerSpec;
use crate::{Archive, Builder, Error, Event, Outcome, sha256_hex};

/// Bumped when a worker image made from the same inputs changes.
const WORKER_FORMAT: &str = "kiln-worker/3";
/// How many systems of one image name the cache keeps (the latest used).
pub const SYSTEMS_KEPT: usize = 2;
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
    let mut staging = Locked::new(out, &format!(".{}.tmp-", spec.name))?;
    let mut artifacts = match System::cached(&builder.cache, &spec.name, &resolved.system_key) {
        Some(system) => {
            progress(Event::Phase { phase: "system".into(), detail: format!("cached {}", &resolved.system_key.hex()[..12]) });
            match job.finish(&resolved, &base, &system, work.path(), staging.path()) {
                // Damaged since it was made (the disk, a hand): made again.
                Err(e @ Error::DamagedCache { .. }) => {
                    progress(Event::Phase { phase: "system".into(), detail: format!("{e}: made again") });
                    system.remove();
                    let system = job.system(&resolved, &base, work.path())?;
                    job.finish(&resolved, &base, &system, work.path(), staging.path())?
                }
                other => other?,
            }
        }
        None => {
            let system = job.system(&resolved, &base, work.path())?;
            job.finish(&resolved, &base, &system, work.path(), staging.path())?
        }
    };
    stop()?;
    artifacts.sort_by(|a, b| a.name.cmp(&b.name));
    progress(Event::Phase { phase: "write".into(), detail: dir.display().to_string() });
    let manifest = job.manifest(resolved, &base.info, artifacts);
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
    let mpath = staging.path().join(MANIFEST_FILE);
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
    /// The system's key: the image's inputs but the additions.
    system_key: kiln_core::Digest,
    /// `[[base.repositories]]`, their keys read.
    repos: Vec<Repository>,
    archive: Archive,
    mke2fs: Mke2fs,
    busybox: PackageRef,
    /// The image's cache key (`sha256:`).
    key: String,
}

/// Where the files of a system being made are.
struct Paths<'a> {
    /// The work directory (`CACHE/work/.work-*`).
    work: &'a Path,
    /// The system's directory, in the work directory until it is whole.
    made: &'a Path,
    /// The raw disk, in `made`.
    raw: PathBuf,
    /// The layered root tree, in the work directory.
    tree: PathBuf,
}

/// A worker image but its additions, cached in
/// `CACHE/systems/<name>/<key hex>/`: `disk.raw` (sparse: GPT, GRUB, ESP and
/// the ext4 root without them), and the files listed in [`SystemInfo::files`].
struct System {
    dir: PathBuf,
    info: SystemInfo,
    /// Shared, on `system.json`, while a build uses it: eviction passes it by.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// `system.json`: what a [`System`] holds.
#[derive(Debug, Serialize, Deserialize)]
struct SystemInfo {
    /// The system's key (`sha256:`).
    key: String,
    /// Where the ext4 root starts in `disk.raw`, in bytes.
    root_offset: u64,
    /// `disk.raw`'s length.
    disk_bytes: u64,
    /// `root.squashfs`, `vmlinuz`, and `initrd.img` (the last without the
    /// additions' archive), as the image's artifacts list them.
    files: Vec<Artifact>,
}

const SYSTEM_INFO: &str = "system.json";
const SYSTEM_DISK: &str = "disk.raw";

impl System {
    /// The system `key` of image `name` if the cache holds it whole (every
    /// file there, at the size recorded), marked as used just now.
    fn cached(cache: &Path, name: &str, key: &kiln_core::Digest) -> Option<System> {
        let dir = systems_dir(cache, name).join(key.hex());
        let file = std::fs::File::options().read(true).write(true).open(dir.join(SYSTEM_INFO)).ok()?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock).ok()?;
        let info: SystemInfo = serde_json::from_reader(&*lock).ok()?;
        let size = |name: &str| std::fs::metadata(dir.join(name)).map(|m| m.len()).ok();
        let whole =
            info.key == *key && size(SYSTEM_DISK) == Some(info.disk_bytes) && info.files.iter().all(|a| size(&a.name) == Some(a.size));
        if !whole {
            return None;
        }
        let _ = lock.set_modified(std::time::SystemTime::now());
        Some(System { dir, info, _lock: lock })
    }

    /// Takes the system out of the cache.
    fn remove(self) {
        remove_aside(&self.dir);
    }
}

/// Removes `dir` after renaming it to a hidden name beside it, so that a
/// removal cut short leaves no half system under a key.
fn remove_aside(dir: &Path) {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let hidden = dir.with_file_name(format!(".{name}.removing-{}", std::process::id()));
    if std::fs::rename(dir, &hidden).is_ok() {
        let _ = std::fs::remove_dir_all(hidden);
    }
}

fn systems_dir(cache: &Path, name: &str) -> PathBuf {
    cache.join("systems").join(name)
}

/// Removes the systems in `parent` but the [`SYSTEMS_KEPT`] used last
/// (`keep` among them), passing by those a build is using; and what a
/// removal cut short left.
fn evict_systems(parent: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let mut systems = Vec::new();
    for path in entries.filter_map(Result::ok).map(|e| e.path()) {
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            let _ = std::fs::remove_dir_all(&path);
        } else if path != keep {
            let used = std::fs::metadata(path.join(SYSTEM_INFO)).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            systems.push((used, path));
        }
    }
    systems.sort_by_key(|s| std::cmp::Reverse(s.0));
    for (_, old) in systems.into_iter().skip(SYSTEMS_KEPT - 1) {
        let in_use = std::fs::File::open(old.join(SYSTEM_INFO))
            .is_ok_and(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err());
        if !in_use {
            remove_aside(&old);
        }
    }
}

impl Job<'_> {
    /// **resolve**: hashes the spec, its files and the agent, resolves
    /// mke2fs and busybox, and makes the system's and the image's keys.
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
        // What the system is made from in the spec: its name (GRUB's menu),
        // `[kernel]` and `[disk]`; the base's key has `[base]`.
        let made_from = serde_json::to_string(&(&self.spec.name, &self.spec.kernel, &self.spec.disk)).expect("a spec serialises");
        let head = format!("{}\n{WORKER_FORMAT}\n{made_from}\n{base_key}\n{}\n{epoch}\n", crate::BUILDER_FORMAT, mke2fs.version);
        let system_key = self.system_key(head, &busybox);
        let key =
            kiln_core::Digest::of(format!("{system_key}\nspec {spec_digest}\nagent {agent_digest}\n{}", self.sources_key()?)).to_string();
        Ok(Resolved { agent, spec_digest, agent_digest, base_key, system_key, repos, archive, mke2fs, busybox, key })
    }

    /// The sha256 of each file and unit the spec adds, one per line (the
    /// spec's own digest does not cover the files it names).
    fn sources_key(&self) -> Result<String, Error> {
        let spec_dir = self.spec_dir();
        let mut key_text = String::new();
        for (i, f) in self.spec.files.iter().enumerate() {
            let bytes = layer::source_bytes(spec_dir, &f.source, &f.content, self.spec_path, &format!("files[{i}].source"))?;
            key_text.push_str(&format!("file {} {}\n", f.path, sha256_hex(&bytes)));
        }
        for (i, u) in self.spec.units.iter().enumerate() {
            let bytes = layer::source_bytes(spec_dir, &u.source, &u.content, self.spec_path, &format!("units[{i}].source"))?;
            key_text.push_str(&format!("unit {} {}\n", u.name, sha256_hex(&bytes)));
        }
        Ok(key_text)
    }

    /// The system's key: `key_text` (the digests above) with the CA, the
    /// initrd's busybox and kiln's own texts baked into the image.
    fn system_key(&self, mut key_text: String, busybox: &PackageRef) -> kiln_core::Digest {
        if let Some(ca) = &self.builder.ca {
            key_text.push_str(&format!("ca {}\n", sha256_hex(ca)));
        }
        key_text.push_str(&format!("initrd {} {}\n", busybox.name, busybox.sha256));
        for text in [layer::AGENT_UNIT, layer::CLOUD_CFG, layer::NETWORK_FALLBACK, diskless::SCRIPT] {
            key_text.push_str(&sha256_hex(text.as_bytes()));
            key_text.push('\n');
        }
        kiln_core::Digest::of(&key_text)
    }

    fn layer_inputs<'a>(&'a self, base: &'a Base, ids: &'a DiskIds) -> LayerInputs<'a> {
        LayerInputs { root_uuid: &ids.root, kernel_release: &base.info.kernel_release, ca: self.builder.ca.as_deref() }
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
    /// own layers; returns its path.
    fn layers(&self, base: &Base, ids: &DiskIds, work: &Path) -> Result<PathBuf, Error> {
        let spec = self.spec;
        (self.progress)(Event::Phase { phase: "layers".into(), detail: "kiln's own".into() });
        let tree_path = work.join("tree");
        layer::link_copy(&base.tree, &tree_path)?;
        layer::apply_system(&Tree::new(&tree_path), spec, &self.layer_inputs(base, ids))?;
        Ok(tree_path)
    }

    /// **layers**, **disk** and **filesystem**: the system, made in `work`
    /// and renamed into the cache whole.
    fn system(&self, resolved: &Resolved, base: &Base, work: &Path) -> Result<System, Error> {
        let ids = DiskIds::from_key(&resolved.system_key.to_string());
        let tree = self.layers(base, &ids, work)?;
        crate::interrupt::check()?;
        let made = work.join("system");
        apt_create_dir(&made)?;
        let paths = Paths { work, made: &made, raw: made.join(SYSTEM_DISK), tree };
        let (root_offset, files) = self.system_files(resolved, base, &ids, &paths)?;
        let disk_bytes = std::fs::metadata(&paths.raw).map_err(|source| Error::Io { path: paths.raw.clone(), source })?.len();
        let info = SystemInfo { key: resolved.system_key.to_string(), root_offset, disk_bytes, files };
        let info_path = made.join(SYSTEM_INFO);
        let json = serde_json::to_vec_pretty(&info).expect("system info serialises");
        std::fs::write(&info_path, json).map_err(|source| Error::Io { path: info_path.clone(), source })?;
        // On the disk before it is in the cache: a power cut must not leave
        // a torn file of the right size there, trusted from then on.
        for name in info.files.iter().map(|a| a.name.as_str()).chain([SYSTEM_DISK, SYSTEM_INFO, "."]) {
            let path = made.join(name);
            std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(|source| Error::Io { path, source })?;
        }
        let file = std::fs::File::open(&info_path).map_err(|source| Error::Io { path: info_path.clone(), source })?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockShared)
            .map_err(|(_, e)| Error::Io { path: info_path.clone(), source: e.into() })?;
        let parent = systems_dir(&self.builder.cache, &self.spec.name);
        apt_create_dir(&parent)?;
        let dir = parent.join(resolved.system_key.hex());
        if std::fs::rename(&made, &dir).is_err() {
            // Another build made the same system meanwhile: that one is as
            // good. Anything else there under that key is not a system: aside.
            if let Some(system) = System::cached(&self.builder.cache, &self.spec.name, &resolved.system_key) {
                return Ok(system);
            }
            remove_aside(&dir);
            std::fs::rename(&made, &dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
        }
        let _ = std::fs::File::open(&parent).and_then(|f| f.sync_all());
        evict_systems(&parent, &dir);
        Ok(System { dir, info, _lock: lock })
    }

    /// **disk** and **filesystem**, on both cores: one thread makes the
    /// squashfs (CPU-bound) from the layered tree; the other the raw disk
    /// (GRUB, GPT, ESP, the ext4 root made in place), the kernel and
    /// initrd. Returns the root's offset in the disk and the files made.
    fn system_files(&self, resolved: &Resolved, base: &Base, ids: &DiskIds, paths: &Paths<'_>) -> Result<(u64, Vec<Artifact>), Error> {
        let epoch = self.builder.source_date_epoch;
        let root_mib = self.spec.disk.root_size_mib.unwrap_or_else(|| default_root_mib(base.info.bytes));
        let layout = disk::Layout::new(root_mib);
        let (tree, raw, made) = (&paths.tree, &paths.raw, paths.made);
        let squashfs = made.join("root.squashfs");
        std::thread::scope(|s| {
            let sq = s.spawn(|| disk::squashfs(tree, &squashfs, epoch).and_then(|()| artifact(made, "root.squashfs")));
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
            let squashfs = sq.join().expect("the squashfs thread does not panic");
            let mut files = vec![squashfs?];
            files.extend(disk?);
            Ok((layout.root_offset(), files))
        })
    }

    /// **additions** and **convert**: the agent and the spec's files, units
    /// and users written into a copy of the system's disk (over `base`) and
    /// appended to its initrd, the qcow2 converted from that disk while the
    /// system's other files are copied into `staging` and the layered tree,
    /// if any, is removed. Returns every artifact.
    fn finish(&self, resolved: &Resolved, base: &Base, system: &System, work: &Path, staging: &Path) -> Result<Vec<Artifact>, Error> {
        let (spec, epoch) = (self.spec, self.builder.source_date_epoch);
        let detail = format!(
            "the agent, {} files, {} units, {} users into the root and the initrd",
            spec.files.len(),
            spec.units.len(),
            spec.users.len()
        );
        (self.progress)(Event::Phase { phase: "additions".into(), detail });
        let raw = work.join(SYSTEM_DISK);
        disk::copy_sparse(&system.dir.join(SYSTEM_DISK), &raw)?;
        // Kiln's own layers alone: with the base, what the system has.
        let kiln = work.join("kiln-layers");
        if kiln.symlink_metadata().is_ok() {
            std::fs::remove_dir_all(&kiln).map_err(|source| Error::Io { path: kiln.clone(), source })?;
        }
        let ids = DiskIds::from_key(&resolved.system_key.to_string());
        layer::apply_system(&Tree::new(&kiln), spec, &self.layer_inputs(base, &ids))?;
        let inputs = additions::Inputs { spec, spec_path: self.spec_path, spec_dir: self.spec_dir(), agent: &resolved.agent };
        let additions = Additions::make(&work.join("additions"), &inputs, &base.tree, &kiln)?;
        let script = additions.debugfs_commands(epoch)?;
        resolved.mke2fs.debugfs(work, SYSTEM_DISK, system.info.root_offset, &script, epoch)?;
        crate::interrupt::check()?;
        let qcow2_name = format!("{}.qcow2", self.spec.name);
        (self.progress)(Event::Phase { phase: "convert".into(), detail: qcow2_name.clone() });
        std::thread::scope(|s| {
            let qcow2 = s.spawn(|| disk::convert(&raw, &staging.join(&qcow2_name)).and_then(|()| artifact(staging, &qcow2_name)));
            // The layered tree of a system just made: its ~20k entries go meanwhile.
            s.spawn(|| std::fs::remove_dir_all(work.join("tree")));
            let files = system.info.files.iter().map(|a| {
                let (from, to) = (system.dir.join(&a.name), staging.join(&a.name));
                if a.name != "initrd.img" {
                    return copy_checked(&from, &to, &a.sha256).map(|()| a.clone());
                }
                let initrd = std::fs::read(&from).map_err(|source| Error::Io { path: from.clone(), source })?;
                let got = sha256_hex(&initrd);
                if got != a.sha256 {
                    return Err(Error::DamagedCache { path: from, got, want: a.sha256.clone() });
                }
                let initrd = additions.append_to(initrd, epoch)?;
                std::fs::write(&to, &initrd).map_err(|source| Error::Io { path: to.clone(), source })?;
                Ok(Artifact { name: a.name.clone(), size: initrd.len() as u64, sha256: sha256_hex(&initrd) })
            });
            let files = files.collect::<Result<Vec<_>, Error>>();
            let qcow2 = qcow2.join().expect("the qcow2 thread does not panic");
            let mut artifacts = files?;
            artifacts.push(qcow2?);
            Ok(artifacts)
        })
    }

    /// The kernel, and Debian's initramfs with kiln's diskless boot script
    /// after it, staged as `vmlinuz` and `initrd.img`.
    fn boot_files(&self, resolved: &Resolved, kver: &str, paths: &Paths<'_>) -> Result<[Artifact; 2], Error> {
        let (tree, staging, busybox) = (&paths.tree, paths.made, &resolved.busybox);
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

/// Copies the cached file `from` to `to` (a copy, not a link: an output is
/// never the cache's own file), checking on the way that its sha256 is
/// still `want`.
fn copy_checked(from: &Path, to: &Path, want: &str) -> Result<(), Error> {
    use sha2::Digest;
    use std::io::{Read, Write};
    let mut src = std::fs::File::open(from).map_err(|source| Error::Io { path: from.into(), source })?;
    let mut dst = std::fs::File::create(to).map_err(|source| Error::Io { path: to.into(), source })?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        crate::interrupt::check()?;
        let n = src.read(&mut buf).map_err(|source| Error::Io { path: from.into(), source })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n]).map_err(|source| Error::Io { path: to.into(), source })?;
    }
    let got = hex::encode(hasher.finalize());
    if got != want {
        return Err(Error::DamagedCache { path: from.into(), got, want: want.into() });
    }
    Ok(())
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
    // cache: the base (when missing, with its .debs), the system (its raw
    // disk and squashfs) and the work copy of its disk.
    let need_cache = if base_bytes.is_some() { 0 } else { tree + 300 * MIB } + 2 * root + tree / 2 + 100 * MIB;
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
    fn eviction_keeps_the_latest_used_and_those_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        let system = |name: &str, age_secs: u64| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            let f = std::fs::File::create(d.join(SYSTEM_INFO)).unwrap();
            f.set_modified(now - std::time::Duration::from_secs(age_secs)).unwrap();
            d
        };
        let new = system("new", 0);
        let recent = system("recent", 10);
        let old = system("old", 20);
        let in_use = system("in-use", 30);
        let half_removed = system(".gone.removing-1", 40);
        let _lock =
            nix::fcntl::Flock::lock(std::fs::File::open(in_use.join(SYSTEM_INFO)).unwrap(), nix::fcntl::FlockArg::LockShared).unwrap();
        evict_systems(dir.path(), &new);
        assert!(new.exists() && recent.exists(), "the new one and the latest other are kept");
        assert!(!old.exists(), "an older one goes");
        assert!(in_use.exists(), "one a build holds stays");
        assert!(!half_removed.exists(), "what a cut-short removal left goes");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 3, "{left:?}");
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
