//! The layers kiln puts on a cached base tree to make a worker's root
//! filesystem, in two parts:
//! - [`apply_system`]: what every worker needs (the agent's unit, an empty
//!   machine id, cloud-init on NoCloud only, the root filesystem by UUID,
//!   DHCP on every NIC, GRUB's configuration), made into the cached system;
//! - [`apply_spec`]: the spec's files, units and users, into a small tree of
//!   their own that goes in after the system is made, with the agent
//!   ([`crate::additions`]).
//!
//! The tree being layered is a hard-linked copy of the base ([`link_copy`]),
//! so every change goes through [`Tree::write`], [`Tree::symlink`] or
//! [`Tree::remove`], which unlink a path before making it anew: the base's
//! files are never written through a link. File times need no care: the
//! file systems are made with `SOURCE_DATE_EPOCH`, which clamps them.
//!
//! To add something every worker gets, add it to [`apply_system`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;
use crate::apt::run;
use crate::spec::{WorkerSpec, parse_mode};

/// The agent's systemd unit.
pub const AGENT_UNIT: &str = include_str!("kiln-agent.service");

/// cloud-init: read only the NoCloud seed (cidata volume or
/// `ds=nocloud-net;s=URL`), never wait probing other clouds; no locale to
/// generate (`"false"` as a string: cloud-init's schema wants a string, and
/// its locale module skips any false-like value).
pub const CLOUD_CFG: &str = "# kiln: NoCloud seeds only (cidata volume, or ds=nocloud-net;s=URL)\n\
datasource_list: [ NoCloud, None ]\n\
locale: \"false\"\n";

/// DHCP on every ethernet NIC when no seed says otherwise.
pub const NETWORK_FALLBACK: &str = "# kiln: DHCP on every ethernet NIC unless cloud-init configured it\n\
[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n";

/// Hard-links `base` into `dest` (`cp -al`), which must not exist.
pub fn link_copy(base: &Path, dest: &Path) -> Result<(), Error> {
    run(Command::new("cp").arg("-al").arg(base).arg(dest))
}

/// A root filesystem tree being layered.
pub struct Tree {
    root: PathBuf,
}

impl Tree {
    /// The tree at `root`.
    pub fn new(root: &Path) -> Self {
        Tree { root: root.to_path_buf() }
    }

    /// The host path of `path` (absolute, inside the image).
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io { path: path.to_path_buf(), source }
    }

    /// Makes the directory `path` and missing parents (root-owned, 0755).
    pub fn mkdir(&self, path: &str) -> Result<(), Error> {
        let p = self.path(path);
        std::fs::create_dir_all(&p).map_err(Self::io(&p))
    }

    /// Removes `path` if it is there (a file or a link).
    pub fn remove(&self, path: &str) -> Result<(), Error> {
        let p = self.path(path);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Self::io(&p)(e)),
            _ => Ok(()),
        }
    }

    /// Writes `bytes` to `path` as a new file with `mode`, owned by root.
    pub fn write(&self, path: &str, bytes: &[u8], mode: u32) -> Result<(), Error> {
        self.write_owned(path, bytes, mode, 0, 0)
    }

    /// Writes `bytes` to `path` as a new file with `mode`, owned by `uid:gid`.
    pub fn write_owned(&self, path: &str, bytes: &[u8], mode: u32, uid: u32, gid: u32) -> Result<(), Error> {
        if let Some(parent) = Path::new(path).parent() {
            self.mkdir(&parent.to_string_lossy())?;
        }
        self.remove(path)?;
        let p = self.path(path);
        std::fs::write(&p, bytes).map_err(Self::io(&p))?;
        // Owner first: chown clears the setuid and setgid bits.
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).map_err(Self::io(&p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(Self::io(&p))
    }

    /// Makes `path` a symbolic link to `target`.
    pub fn symlink(&self, target: &str, path: &str) -> Result<(), Error> {
        if let Some(parent) = Path::new(path).parent() {
            self.mkdir(&parent.to_string_lossy())?;
        }
        self.remove(path)?;
        let p = self.path(path);
        std::os::unix::fs::symlink(target, &p).map_err(Self::io(&p))
    }

    /// The text of `path` in the tree.
    pub fn read(&self, path: &str) -> Result<String, Error> {
        let p = self.path(path);
        std::fs::read_to_string(&p).map_err(Self::io(&p))
    }

    /// Enables `unit` (installed at `unit_path`) for each `WantedBy=` target
    /// its `[Install]` section names, as `systemctl enable` would.
    pub fn enable(&self, unit: &str, unit_text: &str, unit_path: &str) -> Result<(), Error> {
        for target in wanted_by(unit_text) {
            self.symlink(unit_path, &format!("/etc/systemd/system/{target}.wants/{unit}"))?;
        }
        Ok(())
    }
}

/// The targets in the `WantedBy=` lines of a unit's `[Install]` section.
pub fn wanted_by(unit: &str) -> Vec<String> {
    let mut section = "";
    let mut targets = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Install]"
            && let Some(v) = line.strip_prefix("WantedBy=")
        {
            targets.extend(v.split_whitespace().map(str::to_string));
        }
    }
    targets
}

/// What [`apply_system`] removes from the base.
pub const REMOVED: [&str; 1] = ["/var/lib/dbus/machine-id"];

/// What a layer needs besides the spec.
pub struct LayerInputs<'a> {
    /// The root filesystem's UUID.
    pub root_uuid: &'a str,
    /// The kernel release in `/boot`.
    pub kernel_release: &'a str,
    /// The control plane's CA certificate (PEM), for `/etc/kiln/ca.pem`.
    pub ca: Option<&'a [u8]>,
}

/// Applies kiln's own layers to `tree`: what the system holds.
pub fn apply_system(tree: &Tree, spec: &WorkerSpec, inputs: &LayerInputs<'_>) -> Result<(), Error> {
    // Each node makes its own machine id at first boot (systemd), and its
    // own SSH host keys (cloud-init).
    tree.write("/etc/machine-id", b"", 0o444)?;
    for path in REMOVED {
        tree.remove(path)?;
    }
    // mmdebstrap copies the build host's hostname and resolver in.
    tree.write("/etc/hostname", b"localhost\n", 0o644)?;
    tree.write("/etc/resolv.conf", b"", 0o644)?;
    tree.write("/etc/fstab", format!("UUID={} / ext4 defaults,errors=remount-ro 0 1\n", inputs.root_uuid).as_bytes(), 0o644)?;
    tree.write("/etc/cloud/cloud.cfg.d/90_kiln.cfg", CLOUD_CFG.as_bytes(), 0o644)?;

    tree.write("/etc/systemd/network/90-kiln-dhcp.network", NETWORK_FALLBACK.as_bytes(), 0o644)?;
    tree.symlink("/lib/systemd/system/systemd-networkd.service", "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service")?;
    tree.symlink("/lib/systemd/system/systemd-networkd.socket", "/etc/systemd/system/sockets.target.wants/systemd-networkd.socket")?;
    tree.symlink(
        "/lib/systemd/system/systemd-networkd-wait-online.service",
        "/etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service",
    )?;

    tree.write("/usr/lib/systemd/system/kiln-agent.service", AGENT_UNIT.as_bytes(), 0o644)?;
    tree.enable("kiln-agent.service", AGENT_UNIT, "/usr/lib/systemd/system/kiln-agent.service")?;
    tree.mkdir("/etc/kiln")?;
    if let Some(ca) = inputs.ca {
        tree.write(kiln_core::IMAGE_CA_PATH, ca, 0o644)?;
    }

    let cmdline = std::iter::once(format!("root=UUID={} ro", inputs.root_uuid))
        .chain(spec.kernel.cmdline.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let kver = inputs.kernel_release;
    let grub_cfg = format!(
        "# kiln: the one boot entry; GRUB's BIOS core image and EFI binary find this\n\
         # file by the root file system's UUID.\n\
         set timeout=0\n\
         serial --unit=0 --speed=115200\n\
         terminal_input serial console\n\
         terminal_output serial console\n\
         menuentry 'kiln {name}' {{\n  linux /boot/vmlinuz-{kver} {cmdline}\n  initrd /boot/initrd.img-{kver}\n}}\n",
        name = spec.name
    );
    tree.write("/boot/grub/grub.cfg", grub_cfg.as_bytes(), 0o644)
}

/// The files that [`add_user`] edits, taken from the system's root when the
/// spec's tree does not have them yet.
const ACCOUNT_FILES: [&str; 4] = ["/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"];

/// Applies the spec's files, units and users to `tree` (a tree of their
/// own), where `system` is the root they go over: the files' paths are
/// taken through its directory links (`/bin` is `/usr/bin`), and users are
/// added to its account files. `spec_dir` holds the `source =` files.
pub fn apply_spec(tree: &Tree, spec: &WorkerSpec, spec_dir: &Path, system: &Path, file: &Path) -> Result<(), Error> {
    for (i, f) in spec.files.iter().enumerate() {
        let bytes = source_bytes(spec_dir, &f.source, &f.content, file, &format!("files[{i}].source"))?;
        let mode = parse_mode(&f.mode).map_err(|e| Error::SpecInvalid {
            file: file.into(),
            key: format!("files[{i}].mode"),
            message: e.to_string(),
        })?;
        tree.write(&resolve(system, &f.path), &bytes, mode)?;
    }
    for (i, u) in spec.units.iter().enumerate() {
        let bytes = source_bytes(spec_dir, &u.source, &u.content, file, &format!("units[{i}].source"))?;
        let path = format!("/etc/systemd/system/{}", u.name);
        tree.write(&path, &bytes, 0o644)?;
        if u.enable {
            let text = String::from_utf8_lossy(&bytes);
            // A target names a file beside the unit: one name, no path.
            if let Some(t) = wanted_by(&text).iter().find(|t| t.starts_with('.') || t.contains('/') || t.chars().any(char::is_control)) {
                return Err(Error::SpecInvalid {
                    file: file.into(),
                    key: format!("units[{i}].source"),
                    message: format!("{}: WantedBy={t:?} is not a unit name", u.name),
                });
            }
            if wanted_by(&text).is_empty() {
                return Err(Error::SpecInvalid {
                    file: file.into(),
                    key: format!("units[{i}].enable"),
                    message: format!("{} has no WantedBy= in [Install] to enable it for", u.name),
                });
            }
            tree.enable(&u.name, &text, &path)?;
        }
    }
    if !spec.users.is_empty() {
        for path in ACCOUNT_FILES {
            let (from, to) = (system.join(&path[1..]), tree.path(path));
            if to.symlink_metadata().is_err() {
                tree.mkdir("/etc")?;
                std::fs::copy(&from, &to).map_err(Tree::io(&from))?;
            }
        }
    }
    for (i, u) in spec.users.iter().enumerate() {
        add_user(tree, u, file, i)?;
    }
    Ok(())
}

/// `path` (absolute, in the image) with every directory link in it followed
/// in the tree at `root`, as the image will resolve it: `/bin/x` is
/// `/usr/bin/x` in a merged-/usr root. The last part is not followed.
pub fn resolve(root: &Path, path: &str) -> String {
    let mut done: Vec<String> = Vec::new();
    let mut todo: std::collections::VecDeque<String> = path.split('/').filter(|c| !c.is_empty()).map(str::to_string).collect();
    let mut hops = 0;
    while let Some(part) = todo.pop_front() {
        match part.as_str() {
            "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let here = root.join(done.join("/")).join(&part);
        // Every link but the last part's, 40 at most (as the kernel).
        if !todo.is_empty()
            && hops < 40
            && let Ok(target) = std::fs::read_link(&here)
        {
            hops += 1;
            let target = target.to_string_lossy().into_owned();
            if target.starts_with('/') {
                done.clear();
            }
            for t in target.split('/').filter(|c| !c.is_empty()).rev() {
                todo.push_front(t.to_string());
            }
            continue;
        }
        done.push(part);
    }
    format!("/{}", done.join("/"))
}

/// The bytes of a `source =` file (relative to the spec's directory) or a `content =` text.
pub fn source_bytes(spec_dir: &Path, source: &Option<String>, content: &Option<String>, file: &Path, key: &str) -> Result<Vec<u8>, Error> {
    match (source, content) {
        (Some(s), _) => {
            let p = spec_dir.join(s);
            std::fs::read(&p).map_err(|e| Error::SpecInvalid {
                file: file.into(),
                key: key.into(),
                message: format!("{}: {e}", p.display()),
            })
        }
        (None, Some(c)) => Ok(c.clone().into_bytes()),
        (None, None) => Err(Error::SpecInvalid { file: file.into(), key: key.into(), message: "give `source` or `content`".into() }),
    }
}

/// Adds a user to passwd, shadow, group and gshadow (with its own group and
/// the supplementary ones), with a home and its `authorized_keys`. The
/// password is `*`: no password login; SSH keys only.
fn add_user(tree: &Tree, user: &crate::spec::UserSpec, file: &Path, i: usize) -> Result<(), Error> {
    let passwd = tree.read("/etc/passwd")?;
    let group = tree.read("/etc/group")?;
    let invalid = |key: &str, message: String| Error::SpecInvalid { file: file.into(), key: format!("users[{i}].{key}"), message };
    if passwd.lines().any(|l| l.split(':').next() == Some(user.name.as_str())) {
        return Err(invalid("name", format!("{:?} already exists in the base", user.name)));
    }
    let ids = |text: &str| -> Vec<u32> { text.lines().filter_map(|l| l.split(':').nth(2)?.parse().ok()).collect() };
    let taken: Vec<u32> = ids(&passwd).into_iter().chain(ids(&group)).collect();
    let id = (1000..60000).find(|n| !taken.contains(n)).ok_or_else(|| invalid("name", "no free uid".into()))?;
    let home = format!("/home/{}", user.name);
    let mut passwd = passwd;
    passwd.push_str(&format!("{}:x:{id}:{id}::{home}:{}\n", user.name, user.shell));
    let mut shadow = tree.read("/etc/shadow")?;
    shadow.push_str(&format!("{}:*::0:99999:7:::\n", user.name));

    let mut group_lines: Vec<String> = group.lines().map(str::to_string).collect();
    let gshadow = tree.read("/etc/gshadow")?;
    let mut gshadow_lines: Vec<String> = gshadow.lines().map(str::to_string).collect();
    for (j, g) in user.groups.iter().enumerate() {
        let add = |lines: &mut Vec<String>, field: usize| -> bool {
            let Some(line) = lines.iter_mut().find(|l| l.split(':').next() == Some(g.as_str())) else { return false };
            let mut f: Vec<String> = line.split(':').map(str::to_string).collect();
            if f.len() <= field {
                return false;
            }
            let mut members: Vec<&str> = f[field].split(',').filter(|m| !m.is_empty()).collect();
            members.push(&user.name);
            f[field] = members.join(",");
            *line = f.join(":");
            true
        };
        if !add(&mut group_lines, 3) {
            return Err(invalid(&format!("groups[{j}]"), format!("group {g:?} is not in the base")));
        }
        add(&mut gshadow_lines, 3);
    }
    group_lines.push(format!("{}:x:{id}:", user.name));
    gshadow_lines.push(format!("{}:!::", user.name));

    tree.write("/etc/passwd", passwd.as_bytes(), 0o644)?;
    tree.write_owned("/etc/shadow", shadow.as_bytes(), 0o640, 0, shadow_gid(tree))?;
    tree.write("/etc/group", format!("{}\n", group_lines.join("\n")).as_bytes(), 0o644)?;
    tree.write_owned("/etc/gshadow", format!("{}\n", gshadow_lines.join("\n")).as_bytes(), 0o640, 0, shadow_gid(tree))?;

    for dir in [home.clone(), format!("{home}/.ssh")] {
        tree.mkdir(&dir)?;
        let p = tree.path(&dir);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).map_err(Tree::io(&p))?;
        std::os::unix::fs::chown(&p, Some(id), Some(id)).map_err(Tree::io(&p))?;
    }
    let keys: String = user.ssh_authorized_keys.iter().map(|k| format!("{k}\n")).collect();
    tree.write_owned(&format!("{home}/.ssh/authorized_keys"), keys.as_bytes(), 0o600, id, id)
}

/// The `shadow` group's id in the base (42 on Debian).
fn shadow_gid(tree: &Tree) -> u32 {
    tree.read("/etc/group")
        .ok()
        .and_then(|g| g.lines().find(|l| l.starts_with("shadow:")).and_then(|l| l.split(':').nth(2)?.parse().ok()))
        .unwrap_or(42)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Spec, UserSpec};

    #[test]
    fn wanted_by_cases() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("one target", "[Unit]\nA=b\n[Install]\nWantedBy=multi-user.target\n", &["multi-user.target"]),
            ("two on a line", "[Install]\nWantedBy=a.target b.target\n", &["a.target", "b.target"]),
            ("outside [Install]", "[Service]\nWantedBy=x.target\n", &[]),
            ("no install", "[Service]\nExecStart=/bin/true\n", &[]),
        ];
        for (case, text, want) in cases {
            assert_eq!(wanted_by(text), *want, "case {case}");
        }
        assert_eq!(wanted_by(AGENT_UNIT), ["multi-user.target"], "the agent's unit is enabled for multi-user");
    }

    fn base() -> (tempfile::TempDir, Tree) {
        let dir = tempfile::tempdir().unwrap();
        let tree = Tree::new(dir.path());
        tree.write("/etc/passwd", b"root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n", 0o644)
            .unwrap();
        tree.write("/etc/group", b"root:x:0:\nshadow:x:42:\nsudo:x:27:\n", 0o644).unwrap();
        tree.write("/etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o640).unwrap();
        tree.write("/etc/gshadow", b"root:*::\nshadow:*::\nsudo:*::\n", 0o640).unwrap();
        (dir, tree)
    }

    #[test]
    fn writes_never_go_through_a_hard_link() {
        let (dir, tree) = base();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "base").unwrap();
        std::fs::hard_link(&outside, tree.path("/etc/motd")).unwrap();
        tree.write("/etc/motd", b"layer", 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "base");
        assert_eq!(tree.read("/etc/motd").unwrap(), "layer");
    }

    #[test]
    fn adds_a_user_with_keys_and_groups() {
        let (_dir, tree) = base();
        let user = UserSpec {
            name: "ops".into(),
            groups: vec!["sudo".into()],
            shell: "/bin/bash".into(),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3 ops@example".into()],
        };
        add_user(&tree, &user, Path::new("images/w.toml"), 0).unwrap();
        assert!(tree.read("/etc/passwd").unwrap().contains("ops:x:1000:1000::/home/ops:/bin/bash\n"));
        assert!(tree.read("/etc/group").unwrap().contains("sudo:x:27:ops\n"));
        assert!(tree.read("/etc/group").unwrap().contains("ops:x:1000:\n"));
        assert!(tree.read("/etc/shadow").unwrap().contains("ops:*::0:99999:7:::\n"));
        assert_eq!(tree.read("/home/ops/.ssh/authorized_keys").unwrap(), "ssh-ed25519 AAAAC3 ops@example\n");
        let again = add_user(&tree, &user, Path::new("images/w.toml"), 0).unwrap_err();
        assert!(again.to_string().contains("users[0].name"), "{again}");
        let bad = UserSpec { name: "x".into(), groups: vec!["wheel".into()], ..user };
        let err = add_user(&tree, &bad, Path::new("images/w.toml"), 3).unwrap_err();
        assert!(err.to_string().contains("users[3].groups[0]") && err.to_string().contains("wheel"), "{err}");
    }

    #[test]
    fn worker_spec_layers_apply() {
        let (_dir, tree) = base();
        let text = include_str!("../../images/worker.toml");
        let Spec::Worker(spec) = Spec::from_str(text, Path::new("images/worker.toml")).unwrap() else {
            panic!("worker.toml is a worker spec")
        };
        let inputs = LayerInputs {
            root_uuid: "00000000-0000-4000-8000-000000000000",
            kernel_release: "6.1.0-1-cloud-amd64",
            ca: Some(b"-----BEGIN CERTIFICATE-----\n"),
        };
        apply_system(&tree, &spec, &inputs).unwrap();
        let spec_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images");
        apply_spec(&tree, &spec, &spec_dir, tree.path("/").as_path(), Path::new("images/worker.toml")).unwrap();
        assert_eq!(tree.read("/etc/machine-id").unwrap(), "", "machine id left empty");
        assert!(tree.read("/etc/cloud/cloud.cfg.d/90_kiln.cfg").unwrap().contains("datasource_list: [ NoCloud, None ]"));
        let link = std::fs::read_link(tree.path("/etc/systemd/system/multi-user.target.wants/kiln-agent.service")).unwrap();
        assert_eq!(link, Path::new("/usr/lib/systemd/system/kiln-agent.service"));
        assert!(tree.path("/etc/systemd/system/multi-user.target.wants/kiln-console-banner.service").symlink_metadata().is_ok());
        let grub = tree.read("/boot/grub/grub.cfg").unwrap();
        assert!(
            grub.contains("linux /boot/vmlinuz-6.1.0-1-cloud-amd64 root=UUID=00000000-0000-4000-8000-000000000000 ro console=tty0"),
            "{grub}"
        );
        assert!(tree.read("/etc/motd").unwrap().contains("kiln worker"));
        assert!(tree.read("/etc/kiln/ca.pem").unwrap().starts_with("-----BEGIN"), "the CA is baked in");
    }

    #[test]
    fn cloud_cfg_passes_cloud_inits_own_schema_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("90_kiln.cfg");
        std::fs::write(&path, format!("#cloud-config\n{CLOUD_CFG}")).unwrap();
        let out = Command::new("cloud-init").args(["schema", "-c"]).arg(&path).output().expect("cloud-init is installed (scripts/setup)");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("Valid cloud-config"), "{text}");
    }
}
