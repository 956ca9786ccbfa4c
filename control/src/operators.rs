//! The operators' credentials: client certificates of the control plane's
//! CA with `O=kiln:operators` ([`crate::tls::Role::Operator`]), as matchbox
//! keeps its admin API behind client certificates and Kubernetes names its
//! users.
//!
//! - On first start the server issues `admin` into the state directory
//!   (`STATE/admin.pem`, `STATE/admin-key.pem`, 0600), which the `kiln`
//!   CLI presents (`--state`); it is issued again when it has less than
//!   [`RENEW_BEFORE`] left.
//! - `kiln admin-cert issue --name NAME --out DIR` issues another;
//!   `kiln admin-cert revoke NAME` revokes every certificate of NAME.
//! - `STATE/operators.json` lists every operator certificate issued (name,
//!   serial, expiry, revoked). The server reads it again when it changes
//!   ([`Revocations`]), so a revocation takes effect on the next request,
//!   without a restart.
//!
//! A node's certificate is never an operator's: its organisation is
//! `kiln:nodes`, and the routes check the role.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::tls::{Ca, Error as TlsError, Role, Subject};

/// How long an operator certificate is valid (kubeadm's client
/// certificates: one year).
pub const OPERATOR_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// `STATE/admin.pem` is issued again at start when it expires sooner.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// The first operator's name.
pub const ADMIN: &str = "admin";

/// Issuing or revoking failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `operators.json` is not what kiln writes.
    #[error("{path} is not kiln's list of operator certificates")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The certificate could not be made.
    #[error("issuing the certificate")]
    Tls(#[from] TlsError),
    /// The name is not one an operator can have.
    #[error("operator name {0:?}: 1 to 64 letters, digits, '-', '_', '.' or '@'")]
    Name(String),
    /// No certificate was ever issued to this name.
    #[error("no operator certificate was issued to {0:?}")]
    Unknown(String),
}

/// One operator certificate issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    /// The operator's name (the certificate's CN).
    pub name: String,
    /// Its serial number, hex.
    pub serial: String,
    /// When it expires.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// When it was revoked, if it was.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Every operator certificate issued, from `STATE/operators.json` (none
/// when it does not exist).
pub fn issued(state: &Path) -> Result<Vec<Issued>, Error> {
    let path = crate::StateDir::new(state).operators();
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| Error::Corrupt { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(&path)(e)),
    }
}

fn save(state: &Path, list: &[Issued]) -> Result<(), Error> {
    let path = crate::StateDir::new(state).operators();
    let json = serde_json::to_vec_pretty(list).expect("the list serialises");
    crate::tls::write_atomic(&path, &json).map_err(|e| match e {
        TlsError::Io { path, source } => Error::Io { path, source },
        other => Error::Tls(other),
    })
}

/// Whether `name` can name an operator (and so a certificate's CN and a
/// file name).
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

/// Issues an operator certificate for `name` into `cert` and `key` (0600,
/// written to temporary names and renamed, the key first) and records it.
pub fn issue(state: &Path, ca: &Ca, name: &str, cert: &Path, key: &Path) -> Result<Issued, Error> {
    if !valid_name(name) {
        return Err(Error::Name(name.to_string()));
    }
    let subject = Subject { role: Role::Operator, name: name.to_string() };
    let (cert_pem, key_pem) = ca.issue_client_with_key(&subject, OPERATOR_TTL)?;
    let parsed = parse(&cert_pem).ok_or_else(|| Error::Io {
        path: cert.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the certificate just issued does not parse"),
    })?;
    crate::tls::write_atomic(key, key_pem.as_bytes())?;
    crate::tls::write_atomic(cert, cert_pem.as_bytes())?;
    let mut list = issued(state)?;
    list.push(parsed.clone());
    save(state, &list)?;
    tracing::info!(operator = %name, serial = %parsed.serial, cert = %cert.display(), "issued an operator certificate");
    Ok(parsed)
}

/// The name, serial and expiry of a certificate, PEM.
fn parse(pem: &str) -> Option<Issued> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    let not_after = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).ok()?;
    Some(Issued { name, serial: hex::encode(cert.raw_serial()), not_after, revoked_at: None })
}

/// Makes sure `STATE/admin.pem` exists and has at least [`RENEW_BEFORE`]
/// left; issues it otherwise. Returns whether it issued one.
pub fn ensure_admin(state: &Path, ca: &Ca) -> Result<bool, Error> {
    let dir = crate::StateDir::new(state);
    let (cert, key) = (dir.admin_cert(), dir.admin_key());
    let current = std::fs::read_to_string(&cert).ok().filter(|_| key.exists()).and_then(|pem| parse(&pem));
    let revoked = |serial: &str| issued(state).is_ok_and(|list| list.iter().any(|i| i.serial == serial && i.revoked_at.is_some()));
    let fresh = current.is_some_and(|c| {
        c.not_after - OffsetDateTime::now_utc() > time::Duration::try_from(RENEW_BEFORE).expect("fits") && !revoked(&c.serial)
    });
    if fresh {
        return Ok(false);
    }
    issue(state, ca, ADMIN, &cert, &key)?;
    Ok(true)
}

/// Revokes every certificate issued to `name`; returns how many were
/// live.
pub fn revoke(state: &Path, name: &str) -> Result<usize, Error> {
    let mut list = issued(state)?;
    if !list.iter().any(|i| i.name == name) {
        return Err(Error::Unknown(name.to_string()));
    }
    let now = OffsetDateTime::now_utc();
    let mut count = 0;
    for i in list.iter_mut().filter(|i| i.name == name && i.revoked_at.is_none()) {
        i.revoked_at = Some(now);
        count += 1;
    }
    save(state, &list)?;
    tracing::info!(operator = %name, revoked = count, "revoked operator certificates");
    Ok(count)
}

/// The revoked serials, as the server checks them: `operators.json` read
/// again whenever its modification time or size changes.
pub struct Revocations {
    path: PathBuf,
    state: PathBuf,
    seen: Mutex<(Option<FileStamp>, Vec<String>)>,
}

/// A file's modification time and size: whether it changed.
type FileStamp = (SystemTime, u64);

impl Revocations {
    /// The revocations of the state directory `state`.
    pub fn new(state: &Path) -> Revocations {
        Revocations { path: crate::StateDir::new(state).operators(), state: state.to_path_buf(), seen: Mutex::new((None, Vec::new())) }
    }

    /// Whether the certificate `serial` is revoked. A list that cannot be
    /// read keeps the last one read (and says so).
    pub fn is_revoked(&self, serial: &str) -> bool {
        let stamp = std::fs::metadata(&self.path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.0 != stamp {
            match issued(&self.state) {
                Ok(list) => *seen = (stamp, list.into_iter().filter(|i| i.revoked_at.is_some()).map(|i| i.serial).collect()),
                Err(e) => tracing::warn!("operator revocations: {}", kiln_core::error_chain(&e)),
            }
        }
        seen.1.iter().any(|s| s == serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::ClientCert;

    fn der(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents
    }

    #[test]
    fn admin_is_issued_once_and_revocation_is_seen() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let ca = Ca::load_or_create(&state).unwrap();
        assert!(ensure_admin(&state, &ca).unwrap(), "issued on first start");
        assert!(!ensure_admin(&state, &ca).unwrap(), "kept on the next");
        let dir = crate::StateDir::new(&state);
        assert_eq!(dir.loose_modes().unwrap(), vec![], "admin.pem, admin-key.pem and operators.json are 0600");
        let pem = std::fs::read_to_string(dir.admin_cert()).unwrap();
        let cert = ClientCert::from_der(&der(&pem)).expect("an operator certificate");
        assert_eq!(cert.subject, Subject { role: Role::Operator, name: ADMIN.into() });

        let revocations = Revocations::new(&state);
        assert!(!revocations.is_revoked(&cert.serial));
        let other = tmp.path().join("alice");
        std::fs::create_dir(&other).unwrap();
        issue(&state, &ca, "alice", &other.join("alice.pem"), &other.join("alice-key.pem")).unwrap();
        assert_eq!(revoke(&state, ADMIN).unwrap(), 1);
        assert!(revocations.is_revoked(&cert.serial), "seen without a restart");
        assert!(matches!(revoke(&state, "bob"), Err(Error::Unknown(_))));
        assert!(ensure_admin(&state, &ca).unwrap(), "a revoked admin.pem is issued again");
        assert!(matches!(issue(&state, &ca, "../x", &other.join("x"), &other.join("y")), Err(Error::Name(_))));
    }

    #[test]
    fn a_node_certificate_is_not_an_operators() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(tmp.path()).unwrap();
        let subject = Subject { role: Role::Node, name: "kiln-a".into() };
        let (pem, _) = ca.issue_client_with_key(&subject, Duration::from_secs(60)).unwrap();
        assert_eq!(ClientCert::from_der(&der(&pem)).unwrap().subject, subject);
        let evil = Subject { role: Role::Operator, name: "kiln:node:x".into() };
        let (pem, _) = ca.issue_client_with_key(&evil, Duration::from_secs(60)).unwrap();
        assert_eq!(ClientCert::from_der(&der(&pem)).unwrap().subject.role, Role::Operator, "the role is the organisation's");
    }
}
