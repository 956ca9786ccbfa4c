//! Image specs: `images/*.toml`, parsed with unknown keys refused, then
//! validated, as two steps. Every error names the file and the key.
//!
//! Two kinds of image share the format: an [`ImageSpec`] (`[initramfs]`: the
//! tiny busybox image) and a [`WorkerSpec`] (`[base]`: a Debian root
//! filesystem made into a bootable disk). [`Spec::from_file`] tells them
//! apart by the table they have; to add a kind, add a variant there.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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
    /// Files taken from other Debian packages, at their paths.
    #[serde(default)]
    pub files: Vec<PackageFiles>,
}

/// `[[initramfs.files]]`: files of one Debian package, put in the
/// initramfs at the paths they have in the package (a symlink stays one).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageFiles {
    /// The package.
    pub package: String,
    /// Paths in it, relative (`usr/lib/cni/bridge`).
    pub paths: Vec<String>,
}

impl ImageSpec {
    /// Reads, parses and validates the spec at `path`.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_str(&text, path)
    }

    /// Parses and validates spec text; `path` is only for error messages.
    pub fn from_str(text: &str, path: &Path) -> Result<Self, Error> {
        let spec: ImageSpec = parse(text, path)?;
        spec.validate(path)?;
        Ok(spec)
    }

    fn validate(&self, path: &Path) -> Result<(), Error> {
        let invalid = |key: &str, message: String| Error::SpecInvalid { file: path.to_path_buf(), key: key.to_string(), message };
        if !name_ok(&self.name) {
            return Err(invalid("name", format!("{:?} must be lowercase letters, digits and '-'", self.name)));
        }
        if !package_ok(&self.kernel.package) {
            return Err(invalid("kernel.package", format!("{:?} is not a Debian package name", self.kernel.package)));
        }
        if !package_ok(&self.initramfs.busybox_package) {
            return Err(invalid("initramfs.busybox-package", format!("{:?} is not a Debian package name", self.initramfs.busybox_package)));
        }
        for (i, f) in self.initramfs.files.iter().enumerate() {
            if !package_ok(&f.package) {
                return Err(invalid(&format!("initramfs.files[{i}].package"), format!("{:?} is not a Debian package name", f.package)));
            }
            if f.paths.is_empty() {
                return Err(invalid(&format!("initramfs.files[{i}].paths"), "names no file".into()));
            }
            if let Some(bad) = f.paths.iter().find(|p| !relative_path_ok(p)) {
                return Err(invalid(&format!("initramfs.files[{i}].paths"), format!("{bad:?} is not a relative path inside the package")));
            }
        }
        for (i, m) in self.kernel.modules.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return Err(invalid(&format!("kernel.modules[{i}]"), format!("{m:?} is not a module name")));
            }
        }
        check_cmdline(&self.kernel.cmdline, &invalid)?;
        Ok(())
    }
}

fn parse<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, Error> {
    kiln_core::toml_file::from_str(text).map_err(|e| Error::SpecParse { file: path.to_path_buf(), key: e.key, message: e.message })
}

/// Any image spec, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// A busybox initramfs image (`[initramfs]`).
    Initramfs(ImageSpec),
    /// A Debian worker image (`[base]`).
    Worker(WorkerSpec),
}

impl Spec {
    /// Reads, parses and validates the spec at `path`, of whichever kind it is.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_str(&text, path)
    }

    /// Parses and validates spec text; `path` is only for error messages.
    pub fn from_str(text: &str, path: &Path) -> Result<Self, Error> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::SpecParse {
            file: path.to_path_buf(),
            key: String::new(),
            message: e.message().to_string(),
        })?;
        if table.contains_key("base") {
            WorkerSpec::from_str(text, path).map(Spec::Worker)
        } else {
            ImageSpec::from_str(text, path).map(Spec::Initramfs)
        }
    }

    /// The image name.
    pub fn name(&self) -> &str {
        match self {
            Spec::Initramfs(s) => &s.name,
            Spec::Worker(s) => &s.name,
        }
    }
}

/// A Debian worker image, as written in `images/worker.toml`: a base root
/// filesystem from Debian's archive (cached), the layers kiln adds (agent,
/// files, users, units), and the disk it becomes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WorkerSpec {
    /// Image name: the output directory `DIR/<name>/` and `<name>.qcow2`.
    pub name: String,
    /// The base root filesystem.
    pub base: BaseSpec,
    /// The kernel (one of `base.packages`) and its command line.
    pub kernel: KernelSpec,
    /// The disk image.
    #[serde(default)]
    pub disk: DiskSpec,
    /// Files added on top of the base.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Users created in the image.
    #[serde(default)]
    pub users: Vec<UserSpec>,
    /// Extra systemd units.
    #[serde(default)]
    pub units: Vec<UnitSpec>,
}

/// `[base]`: what the cached base root filesystem is made from; together
/// these are its cache key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BaseSpec {
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    /// Debian architecture, e.g. `amd64`.
    pub arch: String,
    /// The archive (apt's configured mirror): `SUITE` and `SUITE-updates` come from it.
    pub mirror: String,
    /// Where `SUITE-security` comes from; none: no security suite.
    #[serde(default)]
    pub security_mirror: Option<String>,
    /// Packages installed on top of the `apt` variant (Essential + apt),
    /// from Debian's archive or from `repositories`.
    pub packages: Vec<String>,
    /// `[[base.repositories]]`: apt repositories beside Debian's (a
    /// vendor's: Kubernetes', a container runtime's), each signed by its
    /// own key.
    #[serde(default)]
    pub repositories: Vec<RepositorySpec>,
}

/// One `[[base.repositories]]`, with deb822's fields (`sources.list(5)`):
/// `deb URI SUITE COMPONENTS…` for each URI and suite. A suite ending in
/// `/` is a flat repository and takes no components.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RepositorySpec {
    /// `http://` or `https://` URIs of one repository (mirrors of each other).
    pub uris: Vec<String>,
    /// Its suites (`stable`, `v1.33`, or `/` for a flat repository).
    pub suites: Vec<String>,
    /// Its components (`main`); none for a flat suite.
    #[serde(default)]
    pub components: Vec<String>,
    /// The key the repository is signed with, a file beside the spec
    /// (OpenPGP, armored or binary); apt trusts it for this repository only.
    pub signed_by: PathBuf,
}

impl RepositorySpec {
    /// How errors name it: `URI SUITE [COMPONENTS]` of its first URI and suite.
    pub fn describe(&self) -> String {
        let mut words = vec![self.uris.first().cloned().unwrap_or_default(), self.suites.first().cloned().unwrap_or_default()];
        words.extend(self.components.iter().cloned());
        words.join(" ")
    }
}

/// `[disk]`
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskSpec {
    /// Size of the root filesystem in MiB; default: the tree's size with room to spare.
    #[serde(default)]
    pub root_size_mib: Option<u64>,
}

/// `[[files]]`: one file added to the image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileSpec {
    /// Absolute path in the image.
    pub path: String,
    /// File whose bytes to take, relative to the spec's directory.
    #[serde(default)]
    pub source: Option<String>,
    /// The bytes as text (instead of `source`).
    #[serde(default)]
    pub content: Option<String>,
    /// Octal mode, e.g. `"0644"`.
    #[serde(default = "default_mode")]
    pub mode: String,
}

fn default_mode() -> String {
    "0644".into()
}

/// `[[users]]`: a login made in the image (password locked; SSH keys only).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UserSpec {
    /// Login name.
    pub name: String,
    /// Supplementary groups, which must exist in the base.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Login shell.
    #[serde(default = "default_shell")]
    pub shell: String,
    /// Lines of `~/.ssh/authorized_keys`.
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
}

fn default_shell() -> String {
    "/bin/bash".into()
}

/// `[[units]]`: a systemd unit added to `/etc/systemd/system`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UnitSpec {
    /// Unit file name, e.g. `hello.service`.
    pub name: String,
    /// File to take it from, relative to the spec's directory.
    #[serde(default)]
    pub source: Option<String>,
    /// The unit as text (instead of `source`).
    #[serde(default)]
    pub content: Option<String>,
    /// Enable it: linked into the `.wants` of each `WantedBy=` target.
    #[serde(default = "yes")]
    pub enable: bool,
}

fn yes() -> bool {
    true
}

/// Packages a worker's base must have: the boot loaders' files come from them.
pub const WORKER_REQUIRED_PACKAGES: &[&str] = &["systemd", "systemd-sysv", "grub-pc-bin", "grub-efi-amd64-bin", "cloud-init"];

impl WorkerSpec {
    /// Parses and validates spec text; `path` is only for error messages.
    pub fn from_str(text: &str, path: &Path) -> Result<Self, Error> {
        let spec: WorkerSpec = parse(text, path)?;
        spec.validate(path)?;
        Ok(spec)
    }

    fn validate(&self, path: &Path) -> Result<(), Error> {
        let invalid = |key: &str, message: String| Error::SpecInvalid { file: path.to_path_buf(), key: key.to_string(), message };
        if !name_ok(&self.name) {
            return Err(invalid("name", format!("{:?} must be lowercase letters, digits and '-'", self.name)));
        }
        for (key, v) in [("base.suite", &self.base.suite), ("base.arch", &self.base.arch)] {
            if !name_ok(v) {
                return Err(invalid(key, format!("{v:?} must be lowercase letters, digits and '-'")));
            }
        }
        if self.base.arch != "amd64" {
            return Err(invalid("base.arch", format!("{:?}: only amd64 images boot (GRUB i386-pc and x86_64-efi)", self.base.arch)));
        }
        let mirrors = std::iter::once(("base.mirror", &self.base.mirror))
            .chain(self.base.security_mirror.iter().map(|m| ("base.security-mirror", m)));
        for (key, m) in mirrors {
            if !(m.starts_with("http://") || m.starts_with("https://") || m.starts_with("file:/")) || m.chars().any(char::is_whitespace) {
                return Err(invalid(key, format!("{m:?} is not an http(s):// or file:/ URL")));
            }
        }
        for (i, r) in self.base.repositories.iter().enumerate() {
            let key = |k: &str| format!("base.repositories[{i}].{k}");
            let word_ok = |w: &String| !w.is_empty() && !w.chars().any(|c| c.is_whitespace() || c.is_control() || c == '#');
            if r.uris.is_empty() {
                return Err(invalid(&key("uris"), "names no URI".into()));
            }
            for u in &r.uris {
                if !(u.starts_with("http://") || u.starts_with("https://")) || !word_ok(u) {
                    return Err(invalid(&key("uris"), format!("{u:?} is not an http(s):// URL")));
                }
            }
            if r.suites.is_empty() || !r.suites.iter().all(word_ok) {
                return Err(invalid(&key("suites"), format!("{:?}: one or more suites, each one word", r.suites)));
            }
            let flat = r.suites.iter().any(|s| s.ends_with('/'));
            if flat && !r.components.is_empty() {
                return Err(invalid(&key("components"), "a flat suite (ending in '/') takes no components".into()));
            }
            if !flat && (r.components.is_empty() || !r.components.iter().all(word_ok)) {
                return Err(invalid(&key("components"), format!("{:?}: one or more components, each one word", r.components)));
            }
            let signed_by = r.signed_by.to_string_lossy();
            if r.signed_by.is_absolute() || !relative_path_ok(&signed_by) {
                return Err(invalid(&key("signed-by"), format!("{signed_by:?} must be a file beside the spec (a relative path)")));
            }
        }
        for (i, p) in self.base.packages.iter().enumerate() {
            if !package_ok(p) {
                return Err(invalid(&format!("base.packages[{i}]"), format!("{p:?} is not a Debian package name")));
            }
        }
        for need in WORKER_REQUIRED_PACKAGES.iter().chain(std::iter::once(&self.kernel.package.as_str())) {
            if !self.base.packages.iter().any(|p| p == need) {
                return Err(invalid("base.packages", format!("must include {need:?}")));
            }
        }
        if !self.kernel.modules.is_empty() {
            return Err(invalid("kernel.modules", "a worker boots Debian's own initramfs, which loads modules itself".into()));
        }
        check_cmdline(&self.kernel.cmdline, &invalid)?;
        for (i, arg) in self.kernel.cmdline.iter().enumerate() {
            if arg.starts_with("root=") {
                return Err(invalid(&format!("kernel.cmdline[{i}]"), "the builder sets root= itself".into()));
            }
        }
        if let Some(size) = self.disk.root_size_mib
            && !(256..=1 << 20).contains(&size)
        {
            return Err(invalid("disk.root-size-mib", format!("{size} is not between 256 and 1048576")));
        }
        for (i, f) in self.files.iter().enumerate() {
            let key = |k: &str| format!("files[{i}].{k}");
            image_path_ok(&f.path).map_err(|m| invalid(&key("path"), m.to_string()))?;
            // `/bin` is a link to `/usr/bin` in the tree (merged /usr).
            if [crate::additions::AGENT_PATH, "/bin/kiln-agent"].contains(&f.path.as_str()) {
                let why = format!("{} is where kiln puts its agent (`kiln build --agent PATH` picks another agent)", f.path);
                return Err(invalid(&key("path"), why));
            }
            one_source(&f.source, &f.content).map_err(|m| invalid(&key("source"), m.to_string()))?;
            parse_mode(&f.mode).map_err(|m| invalid(&key("mode"), m.to_string()))?;
        }
        for (i, u) in self.users.iter().enumerate() {
            let key = |k: &str| format!("users[{i}].{k}");
            let user_ok = !u.name.is_empty()
                && u.name.len() <= 32
                && u.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
                && !u.name.starts_with('-');
            if !user_ok {
                return Err(invalid(&key("name"), format!("{:?} is not a login name", u.name)));
            }
            for (j, k) in u.ssh_authorized_keys.iter().enumerate() {
                if k.contains('\n') || k.split_whitespace().count() < 2 {
                    return Err(invalid(&format!("users[{i}].ssh-authorized-keys[{j}]"), "must be one `TYPE KEY [COMMENT]` line".into()));
                }
            }
            if !u.shell.starts_with('/') {
                return Err(invalid(&key("shell"), format!("{:?} is not an absolute path", u.shell)));
            }
        }
        for (i, u) in self.units.iter().enumerate() {
            let key = |k: &str| format!("units[{i}].{k}");
            let kinds = [".service", ".timer", ".socket", ".target", ".path", ".mount"];
            if u.name.contains('/') || !kinds.iter().any(|k| u.name.ends_with(k)) {
                return Err(invalid(&key("name"), format!("{:?} is not a unit file name ({})", u.name, kinds.join(", "))));
            }
            one_source(&u.source, &u.content).map_err(|m| invalid(&key("source"), m.to_string()))?;
        }
        Ok(())
    }
}

fn name_ok(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !s.starts_with('-')
}

/// A path inside a package: relative, no `..`, nothing empty between slashes.
fn relative_path_ok(p: &str) -> bool {
    !p.is_empty() && !p.starts_with('/') && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..") && !p.contains('\0')
}

fn package_ok(s: &str) -> bool {
    s.len() >= 2 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
}

fn check_cmdline(args: &[String], invalid: &dyn Fn(&str, String) -> Error) -> Result<(), Error> {
    for (i, arg) in args.iter().enumerate() {
        if arg.is_empty() || arg.chars().any(char::is_whitespace) || arg.starts_with("kiln.") {
            return Err(invalid(
                &format!("kernel.cmdline[{i}]"),
                format!("{arg:?} must be one word and not a kiln.* parameter (the server sets those)"),
            ));
        }
    }
    Ok(())
}

/// A value in a spec that is malformed, whatever key it is under; the
/// caller names the file and key ([`Error::SpecInvalid`]).
#[derive(Debug, thiserror::Error)]
pub enum BadValue {
    /// A path in the image is not absolute, has `.`, `..` or empty parts,
    /// or a control character.
    #[error("{0:?} must be an absolute path without `.`, `..`, `//` or control characters")]
    ImagePath(String),
    /// Both or neither of `source` and `content`.
    #[error("give exactly one of `source` and `content`")]
    Source,
    /// A file mode is not octal, or above `7777`.
    #[error("{0:?} is not an octal mode such as \"0644\"")]
    Mode(String),
}

/// An absolute path with no `..`, `.` or empty parts.
fn image_path_ok(path: &str) -> Result<(), BadValue> {
    let ok = path.starts_with('/')
        && path.len() > 1
        && path[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && !path.chars().any(char::is_control);
    if ok { Ok(()) } else { Err(BadValue::ImagePath(path.into())) }
}

fn one_source(source: &Option<String>, content: &Option<String>) -> Result<(), BadValue> {
    match (source, content) {
        (Some(_), None) | (None, Some(_)) => Ok(()),
        _ => Err(BadValue::Source),
    }
}

/// `"0644"` → 0o644.
pub fn parse_mode(mode: &str) -> Result<u32, BadValue> {
    match u32::from_str_radix(mode, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(BadValue::Mode(mode.into())),
    }
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
    fn a_file_where_the_agent_goes_is_refused_by_its_key() {
        for path in ["/usr/bin/kiln-agent", "/bin/kiln-agent"] {
            let text = format!("{}\n[[files]]\npath = \"{path}\"\ncontent = \"x\"\n", include_str!("../../images/worker.toml"));
            let e = Spec::from_str(&text, Path::new("images/w.toml")).expect_err("refused").to_string();
            assert!(e.contains("images/w.toml") && e.contains("files[1].path") && e.contains("agent"), "{e}");
        }
    }

    #[test]
    fn error_names_the_file() {
        let e = ImageSpec::from_str("colour = 1", Path::new("images/x.toml")).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("images/x.toml") && text.contains("colour"), "{text}");
    }
}
