//! `proc/meminfo` (the `meminfo` collector: `node_memory_*`) and `proc/vmstat`
//! (the `vmstat` collector: `node_vmstat_*`, the fields node_exporter keeps by default).

use super::{Collector, Error, Kind, MetricSet, Roots, float, read};

/// `node_memory_<Field>[_bytes]`: every line of `proc/meminfo`; fields in kB
/// become bytes with a `_bytes` suffix, `(x)` becomes `_x`.
pub struct Meminfo;

impl Collector for Meminfo {
    fn name(&self) -> &'static str {
        "meminfo"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let path = roots.proc.join("meminfo");
        let text = read(&path)?;
        let mut any = false;
        // Name and HELP are built in these for each line.
        let (mut name, mut help) = (String::with_capacity(64), String::with_capacity(64));
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let Some(first) = parts.next() else { continue };
            let Some(key) = first.strip_suffix(':') else {
                return Err(Error::parse(&path, format!("no ':' after the field in {line:?}")));
            };
            let number = parts.next();
            let value = float(&path, key, number.unwrap_or(""))?;
            let (suffix, value) = match (parts.next(), parts.next()) {
                (None, _) => ("", value),
                (Some(_kb), None) => ("_bytes", value * 1024.0),
                _ => return Err(Error::parse(&path, format!("invalid line {line:?}"))),
            };
            name.clear();
            name.push_str("node_memory_");
            for c in key.chars() {
                match c {
                    '(' => name.push('_'),
                    ')' => {}
                    c => name.push(c),
                }
            }
            name.push_str(suffix);
            help.clear();
            help.push_str("Memory information field ");
            help.push_str(&name["node_memory_".len()..]);
            help.push('.');
            out.add_dynamic(&name, &help, Kind::Gauge, &[], value);
            any = true;
        }
        if !any {
            return Err(Error::parse(&path, "no fields"));
        }
        Ok(())
    }
}

/// `node_vmstat_<field>` for the fields matching node_exporter's default
/// `--collector.vmstat.fields`.
#[derive(Default)]
pub struct Vmstat;

/// node_exporter 1.5.0's default `--collector.vmstat.fields`.
pub const VMSTAT_FIELDS: &str = "^(oom_kill|pgpg|pswp|pg.*fault).*";

/// Whether [`VMSTAT_FIELDS`] matches `field` (`.` stops at a newline).
pub fn vmstat_field(field: &str) -> bool {
    let line = field.split('\n').next().unwrap_or("");
    ["oom_kill", "pgpg", "pswp"].iter().any(|p| field.starts_with(p)) || line.strip_prefix("pg").is_some_and(|r| r.contains("fault"))
}

impl Collector for Vmstat {
    fn name(&self) -> &'static str {
        "vmstat"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let path = roots.proc.join("vmstat");
        let text = read(&path)?;
        let (mut name, mut help) = (String::with_capacity(64), String::with_capacity(64));
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let Some(field) = parts.next() else { continue };
            let (Some(number), None) = (parts.next(), parts.next()) else {
                return Err(Error::parse(&path, format!("invalid line {line:?}")));
            };
            let value = float(&path, field, number)?;
            if !vmstat_field(field) {
                continue;
            }
            name.clear();
            name.push_str("node_vmstat_");
            name.push_str(field);
            help.clear();
            help.push_str("/proc/vmstat information field ");
            help.push_str(field);
            help.push('.');
            out.add_dynamic(&name, &help, Kind::Untyped, &[], value);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases() {
        for (case, meminfo, vmstat, ok) in [
            ("real layout", "MemTotal:  10 kB\nHugePages_Total: 0\nActive(anon): 1 kB\n", "pgfault 5\nnr_free_pages 3\n", true),
            ("garbage", "\u{0}\u{7f}", "zz", false),
            ("value missing", "MemTotal:\n", "pgfault\n", false),
            ("value not a number", "MemTotal: x kB\n", "pgfault x\n", false),
        ] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("meminfo"), meminfo).unwrap();
            std::fs::write(dir.path().join("vmstat"), vmstat).unwrap();
            let roots = Roots { proc: dir.path().into(), ..Roots::default() };
            let mut set = MetricSet::default();
            assert_eq!(Meminfo.collect(&roots, &mut set).is_ok(), ok, "meminfo: {case}");
            assert_eq!(Vmstat.collect(&roots, &mut set).is_ok(), ok, "vmstat: {case}");
            if ok {
                assert_eq!(set.value("node_memory_MemTotal_bytes", &[]), Some(10240.0), "{case}");
                assert_eq!(set.value("node_memory_HugePages_Total", &[]), Some(0.0), "{case}");
                assert_eq!(set.value("node_memory_Active_anon_bytes", &[]), Some(1024.0), "{case}");
                assert_eq!(set.value("node_vmstat_pgfault", &[]), Some(5.0), "{case}");
                assert!(!set.contains("node_vmstat_nr_free_pages"), "{case}: field outside the default pattern");
            }
        }
    }
}
