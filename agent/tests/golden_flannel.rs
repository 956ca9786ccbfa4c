//! Golden files of what the agent's flannel side writes for a node: flannel's
//! `subnet.env` and the CNI conflist (`10-flannel.conflist`), rendered from
//! one fixed lease as the registration answer carries it, with the agent's
//! default host-local `dataDir`. They must equal `tests/golden/flannel/`
//! byte for byte; regenerate after an intended change with:
//!
//! ```sh
//! KILN_REGENERATE_GOLDEN=1 cargo test --workspace golden_file
//! ```

#[path = "../../tests/golden_file.rs"]
mod golden_file;

use std::path::Path;

use kiln_agent::flannel::files;
use kiln_core::Lease;

/// The lease in its wire form, so the test does not depend on how its
/// fields are typed.
fn lease() -> Lease {
    serde_json::from_value(serde_json::json!({
        "network": "10.244.0.0/16",
        "subnet": "10.244.3.0/24",
        "mtu": 1450,
        "vni": 1,
        "backend": "vxlan",
    }))
    .expect("the fixed lease parses")
}

#[test]
fn subnet_env_matches_golden_file() {
    golden_file::check("flannel/subnet.env", &files::subnet_env(&lease(), false));
}

#[test]
fn conflist_matches_golden_file() {
    golden_file::check("flannel/10-flannel.conflist", &files::conflist(&lease(), Path::new("/var/lib/cni/networks")));
}
