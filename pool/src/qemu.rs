//! QEMU guests that kiln starts itself, without libvirt: `kiln up` boots one,
//! and the tests boot them the same way. They share [`Accel`] with the
//! libvirt domains of pools.
//!
//! A [`Guest`] owns its QEMU process: dropping it stops the process (SIGTERM,
//! then SIGKILL after a grace period), so a guest never outlives the code that
//! started it, also when a test fails. The serial console goes to a file.
//!
//! [`probe_kvm`] decides the accelerator by booting a probe guest under KVM
//! and watching it reach the kernel: on some hosts `/dev/kvm` exists but
//! guests hang at kernel entry, so the file alone proves nothing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_core::Mac;

use crate::Accel;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The QEMU binary kiln runs.
pub const QEMU: &str = "qemu-system-x86_64";

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// PXE through the NIC's iPXE ROM, with QEMU user networking handing out
    /// `bootfile` (the guest reaches the host's loopback as 10.0.2.2).
    Network {
        /// URL of the iPXE script, e.g. `http://10.0.2.2:8080/boot.ipxe`.
        bootfile: String,
    },
    /// PXE on a tap device: the network's own DHCP (and kiln's proxyDHCP)
    /// decide what it boots.
    Tap {
        /// The tap interface, which must exist.
        ifname: String,
        /// Whether the NIC carries QEMU's iPXE option ROM. Without it, the
        /// firmware's own PXE client boots (UEFI: OVMF's network stack), as
        /// on a real machine: it fetches iPXE over TFTP first.
        nic_rom: bool,
    },
}

/// The guest's firmware.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Firmware {
    /// QEMU's default, SeaBIOS.
    #[default]
    Bios,
    /// UEFI from this OVMF image (`/usr/share/ovmf/OVMF.fd`), as `-bios`.
    Uefi(PathBuf),
}

/// A guest to start.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// Name (QEMU's `-name`).
    pub name: String,
    /// The NIC's MAC.
    pub mac: Mac,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// Accelerator.
    pub accel: Accel,
    /// Boot method.
    pub boot: Boot,
    /// File the serial console is written to.
    pub serial_log: PathBuf,
    /// Firmware.
    pub firmware: Firmware,
    /// Run QEMU inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// A second NIC on a VDE switch (`vde_switch -s SOCK`): an L2 segment
    /// shared with other guests that needs no root and touches no host
    /// network. Its MAC and the switch's socket directory.
    pub segment: Option<(Mac, PathBuf)>,
}

impl GuestSpec {
    /// The SMBIOS UUID, derived from name and MAC so it is stable per guest.
    pub fn uuid(&self) -> String {
        let h = kiln_core::Digest::of(format!("{}/{}", self.name, self.mac)).hex();
        format!("{}-{}-4{}-8{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
    }

    /// The QEMU command line for this guest (inside its namespace, if any).
    pub fn command(&self) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                // `ip netns exec` execs QEMU in place: the pid stays QEMU's.
                c.args(["netns", "exec", ns, QEMU]);
                c
            }
            None => Command::new(QEMU),
        };
        cmd.args(["-name", &self.name, "-accel", self.accel.qemu_arg()]);
        cmd.args(["-m", &self.memory_mib.to_string(), "-smp", &self.cpus.to_string()]);
        cmd.args(["-uuid", &self.uuid(), "-nodefaults", "-display", "none", "-no-user-config", "-monitor", "none"]);
        cmd.arg("-serial").arg(format!("file:{}", self.serial_log.display()));
        if let Firmware::Uefi(code) = &self.firmware {
            cmd.arg("-bios").arg(code);
        }
        match &self.boot {
            Boot::Network { bootfile } => {
                cmd.args(["-netdev", &format!("user,id=net0,bootfile={bootfile}")]);
                cmd.args(["-device", &format!("virtio-net-pci,netdev=net0,mac={},bootindex=1", self.mac)]);
            }
            Boot::Tap { ifname, nic_rom } => {
                cmd.args(["-netdev", &format!("tap,id=net0,ifname={ifname},script=no,downscript=no")]);
                let rom = if *nic_rom { "" } else { ",romfile=" };
                cmd.args(["-device", &format!("virtio-net-pci,netdev=net0,mac={},bootindex=1{rom}", self.mac)]);
            }
        }
        if let Some((mac, sock)) = &self.segment {
            cmd.arg("-netdev").arg(format!("vde,id=net1,sock={}", sock.display()));
            cmd.args(["-device", &format!("virtio-net-pci,netdev=net1,mac={mac}")]);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        cmd
    }
}

/// Starting a guest failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// QEMU could not be started.
    #[error("starting {QEMU} (install qemu-system-x86: scripts/setup)")]
    Spawn(#[source] std::io::Error),
    /// QEMU exited at once.
    #[error("{QEMU} exited: {0}")]
    Exited(String),
}

/// A running QEMU process, stopped when dropped.
pub struct Guest {
    child: Option<Child>,
    /// Where its serial console goes.
    pub serial_log: PathBuf,
    /// Its name.
    pub name: String,
}

impl Guest {
    /// Starts the guest and checks QEMU did not exit straight away (bad
    /// arguments, a busy accelerator).
    pub fn spawn(spec: &GuestSpec) -> Result<Guest, Error> {
        if let Some(dir) = spec.serial_log.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let child = spec.command().spawn().map_err(Error::Spawn)?;
        let mut guest = Guest { child: Some(child), serial_log: spec.serial_log.clone(), name: spec.name.clone() };
        std::thread::sleep(Duration::from_millis(200));
        if let Some(reason) = guest.exited() {
            return Err(Error::Exited(reason));
        }
        Ok(guest)
    }

    /// The QEMU process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(reason)` if QEMU has exited (with what it printed on stderr).
    pub fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                Some(format!("{status}: {}", stderr.trim()))
            }
            _ => None,
        }
    }

    /// What the guest wrote on its serial console so far.
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial_log).unwrap_or_default()).into_owned()
    }

    /// Stops QEMU: SIGTERM, then SIGKILL if it has not exited after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// Where a probe result is remembered: a file and the host's boot id (the
/// answer holds until the host reboots).
#[derive(Debug, Clone)]
pub struct ProbeCache {
    /// The file.
    pub path: PathBuf,
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
}

/// KVM if a probe guest actually boots under it, else TCG.
///
/// The probe boots `kernel` with no root filesystem and `panic=-1`: the
/// kernel starts, panics at once for want of a root, and QEMU exits
/// (`-no-reboot`). Under working KVM that takes about a second; a guest that
/// has not reached the panic within `timeout` is taken as hung.
pub fn probe_kvm(kvm_device: &Path, kernel: &Path, timeout: Duration, cache: Option<&ProbeCache>) -> Accel {
    if let Some(c) = cache
        && let Ok(text) = std::fs::read_to_string(&c.path)
    {
        match text.split_whitespace().collect::<Vec<_>>()[..] {
            [id, "kvm"] if id == c.boot_id => return Accel::Kvm,
            [id, "tcg"] if id == c.boot_id => return Accel::Tcg,
            _ => {}
        }
    }
    let accel =
        if std::fs::OpenOptions::new().read(true).write(true).open(kvm_device).is_err() { Accel::Tcg } else { run_probe(kernel, timeout) };
    if let Some(c) = cache {
        let _ = std::fs::write(&c.path, format!("{} {}\n", c.boot_id, accel.qemu_arg()));
    }
    accel
}

fn run_probe(kernel: &Path, timeout: Duration) -> Accel {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-accel", "kvm", "-m", "256", "-nodefaults", "-display", "none", "-no-user-config", "-no-reboot"]);
    cmd.args(["-serial", "stdio", "-append", "console=ttyS0 panic=-1 loglevel=4"]);
    cmd.arg("-kernel").arg(kernel);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let Ok(mut child) = cmd.spawn() else { return Accel::Tcg };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => {
                let mut out = String::new();
                if let Some(mut o) = child.stdout.take() {
                    let _ = o.read_to_string(&mut out);
                }
                return if out.contains("Kernel panic") { Accel::Kvm } else { Accel::Tcg };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Accel::Tcg;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GuestSpec {
        GuestSpec {
            name: "kiln-test".into(),
            mac: "52:54:00:12:34:56".parse().unwrap(),
            memory_mib: 512,
            cpus: 2,
            accel: Accel::Tcg,
            boot: Boot::Network { bootfile: "http://10.0.2.2:8080/boot.ipxe".into() },
            serial_log: "/tmp/x.log".into(),
            firmware: Firmware::Bios,
            netns: None,
            segment: None,
        }
    }

    #[test]
    fn command_line() {
        let cmd = spec().command();
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg"), "{joined}");
        assert!(joined.contains("-netdev user,id=net0,bootfile=http://10.0.2.2:8080/boot.ipxe"), "{joined}");
        assert!(joined.contains("virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,bootindex=1"), "{joined}");
        assert!(joined.contains("-serial file:/tmp/x.log"), "{joined}");
        assert!(!joined.contains("-bios"), "SeaBIOS is QEMU's default");

        let mut uefi = spec();
        uefi.firmware = Firmware::Uefi("/usr/share/ovmf/OVMF.fd".into());
        uefi.netns = Some("lab".into());
        uefi.boot = Boot::Tap { ifname: "tap0".into(), nic_rom: false };
        let cmd = uefi.command();
        assert_eq!(cmd.get_program(), "ip");
        let joined = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        assert!(joined.starts_with("netns exec lab qemu-system-x86_64 "), "{joined}");
        assert!(joined.contains("-bios /usr/share/ovmf/OVMF.fd"), "{joined}");
        assert!(joined.contains("-netdev tap,id=net0,ifname=tap0,script=no,downscript=no"), "{joined}");
        assert!(joined.contains(",bootindex=1,romfile="), "no NIC ROM: the firmware's own PXE: {joined}");
    }

    #[test]
    fn uuid_is_stable_and_well_formed() {
        let u = spec().uuid();
        assert_eq!(u, spec().uuid());
        let parts: Vec<usize> = u.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{u}");
    }

    #[test]
    fn probe_uses_cache_and_missing_device() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ProbeCache { path: dir.path().join("probe"), boot_id: "b1".into() };
        let accel = probe_kvm(&dir.path().join("no-kvm"), Path::new("/nonexistent"), Duration::from_secs(1), Some(&cache));
        assert_eq!(accel, Accel::Tcg, "no device: TCG");
        std::fs::write(&cache.path, "b1 kvm\n").unwrap();
        assert_eq!(probe_kvm(&dir.path().join("no-kvm"), Path::new("/x"), Duration::from_secs(1), Some(&cache)), Accel::Kvm, "cached");
        let other = ProbeCache { boot_id: "b2".into(), ..cache };
        assert_eq!(probe_kvm(&dir.path().join("no-kvm"), Path::new("/x"), Duration::from_secs(1), Some(&other)), Accel::Tcg, "stale cache");
    }
}
