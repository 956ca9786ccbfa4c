//! What the system is and what time it thinks it is: the `uname` collector
//! (`uname(2)`), `os` (`etc/os-release` below the root filesystem) and
//! `time` (clock, local zone from `etc/localtime`, clocksources in sysfs).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Collector, Error, Kind, MetricSet, Roots, read};

/// `node_uname_info{sysname,release,version,machine,nodename,domainname}`.
pub struct Uname;

impl Collector for Uname {
    fn name(&self) -> &'static str {
        "uname"
    }

    fn collect(&self, _roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let u = nix::sys::utsname::uname().map_err(|e| Error::Io { path: "uname(2)".into(), source: e.into() })?;
        fn s(o: &std::ffi::OsStr) -> std::borrow::Cow<'_, str> {
            o.to_string_lossy()
        }
        out.add(
            "node_uname_info",
            "Labeled system information as provided by the uname system call.",
            Kind::Gauge,
            &[
                ("sysname", &s(u.sysname())),
                ("release", &s(u.release())),
                ("version", &s(u.version())),
                ("machine", &s(u.machine())),
                ("nodename", &s(u.nodename())),
                ("domainname", &s(u.domainname())),
            ],
            1.0,
        );
        Ok(())
    }
}

/// `node_os_info{...}` and `node_os_version{id,id_like,name}` from os-release.
pub struct Os;

/// Parses os-release: `KEY=value`, values optionally quoted, `\` escapes in double quotes.
pub fn parse_os_release(text: &str) -> HashMap<String, String> {
    os_release(text).map(|(k, v)| (k.to_string(), v.into_owned())).collect()
}

/// The `KEY=value` pairs of os-release in order, values unquoted (borrowed unless unescaped).
fn os_release(text: &str) -> impl Iterator<Item = (&str, Cow<'_, str>)> {
    text.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let (k, v) = line.split_once('=')?;
        let v = v.trim();
        let value = if let Some(inner) = v.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
            if inner.contains('\\') {
                let mut s = String::new();
                let mut chars = inner.chars();
                while let Some(c) = chars.next() {
                    if c == '\\' {
                        if let Some(n) = chars.next() {
                            s.push(n);
                        }
                    } else {
                        s.push(c);
                    }
                }
                Cow::Owned(s)
            } else {
                Cow::Borrowed(inner)
            }
        } else if let Some(inner) = v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')) {
            Cow::Borrowed(inner)
        } else {
            Cow::Borrowed(v)
        };
        Some((k.trim(), value))
    })
}

/// The leading `major[.minor]` of `VERSION_ID`, as node_exporter's `^[0-9]+\.?[0-9]*`.
fn major_minor(version_id: &str) -> Option<f64> {
    let int_len = version_id.bytes().take_while(u8::is_ascii_digit).count();
    if int_len == 0 {
        return None;
    }
    let rest = &version_id[int_len..];
    let len = match rest.strip_prefix('.') {
        Some(frac) => int_len + 1 + frac.bytes().take_while(u8::is_ascii_digit).count(),
        None => int_len,
    };
    version_id[..len].trim_end_matches('.').parse().ok()
}

impl Collector for Os {
    fn name(&self) -> &'static str {
        "os"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let first = roots.rootfs.join("etc/os-release");
        let text = match read(&first) {
            Ok(t) => t,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                read(&roots.rootfs.join("usr/lib/os-release"))?
            }
            Err(e) => return Err(e),
        };
        let keys = [
            ("build_id", "BUILD_ID"),
            ("id", "ID"),
            ("id_like", "ID_LIKE"),
            ("image_id", "IMAGE_ID"),
            ("image_version", "IMAGE_VERSION"),
            ("name", "NAME"),
            ("pretty_name", "PRETTY_NAME"),
            ("variant", "VARIANT"),
            ("variant_id", "VARIANT_ID"),
            ("version", "VERSION"),
            ("version_codename", "VERSION_CODENAME"),
            ("version_id", "VERSION_ID"),
        ];
        // The last line of a key wins, as in a map.
        let mut values: [Cow<'_, str>; 12] = Default::default();
        for (k, v) in os_release(&text) {
            if let Some(i) = keys.iter().position(|(_, key)| *key == k) {
                values[i] = v;
            }
        }
        let get = |k: &str| keys.iter().position(|(_, key)| *key == k).map_or("", |i| values[i].as_ref());
        let mut labels = [("", ""); 12];
        for ((label, slot), value) in keys.iter().map(|(l, _)| *l).zip(&mut labels).zip(&values) {
            *slot = (label, value.as_ref());
        }
        out.add(
            "node_os_info",
            "A metric with a constant '1' value labeled by build_id, id, id_like, image_id, image_version, name, pretty_name, variant, variant_id, version, version_codename, version_id.",
            Kind::Gauge,
            &labels,
            1.0,
        );
        if let Some(v) = major_minor(get("VERSION_ID")).filter(|v| *v > 0.0) {
            out.add(
                "node_os_version",
                "Metric containing the major.minor part of the OS version.",
                Kind::Gauge,
                &[("id", get("ID")), ("id_like", get("ID_LIKE")), ("name", get("NAME"))],
                v,
            );
        }
        Ok(())
    }
}

/// `node_time_seconds`, `node_time_zone_offset_seconds{time_zone}`,
/// `node_time_clocksource_{available,current}_info{clocksource,device}`.
#[derive(Default)]
pub struct Time {
    /// The local zone's TZif data (`None`: UTC) and the root it was read
    /// below: read once, as node_exporter's Go runtime loads it once.
    zone: Mutex<Option<(PathBuf, Option<Vec<u8>>)>>,
}

/// The zone in effect at `now` (Unix seconds) from TZif data: its abbreviation and UTC offset.
pub fn zone_at(tzif: &[u8], now: i64) -> Option<(String, i64)> {
    fn be(b: &[u8], at: usize, n: usize) -> Option<i64> {
        let s = b.get(at..at + n)?;
        Some(match n {
            4 => i32::from_be_bytes(s.try_into().ok()?) as i64,
            8 => i64::from_be_bytes(s.try_into().ok()?),
            _ => return None,
        })
    }
    if tzif.get(..4)? != b"TZif" {
        return None;
    }
    let counts = |at: usize| -> Option<[usize; 6]> {
        let mut c = [0usize; 6];
        for (i, v) in c.iter_mut().enumerate() {
            *v = usize::try_from(be(tzif, at + 20 + 4 * i, 4)?).ok()?;
        }
        Some(c)
    };
    let [isut, isstd, leap, timecnt, typecnt, charcnt] = counts(0)?;
    let v1_len = 44 + timecnt * 5 + typecnt * 6 + charcnt + leap * 8 + isstd + isut;
    // Version 2+ repeats the data with 64-bit times, then a POSIX TZ footer.
    let (base, tsize, [_, _, leap, timecnt, typecnt, charcnt]) =
        if tzif[4] >= b'2' { (v1_len, 8, counts(v1_len)?) } else { (0, 4, [isut, isstd, leap, timecnt, typecnt, charcnt]) };
    let times = base + 44;
    let idx = times + timecnt * tsize;
    let types = idx + timecnt;
    let chars = types + typecnt * 6;
    let end = chars + charcnt + leap * (tsize + 4) + isstd + isut;
    if typecnt == 0 {
        return None;
    }
    let ttinfo = |t: usize| -> Option<(String, i64)> {
        let at = types + t * 6;
        let off = be(tzif, at, 4)?;
        let ci = chars + *tzif.get(at + 5)? as usize;
        let name: Vec<u8> = tzif.get(ci..chars + charcnt)?.iter().take_while(|b| **b != 0).copied().collect();
        Some((String::from_utf8_lossy(&name).into_owned(), off))
    };
    let mut last = None;
    for i in 0..timecnt {
        if be(tzif, times + i * tsize, tsize)? <= now {
            last = Some(i);
        } else {
            break;
        }
    }
    // After the last transition, a footer without DST rules says the zone outright.
    if tsize == 8 && (timecnt == 0 || last == Some(timecnt - 1)) {
        let footer = tzif.get(end..).map(String::from_utf8_lossy).unwrap_or_default();
        let footer = footer.trim();
        if !footer.is_empty()
            && !footer.contains(',')
            && let Some(z) = posix_std(footer)
        {
            return Some(z);
        }
    }
    match last {
        Some(i) => ttinfo(*tzif.get(idx + i)? as usize),
        None => {
            // Before the first transition: the first standard-time type.
            let first_std = (0..typecnt).find(|t| tzif.get(types + t * 6 + 4) == Some(&0)).unwrap_or(0);
            ttinfo(first_std)
        }
    }
}

/// The standard zone of a POSIX TZ string without DST (`UTC0`, `<+03>-3`, `JST-9`).
fn posix_std(tz: &str) -> Option<(String, i64)> {
    let (name, rest) = if let Some(r) = tz.strip_prefix('<') {
        let (n, rest) = r.split_once('>')?;
        (n.to_string(), rest)
    } else {
        let n = tz.bytes().take_while(u8::is_ascii_alphabetic).count();
        (tz[..n].to_string(), &tz[n..])
    };
    if name.is_empty() || rest.is_empty() || rest.bytes().any(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    let (sign, hms) = match rest.as_bytes()[0] {
        b'-' => (1, &rest[1..]),
        b'+' => (-1, &rest[1..]),
        _ => (-1, rest),
    };
    let mut secs = 0i64;
    for (i, part) in hms.split(':').enumerate() {
        secs += part.parse::<i64>().ok()? * [3600, 60, 1].get(i)?;
    }
    Some((name, sign * secs))
}

/// The TZif data of the local zone (`TZ`, else `etc/localtime`), `None` for UTC.
fn local_zone_data(rootfs: &Path) -> Option<Vec<u8>> {
    let path = match std::env::var("TZ") {
        Ok(tz) if tz.is_empty() => return None,
        Ok(tz) => {
            let tz = tz.strip_prefix(':').unwrap_or(&tz).to_string();
            if let Some(abs) = tz.strip_prefix('/') { rootfs.join(abs) } else { rootfs.join("usr/share/zoneinfo").join(tz) }
        }
        Err(_) => rootfs.join("etc/localtime"),
    };
    std::fs::read(path).ok()
}

impl Time {
    fn local_zone(&self, rootfs: &Path, now: i64) -> (String, i64) {
        let mut zone = self.zone.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if zone.as_ref().is_none_or(|(root, _)| root != rootfs) {
            *zone = Some((rootfs.to_path_buf(), local_zone_data(rootfs)));
        }
        let data = zone.as_ref().and_then(|(_, data)| data.as_deref());
        data.and_then(|b| zone_at(b, now)).unwrap_or_else(|| ("UTC".to_string(), 0))
    }
}

impl Collector for Time {
    fn name(&self) -> &'static str {
        "time"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        out.add("node_time_seconds", "System time in seconds since epoch (1970).", Kind::Gauge, &[], now.as_nanos() as f64 / 1e9);
        let (zone, offset) = self.local_zone(&roots.rootfs, now.as_secs() as i64);
        out.add(
            "node_time_zone_offset_seconds",
            "System time zone offset in seconds.",
            Kind::Gauge,
            &[("time_zone", &zone)],
            offset as f64,
        );

        let dir = roots.sys.join("devices/system/clocksource");
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut sources: Vec<(u64, std::path::PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let n = e.file_name().into_string().ok()?;
                Some((n.strip_prefix("clocksource")?.parse().ok()?, e.path()))
            })
            .collect();
        sources.sort();
        for (i, (_, path)) in sources.iter().enumerate() {
            let device = i.to_string();
            let available = read(&path.join("available_clocksource"))?;
            let current = read(&path.join("current_clocksource"))?;
            for cs in available.split_whitespace() {
                out.add(
                    "node_time_clocksource_available_info",
                    "Available clocksources read from '/sys/devices/system/clocksource'.",
                    Kind::Gauge,
                    &[("device", &device), ("clocksource", cs)],
                    1.0,
                );
            }
            out.add(
                "node_time_clocksource_current_info",
                "Current clocksource read from '/sys/devices/system/clocksource'.",
                Kind::Gauge,
                &[("device", &device), ("clocksource", current.trim())],
                1.0,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for (id, want) in
            [("12", Some(12.0)), ("22.04", Some(22.04)), ("3.18.4", Some(3.18)), ("", None), ("rolling", None), ("7.", Some(7.0))]
        {
            assert_eq!(major_minor(id), want, "VERSION_ID {id:?}");
        }
    }

    #[test]
    fn os_release_quoting() {
        let m = parse_os_release("# c\nNAME=\"Debian GNU/Linux\"\nID=debian\nX='a b'\nY=\"q\\\"x\"\n");
        for (k, want) in [("NAME", "Debian GNU/Linux"), ("ID", "debian"), ("X", "a b"), ("Y", "q\"x")] {
            assert_eq!(m.get(k).map(String::as_str), Some(want), "key {k}");
        }
    }

    #[test]
    fn posix_zones() {
        for (tz, want) in [
            ("UTC0", Some(("UTC", 0))),
            ("<+03>-3", Some(("+03", 10800))),
            ("JST-9", Some(("JST", 32400))),
            ("EST5", Some(("EST", -18000))),
            ("", None),
        ] {
            assert_eq!(posix_std(tz), want.map(|(n, o)| (n.to_string(), o)), "TZ {tz:?}");
        }
    }

    #[test]
    fn zoneinfo_from_this_host() {
        // Real TZif files from the host's tzdata (Debian `tzdata`).
        let utc = std::fs::read("/usr/share/zoneinfo/Etc/UTC").expect("tzdata is installed");
        assert_eq!(zone_at(&utc, 1_800_000_000), Some(("UTC".into(), 0)), "Etc/UTC");
        assert_eq!(zone_at(b"not a tzif", 0), None, "garbage");
        let berlin = std::fs::read("/usr/share/zoneinfo/Europe/Berlin").expect("tzdata is installed");
        assert_eq!(zone_at(&berlin, 1_784_000_000), Some(("CEST".into(), 7200)), "Berlin in July 2026");
        assert_eq!(zone_at(&berlin, 1_800_000_000), Some(("CET".into(), 3600)), "Berlin in January 2027");
    }
}
