//! `sidecar-relay`: hands out public addresses to WireGuard peers and forwards them.

mod cli;

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use sidecar::{Endpoint, IpPrefix, Key};
use sidecar_relay::api::{self, ApiState, RelayInfo};
use sidecar_relay::config::{
    default_address_hold_hours, ApiSection, MetricsSection, NetworkSection, PqSection, PrefixMode,
    RelayConfig, WireguardSection,
};
use sidecar_relay::dataplane::RelayDataPlane;
use sidecar_relay::machine::MachineKeys;
use sidecar_relay::metrics::{self, ApiMetrics, Sources};
use sidecar_relay::neighbor::NeighborResponder;
use sidecar_relay::pq::PqKeys;
use sidecar_relay::service::{PeerService, ServiceOptions};
use sidecar_relay::store::{AddressPlan, Store, TokenSpec};
use sidecar_relay::tls::Identity;
use tokio::signal::unix::{signal, SignalKind};

/// Where `run` without `--config` keeps its state.
const DEFAULT_DATA_DIR: &str = "/var/lib/sidecar-relay";

#[derive(Parser, Debug)]
#[command(
    name = "sidecar-relay",
    version,
    about = "Gives each registered WireGuard peer its own routable IPv6 /128 (and optionally an IPv4 /32)",
    long_about = "Gives each registered WireGuard peer its own routable IPv6 /128 (and optionally \
        an IPv4 /32), forwards and shapes its traffic, and serves the HTTPS control API agents \
        register through.\n\nStart with `sidecar-relay run` (embedded defaults: a data directory, \
        generated keys and certificate, a random ULA /64) or `sidecar-relay init` to write a \
        configuration for a real prefix.\n\nLogging follows RUST_LOG (default: info)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write relay.toml, the WireGuard key, a TLS key and self-signed certificate into
    /// a new directory, and print the admin token (once) and the certificate pin.
    Init(InitArgs),
    /// Run the relay. Without --config: embedded defaults in the data directory
    /// (created and remembered on first start).
    Run {
        /// relay.toml written by `init`.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory for the embedded defaults (ignored with --config).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Sign or check the warrant canary, the operator's statement that `GET /v1/canary`
    /// serves with its time, signed with the relay's Ed25519 canary key.
    #[command(subcommand)]
    Canary(CanaryCommand),
}

#[derive(Subcommand, Debug)]
enum CanaryCommand {
    /// Sign STATEMENT as of now and make it the relay's canary (a running relay serves
    /// it at once). Creates the canary key (0600) on first use and prints its public key.
    Sign {
        /// File with the statement (`-` for stdin), at most 16 KiB.
        #[arg(long, value_name = "FILE")]
        statement: PathBuf,
        /// relay.toml of the relay (its data directory holds the key and the canary).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Data directory of a relay run with embedded defaults (ignored with --config).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Check a canary document (as fetched from /v1/canary; `-` for stdin): exit 0 and
    /// print the statement and its age if the signature holds.
    Verify {
        /// The JSON document.
        #[arg(value_name = "FILE")]
        document: PathBuf,
        /// The canary public key you trust (base64). Without it, the document's own
        /// key is checked and printed: compare it with one learnt before.
        #[arg(long, value_name = "BASE64")]
        public_key: Option<String>,
        /// Refuse a canary signed longer ago than this many days.
        #[arg(long, value_name = "DAYS")]
        max_age_days: Option<u64>,
    },
}

#[derive(Args, Debug)]
struct InitArgs {
    /// Directory for relay.toml, keys, certificate and the peer store.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// IPv6 prefix peers get /128s from (an on-link /64 or a routed prefix).
    #[arg(long, value_name = "PREFIX")]
    ipv6_prefix: IpPrefix,
    /// on-link: the relay answers the router's Neighbor Solicitations on --uplink.
    /// routed: the router routes the prefix to the relay.
    #[arg(long, value_enum, default_value = "on-link")]
    ipv6_mode: Mode,
    /// Optional IPv4 pool for /32s.
    #[arg(long, value_name = "PREFIX")]
    ipv4_pool: Option<IpPrefix>,
    #[arg(long, value_enum, default_value = "routed")]
    ipv4_mode: Mode,
    /// Interface towards the upstream router (required for on-link prefixes).
    #[arg(long, value_name = "IFACE")]
    uplink: Option<String>,
    /// Public host:port agents send WireGuard to; the host also names the TLS certificate.
    #[arg(long, value_name = "HOST:PORT")]
    endpoint: Endpoint,
    /// Address for the HTTPS control API.
    #[arg(long, value_name = "ADDR", default_value = "[::]:8443")]
    api_listen: SocketAddr,
    /// WireGuard UDP port (defaults to the endpoint's port).
    #[arg(long)]
    listen_port: Option<u16>,
    /// Addresses inside the prefix or pool never handed out (repeatable).
    #[arg(long, value_name = "ADDR")]
    reserve: Vec<IpAddr>,
    /// Name of the relay's TUN interface (also names its `wg show` socket).
    #[arg(long, value_name = "NAME", default_value = "sidecar0")]
    interface: String,
    /// Refuse peers that register without a post-quantum preshared key.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    require_pq: bool,
    /// Seconds between the new encapsulations (preshared keys) peers are asked for.
    #[arg(long, value_name = "SECS", default_value_t = sidecar_relay::pq::DEFAULT_ROTATE.as_secs())]
    pq_rotate_secs: u64,
    /// Bind the "default" agent token to the machine of its first registration.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    bind_default_token: bool,
    /// Plain-HTTP address for Prometheus /metrics (no authentication: keep it local).
    #[arg(long, value_name = "ADDR", default_value = sidecar_relay::config::DEFAULT_METRICS_LISTEN)]
    metrics_listen: SocketAddr,
    /// Serve no /metrics.
    #[arg(long)]
    no_metrics: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Mode {
    OnLink,
    Routed,
}

impl From<Mode> for PrefixMode {
    fn from(m: Mode) -> PrefixMode {
        match m {
            Mode::OnLink => PrefixMode::OnLink,
            Mode::Routed => PrefixMode::Routed,
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cli::run("info,boringtun=warn,sled=warn", || async move {
        match cli.command {
            Command::Init(args) => init(args).await,
            Command::Run { config, data_dir } => run(config.as_deref(), &data_dir).await,
            Command::Canary(command) => canary(command),
        }
    })
}

async fn init(args: InitArgs) -> Result<()> {
    let port = match args.listen_port {
        Some(p) => p,
        None => args.endpoint.port(),
    };
    let config = RelayConfig {
        data_dir: std::path::absolute(&args.dir)
            .with_context(|| format!("cannot resolve {}", args.dir.display()))?,
        wireguard: WireguardSection {
            listen_port: port,
            endpoint: args.endpoint.clone(),
            interface: args.interface,
            mtu: 1420,
            keepalive: 25,
        },
        network: NetworkSection {
            ipv6_prefix: args.ipv6_prefix.network(),
            ipv6_mode: args.ipv6_mode.into(),
            ipv4_pool: args.ipv4_pool.map(|p| p.network()),
            ipv4_mode: args.ipv4_mode.into(),
            uplink: args.uplink,
            reserved: args.reserve,
            address_hold_hours: default_address_hold_hours(),
            peer_ttl_secs: 0,
        },
        api: ApiSection {
            listen: args.api_listen,
        },
        limits: Default::default(),
        pq: PqSection {
            require_pq: args.require_pq,
            rotate_secs: args.pq_rotate_secs,
        },
        metrics: MetricsSection {
            enabled: !args.no_metrics,
            listen: args.metrics_listen,
        },
        device_login: Default::default(),
    };
    config.validate()?;
    let path = args.dir.join("relay.toml");
    if path.exists() {
        bail!(
            "{} exists already: init writes a new relay; run it with `sidecar-relay run --config {}`",
            path.display(),
            path.display()
        );
    }
    let setup = prepare(&config, args.bind_default_token).await?;
    std::fs::write(&path, config.to_commented_toml())
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());
    print_credentials(&config, &setup, true);
    println!(
        "start it with: sidecar-relay run --config {}",
        path.display()
    );
    Ok(())
}

/// Keys, certificate and store for a configuration; creates what is missing.
struct Setup {
    private_key: Key,
    identity: Identity,
    store: Store,
    pq: Arc<PqKeys>,
    machine: Arc<MachineKeys>,
    /// Set when the store had no admin token and this start made one.
    new_tokens: Option<NewTokens>,
}

struct NewTokens {
    admin: String,
    agent: String,
}

async fn prepare(config: &RelayConfig, bind_default_token: bool) -> Result<Setup> {
    create_private_dir(&config.data_dir)?;
    refuse_if_readable(&config.data_dir)?;
    refuse_if_readable(&config.wireguard_key_path())?;
    refuse_if_readable(&config.tls_key_path())?;
    let private_key = load_or_create_key(&config.wireguard_key_path())?;
    let (pq, fresh_pq) = PqKeys::load_or_create(
        &config.xwing_key_path(),
        private_key.public_key(),
        config.pq.require_pq,
        config.pq.rotate(),
    )
    .context("X-Wing key")?;
    if fresh_pq {
        tracing::info!(path = %config.xwing_key_path().display(), "generated the relay's X-Wing key");
    }
    let machine = MachineKeys::load_or_create(&config.machine_key_path()).context("machine key")?;
    let canary_key = sidecar_relay::canary::CanaryKey::load_or_create(&config.canary_key_path())
        .context("warrant canary key")?;
    tracing::info!(public_key = %canary_key.public_key(), "warrant canary key (GET /v1/canary; sign with `sidecar-relay canary sign`)");
    let host = endpoint_host(&config.wireguard.endpoint);
    let (identity, fresh_cert) = Identity::load_or_generate(
        &config.tls_cert_path(),
        &config.tls_key_path(),
        &[host.to_string()],
    )
    .context("TLS certificate")?;
    if fresh_cert {
        tracing::info!(path = %config.tls_cert_path().display(), "generated a self-signed TLS certificate");
    }
    let store = Store::open(&config.store_dir(), plan(config)).with_context(|| {
        format!(
            "cannot open the peer store in {}",
            config.store_dir().display()
        )
    })?;
    let new_tokens = if store.tokens()?.iter().any(|t| t.admin) {
        None
    } else {
        let (_, admin) = store
            .create_token(TokenSpec {
                admin: true,
                ..TokenSpec::tenant("admin", 10_000, 1_000)
            })
            .await
            .context("cannot create the admin token")?;
        let (_, agent) = store
            .create_token_with(TokenSpec::tenant("default", 100, 10), bind_default_token)
            .await
            .context("cannot create the default agent token")?;
        Some(NewTokens { admin, agent })
    };
    Ok(Setup {
        private_key,
        identity,
        store,
        pq: Arc::new(pq),
        machine: Arc::new(machine),
        new_tokens,
    })
}

fn plan(config: &RelayConfig) -> AddressPlan {
    AddressPlan {
        ipv6: config.network.ipv6_prefix,
        ipv4_pool: config.network.ipv4_pool,
        reserved: config.network.reserved.clone(),
    }
}

fn print_credentials(config: &RelayConfig, setup: &Setup, first: bool) {
    let pin = setup
        .identity
        .pin()
        .unwrap_or_else(|e| format!("(unavailable: {e})"));
    println!("relay public key: {}", setup.private_key.public_key());
    println!("wireguard endpoint: {}", config.wireguard.endpoint);
    println!(
        "addresses: {} ({:?})",
        config.network.ipv6_prefix, config.network.ipv6_mode
    );
    if let Some(pool) = config.network.ipv4_pool {
        println!("ipv4 pool: {pool} ({:?})", config.network.ipv4_mode);
    }
    println!("certificate pin: {pin}");
    println!(
        "post-quantum preshared keys: {} (rotated every {} s)",
        if config.pq.require_pq {
            "required"
        } else {
            "offered"
        },
        config.pq.rotate_secs
    );
    println!("relay X-Wing public key: {}", setup.pq.public_key_base64());
    let api = api_url(config);
    match &setup.new_tokens {
        Some(tokens) => {
            println!("admin token (shown once, stored hashed): {}", tokens.admin);
            println!("agent token \"default\" (shown once): {}", tokens.agent);
            println!();
            println!(
                "agent command line (the token goes in a file only root can read, never in argv):"
            );
            println!(
                "  (umask 077; mkdir -p /etc/sidecar; printf '%s\\n' '{}' > /etc/sidecar/agent.token)",
                tokens.agent
            );
            println!(
                "  sidecar-agent run --relay {api} --token-file /etc/sidecar/agent.token --pin '{pin}'"
            );
        }
        None if first => {}
        None => {
            println!("tokens were shown when this data directory was created; make a new agent token with");
            println!(
                "  curl --pinnedpubkey '{pin}' -k -H 'Authorization: Bearer <admin token>' -H 'Content-Type: application/json' \\\n    -d '{{\"name\":\"agent\",\"max_peers\":100,\"max_ipv4\":0}}' {api}/v1/admin/tokens"
            );
            println!("agent command line, with the agent token in /etc/sidecar/agent.token (mode 0600): sidecar-agent run --relay {api} --token-file /etc/sidecar/agent.token --pin '{pin}'");
        }
    }
}

fn api_url(config: &RelayConfig) -> String {
    let host = endpoint_host(&config.wireguard.endpoint);
    let port = config.api.listen.port();
    if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

async fn run(config_path: Option<&Path>, data_dir: &Path) -> Result<()> {
    let config = match config_path {
        Some(path) => RelayConfig::load(path)?,
        None => default_config(data_dir)?,
    };
    let setup = prepare(&config, true).await?;
    if config_path.is_none() || setup.new_tokens.is_some() {
        print_credentials(&config, &setup, false);
    }

    let dataplane = Arc::new(RelayDataPlane::start(&config, setup.private_key)?);
    let store = setup.store.clone();
    let service = PeerService::with_pq(
        store.clone(),
        dataplane.clone(),
        ServiceOptions {
            address_hold: config.network.address_hold(),
            peer_ttl: config.network.peer_ttl(),
        },
        Some(setup.pq.clone()),
    );
    if let Some(ttl) = config.network.peer_ttl() {
        if ttl < std::time::Duration::from_secs(300) {
            tracing::warn!(peer_ttl_secs = ttl.as_secs(), "peer_ttl_secs is under 5 minutes: live peers handshake every 2 minutes and may be expired while in use");
        } else {
            tracing::info!(
                peer_ttl_secs = ttl.as_secs(),
                "peers without a handshake for peer_ttl_secs are expired"
            );
        }
    }
    let restored = service.restore().await?;
    tracing::info!(
        peers = restored.peers,
        out_of_plan = restored.out_of_plan,
        "restored peers from the store"
    );

    let neighbor = start_neighbor_responder(&config, &dataplane)?;
    let uapi = sidecar::uapi::UapiServer::bind(&config.wireguard.interface, dataplane.control())
        .await
        .with_context(|| format!("cannot serve `wg show {}`", config.wireguard.interface))?;

    let state = Arc::new(
        ApiState::new(
            service.clone(),
            RelayInfo {
                public_key: setup.private_key.public_key(),
                endpoint: config.wireguard.endpoint.clone(),
                keepalive: config.wireguard.keepalive,
                mtu: config.wireguard.mtu,
                version: env!("CARGO_PKG_VERSION"),
            },
        )
        .with_prober(dataplane.prober())
        .with_machine_keys(setup.machine.clone())
        .with_canary(config.canary_path())
        .with_device_login(api::DeviceLogin::new(
            config.device_login.clone(),
            Some(api_url(&config)),
        ))
        .with_discovery(
            sidecar_relay::discovery::Discovery::new(
                &api_url(&config),
                &setup.identity.pin()?,
                env!("CARGO_PKG_VERSION"),
            )
            .map_err(anyhow::Error::msg)?,
        ),
    );
    let listener = std::net::TcpListener::bind(config.api.listen)
        .with_context(|| format!("cannot listen on {} for the control API", config.api.listen))?;
    listener.set_nonblocking(true)?;
    let tls = Arc::new(setup.identity.server_config()?);
    tracing::info!(
        api = %config.api.listen,
        wireguard_port = dataplane.listen_port(),
        interface = %config.wireguard.interface,
        "relay running"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let limits = sidecar_relay::limits::ApiLimits::new(&config.limits);
    let api_metrics = Arc::new(ApiMetrics::default());
    let metrics_task = match config.metrics.listen() {
        Some(addr) => {
            let mut rx = stop_rx.clone();
            let sources = Sources {
                store: store.clone(),
                dataplane: dataplane.clone(),
                api: api_metrics.clone(),
                limits: limits.clone(),
                neighbor: neighbor.clone(),
            };
            let task = metrics::serve(addr, sources, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .with_context(|| format!("cannot serve /metrics on {addr} ([metrics] listen)"))?;
            Some(task)
        }
        None => None,
    };
    let api_task = {
        let mut rx = stop_rx.clone();
        let installer = sidecar_relay::install::Installer::new(
            &api_url(&config),
            &setup.identity.pin()?,
            sidecar_relay::install::agent_next_to_exe().as_deref(),
        );
        if let sidecar_relay::install::Installer::Unavailable(why) = &installer {
            tracing::info!(reason = %why, "no agent installer at /install");
        }
        let router = api::router_with_metrics(state.clone(), &limits, api_metrics.clone())
            .layer(axum::Extension(Arc::new(installer)));
        tokio::spawn(async move {
            api::serve_with_limits(listener, tls, router, &limits, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
        })
    };
    let uapi_task = {
        let mut rx = stop_rx.clone();
        tokio::spawn(uapi.run(async move {
            let _ = rx.wait_for(|s| *s).await;
        }))
    };
    let periodic_task = tokio::spawn(service.clone().run_periodic());

    wait_for_signal().await?;
    // Drain: refuse registrations, let requests in flight finish, persist, exit 0.
    state.start_draining();
    let _ = stop_tx.send(true);
    match api_task.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "control API ended with an error"),
        Err(e) => tracing::warn!(error = %e, "control API task failed"),
        Ok(Ok(())) => {}
    }
    let _ = uapi_task.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    periodic_task.abort();
    let _ = periodic_task.await;
    if let Err(e) = service.sync_usage().await {
        tracing::warn!(error = %e, "cannot record usage at shutdown");
    }
    store.flush().await.context("cannot flush the peer store")?;
    drop(neighbor);
    tracing::info!("relay stopped");
    Ok(())
}

fn start_neighbor_responder(
    config: &RelayConfig,
    dataplane: &RelayDataPlane,
) -> Result<Option<Arc<NeighborResponder>>> {
    let n = &config.network;
    let v6 = n.ipv6_mode == PrefixMode::OnLink;
    let v4 = n.ipv4_pool.is_some() && n.ipv4_mode == PrefixMode::OnLink;
    let (Some(uplink), true) = (n.uplink.as_deref(), v6 || v4) else {
        return Ok(None);
    };
    let responder = NeighborResponder::start(uplink, dataplane.owned(), v6, v4)
        .with_context(|| format!("cannot answer neighbor solicitations on {uplink}"))?;
    Ok(Some(Arc::new(responder)))
}

async fn wait_for_signal() -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    Ok(())
}

/// The embedded defaults: a random ULA /64, routed (no uplink needed), remembered in
/// `DIR/relay.toml` so restarts keep the same prefix and so the same addresses.
fn default_config(data_dir: &Path) -> Result<RelayConfig> {
    let path = data_dir.join("relay.toml");
    if path.exists() {
        tracing::info!(config = %path.display(), "using the configuration saved at first start");
        return Ok(RelayConfig::load(&path)?);
    }
    let host = local_address();
    let config = RelayConfig {
        data_dir: std::path::absolute(data_dir)
            .with_context(|| format!("cannot resolve {}", data_dir.display()))?,
        wireguard: WireguardSection {
            listen_port: 51820,
            endpoint: Endpoint::Addr(SocketAddr::new(host, 51820)),
            interface: "sidecar0".into(),
            mtu: 1420,
            keepalive: 25,
        },
        network: NetworkSection {
            ipv6_prefix: random_ula_64(),
            ipv6_mode: PrefixMode::Routed,
            ipv4_pool: None,
            ipv4_mode: PrefixMode::Routed,
            uplink: None,
            reserved: Vec::new(),
            address_hold_hours: default_address_hold_hours(),
            peer_ttl_secs: 0,
        },
        api: ApiSection {
            listen: SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 8443),
        },
        limits: Default::default(),
        pq: PqSection::for_new_relay(),
        metrics: MetricsSection::default(),
        device_login: Default::default(),
    };
    config.validate()?;
    create_private_dir(data_dir)?;
    std::fs::write(&path, config.to_commented_toml())
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!(
        "first start with embedded defaults: wrote {}",
        path.display()
    );
    println!(
        "chose {} (a random unique local /64, routed: route it to this host to reach peers)",
        config.network.ipv6_prefix
    );
    Ok(config)
}

/// RFC 4193: fd00::/8 with a random 40-bit global ID and subnet 0.
fn random_ula_64() -> IpPrefix {
    let mut bytes = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes[1..6]);
    bytes[0] = 0xfd;
    IpPrefix::new(IpAddr::V6(Ipv6Addr::from(bytes)), 64).expect("64 is a valid IPv6 length")
}

/// The address this host would use towards the outside, for the endpoint that agents
/// are told; connecting a UDP socket sends nothing.
fn local_address() -> IpAddr {
    let probe = |bind: &str, to: &str| -> Option<IpAddr> {
        let s = UdpSocket::bind(bind).ok()?;
        s.connect(to).ok()?;
        s.local_addr().ok().map(|a| a.ip())
    };
    probe("0.0.0.0:0", "192.0.2.1:9")
        .or_else(|| probe("[::]:0", "[2001:db8::1]:9"))
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// The endpoint's host as a certificate and a URL name it: a name, or an address
/// without brackets.
fn endpoint_host(endpoint: &Endpoint) -> String {
    match endpoint {
        Endpoint::Addr(addr) => addr.ip().to_string(),
        Endpoint::Host { host, .. } => host.clone(),
    }
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Refuses a secret (the data directory, a private key) other users can read, as
/// ssh does: a key that leaked cannot be taken back. A missing file is fine (it is
/// about to be created 0600).
fn refuse_if_readable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        let fix = if meta.is_dir() { "700" } else { "600" };
        anyhow::bail!(
            "{} is readable by other users (mode {mode:04o}); run `chmod {fix} {}`",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

fn read_input(path: &Path) -> Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)
            .context("cannot read stdin")?;
        Ok(bytes)
    } else {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

fn canary(command: CanaryCommand) -> Result<()> {
    use sidecar_relay::canary::{Canary, CanaryKey};
    match command {
        CanaryCommand::Sign {
            statement,
            config,
            data_dir,
        } => {
            // Never the embedded defaults: signing must not create a relay.
            let path = config.unwrap_or_else(|| data_dir.join("relay.toml"));
            anyhow::ensure!(
                path.exists(),
                "no relay configuration at {} (pass --config or the --data-dir of a relay)",
                path.display()
            );
            let config = RelayConfig::load(&path)?;
            let text = String::from_utf8(read_input(&statement)?)
                .context("the statement is not UTF-8 text")?;
            let key = CanaryKey::load_or_create(&config.canary_key_path())?;
            let canary = key.sign(&text, sidecar_relay::service::unix_now())?;
            canary.store(&config.canary_path())?;
            println!(
                "signed the warrant canary at {} (Unix seconds) with canary key {}",
                canary.signed, canary.public_key
            );
            Ok(())
        }
        CanaryCommand::Verify {
            document,
            public_key,
            max_age_days,
        } => {
            let canary: Canary =
                serde_json::from_slice(&read_input(&document)?).context("not a canary document")?;
            canary.verify(public_key.as_deref())?;
            let age = sidecar_relay::service::unix_now().saturating_sub(canary.signed);
            if let Some(days) = max_age_days {
                anyhow::ensure!(
                    age <= days * 86_400,
                    "the canary was signed {} days ago, more than the {days} allowed",
                    age / 86_400
                );
            }
            println!(
                "valid: signed {} s ago (at {}) by canary key {}{}",
                age,
                canary.signed,
                canary.public_key,
                if public_key.is_none() {
                    " (compare it with the key you trust, or pass --public-key)"
                } else {
                    ""
                }
            );
            print!("{}", canary.statement);
            if !canary.statement.ends_with('\n') {
                println!();
            }
            Ok(())
        }
    }
}

fn load_or_create_key(path: &Path) -> Result<Key> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return Key::from_base64(text.trim())
            .with_context(|| format!("{} does not hold a WireGuard key", path.display()));
    }
    let key = Key::generate_private();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(file, "{}", key.to_base64())?;
    file.sync_all()?;
    tracing::info!(path = %path.display(), "generated the relay's WireGuard key");
    Ok(key)
}
