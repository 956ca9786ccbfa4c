//! Into a pool's VMs over SSH, as a user checks a cluster by hand: a key
//! the test makes, a profile whose user-data gives it to root (and writes
//! the agent's `/etc/kiln/cmdline`, as a profile with its own user-data
//! must), and, inside each VM, pods made from the node's own
//! `10-flannel.conflist`, pings between them, the overlay's tables, and
//! FDB changes with the time they happened (`guest_pod.py`).
//!
//! The VMs are on a network inside the lab's namespace: every `ssh` runs
//! there ([`Lab::command`]).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::libvirt::Lab;

/// What runs in the VM (python3 is there for cloud-init; ping is not).
const SCRIPT: &str = include_str!("guest_pod.py");
const SCRIPT_PATH: &str = "/root/guest_pod.py";

/// An SSH key pair made for one test.
pub struct SshKey {
    private: PathBuf,
    /// The public key, one line.
    pub public: String,
}

impl SshKey {
    /// A new ed25519 key in `dir`.
    pub fn new(dir: &Path) -> SshKey {
        std::fs::create_dir_all(dir).expect("the key's directory");
        let private = dir.join("id_ed25519");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-test", "-f"])
            .arg(&private)
            .output()
            .expect("ssh-keygen runs");
        assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
        let public = std::fs::read_to_string(private.with_extension("pub")).expect("the public key").trim().to_string();
        SshKey { private, public }
    }

    /// Writes `DIR/profiles/NAME.toml`: `image`, with user-data that lets
    /// root in with this key and writes the agent's join parameters.
    pub fn profile(&self, dir: &Path, name: &str, image: &str) {
        let profiles = dir.join("profiles");
        std::fs::create_dir_all(&profiles).expect("the profiles directory");
        let text = format!(
            "image = \"{image}\"\nuser-data = \"\"\"\n#cloud-config\nhostname: {{{{ hostname }}}}\ndisable_root: false\n\
             ssh_authorized_keys: [\"{}\"]\nwrite_files:\n  - path: /etc/kiln/cmdline\n    permissions: \"0600\"\n    \
             content: \"{{{{ kiln_cmdline }}}}\"\n\"\"\"\n",
            self.public
        );
        std::fs::write(profiles.join(format!("{name}.toml")), text).expect("the profile");
    }
}

/// One VM, reached as root over SSH.
pub struct Guest<'a> {
    lab: &'a Lab,
    key: &'a SshKey,
    /// Its node's name.
    pub name: String,
    /// Its address (the node's public IP).
    pub ip: IpAddr,
}

impl<'a> Guest<'a> {
    /// The VM of `node`, at its public IP.
    pub fn new(lab: &'a Lab, key: &'a SshKey, node: &kiln_core::Node) -> Guest<'a> {
        let ip = node.public_ip.unwrap_or_else(|| panic!("{} holds no lease: no public IP", node.name));
        Guest { lab, key, name: node.name.clone(), ip }
    }

    /// `ssh root@IP REMOTE`, in the lab's namespace.
    pub fn ssh(&self, remote: &str) -> Command {
        let mut cmd = self.lab.command(Path::new("ssh"));
        cmd.args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5", "-i"])
            .arg(&self.key.private)
            .arg(format!("root@{}", self.ip))
            .arg(remote);
        cmd
    }

    /// Runs `remote` with `input` on its stdin: its stdout, or what failed.
    pub fn run_with(&self, remote: &str, input: &[u8]) -> Result<String, String> {
        let mut child = self.ssh(remote).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("ssh runs");
        // A refused login closes stdin early: what ssh said tells why.
        let fed = child.stdin.take().expect("stdin").write_all(input);
        let out = child.wait_with_output().expect("ssh ends");
        if out.status.success() && fed.is_ok() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("{}: {remote}: {}{}", self.name, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Runs `remote`, which must succeed: its stdout.
    pub fn sh(&self, remote: &str) -> String {
        self.run_with(remote, b"").unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until root can log in (sshd and cloud-init's key come after
    /// the agent's registration), then copies the script in.
    pub fn wait_for_ssh(&self, timeout: Duration) {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            match self.run_with(&format!("cat > {SCRIPT_PATH}"), SCRIPT.as_bytes()) {
                Ok(_) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        panic!("no SSH into {} at {} in {timeout:?}: {last}", self.name, self.ip);
    }

    /// A pod named `name`, made by the CNI plugins of the node's conflist:
    /// its address.
    pub fn add_pod(&self, name: &str) -> Ipv4Addr {
        let out = self.sh(&format!("python3 {SCRIPT_PATH} add {name}"));
        out.trim().parse().unwrap_or_else(|e| panic!("{}: pod {name}'s address {out:?}: {e}", self.name))
    }

    /// Starts, in the background in pod `pod`, a listener that records the
    /// source of every test echo request for `seconds` ([`Guest::seen`]).
    pub fn listen(&self, pod: &str, seconds: u32) {
        self.sh(&format!("setsid -f ip netns exec {pod} python3 {SCRIPT_PATH} listen {seconds} > /root/seen 2>&1 < /dev/null"));
    }

    /// The sources the listener has seen so far.
    pub fn seen(&self) -> Vec<Ipv4Addr> {
        self.sh("cat /root/seen").lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// Pings `ip` from pod `pod`.
    pub fn ping(&self, pod: &str, ip: Ipv4Addr) -> Result<(), String> {
        self.run_with(&format!("ip netns exec {pod} python3 {SCRIPT_PATH} ping {ip}"), b"").map(|_| ())
    }

    /// `ip route`, `ip neigh` and `bridge fdb` of `flannel.1`.
    pub fn overlay_tables(&self) -> (String, String, String) {
        let tables = self.sh("ip route show dev flannel.1; echo '|'; ip neigh show dev flannel.1; echo '|'; bridge fdb show dev flannel.1");
        let mut parts = tables.split("|\n").map(str::to_string);
        let mut next = || parts.next().unwrap_or_default();
        (next(), next(), next())
    }

    /// Whether the VM's overlay holds `peer`'s route, neighbour and FDB
    /// entry (all three, as flannel writes them); `false` as soon as one
    /// is missing.
    pub fn has_peer(&self, peer: &kiln_core::Node) -> bool {
        let (subnet, addr, public) = peer_facts(peer);
        let (routes, neigh, fdb) = self.overlay_tables();
        routes.lines().any(|l| l.starts_with(&format!("{subnet} via {addr} ")) && l.contains("onlink"))
            && neigh.lines().any(|l| l.starts_with(&format!("{addr} lladdr ")) && l.contains("PERMANENT"))
            && fdb.lines().any(|l| l.contains(&format!(" dst {public} ")) && l.contains("self permanent"))
    }

    /// Whether the VM's overlay holds none of the three for `peer`.
    pub fn lacks_peer(&self, peer: &kiln_core::Node) -> bool {
        let (subnet, addr, public) = peer_facts(peer);
        let (routes, neigh, fdb) = self.overlay_tables();
        !routes.contains(&format!("{subnet} "))
            && !neigh.lines().any(|l| l.starts_with(&format!("{addr} ")))
            && !fdb.contains(&format!(" dst {public} "))
    }

    /// Starts watching the VM's FDB.
    pub fn watch_fdb(&self) -> FdbWatch {
        let mut child = self
            .ssh(&format!("python3 {SCRIPT_PATH} watch"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh runs");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push((now(), line));
            }
        });
        let watch = FdbWatch { child, stdin, lines };
        let started = watch.wait_line(Duration::from_secs(30), |l| l == "watching");
        assert!(started.is_some(), "{}: the FDB watch did not start", self.name);
        watch
    }
}

/// A peer's subnet, its network address and its public IP.
fn peer_facts(peer: &kiln_core::Node) -> (String, String, IpAddr) {
    let subnet = peer.subnet.unwrap_or_else(|| panic!("{} holds no lease", peer.name)).to_string();
    let addr = subnet.split('/').next().unwrap_or_default().to_string();
    (subnet, addr, peer.public_ip.unwrap_or_else(|| panic!("{} has no public IP", peer.name)))
}

/// The host's clock, in seconds since the epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs_f64()
}

/// `bridge monitor fdb` in a VM, each change with the VM's time, and the
/// VM's clock on request.
pub struct FdbWatch {
    child: Child,
    stdin: ChildStdin,
    /// Each line, with the host time it arrived.
    lines: Arc<Mutex<Vec<(f64, String)>>>,
}

impl FdbWatch {
    fn wait_line(&self, timeout: Duration, want: impl Fn(&str) -> bool) -> Option<(f64, String)> {
        crate::wait_for(timeout, || self.lines.lock().expect("lines").iter().find(|(_, l)| want(l)).cloned())
    }

    /// The VM's time of the first FDB change whose line holds `needle`.
    pub fn entry(&self, needle: &str, timeout: Duration) -> Option<f64> {
        let (_, line) = self.wait_line(timeout, |l| l.starts_with("fdb ") && l.contains(needle))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// The VM's clock minus the host's, from the one of five readings with
    /// the shortest round trip, and that round trip.
    pub fn offset(&mut self) -> (f64, f64) {
        let mut best: Option<(f64, f64)> = None;
        for _ in 0..5 {
            let seen = self.clocks().len();
            let sent = now();
            self.stdin.write_all(b"\n").and_then(|()| self.stdin.flush()).expect("the watch's stdin");
            let got = crate::wait_for(Duration::from_secs(10), || self.clocks().get(seen).copied());
            let (arrived, guest) = got.expect("the VM answers with its clock");
            let round_trip = arrived - sent;
            if best.is_none_or(|(_, rt)| round_trip < rt) {
                best = Some((guest - (sent + arrived) / 2.0, round_trip));
            }
        }
        best.expect("five readings")
    }

    fn clocks(&self) -> Vec<(f64, f64)> {
        let lines = self.lines.lock().expect("lines");
        lines.iter().filter_map(|(at, l)| Some((*at, l.strip_prefix("clock ")?.parse().ok()?))).collect()
    }
}

impl Drop for FdbWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
