//! The protocol's primitives, named as the whitepaper names them: HASH, MAC, HMAC, KDF,
//! AEAD, DH. Everything above this file speaks in these terms.

use blake2::digest::consts::U16;
use blake2::digest::{Digest, KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use x25519_dalek::{PublicKey, StaticSecret};

use super::NoiseError;

pub(crate) const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
pub(crate) const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
pub(crate) const LABEL_MAC1: &[u8] = b"mac1----";
pub(crate) const LABEL_COOKIE: &[u8] = b"cookie--";

pub(crate) const TAG_LEN: usize = 16;

/// HASH(parts[0] || parts[1] || ...).
pub(crate) fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

/// MAC(key, input): keyed BLAKE2s with a 16-byte output.
pub(crate) fn mac(key: &[u8], input: &[u8]) -> [u8; 16] {
    // Keys here are 16 or 32 bytes, both within BLAKE2s' 32-byte limit, so this cannot fail.
    let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(key).expect("key of at most 32 bytes");
    Mac::update(&mut m, input);
    m.finalize().into_bytes().into()
}

/// HMAC-BLAKE2s (RFC 2104 over a 64-byte block), the building block of KDF.
fn hmac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let mut inner = Blake2s256::new();
    Digest::update(&mut inner, ipad);
    for p in parts {
        Digest::update(&mut inner, p);
    }
    let inner: [u8; 32] = inner.finalize().into();
    hash(&[&opad, &inner])
}

/// KDF1: the new chaining key.
pub(crate) fn kdf1(ck: &[u8; 32], input: &[u8]) -> [u8; 32] {
    let t0 = hmac(ck, &[input]);
    hmac(&t0, &[&[1]])
}

/// KDF2: the new chaining key and one derived key.
pub(crate) fn kdf2(ck: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32]) {
    let t0 = hmac(ck, &[input]);
    let t1 = hmac(&t0, &[&[1]]);
    let t2 = hmac(&t0, &[&t1, &[2]]);
    (t1, t2)
}

/// KDF3: the new chaining key and two derived keys.
pub(crate) fn kdf3(ck: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32], [u8; 32]) {
    let t0 = hmac(ck, &[input]);
    let t1 = hmac(&t0, &[&[1]]);
    let t2 = hmac(&t0, &[&t1, &[2]]);
    let t3 = hmac(&t0, &[&t2, &[3]]);
    (t1, t2, t3)
}

/// The 96-bit nonce of a WireGuard AEAD: 32 zero bits and the 64-bit counter, little endian.
pub(crate) fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

pub(crate) fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    // A 32-byte key is exactly what ChaCha20-Poly1305 takes, so this cannot fail.
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).expect("32-byte key"))
}

/// AEAD(key, 0, plaintext, aad): `buf` holds the plaintext followed by room for the tag.
pub(crate) fn seal(key: &[u8; 32], aad: &[u8], buf: &mut [u8]) {
    let n = buf.len() - TAG_LEN;
    let (text, tag_out) = buf.split_at_mut(n);
    // Sealing with a valid key and a buffer of any length below 256 GiB cannot fail.
    let tag = aead_key(key)
        .seal_in_place_separate_tag(nonce(0), Aad::from(aad), text)
        .expect("seal");
    tag_out.copy_from_slice(tag.as_ref());
}

/// Opens an AEAD field (ciphertext and tag) with counter 0; returns the plaintext.
pub(crate) fn open<'a>(
    key: &[u8; 32],
    aad: &[u8],
    buf: &'a mut [u8],
) -> Result<&'a mut [u8], NoiseError> {
    aead_key(key)
        .open_in_place(nonce(0), Aad::from(aad), buf)
        .map_err(|_| NoiseError::DecryptFailed)
}

/// DH(private, public), refusing the all-zero result of a low-order public key.
pub(crate) fn dh(private: &StaticSecret, public: &[u8; 32]) -> Result<[u8; 32], NoiseError> {
    let shared = private.diffie_hellman(&PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(NoiseError::LowOrderKey);
    }
    Ok(shared.to_bytes())
}

/// Constant-time equality for MACs and keys compared against untrusted input.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    // Fold every byte so the time taken does not depend on where the first difference is.
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HMAC-BLAKE2s must agree with the hmac crate's generic construction, which
    /// boringtun uses, so the KDF chain matches every other implementation.
    #[test]
    fn kdf_matches_a_generic_hmac() {
        use hmac::{Mac as _, SimpleHmac};
        let key = [7u8; 32];
        let mut m =
            <SimpleHmac<Blake2s256> as hmac::digest::KeyInit>::new_from_slice(&key).unwrap();
        m.update(b"input");
        let t0: [u8; 32] = m.finalize().into_bytes().into();
        let mut m = <SimpleHmac<Blake2s256> as hmac::digest::KeyInit>::new_from_slice(&t0).unwrap();
        m.update(&[1]);
        let t1: [u8; 32] = m.finalize().into_bytes().into();
        assert_eq!(kdf1(&key, b"input"), t1);
        assert_eq!(kdf2(&key, b"input").0, t1);
    }
}
