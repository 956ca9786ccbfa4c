//! The `filesystem` collector: `statfs(2)` of every mount in the mount table
//! that node_exporter's default mount-point and fs-type excludes let through.
//!
//! Every `statfs` runs on one long-lived worker thread, fed through a
//! channel, with a time limit per call: a hung mount (a dead NFS server)
//! reports `node_filesystem_device_error 1` and fails the collector. The
//! worker stuck in that call is abandoned (it exits once the call returns)
//! and the next call starts a fresh one; the hung mount is not statted again
//! until its call returns, so a scrape never waits on it twice and threads
//! never pile up.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use super::{Collector, Error, Kind, MetricSet, Roots, read};

/// node_exporter 1.5.0's (Debian) default `--collector.filesystem.mount-points-exclude`.
pub const MOUNT_POINTS_EXCLUDE: &str = "^/(dev|proc|run|sys|mnt|media|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)";
/// node_exporter 1.5.0's default `--collector.filesystem.fs-types-exclude`.
pub const FS_TYPES_EXCLUDE: &str = "^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs|iso9660|mqueue|nsfs|overlay|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs|squashfs|sysfs|tracefs)$";

/// Whether [`MOUNT_POINTS_EXCLUDE`] matches `path` (`.` stops at a newline;
/// the pattern is anchored at the start only).
pub fn mount_point_excluded(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else { return false };
    let ends_here = |tail: &str| tail.is_empty() || tail.starts_with('/');
    if ["dev", "proc", "run", "sys", "mnt", "media"].iter().any(|w| rest.strip_prefix(w).is_some_and(ends_here)) {
        return true;
    }
    // `.+($|/)`: one or more characters of the first line, then its end (if it is the
    // end of the text) or a '/' after at least one of them.
    let any_then_end = |tail: &str| {
        let line = tail.split('\n').next().unwrap_or("");
        (!line.is_empty() && line.len() == tail.len()) || line.bytes().skip(1).any(|b| b == b'/')
    };
    ["var/lib/docker/", "var/lib/containers/storage/"].iter().any(|p| rest.strip_prefix(p).is_some_and(any_then_end))
}

/// Whether [`FS_TYPES_EXCLUDE`] matches `fs_type`.
pub fn fs_type_excluded(fs_type: &str) -> bool {
    [
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "configfs",
        "debugfs",
        "devpts",
        "devtmpfs",
        "fusectl",
        "hugetlbfs",
        "iso9660",
        "mqueue",
        "nsfs",
        "overlay",
        "proc",
        "procfs",
        "pstore",
        "rpc_pipefs",
        "securityfs",
        "selinuxfs",
        "squashfs",
        "sysfs",
        "tracefs",
    ]
    .contains(&fs_type)
}

/// `node_filesystem_*{device,fstype,mountpoint}`.
pub struct Filesystem {
    /// How long one `statfs` may take.
    pub stat_timeout: Duration,
    stuck: Arc<Mutex<HashSet<PathBuf>>>,
    worker: Mutex<Option<Worker>>,
    /// The call the worker makes: `statfs(2)`, or a stand-in in tests.
    stat: StatFn,
}

type StatFn = fn(&Path) -> Option<Usage>;

fn statfs(path: &Path) -> Option<Usage> {
    nix::sys::statfs::statfs(path).ok().map(|s| {
        let bsize = s.block_size() as f64;
        Usage {
            size: s.blocks() as f64 * bsize,
            free: s.blocks_free() as f64 * bsize,
            avail: s.blocks_available() as f64 * bsize,
            files: s.files() as f64,
            files_free: s.files_free() as f64,
        }
    })
}

/// The `statfs` thread: paths in, answers out, one call at a time.
struct Worker {
    paths: mpsc::Sender<PathBuf>,
    answers: mpsc::Receiver<Option<Usage>>,
}

impl Worker {
    fn start(stuck: Arc<Mutex<HashSet<PathBuf>>>, stat: StatFn) -> Option<Worker> {
        let (paths, jobs) = mpsc::channel::<PathBuf>();
        let (reply, answers) = mpsc::channel();
        std::thread::Builder::new()
            .name("statfs".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                // Ends when the collector drops its end (after a timeout, or with the collector).
                for path in jobs {
                    let usage = stat(&path);
                    if let Ok(mut s) = stuck.lock() {
                        s.remove(&path);
                    }
                    if reply.send(usage).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(Worker { paths, answers })
    }
}

impl Default for Filesystem {
    fn default() -> Self {
        Filesystem { stat_timeout: Duration::from_secs(2), stuck: Arc::default(), worker: Mutex::new(None), stat: statfs }
    }
}

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mount {
    /// Source device.
    pub device: String,
    /// Mount point, `\040` and `\011` decoded.
    pub mount_point: String,
    /// Filesystem type.
    pub fs_type: String,
    /// Mount options.
    pub options: String,
}

/// Parses a mount table (`/proc/1/mounts` format).
pub fn parse_mounts(path: &Path, text: &str) -> Result<Vec<Mount>, Error> {
    Ok(mount_lines(path, text)?
        .map(|m| Mount {
            device: m.device.to_string(),
            mount_point: m.mount_point.into_owned(),
            fs_type: m.fs_type.to_string(),
            options: m.options.to_string(),
        })
        .collect())
}

/// One line of the mount table, borrowed from its text.
struct MountLine<'a> {
    device: &'a str,
    mount_point: Cow<'a, str>,
    fs_type: &'a str,
    options: &'a str,
}

/// The lines of a mount table, once every line is known to be well formed.
fn mount_lines<'a>(path: &Path, text: &'a str) -> Result<impl Iterator<Item = MountLine<'a>>, Error> {
    let lines = || text.lines().filter(|l| !l.trim().is_empty());
    if let Some(line) = lines().find(|l| l.split(' ').nth(3).is_none()) {
        return Err(Error::parse(path, format!("malformed mount point information: {line:?}")));
    }
    Ok(lines().filter_map(|line| {
        let mut f = line.split(' ');
        let (device, mount_point, fs_type, options) = (f.next()?, f.next()?, f.next()?, f.next()?);
        let mount_point = if mount_point.contains('\\') {
            Cow::Owned(mount_point.replace("\\040", " ").replace("\\011", "\t"))
        } else {
            Cow::Borrowed(mount_point)
        };
        Some(MountLine { device, mount_point, fs_type, options })
    }))
}

struct Usage {
    size: f64,
    free: f64,
    avail: f64,
    files: f64,
    files_free: f64,
}

enum Stat {
    Usage(Usage),
    Failed,
    /// No answer in time, now or in an earlier scrape.
    Hung,
}

impl Filesystem {
    /// `statfs` on the worker thread, waiting at most `stat_timeout`.
    fn statfs(&self, path: PathBuf) -> Stat {
        if !self.stuck.lock().map(|mut s| s.insert(path.clone())).unwrap_or(false) {
            return Stat::Hung; // an earlier call on this mount has not returned
        }
        let Ok(mut worker) = self.worker.lock() else { return Stat::Failed };
        if worker.is_none() {
            *worker = Worker::start(Arc::clone(&self.stuck), self.stat);
        }
        let Some(w) = worker.as_ref() else {
            self.unmark(&path);
            return Stat::Failed;
        };
        if w.paths.send(path.clone()).is_err() {
            // The thread is gone (it panicked): start another next time.
            *worker = None;
            self.unmark(&path);
            return Stat::Failed;
        }
        match w.answers.recv_timeout(self.stat_timeout) {
            Ok(Some(u)) => Stat::Usage(u),
            Ok(None) => Stat::Failed,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Abandon the thread stuck in this call; the path stays marked until it returns.
                *worker = None;
                Stat::Hung
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                *worker = None;
                self.unmark(&path);
                Stat::Failed
            }
        }
    }

    fn unmark(&self, path: &Path) {
        if let Ok(mut s) = self.stuck.lock() {
            s.remove(path);
        }
    }
}

impl Collector for Filesystem {
    fn name(&self) -> &'static str {
        "filesystem"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let (path, text) = match &roots.mounts {
            Some(p) => (p.clone(), read(p)?),
            None => {
                let first = roots.proc.join("1/mounts");
                match read(&first) {
                    Ok(t) => (first, t),
                    Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                        let p = roots.proc.join("mounts");
                        let t = read(&p)?;
                        (p, t)
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        let mounts = mount_lines(&path, &text)?;
        let mut seen = HashSet::new();
        let mut timed_out = Vec::new();
        for m in mounts {
            if mount_point_excluded(&m.mount_point) || fs_type_excluded(m.fs_type) {
                continue;
            }
            if !seen.insert((m.device, m.mount_point.clone(), m.fs_type)) {
                continue;
            }
            let labels = [("device", m.device), ("fstype", m.fs_type), ("mountpoint", m.mount_point.as_ref())];
            let target = roots.rootfs.join(m.mount_point.trim_start_matches('/'));
            let usage = match self.statfs(target) {
                Stat::Usage(u) => Some(u),
                Stat::Failed => None,
                Stat::Hung => {
                    timed_out.push(m.mount_point.to_string());
                    None
                }
            };
            out.add(
                "node_filesystem_device_error",
                "Whether an error occurred while getting statistics for the given device.",
                Kind::Gauge,
                &labels,
                if usage.is_some() { 0.0 } else { 1.0 },
            );
            let Some(u) = usage else { continue };
            let ro = if m.options.split(',').any(|o| o == "ro") { 1.0 } else { 0.0 };
            for (name, help, v) in [
                ("node_filesystem_size_bytes", "Filesystem size in bytes.", u.size),
                ("node_filesystem_free_bytes", "Filesystem free space in bytes.", u.free),
                ("node_filesystem_avail_bytes", "Filesystem space available to non-root users in bytes.", u.avail),
                ("node_filesystem_files", "Filesystem total file nodes.", u.files),
                ("node_filesystem_files_free", "Filesystem total free file nodes.", u.files_free),
                ("node_filesystem_readonly", "Filesystem read-only status.", ro),
            ] {
                out.add(name, help, Kind::Gauge, &labels, v);
            }
        }
        if !timed_out.is_empty() {
            return Err(Error::parse(&path, format!("statfs did not answer within {:?} for {}", self.stat_timeout, timed_out.join(", "))));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_and_escapes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data dir")).unwrap();
        let mounts = "/dev/vda / ext4 rw,relatime 0 0\nproc /proc proc rw 0 0\ntmpfs /run tmpfs rw 0 0\n/dev/vdb /data\\040dir ext4 ro 0 0\n\
                      /dev/vdb /data\\040dir ext4 ro 0 0\noverlay /srv overlay rw 0 0\n/dev/vdc /gone xfs rw 0 0\n";
        std::fs::write(dir.path().join("mounts"), mounts).unwrap();
        let roots = Roots { rootfs: dir.path().into(), mounts: Some(dir.path().join("mounts")), ..Roots::default() };
        let mut set = MetricSet::default();
        Filesystem::default().collect(&roots, &mut set).unwrap();
        let data = [("device", "/dev/vdb"), ("fstype", "ext4"), ("mountpoint", "/data dir")];
        assert_eq!(set.value("node_filesystem_readonly", &data), Some(1.0), "ro option, escaped mount point");
        assert!(set.value("node_filesystem_size_bytes", &data).unwrap() > 0.0, "statted below rootfs");
        let gone = [("device", "/dev/vdc"), ("fstype", "xfs"), ("mountpoint", "/gone")];
        assert_eq!(set.value("node_filesystem_device_error", &gone), Some(1.0), "missing mount point");
        assert_eq!(set.value("node_filesystem_size_bytes", &gone), None, "no usage for a failed mount");
        let text = crate::metrics::encode::encode(&mut set, crate::metrics::Format::Text);
        let points: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("node_filesystem_device_error{"))
            .filter_map(|l| l.split("mountpoint=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(points, ["/", "/data dir", "/gone"], "excluded /proc, /run, overlay; duplicate once");
    }

    /// Stands in for `statfs`: paths ending in `hang` take 300 ms.
    fn slow_stat(path: &Path) -> Option<Usage> {
        if path.ends_with("hang") {
            std::thread::sleep(Duration::from_millis(300));
        }
        Some(Usage { size: 1.0, free: 1.0, avail: 1.0, files: 1.0, files_free: 1.0 })
    }

    #[test]
    fn hung_statfs_is_not_waited_on_twice() {
        let fs = Filesystem { stat_timeout: Duration::from_millis(50), stat: slow_stat, ..Filesystem::default() };
        let (hang, ok) = (PathBuf::from("/hang"), PathBuf::from("/ok"));
        for (case, path, want_usage) in [
            ("healthy mount, first worker", &ok, true),
            ("mount that hangs: time limit", &hang, false),
            ("same mount while its call runs: at once", &hang, false),
            ("healthy mount, fresh worker", &ok, true),
        ] {
            let begin = std::time::Instant::now();
            let got = fs.statfs(path.clone());
            assert_eq!(matches!(got, Stat::Usage(_)), want_usage, "{case}");
            let limit = if case.ends_with("time limit") { Duration::from_millis(250) } else { Duration::from_millis(40) };
            assert!(begin.elapsed() < limit, "{case}: took {:?}", begin.elapsed());
        }
        std::thread::sleep(Duration::from_millis(400));
        assert!(!fs.stuck.lock().unwrap().contains(&hang), "unmarked once the hung call returned");
        let begin = std::time::Instant::now();
        assert!(matches!(fs.statfs(hang), Stat::Hung), "tried again, and hangs again");
        assert!(begin.elapsed() >= Duration::from_millis(50), "tried again: waited the limit, took {:?}", begin.elapsed());
    }

    #[test]
    fn malformed_table() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mounts"), "/dev/vda /\n").unwrap();
        let roots = Roots { mounts: Some(dir.path().join("mounts")), ..Roots::default() };
        assert!(Filesystem::default().collect(&roots, &mut MetricSet::default()).is_err(), "short mount line");
    }
}
