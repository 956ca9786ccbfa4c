//! SIGTERM is always heard: the real `kiln-agent`, with a control plane
//! nobody answers on and discovery that keeps failing, exits at once and
//! cleanly when told to, saying it is leaving. (Before discovery was async,
//! its retry loop slept on the runtime's only thread and the signal was
//! never polled: the agent died of the signal or hung.)

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

mod common;

/// A loopback port nobody listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Starts the agent with `proc`, a small sysfs and `--iface nosuch0`, lets
/// it fail for a while, sends SIGTERM; its exit status, how long it took, and its log.
fn terminate_while_failing(proc: &Path) -> (std::process::ExitStatus, Duration, String) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("cmdline"), "console=ttyS0\n").unwrap();
    std::fs::write(dir.join("machine-id"), "0123456789abcdef0123456789abcdef\n").unwrap();
    for (file, text) in [("sys/devices/system/cpu/online", "0-1\n"), ("sys/class/net/eth0/address", "52:54:00:ab:cd:ef\n")] {
        std::fs::create_dir_all(dir.join(file).parent().unwrap()).unwrap();
        std::fs::write(dir.join(file), text).unwrap();
    }
    let log = dir.join("agent.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln-agent"));
    let server = format!("http://127.0.0.1:{}", closed_port());
    cmd.args(["--server", &server, "--token", "boot", "--no-metrics", "--iface", "nosuch0"]);
    for (flag, path) in [
        ("--cmdline", dir.join("cmdline")),
        ("--machine-id", dir.join("machine-id")),
        ("--ca", dir.join("no-ca.pem")),
        ("--proc", proc.to_path_buf()),
        ("--sys", dir.join("sys")),
        ("--flannel-run-dir", dir.join("run-flannel")),
        ("--cni-conf-dir", dir.join("cni-conf")),
        ("--cni-ipam-dir", dir.join("cni-ipam")),
    ] {
        cmd.arg(flag).arg(path);
    }
    cmd.env_remove("JOURNAL_STREAM").env("RUST_LOG", "info").stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
    let mut agent = common::Guard(cmd.spawn().expect("kiln-agent starts"));
    let child = &mut agent.0;
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "the agent keeps retrying:\n{}", std::fs::read_to_string(&log).unwrap());
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let sent = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if sent.elapsed() > Duration::from_secs(5) {
            panic!("no exit within 5 s of SIGTERM:\n{}", std::fs::read_to_string(&log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, sent.elapsed(), std::fs::read_to_string(&log).unwrap())
}

#[test]
fn sigterm_while_the_uplink_and_the_control_plane_cannot_be_found() {
    let empty = tempfile::tempdir().unwrap();
    // (case, --proc, what the agent must have logged while failing)
    let cases = [
        ("no uplink, control plane unreachable", common::fixtures().join("proc"), "interface nosuch0 has no IPv4 address"),
        ("identity unreadable", empty.path().to_path_buf(), "reading this node's identity"),
    ];
    for (case, proc, failing) in cases {
        let (status, took, log) = terminate_while_failing(&proc);
        assert!(log.contains(failing), "case {case}: the agent was failing as the case says:\n{log}");
        assert!(status.success(), "case {case}: a clean exit, not {status} (after {took:?}):\n{log}");
        assert!(log.contains("SIGTERM: leaving the cluster"), "case {case}: says it is leaving:\n{log}");
    }
}
