//! WireGuard keys: 32-byte Curve25519 values in the two text forms in use
//! (base64 in configuration files, lowercase hex on the userspace API).

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use boringtun::x25519;

/// A 32-byte WireGuard key (private, public or preshared).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key is not valid base64: {0}")]
    Base64(String),
    #[error("key is not valid hex")]
    Hex,
    #[error("key must be 32 bytes, got {0}")]
    Length(usize),
}

impl Key {
    /// A fresh random private key, clamped as Curve25519 requires.
    pub fn generate_private() -> Key {
        let secret = x25519::StaticSecret::random_from_rng(rand_core::OsRng);
        Key(secret.to_bytes())
    }

    /// The public key that belongs to this private key.
    pub fn public_key(&self) -> Key {
        let secret = x25519::StaticSecret::from(self.0);
        Key(x25519::PublicKey::from(&secret).to_bytes())
    }

    pub fn from_base64(s: &str) -> Result<Key, KeyError> {
        let bytes = STANDARD
            .decode(s.trim())
            .map_err(|e| KeyError::Base64(e.to_string()))?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Length(bytes.len()))?;
        Ok(Key(arr))
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn from_hex(s: &str) -> Result<Key, KeyError> {
        let s = s.trim();
        if !s.bytes().all(|c| c.is_ascii_hexdigit()) || s.len() % 2 != 0 {
            return Err(KeyError::Hex);
        }
        if s.len() != 64 {
            return Err(KeyError::Length(s.len() / 2));
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks_exact(2).enumerate() {
            let hi = hex_val(chunk[0]).ok_or(KeyError::Hex)?;
            let lo = hex_val(chunk[1]).ok_or(KeyError::Hex)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Key(out))
    }

    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(DIGITS[(b >> 4) as usize] as char);
            s.push(DIGITS[(b & 0xf) as usize] as char);
        }
        s
    }

    /// True for the all-zero key, which the userspace API uses to mean "remove".
    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl FromStr for Key {
    type Err = KeyError;
    /// Parses the base64 form used by `wg` and configuration files.
    fn from_str(s: &str) -> Result<Key, KeyError> {
        Key::from_base64(s)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// Never print key material by accident: Debug shows only a short prefix.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b64 = self.to_base64();
        write!(f, "Key({}…)", &b64[..8])
    }
}

/// Serialized as base64, the form `wg` prints.
#[cfg(feature = "serde")]
impl serde::Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Key::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_hex_round_trip() {
        let k = Key::generate_private();
        assert_eq!(Key::from_base64(&k.to_base64()).unwrap(), k);
        assert_eq!(Key::from_hex(&k.to_hex()).unwrap(), k);
        assert_eq!(Key::from_hex(&k.to_hex().to_uppercase()).unwrap(), k);
    }

    #[test]
    fn known_public_key() {
        // RFC 7748 section 6.1 test vector (Alice).
        let private =
            Key::from_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap();
        assert_eq!(
            private.public_key().to_hex(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(Key::from_base64("AAAA"), Err(KeyError::Length(3)));
        assert!(matches!(Key::from_base64("!!"), Err(KeyError::Base64(_))));
        assert_eq!(Key::from_hex("zz"), Err(KeyError::Hex));
        assert_eq!(Key::from_hex(&"0".repeat(62)), Err(KeyError::Length(31)));
    }
}
