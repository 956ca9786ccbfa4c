//! A real etcd for tests: Debian's `/usr/bin/etcd` (3.4), one member on
//! 127.0.0.1 (of this host, or of a namespace the test made) on free ports,
//! with its own data directory; stopped and its data removed when dropped.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{Netns, Process, free_port, read_log, wait_for};

/// Debian's etcd server (package `etcd-server`).
pub const ETCD: &str = "/usr/bin/etcd";
/// Debian's etcd client (package `etcd-client`).
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

/// A running single-member etcd.
pub struct Etcd {
    /// The server; dropped (stopped) before the data directory.
    process: Process,
    /// Its client URL, `http://127.0.0.1:PORT`.
    pub url: String,
    /// The namespace it runs in, when not this host's.
    netns: Option<String>,
    /// Its log file.
    pub log: PathBuf,
    /// How to start it again (`restart`).
    cmd: Vec<std::ffi::OsString>,
    _data: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd on this host's loopback and waits until it is healthy.
    pub fn start() -> Etcd {
        Self::start_in(None)
    }

    /// Starts etcd on the loopback of `netns` (this host's when `None`) and
    /// waits until it answers `etcdctl endpoint health`.
    pub fn start_in(netns: Option<&Netns>) -> Etcd {
        Self::start_in_named(netns.map(|n| n.name.as_str()))
    }

    /// Starts etcd on the loopback of the namespace named `netns` (one
    /// the test made some other way: a lab's), or this host's.
    pub fn start_in_named(netns: Option<&str>) -> Etcd {
        let data = tempfile::Builder::new().prefix("kiln-etcd-").tempdir().expect("a temp dir for etcd");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, ETCD]);
                c
            }
            None => Command::new(ETCD),
        };
        cmd.args(["--name", "kiln-test"])
            .arg("--data-dir")
            .arg(data.path().join("member"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("kiln-test={peer_url}"), "--initial-cluster-state", "new"])
            .args(["--log-outputs", "stderr"]);
        let log = data.path().join("etcd.log");
        let argv: Vec<std::ffi::OsString> =
            std::iter::once(cmd.get_program().to_owned()).chain(cmd.get_args().map(|a| a.to_owned())).collect();
        let process = Process::spawn_logged(cmd, "etcd", &log);
        let etcd = Etcd { process, url, netns: netns.map(String::from), log, cmd: argv, _data: data };
        etcd.wait_healthy();
        etcd
    }

    fn wait_healthy(&self) {
        let healthy = wait_for(Duration::from_secs(30), || self.ctl(&["endpoint", "health"]).ok());
        assert!(healthy.is_some(), "etcd at {} did not become healthy; its log:\n{}", self.url, read_log(&self.log));
    }

    /// Kills etcd with SIGKILL and starts it again on the same data
    /// directory and ports; returns once it is healthy.
    pub fn restart(&mut self) {
        self.process.signal_and_wait(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(5)).expect("etcd dies on SIGKILL");
        let mut cmd = Command::new(&self.cmd[0]);
        cmd.args(&self.cmd[1..]);
        self.process = Process::spawn_logged(cmd, "etcd", &self.log);
        self.wait_healthy();
    }

    /// Runs `etcdctl --endpoints URL ARGS...` (in etcd's namespace); its
    /// stdout, or stderr as the error.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, ETCDCTL]);
                c
            }
            None => Command::new(ETCDCTL),
        };
        let out = cmd
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.url, "--dial-timeout", "2s"])
            .args(args)
            .output()
            .map_err(|e| format!("{ETCDCTL}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.ctl(&["get", prefix, "--prefix", "--keys-only"])
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// The server's process id (to kill it in fault tests).
    pub fn pid(&self) -> nix::unistd::Pid {
        self.process.pid()
    }
}
