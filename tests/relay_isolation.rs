//! A relay shared by several tokens, as its tenants see it: each peer (Debian's
//! wireguard-go behind a NAT) reaches the internet beyond the router, but not the
//! peers of other tokens, the relay host's own addresses, or a private network on a
//! second interface of the relay host; peers of one token reach each other unless the
//! token isolates them. And packets for addresses nobody holds do not bounce between
//! the router and the relay until their hop limit runs out.

mod support;

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::json;
use support::agent::metric_value;
use support::netns::veth;
use support::relay::{
    Relay, RelayOptions, Topology, RELAY_TOOLS, RELAY_UPLINK6, REMOTE4, REMOTE6, ROUTED_POOL,
    ROUTED_PREFIX,
};
use support::traffic::{ping_until_reply, ping_with};
use support::{require_tools, unique_name, wg, KeyPair, Netns, BASE_TOOLS};

const FIRST_CONTACT: Duration = Duration::from_secs(15);
const PORT: u16 = 7001;

/// The relay host's private network on its second interface.
const LAN_RELAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1);
const LAN_HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 2);
const LAN_RELAY4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 193);
const LAN_HOST4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 194);

fn require() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
}

/// The relay's Prometheus counters, over its `wg` socket.
fn metrics(relay: &Relay) -> String {
    let mut s = UnixStream::connect(wg::uapi_socket(&relay.iface)).expect("relay's uapi socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"metrics=1\n\n").unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

fn dropped(relay: &Relay, reason: &str) -> f64 {
    let text = metrics(relay);
    metric_value(&text, "sidecar_dropped_total", &[("reason", reason)])
        .unwrap_or_else(|| panic!("no drop counter for {reason}:\n{text}"))
}

/// Whether a ping from `ns` to `dst` gets any reply (two tries, quickly).
fn pings(ns: &Netns, dst: IpAddr) -> bool {
    ping_with(ns, dst, "-c 2 -i 0.2 -W 1").received > 0
}

/// A TCP listener on every address of `ns`, kept open while the value lives.
fn listen(ns: &Netns) -> TcpListener {
    ns.enter(|| TcpListener::bind(("::", PORT)).expect("bind the test listener"))
}

fn connects(ns: &Netns, dst: IpAddr) -> bool {
    let to = SocketAddr::new(dst, PORT);
    ns.enter(|| TcpStream::connect_timeout(&to, Duration::from_millis(1500)).is_ok())
}

/// A host on a second, private interface of the relay's namespace, with the relay as
/// its gateway: without isolation, every peer could reach it and be reached from it.
fn private_lan(topo: &Topology) -> Netns {
    let lan = Netns::new();
    lan.exec("sysctl -qw net.ipv6.conf.all.accept_dad=0");
    lan.exec("sysctl -qw net.ipv6.conf.default.accept_dad=0");
    let dev = unique_name("lan");
    veth(&topo.relay, &dev, &lan, "eth0");
    topo.relay.add_addr(&dev, &format!("{LAN_RELAY6}/64"));
    topo.relay.add_addr(&dev, &format!("{LAN_RELAY4}/28"));
    lan.add_addr("eth0", &format!("{LAN_HOST6}/64"));
    lan.add_addr("eth0", &format!("{LAN_HOST4}/28"));
    lan.ip(&format!("-6 route add default via {LAN_RELAY6}"));
    lan.ip(&format!("route add default via {LAN_RELAY4}"));
    lan
}

/// `POST /v1/admin/tokens`, optionally isolating the token's peers; the secret.
fn token(relay: &Relay, name: &str, isolate_peers: bool) -> String {
    let body = json!({"name": name, "max_peers": 4, "max_ipv4": 4, "isolate_peers": isolate_peers, "bind_machine": false});
    let r = relay.call(
        relay.ns(),
        "POST",
        "/v1/admin/tokens",
        &relay.creds.admin_token,
        Some(&body),
    );
    assert_eq!(r.status, 201, "token creation failed: {r:?}");
    r.json["token"].as_str().expect("token secret").to_owned()
}

#[test]
fn tenants_reach_the_internet_but_not_each_other_the_host_or_its_private_network() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions { ipv4_pool: true });
    // Added after the start: the relay must follow the host's new interface.
    let lan = private_lan(&topo);
    let (one, two) = (token(&relay, "one", false), token(&relay, "two", false));
    let (site_a, site_a2, site_b) = (topo.client_site(), topo.client_site(), topo.client_site());
    let a = site_a.connect(&relay, &one, true);
    let a2 = site_a2.connect(&relay, &one, false);
    let b = site_b.connect(&relay, &two, true);
    // IPv4 from the clients goes into the tunnel only where a route says so (their
    // underlay, towards the relay's endpoint, stays outside it).
    for v4 in [b.ipv4(), LAN_HOST4.into(), LAN_RELAY4.into()] {
        a.ns().ip(&format!("route add {v4}/32 dev {}", a.wg.iface));
    }

    for (who, c) in [("a", &a), ("b", &b)] {
        assert!(
            ping_until_reply(c.ns(), REMOTE6.into(), FIRST_CONTACT),
            "peer {who} never reached the internet host over IPv6\nrelay log:\n{}",
            relay.log_tail(30)
        );
        assert!(
            pings(c.ns(), REMOTE4.into()),
            "peer {who} -> remote over IPv4"
        );
    }
    assert!(ping_until_reply(a2.ns(), REMOTE6.into(), FIRST_CONTACT));
    let _remote = listen(&topo.remote);
    assert!(connects(a.ns(), REMOTE6.into()), "TCP a -> remote");
    assert!(
        connects(b.ns(), REMOTE4.into()),
        "TCP b -> remote over IPv4"
    );

    // Peers of one token reach each other.
    assert!(pings(a.ns(), a2.ipv6()), "a -> a2, same token");
    assert!(pings(a2.ns(), a.ipv6()), "a2 -> a, same token");
    let _a2_listener = listen(a2.ns());
    assert!(connects(a.ns(), a2.ipv6()), "TCP a -> a2, same token");

    let before = |r| dropped(&relay, r);
    let (tenant0, host0, private0) = (before("tenant"), before("host"), before("private"));

    // Another token's peer: neither ping nor TCP, either way, over either family.
    let _b_listener = listen(b.ns());
    for dst in [b.ipv6(), b.ipv4()] {
        assert!(
            !pings(a.ns(), dst),
            "a (token one) must not reach b (token two) at {dst}"
        );
        assert!(!connects(a.ns(), dst), "TCP a -> b at {dst} must fail");
    }
    assert!(!pings(b.ns(), a.ipv6()), "b must not reach a");
    assert!(dropped(&relay, "tenant") >= tenant0 + 4.0);

    // The relay host itself: its uplink address, and its address on the private link.
    let _relay_listener = listen(relay.ns());
    for dst in [RELAY_UPLINK6.into(), LAN_RELAY6.into(), LAN_RELAY4.into()] {
        assert!(
            !pings(a.ns(), dst),
            "a must not reach the relay host at {dst}"
        );
        assert!(
            !connects(a.ns(), dst),
            "TCP a -> relay host at {dst} must fail"
        );
    }
    assert!(dropped(&relay, "host") >= host0 + 6.0);

    // The private network behind the relay's second interface, both ways.
    let _lan_listener = listen(&lan);
    for dst in [LAN_HOST6.into(), LAN_HOST4.into()] {
        assert!(
            !pings(a.ns(), dst),
            "a must not reach the private host at {dst}"
        );
        assert!(
            !connects(a.ns(), dst),
            "TCP a -> private host at {dst} must fail"
        );
    }
    assert!(!pings(&lan, a.ipv6()), "the private host must not reach a");
    assert!(
        !pings(&lan, a.ipv4()),
        "the private host must not reach a over IPv4"
    );
    assert!(dropped(&relay, "private") >= private0 + 6.0);

    // And none of that disturbed the allowed paths.
    assert!(pings(a.ns(), REMOTE6.into()) && pings(b.ns(), REMOTE6.into()));
    assert!(pings(a.ns(), a2.ipv6()));
}

#[test]
fn a_token_that_isolates_its_peers_keeps_them_apart() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let secret = token(&relay, "isolated", true);
    let (site_c, site_d) = (topo.client_site(), topo.client_site());
    let c = site_c.connect(&relay, &secret, false);
    let d = site_d.connect(&relay, &secret, false);
    for c in [&c, &d] {
        assert!(
            ping_until_reply(c.ns(), REMOTE6.into(), FIRST_CONTACT),
            "an isolated token's peer must still reach the internet\nrelay log:\n{}",
            relay.log_tail(30)
        );
    }
    let isolated0 = dropped(&relay, "isolated");
    let _d_listener = listen(d.ns());
    assert!(!pings(c.ns(), d.ipv6()), "c -> d, isolated token");
    assert!(!connects(c.ns(), d.ipv6()), "TCP c -> d, isolated token");
    assert!(!pings(d.ns(), c.ipv6()), "d -> c, isolated token");
    assert!(dropped(&relay, "isolated") >= isolated0 + 4.0);
}

/// Counts the router's forwards of packets for `dst`: each is one crossing of the
/// router-relay link towards the relay or back.
struct ForwardCounter<'n> {
    ns: &'n Netns,
    table: String,
}

impl<'n> ForwardCounter<'n> {
    fn new(ns: &'n Netns, dst: IpAddr) -> Self {
        let table = unique_name("fwd");
        let family = if dst.is_ipv6() { "ip6" } else { "ip" };
        ns.exec_with_stdin(
            "nft -f -",
            &format!(
                "table inet {table} {{\n  counter seen {{ }}\n  chain through {{\n    type filter hook forward priority filter;\n    {family} daddr {dst} counter name seen\n  }}\n}}\n"
            ),
        );
        ForwardCounter { ns, table }
    }

    fn packets(&self) -> u64 {
        let out = self
            .ns
            .exec(&format!("nft list counter inet {} seen", self.table));
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .iter()
            .position(|w| *w == "packets")
            .and_then(|i| words.get(i + 1)?.parse().ok())
            .unwrap_or_else(|| panic!("no packet count in: {out}"))
    }
}

/// One ping with hop limit 64 from the internet host to `dst`, which no peer holds:
/// it crosses the router-relay link at most twice. Returns ping's output.
fn assert_no_loop(topo: &Topology, dst: IpAddr, what: &str) -> String {
    let counter = ForwardCounter::new(&topo.router, dst);
    let p = ping_with(&topo.remote, dst, "-c 1 -t 64 -W 2");
    assert_eq!(
        p.received, 0,
        "{what}: {dst} answered an echo:\n{}",
        p.output
    );
    let n = counter.packets();
    assert!(
        n <= 2,
        "{what}: the ping to {dst} crossed the router {n} times (a loop)"
    );
    p.output
}

/// Registers a key that never comes up (no client), lets the router send it one
/// packet, deletes it again; returns its addresses.
fn held_then_deleted(relay: &Relay, topo: &Topology) -> (IpAddr, IpAddr) {
    let keys = KeyPair::generate();
    let token = &relay.creds.default_token;
    let r = relay.register(relay.ns(), token, &keys.public, true);
    assert_eq!(r.status, 201, "{r:?}");
    let addr = |k: &str| -> IpAddr {
        let a = r.json[k].as_str().expect("address");
        a.split_once('/').map_or(a, |(a, _)| a).parse().unwrap()
    };
    let (v6, v4) = (addr("ipv6"), addr("ipv4"));
    // While held the relay takes its packets (and drops them: no endpoint yet), so
    // the router learns the way to it.
    for a in [v6, v4] {
        let _ = ping_with(&topo.remote, a, "-c 1 -W 1");
    }
    let del = relay.call(
        relay.ns(),
        "DELETE",
        "/v1/peers",
        token,
        Some(&json!({"pubkey": keys.public})),
    );
    assert_eq!(del.status, 204, "{del:?}");
    (v6, v4)
}

#[test]
fn unallocated_addresses_do_not_loop_in_routed_mode() {
    require();
    let topo = Topology::new();
    let relay = Relay::start_routed(&topo, &RelayOptions { ipv4_pool: true });
    assert!(ROUTED_PREFIX.starts_with("2001:db8:7::") && ROUTED_POOL.starts_with("203.0.113.240"));
    let never6: IpAddr = "2001:db8:7::dead".parse().unwrap();
    let never4: IpAddr = "203.0.113.250".parse().unwrap();
    for dst in [never6, never4] {
        let out = assert_no_loop(&topo, dst, "never allocated");
        assert!(
            out.contains("Unreachable") || out.contains("unreachable"),
            "{dst} must be answered with destination unreachable:\n{out}"
        );
    }
    let (v6, v4) = held_then_deleted(&relay, &topo);
    for dst in [v6, v4] {
        let out = assert_no_loop(&topo, dst, "deleted peer");
        assert!(out.to_lowercase().contains("unreachable"), "{dst}:\n{out}");
    }
    let text = metrics(&relay);
    let sent = metric_value(&text, "sidecar_unreachable_sent_total", &[]).unwrap_or(0.0);
    assert!(sent >= 4.0, "unreachable answers sent: {sent}\n{text}");
    assert!(dropped(&relay, "unallocated") >= 4.0);
}

#[test]
fn unallocated_addresses_do_not_loop_on_link() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions { ipv4_pool: true });
    let never6: IpAddr = "2001:db8:1::dead".parse().unwrap();
    let never4: IpAddr = "192.0.2.90".parse().unwrap();
    for dst in [never6, never4] {
        assert_no_loop(&topo, dst, "never allocated (on-link)");
    }
    let (v6, v4) = held_then_deleted(&relay, &topo);
    for dst in [v6, v4] {
        assert_no_loop(&topo, dst, "deleted peer (on-link)");
    }
}
