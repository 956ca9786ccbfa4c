//! proxyDHCP: tells PXE clients what to boot, beside the network's own DHCP
//! server, which keeps handing out the addresses.
//!
//! PXE ROMs broadcast a DHCPDISCOVER with option 60 `PXEClient:...`; every
//! DHCP server on the segment may answer. This one answers only those PXE
//! clients, and with no address (`yiaddr` 0.0.0.0, no lease time): the ROM
//! takes its address from the real DHCP server's offer and its boot file from
//! ours. The reply carries option 60 `PXEClient`, `siaddr` (next-server) set
//! to this server's address on the interface, option 43 with PXE discovery
//! control 8 (no boot-server discovery: boot the file named here, as dnsmasq
//! and pixiecore tell ROMs), option 97 echoed when the client sent it, and a
//! boot file chosen by [`respond`]:
//!
//! | client | boot file |
//! |---|---|
//! | option 77 user class `iPXE` | the HTTP bootstrap URL (`http://IP:PORT/boot.ipxe`), so iPXE does not load iPXE again |
//! | option 93 arch 0 (BIOS), or no option 93 | `undionly.kpxe`, over TFTP |
//! | option 93 arch 7 or 9 (EFI x86-64) | `ipxe.efi`, over TFTP |
//! | anything else | no answer |
//!
//! A DHCPDISCOVER on port 67 gets a DHCPOFFER, broadcast to port 68 (the
//! client has no address yet); a DHCPREQUEST to the PXE boot-server port 4011
//! gets a DHCPACK unicast back to where it came from. Packets that do not
//! decode are dropped and counted ([`ProxyStats::malformed`]). Both sockets
//! are bound to one interface (`SO_BINDTODEVICE`), so the server answers on
//! no other network.
//!
//! To answer another architecture, add it to [`ProxyConfig`] and to
//! `boot_file`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The DHCP server port.
pub const DHCP_SERVER_PORT: u16 = 67;
/// The DHCP client port.
pub const DHCP_CLIENT_PORT: u16 = 68;
/// The PXE boot-server port.
pub const PXE_PORT: u16 = 4011;

/// The longest boot file name the BOOTP `file` field holds with its NUL.
pub const MAX_BOOT_FILE: usize = 127;

/// Option 43 sub-option: PXE discovery control.
const PXE_DISCOVERY_CONTROL: u8 = 6;
/// Discovery control bit: skip boot-server discovery, boot the file in this reply.
const USE_BOOT_FILENAME: u8 = 8;
/// Option 43 end.
const PXE_END: u8 = 255;

/// Option 93 client architectures (RFC 4578, IANA processor architecture types).
pub mod arch {
    /// x86 BIOS.
    pub const BIOS: u16 = 0;
    /// EFI byte code (firmware that means x86-64 in practice).
    pub const EFI_BC: u16 = 7;
    /// EFI x86-64.
    pub const EFI_X86_64: u16 = 9;
}

/// What the proxy says, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The interface answered on (`--proxy-dhcp INTERFACE`).
    pub interface: String,
    /// This server's IPv4 address on that interface: `siaddr`, the server
    /// identifier, and where the TFTP server is.
    pub server_ip: Ipv4Addr,
    /// TFTP file for BIOS PXE ROMs.
    pub bios_file: String,
    /// TFTP file for EFI x86-64 PXE firmware.
    pub efi_file: String,
    /// The boot file for iPXE itself: its HTTP bootstrap script.
    pub ipxe_script_url: String,
    /// The port DISCOVERs arrive on (67; another only in tests).
    pub dhcp_port: u16,
    /// The PXE boot-server port (4011; another only in tests).
    pub pxe_port: u16,
    /// The port OFFERs are broadcast to (68; another only in tests).
    pub client_port: u16,
}

impl ProxyConfig {
    /// The defaults for `interface` at `server_ip`: `undionly.kpxe`,
    /// `ipxe.efi`, ports 67, 4011 and 68.
    pub fn new(interface: impl Into<String>, server_ip: Ipv4Addr, ipxe_script_url: impl Into<String>) -> Self {
        ProxyConfig {
            interface: interface.into(),
            server_ip,
            bios_file: "undionly.kpxe".into(),
            efi_file: "ipxe.efi".into(),
            ipxe_script_url: ipxe_script_url.into(),
            dhcp_port: DHCP_SERVER_PORT,
            pxe_port: PXE_PORT,
            client_port: DHCP_CLIENT_PORT,
        }
    }

    /// Checks that the TFTP server beside the proxy serves the files it
    /// names (`serves` says whether a name is in the TFTP server's table):
    /// an EFI x86-64 client sent to a file that is not there never boots.
    pub fn check_served(&self, serves: impl Fn(&str) -> bool) -> Result<(), Error> {
        match [&self.efi_file, &self.bios_file].into_iter().find(|f| !serves(f)) {
            Some(file) => Err(Error::BootFileNotServed { file: file.clone() }),
            None => Ok(()),
        }
    }
}

/// Starting the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The interface list cannot be read.
    #[error("listing network interfaces")]
    Interfaces {
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The interface has no IPv4 address (or does not exist).
    #[error("interface {interface} has no IPv4 address")]
    NoAddress {
        /// The interface.
        interface: String,
    },
    /// A boot file name does not fit the BOOTP `file` field.
    #[error("boot file {file:?} is longer than {MAX_BOOT_FILE} bytes")]
    BootFileTooLong {
        /// The name.
        file: String,
    },
    /// A boot file the proxy would name is not served by the TFTP server.
    #[error("boot file {file:?} is not served by the TFTP server (not a regular file in its root)")]
    BootFileNotServed {
        /// The name.
        file: String,
    },
    /// A socket cannot be made, bound to the interface or bound to the port.
    #[error("proxy-dhcp socket {addr} on {interface}")]
    Socket {
        /// The interface.
        interface: String,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The first IPv4 address of `interface`, to build a [`ProxyConfig`] from
/// `--proxy-dhcp INTERFACE`.
pub fn interface_ipv4(interface: &str) -> Result<Ipv4Addr, Error> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| Error::Interfaces { source: e.into() })?;
    addrs
        .filter(|a| a.interface_name == interface)
        .find_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|s| s.ip())))
        .ok_or_else(|| Error::NoAddress { interface: interface.to_string() })
}

/// Whether `request` comes from a PXE client: option 60 starts with `PXEClient`.
fn is_pxe_client(request: &Message) -> bool {
    matches!(request.opts().get(OptionCode::ClassIdentifier), Some(DhcpOption::ClassIdentifier(v)) if v.starts_with(b"PXEClient"))
}

/// Whether `request` comes from iPXE: option 77 is `iPXE`.
fn is_ipxe(request: &Message) -> bool {
    matches!(request.opts().get(OptionCode::UserClass), Some(DhcpOption::UserClass(v)) if v.as_slice() == b"iPXE")
}

/// The boot file for `request`, or `None` for an architecture not served.
fn boot_file<'c>(request: &Message, config: &'c ProxyConfig) -> Option<&'c str> {
    if is_ipxe(request) {
        return Some(&config.ipxe_script_url);
    }
    let arch = match request.opts().get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => u16::from(*a),
        _ => arch::BIOS,
    };
    match arch {
        arch::BIOS => Some(&config.bios_file),
        arch::EFI_BC | arch::EFI_X86_64 => Some(&config.efi_file),
        _ => None,
    }
}

/// The proxy's answer to `request`: an OFFER for a DISCOVER, an ACK for a
/// REQUEST (or INFORM), `None` for anything not from a PXE client of an
/// architecture served. Pure: no I/O.
pub fn respond(request: &Message, config: &ProxyConfig) -> Option<Message> {
    // `hlen` over 16 would make `Message::chaddr` panic.
    if request.opcode() != Opcode::BootRequest || request.hlen() > 16 || !is_pxe_client(request) {
        return None;
    }
    let reply_type = match request.opts().msg_type()? {
        MessageType::Discover => MessageType::Offer,
        MessageType::Request | MessageType::Inform => MessageType::Ack,
        _ => return None,
    };
    let file = boot_file(request, config).filter(|f| f.len() <= MAX_BOOT_FILE)?;
    let mut reply = Message::new_with_id(
        request.xid(),
        if reply_type == MessageType::Ack { request.ciaddr() } else { Ipv4Addr::UNSPECIFIED },
        Ipv4Addr::UNSPECIFIED,
        config.server_ip,
        request.giaddr(),
        request.chaddr(),
    );
    reply.set_opcode(Opcode::BootReply).set_htype(request.htype()).set_flags(request.flags()).set_fname_str(file);
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::MessageType(reply_type));
    opts.insert(DhcpOption::ServerIdentifier(config.server_ip));
    opts.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
    opts.insert(DhcpOption::VendorExtensions(vec![PXE_DISCOVERY_CONTROL, 1, USE_BOOT_FILENAME, PXE_END]));
    if let Some(DhcpOption::ClientMachineIdentifier(guid)) = request.opts().get(OptionCode::ClientMachineIdentifier) {
        opts.insert(DhcpOption::ClientMachineIdentifier(guid.clone()));
    }
    Some(reply)
}

/// Decodes one DHCPv4 packet; `None` if it does not decode.
///
/// dhcproto checks some option lengths with `debug_assert!` and computes
/// `len - 1` on a length that may be 0, so in a debug build a malformed
/// option panics inside it (`tests/fuzz_parsers.rs` found this). Decoding is
/// pure, so the panic is contained here: such a packet is malformed, dropped
/// and counted like any other. A packet whose `hlen` exceeds 16 is malformed
/// too: dhcproto's `Message::chaddr` would panic on it, in any build.
pub fn decode(bytes: &[u8]) -> Option<Message> {
    std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(bytes)).ok()).ok().flatten().filter(|m| m.hlen() <= 16)
}

/// Encodes one DHCPv4 packet.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut buf = Vec::with_capacity(576);
    // Encoding into a Vec fails only for values dhcproto cannot represent,
    // which `respond` never builds.
    let _ = message.encode(&mut Encoder::new(&mut buf));
    buf
}

/// What the proxy has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// DHCPOFFERs sent (port 67).
    pub offers: u64,
    /// DHCPACKs sent (port 4011).
    pub acks: u64,
    /// Well-formed packets not answered: not PXE, another architecture,
    /// another message type.
    pub ignored: u64,
    /// Packets dropped because they did not decode.
    pub malformed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    offers: AtomicU64,
    acks: AtomicU64,
    ignored: AtomicU64,
    malformed: AtomicU64,
}

/// A running proxyDHCP server. Dropping it stops the server;
/// [`ProxyDhcp::shutdown`] also waits for its task to end.
#[derive(Debug)]
pub struct ProxyDhcp {
    config: Arc<ProxyConfig>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// A UDP socket on `0.0.0.0:port`, bound to `interface`, broadcast allowed.
fn bound_socket(interface: &str, port: u16) -> Result<UdpSocket, Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let err = |source| Error::Socket { interface: interface.to_string(), addr, source };
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_broadcast(true).map_err(err)?;
    socket.bind_device(Some(interface.as_bytes())).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    UdpSocket::from_std(socket.into()).map_err(err)
}

impl ProxyDhcp {
    /// Binds ports 67 and 4011 on the interface, spawns the server task and
    /// logs `proxy-dhcp: answering PXE on IFACE (IP)`. Needs root (or
    /// `CAP_NET_RAW` and `CAP_NET_BIND_SERVICE`).
    pub async fn start(config: ProxyConfig) -> Result<ProxyDhcp, Error> {
        for file in [&config.bios_file, &config.efi_file, &config.ipxe_script_url] {
            if file.len() > MAX_BOOT_FILE {
                return Err(Error::BootFileTooLong { file: file.clone() });
            }
        }
        let dhcp = bound_socket(&config.interface, config.dhcp_port)?;
        let pxe = bound_socket(&config.interface, config.pxe_port)?;
        tracing::info!("proxy-dhcp: answering PXE on {} ({})", config.interface, config.server_ip);
        let config = Arc::new(config);
        let counters = Arc::new(Counters::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(dhcp, pxe, Arc::clone(&config), Arc::clone(&counters), cancel.clone()));
        Ok(ProxyDhcp { config, counters, cancel, task: Some(task) })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// The counters so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        ProxyStats {
            offers: c.offers.load(Ordering::Relaxed),
            acks: c.acks.load(Ordering::Relaxed),
            ignored: c.ignored.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
        }
    }

    /// Stops answering and waits for the server task to end.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ProxyDhcp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// What the proxy makes of one packet received on port 67 (or on 4011 when
/// `on_pxe_port`): `None` when it does not decode, else the request and the
/// reply due, if any. Pure: the whole path from received bytes to the answer,
/// and the entry point `bench/fuzz` and `tests/fuzz_parsers.rs` drive.
pub fn answer(bytes: &[u8], on_pxe_port: bool, config: &ProxyConfig) -> Option<(Message, Option<Message>)> {
    let request = decode(bytes)?;
    // On port 67 only DISCOVERs are ours: REQUESTs there go to the real DHCP server.
    let ours = on_pxe_port || request.opts().msg_type() == Some(MessageType::Discover);
    let reply = respond(&request, config).filter(|_| ours);
    Some((request, reply))
}

/// Handles one received packet; returns the reply and where it goes.
fn handle(bytes: &[u8], from: SocketAddr, on_pxe_port: bool, config: &ProxyConfig, counters: &Counters) -> Option<(Vec<u8>, SocketAddr)> {
    let Some((request, reply)) = answer(bytes, on_pxe_port, config) else {
        counters.malformed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("proxy-dhcp: {from}: dropped a packet that does not decode");
        return None;
    };
    let Some(reply) = reply else {
        counters.ignored.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let to = if on_pxe_port {
        counters.acks.fetch_add(1, Ordering::Relaxed);
        from
    } else {
        counters.offers.fetch_add(1, Ordering::Relaxed);
        if request.giaddr().is_unspecified() {
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, config.client_port))
        } else {
            SocketAddr::new(IpAddr::V4(request.giaddr()), config.dhcp_port)
        }
    };
    let mac = request.chaddr().get(..6).and_then(|b| <[u8; 6]>::try_from(b).ok()).map(kiln_core::Mac);
    tracing::info!(
        "proxy-dhcp: {} to {} ({to}): boot file {:?}",
        if on_pxe_port { "ACK" } else { "OFFER" },
        mac.map(|m| m.to_string()).unwrap_or_default(),
        reply.fname_str().and_then(Result::ok).unwrap_or(""),
    );
    Some((encode(&reply), to))
}

async fn serve(dhcp: UdpSocket, pxe: UdpSocket, config: Arc<ProxyConfig>, counters: Arc<Counters>, cancel: CancellationToken) {
    let (mut a, mut b) = (vec![0u8; 2048], vec![0u8; 2048]);
    loop {
        let (socket, reply) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = dhcp.recv_from(&mut a) => match r {
                Ok((n, from)) => (&dhcp, handle(&a[..n], from, false, &config, &counters)),
                Err(e) => { tracing::debug!("proxy-dhcp: receive on port {}: {e}", config.dhcp_port); continue }
            },
            r = pxe.recv_from(&mut b) => match r {
                Ok((n, from)) => (&pxe, handle(&b[..n], from, true, &config, &counters)),
                Err(e) => { tracing::debug!("proxy-dhcp: receive on port {}: {e}", config.pxe_port); continue }
            },
        };
        if let Some((bytes, to)) = reply
            && let Err(e) = socket.send_to(&bytes, to).await
        {
            tracing::warn!("proxy-dhcp: send to {to} on {}: {e}", config.interface);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::{Architecture, Flags, HType};

    const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const GUID: [u8; 17] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

    fn config() -> ProxyConfig {
        ProxyConfig::new("eth0", SERVER, "http://192.0.2.1:8080/boot.ipxe")
    }

    /// A client packet as a PXE ROM (or not) sends it.
    fn client(kind: MessageType, vendor: Option<&[u8]>, arch: Option<u16>, user_class: Option<&[u8]>) -> Message {
        let mut m = Message::new_with_id(
            0xdead_beef,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &MAC,
        );
        m.set_flags(Flags::default().set_broadcast());
        if kind == MessageType::Request {
            m.set_ciaddr(Ipv4Addr::new(192, 0, 2, 50));
        }
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        if let Some(v) = vendor {
            o.insert(DhcpOption::ClassIdentifier(v.to_vec()));
        }
        if let Some(a) = arch {
            o.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(a)));
        }
        if let Some(u) = user_class {
            o.insert(DhcpOption::UserClass(u.to_vec()));
        }
        o.insert(DhcpOption::ClientMachineIdentifier(GUID.to_vec()));
        m
    }

    /// Name, request, and the reply's message type and boot file (`None`: ignored).
    type RespondCase = (&'static str, Message, Option<(MessageType, &'static str)>);
    /// Name, packet, source, whether it came to port 4011, where the reply goes.
    type HandleCase<'a> = (&'static str, &'a [u8], SocketAddr, bool, Option<SocketAddr>);

    const PXE_BIOS: &[u8] = b"PXEClient:Arch:00000:UNDI:002001";
    const PXE_EFI: &[u8] = b"PXEClient:Arch:00007:UNDI:003016";

    #[test]
    fn answers_pxe_clients_by_architecture() {
        use MessageType::*;
        let url = "http://192.0.2.1:8080/boot.ipxe";
        let cases: Vec<RespondCase> = vec![
            ("BIOS discover", client(Discover, Some(PXE_BIOS), Some(0), None), Some((Offer, "undionly.kpxe"))),
            ("no option 93 is BIOS", client(Discover, Some(b"PXEClient"), None, None), Some((Offer, "undionly.kpxe"))),
            ("EFI BC (7)", client(Discover, Some(PXE_EFI), Some(7), None), Some((Offer, "ipxe.efi"))),
            ("EFI x86-64 (9)", client(Discover, Some(b"PXEClient:Arch:00009"), Some(9), None), Some((Offer, "ipxe.efi"))),
            ("iPXE under BIOS", client(Discover, Some(PXE_BIOS), Some(0), Some(b"iPXE")), Some((Offer, url))),
            ("iPXE under EFI", client(Discover, Some(PXE_EFI), Some(7), Some(b"iPXE")), Some((Offer, url))),
            ("other user class", client(Discover, Some(PXE_BIOS), Some(0), Some(b"gPXE")), Some((Offer, "undionly.kpxe"))),
            ("request on 4011", client(Request, Some(PXE_EFI), Some(7), None), Some((Ack, "ipxe.efi"))),
            ("iPXE request on 4011", client(Request, Some(PXE_BIOS), Some(0), Some(b"iPXE")), Some((Ack, url))),
            ("not PXE", client(Discover, Some(b"MSFT 5.0"), Some(0), None), None),
            ("no vendor class", client(Discover, None, Some(0), None), None),
            ("vendor class lower case", client(Discover, Some(b"pxeclient"), Some(0), None), None),
            ("ARM64 EFI (11)", client(Discover, Some(b"PXEClient:Arch:00011"), Some(11), None), None),
            ("EFI HTTP boot (16)", client(Discover, Some(b"HTTPClient:Arch:00016"), Some(16), None), None),
            ("release", client(Release, Some(PXE_BIOS), Some(0), None), None),
            ("decline", client(Decline, Some(PXE_BIOS), Some(0), None), None),
        ];
        for (name, request, want) in cases {
            let got = respond(&request, &config());
            let Some((kind, file)) = want else {
                assert_eq!(got, None, "case {name}: ignored");
                continue;
            };
            let reply = got.unwrap_or_else(|| panic!("case {name}: no answer"));
            // What goes on the wire is what was built.
            let reply = decode(&encode(&reply)).unwrap_or_else(|| panic!("case {name}: reply decodes"));
            assert_eq!(reply.opts().msg_type(), Some(kind), "case {name}: message type");
            let fname = reply.fname().map(|f| String::from_utf8_lossy(f).trim_end_matches('\0').to_string());
            assert_eq!(fname.as_deref(), Some(file), "case {name}: boot file");
            assert_eq!(reply.opcode(), Opcode::BootReply, "case {name}: opcode");
            assert_eq!(reply.xid(), 0xdead_beef, "case {name}: xid");
            assert_eq!(reply.chaddr(), &MAC, "case {name}: chaddr");
            assert_eq!(reply.htype(), HType::Eth, "case {name}: htype");
            assert!(reply.flags().broadcast(), "case {name}: broadcast flag kept");
            assert_eq!(reply.yiaddr(), Ipv4Addr::UNSPECIFIED, "case {name}: never an address");
            assert_eq!(reply.siaddr(), SERVER, "case {name}: next-server");
            let want_ciaddr = if kind == Ack { Ipv4Addr::new(192, 0, 2, 50) } else { Ipv4Addr::UNSPECIFIED };
            assert_eq!(reply.ciaddr(), want_ciaddr, "case {name}: ciaddr");
            let o = reply.opts();
            for absent in
                [OptionCode::AddressLeaseTime, OptionCode::SubnetMask, OptionCode::Router, OptionCode::Renewal, OptionCode::Rebinding]
            {
                assert!(o.get(absent).is_none(), "case {name}: no {absent:?}");
            }
            assert_eq!(o.get(OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(SERVER)), "case {name}: option 54");
            assert_eq!(
                o.get(OptionCode::ClassIdentifier),
                Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec())),
                "case {name}: option 60"
            );
            assert_eq!(
                o.get(OptionCode::VendorExtensions),
                Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255])),
                "case {name}: option 43"
            );
            assert_eq!(
                o.get(OptionCode::ClientMachineIdentifier),
                Some(&DhcpOption::ClientMachineIdentifier(GUID.to_vec())),
                "case {name}: option 97"
            );
        }
    }

    #[test]
    fn boot_files_must_be_served_by_tftp() {
        let config = ProxyConfig::new("lo", Ipv4Addr::LOCALHOST, "http://127.0.0.1/boot.ipxe");
        let table = |names: &'static [&'static str]| move |f: &str| names.contains(&f);
        let cases: [(&str, &[&str], Option<&str>); 3] = [
            ("both served", &["ipxe.efi", "undionly.kpxe", "snponly.efi"], None),
            ("no ipxe.efi", &["undionly.kpxe", "snponly.efi"], Some("ipxe.efi")),
            ("no undionly.kpxe", &["ipxe.efi"], Some("undionly.kpxe")),
        ];
        for (name, names, missing) in cases {
            match (config.check_served(table(names)), missing) {
                (Ok(()), None) => {}
                (Err(Error::BootFileNotServed { file }), Some(m)) => assert_eq!(file, m, "case {name}"),
                (got, _) => panic!("case {name}: {got:?}"),
            }
        }
    }

    #[test]
    fn a_boot_file_too_long_is_not_offered() {
        let c = ProxyConfig::new("eth0", SERVER, format!("http://192.0.2.1/{}", "x".repeat(200)));
        assert_eq!(respond(&client(MessageType::Discover, Some(PXE_BIOS), Some(0), Some(b"iPXE")), &c), None);
    }

    #[tokio::test]
    async fn start_refuses_a_boot_file_too_long() {
        let c = ProxyConfig::new("lo", SERVER, format!("http://192.0.2.1/{}", "x".repeat(200)));
        let err = ProxyDhcp::start(c).await.unwrap_err();
        assert!(matches!(err, Error::BootFileTooLong { .. }), "{err}");
    }

    #[test]
    fn a_reply_is_never_answered() {
        let mut m = client(MessageType::Discover, Some(PXE_BIOS), Some(0), None);
        m.set_opcode(Opcode::BootReply);
        assert_eq!(respond(&m, &config()), None);
    }

    #[test]
    fn handle_routes_counts_and_drops() {
        let counters = Counters::default();
        let c = config();
        let from_client: SocketAddr = "0.0.0.0:68".parse().unwrap();
        let from_leased: SocketAddr = "192.0.2.50:68".parse().unwrap();
        let discover = encode(&client(MessageType::Discover, Some(PXE_BIOS), Some(0), None));
        let request = encode(&client(MessageType::Request, Some(PXE_EFI), Some(7), None));
        let mut relayed = client(MessageType::Discover, Some(PXE_BIOS), Some(0), None);
        relayed.set_giaddr(Ipv4Addr::new(192, 0, 2, 254));
        let relayed = encode(&relayed);
        let non_pxe = encode(&client(MessageType::Discover, Some(b"udhcp 1.36"), None, None));
        let truncated = discover[..100].to_vec();
        let mut long_hlen = discover.clone();
        long_hlen[2] = 17;
        let cases: Vec<HandleCase> = vec![
            ("discover on 67 is broadcast", &discover, from_client, false, Some("255.255.255.255:68".parse().unwrap())),
            ("relayed discover goes to the relay", &relayed, from_client, false, Some("192.0.2.254:67".parse().unwrap())),
            ("request on 4011 is unicast back", &request, from_leased, true, Some(from_leased)),
            ("request on 67 is the real server's", &request, from_leased, false, None),
            ("non-PXE discover", &non_pxe, from_client, false, None),
            ("empty packet", b"", from_client, false, None),
            ("garbage", b"\x01\x01\x06\x00garbage", from_client, false, None),
            ("truncated discover", &truncated, from_client, false, None),
            ("hlen 17", &long_hlen, from_client, false, None),
        ];
        for (name, bytes, from, on_pxe_port, want) in cases {
            let got = handle(bytes, from, on_pxe_port, &c, &counters).map(|(_, to)| to);
            assert_eq!(got, want, "case {name}");
        }
        let stats = ProxyStats {
            offers: counters.offers.load(Ordering::Relaxed),
            acks: counters.acks.load(Ordering::Relaxed),
            ignored: counters.ignored.load(Ordering::Relaxed),
            malformed: counters.malformed.load(Ordering::Relaxed),
        };
        assert_eq!(stats, ProxyStats { offers: 2, acks: 1, ignored: 2, malformed: 4 });
    }

    #[tokio::test]
    async fn start_names_a_missing_interface() {
        let err = interface_ipv4("kiln-no-such-if0").unwrap_err();
        assert!(err.to_string().contains("kiln-no-such-if0"), "{err}");
        let err = ProxyDhcp::start(ProxyConfig { dhcp_port: 0, pxe_port: 0, ..ProxyConfig::new("kiln-no-such-if0", SERVER, "x") })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("kiln-no-such-if0"), "{err}");
    }
}
