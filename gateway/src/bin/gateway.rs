//! The `gateway` binary: argument parsing lives in `nearpath_gateway::cli`.

fn main() -> std::process::ExitCode {
    nearpath_gateway::cli::main()
}
