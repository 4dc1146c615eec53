//! toolgate-operator: the McpPolicy controller, the sidecar-injecting admission webhook and
//! the policy push to sidecars, in one binary. See docs/operator.md.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use toolgate_operator::cli::{Args, Config};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; every usage error is EX_USAGE.
            return if e.use_stderr() { ExitCode::from(64) } else { ExitCode::SUCCESS };
        }
    };
    // Bad flags stop here, before any I/O.
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("toolgate-operator: {e}");
            return ExitCode::from(64);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOOLGATE_LOG").unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("toolgate-operator: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(toolgate_operator::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toolgate-operator: {e:#}");
            ExitCode::FAILURE
        }
    }
}
