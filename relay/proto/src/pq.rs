//! Post-quantum preshared keys: an X-Wing (X25519 + ML-KEM-768) encapsulation to the
//! relay's X-Wing key, turned into a WireGuard preshared key bound to its context.
//!
//! The agent encapsulates to the relay's public key and sends only the ciphertext;
//! both sides then derive the same preshared key from the shared secret. Recording
//! the tunnel today and breaking X25519 later does not reveal the key, because the
//! ML-KEM half of X-Wing holds up against a quantum computer.
//!
//! The key is bound to everything that names the tunnel it is for, so a ciphertext
//! replayed for another peer, another relay or another rotation yields a useless key:
//!
//! ```text
//! psk = HKDF-SHA256(salt = LABEL, ikm = X-Wing shared secret,
//!                   info = LABEL || peer WG key || relay WG key || relay X-Wing key || counter (u64 BE))
//! ```

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sidecar::Key;
use x_wing::{Decapsulate, Decapsulator, Encapsulate, KeyExport};

/// Size of the relay's X-Wing public (encapsulation) key.
pub const PUBLIC_KEY_LEN: usize = x_wing::ENCAPSULATION_KEY_SIZE;
/// Size of an X-Wing ciphertext.
pub const CIPHERTEXT_LEN: usize = x_wing::CIPHERTEXT_SIZE;
/// Size of the stored secret (the X-Wing seed).
pub const SECRET_LEN: usize = x_wing::DECAPSULATION_KEY_SIZE;

/// Domain separation: this KDF output is a WireGuard preshared key and nothing else.
const LABEL: &[u8] = b"sidecar v1 wireguard psk from x-wing";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PqError {
    #[error("the X-Wing public key must be base64 of {PUBLIC_KEY_LEN} bytes")]
    BadPublicKey,
    #[error("the X-Wing ciphertext must be base64 of {CIPHERTEXT_LEN} bytes")]
    BadCiphertext,
}

/// A WireGuard preshared key. Never printed: `Debug` shows only that one is set.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Psk(pub [u8; 32]);

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

impl Psk {
    /// The key in the engine's key type (what its peer configuration takes).
    pub fn to_key(self) -> Key {
        Key(self.0)
    }

    /// Base64, as `wg set ... preshared-key FILE` reads it.
    pub fn to_base64(self) -> String {
        STANDARD.encode(self.0)
    }
}

/// The X-Wing shared secret of one encapsulation; only ever fed to [`derive_psk`].
pub struct SharedSecret([u8; 32]);

impl fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedSecret(<redacted>)")
    }
}

impl SharedSecret {
    /// The raw secret, for checks against known answers.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Everything a preshared key is bound to.
#[derive(Clone, Copy, Debug)]
pub struct PskContext<'a> {
    /// The peer's (agent's) WireGuard public key.
    pub peer: &'a Key,
    /// The relay's WireGuard public key.
    pub relay: &'a Key,
    /// The relay's X-Wing public key, as published.
    pub relay_xwing: &'a [u8],
    /// How many encapsulations this peer's registration has had, this one included.
    pub counter: u64,
}

/// The labelled KDF from a shared secret to the preshared key for `ctx`.
pub fn derive_psk(secret: &SharedSecret, ctx: &PskContext<'_>) -> Psk {
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, LABEL);
    let prk = salt.extract(&secret.0);
    let counter = ctx.counter.to_be_bytes();
    let info: [&[u8]; 5] = [LABEL, &ctx.peer.0, &ctx.relay.0, ctx.relay_xwing, &counter];
    let mut out = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit, so neither step can fail.
    prk.expand(&info, PskLen)
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 yields 32 bytes");
    Psk(out)
}

struct PskLen;

impl ring::hkdf::KeyType for PskLen {
    fn len(&self) -> usize {
        32
    }
}

/// Encapsulates to the relay's X-Wing public key (raw bytes): the ciphertext to
/// send and the shared secret to derive from.
pub fn encapsulate(relay_xwing: &[u8]) -> Result<(Vec<u8>, SharedSecret), PqError> {
    let ek = x_wing::EncapsulationKey::try_from(relay_xwing).map_err(|_| PqError::BadPublicKey)?;
    let (ct, ss) = ek.encapsulate();
    Ok((ct.to_vec(), SharedSecret(ss.into())))
}

/// Decodes a base64 X-Wing public key as the API publishes it.
pub fn decode_public_key(text: &str) -> Result<Vec<u8>, PqError> {
    let bytes = STANDARD.decode(text).map_err(|_| PqError::BadPublicKey)?;
    if bytes.len() != PUBLIC_KEY_LEN {
        return Err(PqError::BadPublicKey);
    }
    Ok(bytes)
}

/// Decodes a base64 X-Wing ciphertext as a registration carries it.
pub fn decode_ciphertext(text: &str) -> Result<Vec<u8>, PqError> {
    let bytes = STANDARD.decode(text).map_err(|_| PqError::BadCiphertext)?;
    if bytes.len() != CIPHERTEXT_LEN {
        return Err(PqError::BadCiphertext);
    }
    Ok(bytes)
}

/// The relay's X-Wing key pair.
pub struct RelayKem {
    dk: x_wing::DecapsulationKey,
    public: Vec<u8>,
}

/// Never print the secret.
impl fmt::Debug for RelayKem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayKem").finish_non_exhaustive()
    }
}

impl RelayKem {
    /// A fresh key pair from the operating system's RNG.
    pub fn generate() -> RelayKem {
        let (dk, _) = <x_wing::XWingKem as x_wing::Kem>::generate_keypair();
        RelayKem::from_decapsulation_key(dk)
    }

    /// The key pair of a stored secret (the 32-byte X-Wing seed).
    pub fn from_secret(secret: [u8; SECRET_LEN]) -> RelayKem {
        RelayKem::from_decapsulation_key(x_wing::DecapsulationKey::from(secret))
    }

    fn from_decapsulation_key(dk: x_wing::DecapsulationKey) -> RelayKem {
        let public = dk.encapsulation_key().to_bytes().to_vec();
        RelayKem { dk, public }
    }

    /// What to store (mode 0600) to get this key pair back.
    pub fn secret(&self) -> &[u8; SECRET_LEN] {
        self.dk.as_bytes()
    }

    /// The public key, raw.
    pub fn public_key(&self) -> &[u8] {
        &self.public
    }

    /// The public key, base64, as the API publishes it.
    pub fn public_key_base64(&self) -> String {
        STANDARD.encode(&self.public)
    }

    /// The shared secret of a ciphertext. X-Wing rejects implicitly: a ciphertext
    /// that was not made for this key still decapsulates, to a secret nobody else
    /// has, so a forged one only yields a preshared key that fails the handshake.
    pub fn decapsulate(&self, ciphertext: &[u8]) -> Result<SharedSecret, PqError> {
        let ct = x_wing::Ciphertext::try_from(ciphertext).map_err(|_| PqError::BadCiphertext)?;
        Ok(SharedSecret(self.dk.decapsulate(&ct).into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: Key = Key([1; 32]);
    const RELAY: Key = Key([2; 32]);

    fn ctx<'a>(relay: &'a RelayKem, counter: u64) -> PskContext<'a> {
        PskContext {
            peer: &PEER,
            relay: &RELAY,
            relay_xwing: relay.public_key(),
            counter,
        }
    }

    #[test]
    fn both_sides_derive_the_same_key_and_only_the_ciphertext_travels() {
        let relay = RelayKem::generate();
        let (ct, agent_secret) = encapsulate(relay.public_key()).unwrap();
        assert_eq!(ct.len(), CIPHERTEXT_LEN);
        let relay_secret = relay.decapsulate(&ct).unwrap();
        let agent = derive_psk(&agent_secret, &ctx(&relay, 1));
        assert_eq!(agent, derive_psk(&relay_secret, &ctx(&relay, 1)));
        assert_ne!(agent.0, [0; 32]);
        assert!(!format!("{agent:?}").contains(&agent.to_base64()));
        assert!(!format!("{agent_secret:?}{relay:?}").contains(&STANDARD.encode(relay.secret())));
    }

    #[test]
    fn the_key_is_bound_to_its_whole_context() {
        let relay = RelayKem::generate();
        let other = RelayKem::generate();
        let (ct, ss) = encapsulate(relay.public_key()).unwrap();
        let base = derive_psk(&ss, &ctx(&relay, 1));
        let other_peer = Key([3; 32]);
        let variants = [
            PskContext {
                counter: 2,
                ..ctx(&relay, 1)
            },
            PskContext {
                peer: &other_peer,
                ..ctx(&relay, 1)
            },
            PskContext {
                relay: &other_peer,
                ..ctx(&relay, 1)
            },
            PskContext {
                relay_xwing: other.public_key(),
                ..ctx(&relay, 1)
            },
        ];
        for v in variants {
            assert_ne!(derive_psk(&ss, &v), base, "{v:?}");
        }
        // A ciphertext for another relay's key gives that relay a different secret.
        let wrong = other.decapsulate(&ct).unwrap();
        assert_ne!(derive_psk(&wrong, &ctx(&relay, 1)), base);
    }

    #[test]
    fn a_stored_secret_gives_back_the_same_key_pair() {
        let relay = RelayKem::generate();
        let again = RelayKem::from_secret(*relay.secret());
        assert_eq!(again.public_key(), relay.public_key());
        assert_eq!(relay.public_key().len(), PUBLIC_KEY_LEN);
        let decoded = decode_public_key(&relay.public_key_base64()).unwrap();
        assert_eq!(decoded, relay.public_key());
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let relay = RelayKem::generate();
        assert_eq!(encapsulate(&[0; 10]).unwrap_err(), PqError::BadPublicKey);
        assert_eq!(
            relay.decapsulate(&[0; 10]).unwrap_err(),
            PqError::BadCiphertext
        );
        assert_eq!(
            decode_ciphertext("AAAA").unwrap_err(),
            PqError::BadCiphertext
        );
        assert_eq!(
            decode_ciphertext("not base64!").unwrap_err(),
            PqError::BadCiphertext
        );
        assert_eq!(
            decode_public_key("AAAA").unwrap_err(),
            PqError::BadPublicKey
        );
        let ok = STANDARD.encode([7u8; CIPHERTEXT_LEN]);
        assert_eq!(decode_ciphertext(&ok).unwrap().len(), CIPHERTEXT_LEN);
    }
}
