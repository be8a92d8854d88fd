//! External frame sources: a program started per session that renders the game and writes raw
//! frames to its stdout.
//!
//! The contract with the program:
//! - It is started from the configured argv (no shell) in its own process group, in a clean
//!   environment: `NEARPATH_WIDTH`, `NEARPATH_HEIGHT`, `NEARPATH_FPS` and `NEARPATH_TITLE`, plus
//!   only the node's variables named in [`ENV_ALLOW`] (and `LC_*`). Nothing else of the node's
//!   environment reaches it: not the enrolment token, not `NEARPATH_NODE__*` or any other
//!   `NEARPATH_*` override, not cloud or API credentials. A program that needs more gets it from
//!   its own launcher script.
//! - stdout: raw I420 frames back to back, each exactly `width * height * 3 / 2` bytes (the Y
//!   plane, then U, then V, no padding). It should write about `NEARPATH_FPS` frames a second;
//!   the node encodes the newest complete frame at each frame time and counts the frames it
//!   never got to (`source_frames_superseded`).
//! - stdin: the player's input, one JSON object per line, in the order the node applied it
//!   (line format version 2, with input datagram layout 2; version 1 had no `pad` and
//!   `triggers` in gamepad lines, and other lines are unchanged):
//!   ```text
//!   {"seq":1,"type":"key","code":87,"down":true}
//!   {"seq":2,"type":"mouse_move","dx":-3,"dy":4}
//!   {"seq":3,"type":"mouse_button","button":0,"down":true}
//!   {"seq":4,"type":"wheel","dx":0,"dy":-120}
//!   {"seq":5,"type":"gamepad","pad":2,"axes":[0,-32768,0,0],"triggers":[0,65535],"buttons":129}
//!   ```
//!   A gamepad line is one pad's whole state: `pad` 0..=3, `axes` left x, left y, right x,
//!   right y (-32768..=32767), `triggers` left and right (0..=65535), `buttons` the W3C
//!   Standard Gamepad's 17 buttons as bits (0 A, 1 B, 2 X, 3 Y, 4/5 bumpers, 6/7 triggers, 8
//!   back, 9 start, 10/11 stick presses, 12-15 d-pad up, down, left, right, 16 home).
//!   `seq` grows (gaps are inputs lost in the network); key codes are what the client sent
//!   (browsers send `KeyboardEvent.keyCode`); mouse motion is relative; wheel is in 1/120
//!   notches. Keyframe requests and pings are handled by the node and not forwarded. A program
//!   that does not read its stdin still works; input for it is dropped once the pipe is full.
//! - fd 3: the program's sound, optional. The node passes the write end of a pipe as file
//!   descriptor 3 and sets `NEARPATH_AUDIO_FD=3`, `NEARPATH_AUDIO_FORMAT=s16le`,
//!   `NEARPATH_AUDIO_RATE=48000` and `NEARPATH_AUDIO_CHANNELS=2`: interleaved signed 16-bit
//!   little-endian stereo PCM at 48 kHz, in real time (`ffmpeg ... -f s16le -ar 48000 -ac 2
//!   pipe:3`). The node reads it in 10 ms packets and encodes Opus. A program that writes no
//!   sound, or closes fd 3, is fine: the session goes on silent.
//! - stderr: logged by the node (rate limited); the last line is quoted when it fails.
//! - The size is fixed for the session: a player's mid-session size change (`SetVideo`) is
//!   refused with a reason for external programs, and they have no way to ask for rumble
//!   (the built-in game's is the only one there is).
//! - The session ends when the program exits or closes stdout, or writes a partial frame; when
//!   the session ends for any other reason the node kills the program's whole process group.

use super::frame::I420Frame;
use super::{GameEnd, GameError, Shared};
use nearpath_protocol::input::InputEvent;
use std::fmt::Write as _;
use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a program that closed its stdout gets to exit on its own before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(1);
/// How long to wait for the last stderr lines after the program exited.
const STDERR_GRACE: Duration = Duration::from_millis(200);
/// Longest stderr line kept; longer ones are split.
const MAX_STDERR_LINE: u64 = 4096;
/// Stderr lines logged per second before the rest are only counted.
const STDERR_LINES_PER_S: u32 = 10;
/// Input events buffered for the program's stdin.
pub(super) const INPUT_QUEUE: usize = 1024;

/// The node's environment variables an external program inherits, besides `LC_*`: what a
/// program needs to find executables and libraries, a home, a locale and time zone, a display
/// and audio server, and the GPUs it may use. Everything else is withheld.
pub const ENV_ALLOW: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "DISPLAY",
    "XAUTHORITY",
    "WAYLAND_DISPLAY",
    "PULSE_SERVER",
    "PIPEWIRE_RUNTIME_DIR",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
    "VK_ICD_FILENAMES",
];

/// Whether the node's variable `name` may reach an external program. `NEARPATH_*` never does:
/// the node sets the session's own variables itself.
pub fn env_allowed(name: &str) -> bool {
    !name.starts_with("NEARPATH_") && (ENV_ALLOW.contains(&name) || name.starts_with("LC_"))
}

/// A frame read from the program, waiting for its frame time.
pub(super) struct LatestFrame {
    pub frame: I420Frame,
    /// Highest input seq handed to the program before the frame's first byte arrived.
    pub input_seq: u64,
    /// When the frame was complete.
    pub captured: std::time::Instant,
    pub capture_ts_us: u64,
}

/// The newest complete frame; a newer one replaces it.
#[derive(Default)]
pub(super) struct FrameSlot(Mutex<Option<LatestFrame>>);

impl FrameSlot {
    fn put(&self, frame: LatestFrame) -> Option<LatestFrame> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(frame)
    }

    /// Takes the newest frame, if one arrived since the last call.
    pub(super) fn take(&self) -> Option<LatestFrame> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// A started program with its pipes.
pub(super) struct Spawned {
    child: Child,
    pid: Option<u32>,
    stdin: ChildStdin,
    stdout: ChildStdout,
    stderr: ChildStderr,
    program: String,
    /// The read end of the program's audio pipe (fd 3 in the program).
    pub(super) audio: Option<std::fs::File>,
}

/// The file descriptor an external program writes its sound to.
pub const AUDIO_FD: i32 = 3;

/// A pipe for the program's sound: (read end, write end), both close-on-exec in the node.
fn audio_pipe() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// Starts the program. Fails if it cannot be executed (not found, not executable).
pub(super) fn spawn(
    command: &[String],
    title: &str,
    width: u32,
    height: u32,
    fps: u32,
) -> Result<Spawned, GameError> {
    spawn_in(command, title, width, height, fps, std::env::vars_os())
}

/// [`spawn`] with the node's environment given (`spawn` passes the process's own).
fn spawn_in(
    command: &[String],
    title: &str,
    width: u32,
    height: u32,
    fps: u32,
    node_env: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Spawned, GameError> {
    let Some((program, args)) = command.split_first() else {
        return Err(GameError::EmptyCommand {
            title: title.to_owned(),
        });
    };
    let mut cmd = Command::new(program);
    // A clean environment: the node's holds its enrolment token and whatever credentials its
    // host has, and a game program is third-party code.
    cmd.env_clear();
    for (name, value) in node_env {
        if name.to_str().is_some_and(env_allowed) {
            cmd.env(name, value);
        }
    }
    let spawn_err = |source: io::Error| GameError::Spawn {
        title: title.to_owned(),
        program: program.clone(),
        source,
    };
    let (audio_read, audio_write) = audio_pipe().map_err(spawn_err)?;
    {
        use std::os::fd::AsRawFd;
        let write_fd = audio_write.as_raw_fd();
        // SAFETY: the closure only calls async-signal-safe functions (dup2, fcntl) on
        // descriptors that stay open until after the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if write_fd == AUDIO_FD {
                    // dup2 onto itself would keep close-on-exec set.
                    let flags = libc::fcntl(AUDIO_FD, libc::F_GETFD);
                    if flags < 0
                        || libc::fcntl(AUDIO_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(write_fd, AUDIO_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.args(args)
        .env("NEARPATH_AUDIO_FD", AUDIO_FD.to_string())
        .env("NEARPATH_AUDIO_FORMAT", "s16le")
        .env("NEARPATH_AUDIO_RATE", "48000")
        .env("NEARPATH_AUDIO_CHANNELS", "2")
        .env("NEARPATH_WIDTH", width.to_string())
        .env("NEARPATH_HEIGHT", height.to_string())
        .env("NEARPATH_FPS", fps.to_string())
        .env("NEARPATH_TITLE", title)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that the helpers a launcher script starts die with it.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(spawn_err)?;
    // Only the program holds the write end now, so its exit ends the node's reads.
    drop(audio_write);
    let pipe = || spawn_err(io::Error::other("pipe missing after spawn"));
    let stdin = child.stdin.take().ok_or_else(pipe)?;
    let stdout = child.stdout.take().ok_or_else(pipe)?;
    let stderr = child.stderr.take().ok_or_else(pipe)?;
    Ok(Spawned {
        pid: child.id(),
        child,
        stdin,
        stdout,
        stderr,
        program: program.clone(),
        audio: Some(std::fs::File::from(audio_read)),
    })
}

/// Starts the tasks that feed the program's input, log its stderr, read its frames and end the
/// session when it ends.
pub(super) fn run(
    spawned: Spawned,
    shared: Arc<Shared>,
    slot: Arc<FrameSlot>,
    inputs: mpsc::Receiver<(u64, InputEvent)>,
    input_written: Arc<AtomicU64>,
    width: u32,
    height: u32,
) {
    let Spawned {
        child,
        pid,
        stdin,
        stdout,
        stderr,
        program,
        audio: _,
    } = spawned;
    let cancel = shared.cancel.clone();
    tokio::spawn(write_inputs(
        stdin,
        inputs,
        input_written.clone(),
        cancel.clone(),
    ));
    let last_line = Arc::new(Mutex::new(None));
    let stderr_task = tokio::spawn(log_stderr(stderr, program.clone(), last_line.clone()));
    tokio::spawn(supervise(Supervised {
        child,
        pid,
        stdout,
        program,
        shared,
        slot,
        input_written,
        width,
        height,
        stderr_task,
        last_line,
    }));
}

struct Supervised {
    child: Child,
    pid: Option<u32>,
    stdout: ChildStdout,
    program: String,
    shared: Arc<Shared>,
    slot: Arc<FrameSlot>,
    input_written: Arc<AtomicU64>,
    width: u32,
    height: u32,
    stderr_task: tokio::task::JoinHandle<()>,
    last_line: Arc<Mutex<Option<String>>>,
}

/// How reading frames stopped.
enum ReadEnd {
    /// stdout closed at a frame boundary.
    Eof,
    /// stdout closed in the middle of a frame.
    Short { got: usize },
    /// Reading failed.
    Io(io::Error),
}

async fn supervise(s: Supervised) {
    let Supervised {
        mut child,
        pid,
        mut stdout,
        program,
        shared,
        slot,
        input_written,
        width,
        height,
        stderr_task,
        last_line,
    } = s;
    let cancel = shared.cancel.clone();
    let mut frames = 0u64;
    let read = read_frames(
        &mut stdout,
        &shared,
        &slot,
        &input_written,
        width,
        height,
        &mut frames,
    );
    let end = tokio::select! {
        biased;
        _ = cancel.cancelled() => None,
        end = read => Some(end),
    };
    let expected = I420Frame::byte_len(width, height).unwrap_or(0);
    let reason = match end {
        // The session ended elsewhere (stopped, encoder failure, receiver gone).
        None => None,
        Some(ReadEnd::Io(e)) => Some(GameEnd::SourceIo {
            program: program.clone(),
            frames,
            error: e.to_string(),
        }),
        Some(ReadEnd::Short { got }) => Some(GameEnd::ShortFrame {
            program: program.clone(),
            got,
            expected,
            frames,
        }),
        Some(ReadEnd::Eof) => {
            // Give the program a moment to exit by itself, so its status is the reason.
            let status = tokio::select! {
                biased;
                _ = cancel.cancelled() => None,
                r = tokio::time::timeout(EXIT_GRACE, child.wait()) => match r {
                    Ok(Ok(status)) => Some(status),
                    _ => None,
                },
            };
            Some(match status {
                Some(status) => {
                    // The last stderr line usually says why; it arrives with the exit.
                    let _ = tokio::time::timeout(STDERR_GRACE, stderr_task).await;
                    let stderr_tail = if status.success() {
                        None
                    } else {
                        last_line.lock().unwrap_or_else(|p| p.into_inner()).clone()
                    };
                    GameEnd::SourceExited {
                        program: program.clone(),
                        status: describe_status(status),
                        frames,
                        stderr_tail,
                    }
                }
                None => GameEnd::SourceClosedOutput {
                    program: program.clone(),
                    frames,
                },
            })
        }
    };
    if let Some(reason) = reason {
        shared.end(reason);
    }
    kill_group(pid);
    let _ = child.start_kill();
    if tokio::time::timeout(EXIT_GRACE, child.wait())
        .await
        .is_err()
    {
        tracing::warn!(program, "frame source did not exit after SIGKILL");
    }
    // A frame read before the end is of no use any more.
    if let Some(old) = slot.take() {
        shared.recycle(old.frame.into_vec());
    }
}

/// Kills the program's process group (the program and everything it started).
fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0) {
        // SAFETY: kill(2) has no memory-safety preconditions. The program was started as the
        // leader of its own group (`process_group(0)`), so -pid names that group and nothing
        // else of ours.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("status {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => status.to_string(),
    }
}

async fn read_frames(
    stdout: &mut ChildStdout,
    shared: &Shared,
    slot: &FrameSlot,
    input_written: &AtomicU64,
    width: u32,
    height: u32,
    frames: &mut u64,
) -> ReadEnd {
    let Some(len) = I420Frame::byte_len(width, height) else {
        return ReadEnd::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{width}x{height} is not an I420 size"),
        ));
    };
    loop {
        let mut buf = shared.buffer(len);
        let mut filled = 0;
        let mut input_seq = 0;
        while filled < len {
            match stdout.read(&mut buf[filled..]).await {
                Ok(0) => break,
                Ok(n) => {
                    if filled == 0 {
                        // Input written after the program started writing this frame cannot
                        // be in it.
                        input_seq = input_written.load(Ordering::Acquire);
                    }
                    filled += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return ReadEnd::Io(e),
            }
        }
        if filled == 0 {
            return ReadEnd::Eof;
        }
        if filled < len {
            return ReadEnd::Short { got: filled };
        }
        let frame = match I420Frame::from_vec(width, height, buf) {
            Ok(f) => f,
            Err(e) => return ReadEnd::Io(io::Error::new(io::ErrorKind::InvalidData, e)),
        };
        *frames += 1;
        shared
            .counters
            .frames_rendered
            .fetch_add(1, Ordering::Relaxed);
        let latest = LatestFrame {
            frame,
            input_seq,
            captured: std::time::Instant::now(),
            capture_ts_us: super::unix_micros(),
        };
        if let Some(old) = slot.put(latest) {
            shared
                .counters
                .source_frames_superseded
                .fetch_add(1, Ordering::Relaxed);
            shared.recycle(old.frame.into_vec());
        }
    }
}

/// Writes input events to the program's stdin as JSON lines until the session ends or the
/// program stops reading.
async fn write_inputs(
    mut stdin: ChildStdin,
    mut inputs: mpsc::Receiver<(u64, InputEvent)>,
    written: Arc<AtomicU64>,
    cancel: CancellationToken,
) {
    let mut lines = String::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            next = inputs.recv() => match next {
                Some(x) => x,
                None => return,
            },
        };
        // Everything already queued goes out in one write.
        lines.clear();
        let mut last_seq = first.0;
        input_json(first.0, &first.1, &mut lines);
        while let Ok((seq, event)) = inputs.try_recv() {
            input_json(seq, &event, &mut lines);
            last_seq = seq;
        }
        // Published before the write: a frame whose first byte arrives after this point is
        // attributed to these inputs. Publishing after the write would race with a fast
        // program that answers the input with a frame before this task runs again; a program
        // that does not read its input makes the number meaningless either way.
        written.fetch_max(last_seq, Ordering::AcqRel);
        if lines.is_empty() {
            continue;
        }
        let write = stdin.write_all(lines.as_bytes());
        let result = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = write => r,
        };
        if let Err(e) = result {
            // Not every program reads input (a video loop, say): stop writing, keep streaming.
            tracing::debug!(error = %e, "frame source stopped reading its input");
            return;
        }
    }
}

/// Appends the JSON line for one event (see the module docs); events the node handles itself
/// append nothing.
pub fn input_json(seq: u64, event: &InputEvent, out: &mut String) {
    // Only numbers and booleans: nothing needs escaping, so no serializer is needed.
    let _ = match *event {
        InputEvent::Key { code, down } => writeln!(
            out,
            r#"{{"seq":{seq},"type":"key","code":{code},"down":{down}}}"#
        ),
        InputEvent::MouseMove { dx, dy } => writeln!(
            out,
            r#"{{"seq":{seq},"type":"mouse_move","dx":{dx},"dy":{dy}}}"#
        ),
        InputEvent::MouseButton { button, down } => writeln!(
            out,
            r#"{{"seq":{seq},"type":"mouse_button","button":{button},"down":{down}}}"#
        ),
        InputEvent::Wheel { dx, dy } => {
            writeln!(out, r#"{{"seq":{seq},"type":"wheel","dx":{dx},"dy":{dy}}}"#)
        }
        InputEvent::Gamepad {
            pad,
            axes,
            triggers,
            buttons,
        } => writeln!(
            out,
            r#"{{"seq":{seq},"type":"gamepad","pad":{pad},"axes":[{},{},{},{}],"triggers":[{},{}],"buttons":{buttons}}}"#,
            axes[0], axes[1], axes[2], axes[3], triggers[0], triggers[1]
        ),
        InputEvent::KeyframeRequest | InputEvent::Ping { .. } => Ok(()),
    };
}

/// Logs the program's stderr lines (at most [`STDERR_LINES_PER_S`] a second) and remembers the
/// last one.
async fn log_stderr(stderr: ChildStderr, program: String, last: Arc<Mutex<Option<String>>>) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    let mut window = tokio::time::Instant::now();
    let mut logged = 0u32;
    let mut suppressed = 0u64;
    loop {
        buf.clear();
        match (&mut reader)
            .take(MAX_STDERR_LINE)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
        if line.is_empty() {
            continue;
        }
        if window.elapsed() >= Duration::from_secs(1) {
            if suppressed > 0 {
                tracing::info!(program, suppressed, "frame source stderr lines not logged");
            }
            window = tokio::time::Instant::now();
            logged = 0;
            suppressed = 0;
        }
        if logged < STDERR_LINES_PER_S {
            logged += 1;
            tracing::info!(program, line = %line, "frame source stderr");
        } else {
            suppressed += 1;
        }
        *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn external_program_does_not_inherit_the_enrolment_token() {
        let secret = "np_tok_0123456789abcdef-secret";
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
        let node_env = [
            ("PATH", path.to_str().unwrap()),
            ("HOME", "/home/node"),
            ("LC_ALL", "C.UTF-8"),
            ("NEARPATH_NODE__ENROLMENT_TOKEN", secret),
            ("NEARPATH_ADMIN__TOKEN", secret),
            ("NEARPATH_WIDTH", "9999"),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("ENROLMENT_TOKEN", secret),
        ]
        .map(|(k, v)| (k.into(), v.into()));
        let command: Vec<String> = ["sh", "-c", "env"].map(String::from).into();
        async fn dump(mut spawned: Spawned) -> String {
            let mut out = String::new();
            spawned.stdout.read_to_string(&mut out).await.unwrap();
            assert!(spawned.child.wait().await.unwrap().success());
            out
        }
        // The node's real environment, as an operator sets it (no other test of this crate
        // reads these variables).
        std::env::set_var("NEARPATH_NODE__ENROLMENT_TOKEN", secret);
        std::env::set_var("NEARPATH_TEST_GAME_SECRET", secret);
        let out = dump(spawn(&command, "envdump", 64, 32, 30).unwrap()).await;
        std::env::remove_var("NEARPATH_NODE__ENROLMENT_TOKEN");
        std::env::remove_var("NEARPATH_TEST_GAME_SECRET");
        assert!(!out.contains(secret), "the secret leaked: {out}");
        assert!(out.contains("NEARPATH_TITLE=envdump"), "{out}");
        // And what does pass, from a known environment.
        let out = dump(spawn_in(&command, "envdump", 64, 32, 30, node_env).unwrap()).await;
        assert!(!out.contains(secret), "the secret leaked: {out}");
        let vars: std::collections::BTreeMap<&str, &str> =
            out.lines().filter_map(|l| l.split_once('=')).collect();
        assert_eq!(vars.get("HOME"), Some(&"/home/node"));
        assert_eq!(vars.get("LC_ALL"), Some(&"C.UTF-8"));
        assert_eq!(vars.get("NEARPATH_WIDTH"), Some(&"64"));
        assert_eq!(vars.get("NEARPATH_TITLE"), Some(&"envdump"));
        assert_eq!(vars.get("NEARPATH_AUDIO_FD"), Some(&"3"));
        assert_eq!(vars.get("NEARPATH_AUDIO_FORMAT"), Some(&"s16le"));
        assert_eq!(vars.get("NEARPATH_AUDIO_RATE"), Some(&"48000"));
        assert_eq!(vars.get("NEARPATH_AUDIO_CHANNELS"), Some(&"2"));
        assert!(vars.contains_key("PATH"));
        let nearpath: Vec<&&str> = vars.keys().filter(|k| k.starts_with("NEARPATH_")).collect();
        assert_eq!(
            nearpath,
            [
                &"NEARPATH_AUDIO_CHANNELS",
                &"NEARPATH_AUDIO_FD",
                &"NEARPATH_AUDIO_FORMAT",
                &"NEARPATH_AUDIO_RATE",
                &"NEARPATH_FPS",
                &"NEARPATH_HEIGHT",
                &"NEARPATH_TITLE",
                &"NEARPATH_WIDTH"
            ]
        );
    }

    #[test]
    fn only_allowed_variables_pass() {
        for ok in [
            "PATH",
            "LC_CTYPE",
            "DISPLAY",
            "XDG_RUNTIME_DIR",
            "CUDA_VISIBLE_DEVICES",
        ] {
            assert!(env_allowed(ok), "{ok}");
        }
        for no in [
            "NEARPATH_NODE__ENROLMENT_TOKEN",
            "NEARPATH_LC_X",
            "LD_PRELOAD",
            "OPENAI_API_KEY",
            "path",
        ] {
            assert!(!env_allowed(no), "{no}");
        }
    }

    #[test]
    fn input_lines_are_json() {
        let events = [
            InputEvent::Key {
                code: 87,
                down: true,
            },
            InputEvent::MouseMove { dx: -3, dy: 4 },
            InputEvent::MouseButton {
                button: 2,
                down: false,
            },
            InputEvent::Wheel { dx: 0, dy: -120 },
            InputEvent::Gamepad {
                pad: 2,
                axes: [0, i16::MIN, 7, i16::MAX],
                triggers: [0, u16::MAX],
                buttons: 0x1_0081,
            },
            InputEvent::KeyframeRequest,
            InputEvent::Ping { id: 1 },
        ];
        let mut out = String::new();
        for (i, e) in events.iter().enumerate() {
            input_json(i as u64 + 1, e, &mut out);
        }
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines.len(),
            5,
            "keyframe requests and pings stay on the node"
        );
        assert_eq!(
            lines[0],
            serde_json::json!({"seq":1,"type":"key","code":87,"down":true})
        );
        assert_eq!(
            lines[1],
            serde_json::json!({"seq":2,"type":"mouse_move","dx":-3,"dy":4})
        );
        assert_eq!(
            lines[2],
            serde_json::json!({"seq":3,"type":"mouse_button","button":2,"down":false})
        );
        assert_eq!(
            lines[3],
            serde_json::json!({"seq":4,"type":"wheel","dx":0,"dy":-120})
        );
        assert_eq!(
            lines[4],
            serde_json::json!({"seq":5,"type":"gamepad","pad":2,"axes":[0,-32768,7,32767],"triggers":[0,65535],"buttons":65665})
        );
    }
}
