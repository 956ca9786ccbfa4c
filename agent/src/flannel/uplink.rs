//! The uplink: the interface VXLAN packets leave by, and the node's public
//! IP (the VTEP's local address, the address peers send to).
//!
//! As flanneld: `--iface` and `--public-ip` choose them; by default they
//! are the interface and source address the kernel uses to reach the
//! control plane (a connected UDP socket tells, without sending anything).
//!
//! Discovery is async: the control plane's name is resolved with
//! `tokio::net::lookup_host`, and the rest are system calls that do not
//! wait (getifaddrs, a UDP connect, a sysfs read), so the agent's runtime
//! keeps hearing its shutdown signal while the uplink cannot be found.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;

use super::Error;

/// The uplink the overlay rides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    /// Interface name.
    pub name: String,
    /// The node's public IP: the VTEP's local address.
    pub address: Ipv4Addr,
    /// The interface's MTU.
    pub mtu: u32,
}

/// What the operator chose (`--iface`, `--public-ip`), and where the
/// control plane is (`host:port`) for the default.
#[derive(Debug, Clone)]
pub struct Choice<'a> {
    /// `--iface`.
    pub iface: Option<&'a str>,
    /// `--public-ip`.
    pub public_ip: Option<Ipv4Addr>,
    /// The control plane's `host:port`.
    pub server: &'a str,
}

/// Finds the uplink; `sys` is sysfs (for the MTU).
pub async fn discover(choice: &Choice<'_>, sys: &Path) -> Result<Uplink, Error> {
    let addrs = ipv4_addresses()?;
    let (name, address) = match (choice.iface, choice.public_ip) {
        (Some(iface), Some(ip)) => (iface.to_string(), ip),
        (Some(iface), None) => {
            let ip = addrs
                .iter()
                .find(|(n, _)| n == iface)
                .map(|(_, a)| *a)
                .ok_or_else(|| Error::Uplink(format!("interface {iface} has no IPv4 address")))?;
            (iface.to_string(), ip)
        }
        (None, Some(ip)) => {
            let name = owner(&addrs, ip).ok_or_else(|| Error::Uplink(format!("no interface has the public IP {ip}; pass --iface")))?;
            (name, ip)
        }
        (None, None) => {
            let ip = source_address(choice.server).await?;
            let name = owner(&addrs, ip)
                .ok_or_else(|| Error::Uplink(format!("the source address {ip} towards {} is on no interface", choice.server)))?;
            (name, ip)
        }
    };
    let mtu_path = sys.join("class/net").join(&name).join("mtu");
    let mtu = std::fs::read_to_string(&mtu_path)
        .map_err(|source| Error::Io { path: mtu_path.display().to_string(), source })?
        .trim()
        .parse::<u32>()
        .map_err(|_| Error::Uplink(format!("{}: not an MTU", mtu_path.display())))?;
    Ok(Uplink { name, address, mtu })
}

/// The source address the kernel picks to reach `server` (`host:port`).
pub async fn source_address(server: &str) -> Result<Ipv4Addr, Error> {
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host(server)
        .await
        .map_err(|source| Error::Io { path: format!("resolving {server}"), source })?
        .filter(SocketAddr::is_ipv4)
        .collect();
    let target = resolved.first().ok_or_else(|| Error::Uplink(format!("{server} has no IPv4 address")))?;
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|source| Error::Io { path: "a UDP socket".into(), source })?;
    socket.connect(target).map_err(|source| Error::Io { path: format!("routing to {target}"), source })?;
    match socket.local_addr().map_err(|source| Error::Io { path: format!("source address towards {target}"), source })?.ip() {
        IpAddr::V4(ip) if !ip.is_unspecified() => Ok(ip),
        other => Err(Error::Uplink(format!("no IPv4 source address towards {target} (got {other})"))),
    }
}

fn owner(addrs: &[(String, Ipv4Addr)], ip: Ipv4Addr) -> Option<String> {
    addrs.iter().find(|(_, a)| *a == ip).map(|(n, _)| n.clone())
}

/// Every interface's IPv4 addresses, in the kernel's order.
fn ipv4_addresses() -> Result<Vec<(String, Ipv4Addr)>, Error> {
    let list = nix::ifaddrs::getifaddrs().map_err(|e| Error::Io { path: "getifaddrs".into(), source: e.into() })?;
    Ok(list
        .filter_map(|i| {
            let a = i.address?.as_sockaddr_in()?.ip();
            Some((i.interface_name, a))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loopback_routes_through_lo() {
        let sys = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(sys.path().join("class/net/lo")).unwrap();
        std::fs::write(sys.path().join("class/net/lo/mtu"), "65536\n").unwrap();
        let up = discover(&Choice { iface: None, public_ip: None, server: "127.0.0.1:9" }, sys.path()).await.unwrap();
        assert_eq!(up, Uplink { name: "lo".into(), address: Ipv4Addr::LOCALHOST, mtu: 65536 });
        let err = discover(&Choice { iface: None, public_ip: Some("192.0.2.77".parse().unwrap()), server: "127.0.0.1:9" }, sys.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("192.0.2.77") && err.contains("--iface"), "{err}");
    }
}
