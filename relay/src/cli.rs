//! What the binary does around its command: log to stderr (honouring RUST_LOG), run
//! on a multi-threaded runtime, and turn an error into a message and a failing exit
//! code.
//!
//! Each binary keeps its own copy of these few lines: process setup is the
//! binary's business, and a shared home for it would pull tracing-subscriber into a
//! library (the engine or the API contract) that has no use for it.

use std::future::Future;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// Runs `command` with logging set up; `default_filter` applies when RUST_LOG is unset.
pub fn run<F: Future<Output = anyhow::Result<()>>>(
    default_filter: &str,
    command: impl FnOnce() -> F,
) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` shows an anyhow error's whole chain of causes.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
