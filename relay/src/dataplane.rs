//! The relay's data plane: the engine on the WireGuard port, one TUN device towards
//! the kernel, a route per peer address into it, and kernel forwarding between the
//! TUN device and the uplink. Which packets may cross between peers, the host and
//! its networks is decided in the data path by [`TenantPolicy`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use parking_lot::RwLock;
use sidecar::driver::Driver;
use sidecar::tun::TunDevice;
use sidecar::udp::UdpTransport;
use sidecar::wg::{Device, DeviceConfig, DeviceControl, DeviceUpdate, PeerUpdate};
use sidecar::{route, IpPrefix, Key};

use crate::config::{PrefixMode, RelayConfig};
use crate::policy::TenantPolicy;
use crate::probe::{ProbeLink, Prober};

/// Metric of the routes that send the whole prefix and pool into the TUN device:
/// above every usual route, so a peer's /128 or /32 and an uplink's on-link route
/// win, and what is left (addresses no peer holds) reaches the data path, which
/// answers it instead of the kernel sending it back towards the router.
const UNALLOCATED_METRIC: u32 = 4242;

/// A peer as the data plane needs it: its key, its addresses and its tenant's rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    pub public_key: Key,
    pub ipv6: Ipv6Addr,
    pub ipv4: Option<Ipv4Addr>,
    pub tenant: Tenant,
    /// Per-direction cap; `None` (or 0) is unshaped.
    pub bandwidth_mbps: Option<u32>,
    /// The post-quantum preshared key; `None` clears it.
    pub preshared_key: Option<sidecar_proto::pq::Psk>,
}

/// Who a peer belongs to, for isolation between tenants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    /// The token id.
    pub id: String,
    /// Peers of this tenant cannot reach each other either.
    pub isolate_peers: bool,
}

impl PeerEntry {
    pub fn new(peer: &crate::store::PeerRecord, token: &crate::store::TokenRecord) -> PeerEntry {
        PeerEntry {
            public_key: peer.public_key,
            ipv6: peer.ipv6,
            ipv4: peer.ipv4,
            tenant: Tenant {
                id: token.id.clone(),
                isolate_peers: token.isolate_peers,
            },
            bandwidth_mbps: token.bandwidth_mbps,
            preshared_key: None,
        }
    }

    /// The same entry with its preshared key.
    pub fn with_psk(self, preshared_key: Option<sidecar_proto::pq::Psk>) -> PeerEntry {
        PeerEntry {
            preshared_key,
            ..self
        }
    }

    fn prefixes(&self) -> Vec<IpPrefix> {
        let mut v = vec![IpPrefix::host(IpAddr::V6(self.ipv6))];
        if let Some(v4) = self.ipv4 {
            v.push(IpPrefix::host(IpAddr::V4(v4)));
        }
        v
    }
}

/// The addresses currently handed out, for the neighbor responder.
#[derive(Default)]
pub struct OwnedAddresses {
    v6: RwLock<HashSet<Ipv6Addr>>,
    v4: RwLock<HashSet<Ipv4Addr>>,
}

impl OwnedAddresses {
    pub fn owns_v6(&self, a: Ipv6Addr) -> bool {
        self.v6.read().contains(&a)
    }
    pub fn owns_v4(&self, a: Ipv4Addr) -> bool {
        self.v4.read().contains(&a)
    }
    fn insert(&self, a: IpAddr) {
        match a {
            IpAddr::V6(a) => self.v6.write().insert(a),
            IpAddr::V4(a) => self.v4.write().insert(a),
        };
    }
    fn remove(&self, a: IpAddr) {
        match a {
            IpAddr::V6(a) => self.v6.write().remove(&a),
            IpAddr::V4(a) => self.v4.write().remove(&a),
        };
    }
}

pub struct RelayDataPlane {
    driver: Driver,
    /// The relay's own echo probe through the tunnels (`None` without CAP_NET_RAW).
    prober: Option<Arc<Prober>>,
    ifindex: u32,
    owned: Arc<OwnedAddresses>,
    policy: Arc<TenantPolicy>,
    /// Each peer's token, to sum the engine's per-peer counters per token.
    tokens: Tokens,
}

/// One token's peers on the data plane and their engine counters, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenTotals {
    /// Peers of this token on the data plane now.
    pub peers: u64,
    /// Handshakes completed, bytes received and sent: of the peers on the data
    /// plane now plus those taken off it since start, so the sums never go back.
    pub handshakes: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Default)]
struct Tokens {
    by_peer: RwLock<HashMap<Key, String>>,
    /// What peers taken off the data plane had counted, per token.
    retired: parking_lot::Mutex<HashMap<String, TokenTotals>>,
}

impl RelayDataPlane {
    /// Turns on forwarding, binds the WireGuard port and creates the TUN device.
    /// Must run inside a tokio runtime.
    pub fn start(config: &RelayConfig, private_key: Key) -> Result<RelayDataPlane> {
        enable_forwarding(config.network.uplink.as_deref())?;
        let socket = UdpTransport::bind(config.wireguard.listen_port).with_context(|| {
            format!(
                "cannot listen on WireGuard UDP port {}",
                config.wireguard.listen_port
            )
        })?;
        let name = &config.wireguard.interface;
        let tun = TunDevice::create(name, config.wireguard.mtu).with_context(|| {
            format!(
                "cannot create TUN interface {name} (needs root or CAP_NET_ADMIN and /dev/net/tun)"
            )
        })?;
        let ifindex = tun
            .if_index()
            .context("cannot read the TUN interface index")?;
        let n = &config.network;
        let prefixes: Vec<IpPrefix> = std::iter::once(n.ipv6_prefix).chain(n.ipv4_pool).collect();
        let policy = Arc::new(TenantPolicy::new(
            prefixes.clone(),
            n.uplink.clone(),
            ifindex,
        ));
        policy
            .refresh()
            .context("cannot read the host's addresses and routes for tenant isolation")?;
        policy
            .follow_host()
            .context("cannot follow the host's route changes")?;
        let mut device_config = DeviceConfig::new(private_key);
        if let Ok(backend) = std::env::var("SIDECAR_NOISE") {
            device_config.noise_backend = backend.parse().context("SIDECAR_NOISE")?;
        }
        let device = Arc::new(Device::with_config(&device_config));
        device.set_policy(Some(policy.clone()));
        let prober = match Prober::new(n.ipv6_prefix) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the echo probe's raw socket (needs CAP_NET_RAW); by-container reports externally_reachable false");
                None
            }
        };
        let driver = match &prober {
            Some(p) => Driver::start(device, Arc::new(ProbeLink::new(tun, p.clone())), socket),
            None => Driver::start(device, Arc::new(tun), socket),
        };
        for prefix in prefixes {
            let mode = if prefix.is_ipv4() {
                n.ipv4_mode
            } else {
                n.ipv6_mode
            };
            route_unallocated(prefix, mode, n.uplink.as_deref(), ifindex);
        }
        Ok(RelayDataPlane {
            driver,
            prober,
            ifindex,
            owned: Arc::new(OwnedAddresses::default()),
            policy,
            tokens: Tokens::default(),
        })
    }

    /// The relay's echo probe, when it could be set up.
    pub fn prober(&self) -> Option<Arc<Prober>> {
        self.prober.clone()
    }

    /// The tenant isolation in the data path.
    pub fn policy(&self) -> &Arc<TenantPolicy> {
        &self.policy
    }

    pub fn device(&self) -> &Arc<Device> {
        self.driver.device()
    }

    pub fn control(&self) -> Arc<dyn DeviceControl> {
        self.driver.control()
    }

    pub fn owned(&self) -> Arc<OwnedAddresses> {
        self.owned.clone()
    }

    pub fn listen_port(&self) -> u16 {
        self.driver.listen_port()
    }

    /// Puts a registered peer on the data plane (or refreshes it), keeping any live
    /// session and learned endpoint.
    pub fn add(&self, peer: &PeerEntry) {
        let bandwidth_mbps = peer.bandwidth_mbps;
        let addrs = peer.prefixes();
        let before = self.prefixes_of(&peer.public_key);
        // The policy knows the peer before any packet of it can pass.
        self.policy.insert(peer);
        let mut update = PeerUpdate::new(peer.public_key);
        update.replace_allowed_ips = true;
        update.allowed_ips = addrs.clone();
        // In the same update as the peer itself, so it never exists without its key.
        // The zero key clears one a peer no longer registers with.
        update.preshared_key = Some(peer.preshared_key.map_or(Key([0; 32]), |p| p.to_key()));
        if let Err(e) = self.device().apply(&DeviceUpdate {
            peers: vec![update],
            ..Default::default()
        }) {
            tracing::error!(peer = %peer.public_key, error = %e, "cannot add peer to the data plane");
            return;
        }
        self.device()
            .set_peer_rate(&peer.public_key, bandwidth_mbps.filter(|m| *m > 0));
        self.tokens
            .by_peer
            .write()
            .insert(peer.public_key, peer.tenant.id.clone());
        for &prefix in &addrs {
            match route::add_route(prefix, self.ifindex, None) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    tracing::error!(%prefix, error = %e, "cannot route peer address to the TUN device")
                }
            }
            self.owned.insert(prefix.addr());
        }
        // A re-registration can re-address a peer: retire what it no longer has.
        for stale in before.into_iter().filter(|p| !addrs.contains(p)) {
            self.unroute(stale);
        }
        tracing::info!(peer = %peer.public_key, ipv6 = %peer.ipv6, ipv4 = ?peer.ipv4, bandwidth_mbps = ?bandwidth_mbps, pq = peer.preshared_key.is_some(), "peer on the data plane");
    }

    /// Takes a peer off the data plane: no more traffic, routes and neighbor answers gone.
    pub fn remove(&self, key: &Key) {
        let prefixes = self.prefixes_of(key);
        self.retire_counters(key);
        self.device().remove_peer(key);
        self.policy.remove(key);
        for prefix in prefixes {
            self.unroute(prefix);
        }
        tracing::info!(peer = %key, "peer off the data plane");
    }

    /// Keeps what a peer leaving the data plane counted in its token's sums.
    fn retire_counters(&self, key: &Key) {
        let Some(token) = self.tokens.by_peer.write().remove(key) else {
            return;
        };
        let Some(peer) = self.device().peer(key) else {
            return;
        };
        let mut retired = self.tokens.retired.lock();
        let t = retired.entry(token).or_default();
        t.handshakes += peer.handshakes();
        t.rx_bytes += peer.rx_bytes();
        t.tx_bytes += peer.tx_bytes();
    }

    /// The engine's per-peer counters summed per token (bounded by the number of
    /// tokens, not of peers), sorted by token id.
    pub fn token_totals(&self) -> BTreeMap<String, TokenTotals> {
        let mut out: BTreeMap<String, TokenTotals> = self
            .tokens
            .retired
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), TokenTotals { peers: 0, ..*v }))
            .collect();
        for (key, token) in self.tokens.by_peer.read().iter() {
            let Some(peer) = self.device().peer(key) else {
                continue;
            };
            let t = out.entry(token.clone()).or_default();
            t.peers += 1;
            t.handshakes += peer.handshakes();
            t.rx_bytes += peer.rx_bytes();
            t.tx_bytes += peer.tx_bytes();
        }
        out
    }

    fn prefixes_of(&self, key: &Key) -> Vec<IpPrefix> {
        self.device()
            .peer_info(key, Instant::now(), SystemTime::now())
            .map(|p| p.config.allowed_ips)
            .unwrap_or_default()
    }

    fn unroute(&self, prefix: IpPrefix) {
        self.owned.remove(prefix.addr());
        if let Err(e) = route::delete_route(prefix, self.ifindex) {
            tracing::debug!(%prefix, error = %e, "route already gone");
        }
    }

    /// Where the peer was last seen, if anywhere.
    pub fn endpoint(&self, key: &Key) -> Option<std::net::SocketAddr> {
        self.device().peer(key)?.endpoint()
    }

    /// Restores the endpoint a peer had before a restart, so traffic for it starts
    /// a handshake towards it at once (its NAT mapping is usually still open).
    pub fn restore_endpoint(&self, key: &Key, endpoint: std::net::SocketAddr) {
        let mut update = PeerUpdate::new(*key);
        update.update_only = true;
        update.endpoint = Some(endpoint);
        let _ = self.device().apply(&DeviceUpdate {
            peers: vec![update],
            ..Default::default()
        });
    }

    /// (last handshake as unix seconds, rx bytes, tx bytes)
    pub fn stats(&self, key: &Key) -> Option<(Option<u64>, u64, u64)> {
        let peer = self.device().peer(key)?;
        let handshake = self
            .device()
            .last_handshake(&peer, Instant::now(), SystemTime::now())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        Some((handshake, peer.rx_bytes(), peer.tx_bytes()))
    }
}

/// Sends `prefix` into the TUN device below every other route (see
/// [`UNALLOCATED_METRIC`]). An on-link prefix that an on-link route of the uplink
/// already covers is left to that route: the kernel asks the link for unallocated
/// addresses, nobody answers, and it drops them itself; a TUN route there would be
/// more specific than the link's and take the router's own address away.
fn route_unallocated(prefix: IpPrefix, mode: PrefixMode, uplink: Option<&str>, ifindex: u32) {
    if mode == PrefixMode::OnLink {
        let uplink = uplink.and_then(|u| route::interface_index(u).ok());
        let covered = route::dump_routes().unwrap_or_default().iter().any(|r| {
            r.table == route::MAIN_TABLE
                && r.gateway.is_none()
                && uplink.is_some_and(|u| r.oifs == [u])
                && r.dst.len() <= prefix.len()
                && r.dst.contains(prefix.addr())
        });
        if covered {
            tracing::debug!(%prefix, "unallocated addresses are left to the uplink's on-link route");
            return;
        }
    }
    match route::add_route(prefix, ifindex, Some(UNALLOCATED_METRIC)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            tracing::warn!(%prefix, error = %e, "cannot route the prefix into the TUN device; packets for unallocated addresses may loop towards the router")
        }
    }
}

/// Forwarding in this network namespace only. With IPv6 forwarding on, the kernel
/// stops accepting router advertisements unless `accept_ra` is 2, which would drop
/// a SLAAC-configured uplink's default route: keep it.
fn enable_forwarding(uplink: Option<&str>) -> Result<()> {
    if let Some(uplink) = uplink {
        let ra = format!("/proc/sys/net/ipv6/conf/{uplink}/accept_ra");
        if std::path::Path::new(&ra).exists() {
            std::fs::write(&ra, "2").with_context(|| format!("cannot write {ra}"))?;
        } else {
            anyhow::bail!("uplink interface {uplink} does not exist");
        }
    }
    for path in [
        "/proc/sys/net/ipv6/conf/all/forwarding",
        "/proc/sys/net/ipv4/ip_forward",
    ] {
        std::fs::write(path, "1").with_context(|| format!("cannot enable forwarding ({path})"))?;
    }
    Ok(())
}

impl crate::neighbor::OwnedAddresses for OwnedAddresses {
    fn owns_v6(&self, a: Ipv6Addr) -> bool {
        OwnedAddresses::owns_v6(self, a)
    }
    fn owns_v4(&self, a: Ipv4Addr) -> bool {
        OwnedAddresses::owns_v4(self, a)
    }
}
