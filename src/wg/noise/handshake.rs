//! Noise_IKpsk2 as WireGuard uses it (whitepaper 5.4.2 to 5.4.4): the initiation, the
//! response and the derivation of the transport keys. MACs are added and checked in
//! cookie.rs; which session slot the keys go to is decided in mod.rs.

use std::time::Instant;

use rand_core::OsRng;
use x25519_dalek::{PublicKey, StaticSecret};

use super::keys::{initial_chain, Identity};
use super::messages::{
    offset, u32_at, Message, INITIATION_LEN, RESPONSE_LEN, TYPE_INITIATION, TYPE_RESPONSE,
};
use super::primitives::{dh, hash, kdf1, kdf2, kdf3, open, seal, TAG_LEN};
use super::{cookie, NoiseError};

/// What the initiator keeps between sending an initiation and reading the response.
pub(crate) struct InitiatorHandshake {
    ephemeral: StaticSecret,
    ck: [u8; 32],
    h: [u8; 32],
    pub local_index: u32,
}

/// Transport keys of a completed handshake, from this side's point of view.
pub(crate) struct SessionKeys {
    pub send: [u8; 32],
    pub recv: [u8; 32],
    pub remote_index: u32,
}

/// Writes an initiation (without its MACs) to `peer_public` into `msg`.
pub(crate) fn create_initiation(
    identity: &Identity,
    peer_public: &[u8; 32],
    local_index: u32,
    now: Instant,
    msg: &mut [u8; INITIATION_LEN],
) -> Result<InitiatorHandshake, NoiseError> {
    let (ck, h) = initial_chain();
    let h = hash(&[&h, peer_public]);
    let ephemeral = StaticSecret::random_from_rng(OsRng);
    let e_pub = PublicKey::from(&ephemeral).to_bytes();

    msg.fill(0);
    msg[0] = TYPE_INITIATION;
    msg[4..8].copy_from_slice(&local_index.to_le_bytes());
    msg[offset::INIT_EPHEMERAL..offset::INIT_STATIC].copy_from_slice(&e_pub);
    let ck = kdf1(&ck, &e_pub);
    let h = hash(&[&h, &e_pub]);

    let (ck, k) = kdf2(&ck, &dh(&ephemeral, peer_public)?);
    let field = &mut msg[offset::INIT_STATIC..offset::INIT_TIMESTAMP];
    field[..32].copy_from_slice(&identity.public);
    seal(&k, &h, field);
    let h = hash(&[&h, field]);

    let (ck, k) = kdf2(&ck, &dh(&identity.secret, peer_public)?);
    let field = &mut msg[offset::INIT_TIMESTAMP..offset::INIT_MAC1];
    field[..12].copy_from_slice(&identity.stamper.stamp(now));
    seal(&k, &h, field);
    let h = hash(&[&h, field]);

    Ok(InitiatorHandshake {
        ephemeral,
        ck,
        h,
        local_index,
    })
}

/// An initiation whose sender is known and authenticated by its static key, before any
/// per-peer check (timestamp, flood, psk). Opening needs no per-peer state, so the device
/// opens it, looks the peer up by `peer_public` and hands it to that peer.
pub struct OpenedInitiation {
    pub peer_public: [u8; 32],
    pub(crate) sender: u32,
    pub(crate) ephemeral: [u8; 32],
    pub(crate) timestamp: [u8; 12],
    ck: [u8; 32],
    h: [u8; 32],
}

impl std::fmt::Debug for OpenedInitiation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedInitiation")
            .field("peer_public", &self.peer_public)
            .field("sender", &self.sender)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Checks mac1 and decrypts an initiation's static key and timestamp. This costs two
    /// X25519 operations: gate it with [`super::CookieGate`] first.
    pub fn open_initiation(&self, datagram: &[u8]) -> Result<OpenedInitiation, NoiseError> {
        let Message::Initiation { sender, bytes } = Message::parse(datagram)? else {
            return Err(NoiseError::Malformed);
        };
        if !cookie::mac1_valid(&self.hashes.mac1_key, bytes, offset::INIT_MAC1) {
            return Err(NoiseError::InvalidMac);
        }
        let (ck, _) = initial_chain();
        let h = self.responder_h;
        let mut ephemeral = [0u8; 32];
        ephemeral.copy_from_slice(&bytes[offset::INIT_EPHEMERAL..offset::INIT_STATIC]);
        let ck = kdf1(&ck, &ephemeral);
        let h = hash(&[&h, &ephemeral]);

        let (ck, k) = kdf2(&ck, &dh(&self.secret, &ephemeral)?);
        let mut field = [0u8; 32 + TAG_LEN];
        field.copy_from_slice(&bytes[offset::INIT_STATIC..offset::INIT_TIMESTAMP]);
        let mut peer_public = [0u8; 32];
        peer_public.copy_from_slice(open(&k, &h, &mut field)?);
        let h = hash(&[&h, &bytes[offset::INIT_STATIC..offset::INIT_TIMESTAMP]]);

        let (ck, k) = kdf2(&ck, &dh(&self.secret, &peer_public)?);
        let mut field = [0u8; 12 + TAG_LEN];
        field.copy_from_slice(&bytes[offset::INIT_TIMESTAMP..offset::INIT_MAC1]);
        let mut timestamp = [0u8; 12];
        timestamp.copy_from_slice(open(&k, &h, &mut field)?);
        let h = hash(&[&h, &bytes[offset::INIT_TIMESTAMP..offset::INIT_MAC1]]);

        Ok(OpenedInitiation {
            peer_public,
            sender,
            ephemeral,
            timestamp,
            ck,
            h,
        })
    }
}

/// Writes the response (without MACs) to an opened initiation and derives the keys.
pub(crate) fn create_response(
    opened: &OpenedInitiation,
    psk: &[u8; 32],
    local_index: u32,
    msg: &mut [u8; RESPONSE_LEN],
) -> Result<SessionKeys, NoiseError> {
    let ephemeral = StaticSecret::random_from_rng(OsRng);
    let e_pub = PublicKey::from(&ephemeral).to_bytes();

    msg.fill(0);
    msg[0] = TYPE_RESPONSE;
    msg[4..8].copy_from_slice(&local_index.to_le_bytes());
    msg[8..12].copy_from_slice(&opened.sender.to_le_bytes());
    msg[offset::RESP_EPHEMERAL..offset::RESP_EMPTY].copy_from_slice(&e_pub);
    let ck = kdf1(&opened.ck, &e_pub);
    let h = hash(&[&opened.h, &e_pub]);
    let ck = kdf1(&ck, &dh(&ephemeral, &opened.ephemeral)?);
    let ck = kdf1(&ck, &dh(&ephemeral, &opened.peer_public)?);
    let (ck, tau, k) = kdf3(&ck, psk);
    let h = hash(&[&h, &tau]);
    let field = &mut msg[offset::RESP_EMPTY..offset::RESP_MAC1];
    seal(&k, &h, field);

    let (recv, send) = kdf2(&ck, &[]);
    Ok(SessionKeys {
        send,
        recv,
        remote_index: opened.sender,
    })
}

/// Reads a response to our initiation `hs` and derives the keys. The preshared key is
/// mixed in last, so each of `psks` is tried on the same Diffie-Hellman results (a
/// change of preshared key that the peer has not seen yet costs hashes, not DHs);
/// returns the keys and which of `psks` the response was made with.
pub(crate) fn consume_response(
    identity: &Identity,
    hs: &InitiatorHandshake,
    psks: &[&[u8; 32]],
    msg: &[u8; RESPONSE_LEN],
) -> Result<(SessionKeys, usize), NoiseError> {
    if u32_at(msg, 8) != hs.local_index {
        return Err(NoiseError::UnknownIndex);
    }
    let mut e_r = [0u8; 32];
    e_r.copy_from_slice(&msg[offset::RESP_EPHEMERAL..offset::RESP_EMPTY]);
    let ck = kdf1(&hs.ck, &e_r);
    let h = hash(&[&hs.h, &e_r]);
    let ck = kdf1(&ck, &dh(&hs.ephemeral, &e_r)?);
    let ck = kdf1(&ck, &dh(&identity.secret, &e_r)?);
    for (which, psk) in psks.iter().enumerate() {
        let (ck, tau, k) = kdf3(&ck, *psk);
        let h = hash(&[&h, &tau]);
        let mut field = [0u8; TAG_LEN];
        field.copy_from_slice(&msg[offset::RESP_EMPTY..offset::RESP_MAC1]);
        if open(&k, &h, &mut field).is_err() {
            continue;
        }
        let (send, recv) = kdf2(&ck, &[]);
        let keys = SessionKeys {
            send,
            recv,
            remote_index: u32_at(msg, 4),
        };
        return Ok((keys, which));
    }
    Err(NoiseError::DecryptFailed)
}
