//! Helpers shared by the agent's integration tests: processes killed on
//! drop, a tiny HTTP/1.0 client for loopback, an exposition-format reader,
//! and the fixture tree.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// A child process killed and reaped when dropped, also when the test panics.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An HTTP answer.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// `GET path` over HTTP/1.0 (the server closes the connection after the body).
pub fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> std::io::Result<Answer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    Ok(Answer { status, headers, body: body.to_string() })
}

/// Waits until `GET /metrics` on `addr` answers 200.
pub fn wait_ready(addr: SocketAddr, within: Duration) {
    let start = Instant::now();
    loop {
        if let Ok(a) = get(addr, "/metrics", None)
            && a.status == 200
        {
            return;
        }
        assert!(start.elapsed() < within, "{addr} did not answer /metrics within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A text-format exposition, read back: series (`name{labels}` as printed,
/// labels sorted) to value, and each family's HELP and TYPE.
#[derive(Debug, Default)]
pub struct Exposition {
    pub series: BTreeMap<String, f64>,
    pub help: BTreeMap<String, String>,
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    pub fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                e.help.insert(name.to_string(), help.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, t) = rest.split_once(' ').unwrap_or((rest, ""));
                e.types.insert(name.to_string(), t.to_string());
            } else if !line.starts_with('#') && !line.is_empty() {
                let (series, value) = line.rsplit_once(' ').expect("a sample line has a value");
                let v = match value {
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    v => v.parse().unwrap_or_else(|_| panic!("value of {line:?}")),
                };
                e.series.insert(series.to_string(), v);
            }
        }
        e
    }

    /// The family name of a series key.
    pub fn name(series: &str) -> &str {
        series.split('{').next().unwrap_or(series)
    }

    pub fn get(&self, series: &str) -> Option<f64> {
        self.series.get(series).copied()
    }
}

/// `agent/tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Copies a directory tree (regular files and directories only).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

/// The metrics roots of a fixture tree at `root` (`proc/`, `sys/`, `rootfs/`, `textfile/`).
pub fn roots(root: &Path) -> kiln_agent::metrics::Roots {
    kiln_agent::metrics::Roots {
        proc: root.join("proc"),
        sys: root.join("sys"),
        rootfs: root.join("rootfs"),
        mounts: Some(root.join("proc/1/mounts")),
        udev_data: root.join("udev"),
        textfile_dir: Some(root.join("textfile")),
    }
}
