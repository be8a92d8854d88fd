//! A WebTransport game client, as a browser page speaks to the gateway (contract in
//! ARCHITECTURE.md, "Game session, browser"): `GET /v1/webtransport` for the port, path and
//! certificate hashes, a WebTransport session pinned to those hashes, one bidirectional stream
//! speaking the native protocol, video frames on unidirectional streams, input and audio as
//! datagrams. The WebTransport side is `web-transport-quinn`'s client, so the tests exercise the
//! gateway's framing against an independent implementation. The end-to-end tests
//! (`tests/tests/webtransport.rs`) and load generators use it.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use nearpath_protocol::message::{
    Message, PlayRequest, PlayResume, PlayStarted, PlayTicket, Redirect,
};
use nearpath_protocol::{Decoder, FrameHeader, InputDatagram, InputEvent, VideoFrame};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use web_transport_quinn::Session;

/// What went wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum WtClientError {
    #[error("GET /v1/webtransport: {0}")]
    Info(String),
    #[error("connecting: {0}")]
    Connect(String),
    #[error("WebTransport: {0}")]
    Session(String),
    #[error("protocol: {0}")]
    Protocol(String),
    /// The gateway answered the `PlayRequest` with `Error`.
    #[error("refused: {code}: {message}")]
    Refused {
        code: String,
        message: String,
        retryable: bool,
    },
    /// The gateway sent the player to a peer of its federation (play there with the ticket).
    #[error("redirected to gateway {}", .0.gateway_id)]
    Redirected(Box<Redirect>),
}

fn err<E: std::fmt::Display>(f: fn(String) -> WtClientError) -> impl Fn(E) -> WtClientError {
    move |e| f(e.to_string())
}

/// `GET /v1/webtransport`.
#[derive(Debug, Clone)]
pub struct WtInfo {
    pub port: u16,
    pub path: String,
    pub cert_hashes: Vec<[u8; 32]>,
    pub expires_unix_ms: u64,
}

/// Fetches `GET /v1/webtransport` from the gateway's HTTP listener at `http`.
pub async fn fetch_info(http: SocketAddr) -> Result<WtInfo, WtClientError> {
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: hyper::Uri = format!("http://{http}/v1/webtransport")
        .parse()
        .map_err(err(WtClientError::Info))?;
    let resp = client.get(uri).await.map_err(err(WtClientError::Info))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(err(WtClientError::Info))?
        .to_bytes();
    if !status.is_success() {
        return Err(WtClientError::Info(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(err(WtClientError::Info))?;
    let hashes = v["cert_hashes"]
        .as_array()
        .ok_or_else(|| WtClientError::Info(format!("no cert_hashes in {v}")))?
        .iter()
        .map(|h| {
            let s = h.as_str().unwrap_or_default();
            nearpath_protocol::tls::parse_sha256_hex(s).map_err(err(WtClientError::Info))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(WtInfo {
        port: v["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| WtClientError::Info(format!("no port in {v}")))?,
        path: v["path"].as_str().unwrap_or_default().to_string(),
        cert_hashes: hashes,
        expires_unix_ms: v["expires_unix_ms"].as_u64().unwrap_or(0),
    })
}

/// Accepts exactly the certificates whose SHA-256 is listed, as a browser's
/// `serverCertificateHashes` does (it also requires ECDSA P-256, which this does not check).
#[derive(Debug)]
struct PinnedHashes {
    hashes: Vec<[u8; 32]>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedHashes {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let h = nearpath_protocol::tls::cert_sha256(end_entity.as_ref());
        if self.hashes.contains(&h) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate {} is not among the pinned hashes",
                nearpath_protocol::tls::sha256_hex(&h)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A WebTransport session to `https://localhost:{quic.port()}{path}`, dialled from `from`
/// (tests pick loopback addresses the geofence knows), trusting only `hashes`. Returns the
/// session and the certificate the gateway presented.
pub async fn connect(
    from: IpAddr,
    quic: SocketAddr,
    path: &str,
    hashes: &[[u8; 32]],
) -> Result<(Session, [u8; 32]), WtClientError> {
    let provider = nearpath_protocol::tls::provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err(WtClientError::Connect))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedHashes {
            hashes: hashes.to_vec(),
            provider,
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(err(WtClientError::Connect))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic_tls));
    // The transport a native player uses (a PING after 1 s of quiet, a 3 s idle timeout).
    let transport = nearpath_protocol::client::client_transport()
        .to_transport_config()
        .map_err(err(WtClientError::Connect))?;
    config.transport_config(Arc::new(transport));
    let endpoint =
        quinn::Endpoint::client(SocketAddr::new(from, 0)).map_err(err(WtClientError::Connect))?;
    let conn = endpoint
        .connect_with(config, quic, "localhost")
        .map_err(err(WtClientError::Connect))?
        .await
        .map_err(err(WtClientError::Connect))?;
    let presented = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|c| {
            c.first()
                .map(|c| nearpath_protocol::tls::cert_sha256(c.as_ref()))
        })
        .ok_or_else(|| WtClientError::Connect("no server certificate".into()))?;
    let url: url::Url = format!("https://localhost:{}{path}", quic.port())
        .parse()
        .map_err(err(WtClientError::Connect))?;
    let session = Session::connect(conn, url)
        .await
        .map_err(err(WtClientError::Session))?;
    Ok((session, presented))
}

/// A game session over WebTransport.
pub struct WtPlayer {
    pub session: Session,
    pub started: PlayStarted,
    pub resume_token: Option<String>,
    tx: web_transport_quinn::SendStream,
    rx: web_transport_quinn::RecvStream,
    decoder: Decoder,
    seq: AtomicU64,
    /// `None` once taken by [`WtPlayer::take_frames`].
    frames: Option<WtFrames>,
}

/// Writes one native protocol message on a WebTransport stream.
pub async fn send_message(
    tx: &mut web_transport_quinn::SendStream,
    msg: &Message,
) -> Result<(), WtClientError> {
    tx.write_all(&nearpath_protocol::encode_to_vec(msg))
        .await
        .map_err(err(WtClientError::Session))
}

impl WtPlayer {
    /// Opens the play stream, sends `req` and waits for `PlayStarted` (a `ResumeToken` before
    /// it is kept); `Error` is [`WtClientError::Refused`].
    pub async fn play(session: Session, req: PlayRequest) -> Result<WtPlayer, WtClientError> {
        Self::start(session, Message::PlayRequest(req)).await
    }

    /// [`WtPlayer::play`] with `PlayResume`: resumes session `session_id` (whose gateway was
    /// lost) through the gateway `session` reaches, with its latest resume token.
    pub async fn resume(
        session: Session,
        api_key: &str,
        session_id: u64,
        token: &str,
    ) -> Result<WtPlayer, WtClientError> {
        let msg = Message::PlayResume(PlayResume {
            protocol_version: nearpath_protocol::PROTOCOL_VERSION,
            api_key: api_key.into(),
            session_id,
            token: token.into(),
        });
        Self::start(session, msg).await
    }

    /// [`WtPlayer::play`] with `PlayTicket`: plays the session a [`Redirect`]'s ticket names
    /// on the gateway `session` reaches (the redirect's peer).
    pub async fn ticket(
        session: Session,
        api_key: &str,
        ticket: &str,
    ) -> Result<WtPlayer, WtClientError> {
        let msg = Message::PlayTicket(PlayTicket {
            protocol_version: nearpath_protocol::PROTOCOL_VERSION,
            api_key: api_key.into(),
            ticket: ticket.into(),
        });
        Self::start(session, msg).await
    }

    /// Opens the play stream with `first` and waits for `PlayStarted`.
    pub async fn start(session: Session, first: Message) -> Result<WtPlayer, WtClientError> {
        // Reading frames starts before the request, so that none waits unread.
        let frames = WtFrames::spawn(session.clone());
        let (mut tx, rx) = session
            .open_bi()
            .await
            .map_err(err(WtClientError::Session))?;
        send_message(&mut tx, &first).await?;
        let mut p = WtPlayer {
            session,
            started: PlayStarted {
                session_id: 0,
                width: 0,
                height: 0,
                fps: 0,
                bitrate_kbps: 0,
                codec: Default::default(),
            },
            resume_token: None,
            tx,
            rx,
            decoder: Decoder::new(nearpath_protocol::MAX_CONTROL_FRAME),
            seq: AtomicU64::new(0),
            frames: Some(frames),
        };
        loop {
            match p.next_message().await? {
                Some(Message::ResumeToken(t)) => p.resume_token = Some(t.token),
                Some(Message::PlayStarted(s)) => {
                    p.started = s;
                    return Ok(p);
                }
                Some(Message::Error(e)) => {
                    return Err(WtClientError::Refused {
                        code: e.code,
                        message: e.message,
                        retryable: e.retryable,
                    })
                }
                Some(Message::Redirect(r)) => return Err(WtClientError::Redirected(Box::new(r))),
                Some(other) => {
                    return Err(WtClientError::Protocol(format!(
                        "unexpected {} before PlayStarted",
                        other.name()
                    )))
                }
                None => return Err(WtClientError::Protocol("play stream ended".into())),
            }
        }
    }

    /// The next message on the play stream; `None` once the gateway finished it.
    pub async fn next_message(&mut self) -> Result<Option<Message>, WtClientError> {
        loop {
            if let Some(m) = self.decoder.poll().map_err(err(WtClientError::Protocol))? {
                return Ok(Some(m));
            }
            let mut buf = [0u8; 4096];
            match self
                .rx
                .read(&mut buf)
                .await
                .map_err(err(WtClientError::Session))?
            {
                Some(n) => self.decoder.push(&buf[..n]),
                None => return Ok(None),
            }
        }
    }

    /// Sends a message to the gateway on the play stream.
    pub async fn send(&mut self, msg: &Message) -> Result<(), WtClientError> {
        send_message(&mut self.tx, msg).await
    }

    /// The next video frame: one unidirectional stream, the 48-byte header then the access
    /// unit. A stream the gateway reset (a dropped frame) is skipped. Cancel-safe (see
    /// [`WtFrames`]); a closed session is an error.
    pub async fn next_frame(&mut self) -> Result<VideoFrame, WtClientError> {
        let frames = self
            .frames
            .as_mut()
            .ok_or_else(|| WtClientError::Protocol("frames taken".into()))?;
        frames
            .next()
            .await?
            .ok_or_else(|| WtClientError::Session("session closed".into()))
    }

    /// The session's frames, to read apart from the player (a load generator keeps the player
    /// and reads its frames elsewhere); [`WtPlayer::next_frame`] has none after this.
    pub fn take_frames(&mut self) -> Option<WtFrames> {
        self.frames.take()
    }

    /// Sends `event` as an input datagram with the next sequence number; returns it.
    pub fn send_input(&self, event: InputEvent) -> Result<u64, WtClientError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let d = InputDatagram {
            session_id: self.started.session_id,
            seq,
            sent_ts_us: unix_us(),
            event,
        };
        self.session
            .send_datagram(Bytes::from(d.encode()))
            .map_err(err(WtClientError::Session))?;
        Ok(seq)
    }

    /// The next datagram from the gateway (audio), WebTransport prefix stripped.
    pub async fn next_datagram(&self) -> Result<Bytes, WtClientError> {
        self.session
            .read_datagram()
            .await
            .map_err(err(WtClientError::Session))
    }
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The video frames of a WebTransport session, read by a background task in the order the
/// gateway opened their streams (frame order), so that waiting for one is cancel-safe.
///
/// Reading a frame stream inside a `select!` that another branch can win is not: the losing
/// future drops a half-read stream, and dropping a stream before its end sends STOP_SENDING,
/// which the gateway counts as a frame the player refused (`dropped.relay`). That is what
/// `a_webtransport_player_plays_720p60…` once saw about one run in three, while audio
/// datagrams (every 10 ms) raced the frames: the test client's bug, not the relay's.
pub struct WtFrames {
    rx: tokio::sync::mpsc::Receiver<Result<VideoFrame, WtClientError>>,
    reader: tokio::task::JoinHandle<()>,
}

impl WtFrames {
    /// Starts reading `session`'s frame streams.
    pub fn spawn(session: Session) -> WtFrames {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let reader = tokio::spawn(async move {
            loop {
                let result = match session.accept_uni().await {
                    Ok(rx) => match read_frame(rx).await {
                        // A reset stream is a dropped frame.
                        None => continue,
                        Some(r) => r,
                    },
                    // A closed session ends the frames: the channel closes.
                    Err(_) => return,
                };
                if tx.send(result).await.is_err() {
                    return;
                }
            }
        });
        WtFrames { rx, reader }
    }

    /// The next frame; `Ok(None)` once the session has closed. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<VideoFrame>, WtClientError> {
        self.rx.recv().await.transpose()
    }
}

impl Drop for WtFrames {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// One frame stream: the 48-byte header then the access unit; `None` if it was reset.
async fn read_frame(
    mut rx: web_transport_quinn::RecvStream,
) -> Option<Result<VideoFrame, WtClientError>> {
    let bytes = rx
        .read_to_end(FrameHeader::LEN + nearpath_protocol::MAX_VIDEO_FRAME)
        .await
        .ok()?;
    if bytes.len() < FrameHeader::LEN {
        return Some(Err(WtClientError::Protocol(format!(
            "frame stream of {} bytes",
            bytes.len()
        ))));
    }
    let header = match FrameHeader::decode(&bytes[..FrameHeader::LEN]) {
        Ok(h) => h,
        Err(e) => return Some(Err(WtClientError::Protocol(e.to_string()))),
    };
    let payload = Bytes::copy_from_slice(&bytes[FrameHeader::LEN..]);
    if payload.len() != header.payload_len as usize {
        return Some(Err(WtClientError::Protocol(format!(
            "payload of {} bytes, header says {}",
            payload.len(),
            header.payload_len
        ))));
    }
    Some(Ok(VideoFrame { header, payload }))
}

/// A `PlayRequest` as the page sends it (an empty codec list: H.264).
pub fn play_request(api_key: &str, game: &str, width: u32, height: u32, fps: u32) -> PlayRequest {
    PlayRequest {
        protocol_version: nearpath_protocol::PROTOCOL_VERSION,
        api_key: api_key.into(),
        game: game.into(),
        width,
        height,
        fps,
        bitrate_kbps: 0,
        codecs: Vec::new(),
        traceparent: None,
    }
}
