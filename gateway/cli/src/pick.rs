//! How the `nearpath` client picks a gateway among several: it handshakes with all of them at
//! once and keeps the first to finish, which is the lowest round trip (plus the gateway's TLS
//! work); the slower handshakes are abandoned.

use nearpath_protocol::{Client, ClientError, ServerVerify};
use std::net::SocketAddr;
use std::time::Duration;

/// Bound on one gateway's handshake when several are probed: a dead gateway is given up on
/// after this, whatever the others do.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to the gateway at `gateway` (`host:port`), verifying it with `verify` under
/// `server_name` (default: the host part of the address).
pub async fn connect(
    gateway: &str,
    server_name: Option<&str>,
    verify: ServerVerify,
) -> Result<Client, String> {
    let addr: SocketAddr = match gateway.parse() {
        Ok(a) => a,
        Err(_) => tokio::net::lookup_host(gateway)
            .await
            .map_err(|e| format!("resolving {gateway}: {e}"))?
            .next()
            .ok_or_else(|| format!("{gateway} has no addresses"))?,
    };
    let host = server_name.map(str::to_string).unwrap_or_else(|| {
        gateway
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
            .unwrap_or_else(|| gateway.to_string())
    });
    Client::connect(addr, &host, verify)
        .await
        .map_err(|e| describe(gateway, &e))
}

/// The failure to connect to `gateway` as the user named it (a host name stays a host name).
fn describe(gateway: &str, e: &ClientError) -> String {
    match e {
        ClientError::NoAnswer { .. } => no_answer(gateway),
        ClientError::PinMismatch(m) => format!("gateway {gateway}: {m}"),
        e => format!("{gateway}: {e}"),
    }
}

/// What a dialled address that never answered is called.
fn no_answer(gateway: &str) -> String {
    format!("no gateway answering at {gateway} (UDP)")
}

/// Handshakes with every candidate at once and returns the first connected client and its
/// address; fails, naming each gateway's problem, only when none answers within
/// [`PROBE_TIMEOUT`].
pub async fn nearest(
    candidates: &[String],
    server_name: Option<&str>,
    verify: ServerVerify,
) -> Result<(Client, String), String> {
    let mut set = tokio::task::JoinSet::new();
    for address in candidates {
        let (address, verify) = (address.clone(), verify.clone());
        let server_name = server_name.map(str::to_string);
        set.spawn(async move {
            let result = tokio::time::timeout(
                PROBE_TIMEOUT,
                connect(&address, server_name.as_deref(), verify),
            )
            .await;
            (address, result)
        });
    }
    let mut failures = Vec::new();
    while let Some(joined) = set.join_next().await {
        let Ok((address, result)) = joined else {
            continue;
        };
        match result {
            Ok(Ok(client)) => {
                // The slower handshakes are abandoned; their connections close on drop.
                set.abort_all();
                return Ok((client, address));
            }
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push(no_answer(&address)),
        }
    }
    if failures.is_empty() {
        return Err("no gateway to try".into());
    }
    Err(format!("no gateway to use: {}", failures.join("; ")))
}
