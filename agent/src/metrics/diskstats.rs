//! The `diskstats` collector: `proc/diskstats` per block device (minus
//! node_exporter's default device exclude), and `node_disk_info` with the
//! labels udev's database knows.

use super::{Collector, Error, Kind, MetricSet, Roots, read};

/// node_exporter 1.5.0's default `--collector.diskstats.device-exclude`.
pub const DISKSTATS_DEVICE_EXCLUDE: &str = r"^(ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$";

/// Whether [`DISKSTATS_DEVICE_EXCLUDE`] matches `dev` (as Go's regexp does:
/// `\d` is an ASCII digit). Written out rather than compiled at run time:
/// the regex engine was a good share of the agent's resident code and heap.
pub fn device_excluded(dev: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let b = dev.as_bytes();
    if let Some(rest) = ["ram", "loop", "fd"].iter().find_map(|p| dev.strip_prefix(p)) {
        return digits(rest);
    }
    // (h|s|v|xv)d[a-z]\d+
    let after = if b.starts_with(b"xv") {
        2
    } else if matches!(b.first(), Some(b'h' | b's' | b'v')) {
        1
    } else {
        0
    };
    if after > 0 && b.get(after) == Some(&b'd') && b.get(after + 1).is_some_and(u8::is_ascii_lowercase) {
        return digits(&dev[after + 2..]);
    }
    // nvme\d+n\d+p\d+
    let Some(rest) = dev.strip_prefix("nvme") else { return false };
    let Some((ns, rest)) = rest.split_once('n') else { return false };
    let Some((part, n)) = rest.split_once('p') else { return false };
    digits(ns) && digits(part) && digits(n)
}

const SECONDS_PER_TICK: f64 = 1.0 / 1000.0;
const SECTOR: f64 = 512.0;

/// (name, HELP, type, scale) of each `proc/diskstats` column after the device name.
const COLUMNS: [(&str, &str, Kind, f64); 17] = [
    ("node_disk_reads_completed_total", "The total number of reads completed successfully.", Kind::Counter, 1.0),
    ("node_disk_reads_merged_total", "The total number of reads merged.", Kind::Counter, 1.0),
    ("node_disk_read_bytes_total", "The total number of bytes read successfully.", Kind::Counter, SECTOR),
    ("node_disk_read_time_seconds_total", "The total number of seconds spent by all reads.", Kind::Counter, SECONDS_PER_TICK),
    ("node_disk_writes_completed_total", "The total number of writes completed successfully.", Kind::Counter, 1.0),
    ("node_disk_writes_merged_total", "The number of writes merged.", Kind::Counter, 1.0),
    ("node_disk_written_bytes_total", "The total number of bytes written successfully.", Kind::Counter, SECTOR),
    ("node_disk_write_time_seconds_total", "This is the total number of seconds spent by all writes.", Kind::Counter, SECONDS_PER_TICK),
    ("node_disk_io_now", "The number of I/Os currently in progress.", Kind::Gauge, 1.0),
    ("node_disk_io_time_seconds_total", "Total seconds spent doing I/Os.", Kind::Counter, SECONDS_PER_TICK),
    ("node_disk_io_time_weighted_seconds_total", "The weighted # of seconds spent doing I/Os.", Kind::Counter, SECONDS_PER_TICK),
    ("node_disk_discards_completed_total", "The total number of discards completed successfully.", Kind::Counter, 1.0),
    ("node_disk_discards_merged_total", "The total number of discards merged.", Kind::Counter, 1.0),
    ("node_disk_discarded_sectors_total", "The total number of sectors discarded successfully.", Kind::Counter, 1.0),
    ("node_disk_discard_time_seconds_total", "This is the total number of seconds spent by all discards.", Kind::Counter, SECONDS_PER_TICK),
    ("node_disk_flush_requests_total", "The total number of flush requests completed successfully", Kind::Counter, 1.0),
    (
        "node_disk_flush_requests_time_seconds_total",
        "This is the total number of seconds spent by all flush requests.",
        Kind::Counter,
        SECONDS_PER_TICK,
    ),
];

/// `node_disk_*{device}`.
#[derive(Default)]
pub struct Diskstats;

/// The `E:KEY=value` properties of udev's record that `node_disk_info` shows.
const UDEV_KEYS: [&str; 6] = ["ID_PATH", "ID_WWN", "ID_MODEL", "ID_SERIAL_SHORT", "SCSI_IDENT_SERIAL", "ID_REVISION"];

/// The values of [`UDEV_KEYS`] in `text` (the last line of a key wins), empty when missing.
fn udev_values(text: &str) -> [&str; 6] {
    let mut values = [""; 6];
    for (k, v) in text.lines().filter_map(|l| l.strip_prefix("E:")).filter_map(|kv| kv.split_once('=')) {
        if let Some(i) = UDEV_KEYS.iter().position(|key| *key == k) {
            values[i] = v;
        }
    }
    values
}

impl Collector for Diskstats {
    fn name(&self) -> &'static str {
        "diskstats"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let path = roots.proc.join("diskstats");
        let text = read(&path)?;
        let mut record = std::path::PathBuf::new();
        for line in text.lines() {
            let fields = line.split_whitespace().count();
            if fields == 0 {
                continue;
            }
            if fields < 14 {
                return Err(Error::parse(&path, format!("{fields} fields in {line:?}, want at least 14")));
            }
            let mut f = line.split_whitespace();
            let (Some(major), Some(minor), Some(dev)) = (f.next(), f.next(), f.next()) else { continue };
            let mut values = [0u64; COLUMNS.len()];
            for (i, v) in f.enumerate() {
                let v = v.parse::<u64>().map_err(|_| Error::parse(&path, format!("{dev}: not a counter: {v:?}")))?;
                if let Some(slot) = values.get_mut(i) {
                    *slot = v;
                }
            }
            if major.parse::<u32>().is_err() || minor.parse::<u32>().is_err() {
                return Err(Error::parse(&path, format!("bad device numbers in {line:?}")));
            }
            if device_excluded(dev) {
                continue;
            }
            record.as_mut_os_string().clear();
            record.push(&roots.udev_data);
            record.push("b");
            for part in [major, ":", minor] {
                record.as_mut_os_string().push(part);
            }
            let udev = read(&record).ok();
            let [id_path, wwn, model, serial_short, scsi_serial, revision] = udev_values(udev.as_deref().unwrap_or(""));
            let serial = if serial_short.is_empty() { scsi_serial } else { serial_short };
            out.add(
                "node_disk_info",
                "Info of /sys/block/<block_device>.",
                Kind::Gauge,
                &[
                    ("device", dev),
                    ("major", major),
                    ("minor", minor),
                    ("path", id_path),
                    ("wwn", wwn),
                    ("model", model),
                    ("serial", serial),
                    ("revision", revision),
                ],
                1.0,
            );
            for ((name, help, kind, scale), v) in COLUMNS.iter().zip(&values[..(fields - 3).min(COLUMNS.len())]) {
                out.add(name, help, *kind, &[("device", dev)], *v as f64 * scale);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases() {
        let real = " 254       0 vda 163738 12380 11308610 388498 23987 45069 10269784 28845 0 24016 418957 10129 54 1008792 1435 2955 178\n 254       1 vda1 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17\n   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0\n";
        for (case, text, ok) in [
            ("real layout", real, true),
            ("short line", " 254 0 vda 1 2 3\n", false),
            ("garbage counter", " 254 0 vda 1 2 3 4 5 6 7 8 9 10 zz\n", false),
            ("garbage device numbers", " x y vda 1 2 3 4 5 6 7 8 9 10 11\n", false),
        ] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("diskstats"), text).unwrap();
            let udev_data = dir.path().join("udev");
            std::fs::create_dir_all(&udev_data).unwrap();
            std::fs::write(udev_data.join("b254:0"), "S:disk/by-path/x\nE:ID_PATH=pci-0000:00:05.0\nE:ID_SERIAL_SHORT=abc\n").unwrap();
            let roots = Roots { proc: dir.path().into(), udev_data, ..Roots::default() };
            let mut set = MetricSet::default();
            assert_eq!(Diskstats.collect(&roots, &mut set).is_ok(), ok, "{case}");
            if ok {
                assert_eq!(set.value("node_disk_io_time_seconds_total", &[("device", "vda")]), Some(24.016000000000002), "{case}");
                assert_eq!(set.value("node_disk_read_bytes_total", &[("device", "vda")]), Some(11308610.0 * 512.0), "{case}");
                assert_eq!(set.value("node_disk_reads_completed_total", &[("device", "vda1")]), None, "{case}: partition excluded");
                assert_eq!(set.value("node_disk_reads_completed_total", &[("device", "loop0")]), None, "{case}: loop excluded");
                let info = [
                    ("device", "vda"),
                    ("major", "254"),
                    ("minor", "0"),
                    ("path", "pci-0000:00:05.0"),
                    ("wwn", ""),
                    ("model", ""),
                    ("serial", "abc"),
                    ("revision", ""),
                ];
                assert_eq!(set.value("node_disk_info", &info), Some(1.0), "{case}: udev labels");
            }
        }
    }
}
