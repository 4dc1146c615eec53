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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes go through unchanged both ways, and the client's end of stream reaches the
    /// server (which then ends its side, and the relay finishes).
    #[tokio::test]
    async fn copies_both_ways_and_passes_end_of_stream() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let upstream_addr = upstream.local_addr().expect("upstream address");
        // The server answers everything it reads in upper case, then closes at EOF.
        let server = tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.expect("server read");
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                s.write_all(&buf[..n].to_ascii_uppercase()).await.expect("server write");
            }
            seen
        });
        let front = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let front_addr = front.local_addr().expect("relay address");
        let relayed = tokio::spawn(async move {
            let (client, _) = front.accept().await.expect("accept client");
            relay(client, upstream_addr).await
        });

        let mut client = TcpStream::connect(front_addr).await.expect("connect");
        let body = b"POST /mcp HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}";
        client.write_all(body).await.expect("client write");
        let mut answer = vec![0u8; body.len()];
        let within = std::time::Duration::from_secs(10);
        tokio::time::timeout(within, client.read_exact(&mut answer))
            .await
            .expect("answer in time")
            .expect("client read");
        assert_eq!(answer, body.to_ascii_uppercase());
        client.shutdown().await.expect("client shutdown");
        let mut rest = Vec::new();
        tokio::time::timeout(within, client.read_to_end(&mut rest))
            .await
            .expect("end in time")
            .expect("read to the end");
        assert!(rest.is_empty(), "nothing after the answer: {rest:?}");
        assert_eq!(server.await.expect("server task"), body.to_vec());
        relayed.await.expect("relay task").expect("relay ends cleanly");
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_an_error() {
        // A port nobody listens on: bind, note it, close it.
        let addr = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("address");
        let front = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let front_addr = front.local_addr().expect("relay address");
        let relayed = tokio::spawn(async move {
            let (client, _) = front.accept().await.expect("accept client");
            relay(client, addr).await
        });
        let _client = TcpStream::connect(front_addr).await.expect("connect");
        let err = relayed.await.expect("relay task").expect_err("connect refused");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
