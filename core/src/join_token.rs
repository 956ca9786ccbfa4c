//! Join tokens' wire types (`kiln token create|list|delete`) and the
//! token's text form.
//!
//! A join token is kubeadm's bootstrap token: `ID.SECRET`, where the ID is 6
//! and the secret 16 characters of `[a-z0-9]`
//! (`^([a-z0-9]{6})\.([a-z0-9]{16})$`). The ID is public: it names the token
//! in `kiln token list` and in logs. The secret is shown once, when the token
//! is made; the control plane keeps only its sha256. [`JoinSecret`] parses a
//! presented token and never prints its secret (neither `Display` nor
//! `Debug`), so one can be logged as is.
//!
//! The control plane's `join_tokens` module makes, counts and checks them.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::Mac;
use crate::node::preview;

/// Characters of a token's ID.
pub const ID_LEN: usize = 6;
/// Characters of a token's secret.
pub const SECRET_LEN: usize = 16;
/// The characters a token is made of.
pub const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
/// The longest [`CreateTokenRequest::description`], in bytes.
pub const DESCRIPTION_MAX: usize = 200;
/// The longest [`CreateTokenRequest::ttl_secs`]: a year.
pub const TTL_MAX_SECS: u64 = 366 * 24 * 3600;
/// A token's lifetime when the request names none (kubeadm's default).
pub const DEFAULT_TTL_SECS: u64 = 24 * 3600;

/// A join token as `kiln token list --json` prints it: everything but the
/// secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenInfo {
    /// The token's public part: 6 characters of `[a-z0-9]`.
    pub id: String,
    /// What the operator said it is for (may be empty).
    pub description: String,
    /// When it was made.
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// When it stops being accepted; `None`: never.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires: Option<OffsetDateTime>,
    /// Registrations it still allows; `None`: any number.
    pub uses_left: Option<u32>,
    /// The only pool whose nodes it joins; `None`: any node.
    pub pool: Option<String>,
    /// The only machine it joins: a registration must report this MAC.
    pub mac: Option<Mac>,
    /// Registrations it has made.
    pub used: u32,
}

impl JoinTokenInfo {
    /// Whether it has expired at `now`.
    pub fn expired_at(&self, now: OffsetDateTime) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }
}

/// What `POST /api/v1/tokens` takes (`kiln token create`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Lifetime in seconds: at most [`TTL_MAX_SECS`]; `0`: never expires
    /// (as kubeadm's `--ttl 0`); absent: [`DEFAULT_TTL_SECS`].
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Registrations it allows (at least 1); absent: any number.
    #[serde(default)]
    pub uses: Option<u32>,
    /// The only pool whose nodes it joins: a DNS label.
    #[serde(default)]
    pub pool: Option<String>,
    /// What it is for: printable ASCII, at most [`DESCRIPTION_MAX`] bytes.
    #[serde(default)]
    pub description: Option<String>,
}

/// The answer to [`CreateTokenRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateTokenResponse {
    /// The token, `ID.SECRET`. Shown once: the server keeps only its hash.
    pub token: String,
    /// What `kiln token list` will show of it.
    pub info: JoinTokenInfo,
}

/// Why a [`CreateTokenRequest`] is refused. Each message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRequestError {
    /// `ttl_secs` is over a year.
    #[error("ttl_secs {0} is over a year ({TTL_MAX_SECS} s)")]
    Ttl(u64),
    /// `uses` is 0: a token that can never join anything.
    #[error("uses must be at least 1")]
    Uses,
    /// `pool` is not a DNS label.
    #[error("pool {0:?} is not a DNS label (lowercase letters, digits and '-', at most 63)")]
    Pool(String),
    /// `description` is too long.
    #[error("description is longer than {DESCRIPTION_MAX} bytes")]
    DescriptionTooLong,
    /// `description` holds a control character or a byte outside printable ASCII.
    #[error("description holds a character that is not printable ASCII")]
    DescriptionNotPrintable,
}

impl CreateTokenRequest {
    /// Checks every field (see each field's docs).
    pub fn validate(&self) -> Result<(), TokenRequestError> {
        if let Some(ttl) = self.ttl_secs
            && ttl > TTL_MAX_SECS
        {
            return Err(TokenRequestError::Ttl(ttl));
        }
        if self.uses == Some(0) {
            return Err(TokenRequestError::Uses);
        }
        if let Some(pool) = &self.pool
            && !is_dns_label(pool)
        {
            return Err(TokenRequestError::Pool(preview(pool)));
        }
        let description = self.description.as_deref().unwrap_or_default();
        if description.len() > DESCRIPTION_MAX {
            return Err(TokenRequestError::DescriptionTooLong);
        }
        if !description.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
            return Err(TokenRequestError::DescriptionNotPrintable);
        }
        Ok(())
    }

    /// The lifetime asked for: `None` for a token that never expires.
    pub fn ttl(&self) -> Option<std::time::Duration> {
        match self.ttl_secs.unwrap_or(DEFAULT_TTL_SECS) {
            0 => None,
            secs => Some(std::time::Duration::from_secs(secs)),
        }
    }
}

/// Whether `s` is a lowercase DNS label (RFC 1123): 1 to 63 of `[a-z0-9-]`,
/// not starting or ending with `-`. Every pool name is one.
pub fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A presented token that is not `ID.SECRET`. Says nothing of what was
/// presented: it may be a secret of something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a join token: expected ID.SECRET, 6 and 16 characters of [a-z0-9]")]
pub struct MalformedToken;

/// A join token, `ID.SECRET`, parsed. `Display` and `Debug` show
/// `ID.<secret>`, never the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinSecret {
    id: String,
    secret: String,
}

impl JoinSecret {
    /// Parses kubeadm's form, `^([a-z0-9]{6})\.([a-z0-9]{16})$`.
    pub fn parse(token: &str) -> Result<JoinSecret, MalformedToken> {
        let (id, secret) = token.split_once('.').ok_or(MalformedToken)?;
        JoinSecret::from_parts(id, secret)
    }

    /// A token from its two parts, each checked as [`JoinSecret::parse`] does.
    pub fn from_parts(id: &str, secret: &str) -> Result<JoinSecret, MalformedToken> {
        if !is_token_part(id, ID_LEN) || !is_token_part(secret, SECRET_LEN) {
            return Err(MalformedToken);
        }
        Ok(JoinSecret { id: id.into(), secret: secret.into() })
    }

    /// The public part.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The secret part: hash it, never print it.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The whole token, `ID.SECRET`, to hand to its user once.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }
}

/// Whether `s` is a token ID (6 characters of `[a-z0-9]`).
pub fn is_token_id(s: &str) -> bool {
    is_token_part(s, ID_LEN)
}

fn is_token_part(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| ALPHABET.contains(&b))
}

impl fmt::Display for JoinSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.<secret>", self.id)
    }
}

impl fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinSecret({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_cases() {
        // (case, token, accepted)
        for (case, token, ok) in [
            ("kubeadm's example", "abcdef.0123456789abcdef", true),
            ("all digits", "012345.0123456789012345", true),
            ("upper case", "ABCDEF.0123456789abcdef", false),
            ("short id", "abcde.0123456789abcdef", false),
            ("long id", "abcdefg.0123456789abcdef", false),
            ("short secret", "abcdef.0123456789abcde", false),
            ("long secret", "abcdef.0123456789abcdef0", false),
            ("no dot", "abcdef0123456789abcdef", false),
            ("two dots", "abcdef.01234567.9abcdef", false),
            ("colon", "abcdef:0123456789abcdef", false),
            ("space around", " abcdef.0123456789abcdef", false),
            ("newline after", "abcdef.0123456789abcdef\n", false),
            ("dash", "abc-ef.0123456789abcdef", false),
            ("non-ASCII", "abcdé.0123456789abcdef", false),
            ("empty", "", false),
            ("a 64-hex bootstrap token", &"ab".repeat(32), false),
        ] {
            assert_eq!(JoinSecret::parse(token).is_ok(), ok, "case {case}: {token:?}");
        }
        let t = JoinSecret::parse("abcdef.0123456789abcdef").unwrap();
        assert_eq!((t.id(), t.secret(), t.expose().as_str()), ("abcdef", "0123456789abcdef", "abcdef.0123456789abcdef"));
    }

    #[test]
    fn the_secret_is_never_printed() {
        let t = JoinSecret::parse("abcdef.0123456789abcdef").unwrap();
        for shown in [t.to_string(), format!("{t:?}"), format!("{:?}", Some(&t))] {
            assert!(!shown.contains("0123456789abcdef"), "{shown}");
            assert!(shown.contains("abcdef"), "the ID is shown: {shown}");
        }
        let err = JoinSecret::parse("abcdef.0123456789abcde\x1b").unwrap_err().to_string();
        assert!(!err.contains("0123456789"), "the refusal does not echo the token: {err}");
    }

    #[test]
    fn validate_cases() {
        let ok = CreateTokenRequest { ttl_secs: Some(3600), uses: Some(3), pool: Some("tiny".into()), description: Some("rack 4".into()) };
        assert_eq!(ok.validate(), Ok(()));
        type Edit = fn(&mut CreateTokenRequest);
        // (case, edit, the field the refusal must name; "" when accepted)
        let cases: &[(&str, Edit, &str)] = &[
            ("all absent", |r| *r = CreateTokenRequest::default(), ""),
            ("ttl 0 (never expires)", |r| r.ttl_secs = Some(0), ""),
            ("ttl a year", |r| r.ttl_secs = Some(TTL_MAX_SECS), ""),
            ("ttl over a year", |r| r.ttl_secs = Some(TTL_MAX_SECS + 1), "ttl_secs"),
            ("ttl u64::MAX", |r| r.ttl_secs = Some(u64::MAX), "ttl_secs"),
            ("uses 0", |r| r.uses = Some(0), "uses"),
            ("uses u32::MAX", |r| r.uses = Some(u32::MAX), ""),
            ("pool with a dash", |r| r.pool = Some("gpu-a".into()), ""),
            ("pool upper case", |r| r.pool = Some("Tiny".into()), "pool"),
            ("pool empty", |r| r.pool = Some(String::new()), "pool"),
            ("pool with a dot", |r| r.pool = Some("a.b".into()), "pool"),
            ("pool with a slash", |r| r.pool = Some("../nodes/x".into()), "pool"),
            ("pool ending with -", |r| r.pool = Some("a-".into()), "pool"),
            ("pool of 64", |r| r.pool = Some("a".repeat(64)), "pool"),
            ("pool with ESC", |r| r.pool = Some("a\x1b[2J".into()), "pool"),
            ("description empty", |r| r.description = Some(String::new()), ""),
            ("description at its bound", |r| r.description = Some("d".repeat(DESCRIPTION_MAX)), ""),
            ("description over its bound", |r| r.description = Some("d".repeat(DESCRIPTION_MAX + 1)), "description"),
            ("description with CR-LF", |r| r.description = Some("a\r\nforged: line".into()), "description"),
            ("description with ESC", |r| r.description = Some("a\x1b[2J".into()), "description"),
            ("description with a bidi override", |r| r.description = Some("a\u{202e}b".into()), "description"),
        ];
        for (case, edit, field) in cases {
            let mut r = ok.clone();
            edit(&mut r);
            crate::node::tests::assert_validation(case, r.validate(), field);
        }
    }

    #[test]
    fn ttl_defaults_as_kubeadm() {
        let day = std::time::Duration::from_secs(DEFAULT_TTL_SECS);
        assert_eq!(CreateTokenRequest::default().ttl(), Some(day), "absent: a day");
        assert_eq!(CreateTokenRequest { ttl_secs: Some(0), ..Default::default() }.ttl(), None, "0: never expires");
        assert_eq!(CreateTokenRequest { ttl_secs: Some(60), ..Default::default() }.ttl(), Some(std::time::Duration::from_secs(60)));
    }

    #[test]
    fn info_json() {
        let json = r#"{"id":"abcdef","description":"lab","created":"2026-12-06T11:00:00Z","expires":"2026-12-07T11:00:00Z","uses_left":null,"pool":"tiny","mac":"52:54:00:ab:cd:ef","used":2}"#;
        let info: JoinTokenInfo = serde_json::from_str(json).unwrap();
        assert_eq!(info.mac.unwrap().to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(serde_json::to_string(&info).unwrap(), json, "round trip, RFC 3339 times");
        assert!(!info.expired_at(time::macros::datetime!(2026-12-07 10:59:59 UTC)));
        assert!(info.expired_at(time::macros::datetime!(2026-12-07 11:00:00 UTC)), "expired at its instant");
    }
}
