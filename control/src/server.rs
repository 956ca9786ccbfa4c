//! The composed server that `kiln serve` and `kiln up` run: boot assets
//! (kiln-pxe) on plain HTTP, and the control-plane API over TLS on its own
//! listener (or beside the boot assets with `--plain-http`), with the state
//! directory holding the CA, the operators' certificates, the SD token and
//! the registry.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_pxe::LiveImages;
use kiln_pxe::dhcp::{ProxyConfig, ProxyDhcp};
use kiln_pxe::profile::Catalog;
use kiln_pxe::tftp::{TftpConfig, TftpServer};
use warp::Filter;

use crate::api::{self, Api, ApiEndpoint};
use crate::registry::{NetworkConfig, Registry};
use crate::store::Store;
use crate::store::embedded::DbStore;
use crate::store::etcd::{EtcdConfig, EtcdStore};
use crate::{listen, tls, token};

/// Where the API is served: over TLS on its own address, always (the
/// operator's routes need client certificates); with `--plain-http` the
/// nodes' routes also on the boot assets' plain-HTTP listener, for images
/// that do not carry the CA (labs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiListen {
    /// The TLS listener's address.
    pub listen: SocketAddr,
    /// The API's URL as nodes reach it, if not the boot host on that port.
    pub advertise: Option<String>,
    /// More names for the certificate (QEMU user networking's host
    /// address `10.0.2.2`, a load balancer's name).
    pub names: Vec<String>,
    /// Serve the nodes' routes on the plain-HTTP listener too, and send
    /// nodes there (`--plain-http`).
    pub plain_nodes: bool,
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
    /// State directory ([`crate::StateDir`]).
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
    /// TFTP transfers in progress at once (`--tftp-max-transfers`); a
    /// request above it gets an error packet.
    pub tftp_max_transfers: usize,
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
    /// The HTTP and TLS listeners' connection cap and time limits.
    pub http: listen::Limits,
    /// How long a node's client certificate is valid (`--node-cert-ttl`).
    pub node_cert_ttl: std::time::Duration,
    /// How long a join token the boot path mints for an expected machine
    /// is valid (`--boot-token-ttl`, [`crate::join_tokens::MINTED_TTL`]).
    pub boot_token_ttl: std::time::Duration,
    /// Machines that register with no token join at once instead of
    /// waiting as pending for `kiln nodes approve` (`--auto-approve`, for labs).
    pub auto_approve: bool,
    /// When a node is NotReady and when it is removed (`--node-grace`,
    /// `--lease-ttl`).
    pub lifecycle: crate::registry::Lifecycle,
}

/// How long a node's client certificate is valid unless told otherwise
/// (kubelet's client certificates are renewed well within their year; a
/// day keeps a copied certificate's worth short).
pub const NODE_CERT_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

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
    /// The operator certificate could not be issued.
    #[error("issuing the operator certificate")]
    Operators(#[from] crate::operators::Error),
    /// The join tokens could not be set up (the OS's random source).
    #[error("join tokens")]
    Tokens(#[from] crate::join_tokens::Error),
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
    /// The TLS API's address.
    pub api_addr: SocketAddr,
    /// The CA certificate agents trust (`STATE/ca.pem`).
    pub ca: PathBuf,
    /// The images it serves.
    pub images: Arc<LiveImages>,
    /// The registry.
    pub registry: Arc<Registry>,
    /// The TFTP server, when asked for.
    pub tftp: Option<TftpServer>,
    /// proxyDHCP, when asked for.
    pub proxy_dhcp: Option<ProxyDhcp>,
    /// The pool task, when asked for.
    pub pools: Option<kiln_pool::PoolsHandle>,
    /// The election of the server that leads the pools, on etcd.
    election: Option<crate::leader::Election>,
    stop: tokio::sync::oneshot::Sender<()>,
    /// Removes expired join tokens.
    sweeper: tokio::task::JoinHandle<()>,
    /// Looks for new image generations.
    watcher: tokio::task::JoinHandle<()>,
    task: tokio::task::JoinHandle<()>,
}

/// The API's TLS listener, bound, with its acceptor.
struct TlsListener {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    /// The same API on other addresses (kiln's network).
    more: Vec<tokio::net::TcpListener>,
}

/// A listener on kiln's network's address on this machine, `gateway`, at
/// the port of the listener asked for at `asked` and bound at `at`: nodes
/// there reach the boot server and the API at `gateway`. None when that
/// listener is on every address already; a bind that fails is logged
/// (nodes there cannot reach kiln) and skipped.
async fn also_on_kiln_network(gateway: std::net::IpAddr, asked: SocketAddr, at: SocketAddr) -> Option<tokio::net::TcpListener> {
    if asked.ip().is_unspecified() || asked.ip() == gateway {
        return None;
    }
    let addr = SocketAddr::new(gateway, at.port());
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            tracing::info!("listening on {addr} too, for nodes on kiln's network");
            Some(l)
        }
        Err(e) => {
            tracing::warn!("cannot listen on {addr}, kiln's network's address here: {e}; nodes on it cannot reach this server");
            None
        }
    }
}

/// Binds `addr`, naming it in the error.
async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), Error> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| Error::Bind { addr, source })?;
    Ok((listener, bound))
}

/// Removes the shared bootstrap token an earlier version kept in the
/// state directory: nothing accepts it any more.
fn retire_bootstrap_token(state: &std::path::Path) {
    let path = crate::StateDir::new(state).retired_bootstrap_token();
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::warn!(path = %path.display(), "removed the retired bootstrap token: nodes join with join tokens now (docs/security.md)")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), "removing the retired bootstrap token: {e}"),
    }
}

/// A token of the state directory (`file`: the SD token), made on first
/// start; the directory made and its modes checked.
fn load_token(state: &std::path::Path, file: fn(&crate::StateDir) -> PathBuf) -> Result<String, Error> {
    let dir = crate::StateDir::new(state);
    dir.create().map_err(|source| Error::State { path: state.to_path_buf(), source })?;
    dir.check_modes();
    let path = file(&dir);
    token::load_or_create(&path).map_err(|source| Error::State { path, source })
}

/// The registry on its store, and the pod network it leases from (etcd's
/// own config wins when it has one).
async fn open_registry(config: &ServerConfig) -> Result<Arc<Registry>, Error> {
    let (store, network): (Arc<dyn Store>, NetworkConfig) = match &config.store {
        StoreConfig::Embedded => {
            let state = crate::StateDir::new(&config.state);
            let store = DbStore::open(&state.registry_db(), Some(&state.legacy_nodes()))?;
            (Arc::new(store), config.network)
        }
        StoreConfig::Etcd(etcd) => {
            let (store, network) = EtcdStore::connect(etcd.clone(), config.network).await?;
            (Arc::new(store), network)
        }
    };
    let registry = Registry::open(store, network).await?;
    registry.set_lifecycle(config.lifecycle);
    tracing::info!(store = %registry.store(), network = %network.network, subnet_len = network.subnet_len, nodes = registry.nodes().len(), "registry open");
    Ok(registry)
}

/// The API's TLS listener, with the CA (made on first start); how agents
/// reach the API.
async fn bind_api(config: &ServerConfig) -> Result<(TlsListener, ApiEndpoint, tls::Ca), Error> {
    let ApiListen { listen, advertise, names, plain_nodes } = &config.api;
    let ca = tls::Ca::load_or_create(&config.state)?;
    let (listener, addr) = bind(*listen).await?;
    let mut extra: Vec<String> = names.clone();
    extra.extend([config.advertise.as_deref(), advertise.as_deref()].into_iter().flatten().filter_map(url_host));
    // Nodes on kiln's network reach the API at this machine's address there.
    extra.extend(config.pools.as_ref().map(|p| p.networks.kiln.gateway().to_string()));
    let acceptor = ca.acceptor(&tls::server_names(*listen, &extra))?;
    let endpoint = match plain_nodes {
        true => ApiEndpoint::Plain,
        false => ApiEndpoint::Tls { port: addr.port(), advertise: advertise.clone() },
    };
    Ok((TlsListener { listener, addr, acceptor, more: Vec::new() }, endpoint, ca))
}

/// The routes as a listener serves them: rejections turned into JSON
/// errors ([`api::recover`]), each request logged.
fn served(routes: warp::filters::BoxedFilter<(warp::reply::Response,)>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let log = warp::log::custom(|info| {
        tracing::debug!(method = %info.method(), path = info.path(), status = info.status().as_u16(), "request");
    });
    routes.recover(api::recover).unify().with(log).map(warp::Reply::into_response).boxed()
}

/// Serves the API over TLS on `tls`, and the boot routes and artifacts on
/// `plain` (with the nodes' routes too when `plain_nodes`), all through
/// [`listen::serve`] within `limits` (the connection cap lowered to fit the
/// descriptor limit, first raised to its hard limit). The sender stops both;
/// the cap in effect is returned with them.
fn spawn_listeners(
    api: Arc<Api>,
    images: Arc<LiveImages>,
    plain: Vec<tokio::net::TcpListener>,
    tls: TlsListener,
    plain_nodes: bool,
    limits: listen::Limits,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>, usize) {
    let nofile = listen::raise_nofile_limit().unwrap_or_else(|e| {
        tracing::warn!("reading the descriptor limit: {e}");
        1024
    });
    let fitted = limits.fit(nofile);
    if fitted.max_connections < limits.max_connections {
        tracing::warn!(
            nofile,
            asked = limits.max_connections,
            cap = fitted.max_connections,
            "http: connection cap lowered to fit the descriptor limit"
        );
    }
    let table = listen::Connections::new(fitted);
    let artifacts = kiln_pxe::artifacts::routes(images);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (stop_tx, _) = tokio::sync::watch::channel(false);
    let routes = api::RouteSets::new(&api);
    let plain_routes = match plain_nodes {
        true => routes.nodes.clone().or(routes.boot).unify().or(artifacts).unify().boxed(),
        false => routes.boot.or(artifacts).unify().boxed(),
    };
    let spawn = |listener, acceptor, routes| {
        let mut rx = stop_tx.subscribe();
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        tokio::spawn(listen::serve(listener, acceptor, served(routes), table.clone(), stop, std::time::Duration::from_secs(5)))
    };
    let tls_routes = routes.nodes.or(routes.operator).unify().boxed();
    let mut tasks: Vec<_> = plain.into_iter().map(|l| spawn(l, None, plain_routes.clone())).collect();
    for l in std::iter::once(tls.listener).chain(tls.more) {
        tasks.push(spawn(l, Some(tls.acceptor.clone()), tls_routes.clone()));
    }
    let task = tokio::spawn(async move {
        let _ = stopped.await;
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
    });
    (stop, task, fitted.max_connections)
}

/// How often expired join tokens and nodes are removed (more often with a
/// lease TTL under four times this: a node goes at most a quarter of its
/// TTL late).
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes expired join tokens, pending machines gone quiet
/// ([`crate::registry::PENDING_TTL`]) and nodes not heard from for the
/// lease TTL ([`Registry::expire`]), every [`SWEEP_EVERY`], until aborted.
/// Says so when the nodes' peers watches (one busy connection a node,
/// which carries its heartbeats too) would pass the busy share of the
/// connection cap `cap`.
async fn sweep(tokens: Arc<crate::join_tokens::JoinTokens>, registry: Arc<Registry>, cap: usize) {
    let every = SWEEP_EVERY.min(registry.lifecycle().lease_ttl / 4).max(std::time::Duration::from_millis(100));
    let mut every = tokio::time::interval(every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match tokens.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed expired join tokens"),
            Err(e) => tracing::warn!("removing expired join tokens: {}", kiln_core::error_chain(&e)),
        }
        match registry.sweep_pending(crate::registry::PENDING_TTL).await {
            Ok(gone) => {
                for name in gone {
                    tracing::info!(node = ?name, "pending machine not heard from; forgotten");
                }
            }
            Err(e) => tracing::warn!("forgetting quiet pending machines: {}", kiln_core::error_chain(&e)),
        }
        if let Err(e) = registry.expire().await {
            tracing::warn!("removing nodes past the lease TTL: {}", kiln_core::error_chain(&e));
        }
        let nodes = registry.len();
        // Each node's peers watch (which carries its heartbeats) is a busy
        // connection: at most three quarters of the cap are.
        if 4 * nodes > 3 * cap {
            tracing::warn!(
                nodes,
                cap,
                "the nodes' peers watches (a busy connection each) are more than the three quarters of the connection cap that may be busy; raise --max-connections (and the descriptor limit)"
            );
        }
    }
}

impl Server {
    /// Loads images and state, binds, and starts serving in a task.
    pub async fn start(config: ServerConfig) -> Result<Server, Error> {
        let images = Arc::new(LiveImages::load(&config.images)?);
        let catalog = Arc::new(match &config.profiles {
            Some(dir) => Catalog::load(dir, &images.current())?,
            None => Catalog::builtin(&images.current()),
        });
        let sd_token = load_token(&config.state, crate::StateDir::sd_token)?;
        retire_bootstrap_token(&config.state);
        let registry = open_registry(&config).await?;
        let tokens = Arc::new(crate::join_tokens::JoinTokens::new(registry.store_handle())?);
        let minter = crate::pools::Minter { tokens: tokens.clone(), ttl: config.boot_token_ttl };
        let (listener, addr) = bind(config.listen).await?;
        let mut plain = vec![listener];
        let (mut tls, api_endpoint, ca) = bind_api(&config).await?;
        let ca = Arc::new(ca);
        if crate::operators::ensure_admin(&config.state, &ca)? {
            tracing::info!(cert = %crate::StateDir::new(&config.state).admin_cert().display(), "issued the operator certificate `admin`");
        }
        let mut election = None;
        let pools = match config.pools.clone() {
            Some(mut pc) => {
                let api_at = |host: &str| match config.api.plain_nodes {
                    false => format!("https://{host}:{}", tls.addr.port()),
                    true => format!("http://{host}:{}", addr.port()),
                };
                // Disk nodes on QEMU user networking reach this host's loopback at 10.0.2.2.
                pc.api_url.get_or_insert_with(|| api_at("10.0.2.2"));
                pc.kiln_api_url.get_or_insert_with(|| api_at(&pc.networks.kiln.gateway().to_string()));
                pc.networks.http_port = addr.port();
                pc.networks.advertise.clone_from(&config.advertise);
                pc.networks.proxy_dhcp.clone_from(&config.proxy_dhcp);
                let parts = crate::pools::Parts {
                    registry: registry.clone(),
                    images: images.clone(),
                    catalog: catalog.clone(),
                    minter: minter.clone(),
                };
                // Servers on one etcd elect the one that changes the hosts.
                if let StoreConfig::Etcd(etcd) = &config.store {
                    election = Some(crate::leader::Election::start(etcd.endpoints.clone(), pc.name.clone(), pc.leader_ttl));
                }
                let leadership = election.as_ref().map(crate::leader::Election::lead);
                let (pools, here) = crate::pools::start(pc, parts, leadership).await?;
                if let Some(gateway) = here.map(std::net::IpAddr::V4) {
                    plain.extend(also_on_kiln_network(gateway, config.listen, addr).await);
                    let api = also_on_kiln_network(gateway, config.api.listen, tls.addr).await;
                    tls.more.extend(api);
                }
                Some(pools)
            }
            None => None,
        };
        let api = Arc::new(Api {
            pools: pools.clone(),
            registry: registry.clone(),
            images: images.clone(),
            catalog: catalog.clone(),
            minter,
            auto_approve: config.auto_approve,
            advertise: config.advertise.clone(),
            api_endpoint,
            sd_token,
            revocations: Arc::new(crate::operators::Revocations::new(&config.state)),
            tokens: tokens.clone(),
            ca: ca.clone(),
            node_cert_ttl: config.node_cert_ttl,
            checks: crate::checks::Checks::new(registry.clone()),
        });
        let api_addr = tls.addr;
        let (stop, task, cap) = spawn_listeners(api, images.clone(), plain, tls, config.api.plain_nodes, config.http);
        let sweeper = tokio::spawn(sweep(tokens, registry.clone(), cap));
        if config.auto_approve {
            tracing::warn!("--auto-approve: a machine that registers with no token joins at once (labs only)");
        }
        tracing::info!("api: listening on https://{api_addr} (CA {})", crate::StateDir::new(&config.state).ca_cert().display());
        for image in images.current().images() {
            tracing::info!(image = %image.name, digest = %image.digest, "serving image");
        }
        let watcher = tokio::spawn(images.clone().watch());
        tracing::info!(profiles = catalog.profiles().count(), groups = catalog.groups().count(), "profiles loaded");
        tracing::info!("http: listening on {addr}");
        let ca = ca.cert_path.clone();
        let mut server =
            Server { addr, api_addr, ca, images, registry, tftp: None, proxy_dhcp: None, pools, election, stop, task, sweeper, watcher };
        server.start_pxe(&config).await?;
        Ok(server)
    }

    /// TFTP and proxyDHCP, when asked for.
    async fn start_pxe(&mut self, config: &ServerConfig) -> Result<(), Error> {
        if let Some(tftp_addr) = config.tftp {
            let mut tftp = TftpConfig::new(config.tftp_root.clone(), tftp_addr);
            tftp.max_transfers = config.tftp_max_transfers;
            self.tftp = Some(TftpServer::start_with(tftp).await?);
        }
        if let Some(interface) = &config.proxy_dhcp {
            let ip = kiln_pxe::dhcp::interface_ipv4(interface)?;
            // iPXE, once loaded, fetches the bootstrap over HTTP from the
            // address PXE clients reach this server at.
            let script = match &config.advertise {
                Some(url) => format!("{}/boot.ipxe", url.trim_end_matches('/')),
                None => format!("http://{ip}:{}/boot.ipxe", self.addr.port()),
            };
            let proxy = ProxyConfig::new(interface.clone(), ip, script);
            // The files proxyDHCP names must be ones this TFTP server has.
            if let Some(tftp) = &self.tftp {
                proxy.check_served(|f| tftp.serves(f))?;
            }
            self.proxy_dhcp = Some(ProxyDhcp::start(proxy).await?);
        }
        Ok(())
    }

    /// Stops accepting, lets requests in flight finish, and returns.
    pub async fn shutdown(self) {
        if let Some(p) = &self.pools {
            p.stop().await;
        }
        // After the pools' last pass: the next server leads at once.
        if let Some(e) = self.election {
            e.resign().await;
        }
        if let Some(p) = self.proxy_dhcp {
            p.shutdown().await;
        }
        if let Some(t) = self.tftp {
            t.shutdown().await;
        }
        self.sweeper.abort();
        self.watcher.abort();
        let _ = self.stop.send(());
        let _ = self.task.await;
        if let Err(e) = self.registry.settle().await {
            tracing::warn!("could not write the nodes' last heartbeats: {}", kiln_core::error_chain(&e));
        }
    }
}
