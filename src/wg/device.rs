//! The peer table: many peers behind one UDP socket, and what the device is made of.
//!
//! [`Device`] is a sans-IO state machine, fed and drained: inputs
//! ([`Device::handle_packet`], [`Device::handle_datagram`], [`Device::handle_timeout`])
//! carry the time and write their immediate result into the caller's buffer; whatever
//! else they caused (packets a new session releases, timer datagrams, shaped packets,
//! ICMP answers) waits in the device until [`Device::poll_transmit`] and
//! [`Device::poll_deliver`] drain it, and [`Device::poll_timeout`] says when the next
//! [`Device::handle_timeout`] is due. No clock reads, no I/O, no callbacks. All methods
//! take `&self`, so one task can encrypt while another decrypts; each peer's noise
//! state has its own lock.
//!
//! This file holds the table and its configuration; the data path is in `send.rs`
//! and `receive.rs`, the timers in `timers.rs`, the drained outputs in `outbox.rs`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use parking_lot::{Mutex, RwLock};

use super::allowed_ips::AllowedIps;
use super::clock::{Deadline, FedClock};
use super::config::{
    DeviceConfig, DeviceUpdate, NoiseBackend, PeerConfig, PeerInfo, PeerUpdate, UpdateError,
};
use super::emulation::NetemQueue;
use super::metrics::{Counters, DropReason};
use super::outbox::Outbox;
use super::peer::{Peer, PeerRef};
use super::policy::Policy;
use super::session::StaticKeys;
use super::shaping::ShapeQueue;
use crate::key::Key;
use crate::netem::Conditions;
use crate::shape::Shaper;

/// Destination unreachable answers to packets for unallocated addresses: enough for
/// a sender to learn quickly, too few to make the relay a reflector.
const UNREACHABLE_PER_SECOND: NonZeroU32 = NonZeroU32::new(100).unwrap();
const UNREACHABLE_BURST: NonZeroU32 = NonZeroU32::new(20).unwrap();

/// The smallest output buffer any call may need: a handshake initiation.
pub const MIN_OUT_BUF: usize = 148;

/// Bytes a data packet grows by when encrypted (header and tag).
pub const DATA_OVERHEAD: usize = 32;

/// The immediate result of an input, in the caller's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Output<'a> {
    /// Send `datagram` to `to`.
    Transmit { to: SocketAddr, datagram: &'a [u8] },
    /// Write this decrypted packet to the link (TUN device or userspace stack).
    Deliver(&'a [u8]),
    /// Taken in: a keepalive arrived, a cookie was stored, the packet waits for a
    /// handshake or in a shaping queue, or an answer waits for [`Device::poll_deliver`].
    Consumed,
    /// Dropped for this reason (already counted).
    Dropped(DropReason),
}

/// One datagram [`Device::poll_transmit`] wrote into the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub len: usize,
}

pub(crate) type FedLimiter = RateLimiter<NotKeyed, InMemoryState, FedClock, NoOpMiddleware<Nanos>>;

#[derive(Default)]
pub(crate) struct State {
    pub(crate) keys: Option<Arc<StaticKeys>>,
    pub(crate) peers: HashMap<Key, PeerRef>,
    pub(crate) by_index: HashMap<u32, PeerRef>,
    pub(crate) routes: AllowedIps<PeerRef>,
    pub(crate) fwmark: u32,
    pub(crate) policy: Option<Arc<dyn Policy>>,
}

/// The WireGuard device: identity, peers and cryptokey routing.
pub struct Device {
    pub(crate) state: RwLock<State>,
    pub(crate) clock: FedClock,
    pub(crate) counters: Counters,
    pub(crate) outbox: Outbox,
    /// Shaped packets towards peers and from them.
    pub(crate) egress: ShapeQueue,
    pub(crate) ingress: ShapeQueue,
    /// Packets an emulated delay holds, towards peers and from them.
    pub(crate) netem_egress: NetemQueue,
    pub(crate) netem_ingress: NetemQueue,
    /// When [`Device::handle_timeout`] is next due for the protocol's timers.
    pub(crate) timers_due: Deadline,
    /// Destination unreachable answers, shared by all peers.
    pub(crate) unreachable_limit: FedLimiter,
    pub(crate) noise_backend: NoiseBackend,
    /// One moment on the wall and the monotonic clock, for the handshake timestamps
    /// of every private key this device is given.
    wall: SystemTime,
    anchor: Instant,
    /// Counts private key changes: a noise state made from keys read before a change
    /// must not be installed after it (see [`Device::install_noise`]).
    pub(crate) key_epoch: AtomicU64,
    /// The peers the timers must visit: those with a noise state, a persistent
    /// keepalive or a kick, by index. Changed only under the peer's noise lock.
    pub(crate) live: Mutex<HashMap<u32, PeerRef>>,
}

impl Default for Device {
    fn default() -> Self {
        Device::new()
    }
}

impl Device {
    /// A device without a private key, running our noise backend. Reads the wall and
    /// the monotonic clock once (see [`DeviceConfig::wall`]); [`Device::with_config`]
    /// takes them from the caller instead.
    pub fn new() -> Device {
        Device::with_config(&DeviceConfig {
            private_key: None,
            ..DeviceConfig::new(Key([0; 32]))
        })
    }

    pub fn with_config(config: &DeviceConfig) -> Device {
        let clock = FedClock::default();
        let device = Device {
            state: RwLock::new(State::default()),
            unreachable_limit: RateLimiter::direct_with_clock(
                Quota::per_second(UNREACHABLE_PER_SECOND).allow_burst(UNREACHABLE_BURST),
                clock.clone(),
            ),
            clock,
            counters: Counters::default(),
            outbox: Outbox::default(),
            egress: ShapeQueue::default(),
            ingress: ShapeQueue::default(),
            netem_egress: NetemQueue::default(),
            netem_ingress: NetemQueue::default(),
            timers_due: Deadline::default(),
            noise_backend: config.noise_backend,
            wall: config.wall,
            anchor: config.anchor,
            key_epoch: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
        };
        if let Some(key) = config.private_key.filter(|k| !k.is_zero()) {
            device.state.write().keys = Some(Arc::new(device.static_keys(key)));
        }
        device
    }

    /// A device with `private` and our noise backend (see [`Device::new`] on clocks).
    pub fn with_private_key(private: Key) -> Device {
        Device::with_config(&DeviceConfig::new(private))
    }

    pub fn noise_backend(&self) -> NoiseBackend {
        self.noise_backend
    }

    fn static_keys(&self, private: Key) -> StaticKeys {
        StaticKeys::new(private, self.noise_backend, self.wall, self.anchor)
    }

    pub fn private_key(&self) -> Option<Key> {
        self.state.read().keys.as_ref().map(|k| k.private())
    }

    pub fn public_key(&self) -> Option<Key> {
        self.state.read().keys.as_ref().map(|k| k.public())
    }

    pub fn fwmark(&self) -> u32 {
        self.state.read().fwmark
    }

    pub fn peer_count(&self) -> usize {
        self.state.read().peers.len()
    }

    pub fn peer(&self, key: &Key) -> Option<PeerRef> {
        self.state.read().peers.get(key).cloned()
    }

    /// Puts `policy` in the data path (or takes it out), for packets from now on.
    pub fn set_policy(&self, policy: Option<Arc<dyn Policy>>) {
        self.state.write().policy = policy;
    }

    /// Adds or replaces a peer with exactly this configuration.
    pub fn set_peer(&self, config: &PeerConfig) {
        let mut state = self.state.write();
        self.apply_peer(&mut state, &PeerUpdate::replace_with(config));
        if config.endpoint.is_none() {
            if let Some(peer) = state.peers.get(&config.public_key) {
                *peer.endpoint.write() = None;
            }
        }
    }

    pub fn remove_peer(&self, key: &Key) -> bool {
        self.remove_peer_locked(&mut self.state.write(), key)
    }

    /// Applies a change with the semantics of the WireGuard userspace API. The listen
    /// port is not the device's business (the caller owns the socket) and is ignored.
    pub fn apply(&self, update: &DeviceUpdate) -> Result<(), UpdateError> {
        let mut state = self.state.write();
        if let Some(key) = update.private_key {
            self.set_private_key_locked(&mut state, key);
        }
        if let Some(mark) = update.fwmark {
            state.fwmark = mark;
        }
        if update.replace_peers {
            state.peers.clear();
            state.by_index.clear();
            state.routes.clear();
            self.live.lock().clear();
        }
        for peer in &update.peers {
            self.apply_peer(&mut state, peer);
        }
        Ok(())
    }

    fn set_private_key_locked(&self, state: &mut State, key: Key) {
        if key.is_zero() {
            state.keys = None;
        } else if state.keys.as_ref().map(|k| k.private()) == Some(key) {
            return;
        } else {
            let keys = self.static_keys(key);
            // A peer with our own public key makes no sense; the reference
            // implementations drop it.
            let own = keys.public();
            if self.remove_peer_locked(state, &own) {
                tracing::warn!(peer = %own, "removed the peer whose public key is the device's own");
            }
            state.keys = Some(Arc::new(keys));
        }
        // Every session belonged to the old key; new states are made at first need.
        // The epoch moves first, so a state made from the old keys on another thread
        // and installed after this loop passed its peer is refused.
        self.key_epoch.fetch_add(1, Ordering::AcqRel);
        for peer in state.peers.values() {
            *peer.noise.lock() = None;
        }
    }

    fn remove_peer_locked(&self, state: &mut State, key: &Key) -> bool {
        match state.peers.remove(key) {
            Some(peer) => {
                self.live.lock().remove(&peer.index);
                state.by_index.remove(&peer.index);
                state.routes.remove_value(&peer);
                true
            }
            None => false,
        }
    }

    fn apply_peer(&self, state: &mut State, update: &PeerUpdate) {
        let key = update.public_key;
        if update.remove {
            self.remove_peer_locked(state, &key);
            return;
        }
        if state.keys.as_ref().map(|k| k.public()) == Some(key) {
            tracing::warn!(peer = %key, "ignoring a peer whose public key is the device's own");
            return;
        }
        let peer = match state.peers.get(&key) {
            Some(p) => p.clone(),
            None if update.update_only => return,
            None => {
                let index = Self::free_index(state);
                let peer = PeerRef(Arc::new(Peer::new(key, index)));
                *peer.preshared_key.write() = update.preshared_key.filter(|k| !k.is_zero());
                state.peers.insert(key, peer.clone());
                state.by_index.insert(index, peer.clone());
                peer
            }
        };
        if let Some(psk) = update.preshared_key {
            let psk = Some(psk).filter(|k| !k.is_zero());
            let mut current = peer.preshared_key.write();
            if *current != psk {
                *current = psk;
                drop(current);
                // Ours keeps its sessions and uses the new key from the next handshake
                // on. boringtun's cannot change it: drop the state, and kick so the
                // next timer run handshakes at once instead of after the rekey timeout.
                let now = self
                    .clock
                    .instant(self.clock.latest())
                    .unwrap_or(self.anchor);
                let mut noise = peer.noise.lock();
                let kept = noise.as_mut().is_none_or(|n| n.set_preshared_key(now, psk));
                if !kept {
                    *noise = None;
                    drop(noise);
                    self.kick(&peer);
                }
            }
        }
        if let Some(ep) = update.endpoint {
            *peer.endpoint.write() = Some(ep);
        }
        if let Some(secs) = update.persistent_keepalive {
            peer.keepalive.store(u32::from(secs), Ordering::Relaxed);
            if secs != 0 {
                // Like the kernel: turning persistent keepalive on sends one right away.
                self.kick(&peer);
            }
        }
        if update.replace_allowed_ips {
            state.routes.remove_value(&peer);
        }
        for prefix in &update.allowed_ips {
            state.routes.insert(*prefix, peer.clone());
        }
    }

    /// Has the next [`Device::handle_timeout`] send `peer` a keepalive (a handshake
    /// first if it has no session), and makes that run due at once.
    fn kick(&self, peer: &PeerRef) {
        peer.kick.store(true, Ordering::Relaxed);
        self.live.lock().insert(peer.index, peer.clone());
        self.timers_due.lower(0);
    }

    fn free_index(state: &State) -> u32 {
        loop {
            let candidate = rand_core::RngCore::next_u32(&mut rand_core::OsRng) & 0x00ff_ffff;
            if candidate != 0 && !state.by_index.contains_key(&candidate) {
                return candidate;
            }
        }
    }

    /// Every peer's configuration and counters; `now` and `wall` are one moment on the
    /// monotonic and the wall clock, to date handshakes.
    pub fn peers(&self, now: Instant, wall: SystemTime) -> Vec<PeerInfo> {
        let state = self.state.read();
        let mut out: Vec<PeerInfo> = state
            .peers
            .values()
            .map(|p| self.info_of(&state, p, now, wall))
            .collect();
        out.sort_by_key(|p| p.config.public_key);
        out
    }

    /// One peer's configuration and counters.
    pub fn peer_info(&self, key: &Key, now: Instant, wall: SystemTime) -> Option<PeerInfo> {
        let state = self.state.read();
        state
            .peers
            .get(key)
            .map(|p| self.info_of(&state, p, now, wall))
    }

    /// When `peer`'s latest handshake completed, on the wall clock.
    pub fn last_handshake(
        &self,
        peer: &Peer,
        now: Instant,
        wall: SystemTime,
    ) -> Option<SystemTime> {
        // The live session knows best; once its state is dropped, what the device noted.
        let live = peer
            .noise
            .lock()
            .as_ref()
            .and_then(|n| n.last_handshake(now));
        wall.checked_sub(live.or_else(|| peer.handshake_age(&self.clock, now))?)
    }

    fn info_of(&self, state: &State, p: &PeerRef, now: Instant, wall: SystemTime) -> PeerInfo {
        let mut allowed_ips: Vec<_> = state.routes.prefixes_of(p).collect();
        allowed_ips.sort();
        PeerInfo {
            config: PeerConfig {
                public_key: p.public_key,
                preshared_key: *p.preshared_key.read(),
                endpoint: p.endpoint(),
                persistent_keepalive: p.persistent_keepalive(),
                allowed_ips,
            },
            last_handshake: self.last_handshake(p, now, wall),
            rx_bytes: p.rx_bytes(),
            tx_bytes: p.tx_bytes(),
            rx_dropped_source: p.rx_dropped_source(),
        }
    }

    /// The peer whose allowed IPs hold `dst`.
    pub fn route(&self, dst: IpAddr) -> Option<PeerRef> {
        self.state.read().routes.lookup(dst).cloned()
    }

    /// Limits `key`'s traffic in both directions to `mbps`, or lifts the limit.
    /// Returns false if there is no such peer.
    pub fn set_peer_rate(&self, key: &Key, mbps: Option<u32>) -> bool {
        let Some(peer) = self.peer(key) else {
            return false;
        };
        let current = peer.shaper().map(|s| s.bits_per_sec());
        let wanted = mbps.map(|m| u64::from(m) * 1_000_000);
        if current != wanted {
            *peer.shaper.write() = mbps.map(|m| Arc::new(Shaper::from_mbps(m, &self.clock)));
        }
        true
    }

    /// Emulates a network between us and `key` (latency and jitter added to each
    /// direction, loss drawn in each direction independently), or stops doing so
    /// (`None`). Takes effect for the next packet; packets already held keep their
    /// release times. Returns false if there is no such peer.
    pub fn set_peer_conditions(&self, key: &Key, conditions: Option<Conditions>) -> bool {
        let Some(peer) = self.peer(key) else {
            return false;
        };
        peer.netem.set(self.public_key().as_ref(), key, conditions);
        true
    }

    /// The conditions emulated for `key`, if any.
    pub fn peer_conditions(&self, key: &Key) -> Option<Conditions> {
        self.peer(key)?.netem.conditions()
    }
}
