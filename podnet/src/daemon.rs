//! Process plumbing the two long-running components (controller and agent)
//! share: logging and the shutdown signal.

use std::io::IsTerminal;

/// Logs to stderr at the level `RUST_LOG` names (default `info`), with
/// colour codes only for a person at a terminal, never in log files.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Resolves on SIGTERM (the kubelet stopping the pod) or Ctrl-C.
///
/// # Panics
/// When the SIGTERM handler cannot be installed, which only happens when the
/// process is started without a working signal setup: nothing to recover.
pub async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested");
}
