//! kiln: bake golden worker images, serve them, boot them, and watch them join.
//!
//! This binary parses flags and prints; the work is in the library crates:
//! `kiln build` → kiln-builder, `kiln serve` → kiln-control's server,
//! `kiln nodes` → the API, `kiln up` → all of them plus a QEMU guest.

mod output;
mod up;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// kiln: golden worker images for bare-metal clusters: build, serve, boot, join.
#[derive(Parser, Debug)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build the image a spec describes into OUT/NAME/ (cached).
    Build {
        /// The image spec (images/*.toml).
        spec: PathBuf,
        /// Output directory; the image goes to OUT/NAME/.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        inputs: BuildInputs,
        /// Bake the CA of the control plane with this state directory into
        /// the image (`STATE/ca.pem`, made if there is none yet), so its
        /// agent trusts that server's TLS API.
        #[arg(long, env = "KILN_STATE")]
        state: Option<PathBuf>,
        /// One JSON event per line instead of a progress display.
        #[arg(long)]
        json: bool,
    },
    /// Serve images (HTTP, iPXE) and the control-plane API.
    Serve(Box<ServeArgs>),
    /// List registered nodes.
    Nodes {
        /// The API's base URL.
        #[arg(long, env = "KILN_SERVER", default_value = "https://127.0.0.1:8443")]
        server: String,
        /// The CA certificate of an https:// server (default: STATE/ca.pem).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// State directory of the server, for its CA.
        #[arg(long, env = "KILN_STATE", default_value_os_t = output::default_state_dir())]
        state: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Set how many nodes a pool should have (`kiln serve --pools`).
    Scale {
        /// The pool.
        pool: String,
        /// Its desired replicas, within its min and max.
        replicas: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List pools: desired replicas and, per host, nodes defined, running and registered.
    Pools {
        #[command(flatten)]
        api: ApiArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Build the tiny image, serve it on loopback, PXE-boot a QEMU guest from
    /// it, and show the node once it has registered. Ctrl-C stops it all.
    Up(up::UpArgs),
}

/// How a command reaches the API.
#[derive(clap::Args, Debug)]
struct ApiArgs {
    /// The API's base URL.
    #[arg(long, env = "KILN_SERVER", default_value = "https://127.0.0.1:8443")]
    server: String,
    /// The CA certificate of an https:// server (default: STATE/ca.pem).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// State directory of the server, for its CA and bootstrap token.
    #[arg(long, env = "KILN_STATE", default_value_os_t = output::default_state_dir())]
    state: PathBuf,
}

impl ApiArgs {
    fn ca(&self) -> Result<Option<Vec<u8>>> {
        if !self.server.starts_with("https://") {
            return Ok(None);
        }
        let path = self.ca.clone().unwrap_or_else(|| self.state.join(kiln_control::tls::CA_CERT));
        Ok(Some(std::fs::read(&path).with_context(|| format!("reading the server's CA {}", path.display()))?))
    }
}

/// Flags of `kiln serve`.
#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Directory of built images (`kiln build --out`).
    #[arg(long)]
    images: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// State directory (bootstrap token, registry).
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
    /// Serve the API over plain HTTP on --listen instead of TLS: only for
    /// loopback demos and tests.
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
    /// TTL of subnet leases in etcd, in seconds (flannel's: 24 h).
    #[arg(long, default_value_t = 86400)]
    lease_ttl: u64,
    /// Directory of pool files (pools/*.toml): kiln keeps each pool's nodes
    /// at its replicas through libvirt (`kiln scale`, `kiln pools`).
    #[arg(long)]
    pools: Option<PathBuf>,
    /// The libvirt network pool nodes' NICs join (default: QEMU user
    /// networking, where nodes reach this host's loopback at 10.0.2.2).
    #[arg(long, value_name = "NETWORK")]
    pool_network: Option<String>,
    /// Pool nodes' domain type: `qemu` (TCG), `kvm`, or `auto` (KVM when a
    /// guest runs under it here).
    #[arg(long, default_value = "auto", value_parser = ["auto", "qemu", "kvm"])]
    pool_accel: String,
    /// Autoscaled pools: log each decision and its reason, change nothing.
    #[arg(long)]
    autoscale_dry_run: bool,
    /// Seconds between reconcile (and autoscale) passes; `kiln scale` wakes it at once.
    #[arg(long, default_value_t = 5.0)]
    pool_interval: f64,
    /// Where kiln makes its libvirt storage pool `kiln` (overlays, seeds,
    /// golden images, console logs) on a host that has none: a path on
    /// each host.
    #[arg(long, default_value = kiln_pool::volumes::DEFAULT_DIR, value_name = "DIR")]
    pool_storage: String,
}

/// Where a build finds its inputs.
#[derive(clap::Args, Debug, Clone)]
pub struct BuildInputs {
    /// Cache directory for downloaded packages.
    #[arg(long, env = "KILN_CACHE", default_value_os_t = output::default_cache_dir())]
    cache: PathBuf,
    /// The kiln-agent binary to bake in (default: beside this kiln binary).
    #[arg(long, env = "KILN_AGENT")]
    agent: Option<PathBuf>,
}

impl BuildInputs {
    /// The builder; with `state`, baking that control plane's CA in.
    fn builder(&self, state: Option<&std::path::Path>) -> Result<kiln_builder::Builder> {
        let ca = match state {
            Some(state) => {
                let ca = kiln_control::tls::Ca::load_or_create(state).with_context(|| format!("the CA in {}", state.display()))?;
                Some(ca.cert_pem().as_bytes().to_vec())
            }
            None => None,
        };
        let agent = match &self.agent {
            Some(p) => p.clone(),
            None => {
                let exe = std::env::current_exe().context("locating the kiln binary")?;
                let agent = exe.with_file_name("kiln-agent");
                if !agent.exists() {
                    anyhow::bail!("no kiln-agent beside {} : build it (`cargo build-agent`) or pass --agent", exe.display());
                }
                agent
            }
        };
        let source_date_epoch = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok(kiln_builder::Builder { cache: self.cache.clone(), agent, source_date_epoch, apt_lists: Some("/var/lib/apt/lists".into()), ca })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = matches!(
        &cli.command,
        Command::Up(_) | Command::Build { .. } | Command::Nodes { .. } | Command::Scale { .. } | Command::Pools { .. }
    );
    output::init_tracing(if quiet { "warn" } else { "info" });
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: error: {}", output::chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Build { spec, out, inputs, state, json } => {
            let builder = inputs.builder(state.as_deref())?;
            let progress = output::BuildProgress::new(json);
            let outcome = builder.build(&spec, &out, &|e| progress.event(e)).with_context(|| format!("building {}", spec.display()))?;
            progress.finish(&outcome);
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            let ServeArgs {
                images,
                listen,
                state,
                advertise,
                profiles,
                tftp,
                tftp_root,
                proxy_dhcp,
                pod_network,
                subnet_len,
                api_listen,
                plain_http,
                advertise_api,
                tls_names,
                etcd,
                etcd_prefix,
                lease_ttl,
                pools,
                pool_network,
                pool_accel,
                autoscale_dry_run,
                pool_interval,
                pool_storage,
            } = *args;
            let pools = match pools {
                None => None,
                Some(dir) => {
                    let domain_type = match pool_accel.as_str() {
                        "kvm" => kiln_pool::DomainType::Kvm,
                        "qemu" => kiln_pool::DomainType::Qemu,
                        _ => {
                            let kernel = kiln_pxe::ImageStore::load(&images)
                                .ok()
                                .map(|s| images.join(&s.default_image().name).join(&s.default_image().boot.kernel));
                            match kernel.map(|k| kiln_control::qemu::probe_kvm(Path::new("/dev/kvm"), &k, Duration::from_secs(5), None)) {
                                Some(kiln_control::qemu::Accel::Kvm) => kiln_pool::DomainType::Kvm,
                                _ => kiln_pool::DomainType::Qemu,
                            }
                        }
                    };
                    Some(kiln_control::pools::PoolsConfig {
                        dir,
                        nic: pool_network.map_or(kiln_pool::Nic::User, kiln_pool::Nic::Network),
                        domain_type,
                        api_url: advertise_api.clone(),
                        interval: Duration::from_secs_f64(pool_interval.clamp(0.1, 3600.0)),
                        autoscale_dry_run,
                        storage_dir: pool_storage,
                    })
                }
            };
            if subnet_len < pod_network.prefix || subnet_len > 30 {
                anyhow::bail!("--subnet-len {subnet_len} must be between the pod network's prefix ({}) and 30", pod_network.prefix);
            }
            let network = kiln_control::registry::NetworkConfig { network: pod_network, subnet_len, vni: 1 };
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let config = kiln_control::ServerConfig {
                    images: images.clone(),
                    state,
                    listen,
                    advertise,
                    profiles,
                    tftp,
                    tftp_root,
                    proxy_dhcp,
                    network,
                    api: if plain_http {
                        kiln_control::server::ApiListen::Plain
                    } else {
                        kiln_control::server::ApiListen::Tls { listen: api_listen, advertise: advertise_api, names: tls_names }
                    },
                    store: if etcd.is_empty() {
                        kiln_control::server::StoreConfig::Embedded
                    } else {
                        kiln_control::server::StoreConfig::Etcd(kiln_control::store::etcd::EtcdConfig {
                            endpoints: etcd,
                            prefix: etcd_prefix,
                            ttl: std::time::Duration::from_secs(lease_ttl.max(1)),
                        })
                    },
                    pools,
                };
                let server = kiln_control::Server::start(config).await.with_context(|| format!("serving {}", images.display()))?;
                match (server.api_addr, &server.ca) {
                    (Some(api), Some(ca)) => println!(
                        "kiln: serving boot assets on http://{}, the API on https://{api} (CA {}) (Ctrl-C stops)",
                        server.addr,
                        ca.display()
                    ),
                    _ => println!("kiln: serving on http://{} (API on plain HTTP) (Ctrl-C stops)", server.addr),
                }
                output::shutdown_signal().await;
                tracing::info!("shutting down");
                server.shutdown().await;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Nodes { server, json, ca, state } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let ca = if server.starts_with("https://") {
                let path = ca.unwrap_or_else(|| state.join(kiln_control::tls::CA_CERT));
                Some(std::fs::read(&path).with_context(|| format!("reading the server's CA {}", path.display()))?)
            } else {
                None
            };
            let nodes = runtime.block_on(output::api_client(&server, ca.as_deref(), None)?.nodes())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                print!("{}", output::node_table(&nodes));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Scale { pool, replicas, api } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let token_path = api.state.join("bootstrap-token");
            let token =
                std::fs::read_to_string(&token_path).with_context(|| format!("reading the bootstrap token {}", token_path.display()))?;
            let client = output::api_client(&api.server, api.ca()?.as_deref(), Some(token.trim()))?;
            let status = runtime.block_on(client.scale(&pool, replicas))?;
            println!("kiln: pool {pool}: {replicas} replicas desired");
            if let Some(s) = status {
                print!("{}", output::pool_table(&[s]));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pools { api, json } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let pools = runtime.block_on(output::api_client(&api.server, api.ca()?.as_deref(), None)?.pools())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&pools)?);
            } else {
                print!("{}", output::pool_table(&pools));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Up(args) => up::run(args),
    }
}
