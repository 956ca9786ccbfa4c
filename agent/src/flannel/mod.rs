//! The flannel side of the agent: the node's part of the pod network, with
//! flannel's vxlan backend semantics, so a stock flanneld and kiln nodes
//! can share one overlay.
//!
//! Before registering, [`Overlay::prepare`] finds the uplink ([`uplink`])
//! and puts the node's public IP, uplink MTU and VTEP MAC in the
//! registration. The VTEP MAC is derived from the machine id (a stable,
//! locally administered unicast address), so it is known before the lease
//! says which VNI the device carries, and it stays the same across agent
//! restarts: peers' FDB entries for the node stay valid. Once registered
//! with a lease, [`Overlay::run`]:
//!
//! 1. creates `flannel.<VNI>` through rtnetlink ([`netlink`]): VXLAN, UDP
//!    port 8472, learning off, local address = the public IP, on the
//!    uplink, MTU = uplink MTU − 50, with that MAC and the subnet's network
//!    address as a /32, up;
//! 2. writes `subnet.env` and the CNI conflist ([`files`]);
//! 3. long-polls the peers watch and, on every answer, reads the device's
//!    routes, neighbours and FDB entries back from the kernel and applies
//!    the difference to what the peers list asks for ([`reconcile`]).
//!
//! When a registration comes back without a lease, the device and both
//! files are removed; [`Overlay::teardown`] does the same at shutdown.
//!
//! The agent does not masquerade traffic that leaves the pod network, so
//! `FLANNEL_IPMASQ=false`; pods keep their addresses everywhere inside the
//! cluster. Extending it (say, masquerading) is one more step in
//! `Overlay::apply_lease` and a truthful `FLANNEL_IPMASQ`.

pub mod files;
pub mod netlink;
pub mod reconcile;
pub mod uplink;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_core::{Lease, Mac, RegisterRequest};
use log::{info, warn};
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::register::{Registered, chain};
use netlink::{Rtnl, VtepSpec};
use uplink::Uplink;

/// Setting up the overlay failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A netlink request failed.
    #[error("{what}")]
    Netlink {
        /// What was asked of the kernel.
        what: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// A file or socket operation failed.
    #[error("{path}")]
    Io {
        /// The path (or what was done).
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The uplink or public IP could not be found.
    #[error("uplink: {0}")]
    Uplink(String),
}

/// `subnet.env`, in [`Config::run_dir`].
pub const SUBNET_ENV: &str = "subnet.env";
/// The CNI conflist, in [`Config::cni_conf_dir`].
pub const CONFLIST: &str = "10-flannel.conflist";

/// Where the overlay writes and what it rides on.
#[derive(Debug, Clone)]
pub struct Config {
    /// flannel's run directory (`/run/flannel`).
    pub run_dir: PathBuf,
    /// The CNI configuration directory (`/etc/cni/net.d`).
    pub cni_conf_dir: PathBuf,
    /// host-local's `dataDir` in the conflist (`/var/lib/cni/networks`).
    pub cni_ipam_dir: PathBuf,
    /// `--iface`: the uplink (default: towards the control plane).
    pub iface: Option<String>,
    /// `--public-ip` (default: the uplink's address towards the control plane).
    pub public_ip: Option<Ipv4Addr>,
    /// sysfs root, for the uplink's MTU.
    pub sys: PathBuf,
}

/// What is installed for the current lease.
#[derive(Debug, Clone)]
struct Applied {
    lease: Lease,
    name: String,
    device: String,
    index: u32,
}

/// The overlay of one node.
pub struct Overlay {
    config: Config,
    /// The control plane's `host:port`, for the default uplink.
    server: String,
    /// The uplink found by the last [`Overlay::prepare`].
    uplink: Mutex<Option<Uplink>>,
    /// The VTEP MAC sent by the last [`Overlay::prepare`].
    mac: Mutex<Option<Mac>>,
    /// The connectivity check the peers watch last announced
    /// ([`crate::check`] follows it).
    rounds: watch::Sender<Option<kiln_core::CheckRound>>,
}

/// The VTEP MAC of a machine: the first six bytes of
/// `sha256("kiln-vtep:" + machine id)`, made locally administered unicast.
pub fn vtep_mac(machine_id: &str) -> Mac {
    let digest = kiln_core::Digest::of(format!("kiln-vtep:{machine_id}"));
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&digest.bytes()[..6]);
    mac[0] = (mac[0] & 0xfe) | 0x02;
    Mac(mac)
}

impl Overlay {
    /// The overlay for a node whose control plane is at `server`
    /// (`host:port`, as [`kiln_client::Client::authority`] gives it).
    pub fn new(config: Config, server: &str) -> Overlay {
        Overlay { config, server: server.to_string(), uplink: Mutex::new(None), mac: Mutex::new(None), rounds: watch::channel(None).0 }
    }

    /// Finds the uplink and fills the registration's `public_ip`,
    /// `uplink_mtu` and `vtep_mac` (from `req.machine_id`).
    pub async fn prepare(&self, req: &mut RegisterRequest) -> Result<(), Error> {
        let choice = uplink::Choice { iface: self.config.iface.as_deref(), public_ip: self.config.public_ip, server: &self.server };
        let up = uplink::discover(&choice, &self.config.sys).await?;
        let mac = vtep_mac(&req.machine_id);
        req.public_ip = Some(IpAddr::V4(up.address));
        req.uplink_mtu = Some(up.mtu);
        req.vtep_mac = Some(mac);
        *self.uplink.lock().unwrap_or_else(|e| e.into_inner()) = Some(up);
        *self.mac.lock().unwrap_or_else(|e| e.into_inner()) = Some(mac);
        Ok(())
    }

    /// The connectivity checks the peers watch announces (none while the
    /// node holds no lease).
    pub fn check_rounds(&self) -> watch::Receiver<Option<kiln_core::CheckRound>> {
        self.rounds.subscribe()
    }

    fn subnet_env_path(&self) -> PathBuf {
        self.config.run_dir.join(SUBNET_ENV)
    }

    fn conflist_path(&self) -> PathBuf {
        self.config.cni_conf_dir.join(CONFLIST)
    }

    /// Follows the registrations on `registered` and keeps the device,
    /// files and peer entries in step with them, until the channel closes.
    /// Each registration's client (the node's own) asks for the peers.
    pub async fn run(self: Arc<Self>, mut registered: watch::Receiver<Option<Registered>>) {
        let rtnl = loop {
            match Rtnl::connect() {
                Ok(r) => break r,
                Err(e) => {
                    warn!("flannel: {}", chain(&e));
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        let mut applied: Option<Applied> = None;
        // The peers watch (a stream), the epoch and revision of its last
        // answer, and the peers it left us with: the next answer is the
        // changes since.
        let mut stream: Option<kiln_client::PeersStream> = None;
        let mut since: Option<(u64, u64)> = None;
        let mut held = reconcile::Held::default();
        // Peers watch errors: retried soon, a join must not wait. Device
        // errors (say, a kernel without vxlan): retried slowly.
        let mut backoff = Backoff::new(Duration::from_secs(5));
        let mut setup_backoff = Backoff::new(Duration::from_secs(60));
        loop {
            let current = registered.borrow_and_update().clone();
            let reg = match step(applied.as_ref().map(|a| (&a.lease, a.name.as_str())), current.as_ref()) {
                Step::Idle | Step::Remove => {
                    self.rounds.send_replace(None);
                    if let Some(old) = applied.take() {
                        warn!("flannel: node {} holds no lease any more; removing {} and the CNI files", old.name, old.device);
                        self.remove(&rtnl, &old.device).await;
                    }
                    if registered.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                Step::Watch(reg, _) => reg,
                Step::Apply(reg, lease) => match self.apply_lease(&rtnl, &reg.name, &lease, applied.as_ref()).await {
                    Ok(a) => {
                        applied = Some(a);
                        (stream, since) = (None, None);
                        setup_backoff.reset();
                        reg
                    }
                    Err(e) => {
                        let device = VtepSpec::device_name(lease.vni);
                        warn!("flannel: setting up {device}: {} (retrying in {:?})", chain(&e), setup_backoff.peek());
                        tokio::select! {
                            _ = setup_backoff.wait() => {}
                            r = registered.changed() => if r.is_err() { return },
                        }
                        continue;
                    }
                },
            };
            let Some(a) = applied.clone() else { continue };
            let node = reg.client.clone();
            tokio::select! {
                r = registered.changed() => {
                    if r.is_err() {
                        return;
                    }
                    (stream, since) = (None, None);
                }
                answer = next_peers(&node, &mut stream, since) => match answer {
                    Ok(None) => stream = None,
                    Ok(Some(peers)) => {
                        backoff.reset();
                        since = Some((peers.epoch, peers.revision));
                        self.rounds.send_if_modified(|r| {
                            let changed = *r != peers.check;
                            r.clone_from(&peers.check);
                            changed
                        });
                        let change = held.apply(peers);
                        if let Err(e) = self.reconcile(&rtnl, &a, &change).await {
                            warn!("flannel: reconciling peers: {}", chain(&e));
                            (stream, since) = (None, None);
                            backoff.wait().await;
                        }
                    }
                    Err(e) => {
                        warn!("flannel: peers watch: {} (retrying in {:?})", chain(&e), backoff.peek());
                        (stream, since) = (None, None);
                        backoff.wait().await;
                    }
                },
            }
        }
    }

    /// Makes the device, its address and both files match `lease`.
    async fn apply_lease(&self, rtnl: &Rtnl, name: &str, lease: &Lease, old: Option<&Applied>) -> Result<Applied, Error> {
        let up = self.uplink.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(|| Error::Uplink("not found yet".into()))?;
        let mac = self.mac.lock().unwrap_or_else(|e| e.into_inner()).ok_or_else(|| Error::Uplink("no VTEP MAC yet".into()))?;
        let device = VtepSpec::device_name(lease.vni);
        if let Some(old) = old.filter(|o| o.device != device) {
            rtnl.delete_link(&old.device).await?;
        }
        let (uplink_index, uplink_mtu) = rtnl.index_and_mtu(&up.name).await?;
        let mtu = uplink_mtu.saturating_sub(50);
        if mtu != lease.mtu {
            warn!("flannel: {} MTU {mtu} (uplink {} MTU {uplink_mtu} − 50) differs from the lease's {}", device, up.name, lease.mtu);
        }
        let spec = VtepSpec { name: device.clone(), vni: lease.vni, mac, local: up.address, uplink: uplink_index, mtu };
        let index = rtnl.ensure_vtep(&spec).await?;
        rtnl.ensure_address(index, &device, lease.subnet.addr).await?;
        files::write_atomic(&self.subnet_env_path(), &files::subnet_env(lease, false))?;
        files::write_atomic(&self.conflist_path(), &files::conflist(lease, &self.config.cni_ipam_dir))?;
        info!(
            "flannel: {device} up (vni {} mac {mac} local {} dev {} mtu {mtu}), subnet {} of {}; wrote {} and {}",
            lease.vni,
            up.address,
            up.name,
            lease.subnet,
            lease.network,
            self.subnet_env_path().display(),
            self.conflist_path().display()
        );
        Ok(Applied { lease: lease.clone(), name: name.to_string(), device, index })
    }

    /// Brings the device's entries in line with `peers`.
    /// Makes the device's entries follow `change`: for a whole list, from
    /// what the kernel holds; for a delta, from the entries of the peers
    /// it replaced, so a join costs one peer's entries, not a dump.
    async fn reconcile(&self, rtnl: &Rtnl, a: &Applied, change: &reconcile::Change) -> Result<(), Error> {
        let own = reconcile::Own { name: a.name.clone(), subnet: a.lease.subnet, network: a.lease.network };
        let (want, skipped) = reconcile::desired(&own, &change.after);
        for s in skipped {
            warn!("flannel: peer {} left out: {}", s.name, s.reason);
        }
        let installed = match change.whole {
            true => rtnl.entries(a.index, &a.lease.network).await?,
            false => reconcile::desired(&own, &change.before).0,
        };
        let plan = reconcile::plan(&installed, &want);
        if plan.is_empty() {
            return Ok(());
        }
        rtnl.apply(a.index, &a.device, &plan).await?;
        let routes = |rs: &[reconcile::Route]| rs.iter().map(|r| r.dst.to_string()).collect::<Vec<_>>().join(",");
        info!(
            "flannel: peers reconciled on {}: +routes [{}] -routes [{}], {} neighbours set, {} removed, {} FDB entries added, {} removed",
            a.device,
            routes(&plan.add_routes),
            routes(&plan.del_routes),
            plan.set_neighbours.len(),
            plan.del_neighbours.len(),
            plan.add_fdb.len(),
            plan.del_fdb.len()
        );
        Ok(())
    }

    async fn remove(&self, rtnl: &Rtnl, device: &str) {
        match rtnl.delete_link(device).await {
            Ok(true) => info!("flannel: removed {device} and its routes, neighbours and FDB entries"),
            Ok(false) => {}
            Err(e) => warn!("flannel: {}", chain(&e)),
        }
        for path in [self.subnet_env_path(), self.conflist_path()] {
            if let Err(e) = files::remove(&path) {
                warn!("flannel: removing {}", chain(&e));
            }
        }
    }

    /// At shutdown: removes the device of `lease` (with everything on it)
    /// and both files.
    pub async fn teardown(&self, lease: Option<&Lease>) {
        let Some(lease) = lease else { return };
        match Rtnl::connect() {
            Ok(rtnl) => self.remove(&rtnl, &VtepSpec::device_name(lease.vni)).await,
            Err(e) => warn!("flannel: {}", chain(&e)),
        }
    }
}

/// How long one peers watch stream lasts before the agent opens the next.
const WATCH_LASTS: Duration = Duration::from_secs(300);

/// The next answer of the peers watch: from the open stream, or from a new
/// one (from `since`) when none is open. `None`: the stream ended.
async fn next_peers(
    node: &kiln_client::Client,
    stream: &mut Option<kiln_client::PeersStream>,
    since: Option<(u64, u64)>,
) -> Result<Option<kiln_core::Peers>, kiln_client::Error> {
    let open = match stream {
        Some(open) => open,
        None => stream.insert(node.watch_peers(since, WATCH_LASTS).await?),
    };
    open.next().await
}

/// What the overlay loop does next, given what is installed (lease and
/// node name) and the latest registration.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Not registered yet: wait.
    Idle,
    /// Registered without a lease (lost, or never given): remove what is installed.
    Remove,
    /// A new or changed lease (or node name): set it up.
    Apply(Registered, Lease),
    /// Installed as registered: follow the peers.
    Watch(Registered, Lease),
}

fn step(applied: Option<(&Lease, &str)>, current: Option<&Registered>) -> Step {
    let Some(reg) = current else { return Step::Idle };
    let Some(lease) = reg.lease.clone() else { return Step::Remove };
    match applied {
        Some((l, name)) if *l == lease && name == reg.name => Step::Watch(reg.clone(), lease),
        _ => Step::Apply(reg.clone(), lease),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_cases() {
        let lease = |subnet: &str| Lease {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: subnet.parse().unwrap(),
            mtu: 1450,
            vni: 1,
            backend: kiln_core::Backend::Vxlan,
        };
        let client = kiln_client::Client::builder("http://127.0.0.1:1").build().unwrap();
        let reg = |name: &str, l: Option<Lease>| Registered { name: name.into(), client: client.clone(), lease: l };
        let a = lease("10.244.1.0/24");
        let b = lease("10.244.2.0/24");
        let with_a = reg("n1", Some(a.clone()));
        type Case<'a> = (&'a str, Option<(&'a Lease, &'a str)>, Option<Registered>, Step);
        let cases: [Case; 6] = [
            ("not registered yet", None, None, Step::Idle),
            ("registered without a lease, nothing installed", None, Some(reg("n1", None)), Step::Remove),
            ("lease lost: remove what is installed", Some((&a, "n1")), Some(reg("n1", None)), Step::Remove),
            ("first lease", None, Some(with_a.clone()), Step::Apply(with_a.clone(), a.clone())),
            ("same lease again (re-registration)", Some((&a, "n1")), Some(with_a.clone()), Step::Watch(with_a.clone(), a.clone())),
            (
                "another subnet after the server forgot the node",
                Some((&a, "n1")),
                Some(reg("n1", Some(b.clone()))),
                Step::Apply(reg("n1", Some(b.clone())), b.clone()),
            ),
        ];
        for (name, applied, current, want) in cases {
            assert_eq!(step(applied, current.as_ref()), want, "case: {name}");
        }
    }

    #[test]
    fn vtep_mac_is_stable_local_unicast() {
        let a = vtep_mac("0123456789abcdef0123456789abcdef");
        assert_eq!(a, vtep_mac("0123456789abcdef0123456789abcdef"), "same machine, same MAC");
        assert_ne!(a, vtep_mac("fedcba9876543210fedcba9876543210"), "another machine, another MAC");
        for id in ["0123456789abcdef0123456789abcdef", "00000000000000000000000000000000", "ffffffffffffffffffffffffffffffff"] {
            let m = vtep_mac(id);
            assert_eq!(m.0[0] & 0x03, 0x02, "{id}: {m} is locally administered and unicast");
        }
    }
}
