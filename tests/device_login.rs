//! Device login end to end: the real relay, `sidecar-agent login` as a process in
//! another namespace, and an operator approving or denying its printed code through
//! the admin API; and the raw flow with curl, as any OAuth client would drive it.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use serde_json::json;
use support::agent::agent_bin;
use support::process::{ChildGuard, TempDir};
use support::relay::{Relay, RelayOptions, Topology, RELAY_TOOLS};
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

/// `sidecar-agent login` from the router's namespace, writing to `token_file`.
fn start_login(topo: &Topology, relay: &Relay, token_file: &std::path::Path) -> ChildGuard {
    let mut cmd = topo.router.program(agent_bin());
    cmd.args([
        "login",
        "--relay",
        &relay.url(""),
        "--pin",
        &relay.creds.pin,
    ])
    .arg("--token-file")
    .arg(token_file)
    .env_remove("SIDECAR_TOKEN_FILE");
    ChildGuard::spawn("sidecar-agent login", cmd)
}

/// The user code the login printed, once it has.
fn printed_code(login: &mut ChildGuard) -> String {
    let mut code = None;
    wait_until(Duration::from_secs(20), || {
        code = login
            .stdout()
            .lines()
            .find_map(|l| l.strip_prefix("user code: "))
            .map(|c| c.trim().to_owned());
        code.is_some() || !login.is_running()
    });
    code.unwrap_or_else(|| {
        panic!(
            "login printed no user code:\n{}\n{}",
            login.stdout(),
            login.stderr_tail(20)
        )
    })
}

#[test]
fn an_approved_login_writes_a_private_token_that_registers() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let admin = &relay.creds.admin_token;
    let dir = TempDir::new();
    let token_file = dir.join("etc/sidecar/agent.token");
    let mut login = start_login(&topo, &relay, &token_file);
    let code = printed_code(&mut login);
    let out = login.stdout();
    assert!(
        out.contains(&relay.url(&format!("/device?code={code}"))),
        "the login shows where to approve it:\n{out}"
    );

    let view = relay.call(
        relay.ns(),
        "GET",
        &format!("/v1/admin/device/{code}"),
        admin,
        None,
    );
    assert_eq!(view.status, 200, "{view:?}");
    assert_eq!(view.json["state"], "pending", "{view:?}");
    assert_eq!(
        view.json["scopes"],
        json!(["peers:read", "peers:add"]),
        "{view:?}"
    );
    assert!(
        !token_file.exists(),
        "a token was written before the approval"
    );
    // Unbound, so that curl (no machine fingerprint) can register with it below.
    let approved = relay.call(
        relay.ns(),
        "POST",
        &format!("/v1/admin/device/{code}/approve"),
        admin,
        Some(&json!({"name": "build-host", "bind_machine": false})),
    );
    assert_eq!(approved.status, 200, "{approved:?}");

    let status = login.wait_timeout(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "login did not finish with success ({status:?}):\n{}\n{}",
        login.stdout(),
        login.stderr_tail(20)
    );
    let meta = std::fs::metadata(&token_file).expect("the token file exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_file).expect("read the token file");
    let token = token.trim();
    assert!(token.starts_with("sct_live_"), "{token:?}");
    assert!(
        login.stdout().contains(&token_file.display().to_string()),
        "the login says where the token is:\n{}",
        login.stdout()
    );

    let r = relay.register(&topo.router, token, &random_pubkey(), false);
    assert_eq!(r.status, 201, "the device token registers a peer: {r:?}");
    let listed = relay.call(relay.ns(), "GET", "/v1/admin/tokens", admin, None);
    let issued = listed.json["tokens"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "build-host"))
        .unwrap_or_else(|| panic!("no build-host token: {listed:?}"));
    assert_eq!(issued["scopes"], json!(["peers:read", "peers:add"]));
    assert_eq!(issued["usage"]["peers"], 1);
    // The code is spent: the operator no longer finds it.
    let gone = relay.call(
        relay.ns(),
        "GET",
        &format!("/v1/admin/device/{code}"),
        admin,
        None,
    );
    assert_eq!(gone.status, 404, "{gone:?}");
}

#[test]
fn a_denied_login_exits_non_zero_with_the_reason() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let dir = TempDir::new();
    let token_file = dir.join("agent.token");
    let mut login = start_login(&topo, &relay, &token_file);
    let code = printed_code(&mut login);
    let denied = relay.call(
        relay.ns(),
        "POST",
        &format!("/v1/admin/device/{code}/deny"),
        &relay.creds.admin_token,
        None,
    );
    assert_eq!(denied.status, 200, "{denied:?}");
    assert_eq!(denied.json["state"], "denied", "{denied:?}");

    let status = login.wait_timeout(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| !s.success()),
        "a denied login must fail ({status:?}):\n{}",
        login.stderr_tail(20)
    );
    let stderr = login.stderr();
    assert!(stderr.contains("denied"), "the reason is shown:\n{stderr}");
    assert!(!token_file.exists(), "a denied login wrote a token");
}

/// The flow as a generic OAuth client drives it: discovery, form bodies, pending,
/// slow_down with the grown interval, an approval and the token exactly once.
#[test]
fn the_raw_flow_with_curl() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let from = &topo.router;
    let form = |path: &str, body: &str| {
        relay.request_raw(
            from,
            "POST",
            path,
            None,
            Some(("application/x-www-form-urlencoded", body)),
        )
    };
    // Discovery first, as an automated installer would: the documents name this
    // relay's own URL, and a 401 points at them.
    let server = relay.request(
        from,
        "GET",
        "/.well-known/oauth-authorization-server",
        None,
        None,
    );
    assert_eq!(server.status, 200, "{server:?}");
    assert_eq!(server.json["issuer"], relay.url(""), "{server:?}");
    assert_eq!(
        server.json["device_authorization_endpoint"],
        relay.url("/v1/device/authorize"),
        "{server:?}"
    );
    assert_eq!(server.json["token_endpoint"], relay.url("/v1/device/token"));
    let denied = relay.request(from, "GET", "/v1/peers", None, None);
    assert_eq!(denied.status, 401, "{denied:?}");
    let metadata = relay.url("/.well-known/oauth-protected-resource");
    assert_eq!(
        denied.header("www-authenticate"),
        Some(format!(r#"Bearer realm="sidecar", resource_metadata="{metadata}""#).as_str()),
        "{denied:?}"
    );
    let resource = relay.request(
        from,
        "GET",
        "/.well-known/oauth-protected-resource",
        None,
        None,
    );
    assert_eq!(resource.status, 200, "{resource:?}");
    assert_eq!(
        resource.json["authorization_servers"],
        json!([relay.url("")])
    );

    let r = form("/v1/device/authorize", "scope=peers%3Aread+admin");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["interval"], 5, "{r:?}");
    assert_eq!(r.json["expires_in"], 1800, "{r:?}");
    assert_eq!(
        r.json["verification_uri"],
        relay.url("/device"),
        "the verification URL is the relay's own: {r:?}"
    );
    let code = r.json["user_code"].as_str().expect("user_code").to_owned();
    let device_code = r.json["device_code"]
        .as_str()
        .expect("device_code")
        .to_owned();
    let poll = format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code&device_code={device_code}"
    );

    let r = form("/v1/device/token", &poll);
    assert_eq!(
        (r.status, r.error()),
        (428, "authorization_pending"),
        "{r:?}"
    );
    let r = form("/v1/device/token", &poll);
    assert_eq!((r.status, r.error()), (429, "slow_down"), "{r:?}");
    assert!(r.message().contains("10 s"), "the interval grew: {r:?}");

    let r = relay.call(
        relay.ns(),
        "POST",
        &format!("/v1/admin/device/{}/approve", code.to_lowercase()),
        &relay.creds.admin_token,
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["scopes"], json!(["peers:read", "admin"]), "{r:?}");

    std::thread::sleep(Duration::from_secs(10));
    let r = form("/v1/device/token", &poll);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["token_type"], "bearer", "{r:?}");
    assert_eq!(r.json["scope"], "peers:read admin", "{r:?}");
    let token = r.json["access_token"].as_str().expect("access_token");
    let listed = relay.call(from, "GET", "/v1/admin/tokens", token, None);
    assert_eq!(
        listed.status, 200,
        "the admin scope asked for works: {listed:?}"
    );

    std::thread::sleep(Duration::from_secs(10));
    let r = form("/v1/device/token", &poll);
    assert_eq!(
        (r.status, r.error()),
        (400, "invalid_grant"),
        "spent: {r:?}"
    );
}
