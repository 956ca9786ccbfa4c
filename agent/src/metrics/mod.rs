//! Node metrics in node_exporter's language: the same metric names, labels,
//! types, HELP text and units as `prometheus-node-exporter` 1.5.0 prints, for
//! the collectors that read `/proc` and `/sys` and mean something in a VM.
//!
//! A scrape runs the enabled [`Collector`]s on two threads at once, each
//! collector with its own time limit ([`Exporter::scrape_blocking`]); a
//! collector that fails, times out or is still stuck in a previous scrape
//! reports `node_scrape_collector_success 0` and the others still answer.
//! [`encode`] writes the result in the text format 0.0.4 or in OpenMetrics;
//! [`serve`] answers `GET /metrics`.
//!
//! Every host path comes from [`Roots`]: the library never reads `/proc` on
//! its own, so tests point it at the fixture tree in `agent/tests/fixtures`
//! (netclass asks the kernel over rtnetlink only when `sys` is the live `/sys`,
//! and the files of `proc/net` are opened relative to `/proc/self/net` only
//! when `proc` is the live `/proc`).
//!
//! Cost per scrape matters (the agent runs on every node): files are read
//! into per-thread buffers that are reused (most in one `read`), and samples
//! go into reused [`MetricSet`]s, so a scrape allocates next to nothing.
//!
//! To add a collector: write a type implementing [`Collector`] in the module
//! where its data lives (or a new one), emit samples with
//! [`MetricSet::add`] using node_exporter's exact name and HELP
//! ([`MetricSet::add_dynamic`] for names built at run time), read files with
//! `read`, and list it in [`all`] and [`NAMES`].

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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, mpsc};
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

/// A byte buffer from this thread's pool, back into it when dropped: the
/// collector threads read every file of every scrape (and the netlink dump)
/// without allocating or zeroing memory again.
pub(crate) struct Buffer(pub(crate) Vec<u8>);

impl Buffer {
    /// A buffer of at least `len` bytes (its contents are left over from earlier use).
    pub(crate) fn take(len: usize) -> Buffer {
        let pooled = BUFFERS.try_with(|pool| pool.try_borrow_mut().ok().and_then(|mut p| p.pop())).ok().flatten();
        let mut buf = pooled.unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        Buffer(buf)
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if !buf.is_empty() && buf.len() <= KEEP_BUFFER {
            let _ = BUFFERS.try_with(|pool| {
                if let Ok(mut pool) = pool.try_borrow_mut()
                    && pool.len() < KEEP_BUFFERS
                {
                    pool.push(buf);
                }
            });
        }
    }
}

/// A file's text as [`read`] read it, in a [`Buffer`].
pub(crate) struct Text {
    buf: Buffer,
    len: usize,
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        // Checked by `read` already; checking again costs less than a copy.
        std::str::from_utf8(&self.buf.0[..self.len]).unwrap_or_default()
    }
}

/// A read buffer's first size (doubled while a file fills it): the largest
/// file on a small VM, `net/netstat`, is about 4 KiB.
pub(crate) const BUFFER: usize = 8 * 1024;
/// Buffers kept per thread (netstat holds three files at once), and the largest kept.
const KEEP_BUFFERS: usize = 4;
const KEEP_BUFFER: usize = 256 * 1024;

thread_local! {
    /// Read buffers, zeroed once when made and then reused as they are.
    static BUFFERS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads a whole small file (procfs, sysfs). Opened non-blocking, so a FIFO
/// put where a file should be reads as empty instead of hanging.
pub(crate) fn read(path: &Path) -> Result<Text, Error> {
    read_file(open(path)?, path, false)
}

/// Reads a whole file as [`read`], but on until `read` returns nothing: for
/// files on any filesystem (the textfile collector's), where one that serves
/// reads short (FUSE with direct I/O) could otherwise look cut off.
pub(crate) fn read_to_end(path: &Path) -> Result<Text, Error> {
    read_file(open(path)?, path, true)
}

fn open(path: &Path) -> Result<std::fs::File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits()).open(path).map_err(|e| Error::io(path, e))
}

/// This process's `/proc/self/net`, opened once (`None` if it cannot be).
static PROC_NET: std::sync::OnceLock<Option<std::os::fd::OwnedFd>> = std::sync::OnceLock::new();

/// Reads `path`, the file `name` of `net/` below the proc root, as [`read`].
/// On the live `/proc` it is opened relative to `/proc/self/net` (opened
/// once): the kernel then does not walk `/proc`, the `net` and `self` links
/// and the process's directory again for each of these seven files a scrape.
pub(crate) fn read_net(roots: &Roots, path: &Path, name: &str) -> Result<Text, Error> {
    use nix::fcntl::OFlag;
    if roots.proc == Path::new("/proc")
        && let Some(dir) = PROC_NET
            .get_or_init(|| {
                nix::fcntl::open("/proc/self/net", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty())
                    .ok()
            })
            .as_ref()
    {
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::openat(dir, name, flags, nix::sys::stat::Mode::empty()).map_err(|e| Error::io(path, e.into()))?;
        return read_file(std::fs::File::from(fd), path, false);
    }
    read(path)
}

/// The whole text of `file`, opened from `path`; `to_end`: read until `read`
/// returns nothing even after a short read.
fn read_file(mut file: std::fs::File, path: &Path, to_end: bool) -> Result<Text, Error> {
    let mut text = Text { buf: Buffer::take(BUFFER), len: 0 };
    // `read` rather than `read_to_end`: that first asks for the size (statx,
    // lseek), which procfs and sysfs do not know anyway. A read that does not
    // fill the buffer has the whole file: procfs (seq_file, sysctl) and sysfs
    // answer as much as is asked, regular files all up to their end; so most
    // files take one read, not a second one that returns nothing.
    loop {
        let buf = &mut text.buf.0;
        if text.len == buf.len() {
            buf.resize(text.len * 2, 0);
        }
        match file.read(&mut buf[text.len..]) {
            Ok(0) => break,
            Ok(n) => {
                text.len += n;
                if text.len < buf.len() && !to_end {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    if std::str::from_utf8(&text.buf.0[..text.len]).is_err() {
        return Err(Error::parse(path, "not UTF-8"));
    }
    Ok(text)
}

/// Parses a decimal number as Go's `strconv.ParseFloat` would for the values
/// the kernel prints.
pub(crate) fn float(path: &Path, what: &str, text: &str) -> Result<f64, Error> {
    // Most are counters of up to 15 digits: exact in an f64, no float parsing needed.
    if !text.is_empty() && text.len() <= 15 && text.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(text.bytes().fold(0u64, |n, b| n * 10 + u64::from(b - b'0')) as f64);
    }
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

/// A collector name that is none of [`NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown collector {0:?}; known: {known}", known = NAMES.join(","))]
pub struct UnknownCollector(pub String);

/// The collectors named in `names` (all of [`NAMES`] when `None`), with
/// node_exporter's default settings.
pub fn collectors(names: Option<&[String]>) -> Result<Vec<Arc<dyn Collector>>, UnknownCollector> {
    let wanted: Vec<&str> = match names {
        Some(n) => n.iter().map(String::as_str).collect(),
        None => NAMES.to_vec(),
    };
    wanted.into_iter().map(|n| by_name(n).ok_or_else(|| UnknownCollector(n.to_string()))).collect()
}

/// Every collector, with node_exporter's default settings.
pub fn all() -> Vec<Arc<dyn Collector>> {
    NAMES.iter().filter_map(|n| by_name(n)).collect()
}

fn by_name(name: &str) -> Option<Arc<dyn Collector>> {
    Some(match name {
        "conntrack" => Arc::new(kernel::Conntrack),
        "cpu" => Arc::new(cpu::Cpu),
        "diskstats" => Arc::new(diskstats::Diskstats),
        "entropy" => Arc::new(kernel::Entropy),
        "filefd" => Arc::new(kernel::Filefd),
        "filesystem" => Arc::new(filesystem::Filesystem::default()),
        "loadavg" => Arc::new(kernel::Loadavg),
        "meminfo" => Arc::new(memory::Meminfo),
        "netclass" => Arc::new(netdev::Netclass),
        "netdev" => Arc::new(netdev::Netdev),
        "netstat" => Arc::new(netstat::Netstat),
        "os" => Arc::new(system::Os),
        "pressure" => Arc::new(kernel::Pressure),
        "sockstat" => Arc::new(netstat::Sockstat),
        "stat" => Arc::new(cpu::Stat),
        "textfile" => Arc::new(textfile::Textfile),
        "time" => Arc::new(system::Time::default()),
        "uname" => Arc::new(system::Uname),
        "vmstat" => Arc::new(memory::Vmstat),
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
    /// How long it took last time, in µs: the next scrape balances its lanes by it.
    last_micros: AtomicU64,
}

/// Scrapes run their collectors on this many threads at once.
const LANES: usize = 2;

/// Runs the collectors for each scrape, within [`Limits`].
pub struct Exporter {
    roots: Arc<Roots>,
    slots: Arc<Vec<Slot>>,
    limits: Limits,
    scrapes: Gate,
    workers: Arc<Workers>,
    /// Sets handed back by [`Exporter::recycle`]: the next scrape fills one
    /// without growing it again.
    spare: Mutex<Vec<MetricSet>>,
}

/// Too many scrapes were already running and none finished in time.
#[derive(Debug, thiserror::Error)]
#[error("{0} scrapes already running")]
pub struct Busy(usize);

/// Counts the scrapes running; a new one waits up to the queue limit for a place.
struct Gate {
    running: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

impl Gate {
    fn enter(&self, within: Duration) -> Option<GatePass<'_>> {
        let guard = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut running, _) = self.freed.wait_timeout_while(guard, within, |n| *n >= self.max).unwrap_or_else(PoisonError::into_inner);
        if *running >= self.max {
            return None;
        }
        *running += 1;
        Some(GatePass(self))
    }
}

struct GatePass<'g>(&'g Gate);

impl Drop for GatePass<'_> {
    fn drop(&mut self) {
        *self.0.running.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
        self.0.freed.notify_one();
    }
}

/// A lane's work; it returns the lane's end marker, dropped only after the
/// thread is idle again, so that the next scrape finds it idle.
type Job = Box<dyn FnOnce() -> LaneEnd + Send>;

/// Threads that run collectors, kept a minute after their last job so that
/// scrapes every 15 s reuse them; a new one starts when none is idle (also
/// when one is stuck in a hung collector).
struct Workers {
    /// Idle threads: an id and where to send the next job.
    idle: Mutex<Vec<(u64, mpsc::Sender<Job>)>>,
    next_id: AtomicU64,
}

/// How long an idle collector thread waits for work before it ends.
const WORKER_KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Stack of a collector thread: the collectors keep their data on the heap.
const WORKER_STACK: usize = 256 * 1024;

impl Workers {
    fn run(self: &Arc<Self>, mut job: Job) {
        loop {
            let next = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let Some((_, tx)) = next else { break };
            match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(j)) => job = j,
            }
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let _ = tx.send(job);
        let workers = Arc::clone(self);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // If no thread can start the job is dropped, which ends its lane.
        let _ = std::thread::Builder::new().name("collector".into()).stack_size(WORKER_STACK).spawn(move || {
            loop {
                match rx.recv_timeout(WORKER_KEEP_ALIVE) {
                    Ok(job) => {
                        let end = job();
                        workers.idle.lock().unwrap_or_else(PoisonError::into_inner).push((id, tx.clone()));
                        drop(end);
                    }
                    Err(_) => {
                        let mut idle = workers.idle.lock().unwrap_or_else(PoisonError::into_inner);
                        // Not in the idle list: a job is on its way, take it.
                        if let Some(at) = idle.iter().position(|(t, _)| *t == id) {
                            idle.swap_remove(at);
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Each collector's duration and result in one scrape, and whether it has
/// reported yet.
struct Outcomes {
    results: Vec<(Duration, Result<(), Error>)>,
    reported: Vec<bool>,
}

impl Outcomes {
    fn new(n: usize) -> Self {
        let mut results = Vec::with_capacity(n);
        results.resize_with(n, || (Duration::ZERO, Ok(())));
        Outcomes { results, reported: vec![false; n] }
    }

    /// Collector `i` took `took` and ended with `result`.
    fn report(&mut self, i: usize, took: Duration, result: Result<(), Error>) {
        self.results[i] = (took, result);
        self.reported[i] = true;
    }
}

/// What a scrape waits for next.
enum Wait {
    /// Lane `.0`'s collector `.1` is past its limit.
    Overdue(usize, usize),
    /// Every lane has finished or been abandoned.
    Done,
    /// Lanes are running; the earliest deadline among their collectors.
    Until(Option<Instant>),
}

/// One scrape's progress, shared by the scraping thread and its lanes.
struct Progress {
    /// The samples of the collectors that have finished.
    set: MetricSet,
    /// Collector index, result and duration, as they finish.
    done: Vec<(usize, Result<(), Error>, Duration)>,
    lanes: Vec<LaneState>,
}

#[derive(Default)]
struct LaneState {
    /// The collector running and since when.
    current: Option<(usize, Instant)>,
    /// The lane's thread has returned (or its job was dropped).
    finished: bool,
    /// The scrape gave up on this lane: it must not report anything more.
    abandoned: bool,
    /// The collectors it runs, in order.
    work: Vec<usize>,
}

struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
}

/// Marks a lane finished when its job ends, also by a panic or by being dropped unrun.
struct LaneEnd {
    shared: Arc<Shared>,
    slots: Arc<Vec<Slot>>,
    lane: usize,
}

impl Drop for LaneEnd {
    fn drop(&mut self) {
        let mut p = self.shared.progress.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut p.lanes[self.lane];
        // A panic inside a collector: it does not run any more.
        if let Some((i, _)) = state.current.take() {
            self.slots[i].running.store(false, Ordering::Release);
        }
        state.finished = true;
        // The scrape wakes for the last lane only (or at a lane's deadline): one hand-off back.
        let last = p.lanes.iter().all(|l| l.finished || l.abandoned);
        drop(p);
        if last {
            self.shared.changed.notify_all();
        }
    }
}

impl Exporter {
    /// An exporter reading `roots` with `collectors`.
    pub fn new(roots: Roots, collectors: Vec<Arc<dyn Collector>>, limits: Limits) -> Self {
        let slots = collectors
            .into_iter()
            .map(|collector| Slot { collector, running: Arc::new(AtomicBool::new(false)), last_micros: AtomicU64::new(0) })
            .collect();
        let scrapes = Gate { running: Mutex::new(0), freed: Condvar::new(), max: limits.concurrent_scrapes.max(1) };
        Exporter {
            roots: Arc::new(roots),
            slots: Arc::new(slots),
            limits,
            scrapes,
            workers: Arc::new(Workers { idle: Mutex::new(Vec::new()), next_id: AtomicU64::new(0) }),
            spare: Mutex::new(Vec::new()),
        }
    }

    /// Takes back a scrape's set once it is encoded, for a later scrape to reuse.
    pub fn recycle(&self, mut set: MetricSet) {
        set.clear();
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.len() < 2 {
            spare.push(set);
        }
    }

    /// The names of the collectors this exporter runs.
    pub fn collector_names(&self) -> Vec<&'static str> {
        self.slots.iter().map(|s| s.collector.name()).collect()
    }

    /// One scrape, as [`Exporter::scrape_blocking`]; it blocks the calling
    /// task's thread while the collectors run.
    pub async fn scrape(&self) -> Result<MetricSet, Busy> {
        self.scrape_blocking()
    }

    /// One scrape. The collectors run on two threads at once, split by
    /// how long each took last time, one after another within a lane; each
    /// gets the collector time limit from when it starts. One that overruns
    /// it reports success 0 and is left to finish on its thread (and reports
    /// success 0 at once while it has not); the rest of its lane goes on on
    /// another thread. A collector still running from an earlier scrape
    /// reports success 0 without a second thread for it.
    pub fn scrape_blocking(&self) -> Result<MetricSet, Busy> {
        let Some(_pass) = self.scrapes.enter(self.limits.queue) else {
            return Err(Busy(self.limits.concurrent_scrapes));
        };
        let mut outcomes = Outcomes::new(self.slots.len());
        let lanes = self.plan_lanes(&mut outcomes);
        let shared = self.start_lanes(lanes);
        let set = self.wait_lanes(&shared, &mut outcomes);
        Ok(self.report(set, outcomes))
    }

    /// The scrape's lanes: the collectors not still running from an earlier
    /// scrape (those are reported stuck), longest first onto the shorter lane.
    fn plan_lanes(&self, outcomes: &mut Outcomes) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = Vec::with_capacity(self.slots.len());
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.running.load(Ordering::Acquire) {
                outcomes.report(i, Duration::ZERO, Err(Error::Stuck { collector: slot.collector.name() }));
            } else {
                order.push(i);
            }
        }
        order.sort_by_key(|&i| std::cmp::Reverse(self.slots[i].last_micros.load(Ordering::Relaxed)));
        let mut lanes: Vec<Vec<usize>> = vec![Vec::new(); LANES];
        let mut load = [0u64; LANES];
        for i in order {
            let l = (0..LANES).min_by_key(|&l| (load[l], lanes[l].len())).unwrap_or(0);
            load[l] += self.slots[i].last_micros.load(Ordering::Relaxed);
            lanes[l].push(i);
        }
        for lane in &mut lanes {
            lane.sort_unstable();
        }
        lanes.retain(|l| !l.is_empty());
        lanes
    }

    /// Starts `lanes` on the worker threads; the progress they share.
    fn start_lanes(&self, lanes: Vec<Vec<usize>>) -> Arc<Shared> {
        let mut set = self.spare.lock().unwrap_or_else(PoisonError::into_inner).pop().unwrap_or_default();
        set.clear();
        let progress = Progress { set, done: Vec::with_capacity(self.slots.len()), lanes: Vec::with_capacity(LANES) };
        let shared = Arc::new(Shared { progress: Mutex::new(progress), changed: Condvar::new() });
        let jobs: Vec<Job> = {
            let mut p = shared.progress.lock().unwrap_or_else(PoisonError::into_inner);
            lanes.into_iter().map(|work| self.lane(&shared, &mut p, work)).collect()
        };
        // Not under the lock: a job dropped unrun takes it to mark its lane finished.
        for job in jobs {
            self.workers.run(job);
        }
        shared
    }

    /// Collects the lanes' results until each has finished or been
    /// abandoned; a collector past its limit is reported timed out and the
    /// rest of its lane moves to another thread. The samples gathered.
    fn wait_lanes(&self, shared: &Arc<Shared>, outcomes: &mut Outcomes) -> MetricSet {
        let mut p = shared.progress.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            for (i, result, took) in p.done.drain(..) {
                self.slots[i].last_micros.store(took.as_micros().try_into().unwrap_or(u64::MAX), Ordering::Relaxed);
                outcomes.report(i, took, result);
            }
            let now = Instant::now();
            match self.next_overdue(&p, now) {
                Wait::Overdue(l, i) => {
                    let name = self.slots[i].collector.name();
                    p.lanes[l].abandoned = true;
                    outcomes.report(i, self.limits.collector, Err(Error::Timeout { collector: name, limit: self.limits.collector }));
                    // The rest of that lane's work, on another thread.
                    let rest = Self::unstarted(&p, l, &outcomes.reported);
                    if !rest.is_empty() {
                        let job = self.lane(shared, &mut p, rest);
                        drop(p);
                        self.workers.run(job);
                        p = shared.progress.lock().unwrap_or_else(PoisonError::into_inner);
                    }
                }
                Wait::Done => break,
                Wait::Until(next_deadline) => {
                    let wait = next_deadline.map_or(self.limits.collector, |d| d.saturating_duration_since(now));
                    p = shared.changed.wait_timeout(p, wait).unwrap_or_else(PoisonError::into_inner).0;
                }
            }
        }
        // Every lane has finished or been abandoned: none adds to the set any more.
        std::mem::take(&mut p.set)
    }

    /// What the scrape waits for next, at `now`: a lane's collector past its
    /// limit, every lane done, or the earliest deadline of a running one.
    fn next_overdue(&self, p: &Progress, now: Instant) -> Wait {
        let mut next_deadline: Option<Instant> = None;
        let mut waiting = false;
        for (l, state) in p.lanes.iter().enumerate() {
            if state.finished || state.abandoned {
                continue;
            }
            waiting = true;
            if let Some((i, since)) = state.current {
                let deadline = since + self.limits.collector;
                if deadline <= now {
                    return Wait::Overdue(l, i);
                }
                next_deadline = Some(next_deadline.map_or(deadline, |d| d.min(deadline)));
            }
        }
        if waiting { Wait::Until(next_deadline) } else { Wait::Done }
    }

    /// Adds each collector's duration and success to `set`; a collector
    /// that never reported (its lane ended early: a panic, or no thread for
    /// it) is stuck.
    fn report(&self, mut set: MetricSet, outcomes: Outcomes) -> MetricSet {
        let Outcomes { mut results, reported } = outcomes;
        for (i, slot) in self.slots.iter().enumerate() {
            if !reported[i] {
                results[i].1 = Err(Error::Stuck { collector: slot.collector.name() });
            }
        }
        for (slot, (duration, result)) in self.slots.iter().zip(results) {
            let name = slot.collector.name();
            if let Err(e) = &result {
                log::debug!("collector {name} failed: {}", crate::register::chain(e));
            }
            let ok = result.is_ok();
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
        set
    }

    /// The collectors of lane `l`'s work that it has not started: those not
    /// reported yet, except the one it is stuck in.
    fn unstarted(p: &Progress, l: usize, reported: &[bool]) -> Vec<usize> {
        let current = p.lanes[l].current.map(|(i, _)| i);
        p.lanes[l].work.iter().copied().filter(|&i| !reported[i] && Some(i) != current).collect()
    }

    /// A new lane of the scrape whose progress is `p`, and the job that runs `work` in it.
    fn lane(&self, shared: &Arc<Shared>, p: &mut Progress, work: Vec<usize>) -> Job {
        let lane = p.lanes.len();
        p.lanes.push(LaneState { work: work.clone(), ..LaneState::default() });
        let end = LaneEnd { shared: Arc::clone(shared), slots: Arc::clone(&self.slots), lane };
        let roots = Arc::clone(&self.roots);
        Box::new(move || {
            end.run(&roots, work);
            end
        })
    }
}

thread_local! {
    /// A collector thread's set: each collector adds to it, the lane copies it into the scrape's.
    static SCRATCH: std::cell::RefCell<MetricSet> = std::cell::RefCell::new(MetricSet::default());
}

impl LaneEnd {
    /// Runs the collectors `work` one after another, reporting each into the scrape's progress.
    fn run(&self, roots: &Roots, work: Vec<usize>) {
        let (end, lane) = (self, self.lane);
        for i in work {
            let slot = &end.slots[i];
            {
                let mut p = end.shared.progress.lock().unwrap_or_else(PoisonError::into_inner);
                if p.lanes[lane].abandoned {
                    return;
                }
                if slot.running.swap(true, Ordering::AcqRel) {
                    p.done.push((i, Err(Error::Stuck { collector: slot.collector.name() }), Duration::ZERO));
                    continue;
                }
                p.lanes[lane].current = Some((i, Instant::now()));
            }
            // This thread's set from its previous collector, emptied: no allocation once grown.
            let mut out = SCRATCH.try_with(std::cell::RefCell::take).unwrap_or_default();
            out.clear();
            let begin = Instant::now();
            let result = slot.collector.collect(roots, &mut out);
            let took = begin.elapsed();
            slot.running.store(false, Ordering::Release);
            let mut p = end.shared.progress.lock().unwrap_or_else(PoisonError::into_inner);
            p.lanes[lane].current = None;
            if p.lanes[lane].abandoned {
                return;
            }
            p.set.append(&out);
            p.done.push((i, result, took));
            drop(p);
            let _ = SCRATCH.try_with(|s| s.replace(out));
        }
    }
}

/// A fake procfs for collector unit tests: `files` (path relative to the
/// proc root, contents) in a temporary directory, and roots pointing at it.
#[cfg(test)]
pub(crate) fn proc_tree(files: &[(&str, &str)]) -> (tempfile::TempDir, Roots) {
    let dir = tempfile::tempdir().unwrap();
    for (p, s) in files {
        let path = dir.path().join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, s).unwrap();
    }
    let roots = Roots { proc: dir.path().into(), ..Roots::default() };
    (dir, roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_files_through_the_directory() {
        let live = Roots::default();
        let path = live.proc.join("net/dev");
        let (Ok(by_dir), Ok(by_path)) = (read_net(&live, &path, "dev"), read(&path)) else {
            return; // no procfs here
        };
        assert_eq!(by_dir.lines().next(), by_path.lines().next(), "the same file both ways");
        let missing = live.proc.join("net/no-such-file");
        let err = read_net(&live, &missing, "no-such-file").err();
        assert!(
            matches!(err, Some(Error::Io { ref path, ref source }) if source.kind() == std::io::ErrorKind::NotFound && path.ends_with("net/no-such-file")),
            "a missing file is NotFound, named by its path: {err:?}"
        );
    }

    #[test]
    fn files_larger_than_the_buffer() {
        let big: String = (0..3 * BUFFER / 10).map(|i| format!("{i:09}\n")).collect();
        let (_dir, roots) = proc_tree(&[("big", &big), ("small", "1\n")]);
        for _ in 0..2 {
            assert_eq!(&*read(&roots.proc.join("big")).unwrap(), big, "read whole, buffer grown");
            assert_eq!(&*read(&roots.proc.join("small")).unwrap(), "1\n", "a reused buffer holds only this file");
            assert_eq!(&*read_to_end(&roots.proc.join("big")).unwrap(), big, "read to the end");
        }
    }
}
