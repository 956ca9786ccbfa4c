//! TOML files whose errors name the key at fault: the image specs and the
//! pool files both read their files through [`from_str`].

use serde::de::DeserializeOwned;

/// What is wrong with a TOML file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    /// Dotted path of the key at fault; empty when the TOML itself is broken.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Parses `text` into `T`. A missing key is named itself, not its parent
/// table (as `serde_path_to_error` reports it).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, KeyError> {
    let de = toml::Deserializer::parse(text).map_err(|e| KeyError { key: String::new(), message: e.message().to_string() })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let message = e.inner().message().to_string();
        let key = match missing_field(&message) {
            Some(f) if key == "." => f,
            Some(f) => format!("{key}.{f}"),
            None => key,
        };
        KeyError { key, message }
    })
}

/// The field named in serde's "missing field `x`".
fn missing_field(message: &str) -> Option<String> {
    message.strip_prefix("missing field `")?.split('`').next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Spec {
        name: String,
        disk: Disk,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Disk {
        size: u64,
    }

    #[test]
    fn errors_name_the_key() {
        let e = from_str::<Spec>("name = \"a\"\n[disk]\nsize = \"big\"\n").unwrap_err();
        assert_eq!(e.key, "disk.size");
        assert_eq!(from_str::<Spec>("[disk]\nsize = 1\n").unwrap_err().key, "name");
        assert_eq!(from_str::<Spec>("name = \"a\"\n[disk]\n").unwrap_err().key, "disk.size");
        assert_eq!(from_str::<Spec>("name = [").unwrap_err().key, "");
    }
}
