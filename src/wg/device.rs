//! The peer table: many peers behind one UDP socket.
//!
//! Sans-IO: [`Device::encapsulate`] and [`Device::decapsulate`] take a packet or a
//! datagram and a buffer and say what to do with the result; the caller owns the
//! socket and the tunnel device. All methods take `&self`, so one task can encrypt
//! while another decrypts; each peer's noise state has its own lock.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter as HandshakeGate;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::{Mutex, RwLock};

use super::allowed_ips::AllowedIps;
use super::config::{DeviceUpdate, PeerConfig, PeerInfo, PeerUpdate, UpdateError};
use super::peer::{Peer, PeerRef};
use super::policy::{PacketInfo, Policy, Verdict};
use crate::key::Key;
use crate::shape::{Admit, Lane, Shaper};

/// Handshake messages per second before the device starts demanding cookies
/// (the same threshold as the reference implementations).
const HANDSHAKES_PER_SECOND_BEFORE_LOAD: u64 = 100;

/// Destination unreachable answers to packets for unallocated addresses: enough for
/// a sender to learn quickly, too few to make the relay a reflector.
const UNREACHABLE_PER_SECOND: NonZeroU32 = NonZeroU32::new(100).unwrap();
const UNREACHABLE_BURST: NonZeroU32 = NonZeroU32::new(20).unwrap();

/// How often each policy drop reason may be logged.
const DROP_LOG_INTERVAL_MS: u64 = 1_000;

/// The smallest output buffer any call may need: a handshake initiation.
pub const MIN_OUT_BUF: usize = 148;

/// Bytes a data packet grows by when encrypted (header and tag).
pub const DATA_OVERHEAD: usize = 32;

/// What to do with the result of a call.
#[derive(Debug)]
pub enum Action<'a> {
    /// Send `datagram` to `to`.
    Send { to: SocketAddr, datagram: &'a [u8] },
    /// Send `datagram` to `to`, then call [`Device::drain_queue`] for `peer` until it
    /// returns `None`: a new session may release packets that waited for it.
    SendThenDrain {
        to: SocketAddr,
        datagram: &'a [u8],
        peer: PeerRef,
    },
    /// Write this packet to the tunnel device: a decrypted one from
    /// [`Device::decapsulate`], or from [`Device::encapsulate`] an error answering a
    /// packet for an address no peer holds (see [`Policy::answers_unrouted`]).
    Tunnel(&'a [u8]),
    /// Nothing to do (a keepalive arrived, a cookie was stored, a packet was queued
    /// for a handshake).
    Nothing,
    /// The peer is over its rate: the packet waits in its shaping queue. Call
    /// [`Device::release_shaped`] when [`Device::next_shaped`] says so.
    Shaped,
    /// The input was dropped, for this reason (already counted).
    Dropped(DropReason),
}

/// Why a packet or datagram was dropped. Each reason has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a WireGuard message, or a truncated one.
    Malformed,
    /// A message for a session or peer we do not know.
    UnknownPeer,
    /// Failed authentication (MAC, AEAD tag, key, timestamp).
    Unauthenticated,
    /// A data packet whose counter was already seen.
    Replay,
    /// A decrypted packet whose source is not in the sending peer's allowed IPs.
    SourceNotAllowed,
    /// An outgoing packet whose destination matches no peer's allowed IPs.
    NoRoute,
    /// An outgoing packet for a peer whose endpoint is not known yet.
    NoEndpoint,
    /// The device has no private key.
    NoKey,
    /// The caller's buffer cannot hold the result.
    BufferTooSmall,
    /// Some other protocol error (no session yet, expired session).
    Protocol,
    /// Over the peer's rate with its shaping queue full.
    RateLimited,
    /// Between a peer and a peer of another tenant (policy).
    OtherTenant,
    /// Between two peers of a tenant whose peers are isolated from each other (policy).
    PeerIsolated,
    /// From a peer to the host's own addresses, or from them to a peer (policy).
    HostAddress,
    /// From a peer to a network the host reaches other than through its uplink, or
    /// from such a network to a peer (policy).
    PrivateNetwork,
    /// For an address of the peers' prefix that no peer holds (answered with
    /// destination unreachable where the rate limit allows).
    Unallocated,
}

impl DropReason {
    const ALL: [DropReason; 16] = [
        DropReason::Malformed,
        DropReason::UnknownPeer,
        DropReason::Unauthenticated,
        DropReason::Replay,
        DropReason::SourceNotAllowed,
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::NoKey,
        DropReason::BufferTooSmall,
        DropReason::Protocol,
        DropReason::RateLimited,
        DropReason::OtherTenant,
        DropReason::PeerIsolated,
        DropReason::HostAddress,
        DropReason::PrivateNetwork,
        DropReason::Unallocated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::Unauthenticated => "unauthenticated",
            DropReason::Replay => "replay",
            DropReason::SourceNotAllowed => "source",
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::NoKey => "no_key",
            DropReason::BufferTooSmall => "buffer_too_small",
            DropReason::Protocol => "protocol",
            DropReason::RateLimited => "rate_limited",
            DropReason::OtherTenant => "tenant",
            DropReason::PeerIsolated => "isolated",
            DropReason::HostAddress => "host",
            DropReason::PrivateNetwork => "private",
            DropReason::Unallocated => "unallocated",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }

    fn from_error(e: &WireGuardError) -> DropReason {
        match e {
            WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => DropReason::Replay,
            WireGuardError::InvalidMac
            | WireGuardError::InvalidAeadTag
            | WireGuardError::WrongKey
            | WireGuardError::InvalidTai64nTimestamp
            | WireGuardError::WrongTai64nTimestamp => DropReason::Unauthenticated,
            WireGuardError::WrongIndex => DropReason::UnknownPeer,
            WireGuardError::IncorrectPacketLength
            | WireGuardError::InvalidPacket
            | WireGuardError::WrongPacketType => DropReason::Malformed,
            WireGuardError::DestinationBufferTooSmall => DropReason::BufferTooSmall,
            _ => DropReason::Protocol,
        }
    }
}

/// The device's own key pair and the DoS gate derived from it.
struct Identity {
    private: Key,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// Counts every handshake message and demands cookies past the threshold.
    gate: Arc<HandshakeGate>,
    /// Handed to each peer's noise state: handshakes already passed the gate, so this
    /// one never limits (it still verifies MACs).
    per_peer: Arc<HandshakeGate>,
}

impl Identity {
    fn new(private: Key) -> Identity {
        let secret = x25519::StaticSecret::from(private.0);
        let public = x25519::PublicKey::from(&secret);
        Identity {
            private,
            gate: Arc::new(HandshakeGate::new(
                &public,
                HANDSHAKES_PER_SECOND_BEFORE_LOAD,
            )),
            per_peer: Arc::new(HandshakeGate::new(&public, u64::MAX)),
            secret,
            public,
        }
    }

    fn new_tunn(&self, peer: &Key, psk: Option<Key>, index: u32) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            x25519::PublicKey::from(peer.0),
            psk.map(|k| k.0),
            None,
            index,
            Some(self.per_peer.clone()),
        )
    }
}

#[derive(Default)]
struct State {
    identity: Option<Identity>,
    peers: HashMap<Key, PeerRef>,
    by_index: HashMap<u32, PeerRef>,
    routes: AllowedIps<PeerRef>,
    fwmark: u32,
    policy: Option<Arc<dyn Policy>>,
}

/// The WireGuard device: identity, peers and cryptokey routing.
pub struct Device {
    state: RwLock<State>,
    drops: [AtomicU64; DropReason::ALL.len()],
    cookie_replies: AtomicU64,
    epoch: Instant,
    /// Peers that may have packets waiting in a shaping queue.
    shaping: Mutex<Vec<PeerRef>>,
    /// When each drop reason was last logged (ms since `epoch`, 0 = never), so
    /// floods of drops log at a bounded rate.
    logged: [AtomicU64; DropReason::ALL.len()],
    /// Destination unreachable answers, shared by all peers.
    unreachable_limit: DefaultDirectRateLimiter,
    unreachable_sent: AtomicU64,
}

/// Packets a shaping queue let go, ready to continue on their way.
#[derive(Default)]
pub struct Released {
    /// Plaintext packets to encrypt (with [`Device::encapsulate_for`]) and send.
    pub egress: Vec<(PeerRef, Vec<u8>)>,
    /// Decrypted packets to write to the tunnel device.
    pub ingress: Vec<(PeerRef, Vec<u8>)>,
}

impl Default for Device {
    fn default() -> Self {
        Device::new()
    }
}

impl Device {
    pub fn new() -> Device {
        Device {
            state: RwLock::new(State::default()),
            drops: Default::default(),
            cookie_replies: AtomicU64::new(0),
            epoch: Instant::now(),
            shaping: Mutex::new(Vec::new()),
            logged: Default::default(),
            unreachable_limit: RateLimiter::direct(
                Quota::per_second(UNREACHABLE_PER_SECOND).allow_burst(UNREACHABLE_BURST),
            ),
            unreachable_sent: AtomicU64::new(0),
        }
    }

    pub fn with_private_key(private: Key) -> Device {
        let d = Device::new();
        d.state.write().identity = Some(Identity::new(private));
        d
    }

    pub fn private_key(&self) -> Option<Key> {
        self.state.read().identity.as_ref().map(|i| i.private)
    }

    pub fn public_key(&self) -> Option<Key> {
        self.state
            .read()
            .identity
            .as_ref()
            .map(|i| Key(i.public.to_bytes()))
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

    /// Count of drops for one reason, across all peers.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.slot()].load(Ordering::Relaxed)
    }

    fn drop(&self, reason: DropReason) -> Action<'static> {
        self.drops[reason.slot()].fetch_add(1, Ordering::Relaxed);
        Action::Dropped(reason)
    }

    /// Counts a drop the policy decided, and logs it unless this reason was logged
    /// within the last [`DROP_LOG_INTERVAL_MS`].
    fn policy_drop(&self, reason: DropReason, packet: &PacketInfo) -> Action<'static> {
        let total = self.drops[reason.slot()].fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.now_ms().max(1);
        let last = &self.logged[reason.slot()];
        let before = last.load(Ordering::Relaxed);
        if (before == 0 || now.saturating_sub(before) >= DROP_LOG_INTERVAL_MS)
            && last
                .compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::info!(
                reason = reason.as_str(),
                src = %packet.src,
                dst = %packet.dst,
                total,
                "policy dropped a packet (logged at most once a second per reason)"
            );
        }
        Action::Dropped(reason)
    }

    /// Puts `policy` in the data path (or takes it out), for packets from now on.
    pub fn set_policy(&self, policy: Option<Arc<dyn Policy>>) {
        self.state.write().policy = policy;
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
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
        Self::remove_peer_locked(&mut self.state.write(), key)
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
        }
        for peer in &update.peers {
            self.apply_peer(&mut state, peer);
        }
        Ok(())
    }

    fn set_private_key_locked(&self, state: &mut State, key: Key) {
        if key.is_zero() {
            state.identity = None;
            for peer in state.peers.values() {
                *peer.tunn.lock() = None;
            }
            return;
        }
        if state.identity.as_ref().map(|i| i.private) == Some(key) {
            return;
        }
        let identity = Identity::new(key);
        // A peer with our own public key makes no sense; the reference implementations drop it.
        let own = Key(identity.public.to_bytes());
        if Self::remove_peer_locked(state, &own) {
            tracing::warn!(peer = %own, "removed the peer whose public key is the device's own");
        }
        for peer in state.peers.values() {
            let psk = *peer.preshared_key.read();
            *peer.tunn.lock() = Some(identity.new_tunn(&peer.public_key, psk, peer.index));
        }
        state.identity = Some(identity);
    }

    fn remove_peer_locked(state: &mut State, key: &Key) -> bool {
        match state.peers.remove(key) {
            Some(peer) => {
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
            Self::remove_peer_locked(state, &key);
            return;
        }
        if state.identity.as_ref().map(|i| Key(i.public.to_bytes())) == Some(key) {
            tracing::warn!(peer = %key, "ignoring a peer whose public key is the device's own");
            return;
        }
        let peer = match state.peers.get(&key) {
            Some(p) => p.clone(),
            None if update.update_only => return,
            None => {
                let index = Self::free_index(state);
                let psk = update.preshared_key.filter(|k| !k.is_zero());
                let tunn = state
                    .identity
                    .as_ref()
                    .map(|id| id.new_tunn(&key, psk, index));
                let peer = PeerRef(Arc::new(Peer::new(key, index, tunn)));
                *peer.preshared_key.write() = psk;
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
                // The noise state has no way to change the key: start a new one. The
                // kick below re-handshakes at once instead of after the rekey timeout.
                if let Some(id) = &state.identity {
                    *peer.tunn.lock() = Some(id.new_tunn(&key, psk, peer.index));
                }
                peer.kick.store(true, Ordering::Relaxed);
            }
        }
        if let Some(ep) = update.endpoint {
            *peer.endpoint.write() = Some(ep);
        }
        if let Some(secs) = update.persistent_keepalive {
            peer.keepalive.store(u32::from(secs), Ordering::Relaxed);
            if secs != 0 {
                // Like the kernel: turning persistent keepalive on sends one right away.
                peer.kick.store(true, Ordering::Relaxed);
            }
        }
        if update.replace_allowed_ips {
            state.routes.remove_value(&peer);
        }
        for prefix in &update.allowed_ips {
            state.routes.insert(*prefix, peer.clone());
        }
    }

    fn free_index(state: &State) -> u32 {
        loop {
            let candidate = rand_core::RngCore::next_u32(&mut rand_core::OsRng) & 0x00ff_ffff;
            if candidate != 0 && !state.by_index.contains_key(&candidate) {
                return candidate;
            }
        }
    }

    /// Every peer's configuration and counters.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let state = self.state.read();
        let mut out: Vec<PeerInfo> = state
            .peers
            .values()
            .map(|p| Self::info_of(&state, p))
            .collect();
        out.sort_by_key(|p| p.config.public_key);
        out
    }

    /// One peer's configuration and counters.
    pub fn peer_info(&self, key: &Key) -> Option<PeerInfo> {
        let state = self.state.read();
        state.peers.get(key).map(|p| Self::info_of(&state, p))
    }

    fn info_of(state: &State, p: &PeerRef) -> PeerInfo {
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
            last_handshake: p.last_handshake(),
            rx_bytes: p.rx_bytes(),
            tx_bytes: p.tx_bytes(),
            rx_dropped_source: p.rx_dropped_source(),
        }
    }

    /// The peer whose allowed IPs hold `dst`.
    pub fn route(&self, dst: IpAddr) -> Option<PeerRef> {
        self.state.read().routes.lookup(dst).cloned()
    }

    /// Encrypts one IP packet read from the tunnel device for the peer that owns its
    /// destination. `out` must hold `packet.len() + DATA_OVERHEAD` and at least
    /// [`MIN_OUT_BUF`] bytes.
    pub fn encapsulate<'a>(&self, packet: &[u8], out: &'a mut [u8]) -> Action<'a> {
        let Some(dst) = Tunn::dst_address(packet) else {
            return self.drop(DropReason::Malformed);
        };
        let state = self.state.read();
        let Some(peer) = state.routes.lookup(dst).cloned() else {
            let answer = state
                .policy
                .as_ref()
                .is_some_and(|p| p.answers_unrouted(dst));
            drop(state);
            return if answer {
                self.answer_unreachable(packet, out)
            } else {
                self.drop(DropReason::NoRoute)
            };
        };
        if let Some(policy) = &state.policy {
            let Some(info) = PacketInfo::parse(packet) else {
                return self.drop(DropReason::Malformed);
            };
            if let Verdict::Drop(reason) = policy.check_to_peer(&info) {
                return self.policy_drop(reason, &info);
            }
        }
        drop(state);
        if let Some(shaper) = peer.shaper() {
            if let Some(action) = self.shape(&peer, &shaper.egress, packet) {
                return action;
            }
        }
        self.encapsulate_for(&peer, packet, out)
    }

    /// Drops a packet for an address no peer holds and, within the rate limit, builds
    /// the destination unreachable error that goes back through the tunnel device.
    fn answer_unreachable<'a>(&self, packet: &[u8], out: &'a mut [u8]) -> Action<'a> {
        self.drops[DropReason::Unallocated.slot()].fetch_add(1, Ordering::Relaxed);
        if self.unreachable_limit.check().is_err() {
            return Action::Dropped(DropReason::Unallocated);
        }
        match crate::icmp::destination_unreachable(packet, out) {
            Some(n) => {
                self.unreachable_sent.fetch_add(1, Ordering::Relaxed);
                Action::Tunnel(&out[..n])
            }
            None => Action::Dropped(DropReason::Unallocated),
        }
    }

    /// Runs `packet` through `lane`; `None` means it may go on now.
    fn shape(&self, peer: &PeerRef, lane: &Lane, packet: &[u8]) -> Option<Action<'static>> {
        match lane.offer(packet) {
            Admit::Now => None,
            Admit::Queued => {
                if !peer.shaping_listed.swap(true, Ordering::SeqCst) {
                    self.shaping.lock().push(peer.clone());
                }
                Some(Action::Shaped)
            }
            Admit::Dropped => Some(self.drop(DropReason::RateLimited)),
        }
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
            *peer.shaper.write() = mbps.map(|m| Arc::new(Shaper::from_mbps(m)));
        }
        true
    }

    /// Moves every shaped packet whose time has come into `out`. Returns how long
    /// until the next one is due, or `None` when no queue holds anything.
    pub fn release_shaped(&self, out: &mut Released) -> Option<std::time::Duration> {
        let mut listed = self.shaping.lock();
        let mut next: Option<std::time::Duration> = None;
        let mut scratch = Vec::new();
        listed.retain(|peer| {
            let Some(shaper) = peer.shaper() else {
                peer.shaping_listed.store(false, Ordering::Release);
                return false;
            };
            let mut pending = false;
            for (lane, dest) in [
                (&shaper.egress, &mut out.egress),
                (&shaper.ingress, &mut out.ingress),
            ] {
                if let Some(wait) = lane.release(&mut scratch) {
                    pending = true;
                    next = Some(next.map_or(wait, |n| n.min(wait)));
                }
                dest.extend(scratch.drain(..).map(|p| (peer.clone(), p)));
            }
            if !pending {
                peer.shaping_listed.store(false, Ordering::SeqCst);
                // A packet queued between the release and the store saw the peer still
                // listed and did not list it again: keep it listed then.
                if shaper.egress.queued_bytes() + shaper.ingress.queued_bytes() > 0 {
                    peer.shaping_listed.store(true, Ordering::SeqCst);
                    next = Some(std::time::Duration::ZERO);
                    return true;
                }
            }
            pending
        });
        next
    }

    /// Hands the buffers of released packets back for reuse.
    pub fn recycle_shaped(&self, released: &mut Released) {
        for (peer, buf) in released.egress.drain(..) {
            if let Some(s) = peer.shaper() {
                s.egress.recycle([buf]);
            }
        }
        for (peer, buf) in released.ingress.drain(..) {
            if let Some(s) = peer.shaper() {
                s.ingress.recycle([buf]);
            }
        }
    }

    /// Encrypts `packet` for `peer` (already routed by the caller).
    pub fn encapsulate_for<'a>(&self, peer: &Peer, packet: &[u8], out: &'a mut [u8]) -> Action<'a> {
        if out.len() < MIN_OUT_BUF.max(packet.len() + DATA_OVERHEAD) {
            return self.drop(DropReason::BufferTooSmall);
        }
        let Some(to) = peer.endpoint() else {
            return self.drop(DropReason::NoEndpoint);
        };
        let mut guard = peer.tunn.lock();
        let Some(tunn) = guard.as_mut() else {
            return self.drop(DropReason::NoKey);
        };
        match tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(datagram) => {
                peer.tx_bytes
                    .fetch_add(datagram.len() as u64, Ordering::Relaxed);
                peer.last_sent_ms.store(self.now_ms(), Ordering::Relaxed);
                Action::Send { to, datagram }
            }
            TunnResult::Done => Action::Nothing,
            TunnResult::Err(e) => self.drop(DropReason::from_error(&e)),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => Action::Nothing,
        }
    }

    /// Handles one datagram from the network. `out` must be at least as long as
    /// `datagram` and at least [`MIN_OUT_BUF`] bytes.
    pub fn decapsulate<'a>(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Action<'a> {
        if out.len() < MIN_OUT_BUF.max(datagram.len()) {
            return self.drop(DropReason::BufferTooSmall);
        }
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        let packet = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => return self.drop(DropReason::Malformed),
        };
        let state = self.state.read();
        let Some(identity) = &state.identity else {
            return self.drop(DropReason::NoKey);
        };
        let peer = match packet {
            Packet::PacketData(p) => state.by_index.get(&(p.receiver_idx >> 8)),
            Packet::PacketCookieReply(p) => state.by_index.get(&(p.receiver_idx >> 8)),
            Packet::HandshakeResponse(_) | Packet::HandshakeInit(_) => {
                // Handshakes pass the gate first: under load it answers with a cookie
                // reply instead of spending a Diffie-Hellman on an unproven source.
                let mut cookie = [0u8; 64];
                let verified =
                    match identity
                        .gate
                        .verify_packet(Some(from.ip()), datagram, &mut cookie)
                    {
                        Ok(p) => p,
                        Err(TunnResult::WriteToNetwork(reply)) => {
                            self.cookie_replies.fetch_add(1, Ordering::Relaxed);
                            let n = reply.len();
                            out[..n].copy_from_slice(reply);
                            return Action::Send {
                                to: from,
                                datagram: &out[..n],
                            };
                        }
                        Err(TunnResult::Err(e)) => return self.drop(DropReason::from_error(&e)),
                        Err(_) => return self.drop(DropReason::Protocol),
                    };
                match verified {
                    Packet::HandshakeInit(init) => {
                        match parse_handshake_anon(&identity.secret, &identity.public, &init) {
                            Ok(half) => state.peers.get(&Key(half.peer_static_public)),
                            Err(_) => return self.drop(DropReason::Unauthenticated),
                        }
                    }
                    Packet::HandshakeResponse(p) => state.by_index.get(&(p.receiver_idx >> 8)),
                    _ => return self.drop(DropReason::Protocol),
                }
            }
        };
        let Some(peer) = peer.cloned() else {
            return self.drop(DropReason::UnknownPeer);
        };
        let is_cookie = datagram[0] == 3;
        drop(state);

        let mut guard = peer.tunn.lock();
        let Some(tunn) = guard.as_mut() else {
            return self.drop(DropReason::NoKey);
        };
        let result = tunn.decapsulate(Some(from.ip()), datagram, out);
        drop(guard);
        if let TunnResult::Err(e) = &result {
            return self.drop(DropReason::from_error(e));
        }
        // Authenticated from here on: count it, and follow the peer if it moved.
        peer.rx_bytes
            .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        if !is_cookie {
            peer.set_endpoint(from);
        }
        match result {
            TunnResult::WriteToNetwork(reply) => {
                peer.tx_bytes
                    .fetch_add(reply.len() as u64, Ordering::Relaxed);
                peer.last_sent_ms.store(self.now_ms(), Ordering::Relaxed);
                Action::SendThenDrain {
                    to: from,
                    datagram: reply,
                    peer,
                }
            }
            TunnResult::WriteToTunnelV4(packet, src) => {
                self.check_source(&peer, IpAddr::V4(src), packet)
            }
            TunnResult::WriteToTunnelV6(packet, src) => {
                self.check_source(&peer, IpAddr::V6(src), packet)
            }
            TunnResult::Done | TunnResult::Err(_) => Action::Nothing,
        }
    }

    /// Cryptokey routing, inbound half: a peer may only send from its allowed IPs.
    /// Then the policy, if any, says whether the packet may go on.
    fn check_source<'a>(&self, peer: &PeerRef, src: IpAddr, packet: &'a [u8]) -> Action<'a> {
        // boringtun cuts the plaintext at the header's length field without checking
        // that this length covers the header itself: a peer could otherwise have a
        // runt, even empty, packet written to the tunnel device.
        if !holds_whole_ip_header(packet) {
            return self.drop(DropReason::Malformed);
        }
        let state = self.state.read();
        if state.routes.lookup(src) == Some(peer) {
            if let Some(policy) = &state.policy {
                let Some(info) = PacketInfo::parse(packet) else {
                    return self.drop(DropReason::Malformed);
                };
                if let Verdict::Drop(reason) = policy.check_from_peer(&info) {
                    return self.policy_drop(reason, &info);
                }
            }
            drop(state);
            if let Some(shaper) = peer.shaper() {
                if let Some(action) = self.shape(peer, &shaper.ingress, packet) {
                    return action;
                }
            }
            Action::Tunnel(packet)
        } else {
            peer.rx_dropped_source.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %peer.public_key, %src, "dropped packet from a source outside the peer's allowed IPs");
            self.drop(DropReason::SourceNotAllowed)
        }
    }

    /// Releases one packet that waited for `peer`'s session, encrypted.
    pub fn drain_queue<'a>(&self, peer: &PeerRef, out: &'a mut [u8]) -> Option<Action<'a>> {
        let to = peer.endpoint()?;
        let mut guard = peer.tunn.lock();
        let tunn = guard.as_mut()?;
        match tunn.decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(datagram) => {
                peer.tx_bytes
                    .fetch_add(datagram.len() as u64, Ordering::Relaxed);
                peer.last_sent_ms.store(self.now_ms(), Ordering::Relaxed);
                Some(Action::Send { to, datagram })
            }
            _ => None,
        }
    }

    /// Runs every peer's timers: handshake retries, rekeying, keepalives, session
    /// expiry. Call it every 100–250 ms; `send` receives each datagram to transmit.
    pub fn update_timers(&self, out: &mut [u8], mut send: impl FnMut(SocketAddr, &[u8])) {
        let state = self.state.read();
        if let Some(id) = &state.identity {
            // It only resets once a second has passed, however often it is called.
            id.gate.reset_count();
        }
        let now_ms = self.now_ms();
        for peer in state.peers.values() {
            let Some(to) = peer.endpoint() else {
                continue;
            };
            let mut guard = peer.tunn.lock();
            let Some(tunn) = guard.as_mut() else {
                continue;
            };
            let kicked = peer.kick.swap(false, Ordering::Relaxed);
            let result = if kicked || peer.keepalive_due(now_ms) {
                // With a session this is a keepalive; without one it starts a handshake.
                tunn.encapsulate(&[], out)
            } else {
                tunn.update_timers(out)
            };
            match result {
                TunnResult::WriteToNetwork(datagram) => {
                    peer.tx_bytes
                        .fetch_add(datagram.len() as u64, Ordering::Relaxed);
                    peer.last_sent_ms.store(now_ms, Ordering::Relaxed);
                    send(to, datagram);
                }
                // An idle peer whose keys expired: not a failure, it re-handshakes on demand.
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => {
                    tracing::debug!(peer = %peer.public_key, error = ?e, "timer error")
                }
                _ => {}
            }
        }
    }

    /// Device and per-peer counters in Prometheus text format.
    pub fn write_metrics(&self, out: &mut String) {
        let peers = self.peers();
        let _ = writeln!(out, "# HELP sidecar_peers Configured WireGuard peers.");
        let _ = writeln!(out, "# TYPE sidecar_peers gauge");
        let _ = writeln!(out, "sidecar_peers {}", peers.len());
        let _ = writeln!(
            out,
            "# HELP sidecar_dropped_total Packets and datagrams dropped, by reason."
        );
        let _ = writeln!(out, "# TYPE sidecar_dropped_total counter");
        for reason in DropReason::ALL {
            let _ = writeln!(
                out,
                "sidecar_dropped_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                self.dropped(reason)
            );
        }
        let _ = writeln!(
            out,
            "# HELP sidecar_cookie_replies_total Cookie replies sent to handshakes under load."
        );
        let _ = writeln!(out, "# TYPE sidecar_cookie_replies_total counter");
        let _ = writeln!(
            out,
            "sidecar_cookie_replies_total {}",
            self.cookie_replies.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP sidecar_unreachable_sent_total Destination unreachable errors sent for unallocated addresses."
        );
        let _ = writeln!(out, "# TYPE sidecar_unreachable_sent_total counter");
        let _ = writeln!(
            out,
            "sidecar_unreachable_sent_total {}",
            self.unreachable_sent.load(Ordering::Relaxed)
        );
        type PeerMetric = (
            &'static str,
            &'static str,
            &'static str,
            fn(&PeerInfo) -> u64,
        );
        let per_peer: [PeerMetric; 3] = [
            (
                "sidecar_peer_rx_bytes_total",
                "counter",
                "WireGuard bytes received from the peer.",
                |p| p.rx_bytes,
            ),
            (
                "sidecar_peer_tx_bytes_total",
                "counter",
                "WireGuard bytes sent to the peer.",
                |p| p.tx_bytes,
            ),
            (
                "sidecar_peer_last_handshake_seconds",
                "gauge",
                "Unix time of the latest handshake (0 = never).",
                |p| {
                    p.last_handshake
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs())
                },
            ),
        ];
        for (name, kind, help, value) in per_peer {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for p in &peers {
                let _ = writeln!(
                    out,
                    "{name}{{peer=\"{}\"}} {}",
                    p.config.public_key,
                    value(p)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP sidecar_peer_rx_dropped_total Decrypted packets from the peer dropped, by reason."
        );
        let _ = writeln!(out, "# TYPE sidecar_peer_rx_dropped_total counter");
        for p in &peers {
            let _ = writeln!(
                out,
                "sidecar_peer_rx_dropped_total{{peer=\"{}\",reason=\"source\"}} {}",
                p.config.public_key, p.rx_dropped_source
            );
        }
    }
}

/// Whether a decrypted packet (already cut to its length field) is an IP packet
/// whose header fits in it and agrees with its length.
fn holds_whole_ip_header(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => smoltcp::wire::Ipv4Packet::new_checked(packet).is_ok(),
        Some(6) => smoltcp::wire::Ipv6Packet::new_checked(packet).is_ok(),
        _ => false,
    }
}
