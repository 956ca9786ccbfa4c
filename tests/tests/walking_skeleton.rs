//! The walking skeleton, end to end: `kiln build` the tiny image, `kiln
//! serve` it on loopback, PXE-boot a QEMU guest through its NIC's iPXE ROM,
//! and see its agent register with the MAC we gave the guest and the image
//! digest from the manifest. Then `kiln up`, as the README's first command
//! runs it, to registered and back down on SIGINT.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_core::{Mac, Manifest};
use kiln_pool::qemu::{self, Boot, Guest, GuestSpec};
use kiln_tests::{KilnServer, Process, binaries, block_on, cache_dir, kiln_build, kiln_build_for, root, skip_e2e, tail, vm_lock, wait_for};
use nix::sys::signal::Signal;

fn tiny_spec() -> std::path::PathBuf {
    root().join("images/tiny.toml")
}

fn read_manifest(dir: &Path) -> Manifest {
    let text = std::fs::read(dir.join("tiny/manifest.json")).expect("manifest.json written");
    serde_json::from_slice(&text).expect("manifest.json parses")
}

#[test]
fn build_serve_pxe_boot_register() {
    if skip_e2e() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");

    // The image trusts this server's CA: the agent talks to the API over TLS.
    let state = tmp.path().join("state");
    let (status, stdout, stderr) = kiln_build_for(&tiny_spec(), &images, Some(&state));
    assert!(status.success(), "kiln build failed:\n{stderr}");
    let manifest = read_manifest(&images);
    assert_eq!(manifest.name, "tiny");
    let names: Vec<&str> = manifest.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["initrd.img", "vmlinuz"]);
    assert!(
        manifest.inputs.kernel_package.name.starts_with("linux-image-") && manifest.inputs.kernel_package.name.ends_with("-cloud-amd64")
    );
    assert_eq!(manifest.check(), Ok(()));
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().expect("events")).unwrap();
    assert_eq!(last["digest"], manifest.digest.to_string(), "the build reports the manifest's digest");

    let server = KilnServer::start(&images, &state);
    assert!(server.api.starts_with("https://"), "the API is served over TLS by default: {}", server.api);

    // What iPXE will fetch: the script, then the artifacts it names.
    let host = format!("10.0.2.2:{}", server.port());
    let booting = kiln_client::Client::builder(&server.url).host(&host).build().unwrap();
    let bootstrap = block_on(booting.boot_ipxe()).unwrap();
    assert!(bootstrap.contains(&format!("chain --autofree http://{host}/ipxe?mac=${{mac:hexhyp}}")), "{bootstrap}");
    let script = block_on(booting.ipxe(&[("mac", "52-54-00-4b-00-01"), ("arch", "x86_64")])).unwrap();
    // No group selects this MAC: kiln does not expect the machine, so its
    // script carries no token and it will wait for the operator.
    assert!(!script.contains("kiln.token"), "{script}");
    assert!(script.contains(&format!("kiln.image_digest={}", manifest.digest)), "{script}");
    assert!(script.contains(&format!("kiln.server=https://10.0.2.2:{}", server.api_port())), "{script}");
    // The API is not on the boot assets' plain-HTTP port, and plain HTTP
    // to the TLS port gets no answer.
    let nodes_at = |url: &str| block_on(kiln_client::Client::builder(url).build().unwrap().nodes());
    assert_eq!(nodes_at(&server.url).unwrap_err().status(), Some(kiln_client::StatusCode::NOT_FOUND), "no API on plain HTTP");
    let plain_to_tls = nodes_at(&format!("http://127.0.0.1:{}", server.api_port()));
    assert!(plain_to_tls.as_ref().is_err_and(|e| e.status().is_none()), "the API port speaks only TLS");
    // A client that does not trust kiln's CA refuses the server.
    assert!(nodes_at(&server.api).is_err(), "the API's certificate is kiln's CA's only");
    let client = reqwest::blocking::Client::new();
    let kernel = client.get(format!("{}/images/tiny/vmlinuz", server.url)).send().unwrap();
    assert_eq!(kernel.status(), 200);
    let bytes = kernel.bytes().unwrap();
    assert_eq!(kiln_core::sha256_digest(&bytes), format!("sha256:{}", manifest.artifact("vmlinuz").unwrap().sha256));

    // Bad registrations against the real server.
    let api = server.client();
    let register = |auth: Option<&str>, body: &str| {
        let mut r = api.post(format!("{}/api/v1/register", server.api)).body(body.to_string());
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send().unwrap()
    };
    let body = r#"{"machine_id":"0123456789abcdef0123456789abcdef","hostname":"intruder","macs":[],"addresses":[],"cpus":1,"memory_bytes":1,"kernel":"k","agent_version":"v","image_digest":""}"#;
    assert_eq!(register(Some("Bearer wrong"), body).status(), 401, "not a join token");
    assert_eq!(register(Some("Bearer abcdef.0123456789abcdef"), body).status(), 401, "a join token never made");
    let token = server.join_token(Some(1));
    let resp = register(Some(&format!("Bearer {token}")), "{not json");
    assert_eq!(resp.status(), 400, "malformed JSON");
    assert!(resp.text().unwrap().contains("registration body"), "400 says why");
    assert!(server.nodes().is_empty(), "refused registrations are not listed");

    // Boot a guest over the network, with a MAC of our choosing.
    let _vm = vm_lock();
    let mac: Mac = "52:54:00:4b:00:01".parse().unwrap();
    let accel = qemu::probe_kvm(Path::new("/dev/kvm"), &images.join("tiny/vmlinuz"), Duration::from_secs(5), None);
    let spec = GuestSpec {
        name: "kiln-e2e-skeleton".into(),
        mac,
        memory_mib: 512,
        cpus: 2,
        accel,
        boot: Boot::Network { bootfile: format!("http://10.0.2.2:{}/boot.ipxe", server.port()) },
        serial_log: tmp.path().join("serial.log"),
        firmware: qemu::Firmware::Bios,
        netns: None,
        segment: None,
    };
    let started = Instant::now();
    let mut guest = Guest::spawn(&spec).expect("QEMU starts");
    let pending = wait_for(Duration::from_secs(150), || {
        assert!(guest.exited().is_none(), "QEMU exited; serial:\n{}", tail(&guest.serial(), 30));
        server.nodes().into_iter().find(|n| n.macs.contains(&mac))
    })
    .unwrap_or_else(|| panic!("the guest did not register; serial console:\n{}", tail(&guest.serial(), 40)));
    eprintln!("pending after {:.1} s under {}", started.elapsed().as_secs_f64(), accel.qemu_arg());
    // A machine kiln did not expect waits for the operator, with no lease.
    assert!(pending.pending && pending.subnet.is_none(), "{pending:?}");
    let out = Command::new(&binaries().kiln)
        .args(["nodes", "approve", &pending.name, "--server", &server.api])
        .arg("--state")
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success(), "kiln nodes approve: {}", String::from_utf8_lossy(&out.stderr));
    let node = wait_for(Duration::from_secs(30), || server.nodes().into_iter().find(|n| n.macs.contains(&mac) && !n.pending))
        .unwrap_or_else(|| panic!("approved, the node joins; serial console:\n{}", tail(&guest.serial(), 40)));

    assert_eq!(node.image_digest, manifest.digest, "the node booted the image we built");
    assert_eq!(node.macs, vec![mac]);
    assert!(node.addresses.iter().any(|a| a.to_string() == "10.0.2.15"), "QEMU's user network gave it 10.0.2.15: {:?}", node.addresses);
    assert_eq!(node.machine_id.len(), 32);
    assert_eq!(node.hostname, "tiny-4b0001");
    assert_eq!(node.cpus, 2);
    assert!(node.memory_bytes > 256 << 20 && node.memory_bytes <= 512 << 20, "memory {}", node.memory_bytes);
    // The agent logs the registration just after the server records it.
    let wanted = format!("registered with https://10.0.2.2:{} as node {}", server.api_port(), node.name);
    let logged = wait_for(Duration::from_secs(10), || guest.serial().contains(&wanted).then_some(()));
    assert!(logged.is_some(), "the agent logs its registration:\n{}", tail(&guest.serial(), 30));

    // `kiln nodes` shows it, as a table and as JSON.
    let out = Command::new(&binaries().kiln).args(["nodes", "--server", &server.api]).arg("--state").arg(&state).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.contains(&node.name) && table.contains("52:54:00:4b:00:01"), "{table}");
    let out =
        Command::new(&binaries().kiln).args(["nodes", "--json", "--server", &server.api]).arg("--state").arg(&state).output().unwrap();
    let listed: Vec<kiln_core::Node> = serde_json::from_slice(&out.stdout).expect("kiln nodes --json prints nodes");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, node.name);

    // Heartbeats move last_seen (the agent heartbeats every 10 s).
    let seen = wait_for(Duration::from_secs(25), || server.nodes().into_iter().find(|n| n.last_seen > node.last_seen));
    assert!(seen.is_some(), "no heartbeat within 25 s; serial:\n{}", tail(&guest.serial(), 20));

    // A server restart keeps the registry; the node is still listed.
    drop(guest);
    drop(server);
    let server = KilnServer::start(&images, &state);
    let names: Vec<String> = server.nodes().into_iter().map(|n| n.name).collect();
    assert_eq!(names, vec![node.name.clone()], "the registry survives a restart");
}

#[test]
fn cached_rebuild_is_a_hit_and_builds_are_reproducible() {
    if skip_e2e() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (status, _, stderr) = kiln_build(&tiny_spec(), &a);
    assert!(status.success(), "{stderr}");
    let first = read_manifest(&a);

    let started = Instant::now();
    let (status, stdout, stderr) = kiln_build(&tiny_spec(), &a);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("\"event\":\"cached\""), "a second build with the same inputs hits the cache:\n{stdout}");
    assert!(started.elapsed() < Duration::from_secs(10), "cached build took {:?}", started.elapsed());
    assert_eq!(read_manifest(&a), first);

    // The same inputs into another directory: built again, byte for byte the same.
    let (status, stdout, stderr) = kiln_build(&tiny_spec(), &b);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("\"event\":\"built\""), "{stdout}");
    assert_eq!(read_manifest(&b).digest, first.digest, "two builds from the same inputs give the same image");

    // A damaged artifact is not a cache hit: the build repairs it.
    std::fs::write(a.join("tiny/initrd.img"), b"damaged").unwrap();
    let (status, stdout, _) = kiln_build(&tiny_spec(), &a);
    assert!(status.success() && stdout.contains("\"event\":\"built\""), "{stdout}");
    assert_eq!(read_manifest(&a).digest, first.digest);
    let mut leftovers: Vec<_> = std::fs::read_dir(&a).unwrap().filter_map(Result::ok).map(|e| e.file_name()).collect();
    leftovers.sort();
    assert_eq!(leftovers, [".generations", "tiny"], "no temporary directory is left behind");
    let kept: Vec<_> = std::fs::read_dir(a.join(".generations/tiny")).unwrap().filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert_eq!(kept, [first.digest.hex().as_str()], "one generation: the repair rewrote it");
}

#[test]
fn bad_spec_names_file_and_key_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown key",
            "name = \"x\"\ncolour = \"red\"\n[kernel]\npackage = \"linux-image-cloud-amd64\"\n[initramfs]\nbusybox-package = \"busybox-static\"\n",
            "colour",
        ),
        ("missing field", "name = \"x\"\n[initramfs]\nbusybox-package = \"busybox-static\"\n", "kernel"),
        ("wrong type", "name = \"x\"\n[kernel]\npackage = 7\n[initramfs]\nbusybox-package = \"busybox-static\"\n", "kernel.package"),
        (
            "unknown package",
            "name = \"x\"\n[kernel]\npackage = \"linux-image-does-not-exist\"\n[initramfs]\nbusybox-package = \"busybox-static\"\n",
            "linux-image-does-not-exist",
        ),
    ];
    for (case, text, key) in cases {
        let spec = tmp.path().join("bad.toml");
        std::fs::write(&spec, text).unwrap();
        let out = tmp.path().join("out");
        let (status, _, stderr) = kiln_build(&spec, &out);
        assert!(!status.success(), "case {case}: the build must fail");
        assert!(
            stderr.contains(&spec.display().to_string()) && stderr.contains(key),
            "case {case}: stderr names the file and {key:?}:\n{stderr}"
        );
        assert!(!out.exists(), "case {case}: nothing written to --out");
    }
}

#[test]
fn serve_refuses_a_directory_without_images() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = Command::new(&binaries().kiln)
        .arg("serve")
        .arg("--images")
        .arg(&empty)
        .arg("--state")
        .arg(tmp.path().join("state"))
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "kiln serve must refuse");
    assert!(stderr.contains(&empty.display().to_string()) && stderr.contains("no image"), "{stderr}");
}

/// The JSON events `kiln up --json` prints, one per line, as they come.
fn json_events(up: &mut Process) -> std::sync::mpsc::Receiver<serde_json::Value> {
    let stdout = up.child.stdout.take().expect("kiln up's stdout");
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    rx
}

#[test]
fn kiln_up_boots_registers_and_stops_on_ctrl_c() {
    if skip_e2e() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _vm = vm_lock();
    // Twice on the same state directory: the second run waits for its own
    // guest, not the record the first left.
    let mut first_name = None;
    for round in ["first", "second"] {
        let started = std::time::SystemTime::now();
        let mut cmd = Command::new(&binaries().kiln);
        cmd.args(["up", "--json", "--mac", "52:54:00:4b:00:02", "--cache"]).arg(cache_dir()).arg("--state").arg(tmp.path().join("state"));
        let mut up = Process::spawn(cmd, "kiln up");
        let rx = json_events(&mut up);
        let deadline = Instant::now() + Duration::from_secs(240);
        let mut qemu_pid = None;
        let mut node = None;
        let check = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "{round} run: kiln up did not report a registered node; serial:\n{}",
                    tail(&std::fs::read_to_string(tmp.path().join("state/serial.log")).unwrap_or_default(), 30)
                )
            });
            if event["event"] == "booting" {
                qemu_pid = event["pid"].as_u64();
            }
            assert_ne!(event["event"], "approved", "{round} run: kiln up's guest is a machine it expects: it joins with a minted token");
            if event["event"] == "registered" {
                node = Some(serde_json::from_value::<kiln_core::Node>(event["node"].clone()).expect("the node"));
            }
            if event["event"] == "check" {
                break event;
            }
        };
        let node = node.expect("registered before the check");
        assert_eq!(
            check["ok"], true,
            "{round} run: kiln check passes on one node (its test pod made by the tiny image's CNI plugins): {check}"
        );
        assert_eq!(node.macs, ["52:54:00:4b:00:02".parse::<Mac>().unwrap()]);
        assert!(!node.pending && node.image_digest.starts_with("sha256:"), "{node:?}");
        assert!(std::time::SystemTime::from(node.registered_at) >= started, "{round} run: this run's guest, not an earlier one: {node:?}");
        if let Some(first) = &first_name {
            assert_eq!(&node.name, first, "the same machine, the same name");
        }
        first_name = Some(node.name.clone());
        let qemu_pid = qemu_pid.expect("kiln up reports the guest's pid");
        assert!(Path::new(&format!("/proc/{qemu_pid}")).exists(), "the guest runs while kiln up does");

        let status = up.signal_and_wait(Signal::SIGINT, Duration::from_secs(20)).expect("kiln up exits on Ctrl-C");
        assert!(status.success(), "kiln up exits cleanly: {status}");
        let gone = wait_for(Duration::from_secs(5), || (!Path::new(&format!("/proc/{qemu_pid}")).exists()).then_some(()));
        assert!(gone.is_some(), "the guest is stopped with kiln up");
    }
}

/// `kiln up --nodes 3`: three guests of the tiny image, each with a second
/// NIC on a vde_switch segment in the state directory, register (each
/// with its own address on the segment as its VXLAN address), and kiln up's
/// own `kiln check` passes for every pair with no NAT. Ctrl-C stops the
/// guests and the switch.
#[test]
fn kiln_up_with_three_nodes_passes_its_check() {
    if skip_e2e() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _vm = vm_lock();
    let started = Instant::now();
    let mut cmd = Command::new(&binaries().kiln);
    cmd.args(["up", "--json", "--nodes", "3", "--mac", "52:54:00:4b:01:01", "--memory", "256", "--cpus", "1", "--cache"])
        .arg(cache_dir())
        .arg("--state")
        .arg(tmp.path().join("state"));
    let mut up = Process::spawn(cmd, "kiln up --nodes 3");
    let rx = json_events(&mut up);
    let serials = || {
        (0..3)
            .map(|i| tmp.path().join(if i == 0 { "state/serial.log".to_string() } else { format!("state/serial-{i}.log") }))
            .map(|p| tail(&std::fs::read_to_string(p).unwrap_or_default(), 15))
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut pids, mut switch, mut nodes) = (Vec::new(), None, Vec::new());
    let check = loop {
        let event = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("kiln up --nodes 3 did not report a check; serial consoles:\n{}", serials()));
        match event["event"].as_str() {
            Some("booting") => pids.push(event["pid"].as_u64().expect("a guest's pid")),
            Some("switch") => switch = event["pid"].as_u64(),
            Some("registered") => nodes.push(serde_json::from_value::<kiln_core::Node>(event["node"].clone()).expect("a node")),
            Some("check") => break event,
            _ => {}
        }
    };
    eprintln!("kiln up --nodes 3: check reported {:.1} s after the start (warm cache)", started.elapsed().as_secs_f64());
    assert_eq!((pids.len(), nodes.len()), (3, 3), "three guests booted and registered");
    let mut public: Vec<String> = nodes.iter().map(|n| n.public_ip.map(|ip| ip.to_string()).unwrap_or_default()).collect();
    public.sort();
    assert_eq!(public, ["10.79.0.10", "10.79.0.11", "10.79.0.12"], "each node's VXLAN address is its own on the segment: {nodes:?}");
    let result: kiln_core::CheckResult = serde_json::from_value(check["result"].clone()).expect("the check's result");
    assert!(check["ok"] == true && result.ok && result.paths.len() == 12, "kiln check passes on the three guests: {check}\n{}", serials());
    assert!(result.paths.iter().all(|p| p.verdict == kiln_core::Verdict::Ok), "no NAT, nothing failed: {:?}", result.paths);

    let status = up.signal_and_wait(Signal::SIGINT, Duration::from_secs(30)).expect("kiln up exits on Ctrl-C");
    assert!(status.success(), "kiln up exits cleanly: {status}");
    let switch = switch.expect("kiln up reports its switch's pid");
    for pid in pids.iter().chain([&switch]) {
        let gone = wait_for(Duration::from_secs(5), || (!Path::new(&format!("/proc/{pid}")).exists()).then_some(()));
        assert!(gone.is_some(), "process {pid} (a guest or the switch) is stopped with kiln up");
    }
}
