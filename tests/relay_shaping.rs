//! Per-token bandwidth limits as a user measures them: iperf3 through the relay.

mod support;

use std::time::Duration;

use support::relay::{Relay, RelayOptions, Topology, RELAY_TOOLS};
use support::traffic::{iperf3, ping_until_reply};
use support::{require_tools, BASE_TOOLS};

const LIMIT_MBPS: f64 = 20.0;
/// Above the limit by the one burst a run may see, and by iperf3's measuring windows.
const CEILING: f64 = 1.1;
/// TCP through the shaper on a busy two-core machine.
const TCP_FLOOR: f64 = 0.5;

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
    // TCP settles near the rate through the shaper's queue; under a policer it would
    // collapse far below. The ceiling holds on any machine: the shaper never lets more
    // through than its rate (plus one 64 KiB burst). The floor leaves room for a busy
    // machine, which slows the path but cannot speed up the shaper.
    for (what, args) in [
        ("remote -> client", "-t 5"),
        ("client -> remote", "-t 5 -R"),
    ] {
        let run = iperf3(&site.ns, &topo.remote, me, args);
        let mbps = run.received_bits_per_second() / 1e6;
        report.push(format!("{what}: {mbps:.2} Mbit/s"));
        eprintln!("shaped to {LIMIT_MBPS} Mbit/s, TCP {what}: {mbps:.2} Mbit/s received");
        assert!(
            (LIMIT_MBPS * TCP_FLOOR..=LIMIT_MBPS * CEILING).contains(&mbps),
            "TCP {what}: {mbps:.2} Mbit/s, outside {:.1}..={:.1} Mbit/s (per second: {:?})",
            LIMIT_MBPS * TCP_FLOOR,
            LIMIT_MBPS * CEILING,
            run.interval_bytes()
        );
    }

    // Offered twice the rate, the shaped peer receives the rate at most; the same offer
    // to a peer without a limit arrives mostly intact, so the cut is the shaper's doing
    // and not a slow path.
    let offer = format!("-u -b {}M -l 1200 -t 3", 2.0 * LIMIT_MBPS);
    let shaped = iperf3(&site.ns, &topo.remote, me, &offer);
    let shaped_mbps = shaped.received_bits_per_second() / 1e6;
    let free_site = topo.client_site();
    let free = free_site.connect(&relay, &relay.creds.default_token, false);
    assert!(ping_until_reply(
        &topo.remote,
        free.ipv6(),
        Duration::from_secs(15)
    ));
    let unshaped = iperf3(&free_site.ns, &topo.remote, free.ipv6(), &offer);
    let unshaped_mbps = unshaped.received_bits_per_second() / 1e6;
    eprintln!(
        "UDP at {} Mbit/s: shaped peer {shaped_mbps:.2}, unlimited peer {unshaped_mbps:.2} \
         Mbit/s; {report:?}",
        2.0 * LIMIT_MBPS
    );
    assert!(
        shaped_mbps <= LIMIT_MBPS * CEILING,
        "the shaped peer received {shaped_mbps:.2} Mbit/s of UDP offered at twice its limit"
    );
    assert!(
        unshaped_mbps > LIMIT_MBPS * CEILING,
        "an unlimited peer only got {unshaped_mbps:.2} Mbit/s of the same offer"
    );
}
