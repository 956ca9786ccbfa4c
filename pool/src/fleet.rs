//! The hosts a server's pools use, loaded and checked once at start, and
//! what a reconcile pass needs of them: a connection to each host's libvirt
//! ([`Hypervisor`]) and to its storage pool ([`Volumes`]), and a
//! [`Provisioner`] that makes disk nodes' overlays and seeds there.
//!
//! Loading refuses, naming the pool file and field, a pool whose image is
//! not served or whose host cannot be reached, whose nodes are larger
//! than a host's memory, or whose nodes could not boot or reach each other
//! on its network ([`Networks`]); nothing is made on any host before every
//! pool checks out. Then kiln's storage pool and kiln's network
//! ([`crate::network`]) are made on the hosts that lack them. Everything here blocks (libvirt's C API): the pool task
//! ([`crate::service`]) runs it on tokio's blocking threads.
//!
//! What a node boots is the control plane's business: the image files and
//! each node's seed come through the [`NodeMedia`] trait, so this crate
//! knows nothing of the image store or the profiles.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::domain::BootMedia;
use crate::hypervisor::{Hypervisor, Libvirt};
use crate::network::{Ensured, KilnNetwork, is_local};
use crate::reconcile::{Cause, Error as PassError, Provisioner, Registry, Report, Settings, reconcile};
use crate::spec::{Boot, Pool, USER_NETWORK};
use crate::volumes::Volumes;
use crate::{NodeId, hypervisor};

/// An image the server serves, as a pool's nodes need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedImage {
    /// The image's name.
    pub name: String,
    /// Its digest: golden volumes on hosts are named by it.
    pub digest: kiln_core::Digest,
    /// Its golden qcow2 on this server, if it has one (disk pools need it).
    pub qcow2: Option<PathBuf>,
}

/// What nodes boot, from the control plane: images and per-node seeds.
pub trait NodeMedia: Send + Sync + 'static {
    /// The image `name`, if it is served: generation `digest` of it, or
    /// the current one when `None`.
    fn image(&self, name: &str, digest: Option<&kiln_core::Digest>) -> Option<ServedImage>;
    /// The names of every image served (for an error that names them).
    fn served(&self) -> Vec<String>;
    /// The generations of image `name` served, newest first (the current
    /// one first); empty when it is not served.
    fn generations(&self, name: &str) -> Vec<kiln_core::Digest>;
    /// `node`'s cidata seed, as an ISO image, for generation `image` of its
    /// pool's image.
    fn seed(&self, pool: &Pool, node: &NodeId, image: &kiln_core::Digest) -> Result<Vec<u8>, Cause>;
}

/// Where pools' NICs are plugged: the server's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Networks {
    /// The network of a pool whose file names none (`--pool-network`):
    /// the one kiln makes, unless told otherwise.
    pub default: String,
    /// The network kiln makes (`--kiln-network`, `--kiln-network-subnet`,
    /// `--kiln-network-nat`).
    pub kiln: KilnNetwork,
    /// The port kiln serves boot scripts on: guests on kiln's network on
    /// this machine fetch `http://GATEWAY:PORT/boot.ipxe`.
    pub http_port: u16,
    /// `--advertise`: the base URL that guests on kiln's network on another
    /// machine fetch `boot.ipxe` from.
    pub advertise: Option<String>,
    /// The interface kiln's proxyDHCP answers on (`--proxy-dhcp`).
    pub proxy_dhcp: Option<String>,
}

impl Default for Networks {
    fn default() -> Self {
        Networks {
            default: crate::network::DEFAULT_NAME.to_string(),
            kiln: KilnNetwork::default(),
            http_port: 8080,
            advertise: None,
            proxy_dhcp: None,
        }
    }
}

impl Networks {
    /// The boot file kiln's network on `uri` gives: kiln's iPXE script at
    /// the host's address on it for this machine, else at `--advertise`.
    fn boot_url(&self, uri: &str) -> Option<String> {
        if is_local(uri) {
            Some(format!("http://{}:{}/boot.ipxe", self.kiln.gateway(), self.http_port))
        } else {
            self.advertise.as_ref().map(|a| format!("{}/boot.ipxe", a.trim_end_matches('/')))
        }
    }
}

/// Loading the pools failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A pool file is not valid.
    #[error(transparent)]
    Spec(#[from] crate::spec::Error),
    /// A pool names an image that is not served.
    #[error("{file}: `image`: no image `{image}` is served (images: {served})")]
    NoImage {
        /// The pool file.
        file: PathBuf,
        /// The image named.
        image: String,
        /// The images there are.
        served: String,
    },
    /// A disk pool's image has no qcow2.
    #[error("{file}: `boot = \"disk\"`: image `{image}` has no {image}.qcow2 (disk pools need a worker image)")]
    NoDisk {
        /// The pool file.
        file: PathBuf,
        /// The image.
        image: String,
    },
    /// A pool names a host that cannot be reached.
    #[error("{file}: `hosts`: cannot reach {uri}")]
    Host {
        /// The pool file.
        file: PathBuf,
        /// The URI.
        uri: String,
        /// libvirt's answer.
        #[source]
        source: Box<hypervisor::Error>,
    },
    /// A pool's nodes could not boot, or could not reach each other, on its network.
    #[error("{file}: `network`: {reason}")]
    Network {
        /// The pool file.
        file: PathBuf,
        /// Why, naming the network and the host.
        reason: String,
    },
    /// kiln's network could not be found or made on a host.
    #[error("{file}: `hosts`: {uri}: cannot set up kiln's network (see --kiln-network)")]
    KilnNetwork {
        /// The pool file.
        file: PathBuf,
        /// The URI.
        uri: String,
        /// libvirt's answer.
        #[source]
        source: Box<hypervisor::Error>,
    },
    /// A host's storage pool for kiln's files cannot be found or made.
    #[error("{file}: `hosts`: {uri}: cannot set up kiln's storage pool (see --pool-storage)")]
    Storage {
        /// The pool file.
        file: PathBuf,
        /// The URI.
        uri: String,
        /// libvirt's answer.
        #[source]
        source: Box<hypervisor::Error>,
    },
}

/// The pools and their hosts, connected.
pub struct Fleet<M> {
    /// The pools, as loaded and checked.
    pub pools: Vec<Pool>,
    hosts: BTreeMap<String, Box<dyn Hypervisor + Send>>,
    /// Each host's storage pool, on a connection of its own.
    volumes: BTreeMap<String, Volumes>,
    media: M,
    /// Whether a pool's nodes are on kiln's network on this machine: the
    /// server then serves on its address too.
    kiln_network_here: bool,
}

impl<M: NodeMedia> Fleet<M> {
    /// Loads the pool files in `dir`, connects to their hosts, checks each
    /// pool against its hosts' memory, the images `media` serves and its
    /// network, then makes kiln's storage pool at `storage_dir` and kiln's
    /// network on the hosts that have none.
    pub fn load(dir: &Path, storage_dir: &str, networks: &Networks, media: M) -> Result<Fleet<M>, LoadError> {
        // First parse with no memory limit, to learn the hosts; then check
        // each pool against its hosts' memory.
        let unchecked = crate::load_dir(dir, u64::MAX)?;
        let mut hosts: BTreeMap<String, Box<dyn Hypervisor + Send>> = BTreeMap::new();
        for pool in &unchecked {
            for uri in pool.hosts.iter().filter(|u| !hosts.contains_key(*u)).collect::<Vec<_>>() {
                let hv = Libvirt::open(uri).map_err(|source| LoadError::Host {
                    file: pool.file.clone(),
                    uri: uri.clone(),
                    source: Box::new(source),
                })?;
                hosts.insert(uri.clone(), Box::new(hv));
            }
        }
        let mut pools = Vec::new();
        for pool in unchecked {
            let mut smallest = u64::MAX;
            for uri in &pool.hosts {
                let mem = hosts[uri].memory().map_err(|source| LoadError::Host {
                    file: pool.file.clone(),
                    uri: uri.clone(),
                    source: Box::new(source),
                })?;
                smallest = smallest.min(mem.total_mib);
            }
            let mut pool = Pool::from_file(&pool.file, smallest)?;
            check_image(&pool, &media)?;
            pool.network.get_or_insert_with(|| networks.default.clone());
            pools.push(pool);
        }
        let kiln_network = check_networks(&pools, networks)?;
        // Only once every pool checks out: kiln's storage pool on each host
        // (made there if missing), so a refused start makes nothing.
        let mut volumes = BTreeMap::new();
        for pool in &pools {
            for uri in pool.hosts.iter().filter(|u| !volumes.contains_key(*u)).collect::<Vec<_>>() {
                let v = Volumes::open(uri, storage_dir).map_err(|source| LoadError::Storage {
                    file: pool.file.clone(),
                    uri: uri.clone(),
                    source: Box::new(source),
                })?;
                volumes.insert(uri.clone(), v);
            }
        }
        for (uri, (file, url)) in &kiln_network {
            let ensured = networks.kiln.ensure(uri, url).map_err(|source| LoadError::KilnNetwork {
                file: file.clone(),
                uri: uri.clone(),
                source: Box::new(source),
            })?;
            let (name, subnet) = (&networks.kiln.name, networks.kiln.subnet);
            let mode = if networks.kiln.nat { "NAT" } else { "isolated" };
            match ensured {
                Ensured::Made => tracing::info!(host = %uri, %subnet, boot = %url, "pools: made libvirt network {name} ({mode})"),
                Ensured::Started => tracing::info!(host = %uri, %subnet, boot = %url, "pools: started libvirt network {name}"),
                Ensured::Found => tracing::debug!(host = %uri, "pools: libvirt network {name} is there"),
            }
        }
        let kiln_network_here = kiln_network.keys().any(|uri| is_local(uri));
        Ok(Fleet { pools, hosts, volumes, media, kiln_network_here })
    }

    /// Whether a pool's nodes are on kiln's network on this machine, whose
    /// address there ([`KilnNetwork::gateway`]) the server must serve on.
    pub fn kiln_network_here(&self) -> bool {
        self.kiln_network_here
    }

    /// One reconcile pass ([`reconcile()`]) over the fleet.
    pub fn reconcile(
        &self,
        replicas: &BTreeMap<String, u32>,
        targets: &BTreeMap<String, crate::reconcile::Target>,
        registry: &dyn Registry,
        settings: &Settings,
    ) -> Report {
        reconcile(&self.pools, replicas, targets, &self.hosts, self, registry, settings)
    }

    /// The generations of image `name` a pool may run, newest first: the
    /// current one, then those kept.
    pub fn generations(&self, name: &str) -> Vec<kiln_core::Digest> {
        self.media.generations(name)
    }

    fn volumes(&self, host: &str) -> Result<&Volumes, PassError> {
        self.volumes.get(host).ok_or_else(|| PassError::NotConnected { host: host.to_string() })
    }
}

/// Each pool's nodes must be able to boot and to reach each other on its
/// network (the server's default filled in). Returns the hosts kiln's
/// network is wanted on: host → (the first pool file using it, boot URL).
fn check_networks(pools: &[Pool], networks: &Networks) -> Result<BTreeMap<String, (PathBuf, String)>, LoadError> {
    let mut kiln = BTreeMap::new();
    let mut on_user = 0u32;
    for pool in pools {
        let refuse = |reason: String| LoadError::Network { file: pool.file.clone(), reason };
        let name = pool.network.as_deref().unwrap_or(USER_NETWORK);
        if name == USER_NETWORK {
            if pool.boot == Boot::Network {
                return Err(refuse(
                    "network boot on QEMU user networking: its DHCP gives iPXE no boot file, so the nodes would stop at \"Nothing to boot\"; leave `network` out for the network kiln makes".into(),
                ));
            }
            on_user = on_user.saturating_add(pool.max);
            if on_user > 1 {
                return Err(refuse(format!(
                    "QEMU user networking gives every node the address 10.0.2.15: {on_user} nodes could not reach one another, and only one would get a pod-network lease; leave `network` out for the network kiln makes"
                )));
            }
        } else if name == networks.kiln.name {
            if !networks.kiln.fits() {
                return Err(refuse(format!("kiln's network's subnet {} is too small for guests (at most /29)", networks.kiln.subnet)));
            }
            for uri in &pool.hosts {
                let Some(url) = networks.boot_url(uri) else {
                    return Err(refuse(format!(
                        "{uri} is another machine: its guests on kiln's network `{name}` cannot reach this server at {}; pass --advertise with an address they reach (with --kiln-network-nat), or name a network there",
                        networks.kiln.gateway()
                    )));
                };
                kiln.entry(uri.clone()).or_insert_with(|| (pool.file.clone(), url));
            }
        } else {
            for uri in &pool.hosts {
                check_named(pool, name, uri, networks).map_err(refuse)?;
            }
        }
    }
    Ok(kiln)
}

/// A network the pool names must be on `uri` and, for network boot, give
/// a boot file or have kiln's proxyDHCP on its bridge.
fn check_named(pool: &Pool, name: &str, uri: &str, networks: &Networks) -> Result<(), String> {
    let facts = crate::network::inspect(uri, name).map_err(|e| format!("reading network `{name}`: {e}"))?;
    let Some(facts) = facts else {
        return Err(format!(
            "{uri} has no libvirt network `{name}` (virsh net-list --all); leave `network` out for the network kiln makes"
        ));
    };
    let proxied = networks.proxy_dhcp.is_some() && networks.proxy_dhcp == facts.bridge;
    if pool.boot == Boot::Network && facts.boot_file.is_none() && !proxied {
        let bridge = facts.bridge.as_deref().unwrap_or("its bridge");
        return Err(format!(
            "network boot on `{name}` ({uri}): its DHCP gives no boot file, so the nodes would stop at \"Nothing to boot\"; add <bootp file='http://…/boot.ipxe'/> to it, pass --proxy-dhcp {bridge}, or leave `network` out for the network kiln makes"
        ));
    }
    Ok(())
}

/// A pool's image must be served, with a qcow2 for a disk pool.
fn check_image(pool: &Pool, media: &impl NodeMedia) -> Result<(), LoadError> {
    let Some(image) = media.image(&pool.image, None) else {
        return Err(LoadError::NoImage { file: pool.file.clone(), image: pool.image.clone(), served: media.served().join(", ") });
    };
    if pool.boot == Boot::Disk && image.qcow2.is_none() {
        return Err(LoadError::NoDisk { file: pool.file.clone(), image: pool.image.clone() });
    }
    Ok(())
}

/// A storage error on `host`, with its cause kept.
fn storage(host: &str) -> impl FnOnce(hypervisor::Error) -> PassError + '_ {
    move |e| PassError::Storage { host: host.to_string(), source: e.into() }
}

impl<M: NodeMedia> Provisioner for Fleet<M> {
    fn overlays(&self, host: &str) -> Result<Vec<NodeId>, PassError> {
        self.volumes(host)?.nodes().map_err(storage(host))
    }

    fn make(&self, host: &str, pool: &Pool, node: &NodeId, digest: Option<&kiln_core::Digest>) -> Result<BootMedia, PassError> {
        let gone = || PassError::ImageGone { image: pool.image.clone() };
        let image = self.media.image(&pool.image, digest).ok_or_else(gone)?;
        let local = image.qcow2.clone().ok_or_else(gone)?;
        let capacity = crate::volumes::qcow2_virtual_size(&local)
            .map_err(|source| storage(host)(hypervisor::Error::Local { what: format!("reading {}", local.display()), source }))?;
        let v = self.volumes(host)?;
        // The seed (xorriso: about 100 ms, mostly its own wait) is made
        // while libvirt makes the overlay.
        let media = &self.media;
        let disks = std::thread::scope(|scope| {
            let seed = scope.spawn(|| media.seed(pool, node, &image.digest));
            let start = std::time::Instant::now();
            let golden = v.golden(&image.name, &image.digest, &local)?;
            if let Some(bytes) = golden.uploaded {
                let ms = start.elapsed().as_millis() as u64;
                tracing::info!(host, image = %image.name, path = %golden.path, bytes, ms, "pools: golden image uploaded");
            }
            v.make(node, &golden.path, capacity, || seed.join().expect("the seed thread").map_err(std::io::Error::other))
        })
        .map_err(storage(host))?;
        tracing::info!(node = %node, overlay_bytes = disks.overlay_bytes, seed_bytes = disks.seed_bytes, "pools: overlay and seed made");
        Ok(BootMedia::Disk { overlay: disks.overlay.into(), seed: disks.seed.into() })
    }

    fn delete(&self, host: &str, node: &NodeId) -> Result<(), PassError> {
        self.volumes(host)?.delete(node).map_err(storage(host))
    }

    fn console_log(&self, host: &str, node: &NodeId) -> Result<PathBuf, PassError> {
        Ok(self.volumes(host)?.console_log(node).into())
    }

    fn prune(&self, host: &str, pool: &Pool, keep: &kiln_core::Digest) -> Result<(), PassError> {
        self.volumes(host)?.prune_golden_except(&pool.image, keep).map_err(storage(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool `name` booting `boot` on `hosts`, with `extra` lines, its
    /// network defaulted as a fleet does.
    fn pool(name: &str, boot: &str, max: u32, hosts: &str, extra: &str) -> Pool {
        let text = format!(
            "image = \"tiny\"\nvcpus = 1\nmemory-mib = 128\nboot = \"{boot}\"\nmin = 0\nmax = {max}\nreplicas = 0\nhosts = [\"{hosts}\"]\n{extra}"
        );
        let mut p = Pool::from_str(&text, Path::new(&format!("/pools/{name}.toml")), 1024).unwrap();
        p.network.get_or_insert_with(|| crate::network::DEFAULT_NAME.into());
        p
    }

    fn refused(pools: &[Pool], networks: &Networks) -> String {
        check_networks(pools, networks).expect_err("refused").to_string()
    }

    #[test]
    fn pools_whose_nodes_could_not_boot_or_reach_each_other_are_refused() {
        let nets = Networks::default();
        let user = "network = \"user\"";
        let e = refused(&[pool("a", "network", 2, "test:///default", user)], &nets);
        assert!(e.starts_with("/pools/a.toml: `network`: network boot on QEMU user networking") && e.contains("Nothing to boot"), "{e}");
        let e = refused(&[pool("b", "disk", 2, "test:///default", user)], &nets);
        assert!(e.starts_with("/pools/b.toml: `network`: QEMU user networking gives every node the address 10.0.2.15: 2 nodes"), "{e}");
        // One node alone on user networking has no peer to reach: allowed.
        assert!(check_networks(&[pool("c", "disk", 1, "test:///default", user)], &nets).unwrap().is_empty());
        let e = refused(&[pool("c", "disk", 1, "test:///default", user), pool("d", "disk", 1, "test:///default", user)], &nets);
        assert!(e.starts_with("/pools/d.toml: `network`:") && e.contains("2 nodes"), "two pools count together: {e}");

        // kiln's network, by default: wanted on the host, with kiln's boot script at its address.
        let wanted = check_networks(&[pool("e", "network", 2, "test:///default", "")], &nets).unwrap();
        let url = &wanted["test:///default"].1;
        assert_eq!(url, "http://10.247.0.1:8080/boot.ipxe");
        // On another machine, its guests reach kiln only at --advertise.
        let remote = "qemu+ssh://root@b.example/system";
        let e = refused(&[pool("f", "network", 2, remote, "")], &nets);
        assert!(e.contains("is another machine") && e.contains("--advertise"), "{e}");
        let advertised = Networks { advertise: Some("http://192.0.2.1:8080/".into()), ..Networks::default() };
        let wanted = check_networks(&[pool("f", "network", 2, remote, "")], &advertised).unwrap();
        assert_eq!(wanted[remote].1, "http://192.0.2.1:8080/boot.ipxe");
        let tiny =
            Networks { kiln: KilnNetwork { subnet: "10.247.0.0/30".parse().unwrap(), ..KilnNetwork::default() }, ..Networks::default() };
        assert!(refused(&[pool("g", "network", 2, "test:///default", "")], &tiny).contains("too small"));
    }

    #[test]
    fn a_named_network_must_be_there_and_give_network_boot_a_boot_file() {
        let _host = crate::TEST_DEFAULT_HOST.lock().unwrap_or_else(|e| e.into_inner());
        let uri = "test:///default";
        let nets = Networks::default();
        let e = refused(&[pool("a", "network", 2, uri, "network = \"nope\"")], &nets);
        assert!(e.starts_with("/pools/a.toml: `network`: test:///default has no libvirt network `nope`"), "{e}");
        // The test driver's `default` network has DHCP and no boot file.
        let e = refused(&[pool("b", "network", 2, uri, "network = \"default\"")], &nets);
        assert!(e.contains("its DHCP gives no boot file") && e.contains("--proxy-dhcp virbr0"), "{e}");
        let proxied = Networks { proxy_dhcp: Some("virbr0".into()), ..Networks::default() };
        assert!(check_networks(&[pool("b", "network", 2, uri, "network = \"default\"")], &proxied).unwrap().is_empty());
        assert!(
            check_networks(&[pool("c", "disk", 2, uri, "network = \"default\"")], &nets).unwrap().is_empty(),
            "disk boot needs no boot file"
        );
    }
}
