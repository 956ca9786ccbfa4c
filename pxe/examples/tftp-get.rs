//! A small TFTP client that negotiates `blksize` and `windowsize` (RFC 7440),
//! which neither curl nor tftp-hpa's client does, for `bench/tftp`.
//!
//! `tftp-get ADDR FILE OUT [BLKSIZE [WINDOWSIZE]]` prints the options the
//! server acknowledged, then writes the file to OUT. A server that ignores
//! an option gets the RFC 1350 default for it.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use kiln_pxe::tftp::{Mode, Options, Packet, Request, parse_packet};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, file, out, rest @ ..] = args.as_slice() else {
        return Err("usage: tftp-get ADDR FILE OUT [BLKSIZE [WINDOWSIZE]]".into());
    };
    let addr: SocketAddr = addr.parse()?;
    let options = Options {
        blksize: rest.first().map(|s| s.parse()).transpose()?,
        windowsize: rest.get(1).map(|s| s.parse()).transpose()?,
        tsize: Some(0),
        timeout: None,
    };
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.send_to(&Packet::Rrq(Request { filename: file.clone(), mode: Mode::Octet, options }).to_bytes(), addr)?;
    let (mut blksize, mut windowsize, mut expected, mut in_window) = (512usize, 1usize, 1u16, 0usize);
    let mut data = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut server = None;
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        if *server.get_or_insert(from) != from {
            continue;
        }
        match parse_packet(&buf[..n])? {
            Packet::OAck(opts) => {
                for (name, value) in &opts {
                    match name.as_str() {
                        "blksize" => blksize = value.parse()?,
                        "windowsize" => windowsize = value.parse()?,
                        _ => {}
                    }
                }
                eprintln!("tftp-get: OACK {opts:?}");
                socket.send_to(&Packet::Ack(0).to_bytes(), from)?;
            }
            Packet::Data { block, data: d } if block == expected => {
                data.extend_from_slice(d);
                expected = expected.wrapping_add(1);
                in_window += 1;
                let last = d.len() < blksize;
                if in_window == windowsize || last {
                    socket.send_to(&Packet::Ack(block).to_bytes(), from)?;
                    in_window = 0;
                }
                if last {
                    break;
                }
            }
            Packet::Data { .. } => {
                // Out of order: acknowledge what arrived in order (RFC 7440).
                socket.send_to(&Packet::Ack(expected.wrapping_sub(1)).to_bytes(), from)?;
                in_window = 0;
            }
            Packet::Error { code, message } => return Err(format!("error {code}: {message}").into()),
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    std::fs::File::create(out)?.write_all(&data)?;
    Ok(())
}
