//! `sidecar-wg` as a drop-in for wireguard-go: started as `sidecar-wg IFNAME`, driven
//! only by `wg`, `ip` and wg-quick, against Debian's wireguard-go in another namespace.

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use support::sidecar_wg::{daemons_in, run_detached, sidecar_wg_bin, SidecarWg};
use support::traffic::ping_until_reply;
use support::wg::{uapi_socket, MTU};
use support::{
    cidr, endpoint, inner, iperf3, ping, require_tools, roaming, underlay, wait_until, Agent,
    AgentConfig, Family, KeyPair, Netns, Pair, Peer, TempDir, WireguardGo, BASE_TOOLS,
};

fn require() {
    require_tools(BASE_TOOLS);
}

#[test]
fn detaches_once_ready_and_exits_when_the_interface_is_deleted() {
    require();
    let ns = Netns::new();
    let wg = SidecarWg::start(&ns);
    let link = ns.ip(&format!("link show {}", wg.iface));
    assert!(link.contains(&wg.iface), "no interface after start: {link}");
    let shown = ns.exec(&format!("wg show {}", wg.iface));
    assert!(shown.contains("listening port"), "wg show: {shown}");

    // A second daemon for the same name is refused with a reason, and the first keeps
    // its interface and socket.
    let log = TempDir::new();
    let again = run_detached(&ns, &wg.iface, &log.join("log"));
    assert!(
        !again.status.success(),
        "a second sidecar-wg {} started",
        wg.iface
    );
    let reason = String::from_utf8_lossy(&again.stderr);
    assert!(
        reason.contains("error:") && reason.contains(&wg.iface),
        "no reason given: {reason}"
    );
    assert!(wg.is_running() && uapi_socket(&wg.iface).exists());

    let deleted = Instant::now();
    ns.ip(&format!("link del {}", wg.iface));
    assert!(
        wait_until(Duration::from_secs(1), || !wg.is_running()),
        "daemon still running 1 s after `ip link del`:\n{}",
        wg.log_tail(20)
    );
    assert!(
        !uapi_socket(&wg.iface).exists(),
        "socket left behind after the interface was deleted"
    );
    assert!(daemons_in(&ns).is_empty());
    eprintln!("daemon gone {:?} after ip link del", deleted.elapsed());
}

#[test]
fn sigterm_removes_the_interface_and_socket() {
    require();
    let ns = Netns::new();
    let wg = SidecarWg::start(&ns);
    // SAFETY: kill(2) of the daemon this test started.
    unsafe { libc::kill(wg.pid as libc::pid_t, libc::SIGTERM) };
    assert!(
        wait_until(Duration::from_secs(3), || !wg.is_running()),
        "daemon ignored SIGTERM"
    );
    assert!(!uapi_socket(&wg.iface).exists(), "socket left behind");
    let links = ns.ip("link show");
    assert!(!links.contains(&wg.iface), "interface left behind: {links}");
}

const SIDECAR_PORT: u16 = 51820;
const WGGO_PORT: u16 = 51821;

/// `sidecar-wg` in `pair.a` and wireguard-go in `pair.b`, host 1 and host 2 inside the
/// tunnel, each told the other's endpoint over `outer`, both at `mtu`.
struct Session<'p> {
    pair: &'p Pair,
    ours: SidecarWg<'p>,
    theirs: WireguardGo<'p>,
    ours_keys: KeyPair,
}

impl<'p> Session<'p> {
    fn new(pair: &'p Pair, outer: Family, env: &[(&str, &str)]) -> Self {
        Self::between(pair, underlay(outer, 1), underlay(outer, 2), env)
    }

    /// As [`Session::new`], wireguard-go sending to `ours_at` and we to `theirs_at`.
    fn between(pair: &'p Pair, ours_at: IpAddr, theirs_at: IpAddr, env: &[(&str, &str)]) -> Self {
        let ours_keys = KeyPair::generate();
        let theirs_keys = KeyPair::generate();
        let ours = SidecarWg::start_with_env(&pair.a, env);
        ours.configure(&ours_keys, SIDECAR_PORT, MTU);
        for f in Family::BOTH {
            pair.a
                .add_addr(&ours.iface, &cidr(inner(f, 1), f.prefix_len()));
        }
        ours.add_peer(
            &Peer::new(&theirs_keys.public)
                .allow(cidr(inner(Family::V4, 2), 32))
                .allow(cidr(inner(Family::V6, 2), 128))
                .endpoint(endpoint(theirs_at, WGGO_PORT)),
        );
        let theirs = WireguardGo::start(&pair.b, &theirs_keys, WGGO_PORT);
        for f in Family::BOTH {
            theirs.add_addr(&cidr(inner(f, 2), f.prefix_len()));
        }
        theirs.add_peer(
            &Peer::new(&ours_keys.public)
                .allow(cidr(inner(Family::V4, 1), 32))
                .allow(cidr(inner(Family::V6, 1), 128))
                .endpoint(endpoint(ours_at, SIDECAR_PORT)),
        );
        Session {
            pair,
            ours,
            theirs,
            ours_keys,
        }
    }

    fn set_mtu(&self, mtu: u32) {
        self.pair
            .a
            .ip(&format!("link set {} mtu {mtu}", self.ours.iface));
        self.pair
            .b
            .ip(&format!("link set {} mtu {mtu}", self.theirs.iface));
    }

    fn assert_pings(&self) {
        for f in Family::BOTH {
            assert!(
                ping_until_reply(&self.pair.a, inner(f, 2), HANDSHAKE_TIMEOUT),
                "no reply over inner {f:?}:\n{}",
                self.ours.log_tail(30)
            );
        }
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP and UDP of `megabytes` each way between the two tunnel ends, UDP in datagrams
/// of `udp_len` bytes at `udp_mbps` (what a debug build on a shared machine keeps up
/// with: the point is that every size gets through, not how fast).
fn transfer_both_ways(s: &Session, megabytes: u64, udp_len: u64, udp_mbps: u32, what: &str) {
    let (a, b) = (&s.pair.a, &s.pair.b);
    let bytes = megabytes << 20;
    for (dir, args) in [("A->B", ""), ("B->A", " -R")] {
        let r = iperf3(
            b,
            a,
            inner(Family::V4, 2),
            &format!("-n {megabytes}M{args}"),
        );
        r.assert_tcp_delivered(bytes * 9 / 10, &format!("{what}: TCP {dir}"));
        let udp = iperf3(
            b,
            a,
            inner(Family::V6, 2),
            &format!("-u -b {udp_mbps}M -l {udp_len} -n {megabytes}M{args}"),
        );
        // Loss from a busy machine stays well under this; a data path that cannot carry
        // the datagram size loses them all.
        udp.assert_udp_delivered(udp_len, 25.0, &format!("{what}: UDP {dir}"));
    }
    assert!(
        s.ours.is_running(),
        "{what}: daemon died:\n{}",
        s.ours.log_tail(30)
    );
}

fn mtu_raised_and_lowered(env: &[(&str, &str)]) {
    require();
    require_tools(&["iperf3", "timeout"]);
    let pair = Pair::new();
    let s = Session::new(&pair, Family::V4, env);
    s.assert_pings();
    transfer_both_ways(&s, 100, 1200, 60, "MTU 1420");
    s.set_mtu(34_000);
    transfer_both_ways(&s, 300, 30_000, 200, "MTU 34000");
    s.set_mtu(u32::from(MTU));
    transfer_both_ways(&s, 100, 1200, 60, "MTU back at 1420");
    let log = s.ours.log();
    assert!(
        !log.contains("overflows"),
        "read buffers overflowed:\n{}",
        s.ours.log_tail(30)
    );
    let _ = &s.ours_keys;
    let _ = &s.theirs;
}

#[test]
fn mtu_raised_to_34000_and_back_with_offloads() {
    mtu_raised_and_lowered(&[]);
}

#[test]
fn mtu_raised_to_34000_and_back_without_offloads() {
    mtu_raised_and_lowered(&[("SIDECAR_OFFLOAD", "off")]);
}

/// The source address the kernel picks in `ns` for packets to `dst`.
fn kernel_source(ns: &Netns, dst: IpAddr) -> IpAddr {
    let route = ns.ip(&format!("route get {dst}"));
    route
        .split_whitespace()
        .skip_while(|w| *w != "src")
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no source in `ip route get {dst}`: {route}"))
}

/// How wireguard-go sees our endpoint.
fn our_endpoint_at_theirs(s: &Session) -> Option<String> {
    s.theirs.peer(&s.ours_keys.public).and_then(|p| p.endpoint)
}

#[test]
fn replies_leave_from_the_address_the_peer_sent_to() {
    require();
    let pair = Pair::new();
    // A second address of each family on our side of the link; the peer talks to
    // whichever of the two the kernel would not choose by itself.
    for f in Family::BOTH {
        pair.a
            .add_addr(Pair::LINK, &cidr(underlay(f, 11), f.prefix_len()));
    }
    for outer in Family::BOTH {
        let theirs_at = underlay(outer, 2);
        let default = kernel_source(&pair.a, theirs_at);
        let secondary = [underlay(outer, 1), underlay(outer, 11)]
            .into_iter()
            .find(|a| *a != default)
            .expect("two addresses");
        let s = Session::between(&pair, secondary, theirs_at, &[]);
        // wireguard-go initiates to the secondary address; every reply, then traffic
        // both ways, must come back from it or wireguard-go moves our endpoint.
        assert!(
            ping_until_reply(&pair.b, inner(Family::V4, 1), HANDSHAKE_TIMEOUT),
            "outer {outer:?}: no reply through the tunnel:\n{}",
            s.ours.log_tail(30)
        );
        for f in Family::BOTH {
            let p = ping(&pair.a, inner(f, 2));
            assert!(
                p.all_received(),
                "outer {outer:?}, A -> B {f:?}:\n{}",
                p.output
            );
            let p = ping(&pair.b, inner(f, 1));
            assert!(
                p.all_received(),
                "outer {outer:?}, B -> A {f:?}:\n{}",
                p.output
            );
        }
        assert_eq!(
            our_endpoint_at_theirs(&s),
            Some(endpoint(secondary, SIDECAR_PORT)),
            "outer {outer:?}: replies did not come from {secondary} (the kernel's choice is {default})"
        );

        // The address goes away: our next sends fall back to the kernel's choice.
        let len = outer.prefix_len();
        pair.a.ip(&format!(
            "addr del {} dev {}",
            cidr(secondary, len),
            Pair::LINK
        ));
        let moved = wait_until(Duration::from_secs(10), || {
            let _ = pair
                .a
                .try_exec(&format!("ping -c 1 -W 1 {}", inner(Family::V4, 2)));
            our_endpoint_at_theirs(&s) == Some(endpoint(default, SIDECAR_PORT))
        });
        assert!(
            moved,
            "outer {outer:?}: after {secondary} was removed wireguard-go sees us at {:?}, not {default}:\n{}",
            our_endpoint_at_theirs(&s),
            s.ours.log_tail(30)
        );
        let p = ping(&pair.a, inner(Family::V6, 2));
        assert!(
            p.all_received(),
            "outer {outer:?}: after the fallback:\n{}",
            p.output
        );
        pair.a.add_addr(Pair::LINK, &cidr(secondary, len));
    }
}

/// Every `ip rule` of both families in `ns`, one per line.
fn rules(ns: &Netns) -> String {
    format!("{}{}", ns.ip("-4 rule show"), ns.ip("-6 rule show"))
}

/// wireguard-go in `pair.b` as the peer of `ours_keys`, forwarding between the tunnel
/// and `beyond`, a host on 203.0.113.0/24 and 2001:db8:3::/64 that routes the
/// tunnel's addresses back through it.
fn forwarding_peer<'p>(
    pair: &'p Pair,
    beyond: &Netns,
    ours_keys: &KeyPair,
) -> (WireguardGo<'p>, KeyPair) {
    support::netns::veth(&pair.b, "vc", beyond, "vc");
    for f in Family::BOTH {
        pair.b.add_addr("vc", &cidr(roaming(f, 1), f.prefix_len()));
        beyond.add_addr("vc", &cidr(roaming(f, 2), f.prefix_len()));
        beyond.ip(&format!(
            "route add {} via {}",
            cidr(inner(f, 0), f.prefix_len()),
            roaming(f, 1)
        ));
    }
    pair.b.exec("sysctl -q -w net.ipv4.ip_forward=1");
    pair.b.exec("sysctl -q -w net.ipv6.conf.all.forwarding=1");
    let theirs_keys = KeyPair::generate();
    let theirs = WireguardGo::start(&pair.b, &theirs_keys, WGGO_PORT);
    for f in Family::BOTH {
        theirs.add_addr(&cidr(inner(f, 2), f.prefix_len()));
    }
    theirs.add_peer(
        &Peer::new(&ours_keys.public)
            .allow(cidr(inner(Family::V4, 1), 32))
            .allow(cidr(inner(Family::V6, 1), 128)),
    );
    (theirs, theirs_keys)
}

/// What a full tunnel must give `ns`: the default route of both families through
/// `iface`, the host beyond the peer reached over both, and the tunnel's own packets
/// on the underlay (wireguard-go sees us at our underlay address).
fn assert_full_tunnel(
    ns: &Netns,
    iface: &str,
    theirs: &WireguardGo,
    ours_public: &str,
    log: impl Fn() -> String,
) {
    let fwmark = ns.exec(&format!("wg show {iface} fwmark"));
    assert_ne!(fwmark.trim(), "off", "no fwmark on {iface}");
    for f in Family::BOTH {
        let route = ns.ip(&format!("route get {}", roaming(f, 2)));
        assert!(
            route.contains(&format!("dev {iface}")),
            "{f:?} default route not through {iface}: {route}"
        );
        let p = ping(ns, roaming(f, 2));
        assert!(
            p.all_received(),
            "host beyond the peer over {f:?}:\n{}\n--- log ---\n{}",
            p.output,
            log()
        );
    }
    let seen = theirs.peer(ours_public).and_then(|p| p.endpoint);
    assert!(
        seen.as_deref()
            .is_some_and(|e| e.starts_with(&format!("{}:", underlay(Family::V4, 1)))),
        "wireguard-go sees us at {seen:?}"
    );
}

/// Nothing of a full tunnel on `iface` left in `ns`: rules, routes, nft tables.
fn assert_no_full_tunnel_left(ns: &Netns, iface: &str) {
    let rules = rules(ns);
    assert!(
        !rules.contains("suppress_prefixlength") && !rules.contains("not from all fwmark"),
        "rules left behind:\n{rules}"
    );
    let routes = format!(
        "{}{}",
        ns.ip("-4 route show table all"),
        ns.ip("-6 route show table all")
    );
    assert!(!routes.contains(iface), "routes left behind:\n{routes}");
    let links = ns.ip("link show");
    assert!(!links.contains(iface), "interface left behind: {links}");
    assert!(!uapi_socket(iface).exists(), "socket left behind");
}

#[test]
fn up_with_a_full_tunnel_file_routes_everything_and_cleans_up() {
    require();
    let pair = Pair::new();
    let beyond = Netns::new();
    let ours_keys = KeyPair::generate();
    let (theirs, theirs_keys) = forwarding_peer(&pair, &beyond, &ours_keys);
    let config = AgentConfig {
        private_key: ours_keys.private.clone(),
        addresses: vec![
            cidr(inner(Family::V4, 1), 24),
            cidr(inner(Family::V6, 1), 64),
        ],
        listen_port: None,
        mtu: None,
        peers: vec![Peer::new(&theirs_keys.public)
            .allow("0.0.0.0/0")
            .allow("::/0")
            .endpoint(endpoint(underlay(Family::V4, 2), WGGO_PORT))],
        ..AgentConfig::default()
    };
    let mut agent = Agent::start(&pair.a, &config);
    let iface = agent.iface.clone();
    assert_full_tunnel(&pair.a, &iface, &theirs, &ours_keys.public, || agent.log());
    let status = agent.stop();
    assert!(
        status.success(),
        "up exited with {status}:\n{}",
        agent.log()
    );
    assert_no_full_tunnel_left(&pair.a, &iface);
}

#[test]
fn wg_quick_full_tunnel_through_a_forwarding_wireguard_go_peer() {
    require();
    require_tools(&["wg-quick", "nft", "sysctl"]);
    let pair = Pair::new();
    let beyond = Netns::new();
    let ours_keys = KeyPair::generate();
    let (theirs, theirs_keys) = forwarding_peer(&pair, &beyond, &ours_keys);
    let iface = support::unique_name("sq");
    let dir = TempDir::new();
    let file = dir.join(&format!("{iface}.conf"));
    std::fs::write(
        &file,
        format!(
            "[Interface]\nPrivateKey = {}\nAddress = {}, {}\n\n[Peer]\nPublicKey = {}\n\
             Endpoint = {}\nAllowedIPs = 0.0.0.0/0, ::/0\n",
            ours_keys.private,
            cidr(inner(Family::V4, 1), 24),
            cidr(inner(Family::V6, 1), 64),
            theirs_keys.public,
            endpoint(underlay(Family::V4, 2), WGGO_PORT),
        ),
    )
    .unwrap();
    let log = dir.join("sidecar-wg.log");
    let wg_quick = |action: &str| {
        let mut cmd = pair.a.program("wg-quick");
        cmd.arg(action)
            .arg(&file)
            .env("WG_QUICK_USERSPACE_IMPLEMENTATION", sidecar_wg_bin())
            .env("SIDECAR_WG_LOG_FILE", &log)
            .env("LOG_LEVEL", "debug");
        let out = support::process::output(&mut cmd);
        let daemon_log = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            out.status.success(),
            "wg-quick {action} failed ({}):\n{}{}\n--- sidecar-wg log ---\n{daemon_log}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    };
    // If an assertion fails before `down`, the namespace's removal takes the rest.
    wg_quick("up");
    let daemons = daemons_in(&pair.a);
    assert_eq!(daemons.len(), 1, "one sidecar-wg after wg-quick up");

    assert_full_tunnel(&pair.a, &iface, &theirs, &ours_keys.public, || {
        std::fs::read_to_string(&log).unwrap_or_default()
    });

    wg_quick("down");
    assert!(
        wait_until(Duration::from_secs(3), || daemons_in(&pair.a).is_empty()),
        "sidecar-wg still running after wg-quick down"
    );
    assert_no_full_tunnel_left(&pair.a, &iface);
    let nft = pair.a.exec("nft list tables");
    assert!(!nft.contains(&iface), "nft table left behind: {nft}");
}

#[test]
fn interface_moved_to_another_namespace_keeps_working() {
    require();
    require_tools(&["iperf3", "timeout"]);
    let pair = Pair::new();
    for outer in Family::BOTH {
        // The daemon and its UDP socket stay in A; the interface moves to `moved`.
        let moved = Netns::new();
        let ours_keys = KeyPair::generate();
        let theirs_keys = KeyPair::generate();
        let ours = SidecarWg::start(&pair.a);
        pair.a
            .ip(&format!("link set {} netns {}", ours.iface, moved.name()));
        moved.exec_with_stdin(
            &format!(
                "wg set {} private-key /dev/stdin listen-port {SIDECAR_PORT}",
                ours.iface
            ),
            &ours_keys.private,
        );
        for f in Family::BOTH {
            moved.add_addr(&ours.iface, &cidr(inner(f, 1), f.prefix_len()));
        }
        moved.ip(&format!("link set {} mtu {MTU} up", ours.iface));
        Peer::new(&theirs_keys.public)
            .allow(cidr(inner(Family::V4, 2), 32))
            .allow(cidr(inner(Family::V6, 2), 128))
            .endpoint(endpoint(underlay(outer, 2), WGGO_PORT))
            .apply(&moved, &ours.iface);
        let theirs = WireguardGo::start(&pair.b, &theirs_keys, WGGO_PORT);
        for f in Family::BOTH {
            theirs.add_addr(&cidr(inner(f, 2), f.prefix_len()));
        }
        theirs.add_peer(
            &Peer::new(&ours_keys.public)
                .allow(cidr(inner(Family::V4, 1), 32))
                .allow(cidr(inner(Family::V6, 1), 128))
                .endpoint(endpoint(underlay(outer, 1), SIDECAR_PORT)),
        );

        for f in Family::BOTH {
            assert!(
                ping_until_reply(&moved, inner(f, 2), HANDSHAKE_TIMEOUT),
                "outer {outer:?}: no ping over inner {f:?} from the new namespace:\n{}",
                ours.log_tail(30)
            );
            let p = ping(&pair.b, inner(f, 1));
            assert!(
                p.all_received(),
                "outer {outer:?}: B -> moved over {f:?}:\n{}",
                p.output
            );
            let what = format!("outer {outer:?}, inner {f:?}");
            for args in ["", " -R"] {
                iperf3(&pair.b, &moved, inner(f, 2), &format!("-n 20M{args}"))
                    .assert_tcp_delivered(10 << 20, &format!("{what}: TCP{args}"));
                iperf3(
                    &pair.b,
                    &moved,
                    inner(f, 2),
                    &format!("-u -b 40M -l 1200 -n 5M{args}"),
                )
                .assert_udp_delivered(1200, 25.0, &format!("{what}: UDP{args}"));
            }
        }
        // The socket stayed where the daemon started.
        let sockets = pair.a.exec(&format!("ss -Hulpn sport = :{SIDECAR_PORT}"));
        assert!(
            sockets.contains("sidecar-wg"),
            "outer {outer:?}: UDP socket not in A: {sockets}"
        );
        drop(theirs);
        drop(ours);
    }
}

#[test]
fn setconf_of_1000_peers_and_100000_allowed_ips_reads_back_completely() {
    require();
    let ns = Netns::new();
    let ours = SidecarWg::start(&ns);
    let keys = KeyPair::generate();
    // 1,000 peers with 100 allowed IPs each: 100,000 distinct /32 and /128 prefixes.
    let mut conf = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = {SIDECAR_PORT}\n",
        keys.private
    );
    let mut expected = std::collections::BTreeMap::new();
    for p in 0..1000u32 {
        let public = peer_key(p);
        let ips: Vec<String> = (0..100u32)
            .map(|i| {
                let n = p * 100 + i;
                if i % 2 == 0 {
                    format!("10.{}.{}.{}/32", n >> 16, (n >> 8) & 0xff, n & 0xff)
                } else {
                    let v6 =
                        std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, (n >> 16) as u16, n as u16);
                    format!("{v6}/128")
                }
            })
            .collect();
        conf += &format!(
            "\n[Peer]\nPublicKey = {public}\nAllowedIPs = {}\n",
            ips.join(", ")
        );
        expected.insert(public, ips);
    }
    let dir = TempDir::new();
    let file = dir.join("big.conf");
    std::fs::write(&file, conf).unwrap();

    let started = Instant::now();
    ns.exec(&format!("wg setconf {} {}", ours.iface, file.display()));
    let listed = ns.exec(&format!("wg show {} allowed-ips", ours.iface));
    let took = started.elapsed();
    let mut seen = std::collections::BTreeMap::new();
    for line in listed.lines() {
        let (public, ips) = line.split_once('\t').expect("key<TAB>ips");
        let mut ips: Vec<String> = ips.split_whitespace().map(str::to_string).collect();
        ips.sort();
        seen.insert(public.to_string(), ips);
    }
    for ips in expected.values_mut() {
        ips.sort();
    }
    assert_eq!(seen.len(), 1000, "peers listed back");
    assert!(
        seen == expected,
        "allowed IPs listed back differ from those set"
    );
    assert_eq!(seen.values().map(Vec::len).sum::<usize>(), 100_000);
    assert!(
        took < Duration::from_secs(30),
        "setconf and listing took {took:?}"
    );
    eprintln!("setconf of 1000 peers / 100000 allowed IPs and listing them back: {took:?}");
}

/// A distinct valid public key for peer `n` (any 32 bytes are a key to `wg`).
fn peer_key(n: u32) -> String {
    use base64::Engine as _;
    let mut bytes = [0x5au8; 32];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn up_exits_when_its_interface_is_deleted() {
    require();
    let ns = Netns::new();
    let keys = KeyPair::generate();
    let mut agent = Agent::start(
        &ns,
        &AgentConfig {
            private_key: keys.private.clone(),
            addresses: vec![cidr(inner(Family::V4, 1), 24)],
            ..AgentConfig::default()
        },
    );
    ns.ip(&format!("link del {}", agent.iface));
    assert!(
        wait_until(Duration::from_secs(1), || !agent.is_running()),
        "up still running 1 s after ip link del:\n{}",
        agent.log()
    );
    assert!(!uapi_socket(&agent.iface).exists(), "socket left behind");
}
