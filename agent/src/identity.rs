//! The node's identity, read from the host: machine id, hostname, NICs,
//! addresses, CPUs, memory, kernel.

use std::net::IpAddr;
use std::path::Path;

use kiln_core::{Mac, RegisterRequest};

use crate::Roots;

/// Reading the node's identity failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file did not hold what it should.
    #[error("{path}: {reason}")]
    Parse {
        /// The path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.display().to_string(), source })
}

/// The machine id: `/etc/machine-id` if it holds one; else the DMI product
/// UUID (stable across reboots of a diskless node); else a random id,
/// written to `/etc/machine-id` so it stays the same while the node is up.
pub fn machine_id(roots: &Roots) -> Result<String, Error> {
    if let Ok(text) = std::fs::read_to_string(&roots.machine_id) {
        let id = text.trim().to_ascii_lowercase();
        if is_machine_id(&id) {
            return Ok(id);
        }
    }
    let uuid_path = roots.sys.join("class/dmi/id/product_uuid");
    if let Ok(text) = std::fs::read_to_string(&uuid_path) {
        let id: String = text.trim().to_ascii_lowercase().chars().filter(|c| *c != '-').collect();
        if is_machine_id(&id) && id.bytes().any(|b| b != b'0') && id != "f".repeat(32) {
            return Ok(id);
        }
    }
    let id = hex::encode(rand::random::<[u8; 16]>());
    if let Some(dir) = roots.machine_id.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.display().to_string(), source })?;
    }
    std::fs::write(&roots.machine_id, format!("{id}\n"))
        .map_err(|source| Error::Io { path: roots.machine_id.display().to_string(), source })?;
    Ok(id)
}

fn is_machine_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// MACs of every NIC under `sys/class/net` except loopback and all-zero ones, sorted.
pub fn macs(sys: &Path) -> Result<Vec<Mac>, Error> {
    let dir = sys.join("class/net");
    let entries = std::fs::read_dir(&dir).map_err(|source| Error::Io { path: dir.display().to_string(), source })?;
    let mut macs: Vec<Mac> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != "lo")
        .filter_map(|e| std::fs::read_to_string(e.path().join("address")).ok())
        .filter_map(|a| a.trim().parse::<Mac>().ok())
        .filter(|m| !m.is_zero())
        .collect();
    macs.sort();
    macs.dedup();
    Ok(macs)
}

/// `MemTotal` from `proc/meminfo`, in bytes.
pub fn memory_bytes(proc: &Path) -> Result<u64, Error> {
    let path = proc.join("meminfo");
    let text = read(&path)?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| Error::Parse { path: path.display().to_string(), reason: "no MemTotal line".into() })
}

/// Online CPUs, from `sys/devices/system/cpu/online` (`0-3,6`).
pub fn cpus(sys: &Path) -> Result<u32, Error> {
    let path = sys.join("devices/system/cpu/online");
    let text = read(&path)?;
    parse_cpu_list(text.trim())
        .ok_or_else(|| Error::Parse { path: path.display().to_string(), reason: format!("not a CPU list: {:?}", text.trim()) })
}

fn parse_cpu_list(list: &str) -> Option<u32> {
    let mut n = 0;
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => n += b.parse::<u32>().ok()?.checked_sub(a.parse::<u32>().ok()?)? + 1,
            None => {
                part.parse::<u32>().ok()?;
                n += 1
            }
        }
    }
    Some(n)
}

/// Global-scope IP addresses of the host's interfaces (no loopback, no link-local).
pub fn addresses() -> Vec<IpAddr> {
    let Ok(ifaddrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let mut out: Vec<IpAddr> = ifaddrs
        .filter_map(|i| i.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() { Some(IpAddr::V4(v4.ip())) } else { a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())) }
        })
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
            IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified(),
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Where Prometheus should scrape this node, given where metrics listen:
/// that address when it is a specific one of the node's own, routable
/// addresses (none otherwise: the server would refuse it); else the node's
/// first IPv4 address with the port, or `None` when that is what the
/// control plane assumes anyway (first address, port 9100).
pub fn metrics_endpoint(listen: std::net::SocketAddr, addresses: &[IpAddr]) -> Option<String> {
    if !listen.ip().is_unspecified() {
        // The server takes only one of the node's own, routable addresses.
        let ip = listen.ip();
        return (addresses.contains(&ip) && kiln_core::node::is_scrapeable(ip)).then(|| listen.to_string());
    }
    if listen.port() == kiln_core::node::METRICS_PORT {
        return None;
    }
    let ip = addresses.iter().find(|a| a.is_ipv4()).or(addresses.first())?;
    Some(std::net::SocketAddr::new(*ip, listen.port()).to_string())
}

/// Everything the agent registers with. `image_digest` comes from the
/// kernel command line (the server that booted the node put it there).
pub fn gather(roots: &Roots, image_digest: &str) -> Result<RegisterRequest, Error> {
    let uname = nix::sys::utsname::uname().map_err(|e| Error::Io { path: "uname(2)".into(), source: e.into() })?;
    let hostname = nix::unistd::gethostname()
        .map_err(|e| Error::Io { path: "gethostname(2)".into(), source: e.into() })?
        .to_string_lossy()
        .into_owned();
    Ok(RegisterRequest {
        machine_id: machine_id(roots)?,
        hostname,
        macs: macs(&roots.sys)?,
        addresses: addresses(),
        cpus: cpus(&roots.sys)?,
        memory_bytes: memory_bytes(&roots.proc)?,
        kernel: uname.release().to_string_lossy().into_owned(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        image_digest: image_digest.to_string(),
        metrics: None,
        public_ip: None,
        vtep_mac: None,
        uplink_mtu: None,
        csr: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (tempfile::TempDir, Roots) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let w = |p: &str, s: &str| {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, s).unwrap();
        };
        w("proc/meminfo", "MemTotal:         492392 kB\nMemFree:          400000 kB\n");
        w("sys/devices/system/cpu/online", "0-1\n");
        w("sys/class/net/lo/address", "00:00:00:00:00:00\n");
        w("sys/class/net/eth0/address", "52:54:00:AB:CD:EF\n");
        w("sys/class/net/eth1/address", "52:54:00:00:00:01\n");
        w("sys/class/dmi/id/product_uuid", "6F8C1C2E-1A2B-4C3D-8E9F-0A1B2C3D4E5F\n");
        let roots = Roots {
            proc: root.join("proc"),
            sys: root.join("sys"),
            machine_id: root.join("etc/machine-id"),
            cmdline: root.join("proc/cmdline"),
        };
        (dir, roots)
    }

    #[test]
    fn reads_fixture_tree() {
        let (_dir, roots) = fixture();
        assert_eq!(memory_bytes(&roots.proc).unwrap(), 492392 * 1024);
        assert_eq!(cpus(&roots.sys).unwrap(), 2);
        let macs: Vec<String> = macs(&roots.sys).unwrap().iter().map(Mac::to_string).collect();
        assert_eq!(macs, ["52:54:00:00:00:01", "52:54:00:ab:cd:ef"]);
    }

    #[test]
    fn machine_id_sources_in_order() {
        let (_dir, roots) = fixture();
        assert_eq!(machine_id(&roots).unwrap(), "6f8c1c2e1a2b4c3d8e9f0a1b2c3d4e5f", "from DMI when /etc/machine-id is missing");
        std::fs::create_dir_all(roots.machine_id.parent().unwrap()).unwrap();
        std::fs::write(&roots.machine_id, "0123456789ABCDEF0123456789abcdef\n").unwrap();
        assert_eq!(machine_id(&roots).unwrap(), "0123456789abcdef0123456789abcdef", "from /etc/machine-id");
        std::fs::write(&roots.machine_id, "").unwrap();
        std::fs::write(roots.sys.join("class/dmi/id/product_uuid"), "00000000-0000-0000-0000-000000000000\n").unwrap();
        let random = machine_id(&roots).unwrap();
        assert!(is_machine_id(&random));
        assert_eq!(machine_id(&roots).unwrap(), random, "a generated id is kept");
    }

    #[test]
    fn metrics_endpoints() {
        let addrs: Vec<IpAddr> = vec!["fe80::1".parse().unwrap(), "10.0.2.15".parse().unwrap()];
        for (listen, want) in [
            ("10.0.2.15:9200", Some("10.0.2.15:9200")),
            // Not one the control plane scrapes: the node's own, routable addresses only.
            ("127.0.0.1:9200", None),
            ("10.9.9.9:9200", None),
            ("0.0.0.0:9100", None),
            ("0.0.0.0:9200", Some("10.0.2.15:9200")),
            ("[::]:9200", Some("10.0.2.15:9200")),
        ] {
            assert_eq!(metrics_endpoint(listen.parse().unwrap(), &addrs).as_deref(), want, "listen {listen}");
        }
    }

    #[test]
    fn cpu_lists() {
        for (list, want) in [("0", Some(1)), ("0-3", Some(4)), ("0-3,6", Some(5)), ("0,2,4-5", Some(4)), ("x", None), ("3-1", None)] {
            assert_eq!(parse_cpu_list(list), want, "list {list:?}");
        }
    }
}
