//! The libvirt networks pool nodes are plugged into: the one kiln makes,
//! and the checks on one a pool names.
//!
//! A pool whose file names no `network` joins the network kiln makes on
//! each of its hosts ([`KilnNetwork`], named `kiln` unless `--kiln-network`
//! says otherwise): isolated (or NAT on request), on a subnet of its own
//! (default `10.247.0.0/24`), the host's address on it the subnet's first,
//! and libvirt's dnsmasq giving every guest an address from the rest and,
//! as its boot file, kiln's iPXE script, which the iPXE ROM in each guest
//! fetches over HTTP. That is the DHCP setup matchbox and Tinkerbell ask
//! their users to write, made by kiln.
//!
//! kiln defines the network where it is missing, starts it where it is
//! stopped and marks it autostart. A network of that name that says
//! something else (another boot file or address) is left as it is: start is
//! refused naming both, so kiln never changes a network it did not make, or
//! made for another server.
//!
//! A pool that names another network is checked instead ([`Facts`]): it
//! must exist on every host and, for network boot, its DHCP must give a
//! boot file or kiln's proxyDHCP must answer on its bridge.

use std::io;
use std::net::Ipv4Addr;

use kiln_core::Ipv4Cidr;
use quick_xml::Writer;
use quick_xml::events::{BytesText, Event};
use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::network::Network;

use crate::hypervisor::Error;

/// The name of the network kiln makes unless told otherwise.
pub const DEFAULT_NAME: &str = "kiln";

/// Its subnet unless told otherwise: out of the way of libvirt's default
/// (192.168.122.0/24) and of the pod network (10.244.0.0/16).
pub const DEFAULT_SUBNET: Ipv4Cidr = Ipv4Cidr { addr: Ipv4Addr::new(10, 247, 0, 0), prefix: 24 };

/// The network kiln makes on a pool's hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KilnNetwork {
    /// The libvirt network's name.
    pub name: String,
    /// Its subnet: the host is the first address, guests get the rest.
    pub subnet: Ipv4Cidr,
    /// NAT to the host's other networks (libvirt's `<forward mode='nat'/>`);
    /// isolated when false: guests reach the host and each other only.
    pub nat: bool,
}

impl Default for KilnNetwork {
    fn default() -> Self {
        KilnNetwork { name: DEFAULT_NAME.to_string(), subnet: DEFAULT_SUBNET, nat: false }
    }
}

/// What kiln found and did on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// The network was missing: kiln defined and started it.
    Made,
    /// It was there, stopped: kiln started it.
    Started,
    /// It was there and running.
    Found,
}

/// What a libvirt network's XML says, as far as kiln looks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The bridge its guests are plugged into.
    pub bridge: Option<String>,
    /// The host's IPv4 address on it.
    pub address: Option<Ipv4Addr>,
    /// The boot file its DHCP gives (`<bootp file=…>`), if any.
    pub boot_file: Option<String>,
    /// Its `<forward mode=…>` (`nat`, `route`, …); none when isolated.
    pub forward: Option<String>,
}

impl Facts {
    /// Reads the facts from a network's XML (libvirt's own, as
    /// `virsh net-dumpxml` prints it).
    pub fn from_xml(xml: &str) -> Facts {
        let mut facts = Facts::default();
        let mut reader = quick_xml::Reader::from_str(xml);
        loop {
            let e = match reader.read_event() {
                Ok(Event::Start(e) | Event::Empty(e)) => e,
                Ok(Event::Eof) | Err(_) => break,
                Ok(_) => continue,
            };
            let attr = |name: &str| {
                e.try_get_attribute(name)
                    .ok()
                    .flatten()
                    .and_then(|a| a.normalized_value(quick_xml::XmlVersion::Implicit1_0).ok())
                    .map(|v| v.into_owned())
            };
            match e.name().as_ref() {
                "bridge" => facts.bridge = attr("name"),
                "forward" => facts.forward = attr("mode").or(Some("nat".into())),
                "ip" if facts.address.is_none() && attr("family").is_none_or(|f| f == "ipv4") => {
                    facts.address = attr("address").and_then(|a| a.parse().ok());
                }
                "bootp" => facts.boot_file = attr("file"),
                _ => {}
            }
        }
        facts
    }
}

impl KilnNetwork {
    /// The host's address on the network: the subnet's first.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.addr) + 1)
    }

    /// The addresses its DHCP hands out: all but the host's and the broadcast.
    fn dhcp_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        let size = 1u32 << (32 - u32::from(self.subnet.prefix));
        let first = u32::from(self.subnet.addr);
        (Ipv4Addr::from(first + 2), Ipv4Addr::from(first + size - 2))
    }

    /// Whether the subnet has room for the host, two guests and a broadcast.
    pub fn fits(&self) -> bool {
        self.subnet.prefix <= 29
    }

    /// The network's XML, with `boot_url` as the boot file its DHCP gives.
    pub fn xml(&self, boot_url: &str) -> String {
        let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
        self.write(&mut w, boot_url).expect("writing XML into memory does not fail");
        String::from_utf8(w.into_inner()).expect("the writer writes the UTF-8 it is given")
    }

    fn write(&self, w: &mut Writer<Vec<u8>>, boot_url: &str) -> io::Result<()> {
        let (start, end) = self.dhcp_range();
        w.create_element("network").write_inner_content(|w| {
            w.create_element("name").write_text_content(BytesText::new(&self.name))?;
            if self.nat {
                w.create_element("forward").with_attribute(("mode", "nat")).write_empty()?;
            }
            // libvirt names the bridge (virbrN): a name kiln chose could be
            // taken, or too long for the kernel's 15 bytes.
            w.create_element("bridge").with_attribute(("stp", "on")).with_attribute(("delay", "0")).write_empty()?;
            w.create_element("ip")
                .with_attribute(("address", self.gateway().to_string().as_str()))
                .with_attribute(("prefix", self.subnet.prefix.to_string().as_str()))
                .write_inner_content(|w| {
                    w.create_element("dhcp").write_inner_content(|w| {
                        w.create_element("range")
                            .with_attribute(("start", start.to_string().as_str()))
                            .with_attribute(("end", end.to_string().as_str()))
                            .write_empty()?;
                        w.create_element("bootp").with_attribute(("file", boot_url)).write_empty()?;
                        Ok(())
                    })?;
                    Ok(())
                })?;
            // Only so dnsmasq sends router advertisements: iPXE waits for
            // IPv6 autoconfiguration before it boots, about 13 s under TCG
            // when no router answers. A ULA made of the IPv4 subnet, so two
            // kiln networks differ. Not with NAT: libvirt would forward
            // IPv6 then, which hosts that take their routes from router
            // advertisements refuse.
            if !self.nat {
                w.create_element("ip")
                    .with_attribute(("family", "ipv6"))
                    .with_attribute(("address", self.ula().as_str()))
                    .with_attribute(("prefix", "64"))
                    .write_empty()?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// The host's IPv6 address on the network: `fd6b:6c6e:AABB:CCDD::1`
    /// for the IPv4 subnet `A.B.C.D`.
    fn ula(&self) -> String {
        let [a, b, c, d] = self.subnet.addr.octets();
        format!("fd6b:6c6e:{a:02x}{b:02x}:{c:02x}{d:02x}::1")
    }

    /// Makes sure the network runs on `uri`, giving `boot_url` as its boot
    /// file: defined (autostart) where missing, started where stopped. A
    /// network of that name with another boot file or address is refused.
    pub fn ensure(&self, uri: &str, boot_url: &str) -> Result<Ensured, Error> {
        virt::error::clear_error_callback();
        let err = |what: String| move |source| Error::Libvirt { uri: uri.to_string(), what, source };
        let conn = Connect::open(Some(uri)).map_err(err("connecting".into()))?;
        let result = self.ensure_on(&conn, uri, boot_url);
        let mut conn = conn;
        let _ = conn.close();
        result
    }

    fn ensure_on(&self, conn: &Connect, uri: &str, boot_url: &str) -> Result<Ensured, Error> {
        let name = &self.name;
        let err = |what: String| move |source| Error::Libvirt { uri: uri.to_string(), what, source };
        let (network, mut ensured) = match Network::lookup_by_name(conn, name) {
            Ok(n) => (n, Ensured::Found),
            Err(e) if e.code() == ErrorNumber::NoNetwork => {
                let n = Network::define_xml(conn, &self.xml(boot_url)).map_err(err(format!("defining network {name}")))?;
                (n, Ensured::Made)
            }
            Err(e) => return Err(err(format!("looking up network {name}"))(e)),
        };
        let facts = Facts::from_xml(&network.get_xml_desc(0).map_err(err(format!("reading network {name}")))?);
        if facts.boot_file.as_deref() != Some(boot_url) || facts.address != Some(self.gateway()) {
            return Err(Error::Mismatch {
                uri: uri.to_string(),
                what: format!("network {name}"),
                found: format!(
                    "boot file {}, address {}",
                    facts.boot_file.as_deref().unwrap_or("(none)"),
                    facts.address.map_or_else(|| "(none)".to_string(), |a| a.to_string())
                ),
                wanted: format!("boot file {boot_url}, address {}", self.gateway()),
                fix: format!("remove it (virsh net-destroy {name}; virsh net-undefine {name}) or name another with --kiln-network"),
            });
        }
        if !network.is_active().map_err(err(format!("reading network {name}'s state")))? {
            network.create().map_err(err(format!("starting network {name} ({})", self.subnet)))?;
            if ensured == Ensured::Found {
                ensured = Ensured::Started;
            }
        }
        if !network.get_autostart().map_err(err(format!("reading network {name}'s autostart")))? {
            network.set_autostart(true).map_err(err(format!("marking network {name} autostart")))?;
        }
        Ok(ensured)
    }
}

/// The facts of the network `name` on `uri`, or `None` when it has none.
pub fn inspect(uri: &str, name: &str) -> Result<Option<Facts>, Error> {
    virt::error::clear_error_callback();
    let err = |what: String| move |source| Error::Libvirt { uri: uri.to_string(), what, source };
    let mut conn = Connect::open(Some(uri)).map_err(err("connecting".into()))?;
    let found = match Network::lookup_by_name(&conn, name) {
        Ok(n) => n.get_xml_desc(0).map(|xml| Some(Facts::from_xml(&xml))).map_err(err(format!("reading network {name}"))),
        Err(e) if e.code() == ErrorNumber::NoNetwork => Ok(None),
        Err(e) => Err(err(format!("looking up network {name}"))(e)),
    };
    let _ = conn.close();
    found
}

/// Whether `uri` is a libvirt on this machine (no host in it:
/// `qemu:///system`, `qemu+unix:///system?socket=…`, `test:///default`):
/// the host's address on kiln's network is then this machine's.
pub fn is_local(uri: &str) -> bool {
    uri.split_once("://").is_some_and(|(_, rest)| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kiln_network_xml_gives_the_boot_file_and_reads_back() {
        let net = KilnNetwork::default();
        let url = "http://10.247.0.1:8080/boot.ipxe";
        let xml = net.xml(url);
        assert_eq!(
            xml,
            "<network>\n  <name>kiln</name>\n  <bridge stp=\"on\" delay=\"0\"/>\n  <ip address=\"10.247.0.1\" prefix=\"24\">\n    <dhcp>\n      \
             <range start=\"10.247.0.2\" end=\"10.247.0.254\"/>\n      <bootp file=\"http://10.247.0.1:8080/boot.ipxe\"/>\n    </dhcp>\n  </ip>\n  \
             <ip family=\"ipv6\" address=\"fd6b:6c6e:0af7:0000::1\" prefix=\"64\"/>\n</network>"
        );
        let facts = Facts::from_xml(&xml);
        assert_eq!(facts, Facts { bridge: None, address: Some(net.gateway()), boot_file: Some(url.into()), forward: None });
        let nat = KilnNetwork { name: "a&b".into(), nat: true, ..KilnNetwork::default() };
        let xml = nat.xml("http://h/boot.ipxe?x=1&y=2");
        assert!(xml.contains("<name>a&amp;b</name>") && xml.contains("<forward mode=\"nat\"/>") && !xml.contains("ipv6"), "{xml}");
        assert_eq!(Facts::from_xml(&xml).boot_file.as_deref(), Some("http://h/boot.ipxe?x=1&y=2"), "escaped and read back");
    }

    #[test]
    fn reads_libvirts_own_network_xml() {
        let xml = "<network>\n  <name>default</name>\n  <uuid>0</uuid>\n  <forward mode='nat'>\n    <nat><port start='1024' end='65535'/></nat>\n  </forward>\n  \
                   <bridge name='virbr0' stp='on' delay='0'/>\n  <mac address='52:54:00:0a:0b:0c'/>\n  <ip family='ipv6' address='fd00::1' prefix='64'/>\n  \
                   <ip address='192.168.122.1' netmask='255.255.255.0'>\n    <dhcp>\n      <range start='192.168.122.2' end='192.168.122.254'/>\n    </dhcp>\n  </ip>\n</network>\n";
        let facts = Facts::from_xml(xml);
        assert_eq!(
            facts,
            Facts {
                bridge: Some("virbr0".into()),
                address: Some(Ipv4Addr::new(192, 168, 122, 1)),
                boot_file: None,
                forward: Some("nat".into())
            }
        );
    }

    #[test]
    fn local_uris() {
        for (uri, local) in [
            ("qemu:///system", true),
            ("qemu+unix:///system?socket=/tmp/x", true),
            ("test:///default", true),
            ("qemu+ssh://root@b.example/system", false),
            ("qemu+tcp://10.0.0.1/system", false),
        ] {
            assert_eq!(is_local(uri), local, "{uri}");
        }
    }

    /// On libvirt's in-process test driver: made once, found again, and a
    /// network of that name that says otherwise is refused and left alone.
    #[test]
    fn ensure_makes_the_network_once_and_refuses_another() {
        let _host = crate::TEST_DEFAULT_HOST.lock().unwrap_or_else(|e| e.into_inner());
        let uri = "test:///default";
        // The test driver keeps its state while a connection is open.
        let mut keep = Connect::open(Some(uri)).unwrap();
        let net = KilnNetwork { name: "kiln-unit".into(), subnet: "10.247.9.0/24".parse().unwrap(), nat: false };
        let url = "http://10.247.9.1:8080/boot.ipxe";
        let first = net.ensure(uri, url).unwrap();
        let again = net.ensure(uri, url).unwrap();
        assert_eq!((first, again), (Ensured::Made, Ensured::Found));
        let facts = inspect(uri, "kiln-unit").unwrap().expect("defined");
        assert_eq!(facts.boot_file.as_deref(), Some(url));
        let e = net.ensure(uri, "http://10.247.9.1:9999/boot.ipxe").unwrap_err();
        let words = e.to_string();
        assert!(words.contains("network kiln-unit") && words.contains(":8080/") && words.contains(":9999/"), "{words}");
        assert_eq!(inspect(uri, "kiln-unit").unwrap().unwrap().boot_file.as_deref(), Some(url), "left as it was");
        assert_eq!(inspect(uri, "no-such-network").unwrap(), None);
        Network::lookup_by_name(&keep, "kiln-unit").and_then(|n| n.destroy().and_then(|()| n.undefine())).unwrap();
        keep.close().unwrap();
    }
}
