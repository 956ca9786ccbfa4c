//! What a worker image adds to its cached system ([`crate::worker`]): the
//! agent, at [`AGENT_PATH`], and the spec's files, units and users
//! ([`crate::layer::apply_spec`]). They are made into a small tree of their
//! own, and go in after the system is made, two ways:
//! - into a copy of the system's disk, with e2fsprogs' `debugfs -w`
//!   ([`Additions::debugfs_commands`]): no file system is made;
//! - into the initrd, as one more archive after it ([`Additions::append_to`]),
//!   which kiln's diskless boot script copies over the overlay root
//!   (`busybox cp -a`): the squashfs is the system's as it is.
//!
//! So a new agent, a changed file, unit or user reuses the system whole.
//!
//! A directory the system has keeps its mode and owner (the archive
//! carries the system's); a file or link the system has is replaced, as a
//! layer would replace it. Every time set is `SOURCE_DATE_EPOCH`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::Error;
use crate::cpio::{Entry, Writer};
use crate::layer::{self, Tree};
use crate::spec::WorkerSpec;

/// Where the agent is in a worker's root.
pub const AGENT_PATH: &str = "/usr/bin/kiln-agent";

/// Where the additions travel in the initrd, copied from there over the
/// root by `diskless.sh`.
pub const INITRD_DIR: &str = "usr/lib/kiln/additions";

/// The additions' tree, and what each of its entries is.
pub struct Additions {
    root: PathBuf,
    entries: Vec<Added>,
}

/// One entry of the additions' tree.
#[derive(Debug, PartialEq, Eq)]
struct Added {
    /// Its path in the image, without the leading `/`.
    rel: String,
    kind: Kind,
    /// Permission bits; for a directory the system has, the system's.
    perm: u32,
    /// Owner (uid, gid); for a directory the system has, the system's.
    owner: (u32, u32),
    /// Whether the system has something at this path.
    in_system: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink(String),
}

/// What a spec adds, as [`Additions::make`] needs it.
pub struct Inputs<'a> {
    /// The spec.
    pub spec: &'a WorkerSpec,
    /// The file it was read from (for errors).
    pub spec_path: &'a Path,
    /// The directory of its `source =` files.
    pub spec_dir: &'a Path,
    /// The agent's bytes.
    pub agent: &'a [u8],
}

impl Additions {
    /// Makes the additions' tree at `root` (anew) and reads it back. The
    /// system is the base tree `base` with kiln's own layers, which
    /// `kiln` holds alone (a tree of those only): what is already at a
    /// path is looked up in `base`, then in `kiln`.
    pub fn make(root: &Path, inputs: &Inputs<'_>, base: &Path, kiln: &Path) -> Result<Self, Error> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        if root.symlink_metadata().is_ok() {
            std::fs::remove_dir_all(root).map_err(io(root))?;
        }
        std::fs::create_dir_all(root).map_err(io(root))?;
        let tree = Tree::new(root);
        layer::apply_spec(&tree, inputs.spec, inputs.spec_dir, base, inputs.spec_path)?;
        // Last, and nothing of the spec's there (a file reaching it through a link).
        if tree.path(AGENT_PATH).symlink_metadata().is_ok() {
            let message = format!("a file of the spec lands on {AGENT_PATH}, where kiln puts its agent");
            return Err(Error::SpecInvalid { file: inputs.spec_path.to_path_buf(), key: "files".into(), message });
        }
        tree.write(AGENT_PATH, inputs.agent, 0o755)?;

        let mut entries = Vec::new();
        let mut dirs = vec![String::new()];
        while let Some(dir) = dirs.pop() {
            let host = root.join(&dir);
            let mut names: Vec<_> = std::fs::read_dir(&host)
                .map_err(io(&host))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(io(&host))?;
            names.sort();
            let mut subdirs = Vec::new();
            for name in names {
                let rel = if dir.is_empty() { name.to_string_lossy().into_owned() } else { format!("{dir}/{}", name.to_string_lossy()) };
                let path = root.join(&rel);
                let meta = path.symlink_metadata().map_err(io(&path))?;
                let removed = layer::REMOVED.contains(&format!("/{rel}").as_str());
                // The base's first: a directory there has its real mode.
                let system = [base, kiln].iter().filter(|r| !(removed && **r == base)).find_map(|r| r.join(&rel).symlink_metadata().ok());
                let kind = if meta.is_dir() {
                    Kind::Dir
                } else if meta.is_symlink() {
                    Kind::Symlink(std::fs::read_link(&path).map_err(io(&path))?.to_string_lossy().into_owned())
                } else {
                    Kind::File
                };
                let mut added = Added {
                    rel: rel.clone(),
                    kind,
                    perm: meta.mode() & 0o7777,
                    owner: (meta.uid(), meta.gid()),
                    in_system: system.is_some(),
                };
                if added.kind == Kind::Dir {
                    if let Some(s) = &system {
                        if !s.is_dir() {
                            return Err(Error::SpecInvalid {
                                file: inputs.spec_path.to_path_buf(),
                                key: "files".into(),
                                message: format!("/{rel} is not a directory in the image, and the spec puts something in it"),
                            });
                        }
                        added.perm = s.mode() & 0o7777;
                        added.owner = (s.uid(), s.gid());
                    }
                    subdirs.push(rel);
                }
                entries.push(added);
            }
            dirs.extend(subdirs);
        }
        // Parents first, in name order.
        entries.sort_by(|a, b| a.rel.split('/').cmp(b.rel.split('/')));
        Ok(Additions { root: root.to_path_buf(), entries })
    }

    /// The `debugfs` script that writes the additions into the system's
    /// root file system: each directory the system lacks made, each file
    /// and link written anew (the system's removed first), each with its
    /// mode, owner and every time `epoch`.
    pub fn debugfs_commands(&self, epoch: u32) -> Result<String, Error> {
        let mut script = String::new();
        for e in &self.entries {
            if e.kind == Kind::Dir && e.in_system {
                continue;
            }
            let (parent, name) = match e.rel.rsplit_once('/') {
                Some((p, n)) => (format!("/{p}"), n),
                None => ("/".to_string(), e.rel.as_str()),
            };
            let path = format!("/{}", e.rel);
            script.push_str(&format!("cd {}\n", quote(&parent)?));
            if e.in_system {
                script.push_str(&format!("rm {}\n", quote(name)?));
            }
            let kind_bits = match &e.kind {
                Kind::Dir => {
                    script.push_str(&format!("mkdir {}\n", quote(name)?));
                    0o040000
                }
                Kind::File => {
                    let local = self.root.join(&e.rel);
                    script.push_str(&format!("write {} {}\n", quote(&local.to_string_lossy())?, quote(name)?));
                    0o100000
                }
                Kind::Symlink(target) => {
                    script.push_str(&format!("symlink {} {}\n", quote(name)?, quote(target)?));
                    0o120000
                }
            };
            let path = quote(&path)?;
            script.push_str(&format!(
                "sif {path} mode 0{:o}\nsif {path} uid {}\nsif {path} gid {}\n",
                kind_bits | e.perm,
                e.owner.0,
                e.owner.1
            ));
            for time in ["mtime", "ctime", "atime", "crtime"] {
                script.push_str(&format!("sif {path} {time} @{epoch}\n"));
            }
        }
        Ok(script)
    }

    /// `initrd` with the additions after it, as one archive under
    /// [`INITRD_DIR`], not compressed (the agent's bytes are most of it;
    /// the kernel takes both kinds), every entry at time `epoch`.
    pub fn append_to(&self, mut initrd: Vec<u8>, epoch: u32) -> Result<Vec<u8>, Error> {
        initrd.resize(initrd.len().next_multiple_of(4), 0);
        let mut w = Writer::new(initrd, epoch);
        let io = |rel: &str| {
            let path = self.root.join(rel);
            move |source| Error::Io { path, source }
        };
        w.add(INITRD_DIR, 0o755, &Entry::Dir).map_err(io(""))?;
        for e in &self.entries {
            let entry = match &e.kind {
                Kind::Dir => Entry::Dir,
                Kind::File => Entry::File(std::fs::read(self.root.join(&e.rel)).map_err(io(&e.rel))?),
                Kind::Symlink(target) => Entry::Symlink(target.clone()),
            };
            w.add_owned(&format!("{INITRD_DIR}/{}", e.rel), e.perm, e.owner, &entry).map_err(io(&e.rel))?;
        }
        w.finish().map_err(io(""))
    }
}

/// `s` as one `debugfs` argument: in double quotes, a quote doubled (its
/// command parser, `ss`, reads `""` inside quotes as one). A control
/// character cannot be passed: an error.
fn quote(s: &str) -> Result<String, Error> {
    if s.chars().any(char::is_control) {
        return Err(Error::Io { path: s.into(), source: std::io::Error::other("a path with a control character cannot go to debugfs") });
    }
    Ok(format!("\"{}\"", s.replace('"', "\"\"")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Spec;
    use std::process::{Command, Stdio};

    /// A base with merged /usr (`bin` a link), a 0750 directory, accounts.
    fn base(dir: &Path) -> PathBuf {
        let base = dir.join("base");
        let tree = Tree::new(&base);
        tree.write("/etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n", 0o644).unwrap();
        tree.write("/etc/group", b"root:x:0:\nshadow:x:42:\nsudo:x:27:\n", 0o644).unwrap();
        tree.write("/etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o640).unwrap();
        tree.write("/etc/gshadow", b"root:*::\nshadow:*::\nsudo:*::\n", 0o640).unwrap();
        tree.write("/etc/motd", b"Debian's motd\n", 0o644).unwrap();
        tree.write("/usr/bin/true", b"", 0o755).unwrap();
        tree.mkdir("/etc/sudoers.d").unwrap();
        std::fs::set_permissions(tree.path("/etc/sudoers.d"), std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
        tree.mkdir("/home").unwrap();
        tree.mkdir("/etc/systemd/system").unwrap();
        tree.symlink("usr/bin", "/bin").unwrap();
        tree.symlink(".", "/usr/bin/X11").unwrap();
        tree.write("/var/lib/dbus/machine-id", b"the build host's\n", 0o444).unwrap();
        base
    }

    fn spec_base() -> WorkerSpec {
        let Spec::Worker(spec) = Spec::from_str(include_str!("../../images/worker.toml"), Path::new("images/worker.toml")).unwrap() else {
            panic!("a worker spec")
        };
        spec
    }

    fn spec() -> WorkerSpec {
        let text = include_str!("../../images/worker.toml").to_string()
            + "[[files]]\npath = \"/bin/hello \\\"there\\\"\"\ncontent = \"hi\\n\"\nmode = \"0755\"\n\n\
               [[files]]\npath = \"/etc/sudoers.d/ops\"\ncontent = \"ops ALL=(ALL) NOPASSWD: ALL\\n\"\nmode = \"0440\"\n\n\
               [[files]]\npath = \"/etc/kiln/extra.conf\"\ncontent = \"x\\n\"\n\n\
               [[files]]\npath = \"/var/lib/dbus/machine-id\"\ncontent = \"\"\n\n\
               [[files]]\npath = \"/usr/bin/setuid\"\ncontent = \"#!/bin/sh\\n\"\nmode = \"4755\"\n\n\
               [[users]]\nname = \"ops\"\ngroups = [\"sudo\"]\nssh-authorized-keys = [\"ssh-ed25519 AAAAC3 ops@example\"]\n";
        let Spec::Worker(spec) = Spec::from_str(&text, Path::new("images/worker.toml")).unwrap() else { panic!("a worker spec") };
        spec
    }

    fn made(dir: &Path, spec: &WorkerSpec) -> Additions {
        let base = base(dir);
        let kiln = dir.join("kiln");
        Tree::new(&kiln).mkdir("/etc/kiln").unwrap();
        let inputs = Inputs {
            spec,
            spec_path: Path::new("images/worker.toml"),
            spec_dir: &Path::new(env!("CARGO_MANIFEST_DIR")).join("../images"),
            agent: b"\x7fELF the agent",
        };
        Additions::make(&dir.join("additions"), &inputs, &base, &kiln).unwrap()
    }

    #[test]
    fn entries_follow_the_systems_links_and_keep_its_directories() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec();
        let a = made(dir.path(), &spec);
        let find = |rel: &str| a.entries.iter().find(|e| e.rel == rel).unwrap_or_else(|| panic!("no {rel} in {:?}", a.entries));
        assert!(a.entries.iter().all(|e| !e.rel.starts_with("bin/")), "/bin/… went through the base's link: {:?}", a.entries);
        let hello = find("usr/bin/hello \"there\"");
        assert_eq!((hello.perm, hello.in_system), (0o755, false));
        assert_eq!((find("etc/motd").kind == Kind::File, find("etc/motd").in_system), (true, true), "the motd replaces Debian's");
        assert_eq!(find("etc/sudoers.d").perm, 0o750, "a directory of the system keeps its mode");
        let ssh = find("home/ops/.ssh");
        assert_eq!((ssh.perm, ssh.owner, ssh.in_system), (0o700, (1000, 1000), false));
        assert!(find("etc/passwd").in_system && find("usr/bin/kiln-agent").perm == 0o755);
        assert!(find("etc/kiln").in_system && !find("etc/kiln/extra.conf").in_system, "kiln's layers are in the system");
        assert!(!find("var/lib/dbus/machine-id").in_system, "what kiln's layers remove is not");
        assert_eq!(find("usr/bin/setuid").perm, 0o4755);
        let wants = find("etc/systemd/system/multi-user.target.wants/kiln-console-banner.service");
        assert_eq!(wants.kind, Kind::Symlink("/etc/systemd/system/kiln-console-banner.service".into()));
        let order: Vec<&str> = a.entries.iter().map(|e| e.rel.as_str()).collect();
        let pos = |r: &str| order.iter().position(|o| *o == r).unwrap();
        assert!(pos("home") < pos("home/ops") && pos("home/ops") < pos("home/ops/.ssh"), "parents first: {order:?}");
    }

    #[test]
    fn a_file_reaching_the_agent_or_a_target_leaving_its_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec();
        spec.files[0].path = "/usr/bin/X11/kiln-agent".into();
        let base = base(dir.path());
        let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images");
        let inputs = Inputs { spec: &spec, spec_path: Path::new("images/w.toml"), spec_dir: &images, agent: b"agent" };
        let err = Additions::make(&dir.path().join("a"), &inputs, &base, &dir.path().join("kiln")).err().expect("refused").to_string();
        assert!(err.contains("images/w.toml") && err.contains("where kiln puts its agent"), "{err}");

        let mut spec = spec_base();
        spec.units[0].source = None;
        spec.units[0].content = Some("[Install]\nWantedBy=../../../../tmp/x.target\n".into());
        let inputs = Inputs { spec: &spec, ..inputs };
        let err = Additions::make(&dir.path().join("b"), &inputs, &base, &dir.path().join("kiln")).err().expect("refused").to_string();
        assert!(err.contains("units[0].source") && err.contains("is not a unit name"), "{err}");
        assert!(!dir.path().join("tmp").exists() && !Path::new("/tmp/x.target.wants").exists(), "nothing written outside");
    }

    /// The script on a real ext4 file system (the host's e2fsprogs), and
    /// the archive through the real cpio.
    #[test]
    fn debugfs_and_the_initrd_carry_every_addition() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec();
        let a = made(dir.path(), &spec);
        // The system: the base with kiln's layers, less what they remove.
        let system = dir.path().join("system");
        let cp = |from: &str, to: &Path| Command::new("cp").arg("-a").arg(dir.path().join(from)).arg(to).status().unwrap().success();
        assert!(cp("base", &system) && cp("kiln/.", &system));
        std::fs::remove_file(system.join("var/lib/dbus/machine-id")).unwrap();
        let img = dir.path().join("root.img");
        let out = Command::new("mke2fs").args(["-q", "-t", "ext4", "-d"]).arg(&system).arg(&img).arg("64M").output().expect("mke2fs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let script = a.debugfs_commands(1_700_000_000).unwrap();
        std::fs::write(dir.path().join("cmds"), &script).unwrap();
        let out = Command::new("debugfs").arg("-w").arg("-f").arg(dir.path().join("cmds")).arg(&img).output().expect("debugfs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // Its first line is its banner.
        let errors: Vec<&str> = stderr.lines().skip(1).collect();
        assert!(errors.is_empty(), "debugfs: {errors:?}\n{script}");
        let cat = |path: &str| {
            let out = Command::new("debugfs").arg("-R").arg(format!("cat \"{path}\"")).arg(&img).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(cat("/bin/hello \"\"there\"\""), "hi\n", "a file through /bin and with quotes in its name");
        assert!(cat("/etc/motd").contains("kiln worker"), "the spec's motd replaced Debian's");
        assert!(cat("/etc/passwd").contains("ops:x:1000:1000::/home/ops:/bin/bash"));
        assert_eq!(cat("/usr/bin/kiln-agent"), "\x7fELF the agent");
        let stat = |path: &str| {
            let out = Command::new("debugfs").arg("-R").arg(format!("stat \"{path}\"")).arg(&img).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let ssh = stat("/home/ops/.ssh");
        assert!(ssh.contains("Mode:  0700") && ssh.contains("User:  1000   Group:  1000"), "{ssh}");
        assert!(stat("/etc/sudoers.d").contains("Mode:  0750"), "the system's directory is as it was");
        assert!(stat("/etc/sudoers.d/ops").contains("Mode:  0440"));
        assert!(stat("/usr/bin/setuid").contains("Mode:  04755"), "the setuid bit is kept: {}", stat("/usr/bin/setuid"));
        assert_eq!(cat("/etc/kiln/extra.conf"), "x\n", "into a directory only kiln's layers make");
        assert!(stat("/var/lib/dbus/machine-id").contains("Size: 0"), "where kiln's layers removed the base's file");
        let out = Command::new("e2fsck").arg("-fn").arg(&img).output().unwrap();
        assert!(out.status.success(), "e2fsck -fn: {}", String::from_utf8_lossy(&out.stdout));

        let initrd = a.append_to(b"070701 the system's initrd".to_vec(), 1_700_000_000).unwrap();
        assert!(initrd.starts_with(b"070701 the system's initrd"));
        let start = 28;
        assert!(initrd[26..start].iter().all(|&b| b == 0), "the archive starts on a 4-byte boundary");
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "-n", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio is installed");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), &initrd[start..]).unwrap();
        let listing = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
        let line =
            |name: &str| listing.lines().find(|l| l.ends_with(name)).unwrap_or_else(|| panic!("no {name} in\n{listing}")).to_string();
        assert!(line("usr/lib/kiln/additions/usr/bin/kiln-agent").starts_with("-rwxr-xr-x"), "{listing}");
        let ssh = line("additions/home/ops/.ssh");
        let fields: Vec<&str> = ssh.split_whitespace().collect();
        assert_eq!((fields[0], fields[2], fields[3]), ("drwx------", "1000", "1000"), "{listing}");
        assert!(line("additions/etc/sudoers.d").starts_with("drwxr-x---"), "{listing}");
        assert_eq!(initrd, a.append_to(b"070701 the system's initrd".to_vec(), 1_700_000_000).unwrap(), "the same bytes again");
    }
}
