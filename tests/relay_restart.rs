//! Restarting the relay, cleanly (SIGTERM) or not (SIGKILL), as an operator would:
//! registrations survive with the same addresses, the restarted relay has every peer in
//! its WireGuard table with its last endpoint before anyone calls its API, and an
//! untouched client's tunnel comes back by itself.
//!
//! The relay keeps no session keys across a restart. It does keep each peer's last
//! endpoint: on SIGTERM it writes it to its store before exiting; otherwise only its
//! periodic usage sync (every 10 s, flushed by sled within 500 ms) has, so the SIGKILL
//! case runs the relay past one sync first. Here the relay goes down right after the
//! client answered traffic, so wireguard-go retries its handshake 15 s later ("stopped
//! hearing back") if the relay has not started one towards it already.

mod support;

use std::time::{Duration, Instant};

use support::relay::{time_until_reply, Relay, RelayOptions, Topology, NAT_PUBLIC, RELAY_TOOLS};
use support::traffic::ping_until_reply;
use support::{require_tools, BASE_TOOLS};

/// How long the remote host may have to wait for the client after the relay is back.
const RECOVERY: Duration = Duration::from_secs(40);

/// When a relay that is killed has written its peers' endpoints to disk: its first usage
/// sync 10 s after start, sled's background flush 500 ms later, and slack for a busy
/// machine.
const FIRST_USAGE_SYNC_DURABLE: Duration = Duration::from_secs(14);

fn restart(signal: libc::c_int) {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
    let topo = Topology::new();
    let mut relay = Relay::start(&topo, &RelayOptions::default());
    let started = Instant::now();
    let site = topo.client_site();
    let token = relay.creds.default_token.clone();
    let client = site.connect(&relay, &token, false);
    let me = client.ipv6();
    assert!(
        ping_until_reply(&topo.remote, me, Duration::from_secs(15)),
        "remote never reached {me}"
    );

    let before = relay
        .peer(&client.keys.public)
        .unwrap_or_else(|| panic!("the relay's wg show lacks the peer: {:?}", relay.dump()));
    let endpoint = before.endpoint.clone().unwrap_or_default();
    assert!(
        endpoint.starts_with(&format!("{NAT_PUBLIC}:")),
        "the relay must have learned the client's NATed endpoint, got {before:?}"
    );
    if signal == libc::SIGKILL {
        // Only what reached the disk survives a kill.
        if let Some(left) = FIRST_USAGE_SYNC_DURABLE.checked_sub(started.elapsed()) {
            std::thread::sleep(left);
        }
    }

    let status = relay.stop(signal);
    match signal {
        libc::SIGTERM => assert_eq!(
            status.code(),
            Some(0),
            "SIGTERM must drain and exit 0, got {status}:\n{}",
            relay.log_tail(30)
        ),
        _ => {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(signal), "{status}");
        }
    }
    let p = support::ping_with(&topo.remote, me, "-c 1 -W 1");
    assert_eq!(p.received, 0, "the client answered with the relay down");

    relay.run();
    // Restored from the store at start, before any API call could re-add it.
    let dump = relay.dump();
    let restored = dump
        .iter()
        .find(|p| p.public_key == client.keys.public)
        .unwrap_or_else(|| panic!("the restarted relay did not restore the peer: {dump:?}"));
    assert_eq!(
        restored.allowed_ips,
        vec![format!("{me}/128")],
        "restored peer's allowed IPs"
    );
    assert_eq!(
        restored.endpoint.as_deref(),
        Some(endpoint.as_str()),
        "the restarted relay lost the peer's last endpoint"
    );
    assert_eq!(dump.len(), 1, "restored peers: {dump:?}");

    // Same key, same allocation: 200, not created, same /128.
    let again = relay.register(&site.ns, &token, &client.keys.public, false);
    assert_eq!(
        again.status, 200,
        "re-registration after restart: {again:?}"
    );
    assert_eq!(again.json["created"], false);
    assert_eq!(
        again.json["ipv6"].as_str(),
        Some(format!("{me}/128").as_str()),
        "the address changed across the restart"
    );
    assert!(
        relay
            .list_peers(&token)
            .iter()
            .any(|(k, a)| *k == client.keys.public && *a == format!("{me}/128")),
        "GET /v1/peers lost the peer"
    );
    assert!(
        relay.peer(&client.keys.public).is_some(),
        "the restarted relay's wg show lacks the peer"
    );

    // Nothing is done on the client: its tunnel must come back by itself.
    let took = time_until_reply(&topo.remote, me, RECOVERY);
    eprintln!("signal {signal}: remote reached the client again after {took:?}");
    assert!(
        took.is_some(),
        "remote could not reach {me} within {RECOVERY:?} of the relay restarting \
         (relay wg show: {:?})\nrelay log:\n{}",
        relay.peer(&client.keys.public),
        relay.log_tail(30)
    );
    drop(client);
}

#[test]
fn sigterm_restart_keeps_allocation_and_tunnel_recovers() {
    restart(libc::SIGTERM);
}

#[test]
fn sigkill_restart_keeps_allocation_and_tunnel_recovers() {
    restart(libc::SIGKILL);
}
