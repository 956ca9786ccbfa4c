//! The lab harness for kiln's end-to-end tests.
//!
//! Tests drive the real `kiln` and `kiln-agent` binaries (release builds, as
//! users run them; [`binaries`] builds them once per test run), real QEMU
//! guests and real servers, on loopback only. Everything a test starts is
//! held by a guard ([`Process`], `kiln_pool::qemu::Guest`) that stops it
//! when dropped, so a failing assertion still cleans up.
//!
//! `KILN_SKIP_E2E=1` skips the tests that boot guests, for a quick local
//! run; CI (`CI=true`) ignores it and runs everything.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub mod etcd;
pub mod golden;
pub mod guest;
pub mod libvirt;
pub mod overlay;
pub mod slowloris;
pub mod static_files;
pub mod tftp_client;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_path_buf()
}

/// Cargo's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

/// A cache shared by every test run (downloaded `.deb`s), under target/.
pub fn cache_dir() -> PathBuf {
    target_dir().join("kiln-test-cache")
}

/// The release `kiln` and `kiln-agent`, built once per test process.
pub struct Binaries {
    /// `kiln`
    pub kiln: PathBuf,
    /// `kiln-agent`
    pub agent: PathBuf,
}

/// Builds (or finds up to date) the release binaries.
pub fn binaries() -> &'static Binaries {
    static BINS: OnceLock<Binaries> = OnceLock::new();
    BINS.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // The agent as scripts/test and the README build it: static (`cargo build-agent`).
        for args in [&["build", "--release", "-p", "kiln"][..], &["build-agent"]] {
            let mut cmd = Command::new(&cargo);
            // What `cargo test` sets for this crate (its package name, manifest
            // directory, ...) would make build scripts that watch them run
            // again, and everything after them rebuild: the build must see
            // the environment `scripts/test` built in.
            for (key, _) in std::env::vars_os() {
                let key = key.to_string_lossy();
                if ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_", "CARGO_TARGET_TMPDIR"]
                    .iter()
                    .any(|p| key.starts_with(p))
                {
                    cmd.env_remove(key.as_ref());
                }
            }
            let status = cmd.args(args).current_dir(root()).status().expect("cargo runs");
            assert!(status.success(), "cargo {} failed", args.join(" "));
        }
        let dir = target_dir().join("release");
        Binaries { kiln: dir.join("kiln"), agent: dir.join("kiln-agent") }
    })
}

/// True when the guest-booting tests should be skipped (local runs only).
pub fn skip_e2e() -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    let skip = std::env::var("KILN_SKIP_E2E").is_ok_and(|v| v == "1");
    if skip && !ci {
        eprintln!("KILN_SKIP_E2E=1: not booting guests");
        return true;
    }
    false
}

/// One guest at a time: two TCG guests on two cores only slow each other.
pub fn vm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Process {
    /// The child.
    pub child: Child,
    /// What it is, for messages.
    pub what: String,
}

impl Process {
    /// Starts `cmd` with stdout piped.
    pub fn spawn(mut cmd: Command, what: &str) -> Process {
        let child = cmd.stdout(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Process { child, what: what.to_string() }
    }

    /// The process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Sends `signal` and waits up to `grace` for the exit status.
    pub fn signal_and_wait(&mut self, signal: Signal, grace: Duration) -> Option<std::process::ExitStatus> {
        let _ = kill(self.pid(), signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if self.signal_and_wait(Signal::SIGTERM, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `kiln serve` on loopback, any free port.
pub struct KilnServer {
    /// The process.
    pub process: Process,
    /// Boot assets: `http://127.0.0.1:PORT`
    pub url: String,
    /// The API: `https://127.0.0.1:PORT`.
    pub api: String,
    /// Where nodes reach the API: `api`, or `url` with `--plain-http`.
    pub node_api: String,
    /// The CA the API's certificate is issued by (`STATE/ca.pem`), with TLS.
    pub ca: Option<PathBuf>,
    /// Its state directory.
    pub state: PathBuf,
}

impl KilnServer {
    /// Starts `kiln serve --images images --state state --listen 127.0.0.1:0
    /// --api-listen 127.0.0.1:0` (the API over TLS, its certificate also
    /// naming QEMU user networking's 10.0.2.2) and waits for it to say where
    /// it listens.
    pub fn start(images: &Path, state: &Path) -> KilnServer {
        Self::start_with(images, state, &["--api-listen", "127.0.0.1:0", "--tls-name", "10.0.2.2"])
    }

    /// As [`KilnServer::start`], with `args` after the images, state and
    /// listen flags (and the TLS API on any free loopback port, unless
    /// `args` say where).
    pub fn start_with(images: &Path, state: &Path, args: &[&str]) -> KilnServer {
        let mut cmd = Command::new(&binaries().kiln);
        cmd.arg("serve").arg("--images").arg(images).arg("--state").arg(state).args(["--listen", "127.0.0.1:0"]).args(args);
        if !args.contains(&"--api-listen") {
            cmd.args(["--api-listen", "127.0.0.1:0"]);
        }
        Self::spawn(cmd, state)
    }

    /// Runs a prepared `kiln serve` command (say, inside a namespace) and
    /// waits for it to print the URL it serves on.
    pub fn spawn(mut cmd: Command, state: &Path) -> KilnServer {
        cmd.stderr(Stdio::piped());
        let mut process = Process::spawn(cmd, "kiln serve");
        let stdout = process.child.stdout.take().expect("piped stdout");
        let stderr = process.child.stderr.take().expect("piped stderr");
        let log = state.with_extension("log");
        std::thread::spawn(move || {
            // Keep the server's log for failure messages.
            if let Ok(mut f) = std::fs::File::create(&log) {
                let _ = std::io::copy(&mut BufReader::new(stderr), &mut f);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| {
            panic!(
                "kiln serve did not print its address; its log:\n{}",
                std::fs::read_to_string(state.with_extension("log")).unwrap_or_default()
            )
        });
        let word =
            |prefix: &str| line.split_whitespace().find(|w| w.starts_with(prefix)).map(|w| w.trim_end_matches([',', ')']).to_string());
        let url = word("http://").unwrap_or_else(|| panic!("no URL in {line:?}"));
        let api = word("https://").unwrap_or_else(|| panic!("no API URL in {line:?}"));
        let node_api = if line.contains("also on plain HTTP") { url.clone() } else { api.clone() };
        let ca = Some(kiln_control::StateDir::new(state).ca_cert());
        KilnServer { process, url, api, node_api, ca, state: state.to_path_buf() }
    }

    /// The port of the API (the TLS one, or the only one).
    pub fn api_port(&self) -> u16 {
        self.api.rsplit(':').next().and_then(|p| p.parse().ok()).expect("URL has a port")
    }

    /// A raw HTTP client that trusts exactly the server's CA and presents
    /// the operator's certificate (`STATE/admin.pem`): for what is not a
    /// well-formed API call (malformed bodies, artifacts); the API's routes
    /// go through [`KilnServer::api_client`].
    pub fn client(&self) -> reqwest::blocking::Client {
        let identity = reqwest::Identity::from_pem(&self.operator_pem()).expect("the operator's PEM");
        self.raw_client().identity(identity).build().expect("an HTTP client")
    }

    /// As [`KilnServer::client`], presenting no certificate: anyone on the
    /// network.
    pub fn anonymous_client(&self) -> reqwest::blocking::Client {
        self.raw_client().build().expect("an HTTP client")
    }

    fn raw_client(&self) -> reqwest::blocking::ClientBuilder {
        let b = reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(60));
        let pem = std::fs::read(self.ca.as_ref().expect("the CA")).expect("the server wrote its CA");
        b.tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).expect("a PEM CA"))
    }

    /// The operator's certificate and key, PEM (`STATE/admin.pem`,
    /// `STATE/admin-key.pem`).
    pub fn operator_pem(&self) -> Vec<u8> {
        let dir = kiln_control::StateDir::new(&self.state);
        let mut pem = std::fs::read(dir.admin_cert()).expect("kiln serve issued STATE/admin.pem");
        pem.extend(std::fs::read(dir.admin_key()).expect("and its key"));
        pem
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.with_extension("log")).unwrap_or_default()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("URL has a port")
    }

    /// The API's typed client ([`kiln_client`]), trusting exactly the
    /// server's CA, presenting the operator's certificate, with no token;
    /// its calls run on [`block_on`].
    pub fn api_client(&self) -> kiln_client::Client {
        self.api_client_as(Some(&self.operator_pem()))
    }

    /// As [`KilnServer::api_client`], presenting `identity` (a client
    /// certificate and key, PEM), or nothing.
    pub fn api_client_as(&self, identity: Option<&[u8]>) -> kiln_client::Client {
        let ca = self.ca.as_ref().map(|ca| std::fs::read(ca).expect("the server wrote its CA"));
        kiln_client::Client::builder(&self.api)
            .ca_pem(ca.as_deref())
            .identity_pem(identity)
            .timeout(Duration::from_secs(60))
            .no_proxy()
            .build()
            .expect("an API client")
    }

    /// A join token the operator made (`POST /api/v1/tokens`, as `kiln
    /// token create` does): valid for an hour, `uses` times (any number
    /// with `None`).
    pub fn join_token(&self, uses: Option<u32>) -> String {
        let req = kiln_core::CreateTokenRequest { ttl_secs: Some(3600), uses, pool: None, description: Some("made by a test".into()) };
        // On this thread's runtime: also from a thread in a test's namespace.
        block_on_here(self.api_client().create_token(&req)).unwrap_or_else(|e| panic!("{}", chain(&e))).token
    }

    /// The API's client of a joining machine: a join token good for any
    /// number of registrations, no client certificate.
    pub fn joining_client(&self) -> kiln_client::Client {
        self.api_client_as(None).with_token(&self.join_token(None))
    }

    /// `kiln ARGS --server API --state STATE` as the operator runs it
    /// against this server: whether it succeeded, its stdout and stderr.
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(&binaries().kiln)
            .args(args)
            .args(["--server", &self.api])
            .arg("--state")
            .arg(&self.state)
            .output()
            .expect("kiln runs");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// `GET /api/v1/nodes`.
    pub fn nodes(&self) -> Vec<kiln_core::Node> {
        block_on(self.api_client().nodes()).unwrap_or_else(|e| panic!("{}", chain(&e)))
    }
}

/// Runs `future` (a [`kiln_client`] call) to its end on the harness's
/// runtime, from any thread: the tests are synchronous, the client is not.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a tokio runtime"))
        .block_on(future)
}

pub use kiln_client::chain;

/// A network namespace made by a test, deleted (with every interface in
/// it) when dropped.
pub struct Netns {
    /// Its name.
    pub name: String,
}

impl Netns {
    /// Creates `kiln-<tag>-<pid>-<n>` with its loopback up.
    pub fn new(tag: &str) -> Netns {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("kiln-{tag}-{}-{n}", std::process::id());
        // A namespace left by a killed earlier run of this same process id.
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace and asserts it succeeds.
    pub fn exec(&self, args: &[&str]) {
        run(Command::new("ip").args(["netns", "exec", &self.name]).args(args));
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a thread that entered this namespace: the sockets it
    /// opens, the threads it starts and the processes it spawns are the
    /// namespace's. Async calls inside go through [`block_on_here`].
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Routable addresses of the namespace's own (`10.79.0.2/24`), where a
    /// test's processes listen: on `lan0`, one end of a veth pair whose
    /// other end (`lan1`) is in the namespace too (a kernel without the
    /// `dummy` driver has veth).
    pub fn add_addresses(&self, addresses: &[&str]) {
        self.exec(&["ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1"]);
        for a in addresses {
            self.exec(&["ip", "addr", "add", a, "dev", "lan0"]);
        }
        self.exec(&["ip", "link", "set", "lan1", "up"]);
        self.exec(&["ip", "link", "set", "lan0", "up"]);
    }
}

/// Runs `future` to its end on a runtime of the calling thread (made for
/// this call), so its sockets are opened in the thread's network namespace
/// ([`Netns::run`]); a client used here must be made for the call.
pub fn block_on_here<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime").block_on(future)
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `kiln build SPEC --out OUT --json` with the shared cache; returns
/// the exit status, stdout and stderr.
pub fn kiln_build(spec: &Path, out: &Path) -> (std::process::ExitStatus, String, String) {
    kiln_build_for(spec, out, None)
}

/// [`kiln_build`], baking in the CA of the server with state directory
/// `state` (`--state`), so the image's agent trusts its TLS API.
pub fn kiln_build_for(spec: &Path, out: &Path, state: Option<&Path>) -> (std::process::ExitStatus, String, String) {
    let mut cmd = Command::new(&binaries().kiln);
    cmd.arg("build").arg(spec).arg("--out").arg(out).arg("--cache").arg(cache_dir()).arg("--json");
    if let Some(state) = state {
        cmd.arg("--state").arg(state);
    }
    let o = cmd.output().expect("kiln build runs");
    (o.status, String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Polls `f` every 100 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Process {
    /// Starts `cmd` with stdout and stderr appended to `log` (read it back
    /// with [`read_log`] for failure messages).
    pub fn spawn_logged(mut cmd: Command, what: &str, log: &Path) -> Process {
        let file = std::fs::File::create(log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = file.try_clone().unwrap_or_else(|e| panic!("cloning {}: {e}", log.display()));
        let child = cmd.stdout(file).stderr(err).spawn().unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Process { child, what: what.to_string() }
    }
}

/// The last 40 lines of the log file at `path`, or why it cannot be read.
pub fn read_log(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => tail(&text, 40),
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    listener.local_addr().expect("a bound listener has an address").port()
}

/// The registration of simulated node `i` (`node-I`, machine id `I` in hex,
/// addresses `192.0.2.(I % 250 + 1)` and its public IP
/// `198.18.(I / 250).(I % 250 + 1)`), with a VTEP MAC, so it gets a lease.
pub fn node_request(i: usize) -> kiln_core::RegisterRequest {
    let public_ip = format!("198.18.{}.{}", i / 250, i % 250 + 1).parse().unwrap();
    kiln_core::RegisterRequest {
        machine_id: format!("{i:032x}"),
        hostname: format!("node-{i}"),
        macs: vec![format!("52:54:00:00:{:02x}:{:02x}", i / 256, i % 256).parse().unwrap()],
        addresses: vec![format!("192.0.2.{}", i % 250 + 1).parse().unwrap(), public_ip],
        cpus: 1,
        memory_bytes: 1 << 30,
        kernel: "6.1".into(),
        agent_version: "test".into(),
        image_digest: "sha256:test".into(),
        metrics: None,
        public_ip: Some(public_ip),
        vtep_mac: Some(format!("0e:00:00:00:{:02x}:{:02x}", i / 256, i % 256).parse().unwrap()),
        uplink_mtu: Some(1500),
        csr: None,
    }
}

/// Writes an image directory `dir/name` with two small artifacts and a
/// valid manifest, enough for `kiln serve` to start.
pub fn fake_image(dir: &Path, name: &str) -> kiln_core::Manifest {
    let image = dir.join(name);
    std::fs::create_dir_all(&image).expect("image dir");
    let mut artifacts = Vec::new();
    for (file, bytes) in [("initrd.img", b"initrd-bytes".as_slice()), ("vmlinuz", b"kernel-bytes".as_slice())] {
        std::fs::write(image.join(file), bytes).expect("artifact");
        let sha256 = kiln_core::Digest::of(bytes).hex();
        artifacts.push(kiln_core::Artifact { name: file.into(), size: bytes.len() as u64, sha256 });
    }
    let manifest = kiln_core::Manifest {
        name: name.into(),
        digest: kiln_core::Manifest::compute_digest(&artifacts),
        artifacts,
        boot: kiln_core::BootSpec {
            kernel: "vmlinuz".into(),
            initrd: "initrd.img".into(),
            cmdline: vec!["console=ttyS0".into()],
            rootfs: None,
        },
        inputs: kiln_core::InputDigests {
            spec: "sha256:s".into(),
            agent: "sha256:a".into(),
            kernel_package: kiln_core::PackageRef { name: "k".into(), version: "1".into(), sha256: "x".into(), origin: None },
            packages: vec![],
            key: "sha256:k".into(),
        },
    };
    std::fs::write(image.join(kiln_core::manifest::MANIFEST_FILE), serde_json::to_vec(&manifest).expect("manifest JSON"))
        .expect("manifest");
    manifest
}
