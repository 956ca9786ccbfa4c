//! `bench/pools`: what provisioning a pool node costs, against a full copy
//! of the golden image, and how long `kiln scale worker N` takes to N
//! registered nodes under TCG, on a real libvirtd (the tests' lab: a
//! private libvirtd in a network namespace this program makes and removes),
//! on the libvirt network kiln makes by default; then `kiln check`, and one
//! more node's join timed to its FDB entry in every other VM (read over
//! SSH, with a key given through the pool's profile).
//!
//! Prints a Markdown section for BENCHMARKS.md. `NODES` (default 5).

use std::process::Command;
use std::time::{Duration, Instant};

use kiln_tests::guest::{Guest, SshKey};
use kiln_tests::libvirt::{Lab, PoolServer};
use kiln_tests::{golden, tail, wait_for};

fn main() {
    let nodes: usize = std::env::var("NODES").ok().and_then(|n| n.parse().ok()).unwrap_or(5);
    let tmp = tempfile::tempdir().expect("a temp dir");
    let images = tmp.path().join("images");
    let state = tmp.path().join("state");
    let out = golden::build_command(&golden::worker_spec(), &images, None, None).arg("--state").arg(&state).output().expect("kiln build");
    assert!(out.status.success(), "kiln build: {}", String::from_utf8_lossy(&out.stderr));
    let golden_path = images.join("worker/worker.qcow2");

    // The anchor: a full copy of the golden image per node.
    let copy = tmp.path().join("copy.qcow2");
    let start = Instant::now();
    let status = Command::new("cp").arg("--sparse=never").arg(&golden_path).arg(&copy).status().expect("cp");
    assert!(status.success());
    let _ = Command::new("sync").arg(&copy).status();
    let copy_time = start.elapsed();
    let copy_bytes = std::fs::metadata(&copy).expect("the copy").len();
    std::fs::remove_file(&copy).expect("removing the copy");

    let lab = Lab::up(&format!("kb{}", std::process::id() % 100_000), 8080);
    let dir = tmp.path().join("pools");
    std::fs::create_dir_all(&dir).unwrap();
    // kiln's defaults (its own libvirt network), and a profile that lets
    // the bench into each VM over SSH to watch its FDB.
    let key = SshKey::new(&tmp.path().join("ssh"));
    let catalog = tmp.path().join("catalog");
    key.profile(&catalog, "worker-ssh", "worker");
    let pool = format!(
        "image = \"worker\"\nprofile = \"worker-ssh\"\nvcpus = 1\nmemory-mib = 1024\nboot = \"disk\"\nmin = 0\nmax = {}\nreplicas = 0\nhosts = [\"{}\"]\n",
        nodes + 1,
        lab.uri
    );
    std::fs::write(dir.join("worker.toml"), pool).unwrap();
    let k = PoolServer::on_kiln_network(&lab, &images, &state);
    let server = k.serve(&dir, &["--profiles", catalog.to_str().unwrap(), "--pool-interval", "1"]);
    let registered = || k.registered("worker").len();

    let start = Instant::now();
    k.cli_ok(&["scale", "worker", &nodes.to_string()]);
    let done = wait_for(Duration::from_secs(900), || (registered() == nodes).then_some(()));
    let to_registered = start.elapsed();
    assert!(done.is_some(), "{nodes} nodes did not register: {}\n{}", registered(), tail(&server.log(), 30));
    // Then the pod network across the VMs (issue 14): kiln check.
    let checking = Instant::now();
    let (ok, out) = k.cli(&["check", "--json"]);
    let check_time = checking.elapsed();
    let to_checked = start.elapsed();
    let check: kiln_core::CheckResult = serde_json::from_str(&out).unwrap_or_else(|e| panic!("kiln check --json: {e}: {out}"));
    assert!(ok && check.ok, "kiln check failed on the pool's nodes: {out}");

    // One more node joins: the time from its registration to its FDB
    // entry in each of the others, on their clocks (read over SSH).
    let before = k.nodes();
    let guests: Vec<Guest> = before.iter().map(|n| Guest::new(&lab, &key, n)).collect();
    let mut watches: Vec<_> = guests
        .iter()
        .map(|g| {
            g.wait_for_ssh(Duration::from_secs(120));
            g.watch_fdb()
        })
        .collect();
    k.cli_ok(&["scale", "worker", &(nodes + 1).to_string()]);
    let joined = wait_for(Duration::from_secs(600), || k.nodes().into_iter().find(|n| !before.iter().any(|b| b.name == n.name)));
    let joined = joined.unwrap_or_else(|| panic!("node {} did not register\n{}", nodes + 1, tail(&server.log(), 30)));
    let public = joined.public_ip.expect("the new node's public IP");
    let join = joined.registered_at.unix_timestamp_nanos() as f64 / 1e9;
    let mut fdb_ms = Vec::new();
    let mut clock_error_ms: f64 = 0.0;
    for (g, watch) in guests.iter().zip(&mut watches) {
        let entry = watch.entry(&format!(" dst {public} "), Duration::from_secs(60));
        let entry = entry.unwrap_or_else(|| panic!("no FDB entry for {} on {}", joined.name, g.name));
        let (offset, round_trip) = watch.offset();
        fdb_ms.push((entry - offset - join) * 1000.0);
        clock_error_ms = clock_error_ms.max(round_trip * 500.0);
    }
    drop(watches);
    fdb_ms.sort_by(f64::total_cmp);

    // From the server's log: each creation's time and each new overlay's and seed's size.
    let log = server.log();
    let field = |line: &str, key: &str| -> Option<f64> {
        line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).and_then(|v| v.trim_matches('"').parse().ok())
    };
    // The first pass's N creations; the node that joins after them is made
    // while N TCG guests hold both cores, and is timed for its FDB entry only.
    let creates: Vec<&str> = log.lines().filter(|l| l.contains("action=create")).take(nodes).collect();
    let phase = |key: &str| -> Vec<f64> {
        let mut v: Vec<f64> = creates.iter().filter_map(|l| field(l, key)).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (storage_ms, define_ms, start_ms) = (phase("storage_ms"), phase("define_ms"), phase("start_ms"));
    // kiln's own work per node: its files and the domain's definition.
    let mut control_ms: Vec<f64> = creates.iter().filter_map(|l| Some(field(l, "storage_ms")? + field(l, "define_ms")?)).collect();
    control_ms.sort_by(f64::total_cmp);
    let mut create_ms: Vec<f64> = creates.iter().filter_map(|l| field(l, "ms")).collect();
    let mut disk: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("overlay and seed made"))
        .filter_map(|l| Some(field(l, "overlay_bytes")? + field(l, "seed_bytes")?))
        .take(nodes)
        .collect();
    let upload_ms = log.lines().find(|l| l.contains("golden image uploaded")).and_then(|l| field(l, "ms")).unwrap_or(f64::NAN);
    create_ms.sort_by(f64::total_cmp);
    disk.sort_by(f64::total_cmp);
    let median = |v: &[f64]| v.get(v.len() / 2).copied().unwrap_or(f64::NAN);

    k.cli_ok(&["scale", "worker", "0"]);
    let gone = wait_for(Duration::from_secs(120), || (registered() == 0).then_some(()));
    assert!(gone.is_some(), "the pool did not scale back to 0");
    drop(server);
    drop(lab);

    let (c_ms, d_b) = (median(&control_ms), median(&disk));
    println!("## Pools (issue 7)\n");
    println!(
        "`bench/pools`, 2 cores, TCG: a disk pool of the golden worker image ({} MiB qcow2) on a private libvirtd 11 \
         (the tests' lab, in a network namespace), `kiln scale worker {nodes}` from 0. Control-plane time is kiln's work per node \
         created, from `kiln serve`'s log: its overlay volume and cidata seed (made, uploaded) and its domain defined, all \
         through libvirt; libvirt then starts QEMU, shown apart. Disk is the overlay and seed as made, before the node boots. The anchor is a full copy of the golden image per node \
         (`cp --sparse=never` + sync), measured in the same run.\n",
        copy_bytes >> 20
    );
    println!("| | kiln (overlay + seed) | full copy | ratio | target |");
    println!("|---|---:|---:|---:|---|");
    println!(
        "| control-plane time per node, median of {} | {c_ms:.0} ms | {:.0} ms | {:.3} | ≤ 200 ms |",
        create_ms.len(),
        copy_time.as_secs_f64() * 1000.0,
        c_ms / (copy_time.as_secs_f64() * 1000.0)
    );
    println!(
        "| disk per node, median of {} | {:.0} KiB | {:.0} KiB | {:.4} | ≤ 1 MiB |",
        disk.len(),
        d_b / 1024.0,
        copy_bytes as f64 / 1024.0,
        d_b / copy_bytes as f64
    );
    println!("| of which overlay + seed / define, medians | {:.0} ms / {:.0} ms | | | |", median(&storage_ms), median(&define_ms));
    println!(
        "| then libvirt starts the domain (QEMU launched), median; whole create, median | {:.0} ms; {:.0} ms | | | |",
        median(&start_ms),
        median(&create_ms)
    );
    println!(
        "| once per host and image: the golden image uploaded into the host's storage pool (in the first node's time) | {upload_ms:.0} ms | | | |"
    );
    println!(
        "| `kiln scale worker {nodes}` → {nodes} registered (TCG, {nodes} × 1 vCPU, 1 GiB on 2 cores) | {:.1} s | | | |",
        to_registered.as_secs_f64()
    );
    println!(
        "| then `kiln check` passed ({} paths, no NAT): the check; from the scale | {:.1} s; {:.1} s | | | |",
        check.paths.len(),
        check_time.as_secs_f64(),
        to_checked.as_secs_f64()
    );
    println!(
        "| node {} joins → its FDB entry in every other VM ({nodes}): median; last (clocks compared over SSH within ±{clock_error_ms:.0} ms) | {:.0} ms; {:.0} ms | | | ≤ 1 s |",
        nodes + 1,
        fdb_ms[fdb_ms.len() / 2],
        fdb_ms[fdb_ms.len() - 1]
    );
}
