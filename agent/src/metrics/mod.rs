//! Node metrics in node_exporter's language: the same metric names, labels,
//! types, HELP text and units as `prometheus-node-exporter` 1.5.0 prints, for
//! the collectors that read `/proc` and `/sys` and mean something in a VM.
//!
//! A scrape runs every enabled [`Collector`] on a blocking thread with its own
//! time limit ([`Exporter::scrape`]); a collector that fails, times out or is
//! still stuck in a previous scrape reports `node_scrape_collector_success 0`
//! and the others still answer. [`encode`] writes the result in the text
//! format 0.0.4 or in OpenMetrics; [`serve`] answers `GET /metrics`.
//!
//! Every host path comes from [`Roots`]: the library never reads `/proc` on
//! its own, so tests point it at the fixture tree in `agent/tests/fixtures`.
//!
//! To add a collector: write a type implementing [`Collector`] in the module
//! where its data lives (or a new one), emit samples with
//! [`MetricSet::add`] using node_exporter's exact name and HELP, and list it
//! in [`all`] and [`NAMES`].

pub mod cpu;
pub mod diskstats;
pub mod encode;
pub mod filesystem;
pub mod kernel;
pub mod memory;
pub mod netdev;
pub mod netstat;
pub mod serve;
pub mod system;
pub mod textfile;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use encode::{Format, Kind, MetricSet};

/// Host paths the collectors read. The binary fills in `/proc`, `/sys`, `/`.
#[derive(Debug, Clone)]
pub struct Roots {
    /// procfs, normally `/proc`.
    pub proc: PathBuf,
    /// sysfs, normally `/sys`.
    pub sys: PathBuf,
    /// Where the host's root filesystem is (`/`): mount points are statted
    /// below it and `etc/os-release`, `etc/localtime` read from it.
    pub rootfs: PathBuf,
    /// The mount table; `None` means `proc/1/mounts`, else `proc/mounts`, as node_exporter.
    pub mounts: Option<PathBuf>,
    /// udev's database (`/run/udev/data`), for `node_disk_info`'s labels.
    pub udev_data: PathBuf,
    /// The textfile collector's directory of `*.prom` files; `None` disables it.
    pub textfile_dir: Option<PathBuf>,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            proc: "/proc".into(),
            sys: "/sys".into(),
            rootfs: "/".into(),
            mounts: None,
            udev_data: "/run/udev/data".into(),
            textfile_dir: Some("/var/lib/prometheus/node-exporter".into()),
        }
    }
}

/// A collector could not produce its metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{path}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file did not hold what it should.
    #[error("{path}: {reason}")]
    Parse {
        /// The path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The collector did not finish within its time limit.
    #[error("collector {collector}: no answer within {limit:?}")]
    Timeout {
        /// The collector.
        collector: &'static str,
        /// Its time limit.
        limit: Duration,
    },
    /// The collector is still running from an earlier scrape.
    #[error("collector {collector}: still running from an earlier scrape")]
    Stuck {
        /// The collector.
        collector: &'static str,
    },
}

impl Error {
    pub(crate) fn parse(path: &Path, reason: impl Into<String>) -> Self {
        Error::Parse { path: path.display().to_string(), reason: reason.into() }
    }
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.display().to_string(), source }
    }
}

/// Reads a whole small file (procfs, sysfs). Opened non-blocking, so a FIFO
/// put where a file should be reads as empty instead of hanging.
pub(crate) fn read(path: &Path) -> Result<String, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    // `read` until it returns 0, rather than `read_to_end`: that first asks
    // for the size (statx, lseek), which procfs and sysfs do not know anyway.
    let mut bytes = vec![0; 4096];
    let mut len = 0;
    loop {
        if len == bytes.len() {
            bytes.resize(len * 2, 0);
        }
        match file.read(&mut bytes[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    bytes.truncate(len);
    String::from_utf8(bytes).map_err(|_| Error::parse(path, "not UTF-8"))
}

/// Parses a decimal number as Go's `strconv.ParseFloat` would for the values
/// the kernel prints.
pub(crate) fn float(path: &Path, what: &str, text: &str) -> Result<f64, Error> {
    text.parse::<f64>().map_err(|_| Error::parse(path, format!("{what}: not a number: {text:?}")))
}

/// One source of metrics, named as node_exporter's `--collector.NAME`.
pub trait Collector: Send + Sync {
    /// node_exporter's name for it, the `collector` label of the scrape metrics.
    fn name(&self) -> &'static str;
    /// Adds this collector's samples to `out`. Samples added before an error
    /// are kept (as node_exporter does); the error sets success to 0.
    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error>;
}

/// Every collector kiln has, in node_exporter's names.
pub const NAMES: &[&str] = &[
    "conntrack",
    "cpu",
    "diskstats",
    "entropy",
    "filefd",
    "filesystem",
    "loadavg",
    "meminfo",
    "netclass",
    "netdev",
    "netstat",
    "os",
    "pressure",
    "sockstat",
    "stat",
    "textfile",
    "time",
    "uname",
    "vmstat",
];

/// The collectors named in `names` (all of [`NAMES`] when `None`), with
/// node_exporter's default settings. An unknown name is returned as the error.
pub fn collectors(names: Option<&[String]>) -> Result<Vec<Arc<dyn Collector>>, String> {
    let wanted: Vec<&str> = match names {
        Some(n) => n.iter().map(String::as_str).collect(),
        None => NAMES.to_vec(),
    };
    wanted.into_iter().map(|n| by_name(n).ok_or_else(|| n.to_string())).collect()
}

/// Every collector, with node_exporter's default settings.
pub fn all() -> Vec<Arc<dyn Collector>> {
    NAMES.iter().filter_map(|n| by_name(n)).collect()
}

fn by_name(name: &str) -> Option<Arc<dyn Collector>> {
    Some(match name {
        "conntrack" => Arc::new(kernel::Conntrack),
        "cpu" => Arc::new(cpu::Cpu),
        "diskstats" => Arc::new(diskstats::Diskstats::default()),
        "entropy" => Arc::new(kernel::Entropy),
        "filefd" => Arc::new(kernel::Filefd),
        "filesystem" => Arc::new(filesystem::Filesystem::default()),
        "loadavg" => Arc::new(kernel::Loadavg),
        "meminfo" => Arc::new(memory::Meminfo),
        "netclass" => Arc::new(netdev::Netclass::default()),
        "netdev" => Arc::new(netdev::Netdev::default()),
        "netstat" => Arc::new(netstat::Netstat::default()),
        "os" => Arc::new(system::Os),
        "pressure" => Arc::new(kernel::Pressure),
        "sockstat" => Arc::new(netstat::Sockstat),
        "stat" => Arc::new(cpu::Stat),
        "textfile" => Arc::new(textfile::Textfile),
        "time" => Arc::new(system::Time),
        "uname" => Arc::new(system::Uname),
        "vmstat" => Arc::new(memory::Vmstat::default()),
        _ => return None,
    })
}

/// How scrapes run.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long one collector may take before it reports success 0.
    pub collector: Duration,
    /// How many scrapes may run at once; more wait for a slot.
    pub concurrent_scrapes: usize,
    /// How long a scrape waits for a slot before it is refused.
    pub queue: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { collector: Duration::from_secs(5), concurrent_scrapes: 4, queue: Duration::from_secs(10) }
    }
}

struct Slot {
    collector: Arc<dyn Collector>,
    /// Set while this collector runs; a hung collector holds one thread,
    /// never one per scrape.
    running: Arc<AtomicBool>,
}

/// Runs the collectors for each scrape, within [`Limits`].
pub struct Exporter {
    roots: Arc<Roots>,
    slots: Vec<Slot>,
    limits: Limits,
    scrapes: tokio::sync::Semaphore,
}

/// Too many scrapes were already running and none finished in time.
#[derive(Debug, thiserror::Error)]
#[error("{0} scrapes already running")]
pub struct Busy(usize);

impl Exporter {
    /// An exporter reading `roots` with `collectors`.
    pub fn new(roots: Roots, collectors: Vec<Arc<dyn Collector>>, limits: Limits) -> Self {
        let slots = collectors.into_iter().map(|collector| Slot { collector, running: Arc::new(AtomicBool::new(false)) }).collect();
        let scrapes = tokio::sync::Semaphore::new(limits.concurrent_scrapes.max(1));
        Exporter { roots: Arc::new(roots), slots, limits, scrapes }
    }

    /// The names of the collectors this exporter runs.
    pub fn collector_names(&self) -> Vec<&'static str> {
        self.slots.iter().map(|s| s.collector.name()).collect()
    }

    /// One scrape. The collectors run one after another on a blocking
    /// thread; each gets the collector time limit from when it starts. One
    /// that overruns it reports success 0, is left to finish on that thread
    /// (and reports success 0 at once while it has not), and the rest go on
    /// on a fresh thread. A normal scrape costs one thread hand-off.
    pub async fn scrape(&self) -> Result<MetricSet, Busy> {
        let _permit = match tokio::time::timeout(self.limits.queue, self.scrapes.acquire()).await {
            Ok(Ok(permit)) => permit,
            _ => return Err(Busy(self.limits.concurrent_scrapes)),
        };
        let n = self.slots.len();
        let mut outcomes: Vec<(Duration, Result<(), Error>)> = Vec::with_capacity(n);
        outcomes.resize_with(n, || (Duration::ZERO, Ok(())));
        let mut set = MetricSet::default();
        let mut pending: std::collections::VecDeque<usize> = (0..n).collect();
        while !pending.is_empty() {
            // Still running from an earlier scrape: no second thread for it.
            while let Some(&i) = pending.front() {
                if !self.slots[i].running.load(Ordering::Acquire) {
                    break;
                }
                outcomes[i].1 = Err(Error::Stuck { collector: self.slots[i].collector.name() });
                pending.pop_front();
            }
            if pending.is_empty() {
                break;
            }
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let cancel = Arc::new(AtomicBool::new(false));
            let work: Vec<(usize, Arc<dyn Collector>, Arc<AtomicBool>)> =
                pending.iter().map(|&i| (i, Arc::clone(&self.slots[i].collector), Arc::clone(&self.slots[i].running))).collect();
            let roots = Arc::clone(&self.roots);
            let stop = Arc::clone(&cancel);
            tokio::task::spawn_blocking(move || {
                for (i, collector, running) in work {
                    if stop.load(Ordering::Acquire) || running.swap(true, Ordering::AcqRel) {
                        break;
                    }
                    let begin = Instant::now();
                    let mut out = MetricSet::default();
                    let result = collector.collect(&roots, &mut out);
                    running.store(false, Ordering::Release);
                    if tx.send((i, out, result, begin.elapsed())).is_err() {
                        break;
                    }
                }
            });
            while let Some(&next) = pending.front() {
                let name = self.slots[next].collector.name();
                match tokio::time::timeout(self.limits.collector, rx.recv()).await {
                    Ok(Some((i, out, result, took))) if i == next => {
                        set.merge(out);
                        outcomes[i] = (took, result);
                        pending.pop_front();
                    }
                    Ok(_) => {
                        // The thread ended early (a panic in `next`, or it
                        // found `next` still running): count it failed, go on.
                        outcomes[next].1 = Err(Error::Stuck { collector: name });
                        pending.pop_front();
                        break;
                    }
                    Err(_) => {
                        cancel.store(true, Ordering::Release);
                        outcomes[next] = (self.limits.collector, Err(Error::Timeout { collector: name, limit: self.limits.collector }));
                        pending.pop_front();
                        break;
                    }
                }
            }
        }
        let outcomes: Vec<(&'static str, Duration, bool)> = self
            .slots
            .iter()
            .zip(outcomes)
            .map(|(slot, (took, result))| {
                if let Err(e) = &result {
                    log::debug!("collector {} failed: {}", slot.collector.name(), crate::register::chain(e));
                }
                (slot.collector.name(), took, result.is_ok())
            })
            .collect();
        for (name, duration, ok) in outcomes {
            set.add(
                "node_scrape_collector_duration_seconds",
                "node_exporter: Duration of a collector scrape.",
                Kind::Gauge,
                &[("collector", name)],
                duration.as_secs_f64(),
            );
            set.add(
                "node_scrape_collector_success",
                "node_exporter: Whether a collector succeeded.",
                Kind::Gauge,
                &[("collector", name)],
                if ok { 1.0 } else { 0.0 },
            );
        }
        Ok(set)
    }
}
