//! The seam between the device and the Noise protocol. Two implementations sit behind
//! it, chosen per device ([`NoiseBackend`]): our own sans-IO one in [`crate::wg::noise`]
//! (the default) and an adapter over boringtun's `Tunn`. Static dispatch: each type
//! below is an enum over the two, so the data path pays one match, not a virtual call.
//!
//! # The seam API
//!
//! Device level, one per private key:
//!
//! ```text
//! StaticKeys::new(private, backend, wall, anchor) -> StaticKeys
//! check_handshake(&self, now, from: SocketAddr, datagram, out) -> Gate
//!     // every initiation and response passes here first: mac1 is checked, and under
//!     // load a message without a valid mac2 is answered with a cookie reply.
//! reset_gate(&self, now)          // boringtun's counting second; ours needs none
//! open_initiation(&self, datagram) -> Result<Initiation, DropReason>
//!     // who sent an initiation (and, for ours, its TAI64N timestamp), before any
//!     // per-peer state is touched
//! ```
//!
//! Per peer, created at first need and dropped once [`NoiseState::is_expired`]:
//!
//! ```text
//! NoiseState::new(keys, peer, psk, index, now)
//!     // `index` is the peer's 24-bit slot: receiver indices are (index << 8) | n
//! encapsulate(now, packet, out) -> Result<Sealed, DropReason>
//! decapsulate(now, from, datagram, out) -> Result<Opened, DropReason>
//!     // responses, cookie replies and data
//! accept_initiation(now, from, &Initiation, datagram, out) -> Result<Opened, DropReason>
//! poll_queued(now, out) -> Option<usize>      // packets released by a new session
//! keepalive(now, out) -> Option<usize>        // a keepalive, or an initiation
//! handle_timeout(now, out) -> Option<usize>   // call until None
//! poll_timeout() -> Option<Instant>
//! set_preshared_key(now, psk) -> bool         // false: the state must be replaced
//! last_handshake(now), is_expired(now)
//! ```
//!
//! Buffers: `out` holds at least `datagram.len()` (decapsulate) or `packet.len() +
//! DATA_OVERHEAD` (encapsulate) and never less than `MIN_OUT_BUF` bytes; the device
//! checks that before calling.

mod boringtun;
mod sidecar;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use super::config::NoiseBackend;
use super::metrics::DropReason;
use crate::key::Key;

/// Handshake messages per second before the device starts demanding cookies
/// (the same threshold as the reference implementations).
pub(crate) const HANDSHAKES_PER_SECOND_BEFORE_LOAD: u32 = 100;

/// What the cookie gate says about a handshake message.
pub(crate) enum Gate {
    /// Authentic (mac1) and either not under load or carrying a valid mac2.
    Pass,
    /// Under load: answer with the cookie reply in `out[..len]` and do nothing else.
    CookieReply(usize),
    Reject(DropReason),
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

/// An initiation opened by the device's static key: whom it comes from.
pub(crate) enum Initiation {
    Sidecar(crate::wg::noise::OpenedInitiation),
    Boringtun(Key),
}

impl Initiation {
    pub(crate) fn peer(&self) -> Key {
        match self {
            Initiation::Sidecar(o) => Key(o.peer_public),
            Initiation::Boringtun(k) => *k,
        }
    }

    /// Its TAI64N timestamp, where the backend exposes it.
    pub(crate) fn timestamp(&self) -> Option<[u8; 12]> {
        match self {
            Initiation::Sidecar(o) => Some(o.timestamp),
            Initiation::Boringtun(_) => None,
        }
    }
}

enum Keys {
    Sidecar(sidecar::Keys),
    Boringtun(boringtun::Keys),
}

/// The device's static key pair and its DoS gate.
pub(crate) struct StaticKeys {
    private: Key,
    public: Key,
    keys: Keys,
}

impl StaticKeys {
    /// `wall` and `anchor` are one moment on the wall and the monotonic clock: our
    /// backend's handshake timestamps count on from it with the `now` it is fed.
    pub(crate) fn new(
        private: Key,
        backend: NoiseBackend,
        wall: SystemTime,
        anchor: Instant,
    ) -> StaticKeys {
        let keys = match backend {
            NoiseBackend::Sidecar => Keys::Sidecar(sidecar::Keys::new(private, wall, anchor)),
            NoiseBackend::Boringtun => Keys::Boringtun(boringtun::Keys::new(private)),
        };
        StaticKeys {
            private,
            public: private.public_key(),
            keys,
        }
    }

    pub(crate) fn private(&self) -> Key {
        self.private
    }

    pub(crate) fn public(&self) -> Key {
        self.public
    }

    pub(crate) fn check_handshake(
        &self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Gate {
        match &self.keys {
            Keys::Sidecar(k) => k.check_handshake(now, from, datagram, out),
            Keys::Boringtun(k) => k.check_handshake(from.ip(), datagram, out),
        }
    }

    /// Whether the gate counts on its own clock and must be reset each second
    /// (boringtun's); ours counts by the `now` it is given.
    pub(crate) fn needs_gate_reset(&self) -> bool {
        matches!(self.keys, Keys::Boringtun(_))
    }

    pub(crate) fn reset_gate(&self) {
        if let Keys::Boringtun(k) = &self.keys {
            k.reset_gate();
        }
    }

    pub(crate) fn open_initiation(&self, datagram: &[u8]) -> Result<Initiation, DropReason> {
        match &self.keys {
            Keys::Sidecar(k) => k.open_initiation(datagram).map(Initiation::Sidecar),
            Keys::Boringtun(k) => k.initiator(datagram).map(Initiation::Boringtun),
        }
    }
}

/// One peer's protocol state: handshake, sessions, timers and the packets waiting
/// for a session.
pub(crate) enum NoiseState {
    // Boxed, both: the peer table holds this inline and an idle peer holds none.
    Sidecar(Box<crate::wg::noise::NoisePeer>),
    Boringtun(Box<boringtun::State>),
}

impl NoiseState {
    pub(crate) fn new(
        keys: &StaticKeys,
        peer: &Key,
        psk: Option<Key>,
        index: u32,
        now: Instant,
    ) -> NoiseState {
        match &keys.keys {
            Keys::Sidecar(k) => NoiseState::Sidecar(k.peer(peer, psk, index, now)),
            Keys::Boringtun(k) => NoiseState::Boringtun(k.peer(peer, psk, index, now)),
        }
    }

    pub(crate) fn encapsulate(
        &mut self,
        now: Instant,
        packet: &[u8],
        out: &mut [u8],
    ) -> Result<Sealed, DropReason> {
        match self {
            NoiseState::Sidecar(p) => sidecar::encapsulate(p, now, packet, out),
            NoiseState::Boringtun(s) => s.encapsulate(packet, out),
        }
    }

    pub(crate) fn decapsulate(
        &mut self,
        now: Instant,
        from: IpAddr,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Result<Opened, DropReason> {
        match self {
            NoiseState::Sidecar(p) => sidecar::decapsulate(p, now, datagram, out),
            NoiseState::Boringtun(s) => s.decapsulate(from, datagram, out),
        }
    }

    pub(crate) fn accept_initiation(
        &mut self,
        now: Instant,
        from: IpAddr,
        initiation: &Initiation,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Result<Opened, DropReason> {
        match (self, initiation) {
            (NoiseState::Sidecar(p), Initiation::Sidecar(o)) => {
                sidecar::accept_initiation(p, now, o, out)
            }
            (NoiseState::Boringtun(s), Initiation::Boringtun(_)) => {
                s.decapsulate(from, datagram, out)
            }
            // Made by the other backend's keys: the device replaced its keys meanwhile.
            _ => Err(DropReason::NoKey),
        }
    }

    pub(crate) fn poll_queued(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        match self {
            NoiseState::Sidecar(p) => sidecar::poll_queued(p, now, out),
            NoiseState::Boringtun(s) => s.poll_queued(out),
        }
    }

    /// A keepalive on the current session or, without one, a handshake initiation.
    pub(crate) fn keepalive(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        match self {
            NoiseState::Sidecar(p) => sidecar::keepalive(p, now, out),
            NoiseState::Boringtun(s) => match s.encapsulate(&[], out) {
                Ok(Sealed::Datagram(n)) => Some(n),
                _ => None,
            },
        }
    }

    /// Handshake retries, rekeys, passive keepalives, session expiry; at most one
    /// datagram per call: call until `None`.
    pub(crate) fn handle_timeout(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        match self {
            NoiseState::Sidecar(p) => sidecar::handle_timeout(p, now, out),
            NoiseState::Boringtun(s) => s.update_timers(now, out),
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match self {
            NoiseState::Sidecar(p) => p.poll_timeout(),
            NoiseState::Boringtun(s) => s.poll_timeout(),
        }
    }

    /// Changes the preshared key in place, keeping the sessions; false if this
    /// backend cannot, and the state must be replaced.
    pub(crate) fn set_preshared_key(&mut self, now: Instant, psk: Option<Key>) -> bool {
        match self {
            NoiseState::Sidecar(p) => {
                p.set_preshared_key(now, psk.map(|k| k.0));
                true
            }
            NoiseState::Boringtun(_) => false,
        }
    }

    pub(crate) fn last_handshake(&self, now: Instant) -> Option<Duration> {
        match self {
            NoiseState::Sidecar(p) => p.last_handshake(now),
            NoiseState::Boringtun(s) => s.last_handshake(),
        }
    }

    pub(crate) fn is_expired(&self, now: Instant) -> bool {
        match self {
            NoiseState::Sidecar(p) => p.is_expired(now),
            NoiseState::Boringtun(s) => s.is_expired(),
        }
    }
}
