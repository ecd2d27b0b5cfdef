//! Section 6's constants and the per-peer deadlines they drive. Every deadline is an
//! `Instant` computed from the `now` of the event that set it; nothing here reads a clock.

use std::time::{Duration, Instant};

pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A retransmitted initiation waits REKEY_TIMEOUT plus up to this much, so that peers
/// that lost packets at the same moment do not retry in lockstep.
pub const REKEY_TIMEOUT_JITTER: Duration = Duration::from_millis(333);
/// With no new handshake for this long every key is erased.
pub const ZERO_KEYS_AFTER: Duration = Duration::from_secs(3 * 180);
/// The initiator rekeys on receiving when its session is this old, so that a peer that
/// only receives still gets a new session before the old one is rejected.
pub const REKEY_ON_RECEIVE_AFTER: Duration = Duration::from_secs(180 - 10 - 5);

/// SplitMix64: jitter only needs to be spread, not secret, and a seed makes tests exact.
#[derive(Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed)
    }

    pub fn next(&mut self, max: Duration) -> Duration {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let max_ms = max.as_millis() as u64;
        Duration::from_millis(z % (max_ms + 1))
    }
}

/// The deadlines of one peer (wireguard-go names them the same way). `None` is a timer
/// that is not running.
#[derive(Default, Clone)]
pub(crate) struct Timers {
    /// Resend the initiation when no response came.
    pub retransmit: Option<Instant>,
    /// When this round of handshake attempts began, to give up after REKEY_ATTEMPT_TIME.
    pub attempts_since: Option<Instant>,
    /// When the last initiation went out; initiations are at most one per REKEY_TIMEOUT.
    pub last_initiation: Option<Instant>,
    /// Data was sent and nothing came back: start a new handshake.
    pub new_handshake: Option<Instant>,
    /// Data was received and nothing went back: send a keepalive.
    pub keepalive: Option<Instant>,
    pub another_keepalive: bool,
    pub persistent: Option<Instant>,
    pub zero_keys: Option<Instant>,
    /// A rekey was asked for by traffic (age or message count): initiate when possible.
    pub rekey: Option<Instant>,
}

fn min(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

impl Timers {
    pub fn earliest(&self) -> Option<Instant> {
        [
            self.new_handshake,
            self.keepalive,
            self.persistent,
            self.zero_keys,
            self.rekey,
        ]
        .into_iter()
        .fold(self.retransmit, min)
    }

    /// An authenticated data packet was sent: expect an answer within 15 s.
    pub fn data_sent(&mut self, now: Instant) {
        if self.new_handshake.is_none() {
            self.new_handshake = Some(now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT);
        }
    }

    /// An authenticated data packet arrived: answer it within 10 s, with a keepalive if
    /// nothing else goes back.
    pub fn data_received(&mut self, now: Instant) {
        if self.keepalive.is_none() {
            self.keepalive = Some(now + KEEPALIVE_TIMEOUT);
        } else {
            self.another_keepalive = true;
        }
    }

    /// Anything authenticated went out, so the peer needs no keepalive from us now.
    pub fn authenticated_sent(&mut self) {
        self.keepalive = None;
        self.another_keepalive = false;
    }

    /// Anything authenticated came in, so the peer is alive.
    pub fn authenticated_received(&mut self) {
        self.new_handshake = None;
    }

    pub fn traversal(&mut self, now: Instant, persistent: Option<u16>) {
        self.persistent = persistent
            .filter(|s| *s > 0)
            .map(|s| now + Duration::from_secs(u64::from(s)));
    }

    pub fn initiation_sent(&mut self, now: Instant, jitter: &mut Jitter) {
        self.last_initiation = Some(now);
        self.attempts_since.get_or_insert(now);
        self.retransmit = Some(now + REKEY_TIMEOUT + jitter.next(REKEY_TIMEOUT_JITTER));
    }

    pub fn handshake_complete(&mut self) {
        self.retransmit = None;
        self.attempts_since = None;
        self.rekey = None;
    }

    pub fn session_derived(&mut self, now: Instant) {
        self.zero_keys = Some(now + ZERO_KEYS_AFTER);
    }

    /// When the rate limit next lets an initiation out.
    pub fn initiation_allowed_at(&self, now: Instant) -> Instant {
        self.last_initiation
            .map_or(now, |t| (t + REKEY_TIMEOUT).max(now))
    }

    /// Whether a new initiation may go out now (at most one per REKEY_TIMEOUT).
    pub fn may_initiate(&self, now: Instant) -> bool {
        self.last_initiation
            .is_none_or(|t| now.saturating_duration_since(t) >= REKEY_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_deterministic_and_bounded() {
        let (mut a, mut b) = (Jitter::new(42), Jitter::new(42));
        let xs: Vec<_> = (0..100).map(|_| a.next(REKEY_TIMEOUT_JITTER)).collect();
        let ys: Vec<_> = (0..100).map(|_| b.next(REKEY_TIMEOUT_JITTER)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|d| *d <= REKEY_TIMEOUT_JITTER));
        assert!(xs.iter().any(|d| *d != xs[0]), "jitter must vary");
    }
}
