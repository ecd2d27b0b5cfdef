//! One remote peer: its configuration, its noise state (created at first need) and
//! its counters. Kept small: the relay holds one per registered peer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use super::clock::{nanos, FedClock};
use super::emulation::PeerNetem;
use super::session::NoiseState;
use crate::key::Key;
use crate::shape::Shaper;

/// A shared handle to a peer. Equality is identity, so it can be a routing-table value.
#[derive(Clone)]
pub struct PeerRef(pub(crate) Arc<Peer>);

impl PartialEq for PeerRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for PeerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Peer({:?})", self.0.public_key)
    }
}

impl std::ops::Deref for PeerRef {
    type Target = Peer;
    fn deref(&self) -> &Peer {
        &self.0
    }
}

pub struct Peer {
    pub(crate) public_key: Key,
    /// The 24-bit index this peer's sessions carry in their receiver index.
    pub(crate) index: u32,
    /// Persistent keepalive in seconds, 0 = off. Kept outside the noise state so it
    /// can change without a new session.
    pub(crate) keepalive: AtomicU32,
    /// `None` until first needed (a packet to send, an initiation from the peer, a
    /// keepalive due) and again once its session expired with nothing queued, so an
    /// idle peer costs only this struct.
    pub(crate) noise: Mutex<Option<NoiseState>>,
    pub(crate) endpoint: RwLock<Option<SocketAddr>>,
    /// When we last sent this peer anything (device clock, ns).
    pub(crate) last_sent_ns: AtomicU64,
    /// When the latest handshake completed (device clock, ns + 1; 0 = never).
    pub(crate) last_handshake_ns: AtomicU64,
    /// Handshakes completed with this peer since it was added.
    pub(crate) handshakes: AtomicU64,
    /// Set when a keepalive (and so a handshake, if needed) should go out at the next
    /// timer run.
    pub(crate) kick: AtomicBool,
    /// Whether the device's list of peers whose new session may release queued
    /// packets holds this one.
    pub(crate) releasing: AtomicBool,
    pub(crate) rx_bytes: AtomicU64,
    pub(crate) tx_bytes: AtomicU64,
    pub(crate) rx_dropped_source: AtomicU64,
    pub(crate) preshared_key: RwLock<Option<Key>>,
    /// The TAI64N timestamp of the latest initiation accepted from the peer. Kept
    /// here, not only in the noise state, so that once the state is dropped a
    /// replayed initiation is still refused, before a state or a response is made.
    pub(crate) last_initiation: Mutex<[u8; 12]>,
    /// Rate limit for both directions, when the peer has one.
    pub(crate) shaper: RwLock<Option<Arc<Shaper>>>,
    /// Emulated latency, jitter and loss, when the peer has them.
    pub(crate) netem: PeerNetem,
}

impl Peer {
    pub(crate) fn new(public_key: Key, index: u32) -> Peer {
        Peer {
            public_key,
            index,
            keepalive: AtomicU32::new(0),
            noise: Mutex::new(None),
            endpoint: RwLock::new(None),
            last_sent_ns: AtomicU64::new(0),
            last_handshake_ns: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
            kick: AtomicBool::new(false),
            releasing: AtomicBool::new(false),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            rx_dropped_source: AtomicU64::new(0),
            preshared_key: RwLock::new(None),
            last_initiation: Mutex::new([0; 12]),
            shaper: RwLock::new(None),
            netem: PeerNetem::default(),
        }
    }

    pub fn public_key(&self) -> Key {
        self.public_key
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        *self.endpoint.read()
    }

    pub(crate) fn set_endpoint(&self, addr: SocketAddr) {
        // Read first: the common case is an unchanged endpoint and a shared lock is cheaper.
        if *self.endpoint.read() != Some(addr) {
            let mut ep = self.endpoint.write();
            if *ep != Some(addr) {
                tracing::info!(peer = %self.public_key, endpoint = %addr, "peer endpoint changed");
                *ep = Some(addr);
            }
        }
    }

    /// How long ago the latest handshake completed, as of `now` on `clock`.
    pub(crate) fn handshake_age(&self, clock: &FedClock, now: Instant) -> Option<Duration> {
        let at = self
            .last_handshake_ns
            .load(Ordering::Relaxed)
            .checked_sub(1)?;
        Some(Duration::from_nanos(clock.ns(now).saturating_sub(at)))
    }

    pub(crate) fn note_handshake(&self, now_ns: u64) {
        self.last_handshake_ns
            .store(now_ns.saturating_add(1), Ordering::Relaxed);
        self.handshakes.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether an initiation stamped `stamp` is newer than the latest one accepted
    /// (TAI64N is big endian, so byte order is time order).
    pub(crate) fn initiation_is_newer(&self, stamp: &[u8; 12]) -> bool {
        *stamp > *self.last_initiation.lock()
    }

    pub(crate) fn note_initiation(&self, stamp: [u8; 12]) {
        let mut last = self.last_initiation.lock();
        if stamp > *last {
            *last = stamp;
        }
    }

    pub(crate) fn note_sent(&self, bytes: usize, now_ns: u64) {
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.last_sent_ns.store(now_ns, Ordering::Relaxed);
    }

    pub fn rx_bytes(&self) -> u64 {
        self.rx_bytes.load(Ordering::Relaxed)
    }

    pub fn tx_bytes(&self) -> u64 {
        self.tx_bytes.load(Ordering::Relaxed)
    }

    /// Handshakes completed with this peer since it was added (each one confirmed).
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }

    pub fn rx_dropped_source(&self) -> u64 {
        self.rx_dropped_source.load(Ordering::Relaxed)
    }

    pub fn persistent_keepalive(&self) -> Option<u16> {
        match self.keepalive.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s.min(u32::from(u16::MAX)) as u16),
        }
    }

    /// A clone, so that no lock on the peer is held while a packet is queued.
    pub fn shaper(&self) -> Option<Arc<Shaper>> {
        self.shaper.read().clone()
    }

    /// When the next persistent keepalive is due (device clock, ns), if it is on.
    pub(crate) fn keepalive_at(&self) -> Option<u64> {
        let interval = self.keepalive.load(Ordering::Relaxed);
        (interval != 0).then(|| {
            self.last_sent_ns
                .load(Ordering::Relaxed)
                .saturating_add(nanos(Duration::from_secs(u64::from(interval))))
        })
    }

    /// Whether the peer has a noise state now (for tests and the memory figures).
    pub fn has_noise_state(&self) -> bool {
        self.noise.lock().is_some()
    }
}
