//! The `textfile` collector: metrics that other programs write as `*.prom`
//! files (Prometheus text format) into a directory, exposed as they are, with
//! `node_textfile_mtime_seconds{file}` per file read and
//! `node_textfile_scrape_error` (1 when a file or the directory could not be
//! read or parsed; such a file is skipped whole, as node_exporter does).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::UNIX_EPOCH;

use super::encode::{Kind, MetricSet, Sample};
use super::{Collector, Error, Roots, read_to_end};

/// Reads `*.prom` from [`Roots::textfile_dir`].
pub struct Textfile;

/// One family parsed from a text file.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedFamily {
    /// Name.
    pub name: String,
    /// HELP, if the file had one.
    pub help: Option<String>,
    /// TYPE (untyped when absent).
    pub kind: Kind,
    /// Samples.
    pub samples: Vec<Sample>,
}

fn valid_name(s: &str, label: bool) -> bool {
    let mut chars = s.chars();
    let first_ok = |c: char| c.is_ascii_alphabetic() || c == '_' || (!label && c == ':');
    chars.next().is_some_and(first_ok) && chars.all(|c| first_ok(c) || c.is_ascii_digit())
}

/// A line of a text file that is not the Prometheus text format.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct SyntaxError {
    /// The line, from 1.
    pub line: usize,
    /// What is wrong with it.
    pub problem: Problem,
}

/// What is wrong with a line of a text file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    /// A backslash not followed by a backslash, `n` or (in a label value) a quote.
    #[error("invalid escape \\{0}")]
    Escape(String),
    /// A sample value that is not a number.
    #[error("invalid value {0:?}")]
    Value(String),
    /// Something else than the text format's next token.
    #[error("expected {0}")]
    Expected(&'static str),
    /// A label name that is not `[a-zA-Z_][a-zA-Z0-9_]*`.
    #[error("invalid label name {0:?}")]
    LabelName(String),
    /// A label value without its closing quote.
    #[error("unterminated label value")]
    Unterminated,
    /// A label given twice.
    #[error("duplicate label {0:?}")]
    DuplicateLabel(String),
    /// A metric name that is not `[a-zA-Z_:][a-zA-Z0-9_:]*`.
    #[error("invalid metric name {0:?}")]
    MetricName(String),
    /// A second `# HELP` for a family.
    #[error("second HELP for {0}")]
    SecondHelp(String),
    /// A `# TYPE` after the family's samples.
    #[error("TYPE for {0} after its samples")]
    TypeAfterSamples(String),
    /// A `# TYPE` that is none of the five.
    #[error("unknown type {0:?}")]
    UnknownType(String),
    /// A sample without a value.
    #[error("no value")]
    NoValue,
    /// A sample with a timestamp.
    #[error("client-side timestamps are not supported")]
    Timestamp,
}

fn unescape(s: &str, quote: bool) -> Result<String, Problem> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') if quote => out.push('"'),
            other => return Err(Problem::Escape(other.map(String::from).unwrap_or_default())),
        }
    }
    Ok(out)
}

fn parse_value(s: &str) -> Result<f64, Problem> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|_| Problem::Value(s.to_string())),
    }
}

/// `{a="b",c="d"}` at the start of `s`; returns the labels and the rest.
type Labels = Vec<(String, String)>;

fn parse_labels(s: &str) -> Result<(Labels, &str), Problem> {
    let mut labels = Vec::new();
    let mut rest = s.strip_prefix('{').ok_or(Problem::Expected("'{'"))?.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or(Problem::Expected("'='"))?;
        let name = rest[..eq].trim();
        if !valid_name(name, true) {
            return Err(Problem::LabelName(name.to_string()));
        }
        rest = rest[eq + 1..].trim_start().strip_prefix('"').ok_or(Problem::Expected("'\"'"))?;
        let mut end = None;
        let mut escaped = false;
        for (i, c) in rest.char_indices() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end.ok_or(Problem::Unterminated)?;
        let value = unescape(&rest[..end], true)?;
        if labels.iter().any(|(n, _)| n == name) {
            return Err(Problem::DuplicateLabel(name.to_string()));
        }
        labels.push((name.to_string(), value));
        rest = rest[end + 1..].trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
        } else if !rest.starts_with('}') {
            return Err(Problem::Expected("',' or '}'"));
        }
    }
}

/// Parses the Prometheus text format. Client-side timestamps are refused (as node_exporter does).
pub fn parse(text: &str) -> Result<Vec<ParsedFamily>, SyntaxError> {
    let mut families: Vec<ParsedFamily> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let family = |families: &mut Vec<ParsedFamily>, index: &mut HashMap<String, usize>, name: &str| -> usize {
        *index.entry(name.to_string()).or_insert_with(|| {
            families.push(ParsedFamily { name: name.to_string(), help: None, kind: Kind::Untyped, samples: Vec::new() });
            families.len() - 1
        })
    };
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let at = |problem: Problem| SyntaxError { line: n + 1, problem };
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, [' ', '\t']);
            let keyword = parts.next().unwrap_or("");
            if keyword != "HELP" && keyword != "TYPE" {
                continue;
            }
            let name = parts.next().unwrap_or("");
            if !valid_name(name, false) {
                return Err(at(Problem::MetricName(name.to_string())));
            }
            let arg = parts.next().unwrap_or("").trim_start();
            let i = family(&mut families, &mut index, name);
            if keyword == "HELP" {
                if families[i].help.is_some() {
                    return Err(at(Problem::SecondHelp(name.to_string())));
                }
                families[i].help = Some(unescape(arg, false).map_err(at)?);
            } else {
                if !families[i].samples.is_empty() {
                    return Err(at(Problem::TypeAfterSamples(name.to_string())));
                }
                families[i].kind = match arg.trim() {
                    "counter" => Kind::Counter,
                    "gauge" => Kind::Gauge,
                    "untyped" => Kind::Untyped,
                    "summary" => Kind::Summary,
                    "histogram" => Kind::Histogram,
                    other => return Err(at(Problem::UnknownType(other.to_string()))),
                };
            }
            continue;
        }
        let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
        let name = &line[..name_end];
        if !valid_name(name, false) {
            return Err(at(Problem::MetricName(name.to_string())));
        }
        let (labels, rest) =
            if line[name_end..].starts_with('{') { parse_labels(&line[name_end..]).map_err(at)? } else { (Vec::new(), &line[name_end..]) };
        let mut fields = rest.split_whitespace();
        let value = parse_value(fields.next().ok_or(at(Problem::NoValue))?).map_err(at)?;
        if fields.next().is_some() {
            return Err(at(Problem::Timestamp));
        }
        // A histogram's or summary's samples belong to its base name.
        let (fam_name, suffix) = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                let base = name.strip_suffix(s)?;
                let i = *index.get(base)?;
                matches!(families[i].kind, Kind::Histogram | Kind::Summary).then_some((base.to_string(), *s))
            })
            .unwrap_or((name.to_string(), ""));
        let i = family(&mut families, &mut index, &fam_name);
        let mut labels = labels;
        labels.sort();
        families[i].samples.push(Sample { suffix, labels, value });
    }
    Ok(families.into_iter().filter(|f| !f.samples.is_empty()).collect())
}

impl Collector for Textfile {
    fn name(&self) -> &'static str {
        "textfile"
    }

    fn collect(&self, roots: &Roots, out: &mut MetricSet) -> Result<(), Error> {
        let mut errored = false;
        let mut mtimes: BTreeMap<String, f64> = BTreeMap::new();
        if let Some(dir) = &roots.textfile_dir {
            match std::fs::read_dir(dir) {
                Err(e) => {
                    log::warn!("textfile collector: reading directory {}: {e}", dir.display());
                    errored = true;
                }
                Ok(entries) => {
                    let mut names: Vec<String> = entries.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect();
                    names.sort();
                    for name in names.iter().filter(|n| n.ends_with(".prom")) {
                        let path = dir.join(name);
                        match file(&path, out) {
                            Ok(mtime) => {
                                mtimes.insert(path.display().to_string(), mtime);
                            }
                            Err(e) => {
                                log::warn!("textfile collector: {}", crate::register::chain(&e));
                                errored = true;
                            }
                        }
                    }
                }
            }
        }
        for (file, mtime) in &mtimes {
            out.add(
                "node_textfile_mtime_seconds",
                "Unixtime mtime of textfiles successfully read.",
                Kind::Gauge,
                &[("file", file)],
                *mtime,
            );
        }
        out.add(
            "node_textfile_scrape_error",
            "1 if there was an error opening or reading a file, 0 otherwise",
            Kind::Gauge,
            &[],
            if errored { 1.0 } else { 0.0 },
        );
        Ok(())
    }
}

/// Adds one file's families to `out`; returns its mtime in whole seconds.
fn file(path: &Path, out: &mut MetricSet) -> Result<f64, Error> {
    let text = read_to_end(path)?;
    let families = parse(&text).map_err(|e| Error::parse(path, e.to_string()))?;
    for f in &families {
        if out.contains(&f.name) {
            return Err(Error::parse(path, format!("{} is already defined by another file or collector", f.name)));
        }
    }
    for f in families {
        // Every sample of a family gets every label name of the family.
        let names: BTreeSet<&str> = f.samples.iter().flat_map(|s| s.labels.iter().map(|(k, _)| k.as_str())).collect();
        let names: Vec<String> = names.into_iter().map(str::to_string).collect();
        let help = f.help.clone().unwrap_or_else(|| format!("Metric read from {}", path.display()));
        for mut s in f.samples {
            for n in &names {
                if !s.labels.iter().any(|(k, _)| k == n) {
                    s.labels.push((n.clone(), String::new()));
                }
            }
            s.labels.sort();
            out.push(&f.name, &help, f.kind, &s);
        }
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs() as f64).unwrap_or(0.0);
    Ok(mtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_cases() {
        for (case, text, ok) in [
            ("plain", "# HELP a_b Some help.\n# TYPE a_b gauge\na_b{x=\"1\",y=\"a\\\"b\"} 3.5\na_b 1\n", true),
            ("histogram", "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n", true),
            ("no help or type", "foo 1\n", true),
            ("timestamp", "foo 1 1700000000\n", false),
            ("bad name", "1foo 2\n", false),
            ("bad value", "foo bar\n", false),
            ("unterminated labels", "foo{a=\"1\" 2\n", false),
            ("unknown type", "# TYPE foo thing\nfoo 1\n", false),
            ("garbage", "\u{0}\u{1}\u{2}", false),
        ] {
            assert_eq!(parse(text).is_ok(), ok, "{case}: {:?}", parse(text));
        }
        let fams = parse("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n").unwrap();
        assert_eq!(fams.len(), 1, "histogram samples under one family");
        assert_eq!(fams[0].samples.len(), 3, "histogram samples");
    }

    #[test]
    fn directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("good.prom"),
            "# HELP kiln_test_value A test.\n# TYPE kiln_test_value gauge\nkiln_test_value{a=\"x\"} 7\nkiln_test_value{b=\"y\"} 8\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("bad.prom"), "kiln_bad 1 2 3\n").unwrap();
        std::fs::write(dir.path().join("ignored.txt"), "kiln_ignored 1\n").unwrap();
        let roots = Roots { textfile_dir: Some(dir.path().into()), ..Roots::default() };
        let mut set = MetricSet::default();
        Textfile.collect(&roots, &mut set).unwrap();
        assert_eq!(set.value("kiln_test_value", &[("a", "x"), ("b", "")]), Some(7.0), "missing label filled empty");
        assert_eq!(set.value("node_textfile_scrape_error", &[]), Some(1.0), "bad.prom counts as an error");
        assert!(!set.contains("kiln_bad") && !set.contains("kiln_ignored"), "bad file skipped whole; .txt ignored");
        let good = dir.path().join("good.prom").display().to_string();
        assert!(set.value("node_textfile_mtime_seconds", &[("file", &good)]).unwrap() > 1.0e9, "mtime of good.prom");

        let roots = Roots { textfile_dir: Some(dir.path().join("missing")), ..Roots::default() };
        let mut set = MetricSet::default();
        Textfile.collect(&roots, &mut set).unwrap();
        assert_eq!(set.value("node_textfile_scrape_error", &[]), Some(1.0), "missing directory");
    }
}
