//! Per-token bandwidth limits as a user measures them: iperf3 through the relay.

mod support;

use std::time::Duration;

use support::relay::{Relay, RelayOptions, Topology, RELAY_TOOLS};
use support::traffic::{iperf3, ping_until_reply};
use support::{require_tools, BASE_TOOLS};

const LIMIT_MBPS: f64 = 20.0;

#[test]
fn token_bandwidth_limit_shapes_both_directions() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let (_, limited) = relay.create_token("limited", 5, 0, Some(20));
    let site = topo.client_site();
    let client = site.connect(&relay, &limited, false);
    let me = client.ipv6();
    assert!(
        ping_until_reply(&topo.remote, me, Duration::from_secs(15)),
        "remote never reached {me}"
    );

    let mut report = Vec::new();
    for (what, args) in [
        ("remote -> client", "-t 6"),
        ("client -> remote", "-t 6 -R"),
    ] {
        let run = iperf3(&site.ns, &topo.remote, me, args);
        let mbps = run.received_bits_per_second() / 1e6;
        report.push(format!("{what}: {mbps:.2} Mbit/s"));
        eprintln!("shaped to {LIMIT_MBPS} Mbit/s, {what}: {mbps:.2} Mbit/s received");
        assert!(
            (mbps - LIMIT_MBPS).abs() <= LIMIT_MBPS * 0.1,
            "{what}: {mbps:.2} Mbit/s is not within 10% of {LIMIT_MBPS} Mbit/s \
             (per second: {:?})",
            run.interval_bytes()
        );
    }

    // Control: a token without a limit on the same relay is not held to 20 Mbit/s, so
    // the figures above come from the shaping and not from a slow path.
    let free_site = topo.client_site();
    let free = free_site.connect(&relay, &relay.creds.default_token, false);
    assert!(ping_until_reply(
        &topo.remote,
        free.ipv6(),
        Duration::from_secs(15)
    ));
    let run = iperf3(&free_site.ns, &topo.remote, free.ipv6(), "-t 2");
    let mbps = run.received_bits_per_second() / 1e6;
    eprintln!("unlimited token, remote -> client: {mbps:.2} Mbit/s; {report:?}");
    assert!(
        mbps > LIMIT_MBPS * 1.5,
        "an unlimited peer only got {mbps:.2} Mbit/s"
    );
}
