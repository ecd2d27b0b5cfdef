//! A handshake flood from spoofed sources does not cut off an established peer.
//!
//! `sidecar-relay` in the namespaces of `tests/support/relay.rs` with a stock
//! wireguard-go client behind the NAT; the router floods the relay's WireGuard port
//! with valid-mac1 handshake initiations from 126 forged addresses. The client must keep
//! answering the remote host through the relay, and the relay must answer the flood
//! with cookie replies rather than with a Diffie-Hellman each. No throughput figure
//! here: that is `benches/handshake_flood.rs`, which floods a release relay with 10,000
//! initiations a second. This debug-built relay spends tens of microseconds on each
//! cookie reply (unoptimized BLAKE2s and XChaCha20-Poly1305), so the test floods at
//! [`RATE`]: twenty times the rate at which the relay starts demanding cookies.

mod support;

use std::net::SocketAddrV4;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use support::flood::{self, Flood};
use support::relay::{Relay, RelayOptions, Topology, RELAY_TOOLS, RELAY_UPLINK4, WG_PORT};
use support::traffic::ping_until_reply;
use support::{ping_with, require_tools, BASE_TOOLS};

/// Initiations a second.
const RATE: u32 = 2_000;

#[test]
fn a_handshake_flood_gets_cookie_replies_and_the_established_peer_keeps_passing_traffic() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let (_, token) = relay.create_token("flood", 4, 0, None);
    let site = topo.client_site();
    let client = site.connect(&relay, &token, false);
    assert!(
        ping_until_reply(&topo.remote, client.ipv6(), Duration::from_secs(15)),
        "the client does not answer through the relay before the flood"
    );

    let target = SocketAddrV4::new(RELAY_UPLINK4, WG_PORT);
    flood::prepare_router(&topo.router, target);
    let relay_public: [u8; 32] = STANDARD
        .decode(&client.alloc.relay_public_key)
        .unwrap()
        .try_into()
        .unwrap();
    let flood = Flood::start(
        &topo.router,
        target,
        flood::initiations(relay_public, 64),
        RATE,
    );
    std::thread::sleep(Duration::from_millis(300));
    // Two seconds of pings through the tunnel while the flood goes on.
    let ping = ping_with(&topo.remote, client.ipv6(), "-c 20 -i 0.1 -W 1");
    let (sent, elapsed) = flood.stop();
    let replies = flood::cookie_replies(&topo.router);

    assert!(
        sent as f64 >= 0.8 * f64::from(RATE) * elapsed.as_secs_f64(),
        "the flood did not reach its rate: {sent} in {elapsed:?}"
    );
    assert!(
        ping.received >= 15,
        "the established peer lost its traffic under the flood:\n{}",
        ping.output
    );
    assert!(
        replies >= sent / 2,
        "the relay answered {replies} of {sent} flooded initiations with a cookie reply"
    );
    assert!(
        ping_until_reply(&topo.remote, client.ipv6(), Duration::from_secs(5)),
        "the client stopped answering after the flood"
    );
}
