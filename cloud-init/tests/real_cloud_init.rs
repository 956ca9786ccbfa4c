//! Seeds checked by the real cloud-init (Debian's `cloud-init` package):
//! `cloud-init schema` for user-data, cloud-init's own network-config parser
//! for network-config, and xorriso reading back the cidata ISO. The same
//! seed's files are golden files (`tests/golden/seed/`), regenerated after
//! an intended change with
//! `KILN_REGENERATE_GOLDEN=1 cargo test --workspace golden_file`.

#[path = "../../tests/golden_file.rs"]
mod golden_file;

use std::collections::BTreeMap;
use std::process::Command;

use kiln_cloud_init::{CloudConfig, MetaData, NetworkConfig, RunCmd, Seed, User, WriteFile};

fn seed() -> Seed {
    seed_of(config())
}

fn config() -> CloudConfig {
    CloudConfig {
        hostname: Some("worker-1".into()),
        users: vec![User {
            name: "kiln".into(),
            groups: Some("sudo".into()),
            shell: Some("/bin/bash".into()),
            sudo: Some("ALL=(ALL) NOPASSWD:ALL".into()),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKiln kiln@test".into()],
            lock_passwd: Some(true),
        }],
        ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKiln root@test".into()],
        write_files: vec![WriteFile {
            path: "/etc/kiln/agent.env".into(),
            content: "KILN_SERVER=\"http://10.0.2.2:8080\"\nquote: 'x'\n".into(),
            permissions: Some("0600".into()),
            owner: Some("root:root".into()),
        }],
        runcmd: vec![
            RunCmd::Shell("journalctl -u kiln-agent --no-pager > /dev/ttyS0".into()),
            RunCmd::Argv(vec!["echo".into(), "a: b".into()]),
        ],
        packages: vec!["htop".into()],
        output: BTreeMap::from([("all".into(), "| tee -a /dev/console".into())]),
    }
}

fn seed_of(config: CloudConfig) -> Seed {
    let mac = "52:54:00:12:34:56".parse().unwrap();
    Seed {
        meta_data: MetaData { instance_id: "kiln-525400123456".into(), local_hostname: "worker-1".into() },
        user_data: config.to_user_data(),
        network_config: Some(NetworkConfig::dhcp(mac).to_text()),
        vendor_data: Some("#cloud-config\n{}\n".into()),
    }
}

#[test]
fn files_are_named_and_shaped_as_nocloud_expects() {
    let s = seed_of(CloudConfig { packages: vec![], ..config() });
    let names: Vec<&str> = s.files().iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["meta-data", "user-data", "network-config", "vendor-data"]);
    assert!(s.user_data.starts_with("#cloud-config\n"));
    let meta: serde_json::Value = serde_json::from_str(&s.file("meta-data").unwrap()).unwrap();
    assert_eq!(meta["instance-id"], "kiln-525400123456");
    assert_eq!(meta["local-hostname"], "worker-1");
    let net: serde_json::Value = serde_json::from_str(&s.file("network-config").unwrap()).unwrap();
    assert_eq!(net["version"], 2);
    assert_eq!(net["ethernets"]["primary"]["match"]["macaddress"], "52:54:00:12:34:56");
    let user: serde_json::Value = serde_json::from_str(s.user_data.trim_start_matches("#cloud-config\n")).unwrap();
    assert!(user.get("packages").is_none(), "unset modules are left out");
    assert_eq!(user["runcmd"][1][0], "echo", "an argv runcmd entry is a list");
}

#[test]
fn seed_files_match_golden_file() {
    for (name, text) in seed().files() {
        golden_file::check(&format!("seed/{name}"), &text);
    }
}

#[test]
fn user_data_passes_cloud_init_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("user-data");
    std::fs::write(&path, seed().user_data).unwrap();
    let out = Command::new("cloud-init").args(["schema", "-c"]).arg(&path).output().expect("cloud-init is installed (scripts/setup)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("Valid cloud-config"), "cloud-init schema:\n{text}");

    // The validator is real: a wrong type is refused.
    std::fs::write(&path, "#cloud-config\n{\"users\": 3}\n").unwrap();
    let out = Command::new("cloud-init").args(["schema", "-c"]).arg(&path).output().unwrap();
    assert!(!out.status.success(), "cloud-init schema must refuse users: 3");
}

#[test]
fn network_config_parses_with_cloud_init() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("network-config");
    std::fs::write(&path, seed().network_config.unwrap()).unwrap();
    let script = "import sys, yaml\n\
                  from cloudinit.net.network_state import parse_net_config_data\n\
                  ns = parse_net_config_data(yaml.safe_load(open(sys.argv[1])))\n\
                  for i in ns.iter_interfaces():\n    print(i.get('mac_address'), [s.get('type') for s in i.get('subnets', [])])\n";
    // Debian's python3, which has cloud-init's modules.
    let out = Command::new("/usr/bin/python3").arg("-c").arg(script).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cloud-init's parser failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.trim(), "52:54:00:12:34:56 ['dhcp4']", "one NIC, by MAC, with DHCPv4");
}

#[test]
fn cidata_iso_is_labelled_holds_the_files_and_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.iso"), dir.path().join("b.iso"));
    seed().write_iso(&a).unwrap();
    // A second later, so any wall-clock time that leaked into the ISO shows.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    seed().write_iso(&b).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "same seed, same bytes");
    assert_eq!(seed().iso().unwrap(), std::fs::read(&a).unwrap(), "the ISO as bytes is the ISO as a file");

    let out = Command::new("xorriso").args(["-indev"]).arg(&a).args(["-pvd_info", "-ls", "/"]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Volume Id    : cidata"), "{text}");
    for name in ["meta-data", "user-data", "network-config", "vendor-data"] {
        assert!(text.contains(&format!("'{name}'")), "{name} on the ISO:\n{text}");
    }
    let extracted = dir.path().join("user-data");
    let out = Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(&a)
        .args(["-extract", "/user-data"])
        .arg(&extracted)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&extracted).unwrap(), seed().user_data);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 3, "no temporary files left: {leftovers:?}");
}
