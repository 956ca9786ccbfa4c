//! Pools in the server (`kiln serve --pools DIR`): the control plane's side
//! of kiln-pool's task ([`kiln_pool::service`]). This module gives that task
//! what it needs of the control plane and nothing more:
//!
//! - [`ControlPlane`]: registered pool nodes and their leases (the
//!   [`Registry`]), the desired replicas kept in the store, and a node's
//!   metrics for the autoscaler;
//! - [`NodeMedia`]: the images served and each disk node's cidata seed,
//!   made from the pool's profile with a join token minted for the node's
//!   MAC and the API's URL.
//!
//! Each node is named `kiln-<pool>-<n>`; that is its hostname too (the
//! seed kiln gives it says so), which is how a registered node is tied to
//! its pool ([`Registry::set_pool_of`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_pool::domain::Accel;
use kiln_pool::reconcile::Cause;
use kiln_pool::service::{self, ControlPlane, Registered, StartError};
use kiln_pool::{Fleet, LoadError, Networks, NodeId, NodeMedia, Pool, PoolsHandle, ServedImage, Settings};
use kiln_pxe::LiveImages;
use kiln_pxe::ipxe::BootParams;
use kiln_pxe::profile::{Catalog, Machine, Profile};

use crate::registry::Registry;

/// Starting the pools failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pool file, a host or an image is not right.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The pool task could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The autoscaler's HTTP client could not be made.
    #[error("the autoscaler's HTTP client")]
    Scraper(#[from] kiln_client::Error),
}

/// How long the autoscaler waits for one node's `/metrics`.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// How the server's pools run.
#[derive(Debug, Clone)]
pub struct PoolsConfig {
    /// Directory of pool files (`*.toml`).
    pub dir: PathBuf,
    /// Where nodes' NICs are plugged: the default network and the one kiln
    /// makes (the server fills in its HTTP port, `--advertise` and
    /// `--proxy-dhcp`).
    pub networks: Networks,
    /// TCG or KVM.
    pub accel: Accel,
    /// The API's URL as disk nodes reach it (their seed's `kiln.server`);
    /// the server fills it in when not given (`--advertise-api`): the host's
    /// loopback as QEMU user networking shows it, `10.0.2.2`.
    pub api_url: Option<String>,
    /// The API's URL as disk nodes on kiln's network reach it; the server
    /// fills it in when not given (`--advertise-api`): the host's address
    /// on that network.
    pub kiln_api_url: Option<String>,
    /// Time between reconcile passes when nothing asks for one sooner.
    pub interval: Duration,
    /// Autoscalers decide and log, but change nothing (`--autoscale-dry-run`).
    pub autoscale_dry_run: bool,
    /// Where kiln's storage pool is made on a host that has none
    /// (`--pool-storage`; a path on each host).
    pub storage_dir: String,
    /// This server's name among those on one etcd (`--name`): the value
    /// it campaigns with, which `kiln pools` shows for the leader.
    pub name: String,
    /// The election lease's TTL (`--leader-ttl`): how long a killed
    /// leader keeps the others from leading ([`crate::leader`]).
    pub leader_ttl: Duration,
}

/// What the pools need of the rest of the server.
pub struct Parts {
    /// The registry (leases, stored replicas).
    pub registry: Arc<Registry>,
    /// The images served.
    pub images: Arc<LiveImages>,
    /// Profiles, for pools that name one.
    pub catalog: Arc<Catalog>,
    /// Mints the join token a disk node's seed carries.
    pub minter: Minter,
}

/// Mints the one-use join token an expected machine's script or seed
/// carries, bound to its MAC ([`crate::join_tokens::JoinTokens::mint_for_mac`]).
#[derive(Clone)]
pub struct Minter {
    /// The server's join tokens.
    pub tokens: Arc<crate::join_tokens::JoinTokens>,
    /// How long a minted token is valid (`--boot-token-ttl`).
    pub ttl: std::time::Duration,
}

impl Minter {
    /// The token for the machine with `mac`.
    pub async fn mint(&self, mac: kiln_core::Mac) -> Result<String, crate::join_tokens::Error> {
        let token = self.tokens.mint_for_mac(mac, self.ttl).await?;
        tracing::info!(mac = %mac, token = %token.split('.').next().unwrap_or_default(), "audit: join token minted for an expected machine");
        Ok(token)
    }
}

/// Loads and checks the pools, connects to their hosts (on a blocking
/// thread; kiln's network is made where it is wanted), and starts the pool
/// task. Also returns the address of kiln's network on this machine when a
/// pool's nodes are on it: the server serves there too.
pub async fn start(
    config: PoolsConfig,
    parts: Parts,
    leadership: Option<tokio::sync::watch::Receiver<kiln_pool::Lead>>,
) -> Result<(PoolsHandle, Option<std::net::Ipv4Addr>), Error> {
    let media = Media {
        images: parts.images,
        catalog: parts.catalog,
        minter: parts.minter,
        runtime: tokio::runtime::Handle::current(),
        api_url: config.api_url.clone().unwrap_or_default(),
        kiln_network: config.networks.kiln.name.clone(),
        kiln_api_url: config.kiln_api_url.clone().unwrap_or_default(),
    };
    let (dir, storage, networks) = (config.dir.clone(), config.storage_dir.clone(), config.networks.clone());
    let fleet = tokio::task::spawn_blocking(move || Fleet::load(&dir, &storage, &networks, media))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    let here = fleet.kiln_network_here().then(|| config.networks.kiln.gateway());
    let names: Vec<String> = fleet.pools.iter().map(|p| p.name.clone()).collect();
    parts.registry.set_pool_of(Box::new(move |hostname: &str| NodeId::parse(hostname).filter(|n| names.contains(&n.pool)).map(|n| n.pool)));
    let control = Control { registry: parts.registry, scraper: kiln_client::metrics::Scraper::new(SCRAPE_TIMEOUT)? };
    let service_config = service::Config {
        settings: Settings { accel: config.accel },
        interval: config.interval,
        autoscale_dry_run: config.autoscale_dry_run,
        leadership,
    };
    Ok((service::start(fleet, control, service_config).await?, here))
}

/// A pool names a profile that the catalog no longer has.
#[derive(Debug, thiserror::Error)]
#[error("pool `{pool}` names profile `{profile}`, which is gone")]
pub struct ProfileGone {
    /// The pool.
    pub pool: String,
    /// The profile.
    pub profile: String,
}

/// The profile `pool`'s nodes boot with: the one its file names, or a
/// plain one (`pool-<name>`) for its image.
pub fn node_profile(catalog: &Catalog, pool: &Pool) -> Result<Profile, ProfileGone> {
    match &pool.profile {
        Some(id) => {
            catalog.profiles().find(|p| &p.id == id).cloned().ok_or_else(|| ProfileGone { pool: pool.name.clone(), profile: id.clone() })
        }
        None => Ok(Profile {
            id: format!("pool-{}", pool.name),
            image: pool.image.clone(),
            kernel_args: Vec::new(),
            user_data: None,
            network_config: None,
            vendor_data: None,
        }),
    }
}

/// Images and seeds for the pool task.
struct Media {
    images: Arc<LiveImages>,
    catalog: Arc<Catalog>,
    minter: Minter,
    /// The server's runtime: seeds are made on a blocking thread, which
    /// waits here for the token's mint.
    runtime: tokio::runtime::Handle,
    api_url: String,
    /// The name of the network kiln makes, and the API's URL on it.
    kiln_network: String,
    kiln_api_url: String,
}

impl NodeMedia for Media {
    fn image(&self, name: &str, digest: Option<&kiln_core::Digest>) -> Option<ServedImage> {
        let images = self.images.current();
        let image = images.image(name)?;
        let generation = match digest {
            Some(d) => image.generation(&d.hex())?,
            None => &image.current,
        };
        let image = &generation.manifest;
        let qcow2 = format!("{}.qcow2", image.name);
        Some(ServedImage {
            name: image.name.clone(),
            digest: image.digest,
            qcow2: image.artifact(&qcow2).map(|_| generation.dir().join(&qcow2)),
        })
    }

    fn served(&self) -> Vec<String> {
        self.images.current().images().map(|m| m.name.clone()).collect()
    }

    fn generations(&self, name: &str) -> Vec<kiln_core::Digest> {
        let images = self.images.current();
        let Some(image) = images.image(name) else { return Vec::new() };
        std::iter::once(&image.current).chain(&image.older).map(|g| g.manifest.digest).collect()
    }

    fn seed(&self, pool: &Pool, node: &NodeId, digest: &kiln_core::Digest) -> Result<Vec<u8>, Cause> {
        let images = self.images.current();
        let gone = || kiln_pool::reconcile::Error::ImageGone { image: pool.image.clone() };
        let generation = images.image(&pool.image).and_then(|i| i.generation(&digest.hex())).ok_or_else(gone)?;
        let image = &generation.manifest;
        let machine = Machine { mac: Some(node.mac()), hostname: Some(node.domain_name()), ..Default::default() };
        let profile = node_profile(&self.catalog, pool)?;
        // Every pool node is a machine kiln expects: its seed carries a
        // token minted for its MAC.
        let token = self.runtime.block_on(self.minter.mint(node.mac()))?;
        let api_url = if pool.network.as_ref() == Some(&self.kiln_network) { &self.kiln_api_url } else { &self.api_url };
        let params = BootParams { base_url: api_url, token: Some(&token), api_url };
        let seed = self.catalog.seed(&profile, image, &machine, &params)?;
        Ok(seed.iso()?)
    }
}

/// The registry and its store, as the pool task reaches them.
struct Control {
    registry: Arc<Registry>,
    scraper: kiln_client::metrics::Scraper,
}

/// The control plane failed the pool task.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The store refused.
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    /// A node's metrics could not be fetched.
    #[error(transparent)]
    Scrape(#[from] kiln_client::Error),
}

impl ControlPlane for Control {
    type Error = ControlError;

    async fn registered(&self) -> Result<Vec<Registered>, ControlError> {
        Ok(self
            .registry
            .nodes()
            .iter()
            .filter_map(|n| {
                let ready = self.registry.state_of(n) == kiln_core::NodeState::Ready;
                Some(Registered { node: NodeId::parse(&n.name)?, metrics: n.metrics_target(), ready })
            })
            .collect())
    }

    async fn deregister(&self, node: &NodeId) -> Result<bool, ControlError> {
        Ok(self.registry.remove(&node.domain_name()).await?.is_some())
    }

    async fn replicas(&self) -> Result<BTreeMap<String, u32>, ControlError> {
        Ok(self.registry.store_handle().replicas().await?)
    }

    async fn set_replicas(&self, pool: &str, replicas: u32) -> Result<(), ControlError> {
        Ok(self.registry.store_handle().set_replicas(pool, replicas).await?)
    }

    async fn rollouts(&self) -> Result<BTreeMap<String, kiln_core::pool::RolloutRecord>, ControlError> {
        Ok(self.registry.store_handle().rollouts().await?)
    }

    async fn set_rollout(&self, pool: &str, record: &kiln_core::pool::RolloutRecord) -> Result<(), ControlError> {
        Ok(self.registry.store_handle().set_rollout(pool, record).await?)
    }

    async fn scrape(&self, target: &str) -> Result<String, ControlError> {
        Ok(self.scraper.fetch(target).await?)
    }
}
