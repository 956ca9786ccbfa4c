//! kiln-agent: registers this node with the kiln control plane, heartbeats,
//! and serves node metrics; `kiln-agent metrics` serves only the metrics.
//! See the library's docs for what it does; this file parses flags and starts it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kiln_agent::{Roots, flannel, identity, metrics, register};
use kiln_core::{JoinParams, KernelCmdline};

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
    /// Bootstrap token (default: `kiln.token=` on the kernel command line).
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
    /// Interface VXLAN traffic leaves by (default: the one towards the control plane).
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
            log::error!("unknown collector {unknown:?}; known: {}", metrics::NAMES.join(","));
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
    let roots = Roots { proc: args.host.proc.clone(), sys: args.host.sys.clone(), machine_id: args.machine_id, cmdline: args.cmdline };
    let cmdline = match std::fs::read_to_string(&roots.cmdline) {
        Ok(text) => KernelCmdline::parse(&text),
        Err(e) => {
            log::error!("reading {}: {e}", roots.cmdline.display());
            return ExitCode::FAILURE;
        }
    };
    let JoinParams { server, token, image_digest } = match JoinParams::from_cmdline(&cmdline, args.server, args.token) {
        Ok(join) => join,
        Err(e) => {
            log::error!("{} ({}); or pass --server and --token", register::chain(&e), roots.cmdline.display());
            return ExitCode::FAILURE;
        }
    };
    let image_digest = image_digest.map(|d| d.to_string()).unwrap_or_default();
    log::info!("kiln-agent {} starting; control plane {server}", env!("CARGO_PKG_VERSION"));

    let mut metrics_addr = None;
    if !args.no_metrics {
        let exporter = Arc::new(metrics::Exporter::new(args.host.metrics_roots(), metrics::all(), metrics::Limits::default()));
        // Metrics are a side duty: a taken port is logged, registration goes on.
        match metrics::serve::spawn(args.metrics_listen, exporter) {
            Ok(addr) => {
                log::info!("metrics: listening on {addr}");
                metrics_addr = Some(addr);
            }
            Err(e) => log::error!("metrics: {}", register::chain(&e)),
        }
    }

    let overlay = if args.overlay.no_flannel {
        None
    } else {
        let config = flannel::Config {
            run_dir: args.overlay.flannel_run_dir,
            cni_conf_dir: args.overlay.cni_conf_dir,
            cni_ipam_dir: args.overlay.cni_ipam_dir,
            iface: args.overlay.iface,
            public_ip: args.overlay.public_ip,
            sys: roots.sys.clone(),
        };
        match flannel::Overlay::new(config, &server) {
            Ok(o) => Some(Arc::new(o)),
            Err(e) => {
                log::error!("flannel: {}", register::chain(&e));
                return ExitCode::FAILURE;
            }
        }
    };

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime starts");
    let ca = std::fs::read(&args.ca).ok();
    let client = match register::Client::new(&server, &token, ca.as_deref()) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            log::error!("HTTP client for {server} (CA {}): {}", args.ca.display(), register::chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let gather = || loop {
        let mut req = match identity::gather(&roots, &image_digest) {
            Ok(req) => req,
            Err(e) => {
                log::error!("reading this node's identity: {}", register::chain(&e));
                std::thread::sleep(Duration::from_secs(2));
                continue;
            }
        };
        req.metrics = metrics_addr.and_then(|a| identity::metrics_endpoint(a, &req.addresses));
        if let Some(overlay) = &overlay
            && let Err(e) = overlay.prepare(&mut req)
        {
            log::error!("flannel: {} (retrying in 2s)", register::chain(&e));
            std::thread::sleep(Duration::from_secs(2));
            continue;
        }
        return req;
    };
    runtime.block_on(async {
        let (publish, registered) = tokio::sync::watch::channel(None);
        let overlay_task = overlay.clone().map(|o| tokio::spawn(o.run(client.clone(), registered)));
        tokio::select! {
            never = client.run(gather, &publish) => match never {},
            signal = shutdown_signal() => log::info!("{signal}: leaving the cluster"),
        }
        if let Some(task) = overlay_task {
            task.abort();
            let _ = task.await;
        }
        let last = publish.borrow().clone();
        if let Some(reg) = &last {
            match client.leave(&reg.token).await {
                Ok(()) => log::info!("left the cluster as node {}", reg.name),
                Err(e) => log::warn!("leaving: {}", register::chain(&e)),
            }
        }
        if let Some(overlay) = &overlay {
            overlay.teardown(last.as_ref().and_then(|r| r.lease.as_ref())).await;
        }
        ExitCode::SUCCESS
    })
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
