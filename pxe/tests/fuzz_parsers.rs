//! Bounded fuzzing of the two packet parsers kiln exposes to the network:
//! `tftp::parse_packet` and the proxyDHCP decode + `respond` path.
//!
//! Seeded random packets and mutations of valid ones, for `KILN_FUZZ_SECS`
//! seconds per parser (default 2; `KILN_FUZZ_SEED` picks the seed). A panic
//! fails the test; so does a packet that parses but does not survive an
//! encode and parse round trip, or a proxyDHCP reply that hands out an address.
//!
//! Then the committed inputs of `bench/fuzz` (libFuzzer's minimised corpus
//! and any crash input, see `bench/fuzz/run`) for the network targets, each
//! through the same entry point the fuzzer drives (`bench/fuzz/src/pxe.rs`,
//! included here as source): the DHCP answer, the TFTP parser, the `/ipxe`
//! query and the registration body. No cargo-fuzz needed.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use dhcproto::v4::{Architecture, DhcpOption, Message, MessageType};
use kiln_pxe::dhcp::{self, ProxyConfig};
use kiln_pxe::tftp::{self, Mode, Options, Packet, Request};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "../../bench/fuzz/src/pxe.rs"]
mod entry;
#[path = "../../bench/fuzz/src/replay.rs"]
mod replay;

fn budget() -> Duration {
    let secs: f64 = std::env::var("KILN_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

fn rng(salt: u64) -> (StdRng, u64) {
    let seed = std::env::var("KILN_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x6b69_6c6e);
    (StdRng::seed_from_u64(seed ^ salt), seed)
}

/// One random change: flip, set, insert, remove or truncate.
fn mutate(rng: &mut StdRng, packet: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..=4) {
        let len = packet.len();
        match rng.random_range(0..6) {
            0 if len > 0 => packet[rng.random_range(0..len)] ^= 1 << rng.random_range(0..8),
            1 if len > 0 => packet[rng.random_range(0..len)] = [0u8, 0xff, b'0', b'9', 1][rng.random_range(0..5)],
            2 => packet.insert(rng.random_range(0..=len), rng.random()),
            3 if len > 0 => {
                packet.remove(rng.random_range(0..len));
            }
            4 => packet.truncate(rng.random_range(0..=len)),
            _ => packet.extend((0..rng.random_range(0..8)).map(|_| rng.random::<u8>())),
        }
    }
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let len = rng.random_range(0..=max);
    (0..len).map(|_| rng.random()).collect()
}

#[test]
fn tftp_parse_packet_never_panics() {
    let (mut rng, seed) = rng(1);
    let options = Options { blksize: Some(1428), tsize: Some(0), timeout: Some(3), windowsize: Some(16) };
    let seeds: Vec<Vec<u8>> = vec![
        Packet::Rrq(Request { filename: "ipxe.efi".into(), mode: Mode::Octet, options }).to_bytes(),
        Packet::Rrq(Request { filename: "undionly.kpxe".into(), mode: Mode::Netascii, options: Options::default() }).to_bytes(),
        Packet::Wrq(Request { filename: "x".into(), mode: Mode::Octet, options }).to_bytes(),
        Packet::Data { block: 65535, data: b"some data" }.to_bytes(),
        Packet::Ack(7).to_bytes(),
        Packet::Error { code: 1, message: "file not found".into() }.to_bytes(),
        Packet::OAck(vec![("blksize".into(), "1428".into()), ("tsize".into(), "1000".into())]).to_bytes(),
    ];
    let (deadline, mut runs, mut parsed) = (Instant::now() + budget(), 0u64, 0u64);
    while Instant::now() < deadline {
        for _ in 0..256 {
            let mut packet =
                if rng.random_bool(0.2) { random_bytes(&mut rng, 600) } else { seeds[rng.random_range(0..seeds.len())].clone() };
            mutate(&mut rng, &mut packet);
            runs += 1;
            if let Ok(p) = tftp::parse_packet(&packet) {
                parsed += 1;
                let again = p.to_bytes();
                assert_eq!(tftp::parse_packet(&again).as_ref(), Ok(&p), "seed {seed}: round trip of {packet:?}");
            }
        }
    }
    eprintln!("tftp: {runs} packets, {parsed} parsed (seed {seed})");
    assert!(runs > 1000 && parsed > 0, "seed {seed}: too few runs ({runs}) or nothing parsed ({parsed})");
}

fn dhcp_seed(kind: MessageType, vendor: &[u8], arch: u16, user_class: Option<&[u8]>) -> Vec<u8> {
    let mut m = Message::new_with_id(
        1,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &[2, 0, 0, 0, 0, 1],
    );
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    o.insert(DhcpOption::ClassIdentifier(vendor.to_vec()));
    o.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(arch)));
    o.insert(DhcpOption::ClientMachineIdentifier(vec![0; 17]));
    if let Some(u) = user_class {
        o.insert(DhcpOption::UserClass(u.to_vec()));
    }
    dhcp::encode(&m)
}

#[test]
fn dhcp_decode_and_respond_never_panic() {
    entry::quiet_dhcproto_panics();
    let (mut rng, seed) = rng(2);
    let config = ProxyConfig::new("eth0", Ipv4Addr::new(192, 0, 2, 1), "http://192.0.2.1:8080/boot.ipxe");
    let seeds = [
        dhcp_seed(MessageType::Discover, b"PXEClient:Arch:00000:UNDI:002001", 0, None),
        dhcp_seed(MessageType::Discover, b"PXEClient:Arch:00007:UNDI:003016", 7, None),
        dhcp_seed(MessageType::Request, b"PXEClient:Arch:00009", 9, Some(b"iPXE")),
        dhcp_seed(MessageType::Discover, b"MSFT 5.0", 0, None),
    ];
    let (deadline, mut runs, mut decoded, mut answered) = (Instant::now() + budget(), 0u64, 0u64, 0u64);
    while Instant::now() < deadline {
        for _ in 0..256 {
            let mut packet =
                if rng.random_bool(0.1) { random_bytes(&mut rng, 700) } else { seeds[rng.random_range(0..seeds.len())].clone() };
            mutate(&mut rng, &mut packet);
            runs += 1;
            let Some(request) = dhcp::decode(&packet) else { continue };
            decoded += 1;
            if let Some(reply) = dhcp::respond(&request, &config) {
                answered += 1;
                assert_eq!(reply.yiaddr(), Ipv4Addr::UNSPECIFIED, "seed {seed}: an address offered for {packet:?}");
                assert!(dhcp::decode(&dhcp::encode(&reply)).is_some(), "seed {seed}: reply to {packet:?} does not decode");
            }
        }
    }
    eprintln!("dhcp: {runs} packets, {decoded} decoded, {answered} answered (seed {seed})");
    assert!(runs > 1000 && decoded > 0 && answered > 0, "seed {seed}: runs {runs}, decoded {decoded}, answered {answered}");
}

#[test]
fn committed_fuzz_inputs_replay() {
    let fuzz_dir = entry::repo_root().join("bench/fuzz");
    for &(target, run) in entry::TARGETS {
        let n = replay::replay(&fuzz_dir, target, run);
        eprintln!("{target}: {n} committed inputs replayed");
        assert!(n > 0, "{target}: bench/fuzz/corpus/{target} holds the seed corpus");
    }
}
