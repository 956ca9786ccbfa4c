//! Printing: progress displays, tables, JSON lines, error chains; and the
//! defaults for per-user directories.

use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use kiln_builder::{Event, Outcome};
use kiln_core::Node;

/// `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn default_cache_dir() -> PathBuf {
    xdg("XDG_CACHE_HOME", ".cache").join("kiln")
}

/// `$XDG_STATE_HOME/kiln`, else `~/.local/state/kiln`.
pub fn default_state_dir() -> PathBuf {
    xdg("XDG_STATE_HOME", ".local/state").join("kiln")
}

fn xdg(var: &str, fallback: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(fallback),
    }
}

/// Logs to stderr; `RUST_LOG` overrides `default`.
pub fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: logs kept in files and journals stay plain.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).with_ansi(ansi).init();
}

/// An error and its causes, `a: b: c`.
pub fn chain(e: &anyhow::Error) -> String {
    e.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ")
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Build progress: a spinner per phase on a terminal, JSON lines with `--json`.
///
/// Each phase is timed from its event to the next one's: a terminal shows
/// it beside the phase when it ends; JSON adds `at_ms` (since the build
/// started) to every event, and `phases_ms` (each phase's time, in order)
/// to the last (`built`, `cached` or `interrupted`).
pub struct BuildProgress {
    json: bool,
    bar: Option<ProgressBar>,
    start: std::time::Instant,
    /// Each phase so far, and when it started.
    phases: std::sync::Mutex<Vec<(String, std::time::Instant)>>,
}

impl BuildProgress {
    /// A display for a terminal, or JSON lines.
    pub fn new(json: bool) -> Self {
        let bar = (!json).then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(ProgressStyle::with_template("{spinner} {prefix:>9} {msg} [{elapsed}]").expect("a valid template"));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        BuildProgress { json, bar, start: std::time::Instant::now(), phases: std::sync::Mutex::new(Vec::new()) }
    }

    /// Shows one event.
    pub fn event(&self, event: Event) {
        let now = std::time::Instant::now();
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        let ended = phases.last().map(|(_, started)| now - *started);
        if let Event::Phase { phase, .. } = &event {
            phases.push((phase.clone(), now));
        }
        let last = !matches!(event, Event::Phase { .. });
        if self.json {
            let mut line = serde_json::to_value(&event).expect("events serialise");
            line["at_ms"] = u64::try_from((now - self.start).as_millis()).unwrap_or(u64::MAX).into();
            if last {
                let ms = |i: usize, (name, started): &(String, std::time::Instant)| {
                    let end = phases.get(i + 1).map_or(now, |(_, next)| *next);
                    serde_json::json!({ "phase": name, "ms": u64::try_from((end - *started).as_millis()).unwrap_or(u64::MAX) })
                };
                line["phases_ms"] = phases.iter().enumerate().map(|(i, p)| ms(i, p)).collect();
            }
            println!("{line}");
            return;
        }
        let Some(bar) = &self.bar else { return };
        if let Event::Interrupted { .. } = &event {
            bar.abandon();
            return;
        }
        if let Event::Phase { phase, detail } = &event {
            if let Some(took) = ended.filter(|_| !bar.prefix().is_empty()) {
                bar.println(format!("  ✓ {:>9} {} ({:.1} s)", bar.prefix(), bar.message(), took.as_secs_f64()));
            }
            bar.set_prefix(phase.clone());
            bar.set_message(detail.clone());
        }
    }
    /// Prints the result.
    pub fn finish(&self, outcome: &Outcome) {
        if let Some(bar) = &self.bar {
            let phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, started)) = phases.last().filter(|_| !bar.prefix().is_empty()) {
                bar.println(format!("  ✓ {:>9} {} ({:.1} s)", bar.prefix(), bar.message(), started.elapsed().as_secs_f64()));
            }
            bar.finish_and_clear();
            let how = if outcome.cached { "up to date" } else { "built" };
            let bytes: u64 = outcome.manifest.artifacts.iter().map(|a| a.size).sum();
            println!(
                "{} {how}: {} ({:.1} MiB) in {}, {:.1} s",
                outcome.manifest.name,
                outcome.manifest.digest,
                bytes as f64 / 1048576.0,
                outcome.dir.display(),
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

/// The API's client: `server`, trusting only `ca_pem`, presenting the
/// client certificate and key `identity_pem`.
pub fn api_client(server: &str, ca_pem: &[u8], identity_pem: &[u8]) -> anyhow::Result<kiln_client::Client> {
    Ok(kiln_client::Client::builder(server)
        .ca_pem(Some(ca_pem))
        .identity_pem(Some(identity_pem))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// The key file beside a certificate: `NAME-key.pem` for `NAME.pem`.
pub fn key_beside(cert: &std::path::Path) -> PathBuf {
    let stem = cert.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    cert.with_file_name(format!("{stem}-key.pem"))
}

/// Join tokens as an aligned table: ID, uses made and left, expiry, pool or
/// MAC, description.
pub fn token_table(tokens: &[kiln_core::JoinTokenInfo]) -> String {
    let mut rows = vec![["ID", "USED", "LEFT", "EXPIRES", "FOR", "DESCRIPTION"].map(String::from).to_vec()];
    for t in tokens {
        let expires = t
            .expires
            .map_or_else(|| "never".to_string(), |at| at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default());
        let scope = match (&t.pool, &t.mac) {
            (Some(pool), _) => format!("pool {pool}"),
            (None, Some(mac)) => format!("mac {mac}"),
            (None, None) => "any".to_string(),
        };
        let left = t.uses_left.map_or_else(|| "any".to_string(), |n| n.to_string());
        rows.push(vec![cell(&t.id), t.used.to_string(), left, expires, cell(&scope), cell(&t.description)]);
    }
    table(rows)
}

/// Pools as an aligned table: one row per pool and host.
pub fn pool_table(pools: &[kiln_core::PoolStatus]) -> String {
    let mut rows = vec![
        [
            "POOL",
            "IMAGE",
            "BOOT",
            "DESIRED",
            "MIN-MAX",
            "READY",
            "UP-TO-DATE",
            "OUT-OF-DATE",
            "HOST",
            "DEFINED",
            "RUNNING",
            "BOOTING",
            "REGISTERED",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for p in pools {
        for h in &p.hosts {
            rows.push(vec![
                p.name.clone(),
                p.image.clone(),
                p.boot.clone(),
                p.desired.to_string(),
                format!("{}-{}", p.min, p.max),
                p.ready.to_string(),
                p.up_to_date.to_string(),
                p.out_of_date.to_string(),
                h.host.clone(),
                h.defined.to_string(),
                h.running.to_string(),
                h.booting.to_string(),
                h.registered.to_string(),
            ]);
        }
    }
    let mut out = table(rows);
    if let Some(leader) = pools.iter().find_map(|p| p.leader.as_ref()) {
        out.push_str(&leader_line(leader));
    }
    for p in pools {
        if p.out_of_date > 0 || p.rollout.paused || p.rollout.undone_to.is_some() {
            out.push_str(&format!("{}\n", rollout_line(p)));
        }
        if let Some(a) = &p.autoscale {
            out.push_str(&format!("{}: autoscale: {a}\n", p.name));
        }
        for e in &p.errors {
            out.push_str(&format!("{}: {}\n", p.name, escape(e)));
        }
    }
    out
}

/// Which server leads the pools, when servers on one etcd elect one.
fn leader_line(leader: &kiln_core::pool::Leader) -> String {
    match (&leader.server, leader.here) {
        (Some(name), true) => format!("leader: {} (this server)\n", escape(name)),
        (Some(name), false) => format!("leader: {} (another server: this one only watches)\n", escape(name)),
        (None, _) => "leader: none now (an election is under way, or etcd is out of reach)\n".to_string(),
    }
}

/// Most characters a cell of `kiln nodes` shows; a longer value is cut
/// and ends in `…`.
const CELL: usize = 40;
/// Most items of a list (MACs, addresses) a cell shows; the rest are
/// counted (`+N`).
const LIST: usize = 2;

/// Text from the network as a terminal may show it: every character that is
/// not printable ASCII becomes an escape (`\x1b`, `\r`, `\u{202e}`), so no
/// control sequence reaches the terminal and no line is split.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' '..='~' => out.push(c),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x100 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    out
}

/// A table cell: [`escape`]d, at most [`CELL`] characters.
fn cell(s: &str) -> String {
    let escaped = escape(s);
    match escaped.char_indices().nth(CELL - 1) {
        Some((end, _)) if escaped.len() > end + 1 => format!("{}…", &escaped[..end]),
        _ => escaped,
    }
}

/// A list as a cell: the first [`LIST`] items, then how many more (`+N`).
fn list_cell<T: ToString>(items: &[T]) -> String {
    let mut shown: Vec<String> = items.iter().take(LIST).map(|i| cell(&i.to_string())).collect();
    if items.len() > LIST {
        shown.push(format!("+{}", items.len() - LIST));
    }
    shown.join(",")
}

/// Nodes as an aligned table. What nodes reported is escaped and cut
/// ([`cell`], [`list_cell`]): a row stays one short line whatever a node sent.
pub fn node_table(nodes: &[Node]) -> String {
    let now = time::OffsetDateTime::now_utc();
    let mut rows = vec![
        ["NAME", "STATE", "POOL", "HOST", "MAC", "ADDRESS", "SUBNET", "PUBLIC IP", "IMAGE", "REGISTERED", "LAST SEEN"]
            .map(String::from)
            .to_vec(),
    ];
    for n in nodes {
        let ago = |t: time::OffsetDateTime| format!("{}s ago", (now - t).whole_seconds().max(0));
        rows.push(vec![
            cell(&n.name),
            // The server's word; an older server's JSON has none.
            n.state.map_or_else(|| if n.pending { "Pending" } else { "-" }.to_string(), |s| s.to_string()),
            n.pool.as_deref().map_or_else(|| "-".into(), cell),
            // The host is the libvirt URI from the operator's own pool file: escaped, never cut.
            n.host.as_deref().map_or_else(|| "-".into(), escape),
            list_cell(&n.macs),
            list_cell(&n.addresses),
            n.subnet.map_or_else(|| "-".into(), |s| s.to_string()),
            n.public_ip.map_or_else(|| "-".into(), |ip| ip.to_string()),
            match n.out_of_date {
                Some(true) => format!("{} (out of date)", escape(&short_digest(&n.image_digest))),
                _ => escape(&short_digest(&n.image_digest)),
            },
            ago(n.registered_at),
            ago(n.last_seen),
        ]);
    }
    table(rows)
}

/// A check's matrix: a row per sending node, a column per receiving node,
/// each cell "to its pod / to the node" (ok, NAT and the source seen, or
/// failed); then the nodes that failed their part.
pub fn check_table(result: &kiln_core::CheckResult) -> String {
    use kiln_core::{PathKind, Verdict};
    let names: Vec<&str> = result.nodes.iter().map(|t| t.node.as_str()).collect();
    let failed = result.paths.iter().filter(|p| p.verdict != Verdict::Ok).count();
    let mut out = format!(
        "check {}: {} node{}, {}\n",
        cell(&result.id),
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        match (result.ok, failed) {
            (true, _) => format!("all {} paths ok, no NAT", result.paths.len()),
            (false, 0) => "failed".to_string(),
            (false, n) => format!("{n} of {} paths not ok", result.paths.len()),
        }
    );
    let mut header = vec!["FROM \\ TO (pod / node)".to_string()];
    header.extend(names.iter().map(|n| cell(n)));
    let mut rows = vec![header];
    for from in &names {
        let mut row = vec![cell(from)];
        for to in &names {
            let word = |kind| match result.paths.iter().find(|p| p.from == *from && p.to == *to && p.kind == kind) {
                None => "-".to_string(),
                Some(p) => match (p.verdict, p.seen) {
                    (Verdict::Ok, _) => "ok".to_string(),
                    (Verdict::Nat, Some(seen)) => format!("NAT({seen})"),
                    (Verdict::Nat, None) => "NAT".to_string(),
                    (Verdict::Failed, _) => "failed".to_string(),
                },
            };
            row.push(if from == to { "-".to_string() } else { format!("{} / {}", word(PathKind::Pod), word(PathKind::Node)) });
        }
        rows.push(row);
    }
    out.push_str(&table(rows));
    for e in &result.errors {
        out.push_str(&format!("node {}: {}\n", cell(&e.node), escape(&e.error)));
    }
    out
}

/// Rows as aligned columns, two spaces apart.
fn table(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `sha256:0123456789ab…` → `sha256:0123456789ab`.
/// A pool's rollout is complete: every node wanted is there, on the
/// target generation, and Ready.
pub fn rollout_complete(p: &kiln_core::PoolStatus) -> bool {
    p.out_of_date == 0 && p.up_to_date == p.desired && p.ready >= p.desired
}

/// One line on a pool's rollout, as `kiln rollout` prints it.
pub fn rollout_line(p: &kiln_core::PoolStatus) -> String {
    let target = p.target.map_or_else(|| "none (image not served)".to_string(), |t| short_digest(&t.to_string()));
    let state = if p.rollout.paused {
        "paused".to_string()
    } else if rollout_complete(p) {
        "complete".to_string()
    } else if p.out_of_date > 0 {
        "rolling".to_string()
    } else {
        "scaling".to_string()
    };
    let mut line = format!(
        "pool {}: {state}: target {target}{}; {} desired, {} up to date, {} out of date, {} ready (max-surge {}, max-unavailable {})",
        p.name,
        if p.rollout.undone_to.is_some() { " (undone to the previous generation)" } else { "" },
        p.desired,
        p.up_to_date,
        p.out_of_date,
        p.ready,
        p.rollout.max_surge,
        p.rollout.max_unavailable,
    );
    if let Some(min) = p.rollout.min_ready_seen {
        line.push_str(&format!("; fewest ready while rolling: {min}"));
    }
    line
}

pub fn short_digest(d: &str) -> String {
    d.chars().take(19).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Node {
        let now = time::OffsetDateTime::now_utc();
        Node {
            name: name.into(),
            machine_id: "0".repeat(32),
            hostname: name.into(),
            macs: vec!["52:54:00:00:00:01".parse().unwrap()],
            addresses: vec!["10.0.2.15".parse().unwrap()],
            cpus: 1,
            memory_bytes: 1,
            kernel: "6.1".into(),
            agent_version: "0.1.0".into(),
            image_digest: "sha256:0123456789abcdef".into(),
            metrics: None,
            pool: None,
            host: None,
            out_of_date: None,
            subnet: None,
            public_ip: None,
            vtep_mac: None,
            registered_at: now,
            last_seen: now,
            pending: false,
            state: None,
        }
    }

    #[test]
    fn escape_cases() {
        for (raw, shown) in [
            ("plain text", "plain text"),
            ("sha256:\x1b[2J", "sha256:\\x1b[2J"),
            ("a\r\nb", "a\\r\\nb"),
            ("bell\x07", "bell\\x07"),
            ("c1\u{9b}", "c1\\x9b"),
            ("rtl\u{202e}", "rtl\\u{202e}"),
            ("del\x7f", "del\\x7f"),
        ] {
            assert_eq!(escape(raw), shown, "{raw:?}");
        }
    }

    #[test]
    fn node_table_escapes_and_cuts_what_nodes_sent() {
        let good = node("node-1");
        // (case, node, text the row must show)
        let cases: Vec<(&str, Node, &str)> = vec![
            ("plain", good.clone(), "52:54:00:00:00:01"),
            ("ESC and CR-LF in the digest", Node { image_digest: "sha256:\x1b[2J\r\nX".into(), ..good.clone() }, "sha256:\\x1b[2J\\r\\nX"),
            ("3000 MACs", Node { macs: vec!["52:54:00:00:00:02".parse().unwrap(); 3000], ..good.clone() }, "+2998"),
            ("long name", Node { name: "n".repeat(5000), ..good.clone() }, "…"),
            ("ESC in the pool", Node { pool: Some("p\x1b]0;t\x07".into()), ..good.clone() }, "p\\x1b]0;t\\x07"),
        ];
        for (case, n, shown) in cases {
            let table = node_table(&[n]);
            assert!(table.contains(shown), "case {case}: {table}");
            assert!(!table.bytes().any(|b| b.is_ascii_control() && b != b'\n'), "case {case}: no control byte: {table:?}");
            assert_eq!(table.lines().count(), 2, "case {case}: one line per node");
            assert!(table.lines().all(|l| l.chars().count() <= 300), "case {case}: rows stay short: {table}");
        }
    }
}
