//! Network boot of a worker with no disk: the worker's `initrd.img` is
//! Debian's own initramfs (initramfs-tools, made in the base) followed by a
//! small second archive that the kernel unpacks over it. That archive adds
//! the boot script `scripts/kiln` (selected by `boot=kiln`), which fetches
//! the image's `root.squashfs` over HTTP by the URL in `kiln.rootfs=`,
//! checks it against `kiln.rootfs_sha256=`, and mounts it under a tmpfs
//! overlay as the root; a static busybox for `wget` and `sha256sum`; and
//! the squashfs and overlay modules, which initramfs-tools leaves out.
//!
//! The agent and the spec's files, units and users come last, in an
//! archive of their own ([`crate::additions`]), not in `root.squashfs`: the
//! script copies them over the overlay root before the root is switched
//! to. A build with a new agent or a changed file reuses the squashfs and
//! this initrd as they are.
//!
//! The same initrd still boots from the disk: without `boot=kiln`,
//! initramfs-tools mounts the disk's root as always.
//!
//! Appending an archive rather than rebuilding the initramfs keeps the
//! build free of chroots and of `update-initramfs`, and keeps Debian's
//! initramfs byte for byte as Debian made it.

use std::path::{Path, PathBuf};

use flate2::Compression;

use crate::Error;
use crate::cpio::{Entry, Writer};

/// The initramfs-tools boot script for `boot=kiln`.
pub const SCRIPT: &str = include_str!("diskless.sh");

/// The kernel arguments that make the initramfs boot diskless, before the
/// root filesystem's URL and sha256 (which the server adds).
pub const CMDLINE: [&str; 2] = ["boot=kiln", "ip=dhcp"];

/// The package whose static busybox the script uses.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Where the script finds busybox and the modules inside the initramfs
/// (real directories in a merged-/usr initramfs: `bin` and `lib` are links
/// there, and an archive entry for a link's path would replace the link).
const BUSYBOX_PATH: &str = "usr/lib/kiln/busybox";
const MODULE_DIR: &str = "usr/lib/kiln";

/// The modules the script loads by path, inside `lib/modules/KVER/kernel`.
const MODULES: [&str; 2] = ["fs/squashfs/squashfs.ko", "fs/overlayfs/overlay.ko"];

/// Debian's initramfs `debian_initrd` with kiln's archive appended: the
/// script, `busybox` (a static binary), and the squashfs and overlay
/// modules of kernel `kver` from the root `tree`. Entries carry `epoch`.
pub fn initrd(debian_initrd: &[u8], tree: &Path, kver: &str, busybox: &[u8], epoch: u32) -> Result<Vec<u8>, Error> {
    let mut out = debian_initrd.to_vec();
    // The kernel looks for the next archive at a 4-byte boundary; zeros between are skipped.
    out.resize(out.len().next_multiple_of(4), 0);
    let gz = flate2::GzBuilder::new().mtime(0).write(out, Compression::new(6));
    let mut w = Writer::new(gz, epoch);
    let io = |path: &str| {
        let path = PathBuf::from(path);
        move |source| Error::Io { path, source }
    };
    w.add("scripts/kiln", 0o644, &Entry::File(SCRIPT.as_bytes().to_vec())).map_err(io("scripts/kiln"))?;
    w.add(MODULE_DIR, 0o755, &Entry::Dir).map_err(io(MODULE_DIR))?;
    // Named `busybox`: busybox picks its applet by its own name otherwise.
    w.add(BUSYBOX_PATH, 0o755, &Entry::File(busybox.to_vec())).map_err(io(BUSYBOX_PATH))?;
    for rel in MODULES {
        let src = tree.join("lib/modules").join(kver).join("kernel").join(rel);
        let bytes = std::fs::read(&src).map_err(|_| Error::MissingFile {
            package: format!("linux-image-{kver}"),
            what: format!("lib/modules/{kver}/kernel/{rel} (an uncompressed module, for diskless boot)"),
        })?;
        let name = format!("{MODULE_DIR}/{}", Path::new(rel).file_name().expect("a file name").to_string_lossy());
        w.add(&name, 0o644, &Entry::File(bytes)).map_err(io(&name))?;
    }
    let gz = w.finish().map_err(io("initrd.img"))?;
    gz.finish().map_err(io("initrd.img"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::process::{Command, Stdio};

    fn fake_tree(dir: &Path) {
        for rel in MODULES {
            let p = dir.join("lib/modules/6.1.0-test/kernel").join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, format!("module {rel}")).unwrap();
        }
    }

    #[test]
    fn debian_initrd_is_kept_and_kilns_archive_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        fake_tree(dir.path());
        let debian = b"070701 pretend this is Debian's zstd archive".to_vec();
        let out = initrd(&debian, dir.path(), "6.1.0-test", b"\x7fELF busybox", 1_700_000_000).unwrap();
        assert!(out.starts_with(&debian), "Debian's initramfs is unchanged, first");
        let rest = &out[debian.len()..];
        let start = rest.iter().position(|&b| b != 0).unwrap();
        assert_eq!((debian.len() + start) % 4, 0, "kiln's archive starts on a 4-byte boundary");
        let mut cpio = Vec::new();
        flate2::read::GzDecoder::new(&rest[start..]).read_to_end(&mut cpio).unwrap();
        // The real cpio lists what the kernel will unpack.
        let mut child =
            Command::new("cpio").args(["-t", "--quiet"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("cpio is installed");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), &cpio).unwrap();
        let listing = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
        let names: Vec<&str> = listing.lines().collect();
        assert_eq!(names, ["scripts/kiln", "usr/lib/kiln", "usr/lib/kiln/busybox", "usr/lib/kiln/squashfs.ko", "usr/lib/kiln/overlay.ko"]);
        let again = initrd(&debian, dir.path(), "6.1.0-test", b"\x7fELF busybox", 1_700_000_000).unwrap();
        assert_eq!(out, again, "the same inputs give the same bytes");
    }

    #[test]
    fn a_missing_module_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = initrd(b"x", dir.path(), "6.1.0-test", b"busybox", 0).unwrap_err().to_string();
        assert!(err.contains("fs/squashfs/squashfs.ko"), "{err}");
    }

    #[test]
    fn the_script_parses_and_defines_what_init_calls() {
        let out = Command::new("sh").arg("-n").arg("-c").arg(SCRIPT).output().unwrap();
        assert!(out.status.success(), "sh -n: {}", String::from_utf8_lossy(&out.stderr));
        for f in ["mountroot()", "mount_top()", "mount_premount()", "mount_bottom()"] {
            assert!(SCRIPT.contains(f), "scripts/kiln defines {f}");
        }
    }
}
