//! Interoperability with the reference userspace implementation: sidecar-agent in one
//! namespace, Debian's wireguard-go in another, real packets between them.

mod support;

use std::time::Duration;

use support::relay::SourceCounter;
use support::traffic::{iperf3_start, ping_until_reply};
use support::tunnel::{AGENT_PORT, WGGO_PORT};
use support::{
    agent, cidr, endpoint, inner, iperf3, ping, ping_with, require_tools, roaming, underlay,
    wait_until, Endpoints, Family, Pair, Tunnel, BASE_TOOLS,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn require() {
    require_tools(BASE_TOOLS);
    require_tools(&["iperf3", "timeout"]);
}

/// Only the side that knows the other's endpoint can send the first handshake; checks that
/// it completes, that wireguard-go records it, and that both directions then work.
fn handshake(outer: Family, endpoints: Endpoints) {
    require();
    let pair = Pair::new();
    let t = Tunnel::new(&pair, outer, endpoints);
    assert_eq!(
        t.wggo
            .peer(&t.agent_keys.public)
            .map(|p| p.latest_handshake),
        Some(0),
        "no handshake may happen before traffic"
    );

    let (from, to) = match endpoints {
        Endpoints::AgentOnly => (&pair.a, inner(Family::V4, 2)),
        _ => (&pair.b, inner(Family::V4, 1)),
    };
    assert!(
        ping_until_reply(from, to, HANDSHAKE_TIMEOUT),
        "no reply through the tunnel to {to}"
    );

    let handshakes = t.wggo.wg("show {} latest-handshakes");
    let stamp: u64 = handshakes
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{}\t", t.agent_keys.public)))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("our peer missing from latest-handshakes: {handshakes}"));
    assert!(stamp > 0, "wireguard-go records no handshake: {handshakes}");

    // The responder learned the initiator's endpoint from the handshake.
    let (responder_view, expected) = match endpoints {
        Endpoints::AgentOnly => (
            t.wggo.peer(&t.agent_keys.public),
            endpoint(underlay(outer, 1), AGENT_PORT),
        ),
        _ => (
            t.agent.peer(&t.wggo_keys.public),
            endpoint(underlay(outer, 2), WGGO_PORT),
        ),
    };
    assert_eq!(responder_view.and_then(|p| p.endpoint), Some(expected));

    for f in Family::BOTH {
        let p = ping(&pair.a, inner(f, 2));
        assert!(p.all_received(), "A -> B over inner {f:?}:\n{}", p.output);
        let p = ping(&pair.b, inner(f, 1));
        assert!(p.all_received(), "B -> A over inner {f:?}:\n{}", p.output);
    }
}

#[test]
fn handshake_initiated_by_sidecar_outer_v4() {
    handshake(Family::V4, Endpoints::AgentOnly);
}

#[test]
fn handshake_initiated_by_sidecar_outer_v6() {
    handshake(Family::V6, Endpoints::AgentOnly);
}

#[test]
fn handshake_initiated_by_wireguard_go_outer_v4() {
    handshake(Family::V4, Endpoints::WireguardGoOnly);
}

#[test]
fn handshake_initiated_by_wireguard_go_outer_v6() {
    handshake(Family::V6, Endpoints::WireguardGoOnly);
}

fn ping_both_ways(outer: Family) {
    require();
    let pair = Pair::new();
    let _t = Tunnel::new(&pair, outer, Endpoints::Both);
    assert!(ping_until_reply(
        &pair.a,
        inner(Family::V4, 2),
        HANDSHAKE_TIMEOUT
    ));
    for f in Family::BOTH {
        let p = ping(&pair.a, inner(f, 2));
        assert!(p.all_received(), "A -> B over inner {f:?}:\n{}", p.output);
        let p = ping(&pair.b, inner(f, 1));
        assert!(p.all_received(), "B -> A over inner {f:?}:\n{}", p.output);
        // Close to the MTU: 1420 - 28 (IPv4 + ICMP) or - 48 (IPv6 + ICMPv6).
        let size = match f {
            Family::V4 => 1392,
            Family::V6 => 1372,
        };
        let p = ping_with(
            &pair.b,
            inner(f, 1),
            &format!("-c 2 -i 0.2 -W 2 -s {size} -M do"),
        );
        assert!(
            p.all_received(),
            "full-size ping over inner {f:?}:\n{}",
            p.output
        );
    }
}

/// The boringtun backend behind the same seam: handshakes both ways, pings and a TCP
/// stream against wireguard-go.
#[test]
fn boringtun_backend_handshakes_and_carries_traffic() {
    require();
    let pair = Pair::new();
    let t = Tunnel::with_config(&pair, Family::V4, Endpoints::Both, |c| {
        c.noise_backend = Some("boringtun".into());
    });
    assert!(
        t.agent.log_tail(200).contains("Boringtun"),
        "the agent does not report the boringtun backend:\n{}",
        t.agent.log_tail(40)
    );
    assert!(ping_until_reply(
        &pair.a,
        inner(Family::V4, 2),
        HANDSHAKE_TIMEOUT
    ));
    for f in Family::BOTH {
        let p = ping(&pair.a, inner(f, 2));
        assert!(p.all_received(), "A -> B over inner {f:?}:\n{}", p.output);
        let p = ping(&pair.b, inner(f, 1));
        assert!(p.all_received(), "B -> A over inner {f:?}:\n{}", p.output);
    }
    let handshakes = t.wggo.wg("show {} latest-handshakes");
    let stamp: u64 = handshakes
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{}\t", t.agent_keys.public)))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("our peer missing from latest-handshakes: {handshakes}"));
    assert!(stamp > 0, "wireguard-go records no handshake: {handshakes}");
    for args in ["-t 2", "-t 2 -R"] {
        let run = iperf3(&pair.a, &pair.b, inner(Family::V4, 1), args);
        run.assert_tcp_delivered(TCP_FLOOR_BYTES, &format!("iperf3 {args} (boringtun)"));
    }
}

#[test]
fn ping_both_ways_outer_v4() {
    ping_both_ways(Family::V4);
}

#[test]
fn ping_both_ways_outer_v6() {
    ping_both_ways(Family::V6);
}

/// What a 2 s TCP run must at least move: 4 Mbit/s, far below what either side does on a
/// busy machine, far above what a tunnel that only passes small packets (an MTU black
/// hole) or stalls after its first packets manages.
const TCP_FLOOR_BYTES: u64 = 1 << 20;

/// TCP iperf3 with the server on our side: B -> A, then A -> B with `-R`.
fn tcp_both_ways(outer: Family, inner_family: Family) {
    require();
    let pair = Pair::new();
    let _t = Tunnel::new(&pair, outer, Endpoints::Both);
    let server = inner(inner_family, 1);
    assert!(ping_until_reply(&pair.b, server, HANDSHAKE_TIMEOUT));
    for args in ["-t 2", "-t 2 -R"] {
        let run = iperf3(&pair.a, &pair.b, server, args);
        eprintln!(
            "tcp {args} outer {outer:?} inner {inner_family:?}: {:.0} Mbit/s, {} retransmits",
            run.received_bits_per_second() / 1e6,
            run.retransmits()
        );
        run.assert_tcp_delivered(TCP_FLOOR_BYTES, &format!("iperf3 {args}"));
    }
}

#[test]
fn tcp_both_ways_outer_v4_inner_v4() {
    tcp_both_ways(Family::V4, Family::V4);
}

#[test]
fn tcp_both_ways_outer_v4_inner_v6() {
    tcp_both_ways(Family::V4, Family::V6);
}

#[test]
fn tcp_both_ways_outer_v6_inner_v4() {
    tcp_both_ways(Family::V6, Family::V4);
}

#[test]
fn tcp_both_ways_outer_v6_inner_v6() {
    tcp_both_ways(Family::V6, Family::V6);
}

/// Loss a 10 Mbit/s stream may see on a loaded two-core machine running tests in parallel
/// (a scheduling stall of a few hundred milliseconds overflows a socket buffer) without
/// pointing at a broken data path. The rate is low enough that neither side is short of
/// CPU for the crypto itself, even in a debug build.
const MAX_UDP_LOSS_PERCENT: f64 = 10.0;
const UDP_DATAGRAM: u64 = 1200;

fn udp_both_ways(outer: Family, inner_family: Family) {
    require();
    let pair = Pair::new();
    let _t = Tunnel::new(&pair, outer, Endpoints::Both);
    let server = inner(inner_family, 1);
    assert!(ping_until_reply(&pair.b, server, HANDSHAKE_TIMEOUT));
    // 1200-byte datagrams fit the tunnel MTU in both families, so loss means the tunnel
    // lost them, not that fragments were dropped.
    for reverse in ["", " -R"] {
        let args = format!("-u -b 10M -l {UDP_DATAGRAM} -t 2{reverse}");
        let run = iperf3(&pair.a, &pair.b, server, &args);
        let loss = run.udp_loss_percent();
        eprintln!("udp {args} outer {outer:?} inner {inner_family:?}: {loss:.2}% loss");
        run.assert_udp_delivered(
            UDP_DATAGRAM,
            MAX_UDP_LOSS_PERCENT,
            &format!("iperf3 {args}"),
        );
    }
}

#[test]
fn udp_both_ways_outer_v4_inner_v4() {
    udp_both_ways(Family::V4, Family::V4);
}

#[test]
fn udp_both_ways_outer_v4_inner_v6() {
    udp_both_ways(Family::V4, Family::V6);
}

#[test]
fn udp_both_ways_outer_v6_inner_v4() {
    udp_both_ways(Family::V6, Family::V4);
}

#[test]
fn udp_both_ways_outer_v6_inner_v6() {
    udp_both_ways(Family::V6, Family::V6);
}

/// Tunnel bytes that show a transfer is really flowing, before and after a move.
const MOVED_BYTES: u64 = 1 << 20;

/// wireguard-go's host moves to another network in the middle of a transfer; we must follow
/// it to the new source address without the transfer breaking.
fn roaming_peer(outer: Family) {
    require();
    let pair = Pair::new();
    let t = Tunnel::new(&pair, outer, Endpoints::Both);
    let link = Pair::LINK;
    let (len, old_b, new_b) = (outer.prefix_len(), underlay(outer, 2), roaming(outer, 2));
    // A is not renumbered; it just knows the new network is on the same wire, as if a router
    // between them had learned it.
    pair.a.ip(&format!(
        "route add {} dev {link}",
        cidr(roaming(outer, 0), len)
    ));
    assert!(ping_until_reply(
        &pair.b,
        inner(Family::V4, 1),
        HANDSHAKE_TIMEOUT
    ));

    // What the agent has received from wireguard-go so far, by its own `wg show`.
    let received = || t.agent.peer(&t.wggo_keys.public).map_or(0, |p| p.rx_bytes);
    let run = iperf3_start(&pair.a, &pair.b, inner(Family::V4, 1), "-t 8");
    // Move only once the transfer is under way.
    let start = received();
    assert!(
        wait_until(Duration::from_secs(5), || received() >= start + MOVED_BYTES),
        "the transfer did not get going before the move: {} bytes",
        received() - start
    );
    pair.b.add_addr(link, &cidr(new_b, len));
    pair.b
        .ip(&format!("addr del {} dev {link}", cidr(old_b, len)));
    pair.b.ip(&format!(
        "route add {} dev {link} src {new_b}",
        cidr(underlay(outer, 0), len)
    ));
    // wireguard-go 0.0.20220316 pins the source address it last received on and, for IPv4,
    // keeps failing with ENETUNREACH once that address is gone instead of re-selecting one.
    // Re-setting the endpoint (as a network manager reacting to the move would) drops the
    // pinned source; our side still only learns the new address from the packets.
    t.wggo.wg(&format!(
        "set {{}} peer {} endpoint {}",
        t.agent_keys.public,
        endpoint(underlay(outer, 1), AGENT_PORT)
    ));
    // The same transfer goes on from the new address: the agent follows it and keeps
    // receiving, well before iperf3's 8 s are up.
    let moved_at = received();
    let new_endpoint = endpoint(new_b, WGGO_PORT);
    let followed = wait_until(Duration::from_secs(5), || {
        t.agent.peer(&t.wggo_keys.public).and_then(|p| p.endpoint) == Some(new_endpoint.clone())
            && received() >= moved_at + MOVED_BYTES
    });
    let after_move = received() - moved_at;
    assert!(
        followed,
        "after the move the agent received {after_move} bytes and `wg show {} endpoints` \
         shows {}, not {new_endpoint}",
        t.agent.iface,
        t.agent.wg("show {} endpoints")
    );
    let report = run.finish();
    report.assert_tcp_delivered(2 * MOVED_BYTES, "the transfer across the move");
    // Our side must now answer to the new address on its own initiative too.
    let p = ping(&pair.a, inner(Family::V6, 2));
    assert!(p.all_received(), "A -> B after the move:\n{}", p.output);
}

#[test]
fn roaming_peer_outer_v4() {
    roaming_peer(Family::V4);
}

#[test]
fn roaming_peer_outer_v6() {
    roaming_peer(Family::V6);
}

/// wireguard-go sends packets whose inner source is not in the AllowedIPs we have for it;
/// they must not reach our network stack, and the agent must count them.
fn spoofed_source(inner_family: Family) {
    require();
    let pair = Pair::new();
    let t = Tunnel::new(&pair, Family::V4, Endpoints::Both);
    let ours = inner(inner_family, 1);
    assert!(ping_until_reply(&pair.b, ours, HANDSHAKE_TIMEOUT));

    let drops = || {
        agent::metric_value(
            &t.agent.metrics(),
            "sidecar_peer_rx_dropped_total",
            &[("peer", &t.wggo_keys.public), ("reason", "source")],
        )
        .unwrap_or(0.0)
    };
    let before = drops();

    let spoofed = inner(inner_family, 99);
    // Deprecated (preferred_lft 0) so that only `-I` uses it: IPv6 source selection would
    // otherwise prefer this /128 over the legitimate /64 address for every ping.
    let nodad = if inner_family == Family::V6 {
        " nodad"
    } else {
        ""
    };
    pair.b.ip(&format!(
        "addr add {} dev {} preferred_lft 0{nodad}",
        cidr(spoofed, inner_family.host_len()),
        t.wggo.iface
    ));
    // Counted by the kernel as the packets come out of our TUN device, so a spoofed
    // packet we delivered shows here even though its reply (to an address no peer is
    // allowed) could never go back.
    let delivered_spoofed = SourceCounter::on_interface(&pair.a, &t.agent.iface, spoofed);
    let delivered_legit =
        SourceCounter::on_interface(&pair.a, &t.agent.iface, inner(inner_family, 2));
    let p = ping_with(&pair.b, ours, &format!("-c 3 -i 0.2 -W 1 -I {spoofed}"));
    assert_eq!(
        p.received, 0,
        "a reply came back to a source outside AllowedIPs:\n{}",
        p.output
    );
    let counted = wait_until(Duration::from_secs(3), || drops() >= before + 3.0);
    assert!(
        counted,
        "source-drop counter went from {before} to {}; metrics:\n{}",
        drops(),
        t.agent.metrics()
    );

    assert_eq!(
        delivered_spoofed.packets(),
        0,
        "packets from {spoofed}, outside the peer's AllowedIPs, reached the network stack"
    );

    let p = ping(&pair.b, ours);
    assert!(p.all_received(), "legitimate traffic broke:\n{}", p.output);
    // The same counter does see what the tunnel may deliver.
    assert!(
        delivered_legit.packets() >= u64::from(p.transmitted),
        "the TUN ingress counter saw {} of {} legitimate packets",
        delivered_legit.packets(),
        p.transmitted
    );
    assert_eq!(delivered_spoofed.packets(), 0);
}

#[test]
fn spoofed_inner_source_dropped_v4() {
    spoofed_source(Family::V4);
}

#[test]
fn spoofed_inner_source_dropped_v6() {
    spoofed_source(Family::V6);
}
