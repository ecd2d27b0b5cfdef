//! The stock `wg` tool driving sidecar-agent through its userspace API socket, the way an
//! operator inspects and changes a running interface.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::netns::veth;
use support::traffic::ping_until_reply;
use support::tunnel::{AGENT_PORT, WGGO_PORT};
use support::wg::uapi_socket;
use support::{
    cidr, endpoint, inner, ping, ping_with, require_tools, underlay, wait_until, Endpoints, Family,
    KeyPair, Netns, Pair, Peer, Tunnel, WireguardGo, BASE_TOOLS,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn wg_show_reports_peer_handshake_and_transfer() {
    require_tools(BASE_TOOLS);
    let pair = Pair::new();
    let t = Tunnel::new(&pair, Family::V4, Endpoints::Both);
    let wggo_endpoint = endpoint(underlay(Family::V4, 2), WGGO_PORT);

    let show = t.agent.wg("show {}");
    for expected in [
        format!("interface: {}", t.agent.iface),
        format!("public key: {}", t.agent_keys.public),
        format!("listening port: {AGENT_PORT}"),
        format!("peer: {}", t.wggo_keys.public),
        format!("endpoint: {wggo_endpoint}"),
        format!(
            "allowed ips: {}, {}",
            cidr(inner(Family::V4, 2), 32),
            cidr(inner(Family::V6, 2), 128)
        ),
    ] {
        assert!(
            show.contains(&expected),
            "`wg show` lacks {expected:?}:\n{show}"
        );
    }
    assert!(
        !show.contains("latest handshake"),
        "handshake reported before any traffic:\n{show}"
    );
    assert_eq!(t.agent.wg("show {} public-key").trim(), t.agent_keys.public);
    assert_eq!(
        t.agent.wg("show {} listen-port").trim(),
        AGENT_PORT.to_string()
    );

    assert!(ping_until_reply(
        &pair.a,
        inner(Family::V4, 2),
        HANDSHAKE_TIMEOUT
    ));
    let p = ping_with(&pair.a, inner(Family::V4, 2), "-c 5 -i 0.2 -W 2 -s 1000");
    assert!(p.all_received(), "{}", p.output);

    let show = t.agent.wg("show {}");
    assert!(
        show.contains("latest handshake:") && show.contains("transfer:"),
        "`wg show` after traffic:\n{show}"
    );
    let status = t
        .agent
        .peer(&t.wggo_keys.public)
        .expect("peer listed in dump");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after epoch")
        .as_secs();
    assert!(
        status.latest_handshake > 0 && now.abs_diff(status.latest_handshake) < 60,
        "latest handshake {} is not recent (now {now})",
        status.latest_handshake
    );
    // Five 1000-byte pings each way, encrypted, cannot fit in less.
    assert!(
        status.rx_bytes > 5000 && status.tx_bytes > 5000,
        "transfer counters after traffic: {status:?}"
    );
    assert_eq!(status.endpoint, Some(wggo_endpoint));
    assert_eq!(
        t.agent.wg("show {} transfer").split_whitespace().count(),
        3,
        "one peer line: key, rx, tx"
    );
}

/// A third namespace C with its own wireguard-go joins through a live `wg set`, and is cut
/// off again by `wg set ... remove`, while the configured peer keeps working throughout.
#[test]
fn wg_set_adds_and_removes_peer_live() {
    require_tools(BASE_TOOLS);
    let pair = Pair::new();
    let c = Netns::new();
    // A's link to C gets the upper half of the underlay /24; being more specific than A's
    // /24 on veth0, it wins for C's addresses.
    let (a_to_c, c_addr) = (
        "192.0.2.129".parse().expect("address"),
        "192.0.2.130".parse().expect("address"),
    );
    veth(&pair.a, "vethc", &c, "veth0");
    pair.a.add_addr("vethc", &cidr(a_to_c, 25));
    c.add_addr("veth0", &cidr(c_addr, 25));

    let t = Tunnel::new(&pair, Family::V4, Endpoints::Both);
    let c_keys = KeyPair::generate();
    let c_port = 51822;
    let c_inner = inner(Family::V4, 3);
    let c_wg = WireguardGo::start(&c, &c_keys, c_port);
    c_wg.add_addr(&cidr(c_inner, 24));
    c_wg.add_peer(
        &Peer::new(&t.agent_keys.public)
            .allow(cidr(inner(Family::V4, 1), 32))
            .endpoint(endpoint(a_to_c, AGENT_PORT)),
    );

    let p = ping_with(&c, inner(Family::V4, 1), "-c 2 -i 0.2 -W 1");
    assert_eq!(p.received, 0, "an unknown peer got through:\n{}", p.output);

    t.agent.wg(&format!(
        "set {{}} peer {} allowed-ips {} endpoint {}",
        c_keys.public,
        cidr(c_inner, 32),
        endpoint(c_addr, c_port)
    ));
    assert!(
        t.agent.wg("show {} peers").contains(&c_keys.public),
        "added peer not listed"
    );
    assert!(
        ping_until_reply(&c, inner(Family::V4, 1), HANDSHAKE_TIMEOUT),
        "the peer added with `wg set` cannot reach us"
    );
    let p = ping(&pair.a, c_inner);
    assert!(p.all_received(), "A -> added peer:\n{}", p.output);
    let p = ping(&pair.a, inner(Family::V4, 2));
    assert!(p.all_received(), "original peer broke:\n{}", p.output);

    t.agent
        .wg(&format!("set {{}} peer {} remove", c_keys.public));
    assert!(
        !t.agent.wg("show {} peers").contains(&c_keys.public),
        "removed peer still listed"
    );
    let p = ping_with(&pair.a, c_inner, "-c 3 -i 0.2 -W 1");
    assert_eq!(
        p.received, 0,
        "A still reaches the removed peer:\n{}",
        p.output
    );
    let p = ping_with(&c, inner(Family::V4, 1), "-c 3 -i 0.2 -W 1");
    assert_eq!(
        p.received, 0,
        "the removed peer still reaches A:\n{}",
        p.output
    );
    let p = ping(&pair.a, inner(Family::V4, 2));
    assert!(p.all_received(), "original peer broke:\n{}", p.output);
}

/// Shutting the agent down (as systemd or a container runtime would) leaves nothing behind.
fn clean_shutdown(signal: libc::c_int) {
    require_tools(BASE_TOOLS);
    let pair = Pair::new();
    let mut t = Tunnel::new(&pair, Family::V4, Endpoints::Both);
    assert!(ping_until_reply(
        &pair.a,
        inner(Family::V4, 2),
        HANDSHAKE_TIMEOUT
    ));
    let iface = t.agent.iface.clone();
    let status = t.agent.signal_and_wait(signal, Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "agent exit after signal {signal}: {status:?}"
    );
    assert!(
        !uapi_socket(&iface).exists(),
        "{:?} left behind",
        uapi_socket(&iface)
    );
    let gone = wait_until(Duration::from_secs(2), || {
        !pair
            .a
            .try_exec(&format!("ip link show {iface}"))
            .status
            .success()
    });
    assert!(gone, "interface {iface} left behind");
    let routes = pair.a.exec("ip route show") + &pair.a.exec("ip -6 route show");
    assert!(
        !routes.contains("198.51.100.") && !routes.contains("2001:db8:2:"),
        "tunnel routes left behind:\n{routes}"
    );
}

#[test]
fn sigterm_removes_interface_routes_and_socket() {
    clean_shutdown(libc::SIGTERM);
}

#[test]
fn sigint_removes_interface_routes_and_socket() {
    clean_shutdown(libc::SIGINT);
}
