//! kiln-agent beside the real node_exporter 1.5.0 (Debian's
//! `prometheus-node-exporter`) on this host, both on loopback with the same
//! collectors and the same textfile directory: the same series with the same
//! labels, HELP and TYPE; fixed gauges equal; counters between node_exporter's
//! scrapes just before and just after kiln's; promtool finds nothing in kiln's
//! output that it does not also find in node_exporter's.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Exposition, Guard, get, wait_ready};

const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";
const PROMTOOL: &str = "/usr/bin/promtool";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `kiln-agent metrics` on an ephemeral loopback port; returns it once it says where it listens.
fn start_kiln(textfile: &std::path::Path) -> (Guard, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-agent"))
        .args(["metrics", "--listen", "127.0.0.1:0", "--textfile-dir"])
        .arg(textfile)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln-agent starts");
    let stderr = child.stderr.take().unwrap();
    let guard = Guard(child);
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("kiln-agent says where it listens").unwrap();
        if let Some(addr) = line.split("listening on ").nth(1) {
            break addr.trim().parse().unwrap();
        }
    };
    // Keep draining stderr so the agent never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (guard, addr)
}

fn start_node_exporter(textfile: &std::path::Path) -> (Guard, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(NODE_EXPORTER);
    cmd.arg(format!("--web.listen-address={addr}")).arg("--collector.disable-defaults");
    for c in kiln_agent::metrics::NAMES {
        cmd.arg(format!("--collector.{c}"));
    }
    cmd.arg(format!("--collector.textfile.directory={}", textfile.display()));
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("node_exporter is installed");
    (Guard(child), addr)
}

fn scrape(addr: SocketAddr) -> String {
    let a = get(addr, "/metrics", None).unwrap();
    assert_eq!(a.status, 200, "scrape of {addr}");
    a.body
}

/// node_ series, without node_exporter's own build info.
fn node_series(e: &Exposition) -> BTreeSet<String> {
    e.series.keys().filter(|s| s.starts_with("node_") && !s.starts_with("node_exporter_build_info")).cloned().collect()
}

/// Lints (stdout) of `promtool check metrics`; panics on a parse error.
fn promtool_lints(who: &str, text: &str) -> BTreeSet<String> {
    use std::io::Write;
    let mut child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() != Some(1) && !stderr.contains("error"), "promtool: {who}'s output does not parse: {stderr}");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Gauges that do not move while the test runs.
const FIXED: &[&str] = &[
    "node_memory_MemTotal_bytes",
    "node_memory_SwapTotal_bytes",
    "node_memory_Hugepagesize_bytes",
    "node_boot_time_seconds",
    "node_filefd_maximum",
    "node_entropy_pool_size_bits",
    "node_nf_conntrack_entries_limit",
    "node_network_mtu_bytes",
    "node_network_flags",
    "node_network_iface_id",
    "node_network_iface_link",
    "node_network_speed_bytes",
    "node_network_protocol_type",
    "node_network_transmit_queue_length",
    "node_network_info",
    "node_network_up",
    "node_disk_info",
    "node_filesystem_size_bytes",
    "node_filesystem_files",
    "node_filesystem_readonly",
    "node_filesystem_device_error",
    "node_os_info",
    "node_os_version",
    "node_uname_info",
    "node_time_zone_offset_seconds",
    "node_time_clocksource_current_info",
    "node_textfile_scrape_error",
    "node_textfile_mtime_seconds",
    "kiln_test_fixed",
];

#[test]
fn same_series_and_values_as_node_exporter() {
    let textfile = tempfile::tempdir().unwrap();
    std::fs::write(
        textfile.path().join("kiln.prom"),
        "# HELP kiln_test_fixed A value from a text file.\n# TYPE kiln_test_fixed gauge\nkiln_test_fixed{source=\"textfile\"} 42\n",
    )
    .unwrap();
    let (_ne, ne_addr) = start_node_exporter(textfile.path());
    let (_kiln, kiln_addr) = start_kiln(textfile.path());
    wait_ready(ne_addr, Duration::from_secs(10));
    wait_ready(kiln_addr, Duration::from_secs(10));

    let before_text = scrape(ne_addr);
    let kiln_text = scrape(kiln_addr);
    let after_text = scrape(ne_addr);
    let (before, kiln, after) = (Exposition::parse(&before_text), Exposition::parse(&kiln_text), Exposition::parse(&after_text));

    // Same series: name and label set.
    let ne_series = node_series(&before);
    let kiln_series = node_series(&kiln);
    let missing: Vec<_> = ne_series.difference(&kiln_series).collect();
    let extra: Vec<_> = kiln_series.difference(&ne_series).collect();
    assert!(missing.is_empty(), "series node_exporter prints and kiln does not: {missing:#?}");
    assert!(extra.is_empty(), "series kiln prints and node_exporter does not: {extra:#?}");
    assert!(ne_series.len() > 200, "node_exporter printed {} node_ series; expected the covered collectors' few hundred", ne_series.len());
    assert_eq!(kiln.get("kiln_test_fixed{source=\"textfile\"}"), Some(42.0), "textfile metric");

    // Same HELP and TYPE for every family.
    for series in &ne_series {
        let name = Exposition::name(series);
        assert_eq!(kiln.help.get(name), before.help.get(name), "HELP of {name}");
        assert_eq!(kiln.types.get(name), before.types.get(name), "TYPE of {name}");
    }

    // Every collector succeeded in both.
    for c in kiln_agent::metrics::NAMES {
        let key = format!("node_scrape_collector_success{{collector=\"{c}\"}}");
        assert_eq!(before.get(&key), Some(1.0), "node_exporter's collector {c}");
        assert_eq!(kiln.get(&key), Some(1.0), "kiln's collector {c}");
    }

    // Values.
    let mut checked = (0, 0);
    for series in &ne_series {
        let name = Exposition::name(series);
        let (b, k, a) = (before.series[series], kiln.series[series], after.get(series).unwrap_or(f64::NAN));
        if FIXED.contains(&name) {
            assert_eq!(k, b, "fixed gauge {series}");
            checked.0 += 1;
        } else if before.types.get(name).map(String::as_str) == Some("counter") {
            // Monotonic between node_exporter's two scrapes; a hair of slack
            // for CPU idle/iowait, which the kernel may step back slightly.
            let slack = if name.starts_with("node_cpu_") { 0.5 } else { 0.0 };
            let (lo, hi) = (b.min(a), b.max(a));
            assert!(k >= lo - slack && k <= hi + slack, "counter {series}: kiln {k} outside node_exporter's {b} .. {a}");
            checked.1 += 1;
        }
    }
    assert!(checked.0 > 20 && checked.1 > 50, "compared {} fixed gauges and {} counters", checked.0, checked.1);

    // promtool: kiln draws no lint node_exporter does not draw.
    let ne_lints = promtool_lints("node_exporter", &before_text);
    let kiln_lints = promtool_lints("kiln", &kiln_text);
    let new: Vec<_> = kiln_lints.difference(&ne_lints).collect();
    assert!(new.is_empty(), "promtool lints only kiln's output gets: {new:#?}");
}

#[test]
fn openmetrics_when_asked() {
    let textfile = tempfile::tempdir().unwrap();
    let (_kiln, addr) = start_kiln(textfile.path());
    wait_ready(addr, Duration::from_secs(10));
    let om = get(addr, "/metrics", Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")).unwrap();
    assert_eq!(om.status, 200, "OpenMetrics scrape");
    assert_eq!(om.header("content-type"), Some("application/openmetrics-text; version=1.0.0; charset=utf-8"), "OpenMetrics content type");
    assert!(om.body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    assert!(om.body.contains("# TYPE node_forks counter\n"), "counter family named without _total");
    assert!(om.body.contains("\nnode_forks_total "), "counter sample keeps _total");
    assert!(om.body.contains("# TYPE node_vmstat_pgfault unknown\n"), "untyped is unknown");

    let text = get(addr, "/metrics", Some("text/plain")).unwrap();
    assert_eq!(text.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"), "text content type");
    assert!(text.body.contains("# TYPE node_forks_total counter\n"), "text format");
    assert_eq!(get(addr, "/other", None).unwrap().status, 404, "only /metrics is served");
}
