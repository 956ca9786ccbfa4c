//! Small kernel counters, one file or a few each: `loadavg`, `filefd`,
//! `entropy`, `pressure` (PSI) and `conntrack`.

use std::path::Path;

use super::{Collector, Error, Kind, MetricSet, Roots, float, read, read_net};

fn first_number(path: &Path) -> Result<f64, Error> {
    let text = read(path)?;
    let v = text.split_whitespace().next().ok_or_else(|| Error::parse(path, "empty"))?;
    float(path, "value", v)
}

/// `node_load1`, `node_load5`, `node_load15` from `proc/loadavg`.
pub struct Loadavg;

impl Collector for Loadavg {
    fn name(&self) -> &'static str {
        "loadavg"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let path = roots.proc.join("loadavg");
        let text = read(&path)?;
        let mut parts = text.split_whitespace();
        let (Some(l1), Some(l5), Some(l15)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::parse(&path, format!("unexpected content {:?}", text.trim())));
        };
        let loads = [float(&path, "load1", l1)?, float(&path, "load5", l5)?, float(&path, "load15", l15)?];
        for ((name, help), v) in
            [("node_load1", "1m load average."), ("node_load5", "5m load average."), ("node_load15", "15m load average.")]
                .into_iter()
                .zip(loads)
        {
            out.add(name, help, Kind::Gauge, &[], v);
        }
        Ok(())
    }
}

/// `node_filefd_allocated`, `node_filefd_maximum` from `proc/sys/fs/file-nr`.
pub struct Filefd;

impl Collector for Filefd {
    fn name(&self) -> &'static str {
        "filefd"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let path = roots.proc.join("sys/fs/file-nr");
        let text = read(&path)?;
        let mut parts = text.split_whitespace();
        let (Some(allocated), Some(_), Some(maximum), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(Error::parse(&path, format!("unexpected content {:?}", text.trim())));
        };
        let allocated = float(&path, "allocated", allocated)?;
        let maximum = float(&path, "maximum", maximum)?;
        out.add("node_filefd_allocated", "File descriptor statistics: allocated.", Kind::Gauge, &[], allocated);
        out.add("node_filefd_maximum", "File descriptor statistics: maximum.", Kind::Gauge, &[], maximum);
        Ok(())
    }
}

/// `node_entropy_available_bits`, `node_entropy_pool_size_bits` from `proc/sys/kernel/random`.
pub struct Entropy;

impl Collector for Entropy {
    fn name(&self) -> &'static str {
        "entropy"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let dir = roots.proc.join("sys/kernel/random");
        let avail = first_number(&dir.join("entropy_avail"))?;
        out.add("node_entropy_available_bits", "Bits of available entropy.", Kind::Gauge, &[], avail);
        let pool = first_number(&dir.join("poolsize"))?;
        out.add("node_entropy_pool_size_bits", "Bits of entropy pool.", Kind::Gauge, &[], pool);
        Ok(())
    }
}

/// `node_pressure_*_seconds_total` from `proc/pressure/{cpu,io,memory}`.
pub struct Pressure;

/// The `total=` of the `some` and `full` lines, in microseconds.
fn psi(path: &Path) -> Result<(Option<f64>, Option<f64>), Error> {
    let text = read(path)?;
    let (mut some, mut full) = (None, None);
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let slot = match parts.next() {
            Some("some") => &mut some,
            Some("full") => &mut full,
            _ => continue,
        };
        let keys = ["avg10=", "avg60=", "avg300=", "total="];
        let mut fields = [""; 4];
        let mut count = 0;
        for (slot, f) in fields.iter_mut().zip(parts.by_ref()) {
            *slot = f;
            count += 1;
        }
        if count != 4 || parts.next().is_some() || !fields.iter().zip(keys).all(|(f, k)| f.starts_with(k)) {
            return Err(Error::parse(path, format!("unexpected line {line:?}")));
        }
        for (f, k) in fields.iter().zip(keys).take(3) {
            float(path, k, &f[k.len()..])?;
        }
        let total = &fields[3]["total=".len()..];
        let total: u64 = total.parse().map_err(|_| Error::parse(path, format!("total: not an integer: {total:?}")))?;
        *slot = Some(total as f64);
    }
    if some.is_none() {
        return Err(Error::parse(path, "no `some` line"));
    }
    Ok((some, full))
}

impl Collector for Pressure {
    fn name(&self) -> &'static str {
        "pressure"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let secs = |us: f64| us / 1000.0 / 1000.0;
        let dir = roots.proc.join("pressure");
        let (some, _) = psi(&dir.join("cpu"))?;
        if let Some(v) = some {
            out.add(
                "node_pressure_cpu_waiting_seconds_total",
                "Total time in seconds that processes have waited for CPU time",
                Kind::Counter,
                &[],
                secs(v),
            );
        }
        let (some, full) = psi(&dir.join("io"))?;
        if let Some(v) = some {
            out.add(
                "node_pressure_io_waiting_seconds_total",
                "Total time in seconds that processes have waited due to IO congestion",
                Kind::Counter,
                &[],
                secs(v),
            );
        }
        if let Some(v) = full {
            out.add(
                "node_pressure_io_stalled_seconds_total",
                "Total time in seconds no process could make progress due to IO congestion",
                Kind::Counter,
                &[],
                secs(v),
            );
        }
        let (some, full) = psi(&dir.join("memory"))?;
        if let Some(v) = some {
            out.add(
                "node_pressure_memory_waiting_seconds_total",
                "Total time in seconds that processes have waited for memory",
                Kind::Counter,
                &[],
                secs(v),
            );
        }
        if let Some(v) = full {
            out.add(
                "node_pressure_memory_stalled_seconds_total",
                "Total time in seconds no process could make progress due to memory congestion",
                Kind::Counter,
                &[],
                secs(v),
            );
        }
        Ok(())
    }
}

/// `node_nf_conntrack_entries`, `node_nf_conntrack_entries_limit` and the
/// per-CPU sums of `proc/net/stat/nf_conntrack` (`node_nf_conntrack_stat_*`).
pub struct Conntrack;

/// Column of `net/stat/nf_conntrack`, metric name, HELP.
const CONNTRACK_STATS: [(&str, &str, &str); 8] = [
    ("found", "node_nf_conntrack_stat_found", "Number of searched entries which were successful."),
    ("invalid", "node_nf_conntrack_stat_invalid", "Number of packets seen which can not be tracked."),
    ("ignore", "node_nf_conntrack_stat_ignore", "Number of packets seen which are already connected to a conntrack entry."),
    ("insert", "node_nf_conntrack_stat_insert", "Number of entries inserted into the list."),
    ("insert_failed", "node_nf_conntrack_stat_insert_failed", "Number of entries for which list insertion was attempted but failed."),
    ("drop", "node_nf_conntrack_stat_drop", "Number of packets dropped due to conntrack failure."),
    (
        "early_drop",
        "node_nf_conntrack_stat_early_drop",
        "Number of dropped conntrack entries to make room for new ones, if maximum table size was reached.",
    ),
    (
        "search_restart",
        "node_nf_conntrack_stat_search_restart",
        "Number of conntrack table lookups which had to be restarted due to hashtable resizes.",
    ),
];

impl Collector for Conntrack {
    fn name(&self) -> &'static str {
        "conntrack"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let dir = roots.proc.join("sys/net/netfilter");
        let count = first_number(&dir.join("nf_conntrack_count"))?;
        out.add(
            "node_nf_conntrack_entries",
            "Number of currently allocated flow entries for connection tracking.",
            Kind::Gauge,
            &[],
            count,
        );
        let max = first_number(&dir.join("nf_conntrack_max"))?;
        out.add("node_nf_conntrack_entries_limit", "Maximum size of connection tracking table.", Kind::Gauge, &[], max);

        let path = roots.proc.join("net/stat/nf_conntrack");
        let text = read_net(roots, &path, "stat/nf_conntrack")?;
        let mut lines = text.lines();
        let header = lines.next().unwrap_or("");
        let width = header.split_whitespace().count();
        let mut columns = [0usize; CONNTRACK_STATS.len()];
        for ((name, _, _), col) in CONNTRACK_STATS.iter().zip(&mut columns) {
            *col = header.split_whitespace().position(|h| h == *name).ok_or_else(|| Error::parse(&path, format!("no column {name}")))?;
        }
        let mut sums = [0u64; CONNTRACK_STATS.len()];
        for line in lines {
            let fields = line.split_whitespace().count();
            if fields == 0 {
                continue;
            }
            if fields != width {
                return Err(Error::parse(&path, format!("{fields} fields under {width} columns")));
            }
            // One per CPU; every field must be hex.
            for (i, f) in line.split_whitespace().enumerate() {
                let v = u64::from_str_radix(f, 16).map_err(|_| Error::parse(&path, format!("not hex: {f:?}")))?;
                for (sum, _) in sums.iter_mut().zip(&columns).filter(|(_, c)| **c == i) {
                    *sum = sum.wrapping_add(v);
                }
            }
        }
        for ((_, name, help), sum) in CONNTRACK_STATS.iter().zip(sums) {
            out.add(name, help, Kind::Gauge, &[], sum as f64);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::proc_tree as tree;

    #[test]
    fn cases() {
        let psi_ok = "some avg10=0.00 avg60=0.00 avg300=0.00 total=11379988\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        let ct_header = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n";
        let ct_row = "00000001  00000000 0000000a 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000  00000000 00000000 00000000 00000002\n";
        let good: Vec<(&str, String)> = vec![
            ("loadavg", "2.11 1.25 0.93 3/200 1234\n".into()),
            ("sys/fs/file-nr", "520\t0\t2466193\n".into()),
            ("sys/kernel/random/entropy_avail", "256\n".into()),
            ("sys/kernel/random/poolsize", "256\n".into()),
            ("pressure/cpu", psi_ok.into()),
            ("pressure/io", psi_ok.into()),
            ("pressure/memory", psi_ok.into()),
            ("sys/net/netfilter/nf_conntrack_count", "3\n".into()),
            ("sys/net/netfilter/nf_conntrack_max", "262144\n".into()),
            ("net/stat/nf_conntrack", format!("{ct_header}{ct_row}{ct_row}")),
        ];
        let collectors: [&dyn Collector; 5] = [&Loadavg, &Filefd, &Entropy, &Pressure, &Conntrack];
        let broken: [(&str, &str, &str); 10] = [
            ("loadavg garbage", "loadavg", "x y z\n"),
            ("loadavg short", "loadavg", "1.0\n"),
            ("file-nr two fields", "sys/fs/file-nr", "1 2\n"),
            ("entropy empty", "sys/kernel/random/entropy_avail", ""),
            ("psi without total", "pressure/io", "some avg10=0.00 avg60=0.00 avg300=0.00\n"),
            ("psi garbage total", "pressure/memory", "some avg10=0.00 avg60=0.00 avg300=0.00 total=zz\n"),
            ("conntrack count garbage", "sys/net/netfilter/nf_conntrack_count", "many\n"),
            (
                "conntrack stat not hex",
                "net/stat/nf_conntrack",
                "entries found invalid ignore insert insert_failed drop early_drop search_restart\nzz 0 0 0 0 0 0 0 0\n",
            ),
            (
                "conntrack stat short row",
                "net/stat/nf_conntrack",
                "entries found invalid ignore insert insert_failed drop early_drop search_restart\n1 2\n",
            ),
            ("conntrack stat no header", "net/stat/nf_conntrack", ""),
        ];
        let files: Vec<(&str, &str)> = good.iter().map(|(p, s)| (*p, s.as_str())).collect();
        let (_d, roots) = tree(&files);
        let mut set = MetricSet::default();
        for c in collectors {
            c.collect(&roots, &mut set).unwrap_or_else(|e| panic!("{}: {e}", c.name()));
        }
        for (name, want) in [
            ("node_load1", 2.11),
            ("node_filefd_maximum", 2466193.0),
            ("node_entropy_pool_size_bits", 256.0),
            ("node_pressure_io_waiting_seconds_total", 11.379987999999999),
            ("node_nf_conntrack_entries", 3.0),
            ("node_nf_conntrack_stat_found", 20.0),
            ("node_nf_conntrack_stat_search_restart", 4.0),
        ] {
            assert_eq!(set.value(name, &[]), Some(want), "{name}");
        }
        for (case, file, content) in broken {
            let mut files = files.clone();
            files.retain(|(p, _)| *p != file);
            files.push((file, content));
            let (_d, roots) = tree(&files);
            let failed: Vec<&str> =
                collectors.iter().filter(|c| c.collect(&roots, &mut MetricSet::default()).is_err()).map(|c| c.name()).collect();
            assert_eq!(failed.len(), 1, "{case}: exactly one collector fails, got {failed:?}");
        }
    }
}
