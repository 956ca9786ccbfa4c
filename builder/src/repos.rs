//! Apt repositories beside Debian's (`[[base.repositories]]`), each trusted
//! only with its own key.
//!
//! A repository becomes a deb822 `.sources` file whose `Signed-By` holds
//! the key itself (apt ≥ 2.3 reads an embedded armored key), so apt trusts
//! that key for that repository and nothing else, in the build and on the
//! node alike: mmdebstrap puts the file in the base's
//! `/etc/apt/sources.list.d/`, and no key path has to exist anywhere.
//!
//! Before a base is made, [`Indexes::fetch`] runs `apt-get update` on each
//! repository alone, into a private directory: an unreachable repository,
//! an unsigned one or one signed by another key fails there, naming it,
//! before anything is written. The indexes then say which packages the
//! repositories hold (so a package only they have is not refused as
//! unknown) and where each installed package came from (its `origin` in
//! the manifest).

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use kiln_core::PackageRef;

use crate::Error;
use crate::spec::RepositorySpec;

/// A repository, its key read.
#[derive(Debug, Clone)]
pub struct Repository {
    /// As the spec gives it.
    pub spec: RepositorySpec,
    /// Its key, ASCII-armored.
    pub key: String,
}

impl Repository {
    /// Reads `spec`'s key from beside the spec (`spec_dir`); `field` names
    /// it in errors (`base.repositories[0].signed-by`).
    pub fn load(spec: &RepositorySpec, spec_path: &Path, field: &str) -> Result<Repository, Error> {
        let path = spec_path.parent().unwrap_or(Path::new(".")).join(&spec.signed_by);
        let invalid = |message: String| Error::SpecInvalid { file: spec_path.to_path_buf(), key: field.into(), message };
        let bytes = std::fs::read(&path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        let key = armored(&bytes).ok_or_else(|| invalid(format!("{} is not an OpenPGP public key", path.display())))?;
        Ok(Repository { spec: spec.clone(), key })
    }

    /// Its `.sources` text (deb822), the key inline.
    pub fn deb822(&self) -> String {
        let mut text = format!("Types: deb\nURIs: {}\nSuites: {}\n", self.spec.uris.join(" "), self.spec.suites.join(" "));
        if !self.spec.components.is_empty() {
            text.push_str(&format!("Components: {}\n", self.spec.components.join(" ")));
        }
        // A multi-line field: each line indented, an empty one written " .".
        text.push_str("Signed-By:\n");
        for line in self.key.lines() {
            text.push_str(if line.trim().is_empty() { " ." } else { " " });
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }

    /// What goes into the base's cache key: every field and the key.
    pub fn key_text(&self) -> String {
        format!(
            "repository {} | {} | {} | {}",
            self.spec.uris.join(" "),
            self.spec.suites.join(" "),
            self.spec.components.join(" "),
            kiln_core::Digest::of(self.key.as_bytes())
        )
    }
}

/// `bytes` as an armored public key block: as they are when armored
/// already, else (a binary key, as `gpg --dearmor` writes) armored here.
fn armored(bytes: &[u8]) -> Option<String> {
    const BEGIN: &str = "-----BEGIN PGP PUBLIC KEY BLOCK-----";
    if let Ok(text) = std::str::from_utf8(bytes)
        && text.trim_start().starts_with(BEGIN)
    {
        return text.contains("-----END PGP PUBLIC KEY BLOCK-----").then(|| text.trim().to_string() + "\n");
    }
    // A binary key starts with a public-key packet: tag 6, old format
    // (0x98..=0x9b) or new (0xc6).
    if !matches!(bytes.first(), Some(0x98..=0x9b | 0xc6)) {
        return None;
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut text = format!("{BEGIN}\n\n");
    for chunk in b64.as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        text.push('\n');
    }
    text.push_str("-----END PGP PUBLIC KEY BLOCK-----\n");
    Some(text)
}

/// The repositories' indexes, fetched into a private directory (removed
/// when dropped), and the `.sources` files they were fetched with.
///
/// The directory holds one list directory for them all, and a sources
/// directory per repository (`only-N/`, its file alone) and for all
/// (`all/`): apt reads every file in the one it is given.
pub struct Indexes {
    dir: tempfile::TempDir,
    arch: String,
    /// One `.sources` file per repository, in the spec's order.
    pub sources: Vec<PathBuf>,
}

impl Indexes {
    /// `apt-get update` of each repository alone, for `arch`: the first
    /// that cannot be fetched or is not signed by its key fails the build,
    /// named, with what apt said.
    pub fn fetch(repos: &[Repository], arch: &str) -> Result<Indexes, Error> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let dir = tempfile::Builder::new().prefix("kiln-repos-").tempdir().map_err(io(Path::new("/tmp")))?;
        let indexes = Indexes { dir, arch: arch.to_string(), sources: Vec::new() };
        for sub in ["lists/partial", "cache/archives/partial", "all"] {
            let path = indexes.dir.path().join(sub);
            std::fs::create_dir_all(&path).map_err(io(&path))?;
        }
        let mut sources = Vec::new();
        for (i, repo) in repos.iter().enumerate() {
            let name = format!("kiln-repository-{i}.sources");
            let only = indexes.dir.path().join(format!("only-{i}"));
            std::fs::create_dir_all(&only).map_err(io(&only))?;
            for file in [only.join(&name), indexes.dir.path().join("all").join(&name)] {
                std::fs::write(&file, repo.deb822()).map_err(io(&file))?;
            }
            let mut cmd = indexes.apt("apt-get", Some(i));
            cmd.args(["update", "-q", "--error-on=any"]);
            let out = crate::interrupt::output(&mut cmd)?;
            let said: Vec<&str> = std::str::from_utf8(&out.stderr)
                .unwrap_or_default()
                .lines()
                .chain(std::str::from_utf8(&out.stdout).unwrap_or_default().lines())
                .filter(|l| l.starts_with("E:") || l.starts_with("W:") || l.starts_with("Err:"))
                .collect();
            if !out.status.success() || !said.is_empty() {
                let detail = if said.is_empty() { format!("apt-get update exited {}", out.status) } else { said.join("; ") };
                return Err(Error::Repository { repository: repo.spec.describe(), detail });
            }
            sources.push(only.join(&name));
        }
        Ok(Indexes { sources, ..indexes })
    }

    /// `program` (apt-get, apt-cache) on this private state: every
    /// repository's sources, or only the `only`th's.
    fn apt(&self, program: &str, only: Option<usize>) -> Command {
        let d = self.dir.path().display();
        let parts = only.map_or_else(|| format!("{d}/all"), |i| format!("{d}/only-{i}"));
        let mut cmd = Command::new(program);
        for option in [
            "Dir::Etc::SourceList=/dev/null".to_string(),
            format!("Dir::Etc::SourceParts={parts}"),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            // No dpkg status: the host's installed packages are not the
            // repositories'.
            "Dir::State::Status=/dev/null".into(),
            "APT::Get::List-Cleanup=false".into(),
            // The lists are in a directory only root may enter.
            "APT::Sandbox::User=root".into(),
            format!("APT::Architecture={}", self.arch),
            format!("APT::Architectures={}", self.arch),
        ] {
            cmd.arg("-o").arg(option);
        }
        cmd.env("LC_ALL", "C");
        cmd
    }

    /// Which of `names` (or `name=version`s) the repositories hold, as
    /// `(name, version)`; with `only`, the `only`th repository.
    fn lookup(&self, names: &[String], only: Option<usize>) -> Result<Vec<(String, String)>, Error> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = self.apt("apt-cache", only);
        cmd.args(["show", "--no-all-versions", "--quiet=0"]).args(names);
        let out = crate::interrupt::output(&mut cmd)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut found = Vec::new();
        for stanza in text.split("\n\n") {
            let field = |k: &str| stanza.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string());
            if let (Some(package), Some(version)) = (field("Package: "), field("Version: ")) {
                found.push((package, version));
            }
        }
        Ok(found)
    }

    /// Which of `names` the repositories hold.
    pub fn holds(&self, names: &[String]) -> Result<Vec<String>, Error> {
        Ok(self.lookup(names, None)?.into_iter().map(|(name, _)| name).collect())
    }

    /// Sets the origin of each package in `packages` that one of `repos`
    /// lists at its version: that repository's first URI.
    pub fn mark_origins(&self, repos: &[Repository], packages: &mut [PackageRef]) -> Result<(), Error> {
        let wanted: Vec<String> =
            packages.iter().map(|p| format!("{}={}", p.name.split(':').next().unwrap_or(&p.name), p.version)).collect();
        for (i, repo) in repos.iter().enumerate() {
            let held = self.lookup(&wanted, Some(i))?;
            for p in packages.iter_mut() {
                let name = p.name.split(':').next().unwrap_or(&p.name);
                if p.origin.is_none() && held.iter().any(|(n, v)| n == name && *v == p.version) {
                    p.origin = repo.spec.uris.first().cloned();
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(suites: &[&str], components: &[&str], key: &str) -> Repository {
        Repository {
            spec: RepositorySpec {
                uris: vec!["https://pkgs.k8s.io/core:/stable:/v1.33/deb/".into()],
                suites: suites.iter().map(|s| s.to_string()).collect(),
                components: components.iter().map(|s| s.to_string()).collect(),
                signed_by: "k8s.asc".into(),
            },
            key: key.into(),
        }
    }

    #[test]
    fn a_repository_is_a_deb822_stanza_with_its_key_inline() {
        let key = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQINBF\n=abcd\n-----END PGP PUBLIC KEY BLOCK-----\n";
        let flat = repo(&["/"], &[], key);
        assert_eq!(
            flat.deb822(),
            "Types: deb\nURIs: https://pkgs.k8s.io/core:/stable:/v1.33/deb/\nSuites: /\nSigned-By:\n \
             -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mQINBF\n =abcd\n -----END PGP PUBLIC KEY BLOCK-----\n"
        );
        assert!(repo(&["stable"], &["main"], key).deb822().contains("Suites: stable\nComponents: main\n"));
        assert_ne!(flat.key_text(), repo(&["/"], &[], &key.replace("mQINBF", "mQINBG")).key_text(), "the key is in the cache key");
        assert_eq!(flat.spec.describe(), "https://pkgs.k8s.io/core:/stable:/v1.33/deb/ /");
    }

    #[test]
    fn binary_keys_are_armored_and_anything_else_refused() {
        let armored_key = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nxjMEZ\n-----END PGP PUBLIC KEY BLOCK-----\n";
        assert_eq!(armored(armored_key.as_bytes()).as_deref(), Some(armored_key));
        let binary = [0x98u8, 0x33, 0x04, 0x65, 0x00];
        let text = armored(&binary).unwrap();
        assert!(text.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmDMEZQA=\n-----END"), "{text}");
        assert_eq!(armored(b"not a key"), None);
        assert_eq!(armored(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\nno end"), None);
    }
}
