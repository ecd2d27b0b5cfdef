//! The seam over boringtun's `Tunn`, the second backend: the only file that names
//! boringtun's noise types (`Tunn`, its rate limiter, its handshake parser).
//!
//! `Tunn` keeps its own clock, so this adapter ignores `now` except to schedule the
//! timer ticks that `Tunn` expects (every [`TIMER_TICK`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

use super::{Gate, Opened, Sealed, HANDSHAKES_PER_SECOND_BEFORE_LOAD};
use crate::key::Key;
use crate::wg::metrics::DropReason;

/// How often `Tunn` wants its timers run: its timers have 100 ms-scale granularity.
pub(crate) const TIMER_TICK: Duration = Duration::from_millis(100);

/// The device's static key pair and its DoS gate, as boringtun wants them.
pub(super) struct Keys {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// Counts every handshake message and demands cookies past the threshold.
    gate: Arc<RateLimiter>,
    /// Handed to each peer's state: handshakes already passed `gate`, so this one
    /// never limits (it still verifies MACs).
    per_peer: Arc<RateLimiter>,
}

impl Keys {
    pub(super) fn new(private: Key) -> Keys {
        let secret = x25519::StaticSecret::from(private.0);
        let public = x25519::PublicKey::from(&secret);
        let limit = u64::from(HANDSHAKES_PER_SECOND_BEFORE_LOAD);
        Keys {
            gate: Arc::new(RateLimiter::new(&public, limit)),
            per_peer: Arc::new(RateLimiter::new(&public, u64::MAX)),
            secret,
            public,
        }
    }

    pub(super) fn check_handshake(&self, from: IpAddr, datagram: &[u8], out: &mut [u8]) -> Gate {
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

    pub(super) fn reset_gate(&self) {
        // It only resets once a second has passed (on its own clock), however often
        // it is called.
        self.gate.reset_count();
    }

    pub(super) fn initiator(&self, datagram: &[u8]) -> Result<Key, DropReason> {
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

    pub(super) fn peer(
        &self,
        peer: &Key,
        psk: Option<Key>,
        index: u32,
        now: Instant,
    ) -> Box<State> {
        Box::new(State {
            tunn: Tunn::new(
                self.secret.clone(),
                x25519::PublicKey::from(peer.0),
                psk.map(|k| k.0),
                None,
                index,
                Some(self.per_peer.clone()),
            ),
            next_tick: now + TIMER_TICK,
        })
    }
}

/// One peer's `Tunn` and when its timers are next run. Boxed by the seam: `Tunn` is
/// about 11 KB, and the peer table holds the seam's state inline.
pub(crate) struct State {
    tunn: Tunn,
    next_tick: Instant,
}

impl State {
    pub(super) fn encapsulate(
        &mut self,
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

    pub(super) fn decapsulate(
        &mut self,
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

    pub(super) fn poll_queued(&mut self, out: &mut [u8]) -> Option<usize> {
        match self.tunn.decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(d) => Some(d.len()),
            _ => None,
        }
    }

    /// Runs `Tunn`'s timers once per tick: later calls before the next tick do nothing.
    pub(super) fn update_timers(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        if now < self.next_tick {
            return None;
        }
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

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_tick)
    }

    pub(super) fn last_handshake(&self) -> Option<Duration> {
        self.tunn.time_since_last_handshake()
    }

    pub(super) fn is_expired(&self) -> bool {
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
