//! `sidecar-agent run`: follows Docker and gives every container labeled
//! `sidecar.enable=true` its own WireGuard peer on the relay and its own address.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder};
use bollard::Docker;
use futures_util::StreamExt;
use sidecar::driver::Driver;
use sidecar::tun::TunDevice;
use sidecar::udp::UdpTransport;
use sidecar::wg::{Device, PeerConfig};
use sidecar::{Endpoint, IpPrefix, Key};
use sidecar_proto::{Allocation, RegisterPeer};
use tokio::signal::unix::{signal, SignalKind};

use crate::container_net;
use crate::labels::{self, Labels};
use crate::relay_client::RelayClient;
use crate::state::{StateDir, StatusRow};

/// The interface name inside each container.
const CONTAINER_IFACE: &str = "sidecar0";
/// How often the status snapshot is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How long to wait before retrying a container whose setup failed transiently.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How often keys of containers that no longer exist are looked for (and their
/// registrations given back).
const COLLECT_EVERY: Duration = Duration::from_secs(60);
/// How long a container refused for the token's limits waits before asking again, when
/// no removal of ours has made room (another agent's may have, or the limit was raised).
const ROOM_RETRY: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A TUN device in the container; netstack where none can be made.
    Auto,
    /// A TUN device in the container's network namespace.
    Tun,
    /// A userspace TCP/IP stack in the agent that forwards to the container.
    Netstack,
}

pub struct Settings {
    pub relay: RelayClient,
    pub relay_url: String,
    pub docker_socket: Option<String>,
    pub state_dir: PathBuf,
    pub mode: Mode,
}

/// One container the agent looks after.
struct Managed {
    name: String,
    row: StatusRow,
    /// The data path; dropping it stops the tunnel and removes the TUN device.
    running: Option<Running>,
    /// Set after a transient failure: when to try again.
    retry_at: Option<Instant>,
}

struct Running {
    driver: Driver,
    relay_key: Key,
    /// Kept open so the namespace outlives a racing container exit until we notice;
    /// also tells whether the container still lives in it.
    netns: Option<File>,
    /// Renews the post-quantum preshared key while the tunnel runs.
    _rotation: Option<crate::pq::Rotation>,
}

pub async fn run(settings: Settings) -> Result<()> {
    let state = StateDir::open(&settings.state_dir).with_context(|| {
        format!(
            "cannot use state directory {}",
            settings.state_dir.display()
        )
    })?;
    let docker = connect_docker(settings.docker_socket.as_deref()).await?;
    let mut agent = Agent {
        settings,
        state,
        docker,
        containers: HashMap::new(),
        deregister_retry_at: None,
        waiting_for_room: HashSet::new(),
    };
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    loop {
        agent.reconcile().await;
        let mut events = agent.events();
        let mut tick = tokio::time::interval(STATUS_EVERY);
        let mut collect = tokio::time::interval(COLLECT_EVERY);
        collect.tick().await;
        loop {
            tokio::select! {
                _ = term.recv() => return agent.shutdown("SIGTERM"),
                _ = int.recv() => return agent.shutdown("SIGINT"),
                _ = tick.tick() => {
                    agent.retry_due().await;
                    if agent.deregister_retry_at.is_some_and(|t| t <= Instant::now()) {
                        agent.deregister_retry_at = None;
                        agent.collect_garbage().await;
                    }
                    agent.write_status();
                }
                _ = collect.tick() => agent.collect_garbage().await,
                event = events.next() => match event {
                    Some(Ok(e)) => agent.handle_event(e).await,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "Docker event stream failed; reconnecting");
                        break;
                    }
                    None => {
                        tracing::warn!("Docker event stream ended (daemon restart?); reconnecting");
                        break;
                    }
                },
            }
        }
        // Events fired while disconnected are lost: wait, then list and reconcile.
        tokio::time::sleep(Duration::from_secs(1)).await;
        match connect_docker(agent.settings.docker_socket.as_deref()).await {
            Ok(d) => agent.docker = d,
            Err(e) => tracing::warn!(error = %e, "cannot reconnect to Docker yet"),
        }
    }
}

async fn connect_docker(socket: Option<&str>) -> Result<Docker> {
    let docker = match socket {
        Some(path) => Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION),
        None => Docker::connect_with_unix_defaults(),
    }
    .context("cannot connect to Docker")?;
    // Older engines refuse a client that claims a newer API than theirs.
    docker
        .negotiate_version()
        .await
        .context("cannot talk to the Docker engine (is dockerd running, and is --docker right?)")
}

struct Agent {
    settings: Settings,
    state: StateDir,
    docker: Docker,
    containers: HashMap<String, Managed>,
    /// Set when a removed container's deregistration failed: when to look for stale
    /// keys again, sooner than the periodic collection.
    deregister_retry_at: Option<Instant>,
    /// Containers the relay refused because the token's limits were reached: asked
    /// again as soon as one of ours gives its registration back.
    waiting_for_room: HashSet<String>,
}

impl Agent {
    fn events(
        &self,
    ) -> impl futures_util::Stream<Item = Result<bollard::models::EventMessage, bollard::errors::Error>>
    {
        let filters = HashMap::from([
            ("type", vec!["container"]),
            ("event", vec!["start", "die", "destroy"]),
            ("label", vec!["sidecar.enable"]),
        ]);
        self.docker
            .events(Some(EventsOptionsBuilder::new().filters(&filters).build()))
    }

    /// Brings what we run in line with what Docker runs.
    async fn reconcile(&mut self) {
        let filters = HashMap::from([("label", vec!["sidecar.enable"])]);
        let list = match self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .all(false)
                    .filters(&filters)
                    .build(),
            ))
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list containers");
                return;
            }
        };
        let running: Vec<String> = list.into_iter().filter_map(|c| c.id).collect();
        let gone: Vec<String> = self
            .containers
            .keys()
            .filter(|id| !running.contains(id))
            .cloned()
            .collect();
        for id in gone {
            self.stop(&id, "no longer running");
        }
        for id in running {
            let serving = self.containers.get(&id).and_then(|m| m.running.as_ref());
            let Some(r) = serving else {
                self.start(&id).await;
                continue;
            };
            // Restarted while we were not watching (dockerd restarts containers while
            // it boots, before anyone can follow its events): the tunnel serves a dead
            // namespace that only our open handle keeps alive.
            if !self.in_namespace(&id, r).await {
                self.stop(&id, "restarted while Docker was not followed");
                self.start(&id).await;
            }
        }
        self.collect_garbage().await;
        self.write_status();
    }

    /// Whether container `id` still runs in the network namespace `r` serves. When
    /// Docker cannot tell, assume it does: tearing a working tunnel down is worse.
    async fn in_namespace(&self, id: &str, r: &Running) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let Some(held) = r.netns.as_ref().and_then(|f| f.metadata().ok()) else {
            return true;
        };
        let pid = match self.docker.inspect_container(id, None).await {
            Ok(info) => info.state.and_then(|s| s.pid).filter(|p| *p > 0),
            Err(e) => {
                tracing::debug!(container = %short(id), error = %e, "cannot inspect");
                return true;
            }
        };
        let Some(pid) = pid else {
            return true;
        };
        match std::fs::metadata(format!("/proc/{pid}/ns/net")) {
            Ok(now) => (now.dev(), now.ino()) == (held.dev(), held.ino()),
            Err(_) => true,
        }
    }

    /// Gives back the registrations of containers removed while we were not
    /// watching (or whose deregistration failed): their keys are still here.
    async fn collect_garbage(&mut self) {
        let existing = match self
            .docker
            .list_containers(Some(ListContainersOptionsBuilder::new().all(true).build()))
            .await
        {
            Ok(list) => list.into_iter().filter_map(|c| c.id).collect::<Vec<_>>(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot list containers to collect stale keys");
                return;
            }
        };
        let ids = match self.state.key_ids() {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list container keys");
                return;
            }
        };
        for id in ids {
            if !existing.contains(&id) {
                self.destroy(&id).await;
            }
        }
    }

    async fn handle_event(&mut self, event: bollard::models::EventMessage) {
        let Some(id) = event.actor.as_ref().and_then(|a| a.id.clone()) else {
            return;
        };
        match event.action.as_deref() {
            Some("start") => self.start(&id).await,
            Some("die") => self.stop(&id, "container stopped"),
            Some("destroy") => self.destroy(&id).await,
            _ => {}
        }
        self.write_status();
    }

    async fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .containers
            .iter()
            .filter(|(_, m)| m.running.is_none() && m.retry_at.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.start(&id).await;
        }
    }

    async fn start(&mut self, id: &str) {
        let began = Instant::now();
        match self.set_up(id).await {
            Ok(Some(managed)) => {
                tracing::info!(
                    container = %short(id),
                    name = %managed.name,
                    ipv6 = ?managed.row.ipv6,
                    ipv4 = ?managed.row.ipv4,
                    mode = ?managed.row.mode,
                    took_ms = began.elapsed().as_millis() as u64,
                    "container is reachable at its public address"
                );
                self.containers.insert(id.to_string(), managed);
                self.waiting_for_room.remove(id);
            }
            Ok(None) => {}
            Err(failure) => {
                tracing::warn!(container = %short(id), error = %failure.error, "container not set up");
                let entry = self
                    .containers
                    .entry(id.to_string())
                    .or_insert_with(|| Managed {
                        name: failure.name.clone(),
                        row: StatusRow {
                            container: id.to_string(),
                            name: failure.name.clone(),
                            ..StatusRow::default()
                        },
                        running: None,
                        retry_at: None,
                    });
                entry.running = None;
                entry.row.state = "error".into();
                entry.row.error = Some(failure.error.clone());
                entry.retry_at = if failure.waits_for_room {
                    Some(Instant::now() + ROOM_RETRY)
                } else {
                    (!failure.permanent).then(|| Instant::now() + RETRY_AFTER)
                };
                if failure.waits_for_room {
                    self.waiting_for_room.insert(id.to_string());
                } else {
                    self.waiting_for_room.remove(id);
                }
            }
        }
    }

    /// Inspects, registers and wires up one container. `Ok(None)`: not ours.
    async fn set_up(&self, id: &str) -> Result<Option<Managed>, SetupFailure> {
        let info = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(|e| SetupFailure::transient("", format!("cannot inspect: {e}")))?;
        let name = info
            .name
            .clone()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string();
        let fail = |permanent: bool, e: String| SetupFailure {
            name: name.clone(),
            error: e,
            permanent,
            waits_for_room: false,
        };
        let label_map = info
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let labels = Labels::parse(&label_map).map_err(|e| fail(true, e.to_string()))?;
        if !labels.enable {
            return Ok(None);
        }
        if !labels.accepts_relay(&self.settings.relay_url) {
            return Err(fail(
                true,
                format!(
                    "label {} asks for relay {:?}; this agent serves {}",
                    labels::RELAY,
                    labels.relay.as_deref().unwrap_or_default(),
                    self.settings.relay_url
                ),
            ));
        }
        if let Some(asked) = labels.bandwidth_mbps {
            // The relay shapes to the token's limit anyway; a label above it promises
            // what cannot be delivered, so say so instead of pretending.
            let status = self.settings.relay.status().await.map_err(|e| {
                fail(
                    e.is_permanent(),
                    format!("cannot read the token's limits: {e}"),
                )
            })?;
            if let Some(limit) = status.limits.bandwidth_mbps.filter(|l| asked > *l) {
                return Err(fail(
                    true,
                    format!(
                        "label {}={asked} is above the token's limit of {limit} Mbit/s",
                        labels::BANDWIDTH
                    ),
                ));
            }
        }
        let pid = info
            .state
            .as_ref()
            .and_then(|s| s.pid)
            .filter(|p| *p > 0)
            .ok_or_else(|| fail(false, "container is not running".into()))?;
        // Open the namespace first: the pid can go away while we register.
        let netns = File::open(format!("/proc/{pid}/ns/net")).map_err(|e| {
            fail(
                false,
                format!("cannot open the container's network namespace: {e}"),
            )
        })?;
        let key = self
            .state
            .container_key(id)
            .map_err(|e| fail(false, format!("cannot read or create its key: {e}")))?;
        let mut request = RegisterPeer {
            pubkey: key.public_key(),
            ipv4: labels.ipv4,
            name: (!name.is_empty()).then(|| name.clone()),
            container: Some(id.to_string()),
        };
        let mut note = None;
        let pq_reg = match self.settings.relay.register_pq(&request).await {
            // The relay has no IPv4 to give: serve IPv6 and say why IPv4 is missing.
            Err(e) if request.ipv4 && e.is_ipv4_unavailable() => {
                tracing::warn!(container = %short(id), error = %e, "no IPv4 from this relay; serving IPv6 only");
                note = Some(format!(
                    "label {}=true not honoured: {e}; IPv6 only",
                    labels::IPV4
                ));
                request.ipv4 = false;
                self.settings.relay.register_pq(&request).await
            }
            other => other,
        }
        .map_err(|e| SetupFailure {
            waits_for_room: is_quota_exceeded(&e),
            ..fail(e.is_permanent(), format!("registration failed: {e}"))
        })?;
        let alloc = pq_reg.allocation;
        let (addrs, relay_key, endpoint) = parse_allocation(&alloc)
            .await
            .map_err(|e| fail(false, e.to_string()))?;
        let device = Arc::new(Device::with_private_key(key));
        let mut peer = PeerConfig::new(relay_key);
        peer.preshared_key = pq_reg.psk.map(sidecar_proto::pq::Psk::to_key);
        let rotation = pq_reg.rotate.map(|every| {
            crate::pq::spawn(
                self.settings.relay.clone(),
                device.clone(),
                request.clone(),
                relay_key,
                every,
            )
        });
        peer.endpoint = Some(endpoint);
        peer.persistent_keepalive = Some(alloc.keepalive).filter(|k| *k > 0);
        peer.allowed_ips = vec![
            "::/0".parse().expect("literal"),
            "0.0.0.0/0".parse().expect("literal"),
        ];
        device.set_peer(&peer);
        if let Some(mbps) = labels.bandwidth_mbps {
            device.set_peer_rate(&relay_key, Some(mbps));
        }
        let socket = UdpTransport::bind(0)
            .map_err(|e| fail(false, format!("cannot open a UDP socket: {e}")))?;

        let tun = match self.settings.mode {
            Mode::Tun | Mode::Auto => {
                match container_net::create_in_namespace(&netns, CONTAINER_IFACE, alloc.mtu, &addrs)
                {
                    Ok(t) => Some(t),
                    Err(e) if self.settings.mode == Mode::Auto && tun_unavailable(&e) => {
                        tracing::info!(container = %short(id), error = %e, "no TUN device possible in the container; using netstack mode");
                        None
                    }
                    Err(e) => {
                        return Err(fail(
                            false,
                            format!("cannot create the TUN device in the container: {e}"),
                        ))
                    }
                }
            }
            Mode::Netstack => None,
        };
        let (driver, mode) = match tun {
            Some(t) => {
                let tun = TunDevice::from_sync(t.device, CONTAINER_IFACE, alloc.mtu, t.offload)
                    .map_err(|e| fail(false, format!("cannot drive the TUN device: {e}")))?;
                (Driver::start(device, Arc::new(tun), socket), "tun")
            }
            None => {
                let targets = container_addresses(&info);
                let netstack = crate::netstack_link::start(&addrs, targets, alloc.mtu)
                    .map_err(|e| fail(false, format!("cannot start netstack mode: {e}")))?;
                (Driver::start(device, netstack, socket), "netstack")
            }
        };
        Ok(Some(Managed {
            name: name.clone(),
            row: StatusRow {
                container: id.to_string(),
                name,
                state: "active".into(),
                ipv6: Some(IpPrefix::host(alloc.ipv6.into()).to_string()),
                ipv4: alloc.ipv4.map(|a| IpPrefix::host(a.into()).to_string()),
                mode: Some(mode.into()),
                error: note,
                ..StatusRow::default()
            },
            running: Some(Running {
                driver,
                relay_key,
                netns: Some(netns),
                _rotation: rotation,
            }),
            retry_at: None,
        }))
    }

    /// The container stopped: its namespace (and TUN device) is gone; stop the tunnel.
    fn stop(&mut self, id: &str, why: &str) {
        if let Some(m) = self.containers.get_mut(id) {
            if let Some(running) = m.running.take() {
                running.driver.stop();
                tracing::info!(container = %short(id), name = %m.name, why, "tunnel stopped");
            }
            m.row.state = "stopped".into();
            m.row.error = None;
            m.retry_at = None;
        }
    }

    /// The container is gone for good: give its address back and forget its key.
    async fn destroy(&mut self, id: &str) {
        self.stop(id, "container removed");
        self.waiting_for_room.remove(id);
        let name = self
            .containers
            .remove(id)
            .map(|m| m.name)
            .unwrap_or_default();
        let key = match self.state.existing_key(id) {
            Ok(Some(key)) => key,
            // Never registered by us.
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(container = %short(id), error = %e, "cannot read its key");
                return;
            }
        };
        if let Err(e) = self.settings.relay.deregister(key.public_key()).await {
            // The key stays, so the next collection tries again.
            tracing::warn!(container = %short(id), error = %e, "cannot deregister from the relay yet");
            self.deregister_retry_at = Some(Instant::now() + RETRY_AFTER);
            return;
        }
        if let Err(e) = self.state.remove_key(id) {
            tracing::warn!(container = %short(id), error = %e, "cannot remove its key");
        }
        tracing::info!(container = %short(id), %name, "deregistered");
        self.retry_waiting_for_room();
    }

    /// A registration was given back: the containers refused for the limits may fit now.
    fn retry_waiting_for_room(&mut self) {
        let now = Instant::now();
        for id in &self.waiting_for_room {
            if let Some(m) = self.containers.get_mut(id) {
                // A container stopped meanwhile is set up when it starts again.
                if m.running.is_none() && m.row.state == "error" {
                    m.retry_at = Some(now);
                }
            }
        }
    }

    fn write_status(&mut self) {
        let mut rows: Vec<StatusRow> = Vec::new();
        for m in self.containers.values_mut() {
            if let Some(r) = &m.running {
                let device = r.driver.device();
                if let Some(p) = device.peer(&r.relay_key) {
                    m.row.latest_handshake = device
                        .last_handshake(&p, Instant::now(), SystemTime::now())
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map(|d| d.as_secs());
                    m.row.rx_bytes = p.rx_bytes();
                    m.row.tx_bytes = p.tx_bytes();
                }
            }
            rows.push(m.row.clone());
        }
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        if let Err(e) = self.state.write_status(&rows) {
            tracing::warn!(error = %e, "cannot write the status file");
        }
    }

    /// Stops every tunnel; registrations stay so addresses come back on restart.
    fn shutdown(mut self, signal: &str) -> Result<()> {
        tracing::info!(signal, containers = self.containers.len(), "shutting down");
        let ids: Vec<String> = self.containers.keys().cloned().collect();
        for id in ids {
            self.stop(&id, "agent stopping");
        }
        self.write_status();
        Ok(())
    }
}

struct SetupFailure {
    name: String,
    error: String,
    permanent: bool,
    /// Refused for the token's limits: worth asking again once there is room.
    waits_for_room: bool,
}

impl SetupFailure {
    fn transient(name: &str, error: String) -> SetupFailure {
        SetupFailure {
            name: name.to_string(),
            error,
            permanent: false,
            waits_for_room: false,
        }
    }
}

/// The relay refused because the token's peer or IPv4 limit is reached.
fn is_quota_exceeded(e: &crate::relay_client::ClientError) -> bool {
    matches!(e, crate::relay_client::ClientError::Api { code, .. } if code == "quota_exceeded")
}

/// Addresses to assign, the relay's key and its WireGuard endpoint.
async fn parse_allocation(alloc: &Allocation) -> Result<(Vec<IpPrefix>, Key, SocketAddr)> {
    let mut addrs = vec![IpPrefix::host(alloc.ipv6.into())];
    addrs.extend(alloc.ipv4.map(|v4| IpPrefix::host(v4.into())));
    let endpoint = match &alloc.relay_endpoint {
        Endpoint::Addr(addr) => *addr,
        Endpoint::Host { host, port } => tokio::net::lookup_host((host.as_str(), *port))
            .await
            .with_context(|| format!("cannot resolve the relay endpoint {}", alloc.relay_endpoint))?
            .next()
            .ok_or_else(|| anyhow!("relay endpoint {} has no address", alloc.relay_endpoint))?,
    };
    Ok((addrs, alloc.relay_public_key, endpoint))
}

/// The container's own addresses on its Docker networks (netstack forwards there).
fn container_addresses(
    info: &bollard::models::ContainerInspectResponse,
) -> (Option<IpAddr>, Option<IpAddr>) {
    let mut v4 = None;
    let mut v6 = None;
    let networks = info
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref());
    for net in networks.into_iter().flat_map(|n| n.values()) {
        if v4.is_none() {
            v4 = net.ip_address.as_deref().and_then(|a| a.parse().ok());
        }
        if v6.is_none() {
            v6 = net
                .global_ipv6_address
                .as_deref()
                .and_then(|a| a.parse().ok());
        }
    }
    (v6, v4)
}

/// The errors that mean "this host cannot make a TUN device there", as opposed to
/// a real failure.
fn tun_unavailable(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM)
            | Some(libc::EACCES)
            | Some(libc::ENOENT)
            | Some(libc::ENODEV)
            | Some(libc::EOPNOTSUPP)
    )
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// `sidecar-agent status`.
pub fn print_status(state_dir: &std::path::Path) -> Result<()> {
    let state = StateDir::open(state_dir)?;
    let rows = state.read_status().with_context(|| {
        format!(
            "no status in {} (is `sidecar-agent run` running with this --state-dir?)",
            state_dir.display()
        )
    })?;
    let age = std::fs::metadata(state.status_path())
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok());
    println!(
        "{:<20} {:<10} {:<42} {:<18} {:<9} {:<16} {:>12} {:>12}",
        "NAME", "STATE", "IPV6", "IPV4", "MODE", "HANDSHAKE", "BYTES IN", "BYTES OUT"
    );
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for r in &rows {
        let handshake = match r.latest_handshake {
            Some(t) => format!("{}s ago", now.saturating_sub(t)),
            None => "never".into(),
        };
        println!(
            "{:<20} {:<10} {:<42} {:<18} {:<9} {:<16} {:>12} {:>12}",
            truncate(&r.name, 20),
            r.state,
            r.ipv6.as_deref().unwrap_or("-"),
            r.ipv4.as_deref().unwrap_or("-"),
            r.mode.as_deref().unwrap_or("-"),
            handshake,
            r.rx_bytes,
            r.tx_bytes
        );
        if let Some(e) = &r.error {
            println!("    error: {e}");
        }
    }
    if let Some(age) = age.filter(|a| *a > Duration::from_secs(10)) {
        println!(
            "(snapshot is {}s old: the agent may not be running)",
            age.as_secs()
        );
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}
