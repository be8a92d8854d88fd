//! Shell completions and man pages generated from a binary's clap definition, and the check that
//! every `--help` entry has a description. It lives here because every binary crate of the
//! workspace (`edge-node`, and `gateway-cli` with `gateway` and `nearpath`) already depends on
//! this crate: one copy serves the three binaries, and the packages (`deploy/build-deb.sh`) take
//! their pages and completions from these functions through each binary's `completions` and
//! `man` subcommands, so what ships always matches the binary.

use clap::Command;
use std::io::Write;
use std::path::Path;

pub use clap_complete::Shell;

/// Writes the completion script of `cmd` for `shell` to `out`. The script is generated into
/// memory first: `clap_complete` panics when its writer fails, and a reader that closes the
/// pipe early (`gateway completions bash | head`) must not crash the binary.
pub fn write_completions(
    mut cmd: Command,
    shell: Shell,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    out.write_all(&script)?;
    out.flush()
}

/// The `completions` subcommand of each binary: the script on stdout. A reader that stopped
/// reading (a closed pipe) is not a failure; any other write error is, with its cause.
pub fn print_completions(cmd: Command, shell: Shell) -> std::process::ExitCode {
    match write_completions(cmd, shell, &mut std::io::stdout().lock()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing the completion script: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes the man page of `cmd` (section 1) to `out`; it lists the subcommands, whose own pages
/// [`write_man_pages`] writes.
pub fn write_man(cmd: Command, out: &mut dyn Write) -> std::io::Result<()> {
    clap_mangen::Man::new(cmd).render(out)
}

/// Writes one man page per command into `dir`: `NAME.1` for the binary and `NAME-SUB.1` (and
/// deeper, `NAME-SUB-SUBSUB.1`) for each visible subcommand. Returns the files written, sorted.
pub fn write_man_pages(cmd: Command, dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let before: std::collections::BTreeSet<_> = list(dir)?;
    clap_mangen::generate_to(cmd, dir)?;
    let after = list(dir)?;
    Ok(after.difference(&before).cloned().collect())
}

fn list(dir: &Path) -> std::io::Result<std::collections::BTreeSet<std::path::PathBuf>> {
    std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect()
}

/// The subcommands and arguments of `cmd`'s whole tree that `--help` would show without a
/// description, as `"gateway run --config"` or `"gateway geo"` (subcommand). Hidden entries are
/// skipped: `--help` does not show them.
pub fn undocumented(cmd: &Command) -> Vec<String> {
    let mut cmd = cmd.clone();
    // Building adds what clap generates (`--help`, `--version`, the `help` subcommand), so they
    // are checked too, and gives subcommands their full names.
    cmd.build();
    let mut missing = Vec::new();
    walk(&cmd, cmd.get_name().to_string(), &mut missing);
    missing
}

fn walk(cmd: &Command, path: String, missing: &mut Vec<String>) {
    for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        if arg.get_help().is_none() && arg.get_long_help().is_none() {
            let name = match (arg.get_long(), arg.get_short()) {
                (Some(long), _) => format!("--{long}"),
                (None, Some(short)) => format!("-{short}"),
                (None, None) => format!("<{}>", arg.get_id()),
            };
            missing.push(format!("{path} {name}"));
        }
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub_path = format!("{path} {}", sub.get_name());
        if sub.get_about().is_none() && sub.get_long_about().is_none() {
            missing.push(format!("{sub_path} (subcommand)"));
        }
        // The generated `help` subcommand mirrors the real ones (with their descriptions):
        // each gap is reported once, under the real command.
        if sub.get_name() != "help" {
            walk(sub, sub_path, missing);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn sample() -> Command {
        Command::new("tool")
            .about("A tool.")
            .arg(Arg::new("documented").long("documented").help("Has help."))
            .arg(Arg::new("bare").long("bare"))
            .arg(Arg::new("secret").long("secret").hide(true))
            .subcommand(
                Command::new("sub")
                    .arg(Arg::new("file"))
                    .subcommand(Command::new("leaf").about("A leaf.")),
            )
    }

    #[test]
    fn undocumented_names_every_bare_argument_and_subcommand_but_not_hidden_ones() {
        let missing = undocumented(&sample());
        assert_eq!(
            missing,
            vec![
                "tool --bare".to_string(),
                "tool sub (subcommand)".to_string(),
                "tool sub <file>".to_string(),
            ],
        );
    }

    #[test]
    fn man_pages_are_one_per_visible_command() {
        let dir = tempfile_dir();
        let cmd = sample().mut_arg("bare", |a| a.help("Now documented."));
        let files = write_man_pages(cmd, &dir).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["tool-sub-leaf.1", "tool-sub.1", "tool.1"]);
        let page = std::fs::read_to_string(dir.join("tool.1")).unwrap();
        assert!(page.contains(".TH tool 1"), "{page}");
        assert!(page.contains("Now documented."), "{page}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Regression (issue 16 audit): `gateway completions bash | head` panicked in
    /// `clap_complete` ("failed to write completion file: Broken pipe").
    #[test]
    fn a_closed_pipe_is_an_error_returned_not_a_panic() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let err = write_completions(sample(), Shell::Bash, &mut Closed).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn completions_name_the_binary_and_its_options() {
        let mut out = Vec::new();
        write_completions(sample(), Shell::Bash, &mut out).unwrap();
        let script = String::from_utf8(out).unwrap();
        assert!(script.contains("_tool()"), "{script}");
        assert!(script.contains("--documented"), "{script}");
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "nearpath-clidoc-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }
}
