//! `bench quic-idle-memory`: what an idle QUIC connection costs the accepting side, by the
//! stream limits it grants its peer. quinn allocates per-stream bookkeeping for every stream
//! the peer may open (up to the concurrency limit) when the connection is created, so these
//! limits decide most of an idle node's cost to the gateway. Both endpoints run in this
//! process; the client's limits are fixed, so differences between rows are the server's.

use super::os::heap_stats;
use super::stats::num;
use super::system::Table;
use anyhow::Context;
use nearpath_protocol::tls::{client_config_with, server_config, ServerVerify, TransportOptions};
use nearpath_protocol::ALPN_NODE;
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct QuicMemArgs {
    /// Idle connections per configuration.
    #[arg(long, default_value_t = 500)]
    pub connections: u32,
    /// Server stream limits to compare, as bidi:uni pairs (the gateway uses 1024:1024).
    #[arg(long, default_value = "1024:1024,1024:16,16:1024,16:16")]
    pub limits: String,
}

fn parse_limits(s: &str) -> anyhow::Result<Vec<(u32, u32)>> {
    s.split(',')
        .map(|p| {
            let (b, u) = p
                .trim()
                .split_once(':')
                .with_context(|| format!("{p:?} is not bidi:uni"))?;
            Ok((b.parse()?, u.parse()?))
        })
        .collect()
}

/// Heap bytes held per connection with the server granting `bidi`/`uni` streams.
async fn per_connection(n: u32, bidi: u32, uni: u32) -> anyhow::Result<f64> {
    let cert = nearpath_gateway::tls::self_signed(&["localhost"])?;
    let server_transport = TransportOptions {
        max_concurrent_bidi_streams: bidi,
        max_concurrent_uni_streams: uni,
        ..Default::default()
    };
    let scfg = server_config(
        cert.chain.clone(),
        cert.key.clone_key(),
        &[ALPN_NODE],
        &server_transport,
    )?;
    let (server, _) =
        nearpath_protocol::net::server_endpoint("127.0.0.1:0".parse()?, scfg, 8 << 20)?;
    let client_transport = TransportOptions {
        max_concurrent_bidi_streams: 1,
        max_concurrent_uni_streams: 1,
        ..Default::default()
    };
    let ccfg = client_config_with(
        ServerVerify::PinnedSha256(cert.sha256),
        &[ALPN_NODE],
        &client_transport,
    )?;
    let (client, _) =
        nearpath_protocol::net::client_endpoint("127.0.0.1:0".parse()?, ccfg, 8 << 20)?;
    let addr = server.local_addr()?;
    let acceptor = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..n {
                let Some(incoming) = server.accept().await else {
                    break;
                };
                if let Ok(c) = incoming.await {
                    held.push(c);
                }
            }
            held
        })
    };
    // Warm the allocator and the endpoints with one connection first.
    let warm = client.connect(addr, "localhost")?.await?;
    let before = heap_stats().in_use;
    let mut conns = Vec::new();
    for _ in 0..n.saturating_sub(1) {
        conns.push(client.connect(addr, "localhost")?.await?);
    }
    let held = tokio::time::timeout(Duration::from_secs(30), acceptor)
        .await
        .context("accepting")??;
    let after = heap_stats().in_use;
    let per = (after as f64 - before as f64) / (n.saturating_sub(1)).max(1) as f64;
    drop(held);
    for c in conns.iter().chain(std::iter::once(&warm)) {
        c.close(0u32.into(), b"done");
    }
    client.close(0u32.into(), b"done");
    server.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), client.wait_idle()).await;
    Ok(per)
}

pub async fn run(a: QuicMemArgs) -> anyhow::Result<()> {
    let limits = parse_limits(&a.limits)?;
    println!(
        "quic-idle-memory: {} idle connections per row, both endpoints in this process (client grants 1:1); heap in use from glibc mallinfo2",
        a.connections
    );
    let mut t = Table::new(&[
        "server grants bidi:uni",
        "heap per connection, both sides (KiB)",
    ]);
    let mut rows = Vec::new();
    for (bidi, uni) in limits {
        let per = per_connection(a.connections, bidi, uni).await?;
        t.row(vec![
            format!("{bidi}:{uni}"),
            format!("{:.1}", per / 1024.0),
        ]);
        rows.push(json!({"bidi": bidi, "uni": uni, "heap_per_connection_kib": num(per / 1024.0)}));
    }
    println!();
    t.print();
    println!(
        "{}",
        json!({"bench": "quic-idle-memory", "connections": a.connections, "rows": rows})
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_pairs() {
        assert_eq!(
            parse_limits("1024:1024, 1:0").unwrap(),
            vec![(1024, 1024), (1, 0)]
        );
        assert!(parse_limits("1024").is_err());
    }
}
