//! Network devices: the `netdev` collector (`proc/net/dev` counters, plus
//! `rx_nohandler` from sysfs, as node_exporter's netlink path reports them)
//! and the `netclass` collector (the attributes under `sys/class/net/<dev>`).

use std::os::fd::OwnedFd;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use regex::Regex;

use super::{Collector, Error, Kind, MetricSet, Roots, read};

/// node_exporter 1.5.0's (Debian) default `--collector.netdev.device-exclude`.
pub const NETDEV_DEVICE_EXCLUDE: &str = "^lo$";
/// node_exporter 1.5.0's default `--collector.netclass.ignored-devices`.
pub const NETCLASS_IGNORED_DEVICES: &str = "^$";

const RX: [&str; 8] = ["bytes", "packets", "errs", "drop", "fifo", "frame", "compressed", "multicast"];
const TX: [&str; 8] = ["bytes", "packets", "errs", "drop", "fifo", "colls", "carrier", "compressed"];

/// `node_network_{receive,transmit}_*_total{device}`.
pub struct Netdev {
    exclude: Regex,
}

impl Default for Netdev {
    fn default() -> Self {
        Netdev { exclude: Regex::new(NETDEV_DEVICE_EXCLUDE).expect("a valid pattern") }
    }
}

impl Collector for Netdev {
    fn name(&self) -> &'static str {
        "netdev"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let path = roots.proc.join("net/dev");
        let text = read(&path)?;
        let mut lines = text.lines();
        let (Some(h1), Some(_)) = (lines.next(), lines.next()) else {
            return Err(Error::parse(&path, "no header"));
        };
        if !h1.contains('|') {
            return Err(Error::parse(&path, format!("unexpected header {h1:?}")));
        }
        for line in lines {
            let Some((dev, rest)) = line.split_once(':') else {
                return Err(Error::parse(&path, format!("no ':' in {line:?}")));
            };
            let dev = dev.trim();
            let values: Vec<u64> = rest
                .split_whitespace()
                .map(|v| v.parse::<u64>().map_err(|_| Error::parse(&path, format!("{dev}: not a counter: {v:?}"))))
                .collect::<Result<_, _>>()?;
            if values.len() != 16 {
                return Err(Error::parse(&path, format!("{dev}: {} fields, want 16", values.len())));
            }
            if self.exclude.is_match(dev) {
                continue;
            }
            let labels = [("device", dev)];
            let mut emit = |dir: &str, stat: &str, v: u64| {
                out.add(
                    &format!("node_network_{dir}_{stat}_total"),
                    &format!("Network device statistic {dir}_{stat}."),
                    Kind::Counter,
                    &labels,
                    v as f64,
                );
            };
            for (stat, v) in RX.iter().zip(&values[..8]) {
                emit("receive", stat, *v);
            }
            for (stat, v) in TX.iter().zip(&values[8..]) {
                emit("transmit", stat, *v);
            }
            let nohandler = roots.sys.join("class/net").join(dev).join("statistics/rx_nohandler");
            if let Some(v) = read(&nohandler).ok().and_then(|t| t.trim().parse::<u64>().ok()) {
                emit("receive", "nohandler", v);
            }
        }
        Ok(())
    }
}

/// `node_network_info`, `node_network_up` and the numeric attributes of
/// each device under `sys/class/net` (`node_network_mtu_bytes`, ...).
pub struct Netclass {
    ignored: Regex,
}

impl Default for Netclass {
    fn default() -> Self {
        Netclass { ignored: Regex::new(NETCLASS_IGNORED_DEVICES).expect("a valid pattern") }
    }
}

/// An attribute of the device directory `dir` as node_exporter reads it:
/// trimmed, or `None` when the kernel refuses it (EINVAL for `speed` on a
/// down link, ...) or it is no regular file. One `openat` and one `read`
/// into `buf` (a sysfs attribute is at most a page and comes whole in one
/// read); opened non-blocking, so a FIFO reads as empty instead of hanging.
fn attr<'b>(dir: &OwnedFd, name: &str, buf: &'b mut [u8]) -> Option<&'b str> {
    let fd = nix::fcntl::openat(dir, name, OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC, Mode::empty()).ok()?;
    let n = nix::unistd::read(&fd, buf).ok()?;
    std::str::from_utf8(&buf[..n]).ok().map(str::trim)
}

/// Go's `strconv.ParseInt(s, 0, 64)`: `0x` hex, `0o`/leading `0` octal, `0b` binary.
pub(crate) fn parse_int_base0(s: &str) -> Option<i64> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..])
    } else {
        (10, lower.as_str())
    };
    if digits.is_empty() || digits.starts_with(['+', '-']) {
        return None;
    }
    let v = i64::from_str_radix(digits, radix).ok()?;
    Some(if neg { -v } else { v })
}

/// The numeric attributes: file, metric name, HELP, type. `speed` is in
/// Mbit/s and printed in bytes/s.
const NETCLASS_NUMBERS: [(&str, &str, &str, Kind); 17] = [
    ("addr_assign_type", "node_network_address_assign_type", "Network device property: address_assign_type", Kind::Gauge),
    ("carrier", "node_network_carrier", "Network device property: carrier", Kind::Gauge),
    ("carrier_changes", "node_network_carrier_changes_total", "Network device property: carrier_changes_total", Kind::Counter),
    ("carrier_up_count", "node_network_carrier_up_changes_total", "Network device property: carrier_up_changes_total", Kind::Counter),
    ("carrier_down_count", "node_network_carrier_down_changes_total", "Network device property: carrier_down_changes_total", Kind::Counter),
    ("dev_id", "node_network_device_id", "Network device property: device_id", Kind::Gauge),
    ("dormant", "node_network_dormant", "Network device property: dormant", Kind::Gauge),
    ("flags", "node_network_flags", "Network device property: flags", Kind::Gauge),
    ("ifindex", "node_network_iface_id", "Network device property: iface_id", Kind::Gauge),
    ("iflink", "node_network_iface_link", "Network device property: iface_link", Kind::Gauge),
    ("link_mode", "node_network_iface_link_mode", "Network device property: iface_link_mode", Kind::Gauge),
    ("mtu", "node_network_mtu_bytes", "Network device property: mtu_bytes", Kind::Gauge),
    ("name_assign_type", "node_network_name_assign_type", "Network device property: name_assign_type", Kind::Gauge),
    ("netdev_group", "node_network_net_dev_group", "Network device property: net_dev_group", Kind::Gauge),
    ("speed", "node_network_speed_bytes", "Network device property: speed_bytes", Kind::Gauge),
    ("tx_queue_len", "node_network_transmit_queue_length", "Network device property: transmit_queue_length", Kind::Gauge),
    ("type", "node_network_protocol_type", "Network device property: protocol_type", Kind::Gauge),
];

impl Collector for Netclass {
    fn name(&self) -> &'static str {
        "netclass"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let class = roots.sys.join("class/net");
        let entries = std::fs::read_dir(&class).map_err(|e| Error::io(&class, e))?;
        let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let class_fd = nix::fcntl::open(&class, dir_flags, Mode::empty()).map_err(|e| Error::io(&class, e.into()))?;
        let mut buf = [0u8; 4096];
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&class, e))?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            if self.ignored.is_match(&name) {
                continue;
            }
            // Devices are (symlinks to) directories; `bonding_masters` is a file.
            let Ok(dir) = nix::fcntl::openat(&class_fd, name.as_str(), dir_flags, Mode::empty()) else { continue };
            let labels = [("device", name.as_str())];
            let mut text = |file: &str| attr(&dir, file, &mut buf).unwrap_or_default().to_string();
            let operstate = text("operstate");
            let address = text("address");
            let broadcast = text("broadcast");
            let duplex = text("duplex");
            let ifalias = text("ifalias");
            out.add(
                "node_network_up",
                "Value is 1 if operstate is 'up', 0 otherwise.",
                Kind::Gauge,
                &labels,
                if operstate == "up" { 1.0 } else { 0.0 },
            );
            out.add(
                "node_network_info",
                "Non-numeric data from /sys/class/net/<iface>, value is always 1.",
                Kind::Gauge,
                &[
                    ("device", &name),
                    ("address", &address),
                    ("broadcast", &broadcast),
                    ("duplex", &duplex),
                    ("operstate", &operstate),
                    ("ifalias", &ifalias),
                ],
                1.0,
            );
            for (file, metric, help, kind) in NETCLASS_NUMBERS {
                let Some(v) = attr(&dir, file, &mut buf).and_then(parse_int_base0) else { continue };
                let v = if file == "speed" { v.wrapping_mul(1000 * 1000) / 8 } else { v };
                out.add(metric, help, kind, &labels, v as f64);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_integers() {
        for (s, want) in [
            ("0x1003", Some(4099)),
            ("0", Some(0)),
            ("-1", Some(-1)),
            ("1500", Some(1500)),
            ("010", Some(8)),
            ("0b11", Some(3)),
            ("", None),
            ("up", None),
            ("0x", None),
        ] {
            assert_eq!(parse_int_base0(s), want, "input {s:?}");
        }
    }

    #[test]
    fn netdev_cases() {
        let header = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n";
        for (case, body, ok) in [
            (
                "real layout",
                "    lo: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n  eth0:123456789012 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n",
                true,
            ),
            ("short line", "  eth0: 1 2 3\n", false),
            ("garbage value", "  eth0: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 x\n", false),
            ("no colon", "  eth0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n", false),
        ] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("net")).unwrap();
            std::fs::write(dir.path().join("net/dev"), format!("{header}{body}")).unwrap();
            let roots = Roots { proc: dir.path().into(), sys: dir.path().join("sys"), ..Roots::default() };
            let mut set = MetricSet::default();
            assert_eq!(Netdev::default().collect(&roots, &mut set).is_ok(), ok, "{case}");
            if ok {
                assert_eq!(set.value("node_network_receive_bytes_total", &[("device", "eth0")]), Some(123456789012.0), "{case}");
                assert_eq!(set.value("node_network_transmit_colls_total", &[("device", "eth0")]), Some(14.0), "{case}");
                assert_eq!(set.value("node_network_receive_bytes_total", &[("device", "lo")]), None, "{case}: lo excluded");
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let roots = Roots { proc: dir.path().into(), ..Roots::default() };
        assert!(Netdev::default().collect(&roots, &mut MetricSet::default()).is_err(), "missing file");
    }
}
