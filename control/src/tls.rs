//! The control plane's own CA and the API served over TLS.
//!
//! `STATE/ca.pem` and `STATE/ca-key.pem` (both mode 0600, as every file in
//! the state directory: [`crate::StateDir`]) are made once, on
//! first start (or first `kiln build --state`), and kept: the builder bakes
//! `ca.pem` into images at `/etc/kiln/ca.pem`, and agents trust nothing else.
//! The server certificate is issued afresh at every start for the names and
//! addresses the server is reached at (localhost, the host name, every local
//! address, the advertised host), so it never goes stale when addresses
//! change.
//!
//! The API's filters are served by hyper over tokio-rustls (warp 0.4 serves
//! plain TCP only), HTTP/1.1, through the listeners' one accept loop and
//! its limits ([`crate::listen`]); the acceptor is made here.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use tokio_rustls::TlsAcceptor;

/// The CA could not be made, read or used.
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
    /// A certificate or key could not be made or parsed.
    #[error("{what}")]
    Cert {
        /// Which one.
        what: String,
        /// Why: rcgen's or rustls' error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn cert_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> Error {
    let what = what.into();
    move |e| Error::Cert { what, source: Box::new(e) }
}

/// The control plane's CA, loaded from (or made in) the state directory.
pub struct Ca {
    /// Where the certificate is.
    pub cert_path: PathBuf,
    key_path: PathBuf,
    cert_pem: String,
    key_pem: String,
    /// The CA's key and name, parsed on first use: every node certificate
    /// is signed with them.
    issuer: std::sync::OnceLock<Issuer<'static, KeyPair>>,
}

impl Ca {
    /// Loads `STATE/ca.pem` and `STATE/ca-key.pem`, making both first if
    /// neither exists. One without the other is an error naming the
    /// missing file: kiln never replaces a CA that images trust.
    pub fn load_or_create(state: &Path) -> Result<Ca, Error> {
        let dir = crate::StateDir::new(state);
        let (cert_path, key_path) = (dir.ca_cert(), dir.ca_key());
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
                let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
                let ca = Ca { cert_path, key_path, cert_pem, key_pem, issuer: std::sync::OnceLock::new() };
                ca.issuer()?;
                Ok(ca)
            }
            (false, false) => {
                dir.create().map_err(io(state))?;
                let key = KeyPair::generate().map_err(cert_err("CA key"))?;
                let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA"))?;
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.distinguished_name.push(DnType::CommonName, "kiln control plane CA");
                params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
                let now = time::OffsetDateTime::now_utc();
                params.not_before = now - time::Duration::hours(1);
                params.not_after = now + time::Duration::days(3650);
                let cert = params.self_signed(&key).map_err(cert_err("CA"))?;
                let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
                // The key first: a crash in between leaves a key without a
                // certificate, reported, never a certificate without its key.
                write_atomic(&key_path, key_pem.as_bytes())?;
                write_atomic(&cert_path, cert_pem.as_bytes())?;
                tracing::info!(ca = %cert_path.display(), "made the control plane's CA");
                Ok(Ca { cert_path, key_path, cert_pem, key_pem, issuer: std::sync::OnceLock::new() })
            }
            (true, false) => Err(Error::Io {
                path: key_path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "the CA key is missing"),
            }),
            (false, true) => Err(Error::Io {
                path: cert_path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "the CA certificate is missing"),
            }),
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, Error> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(cert_err(format!("{}", self.key_path.display())))?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(cert_err(format!("{}", self.cert_path.display())))
    }

    /// A server certificate for `names` (DNS names or IP addresses),
    /// issued now, and its key: PEM.
    pub fn issue_server(&self, names: &[String]) -> Result<(String, String), Error> {
        let issuer = self.issuer()?;
        let key = KeyPair::generate().map_err(cert_err("server key"))?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(cert_err("server certificate names"))?;
        params.distinguished_name.push(DnType::CommonName, "kiln control plane");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
        let cert = params.signed_by(&key, &issuer).map_err(cert_err("server certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A client certificate for `subject`, valid for `ttl` from now (an
    /// hour earlier too, for clocks behind), for `key`'s public key: PEM,
    /// and its serial number (hex).
    pub fn issue_client(
        &self,
        subject: &Subject,
        key: &impl rcgen::PublicKeyData,
        ttl: std::time::Duration,
    ) -> Result<(String, String), Error> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("client certificate"))?;
        params.distinguished_name.push(DnType::OrganizationName, subject.role.organization());
        params.distinguished_name.push(DnType::CommonName, subject.common_name());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let mut serial: [u8; 16] = rand::random();
        // The first byte in 0x40..=0x7f: DER writes the number as these 16
        // bytes exactly (no 00 before a high bit, none stripped), so the
        // serial said here is the one a parser of the certificate reads.
        serial[0] = (serial[0] & 0x3f) | 0x40;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + ttl;
        let cert = params.signed_by(key, self.cached_issuer()?).map_err(cert_err(format!("certificate for {}", subject.common_name())))?;
        Ok((cert.pem(), hex::encode(serial)))
    }

    /// The issuer, read from the CA's files once.
    fn cached_issuer(&self) -> Result<&Issuer<'static, KeyPair>, Error> {
        if let Some(issuer) = self.issuer.get() {
            return Ok(issuer);
        }
        let issuer = self.issuer()?;
        Ok(self.issuer.get_or_init(|| issuer))
    }

    /// A client certificate for `subject` and the key of `csr`: the
    /// certificate, PEM, and what it names.
    pub fn sign_csr(&self, csr: &Csr, subject: &Subject, ttl: std::time::Duration) -> Result<(String, ClientCert), Error> {
        let (pem, serial) = self.issue_client(subject, &csr.params.public_key, ttl)?;
        Ok((pem, ClientCert { subject: subject.clone(), serial, key_sha256: csr.key_sha256.clone() }))
    }

    /// A client certificate and a new key for `subject`: PEM.
    pub fn issue_client_with_key(&self, subject: &Subject, ttl: std::time::Duration) -> Result<(String, String), Error> {
        let key = KeyPair::generate().map_err(cert_err("client key"))?;
        Ok((self.issue_client(subject, &key, ttl)?.0, key.serialize_pem()))
    }

    /// A rustls acceptor presenting a fresh server certificate for `names`.
    pub fn acceptor(&self, names: &[String]) -> Result<TlsAcceptor, Error> {
        let (cert_pem, key_pem) = self.issue_server(names)?;
        fn bad<E: std::error::Error + Send + Sync + 'static>(what: &str, e: E) -> Error {
            Error::Cert { what: what.into(), source: Box::new(e) }
        }
        let chain = vec![
            rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| bad("server certificate", e))?,
            rustls::pki_types::CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|e| bad("CA certificate", e))?,
        ];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad("server key", e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Client certificates are asked for and, when sent, must be this
        // CA's: one from another CA fails the handshake. Sending none is
        // allowed (registration, boot); the routes decide what they need.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(chain[1].clone()).map_err(|e| bad("CA certificate", e))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| bad("client certificate verifier", e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("TLS versions", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| bad("server certificate", e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// A certificate signing request whose signature holds: the key a node
/// asks a certificate for.
pub struct Csr {
    params: rcgen::CertificateSigningRequestParams,
    key_sha256: String,
}

impl Csr {
    /// The request `pem`, its signature checked (by rcgen, through
    /// x509-parser).
    pub fn parse(pem: &str) -> Result<Csr, Error> {
        let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| Error::Cert { what: "certificate signing request".into(), source: Box::new(e) })?;
        Csr::from_der(&der)
    }

    fn from_der(der: &rustls::pki_types::CertificateSigningRequestDer<'_>) -> Result<Csr, Error> {
        use rcgen::PublicKeyData;
        use sha2::Digest;
        let params = rcgen::CertificateSigningRequestParams::from_der(der).map_err(cert_err("certificate signing request"))?;
        let key_sha256 = hex::encode(sha2::Sha256::digest(params.public_key.subject_public_key_info()));
        Ok(Csr { params, key_sha256 })
    }

    /// The hex sha256 of its public key (SubjectPublicKeyInfo): what
    /// [`ClientCert::key_sha256`] of a certificate for that key is.
    pub fn key_sha256(&self) -> &str {
        &self.key_sha256
    }
}

/// What a client certificate of this CA says its holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An operator: reads and administers everything (`O=kiln:operators`).
    Operator,
    /// A node: speaks for itself only (`O=kiln:nodes`, `CN=kiln:node:NAME`).
    Node,
}

impl Role {
    /// The certificate's organisation for this role.
    pub fn organization(self) -> &'static str {
        match self {
            Role::Operator => "kiln:operators",
            Role::Node => "kiln:nodes",
        }
    }
}

/// Whom a client certificate names, as Kubernetes names its users: a role
/// in the organisation and a name in the common name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// Operator or node.
    pub role: Role,
    /// The operator's or the node's name.
    pub name: String,
}

/// The common name's prefix of a node's certificate.
const NODE_CN: &str = "kiln:node:";

impl Subject {
    /// The certificate's common name: the operator's name, or
    /// `kiln:node:NAME`.
    pub fn common_name(&self) -> String {
        match self.role {
            Role::Operator => self.name.clone(),
            Role::Node => format!("{NODE_CN}{}", self.name),
        }
    }
}

/// A client certificate the TLS handshake verified against the CA, as the
/// routes see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// Whom it names.
    pub subject: Subject,
    /// Its serial number, hex.
    pub serial: String,
    /// sha256 of its public key (SubjectPublicKeyInfo), hex: what ties a
    /// node's certificates to the key it registered with.
    pub key_sha256: String,
}

impl ClientCert {
    /// The verified leaf certificate `der`; `None` when it names no role
    /// of kiln's (a certificate this CA did not issue to a client).
    pub fn from_der(der: &[u8]) -> Option<ClientCert> {
        use sha2::Digest;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject();
        let org = subject.iter_organization().next()?.as_str().ok()?;
        let cn = subject.iter_common_name().next()?.as_str().ok()?;
        let subject = match org {
            "kiln:operators" => Subject { role: Role::Operator, name: cn.to_string() },
            "kiln:nodes" => Subject { role: Role::Node, name: cn.strip_prefix(NODE_CN)?.to_string() },
            _ => return None,
        };
        let key_sha256 = hex::encode(sha2::Sha256::digest(cert.public_key().raw));
        Some(ClientCert { subject, serial: hex::encode(cert.raw_serial()), key_sha256 })
    }
}

/// Writes `bytes` to a temporary name beside `path` (mode 0600), syncs,
/// renames.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let io = |source| Error::Io { path: path.into(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".kiln-").tempfile_in(dir).map_err(io)?;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(crate::state_dir::FILE_MODE)).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// The names a server listening on `listen` is reached at: `localhost`,
/// the host name, loopback, every local address (or only the one it is
/// bound to), and `extra` (the advertised host).
pub fn server_names(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if let Ok(host) = nix::unistd::gethostname() {
        names.push(host.to_string_lossy().into_owned());
    }
    if listen.ip().is_unspecified() {
        if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
            for a in addrs {
                let Some(addr) = a.address else { continue };
                if let Some(v4) = addr.as_sockaddr_in() {
                    names.push(IpAddr::V4(v4.ip()).to_string());
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    names.push(IpAddr::V6(v6.ip()).to_string());
                }
            }
        }
    } else {
        names.push(listen.ip().to_string());
    }
    names.extend(extra.iter().cloned());
    names.sort();
    names.dedup();
    names
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_ca_is_made_private() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let ca = Ca::load_or_create(&state).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = crate::StateDir::new(&state);
        for (path, want) in [(dir.root().to_path_buf(), 0o700), (dir.ca_cert(), 0o600), (dir.ca_key(), 0o600)] {
            assert_eq!(mode(&path), want, "{}", path.display());
        }
        let again = Ca::load_or_create(&state).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem(), "kept, not replaced");
    }

    #[test]
    fn a_csr_is_signed_for_its_own_key_only_when_its_signature_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(tmp.path()).unwrap();
        let key = KeyPair::generate().unwrap();
        let request = CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
        let csr = Csr::parse(&request.pem().unwrap()).unwrap();
        let subject = Subject { role: Role::Node, name: "kiln-a".into() };
        let (pem, cert) = ca.sign_csr(&csr, &subject, std::time::Duration::from_secs(60)).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(ClientCert::from_der(&der), Some(cert.clone()), "what the routes will see of it, key and serial included");
        assert_eq!(cert.key_sha256, csr.key_sha256(), "the certificate carries the CSR's key");
        let mut der = request.der().to_vec();
        let last = der.len() - 1;
        der[last] ^= 1;
        assert!(Csr::from_der(&der.into()).is_err(), "a request whose signature does not verify");
    }
}
