//! A private libvirtd for end-to-end pool tests: `tests/lab/libvirt-lab.sh
//! up` starts libvirtd and virtlogd (system mode) inside a network namespace
//! it makes, with their own state directories, and an isolated libvirt
//! network whose DHCP (libvirt's dnsmasq) points PXE clients at
//! `http://BRIDGE_IP:PORT/boot.ipxe`. Everything lives in that namespace:
//! the host reaches libvirtd through its unix socket only. Dropping the
//! [`Lab`] runs `down`, which stops every process it started by PID and
//! deletes the namespace and directories, also after a failed test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{root, target_dir};

/// A running lab.
pub struct Lab {
    env: BTreeMap<String, String>,
    /// The libvirt URI of the private libvirtd (`qemu+unix:///system?socket=...`).
    pub uri: String,
    /// The same libvirtd over TCP (`qemu+tcp://BRIDGE_IP/system`), reachable
    /// from inside the namespace only: how a remote host is reached.
    pub tcp_uri: String,
    /// The lab's directory: where the daemons' `/var/lib/libvirt` and
    /// `/var/log/libvirt` are, seen from the host.
    pub dir: PathBuf,
    /// The network namespace everything runs in.
    pub netns: String,
    /// The libvirt network nodes join.
    pub network: String,
    /// The bridge's address: where a server in the namespace listens.
    pub bridge_ip: String,
    /// The port the network's DHCP tells PXE clients to fetch `/boot.ipxe` from.
    pub http_port: u16,
}

fn script() -> PathBuf {
    root().join("tests/lab/libvirt-lab.sh")
}

impl Lab {
    /// Starts a lab named `name` (its namespace; short: socket paths are
    /// limited to 108 bytes) serving PXE clients from port `http_port`.
    pub fn up(name: &str, http_port: u16) -> Lab {
        let dir = Path::new("/tmp").join(format!("kl-{name}"));
        let mut env = BTreeMap::from([
            ("KILN_LAB_DIR".to_string(), dir.display().to_string()),
            ("KILN_LAB_NS".to_string(), name.to_string()),
            ("KILN_LAB_NET".to_string(), name.to_string()),
            ("KILN_LAB_HTTP_PORT".to_string(), http_port.to_string()),
            // libvirt's QEMU capabilities, probed once (8 s) and kept.
            ("KILN_LAB_CACHE".to_string(), target_dir().join("libvirt-lab-cache").display().to_string()),
        ]);
        // A lab left by a killed test run goes first.
        let _ = Command::new("bash")
            .arg(script())
            .arg("down")
            .envs(&env)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        // Output to a file, not a pipe: the daemons it starts keep their
        // inherited descriptors, and a pipe would never reach its end.
        let log = std::env::temp_dir().join(format!("kiln-lab-{name}.out"));
        let file = std::fs::File::create(&log).expect("creating the lab's output file");
        let status = Command::new("bash")
            .arg(script())
            .arg("up")
            .envs(&env)
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().expect("cloning a file handle"))
            .stderr(file)
            .status()
            .expect("bash runs");
        let stdout = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        assert!(status.success(), "libvirt-lab.sh up failed:\n{stdout}");
        for line in stdout.lines() {
            if let Some((k, v)) = line.split_once('=')
                && k.starts_with("KILN_LAB_")
            {
                env.insert(k.to_string(), v.to_string());
            }
        }
        let get = |k: &str| env.get(k).cloned().unwrap_or_else(|| panic!("libvirt-lab.sh up printed no {k}:\n{stdout}"));
        Lab {
            uri: get("KILN_LAB_URI"),
            tcp_uri: get("KILN_LAB_TCP_URI"),
            dir: PathBuf::from(get("KILN_LAB_DIR")),
            netns: get("KILN_LAB_NS"),
            network: get("KILN_LAB_NET"),
            bridge_ip: get("KILN_LAB_BRIDGE_IP"),
            http_port,
            env,
        }
    }

    /// A path as the lab's daemons see it (under `/var/lib/libvirt` or
    /// `/var/log/libvirt`), as the host sees it.
    pub fn host_path(&self, path: &str) -> PathBuf {
        for (inside, outside) in [("/var/lib/libvirt", "lib"), ("/var/log/libvirt", "log")] {
            if let Some(rest) = path.strip_prefix(inside) {
                return self.dir.join(outside).join(rest.trim_start_matches('/'));
            }
        }
        panic!("{path} is not in a directory the lab binds");
    }

    /// `program args...` inside the lab's network namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }

    /// A TCP listener on `addr` inside the lab's namespace (a thread enters
    /// it, binds and hands the socket back: a socket stays in the namespace
    /// it was made in).
    pub fn tcp_listener(&self, addr: std::net::SocketAddr) -> std::net::TcpListener {
        let path = format!("/run/netns/{}", self.netns);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr} in {path}: {e}"))
        })
        .join()
        .expect("the namespace thread")
    }

    /// `virsh -c URI args...`: stdout.
    pub fn virsh(&self, args: &[&str]) -> String {
        let out = Command::new("virsh").args(["-c", &self.uri]).args(args).output().expect("virsh runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let status = Command::new("bash").arg(script()).arg("down").envs(&self.env).stdout(std::process::Stdio::null()).status();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("libvirt-lab.sh down failed: {status:?}");
        }
    }
}

/// `kiln serve --pools` in a lab's namespace (TCG), and the `kiln` CLI
/// pointed at its API from there.
pub struct PoolServer<'a> {
    lab: &'a Lab,
    images: PathBuf,
    state: PathBuf,
    /// The API's URL, as the namespace reaches it.
    pub api: String,
    /// Nodes on the network kiln makes (its defaults), not the lab's.
    kiln_network: bool,
    /// The loopback address `kiln serve` listens on (on kiln's network).
    ip: String,
}

impl<'a> PoolServer<'a> {
    /// For `kiln serve` in `lab` with these images and state directory,
    /// on the lab's bridge, its nodes on the lab's network (whose DHCP the
    /// lab wrote to point at that bridge).
    pub fn new(lab: &'a Lab, images: &Path, state: &Path) -> Self {
        let api = format!("https://{}:8443", lab.bridge_ip);
        PoolServer { lab, images: images.to_path_buf(), state: state.to_path_buf(), api, kiln_network: false, ip: "127.0.0.1".into() }
    }

    /// For `kiln serve` in `lab` as a user runs it: on loopback (the
    /// namespace's) with no network flag, its nodes on the network kiln
    /// makes on the lab's libvirtd, where kiln serves too.
    pub fn on_kiln_network(lab: &'a Lab, images: &Path, state: &Path) -> Self {
        let api = "https://127.0.0.1:8443".to_string();
        PoolServer { lab, images: images.to_path_buf(), state: state.to_path_buf(), api, kiln_network: true, ip: "127.0.0.1".into() }
    }

    /// A second server beside this one, as on another machine: at the
    /// same ports on another loopback address `ip`, with its own state
    /// directory `state` holding a copy of this one's (the same CA: nodes
    /// trust both, and this one's operator certificate is good there).
    /// kiln's network's address is one only: the server that binds it
    /// first serves nodes there, as a virtual IP would.
    pub fn beside(&self, state: &Path, ip: &str) -> PoolServer<'a> {
        let copied = Command::new("cp").arg("-a").arg(&self.state).arg(state).status().expect("cp runs");
        assert!(copied.success(), "copying {} to {}", self.state.display(), state.display());
        PoolServer {
            lab: self.lab,
            images: self.images.clone(),
            state: state.to_path_buf(),
            api: format!("https://{ip}:8443"),
            kiln_network: self.kiln_network,
            ip: ip.into(),
        }
    }

    /// Starts `kiln serve` with the pool files in `dir`, and `extra` arguments.
    pub fn serve(&self, dir: &Path, extra: &[&str]) -> crate::KilnServer {
        let lab = self.lab;
        let mut cmd = lab.command(&crate::binaries().kiln);
        cmd.arg("serve").arg("--images").arg(&self.images).arg("--state").arg(&self.state).arg("--pools").arg(dir);
        if self.kiln_network {
            let ip = &self.ip;
            cmd.args(["--listen", &format!("{ip}:{}", lab.http_port), "--api-listen", &format!("{ip}:8443"), "--tls-name", ip]);
        } else {
            cmd.args(["--listen", &format!("{}:{}", lab.bridge_ip, lab.http_port), "--api-listen", &format!("{}:8443", lab.bridge_ip)]);
            cmd.args(["--pool-network", &lab.network]);
        }
        cmd.args(["--pool-accel", "qemu"]).args(extra);
        crate::KilnServer::spawn(cmd, &self.state)
    }

    /// `kiln ARGS`: whether it succeeded, and its stdout and stderr.
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = self.run(args);
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }

    /// `kiln ARGS`, which must succeed: its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "kiln {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = self.lab.command(&crate::binaries().kiln);
        cmd.args(args).arg("--server").arg(&self.api).arg("--state").arg(&self.state).output().expect("kiln runs")
    }

    /// Every registered node (`kiln nodes --json`).
    pub fn nodes(&self) -> Vec<kiln_core::Node> {
        let out = self.cli_ok(&["nodes", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kiln nodes --json: {e}: {out}"))
    }

    /// The names of `pool`'s registered nodes, sorted.
    pub fn registered(&self, pool: &str) -> Vec<String> {
        let mut names: Vec<String> = self.nodes().into_iter().filter(|n| n.pool.as_deref() == Some(pool)).map(|n| n.name).collect();
        names.sort();
        names
    }

    /// The first pool of `kiln pools --json`.
    pub fn pool(&self) -> serde_json::Value {
        serde_json::from_str::<Vec<serde_json::Value>>(&self.cli_ok(&["pools", "--json"])).unwrap().remove(0)
    }

    /// How many of `pool`'s domains the lab's libvirtd has.
    pub fn domains(&self, pool: &str) -> usize {
        let prefix = format!("kiln-{pool}-");
        self.lab.virsh(&["list", "--all", "--name"]).lines().filter(|l| l.starts_with(&prefix)).count()
    }
}
