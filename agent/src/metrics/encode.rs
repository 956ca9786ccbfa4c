//! Metric families and their exposition: the Prometheus text format 0.0.4
//! (what node_exporter answers by default) and OpenMetrics 1.0.0 (when the
//! scraper's `Accept` asks for it), written the way Go's client library
//! writes them: families sorted by name, samples by label values, numbers in
//! Go's shortest `%g` form.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write;
use std::hash::{BuildHasherDefault, Hasher};

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `counter`
    Counter,
    /// `gauge`
    Gauge,
    /// `untyped` (OpenMetrics: `unknown`)
    Untyped,
    /// `summary` (textfile collector only)
    Summary,
    /// `histogram` (textfile collector only)
    Histogram,
}

impl Kind {
    fn text(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Untyped => "untyped",
            Kind::Summary => "summary",
            Kind::Histogram => "histogram",
        }
    }
}

/// One sample of a family.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Appended to the family's name: empty, or `_bucket`/`_sum`/`_count` for
    /// histograms and summaries read from text files.
    pub suffix: String,
    /// Label pairs, sorted by name. The collectors' label names are static
    /// (no allocation per sample); the textfile collector's are owned.
    pub labels: Vec<(Cow<'static, str>, String)>,
    /// The value.
    pub value: f64,
}

/// A metric family: one name, HELP and TYPE, its samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// The name as the text format prints it (counters end in `_total`).
    pub name: String,
    /// HELP text, unescaped.
    pub help: String,
    /// TYPE.
    pub kind: Kind,
    /// Samples, in the order added until [`MetricSet::sort`].
    pub samples: Vec<Sample>,
}

/// The families one scrape produced.
#[derive(Debug, Default)]
pub struct MetricSet {
    families: Vec<Family>,
    index: HashMap<String, usize, BuildHasherDefault<Fnv>>,
}

/// FNV-1a: metric names are short and not attacker-chosen (the textfile
/// collector's names come from the host's own files), and SipHash was a
/// visible share of a scrape's CPU.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

impl MetricSet {
    /// Adds one sample, creating its family (with this HELP and type) on first use.
    pub fn add(&mut self, name: &str, help: &str, kind: Kind, labels: &[(&'static str, &str)], value: f64) {
        let mut pairs: Vec<(Cow<'static, str>, String)> = labels.iter().map(|&(k, v)| (Cow::Borrowed(k), v.to_string())).collect();
        pairs.sort();
        self.push(name, help, kind, Sample { suffix: String::new(), labels: pairs, value });
    }

    /// Adds one sample (labels already owned).
    pub fn push(&mut self, name: &str, help: &str, kind: Kind, sample: Sample) {
        let i = match self.index.get(name) {
            Some(&i) => i,
            None => {
                self.families.push(Family { name: name.to_string(), help: help.to_string(), kind, samples: Vec::new() });
                self.index.insert(name.to_string(), self.families.len() - 1);
                self.families.len() - 1
            }
        };
        self.families[i].samples.push(sample);
    }

    /// Whether a family of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Moves every family of `other` in (samples of a family both have are appended).
    pub fn merge(&mut self, other: MetricSet) {
        for fam in other.families {
            match self.index.get(&fam.name) {
                Some(&i) => self.families[i].samples.extend(fam.samples),
                None => {
                    self.index.insert(fam.name.clone(), self.families.len());
                    self.families.push(fam);
                }
            }
        }
    }

    /// Sorts families by name and samples by label values, as Go's registry does.
    pub fn sort(&mut self) {
        self.families.sort_by(|a, b| a.name.cmp(&b.name));
        for f in &mut self.families {
            f.samples
                .sort_by(|a, b| a.labels.iter().map(|(_, v)| v).cmp(b.labels.iter().map(|(_, v)| v)).then_with(|| a.suffix.cmp(&b.suffix)));
        }
        for (i, f) in self.families.iter().enumerate() {
            if let Some(at) = self.index.get_mut(f.name.as_str()) {
                *at = i;
            }
        }
    }

    /// The families.
    pub fn families(&self) -> &[Family] {
        &self.families
    }

    /// The sample of family `name` with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let fam = &self.families[*self.index.get(name)?];
        fam.samples
            .iter()
            .find(|s| s.labels.len() == labels.len() && labels.iter().all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v)))
            .map(|s| s.value)
    }
}

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Text,
    /// OpenMetrics 1.0.0.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` to answer with.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text` with a quality at least that of any
    /// other acceptable type, else text.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else { return Format::Text };
        let (mut om, mut other) = (0.0f64, 0.0f64);
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts.filter_map(|p| p.trim().strip_prefix("q=")).find_map(|q| q.trim().parse::<f64>().ok()).unwrap_or(1.0);
            if media == "application/openmetrics-text" {
                om = om.max(q);
            } else if media == "text/plain" {
                other = other.max(q);
            }
        }
        if om > 0.0 && om >= other { Format::OpenMetrics } else { Format::Text }
    }
}

/// `set` (sorted first) in `format`.
pub fn encode(set: &mut MetricSet, format: Format) -> String {
    let mut out = String::with_capacity(64 * 1024);
    encode_into(set, format, &mut out);
    out
}

/// `set` (sorted first) in `format`, appended to `out` (which the caller
/// sizes, e.g. from the previous scrape, so that it is not grown while writing).
pub fn encode_into(set: &mut MetricSet, format: Format, out: &mut String) {
    set.sort();
    for fam in set.families() {
        if fam.samples.is_empty() {
            continue;
        }
        match format {
            Format::Text => {
                out.push_str("# HELP ");
                out.push_str(&fam.name);
                out.push(' ');
                escape(out, &fam.help, false);
                let _ = write!(out, "\n# TYPE {} {}\n", fam.name, fam.kind.text());
                for s in &fam.samples {
                    sample(out, &fam.name, s, format);
                }
            }
            Format::OpenMetrics => {
                let base = match fam.kind {
                    Kind::Counter => fam.name.strip_suffix("_total").unwrap_or(&fam.name),
                    _ => &fam.name,
                };
                let kind = if fam.kind == Kind::Untyped { "unknown" } else { fam.kind.text() };
                let _ = write!(out, "# HELP {base} ");
                escape(out, &fam.help, true);
                let _ = writeln!(out, "\n# TYPE {base} {kind}");
                for s in &fam.samples {
                    if fam.kind == Kind::Counter {
                        let mut full = String::with_capacity(base.len() + 6);
                        full.push_str(base);
                        full.push_str("_total");
                        sample(out, &full, s, format);
                    } else {
                        sample(out, &fam.name, s, format);
                    }
                }
            }
        }
    }
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
}

fn sample(out: &mut String, name: &str, s: &Sample, format: Format) {
    out.push_str(name);
    out.push_str(&s.suffix);
    if !s.labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in s.labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escape(out, v, true);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    match format {
        Format::Text => go_float(out, s.value, false),
        Format::OpenMetrics => go_float(out, s.value, true),
    }
    out.push('\n');
}

fn escape(out: &mut String, s: &str, quote: bool) {
    if !s.bytes().any(|b| b == b'\\' || b == b'\n' || (quote && b == b'"')) {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// `v` as Go's client library prints it: `strconv.FormatFloat(v, 'g', -1, 64)`
/// (shortest digits that round-trip; exponent form below 1e-4 and from 1e6),
/// with `+Inf`, `-Inf`, `NaN`. OpenMetrics adds `.0` to integral numbers.
pub fn go_float(out: &mut String, v: f64, open_metrics: bool) {
    if v.is_nan() {
        out.push_str("NaN");
        return;
    }
    if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
        return;
    }
    if v == 0.0 {
        out.push_str(if open_metrics { "0.0" } else { "0" });
        return;
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e6".
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let neg = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let start = out.len();
    if neg {
        out.push('-');
    }
    if !(-4..6).contains(&exp) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    } else if exp < 0 {
        out.push_str("0.");
        for _ in 0..(-exp - 1) {
            out.push('0');
        }
        out.push_str(&digits);
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            out.push_str(&digits);
            for _ in digits.len()..int_len {
                out.push('0');
            }
        } else {
            out.push_str(&digits[..int_len]);
            out.push('.');
            out.push_str(&digits[int_len..]);
        }
    }
    if open_metrics && !out[start..].contains(['e', '.']) {
        out.push_str(".0");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(v: f64) -> String {
        let mut s = String::new();
        go_float(&mut s, v, false);
        s
    }

    #[test]
    fn floats_as_go_prints_them() {
        // Each expectation is what node_exporter 1.5.0 printed on this host.
        for (v, want) in [
            (1.795491009e9, "1.795491009e+09"),
            (1_098_440.0, "1.09844e+06"),
            (927_208.0, "927208"),
            (23291.0, "23291"),
            (1192.42, "1192.42"),
            (0.000233598, "0.000233598"),
            (4.7861e-05, "4.7861e-05"),
            (24016.0 * 0.001, "24.016000000000002"),
            (11379988.0 / 1000.0 / 1000.0, "11.379987999999999"),
            (2.70553174016e11, "2.70553174016e+11"),
            (-125000.0, "-125000"),
            (1.0, "1"),
            (0.0, "0"),
            (f64::INFINITY, "+Inf"),
            (f64::NAN, "NaN"),
            (1e21, "1e+21"),
            (100_000.0, "100000"),
            (2_466_193.0, "2.466193e+06"),
            (123456789012345680000.0, "1.2345678901234568e+20"),
        ] {
            assert_eq!(g(v), want, "value {v:?}");
        }
    }

    #[test]
    fn accept_negotiation() {
        for (accept, want) in [
            (None, Format::Text),
            (Some("text/plain"), Format::Text),
            (Some("*/*"), Format::Text),
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                Format::OpenMetrics,
            ),
            (Some("text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5"), Format::Text),
            (Some("application/openmetrics-text;q=0"), Format::Text),
        ] {
            assert_eq!(Format::negotiate(accept), want, "Accept {accept:?}");
        }
    }

    #[test]
    fn text_and_openmetrics() {
        let mut set = MetricSet::default();
        set.add("node_forks_total", "Total number of forks.", Kind::Counter, &[], 3.0);
        set.add("node_x", "a \\ b\nc", Kind::Untyped, &[("z", "q\"\n"), ("a", "1")], 1.0);
        let text = encode(&mut set, Format::Text);
        assert_eq!(
            text,
            "# HELP node_forks_total Total number of forks.\n# TYPE node_forks_total counter\nnode_forks_total 3\n\
             # HELP node_x a \\\\ b\\nc\n# TYPE node_x untyped\nnode_x{a=\"1\",z=\"q\\\"\\n\"} 1\n",
            "text format"
        );
        let om = encode(&mut set, Format::OpenMetrics);
        assert_eq!(
            om,
            "# HELP node_forks Total number of forks.\n# TYPE node_forks counter\nnode_forks_total 3.0\n\
             # HELP node_x a \\\\ b\\nc\n# TYPE node_x unknown\nnode_x{a=\"1\",z=\"q\\\"\\n\"} 1.0\n# EOF\n",
            "OpenMetrics"
        );
    }
}
