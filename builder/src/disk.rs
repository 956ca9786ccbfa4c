//! From a layered tree to the artifacts of a worker image, with no VM, no
//! mount and no loop device: the ext4 root file system (`mke2fs -d`), the
//! squashfs for network boot (`mksquashfs`), GRUB's BIOS core image and EFI
//! binary (`grub-mkimage` from the tree's own GRUB packages, run through the
//! tree's dynamic loader), the EFI system partition (`mkfs.vfat` + mtools),
//! the GPT disk (`sfdisk` on a plain file, partitions written at their
//! offsets) and the qcow2 (`qemu-img convert`).
//!
//! Every output is reproducible: fixed UUIDs (derived from the build's
//! inputs), `SOURCE_DATE_EPOCH` for the file systems' times, `--invariant`
//! and pre-dated files for the FAT volume, squashfs entries sorted with fixed times.
//!
//! The disk layout (512-byte sectors):
//!
//! | LBA | size | partition | holds |
//! |---|---|---|---|
//! | 0 | 1 | protective MBR | GRUB's `boot.img` (first 440 bytes), pointing at LBA 2048 |
//! | 2048 | 1 MiB | BIOS boot | GRUB's i386-pc `core.img` |
//! | 4096 | 64 MiB | EFI system | FAT32, `/EFI/BOOT/BOOTX64.EFI` |
//! | 135168 | root | Linux root (x86-64) | ext4 |

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Error;
use crate::apt::{Archive, run};

const SECTOR: u64 = 512;
const BIOS_START: u64 = 2048;
const BIOS_SECTORS: u64 = 2048;
const ESP_START: u64 = 4096;
const ESP_SECTORS: u64 = 64 * 2048;
const ROOT_START: u64 = ESP_START + ESP_SECTORS;
/// GRUB modules built into both boot images: enough to find the root file
/// system by UUID and boot a Linux kernel from it, with a serial console.
const GRUB_MODULES: &[&str] =
    &["part_gpt", "ext2", "search", "search_fs_uuid", "normal", "configfile", "linux", "echo", "serial", "terminal", "test", "gzio"];

/// The packages whose `mke2fs` honours `SOURCE_DATE_EPOCH` for the times of
/// the files it copies in (e2fsprogs ≥ 1.47.1). bookworm's 1.47.0 copies
/// each file's host ctime, so its images differ on every build.
pub const E2FSPROGS_BACKPORTS: &[&str] =
    &["e2fsprogs/bookworm-backports", "libext2fs2/bookworm-backports", "libcom-err2/bookworm-backports", "libss2/bookworm-backports"];

/// A UUID made from `seed` (sha256, version 4 and variant bits set).
pub fn uuid_from(seed: &str) -> String {
    let h = crate::sha256_hex(seed.as_bytes());
    let mut b = hex::decode(&h[..32]).expect("hex");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// The UUIDs of one disk.
#[derive(Debug, Clone)]
pub struct DiskIds {
    /// GPT disk GUID.
    pub disk: String,
    /// BIOS boot partition GUID.
    pub bios: String,
    /// EFI system partition GUID.
    pub esp: String,
    /// Root partition GUID and ext4 UUID (the same).
    pub root: String,
}

impl DiskIds {
    /// The UUIDs for a build with cache key `key`.
    pub fn from_key(key: &str) -> Self {
        DiskIds {
            disk: uuid_from(&format!("{key} disk")),
            bios: uuid_from(&format!("{key} bios")),
            esp: uuid_from(&format!("{key} esp")),
            root: uuid_from(&format!("{key} root")),
        }
    }
}

/// An `mke2fs` that honours `SOURCE_DATE_EPOCH`: the host's when it is new
/// enough, else bookworm-backports' unpacked in the cache (the host is not
/// touched).
#[derive(Debug, Clone)]
pub struct Mke2fs {
    program: PathBuf,
    /// The same e2fsprogs' `debugfs`, which writes into a made file system.
    debugfs: PathBuf,
    lib_path: Option<String>,
    /// `mke2fs 1.47.2` (what it prints), for the cache key.
    pub version: String,
}

impl Mke2fs {
    /// Finds or fetches one.
    pub fn find(archive: &Archive) -> Result<Self, Error> {
        if let Some(version) = mke2fs_version(Path::new("mke2fs"), None)
            && version_at_least(&version, (1, 47, 1))
        {
            return Ok(Mke2fs { program: "mke2fs".into(), debugfs: "debugfs".into(), lib_path: None, version });
        }
        let mut trees = Vec::new();
        for spec in E2FSPROGS_BACKPORTS {
            let pkg = archive.resolve(spec)?.package;
            let tree = archive.unpacked(&pkg, |_| Ok(()))?;
            // Absolute: debugfs runs in the work directory.
            trees.push(std::path::absolute(&tree).map_err(|source| Error::Io { path: tree, source })?);
        }
        let (program, debugfs) = (trees[0].join("sbin/mke2fs"), trees[0].join("sbin/debugfs"));
        let lib_path = trees.iter().map(|t| t.join("lib/x86_64-linux-gnu").display().to_string()).collect::<Vec<_>>().join(":");
        let version = mke2fs_version(&program, Some(&lib_path))
            .ok_or_else(|| Error::MissingFile { package: "e2fsprogs (bookworm-backports)".into(), what: "a working sbin/mke2fs".into() })?;
        Ok(Mke2fs { program, debugfs, lib_path: Some(lib_path), version })
    }

    /// Runs `commands` (a `debugfs` script) with `debugfs -w` on the ext4
    /// file system at byte `offset` of `dir/image`, a work file (not
    /// synced to the disk when it closes): no mount, no loop device. `E2FSPROGS_FAKE_TIME` is `epoch`, so the same commands give
    /// the same bytes (the script sets the times it cares about itself: an
    /// epoch of 0 means "no fake time" to e2fsprogs). debugfs exits 0
    /// whatever its commands did: anything it prints to stderr but its
    /// banner is an error.
    pub fn debugfs(&self, dir: &Path, image: &str, offset: u64, commands: &str, epoch: u32) -> Result<(), Error> {
        assert!(!image.is_empty() && image.bytes().all(|b| b.is_ascii_graphic() && b != b'?'), "debugfs image {image:?}");
        let script = dir.join("debugfs.commands");
        std::fs::write(&script, commands).map_err(|source| Error::Io { path: script, source })?;
        // The image is a work file, converted and removed once written: the
        // fsync debugfs does on close (about 1 s of writing out a fresh copy
        // of the disk) buys nothing. eatmydata (Debian's) drops it, if there.
        let eatmydata = std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("eatmydata")).find(|e| e.is_file()));
        let mut cmd = match eatmydata {
            Some(e) => {
                let mut cmd = Command::new(e);
                cmd.arg(&self.debugfs);
                cmd
            }
            None => Command::new(&self.debugfs),
        };
        if let Some(l) = &self.lib_path {
            cmd.env("LD_LIBRARY_PATH", l);
        }
        cmd.current_dir(dir)
            .args(["-w", "-f", "debugfs.commands"])
            .arg(format!("{image}?offset={offset}"))
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string());
        let out = crate::interrupt::output(&mut cmd)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Its first line is its banner, `debugfs 1.47.2 (1-Jan-2025)`.
        let banner = |l: &str| l.starts_with("debugfs ") && l.ends_with(')') && !l.contains(": ");
        let errors: Vec<&str> =
            stderr.lines().enumerate().filter(|(i, l)| !(l.trim().is_empty() || *i == 0 && banner(l))).map(|(_, l)| l).collect();
        if !out.status.success() || !errors.is_empty() {
            return Err(Error::Command {
                program: format!("{} (writing into {} at byte {offset})", self.debugfs.display(), dir.join(image).display()),
                status: out.status.to_string(),
                stderr: errors.join("\n"),
            });
        }
        Ok(())
    }

    /// Makes an ext4 file system of `size_mib` holding `tree`, at byte
    /// `offset` of `image` (a disk: the partition is written in place).
    #[allow(clippy::too_many_arguments)]
    pub fn make(&self, tree: &Path, image: &Path, offset: u64, size_mib: u64, uuid: &str, label: &str, epoch: u32) -> Result<(), Error> {
        let mut cmd = Command::new(&self.program);
        if let Some(l) = &self.lib_path {
            cmd.env("LD_LIBRARY_PATH", l);
        }
        cmd.args(["-t", "ext4", "-q", "-F", "-L", label, "-U", uuid])
            .arg("-E")
            .arg(format!("hash_seed={uuid},root_owner=0:0,offset={offset},nodiscard"))
            // GRUB 2.06 cannot read a file system with metadata_csum_seed.
            .args(["-O", "^metadata_csum_seed,^orphan_file", "-d"])
            .arg(tree)
            .arg(image)
            .arg(format!("{size_mib}M"))
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string());
        run(&mut cmd)
    }
}

fn mke2fs_version(program: &Path, lib_path: Option<&str>) -> Option<String> {
    let mut cmd = Command::new(program);
    cmd.arg("-V");
    if let Some(l) = lib_path {
        cmd.env("LD_LIBRARY_PATH", l);
    }
    let out = cmd.output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines().next().filter(|l| l.starts_with("mke2fs ")).map(|l| l.split(" (").next().unwrap_or(l).to_string())
}

/// `mke2fs 1.47.2` ≥ (1, 47, 1)?
fn version_at_least(version: &str, want: (u32, u32, u32)) -> bool {
    let v = version.trim_start_matches("mke2fs ");
    let mut parts = v.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let got = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    got >= want
}

/// Makes the network-boot root file system: squashfs, zstd, sorted, with
/// every time fixed to `epoch`.
pub fn squashfs(tree: &Path, out: &Path, epoch: u32) -> Result<(), Error> {
    let epoch = epoch.to_string();
    run(Command::new("nice")
        .args(["-n", "10", "mksquashfs"])
        .arg(tree)
        .arg(out)
        .args(["-noappend", "-quiet", "-no-progress", "-comp", "zstd", "-Xcompression-level", "3"])
        .args(["-mkfs-time", &epoch, "-all-time", &epoch])
        // mksquashfs refuses SOURCE_DATE_EPOCH beside -all-time.
        .env_remove("SOURCE_DATE_EPOCH"))
}

/// GRUB's boot images, made from the tree's GRUB packages.
pub struct GrubImages {
    /// `boot.img`: the MBR boot code.
    pub boot: Vec<u8>,
    /// `core.img` (i386-pc), for the BIOS boot partition.
    pub core: Vec<u8>,
    /// `BOOTX64.EFI` (x86_64-efi).
    pub efi: Vec<u8>,
}

/// Runs the tree's `grub-mkimage` (through the tree's dynamic loader and
/// libraries: nothing from the host, no chroot) for BIOS and for UEFI, with
/// an embedded configuration that finds the root file system by UUID and
/// reads `/boot/grub/grub.cfg` there.
pub fn grub_images(tree: &Path, work: &Path, root_uuid: &str) -> Result<GrubImages, Error> {
    let early = work.join("grub-early.cfg");
    let text = format!("search --no-floppy --fs-uuid --set=root {root_uuid}\nset prefix=($root)/boot/grub\n");
    std::fs::write(&early, text).map_err(|source| Error::Io { path: early.clone(), source })?;
    let loader = tree.join("lib64/ld-linux-x86-64.so.2");
    let libs = format!("{}:{}", tree.join("lib/x86_64-linux-gnu").display(), tree.join("usr/lib/x86_64-linux-gnu").display());
    let mkimage = |format: &str, dir: &str, out: &Path, extra: &[&str]| -> Result<Vec<u8>, Error> {
        let grub_dir = tree.join("usr/lib/grub").join(dir);
        if !grub_dir.is_dir() {
            return Err(Error::MissingFile { package: format!("GRUB ({dir})"), what: format!("{} in the base", grub_dir.display()) });
        }
        run(Command::new(&loader)
            .arg("--library-path")
            .arg(&libs)
            .arg(tree.join("usr/bin/grub-mkimage"))
            .args(["-O", format, "-d"])
            .arg(&grub_dir)
            .arg("-c")
            .arg(&early)
            .args(["-p", "/boot/grub", "-o"])
            .arg(out)
            .args(GRUB_MODULES)
            .args(extra))?;
        crate::read(out)
    };
    let core = mkimage("i386-pc", "i386-pc", &work.join("core.img"), &["biosdisk"])?;
    let efi = mkimage("x86_64-efi", "x86_64-efi", &work.join("BOOTX64.EFI"), &["fat", "efi_gop", "all_video"])?;
    let boot = crate::read(&tree.join("usr/lib/grub/i386-pc/boot.img"))?;
    if boot.len() != SECTOR as usize || core.len() < SECTOR as usize || core.len() as u64 > BIOS_SECTORS * SECTOR {
        return Err(Error::MissingFile { package: "grub-pc-bin".into(), what: "a 512-byte boot.img and a core.img under 1 MiB".into() });
    }
    Ok(GrubImages { boot, core, efi })
}

/// The partitions of a disk whose root file system has `root_mib` MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Sectors of the root partition.
    pub root_sectors: u64,
    /// Sectors of the whole disk (a whole number of MiB, room for the backup GPT).
    pub total_sectors: u64,
}

impl Layout {
    /// The layout for a root file system of `root_mib` MiB.
    pub fn new(root_mib: u64) -> Self {
        let root_sectors = root_mib * 2048;
        Layout { root_sectors, total_sectors: (ROOT_START + root_sectors + 34).div_ceil(2048) * 2048 }
    }

    /// Byte offset of the EFI system partition.
    pub fn esp_offset(&self) -> u64 {
        ESP_START * SECTOR
    }

    /// Byte offset of the root partition.
    pub fn root_offset(&self) -> u64 {
        ROOT_START * SECTOR
    }
}

/// Makes the raw disk at `disk`: a sparse file with the GPT (`sfdisk` on the
/// plain file), GRUB's `boot.img` in the MBR and `core.img` in the BIOS
/// boot partition. The file systems are then made in place at their
/// partitions' offsets ([`esp`], [`Mke2fs::make`]).
pub fn create(disk: &Path, layout: &Layout, ids: &DiskIds, grub: &GrubImages) -> Result<(), Error> {
    let io = |source| Error::Io { path: disk.to_path_buf(), source };
    let _ = std::fs::remove_file(disk);
    File::create(disk).and_then(|f| f.set_len(layout.total_sectors * SECTOR)).map_err(io)?;
    let table = format!(
        "label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: 2048\n\
         start={BIOS_START}, size={BIOS_SECTORS}, type=21686148-6449-6E6F-744E-656564454649, uuid={}, name=\"bios\"\n\
         start={ESP_START}, size={ESP_SECTORS}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid={}, name=\"esp\"\n\
         start={ROOT_START}, size={}, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid={}, name=\"root\"\n",
        ids.disk, ids.bios, ids.esp, layout.root_sectors, ids.root
    );
    let mut sfdisk = Command::new("sfdisk");
    sfdisk.args(["-q", "--no-reread", "--no-tell-kernel"]).arg(disk).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = crate::interrupt::spawn(&mut sfdisk)?;
    let fed = child.child().stdin.take().expect("piped").write_all(table.as_bytes());
    let out = child.wait_with_output()?;
    fed.map_err(io)?;
    if !out.status.success() {
        return Err(Error::Command {
            program: "sfdisk".into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        });
    }

    let mut f = File::options().read(true).write(true).open(disk).map_err(io)?;
    // MBR: boot.img's code (the protective MBR's partition table stays), and
    // the LBA of core.img at GRUB_BOOT_MACHINE_KERNEL_SECTOR (0x5c).
    let mut mbr = [0u8; 512];
    f.read_exact(&mut mbr).map_err(io)?;
    mbr[..440].copy_from_slice(&grub.boot[..440]);
    mbr[0x5c..0x64].copy_from_slice(&BIOS_START.to_le_bytes());
    f.seek(SeekFrom::Start(0)).and_then(|_| f.write_all(&mbr)).map_err(io)?;
    // core.img: its first sector (diskboot.img) loads the rest from the
    // blocklist at its end (start: u64 at 0x1f4), which points at the next sector.
    let mut core = grub.core.clone();
    core[0x1f4..0x1fc].copy_from_slice(&(BIOS_START + 1).to_le_bytes());
    f.seek(SeekFrom::Start(BIOS_START * SECTOR)).and_then(|_| f.write_all(&core)).map_err(io)
}

/// Makes the EFI system partition in place in `disk`: FAT32 (one sector
/// per cluster, so 64 MiB has enough clusters to be FAT32 to every reader),
/// `--invariant` (fixed serial and times), holding `/EFI/BOOT/BOOTX64.EFI`.
/// mtools stamps directories it makes with the time of day, so the tree is
/// staged with fixed times and copied whole (`mcopy -s -m` keeps them).
pub fn esp(disk: &Path, layout: &Layout, efi: &[u8], epoch: u32, work: &Path) -> Result<(), Error> {
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-s", "1", "-n", "ESP", "--invariant"])
        .arg(format!("--offset={}", layout.esp_offset() / SECTOR))
        .arg(disk)
        .arg((ESP_SECTORS * SECTOR / 1024).to_string()))?;
    let staged = work.join("esp");
    let boot = staged.join("EFI/BOOT");
    std::fs::create_dir_all(&boot).map_err(|source| Error::Io { path: boot.clone(), source })?;
    let efi_path = boot.join("BOOTX64.EFI");
    std::fs::write(&efi_path, efi).map_err(|source| Error::Io { path: efi_path.clone(), source })?;
    // FAT's times start in 1980.
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(epoch).max(315_532_800));
    for p in [efi_path, boot.clone(), staged.join("EFI")] {
        std::fs::File::open(&p).and_then(|f| f.set_modified(time)).map_err(|source| Error::Io { path: p.clone(), source })?;
    }
    // mtools addresses a partition as FILE@@OFFSET.
    let img = format!("{}@@{}", disk.display(), layout.esp_offset());
    run(Command::new("mcopy").args(["-s", "-m", "-i", &img]).arg(staged.join("EFI")).arg("::/").env("MTOOLS_SKIP_CHECK", "1"))
}

/// `qemu-img convert` the raw disk to qcow2.
pub fn convert(raw: &Path, qcow2: &Path) -> Result<(), Error> {
    run(Command::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]).arg(raw).arg(qcow2))
}

/// Copies the sparse file `from` to `to` region by region (`SEEK_DATA`,
/// `SEEK_HOLE`, `copy_file_range`): a 2 GiB raw disk holding 600 MB costs
/// 600 MB, and a file system that shares extents (XFS, btrfs) shares them.
pub fn copy_sparse(from: &Path, to: &Path) -> Result<(), Error> {
    use nix::unistd::{Whence, lseek};
    let src = File::open(from).map_err(|source| Error::Io { path: from.into(), source })?;
    let dst = File::create(to).map_err(|source| Error::Io { path: to.into(), source })?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: nix::Error| Error::Io { path, source: e.into() }
    };
    let len = src.metadata().map_err(|source| Error::Io { path: from.into(), source })?.len() as i64;
    dst.set_len(len as u64).map_err(|source| Error::Io { path: to.into(), source })?;
    let mut at = 0i64;
    while at < len {
        crate::interrupt::check()?;
        let start = match lseek(&src, at, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::Error::ENXIO) => break, // only a hole is left
            Err(e) => return Err(io(from)(e)),
        };
        let end = lseek(&src, start, Whence::SeekHole).map_err(io(from))?;
        let (mut off_in, mut off_out) = (start, start);
        while off_in < end {
            // 64 MiB at a time: a stopped build stops within one.
            crate::interrupt::check()?;
            let chunk = ((end - off_in) as usize).min(64 << 20);
            let n = match nix::fcntl::copy_file_range(&src, Some(&mut off_in), &dst, Some(&mut off_out), chunk) {
                Ok(n) => n,
                // A file system that cannot: through a buffer.
                Err(nix::Error::EXDEV | nix::Error::EOPNOTSUPP | nix::Error::ENOSYS | nix::Error::EINVAL) => {
                    copy_range(&src, &dst, off_in as u64, chunk).map_err(|source| Error::Io { path: to.into(), source })?;
                    off_in += chunk as i64;
                    off_out += chunk as i64;
                    chunk
                }
                Err(e) => return Err(Error::Io { path: format!("{} → {}", from.display(), to.display()).into(), source: e.into() }),
            };
            if n == 0 {
                return Err(Error::Io { path: from.into(), source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof) });
            }
        }
        at = end;
    }
    Ok(())
}

/// Copies `len` bytes at `offset` of `src` to the same offset of `dst`.
fn copy_range(src: &File, dst: &File, offset: u64, len: usize) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len.min(1 << 20)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len());
        src.read_exact_at(&mut buf[..n], offset + done as u64)?;
        dst.write_all_at(&buf[..n], offset + done as u64)?;
        done += n;
    }
    Ok(())
}

/// Bytes free for an unprivileged writer on the file system of `path`, and its device.
pub fn free_space(path: &Path) -> Result<(u64, u64), Error> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| Error::Io { path: path.into(), source: e.into() })?;
    let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(path).map_err(|source| Error::Io { path: path.into(), source })?);
    Ok((st.blocks_available() as u64 * st.fragment_size() as u64, dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_stable_and_well_formed() {
        let a = uuid_from("k root");
        assert_eq!(a, uuid_from("k root"));
        assert_ne!(a, uuid_from("k esp"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4", "version 4: {a}");
        assert!("89ab".contains(&a[19..20]), "variant: {a}");
        let ids = DiskIds::from_key("sha256:0");
        assert_ne!(ids.disk, ids.root);
    }

    #[test]
    fn a_sparse_copy_has_the_same_bytes_and_the_same_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from.raw"), dir.path().join("to.raw"));
        let f = File::create(&from).unwrap();
        f.set_len(1 << 30).unwrap();
        f.write_all_at(b"first data", 4096).unwrap();
        f.write_all_at(&vec![7u8; 3 << 20], 512 << 20).unwrap();
        f.write_all_at(b"last", (1 << 30) - 4).unwrap();
        drop(f);
        copy_sparse(&from, &to).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap(), "the same bytes");
        let (a, b) = (std::fs::metadata(&from).unwrap(), std::fs::metadata(&to).unwrap());
        assert_eq!(b.len(), 1 << 30);
        assert!(
            b.blocks() * 512 <= a.blocks() * 512 + (1 << 20),
            "holes kept: {} bytes allocated for {}",
            b.blocks() * 512,
            a.blocks() * 512
        );
    }

    #[test]
    fn mke2fs_versions() {
        for (v, want) in
            [("mke2fs 1.47.0", false), ("mke2fs 1.47.1", true), ("mke2fs 1.47.2", true), ("mke2fs 1.48", true), ("mke2fs 1.46.6", false)]
        {
            assert_eq!(version_at_least(v, (1, 47, 1)), want, "{v}");
        }
    }

    #[test]
    fn layout_is_whole_mebibytes_with_room_for_the_backup_gpt() {
        let l = Layout::new(2048);
        assert_eq!(l.root_sectors, 2048 * 2048);
        assert_eq!(l.total_sectors % 2048, 0);
        assert!(l.total_sectors >= ROOT_START + l.root_sectors + 33);
        assert_eq!(l.root_offset(), 135168 * 512);
    }
}
