//! The golden worker image in the lab: build it with `kiln build
//! images/worker.toml`, and boot a qcow2 overlay of it (backing file: the
//! golden image) in QEMU from the disk alone, with a NoCloud cidata seed made
//! by kiln's cloud-init crate and the serial console in a file.
//!
//! The guest's network is QEMU user networking with `restrict=on`: it can
//! reach nothing at all, except [`SERVER_IP`]`:PORT`, which `guestfwd`
//! relays to `127.0.0.1:PORT` on the host, one relay per connection. (The
//! gateway 10.0.2.2 cannot be a `guestfwd` address, and a `guestfwd` to a
//! TCP chardev is one connection for the guest's life: the agent's first
//! request would pass and its later heartbeats fail. The relay is a bash
//! `/dev/tcp` script, as neither nc nor socat is installed here.)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_cloud_init::{CloudConfig, MetaData, RunCmd, Seed, WriteFile};

use crate::{Process, binaries, cache_dir, root};

/// The address the guest reaches the host's server at (`guestfwd`).
pub const SERVER_IP: &str = "10.0.2.100";

/// One relay per guest connection: stdin/stdout to `127.0.0.1:$1`.
const RELAY: &str = "#!/bin/bash\nexec 3<>/dev/tcp/127.0.0.1/$1 || exit 1\ncat <&3 &\ncat >&3\nwait\n";

/// `images/worker.toml`.
pub fn worker_spec() -> PathBuf {
    root().join("images/worker.toml")
}

/// Runs `kiln build SPEC --out OUT --cache CACHE --json [--agent AGENT]`;
/// returns the exit status, stdout (JSON events) and stderr.
pub fn build(spec: &Path, out: &Path, cache: Option<&Path>, agent: Option<&Path>) -> (std::process::ExitStatus, String, String) {
    let o = build_command(spec, out, cache, agent).output().expect("kiln build runs");
    (o.status, String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// The `kiln build` command [`build`] runs, to spawn it yourself.
pub fn build_command(spec: &Path, out: &Path, cache: Option<&Path>, agent: Option<&Path>) -> Command {
    let mut cmd = Command::new(&binaries().kiln);
    cmd.arg("build").arg(spec).arg("--out").arg(out).arg("--cache").arg(cache.map_or_else(cache_dir, Path::to_path_buf)).arg("--json");
    if let Some(a) = agent {
        cmd.arg("--agent").arg(a);
    }
    cmd
}

/// The seed a disk-booted worker needs to join `api` with `token`: the
/// hostname, [`kiln_core::SEED_CMDLINE_PATH`] for the agent, and a runcmd that waits
/// for the agent to register (at most `wait_secs`) and then prints
/// `journalctl -u kiln-agent` on the serial console between markers.
pub fn seed(name: &str, api: &str, token: &str, image_digest: &kiln_core::Digest, wait_secs: u32) -> Seed {
    let cmdline = kiln_core::JoinParams::new(api, Some(token), Some(*image_digest)).seed_file();
    let config = CloudConfig {
        hostname: Some(name.into()),
        write_files: vec![WriteFile {
            path: kiln_core::SEED_CMDLINE_PATH.into(),
            content: cmdline,
            permissions: Some("0600".into()),
            owner: None,
        }],
        runcmd: vec![RunCmd::Shell(format!(
            "for i in $(seq {wait_secs}); do journalctl -u kiln-agent --no-pager | grep -q 'registered with' && break; sleep 1; done; \
             {{ echo KILN-JOURNAL-BEGIN; journalctl -u kiln-agent --no-pager; echo KILN-JOURNAL-END; }} > /dev/ttyS0"
        ))],
        ..Default::default()
    };
    Seed {
        meta_data: MetaData { instance_id: format!("{name}-1"), local_hostname: name.into() },
        user_data: config.to_user_data(),
        network_config: None,
        vendor_data: None,
    }
}

/// Firmware to boot a disk with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS (QEMU's default).
    Bios,
    /// OVMF (UEFI), with a private copy of its variable store.
    Uefi,
}

/// OVMF's code and variable store templates, whichever pair is installed.
pub fn ovmf() -> Option<(PathBuf, PathBuf)> {
    [("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd")]
        .iter()
        .map(|(c, v)| (Path::new("/usr/share/OVMF").join(c), Path::new("/usr/share/OVMF").join(v)))
        .find(|(c, v)| c.exists() && v.exists())
}

/// A QEMU guest booting a qcow2 overlay of `image` from the disk alone,
/// stopped when dropped.
pub struct DiskGuest {
    /// The QEMU process.
    pub process: Process,
    /// The serial console's log.
    pub serial_log: PathBuf,
}

impl DiskGuest {
    /// Makes `dir/overlay.qcow2` (backing file `image`, 4 GiB) and
    /// `dir/seed.iso` from `seed`, and boots them under TCG; the guest
    /// reaches the host's `127.0.0.1:port` at [`SERVER_IP`]`:port`.
    pub fn boot(image: &Path, seed: &Seed, dir: &Path, firmware: Firmware, port: u16) -> DiskGuest {
        let overlay = dir.join("overlay.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image)
            .arg(&overlay)
            .arg("4G")
            .output()
            .expect("qemu-img runs");
        assert!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
        let iso = dir.join("seed.iso");
        seed.write_iso(&iso).expect("writing the cidata ISO");
        let serial_log = dir.join("serial.log");
        let relay = dir.join("relay.sh");
        std::fs::write(&relay, RELAY).expect("writing the relay script");
        std::fs::set_permissions(&relay, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod the relay script");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-machine", "q35", "-m", "1024", "-smp", "2", "-no-reboot", "-display", "none", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", serial_log.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw,readonly=on", iso.display()))
            .arg("-nic")
            .arg(format!("user,model=virtio-net-pci,restrict=on,guestfwd=tcp:{SERVER_IP}:{port}-cmd:{} {port}", relay.display()));
        if firmware == Firmware::Uefi {
            let (code, vars) = ovmf().expect("OVMF is installed");
            let my_vars = dir.join("OVMF_VARS.fd");
            std::fs::copy(&vars, &my_vars).expect("copying OVMF's variable store");
            cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={}", code.display()));
            cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=1,file={}", my_vars.display()));
        }
        let process = Process::spawn_logged(cmd, "qemu", &dir.join("qemu.log"));
        DiskGuest { process, serial_log }
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial_log).unwrap_or_default()).into_owned()
    }

    /// Waits up to `timeout` for `needle` on the serial console.
    pub fn wait_serial(&self, needle: &str, timeout: Duration) -> bool {
        crate::wait_for(timeout, || self.serial().contains(needle).then_some(())).is_some()
    }
}
