//! The `weft` CNI plugin. A container runtime runs it with the `CNI_*`
//! environment and the network config on stdin; it prints the result or
//! error JSON on stdout and nothing else. Logs go to stderr, or appended to
//! the file named by `WEFT_LOG_FILE`, filtered by `WEFT_LOG` (default
//! `warn`). Run by hand as `weft --version` it prints its version and
//! the CNI versions it speaks, and nothing else.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::sync::Mutex;

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;
use weft_cni::cni::{CniError, CniVersion, ErrorCode};

fn main() -> ExitCode {
    // A runtime passes no arguments; a person asking what is installed does.
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!(
            "weft {} (commit {}; CNI versions {})",
            weft_core::status::VERSION,
            weft_core::status::COMMIT,
            weft_cni::cni::supported_versions_list()
        );
        return ExitCode::SUCCESS;
    }
    init_logging();
    let mut stdin = Vec::new();
    let reply = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => weft_cni::plugin::run(std::env::vars(), &stdin),
        Err(error) => {
            let error = CniError::new(
                ErrorCode::Io,
                "cannot read the network config from stdin: the runtime must pass it on stdin",
            )
            .with_details(error.to_string());
            weft_cni::plugin::Reply {
                stdout: error.to_json(CniVersion::LATEST),
                exit_status: error.exit_status(),
            }
        }
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout
        .write_all(reply.stdout.as_bytes())
        .and_then(|()| stdout.flush())
    {
        tracing::error!(%error, "cannot write the reply to stdout");
        return ExitCode::FAILURE;
    }
    ExitCode::from(reply.exit_status)
}

/// Logs never go to stdout, which carries the protocol. A log file that
/// cannot be opened falls back to stderr rather than failing the verb.
fn init_logging() {
    let filter = EnvFilter::try_from_env("WEFT_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let log_file = std::env::var_os("WEFT_LOG_FILE")
        .and_then(|path| OpenOptions::new().create(true).append(true).open(path).ok());
    let (writer, ansi) = match log_file {
        Some(file) => (BoxMakeWriter::new(Mutex::new(file)), false),
        None => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
        ),
    };
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_env_filter(filter)
        .init();
}
