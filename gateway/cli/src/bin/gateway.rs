//! The `gateway` binary: argument parsing lives in `nearpath_gateway_cli::cli`.

fn main() -> std::process::ExitCode {
    nearpath_gateway_cli::cli::main()
}
