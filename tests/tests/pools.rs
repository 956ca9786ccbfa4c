//! Pools through the real `kiln serve --pools` and `kiln scale` / `kiln
//! pools` binaries, against libvirt's built-in `test:///default` driver (a
//! hypervisor inside the server process: domains are defined and "run",
//! nothing boots). Scaling 0 → 3 → 1 defines and removes kiln's domains;
//! the desired replicas survive a restart; bad pool files, a missing image
//! and an unreachable libvirt URI are refused at start, naming the file
//! and field, before anything is defined.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_tests::{KilnServer, binaries, fake_image, tail, wait_for};

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
        .arg(&server.url)
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

    let (ok, out) = kiln(&server, &["scale", "tiny", "1"]);
    assert!(ok, "{out}");
    wait_defined(&server, "tiny", 1);
    assert!(server.log().contains("remove kiln-tiny-2 from test:///default"), "the newest go first:\n{}", server.log());

    // Out of range and unknown pools are refused with the reason.
    let (ok, out) = kiln(&server, &["scale", "tiny", "6"]);
    assert!(!ok && out.contains("422") && out.contains("0 to 5"), "{out}");
    let (ok, out) = kiln(&server, &["scale", "nope", "1"]);
    assert!(!ok && out.contains("404") && out.contains("no pool `nope`"), "{out}");
    // Scaling needs the bootstrap token.
    let resp = reqwest::blocking::Client::new()
        .post(format!("{}/api/v1/pools/tiny/scale", server.url))
        .bearer_auth("not-the-token")
        .json(&serde_json::json!({"replicas": 2}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 401);

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
        .args(["serve", "--plain-http", "--listen", "127.0.0.1:0", "--pool-accel", "qemu", "--images"])
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

/// The real thing: a private libvirtd (in a network namespace the test
/// made, see [`kiln_tests::libvirt`]) runs kiln's domains under TCG; they
/// PXE-boot the tiny image from `kiln serve` in that namespace and their
/// agents register over TLS. 0 → 3 → 1 → 0: the nodes register and leave,
/// and afterwards no kiln domain, overlay or lease is left.
#[test]
fn network_pool_scales_on_a_real_libvirtd_and_nodes_register_and_leave() {
    if kiln_tests::skip_e2e() {
        return;
    }
    let _vm = kiln_tests::vm_lock();
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    let state = tmp.path().join("state");
    let (status, _, stderr) = kiln_tests::kiln_build_for(&kiln_tests::root().join("images/tiny.toml"), &images, Some(&state));
    assert!(status.success(), "kiln build: {stderr}");

    let lab = kiln_tests::libvirt::Lab::up(&format!("kp{}", std::process::id() % 100_000), 8080);
    let dir = tmp.path().join("pools");
    pool_file(&dir, "tiny", &TINY.replace("test:///default", &lab.uri));
    let mut cmd = lab.command(&binaries().kiln);
    cmd.arg("serve").arg("--images").arg(&images).arg("--state").arg(&state).arg("--pools").arg(&dir);
    cmd.args(["--listen", &format!("{}:{}", lab.bridge_ip, lab.http_port)]);
    cmd.args(["--api-listen", &format!("{}:8443", lab.bridge_ip), "--pool-network", &lab.network, "--pool-accel", "qemu"]);
    let server = KilnServer::spawn(cmd, &state);
    let api = format!("https://{}:8443", lab.bridge_ip);

    let cli = |args: &[&str]| -> (bool, String) {
        let out =
            lab.command(&binaries().kiln).args(args).arg("--server").arg(&api).arg("--state").arg(&state).output().expect("kiln runs");
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let nodes = || -> Vec<kiln_core::Node> {
        let (ok, out) = cli(&["nodes", "--json"]);
        assert!(ok, "kiln nodes: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kiln nodes --json: {e}: {out}"))
    };
    let pool = || -> serde_json::Value {
        let (ok, out) = cli(&["pools", "--json"]);
        assert!(ok, "kiln pools: {out}");
        serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap().remove(0)
    };
    let kiln_domains = || lab.virsh(&["list", "--all", "--name"]).lines().filter(|l| l.starts_with("kiln-tiny-")).count();
    let converge = |want: usize, what: &str| {
        let start = std::time::Instant::now();
        let ok = wait_for(Duration::from_secs(240), || {
            let ns = nodes();
            let registered: Vec<&kiln_core::Node> = ns.iter().filter(|n| n.pool == "tiny").collect();
            (registered.len() == want && kiln_domains() == want && pool()["registered"] == want as u64).then_some(())
        });
        assert!(
            ok.is_some(),
            "{what}: not {want} registered nodes: nodes {:?}, pool {}, virsh {}\nserver:\n{}",
            nodes().iter().map(|n| &n.name).collect::<Vec<_>>(),
            pool(),
            lab.virsh(&["list", "--all"]),
            tail(&server.log(), 30)
        );
        eprintln!("{what}: converged in {:.1} s", start.elapsed().as_secs_f64());
    };

    let (ok, out) = cli(&["scale", "tiny", "3"]);
    assert!(ok, "{out}");
    converge(3, "0 → 3");
    let mut names: Vec<String> = nodes().into_iter().map(|n| n.name).collect();
    names.sort();
    assert_eq!(names, ["kiln-tiny-0", "kiln-tiny-1", "kiln-tiny-2"], "each node registers under its domain's name");
    let (ok, table) = cli(&["nodes"]);
    assert!(
        ok && table.lines().filter(|l| l.contains("kiln-tiny-") && l.contains(" tiny ")).count() == 3,
        "kiln nodes shows the pool:\n{table}"
    );

    let (ok, out) = cli(&["scale", "tiny", "1"]);
    assert!(ok, "{out}");
    converge(1, "3 → 1");
    assert_eq!(nodes()[0].name, "kiln-tiny-0", "the newest nodes go first");

    let (ok, out) = cli(&["scale", "tiny", "0"]);
    assert!(ok, "{out}");
    converge(0, "1 → 0");
    assert!(nodes().is_empty(), "no lease is left");
    let left: Vec<_> = std::fs::read_dir(state.join("pools")).unwrap().filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "no overlay, seed or console log is left: {left:?}");
    drop(server);
}
