//! The warrant canary: the operator's statement with the time it was made, signed with
//! an Ed25519 key the relay keeps beside its others, so anyone can check that the
//! statement is current and came from this relay's operator.
//!
//! The signature covers `sidecar-canary-v1\n{signed}\n{statement}` (signed in decimal
//! Unix seconds), a message a shell can rebuild from the document for `openssl pkeyutl`.

use std::io;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::pq::{load_or_create_secret, KeyFileError};

/// Statements longer than this are refused: the canary is a paragraph, not a file store.
pub const MAX_STATEMENT: usize = 16 * 1024;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32 key bytes follow it.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The signed statement as `GET /v1/canary` serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Canary {
    /// The operator's statement, exactly as signed.
    pub statement: String,
    /// When it was signed, Unix seconds.
    pub signed: u64,
    /// The Ed25519 public key, base64 of its 32 bytes.
    #[schema(pattern = "^[A-Za-z0-9+/]{43}=$")]
    pub public_key: String,
    /// The same key as a PEM SubjectPublicKeyInfo, for `openssl pkeyutl -verify`.
    pub public_key_pem: String,
    /// Base64 of the 64-byte Ed25519 signature over the canary message.
    #[schema(pattern = "^[A-Za-z0-9+/]{86}==$")]
    pub signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("the canary key in {0} is not a usable Ed25519 seed")]
    BadKey(PathBuf),
    #[error("the statement is empty")]
    EmptyStatement,
    #[error("the statement has {0} bytes; at most {MAX_STATEMENT} are allowed")]
    StatementTooLong(usize),
    #[error("{field} is not valid base64 of {len} bytes")]
    Malformed { field: &'static str, len: usize },
    #[error("the signature does not match the statement and time under this key")]
    BadSignature,
    #[error("signed by {found}, not by the expected key {expected}")]
    WrongKey { found: String, expected: String },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The bytes the signature covers.
pub fn message(signed: u64, statement: &str) -> Vec<u8> {
    format!("sidecar-canary-v1\n{signed}\n{statement}").into_bytes()
}

/// The relay's canary signing key, created on first use (0600).
pub struct CanaryKey {
    pair: Ed25519KeyPair,
}

impl CanaryKey {
    pub fn load_or_create(path: &Path) -> Result<CanaryKey, CanaryError> {
        let (seed, created) = load_or_create_secret::<32>(path)?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|_| CanaryError::BadKey(path.to_owned()))?;
        if created {
            tracing::info!(path = %path.display(), "generated the relay's warrant canary key");
        }
        Ok(CanaryKey { pair })
    }

    /// Base64 of the public key's 32 bytes.
    pub fn public_key(&self) -> String {
        STANDARD.encode(self.pair.public_key().as_ref())
    }

    /// Signs `statement` as made at `now` (Unix seconds).
    pub fn sign(&self, statement: &str, now: u64) -> Result<Canary, CanaryError> {
        check_statement(statement)?;
        let signature = self.pair.sign(&message(now, statement));
        let public = self.pair.public_key().as_ref();
        Ok(Canary {
            statement: statement.to_owned(),
            signed: now,
            public_key: STANDARD.encode(public),
            public_key_pem: pem(public),
            signature: STANDARD.encode(signature.as_ref()),
        })
    }
}

fn check_statement(statement: &str) -> Result<(), CanaryError> {
    if statement.trim().is_empty() {
        return Err(CanaryError::EmptyStatement);
    }
    if statement.len() > MAX_STATEMENT {
        return Err(CanaryError::StatementTooLong(statement.len()));
    }
    Ok(())
}

fn pem(public: &[u8]) -> String {
    let mut der = SPKI_PREFIX.to_vec();
    der.extend_from_slice(public);
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        STANDARD.encode(der)
    )
}

fn decode<const N: usize>(field: &'static str, text: &str) -> Result<[u8; N], CanaryError> {
    STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|b| <[u8; N]>::try_from(b).ok())
        .ok_or(CanaryError::Malformed { field, len: N })
}

impl Canary {
    /// Checks the signature under the document's own key and, when given, that this
    /// key is `expected` (base64): without it a forger could sign with a key of theirs.
    pub fn verify(&self, expected: Option<&str>) -> Result<(), CanaryError> {
        let public = decode::<32>("public_key", &self.public_key)?;
        if let Some(expected) = expected {
            if decode::<32>("expected key", expected)? != public {
                return Err(CanaryError::WrongKey {
                    found: self.public_key.clone(),
                    expected: expected.trim().to_owned(),
                });
            }
        }
        let signature = decode::<64>("signature", &self.signature)?;
        UnparsedPublicKey::new(&ED25519, public)
            .verify(&message(self.signed, &self.statement), &signature)
            .map_err(|_| CanaryError::BadSignature)
    }

    /// Reads the current canary from `path`; `None` if none was signed yet.
    pub fn load(path: &Path) -> io::Result<Option<Canary>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces the canary at `path` at once (write, then rename), so a reader never
    /// sees half of one.
    pub fn store(&self, path: &Path) -> Result<(), CanaryError> {
        let write_err = |source| CanaryError::Write {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(|e| write_err(e.into()))?;
        std::fs::write(&tmp, text).map_err(write_err)?;
        std::fs::rename(&tmp, path).map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_key() -> (tempfile::TempDir, CanaryKey) {
        let dir = tempfile::tempdir().unwrap();
        let key = CanaryKey::load_or_create(&dir.path().join("canary.key")).unwrap();
        (dir, key)
    }

    #[test]
    fn a_signed_statement_verifies_and_any_change_breaks_it() {
        let (_dir, key) = new_key();
        let canary = key
            .sign("No warrants have been served.\n", 1_800_000_000)
            .unwrap();
        canary.verify(None).unwrap();
        canary.verify(Some(&key.public_key())).unwrap();
        let edited = Canary {
            statement: "No warrants have been served, mostly.\n".into(),
            ..canary.clone()
        };
        assert!(matches!(
            edited.verify(None),
            Err(CanaryError::BadSignature)
        ));
        let backdated = Canary {
            signed: canary.signed - 1,
            ..canary.clone()
        };
        assert!(matches!(
            backdated.verify(None),
            Err(CanaryError::BadSignature)
        ));
        let (_other_dir, other) = new_key();
        assert!(matches!(
            canary.verify(Some(&other.public_key())),
            Err(CanaryError::WrongKey { .. })
        ));
        let garbage = Canary {
            signature: "not base64!".into(),
            ..canary
        };
        assert!(matches!(
            garbage.verify(None),
            Err(CanaryError::Malformed { .. })
        ));
    }

    #[test]
    fn the_key_survives_a_restart_and_the_document_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("canary.key");
        let first = CanaryKey::load_or_create(&path).unwrap().public_key();
        assert_eq!(
            CanaryKey::load_or_create(&path).unwrap().public_key(),
            first
        );
        let doc = dir.path().join("canary.json");
        assert_eq!(Canary::load(&doc).unwrap(), None);
        let canary = CanaryKey::load_or_create(&path)
            .unwrap()
            .sign("ok", 5)
            .unwrap();
        canary.store(&doc).unwrap();
        assert_eq!(Canary::load(&doc).unwrap(), Some(canary));
    }

    #[test]
    fn empty_or_huge_statements_are_refused() {
        let (_dir, key) = new_key();
        assert!(matches!(
            key.sign(" \n", 1),
            Err(CanaryError::EmptyStatement)
        ));
        let huge = "x".repeat(MAX_STATEMENT + 1);
        assert!(matches!(
            key.sign(&huge, 1),
            Err(CanaryError::StatementTooLong(_))
        ));
    }
}
