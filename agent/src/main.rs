//! `sidecar-agent`: userspace WireGuard for hosts without the kernel module.

mod up;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "sidecar-agent",
    version,
    about = "Userspace WireGuard: bring up wg-quick configurations without the kernel module",
    long_about = "Userspace WireGuard for hosts and sandboxes without the kernel module.\n\n\
        `up` brings up a wg-quick configuration file entirely in userspace and serves the \
        standard WireGuard userspace API, so the stock `wg` tool can inspect and change it.\n\n\
        Logging follows RUST_LOG (default: info)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Bring up a WireGuard interface from a wg-quick configuration file and run it
    /// until SIGINT or SIGTERM, then remove everything that was added.
    Up {
        /// wg-quick configuration file ([Interface] and [Peer] sections).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Interface name (at most 15 characters); defaults to the file name without extension.
        #[arg(long, short = 'i', value_name = "NAME")]
        interface: Option<String>,
    },
    /// Print a running interface's counters in Prometheus text format.
    Metrics {
        /// Interface name, as given to `up`.
        interface: String,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,boringtun=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up { config, interface } => up::run(&config, interface.as_deref()).await,
            Command::Metrics { interface } => metrics(&interface).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn metrics(interface: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    sidecar::uapi::validate_interface_name(interface)?;
    let path = sidecar::uapi::socket_path(interface);
    let reply = sidecar::uapi::query(&path, "metrics=1\n\n")
        .await
        .with_context(|| format!("cannot reach interface {interface} at {}", path.display()))?;
    let (body, errno) = sidecar::uapi::split_reply(&reply)?;
    if errno != 0 {
        anyhow::bail!("interface {interface} answered with errno {errno}");
    }
    print!("{body}");
    Ok(())
}
