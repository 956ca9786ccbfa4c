//! kiln-agent: registers this node with the kiln control plane, heartbeats,
//! and serves node metrics; `kiln-agent metrics` serves only the metrics.
//! See the library's docs for what it does; this file parses flags and starts it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kiln_agent::backoff::Backoff;
use kiln_agent::node_key::NodeKey;
use kiln_agent::register::{self, Registered};
use kiln_agent::{Roots, flannel, identity, metrics};
use kiln_core::{JoinParams, KernelCmdline, RegisterRequest};

/// Registers this node with the kiln control plane, keeps it registered and
/// serves its metrics (node_exporter's names) on `--metrics-listen`.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    agent: AgentArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve only `/metrics` (no registration): node_exporter's metrics for this host.
    Metrics(MetricsArgs),
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// Control plane base URL (default: `kiln.server=` on the kernel command line).
    #[arg(long)]
    server: Option<String>,
    /// Join token (default: `kiln.token=` on the kernel command line; with
    /// none, the machine waits as pending until `kiln nodes approve`).
    #[arg(long)]
    token: Option<String>,
    /// The kernel command line to read.
    #[arg(long, default_value = "/proc/cmdline")]
    cmdline: PathBuf,
    /// The machine-id file.
    #[arg(long, default_value = "/etc/machine-id")]
    machine_id: PathBuf,
    /// CA certificate(s) (PEM) of an https:// control plane; read if it exists.
    #[arg(long, default_value = kiln_core::IMAGE_CA_PATH)]
    ca: PathBuf,
    /// Where the node's own key (`node-key.pem`) and certificate
    /// (`node.pem`) are kept, for an https:// control plane.
    #[arg(long, default_value = "/var/lib/kiln")]
    identity_dir: PathBuf,
    /// Where to serve `/metrics`.
    #[arg(long, default_value = "0.0.0.0:9100")]
    metrics_listen: SocketAddr,
    /// Do not serve metrics.
    #[arg(long)]
    no_metrics: bool,
    #[command(flatten)]
    overlay: OverlayArgs,
    #[command(flatten)]
    host: HostArgs,
}

/// The flannel overlay (see docs/flannel.md).
#[derive(Args, Debug)]
struct OverlayArgs {
    /// Do not set up the pod network (no lease is asked for).
    #[arg(long)]
    no_flannel: bool,
    /// Interface VXLAN traffic leaves by (default: `kiln.uplink=IFACE[:…]`
    /// on the kernel command line, else the one towards the control plane).
    #[arg(long)]
    iface: Option<String>,
    /// The node's public IP, the VTEP's local address (default: --iface's address, or the source address towards the control plane).
    #[arg(long)]
    public_ip: Option<std::net::Ipv4Addr>,
    /// Where `subnet.env` is written.
    #[arg(long, default_value = "/run/flannel")]
    flannel_run_dir: PathBuf,
    /// Where the CNI conflist (`10-flannel.conflist`) is written.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// host-local's `dataDir` in the conflist: where pod address reservations are kept.
    #[arg(long, default_value = "/var/lib/cni/networks")]
    cni_ipam_dir: PathBuf,
    /// Where the CNI plugins are: `kiln check`'s test pod runs them
    /// (Debian's containernetworking-plugins puts them here).
    #[arg(long, default_value = "/usr/lib/cni")]
    cni_bin_dir: PathBuf,
}

#[derive(Args, Debug)]
struct MetricsArgs {
    /// Where to serve `/metrics`.
    #[arg(long, default_value = "0.0.0.0:9100")]
    listen: SocketAddr,
    /// Collectors to run, comma-separated (default: all of them).
    #[arg(long, value_delimiter = ',')]
    collectors: Option<Vec<String>>,
    /// Time limit of one collector, in seconds.
    #[arg(long, default_value_t = 5.0)]
    collector_timeout: f64,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(Args, Debug)]
struct HostArgs {
    /// Root of procfs.
    #[arg(long, default_value = "/proc")]
    proc: PathBuf,
    /// Root of sysfs.
    #[arg(long, default_value = "/sys")]
    sys: PathBuf,
    /// The host's root filesystem (mount points are statted below it; os-release, localtime read from it).
    #[arg(long, default_value = "/")]
    rootfs: PathBuf,
    /// The mount table (default: PROC/1/mounts, else PROC/mounts).
    #[arg(long)]
    mounts: Option<PathBuf>,
    /// udev's database, for disk labels.
    #[arg(long, default_value = "/run/udev/data")]
    udev_data: PathBuf,
    /// Directory of `*.prom` files for the textfile collector.
    #[arg(long, default_value = "/var/lib/prometheus/node-exporter")]
    textfile_dir: PathBuf,
}

impl HostArgs {
    fn metrics_roots(&self) -> metrics::Roots {
        metrics::Roots {
            proc: self.proc.clone(),
            sys: self.sys.clone(),
            rootfs: self.rootfs.clone(),
            mounts: self.mounts.clone(),
            udev_data: self.udev_data.clone(),
            textfile_dir: Some(self.textfile_dir.clone()),
        }
    }
}

fn init_logging() {
    if systemd_journal_logger::connected_to_journal()
        && let Ok(logger) = systemd_journal_logger::JournalLog::new()
        && logger.install().is_ok()
    {
        log::set_max_level(log::LevelFilter::Info);
        return;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .write_style(env_logger::WriteStyle::Never)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Some(Command::Metrics(args)) => metrics_only(args),
        None => agent(cli.agent),
    }
}

fn metrics_only(args: MetricsArgs) -> ExitCode {
    let collectors = match metrics::collectors(args.collectors.as_deref()) {
        Ok(c) => c,
        Err(unknown) => {
            log::error!("{unknown}");
            return ExitCode::FAILURE;
        }
    };
    let limits = metrics::Limits { collector: Duration::from_secs_f64(args.collector_timeout.max(0.001)), ..Default::default() };
    let exporter = Arc::new(metrics::Exporter::new(args.host.metrics_roots(), collectors, limits));
    let listener = match metrics::serve::bind(args.listen) {
        Ok(l) => l,
        Err(e) => {
            log::error!("{}", register::chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().map_or_else(|_| args.listen.to_string(), |a| a.to_string());
    log::info!("metrics: listening on {addr}");
    metrics::serve::serve(listener, exporter)
}

fn agent(args: AgentArgs) -> ExitCode {
    let agent = match Agent::start(args) {
        Ok(a) => a,
        Err(e) => {
            log::error!("{}", register::chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime starts");
    runtime.block_on(agent.run())
}

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
enum StartError {
    /// The kernel command line could not be read.
    #[error("reading {}", path.display())]
    Cmdline {
        /// Its path (`--cmdline`).
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Neither the flags nor the kernel command line say where the control plane is.
    #[error(
        "no control plane: pass --server (and --token), or boot with {}= (and {}=) on the kernel command line ({})",
        kiln_core::CMDLINE_SERVER,
        kiln_core::CMDLINE_TOKEN,
        path.display()
    )]
    NoControlPlane {
        /// The kernel command line read.
        path: PathBuf,
        /// What is missing or wrong.
        #[source]
        source: kiln_core::JoinError,
    },
    /// The control plane's client could not be made (its URL, its CA).
    #[error("the control plane's client (CA {})", ca.display())]
    Client {
        /// `--ca`.
        ca: PathBuf,
        /// The cause.
        #[source]
        source: kiln_client::Error,
    },
    /// The node's key could not be made or read.
    #[error("the node's key")]
    Key(#[source] kiln_agent::node_key::Error),
}

/// The join parameters (`kiln_core::JoinParams`): `--server` and
/// `--token`, else `kiln.server=` and `kiln.token=` on the kernel command
/// line at `cmdline`; the image digest from `kiln.image_digest=`.
fn join_params(server: Option<String>, token: Option<String>, cmdline: &Path) -> Result<JoinParams, StartError> {
    let text = std::fs::read_to_string(cmdline).map_err(|source| StartError::Cmdline { path: cmdline.to_path_buf(), source })?;
    JoinParams::from_cmdline(&KernelCmdline::parse(&text), server, token)
        .map_err(|source| StartError::NoControlPlane { path: cmdline.to_path_buf(), source })
}

/// The interface `kiln.uplink=IFACE[:NET]` names on the kernel command
/// line (`kiln up` puts its guests' VXLAN on a segment of their own).
fn cmdline_uplink(cmdline: &Path) -> Option<String> {
    let text = std::fs::read_to_string(cmdline).ok()?;
    let value = KernelCmdline::parse(&text).get("kiln.uplink")?.to_string();
    let iface = value.split(':').next().unwrap_or_default();
    (!iface.is_empty()).then(|| iface.to_string())
}

/// A discovery attempt failed; it is retried.
#[derive(Debug, thiserror::Error)]
enum DiscoveryError {
    /// The node's identity could not be read.
    #[error("reading this node's identity")]
    Identity(#[source] identity::Error),
    /// The task reading it did not finish.
    #[error("reading this node's identity")]
    Task(#[source] tokio::task::JoinError),
    /// The overlay's uplink could not be found.
    #[error("flannel")]
    Overlay(#[source] flannel::Error),
}

/// The agent, its flags checked: what it registers with and what it runs.
struct Agent {
    roots: Roots,
    image_digest: String,
    client: kiln_client::Client,
    /// How the control plane's clients are made (the node's own, too).
    builder: kiln_client::Builder,
    /// The node's key, over TLS.
    key: Option<NodeKey>,
    /// Where metrics are served, when they are.
    metrics_addr: Option<SocketAddr>,
    overlay: Option<Arc<flannel::Overlay>>,
    /// Where `kiln check`'s test pod comes from (with the overlay).
    check: Option<kiln_agent::check::Config>,
}

impl Agent {
    /// Reads the join parameters, starts serving metrics, makes the
    /// control plane's client and the overlay.
    fn start(args: AgentArgs) -> Result<Agent, StartError> {
        let roots = Roots { proc: args.host.proc.clone(), sys: args.host.sys.clone(), machine_id: args.machine_id, cmdline: args.cmdline };
        let join = join_params(args.server, args.token, &roots.cmdline)?;
        log::info!("kiln-agent {} starting; control plane {}", env!("CARGO_PKG_VERSION"), join.server);
        let metrics_addr = if args.no_metrics { None } else { serve_metrics(args.metrics_listen, &args.host) };
        let ca = std::fs::read(&args.ca).ok();
        let builder =
            kiln_client::Client::builder(&join.server).ca_pem(ca.as_deref()).user_agent(concat!("kiln-agent/", env!("CARGO_PKG_VERSION")));
        // Only the registration presents the join token: the node's own
        // calls are made with its certificate (or its node token).
        let joining = match &join.token {
            Some(token) => builder.clone().token(token),
            None => {
                log::info!("no join token: this machine will wait as pending until an operator approves it");
                builder.clone()
            }
        };
        let client = joining.build().map_err(|source| StartError::Client { ca: args.ca.clone(), source })?;
        // Over plain HTTP (`kiln serve --plain-http`) there is no TLS to
        // present a certificate in: the node token is the node's credential.
        let key = match join.server.starts_with("https://") {
            true => Some(NodeKey::load_or_create(&args.identity_dir).map_err(StartError::Key)?),
            false => None,
        };
        let check = (!args.overlay.no_flannel).then(|| kiln_agent::check::Config {
            conflist: kiln_agent::check::conflist(&args.overlay.cni_conf_dir),
            cni_bin_dir: args.overlay.cni_bin_dir.clone(),
        });
        let mut overlay_args = args.overlay;
        if overlay_args.iface.is_none() {
            overlay_args.iface = cmdline_uplink(&roots.cmdline);
        }
        let overlay = (!overlay_args.no_flannel).then(|| Arc::new(overlay(overlay_args, &roots, client.authority())));
        let image_digest = join.image_digest.map(|d| d.to_string()).unwrap_or_default();
        Ok(Agent { roots, image_digest, client, builder, key, metrics_addr, overlay, check })
    }

    /// Registers and stays registered until SIGTERM or SIGINT; then
    /// leaves the cluster and tears the overlay down.
    async fn run(self) -> ExitCode {
        let (publish, registered) = tokio::sync::watch::channel(None);
        let (stop_check, check_stopped) = tokio::sync::oneshot::channel();
        let check_task = match (&self.overlay, &self.check) {
            (Some(o), Some(config)) => {
                Some(tokio::spawn(kiln_agent::check::run(config.clone(), o.check_rounds(), registered.clone(), check_stopped)))
            }
            _ => None,
        };
        let overlay_task = self.overlay.clone().map(|o| tokio::spawn(o.run(registered)));
        let joining = register::Joining { client: &self.client, builder: &self.builder, key: self.key.as_ref() };
        tokio::select! {
            never = register::run(&joining, || self.discover(), &publish) => match never {},
            signal = shutdown_signal() => log::info!("{signal}: leaving the cluster"),
        }
        if let Some(task) = overlay_task {
            task.abort();
            let _ = task.await;
        }
        // A test pod of a check going on is removed.
        let _ = stop_check.send(());
        if let Some(task) = check_task {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let last = publish.borrow().clone();
        self.leave(last).await;
        ExitCode::SUCCESS
    }

    /// This node's registration request, retried every 2 s until the
    /// identity and (with the overlay) the uplink are found.
    async fn discover(&self) -> RegisterRequest {
        let mut backoff = Backoff::between(Duration::from_secs(2), Duration::from_secs(2));
        loop {
            match self.discover_once().await {
                Ok(req) => return req,
                Err(e) => {
                    log::error!("{} (retrying in {:?})", register::chain(&e), backoff.peek());
                    backoff.wait().await;
                }
            }
        }
    }

    /// The identity (read on a blocking thread), the metrics endpoint, and
    /// the overlay's uplink and VTEP MAC.
    async fn discover_once(&self) -> Result<RegisterRequest, DiscoveryError> {
        let (roots, digest) = (self.roots.clone(), self.image_digest.clone());
        let mut req = tokio::task::spawn_blocking(move || identity::gather(&roots, &digest))
            .await
            .map_err(DiscoveryError::Task)?
            .map_err(DiscoveryError::Identity)?;
        req.metrics = self.metrics_addr.and_then(|a| identity::metrics_endpoint(a, &req.addresses));
        if let Some(overlay) = &self.overlay {
            overlay.prepare(&mut req).await.map_err(DiscoveryError::Overlay)?;
        }
        Ok(req)
    }

    /// Leaves the cluster as the node `last` registered (if it did), then
    /// removes the overlay's device and files.
    async fn leave(&self, last: Option<Registered>) {
        if let Some(reg) = &last {
            match reg.client.with_timeout(Duration::from_secs(3)).leave().await {
                Ok(_) => log::info!("left the cluster as node {}", reg.name),
                Err(e) => log::warn!("leaving: {}", register::chain(&e)),
            }
        }
        if let Some(overlay) = &self.overlay {
            overlay.teardown(last.as_ref().and_then(|r| r.lease.as_ref())).await;
        }
    }
}

/// Serves `/metrics` on `listen`; its address, or `None` (logged) when the
/// port is taken: metrics are a side duty, registration goes on.
fn serve_metrics(listen: SocketAddr, host: &HostArgs) -> Option<SocketAddr> {
    let exporter = Arc::new(metrics::Exporter::new(host.metrics_roots(), metrics::all(), metrics::Limits::default()));
    match metrics::serve::spawn(listen, exporter) {
        Ok(addr) => {
            log::info!("metrics: listening on {addr}");
            Some(addr)
        }
        Err(e) => {
            log::error!("metrics: {}", register::chain(&e));
            None
        }
    }
}

/// The flannel overlay of `--iface`, `--public-ip` and the directories,
/// for a control plane at `server` (`host:port`).
fn overlay(args: OverlayArgs, roots: &Roots, server: &str) -> flannel::Overlay {
    let config = flannel::Config {
        run_dir: args.flannel_run_dir,
        cni_conf_dir: args.cni_conf_dir,
        cni_ipam_dir: args.cni_ipam_dir,
        iface: args.iface,
        public_ip: args.public_ip,
        sys: roots.sys.clone(),
    };
    flannel::Overlay::new(config, server)
}

/// Waits for SIGTERM or SIGINT; names the one that came.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        log::warn!("cannot listen for SIGTERM/SIGINT; stopping only when killed");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
