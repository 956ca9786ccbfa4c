//! The entry points of the network-facing targets: the proxyDHCP answer,
//! the TFTP packet parser, the `/ipxe` query and the registration body. Each
//! takes the raw bytes an attacker controls, runs the same code the server
//! runs on them, and panics only when an invariant breaks.
//!
//! Shared as source by `bench/fuzz` (the libFuzzer targets) and
//! `pxe/tests/fuzz_parsers.rs` (which replays the committed corpus and crash
//! inputs in the normal `cargo test`): one definition, so a regression test
//! runs exactly what the fuzzer ran.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Once, OnceLock};

use kiln_core::RegisterRequest;
use kiln_pxe::dhcp::{self, ProxyConfig};
use kiln_pxe::ipxe::{BootParams, boot_script};
use kiln_pxe::profile::{Catalog, Machine};
use kiln_pxe::{ImageStore, tftp};

/// A target's entry point: the bytes an attacker sends.
pub type Entry = fn(&[u8]);

/// Every target of this module, by name.
pub const TARGETS: &[(&str, Entry)] = &[("dhcp", dhcp), ("tftp", tftp), ("ipxe_query", ipxe_query), ("register", register)];

/// The repository's root: the first ancestor of the crate being built that
/// holds the pxe fixtures (the crate is `pxe/` or `bench/fuzz/`).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors().find(|d| d.join("pxe/tests/fixtures").is_dir()).expect("the repository holds pxe/tests/fixtures").to_path_buf()
}

/// Keeps the panics `dhcp::decode` contains (debug assertions inside
/// dhcproto, caught there by `catch_unwind`) from printing, and from
/// aborting under libFuzzer, whose panic hook aborts before any unwinding:
/// a panic located in dhcproto is passed over, every other one goes to the
/// hook installed before (libFuzzer's, or the test harness's).
pub fn quiet_dhcproto_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.location().is_some_and(|l| l.file().contains("dhcproto")) {
                previous(info);
            }
        }));
    });
}

/// One packet received by the proxyDHCP server, on port 67 and on port
/// 4011: whatever it is, a reply is never an address lease and always
/// decodes again.
pub fn dhcp(data: &[u8]) {
    static CONFIG: OnceLock<ProxyConfig> = OnceLock::new();
    let config = CONFIG.get_or_init(|| ProxyConfig::new("eth0", Ipv4Addr::new(192, 0, 2, 1), "http://192.0.2.1:8080/boot.ipxe"));
    quiet_dhcproto_panics();
    for on_pxe_port in [false, true] {
        let Some((request, Some(reply))) = dhcp::answer(data, on_pxe_port, config) else { continue };
        assert_eq!(reply.yiaddr(), Ipv4Addr::UNSPECIFIED, "a proxyDHCP reply offered an address");
        assert_eq!(reply.xid(), request.xid(), "the reply carries the request's transaction id");
        assert!(dhcp::decode(&dhcp::encode(&reply)).is_some(), "the reply does not decode");
    }
}

/// One TFTP packet: a packet that parses survives an encode and parse round trip.
pub fn tftp(data: &[u8]) {
    if let Ok(packet) = tftp::parse_packet(data) {
        let again = packet.to_bytes();
        assert_eq!(tftp::parse_packet(&again).as_ref(), Ok(&packet), "round trip");
    }
}

/// The fixture images and catalog of `pxe/tests/fixtures`, loaded once.
fn catalog() -> &'static (ImageStore, Catalog) {
    static CATALOG: OnceLock<(ImageStore, Catalog)> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let dir = repo_root().join("pxe/tests/fixtures");
        let images = ImageStore::load(&dir.join("images")).expect("fixture images load");
        let catalog = Catalog::load(&dir.join("catalog"), &images).expect("fixture catalog loads");
        (images, catalog)
    })
}

/// The query string of `GET /ipxe?...`: split as `warp::query` splits it,
/// then what the server does with it: the machine, its group and profile,
/// its boot script and its seed.
pub fn ipxe_query(data: &[u8]) {
    // warp hands the query over as the URI's text.
    let Ok(query) = std::str::from_utf8(data) else { return };
    let Ok(pairs) = serde_urlencoded::from_str::<BTreeMap<String, String>>(query) else { return };
    let Ok(machine) = Machine::from_query(&pairs) else { return };
    let _ = machine.node_hostname();
    let (images, catalog) = catalog();
    let Ok((_, profile)) = catalog.select(&machine) else { return };
    let image = images.get(&profile.image).expect("a selected profile's image is served");
    let params =
        BootParams { base_url: "http://192.0.2.1:8080", token: Some("abcdef.0123456789abcdef"), api_url: "https://192.0.2.1:8443" };
    let script = boot_script(image, &profile.kernel_args, machine.mac, &params);
    assert!(script.starts_with("#!ipxe"), "a boot script starts with #!ipxe");
    let _ = catalog.seed(profile, image, &machine, &params);
}

/// The body of `POST /api/v1/register`: decoded as the API decodes it, then
/// validated; a request that validates survives a JSON round trip.
pub fn register(data: &[u8]) {
    let Ok(request) = serde_json::from_slice::<RegisterRequest>(data) else { return };
    if request.validate().is_ok() {
        let json = serde_json::to_vec(&request).expect("a request encodes");
        let again: RegisterRequest = serde_json::from_slice(&json).expect("an encoded request decodes");
        assert_eq!(again, request, "round trip");
    }
}
