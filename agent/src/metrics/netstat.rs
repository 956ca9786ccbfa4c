//! Protocol counters: the `netstat` collector (`proc/net/netstat`,
//! `proc/net/snmp`, `proc/net/snmp6`, filtered by node_exporter's default
//! fields) and the `sockstat` collector (`proc/net/sockstat{,6}`).

use std::collections::BTreeMap;
use std::path::Path;

use super::{Collector, Error, Kind, MetricSet, Roots, float, read};

/// node_exporter 1.5.0's default `--collector.netstat.fields`.
pub const NETSTAT_FIELDS: &str = "^(.*_(InErrors|InErrs)|Ip_Forwarding|Ip(6|Ext)_(InOctets|OutOctets)|Icmp6?_(InMsgs|OutMsgs)|TcpExt_(Listen.*|Syncookies.*|TCPSynRetrans|TCPTimeouts)|Tcp_(ActiveOpens|InSegs|OutSegs|OutRsts|PassiveOpens|RetransSegs|CurrEstab)|Udp6?_(InDatagrams|OutDatagrams|NoPorts|RcvbufErrors|SndbufErrors))$";

/// `node_netstat_<Protocol>_<Field>` (untyped), for the fields matching the pattern.
#[derive(Default)]
pub struct Netstat;

/// Whether [`NETSTAT_FIELDS`] matches `key` (`Protocol_Field`).
pub fn netstat_field(key: &str) -> bool {
    if key.contains('\n') {
        return false;
    }
    const EXACT: [&str; 28] = [
        "Ip_Forwarding",
        "Ip6_InOctets",
        "Ip6_OutOctets",
        "IpExt_InOctets",
        "IpExt_OutOctets",
        "Icmp_InMsgs",
        "Icmp_OutMsgs",
        "Icmp6_InMsgs",
        "Icmp6_OutMsgs",
        "TcpExt_TCPSynRetrans",
        "TcpExt_TCPTimeouts",
        "Tcp_ActiveOpens",
        "Tcp_InSegs",
        "Tcp_OutSegs",
        "Tcp_OutRsts",
        "Tcp_PassiveOpens",
        "Tcp_RetransSegs",
        "Tcp_CurrEstab",
        "Udp_InDatagrams",
        "Udp_OutDatagrams",
        "Udp_NoPorts",
        "Udp_RcvbufErrors",
        "Udp_SndbufErrors",
        "Udp6_InDatagrams",
        "Udp6_OutDatagrams",
        "Udp6_NoPorts",
        "Udp6_RcvbufErrors",
        "Udp6_SndbufErrors",
    ];
    key.ends_with("_InErrors")
        || key.ends_with("_InErrs")
        || EXACT.contains(&key)
        || key.starts_with("TcpExt_Listen")
        || key.starts_with("TcpExt_Syncookies")
}

type Stats<'a> = BTreeMap<&'a str, Vec<(&'a str, &'a str)>>;

/// Pairs of lines, `Proto: names...` then `Proto: values...`.
fn pairs<'a>(path: &Path, text: &'a str, stats: &mut Stats<'a>) -> Result<(), Error> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    while let Some(names) = lines.next() {
        let values = lines.next().ok_or_else(|| Error::parse(path, format!("no values under {names:?}")))?;
        let names: Vec<&str> = names.split(' ').collect();
        let values: Vec<&str> = values.split(' ').collect();
        let protocol = names[0].strip_suffix(':').ok_or_else(|| Error::parse(path, format!("no protocol in {:?}", names[0])))?;
        if values[0] != names[0] || names.len() != values.len() {
            return Err(Error::parse(path, format!("field count mismatch for {protocol}")));
        }
        stats.insert(protocol, names[1..].iter().copied().zip(values[1..].iter().copied()).collect());
    }
    Ok(())
}

impl Collector for Netstat {
    fn name(&self) -> &'static str {
        "netstat"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let netstat_path = roots.proc.join("net/netstat");
        let snmp_path = roots.proc.join("net/snmp");
        let snmp6_path = roots.proc.join("net/snmp6");
        let netstat = read(&netstat_path)?;
        let snmp = read(&snmp_path)?;
        let snmp6 = match read(&snmp6_path) {
            Ok(t) => t,
            // No IPv6 in this kernel.
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut stats = Stats::new();
        pairs(&netstat_path, &netstat, &mut stats)?;
        pairs(&snmp_path, &snmp, &mut stats)?;
        for line in snmp6.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 2 {
                continue;
            }
            if let Some(six) = f[0].find('6') {
                stats.entry(&f[0][..=six]).or_default().push((&f[0][six + 1..], f[1]));
            }
        }
        for (protocol, fields) in &stats {
            for (name, value) in fields {
                let key = format!("{protocol}_{name}");
                let v = float(&snmp_path, &key, value)?;
                if !netstat_field(&key) {
                    continue;
                }
                out.add(&format!("node_netstat_{key}"), &format!("Statistic {protocol}{name}."), Kind::Untyped, &[], v);
            }
        }
        Ok(())
    }
}

/// `node_sockstat_sockets_used` and `node_sockstat_<PROTO>_<state>` (plus `_mem_bytes`).
pub struct Sockstat;

fn page_size() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as f64
}

fn sockstat(path: &Path, text: &str, out: &mut MetricSet) -> Result<(), Error> {
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        let protocol = f[0].strip_suffix(':').ok_or_else(|| Error::parse(path, format!("no protocol in {line:?}")))?;
        let kv = &f[1..];
        if !kv.len().is_multiple_of(2) {
            return Err(Error::parse(path, format!("odd number of fields in {line:?}")));
        }
        if protocol == "sockets" {
            for pair in kv.chunks(2) {
                if pair[0] == "used" {
                    let v = float(path, "used", pair[1])?;
                    out.add("node_sockstat_sockets_used", "Number of IPv4 sockets in use.", Kind::Gauge, &[], v);
                }
            }
            continue;
        }
        for pair in kv.chunks(2) {
            let v: i64 =
                pair[1].parse().map_err(|_| Error::parse(path, format!("{protocol} {}: not an integer: {:?}", pair[0], pair[1])))?;
            if !["inuse", "orphan", "tw", "alloc", "mem", "memory"].contains(&pair[0]) {
                continue;
            }
            let state = pair[0];
            out.add(
                &format!("node_sockstat_{protocol}_{state}"),
                &format!("Number of {protocol} sockets in state {state}."),
                Kind::Gauge,
                &[],
                v as f64,
            );
            if state == "mem" {
                out.add(
                    &format!("node_sockstat_{protocol}_mem_bytes"),
                    &format!("Number of {protocol} sockets in state mem_bytes."),
                    Kind::Gauge,
                    &[],
                    v as f64 * page_size(),
                );
            }
        }
    }
    Ok(())
}

impl Collector for Sockstat {
    fn name(&self) -> &'static str {
        "sockstat"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        for (file, required) in [("net/sockstat", true), ("net/sockstat6", false)] {
            let path = roots.proc.join(file);
            match read(&path) {
                Ok(text) => sockstat(&path, &text, out)?,
                Err(Error::Io { source, .. }) if !required && source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::proc_tree as tree;

    #[test]
    fn netstat_cases() {
        let netstat = "TcpExt: SyncookiesSent ListenDrops Other\nTcpExt: 1 2 3\nIpExt: InOctets OutOctets\nIpExt: 10 20\n";
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoMin MaxConn InSegs\nTcp: 200 -1 12280\n";
        let snmp6 = "Ip6InOctets                     	100\nIcmp6InMsgs 5\nUdpLite6InErrors 0\n";
        for (case, files, ok) in [
            ("real layout", vec![("net/netstat", netstat), ("net/snmp", snmp), ("net/snmp6", snmp6)], true),
            ("no snmp6 (IPv6 off)", vec![("net/netstat", netstat), ("net/snmp", snmp)], true),
            ("mismatched counts", vec![("net/netstat", "TcpExt: A B\nTcpExt: 1\n"), ("net/snmp", snmp)], false),
            ("values line missing", vec![("net/netstat", "TcpExt: A B\n"), ("net/snmp", snmp)], false),
            ("garbage value", vec![("net/netstat", "TcpExt: A B\nTcpExt: 1 zz\n"), ("net/snmp", snmp)], false),
            ("snmp missing", vec![("net/netstat", netstat)], false),
        ] {
            let (_d, roots) = tree(&files);
            let mut set = MetricSet::default();
            assert_eq!(Netstat.collect(&roots, &mut set).is_ok(), ok, "{case}");
            if ok {
                assert_eq!(set.value("node_netstat_TcpExt_ListenDrops", &[]), Some(2.0), "{case}");
                assert_eq!(set.value("node_netstat_Tcp_InSegs", &[]), Some(12280.0), "{case}");
                assert_eq!(set.value("node_netstat_Ip_Forwarding", &[]), Some(1.0), "{case}");
                assert!(!set.contains("node_netstat_TcpExt_Other"), "{case}: field outside the pattern");
            }
        }
    }

    #[test]
    fn sockstat_cases() {
        let v4 = "sockets: used 16\nTCP: inuse 4 orphan 0 tw 0 alloc 4 mem 2\nUDP: inuse 0 mem 0\nFRAG: inuse 0 memory 0\n";
        for (case, files, ok) in [
            ("real layout", vec![("net/sockstat", v4), ("net/sockstat6", "TCP6: inuse 3\n")], true),
            ("odd fields", vec![("net/sockstat", "TCP: inuse\n")], false),
            ("garbage", vec![("net/sockstat", "TCP: inuse many\n")], false),
            ("missing", vec![], false),
        ] {
            let (_d, roots) = tree(&files);
            let mut set = MetricSet::default();
            assert_eq!(Sockstat.collect(&roots, &mut set).is_ok(), ok, "{case}");
            if ok {
                assert_eq!(set.value("node_sockstat_sockets_used", &[]), Some(16.0), "{case}");
                assert_eq!(set.value("node_sockstat_TCP_mem_bytes", &[]), Some(2.0 * page_size()), "{case}");
                assert_eq!(set.value("node_sockstat_TCP6_inuse", &[]), Some(3.0), "{case}");
                assert_eq!(set.value("node_sockstat_FRAG_memory", &[]), Some(0.0), "{case}");
            }
        }
    }
}
