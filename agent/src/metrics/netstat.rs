//! Protocol counters: the `netstat` collector (`proc/net/netstat`,
//! `proc/net/snmp`, `proc/net/snmp6`, filtered by node_exporter's default
//! fields) and the `sockstat` collector (`proc/net/sockstat{,6}`).

use std::path::Path;

use super::{Collector, Error, Kind, MetricSet, Roots, float, read_net};

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

/// The separator of `net/netstat` and `net/snmp` fields, one space; a
/// predicate rather than a `char` pattern, which calls `memchr` per field.
fn is_space(c: char) -> bool {
    c == ' '
}

/// One protocol's `Proto: names...` and `Proto: values...` lines, after the protocol.
struct Section<'a> {
    protocol: &'a str,
    /// What follows the protocol and a space; `None` when nothing does.
    names: Option<&'a str>,
    values: Option<&'a str>,
}

/// Pairs of lines, `Proto: names...` then `Proto: values...`; a protocol
/// seen again replaces the earlier one, as node_exporter's map does.
fn pairs<'a>(path: &Path, text: &'a str, sections: &mut Vec<Section<'a>>) -> Result<(), Error> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    while let Some(names) = lines.next() {
        let values = lines.next().ok_or_else(|| Error::parse(path, format!("no values under {names:?}")))?;
        let split = |line: &'a str| line.split_once(is_space).map_or((line, None), |(head, rest)| (head, Some(rest)));
        let ((head, names), (value_head, values)) = (split(names), split(values));
        let protocol = head.strip_suffix(':').ok_or_else(|| Error::parse(path, format!("no protocol in {head:?}")))?;
        let count = |rest: Option<&str>| rest.map_or(0, |r| r.split(is_space).count());
        if value_head != head || count(names) != count(values) {
            return Err(Error::parse(path, format!("field count mismatch for {protocol}")));
        }
        sections.retain(|s| s.protocol != protocol);
        sections.push(Section { protocol, names, values });
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
        let netstat = read_net(roots, &netstat_path, "netstat")?;
        let snmp = read_net(roots, &snmp_path, "snmp")?;
        let snmp6 = match read_net(roots, &snmp6_path, "snmp6") {
            Ok(t) => Some(t),
            // No IPv6 in this kernel.
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let snmp6: &str = snmp6.as_deref().unwrap_or("");
        let mut sections = Vec::with_capacity(16);
        pairs(&netstat_path, &netstat, &mut sections)?;
        pairs(&snmp_path, &snmp, &mut sections)?;
        // snmp6: `Ip6InReceives 123` is protocol `Ip6`, field `InReceives`;
        // grouped by protocol, in file order within each.
        let mut six: Vec<(&str, &str, &str)> = snmp6
            .lines()
            .filter_map(|line| {
                let mut f = line.split_whitespace();
                let (key, value) = (f.next()?, f.next()?);
                let at = key.find('6')?;
                Some((&key[..=at], &key[at + 1..], value))
            })
            .collect();
        six.sort_by_key(|(protocol, _, _)| *protocol);
        // Protocols in name order, each with its fields in file order (snmp6's after the others).
        let mut protocols: Vec<&str> = sections.iter().map(|s| s.protocol).collect();
        protocols.extend(six.iter().map(|(p, _, _)| *p));
        protocols.sort_unstable();
        protocols.dedup();
        let (mut key, mut name, mut help) = (String::with_capacity(64), String::with_capacity(64), String::with_capacity(64));
        for protocol in protocols {
            let section = sections.iter().find(|s| s.protocol == protocol);
            let listed = section.and_then(|s| Some(s.names?.split(is_space).zip(s.values?.split(is_space)))).into_iter().flatten();
            let from = six.partition_point(|(p, _, _)| *p < protocol);
            let to = six.partition_point(|(p, _, _)| *p <= protocol);
            for (field, value) in listed.chain(six[from..to].iter().map(|(_, n, v)| (*n, *v))) {
                key.clear();
                key.push_str(protocol);
                key.push('_');
                key.push_str(field);
                let v = float(&snmp_path, &key, value)?;
                if !netstat_field(&key) {
                    continue;
                }
                name.clear();
                name.push_str("node_netstat_");
                name.push_str(&key);
                help.clear();
                help.push_str("Statistic ");
                help.push_str(protocol);
                help.push_str(field);
                help.push('.');
                out.add_dynamic(&name, &help, Kind::Untyped, &[], v);
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
    let (mut name, mut help) = (String::with_capacity(48), String::with_capacity(64));
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let Some(first) = f.next() else { continue };
        let protocol = first.strip_suffix(':').ok_or_else(|| Error::parse(path, format!("no protocol in {line:?}")))?;
        if !(line.split_whitespace().count() - 1).is_multiple_of(2) {
            return Err(Error::parse(path, format!("odd number of fields in {line:?}")));
        }
        if protocol == "sockets" {
            while let (Some(key), Some(value)) = (f.next(), f.next()) {
                if key == "used" {
                    let v = float(path, "used", value)?;
                    out.add("node_sockstat_sockets_used", "Number of IPv4 sockets in use.", Kind::Gauge, &[], v);
                }
            }
            continue;
        }
        while let (Some(state), Some(value)) = (f.next(), f.next()) {
            let v: i64 = value.parse().map_err(|_| Error::parse(path, format!("{protocol} {state}: not an integer: {value:?}")))?;
            if !["inuse", "orphan", "tw", "alloc", "mem", "memory"].contains(&state) {
                continue;
            }
            let mut add = |state: &str, v: f64| {
                name.clear();
                name.push_str("node_sockstat_");
                name.push_str(protocol);
                name.push('_');
                name.push_str(state);
                help.clear();
                help.push_str("Number of ");
                help.push_str(protocol);
                help.push_str(" sockets in state ");
                help.push_str(state);
                help.push('.');
                out.add_dynamic(&name, &help, Kind::Gauge, &[], v);
            };
            add(state, v as f64);
            if state == "mem" {
                add("mem_bytes", v as f64 * page_size());
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
        for (file, required) in [("sockstat", true), ("sockstat6", false)] {
            let path = roots.proc.join("net").join(file);
            match read_net(roots, &path, file) {
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
