//! One line per failure, each cause once: what the binaries print when they give up.
//!
//! An error either shows its cause in its own message or returns it from `source()`; several
//! error types here and in the libraries below do both (`binding the QUIC listener on ...:
//! Address already in use (os error 98)`, with the `io::Error` as source too), so printing
//! the whole chain (anyhow's `{:#}`) would say every such cause twice. [`chain`] prints the
//! chain and leaves out a cause whose text the line already holds.

use std::error::Error;

/// `error: cause: deeper cause`, leaving out each cause whose text is already in the line.
pub fn chain(error: &(dyn Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

/// Whether `line` says some `": "`-separated part twice in a row (`x: y: y`), the repetition
/// [`chain`] exists to prevent; for tests of the messages binaries print.
pub fn repeats_a_cause(line: &str) -> bool {
    let parts: Vec<&str> = line.split(": ").collect();
    (1..parts.len()).any(|n| {
        // Any run of parts followed at once by the same run.
        (0..parts.len())
            .any(|i| i + 2 * n <= parts.len() && parts[i..i + n] == parts[i + n..i + 2 * n])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("binding the QUIC listener on 127.0.0.1:4433: {source}")]
    struct ShowsAndChains {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("opening the store")]
    struct OnlyChains {
        source: std::io::Error,
    }

    fn in_use() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::AddrInUse)
    }

    #[test]
    fn a_cause_shown_in_the_message_is_not_printed_again() {
        let e = ShowsAndChains { source: in_use() };
        assert!(repeats_a_cause(&format!(
            "{:#}",
            anyhow::Error::new(ShowsAndChains { source: in_use() })
        )));
        let line = chain(&e);
        assert_eq!(
            line,
            format!("binding the QUIC listener on 127.0.0.1:4433: {}", in_use())
        );
        assert!(!repeats_a_cause(&line), "{line}");
    }

    #[test]
    fn a_cause_only_chained_is_printed_once() {
        let e = anyhow::Error::new(OnlyChains { source: in_use() }).context("starting the gateway");
        let line = chain(e.as_ref());
        assert_eq!(
            line,
            format!("starting the gateway: opening the store: {}", in_use())
        );
        assert!(!repeats_a_cause(&line));
    }

    #[test]
    fn repetition_is_found_anywhere_in_the_line() {
        assert!(repeats_a_cause("timed out: timed out"));
        assert!(repeats_a_cause("a: b: c: b: c"));
        assert!(!repeats_a_cause("a: b: a"));
        assert!(!repeats_a_cause(
            "no gateway answering at 127.0.0.1:9 (UDP)"
        ));
    }
}
