//! Unreadable or odd files in `/proc`, `/sys` and the root filesystem never
//! crash or stall a scrape: the collector that reads them reports
//! `node_scrape_collector_success 0`, every other one still answers. Tests
//! run as root, so "permission denied" is played by files that cannot be read
//! as files: a directory or a FIFO where a file should be.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_agent::metrics::{self, Collector, Error, Exporter, Kind, Limits, MetricSet, Roots};

fn scrape(exporter: &Exporter) -> MetricSet {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(exporter.scrape()).unwrap()
}

fn success(set: &MetricSet, collector: &str) -> Option<f64> {
    set.value("node_scrape_collector_success", &[("collector", collector)])
}

type Mutation = fn(&Path);

fn replace_with_dir(p: &Path) {
    std::fs::remove_file(p).unwrap();
    std::fs::create_dir(p).unwrap();
}

fn replace_with_fifo(p: &Path) {
    std::fs::remove_file(p).unwrap();
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

#[test]
fn a_bad_file_fails_only_its_collector() {
    let cases: &[(&str, Mutation, &[&str])] = &[
        ("garbage meminfo", |r| std::fs::write(r.join("proc/meminfo"), b"\x00\xff\xfe garbage\n\x01").unwrap(), &["meminfo"]),
        ("meminfo value missing", |r| std::fs::write(r.join("proc/meminfo"), "MemTotal:\n").unwrap(), &["meminfo"]),
        ("loadavg is a directory", |r| replace_with_dir(&r.join("proc/loadavg")), &["loadavg"]),
        ("stat is a FIFO", |r| replace_with_fifo(&r.join("proc/stat")), &["cpu", "stat"]),
        (
            "stat truncated mid-file",
            |r| {
                let t = std::fs::read_to_string(r.join("proc/stat")).unwrap();
                std::fs::write(r.join("proc/stat"), &t[..t.find("ctxt").unwrap()]).unwrap();
            },
            &["stat"],
        ),
        (
            "net/dev missing fields",
            |r| {
                let t = std::fs::read_to_string(r.join("proc/net/dev")).unwrap();
                let cut: String =
                    t.lines().map(|l| if l.contains("eth0:") { "  eth0: 1 2 3\n".to_string() } else { format!("{l}\n") }).collect();
                std::fs::write(r.join("proc/net/dev"), cut).unwrap();
            },
            &["netdev"],
        ),
        ("diskstats missing", |r| std::fs::remove_file(r.join("proc/diskstats")).unwrap(), &["diskstats"]),
        ("vmstat garbage value", |r| std::fs::write(r.join("proc/vmstat"), "pgfault lots\n").unwrap(), &["vmstat"]),
        ("netstat counts mismatch", |r| std::fs::write(r.join("proc/net/netstat"), "TcpExt: A B C\nTcpExt: 1 2\n").unwrap(), &["netstat"]),
        ("sockstat garbage", |r| std::fs::write(r.join("proc/net/sockstat"), "TCP: inuse\n").unwrap(), &["sockstat"]),
        ("pressure missing", |r| std::fs::remove_dir_all(r.join("proc/pressure")).unwrap(), &["pressure"]),
        ("file-nr empty", |r| std::fs::write(r.join("proc/sys/fs/file-nr"), "").unwrap(), &["filefd"]),
        ("entropy is a FIFO", |r| replace_with_fifo(&r.join("proc/sys/kernel/random/entropy_avail")), &["entropy"]),
        (
            "conntrack stats garbage",
            |r| std::fs::write(r.join("proc/net/stat/nf_conntrack"), "entries found\nzz yy\n").unwrap(),
            &["conntrack"],
        ),
        ("mount table malformed", |r| std::fs::write(r.join("proc/1/mounts"), "/dev/vda\n").unwrap(), &["filesystem"]),
        ("no os-release", |r| std::fs::remove_file(r.join("rootfs/etc/os-release")).unwrap(), &["os"]),
        ("no sys/class/net", |r| std::fs::remove_dir_all(r.join("sys/class/net")).unwrap(), &["netclass"]),
        (
            "clocksource is a directory",
            |r| replace_with_dir(&r.join("sys/devices/system/clocksource/clocksource0/current_clocksource")),
            &["time"],
        ),
    ];
    for (case, mutate, failing) in cases {
        let dir = tempfile::tempdir().unwrap();
        common::copy_tree(&common::fixtures(), dir.path());
        mutate(dir.path());
        let exporter = Exporter::new(common::roots(dir.path()), metrics::all(), Limits::default());
        let start = Instant::now();
        let set = scrape(&exporter);
        assert!(start.elapsed() < Duration::from_secs(3), "{case}: scrape took {:?}", start.elapsed());
        for name in metrics::NAMES {
            let want = if failing.contains(name) { 0.0 } else { 1.0 };
            assert_eq!(success(&set, name), Some(want), "{case}: success of collector {name}");
        }
    }
}

#[test]
fn unreadable_textfile_directory_is_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    common::copy_tree(&common::fixtures(), dir.path());
    std::fs::remove_dir_all(dir.path().join("textfile")).unwrap();
    std::fs::write(dir.path().join("textfile"), "not a directory").unwrap();
    let set = scrape(&Exporter::new(common::roots(dir.path()), metrics::all(), Limits::default()));
    // As node_exporter: the collector succeeds and says so in its own gauge.
    assert_eq!(success(&set, "textfile"), Some(1.0), "textfile collector success");
    assert_eq!(set.value("node_textfile_scrape_error", &[]), Some(1.0), "node_textfile_scrape_error");
}

/// A collector that blocks far longer than its time limit.
struct Hung(Duration);

impl Collector for Hung {
    fn name(&self) -> &'static str {
        "hung"
    }
    fn collect(&self, _: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        std::thread::sleep(self.0);
        out.add("node_hung_value", "Never seen.", Kind::Gauge, &[], 1.0);
        Ok(())
    }
}

#[test]
fn a_hung_collector_times_out_and_the_rest_answer() {
    let fixtures = common::fixtures();
    let mut collectors = metrics::collectors(Some(&["loadavg".to_string()])).unwrap();
    collectors.insert(0, Arc::new(Hung(Duration::from_secs(2))));
    collectors.push(metrics::collectors(Some(&["meminfo".to_string()])).unwrap().remove(0));
    let limits = Limits { collector: Duration::from_millis(200), ..Limits::default() };
    let exporter = Exporter::new(common::roots(&fixtures), collectors, limits);

    // One runtime for both scrapes: dropping a runtime waits for its blocking threads.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let start = Instant::now();
    let set = rt.block_on(exporter.scrape()).unwrap();
    assert!(start.elapsed() < Duration::from_secs(1), "first scrape took {:?}", start.elapsed());
    assert_eq!(success(&set, "hung"), Some(0.0), "hung collector, first scrape");
    assert_eq!(set.value("node_scrape_collector_duration_seconds", &[("collector", "hung")]), Some(0.2), "duration is the limit");
    assert_eq!(success(&set, "loadavg"), Some(1.0), "collector after the hung one");
    assert_eq!(success(&set, "meminfo"), Some(1.0), "last collector");
    assert!(set.value("node_load1", &[]).is_some(), "loadavg's samples are there");

    // Still hung: reported at once, not run a second time.
    let start = Instant::now();
    let set = rt.block_on(exporter.scrape()).unwrap();
    assert!(start.elapsed() < Duration::from_millis(150), "second scrape took {:?}", start.elapsed());
    assert_eq!(success(&set, "hung"), Some(0.0), "hung collector, second scrape");
    assert_eq!(success(&set, "meminfo"), Some(1.0), "meminfo, second scrape");
    rt.shutdown_background();
}

#[test]
fn concurrent_scrapes_are_bounded() {
    let limits = Limits { collector: Duration::from_secs(5), concurrent_scrapes: 1, queue: Duration::from_millis(100) };
    let exporter = Arc::new(Exporter::new(Roots::default(), vec![Arc::new(Hung(Duration::from_millis(600)))], limits));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (a, b) = rt.block_on(async {
        let first = tokio::spawn({
            let e = Arc::clone(&exporter);
            async move { e.scrape().await.is_ok() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = exporter.scrape().await.is_ok();
        (first.await.unwrap(), second)
    });
    assert!(a, "the first scrape runs");
    assert!(!b, "a second scrape beyond the bound is refused");
}

#[test]
fn http_scrape_still_answers_with_broken_files() {
    let dir = tempfile::tempdir().unwrap();
    common::copy_tree(&common::fixtures(), dir.path());
    std::fs::write(dir.path().join("proc/meminfo"), "garbage").unwrap();
    let root = dir.path();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["metrics", "--listen", "127.0.0.1:0"])
        .arg("--proc")
        .arg(root.join("proc"))
        .arg("--sys")
        .arg(root.join("sys"))
        .arg("--rootfs")
        .arg(root.join("rootfs"))
        .arg("--textfile-dir")
        .arg(root.join("textfile"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _guard = common::Guard(child);
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let addr: std::net::SocketAddr = loop {
        let line = lines.next().expect("the agent says where it listens").unwrap();
        if let Some(a) = line.split("listening on ").nth(1) {
            break a.trim().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let answer = common::get(addr, "/metrics", None).unwrap();
    assert_eq!(answer.status, 200, "scrape status");
    let e = common::Exposition::parse(&answer.body);
    assert_eq!(e.get("node_scrape_collector_success{collector=\"meminfo\"}"), Some(0.0), "meminfo fails");
    assert_eq!(e.get("node_scrape_collector_success{collector=\"cpu\"}"), Some(1.0), "cpu still answers");
    assert!(e.get("node_load1").is_some(), "loadavg samples present");
}
