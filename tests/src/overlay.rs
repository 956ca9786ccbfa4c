//! The lab for pod-network tests: nodes and pods as network namespaces.
//!
//! A [`Lab`] is a namespace holding a bridge (`br0`, [`LAB_GATEWAY`]/24)
//! where `kiln serve` (and etcd, on the lab's loopback) run; each [`Node`]
//! is a namespace wired to that bridge by a veth (`eth0`,
//! `10.78.0.(10+i)/24`) and runs a real `kiln-agent` with its flannel
//! paths in a temp dir; each [`Pod`] is a namespace that the real CNI
//! plugins of `/usr/lib/cni` (Debian's `containernetworking-plugins`) wire
//! to its node, executed per the conflist the node's agent wrote, chained
//! as the CNI spec says (`prevResult`). No packet leaves the namespaces the
//! test made; every namespace and process is dropped (deleted, stopped)
//! also when the test fails.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{KilnServer, Netns, Process, binaries, fake_image, read_log};

/// The lab bridge's address, where `kiln serve` listens.
pub const LAB_GATEWAY: &str = "10.78.0.1";
/// Debian's CNI plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";

/// How `kiln serve` offers its API in the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `--plain-http`: the API on the boot-asset listener.
    PlainHttp,
    /// TLS on its own listener, the certificate naming the bridge address;
    /// agents trust `STATE/ca.pem`.
    Tls,
}

/// The lab: a namespace with a bridge the nodes hang off.
pub struct Lab {
    /// The lab's namespace (bridge, `kiln serve`, etcd).
    pub ns: Netns,
    tag: String,
}

impl Lab {
    /// Makes the lab namespace and its bridge.
    pub fn new(tag: &str) -> Lab {
        let ns = Netns::new(tag);
        ns.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        ns.exec(&["ip", "addr", "add", &format!("{LAB_GATEWAY}/24"), "dev", "br0"]);
        ns.exec(&["ip", "link", "set", "br0", "up"]);
        Lab { ns, tag: tag.to_string() }
    }

    /// Starts `kiln serve` on the bridge with a fake image in `dir`, state
    /// in `dir/state`, the API as `api` says, and the extra arguments
    /// `store_args` (say, `--etcd URL`).
    pub fn serve(&self, dir: &Path, api: Api, store_args: &[&str]) -> KilnServer {
        let images = dir.join("images");
        fake_image(&images, "tiny");
        let state = dir.join("state");
        let mut cmd = self.ns.command(&binaries().kiln);
        cmd.arg("serve").arg("--images").arg(&images).arg("--state").arg(&state).args(["--listen", &format!("{LAB_GATEWAY}:0")]);
        match api {
            Api::PlainHttp => cmd.args(["--plain-http", "--api-listen", &format!("{LAB_GATEWAY}:0")]),
            Api::Tls => cmd.args(["--api-listen", &format!("{LAB_GATEWAY}:0"), "--tls-name", LAB_GATEWAY]),
        };
        cmd.args(store_args);
        KilnServer::spawn(cmd, &state)
    }

    /// Makes node `i` (1..=200): a namespace with `eth0` at
    /// `10.78.0.(10+i)/24` on the lab bridge, and its own directory under `dir`.
    pub fn node(&self, i: u8, dir: &Path) -> Node {
        let ns = Netns::new(&format!("{}-node{i}", self.tag));
        let host_end = format!("vn{i}");
        let out = Command::new("ip")
            .args(["-n", &self.ns.name, "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns.name])
            .output()
            .expect("ip runs");
        assert!(out.status.success(), "veth for node {i}: {}", String::from_utf8_lossy(&out.stderr));
        self.ns.exec(&["ip", "link", "set", &host_end, "master", "br0"]);
        self.ns.exec(&["ip", "link", "set", &host_end, "up"]);
        let address: Ipv4Addr = format!("10.78.0.{}", 10 + u32::from(i)).parse().expect("an address");
        ns.exec(&["ip", "addr", "add", &format!("{address}/24"), "dev", "eth0"]);
        ns.exec(&["ip", "link", "set", "eth0", "up"]);
        let dir = dir.join(format!("node{i}"));
        std::fs::create_dir_all(&dir).expect("node dir");
        Node { agent: None, index: i, address, dir, tag: self.tag.clone(), ns }
    }
}

/// A node: a namespace on the lab bridge, with its agent.
pub struct Node {
    /// The agent, once started (stopped first when the node is dropped).
    pub agent: Option<Process>,
    /// Its number.
    pub index: u8,
    /// Its address on the lab bridge: its public IP.
    pub address: Ipv4Addr,
    /// Its files: machine id, command line, flannel and CNI directories, logs.
    pub dir: PathBuf,
    /// The lab's tag, for the names of its pods' namespaces.
    tag: String,
    /// Its namespace.
    pub ns: Netns,
}

impl Node {
    /// The agent's log.
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// Where its agent writes `subnet.env`.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run-flannel")
    }

    /// Where its agent writes the conflist.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni-net.d")
    }

    /// Starts `kiln-agent` in the node: registers with `server`'s API
    /// (trusting its CA when it speaks TLS) using the bootstrap `token`, no
    /// metrics, flannel paths in the node's directory.
    pub fn start_agent(&mut self, server: &KilnServer, token: &str) {
        self.start_agent_as(server, Some(token), self.index);
    }

    /// As [`Node::start_agent`], with no join token: a machine kiln does
    /// not expect, which waits as pending until an operator approves it.
    pub fn start_agent_without_token(&mut self, server: &KilnServer) {
        self.start_agent_as(server, None, self.index);
    }

    /// As [`Node::start_agent`], with node `machine_of`'s machine id (a
    /// copy of that machine), and this node's own key.
    pub fn start_agent_as(&mut self, server: &KilnServer, token: Option<&str>, machine_of: u8) {
        let machine_id = self.dir.join("machine-id");
        std::fs::write(
            &machine_id,
            format!("{:032x}\n", 0x6b696c6e_u128 << 64 | u128::from(std::process::id()) << 8 | u128::from(machine_of)),
        )
        .expect("machine-id");
        let cmdline = self.dir.join("cmdline");
        std::fs::write(&cmdline, "console=ttyS0\n").expect("cmdline");
        let ca = server.ca.clone().unwrap_or_else(|| self.dir.join("no-ca.pem"));
        let mut cmd = self.ns.command(&binaries().agent);
        cmd.args(["--server", &server.node_api, "--no-metrics"])
            .args(token.map(|t| ["--token", t]).into_iter().flatten())
            .arg("--machine-id")
            .arg(&machine_id)
            .arg("--cmdline")
            .arg(&cmdline)
            .arg("--ca")
            .arg(ca)
            .arg("--identity-dir")
            .arg(self.dir.join("identity"))
            .arg("--flannel-run-dir")
            .arg(self.run_dir())
            .arg("--cni-conf-dir")
            .arg(self.cni_conf_dir())
            .arg("--cni-ipam-dir")
            .arg(self.dir.join("cni-ipam"))
            .env_remove("JOURNAL_STREAM")
            .env("RUST_LOG", "info");
        self.agent = Some(Process::spawn_logged(cmd, &format!("kiln-agent (node {})", self.index), &self.agent_log()));
    }

    /// The last lines of its agent's log.
    pub fn log(&self) -> String {
        read_log(&self.agent_log())
    }

    /// Runs `args` in the node; stdout, or a panic with stderr.
    pub fn sh(&self, args: &[&str]) -> String {
        let out = self.ns.command(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(out.status.success(), "node {}: {args:?}: {}", self.index, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip route show dev flannel.1`, `ip neigh show dev flannel.1` and
    /// `bridge fdb show dev flannel.1` (empty when there is no device).
    pub fn overlay_tables(&self) -> (String, String, String) {
        let run = |args: &[&str]| {
            let out = self.ns.command(args[0]).args(&args[1..]).stderr(Stdio::null()).output().expect("runs");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        (
            run(&["ip", "route", "show", "dev", "flannel.1"]),
            run(&["ip", "neigh", "show", "dev", "flannel.1"]),
            run(&["bridge", "fdb", "show", "dev", "flannel.1"]),
        )
    }

    /// Adds a pod: a namespace wired by the CNI plugins of the conflist the
    /// agent wrote, run inside the node as a container runtime would.
    pub fn add_pod(&self, name: &str) -> Pod {
        let ns = Netns::new(&format!("{}-node{}-{name}", self.tag, self.index));
        let list_path = self.cni_conf_dir().join("10-flannel.conflist");
        let text = std::fs::read_to_string(&list_path).unwrap_or_else(|e| panic!("{}: {e}", list_path.display()));
        let list: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", list_path.display()));
        let plugins = list["plugins"].as_array().unwrap_or_else(|| panic!("{}: no plugins", list_path.display()));
        let mut prev: Option<serde_json::Value> = None;
        for plugin in plugins {
            let mut conf = plugin.clone();
            conf["name"] = list["name"].clone();
            conf["cniVersion"] = list["cniVersion"].clone();
            if let Some(p) = &prev {
                conf["prevResult"] = p.clone();
            }
            let kind = plugin["type"].as_str().expect("a plugin type").to_string();
            let mut child = self
                .ns
                .command(Path::new(CNI_PATH).join(&kind))
                .env("CNI_COMMAND", "ADD")
                .env("CNI_CONTAINERID", &ns.name)
                .env("CNI_NETNS", format!("/run/netns/{}", ns.name))
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", CNI_PATH)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("CNI plugin {kind}: {e}"));
            child.stdin.take().expect("stdin").write_all(conf.to_string().as_bytes()).expect("plugin stdin");
            let out = child.wait_with_output().expect("plugin runs");
            assert!(
                out.status.success(),
                "CNI {kind} ADD for {} on node {}: {}{}\nconfig: {conf}",
                ns.name,
                self.index,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            prev = Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("CNI {kind} result: {e}")));
        }
        let result = prev.expect("at least one plugin");
        let address = result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no address in the CNI result {result}"));
        let ip: Ipv4Addr = address.split('/').next().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("CNI address {address:?}"));
        Pod { node: self.index, ip, ns }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The agent first, while its namespace still exists.
        self.agent.take();
    }
}

/// A pod: a namespace with `eth0` on its node's `cni0`.
pub struct Pod {
    /// The node it runs on.
    pub node: u8,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its namespace.
    pub ns: Netns,
}

impl Pod {
    /// Whether one ping from the pod reaches `ip` (2 s to answer).
    pub fn pings(&self, ip: Ipv4Addr) -> bool {
        ping(&self.ns, ip)
    }
}

/// Whether one ping from inside `ns` reaches `ip` (2 s to answer).
pub fn ping(ns: &Netns, ip: Ipv4Addr) -> bool {
    ns.command("ping")
        .args(["-c", "1", "-W", "2", &ip.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A UDP socket bound to `addr` inside the namespace `ns` (a thread enters
/// the namespace, binds, and hands the socket back: a socket stays in the
/// namespace it was made in).
pub fn udp_socket_in(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
        let socket = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("binding {addr} in {path}: {e}"));
        socket.set_read_timeout(Some(Duration::from_secs(3))).expect("a read timeout");
        socket
    })
    .join()
    .expect("the namespace thread")
}

/// Sends a datagram from `from` (a socket in one namespace) to `to` and
/// returns the source address `receiver` (bound at `to`, in another
/// namespace) saw it come from; tries three times.
pub fn seen_source(from: &UdpSocket, receiver: &UdpSocket, to: SocketAddr) -> Option<SocketAddr> {
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        from.send_to(b"kiln-overlay", to).ok()?;
        if let Ok((n, src)) = receiver.recv_from(&mut buf)
            && &buf[..n] == b"kiln-overlay"
        {
            return Some(src);
        }
    }
    None
}
