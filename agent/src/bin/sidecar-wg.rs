//! `sidecar-wg`: Sidecar's engine behind wireguard-go's command line, so wg-quick
//! (WG_QUICK_USERSPACE_IMPLEMENTATION=sidecar-wg) and any script written for
//! wireguard-go drive it with `wg` and `ip` alone.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use sidecar::driver::Driver;
use sidecar::tun::TunDevice;
use sidecar::uapi::{socket_path, validate_interface_name, UapiServer};
use sidecar::udp::UdpTransport;
use sidecar::wg::{Device, DeviceConfig};
use sidecar::Key;
use sidecar_agent::daemon::{self, Readiness};
use sidecar_agent::interface::{self, StopSignals};
use tracing_subscriber::EnvFilter;

/// What a new interface starts with until `ip link set mtu` changes it; the data
/// path follows whatever the interface is set to later.
const START_MTU: u16 = 1420;

#[derive(Parser, Debug)]
#[command(
    name = "sidecar-wg",
    version,
    about = "Userspace WireGuard interface, a drop-in for wireguard-go",
    long_about = "Creates the TUN interface IFNAME and serves the WireGuard userspace API at \
        /var/run/wireguard/IFNAME.sock, exactly as wireguard-go does: configure it with `wg` \
        (keys, port, peers, fwmark) and `ip` (addresses, MTU, routes, up/down, moving it to \
        another network namespace). wg-quick runs it with \
        WG_QUICK_USERSPACE_IMPLEMENTATION=sidecar-wg.\n\n\
        Without --foreground it detaches and exits 0 once the interface and the socket exist, \
        or exits 1 saying why they could not be made. It exits by itself, removing the socket, \
        when the interface is deleted (`ip link del IFNAME`), and on SIGTERM or SIGINT.\n\n\
        Logging: LOG_LEVEL=debug|verbose|info|error|silent (as wireguard-go), or a RUST_LOG \
        filter, which wins. In the foreground the log goes to stderr; detached it goes to \
        --log-file, or to the caller's stderr when LOG_LEVEL or RUST_LOG is set, else nowhere. \
        WG_PROCESS_FOREGROUND=1 is the same as --foreground."
)]
struct Args {
    /// Stay in the foreground instead of detaching.
    #[arg(short = 'f', long, env = "WG_PROCESS_FOREGROUND")]
    foreground: bool,
    /// Append the log to FILE (SIDECAR_WG_LOG_FILE, for callers such as wg-quick that
    /// pass only the interface name).
    #[arg(long, value_name = "FILE", env = "SIDECAR_WG_LOG_FILE")]
    log_file: Option<PathBuf>,
    /// The interface to create (at most 15 characters).
    #[arg(value_name = "IFNAME")]
    interface: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = validate_interface_name(&args.interface) {
        eprintln!("error: interface name {:?}: {e}", args.interface);
        return ExitCode::FAILURE;
    }
    let mut readiness = Readiness::from_env();
    if readiness.is_none() && !args.foreground {
        let stderr = if args.log_file.is_none() && logging_asked() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        return match daemon::spawn_detached(stderr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(reason) => {
                eprintln!("error: {reason}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(e) = init_logging(args.log_file.as_deref()) {
        return fail(readiness, &format!("{e:#}"));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(readiness, &format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(run(&args.interface, &mut readiness)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(readiness, &format!("{e:#}")),
    }
}

/// Reports `reason` in the log and to the waiting parent (which prints it), or on
/// stderr in the foreground.
fn fail(readiness: Option<Readiness>, reason: &str) -> ExitCode {
    tracing::error!("{reason}");
    match readiness {
        Some(r) => r.fail(reason),
        None => eprintln!("error: {reason}"),
    }
    ExitCode::FAILURE
}

async fn run(name: &str, readiness: &mut Option<Readiness>) -> Result<()> {
    let device = Arc::new(Device::with_config(&DeviceConfig {
        private_key: None,
        noise_backend: interface::noise_backend_from_env()?,
        ..DeviceConfig::new(Key([0; 32]))
    }));
    let socket = UdpTransport::bind(0).context("cannot open the UDP socket")?;
    let tun = TunDevice::create(name, START_MTU).with_context(|| {
        format!("cannot create TUN interface {name} (is /dev/net/tun available, and are we root or CAP_NET_ADMIN?)")
    })?;
    let driver = Driver::start(device, Arc::new(tun), socket);
    let uapi = UapiServer::bind(name, driver.control())
        .await
        .with_context(|| format!("cannot serve {}", socket_path(name).display()))?;
    let signals = StopSignals::install().context("cannot watch SIGTERM and SIGINT")?;
    tracing::info!(interface = %name, socket = %socket_path(name).display(), "interface is up");
    if let Some(r) = readiness.take() {
        r.ready();
    }
    interface::serve(&driver, uapi, signals).await;
    driver.stop();
    Ok(())
}

/// Whether the caller asked for a log (so a detached child keeps the caller's stderr).
fn logging_asked() -> bool {
    std::env::var_os("RUST_LOG").is_some()
        || std::env::var("LOG_LEVEL").is_ok_and(|l| !l.eq_ignore_ascii_case("silent"))
}

/// RUST_LOG if set, else wireguard-go's LOG_LEVEL words.
fn filter() -> EnvFilter {
    if let Ok(f) = EnvFilter::try_from_default_env() {
        return f;
    }
    let level = std::env::var("LOG_LEVEL").unwrap_or_default();
    EnvFilter::new(match level.to_ascii_lowercase().as_str() {
        "verbose" | "debug" => "debug",
        "error" => "error",
        "silent" => "off",
        _ => "info",
    })
}

fn init_logging(file: Option<&std::path::Path>) -> Result<()> {
    let builder = tracing_subscriber::fmt().with_env_filter(filter());
    match file {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        None => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    Ok(())
}
