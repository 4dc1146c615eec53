//! tcp-relay: the cheapest possible proxy, as a floor for `make bench-proxy`.
//!
//! ```text
//! tcp-relay UPSTREAM_ADDR [--port PORT]
//! ```
//!
//! Listens on 127.0.0.1:PORT (0 = any free port), prints `LISTENING <port>`, and for each
//! accepted connection opens one to UPSTREAM_ADDR and copies bytes both ways
//! (`copy_bidirectional`, TCP_NODELAY on both sides, a single-threaded runtime). It reads
//! nothing and decides nothing: what it adds to a call is what any process sitting between
//! the client and the server adds on this machine — two more socket hops and two more
//! wake-ups per call. `make bench-proxy` reports toolgate-proxy's cost both against the
//! direct connection and against this relay.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use tokio::net::{TcpListener, TcpStream};

/// A byte-copying TCP relay (benchmark floor).
#[derive(Parser, Debug)]
#[command(name = "tcp-relay", version, about)]
struct Args {
    /// Where to connect, e.g. 127.0.0.1:8080.
    upstream: SocketAddr,
    /// Port on 127.0.0.1 (0 = any free port; the chosen one is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    let mut server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await.map(|_| ())
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    println!("LISTENING {}", listener.local_addr().context("local address")?.port());
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let upstream = args.upstream;
                tokio::spawn(async move {
                    if let Err(e) = relay(stream, upstream).await {
                        eprintln!("tcp-relay: {e}");
                    }
                });
            }
            Err(e) => eprintln!("tcp-relay: accept failed: {e}"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(serve(args))
}
