//! Measurement: what players received (latency, completeness), the gateway's `/metrics` and the
//! kernel's UDP drop counters.

use super::*;

/// One frame as a player received it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Got {
    pub(super) seq: u64,
    pub(super) latency_us: f64,
    pub(super) keyframe: bool,
    /// Receive time, microseconds since the Unix epoch.
    pub(super) at_us: u64,
}

#[derive(Debug, Default)]
pub(super) struct RecvLog {
    pub(super) frames: Vec<Got>,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    /// Frames the sender skipped (filled in from its [`SendLog`]): not expected.
    pub(super) not_sent: std::collections::HashSet<u64>,
}

/// Reads frames until frame `last` arrives, the connection closes, or nothing comes for
/// [`QUIET`] after `not_before`.
pub(super) async fn collect(frames: FrameStream, last: u64, not_before: Instant) -> RecvLog {
    collect_from(PlayerFrames::Native(frames), last, not_before).await
}

/// Where a player's frames arrive.
pub(super) enum PlayerFrames {
    /// A native client's frame streams.
    Native(FrameStream),
    /// A WebTransport session's uni streams.
    WebTransport(nearpath_tests::wt_client::WtFrames),
}

impl PlayerFrames {
    async fn next(&mut self) -> Result<Option<nearpath_protocol::VideoFrame>, String> {
        match self {
            PlayerFrames::Native(f) => f.next().await.map_err(|e| e.to_string()),
            PlayerFrames::WebTransport(f) => f.next().await.map_err(|e| e.to_string()),
        }
    }
}

/// [`collect`] from either kind of player.
pub(super) async fn collect_from(
    mut frames: PlayerFrames,
    last: u64,
    not_before: Instant,
) -> RecvLog {
    let mut log = RecvLog::default();
    loop {
        let limit = not_before.max(Instant::now()) + QUIET;
        match tokio::time::timeout_at(limit, frames.next()).await {
            Ok(Ok(Some(f))) => {
                let now = unix_micros();
                log.frames.push(Got {
                    seq: f.header.seq,
                    latency_us: now.saturating_sub(f.header.capture_ts_us) as f64,
                    keyframe: f.header.keyframe,
                    at_us: now,
                });
                if f.header.seq >= last {
                    break;
                }
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                log.errors += 1;
                log.first_error.get_or_insert_with(|| e.to_string());
            }
            Err(_) => break,
        }
    }
    log
}

/// Latency and completeness of frames `from..to` of one or more players.
#[derive(Debug, Clone)]
pub(super) struct Window {
    pub(super) lat: Summary,
    pub(super) idr_p50: f64,
    pub(super) p_p50: f64,
    pub(super) expected: u64,
    pub(super) received: u64,
    pub(super) late: u64,
}

impl Window {
    /// Frames `from..to` of one player.
    pub(super) fn of_one(log: &RecvLog, from: u64, to: u64, late_us: f64) -> Window {
        Window::of([(log, from, to)], late_us)
    }

    /// Frames of several players, each with its own `from..to` range of sequence numbers.
    pub(super) fn of<'a>(
        parts: impl IntoIterator<Item = (&'a RecvLog, u64, u64)>,
        late_us: f64,
    ) -> Window {
        let (mut all, mut idr, mut p) = (Vec::new(), Vec::new(), Vec::new());
        let (mut expected, mut received, mut late) = (0, 0, 0);
        for (log, from, to) in parts {
            let skipped = log
                .not_sent
                .iter()
                .filter(|&&k| k >= from && k < to)
                .count() as u64;
            expected += to.saturating_sub(from) - skipped;
            let mut seen = vec![false; to.saturating_sub(from) as usize];
            for g in log.frames.iter().filter(|g| g.seq >= from && g.seq < to) {
                let slot = &mut seen[(g.seq - from) as usize];
                if *slot {
                    continue;
                }
                *slot = true;
                received += 1;
                late += u64::from(g.latency_us > late_us);
                all.push(g.latency_us);
                if g.keyframe {
                    idr.push(g.latency_us);
                } else {
                    p.push(g.latency_us);
                }
            }
        }
        Window {
            lat: Summary::of(&mut all),
            idr_p50: Summary::of(&mut idr).p50,
            p_p50: Summary::of(&mut p).p50,
            expected,
            received,
            late,
        }
    }

    pub(super) fn missing(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }

    pub(super) fn to_json(&self) -> Value {
        json!({"latency_us": self.lat.to_json(), "idr_p50_us": num(self.idr_p50), "p_frame_p50_us": num(self.p_p50),
               "expected": self.expected, "received": self.received, "missing": self.missing(), "late": self.late})
    }
}

/// `GET /metrics` from the gateway's admin listener.
pub(super) async fn gateway_metrics(admin: SocketAddr) -> anyhow::Result<String> {
    let mut conn = Conn::h1(admin).await?;
    let req = hyper::Request::builder()
        .uri(format!("http://{admin}/metrics"))
        .body(Full::new(Bytes::new()))
        .context("building GET /metrics")?;
    let resp = conn.send(req).await?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading /metrics")?
        .to_bytes();
    if !status.is_success() {
        bail!("GET /metrics: HTTP {status}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The `reason` labels of `nearpath_game_frames_dropped_total`.
pub(super) const DROP_REASONS: [&str; 5] = ["late", "overload", "foreign", "relay", "shed"];

/// The value of one exact series (`name{labels}`) on a Prometheus text page; 0 if absent.
pub fn metric_value(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Sum of every sample of metric `name` (all label sets) on a Prometheus text page; 0 if absent.
pub fn metric_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // Not `sum`: an empty f64 sum is -0.0, which prints as "-0".
        .fold(0.0, |acc, v| acc + v)
}

/// The kernel's UDP receive-buffer picture: `net.core.rmem_max`, what a request for the
/// gateway's default buffer is granted, and the system-wide count of datagrams dropped for a
/// full buffer so far.
#[derive(Debug, Clone, Copy)]
pub(super) struct UdpPicture {
    pub(super) rmem_max: Option<u64>,
    pub(super) granted: Option<usize>,
    pub(super) rcvbuf_errors: Option<u64>,
}

pub(super) fn udp_picture() -> UdpPicture {
    let rmem_max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let granted = std::net::UdpSocket::bind("127.0.0.1:0")
        .ok()
        .and_then(|s| net::set_recv_buffer(&s, GATEWAY_RECV_BUFFER).ok())
        .map(|b| b.effective);
    let rcvbuf_errors = std::fs::read_to_string("/proc/net/snmp")
        .ok()
        .and_then(|s| snmp_udp_field(&s, "RcvbufErrors"));
    UdpPicture {
        rmem_max,
        granted,
        rcvbuf_errors,
    }
}

/// A field of the `Udp:` lines of `/proc/net/snmp` (a header line of names, then one of values).
pub fn snmp_udp_field(text: &str, field: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Datagrams the kernel dropped on the UDP socket bound to `port` (the `drops` column of
/// `/proc/net/udp`), summed over sockets on that port.
pub fn udp_port_drops(text: &str, port: u16) -> Option<u64> {
    let want = format!(":{port:04X}");
    let mut found = None;
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 13 || !cols[1].ends_with(&want) {
            continue;
        }
        let drops: u64 = cols[12].parse().ok()?;
        found = Some(found.unwrap_or(0) + drops);
    }
    found
}

pub(super) fn gateway_socket_drops(port: u16) -> Option<u64> {
    udp_port_drops(&std::fs::read_to_string("/proc/net/udp").ok()?, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_late_missing_and_duplicate_frames() {
        let log = RecvLog {
            frames: vec![
                Got {
                    seq: 0,
                    latency_us: 100.0,
                    keyframe: true,
                    at_us: 0,
                },
                Got {
                    seq: 1,
                    latency_us: 200.0,
                    keyframe: false,
                    at_us: 0,
                },
                Got {
                    seq: 1,
                    latency_us: 900.0,
                    keyframe: false,
                    at_us: 0,
                },
                Got {
                    seq: 3,
                    latency_us: 20_000.0,
                    keyframe: false,
                    at_us: 0,
                },
                Got {
                    seq: 9,
                    latency_us: 5.0,
                    keyframe: false,
                    at_us: 0,
                },
            ],
            ..Default::default()
        };
        let w = Window::of_one(&log, 0, 4, 16_667.0);
        assert_eq!((w.expected, w.received, w.missing(), w.late), (4, 3, 1, 1));
        assert_eq!(w.lat.max, 20_000.0);
        assert_eq!(w.idr_p50, 100.0);
        let two = Window::of([(&log, 1, 3), (&log, 0, 2)], 16_667.0);
        // Each player is counted over its own range: seqs 1..3 miss 2, seqs 0..2 are complete.
        assert_eq!((two.expected, two.received, two.late), (4, 3, 0));
    }

    #[test]
    fn metric_sum_adds_label_sets_of_one_name_only() {
        let page = "# TYPE nearpath_game_frames_dropped counter\n\
                    nearpath_game_frames_dropped_total{reason=\"late\"} 3\n\
                    nearpath_game_frames_dropped_total{reason=\"relay\"} 2\n\
                    nearpath_game_frames_dropped_total_other 100\n\
                    nearpath_game_frames_relayed_total 42\n";
        assert_eq!(metric_sum(page, "nearpath_game_frames_dropped_total"), 5.0);
        assert_eq!(metric_sum(page, "nearpath_game_frames_relayed_total"), 42.0);
        assert_eq!(metric_sum(page, "absent_total"), 0.0);
    }

    #[test]
    fn proc_net_parsers() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 10 0 7 12 7 0\n\
                    UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    UdpLite: 0 0 0 0 99 0\n";
        assert_eq!(snmp_udp_field(snmp, "RcvbufErrors"), Some(7));
        assert_eq!(snmp_udp_field(snmp, "Nope"), None);
        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                   1: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 5\n\
                   2: 0100007F:0050 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3 2 0000000000000000 9\n";
        assert_eq!(udp_port_drops(udp, 8080), Some(5));
        assert_eq!(udp_port_drops(udp, 80), Some(9));
        assert_eq!(udp_port_drops(udp, 81), None);
    }
}
