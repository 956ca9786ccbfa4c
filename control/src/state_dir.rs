//! The state directory of `kiln serve` (`--state`, default
//! `$XDG_STATE_HOME/kiln`): the one place that names its files.
//!
//! The server writes them; the CLI and the tests read some (the CA to trust,
//! the operator's certificate to call the API with). What each file holds is owned
//! by the module that writes it ([`crate::tls`], [`crate::token`],
//! [`crate::store::embedded`]); this type only says where it is. The server
//! certificate is not here: it is issued afresh at every start and never
//! written.
//!
//! Modes: the directory kiln creates is 0700 and every file kiln writes in
//! it 0600 (the CA key, the operator's key and the SD token are secrets; the registry
//! holds every node's facts). [`StateDir::create`] makes it so;
//! [`StateDir::check_modes`] warns at start about a directory or file that
//! someone made more open, naming it. kiln never changes the mode of what it
//! did not create.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The mode of the state directory kiln creates.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file kiln writes in it.
pub const FILE_MODE: u32 = 0o600;

/// A state directory. Making one touches no file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `bootstrap-token`: the shared token nodes registered with before
    /// join tokens; removed at start where an earlier version left it.
    pub fn retired_bootstrap_token(&self) -> PathBuf {
        self.root.join("bootstrap-token")
    }

    /// `ca.pem`: the control plane's CA certificate, which images trust.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }

    /// `ca-key.pem`: the CA's private key (mode 0600).
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca-key.pem")
    }

    /// `admin.pem`: the first operator's client certificate (`admin`),
    /// which the `kiln` CLI presents.
    pub fn admin_cert(&self) -> PathBuf {
        self.root.join("admin.pem")
    }

    /// `admin-key.pem`: its private key (mode 0600).
    pub fn admin_key(&self) -> PathBuf {
        self.root.join("admin-key.pem")
    }

    /// `operators.json`: every operator certificate issued (name, serial,
    /// expiry) and whether it is revoked.
    pub fn operators(&self) -> PathBuf {
        self.root.join("operators.json")
    }

    /// `sd-token`: the read-only token of `GET /api/v1/sd` (Prometheus).
    pub fn sd_token(&self) -> PathBuf {
        self.root.join("sd-token")
    }

    /// `registry.redb`: the embedded store's database.
    pub fn registry_db(&self) -> PathBuf {
        self.root.join("registry.redb")
    }

    /// `nodes.json`: the registry file of earlier versions, imported into
    /// a new [`StateDir::registry_db`].
    pub fn legacy_nodes(&self) -> PathBuf {
        self.root.join("nodes.json")
    }

    /// Creates the directory (and missing parents) with mode 0700, unless
    /// it exists: an existing one keeps its mode ([`StateDir::check_modes`]
    /// reports it).
    pub fn create(&self) -> std::io::Result<()> {
        if self.root.is_dir() {
            return Ok(());
        }
        std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(&self.root)?;
        // The umask may have taken bits away; never added any: set exactly.
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(DIR_MODE))
    }

    /// The directory and the files in it whose mode lets anyone but the
    /// owner in (group or other bits set), with that mode.
    pub fn loose_modes(&self) -> std::io::Result<Vec<(PathBuf, u32)>> {
        let loose = |path: PathBuf, meta: &std::fs::Metadata| {
            let mode = meta.permissions().mode() & 0o7777;
            (mode & 0o077 != 0).then_some((path, mode))
        };
        let mut out: Vec<(PathBuf, u32)> = loose(self.root.clone(), &std::fs::metadata(&self.root)?).into_iter().collect();
        let mut files: Vec<(PathBuf, u32)> = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            // Not following links: a link's target is not the state directory's.
            if let Ok(meta) = entry.metadata()
                && !meta.file_type().is_symlink()
            {
                files.extend(loose(entry.path(), &meta));
            }
        }
        files.sort();
        out.extend(files);
        Ok(out)
    }

    /// Warns, naming each, about the directory and files more open than
    /// 0700 and 0600 ([`StateDir::loose_modes`]); a directory that cannot be
    /// read is warned about too. Changes nothing.
    pub fn check_modes(&self) {
        match self.loose_modes() {
            Ok(loose) => {
                for (path, mode) in loose {
                    let want = if path == self.root { DIR_MODE } else { FILE_MODE };
                    tracing::warn!(path = ?path.display().to_string(), mode = %format!("{mode:04o}"), "state is more open than {want:04o}: chmod {want:o} it");
                }
            }
            Err(e) => tracing::warn!(path = ?self.root.display().to_string(), "checking the state directory's modes: {e}"),
        }
    }
}

/// Creates `path` for writing with mode 0600 (failing if it exists): a
/// file in the state directory is never readable by others, not even for
/// the moment between creating it and changing its mode.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_private_and_loose_modes_named() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::new(tmp.path().join("a/state"));
        state.create().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(state.root()), 0o700, "a state directory kiln creates");
        drop(create_private(&state.registry_db()).unwrap());
        assert_eq!(mode(&state.registry_db()), 0o600, "a file kiln creates");
        assert!(create_private(&state.registry_db()).is_err(), "never over an existing file");
        assert_eq!(state.loose_modes().unwrap(), vec![], "nothing too open");

        // (what is opened, its mode, reported)
        for (path, set, reported) in [
            (state.ca_cert(), 0o644, true),
            (state.ca_key(), 0o640, true),
            (state.sd_token(), 0o400, false),
            (state.root().to_path_buf(), 0o755, true),
        ] {
            if !path.exists() {
                std::fs::write(&path, "x").unwrap();
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(set)).unwrap();
            let loose = state.loose_modes().unwrap();
            assert_eq!(loose.contains(&(path.clone(), set)), reported, "{} at {set:o}: {loose:?}", path.display());
        }
        state.create().unwrap();
        assert_eq!(mode(state.root()), 0o755, "an existing directory keeps its mode: reported, not changed");
    }

    #[test]
    fn files_are_named_as_before() {
        let s = StateDir::new("/var/lib/kiln");
        for (got, want) in [
            (s.retired_bootstrap_token(), "bootstrap-token"),
            (s.ca_cert(), "ca.pem"),
            (s.ca_key(), "ca-key.pem"),
            (s.registry_db(), "registry.redb"),
            (s.legacy_nodes(), "nodes.json"),
            (s.admin_cert(), "admin.pem"),
            (s.admin_key(), "admin-key.pem"),
            (s.operators(), "operators.json"),
            (s.sd_token(), "sd-token"),
        ] {
            assert_eq!(got, Path::new("/var/lib/kiln").join(want), "{want}");
        }
    }
}
