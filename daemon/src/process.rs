//! Process plumbing the two daemons share: logging, the allocator setting
//! and the shutdown signal.

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

/// Keeps the C allocator to one arena for the whole process.
///
/// glibc gives every thread that allocates an arena of its own (up to eight
/// per core), and what a thread frees stays in its arena for its own later
/// use. The agent receives the node list on one tokio worker and reconciles
/// on another, so each arena kept a peak's worth: at 5,000 peers the agent
/// stayed at 29 MiB resident where one arena needs 20 MiB. Allocation is
/// not what these daemons spend their time on, so the shared arena's lock
/// costs nothing measurable. Call it before any thread is started.
// mallopt is a C call: the daemons' one use of unsafe code.
#[allow(unsafe_code)]
pub fn use_one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX is one
    // it documents, and it takes effect for threads that allocate later.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1);
    }
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
