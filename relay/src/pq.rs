//! The relay's side of post-quantum preshared keys: its X-Wing key pair (kept in
//! the data directory, mode 0600), the policy (required or not, how often peers
//! rotate), and the preshared key of each stored peer.
//!
//! The store keeps only each peer's ciphertext and rotation counter; the key is
//! derived again whenever the peer goes on the data plane (registration, restart),
//! so no preshared key is ever written to disk or to the log.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sidecar::Key;
use sidecar_proto::pq::{self, Psk, PskContext, RelayKem, SECRET_LEN};

use crate::store::PeerRecord;

/// How often peers encapsulate again unless configured otherwise.
pub const DEFAULT_ROTATE: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} does not hold a base64 secret of {len} bytes", path.display())]
    Malformed { path: PathBuf, len: usize },
}

/// Reads a base64 secret of `N` bytes, or creates one (mode 0600, written
/// atomically) when the file does not exist. True when it was created.
pub fn load_or_create_secret<const N: usize>(path: &Path) -> Result<([u8; N], bool), KeyFileError> {
    let io_err = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes = STANDARD
                .decode(text.trim())
                .ok()
                .and_then(|b| <[u8; N]>::try_from(b).ok())
                .ok_or_else(|| KeyFileError::Malformed {
                    path: path.to_owned(),
                    len: N,
                })?;
            Ok((bytes, false))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut secret = [0u8; N];
            rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut secret)
                .map_err(|e| io_err(io::Error::other(e.to_string())))?;
            write_private(path, format!("{}\n", STANDARD.encode(secret)).as_bytes())
                .map_err(io_err)?;
            Ok((secret, true))
        }
        Err(e) => Err(io_err(e)),
    }
}

fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // A leftover temporary file keeps its old mode; make sure.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The relay's X-Wing key pair and post-quantum policy.
#[derive(Debug)]
pub struct PqKeys {
    kem: RelayKem,
    relay_public_key: Key,
    /// Registrations without a ciphertext are refused.
    pub required: bool,
    /// Announced to peers: encapsulate again this often.
    pub rotate: Duration,
}

impl PqKeys {
    pub fn new(kem: RelayKem, relay_public_key: Key, required: bool, rotate: Duration) -> PqKeys {
        PqKeys {
            kem,
            relay_public_key,
            required,
            rotate,
        }
    }

    /// Loads the key pair from `path`, creating it on first start.
    pub fn load_or_create(
        path: &Path,
        relay_public_key: Key,
        required: bool,
        rotate: Duration,
    ) -> Result<(PqKeys, bool), KeyFileError> {
        let (secret, created) = load_or_create_secret::<SECRET_LEN>(path)?;
        let keys = PqKeys::new(
            RelayKem::from_secret(secret),
            relay_public_key,
            required,
            rotate,
        );
        Ok((keys, created))
    }

    pub fn public_key_base64(&self) -> String {
        self.kem.public_key_base64()
    }

    pub fn relay_public_key(&self) -> Key {
        self.relay_public_key
    }

    /// The preshared key of a stored peer, if it registered with a ciphertext. A
    /// stored ciphertext that no longer decodes (a store edited by hand) leaves the
    /// peer without one, which its handshakes then show.
    pub fn psk_for(&self, peer: &PeerRecord) -> Option<Psk> {
        let text = peer.pq_ciphertext.as_deref()?;
        let decoded = pq::decode_ciphertext(text).and_then(|ct| self.kem.decapsulate(&ct));
        let secret = match decoded {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(peer = %peer.public_key, error = %e, "stored X-Wing ciphertext is unusable; the peer has no preshared key");
                return None;
            }
        };
        Some(pq::derive_psk(
            &secret,
            &PskContext {
                peer: &peer.public_key,
                relay: &self.relay_public_key,
                relay_xwing: self.kem.public_key(),
                counter: peer.pq_counter,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_key_file_is_private_and_gives_the_same_key_pair_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xwing.key");
        let relay = Key([9; 32]);
        let (first, created) = PqKeys::load_or_create(&path, relay, true, DEFAULT_ROTATE).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, created) = PqKeys::load_or_create(&path, relay, true, DEFAULT_ROTATE).unwrap();
        assert!(!created);
        assert_eq!(again.public_key_base64(), first.public_key_base64());
        assert!(!format!("{again:?}")
            .contains(&std::fs::read_to_string(&path).unwrap().trim().to_string()));

        std::fs::write(&path, "short").unwrap();
        let err = PqKeys::load_or_create(&path, relay, true, DEFAULT_ROTATE).unwrap_err();
        assert!(err.to_string().contains("xwing.key"), "{err}");
    }
}
