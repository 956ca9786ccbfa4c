//! Tokens: random secrets handed out once and stored only as sha256.

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

/// A fresh token: 32 random bytes from the OS's CSPRNG, hex.
pub fn generate() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Hex sha256 of a token: what the registry stores and compares.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The bearer token of an `Authorization` header value, if it has one.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// The token kept at `path` (mode 0600), made on first use: the
/// service-discovery token.
pub fn load_or_create(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let token = generate();
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp =
        tempfile::Builder::new().prefix(".token.").permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600)).tempfile_in(dir)?;
    writeln!(tmp, "{token}")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn bearer_cases() {
        for (header, want) in [
            (Some("Bearer abc"), Some("abc")),
            (Some("bearer  abc "), Some("abc")),
            (Some("Basic abc"), None),
            (Some("Bearer "), None),
            (Some("abc"), None),
            (None, None),
        ] {
            assert_eq!(bearer(header), want, "header {header:?}");
        }
    }

    #[test]
    fn state_tokens_are_kept_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::StateDir::new(dir.path()).sd_token();
        let a = load_or_create(&path).unwrap();
        assert_eq!(a.len(), 64);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), a, "same token on the next start");
        assert_ne!(hash(&a), a);
    }
}
