//! TLS for the control API: a self-signed certificate whose public key is pinned
//! by clients instead of being checked against a CA.
//!
//! The relay prints the pin once (`sha256//BASE64`, the SHA-256 of the DER
//! SubjectPublicKeyInfo, the format of `curl --pinnedpubkey`) and agents carry it
//! next to their token. Pinning the key rather than the certificate means the
//! certificate can be re-issued (new names, new validity) without touching clients
//! as long as the key file is kept.
//!
//! Both sides speak TLS 1.3 only and use the aws-lc-rs provider explicitly, so that
//! the process-wide default provider never matters. Its first key exchange group is
//! the hybrid post-quantum X25519MLKEM768; clients without it get classical X25519.
//! [`KeyExchangeLog`] logs which one each connection got.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use axum_server::accept::Accept;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

pub use sidecar_proto::pin::{
    client_config, parse_pin, spki_pin, PinError, PinMismatch, PinnedVerifier, PIN_PREFIX,
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot generate the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("cannot parse the certificate: {0}")]
    Certificate(webpki::Error),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error(transparent)]
    Pin(#[from] PinError),
}

use sidecar_proto::pin::provider;

/// The relay's certificate and private key, with their PEM text for saving.
#[derive(Clone)]
pub struct Identity {
    cert: CertificateDer<'static>,
    key: Arc<PrivateKeyDer<'static>>,
    cert_pem: String,
    key_pem: String,
}

/// Never print the private key.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("pin", &self.pin().unwrap_or_default())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh ECDSA P-256 key and a self-signed certificate for `names`. Each name
    /// that parses as an IP address becomes an IP SAN, anything else a DNS SAN.
    pub fn generate(names: &[String]) -> Result<Identity, TlsError> {
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sidecar relay");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?;
        Ok(Identity {
            cert: cert.der().clone(),
            key: Arc::new(PrivateKeyDer::Pkcs8(key.serialize_der().into())),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Reads a PEM certificate (the first one in the file) and private key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Identity, TlsError> {
        let cert_pem = read_to_string(cert_path)?;
        let key_pem = read_to_string(key_path)?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|source| {
            TlsError::Pem {
                path: cert_path.to_owned(),
                source,
            }
        })?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| TlsError::Pem {
                path: key_path.to_owned(),
                source,
            })?;
        let identity = Identity {
            cert,
            key: Arc::new(key),
            cert_pem,
            key_pem,
        };
        // Catches a key that does not belong to the certificate now, at startup,
        // rather than at the first handshake.
        identity.server_config()?;
        Ok(identity)
    }

    /// Writes the certificate (mode 0644) and the key (mode 0600). Each file is
    /// written to a temporary name and renamed, so a crash never leaves half a key.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
        write_atomically(key_path, self.key_pem.as_bytes(), 0o600)?;
        write_atomically(cert_path, self.cert_pem.as_bytes(), 0o644)
    }

    /// Loads the pair if both files exist; otherwise generates and saves a new one.
    /// The boolean is true when a new identity was generated (its pin is new).
    pub fn load_or_generate(
        cert_path: &Path,
        key_path: &Path,
        names: &[String],
    ) -> Result<(Identity, bool), TlsError> {
        if cert_path.exists() && key_path.exists() {
            return Ok((Identity::load(cert_path, key_path)?, false));
        }
        // A lone file is the remainder of an interrupted first start: no client
        // can have pinned it yet, so replacing it is safe.
        let identity = Identity::generate(names)?;
        identity.save(cert_path, key_path)?;
        Ok((identity, true))
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The pin clients must be given (`sha256//BASE64`).
    pub fn pin(&self) -> Result<String, TlsError> {
        cert_pin(&self.cert)
    }

    /// A TLS 1.3-only server configuration for this identity.
    pub fn server_config(&self) -> Result<ServerConfig, TlsError> {
        server_config(self.cert.clone(), self.key.clone_key())
    }
}

fn read_to_string(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let io_err = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err)?;
    // `mode` applies only when the file is created; a leftover temporary file
    // from an earlier crash keeps whatever mode it had.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err)?;
    file.write_all(contents).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)
}

/// The pin of the public key in a DER certificate.
pub fn cert_pin(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let parsed = webpki::EndEntityCert::try_from(cert).map_err(TlsError::Certificate)?;
    Ok(spki_pin(parsed.subject_public_key_info().as_ref()))
}

/// A TLS 1.3-only server configuration offering h2 and http/1.1.
pub fn server_config(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    // HTTP/1.1 only: an HTTP/2 server that answers an error before reading the
    // request body resets the stream, and common curl versions then drop the
    // answer ("Stream error in the HTTP/2 framing layer"). The API is small
    // requests; multiplexing buys nothing.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Whether a TLS key exchange group resists a quantum computer (a hybrid or pure
/// ML-KEM group).
pub fn is_post_quantum(group: rustls::NamedGroup) -> bool {
    matches!(
        group,
        rustls::NamedGroup::X25519MLKEM768
            | rustls::NamedGroup::secp256r1MLKEM768
            | rustls::NamedGroup::MLKEM768
            | rustls::NamedGroup::MLKEM1024
    )
}

/// Wraps a TLS acceptor and logs, per connection, the key exchange group the
/// client got and whether it is post-quantum.
#[derive(Clone, Debug)]
pub struct KeyExchangeLog<A> {
    inner: A,
}

impl<A> KeyExchangeLog<A> {
    pub fn new(inner: A) -> KeyExchangeLog<A> {
        KeyExchangeLog { inner }
    }
}

impl<A, S, I> Accept<tokio::net::TcpStream, S> for KeyExchangeLog<A>
where
    A: Accept<tokio::net::TcpStream, S, Stream = tokio_rustls::server::TlsStream<I>>,
    A::Future: Send + 'static,
    A::Service: Send + 'static,
    I: Send + 'static,
{
    type Stream = A::Stream;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = io::Result<(A::Stream, A::Service)>> + Send>>;

    fn accept(&self, stream: tokio::net::TcpStream, service: S) -> Self::Future {
        let peer = stream.peer_addr().ok();
        let handshake = self.inner.accept(stream, service);
        Box::pin(async move {
            let (tls, service) = handshake.await?;
            log_key_exchange(peer, tls.get_ref().1);
            Ok((tls, service))
        })
    }
}

fn log_key_exchange(peer: Option<SocketAddr>, conn: &rustls::ServerConnection) {
    let Some(group) = conn.negotiated_key_exchange_group() else {
        return;
    };
    let name = group.name();
    let post_quantum = is_post_quantum(name);
    let peer = peer.map(|p| p.to_string()).unwrap_or_default();
    tracing::info!(%peer, tls_group = ?name, post_quantum, "TLS key exchange");
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData as _;
    use rustls::pki_types::ServerName;
    use rustls::CertificateError;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn names() -> Vec<String> {
        vec!["relay.example".into(), "127.0.0.1".into()]
    }

    #[test]
    fn pin_matches_rcgen_spki() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(names())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let from_cert = cert_pin(cert.der()).unwrap();
        assert_eq!(from_cert, spki_pin(&key.subject_public_key_info()));
        assert!(from_cert.starts_with(PIN_PREFIX));
        assert_eq!(parse_pin(&from_cert).map(|p| p.len()), Some(32));
    }

    #[test]
    fn save_and_load_round_trip_with_private_key_mode() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("api.crt"), dir.path().join("api.key"));
        let (first, generated) =
            Identity::load_or_generate(&cert_path, &key_path, &names()).unwrap();
        assert!(generated);
        let mode = fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(fs::read_to_string(&key_path)
            .unwrap()
            .contains("PRIVATE KEY"));

        let (second, generated) =
            Identity::load_or_generate(&cert_path, &key_path, &names()).unwrap();
        assert!(!generated);
        assert_eq!(second.pin().unwrap(), first.pin().unwrap());
        assert_eq!(second.cert_der(), first.cert_der());
        assert!(!format!("{second:?}").contains("PRIVATE"));
    }

    #[test]
    fn load_rejects_a_key_from_another_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::generate(&names()).unwrap();
        let b = Identity::generate(&names()).unwrap();
        a.save(&dir.path().join("a.crt"), &dir.path().join("a.key"))
            .unwrap();
        b.save(&dir.path().join("b.crt"), &dir.path().join("b.key"))
            .unwrap();
        let err = Identity::load(&dir.path().join("a.crt"), &dir.path().join("b.key")).unwrap_err();
        assert!(matches!(err, TlsError::Config(_)), "{err}");
        let err = Identity::load(&dir.path().join("a.crt"), &dir.path().join("none")).unwrap_err();
        assert!(err.to_string().contains("none"), "{err}");
    }

    /// Serves one connection that answers "pong" to "ping"; returns the address.
    async fn echo_server(identity: &Identity) -> std::net::SocketAddr {
        let acceptor = TlsAcceptor::from(Arc::new(identity.server_config().unwrap()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let mut buf = [0u8; 4];
                if tls.read_exact(&mut buf).await.is_ok() && &buf == b"ping" {
                    let _ = tls.write_all(b"pong").await;
                    let _ = tls.shutdown().await;
                }
            }
        });
        addr
    }

    async fn connect(pin: &str, addr: std::net::SocketAddr) -> io::Result<Vec<u8>> {
        let connector = TlsConnector::from(Arc::new(client_config(pin).unwrap()));
        let tcp = TcpStream::connect(addr).await?;
        // The name is not checked by the pinned verifier, only sent as SNI.
        let name = ServerName::try_from("relay.example").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        tls.write_all(b"ping").await?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn handshake_with_the_right_pin() {
        let identity = Identity::generate(&names()).unwrap();
        let addr = echo_server(&identity).await;
        assert_eq!(
            connect(&identity.pin().unwrap(), addr).await.unwrap(),
            b"pong"
        );
    }

    #[tokio::test]
    async fn handshake_with_a_wrong_pin_fails() {
        let identity = Identity::generate(&names()).unwrap();
        let other = Identity::generate(&names()).unwrap();
        let addr = echo_server(&identity).await;
        let err = connect(&other.pin().unwrap(), addr).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("does not match the pinned key"), "{text}");
        assert!(text.contains(&identity.pin().unwrap()), "{text}");
        // Callers can tell a pin mismatch from other failures without parsing text.
        let inner = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other_err))) = inner
        else {
            panic!("unexpected error {err:?}");
        };
        assert!(other_err.0.downcast_ref::<PinMismatch>().is_some());
    }

    /// Connects with a client offering only `groups`; the group it got.
    async fn handshake_with_groups(
        identity: &Identity,
        groups: Vec<&'static dyn rustls::crypto::SupportedKxGroup>,
    ) -> rustls::NamedGroup {
        let addr = echo_server(identity).await;
        let provider = rustls::crypto::CryptoProvider {
            kx_groups: groups,
            ..rustls::crypto::aws_lc_rs::default_provider()
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(
                PinnedVerifier::new(&identity.pin().unwrap()).unwrap(),
            ))
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("relay.example").unwrap();
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let group = tls
            .get_ref()
            .1
            .negotiated_key_exchange_group()
            .unwrap()
            .name();
        tls.write_all(b"ping").await.unwrap();
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"pong");
        group
    }

    #[tokio::test]
    async fn hybrid_post_quantum_where_offered_and_classical_otherwise() {
        use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
        let identity = Identity::generate(&names()).unwrap();
        // What our own clients offer: the hybrid group first.
        let ours = handshake_with_groups(&identity, default_provider().kx_groups).await;
        assert_eq!(ours, rustls::NamedGroup::X25519MLKEM768);
        assert!(is_post_quantum(ours));
        let classical = handshake_with_groups(&identity, vec![kx_group::X25519]).await;
        assert_eq!(classical, rustls::NamedGroup::X25519);
        assert!(!is_post_quantum(classical));
    }

    /// A ClientHello that offers only TLS 1.2 (no supported_versions extension).
    /// rustls is built without TLS 1.2 here, so it cannot produce one itself.
    fn tls12_client_hello() -> Vec<u8> {
        fn ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(data);
        }
        let mut extensions = Vec::new();
        ext(&mut extensions, 10, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // groups: x25519, P-256
        ext(&mut extensions, 11, &[1, 0]); // EC point formats: uncompressed
        ext(&mut extensions, 13, &[0, 4, 0x04, 0x03, 0x08, 0x04]); // ECDSA-SHA256, PSS-SHA256
        let mut hello = vec![0x03, 0x03]; // client_version TLS 1.2
        hello.extend_from_slice(&[0x42; 32]); // random
        hello.push(0); // no session id
        hello.extend_from_slice(&[0, 4, 0xc0, 0x2b, 0xc0, 0x2f]); // ECDHE-*-AES128-GCM-SHA256
        hello.extend_from_slice(&[1, 0]); // null compression
        hello.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        hello.extend_from_slice(&extensions);
        let mut handshake = vec![1]; // ClientHello
        handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&hello);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[tokio::test]
    async fn tls12_only_client_is_refused() {
        let identity = Identity::generate(&names()).unwrap();
        let addr = echo_server(&identity).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&tls12_client_hello()).await.unwrap();
        let mut reply = Vec::new();
        tcp.read_to_end(&mut reply).await.unwrap();
        // One fatal alert record: protocol_version (70), then the server closes.
        assert_eq!(reply.len(), 7, "{reply:?}");
        assert_eq!(reply[0], 0x15, "not an alert: {reply:?}");
        assert_eq!(&reply[5..], &[2, 70]);
    }
}
