//! WireGuard's Noise protocol as a sans-IO state machine (whitepaper sections 5 and 6):
//! `Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s`, cookies, and the timers, all fed with `now`.
//!
//! Device level (one each): [`Identity`] (static keys, TAI64N clock),
//! [`CookieGate`] (mac1, load, cookie replies), and [`Identity::open_initiation`], which
//! names the sender of an initiation without any per-peer state. Peer level:
//! [`NoisePeer`], created when a peer first needs a session and dropped once
//! [`NoisePeer::is_expired`].
//!
//! Driving a peer: feed [`NoisePeer::encapsulate`], [`NoisePeer::decapsulate`] (or
//! [`NoisePeer::accept_initiation`] after the device opened the initiation) and
//! [`NoisePeer::handle_timeout`] when [`NoisePeer::poll_timeout`] is reached. After any
//! of them, drain [`NoisePeer::poll_queued`] (packets that waited for a session) and
//! call `handle_timeout` until it returns `None`. Local session indices are
//! `index << 8 | n`, so the device routes responses, cookie replies and data by
//! `receiver >> 8`.

mod cookie;
mod error;
mod handshake;
mod keys;
mod messages;
mod primitives;
mod session;
mod timers;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use cookie::{CookieGate, GateVerdict, COOKIE_SECRET_LIFETIME};
pub use error::NoiseError;
pub use handshake::OpenedInitiation;
pub use keys::{Identity, Tai64nStamper};
pub use messages::{Message, COOKIE_REPLY_LEN, DATA_OVERHEAD, INITIATION_LEN, RESPONSE_LEN};
pub use session::REPLAY_WINDOW;
pub use timers::{
    KEEPALIVE_TIMEOUT, REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME, REKEY_TIMEOUT, REKEY_TIMEOUT_JITTER, ZERO_KEYS_AFTER,
};

use handshake::{consume_response, create_initiation, create_response, InitiatorHandshake};
use keys::PublicHashes;
use messages::offset;
use session::{inner_packet, Keypair, Keypairs, Slot};
use timers::{Jitter, Timers, REKEY_ON_RECEIVE_AFTER};

/// Packets kept while a session is being established; the oldest is dropped beyond this.
pub const MAX_QUEUED: usize = 64;
/// An `out` buffer this large holds any handshake message.
pub const MIN_OUT_BUF: usize = INITIATION_LEN;
/// Initiations from one peer are processed at most this often (flood protection).
pub const INITIATION_MIN_INTERVAL: Duration = Duration::from_millis(20);
/// Data plaintext is padded to 16 bytes but not past this, unless [`NoisePeer::set_mtu`].
pub const DEFAULT_MTU: u16 = 1420;
/// After a change of preshared key, responses made with the previous one are still
/// accepted for this long, or until a handshake under the new one completes: the peer
/// may learn of the change a little later than we do.
pub const PSK_GRACE: Duration = REJECT_AFTER_TIME;

/// What an input produced, written into the caller's `out`.
#[derive(Debug, PartialEq, Eq)]
pub enum Output<'a> {
    /// Send this datagram to the peer's endpoint.
    Transmit(&'a mut [u8]),
    /// Deliver this decrypted packet. `source` is its inner source address: the caller
    /// checks it against the peer's allowed IPs.
    Deliver {
        packet: &'a mut [u8],
        source: IpAddr,
    },
    /// Consumed with nothing to send or deliver (a keepalive, a cookie, a queued packet).
    Done,
}

/// One peer's Noise state: handshakes, sessions and timers. Idle, it holds no heap.
pub struct NoisePeer {
    identity: Arc<Identity>,
    peer_public: [u8; 32],
    psk: [u8; 32],
    /// The preshared key before the latest change, and until when it is still tried.
    previous_psk: Option<Box<([u8; 32], Instant)>>,
    index: u32,
    session_counter: u8,
    persistent_keepalive: Option<u16>,
    mtu: u16,
    handshake: Option<Box<InitiatorHandshake>>,
    keypairs: Keypairs,
    last_timestamp: [u8; 12],
    last_initiation_consumed: Option<Instant>,
    last_handshake: Option<Instant>,
    jar: cookie::CookieJar,
    timers: Timers,
    jitter: Jitter,
    queue: VecDeque<Box<[u8]>>,
}

impl NoisePeer {
    /// `index` names this peer among the device's peers (below 2^24, higher bits are
    /// dropped). `now` starts nothing: timers run from the first input.
    pub fn new(
        identity: Arc<Identity>,
        peer_public: [u8; 32],
        psk: Option<[u8; 32]>,
        index: u32,
        now: Instant,
    ) -> NoisePeer {
        let _ = now;
        // Jitter differs per peer without a clock or an OS RNG, and tests can reproduce it.
        let seed =
            u64::from_le_bytes(peer_public[..8].try_into().unwrap_or_default()) ^ u64::from(index);
        NoisePeer {
            identity,
            peer_public,
            psk: psk.unwrap_or_default(),
            previous_psk: None,
            index: index & 0x00ff_ffff,
            session_counter: 0,
            persistent_keepalive: None,
            mtu: DEFAULT_MTU,
            handshake: None,
            keypairs: Keypairs::default(),
            last_timestamp: [0; 12],
            last_initiation_consumed: None,
            last_handshake: None,
            jar: cookie::CookieJar::default(),
            timers: Timers::default(),
            jitter: Jitter::new(seed),
            queue: VecDeque::new(),
        }
    }

    /// Replaces the seed of the retransmission jitter (tests make it reproducible).
    pub fn with_jitter_seed(mut self, seed: u64) -> NoisePeer {
        self.jitter = Jitter::new(seed);
        self
    }

    pub fn peer_public(&self) -> &[u8; 32] {
        &self.peer_public
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// Used by every handshake message processed from now on; the sessions already
    /// established keep their keys until the next handshake replaces them. Until a
    /// handshake under the new key completes (at most [`PSK_GRACE`]), a response made
    /// with the previous key is accepted too.
    pub fn set_preshared_key(&mut self, now: Instant, psk: Option<[u8; 32]>) {
        let psk = psk.unwrap_or_default();
        if psk != self.psk {
            let old = std::mem::replace(&mut self.psk, psk);
            self.previous_psk = Some(Box::new((old, now + PSK_GRACE)));
        }
    }

    /// Starts (with a keepalive at once) or stops persistent keepalives.
    pub fn set_persistent_keepalive(&mut self, now: Instant, seconds: Option<u16>) {
        self.persistent_keepalive = seconds.filter(|s| *s > 0);
        self.timers.persistent = self.persistent_keepalive.map(|_| now);
    }

    /// Plaintext padding never grows a packet past this size.
    pub fn set_mtu(&mut self, mtu: u16) {
        self.mtu = mtu;
    }

    /// Time since the last completed handshake.
    pub fn last_handshake(&self, now: Instant) -> Option<Duration> {
        self.last_handshake
            .map(|t| now.saturating_duration_since(t))
    }

    /// Holds nothing worth keeping: no key material (or it is due to be erased), no
    /// handshake in flight, nothing queued and no persistent keepalive to send.
    pub fn is_expired(&self, now: Instant) -> bool {
        let keys_gone = self.keypairs.is_empty() || self.timers.zero_keys.is_some_and(|t| t <= now);
        keys_gone
            && self.handshake.is_none()
            && self.queue.is_empty()
            && self.persistent_keepalive.is_none()
    }

    /// Whether a session can carry data to the peer now.
    pub fn has_session(&self, now: Instant) -> bool {
        self.keypairs
            .current
            .as_ref()
            .is_some_and(|kp| kp.can_send(now))
    }

    /// The next instant [`NoisePeer::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.earliest()
    }

    /// Encrypts `packet` for the peer, or queues it and starts a handshake.
    pub fn encapsulate<'a>(
        &mut self,
        now: Instant,
        packet: &[u8],
        out: &'a mut [u8],
    ) -> Result<Output<'a>, NoiseError> {
        if self.has_session(now) {
            let n = self.seal_current(now, packet, out)?;
            return Ok(Output::Transmit(&mut out[..n]));
        }
        if self.queue.len() >= MAX_QUEUED {
            self.queue.pop_front();
        }
        self.queue.push_back(packet.into());
        self.initiate_for_traffic(now, out)
    }

    /// Processes a datagram from the peer.
    pub fn decapsulate<'a>(
        &mut self,
        now: Instant,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Result<Output<'a>, NoiseError> {
        match Message::parse(datagram)? {
            Message::Initiation { .. } => {
                let opened = self.identity.open_initiation(datagram)?;
                self.accept_initiation(now, &opened, out)
            }
            Message::Response {
                receiver, bytes, ..
            } => self.accept_response(now, receiver, bytes, out),
            Message::CookieReply { receiver, bytes } => {
                let pending = self.handshake.as_ref().map(|hs| hs.local_index);
                let next = self.keypairs.next.as_ref().map(|kp| kp.local_index);
                if pending != Some(receiver) && next != Some(receiver) {
                    return Err(NoiseError::UnknownIndex);
                }
                self.jar
                    .consume_reply(now, &PublicHashes::of(&self.peer_public), bytes)?;
                Ok(Output::Done)
            }
            Message::Data {
                receiver,
                counter,
                bytes,
            } => self.open_data(now, receiver, counter, bytes, out),
        }
    }

    /// Answers an initiation the device opened and found to come from this peer.
    pub fn accept_initiation<'a>(
        &mut self,
        now: Instant,
        opened: &OpenedInitiation,
        out: &'a mut [u8],
    ) -> Result<Output<'a>, NoiseError> {
        if opened.peer_public != self.peer_public {
            return Err(NoiseError::WrongPeer);
        }
        if opened.timestamp <= self.last_timestamp {
            return Err(NoiseError::TimestampReplay);
        }
        if self
            .last_initiation_consumed
            .is_some_and(|t| now.saturating_duration_since(t) < INITIATION_MIN_INTERVAL)
        {
            return Err(NoiseError::InitiationFlood);
        }
        let Some(msg) = out.get_mut(..RESPONSE_LEN) else {
            return Err(NoiseError::BufferTooSmall);
        };
        let msg: &mut [u8; RESPONSE_LEN] =
            msg.try_into().map_err(|_| NoiseError::BufferTooSmall)?;
        let local = self.next_local_index();
        let keys = create_response(opened, &self.psk, local, msg)?;
        self.jar.add_macs(
            now,
            &PublicHashes::of(&self.peer_public),
            msg,
            offset::RESP_MAC1,
        );
        self.last_timestamp = opened.timestamp;
        self.last_initiation_consumed = Some(now);
        self.keypairs
            .install_responder(Keypair::new(&keys, local, false, now));
        // A crossing initiation of ours is superseded: the peer's handshake wins.
        self.handshake = None;
        self.timers.session_derived(now);
        self.timers.authenticated_sent();
        self.timers.traversal(now, self.persistent_keepalive);
        tracing::debug!(index = self.index, "handshake initiation answered");
        Ok(Output::Transmit(msg))
    }

    /// Encrypts the next packet that waited for a session, if there is a session.
    pub fn poll_queued<'a>(
        &mut self,
        now: Instant,
        out: &'a mut [u8],
    ) -> Result<Option<&'a mut [u8]>, NoiseError> {
        if self.queue.is_empty() || !self.has_session(now) {
            return Ok(None);
        }
        let Some(packet) = self.queue.pop_front() else {
            return Ok(None);
        };
        match self.seal_current(now, &packet, out) {
            Ok(n) => Ok(Some(&mut out[..n])),
            Err(e) => {
                self.queue.push_front(packet);
                Err(e)
            }
        }
    }

    /// Runs the timers that are due at `now`; returns at most one datagram to send. Call
    /// again until it returns `None`.
    pub fn handle_timeout<'a>(
        &mut self,
        now: Instant,
        out: &'a mut [u8],
    ) -> Result<Option<&'a mut [u8]>, NoiseError> {
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        if due(self.timers.zero_keys) {
            tracing::debug!(
                index = self.index,
                "no handshake for 540 s: erasing session keys"
            );
            self.keypairs.clear();
            self.handshake = None;
            self.queue.clear();
            let persistent = self.timers.persistent;
            let last_initiation = self.timers.last_initiation;
            self.timers = Timers {
                persistent,
                last_initiation,
                ..Timers::default()
            };
        }
        if due(self.timers.retransmit) {
            let gave_up = self
                .timers
                .attempts_since
                .is_some_and(|t| now.saturating_duration_since(t) >= REKEY_ATTEMPT_TIME);
            if gave_up {
                tracing::debug!(index = self.index, "handshake did not complete within 90 s");
                self.timers.retransmit = None;
                self.timers.attempts_since = None;
                self.handshake = None;
                self.queue.clear();
                self.timers.zero_keys.get_or_insert(now + ZERO_KEYS_AFTER);
            } else {
                return self.send_initiation(now, out, true).map(Some);
            }
        }
        if due(self.timers.rekey) {
            self.timers.rekey = None;
            let waiting = !self.has_session(now) && !self.queue.is_empty();
            if self.handshake.is_none() && (waiting || self.current_wants_rekey(now)) {
                if self.timers.may_initiate(now) {
                    return self.send_initiation(now, out, false).map(Some);
                }
                self.timers.rekey = Some(self.timers.initiation_allowed_at(now));
            }
        }
        if due(self.timers.new_handshake) {
            self.timers.new_handshake = None;
            if self.timers.may_initiate(now) {
                tracing::debug!(
                    index = self.index,
                    "no answer to data for 15 s: new handshake"
                );
                return self.send_initiation(now, out, false).map(Some);
            }
        }
        if due(self.timers.keepalive) {
            let again = self.timers.another_keepalive;
            self.timers.keepalive = None;
            let sent = self.send_keepalive(now, out)?;
            if again {
                self.timers.keepalive = Some(now + KEEPALIVE_TIMEOUT);
            }
            if let Some(n) = sent {
                return Ok(Some(&mut out[..n]));
            }
        }
        if due(self.timers.persistent) {
            self.timers.persistent = None;
            return Ok(self.send_keepalive(now, out)?.map(|n| &mut out[..n]));
        }
        Ok(None)
    }

    /// Sends an initiation now regardless of the once-per-REKEY_TIMEOUT limit (after a
    /// key change, so that the peer does not wait for its own timers).
    pub fn force_handshake<'a>(
        &mut self,
        now: Instant,
        out: &'a mut [u8],
    ) -> Result<&'a mut [u8], NoiseError> {
        self.send_initiation(now, out, false)
    }

    fn next_local_index(&mut self) -> u32 {
        self.session_counter = self.session_counter.wrapping_add(1);
        (self.index << 8) | u32::from(self.session_counter)
    }

    fn seal_current(
        &mut self,
        now: Instant,
        packet: &[u8],
        out: &mut [u8],
    ) -> Result<usize, NoiseError> {
        let Some(kp) = self.keypairs.current.as_deref_mut() else {
            return Err(NoiseError::SessionExpired);
        };
        let n = kp.seal(packet, usize::from(self.mtu), out)?;
        // The same test as current_wants_rekey, on the key pair already at hand.
        let wants_rekey = kp.send_counter > REKEY_AFTER_MESSAGES
            || (kp.initiator && kp.age(now) >= REKEY_AFTER_TIME);
        if wants_rekey && self.handshake.is_none() {
            self.timers.rekey.get_or_insert(now);
        }
        if !packet.is_empty() {
            self.timers.data_sent(now);
        }
        self.timers.authenticated_sent();
        self.timers.traversal(now, self.persistent_keepalive);
        Ok(n)
    }

    /// The current session asks for a successor: too many messages, or (initiator only)
    /// too old.
    fn current_wants_rekey(&self, now: Instant) -> bool {
        self.keypairs.current.as_ref().is_some_and(|kp| {
            kp.send_counter > REKEY_AFTER_MESSAGES
                || (kp.initiator && kp.age(now) >= REKEY_AFTER_TIME)
        })
    }

    /// A keepalive on the current session, or a handshake initiation if there is none
    /// (and none is on its way); the length written into `out`.
    pub fn send_keepalive(
        &mut self,
        now: Instant,
        out: &mut [u8],
    ) -> Result<Option<usize>, NoiseError> {
        if self.has_session(now) {
            return self.seal_current(now, &[], out).map(Some);
        }
        match self.initiate_for_traffic(now, out)? {
            Output::Transmit(d) => Ok(Some(d.len())),
            _ => Ok(None),
        }
    }

    /// Traffic is waiting and no session carries it: start a handshake unless one is on
    /// its way (ours in flight, or the peer's that we answered and it has yet to confirm).
    fn initiate_for_traffic<'a>(
        &mut self,
        now: Instant,
        out: &'a mut [u8],
    ) -> Result<Output<'a>, NoiseError> {
        if self.handshake.is_some() {
            return Ok(Output::Done);
        }
        let next = self.keypairs.next.as_ref();
        if let Some(next) = next.filter(|kp| kp.age(now) < REKEY_TIMEOUT) {
            // The peer's handshake awaits its confirmation; if it does not come, initiate.
            self.timers.rekey = Some(next.born + REKEY_TIMEOUT);
            return Ok(Output::Done);
        }
        if !self.timers.may_initiate(now) {
            // Held back by the rate limit: come back for the waiting traffic when it lifts.
            self.timers.rekey = Some(self.timers.initiation_allowed_at(now));
            return Ok(Output::Done);
        }
        self.send_initiation(now, out, false).map(Output::Transmit)
    }

    fn send_initiation<'a>(
        &mut self,
        now: Instant,
        out: &'a mut [u8],
        retry: bool,
    ) -> Result<&'a mut [u8], NoiseError> {
        let Some(msg) = out.get_mut(..INITIATION_LEN) else {
            return Err(NoiseError::BufferTooSmall);
        };
        let msg: &mut [u8; INITIATION_LEN] =
            msg.try_into().map_err(|_| NoiseError::BufferTooSmall)?;
        if !retry {
            self.timers.attempts_since = None;
        }
        let local = self.next_local_index();
        let hs = create_initiation(&self.identity, &self.peer_public, local, now, msg)?;
        self.jar.add_macs(
            now,
            &PublicHashes::of(&self.peer_public),
            msg,
            offset::INIT_MAC1,
        );
        self.handshake = Some(Box::new(hs));
        self.timers.initiation_sent(now, &mut self.jitter);
        self.timers.rekey = None;
        self.timers.authenticated_sent();
        self.timers.traversal(now, self.persistent_keepalive);
        tracing::debug!(index = self.index, retry, "handshake initiation sent");
        Ok(msg)
    }

    fn accept_response<'a>(
        &mut self,
        now: Instant,
        receiver: u32,
        bytes: &[u8; RESPONSE_LEN],
        out: &'a mut [u8],
    ) -> Result<Output<'a>, NoiseError> {
        let Some(hs) = self
            .handshake
            .as_deref()
            .filter(|hs| hs.local_index == receiver)
        else {
            return Err(NoiseError::UnknownIndex);
        };
        if !cookie::mac1_valid(&self.identity.hashes.mac1_key, bytes, offset::RESP_MAC1) {
            return Err(NoiseError::InvalidMac);
        }
        let previous = self
            .previous_psk
            .as_deref()
            .filter(|(_, until)| now < *until)
            .map(|(k, _)| k);
        let (keys, which) = match previous {
            Some(old) => consume_response(&self.identity, hs, &[&self.psk, old], bytes)?,
            None => consume_response(&self.identity, hs, &[&self.psk], bytes)?,
        };
        if which == 0 {
            // The peer has the new key: the old one is no longer needed.
            self.previous_psk = None;
        } else {
            tracing::debug!(
                index = self.index,
                "handshake response under the previous preshared key"
            );
        }
        self.handshake = None;
        self.keypairs
            .install_initiator(Keypair::new(&keys, receiver, true, now));
        self.last_handshake = Some(now);
        self.timers.handshake_complete();
        self.timers.session_derived(now);
        self.timers.authenticated_received();
        self.timers.traversal(now, self.persistent_keepalive);
        tracing::debug!(index = self.index, "handshake complete (initiator)");
        // The responder may send only once we have: confirm with the first waiting
        // packet, or with a keepalive.
        let packet = self.queue.pop_front();
        let confirm = packet.as_deref().unwrap_or(&[]);
        match self.seal_current(now, confirm, out) {
            Ok(n) => Ok(Output::Transmit(&mut out[..n])),
            Err(e) => {
                if let Some(p) = packet {
                    self.queue.push_front(p);
                }
                Err(e)
            }
        }
    }

    fn open_data<'a>(
        &mut self,
        now: Instant,
        receiver: u32,
        counter: u64,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Result<Output<'a>, NoiseError> {
        let Some((slot, kp)) = self.keypairs.find(receiver) else {
            return Err(NoiseError::UnknownIndex);
        };
        if !kp.can_receive(now) {
            return Err(NoiseError::SessionExpired);
        }
        let n = kp.open(counter, datagram, out)?;
        let rekey = slot == Slot::Current && kp.initiator && kp.age(now) >= REKEY_ON_RECEIVE_AFTER;
        if slot == Slot::Next {
            self.keypairs.promote_next();
            self.last_handshake = Some(now);
            self.timers.handshake_complete();
            tracing::debug!(index = self.index, "handshake complete (responder)");
        }
        if rekey && self.handshake.is_none() {
            self.timers.rekey.get_or_insert(now);
        }
        self.timers.authenticated_received();
        self.timers.traversal(now, self.persistent_keepalive);
        if n == 0 {
            return Ok(Output::Done);
        }
        self.timers.data_received(now);
        let (len, source) = inner_packet(&out[..n])?;
        Ok(Output::Deliver {
            packet: &mut out[..len],
            source,
        })
    }

    #[cfg(test)]
    pub(crate) fn current_keypair(&mut self) -> Option<&mut Keypair> {
        self.keypairs.current.as_deref_mut()
    }
}

impl std::fmt::Debug for NoisePeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoisePeer")
            .field("index", &self.index)
            .field("peer_public", &self.peer_public)
            .field("handshake_in_flight", &self.handshake.is_some())
            .field("queued", &self.queue.len())
            .finish_non_exhaustive()
    }
}
