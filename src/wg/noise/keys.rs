//! The device's static identity: its X25519 key pair, the hashes of its public key that
//! mac1 and cookie replies are keyed with, and the TAI64N clock of its initiations.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use x25519_dalek::{PublicKey, StaticSecret};

use super::primitives::{hash, CONSTRUCTION, IDENTIFIER, LABEL_COOKIE, LABEL_MAC1};

/// Chaining key and hash every handshake starts from: HASH(CONSTRUCTION) and
/// HASH(HASH(CONSTRUCTION) || IDENTIFIER).
pub(crate) fn initial_chain() -> ([u8; 32], [u8; 32]) {
    let ck = hash(&[CONSTRUCTION]);
    let h = hash(&[&ck, IDENTIFIER]);
    (ck, h)
}

/// Keys derived from one public key: the mac1 key of messages sent to it, the key of
/// cookie replies it sends, and the handshake hash after mixing it in as the responder.
#[derive(Clone)]
pub(crate) struct PublicHashes {
    pub mac1_key: [u8; 32],
    pub cookie_key: [u8; 32],
}

impl PublicHashes {
    pub fn of(public: &[u8; 32]) -> PublicHashes {
        PublicHashes {
            mac1_key: hash(&[LABEL_MAC1, public]),
            cookie_key: hash(&[LABEL_COOKIE, public]),
        }
    }
}

/// TAI64N timestamps that only move forward: the wall clock is read once, by the caller,
/// and afterwards the monotonic `now` fed to the state machine advances it.
#[derive(Clone)]
pub struct Tai64nStamper {
    base_wall: Duration,
    base_mono: Instant,
}

/// TAI64 labels count from 2^62, and TAI is ten seconds ahead of the Unix epoch's UTC.
const TAI64_BASE: u64 = (1 << 62) + 10;

/// Dropping the low 24 bits of the nanoseconds (about 16 ms) keeps the timestamp from
/// revealing the sender's precise clock, as other implementations do.
const NANOS_WHITENER: u32 = 0x00ff_ffff;

impl Tai64nStamper {
    pub fn new(wall: SystemTime, now: Instant) -> Tai64nStamper {
        let base_wall = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        Tai64nStamper {
            base_wall,
            base_mono: now,
        }
    }

    /// The 12-byte TAI64N stamp of `now` (big endian, so byte order is time order).
    pub fn stamp(&self, now: Instant) -> [u8; 12] {
        let t = self.base_wall + now.saturating_duration_since(self.base_mono);
        let mut out = [0u8; 12];
        out[..8].copy_from_slice(&(TAI64_BASE + t.as_secs()).to_be_bytes());
        out[8..].copy_from_slice(&(t.subsec_nanos() & !NANOS_WHITENER).to_be_bytes());
        out
    }
}

/// The device's static key pair and what is derived from it once.
pub struct Identity {
    pub(crate) secret: StaticSecret,
    pub(crate) public: [u8; 32],
    pub(crate) hashes: PublicHashes,
    /// The responder's handshake hash after mixing its own public key, shared by every
    /// initiation addressed to this device.
    pub(crate) responder_h: [u8; 32],
    pub(crate) stamper: Tai64nStamper,
}

impl Identity {
    /// `wall` is read by the caller once; timestamps then follow the `now` given later.
    pub fn new(private_key: [u8; 32], wall: SystemTime, now: Instant) -> Identity {
        let secret = StaticSecret::from(private_key);
        let public = PublicKey::from(&secret).to_bytes();
        let (_, h) = initial_chain();
        Identity {
            secret,
            public,
            hashes: PublicHashes::of(&public),
            responder_h: hash(&[&h, &public]),
            stamper: Tai64nStamper::new(wall, now),
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    pub fn private_key(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("Identity")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_follow_the_monotonic_clock_from_one_wall_reading() {
        let t0 = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let s = Tai64nStamper::new(wall, t0);
        let a = s.stamp(t0);
        assert_eq!(
            u64::from_be_bytes(a[..8].try_into().unwrap()),
            TAI64_BASE + 1_700_000_000
        );
        let b = s.stamp(t0 + Duration::from_millis(20));
        let c = s.stamp(t0 + Duration::from_secs(5));
        assert!(a < b && b < c, "stamps must grow with now");
        assert_eq!(
            u64::from_be_bytes(c[..8].try_into().unwrap()),
            TAI64_BASE + 1_700_000_005
        );
        // Whitened: the low 24 bits of the nanoseconds never leak.
        assert_eq!(
            u32::from_be_bytes(b[8..].try_into().unwrap()) & NANOS_WHITENER,
            0
        );
    }
}
