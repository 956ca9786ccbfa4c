//! Network devices: the `netdev` collector (`proc/net/dev` counters, plus
//! `rx_nohandler` from sysfs, as node_exporter's netlink path reports them)
//! and the `netclass` collector (the attributes under `sys/class/net/<dev>`;
//! on the live `/sys` most of them come from one rtnetlink dump instead of a
//! file each; a unit test compares both ways on the host it runs on).

use std::os::fd::OwnedFd;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::{Collector, Error, Kind, MetricSet, Roots, read, read_net};

/// node_exporter 1.5.0's (Debian) default `--collector.netdev.device-exclude`.
pub const NETDEV_DEVICE_EXCLUDE: &str = "^lo$";
/// node_exporter 1.5.0's default `--collector.netclass.ignored-devices`.
pub const NETCLASS_IGNORED_DEVICES: &str = "^$";

/// Whether [`NETDEV_DEVICE_EXCLUDE`] matches `dev`.
pub fn netdev_excluded(dev: &str) -> bool {
    dev == "lo"
}

/// Whether [`NETCLASS_IGNORED_DEVICES`] matches `dev`.
pub fn netclass_ignored(dev: &str) -> bool {
    dev.is_empty()
}

/// Name and HELP of each `proc/net/dev` column: receive, then transmit.
const COLUMNS: [(&str, &str); 16] = [
    ("node_network_receive_bytes_total", "Network device statistic receive_bytes."),
    ("node_network_receive_packets_total", "Network device statistic receive_packets."),
    ("node_network_receive_errs_total", "Network device statistic receive_errs."),
    ("node_network_receive_drop_total", "Network device statistic receive_drop."),
    ("node_network_receive_fifo_total", "Network device statistic receive_fifo."),
    ("node_network_receive_frame_total", "Network device statistic receive_frame."),
    ("node_network_receive_compressed_total", "Network device statistic receive_compressed."),
    ("node_network_receive_multicast_total", "Network device statistic receive_multicast."),
    ("node_network_transmit_bytes_total", "Network device statistic transmit_bytes."),
    ("node_network_transmit_packets_total", "Network device statistic transmit_packets."),
    ("node_network_transmit_errs_total", "Network device statistic transmit_errs."),
    ("node_network_transmit_drop_total", "Network device statistic transmit_drop."),
    ("node_network_transmit_fifo_total", "Network device statistic transmit_fifo."),
    ("node_network_transmit_colls_total", "Network device statistic transmit_colls."),
    ("node_network_transmit_carrier_total", "Network device statistic transmit_carrier."),
    ("node_network_transmit_compressed_total", "Network device statistic transmit_compressed."),
];

/// `node_network_{receive,transmit}_*_total{device}`.
#[derive(Default)]
pub struct Netdev;

impl Collector for Netdev {
    fn name(&self) -> &'static str {
        "netdev"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let path = roots.proc.join("net/dev");
        let text = read_net(roots, &path, "dev")?;
        let mut lines = text.lines();
        let (Some(h1), Some(_)) = (lines.next(), lines.next()) else {
            return Err(Error::parse(&path, "no header"));
        };
        if !h1.contains('|') {
            return Err(Error::parse(&path, format!("unexpected header {h1:?}")));
        }
        let mut nohandler = std::path::PathBuf::new();
        for line in lines {
            let Some((dev, rest)) = line.split_once(':') else {
                return Err(Error::parse(&path, format!("no ':' in {line:?}")));
            };
            let dev = dev.trim();
            let mut values = [0u64; 16];
            let mut count = 0;
            for v in rest.split_whitespace() {
                let v = v.parse::<u64>().map_err(|_| Error::parse(&path, format!("{dev}: not a counter: {v:?}")))?;
                if let Some(slot) = values.get_mut(count) {
                    *slot = v;
                }
                count += 1;
            }
            if count != 16 {
                return Err(Error::parse(&path, format!("{dev}: {count} fields, want 16")));
            }
            if netdev_excluded(dev) {
                continue;
            }
            let labels = [("device", dev)];
            for ((name, help), v) in COLUMNS.iter().zip(&values) {
                out.add(name, help, Kind::Counter, &labels, *v as f64);
            }
            nohandler.as_mut_os_string().clear();
            nohandler.push(&roots.sys);
            nohandler.push("class/net");
            nohandler.push(dev);
            nohandler.push("statistics/rx_nohandler");
            if let Some(v) = read(&nohandler).ok().and_then(|t| t.trim().parse::<u64>().ok()) {
                out.add(
                    "node_network_receive_nohandler_total",
                    "Network device statistic receive_nohandler.",
                    Kind::Counter,
                    &labels,
                    v as f64,
                );
            }
        }
        Ok(())
    }
}

/// `node_network_info`, `node_network_up` and the numeric attributes of
/// each device under `sys/class/net` (`node_network_mtu_bytes`, ...).
#[derive(Default)]
pub struct Netclass;

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
        let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let class_fd = nix::fcntl::open(&class, dir_flags, Mode::empty()).map_err(|e| Error::io(&class, e.into()))?;
        let mut buf = [0u8; 4096];
        let mut texts: [String; 5] = Default::default();
        // The live sysfs: most attributes from one netlink dump (the same
        // kernel fields sysfs prints), the rest from sysfs. Any other root
        // (a fixture tree, a host's sysfs mounted elsewhere): all from sysfs.
        if roots.sys == Path::new("/sys")
            && let Ok(links) = link::dump()
        {
            for l in &links {
                if netclass_ignored(&l.name) {
                    continue;
                }
                let Ok(dir) = nix::fcntl::openat(&class_fd, l.name.as_str(), dir_flags, Mode::empty()) else { continue };
                device(out, &l.name, &dir, &mut buf, Some(l), &mut texts);
            }
            return Ok(());
        }
        let entries = std::fs::read_dir(&class).map_err(|e| Error::io(&class, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&class, e))?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            if netclass_ignored(&name) {
                continue;
            }
            // Devices are (symlinks to) directories; `bonding_masters` is a file.
            let Ok(dir) = nix::fcntl::openat(&class_fd, name.as_str(), dir_flags, Mode::empty()) else { continue };
            device(out, &name, &dir, &mut buf, None, &mut texts);
        }
        Ok(())
    }
}

/// One device's samples: each attribute from `link` when the dump has it, else from its sysfs directory `dir`.
/// `texts` holds the text attributes while they are added, reused from device to device.
fn device(out: &mut MetricSet, name: &str, dir: &OwnedFd, buf: &mut [u8; 4096], link: Option<&link::Link>, texts: &mut [String; 5]) {
    let labels = [("device", name)];
    for (file, text) in ["operstate", "address", "broadcast", "duplex", "ifalias"].into_iter().zip(texts.iter_mut()) {
        text.clear();
        if !link.is_some_and(|l| l.text(file, text)) {
            text.push_str(attr(dir, file, buf).unwrap_or_default());
        }
    }
    let [operstate, address, broadcast, duplex, ifalias] = texts;
    out.add(
        "node_network_up",
        "Value is 1 if operstate is 'up', 0 otherwise.",
        Kind::Gauge,
        &labels,
        if operstate.as_str() == "up" { 1.0 } else { 0.0 },
    );
    out.add(
        "node_network_info",
        "Non-numeric data from /sys/class/net/<iface>, value is always 1.",
        Kind::Gauge,
        &[
            ("device", name),
            ("address", address.as_str()),
            ("broadcast", broadcast.as_str()),
            ("duplex", duplex.as_str()),
            ("operstate", operstate.as_str()),
            ("ifalias", ifalias.as_str()),
        ],
        1.0,
    );
    for (file, metric, help, kind) in NETCLASS_NUMBERS {
        let v = match link.and_then(|l| l.number(file)) {
            Some(known) => known,
            None => attr(dir, file, buf).and_then(parse_int_base0),
        };
        let Some(v) = v else { continue };
        let v = if file == "speed" { v.wrapping_mul(1000 * 1000) / 8 } else { v };
        out.add(metric, help, kind, &labels, v as f64);
    }
}

/// The kernel's network devices from one rtnetlink `RTM_GETLINK` dump: the
/// fields sysfs prints under `class/net/<dev>` (`mtu`, `operstate`, ...)
/// without opening a file per field. sysfs alone has `flags` as the device
/// holds them (netlink adds `IFF_RUNNING` and friends), `speed`, `duplex`,
/// `dev_id`, `addr_assign_type` and `name_assign_type`.
mod link {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};

    const RTM_NEWLINK: u16 = 16;
    const RTM_GETLINK: u16 = 18;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    const IFF_UP: u32 = 0x1;
    const IFF_DORMANT: u32 = 0x20000;
    /// IFLA_EXT_MASK's RTEXT_FILTER_SKIP_STATS: no counters, which this does not read.
    const IFLA_EXT_MASK: u16 = 29;
    const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
    /// The kernel's names of `IF_OPER_*`, as sysfs prints them.
    const OPERSTATES: [&str; 7] = ["unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up"];

    /// One device as the dump describes it.
    #[derive(Debug, Default)]
    pub(super) struct Link {
        pub(super) name: String,
        index: i32,
        kind: u16,
        flags: u32,
        address: Option<Vec<u8>>,
        broadcast: Option<Vec<u8>>,
        mtu: Option<u32>,
        link: Option<u32>,
        txqlen: Option<u32>,
        operstate: Option<u8>,
        linkmode: Option<u8>,
        ifalias: Option<String>,
        group: Option<u32>,
        carrier: Option<u8>,
        carrier_changes: Option<u32>,
        carrier_up: Option<u32>,
        carrier_down: Option<u32>,
    }

    fn mac(bytes: &[u8], s: &mut String) {
        for (i, b) in bytes.iter().enumerate() {
            if i > 0 {
                s.push(':');
            }
            const HEX: &[u8; 16] = b"0123456789abcdef";
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }

    impl Link {
        /// `netif_running`: sysfs refuses `carrier` and `dormant` of a device that is not.
        fn running(&self) -> bool {
            self.flags & IFF_UP != 0
        }

        /// Appends the text attribute `file` as sysfs prints it (trimmed) to
        /// `out`; false when the dump does not say and sysfs must be read.
        pub(super) fn text(&self, file: &str, out: &mut String) -> bool {
            match file {
                // sysfs prints addr_len bytes; netlink leaves both out when that is 0.
                "address" => mac(self.address.as_deref().unwrap_or_default(), out),
                "broadcast" => mac(self.broadcast.as_deref().unwrap_or_default(), out),
                "operstate" => match self.operstate.and_then(|o| OPERSTATES.get(usize::from(o))) {
                    Some(state) => out.push_str(state),
                    None => return false,
                },
                "ifalias" => out.push_str(self.ifalias.as_deref().unwrap_or_default().trim()),
                _ => return false,
            }
            true
        }

        /// The numeric attribute `file` as sysfs prints it: `Some(None)` when
        /// sysfs would refuse it, `None` when the dump does not say.
        pub(super) fn number(&self, file: &str) -> Option<Option<i64>> {
            // sysfs prints these with "%d" of a C int.
            let int = |v: Option<u32>| v.map(|v| Some(i64::from(v as i32)));
            match file {
                "carrier" if !self.running() => Some(None),
                "carrier" => self.carrier.map(|c| Some(i64::from(c))),
                "dormant" if !self.running() => Some(None),
                "dormant" => Some(Some(i64::from(self.flags & IFF_DORMANT != 0))),
                "carrier_changes" => int(self.carrier_changes),
                "carrier_up_count" => int(self.carrier_up),
                "carrier_down_count" => int(self.carrier_down),
                "ifindex" => Some(Some(i64::from(self.index))),
                // Left out when the device is its own link.
                "iflink" => Some(Some(self.link.map_or(i64::from(self.index), |l| i64::from(l as i32)))),
                "link_mode" => self.linkmode.map(|m| Some(i64::from(m))),
                "mtu" => int(self.mtu),
                "netdev_group" => int(self.group),
                "tx_queue_len" => int(self.txqlen),
                "type" => Some(Some(i64::from(self.kind))),
                _ => None,
            }
        }
    }

    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
    }
    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }

    /// Every device in this process's network namespace.
    pub(super) fn dump() -> Result<Vec<Link>, nix::Error> {
        let fd = socket::socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        let seq: u32 = 1;
        // nlmsghdr, ifinfomsg (AF_UNSPEC, all devices), IFLA_EXT_MASK.
        let mut req = Vec::with_capacity(40);
        req.extend_from_slice(&40u32.to_ne_bytes());
        req.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
        req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req.extend_from_slice(&seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(&[0u8; 16]);
        req.extend_from_slice(&8u16.to_ne_bytes());
        req.extend_from_slice(&IFLA_EXT_MASK.to_ne_bytes());
        req.extend_from_slice(&RTEXT_FILTER_SKIP_STATS.to_ne_bytes());
        socket::sendto(fd.as_raw_fd(), &req, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
        let mut links = Vec::new();
        // The kernel answers a dump in parts as big as the buffer read into
        // (the first one about a page, or the largest device's message; one
        // is about 1 KiB without statistics). A message cut short fails the
        // dump, and sysfs is read instead.
        let mut storage = crate::metrics::Buffer::take(crate::metrics::BUFFER);
        let buf: &mut [u8] = &mut storage.0;
        loop {
            let n = socket::recv(fd.as_raw_fd(), &mut *buf, MsgFlags::empty())?;
            if n == 0 {
                return Err(nix::Error::EIO);
            }
            let mut at = 0;
            while at + 16 <= n {
                let (Some(len), Some(kind), Some(msg_seq)) = (u32_at(buf, at), u16_at(buf, at + 4), u32_at(buf, at + 8)) else {
                    return Err(nix::Error::EIO);
                };
                let len = len as usize;
                if len < 16 || at + len > n {
                    return Err(nix::Error::EIO);
                }
                let msg = &buf[at + 16..at + len];
                at += (len + 3) & !3;
                if msg_seq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(links),
                    NLMSG_ERROR => {
                        let errno = u32_at(msg, 0).map_or(0, |e| e as i32);
                        return Err(nix::Error::from_raw(-errno));
                    }
                    RTM_NEWLINK => links.push(parse(msg).ok_or(nix::Error::EIO)?),
                    _ => {}
                }
            }
        }
    }

    /// An ifinfomsg and its attributes.
    fn parse(msg: &[u8]) -> Option<Link> {
        let mut l = Link { kind: u16_at(msg, 2)?, index: u32_at(msg, 4)? as i32, flags: u32_at(msg, 8)?, ..Link::default() };
        let mut at = 16;
        while at + 4 <= msg.len() {
            let len = usize::from(u16_at(msg, at)?);
            let kind = u16_at(msg, at + 2)? & 0x3fff;
            if len < 4 || at + len > msg.len() {
                return None;
            }
            let data = &msg[at + 4..at + len];
            at += (len + 3) & !3;
            let u32v = || u32_at(data, 0);
            let u8v = || data.first().copied();
            let string = || String::from_utf8_lossy(data.split(|&b| b == 0).next().unwrap_or_default()).into_owned();
            match kind {
                1 => l.address = Some(data.to_vec()),
                2 => l.broadcast = Some(data.to_vec()),
                3 => l.name = string(),
                4 => l.mtu = u32v(),
                5 => l.link = u32v(),
                13 => l.txqlen = u32v(),
                16 => l.operstate = u8v(),
                17 => l.linkmode = u8v(),
                20 => l.ifalias = Some(string()),
                27 => l.group = u32v(),
                33 => l.carrier = u8v(),
                35 => l.carrier_changes = u32v(),
                47 => l.carrier_up = u32v(),
                48 => l.carrier_down = u32v(),
                _ => {}
            }
        }
        (!l.name.is_empty()).then_some(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Format, encode};

    #[test]
    fn netlink_and_sysfs_agree_on_this_host() {
        // "/sys" takes the netlink dump; the same tree by another path is read from sysfs alone.
        let live = Roots { sys: "/sys".into(), ..Roots::default() };
        let walked = Roots { sys: "/sys/class/..".into(), ..Roots::default() };
        let (mut dumped, mut read) = (MetricSet::default(), MetricSet::default());
        if Netclass.collect(&walked, &mut read).is_err() {
            return; // no sysfs here
        }
        Netclass.collect(&live, &mut dumped).unwrap();
        assert!(link::dump().is_ok(), "the netlink dump itself works");
        let (dumped, read) = (encode::encode(&mut dumped, Format::Text), encode::encode(&mut read, Format::Text));
        assert_eq!(dumped, read, "netclass from netlink + sysfs vs sysfs alone");
    }

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
            assert_eq!(Netdev.collect(&roots, &mut set).is_ok(), ok, "{case}");
            if ok {
                assert_eq!(set.value("node_network_receive_bytes_total", &[("device", "eth0")]), Some(123456789012.0), "{case}");
                assert_eq!(set.value("node_network_transmit_colls_total", &[("device", "eth0")]), Some(14.0), "{case}");
                assert_eq!(set.value("node_network_receive_bytes_total", &[("device", "lo")]), None, "{case}: lo excluded");
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let roots = Roots { proc: dir.path().into(), ..Roots::default() };
        assert!(Netdev.collect(&roots, &mut MetricSet::default()).is_err(), "missing file");
    }
}
