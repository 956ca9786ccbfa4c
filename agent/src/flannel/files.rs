//! The two files the node's container runtime reads: flannel's
//! `subnet.env` and the CNI network configuration list.
//!
//! Both are rendered by pure functions (unit-tested against the formats
//! flanneld and kube-flannel write) and written atomically: to a temporary
//! name in the same directory, then renamed over the old file, so a reader
//! never sees half a file.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use kiln_core::{Ipv4Cidr, Lease};
use serde::Serialize;

use super::Error;

/// `subnet.env`, as flanneld writes it (`FLANNEL_SUBNET` is the subnet's
/// first host address with the subnet's prefix length). `ipmasq` says
/// whether the agent masquerades traffic leaving the pod network.
pub fn subnet_env(lease: &Lease, ipmasq: bool) -> String {
    format!(
        "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
        lease.network,
        first_host(&lease.subnet),
        lease.subnet.prefix,
        lease.mtu,
        ipmasq
    )
}

/// The subnet's first host address (`10.244.1.0/24` → `10.244.1.1`): the
/// gateway address the CNI bridge takes.
pub fn first_host(subnet: &Ipv4Cidr) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.addr).wrapping_add(1))
}

/// The CNI network name, as kube-flannel's `cni-conf.json` calls it.
pub const NETWORK_NAME: &str = "cbr0";
/// CNI spec version of the list: the one kube-flannel writes; Debian's
/// containernetworking-plugins 1.1.1 speak 0.1.0 to 1.0.0.
pub const CNI_VERSION: &str = "0.3.1";
/// The Linux bridge pods hang off, as flannel's CNI plugin names it.
pub const BRIDGE: &str = "cni0";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfList<'a> {
    name: &'a str,
    cni_version: &'a str,
    plugins: (Bridge<'a>, Portmap),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Bridge<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    bridge: &'a str,
    is_gateway: bool,
    is_default_gateway: bool,
    hairpin_mode: bool,
    ip_masq: bool,
    mtu: u32,
    ipam: HostLocal<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HostLocal<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    ranges: [[Range; 1]; 1],
    routes: [Route; 1],
    data_dir: &'a str,
}

#[derive(Serialize)]
struct Range {
    subnet: String,
}

#[derive(Serialize)]
struct Route {
    dst: String,
}

#[derive(Serialize)]
struct Portmap {
    #[serde(rename = "type")]
    kind: &'static str,
    capabilities: Capabilities,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Capabilities {
    port_mappings: bool,
}

/// `10-flannel.conflist`: what kube-flannel's `flannel` CNI plugin would
/// delegate to, written out directly (Debian ships no `flannel` plugin):
/// `bridge` on `cni0` as the pods' gateway and default gateway, hairpin on,
/// no masquerading (pod-to-pod traffic keeps its addresses), the lease's
/// MTU, `host-local` addresses from the node's subnet with a route to the
/// whole pod network; then `portmap` for `hostPort`s. `ipam_dir` is
/// host-local's `dataDir`.
pub fn conflist(lease: &Lease, ipam_dir: &Path) -> String {
    let ipam_dir = ipam_dir.to_string_lossy();
    let list = ConfList {
        name: NETWORK_NAME,
        cni_version: CNI_VERSION,
        plugins: (
            Bridge {
                kind: "bridge",
                bridge: BRIDGE,
                is_gateway: true,
                is_default_gateway: true,
                hairpin_mode: true,
                ip_masq: false,
                mtu: lease.mtu,
                ipam: HostLocal {
                    kind: "host-local",
                    ranges: [[Range { subnet: lease.subnet.to_string() }]],
                    routes: [Route { dst: lease.network.to_string() }],
                    data_dir: &ipam_dir,
                },
            },
            Portmap { kind: "portmap", capabilities: Capabilities { port_mappings: true } },
        ),
    };
    let mut text = serde_json::to_string_pretty(&list).expect("a conflist serializes");
    text.push('\n');
    text
}

/// Writes `contents` to `path` atomically: a temporary file in the same
/// directory (created if missing), synced, then renamed over `path`.
pub fn write_atomic(path: &Path, contents: &str) -> Result<(), Error> {
    use std::io::Write;
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| Error::Io { path: p, source }
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(contents.as_bytes()).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes `path`; a file already gone is fine.
pub fn remove(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io { path: path.display().to_string(), source: e }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(network: &str, subnet: &str, mtu: u32) -> Lease {
        Lease { network: network.parse().unwrap(), subnet: subnet.parse().unwrap(), mtu, vni: 1, backend: kiln_core::Backend::Vxlan }
    }

    #[test]
    fn subnet_env_cases() {
        for (case, l, masq, want) in [
            (
                "a /24 in the default network",
                lease("10.244.0.0/16", "10.244.1.0/24", 1450),
                false,
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
            ),
            (
                "a /26 with jumbo frames, masquerading",
                lease("10.42.0.0/16", "10.42.7.64/26", 8950),
                true,
                "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.7.65/26\nFLANNEL_MTU=8950\nFLANNEL_IPMASQ=true\n",
            ),
        ] {
            assert_eq!(subnet_env(&l, masq), want, "case: {case}");
        }
    }

    #[test]
    fn conflist_is_what_kube_flannel_delegates_to() {
        let text = conflist(&lease("10.244.0.0/16", "10.244.3.0/24", 1450), Path::new("/var/lib/cni/networks"));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let want = serde_json::json!({
            "name": "cbr0",
            "cniVersion": "0.3.1",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "isDefaultGateway": true,
                    "hairpinMode": true,
                    "ipMasq": false,
                    "mtu": 1450,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": "10.244.3.0/24"}]],
                        "routes": [{"dst": "10.244.0.0/16"}],
                        "dataDir": "/var/lib/cni/networks"
                    }
                },
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        assert_eq!(v, want, "conflist:\n{text}");
        assert!(text.starts_with("{\n  \"name\": \"cbr0\",\n  \"cniVersion\""), "name and version come first:\n{text}");
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        write_atomic(&path, "one\n").unwrap();
        write_atomic(&path, "two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("subnet.env")], "only the file itself is left");
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert!(!path.exists());
    }
}
