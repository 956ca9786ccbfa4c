//! A real Prometheus finds a real `kiln-agent` through the control plane.
//!
//! Everything runs in a network namespace the test makes (its loopback and
//! a `lan0` with `10.79.0.2/24`). `kiln serve` listens on its loopback
//! with a fake image (no guest boots here); `kiln-agent` runs in full mode,
//! registers with it and serves `/metrics` on `10.79.0.2`, which it reports
//! in its registration (the server takes only a node's own routable
//! addresses, never loopback);
//! Debian's `prometheus`, configured from `monitoring/prometheus.yml` with
//! only the control plane's URL and the intervals changed, discovers it
//! through `GET /api/v1/sd` and scrapes it. The test reads the samples back
//! through Prometheus's query API. Every process is held by a [`Process`]
//! guard, so a failing assertion still stops all three.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_core::SdTargetGroup;
use kiln_tests::{KilnServer, Netns, Process, binaries, block_on_here, fake_image, free_port, read_log, root, wait_for};

/// How long any one thing may take to show up.
const WAIT: Duration = Duration::from_secs(60);

/// The shipped scrape config.
fn shipped_config() -> PathBuf {
    root().join("monitoring/prometheus.yml")
}

/// `promtool check config PATH`: the exit status and everything it printed.
fn promtool_check_config(path: &Path) -> (bool, String) {
    let out = Command::new("promtool").arg("check").arg("config").arg(path).output().expect("promtool runs (scripts/setup installs it)");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `monitoring/prometheus.yml` with the control plane at `sd_url`, and
/// discovery and scrapes every second.
fn test_config(sd_url: &str, state: &Path) -> String {
    let state = kiln_control::StateDir::new(state);
    let mut text = std::fs::read_to_string(shipped_config()).expect("monitoring/prometheus.yml exists");
    for (from, to) in [
        ("https://127.0.0.1:8443/api/v1/sd", sd_url),
        ("/var/lib/kiln/ca.pem", &state.ca_cert().display().to_string()),
        ("/var/lib/kiln/sd-token", &state.sd_token().display().to_string()),
        ("refresh_interval: 30s", "refresh_interval: 1s"),
        ("scrape_interval: 15s", "scrape_interval: 1s"),
    ] {
        assert!(text.contains(from), "monitoring/prometheus.yml no longer contains {from:?}; update this test with it");
        text = text.replace(from, to);
    }
    text
}

/// `MemTotal` of this host, in bytes.
fn mem_total_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("a MemTotal line in /proc/meminfo");
    kib * 1024
}

/// One instant-query result: its labels and its value.
#[derive(Debug)]
struct Sample {
    labels: serde_json::Map<String, serde_json::Value>,
    value: String,
}

/// `GET /api/v1/query?query=QUERY` on Prometheus at `base`; `None` while it
/// does not answer or answers no sample.
fn query(client: &reqwest::blocking::Client, base: &str, q: &str) -> Option<Vec<Sample>> {
    let url = reqwest::Url::parse_with_params(&format!("{base}/api/v1/query"), [("query", q)]).expect("a valid URL");
    let body: serde_json::Value = client.get(url).send().ok()?.json().ok()?;
    if body["status"] != "success" {
        return None;
    }
    let samples: Vec<Sample> = body["data"]["result"]
        .as_array()?
        .iter()
        .filter_map(|r| Some(Sample { labels: r["metric"].as_object()?.clone(), value: r["value"][1].as_str()?.to_string() }))
        .collect();
    (!samples.is_empty()).then_some(samples)
}

fn label<'a>(sample: &'a Sample, name: &str) -> Option<&'a str> {
    sample.labels.get(name).and_then(|v| v.as_str())
}

#[test]
fn shipped_prometheus_config_passes_promtool() {
    let (ok, out) = promtool_check_config(&shipped_config());
    assert!(ok, "promtool check config monitoring/prometheus.yml:\n{out}");
}

#[test]
fn prometheus_scrapes_agent_found_through_sd() {
    let ns = Netns::new("psd");
    ns.add_addresses(&["10.79.0.2/24"]);
    ns.run(scrape_in_namespace);
}

/// The test, on a thread inside its namespace.
fn scrape_in_namespace() {
    let bins = binaries();
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    let manifest = fake_image(&images, "tiny");
    let server = KilnServer::start(&images, &tmp.path().join("state"));
    let token = server.join_token(Some(1));
    let client = server.client();

    // The agent, in full mode, as it runs in a node: the command line the
    // server would have booted it with carries the image digest.
    let cmdline = tmp.path().join("cmdline");
    std::fs::write(&cmdline, format!("console=ttyS0 kiln.image_digest={}\n", manifest.digest)).unwrap();
    let metrics_addr = format!("10.79.0.2:{}", free_port());
    let agent_log = tmp.path().join("agent.log");
    let mut cmd = Command::new(&bins.agent);
    // --no-flannel: this agent runs on the host itself, whose network is not the test's.
    cmd.args(["--server", &server.api, "--token", token.trim(), "--metrics-listen", &metrics_addr, "--no-flannel"])
        .arg("--machine-id")
        .arg(tmp.path().join("machine-id"))
        .arg("--cmdline")
        .arg(&cmdline)
        .arg("--ca")
        .arg(server.ca.as_ref().expect("the API is TLS"))
        .arg("--identity-dir")
        .arg(tmp.path().join("identity"))
        .arg("--textfile-dir")
        .arg(tmp.path().join("textfile"))
        .env_remove("JOURNAL_STREAM")
        .env("NO_PROXY", "127.0.0.1,10.79.0.2");
    let _agent = Process::spawn_logged(cmd, "kiln-agent", &agent_log);

    let group = wait_for(WAIT, || {
        let groups: Vec<SdTargetGroup> = block_on_here(server.api_client().sd()).ok()?;
        groups.into_iter().find(|g| g.targets == [metrics_addr.clone()])
    })
    .unwrap_or_else(|| {
        panic!("GET /api/v1/sd never listed the agent at {metrics_addr} within {WAIT:?}; agent log:\n{}", read_log(&agent_log))
    });
    let nodes = block_on_here(server.api_client().nodes()).expect("GET /api/v1/nodes");
    assert_eq!(nodes.len(), 1, "one node registered: {nodes:?}");
    let node = &nodes[0];
    assert_eq!(node.metrics.as_deref(), Some(metrics_addr.as_str()), "the agent registers where its metrics listen");
    assert_eq!(node.image_digest, manifest.digest, "the agent registers the image digest from its command line");
    assert_eq!(group.labels.get("node"), Some(&node.name), "sd labels the target with the node's name: {group:?}");
    assert_eq!(group.labels.get("image"), Some(&manifest.digest.to_string()), "sd labels the target with the image digest: {group:?}");

    // Prometheus, from the shipped config.
    let config = tmp.path().join("prometheus.yml");
    std::fs::write(&config, test_config(&format!("{}/api/v1/sd", server.api), &server.state)).unwrap();
    let (ok, out) = promtool_check_config(&config);
    assert!(ok, "promtool check config on the test's config:\n{out}");
    let prom_port = free_port();
    let prom = format!("http://127.0.0.1:{prom_port}");
    let prom_log = tmp.path().join("prometheus.log");
    let mut cmd = Command::new("/usr/bin/prometheus");
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", tmp.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .current_dir(tmp.path());
    let _prometheus = Process::spawn_logged(cmd, "prometheus", &prom_log);

    let failure = |what: &str| {
        let targets = client.get(format!("{prom}/api/v1/targets")).send().and_then(|r| r.text()).unwrap_or_else(|e| e.to_string());
        format!(
            "{what} within {WAIT:?}\nPrometheus targets: {targets}\nprometheus log:\n{}\nagent log:\n{}",
            read_log(&prom_log),
            read_log(&agent_log)
        )
    };
    let mem = wait_for(WAIT, || query(&client, &prom, "node_memory_MemTotal_bytes"))
        .unwrap_or_else(|| panic!("{}", failure("Prometheus has no node_memory_MemTotal_bytes sample")));
    assert_eq!(mem.len(), 1, "one node, one MemTotal series: {mem:?}");
    let sample = &mem[0];
    for (name, want) in [
        ("job", "kiln-nodes"),
        ("node", node.name.as_str()),
        ("image", manifest.digest.to_string().as_str()),
        ("instance", node.name.as_str()),
    ] {
        assert_eq!(label(sample, name), Some(want), "label {name} of {sample:?}");
    }
    // Prometheus drops labels with empty values, so `pool` shows only when set.
    let pool = node.pool.as_deref();
    assert_eq!(label(sample, "pool"), pool, "label pool of {sample:?}");
    let value: f64 = sample.value.parse().unwrap_or_else(|e| panic!("value {:?} of {sample:?}: {e}", sample.value));
    assert_eq!(value, mem_total_bytes() as f64, "node_memory_MemTotal_bytes is MemTotal from /proc/meminfo × 1024");

    let up = wait_for(WAIT, || query(&client, &prom, r#"up{job="kiln-nodes"}"#))
        .unwrap_or_else(|| panic!("{}", failure("Prometheus has no up{job=\"kiln-nodes\"} sample")));
    assert_eq!(up.len(), 1, "one target: {up:?}");
    assert_eq!(label(&up[0], "instance"), Some(node.name.as_str()), "the target's instance is the node name: {up:?}");
    assert_eq!(up[0].value, "1", "the target is up: {}", failure("up is not 1"));
}
