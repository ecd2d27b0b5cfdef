//! The relay's data plane following the registry: a live peer that gains an IPv4 /32
//! keeps its IPv6 session, the neighbour responder stops advertising an address the
//! moment its peer is deleted or its token revoked, and a relay restarted with another
//! prefix leaves the peers outside it off the data plane until they register again.
//!
//! Neighbour answers are observed as frames, not as ping loss: nftables counters on
//! the relay link count the solicitations (and ARP requests) reaching the relay's
//! uplink and the advertisements (and ARP replies) coming back from it. The relay's
//! own kernel holds no peer address, so every advertisement for one is the
//! responder's.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use support::relay::{
    Relay, RelayOptions, Topology, RELAY_TOOLS, REMOTE_NET4, ROUTER_LINK6, UPLINK,
};
use support::traffic::{ping_until_reply, ping_with};
use support::wg::KeyPair;
use support::{require_tools, unique_name, wait_until, Netns, BASE_TOOLS};

/// The router's end of the relay link (see tests/support/relay.rs).
const ROUTER_TO_RELAY: &str = "relay0";

fn require() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
}

/// Per address, two counters: solicitations for it arriving on the relay's uplink, and
/// advertisements for it arriving back at the router.
struct NeighbourWatch<'t> {
    router: &'t Netns,
    relay: &'t Netns,
    table: String,
    addrs: Vec<IpAddr>,
}

impl<'t> NeighbourWatch<'t> {
    fn new(topo: &'t Topology, addrs: &[IpAddr]) -> Self {
        let table = unique_name("nd");
        let (mut asked, mut answered, mut counters) = (String::new(), String::new(), String::new());
        for (i, addr) in addrs.iter().enumerate() {
            counters.push_str(&format!("  counter q{i} {{ }}\n  counter a{i} {{ }}\n"));
            match addr {
                IpAddr::V6(a) => {
                    asked.push_str(&format!(
                        "    icmpv6 type nd-neighbor-solicit @th,64,128 0x{:032x} counter name q{i}\n",
                        u128::from(*a)
                    ));
                    answered.push_str(&format!(
                        "    ip6 saddr {a} icmpv6 type nd-neighbor-advert counter name a{i}\n"
                    ));
                }
                IpAddr::V4(a) => {
                    asked.push_str(&format!(
                        "    arp operation request arp daddr ip {a} counter name q{i}\n"
                    ));
                    answered.push_str(&format!(
                        "    arp operation reply arp saddr ip {a} counter name a{i}\n"
                    ));
                }
            }
        }
        let table_text = |dev: &str, rules: &str| {
            format!(
                "table netdev {table} {{\n{counters}  chain in {{\n    type filter hook ingress device \"{dev}\" priority 0;\n{rules}  }}\n}}\n"
            )
        };
        topo.relay
            .exec_with_stdin("nft -f -", &table_text(UPLINK, &asked));
        topo.router
            .exec_with_stdin("nft -f -", &table_text(ROUTER_TO_RELAY, &answered));
        NeighbourWatch {
            router: &topo.router,
            relay: &topo.relay,
            table,
            addrs: addrs.to_vec(),
        }
    }

    fn counter(&self, ns: &Netns, name: &str) -> u64 {
        let out = ns.exec(&format!("nft list counter netdev {} {name}", self.table));
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .iter()
            .position(|w| *w == "packets")
            .and_then(|i| words.get(i + 1)?.parse().ok())
            .unwrap_or_else(|| panic!("no packet count in: {out}"))
    }

    fn index(&self, addr: IpAddr) -> usize {
        self.addrs
            .iter()
            .position(|a| *a == addr)
            .unwrap_or_else(|| panic!("{addr} is not watched"))
    }

    /// Makes the router's kernel solicit `addr` afresh; returns how many solicitations
    /// for it reached the relay and how many advertisements for it came back.
    fn probe(&self, addr: IpAddr) -> (u64, u64) {
        let i = self.index(addr);
        let (q, a) = (format!("q{i}"), format!("a{i}"));
        let (q0, a0) = (self.counter(self.relay, &q), self.counter(self.router, &a));
        let family = if addr.is_ipv6() { "-6" } else { "-4" };
        self.router
            .ip(&format!("{family} neigh flush dev {ROUTER_TO_RELAY}"));
        // One echo request makes the kernel resolve the address: up to three
        // solicitations a second apart; an answer would come within milliseconds.
        let _ = ping_with(self.router, addr, "-c 1 -W 3");
        let asked = wait_until(Duration::from_secs(5), || self.counter(self.relay, &q) > q0);
        assert!(asked, "the router never solicited {addr}");
        std::thread::sleep(Duration::from_millis(500));
        (
            self.counter(self.relay, &q) - q0,
            self.counter(self.router, &a) - a0,
        )
    }

    fn assert_answered(&self, addr: IpAddr, what: &str) {
        let (asked, answered) = self.probe(addr);
        assert!(
            answered >= 1,
            "{what}: the relay did not advertise {addr} ({asked} solicitations reached it)"
        );
    }

    fn assert_silent(&self, addr: IpAddr, what: &str) {
        let (asked, answered) = self.probe(addr);
        assert_eq!(
            answered, 0,
            "{what}: the relay still advertises {addr} ({asked} solicitations reached it)"
        );
    }
}

fn register_ok(
    relay: &Relay,
    token: &str,
    pubkey: &str,
    ipv4: bool,
) -> (Ipv6Addr, Option<Ipv4Addr>) {
    let r = relay.register(relay.ns(), token, pubkey, ipv4);
    assert!(r.status == 201 || r.status == 200, "registration: {r:?}");
    let alloc = support::relay::Allocation::from_json(&r.json);
    assert_eq!(alloc.ipv4.is_some(), ipv4, "{r:?}");
    (alloc.ipv6, alloc.ipv4)
}

/// Host routes into the relay's TUN device, as text.
fn tun_routes(relay: &Relay, family: &str) -> String {
    relay
        .ns()
        .ip(&format!("{family} route show dev {}", relay.iface))
}

#[test]
fn live_peer_gains_ipv4_by_registering_again_without_losing_its_session() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions { ipv4_pool: true });
    let (_, token) = relay.create_token("grows", 2, 1, None);
    let site = topo.client_site();
    let client = site.connect(&relay, &token, false);
    let me6 = client.ipv6();
    assert!(
        ping_until_reply(&topo.remote, me6, Duration::from_secs(15)),
        "remote never reached {me6}"
    );
    let before = relay.peer(&client.keys.public).expect("peer in wg show");
    assert_ne!(before.latest_handshake, 0, "{before:?}");

    let again = relay.register(&site.ns, &token, &client.keys.public, true);
    assert_eq!(again.status, 200, "re-registration with ipv4: {again:?}");
    assert_eq!(again.json["created"], false);
    let alloc = support::relay::Allocation::from_json(&again.json);
    assert_eq!(IpAddr::from(alloc.ipv6), me6, "the IPv6 address changed");
    let me4 = IpAddr::from(
        alloc
            .ipv4
            .unwrap_or_else(|| panic!("no IPv4 granted: {again:?}")),
    );

    // The relay routes the /32 and puts it on the peer, next to the /128, in place.
    let after = relay.peer(&client.keys.public).expect("peer in wg show");
    let mut allowed = after.allowed_ips.clone();
    allowed.sort();
    let mut want = vec![format!("{me6}/128"), format!("{me4}/32")];
    want.sort();
    assert_eq!(allowed, want, "allowed IPs after gaining IPv4: {after:?}");
    assert!(
        tun_routes(&relay, "-4").contains(&me4.to_string()),
        "no route for {me4} into the relay's TUN:\n{}",
        tun_routes(&relay, "-4")
    );
    // Same session: no new handshake was needed, none was thrown away.
    assert_eq!(
        after.latest_handshake, before.latest_handshake,
        "the re-registration replaced the peer's session: {before:?} -> {after:?}"
    );
    let p = ping_with(&topo.remote, me6, "-c 3 -i 0.2 -W 2");
    assert!(p.all_received(), "IPv6 after gaining IPv4:\n{}", p.output);

    let watch = NeighbourWatch::new(&topo, &[me4]);
    watch.assert_answered(me4, "the new /32");
    assert_eq!(
        topo.router_neighbor(me4).as_deref(),
        Some(topo.relay_uplink_mac().as_str()),
        "the router did not resolve {me4} to the relay"
    );

    // What an agent does with the new allocation; the IPv6 tunnel stays up meanwhile.
    client.wg.wg(&format!(
        "set {} peer {} allowed-ips ::/0,0.0.0.0/0",
        client.wg.iface, alloc.relay_public_key
    ));
    client.wg.add_addr(&format!("{me4}/32"));
    site.ns
        .ip(&format!("route add {REMOTE_NET4} dev {}", client.wg.iface));
    let p = ping_with(&topo.remote, me4, "-c 5 -i 0.2 -W 2");
    assert!(p.all_received(), "remote to the new {me4}:\n{}", p.output);
    let p = ping_with(&site.ns, support::relay::REMOTE4.into(), "-c 3 -i 0.2 -W 2");
    assert!(
        p.all_received(),
        "the client over IPv4 to the remote:\n{}",
        p.output
    );
    let p = ping_with(&topo.remote, me6, "-c 3 -i 0.2 -W 2");
    assert!(p.all_received(), "IPv6 after IPv4 is in use:\n{}", p.output);
    assert_eq!(
        relay.peer(&client.keys.public).map(|p| p.latest_handshake),
        Some(before.latest_handshake),
        "the session was replaced while IPv4 came up"
    );
}

#[test]
fn neighbour_responder_goes_silent_for_deleted_and_revoked_peers() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions { ipv4_pool: true });
    let (_, deleting) = relay.create_token("deleting", 2, 1, None);
    let (revoked_id, revoked) = relay.create_token("revoked", 2, 1, None);
    let (_, keeping) = relay.create_token("keeping", 2, 1, None);
    let (a, b, k) = (
        KeyPair::generate().public,
        KeyPair::generate().public,
        KeyPair::generate().public,
    );
    let (a6, a4) = register_ok(&relay, &deleting, &a, true);
    let (b6, b4) = register_ok(&relay, &revoked, &b, true);
    let (k6, k4) = register_ok(&relay, &keeping, &k, true);
    let [a4, b4, k4] = [a4, b4, k4].map(|v| IpAddr::from(v.expect("ipv4")));
    let [a6, b6, k6] = [a6, b6, k6].map(IpAddr::from);
    let watch = NeighbourWatch::new(&topo, &[a6, a4, b6, b4, k6, k4]);
    for addr in [a6, a4, b6, b4, k6, k4] {
        watch.assert_answered(addr, "registered peer");
    }

    let del = relay.call(
        relay.ns(),
        "DELETE",
        "/v1/peers",
        &deleting,
        Some(&serde_json::json!({"pubkey": a})),
    );
    assert_eq!(del.status, 204, "{del:?}");
    watch.assert_silent(a6, "deleted peer");
    watch.assert_silent(a4, "deleted peer");
    watch.assert_answered(b6, "untouched peer after a delete");

    let rev = relay.call(
        relay.ns(),
        "DELETE",
        "/v1/admin/tokens",
        &relay.creds.admin_token,
        Some(&serde_json::json!({"id": revoked_id})),
    );
    assert_eq!(rev.status, 204, "{rev:?}");
    watch.assert_silent(b6, "peer of a revoked token");
    watch.assert_silent(b4, "peer of a revoked token");
    watch.assert_answered(k6, "peer of another token after a revocation");
    watch.assert_answered(k4, "peer of another token after a revocation");
    // The router link's own address is the router's: never the relay's to claim.
    assert_ne!(IpAddr::from(ROUTER_LINK6), k6);
}

/// A second on-link /64 the router gets on the relay link for the changed plan.
const NEW_PREFIX: &str = "2001:db8:2::/64";
const NEW_ROUTER_LINK6: &str = "2001:db8:2::1/64";

#[test]
fn restart_with_another_prefix_skips_old_peers_until_they_register_again() {
    require();
    let topo = Topology::new();
    let mut relay = Relay::start(&topo, &RelayOptions::default());
    let token = relay.creds.default_token.clone();
    let site = topo.client_site();
    let client = site.connect(&relay, &token, false);
    let old6 = client.ipv6();
    assert!(
        ping_until_reply(&topo.remote, old6, Duration::from_secs(15)),
        "remote never reached {old6}"
    );
    relay.stop(libc::SIGTERM);

    // The operator moves the relay to another prefix on the same link.
    let text = std::fs::read_to_string(&relay.config).expect("read relay.toml");
    let old_line = "ipv6_prefix = \"2001:db8:1::/64\"";
    assert!(text.contains(old_line), "unexpected relay.toml:\n{text}");
    let changed = text.replace(old_line, &format!("ipv6_prefix = \"{NEW_PREFIX}\""));
    std::fs::write(&relay.config, changed).expect("write relay.toml");
    topo.router.ip(&format!(
        "-6 addr add {NEW_ROUTER_LINK6} dev {ROUTER_TO_RELAY}"
    ));
    relay.run();

    let dump = relay.dump();
    assert!(
        dump.is_empty(),
        "a peer outside the new prefix is on the data plane: {dump:?}"
    );
    assert!(
        !tun_routes(&relay, "-6").contains(&old6.to_string()),
        "the old address is still routed into the TUN:\n{}",
        tun_routes(&relay, "-6")
    );
    let watch = NeighbourWatch::new(&topo, &[old6]);
    watch.assert_silent(old6, "address outside the new prefix");

    // Registering again moves the same key into the new plan.
    let again = relay.register(&site.ns, &token, &client.keys.public, false);
    assert!(
        again.status == 200 || again.status == 201,
        "re-registration after the plan change: {again:?}"
    );
    let alloc = support::relay::Allocation::from_json(&again.json);
    let new6 = alloc.ipv6;
    assert_eq!(
        new6.segments()[..4],
        [0x2001, 0xdb8, 2, 0],
        "the peer's new address {new6} is not in {NEW_PREFIX}"
    );
    let dump = relay.dump();
    assert_eq!(dump.len(), 1, "{dump:?}");
    assert_eq!(dump[0].allowed_ips, vec![format!("{new6}/128")]);

    // The client takes the new address; the relay's key and endpoint are unchanged.
    client.wg.add_addr(&format!("{new6}/128"));
    let new6 = IpAddr::from(new6);
    let watch = NeighbourWatch::new(&topo, &[new6]);
    watch.assert_answered(new6, "the new address");
    assert!(
        ping_until_reply(&topo.remote, new6, Duration::from_secs(40)),
        "remote never reached the re-registered peer at {new6}\nrelay log:\n{}",
        relay.log_tail(30)
    );
}
