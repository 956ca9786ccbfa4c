//! The entry point of the `/proc` targets: one input is one `/proc` file's
//! text, written into a fake `/proc` tree, and the agent's collectors that
//! read that file run on it through their public API
//! ([`kiln_agent::metrics::Collector::collect`]), as a scrape does. A
//! collector may fail on the input; it may not panic.
//!
//! Shared as source by `bench/fuzz` and `agent/tests/fuzz.rs` (which replays
//! the committed corpus and crash inputs in the normal `cargo test`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_agent::metrics::{self, MetricSet, Roots};

/// A file below the proc root and the collectors that read it.
pub type ProcFile = (&'static str, &'static [&'static str]);

/// `proc_memory`: meminfo and vmstat.
pub const MEMORY: &[ProcFile] = &[("meminfo", &["meminfo"]), ("vmstat", &["vmstat"])];
/// `proc_stat`: stat (cpu and stat), loadavg, pressure.
pub const STAT: &[ProcFile] = &[
    ("stat", &["cpu", "stat"]),
    ("loadavg", &["loadavg"]),
    ("pressure/cpu", &["pressure"]),
    ("pressure/memory", &["pressure"]),
    ("pressure/io", &["pressure"]),
];
/// `proc_diskstats`: diskstats.
pub const DISKSTATS: &[ProcFile] = &[("diskstats", &["diskstats"])];
/// `proc_net`: net/dev, net/netstat, net/snmp, net/snmp6, net/sockstat(6).
pub const NET: &[ProcFile] = &[
    ("net/dev", &["netdev"]),
    ("net/netstat", &["netstat"]),
    ("net/snmp", &["netstat"]),
    ("net/snmp6", &["netstat"]),
    ("net/sockstat", &["sockstat"]),
    ("net/sockstat6", &["sockstat"]),
];
/// Every table, named as its target.
pub const TARGETS: &[(&str, &[ProcFile])] =
    &[("proc_memory", MEMORY), ("proc_stat", STAT), ("proc_diskstats", DISKSTATS), ("proc_net", NET)];

/// The agent's fixture tree (`agent/tests/fixtures`).
pub fn fixtures() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .map(|d| d.join("agent/tests/fixtures"))
        .find(|d| d.join("proc").is_dir())
        .expect("the repository holds agent/tests/fixtures")
}

/// A proc root holding a copy of every fixture file the tables name; the
/// rest of the roots point at the fixtures themselves (read only).
struct Tree {
    _dir: tempfile::TempDir,
    roots: Roots,
}

impl Tree {
    fn new() -> Tree {
        let fixtures = fixtures();
        let dir = tempfile::tempdir().expect("a temporary directory");
        for (file, _) in TARGETS.iter().flat_map(|(_, t)| t.iter()) {
            let to = dir.path().join(file);
            std::fs::create_dir_all(to.parent().expect("a file has a parent")).expect("a directory in the fake /proc");
            std::fs::copy(fixtures.join("proc").join(file), &to).expect("a fixture file copied");
        }
        let roots = Roots {
            proc: dir.path().into(),
            sys: fixtures.join("sys"),
            rootfs: fixtures.join("rootfs"),
            mounts: Some(fixtures.join("proc/1/mounts")),
            udev_data: fixtures.join("udev"),
            textfile_dir: None,
        };
        Tree { _dir: dir, roots }
    }
}

/// One input for `table`: its first byte picks the file (modulo the table's
/// length), the rest is the file's text. The file is put back after, so an
/// input's outcome never depends on the ones before it.
pub fn run(table: &[ProcFile], data: &[u8]) {
    static TREE: Mutex<Option<Tree>> = Mutex::new(None);
    let Some((&pick, text)) = data.split_first() else { return };
    let (file, names) = table[usize::from(pick) % table.len()];
    let mut tree = TREE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let roots = &tree.get_or_insert_with(Tree::new).roots;
    let path = roots.proc.join(file);
    let original = std::fs::read(fixtures().join("proc").join(file)).expect("the fixture file reads");
    std::fs::write(&path, text).expect("the input is written into the fake /proc");
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    for collector in metrics::collectors(Some(&names)).expect("the tables name known collectors") {
        let mut out = MetricSet::default();
        // An error is a fine answer to a bad file; a panic fails.
        let _ = collector.collect(roots, &mut out);
    }
    std::fs::write(&path, original).expect("the fixture file is put back");
}
