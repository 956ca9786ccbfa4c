//! The autoscaler's decisions, from the nodes' own metrics.
//!
//! A pool with an `[autoscale]` table has its replicas chosen from a metric
//! its nodes' agents export in node_exporter's names: `load1`
//! (`node_load1`) or `cpu_busy` (the share of CPU time not idle, from
//! `node_cpu_seconds_total` between two scrapes). The pool's mean over its
//! Ready nodes (heard from within the grace period; a NotReady node's
//! figures are stale) is compared with the policy's thresholds; a change of
//! `step` nodes (clamped to `min..=max`) is made at most once per
//! `cooldown-secs`. Every decision carries its reason, for the log and for
//! `--dry-run`.
//!
//! This module is pure: scraping is the caller's, so the rules are tested
//! on numbers.

use std::time::Duration;

use crate::spec::{Autoscale, Metric};

/// What the autoscaler decided for one pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The replicas now.
    pub from: u32,
    /// The replicas wanted (equal to `from` when holding).
    pub to: u32,
    /// Why, in words: the mean, the threshold, the nodes measured.
    pub reason: String,
}

/// CPU seconds of one node at one scrape: idle and all modes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CpuTimes {
    /// `node_cpu_seconds_total{mode="idle"}`, summed over CPUs.
    pub idle: f64,
    /// `node_cpu_seconds_total`, every mode, summed over CPUs.
    pub total: f64,
}

impl CpuTimes {
    /// Sums `node_cpu_seconds_total` in a text-format scrape.
    pub fn from_scrape(text: &str) -> Option<CpuTimes> {
        let mut t = CpuTimes::default();
        let mut seen = false;
        for line in text.lines().filter(|l| l.starts_with("node_cpu_seconds_total{")) {
            let Some((labels, value)) = line.rsplit_once(' ') else { continue };
            let Ok(v) = value.parse::<f64>() else { continue };
            seen = true;
            t.total += v;
            if labels.contains("mode=\"idle\"") {
                t.idle += v;
            }
        }
        seen.then_some(t)
    }

    /// The busy share (0–1) between `earlier` and `self`; `None` when no
    /// time passed (or the counters went back: the node restarted).
    pub fn busy_since(&self, earlier: &CpuTimes) -> Option<f64> {
        let total = self.total - earlier.total;
        let idle = self.idle - earlier.idle;
        (total > 0.0 && idle >= 0.0).then(|| (1.0 - idle / total).clamp(0.0, 1.0))
    }
}

/// `node_load1` in a text-format scrape.
pub fn load1_from_scrape(text: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix("node_load1 ")).and_then(|v| v.trim().parse().ok())
}

/// The metric's name as the reason spells it.
pub fn metric_name(m: Metric) -> &'static str {
    match m {
        Metric::CpuBusy => "cpu_busy",
        Metric::Load1 => "load1",
    }
}

/// Decides the replicas of a pool with `policy`, within `min..=max`, now
/// at `current`, from one sample per measured node; `since_change` is the
/// time since the pool's replicas last changed (`None`: never).
pub fn decide(policy: &Autoscale, min: u32, max: u32, current: u32, samples: &[f64], since_change: Option<Duration>) -> Decision {
    let hold = |reason: String| Decision { from: current, to: current, reason };
    let name = metric_name(policy.metric);
    if samples.is_empty() {
        return hold(format!("no {name} from any node yet"));
    }
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    let over = format!("mean {name} {mean:.2} over {} node{}", samples.len(), if samples.len() == 1 { "" } else { "s" });
    let (to, why) = if mean > policy.scale_up_above {
        (current.saturating_add(policy.step).min(max), format!("{over} > {}", policy.scale_up_above))
    } else if mean < policy.scale_down_below {
        (current.saturating_sub(policy.step).max(min), format!("{over} < {}", policy.scale_down_below))
    } else {
        return hold(format!("{over} within {}..{}", policy.scale_down_below, policy.scale_up_above));
    };
    if to == current {
        return hold(format!("{why}, but the pool is at its {}", if mean > policy.scale_up_above { "max" } else { "min" }));
    }
    let cooldown = Duration::from_secs(policy.cooldown_secs);
    if let Some(since) = since_change
        && since < cooldown
    {
        return hold(format!("{why}, but in cooldown ({}s of {}s)", since.as_secs(), policy.cooldown_secs));
    }
    Decision { from: current, to, reason: why }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(metric: Metric) -> Autoscale {
        Autoscale { metric, scale_up_above: 0.7, scale_down_below: 0.2, step: 2, cooldown_secs: 60 }
    }

    #[test]
    fn scales_up_and_down_within_bounds() {
        let p = policy(Metric::CpuBusy);
        let d = decide(&p, 1, 5, 2, &[0.9, 0.8], None);
        assert_eq!((d.from, d.to), (2, 4));
        assert_eq!(d.reason, "mean cpu_busy 0.85 over 2 nodes > 0.7");
        assert_eq!(decide(&p, 1, 5, 4, &[0.9], None).to, 5, "clamped to max");
        let d = decide(&p, 1, 5, 5, &[0.9], None);
        assert_eq!(d.to, 5);
        assert!(d.reason.ends_with("but the pool is at its max"), "{}", d.reason);
        assert_eq!(decide(&p, 1, 5, 4, &[0.1, 0.0], None).to, 2);
        assert_eq!(decide(&p, 1, 5, 2, &[0.1], None).to, 1, "clamped to min");
        let d = decide(&p, 1, 5, 3, &[0.5, 0.4], None);
        assert_eq!(d.to, 3);
        assert_eq!(d.reason, "mean cpu_busy 0.45 over 2 nodes within 0.2..0.7");
    }

    #[test]
    fn cooldown_and_no_data_hold() {
        let p = policy(Metric::Load1);
        let d = decide(&p, 0, 5, 2, &[3.0], Some(Duration::from_secs(10)));
        assert_eq!(d.to, 2);
        assert!(d.reason.contains("in cooldown (10s of 60s)"), "{}", d.reason);
        assert_eq!(decide(&p, 0, 5, 2, &[3.0], Some(Duration::from_secs(61))).to, 4);
        let d = decide(&p, 0, 5, 2, &[], None);
        assert_eq!((d.to, d.reason.as_str()), (2, "no load1 from any node yet"));
    }

    #[test]
    fn reads_node_exporter_names() {
        let a = "# HELP x\nnode_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} 90\nnode_cpu_seconds_total{cpu=\"0\",mode=\"user\"} 10\nnode_load1 0.42\n";
        let b = "node_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} 95\nnode_cpu_seconds_total{cpu=\"0\",mode=\"user\"} 25\n";
        let (ta, tb) = (CpuTimes::from_scrape(a).unwrap(), CpuTimes::from_scrape(b).unwrap());
        assert_eq!(ta, CpuTimes { idle: 90.0, total: 100.0 });
        assert_eq!(tb.busy_since(&ta), Some(0.75));
        assert_eq!(ta.busy_since(&tb), None, "counters going back (a restart) give nothing");
        assert_eq!(load1_from_scrape(a), Some(0.42));
        assert_eq!(load1_from_scrape("node_load15 1\n"), None);
        assert_eq!(CpuTimes::from_scrape("garbage"), None);
    }
}
