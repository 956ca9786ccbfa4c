//! Pools through the real `kiln serve --pools` and `kiln scale` / `kiln
//! pools` binaries, against libvirt's built-in `test:///default` driver (a
//! hypervisor inside the server process: domains are defined and "run",
//! nothing boots). Scaling 0 → 3 → 1 defines and removes kiln's domains;
//! the desired replicas survive a restart; bad pool files, a missing image
//! and an unreachable libvirt URI are refused at start, naming the file
//! and field, before anything is defined.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use kiln_tests::guest::{Guest, SshKey};
use kiln_tests::libvirt::PoolServer;
use kiln_tests::{KilnServer, binaries, block_on, block_on_here, chain, fake_image, tail, wait_for};

fn pool_file(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
}

const TINY: &str =
    "image = \"tiny\"\nvcpus = 1\nmemory-mib = 256\nboot = \"network\"\nmin = 0\nmax = 5\nreplicas = 0\nhosts = [\"test:///default\"]\n";

fn kiln(server: &KilnServer, args: &[&str]) -> (bool, String) {
    let out = Command::new(&binaries().kiln)
        .args(args)
        .arg("--server")
        .arg(&server.api)
        .arg("--state")
        .arg(&server.state)
        .output()
        .expect("kiln runs");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn pools(server: &KilnServer) -> Vec<serde_json::Value> {
    let (ok, out) = kiln(server, &["pools", "--json"]);
    assert!(ok, "kiln pools --json: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kiln pools --json: {e}: {out}"))
}

/// Waits until pool `name` has `defined` domains (and as many running).
fn wait_defined(server: &KilnServer, name: &str, defined: u64) {
    let got = wait_for(Duration::from_secs(20), || {
        let p = pools(server).into_iter().find(|p| p["name"] == name)?;
        let h = &p["hosts"][0];
        (h["defined"] == defined && h["running"] == defined).then_some(())
    });
    assert!(got.is_some(), "pool {name} never had {defined} domains: {:?}\nserver:\n{}", pools(server), tail(&server.log(), 20));
}

#[test]
fn scale_a_pool_up_and_down_and_keep_the_replicas_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    fake_image(&images, "tiny");
    let dir = tmp.path().join("pools");
    pool_file(&dir, "tiny", TINY);
    let state = tmp.path().join("state");
    let args = ["--plain-http", "--pools", dir.to_str().unwrap(), "--pool-accel", "qemu"];
    let server = KilnServer::start_with(&images, &state, &args);

    let listed = pools(&server);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["desired"], 0);
    assert_eq!(listed[0]["hosts"][0]["host"], "test:///default");

    let (ok, out) = kiln(&server, &["scale", "tiny", "3"]);
    assert!(ok && out.contains("3 replicas desired"), "{out}");
    wait_defined(&server, "tiny", 3);
    let log = server.log();
    for n in 0..3 {
        assert!(log.contains(&format!("create kiln-tiny-{n} on test:///default")), "each creation is logged:\n{log}");
    }
    let (ok, table) = kiln(&server, &["pools"]);
    assert!(ok && table.lines().any(|l| l.starts_with("tiny") && l.contains("test:///default") && l.contains(" 3 ")), "{table}");
    // test:///default runs nothing: the nodes are booting, none registered.
    let host = &pools(&server)[0]["hosts"][0];
    assert_eq!((&host["booting"], &host["registered"]), (&serde_json::json!(3), &serde_json::json!(0)), "{host}");

    let (ok, out) = kiln(&server, &["scale", "tiny", "1"]);
    assert!(ok, "{out}");
    wait_defined(&server, "tiny", 1);
    assert!(server.log().contains("remove kiln-tiny-2 from test:///default"), "the newest go first:\n{}", server.log());

    // Out of range and unknown pools are refused with the reason.
    let (ok, out) = kiln(&server, &["scale", "tiny", "6"]);
    assert!(!ok && out.contains("422") && out.contains("0 to 5"), "{out}");
    let (ok, out) = kiln(&server, &["scale", "nope", "1"]);
    assert!(!ok && out.contains("404") && out.contains("no pool `nope`"), "{out}");
    // Scaling needs an operator's certificate: no token, not even a join
    // token, will do.
    let join = server.join_token(None);
    let err = block_on(server.api_client_as(None).with_token(&join).scale("tiny", 2)).unwrap_err();
    assert_eq!(err.status(), Some(kiln_client::StatusCode::UNAUTHORIZED));

    // The desired replicas are in the store: a restarted server keeps them
    // (its test:///default host starts empty, so it makes the node again).
    drop(server);
    let server = KilnServer::start_with(&images, &state, &args);
    assert_eq!(pools(&server)[0]["desired"], 1, "the desired replicas survive a restart");
    wait_defined(&server, "tiny", 1);
}

/// `kiln serve` with `pools` must fail to start; its output names `want`.
fn refused(tmp: &Path, pools_dir: &Path, want: &[&str]) {
    let images = tmp.join("images");
    if !images.exists() {
        fake_image(&images, "tiny");
    }
    let out = Command::new(&binaries().kiln)
        .args(["serve", "--plain-http", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--pool-accel", "qemu", "--images"])
        .arg(&images)
        .arg("--state")
        .arg(tmp.join("state"))
        .arg("--pools")
        .arg(pools_dir)
        .output()
        .expect("kiln serve runs");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "kiln serve started with a bad pool: {text}");
    for w in want {
        assert!(text.contains(w), "the error names {w:?}:\n{text}");
    }
}

#[test]
fn bad_pools_are_refused_naming_the_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &[&str]); 5] = [
        ("missing-image", &TINY.replace("\"tiny\"", "\"nothing\""), &["missing-image.toml", "`image`", "nothing"]),
        (
            "unreachable",
            &TINY.replace("test:///default", "qemu+ssh://nowhere.invalid/system"),
            &["unreachable.toml", "hosts", "nowhere.invalid"],
        ),
        (
            "inverted",
            &TINY.replace("max = 5", "max = 0").replace("min = 0", "min = 2").replace("replicas = 0", "replicas = 2"),
            &["inverted.toml", "max"],
        ),
        ("negative", &TINY.replace("vcpus = 1", "vcpus = -1"), &["negative.toml", "vcpus"]),
        ("huge", &TINY.replace("memory-mib = 256", "memory-mib = 99999999"), &["huge.toml", "memory-mib"]),
    ];
    for (name, text, want) in cases {
        let dir = tmp.path().join(name);
        pool_file(&dir, name, text);
        refused(tmp.path(), &dir, want);
    }
}

/// The files in the lab's kiln storage pool (as the host sees its directory).
fn storage(lab: &kiln_tests::libvirt::Lab) -> Vec<String> {
    let dir = lab.host_path(kiln_pool::volumes::DEFAULT_DIR);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Waits (10 s at most) until the lab's storage pool holds exactly `want`:
/// a node's files go right after its domain.
fn storage_becomes(lab: &kiln_tests::libvirt::Lab, want: &[&str], what: &str) {
    let got = wait_for(Duration::from_secs(10), || (storage(lab) == want).then_some(()));
    assert!(got.is_some(), "{what}: the storage pool holds {:?}, not {want:?}", storage(lab));
}

/// The tiny image, built trusting a fresh state directory's CA, and a lab
/// (a private libvirtd in a namespace) named `prefix` and this process's id.
fn tiny_in_a_lab(prefix: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf, kiln_tests::libvirt::Lab) {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    let state = tmp.path().join("state");
    let (status, _, stderr) = kiln_tests::kiln_build_for(&kiln_tests::root().join("images/tiny.toml"), &images, Some(&state));
    assert!(status.success(), "kiln build: {stderr}");
    let lab = kiln_tests::libvirt::Lab::up(&format!("{prefix}{}", std::process::id() % 100_000), 8080);
    (tmp, images, state, lab)
}

/// The real thing: a private libvirtd (in a network namespace the test
/// made, see [`kiln_tests::libvirt`]) runs kiln's domains under TCG, and
/// two `kiln serve` share one etcd, as two machines would: `a`, then `b`
/// (on 127.0.0.2, its own state directory with a copy of the CA). Both run
/// the shipped pool file with no network flag, as a user runs it: `a`
/// makes the libvirt network `kiln` there, whose DHCP points PXE clients
/// at its iPXE script on that network's address, which `a` holds (as a
/// virtual IP would be held). The domains PXE-boot the tiny image and
/// their agents register over TLS.
///
/// `a` leads; `kiln pools` says so on both. 0 → 3 asked of `b` (which does
/// not lead) is made by `a`; 3 → 1; then 1 → 3 asked of `a` with `a`
/// SIGKILLed in the middle: `b` takes over within the election's TTL and
/// a pass and finishes it, `a` comes back (as a user's supervisor restarts
/// it) and does not lead. Each node is made once (no name twice in the
/// servers' logs, no libvirt error), none is lost, and at 0 no kiln
/// domain, console log or lease is left.
#[test]
fn network_pool_scales_on_a_real_libvirtd_and_fails_over_between_two_servers() {
    if kiln_tests::skip_e2e() {
        return;
    }
    let _vm = kiln_tests::vm_lock();
    let (tmp, images, state, lab) = tiny_in_a_lab("kp");
    let etcd = kiln_tests::etcd::Etcd::start_in_named(Some(&lab.netns));
    let dir = tmp.path().join("pools");
    // The repo's own pools/tiny.toml, on the lab's libvirtd.
    let shipped = std::fs::read_to_string(kiln_tests::root().join("pools/tiny.toml")).expect("pools/tiny.toml");
    pool_file(&dir, "tiny", &format!("{shipped}hosts = [\"{}\"]\n", lab.uri));
    let k = PoolServer::on_kiln_network(&lab, &images, &state);
    let on_etcd = |name: &'static str| ["--etcd", etcd.url.as_str(), "--name", name].map(String::from);
    let serve = |k: &PoolServer, name: &'static str| k.serve(&dir, &on_etcd(name).iter().map(String::as_str).collect::<Vec<_>>());
    let mut a = serve(&k, "a");
    let made = wait_for(Duration::from_secs(30), || a.log().contains("pools: made libvirt network kiln").then_some(()));
    assert!(made.is_some(), "kiln makes its network:\n{}", tail(&a.log(), 20));
    let xml = lab.virsh(&["net-dumpxml", "kiln"]);
    assert!(xml.contains("<bootp file='http://10.247.0.1:8080/boot.ipxe'/>"), "its DHCP points at kiln:\n{xml}");
    assert!(a.log().contains("listening on 10.247.0.1:8443 too"), "kiln serves on it:\n{}", tail(&a.log(), 20));
    let leads = |s: &KilnServer| s.log().contains("leader election: leading the pools");
    assert!(wait_for(Duration::from_secs(20), || leads(&a).then_some(())).is_some(), "a leads:\n{}", tail(&a.log(), 20));
    let kb = k.beside(&tmp.path().join("state-b"), "127.0.0.2");
    let b = serve(&kb, "b");
    let says = |k: &PoolServer, want: &str| {
        let said = wait_for(Duration::from_secs(20), || k.cli(&["pools"]).1.contains(want).then_some(()));
        assert!(said.is_some(), "kiln pools does not say {want:?}:\n{}", k.cli(&["pools"]).1);
    };
    says(&kb, "leader: a (another server");
    says(&k, "leader: a (this server)");
    // kiln's network's address is a's: b serves on its own, as a second
    // machine would behind a virtual IP.
    assert!(b.log().contains("cannot listen on 10.247.0.1:8080"), "a holds kiln's network's address:\n{}", tail(&b.log(), 20));

    let converge = |a: &KilnServer, want: usize, what: &str| {
        let start = std::time::Instant::now();
        let ok = wait_for(Duration::from_secs(240), || {
            (k.registered("tiny").len() == want && k.domains("tiny") == want && kb.pool()["registered"] == want as u64).then_some(())
        });
        assert!(
            ok.is_some(),
            "{what}: not {want} registered nodes: nodes {:?}, pool {}, virsh {}\na:\n{}\nb:\n{}",
            k.nodes().iter().map(|n| &n.name).collect::<Vec<_>>(),
            kb.pool(),
            lab.virsh(&["list", "--all"]),
            tail(&a.log(), 30),
            tail(&b.log(), 30)
        );
        eprintln!("{what}: converged in {:.1} s", start.elapsed().as_secs_f64());
    };

    let (ok, out) = kb.cli(&["scale", "tiny", "3"]);
    assert!(ok, "{out}");
    converge(&a, 3, "0 → 3 asked of the server that does not lead");
    let mut names: Vec<String> = k.nodes().into_iter().map(|n| n.name).collect();
    names.sort();
    assert_eq!(names, ["kiln-tiny-0", "kiln-tiny-1", "kiln-tiny-2"], "each node registers under its domain's name");
    assert!(!b.log().contains("action=create"), "the server that does not lead makes nothing:\n{}", b.log());
    let (ok, table) = k.cli(&["nodes"]);
    assert!(
        ok && table.lines().filter(|l| l.contains("kiln-tiny-") && l.contains(" tiny ") && l.contains(&lab.uri)).count() == 3,
        "kiln nodes shows each node's pool and host:\n{table}"
    );

    let (ok, out) = k.cli(&["scale", "tiny", "1"]);
    assert!(ok, "{out}");
    converge(&a, 1, "3 → 1");
    assert_eq!(k.nodes()[0].name, "kiln-tiny-0", "the newest nodes go first");

    // kill -9 of the leader in the middle of scaling up, as soon as its
    // first new domain is there: the other takes over and finishes the
    // job (nothing it needs is in a's memory).
    let creations = |s: &KilnServer| s.log().lines().filter(|l| l.contains("action=create")).map(String::from).collect::<Vec<_>>();
    let (ok, out) = k.cli(&["scale", "tiny", "3"]);
    assert!(ok, "{out}");
    let started = wait_for(Duration::from_secs(30), || (k.domains("tiny") > 1).then_some(()));
    assert!(started.is_some(), "scaling up did not start:\n{}", tail(&a.log(), 20));
    a.process.signal_and_wait(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(5)).expect("kiln serve dies on SIGKILL");
    let killed = std::time::Instant::now();
    // What a left, each domain with its UUID: none is made again.
    let uuids = || -> Vec<(String, String)> {
        let names = lab.virsh(&["list", "--all", "--name"]);
        let mut v: Vec<(String, String)> = names
            .lines()
            .filter(|l| l.starts_with("kiln-tiny-"))
            .map(|n| (n.to_string(), lab.virsh(&["domuuid", n]).trim().to_string()))
            .collect();
        v.sort();
        v
    };
    let left = uuids();
    eprintln!("a was killed with {} of 3 domains defined", left.len());
    // Back at once, as a supervisor restarts it: it serves, and waits its turn.
    let a2 = serve(&k, "a");
    let took_over = wait_for(Duration::from_secs(60), || leads(&b).then(|| killed.elapsed()));
    let took_over = took_over.unwrap_or_else(|| panic!("b never led:\n{}", tail(&b.log(), 30)));
    eprintln!("failover: a killed → b leads in {:.1} s", took_over.as_secs_f64());
    assert!(took_over <= Duration::from_secs(10 + 5), "within the election's TTL (10 s) and a pass (5 s): {took_over:?}");
    converge(&a2, 3, "1 → 3 through the leader's SIGKILL");
    eprintln!("failover: a killed → 3 registered in {:.1} s", killed.elapsed().as_secs_f64());
    says(&k, "leader: b (another server");
    says(&kb, "leader: b (this server)");
    // Each node made once: those a left are the same domains, b made the
    // rest, and a, back, made none.
    let after = uuids();
    assert!(left.iter().all(|d| after.contains(d)), "a domain a made was made again: {left:?} → {after:?}");
    let name = |l: &String| l.split("action=create ").nth(1).and_then(|r| r.split_whitespace().next()).map(String::from);
    let mut by_b: Vec<String> = creations(&b).iter().filter_map(name).collect();
    by_b.sort();
    let missing: Vec<String> = after.iter().map(|d| d.0.clone()).filter(|n| !left.iter().any(|l| &l.0 == n)).collect();
    assert_eq!(by_b, missing, "b made exactly the nodes a had not");
    assert!(creations(&a2).is_empty(), "a, back and not leading, made nothing:\n{}", a2.log());
    for s in [&a2, &b] {
        assert!(!s.log().contains("already exists"), "no domain made twice:\n{}", s.log());
    }

    let (ok, out) = k.cli(&["scale", "tiny", "0"]);
    assert!(ok, "{out}");
    converge(&a2, 0, "3 → 0");
    assert!(k.nodes().is_empty(), "no lease is left");
    storage_becomes(&lab, &[], "no console log is left");
    drop((a, a2, b));
}

/// A disk pool of the golden worker image on the same real libvirtd, as
/// a user runs it: on the network kiln makes, with no network flag and no
/// DHCP option written by hand, and a profile whose user-data lets root in
/// over SSH. Everything goes through libvirt's storage API: the golden
/// image is uploaded into the host's `kiln` storage pool once, byte for
/// byte; each node is a qcow2 overlay backed by it plus an uploaded cidata
/// seed. 0 → 3: all register under their domain names over TLS at kiln's
/// address on its network, and `kiln check` passes between the three VMs
/// (pod to pod and pod to node, no NAT). Then by hand, over SSH: in each VM
/// a pod made from `/etc/cni/net.d/10-flannel.conflist` pings the pod on
/// every other VM, and each receiver sees the sender pod's own address.
/// 3 → 1: the remaining VM drops the others' routes, neighbours and FDB
/// entries; 1 → 2: the time from the new node's join to its FDB entry in
/// the other VM. 0 leaves no domain, overlay, seed, console log or lease,
/// and the golden volume stays for the next node.
#[test]
fn disk_pool_of_the_golden_image_scales_on_a_real_libvirtd() {
    if kiln_tests::skip_e2e() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    let state = tmp.path().join("state");
    let mut build = kiln_tests::golden::build_command(&kiln_tests::golden::worker_spec(), &images, None, None);
    let out = build.arg("--state").arg(&state).output().expect("kiln build runs");
    assert!(out.status.success(), "kiln build images/worker.toml: {}", tail(&String::from_utf8_lossy(&out.stderr), 20));
    let golden = images.join("worker/worker.qcow2");
    let golden_size = std::fs::metadata(&golden).unwrap().len();
    let sha256 = |path: &Path| {
        let out = Command::new("sha256sum").arg(path).output().expect("sha256sum runs");
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
    };

    let _vm = kiln_tests::vm_lock();
    let lab = kiln_tests::libvirt::Lab::up(&format!("kd{}", std::process::id() % 100_000), 8080);
    let dir = tmp.path().join("pools");
    let catalog = tmp.path().join("catalog");
    let key = SshKey::new(&tmp.path().join("ssh"));
    key.profile(&catalog, "worker-ssh", "worker");
    let text =
        "image = \"worker\"\nprofile = \"worker-ssh\"\nvcpus = 1\nmemory-mib = 1024\nboot = \"disk\"\nmin = 0\nmax = 3\nreplicas = 0\n";
    pool_file(&dir, "worker", &format!("{text}hosts = [\"{}\"]\n", lab.uri));
    let k = PoolServer::on_kiln_network(&lab, &images, &state);
    let server = k.serve(&dir, &["--profiles", catalog.to_str().unwrap()]);

    let start = std::time::Instant::now();
    k.cli_ok(&["scale", "worker", "3"]);
    let up = wait_for(Duration::from_secs(420), || (k.registered("worker").len() == 3).then_some(()));
    let in_storage = |name: &str| lab.host_path(&format!("{}/{name}", kiln_pool::volumes::DEFAULT_DIR));
    let consoles: String = (0..3)
        .map(|n| std::fs::read_to_string(in_storage(&format!("kiln-worker-{n}.log"))).unwrap_or_default())
        .map(|s| tail(&s, 15))
        .collect::<Vec<_>>()
        .join("\n---\n");
    assert!(
        up.is_some(),
        "the disk nodes did not register: {:?}\nconsoles:\n{consoles}\nserver:\n{}",
        k.registered("worker"),
        tail(&server.log(), 30)
    );
    eprintln!("disk pool 0 → 3: all registered after {:.1} s", start.elapsed().as_secs_f64());
    assert_eq!(k.registered("worker"), ["kiln-worker-0", "kiln-worker-1", "kiln-worker-2"]);
    let nodes = worker_nodes(&k);
    for n in &nodes {
        let ip = n.public_ip.unwrap_or_else(|| panic!("{} has no public IP", n.name));
        assert!(ip.to_string().starts_with("10.247.0."), "{} is on kiln's network (10.247.0.0/24): {ip}", n.name);
    }
    // Pods talk across the VMs without NAT: kiln check, each node's test
    // pod made by its own conflist and Debian's CNI plugins in the image.
    let check = std::time::Instant::now();
    let (ok, out) = k.cli(&["check", "--json"]);
    let result: kiln_core::CheckResult = serde_json::from_str(&out).unwrap_or_else(|e| panic!("kiln check --json: {e}: {out}"));
    assert!(ok && result.ok && result.paths.len() == 12, "kiln check passes on the three VMs: {out}");
    assert!(result.paths.iter().all(|p| p.verdict == kiln_core::Verdict::Ok), "{out}");
    eprintln!(
        "disk pool 0 → 3: kiln check passed ({} paths, no NAT) in {:.1} s, {:.1} s from the scale",
        result.paths.len(),
        check.elapsed().as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    let goldens: Vec<String> = storage(&lab).into_iter().filter(|n| n.starts_with("golden-worker-") && n.ends_with(".qcow2")).collect();
    assert_eq!(goldens.len(), 1, "one golden volume on the host: {:?}", storage(&lab));
    let golden_volume = format!("{}/{}", kiln_pool::volumes::DEFAULT_DIR, goldens[0]);
    assert_eq!(sha256(&lab.host_path(&golden_volume)), sha256(&golden), "the golden volume is the image, byte for byte");
    for n in 0..3 {
        let overlay = in_storage(&format!("kiln-worker-{n}.qcow2"));
        let info = Command::new("qemu-img").args(["info", "--output=json", "-U"]).arg(&overlay).output().unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap_or_default();
        assert_eq!(info["backing-filename"], golden_volume, "the overlay's backing file is the golden volume: {info}");
        assert!(in_storage(&format!("kiln-worker-{n}.seed")).exists(), "kiln-worker-{n}'s seed is in the storage pool");
        let size = std::fs::metadata(&overlay).unwrap().len();
        eprintln!("kiln-worker-{n}: overlay {} KiB after boot (golden image {} MiB)", size >> 10, golden_size >> 20);
    }

    // The same by hand, over SSH, as a user would check it.
    let guests: Vec<Guest> = nodes.iter().map(|n| Guest::new(&lab, &key, n)).collect();
    for g in &guests {
        g.wait_for_ssh(Duration::from_secs(120));
        let cmdline = g.sh("cat /etc/kiln/cmdline");
        assert!(
            cmdline.starts_with("kiln.server=https://10.247.0.1:8443 kiln.token="),
            "{}'s agent joins at kiln's address on its network: {cmdline}",
            g.name
        );
    }
    let pods: Vec<std::net::Ipv4Addr> = guests.iter().map(|g| g.add_pod("pod")).collect();
    for g in &guests {
        g.listen("pod", 180);
    }
    for (i, from) in guests.iter().enumerate() {
        for (j, to) in guests.iter().enumerate().filter(|(j, _)| *j != i) {
            from.ping("pod", pods[j])
                .unwrap_or_else(|e| panic!("the pod on {} pings the pod on {} ({}): {e}", from.name, to.name, pods[j]));
        }
    }
    for (j, to) in guests.iter().enumerate() {
        let seen = to.seen();
        for (i, from) in guests.iter().enumerate().filter(|(i, _)| *i != j) {
            assert!(
                seen.contains(&pods[i]),
                "the pod on {} sees the pod on {} as itself ({}), no NAT: it saw {seen:?}",
                to.name,
                from.name,
                pods[i]
            );
        }
    }
    for (i, g) in guests.iter().enumerate() {
        for peer in nodes.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, n)| n) {
            assert!(g.has_peer(peer), "{} holds {}'s route, neighbour and FDB entry: {:?}", g.name, peer.name, g.overlay_tables());
        }
    }
    eprintln!("disk pool: over SSH, each of 3 pods pinged the other 2 and each receiver saw the sender pod's own address");

    // 3 → 1: the remaining VM forgets the others.
    k.cli_ok(&["scale", "worker", "1"]);
    let one = wait_for(Duration::from_secs(120), || (k.registered("worker").len() == 1).then_some(()));
    assert!(one.is_some(), "the pool did not scale to 1: {:?}", k.registered("worker"));
    let remaining = worker_nodes(&k).remove(0);
    let stays = guests.iter().find(|g| g.name == remaining.name).expect("the remaining node is one of the three");
    let gone: Vec<&kiln_core::Node> = nodes.iter().filter(|n| n.name != remaining.name).collect();
    let forgot = wait_for(Duration::from_secs(30), || gone.iter().all(|n| stays.lacks_peer(n)).then_some(()));
    assert!(
        forgot.is_some(),
        "{} dropped the routes, neighbours and FDB entries of {:?}: {:?}",
        stays.name,
        gone.iter().map(|n| &n.name).collect::<Vec<_>>(),
        stays.overlay_tables()
    );

    // 1 → 2: a join reaches the other VM's FDB (the figure in BENCHMARKS.md).
    let mut watch = stays.watch_fdb();
    k.cli_ok(&["scale", "worker", "2"]);
    let two = wait_for(Duration::from_secs(300), || (k.registered("worker").len() == 2).then_some(()));
    assert!(two.is_some(), "the pool did not scale to 2: {:?}\n{}", k.registered("worker"), tail(&server.log(), 20));
    let joined = worker_nodes(&k).into_iter().find(|n| n.name != remaining.name).expect("the new node");
    let public = joined.public_ip.expect("the new node's public IP");
    let entry = watch.entry(&format!(" dst {public} "), Duration::from_secs(30));
    let entry =
        entry.unwrap_or_else(|| panic!("no FDB entry for {} ({public}) on {}: {:?}", joined.name, stays.name, stays.overlay_tables()));
    let (offset, round_trip) = watch.offset();
    let join = joined.registered_at.unix_timestamp_nanos() as f64 / 1e9;
    eprintln!(
        "disk pool 1 → 2: {} joined; its FDB entry on {} {:.0} ms later (clocks compared within ±{:.0} ms)",
        joined.name,
        stays.name,
        (entry - offset - join) * 1000.0,
        round_trip * 500.0
    );
    drop(watch);

    k.cli_ok(&["scale", "worker", "0"]);
    let down = wait_for(Duration::from_secs(60), || {
        (k.registered("worker").is_empty() && !lab.virsh(&["list", "--all", "--name"]).contains("kiln-worker")).then_some(())
    });
    assert!(down.is_some(), "the pool did not scale to 0: {:?} {}", k.registered("worker"), lab.virsh(&["list", "--all"]));
    let golden_ok = format!("{}.ok", goldens[0]);
    storage_becomes(&lab, &[goldens[0].as_str(), golden_ok.as_str()], "no overlay, seed or console log is left; the golden volume stays");

    // A golden volume whose upload never finished (no `.ok`) is uploaded
    // again; one of an older build that no overlay uses is deleted then.
    let uploads = || server.log().matches("pools: golden image uploaded").count();
    assert_eq!(uploads(), 1, "one upload for three nodes");
    std::fs::remove_file(in_storage(&golden_ok)).unwrap();
    let stale = "golden-worker-0000000000000000.qcow2";
    std::fs::write(in_storage(stale), b"an older build").unwrap();
    k.cli_ok(&["scale", "worker", "1"]);
    let again = wait_for(Duration::from_secs(60), || (uploads() == 2).then_some(()));
    assert!(again.is_some(), "the unfinished golden volume is not uploaded again:\n{}", tail(&server.log(), 20));
    k.cli_ok(&["scale", "worker", "0"]);
    let down = wait_for(Duration::from_secs(60), || (!lab.virsh(&["list", "--all", "--name"]).contains("kiln-worker")).then_some(()));
    assert!(down.is_some(), "the pool did not scale to 0 again: {}", lab.virsh(&["list", "--all"]));
    let left = wait_for(Duration::from_secs(30), || {
        let left = storage(&lab);
        (left == [goldens[0].clone(), golden_ok.clone()]).then_some(())
    });
    assert!(left.is_some(), "the golden volume is whole again and the stale one is gone: {:?}", storage(&lab));
    assert_eq!(sha256(&lab.host_path(&golden_volume)), sha256(&golden), "the golden volume is the image, byte for byte");
    drop(server);
}

/// A rolling replacement on the lab's libvirtd, as a user runs one: a disk
/// pool of three golden nodes (`[rollout]` max-surge 1, max-unavailable
/// 0); the image is rebuilt with another agent while `kiln serve` runs; the
/// pool rolls to the new generation, each new node Ready before an old one
/// goes. A sampler reads the Ready nodes every second: never fewer than
/// three. `kiln serve` is SIGKILLed after the first replacement and
/// restarted: the rollout finishes. At the end every node runs the new
/// generation, and no overlay or golden volume of the old one is left.
/// Then `kiln rollout undo` goes back to the previous generation, the
/// same way.
#[test]
fn disk_pool_rolls_to_a_rebuilt_image_through_a_restart_and_back() {
    if kiln_tests::skip_e2e() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    let state = tmp.path().join("state");
    let build = |agent: Option<&Path>| {
        let mut cmd = kiln_tests::golden::build_command(&kiln_tests::golden::worker_spec(), &images, None, agent);
        let out = cmd.arg("--state").arg(&state).output().expect("kiln build runs");
        assert!(out.status.success(), "kiln build images/worker.toml: {}", tail(&String::from_utf8_lossy(&out.stderr), 20));
        let m: kiln_core::Manifest = serde_json::from_slice(&std::fs::read(images.join("worker/manifest.json")).unwrap()).unwrap();
        m.digest
    };
    let one = build(None);

    let _vm = kiln_tests::vm_lock();
    let lab = kiln_tests::libvirt::Lab::up(&format!("kr{}", std::process::id() % 100_000), 8080);
    let dir = tmp.path().join("pools");
    let text = "image = \"worker\"\nvcpus = 1\nmemory-mib = 1024\nboot = \"disk\"\nmin = 0\nmax = 4\nreplicas = 3\n\
                [rollout]\nmax-surge = 1\nmax-unavailable = 0\n";
    pool_file(&dir, "worker", &format!("hosts = [\"{}\"]\n{text}", lab.uri));
    let k = PoolServer::on_kiln_network(&lab, &images, &state);
    let mut server = k.serve(&dir, &[]);
    let pool = |k: &PoolServer| -> Option<kiln_core::PoolStatus> {
        let (ok, out) = k.cli(&["pools", "--json"]);
        ok.then(|| serde_json::from_str::<Vec<kiln_core::PoolStatus>>(&out).ok()?.into_iter().next())?
    };
    let settled = |k: &PoolServer, target: kiln_core::Digest| {
        let p = pool(k)?;
        let nodes = worker_nodes(k);
        let on_target = nodes.iter().filter(|n| n.image_digest == target && n.out_of_date == Some(false)).count();
        (p.target == Some(target) && p.out_of_date == 0 && p.ready == 3 && on_target == 3 && k.domains("worker") == 3).then_some(())
    };
    let up = wait_for(Duration::from_secs(420), || settled(&k, one));
    assert!(up.is_some(), "three nodes of the first generation: {:?}\n{}", pool(&k), tail(&server.log(), 30));
    let golden_of = |d: kiln_core::Digest| format!("golden-worker-{}.qcow2", &d.hex()[..16]);
    assert!(storage(&lab).contains(&golden_of(one)), "{:?}", storage(&lab));

    // Every second: how many of the pool's nodes are Ready (when the API answers).
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(std::sync::Mutex::new(Vec::<(f64, usize)>::new()));
    let sampler = {
        let (stop, samples, api, state) = (stop.clone(), samples.clone(), k.api.clone(), state.clone());
        let command = lab.command(&binaries().kiln);
        let program = command.get_program().to_owned();
        let prefix: Vec<std::ffi::OsString> = command.get_args().map(|a| a.to_owned()).collect();
        let start = std::time::Instant::now();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let out =
                    Command::new(&program).args(&prefix).args(["nodes", "--json", "--server", &api]).arg("--state").arg(&state).output();
                let nodes =
                    out.ok().filter(|o| o.status.success()).and_then(|o| serde_json::from_slice::<Vec<kiln_core::Node>>(&o.stdout).ok());
                if let Some(nodes) = nodes {
                    let ready = nodes
                        .iter()
                        .filter(|n| n.pool.as_deref() == Some("worker") && n.state == Some(kiln_core::NodeState::Ready))
                        .count();
                    samples.lock().unwrap().push((start.elapsed().as_secs_f64(), ready));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };

    // A rebuild with another agent, under the running server.
    let agent = tmp.path().join("kiln-agent");
    let mut bytes = std::fs::read(&binaries().agent).unwrap();
    bytes.extend_from_slice(b"kiln-rollout-test");
    std::fs::write(&agent, bytes).unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let two = build(Some(&agent));
    assert_ne!(two, one);
    let start = std::time::Instant::now();
    let marked = wait_for(Duration::from_secs(30), || {
        let table = k.cli_ok(&["nodes"]);
        (table.matches("(out of date)").count() == 3).then_some(table)
    });
    assert!(marked.is_some(), "kiln nodes marks the three nodes out of date: {}", k.cli_ok(&["nodes"]));

    // SIGKILL after the first replacement; the restarted server finishes the rollout.
    let first = wait_for(Duration::from_secs(400), || pool(&k).filter(|p| p.up_to_date >= 1 && p.out_of_date <= 2 && p.ready >= 3));
    assert!(first.is_some(), "no first replacement: {:?}\n{}", pool(&k), tail(&server.log(), 30));
    server.process.signal_and_wait(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(5)).expect("kiln serve dies on SIGKILL");
    let server = k.serve(&dir, &[]);
    let done = wait_for(Duration::from_secs(900), || settled(&k, two));
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert!(done.is_some(), "the rollout did not finish after the restart: {:?}\n{}", pool(&k), tail(&server.log(), 40));
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let fewest = samples.iter().map(|s| s.1).min().unwrap_or(0);
    assert!(samples.len() > 30, "sampled every second: {} samples", samples.len());
    assert!(fewest >= 3, "never fewer than 3 Ready nodes: {samples:?}");
    eprintln!(
        "rollout of 3 golden disk nodes under TCG: {:.1} s from the rebuild to all 3 Ready on the new generation, through a SIGKILL of kiln serve; fewest Ready seen {fewest} ({} samples, 1 s apart)",
        took.as_secs_f64(),
        samples.len()
    );
    let (ok, status) = k.cli(&["rollout", "status", "worker"]);
    assert!(ok && status.contains("complete"), "kiln rollout status: {status}");
    let old_golden = wait_for(Duration::from_secs(30), || (!storage(&lab).contains(&golden_of(one))).then_some(()));
    assert!(old_golden.is_some(), "the old golden volume is removed: {:?}", storage(&lab));
    let overlays: Vec<String> = storage(&lab).into_iter().filter(|n| n.starts_with("kiln-worker-") && n.ends_with(".qcow2")).collect();
    let names: Vec<String> = worker_nodes(&k).iter().map(|n| format!("{}.qcow2", n.name)).collect();
    assert_eq!(overlays, names, "only the new nodes' overlays are left");
    for name in ["kiln-worker-0", "kiln-worker-1", "kiln-worker-2"] {
        assert!(!names.contains(&format!("{name}.qcow2")), "{name}, of the first generation, is gone: {names:?}");
    }

    // Undo: back to the first generation, still kept.
    let out = k.cli_ok(&["rollout", "undo", "worker"]);
    assert!(out.contains("undone to the previous generation"), "{out}");
    let back = wait_for(Duration::from_secs(900), || settled(&k, one));
    assert!(back.is_some(), "the undo did not finish: {:?}\n{}", pool(&k), tail(&server.log(), 40));
    let (ok, status) = k.cli(&["rollout", "status", "worker", "--json"]);
    let status: kiln_core::PoolStatus = serde_json::from_str(&status).unwrap();
    assert!(ok && status.rollout.undone_to == Some(one), "{status:?}");
    assert!(status.rollout.min_ready_seen.is_some_and(|m| m >= 3), "{status:?}");
    let old_golden = wait_for(Duration::from_secs(30), || (!storage(&lab).contains(&golden_of(two))).then_some(()));
    assert!(old_golden.is_some(), "the second generation's golden volume is removed: {:?}", storage(&lab));

    k.cli_ok(&["scale", "worker", "0"]);
    let down = wait_for(Duration::from_secs(120), || (k.domains("worker") == 0 && k.registered("worker").is_empty()).then_some(()));
    assert!(down.is_some(), "the pool did not scale to 0: {}", lab.virsh(&["list", "--all"]));
    drop(server);
}

/// The worker pool's registered nodes, by name.
fn worker_nodes(k: &PoolServer) -> Vec<kiln_core::Node> {
    let mut nodes: Vec<kiln_core::Node> = k.nodes().into_iter().filter(|n| n.pool.as_deref() == Some("worker")).collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    nodes
}

/// A node as the autoscaler sees it: a real `kiln-agent metrics` serving a
/// fixture `/proc` whose `loadavg` the test writes, registered as a pool
/// node with that metrics address.
/// The address of the loaded nodes' metrics, on the test namespace's
/// `lan0` ([`in_a_namespace`]): the server scrapes only a node's own
/// routable address, never loopback.
const NODE_IP: &str = "10.79.0.2";

/// Runs `test` inside a network namespace of its own, where `NODE_IP` is
/// an address (the server, the nodes' metrics and the test's calls).
fn in_a_namespace(tag: &str, test: fn()) {
    let ns = kiln_tests::Netns::new(tag);
    ns.add_addresses(&[&format!("{NODE_IP}/24")]);
    ns.run(test);
}

/// `GET /api/v1/nodes` from the calling thread's namespace.
fn nodes_here(server: &KilnServer) -> Vec<kiln_core::Node> {
    block_on_here(server.api_client().nodes()).unwrap_or_else(|e| panic!("{}", chain(&e)))
}

struct LoadedNode {
    _agent: kiln_tests::Process,
    proc_dir: std::path::PathBuf,
}

impl LoadedNode {
    fn start(dir: &Path, server: &KilnServer, hostname: &str, load1: f64) -> LoadedNode {
        let proc_dir = dir.join(format!("{hostname}-proc"));
        std::fs::create_dir_all(&proc_dir).unwrap();
        write_load(&proc_dir, load1);
        let port = kiln_tests::free_port();
        let target = format!("{NODE_IP}:{port}");
        let mut cmd = Command::new(&binaries().agent);
        cmd.args(["metrics", "--collectors", "loadavg", "--listen", &target]).arg("--proc").arg(&proc_dir);
        let agent = kiln_tests::Process::spawn_logged(cmd, "kiln-agent metrics", &dir.join(format!("{hostname}-agent.log")));
        let up = wait_for(Duration::from_secs(10), || {
            let scraper = kiln_client::metrics::Scraper::new(Duration::from_secs(10)).unwrap();
            block_on_here(scraper.fetch(&target)).ok().map(|_| ())
        });
        assert!(up.is_some(), "kiln-agent metrics did not come up");
        let req = kiln_core::RegisterRequest {
            machine_id: format!("{:0>32}", hostname.len() + port as usize),
            hostname: hostname.into(),
            macs: vec![],
            addresses: vec![NODE_IP.parse().unwrap()],
            cpus: 1,
            memory_bytes: 1 << 30,
            kernel: "6.1".into(),
            agent_version: "test".into(),
            image_digest: "sha256:test".into(),
            metrics: Some(target),
            public_ip: None,
            vtep_mac: None,
            uplink_mtu: None,
            csr: None,
        };
        let registered = block_on_here(server.joining_client().register(&req));
        assert!(registered.is_ok(), "registering {hostname}: {}", registered.err().map(|e| chain(&e)).unwrap_or_default());
        LoadedNode { _agent: agent, proc_dir }
    }

    fn set_load(&self, load1: f64) {
        write_load(&self.proc_dir, load1);
    }
}

/// Writes a `loadavg` with this 1-minute load into the fixture `/proc`.
fn write_load(proc_dir: &Path, load1: f64) {
    let tmp = proc_dir.join(".loadavg");
    std::fs::write(&tmp, format!("{load1:.2} 0.50 0.25 1/120 4242\n")).unwrap();
    std::fs::rename(tmp, proc_dir.join("loadavg")).unwrap();
}

fn desired(server: &KilnServer, pool: &str) -> Option<u64> {
    pools(server).into_iter().find(|p| p["name"] == pool)?["desired"].as_u64()
}

#[test]
fn autoscaler_grows_a_loaded_pool_to_its_max_and_shrinks_it_to_its_min() {
    in_a_namespace("pgrow", autoscaler_grows_a_loaded_pool_to_its_max_and_shrinks_it_to_its_min_here);
}

fn autoscaler_grows_a_loaded_pool_to_its_max_and_shrinks_it_to_its_min_here() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    fake_image(&images, "tiny");
    let dir = tmp.path().join("pools");
    let policy = "[autoscale]\nmetric = \"load1\"\nscale-up-above = 1.0\nscale-down-below = 0.3\nstep = 1\ncooldown-secs = 2\n";
    let text = TINY.replace("min = 0", "min = 1").replace("max = 5", "max = 3").replace("replicas = 0", "replicas = 1");
    pool_file(&dir, "auto", &format!("{text}{policy}"));
    let state = tmp.path().join("state");
    let server = KilnServer::start_with(
        &images,
        &state,
        &["--plain-http", "--pools", dir.to_str().unwrap(), "--pool-accel", "qemu", "--pool-interval", "0.5"],
    );
    wait_defined(&server, "auto", 1);
    assert_eq!(desired(&server, "auto"), Some(1));

    // The first node is busy: the pool grows a step per cooldown, to its max.
    let node = LoadedNode::start(tmp.path(), &server, "kiln-auto-0", 2.5);
    wait_defined(&server, "auto", 3);
    let log = server.log();
    assert!(log.contains("autoscale: scale 1 → 2: mean load1 2.50 over 1 node > 1"), "the decision and its reason are logged:\n{log}");
    assert!(log.contains("autoscale: scale 2 → 3: mean load1 2.50 over 1 node > 1"), "{log}");
    let held = wait_for(Duration::from_secs(10), || {
        let p = pools(&server).into_iter().find(|p| p["name"] == "auto")?;
        p["autoscale"].as_str()?.contains("but the pool is at its max").then_some(())
    });
    assert!(held.is_some(), "at its max it holds, saying why: {:?}", pools(&server));
    assert_eq!(desired(&server, "auto"), Some(3));

    // The load goes away: back to its min, after the cooldowns.
    node.set_load(0.05);
    wait_defined(&server, "auto", 1);
    let log = server.log();
    assert!(log.contains("autoscale: scale 3 → 2: mean load1 0.05 over 1 node < 0.3"), "{log}");
    assert!(log.contains("autoscale: scale 2 → 1: mean load1 0.05 over 1 node < 0.3"), "{log}");
    assert_eq!(desired(&server, "auto"), Some(1));
    let names: Vec<String> = nodes_here(&server).into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["kiln-auto-0"], "the oldest node stays");
}

#[test]
fn autoscaler_dry_run_says_what_it_would_do_and_does_nothing() {
    in_a_namespace("pdry", autoscaler_dry_run_says_what_it_would_do_and_does_nothing_here);
}

fn autoscaler_dry_run_says_what_it_would_do_and_does_nothing_here() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    fake_image(&images, "tiny");
    let dir = tmp.path().join("pools");
    let policy = "[autoscale]\nmetric = \"load1\"\nscale-up-above = 1.0\nscale-down-below = 0.3\nstep = 2\ncooldown-secs = 1\n";
    let text = TINY.replace("min = 0", "min = 1").replace("replicas = 0", "replicas = 1");
    pool_file(&dir, "auto", &format!("{text}{policy}"));
    let state = tmp.path().join("state");
    let server = KilnServer::start_with(
        &images,
        &state,
        &["--plain-http", "--pools", dir.to_str().unwrap(), "--pool-accel", "qemu", "--pool-interval", "0.5", "--autoscale-dry-run"],
    );
    wait_defined(&server, "auto", 1);
    let _node = LoadedNode::start(tmp.path(), &server, "kiln-auto-0", 4.0);
    let said = wait_for(Duration::from_secs(15), || {
        let (_, table) = kiln(&server, &["pools"]);
        table.contains("auto: autoscale: would scale 1 → 3 (dry run): mean load1 4.00 over 1 node > 1").then_some(table)
    });
    assert!(said.is_some(), "kiln pools shows the would-be decision: {:?}", pools(&server));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(desired(&server, "auto"), Some(1), "a dry run changes nothing");
    wait_defined(&server, "auto", 1);
}

/// The switch a loaded node polls (`kiln.load=URL` in the tiny image):
/// while it answers 200 the node keeps its CPU busy, while it answers 404
/// the node idles. Served from a thread on a socket in the lab's namespace.
struct LoadSwitch {
    on: Arc<AtomicBool>,
    polls: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LoadSwitch {
    fn serve(listener: std::net::TcpListener) -> LoadSwitch {
        use std::io::{Read, Write};
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let (on, polls, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (t_on, t_polls, t_stop) = (on.clone(), polls.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !t_stop.load(Ordering::SeqCst) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut request = Vec::new();
                let mut buf = [0u8; 512];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                t_polls.fetch_add(1, Ordering::SeqCst);
                let reply: &[u8] = if t_on.load(Ordering::SeqCst) {
                    b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\non\n"
                } else {
                    b"HTTP/1.0 404 Not Found\r\nContent-Length: 4\r\n\r\noff\n"
                };
                let _ = conn.write_all(reply);
            }
        });
        LoadSwitch { on, polls, stop, thread: Some(thread) }
    }

    fn set(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    fn polls(&self) -> usize {
        self.polls.load(Ordering::SeqCst)
    }
}

impl Drop for LoadSwitch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Autoscaling with the load inside real VMs: a pool of the tiny image on
/// the lab's libvirtd, min 1, max 3, scaled on `cpu_busy`. Its nodes boot
/// with `kiln.load=URL` (from the pool's profile); when the test turns the
/// switch on, every node burns its CPU and the pool grows a step per
/// cooldown to its max, where it holds; when the test turns it off, the
/// pool shrinks back to its min, keeping its oldest node.
#[test]
fn autoscaler_grows_a_pool_of_loaded_vms_and_shrinks_it_when_the_load_goes() {
    if kiln_tests::skip_e2e() {
        return;
    }
    let _vm = kiln_tests::vm_lock();
    let (tmp, images, state, lab) = tiny_in_a_lab("ka");
    let switch_addr: std::net::SocketAddr = format!("{}:8099", lab.bridge_ip).parse().unwrap();
    let switch = LoadSwitch::serve(lab.tcp_listener(switch_addr));
    let profiles = tmp.path().join("profiles");
    std::fs::create_dir_all(profiles.join("profiles")).unwrap();
    std::fs::write(
        profiles.join("profiles/loaded.toml"),
        format!("image = \"tiny\"\nkernel-args = [\"kiln.load=http://{switch_addr}/load\"]\n"),
    )
    .unwrap();
    let dir = tmp.path().join("pools");
    let shipped = std::fs::read_to_string(kiln_tests::root().join("pools/tiny.toml")).expect("pools/tiny.toml");
    let text = shipped.replace("min = 0", "min = 1").replace("max = 5", "max = 3").replace("replicas = 0", "replicas = 1");
    let policy = "[autoscale]\nmetric = \"cpu_busy\"\nscale-up-above = 0.6\nscale-down-below = 0.3\nstep = 1\ncooldown-secs = 15\n";
    pool_file(&dir, "tiny", &format!("{text}profile = \"loaded\"\nhosts = [\"{}\"]\n{policy}", lab.uri));
    let k = PoolServer::new(&lab, &images, &state);
    let server = k.serve(&dir, &["--profiles", profiles.to_str().unwrap(), "--pool-interval", "2"]);
    let console = |n: u32| {
        let log = lab.host_path(&format!("{}/kiln-tiny-{n}.log", kiln_pool::volumes::DEFAULT_DIR));
        std::fs::read_to_string(log).unwrap_or_default()
    };
    let settle = |want: &[&str], what: &str| {
        let start = std::time::Instant::now();
        let ok = wait_for(Duration::from_secs(300), || (k.registered("tiny") == want && k.domains("tiny") == want.len()).then_some(()));
        assert!(
            ok.is_some(),
            "{what}: not {want:?} registered: {:?}, pool {}\nconsole of kiln-tiny-0:\n{}\nserver:\n{}",
            k.registered("tiny"),
            k.pool(),
            tail(&console(0), 20),
            tail(&server.log(), 30)
        );
        eprintln!("{what}: {:.1} s", start.elapsed().as_secs_f64());
    };

    // At its min, idle: the pool holds, saying why.
    settle(&["kiln-tiny-0"], "min 1 registered");
    let idle = wait_for(Duration::from_secs(60), || k.pool()["autoscale"].as_str()?.contains("but the pool is at its min").then_some(()));
    assert!(idle.is_some(), "an idle pool at its min holds: {}", k.pool());
    let polled = wait_for(Duration::from_secs(10), || (switch.polls() > 0).then_some(()));
    assert!(polled.is_some(), "the node polls its load switch; its console:\n{}", tail(&console(0), 30));

    // Load on: every node burns its CPU; the pool grows to its max and holds.
    switch.set(true);
    settle(&["kiln-tiny-0", "kiln-tiny-1", "kiln-tiny-2"], "load on: grown to max 3");
    let log = server.log();
    for (from, to) in [(1, 2), (2, 3)] {
        let line = log.lines().find(|l| l.contains(&format!("autoscale: scale {from} → {to}: mean cpu_busy")));
        assert!(line.is_some_and(|l| l.contains("> 0.6")), "the growth {from} → {to} is logged with its reason:\n{}", tail(&log, 40));
    }
    let held = wait_for(Duration::from_secs(60), || k.pool()["autoscale"].as_str()?.contains("but the pool is at its max").then_some(()));
    assert!(held.is_some(), "a loaded pool at its max holds: {}", k.pool());
    assert_eq!(k.pool()["desired"], 3);

    // Load off: back to the min after the cooldowns, the oldest node kept.
    switch.set(false);
    settle(&["kiln-tiny-0"], "load off: shrunk to min 1");
    let log = server.log();
    for (from, to) in [(3, 2), (2, 1)] {
        let line = log.lines().find(|l| l.contains(&format!("autoscale: scale {from} → {to}: mean cpu_busy")));
        assert!(line.is_some_and(|l| l.contains("< 0.3")), "the shrink {from} → {to} is logged with its reason:\n{}", tail(&log, 40));
    }
    assert_eq!(k.pool()["desired"], 1);
    storage_becomes(&lab, &["kiln-tiny-0.log"], "only kiln-tiny-0's console log is left");
    drop(server);
    drop(switch);
}
