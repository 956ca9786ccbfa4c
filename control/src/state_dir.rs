//! The state directory of `kiln serve` (`--state`, default
//! `$XDG_STATE_HOME/kiln`): the one place that names its files.
//!
//! The server writes them; the CLI and the tests read some (the CA to trust,
//! the bootstrap token to scale a pool with). What each file holds is owned
//! by the module that writes it ([`crate::tls`], [`crate::token`],
//! [`crate::store::embedded`]); this type only says where it is. The server
//! certificate is not here: it is issued afresh at every start and never
//! written.

use std::path::{Path, PathBuf};

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

    /// `bootstrap-token`: the token new nodes register with (mode 0600).
    pub fn bootstrap_token(&self) -> PathBuf {
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

    /// `registry.redb`: the embedded store's database.
    pub fn registry_db(&self) -> PathBuf {
        self.root.join("registry.redb")
    }

    /// `nodes.json`: the registry file of earlier versions, imported into
    /// a new [`StateDir::registry_db`].
    pub fn legacy_nodes(&self) -> PathBuf {
        self.root.join("nodes.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_named_as_before() {
        let s = StateDir::new("/var/lib/kiln");
        for (got, want) in [
            (s.bootstrap_token(), "bootstrap-token"),
            (s.ca_cert(), "ca.pem"),
            (s.ca_key(), "ca-key.pem"),
            (s.registry_db(), "registry.redb"),
            (s.legacy_nodes(), "nodes.json"),
        ] {
            assert_eq!(got, Path::new("/var/lib/kiln").join(want), "{want}");
        }
    }
}
