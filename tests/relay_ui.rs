//! The relay's web page as an operator meets it, in a real headless chromium driven
//! through chromedriver from the "internet" host of the test topology: a wrong token
//! and a token without the admin scope are refused with the API's own error; the admin
//! token signs in (kept in the tab's sessionStorage, in neither the URL nor a cookie);
//! a token is created (its secret shown once, and it works), listed and revoked (and
//! stops working); a registered peer shows up with its address, name and container,
//! and its transfer counters and rate change by themselves while traffic flows; the
//! device-approval view opens from the device flow's `/device?code=` link with the code
//! filled in; signing out forgets the token. Screenshots of each view are written
//! where the test log says. The page's security headers are checked with plain curl.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::browser::{Browser, BROWSER_TOOLS};
use support::relay::{Allocation, ApiResponse, Client, Relay, RelayOptions, Topology, RELAY_TOOLS};
use support::traffic::ping_until_reply;
use support::{require_tools, KeyPair, BASE_TOOLS};

fn require() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
    require_tools(BROWSER_TOOLS);
}

/// What the page shows for an API error: `code: message`.
fn shown_error(r: &ApiResponse) -> String {
    format!("{}: {}", r.error(), r.message())
}

fn sign_in(browser: &Browser, token: &str) {
    browser.type_into("#signin-token", token);
    browser.click("#signin-form button[type=submit]");
}

#[test]
fn operator_signs_in_manages_tokens_and_watches_a_peer() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let admin = relay.creds.admin_token.clone();
    let browser = Browser::start(&topo.remote, "relay_ui");

    // A wrong token: the API's 401 is what the page shows.
    browser.goto(&relay.url("/ui"));
    browser.wait_visible("#signin-token");
    let wrong = "sct_live_0000000000000000000000000000000000000000";
    let expected = shown_error(&relay.call(&topo.remote, "GET", "/v1/admin/tokens", wrong, None));
    sign_in(&browser, wrong);
    let shown = browser.wait_text("#signin-error", "the API's error", |t| !t.is_empty());
    assert_eq!(shown, expected, "a wrong token must show the API's error");
    assert!(shown.starts_with("unauthorized"), "{shown}");
    browser.screenshot("01-signin-wrong-token");

    // A token without the admin scope cannot drive the page either.
    let default = relay.creds.default_token.clone();
    let expected =
        shown_error(&relay.call(&topo.remote, "GET", "/v1/admin/tokens", &default, None));
    sign_in(&browser, &default);
    browser.wait_text("#signin-error", "the 403", |t| t == expected);
    assert!(
        browser.is_visible("#signin-token"),
        "still on the sign-in form"
    );

    // The admin token signs in; it is kept in the tab, never in the URL or a cookie.
    sign_in(&browser, &admin);
    browser.wait_visible("#view-peers");
    assert!(!browser.is_visible("#signin-error"));
    assert!(!browser.current_url().contains(&admin));
    assert_eq!(browser.execute("return document.cookie;", &[]), json!(""));
    assert_eq!(
        browser.execute("return sessionStorage.getItem('sidecar.adminToken');", &[]),
        json!(admin)
    );
    browser.wait_text("#peers-empty", "no peers yet", |t| t.contains("No peers"));

    // Tokens: the two init made are listed; a new one is created, shown once, works.
    browser.click(".tab[data-view=tokens]");
    browser.wait_text("#tokens-body", "the default token", |t| {
        t.contains("default")
    });
    browser.type_into("#create-name", "ui-made");
    browser.type_into("#create-max-peers", "3");
    browser.type_into("#create-max-ipv4", "0");
    browser.type_into("#create-bandwidth", "50");
    browser.click("#create-bind");
    browser.click("#create-form button[type=submit]");
    let secret = browser.wait_text("#created-secret", "the new secret", |t| {
        t.starts_with("sct_live_")
    });
    let id = browser.text("#created-id");
    let row = format!("#tokens-body tr[data-id='{id}']");
    let listed = browser.wait_text(&row, "the new token's row", |t| t.contains("ui-made"));
    assert!(
        listed.contains("3 peers, 0 IPv4, 50 Mbit/s") && listed.contains("0 peers, 0 IPv4"),
        "the row shows the limits and usage: {listed}"
    );
    browser.screenshot("02-tokens-created");
    let status = relay.call(&topo.remote, "GET", "/v1/status", &secret, None);
    assert_eq!(status.status, 200, "the shown secret works: {status:?}");
    assert_eq!(status.json["name"], "ui-made");
    let list = relay.call(&topo.remote, "GET", "/v1/admin/tokens", &admin, None);
    let made = list.json["tokens"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["id"] == json!(id)))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(
        made["bind_machine"],
        json!(false),
        "the unticked box: {made}"
    );
    assert_eq!(made["limits"]["bandwidth_mbps"], json!(50), "{made}");
    // Scopes are shown, and offered when creating, exactly when the relay has them.
    match made["scopes"].as_array() {
        Some(scopes) => {
            let mut words: Vec<&str> = scopes.iter().filter_map(Value::as_str).collect();
            assert_eq!(browser.text(&format!("{row} .scopes")), words.join(" "));
            assert!(browser.is_visible("#create-scopes"));
            words.sort_unstable();
            assert_eq!(
                words,
                ["peers:add", "peers:read"],
                "the boxes ticked by default"
            );
        }
        None => {
            assert!(!browser.is_visible(&format!("{row} .scopes")));
            assert!(!browser.is_visible("#create-scopes"));
        }
    }
    browser.click("#created-dismiss");
    assert!(browser.text("#created-secret").is_empty());

    // Revoke takes two clicks; then the row is gone and the secret refused.
    browser.click(&format!("{row} .revoke"));
    browser.wait_text(&format!("{row} .revoke"), "the armed button", |t| {
        t.contains("?")
    });
    assert!(browser.is_visible(&row), "one click revokes nothing");
    browser.click(&format!("{row} .revoke"));
    assert!(
        support::wait_until(Duration::from_secs(15), || !browser.is_visible(&row)),
        "the revoked token is still listed:\n{}",
        browser.page_text()
    );
    let status = relay.call(&topo.remote, "GET", "/v1/status", &secret, None);
    assert_eq!(status.status, 401, "a revoked token is refused: {status:?}");

    // Peers: one registered with a name and container, reached from the remote host.
    let site = topo.client_site();
    let keys = KeyPair::generate();
    let container = "4f1c2b3a5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708";
    let r = relay.call(
        &site.ns,
        "POST",
        "/v1/peers",
        &default,
        Some(&json!({"pubkey": keys.public, "ipv4": false, "name": "web", "container": container})),
    );
    assert_eq!(r.status, 201, "registration: {r:?}");
    let client = Client::configure(&site, keys, Allocation::from_json(&r.json));
    assert!(
        ping_until_reply(&topo.remote, client.ipv6(), Duration::from_secs(20)),
        "the peer is not reachable:\n{}",
        relay.log_tail(30)
    );
    browser.click(".tab[data-view=peers]");
    let peer = format!("#peers-body tr[data-pubkey='{}']", client.keys.public);
    let ipv6 = browser.wait_text(&format!("{peer} .ipv6"), "the peer's address", |t| {
        !t.is_empty()
    });
    assert_eq!(ipv6, format!("{}/128", client.alloc.ipv6));
    assert_eq!(browser.text(&format!("{peer} .name")), "web");
    assert_eq!(
        browser.text(&format!("{peer} .container")),
        &container[..12]
    );
    let handshake = browser.text(&format!("{peer} .handshake"));
    assert!(
        handshake.ends_with("s ago"),
        "a recent handshake: {handshake}"
    );

    // Traffic while the page polls: the counters and the rate change by themselves.
    let rx_before = browser.text(&format!("{peer} .rx"));
    let tx_before = browser.text(&format!("{peer} .tx"));
    let _flow = topo.remote.spawn(&format!(
        "ping -n -q -i 0.1 -s 1200 -c 150 {}",
        client.ipv6()
    ));
    let rx = browser.wait_text(&format!("{peer} .rx"), "more bytes received", |t| {
        !t.is_empty() && t != rx_before
    });
    let tx = browser.wait_text(&format!("{peer} .tx"), "more bytes sent", |t| {
        !t.is_empty() && t != tx_before
    });
    let rate = browser.wait_text(&format!("{peer} .rate"), "a live rate", |t| {
        t.contains("kbit/s") && !t.starts_with('0')
    });
    eprintln!("peer row: rx {rx_before} -> {rx}, tx {tx_before} -> {tx}, rate {rate}");
    browser.screenshot("03-peers-live");

    // The device flow's link opens the approval view with the code filled in, and
    // shows what the API answers for it.
    let code = "BCDF-GHJK";
    browser.goto(&relay.url(&format!("/device?code={code}")));
    browser.wait_visible("#view-device");
    assert_eq!(browser.value("#device-code"), code);
    let lookup = relay.call(
        &topo.remote,
        "GET",
        &format!("/v1/admin/device/{code}"),
        &admin,
        None,
    );
    if lookup.status == 200 {
        browser.wait_visible("#device-request");
    } else {
        let expected = shown_error(&lookup);
        browser.wait_text("#device-error", "the API's answer", |t| t == expected);
    }
    browser.screenshot("04-device-approval");

    // Signing out forgets the token: a reload lands on the sign-in form.
    browser.click("#sign-out");
    browser.wait_visible("#signin-token");
    assert_eq!(
        browser.execute("return sessionStorage.getItem('sidecar.adminToken');", &[]),
        Value::Null
    );
    browser.goto(&relay.url("/ui"));
    browser.wait_visible("#signin-token");
    assert!(!browser.is_visible("#nav"));

    // Following the device link while signed out: sign in first, then the approval
    // view opens with the code still filled in.
    browser.goto(&relay.url(&format!("/device?code={code}")));
    sign_in(&browser, &admin);
    browser.wait_visible("#view-device");
    assert_eq!(browser.value("#device-code"), code);
}

#[test]
fn the_page_is_served_with_strict_security_headers() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    for (path, content_type) in [
        ("/ui", "text/html; charset=utf-8"),
        ("/ui/", "text/html; charset=utf-8"),
        ("/device?code=BCDF-GHJK", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/app.css", "text/css; charset=utf-8"),
    ] {
        // No token: the page holds no secret, it asks for one.
        let r = relay.request(&topo.remote, "GET", path, None, None);
        assert_eq!(r.status, 200, "GET {path}: {r:?}");
        assert_eq!(r.header("content-type"), Some(content_type), "{path}");
        assert_eq!(r.header("cache-control"), Some("no-store"), "{path}");
        assert_eq!(r.header("x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{path}");
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert_eq!(r.header("set-cookie"), None, "{path}");
        let csp = r.header("content-security-policy").unwrap_or_default();
        let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
        for want in [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "object-src 'none'",
        ] {
            assert!(directives.contains(&want), "{path}: {want} in {csp:?}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
    }
    let html = relay.request(&topo.remote, "GET", "/ui", None, None).body;
    assert!(html.contains(r#"<script src="/ui/app.js" defer></script>"#));
    assert!(html.contains(r#"href="/ui/app.css""#));
    // Any other path under /ui is the API's JSON 404.
    let r = relay.request(&topo.remote, "GET", "/ui/missing.js", None, None);
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.error(), "not_found");
}

/// `POST /v1/device/authorize` from `from` for `scope`, as `sidecar-agent login` does.
fn authorize(relay: &Relay, from: &support::Netns, scope: &str) -> Value {
    let r = relay.request(
        from,
        "POST",
        "/v1/device/authorize",
        None,
        Some(&json!({ "scope": scope })),
    );
    assert_eq!(r.status, 200, "device authorize: {r:?}");
    r.json
}

#[test]
fn operator_approves_and_denies_device_logins_on_the_page() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let admin = relay.creds.admin_token.clone();
    let browser = Browser::start(&topo.remote, "relay_ui_device");
    let site = topo.client_site();

    // The link the device prints opens the approval view, after sign-in, on its code.
    let login = authorize(&relay, &site.ns, "peers:add peers:read");
    let code = login["user_code"].as_str().expect("user_code").to_owned();
    let link = login["verification_uri_complete"]
        .as_str()
        .expect("verification_uri_complete")
        .to_owned();
    assert!(link.ends_with(&format!("/device?code={code}")), "{link}");
    browser.goto(&link);
    sign_in(&browser, &admin);
    browser.wait_visible("#view-device");
    assert_eq!(browser.value("#device-code"), code);
    browser.wait_text("#device-state", "a pending login", |t| t == "pending");
    assert_eq!(browser.text("#device-show-code"), code);
    let scopes = browser.text("#device-scope");
    let mut words: Vec<&str> = scopes.split_whitespace().collect();
    words.sort_unstable();
    assert_eq!(words, ["peers:add", "peers:read"], "the scopes asked for");
    assert!(!browser.text("#device-source").is_empty());
    browser.screenshot("01-device-pending");

    // Approve with a name: the device's next poll gets a token with that name and the
    // scopes it asked for; the page shows the login approved, with nothing to decide.
    browser.type_into("#device-name", "laptop");
    browser.type_into("#device-max-peers", "4");
    browser.click("#device-approve");
    let result = browser.wait_text("#device-result", "the approval", |t| !t.is_empty());
    assert!(result.starts_with(&format!("Approved {code}")), "{result}");
    assert_eq!(browser.text("#device-state"), "approved");
    assert!(!browser.is_visible("#device-approve"));
    browser.screenshot("02-device-approved");
    let poll = relay.request(
        &site.ns,
        "POST",
        "/v1/device/token",
        None,
        Some(&json!({"device_code": login["device_code"]})),
    );
    assert_eq!(poll.status, 200, "the approved device's poll: {poll:?}");
    let token = poll.json["access_token"].as_str().expect("access_token");
    let status = relay.call(&site.ns, "GET", "/v1/status", token, None);
    assert_eq!(status.status, 200, "{status:?}");
    assert_eq!(status.json["name"], "laptop");
    assert_eq!(status.json["limits"]["max_peers"], 4);

    // Deny another: the device is told access_denied.
    let login = authorize(&relay, &site.ns, "peers:read");
    let code = login["user_code"].as_str().expect("user_code").to_owned();
    browser.goto(&relay.url(&format!("/device?code={code}")));
    browser.wait_text("#device-state", "a pending login", |t| t == "pending");
    browser.click("#device-deny");
    let result = browser.wait_text("#device-result", "the denial", |t| !t.is_empty());
    assert!(result.starts_with(&format!("Denied {code}")), "{result}");
    assert_eq!(browser.text("#device-state"), "denied");
    let poll = relay.request(
        &site.ns,
        "POST",
        "/v1/device/token",
        None,
        Some(&json!({"device_code": login["device_code"]})),
    );
    assert_eq!(poll.status, 400, "{poll:?}");
    assert_eq!(poll.error(), "access_denied");

    // An unknown code shows the API's error.
    browser.type_into("#device-code", "BCDF-BCDF");
    browser.click("#device-form button[type=submit]");
    let expected = shown_error(&relay.call(
        &topo.remote,
        "GET",
        "/v1/admin/device/BCDF-BCDF",
        &admin,
        None,
    ));
    browser.wait_text("#device-error", "the API's 404", |t| t == expected);
}
