//! Hostile input against the real `kiln serve` on loopback (issue 15,
//! items 4 and 5): registrations with control characters, huge fields and
//! out-of-range numbers are refused with a 400 naming the field and nothing
//! is stored; an upper-case machine id is the same machine; `kiln nodes`
//! prints what nodes sent escaped and short; a `Host` header that is not a
//! host and port never reaches a script; the state directory is 0700 and
//! its files 0600, start after start, and a file opened up by hand is
//! named in a warning.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_client::StatusCode;
use kiln_control::StateDir;
use kiln_control::store::Store;
use kiln_tests::{KilnServer, binaries, block_on, fake_image, node_request, wait_for};

/// The longest row `kiln nodes` may print.
const ROW_BOUND: usize = 400;

/// `kiln nodes [--json]` against `server`, through the real binary: its stdout.
fn kiln_nodes(server: &KilnServer, json: bool) -> String {
    let mut cmd = Command::new(&binaries().kiln);
    cmd.arg("nodes").args(["--server", &server.api]).arg("--state").arg(&server.state);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("kiln nodes runs");
    assert!(out.status.success(), "kiln nodes: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("kiln nodes prints UTF-8")
}

/// What `kiln nodes` printed holds no control byte and no long row.
fn assert_tame(table: &str) {
    assert!(!table.bytes().any(|b| b == 0x1b), "no ESC byte reaches the terminal: {table:?}");
    assert!(!table.bytes().any(|b| b.is_ascii_control() && b != b'\n'), "no control byte: {table:?}");
    for row in table.lines() {
        assert!(row.chars().count() <= ROW_BOUND, "a row of {} characters: {}", row.chars().count(), &row[..200.min(row.len())]);
    }
}

/// A GET with exactly this `Host` header, on a raw connection: status and body.
fn get_with_host(port: u16, path: &str, host: &str) -> (u16, String) {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(conn, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {answer:?}"));
    (status, answer)
}

fn server(tmp: &Path) -> KilnServer {
    let images = tmp.join("images");
    fake_image(&images, "tiny");
    KilnServer::start(&images, &tmp.join("state"))
}

#[test]
fn hostile_registrations_are_refused_and_nothing_is_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server(tmp.path());
    let boot = server.joining_client();
    // Machine id `0…0ab`: it has an upper-case spelling.
    let first = block_on(boot.register(&node_request(0xab))).unwrap();
    let before = kiln_nodes(&server, true);

    let good = node_request(2);
    let macs = (0..3000).map(|i| format!("52:54:00:01:{:02x}:{:02x}", i / 256, i % 256).parse().unwrap()).collect();
    // (case, registration, the field the 400 names)
    let cases = [
        (
            "ESC[2J and CR-LF in image_digest",
            kiln_core::RegisterRequest { image_digest: "sha256:\x1b[2J\r\nforged".into(), ..good.clone() },
            "image_digest",
        ),
        ("60 KiB kernel", kiln_core::RegisterRequest { kernel: "6".repeat(60 * 1024), ..good.clone() }, "kernel"),
        ("3000 MACs", kiln_core::RegisterRequest { macs, ..good.clone() }, "macs"),
        ("uplink_mtu 0", kiln_core::RegisterRequest { uplink_mtu: Some(0), ..good.clone() }, "uplink_mtu"),
        // What the server would scrape and hand to Prometheus: the node's own
        // routable IP:PORT only.
        (
            "metrics with a path",
            kiln_core::RegisterRequest { metrics: Some("127.0.0.1:18999/internal/admin?secret=1&x=".into()), ..good.clone() },
            "metrics",
        ),
        ("metrics on another host", kiln_core::RegisterRequest { metrics: Some("192.0.2.200:9100".into()), ..good.clone() }, "metrics"),
        ("metrics port out of range", kiln_core::RegisterRequest { metrics: Some("192.0.2.3:70000".into()), ..good.clone() }, "metrics"),
        (
            "metrics on loopback, claimed",
            kiln_core::RegisterRequest {
                addresses: vec!["127.0.0.1".parse().unwrap()],
                metrics: Some("127.0.0.1:18999".into()),
                public_ip: None,
                ..good.clone()
            },
            "metrics",
        ),
        (
            "public_ip not its own",
            kiln_core::RegisterRequest { public_ip: Some("203.0.113.9".parse().unwrap()), ..good.clone() },
            "public_ip",
        ),
    ];
    for (case, req, field) in cases {
        let err = block_on(boot.register(&req)).expect_err(case);
        assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST), "case {case}: {err}");
        assert!(err.to_string().contains(field), "case {case}: the answer names {field}: {err}");
    }
    assert_eq!(kiln_nodes(&server, true), before, "nothing stored: `kiln nodes --json` unchanged");
    assert!(!server.log().contains('\x1b'), "no ESC byte in the server's log");

    let mut upper = node_request(0xab);
    upper.machine_id = upper.machine_id.to_uppercase();
    assert!(upper.machine_id.ends_with("AB"));
    let again = block_on(boot.register(&upper)).unwrap();
    assert_eq!(again.name, first.name, "an upper-case machine id is the same machine");
    let nodes = server.nodes();
    assert_eq!(nodes.len(), 1, "not a second identity: {nodes:?}");
    assert_eq!(nodes[0].machine_id, node_request(0xab).machine_id, "stored lower-case");
    assert_eq!(again.lease.map(|l| l.subnet), first.lease.map(|l| l.subnet), "the same lease");
    assert_tame(&kiln_nodes(&server, false));
}

#[test]
fn a_stored_hostile_node_prints_escaped_and_short() {
    // A registry written before fields were bounded holds what a node sent then.
    let tmp = tempfile::tempdir().unwrap();
    let state = StateDir::new(tmp.path().join("state"));
    state.create().unwrap();
    let mut node_of_old = node_request(3);
    node_of_old.image_digest = "sha256:\x1b[2J\r\nforged".into();
    node_of_old.kernel = "6".repeat(60 * 1024);
    node_of_old.macs = (0..3000).map(|i| format!("52:54:00:02:{:02x}:{:02x}", i / 256, i % 256).parse().unwrap()).collect();
    let mut node: kiln_core::Node = serde_json::from_value(serde_json::json!({
        "name": "old\u{1b}]0;owned\u{7}", "machine_id": node_of_old.machine_id, "hostname": node_of_old.hostname,
        "macs": node_of_old.macs, "addresses": node_of_old.addresses, "cpus": 1, "memory_bytes": 1,
        "kernel": node_of_old.kernel, "agent_version": "v", "image_digest": node_of_old.image_digest, "pool": "",
        "registered_at": "2026-01-01T00:00:00Z", "last_seen": "2026-01-01T00:00:00Z",
    }))
    .unwrap();
    // Heard from just now: one silent for the lease TTL (24 h) is removed at start.
    node.last_seen = std::time::SystemTime::now().into();
    let record = kiln_control::store::NodeRecord { node, token_sha256: "0".repeat(64), key_sha256: None };
    {
        let store = kiln_control::store::embedded::DbStore::open(&state.registry_db(), None).unwrap();
        block_on(store.put(record, false)).unwrap();
    }
    let images = tmp.path().join("images");
    fake_image(&images, "tiny");
    let server = KilnServer::start(&images, state.root());
    let table = kiln_nodes(&server, false);
    assert_tame(&table);
    assert!(table.contains("\\x1b[2J"), "the ESC is shown escaped: {table}");
    assert!(table.contains("+2998"), "the MAC list is cut and counted: {table}");
    let json: Vec<kiln_core::Node> = serde_json::from_str(&kiln_nodes(&server, true)).unwrap();
    assert_eq!(json[0].macs.len(), 3000, "--json keeps every byte, escaped by JSON");
}

#[test]
fn a_host_header_that_is_not_a_host_never_reaches_a_script() {
    let tmp = tempfile::tempdir().unwrap();
    let server = server(tmp.path());
    let evil = "10.0.0.1 kiln.server=http://attacker:1 x";
    let good = format!("10.0.2.2:{}", server.port());
    for path in ["/boot.ipxe", "/ipxe?mac=52-54-00-12-34-56&arch=x86_64", "/cloud-init/52-54-00-12-34-56/user-data"] {
        let (status, answer) = get_with_host(server.port(), path, evil);
        assert_eq!(status, 400, "{path}: {answer}");
        assert!(!answer.contains("attacker") && !answer.contains("kiln.server="), "{path}: no script carries it: {answer}");
        let (status, answer) = get_with_host(server.port(), path, &good);
        assert_eq!(status, 200, "{path} with a good Host: {answer}");
        assert!(!answer.contains("attacker"), "{answer}");
    }
    let (_, script) = get_with_host(server.port(), "/ipxe?mac=52-54-00-12-34-56&arch=x86_64", &good);
    assert!(script.contains(&format!("kiln.server=https://10.0.2.2:{} ", server.api_port())), "{script}");
    assert!(server.log().lines().all(|l| !l.contains("attacker:1 x")), "not in the log unescaped either");
}

/// The mode bits of `path`.
fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every entry of the state directory with its mode, and the directory's.
fn modes(state: &StateDir) -> Vec<(String, u32)> {
    let mut out = vec![(".".to_string(), mode(state.root()))];
    let mut files: Vec<(String, u32)> = std::fs::read_dir(state.root())
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), mode(&e.path())))
        .collect();
    files.sort();
    out.extend(files);
    out
}

#[test]
fn the_state_directory_is_private_start_after_start() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    fake_image(&images, "tiny");
    let state = StateDir::new(tmp.path().join("state"));
    let want = |names: &[&str]| -> Vec<(String, u32)> {
        let mut v = vec![(".".to_string(), 0o700)];
        v.extend(names.iter().map(|n| (n.to_string(), 0o600)));
        v
    };
    let files = ["admin-key.pem", "admin.pem", "ca-key.pem", "ca.pem", "operators.json", "registry.redb", "sd-token"];
    for start in ["first", "second"] {
        let server = KilnServer::start(&images, state.root());
        let got = modes(&state);
        assert_eq!(got, want(&files), "{start} start: the directory 0700, every file 0600");
        assert!(!server.log().contains("more open"), "{start} start: nothing to warn about: {}", server.log());
    }

    // Opened up by hand: named at the next start, and left as the operator set it.
    std::fs::set_permissions(state.ca_cert(), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(state.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = KilnServer::start(&images, state.root());
    let warned = wait_for(Duration::from_secs(5), || {
        let log = server.log();
        (log.contains("more open") && log.contains("ca.pem") && log.lines().any(|l| l.contains("more open") && l.contains("0755")))
            .then_some(log)
    });
    assert!(warned.is_some(), "a warning names ca.pem and the directory: {}", server.log());
    assert_eq!(mode(&state.ca_cert()), 0o644, "reported, not changed behind the operator's back");
    assert_eq!(mode(&state.registry_db()), 0o600, "the rest stays private");
}
