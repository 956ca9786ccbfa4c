//! kiln: bake golden worker images, serve them, boot them, and watch them join.
//!
//! This binary parses flags and prints; the work is in the library crates:
//! `kiln build` → kiln-builder, `kiln serve` → kiln-control's server,
//! `kiln nodes` → the API (kiln-client), `kiln up` → all of them plus a
//! QEMU guest (kiln-pool). It owns flags, their checks and printing; no work.

mod check;
mod output;
mod serve;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

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
    Serve(Box<serve::ServeArgs>),
    /// List registered nodes.
    #[command(args_conflicts_with_subcommands = true)]
    Nodes {
        #[command(subcommand)]
        action: Option<NodesAction>,
        #[command(flatten)]
        api: ApiArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Test the pod network: every Ready node's agent makes a test pod with
    /// its CNI conflist, each pod sends to every other node's pod and
    /// address, and the receivers report the source they saw. Prints the
    /// matrix (ok, NAT, failed); exits non-zero unless every path is ok.
    Check {
        #[command(flatten)]
        api: ApiArgs,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// How long to wait for the verdicts.
        #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
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
    /// A pool's rolling replacement of nodes not on its image's current
    /// generation (`[rollout]` in the pool file): its status, pause,
    /// resume, and undo (back to the previous generation, still kept).
    Rollout {
        #[command(subcommand)]
        action: RolloutCommand,
    },
    /// Make, list and delete join tokens (`ID.SECRET`), what machines
    /// register with.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Issue and revoke operators' client certificates (the server's CA, in
    /// the state directory; a revocation takes effect on the next request).
    AdminCert {
        #[command(subcommand)]
        action: AdminCert,
        /// State directory of the server.
        #[arg(long, env = "KILN_STATE", default_value_os_t = output::default_state_dir(), global = true)]
        state: PathBuf,
    },
    /// Build the tiny image, serve it on loopback, PXE-boot a QEMU guest from
    /// it, and show the node once it has registered. Ctrl-C stops it all.
    Up(up::UpArgs),
}

/// `kiln nodes`' actions (none: list them).
#[derive(Subcommand, Debug)]
enum NodesAction {
    /// Approve the pending node NAME (a machine that registered with no
    /// token): it gets its lease and certificate on its next try, within
    /// seconds, without a restart.
    Approve {
        /// The node.
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete node NAME: its lease is released and its machine id free to
    /// join again, with another key (a reinstalled machine).
    Delete {
        /// The node.
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `kiln rollout`'s actions.
#[derive(Subcommand, Debug)]
enum RolloutCommand {
    /// Where the pool's rollout is: target generation, nodes up to date,
    /// out of date and Ready. Exits 0 once complete (with `--wait`, waits
    /// for that), 1 otherwise.
    Status {
        /// The pool.
        pool: String,
        /// Wait up to this long for the rollout to complete.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<std::time::Duration>,
        /// Print the pool's status as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Keep out-of-date nodes as they are (scaling still works).
    Pause {
        /// The pool.
        pool: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Go on replacing out-of-date nodes.
    Resume {
        /// The pool.
        pool: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Roll the pool back to the generation before the one it runs (kept by
    /// `kiln build --keep-generations`), until the image gets a new one.
    Undo {
        /// The pool.
        pool: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `kiln token`'s actions.
#[derive(Subcommand, Debug)]
enum TokenAction {
    /// Make a join token; its secret is printed once.
    Create {
        /// How long it is valid (`90s`, `30m`, `1h`, `7d`; `0`: forever).
        #[arg(long, default_value = "24h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
        /// How many registrations it allows (default: any number).
        #[arg(long)]
        uses: Option<u32>,
        /// Only nodes of this pool may join with it.
        #[arg(long)]
        pool: Option<String>,
        /// What it is for.
        #[arg(long)]
        description: Option<String>,
        /// Print JSON (the token and its info).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List join tokens (never their secrets).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete (revoke) the join token ID.
    Delete {
        /// The token's ID (the part before the dot).
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `--ttl`: a duration as humantime reads it, or `0` for forever.
fn parse_ttl(text: &str) -> Result<std::time::Duration, humantime::DurationError> {
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    humantime::parse_duration(text)
}

/// `kiln admin-cert`'s actions.
#[derive(Subcommand, Debug)]
enum AdminCert {
    /// Issue a certificate for operator NAME: OUT/NAME.pem and OUT/NAME-key.pem (0600).
    Issue {
        /// The operator's name (the certificate's CN).
        #[arg(long)]
        name: String,
        /// Directory to write it to.
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke every certificate issued to operator NAME.
    Revoke {
        /// The operator's name.
        name: String,
    },
}

/// How a command reaches the API.
#[derive(clap::Args, Debug)]
struct ApiArgs {
    /// The API's base URL.
    #[arg(long, env = "KILN_SERVER", default_value = "https://127.0.0.1:8443")]
    server: String,
    /// The CA certificate of the server (default: STATE/ca.pem).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The operator's client certificate (default: STATE/admin.pem); its
    /// key is beside it, `NAME-key.pem` for `NAME.pem`.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// State directory of the server, for its CA and the operator's certificate.
    #[arg(long, env = "KILN_STATE", default_value_os_t = output::default_state_dir())]
    state: PathBuf,
}

impl ApiArgs {
    /// The operator's client of the API: trusting the server's CA,
    /// presenting the operator's certificate.
    fn client(&self) -> Result<kiln_client::Client> {
        let state = kiln_control::StateDir::new(&self.state);
        let read = |path: &std::path::Path, what: &str| std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()));
        let ca = read(&self.ca.clone().unwrap_or_else(|| state.ca_cert()), "the server's CA")?;
        let cert = self.cert.clone().unwrap_or_else(|| state.admin_cert());
        let key = output::key_beside(&cert);
        let mut identity = read(&cert, "the operator's certificate")?;
        identity.extend(read(&key, "the operator's key")?);
        output::api_client(&self.server, &ca, &identity)
    }
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
    /// Generations of each image to keep under OUT/.generations/NAME/, the
    /// new one included: older ones stay served to nodes booting them, and
    /// `kiln rollout undo` goes back to the previous one.
    #[arg(long, default_value_t = kiln_core::manifest::KEEP_GENERATIONS as u64, value_parser = clap::value_parser!(u64).range(1..=1000))]
    keep_generations: u64,
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
        Ok(kiln_builder::Builder {
            cache: self.cache.clone(),
            agent,
            source_date_epoch,
            apt_lists: Some("/var/lib/apt/lists".into()),
            ca,
            keep_generations: self.keep_generations as usize,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = matches!(
        &cli.command,
        Command::Up(_)
            | Command::Build { .. }
            | Command::Nodes { .. }
            | Command::Check { .. }
            | Command::Scale { .. }
            | Command::Pools { .. }
            | Command::Rollout { .. }
            | Command::AdminCert { .. }
            | Command::Token { .. }
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
        Command::Build { spec, out, inputs, state, json } => build(&spec, &out, &inputs, state.as_deref(), json),
        Command::Serve(args) => serve::run(*args),
        Command::Nodes { action: Some(NodesAction::Delete { name, api }), .. } => {
            let node = block_on(api.client()?.delete_node(&name))?;
            println!("kiln: deleted node {} (machine id {})", output::escape(&node.name), output::escape(&node.machine_id));
            Ok(ExitCode::SUCCESS)
        }
        Command::Nodes { action: Some(NodesAction::Approve { name, api }), .. } => {
            let node = block_on(api.client()?.approve_node(&name))?;
            println!(
                "kiln: approved node {} (machine id {}, macs {})",
                output::escape(&node.name),
                output::escape(&node.machine_id),
                node.macs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Nodes { action: None, api, json } => {
            let nodes = block_on(api.client()?.nodes())?;
            print(json, &nodes, |n| output::node_table(n))
        }
        Command::Check { api, json, timeout } => {
            let result = block_on(check::run(&api.client()?, timeout))?;
            print(json, &result, output::check_table)?;
            Ok(if result.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Scale { pool, replicas, api } => {
            let status = block_on(api.client()?.scale(&pool, replicas))?;
            println!("kiln: pool {pool}: {replicas} replicas desired");
            if let Some(s) = status {
                print!("{}", output::pool_table(&[s]));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pools { api, json } => {
            let pools = block_on(api.client()?.pools())?;
            print(json, &pools, |p| output::pool_table(p))
        }
        Command::AdminCert { action, state } => admin_cert(&state, action),
        Command::Token { action } => token(action),
        Command::Rollout { action } => rollout(action),
        Command::Up(args) => up::run(args),
    }
}

/// `kiln rollout status|pause|resume|undo`.
fn rollout(command: RolloutCommand) -> Result<ExitCode> {
    use kiln_core::pool::RolloutAction;
    let (pool, api, action) = match command {
        RolloutCommand::Status { pool, wait, json, api } => {
            let client = api.client()?;
            let deadline = std::time::Instant::now() + wait.unwrap_or_default();
            let status = loop {
                let pools = block_on(client.pools())?;
                let status = pools.into_iter().find(|p| p.name == pool).ok_or_else(|| anyhow::anyhow!("no pool `{pool}`"))?;
                if output::rollout_complete(&status) || std::time::Instant::now() >= deadline {
                    break status;
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            };
            match json {
                true => println!("{}", serde_json::to_string_pretty(&status)?),
                false => println!("{}", output::rollout_line(&status)),
            }
            return Ok(if output::rollout_complete(&status) { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        RolloutCommand::Pause { pool, api } => (pool, api, RolloutAction::Pause),
        RolloutCommand::Resume { pool, api } => (pool, api, RolloutAction::Resume),
        RolloutCommand::Undo { pool, api } => (pool, api, RolloutAction::Undo),
    };
    let status = block_on(api.client()?.rollout(&pool, action))?;
    println!("{}", output::rollout_line(&status));
    Ok(ExitCode::SUCCESS)
}

/// `kiln token create|list|delete`.
fn token(action: TokenAction) -> Result<ExitCode> {
    match action {
        TokenAction::Create { ttl, uses, pool, description, json, api } => {
            let client = api.client()?;
            let req = kiln_core::CreateTokenRequest { ttl_secs: Some(ttl.as_secs()), uses, pool, description };
            let made = block_on(client.create_token(&req))?;
            match json {
                true => println!("{}", serde_json::to_string_pretty(&made)?),
                false => println!("{}", made.token),
            }
        }
        TokenAction::List { json, api } => {
            let client = api.client()?;
            let tokens = block_on(client.tokens())?;
            print(json, &tokens, |t| output::token_table(t))?;
        }
        TokenAction::Delete { id, api } => {
            let client = api.client()?;
            block_on(client.delete_token(&id))?;
            println!("kiln: deleted join token {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln admin-cert issue|revoke`.
fn admin_cert(state: &std::path::Path, action: AdminCert) -> Result<ExitCode> {
    match action {
        AdminCert::Issue { name, out } => {
            let ca = kiln_control::tls::Ca::load_or_create(state).with_context(|| format!("the CA in {}", state.display()))?;
            std::fs::create_dir_all(&out).with_context(|| format!("making {}", out.display()))?;
            let cert = out.join(format!("{name}.pem"));
            let issued = kiln_control::operators::issue(state, &ca, &name, &cert, &output::key_beside(&cert))?;
            println!("kiln: issued {} (serial {}, until {})", cert.display(), issued.serial, issued.not_after);
        }
        AdminCert::Revoke { name } => {
            let count = kiln_control::operators::revoke(state, &name)?;
            println!("kiln: revoked {count} certificate(s) of operator {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln build`: builds, showing progress (or JSON events).
fn build(
    spec: &std::path::Path,
    out: &std::path::Path,
    inputs: &BuildInputs,
    state: Option<&std::path::Path>,
    json: bool,
) -> Result<ExitCode> {
    let builder = inputs.builder(state)?;
    stop_build_on_signals()?;
    let progress = output::BuildProgress::new(json);
    let built = builder.build(spec, out, &|e| progress.event(e));
    if let Some(signal) = kiln_builder::interrupt::stopped() {
        // The build has unwound: its programs are gone, its temporary
        // directories removed.
        progress.event(kiln_builder::Event::Interrupted { signal: signal.as_str().into() });
        eprintln!("kiln: build of {} interrupted by {signal}: the cache and {} are as they were", spec.display(), out.display());
        return Ok(ExitCode::from(128 + signal as u8));
    }
    let outcome = built.with_context(|| format!("building {}", spec.display()))?;
    progress.finish(&outcome);
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C and SIGTERM stop the build ([`kiln_builder::interrupt`]): every
/// program it runs is killed and the build unwinds, removing its temporary
/// directories; kiln then exits 130 or 143. Should the build still be busy
/// in its own code 1.5 s later, kiln exits then anyway (the next build
/// removes what is left). The handlers are in place before the build
/// starts any program.
fn stop_build_on_signals() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut int, mut term) = {
        let _here = runtime.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let signal = tokio::select! {
                _ = int.recv() => nix::sys::signal::Signal::SIGINT,
                _ = term.recv() => nix::sys::signal::Signal::SIGTERM,
            };
            kiln_builder::interrupt::stop(signal);
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            std::process::exit(128 + signal as i32);
        })
    });
    Ok(())
}

/// Runs one API call on a runtime of its own.
fn block_on<T, E: Into<anyhow::Error>>(call: impl std::future::Future<Output = Result<T, E>>) -> Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(call).map_err(Into::into)
}

/// Prints `value` as pretty JSON, or as the table `table` makes of it.
fn print<T: serde::Serialize>(json: bool, value: &T, table: impl FnOnce(&T) -> String) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", table(value));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_command_parses_with_its_api_flags_after_it() {
        Cli::command().debug_assert();
        let api = ["--server", "https://kiln.lan:8443", "--state", "/var/lib/kiln"];
        for args in [
            &["nodes", "--json"][..],
            &["nodes", "delete", "kiln-a"],
            &["token", "create", "--ttl", "1h30m", "--uses", "2", "--pool", "gpu", "--json"],
            &["token", "create", "--ttl", "0"],
            &["token", "list", "--json"],
            &["token", "delete", "abcdef"],
            &["scale", "tiny", "2"],
            &["pools"],
        ] {
            let argv = std::iter::once("kiln").chain(args.iter().copied()).chain(api);
            if let Err(e) = Cli::try_parse_from(argv) {
                panic!("kiln {args:?} --server ... --state ...: {e}");
            }
        }
        let cli = Cli::try_parse_from(["kiln", "token", "create", "--ttl", "1h30m"]).unwrap();
        let Command::Token { action: TokenAction::Create { ttl, .. } } = cli.command else { panic!("token create") };
        assert_eq!(ttl, std::time::Duration::from_secs(5400));
        assert!(Cli::try_parse_from(["kiln", "token", "create", "--ttl", "soon"]).is_err(), "a TTL that is not a duration");
    }
}
