//! The relay's HTTPS control API end to end: the real binary, curl pinned to its
//! certificate, and the data plane's reaction to what the API is told.

mod support;

use std::collections::HashSet;
use std::io::Write as _;
use std::net::Ipv6Addr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use sidecar_proto::TOKEN_PREFIX;
use support::relay::{ApiResponse, Relay, RelayOptions, Topology, API_PORT, RELAY_TOOLS};
use support::traffic::{ping_until_reply, ping_with};
use support::{require_tools, wait_until, BASE_TOOLS};

fn require() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
}

/// A random (valid: any 32 bytes but zero are a Curve25519 public key) key in base64.
fn random_pubkey() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .expect("read /dev/urandom");
    bytes[0] |= 1;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn ipv6_of(r: &ApiResponse) -> Ipv6Addr {
    r.json["ipv6"]
        .as_str()
        .and_then(|a| a.strip_suffix("/128"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no ipv6 /128 in {r:?}"))
}

fn assert_unauthorized(r: &ApiResponse, what: &str) {
    assert_eq!(r.status, 401, "{what}: {r:?}");
    assert_eq!(r.error(), "unauthorized", "{what}: {r:?}");
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer"),
        "{what}: 401 without a Bearer challenge: {r:?}"
    );
}

#[test]
fn health_and_authentication_errors() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let from = &topo.router;

    let health = relay.request(from, "GET", "/v1/health", None, None);
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.json["status"], "ok", "{health:?}");

    let none = relay.request(from, "GET", "/v1/status", None, None);
    assert_unauthorized(&none, "no token");

    let wrong_prefix = relay.call(from, "GET", "/v1/status", "abc123notatoken", None);
    assert_unauthorized(&wrong_prefix, "token without prefix");
    assert!(
        wrong_prefix.message().contains("sct_live_"),
        "the message must say which prefix tokens have: {wrong_prefix:?}"
    );

    let unknown = relay.call(
        from,
        "GET",
        "/v1/status",
        "sct_live_thisisnotatokenthisrelayissued",
        None,
    );
    assert_unauthorized(&unknown, "unknown token");

    let default = &relay.creds.default_token;
    let status = relay.call(from, "GET", "/v1/status", default, None);
    assert_eq!(status.status, 200, "{status:?}");
    assert_eq!(status.json["limits"]["max_peers"], 100, "{status:?}");
    assert_eq!(status.json["limits"]["max_ipv4"], 10, "{status:?}");

    let not_admin = relay.call(
        from,
        "POST",
        "/v1/admin/tokens",
        default,
        Some(&json!({"name": "x", "max_peers": 1, "max_ipv4": 0})),
    );
    assert_insufficient_scope(&not_admin, "admin", "a peer token creating a token");
}

/// A 403 for a token without `scope`: the code, the scope named in the message and
/// in the RFC 6750 bearer challenge.
fn assert_insufficient_scope(r: &ApiResponse, scope: &str, what: &str) {
    assert_eq!(r.status, 403, "{what}: {r:?}");
    assert_eq!(r.error(), "insufficient_scope", "{what}: {r:?}");
    assert!(
        r.message().contains(&format!("the {scope} scope")),
        "{what}: the message must name {scope}: {r:?}"
    );
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer")
            && challenge.contains(r#"error="insufficient_scope""#)
            && challenge.contains(&format!(r#"scope="{scope}""#)),
        "{what}: the challenge must name {scope}: {r:?}"
    );
}

#[test]
fn quotas_are_enforced() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions { ipv4_pool: true });
    let from = &topo.router;

    let (_, two) = relay.create_token("two-peers", 2, 1, None);
    for _ in 0..2 {
        let r = relay.register(from, &two, &random_pubkey(), false);
        assert_eq!(r.status, 201, "{r:?}");
    }
    let third = relay.register(from, &two, &random_pubkey(), false);
    assert_eq!(third.status, 403, "{third:?}");
    assert_eq!(third.error(), "quota_exceeded", "{third:?}");
    assert!(third.message().contains("max_peers"), "{third:?}");
    let status = relay.call(from, "GET", "/v1/status", &two, None);
    assert_eq!(status.json["usage"]["peers"], 2, "{status:?}");

    let (_, no_v4) = relay.create_token("no-ipv4", 5, 0, None);
    let r = relay.register(from, &no_v4, &random_pubkey(), true);
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.error(), "quota_exceeded", "{r:?}");
    assert!(r.message().contains("max_ipv4"), "{r:?}");
    // The same token may still register IPv6-only peers.
    let r = relay.register(from, &no_v4, &random_pubkey(), false);
    assert_eq!(r.status, 201, "{r:?}");
    assert!(r.json["ipv4"].is_null(), "{r:?}");
}

#[test]
fn registration_details_and_request_errors() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let from = &topo.router;
    let token = relay.creds.default_token.clone();
    let auth = format!("Bearer {token}");

    // Idempotent registration with a container label, found again by it.
    let key = random_pubkey();
    let body = json!({"pubkey": key, "ipv4": false, "name": "web", "container": "web-1"});
    let first = relay.call(from, "POST", "/v1/peers", &token, Some(&body));
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(first.json["created"], true, "{first:?}");
    assert_eq!(first.json["relay_endpoint"], "192.0.2.2:51820", "{first:?}");
    let again = relay.call(from, "POST", "/v1/peers", &token, Some(&body));
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.json["created"], false, "{again:?}");
    assert_eq!(again.json["ipv6"], first.json["ipv6"]);
    let found = relay.call(from, "GET", "/v1/peers/by-container/web-1", &token, None);
    assert_eq!(found.status, 200, "{found:?}");
    assert_eq!(
        found.json["pubkey"].as_str(),
        Some(key.as_str()),
        "{found:?}"
    );
    // by-container names addresses bare, where registration gives prefixes.
    let registered_v6 = first.json["ipv6"].as_str().unwrap_or_default();
    assert_eq!(
        found.json["ipv6"]
            .as_str()
            .map(|a| format!("{a}/128"))
            .as_deref(),
        Some(registered_v6),
        "{found:?}"
    );
    assert_eq!(found.json["ipv4"], "", "{found:?}");
    let missing = relay.call(from, "GET", "/v1/peers/by-container/nope", &token, None);
    assert_eq!((missing.status, missing.error()), (404, "not_found"));

    // The same key under another token.
    let (_, other) = relay.create_token("other", 5, 0, None);
    let taken = relay.register(from, &other, &key, false);
    assert_eq!(
        (taken.status, taken.error()),
        (409, "conflict"),
        "{taken:?}"
    );

    let post = |content_type: &str, text: &str| {
        relay.request_raw(
            from,
            "POST",
            "/v1/peers",
            Some(&auth),
            Some((content_type, text)),
        )
    };
    let cases = [
        (post("", &body.to_string()), 415, "unsupported_media_type"),
        (
            post("text/plain", &body.to_string()),
            415,
            "unsupported_media_type",
        ),
        (
            post("application/json", "{\"pubkey\": "),
            400,
            "bad_request",
        ),
        (
            post("application/json", "{\"ipv4\": true}"),
            422,
            "invalid_request",
        ),
        (
            post("application/json", "{\"pubkey\": \"not-a-key\"}"),
            400,
            "invalid_pubkey",
        ),
        (
            post(
                "application/json",
                &format!("{{\"pubkey\": \"{}\"}}", "A".repeat(20_000)),
            ),
            413,
            "payload_too_large",
        ),
        // Read to its end and thrown away, so the sender gets the answer rather than
        // a reset while it is still sending.
        (
            post(
                "application/json",
                &format!("{{\"pubkey\": \"{}\"}}", "A".repeat(600_000)),
            ),
            413,
            "payload_too_large",
        ),
        // Over the bound the relay reads no further, and says so.
        (
            post(
                "application/json",
                &format!("{{\"pubkey\": \"{}\"}}", "A".repeat(3_000_000)),
            ),
            413,
            "payload_too_large",
        ),
    ];
    for (i, (r, status, code)) in cases.iter().enumerate() {
        assert_eq!((r.status, r.error()), (*status, *code), "case {i}: {r:?}");
        assert!(!r.message().is_empty(), "case {i}: no message: {r:?}");
    }
}

/// A client that opens a body and stops sending it holds a connection and a request
/// slot; the relay gives the whole body 10 s, then answers 400 and frees both.
#[test]
fn a_body_that_stops_arriving_is_refused_after_its_timeout() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let auth = format!("Bearer {}", relay.creds.default_token);
    // `-T -` streams stdin as a chunked body; stdin stays open with nothing written
    // until curl gives up (its own limit is 20 s).
    let mut cmd = relay.curl(&topo.router, "POST", Some(&auth));
    cmd.args(["-H", "Content-Type: application/json", "-T", "-"])
        .arg(relay.url("/v1/peers"));
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn curl: {e}"));
    let held_open = child.stdin.take();
    let _ = child.wait();
    drop(held_open);
    let log = relay.log();
    let answer = log
        .lines()
        .find(|l| l.contains("method=POST path=/v1/peers"))
        .unwrap_or_else(|| panic!("the relay never answered the stalled request:\n{log}"));
    let elapsed_ms: f64 = answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("elapsed_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no elapsed_ms in {answer}"));
    assert!(answer.contains("status=400"), "{answer}");
    assert!(
        (9_000.0..15_000.0).contains(&elapsed_ms),
        "the relay answered after {elapsed_ms} ms, not after its 10 s body timeout: {answer}"
    );
    let health = relay.request(&topo.router, "GET", "/v1/health", None, None);
    assert_eq!(health.status, 200, "{health:?}");
}

#[test]
fn concurrent_registrations_get_distinct_addresses() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let keys: Vec<String> = (0..30).map(|_| random_pubkey()).collect();
    let token = relay.creds.default_token.clone();

    let results: Vec<ApiResponse> = std::thread::scope(|s| {
        let handles: Vec<_> = keys
            .iter()
            .map(|k| s.spawn(|| relay.register(&topo.router, &token, k, false)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("registration thread"))
            .collect()
    });
    let mut addrs = HashSet::new();
    for (key, r) in keys.iter().zip(&results) {
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(r.json["pubkey"].as_str(), Some(key.as_str()));
        let a = ipv6_of(r);
        assert_eq!(
            a.segments()[..4],
            [0x2001, 0xdb8, 1, 0],
            "{a} outside the prefix"
        );
        addrs.insert(a);
    }
    assert_eq!(
        addrs.len(),
        30,
        "30 registrations must get 30 distinct /128s"
    );

    let listed = relay.list_peers(&token);
    assert_eq!(listed.len(), 30, "{listed:?}");
    assert_eq!(relay.dump().len(), 30, "every peer is on the data plane");
}

#[test]
fn delete_and_revoke_stop_traffic_at_once() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let (revoked_id, revoked) = relay.create_token("to-revoke", 5, 0, None);
    let (site_a, site_b, site_c) = (topo.client_site(), topo.client_site(), topo.client_site());
    let a = site_a.connect(&relay, &relay.creds.default_token, false);
    let b = site_b.connect(&relay, &revoked, false);
    let c = site_c.connect(&relay, &revoked, false);
    for client in [&a, &b, &c] {
        assert!(
            ping_until_reply(&topo.remote, client.ipv6(), Duration::from_secs(15)),
            "remote never reached {}",
            client.ipv6()
        );
    }

    let del = relay.call(
        &site_a.ns,
        "DELETE",
        "/v1/peers",
        &relay.creds.default_token,
        Some(&json!({"pubkey": a.keys.public})),
    );
    assert_eq!(del.status, 204, "{del:?}");
    let p = ping_with(&topo.remote, a.ipv6(), "-c 3 -i 0.2 -W 1");
    assert_eq!(p.received, 0, "a deleted peer still answers:\n{}", p.output);
    assert!(relay.peer(&a.keys.public).is_none(), "still in wg show");
    assert!(!relay
        .list_peers(&relay.creds.default_token)
        .iter()
        .any(|(k, _)| *k == a.keys.public));
    // Deleting again: nothing left to delete.
    let again = relay.call(
        &site_a.ns,
        "DELETE",
        "/v1/peers",
        &relay.creds.default_token,
        Some(&json!({"pubkey": a.keys.public})),
    );
    assert_eq!(again.status, 404, "{again:?}");

    // The others are unaffected.
    for client in [&b, &c] {
        let p = ping_with(&topo.remote, client.ipv6(), "-c 2 -i 0.2 -W 2");
        assert!(p.all_received(), "{}", p.output);
    }

    let revoke = relay.call(
        &topo.router,
        "DELETE",
        "/v1/admin/tokens",
        &relay.creds.admin_token,
        Some(&json!({"id": revoked_id})),
    );
    assert_eq!(revoke.status, 204, "{revoke:?}");
    for client in [&b, &c] {
        let p = ping_with(&topo.remote, client.ipv6(), "-c 3 -i 0.2 -W 1");
        assert_eq!(
            p.received, 0,
            "a peer of a revoked token still answers:\n{}",
            p.output
        );
        assert!(
            relay.peer(&client.keys.public).is_none(),
            "still in wg show"
        );
    }
    let r = relay.call(&site_b.ns, "GET", "/v1/status", &revoked, None);
    assert_unauthorized(&r, "revoked token");
}

/// `POST /v1/peers` whose body is only sent when `send` is called, so the request is
/// in flight at a moment the test chooses.
struct SlowRegistration {
    child: std::process::Child,
    body: String,
    /// curl's `--trace-ascii` log, written as the request goes out.
    trace: std::path::PathBuf,
    _dir: support::TempDir,
}

impl SlowRegistration {
    fn start(relay: &Relay, from: &support::Netns, token: &str, pubkey: &str) -> Self {
        let mut cmd = relay.curl(from, "POST", Some(&format!("Bearer {token}")));
        // Upload from stdin streams it (chunked): curl sends the headers at once and the
        // body when stdin has it.
        let dir = support::TempDir::new();
        let trace = dir.join("trace");
        cmd.args(["-H", "Content-Type: application/json", "-H", "Expect:"])
            .args(["-T", "-"])
            .arg("--trace-ascii")
            .arg(&trace)
            .arg(relay.url("/v1/peers"));
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn curl");
        SlowRegistration {
            child,
            body: json!({"pubkey": pubkey, "ipv4": false}).to_string(),
            trace,
            _dir: dir,
        }
    }

    /// Whether curl has sent the request line and headers (over TLS).
    fn headers_sent(&self) -> bool {
        std::fs::read_to_string(&self.trace).is_ok_and(|t| t.contains("=> Send header"))
    }

    fn send(mut self) -> ApiResponse {
        {
            let mut stdin = self.child.stdin.take().expect("stdin is piped");
            let _ = stdin.write_all(self.body.as_bytes());
        }
        let out = self.child.wait_with_output().expect("wait for curl");
        ApiResponse::from_curl_output(
            &String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[test]
fn draining_refuses_registrations_and_loses_none_acknowledged() {
    require();
    let topo = Topology::new();
    let mut relay = Relay::start(&topo, &RelayOptions::default());
    // The default token's 100 peers would run out before the relay is stopped.
    let (_, token) = relay.create_token("drain", 100_000, 0, None);
    let site = topo.client_site();
    let client = site.connect(&relay, &token, false);
    assert!(ping_until_reply(
        &topo.remote,
        client.ipv6(),
        Duration::from_secs(15)
    ));

    // A registration in flight (headers sent, body pending) when SIGTERM arrives.
    let slow_key = random_pubkey();
    let slow = SlowRegistration::start(&relay, &site.ns, &token, &slow_key);
    // In flight: curl has sent the headers and the relay has read everything that
    // arrived on the connection.
    let api_sockets = || {
        relay
            .ns()
            .exec(&format!("ss -Htn state established sport = :{API_PORT}"))
    };
    let in_flight = wait_until(Duration::from_secs(10), || {
        let ss = api_sockets();
        slow.headers_sent()
            && !ss.is_empty()
            && ss.lines().all(|l| l.split_whitespace().next() == Some("0"))
    });
    assert!(
        in_flight,
        "the slow registration never got its headers to the relay: {}",
        api_sockets()
    );

    // Registrations keep coming from four clients until the relay stops answering.
    let acked: Arc<Mutex<Vec<(String, Ipv6Addr)>>> = Arc::default();
    let outcomes: Arc<Mutex<Vec<ApiResponse>>> = Arc::default();
    let sigterm_sent = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let key = random_pubkey();
                let r = relay.register(&topo.router, &token, &key, false);
                match r.status {
                    201 => acked.lock().unwrap().push((key, ipv6_of(&r))),
                    _ => {
                        outcomes.lock().unwrap().push(r);
                        if sigterm_sent.load(std::sync::atomic::Ordering::SeqCst) {
                            return;
                        }
                    }
                }
            });
        }
        let flowing = wait_until(Duration::from_secs(30), || acked.lock().unwrap().len() >= 8);
        sigterm_sent.store(true, std::sync::atomic::Ordering::SeqCst);
        relay.signal(libc::SIGTERM);
        assert!(
            flowing,
            "too few registrations before SIGTERM: {:?}",
            acked.lock().unwrap().len()
        );
        // The relay logs this as it starts draining; only then is the in-flight
        // registration's outcome defined.
        let draining = wait_until(Duration::from_secs(10), || {
            relay.log().contains("SIGTERM: draining")
        });
        assert!(draining, "no drain after SIGTERM:\n{}", relay.log_tail(20));
        let refused = slow.send();
        assert_eq!(
            refused.status, 503,
            "a registration completed while draining: {refused:?}"
        );
        assert_eq!(refused.error(), "draining", "{refused:?}");
    });
    let status = relay
        .wait_exit(Duration::from_secs(20))
        .expect("relay did not exit within 20 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "{status}:\n{}", relay.log_tail(30));
    let outcomes = outcomes.lock().unwrap().clone();
    for r in &outcomes {
        assert!(
            r.status == 0 || (r.status == 503 && r.error() == "draining"),
            "while draining a registration must be refused or not answered: {r:?}"
        );
    }
    eprintln!(
        "after SIGTERM: {} registrations got 503 draining, {} no answer ({:?})",
        outcomes.iter().filter(|r| r.status == 503).count(),
        outcomes.iter().filter(|r| r.status == 0).count(),
        outcomes
            .iter()
            .filter(|r| r.status == 0)
            .map(|r| r.curl_error.trim())
            .collect::<HashSet<_>>()
    );
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 4,
        "too few registrations before SIGTERM: {}",
        acked.len()
    );

    relay.run();
    let listed: HashSet<(String, String)> = relay.list_peers(&token).into_iter().collect();
    for (key, addr) in &acked {
        assert!(
            listed.contains(&(key.clone(), format!("{addr}/128"))),
            "acknowledged registration {key} ({addr}) lost across the restart"
        );
    }
    assert!(
        !listed.iter().any(|(k, _)| *k == slow_key),
        "the refused registration was stored"
    );
    eprintln!(
        "{} registrations acknowledged before SIGTERM, all present after restart",
        acked.len()
    );
}

/// `GET /v1/admin/tokens` shows the operator every token with its limits, usage and last
/// use, never a secret, and only to an admin token; `PATCH` changes one, live peers too.
#[test]
fn the_admin_lists_every_token_with_usage_and_last_use_but_no_secret() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let (id, secret) = relay.create_token("team-a", 3, 0, Some(40));
    let list = |token: &str| relay.call(relay.ns(), "GET", "/v1/admin/tokens", token, None);

    let before = list(&relay.creds.admin_token);
    assert_eq!(before.status, 200, "{before:?}");
    let find = |r: &ApiResponse, id: &str| -> serde_json::Value {
        r.json["tokens"]
            .as_array()
            .expect("tokens array")
            .iter()
            .find(|t| t["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} is not listed: {}", r.body))
    };
    let team = find(&before, &id);
    assert_eq!(team["name"], "team-a");
    assert_eq!(team["admin"], false);
    assert_eq!(team["limits"]["max_peers"], 3);
    assert_eq!(team["limits"]["bandwidth_mbps"], 40);
    assert_eq!(team["usage"]["peers"], 0);
    assert!(team["created"].as_u64().is_some_and(|c| c > 0), "{team}");
    assert!(
        team.get("last_used").is_none(),
        "used before any request: {team}"
    );
    assert!(
        before.json["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["admin"] == true),
        "the admin token is missing: {}",
        before.body
    );
    for s in [
        &secret,
        &relay.creds.admin_token,
        &relay.creds.default_token,
    ] {
        let bare = s.trim_start_matches(TOKEN_PREFIX);
        assert!(!before.body.contains(bare), "a secret is in the listing");
    }

    let r = relay.register(relay.ns(), &secret, &random_pubkey(), false);
    assert_eq!(r.status, 201, "{r:?}");
    let team = find(&list(&relay.creds.admin_token), &id);
    assert_eq!(team["usage"]["peers"], 1, "{team}");
    assert!(team["last_used"].as_u64().is_some(), "{team}");

    let peer_token = list(&secret);
    assert_eq!(
        peer_token.status, 403,
        "a peer token listed the tokens: {peer_token:?}"
    );
    assert_unauthorized(&list("sct_live_nosuchtoken"), "unknown token");

    // PATCH changes what it names and keeps the rest; a lower quota keeps the peer
    // it has but refuses the next one, and a new cap reaches the live peer at once.
    let patch = |token: &str, body: serde_json::Value| {
        relay.call(relay.ns(), "PATCH", "/v1/admin/tokens", token, Some(&body))
    };
    let r = patch(
        &relay.creds.admin_token,
        json!({"id": id, "name": "team-b", "max_peers": 1, "bandwidth_mbps": 7}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["name"], "team-b");
    assert_eq!(r.json["limits"]["max_peers"], 1);
    assert_eq!(r.json["limits"]["max_ipv4"], 0);
    assert_eq!(r.json["limits"]["bandwidth_mbps"], 7);
    assert_eq!(r.json["usage"]["peers"], 1);
    assert_eq!(find(&list(&relay.creds.admin_token), &id)["name"], "team-b");
    let over = relay.register(relay.ns(), &secret, &random_pubkey(), false);
    assert_eq!(
        over.status, 403,
        "registered past the lowered quota: {over:?}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || relay
            .log_tail(50)
            .contains("bandwidth_mbps=Some(7)")),
        "the live peer did not get the new cap:\n{}",
        relay.log_tail(20)
    );
    let r = patch(
        &relay.creds.admin_token,
        json!({"id": id, "bandwidth_mbps": 0}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.json["limits"]["bandwidth_mbps"].is_null(), "{r:?}");

    let r = patch(
        &relay.creds.admin_token,
        json!({"id": "tok_000000000000", "name": "x"}),
    );
    assert_eq!(r.status, 404, "{r:?}");
    let r = patch(
        &relay.creds.admin_token,
        json!({"id": id, "name": "bad\u{0007}name"}),
    );
    assert_eq!(r.status, 422, "{r:?}");
    let r = patch(&relay.creds.admin_token, json!({"id": id, "max_peers": -1}));
    assert_eq!(r.status, 422, "{r:?}");
    let r = patch(&secret, json!({"id": id, "max_peers": 100}));
    assert_eq!(r.status, 403, "a peer token raised its own quota: {r:?}");
}

/// Scopes as an operator hands them out: a `peers:read` token reads but cannot
/// register, every admin route refuses a peer token, `PATCH` changes a token's
/// scopes with effect at its next request, and the listing shows them.
#[test]
fn scopes_limit_what_a_token_may_do_and_patch_changes_them() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let admin = relay.creds.admin_token.clone();
    let from = &topo.router;
    let create = |body: serde_json::Value| {
        relay.call(relay.ns(), "POST", "/v1/admin/tokens", &admin, Some(&body))
    };
    let r = create(json!({"name": "viewer", "max_peers": 2, "max_ipv4": 0,
                          "bind_machine": false, "scopes": ["peers:read"]}));
    assert_eq!(r.status, 201, "{r:?}");
    let viewer_id = r.json["id"].as_str().expect("id").to_owned();
    let viewer = r.json["token"].as_str().expect("token").to_owned();

    let denied = relay.register(from, &viewer, &random_pubkey(), false);
    assert_insufficient_scope(&denied, "peers:add", "a peers:read token registering");
    assert!(
        relay.list_peers(&viewer).is_empty(),
        "the refused registration left a peer"
    );
    let status = relay.call(from, "GET", "/v1/status", &viewer, None);
    assert_eq!(
        status.status, 200,
        "peers:read reads its status: {status:?}"
    );
    let removal = relay.call(
        from,
        "DELETE",
        "/v1/peers",
        &viewer,
        Some(&json!({"pubkey": random_pubkey()})),
    );
    assert_insufficient_scope(&removal, "peers:add", "a peers:read token deleting");

    // The agent's default token (peers:read and peers:add, as every token had before
    // scopes) on each admin route.
    let agent = &relay.creds.default_token;
    let some_id = json!({"id": viewer_id});
    for (method, path, body) in [
        ("GET", "/v1/admin/tokens", None),
        (
            "POST",
            "/v1/admin/tokens",
            Some(json!({"name": "x", "max_peers": 1, "max_ipv4": 0})),
        ),
        (
            "PATCH",
            "/v1/admin/tokens",
            Some(json!({"id": viewer_id, "scopes": ["admin"]})),
        ),
        ("DELETE", "/v1/admin/tokens", Some(some_id.clone())),
        (
            "POST",
            "/v1/admin/tokens/unbind-machine",
            Some(some_id.clone()),
        ),
    ] {
        let r = relay.call(from, method, path, agent, body.as_ref());
        assert_insufficient_scope(&r, "admin", &format!("the agent token on {method} {path}"));
    }
    let r = relay.register(from, agent, &random_pubkey(), false);
    assert_eq!(r.status, 201, "the agent token still registers: {r:?}");

    let listed = relay.call(relay.ns(), "GET", "/v1/admin/tokens", &admin, None);
    assert_eq!(listed.status, 200, "{listed:?}");
    let scopes_of = |name: &str| {
        listed.json["tokens"]
            .as_array()
            .expect("tokens array")
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["scopes"].clone())
            .unwrap_or_else(|| panic!("no token {name}: {}", listed.body))
    };
    assert_eq!(scopes_of("viewer"), json!(["peers:read"]));
    assert_eq!(scopes_of("default"), json!(["peers:read", "peers:add"]));
    assert_eq!(
        scopes_of("admin"),
        json!(["peers:read", "peers:add", "admin"])
    );

    let patch = |body: serde_json::Value| {
        relay.call(relay.ns(), "PATCH", "/v1/admin/tokens", &admin, Some(&body))
    };
    let r = patch(json!({"id": viewer_id, "scopes": ["peers:add", "peers:read"]}));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json["scopes"],
        json!(["peers:read", "peers:add"]),
        "{r:?}"
    );
    let r = relay.register(from, &viewer, &random_pubkey(), false);
    assert_eq!(r.status, 201, "peers:add granted by PATCH: {r:?}");

    // Taken away again, and the next request is refused: nothing is cached.
    let r = patch(json!({"id": viewer_id, "scopes": ["peers:add"]}));
    assert_eq!(r.status, 200, "{r:?}");
    let r = relay.call(from, "GET", "/v1/peers", &viewer, None);
    assert_insufficient_scope(&r, "peers:read", "peers:read taken by PATCH");

    for (body, status) in [
        (json!({"id": viewer_id, "scopes": []}), 422),
        (json!({"id": viewer_id, "scopes": ["root"]}), 422),
    ] {
        let r = patch(body.clone());
        assert_eq!(r.status, status, "{body}: {r:?}");
    }
    let r = create(json!({"name": "y", "max_peers": 1, "max_ipv4": 0, "scopes": ["peers:write"]}));
    assert_eq!(r.status, 422, "an unknown scope: {r:?}");
    let admin_id = listed.json["tokens"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "admin"))
        .and_then(|t| t["id"].as_str())
        .expect("admin token id")
        .to_owned();
    let r = patch(json!({"id": admin_id, "scopes": ["peers:read"]}));
    assert_eq!(r.status, 409, "the admin demoted itself: {r:?}");

    // An admin may hand out the admin scope; the new token manages tokens.
    let r = create(json!({"name": "ops", "max_peers": 1, "max_ipv4": 0,
                          "bind_machine": false, "scopes": ["admin"]}));
    assert_eq!(r.status, 201, "{r:?}");
    let ops = r.json["token"].as_str().expect("token").to_owned();
    let r = relay.call(relay.ns(), "GET", "/v1/admin/tokens", &ops, None);
    assert_eq!(r.status, 200, "{r:?}");
    // `admin` alone implies the agent's scopes: it registers, and it reads every
    // token's peers, the agent token's among them.
    let r = relay.register(from, &ops, &random_pubkey(), false);
    assert_eq!(r.status, 201, "an admin-only token registering: {r:?}");
    let r = relay.call(from, "GET", "/v1/peers", &ops, None);
    assert_eq!(r.status, 200, "an admin-only token listing peers: {r:?}");
    let listed = r.json["peers"].as_array().map_or(0, Vec::len);
    assert!(listed >= 3, "the admin sees every token's peers: {r:?}");
    // peers:add alone reads nothing: listing, status and by-container need peers:read.
    let r = create(json!({"name": "adder", "max_peers": 1, "max_ipv4": 0,
                          "bind_machine": false, "scopes": ["peers:add"]}));
    assert_eq!(r.status, 201, "{r:?}");
    let adder = r.json["token"].as_str().expect("token").to_owned();
    let r = relay.register(from, &adder, &random_pubkey(), false);
    assert_eq!(r.status, 201, "peers:add registers: {r:?}");
    for path in ["/v1/peers", "/v1/status", "/v1/peers/by-container/c1"] {
        let r = relay.call(from, "GET", path, &adder, None);
        assert_insufficient_scope(
            &r,
            "peers:read",
            &format!("a peers:add token on GET {path}"),
        );
    }
}

/// With `peer_ttl_secs`, a peer that completes no handshake for that long is expired:
/// gone from `GET /v1/peers` and from its token's quota, while its address stays held
/// for its key, which gets the same one back when it registers again.
#[test]
fn a_peer_idle_past_peer_ttl_is_expired_and_gets_its_address_back() {
    require();
    let topo = Topology::new();
    let mut relay = Relay::init(&topo, &RelayOptions::default());
    let toml = std::fs::read_to_string(&relay.config).unwrap();
    assert!(
        toml.contains("\npeer_ttl_secs = 0\n"),
        "init wrote no peer_ttl_secs:\n{toml}"
    );
    let toml = toml.replacen("\npeer_ttl_secs = 0\n", "\npeer_ttl_secs = 3\n", 1);
    std::fs::write(&relay.config, toml).unwrap();
    relay.run();
    let (_, token) = relay.create_token("short-lived", 1, 0, None);
    let listed = |key: &str| {
        relay
            .list_peers(&relay.creds.admin_token)
            .iter()
            .any(|(k, _)| k == key)
    };
    let expired = |key: &str| wait_until(Duration::from_secs(20), || !listed(key));

    let first = random_pubkey();
    let r = relay.register(relay.ns(), &token, &first, false);
    assert_eq!(r.status, 201, "{r:?}");
    let address = ipv6_of(&r);
    assert!(listed(&first));
    assert!(
        expired(&first),
        "an idle peer was never expired:\n{}",
        relay.log_tail(20)
    );
    assert!(
        relay.peer(&first).is_none(),
        "expired but still on the data plane"
    );
    assert!(
        relay.log_tail(50).contains("expired a peer"),
        "the expiry is not logged:\n{}",
        relay.log_tail(20)
    );

    // The token's only place is free again.
    let second = random_pubkey();
    let r = relay.register(relay.ns(), &token, &second, false);
    assert_eq!(
        r.status, 201,
        "the expired peer still counts in the quota: {r:?}"
    );
    assert_ne!(ipv6_of(&r), address, "a held address went to another key");
    assert!(expired(&second), "{}", relay.log_tail(20));

    // The first key returns within the hold time: the same address.
    let r = relay.register(relay.ns(), &token, &first, false);
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(
        ipv6_of(&r),
        address,
        "the returning key got another address"
    );
}
