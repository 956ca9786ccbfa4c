//! `kiln up`: the whole flow on one machine, on embedded defaults.
//!
//! Build the tiny image (cached), serve it on loopback, boot one QEMU guest
//! that PXE-boots from it through its NIC's iPXE ROM (QEMU user networking:
//! the guest reaches the host's loopback as 10.0.2.2), wait for its agent to
//! register, print the node, and on Ctrl-C stop the guest and the server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::{Mac, Node};
use kiln_pool::qemu::{self, Boot, Guest, GuestSpec, ProbeCache};

use crate::{BuildInputs, output};

/// The tiny image's spec, embedded so `kiln up` needs no checkout.
const TINY_SPEC: &str = include_str!("../../images/tiny.toml");

/// Flags of `kiln up`.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    inputs: BuildInputs,
    /// State directory of the server kiln up runs.
    #[arg(long, default_value_os_t = output::default_state_dir().join("up"))]
    state: PathBuf,
    /// Address the server listens on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// MAC of the guest's NIC.
    #[arg(long, default_value = "52:54:00:6b:69:01")]
    mac: Mac,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Give up if the node has not registered after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout: u64,
    /// Print one JSON object per line (events, then the node) for scripts.
    #[arg(long)]
    json: bool,
}

fn event(json: bool, value: serde_json::Value, human: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", human());
    }
}

/// Runs `kiln up` to the end (Ctrl-C or a failure).
pub fn run(args: UpArgs) -> Result<ExitCode> {
    let builder = args.inputs.builder(Some(&args.state))?;
    let spec_dir = args.inputs.cache.join("specs");
    std::fs::create_dir_all(&spec_dir).with_context(|| format!("creating {}", spec_dir.display()))?;
    let spec = spec_dir.join("tiny.toml");
    if std::fs::read_to_string(&spec).ok().as_deref() != Some(TINY_SPEC) {
        std::fs::write(&spec, TINY_SPEC).with_context(|| format!("writing {}", spec.display()))?;
    }
    let images = args.inputs.cache.join("images");
    let progress = output::BuildProgress::new(args.json);
    let outcome = builder.build(&spec, &images, &|e| progress.event(e)).context("building the tiny image")?;
    progress.finish(&outcome);
    let digest = outcome.manifest.digest;

    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let config = kiln_control::ServerConfig { images, state: args.state.clone(), listen: args.listen,
            advertise: None,
            profiles: None,
            tftp: None,
            tftp_root: kiln_control::server::IPXE_DIR.into(),
            tftp_max_transfers: kiln_pxe::tftp::DEFAULT_MAX_TRANSFERS,
            proxy_dhcp: None,
            network: Default::default(),
            // The guest reaches the host at QEMU user networking's 10.0.2.2.
            api: kiln_control::server::ApiListen {
                listen: SocketAddr::new(args.listen.ip(), 0),
                advertise: None,
                names: vec!["10.0.2.2".into()],
                plain_nodes: false,
            },
            store: kiln_control::server::StoreConfig::Embedded,
            pools: None,
            http: Default::default(),
            node_cert_ttl: kiln_control::server::NODE_CERT_TTL,
            boot_token_ttl: kiln_control::join_tokens::MINTED_TTL,
            auto_approve: false,
            lifecycle: Default::default(),
        };
        let server = kiln_control::Server::start(config).await.context("starting the server")?;
        // The guest of an earlier run on this state directory (the same MAC,
        // so the same machine id, with a key that is gone with its RAM) is
        // this run's to replace: its record goes, so the new guest joins.
        for old in server.registry.nodes().into_iter().filter(|n| n.macs.contains(&args.mac)) {
            server.registry.remove(&old.name).await.context("removing the last run's guest")?;
            tracing::info!(node = ?old.name, "removed the node of an earlier kiln up (this run's guest replaces it)");
        }
        let port = server.addr.port();
        event(args.json, serde_json::json!({"event": "serving", "url": format!("http://{}", server.addr)}), || {
            format!("serving on http://{}", server.addr)
        });

        let kernel = outcome.dir.join(&outcome.manifest.boot.kernel);
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_string();
        let cache = ProbeCache { path: args.state.join("kvm-probe"), boot_id };
        let accel = tokio::task::spawn_blocking(move || qemu::probe_kvm("/dev/kvm".as_ref(), &kernel, Duration::from_secs(5), Some(&cache))).await?;

        let spec = GuestSpec {
            name: format!("kiln-up-{}", args.mac.hyphenated()),
            mac: args.mac,
            memory_mib: args.memory,
            cpus: args.cpus,
            accel,
            boot: Boot::Network { bootfile: format!("http://10.0.2.2:{port}/boot.ipxe") },
            serial_log: args.state.join("serial.log"),
            firmware: qemu::Firmware::Bios,
            netns: None,
        };
        let _ = std::fs::remove_file(&spec.serial_log);
        let mut guest = Guest::spawn(&spec).context("booting the guest")?;
        event(
            args.json,
            serde_json::json!({"event": "booting", "accel": accel.qemu_arg(), "mac": args.mac, "pid": guest.pid(), "serial_log": spec.serial_log}),
            || format!("booting {} under {} (serial console: {})", args.mac, accel.qemu_arg().to_uppercase(), spec.serial_log.display()),
        );

        let started = Instant::now();
        let result = tokio::select! {
            r = wait_registered(&server, &mut guest, args.mac, Duration::from_secs(args.timeout), args.json) => r,
            _ = output::shutdown_signal() => Err(anyhow::anyhow!("interrupted before the node registered")),
        };
        let outcome = match result {
            Ok(node) => {
                let secs = started.elapsed().as_secs_f64();
                if args.json {
                    println!("{}", serde_json::json!({"event": "registered", "seconds": secs, "node": node}));
                } else {
                    println!("registered in {secs:.1} s:");
                    print!("{}", output::node_table(std::slice::from_ref(&node)));
                    println!("image {digest} · Ctrl-C stops the guest and the server");
                }
                output::shutdown_signal().await;
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Err(e),
        };
        event(args.json, serde_json::json!({"event": "stopping"}), || "stopping the guest and the server".into());
        tokio::task::spawn_blocking(move || guest.stop(Duration::from_secs(5))).await?;
        server.shutdown().await;
        outcome
    })
}

async fn wait_registered(server: &kiln_control::Server, guest: &mut Guest, mac: Mac, timeout: Duration, json: bool) -> Result<Node> {
    let bar = (!json).then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} waiting for the node to register [{elapsed}] {msg}").expect("a valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let since = time::OffsetDateTime::now_utc();
    let deadline = Instant::now() + timeout;
    let result = loop {
        // This run's guest: a record of an earlier run (the same state
        // directory) was last seen before it started.
        let node = server.registry.nodes().into_iter().find(|n| n.macs.contains(&mac) && n.last_seen >= since);
        match node {
            // The guest is kiln up's own: approve it (no other machine is).
            Some(n) if n.pending => match server.registry.approve(&n.name).await {
                Ok(_) => {
                    tracing::info!(node = ?n.name, "audit: node approved by kiln up (its own guest)");
                    let say = || {
                        event(json, serde_json::json!({"event": "approved", "node": n.name}), || {
                            format!("approved {} (this run's guest)", n.name)
                        })
                    };
                    match &bar {
                        Some(bar) => bar.suspend(say),
                        None => say(),
                    }
                }
                Err(e) => break Err(anyhow::Error::new(e).context("approving the guest")),
            },
            Some(n) => break Ok(n),
            None => {}
        }
        if let Some(reason) = guest.exited() {
            break Err(anyhow::anyhow!("the guest stopped before registering: {reason}\n{}", tail(&guest.serial(), 20)));
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "no registration after {}s; serial console ends:\n{}",
                timeout.as_secs(),
                tail(&guest.serial(), 20)
            ));
        }
        if let Some(bar) = &bar {
            let serial = guest.serial();
            let last = serial.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
            bar.set_message(last.chars().filter(|c| !c.is_control()).take(60).collect::<String>());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    result
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
