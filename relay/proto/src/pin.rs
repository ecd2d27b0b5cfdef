//! Trusting a server by the hash of its public key (as `curl --pinnedpubkey` does)
//! instead of a certificate authority: the relay's certificate is self-signed and
//! agents carry its pin next to their token.

use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, SignatureScheme};

/// What every pin starts with; the only hash curl (and we) accept.
pub const PIN_PREFIX: &str = "sha256//";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "'{0}' is not a pin: expected sha256// followed by the base64 SHA-256 of a public key"
    )]
    BadPin(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The aws-lc-rs provider, passed explicitly everywhere so the process-wide default
/// never matters. It is the one whose key exchange groups include the hybrid
/// post-quantum X25519MLKEM768, offered first (classical X25519 and the NIST
/// curves stay as fallbacks for peers without it).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The pin of a DER SubjectPublicKeyInfo: `sha256//` and the base64 of its SHA-256.
pub fn spki_pin(spki_der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
    format!("{PIN_PREFIX}{}", STANDARD.encode(digest.as_ref()))
}

/// A TLS 1.3-only client configuration that trusts exactly the server key(s)
/// named by `pin` (see [`PinnedVerifier::new`]). ALPN is left empty for the
/// caller to set to whatever its HTTP client speaks.
pub fn client_config(pin: &str) -> Result<ClientConfig, PinError> {
    let verifier = PinnedVerifier::new(pin)?;
    Ok(
        ClientConfig::builder_with_provider(verifier.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth(),
    )
}

/// The server presented a key other than the pinned one(s).
///
/// Reaches the caller as `rustls::Error::InvalidCertificate(CertificateError::Other(_))`
/// inside the connect error; downcast the `OtherError` to tell it apart from
/// network failures.
#[derive(Clone, thiserror::Error)]
#[error("the server's public key {presented} does not match the pinned key {expected}")]
pub struct PinMismatch {
    pub expected: String,
    pub presented: String,
}

/// rustls prints the error's Debug form inside its own message; make that the
/// readable text too.
impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Accepts a server certificate if and only if its SubjectPublicKeyInfo hashes to
/// a pinned value. Names, issuer and validity dates are deliberately not checked:
/// the certificate is self-signed and the pin is the whole trust decision.
#[derive(Debug)]
pub struct PinnedVerifier {
    pins: Vec<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    /// Parses `sha256//BASE64`, or several separated by `;` as curl allows
    /// (useful while rotating the relay's key).
    pub fn new(pin: &str) -> Result<PinnedVerifier, PinError> {
        let pins = pin
            .split(';')
            .map(|one| parse_pin(one.trim()).ok_or_else(|| PinError::BadPin(pin.to_owned())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PinnedVerifier {
            pins,
            provider: provider(),
        })
    }
}

pub fn parse_pin(pin: &str) -> Option<[u8; 32]> {
    let b64 = pin.strip_prefix(PIN_PREFIX)?;
    STANDARD.decode(b64).ok()?.try_into().ok()
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let spki = cert.subject_public_key_info();
        let digest = ring::digest::digest(&ring::digest::SHA256, spki.as_ref());
        if self.pins.iter().any(|pin| pin[..] == *digest.as_ref()) {
            return Ok(ServerCertVerified::assertion());
        }
        let expected = self
            .pins
            .iter()
            .map(|pin| format!("{PIN_PREFIX}{}", STANDARD.encode(pin)))
            .collect::<Vec<_>>()
            .join(";");
        let mismatch = PinMismatch {
            expected,
            presented: spki_pin(spki.as_ref()),
        };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(mismatch)),
        )))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable with the TLS 1.3-only config from `client_config`; refuse
        // rather than trust if someone reuses the verifier elsewhere.
        Err(rustls::Error::General(
            "TLS 1.2 is not accepted for the control API".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pins_are_rejected() {
        for pin in [
            "",
            "sha256//",
            "sha1//AAAA",
            "sha256//not base64!",
            "sha256//AAAA",
        ] {
            assert!(
                matches!(PinnedVerifier::new(pin), Err(PinError::BadPin(_))),
                "{pin}"
            );
        }
        let good = format!("{PIN_PREFIX}{}", STANDARD.encode([7u8; 32]));
        assert_eq!(PinnedVerifier::new(&good).unwrap().pins.len(), 1);
        assert_eq!(
            PinnedVerifier::new(&format!("{good};{good}"))
                .unwrap()
                .pins
                .len(),
            2
        );
    }
}
