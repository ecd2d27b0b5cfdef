use clap::Parser;

/// Sidecar relay: gives each registered WireGuard peer its own routable IPv6 /128
/// (and optionally an IPv4 /32), forwards and shapes its traffic.
#[derive(Parser, Debug)]
#[command(name = "sidecar-relay", version, about, long_about = None)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
