//! Image specs: `images/*.toml`, parsed with unknown keys refused, then
//! validated, as two steps. Every error names the file and the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Error;

/// An image spec, as written in `images/<name>.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ImageSpec {
    /// Image name: the output directory `DIR/<name>/`.
    pub name: String,
    /// The kernel and the modules the image needs.
    pub kernel: KernelSpec,
    /// A busybox initramfs image (the tiny image).
    pub initramfs: InitramfsSpec,
}

/// `[kernel]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KernelSpec {
    /// Debian package (or metapackage) of the kernel, e.g. `linux-image-cloud-amd64`.
    pub package: String,
    /// Module names to carry and load at boot (with what they depend on).
    #[serde(default)]
    pub modules: Vec<String>,
    /// Kernel arguments the image needs at boot.
    #[serde(default)]
    pub cmdline: Vec<String>,
}

/// `[initramfs]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InitramfsSpec {
    /// The Debian package providing `/bin/busybox` (statically linked).
    pub busybox_package: String,
}

impl ImageSpec {
    /// Reads, parses and validates the spec at `path`.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_str(&text, path)
    }

    /// Parses and validates spec text; `path` is only for error messages.
    pub fn from_str(text: &str, path: &Path) -> Result<Self, Error> {
        let spec = parse(text, path)?;
        spec.validate(path)?;
        Ok(spec)
    }

    fn validate(&self, path: &Path) -> Result<(), Error> {
        let invalid = |key: &str, message: String| Error::SpecInvalid { file: path.to_path_buf(), key: key.to_string(), message };
        let name_ok =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !s.starts_with('-');
        if !name_ok(&self.name) {
            return Err(invalid("name", format!("{:?} must be lowercase letters, digits and '-'", self.name)));
        }
        let package_ok = |s: &str| s.len() >= 2 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
        if !package_ok(&self.kernel.package) {
            return Err(invalid("kernel.package", format!("{:?} is not a Debian package name", self.kernel.package)));
        }
        if !package_ok(&self.initramfs.busybox_package) {
            return Err(invalid("initramfs.busybox-package", format!("{:?} is not a Debian package name", self.initramfs.busybox_package)));
        }
        for (i, m) in self.kernel.modules.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return Err(invalid(&format!("kernel.modules[{i}]"), format!("{m:?} is not a module name")));
            }
        }
        for (i, arg) in self.kernel.cmdline.iter().enumerate() {
            if arg.is_empty() || arg.chars().any(char::is_whitespace) || arg.starts_with("kiln.") {
                return Err(invalid(
                    &format!("kernel.cmdline[{i}]"),
                    format!("{arg:?} must be one word and not a kiln.* parameter (the server sets those)"),
                ));
            }
        }
        Ok(())
    }
}

fn parse(text: &str, path: &Path) -> Result<ImageSpec, Error> {
    let file = PathBuf::from(path);
    let de = toml::Deserializer::parse(text).map_err(|e| Error::SpecParse {
        file: file.clone(),
        key: String::new(),
        message: e.message().to_string(),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let message = e.inner().message().to_string();
        // serde_path_to_error reports a missing key at its parent; name the key itself.
        let key = match missing_field(&message) {
            Some(f) if key == "." => f,
            Some(f) => format!("{key}.{f}"),
            None => key,
        };
        Error::SpecParse { file, key, message }
    })
}

/// The field named in serde's "missing field `x`".
fn missing_field(message: &str) -> Option<String> {
    message.strip_prefix("missing field `")?.split('`').next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = include_str!("../../images/tiny.toml");

    fn err(text: &str) -> (String, String) {
        match ImageSpec::from_str(text, Path::new("images/x.toml")) {
            Err(Error::SpecParse { key, message, .. } | Error::SpecInvalid { key, message, .. }) => (key, message),
            other => panic!("expected a spec error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn tiny_parses() {
        let spec = ImageSpec::from_str(TINY, Path::new("images/tiny.toml")).unwrap();
        assert_eq!(spec.name, "tiny");
        assert_eq!(spec.kernel.package, "linux-image-cloud-amd64");
        assert!(spec.kernel.modules.contains(&"virtio_net".to_string()));
    }

    #[test]
    fn bad_specs_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("unknown top-level key", "colour = 1\n", "colour"),
            ("unknown nested key", "[kernel]\nflavour = \"x\"\n", "kernel.flavour"),
            ("missing field", "name = \"x\"\n[kernel]\npackage = \"linux-image-cloud-amd64\"\n", "initramfs"),
            ("missing nested field", "name = \"x\"\n[kernel]\n[initramfs]\nbusybox-package = \"busybox-static\"\n", "kernel.package"),
            ("wrong type", "name = 3\n", "name"),
            ("wrong nested type", "name = \"x\"\n[kernel]\npackage = \"k\"\nmodules = \"virtio_net\"\n", "kernel.modules"),
            (
                "bad name",
                "name = \"Bad Name\"\n[kernel]\npackage = \"linux-image-cloud-amd64\"\n[initramfs]\nbusybox-package = \"busybox-static\"\n",
                "name",
            ),
            (
                "kiln arg",
                "name = \"x\"\n[kernel]\npackage = \"linux-image-cloud-amd64\"\ncmdline = [\"kiln.token=1\"]\n[initramfs]\nbusybox-package = \"busybox-static\"\n",
                "kernel.cmdline[0]",
            ),
        ];
        for (case, text, want_key) in cases {
            let (key, message) = err(text);
            assert_eq!(&key, want_key, "case {case}: message {message}");
        }
    }

    #[test]
    fn error_names_the_file() {
        let e = ImageSpec::from_str("colour = 1", Path::new("images/x.toml")).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("images/x.toml") && text.contains("colour"), "{text}");
    }
}
