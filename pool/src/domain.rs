//! libvirt domain XML for a pool's node, and the metadata that marks it as kiln's.
//!
//! [`DomainSpec::to_xml`] writes the whole `<domain>`: a q35 machine with
//! the node's vCPUs and memory, one virtio-net NIC (on a libvirt network, or
//! QEMU user networking), a serial console logged to a file, and either a
//! qcow2 overlay plus a cidata ISO (disk boot) or `<boot dev='network'/>`
//! (PXE). Every domain carries `<kiln:node pool=".." node=".."/>` in its
//! `<metadata>` ([`XMLNS`]); [`NodeId::from_metadata`] and
//! [`NodeId::from_domain_xml`] read it back, and a
//! domain without it is not kiln's and is never touched.
//!
//! To add a device: a field on [`DomainSpec`], its element in `devices`,
//! and a case in the tests.

use std::io;
use std::path::PathBuf;

use kiln_core::Mac;
use quick_xml::events::{BytesStart, BytesText, Event};
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;
use quick_xml::{Writer, XmlVersion};

use crate::NodeId;

/// The namespace of kiln's domain metadata element.
pub const XMLNS: &str = "https://kiln.dev/xmlns/node/1";

/// How QEMU runs a guest's CPU, for libvirt domains and for the QEMU
/// guests kiln starts itself ([`crate::qemu`]) alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accel {
    /// TCG, pure emulation: works everywhere, slowly.
    Tcg,
    /// KVM: only where a guest has been seen to run under it.
    Kvm,
}

impl Accel {
    /// libvirt's `<domain type=..>` value.
    pub fn domain_type(self) -> &'static str {
        match self {
            Accel::Tcg => "qemu",
            Accel::Kvm => "kvm",
        }
    }

    /// QEMU's `-accel` value.
    pub fn qemu_arg(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// What the node boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootMedia {
    /// A qcow2 overlay (whose backing file is the golden image) as `vda`, and
    /// the node's cidata seed ISO as a read-only virtio disk.
    Disk {
        /// The overlay.
        overlay: PathBuf,
        /// The cidata ISO.
        seed: PathBuf,
    },
    /// PXE through the NIC's iPXE ROM.
    Network,
}

/// Where the node's NIC is plugged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nic {
    /// A libvirt network, by name.
    Network(String),
    /// QEMU user networking (the guest reaches the host's loopback as 10.0.2.2).
    User,
}

/// Everything a node's domain XML says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// The node: its domain name and metadata.
    pub node: NodeId,
    /// TCG or KVM.
    pub accel: Accel,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk or network boot.
    pub boot: BootMedia,
    /// The NIC's attachment.
    pub nic: Nic,
    /// The NIC's address; [`NodeId::mac`] gives a stable one.
    pub mac: Mac,
    /// The file the serial console is logged to.
    pub console_log: PathBuf,
    /// The image generation the node is made from, kept in the metadata
    /// (`image="sha256:…"`) so that a rollout knows each node's generation
    /// before it registers.
    pub image: Option<kiln_core::Digest>,
}

type W = Writer<Vec<u8>>;

impl DomainSpec {
    /// The domain XML, escaped by the writer, indented two spaces.
    pub fn to_xml(&self) -> String {
        let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
        self.write(&mut w).expect("writing XML into memory does not fail");
        String::from_utf8(w.into_inner()).expect("the writer writes the UTF-8 it is given")
    }

    fn write(&self, w: &mut W) -> io::Result<()> {
        w.create_element("domain").with_attribute(("type", self.accel.domain_type())).write_inner_content(|w| {
            text(w, "name", &self.node.domain_name())?;
            w.create_element("metadata").write_inner_content(|w| {
                let image = self.image.map(|d| d.to_string());
                let element = w
                    .create_element("kiln:node")
                    .with_attribute(("xmlns:kiln", XMLNS))
                    .with_attribute(("pool", self.node.pool.as_str()))
                    .with_attribute(("node", self.node.index.to_string().as_str()));
                match &image {
                    Some(image) => element.with_attribute(("image", image.as_str())).write_empty()?,
                    None => element.write_empty()?,
                };
                Ok(())
            })?;
            w.create_element("memory").with_attribute(("unit", "MiB")).write_text_content(BytesText::new(&self.memory_mib.to_string()))?;
            text(w, "vcpu", &self.vcpus.to_string())?;
            w.create_element("os").write_inner_content(|w| {
                w.create_element("type")
                    .with_attribute(("arch", "x86_64"))
                    .with_attribute(("machine", "q35"))
                    .write_text_content(BytesText::new("hvm"))?;
                let dev = match self.boot {
                    BootMedia::Disk { .. } => "hd",
                    BootMedia::Network => "network",
                };
                w.create_element("boot").with_attribute(("dev", dev)).write_empty()?;
                // SeaBIOS and iPXE print on the serial console too (the console log).
                w.create_element("bios").with_attribute(("useserial", "yes")).write_empty()?;
                Ok(())
            })?;
            w.create_element("features").write_inner_content(|w| {
                w.create_element("acpi").write_empty()?;
                Ok(())
            })?;
            text(w, "on_poweroff", "destroy")?;
            text(w, "on_reboot", "restart")?;
            text(w, "on_crash", "destroy")?;
            w.create_element("devices").write_inner_content(|w| self.devices(w))?;
            Ok(())
        })?;
        Ok(())
    }

    fn devices(&self, w: &mut W) -> io::Result<()> {
        if let BootMedia::Disk { overlay, seed } = &self.boot {
            disk(w, "qcow2", &overlay.to_string_lossy(), "vda", false)?;
            // A read-only virtio disk, not a CD-ROM: Debian's cloud kernel
            // has no SATA driver. cloud-init finds it by its label, cidata.
            disk(w, "raw", &seed.to_string_lossy(), "vdb", true)?;
        }
        let (kind, source) = match &self.nic {
            Nic::Network(name) => ("network", Some(name.as_str())),
            Nic::User => ("user", None),
        };
        w.create_element("interface").with_attribute(("type", kind)).write_inner_content(|w| {
            if let Some(network) = source {
                w.create_element("source").with_attribute(("network", network)).write_empty()?;
            }
            w.create_element("mac").with_attribute(("address", self.mac.to_string().as_str())).write_empty()?;
            w.create_element("model").with_attribute(("type", "virtio")).write_empty()?;
            Ok(())
        })?;
        let log = self.console_log.to_string_lossy();
        w.create_element("serial").with_attribute(("type", "pty")).write_inner_content(|w| {
            w.create_element("log").with_attribute(("file", log.as_ref())).with_attribute(("append", "on")).write_empty()?;
            w.create_element("target").with_attribute(("port", "0")).write_empty()?;
            Ok(())
        })?;
        w.create_element("console").with_attribute(("type", "pty")).write_inner_content(|w| {
            w.create_element("target").with_attribute(("type", "serial")).with_attribute(("port", "0")).write_empty()?;
            Ok(())
        })?;
        w.create_element("rng").with_attribute(("model", "virtio")).write_inner_content(|w| {
            w.create_element("backend").with_attribute(("model", "random")).write_text_content(BytesText::new("/dev/urandom"))?;
            Ok(())
        })?;
        Ok(())
    }
}

fn text(w: &mut W, name: &str, value: &str) -> io::Result<()> {
    w.create_element(name).write_text_content(BytesText::new(value))?;
    Ok(())
}

fn disk(w: &mut W, format: &str, file: &str, dev: &str, readonly: bool) -> io::Result<()> {
    w.create_element("disk").with_attribute(("type", "file")).with_attribute(("device", "disk")).write_inner_content(|w| {
        w.create_element("driver").with_attribute(("name", "qemu")).with_attribute(("type", format)).write_empty()?;
        w.create_element("source").with_attribute(("file", file)).write_empty()?;
        w.create_element("target").with_attribute(("dev", dev)).with_attribute(("bus", "virtio")).write_empty()?;
        if readonly {
            w.create_element("readonly").write_empty()?;
        }
        Ok(())
    })?;
    Ok(())
}

impl NodeId {
    /// Reads the element libvirt returns for `virDomainGetMetadata` with
    /// [`XMLNS`]: `<node pool=".." node=".."/>` (libvirt drops the prefix).
    /// `None` when it is malformed or in another namespace.
    pub fn from_metadata(xml: &str) -> Option<NodeId> {
        Self::from_metadata_with_image(xml).map(|(node, _)| node)
    }

    /// [`NodeId::from_metadata`], with the image generation the metadata
    /// names (`None` for a domain made before kiln recorded it).
    pub fn from_metadata_with_image(xml: &str) -> Option<(NodeId, Option<kiln_core::Digest>)> {
        let mut reader = NsReader::from_str(xml);
        loop {
            match reader.read_resolved_event().ok()? {
                (ns, Event::Start(e) | Event::Empty(e)) => {
                    let ours = matches!(ns, ResolveResult::Unbound) || matches!(ns, ResolveResult::Bound(n) if n.as_ref() == XMLNS);
                    return if ours { node_attributes(&e) } else { None };
                }
                (_, Event::Eof) => return None,
                _ => {}
            }
        }
    }

    /// Finds kiln's `<node>` element (namespace [`XMLNS`], any prefix) in a
    /// whole domain's XML. `None` when there is none or it is malformed:
    /// such a domain is not kiln's.
    pub fn from_domain_xml(xml: &str) -> Option<NodeId> {
        let mut reader = NsReader::from_str(xml);
        loop {
            match reader.read_resolved_event().ok()? {
                (ResolveResult::Bound(n), Event::Start(e) | Event::Empty(e)) if n.as_ref() == XMLNS => {
                    return node_attributes(&e).map(|(n, _)| n);
                }
                (_, Event::Eof) => return None,
                _ => {}
            }
        }
    }
}

/// `pool`, `node` and `image` (when there is one) of a `<node>` element.
fn node_attributes(e: &BytesStart) -> Option<(NodeId, Option<kiln_core::Digest>)> {
    if e.local_name().as_ref() != "node" {
        return None;
    }
    let (mut pool, mut index, mut image) = (None, None, None);
    for a in e.attributes() {
        let a = a.ok()?;
        let value = a.normalized_value(XmlVersion::Implicit1_0).ok()?;
        match a.key.as_ref() {
            "pool" => pool = Some(value.into_owned()),
            "node" => index = value.parse::<u32>().ok(),
            "image" => image = value.parse::<kiln_core::Digest>().ok(),
            _ => {}
        }
    }
    let pool = pool.filter(|p| crate::spec::name_ok(p))?;
    Some((NodeId { pool, index: index? }, image))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(boot: BootMedia, nic: Nic) -> DomainSpec {
        let node = NodeId::new("tiny", 3);
        DomainSpec {
            mac: node.mac(),
            node,
            accel: Accel::Tcg,
            vcpus: 2,
            memory_mib: 512,
            boot,
            nic,
            console_log: PathBuf::from("/var/log/kiln/kiln-tiny-3.log"),
            image: None,
        }
    }

    #[test]
    fn network_boot_domain() {
        let xml = spec(BootMedia::Network, Nic::User).to_xml();
        let mac = NodeId::new("tiny", 3).mac().to_string();
        let want = format!(
            r#"<domain type="qemu">
  <name>kiln-tiny-3</name>
  <metadata>
    <kiln:node xmlns:kiln="https://kiln.dev/xmlns/node/1" pool="tiny" node="3"/>
  </metadata>
  <memory unit="MiB">512</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch="x86_64" machine="q35">hvm</type>
    <boot dev="network"/>
    <bios useserial="yes"/>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <interface type="user">
      <mac address="{mac}"/>
      <model type="virtio"/>
    </interface>
    <serial type="pty">
      <log file="/var/log/kiln/kiln-tiny-3.log" append="on"/>
      <target port="0"/>
    </serial>
    <console type="pty">
      <target type="serial" port="0"/>
    </console>
    <rng model="virtio">
      <backend model="random">/dev/urandom</backend>
    </rng>
  </devices>
</domain>"#
        );
        assert_eq!(xml, want);
    }

    #[test]
    fn disk_boot_domain() {
        let boot =
            BootMedia::Disk { overlay: "/var/lib/kiln/pools/w/kiln-w-0.qcow2".into(), seed: "/var/lib/kiln/pools/w/kiln-w-0.iso".into() };
        let mut s = spec(boot, Nic::Network("kiln-lab".into()));
        s.accel = Accel::Kvm;
        let xml = s.to_xml();
        let cases = [
            ("kvm", r#"<domain type="kvm">"#),
            ("disk boot", r#"<boot dev="hd"/>"#),
            ("overlay format", r#"<driver name="qemu" type="qcow2"/>"#),
            ("overlay", r#"<source file="/var/lib/kiln/pools/w/kiln-w-0.qcow2"/>"#),
            ("overlay target", r#"<target dev="vda" bus="virtio"/>"#),
            ("seed", r#"<source file="/var/lib/kiln/pools/w/kiln-w-0.iso"/>"#),
            ("seed target", r#"<target dev="vdb" bus="virtio"/>"#),
            ("seed read-only", "<readonly/>"),
            ("libvirt network", r#"<interface type="network">"#),
            ("network name", r#"<source network="kiln-lab"/>"#),
            ("virtio nic", r#"<model type="virtio"/>"#),
        ];
        for (case, needle) in cases {
            assert!(xml.contains(needle), "{case}: {needle} not in\n{xml}");
        }
        assert!(!xml.contains("dev=\"network\""), "disk boot has no network boot entry");
    }

    #[test]
    fn values_are_escaped() {
        let mut s =
            spec(BootMedia::Disk { overlay: "/tmp/a&b/<x>.qcow2".into(), seed: "/tmp/it's \"q\".iso".into() }, Nic::Network("n&<".into()));
        s.console_log = "/tmp/log&.txt".into();
        let xml = s.to_xml();
        for (case, needle) in [
            ("ampersand and brackets", r#"file="/tmp/a&amp;b/&lt;x&gt;.qcow2""#),
            ("quotes", r#"file="/tmp/it&apos;s &quot;q&quot;.iso""#),
            ("network", r#"network="n&amp;&lt;""#),
            ("log", r#"file="/tmp/log&amp;.txt""#),
        ] {
            assert!(xml.contains(needle), "{case}: {needle} not in\n{xml}");
        }
    }

    #[test]
    fn metadata_round_trips() {
        let xml = spec(BootMedia::Network, Nic::User).to_xml();
        assert_eq!(NodeId::from_domain_xml(&xml), Some(NodeId::new("tiny", 3)), "whole domain XML");
        const NS: &str = "https://kiln.dev/xmlns/node/1";
        // (case, XML, from libvirt's metadata answer, from a domain's XML)
        type Found = Option<(&'static str, u32)>;
        let cases: &[(&str, String, Found, Found)] = &[
            ("libvirt's answer", r#"<node pool="w" node="7"/>"#.into(), Some(("w", 7)), None),
            ("prefixed", format!(r#"<kiln:node xmlns:kiln="{NS}" pool="w" node="7"/>"#), Some(("w", 7)), Some(("w", 7))),
            ("other prefix", format!(r#"<k:node xmlns:k="{NS}" node="0" pool="a-b"/>"#), Some(("a-b", 0)), Some(("a-b", 0))),
            ("default namespace", format!(r#"<node xmlns="{NS}" node="2" pool="a"></node>"#), Some(("a", 2)), Some(("a", 2))),
            ("other namespace", r#"<kiln:node xmlns:kiln="https://example.com/x" pool="w" node="7"/>"#.into(), None, None),
            ("other element", r#"<nodes pool="w" node="7"/>"#.into(), None, None),
            ("bad index", r#"<node pool="w" node="-1"/>"#.into(), None, None),
            ("bad pool", r#"<node pool="../x" node="1"/>"#.into(), None, None),
            ("no pool", r#"<node node="1"/>"#.into(), None, None),
            ("domain without metadata", "<domain type='test'><name>test</name></domain>".into(), None, None),
            ("not XML", "<<<".into(), None, None),
        ];
        for (case, xml, meta, domain) in cases {
            assert_eq!(NodeId::from_metadata(xml), meta.map(|(p, i)| NodeId::new(p, i)), "metadata: {case}");
            assert_eq!(NodeId::from_domain_xml(xml), domain.map(|(p, i)| NodeId::new(p, i)), "domain XML: {case}");
        }
    }
}
