//! node_exporter's default include/exclude patterns are regular expressions;
//! the agent matches them with hand-written functions (no regex engine to
//! keep resident). Each function must agree with its pattern on every name
//! the fixtures and this host hold, and on edge cases and mutations of them.

mod common;

use kiln_agent::metrics::{diskstats, filesystem, memory, netdev, netstat};
use regex::Regex;

/// Real names, edge cases and mutations of them.
fn corpus() -> Vec<String> {
    let mut words: Vec<String> = [
        "",
        "lo",
        "lo0",
        "eth0",
        "sda",
        "sda1",
        "sdA1",
        "hda12",
        "vdb3",
        "xvda1",
        "xvd1",
        "xd1",
        "vd1",
        "sdz9x",
        "ram0",
        "ram",
        "loop12",
        "loop1a",
        "fd0",
        "nvme0n1",
        "nvme0n1p2",
        "nvmen1p2",
        "nvme0n1p",
        "nvme0np2",
        "nvme12n3p45",
        "dm-0",
        "sr0",
        "md127",
        "sda١",
        "/",
        "/dev",
        "/dev/",
        "/devices",
        "/dev/shm",
        "/proc",
        "/proc/sys",
        "/run",
        "/run/user/0",
        "/runx",
        "/sys",
        "/mnt",
        "/mnt2",
        "/media/usb",
        "/var/lib/docker",
        "/var/lib/docker/",
        "/var/lib/docker/x",
        "/var/lib/docker//",
        "/var/lib/docker/a/b",
        "/var/lib/docker/\n",
        "/var/lib/docker/a\nb",
        "/var/lib/docker/é/",
        "/var/lib/containers/storage/overlay",
        "/home",
        "dev",
        "/var/lib/docker/\n/",
        "/var/lib/docker/a\n/",
        "autofs",
        "cgroup",
        "cgroup2",
        "cgroup3",
        "ext4",
        "xfs",
        "tmpfs",
        "overlay",
        "overlayfs",
        "procfs",
        "proc",
        "sysfs\n",
        "oom_kill",
        "oom_killer",
        "pgpgin",
        "pswpout",
        "pgfault",
        "pgmajfault",
        "pg\nfault",
        "pgfaul",
        "nr_free_pages",
        "pgsteal",
        "Ip_Forwarding",
        "Ip6_InOctets",
        "IpExt_OutOctets",
        "Ip_InOctets",
        "Icmp_InErrors",
        "Icmp6_InMsgs",
        "Icmp7_InMsgs",
        "TcpExt_ListenDrops",
        "TcpExt_Listen",
        "TcpExt_SyncookiesSent",
        "TcpExt_TCPTimeouts",
        "TcpExt_TCPTimeoutsX",
        "Tcp_CurrEstab",
        "Tcp_InErrs",
        "Udp6_SndbufErrors",
        "Udp_NoPorts",
        "UdpLite_InErrors",
        "_InErrors",
        "a\n_InErrors",
        "TcpExt_Listen\n",
        "Udp6_InDatagrams",
        "Udp_InCsumErrors",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Every name in the fixtures' files and on this host.
    let fixtures = common::fixtures();
    for file in ["proc/diskstats", "proc/net/dev", "proc/vmstat", "proc/net/netstat", "proc/net/snmp", "proc/net/snmp6", "proc/1/mounts"] {
        for root in [fixtures.as_path(), std::path::Path::new("/")] {
            if let Ok(text) = std::fs::read_to_string(root.join(file)) {
                words.extend(text.split_whitespace().map(str::to_string));
                words.extend(text.split_whitespace().map(|w| w.trim_end_matches(':').to_string()));
            }
        }
    }
    // Prefixes of netstat names joined as the collector joins them.
    let base = words.clone();
    for w in &base {
        for p in ["Tcp_", "TcpExt_", "Udp6_", "Ip_", "/", "/var/lib/docker/"] {
            words.push(format!("{p}{w}"));
        }
        for cut in 0..w.len().min(12) {
            if w.is_char_boundary(cut) {
                words.push(w[..cut].to_string());
                words.push(format!("{}\n", &w[..cut]));
                words.push(format!("{}/", &w[..cut]));
                words.push(format!("{}1", &w[..cut]));
            }
        }
    }
    words
}

/// A hand-written matcher of one pattern.
type Matcher = fn(&str) -> bool;

#[test]
fn matchers_agree_with_the_patterns() {
    let cases: [(&str, &str, Matcher); 7] = [
        ("diskstats device exclude", diskstats::DISKSTATS_DEVICE_EXCLUDE, diskstats::device_excluded),
        ("mount points exclude", filesystem::MOUNT_POINTS_EXCLUDE, filesystem::mount_point_excluded),
        ("fs types exclude", filesystem::FS_TYPES_EXCLUDE, filesystem::fs_type_excluded),
        ("vmstat fields", memory::VMSTAT_FIELDS, memory::vmstat_field),
        ("netdev device exclude", netdev::NETDEV_DEVICE_EXCLUDE, netdev::netdev_excluded),
        ("netclass ignored devices", netdev::NETCLASS_IGNORED_DEVICES, netdev::netclass_ignored),
        ("netstat fields", netstat::NETSTAT_FIELDS, netstat::netstat_field),
    ];
    let words = corpus();
    for (what, pattern, matcher) in cases {
        // Go's regexp: `\d` is ASCII.
        let re = Regex::new(&pattern.replace(r"\d", "[0-9]")).unwrap();
        let mut matched = 0;
        for w in &words {
            assert_eq!(matcher(w), re.is_match(w), "{what}: {w:?}");
            matched += usize::from(re.is_match(w));
        }
        assert!(matched > 0, "{what}: the corpus has a match");
    }
}
