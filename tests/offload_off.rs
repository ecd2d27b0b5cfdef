//! The data path without offloads (TUN without virtio-net headers, UDP without GSO
//! and GRO), forced with `SIDECAR_OFFLOAD=off`, the path kernels without offloads
//! take. Its own test binary: the variable is set for this whole process, and the
//! agent it starts inherits it.

mod support;

use std::time::Duration;

use support::agent::metric_value;
use support::traffic::ping_until_reply;
use support::{
    inner, iperf3, ping_with, require_tools, Endpoints, Family, Pair, Tunnel, BASE_TOOLS,
};

#[test]
fn data_path_without_offloads_moves_traffic_both_ways() {
    require_tools(BASE_TOOLS);
    require_tools(&["iperf3"]);
    // SAFETY (of intent): the only test in this binary, set before any thread starts
    // an agent.
    std::env::set_var(sidecar::tun::OFFLOAD_ENV, "off");
    let pair = Pair::new();
    let t = Tunnel::new(&pair, Family::V4, Endpoints::Both);

    let metrics = t.agent.metrics();
    for kind in ["tun", "udp_gso", "udp_gro"] {
        assert_eq!(
            metric_value(&metrics, "sidecar_offload", &[("kind", kind)]),
            Some(0.0),
            "offload {kind} is on despite {}=off:\n{metrics}",
            sidecar::tun::OFFLOAD_ENV
        );
    }
    assert!(ping_until_reply(
        &pair.a,
        inner(Family::V4, 2),
        Duration::from_secs(10)
    ));
    // Full-size packets both ways, then a TCP stream in each direction: with
    // offloads the kernel would hand over superpackets; here every packet is one
    // read and one write.
    let p = ping_with(&pair.a, inner(Family::V4, 2), "-c 5 -i 0.2 -W 2 -s 1372");
    assert!(p.all_received(), "{}", p.output);
    let up = iperf3(&pair.b, &pair.a, inner(Family::V4, 2), "-t 1");
    up.assert_tcp_delivered(100_000, "agent -> wireguard-go without offloads");
    let down = iperf3(&pair.b, &pair.a, inner(Family::V4, 2), "-t 1 -R");
    down.assert_tcp_delivered(100_000, "wireguard-go -> agent without offloads");
    let log = t.agent.log();
    assert!(
        log.contains("tun_offload=false"),
        "the agent did not log the path it took:\n{log}"
    );
}
