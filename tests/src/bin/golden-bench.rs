//! golden-bench: boot-to-registered of the golden worker image, for
//! `bench/golden` (issue 3's figures).
//!
//! ```text
//! golden-bench --images DIR --state STATE --work DIR [--runs 3]
//! ```
//!
//! `DIR/worker/` must be built with `kiln build images/worker.toml --state
//! STATE` (the image then trusts that server's CA, which the diskless boot
//! needs). Each run is timed from just before QEMU starts to the node
//! appearing in `kiln serve`'s registry (`GET /api/v1/nodes`, polled every
//! 100 ms), under TCG, one guest at a time, as the end-to-end tests boot
//! them (`tests/tests/golden_image.rs`):
//!
//! 1. From disk: SeaBIOS, a qcow2 overlay of `worker.qcow2` and a cidata
//!    seed, restricted QEMU user networking relayed to a `kiln serve
//!    --plain-http` on loopback ([`DiskGuest`]).
//! 2. Diskless: the NIC's iPXE ROM loads kernel and initrd from `kiln serve`
//!    (TLS API), kiln's initramfs script fetches and checks
//!    `root.squashfs`, the agent registers over TLS.
//!
//! Prints one JSON object: `{"disk": [seconds...], "diskless": [seconds...]}`.
//! Every guest and server is stopped when its run ends, also on a panic.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_core::{Mac, Manifest};
use kiln_pool::qemu::{self, Boot, Guest, GuestSpec};
use kiln_tests::golden::{self, DiskGuest, Firmware};
use kiln_tests::{KilnServer, tail, wait_for};

struct Args {
    images: PathBuf,
    state: PathBuf,
    work: PathBuf,
    runs: usize,
}

fn args() -> Args {
    let mut a = Args { images: PathBuf::new(), state: PathBuf::new(), work: PathBuf::new(), runs: 3 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--images" => a.images = value().into(),
            "--state" => a.state = value().into(),
            "--work" => a.work = value().into(),
            "--runs" => a.runs = value().parse().expect("--runs N"),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(
        !a.images.as_os_str().is_empty() && !a.state.as_os_str().is_empty() && !a.work.as_os_str().is_empty(),
        "--images, --state and --work are required"
    );
    a
}

/// How long a guest may take before the run counts as failed.
const LIMIT: Duration = Duration::from_secs(300);

fn manifest(images: &Path) -> Manifest {
    let text = std::fs::read(images.join("worker/manifest.json")).expect("DIR/worker/manifest.json");
    serde_json::from_slice(&text).expect("manifest.json parses")
}

/// From disk, under SeaBIOS: a fresh overlay and seed per run, one plain-HTTP server for all runs.
fn disk(a: &Args, m: &Manifest) -> Vec<f64> {
    let state = a.work.join("disk-state");
    let server = KilnServer::start_with(&a.images, &state, &["--plain-http"]);
    let token = server.join_token(None);
    let api = format!("http://{}:{}", golden::SERVER_IP, server.port());
    let qcow2 = a.images.join("worker/worker.qcow2");
    (0..a.runs)
        .map(|i| {
            let name = format!("bench-disk-{i}");
            let dir = a.work.join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            let seed = golden::seed(&name, &api, token.trim(), &m.digest, 120);
            let start = Instant::now();
            let guest = DiskGuest::boot(&qcow2, &seed, &dir, Firmware::Bios, server.port());
            let node = wait_for(LIMIT, || server.nodes().into_iter().find(|n| n.hostname == name));
            let secs = start.elapsed().as_secs_f64();
            assert!(
                node.is_some(),
                "{name} did not register; serial console:\n{}\nserver:\n{}",
                tail(&guest.serial(), 60),
                tail(&server.log(), 20)
            );
            eprintln!("{name}: {secs:.1} s");
            drop(guest);
            let _ = std::fs::remove_dir_all(&dir);
            secs
        })
        .collect()
}

/// Diskless: iPXE from the NIC's ROM, root filesystem over HTTP, agent over TLS.
fn diskless(a: &Args) -> Vec<f64> {
    let server = KilnServer::start(&a.images, &a.state);
    (0..a.runs)
        .map(|i| {
            let name = format!("bench-diskless-{i}");
            let mac: Mac = format!("52:54:00:be:5c:{i:02x}").parse().unwrap();
            let spec = GuestSpec {
                name: name.clone(),
                mac,
                // The root filesystem lives in RAM.
                memory_mib: 1536,
                cpus: 2,
                accel: kiln_pool::Accel::Tcg,
                boot: Boot::Network { bootfile: format!("http://10.0.2.2:{}/boot.ipxe", server.port()) },
                serial_log: a.work.join(format!("{name}.serial.log")),
                firmware: qemu::Firmware::Bios,
                netns: None,
                segment: None,
            };
            let start = Instant::now();
            let mut guest = Guest::spawn(&spec).expect("QEMU starts");
            let node = wait_for(LIMIT, || {
                assert!(guest.exited().is_none(), "QEMU exited; serial:\n{}", tail(&guest.serial(), 40));
                server.nodes().into_iter().find(|n| n.macs.contains(&mac))
            });
            let secs = start.elapsed().as_secs_f64();
            assert!(
                node.is_some(),
                "{name} did not register; serial:\n{}\nserver:\n{}",
                tail(&guest.serial(), 60),
                tail(&server.log(), 20)
            );
            eprintln!("{name}: {secs:.1} s");
            guest.stop(Duration::from_secs(5));
            secs
        })
        .collect()
}

fn main() {
    let a = args();
    std::fs::create_dir_all(&a.work).expect("creating --work");
    let m = manifest(&a.images);
    let disk = disk(&a, &m);
    let diskless = diskless(&a);
    println!("{}", serde_json::json!({ "disk": disk, "diskless": diskless }));
}
