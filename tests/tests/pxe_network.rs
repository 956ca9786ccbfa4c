//! A real network, in a namespace this test makes: a bridge, a dnsmasq that
//! hands out addresses only (no PXE options at all), `kiln serve` answering
//! proxyDHCP, TFTP and HTTP on the bridge, and a QEMU guest on a tap on that
//! bridge booting from its NIC's ROM. The guest gets its address from
//! dnsmasq, its boot file from kiln, and boots the tiny image to
//! registration; once under SeaBIOS and once under OVMF (UEFI) with QEMU's
//! iPXE ROM, and once under OVMF with no NIC ROM at all, as a real UEFI
//! machine boots: OVMF's own PXE client fetches `ipxe.efi` from kiln's TFTP
//! (on Debian a symlink out of the TFTP root), which then boots over HTTP.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_core::Mac;
use kiln_pool::qemu::{Boot, Firmware, Guest, GuestSpec};
use kiln_tests::{KilnServer, Netns, Process, binaries, kiln_build, root, skip_e2e, tail, vm_lock, wait_for};

const BRIDGE_IP: &str = "10.77.0.1";
const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

fn boot_on_a_real_network(firmware: Firmware, mac: &str, nic_rom: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    let (status, _, stderr) = kiln_build(&root().join("images/tiny.toml"), &images);
    assert!(status.success(), "kiln build: {stderr}");
    let digest = serde_json::from_slice::<kiln_core::Manifest>(&std::fs::read(images.join("tiny/manifest.json")).unwrap()).unwrap().digest;

    // The lab: a namespace with a bridge and a tap for the guest.
    let ns = Netns::new("pxe");
    ns.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
    ns.exec(&["ip", "addr", "add", &format!("{BRIDGE_IP}/24"), "dev", "br0"]);
    ns.exec(&["ip", "link", "set", "br0", "up"]);
    ns.exec(&["ip", "tuntap", "add", "tap0", "mode", "tap"]);
    ns.exec(&["ip", "link", "set", "tap0", "master", "br0"]);
    ns.exec(&["ip", "link", "set", "tap0", "up"]);

    // The network's own DHCP server: addresses only, no boot options.
    let mut dnsmasq = ns.command("dnsmasq");
    dnsmasq
        .args(["--no-daemon", "--conf-file=/dev/null", "--port=0", "--interface=br0", "--bind-interfaces", "--no-resolv"])
        .args(["--dhcp-range=10.77.0.100,10.77.0.150,255.255.255.0,1h", "--log-dhcp"])
        .arg(format!("--dhcp-leasefile={}", tmp.path().join("leases").display()))
        .stderr(std::fs::File::create(tmp.path().join("dnsmasq.log")).unwrap());
    let _dnsmasq = Process::spawn(dnsmasq, "dnsmasq");

    // kiln: proxyDHCP on the bridge, TFTP and HTTP on its address.
    let state = tmp.path().join("state");
    let mut serve = ns.command(&binaries().kiln);
    serve.arg("serve").arg("--images").arg(&images).arg("--state").arg(&state).args([
        "--listen",
        &format!("{BRIDGE_IP}:8080"),
        "--tftp",
        &format!("{BRIDGE_IP}:69"),
        "--proxy-dhcp",
        "br0",
        // The tiny image built here carries no CA: this test is about PXE.
        "--plain-http",
        "--api-listen",
        &format!("{BRIDGE_IP}:0"),
    ]);
    let server = KilnServer::spawn(serve, &state);
    let log = server.log();
    for line in ["http: listening on", "tftp: listening on", "proxy-dhcp: answering PXE on br0"] {
        let found = wait_for(Duration::from_secs(5), || server.log().contains(line).then_some(()));
        assert!(found.is_some(), "kiln serve logs {line:?} when the service starts:\n{log}");
    }

    // TFTP really serves the iPXE binaries on the lab network.
    let got = tmp.path().join("undionly.kpxe");
    let out = ns
        .command("curl")
        .args(["-sS", "--tftp-blksize", "1428", "-o"])
        .arg(&got)
        .arg(format!("tftp://{BRIDGE_IP}/undionly.kpxe"))
        .output()
        .unwrap();
    assert!(out.status.success(), "TFTP fetch: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&got).unwrap(), std::fs::read("/usr/lib/ipxe/undionly.kpxe").unwrap());
    // And the UEFI one, which Debian installs as a symlink to /boot/ipxe.efi.
    let got = tmp.path().join("ipxe.efi");
    let out = ns.command("curl").args(["-sS", "-o"]).arg(&got).arg(format!("tftp://{BRIDGE_IP}/ipxe.efi")).output().unwrap();
    assert!(out.status.success(), "TFTP fetch of ipxe.efi: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&got).unwrap(), std::fs::read("/usr/lib/ipxe/ipxe.efi").unwrap());

    let _vm = vm_lock();
    let mac: Mac = mac.parse().unwrap();
    let spec = GuestSpec {
        name: format!("kiln-e2e-pxe-{}", mac.hyphenated()),
        mac,
        memory_mib: 512,
        cpus: 2,
        accel: kiln_pool::Accel::Tcg,
        boot: Boot::Tap { ifname: "tap0".into(), nic_rom },
        serial_log: tmp.path().join("serial.log"),
        firmware,
        netns: Some(ns.name.clone()),
        segment: None,
    };
    let started = Instant::now();
    let mut guest = Guest::spawn(&spec).expect("QEMU starts");
    // The operator's calls: over TLS, with STATE/admin.pem.
    let operator = |method: &str, path: &str| -> Vec<u8> {
        let state = kiln_control::StateDir::new(&server.state);
        let out = ns
            .command("curl")
            .args(["-sf", "-X", method])
            .arg("--cacert")
            .arg(state.ca_cert())
            .arg("--cert")
            .arg(state.admin_cert())
            .arg("--key")
            .arg(state.admin_key())
            .arg(format!("{}{path}", server.api))
            .output()
            .unwrap();
        assert!(out.status.success(), "{method} {path}; server log:\n{}", tail(&server.log(), 20));
        out.stdout
    };
    let nodes = || -> Vec<kiln_core::Node> { serde_json::from_slice(&operator("GET", "/api/v1/nodes")).expect("GET /api/v1/nodes") };
    let pending = wait_for(Duration::from_secs(240), || {
        assert!(guest.exited().is_none(), "QEMU exited; serial:\n{}", tail(&guest.serial(), 30));
        nodes().into_iter().find(|n| n.macs.contains(&mac))
    })
    .unwrap_or_else(|| {
        panic!(
            "the guest did not register.\nserial:\n{}\nkiln:\n{}\ndnsmasq:\n{}",
            tail(&guest.serial(), 40),
            tail(&server.log(), 30),
            tail(&std::fs::read_to_string(tmp.path().join("dnsmasq.log")).unwrap_or_default(), 30)
        )
    });
    eprintln!("{:?}: pending after {:.1} s", spec.firmware, started.elapsed().as_secs_f64());
    // No group selects its MAC: it waits for the operator, who approves it.
    assert!(pending.pending && pending.subnet.is_none(), "{pending:?}");
    operator("POST", &format!("/api/v1/nodes/{}/approve", pending.name));
    let node = wait_for(Duration::from_secs(30), || nodes().into_iter().find(|n| n.macs.contains(&mac) && !n.pending))
        .unwrap_or_else(|| panic!("approved, the node joins; serial:\n{}", tail(&guest.serial(), 40)));

    // Its address came from dnsmasq's range, its image from kiln.
    assert_eq!(node.image_digest, digest);
    let ip = node.addresses.iter().find(|a| a.is_ipv4()).expect("an IPv4 address").to_string();
    let last: u8 = ip.rsplit('.').next().unwrap().parse().unwrap();
    assert!(ip.starts_with("10.77.0.") && (100..=150).contains(&last), "address {ip} is from dnsmasq's range");
    let dnsmasq_log = std::fs::read_to_string(tmp.path().join("dnsmasq.log")).unwrap_or_default();
    assert!(dnsmasq_log.contains(&format!("DHCPACK(br0) {ip} {mac}")), "dnsmasq leased {ip} to {mac}:\n{}", tail(&dnsmasq_log, 20));
    let log = server.log();
    if !nic_rom {
        let efi_boot = format!("proxy-dhcp: OFFER to {mac} (255.255.255.255:68): boot file \"ipxe.efi\"");
        assert!(log.contains(&efi_boot), "kiln's proxyDHCP sent OVMF's PXE client to ipxe.efi over TFTP:\n{}", tail(&log, 30));
    }
    let http_boot = format!("proxy-dhcp: OFFER to {mac} (255.255.255.255:68): boot file \"http://{BRIDGE_IP}:8080/boot.ipxe\"");
    assert!(log.contains(&http_boot), "kiln's proxyDHCP offered the iPXE ROM the HTTP bootstrap:\n{}", tail(&log, 30));
    assert!(
        log.contains(&format!("boot script mac=Some(\"{mac}\") group=default profile=default image=tiny")),
        "the guest fetched its profile's script:\n{}",
        tail(&log, 30)
    );
    drop(guest);
}

fn preflight() -> bool {
    if skip_e2e() {
        return false;
    }
    assert!(Path::new("/usr/sbin/dnsmasq").exists(), "dnsmasq is installed by scripts/setup");
    assert!(Command::new("ip").args(["netns", "list"]).status().unwrap().success(), "network namespaces work (root)");
    true
}

#[test]
fn pxe_boot_on_a_real_network_seabios() {
    if preflight() {
        boot_on_a_real_network(Firmware::Bios, "52:54:00:4b:01:01", true);
    }
}

#[test]
fn pxe_boot_on_a_real_network_ovmf() {
    if preflight() {
        boot_on_a_real_network(Firmware::Uefi(OVMF.into()), "52:54:00:4b:01:02", true);
    }
}

#[test]
fn pxe_boot_on_a_real_network_ovmf_without_a_nic_rom_through_tftp() {
    if preflight() {
        boot_on_a_real_network(Firmware::Uefi(OVMF.into()), "52:54:00:4b:01:03", false);
    }
}
