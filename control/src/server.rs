//! The composed server that `kiln serve` and `kiln up` run: boot assets
//! (kiln-pxe) on plain HTTP, and the control-plane API over TLS on its own
//! listener (or beside the boot assets with `--plain-http`), with the state
//! directory holding the bootstrap token, the CA and the registry.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_pxe::ImageStore;
use kiln_pxe::dhcp::{ProxyConfig, ProxyDhcp};
use kiln_pxe::profile::Catalog;
use kiln_pxe::tftp::TftpServer;
use warp::Filter;

use crate::api::{self, Api, ApiEndpoint};
use crate::registry::{NetworkConfig, Registry};
use crate::store::Store;
use crate::store::embedded::DbStore;
use crate::store::etcd::{EtcdConfig, EtcdStore};
use crate::{tls, token};

/// Where the API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiListen {
    /// On the boot assets' plain-HTTP listener (`--plain-http`).
    Plain,
    /// Over TLS on this address.
    Tls {
        /// The address.
        listen: SocketAddr,
        /// The API's URL as nodes reach it, if not the boot host on that port.
        advertise: Option<String>,
        /// More names for the certificate (QEMU user networking's host
        /// address `10.0.2.2`, a load balancer's name).
        names: Vec<String>,
    },
}

/// Which store backs the registry.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// The embedded database in the state directory.
    Embedded,
    /// etcd.
    Etcd(EtcdConfig),
}

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
    /// The pod network nodes get subnet leases from (etcd's config wins
    /// when etcd has one).
    pub network: NetworkConfig,
    /// Where the API is served.
    pub api: ApiListen,
    /// What backs the registry.
    pub store: StoreConfig,
    /// Pools of libvirt nodes to keep at their replicas (`--pools`).
    pub pools: Option<crate::pools::PoolsConfig>,
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
    /// The CA could not be made or used.
    #[error("the control plane's CA")]
    Tls(#[from] tls::Error),
    /// The TFTP server could not start.
    #[error("starting TFTP")]
    Tftp(#[from] kiln_pxe::tftp::Error),
    /// proxyDHCP could not start.
    #[error("starting proxyDHCP")]
    ProxyDhcp(#[from] kiln_pxe::dhcp::Error),
    /// The pools could not be loaded.
    #[error("loading pools")]
    Pools(#[from] crate::pools::Error),
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

/// The host of a URL: `http://10.0.2.2:8080/` → `10.0.2.2`.
fn url_host(url: &str) -> Option<String> {
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest).split('/').next()?;
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_string())
}

/// A running server. Dropping it does not stop it: call [`Server::shutdown`].
pub struct Server {
    /// The address it listens on (the real port when asked for port 0).
    pub addr: SocketAddr,
    /// The TLS API's address, unless it is served on `addr` (`--plain-http`).
    pub api_addr: Option<SocketAddr>,
    /// The CA certificate agents trust (`STATE/ca.pem`), with TLS.
    pub ca: Option<PathBuf>,
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
    /// The pools, when asked for.
    pub pools: Option<Arc<crate::pools::Pools>>,
    pools_thread: Option<std::thread::JoinHandle<()>>,
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
        let state = crate::StateDir::new(&config.state);
        let token_path = state.bootstrap_token();
        let bootstrap_token = token::load_or_create_bootstrap(&token_path).map_err(|source| Error::State { path: token_path, source })?;
        let (store, network): (Arc<dyn Store>, NetworkConfig) = match &config.store {
            StoreConfig::Embedded => {
                let store = DbStore::open(&state.registry_db(), Some(&state.legacy_nodes()))?;
                (Arc::new(store), config.network)
            }
            StoreConfig::Etcd(etcd) => {
                let (store, network) = EtcdStore::connect(etcd.clone(), config.network).await?;
                (Arc::new(store), network)
            }
        };
        let registry = Registry::open(store, network).await?;
        tracing::info!(store = %registry.store(), network = %network.network, subnet_len = network.subnet_len, nodes = registry.nodes().len(), "registry open");

        let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|source| Error::Bind { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind { addr: config.listen, source })?;
        let (api_listener, api_endpoint, ca) = match &config.api {
            ApiListen::Plain => (None, ApiEndpoint::Plain, None),
            ApiListen::Tls { listen, advertise, names } => {
                let ca = tls::Ca::load_or_create(&config.state)?;
                let l = tokio::net::TcpListener::bind(listen).await.map_err(|source| Error::Bind { addr: *listen, source })?;
                let api_addr = l.local_addr().map_err(|source| Error::Bind { addr: *listen, source })?;
                let mut extra: Vec<String> = names.clone();
                for url in [config.advertise.as_deref(), advertise.as_deref()].into_iter().flatten() {
                    if let Some(host) = url_host(url) {
                        extra.push(host);
                    }
                }
                let acceptor = ca.acceptor(&tls::server_names(*listen, &extra))?;
                (Some((l, api_addr, acceptor)), ApiEndpoint::Tls { port: api_addr.port(), advertise: advertise.clone() }, Some(ca))
            }
        };
        let pools = match config.pools.clone() {
            Some(mut pc) => Some({
                if pc.api_url.is_none() {
                    pc.api_url = Some(match &api_listener {
                        Some((_, a, _)) => format!("https://10.0.2.2:{}", a.port()),
                        None => format!("http://10.0.2.2:{}", addr.port()),
                    });
                }
                crate::pools::Pools::load(pc, registry.clone(), images.clone(), catalog.clone(), bootstrap_token.clone()).await?
            }),
            None => None,
        };
        let api = Arc::new(Api {
            pools: pools.clone(),
            registry: registry.clone(),
            images: images.clone(),
            catalog: catalog.clone(),
            bootstrap_token: bootstrap_token.clone(),
            advertise: config.advertise.clone(),
            api_endpoint,
        });
        let log = || {
            warp::log::custom(|info| {
                tracing::debug!(method = %info.method(), path = info.path(), status = info.status().as_u16(), "request");
            })
        };
        let artifacts = kiln_pxe::artifacts::routes(images.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (stop_tx, _) = tokio::sync::watch::channel(false);
        let plain_routes = match &api_listener {
            None => api::routes(api.clone()).or(artifacts).unify().boxed(),
            Some(_) => api::split_routes(api.clone()).1.or(artifacts).unify().boxed(),
        };
        let plain_routes = plain_routes.recover(api::recover).with(log());
        let mut api_addr = None;
        let mut api_task = None;
        if let Some((l, a, acceptor)) = api_listener {
            api_addr = Some(a);
            let routes = api::split_routes(api.clone()).0.recover(api::recover).unify().with(log()).map(warp::Reply::into_response).boxed();
            let mut rx = stop_tx.subscribe();
            api_task = Some(tokio::spawn(async move {
                let stop = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                tls::serve(l, acceptor, routes, stop, std::time::Duration::from_secs(5)).await;
            }));
            tracing::info!("api: listening on https://{a} (CA {})", crate::StateDir::new(&config.state).ca_cert().display());
        }
        let task = tokio::spawn(async move {
            let plain = warp::serve(plain_routes).incoming(listener).graceful(async move {
                let _ = stopped.await;
                let _ = stop_tx.send(true);
            });
            plain.run().await;
            if let Some(t) = api_task {
                let _ = t.await;
            }
        });
        for image in images.images() {
            tracing::info!(image = %image.name, digest = %image.digest, "serving image");
        }
        tracing::info!(profiles = catalog.profiles().count(), groups = catalog.groups().count(), "profiles loaded");
        tracing::info!("http: listening on {addr}");
        let ca = ca.map(|ca| ca.cert_path);
        let pools_thread = pools.as_ref().map(|p| p.spawn());
        let mut server =
            Server { addr, api_addr, ca, bootstrap_token, images, registry, tftp: None, proxy_dhcp: None, pools, pools_thread, stop, task };
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
        if let Some(p) = &self.pools {
            p.stop();
        }
        if let Some(t) = self.pools_thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
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
