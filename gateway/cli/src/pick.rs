//! How the `nearpath` client picks a gateway among several: it handshakes with all of them at
//! once and keeps the first to finish, which is the lowest round trip (plus the gateway's TLS
//! work); the slower handshakes are abandoned.

use nearpath_protocol::{Client, ClientError, PlaySession, ServerVerify};
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

/// How long a player keeps trying to resume its session through the other gateways after its
/// own was lost.
pub const RESUME_FOR: Duration = Duration::from_secs(10);

/// Resumes game session `session_id` (with its latest resume `token`) through the nearest
/// gateway among `candidates` other than `lost` (the lost one only when there is no other),
/// retrying for [`RESUME_FOR`] while the answers say a retry may help: the session's node may
/// still be reconnecting, or the new gateway may not have given up the old connection yet.
/// Returns the new gateway's client, the resumed session and the gateway's address.
pub async fn resume_nearest(
    candidates: &[String],
    lost: SocketAddr,
    server_name: Option<&str>,
    verify: ServerVerify,
    api_key: &str,
    session_id: u64,
    token: &str,
) -> Result<(Client, PlaySession, String), String> {
    let others: Vec<String> = candidates
        .iter()
        .filter(|a| a.parse::<SocketAddr>().ok() != Some(lost))
        .cloned()
        .collect();
    let pool = if others.is_empty() {
        candidates.to_vec()
    } else {
        others
    };
    let until = tokio::time::Instant::now() + RESUME_FOR;
    let mut last = String::from("no gateway to try");
    while tokio::time::Instant::now() < until {
        match nearest(&pool, server_name, verify.clone()).await {
            Ok((client, address)) => match client.resume(api_key, session_id, token).await {
                Ok(session) => return Ok((client, session, address)),
                Err(e) if e.is_retryable() => {
                    last = format!("{address}: {e}");
                    client.close().await;
                }
                Err(e) => {
                    return Err(format!(
                        "resuming session {session_id} through {address}: {e}"
                    ))
                }
            },
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "could not resume session {session_id} within {RESUME_FOR:?}: {last}"
    ))
}
