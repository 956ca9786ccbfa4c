//! Content digests: sha256, spelled `sha256:<64 hex digits>` on the wire, as
//! OCI and kiln spell them.
//!
//! [`Digest`] is the one type for an image or content digest. Its JSON form
//! is that string, so manifests and API bodies keep their bytes; code that
//! needs the bare hex (file names, ETags, UUIDs) asks for [`Digest::hex`]
//! and never strips a prefix itself. What is hashed and why is up to the
//! caller: this module only computes, parses and prints.

use std::fmt;
use std::str::FromStr;

use sha2::Sha256;

/// The algorithm prefix of a digest's text form.
const PREFIX: &str = "sha256:";

/// A sha256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a text is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The text does not start with `sha256:`.
    #[error("digest {0:?} does not start with `sha256:`")]
    Algorithm(String),
    /// What follows is not 64 hex digits.
    #[error("digest {0:?} is not 64 hex digits")]
    Hex(String),
}

impl Digest {
    /// The sha256 of `bytes`.
    pub fn of(bytes: impl AsRef<[u8]>) -> Digest {
        use sha2::Digest as _;
        Digest(Sha256::digest(bytes.as_ref()).into())
    }

    /// Parses bare hex (64 digits, either case), the form an artifact's
    /// `sha256` field and `sha256sum` print.
    pub fn from_hex(hex: &str) -> Result<Digest, DigestError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex, &mut bytes).map_err(|_| DigestError::Hex(hex.to_string()))?;
        Ok(Digest(bytes))
    }

    /// The 64 lowercase hex digits, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The 32 bytes of the digest.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        let hex = s.strip_prefix(PREFIX).ok_or_else(|| DigestError::Algorithm(s.to_string()))?;
        Digest::from_hex(hex).map_err(|_| DigestError::Hex(s.to_string()))
    }
}

serde_as_str!(Digest);

/// A digest equals its text form: `node.image_digest == manifest.digest`.
impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        other.parse::<Digest>().is_ok_and(|d| d == *self)
    }
}

impl PartialEq<String> for Digest {
    fn eq(&self, other: &String) -> bool {
        *self == *other.as_str()
    }
}

impl PartialEq<Digest> for String {
    fn eq(&self, other: &Digest) -> bool {
        *other == *self.as_str()
    }
}

impl PartialEq<Digest> for &str {
    fn eq(&self, other: &Digest) -> bool {
        *other == **self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn one_spelling() {
        let d = Digest::of(b"");
        assert_eq!(d.hex(), EMPTY);
        assert_eq!(d.to_string(), format!("sha256:{EMPTY}"));
        assert_eq!(format!("sha256:{EMPTY}").parse::<Digest>(), Ok(d));
        assert_eq!(Digest::from_hex(EMPTY), Ok(d));
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"sha256:{EMPTY}\""));
        assert_eq!(serde_json::from_str::<Digest>(&format!("\"sha256:{EMPTY}\"")).unwrap(), d);
        assert!(d == format!("sha256:{EMPTY}") && format!("sha256:{EMPTY}") == d, "a digest equals its text");
    }

    #[test]
    fn bad_text_refused() {
        for (bad, want) in [
            (EMPTY.to_string(), DigestError::Algorithm(EMPTY.into())),
            ("sha256:00".to_string(), DigestError::Hex("sha256:00".into())),
            (format!("md5:{EMPTY}"), DigestError::Algorithm(format!("md5:{EMPTY}"))),
            (format!("sha256:{}", "g".repeat(64)), DigestError::Hex(format!("sha256:{}", "g".repeat(64)))),
        ] {
            assert_eq!(bad.parse::<Digest>(), Err(want), "{bad}");
        }
        assert!(serde_json::from_str::<Digest>("\"sha256:00\"").is_err());
    }
}
