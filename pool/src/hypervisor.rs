//! The boundary to a host's hypervisor: list kiln's domains, define and
//! start one, destroy and undefine one, read the host's memory.
//!
//! [`Hypervisor`] is what the reconciler calls, once per host; [`Libvirt`]
//! implements it on one libvirt connection (`qemu:///system`,
//! `qemu+ssh://HOST/system`, or `test:///default` in tests). Only domains
//! carrying kiln's metadata ([`crate::XMLNS`]) are listed, and destroy
//! refuses a domain without it, so kiln never touches another domain on a
//! shared host. Every call is idempotent where it can be: defining a domain
//! that exists keeps it, starting a running one and removing a missing
//! one succeed, which is what lets a reconciler killed mid-way run again.
//!
//! Another backend (a fake for the reconciler's tests, cloud-hypervisor)
//! implements the trait.

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;

use crate::NodeId;
use crate::domain::{DomainSpec, XMLNS};

/// A hypervisor call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libvirt refused or failed.
    #[error("{uri}: {what}")]
    Libvirt {
        /// The host.
        uri: String,
        /// What kiln was doing, with the domain's name.
        what: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// A file on the server, to be copied to a host, could not be read.
    #[error("{what}: {source}")]
    Local {
        /// What kiln was doing.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The node has no domain to start.
    #[error("{uri}: node {node} has no domain")]
    Missing {
        /// The host.
        uri: String,
        /// The node.
        node: NodeId,
    },
    /// Something of that name is on the host and says otherwise than kiln
    /// would: kiln leaves it alone.
    #[error("{uri}: {what} is there with {found}, not {wanted}; kiln leaves it as it is: {fix}")]
    Mismatch {
        /// The host.
        uri: String,
        /// What it is (`network kiln`).
        what: String,
        /// What it says.
        found: String,
        /// What kiln would have made.
        wanted: String,
        /// What the operator can do.
        fix: String,
    },
    /// The domain exists but has no kiln metadata for this node: kiln leaves it alone.
    #[error("{uri}: domain `{name}` is not kiln's node {node}; not touching it")]
    NotKiln {
        /// The host.
        uri: String,
        /// The domain.
        name: String,
        /// The node kiln meant.
        node: NodeId,
    },
}

/// A kiln domain as its host reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDomain {
    /// The node, from the domain's metadata.
    pub node: NodeId,
    /// True while the domain runs (or is paused); false when defined but shut off.
    pub running: bool,
    /// The image generation its metadata records, if it does.
    pub image: Option<kiln_core::Digest>,
}

/// A host's memory, MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    /// All of it.
    pub total_mib: u64,
    /// Not in use now.
    pub free_mib: u64,
}

/// One host's hypervisor, as the reconciler uses it.
pub trait Hypervisor {
    /// The host's URI, as pools name it.
    fn uri(&self) -> &str;

    /// kiln's domains on the host, running or not, sorted by node.
    fn list(&self) -> Result<Vec<NodeDomain>, Error>;

    /// Defines the node's domain; a domain the node already has is kept as
    /// it is (a retry after a crash between defining and starting).
    fn define(&self, spec: &DomainSpec) -> Result<(), Error>;

    /// [`Hypervisor::define`], then [`Hypervisor::start`].
    fn define_and_start(&self, spec: &DomainSpec) -> Result<(), Error> {
        self.define(spec)?;
        self.start(&spec.node)
    }

    /// Starts the node's defined domain (doing nothing if it runs).
    fn start(&self, node: &NodeId) -> Result<(), Error>;

    /// Stops the node's domain and removes its definition; succeeds when
    /// there is none. Refuses ([`Error::NotKiln`]) a domain of that name
    /// without the node's metadata.
    fn destroy_and_undefine(&self, node: &NodeId) -> Result<(), Error>;

    /// The host's memory.
    fn memory(&self) -> Result<HostMemory, Error>;
}

/// A libvirt connection to one host.
pub struct Libvirt {
    uri: String,
    conn: Connect,
}

impl std::fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Libvirt").field("uri", &self.uri).finish_non_exhaustive()
    }
}

impl Libvirt {
    /// Connects to `uri`; fails at once when the host is unreachable.
    pub fn open(uri: &str) -> Result<Self, Error> {
        // libvirt's default handler prints every error to stderr; kiln reports them itself.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|source| Error::Libvirt { uri: uri.to_string(), what: "connecting".into(), source })?;
        Ok(Libvirt { uri: uri.to_string(), conn })
    }

    fn err(&self, what: impl Into<String>) -> impl FnOnce(virt::error::Error) -> Error + '_ {
        let what = what.into();
        move |source| Error::Libvirt { uri: self.uri.clone(), what, source }
    }

    /// The node's domain, if one of its name exists; refused if it is not kiln's.
    fn lookup(&self, node: &NodeId) -> Result<Option<Domain>, Error> {
        let name = node.domain_name();
        let dom = match Domain::lookup_by_name(&self.conn, &name) {
            Ok(d) => d,
            Err(e) if e.code() == ErrorNumber::NoDomain => return Ok(None),
            Err(e) => return Err(self.err(format!("looking up {name}"))(e)),
        };
        match metadata(&dom) {
            Ok(Some((n, _))) if &n == node => Ok(Some(dom)),
            Ok(_) => Err(Error::NotKiln { uri: self.uri.clone(), name, node: node.clone() }),
            Err(e) if e.code() == ErrorNumber::NoDomain => Ok(None),
            Err(e) => Err(self.err(format!("reading {name}'s metadata"))(e)),
        }
    }

    fn start_domain(&self, dom: &Domain, name: &str) -> Result<(), Error> {
        if dom.is_active().map_err(self.err(format!("reading {name}'s state")))? {
            return Ok(());
        }
        match dom.create() {
            Ok(_) => Ok(()),
            // Started by someone else since the check.
            Err(e) if e.code() == ErrorNumber::OperationInvalid && dom.is_active().unwrap_or(false) => Ok(()),
            Err(e) => Err(self.err(format!("starting {name}"))(e)),
        }
    }
}

/// The kiln node in a domain's metadata; `Ok(None)` when it has none.
fn metadata(dom: &Domain) -> Result<Option<(NodeId, Option<kiln_core::Digest>)>, virt::error::Error> {
    match dom.get_metadata(virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32, Some(XMLNS), 0) {
        Ok(xml) => Ok(NodeId::from_metadata_with_image(&xml)),
        Err(e) if e.code() == ErrorNumber::NoDomainMetadata => Ok(None),
        Err(e) => Err(e),
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // Nothing to do about a failed close but leak the connection.
        let _ = self.conn.close();
    }
}

impl Hypervisor for Libvirt {
    fn uri(&self) -> &str {
        &self.uri
    }

    fn list(&self) -> Result<Vec<NodeDomain>, Error> {
        let domains = self.conn.list_all_domains(0).map_err(self.err("listing domains"))?;
        let mut out = Vec::new();
        for dom in domains {
            let (node, image) = match metadata(&dom) {
                Ok(Some(n)) => n,
                Ok(None) => continue,
                // Removed since the listing.
                Err(e) if e.code() == ErrorNumber::NoDomain => continue,
                Err(e) => return Err(self.err("reading a domain's metadata")(e)),
            };
            // A domain whose name is not its node's cannot be found by it:
            // it is not one kiln made, so it is left alone like any other.
            match dom.get_name() {
                Ok(name) if name == node.domain_name() => {}
                _ => continue,
            }
            let running = match dom.is_active() {
                Ok(r) => r,
                Err(e) if e.code() == ErrorNumber::NoDomain => continue,
                Err(e) => return Err(self.err(format!("reading {node}'s state"))(e)),
            };
            out.push(NodeDomain { node, running, image });
        }
        out.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(out)
    }

    fn define(&self, spec: &DomainSpec) -> Result<(), Error> {
        // A foreign domain of that name is refused by lookup.
        if self.lookup(&spec.node)?.is_none() {
            Domain::define_xml(&self.conn, &spec.to_xml()).map_err(self.err(format!("defining {}", spec.node)))?;
        }
        Ok(())
    }

    fn start(&self, node: &NodeId) -> Result<(), Error> {
        match self.lookup(node)? {
            Some(dom) => self.start_domain(&dom, &node.domain_name()),
            None => Err(Error::Missing { uri: self.uri.clone(), node: node.clone() }),
        }
    }

    fn destroy_and_undefine(&self, node: &NodeId) -> Result<(), Error> {
        let name = node.domain_name();
        let Some(dom) = self.lookup(node)? else { return Ok(()) };
        let gone = |e: &virt::error::Error| e.code() == ErrorNumber::NoDomain;
        match dom.is_active() {
            Ok(true) => match dom.destroy() {
                Ok(()) => {}
                // Stopped (or removed) since the check.
                Err(e) if gone(&e) || e.code() == ErrorNumber::OperationInvalid => {}
                Err(e) => return Err(self.err(format!("destroying {name}"))(e)),
            },
            Ok(false) => {}
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(self.err(format!("reading {name}'s state"))(e)),
        }
        // A transient domain is gone once destroyed.
        match dom.is_persistent() {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(self.err(format!("reading {name}'s state"))(e)),
        }
        // kiln's domains boot BIOS (no NVRAM) and have no checkpoints.
        let flags = virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA;
        match dom.undefine_flags(flags) {
            Ok(()) => Ok(()),
            Err(e) if gone(&e) => Ok(()),
            Err(e) => Err(self.err(format!("undefining {name}"))(e)),
        }
    }

    fn memory(&self) -> Result<HostMemory, Error> {
        let info = self.conn.get_node_info().map_err(self.err("reading the host's memory"))?;
        let free = self.conn.get_free_memory().map_err(self.err("reading the host's free memory"))?;
        Ok(HostMemory { total_mib: info.memory / 1024, free_mib: free / (1024 * 1024) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Accel, BootMedia, Nic};

    // test:///default is one driver instance per process, shared by every
    // open connection: each test uses its own pool name so that tests
    // running in parallel do not see each other's domains.

    fn spec(pool: &str, index: u32) -> DomainSpec {
        let node = NodeId::new(pool, index);
        DomainSpec {
            mac: node.mac(),
            accel: Accel::Tcg,
            vcpus: 1,
            memory_mib: 128,
            boot: BootMedia::Disk { overlay: format!("/nonexistent/{node}.qcow2").into(), seed: format!("/nonexistent/{node}.iso").into() },
            nic: Nic::Network("default".into()),
            console_log: format!("/nonexistent/{node}.log").into(),
            image: None,
            node,
        }
    }

    fn open() -> Libvirt {
        Libvirt::open("test:///default").expect("libvirt's test driver")
    }

    fn listed(h: &Libvirt, pool: &str) -> Vec<(u32, bool)> {
        h.list().unwrap().into_iter().filter(|d| d.node.pool == pool).map(|d| (d.node.index, d.running)).collect()
    }

    #[test]
    fn define_start_list_destroy_undefine() {
        let h = open();
        assert_eq!(h.uri(), "test:///default");
        assert_eq!(listed(&h, "life"), []);
        h.define_and_start(&spec("life", 0)).unwrap();
        h.define_and_start(&spec("life", 1)).unwrap();
        assert_eq!(listed(&h, "life"), [(0, true), (1, true)]);

        // Again: already defined and running is fine.
        h.define_and_start(&spec("life", 1)).unwrap();
        assert_eq!(listed(&h, "life"), [(0, true), (1, true)]);

        h.destroy_and_undefine(&NodeId::new("life", 0)).unwrap();
        assert_eq!(listed(&h, "life"), [(1, true)]);
        // Again: nothing to remove is fine.
        h.destroy_and_undefine(&NodeId::new("life", 0)).unwrap();
        h.destroy_and_undefine(&NodeId::new("life", 1)).unwrap();
        assert_eq!(listed(&h, "life"), []);
    }

    #[test]
    fn defined_but_stopped_is_listed_and_started() {
        let h = open();
        let s = spec("stopped", 0);
        Domain::define_xml(&h.conn, &s.to_xml()).unwrap();
        assert_eq!(listed(&h, "stopped"), [(0, false)], "defined, never started");
        h.start(&s.node).unwrap();
        assert_eq!(listed(&h, "stopped"), [(0, true)]);
        h.start(&s.node).unwrap();

        // A crash between define and start, then the reconciler's retry.
        let s1 = spec("stopped", 1);
        Domain::define_xml(&h.conn, &s1.to_xml()).unwrap();
        h.define_and_start(&s1).unwrap();
        assert_eq!(listed(&h, "stopped"), [(0, true), (1, true)]);

        // Destroying a stopped domain just undefines it.
        Domain::lookup_by_name(&h.conn, "kiln-stopped-0").unwrap().destroy().unwrap();
        h.destroy_and_undefine(&s.node).unwrap();
        h.destroy_and_undefine(&s1.node).unwrap();
        assert_eq!(listed(&h, "stopped"), []);
        assert!(matches!(h.start(&s.node), Err(Error::Missing { .. })), "starting a missing domain fails");
    }

    #[test]
    fn other_domains_are_never_listed_or_touched() {
        let h = open();
        // test:///default ships a running domain named "test".
        let test = Domain::lookup_by_name(&h.conn, "test").expect("the test driver's own domain");
        assert!(test.is_active().unwrap());
        assert!(h.list().unwrap().iter().all(|d| d.node.pool != "test" && d.node.domain_name() != "test"));

        // A foreign domain that has a kiln node's name, with no kiln metadata.
        let foreign = "<domain type='test'><name>kiln-foreign-0</name><memory unit='MiB'>64</memory><os><type>hvm</type></os></domain>";
        let dom = Domain::define_xml(&h.conn, foreign).unwrap();
        dom.create().unwrap();
        assert_eq!(listed(&h, "foreign"), [], "not listed");
        let node = NodeId::new("foreign", 0);
        let err = h.destroy_and_undefine(&node).unwrap_err();
        assert!(matches!(err, Error::NotKiln { .. }), "{err}");
        let err = h.define_and_start(&spec("foreign", 0)).unwrap_err();
        assert!(matches!(err, Error::NotKiln { .. }), "{err}");
        assert!(dom.is_active().unwrap(), "still running");
        assert!(!dom.get_xml_desc(0).unwrap().contains(XMLNS), "not redefined");

        // A kiln node's metadata under another node's name.
        let mut s = spec("renamed", 0);
        s.node = NodeId::new("renamed", 1);
        let xml = s.to_xml().replace("<name>kiln-renamed-1</name>", "<name>kiln-renamed-0</name>");
        let renamed = Domain::define_xml(&h.conn, &xml).unwrap();
        assert_eq!(listed(&h, "renamed"), [], "name and metadata disagree");
        assert!(matches!(h.destroy_and_undefine(&NodeId::new("renamed", 0)), Err(Error::NotKiln { .. })));
        h.destroy_and_undefine(&NodeId::new("renamed", 1)).unwrap();
        assert!(renamed.is_persistent().unwrap(), "still defined");

        dom.destroy().unwrap();
        dom.undefine().unwrap();
        renamed.undefine().unwrap();
        assert!(test.is_active().unwrap(), "the test domain still runs");
    }

    #[test]
    fn host_memory() {
        let m = open().memory().unwrap();
        assert!(m.total_mib > 0, "{m:?}");
        assert!(m.free_mib <= m.total_mib, "{m:?}");
    }

    #[test]
    fn unreachable_uri_is_refused() {
        let err = Libvirt::open("test:///nonexistent/kiln.xml").unwrap_err();
        assert!(err.to_string().starts_with("test:///nonexistent/kiln.xml: connecting"), "{err}");
    }
}
