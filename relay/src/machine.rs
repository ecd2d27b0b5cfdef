//! Machine binding: each token gets a key of its own to fingerprint the agent's
//! host with, derived from a relay secret kept in the data directory (mode 0600).
//!
//! The agent sends HMAC(key, host identity), never the identity itself; because the
//! key differs per token and per relay, fingerprints cannot be linked across them
//! or traced back to the host. The binding itself lives in the token's record.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::pq::{load_or_create_secret, KeyFileError};

/// Domain separation for the per-token keys.
const LABEL: &[u8] = b"sidecar v1 machine key for token ";

/// The relay's secret behind every token's machine key.
pub struct MachineKeys {
    secret: ring::hmac::Key,
}

impl std::fmt::Debug for MachineKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineKeys").finish_non_exhaustive()
    }
}

impl MachineKeys {
    pub fn new(secret: [u8; 32]) -> MachineKeys {
        MachineKeys {
            secret: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
        }
    }

    /// Loads the relay's secret from `path`, creating it on first start.
    pub fn load_or_create(path: &Path) -> Result<MachineKeys, KeyFileError> {
        let (secret, _) = load_or_create_secret::<32>(path)?;
        Ok(MachineKeys::new(secret))
    }

    /// The machine key the agents of token `id` fingerprint their host with, base64.
    pub fn token_key(&self, id: &str) -> String {
        let mut ctx = ring::hmac::Context::with_key(&self.secret);
        ctx.update(LABEL);
        ctx.update(id.as_bytes());
        STANDARD.encode(ctx.sign().as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_per_token_and_per_relay_and_are_stable() {
        let a = MachineKeys::new([1; 32]);
        let b = MachineKeys::new([2; 32]);
        assert_eq!(a.token_key("tok_1"), a.token_key("tok_1"));
        assert_ne!(a.token_key("tok_1"), a.token_key("tok_2"));
        assert_ne!(a.token_key("tok_1"), b.token_key("tok_1"));
        assert_eq!(STANDARD.decode(a.token_key("tok_1")).unwrap().len(), 32);
    }
}
