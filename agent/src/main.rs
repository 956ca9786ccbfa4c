//! kiln-agent: registers this node with the kiln control plane and heartbeats.
//! See the library's docs for what it does; this file parses flags and starts it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kiln_agent::{Roots, identity, register};
use kiln_core::KernelCmdline;

/// Registers this node with the kiln control plane and keeps it registered.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Control plane base URL (default: `kiln.server=` on the kernel command line).
    #[arg(long)]
    server: Option<String>,
    /// Bootstrap token (default: `kiln.token=` on the kernel command line).
    #[arg(long)]
    token: Option<String>,
    /// The kernel command line to read.
    #[arg(long, default_value = "/proc/cmdline")]
    cmdline: PathBuf,
    /// Root of procfs.
    #[arg(long, default_value = "/proc")]
    proc: PathBuf,
    /// Root of sysfs.
    #[arg(long, default_value = "/sys")]
    sys: PathBuf,
    /// The machine-id file.
    #[arg(long, default_value = "/etc/machine-id")]
    machine_id: PathBuf,
    /// CA certificate(s) (PEM) of an https:// control plane; read if it exists.
    #[arg(long, default_value = "/etc/kiln/ca.pem")]
    ca: PathBuf,
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
    let args = Args::parse();
    init_logging();
    let roots = Roots { proc: args.proc, sys: args.sys, machine_id: args.machine_id, cmdline: args.cmdline };
    let cmdline = match std::fs::read_to_string(&roots.cmdline) {
        Ok(text) => KernelCmdline::parse(&text),
        Err(e) => {
            log::error!("reading {}: {e}", roots.cmdline.display());
            return ExitCode::FAILURE;
        }
    };
    let server = args.server.or_else(|| cmdline.get(kiln_core::CMDLINE_SERVER).map(str::to_string));
    let token = args.token.or_else(|| cmdline.get(kiln_core::CMDLINE_TOKEN).map(str::to_string));
    let (Some(server), Some(token)) = (server, token) else {
        log::error!(
            "no control plane: pass --server and --token, or boot with {}= and {}= on the kernel command line ({})",
            kiln_core::CMDLINE_SERVER,
            kiln_core::CMDLINE_TOKEN,
            roots.cmdline.display()
        );
        return ExitCode::FAILURE;
    };
    let image_digest = cmdline.get(kiln_core::CMDLINE_IMAGE_DIGEST).unwrap_or_default().to_string();
    log::info!("kiln-agent {} starting; control plane {server}", env!("CARGO_PKG_VERSION"));

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime starts");
    let ca = std::fs::read(&args.ca).ok();
    let client = match register::Client::new(&server, &token, ca.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            log::error!("HTTP client for {server} (CA {}): {}", args.ca.display(), register::chain(&e));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        client
            .run(|| {
                loop {
                    match identity::gather(&roots, &image_digest) {
                        Ok(req) => return req,
                        Err(e) => {
                            log::error!("reading this node's identity: {}", register::chain(&e));
                            std::thread::sleep(std::time::Duration::from_secs(2));
                        }
                    }
                }
            })
            .await
    })
}
