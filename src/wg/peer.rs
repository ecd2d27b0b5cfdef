//! One remote peer: its noise state and the bookkeeping around it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use boringtun::noise::Tunn;
use parking_lot::{Mutex, RwLock};

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
    /// `None` while the device has no private key.
    pub(crate) tunn: Mutex<Option<Tunn>>,
    pub(crate) preshared_key: RwLock<Option<Key>>,
    pub(crate) endpoint: RwLock<Option<SocketAddr>>,
    /// Seconds, 0 = off. Kept outside the noise state so it can change without a new session.
    pub(crate) keepalive: AtomicU32,
    /// Milliseconds since the device's epoch at which we last sent this peer anything.
    pub(crate) last_sent_ms: AtomicU64,
    /// Set when a keepalive (and so a handshake, if needed) should go out at the next tick.
    pub(crate) kick: AtomicBool,
    pub(crate) rx_bytes: AtomicU64,
    pub(crate) tx_bytes: AtomicU64,
    pub(crate) rx_dropped_source: AtomicU64,
    /// Rate limit for both directions, when the peer has one.
    pub(crate) shaper: RwLock<Option<Arc<Shaper>>>,
    /// Whether the device's list of peers with queued packets holds this one.
    pub(crate) shaping_listed: AtomicBool,
}

impl Peer {
    pub(crate) fn new(public_key: Key, index: u32, tunn: Option<Tunn>) -> Peer {
        Peer {
            public_key,
            index,
            tunn: Mutex::new(tunn),
            preshared_key: RwLock::new(None),
            endpoint: RwLock::new(None),
            keepalive: AtomicU32::new(0),
            last_sent_ms: AtomicU64::new(0),
            kick: AtomicBool::new(false),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            rx_dropped_source: AtomicU64::new(0),
            shaper: RwLock::new(None),
            shaping_listed: AtomicBool::new(false),
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

    pub fn last_handshake(&self) -> Option<SystemTime> {
        let since = self
            .tunn
            .lock()
            .as_ref()
            .and_then(|t| t.time_since_last_handshake())?;
        SystemTime::now().checked_sub(since)
    }

    pub fn rx_bytes(&self) -> u64 {
        self.rx_bytes.load(Ordering::Relaxed)
    }

    pub fn tx_bytes(&self) -> u64 {
        self.tx_bytes.load(Ordering::Relaxed)
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

    /// A clone, so that no lock on the peer is held while a packet is queued:
    /// queueing takes the device's shaping-list lock, and releasing takes the two
    /// the other way round.
    pub fn shaper(&self) -> Option<Arc<Shaper>> {
        self.shaper.read().clone()
    }

    pub(crate) fn keepalive_due(&self, now_ms: u64) -> bool {
        let interval = self.keepalive.load(Ordering::Relaxed);
        interval != 0
            && now_ms.saturating_sub(self.last_sent_ms.load(Ordering::Relaxed))
                >= Duration::from_secs(u64::from(interval)).as_millis() as u64
    }
}
