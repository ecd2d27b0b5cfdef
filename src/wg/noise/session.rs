//! Transport sessions (whitepaper 5.4.6): a key pair per handshake, the send counter, the
//! receive replay window, and data messages sealed and opened into the caller's buffer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ring::aead::{Aad, LessSafeKey};

use super::handshake::SessionKeys;
use super::messages::{DATA_HEADER_LEN, DATA_OVERHEAD, TYPE_DATA};
use super::primitives::{aead_key, nonce};
use super::timers::{REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME};
use super::NoiseError;

const WINDOW_WORDS: usize = 32;
const WORD_BITS: u64 = 64;
/// Counters this far behind the highest one received are still accepted once. One word
/// of the 2048-bit ring is always being recycled, so 1984 are usable (RFC 6479).
pub const REPLAY_WINDOW: u64 = (WINDOW_WORDS as u64 - 1) * WORD_BITS;

/// RFC 6479's sliding window as a ring of 64-bit words: moving forward clears whole
/// words instead of shifting bits.
#[derive(Clone)]
pub(crate) struct ReplayWindow {
    ring: [u64; WINDOW_WORDS],
    highest: u64,
}

impl ReplayWindow {
    pub fn new() -> ReplayWindow {
        ReplayWindow {
            ring: [0; WINDOW_WORDS],
            highest: 0,
        }
    }

    /// The cheap check before decryption: false if `counter` is certainly refused.
    pub fn may_accept(&self, counter: u64) -> bool {
        if counter >= REJECT_AFTER_MESSAGES {
            return false;
        }
        if counter > self.highest {
            return true;
        }
        if self.highest - counter > REPLAY_WINDOW {
            return false;
        }
        let (word, bit) = Self::position(counter);
        self.ring[word] & bit == 0
    }

    /// Records an authenticated `counter`; false if it was a replay or too old.
    pub fn accept(&mut self, counter: u64) -> bool {
        if !self.may_accept(counter) {
            return false;
        }
        if counter > self.highest {
            let current = self.highest / WORD_BITS;
            let target = counter / WORD_BITS;
            let steps = (target - current).min(WINDOW_WORDS as u64);
            for i in 1..=steps {
                self.ring[((current + i) % WINDOW_WORDS as u64) as usize] = 0;
            }
            self.highest = counter;
        }
        let (word, bit) = Self::position(counter);
        self.ring[word] |= bit;
        true
    }

    fn position(counter: u64) -> (usize, u64) {
        let word = ((counter / WORD_BITS) % WINDOW_WORDS as u64) as usize;
        (word, 1u64 << (counter % WORD_BITS))
    }
}

/// One handshake's transport keys and counters.
pub(crate) struct Keypair {
    send: LessSafeKey,
    recv: LessSafeKey,
    pub send_counter: u64,
    pub remote_index: u32,
    pub local_index: u32,
    pub born: Instant,
    /// Whether this side sent the initiation: only the initiator rekeys on age.
    pub initiator: bool,
    replay: ReplayWindow,
}

impl Keypair {
    pub fn new(keys: &SessionKeys, local_index: u32, initiator: bool, now: Instant) -> Keypair {
        Keypair {
            send: aead_key(&keys.send),
            recv: aead_key(&keys.recv),
            send_counter: 0,
            remote_index: keys.remote_index,
            local_index,
            born: now,
            initiator,
            replay: ReplayWindow::new(),
        }
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.born)
    }

    /// Usable for sending: younger than REJECT_AFTER_TIME, counter not exhausted.
    pub fn can_send(&self, now: Instant) -> bool {
        self.age(now) < REJECT_AFTER_TIME && self.send_counter < REJECT_AFTER_MESSAGES
    }

    pub fn can_receive(&self, now: Instant) -> bool {
        self.age(now) < REJECT_AFTER_TIME
    }

    /// Seals `packet` as a data message into `out`, padding the plaintext to a multiple
    /// of 16 bytes but never beyond `max_padded`; returns the datagram length.
    pub fn seal(
        &mut self,
        packet: &[u8],
        max_padded: usize,
        out: &mut [u8],
    ) -> Result<usize, NoiseError> {
        let padded = packet
            .len()
            .next_multiple_of(16)
            .min(max_padded.max(packet.len()));
        let total = padded + DATA_OVERHEAD;
        if out.len() < total {
            return Err(NoiseError::BufferTooSmall);
        }
        if self.send_counter >= REJECT_AFTER_MESSAGES {
            return Err(NoiseError::SessionExpired);
        }
        let counter = self.send_counter;
        self.send_counter += 1;
        let (header, body) = out[..total].split_at_mut(DATA_HEADER_LEN);
        header[0] = TYPE_DATA;
        header[1..4].fill(0);
        header[4..8].copy_from_slice(&self.remote_index.to_le_bytes());
        header[8..16].copy_from_slice(&counter.to_le_bytes());
        let (text, tag_out) = body.split_at_mut(padded);
        text[..packet.len()].copy_from_slice(packet);
        text[packet.len()..].fill(0);
        let tag = self
            .send
            .seal_in_place_separate_tag(nonce(counter), Aad::empty(), text)
            .map_err(|_| NoiseError::BufferTooSmall)?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(total)
    }

    /// Opens a data message into `out` and records its counter; returns the plaintext
    /// length (0 for a keepalive), padding included.
    pub fn open(
        &mut self,
        counter: u64,
        datagram: &[u8],
        out: &mut [u8],
    ) -> Result<usize, NoiseError> {
        if !self.replay.may_accept(counter) {
            return Err(NoiseError::Replay);
        }
        let sealed = &datagram[DATA_HEADER_LEN..];
        if out.len() < sealed.len() {
            return Err(NoiseError::BufferTooSmall);
        }
        let buf = &mut out[..sealed.len()];
        buf.copy_from_slice(sealed);
        let n = self
            .recv
            .open_in_place(nonce(counter), Aad::empty(), buf)
            .map_err(|_| NoiseError::DecryptFailed)?
            .len();
        if !self.replay.accept(counter) {
            return Err(NoiseError::Replay);
        }
        Ok(n)
    }

    #[cfg(test)]
    pub fn set_send_counter(&mut self, counter: u64) {
        self.send_counter = counter;
    }
}

/// The length an inner IP packet declares and its source address; padding after that
/// length is cut off by the caller.
pub(crate) fn inner_packet(plain: &[u8]) -> Result<(usize, IpAddr), NoiseError> {
    match plain.first().map(|b| b >> 4) {
        Some(4) if plain.len() >= 20 => {
            let len = u16::from_be_bytes([plain[2], plain[3]]) as usize;
            if len < 20 || len > plain.len() {
                return Err(NoiseError::InvalidPacket);
            }
            let src = Ipv4Addr::new(plain[12], plain[13], plain[14], plain[15]);
            Ok((len, IpAddr::V4(src)))
        }
        Some(6) if plain.len() >= 40 => {
            let len = 40 + u16::from_be_bytes([plain[4], plain[5]]) as usize;
            if len > plain.len() {
                return Err(NoiseError::InvalidPacket);
            }
            let mut src = [0u8; 16];
            src.copy_from_slice(&plain[8..24]);
            Ok((len, IpAddr::V6(Ipv6Addr::from(src))))
        }
        _ => Err(NoiseError::InvalidPacket),
    }
}

/// The three slots of section 6.1's rotation. `next` is a responder's key pair that the
/// initiator has not confirmed yet by sending on it.
#[derive(Default)]
pub(crate) struct Keypairs {
    pub current: Option<Box<Keypair>>,
    pub previous: Option<Box<Keypair>>,
    pub next: Option<Box<Keypair>>,
}

/// Which slot a receiver index named.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Slot {
    Current,
    Previous,
    Next,
}

impl Keypairs {
    pub fn is_empty(&self) -> bool {
        self.current.is_none() && self.previous.is_none() && self.next.is_none()
    }

    pub fn clear(&mut self) {
        *self = Keypairs::default();
    }

    /// The initiator's new key pair is confirmed by the response itself.
    pub fn install_initiator(&mut self, kp: Keypair) {
        self.previous = match self.next.take() {
            Some(next) => Some(next),
            None => self.current.take(),
        };
        self.current = Some(Box::new(kp));
    }

    /// The responder waits for the first data message on the new key pair.
    pub fn install_responder(&mut self, kp: Keypair) {
        self.next = Some(Box::new(kp));
        self.previous = None;
    }

    /// The first data on `next` confirms it: it becomes current.
    pub fn promote_next(&mut self) {
        if let Some(next) = self.next.take() {
            self.previous = self.current.replace(next);
        }
    }

    pub fn find(&mut self, local_index: u32) -> Option<(Slot, &mut Keypair)> {
        let Keypairs {
            current,
            previous,
            next,
        } = self;
        [
            (Slot::Current, current),
            (Slot::Next, next),
            (Slot::Previous, previous),
        ]
        .into_iter()
        .find_map(|(slot, kp)| match kp {
            Some(kp) if kp.local_index == local_index => Some((slot, &mut **kp)),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window_accepts_reordered_refuses_duplicate_and_too_old() {
        let mut w = ReplayWindow::new();
        assert!(w.accept(0));
        assert!(!w.accept(0), "duplicate");
        assert!(w.accept(5));
        assert!(w.accept(3), "reordered but inside the window");
        assert!(w.accept(4));
        assert!(!w.accept(3), "duplicate after reordering");
        assert!(w.accept(5000));
        assert!(
            w.accept(5000 - REPLAY_WINDOW),
            "the oldest counter still inside"
        );
        assert!(!w.accept(5000 - REPLAY_WINDOW - 1), "one behind the window");
        assert!(!w.accept(5), "far behind");
        // A jump larger than the whole ring forgets everything before it.
        assert!(w.accept(1_000_000));
        assert!(!w.accept(5000));
        assert!(w.accept(999_999));
        assert!(
            !w.accept(REJECT_AFTER_MESSAGES),
            "counter at the reject limit"
        );
        assert!(!w.accept(u64::MAX));
    }

    #[test]
    fn replay_window_matches_a_plain_set_model() {
        // Deterministic pseudo-random walk compared with an obviously correct model.
        let mut w = ReplayWindow::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut highest = 0u64;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let c = (highest + 64).saturating_sub(x % 2200);
            let model = c < REJECT_AFTER_MESSAGES
                && !seen.contains(&c)
                && (c > highest || highest - c <= REPLAY_WINDOW);
            assert_eq!(w.accept(c), model, "counter {c}, highest {highest}");
            if model {
                seen.insert(c);
                highest = highest.max(c);
            }
        }
    }
}
