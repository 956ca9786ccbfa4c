//! Metric families and their exposition: the Prometheus text format 0.0.4
//! (what node_exporter answers by default) and OpenMetrics 1.0.0 (when the
//! scraper's `Accept` asks for it), written the way Go's client library
//! writes them: families sorted by name, samples by label values, numbers in
//! Go's shortest `%g` form.
//!
//! A [`MetricSet`] allocates nothing per sample: strings go into one text
//! buffer, samples and labels are records in vectors, and sets are cleared
//! and reused from scrape to scrape (each collector thread fills one, the
//! scrape copies it into its own). Families with static names are found by
//! the name's address; names built at run time (`node_memory_*`, ...) are
//! copied. Entries of the same name, from two collectors or two adds, are
//! joined when the set is sorted for encoding.

use std::collections::HashMap;
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

/// One sample with strings of its own: what the textfile collector parses,
/// handed to [`MetricSet::push`].
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Appended to the family's name: empty, or `_bucket`/`_sum`/`_count` for
    /// histograms and summaries read from text files.
    pub suffix: &'static str,
    /// Label pairs, sorted by name.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

/// A string a [`MetricSet`] holds: a static one, or a range of its text.
#[derive(Debug, Clone, Copy)]
enum Str {
    Static(&'static str),
    Text(u32, u32),
}

/// A range of a [`MetricSet`]'s text.
type Span = (u32, u32);

/// A family as added: several entries may have the same name (from two
/// collectors, or names built at run time); [`MetricSet::sort`] joins them,
/// the first one added giving HELP and TYPE.
#[derive(Debug, Clone, Copy)]
struct Family {
    name: Str,
    help: Str,
    kind: Kind,
}

/// One sample: its family, its labels (`labels[first..first + count]`).
#[derive(Debug, Clone, Copy)]
struct Entry {
    family: u32,
    first_label: u32,
    labels: u32,
    suffix: &'static str,
    value: f64,
}

#[derive(Debug, Clone, Copy)]
struct Label {
    name: Span,
    value: Span,
}

/// Families joined by name in output order, and their samples in order.
#[derive(Debug, Default)]
struct Order {
    /// Whether it describes the set as it is.
    valid: bool,
    /// Family entries by name (the first added of a name first), with the
    /// first 16 bytes of the name as two numbers that order most pairs.
    families: Vec<(u64, u64, u32)>,
    /// The group (joined family) of each family entry.
    group_of: Vec<u32>,
    /// Per group: its first family entry and its range of `samples`.
    groups: Vec<(u32, u32, u32)>,
    /// Sample indices in output order.
    samples: Vec<u32>,
}

/// The samples of one scrape (or of one collector's run): every string
/// (label names and values, names and HELP built at run time) is copied into
/// one text buffer, samples and labels are plain records in two vectors, so
/// adding a sample allocates nothing once the buffers have grown. A set is
/// meant to be [`MetricSet::clear`]ed and reused.
#[derive(Debug, Default)]
pub struct MetricSet {
    text: String,
    families: Vec<Family>,
    samples: Vec<Entry>,
    labels: Vec<Label>,
    /// Family entries by the address and length of their static name: the
    /// samples of a family find it without comparing or hashing its name.
    by_static_name: HashMap<(usize, usize), u32, BuildHasherDefault<Fnv>>,
    order: Order,
}

/// FNV-1a, a word at a time: the keys are addresses.
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
    fn write_usize(&mut self, n: usize) {
        self.0 = (self.0 ^ n as u64).wrapping_mul(0x0100_0000_01b3);
    }
}

/// Buffers that grew past these (a huge text file) are not kept for the next scrape.
const KEEP_TEXT: usize = 256 * 1024;
const KEEP_ENTRIES: usize = 8 * 1024;

impl MetricSet {
    /// Empties the set, keeping its buffers (unless one grew unusually large).
    pub fn clear(&mut self) {
        if self.text.capacity() > KEEP_TEXT || self.samples.capacity() > KEEP_ENTRIES || self.labels.capacity() > 4 * KEEP_ENTRIES {
            *self = MetricSet::default();
            return;
        }
        self.text.clear();
        self.families.clear();
        self.samples.clear();
        self.labels.clear();
        self.by_static_name.clear();
        self.order.valid = false;
    }

    /// Whether the set has no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    fn span(&mut self, s: &str) -> Span {
        let start = self.text.len();
        self.text.push_str(s);
        (to_u32(start), to_u32(self.text.len()))
    }

    fn get(&self, s: Str) -> &str {
        match s {
            Str::Static(s) => s,
            Str::Text(a, b) => self.text.get(a as usize..b as usize).unwrap_or_default(),
        }
    }

    fn text_of(&self, (a, b): Span) -> &str {
        self.text.get(a as usize..b as usize).unwrap_or_default()
    }

    /// Adds one sample, creating its family (with this HELP and type) on first use.
    pub fn add(&mut self, name: &'static str, help: &'static str, kind: Kind, labels: &[(&'static str, &str)], value: f64) {
        let key = (name.as_ptr() as usize, name.len());
        let family = match self.by_static_name.get(&key) {
            Some(&f) => f,
            None => {
                let f = to_u32(self.families.len());
                self.families.push(Family { name: Str::Static(name), help: Str::Static(help), kind });
                self.by_static_name.insert(key, f);
                f
            }
        };
        self.sample(family, labels.iter().copied(), "", value);
    }

    /// Adds one sample of a family whose name and HELP are made at run time
    /// (copied into the set); the family is created on first use.
    pub fn add_dynamic(&mut self, name: &str, help: &str, kind: Kind, labels: &[(&'static str, &str)], value: f64) {
        let family = self.dynamic_family(name, help, kind);
        self.sample(family, labels.iter().copied(), "", value);
    }

    /// Adds one sample with labels and suffix of its own (the textfile collector's).
    pub fn push(&mut self, name: &str, help: &str, kind: Kind, sample: &Sample) {
        let family = self.dynamic_family(name, help, kind);
        self.sample(family, sample.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())), sample.suffix, sample.value);
    }

    /// The last family entry if it has this name, else a new one. Entries
    /// of the same name are joined by [`MetricSet::sort`] in any case.
    fn dynamic_family(&mut self, name: &str, help: &str, kind: Kind) -> u32 {
        if let Some(last) = self.families.len().checked_sub(1)
            && self.get(self.families[last].name) == name
        {
            return to_u32(last);
        }
        let (a, b) = self.span(name);
        let (h1, h2) = self.span(help);
        self.families.push(Family { name: Str::Text(a, b), help: Str::Text(h1, h2), kind });
        to_u32(self.families.len() - 1)
    }

    fn sample<'l>(&mut self, family: u32, labels: impl Iterator<Item = (&'l str, &'l str)>, suffix: &'static str, value: f64) {
        let first = self.labels.len();
        for (k, v) in labels {
            let name = self.span(k);
            let value = self.span(v);
            self.labels.push(Label { name, value });
        }
        // Sorted by name, then value; nearly always already in order.
        let (text, added) = (&self.text, &mut self.labels[first..]);
        if added.len() > 1 {
            let at = |s: Span| text.get(s.0 as usize..s.1 as usize).unwrap_or_default();
            added.sort_by(|a, b| at(a.name).cmp(at(b.name)).then_with(|| at(a.value).cmp(at(b.value))));
        }
        let labels = to_u32(self.labels.len() - first);
        self.samples.push(Entry { family, first_label: to_u32(first), labels, suffix, value });
        self.order.valid = false;
    }

    /// Copies every sample of `other` in, after those already here.
    pub fn append(&mut self, other: &MetricSet) {
        let text = to_u32(self.text.len());
        let families = to_u32(self.families.len());
        let labels = to_u32(self.labels.len());
        self.text.push_str(&other.text);
        let moved = |s: Str| match s {
            Str::Static(s) => Str::Static(s),
            Str::Text(a, b) => Str::Text(a + text, b + text),
        };
        self.families.extend(other.families.iter().map(|f| Family { name: moved(f.name), help: moved(f.help), kind: f.kind }));
        self.labels.extend(
            other.labels.iter().map(|l| Label { name: (l.name.0 + text, l.name.1 + text), value: (l.value.0 + text, l.value.1 + text) }),
        );
        self.samples.extend(other.samples.iter().map(|s| Entry { family: s.family + families, first_label: s.first_label + labels, ..*s }));
        self.order.valid = false;
    }

    /// Whether a family of this name has samples.
    pub fn contains(&self, name: &str) -> bool {
        self.families.iter().any(|f| self.get(f.name) == name)
    }

    fn labels_of(&self, s: &Entry) -> &[Label] {
        self.labels.get(s.first_label as usize..(s.first_label + s.labels) as usize).unwrap_or_default()
    }

    /// The sample of family `name` with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                let have = self.labels_of(s);
                self.get(self.families[s.family as usize].name) == name
                    && s.suffix.is_empty()
                    && have.len() == labels.len()
                    && labels.iter().all(|(k, v)| have.iter().any(|l| self.text_of(l.name) == *k && self.text_of(l.value) == *v))
            })
            .map(|s| s.value)
    }

    /// Orders families by name and the samples of each by label values, as
    /// Go's registry does (stable: equal ones stay in the order added).
    pub fn sort(&mut self) {
        if self.order.valid {
            return;
        }
        let MetricSet { text, families, samples, labels, order, .. } = self;
        let at = |s: Span| text.get(s.0 as usize..s.1 as usize).unwrap_or_default();
        let name = |f: u32| match families[f as usize].name {
            Str::Static(s) => s,
            Str::Text(a, b) => at((a, b)),
        };
        // Bytes `at..at + 8` of a name, zero-padded (names hold no NUL), as a big-endian number.
        let prefix = |name: &str, at: usize| {
            let mut bytes = [0u8; 8];
            for (to, from) in bytes.iter_mut().zip(name.as_bytes().iter().skip(at)) {
                *to = *from;
            }
            u64::from_be_bytes(bytes)
        };
        order.families.clear();
        order.families.extend((0..to_u32(families.len())).map(|f| (prefix(name(f), 0), prefix(name(f), 8), f)));
        order.families.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)).then_with(|| name(a.2).cmp(name(b.2))).then(a.2.cmp(&b.2)));
        order.group_of.clear();
        order.group_of.resize(families.len(), 0);
        order.groups.clear();
        let mut previous = None;
        for &(_, _, f) in &order.families {
            let n = name(f);
            if previous != Some(n) {
                order.groups.push((f, 0, 0));
                previous = Some(n);
            }
            order.group_of[f as usize] = to_u32(order.groups.len() - 1);
        }
        // Samples by group (a counting sort, stable), then by labels within each.
        for s in samples.iter() {
            order.groups[order.group_of[s.family as usize] as usize].2 += 1;
        }
        let mut start = 0;
        for g in &mut order.groups {
            let count = g.2;
            *g = (g.0, start, start);
            start += count;
        }
        order.samples.clear();
        order.samples.resize(samples.len(), 0);
        for (i, s) in samples.iter().enumerate() {
            let g = &mut order.groups[order.group_of[s.family as usize] as usize];
            order.samples[g.2 as usize] = to_u32(i);
            g.2 += 1;
        }
        let values = |s: u32| {
            let s = &samples[s as usize];
            labels[s.first_label as usize..(s.first_label + s.labels) as usize].iter().map(|l| at(l.value))
        };
        for &(_, from, to) in &order.groups {
            let group = &mut order.samples[from as usize..to as usize];
            if group.len() > 1 {
                group.sort_by(|&a, &b| values(a).cmp(values(b)).then_with(|| samples[a as usize].suffix.cmp(samples[b as usize].suffix)));
            }
        }
        order.valid = true;
    }
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
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
    for &(first, from, to) in &set.order.groups {
        let fam = set.families[first as usize];
        let name = set.get(fam.name);
        let help = set.get(fam.help);
        let (base, kind) = match format {
            Format::Text => (name, fam.kind.text()),
            Format::OpenMetrics => (
                if fam.kind == Kind::Counter { name.strip_suffix("_total").unwrap_or(name) } else { name },
                if fam.kind == Kind::Untyped { "unknown" } else { fam.kind.text() },
            ),
        };
        out.push_str("# HELP ");
        out.push_str(base);
        out.push(' ');
        escape(out, help, format == Format::OpenMetrics);
        out.push_str("\n# TYPE ");
        out.push_str(base);
        out.push(' ');
        out.push_str(kind);
        out.push('\n');
        // OpenMetrics names a counter's family without `_total` and its samples with it.
        let suffix = if format == Format::OpenMetrics && fam.kind == Kind::Counter { "_total" } else { "" };
        let (base, suffix) = if suffix.is_empty() { (name, "") } else { (base, suffix) };
        for &i in &set.order.samples[from as usize..to as usize] {
            let s = &set.samples[i as usize];
            out.push_str(base);
            out.push_str(suffix);
            out.push_str(s.suffix);
            let labels = set.labels_of(s);
            if !labels.is_empty() {
                out.push('{');
                for (i, l) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(set.text_of(l.name));
                    out.push_str("=\"");
                    escape(out, set.text_of(l.value), true);
                    out.push('"');
                }
                out.push('}');
            }
            out.push(' ');
            go_float(out, s.value, format == Format::OpenMetrics);
            out.push('\n');
        }
    }
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
}

fn escape(out: &mut String, s: &str, quote: bool) {
    // One pass over the bytes: most strings are a few bytes long.
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

/// Up to 32 bytes of text on the stack: a number being formatted.
struct Digits {
    buf: [u8; 32],
    len: usize,
}

impl Digits {
    const fn new() -> Self {
        Digits { buf: [0; 32], len: 0 }
    }
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Write for Digits {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let to = self.buf.get_mut(self.len..self.len + s.len()).ok_or(std::fmt::Error)?;
        to.copy_from_slice(s.as_bytes());
        self.len += s.len();
        Ok(())
    }
}

/// 2^53: integers below it are exact in an f64, and their shortest
/// round-trip digits are their decimal digits without trailing zeros.
const EXACT_INTEGERS: f64 = 9_007_199_254_740_992.0;

/// The shortest digits that round-trip `v` (> 0, finite) and the decimal
/// exponent of the first one: 1234.5 is ("12345", 3).
fn shortest(v: f64) -> (Digits, i32) {
    let mut digits = Digits::new();
    if v.fract() == 0.0 && v < EXACT_INTEGERS {
        // Counters and sizes, most values: no float formatting at all.
        let mut n = v as u64;
        let mut rev = [0u8; 20];
        let mut len = 0;
        while n > 0 {
            rev[len] = b'0' + (n % 10) as u8;
            n /= 10;
            len += 1;
        }
        let exp = len as i32 - 1;
        let zeros = rev[..len].iter().take_while(|&&d| d == b'0').count();
        for (to, d) in digits.buf.iter_mut().zip(rev[zeros..len].iter().rev()) {
            *to = *d;
        }
        digits.len = len - zeros;
        return (digits, exp);
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "1.2345e3".
    let mut sci = Digits::new();
    let _ = std::fmt::Write::write_fmt(&mut sci, format_args!("{v:e}"));
    let text = sci.bytes();
    let e = text.iter().position(|&b| b == b'e').unwrap_or(text.len());
    for &d in text[..e].iter().filter(|d| d.is_ascii_digit()) {
        digits.buf[digits.len] = d;
        digits.len += 1;
    }
    let exp = std::str::from_utf8(text.get(e + 1..).unwrap_or_default()).ok().and_then(|x| x.parse().ok()).unwrap_or(0);
    (digits, exp)
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
    let (digits, exp) = shortest(v.abs());
    let digits = std::str::from_utf8(digits.bytes()).unwrap_or("0");
    let start = out.len();
    if v < 0.0 {
        out.push('-');
    }
    if !(-4..6).contains(&exp) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        let e = exp.unsigned_abs();
        if e < 10 {
            out.push('0');
        }
        let mut e_digits = Digits::new();
        let _ = std::fmt::Write::write_fmt(&mut e_digits, format_args!("{e}"));
        out.push_str(std::str::from_utf8(e_digits.bytes()).unwrap_or_default());
    } else if exp < 0 {
        out.push_str("0.");
        for _ in 0..(-exp - 1) {
            out.push('0');
        }
        out.push_str(digits);
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            out.push_str(digits);
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

    /// The formatting before the integer fast path: `{:e}`, taken apart.
    fn reference(v: f64) -> String {
        let sci = format!("{:e}", v.abs());
        let (mantissa, exp) = sci.split_once('e').unwrap();
        let exp: i32 = exp.parse().unwrap();
        let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
        let mut out = if v < 0.0 { "-".to_string() } else { String::new() };
        if !(-4..6).contains(&exp) {
            out.push_str(&digits[..1]);
            if digits.len() > 1 {
                out.push('.');
                out.push_str(&digits[1..]);
            }
            out.push_str(&format!("e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs()));
        } else if exp < 0 {
            out.push_str("0.");
            out.push_str(&"0".repeat((-exp - 1) as usize));
            out.push_str(&digits);
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.push_str(&"0".repeat(int_len - digits.len()));
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        }
        out
    }

    #[test]
    fn fast_integers_print_as_before() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut values = vec![1.0, 9.0, 10.0, 100.0, 999_999.0, 1_000_000.0, 1_200_000.0, 4_503_599_627_370_496.0];
        values.extend([EXACT_INTEGERS - 1.0, EXACT_INTEGERS - 2.0, EXACT_INTEGERS, EXACT_INTEGERS * 2.0, 1e300, 0.5, 1.5, 1e-7]);
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bits = (x >> (x % 64)) as f64;
            values.push(bits);
            values.push((x % 100_000) as f64 * 1000.0);
            values.push((x % 1000) as f64 / 100.0);
            values.push(f64::from_bits(x));
        }
        for v in values.into_iter().filter(|v| v.is_finite() && *v != 0.0) {
            for v in [v, -v] {
                assert_eq!(g(v), reference(v), "value {v:?} ({:#x})", v.to_bits());
            }
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

    #[test]
    fn families_joined_by_name_and_ordered() {
        let mut a = MetricSet::default();
        a.add("node_b", "B.", Kind::Gauge, &[("device", "sdb")], 2.0);
        a.add_dynamic("node_a", "A first.", Kind::Gauge, &[], 1.0);
        a.add("node_b", "B again.", Kind::Gauge, &[("device", "sda")], 1.0);
        let mut b = MetricSet::default();
        b.add_dynamic("node_b", "B from b.", Kind::Counter, &[("device", "sd")], 0.5);
        b.add_dynamic("node_a", "A second.", Kind::Gauge, &[("x", "1")], 3.0);
        b.add("node_c", "C.", Kind::Gauge, &[("b", "2"), ("a", "1")], 4.0);
        b.add("node_c", "C.", Kind::Gauge, &[("a", "1"), ("b", "10")], 5.0);
        b.add("node_c", "C.", Kind::Gauge, &[("a", "1"), ("b", "1")], 6.0);
        let want = "# HELP node_a A first.\n# TYPE node_a gauge\nnode_a 1\nnode_a{x=\"1\"} 3\n\
                    # HELP node_b B.\n# TYPE node_b gauge\nnode_b{device=\"sd\"} 0.5\nnode_b{device=\"sda\"} 1\nnode_b{device=\"sdb\"} 2\n\
                    # HELP node_c C.\n# TYPE node_c gauge\nnode_c{a=\"1\",b=\"1\"} 6\nnode_c{a=\"1\",b=\"10\"} 5\nnode_c{a=\"1\",b=\"2\"} 4\n";
        let mut set = MetricSet::default();
        for round in 0..2 {
            set.clear();
            set.append(&a);
            set.append(&b);
            assert_eq!(encode(&mut set, Format::Text), want, "round {round}: joined, first HELP and TYPE, samples by labels");
        }
        assert_eq!(set.value("node_c", &[("b", "10"), ("a", "1")]), Some(5.0), "value by labels in any order");
        assert!(set.contains("node_a") && !set.contains("node_d"), "contains");
    }
}
