//! Trust (issue 13), against the real `kiln serve` over real TLS and the
//! real `kiln` CLI: what anyone on the boot network can fetch opens no
//! operator route; operator routes need an operator's certificate of kiln's
//! own CA (one of another CA fails the handshake; a revoked one gets 403);
//! join tokens (`kiln token create`) join and do nothing else, and are
//! refused with the reason when expired, used up, deleted or for another
//! pool, recording nothing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_client::StatusCode;
use kiln_control::StateDir;
use kiln_tests::{KilnServer, binaries, block_on, fake_image, node_request};

/// Every operator route: (method, path).
const OPERATOR_ROUTES: [(&str, &str); 9] = [
    ("GET", "/api/v1/nodes"),
    ("GET", "/api/v1/sd"),
    ("GET", "/api/v1/profiles"),
    ("GET", "/api/v1/groups"),
    ("GET", "/api/v1/pools"),
    ("POST", "/api/v1/pools/tiny/scale"),
    ("GET", "/api/v1/tokens"),
    ("POST", "/api/v1/tokens"),
    ("DELETE", "/api/v1/tokens/abcdef"),
];

/// `kiln ARGS --server API --state STATE`: success, stdout, stderr.
fn kiln(server: &KilnServer, args: &[&str]) -> (bool, String, String) {
    server.cli(args)
}

/// `kiln token create ARGS --json`: the token and its info.
fn create_token(server: &KilnServer, args: &[&str]) -> kiln_core::CreateTokenResponse {
    let (ok, out, err) = kiln(server, &[&["token", "create", "--json"][..], args].concat());
    assert!(ok, "kiln token create {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kiln token create --json: {e}: {out}"))
}

/// Each operator route called with `token` as the bearer token and no
/// client certificate: its status.
fn operator_statuses(server: &KilnServer, token: Option<&str>) -> Vec<(String, u16)> {
    let client = server.anonymous_client();
    OPERATOR_ROUTES
        .iter()
        .map(|(method, path)| {
            let mut req = client.request(method.parse().unwrap(), format!("{}{path}", server.api)).body(r#"{"replicas": 1}"#);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let status = req.send().unwrap_or_else(|e| panic!("{method} {path}: {}", kiln_tests::chain(&e))).status().as_u16();
            (format!("{method} {path}"), status)
        })
        .collect()
}

/// The MAC the profiles of [`start`] select by MAC: a machine kiln expects.
const EXPECTED_MAC: &str = "52-54-00-12-34-56";

/// `kiln serve` with a fake `tiny` image and profiles: a group selecting
/// [`EXPECTED_MAC`] and a default group for every other machine.
fn start(tmp: &Path) -> KilnServer {
    start_with(tmp, &[])
}

fn start_with(tmp: &Path, args: &[&str]) -> KilnServer {
    let images = tmp.join("images");
    if !images.exists() {
        fake_image(&images, "tiny");
    }
    let profiles = tmp.join("profiles");
    for (file, text) in [
        ("profiles/tiny.toml", "image = \"tiny\"\n".to_string()),
        ("groups/default.toml", "profile = \"tiny\"\n".to_string()),
        ("groups/known.toml", format!("profile = \"tiny\"\n[selector]\nmac = \"{EXPECTED_MAC}\"\n")),
    ] {
        let path = profiles.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
    }
    let profiles = profiles.to_str().unwrap().to_string();
    KilnServer::start_with(&images, &tmp.join("state"), &[&["--profiles", profiles.as_str()][..], args].concat())
}

#[test]
fn nothing_the_boot_port_hands_out_opens_an_operator_route() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path());
    for (route, status) in operator_statuses(&server, None) {
        assert_eq!(status, 401, "{route} without a credential");
    }

    // Everything an unauthenticated client fetches from the boot port, for
    // a machine kiln expects (its group selects its MAC) and for any other,
    // every word of it, tried as a bearer token (and so as a join token).
    let anyone = server.anonymous_client();
    let mut fetched = String::new();
    for mac in [EXPECTED_MAC, "52-54-00-99-99-99"] {
        for path in ["/boot.ipxe".to_string(), format!("/ipxe?mac={mac}&uuid=&arch=x86_64")]
            .into_iter()
            .chain(["meta-data", "user-data", "network-config", "vendor-data"].map(|f| format!("/cloud-init/{mac}/{f}")))
        {
            let resp = anyone.get(format!("{}{path}", server.url)).send().unwrap();
            // The profile has no network-config: 404, nothing handed out.
            if resp.status() == 404 && path.ends_with("network-config") {
                continue;
            }
            assert_eq!(resp.status(), 200, "GET {path}");
            let text = resp.text().unwrap();
            // Only the expected machine's script and seed carry a token.
            let carries = text.contains("kiln.token=");
            assert_eq!(carries, mac == EXPECTED_MAC && (path.contains("ipxe?") || path.ends_with("user-data")), "{path}: {text}");
            fetched.push_str(&text);
            fetched.push('\n');
        }
    }
    let mut words: Vec<&str> =
        fetched.split(|c: char| c.is_whitespace() || matches!(c, '=' | '"' | '\'' | ',')).filter(|w| w.len() >= 6).collect();
    words.sort();
    words.dedup();
    assert!(words.iter().any(|w| kiln_core::JoinSecret::parse(w).is_ok()), "the minted token is among the words tried");
    assert!(!StateDir::new(&server.state).retired_bootstrap_token().exists(), "no shared bootstrap token is kept");
    for word in &words {
        for (route, status) in operator_statuses(&server, Some(word)) {
            assert!(matches!(status, 401 | 403), "{route} with {word:?} from the boot port: {status}");
        }
    }

    // A join token made by the operator opens no operator route either.
    let join = create_token(&server, &[]);
    for (route, status) in operator_statuses(&server, Some(&join.token)) {
        assert_eq!(status, 401, "{route} with a join token");
    }
}

#[test]
fn operators_are_this_cas_and_revocation_holds_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path());
    let (ok, out, err) = kiln(&server, &["nodes", "--json"]);
    assert!(ok && out.trim() == "[]", "the operator's CLI reads nodes with STATE/admin.pem: {out}{err}");

    // A certificate that says "operator", from another CA: no handshake.
    let other = tmp.path().join("other-ca");
    let ca = kiln_control::tls::Ca::load_or_create(&other).unwrap();
    let subject = kiln_control::tls::Subject { role: kiln_control::tls::Role::Operator, name: "admin".into() };
    let (cert, key) = ca.issue_client_with_key(&subject, Duration::from_secs(3600)).unwrap();
    let forged = server.api_client_as(Some(format!("{cert}{key}").as_bytes()));
    let e = block_on(forged.nodes()).expect_err("a client certificate of another CA");
    assert_eq!(e.status(), None, "refused in the TLS handshake, before any HTTP answer: {}", kiln_client::chain(&e));

    // Another operator: issued, used, revoked; the server sees it at once.
    let dir = tmp.path().join("alice");
    let (ok, out, err) = Command::new(&binaries().kiln)
        .args(["admin-cert", "issue", "--name", "alice", "--out"])
        .arg(&dir)
        .arg("--state")
        .arg(&server.state)
        .output()
        .map(|o| (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned()))
        .unwrap();
    assert!(ok, "kiln admin-cert issue: {out}{err}");
    let alice = dir.join("alice.pem");
    let (ok, _, err) = kiln(&server, &["nodes", "--cert", alice.to_str().unwrap()]);
    assert!(ok, "alice's certificate is an operator's: {err}");
    let out = Command::new(&binaries().kiln).args(["admin-cert", "revoke", "alice", "--state"]).arg(&server.state).output().unwrap();
    assert!(out.status.success(), "kiln admin-cert revoke: {}", String::from_utf8_lossy(&out.stderr));
    let (ok, _, err) = kiln(&server, &["nodes", "--cert", alice.to_str().unwrap()]);
    assert!(!ok && err.contains("403") && err.contains("revoked"), "a revoked operator, without a restart: {err}");
    assert!(kiln(&server, &["nodes"]).0, "admin still works");
}

#[test]
fn join_tokens_join_and_nothing_else_and_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = start(tmp.path());
    let once = create_token(&server, &["--uses", "1", "--description", "one node"]);
    assert_eq!(once.info.uses_left, Some(1));
    let (id, secret) = once.token.split_once('.').expect("ID.SECRET");
    assert_eq!((id.len(), secret.len()), (6, 16), "kubeadm's form: {}", once.token);

    // It joins once, and only joins.
    let joined =
        block_on(server.api_client_as(None).with_token(&once.token).register(&node_request(1))).expect("a fresh one-use token joins");
    let node = server.api_client_as(None).with_token(&joined.token);
    block_on(node.heartbeat()).expect("the node's own token heartbeats");
    let e = block_on(server.api_client_as(None).with_token(&once.token).heartbeat()).expect_err("a join token is no node token");
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "{}", kiln_client::chain(&e));

    // (token, why it is refused, status, what the answer says)
    let expiring = create_token(&server, &["--ttl", "1s"]);
    let deleted = create_token(&server, &[]);
    let (ok, _, err) = kiln(&server, &["token", "delete", &deleted.info.id]);
    assert!(ok, "kiln token delete: {err}");
    let other_pool = create_token(&server, &["--pool", "gpu"]);
    std::thread::sleep(Duration::from_millis(2100));
    let cases = [
        (once.token.as_str(), "used up", StatusCode::UNAUTHORIZED, "used"),
        (expiring.token.as_str(), "expired", StatusCode::UNAUTHORIZED, "expired"),
        (deleted.token.as_str(), "deleted", StatusCode::UNAUTHORIZED, deleted.info.id.as_str()),
        (other_pool.token.as_str(), "for another pool", StatusCode::FORBIDDEN, "pool"),
        ("abcdef.0123456789abcdef", "never made", StatusCode::UNAUTHORIZED, "abcdef"),
    ];
    for (i, (token, why, status, says)) in cases.into_iter().enumerate() {
        let e = block_on(server.api_client_as(None).with_token(token).register(&node_request(10 + i)))
            .expect_err(&format!("a {why} token is refused"));
        assert_eq!(e.status(), Some(status), "a {why} token: {}", kiln_client::chain(&e));
        assert!(kiln_client::chain(&e).contains(says), "a {why} token: the answer says {says:?}: {}", kiln_client::chain(&e));
    }
    let names: Vec<String> = server.nodes().into_iter().map(|n| n.name).collect();
    assert_eq!(names, std::slice::from_ref(&joined.name), "nothing recorded for the refused tokens");
    assert!(server.log().contains("audit: join token created"), "token actions are audited:\n{}", server.log());

    // Listed without secrets, the same after a restart on the same state.
    for round in ["first", "after a restart"] {
        let (ok, table, err) = kiln(&server, &["token", "list"]);
        assert!(ok, "kiln token list: {err}");
        let (_, json, _) = kiln(&server, &["token", "list", "--json"]);
        // An expired token is listed until the sweep (at start, then every
        // minute) removes it.
        let live: &[&kiln_core::CreateTokenResponse] =
            if round == "first" { &[&once, &expiring, &other_pool] } else { &[&once, &other_pool] };
        for t in live {
            let (id, secret) = t.token.split_once('.').unwrap();
            assert!(table.contains(id) && json.contains(id), "{round}: {id} listed:\n{table}");
            assert!(!table.contains(secret) && !json.contains(secret), "{round}: never the secret:\n{table}\n{json}");
        }
        if round != "first" {
            assert!(!json.contains(&expiring.info.id), "{round}: the expired token is swept: {json}");
            assert!(server.log().contains("removed expired join tokens"), "the sweep says so:\n{}", server.log());
        }
        assert!(!json.contains(&deleted.info.id), "{round}: a deleted token is gone: {json}");
        let list: Vec<kiln_core::JoinTokenInfo> = serde_json::from_str(&json).unwrap();
        let used = list.iter().find(|t| t.id == once.info.id).expect("the one-use token");
        assert_eq!((used.used, used.uses_left), (1, Some(0)), "{round}: its use counted once");
        if round == "first" {
            drop(server);
            server = start(tmp.path());
        }
    }
}

#[test]
fn an_agent_renews_a_ten_second_certificate_and_heartbeats_for_a_minute() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    fake_image(&images, "tiny");
    let server = KilnServer::start_with(&images, &tmp.path().join("state"), &["--node-cert-ttl", "10s"]);
    let token = create_token(&server, &["--uses", "1"]).token;
    let cmdline = tmp.path().join("cmdline");
    std::fs::write(&cmdline, "console=ttyS0\n").unwrap();
    let identity = tmp.path().join("identity");
    let mut cmd = Command::new(&binaries().agent);
    cmd.args(["--server", &server.api, "--token", &token, "--no-metrics", "--no-flannel"])
        .arg("--machine-id")
        .arg(tmp.path().join("machine-id"))
        .arg("--cmdline")
        .arg(&cmdline)
        .arg("--ca")
        .arg(StateDir::new(&server.state).ca_cert())
        .arg("--identity-dir")
        .arg(&identity)
        .env_remove("JOURNAL_STREAM")
        .env("RUST_LOG", "info");
    let log = tmp.path().join("agent.log");
    let _agent = kiln_tests::Process::spawn_logged(cmd, "kiln-agent", &log);
    let registered = kiln_tests::wait_for(Duration::from_secs(30), || server.nodes().into_iter().next());
    let node = registered.unwrap_or_else(|| panic!("the agent registered:\n{}", kiln_tests::read_log(&log)));
    let mode = |p: &Path| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777;
    assert_eq!(mode(&identity), 0o700, "the identity directory");
    assert_eq!(mode(&identity.join("node-key.pem")), 0o600, "the node's key");

    std::thread::sleep(Duration::from_secs(60));
    let text = std::fs::read_to_string(&log).unwrap();
    let renewals = text.matches("renewed this node's certificate").count();
    assert!(renewals >= 6, "a 10 s certificate renewed at two thirds of its life, for a minute: {renewals} times\n{text}");
    assert!(!text.contains("registering again") && !text.contains("heartbeat:"), "no heartbeat failed, no registration again:\n{text}");
    let now = server.nodes();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0].name, node.name);
    let age = std::time::SystemTime::now().duration_since(now[0].last_seen.into()).unwrap_or_default();
    assert!(age < Duration::from_secs(15), "it heartbeats still: last seen {age:?} ago\n{text}");
}

/// A new key: a CSR for it and the key itself (PEM), as the agent makes them.
fn node_key() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap().pem().unwrap();
    (csr, key.serialize_pem())
}

#[test]
fn a_node_certificate_opens_its_own_routes_only_and_a_copy_gets_409() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path());
    let token = create_token(&server, &["--uses", "3"]).token;
    let joining = server.api_client_as(None).with_token(&token);
    let (csr, key) = node_key();
    let mut req = node_request(7);
    req.csr = Some(csr);
    let joined = block_on(joining.register(&req)).expect("a node with a key joins");
    let cert = joined.certificate.as_ref().expect("over TLS with a CSR, a client certificate");
    let node = server.api_client_as(Some(format!("{}{key}", cert.pem).as_bytes()));

    block_on(node.heartbeat_node(&joined.name)).expect("its certificate heartbeats for itself");
    let e = block_on(node.heartbeat_node("node-8")).expect_err("for another node");
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{}", kiln_client::chain(&e));
    for (what, status) in [
        ("GET /api/v1/nodes", block_on(node.nodes()).err().and_then(|e| e.status())),
        ("GET /api/v1/sd", block_on(node.sd()).err().and_then(|e| e.status())),
        ("GET /api/v1/tokens", block_on(node.tokens()).err().and_then(|e| e.status())),
    ] {
        assert_eq!(status, Some(StatusCode::FORBIDDEN), "a node's certificate on {what}");
    }
    let e = block_on(server.api_client_as(None).with_token(&joined.token).heartbeat()).expect_err("its token alone");
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "a node with a key proves itself with it: {}", kiln_client::chain(&e));

    // The same machine id from another key, with a valid token: 409, and
    // nothing of the node changes.
    let before = server.nodes();
    let (other_csr, _) = node_key();
    let mut copy = node_request(7);
    copy.csr = Some(other_csr);
    copy.public_ip = Some("192.0.2.8".parse().unwrap());
    let e = block_on(joining.register(&copy)).expect_err("a copied machine id");
    assert_eq!(e.status(), Some(StatusCode::CONFLICT), "{}", kiln_client::chain(&e));
    assert!(kiln_client::chain(&e).contains(&joined.name), "names the node: {}", kiln_client::chain(&e));
    assert_eq!(server.nodes(), before, "nothing changed");
    block_on(node.heartbeat_node(&joined.name)).expect("the node keeps working");
}

/// `kiln-agent` as a node runs it, on this host: `--server` and `--token`
/// (none: the machine waits as pending), its own identity directory.
fn agent(server: &KilnServer, dir: &Path, token: Option<&str>) -> kiln_tests::Process {
    std::fs::create_dir_all(dir).unwrap();
    let cmdline = dir.join("cmdline");
    std::fs::write(&cmdline, "console=ttyS0\n").unwrap();
    let mut cmd = Command::new(&binaries().agent);
    cmd.args(["--server", &server.api, "--no-metrics", "--no-flannel"])
        .args(token.map(|t| ["--token", t]).into_iter().flatten())
        .arg("--machine-id")
        .arg(dir.join("machine-id"))
        .arg("--cmdline")
        .arg(&cmdline)
        .arg("--ca")
        .arg(StateDir::new(&server.state).ca_cert())
        .arg("--identity-dir")
        .arg(dir.join("identity"))
        .env_remove("JOURNAL_STREAM")
        .env("RUST_LOG", "info");
    kiln_tests::Process::spawn_logged(cmd, "kiln-agent", &dir.join("agent.log"))
}

/// The `kiln.token=` of a script or seed, if any.
fn token_in(text: &str) -> Option<String> {
    let at = text.find("kiln.token=")? + "kiln.token=".len();
    Some(text[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '.').collect())
}

#[test]
fn boot_tokens_are_one_use_and_bound_to_the_mac_and_strangers_wait_for_approval() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start(tmp.path());
    let anyone = server.anonymous_client();
    let get = |path: &str| anyone.get(format!("{}{path}", server.url)).send().unwrap().text().unwrap();

    // An expected machine's script and seed carry the same minted token,
    // however often they are fetched.
    let script = get(&format!("/ipxe?mac={EXPECTED_MAC}"));
    let minted = token_in(&script).unwrap_or_else(|| panic!("a token in the expected machine's script: {script}"));
    for _ in 0..5 {
        assert_eq!(token_in(&get(&format!("/cloud-init/{EXPECTED_MAC}/user-data"))), Some(minted.clone()), "the seed's is the script's");
        assert_eq!(token_in(&get(&format!("/ipxe?mac={EXPECTED_MAC}"))), Some(minted.clone()), "fetching again mints nothing new");
    }
    let (_, list, _) = kiln(&server, &["token", "list", "--json"]);
    let list: Vec<kiln_core::JoinTokenInfo> = serde_json::from_str(&list).unwrap();
    let id = minted.split('.').next().unwrap();
    let info = list.iter().find(|t| t.id == id).expect("the minted token is listed");
    assert_eq!((info.uses_left, info.mac.map(|m| m.hyphenated())), (Some(1), Some(EXPECTED_MAC.to_string())), "{info:?}");
    let lifetime = std::time::SystemTime::from(info.expires.unwrap()).duration_since(std::time::SystemTime::now()).unwrap();
    assert!(
        lifetime > Duration::from_secs(14 * 60) && lifetime <= Duration::from_secs(30 * 60),
        "valid for at most 30 minutes: {lifetime:?}"
    );
    assert_eq!(list.len(), 1, "one token for all those fetches: {list:?}");

    // It joins only the machine with that MAC, once.
    let joining = server.api_client_as(None).with_token(&minted);
    let e = block_on(joining.register(&node_request(1))).expect_err("another MAC");
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{}", kiln_client::chain(&e));
    let mut expected = node_request(2);
    expected.macs = vec![EXPECTED_MAC.parse().unwrap()];
    let joined = block_on(joining.register(&expected)).expect("the machine with the MAC joins");
    assert!(joined.lease.is_some() && !joined.pending, "{joined:?}");
    let mut again = node_request(3);
    again.macs = expected.macs.clone();
    let e = block_on(joining.register(&again)).expect_err("used up");
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "{}", kiln_client::chain(&e));
    let next = token_in(&get(&format!("/ipxe?mac={EXPECTED_MAC}"))).expect("a token again");
    assert_ne!(next, minted, "once used, the next boot gets another");

    // Any other machine gets no token: its agent registers as pending.
    assert_eq!(token_in(&get("/ipxe?mac=52-54-00-99-99-99")), None);
    assert_eq!(token_in(&get("/ipxe")), None);
    let stranger = tmp.path().join("stranger");
    let agent_a = agent(&server, &stranger, None);
    let pending = kiln_tests::wait_for(Duration::from_secs(30), || server.nodes().into_iter().find(|n| n.pending));
    let pending = pending.unwrap_or_else(|| panic!("the stranger is pending:\n{}", kiln_tests::read_log(&stranger.join("agent.log"))));
    assert_eq!((pending.subnet, pending.public_ip, pending.vtep_mac), (None, None, None), "no lease while pending: {pending:?}");
    let (ok, table, _) = kiln(&server, &["nodes"]);
    let row = table.lines().find(|l| l.starts_with(&pending.name)).unwrap_or_default();
    assert!(ok && row.contains(" Pending "), "kiln nodes shows it Pending:\n{table}");
    assert_eq!(server.nodes().iter().find(|n| n.name == pending.name).and_then(|n| n.state), Some(kiln_core::NodeState::Pending));
    let sd = block_on(server.api_client().sd()).unwrap();
    assert!(sd.iter().all(|g| g.labels.get("node") != Some(&pending.name)), "a pending node is not scraped: {sd:?}");
    std::thread::sleep(Duration::from_secs(6));
    let still = server.nodes().into_iter().find(|n| n.name == pending.name).expect("still listed");
    assert!(still.pending && still.subnet.is_none(), "it stays pending until approved: {still:?}");
    let log = kiln_tests::read_log(&stranger.join("agent.log"));
    assert!(log.contains(&format!("kiln nodes approve {}", pending.name)), "the agent says what it waits for:\n{log}");

    // Approved, it joins on its next try, without a restart (with its
    // certificate; this agent runs no overlay, so it asks for no lease).
    let (ok, out, err) = kiln(&server, &["nodes", "approve", &pending.name]);
    assert!(ok && out.contains("approved"), "kiln nodes approve: {out}{err}");
    let joined =
        kiln_tests::wait_for(Duration::from_secs(20), || server.nodes().into_iter().find(|n| n.name == pending.name && !n.pending));
    assert!(joined.is_some(), "approved, it joins:\n{}", kiln_tests::read_log(&stranger.join("agent.log")));
    assert!(server.log().contains("audit: node approved"), "approval is audited:\n{}", server.log());
    let registered = kiln_tests::wait_for(Duration::from_secs(10), || {
        let log = kiln_tests::read_log(&stranger.join("agent.log"));
        (log.contains("registered with") && log.contains("client certificate")).then_some(())
    });
    assert!(registered.is_some(), "{}", kiln_tests::read_log(&stranger.join("agent.log")));

    // Killed (a power cut: it does not leave) and started again with no
    // token, it registers again by its own key at once.
    let mut agent_a = agent_a;
    agent_a.signal_and_wait(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(5)).expect("the agent is killed");
    drop(agent_a);
    let before = server.nodes().into_iter().find(|n| n.name == pending.name).unwrap();
    std::fs::remove_file(stranger.join("agent.log")).unwrap();
    let _agent_b = agent(&server, &stranger, None);
    let back = kiln_tests::wait_for(Duration::from_secs(20), || {
        kiln_tests::read_log(&stranger.join("agent.log")).contains("registered with").then_some(())
    });
    assert!(back.is_some(), "its own key: {}", kiln_tests::read_log(&stranger.join("agent.log")));
    let after = server.nodes().into_iter().find(|n| n.name == pending.name).unwrap();
    assert_eq!(
        (&after.name, after.registered_at, after.pending),
        (&before.name, before.registered_at, false),
        "the same node, not pending again"
    );
    assert!(server.log().contains("with=its own key"), "registered again by its key:\n{}", server.log());
}

#[test]
fn auto_approve_lets_a_machine_with_no_token_join() {
    let tmp = tempfile::tempdir().unwrap();
    let server = start_with(tmp.path(), &["--auto-approve"]);
    let answer = block_on(server.api_client_as(None).register(&node_request(4))).expect("no token, --auto-approve");
    assert!(!answer.pending && answer.lease.is_some(), "{answer:?}");
    assert!(server.log().contains("--auto-approve"), "the server warns of it:\n{}", server.log());
}
