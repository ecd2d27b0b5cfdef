//! Restarting the relay, cleanly (SIGTERM) or not (SIGKILL), as an operator would:
//! registrations survive with the same addresses, and an untouched client's tunnel
//! comes back by itself.
//!
//! The relay keeps no session keys and no peer endpoints across a restart, so it cannot
//! start a handshake itself: the client has to. Here the relay goes down right after
//! the client answered traffic, so wireguard-go retries its handshake 15 s later
//! ("stopped hearing back"). A client that was idle when the relay restarted only
//! re-handshakes at its 120 s rekey (measured: 65 s after a restart that came 70 s after
//! the last handshake), which is too slow to wait for here.

mod support;

use std::time::Duration;

use support::relay::{time_until_reply, Relay, RelayOptions, Topology, RELAY_TOOLS};
use support::traffic::ping_until_reply;
use support::{require_tools, BASE_TOOLS};

/// How long the remote host may have to wait for the client after the relay is back.
const RECOVERY: Duration = Duration::from_secs(40);

fn restart(signal: libc::c_int) {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
    let topo = Topology::new();
    let mut relay = Relay::start(&topo, &RelayOptions::default());
    let site = topo.client_site();
    let token = relay.creds.default_token.clone();
    let client = site.connect(&relay, &token, false);
    let me = client.ipv6();
    assert!(
        ping_until_reply(&topo.remote, me, Duration::from_secs(15)),
        "remote never reached {me}"
    );

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
