//! `sidecar-agent`: userspace WireGuard for hosts without the kernel module.

mod cli;
mod events;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{parser::ValueSource, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "sidecar-agent",
    version,
    about = "Gives labeled Docker containers their own public address through a Sidecar relay",
    long_about = "Gives every Docker container labeled sidecar.enable=true its own routable IPv6 \
        /128 (and IPv4 /32 with sidecar.ipv4=true) through a WireGuard tunnel to a Sidecar relay, \
        entirely in userspace.\n\n\
        `run` watches Docker and wires up labeled containers; `status` shows them. \
        `up` brings up a plain wg-quick configuration file in userspace and serves the standard \
        WireGuard userspace API, so the stock `wg` tool can inspect and change it.\n\n\
        Labels: sidecar.enable=true, sidecar.ipv4=true, sidecar.relay=URL (pin one relay), \
        sidecar.bandwidth=MBPS, sidecar.latency=50ms, sidecar.jitter=10ms, sidecar.loss=1% \
        (`shape` changes the last three at run time), sidecar.api=true (the container reads \
        its addresses and changes those three itself at http://127.0.0.1:9530 inside it).\n\n\
        The agent token belongs in a file only root can read (--token-file or \
        SIDECAR_TOKEN_FILE; by default /etc/sidecar/agent.token, which `login` writes after an \
        admin of the relay approves it) or in SIDECAR_TOKEN: a --token on the command line is \
        visible to every user in `ps`.\n\nLogging follows RUST_LOG (default: info)."
)]
struct Cli {
    /// text: readable log lines; codes: each event an operator acts on as its stable
    /// code (SC1201 ...), which `sidecar-agent explain CODE` explains.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "SIDECAR_LOG_FORMAT"
    )]
    log_format: cli::LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Default place for per-container keys and the status snapshot.
const DEFAULT_STATE_DIR: &str = "/var/lib/sidecar-agent";

#[derive(Subcommand, Debug)]
enum Command {
    /// Watch Docker and give each container labeled sidecar.enable=true its own
    /// WireGuard peer on the relay and its own public address.
    Run {
        /// The relay's control API, https://HOST:PORT.
        #[arg(long, env = "SIDECAR_RELAY", value_name = "URL")]
        relay: String,
        /// File holding the agent token from the relay (mode 0600; the token starts
        /// with sct_live_). Without --token-file or --token: /etc/sidecar/agent.token,
        /// where `login` writes it.
        #[arg(long, env = "SIDECAR_TOKEN_FILE", value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// The agent token itself. Prefer --token-file: a token on the command line
        /// is visible to every user of the host in `ps`.
        #[arg(
            long,
            env = "SIDECAR_TOKEN",
            value_name = "TOKEN",
            hide_env_values = true,
            conflicts_with = "token_file"
        )]
        token: Option<String>,
        /// The relay certificate's pin, sha256//BASE64 (printed by the relay).
        #[arg(long, env = "SIDECAR_PIN", value_name = "PIN")]
        pin: String,
        /// Docker socket (default: DOCKER_HOST or /var/run/docker.sock).
        #[arg(long, value_name = "PATH")]
        docker: Option<String>,
        /// Where per-container keys (so addresses survive restarts) and status live.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// tun: a TUN device in each container; netstack: a userspace stack in the
        /// agent forwarding every port to the container; auto: tun where possible.
        #[arg(long, value_enum, default_value = "auto")]
        mode: sidecar_agent::manager::Mode,
        /// How often each container's registration is verified with the relay (and
        /// made again when the relay lost it), in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        check_every: u64,
        /// Containers setting up or talking to the relay at once, at most.
        #[arg(long, value_name = "N", default_value_t = sidecar_agent::manager::DEFAULT_MAX_IN_FLIGHT)]
        max_in_flight: usize,
        /// Where /healthz, /readyz and /metrics are served (plain HTTP), or `off`.
        #[arg(long, env = "SIDECAR_HEALTH_LISTEN", value_name = "ADDR|off", default_value = sidecar_agent::health::DEFAULT_LISTEN)]
        health_listen: String,
    },
    /// Get an agent token by device login: prints a code for an admin of the relay
    /// to approve, waits (polling as the relay asks), and writes the token (mode
    /// 0600) where `run` finds it. Exits non-zero if the login is denied or expires.
    Login {
        /// The relay's control API, https://HOST:PORT.
        #[arg(long, env = "SIDECAR_RELAY", value_name = "URL")]
        relay: String,
        /// The relay certificate's pin, sha256//BASE64 (printed by the relay).
        #[arg(long, env = "SIDECAR_PIN", value_name = "PIN")]
        pin: String,
        /// Space-separated scopes to ask for: peers:read, peers:add, admin.
        #[arg(long, value_name = "SCOPES", default_value = sidecar_agent::login::DEFAULT_SCOPE)]
        scope: String,
        /// Where the token is written (its directory is made 0700 if missing).
        #[arg(long, env = "SIDECAR_TOKEN_FILE", value_name = "PATH", default_value = sidecar_agent::login::DEFAULT_TOKEN_FILE)]
        token_file: PathBuf,
    },
    /// Exit 0 when a running agent is ready (its /readyz answers 200): for a
    /// container HEALTHCHECK.
    Health {
        /// The agent's --health-listen address.
        #[arg(long, env = "SIDECAR_HEALTH_LISTEN", value_name = "ADDR", default_value = sidecar_agent::health::DEFAULT_LISTEN)]
        listen: SocketAddr,
    },
    /// One row per managed container: name, addresses, mode, latest handshake, bytes.
    Status {
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
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
    /// Register a plain WireGuard client's public key with a post-quantum preshared
    /// key: writes the key to --psk-file (0600) and prints the `wg set` line that
    /// uses it. Run it again to rotate the key.
    Psk {
        #[arg(long, env = "SIDECAR_RELAY", value_name = "URL")]
        relay: String,
        #[arg(
            long,
            env = "SIDECAR_TOKEN",
            value_name = "TOKEN",
            hide_env_values = true
        )]
        token: String,
        #[arg(long, env = "SIDECAR_PIN", value_name = "PIN")]
        pin: String,
        /// The client's WireGuard public key (base64, as `wg pubkey` prints it).
        #[arg(long, value_name = "KEY")]
        pubkey: String,
        /// Also ask for a public IPv4 /32.
        #[arg(long)]
        ipv4: bool,
        /// Label shown in the relay's listings.
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_name = "FILE", default_value = "relay.psk")]
        psk_file: PathBuf,
    },
    /// Print what a log event code (from --log-format codes, e.g. SC1201) means and
    /// what to do about it.
    Explain {
        /// The code, e.g. SC1201.
        code: String,
    },
    /// Change a running container's emulated network at once, without a restart:
    /// latency and jitter are added to each direction (a ping's round trip grows
    /// by twice the latency), loss is drawn in each direction independently.
    /// Options left out are zero. Lasts until the container is removed or the
    /// agent restarts; --clear goes back to none (the labels count again only at
    /// the next start of the agent). Talks to `run` over control.sock in its
    /// state directory (root only).
    #[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["latency", "jitter", "loss", "clear"])))]
    Shape {
        /// The container's name or ID (at least 4 characters of it).
        container: String,
        /// One-way delay added in each direction: 80ms, 1.5ms, 2s (at most 10s).
        #[arg(long, value_name = "DURATION", value_parser = sidecar_agent::conditions::parse_delay)]
        latency: Option<std::time::Duration>,
        /// Each packet's delay spreads evenly within latency ± jitter; packets may
        /// then overtake each other, as on a real path with jitter.
        #[arg(long, value_name = "DURATION", value_parser = sidecar_agent::conditions::parse_delay)]
        jitter: Option<std::time::Duration>,
        /// Share of packets lost in each direction: 0.5%, 5%.
        #[arg(long, value_name = "PERCENT", value_parser = sidecar_agent::conditions::parse_loss)]
        loss: Option<f64>,
        /// Remove every emulated condition.
        #[arg(long, conflicts_with_all = ["latency", "jitter", "loss"])]
        clear: bool,
        /// The running agent's --state-dir (its control.sock is there).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Print a running interface's counters in Prometheus text format.
    Metrics {
        /// Interface name, as given to `up`.
        interface: String,
    },
}

fn main() -> std::process::ExitCode {
    let matches = Cli::command().get_matches();
    let token_in_argv = matches
        .subcommand_matches("run")
        .and_then(|m| m.value_source("token"))
        == Some(ValueSource::CommandLine);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Command::Explain { code } = &cli.command {
        return match events::explain(code) {
            Some(text) => {
                print!("{text}");
                std::process::ExitCode::SUCCESS
            }
            None => {
                eprintln!(
                    "error: {code} is not a sidecar-agent event code (they look like SC1201)"
                );
                std::process::ExitCode::FAILURE
            }
        };
    }
    cli::run("info,boringtun=warn", cli.log_format, || async move {
        match cli.command {
            Command::Explain { .. } => Ok(()),
            Command::Up { config, interface } => up::run(&config, interface.as_deref()).await,
            Command::Run {
                relay,
                token_file,
                token,
                pin,
                docker,
                state_dir,
                mode,
                check_every,
                max_in_flight,
                health_listen,
            } => {
                match sidecar_agent::fd_budget::raise() {
                    Ok(r) => tracing::info!(
                        before = r.before,
                        after = r.after,
                        per_container = r.share,
                        "file descriptor limit"
                    ),
                    Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
                }
                // Neither given: the file `login` writes.
                let defaulted = token_file.is_none() && token.is_none();
                let token_file = if defaulted {
                    Some(PathBuf::from(sidecar_agent::login::DEFAULT_TOKEN_FILE))
                } else {
                    token_file
                };
                let token = match (&token_file, token) {
                    (Some(path), _) if defaulted => sidecar_agent::secrets::read_token_file(path)
                        .with_context(|| format!("no --token-file or --token given, and the default {} is unusable; `sidecar-agent login` writes it", path.display()))?,
                    (Some(path), _) => sidecar_agent::secrets::read_token_file(path)?,
                    (None, Some(token)) => {
                        if token_in_argv {
                            tracing::warn!("--token on the command line is visible to every user of this host (ps, /proc); put it in a file readable only by root and pass --token-file, or set SIDECAR_TOKEN");
                        }
                        token
                    }
                    (None, None) => anyhow::bail!("give the agent token with --token-file PATH"),
                };
                let health_listen = match health_listen.as_str() {
                    "off" => None,
                    addr => Some(addr.parse::<SocketAddr>().with_context(|| {
                        format!("--health-listen {addr:?} is not an address such as 127.0.0.1:9531 (or off)")
                    })?),
                };
                let mut client =
                    sidecar_agent::relay_client::RelayClient::new(&relay, &token, &pin)?;
                if let Some(path) = token_file {
                    client = client.with_token_file(path);
                }
                sidecar_agent::pq::watch_rotation_signal();
                sidecar_agent::manager::run(sidecar_agent::manager::Settings {
                    relay_url: client.url().to_string(),
                    relay: client,
                    docker_socket: docker,
                    state_dir,
                    mode,
                    check_every: std::time::Duration::from_secs(check_every),
                    max_in_flight,
                    health_listen,
                })
                .await
            }
            Command::Login {
                relay,
                pin,
                scope,
                token_file,
            } => {
                let login = sidecar_agent::login::Login {
                    relay,
                    pin,
                    scope,
                    token_file,
                };
                sidecar_agent::login::run(&login).await
            }
            Command::Health { listen } => sidecar_agent::health::probe(listen).await,
            Command::Status { state_dir } => sidecar_agent::manager::print_status(&state_dir),
            Command::Metrics { interface } => metrics(&interface).await,
            Command::Shape {
                container,
                latency,
                jitter,
                loss,
                clear,
                state_dir,
            } => {
                let wanted = if clear {
                    None
                } else {
                    sidecar_agent::conditions::build(latency, jitter, loss)
                        .map_err(anyhow::Error::msg)?
                };
                let spec = sidecar_agent::conditions::describe(wanted.as_ref());
                let reply = sidecar_agent::control::request(
                    &state_dir,
                    &format!("shape {container} {spec}"),
                )
                .await?;
                println!("{reply}");
                Ok(())
            }
            Command::Psk {
                relay,
                token,
                pin,
                pubkey,
                ipv4,
                name,
                psk_file,
            } => {
                let client = sidecar_agent::relay_client::RelayClient::new(&relay, &token, &pin)?;
                let request = sidecar_proto::RegisterPeer {
                    pubkey: sidecar::Key::from_base64(&pubkey)?,
                    ipv4,
                    name,
                    container: None,
                };
                let text = sidecar_agent::pq::register_plain(&client, &request, &psk_file).await?;
                print!("{text}");
                Ok(())
            }
        }
    })
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
