//! The golden worker image (issue 3), end to end: `kiln build
//! images/worker.toml` makes a qcow2 (plus kernel, initrd and squashfs) with
//! no VM, no mount and no loop device; a second build is a no-op; a build
//! from the same cached base gives the same bytes, and so does a rebuild
//! that reuses the cached system; a build after an agent change reuses the
//! base and the system and carries the new agent; bad input is named; a killed build leaves the
//! cache usable; and a qcow2 overlay of the image boots from the disk alone
//! (SeaBIOS and OVMF, under TCG) with a NoCloud seed, its agent registers
//! with `kiln serve --plain-http` over restricted QEMU user networking
//! (see [`kiln_tests::golden`] for how it reaches the host), and the agent's
//! journal, printed on the serial console by cloud-init's runcmd, shows it.
//! The same image boots diskless over the network (iPXE, then the root
//! filesystem fetched and checked by kiln's initramfs script) and registers
//! over TLS, while the image is rebuilt under the running server: every
//! boot gets one generation's bytes, and the next boot the new generation;
//! a tampered root filesystem is refused.
//!
//! The first build makes the base (mmdebstrap, about two minutes here) in
//! the shared test cache; later runs reuse it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_core::{Mac, Manifest};
use kiln_pool::qemu::{self, Boot, Guest, GuestSpec};
use kiln_tests::golden::{self, DiskGuest, Firmware};
use kiln_tests::{KilnServer, Process, binaries, cache_dir, root, skip_e2e, tail, vm_lock, wait_for};
use nix::sys::signal::Signal;

/// The worker builds of this file share the cache (and its work
/// directory, which the killed-build test checks is left empty): one at a time.
static BUILDS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_build_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    BUILDS.lock().unwrap_or_else(|e| e.into_inner())
}

fn manifest(images: &Path) -> Manifest {
    let text = std::fs::read(images.join("worker/manifest.json")).expect("manifest.json written");
    serde_json::from_slice(&text).expect("manifest.json parses")
}

fn events(stdout: &str) -> Vec<serde_json::Value> {
    stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Builds the worker image into `images`, asserting success; returns the
/// JSON events and how long it took.
fn build_ok(images: &Path, agent: Option<&Path>) -> (Vec<serde_json::Value>, Duration) {
    build_spec_ok(&golden::worker_spec(), images, agent)
}

/// [`build_ok`] of the spec `spec`.
fn build_spec_ok(spec: &Path, images: &Path, agent: Option<&Path>) -> (Vec<serde_json::Value>, Duration) {
    let start = Instant::now();
    let (status, stdout, stderr) = golden::build(spec, images, None, agent);
    assert!(status.success(), "kiln build {} failed:\n{}", spec.display(), tail(&stderr, 30));
    (events(&stdout), start.elapsed())
}

/// Whether the build's events say it found `phase` in the cache.
fn reused(ev: &[serde_json::Value], phase: &str) -> bool {
    ev.iter().any(|e| e["phase"] == phase && e["detail"].as_str().unwrap_or("").starts_with("cached"))
}

/// `what` and the time now: a word no earlier run of the tests used.
fn unique(what: &str) -> String {
    format!("{what}-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos())
}

/// A copy of worker.toml whose kernel command line has one more word,
/// `word`: another system to make (file systems and all).
fn system_variant(dir: &Path, word: &str) -> PathBuf {
    spec_variant(dir, |t| t.replace("cmdline = [\"console=tty0\"", &format!("cmdline = [\"{word}\", \"console=tty0\"")))
}

/// The banner kiln-console-banner.service (the spec's unit) prints.
const BANNER: &str = "kiln-worker: ";

/// A copy of the release agent that differs in its bytes (a trailing
/// marker: still the same ELF program), so the image's agent layer changes.
fn changed_agent(dir: &Path, marker: &str) -> PathBuf {
    let mut bytes = std::fs::read(&binaries().agent).expect("the release agent");
    bytes.extend_from_slice(marker.as_bytes());
    let path = dir.join("kiln-agent");
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

#[test]
fn worker_image_builds_reproducibly_and_boots_to_registered() {
    if skip_e2e() {
        return;
    }
    let _builds = one_build_at_a_time();
    let _vm = vm_lock();
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");

    let (_, first) = build_ok(&images, None);
    let m = manifest(&images);
    eprintln!("build (base from the cache if there): {first:?}");
    assert_eq!(m.check(), Ok(()));
    let names: Vec<&str> = m.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["initrd.img", "root.squashfs", "vmlinuz", "worker.qcow2"]);
    for want in ["systemd", "systemd-sysv", "cloud-init", "openssh-server", "containernetworking-plugins", "iproute2", "ca-certificates"] {
        let p = m.inputs.packages.iter().find(|p| p.name == want).unwrap_or_else(|| panic!("{want} is not in the manifest's packages"));
        assert!(!p.version.is_empty(), "{want} has a version");
    }
    assert!(m.inputs.packages.len() > 150, "every installed package is listed ({})", m.inputs.packages.len());
    assert!(m.inputs.kernel_package.name.starts_with("linux-image-") && m.inputs.kernel_package.name.ends_with("-cloud-amd64"));
    let qcow2_size = m.artifact("worker.qcow2").unwrap().size;
    eprintln!("worker.qcow2: {} MiB; all artifacts {} MiB", qcow2_size >> 20, m.artifacts.iter().map(|a| a.size).sum::<u64>() >> 20);

    // No-op: the same inputs again rewrite nothing.
    let start = Instant::now();
    let (ev, _) = build_ok(&images, None);
    let noop = start.elapsed();
    eprintln!("no-op rebuild: {noop:?}");
    assert_eq!(ev.last().unwrap()["event"], "cached", "{ev:?}");

    // Reproducible: a full build from the same cached base, elsewhere (the
    // cached system removed, so it is made again), gives the same bytes;
    // and so does one more that reuses the system just made.
    std::fs::remove_dir_all(cache_dir().join("systems/worker")).unwrap();
    for (again, system_reused) in [("again", false), ("again-cached-system", true)] {
        let again = tmp.path().join(again);
        let (ev, t) = build_ok(&again, None);
        eprintln!("build from the cached base, system reused {system_reused}: {t:?}");
        assert!(reused(&ev, "base"), "base reused: {ev:?}");
        assert_eq!(reused(&ev, "system"), system_reused, "{ev:?}");
        let m2 = manifest(&again);
        assert_eq!(m.artifacts, m2.artifacts, "two builds from the same inputs and base give identical artifacts");
        assert_eq!(m.digest, m2.digest);
    }

    // Boot: a qcow2 overlay of the golden image, a cidata seed, kiln serve with plain HTTP.
    let state = tmp.path().join("state");
    let server = KilnServer::start_with(&images, &state, &["--plain-http"]);
    // One join token for both boots, as an operator hands it to seeds.
    let token = server.join_token(Some(2));
    let api = format!("http://{}:{}", golden::SERVER_IP, server.port());
    let qcow2 = images.join("worker/worker.qcow2");
    for (firmware, name) in [(Firmware::Bios, "golden-bios"), (Firmware::Uefi, "golden-uefi")] {
        if firmware == Firmware::Uefi && golden::ovmf().is_none() {
            eprintln!("no OVMF: not booting under UEFI");
            continue;
        }
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let seed = golden::seed(name, &api, token.trim(), &m.digest, 120);
        let start = Instant::now();
        let guest = DiskGuest::boot(&qcow2, &seed, &dir, firmware, server.port());
        let node = wait_for(Duration::from_secs(300), || server.nodes().into_iter().find(|n| n.hostname == name));
        let registered = start.elapsed();
        let node = node.unwrap_or_else(|| {
            panic!("{name} did not register; serial console:\n{}\nserver:\n{}", tail(&guest.serial(), 60), tail(&server.log(), 20))
        });
        eprintln!("{name}: boot to registered from disk: {registered:?}");
        assert_eq!(node.image_digest, m.digest, "the agent reports the image it booted");
        assert!(
            guest.wait_serial("KILN-JOURNAL-END", Duration::from_secs(180)),
            "runcmd never printed the agent's journal; serial console:\n{}",
            tail(&guest.serial(), 60)
        );
        let serial = guest.serial();
        let journal = serial.split("KILN-JOURNAL-BEGIN").nth(1).and_then(|s| s.split("KILN-JOURNAL-END").next()).unwrap_or_default();
        assert!(journal.contains("kiln-agent"), "journalctl -u kiln-agent printed the agent's lines:\n{journal}");
        assert!(journal.contains("registered with"), "the journal has the agent's registration line:\n{journal}");
        assert!(guest.wait_serial(BANNER, Duration::from_secs(60)), "the spec's unit printed its banner:\n{}", tail(&serial, 60));
        drop(guest);
    }
}

#[test]
fn warm_rebuild_after_an_agent_change_reuses_the_base() {
    if skip_e2e() {
        return;
    }
    let _builds = one_build_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    build_ok(&images, None);
    let before = manifest(&images);
    let agent = changed_agent(tmp.path(), "kiln-warm-rebuild");
    let (ev, warm) = build_ok(&images, Some(&agent));
    eprintln!("warm rebuild after an agent change: {warm:?}");
    assert!(reused(&ev, "base") && reused(&ev, "system"), "base and system reused: {ev:?}");
    assert!(!ev.iter().any(|e| e["phase"] == "filesystem"), "no file system made: {ev:?}");
    let after = manifest(&images);
    assert_ne!(before.inputs.agent, after.inputs.agent);
    assert_ne!(before.digest, after.digest, "a new agent is a new image");
    assert_eq!(before.inputs.packages, after.inputs.packages, "the same base");
    assert_eq!(before.artifact("root.squashfs"), after.artifact("root.squashfs"), "the squashfs is reused as it is");
    assert_eq!(after.check(), Ok(()));

    // The new agent is what the disk's root holds, and what the initrd
    // brings to a diskless root; e2fsck finds the root file system clean.
    let want = std::fs::read(&agent).unwrap();
    let raw = tmp.path().join("worker.raw");
    let out = Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(images.join("worker/worker.qcow2")).arg(&raw).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The root partition's offset (LBA 135168: builder/src/disk.rs).
    let root = format!("{}?offset={}", raw.display(), 135168 * 512);
    let dumped = tmp.path().join("dumped-agent");
    let out = Command::new("debugfs").arg("-R").arg(format!("dump /usr/bin/kiln-agent {}", dumped.display())).arg(&root).output().unwrap();
    assert_eq!(std::fs::read(&dumped).ok().as_ref(), Some(&want), "the disk's agent: {}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("debugfs").args(["-R", "stat /usr/bin/kiln-agent"]).arg(&root).output().unwrap();
    let stat = String::from_utf8_lossy(&out.stdout);
    assert!(stat.contains("Mode:  0755") && stat.contains("User:     0   Group:     0"), "{stat}");
    let out = Command::new("e2fsck").arg("-fn").arg(&root).output().unwrap();
    assert!(out.status.success(), "e2fsck -fn: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let initrd = std::fs::read(images.join("worker/initrd.img")).unwrap();
    assert!(initrd.windows(want.len()).any(|w| w == want), "the initrd carries the new agent as it is");

    // A cached system damaged since it was made (its squashfs overwritten,
    // the size kept) is found when it is used, and made again.
    let systems = cache_dir().join("systems/worker");
    let system = std::fs::read_dir(&systems)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|d| {
            std::fs::read_to_string(d.join("system.json")).is_ok_and(|j| j.contains(&after.artifact("root.squashfs").unwrap().sha256))
        })
        .expect("the system in the cache");
    let squashfs = system.join("root.squashfs");
    let size = std::fs::metadata(&squashfs).unwrap().len();
    std::fs::write(&squashfs, vec![0u8; size as usize]).unwrap();
    let agent = changed_agent(tmp.path(), "kiln-damaged-system");
    let (ev, _) = build_ok(&images, Some(&agent));
    let made_again = ev.iter().any(|e| e["phase"] == "system" && e["detail"].as_str().unwrap_or("").contains("made again"));
    assert!(made_again && ev.iter().any(|e| e["phase"] == "filesystem"), "the damaged system is made again: {ev:?}");
    let again = manifest(&images);
    assert_eq!(again.check(), Ok(()));
    assert_eq!(again.artifact("root.squashfs"), after.artifact("root.squashfs"), "the same squashfs as before the damage");

    // One file changed and a user added: the system is reused as well, and
    // the disk's root has both (debugfs, as the image is; e2fsck clean).
    let motd = unique("kiln-one-file-changed");
    let spec = spec_variant(tmp.path(), |t| {
        t.replace("source = \"worker/motd\"", &format!("content = \"{motd}\\n\""))
            + "\n[[users]]\nname = \"ops\"\nssh-authorized-keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKiln ops@example\"]\n"
    });
    let (ev, rebuilt) = build_spec_ok(&spec, &images, Some(&agent));
    eprintln!("rebuild after one file changed and a user added: {rebuilt:?}");
    assert!(reused(&ev, "base") && reused(&ev, "system"), "base and system reused: {ev:?}");
    assert!(!ev.iter().any(|e| e["phase"] == "filesystem"), "no file system made: {ev:?}");
    let changed = manifest(&images);
    assert_eq!(changed.check(), Ok(()));
    assert_eq!(changed.artifact("root.squashfs"), after.artifact("root.squashfs"), "the squashfs is reused as it is");
    let out = Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(images.join("worker/worker.qcow2")).arg(&raw).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let debugfs = |request: &str| {
        let out = Command::new("debugfs").arg("-R").arg(request).arg(&root).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(debugfs("cat /etc/motd"), format!("{motd}\n"), "the disk's /etc/motd is the changed one");
    assert!(debugfs("cat /etc/passwd").contains("\nops:x:1000:1000::/home/ops:/bin/bash\n"), "the user is in the disk's passwd");
    let keys = debugfs("stat /home/ops/.ssh/authorized_keys");
    assert!(keys.contains("Mode:  0600") && keys.contains("User:  1000   Group:  1000"), "{keys}");
    let out = Command::new("e2fsck").arg("-fn").arg(&root).output().unwrap();
    assert!(out.status.success(), "e2fsck -fn: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let initrd = std::fs::read(images.join("worker/initrd.img")).unwrap();
    assert!(initrd.windows(motd.len()).any(|w| w == motd.as_bytes()), "the initrd carries the changed motd");
}

/// Writes a copy of worker.toml with `edit` applied, beside the real one's
/// files (`source =` paths resolve against the spec's directory).
fn spec_variant(dir: &Path, edit: impl FnOnce(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(golden::worker_spec()).unwrap();
    std::fs::create_dir_all(dir.join("worker")).unwrap();
    for f in ["motd", "kiln-console-banner.service"] {
        std::fs::copy(root().join("images/worker").join(f), dir.join("worker").join(f)).unwrap();
    }
    let path = dir.join("worker.toml");
    std::fs::write(&path, edit(text)).unwrap();
    path
}

#[test]
fn bad_input_is_named_before_anything_is_built() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    let cache = tmp.path().join("cache");

    let spec = spec_variant(tmp.path(), |t| t.replace("  \"iproute2\",\n", "  \"iproute2\",\n  \"kiln-no-such-package\",\n"));
    binaries();
    let start = Instant::now();
    let (status, _, stderr) = golden::build(&spec, &images, Some(&cache), None);
    assert!(!status.success());
    assert!(stderr.contains("unknown package `kiln-no-such-package`"), "the error names the package:\n{stderr}");
    assert!(start.elapsed() < Duration::from_secs(60), "found before mmdebstrap runs ({:?})", start.elapsed());
    assert!(!images.join("worker").exists(), "nothing written");

    let spec = spec_variant(tmp.path(), |t| t.replace("suite = \"bookworm\"\n", "suite = \"bookworm\"\ncolour = \"blue\"\n"));
    let (status, _, stderr) = golden::build(&spec, &images, Some(&cache), None);
    assert!(!status.success());
    assert!(stderr.contains("worker.toml") && stderr.contains("key `base.colour`"), "the error names the file and key:\n{stderr}");

    let spec = spec_variant(tmp.path(), |t| t.replace("root-size-mib = 2048", "root-size-mib = \"big\""));
    let (_, _, stderr) = golden::build(&spec, &images, Some(&cache), None);
    assert!(stderr.contains("key `disk.root-size-mib`"), "{stderr}");

    let spec = spec_variant(tmp.path(), |t| t.replace("  \"grub-pc-bin\",\n", ""));
    let (_, _, stderr) = golden::build(&spec, &images, Some(&cache), None);
    assert!(stderr.contains("key `base.packages`") && stderr.contains("grub-pc-bin"), "{stderr}");

    // Too little space: a 64 MiB tmpfs as the output, in a mount namespace of
    // the test's own (the host's mounts are untouched).
    let small = tmp.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=64m kiln-small {small} && exec {kiln} build {spec} --out {small}/images --cache {small}/cache",
        small = small.display(),
        kiln = binaries().kiln.display(),
        spec = golden::worker_spec().display()
    );
    let out = Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output().expect("unshare runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("not enough disk space") && stderr.contains("MiB"), "the error gives the figure:\n{stderr}");
}

#[test]
fn killed_build_leaves_the_cache_and_the_previous_image_usable() {
    if skip_e2e() {
        return;
    }
    let _builds = one_build_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    build_ok(&images, None);
    let before = manifest(&images);

    // Kill a rebuild (another kernel argument: a system to make) as soon as it is making file systems.
    let spec = system_variant(tmp.path(), &unique("kiln-killed-build"));
    let agent = changed_agent(tmp.path(), "kiln-killed-build");
    let mut cmd = golden::build_command(&spec, &images, None, Some(&agent));
    cmd.stderr(Stdio::null());
    let mut build = Process::spawn(cmd, "kiln build");
    let stdout = build.child.stdout.take().unwrap();
    let mut saw = false;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if line.contains("\"filesystem\"") {
            saw = true;
            std::thread::sleep(Duration::from_secs(2));
            build.signal_and_wait(Signal::SIGKILL, Duration::from_secs(10)).expect("kiln build dies");
            break;
        }
    }
    assert!(saw, "the build reached the filesystem phase");
    assert_eq!(manifest(&images), before, "the previous image is whole");
    assert_eq!(before.check(), Ok(()));

    // The next build finishes from the same cache and cleans up after the killed one.
    let (ev, _) = build_spec_ok(&spec, &images, Some(&agent));
    assert!(reused(&ev, "base"), "{ev:?}");
    assert_ne!(manifest(&images).digest, before.digest);
    let leftovers: Vec<_> = std::fs::read_dir(cache_dir().join("work")).unwrap().filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert!(leftovers.is_empty(), "no work directories left: {leftovers:?}");
    let staged: Vec<_> = std::fs::read_dir(&images)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n != kiln_core::manifest::GENERATIONS_DIR)
        .collect();
    assert!(staged.is_empty(), "no staging directories left in the output: {staged:?}");
}

/// What an iPXE boot of the default profile fetched over HTTP from `base`
/// (as iPXE does: the script, then the kernel, the initrd, and the root
/// filesystem the initramfs fetches), checked file by file: the digest
/// its script named, once every file it named was checked.
fn boot_over_http(client: &reqwest::blocking::Client, base: &str, mac: &str) -> kiln_core::Digest {
    let script = client.get(format!("{base}/ipxe?mac={mac}&arch=x86_64")).send().unwrap().error_for_status().unwrap().text().unwrap();
    let kernel_line = script.lines().find(|l| l.starts_with("kernel ")).unwrap_or_else(|| panic!("no kernel line: {script}"));
    let words: Vec<&str> = kernel_line.split_whitespace().collect();
    let arg = |key: &str| words.iter().find_map(|w| w.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in {kernel_line}"));
    let digest: kiln_core::Digest = arg("kiln.image_digest=").parse().unwrap();
    let initrd = script.lines().find_map(|l| l.strip_prefix("initrd ")).and_then(|l| l.split_whitespace().next()).unwrap();
    let hex = digest.hex();
    let manifest: Manifest = client.get(format!("{base}/images/worker/{hex}/manifest.json")).send().unwrap().json().unwrap();
    assert_eq!(manifest.digest, digest);
    for url in [words[1], initrd, arg("kiln.rootfs=")] {
        assert!(url.starts_with(&format!("{base}/images/worker/{hex}/")), "{url} names the script's generation");
        let resp = client.get(url).send().unwrap();
        assert_eq!(resp.status(), 200, "{url}");
        let etag = resp.headers()["etag"].to_str().unwrap().trim_matches('"').to_string();
        let bytes = resp.bytes().unwrap();
        let sha = kiln_core::Digest::of(&bytes).hex();
        assert_eq!(etag, sha, "{url}: the ETag is the sha256 of the bytes sent");
        let file = url.rsplit('/').next().unwrap();
        assert_eq!(manifest.artifact(file).unwrap().sha256, sha, "{url}: the bytes of the generation the script named");
    }
    assert_eq!(arg("kiln.rootfs_sha256="), manifest.artifact("root.squashfs").unwrap().sha256);
    digest
}

/// Diskless: the same image boots over the network with no disk at all.
/// iPXE (the NIC's ROM) loads the kernel and the initrd from `kiln serve`;
/// kiln's script in the initrd fetches `root.squashfs` over HTTP, checks
/// its sha256 and boots from it in RAM; the agent, trusting the CA baked
/// into the image, registers over TLS under the hostname the server's
/// NoCloud seed gave it.
///
/// The image is rebuilt (another agent) while the first guest boots and an
/// HTTP client boots as iPXE does in a loop: each boot gets every file from
/// the one generation its script named, with the sha256 of the bytes as
/// their ETag, and the next guest boots the new generation with no restart
/// of `kiln serve`. Then a root filesystem that no longer matches its
/// manifest is refused.
#[test]
fn worker_image_boots_diskless_through_a_rebuild_and_refuses_a_tampered_root() {
    if skip_e2e() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    let state = tmp.path().join("state");
    // Builds, then the VM: the order the other tests take these locks in.
    let _builds = one_build_at_a_time();
    let build = |agent: Option<&Path>| {
        let mut cmd = golden::build_command(&golden::worker_spec(), &images, None, agent);
        let out = cmd.arg("--state").arg(&state).output().expect("kiln build runs");
        assert!(out.status.success(), "kiln build --state failed:\n{}", tail(&String::from_utf8_lossy(&out.stderr), 30));
    };
    build(None);
    let one = manifest(&images);
    assert_eq!(one.boot.rootfs.as_deref(), Some("root.squashfs"), "the manifest names the diskless root");
    assert!(one.boot.cmdline.iter().any(|a| a == "boot=kiln"), "{:?}", one.boot.cmdline);

    let server = KilnServer::start(&images, &state);
    let _vm = vm_lock();
    let boot = |name: &str, mac: &str| {
        let spec = GuestSpec {
            name: name.into(),
            mac: mac.parse().unwrap(),
            // The root filesystem lives in RAM.
            memory_mib: 1536,
            cpus: 2,
            accel: qemu::probe_kvm(Path::new("/dev/kvm"), &images.join("worker/vmlinuz"), Duration::from_secs(5), None),
            boot: Boot::Network { bootfile: format!("http://10.0.2.2:{}/boot.ipxe", server.port()) },
            serial_log: tmp.path().join(format!("{name}.serial.log")),
            firmware: qemu::Firmware::Bios,
            netns: None,
            segment: None,
        };
        Guest::spawn(&spec).expect("QEMU starts")
    };
    let registered = |guest: &mut Guest, mac: Mac| {
        let start = Instant::now();
        let node = wait_for(Duration::from_secs(300), || {
            assert!(guest.exited().is_none(), "QEMU exited; serial:\n{}", tail(&guest.serial(), 40));
            server.nodes().into_iter().find(|n| n.macs.contains(&mac))
        })
        .unwrap_or_else(|| {
            panic!("the diskless guest did not register; serial:\n{}\nserver:\n{}", tail(&guest.serial(), 60), tail(&server.log(), 20))
        });
        eprintln!("diskless: boot to registered over the network: {:?}", start.elapsed());
        // The spec's unit came with the initrd, over the squashfs.
        let banner = wait_for(Duration::from_secs(120), || guest.serial().contains(BANNER).then_some(()));
        assert!(banner.is_some(), "the spec's unit printed no banner; serial:\n{}", tail(&guest.serial(), 60));
        node
    };

    // A guest and an HTTP client boot while the image is rebuilt.
    let stop = std::sync::atomic::AtomicBool::new(false);
    /// Stops the loop however the scope ends, so that a failure cannot hang it.
    struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let (node, two, http_boots) = std::thread::scope(|s| {
        let stopping = Stop(&stop);
        let looping = s.spawn(|| {
            let client = reqwest::blocking::Client::new();
            let mut digests = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                digests.push(boot_over_http(&client, &server.url, "52-54-00-d1-5c-77"));
            }
            digests
        });
        let mac: Mac = "52:54:00:d1:5c:01".parse().unwrap();
        let mut guest = boot("kiln-e2e-diskless", &mac.to_string());
        build(Some(&changed_agent(tmp.path(), "kiln-rebuilt-under-serve")));
        let two = manifest(&images);
        // The server takes the new generation up while serving.
        let client = reqwest::blocking::Client::new();
        let current = || client.get(format!("{}/images/worker/manifest.json", server.url)).send().unwrap().json::<Manifest>().unwrap();
        let noticed = wait_for(Duration::from_secs(5), || (current().digest == two.digest).then_some(()));
        assert!(noticed.is_some(), "kiln serve did not serve the new generation within 5 s:\n{}", tail(&server.log(), 20));
        let node = registered(&mut guest, mac);
        guest.stop(Duration::from_secs(5));
        // Let the loop boot the new generation at least once.
        std::thread::sleep(Duration::from_secs(2));
        drop(stopping);
        (node, two, looping.join().expect("every HTTP boot got one generation's bytes"))
    });
    assert_ne!(two.digest, one.digest, "another agent, another generation");
    assert!(http_boots.contains(&one.digest) && http_boots.contains(&two.digest), "the HTTP boots saw both generations: {http_boots:?}");
    eprintln!("diskless: {} HTTP boots during the rebuild, each of one generation", http_boots.len());
    let first = if node.image_digest == one.digest { &one } else { &two };
    assert_eq!(node.image_digest, first.digest, "the guest booted one of the two generations: {}", node.image_digest);
    let serial = std::fs::read_to_string(tmp.path().join("kiln-e2e-diskless.serial.log")).unwrap();
    let rootfs_sha = &first.artifact("root.squashfs").unwrap().sha256;
    assert!(serial.contains(&format!("kiln: root filesystem sha256 {rootfs_sha} verified")), "{}", tail(&serial, 60));
    assert_eq!(node.hostname, "node-d15c01", "the hostname from the server's NoCloud seed");
    assert!(server.api.starts_with("https://"), "the agent registered over TLS");

    // The next boot gets the new generation, from the same server.
    let mac: Mac = "52:54:00:d1:5c:03".parse().unwrap();
    let mut guest = boot("kiln-e2e-diskless-rebuilt", &mac.to_string());
    let node = registered(&mut guest, mac);
    assert_eq!(node.image_digest, two.digest, "a boot after the rebuild gets the new generation");
    let rootfs_sha = two.artifact("root.squashfs").unwrap().sha256.clone();
    assert!(guest.serial().contains(&format!("kiln: root filesystem sha256 {rootfs_sha} verified")), "{}", tail(&guest.serial(), 60));
    guest.stop(Duration::from_secs(5));
    // The previous generation is still served, at its own URL.
    let old =
        reqwest::blocking::Client::new().head(format!("{}/images/worker/{}/root.squashfs", server.url, one.digest.hex())).send().unwrap();
    assert_eq!(old.status(), 200);
    assert_eq!(old.headers()["etag"].to_str().unwrap(), format!("\"{}\"", one.artifact("root.squashfs").unwrap().sha256));

    // A root filesystem changed after its manifest was written is refused.
    let path = images.join("worker/root.squashfs");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let mac: Mac = "52:54:00:d1:5c:02".parse().unwrap();
    let mut guest = boot("kiln-e2e-diskless-tampered", &mac.to_string());
    let refused = wait_for(Duration::from_secs(240), || {
        assert!(guest.exited().is_none(), "QEMU exited; serial:\n{}", tail(&guest.serial(), 40));
        guest.serial().contains("refusing to boot it").then_some(())
    });
    assert!(refused.is_some(), "the tampered root was not refused; serial:\n{}", tail(&guest.serial(), 40));
    let serial = guest.serial();
    assert!(serial.contains(&format!("not {rootfs_sha}")), "the refusal names the expected sha256:\n{}", tail(&serial, 20));
    assert!(!serial.contains("Welcome to"), "nothing booted from the tampered root");
    assert!(!server.nodes().iter().any(|n| n.macs.contains(&mac)), "the tampered node never registered");
    guest.stop(Duration::from_secs(5));
}

/// The live processes of session `sid` (the build's: it runs under
/// `setsid`), as `pid name`.
fn session(sid: u32) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid pgrp session ...`; comm may hold spaces.
            // A zombie is dead (an orphan's waits for init to reap it).
            let (head, rest) = stat.rsplit_once(')')?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            (fields.first()? != &"Z" && fields.get(3)?.parse::<u32>().ok()? == sid).then(|| head.replacen(" (", " ", 1))
        })
        .collect()
}

/// Starts `build` (a `kiln build … --json`) in a session of its own;
/// returns it once a JSON event satisfies `at` and then a program `busy`
/// names runs, with the programs then running.
fn build_until(build: Command, at: impl Fn(&serde_json::Value) -> bool, busy: &[&str]) -> (Process, Vec<String>) {
    let mut cmd = Command::new("setsid");
    cmd.arg(build.get_program()).args(build.get_args()).stderr(Stdio::piped());
    for (key, value) in build.get_envs() {
        if let Some(value) = value {
            cmd.env(key, value);
        }
    }
    let mut build = Process::spawn(cmd, "kiln build");
    let stdout = build.child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
    let reached = lines.by_ref().filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok()).any(|e| at(&e));
    assert!(reached, "the build did not reach the phase it is to be interrupted in");
    std::thread::spawn(move || lines.for_each(drop));
    let sid = build.child.id();
    let is_busy = |p: &String| busy.iter().any(|b| p.rsplit(' ').next() == Some(*b));
    let running = wait_for(Duration::from_secs(120), || Some(session(sid)).filter(|r| r.iter().any(is_busy)));
    let running = running.unwrap_or_else(|| panic!("none of {busy:?} ran: {:?}", session(sid)));
    (build, running)
}

/// Interrupts `build` with `signal`: within 2 s it exits `128 + signal`,
/// and no process of its session is left.
fn interrupt(mut build: Process, signal: Signal, running: &[String]) {
    let sid = build.child.id();
    let sent = Instant::now();
    let status = build.signal_and_wait(signal, Duration::from_secs(10));
    let exited = sent.elapsed();
    let status = status.expect("kiln build exits");
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(&mut build.child.stderr.take().unwrap(), &mut stderr);
    assert_eq!(std::os::unix::process::ExitStatusExt::into_raw(status) >> 8, 128 + signal as i32, "exit code: {status}\n{stderr}");
    assert!(stderr.contains(&format!("interrupted by {signal}")), "{stderr}");
    let left = wait_for(Duration::from_secs(2).saturating_sub(sent.elapsed()), || session(sid).is_empty().then_some(()));
    assert!(
        left.is_some() && exited <= Duration::from_secs(2),
        "{signal} ended kiln in {exited:?}; still running: {:?} (were running: {running:?})",
        session(sid)
    );
    eprintln!("{signal}: kiln exited {} in {:.0} ms, stopping {running:?}", 128 + signal as i32, exited.as_secs_f64() * 1000.0);
}

/// Ctrl-C (SIGINT) while the file systems are made and SIGTERM while
/// mmdebstrap makes a new base, as a supervisor sends it: kiln exits 130 or
/// 143 within 2 s, no program it started is left, no temporary directory
/// remains, the previous image is whole, and the next build succeeds.
#[test]
fn interrupted_build_stops_every_program_and_the_next_build_succeeds() {
    if skip_e2e() {
        return;
    }
    let _builds = one_build_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    build_ok(&images, None);
    let before = manifest(&images);
    let leftovers = |dir: &Path| -> Vec<String> {
        let names =
            std::fs::read_dir(dir).map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect());
        names
            .unwrap_or_else(|_| Vec::new())
            .into_iter()
            .filter(|n: &String| n.starts_with('.') && n != ".lock" && n != kiln_core::manifest::GENERATIONS_DIR)
            .collect()
    };

    // SIGINT in the middle of mksquashfs and mke2fs (another kernel argument: a system to make).
    let spec = system_variant(tmp.path(), &unique("kiln-interrupted-build"));
    let agent = changed_agent(tmp.path(), "kiln-interrupted-build");
    let rebuild = golden::build_command(&spec, &images, None, Some(&agent));
    let (build, running) = build_until(rebuild, |e| e["phase"] == "filesystem", &["mksquashfs"]);
    interrupt(build, Signal::SIGINT, &running);
    assert_eq!(manifest(&images), before, "the previous image is whole");
    assert_eq!(before.check(), Ok(()));
    assert!(leftovers(&images).is_empty() && leftovers(&cache_dir().join("work")).is_empty(), "no temporary directory is left");
    let (ev, _) = build_spec_ok(&spec, &images, Some(&agent));
    assert!(reused(&ev, "base"), "{ev:?}");
    assert_ne!(manifest(&images).digest, before.digest);

    // SIGTERM while mmdebstrap (apt, dpkg) makes a base the cache lacks:
    // one of its own, keyed on a SOURCE_DATE_EPOCH no other build uses,
    // removed at the end.
    let epoch = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() % 1_000_000_000).to_string();
    let new_bases = NewBases(std::fs::read_dir(cache_dir().join("base")).unwrap().filter_map(Result::ok).map(|e| e.path()).collect());
    let fresh = || {
        let mut build = golden::build_command(&golden::worker_spec(), &tmp.path().join("epoch"), None, None);
        build.env("SOURCE_DATE_EPOCH", &epoch);
        build
    };
    let new_base = |e: &serde_json::Value| e["phase"] == "base" && !e["detail"].as_str().unwrap_or("").starts_with("cached");
    let (build, running) = build_until(fresh(), new_base, &["dpkg", "apt-get"]);
    interrupt(build, Signal::SIGTERM, &running);
    assert!(leftovers(&cache_dir().join("base")).is_empty(), "no half-made base is left: {:?}", leftovers(&cache_dir().join("base")));
    let start = Instant::now();
    let out = fresh().output().expect("kiln build runs");
    assert!(out.status.success(), "the next build makes the base: {}", tail(&String::from_utf8_lossy(&out.stderr), 20));
    let ev = events(&String::from_utf8_lossy(&out.stdout));
    assert!(ev.iter().any(new_base) && ev.iter().any(|e| e["event"] == "built"), "{ev:?}");
    eprintln!("the interrupted base was made by the next build in {:.0} s", start.elapsed().as_secs_f64());
    drop(new_bases);
}

/// On drop, removes the cached bases that are not in the list it was
/// made with (a test's own, which no other build uses).
struct NewBases(Vec<PathBuf>);

impl Drop for NewBases {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(cache_dir().join("base")) else { return };
        for path in entries.filter_map(Result::ok).map(|e| e.path()) {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !self.0.contains(&path) && !name.starts_with('.') {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

/// `[[base.repositories]]`: a vendor's signed apt repository, made here
/// (`tests/lab/vendor-repo.sh`: a `.deb` from `dpkg-deb`, indexes from
/// `apt-ftparchive`, a key from `gpg`) and served on loopback. Signed by
/// another key than `signed-by`, unsigned, or unreachable, the build fails
/// in seconds naming the repository, with nothing written. With its key,
/// the package is installed, listed in the manifest with the repository as
/// its origin, and the repository (key inline) stays in the image's apt
/// sources.
#[test]
fn packages_come_from_a_signed_repository_of_the_users_own() {
    if skip_e2e() {
        return;
    }
    let _builds = one_build_at_a_time();
    let tmp = tempfile::tempdir().unwrap();
    let made = Command::new("bash").arg(root().join("tests/lab/vendor-repo.sh")).arg(tmp.path()).output().expect("bash runs");
    assert!(made.status.success(), "vendor-repo.sh: {}", String::from_utf8_lossy(&made.stderr));
    let www = kiln_tests::static_files::StaticFiles::serve(&tmp.path().join("www"));
    let images = tmp.path().join("images");
    let spec = |uri: &str, key: &str| {
        let path = spec_variant(&tmp.path().join("spec"), |t| {
            t.replace("  \"iproute2\",\n", "  \"iproute2\",\n  \"kiln-vendor-hello\",\n")
                + &format!(
                    "\n[[base.repositories]]\nuris = [\"{uri}\"]\nsuites = [\"stable\"]\ncomponents = [\"main\"]\nsigned-by = \"{key}\"\n"
                )
        });
        std::fs::copy(tmp.path().join(key), tmp.path().join("spec").join(key)).unwrap();
        path
    };
    let new_bases = NewBases(std::fs::read_dir(cache_dir().join("base")).unwrap().filter_map(Result::ok).map(|e| e.path()).collect());
    binaries();

    let repo = www.url("repo/");
    for (uri, key, apt_says) in [
        (repo.as_str(), "other.asc", "NO_PUBKEY"),
        (&www.url("unsigned/"), "vendor.asc", "is not signed"),
        ("http://127.0.0.1:1/repo/", "vendor.asc", "Could not connect"),
    ] {
        let start = Instant::now();
        let (status, _, stderr) = golden::build(&spec(uri, key), &images, None, None);
        assert!(!status.success(), "{uri} with {key} is refused");
        assert!(
            stderr.contains(&format!("repository `{uri} stable main`")) && stderr.contains(apt_says),
            "the error names the repository and says why:\n{stderr}"
        );
        assert!(start.elapsed() < Duration::from_secs(30), "found before the base is made ({:?})", start.elapsed());
        assert!(!images.join("worker").exists(), "nothing written");
    }

    let (status, stdout, stderr) = golden::build(&spec(&repo, "vendor.asc"), &images, None, None);
    assert!(status.success(), "the build with the vendor's key: {}", tail(&stderr, 20));
    assert!(events(&stdout).iter().any(|e| e["event"] == "built"), "{stdout}");
    let manifest = manifest(&images);
    let vendor: Vec<String> =
        manifest.inputs.packages.iter().filter_map(|p| Some(format!("{} {} {}", p.name, p.version, p.origin.as_deref()?))).collect();
    assert_eq!(vendor, [format!("kiln-vendor-hello 1.0 {repo}")], "the vendor's package, and only it, comes from the repository");
    assert!(manifest.inputs.packages.iter().any(|p| p.name == "systemd" && p.origin.is_none()), "Debian's packages have no origin");
    let squashfs = images.join("worker/root.squashfs");
    let cat = |path: &str| {
        let out = Command::new("unsquashfs").arg("-cat").arg(&squashfs).arg(path).output().expect("unsquashfs runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(cat("usr/share/kiln-vendor-hello/hello"), "hello from the vendor\n", "the package is installed");
    let list = Command::new("unsquashfs").arg("-l").arg(&squashfs).arg("etc/apt/sources.list.d").output().expect("unsquashfs runs");
    let list = String::from_utf8_lossy(&list.stdout);
    let sources = list.lines().find(|l| l.ends_with(".sources")).unwrap_or_else(|| panic!("no .sources file in the image: {list}"));
    let sources = cat(sources.trim_start_matches("squashfs-root/"));
    let key = std::fs::read_to_string(tmp.path().join("vendor.asc")).unwrap();
    let key_line = key.lines().nth(2).unwrap_or_default();
    assert!(
        sources.contains(&format!("URIs: {repo}")) && sources.contains(&format!(" {key_line}")),
        "the image keeps the repository, its key inline:\n{sources}"
    );
    drop(new_bases);
}
