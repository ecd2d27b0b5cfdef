//! The host's identity for machine binding, and its fingerprint under a token's key.
//!
//! The identity is `/etc/machine-id` and, where readable, the DMI product UUID:
//! both survive reboots and agent upgrades, and both are the host's own when the
//! agent runs in a container started the documented way (`/etc/machine-id`
//! mounted read-only; sysfs shows the host's DMI). Only the HMAC of it under the
//! key the relay hands out per token ever leaves the host.
//!
//! `SIDECAR_MACHINE_ID_FILE` replaces both sources with one file: for tests that
//! play several machines on one host, and for containers that cannot mount
//! `/etc/machine-id`.

use std::io;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// Environment variable naming a file to use as the whole machine identity.
pub const MACHINE_ID_FILE_ENV: &str = "SIDECAR_MACHINE_ID_FILE";

const MACHINE_ID: &str = "/etc/machine-id";
const DMI_UUID: &str = "/sys/class/dmi/id/product_uuid";

/// Where the identity comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    /// `/etc/machine-id` plus the DMI product UUID when readable.
    Host,
    /// One file, as named by [`MACHINE_ID_FILE_ENV`].
    File(PathBuf),
}

impl IdentitySource {
    /// The source the environment asks for.
    pub fn from_env() -> IdentitySource {
        match std::env::var_os(MACHINE_ID_FILE_ENV) {
            Some(path) if !path.is_empty() => IdentitySource::File(path.into()),
            _ => IdentitySource::Host,
        }
    }

    /// The identity bytes. An empty or missing machine-id is an error: a
    /// fingerprint of nothing would bind every such host to the same token.
    pub fn read(&self) -> io::Result<Vec<u8>> {
        match self {
            IdentitySource::File(path) => read_nonempty(path),
            IdentitySource::Host => {
                let mut id = read_nonempty(Path::new(MACHINE_ID))?;
                // Root-only on most hosts, absent on some VMs: a bonus, not a need.
                if let Ok(uuid) = read_nonempty(Path::new(DMI_UUID)) {
                    id.push(b'\n');
                    id.extend_from_slice(&uuid);
                }
                Ok(id)
            }
        }
    }
}

fn read_nonempty(path: &Path) -> io::Result<Vec<u8>> {
    let text = std::fs::read(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let trimmed = text.trim_ascii().to_vec();
    if trimmed.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(trimmed)
}

/// The fingerprint the relay binds a token to: base64 HMAC-SHA256 of the identity
/// under the token's machine key (base64, from `GET /v1/machine`).
pub fn fingerprint(machine_key_b64: &str, identity: &[u8]) -> Result<String, base64::DecodeError> {
    let key = STANDARD.decode(machine_key_b64)?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    Ok(STANDARD.encode(ring::hmac::sign(&key, identity).as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_differ_per_key_and_per_identity_and_hide_the_identity() {
        let k1 = STANDARD.encode([1u8; 32]);
        let k2 = STANDARD.encode([2u8; 32]);
        let a = fingerprint(&k1, b"host-a").unwrap();
        assert_eq!(a, fingerprint(&k1, b"host-a").unwrap());
        assert_ne!(a, fingerprint(&k2, b"host-a").unwrap());
        assert_ne!(a, fingerprint(&k1, b"host-b").unwrap());
        assert!(!a.contains("host"));
        assert!(fingerprint("not base64!", b"x").is_err());
    }

    #[test]
    fn a_file_source_is_read_trimmed_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("sidecar-machine-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("id");
        std::fs::write(&file, "abc123\n").unwrap();
        assert_eq!(
            IdentitySource::File(file.clone()).read().unwrap(),
            b"abc123"
        );
        std::fs::write(&file, "\n").unwrap();
        assert!(IdentitySource::File(file.clone()).read().is_err());
        let missing = IdentitySource::File(dir.join("missing"))
            .read()
            .unwrap_err();
        assert!(missing.to_string().contains("missing"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
