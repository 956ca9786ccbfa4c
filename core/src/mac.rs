//! MAC addresses in any common spelling, normalised to lowercase colon form.

use std::fmt;
use std::str::FromStr;

/// A 48-bit Ethernet MAC address. Parses `52:54:00:AB:CD:EF`,
/// `52-54-00-ab-cd-ef` and `525400abcdef`; prints lowercase with colons.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

/// A string that is not a MAC address in any spelling kiln accepts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a MAC address: {0:?}")]
pub struct MacParseError(pub String);

impl Mac {
    /// True for the all-zero address that loopback and some virtual devices report.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// The address as iPXE's `${mac:hexhyp}` prints it: `52-54-00-ab-cd-ef`.
    pub fn hyphenated(&self) -> String {
        self.to_string().replace(':', "-")
    }
}

impl FromStr for Mac {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let err = || MacParseError(s.to_string());
        // Bare hex, six pairs split by ':' or '-', or Cisco's three dotted quads.
        let groups: Vec<&str> = if t.contains(':') {
            t.split(':').collect()
        } else if t.contains('-') {
            t.split('-').collect()
        } else if t.contains('.') {
            t.split('.').collect()
        } else {
            vec![t]
        };
        let shape_ok = match groups.len() {
            1 => groups[0].len() == 12,
            3 => groups.iter().all(|g| g.len() == 4) && t.contains('.'),
            6 => groups.iter().all(|g| g.len() == 2),
            _ => false,
        };
        let digits: String = groups.concat();
        if !shape_ok || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let mut out = [0u8; 6];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({self})")
    }
}

serde_as_str!(Mac);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        let want = "52:54:00:ab:cd:ef";
        for case in ["52:54:00:ab:cd:ef", "52:54:00:AB:CD:EF", "52-54-00-ab-cd-ef", "525400ABCDEF", "5254.00ab.cdef"] {
            let mac: Mac = case.parse().unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(mac.to_string(), want, "case {case}");
        }
        assert_eq!(want.parse::<Mac>().unwrap().hyphenated(), "52-54-00-ab-cd-ef");
    }

    #[test]
    fn rejects() {
        for case in ["", "52:54:00:ab:cd", "52:54:00:ab:cd:ef:01", "zz:54:00:ab:cd:ef", "52:54-00:ab:cd:ef", "52::5400:ab:cd:ef"] {
            assert!(case.parse::<Mac>().is_err(), "case {case:?} should be refused");
        }
    }

    #[test]
    fn json_round_trip() {
        let mac: Mac = serde_json::from_str("\"52-54-00-AB-CD-EF\"").unwrap();
        assert_eq!(serde_json::to_string(&mac).unwrap(), "\"52:54:00:ab:cd:ef\"");
    }
}
