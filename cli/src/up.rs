//! `kiln up`: the whole flow on one machine, on embedded defaults.
//!
//! Build the tiny image (cached), serve it on loopback, boot `--nodes` QEMU
//! guests that PXE-boot from it through their first NIC's iPXE ROM (QEMU
//! user networking: each reaches the host's loopback as 10.0.2.2), wait for
//! every agent to register, run `kiln check` on them, print the nodes and
//! the matrix, and on Ctrl-C stop the guests, the switch and the server.
//!
//! With two or more guests, each has a second NIC on a shared L2 segment, a
//! `vde_switch` on a unix socket in the state directory (no root, no host
//! network touched), which carries the overlay: on user networking every
//! guest is 10.0.2.15 and none reaches another. The guests are machines
//! kiln expects (a group per MAC in `STATE/profiles`), so each gets a
//! minted join token and joins by itself; their profile puts
//! `kiln.uplink=eth1:10.79.0.0/24` on their command line, from which the
//! tiny image's init gives eth1 an address (from its MAC) and the agent
//! carries VXLAN over it.

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
    /// How many guests to boot (1 to 16).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
    nodes: u8,
    /// MAC of the first guest's NIC; the others count up from it.
    #[arg(long, default_value = "52:54:00:6b:69:01")]
    mac: Mac,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Give up if the nodes have not registered after this many seconds.
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

    let guests: Vec<(Mac, Mac)> = (0..args.nodes).map(|i| (nth_mac(args.mac, i), segment_mac(i))).collect();
    let profiles = write_profiles(&args.state, &guests, args.nodes > 1)?;

    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let config = kiln_control::ServerConfig {
            images,
            state: args.state.clone(),
            listen: args.listen,
            advertise: None,
            profiles: Some(profiles),
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
        // The guests of an earlier run on this state directory (the same
        // MACs, so the same machine ids, with keys that are gone with their
        // RAM) are this run's to replace: their records go, so the new
        // guests join.
        for old in server.registry.nodes().into_iter().filter(|n| guests.iter().any(|(mac, _)| n.macs.contains(mac))) {
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
        let accel =
            tokio::task::spawn_blocking(move || qemu::probe_kvm("/dev/kvm".as_ref(), &kernel, Duration::from_secs(5), Some(&cache)))
                .await?;

        // One Ctrl-C listener for the whole run, polled from the first wait
        // on: a signal between two waits is not lost.
        let stop = output::shutdown_signal();
        tokio::pin!(stop);
        let mut running = Running { guests: Vec::new(), switch: None };
        let booted = boot(&args, &guests, accel, port, &mut running);
        let started = Instant::now();
        let result = match booted {
            Err(e) => Err(e),
            Ok(()) => tokio::select! {
                r = wait_all(&server, &mut running.guests, &guests, Duration::from_secs(args.timeout), args.json) => r,
                _ = &mut stop => Err(anyhow::anyhow!("interrupted before the nodes registered")),
            },
        };
        let outcome = match result {
            Ok(nodes) => {
                let secs = started.elapsed().as_secs_f64();
                report_registered(&nodes, secs, args.json);
                let checked = tokio::select! {
                    r = check(&server, &args.state, args.json) => Some(r),
                    _ = &mut stop => None,
                };
                match checked {
                    // Ctrl-C during the check.
                    None => Ok(ExitCode::SUCCESS),
                    Some(Ok(true)) => {
                        if !args.json {
                            println!("image {digest} · Ctrl-C stops the guests and the server");
                        }
                        (&mut stop).await;
                        Ok(ExitCode::SUCCESS)
                    }
                    Some(Ok(false)) => Ok(ExitCode::FAILURE),
                    Some(Err(e)) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        event(args.json, serde_json::json!({"event": "stopping"}), || "stopping the guests and the server".into());
        tokio::task::spawn_blocking(move || running.stop()).await?;
        server.shutdown().await;
        outcome
    })
}

/// The guests and the switch of one run, stopped together.
struct Running {
    guests: Vec<Guest>,
    /// `vde_switch`: it exits when its stdin closes.
    switch: Option<std::process::Child>,
}

impl Running {
    fn stop(mut self) {
        for guest in &mut self.guests {
            guest.stop(Duration::from_secs(5));
        }
        if let Some(mut switch) = self.switch.take() {
            drop(switch.stdin.take());
            let deadline = Instant::now() + Duration::from_secs(2);
            while switch.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if switch.try_wait().ok().flatten().is_none() {
                let _ = switch.kill();
                let _ = switch.wait();
            }
        }
    }
}

/// The address kiln up's guests have on their shared segment (a /24; each
/// guest's host part is its segment MAC's last byte).
const SEGMENT: &str = "10.79.0.0/24";

/// MAC `base` plus `i` in its last byte.
fn nth_mac(base: Mac, i: u8) -> Mac {
    let mut m = base.0;
    m[5] = m[5].wrapping_add(i);
    Mac(m)
}

/// Guest `i`'s NIC on the shared segment (its address there is
/// 10.79.0.(10 + i)).
fn segment_mac(i: u8) -> Mac {
    Mac([0x52, 0x54, 0x00, 0x6b, 0x75, 10 + i])
}

/// `STATE/profiles`: the profile kiln up's guests boot (`kiln.uplink=` on
/// their command line when they share a segment) and a group per guest's
/// MAC, which makes each a machine kiln expects. Written afresh each run.
fn write_profiles(state: &std::path::Path, guests: &[(Mac, Mac)], segment: bool) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = state.join("profiles");
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["profiles", "groups"] {
        // Private, as everything in the state directory is.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let args = if segment { format!("[\"kiln.uplink=eth1:{SEGMENT}\"]") } else { "[]".to_string() };
    let write = |path: PathBuf, text: String| std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()));
    write(dir.join("profiles/up.toml"), format!("image = \"tiny\"\nkernel-args = {args}\n"))?;
    for (i, (mac, _)) in guests.iter().enumerate() {
        write(dir.join(format!("groups/up-{i}.toml")), format!("profile = \"up\"\n[selector]\nmac = \"{mac}\"\n"))?;
    }
    Ok(dir)
}

/// Starts the switch (with two guests or more) and every guest, into `running`.
fn boot(args: &UpArgs, guests: &[(Mac, Mac)], accel: kiln_pool::Accel, port: u16, running: &mut Running) -> Result<()> {
    let sock = args.state.join("vde");
    if guests.len() > 1 {
        let _ = std::fs::remove_dir_all(&sock);
        let child = std::process::Command::new("vde_switch")
            .arg("-s")
            .arg(&sock)
            // Private, as everything in the state directory is.
            .args(["--dirmode", "0700", "--mode", "0600"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting vde_switch (Debian's vde2: scripts/setup)")?;
        running.switch = Some(child);
        let ready = Instant::now() + Duration::from_secs(5);
        while !sock.join("ctl").exists() {
            anyhow::ensure!(Instant::now() < ready, "vde_switch made no socket in {}", sock.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = running.switch.as_ref().map(std::process::Child::id);
        event(args.json, serde_json::json!({"event": "switch", "socket": sock, "pid": pid}), || {
            format!("shared segment: vde_switch at {}", sock.display())
        });
    }
    for (i, (mac, segment)) in guests.iter().enumerate() {
        let spec = GuestSpec {
            name: format!("kiln-up-{}", mac.hyphenated()),
            mac: *mac,
            memory_mib: args.memory,
            cpus: args.cpus,
            accel,
            boot: Boot::Network { bootfile: format!("http://10.0.2.2:{port}/boot.ipxe") },
            serial_log: args.state.join(if i == 0 { "serial.log".to_string() } else { format!("serial-{i}.log") }),
            firmware: qemu::Firmware::Bios,
            netns: None,
            segment: (guests.len() > 1).then(|| (*segment, sock.clone())),
        };
        let _ = std::fs::remove_file(&spec.serial_log);
        let guest = Guest::spawn(&spec).with_context(|| format!("booting guest {mac}"))?;
        event(
            args.json,
            serde_json::json!({"event": "booting", "accel": accel.qemu_arg(), "mac": mac, "pid": guest.pid(), "serial_log": spec.serial_log}),
            || format!("booting {mac} under {} (serial console: {})", accel.qemu_arg().to_uppercase(), spec.serial_log.display()),
        );
        running.guests.push(guest);
    }
    Ok(())
}

/// Waits for every guest's registration (this run's, never an earlier one's).
async fn wait_all(
    server: &kiln_control::Server,
    running: &mut [Guest],
    guests: &[(Mac, Mac)],
    timeout: Duration,
    json: bool,
) -> Result<Vec<Node>> {
    let deadline = Instant::now() + timeout;
    let since = time::OffsetDateTime::now_utc();
    let mut nodes = Vec::new();
    for (guest, (mac, _)) in running.iter_mut().zip(guests) {
        let left = deadline.saturating_duration_since(Instant::now());
        nodes.push(wait_registered(server, guest, *mac, since, left, json).await?);
    }
    Ok(nodes)
}

/// Prints the registered nodes: one event each, or a table.
fn report_registered(nodes: &[Node], secs: f64, json: bool) {
    if json {
        for node in nodes {
            println!("{}", serde_json::json!({"event": "registered", "seconds": secs, "node": node}));
        }
    } else {
        println!("{} registered in {secs:.1} s:", if nodes.len() == 1 { "1 node".to_string() } else { format!("{} nodes", nodes.len()) });
        print!("{}", output::node_table(nodes));
    }
}

/// `kiln check` on the guests, as the operator's client runs it; whether it passed.
async fn check(server: &kiln_control::Server, state: &std::path::Path, json: bool) -> Result<bool> {
    let api = crate::ApiArgs { server: format!("https://{}", server.api_addr), ca: None, cert: None, state: state.to_path_buf() };
    let result = crate::check::run(&api.client()?, Duration::from_secs(90)).await.context("kiln check")?;
    if json {
        println!("{}", serde_json::json!({"event": "check", "ok": result.ok, "result": result}));
    } else {
        print!("{}", output::check_table(&result));
    }
    Ok(result.ok)
}

async fn wait_registered(
    server: &kiln_control::Server,
    guest: &mut Guest,
    mac: Mac,
    since: time::OffsetDateTime,
    timeout: Duration,
    json: bool,
) -> Result<Node> {
    let bar = (!json).then(|| {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} waiting for the node to register [{elapsed}] {msg}").expect("a valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
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
