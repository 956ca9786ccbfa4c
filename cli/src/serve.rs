//! `kiln serve`: its flags, checked and turned into the server's
//! configuration ([`ServerConfig`]), and the run until Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use kiln_control::ServerConfig;
use kiln_control::server::{ApiListen, StoreConfig};
use kiln_pool::Accel;

use crate::output;

/// Flags of `kiln serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Directory of built images (`kiln build --out`).
    #[arg(long)]
    images: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// State directory (CA, operator certificates, SD token, registry).
    #[arg(long, env = "KILN_STATE", default_value_os_t = output::default_state_dir())]
    state: PathBuf,
    /// Base URL booting nodes use to reach this server (default: each
    /// request's Host header).
    #[arg(long)]
    advertise: Option<String>,
    /// Directory of profiles (profiles/*.toml) and groups (groups/*.toml);
    /// default: every machine boots the first image.
    #[arg(long)]
    profiles: Option<PathBuf>,
    /// Serve TFTP (iPXE binaries for PXE ROMs) on this address, e.g. 0.0.0.0:69.
    #[arg(long)]
    tftp: Option<SocketAddr>,
    /// Root directory of the TFTP server.
    #[arg(long, default_value = kiln_control::server::IPXE_DIR)]
    tftp_root: PathBuf,
    /// TFTP transfers in progress at once; a request above it (or above 8
    /// from one client address) is answered with a TFTP error.
    #[arg(long, default_value_t = kiln_pxe::tftp::DEFAULT_MAX_TRANSFERS as u32, value_parser = clap::value_parser!(u32).range(1..))]
    tftp_max_transfers: u32,
    /// Answer PXE clients as proxyDHCP on this network interface, beside
    /// the network's own DHCP server (UDP 67 and 4011; needs root).
    #[arg(long, value_name = "INTERFACE")]
    proxy_dhcp: Option<String>,
    /// The pod network that nodes get subnet leases from (flannel's `Network`).
    #[arg(long, default_value = "10.244.0.0/16")]
    pod_network: kiln_core::Ipv4Cidr,
    /// Length of each node's pod subnet (flannel's `SubnetLen`).
    #[arg(long, default_value_t = 24)]
    subnet_len: u8,
    /// Address of the API over TLS (CA: STATE/ca.pem).
    #[arg(long, default_value = "127.0.0.1:8443")]
    api_listen: SocketAddr,
    /// Also serve the nodes' API (register, heartbeat, peers, leave) over
    /// plain HTTP on --listen and point nodes there, for images without
    /// the CA: only for loopback demos and tests. The operator's API stays
    /// on TLS.
    #[arg(long)]
    plain_http: bool,
    /// The API's URL as nodes reach it (default: https:// on the host
    /// they fetched their boot script from, at --api-listen's port).
    #[arg(long)]
    advertise_api: Option<String>,
    /// Another DNS name or IP address for the API's certificate
    /// (repeatable); localhost, the host name and local addresses are in.
    #[arg(long = "tls-name", value_name = "NAME")]
    tls_names: Vec<String>,
    /// Keep the registry and leases in etcd at these client URLs
    /// (comma-separated) instead of the embedded database.
    #[arg(long, value_delimiter = ',', value_name = "URL")]
    etcd: Vec<String>,
    /// flannel's etcd prefix.
    #[arg(long, default_value = kiln_control::store::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// A node not heard from for this long is removed and its subnet
    /// released, on either store (flannel's lease TTL: 24 h); on etcd it is
    /// also its lease's TTL. Seconds, or `30s`, `10m`, `24h`.
    #[arg(long, default_value = "24h", value_parser = secs_or_duration, value_name = "TTL")]
    lease_ttl: Duration,
    /// A node not heard from for longer than this is NotReady: shown so,
    /// not counted by the autoscaler, and its public IP is free for another
    /// (Kubernetes' node-monitor grace period: 40 s; heartbeats come every 10 s).
    #[arg(long, default_value = "40s", value_parser = secs_or_duration, value_name = "GRACE")]
    node_grace: Duration,
    /// Directory of pool files (pools/*.toml): kiln keeps each pool's nodes
    /// at its replicas through libvirt (`kiln scale`, `kiln pools`).
    #[arg(long)]
    pools: Option<PathBuf>,
    /// The libvirt network the nodes of a pool whose file names none join:
    /// by default the one kiln makes (--kiln-network); `user` for QEMU user
    /// networking (one disk node at most: every guest is 10.0.2.15).
    #[arg(long, value_name = "NETWORK", default_value = kiln_pool::network::DEFAULT_NAME)]
    pool_network: String,
    /// The name of the libvirt network kiln makes on pools' hosts, whose
    /// DHCP gives guests kiln's iPXE script; kiln serves on its address.
    #[arg(long, value_name = "NAME", default_value = kiln_pool::network::DEFAULT_NAME)]
    kiln_network: String,
    /// Its subnet: this host is the first address, guests get the rest.
    #[arg(long, value_name = "CIDR", default_value_t = kiln_pool::network::DEFAULT_SUBNET)]
    kiln_network_subnet: kiln_core::Ipv4Cidr,
    /// NAT from kiln's network to the host's other networks (default:
    /// isolated: guests reach this host and each other only).
    #[arg(long)]
    kiln_network_nat: bool,
    /// Pool nodes' domain type: `qemu` (TCG), `kvm`, or `auto` (KVM when a
    /// guest runs under it here).
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pool_accel: AccelChoice,
    /// Autoscaled pools: log each decision and its reason, change nothing.
    #[arg(long)]
    autoscale_dry_run: bool,
    /// Seconds between reconcile (and autoscale) passes; `kiln scale` wakes it at once.
    #[arg(long, default_value_t = 5.0)]
    pool_interval: f64,
    /// This server's name among the servers on one etcd, which elect the
    /// one that runs the pools (`kiln pools` shows the leader's); default:
    /// the host name.
    #[arg(long)]
    name: Option<String>,
    /// With --etcd and --pools: the election lease's TTL, how long a
    /// leader that died keeps the other servers from taking over. At least 3 s.
    #[arg(long, default_value = "10s", value_parser = secs_or_duration, value_name = "TTL")]
    leader_ttl: Duration,
    /// Where kiln makes its libvirt storage pool `kiln` (overlays, seeds,
    /// golden images, console logs) on a host that has none: a path on
    /// each host.
    #[arg(long, default_value = kiln_pool::volumes::DEFAULT_DIR, value_name = "DIR")]
    pool_storage: String,
    /// Open HTTP and TLS connections at most, both listeners together
    /// (lowered to fit the descriptor limit). Above it, a new connection
    /// takes the place of the one that has waited longest for a request;
    /// at most three quarters may have a request in flight (429 above).
    #[arg(long, default_value_t = kiln_control::listen::Limits::default().max_connections, value_name = "N")]
    max_connections: usize,
    /// Seconds a client has for its TLS handshake and request head, and
    /// for a request body.
    #[arg(long, default_value_t = kiln_control::listen::Limits::default().header_timeout.as_secs(), value_name = "SECS")]
    header_timeout: u64,
    /// Seconds a keep-alive connection may wait for its next request, and a
    /// client may leave an answer unread.
    #[arg(long, default_value_t = kiln_control::listen::Limits::default().idle_timeout.as_secs(), value_name = "SECS")]
    idle_timeout: u64,
    /// How long a node's client certificate is valid (`10s`, `1h`, `24h`);
    /// agents renew it before then.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    node_cert_ttl: Duration,
    /// How long the join token minted into an expected machine's boot
    /// script and seed (a pool's node, a MAC a group selects) is valid.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    boot_token_ttl: Duration,
    /// Let machines that register with no token join at once, instead of
    /// waiting as pending for `kiln nodes approve`. For labs: anyone who
    /// can reach the API then joins.
    #[arg(long)]
    auto_approve: bool,
}

/// A duration as plain seconds (`86400`, as `--lease-ttl` was first
/// spelled) or in humantime's units (`40s`, `24h`).
fn secs_or_duration(text: &str) -> Result<Duration, String> {
    match text.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(text).map_err(|e| e.to_string()),
    }
}

/// `--pool-accel`: how pool nodes' CPUs run.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM when a guest runs under it here, else TCG.
    Auto,
    /// TCG (libvirt's `<domain type='qemu'>`).
    Qemu,
    /// KVM.
    Kvm,
}

impl AccelChoice {
    /// The accelerator; `auto` probes KVM by booting the first served
    /// image's kernel under it.
    fn resolve(self, images: &Path) -> Accel {
        match self {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Qemu => Accel::Tcg,
            AccelChoice::Auto => {
                let kernel = kiln_pxe::ImageStore::load(images)
                    .ok()
                    .map(|s| images.join(&s.default_image().name).join(&s.default_image().boot.kernel));
                kernel.map_or(Accel::Tcg, |k| kiln_pool::qemu::probe_kvm(Path::new("/dev/kvm"), &k, Duration::from_secs(5), None))
            }
        }
    }
}

impl TryFrom<ServeArgs> for ServerConfig {
    type Error = anyhow::Error;

    /// Checks the flags that depend on each other and builds the server's configuration.
    fn try_from(a: ServeArgs) -> Result<ServerConfig> {
        if a.subnet_len < a.pod_network.prefix || a.subnet_len > 30 {
            anyhow::bail!("--subnet-len {} must be between the pod network's prefix ({}) and 30", a.subnet_len, a.pod_network.prefix);
        }
        if a.leader_ttl < Duration::from_secs(3) {
            anyhow::bail!("--leader-ttl must be at least 3 s (the lease is renewed every third of it)");
        }
        if a.max_connections < 4 || a.header_timeout == 0 || a.idle_timeout == 0 {
            anyhow::bail!("--max-connections must be at least 4, --header-timeout and --idle-timeout at least 1 s");
        }
        let http = kiln_control::listen::Limits {
            max_connections: a.max_connections,
            header_timeout: Duration::from_secs(a.header_timeout),
            idle_timeout: Duration::from_secs(a.idle_timeout),
        };
        let name = a.name.clone().unwrap_or_else(host_name);
        let pools = a.pools.map(|dir| kiln_control::pools::PoolsConfig {
            dir,
            networks: kiln_pool::Networks {
                default: a.pool_network,
                kiln: kiln_pool::network::KilnNetwork { name: a.kiln_network, subnet: a.kiln_network_subnet, nat: a.kiln_network_nat },
                ..Default::default()
            },
            accel: a.pool_accel.resolve(&a.images),
            api_url: a.advertise_api.clone(),
            kiln_api_url: a.advertise_api.clone(),
            interval: Duration::from_secs_f64(a.pool_interval.clamp(0.1, 3600.0)),
            autoscale_dry_run: a.autoscale_dry_run,
            storage_dir: a.pool_storage,
            name: name.clone(),
            leader_ttl: a.leader_ttl,
        });
        let api = ApiListen { listen: a.api_listen, advertise: a.advertise_api, names: a.tls_names, plain_nodes: a.plain_http };
        let store = if a.etcd.is_empty() {
            StoreConfig::Embedded
        } else {
            StoreConfig::Etcd(kiln_control::store::etcd::EtcdConfig {
                endpoints: a.etcd,
                prefix: a.etcd_prefix,
                ttl: a.lease_ttl.max(Duration::from_secs(1)),
                grace: a.node_grace.max(Duration::from_secs(1)),
                name: name.clone(),
            })
        };
        Ok(ServerConfig {
            images: a.images,
            state: a.state,
            listen: a.listen,
            advertise: a.advertise,
            profiles: a.profiles,
            tftp: a.tftp,
            tftp_root: a.tftp_root,
            tftp_max_transfers: a.tftp_max_transfers as usize,
            proxy_dhcp: a.proxy_dhcp,
            network: kiln_control::registry::NetworkConfig { network: a.pod_network, subnet_len: a.subnet_len, vni: 1 },
            api,
            store,
            pools,
            http,
            node_cert_ttl: a.node_cert_ttl.max(Duration::from_secs(1)),
            boot_token_ttl: a.boot_token_ttl,
            auto_approve: a.auto_approve,
            lifecycle: kiln_control::registry::Lifecycle {
                grace: a.node_grace.max(Duration::from_secs(1)),
                lease_ttl: a.lease_ttl.max(Duration::from_secs(1)),
            },
        })
    }
}

/// This machine's host name (`--name`'s default).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "kiln".into())
}

/// Serves until SIGINT or SIGTERM, then shuts down gracefully.
pub fn run(args: ServeArgs) -> Result<ExitCode> {
    let config = ServerConfig::try_from(args)?;
    let images = config.images.clone();
    let server_plain = config.api.plain_nodes;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let server = kiln_control::Server::start(config).await.with_context(|| format!("serving {}", images.display()))?;
        let nodes = if server_plain { " (nodes' API also on plain HTTP)" } else { "" };
        println!(
            "kiln: serving boot assets on http://{}, the API on https://{} (CA {}){nodes} (Ctrl-C stops)",
            server.addr,
            server.api_addr,
            server.ca.display()
        );
        output::shutdown_signal().await;
        tracing::info!("shutting down");
        server.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}
