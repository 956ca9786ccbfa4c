//! Golden files of the libvirt domain XML kiln defines for a pool's nodes:
//! one disk-booted node (qcow2 overlay and cidata seed, on a libvirt
//! network) and one network-booted node (PXE, QEMU user networking), with
//! fixed names and paths. They must equal `tests/golden/domain/` byte for
//! byte; regenerate after an intended change with:
//!
//! ```sh
//! KILN_REGENERATE_GOLDEN=1 cargo test --workspace golden_file
//! ```

#[path = "../../tests/golden_file.rs"]
mod golden_file;

use kiln_pool::{Accel, BootMedia, DomainSpec, Nic, NodeId};

/// Node `index` of pool `pool`, as the reconciler defines it, with its
/// console logged under a fixed directory.
fn spec(pool: &str, index: u32, boot: BootMedia, nic: Nic) -> DomainSpec {
    let node = NodeId::new(pool, index);
    DomainSpec {
        mac: node.mac(),
        console_log: format!("/var/lib/libvirt/images/kiln/{}.log", node.domain_name()).into(),
        image: None,
        node,
        accel: Accel::Tcg,
        vcpus: 2,
        memory_mib: 1024,
        boot,
        nic,
    }
}

#[test]
fn disk_node_domain_matches_golden_file() {
    let boot = BootMedia::Disk {
        overlay: "/var/lib/libvirt/images/kiln/kiln-workers-0.qcow2".into(),
        seed: "/var/lib/libvirt/images/kiln/kiln-workers-0.iso".into(),
    };
    golden_file::check("domain/disk-node.xml", &spec("workers", 0, boot, Nic::Network("kiln".into())).to_xml());
}

#[test]
fn network_node_domain_matches_golden_file() {
    golden_file::check("domain/network-node.xml", &spec("pxe", 2, BootMedia::Network, Nic::User).to_xml());
}
