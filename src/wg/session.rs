//! The seam between the device and the Noise protocol: the only file that names
//! boringtun's noise types (`Tunn`, its rate limiter, its handshake parser).
//! Everything the device needs from the protocol goes through the types below, so
//! the protocol implementation can be swapped by rewriting this file.
//!
//! # The seam API (what a noise implementation provides)
//!
//! Device level, one per private key:
//!
//! ```text
//! StaticKeys::new(private: Key) -> StaticKeys
//! StaticKeys::private(&self) -> Key
//! StaticKeys::public(&self) -> Key
//! StaticKeys::check_handshake(&self, now: Instant, from: IpAddr, datagram: &[u8],
//!                             out: &mut [u8]) -> Gate
//!     // every handshake initiation and response passes here first: mac1 is checked,
//!     // and under load (more than HANDSHAKES_PER_SECOND_BEFORE_LOAD in the current
//!     // second) a message without a valid mac2 is answered with a cookie reply
//!     // written into `out` (Gate::CookieReply(len)) instead of being processed.
//! StaticKeys::reset_gate(&self, now: Instant)   // starts a new counting second if one passed
//! StaticKeys::initiator(&self, datagram: &[u8]) -> Result<Key, DropReason>
//!     // the static public key inside a handshake initiation (after check_handshake)
//! ```
//!
//! Per peer, created at first need and dropped once [`NoiseState::is_expired`]:
//!
//! ```text
//! NoiseState::new(keys: &StaticKeys, peer: &Key, psk: Option<Key>, index: u32,
//!                 now: Instant) -> NoiseState
//!     // `index` is the peer's 24-bit slot: every receiver index the state hands
//!     // out is (index << 8) | session, so the device routes by `receiver >> 8`.
//! encapsulate(&mut self, now, packet: &[u8], out: &mut [u8]) -> Result<Sealed, DropReason>
//!     // with a session: Sealed::Datagram(len) in out[..len]; an empty packet is a
//!     // keepalive. Without one: the packet waits (bounded queue) and, unless a
//!     // handshake is in flight, Sealed::Datagram holds a handshake initiation;
//!     // otherwise Sealed::Queued.
//! decapsulate(&mut self, now, from: IpAddr, datagram: &[u8], out: &mut [u8])
//!     -> Result<Opened, DropReason>
//!     // Opened::Packet { start, len, src }: a decrypted IP packet in
//!     //   out[start..start + len] whose header says it comes from `src`;
//!     // Opened::Handshake(len): a handshake completed or was answered; send
//!     //   out[..len] back to `from`, then drain poll_queued;
//!     // Opened::Consumed: a keepalive, or a cookie reply that was stored.
//! poll_queued(&mut self, now, out: &mut [u8]) -> Option<usize>
//!     // one packet that waited for the handshake, encrypted, once a session exists
//! update_timers(&mut self, now, out: &mut [u8]) -> Option<usize>
//!     // handshake retries, rekeys, passive keepalives, session expiry; at most one
//!     // datagram per call
//! poll_timeout(&self) -> Option<Instant>     // when update_timers must next run
//! last_handshake(&self, now) -> Option<Duration>   // age of the current session
//! is_expired(&self, now) -> bool
//!     // no session and nothing queued: the device may drop the state
//! ```
//!
//! Buffers: `out` holds at least `datagram.len()` (decapsulate) or `packet.len() +
//! DATA_OVERHEAD` (encapsulate) and never less than `MIN_OUT_BUF` bytes; the device
//! checks that before calling.
//!
//! boringtun's `Tunn` keeps its own clock, so this adapter ignores `now` except to
//! schedule the timer ticks that `Tunn` expects (every [`TIMER_TICK`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

use super::metrics::DropReason;
use crate::key::Key;

/// Handshake messages per second before the device starts demanding cookies
/// (the same threshold as the reference implementations).
const HANDSHAKES_PER_SECOND_BEFORE_LOAD: u64 = 100;

/// How often `Tunn` wants its timers run: its timers have 100 ms-scale granularity.
pub(crate) const TIMER_TICK: Duration = Duration::from_millis(100);

/// What the cookie gate says about a handshake message.
pub(crate) enum Gate {
    /// Authentic (mac1) and either not under load or carrying a valid mac2.
    Pass,
    /// Under load: answer with the cookie reply in `out[..len]` and do nothing else.
    CookieReply(usize),
    Reject(DropReason),
}

/// The device's static key pair and its DoS gate.
pub(crate) struct StaticKeys {
    private: Key,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// Counts every handshake message and demands cookies past the threshold.
    gate: Arc<RateLimiter>,
    /// Handed to each peer's state: handshakes already passed `gate`, so this one
    /// never limits (it still verifies MACs).
    per_peer: Arc<RateLimiter>,
}

impl StaticKeys {
    pub(crate) fn new(private: Key) -> StaticKeys {
        let secret = x25519::StaticSecret::from(private.0);
        let public = x25519::PublicKey::from(&secret);
        StaticKeys {
            private,
            gate: Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SECOND_BEFORE_LOAD)),
            per_peer: Arc::new(RateLimiter::new(&public, u64::MAX)),
            secret,
            public,
        }
    }

    pub(crate) fn private(&self) -> Key {
        self.private
    }

    pub(crate) fn public(&self) -> Key {
        Key(self.public.to_bytes())
    }

    pub(crate) fn check_handshake(
        &self,
        _now: Instant,
        from: IpAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Gate {
        let mut cookie = [0u8; 64];
        match self.gate.verify_packet(Some(from), datagram, &mut cookie) {
            Ok(_) => Gate::Pass,
            Err(TunnResult::WriteToNetwork(reply)) => {
                let n = reply.len();
                match out.get_mut(..n) {
                    Some(dst) => {
                        dst.copy_from_slice(reply);
                        Gate::CookieReply(n)
                    }
                    None => Gate::Reject(DropReason::BufferTooSmall),
                }
            }
            Err(TunnResult::Err(e)) => Gate::Reject(drop_reason(&e)),
            Err(_) => Gate::Reject(DropReason::Protocol),
        }
    }

    pub(crate) fn reset_gate(&self, _now: Instant) {
        // It only resets once a second has passed, however often it is called.
        self.gate.reset_count();
    }

    pub(crate) fn initiator(&self, datagram: &[u8]) -> Result<Key, DropReason> {
        match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(init)) => {
                parse_handshake_anon(&self.secret, &self.public, &init)
                    .map(|half| Key(half.peer_static_public))
                    .map_err(|_| DropReason::Unauthenticated)
            }
            Ok(_) => Err(DropReason::Protocol),
            Err(_) => Err(DropReason::Malformed),
        }
    }
}

/// What encrypting gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sealed {
    /// A datagram (data, keepalive or handshake initiation) in `out[..len]`.
    Datagram(usize),
    /// The packet waits for the handshake already in flight.
    Queued,
}

/// What decrypting gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    Packet {
        start: usize,
        len: usize,
        src: IpAddr,
    },
    /// A handshake message was answered: `out[..len]` goes back to the sender, and
    /// packets that waited may now go (see [`NoiseState::poll_queued`]).
    Handshake(usize),
    Consumed,
}

/// One peer's protocol state: handshake, sessions, timers and the packets waiting
/// for a session.
pub(crate) struct NoiseState {
    // Boxed: `Tunn` is about 11 KB, and the peer table holds this inline.
    tunn: Box<Tunn>,
    next_tick: Instant,
}

impl NoiseState {
    pub(crate) fn new(
        keys: &StaticKeys,
        peer: &Key,
        psk: Option<Key>,
        index: u32,
        now: Instant,
    ) -> NoiseState {
        NoiseState {
            tunn: Box::new(Tunn::new(
                keys.secret.clone(),
                x25519::PublicKey::from(peer.0),
                psk.map(|k| k.0),
                None,
                index,
                Some(keys.per_peer.clone()),
            )),
            next_tick: now + TIMER_TICK,
        }
    }

    pub(crate) fn encapsulate(
        &mut self,
        _now: Instant,
        packet: &[u8],
        out: &mut [u8],
    ) -> Result<Sealed, DropReason> {
        match self.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(d) => Ok(Sealed::Datagram(d.len())),
            TunnResult::Done => Ok(Sealed::Queued),
            TunnResult::Err(e) => Err(drop_reason(&e)),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => Ok(Sealed::Queued),
        }
    }

    pub(crate) fn decapsulate(
        &mut self,
        _now: Instant,
        from: IpAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Result<Opened, DropReason> {
        let base = out.as_ptr() as usize;
        match self.tunn.decapsulate(Some(from), datagram, out) {
            TunnResult::WriteToNetwork(reply) => Ok(Opened::Handshake(reply.len())),
            TunnResult::WriteToTunnelV4(packet, src) => Ok(Opened::Packet {
                start: packet.as_ptr() as usize - base,
                len: packet.len(),
                src: IpAddr::V4(src),
            }),
            TunnResult::WriteToTunnelV6(packet, src) => Ok(Opened::Packet {
                start: packet.as_ptr() as usize - base,
                len: packet.len(),
                src: IpAddr::V6(src),
            }),
            TunnResult::Done => Ok(Opened::Consumed),
            TunnResult::Err(e) => Err(drop_reason(&e)),
        }
    }

    pub(crate) fn poll_queued(&mut self, _now: Instant, out: &mut [u8]) -> Option<usize> {
        match self.tunn.decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(d) => Some(d.len()),
            _ => None,
        }
    }

    pub(crate) fn update_timers(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        self.next_tick = now + TIMER_TICK;
        match self.tunn.update_timers(out) {
            TunnResult::WriteToNetwork(d) => Some(d.len()),
            // An idle peer whose keys expired: not a failure, it re-handshakes on demand.
            TunnResult::Err(WireGuardError::ConnectionExpired) => None,
            TunnResult::Err(e) => {
                tracing::debug!(error = ?e, "timer error");
                None
            }
            _ => None,
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_tick)
    }

    pub(crate) fn last_handshake(&self, _now: Instant) -> Option<Duration> {
        self.tunn.time_since_last_handshake()
    }

    pub(crate) fn is_expired(&self, _now: Instant) -> bool {
        // Tunn marks itself expired when it gave up a handshake or zeroed its keys
        // (REJECT_AFTER_TIME * 3); both also empty its queue.
        self.tunn.is_expired()
    }
}

fn drop_reason(e: &WireGuardError) -> DropReason {
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
