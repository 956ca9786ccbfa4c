//! Golden files of what kiln-pxe renders for a booting machine: the iPXE
//! bootstrap script (`/boot.ipxe`), the boot scripts of two machines (one
//! whose profile adds kernel arguments, one booting a diskless image that
//! fetches its root filesystem over HTTP) and their NoCloud seeds (kiln's
//! built-in user-data, and a profile with every template).
//!
//! The images and the catalog are fixtures (`tests/fixtures/images`, with
//! real digests; `tests/fixtures/catalog`), the server's URLs and token are
//! fixed, and the profile is chosen by [`Catalog::select`] as the server
//! does, so the output is the server's, byte for byte. It must equal
//! `tests/golden/`; regenerate after an intended change with:
//!
//! ```sh
//! KILN_REGENERATE_GOLDEN=1 cargo test --workspace golden_file
//! ```

#[path = "../../tests/golden_file.rs"]
mod golden_file;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_pxe::ImageStore;
use kiln_pxe::ipxe::{BootParams, boot_script, bootstrap_script};
use kiln_pxe::profile::{Catalog, Machine, Profile};

const BASE_URL: &str = "http://10.0.2.2:8080/";
const API_URL: &str = "https://10.0.2.2:8443";
const TOKEN: &str = "abcdef.0123456789abcdef";

/// A machine in the tiny profile (the default group).
const TINY: &[(&str, &str)] = &[("mac", "52-54-00-12-34-56"), ("arch", "x86_64")];
/// A machine in rack a1 (the worker profile), with every attribute iPXE sends.
const WORKER: &[(&str, &str)] = &[
    ("mac", "52:54:00:ab:cd:ef"),
    ("uuid", "8F5B2A3C-1D4E-4F60-9A7B-0C1D2E3F4A5B"),
    ("arch", "x86_64"),
    ("platform", "pcbios"),
    ("rack", "a1"),
    ("serial", ""),
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The fixture images and catalog, and `query`'s machine with the profile
/// the catalog picks for it.
fn select(query: &[(&str, &str)]) -> (ImageStore, Catalog, Machine, Profile) {
    let images = ImageStore::load(&fixtures().join("images")).expect("fixture images load");
    let catalog = Catalog::load(&fixtures().join("catalog"), &images).expect("fixture catalog loads");
    let machine =
        Machine::from_query(&query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()).expect("a valid query");
    let (_, profile) = catalog.select(&machine).expect("a group matches");
    let profile = profile.clone();
    (images, catalog, machine, profile)
}

/// The machine's boot script, as `/ipxe?...` answers it.
fn machine_script(query: &[(&str, &str)]) -> String {
    let (images, _, machine, profile) = select(query);
    let image = images.get(&profile.image).expect("the profile's image is served");
    boot_script(image, &profile.kernel_args, machine.mac, &BootParams { base_url: BASE_URL, token: Some(TOKEN), api_url: API_URL })
}

/// Checks each file of the machine's seed against `seed/<dir>/<file>`, and
/// that the seed has exactly the files `names`.
fn check_seed(query: &[(&str, &str)], dir: &str, names: &[&str]) {
    let (images, catalog, machine, profile) = select(query);
    let image = images.get(&profile.image).expect("the profile's image is served");
    let seed = catalog
        .seed(&profile, image, &machine, &BootParams { base_url: BASE_URL, token: Some(TOKEN), api_url: API_URL })
        .expect("the seed renders");
    let files = seed.files();
    assert_eq!(files.iter().map(|(n, _)| *n).collect::<Vec<_>>(), names, "files of seed {dir}");
    for (name, text) in files {
        golden_file::check(&format!("seed/{dir}/{name}"), &text);
    }
}

#[test]
fn bootstrap_script_matches_golden_file() {
    golden_file::check("ipxe/boot.ipxe", &bootstrap_script(BASE_URL));
}

#[test]
fn script_with_profile_kernel_args_matches_golden_file() {
    golden_file::check("ipxe/tiny-kernel-args.ipxe", &machine_script(TINY));
}

#[test]
fn diskless_image_script_matches_golden_file() {
    golden_file::check("ipxe/worker-diskless.ipxe", &machine_script(WORKER));
}

#[test]
fn builtin_seed_matches_golden_file() {
    check_seed(TINY, "tiny-builtin", &["meta-data", "user-data", "vendor-data"]);
}

#[test]
fn templated_seed_matches_golden_file() {
    check_seed(WORKER, "worker-templates", &["meta-data", "user-data", "network-config", "vendor-data"]);
}
