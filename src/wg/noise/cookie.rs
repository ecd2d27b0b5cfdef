//! Section 5.4.7: mac1 on every handshake message, and under load mac2 keyed with a
//! cookie bound to the sender's address. The device keeps one [`CookieGate`]; each peer
//! keeps a [`CookieJar`] for the cookies its own handshakes are answered with.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{KeyInit, Tag, XChaCha20Poly1305, XNonce};
use rand_core::{OsRng, RngCore};

use super::keys::{Identity, PublicHashes};
use super::messages::{offset, u32_at, Message, COOKIE_REPLY_LEN, TYPE_COOKIE_REPLY};
use super::primitives::{ct_eq, mac};
use super::NoiseError;

/// The cookie secret changes this often, and a received cookie is used no longer.
pub const COOKIE_SECRET_LIFETIME: Duration = Duration::from_secs(120);
/// Handshake messages are counted over windows of this length.
const LOAD_WINDOW: Duration = Duration::from_secs(1);

/// mac1 of `msg`, which ends where mac1 starts, is MAC(HASH(LABEL_MAC1 || receiver), msg).
pub(crate) fn mac1_valid(mac1_key: &[u8; 32], msg: &[u8], mac1_at: usize) -> bool {
    ct_eq(&mac(mac1_key, &msg[..mac1_at]), &msg[mac1_at..mac1_at + 16])
}

fn mac_offsets(msg: &Message<'_>) -> Option<(usize, usize)> {
    match msg {
        Message::Initiation { .. } => Some((offset::INIT_MAC1, offset::INIT_MAC2)),
        Message::Response { .. } => Some((offset::RESP_MAC1, offset::RESP_MAC2)),
        _ => None,
    }
}

/// What the gate decided about a handshake message.
#[derive(Debug, PartialEq, Eq)]
pub enum GateVerdict<'a> {
    /// Process it (mac1 is valid, and mac2 too if the device is under load).
    Pass,
    /// Under load without a valid mac2: send this cookie reply back instead.
    CookieReply(&'a mut [u8]),
}

/// The device-level gate in front of the expensive handshake work. Shared by the
/// device's receive paths (`&self`); the counters sit behind a short lock.
pub struct CookieGate {
    mac1_key: [u8; 32],
    cookie_key: [u8; 32],
    limit: AtomicU32,
    state: Mutex<GateState>,
}

struct GateState {
    secret: [u8; 32],
    secret_born: Option<Instant>,
    window_start: Option<Instant>,
    count: u32,
}

impl GateState {
    fn loaded(&self, now: Instant, limit: u32) -> bool {
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) < LOAD_WINDOW => {
                self.count >= limit
            }
            _ => limit == 0,
        }
    }

    fn count_one(&mut self, now: Instant) {
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) < LOAD_WINDOW => {
                self.count = self.count.saturating_add(1)
            }
            _ => {
                self.window_start = Some(now);
                self.count = 1;
            }
        }
    }

    /// MAC(secret, address || port), with the secret renewed every two minutes.
    fn cookie(&mut self, now: Instant, src: SocketAddr) -> [u8; 16] {
        let stale = self
            .secret_born
            .is_none_or(|born| now.saturating_duration_since(born) >= COOKIE_SECRET_LIFETIME);
        if stale {
            OsRng.fill_bytes(&mut self.secret);
            self.secret_born = Some(now);
        }
        let mut input = [0u8; 18];
        let n = match src.ip() {
            IpAddr::V4(a) => {
                input[..4].copy_from_slice(&a.octets());
                4
            }
            IpAddr::V6(a) => {
                input[..16].copy_from_slice(&a.octets());
                16
            }
        };
        input[n..n + 2].copy_from_slice(&src.port().to_be_bytes());
        mac(&self.secret, &input[..n + 2])
    }
}

impl CookieGate {
    /// `handshakes_per_second` messages pass on mac1 alone in each second; beyond that a
    /// valid mac2 is demanded. 0 demands it always.
    pub fn new(identity: &Identity, handshakes_per_second: u32) -> CookieGate {
        CookieGate {
            mac1_key: identity.hashes.mac1_key,
            cookie_key: identity.hashes.cookie_key,
            limit: AtomicU32::new(handshakes_per_second),
            state: Mutex::new(GateState {
                secret: [0; 32],
                secret_born: None,
                window_start: None,
                count: 0,
            }),
        }
    }

    pub fn set_limit(&self, handshakes_per_second: u32) {
        self.limit.store(handshakes_per_second, Ordering::Relaxed);
    }

    /// Whether the current second has seen as many handshake messages as the limit.
    pub fn under_load(&self, now: Instant) -> bool {
        self.state
            .lock()
            .loaded(now, self.limit.load(Ordering::Relaxed))
    }

    /// Gates an initiation or a response from `src`. Data messages and cookie replies are
    /// not gated and return [`GateVerdict::Pass`]. `out` receives a cookie reply (64 bytes).
    pub fn check<'a>(
        &self,
        now: Instant,
        src: SocketAddr,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Result<GateVerdict<'a>, NoiseError> {
        let msg = Message::parse(datagram)?;
        let Some((mac1_at, mac2_at)) = mac_offsets(&msg) else {
            return Ok(GateVerdict::Pass);
        };
        if !mac1_valid(&self.mac1_key, datagram, mac1_at) {
            return Err(NoiseError::InvalidMac);
        }
        let cookie = {
            let mut st = self.state.lock();
            let loaded = st.loaded(now, self.limit.load(Ordering::Relaxed));
            st.count_one(now);
            if !loaded {
                return Ok(GateVerdict::Pass);
            }
            st.cookie(now, src)
        };
        if ct_eq(
            &mac(&cookie, &datagram[..mac2_at]),
            &datagram[mac2_at..mac2_at + 16],
        ) {
            return Ok(GateVerdict::Pass);
        }
        if out.len() < COOKIE_REPLY_LEN {
            return Err(NoiseError::BufferTooSmall);
        }
        let out = &mut out[..COOKIE_REPLY_LEN];
        out.fill(0);
        out[0] = TYPE_COOKIE_REPLY;
        // The reply is addressed to the sender index of the message it answers.
        out[4..8].copy_from_slice(&u32_at(datagram, 4).to_le_bytes());
        let mut nonce = [0u8; 24];
        OsRng.fill_bytes(&mut nonce);
        out[offset::COOKIE_NONCE..offset::COOKIE_BODY].copy_from_slice(&nonce);
        let body = &mut out[offset::COOKIE_BODY..offset::COOKIE_BODY + 16];
        body.copy_from_slice(&cookie);
        let aead = XChaCha20Poly1305::new((&self.cookie_key).into());
        let tag = aead
            .encrypt_in_place_detached(
                XNonce::from_slice(&nonce),
                &datagram[mac1_at..mac2_at],
                body,
            )
            .map_err(|_| NoiseError::DecryptFailed)?;
        out[offset::COOKIE_BODY + 16..].copy_from_slice(&tag);
        Ok(GateVerdict::CookieReply(out))
    }
}

/// The initiator's side: the mac1 of the last handshake message it sent (a cookie reply
/// is bound to it) and the last cookie received, used for mac2 while it is fresh.
#[derive(Default)]
pub(crate) struct CookieJar {
    last_mac1: Option<[u8; 16]>,
    cookie: Option<([u8; 16], Instant)>,
}

impl CookieJar {
    /// Fills mac1 and mac2 of a handshake message sent to the peer `to`.
    pub fn add_macs(&mut self, now: Instant, to: &PublicHashes, msg: &mut [u8], mac1_at: usize) {
        let mac2_at = mac1_at + 16;
        let mac1 = mac(&to.mac1_key, &msg[..mac1_at]);
        msg[mac1_at..mac2_at].copy_from_slice(&mac1);
        self.last_mac1 = Some(mac1);
        let mac2 = match self.cookie {
            Some((cookie, at)) if now.saturating_duration_since(at) < COOKIE_SECRET_LIFETIME => {
                mac(&cookie, &msg[..mac2_at])
            }
            _ => [0; 16],
        };
        msg[mac2_at..mac2_at + 16].copy_from_slice(&mac2);
    }

    /// Stores the cookie of a reply from the peer `from` to our last handshake message.
    pub fn consume_reply(
        &mut self,
        now: Instant,
        from: &PublicHashes,
        reply: &[u8; COOKIE_REPLY_LEN],
    ) -> Result<(), NoiseError> {
        let Some(mac1) = self.last_mac1 else {
            return Err(NoiseError::UnknownIndex);
        };
        let mut body = [0u8; 16];
        body.copy_from_slice(&reply[offset::COOKIE_BODY..offset::COOKIE_BODY + 16]);
        let tag = Tag::from_slice(&reply[offset::COOKIE_BODY + 16..]);
        let nonce = XNonce::from_slice(&reply[offset::COOKIE_NONCE..offset::COOKIE_BODY]);
        XChaCha20Poly1305::new((&from.cookie_key).into())
            .decrypt_in_place_detached(nonce, &mac1, &mut body, tag)
            .map_err(|_| NoiseError::DecryptFailed)?;
        self.cookie = Some((body, now));
        Ok(())
    }
}
