//! The hosts a server's pools use, loaded and checked once at start, and
//! what a reconcile pass needs of them: a connection to each host's libvirt
//! ([`Hypervisor`]) and to its storage pool ([`Volumes`]), and a
//! [`Provisioner`] that makes disk nodes' overlays and seeds there.
//!
//! Loading refuses, naming the pool file and field, a pool whose image is
//! not served or whose host cannot be reached, or whose nodes are larger
//! than a host's memory; nothing is made on any host before every pool
//! checks out. Everything here blocks (libvirt's C API): the pool task
//! ([`crate::service`]) runs it on tokio's blocking threads.
//!
//! What a node boots is the control plane's business: the image files and
//! each node's seed come through the [`NodeMedia`] trait, so this crate
//! knows nothing of the image store or the profiles.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::domain::BootMedia;
use crate::hypervisor::{Hypervisor, Libvirt};
use crate::reconcile::{Cause, Error as PassError, Provisioner, Registry, Report, Settings, reconcile};
use crate::spec::{Boot, Pool};
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
    /// The image `name`, if it is served.
    fn image(&self, name: &str) -> Option<ServedImage>;
    /// The names of every image served (for an error that names them).
    fn served(&self) -> Vec<String>;
    /// `node`'s cidata seed, as an ISO image.
    fn seed(&self, pool: &Pool, node: &NodeId) -> Result<Vec<u8>, Cause>;
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
}

impl<M: NodeMedia> Fleet<M> {
    /// Loads the pool files in `dir`, connects to their hosts (making
    /// kiln's storage pool at `storage_dir` on a host that has none) and
    /// checks each pool against its hosts' memory and the images `media`
    /// serves.
    pub fn load(dir: &Path, storage_dir: &str, media: M) -> Result<Fleet<M>, LoadError> {
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
            let pool = Pool::from_file(&pool.file, smallest)?;
            check_image(&pool, &media)?;
            pools.push(pool);
        }
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
        Ok(Fleet { pools, hosts, volumes, media })
    }

    /// One reconcile pass ([`reconcile()`]) over the fleet.
    pub fn reconcile(&self, replicas: &BTreeMap<String, u32>, registry: &dyn Registry, settings: &Settings) -> Report {
        reconcile(&self.pools, replicas, &self.hosts, self, registry, settings)
    }

    fn volumes(&self, host: &str) -> Result<&Volumes, PassError> {
        self.volumes.get(host).ok_or_else(|| PassError::NotConnected { host: host.to_string() })
    }
}

/// A pool's image must be served, with a qcow2 for a disk pool.
fn check_image(pool: &Pool, media: &impl NodeMedia) -> Result<(), LoadError> {
    let Some(image) = media.image(&pool.image) else {
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

    fn make(&self, host: &str, pool: &Pool, node: &NodeId) -> Result<BootMedia, PassError> {
        let gone = || PassError::ImageGone { image: pool.image.clone() };
        let image = self.media.image(&pool.image).ok_or_else(gone)?;
        let local = image.qcow2.clone().ok_or_else(gone)?;
        let capacity = crate::volumes::qcow2_virtual_size(&local)
            .map_err(|source| storage(host)(hypervisor::Error::Local { what: format!("reading {}", local.display()), source }))?;
        let v = self.volumes(host)?;
        // The seed (xorriso: about 100 ms, mostly its own wait) is made
        // while libvirt makes the overlay.
        let media = &self.media;
        let disks = std::thread::scope(|scope| {
            let seed = scope.spawn(|| media.seed(pool, node));
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
}
