//! Fixture test, node_exporter style: the collectors read a fake `/proc`,
//! `/sys` and root filesystem made of real files from a host
//! (`tests/fixtures`, rebuilt by `tests/fixtures/capture`), and what they
//! print must equal `tests/golden/metrics.txt` byte for byte.
//!
//! After an intended change, regenerate the golden file with:
//!
//! ```sh
//! KILN_REGENERATE_GOLDEN=1 cargo test --workspace golden_file
//! ```

//!
//! Left out, deterministically: the `time` and `uname` collectors (they read
//! the clock and the running kernel, not files); values that are the test
//! machine's and not the fixture's (collector durations, text file mtimes,
//! usage of the one mount point that exists below the fixture root) are
//! replaced by `<varies>` — their names and labels are still compared.

mod common;
#[path = "../../tests/golden_file.rs"]
mod golden_file;

use std::path::Path;
use std::sync::Arc;

use kiln_agent::metrics::{self, Exporter, Format, Limits};

const VARIES: &[&str] = &[
    "node_scrape_collector_duration_seconds",
    "node_textfile_mtime_seconds",
    "node_filesystem_avail_bytes",
    "node_filesystem_free_bytes",
    "node_filesystem_size_bytes",
    "node_filesystem_files",
    "node_filesystem_files_free",
];

fn render(root: &Path) -> String {
    let names: Vec<String> = metrics::NAMES.iter().filter(|n| !["time", "uname"].contains(n)).map(|n| n.to_string()).collect();
    let collectors = metrics::collectors(Some(&names)).unwrap();
    let exporter = Arc::new(Exporter::new(common::roots(root), collectors, Limits::default()));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut set = rt.block_on(exporter.scrape()).unwrap();
    let text = metrics::encode::encode(&mut set, Format::Text);
    text.lines()
        .map(|l| {
            let name = l.split(['{', ' ']).next().unwrap_or("");
            if !l.starts_with('#') && VARIES.contains(&name) {
                format!("{} <varies>\n", l.rsplit_once(' ').unwrap().0)
            } else {
                format!("{l}\n")
            }
        })
        .collect::<String>()
        .replace(&root.display().to_string(), "<fixtures>")
}

#[test]
fn fixture_tree_matches_golden_file() {
    let fixtures = common::fixtures();
    let got = render(&fixtures);
    golden_file::check("metrics.txt", &got);
    // What a user checks first: every collector worked on real files.
    for name in metrics::NAMES.iter().filter(|n| !["time", "uname"].contains(n)) {
        assert!(
            got.contains(&format!("node_scrape_collector_success{{collector=\"{name}\"}} 1\n")),
            "collector {name} succeeded on the fixtures"
        );
    }
    assert!(got.contains("app_jobs_total{queue=\"default\"} 17\n"), "textfile metric from the fixture");
    assert_eq!(render(&fixtures), got, "a second scrape prints the same");
}
