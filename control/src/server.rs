//! The composed server that `kiln serve` and `kiln up` run: boot assets
//! (kiln-pxe) and the control-plane API over one listener, with the state
//! directory holding the bootstrap token and the registry.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_pxe::ImageStore;
use kiln_pxe::dhcp::{ProxyConfig, ProxyDhcp};
use kiln_pxe::profile::Catalog;
use kiln_pxe::tftp::TftpServer;
use warp::Filter;

use crate::api::{self, Api};
use crate::registry::{NetworkConfig, Registry};
use crate::store::FileStore;
use crate::token;

/// What the server serves and where it keeps its state.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Directory of built images (`kiln build --out`).
    pub images: PathBuf,
    /// State directory: `bootstrap-token`, `nodes.json`.
    pub state: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Base URL that booting nodes use to reach this server (default: the
    /// `Host` of each iPXE request).
    pub advertise: Option<String>,
    /// Directory of profiles and groups (default: one profile booting the
    /// first image, for every machine).
    pub profiles: Option<PathBuf>,
    /// Serve TFTP on this address (iPXE binaries for PXE ROMs).
    pub tftp: Option<SocketAddr>,
    /// Root of the TFTP server: Debian's `ipxe` package puts
    /// `undionly.kpxe` and `ipxe.efi` in `/usr/lib/ipxe`.
    pub tftp_root: PathBuf,
    /// Answer PXE clients as proxyDHCP on this interface.
    pub proxy_dhcp: Option<String>,
    /// The pod network nodes get subnet leases from.
    pub network: NetworkConfig,
}

/// Where Debian's `ipxe` package installs its binaries.
pub const IPXE_DIR: &str = "/usr/lib/ipxe";

/// Starting the server failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image directory holds no valid image.
    #[error("loading images")]
    Images(#[from] kiln_pxe::Error),
    /// The state directory could not be used.
    #[error("state directory {path}")]
    State {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The profiles and groups are not valid.
    #[error("loading profiles")]
    Profiles(#[from] kiln_pxe::profile::Error),
    /// The registry could not be opened.
    #[error("opening the registry")]
    Store(#[from] crate::store::Error),
    /// The TFTP server could not start.
    #[error("starting TFTP")]
    Tftp(#[from] kiln_pxe::tftp::Error),
    /// proxyDHCP could not start.
    #[error("starting proxyDHCP")]
    ProxyDhcp(#[from] kiln_pxe::dhcp::Error),
    /// The listen address could not be bound.
    #[error("listening on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running server. Dropping it does not stop it: call [`Server::shutdown`].
pub struct Server {
    /// The address it listens on (the real port when asked for port 0).
    pub addr: SocketAddr,
    /// The bootstrap token.
    pub bootstrap_token: String,
    /// The images it serves.
    pub images: Arc<ImageStore>,
    /// The registry.
    pub registry: Arc<Registry>,
    /// The TFTP server, when asked for.
    pub tftp: Option<TftpServer>,
    /// proxyDHCP, when asked for.
    pub proxy_dhcp: Option<ProxyDhcp>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Loads images and state, binds, and starts serving in a task.
    pub async fn start(config: ServerConfig) -> Result<Server, Error> {
        let images = Arc::new(ImageStore::load(&config.images)?);
        let catalog = Arc::new(match &config.profiles {
            Some(dir) => Catalog::load(dir, &images)?,
            None => Catalog::builtin(&images),
        });
        std::fs::create_dir_all(&config.state).map_err(|source| Error::State { path: config.state.clone(), source })?;
        let token_path = config.state.join("bootstrap-token");
        let bootstrap_token = token::load_or_create_bootstrap(&token_path).map_err(|source| Error::State { path: token_path, source })?;
        let store = FileStore::open(&config.state.join("nodes.json"))?;
        let registry = Arc::new(Registry::open(Arc::new(store), config.network)?);
        let api = Arc::new(Api {
            registry: registry.clone(),
            images: images.clone(),
            catalog: catalog.clone(),
            bootstrap_token: bootstrap_token.clone(),
            advertise: config.advertise.clone(),
        });
        let routes = api::routes(api).or(kiln_pxe::artifacts::routes(images.clone())).unify().recover(api::recover).with(
            warp::log::custom(|info| {
                tracing::debug!(method = %info.method(), path = info.path(), status = info.status().as_u16(), "request");
            }),
        );
        let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|source| Error::Bind { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind { addr: config.listen, source })?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            warp::serve(routes)
                .incoming(listener)
                .graceful(async move {
                    let _ = stopped.await;
                })
                .run()
                .await;
        });
        for image in images.images() {
            tracing::info!(image = %image.name, digest = %image.digest, "serving image");
        }
        tracing::info!(profiles = catalog.profiles().count(), groups = catalog.groups().count(), "profiles loaded");
        tracing::info!("http: listening on {addr}");
        let mut server = Server { addr, bootstrap_token, images, registry, tftp: None, proxy_dhcp: None, stop, task };
        if let Some(tftp_addr) = config.tftp {
            server.tftp = Some(TftpServer::start(config.tftp_root.clone(), tftp_addr).await?);
        }
        if let Some(interface) = &config.proxy_dhcp {
            let ip = kiln_pxe::dhcp::interface_ipv4(interface)?;
            // iPXE, once loaded, fetches the bootstrap over HTTP from the
            // address PXE clients reach this server at.
            let script = match &config.advertise {
                Some(url) => format!("{}/boot.ipxe", url.trim_end_matches('/')),
                None => format!("http://{ip}:{}/boot.ipxe", addr.port()),
            };
            server.proxy_dhcp = Some(ProxyDhcp::start(ProxyConfig::new(interface.clone(), ip, script)).await?);
        }
        Ok(server)
    }

    /// Stops accepting, lets requests in flight finish, and returns.
    pub async fn shutdown(self) {
        if let Some(p) = self.proxy_dhcp {
            p.shutdown().await;
        }
        if let Some(t) = self.tftp {
            t.shutdown().await;
        }
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
