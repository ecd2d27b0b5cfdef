//! The API's limits over real TLS on loopback: request rates per token and per source
//! (429 with Retry-After, then service again), the defaults letting a host start 100
//! containers at once, and the connection limits. No root needed: the data plane is
//! a no-op.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sidecar::Key;
use sidecar_proto::codes;
use sidecar_relay::api::{self, ApiState, RelayInfo};
use sidecar_relay::config::LimitsSection;
use sidecar_relay::dataplane::PeerEntry;
use sidecar_relay::limits::ApiLimits;
use sidecar_relay::service::{DataPlane, PeerService, ServiceOptions};
use sidecar_relay::store::{AddressPlan, Store, TokenSpec};
use sidecar_relay::tls::{self, Identity};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

struct NoDataPlane;

impl DataPlane for NoDataPlane {
    fn add_peer(&self, _peer: &PeerEntry) {}
    fn remove_peer(&self, _key: &Key) {}
    fn peer_stats(&self, _key: &Key) -> Option<(Option<u64>, u64, u64)> {
        None
    }
}

struct Relay {
    addr: SocketAddr,
    connector: TlsConnector,
    state: Arc<ApiState>,
    limits: ApiLimits,
    _shutdown: oneshot::Sender<()>,
}

impl Relay {
    async fn start(settings: LimitsSection) -> Relay {
        let store = Store::temporary(AddressPlan {
            ipv6: "2001:db8:7::/64".parse().unwrap(),
            ipv4_pool: None,
            reserved: vec![],
        })
        .unwrap();
        let info = RelayInfo {
            public_key: Key::generate_private().public_key(),
            endpoint: "relay.example:51820".parse().unwrap(),
            keepalive: 25,
            mtu: 1420,
            version: "9.9.9-test",
        };
        let service = PeerService::new(store, Arc::new(NoDataPlane), ServiceOptions::default());
        let state = Arc::new(ApiState::new(service, info));
        let identity = Identity::generate(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ApiLimits::new(&settings);
        let (tx, rx) = oneshot::channel::<()>();
        let server_config = Arc::new(identity.server_config().unwrap());
        let router = api::router_with_limits(state.clone(), &limits);
        let served = limits.clone();
        tokio::spawn(async move {
            api::serve_with_limits(listener, server_config, router, &served, async move {
                let _ = rx.await;
            })
            .await
        });
        let connector = TlsConnector::from(Arc::new(
            tls::client_config(&identity.pin().unwrap()).unwrap(),
        ));
        Relay {
            addr,
            connector,
            state,
            limits,
            _shutdown: tx,
        }
    }

    async fn token(&self, name: &str) -> String {
        let (_, secret) = self
            .state
            .store()
            .create_token(TokenSpec::tenant(name, 1000, 0))
            .await
            .unwrap();
        secret
    }

    /// A TLS connection from `from` (any 127/8 address is this host's).
    async fn connect(&self, from: IpAddr) -> io::Result<TlsStream<TcpStream>> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(from, 0))?;
        let tcp = socket.connect(self.addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = self.connector.connect(name, tcp).await?;
        // The server closes a refused connection before TLS; make sure this one is open.
        tls.flush().await?;
        Ok(tls)
    }

    /// One request on a fresh connection from 127.0.0.1: status, Retry-After, body.
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Option<String>, Value) {
        let mut tls = self.connect([127, 0, 0, 1].into()).await.unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(token) = token {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(&body);
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        match tls.read_to_end(&mut raw).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => panic!("reading the response: {e}"),
        }
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("end of headers");
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap();
        let retry_after = head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("retry-after")
                .then(|| v.trim().to_owned())
        });
        let json = serde_json::from_slice(&raw[split + 4..]).unwrap_or(Value::Null);
        (status, retry_after, json)
    }
}

fn register_body() -> Value {
    json!({ "pubkey": Key::generate_private().public_key().to_base64() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_token_limit_gets_429_with_retry_after_then_service_resumes() {
    let relay = Relay::start(LimitsSection {
        token_rate: 1,
        token_burst: 5,
        ..LimitsSection::default()
    })
    .await;
    let busy = relay.token("busy").await;
    let calm = relay.token("calm").await;
    for _ in 0..5 {
        let (status, _, _) = relay.call("GET", "/v1/status", Some(&busy), None).await;
        assert_eq!(status, 200);
    }
    let (status, retry_after, body) = relay
        .call("POST", "/v1/peers", Some(&busy), Some(register_body()))
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], codes::RATE_LIMITED, "{body}");
    assert!(body["message"]
        .as_str()
        .is_some_and(|m| m.contains("token")));
    let wait: u64 = retry_after
        .expect("a 429 carries Retry-After")
        .parse()
        .expect("Retry-After is whole seconds");
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    // The other token is untouched.
    let (status, _, _) = relay
        .call("POST", "/v1/peers", Some(&calm), Some(register_body()))
        .await;
    assert_eq!(status, 201);
    // After the wait the relay tells us, the busy token is served again.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let (status, _, body) = relay
        .call("POST", "/v1/peers", Some(&busy), Some(register_body()))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(relay.limits.requests.rate_limited_total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_a_valid_token_are_limited_by_source_first() {
    let relay = Relay::start(LimitsSection {
        source_rate: 1,
        source_burst: 8,
        ..LimitsSection::default()
    })
    .await;
    let token = relay.token("tenant").await;
    for _ in 0..8 {
        let (status, _, _) = relay
            .call("GET", "/v1/status", Some("sct_guessing"), None)
            .await;
        assert_eq!(status, 401);
    }
    // The source is spent: even a valid token from it waits, before any lookup.
    let (status, retry_after, body) = relay.call("GET", "/v1/status", Some(&token), None).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], codes::RATE_LIMITED);
    assert!(body["message"]
        .as_str()
        .is_some_and(|m| m.contains("source")));
    let wait: u64 = retry_after.unwrap().parse().unwrap();
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let (status, _, _) = relay.call("GET", "/v1/status", Some(&token), None).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_containers_starting_at_once_all_register_with_the_defaults() {
    let relay = Arc::new(Relay::start(LimitsSection::default()).await);
    let token = relay.token("docker-host").await;
    // Like the agent: a connection per request, a status check and a registration
    // for each container, all from one host and one token at the same moment.
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (relay, token) = (relay.clone(), token.clone());
            tokio::spawn(async move {
                let (status, _, _) = relay.call("GET", "/v1/status", Some(&token), None).await;
                let (created, _, body) = relay
                    .call("POST", "/v1/peers", Some(&token), Some(register_body()))
                    .await;
                (status, created, body)
            })
        })
        .collect();
    for task in tasks {
        let (status, created, body) = task.await.unwrap();
        assert_eq!((status, created), (200, 201), "{body}");
    }
    assert_eq!(relay.state.store().peer_count(), 100);
    assert_eq!(relay.limits.requests.rate_limited_total(), 0);
    assert_eq!(relay.limits.connections.refused_total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limits_refuse_the_excess_connection_and_serve_again_after() {
    let relay = Relay::start(LimitsSection {
        max_connections: 3,
        max_connections_per_source: 2,
        ..LimitsSection::default()
    })
    .await;
    let a: IpAddr = [127, 0, 0, 1].into();
    let b: IpAddr = [127, 0, 0, 2].into();
    let a1 = relay.connect(a).await.unwrap();
    let _a2 = relay.connect(a).await.unwrap();
    assert!(
        relay.connect(a).await.is_err(),
        "a third connection from one source must be refused"
    );
    let _b1 = relay.connect(b).await.unwrap();
    assert!(
        relay.connect(b).await.is_err(),
        "a fourth connection in total must be refused"
    );
    assert_eq!(relay.limits.connections.refused_total(), 2);

    // Closing one frees its slot as soon as the relay sees the close.
    drop(a1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay.limits.connections.open() > 2 {
        assert!(
            Instant::now() < deadline,
            "the closed connection kept its slot"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _, _) = relay.call("GET", "/v1/health", None, None).await;
    assert_eq!(status, 200);
}
