//! Debian's archive through apt's configured mirror: resolve a package name to
//! an exact version and the sha256 the archive's index gives for it, fetch the
//! `.deb` into the cache, and unpack it there.
//!
//! Resolution needs no download (`apt-cache show` reads the local index), so
//! a cached build can tell it is up to date without touching the network.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_core::PackageRef;
use sha2::{Digest, Sha256};

use crate::Error;

/// The fields of one `apt-cache show` stanza kiln uses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stanza {
    /// The package as the archive names it.
    pub package: PackageRef,
    /// Its `Depends:` field, as written.
    pub depends: String,
}

/// Parses the first stanza of `apt-cache show --no-all-versions` output.
pub fn parse_stanza(text: &str) -> Option<Stanza> {
    let mut name = None;
    let mut version = None;
    let mut sha256 = None;
    let mut depends = String::new();
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(": ") {
            match k {
                "Package" => name = Some(v.trim().to_string()),
                "Version" => version = Some(v.trim().to_string()),
                "SHA256" => sha256 = Some(v.trim().to_string()),
                "Depends" => depends = v.trim().to_string(),
                _ => {}
            }
        }
    }
    Some(Stanza { package: PackageRef { name: name?, version: version?, sha256: sha256?, origin: None }, depends })
}

/// The archive, through `apt-cache` and `apt-get download`, with `.deb`s and
/// their unpacked trees kept under `cache`.
#[derive(Debug, Clone)]
pub struct Archive {
    cache: PathBuf,
    lists: Option<PathBuf>,
}

impl Archive {
    /// An archive whose downloads live under `cache/debs` and unpacked trees
    /// under `cache/pkgs`.
    pub fn new(cache: &Path) -> Self {
        Archive { cache: cache.to_path_buf(), lists: None }
    }

    /// Remembers resolutions in `cache/resolved/` for as long as apt's
    /// package lists in `lists` (`/var/lib/apt/lists`) stay as they are:
    /// `apt-cache` takes most of a second to load its cache, and a no-op
    /// build would otherwise spend most of its time there.
    pub fn with_lists(mut self, lists: Option<PathBuf>) -> Self {
        self.lists = lists;
        self
    }

    /// Resolves `spec` (`name` or `name=version`) to its candidate version.
    pub fn resolve(&self, spec: &str) -> Result<Stanza, Error> {
        let Some(stamp) = self.lists.as_deref().and_then(lists_stamp) else { return self.resolve_with_apt(spec) };
        let key = hex::encode(Sha256::digest(format!("{stamp}\n{spec}").as_bytes()));
        let path = self.cache.join("resolved").join(format!("{key}.json"));
        if let Some(stanza) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Stanza>(&b).ok()) {
            return Ok(stanza);
        }
        let stanza = self.resolve_with_apt(spec)?;
        // A lost write only costs the next build an apt-cache call.
        if create_dir(&self.cache.join("resolved")).is_ok()
            && let Ok(mut tmp) = tempfile::NamedTempFile::new_in(self.cache.join("resolved"))
            && std::io::Write::write_all(&mut tmp, &serde_json::to_vec(&stanza).expect("a stanza serialises")).is_ok()
        {
            let _ = tmp.persist(&path);
        }
        Ok(stanza)
    }

    fn resolve_with_apt(&self, spec: &str) -> Result<Stanza, Error> {
        let name = spec.split('=').next().unwrap_or(spec);
        let out = crate::interrupt::output(Command::new("apt-cache").args(["show", "--no-all-versions", spec]).env("LC_ALL", "C"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        match parse_stanza(&text) {
            Some(stanza) if out.status.success() => Ok(stanza),
            _ => Err(Error::UnknownPackage { package: name.to_string(), detail: String::from_utf8_lossy(&out.stderr).trim().to_string() }),
        }
    }

    /// Resolves a kernel package: a metapackage such as
    /// `linux-image-cloud-amd64` is followed to the `linux-image-<abi>-*`
    /// package it depends on, pinned to the exact version.
    pub fn resolve_kernel(&self, name: &str) -> Result<PackageRef, Error> {
        let stanza = self.resolve(name)?;
        let image_dep = stanza.depends.split(',').map(str::trim).find(|d| d.starts_with("linux-image-")).map(str::to_string);
        match image_dep {
            // `linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)`
            Some(dep) => {
                let (dep_name, rest) = dep.split_once(' ').unwrap_or((&dep, ""));
                let version = rest.trim_start_matches("(=").trim_end_matches(')').trim();
                let pinned = if version.is_empty() { dep_name.to_string() } else { format!("{dep_name}={version}") };
                Ok(self.resolve(&pinned)?.package)
            }
            None => Ok(stanza.package),
        }
    }

    /// The `.deb` for `pkg` in the cache, downloaded through apt if missing,
    /// and checked against the archive's sha256 either way.
    pub fn fetch(&self, pkg: &PackageRef) -> Result<PathBuf, Error> {
        let dir = self.cache.join("debs");
        let path = dir.join(format!("{}_{}.deb", pkg.name, pkg.version.replace(':', "%3a")));
        if path.exists() && file_sha256(&path)? == pkg.sha256 {
            return Ok(path);
        }
        create_dir(&dir)?;
        let tmp = tempfile::Builder::new().prefix(".fetch-").tempdir_in(&dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
        let out = crate::interrupt::output(
            Command::new("apt-get")
                .args(["download", "-q", &format!("{}={}", pkg.name, pkg.version)])
                .current_dir(tmp.path())
                .env("LC_ALL", "C"),
        )?;
        if !out.status.success() {
            return Err(Error::Fetch { package: pkg.name.clone(), detail: String::from_utf8_lossy(&out.stderr).trim().to_string() });
        }
        let deb = std::fs::read_dir(tmp.path())
            .map_err(|source| Error::Io { path: tmp.path().into(), source })?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| Error::Fetch { package: pkg.name.clone(), detail: "apt-get download wrote no .deb".into() })?;
        let got = file_sha256(&deb)?;
        if got != pkg.sha256 {
            return Err(Error::Fetch {
                package: pkg.name.clone(),
                detail: format!("sha256 {got} does not match the archive's index ({})", pkg.sha256),
            });
        }
        std::fs::rename(&deb, &path).map_err(|source| Error::Io { path: path.clone(), source })?;
        Ok(path)
    }

    /// The unpacked tree of `pkg` (`dpkg-deb -x`), made once per package
    /// sha256 under a temporary name and renamed, so a killed build leaves
    /// either the whole tree or none. `after` runs on the tree before the
    /// rename (e.g. `depmod` for a kernel).
    pub fn unpacked(&self, pkg: &PackageRef, after: impl FnOnce(&Path) -> Result<(), Error>) -> Result<PathBuf, Error> {
        let dir = self.cache.join("pkgs");
        let tree = dir.join(&pkg.sha256);
        if tree.is_dir() {
            return Ok(tree);
        }
        let deb = self.fetch(pkg)?;
        create_dir(&dir)?;
        let tmp = tempfile::Builder::new().prefix(".unpack-").tempdir_in(&dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(tmp.path()))?;
        after(tmp.path())?;
        match std::fs::rename(tmp.path(), &tree) {
            Ok(()) => {
                let _ = tmp.keep();
                Ok(tree)
            }
            // Another build sharing the cache unpacked the same package first:
            // its tree is as good as ours, which `tmp` removes on drop.
            Err(_) if tree.is_dir() => Ok(tree),
            Err(source) => Err(Error::Io { path: tree.clone(), source }),
        }
    }
}

/// What apt's package lists are right now: every file's name, size and
/// modification time. `apt-get update` changes it; nothing else does.
fn lists_stamp(lists: &Path) -> Option<String> {
    let mut entries: Vec<String> = std::fs::read_dir(lists)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            let mtime = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
            Some(format!("{} {} {mtime}", e.file_name().to_string_lossy(), m.len()))
        })
        .collect();
    entries.sort();
    Some(hex::encode(Sha256::digest(entries.join("\n").as_bytes())))
}

/// Runs a command, turning a failure into an error carrying its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<(), Error> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = crate::interrupt::output(cmd)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command { program, status: out.status.to_string(), stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

pub(crate) fn create_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })
}

/// Hex sha256 of a file, streamed.
pub fn file_sha256(path: &Path) -> Result<String, Error> {
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stanza() {
        let text = "Package: linux-image-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+2)\nVersion: 6.1.192-2\n\
                    Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nSHA256: 00be21\n\nPackage: other\n";
        let s = parse_stanza(text).unwrap();
        assert_eq!(s.package.name, "linux-image-cloud-amd64");
        assert_eq!(s.package.version, "6.1.192-2");
        assert_eq!(s.package.sha256, "00be21");
        assert_eq!(s.depends, "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)");
        assert_eq!(parse_stanza("Package: x\n"), None, "no version or sha256");
    }
}
