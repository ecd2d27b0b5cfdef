//! The relay's Prometheus `/metrics` as an operator scrapes it: the real relay with a
//! registered wireguard-go peer carrying traffic, `/metrics` fetched with curl from its
//! loopback listener, checked by Debian's `promtool`, and the counters an operator
//! watches moved by what happened.

mod support;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::relay::{Relay, RelayOptions, Topology, RELAY_TOOLS, RELAY_UPLINK4};
use support::traffic::{ping_until_reply, ping_with};
use support::{require_tools, wait_until, BASE_TOOLS};

/// Where `init` puts `/metrics` by default; loopback of the relay's own namespace.
const METRICS_PORT: u16 = 9532;

fn require() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
    // Debian's `prometheus` package; tests/run.sh installs it.
    require_tools(&["promtool"]);
}

/// `GET /metrics` with curl inside the relay's namespace, as a local Prometheus would.
fn scrape(relay: &Relay) -> String {
    relay.ns().exec(&format!(
        "curl -sS --fail --max-time 10 http://127.0.0.1:{METRICS_PORT}/metrics"
    ))
}

/// The value of the sample written exactly `series` (name and labels as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `promtool check metrics` on `text`: its verdict and what it said.
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(text.as_bytes())
        .expect("write metrics to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn metrics_count_a_peer_its_traffic_and_the_api() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let (token_id, secret) = relay.create_token("metered", 5, 0, None);
    // Store commits before the registration: the token's, and none for registering.
    let commits = "sidecar_relay_store_commit_duration_seconds";
    let commit_count = |text: &str, operation: &str| {
        sample(
            text,
            &format!("{commits}_count{{operation=\"{operation}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let before = scrape(&relay);
    assert!(
        before.contains(&format!("# TYPE {commits} histogram")),
        "{before}"
    );
    assert!(
        commit_count(&before, "create_token") >= 1.0,
        "creating the token was a durable commit:\n{before}"
    );
    let registrations_before = commit_count(&before, "register");
    let site = topo.client_site();
    let client = site.connect(&relay, &secret, false);
    let me = client.ipv6();
    assert!(
        ping_until_reply(&topo.remote, me, Duration::from_secs(15)),
        "remote never reached {me}\nrelay log:\n{}",
        relay.log_tail(30)
    );
    let p = ping_with(&topo.remote, me, "-c 5 -i 0.2 -W 2 -s 1000");
    assert!(p.all_received(), "pings to {me} lost:\n{}", p.output);
    // Two requests that must never become series of their own: a path no route has,
    // and one whose template has a parameter.
    let unrouted = relay.request(&topo.router, "GET", "/no/such/path", None, None);
    assert_eq!(unrouted.status, 404, "{unrouted:?}");
    let by_container = relay.call(
        &topo.router,
        "GET",
        "/v1/peers/by-container/not-a-container",
        &secret,
        None,
    );
    assert_eq!(by_container.status, 404, "{by_container:?}");

    let token = format!("{{token=\"{token_id}\"}}");
    let handshakes = format!("sidecar_relay_token_handshakes_total{token}");
    let rx = format!("sidecar_relay_token_rx_bytes_total{token}");
    let tx = format!("sidecar_relay_token_tx_bytes_total{token}");
    // The engine counts a handshake once data under its keys confirms it; the pings
    // did that, but give the counters a moment rather than race them.
    let mut text = String::new();
    let moved = wait_until(Duration::from_secs(10), || {
        text = scrape(&relay);
        [&handshakes, &rx, &tx]
            .iter()
            .all(|s| sample(&text, s).is_some_and(|v| v > 0.0))
    });
    assert!(
        moved,
        "handshakes and bytes of {token_id} never moved:\n{text}"
    );

    let (valid, said) = promtool_check(&text);
    assert!(
        valid,
        "promtool check metrics failed:\n{said}\n--- scraped:\n{text}"
    );

    let rx_bytes = sample(&text, &rx).unwrap_or_default();
    assert!(
        rx_bytes >= 5.0 * 1000.0,
        "five 1000-byte echo replies came through the tunnel, yet {rx} = {rx_bytes}"
    );
    assert_eq!(
        sample(&text, &format!("sidecar_relay_token_peers{token}")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "sidecar_relay_peers_dataplane"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "sidecar_relay_peers_registered"),
        Some(1.0),
        "{text}"
    );

    let requests = |method: &str, route: &str, status: u16| {
        sample(
            &text,
            &format!(
                "sidecar_relay_api_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}}"
            ),
        )
    };
    assert_eq!(
        requests("POST", "/v1/peers", 201),
        Some(1.0),
        "the registration counts under its route template and status:\n{text}"
    );
    assert_eq!(
        requests("POST", "/v1/admin/tokens", 201),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        requests("GET", "/v1/peers/by-container/{id}", 404),
        Some(1.0),
        "a parameter is counted under the template, not the value:\n{text}"
    );
    assert_eq!(
        requests("GET", "unmatched", 404),
        Some(1.0),
        "a path no route has is counted as unmatched:\n{text}"
    );
    assert!(
        !text.contains("not-a-container") && !text.contains("/no/such/path"),
        "a client's raw path became a label:\n{text}"
    );

    let histogram = "sidecar_relay_api_request_duration_seconds";
    let labels = "method=\"POST\",route=\"/v1/peers\"";
    assert!(
        text.contains(&format!("# TYPE {histogram} histogram")),
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("{histogram}_count{{{labels}}}")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("{histogram}_bucket{{{labels},le=\"+Inf\"}}")
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, &format!("{histogram}_sum{{{labels}}}")).is_some_and(|s| s > 0.0),
        "{text}"
    );

    // The registration was committed durably, and timed.
    let registrations = commit_count(&text, "register");
    assert!(
        registrations > registrations_before,
        "the store commit count for register did not grow ({registrations_before} -> {registrations}):\n{text}"
    );
    let operation = "operation=\"register\"";
    assert_eq!(
        sample(
            &text,
            &format!("{commits}_bucket{{{operation},le=\"+Inf\"}}")
        ),
        Some(registrations),
        "{text}"
    );
    assert!(
        sample(&text, &format!("{commits}_sum{{{operation}}}")).is_some_and(|s| s > 0.0),
        "{text}"
    );
}

#[test]
fn metrics_are_not_on_the_api_port_nor_off_loopback() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    assert!(
        sample(&scrape(&relay), "sidecar_relay_peers_registered").is_some(),
        "the loopback listener serves /metrics"
    );

    for auth in [None, Some(format!("Bearer {}", relay.creds.admin_token))] {
        let r = relay.request(&topo.router, "GET", "/metrics", auth.as_deref(), None);
        assert_eq!(r.status, 404, "/metrics on the API port: {r:?}");
        assert!(!r.body.contains("sidecar_relay_"), "{r:?}");
    }

    // The router reaches the relay's API, but nothing listens for it on the metrics
    // port: the default address is loopback.
    let off_host = topo.router.try_exec(&format!(
        "curl -sS --max-time 5 http://{RELAY_UPLINK4}:{METRICS_PORT}/metrics"
    ));
    assert!(
        !off_host.status.success(),
        "/metrics answered off the relay host: {}",
        String::from_utf8_lossy(&off_host.stdout)
    );
}
