//! The node's own key and certificate: what proves this node to the
//! control plane after it joined (kubelet's TLS bootstrapping, Omni's node
//! identity).
//!
//! On first start the agent makes an ECDSA P-256 key in `--identity-dir`
//! (default `/var/lib/kiln`: the directory 0700, `node-key.pem` 0600) and
//! keeps it. Every registration sends a certificate signing request for it
//! (`csr`); the server answers with a short-lived client certificate for
//! the node's name (`node.pem`), which every later call presents over
//! mutual TLS and which the agent renews before it expires. The machine id
//! is the key's: a copy of the machine id on another machine, without the
//! key, is refused (409).
//!
//! The key never leaves the node; the CSR and the certificate are public.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The key file in the identity directory.
pub const KEY_FILE: &str = "node-key.pem";
/// The certificate file in the identity directory.
pub const CERT_FILE: &str = "node.pem";

/// The key could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file of the identity directory.
    #[error("{path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key does not parse, or the request could not be made.
    #[error("{path}: the node's key")]
    Key {
        /// The key file.
        path: PathBuf,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
}

/// The node's key, and a certificate signing request for it.
pub struct NodeKey {
    dir: PathBuf,
    key_pem: String,
    csr_pem: String,
}

impl std::fmt::Debug for NodeKey {
    /// Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl NodeKey {
    /// The key in `dir` (made with its directory on first start, 0700 and
    /// 0600), and a CSR for it.
    pub fn load_or_create(dir: &Path) -> Result<NodeKey, Error> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        if !dir.is_dir() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        }
        let path = dir.join(KEY_FILE);
        let key = match std::fs::read_to_string(&path) {
            Ok(pem) => rcgen::KeyPair::from_pem(&pem).map_err(|source| Error::Key { path: path.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = rcgen::KeyPair::generate().map_err(|source| Error::Key { path: path.clone(), source })?;
                write_private(&path, key.serialize_pem().as_bytes()).map_err(io(&path))?;
                log::info!("made this node's key {}", path.display());
                key
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|params| params.serialize_request(&key))
            .and_then(|csr| csr.pem())
            .map_err(|source| Error::Key { path: path.clone(), source })?;
        Ok(NodeKey { dir: dir.to_path_buf(), key_pem: key.serialize_pem(), csr_pem: csr })
    }

    /// The certificate signing request (PEM).
    pub fn csr(&self) -> &str {
        &self.csr_pem
    }

    /// Keeps `cert_pem` as `node.pem` (0600, written to a temporary name
    /// and renamed); returns the certificate and key as one PEM, what a
    /// client presents.
    pub fn keep_certificate(&self, cert_pem: &str) -> Result<Vec<u8>, Error> {
        let path = self.dir.join(CERT_FILE);
        let tmp = self.dir.join(format!(".{CERT_FILE}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        write_private(&tmp, cert_pem.as_bytes()).map_err(|source| Error::Io { path: tmp.clone(), source })?;
        std::fs::rename(&tmp, &path).map_err(|source| Error::Io { path: path.clone(), source })?;
        Ok(format!("{cert_pem}{}", self.key_pem).into_bytes())
    }
}

/// Writes a new file with mode 0600 from its first byte, synced.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_privately_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("var/lib/kiln");
        let a = NodeKey::load_or_create(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        let b = NodeKey::load_or_create(&dir).unwrap();
        assert_eq!(a.key_pem, b.key_pem, "the same key on the next start");
        assert!(a.csr().starts_with("-----BEGIN CERTIFICATE REQUEST-----"), "{}", a.csr());
        let identity = a.keep_certificate("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n").unwrap();
        assert_eq!(mode(&dir.join(CERT_FILE)), 0o600);
        assert!(String::from_utf8(identity).unwrap().contains("PRIVATE KEY"), "certificate and key, for the client");
        assert!(!format!("{a:?}").contains("PRIVATE"), "Debug never shows the key");
    }
}
