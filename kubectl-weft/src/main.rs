//! kubectl-weft: `kubectl weft status`, `trace`, `bundle` and
//! `connectivity test` once the binary is on PATH.
//!
//! Parses the command line and runs [`kubectl_weft::cli::run`]. Exit
//! status: 0 healthy (or allowed, or written), 1 with warnings (or denied, or
//! a broken path), 2 on a usage or connection error.

use std::process::ExitCode;

use clap::Parser;
use kubectl_weft::cli::{run, Cli, EXIT_ERROR};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A handful of concurrent requests: one thread is plenty.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(run(&cli, &mut std::io::stdout().lock())) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
