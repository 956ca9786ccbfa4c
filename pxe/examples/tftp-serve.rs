//! Serves a directory over TFTP with kiln's server, for `bench/tftp`.
//!
//! `cargo run --release -p kiln-pxe --example tftp-serve -- ROOT ADDR`
//! runs until killed; it prints the listening address on stdout.

use std::net::SocketAddr;
use std::path::PathBuf;

use kiln_pxe::tftp::TftpServer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: tftp-serve ROOT ADDR";
    let root = PathBuf::from(args.next().ok_or(usage)?);
    let addr: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let server = TftpServer::start(root, addr).await?;
    println!("{}", server.local_addr());
    tokio::signal::ctrl_c().await?;
    eprintln!("tftp-serve: {:?}", server.stats());
    server.shutdown().await;
    Ok(())
}
