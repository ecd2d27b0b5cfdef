//! The relay end to end, as its users see it: a WireGuard client behind a NAT registers
//! over the HTTPS API, configures Debian's wireguard-go from the answer alone, and is
//! then reachable from (and reaches) a host on the other side of an ordinary router on
//! its own public /128 (and /32), with the router finding it only through the relay's
//! neighbor answers.

mod support;

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use support::relay::{
    ClientSite, Relay, RelayOptions, SourceCounter, Topology, NAT_PUBLIC, RELAY_TOOLS, REMOTE4,
    REMOTE6,
};
use support::traffic::{iperf3, ping_until_reply, ping_with};
use support::{require_tools, BASE_TOOLS};

const FIRST_CONTACT: Duration = Duration::from_secs(15);

/// What a 3 s TCP run must at least move (under 3 Mbit/s): far below what the path does on
/// a busy machine, far above what a tunnel that stalls or passes only small packets does.
const TCP_FLOOR_BYTES: u64 = 1 << 20;

/// UDP loss at 10 Mbit/s that a busy two-core machine may cause (a scheduling stall
/// overflowing a socket buffer) without a broken data path.
const MAX_UDP_LOSS_PERCENT: f64 = 10.0;

fn require() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
}

fn in_peer_prefix(a: Ipv6Addr) -> bool {
    a.segments()[..4] == [0x2001, 0xdb8, 1, 0]
}

/// Pings from `ns` to `dst` from source `src`: 5 quick ones, all must come back.
fn assert_ping(ns: &support::Netns, src: Option<IpAddr>, dst: IpAddr, what: &str) {
    let args = match src {
        Some(src) => format!("-c 5 -i 0.2 -W 2 -I {src}"),
        None => "-c 5 -i 0.2 -W 2".to_owned(),
    };
    let p = ping_with(ns, dst, &args);
    assert!(
        p.all_received(),
        "{what}: ping {dst} lost replies:\n{}",
        p.output
    );
}

#[test]
fn ipv6_peer_behind_nat_reachable_both_ways() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let site = topo.client_site();
    let client = site.connect(&relay, &relay.creds.default_token, false);
    let me = client.ipv6();
    assert!(in_peer_prefix(client.alloc.ipv6), "{me} not in the prefix");
    assert_eq!(client.alloc.ipv4, None, "no IPv4 was asked for");
    assert_eq!(client.alloc.relay_public_key, relay.creds.public_key);

    // The remote host reaches the client: the router resolves the /128 on the relay link.
    assert!(
        ping_until_reply(&topo.remote, me, FIRST_CONTACT),
        "remote never reached {me}\nrelay log:\n{}",
        relay.log_tail(30)
    );
    assert_ping(&topo.remote, None, me, "remote -> client");
    assert_eq!(
        topo.router_neighbor(me),
        Some(topo.relay_uplink_mac()),
        "the router must have resolved the peer's /128 to the relay's uplink"
    );

    // TCP both ways, with iperf3 connecting from the remote host.
    let down = iperf3(&site.ns, &topo.remote, me, "-t 3");
    down.assert_tcp_delivered(TCP_FLOOR_BYTES, "TCP remote -> client");
    let up = iperf3(&site.ns, &topo.remote, me, "-t 3 -R");
    up.assert_tcp_delivered(TCP_FLOOR_BYTES, "TCP client -> remote");
    // UDP at a modest rate, datagrams that fit the tunnel MTU whole.
    let udp = iperf3(&site.ns, &topo.remote, me, "-t 3 -u -b 10M -l 1200");
    let loss = udp.udp_loss_percent();
    udp.assert_udp_delivered(1200, MAX_UDP_LOSS_PERCENT, "UDP remote -> client");
    eprintln!(
        "ipv6 remote->client TCP {:.1} Mbit/s, client->remote TCP {:.1} Mbit/s, UDP 10M loss {loss:.2}%",
        down.received_bits_per_second() / 1e6,
        up.received_bits_per_second() / 1e6
    );

    // The client reaches the remote host from its /128.
    assert_ping(&site.ns, Some(me), REMOTE6.into(), "client -> remote");
    let out = iperf3(
        &topo.remote,
        &site.ns,
        REMOTE6.into(),
        &format!("-t 3 -B {me}"),
    );
    out.assert_tcp_delivered(TCP_FLOOR_BYTES, "TCP client -> remote, client connecting");

    // `wg show` on the relay: the peer, its NATed endpoint, a handshake, its /128.
    let status = relay
        .peer(&client.keys.public)
        .unwrap_or_else(|| panic!("relay's wg show lacks the peer:\n{:?}", relay.dump()));
    let endpoint = status.endpoint.clone().unwrap_or_default();
    assert!(
        endpoint.starts_with(&format!("{NAT_PUBLIC}:")),
        "the relay must see the client behind the NAT's address, got {endpoint:?}"
    );
    assert!(status.latest_handshake > 0, "no handshake: {status:?}");
    assert_eq!(status.allowed_ips, vec![format!("{me}/128")]);
    assert!(status.rx_bytes > 0 && status.tx_bytes > 0, "{status:?}");
}

#[test]
fn ipv4_from_on_link_pool_reachable_both_ways() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions { ipv4_pool: true });
    let site = topo.client_site();
    let client = site.connect(&relay, &relay.creds.default_token, true);
    let v4 = client
        .alloc
        .ipv4
        .expect("ipv4: true on a relay with a pool");
    assert!(
        v4.octets()[..3] == [192, 0, 2] && (64..96).contains(&v4.octets()[3]),
        "{v4} is not in the pool 192.0.2.64/27"
    );
    let me4 = client.ipv4();

    // Only the relay's ARP answers can lead the router to the /32.
    assert!(
        ping_until_reply(&topo.remote, me4, FIRST_CONTACT),
        "remote never reached {me4}\nrelay log:\n{}",
        relay.log_tail(30)
    );
    assert_ping(&topo.remote, None, me4, "remote -> client /32");
    assert_eq!(
        topo.router_neighbor(me4),
        Some(topo.relay_uplink_mac()),
        "the router must have resolved the peer's /32 to the relay's uplink by ARP"
    );
    assert_ping(&site.ns, Some(me4), REMOTE4.into(), "client /32 -> remote");

    let down = iperf3(&site.ns, &topo.remote, me4, "-t 3");
    down.assert_tcp_delivered(TCP_FLOOR_BYTES, "TCP remote -> client /32");
    let up = iperf3(
        &topo.remote,
        &site.ns,
        REMOTE4.into(),
        &format!("-t 3 -B {me4}"),
    );
    up.assert_tcp_delivered(TCP_FLOOR_BYTES, "TCP client /32 -> remote");
    eprintln!(
        "ipv4 remote->client TCP {:.1} Mbit/s, client->remote TCP {:.1} Mbit/s",
        down.received_bits_per_second() / 1e6,
        up.received_bits_per_second() / 1e6
    );

    // The same peer is dual-stack: its /128 works too.
    assert_ping(&topo.remote, None, client.ipv6(), "remote -> client /128");
    let status = relay.peer(&client.keys.public).expect("peer on the relay");
    let mut allowed = status.allowed_ips.clone();
    allowed.sort();
    let mut want = vec![format!("{}/128", client.ipv6()), format!("{me4}/32")];
    want.sort();
    assert_eq!(allowed, want);
}

/// Two clients behind the same NAT: both work, each only with its own addresses.
#[test]
fn peers_cannot_spoof_source_addresses() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let (site_a, site_b): (ClientSite, ClientSite) = (topo.client_site(), topo.client_site());
    let a = site_a.connect(&relay, &relay.creds.default_token, false);
    let b = site_b.connect(&relay, &relay.creds.default_token, false);
    assert_ne!(a.alloc.ipv6, b.alloc.ipv6);
    for c in [&a, &b] {
        assert!(
            ping_until_reply(&topo.remote, c.ipv6(), FIRST_CONTACT),
            "remote never reached {}",
            c.ipv6()
        );
    }
    // Both behind the NAT's single address; the NAT gave them different ports.
    let ea = relay.peer(&a.keys.public).and_then(|p| p.endpoint);
    let eb = relay.peer(&b.keys.public).and_then(|p| p.endpoint);
    for e in [&ea, &eb] {
        assert!(
            e.as_deref()
                .is_some_and(|e| e.starts_with(&format!("{NAT_PUBLIC}:"))),
            "endpoint {e:?} is not the NAT's"
        );
    }
    assert_ne!(ea, eb, "two clients behind one NAT need distinct endpoints");

    // The relay routes between its peers like any router.
    assert_ping(&a.site.ns, Some(a.ipv6()), b.ipv6(), "client A -> client B");

    // A source from the prefix that belongs to nobody: dropped before it leaves the relay.
    let foreign: IpAddr = "2001:db8:1::bad:1".parse().unwrap();
    assert!(foreign != a.ipv6() && foreign != b.ipv6());
    let seen_foreign = SourceCounter::new(&topo.remote, foreign);
    a.wg.add_addr(&format!("{foreign}/128"));
    let p = ping_with(
        &a.site.ns,
        REMOTE6.into(),
        &format!("-c 3 -i 0.2 -W 1 -I {foreign}"),
    );
    assert_eq!(p.received, 0, "spoofed source got replies:\n{}", p.output);
    assert_eq!(
        seen_foreign.packets(),
        0,
        "the remote host saw packets from a spoofed source"
    );
    // The same ping from the real address works, so the tunnel was up all along.
    assert_ping(
        &a.site.ns,
        Some(a.ipv6()),
        REMOTE6.into(),
        "client A from its own /128",
    );

    // A sending with B's address: never reaches the remote (B is idle meanwhile).
    let seen_b = SourceCounter::new(&topo.remote, b.ipv6());
    a.wg.add_addr(&format!("{}/128", b.ipv6()));
    let p = ping_with(
        &a.site.ns,
        REMOTE6.into(),
        &format!("-c 3 -i 0.2 -W 1 -I {}", b.ipv6()),
    );
    assert_eq!(p.received, 0, "A got replies as B:\n{}", p.output);
    assert_eq!(
        seen_b.packets(),
        0,
        "the remote host saw A's packets as B's"
    );
    // B itself still gets through, and is counted.
    assert_ping(&b.site.ns, Some(b.ipv6()), REMOTE6.into(), "client B");
    assert!(seen_b.packets() >= 5, "the counter must see B's own pings");
}
