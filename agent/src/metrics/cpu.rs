//! `proc/stat`: the `cpu` collector (seconds per CPU and mode) and the `stat`
//! collector (boot time, context switches, forks, interrupts, processes).

use super::{Collector, Error, Kind, MetricSet, Roots, float, read};

/// The kernel's `USER_HZ`: `proc/stat` counts CPU time in 1/100 s.
const USER_HZ: f64 = 100.0;

const MODES: [&str; 8] = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"];

/// `node_cpu_seconds_total{cpu,mode}` and `node_cpu_guest_seconds_total{cpu,mode}`.
pub struct Cpu;

impl Collector for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let path = roots.proc.join("stat");
        let text = read(&path)?;
        let mut seen = false;
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let Some(cpu) = f.next().and_then(|c| c.strip_prefix("cpu")) else { continue };
            if cpu.is_empty() {
                continue; // the "cpu" total line
            }
            if cpu.parse::<u32>().is_err() {
                return Err(Error::parse(&path, format!("bad CPU line {line:?}")));
            }
            // user nice system idle iowait irq softirq steal guest guest_nice; all must be numbers.
            let mut values = [0.0f64; 10];
            let mut count = 0;
            for v in f {
                let v = float(&path, "cpu time", v)? / USER_HZ;
                if let Some(slot) = values.get_mut(count) {
                    *slot = v;
                }
                count += 1;
            }
            if count < 4 {
                return Err(Error::parse(&path, format!("short CPU line {line:?}")));
            }
            seen = true;
            for (mode, v) in MODES.iter().zip(&values[..count.min(MODES.len())]) {
                out.add(
                    "node_cpu_seconds_total",
                    "Seconds the CPUs spent in each mode.",
                    Kind::Counter,
                    &[("cpu", cpu), ("mode", mode)],
                    *v,
                );
            }
            for (mode, i) in [("user", 8), ("nice", 9)] {
                out.add(
                    "node_cpu_guest_seconds_total",
                    "Seconds the CPUs spent in guests (VMs) for each mode.",
                    Kind::Counter,
                    &[("cpu", cpu), ("mode", mode)],
                    if i < count { values[i] } else { 0.0 },
                );
            }
        }
        if !seen {
            return Err(Error::parse(&path, "no cpuN lines"));
        }
        Ok(())
    }
}

/// `node_boot_time_seconds`, `node_context_switches_total`, `node_forks_total`,
/// `node_intr_total`, `node_procs_running`, `node_procs_blocked`.
pub struct Stat;

impl Collector for Stat {
    fn name(&self) -> &'static str {
        "stat"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let path = roots.proc.join("stat");
        let text = read(&path)?;
        // The first line of each key, as node_exporter takes it: key, value, maybe more.
        const KEYS: [&str; 6] = ["intr", "ctxt", "btime", "processes", "procs_running", "procs_blocked"];
        let mut lines: [Option<Option<&str>>; 6] = [None; 6];
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let Some(key) = words.next() else { continue };
            if let Some(i) = KEYS.iter().position(|k| *k == key)
                && lines[i].is_none()
            {
                lines[i] = Some(words.next());
            }
        }
        let mut values = [0.0; 6];
        for ((key, line), v) in KEYS.iter().zip(lines).zip(&mut values) {
            let line = line.ok_or_else(|| Error::parse(&path, format!("no {key} line")))?;
            let text = line.ok_or_else(|| Error::parse(&path, format!("no value on the {key} line")))?;
            *v = float(&path, key, text)?;
        }
        let [intr, ctxt, btime, forks, running, blocked] = values;
        out.add("node_intr_total", "Total number of interrupts serviced.", Kind::Counter, &[], intr);
        out.add("node_context_switches_total", "Total number of context switches.", Kind::Counter, &[], ctxt);
        out.add("node_forks_total", "Total number of forks.", Kind::Counter, &[], forks);
        out.add("node_boot_time_seconds", "Node boot time, in unixtime.", Kind::Gauge, &[], btime);
        out.add("node_procs_running", "Number of processes in runnable state.", Kind::Gauge, &[], running);
        out.add("node_procs_blocked", "Number of processes blocked waiting for I/O to complete.", Kind::Gauge, &[], blocked);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(stat: &str) -> (tempfile::TempDir, Roots) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stat"), stat).unwrap();
        let roots = Roots { proc: dir.path().into(), ..Roots::default() };
        (dir, roots)
    }

    #[test]
    fn cases() {
        let good = "cpu  10 0 0 0 0 0 0 0 0 0\ncpu0 119242 5 6 7 8 9 10 11 12 13\nintr 927208 1 2\nctxt 1098440\nbtime 1795491009\nprocesses 23291\nprocs_running 3\nprocs_blocked 0\n";
        for (case, text, cpu_ok, stat_ok) in [
            ("real layout", good, true, true),
            ("garbage", "\u{1}\u{2}zz\n", false, false),
            ("empty", "", false, false),
            (
                "cpu value not a number",
                "cpu0 a b c d\nintr 1\nctxt 1\nbtime 1\nprocesses 1\nprocs_running 1\nprocs_blocked 1\n",
                false,
                true,
            ),
            ("missing btime", "cpu0 1 2 3 4\nintr 1\nctxt 1\nprocesses 1\nprocs_running 1\nprocs_blocked 1\n", true, false),
        ] {
            let (_d, r) = roots(text);
            assert_eq!(Cpu.collect(&r, &mut MetricSet::default()).is_ok(), cpu_ok, "cpu: {case}");
            assert_eq!(Stat.collect(&r, &mut MetricSet::default()).is_ok(), stat_ok, "stat: {case}");
        }
        let (_d, r) = roots(good);
        let mut set = MetricSet::default();
        Cpu.collect(&r, &mut set).unwrap();
        Stat.collect(&r, &mut set).unwrap();
        assert_eq!(set.value("node_cpu_seconds_total", &[("cpu", "0"), ("mode", "user")]), Some(1192.42), "user seconds");
        assert_eq!(set.value("node_cpu_guest_seconds_total", &[("cpu", "0"), ("mode", "nice")]), Some(0.13), "guest nice");
        assert_eq!(set.value("node_boot_time_seconds", &[]), Some(1795491009.0), "boot time");
    }
}
