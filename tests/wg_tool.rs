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
    KeyPair, Netns, Pair, Peer, TempDir, Tunnel, WireguardGo, BASE_TOOLS,
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

/// The UDP sockets listening in `ns` on `port`, as `ss -Hulne` lines.
fn udp_listeners(ns: &Netns, port: u16) -> String {
    ns.exec(&format!("ss -Hulne sport = :{port}"))
}

/// `wg set listen-port` on a live agent moves the tunnel to a new socket: the old
/// port closes, and traffic resumes on the new one once the peer follows it.
#[test]
fn wg_set_listen_port_rebinds_live() {
    require_tools(BASE_TOOLS);
    require_tools(&["ss"]);
    let pair = Pair::new();
    let t = Tunnel::new(&pair, Family::V4, Endpoints::Both);
    assert!(ping_until_reply(
        &pair.a,
        inner(Family::V4, 2),
        HANDSHAKE_TIMEOUT
    ));

    let new_port = AGENT_PORT + 10;
    t.agent.wg(&format!("set {{}} listen-port {new_port}"));
    assert_eq!(
        t.agent.wg("show {} listen-port").trim(),
        new_port.to_string()
    );
    assert!(
        wait_until(Duration::from_secs(2), || udp_listeners(
            &pair.a, AGENT_PORT
        )
        .trim()
        .is_empty()),
        "the old port is still open:\n{}",
        udp_listeners(&pair.a, AGENT_PORT)
    );
    assert!(
        !udp_listeners(&pair.a, new_port).trim().is_empty(),
        "nothing listens on the new port"
    );
    // The agent now sends from the new port; wireguard-go follows the authenticated
    // packets there and answers to it.
    let p = ping_with(&pair.a, inner(Family::V4, 2), "-c 5 -i 0.2 -W 2");
    assert!(p.received >= 4, "traffic after the rebind:\n{}", p.output);
    let seen = t
        .wggo
        .peer(&t.agent_keys.public)
        .expect("agent is wggo's peer");
    assert_eq!(
        seen.endpoint,
        Some(endpoint(underlay(Family::V4, 1), new_port)),
        "wireguard-go did not see the agent on its new port"
    );
    let p = ping(&pair.b, inner(Family::V4, 1));
    assert!(
        p.all_received(),
        "B -> agent after the rebind:\n{}",
        p.output
    );
}

/// `wg set private-key` on a live agent: the old sessions end, the peer (still
/// knowing the old public key) is cut off until it is told the new one, then traffic
/// resumes with a handshake under the new key.
#[test]
fn wg_set_private_key_live() {
    require_tools(BASE_TOOLS);
    let pair = Pair::new();
    let t = Tunnel::new(&pair, Family::V4, Endpoints::Both);
    assert!(ping_until_reply(
        &pair.a,
        inner(Family::V4, 2),
        HANDSHAKE_TIMEOUT
    ));

    let new_keys = KeyPair::generate();
    let dir = TempDir::new();
    let key_file = dir.join("private.key");
    std::fs::write(&key_file, format!("{}\n", new_keys.private)).expect("write key");
    t.agent
        .wg(&format!("set {{}} private-key {}", key_file.display()));
    assert_eq!(t.agent.wg("show {} public-key").trim(), new_keys.public);

    let p = ping_with(&pair.a, inner(Family::V4, 2), "-c 3 -i 0.3 -W 1");
    assert_eq!(
        p.received, 0,
        "traffic passed with a key the peer does not know:\n{}",
        p.output
    );

    t.wggo
        .wg(&format!("set {{}} peer {} remove", t.agent_keys.public));
    t.wggo.add_peer(
        &Peer::new(&new_keys.public)
            .allow(cidr(inner(Family::V4, 1), 32))
            .allow(cidr(inner(Family::V6, 1), 128))
            .endpoint(endpoint(underlay(Family::V4, 1), AGENT_PORT)),
    );
    assert!(
        ping_until_reply(&pair.a, inner(Family::V4, 2), HANDSHAKE_TIMEOUT),
        "no traffic after the peer learned the new key"
    );
    let p = ping(&pair.b, inner(Family::V4, 1));
    assert!(
        p.all_received(),
        "B -> agent with the new key:\n{}",
        p.output
    );
    let status = t.wggo.peer(&new_keys.public).expect("new key listed");
    assert!(
        status.latest_handshake > 0,
        "no handshake under the new key"
    );
}

/// `wg set fwmark` on a live agent marks the tunnel's UDP socket (SO_MARK), survives
/// a listen-port change, and is cleared again with `fwmark off`.
#[test]
fn wg_set_fwmark_marks_the_socket() {
    require_tools(BASE_TOOLS);
    require_tools(&["ss"]);
    let pair = Pair::new();
    let t = Tunnel::new(&pair, Family::V4, Endpoints::Both);
    assert!(
        !udp_listeners(&pair.a, AGENT_PORT).contains("fwmark"),
        "marked before any fwmark was set"
    );

    t.agent.wg("set {} fwmark 0x1234");
    assert_eq!(t.agent.wg("show {} fwmark").trim(), "0x1234");
    let ss = udp_listeners(&pair.a, AGENT_PORT);
    assert!(ss.contains("fwmark:0x1234"), "socket not marked:\n{ss}");

    let new_port = AGENT_PORT + 11;
    t.agent.wg(&format!("set {{}} listen-port {new_port}"));
    let ss = udp_listeners(&pair.a, new_port);
    assert!(
        ss.contains("fwmark:0x1234"),
        "the new socket lost the mark:\n{ss}"
    );
    assert!(ping_until_reply(
        &pair.a,
        inner(Family::V4, 2),
        HANDSHAKE_TIMEOUT
    ));

    t.agent.wg("set {} fwmark off");
    assert_eq!(t.agent.wg("show {} fwmark").trim(), "off");
    let ss = udp_listeners(&pair.a, new_port);
    assert!(
        !ss.is_empty() && !ss.contains("fwmark"),
        "mark not cleared:\n{ss}"
    );
}
