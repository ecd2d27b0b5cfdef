//! The control API over real TLS on loopback: every route and every error shape,
//! the OpenAPI document, concurrency, and curl's view of the pin. No root needed:
//! the data plane is a recording fake (the real one is tested end to end elsewhere).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};
use sidecar::{IpPrefix, Key};
use sidecar_proto::{Allocation, ApiError, ContainerPeer, PeerList, Status};
use sidecar_relay::api::{self, ApiState, RelayInfo};
use sidecar_relay::dataplane::PeerEntry;
use sidecar_relay::service::{DataPlane, PeerService, ServiceOptions};
use sidecar_relay::store::{AddressPlan, Store, TokenRecord, TokenSpec};
use sidecar_relay::tls::{self, Identity};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

const IPV6_PREFIX: &str = "2001:db8:5::/64";
const IPV4_POOL: &str = "192.0.2.0/26";

// ---------------------------------------------------------------- fake data plane

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Added {
        key: Key,
        ipv4: bool,
        bandwidth_mbps: Option<u32>,
    },
    Removed(Key),
}

/// (last handshake, rx bytes, tx bytes), as `DataPlane::peer_stats` reports them.
type Stats = (Option<u64>, u64, u64);

#[derive(Default)]
struct RecordingDataPlane {
    events: Mutex<Vec<Event>>,
    stats: Mutex<HashMap<Key, Stats>>,
}

impl RecordingDataPlane {
    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }
    fn adds_of(&self, key: &Key) -> usize {
        self.events()
            .iter()
            .filter(|e| matches!(e, Event::Added { key: k, .. } if k == key))
            .count()
    }
    fn removed(&self) -> Vec<Key> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Removed(k) => Some(k),
                Event::Added { .. } => None,
            })
            .collect()
    }
}

impl DataPlane for RecordingDataPlane {
    fn add_peer(&self, peer: &PeerEntry) {
        self.events.lock().unwrap().push(Event::Added {
            key: peer.public_key,
            ipv4: peer.ipv4.is_some(),
            bandwidth_mbps: peer.bandwidth_mbps,
        });
    }
    fn remove_peer(&self, key: &Key) {
        self.events.lock().unwrap().push(Event::Removed(*key));
    }
    fn peer_stats(&self, key: &Key) -> Option<Stats> {
        self.stats.lock().unwrap().get(key).copied()
    }
}

// ---------------------------------------------------------------- server

struct Relay {
    addr: SocketAddr,
    pin: String,
    state: Arc<ApiState>,
    dataplane: Arc<RecordingDataPlane>,
    relay_key: Key,
    admin: String,
    shutdown: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<io::Result<()>>>,
}

fn plan(ipv4_pool: Option<&str>) -> AddressPlan {
    AddressPlan {
        ipv6: IPV6_PREFIX.parse().unwrap(),
        ipv4_pool: ipv4_pool.map(|p| p.parse().unwrap()),
        reserved: vec![],
    }
}

impl Relay {
    async fn start() -> Relay {
        Relay::start_with(plan(Some(IPV4_POOL))).await
    }

    async fn start_with(plan: AddressPlan) -> Relay {
        Relay::start_configured(plan, api::DeviceLogin::default()).await
    }

    async fn start_configured(plan: AddressPlan, device: api::DeviceLogin) -> Relay {
        let store = Store::temporary(plan).unwrap();
        let (_, admin) = store
            .create_token(TokenSpec {
                admin: true,
                ..TokenSpec::tenant("operator", 1000, 1000)
            })
            .await
            .unwrap();
        let dataplane = Arc::new(RecordingDataPlane::default());
        let relay_key = Key::generate_private().public_key();
        let info = RelayInfo {
            public_key: relay_key,
            endpoint: "relay.example:51820".parse().unwrap(),
            keepalive: 25,
            mtu: 1420,
            version: "9.9.9-test",
        };
        let service = PeerService::new(store, dataplane.clone(), ServiceOptions::default());
        let state = Arc::new(ApiState::new(service, info).with_device_login(device));

        let identity = Identity::generate(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let served = tokio::spawn(api::serve(
            listener,
            Arc::new(identity.server_config().unwrap()),
            api::router(state.clone()),
            async move {
                let _ = rx.await;
            },
        ));
        Relay {
            addr,
            pin: identity.pin().unwrap(),
            state,
            dataplane,
            relay_key,
            admin,
            shutdown: Some(tx),
            served: Some(served),
        }
    }

    fn client(&self) -> Client {
        Client::new(self.addr, &self.pin)
    }

    /// A user token made straight in the store.
    async fn token(&self, max_peers: u32, max_ipv4: u32, bw: Option<u32>) -> (TokenRecord, String) {
        self.state
            .store()
            .create_token(TokenSpec {
                bandwidth_mbps: bw,
                ..TokenSpec::tenant("tenant", max_peers, max_ipv4)
            })
            .await
            .unwrap()
    }
}

// ---------------------------------------------------------------- tiny HTTP/1.1 client

struct Client {
    addr: SocketAddr,
    connector: TlsConnector,
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    fn parse<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_value(self.json()).unwrap()
    }
    /// Asserts the API error shape and returns it.
    fn error(&self, status: u16, code: &str) -> ApiError {
        assert_eq!(self.status, status, "{self:?}");
        assert!(
            self.header("content-type")
                .is_some_and(|v| v.starts_with("application/json")),
            "{self:?}"
        );
        let err: ApiError = self.parse();
        assert_eq!(err.error, code, "{err:?}");
        assert!(!err.message.is_empty());
        if status == 401 {
            assert_eq!(
                self.header("www-authenticate"),
                Some(r#"Bearer realm="sidecar""#)
            );
        }
        err
    }
}

impl Client {
    fn new(addr: SocketAddr, pin: &str) -> Client {
        let config = tls::client_config(pin).unwrap();
        Client {
            addr,
            connector: TlsConnector::from(Arc::new(config)),
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Response {
        self.send("GET", path, token, None).await
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Response {
        self.send("POST", path, token, Some(body)).await
    }

    async fn delete(&self, path: &str, token: Option<&str>, body: Value) -> Response {
        self.send("DELETE", path, token, Some(body)).await
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Response {
        let mut headers = Vec::new();
        if let Some(token) = token {
            headers.push(("Authorization", format!("Bearer {token}")));
        }
        let body = match body {
            Some(v) => {
                headers.push(("Content-Type", "application/json".to_owned()));
                serde_json::to_vec(&v).unwrap()
            }
            None => Vec::new(),
        };
        self.raw(method, path, &headers, &body).await.unwrap()
    }

    async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> io::Result<Response> {
        let tcp = TcpStream::connect(self.addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = self.connector.connect(name, tcp).await?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        tls.write_all(request.as_bytes()).await?;
        tls.write_all(body).await?;
        let mut raw = Vec::new();
        // A server that closes without close_notify still sent a whole response.
        match tls.read_to_end(&mut raw).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(e),
        }
        Ok(parse_response(&raw))
    }
}

fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = std::str::from_utf8(&raw[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = std::str::from_utf8(&data[..line_end]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

fn new_key() -> Key {
    Key::generate_private().public_key()
}

fn register_body(key: &Key, ipv4: bool) -> Value {
    json!({"pubkey": key.to_base64(), "ipv4": ipv4})
}

fn in_prefix(addr: impl Into<IpAddr>, prefix: &str) -> bool {
    let prefix: IpPrefix = prefix.parse().unwrap();
    prefix.contains(addr.into())
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn health_needs_no_token_and_reports_draining() {
    let relay = Relay::start().await;
    let client = relay.client();
    let resp = client.get("/v1/health", None).await;
    assert_eq!(resp.status, 200);
    let body = resp.json();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], "9.9.9-test");
    assert_eq!(body["peers"], 0);
    assert!(body["uptime_secs"].is_u64());

    let (_, token) = relay.token(5, 1, None).await;
    let key = new_key();
    assert_eq!(
        client
            .post("/v1/peers", Some(&token), register_body(&key, false))
            .await
            .status,
        201
    );
    assert_eq!(client.get("/v1/health", None).await.json()["peers"], 1);

    relay.state.start_draining();
    assert_eq!(
        client.get("/v1/health", None).await.json()["status"],
        "draining"
    );
    let err = client
        .post("/v1/peers", Some(&token), register_body(&new_key(), false))
        .await
        .error(503, "draining");
    assert!(err.message.contains("shutting down"), "{err:?}");
    // Existing peers are still served: listing and deleting work while draining.
    assert_eq!(client.get("/v1/peers", Some(&token)).await.status, 200);
    let resp = client
        .delete(
            "/v1/peers",
            Some(&token),
            json!({"pubkey": key.to_base64()}),
        )
        .await;
    assert_eq!(resp.status, 204);
}

#[tokio::test]
async fn authentication_errors() {
    let relay = Relay::start().await;
    let client = relay.client();
    let missing = client
        .get("/v1/status", None)
        .await
        .error(401, "unauthorized");
    assert!(missing.message.contains("missing"), "{missing:?}");

    let prefix = client
        .get("/v1/status", Some("ghp_abcdef"))
        .await
        .error(401, "unauthorized");
    assert_eq!(prefix.message, "token must start with sct_live_");

    let unknown = client
        .get(
            "/v1/status",
            Some("sct_live_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        )
        .await
        .error(401, "unauthorized");
    assert!(unknown.message.contains("unknown"), "{unknown:?}");

    let long = format!("sct_live_{}", "A".repeat(10_000));
    client
        .get("/v1/status", Some(&long))
        .await
        .error(401, "unauthorized");

    let basic = client
        .raw(
            "GET",
            "/v1/peers",
            &[("Authorization", "Basic dXNlcjpwYXNz".into())],
            b"",
        )
        .await
        .unwrap();
    basic.error(401, "unauthorized");
    let bare = client
        .raw(
            "GET",
            "/v1/peers",
            &[("Authorization", relay.admin.clone())],
            b"",
        )
        .await
        .unwrap();
    bare.error(401, "unauthorized");

    // The scheme is case-insensitive (RFC 9110).
    let lower = client
        .raw(
            "GET",
            "/v1/status",
            &[("Authorization", format!("bearer {}", relay.admin))],
            b"",
        )
        .await
        .unwrap();
    assert_eq!(lower.status, 200);
    // Auth is checked before the body is even parsed.
    client
        .raw("POST", "/v1/peers", &[], b"{not json")
        .await
        .unwrap()
        .error(401, "unauthorized");
}

#[tokio::test]
async fn status_reports_limits_and_usage() {
    let relay = Relay::start().await;
    let client = relay.client();
    let (record, token) = relay.token(3, 2, Some(50)).await;
    client
        .post("/v1/peers", Some(&token), register_body(&new_key(), true))
        .await;
    client
        .post("/v1/peers", Some(&token), register_body(&new_key(), false))
        .await;
    let resp = client.get("/v1/status", Some(&token)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.json(),
        json!({
            "token_id": record.id, "name": "tenant",
            "limits": {"max_peers": 3, "max_ipv4": 2, "bandwidth_mbps": 50},
            "usage": {"peers": 2, "ipv4": 1}
        })
    );
    let _: Status = resp.parse();
}

#[tokio::test]
async fn register_is_idempotent_and_feeds_the_data_plane() {
    let relay = Relay::start().await;
    let client = relay.client();
    let (_, token) = relay.token(5, 5, Some(20)).await;
    let key = new_key();

    let first = client
        .post(
            "/v1/peers",
            Some(&token),
            json!({"pubkey": key.to_base64(), "name": "web", "container": "c-1"}),
        )
        .await;
    assert_eq!(first.status, 201, "{first:?}");
    let alloc: Allocation = first.parse();
    assert!(alloc.created);
    assert_eq!(alloc.pubkey, key);
    assert!(in_prefix(alloc.ipv6, IPV6_PREFIX), "{alloc:?}");
    assert_eq!(alloc.ipv4, None);
    assert_eq!(alloc.relay_public_key, relay.relay_key);
    assert_eq!(alloc.relay_endpoint.to_string(), "relay.example:51820");
    // The wire form agents in the field read.
    let wire = first.json();
    assert_eq!(wire["pubkey"], key.to_base64());
    assert_eq!(wire["ipv6"], format!("{}/128", alloc.ipv6));
    assert_eq!(wire["ipv4"], Value::Null);
    assert_eq!(wire["relay_public_key"], relay.relay_key.to_base64());
    assert_eq!(wire["relay_endpoint"], "relay.example:51820");
    assert_eq!((alloc.keepalive, alloc.mtu), (25, 1420));
    assert_eq!(
        relay.dataplane.events(),
        vec![Event::Added {
            key,
            ipv4: false,
            bandwidth_mbps: Some(20)
        }]
    );

    let again = client
        .post("/v1/peers", Some(&token), register_body(&key, false))
        .await;
    assert_eq!(again.status, 200);
    let same: Allocation = again.parse();
    assert!(!same.created);
    assert_eq!(same.ipv6, alloc.ipv6);

    // Asking again with ipv4 adds an address, so the data plane hears about it.
    let upgraded: Allocation = {
        let resp = client
            .post("/v1/peers", Some(&token), register_body(&key, true))
            .await;
        assert_eq!(resp.status, 200);
        resp.parse()
    };
    assert!(!upgraded.created);
    assert_eq!(upgraded.ipv6, alloc.ipv6);
    assert!(in_prefix(upgraded.ipv4.unwrap(), IPV4_POOL), "{upgraded:?}");
    assert_eq!(
        relay.dataplane.events().last(),
        Some(&Event::Added {
            key,
            ipv4: true,
            bandwidth_mbps: Some(20)
        })
    );
    assert_eq!(relay.dataplane.adds_of(&key), 3);
}

#[tokio::test]
async fn quotas_conflicts_and_pools() {
    let relay = Relay::start().await;
    let client = relay.client();
    let (_, token) = relay.token(2, 1, None).await;
    assert_eq!(
        client
            .post("/v1/peers", Some(&token), register_body(&new_key(), true))
            .await
            .status,
        201
    );
    let v4 = client
        .post("/v1/peers", Some(&token), register_body(&new_key(), true))
        .await
        .error(403, "quota_exceeded");
    assert!(v4.message.contains("max_ipv4"), "{v4:?}");
    let held = new_key();
    assert_eq!(
        client
            .post("/v1/peers", Some(&token), register_body(&held, false))
            .await
            .status,
        201
    );
    let peers = client
        .post("/v1/peers", Some(&token), register_body(&new_key(), false))
        .await
        .error(403, "quota_exceeded");
    assert!(peers.message.contains("max_peers"), "{peers:?}");

    // The same key under another token.
    let (_, other) = relay.token(5, 5, None).await;
    client
        .post("/v1/peers", Some(&other), register_body(&held, false))
        .await
        .error(409, "conflict");

    // Labels the store refuses.
    let err = client
        .post(
            "/v1/peers",
            Some(&other),
            json!({"pubkey": new_key().to_base64(), "name": "bad\u{7}name"}),
        )
        .await
        .error(422, "invalid_request");
    assert!(err.message.contains("name"), "{err:?}");
}

#[tokio::test]
async fn ipv4_unavailable_and_pool_exhausted() {
    let relay = Relay::start_with(plan(None)).await;
    let client = relay.client();
    let (_, token) = relay.token(5, 5, None).await;
    client
        .post("/v1/peers", Some(&token), register_body(&new_key(), true))
        .await
        .error(422, "ipv4_unavailable");

    let relay = Relay::start_with(plan(Some("192.0.2.7/32"))).await;
    let client = relay.client();
    let (_, token) = relay.token(5, 5, None).await;
    let one: Allocation = client
        .post("/v1/peers", Some(&token), register_body(&new_key(), true))
        .await
        .parse();
    assert_eq!(one.ipv4, Some(Ipv4Addr::new(192, 0, 2, 7)));
    let err = client
        .post("/v1/peers", Some(&token), register_body(&new_key(), true))
        .await
        .error(503, "pool_exhausted");
    assert!(err.message.contains("ipv4"), "{err:?}");
}

#[tokio::test]
async fn listing_is_scoped_and_carries_live_counters() {
    let relay = Relay::start().await;
    let client = relay.client();
    let (_, alice) = relay.token(5, 5, None).await;
    let (_, bob) = relay.token(5, 5, None).await;
    let (a1, a2, b1) = (new_key(), new_key(), new_key());
    for (token, key) in [(&alice, &a1), (&alice, &a2), (&bob, &b1)] {
        assert_eq!(
            client
                .post("/v1/peers", Some(token), register_body(key, false))
                .await
                .status,
            201
        );
    }
    relay
        .dataplane
        .stats
        .lock()
        .unwrap()
        .insert(a1, (Some(1_700_000_000), 1234, 5678));

    let list: PeerList = client.get("/v1/peers", Some(&alice)).await.parse();
    let keys: HashSet<Key> = list.peers.iter().map(|p| p.pubkey).collect();
    assert_eq!(keys, HashSet::from([a1, a2]));
    let live = list.peers.iter().find(|p| p.pubkey == a1).unwrap();
    assert_eq!(
        (live.last_handshake, live.rx_bytes, live.tx_bytes),
        (Some(1_700_000_000), 1234, 5678)
    );
    assert_eq!(live.relay_public_key, relay.relay_key);
    assert!(live.created > 0);
    let idle = list.peers.iter().find(|p| p.pubkey == a2).unwrap();
    assert_eq!(
        (idle.last_handshake, idle.rx_bytes, idle.tx_bytes),
        (None, 0, 0)
    );

    let all: PeerList = client.get("/v1/peers", Some(&relay.admin)).await.parse();
    assert_eq!(all.peers.len(), 3);
}

#[tokio::test]
async fn lookup_by_container() {
    let relay = Relay::start().await;
    let client = relay.client();
    let (_, alice) = relay.token(5, 5, None).await;
    let (_, bob) = relay.token(5, 5, None).await;
    let key = new_key();
    let body = json!({"pubkey": key.to_base64(), "container": "3f4e5d", "name": "db"});
    assert_eq!(
        client.post("/v1/peers", Some(&alice), body).await.status,
        201
    );

    let resp = client
        .get("/v1/peers/by-container/3f4e5d", Some(&alice))
        .await;
    assert_eq!(resp.status, 200);
    let raw: serde_json::Value = resp.parse();
    assert!(
        raw["ipv6"].as_str().is_some_and(|a| !a.contains('/')),
        "by-container gives a bare address: {raw}"
    );
    assert_eq!(raw["ipv4"], "", "no IPv4: an empty string");
    let view: ContainerPeer = serde_json::from_value(raw).unwrap();
    assert_eq!(view.pubkey, key);
    assert_eq!(view.container.as_deref(), Some("3f4e5d"));
    assert_eq!(view.name.as_deref(), Some("db"));
    assert!(!view.up, "never handshaken: not up");
    assert!(!view.externally_reachable);

    client
        .get("/v1/peers/by-container/3f4e5d", Some(&bob))
        .await
        .error(404, "not_found");
    client
        .get("/v1/peers/by-container/nope", Some(&alice))
        .await
        .error(404, "not_found");
    client
        .get("/v1/peers/by-container/3f4e5d", None)
        .await
        .error(401, "unauthorized");
}

#[tokio::test]
async fn delete_peer_is_scoped_to_the_token() {
    let relay = Relay::start().await;
    let client = relay.client();
    let (_, alice) = relay.token(5, 5, None).await;
    let (_, bob) = relay.token(5, 5, None).await;
    let key = new_key();
    let first: Allocation = client
        .post("/v1/peers", Some(&alice), register_body(&key, true))
        .await
        .parse();
    let body = json!({"pubkey": key.to_base64()});

    client
        .delete("/v1/peers", Some(&bob), body.clone())
        .await
        .error(404, "not_found");
    assert!(relay.dataplane.removed().is_empty());

    let resp = client.delete("/v1/peers", Some(&alice), body.clone()).await;
    assert_eq!(resp.status, 204, "{resp:?}");
    assert!(resp.body.is_empty());
    assert_eq!(relay.dataplane.removed(), vec![key]);
    client
        .delete("/v1/peers", Some(&alice), body)
        .await
        .error(404, "not_found");
    assert_eq!(
        client
            .get("/v1/status", Some(&alice))
            .await
            .parse::<Status>()
            .usage
            .peers,
        0
    );

    // The key gets its addresses back when it returns.
    let again: Allocation = client
        .post("/v1/peers", Some(&alice), register_body(&key, true))
        .await
        .parse();
    assert!(again.created);
    assert_eq!((again.ipv6, again.ipv4), (first.ipv6, first.ipv4));

    client
        .delete("/v1/peers", Some(&alice), json!({"pubkey": "AAAA"}))
        .await
        .error(400, "invalid_pubkey");
}

#[tokio::test]
async fn admin_creates_and_revokes_tokens() {
    let relay = Relay::start().await;
    let client = relay.client();
    let (user_record, user) = relay.token(5, 5, None).await;
    // Unbound: these registrations carry no machine fingerprint.
    let create = json!({"name": "team-a", "max_peers": 4, "max_ipv4": 1, "bandwidth_mbps": 100, "bind_machine": false});

    let err = client
        .post("/v1/admin/tokens", Some(&user), create.clone())
        .await
        .error(403, "insufficient_scope");
    assert!(err.message.contains("admin"), "{err:?}");
    client
        .delete(
            "/v1/admin/tokens",
            Some(&user),
            json!({"id": user_record.id}),
        )
        .await
        .error(403, "insufficient_scope");
    client
        .post("/v1/admin/tokens", None, create.clone())
        .await
        .error(401, "unauthorized");

    let resp = client
        .post("/v1/admin/tokens", Some(&relay.admin), create)
        .await;
    assert_eq!(resp.status, 201, "{resp:?}");
    let created = resp.json();
    let (id, token) = (
        created["id"].as_str().unwrap().to_owned(),
        created["token"].as_str().unwrap().to_owned(),
    );
    assert!(token.starts_with("sct_live_"));

    let status: Status = client.get("/v1/status", Some(&token)).await.parse();
    assert_eq!(status.token_id, id);
    assert_eq!(status.name, "team-a");
    assert_eq!(
        (
            status.limits.max_peers,
            status.limits.max_ipv4,
            status.limits.bandwidth_mbps
        ),
        (4, 1, Some(100))
    );

    let (k1, k2) = (new_key(), new_key());
    for key in [&k1, &k2] {
        assert_eq!(
            client
                .post("/v1/peers", Some(&token), register_body(key, false))
                .await
                .status,
            201
        );
    }
    assert!(relay.dataplane.events().contains(&Event::Added {
        key: k1,
        ipv4: false,
        bandwidth_mbps: Some(100)
    }));

    let resp = client
        .delete("/v1/admin/tokens", Some(&relay.admin), json!({"id": id}))
        .await;
    assert_eq!(resp.status, 204, "{resp:?}");
    let removed: HashSet<Key> = relay.dataplane.removed().into_iter().collect();
    assert_eq!(removed, HashSet::from([k1, k2]));
    client
        .get("/v1/status", Some(&token))
        .await
        .error(401, "unauthorized");
    assert_eq!(client.get("/v1/health", None).await.json()["peers"], 0);

    client
        .delete("/v1/admin/tokens", Some(&relay.admin), json!({"id": id}))
        .await
        .error(404, "not_found");
    let admin_id = relay
        .state
        .store()
        .authenticate(&relay.admin)
        .unwrap()
        .unwrap()
        .id;
    client
        .delete(
            "/v1/admin/tokens",
            Some(&relay.admin),
            json!({"id": admin_id}),
        )
        .await
        .error(409, "conflict");
    client
        .post(
            "/v1/admin/tokens",
            Some(&relay.admin),
            json!({"name": "", "max_peers": 1, "max_ipv4": 0}),
        )
        .await
        .error(422, "invalid_request");
    client
        .post(
            "/v1/admin/tokens",
            Some(&relay.admin),
            json!({"name": "x", "max_peers": -1, "max_ipv4": 0}),
        )
        .await
        .error(422, "invalid_request");
}

#[tokio::test]
async fn malformed_requests_get_json_errors() {
    let relay = Relay::start().await;
    let client = relay.client();
    let (_, token) = relay.token(5, 5, None).await;
    let auth = ("Authorization", format!("Bearer {token}"));
    let json_type = ("Content-Type", "application/json".to_owned());

    let big = vec![b' '; 20 * 1024];
    client
        .raw(
            "POST",
            "/v1/peers",
            &[auth.clone(), json_type.clone()],
            &big,
        )
        .await
        .unwrap()
        .error(413, "payload_too_large");
    client
        .raw(
            "POST",
            "/v1/peers",
            &[auth.clone(), json_type.clone()],
            b"{\"pubkey\": ",
        )
        .await
        .unwrap()
        .error(400, "bad_request");
    client
        .raw(
            "POST",
            "/v1/peers",
            std::slice::from_ref(&auth),
            br#"{"pubkey":"x"}"#,
        )
        .await
        .unwrap()
        .error(415, "unsupported_media_type");
    client
        .raw(
            "POST",
            "/v1/peers",
            &[auth.clone(), ("Content-Type", "text/plain".into())],
            br#"{"pubkey":"x"}"#,
        )
        .await
        .unwrap()
        .error(415, "unsupported_media_type");
    let missing = client
        .post("/v1/peers", Some(&token), json!({"ipv4": true}))
        .await
        .error(422, "invalid_request");
    assert!(missing.message.contains("pubkey"), "{missing:?}");
    client
        .post(
            "/v1/peers",
            Some(&token),
            json!({"pubkey": new_key().to_base64(), "ipv4": "yes"}),
        )
        .await
        .error(422, "invalid_request");
    // A key of the wrong JSON type is a mistyped field, not a bad key.
    client
        .post("/v1/peers", Some(&token), json!({"pubkey": 5}))
        .await
        .error(422, "invalid_request");
    client
        .delete("/v1/peers", Some(&token), json!({"pubkey": "AAAA"}))
        .await
        .error(400, "invalid_pubkey");

    for bad in [
        "",
        "not base64!",
        "AAAA",
        &base64_of(&[1u8; 31]),
        &base64_of(&[1u8; 33]),
    ] {
        let err = client
            .post("/v1/peers", Some(&token), json!({"pubkey": bad}))
            .await
            .error(400, "invalid_pubkey");
        assert!(err.message.contains("32 bytes"), "{bad}: {err:?}");
    }
    client
        .post(
            "/v1/peers",
            Some(&token),
            json!({"pubkey": Key([0; 32]).to_base64()}),
        )
        .await
        .error(400, "invalid_pubkey");
    client
        .post(
            "/v1/peers",
            Some(&token),
            json!({"pubkey": relay.relay_key.to_base64()}),
        )
        .await
        .error(400, "invalid_pubkey");

    let unknown = client
        .get("/v1/nothing", Some(&token))
        .await
        .error(404, "not_found");
    assert!(unknown.message.contains("/v1/nothing"), "{unknown:?}");
    client.get("/", None).await.error(404, "not_found");
    let wrong_method = client.send("PUT", "/v1/peers", Some(&token), None).await;
    wrong_method.error(405, "method_not_allowed");
    assert!(wrong_method.header("allow").is_some(), "{wrong_method:?}");
    client
        .send("POST", "/v1/health", None, None)
        .await
        .error(405, "method_not_allowed");
    assert!(relay.dataplane.events().is_empty());
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn openapi_document_is_generated_for_every_route() {
    let relay = Relay::start().await;
    let resp = relay.client().get("/api/openapi.json", None).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let doc = resp.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(doc, serde_json::to_value(api::openapi()).unwrap());

    let expected: &[(&str, &[&str])] = &[
        ("/v1/health", &["get"]),
        ("/v1/status", &["get"]),
        ("/v1/peers", &["get", "post", "delete"]),
        ("/v1/peers/by-container/{id}", &["get"]),
        ("/v1/admin/tokens", &["get", "post", "patch", "delete"]),
        ("/v1/admin/tokens/unbind-machine", &["post"]),
        ("/v1/pq", &["get"]),
        ("/v1/machine", &["get"]),
        ("/v1/canary", &["get"]),
        ("/v1/device/authorize", &["post"]),
        ("/v1/device/token", &["post"]),
        ("/v1/admin/device", &["get"]),
        ("/v1/admin/device/{user_code}", &["get"]),
        ("/v1/admin/device/{user_code}/approve", &["post"]),
        ("/v1/admin/device/{user_code}/deny", &["post"]),
        ("/api/openapi.json", &["get"]),
        ("/.well-known/oauth-authorization-server", &["get"]),
        ("/.well-known/oauth-protected-resource", &["get"]),
        ("/.well-known/agent-onboarding.json", &["get"]),
        ("/.well-known/agent-card.json", &["get"]),
    ];
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(
        paths.len(),
        expected.len(),
        "{:?}",
        paths.keys().collect::<Vec<_>>()
    );
    for (path, methods) in expected {
        for method in *methods {
            let op = &paths[*path][*method];
            assert!(op.is_object(), "{method} {path} missing");
            let security = &op["security"];
            let scope = match (*path, *method) {
                (
                    "/v1/health"
                    | "/api/openapi.json"
                    | "/v1/pq"
                    | "/v1/canary"
                    | "/v1/device/authorize"
                    | "/v1/device/token",
                    _,
                ) => None,
                (p, _) if p.starts_with("/.well-known/") => None,
                ("/v1/status" | "/v1/peers/by-container/{id}", _) | ("/v1/peers", "get") => {
                    Some("peers:read")
                }
                ("/v1/peers" | "/v1/machine", _) => Some("peers:add"),
                _ => Some("admin"),
            };
            match scope {
                None => assert_eq!(security, &json!([{}]), "{method} {path}"),
                Some(scope) => {
                    assert_eq!(security, &json!([{"bearer": [scope]}]), "{method} {path}");
                    let forbidden = op["responses"]["403"]["description"]
                        .as_str()
                        .unwrap_or_default();
                    assert!(
                        forbidden.contains(&format!(
                            "insufficient_scope: the token lacks the {scope} scope"
                        )),
                        "{method} {path}: the 403 must name {scope}: {forbidden:?}"
                    );
                }
            }
        }
    }
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "RegisterPeer",
        "Allocation",
        "PeerView",
        "ContainerPeer",
        "PeerList",
        "DeletePeer",
        "CreateToken",
        "CreatedToken",
        "RevokeToken",
        "Health",
        "Status",
        "ApiError",
        "RegisterRequest",
        "Registered",
        "PqInfo",
        "MachineKey",
        "TokenInfo",
        "TokenList",
        "UpdateToken",
        "Canary",
        "Scope",
        "DeviceAuthorizeRequest",
        "DeviceAuthorization",
        "DeviceTokenRequest",
        "DeviceAccessToken",
        "DeviceLoginView",
        "DeviceLoginState",
        "ApproveDevice",
        "DeviceLoginList",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    assert_eq!(
        paths["/v1/peers"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
            ["$ref"],
        "#/components/schemas/Registered"
    );
    assert_eq!(
        schemas["Scope"]["enum"],
        json!(["peers:read", "peers:add", "admin"]),
        "{}",
        schemas["Scope"]
    );
    assert_eq!(
        schemas["TokenInfo"]["properties"]["scopes"]["items"]["$ref"],
        "#/components/schemas/Scope"
    );
    // The device token route takes the RFC's form body as well as JSON, and names
    // every answer a polling client must handle.
    let poll = &paths["/v1/device/token"]["post"];
    for content_type in ["application/json", "application/x-www-form-urlencoded"] {
        assert_eq!(
            poll["requestBody"]["content"][content_type]["schema"]["$ref"],
            "#/components/schemas/DeviceTokenRequest",
            "{content_type}"
        );
    }
    for status in ["200", "400", "415", "428", "429"] {
        assert!(poll["responses"][status].is_object(), "token: {status}");
    }
    assert_eq!(
        schemas["DeviceAuthorization"]["properties"]["device_code"]["pattern"],
        "^[A-Za-z0-9_-]{43}$"
    );
}

/// `POST` with a form-encoded body, as OAuth clients send device requests.
async fn post_form(client: &Client, path: &str, form: &str) -> Response {
    let headers = [(
        "Content-Type",
        "application/x-www-form-urlencoded".to_owned(),
    )];
    client
        .raw("POST", path, &headers, form.as_bytes())
        .await
        .unwrap()
}

/// The device flow over HTTP with a 1 s interval and a 3 s lifetime: pending,
/// slow_down with the grown interval, the operator's view, approval with limits,
/// the token exactly once (then spent), denial, expiry, and the per-source bound.
#[tokio::test]
async fn device_login_over_http() {
    let section = sidecar_relay::config::DeviceLoginSection {
        expires_in_secs: 3,
        interval_secs: 1,
        max_pending_per_source: 5,
        ..Default::default()
    };
    let relay = Relay::start_configured(
        plan(Some(IPV4_POOL)),
        api::DeviceLogin::new(section, Some("https://relay.example:8443".into())),
    )
    .await;
    let client = relay.client();
    let admin = Some(relay.admin.as_str());
    let (_, tenant) = relay.token(1, 0, None).await;
    let poll = |code: &str| json!({"device_code": code});

    let bad = client
        .post(
            "/v1/device/authorize",
            None,
            json!({"scope": "peers:add root"}),
        )
        .await
        .error(400, "invalid_scope");
    assert!(bad.message.contains("root"), "{bad:?}");

    // The RFC's form body, with a client_id the relay does not need.
    let r = post_form(
        &client,
        "/v1/device/authorize",
        "client_id=sidecar-agent&scope=peers%3Aadd+peers%3Aread",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let a = r.json();
    let (device_code, user_code) = (
        a["device_code"].as_str().unwrap().to_owned(),
        a["user_code"].as_str().unwrap().to_owned(),
    );
    assert_eq!(device_code.len(), 43, "{a}");
    assert_eq!(user_code.len(), 9, "{a}");
    assert!(user_code.bytes().enumerate().all(|(i, b)| if i == 4 {
        b == b'-'
    } else {
        b"BCDFGHJKLMNPQRSTVWXZ".contains(&b)
    }));
    assert_eq!(a["verification_uri"], "https://relay.example:8443/device");
    assert_eq!(
        a["verification_uri_complete"],
        format!("https://relay.example:8443/device?code={user_code}")
    );
    assert_eq!(
        (a["expires_in"].as_u64(), a["interval"].as_u64()),
        (Some(3), Some(1))
    );

    let expiring: Value = client
        .post("/v1/device/authorize", None, json!({}))
        .await
        .json();
    let slow: Value = client
        .post("/v1/device/authorize", None, json!({}))
        .await
        .json();
    let denied: Value = client
        .post("/v1/device/authorize", None, json!({}))
        .await
        .json();
    let started = std::time::Instant::now();

    client
        .post("/v1/device/token", None, poll(&device_code))
        .await
        .error(428, "authorization_pending");
    let slow_code = slow["device_code"].as_str().unwrap();
    client
        .post("/v1/device/token", None, poll(slow_code))
        .await
        .error(428, "authorization_pending");
    let err = client
        .post("/v1/device/token", None, poll(slow_code))
        .await
        .error(429, "slow_down");
    assert!(
        err.message.contains("6 s"),
        "the interval grew by 5 s: {err:?}"
    );
    client
        .post(
            "/v1/device/token",
            None,
            json!({"device_code": device_code, "grant_type": "password"}),
        )
        .await
        .error(400, "unsupported_grant_type");
    client
        .post("/v1/device/token", None, poll("no-such-code"))
        .await
        .error(400, "invalid_grant");

    // The operator's side: admin only, the code in any case and without the dash.
    let typed = user_code.replace('-', "").to_lowercase();
    let view_path = format!("/v1/admin/device/{typed}");
    client
        .get(&view_path, None)
        .await
        .error(401, "unauthorized");
    client
        .get(&view_path, Some(&tenant))
        .await
        .error(403, "insufficient_scope");
    client
        .get("/v1/admin/device", Some(&tenant))
        .await
        .error(403, "insufficient_scope");
    let listed = client.get("/v1/admin/device", admin).await.json();
    let codes: Vec<&str> = listed["logins"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["user_code"].as_str())
        .collect();
    assert_eq!(codes.len(), 4, "{listed}");
    assert_eq!(codes[0], user_code, "oldest first: {listed}");
    let view = client.get(&view_path, admin).await.json();
    assert_eq!(view["user_code"], user_code.as_str());
    assert_eq!(view["state"], "pending");
    assert_eq!(view["scopes"], json!(["peers:read", "peers:add"]));
    assert_eq!(view["source"], "127.0.0.1");
    assert_eq!(
        view["expires"].as_u64().unwrap() - view["created"].as_u64().unwrap(),
        3
    );
    client
        .post(
            &format!("/v1/admin/device/{user_code}/approve"),
            Some(&tenant),
            json!({}),
        )
        .await
        .error(403, "insufficient_scope");
    let r = client
        .post(
            &format!("/v1/admin/device/{user_code}/approve"),
            admin,
            json!({"name": "bad\u{0007}name"}),
        )
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    let approve = json!({"name": "ci-runner", "max_peers": 2, "bind_machine": false});
    let r = client
        .post(
            &format!("/v1/admin/device/{user_code}/approve"),
            admin,
            approve.clone(),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["state"], "approved");
    client
        .post(
            &format!("/v1/admin/device/{user_code}/approve"),
            admin,
            approve,
        )
        .await
        .error(409, "conflict");
    let r = client
        .raw(
            "POST",
            &format!(
                "/v1/admin/device/{}/deny",
                denied["user_code"].as_str().unwrap()
            ),
            &[("Authorization", format!("Bearer {}", relay.admin))],
            b"",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["state"], "denied");
    client
        .post(
            "/v1/device/token",
            None,
            poll(denied["device_code"].as_str().unwrap()),
        )
        .await
        .error(400, "access_denied");

    // Collected once, as the RFC's form body, after the interval.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let form = format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code&device_code={device_code}"
    );
    let r = post_form(&client, "/v1/device/token", &form).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let issued = r.json();
    assert_eq!(issued["token_type"], "bearer");
    assert_eq!(issued["scope"], "peers:read peers:add");
    let token = issued["access_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("sct_live_"), "{issued}");
    let status: Status = client.get("/v1/status", Some(&token)).await.parse();
    assert_eq!(status.name, "ci-runner");
    assert_eq!(status.limits.max_peers, 2, "the approval's limit");
    assert_eq!(status.limits.max_ipv4, 0, "[device_login]'s default");
    let r = client
        .post("/v1/peers", Some(&token), register_body(&new_key(), false))
        .await;
    assert_eq!(r.status, 201, "the device token registers: {r:?}");
    client
        .post(
            "/v1/admin/tokens",
            Some(&token),
            json!({"name": "x", "max_peers": 1, "max_ipv4": 0}),
        )
        .await
        .error(403, "insufficient_scope");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client
        .post("/v1/device/token", None, poll(&device_code))
        .await
        .error(400, "invalid_grant");
    client.get(&view_path, admin).await.error(404, "not_found");

    // Three logins still wait from this address (the collected one is gone); two
    // more fill its five, and a sixth is refused until one ends.
    for _ in 0..2 {
        let r = client.post("/v1/device/authorize", None, json!({})).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    client
        .post("/v1/device/authorize", None, json!({}))
        .await
        .error(429, "rate_limited");

    // Past the lifetime: expired for the client and for the operator.
    if let Some(left) = Duration::from_secs(3).checked_sub(started.elapsed()) {
        tokio::time::sleep(left + Duration::from_millis(100)).await;
    }
    client
        .post(
            "/v1/device/token",
            None,
            poll(expiring["device_code"].as_str().unwrap()),
        )
        .await
        .error(400, "expired_token");
    client
        .post(
            &format!(
                "/v1/admin/device/{}/approve",
                expiring["user_code"].as_str().unwrap()
            ),
            admin,
            json!({}),
        )
        .await
        .error(410, "expired_token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_parallel_registrations_get_distinct_addresses() {
    let relay = Relay::start().await;
    let (_, token) = relay.token(100, 100, None).await;
    let client = Arc::new(relay.client());
    let keys: Vec<Key> = (0..50).map(|_| new_key()).collect();
    let tasks: Vec<_> = keys
        .iter()
        .map(|key| {
            let (client, token, key) = (client.clone(), token.clone(), *key);
            tokio::spawn(async move {
                client
                    .post("/v1/peers", Some(&token), register_body(&key, true))
                    .await
            })
        })
        .collect();
    let mut v6 = HashSet::new();
    let mut v4 = HashSet::new();
    for task in tasks {
        let resp = task.await.unwrap();
        assert_eq!(resp.status, 201, "{resp:?}");
        let alloc: Allocation = resp.parse();
        assert!(in_prefix(alloc.ipv6, IPV6_PREFIX));
        v6.insert(alloc.ipv6);
        v4.insert(alloc.ipv4.unwrap());
    }
    assert_eq!((v6.len(), v4.len()), (50, 50));
    let added: HashSet<Key> = relay
        .dataplane
        .events()
        .into_iter()
        .map(|e| match e {
            Event::Added { key, .. } => key,
            Event::Removed(_) => panic!("unexpected removal"),
        })
        .collect();
    assert_eq!(added, keys.into_iter().collect());
    assert_eq!(relay.state.store().peer_count(), 50);
}

/// The keys the data plane forwards for after replaying its calls in order.
fn forwarded(events: &[Event]) -> HashSet<Key> {
    let mut live = HashSet::new();
    for e in events {
        match e {
            Event::Added { key, .. } => live.insert(*key),
            Event::Removed(key) => live.remove(key),
        };
    }
    live
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_calls_over_http_leave_the_data_plane_equal_to_the_store() {
    let relay = Relay::start().await;
    let client = Arc::new(relay.client());
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(relay.token(100, 100, None).await);
    }
    let keys: Vec<Key> = (0..12).map(|_| new_key()).collect();
    let mut tasks = Vec::new();
    for i in 0..240usize {
        let client = client.clone();
        let (record, secret) = tokens[i % 3].clone();
        let key = keys[(i * 7) % keys.len()];
        let admin = relay.admin.clone();
        tasks.push(tokio::spawn(async move {
            match i % 5 {
                0..=2 => {
                    client
                        .post("/v1/peers", Some(&secret), register_body(&key, i % 2 == 0))
                        .await
                }
                3 => {
                    let body = json!({"pubkey": key.to_base64()});
                    client.delete("/v1/peers", Some(&secret), body).await
                }
                // Two of the three tokens are revoked somewhere in the middle.
                _ if i == 124 || i == 179 => {
                    let body = json!({"id": record.id});
                    client.delete("/v1/admin/tokens", Some(&admin), body).await
                }
                _ => client.get("/v1/peers", Some(&secret)).await,
            }
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let resp = t.await.unwrap();
        assert!(resp.status < 500, "{resp:?}");
        if i == 124 || i == 179 {
            assert_eq!(resp.status, 204, "revocation: {resp:?}");
        }
    }
    let stored: HashSet<Key> = relay
        .state
        .store()
        .peers(None)
        .unwrap()
        .into_iter()
        .map(|p| p.public_key)
        .collect();
    assert_eq!(forwarded(&relay.dataplane.events()), stored);
    relay.state.store().verify().unwrap();
}

#[tokio::test]
async fn wrong_pin_is_refused_and_http11_is_negotiated() {
    let relay = Relay::start().await;
    let other = Identity::generate(&["localhost".into()])
        .unwrap()
        .pin()
        .unwrap();
    let err = Client::new(relay.addr, &other)
        .raw("GET", "/v1/health", &[], b"")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("does not match the pinned key"),
        "{err}"
    );

    // ALPN: a client that offers h2 is answered with HTTP/1.1 (see tls::server_config).
    let mut config = tls::client_config(&relay.pin).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(relay.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn graceful_shutdown_stops_the_server() {
    let mut relay = Relay::start().await;
    assert_eq!(relay.client().get("/v1/health", None).await.status, 200);
    relay.shutdown.take().unwrap().send(()).unwrap();
    let served = relay.served.take().unwrap();
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("serve returns promptly when idle")
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(relay.addr).await.is_err());
}

/// Everything the relay logs in this test process. Global rather than a scoped
/// (thread-local) subscriber: tracing caches per-callsite interest process-wide,
/// and tests running in parallel without a subscriber can make a scoped one miss
/// events.
fn captured_log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOG.get_or_init(|| {
        struct Writer(&'static Mutex<Vec<u8>>);
        impl io::Write for Writer {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf: &'static Mutex<Vec<u8>> = Box::leak(Box::default());
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Writer(buf))
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buf
    })
}

/// Requests are logged with method, path, status and token id, never the secret.
#[tokio::test]
async fn request_log_names_the_token_id_not_the_secret() {
    let buf = captured_log();
    let relay = Relay::start().await;
    let (record, token) = relay.token(5, 5, None).await;
    let resp = relay
        .client()
        .post("/v1/peers", Some(&token), register_body(&new_key(), false))
        .await;
    assert_eq!(resp.status, 201);
    relay
        .client()
        .get("/v1/status", Some("sct_live_wrong"))
        .await;

    let log = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("path=/v1/peers") && l.contains(&record.id))
        .unwrap_or_else(|| panic!("no request line in {log}"));
    assert!(line.contains("method=POST"), "{line}");
    assert!(line.contains("status=201"), "{line}");
    assert!(line.contains(&format!("token_id={}", record.id)), "{line}");
    assert!(log.contains("status=401"), "{log}");
    assert!(!log.contains(&token), "{log}");
    assert!(!log.contains("sct_live_"), "{log}");
}

// ---------------------------------------------------------------- curl

/// Runs curl from PATH; a machine without it fails the test (tests/run.sh installs it).
fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run curl from PATH ({e}); install it (tests/run.sh does)")
        })
}

/// Proves the printed pin is exactly what `curl --pinnedpubkey` expects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_accepts_the_pin_and_rejects_others() {
    let relay = Relay::start().await;
    let url = format!("https://127.0.0.1:{}/v1/health", relay.addr.port());
    let other = Identity::generate(&["localhost".into()])
        .unwrap()
        .pin()
        .unwrap();
    let (pin, url2) = (relay.pin.clone(), url);
    let (ok, wrong, tls12, http2) = tokio::task::spawn_blocking(move || {
        (
            curl(&["-sS", "-k", "--pinnedpubkey", &pin, &url2]),
            curl(&["-sS", "-k", "--pinnedpubkey", &other, &url2]),
            curl(&["-sS", "-k", "--tls-max", "1.2", &url2]),
            curl(&[
                "-sS",
                "-k",
                "--http2",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version}",
                &url2,
            ]),
        )
    })
    .await
    .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let body: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(body["status"], "ok");

    // 90: CURLE_SSL_PINNEDPUBKEYNOTMATCH
    assert_eq!(wrong.status.code(), Some(90), "{wrong:?}");
    assert!(wrong.stdout.is_empty());

    assert!(!tls12.status.success(), "TLS 1.2 was accepted: {tls12:?}");

    // curl asked for h2 and settled on HTTP/1.1, the only protocol offered.
    assert_eq!(String::from_utf8_lossy(&http2.stdout), "1.1", "{http2:?}");
}
