//! One labeled container, looked after by a task of its own: set up when it starts,
//! torn down when it stops, given back when it is removed, and in between its
//! registration checked with the relay on a period (and at once when the tunnel has
//! gone quiet), registered again when the relay lost it.
//!
//! Each container's relay calls happen in its own task, so a relay that does not
//! answer delays only that container; the supervisor never waits for one.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context as _, Result};
use sidecar::driver::Driver;
use sidecar::tun::TunDevice;
use sidecar::udp::UdpTransport;
use sidecar::wg::{Device, PeerConfig};
use sidecar::{Endpoint, IpPrefix, Key};
use sidecar_proto::{Allocation, RegisterPeer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::sleep_until;

use crate::container_net;
use crate::labels::{self, Labels};
use crate::relay_client::ClientError;
use crate::shared::{short, unix_now, Counters, Mode, Shared};
use crate::state::{KeyError, StatusRow};

/// The interface name inside each container.
const CONTAINER_IFACE: &str = "sidecar0";
/// How long to wait before retrying a container whose setup failed transiently.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How long a container refused for the token's limits waits before asking again, when
/// no removal of ours has made room (another agent's may have, or the limit was raised).
const ROOM_RETRY: Duration = Duration::from_secs(60);
/// How often the tunnel's handshake age is looked at.
const WATCH_EVERY: Duration = Duration::from_secs(5);
/// A session is renewed every 120 s (REKEY_AFTER_TIME) while keepalives flow, and a
/// renewal takes a few attempts of 5 s at worst; older than this, the relay has most
/// likely stopped answering for this key.
const STALE_HANDSHAKE: Duration = Duration::from_secs(135);
/// After a failed check, the next one comes this soon.
const CHECK_RETRY: Duration = Duration::from_secs(10);
/// A quiet tunnel triggers a check at most this often.
const STALE_CHECK_GAP: Duration = Duration::from_secs(15);

/// What the supervisor tells a container's task.
#[derive(Debug)]
pub enum Command {
    /// Docker says it runs (an event, or a reconcile): serve it.
    Start,
    /// It stopped: its namespace is gone.
    Stop(&'static str),
    /// It is gone for good: give its address back and forget its key.
    Destroy,
}

/// How often each container's registration is verified with the relay.
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    pub check_every: Duration,
}

/// Starts the task for container `id`.
pub fn spawn(
    shared: Arc<Shared>,
    id: String,
    liveness: Liveness,
) -> (mpsc::UnboundedSender<Command>, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = Task {
        room: shared.room.subscribe(),
        shared,
        id,
        name: String::new(),
        liveness,
        running: None,
        retry_at: None,
        waiting_for_room: false,
        next_check: Instant::now(),
        next_watch: Instant::now(),
        last_check: None,
    };
    (tx, tokio::spawn(task.run(rx)))
}

struct Task {
    shared: Arc<Shared>,
    id: String,
    name: String,
    liveness: Liveness,
    /// The data path; dropping it stops the tunnel and removes the TUN device.
    running: Option<Running>,
    /// Set after a transient failure: when to try again.
    retry_at: Option<Instant>,
    /// Refused for the token's limits: asked again when one of ours is given back.
    waiting_for_room: bool,
    room: tokio::sync::watch::Receiver<u64>,
    next_check: Instant,
    next_watch: Instant,
    last_check: Option<Instant>,
}

struct Running {
    driver: Driver,
    /// What was registered, to register it again unchanged.
    request: RegisterPeer,
    alloc: Allocation,
    peer: PeerConfig,
    bandwidth_mbps: Option<u32>,
    /// The emulated conditions the labels ask for (`shape` may override them).
    label_conditions: Option<sidecar::netem::Conditions>,
    /// The container's own endpoint, while the tunnel runs.
    _api: Option<crate::container_api::ContainerApi>,
    /// Kept open so the namespace outlives a racing container exit until we notice;
    /// also tells whether the container still lives in it.
    netns: Option<File>,
    since: Instant,
    /// Renews the post-quantum preshared key while the tunnel runs.
    _rotation: Option<crate::pq::Rotation>,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        loop {
            let deadline = self.deadline();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Start) => self.start().await,
                    Some(Command::Stop(why)) => self.stop(why),
                    Some(Command::Destroy) => return self.destroy().await,
                    None => return self.stop("agent stopping"),
                },
                _ = sleep_until(deadline.into()) => self.on_timer().await,
                Ok(()) = self.room.changed(), if self.waiting_for_room => {
                    if self.running.is_none() {
                        self.start().await;
                    }
                }
            }
        }
    }

    fn deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        if self.running.is_some() {
            self.next_check.min(self.next_watch)
        } else {
            self.retry_at.unwrap_or(far)
        }
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        let Some(r) = &self.running else {
            if self.retry_at.is_some_and(|t| t <= now) {
                self.start().await;
            }
            return;
        };
        if now >= self.next_check {
            return self.check().await;
        }
        self.next_watch = now + WATCH_EVERY;
        let quiet_for = handshake_age(r).unwrap_or_else(|| now.saturating_duration_since(r.since));
        let since_check = self.last_check.map(|t| now.saturating_duration_since(t));
        if quiet_needs_check(quiet_for, since_check) {
            tracing::info!(container = %short(&self.id), name = %self.name, "no handshake for longer than a rekey; checking the registration");
            self.check().await;
        }
    }

    async fn start(&mut self) {
        if let Some(r) = &self.running {
            // Restarted while we were not watching (dockerd restarts containers while
            // it boots, before anyone can follow its events): the tunnel serves a dead
            // namespace that only our open handle keeps alive.
            if self.in_namespace(r).await {
                return;
            }
            self.stop("restarted while Docker was not followed");
        }
        let began = Instant::now();
        let outcome = {
            let shared = self.shared.clone();
            let _permit = shared.in_flight.acquire().await;
            self.set_up().await
        };
        match outcome {
            Ok(None) => {}
            Ok(Some((running, row))) => {
                tracing::info!(
                    container = %short(&self.id),
                    name = %self.name,
                    ipv6 = ?row.ipv6,
                    ipv4 = ?row.ipv4,
                    mode = ?row.mode,
                    took_ms = began.elapsed().as_millis() as u64,
                    "container is reachable at its public address"
                );
                let live = (running.driver.device().clone(), running.peer.public_key);
                self.shared.update(&self.id, |e| {
                    let reregistrations = e.row.reregistrations;
                    e.row = StatusRow {
                        reregistrations,
                        ..row
                    };
                    // Again under the rows' lock: a `shape` that came in during
                    // setup found no tunnel to change and left its wish here.
                    live.0
                        .set_peer_conditions(&live.1, e.conditions(running.label_conditions));
                    e.live = Some(live);
                });
                self.running = Some(running);
                self.retry_at = None;
                self.waiting_for_room = false;
                self.next_check = Instant::now() + self.liveness.check_every;
                self.next_watch = Instant::now() + WATCH_EVERY;
            }
            Err(failure) => {
                Counters::bump(&self.shared.counters.errors);
                tracing::warn!(container = %short(&self.id), error = %failure.error, "container not set up");
                self.shared.update(&self.id, |e| {
                    if !self.name.is_empty() {
                        e.row.name = self.name.clone();
                    }
                    e.row.state = "error".into();
                    e.row.error = Some(failure.error.clone());
                    e.live = None;
                });
                self.retry_at = if failure.waits_for_room {
                    Some(Instant::now() + ROOM_RETRY)
                } else {
                    (!failure.permanent).then(|| Instant::now() + RETRY_AFTER)
                };
                self.waiting_for_room = failure.waits_for_room;
                if self.waiting_for_room {
                    // Only removals from now on count as room.
                    self.room.mark_unchanged();
                }
            }
        }
        self.shared.write_status();
    }

    /// Whether the container still runs in the network namespace `r` serves. When
    /// Docker cannot tell, assume it does: tearing a working tunnel down is worse.
    async fn in_namespace(&self, r: &Running) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let Some(held) = r.netns.as_ref().and_then(|f| f.metadata().ok()) else {
            return true;
        };
        let pid = match self.shared.docker().inspect_container(&self.id, None).await {
            Ok(info) => info.state.and_then(|s| s.pid).filter(|p| *p > 0),
            Err(e) => {
                tracing::debug!(container = %short(&self.id), error = %e, "cannot inspect");
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

    /// Inspects, registers and wires up the container. `Ok(None)`: not ours.
    async fn set_up(&mut self) -> Result<Option<(Running, StatusRow)>, SetupFailure> {
        let shared = self.shared.clone();
        let id = self.id.clone();
        let info = shared
            .docker()
            .inspect_container(&id, None)
            .await
            .map_err(|e| SetupFailure::transient(format!("cannot inspect: {e}")))?;
        let name = info
            .name
            .clone()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string();
        self.name = name.clone();
        let fail = |permanent: bool, e: String| SetupFailure {
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
        // Shown at once, so a relay that is slow to answer leaves a visible trace.
        shared.update(&id, |e| {
            e.row.name = name.clone();
            if e.live.is_none() {
                e.row.state = "starting".into();
            }
        });
        shared.write_status();
        if !labels.accepts_relay(&shared.relay_url) {
            return Err(fail(
                true,
                format!(
                    "label {} asks for relay {:?}; this agent serves {}",
                    labels::RELAY,
                    labels.relay.as_deref().unwrap_or_default(),
                    shared.relay_url
                ),
            ));
        }
        if let Some(asked) = labels.bandwidth_mbps {
            // The relay shapes to the token's limit anyway; a label above it promises
            // what cannot be delivered, so say so instead of pretending.
            let status = shared.relay.status().await.map_err(|e| {
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
        let key = match shared.state.container_key(&id) {
            Ok(key) => key,
            Err(e @ KeyError::Damaged { .. }) => {
                return Err(fail(true, self.give_back_damaged(&e).await));
            }
            Err(e) => return Err(fail(true, format!("cannot read or create its key: {e}"))),
        };
        let mut request = RegisterPeer {
            pubkey: key.public_key(),
            ipv4: labels.ipv4,
            name: (!name.is_empty()).then(|| name.clone()),
            container: Some(id.clone()),
        };
        let mut note = None;
        let registration = match shared.relay.register_pq(&request).await {
            // The relay has no IPv4 to give: serve IPv6 and say why IPv4 is missing.
            Err(e) if request.ipv4 && e.is_ipv4_unavailable() => {
                tracing::warn!(container = %short(&id), error = %e, "no IPv4 from this relay; serving IPv6 only");
                note = Some(format!(
                    "label {}=true not honoured: {e}; IPv6 only",
                    labels::IPV4
                ));
                request.ipv4 = false;
                shared.relay.register_pq(&request).await
            }
            other => other,
        }
        .map_err(|e| SetupFailure {
            waits_for_room: is_quota_exceeded(&e),
            ..fail(e.is_permanent(), format!("registration failed: {e}"))
        })?;
        Counters::bump(&shared.counters.registrations);
        let alloc = registration.allocation;
        let (addrs, endpoint) = parse_allocation(&alloc)
            .await
            .map_err(|e| fail(false, e.to_string()))?;
        let device = Arc::new(Device::with_private_key(key));
        let mut peer = peer_config(&alloc, endpoint);
        peer.preshared_key = registration.psk.map(sidecar_proto::pq::Psk::to_key);
        device.set_peer(&peer);
        let rotation = registration.rotate.map(|every| {
            crate::pq::spawn(
                shared.relay.clone(),
                device.clone(),
                request.clone(),
                alloc.relay_public_key,
                every,
            )
        });
        if let Some(mbps) = labels.bandwidth_mbps {
            device.set_peer_rate(&alloc.relay_public_key, Some(mbps));
        }
        device.set_peer_conditions(
            &alloc.relay_public_key,
            shared.conditions_for(&id, labels.conditions),
        );
        let socket = UdpTransport::bind(0)
            .map_err(|e| fail(false, format!("cannot open a UDP socket: {e}")))?;

        let mut mode_reason = match shared.mode {
            Mode::Auto => {
                container_net::tun_unseen_reason(&netns, &ips(container_addresses(&info)))
            }
            _ => None,
        };
        let tun = match shared.mode {
            Mode::Auto if mode_reason.is_some() => {
                tracing::info!(container = %short(&id), reason = mode_reason.as_deref(), "using netstack mode");
                None
            }
            Mode::Tun | Mode::Auto => {
                match container_net::create_in_namespace(
                    &netns,
                    CONTAINER_IFACE,
                    alloc.mtu,
                    &addrs,
                    labels.egress,
                ) {
                    Ok(t) => Some(t),
                    Err(e) if shared.mode == Mode::Auto && tun_unavailable(&e) => {
                        tracing::info!(container = %short(&id), error = %e, "no TUN device possible in the container; using netstack mode");
                        mode_reason = Some(format!("no TUN device possible in the container: {e}"));
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
                if let Some(version) = labels.proxy_protocol {
                    // The container sees each client's own address in TUN mode; a
                    // header would only garble the stream.
                    tracing::warn!(container = %short(&id), ?version, "{} is ignored in TUN mode, where clients' addresses reach the container unchanged", labels::PROXY_PROTOCOL);
                }
                (Driver::start(device, Arc::new(tun), socket), "tun")
            }
            None => {
                if alloc.ipv4.is_some() && labels.egress == container_net::Egress::Tunnel {
                    // Without a device in the container there is no route to give it:
                    // the stack here only answers what arrives at the public addresses.
                    tracing::info!(container = %short(&id), "in netstack mode the container's own outgoing IPv4 leaves through Docker's networking, not from its /32");
                }
                let targets = container_addresses(&info);
                let netstack =
                    crate::netstack_link::start(&addrs, targets, alloc.mtu, labels.proxy_protocol)
                        .map_err(|e| fail(false, format!("cannot start netstack mode: {e}")))?;
                (Driver::start(device, netstack, socket), "netstack")
            }
        };
        let api = if labels.api {
            match crate::container_api::start(&netns, shared.clone(), id.clone()) {
                Ok(api) => Some(api),
                Err(e) => {
                    let why = format!(
                        "{}: cannot listen on 127.0.0.1:{} in the container: {e}",
                        labels::API,
                        crate::container_api::PORT
                    );
                    tracing::warn!(container = %short(&id), "{why}");
                    note = Some(note.map_or(why.clone(), |n| format!("{n}; {why}")));
                    None
                }
            }
        } else {
            None
        };
        let row = StatusRow {
            container: id.clone(),
            name,
            state: "active".into(),
            ipv6: Some(IpPrefix::host(alloc.ipv6.into()).to_string()),
            ipv4: alloc.ipv4.map(|a| IpPrefix::host(a.into()).to_string()),
            mode: Some(mode.into()),
            mode_reason,
            error: note,
            ..StatusRow::default()
        };
        Ok(Some((
            Running {
                driver,
                request,
                alloc,
                peer,
                bandwidth_mbps: labels.bandwidth_mbps,
                label_conditions: labels.conditions,
                _api: api,
                netns: Some(netns),
                since: Instant::now(),
                _rotation: rotation,
            },
            row,
        )))
    }

    /// A key that cannot be read back: the relay may still hold an address for the
    /// key it once was. Find that registration by container and give it back, and
    /// move the damaged file aside so the container's next start begins afresh.
    async fn give_back_damaged(&self, e: &KeyError) -> String {
        let shared = &self.shared;
        let released = match shared.relay.peer_by_container(&self.id).await {
            Ok(Some(view)) => match shared.relay.deregister(view.pubkey).await {
                Ok(()) => {
                    shared.room_freed();
                    format!("its registration ({}) was given back", view.ipv6)
                }
                Err(d) => format!("its registration could not be given back yet: {d}"),
            },
            Ok(None) => "the relay holds no registration for it".to_string(),
            Err(d) => format!("cannot ask the relay for its registration: {d}"),
        };
        let aside = match shared.state.set_aside_key(&self.id) {
            Ok(path) => format!("the file was moved to {}", path.display()),
            Err(m) => format!("the file could not be moved aside: {m}"),
        };
        tracing::error!(container = %short(&self.id), error = %e, %released, %aside, "damaged key");
        format!("{e}; {released}; {aside}; restart the container to give it a new key and address")
    }

    /// Asks the relay whether it still holds this container's registration; what it
    /// lost is registered again (same key, so the same address where it can).
    async fn check(&mut self) {
        let Some(r) = &self.running else { return };
        let ours = r.peer_key_public();
        let now = Instant::now();
        self.last_check = Some(now);
        self.next_check = now + self.liveness.check_every;
        let found = {
            let _permit = self.shared.in_flight.acquire().await;
            self.shared.relay.peer_by_container(&self.id).await
        };
        match found {
            Ok(Some(view)) if view.pubkey == ours => {
                self.shared.update(&self.id, |e| {
                    e.row.last_check = Some(unix_now());
                    e.row.up = Some(view.up);
                    e.row.externally_reachable = Some(view.externally_reachable);
                    if e.row.error.as_deref().is_some_and(is_check_error) {
                        e.row.error = None;
                    }
                });
            }
            Ok(other) => {
                let why = match other {
                    None => "the relay no longer has this container's registration",
                    Some(_) => "the relay holds another key for this container",
                };
                tracing::warn!(container = %short(&self.id), name = %self.name, why, "registering again");
                self.reregister().await;
            }
            Err(e) => {
                Counters::bump(&self.shared.counters.errors);
                tracing::warn!(container = %short(&self.id), error = %e, "cannot check the registration");
                self.shared.update(&self.id, |en| {
                    en.row.last_check = Some(unix_now());
                    en.row.up = None;
                    en.row.externally_reachable = None;
                    en.row.error = Some(format!("{CHECK_ERROR}{e}"));
                });
                // Sooner than the period: the relay may be back (or the token file
                // replaced) in a moment.
                self.next_check = now + CHECK_RETRY.min(self.liveness.check_every);
            }
        }
        self.shared.write_status();
    }

    async fn reregister(&mut self) {
        let Some(r) = &self.running else { return };
        let result = {
            let _permit = self.shared.in_flight.acquire().await;
            self.shared.relay.register_pq(&r.request).await
        };
        let (alloc, psk) = match result {
            Ok(registration) => (
                registration.allocation,
                registration.psk.map(sidecar_proto::pq::Psk::to_key),
            ),
            Err(e) => {
                Counters::bump(&self.shared.counters.errors);
                tracing::warn!(container = %short(&self.id), error = %e, "cannot register again yet");
                self.shared.update(&self.id, |en| {
                    en.row.last_check = Some(unix_now());
                    en.row.error = Some(format!("{CHECK_ERROR}registering again failed: {e}"));
                });
                self.next_check = Instant::now() + RETRY_AFTER;
                return;
            }
        };
        if !alloc.created {
            // The relay had it all along (by-container named another key for this
            // container): the tunnel is fine as it is.
            tracing::warn!(container = %short(&self.id), name = %self.name, "the relay still holds this container's registration beside another key's; keeping the tunnel");
            self.shared.update(&self.id, |e| {
                e.row.last_check = Some(unix_now());
            });
            return;
        }
        Counters::bump(&self.shared.counters.registrations);
        Counters::bump(&self.shared.counters.reregistrations);
        self.shared.update(&self.id, |e| {
            e.row.reregistrations += 1;
            e.row.last_check = Some(unix_now());
            e.row.up = Some(false);
            e.row.externally_reachable = Some(false);
        });
        let same = alloc.ipv6 == r.alloc.ipv6
            && alloc.ipv4 == r.alloc.ipv4
            && alloc.relay_public_key == r.alloc.relay_public_key
            && alloc.relay_endpoint == r.alloc.relay_endpoint
            && alloc.mtu == r.alloc.mtu;
        if same {
            // The relay knows the key again but not our session: drop ours, so the
            // next packet (the keepalive sent right away) starts a handshake, under
            // the preshared key of this registration.
            if let Some(r) = &mut self.running {
                r.peer.preshared_key = psk;
                let device = r.driver.device();
                device.remove_peer(&r.peer.public_key);
                device.set_peer(&r.peer);
                if let Some(mbps) = r.bandwidth_mbps {
                    device.set_peer_rate(&r.peer.public_key, Some(mbps));
                }
                device.set_peer_conditions(
                    &r.peer.public_key,
                    self.shared.conditions_for(&self.id, r.label_conditions),
                );
                r.since = Instant::now();
            }
            tracing::info!(container = %short(&self.id), name = %self.name, ipv6 = %alloc.ipv6, "registered again; tunnel rebuilt");
        } else {
            tracing::info!(container = %short(&self.id), name = %self.name, ipv6 = %alloc.ipv6, "registered again with a new allocation; setting the container up again");
            self.stop("allocation changed");
            self.start().await;
        }
    }

    /// The container stopped: its namespace (and TUN device) is gone; stop the tunnel.
    fn stop(&mut self, why: &str) {
        if let Some(running) = self.running.take() {
            running.driver.stop();
            tracing::info!(container = %short(&self.id), name = %self.name, why, "tunnel stopped");
        }
        self.retry_at = None;
        self.waiting_for_room = false;
        self.shared.update(&self.id, |e| {
            e.row.state = "stopped".into();
            e.row.error = None;
            e.row.up = None;
            e.row.externally_reachable = None;
            e.live = None;
        });
    }

    /// The container is gone for good: give its address back and forget its key.
    /// A relay that cannot be reached is asked again until it answers.
    async fn destroy(mut self) {
        self.stop("container removed");
        self.shared.forget(&self.id);
        self.shared.write_status();
        loop {
            let key = match self.shared.state.existing_key(&self.id) {
                Ok(Some(key)) => key,
                // Never registered by us.
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(container = %short(&self.id), error = %e, "cannot read its key");
                    return;
                }
            };
            let result = {
                let _permit = self.shared.in_flight.acquire().await;
                self.shared.relay.deregister(key.public_key()).await
            };
            match result {
                Ok(()) => {
                    if let Err(e) = self.shared.state.remove_key(&self.id) {
                        tracing::warn!(container = %short(&self.id), error = %e, "cannot remove its key");
                    }
                    tracing::info!(container = %short(&self.id), name = %self.name, "deregistered");
                    self.shared.room_freed();
                    return;
                }
                Err(e) => {
                    Counters::bump(&self.shared.counters.errors);
                    // The key stays, so a later collection tries again too.
                    tracing::warn!(container = %short(&self.id), error = %e, "cannot deregister from the relay yet");
                    if e.is_permanent() {
                        return;
                    }
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
    }
}

impl Running {
    fn peer_key_public(&self) -> Key {
        self.request.pubkey
    }
}

/// Errors of the liveness check start with this, so a good check clears only them.
const CHECK_ERROR: &str = "liveness check: ";

fn is_check_error(e: &str) -> bool {
    e.starts_with(CHECK_ERROR)
}

/// Whether a tunnel without a handshake for `quiet_for` (the last check
/// `since_check` ago) is worth asking the relay about now.
fn quiet_needs_check(quiet_for: Duration, since_check: Option<Duration>) -> bool {
    quiet_for > STALE_HANDSHAKE && since_check.is_none_or(|d| d >= STALE_CHECK_GAP)
}

fn handshake_age(r: &Running) -> Option<Duration> {
    let device = r.driver.device();
    let peer = device.peer(&r.peer.public_key)?;
    let wall = SystemTime::now();
    let at = device.last_handshake(&peer, Instant::now(), wall)?;
    wall.duration_since(at).ok()
}

fn peer_config(alloc: &Allocation, endpoint: SocketAddr) -> PeerConfig {
    let mut peer = PeerConfig::new(alloc.relay_public_key);
    peer.endpoint = Some(endpoint);
    peer.persistent_keepalive = Some(alloc.keepalive).filter(|k| *k > 0);
    peer.allowed_ips = vec![
        "::/0".parse().expect("literal"),
        "0.0.0.0/0".parse().expect("literal"),
    ];
    peer
}

struct SetupFailure {
    error: String,
    permanent: bool,
    /// Refused for the token's limits: worth asking again once there is room.
    waits_for_room: bool,
}

impl SetupFailure {
    fn transient(error: String) -> SetupFailure {
        SetupFailure {
            error,
            permanent: false,
            waits_for_room: false,
        }
    }
}

/// The relay refused because the token's peer or IPv4 limit is reached.
fn is_quota_exceeded(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { code, .. } if code == "quota_exceeded")
}

/// Addresses to assign and the relay's WireGuard endpoint.
async fn parse_allocation(alloc: &Allocation) -> Result<(Vec<IpPrefix>, SocketAddr)> {
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
    Ok((addrs, endpoint))
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

fn ips((v6, v4): (Option<IpAddr>, Option<IpAddr>)) -> Vec<IpAddr> {
    v6.into_iter().chain(v4).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_quiet_past_a_rekey_is_checked_but_not_hammered() {
        let s = Duration::from_secs;
        // Sessions renew every 120 s while keepalives flow: no reason to ask.
        assert!(!quiet_needs_check(s(100), None));
        assert!(!quiet_needs_check(s(130), Some(s(60))));
        // Longer than a rekey and its retries: ask at once.
        assert!(quiet_needs_check(s(140), None));
        assert!(quiet_needs_check(s(140), Some(s(20))));
        // But not again right after a check.
        assert!(!quiet_needs_check(s(400), Some(s(5))));
    }
}
