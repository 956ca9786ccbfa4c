//! The base root filesystem of a worker image: Debian from the archive, made
//! once per key and kept in the cache as a directory tree.
//!
//! The key is made from what the tree is made of: suite, architecture,
//! mirrors, the package list, the extra repositories with their keys
//! ([`crate::repos`]), the timestamp and the builder's format; a
//! build where only the agent or added files changed finds the tree here
//! and never runs the [`BaseSource`] again. The tree is made under a
//! temporary name and renamed into place, under a lock, so a build killed
//! at any point leaves either the whole tree or none (the leftovers of a
//! killed build are removed by the next one).
//!
//! Layout under the cache: `base/<key>/tree/` (the root filesystem, owned by
//! root, never modified after it is made), `base/<key>/base.json`
//! ([`BaseInfo`]), `base/.lock`, and `debs/mmdebstrap/` (the `.deb`s
//! mmdebstrap downloaded, synced in and out of its chroot).
//!
//! To make the base another way (debootstrap, a tarball), implement
//! [`BaseSource`]; the key, the lock and the package inventory stay here.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_core::{Digest, PackageRef};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::apt::{create_dir, file_sha256};
use crate::repos::{Indexes, Repository};
use crate::spec::BaseSpec;

/// Bumped when the base made from the same spec changes.
const BASE_FORMAT: &str = "kiln-base/1";

/// Makes a base root filesystem into an empty directory.
pub trait BaseSource {
    /// A name for progress and errors.
    fn name(&self) -> &'static str;
    /// Fills `tree` (which does not exist yet) with the root filesystem.
    /// `repositories` are `.sources` files of the spec's extra repositories
    /// (their keys inline), to install from and to keep in the tree.
    /// `debs` is a directory to keep downloaded packages in between builds.
    fn make(&self, spec: &BaseSpec, repositories: &[PathBuf], tree: &Path, debs: &Path, source_date_epoch: u32) -> Result<(), Error>;
}

/// mmdebstrap, in unshare mode (its chroot's mounts live in its own
/// namespaces; nothing is mounted on the host), `apt` variant plus the
/// spec's packages, reproducible with `SOURCE_DATE_EPOCH` (but for the SSH
/// host keys openssh-server's postinst makes, which are removed). Debian's
/// initramfs is made once, at the end, not twice (`INITRAMFS_ONCE`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mmdebstrap;

impl BaseSource for Mmdebstrap {
    fn name(&self) -> &'static str {
        "mmdebstrap"
    }

    fn make(&self, spec: &BaseSpec, repositories: &[PathBuf], tree: &Path, debs: &Path, source_date_epoch: u32) -> Result<(), Error> {
        create_dir(debs)?;
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "10", "mmdebstrap", "--mode=unshare", "--variant=apt", "--quiet"])
            .arg(format!("--arch={}", spec.arch))
            .arg(format!("--include={}", spec.packages.join(",")))
            .args(["--skip=essential/unlink", "--skip=download/empty"])
            .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
            .arg(format!("--setup-hook=sync-in {} /var/cache/apt/archives/", debs.display()))
            .arg(format!("--customize-hook=sync-out /var/cache/apt/archives {}", debs.display()))
            .arg("--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb")
            // openssh-server's postinst made host keys: every node would share them.
            // cloud-init makes each node its own at first boot.
            .arg("--customize-hook=rm -f \"$1\"/etc/ssh/ssh_host_*")
            // Debian's initramfs, made once (see INITRD below).
            .arg(format!("--customize-hook=chroot \"$1\" sh -c '{INITRAMFS_ONCE}'"))
            .arg(&spec.suite)
            .arg(tree)
            .args(sources(spec))
            // Each a `.sources` file: mmdebstrap puts it in the tree's
            // /etc/apt/sources.list.d/ under its own name.
            .args(repositories)
            .env("SOURCE_DATE_EPOCH", source_date_epoch.to_string())
            // Installing a kernel and initramfs-tools together makes the
            // initramfs twice (the kernel's postinst, then initramfs-tools'
            // trigger), 8 s each. With INITRD=No the kernel's hook makes
            // none, the trigger finds none to update, and the customize
            // hook makes it once, with the links to it in `/` the kernel's
            // postinst would have made: the same tree, byte for byte.
            .env("INITRD", "No")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group (as every program a build runs), which
        // Ctrl-C kills; recorded beside the tree too: if kiln itself is
        // SIGKILLed, mmdebstrap (which waits out its child on SIGTERM) would
        // run on, and the next build kills the group before it removes the
        // leftover.
        let mut running = crate::interrupt::spawn(&mut cmd)?;
        if let Some(dir) = tree.parent() {
            let _ = std::fs::write(dir.join(PGID_FILE), running.child().id().to_string());
        }
        let out = running.wait_with_output()?;
        if !out.status.success() {
            return Err(Error::Command {
                program: "mmdebstrap".into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
}

/// Run in the finished tree: Debian's initramfs of each kernel, and the
/// `/initrd.img` links (what the kernel's postinst does without INITRD=No).
const INITRAMFS_ONCE: &str = "unset INITRD; command -v update-initramfs >/dev/null || exit 0; \
    for v in $(ls /lib/modules 2>/dev/null); do [ -e /boot/vmlinuz-$v ] || continue; \
    update-initramfs -c -k $v >&2 && linux-update-symlinks install $v /boot/vmlinuz-$v >&2 || exit 1; done";

/// Beside a tree being made: the process group of the program making it.
const PGID_FILE: &str = "pgid";

/// The archive lines the base is made from.
pub fn sources(spec: &BaseSpec) -> Vec<String> {
    let mut lines = vec![format!("deb {} {} main", spec.mirror, spec.suite), format!("deb {} {}-updates main", spec.mirror, spec.suite)];
    if let Some(sec) = &spec.security_mirror {
        lines.push(format!("deb {sec} {}-security main", spec.suite));
    }
    lines
}

/// What is known about a made base, kept beside its tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseInfo {
    /// The cache key.
    pub key: Digest,
    /// The kernel release in `/boot` (`6.1.0-56-cloud-amd64`).
    pub kernel_release: String,
    /// Every installed package: name, version (and architecture, as
    /// `name:arch` when not `all` or the base's), and the `.deb`'s sha256.
    pub packages: Vec<PackageRef>,
    /// Bytes of file data in the tree (for sizing the disk).
    pub bytes: u64,
}

/// A made base: its tree and what is known about it.
#[derive(Debug, Clone)]
pub struct Base {
    /// The root filesystem. Never write into it: hard links of it are layered.
    pub tree: PathBuf,
    /// Its inventory.
    pub info: BaseInfo,
}

/// The cache key of the base `spec` describes, with its extra
/// repositories (`repos`, their keys read).
pub fn key(spec: &BaseSpec, repos: &[Repository], source: &dyn BaseSource, source_date_epoch: u32) -> Digest {
    let mut packages = spec.packages.clone();
    packages.sort();
    packages.dedup();
    let mut text = format!(
        "{BASE_FORMAT}\n{}\n{}\n{}\n{}\n{}\n{source_date_epoch}\n",
        source.name(),
        spec.suite,
        spec.arch,
        sources(spec).join("\n"),
        packages.join(" ")
    );
    // None: the key of a spec without repositories is what it always was.
    for repo in repos {
        text.push_str(&repo.key_text());
        text.push('\n');
    }
    Digest::of(text)
}

/// The base for `spec` if it is in the cache.
pub fn cached(cache: &Path, key: &Digest) -> Option<Base> {
    let dir = base_dir(cache, key);
    let info: BaseInfo = serde_json::from_slice(&std::fs::read(dir.join("base.json")).ok()?).ok()?;
    (info.key == *key && dir.join("tree").is_dir()).then(|| Base { tree: dir.join("tree"), info })
}

fn base_dir(cache: &Path, key: &Digest) -> PathBuf {
    cache.join("base").join(key.hex())
}

/// The base for `spec`: from the cache, or made by `source` (checking first
/// that apt knows every package, so an unknown one is named before anything
/// runs).
pub fn ensure(cache: &Path, spec: &BaseSpec, repos: &[Repository], source: &dyn BaseSource, source_date_epoch: u32) -> Result<Base, Error> {
    let key = key(spec, repos, source, source_date_epoch);
    if let Some(base) = cached(cache, &key) {
        return Ok(base);
    }
    let parent = cache.join("base");
    create_dir(&parent)?;
    let lock_path = parent.join(".lock");
    let lock_file = std::fs::File::create(&lock_path).map_err(|source| Error::Io { path: lock_path.clone(), source })?;
    // Another build making the same base: wait for it, then use its tree.
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::Io { path: lock_path.clone(), source: e.into() })?;
    if let Some(base) = cached(cache, &key) {
        return Ok(base);
    }
    remove_leftovers(&parent)?;
    // The extra repositories are fetched (and their signatures checked)
    // before anything is written.
    let indexes = if repos.is_empty() { None } else { Some(Indexes::fetch(repos, &spec.arch)?) };
    check_packages(&spec.packages, indexes.as_ref())?;
    let tmp = tempfile::Builder::new().prefix(".tmp-").tempdir_in(&parent).map_err(|source| Error::Io { path: parent.clone(), source })?;
    let tree = tmp.path().join("tree");
    let repositories = indexes.as_ref().map_or(&[][..], |i| &i.sources[..]);
    source.make(spec, repositories, &tree, &cache.join("debs").join(source.name()), source_date_epoch)?;
    let mut info = inventory(&tree, &cache.join("debs").join(source.name()), &spec.arch, &key)?;
    if let Some(indexes) = &indexes {
        indexes.mark_origins(repos, &mut info.packages)?;
    }
    let json = serde_json::to_vec_pretty(&info).expect("base info serialises");
    std::fs::write(tmp.path().join("base.json"), json).map_err(|source| Error::Io { path: tmp.path().join("base.json"), source })?;
    let dir = base_dir(cache, &key);
    let kept = tmp.keep();
    std::fs::rename(&kept, &dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
    Ok(Base { tree: dir.join("tree"), info })
}

/// Removes what killed builds left: `.tmp-*` directories (the lock is held,
/// so no running build owns one), after killing the process group still
/// filling one, if any.
fn remove_leftovers(parent: &Path) -> Result<(), Error> {
    let entries = std::fs::read_dir(parent).map_err(|source| Error::Io { path: parent.into(), source })?;
    for e in entries.filter_map(Result::ok) {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            let path = e.path();
            if let Some(pgid) = std::fs::read_to_string(path.join(PGID_FILE)).ok().and_then(|t| t.trim().parse::<i32>().ok()) {
                kill_orphan(pgid);
            }
            std::fs::remove_dir_all(&path).map_err(|source| Error::Io { path, source })?;
        }
    }
    Ok(())
}

/// Kills process group `pgid` if its leader is still an mmdebstrap (the
/// group of a killed build), and waits up to 10 s for it to be gone.
fn kill_orphan(pgid: i32) {
    use nix::sys::signal::{Signal, killpg};
    let leader = std::fs::read(format!("/proc/{pgid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&leader).contains("mmdebstrap") {
        return;
    }
    let group = nix::unistd::Pid::from_raw(pgid);
    let _ = killpg(group, Signal::SIGKILL);
    for _ in 0..100 {
        if killpg(group, None).is_err() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Checks that apt's index, or that of the extra repositories, knows every
/// package in `names`; the error names the first neither does.
pub fn check_packages(names: &[String], extra: Option<&Indexes>) -> Result<(), Error> {
    let out = crate::interrupt::output(
        Command::new("apt-cache").args(["show", "--no-all-versions", "--quiet=0"]).args(names).env("LC_ALL", "C"),
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // apt-cache exits 0 when some were found: look at each name. An unknown
    // one gets `N: Unable to locate package foo` and no stanza.
    let found: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("Package: ")).collect();
    let elsewhere: Vec<String> = names.iter().filter(|n| !found.contains(&n.as_str())).cloned().collect();
    let held = match extra {
        Some(indexes) => indexes.holds(&elsewhere)?,
        None => Vec::new(),
    };
    match elsewhere.iter().find(|n| !held.contains(n)) {
        None => Ok(()),
        Some(package) => {
            let detail = stderr.lines().find(|l| l.contains(package.as_str())).unwrap_or("not in apt's index").trim().to_string();
            Err(Error::UnknownPackage { package: package.clone(), detail })
        }
    }
}

/// The packages installed in `tree` (from its dpkg status file), with the
/// sha256 of the `.deb` each came from when it is in `debs`.
fn inventory(tree: &Path, debs: &Path, arch: &str, key: &Digest) -> Result<BaseInfo, Error> {
    let admin = tree.join("var/lib/dpkg");
    let out = crate::interrupt::output(
        Command::new("dpkg-query")
            .arg(format!("--admindir={}", admin.display()))
            .args(["-W", "-f", "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"])
            .env("LC_ALL", "C"),
    )?;
    if !out.status.success() {
        return Err(Error::Command {
            program: "dpkg-query".into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let mut packages = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let [status, name, version, pkg_arch] = f[..] else { continue };
        if !status.starts_with("ii") {
            continue;
        }
        let deb = debs.join(format!("{name}_{}_{pkg_arch}.deb", version.replace(':', "%3a")));
        let sha256 = if deb.is_file() { file_sha256(&deb)? } else { String::new() };
        let name = if pkg_arch == "all" || pkg_arch == arch { name.to_string() } else { format!("{name}:{pkg_arch}") };
        packages.push(PackageRef { name, version: version.to_string(), sha256, origin: None });
    }
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    let boot = tree.join("boot");
    let kernel_release = std::fs::read_dir(&boot)
        .map_err(|source| Error::Io { path: boot.clone(), source })?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("vmlinuz-")).map(str::to_string))
        .max()
        .ok_or_else(|| Error::MissingFile { package: "the kernel".into(), what: "boot/vmlinuz-* in the base".into() })?;
    Ok(BaseInfo { key: *key, kernel_release, packages, bytes: tree_bytes(tree) })
}

/// Bytes of regular files under `dir` (not following links).
pub fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.filter_map(Result::ok) {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(packages: &[&str]) -> BaseSpec {
        BaseSpec {
            suite: "bookworm".into(),
            arch: "amd64".into(),
            mirror: "http://deb.debian.org/debian".into(),
            security_mirror: Some("http://deb.debian.org/debian-security".into()),
            packages: packages.iter().map(|p| p.to_string()).collect(),
            repositories: Vec::new(),
        }
    }

    #[test]
    fn key_follows_the_package_set_not_its_order() {
        let k = |p: &[&str]| key(&spec(p), &[], &Mmdebstrap, 0);
        assert_eq!(k(&["a", "b"]), k(&["b", "a"]), "order");
        assert_eq!(k(&["a", "b"]), k(&["a", "b", "a"]), "duplicates");
        assert_ne!(k(&["a", "b"]), k(&["a", "c"]), "another package");
        let mut other = spec(&["a", "b"]);
        other.mirror = "http://mirror.example/debian".into();
        assert_ne!(key(&other, &[], &Mmdebstrap, 0), k(&["a", "b"]), "another mirror");
        assert_ne!(key(&spec(&["a", "b"]), &[], &Mmdebstrap, 1), k(&["a", "b"]), "another epoch");
        let vendor = crate::repos::Repository {
            spec: crate::spec::RepositorySpec {
                uris: vec!["http://vendor.example/deb/".into()],
                suites: vec!["stable".into()],
                components: vec!["main".into()],
                signed_by: "vendor.asc".into(),
            },
            key: "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nxjMEZ\n-----END PGP PUBLIC KEY BLOCK-----\n".into(),
        };
        let with = |r: &crate::repos::Repository| key(&spec(&["a", "b"]), std::slice::from_ref(r), &Mmdebstrap, 0);
        assert_ne!(with(&vendor), k(&["a", "b"]), "a repository");
        let mut other_key = vendor.clone();
        other_key.key = other_key.key.replace("xjMEZ", "xjMEY");
        assert_ne!(with(&other_key), with(&vendor), "another key");
    }

    #[test]
    fn sources_name_every_suite() {
        let lines = sources(&spec(&[]));
        assert_eq!(
            lines,
            [
                "deb http://deb.debian.org/debian bookworm main",
                "deb http://deb.debian.org/debian bookworm-updates main",
                "deb http://deb.debian.org/debian-security bookworm-security main"
            ]
        );
    }
}
