//! The relay's control API, over HTTPS with the relay's key pinned.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sidecar::Key;
use sidecar_proto::pin::{client_config, PinMismatch};
use sidecar_proto::pq::{Psk, PskContext};
use sidecar_proto::{
    Allocation, ApiError, ContainerPeer, DeletePeer, MachineKey, PqInfo, RegisterPeer,
    RegisterRequest, Registered, Status, TOKEN_PREFIX,
};

use crate::machine_id::{self, IdentitySource};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A request that takes longer than this has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest response body we read.
const MAX_BODY: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("relay URL {0:?} must look like https://HOST:PORT")]
    BadUrl(String),
    #[error("the token must start with {TOKEN_PREFIX} (it looks like {0}); copy the agent token the relay printed")]
    BadToken(String),
    #[error("{0}")]
    Pin(#[from] sidecar_proto::pin::PinError),
    #[error("cannot reach the relay at {url}: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("the relay's certificate does not match --pin: {0}")]
    PinMismatch(PinMismatch),
    #[error("TLS with the relay at {url} failed: {source}")]
    Tls { url: String, source: std::io::Error },
    #[error("HTTP with the relay failed: {0}")]
    Http(String),
    #[error("the relay did not answer within {0:?}")]
    Timeout(Duration),
    #[error("relay refused ({status}): {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the relay ({status}): {body}")]
    Unexpected { status: u16, body: String },
    /// A success whose body is not what the API promises (a bad address, key or
    /// endpoint in it): the reason names the field.
    #[error("the relay's answer ({status}) does not decode: {reason}")]
    Malformed { status: u16, reason: String },
}

impl ClientError {
    /// The relay has no IPv4 pool to hand out from.
    pub fn is_ipv4_unavailable(&self) -> bool {
        matches!(self, ClientError::Api { code, .. } if code == "ipv4_unavailable")
    }

    /// Errors that will not go away by asking again.
    pub fn is_permanent(&self) -> bool {
        match self {
            ClientError::Api { status, .. } => (400..500).contains(status) && *status != 429,
            ClientError::BadUrl(_)
            | ClientError::BadToken(_)
            | ClientError::Pin(_)
            | ClientError::PinMismatch(_) => true,
            _ => false,
        }
    }
}

#[derive(Clone)]
pub struct RelayClient {
    url: String,
    host: String,
    port: u16,
    token: Arc<parking_lot::RwLock<String>>,
    /// Where the token came from, read again when the relay refuses it (the token
    /// was revoked and replaced, or the relay's store was rebuilt).
    token_file: Option<std::path::PathBuf>,
    connector: TlsConnector,
    /// What every registration needs from the relay, fetched once.
    context: Arc<tokio::sync::Mutex<Option<Arc<RegisterContext>>>>,
    identity: IdentitySource,
}

/// The relay's X-Wing key (if it has one) and this host's fingerprint for the token.
#[derive(Debug)]
struct RegisterContext {
    pq: Option<RelayPq>,
    machine: Option<String>,
}

#[derive(Debug)]
struct RelayPq {
    xwing: Vec<u8>,
    relay_key: Key,
}

/// A registration's outcome with the preshared key it established.
#[derive(Debug, Clone)]
pub struct PqRegistration {
    pub allocation: Allocation,
    /// The post-quantum preshared key both sides now use; `None` when the relay
    /// offers none (a relay from before post-quantum keys).
    pub psk: Option<Psk>,
    /// How often to encapsulate again, as the relay asks.
    pub rotate: Option<Duration>,
    /// The rotation counter of `psk`.
    pub counter: Option<u64>,
}

impl std::fmt::Debug for RelayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayClient")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Refuses the most common install mistake up front: a token that is not an agent
/// token at all (a pin, a public key, a truncated paste).
pub fn check_token(token: &str) -> Result<(), ClientError> {
    if token.starts_with(TOKEN_PREFIX) && token.len() > TOKEN_PREFIX.len() {
        return Ok(());
    }
    let shown: String = token.chars().take(12).collect();
    Err(ClientError::BadToken(format!("{shown}…")))
}

impl RelayClient {
    pub fn new(url: &str, token: &str, pin: &str) -> Result<RelayClient, ClientError> {
        check_token(token)?;
        RelayClient::connect_to(url, token, pin)
    }

    /// A client without a token, for the routes that need none (device login).
    pub fn without_token(url: &str, pin: &str) -> Result<RelayClient, ClientError> {
        RelayClient::connect_to(url, "", pin)
    }

    fn connect_to(url: &str, token: &str, pin: &str) -> Result<RelayClient, ClientError> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| ClientError::BadUrl(url.to_string()))?
            .trim_end_matches('/');
        let (host, port) =
            split_host_port(rest).ok_or_else(|| ClientError::BadUrl(url.to_string()))?;
        let mut config = client_config(pin)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(RelayClient {
            url: format!("https://{rest}"),
            host,
            port,
            token: Arc::new(parking_lot::RwLock::new(token.to_string())),
            token_file: None,
            connector: TlsConnector::from(Arc::new(config)),
            context: Arc::default(),
            identity: IdentitySource::from_env(),
        })
    }

    /// Reads the token from `path` again whenever the relay refuses the current one.
    pub fn with_token_file(mut self, path: std::path::PathBuf) -> RelayClient {
        self.token_file = Some(path);
        self
    }

    /// After a 401: whether the token file now holds another valid-looking token.
    fn reload_token(&self) -> bool {
        let Some(path) = &self.token_file else {
            return false;
        };
        let fresh = match crate::secrets::read_token_file(path) {
            Ok(t) if check_token(&t).is_ok() => t,
            Ok(_) => return false,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the token file again");
                return false;
            }
        };
        let mut token = self.token.write();
        if *token == fresh {
            return false;
        }
        *token = fresh;
        tracing::info!(path = %path.display(), "the relay refused the token; using the new one from the token file");
        true
    }

    /// Registers with a fresh X-Wing encapsulation (when the relay has a key) and
    /// this host's machine fingerprint, and derives the preshared key the relay
    /// now holds for the peer. Every call is a new encapsulation: calling it again
    /// for the same key rotates the preshared key.
    pub async fn register_pq(&self, req: &RegisterPeer) -> Result<PqRegistration, ClientError> {
        let context = self.register_context().await?;
        let encapsulated = match &context.pq {
            Some(pq) => Some(sidecar_proto::pq::encapsulate(&pq.xwing).map_err(|e| {
                ClientError::Malformed {
                    status: 200,
                    reason: e.to_string(),
                }
            })?),
            None => None,
        };
        let body = RegisterRequest {
            peer: req.clone(),
            pq_ciphertext: encapsulated.as_ref().map(|(ct, _)| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(ct)
            }),
            machine: context.machine.clone(),
        };
        let registered: Registered = self.call(Method::POST, "/v1/peers", Some(&body)).await?;
        let psk = match (&encapsulated, registered.pq, &context.pq) {
            (Some((_, secret)), Some(grant), Some(pq)) => {
                if pq.relay_key != registered.allocation.relay_public_key {
                    return Err(ClientError::Malformed {
                        status: 200,
                        reason: "the relay's WireGuard key differs from the one its /v1/pq names"
                            .into(),
                    });
                }
                Some(sidecar_proto::pq::derive_psk(
                    secret,
                    &PskContext {
                        peer: &req.pubkey,
                        relay: &pq.relay_key,
                        relay_xwing: &pq.xwing,
                        counter: grant.counter,
                    },
                ))
            }
            _ => None,
        };
        Ok(PqRegistration {
            allocation: registered.allocation,
            psk,
            rotate: registered
                .pq
                .map(|g| Duration::from_secs(g.rotate_secs.max(1))),
            counter: registered.pq.map(|g| g.counter),
        })
    }

    async fn register_context(&self) -> Result<Arc<RegisterContext>, ClientError> {
        let mut cached = self.context.lock().await;
        if let Some(c) = cached.as_ref() {
            return Ok(c.clone());
        }
        let pq = match self.call::<(), PqInfo>(Method::GET, "/v1/pq", None).await {
            Ok(info) => Some(RelayPq {
                xwing: sidecar_proto::pq::decode_public_key(&info.xwing_public_key).map_err(
                    |e| ClientError::Malformed {
                        status: 200,
                        reason: e.to_string(),
                    },
                )?,
                relay_key: info.relay_public_key,
            }),
            // A relay from before post-quantum keys.
            Err(ClientError::Api { status: 404, .. }) => None,
            Err(e) => return Err(e),
        };
        let machine = match self
            .call::<(), MachineKey>(Method::GET, "/v1/machine", None)
            .await
        {
            Ok(key) => match self.identity.read() {
                Ok(identity) => Some(
                    machine_id::fingerprint(&key.machine_key, &identity).map_err(|e| {
                        ClientError::Malformed {
                            status: 200,
                            reason: format!("machine_key: {e}"),
                        }
                    })?,
                ),
                Err(e) => {
                    // A bound token then gets machine_required, which names the fix.
                    tracing::warn!(error = %e, "cannot read this host's identity; registering without a machine fingerprint");
                    None
                }
            },
            Err(ClientError::Api { status: 404, .. }) => None,
            Err(e) => return Err(e),
        };
        let context = Arc::new(RegisterContext { pq, machine });
        *cached = Some(context.clone());
        Ok(context)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The token's limits and usage.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.call::<(), Status>(Method::GET, "/v1/status", None)
            .await
    }

    pub async fn register(&self, req: &RegisterPeer) -> Result<Allocation, ClientError> {
        self.call(Method::POST, "/v1/peers", Some(req)).await
    }

    pub async fn deregister(&self, pubkey: Key) -> Result<(), ClientError> {
        let body = DeletePeer { pubkey };
        match self
            .call::<_, serde_json::Value>(Method::DELETE, "/v1/peers", Some(&body))
            .await
        {
            Ok(_) => Ok(()),
            // Already gone is what we wanted.
            Err(ClientError::Api { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// This token's registration for container `id`, with the relay's view of it.
    pub async fn peer_by_container(&self, id: &str) -> Result<Option<ContainerPeer>, ClientError> {
        match self
            .call::<(), ContainerPeer>(Method::GET, &format!("/v1/peers/by-container/{id}"), None)
            .await
        {
            Ok(p) => Ok(Some(p)),
            Err(ClientError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST path` with a JSON body, decoded as `T` (an error answer as
    /// [`ClientError::Api`]).
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let once = || async {
            tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method.clone(), path, body))
                .await
                .map_err(|_| ClientError::Timeout(REQUEST_TIMEOUT))?
        };
        match once().await {
            Err(ClientError::Api { status: 401, .. }) if self.reload_token() => once().await,
            other => other,
        }
    }

    async fn exchange<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| ClientError::Connect {
                url: self.url.clone(),
                source,
            })?;
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|_| ClientError::BadUrl(self.url.clone()))?;
        let tls = self.connector.connect(name, tcp).await.map_err(|source| {
            match pin_mismatch(&source) {
                Some(m) => ClientError::PinMismatch(m),
                None => ClientError::Tls {
                    url: self.url.clone(),
                    source,
                },
            }
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let payload = match body {
            Some(b) => {
                Bytes::from(serde_json::to_vec(b).map_err(|e| ClientError::Http(e.to_string()))?)
            }
            None => Bytes::new(),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, format!("{}:{}", self.host, self.port));
        let token = self.token.read().clone();
        if !token.is_empty() {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(payload))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = response.status();
        let bytes = http_body_util::Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        driver.abort();
        decode(status, &bytes)
    }
}

fn decode<T: DeserializeOwned>(status: StatusCode, body: &[u8]) -> Result<T, ClientError> {
    if status.is_success() {
        let body = if body.is_empty() {
            b"null".as_slice()
        } else {
            body
        };
        return serde_json::from_slice(body).map_err(|e| ClientError::Malformed {
            status: status.as_u16(),
            reason: e.to_string(),
        });
    }
    match serde_json::from_slice::<ApiError>(body) {
        Ok(e) => Err(ClientError::Api {
            status: status.as_u16(),
            code: e.error,
            message: e.message,
        }),
        Err(_) => Err(ClientError::Unexpected {
            status: status.as_u16(),
            body: String::from_utf8_lossy(body).chars().take(200).collect(),
        }),
    }
}

fn pin_mismatch(e: &std::io::Error) -> Option<PinMismatch> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) = inner else {
        return None;
    };
    other.0.downcast_ref::<PinMismatch>().cloned()
}

fn split_host_port(s: &str) -> Option<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host.to_string(), port.parse().ok()?));
    }
    let (host, port) = s.rsplit_once(':')?;
    if host.is_empty() || host.contains(':') {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_prefix_is_checked() {
        assert!(check_token("sct_live_abc").is_ok());
        let err = check_token("sha256//abcdefghijkl").unwrap_err();
        assert!(
            err.to_string().contains("must start with sct_live_"),
            "{err}"
        );
        assert!(check_token("sct_live_").is_err());
        assert!(err.is_permanent());
    }

    #[test]
    fn urls() {
        assert_eq!(split_host_port("relay:8443"), Some(("relay".into(), 8443)));
        assert_eq!(
            split_host_port("[2001:db8::1]:8443"),
            Some(("2001:db8::1".into(), 8443))
        );
        assert_eq!(split_host_port("2001:db8::1:8443"), None);
        assert_eq!(split_host_port("relay"), None);
        let pin = "sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        assert!(RelayClient::new("http://relay:1", "sct_live_x", pin).is_err());
        assert!(RelayClient::new("https://relay:1", "sct_live_x", pin).is_ok());
        assert!(matches!(
            RelayClient::new("https://relay:1", "sct_live_x", "nope"),
            Err(ClientError::Pin(_))
        ));
    }

    #[test]
    fn decodes_api_errors() {
        let r: Result<serde_json::Value, _> = decode(
            StatusCode::FORBIDDEN,
            br#"{"error":"quota_exceeded","message":"max_peers reached"}"#,
        );
        let e = r.unwrap_err();
        assert!(e.to_string().contains("quota_exceeded"));
        assert!(e.is_permanent());
        let r: Result<serde_json::Value, _> = decode(StatusCode::BAD_GATEWAY, b"<html>");
        assert!(!r.unwrap_err().is_permanent());
    }

    #[test]
    fn an_allocation_with_a_bad_address_is_refused_with_the_reason() {
        let body = br#"{"pubkey":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=","ipv6":"2001:db8::/64","ipv4":null,"relay_public_key":"AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=","relay_endpoint":"relay.example:51820","keepalive":25,"mtu":1420,"created":true}"#;
        let e = decode::<Allocation>(StatusCode::CREATED, body).unwrap_err();
        assert!(
            matches!(e, ClientError::Malformed { status: 201, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("2001:db8::/64"), "{e}");
        assert!(!e.is_permanent());
        let good = String::from_utf8_lossy(body).replace("2001:db8::/64", "2001:db8::7/128");
        let alloc = decode::<Allocation>(StatusCode::CREATED, good.as_bytes()).unwrap();
        assert_eq!(
            alloc.ipv6,
            "2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap()
        );
        assert_eq!(alloc.relay_public_key, Key([2; 32]));
    }
}
